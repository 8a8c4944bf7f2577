//! `corral doctor`: what this host gives corral, each check ok / warn /
//! fail with the fix.

use std::path::Path;

use crate::broker::scope::Systemd;
use crate::cgroup;
use crate::sandbox::{self, landlock::ABI_SCOPES, landlock::ABI_TCP};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Report {
    worst: Level,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, text: &str) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        println!("{tag}  {what:<10} {text}");
        if level == Level::Fail || (level == Level::Warn && self.worst == Level::Ok) {
            self.worst = level;
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn user_exists(name: &str) -> bool {
    nix::unistd::User::from_name(name).ok().flatten().is_some()
}

/// The running broker, through its socket API (`GET /v1/status`), as the
/// user running doctor sees it.
async fn broker_check(r: &mut Report, socket: &Path) {
    match crate::client::request(socket, hyper::Method::GET, crate::api::STATUS_PATH, None).await {
        Ok((status, bytes)) if status.is_success() => match serde_json::from_slice::<crate::api::Status>(&bytes) {
            Ok(st) => r.line(
                Level::Ok,
                "broker",
                &format!(
                    "pid {} (corral {}) answers on {}; {} workflow(s) you may use; resources: {}",
                    st.broker.pid,
                    st.broker.version,
                    socket.display(),
                    st.workflows.len(),
                    st.broker.resource_control
                ),
            ),
            Err(e) => r.line(Level::Warn, "broker", &format!("unreadable status from {}: {e}", socket.display())),
        },
        Ok((status, bytes)) => {
            r.line(Level::Warn, "broker", &format!("{}: {}", socket.display(), super::describe_error(status, &bytes)))
        }
        Err(e) => r.line(Level::Warn, "broker", &e.to_string()),
    }
}

/// Other users in `user`'s primary group (members, or users whose primary
/// group it is): the tenant directory is open to that group.
fn group_sharers(user: &str) -> Option<String> {
    let u = nix::unistd::User::from_name(user).ok().flatten()?;
    let group = nix::unistd::Group::from_gid(u.gid).ok().flatten()?;
    let mut others: Vec<String> = group.mem.into_iter().filter(|m| m != user).collect();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] != user && f[3] == u.gid.as_raw().to_string() && !others.iter().any(|o| o == f[0]) {
            others.push(f[0].to_string());
        }
    }
    (!others.is_empty()).then(|| others.join(", "))
}

/// Whether a user with `uid` and groups `gids` may connect to `socket`:
/// search (x) on every directory above it, write on the socket itself.
/// Err names the first obstacle.
fn reachable(socket: &Path, uid: u32, gids: &[u32]) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let allowed = |m: &std::fs::Metadata, bit: u32| -> bool {
        let mode = m.mode();
        if uid == 0 {
            return true;
        }
        let shift = if m.uid() == uid {
            6
        } else if gids.contains(&m.gid()) {
            3
        } else {
            0
        };
        mode & (bit << shift) != 0
    };
    let describe = |p: &Path, m: &std::fs::Metadata| {
        let owner = |id: u32| nix::unistd::User::from_uid(id.into()).ok().flatten().map(|u| u.name);
        let group = |id: u32| nix::unistd::Group::from_gid(id.into()).ok().flatten().map(|g| g.name);
        format!(
            "{} (mode {:04o}, {}:{})",
            p.display(),
            m.mode() & 0o7777,
            owner(m.uid()).unwrap_or_else(|| m.uid().to_string()),
            group(m.gid()).unwrap_or_else(|| m.gid().to_string())
        )
    };
    let mut dirs: Vec<&Path> = socket.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).collect();
    dirs.reverse();
    for dir in dirs {
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !allowed(&m, 0o1) {
            return Err(format!("cannot enter {}", describe(dir, &m)));
        }
    }
    let m = std::fs::metadata(socket)
        .map_err(|e| format!("{}: {e}: is the broker running? (systemctl start corral.socket)", socket.display()))?;
    if !allowed(&m, 0o2) {
        return Err(format!("may not write to {}", describe(socket, &m)));
    }
    Ok(describe(socket, &m))
}

/// `corral doctor --as USER` (root only): whether USER can reach the
/// socket, and which workflows the broker lets them call.
async fn run_as(user: &str, socket: &Path) -> u8 {
    let mut r = Report { worst: Level::Ok };
    if !nix::unistd::Uid::effective().is_root() {
        r.line(Level::Fail, "as", "--as USER needs root (it reads what another user may do)");
        return 1;
    }
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(uid.into()),
        Err(_) => nix::unistd::User::from_name(user),
    };
    let Ok(Some(u)) = found else {
        r.line(Level::Fail, "as", &format!("no local user {user:?}: name one from /etc/passwd"));
        return 1;
    };
    let name = u.name.clone();
    let gids: Vec<u32> = std::ffi::CString::new(name.clone())
        .ok()
        .and_then(|c| nix::unistd::getgrouplist(&c, u.gid).ok())
        .map(|g| g.iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![u.gid.as_raw()]);
    match reachable(socket, u.uid.as_raw(), &gids) {
        Ok(how) => r.line(Level::Ok, "socket", &format!("{name} can reach the broker's socket {how}")),
        Err(why) => r.line(
            Level::Fail,
            "socket",
            &format!(
                "{name} cannot reach the broker's socket: {why}; the socket should be mode 0666 in a directory \
                 open to all (units/corral.socket; re-run scripts/install.sh)"
            ),
        ),
    }
    let path = format!("{}?as={}", crate::api::STATUS_PATH, u.uid.as_raw());
    match crate::client::request(socket, hyper::Method::GET, &path, None).await {
        Ok((status, bytes)) if status.is_success() => match serde_json::from_slice::<crate::api::Status>(&bytes) {
            Ok(st) if st.workflows.is_empty() => r.line(
                Level::Fail,
                "clients",
                &format!(
                    "{name} may call no workflow: the broker refuses every call with 403; add the user to a \
                     workflow's clients.users (or a group of theirs to clients.groups) and run \
                     `systemctl reload corral`"
                ),
            ),
            Ok(st) => {
                let names: Vec<&str> = st.workflows.iter().map(|w| w.name.as_str()).collect();
                r.line(Level::Ok, "clients", &format!("{name} may call: {}", names.join(", ")))
            }
            Err(e) => r.line(Level::Warn, "clients", &format!("unreadable status from {}: {e}", socket.display())),
        },
        Ok((status, bytes)) => {
            r.line(Level::Warn, "clients", &format!("{}: {}", socket.display(), super::describe_error(status, &bytes)))
        }
        Err(e) => {
            r.line(Level::Warn, "clients", &format!("cannot ask the broker which workflows {name} may call: {e}"))
        }
    }
    u8::from(r.worst == Level::Fail)
}

/// Runs every check; exit code 1 when any failed. With `as_user`, only
/// whether that user can reach the broker and what they may call.
pub async fn run_for(policies: &Path, worker_user: &str, socket: &Path, as_user: Option<&str>) -> u8 {
    match as_user {
        Some(user) => run_as(user, socket).await,
        None => run(policies, worker_user, socket).await,
    }
}

/// Runs every check; exit code 1 when any failed.
pub async fn run(policies: &Path, worker_user: &str, socket: &Path) -> u8 {
    let mut r = Report { worst: Level::Ok };
    let kernel = sandbox::probe();
    let abi = kernel.landlock_abi;
    let release = kernel_release();
    match abi {
        0 => r.line(
            Level::Fail,
            "landlock",
            &format!("not available on Linux {release}: workflows with landlock = \"required\" will not start; use Linux 5.13+ with \"landlock\" in the lsm= boot parameter"),
        ),
        a if a < ABI_TCP => r.line(
            Level::Warn,
            "landlock",
            &format!("ABI {a} on Linux {release}: files only; no TCP port rules (ABI {ABI_TCP}, Linux 6.7), no signal/abstract-socket scopes (ABI {ABI_SCOPES}, Linux 6.12): workflows with tcp ports need landlock = \"best-effort\" and then get no network"),
        ),
        a if a < ABI_SCOPES => r.line(
            Level::Warn,
            "landlock",
            &format!("ABI {a} on Linux {release}: files and TCP ports; signals and abstract sockets are not scoped (needs ABI {ABI_SCOPES}, Linux 6.12)"),
        ),
        a => r.line(Level::Ok, "landlock", &format!("ABI {a} on Linux {release}: files, TCP ports, signal and abstract-socket scopes")),
    }
    if kernel.seccomp {
        r.line(Level::Ok, "seccomp", "filters available");
    } else {
        r.line(Level::Fail, "seccomp", "not available: the kernel needs CONFIG_SECCOMP_FILTER");
    }
    let root = Path::new(cgroup::ROOT);
    match cgroup::version(root) {
        "v2" => {
            let ctl = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let missing: Vec<_> =
                ["memory", "cpu", "pids"].into_iter().filter(|c| !ctl.split_whitespace().any(|x| x == *c)).collect();
            if missing.is_empty() {
                r.line(Level::Ok, "cgroups", &format!("v2 with controllers: {}", ctl.trim()));
            } else {
                r.line(Level::Warn, "cgroups", &format!("v2 without {missing:?}: those limits cannot hold; enable the controllers (on a Raspberry Pi: add cgroup_enable=memory to cmdline.txt)"));
            }
        }
        "v1" => {
            let missing: Vec<_> = ["memory", "cpu", "pids"].into_iter().filter(|c| !root.join(c).is_dir()).collect();
            if missing.is_empty() {
                r.line(
                    Level::Ok,
                    "cgroups",
                    "v1 (hybrid): memory, cpu, pids hierarchies mounted; memory.peak and cgroup.kill need v2",
                );
            } else {
                r.line(
                    Level::Warn,
                    "cgroups",
                    &format!("v1 without {missing:?} hierarchies: those limits cannot hold"),
                );
            }
        }
        _ => r.line(Level::Warn, "cgroups", "no cgroup file system at /sys/fs/cgroup: only rlimits limit workers"),
    }
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let bus = Path::new("/run/dbus/system_bus_socket").exists();
    let systemd = Systemd::connect().await;
    match &systemd {
        Ok(sd) => r.line(Level::Ok, "systemd", &format!("systemd {} answers on the system bus: workers get transient scopes", sd.version)),
        Err(e) => r.line(
            Level::Warn,
            "systemd",
            &format!(
                "not reachable ({e}; PID 1 is {}, D-Bus socket {}): the broker falls back to rlimits — cpu_quota, memory_swap_max, io_weight and tenant limits are NOT enforced",
                pid1.trim(),
                if bus { "present" } else { "missing" }
            ),
        ),
    }
    let root_user = nix::unistd::Uid::effective().is_root();
    if !root_user {
        r.line(
            Level::Warn,
            "namespaces",
            "not checked (run doctor as root); a broker that is not root gives its workers no PID, mount or IPC namespace",
        );
    } else {
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        match sandbox::process::probe_namespaces(&exe) {
            Ok(()) => r.line(
                Level::Ok,
                "namespaces",
                "workers get their own PID, mount and IPC namespaces (own /proc, noexec paths, private IPC)",
            ),
            Err(e) => r.line(
                Level::Fail,
                "namespaces",
                &format!(
                    "cannot create PID, mount and IPC namespaces here ({e}): workers will refuse to start; the broker \
                     needs CAP_SYS_ADMIN (as a service: RestrictNamespaces=ipc mnt pid, see units/corral.service)"
                ),
            ),
        }
    }
    if user_exists(worker_user) {
        r.line(Level::Ok, "users", &format!("default worker user {worker_user} exists"));
    } else {
        r.line(
            if root_user { Level::Fail } else { Level::Warn },
            "users",
            &format!("default worker user {worker_user} missing: run systemd-sysusers (units/sysusers.d/corral.conf) or useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {worker_user}"),
        );
    }
    let loaded = crate::policy::load_dir(policies);
    let wants_disk = loaded.as_ref().is_ok_and(|p| p.workflows.iter().any(|w| w.limits.disk_max.is_some()));
    match crate::broker::quota::host_support() {
        Ok(how) => r.line(Level::Ok, "disk", &format!("disk_max can be enforced: {how}")),
        Err(why) => r.line(
            if wants_disk { Level::Fail } else { Level::Warn },
            "disk",
            &format!("{why}; workflows with limits.disk_max will not start"),
        ),
    }
    match loaded {
        Ok(p) => {
            for wf in &p.workflows {
                if let Some(u) = &wf.user {
                    if let Some(others) = group_sharers(u) {
                        r.line(
                            Level::Warn,
                            "users",
                            &format!(
                                "the group of {u} (workflow {}) also holds {others}: they can traverse tenant {}'s \
                                 directory and reach any workspace its tools open with chmod; give {u} a group of its own",
                                wf.name, wf.tenant
                            ),
                        );
                    }
                    if user_exists(u) {
                        r.line(Level::Ok, "users", &format!("{u} (workflow {}) exists", wf.name));
                    } else {
                        r.line(Level::Fail, "users", &format!("{u} (workflow {}) missing: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {u}", wf.name));
                    }
                }
            }
            for w in &p.warnings {
                r.line(Level::Warn, "policy", w);
            }
            for wf in &p.workflows {
                let Some(llm) = &wf.llm else { continue };
                let now = super::check::endpoint_now(&llm.endpoint);
                let level = if now.starts_with("REFUSED") { Level::Warn } else { Level::Ok };
                r.line(
                    level,
                    "llm",
                    &format!("{} ({}): {}; now: {now}", llm.base_url, wf.name, llm.endpoint.describe()),
                );
            }
            for wf in &p.workflows {
                println!("      promises of {} (Landlock ABI {abi}):", wf.name);
                for row in crate::broker::setup::enforcement_rows(wf, systemd.is_ok()) {
                    println!("        {:<10} {}", row.promise, row.by);
                }
            }
        }
        Err(e) => r.line(
            Level::Warn,
            "policy",
            &format!(
                "could not load {} ({}): tenant users not checked; pass --policies DIR",
                policies.display(),
                e.0.first().map(ToString::to_string).unwrap_or_default()
            ),
        ),
    }
    let unit = [
        "/etc/systemd/system/corral.service",
        "/run/systemd/system/corral.service",
        "/usr/lib/systemd/system/corral.service",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    match unit {
        Some(p) => r.line(Level::Ok, "service", &format!("{p} installed")),
        None => r.line(Level::Warn, "service", "corral.service not installed: run scripts/install.sh"),
    }
    broker_check(&mut r, socket).await;
    match r.worst {
        Level::Fail => {
            println!("\nsome checks failed: fix them before running the broker");
            1
        }
        Level::Warn => {
            println!("\nusable, with the warnings above");
            0
        }
        Level::Ok => 0,
    }
}
