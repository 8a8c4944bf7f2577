//! The sandbox: everything that confines a worker and its tool calls.
//!
//! A worker calls [`confine_worker`] on itself, single-threaded, before it
//! reads its first request. The steps, in their required order:
//!
//! 1. become a child subreaper (a daemonizing tool still comes back to us);
//! 2. [`creds::drop_privileges`]: bounding and ambient capabilities cleared,
//!    groups, gid and uid switched to the workflow's user, the remaining
//!    capability sets emptied and verified, parent-death signal armed,
//!    `no_new_privs`, non-dumpable, no core files;
//! 3. the worker's Landlock layer (the policy's paths plus read access to
//!    `/proc`, which it needs to find a tool's descendants);
//! 4. the seccomp filter.
//!
//! Each tool call then gets a second, stricter Landlock layer
//! ([`tool_layer`]): the policy's paths only (no `/proc` unless the policy
//! grants it) and a fresh scope, so a tool cannot signal its own worker.
//!
//! All `unsafe` code of corral is in this module ([`sys`] and [`process`]).

pub mod creds;
pub mod landlock;
pub mod process;
pub mod seccomp;
pub mod sys;

use std::path::Path;

use crate::protocol::{EffectiveSandbox, Requirement, SandboxSpec};

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

/// Whether TCP is allowed at all for this spec on a kernel of `abi`.
fn tcp_allowed(spec: &SandboxSpec, abi: u32) -> bool {
    (!spec.tcp_connect.is_empty() || !spec.tcp_bind.is_empty()) && abi >= landlock::ABI_TCP
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Confines the calling (worker) process for good. See the module docs.
pub fn confine_worker(spec: &SandboxSpec) -> Result<EffectiveSandbox, SandboxError> {
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
        if !cgroups.lines().any(|l| l.ends_with(&format!("/{unit}"))) {
            return Err(SandboxError::NotInScope(unit.clone()));
        }
    }
    let abi = sys::landlock_abi();
    // Open the Landlock path descriptors while we may still read everything.
    let proc_dir = [Path::new("/proc")];
    let layer = landlock::Layer {
        read: &spec.read,
        write: &spec.write,
        exec: &spec.exec,
        extra_read: &proc_dir,
        tcp_connect: &spec.tcp_connect,
        tcp_bind: &spec.tcp_bind,
    };
    let prepared = landlock::prepare(&layer, abi, spec.landlock)?;

    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| SandboxError::Syscall("become a child subreaper", e.into()))?;
    let creds = creds::drop_privileges(spec.credentials.as_ref(), spec.broker_pid)?;
    let ll = prepared.enforce(spec.landlock)?;
    let allow_tcp = tcp_allowed(spec, abi);
    seccomp::install(allow_tcp)?;

    let mut notes = creds.notes;
    notes.extend(ll.notes);
    Ok(EffectiveSandbox {
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
        notes,
    })
}

/// Prepares the per-call Landlock layer (to be enforced in the tool child by
/// [`process::install_tool_hook`]).
pub fn tool_layer(spec: &SandboxSpec) -> Result<landlock::Prepared, SandboxError> {
    let abi = sys::landlock_abi();
    let layer = landlock::Layer {
        read: &spec.read,
        write: &spec.write,
        exec: &spec.exec,
        extra_read: &[],
        tcp_connect: &spec.tcp_connect,
        tcp_bind: &spec.tcp_bind,
    };
    landlock::prepare(&layer, abi, spec.landlock)
}

/// One promise of a policy and what enforces it on this kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Enforcement {
    pub promise: &'static str,
    pub by: String,
}

/// Which mechanism holds each promise of a workflow on a kernel offering
/// Landlock ABI `abi`, or why the workflow cannot start there. Mirrors what
/// [`confine_worker`] will do, so `corral policy check` can say it before
/// any worker runs.
pub fn enforcement(requirement: Requirement, tcp_ports: bool, abi: u32) -> Result<Vec<Enforcement>, SandboxError> {
    let row = |promise, by: String| Enforcement { promise, by };
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
            "Landlock scope (only processes of the same sandbox), separate uid".into()
        } else {
            "separate uid only (Landlock scopes need ABI 6)".into()
        },
    ));
    rows.push(row(
        "ipc",
        if abi >= landlock::ABI_SCOPES {
            "abstract Unix sockets: Landlock scope; pathname sockets: file permissions (Landlock ABI 9 needed)".into()
        } else {
            "abstract Unix sockets NOT restricted (needs Landlock ABI 6); pathname sockets: file permissions".into()
        },
    ));
    rows.push(row("ptrace", "seccomp (ptrace, process_vm_*), no_new_privs, non-dumpable, Landlock domain".into()));
    rows.push(row(
        "privileges",
        "all capability sets emptied, no_new_privs, seccomp (mount, unshare, bpf, modules, …)".into(),
    ));
    Ok(rows)
}
