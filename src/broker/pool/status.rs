//! What a pool says about itself: its own types, free of the API's shape
//! (the broker maps them to JSON in `broker::status`).

use std::time::SystemTime;

use crate::cgroup::Stats;
use crate::protocol::EffectiveSandbox;
use crate::sandbox::Enforcement;

/// What a worker slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Idle,
    Busy,
    /// Waiting before the next start.
    Backoff,
    /// Not starting workers: the workflow is quarantined.
    Quarantined,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Backoff => "backoff",
            WorkerState::Quarantined => "quarantined",
        }
    }
}

/// One worker slot.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: u64,
    pub pid: Option<u32>,
    pub state: WorkerState,
    pub served: u64,
    /// CPU time of the calls this worker ran, in ms.
    pub calls_cpu_ms: f64,
    /// How long the last start took (ms).
    pub start_ms: Option<f64>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    /// The last limit the kernel enforced on this worker's calls.
    pub last_kill: Option<String>,
    pub scope: Option<String>,
    pub systemd_run: Option<String>,
    pub cgroup: Option<Stats>,
    pub sandbox: Option<EffectiveSandbox>,
}

impl WorkerInfo {
    pub fn new(id: u64) -> Self {
        WorkerInfo {
            id,
            pid: None,
            state: WorkerState::Starting,
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
        }
    }
}

/// A quarantine in force.
#[derive(Debug, Clone)]
pub struct QuarantineInfo {
    /// The whole sentence: why, until when, how to lift it.
    pub message: String,
    /// When one worker is tried again.
    pub until: SystemTime,
}

/// A whole pool.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub workflow: String,
    pub tenant: String,
    pub user: Option<String>,
    pub workspace: String,
    /// Why the workflow cannot serve calls now (static, refusal or
    /// quarantine), if it cannot.
    pub unavailable: Option<String>,
    pub quarantine: Option<QuarantineInfo>,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub min_idle: u32,
    pub max_workers: u32,
    pub enforcement: Vec<Enforcement>,
    pub workers: Vec<WorkerInfo>,
    /// The workspace's `disk_max` and usage, when the policy sets one.
    pub disk: Option<DiskInfo>,
}

/// A workspace held to `disk_max`.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// `disk_max` as the policy wrote it.
    pub disk_max: String,
    pub disk_max_bytes: u64,
    /// Bytes in use; `None` while the image is not mounted.
    pub used_bytes: Option<u64>,
    /// What files can fill.
    pub size_bytes: Option<u64>,
}
