//! The `corral` command: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

const DEFAULT_SOCKET: &str = "/run/corral/corral.sock";

#[derive(Parser)]
#[command(name = "corral", version, about = "A containerless sandboxed worker pool for AI assistants")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker in the foreground.
    Broker {
        /// Directory of workflow policies (one TOML file each).
        #[arg(long, default_value = "/etc/corral/policies")]
        policies: PathBuf,
        /// Unix socket to serve the API on.
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Where workspaces live.
        #[arg(long, default_value = "/var/lib/corral")]
        state_dir: PathBuf,
        /// User for workers of workflows that name none (when root).
        #[arg(long, default_value = "corral-worker")]
        worker_user: String,
        /// Put workers in systemd scopes: auto (when systemd answers), off
        /// (rlimits only), required (refuse to start without systemd).
        #[arg(long, value_enum, default_value = "auto")]
        systemd: corral::broker::SystemdMode,
        /// How long SIGTERM waits for calls in flight, e.g. "10s"; calls still
        /// running then get a "stopping" error.
        #[arg(long, env = "CORRAL_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
        drain_timeout: std::time::Duration,
        /// Name this broker's scopes corral-INSTANCE-… (several brokers under
        /// one systemd, e.g. tests).
        #[arg(long)]
        instance: Option<String>,
        /// Members of this group may read GET /metrics (root always may).
        #[arg(long, env = "CORRAL_METRICS_GROUP")]
        metrics_group: Option<String>,
        /// Egress proxy: look names up in this file (/etc/hosts syntax, read
        /// at every lookup) before the system's resolver; for tests and
        /// hosts whose DNS the broker should not use.
        #[arg(long, env = "CORRAL_EGRESS_HOSTS")]
        egress_hosts: Option<PathBuf>,
        /// The members file: people, delegates, rights and limits (default
        /// /etc/corral/members.toml, none when it does not exist; a file
        /// named here must exist).
        #[arg(long, env = "CORRAL_MEMBERS")]
        members: Option<PathBuf>,
    },
    /// Run one command in a workflow's sandbox: `corral exec WORKFLOW -- CMD ARGS…`.
    Exec {
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the whole result as JSON.
        #[arg(long)]
        json: bool,
        /// Send this process's standard input to the command.
        #[arg(short = 'i', long = "stdin")]
        stdin: bool,
        /// Time limit in milliseconds (at most the workflow's call_timeout).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Run in this session's own directory (created on first use).
        #[arg(long)]
        session: Option<String>,
        workflow: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Ask a workflow's agent: `corral ask WORKFLOW "prompt"` prints the answer.
    Ask {
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the whole reply (answer, tool transcript, usage) as JSON.
        #[arg(long)]
        json: bool,
        /// Ask within this session: its history comes first, its directory
        /// is the tools' workspace.
        #[arg(long)]
        session: Option<String>,
        workflow: String,
        prompt: String,
    },
    /// Your sessions (root: everyone's); `corral sessions rm --workflow W ID`
    /// removes one (its history and directory).
    Sessions {
        #[command(subcommand)]
        rm: Option<SessionsCommand>,
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
        socket: PathBuf,
        #[arg(long, global = true)]
        workflow: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Tokens used, from the broker: your own calls (root: everyone's).
    Usage {
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Ignored: usage comes from the broker on --socket (kept so that
        /// older scripts still run).
        #[arg(long, hide = true)]
        state_dir: Option<PathBuf>,
        /// Only calls from this UTC date on, YYYY-MM-DD.
        #[arg(long)]
        since: Option<String>,
        /// Group by workflow, tenant or model.
        #[arg(long, value_enum, default_value = "workflow")]
        by: corral::api::GroupBy,
        #[arg(long)]
        json: bool,
    },
    /// Recent exec and ask calls from the broker's audit trail (your own;
    /// root: everyone's, or --uid's); `corral audit verify` (root) checks
    /// the trail's hash chain.
    Audit {
        #[command(subcommand)]
        verify: Option<AuditCommand>,
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
        socket: PathBuf,
        /// Only this client's calls (root).
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        workflow: Option<String>,
        /// Only calls made for this member (the members file).
        #[arg(long)]
        member: Option<String>,
        /// Only calls from this UTC date on, YYYY-MM-DD.
        #[arg(long)]
        since: Option<String>,
        /// At most this many rows, newest first (default 100).
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Probe a workflow end to end; exit 1 with a one-line reason when the
    /// answer does not match or comes late.
    Canary {
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        workflow: String,
        /// The prompt to send.
        #[arg(long)]
        prompt: String,
        /// A regular expression the answer must match.
        #[arg(long)]
        expect: String,
        /// Longest acceptable time for the whole ask, e.g. "5s".
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        max_latency: std::time::Duration,
    },
    /// Show workflows, workers and their effective sandboxes.
    Status {
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Check this host: kernel sandboxing, cgroups, systemd, users.
    Doctor {
        /// Also check the users the policies in this directory need.
        #[arg(long, default_value = "/etc/corral/policies")]
        policies: PathBuf,
        #[arg(long, default_value = "corral-worker")]
        worker_user: String,
        /// The broker to check, through its API.
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// root only: whether this user (name or uid) can reach the socket
        /// and which workflows they may call, instead of the host checks.
        #[arg(long = "as", value_name = "USER")]
        as_user: Option<String>,
    },
    /// Chat bridges: carry a chat's messages to the broker as asks of its
    /// members, and the answers back.
    Bridge {
        #[command(subcommand)]
        command: BridgeCommand,
    },
    /// Internal: a sandboxed worker, started by the broker.
    #[command(hide = true)]
    Worker,
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// Remove a session: its history and directory.
    Rm {
        /// root only: the owner (uid-N or member-NAME) whose session to remove.
        #[arg(long)]
        owner: Option<String>,
        id: String,
    },
}

#[derive(Subcommand)]
enum BridgeCommand {
    /// A Telegram bot: long-polls the Bot API and asks the broker, as a
    /// delegate, for the member linked to each sender's Telegram id. The
    /// token comes from the systemd credential `telegram-token`
    /// ($CREDENTIALS_DIRECTORY) or --token-file, never argv or environment.
    Telegram {
        #[arg(long, env = "CORRAL_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The Bot API (a local stand-in for tests).
        #[arg(long, default_value = "https://api.telegram.org")]
        api_base: String,
        /// A file holding the bot token (instead of the systemd credential).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Ask this workflow instead of each member's first.
        #[arg(long)]
        workflow: Option<String>,
        /// How long one getUpdates waits for a message, e.g. "30s".
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        poll_timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain: exit 1 and name the first broken row when a
    /// row was edited or deleted (root).
    Verify,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a directory of policies and show what this kernel enforces;
    /// validate the members file against them too.
    Check {
        dir: PathBuf,
        /// The members file (default /etc/corral/members.toml, skipped when
        /// it does not exist; a file named here must exist).
        #[arg(long)]
        members: Option<PathBuf>,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    corral::policy::parse_duration(s).map_err(|e| e.to_string())
}

/// Whether stderr is connected to the journal (systemd sets JOURNAL_STREAM
/// to the device and inode of that stream).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(expected) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    expected == format!("{}:{}", meta.dev(), meta.ino())
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // RUST_LOG as `LEVEL` or `TARGET=LEVEL,…` (tracing-subscriber's
    // `Targets`; span and field filters are not supported).
    let filter = match std::env::var("RUST_LOG") {
        Err(_) => tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
        Ok(text) => text.parse::<tracing_subscriber::filter::Targets>().unwrap_or_else(|e| {
            eprintln!(
                "corral: RUST_LOG={text:?} is not a filter ({e}); logging at info. Write it as LEVEL or TARGET=LEVEL,…"
            );
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        }),
    };
    // Under journald: native entries with fields (CORRAL_WORKFLOW, …) and
    // priorities mapped from the level; elsewhere readable lines on stderr.
    if stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer.with_field_prefix(Some("CORRAL".into()));
            tracing_subscriber::registry().with(filter).with(layer).init();
            return;
        }
    }
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    tracing_subscriber::registry().with(filter).with(fmt).init();
}

fn main() -> ExitCode {
    // The broker starts every worker as exactly `corral worker`. That path
    // skips the CLI parser: a worker maps only the pages it runs, and an
    // idle one's share of the binary (its PSS) stays small.
    if is_worker_invocation(std::env::args_os()) {
        return run_worker();
    }
    let cli = Cli::parse();
    if let Command::Worker = cli.command {
        return run_worker();
    }
    if let Command::Policy { command: PolicyCommand::Check { dir, members } } = &cli.command {
        return ExitCode::from(corral::cli::check::run(dir, members.as_deref()));
    }
    match run_async(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("corral: {e:#}");
            ExitCode::from(corral::cli::EXIT_CORRAL)
        }
    }
}

fn is_worker_invocation(mut args: impl ExactSizeIterator<Item = std::ffi::OsString>) -> bool {
    args.len() == 2 && args.nth(1).is_some_and(|a| a == "worker")
}

fn run_worker() -> ExitCode {
    // INVARIANT: the worker runs before any runtime or thread exists.
    init_logging();
    match corral::worker::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("worker: {}", corral::error_chain(&e));
            ExitCode::from(3)
        }
    }
}

fn run_async(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Broker {
            policies,
            socket,
            state_dir,
            worker_user,
            systemd,
            drain_timeout,
            instance,
            metrics_group,
            egress_hosts,
            members,
        } => {
            init_logging();
            let metrics_gid = match &metrics_group {
                None => None,
                Some(name) => Some(
                    nix::unistd::Group::from_name(name)
                        .with_context(|| format!("failed to look up --metrics-group {name}"))?
                        .with_context(|| {
                            format!(
                                "--metrics-group {name}: no such group; create it (groupadd {name}) or drop the option"
                            )
                        })?
                        .gid
                        .as_raw(),
                ),
            };
            // Before the mount namespace below: from inside it, the path of
            // a binary on another mount than / no longer reads whole.
            let exe = std::env::current_exe().context("failed to find the corral binary to start workers")?;
            // INVARIANT: before the runtime starts a thread: unshare()
            // moves only the calling thread into the new mount namespace.
            if let Err(e) = corral::broker::quota::own_mount_namespace() {
                tracing::warn!("{e}; workflows with disk_max will not start");
            }
            let log_filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
            let listener = match sd_notify::listen_fds() {
                Ok(mut fds) => match fds.next() {
                    Some(fd) => Some(corral::sandbox::sys::listener_from_fd(fd).context("socket activation")?),
                    None => None,
                },
                Err(_) => None,
            };
            // Keys: systemd's LoadCredential= directory, else the environment.
            let credentials = corral::broker::llm::CredentialStore {
                dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
                env: std::env::vars().collect(),
            };
            let config = corral::broker::Config {
                policies,
                socket,
                listener,
                state_dir,
                worker_user,
                exe,
                log_filter,
                systemd,
                drain_timeout,
                credentials,
                instance,
                http: corral::broker::http::limits::Limits::default(),
                metrics_gid,
                egress_hosts,
                members_required: members.is_some(),
                members: members.unwrap_or_else(|| PathBuf::from(corral::policy::members::DEFAULT_MEMBERS)),
            };
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(corral::broker::run(config)).map_err(|e| anyhow::anyhow!(corral::error_chain(&e)))?;
            Ok(0)
        }
        Command::Exec { socket, json, stdin, timeout_ms, session, workflow, argv } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(corral::cli::exec::run(corral::cli::exec::Args {
                socket: &socket,
                workflow,
                argv,
                json,
                send_stdin: stdin,
                timeout_ms,
                session,
            }))
        }
        Command::Ask { socket, json, session, workflow, prompt } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(corral::cli::ask::run(&socket, &workflow, &prompt, session.as_deref(), json))
        }
        Command::Sessions { rm, socket, workflow, json } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match rm {
                Some(SessionsCommand::Rm { owner, id }) => {
                    let Some(workflow) = workflow else {
                        anyhow::bail!("corral sessions rm needs --workflow W: the workflow the session belongs to");
                    };
                    rt.block_on(corral::cli::sessions::remove(&socket, &workflow, &id, owner.as_deref(), json))
                }
                None => rt.block_on(corral::cli::sessions::list(&socket, workflow.as_deref(), json)),
            }
        }
        Command::Usage { socket, state_dir, since, by, json } => {
            if state_dir.is_some() {
                eprintln!("corral: --state-dir is ignored: usage comes from the broker on --socket");
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(corral::cli::usage::run(&socket, since.as_deref(), by, json))
        }
        Command::Audit { verify, socket, uid, workflow, member, since, limit, json } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match verify {
                Some(AuditCommand::Verify) => rt.block_on(corral::cli::audit::verify(&socket, json)),
                None => {
                    let f = corral::cli::audit::Filter {
                        uid,
                        workflow: workflow.as_deref(),
                        member: member.as_deref(),
                        since: since.as_deref(),
                        limit,
                    };
                    rt.block_on(corral::cli::audit::list(&socket, &f, json))
                }
            }
        }
        Command::Canary { socket, workflow, prompt, expect, max_latency } => {
            let expect = match regex_lite::Regex::new(&expect) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!(
                        "canary {workflow}: FAIL: invalid --expect: {e} (the syntax of the regex-lite crate: \
                         no Unicode classes such as \\p{{L}}; (?i) matches ASCII case only)"
                    );
                    return Ok(corral::cli::canary::EXIT_FAILED);
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(rt.block_on(corral::cli::canary::run(&socket, &workflow, &prompt, &expect, max_latency)))
        }
        Command::Status { socket, json } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(corral::cli::status::run(&socket, json))
        }
        Command::Doctor { policies, worker_user, socket, as_user } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(rt.block_on(corral::cli::doctor::run_for(&policies, &worker_user, &socket, as_user.as_deref())))
        }
        Command::Bridge {
            command: BridgeCommand::Telegram { socket, api_base, token_file, workflow, poll_timeout },
        } => {
            init_logging();
            let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            let token = corral::bridge::read_token(token_file.as_deref(), credentials.as_deref())?;
            let opts = corral::bridge::telegram::Options { api_base, socket, token, workflow, poll_timeout };
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(corral::bridge::telegram::run(opts))?;
            Ok(0)
        }
        Command::Policy { .. } | Command::Worker => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::is_worker_invocation;
    use std::ffi::OsString;

    fn args(list: &[&str]) -> std::vec::IntoIter<OsString> {
        list.iter().map(OsString::from).collect::<Vec<_>>().into_iter()
    }

    /// Only the broker's exact `corral worker` skips the CLI parser; any
    /// other shape (help, an extra word) is parsed, and so answered, as usual.
    #[test]
    fn only_the_exact_worker_command_skips_the_parser() {
        assert!(is_worker_invocation(args(&["/usr/local/bin/corral", "worker"])));
        assert!(!is_worker_invocation(args(&["corral", "worker", "--help"])));
        assert!(!is_worker_invocation(args(&["corral", "workers"])));
        assert!(!is_worker_invocation(args(&["corral", "status"])));
        assert!(!is_worker_invocation(args(&["corral"])));
    }
}
