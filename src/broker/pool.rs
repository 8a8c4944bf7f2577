//! A workflow's pool: a bounded queue of calls and up to `max_workers`
//! worker slots that take calls from it.
//!
//! A slot owns one worker process at a time. It starts it, serves calls, and
//! when the worker dies starts a new one after an exponential backoff. Slots
//! beyond `min_idle` retire after sitting idle. A workflow whose sandbox the
//! host cannot provide is marked unavailable, and calls to it fail at once
//! with the reason instead of waiting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

use super::launcher::{self, CallError, StartError, Worker};
use crate::api::{WorkerStatus, WorkflowStatus};
use crate::protocol::{EffectiveSandbox, ExecOutcome, ExecRequest, SandboxSpec};

/// First restart delay; doubles per consecutive failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// A slot beyond `min_idle` retires after this long without a call.
const IDLE_RETIRE: Duration = Duration::from_secs(60);
/// How far past a call's own timeout the broker waits for the worker.
const BACKSTOP: Duration = Duration::from_secs(5);

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
}

/// What a caller gets back.
pub type CallResult = Result<(u64, ExecOutcome), CallError>;

struct Job {
    req: ExecRequest,
    reply: oneshot::Sender<CallResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("workflow {workflow} is busy: all {workers} workers are occupied and its queue of {queue} calls is full; retry later, or raise pool.max_workers / pool.queue in its policy")]
    Busy {
        workflow: String,
        workers: u32,
        queue: u32,
    },
    #[error("workflow {workflow} cannot run calls: {reason}")]
    Unavailable { workflow: String, reason: String },
}

#[derive(Default)]
struct State {
    workers: BTreeMap<u64, WorkerStatus>,
    live_slots: u32,
    idle_slots: u32,
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
}

impl Pool {
    pub fn new(cfg: PoolConfig, exe: PathBuf, log_filter: String) -> Arc<Pool> {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1) as usize);
        let state = State {
            unavailable: cfg.unavailable.clone(),
            ..State::default()
        };
        Arc::new(Pool {
            cfg,
            exe,
            log_filter,
            tx,
            rx: AsyncMutex::new(rx),
            state: Mutex::new(state),
            next_worker: AtomicU64::new(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked while holding it;
        // the state itself is plain counters and stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pre-starts `min_idle` workers.
    pub fn start(self: &Arc<Self>) {
        if self.state().unavailable.is_some() && self.cfg.unavailable.is_some() {
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
        req: ExecRequest,
    ) -> Result<oneshot::Receiver<CallResult>, SubmitError> {
        if let Some(reason) = self.state().unavailable.clone() {
            return Err(SubmitError::Unavailable {
                workflow: self.cfg.workflow.clone(),
                reason,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Job { req, reply })
            .map_err(|_| SubmitError::Busy {
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

    /// Refuses new calls. The workers die when the runtime drops their
    /// slots (`kill_on_drop`), or with the broker (parent-death signal).
    pub fn shutdown(&self) {
        let mut s = self.state();
        s.shutting_down = true;
        s.unavailable = Some("the broker is shutting down".into());
    }

    pub fn status(&self) -> WorkflowStatus {
        let s = self.state();
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
            workers: s.workers.values().cloned().collect(),
        }
    }

    /// PIDs of the live worker processes.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.state()
            .workers
            .values()
            .filter_map(|w| w.pid)
            .collect()
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
                restarts: 0,
                last_exit: None,
                sandbox: None,
            },
        );
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
            match launcher::start(&self.exe, &self.cfg.spec, &self.log_filter).await {
                Ok(worker) => {
                    self.state().unavailable = None;
                    tracing::info!(workflow = %self.cfg.workflow, worker = id, pid = worker.pid, "worker ready");
                    let effective: EffectiveSandbox = worker.effective.clone();
                    for note in &effective.notes {
                        tracing::warn!(workflow = %self.cfg.workflow, worker = id, "sandbox weaker than asked: {note}");
                    }
                    self.update(id, |w| {
                        w.pid = Some(worker.pid);
                        w.sandbox = Some(effective);
                    });
                    match self.serve(id, worker).await {
                        SlotEnd::Retired | SlotEnd::Shutdown => break,
                        SlotEnd::WorkerLost(why) => {
                            tracing::warn!(workflow = %self.cfg.workflow, worker = id, "worker lost: {why}; restarting");
                            self.update(id, |w| w.last_exit = Some(why));
                        }
                    }
                }
                Err(StartError::Refused(reason)) => {
                    tracing::error!(workflow = %self.cfg.workflow, "worker refused to start: {reason}");
                    self.state().unavailable = Some(reason.clone());
                    self.update(id, |w| w.last_exit = Some(format!("refused: {reason}")));
                    self.fail_queued(&reason).await;
                }
                Err(e) => {
                    tracing::error!(workflow = %self.cfg.workflow, worker = id, "worker failed to start: {e}");
                    self.update(id, |w| w.last_exit = Some(e.to_string()));
                }
            }
            if started.elapsed() >= HEALTHY_AFTER {
                failures = 0;
            }
            let delay = BACKOFF_MIN
                .saturating_mul(1 << failures.min(9))
                .min(BACKOFF_MAX);
            failures += 1;
            self.update(id, |w| {
                w.state = "backoff".into();
                w.pid = None;
                w.restarts += 1;
            });
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state();
        s.workers.remove(&id);
        s.live_slots -= 1;
    }

    async fn serve(&self, id: u64, mut worker: Worker) -> SlotEnd {
        loop {
            self.update(id, |w| w.state = "idle".into());
            self.state().idle_slots += 1;
            let job = {
                let mut rx = self.rx.lock().await;
                let may_retire = self.state().live_slots > self.cfg.min_idle;
                if may_retire {
                    tokio::time::timeout(IDLE_RETIRE, rx.recv()).await
                } else {
                    Ok(rx.recv().await)
                }
            };
            self.state().idle_slots -= 1;
            let job = match job {
                Ok(Some(job)) => job,
                Ok(None) => {
                    worker.kill().await;
                    return SlotEnd::Shutdown;
                }
                Err(_) => {
                    tracing::info!(workflow = %self.cfg.workflow, worker = id, "idle worker retired");
                    worker.kill().await;
                    return SlotEnd::Retired;
                }
            };
            self.update(id, |w| w.state = "busy".into());
            let result = worker.call(job.req, BACKSTOP).await;
            let lost = match &result {
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            };
            self.update(id, |w| w.served += 1);
            let _ = job.reply.send(result.map(|o| (id, o)));
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
