//! A workflow's pool: a bounded queue of calls and up to `max_workers`
//! worker slots that take calls from it.
//!
//! A slot owns one worker process at a time. It starts it (inside a fresh
//! systemd scope when systemd manages workers), serves calls, and when the
//! worker dies starts a new one after an exponential backoff. Slots beyond
//! `min_idle` retire after sitting idle. A workflow whose sandbox the host
//! cannot provide is marked unavailable, and calls to it fail at once with
//! the reason instead of waiting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Mutex as AsyncMutex};

use super::launcher::{self, Answer, Call, CallError, Completions, ScopePlan, StartError, Worker};
use super::scope::{scope_name, Systemd, UnitLimits};
use crate::api::{WorkerStatus, WorkflowStatus};
use crate::cgroup::{self, Location, Stats};
use crate::protocol::{EffectiveSandbox, SandboxSpec};

/// First restart delay; doubles per consecutive failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// A slot beyond `min_idle` retires after this long without a call.
const IDLE_RETIRE: Duration = Duration::from_secs(60);
/// How far past a call's own timeout the broker waits for the worker.
const BACKSTOP: Duration = Duration::from_secs(5);

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
}

/// What a caller gets back: the worker id, the answer, and the limit the
/// kernel enforced during the call, if any.
pub type CallResult = Result<(u64, Answer, Option<String>), CallError>;

struct Job {
    call: Call,
    /// Where an ask's completion requests go.
    completions: Option<Completions>,
    reply: oneshot::Sender<CallResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("workflow {workflow} is busy: all {workers} workers are occupied and its queue of {queue} calls is full; retry later, or raise pool.max_workers / pool.queue in its policy")]
    Busy { workflow: String, workers: u32, queue: u32 },
    #[error("workflow {workflow} cannot run calls: {reason}")]
    Unavailable { workflow: String, reason: String },
}

#[derive(Default)]
struct State {
    workers: BTreeMap<u64, WorkerStatus>,
    cgroups: BTreeMap<u64, Location>,
    live_slots: u32,
    idle_slots: u32,
    busy: u32,
    unavailable: Option<String>,
    shutting_down: bool,
}

pub struct Pool {
    cfg: PoolConfig,
    exe: PathBuf,
    log_filter: String,
    tx: mpsc::Sender<Job>,
    rx: AsyncMutex<mpsc::Receiver<Job>>,
    state: Mutex<State>,
    next_worker: AtomicU64,
    next_scope: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Pool {
    pub fn new(cfg: PoolConfig, exe: PathBuf, log_filter: String) -> Arc<Pool> {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1) as usize);
        let state = State { unavailable: cfg.unavailable.clone(), ..State::default() };
        Arc::new(Pool {
            cfg,
            exe,
            log_filter,
            tx,
            rx: AsyncMutex::new(rx),
            state: Mutex::new(state),
            next_worker: AtomicU64::new(1),
            next_scope: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked while holding it;
        // the state itself is plain counters and stays usable.
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

    /// Queues a call. Fails at once when the queue is full or the workflow
    /// cannot run.
    pub fn submit(
        self: &Arc<Self>,
        call: Call,
        completions: Option<Completions>,
    ) -> Result<oneshot::Receiver<CallResult>, SubmitError> {
        if let Some(reason) = self.state().unavailable.clone() {
            return Err(SubmitError::Unavailable { workflow: self.cfg.workflow.clone(), reason });
        }
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Job { call, completions, reply }).map_err(|_| SubmitError::Busy {
            workflow: self.cfg.workflow.clone(),
            workers: self.cfg.max_workers,
            queue: self.cfg.queue,
        })?;
        let grow = {
            let s = self.state();
            s.idle_slots == 0 && s.live_slots < self.cfg.max_workers && !s.shutting_down
        };
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
    }

    /// Live worker slots (0 once a shut-down pool has wound down).
    pub fn live_slots(&self) -> u32 {
        self.state().live_slots
    }

    pub fn status(&self) -> WorkflowStatus {
        let s = self.state();
        let mut workers: Vec<WorkerStatus> = s.workers.values().cloned().collect();
        for w in &mut workers {
            if let Some(loc) = s.cgroups.get(&w.id) {
                w.cgroup = Some(cgroup::stats(loc));
            }
        }
        WorkflowStatus {
            name: self.cfg.workflow.clone(),
            tenant: self.cfg.tenant.clone(),
            user: self.cfg.user.clone(),
            workspace: self.cfg.workspace.display().to_string(),
            unavailable: s.unavailable.clone(),
            queue_depth: self.tx.max_capacity() - self.tx.capacity(),
            queue_capacity: self.tx.max_capacity(),
            min_idle: self.cfg.min_idle,
            max_workers: self.cfg.max_workers,
            enforcement: self.cfg.enforcement.clone(),
            workers,
            disk: self.cfg.quota.as_ref().map(|q| {
                let usage = q.usage();
                crate::api::DiskStatus {
                    disk_max: q.max.to_string(),
                    disk_max_bytes: q.max.0,
                    used_bytes: usage.map(|u| u.used),
                    size_bytes: usage.map(|u| u.size),
                }
            }),
        }
    }

    /// The workspace's quota, if any.
    pub fn quota(&self) -> Option<&Arc<super::quota::Quota>> {
        self.cfg.quota.as_ref()
    }

    /// PIDs of the live worker processes.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.state().workers.values().filter_map(|w| w.pid).collect()
    }

    /// The uid the workers run as, when they switch.
    pub fn worker_uid(&self) -> Option<u32> {
        self.cfg.spec.credentials.as_ref().map(|c| c.uid)
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut WorkerStatus)) {
        if let Some(w) = self.state().workers.get_mut(&id) {
            f(w);
        }
    }

    /// Fails every queued call with `reason` (the workflow cannot run).
    async fn fail_queued(&self, reason: &str) {
        let mut rx = self.rx.lock().await;
        while let Ok(job) = rx.try_recv() {
            let _ = job.reply.send(Err(CallError::Died(reason.to_string())));
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
            return (launcher::start(&self.exe, &self.cfg.spec, &self.log_filter, None).await, None);
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
        (launcher::start(&self.exe, &self.cfg.spec, &self.log_filter, Some(plan)).await, Some(unit))
    }

    /// One slot: start a worker, serve, restart with backoff; until retired
    /// or shut down.
    async fn slot(self: Arc<Self>) {
        let id = self.next_worker.fetch_add(1, Ordering::Relaxed);
        self.state().workers.insert(
            id,
            WorkerStatus {
                id,
                pid: None,
                state: "starting".into(),
                served: 0,
                calls_cpu_ms: 0.0,
                start_ms: None,
                restarts: 0,
                last_exit: None,
                last_kill: None,
                scope: None,
                systemd_run: None,
                cgroup: None,
                sandbox: None,
            },
        );
        let wf = self.cfg.workflow.clone();
        let mut failures: u32 = 0;
        loop {
            if self.state().shutting_down {
                break;
            }
            self.update(id, |w| {
                w.state = "starting".into();
                w.pid = None;
            });
            let started = Instant::now();
            let (launched, unit) = self.launch(id).await;
            let mut end = None;
            match launched {
                Ok(worker) => {
                    self.state().unavailable = None;
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
                    self.state().unavailable = Some(reason.clone());
                    self.update(id, |w| w.last_exit = Some(format!("refused: {reason}")));
                    self.fail_queued(&reason).await;
                }
                Err(e) => {
                    tracing::error!(workflow = %wf, worker = id, "worker failed to start: {e}");
                    self.update(id, |w| w.last_exit = Some(e.to_string()));
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
                Some(SlotEnd::WorkerLost(why)) => {
                    tracing::warn!(workflow = %wf, worker = id, "worker lost: {why}; restarting");
                    self.update(id, |w| w.last_exit = Some(why));
                }
                None => {}
            }
            if started.elapsed() >= HEALTHY_AFTER {
                failures = 0;
            }
            let delay = BACKOFF_MIN.saturating_mul(1 << failures.min(9)).min(BACKOFF_MAX);
            failures += 1;
            self.update(id, |w| {
                w.state = "backoff".into();
                w.pid = None;
                w.restarts += 1;
            });
            let mut stop = self.shutdown.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        let mut s = self.state();
        s.workers.remove(&id);
        s.live_slots -= 1;
    }

    /// Waits for the next call; `None` when the pool is shutting down and
    /// nothing is queued, or (for slots above `min_idle`) after an idle spell.
    async fn next_job(&self) -> Result<Option<Job>, ()> {
        let mut stop = self.shutdown.subscribe();
        let stopping = *stop.borrow();
        if stopping {
            return Ok(self.rx.lock().await.try_recv().ok());
        }
        let may_retire = self.state().live_slots > self.cfg.min_idle;
        let recv = async {
            let mut rx = self.rx.lock().await;
            rx.recv().await
        };
        tokio::select! {
            job = recv => Ok(job),
            () = async { let _ = stop.wait_for(|s| *s).await; } => Ok(self.rx.lock().await.try_recv().ok()),
            _ = tokio::time::sleep(IDLE_RETIRE), if may_retire => Err(()),
        }
    }

    /// The limit the kernel enforced between two readings of the counters.
    /// Reads the counters of the worker's scope and of its tenant slice.
    fn counters(loc: &Option<Location>) -> Option<(Stats, Stats)> {
        let loc = loc.as_ref()?;
        Some((cgroup::stats(loc), cgroup::stats(&loc.parent())))
    }

    /// The limit the kernel enforced between two readings: the workflow's
    /// own (scope) first, then the tenant's (slice).
    fn limit_hit(
        &self,
        before: &Option<(Stats, Stats)>,
        after: &Option<(Stats, Stats)>,
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
            self.update(id, |w| w.state = "idle".into());
            self.state().idle_slots += 1;
            // An idle worker that dies (OOM, kill) is replaced now, not
            // discovered by the next call.
            let job = tokio::select! {
                job = self.next_job() => job,
                how = worker.exited() => {
                    self.state().idle_slots -= 1;
                    return SlotEnd::WorkerLost(format!("idle worker {how}"));
                }
            };
            self.state().idle_slots -= 1;
            let job = match job {
                Ok(Some(job)) => job,
                Ok(None) => {
                    worker.kill().await;
                    return SlotEnd::Shutdown;
                }
                Err(()) => {
                    tracing::info!(workflow = %self.cfg.workflow, worker = id, "idle worker retired");
                    worker.kill().await;
                    return SlotEnd::Retired;
                }
            };
            self.update(id, |w| w.state = "busy".into());
            self.state().busy += 1;
            let loc = self.state().cgroups.get(&id).cloned();
            let before = Self::counters(&loc);
            let result = worker.call(job.call, BACKSTOP, job.completions.as_ref()).await;
            let timed_out = matches!(&result, Ok(Answer::Done(o)) if o.timed_out);
            let mut limit = self.limit_hit(&before, &Self::counters(&loc), timed_out);
            let killed = result.as_ref().is_ok_and(|a| match a {
                Answer::Done(o) => o.termination == crate::protocol::Termination::Signaled(9) && !o.timed_out,
                Answer::Answered(_) => false,
            });
            if limit.is_none() && killed && loc.is_some() {
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
            let reply = match result {
                Ok(outcome) => Ok((id, outcome, limit.clone())),
                Err(CallError::Died(why)) => Err(CallError::Died(match &limit {
                    Some(l) => format!("{why}; {l}"),
                    None => why,
                })),
                Err(e) => Err(e),
            };
            let lost = reply.as_ref().err().map(ToString::to_string);
            self.update(id, |w| {
                w.served += 1;
                if limit.is_some() {
                    w.last_kill = limit;
                }
            });
            self.state().busy -= 1;
            let _ = job.reply.send(reply);
            if let Some(why) = lost {
                return SlotEnd::WorkerLost(why);
            }
        }
    }
}

enum SlotEnd {
    Retired,
    Shutdown,
    WorkerLost(String),
}
