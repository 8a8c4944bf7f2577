//! A workflow's pool: a bounded queue of calls and up to `max_workers`
//! worker slots that take calls from it.
//!
//! A slot owns one worker process at a time. It starts it (inside a fresh
//! systemd scope when systemd manages workers), serves calls, and when the
//! worker is lost starts a new one as [`health`] says: at once when it was
//! killed from outside, after a short backoff when it failed on its own, and
//! not at all while the workflow is quarantined. Slots beyond `min_idle`
//! retire after sitting idle. A workflow whose sandbox the host cannot
//! provide is marked unavailable, and calls to it fail at once with the
//! reason instead of waiting.
//!
//! A queued call waits for a worker at most its own timeout while no worker
//! is up (then it fails, saying why no worker could start), and at most its
//! timeout plus [`QUEUE_WAIT_MAX`] behind busy workers. The pool keeps its
//! own status types ([`status`]); the broker maps them to the API.

mod health;
pub mod metrics;
pub mod status;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch, Notify};

use self::health::{outside_kill, Health, Quarantine, QuarantineKind};
use self::metrics::{limit_kind, Counters, Outcome};
use self::status::{DiskInfo, PoolStatus, QuarantineInfo, WorkerInfo, WorkerState};
use super::launcher::{self, Answer, Call, CallError, Completions, Events, ScopePlan, StartError, Worker};
use super::scope::{scope_name, Systemd, UnitLimits};
use crate::cgroup::{self, LimitCounts, Location};
use crate::protocol::{EffectiveSandbox, SandboxSpec};

/// A worker that lived this long has proven the workflow can run.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// A slot beyond `min_idle` retires after this long without a call.
const IDLE_RETIRE: Duration = Duration::from_secs(60);
/// How far past a call's own timeout the broker waits for the worker.
const BACKSTOP: Duration = Duration::from_secs(5);
/// How long a call may wait behind busy workers, on top of its timeout.
pub const QUEUE_WAIT_MAX: Duration = Duration::from_secs(30);

/// Where a pool's workers go when systemd manages them.
#[derive(Clone)]
pub struct ScopeSetup {
    pub systemd: Systemd,
    /// `corral` or `corral-<instance>`.
    pub prefix: String,
    pub slice: String,
    pub limits: UnitLimits,
}

/// Static description of a pool.
pub struct PoolConfig {
    pub workflow: String,
    pub tenant: String,
    pub user: Option<String>,
    pub workspace: PathBuf,
    pub spec: SandboxSpec,
    pub min_idle: u32,
    pub max_workers: u32,
    pub queue: u32,
    /// Set when the workflow can never start here (e.g. its user is missing).
    pub unavailable: Option<String>,
    pub scope: Option<ScopeSetup>,
    /// `memory_max` and `tasks_max` as the policy wrote them, for messages.
    pub memory_max: String,
    pub tasks_max: u32,
    /// Which mechanism holds each promise, for status.
    pub enforcement: Vec<crate::sandbox::Enforcement>,
    /// The workspace's `disk_max`, when the policy sets one.
    pub quota: Option<Arc<super::quota::Quota>>,
    /// `[network]`: each worker gets a network namespace and an egress
    /// proxy checking these rules.
    pub egress: Option<Arc<super::egress::Egress>>,
}

/// Why a queued call got no answer from a worker.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Call(#[from] CallError),
    /// No worker was up during the whole of the call's own timeout.
    #[error("no worker of {workflow} could start within the call's timeout of {waited:?}: {why}; see `corral status` and the broker's log")]
    NoWorker { workflow: String, waited: Duration, why: String },
    /// Busy workers did not take the call in time.
    #[error("no worker of {workflow} was free within {waited:?}: all {workers} are busy; retry later, or raise pool.max_workers in its policy")]
    QueueTimeout { workflow: String, waited: Duration, workers: u32 },
    /// The workflow was quarantined while the call waited.
    #[error("{0}")]
    Quarantined(String),
    /// A worker refused to start while the call waited.
    #[error("workflow {workflow} cannot run calls: {reason}")]
    Unavailable { workflow: String, reason: String },
}

/// What a worker did with a call.
#[derive(Debug)]
pub struct Served {
    /// The worker's id in its pool.
    pub worker: u64,
    pub answer: Answer,
    /// The limit the kernel enforced during the call, if any.
    pub limit: Option<String>,
    /// With `[network]`: what the call reached and was refused.
    pub egress: Option<super::egress::EgressReceipt>,
}

/// What a caller gets back.
pub type CallResult = Result<Served, Failure>;

struct Job {
    call: Call,
    /// Where an ask's completion requests go.
    completions: Option<Completions>,
    /// Where a streamed call's output and tool events go.
    events: Option<Events>,
    reply: oneshot::Sender<CallResult>,
    queued_at: Instant,
    /// The call's own timeout: how long it waits while no worker is up.
    own_timeout: Duration,
    /// Notified to cancel the call (`DELETE /v1/calls/{id}`); a client
    /// that goes away cancels it too (its reply's receiver is dropped).
    cancel: Option<Arc<Notify>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("workflow {workflow} is busy: all {workers} workers are occupied and its queue of {queue} calls is full; retry later, or raise pool.max_workers / pool.queue in its policy")]
    Busy { workflow: String, workers: u32, queue: u32 },
    #[error("workflow {workflow} cannot run calls: {reason}")]
    Unavailable { workflow: String, reason: String },
    #[error("{message}")]
    Quarantined { message: String },
}

/// A quarantine as shown to callers and in status: the sentence is made
/// once, so every caller and `corral status` read the same words.
struct Shown {
    message: String,
    until: SystemTime,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<u64, WorkerInfo>,
    cgroups: BTreeMap<u64, Location>,
    queue: VecDeque<Job>,
    live_slots: u32,
    idle_slots: u32,
    busy: u32,
    /// Static: the workflow cannot run here, or the pool is shutting down.
    unavailable: Option<String>,
    health: Health,
    shown: Option<Shown>,
    shutting_down: bool,
    counters: Counters,
}

impl State {
    /// Takes the next queued call for a slot, counting the slot busy under
    /// the same lock: a call submitted in between must not count this slot
    /// as still coming for it, or it would wait with no slot growing for it.
    fn take(&mut self) -> Option<Job> {
        let job = self.queue.pop_front()?;
        self.busy += 1;
        Some(job)
    }

    /// Gives back a call taken by a slot whose worker turned out unfit.
    fn give_back(&mut self, job: Job) {
        self.busy -= 1;
        self.queue.push_front(job);
    }

    /// Whether a queued call may have to wait: more are queued than idle
    /// slots will take at once. Only then must the janitor time the queue
    /// (waking it for every call costs a task switch a call).
    fn may_wait(&self) -> bool {
        self.queue.len() > self.idle_slots as usize
    }

    /// Whether the queue needs one more slot: every queued call beyond the
    /// slots that will take one (idle, or starting) gets one, up to `max`.
    fn needs_slot(&self, max: u32) -> bool {
        let coming = self.live_slots.saturating_sub(self.busy);
        self.queue.len() > coming as usize && self.live_slots < max && !self.shutting_down
    }

    /// The quarantine in force now, with its sentence.
    fn quarantine(&mut self) -> Option<(QuarantineKind, &Shown)> {
        let kind = self.health.quarantine(Instant::now()).map(|q| q.kind.clone());
        match kind {
            Some(k) => self.shown.as_ref().map(|s| (k, s)),
            None => {
                self.shown = None;
                None
            }
        }
    }
}

pub struct Pool {
    cfg: PoolConfig,
    exe: PathBuf,
    log_filter: String,
    state: Mutex<State>,
    /// A call was queued, or the pool is stopping.
    work: Notify,
    /// Wakes the janitor: a call was queued or a start failed.
    janitor: Notify,
    /// Wakes every slot pacing a replacement: a call was queued.
    arrived: Notify,
    /// Bumped when a quarantine is lifted.
    lifted: watch::Sender<u64>,
    next_worker: AtomicU64,
    next_scope: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Set by [`Pool::abort`].
    abort: watch::Sender<bool>,
}

/// The signal number in a [`launcher::describe_exit`] text, if a signal
/// ended the process.
fn signal_of(text: &str) -> Option<i32> {
    let rest = text.split("killed by signal ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The state letter of process `pid` (`R`, `S`, `T`, `Z`, …); `None` when
/// it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = crate::broker::auth::proc_stat(pid)?;
    // "PID (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// Whether process `pid` is stopped (SIGSTOP, a tracer): such a worker
/// takes calls and never answers them.
fn is_stopped(pid: u32) -> bool {
    matches!(proc_state(pid), Some('T' | 't'))
}

/// Every process below `root` (its tool calls and theirs), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(entry.path().join("stat")).ok().and_then(|s| {
            s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()))
        });
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Kills the processes below a worker before the worker itself, so no tool
/// outlives it (a worker is their subreaper: orphans stay below it).
fn kill_descendants(worker: u32) {
    for _ in 0..3 {
        let found = descendants(worker);
        if found.is_empty() {
            return;
        }
        for pid in found {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// How often a busy worker is checked for being stopped.
const STOP_CHECK: Duration = Duration::from_millis(250);
const STOPPED_MID_CALL: &str = "the worker was stopped (SIGSTOP or a tracer) during the call";

/// Resolves when process `pid` is seen stopped: a stopped worker would
/// hold its call until the backstop.
async fn stopped(pid: u32) {
    loop {
        tokio::time::sleep(STOP_CHECK).await;
        if is_stopped(pid) {
            return;
        }
    }
}

fn quarantine_message(workflow: &str, q: &Quarantine, until: SystemTime) -> String {
    let secs = until.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let at = crate::utc::format(i64::try_from(secs).unwrap_or(i64::MAX));
    let lift = "or reload the policies (SIGHUP: `systemctl reload corral`) to lift it now";
    match q.kind {
        QuarantineKind::Crashing => format!(
            "workflow {workflow} is quarantined: its workers failed {} times within {}s (last: {}); calls are \
             refused until {at}, when one worker is tried again; fix the cause (see the broker's log), {lift}",
            q.failures,
            health::FAILURE_WINDOW.as_secs(),
            q.reason
        ),
        QuarantineKind::Refused => {
            format!("{}; a worker is tried again at {at}, {lift}", q.reason)
        }
    }
}

impl Pool {
    pub fn new(cfg: PoolConfig, exe: PathBuf, log_filter: String) -> Arc<Pool> {
        let state = State { unavailable: cfg.unavailable.clone(), ..State::default() };
        let pool = Arc::new(Pool {
            cfg,
            exe,
            log_filter,
            state: Mutex::new(state),
            work: Notify::new(),
            janitor: Notify::new(),
            arrived: Notify::new(),
            lifted: watch::channel(0).0,
            next_worker: AtomicU64::new(1),
            next_scope: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            abort: watch::channel(false).0,
        });
        tokio::spawn(Arc::clone(&pool).janitor());
        pool
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked while holding it;
        // the state itself is plain data and stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pre-starts `min_idle` workers.
    pub fn start(self: &Arc<Self>) {
        if self.cfg.unavailable.is_some() {
            return;
        }
        for _ in 0..self.cfg.min_idle {
            self.add_slot();
        }
    }

    fn add_slot(self: &Arc<Self>) {
        self.state().live_slots += 1;
        let pool = Arc::clone(self);
        tokio::spawn(async move { pool.slot().await });
    }

    /// Queues a call. Fails at once when the queue is full, or the workflow
    /// cannot run or is quarantined.
    pub fn submit(
        self: &Arc<Self>,
        call: Call,
        completions: Option<Completions>,
        events: Option<Events>,
        cancel: Option<Arc<Notify>>,
    ) -> Result<oneshot::Receiver<CallResult>, SubmitError> {
        let own_timeout = Duration::from_millis(match &call {
            Call::Exec(r) => r.timeout_ms,
            Call::Ask(r) => r.timeout_ms,
        });
        let workflow = || self.cfg.workflow.clone();
        let grow = {
            let mut s = self.state();
            let refused = if let Some(reason) = s.unavailable.clone() {
                Some(SubmitError::Unavailable { workflow: workflow(), reason })
            } else if let Some((kind, shown)) = s.quarantine() {
                let message = shown.message.clone();
                Some(match kind {
                    QuarantineKind::Crashing => SubmitError::Quarantined { message },
                    QuarantineKind::Refused => SubmitError::Unavailable { workflow: workflow(), reason: message },
                })
            } else if s.queue.len() >= self.cfg.queue.max(1) as usize {
                Some(SubmitError::Busy { workflow: workflow(), workers: self.cfg.max_workers, queue: self.cfg.queue })
            } else {
                None
            };
            if let Some(e) = refused {
                s.counters.call(Outcome::Refused, Duration::ZERO);
                return Err(e);
            }
            let (reply, rx) = oneshot::channel();
            s.queue.push_back(Job { call, completions, events, reply, queued_at: Instant::now(), own_timeout, cancel });
            (s.needs_slot(self.cfg.max_workers), s.may_wait(), rx)
        };
        let (grow, may_wait, rx) = grow;
        self.work.notify_one();
        if may_wait {
            self.janitor.notify_one();
        }
        self.arrived.notify_waiters();
        if grow {
            self.add_slot();
        }
        Ok(rx)
    }

    /// Refuses new calls; idle workers stop at once, busy ones after their
    /// call, and calls already queued are still served.
    pub fn shutdown(&self) {
        {
            let mut s = self.state();
            s.shutting_down = true;
            s.unavailable = Some("the broker is shutting down or reloading this workflow".into());
        }
        self.shutdown.send_replace(true);
        self.work.notify_waiters();
    }

    /// Stops now (the broker's drain time is over): busy workers are killed
    /// with their tool calls, whose callers have been answered `stopping`.
    pub fn abort(&self) {
        self.shutdown();
        self.abort.send_replace(true);
    }

    /// Ends a quarantine at once (a reload): the next start is tried now.
    pub fn lift_quarantine(&self) {
        let lifted = {
            let mut s = self.state();
            s.shown = None;
            s.health.lift()
        };
        if lifted {
            tracing::info!(workflow = %self.cfg.workflow, "quarantine lifted by a reload");
        }
        self.lifted.send_modify(|n| *n += 1);
    }

    /// Live worker slots (0 once a shut-down pool has wound down).
    pub fn live_slots(&self) -> u32 {
        self.state().live_slots
    }

    pub fn status(&self) -> PoolStatus {
        let mut s = self.state();
        let quarantine =
            s.quarantine().map(|(_, shown)| QuarantineInfo { message: shown.message.clone(), until: shown.until });
        let mut workers: Vec<WorkerInfo> = s.workers.values().cloned().collect();
        for w in &mut workers {
            if let Some(loc) = s.cgroups.get(&w.id) {
                w.cgroup = Some(cgroup::stats(loc));
            }
        }
        PoolStatus {
            workflow: self.cfg.workflow.clone(),
            tenant: self.cfg.tenant.clone(),
            user: self.cfg.user.clone(),
            workspace: self.cfg.workspace.display().to_string(),
            unavailable: s.unavailable.clone().or_else(|| quarantine.as_ref().map(|q| q.message.clone())),
            quarantine,
            queue_depth: s.queue.len(),
            queue_capacity: self.cfg.queue.max(1) as usize,
            min_idle: self.cfg.min_idle,
            max_workers: self.cfg.max_workers,
            enforcement: self.cfg.enforcement.clone(),
            workers,
            disk: self.cfg.quota.as_ref().map(|q| {
                let usage = q.usage();
                DiskInfo {
                    disk_max: q.max.to_string(),
                    disk_max_bytes: q.max.0,
                    used_bytes: usage.map(|u| u.used),
                    size_bytes: usage.map(|u| u.size),
                }
            }),
        }
    }

    /// What the pool counted since it started.
    pub fn call_counters(&self) -> Counters {
        self.state().counters.clone()
    }

    /// The workspace's quota, if any.
    pub fn quota(&self) -> Option<&Arc<super::quota::Quota>> {
        self.cfg.quota.as_ref()
    }

    /// PIDs of the live worker processes.
    /// The sandbox the workers of this pool enforce.
    pub fn spec(&self) -> &SandboxSpec {
        &self.cfg.spec
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.state().workers.values().filter_map(|w| w.pid).collect()
    }

    /// The uid the workers run as, when they switch.
    pub fn worker_uid(&self) -> Option<u32> {
        self.cfg.spec.credentials.as_ref().map(|c| c.uid)
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut WorkerInfo)) {
        if let Some(w) = self.state().workers.get_mut(&id) {
            f(w);
        }
    }

    /// Records a failure of the workflow (a start that failed, a crash).
    /// Returns how long to wait before the next start; when it quarantines
    /// the workflow, every queued call fails at once with the reason.
    fn failed(&self, why: &str, kind: QuarantineKind) -> Duration {
        let now = Instant::now();
        let (delay, failed) = {
            let mut s = self.state();
            let was = s.health.current().cloned();
            let delay = s.health.failed(now, why, kind);
            let fresh = s.health.current().filter(|q| was.as_ref() != Some(*q)).cloned();
            let Some(q) = fresh else {
                return delay;
            };
            let until = SystemTime::now() + q.until.duration_since(now);
            let message = quarantine_message(&self.cfg.workflow, &q, until);
            tracing::error!(workflow = %self.cfg.workflow, "{message}");
            s.shown = Some(Shown { message: message.clone(), until });
            let jobs: Vec<Job> = s.queue.drain(..).collect();
            for j in &jobs {
                s.counters.call(Outcome::Refused, j.queued_at.elapsed());
            }
            (delay, jobs.into_iter().map(|j| (j, q.kind.clone(), message.clone())).collect::<Vec<_>>())
        };
        for (job, kind, message) in failed {
            let f = match kind {
                QuarantineKind::Crashing => Failure::Quarantined(message),
                QuarantineKind::Refused => {
                    Failure::Unavailable { workflow: self.cfg.workflow.clone(), reason: message }
                }
            };
            let _ = job.reply.send(Err(f));
        }
        delay
    }

    /// Fails the queued calls that waited too long: their own timeout with
    /// no worker up, or that plus [`QUEUE_WAIT_MAX`] behind busy workers.
    /// Returns when to look again.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut out = Vec::new();
        {
            let mut s = self.state();
            let serving = s.idle_slots + s.busy > 0;
            let why = s.health.last_failure.clone().unwrap_or_else(|| "its workers are still starting".into());
            let queue = std::mem::take(&mut s.queue);
            for job in queue {
                let own = job.queued_at + job.own_timeout;
                let hard = own + QUEUE_WAIT_MAX;
                if now >= hard {
                    s.counters.call(Outcome::QueueTimeout, now.duration_since(job.queued_at));
                    let f = Failure::QueueTimeout {
                        workflow: self.cfg.workflow.clone(),
                        waited: now.duration_since(job.queued_at),
                        workers: self.cfg.max_workers,
                    };
                    out.push((job, f));
                } else if now >= own && !serving {
                    s.counters.call(Outcome::QueueTimeout, now.duration_since(job.queued_at));
                    let f = Failure::NoWorker {
                        workflow: self.cfg.workflow.clone(),
                        waited: job.own_timeout,
                        why: why.clone(),
                    };
                    out.push((job, f));
                } else {
                    let at = if now < own { own } else { hard };
                    next = Some(next.map_or(at, |n| n.min(at)));
                    s.queue.push_back(job);
                }
            }
        }
        for (job, f) in out {
            tracing::warn!(workflow = %self.cfg.workflow, "queued call failed: {f}");
            let _ = job.reply.send(Err(f));
        }
        next
    }

    /// Keeps the queue honest: wakes at the next deadline of a queued call.
    async fn janitor(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            let next = self.expire(Instant::now());
            let wait = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = wait => {}
                () = self.janitor.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn systemd_run_line(&self, unit: &str, setup: &ScopeSetup) -> String {
        format!(
            "systemd-run --scope --unit={unit} --slice={} {} -- COMMAND",
            setup.slice,
            setup.limits.systemd_run_options().join(" ")
        )
    }

    async fn launch(&self, id: u64) -> (Result<Worker, StartError>, Option<String>) {
        let Some(setup) = &self.cfg.scope else {
            return (
                launcher::start(&self.exe, &self.cfg.spec, &self.log_filter, None, self.cfg.egress.as_ref()).await,
                None,
            );
        };
        let unit = scope_name(&setup.prefix, &self.cfg.workflow, self.next_scope.fetch_add(1, Ordering::Relaxed));
        let line = self.systemd_run_line(&unit, setup);
        self.update(id, |w| {
            w.scope = Some(unit.clone());
            w.systemd_run = Some(line);
        });
        let plan = ScopePlan {
            systemd: &setup.systemd,
            unit: unit.clone(),
            slice: &setup.slice,
            limits: &setup.limits,
            description: format!("corral worker {id} of {} (tenant {})", self.cfg.workflow, self.cfg.tenant),
        };
        (
            launcher::start(&self.exe, &self.cfg.spec, &self.log_filter, Some(plan), self.cfg.egress.as_ref()).await,
            Some(unit),
        )
    }

    /// How long the quarantine in force has left, if one is.
    fn quarantine_left(&self) -> Option<Duration> {
        let now = Instant::now();
        self.state().health.quarantine(now).map(|q| q.until.saturating_duration_since(now))
    }

    /// Waits `delay`, or less when the pool shuts down or a quarantine is
    /// lifted.
    async fn pause(&self, delay: Duration, lifted: &mut watch::Receiver<u64>) {
        if delay.is_zero() {
            return;
        }
        let mut stop = self.shutdown.subscribe();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {}
            _ = lifted.changed() => {}
        }
    }

    /// Waits `delay` before replacing a worker killed from outside, but not
    /// while a call waits for it: the pace only keeps a kill loop on idle
    /// workers from making the broker spin.
    async fn pace(&self, delay: Duration) {
        if delay.is_zero() {
            return;
        }
        let arrived = self.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if !self.state().queue.is_empty() {
            return;
        }
        let mut stop = self.shutdown.subscribe();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = arrived => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// One slot: start a worker, serve, restart as [`health`] says; until
    /// retired or shut down.
    async fn slot(self: Arc<Self>) {
        let id = self.next_worker.fetch_add(1, Ordering::Relaxed);
        self.state().workers.insert(id, WorkerInfo::new(id));
        let wf = self.cfg.workflow.clone();
        loop {
            // Subscribe before looking, so a lift in between is not missed.
            let mut lifted = self.lifted.subscribe();
            if self.state().shutting_down {
                break;
            }
            if let Some(left) = self.quarantine_left() {
                self.update(id, |w| {
                    w.state = WorkerState::Quarantined;
                    w.pid = None;
                });
                self.pause(left, &mut lifted).await;
                continue;
            }
            self.update(id, |w| {
                w.state = WorkerState::Starting;
                w.pid = None;
            });
            let started = Instant::now();
            let (launched, unit) = self.launch(id).await;
            let mut delay = Duration::ZERO;
            let mut paced = false;
            let mut end = None;
            match launched {
                Ok(worker) => {
                    tracing::info!(workflow = %wf, worker = id, pid = worker.pid, scope = ?unit, "worker ready");
                    let effective: EffectiveSandbox = worker.effective.clone();
                    for note in &effective.notes {
                        tracing::warn!(workflow = %wf, worker = id, "sandbox weaker than asked: {note}");
                    }
                    if unit.is_some() {
                        if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/cgroup", worker.pid)) {
                            self.state().cgroups.insert(id, cgroup::locate(std::path::Path::new(cgroup::ROOT), &text));
                        }
                    }
                    let start_ms = started.elapsed().as_secs_f64() * 1000.0;
                    self.update(id, |w| {
                        w.pid = Some(worker.pid);
                        w.sandbox = Some(effective);
                        w.start_ms = Some(start_ms);
                    });
                    end = Some(self.serve(id, worker).await);
                }
                Err(StartError::Refused(reason)) => {
                    tracing::error!(workflow = %wf, "worker refused to start: {reason}");
                    self.update(id, |w| w.last_exit = Some(format!("refused: {reason}")));
                    delay = self.failed(&reason, QuarantineKind::Refused);
                }
                Err(e) => {
                    tracing::error!(workflow = %wf, worker = id, "worker failed to start: {e}");
                    let why = format!("a worker failed to start: {e}");
                    self.update(id, |w| w.last_exit = Some(e.to_string()));
                    delay = self.failed(&why, QuarantineKind::Crashing);
                }
            }
            // A dead worker's scope may still hold orphaned tools: stop it.
            if let (Some(unit), Some(setup)) = (&unit, &self.cfg.scope) {
                if let Err(e) = setup.systemd.stop(unit).await {
                    tracing::debug!(workflow = %wf, "stopping {unit}: {e}");
                }
            }
            self.state().cgroups.remove(&id);
            match end {
                Some(SlotEnd::Retired | SlotEnd::Shutdown) => break,
                Some(SlotEnd::Lost { why, outside }) => {
                    self.update(id, |w| w.last_exit = Some(why.clone()));
                    if started.elapsed() >= HEALTHY_AFTER {
                        self.state().health.proven();
                    }
                    delay = if outside {
                        tracing::warn!(workflow = %wf, worker = id, "worker lost: {why}; replacing it");
                        paced = true;
                        self.state().health.killed(Instant::now())
                    } else {
                        tracing::warn!(workflow = %wf, worker = id, "worker crashed: {why}; restarting");
                        self.failed(&format!("a worker crashed: {why}"), QuarantineKind::Crashing)
                    };
                }
                None => {}
            }
            // Calls waiting for this slot may now be out of time.
            self.janitor.notify_one();
            let state = if self.quarantine_left().is_some() { WorkerState::Quarantined } else { WorkerState::Backoff };
            self.update(id, |w| {
                w.state = state;
                w.pid = None;
                w.restarts += 1;
            });
            self.state().counters.restarts += 1;
            if paced {
                self.pace(delay).await;
            } else {
                self.pause(delay, &mut lifted).await;
            }
        }
        let mut s = self.state();
        s.workers.remove(&id);
        s.live_slots -= 1;
    }

    /// Waits for the next call; `None` when the pool is shutting down and
    /// nothing is queued, or (for slots above `min_idle`) after an idle spell.
    async fn next_job(&self) -> Result<Option<Job>, ()> {
        let may_retire = self.state().live_slots > self.cfg.min_idle;
        let retire = tokio::time::sleep(IDLE_RETIRE);
        tokio::pin!(retire);
        loop {
            let notified = self.work.notified();
            tokio::pin!(notified);
            // Register first, then look: a call queued in between still
            // wakes this slot.
            notified.as_mut().enable();
            if *self.abort.borrow() {
                return Ok(None);
            }
            {
                let mut s = self.state();
                if let Some(job) = s.take() {
                    return Ok(Some(job));
                }
                if s.shutting_down {
                    return Ok(None);
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = &mut retire, if may_retire => return Err(()),
            }
        }
    }

    /// The limit the kernel enforced between two readings of the counters.
    /// Reads the counters of the worker's scope and of its tenant slice.
    fn counters(loc: &Option<Location>) -> Option<(LimitCounts, LimitCounts)> {
        let loc = loc.as_ref()?;
        Some((cgroup::limit_counts(loc), cgroup::limit_counts(&loc.parent())))
    }

    /// The limit the kernel enforced between two readings: the workflow's
    /// own (scope) first, then the tenant's (slice).
    fn limit_hit(
        &self,
        before: &Option<(LimitCounts, LimitCounts)>,
        after: &Option<(LimitCounts, LimitCounts)>,
        timed_out: bool,
    ) -> Option<String> {
        let ((b, bs), (a, as_)) = (before.as_ref()?, after.as_ref()?);
        let grew = |x: Option<u64>, y: Option<u64>| y.unwrap_or(0).saturating_sub(x.unwrap_or(0));
        let oom = grew(b.oom_kills, a.oom_kills);
        if oom > 0 {
            return Some(format!(
                "memory_max {} reached: the kernel's OOM killer ended {oom} process(es) of the call",
                self.cfg.memory_max
            ));
        }
        let refused = grew(b.tasks_refused, a.tasks_refused);
        if refused > 0 {
            return Some(format!("tasks_max {} reached: {refused} fork(s) refused", self.cfg.tasks_max));
        }
        // cgroup v2 may hold a group at memory.max, reclaiming, rather than
        // OOM-kill it at once: a call that ran out of time pinned there was
        // stopped by its memory limit as much as by its clock.
        if timed_out && grew(b.memory_max_hits, a.memory_max_hits) > 0 {
            return Some(format!(
                "memory_max {} reached: the call was held at its memory limit until its time ran out",
                self.cfg.memory_max
            ));
        }
        let slice = self.cfg.scope.as_ref().map_or("the tenant's slice", |s| s.slice.as_str());
        let oom = grew(bs.oom_kills, as_.oom_kills);
        if oom > 0 {
            return Some(format!(
                "the tenant's memory_max ([tenant] of {}) reached in {slice}: the kernel's OOM killer ended {oom} process(es)",
                self.cfg.tenant
            ));
        }
        let refused = grew(bs.tasks_refused, as_.tasks_refused);
        if refused > 0 {
            return Some(format!("the tenant's tasks_max reached in {slice}: {refused} fork(s) refused"));
        }
        None
    }

    async fn serve(&self, id: u64, mut worker: Worker) -> SlotEnd {
        loop {
            self.update(id, |w| w.state = WorkerState::Idle);
            self.state().idle_slots += 1;
            // An idle worker that dies (OOM, kill) is replaced now, not
            // discovered by the next call.
            let job = tokio::select! {
                job = self.next_job() => job,
                how = worker.exited() => {
                    self.state().idle_slots -= 1;
                    self.janitor.notify_one();
                    let outside = outside_kill(signal_of(&how));
                    return SlotEnd::Lost { why: format!("idle worker {how}"), outside };
                }
            };
            self.state().idle_slots -= 1;
            let job = match job {
                Ok(Some(job)) => job,
                Ok(None) => {
                    self.janitor.notify_one();
                    worker.kill().await;
                    return SlotEnd::Shutdown;
                }
                Err(()) => {
                    // A call may have come as it retired: the janitor times it.
                    self.janitor.notify_one();
                    tracing::info!(workflow = %self.cfg.workflow, worker = id, "idle worker retired");
                    worker.kill().await;
                    return SlotEnd::Retired;
                }
            };
            // A worker that died or was stopped while idle, and whose end
            // was not seen yet, must not get the call: it goes back to the
            // head of the queue, for the replacement.
            // One read of /proc/PID/stat answers both questions.
            let state = proc_state(worker.pid);
            let unfit = if matches!(state, Some('T' | 't')) {
                Some("idle worker was stopped (SIGSTOP or a tracer); killed it".to_string())
            } else if matches!(state, None | Some('Z' | 'X')) {
                // Dead: a zombie not yet reaped, or gone.
                Some(format!("idle worker {}", worker.exited().await))
            } else {
                None
            };
            if let Some(why) = unfit {
                self.state().give_back(job);
                self.work.notify_one();
                worker.kill().await;
                let outside = why.contains("stopped") || outside_kill(signal_of(&why));
                return SlotEnd::Lost { why, outside };
            }
            self.update(id, |w| w.state = WorkerState::Busy);
            let loc = self.state().cgroups.get(&id).cloned();
            let before = Self::counters(&loc);
            let peak = loc.as_ref().and_then(cgroup::PeakWatch::start);
            let pid = worker.pid;
            let mut abort = self.abort.subscribe();
            let Job { call, completions, events, mut reply, queued_at, cancel, .. } = job;
            let cancelled = async {
                let asked = async {
                    match &cancel {
                        Some(n) => n.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = reply.closed() => {}
                    () = asked => {}
                }
            };
            worker.begin_egress();
            let mut result = tokio::select! {
                r = worker.call(call, BACKSTOP, completions.as_ref(), events.as_ref(), cancelled) => r,
                () = stopped(pid) => {
                    kill_descendants(pid);
                    worker.kill().await;
                    Err(CallError::Died(format!("{STOPPED_MID_CALL}; it was killed")))
                }
                () = async { let _ = abort.wait_for(|a| *a).await; } => {
                    kill_descendants(pid);
                    worker.kill().await;
                    {
                        let mut s = self.state();
                        s.busy -= 1;
                        s.counters.call(Outcome::Stopped, queued_at.elapsed());
                    }
                    let _ = reply.send(Err(CallError::Died("the broker is stopping".into()).into()));
                    return SlotEnd::Shutdown;
                }
            };
            let egress = worker.end_egress();
            if let Ok(Answer::Done(o)) = &mut result {
                // The broker's reading, whatever the worker sent.
                o.cgroup_peak = peak
                    .as_ref()
                    .and_then(cgroup::PeakWatch::read)
                    .map(|(bytes, file)| crate::protocol::CgroupPeak { bytes, file: file.to_string() });
            }
            let timed_out = matches!(&result, Ok(Answer::Done(o)) if o.timed_out);
            let mut limit = self.limit_hit(&before, &Self::counters(&loc), timed_out);
            let killed = result.as_ref().is_ok_and(|a| match a {
                Answer::Done(o) => {
                    o.termination == crate::protocol::Termination::Signaled(9) && !o.timed_out && !o.cancelled
                }
                Answer::Answered(_) => false,
            });
            if limit.is_none() && (killed || result.is_err()) && loc.is_some() {
                // A SIGKILL nobody in corral sent: give the kernel's counters
                // a moment before concluding it was not a limit.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                limit = self.limit_hit(&before, &Self::counters(&loc), timed_out);
            }
            if limit.is_none() {
                limit = self.cfg.quota.as_ref().and_then(|q| q.limit_hit());
            }
            if let Some(l) = &limit {
                tracing::warn!(workflow = %self.cfg.workflow, worker = id, "{l}");
            }
            let cpu_us = match &result {
                Ok(Answer::Done(o)) => o.cpu_user_us + o.cpu_system_us,
                _ => 0,
            };
            self.update(id, |w| w.calls_cpu_ms += cpu_us as f64 / 1000.0);
            // How a lost worker counts: a limit or an outside kill is not
            // the workflow's fault; its own crash or hang is.
            let lost = match &result {
                Ok(_) => None,
                Err(e @ CallError::Died(why)) => Some((
                    e.to_string(),
                    limit.is_some() || outside_kill(signal_of(why)) || why.starts_with(STOPPED_MID_CALL),
                )),
                Err(e @ CallError::Stuck(_)) => Some((e.to_string(), false)),
            };
            let outcome = match &result {
                _ if limit.is_some() => Outcome::Limit,
                Ok(Answer::Done(o)) if o.cancelled => Outcome::Cancelled,
                Ok(Answer::Answered(a)) if a.stop == crate::protocol::AskStop::Cancelled => Outcome::Cancelled,
                Ok(_) if timed_out => Outcome::Timeout,
                Ok(Answer::Done(o)) if o.termination == crate::protocol::Termination::Exited(0) => Outcome::Ok,
                Ok(Answer::Done(_)) => Outcome::Failed,
                Ok(Answer::Answered(_)) => Outcome::Ok,
                Err(_) => Outcome::WorkerLost,
            };
            let limit_text = limit.clone();
            let answer = match result {
                Ok(answer) => Ok(Served { worker: id, answer, limit: limit.clone(), egress }),
                Err(CallError::Died(why)) => Err(Failure::Call(CallError::Died(match &limit {
                    Some(l) => format!("{why}; {l}"),
                    None => why,
                }))),
                Err(e) => Err(Failure::Call(e)),
            };
            self.update(id, |w| {
                w.served += 1;
                if limit.is_some() {
                    w.last_kill = limit;
                }
            });
            {
                let mut s = self.state();
                s.busy -= 1;
                if lost.is_none() {
                    s.health.proven();
                }
                s.counters.call(outcome, queued_at.elapsed());
                if let Some(l) = &limit_text {
                    s.counters.kill(limit_kind(l));
                }
                if timed_out {
                    s.counters.kill("call_timeout");
                }
            }
            let _ = reply.send(answer);
            if let Some((why, outside)) = lost {
                return SlotEnd::Lost { why, outside };
            }
        }
    }
}

enum SlotEnd {
    Retired,
    Shutdown,
    /// The worker is gone; `outside`: killed from outside (or by a limit),
    /// not the workflow's own failure.
    Lost {
        why: String,
        outside: bool,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn the_signal_is_read_back_from_the_exit_text() {
        let text = |raw| launcher::describe_exit(std::process::ExitStatus::from_raw(raw));
        assert_eq!(signal_of(&text(9)), Some(9));
        assert_eq!(signal_of(&format!("idle worker {}", text(11))), Some(11));
        assert_eq!(signal_of(&text(3 << 8)), None);
    }

    fn job() -> Job {
        let call = Call::Exec(crate::protocol::ExecRequest {
            id: 0,
            request_id: String::new(),
            argv: vec!["true".into()],
            stdin: Vec::new(),
            timeout_ms: 1000,
            stream: false,
            receipt: false,
            session_dir: None,
        });
        let (reply, _) = oneshot::channel();
        Job {
            call,
            completions: None,
            events: None,
            reply,
            queued_at: Instant::now(),
            own_timeout: Duration::from_secs(1),
            cancel: None,
        }
    }

    #[test]
    fn a_call_taken_by_a_slot_makes_the_next_one_grow_the_pool() {
        // One slot, idle; a first call arrives: that slot will take it.
        let mut s = State { live_slots: 1, ..State::default() };
        s.queue.push_back(job());
        assert!(!s.needs_slot(10));
        // The slot takes it and, before it reaches its worker, a second
        // call arrives: nothing else will take that one, so it grows.
        assert!(s.take().is_some());
        s.queue.push_back(job());
        assert!(s.needs_slot(10));
        assert!(!s.needs_slot(1), "never beyond max_workers");
        // An unfit worker gives its call back: its slot restarts for it.
        s.live_slots = 2;
        let taken = s.take().unwrap();
        s.give_back(taken);
        assert_eq!((s.busy, s.queue.len()), (1, 1));
        assert!(!s.needs_slot(10));
    }

    #[test]
    fn a_stopped_process_is_seen_as_stopped() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(!is_stopped(pid));
        let p = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_stopped(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_stopped(pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
