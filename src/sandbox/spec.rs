//! What a worker is asked to enforce ([`SandboxSpec`]) and what it reports
//! it got ([`EffectiveSandbox`]). The sandbox owns these types; the
//! broker builds a spec from a policy and the wire ([`crate::protocol`])
//! carries both.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether a sandbox layer is mandatory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Requirement {
    Required,
    BestEffort,
}

/// Unix credentials a worker switches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Everything a worker needs to confine itself and its tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub workflow: String,
    /// The broker's PID: the worker dies with it (parent-death signal) and
    /// checks that it is still its parent after arming that signal.
    pub broker_pid: u32,
    /// `None`: keep the broker's credentials (only allowed when the broker
    /// itself is not root).
    pub credentials: Option<Credentials>,
    pub landlock: Requirement,
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
    pub exec: Vec<PathBuf>,
    pub tcp_connect: Vec<u16>,
    pub tcp_bind: Vec<u16>,
    /// `Some(port)`: the worker is in a network namespace of its own whose
    /// only way out is the broker's egress proxy at `127.0.0.1:port`
    /// ([`super::net`]). Tools may open TCP sockets (Landlock, from ABI 4,
    /// lets them connect to that port only); `tcp_connect` is then empty.
    pub egress_proxy: Option<u16>,
    pub workspace: PathBuf,
    /// The systemd scope the broker put the worker in; the worker checks
    /// that it is there before it confines itself.
    pub scope: Option<String>,
    pub tool: ToolLimits,
    /// Environment of every tool call (after clearing the worker's own).
    pub env: Vec<(String, String)>,
}

/// Per-call limits a worker applies to each tool child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolLimits {
    pub output_max: u64,
    pub file_size_max: u64,
    pub open_files_max: u64,
    /// `RLIMIT_DATA` of a tool: the private writable memory it may commit
    /// (heap, anonymous mappings, thread stacks), `memory_max` when no
    /// cgroup limits memory (systemd's scope is the real limit otherwise).
    /// Address space a runtime only reserves (`PROT_NONE`, as V8, Go and the
    /// JVM do) is not counted until it is made writable.
    pub data_max: Option<u64>,
    /// `RLIMIT_AS` of a tool: a generous backstop beside `data_max`
    /// ([`address_space_backstop`]), never the memory limit itself.
    pub address_space_max: Option<u64>,
    /// `RLIMIT_NPROC` of a tool (counted per uid by the kernel).
    pub processes_max: Option<u64>,
}

/// What the kernel actually enforces for a worker, as measured by the worker
/// after it restricted itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EffectiveSandbox {
    pub uid: u32,
    pub gid: u32,
    pub no_new_privs: bool,
    pub non_dumpable: bool,
    /// All five capability sets are empty (checked after the drop).
    pub capabilities_cleared: bool,
    /// The kernel's Landlock ABI (0 = no Landlock).
    pub landlock_abi: u32,
    /// "fully enforced", "partially enforced" or "not enforced".
    pub landlock: String,
    pub landlock_fs: bool,
    /// TCP bind/connect restricted by port (Landlock ABI 4+).
    pub landlock_tcp: bool,
    /// Signals and abstract Unix sockets scoped to the sandbox (ABI 6+).
    pub landlock_scopes: bool,
    pub seccomp: bool,
    /// Inet sockets are refused outright by seccomp.
    pub network_blocked: bool,
    /// With an egress proxy: what confines the worker's network, in words
    /// (its namespace's interfaces as the worker saw them, and whether
    /// Landlock holds the proxy's port).
    #[serde(default)]
    pub egress: Option<String>,
    /// Kernel namespaces of its own the worker and its calls live in
    /// (`pid`, `mount`, `ipc`): empty when the broker is not root.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Paths mounted `noexec` for this worker: everything a tool may read or
    /// write that is not beneath an `exec` rule, and its private `/dev/shm`.
    #[serde(default)]
    pub noexec: Vec<PathBuf>,
    /// Tool calls run at the lowest CPU priority (`SCHED_IDLE`, nice 19),
    /// because no cgroup quota bounds them.
    #[serde(default)]
    pub cpu_idle: bool,
    /// `oom_score_adj` of the worker and its tools (1000: the OOM killer's
    /// first choice).
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    /// Everything that is weaker than the policy asked for, in words.
    pub notes: Vec<String>,
}

/// The `RLIMIT_AS` backstop that goes with a `memory_max` of `memory_max`
/// bytes when no cgroup limits memory: 8 × `memory_max`, at least 16 GiB.
/// Runtimes reserve far more address space than they touch (node about
/// 0.7 GiB for `node -e 1`, a JVM a quarter of the host's RAM plus 1 GiB),
/// so address space is the wrong quantity to limit; the backstop only caps
/// what `RLIMIT_DATA` does not count (shared and read-only mappings).
pub fn address_space_backstop(memory_max: u64) -> u64 {
    memory_max.saturating_mul(8).max(16 << 30)
}
