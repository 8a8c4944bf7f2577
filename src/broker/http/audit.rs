//! `GET /v1/audit` (recent calls: each caller their own, root everyone's)
//! and `GET /v1/audit/verify` (root: does the hash chain hold).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::authorize::sees_all;
use super::body::json;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::api::{AuditQuery, AuditRecord, AuditVerify};
use crate::broker::ledger::{AuditCheck, AuditRow, LedgerError};

/// Rows of one answer at most.
const MAX_ROWS: u32 = 10_000;

/// Runs `f` on the ledger off the async threads.
async fn on_ledger<T: Send + 'static>(
    front: &AppState,
    f: impl FnOnce(&crate::broker::ledger::Ledger) -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, ApiError> {
    let broker = std::sync::Arc::clone(&front.broker);
    tokio::task::spawn_blocking(move || {
        // Every exec call answered before this request is in the trail.
        broker.exec_log.flush();
        f(broker.gateway.ledger())
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the ledger query failed"))?
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

pub(super) async fn list(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{e}: use ?since=YYYY-MM-DD&uid=UID&workflow=NAME&member=NAME&limit=N"),
        )
    })?;
    let since = super::status::since(q.since.as_deref())?;
    let peer = caller.peer;
    // Everyone but root and the broker's user sees their own calls only.
    let uid = if sees_all(&peer) { q.uid } else { Some(peer.uid) };
    let limit = q.limit.unwrap_or(100).min(MAX_ROWS);
    let (workflow, member) = (q.workflow, q.member);
    let rows = on_ledger(&front, move |l| l.audit(since, uid, workflow.as_deref(), member.as_deref(), limit)).await?;
    let rows: Vec<AuditRecord> = rows.into_iter().map(record).collect();
    Ok(json(StatusCode::OK, &rows))
}

fn record(r: AuditRow) -> AuditRecord {
    let e = r.entry;
    AuditRecord {
        id: r.id,
        time: e.time,
        request_id: e.request_id,
        kind: e.kind,
        workflow: e.workflow,
        tenant: e.tenant,
        uid: e.uid,
        member: e.member,
        session: e.session,
        outcome: e.outcome,
        limit: e.limit,
    }
}

pub(super) async fn verify(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    if !sees_all(&caller.peer) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only root may verify the audit trail (it reads everyone's calls): run corral audit verify as root",
        ));
    }
    let AuditCheck { rows, broken_at, why } = on_ledger(&front, |l| l.verify_audit()).await?;
    Ok(json(StatusCode::OK, &AuditVerify { ok: broken_at.is_none(), rows, broken_at, why }))
}
