//! `GET /v1/status` and `GET /v1/usage`: each caller sees its own.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::error::ApiError;
use super::routes::json;
use super::{AppState, Caller};
use crate::api::{UsageQuery, UsageRow};
use crate::broker::ledger::GroupBy;
use crate::utc;

/// The broker and the workflows the caller may use; what only the operator
/// needs (why systemd is unreachable) is for root and the broker's user.
pub(super) async fn status(State(front): State<AppState>, Extension(caller): Extension<Caller>) -> Response {
    json(StatusCode::OK, &front.broker.status(&caller.peer))
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
    let since = match &q.since {
        Some(d) => {
            utc::parse_date(d).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?
        }
        None => 0,
    };
    let peer = caller.peer;
    let uid = (!super::routes::sees_all(&peer)).then_some(peer.uid);
    let by = q.by.unwrap_or(GroupBy::Workflow);
    let broker = std::sync::Arc::clone(&front.broker);
    let rows = tokio::task::spawn_blocking(move || broker.gateway.ledger().usage(since, by, uid))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the ledger query failed"))?
        .map_err(|e| {
            tracing::error!("{e}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "failed to read the ledger; see the broker log",
            )
        })?;
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
