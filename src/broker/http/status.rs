//! `GET /v1/status` and `GET /v1/usage`: each caller sees its own. The
//! pools keep their own status types; this is the one place that maps them
//! to the API's JSON.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::body::json;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::api::{BrokerInfo, DiskStatus, Status, UsageQuery, UsageRow, WorkerStatus, WorkflowStatus};
use crate::api::{GroupBy, StatusQuery};
use crate::broker::auth::Peer;
use crate::broker::ledger::UsageRow as LedgerRow;
use crate::broker::pool::status::{PoolStatus, WorkerInfo};
use crate::sandbox;
use crate::utc;

/// The broker and the workflows the caller may use; what only the operator
/// needs (why systemd is unreachable) is for root and the broker's user.
pub(super) async fn status(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("{e}: use ?as=USER")))?;
    let broker = &front.broker;
    let peer = &caller.peer;
    let subject = match &q.as_user {
        None => *peer,
        Some(_) if !super::authorize::sees_all(peer) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only root may ask what another user may call (?as=USER)",
            ))
        }
        Some(user) => peer_of(user)?,
    };
    let kernel = sandbox::probe();
    let operator = peer.uid == 0 || peer.uid == nix::unistd::Uid::effective().as_raw();
    let status = Status {
        broker: BrokerInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: broker.started.elapsed().as_secs(),
            landlock_abi: kernel.landlock_abi,
            seccomp: kernel.seccomp,
            resource_control: broker.resource_control(operator),
        },
        workflows: broker.pool_statuses(&subject).into_iter().map(workflow_status).collect(),
    };
    Ok(json(StatusCode::OK, &status))
}

/// The peer a local user would be: their uid and primary group (the
/// supplementary groups come from the group database when authorizing).
fn peer_of(user: &str) -> Result<Peer, ApiError> {
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok(Peer { uid: u.uid.as_raw(), gid: u.gid.as_raw(), pid: None }),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("no local user {:?}: name one from /etc/passwd", user.escape_debug().to_string()),
        )),
    }
}

/// A `?since=YYYY-MM-DD` parameter as a Unix time; no parameter: 0.
pub(super) fn since(date: Option<&str>) -> Result<i64, ApiError> {
    date.map_or(Ok(0), |d| {
        utc::parse_date(d).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
    })
}

/// Tokens of the caller's own model calls (root and the broker's user: of
/// everyone's), summed per workflow, tenant or model.
pub(super) async fn usage(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{e}: use ?since=YYYY-MM-DD&by=workflow|tenant|model"),
        )
    })?;
    let since = since(q.since.as_deref())?;
    let peer = caller.peer;
    let uid = (!super::authorize::sees_all(&peer)).then_some(peer.uid);
    let by = q.by.unwrap_or(GroupBy::Workflow);
    let rows = ledger_usage(&front, since, by, uid).await?;
    let rows: Vec<UsageRow> = rows
        .into_iter()
        .map(|r| UsageRow {
            key: r.key,
            calls: r.calls,
            failed: r.failed,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
        })
        .collect();
    Ok(json(StatusCode::OK, &rows))
}

/// The ledger's token sums (see `Ledger::usage`), off the async threads.
pub(super) async fn ledger_usage(
    front: &AppState,
    since: i64,
    by: GroupBy,
    uid: Option<u32>,
) -> Result<Vec<LedgerRow>, ApiError> {
    let broker = std::sync::Arc::clone(&front.broker);
    tokio::task::spawn_blocking(move || broker.gateway.ledger().usage(since, by, uid))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the ledger query failed"))?
        .map_err(|e| {
            tracing::error!("{e}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "failed to read the ledger; see the broker log",
            )
        })
}

/// `GET /v1/status` for one workflow.
fn workflow_status(p: PoolStatus) -> WorkflowStatus {
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
