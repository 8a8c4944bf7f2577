//! The `corral` command: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

const DEFAULT_SOCKET: &str = "/run/corral/corral.sock";

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "A containerless sandboxed worker pool for AI assistants"
)]
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
        workflow: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
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
    /// Internal: a sandboxed worker, started by the broker.
    #[command(hide = true)]
    Worker,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a directory of policies and show what this kernel enforces.
    Check { dir: PathBuf },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // INVARIANT: the worker runs before any runtime or thread exists.
    if let Command::Worker = cli.command {
        init_logging();
        return match corral::worker::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("worker: {}", error_chain(&e));
                ExitCode::from(3)
            }
        };
    }
    if let Command::Policy {
        command: PolicyCommand::Check { dir },
    } = &cli.command
    {
        return ExitCode::from(corral::cli::check::run(dir));
    }
    match run_async(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("corral: {e:#}");
            ExitCode::from(corral::cli::EXIT_CORRAL)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn run_async(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Broker {
            policies,
            socket,
            state_dir,
            worker_user,
        } => {
            init_logging();
            let exe = std::env::current_exe()
                .context("failed to find the corral binary to start workers")?;
            let log_filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
            let config = corral::broker::Config {
                policies,
                socket,
                state_dir,
                worker_user,
                exe,
                log_filter,
            };
            let rt = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            rt.block_on(corral::broker::run(config))
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            Ok(0)
        }
        Command::Exec {
            socket,
            json,
            stdin,
            timeout_ms,
            workflow,
            argv,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(corral::cli::exec::run(corral::cli::exec::Args {
                socket: &socket,
                workflow,
                argv,
                json,
                send_stdin: stdin,
                timeout_ms,
            }))
        }
        Command::Status { socket, json } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(corral::cli::status::run(&socket, json))
        }
        Command::Policy { .. } | Command::Worker => Ok(0),
    }
}
