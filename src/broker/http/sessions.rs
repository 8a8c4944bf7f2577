//! Sessions over HTTP: which session a call names (the `x-corral-session`
//! header or the body's `session`), `GET /v1/sessions` (the caller's own;
//! root: everyone's) and `DELETE /v1/sessions/{workflow}/{id}` (own only;
//! root any).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;

use super::acting::Acting;
use super::authorize::sees_all;
use super::body::json;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::api::{SessionDeleteQuery, SessionInfo, SessionRemoved, SessionsQuery, SESSION_HEADER};
use crate::broker::auth::Peer;
use crate::broker::sessions::{owner_of, Opened, SessionError, SessionId, SessionOwner};
use crate::broker::{Broker, Workflow};

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub(super) fn session_error(e: SessionError) -> ApiError {
    match e {
        SessionError::BadId(_) => bad(e.to_string()),
        SessionError::TooMany { .. } => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", e.to_string())
        }
        SessionError::NoLandlock => ApiError::new(StatusCode::CONFLICT, "sessions_unavailable", e.to_string()),
        SessionError::Dir(_) | SessionError::Ledger(_) => {
            tracing::error!("session: {e}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

/// The session id a call names, if any: the header, the body's field, or
/// both when they agree.
pub(super) fn named(headers: &HeaderMap, field: Option<&str>) -> Result<Option<SessionId>, ApiError> {
    let header = match headers.get(SESSION_HEADER) {
        Some(v) => Some(v.to_str().map_err(|_| bad(format!("{SESSION_HEADER} is not text")))?),
        None => None,
    };
    let text = match (header, field) {
        (Some(h), Some(f)) if h != f => {
            return Err(bad(format!(
                "the {SESSION_HEADER} header ({h:?}) and the body's session ({f:?}) differ: give one, or the same"
            )))
        }
        (Some(h), _) => h,
        (None, Some(f)) => f,
        (None, None) => return Ok(None),
    };
    SessionId::parse(text).map(Some).map_err(session_error)
}

/// Opens the session a call names (creating it on first use), for `peer`.
pub(super) async fn open(
    broker: &Arc<Broker>,
    peer: &Peer,
    acting: &Acting,
    wf: &Arc<Workflow>,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Result<Option<Opened>, ApiError> {
    let Some(id) = named(headers, field)? else { return Ok(None) };
    let owner = owner_of(peer, acting.member_name());
    let (b, w) = (Arc::clone(broker), Arc::clone(wf));
    let opened = tokio::task::spawn_blocking(move || b.sessions.open(&w, &owner, id, crate::utc::now()))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "opening the session failed"))?
        .map_err(session_error)?;
    tracing::info!(session = opened.id.as_str(), owner = opened.owner.key(), "session call");
    Ok(Some(opened))
}

pub(super) async fn list(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(acting): Extension<Acting>,
    query: Result<Query<SessionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| bad(format!("{e}: use ?workflow=NAME")))?;
    let owner = (!sees_all(&caller.peer)).then(|| owner_of(&caller.peer, acting.member_name()));
    let broker = Arc::clone(&front.broker);
    let rows = tokio::task::spawn_blocking(move || {
        let rows = broker.sessions.list(owner.as_ref(), q.workflow.as_deref())?;
        let idle = |name: &str| {
            broker.workflow(name).map(|w| i64::try_from(w.policy.sessions.idle.as_secs()).unwrap_or(i64::MAX))
        };
        Ok::<_, SessionError>(
            rows.into_iter()
                .map(|r| SessionInfo {
                    expires: r.last_used.saturating_add(idle(&r.workflow).unwrap_or(0)),
                    workflow: r.workflow,
                    owner: r.owner,
                    id: r.id,
                    created: r.created,
                    last_used: r.last_used,
                    messages: r.messages,
                    bytes: r.bytes,
                })
                .collect::<Vec<_>>(),
        )
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "listing the sessions failed"))?
    .map_err(session_error)?;
    Ok(json(StatusCode::OK, &rows))
}

pub(super) async fn remove(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(acting): Extension<Acting>,
    Path((workflow, id)): Path<(String, String)>,
    query: Result<Query<SessionDeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| bad(format!("{e}: use ?owner=uid-N (root only)")))?;
    let sid = SessionId::parse(&id).map_err(session_error)?;
    let root = sees_all(&caller.peer);
    let owner = match (&q.owner, root) {
        (Some(_), false) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only root may remove another owner's session (?owner=)",
            ))
        }
        (Some(key), true) => Some(
            SessionOwner::from_key(key)
                .ok_or_else(|| bad(format!("owner {key:?} is not an owner key like uid-1000 or member-alice")))?,
        ),
        (None, true) => None,
        (None, false) => Some(owner_of(&caller.peer, acting.member_name())),
    };
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no session {id:?} of yours in workflow {workflow:?}: see `corral sessions`"),
        )
    };
    // A workflow the caller may not see is answered like a missing session.
    let wf = front.broker.workflow(&workflow).ok_or_else(not_found)?;
    let broker = Arc::clone(&front.broker);
    let removed = tokio::task::spawn_blocking(move || broker.sessions.remove(&wf, owner.as_ref(), &sid))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "removing the session failed"))?
        .map_err(session_error)?;
    if removed == 0 {
        return Err(not_found());
    }
    Ok(json(StatusCode::OK, &SessionRemoved { workflow, id, removed }))
}
