//! From a loaded policy to what the broker runs: resolved users, created
//! workspaces, and the sandbox spec handed to every worker of the workflow.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::{Group, Uid, User};

use super::auth::Clients;
use super::egress::{Egress, Resolver};
use super::pool::{PoolConfig, ScopeSetup};
use super::quota::{self, Quota};
use super::scope::{slice_name, Systemd, UnitLimits};
use super::workspace;
use crate::policy::{self, Workflow};
use crate::protocol::{Credentials, Requirement, SandboxSpec, ToolLimits};

/// Default PATH for tool calls when the policy's `[env]` sets none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub struct Prepared {
    pub pool: PoolConfig,
    pub clients: Clients,
}

fn missing_user_hint(user: &str) -> String {
    format!(
        "user {user} does not exist: create it with `useradd --system --user-group --no-create-home \
         --shell /usr/sbin/nologin {user}`"
    )
}

/// Resolves who the workers run as: `Ok(None)` keeps the broker's own
/// credentials (only when the broker is not root).
fn credentials(wf: &Workflow, default_user: &str) -> Result<Option<Credentials>, String> {
    let root = Uid::effective().is_root();
    let name = match (&wf.user, root) {
        (Some(u), _) => u.clone(),
        (None, true) => default_user.to_string(),
        (None, false) => return Ok(None),
    };
    let user = User::from_name(&name)
        .map_err(|e| format!("failed to look up user {name}: {e}"))?
        .ok_or_else(|| missing_user_hint(&name))?;
    if user.uid.is_root() {
        return Err(format!("user {name} has uid 0: workers never run as root; name an unprivileged user"));
    }
    if !root && user.uid != Uid::effective() {
        return Err(format!(
            "the broker is not root, so it cannot run workers as {name}: run it as root, or remove `user` \
             from {}",
            wf.source.display()
        ));
    }
    Ok(Some(Credentials { user: name, uid: user.uid.as_raw(), gid: user.gid.as_raw() }))
}

fn resolve_clients(wf: &Workflow) -> Clients {
    let mut clients = Clients::default();
    for name in &wf.clients.users {
        match User::from_name(name) {
            Ok(Some(u)) => clients.uids.push(u.uid.as_raw()),
            _ => tracing::warn!(workflow = %wf.name, "client user {name} does not exist; ignored"),
        }
    }
    for name in &wf.clients.groups {
        match Group::from_name(name) {
            Ok(Some(g)) => clients.gids.push(g.gid.as_raw()),
            _ => tracing::warn!(workflow = %wf.name, "client group {name} does not exist; ignored"),
        }
    }
    clients
}

/// The systemd limits of a worker's scope.
pub fn scope_limits(wf: &Workflow) -> UnitLimits {
    let l = &wf.limits;
    UnitLimits {
        memory_max: Some(l.memory_max.0),
        memory_swap_max: l.memory_swap_max.as_ref().map(|s| s.0),
        cpu_quota_percent: l.cpu_quota.as_ref().map(|p| p.0),
        tasks_max: Some(u64::from(l.tasks_max)),
        io_weight: l.io_weight.map(u64::from),
    }
}

/// The systemd limits of a tenant's slice.
pub fn slice_limits(t: &policy::TenantLimits) -> UnitLimits {
    UnitLimits {
        memory_max: t.memory_max.as_ref().map(|s| s.0),
        memory_swap_max: None,
        cpu_quota_percent: t.cpu_quota.as_ref().map(|p| p.0),
        tasks_max: t.tasks_max.map(u64::from),
        io_weight: None,
    }
}

/// `systemd`: set when workers go into transient scopes; then cgroups
/// limit memory and tasks, and the rlimits that stood in for them go.
pub fn prepare(
    wf: &Workflow,
    state_dir: &Path,
    default_user: &str,
    systemd: Option<(&Systemd, &str)>,
    egress_hosts: Option<&Path>,
) -> Prepared {
    let workspace = wf.workspace(state_dir);
    let mut unavailable = None;
    let creds = match credentials(wf, default_user) {
        Ok(c) => c,
        Err(why) => {
            unavailable = Some(why);
            None
        }
    };
    if unavailable.is_none() {
        match workspace::make_workspace(state_dir, wf.tenant.as_str(), wf.name.as_str(), creds.as_ref()) {
            Ok(_) => {}
            Err(e @ workspace::WorkspaceError::NotDirectory { .. }) => unavailable = Some(e.to_string()),
            Err(e) => {
                unavailable = Some(format!(
                    "failed to create workspace {}: {e}; check that the state directory is writable by the broker",
                    workspace.display()
                ))
            }
        }
    }
    if unavailable.is_none() && wf.network.is_some() && !nix::unistd::Uid::effective().is_root() {
        unavailable = Some(
            "[network] needs a broker running as root: each worker gets a network namespace of its own, \
             with the broker's egress proxy as its only way out; run the broker as root, or remove [network]"
                .to_string(),
        );
    }
    let expanded_exec: Vec<PathBuf> = wf.sandbox.exec.iter().map(|p| p.expand(&workspace)).collect();
    let mut quota = None;
    if unavailable.is_none() {
        match attach_quota(wf, state_dir, &workspace, creds.as_ref(), &expanded_exec) {
            Ok(q) => quota = q,
            Err(why) => unavailable = Some(why),
        }
    }
    let expand =
        |paths: &[policy::PathTemplate]| -> Vec<PathBuf> { paths.iter().map(|p| p.expand(&workspace)).collect() };
    let mut env: Vec<(String, String)> =
        wf.env.iter().map(|(k, v)| (k.clone(), v.replace("{workspace}", &workspace.to_string_lossy()))).collect();
    if wf.network.is_some() {
        // What curl, pip, git, python's urllib and most other clients read;
        // curl ignores the upper-case HTTP_PROXY, python prefers lower case.
        let proxy = format!("http://127.0.0.1:{}", crate::sandbox::net::PROXY_PORT);
        for key in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), proxy.clone()));
        }
        env.retain(|(k, _)| !k.eq_ignore_ascii_case("no_proxy") && !k.eq_ignore_ascii_case("all_proxy"));
    }
    for (key, value) in [
        ("PATH", DEFAULT_PATH.to_string()),
        ("HOME", workspace.display().to_string()),
        ("TMPDIR", workspace.display().to_string()),
    ] {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), value));
        }
    }
    let limits = &wf.limits;
    let spec = SandboxSpec {
        workflow: wf.name.to_string(),
        broker_pid: std::process::id(),
        credentials: creds,
        landlock: match wf.sandbox.landlock {
            policy::Requirement::Required => Requirement::Required,
            policy::Requirement::BestEffort => Requirement::BestEffort,
        },
        read: expand(&wf.sandbox.read),
        write: expand(&wf.sandbox.write),
        exec: expand(&wf.sandbox.exec),
        tcp_connect: wf.sandbox.tcp_connect.clone(),
        tcp_bind: wf.sandbox.tcp_bind.clone(),
        egress_proxy: wf.network.as_ref().map(|_| crate::sandbox::net::PROXY_PORT),
        workspace: workspace.clone(),
        scope: None,
        tool: ToolLimits {
            output_max: limits.output_max.0,
            file_size_max: limits.file_size_max.0,
            open_files_max: u64::from(limits.open_files_max),
            // Only when no cgroup limits memory: RLIMIT_DATA stands in for
            // memory_max (what a call commits, not what it reserves, so
            // JITs start), RLIMIT_AS only as a generous backstop.
            data_max: systemd.is_none().then_some(limits.memory_max.0),
            address_space_max: systemd
                .is_none()
                .then(|| crate::sandbox::spec::address_space_backstop(limits.memory_max.0)),
            processes_max: systemd.is_none().then_some(u64::from(limits.tasks_max)),
        },
        env,
    };
    Prepared {
        pool: PoolConfig {
            workflow: wf.name.to_string(),
            tenant: wf.tenant.to_string(),
            user: spec.credentials.as_ref().map(|c| c.user.clone()),
            workspace,
            spec,
            min_idle: wf.pool.min_idle,
            max_workers: wf.pool.max_workers,
            queue: wf.pool.queue,
            unavailable,
            scope: systemd.map(|(sd, prefix)| ScopeSetup {
                systemd: sd.clone(),
                prefix: prefix.to_string(),
                slice: slice_name(wf.tenant.as_str()),
                limits: scope_limits(wf),
            }),
            enforcement: enforcement_rows(wf, systemd.is_some()),
            memory_max: wf.limits.memory_max.to_string(),
            tasks_max: wf.limits.tasks_max,
            quota,
            egress: wf.network.as_ref().map(|n| {
                Arc::new(Egress {
                    workflow: wf.name.to_string(),
                    network: n.clone(),
                    resolver: Resolver::new(egress_hosts.map(Path::to_path_buf), true),
                })
            }),
        },
        clients: resolve_clients(wf),
    }
}

/// Mounts the workflow's `disk_max` image on its workspace (see
/// [`quota`]), then gives the mounted root the workspace's owner and mode.
/// `Err` is why the workflow cannot run: a quota the policy sets is never
/// dropped silently.
fn attach_quota(
    wf: &Workflow,
    state_dir: &Path,
    workspace: &Path,
    creds: Option<&Credentials>,
    exec: &[PathBuf],
) -> Result<Option<Arc<Quota>>, String> {
    let tenant = wf.tenant.as_str();
    let images =
        workspace::images_dir(state_dir, tenant).map_err(|e| format!("failed to create the images directory: {e}"))?;
    let image = quota::image_path(&images, wf.name.as_str());
    let Some(max) = wf.limits.disk_max else {
        return Quota::check_orphan(&image).map(|()| None).map_err(|e| e.to_string());
    };
    // Executing from the workspace only where the policy allows it.
    let noexec = !exec.iter().any(|p| workspace.starts_with(p) || p.starts_with(workspace));
    let q = Quota::new(wf.name.as_str(), max, image, workspace.to_path_buf(), noexec);
    q.attach(creds.map(|c| (c.uid, c.gid))).map_err(|e| e.to_string())?;
    workspace::make_workspace(state_dir, tenant, wf.name.as_str(), creds)
        .map_err(|e| format!("failed to prepare the mounted workspace {}: {e}", workspace.display()))?;
    Ok(Some(Arc::new(q)))
}

/// The promise table of a workflow on this host (status and doctor).
pub fn enforcement_rows(wf: &Workflow, systemd: bool) -> Vec<crate::sandbox::Enforcement> {
    let sb = &wf.sandbox;
    let tcp = !sb.tcp_connect.is_empty() || !sb.tcp_bind.is_empty();
    let req = match sb.landlock {
        policy::Requirement::Required => Requirement::Required,
        policy::Requirement::BestEffort => Requirement::BestEffort,
    };
    let abi = crate::sandbox::probe().landlock_abi;
    let mut rows = match crate::sandbox::enforcement(req, tcp, abi) {
        Ok(rows) => rows,
        Err(e) => vec![crate::sandbox::Enforcement { promise: "refused".into(), by: e.to_string() }],
    };
    let cg = systemd.then(|| crate::cgroup::version(Path::new(crate::cgroup::ROOT)));
    if let Some(n) = &wf.network {
        let private = if n.private {
            "private addresses allowed"
        } else {
            "no loopback, private, link-local or metadata address"
        };
        let by = format!(
            "the broker's egress proxy only, to {} ({private}; at most {} connections and {} per call): each \
             worker has a network namespace of its own with loopback only (Landlock TCP on the proxy's port \
             where ABI >= 4; seccomp: no UDP, raw or other families)",
            n.allow.iter().map(|r| r.text.as_str()).collect::<Vec<_>>().join(", "),
            n.connections_max,
            n.bytes_max
        );
        for row in rows.iter_mut().filter(|r| r.promise == "network") {
            row.by.clone_from(&by);
        }
    }
    rows.extend(crate::sandbox::resource_rows(cg));
    rows.push(disk_row(wf));
    rows
}

/// The `disk` promise of a workflow: how `disk_max` is held here, or why
/// it cannot be (then the workflow does not start).
pub fn disk_row(wf: &Workflow) -> crate::sandbox::Enforcement {
    let by = match (&wf.limits.disk_max, quota::host_support()) {
        (None, _) => "no disk_max: the workspace shares the state directory's file system".to_string(),
        (Some(max), Ok(how)) => format!("disk_max {max}: {how}"),
        (Some(max), Err(why)) => format!("REFUSED (disk_max {max}): {why}"),
    };
    crate::sandbox::Enforcement { promise: "disk".into(), by }
}
