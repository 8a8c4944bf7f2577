//! The validated policy of one workflow. Values here have passed every check
//! in `validate`; nothing downstream needs to re-check them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::names::{TenantName, WorkflowName};
use super::path::PathTemplate;
use super::units::{serialize_duration, ByteSize, Percent};

/// One workflow: one policy file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workflow {
    /// `[workflow].name`, unique across the policy directory.
    pub name: WorkflowName,
    /// `[workflow].tenant`; a tenant is one unix user.
    pub tenant: TenantName,
    /// `[workflow].user`: the unix user the workers run as; `None` means the
    /// broker's own user.
    pub user: Option<String>,
    /// `[workflow].clients`: who may call this workflow.
    pub clients: Clients,
    /// `[sandbox]`.
    pub sandbox: Sandbox,
    /// `[limits]`.
    pub limits: Limits,
    /// `[tenant]`: limits of the tenant's slice `corral-<tenant>.slice`,
    /// shared by all its workflows. From [`parse_workflow`](super::parse_workflow),
    /// this file's table (all `None` without one); from
    /// [`load_dir`](super::load_dir), the tenant's table, whichever of its
    /// files defines it (see [`Policies::tenant_limits`](super::Policies::tenant_limits)).
    pub tenant_limits: TenantLimits,
    /// `[pool]`.
    pub pool: PoolConfig,
    /// `[env]`: extra environment variables for tool calls; values may
    /// contain `{workspace}`.
    pub env: BTreeMap<String, String>,
    /// `[llm]`, if present.
    pub llm: Option<Llm>,
    /// `[network]`, if present: tools reach these destinations through the
    /// broker's proxy, and nothing else. `None`: `[sandbox].tcp_connect`
    /// alone decides (no network by default).
    pub network: Option<super::network::Network>,
    /// `[sessions]`: how long an idle session lives, how many an owner
    /// may keep.
    pub sessions: Sessions,
    /// The file this workflow came from.
    pub source: PathBuf,
}

/// `[sessions]` of a workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sessions {
    /// A session unused this long expires: its history and directory are
    /// removed (default 24 hours).
    #[serde(serialize_with = "serialize_duration")]
    pub idle: Duration,
    /// Sessions one owner may keep in this workflow (default 32).
    pub max: u32,
}

/// How long an idle session lives by default.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(24 * 3600);
/// Sessions per owner and workflow by default.
pub const DEFAULT_SESSIONS_MAX: u32 = 32;

impl Default for Sessions {
    fn default() -> Self {
        Sessions { idle: DEFAULT_SESSION_IDLE, max: DEFAULT_SESSIONS_MAX }
    }
}

impl Workflow {
    /// The workspace directory: `state_dir/workspaces/<tenant>/<workflow>`.
    pub fn workspace(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("workspaces").join(self.tenant.as_str()).join(self.name.as_str())
    }
}

/// `[workflow].clients`: unix users and groups allowed to call the workflow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Clients {
    /// User names.
    pub users: Vec<String>,
    /// Group names.
    pub groups: Vec<String>,
}

/// `[sandbox]`: what a tool call may touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sandbox {
    /// Whether the worker must refuse to run without full Landlock support.
    pub landlock: Requirement,
    /// Read-only access: read files and list directories.
    pub read: Vec<PathTemplate>,
    /// Read, write, create and remove.
    pub write: Vec<PathTemplate>,
    /// May execute.
    pub exec: Vec<PathTemplate>,
    /// TCP ports a tool may connect to; empty means no network at all.
    pub tcp_connect: Vec<u16>,
    /// TCP ports a tool may bind.
    pub tcp_bind: Vec<u16>,
    /// The seccomp filter.
    pub seccomp: SeccompProfile,
}

/// Default `[sandbox].exec`.
pub const DEFAULT_EXEC: [&str; 9] =
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/libexec"];

/// Default `[sandbox].write`.
pub const DEFAULT_WRITE: [&str; 1] = ["{workspace}"];

/// `[sandbox].landlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Requirement {
    /// `"required"`: no worker starts unless Landlock is fully enforced.
    #[serde(rename = "required")]
    Required,
    /// `"best-effort"`: run with what the kernel supports and say so.
    #[serde(rename = "best-effort")]
    BestEffort,
}

/// `[sandbox].seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SeccompProfile {
    /// `"default"`: the built-in deny list.
    #[serde(rename = "default")]
    Default,
}

/// `[limits]`: resources of one worker and its tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// cgroup `MemoryMax`; at least 1M.
    pub memory_max: ByteSize,
    /// cgroup `MemorySwapMax`.
    pub memory_swap_max: Option<ByteSize>,
    /// cgroup `CPUQuota`; above 100% is more than one CPU; never 0.
    pub cpu_quota: Option<Percent>,
    /// cgroup `TasksMax`; at least 2.
    pub tasks_max: u32,
    /// cgroup `IOWeight`, 1..=10000.
    pub io_weight: Option<u16>,
    /// Wall-clock limit of one tool call, 10ms..=24h.
    #[serde(serialize_with = "serialize_duration")]
    pub call_timeout: Duration,
    /// Cap on each of stdout and stderr of a call, 1..=4M.
    pub output_max: ByteSize,
    /// Cap on the stdin of a call, 0..=4M.
    pub stdin_max: ByteSize,
    /// `RLIMIT_FSIZE` for tools; at least 1.
    pub file_size_max: ByteSize,
    /// `RLIMIT_NOFILE` for tools, 16..=65536.
    pub open_files_max: u32,
    /// Size of the workspace: a loop-mounted ext4 image of this size, at
    /// least [`MIN_DISK_MAX`]. Required whenever set: a workflow whose
    /// quota this host cannot enforce does not start.
    pub disk_max: Option<ByteSize>,
    /// Whether every exec reply carries the workspace part of its receipt:
    /// the worker walks the workspace before and after each call (see the
    /// README's "Receipts" for its cost). Default true.
    pub receipts: bool,
}

/// Smallest `[limits].disk_max`: an ext4 file system with its journal
/// needs a few MiB of its own.
pub const MIN_DISK_MAX: ByteSize = ByteSize::mib(8);

/// `[tenant]`: limits of the whole tenant, applied by systemd to its slice
/// `corral-<tenant>.slice`; `None` means no limit beyond the host's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TenantLimits {
    /// Slice `MemoryMax`; at least 1M.
    pub memory_max: Option<ByteSize>,
    /// Slice `CPUQuota`; above 100% is more than one CPU; never 0.
    pub cpu_quota: Option<Percent>,
    /// Slice `TasksMax`, 2..=4194304.
    pub tasks_max: Option<u32>,
}

/// `[pool]`: how many workers to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolConfig {
    /// Idle workers kept ready, at most `max_workers`.
    pub min_idle: u32,
    /// Workers at most, 1..=64.
    pub max_workers: u32,
    /// Calls waiting for a worker at most, 1..=10000.
    pub queue: u32,
}

/// `[llm]`: the OpenAI-compatible endpoint the broker calls for this
/// workflow's asks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Llm {
    /// `http://` or `https://` URL of the API root, e.g. `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    /// Why the broker may trust that endpoint, from `base_url`,
    /// `endpoint_user` and `endpoint_socket` (see [`super::endpoint`]).
    pub endpoint: super::Endpoint,
    /// Model name as the endpoint knows it.
    pub model: String,
    /// Name of a file under `$CREDENTIALS_DIRECTORY`, or of an environment
    /// variable, holding the API key.
    pub credential: Option<String>,
    /// Tool-use steps per request, 1..=64.
    pub max_steps: u32,
    /// Tokens per day for this workflow.
    pub daily_tokens: Option<u64>,
    /// Tokens per day for the whole tenant.
    pub tenant_daily_tokens: Option<u64>,
    /// Limit of one HTTP attempt at the provider, 100ms..=10min.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// A warning is logged when the workflow's tokens in the current hour
    /// exceed this many times its trailing 24-hour hourly average; > 1.
    pub spike_factor: f64,
}

/// Default `[llm].timeout`.
pub const DEFAULT_LLM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[llm].spike_factor`.
pub const DEFAULT_SPIKE_FACTOR: f64 = 5.0;
