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

/// Runs every check; exit code 1 when any failed.
pub async fn run(policies: &Path, worker_user: &str) -> u8 {
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
    match crate::policy::load_dir(policies) {
        Ok(p) => {
            for wf in &p.workflows {
                if let Some(u) = &wf.user {
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
