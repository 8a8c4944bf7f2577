//! The broker: loads the policies, keeps a pool of sandboxed workers per
//! workflow, and serves the HTTP API on a Unix socket.
//!
//! Parts: [`setup`] turns a policy into a pool configuration, [`pool`] runs
//! the workers ([`launcher`] starts one), [`auth`] decides who may call what,
//! [`api`] serves the routes, [`listener`] accepts connections.

mod api;
mod auth;
mod launcher;
mod listener;
mod pool;
mod setup;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{BrokerInfo, Status};
use crate::policy;
use crate::sandbox;

pub use listener::BindError;

/// How the broker is started (from the command line).
#[derive(Debug, Clone)]
pub struct Config {
    pub policies: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Workers of workflows without `user` run as this user when the broker
    /// is root.
    pub worker_user: String,
    /// The corral binary, re-executed as `corral worker`.
    pub exe: PathBuf,
    /// `RUST_LOG` filter handed to workers.
    pub log_filter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("failed to load policies from {dir}:\n{errors}")]
    Policies {
        dir: PathBuf,
        errors: policy::PolicyErrors,
    },
    #[error("failed to create state directory {dir}: {source}")]
    StateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("failed to install signal handler: {0}")]
    Signals(std::io::Error),
}

/// One workflow as the request path needs it.
struct Workflow {
    name: String,
    source: String,
    clients: auth::Clients,
    pool: Arc<pool::Pool>,
    stdin_max: u64,
    call_timeout: Duration,
}

/// Shared state of a running broker.
pub struct Broker {
    workflows: BTreeMap<String, Workflow>,
    started: Instant,
    request_seq: AtomicU64,
    call_seq: AtomicU64,
}

impl Broker {
    fn workflow(&self, name: &str) -> Option<&Workflow> {
        self.workflows.get(name)
    }

    fn workflow_names(&self) -> Vec<&str> {
        self.workflows.keys().map(String::as_str).collect()
    }

    fn next_request_id(&self) -> String {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", std::process::id())
    }

    fn next_call_id(&self) -> u64 {
        self.call_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a connection comes from inside a sandbox: a process running
    /// as a worker user, or below a worker. Before Landlock ABI 9 a tool can
    /// connect to any pathname socket its uid may write — this one included —
    /// so the broker itself must turn it away.
    fn is_sandboxed_peer(&self, peer: &auth::Peer) -> bool {
        let pools = self.workflows.values().map(|w| &w.pool);
        if pools.clone().any(|p| p.worker_uid() == Some(peer.uid)) {
            return true;
        }
        let Some(pid) = peer.pid.and_then(|p| u32::try_from(p).ok()) else {
            return true;
        };
        let workers: Vec<u32> = pools.flat_map(|p| p.worker_pids()).collect();
        auth::descends_from_any(pid, &workers)
    }

    /// Status of the workflows `peer` may use (all of them for root).
    fn status(&self, peer: &auth::Peer) -> Status {
        let kernel = sandbox::probe();
        Status {
            broker: BrokerInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_s: self.started.elapsed().as_secs(),
                landlock_abi: kernel.landlock_abi,
                seccomp: kernel.seccomp,
                resource_control: RESOURCE_CONTROL.to_string(),
            },
            workflows: self
                .workflows
                .values()
                .filter(|w| w.clients.allows(peer))
                .map(|w| w.pool.status())
                .collect(),
        }
    }
}

/// What limits worker resources in this build.
const RESOURCE_CONTROL: &str = "rlimits only (RLIMIT_AS = memory_max, RLIMIT_NPROC = tasks_max per user, \
    RLIMIT_FSIZE, RLIMIT_NOFILE); cpu_quota and memory_swap_max are not enforced without systemd scopes";

/// Runs the broker until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), BrokerError> {
    let loaded = policy::load_dir(&config.policies).map_err(|errors| BrokerError::Policies {
        dir: config.policies.clone(),
        errors,
    })?;
    for w in &loaded.warnings {
        tracing::warn!("policy: {w}");
    }
    std::fs::create_dir_all(config.state_dir.join("workspaces")).map_err(|source| {
        BrokerError::StateDir {
            dir: config.state_dir.clone(),
            source,
        }
    })?;
    // Keys and client data live in this process: keep other processes of
    // its user from reading its memory or attaching to it.
    let _ = nix::sys::prctl::set_dumpable(false);

    let mut workflows = BTreeMap::new();
    for wf in &loaded.workflows {
        let prepared = setup::prepare(wf, &config.state_dir, &config.worker_user);
        if let Some(why) = &prepared.pool.unavailable {
            tracing::error!(workflow = %wf.name, "workflow unavailable: {why}");
        }
        let pool = pool::Pool::new(prepared.pool, config.exe.clone(), config.log_filter.clone());
        workflows.insert(
            wf.name.to_string(),
            Workflow {
                name: wf.name.to_string(),
                source: wf.source.display().to_string(),
                clients: prepared.clients,
                pool,
                stdin_max: wf.limits.stdin_max.0,
                call_timeout: wf.limits.call_timeout,
            },
        );
    }
    tracing::warn!("resource control: {RESOURCE_CONTROL}");
    let broker = Arc::new(Broker {
        workflows,
        started: Instant::now(),
        request_seq: AtomicU64::new(1),
        call_seq: AtomicU64::new(1),
    });
    let listener = listener::bind(&config.socket)?;
    for wf in broker.workflows.values() {
        wf.pool.start();
    }
    tracing::info!(socket = %config.socket.display(), workflows = broker.workflows.len(), "broker ready");

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(BrokerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(BrokerError::Signals)?;
    tokio::select! {
        _ = listener::serve(listener, Arc::clone(&broker)) => {}
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    for wf in broker.workflows.values() {
        wf.pool.shutdown();
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}
