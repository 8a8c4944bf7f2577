//! The pools' own status, as the API shows it: the one place that knows
//! both shapes.

use crate::api::{DiskStatus, WorkerStatus, WorkflowStatus};

use super::pool::status::{PoolStatus, WorkerInfo};

/// `GET /v1/status` for one workflow.
pub fn workflow_status(p: PoolStatus) -> WorkflowStatus {
    let quarantined_until = p.quarantine.as_ref().map(|q| {
        let secs = q.until.duration_since(std::time::SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        crate::utc::format(i64::try_from(secs).unwrap_or(i64::MAX))
    });
    WorkflowStatus {
        name: p.workflow,
        tenant: p.tenant,
        user: p.user,
        workspace: p.workspace,
        unavailable: p.unavailable,
        quarantined_until,
        queue_depth: p.queue_depth,
        queue_capacity: p.queue_capacity,
        min_idle: p.min_idle,
        max_workers: p.max_workers,
        enforcement: p.enforcement,
        workers: p.workers.into_iter().map(worker_status).collect(),
        disk: p.disk.map(|d| DiskStatus {
            disk_max: d.disk_max,
            disk_max_bytes: d.disk_max_bytes,
            used_bytes: d.used_bytes,
            size_bytes: d.size_bytes,
        }),
    }
}

fn worker_status(w: WorkerInfo) -> WorkerStatus {
    WorkerStatus {
        id: w.id,
        pid: w.pid,
        state: w.state.as_str().to_string(),
        served: w.served,
        calls_cpu_ms: w.calls_cpu_ms,
        start_ms: w.start_ms,
        restarts: w.restarts,
        last_exit: w.last_exit,
        last_kill: w.last_kill,
        scope: w.scope,
        systemd_run: w.systemd_run,
        cgroup: w.cgroup,
        sandbox: w.sandbox,
    }
}
