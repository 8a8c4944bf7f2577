//! The sandbox: everything that confines a worker and its tool calls.
//!
//! A root broker starts each worker as PID 1 of its own PID, mount and IPC
//! namespaces ([`process::spawn_worker`]). The worker calls
//! [`confine_worker`] on itself, single-threaded, before it reads its first
//! request. The steps, in their required order:
//!
//! 0. check it is inside its systemd scope (when it has one);
//! 1. [`namespace::enter`], still root: its own `/proc`, a private `noexec`
//!    `/dev/shm`, its IPC namespace's POSIX queues, `noexec` on every path
//!    outside the `exec` rules, `kernel.shm_rmid_forced`; then
//!    `oom_score_adj` 1000 (tools inherit it);
//! 2. become a child subreaper (a daemonizing tool still comes back to us);
//! 3. [`creds::drop_privileges`]: bounding and ambient capabilities cleared,
//!    groups, gid and uid switched to the workflow's user, the remaining
//!    capability sets emptied and verified, parent-death signal armed,
//!    `no_new_privs`, non-dumpable, no core files;
//! 4. the worker's Landlock layer (the policy's paths plus read access to
//!    `/proc`, which it needs to find a tool's descendants, and to its POSIX
//!    queue directory, which it empties after each call);
//! 5. the seccomp filter.
//!
//! Each tool call then gets a second, stricter Landlock layer
//! ([`tool_layer`]): the policy's paths only (no `/proc` unless the policy
//! grants it) and a fresh scope, so a tool cannot signal its own worker.
//!
//! [`spec`] holds what a worker is asked to enforce and what it reports
//! back; the wire ([`crate::protocol`]) only carries them. All `unsafe`
//! code of corral is in this module ([`sys`], [`process`], [`namespace`]
//! and [`memory`], the broker's allocator settings).

pub mod creds;
pub mod landlock;
pub mod memory;
pub mod namespace;
pub mod net;
pub mod process;
pub mod refusal;
pub mod seccomp;
pub mod session;
pub mod spawn;
pub mod spec;
pub mod sys;

use std::path::{Path, PathBuf};

use spec::{EffectiveSandbox, Requirement, SandboxSpec};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "landlock = \"required\" but the kernel offers no Landlock: use Linux 5.13 or newer with \
         \"landlock\" in the lsm= boot parameter, or set landlock = \"best-effort\" in the policy"
    )]
    LandlockUnavailable,
    #[error(
        "the policy allows TCP ports (sandbox.tcp_connect / tcp_bind) but the kernel's Landlock ABI {0} \
         cannot restrict ports (needs ABI 4, Linux 6.7): remove the ports, or set \
         landlock = \"best-effort\" to run with no network at all"
    )]
    TcpNeedsAbi(u32),
    #[error(
        "the Landlock syscalls are blocked by a seccomp filter around the broker: if it runs as a systemd \
         service, allow landlock_create_ruleset, landlock_add_rule and landlock_restrict_self in its \
         SystemCallFilter= (see units/corral.service)"
    )]
    LandlockBlocked,
    #[error("failed to apply Landlock ruleset: {0}")]
    Landlock(String),
    #[error("failed to build or install the seccomp filter: {0}")]
    Seccomp(String),
    #[error("failed to {0}")]
    Syscall(&'static str, #[source] std::io::Error),
    #[error("failed to {0} for user {1}")]
    Switch(&'static str, String, #[source] nix::Error),
    #[error("failed to clear the {0} capability set: {1}")]
    Caps(&'static str, String),
    #[error("refusing to run a worker as root (user {0} has uid 0): name an unprivileged user in the policy")]
    RootTarget(String),
    #[error(
        "the broker is not root, so it cannot switch workers to user {0}: run the broker as root, or \
         remove `user` from the policy"
    )]
    CannotSwitch(String),
    #[error("refusing to keep uid 0 in a worker: the broker must name an unprivileged user")]
    NoUserAsRoot,
    #[error("privilege drop did not hold: {0}")]
    Verify(String),
    #[error("the broker exited before the worker was ready")]
    Orphaned,
    #[error("the worker must be single-threaded when it sandboxes itself, found {0} threads")]
    Threads(usize),
    #[error("the worker is not inside its systemd scope {0}; refusing to run outside its cgroup limits")]
    NotInScope(String),
    #[error(
        "failed to {0} for the worker's own namespaces: {1}. The broker needs CAP_SYS_ADMIN and the unshare and \
         mount syscalls; as a systemd service: RestrictNamespaces=ipc mnt pid, CAP_SYS_ADMIN in \
         CapabilityBoundingSet=, mount mount_setattr in SystemCallFilter= (see units/corral.service)"
    )]
    Namespace(&'static str, #[source] std::io::Error),
    #[error(
        "the workflow has [network], but the worker's network namespace has interfaces {0:?}, not only \
         \"lo\": refusing to run tools that could go around the egress proxy"
    )]
    NetworkNotIsolated(Vec<String>),
    #[error(
        "sessions need Landlock to keep their files apart, and this kernel has none: use Linux 5.13 or newer \
         with \"landlock\" in the lsm= boot parameter, or call without a session"
    )]
    SessionsNeedLandlock,
    #[error(
        "the policy's rule {0} contains the workspace, so a session's calls could reach other sessions through it: \
         narrow the rule in [sandbox], or call without a session"
    )]
    SessionRuleAbove(PathBuf),
    #[error("the session directory {0} is not a directory beneath the workspace (replaced by a call outside the session?): remove the session and retry")]
    SessionDir(PathBuf),
    #[error("failed to mount {0} noexec for the worker: {1}")]
    NoExec(std::path::PathBuf, #[source] std::io::Error),
}

/// What the running kernel offers, probed without changing anything.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct KernelSupport {
    pub landlock_abi: u32,
    pub seccomp: bool,
}

pub fn probe() -> KernelSupport {
    KernelSupport { landlock_abi: sys::landlock_abi(), seccomp: sys::seccomp_available() }
}

/// Whether TCP is allowed at all for this spec on a kernel of `abi`. With
/// an egress proxy it always is: the worker's network namespace is the
/// boundary, and Landlock only narrows it further.
fn tcp_allowed(spec: &SandboxSpec, abi: u32) -> bool {
    spec.egress_proxy.is_some()
        || ((!spec.tcp_connect.is_empty() || !spec.tcp_bind.is_empty()) && abi >= landlock::ABI_TCP)
}

/// The ports a Landlock layer lets tools connect to: the proxy's alone
/// with an egress proxy (from ABI 4; below it the namespace holds alone).
pub(crate) fn connect_ports(spec: &SandboxSpec, abi: u32) -> Vec<u16> {
    match spec.egress_proxy {
        Some(port) if abi >= landlock::ABI_TCP => vec![port],
        Some(_) => Vec::new(),
        None => spec.tcp_connect.clone(),
    }
}

/// With an egress proxy: checks that the worker's namespace has nothing but
/// loopback, and says what holds its network.
fn check_egress(spec: &SandboxSpec, abi: u32) -> Result<Option<String>, SandboxError> {
    let Some(port) = spec.egress_proxy else { return Ok(None) };
    let ifaces = net::interfaces().map_err(|e| SandboxError::Syscall("list the worker's network interfaces", e))?;
    if ifaces != ["lo"] {
        return Err(SandboxError::NetworkNotIsolated(ifaces));
    }
    let ports = if abi >= landlock::ABI_TCP {
        format!("Landlock ABI {abi} allows TCP connect to port {port} only")
    } else {
        format!("Landlock ABI {abi} cannot restrict ports: the namespace alone holds")
    };
    Ok(Some(format!(
        "own network namespace with loopback only; the broker's proxy at 127.0.0.1:{port} is the only way out; \
         {ports}; seccomp refuses UDP, raw and other families"
    )))
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// A confined worker: what it reports, and what it needs afterwards.
pub struct Confined {
    pub effective: EffectiveSandbox,
    /// Where the worker's IPC namespace lists its POSIX queues, for
    /// [`namespace::clean_ipc`] after each call.
    pub mqueue: Option<PathBuf>,
    /// The worker's private `/dev/shm`, for [`namespace::clean_shm`] after
    /// each call.
    pub shm: Option<PathBuf>,
}

/// `oom_score_adj` of every worker and tool: the OOM killer's first choice.
pub const TOOL_OOM_SCORE_ADJ: i32 = 1000;

/// Confines the calling (worker) process for good. See the module docs.
///
/// `sock` is the broker socket: across a PID namespace it is how the worker
/// knows its broker is alive.
pub fn confine_worker(spec: &SandboxSpec, sock: std::os::fd::BorrowedFd<'_>) -> Result<Confined, SandboxError> {
    // INVARIANT: Landlock and seccomp bind the calling thread and its later
    // children only: there must be no other thread left unconfined.
    let threads = thread_count();
    if threads != 1 {
        return Err(SandboxError::Threads(threads));
    }
    // INVARIANT: with systemd, the broker created the scope before it sent
    // Init; check rather than trust that the limits are around us.
    if let Some(unit) = &spec.scope {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if !crate::cgroup::placed_in(&cgroups, unit) {
            return Err(SandboxError::NotInScope(unit.clone()));
        }
    }
    // Namespaces first: they need root, and Landlock's rules must name the
    // new mounts (/proc above all), not the ones they replace.
    let ns = namespace::enter(spec)?;
    let abi = sys::landlock_abi();
    let egress = check_egress(spec, abi)?;
    // Raising it needs no privilege, and tools inherit it.
    let oom = std::fs::write("/proc/self/oom_score_adj", TOOL_OOM_SCORE_ADJ.to_string())
        .map(|()| TOOL_OOM_SCORE_ADJ)
        .map_err(|e| SandboxError::Syscall("raise oom_score_adj", e))?;

    // Open the Landlock path descriptors while we may still read everything.
    let mut extra: Vec<&Path> = vec![Path::new("/proc")];
    if let Some(mq) = &ns.mqueue {
        extra.push(mq);
    }
    let ports = connect_ports(spec, abi);
    let layer = landlock::Layer {
        read: &spec.read,
        write: &spec.write,
        exec: &spec.exec,
        extra_read: &extra,
        tcp_connect: &ports,
        tcp_bind: &spec.tcp_bind,
    };
    let prepared = landlock::prepare(&layer, abi, spec.landlock)?;

    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| SandboxError::Syscall("become a child subreaper", e.into()))?;
    let broker_pid = spec.broker_pid;
    let creds = creds::drop_privileges(spec.credentials.as_ref(), &|| ns.parent_alive(broker_pid, sock))?;
    let ll = prepared.enforce(spec.landlock)?;
    let allow_tcp = tcp_allowed(spec, abi);
    seccomp::install(allow_tcp)?;

    let mut notes = creds.notes;
    notes.extend(ns.notes);
    notes.extend(ll.notes);

    let effective = EffectiveSandbox {
        uid: creds.uid,
        gid: creds.gid,
        no_new_privs: sys::no_new_privs(),
        non_dumpable: !sys::dumpable(),
        capabilities_cleared: creds.capabilities_cleared,
        landlock_abi: abi,
        landlock: ll.status,
        landlock_fs: ll.fs,
        landlock_tcp: ll.tcp,
        landlock_scopes: ll.scopes,
        seccomp: true,
        network_blocked: !allow_tcp,
        egress,
        namespaces: ns.namespaces,
        noexec: ns.noexec,
        cpu_idle: lowest_priority(spec),
        oom_score_adj: Some(oom),
        notes,
    };
    Ok(Confined { effective, mqueue: ns.mqueue, shm: ns.shm })
}

/// Whether tool calls run at the lowest CPU priority: when no systemd scope
/// (and so no `CPUQuota`) bounds them.
pub fn lowest_priority(spec: &SandboxSpec) -> bool {
    spec.scope.is_none()
}

/// Prepares the per-call Landlock layer, enforced in each tool child by
/// [`spawn::spawn`].
pub fn tool_layer(spec: &SandboxSpec) -> Result<landlock::ChildLayer, SandboxError> {
    let abi = sys::landlock_abi();
    let ports = connect_ports(spec, abi);
    let layer = landlock::Layer {
        read: &spec.read,
        write: &spec.write,
        exec: &spec.exec,
        extra_read: &[],
        tcp_connect: &ports,
        tcp_bind: &spec.tcp_bind,
    };
    let mut prepared = landlock::prepare(&layer, abi, spec.landlock)?;
    if abi < landlock::ABI_SCOPES {
        prepared.guard = Some(seccomp::tool_guard(std::process::id())?);
    }
    prepared.into_child_layer(spec.landlock)
}

/// One promise of a policy and what enforces it on this kernel.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Enforcement {
    pub promise: String,
    pub by: String,
}

/// Interpreters a tool may start under these `exec` rules: each runs any
/// script it is given (from a workspace, stdin or `-c`), which exec rules
/// cannot see. Names, in a stable order, without duplicates.
pub fn interpreters(exec: &[PathBuf]) -> Vec<String> {
    const KNOWN: &[&str] = &[
        "sh", "bash", "dash", "zsh", "ksh", "busybox", "python3", "python", "perl", "ruby", "node", "nodejs", "lua",
        "php", "tclsh", "awk", "gawk", "mawk",
    ];
    let mut found: Vec<String> = Vec::new();
    for name in KNOWN {
        let present = exec.iter().any(|e| {
            if e.is_dir() {
                e.join(name).is_file()
            } else {
                e.file_name().is_some_and(|f| f == *name)
            }
        });
        if present {
            found.push((*name).to_string());
        }
    }
    found
}

/// The promises the worker's namespaces hold, for a
/// broker that is `root` (only root can give them).
pub fn namespace_rows(root: bool) -> Vec<Enforcement> {
    let row = |promise: &str, by: &str| Enforcement { promise: promise.into(), by: by.into() };
    if !root {
        return vec![
            row("sysv-ipc", "SHARED with the host: the broker is not root, so workers get no IPC namespace"),
            row("proc", "SHARED: /proc shows every process of the host (the broker is not root: no PID namespace)"),
            row(
                "exec",
                "Landlock execute rights only: the dynamic loader can still map files from writable paths \
                 (no mount namespace without root); memfd_create refused (seccomp)",
            ),
            row("orphans", "a tool's processes are killed with its call; a killed worker can leave orphans"),
        ];
    }
    vec![
        row(
            "sysv-ipc",
            "a private IPC namespace per worker (SysV shared memory, semaphores, message queues, POSIX queues), \
             kernel.shm_rmid_forced=1, emptied after every call",
        ),
        row("proc", "a PID namespace per worker with its own /proc: a call sees only itself and its worker"),
        row(
            "exec",
            "Landlock execute rights, and every readable or writable path outside the exec rules mounted \
             noexec (no loader, no mmap PROT_EXEC), a private noexec /dev/shm; memfd_create refused (seccomp)",
        ),
        row(
            "orphans",
            "the worker is PID 1 of its calls: when it dies the kernel kills every process of its calls; it \
             dies with its broker (parent-death signal)",
        ),
    ]
}

/// How workers' resources are limited: by cgroups through systemd scopes
/// (with the cgroup version), or by rlimits only.
pub fn resource_rows(cgroups: Option<&str>) -> Vec<Enforcement> {
    let row = |promise: &str, by: &str| Enforcement { promise: promise.into(), by: by.into() };
    match cgroups {
        Some(v) => vec![
            row("memory", &format!("cgroup {v}: MemoryMax (and MemorySwapMax) of the worker's systemd scope, shared memory, memfd and tmpfs pages included; OOM kills named in the reply")),
            row("tasks", &format!("cgroup {v}: TasksMax of the worker's scope")),
            row("cpu", &format!("cgroup {v}: CPUQuota of the worker's scope; the tenant's slice on top")),
            row("time", "the worker's deadline and SIGKILL of the call's process tree; a lost worker's scope is stopped"),
        ],
        None => vec![
            row(
                "memory",
                "RLIMIT_DATA = memory_max of each call (the private writable memory a process commits: heap, \
                 anonymous mappings, thread stacks; address space a runtime only reserves is not counted, so \
                 node, Go and the JVM start), RLIMIT_AS = 8 x memory_max (at least 16G) only as a backstop; no \
                 systemd scope, so the limit is per process, not per call; SysV shared memory held to memory_max \
                 per worker (shmall), the worker's /dev/shm capped at memory_max, memfds refused; shared \
                 anonymous mappings only by the backstop: tools are the OOM killer's first choice \
                 (oom_score_adj 1000) and the broker its last (-900, with CAP_SYS_RESOURCE)",
            ),
            row("tasks", "RLIMIT_NPROC of the worker's user (no systemd scope)"),
            row(
                "cpu",
                "no quota without a systemd scope: tools run SCHED_IDLE (nice 19 where refused, RLIMIT_NICE 0), \
                 so they only get CPU time no one else wants",
            ),
            row("time", "the worker's deadline and SIGKILL of the call's process tree"),
        ],
    }
}

/// Which mechanism holds each promise of a workflow on a kernel offering
/// Landlock ABI `abi`, or why the workflow cannot start there. Mirrors what
/// [`confine_worker`] will do, so `corral policy check` can say it before
/// any worker runs.
pub fn enforcement(requirement: Requirement, tcp_ports: bool, abi: u32) -> Result<Vec<Enforcement>, SandboxError> {
    let row = |promise: &str, by: String| Enforcement { promise: promise.to_string(), by };
    let mut rows = Vec::new();
    if abi == 0 {
        if requirement == Requirement::Required {
            return Err(SandboxError::LandlockUnavailable);
        }
        rows.push(row("files", "unix permissions of the worker's user only (no Landlock on this kernel)".into()));
    } else {
        rows.push(row("files", format!("Landlock ABI {abi}: read/write/exec rules, a second layer per call")));
    }
    let network = match (tcp_ports, abi >= landlock::ABI_TCP) {
        (false, true) => "none: seccomp refuses every non-Unix socket, Landlock denies TCP bind/connect".to_string(),
        (false, false) => "none: seccomp refuses every non-Unix socket".to_string(),
        (true, true) => "listed TCP ports only: Landlock (ports), seccomp (no UDP, raw or other families)".to_string(),
        (true, false) if requirement == Requirement::Required => return Err(SandboxError::TcpNeedsAbi(abi)),
        (true, false) => format!(
            "none (weaker kernel, stricter result): Landlock ABI {abi} cannot restrict ports, so seccomp refuses every non-Unix socket"
        ),
    };
    rows.push(row("network", network));
    rows.push(row(
        "signals",
        if abi >= landlock::ABI_SCOPES {
            "Landlock scope (only processes of the same call), a separate unix user per tenant".into()
        } else {
            "separate unix user per tenant (checked at start) and seccomp: tools cannot signal their worker \
             or every process (Landlock scopes need ABI 6, Linux 6.12)"
                .into()
        },
    ));
    rows.push(row(
        "ipc",
        if abi >= 9 {
            "abstract Unix sockets: Landlock scope; pathname sockets: Landlock rules (ABI 9)".into()
        } else if abi >= landlock::ABI_SCOPES {
            "abstract Unix sockets: Landlock scope; pathname sockets: file permissions, and the broker refuses \
             callers from inside a sandbox (Landlock restricts them from ABI 9, Linux 7.1)"
                .into()
        } else {
            "Unix sockets refused to tools entirely (seccomp): abstract ones cannot be scoped before Landlock \
             ABI 6 (Linux 6.12); socket pairs still work"
                .into()
        },
    ));
    rows.extend(namespace_rows(nix::unistd::Uid::effective().is_root()));
    rows.push(row("ptrace", "seccomp (ptrace, process_vm_*), no_new_privs, non-dumpable, Landlock domain".into()));
    rows.push(row(
        "privileges",
        "all capability sets emptied, no_new_privs, seccomp (mount, unshare, bpf, modules, …)".into(),
    ));
    Ok(rows)
}

/// One workflow's place in the user check: name, the uid its workers run as,
/// and whether its Landlock is required.
pub struct UserUse {
    pub workflow: String,
    pub tenant: String,
    pub uid: u32,
    pub user: String,
    pub required: bool,
}

/// On a kernel whose Landlock cannot scope signals (ABI < 6), any process may
/// signal every other process of its uid. A tenant is one unix user by
/// design (its workflows all name the same `user`), so what must not happen
/// is two *tenants* sharing a uid: their tools could reach each other's
/// processes. A workflow's tools are kept from
/// the rest of the machine only if no other workflow shares its user.
/// Returns, per offending workflow, whether it must be refused (required)
/// and the message.
pub fn shared_user_conflicts(abi: u32, uses: &[UserUse]) -> Vec<(String, bool, String)> {
    if abi >= landlock::ABI_SCOPES {
        return Vec::new();
    }
    let mut out = Vec::new();
    for u in uses {
        // Without any Landlock a required workflow is refused anyway, with
        // the more basic reason; don't bury it under this one.
        if abi == 0 && u.required {
            continue;
        }
        let others: Vec<&str> =
            uses.iter().filter(|o| o.uid == u.uid && o.tenant != u.tenant).map(|o| o.workflow.as_str()).collect();
        if others.is_empty() {
            continue;
        }
        let message = format!(
            "workflow {} (tenant {}) runs as user {} like {} of another tenant; this kernel's Landlock (ABI {abi}) \
             cannot scope signals (needs ABI 6, Linux 6.12), so their tools could signal each other's processes: \
             give each tenant its own workflow.user, or set sandbox.landlock = \"best-effort\" to accept it",
            u.workflow,
            u.tenant,
            u.user,
            others.join(", ")
        );
        out.push((u.workflow.clone(), u.required, message));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_(wf: &str, uid: u32, required: bool) -> UserUse {
        UserUse { workflow: wf.into(), tenant: format!("t-{wf}"), uid, user: format!("u{uid}"), required }
    }

    #[test]
    fn shared_users_matter_only_without_landlock_scopes() {
        let uses = [use_("a", 1000, true), use_("b", 1000, false), use_("c", 1001, true)];
        assert!(shared_user_conflicts(6, &uses).is_empty());
        let found = shared_user_conflicts(2, &uses);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].0.as_str(), found[0].1), ("a", true));
        assert_eq!((found[1].0.as_str(), found[1].1), ("b", false));
        assert!(
            found[0].2.contains("workflow.user") && found[0].2.contains("Linux 6.12") && found[0].2.contains("like b")
        );
        assert!(shared_user_conflicts(2, &[use_("a", 1, true), use_("c", 2, true)]).is_empty());
        // Workflows of one tenant share its user by design: no conflict.
        let same_tenant = [
            UserUse { workflow: "x".into(), tenant: "kid".into(), uid: 7, user: "k".into(), required: true },
            UserUse { workflow: "y".into(), tenant: "kid".into(), uid: 7, user: "k".into(), required: true },
        ];
        assert!(shared_user_conflicts(2, &same_tenant).is_empty());
    }
}
