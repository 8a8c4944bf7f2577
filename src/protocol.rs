//! Messages between the broker and a worker.
//!
//! Every message travels as one frame (see [`crate::frame`]) encoded with
//! `postcard`. The broker speaks first: [`ToWorker::Init`] carries the
//! sandbox the worker must put itself in; the worker answers with
//! [`FromWorker::Ready`] (the sandbox it actually got) or
//! [`FromWorker::Refused`], and only then serves [`ToWorker::Exec`] calls.
//! These types are the worker's only view of a policy: it never reads policy
//! files itself.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Broker → worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Sent once, first. Trusted: it comes from the broker, not from a client.
    Init(Box<SandboxSpec>),
    /// Run one tool call.
    Exec(ExecRequest),
}

/// Worker → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The sandbox is in force; the worker is ready for calls.
    Ready(EffectiveSandbox),
    /// The sandbox could not be established as the policy requires; the
    /// worker exits after sending this.
    Refused(String),
    /// The result of an [`ExecRequest`].
    Done(ExecOutcome),
}

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
    /// `RLIMIT_AS` of a tool (cgroups give the real memory limit when systemd
    /// manages the worker).
    pub address_space_max: Option<u64>,
    /// `RLIMIT_NPROC` of a tool (counted per uid by the kernel).
    pub processes_max: Option<u64>,
}

/// One tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub id: u64,
    pub argv: Vec<String>,
    pub stdin: Vec<u8>,
    pub timeout_ms: u64,
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Termination {
    Exited(i32),
    Signaled(i32),
    /// The command could not be started (not found, not executable, or denied
    /// by the sandbox); the message says which.
    NotStarted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutcome {
    pub id: u64,
    pub termination: Termination,
    /// Set when the command could not be started.
    pub error: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub wall_us: u64,
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub peak_rss_kib: u64,
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
    /// Everything that is weaker than the policy asked for, in words.
    pub notes: Vec<String>,
}
