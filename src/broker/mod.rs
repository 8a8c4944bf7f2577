//! The broker: loads the policies, keeps a pool of sandboxed workers per
//! workflow, and serves the HTTP API on a Unix socket.
//!
//! Parts: [`setup`] turns a policy into a pool configuration, [`pool`] runs
//! the workers ([`launcher`] starts one, [`scope`] puts it in a systemd
//! scope), [`auth`] decides who may call what, [`http`] is the front door
//! (socket, accept loop, per-uid caps, routes), [`ask`] runs prompts,
//! [`llm`] is the gateway to model providers and [`ledger`] its token
//! ledger, [`sessions`] the sessions of every workflow (directories and
//! histories), [`log`] escapes client text for the log, [`notify`] talks to
//! the service manager.
//!
//! # Stopping
//!
//! SIGTERM starts a drain: new requests get 503 `stopping`, calls in flight
//! get `--drain-timeout` to finish, and those still running then get a JSON
//! `stopping` error; only then do the workers stop and the socket close.

mod ask;
mod auth;
pub mod egress;
pub mod http;
mod launcher;
pub mod ledger;
pub mod llm;
mod log;
mod notify;
mod pool;
pub mod quota;
pub mod scope;
mod sessions;
pub(crate) mod setup;
mod workspace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::policy;
use crate::sandbox;

pub use http::BindError;

/// Whether workers go into systemd scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SystemdMode {
    /// Use systemd when it answers on the system bus; otherwise rlimits, and
    /// say so.
    Auto,
    /// Never: rlimits only.
    Off,
    /// Refuse to start without systemd.
    Required,
}

/// How the broker is started (from the command line).
#[derive(Debug)]
pub struct Config {
    pub policies: PathBuf,
    pub socket: PathBuf,
    /// A listening socket handed over by systemd (socket activation).
    pub listener: Option<std::os::unix::net::UnixListener>,
    pub state_dir: PathBuf,
    /// Workers of workflows without `user` run as this user when the broker
    /// is root.
    pub worker_user: String,
    /// The corral binary, re-executed as `corral worker`.
    pub exe: PathBuf,
    /// `RUST_LOG` filter handed to workers.
    pub log_filter: String,
    pub systemd: SystemdMode,
    /// Names this broker's scopes `corral-<instance>-…`, so that several
    /// brokers under one systemd (tests) leave each other's scopes alone.
    pub instance: Option<String>,
    /// How long SIGTERM waits for calls in flight.
    pub drain_timeout: Duration,
    /// Where the LLM gateway finds API keys.
    pub credentials: llm::CredentialStore,
    /// Connection and body caps, timeouts of the front door.
    pub http: http::limits::Limits,
    /// Members of this group may read `GET /metrics` (besides root).
    pub metrics_gid: Option<u32>,
    /// The egress proxy's hosts file, read before the system's resolver.
    pub egress_hosts: Option<PathBuf>,
    /// The members file ([`policy::members`]); reloaded with the policies.
    pub members: PathBuf,
    /// Whether it must exist (named on the command line).
    pub members_required: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("failed to load policies from {dir}:\n{errors}")]
    Policies { dir: PathBuf, errors: policy::PolicyErrors },
    #[error("failed to load the members file {file}:\n{errors}")]
    Members { file: PathBuf, errors: policy::PolicyErrors },
    #[error("failed to create state directory {dir}: {source}")]
    StateDir { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("failed to install signal handler: {0}")]
    Signals(std::io::Error),
    #[error("--systemd=required, but {0}")]
    NoSystemd(Box<scope::ScopeError>),
    #[error("failed to stop the scopes left by an earlier broker: {0}")]
    StaleScopes(Box<scope::ScopeError>),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
}

/// One workflow as the request path needs it.
struct Workflow {
    name: String,
    policy: policy::Workflow,
    clients: auth::Clients,
    pool: Arc<pool::Pool>,
    stdin_max: u64,
    call_timeout: Duration,
}

type Workflows = BTreeMap<String, Arc<Workflow>>;

/// Shared state of a running broker.
pub struct Broker {
    workflows: RwLock<Arc<Workflows>>,
    /// The members file, validated against the workflows.
    members: RwLock<Arc<policy::Members>>,
    config: Config,
    systemd: Option<scope::Systemd>,
    resource_control: String,
    /// Why systemd is not used, when it failed: for root's status only (a
    /// D-Bus error names paths and services of the host).
    resource_control_error: Option<String>,
    started: Instant,
    request_seq: AtomicU64,
    call_seq: AtomicU64,
    in_flight: AtomicUsize,
    gateway: llm::Gateway,
    /// Every exec call, on its way to the ledger.
    exec_log: ledger::ExecLog,
    /// Calls in flight, for `DELETE /v1/calls/{id}`.
    calls: http::calls::InFlightCalls,
    /// Set once SIGTERM starts the drain: new requests are refused.
    draining: AtomicBool,
    /// Sessions of every workflow: directories and histories.
    sessions: sessions::Sessions,
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Broker {
    /// Whether the broker drains after SIGTERM: the front door answers new
    /// requests 503 `stopping`.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain (see [`Broker::draining`]).
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Arc<Workflows> {
        Arc::clone(&self.workflows.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn members(&self) -> Arc<policy::Members> {
        Arc::clone(&self.members.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn workflow(&self, name: &str) -> Option<Arc<Workflow>> {
        self.snapshot().get(name).cloned()
    }

    fn workflow_names(&self) -> Vec<String> {
        self.snapshot().keys().cloned().collect()
    }

    /// The workflows `peer` may use.
    fn workflows_of(&self, peer: &auth::Peer) -> Vec<String> {
        self.snapshot().values().filter(|w| w.clients.allows(peer)).map(|w| w.name.clone()).collect()
    }

    /// The workflows with a model that `peer` may use: its chat models.
    fn chat_workflows_of(&self, peer: &auth::Peer) -> Vec<String> {
        self.snapshot()
            .values()
            .filter(|w| w.policy.llm.is_some() && w.clients.allows(peer))
            .map(|w| w.name.clone())
            .collect()
    }

    /// Every workflow with its pool.
    fn pools(&self) -> Vec<(Arc<Workflow>, Arc<pool::Pool>)> {
        self.snapshot().values().map(|w| (Arc::clone(w), Arc::clone(&w.pool))).collect()
    }

    /// Whether `peer` may read `GET /metrics`: root, the broker's user, and
    /// members of `--metrics-group`.
    fn may_read_metrics(&self, peer: &auth::Peer) -> bool {
        let group = auth::Clients { uids: Vec::new(), gids: self.config.metrics_gid.into_iter().collect() };
        group.allows(peer)
    }

    /// Whether `peer` is a client of any workflow.
    fn may_use_any(&self, peer: &auth::Peer) -> bool {
        self.snapshot().values().any(|w| w.clients.allows(peer))
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
    /// The uid is checked on every request (a reload may make it a
    /// worker's); the ancestry, which walks `/proc`, once per connection
    /// (`below_worker`).
    fn is_sandboxed_peer(&self, peer: &auth::Peer, below_worker: &std::sync::OnceLock<bool>) -> bool {
        let snapshot = self.snapshot();
        let pools = snapshot.values().map(|w| &w.pool);
        if pools.clone().any(|p| p.worker_uid() == Some(peer.uid)) {
            return true;
        }
        let Some(pid) = peer.pid.and_then(|p| u32::try_from(p).ok()) else {
            return true;
        };
        *below_worker.get_or_init(|| {
            // A root broker starts every worker as PID 1 of a PID namespace
            // of its own: a process in the broker's namespace is below none.
            // One readlink, where the walk reads /proc once per ancestor.
            if nix::unistd::Uid::effective().is_root() && auth::shares_pid_namespace(pid) {
                return false;
            }
            let workers: Vec<u32> = pools.flat_map(|p| p.worker_pids()).collect();
            auth::descends_from_any(pid, &workers)
        })
    }

    /// The state of each pool whose workflow `peer` may use (all of them
    /// for root), in the pools' own terms: the front door maps it to JSON.
    fn pool_statuses(&self, peer: &auth::Peer) -> Vec<pool::status::PoolStatus> {
        self.snapshot().values().filter(|w| w.clients.allows(peer)).map(|w| w.pool.status()).collect()
    }

    /// How worker resources are limited; why systemd is not used is for
    /// the operator (`operator`) only.
    fn resource_control(&self, operator: bool) -> String {
        match &self.resource_control_error {
            Some(e) if operator => format!("{} ({e})", self.resource_control),
            _ => self.resource_control.clone(),
        }
    }

    /// Builds the workflows of `loaded`, reusing the running pool of every
    /// workflow whose policy did not change. Returns the new set and the
    /// pools that are no longer used.
    async fn build(&self, loaded: &policy::Policies, old: &Workflows) -> (Workflows, Vec<Arc<pool::Pool>>) {
        if let Some(sd) = &self.systemd {
            let mut tenants: Vec<&policy::TenantName> = loaded.workflows.iter().map(|w| &w.tenant).collect();
            tenants.dedup();
            for t in tenants {
                let limits = setup::slice_limits(&loaded.tenant_limits(t));
                if let Err(e) = sd.ensure_slice(&scope::slice_name(t.as_str()), &limits).await {
                    tracing::error!(tenant = %t, "tenant slice: {e}");
                }
            }
        }
        // First pass: what each workflow would run as.
        enum Slot<'a> {
            Reused(Arc<Workflow>),
            New(&'a policy::Workflow, Box<setup::Prepared>),
        }
        let prefix = scope::scope_prefix(self.config.instance.as_deref());
        let broker_uid = nix::unistd::Uid::effective().as_raw();
        let mut slots = Vec::new();
        let mut uses = Vec::new();
        for wf in &loaded.workflows {
            let required = wf.sandbox.landlock == policy::Requirement::Required;
            if let Some(same) = old.get(wf.name.as_str()).filter(|o| o.policy == *wf) {
                let uid = same.pool.worker_uid().unwrap_or(broker_uid);
                let user = same.policy.user.clone().unwrap_or_else(|| self.config.worker_user.clone());
                let tenant = wf.tenant.to_string();
                uses.push(sandbox::UserUse { workflow: wf.name.to_string(), tenant, uid, user, required });
                // A reload is how an operator says "fixed, try again".
                same.pool.lift_quarantine();
                slots.push(Slot::Reused(Arc::clone(same)));
                continue;
            }
            let systemd = self.systemd.as_ref().map(|sd| (sd, prefix.as_str()));
            // Formatting, growing or filling a disk_max image runs tools.
            let prepared = tokio::task::block_in_place(|| {
                setup::prepare(
                    wf,
                    &self.config.state_dir,
                    &self.config.worker_user,
                    systemd,
                    self.config.egress_hosts.as_deref(),
                )
            });
            let creds = prepared.pool.spec.credentials.as_ref();
            uses.push(sandbox::UserUse {
                workflow: wf.name.to_string(),
                tenant: wf.tenant.to_string(),
                uid: creds.map_or(broker_uid, |c| c.uid),
                user: creds.map_or_else(|| "the broker's own user".to_string(), |c| c.user.clone()),
                required,
            });
            slots.push(Slot::New(wf, Box::new(prepared)));
        }
        // Without Landlock scopes, workflows must not share a unix user.
        let conflicts = sandbox::shared_user_conflicts(sandbox::probe().landlock_abi, &uses);
        let mut fresh = Workflows::new();
        for slot in slots {
            let (wf, mut prepared) = match slot {
                Slot::Reused(w) => {
                    fresh.insert(w.name.clone(), w);
                    continue;
                }
                Slot::New(wf, prepared) => (wf, *prepared),
            };
            for (name, refuse, message) in &conflicts {
                if name.as_str() != wf.name.as_str() {
                    continue;
                }
                if *refuse && prepared.pool.unavailable.is_none() {
                    prepared.pool.unavailable = Some(message.clone());
                } else {
                    tracing::warn!(workflow = %wf.name, "{message}");
                }
            }
            if let Some(why) = &prepared.pool.unavailable {
                tracing::error!(workflow = %wf.name, tenant = %wf.tenant, "workflow unavailable: {why}");
            }
            let pool = pool::Pool::new(prepared.pool, self.config.exe.clone(), self.config.log_filter.clone());
            pool.start();
            fresh.insert(
                wf.name.to_string(),
                Arc::new(Workflow {
                    name: wf.name.to_string(),
                    policy: wf.clone(),
                    clients: prepared.clients,
                    pool,
                    stdin_max: wf.limits.stdin_max.0,
                    call_timeout: wf.limits.call_timeout,
                }),
            );
        }
        let retired = old
            .iter()
            .filter(|(name, w)| fresh.get(*name).is_none_or(|f| !Arc::ptr_eq(f, w)))
            .map(|(_, w)| Arc::clone(&w.pool))
            .collect();
        (fresh, retired)
    }

    /// Reloads the policies and the members file (SIGHUP). On an error in
    /// either, both running sets stay (the members are checked against the
    /// policies).
    async fn reload(&self) -> Result<usize, BrokerError> {
        let loaded = load_policies(&self.config.policies)?;
        let members = load_members(&self.config, &loaded)?;
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(members);
        let old = self.snapshot();
        let (fresh, retired) = self.build(&loaded, &old).await;
        let count = fresh.len();
        *self.workflows.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        for pool in retired {
            pool.shutdown();
        }
        Ok(count)
    }
}

fn load_policies(dir: &std::path::Path) -> Result<policy::Policies, BrokerError> {
    let loaded = policy::load_dir(dir).map_err(|errors| BrokerError::Policies { dir: dir.to_path_buf(), errors })?;
    for w in &loaded.warnings {
        tracing::warn!("policy: {w}");
    }
    Ok(loaded)
}

fn load_members(config: &Config, policies: &policy::Policies) -> Result<policy::Members, BrokerError> {
    let members = policy::load_members(&config.members, config.members_required, policies)
        .map_err(|errors| BrokerError::Members { file: config.members.clone(), errors })?;
    if members.source.is_some() {
        tracing::info!(
            file = %config.members.display(),
            members = members.members.len(),
            delegates = members.delegates.len(),
            "members loaded"
        );
    }
    Ok(members)
}

/// Creates the state directory and fixes its layout (see [`workspace`]).
fn prepare_state_dir(dir: &std::path::Path) -> Result<(), BrokerError> {
    workspace::prepare_state_dir(dir).map_err(|source| BrokerError::StateDir { dir: dir.to_path_buf(), source })
}

const RLIMITS_ONLY: &str = "rlimits only (RLIMIT_DATA = memory_max per process, RLIMIT_AS = 8 x memory_max as a backstop, RLIMIT_NPROC = tasks_max per user, \
    RLIMIT_FSIZE, RLIMIT_NOFILE); cpu_quota, memory_swap_max, io_weight and tenant limits are NOT enforced";

/// systemd when it answers; the resource control text; why systemd is not
/// used (shown to root only).
type Connected = (Option<scope::Systemd>, String, Option<String>);

async fn connect_systemd(mode: SystemdMode) -> Result<Connected, BrokerError> {
    if mode == SystemdMode::Off {
        return Ok((None, format!("{RLIMITS_ONLY} (--systemd=off)"), None));
    }
    match scope::Systemd::connect().await {
        Ok(sd) => {
            let cg = crate::cgroup::version(std::path::Path::new(crate::cgroup::ROOT));
            let text = format!(
                "systemd {}: a transient scope per worker in corral-<tenant>.slice (MemoryMax, MemorySwapMax, \
                 CPUQuota, TasksMax, IOWeight; tenant limits on the slice), cgroup {cg}",
                sd.version
            );
            Ok((Some(sd), text, None))
        }
        Err(e) if mode == SystemdMode::Required => Err(BrokerError::NoSystemd(Box::new(e))),
        Err(e) => Ok((None, format!("{RLIMITS_ONLY}: systemd is not reachable"), Some(e.to_string()))),
    }
}

/// Removes expired sessions: once at start, then every half of the
/// shortest `[sessions].idle` of the workflows (at least every second, at
/// most every minute). One query per workflow when nothing has expired.
async fn sweep_sessions(broker: Arc<Broker>) {
    loop {
        let workflows: Vec<Arc<Workflow>> = broker.snapshot().values().cloned().collect();
        let every = workflows
            .iter()
            .map(|w| w.policy.sessions.idle / 2)
            .min()
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let b = Arc::clone(&broker);
        let removed =
            tokio::task::spawn_blocking(move || b.sessions.sweep(&workflows, crate::utc::now())).await.unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "expired sessions removed");
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs the broker until SIGINT or SIGTERM.
pub async fn run(mut config: Config) -> Result<(), BrokerError> {
    notify::status("starting");
    let (systemd, resource_control, resource_control_error) = connect_systemd(config.systemd).await?;
    let broker_instance = config.instance.clone();
    let loaded = load_policies(&config.policies)?;
    let members = load_members(&config, &loaded)?;
    prepare_state_dir(&config.state_dir)?;
    // Keys and client data live in this process: keep other processes of
    // its user from reading its memory or attaching to it.
    let _ = nix::sys::prctl::set_dumpable(false);
    // Tools are the OOM killer's first choice (1000), the broker its last.
    launcher::lower_own_oom_score();

    let ledger = Arc::new(ledger::Ledger::open(&config.state_dir)?);
    let exec_log = ledger::ExecLog::start(Arc::clone(&ledger));
    let sessions = sessions::Sessions::new(Arc::clone(&ledger))?;
    let gateway = llm::Gateway::new(ledger, std::mem::take(&mut config.credentials), llm::RetryPolicy::default());

    let (listener, bound) = match config.listener.take() {
        Some(l) => (http::listener::from_std(l)?, false),
        None => (http::listener::bind(&config.socket)?, true),
    };
    // Only once the socket is ours: a second broker started by mistake on a
    // live socket must fail at the bind above, not first stop the scopes
    // (and so the workers and calls in flight) of the broker serving it.
    if let Some(sd) = &systemd {
        notify::status("stopping scopes left by an earlier instance");
        let prefix = scope::scope_prefix(broker_instance.as_deref());
        let stopped = sd.stop_stale_scopes(&prefix).await.map_err(|e| BrokerError::StaleScopes(Box::new(e)))?;
        if !stopped.is_empty() {
            tracing::warn!("stopped {} scope(s) left by an earlier broker: {}", stopped.len(), stopped.join(", "));
        }
    } else {
        match &resource_control_error {
            Some(e) => tracing::warn!("resource control: {resource_control} ({e})"),
            None => tracing::warn!("resource control: {resource_control}"),
        }
    }
    // Request bodies are released to the kernel when freed (see
    // sandbox::memory): a burst of large bodies must not stay in RSS.
    crate::sandbox::memory::pin_mmap_threshold(256 << 10);
    let broker = Arc::new(Broker {
        workflows: RwLock::new(Arc::new(Workflows::new())),
        members: RwLock::new(Arc::new(members)),
        config,
        systemd,
        resource_control,
        resource_control_error,
        started: Instant::now(),
        request_seq: AtomicU64::new(1),
        call_seq: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
        gateway,
        exec_log,
        calls: http::calls::InFlightCalls::default(),
        draining: AtomicBool::new(false),
        sessions,
    });
    let (initial, _) = broker.build(&loaded, &Workflows::new()).await;
    let count = initial.len();
    *broker.workflows.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(initial);

    let server = http::Server::start(listener, Arc::clone(&broker), broker.config.http.clone());
    notify::ready(&format!("serving {count} workflows on {}", broker.config.socket.display()));
    tracing::info!(socket = %broker.config.socket.display(), workflows = count, "broker ready");
    let sweeper = tokio::spawn(sweep_sessions(Arc::clone(&broker)));
    let watchdog =
        notify::watchdog_interval().map(|every| tokio::spawn(notify::watchdog(every, broker.config.socket.clone())));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(BrokerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(BrokerError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(BrokerError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                notify::reloading();
                match broker.reload().await {
                    Ok(n) => {
                        tracing::info!(workflows = n, "policies reloaded");
                        notify::ready(&format!("serving {n} workflows (reloaded)"));
                    }
                    Err(e) => {
                        tracing::error!("reload failed, keeping the running policies: {e}");
                        notify::ready(&format!("reload failed, running the previous policies: {e}"));
                    }
                }
            }
        }
    }

    // Drain: new requests are answered 503 `stopping`; calls in flight get
    // drain_timeout to end.
    broker.start_draining();
    sweeper.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let deadline = Instant::now() + broker.config.drain_timeout;
    loop {
        let n = broker.in_flight.load(Ordering::SeqCst);
        if n == 0 {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!("{n} call(s) still running after {:?}; stopping anyway", broker.config.drain_timeout);
            break;
        }
        notify::stopping(&format!("draining {n} call(s)"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Calls the drain cut are answered "stopping", every answer is
    // written, then connections and the socket close.
    server.shutdown().await;
    notify::stopping("stopping workers");
    let pools: Vec<_> = broker.snapshot().values().map(|w| Arc::clone(&w.pool)).collect();
    for p in &pools {
        p.abort();
    }
    // Slots kill their worker and stop its scope on the way out.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pools.iter().any(|p| p.live_slots() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Free the loop devices now rather than when the namespace ends.
    for q in pools.iter().filter_map(|p| p.quota()) {
        q.detach();
    }
    broker.exec_log.close();
    if bound {
        let _ = std::fs::remove_file(&broker.config.socket);
    }
    Ok(())
}
