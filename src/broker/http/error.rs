//! One error shape for every failure of the front door:
//! `{"error": {"code", "message", "request_id", …}}` with the request id also
//! in the `x-corral-request-id` header. Handlers return an [`ApiError`]; the
//! [`super::routes`] middleware renders it with the request's id, and turns
//! any other error answer (axum's own rejections, a caught panic) into the
//! same shape. Answers given before a request exists (a refused connection,
//! a request head that timed out or did not parse) are written whole by
//! [`raw_response`].

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::{ErrorInfo, ErrorReply, REQUEST_ID_HEADER};
use crate::broker::launcher::CallError;
use crate::broker::pool::{Failure, SubmitError};
use crate::broker::{Broker, Workflow};

/// A failed request, as sent to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// When a spent budget resets (`budget_exhausted`).
    pub resets_at: Option<String>,
    /// Seconds until a retry may succeed (`rate_limited`): the
    /// `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), resets_at: None, retry_after: None }
    }

    /// A member's or a tenant's limit refused the call (429).
    pub fn rate_limited(message: String, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// The answer to a request while the broker drains after SIGTERM, and
    /// to a call the drain cut.
    pub fn stopping() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the broker is stopping (SIGTERM) and takes no new calls; retry once it is back",
        )
    }

    /// The error for an answer that carries no [`ApiError`]: axum's own
    /// rejections, a caught panic, a status a layer chose.
    pub fn from_status(status: StatusCode, method: &str, path: &str) -> Self {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("not_found", format!("no such endpoint {path}: {}", ENDPOINTS)),
            StatusCode::METHOD_NOT_ALLOWED => {
                ("method_not_allowed", format!("{method} is not allowed on {path}: {}", ENDPOINTS))
            }
            StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "the request is too large".to_string()),
            StatusCode::LENGTH_REQUIRED => ("length_required", LENGTH_REQUIRED.to_string()),
            StatusCode::REQUEST_TIMEOUT => ("timeout", "the request was not received in time".to_string()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("bad_request", "send the body as application/json".to_string()),
            s if s.is_server_error() => {
                ("internal", "the broker failed on this request; retry it, and see the broker log".to_string())
            }
            _ => ("bad_request", format!("the request was refused ({status}); see the README's HTTP API")),
        };
        ApiError::new(status, code, message)
    }

    /// The JSON body with `request_id`.
    pub fn body(&self, request_id: &str) -> Vec<u8> {
        serde_json::to_vec(&self.reply(request_id)).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The error as the API shows it.
    pub fn reply(&self, request_id: &str) -> ErrorReply {
        ErrorReply {
            error: ErrorInfo {
                code: self.code.to_string(),
                message: self.message.clone(),
                request_id: Some(request_id.to_string()),
                resets_at: self.resets_at.clone(),
            },
        }
    }
}

pub(super) const ENDPOINTS: &str = "corral serves POST /v1/exec, POST /v1/ask, POST /v1/chat/completions, \
     GET /v1/status and GET /v1/usage";

pub(super) const LENGTH_REQUIRED: &str =
    "a request body needs a Content-Length header (chunked bodies are not accepted)";

/// Handlers return the error as it is; the middleware renders it once it
/// knows the request id (see [`render`]).
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = self.status.into_response();
        resp.extensions_mut().insert(self);
        resp
    }
}

/// The final answer for `e`, JSON body and headers.
pub fn render(e: &ApiError, request_id: &str) -> Response {
    let mut resp = (e.status, e.body(request_id)).into_response();
    let headers = resp.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    if let Some(s) = e.retry_after {
        headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

/// A whole HTTP/1.1 answer for `e`, for the connection layer, which closes
/// the connection after it.
pub fn raw_response(e: &ApiError, request_id: &str) -> Vec<u8> {
    let body = e.body(request_id);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{REQUEST_ID_HEADER}: {request_id}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        e.status.as_u16(),
        e.status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Maps a submission failure to the API's error.
pub(super) fn submit_error(broker: &Broker, e: SubmitError) -> ApiError {
    if broker.draining() {
        return ApiError::stopping();
    }
    match e {
        SubmitError::Busy { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", e.to_string()),
        SubmitError::Unavailable { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
        SubmitError::Quarantined { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "quarantined", e.to_string()),
    }
}

/// Maps a failed call to the API's error.
pub(super) fn call_error(broker: &Broker, wf: &Workflow, e: Failure) -> ApiError {
    if broker.draining() {
        return ApiError::stopping();
    }
    match e {
        Failure::Quarantined(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "quarantined", e.to_string()),
        Failure::Unavailable { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
        Failure::NoWorker { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_worker", e.to_string()),
        Failure::QueueTimeout { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", e.to_string()),
        Failure::Call(CallError::Died(why)) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "worker_died",
            format!("the worker of {} running the call died: {why}; it is being replaced, retry the call", wf.name),
        ),
        Failure::Call(e @ CallError::Stuck(_)) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", format!("{e}; retry the call"))
        }
    }
}

/// A call whose answer channel closed: the pool dropped it.
pub(super) fn dropped(broker: &Broker, what: &str) -> ApiError {
    if broker.draining() {
        return ApiError::stopping();
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the {what} was dropped by the broker; retry it"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_response_is_http_with_the_json_error() {
        let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", "too many connections");
        let raw = String::from_utf8(raw_response(&e, "1-2")).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{head}");
        assert!(head.contains("x-corral-request-id: 1-2"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "busy");
        assert_eq!(v["error"]["request_id"], "1-2");
    }
}
