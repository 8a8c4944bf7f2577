//! Workflow policies: one TOML file per workflow, validated once at load,
//! before anything spawns.
//!
//! # Schema
//!
//! ```toml
//! [workflow]                      # required
//! name = "homework"               # required; [a-z0-9][a-z0-9-]{0,39}, unique per directory
//! tenant = "kid"                  # required; same charset; a tenant is one unix user
//! user = "corral-kid"             # optional; default: the broker's --worker-user (corral-worker) when root
//!                                 # All workflows of a tenant must name the same user.
//! clients = { users = ["kid"], groups = [] }   # who may call it; both default []
//!
//! [sandbox]                       # optional, every key has a default
//! landlock = "required"           # or "best-effort"; default "required"
//! read  = ["/usr", "/etc/ssl"]    # read files, list dirs; default []
//! write = ["{workspace}"]         # read+write+create+remove; default ["{workspace}"]
//! exec  = ["/usr/bin"]            # default: /usr/bin /bin /usr/sbin /sbin /usr/lib /lib
//!                                 #          /lib64 /usr/lib64 /usr/libexec
//! tcp_connect = []                # ports, 1-65535; [] = no network (default)
//! tcp_bind = []                   # ports; default []
//! seccomp = "default"             # the only profile
//!
//! [limits]                        # optional, every key has a default
//! memory_max = "256M"             # default 256M, at least 1M
//! memory_swap_max = "0"           # default: unset
//! cpu_quota = "50%"               # default: unset; > 0%, may exceed 100%
//! tasks_max = 64                  # default 64, 2..=4194304
//! io_weight = 100                 # default: unset; 1..=10000
//! call_timeout = "30s"            # default 30s, 10ms..=24h
//! output_max = "1M"               # per stream; default 1M, at most 4M
//! stdin_max = "1M"                # default 1M, at most 4M
//! file_size_max = "64M"           # RLIMIT_FSIZE; default 64M
//! open_files_max = 256            # RLIMIT_NOFILE; default 256, 16..=65536
//! disk_max = "512M"               # default: unset; at least 8M. The workspace becomes an ext4
//!                                 # image of this size; required whenever set
//! receipts = true                # default true: exec replies list the workspace's changes
//!
//! [tenant]                        # optional; the whole tenant: its slice corral-<tenant>.slice
//! memory_max = "1G"               # default: unset; at least 1M
//! cpu_quota = "100%"              # default: unset; > 0%, may exceed 100%
//! tasks_max = 256                 # default: unset; 2..=4194304
//!                                 # Files of a tenant that have [tenant] must agree on it
//!                                 # exactly; the others inherit it.
//!
//! [pool]                          # optional
//! min_idle = 1                    # default 1, 0..=64, <= max_workers
//! max_workers = 2                 # default 2, 1..=64
//! queue = 32                      # default 32, 1..=10000
//!
//! [env]                           # optional; extra variables for tool calls
//! LANG = "C.UTF-8"                # values may contain {workspace}
//!
//! [llm]                           # optional; base_url and model required
//! base_url = "http://127.0.0.1:11434/v1"
//! model = "qwen2.5:3b"
//! credential = "ollama"           # file under $CREDENTIALS_DIRECTORY, or env var
//! endpoint_user = "ollama"        # who must own the listener of a loopback port >= 1024
//! endpoint_socket = "/run/x.sock" # optional: plain http over this Unix socket instead
//!                                 # Plain http only to loopback; see [`endpoint`].
//! max_steps = 8                   # default 8, 1..=64
//! daily_tokens = 200000           # optional, per workflow
//! tenant_daily_tokens = 500000    # optional, per tenant
//!
//! [network]                       # optional; tools reach these through the broker's proxy only
//! allow = ["pypi.org", "*.pythonhosted.org", "api.github.com:443"]   # host[:port]; default ports 80, 443
//! private = false                 # default false: names resolving to loopback, private,
//!                                 # link-local or metadata addresses are refused
//! connections_max = 256           # per call; default 256, 1..=100000
//! bytes_max = "1G"                # per call, both ways; default 1G, at least 1K
//!                                 # Not with [sandbox].tcp_connect. Needs a root broker.
//! ```
//!
//! Paths are absolute or start with `{workspace}`
//! (`state_dir/workspaces/<tenant>/<workflow>`, see [`Workflow::workspace`]).
//! Sizes, durations and percentages follow the grammar in [`units`].
//!
//! # Errors
//!
//! Unknown keys are rejected in every table. Every error names the file, the
//! line and the key and says what would be valid:
//!
//! ```text
//! policies/homework.toml:14: limits.memory_max: invalid size "256Q": expected a number with an optional K, M, G or T suffix, e.g. "256M"
//! ```
//!
//! A file is checked in stages (TOML syntax, unknown keys, types, values); each
//! stage reports everything it finds. [`load_dir`] reports the errors of all
//! files plus the checks across files, and collects non-fatal findings about
//! this host in [`Policies::warnings`].
//!
//! # Layout
//!
//! - `schema`: the validated types handed to the rest of corral.
//! - `units`, `names`, `path`: value grammars (sizes, names, path templates).
//! - `raw`: the file as serde reads it; `document`: spans, lines, unknown keys.
//! - `validate`: raw to validated; `load`: files and directories; `host`:
//!   warnings about this host; `error`: [`PolicyError`]; [`endpoint`]: which
//!   model endpoints the broker trusts; [`members`]: the members file.

mod document;
pub mod endpoint;
mod error;
mod host;
mod load;
pub mod members;
mod names;
pub mod network;
mod path;
mod raw;
mod schema;
pub mod units;
mod validate;

#[cfg(test)]
mod tests;

pub use endpoint::Endpoint;
pub use error::{FirstUser, Place, PolicyError, PolicyErrors};
pub use load::{load_dir, parse_workflow, Policies};
pub use members::{load_members, Chat, Member, Members, RateLimits};
pub use names::{InvalidName, TenantName, WorkflowName};
pub use network::{AllowRule, HostPattern, Network};
pub use path::{InvalidPath, PathTemplate, WORKSPACE};
pub use schema::{
    Clients, Limits, Llm, PoolConfig, Requirement, Sandbox, SeccompProfile, TenantLimits, Workflow, DEFAULT_EXEC,
    DEFAULT_WRITE, MIN_DISK_MAX,
};
pub use units::{format_duration, parse_duration, ByteSize, Percent, UnitError};
