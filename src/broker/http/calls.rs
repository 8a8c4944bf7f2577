//! Calls in flight, by request id, and `DELETE /v1/calls/{request_id}`:
//! a caller (or root) cancels one of its own calls. The call's worker kills
//! its processes and the call answers at once with what it had. A client
//! that goes away cancels its call the same way (see `pool::Job::cancel`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use tokio::sync::Notify;

use super::authorize::sees_all;
use super::body::json;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::broker::Broker;

/// The header a client may send with a call to name it, so that it can
/// cancel it before the answer (and its request id) arrives.
pub const CALL_ID_HEADER: &str = "x-corral-call-id";

/// The call id a client sent, if it sent a valid one.
pub(super) fn call_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(CALL_ID_HEADER) else { return Ok(None) };
    let id = v.to_str().unwrap_or_default();
    let valid = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !valid {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{CALL_ID_HEADER} must be 1 to 64 characters of A-Z a-z 0-9 . _ - :"),
        ));
    }
    Ok(Some(id.to_string()))
}

/// The calls in flight that may be cancelled, by request id and by
/// `UID/CALL_ID`: (the caller's uid, what cancels it).
#[derive(Default)]
pub struct InFlightCalls(Mutex<HashMap<String, (u32, Arc<Notify>)>>);

/// A call's entries in [`InFlightCalls`], removed when the call ends.
pub struct Registered<'a> {
    calls: &'a InFlightCalls,
    keys: Vec<String>,
    pub cancel: Arc<Notify>,
}

impl InFlightCalls {
    pub fn register(&self, request_id: &str, uid: u32, call_id: Option<&str>) -> Result<Registered<'_>, ApiError> {
        let cancel = Arc::new(Notify::new());
        let mut keys = vec![request_id.to_string()];
        keys.extend(call_id.map(|c| format!("{uid}/{c}")));
        let mut calls = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if keys.iter().any(|k| calls.contains_key(k)) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("a call of yours with this {CALL_ID_HEADER} is still running: give each call its own"),
            ));
        }
        for k in &keys {
            calls.insert(k.clone(), (uid, Arc::clone(&cancel)));
        }
        Ok(Registered { calls: self, keys, cancel })
    }

    /// Cancels the call `id` (its request id, or the call id `uid` gave
    /// it) when `may` allows its owner's uid; whether it did.
    fn cancel(&self, id: &str, uid: u32, may: impl Fn(u32) -> bool) -> bool {
        let calls = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let found = calls.get(id).filter(|(owner, _)| may(*owner)).or_else(|| calls.get(&format!("{uid}/{id}")));
        match found {
            Some((_, cancel)) => {
                cancel.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Registered<'_> {
    /// The same entries, held by a guard that owns the broker: for a call
    /// whose answer is streamed, which outlives its handler.
    pub fn detach(mut self, broker: Arc<Broker>) -> Detached {
        let keys = std::mem::take(&mut self.keys);
        Detached { broker, keys }
    }
}

/// A call's entries in [`InFlightCalls`], held by its streamed answer.
pub struct Detached {
    broker: Arc<Broker>,
    keys: Vec<String>,
}

impl Drop for Detached {
    fn drop(&mut self) {
        let mut calls = self.broker.calls.0.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            calls.remove(k);
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut calls = self.calls.0.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            calls.remove(k);
        }
    }
}

pub(super) async fn cancel(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(request_id): Path<String>,
) -> Result<Response, ApiError> {
    let peer = caller.peer;
    if front.broker.calls.cancel(&request_id, peer.uid, |uid| uid == peer.uid || sees_all(&peer)) {
        tracing::info!(cancelled = %crate::broker::log::Escaped(&request_id), "call cancelled by its client");
        return Ok(json(StatusCode::OK, &serde_json::json!({ "cancelled": request_id })));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no call of yours with that id is running (it may have ended): give the call's request id, or the \
         x-corral-call-id you sent with it",
    ))
}
