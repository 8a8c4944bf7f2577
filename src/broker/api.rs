//! HTTP routes: `POST /v1/exec`, `POST /v1/ask`, `POST /v1/chat/completions`
//! and `GET /v1/status`, JSON in and out. Every error is an [`ErrorReply`]
//! with a stable code and a message that says what to do.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tracing::Instrument;

use super::auth::{describe_uid, Peer};
use super::launcher::{signal_name, Answer, Call, CallError};
use super::pool::{Failure, SubmitError};
use super::{Broker, Workflow};
use crate::api::{self, ErrorInfo, ErrorReply, ExecBody, ExecReply, ASK_PATH, CHAT_PATH, EXEC_PATH, STATUS_PATH};
use crate::protocol::{ExecRequest, Termination};

/// Largest request body accepted (stdin travels base64-encoded at worst).
const MAX_BODY: usize = 8 << 20;
/// How long a call may wait in the queue for a worker, on top of its timeout.
pub(super) const QUEUE_WAIT_MAX: Duration = Duration::from_secs(30);

/// A failed request, as sent to the client.
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    /// When a spent budget resets (`budget_exhausted`).
    pub(super) resets_at: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), resets_at: None }
    }
}

pub(super) type Reply = Response<Full<Bytes>>;

pub(super) fn json<T: serde::Serialize>(status: StatusCode, body: &T, request_id: &str) -> Reply {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(request_id) {
        headers.insert(api::REQUEST_ID_HEADER, v);
    }
    resp
}

fn error_reply(e: ApiError, request_id: &str) -> Reply {
    let body = ErrorReply {
        error: ErrorInfo {
            code: e.code.to_string(),
            message: e.message,
            request_id: Some(request_id.to_string()),
            resets_at: e.resets_at,
        },
    };
    json(e.status, &body, request_id)
}

/// Entry point for every request on a connection from `peer`.
pub async fn handle(broker: Arc<Broker>, peer: Peer, req: Request<Incoming>) -> Result<Reply, Infallible> {
    // Counted for the drain; when the drain time is over, the request
    // answers `stopping` instead of losing its connection.
    let _counted = broker.request_guard();
    let request_id = broker.next_request_id();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    // Field names become journal fields CORRAL_REQUEST_ID, CORRAL_WORKFLOW, …
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        workflow = tracing::field::Empty,
        tenant = tracing::field::Empty,
        uid = peer.uid,
        pid = ?peer.pid,
        %method,
        %path
    );
    let routed = route(&broker, peer, req, &request_id, method, path).instrument(span);
    Ok(tokio::select! {
        reply = routed => reply,
        () = broker.drain_over() => error_reply(stopping(), &request_id),
    })
}

/// The answer to a request the stopping broker will not serve.
fn stopping() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "stopping",
        "the broker is stopping (shutdown or restart); retry the request in a few seconds",
    )
}

async fn route(
    broker: &Broker,
    peer: Peer,
    req: Request<Incoming>,
    request_id: &str,
    method: Method,
    path: String,
) -> Reply {
    if broker.draining() && !(method == Method::GET && path == STATUS_PATH) {
        return error_reply(stopping(), request_id);
    }
    if broker.is_sandboxed_peer(&peer) {
        let e = ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "requests from inside a corral sandbox are refused: tools may not call the broker",
        );
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "refused a connection from inside a sandbox");
        return error_reply(e, request_id);
    }
    let result = match (method.clone(), path.as_str()) {
        (Method::POST, EXEC_PATH) => exec(broker, peer, req, request_id).await,
        (Method::POST, ASK_PATH) => super::ask::ask_route(broker, peer, req, request_id).await,
        (Method::POST, CHAT_PATH) => super::chat::route(broker, peer, req, request_id).await,
        (Method::GET, STATUS_PATH) => Ok(json(StatusCode::OK, &broker.status(&peer), request_id)),
        (_, EXEC_PATH | ASK_PATH | CHAT_PATH | STATUS_PATH) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{method} is not allowed on {path}: use POST {EXEC_PATH}, POST {ASK_PATH}, \
                 POST {CHAT_PATH} or GET {STATUS_PATH}"
            ),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no such endpoint {path}: corral serves POST {EXEC_PATH}, POST {ASK_PATH}, \
                 POST {CHAT_PATH} and GET {STATUS_PATH}"
            ),
        )),
    };
    match result {
        Ok(reply) => reply,
        Err(e) => {
            tracing::info!(code = e.code, status = e.status.as_u16(), "request failed: {}", e.message);
            error_reply(e, request_id)
        }
    }
}

pub(super) async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body exceeds {MAX_BODY} bytes; send less stdin"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("failed to read request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not a valid request: {e}; see the README for the fields"),
        )
    })
}

/// The workflow `name`, when `peer` may use it; records it on the request's
/// span.
pub(super) fn authorize(broker: &Broker, peer: &Peer, name: &str) -> Result<Arc<Workflow>, ApiError> {
    let wf = broker.workflow(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_workflow",
            format!("no workflow named {name:?}; known workflows: {}", broker.workflow_names().join(", ")),
        )
    })?;
    let span = tracing::Span::current();
    span.record("workflow", wf.name.as_str());
    span.record("tenant", wf.policy.tenant.as_str());
    if !wf.clients.allows(peer) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "uid {} may not use workflow {}: add the user to clients.users, or one of its groups to \
                 clients.groups, in {}",
                describe_uid(peer.uid),
                wf.name,
                wf.source
            ),
        ));
    }
    Ok(wf)
}

/// Maps a submission failure to the API's error.
pub(super) fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Busy { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", e.to_string()),
        SubmitError::Unavailable { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
        SubmitError::Quarantined { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "quarantined", e.to_string()),
    }
}

/// Maps a failed call to the API's error.
pub(super) fn call_error(wf: &Workflow, e: Failure) -> ApiError {
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

async fn exec(broker: &Broker, peer: Peer, req: Request<Incoming>, request_id: &str) -> Result<Reply, ApiError> {
    let body: ExecBody = read_json(req).await?;
    let wf = authorize(broker, &peer, &body.workflow)?;
    let _in_flight = super::InFlight::new(&broker.in_flight);
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "argv is empty: give the command and its arguments, e.g. [\"ls\", \"-l\"]",
        ));
    }
    if body.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "argv contains a NUL byte, which no command line can carry",
        ));
    }
    let stdin = match (&body.stdin, &body.stdin_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give either stdin or stdin_base64, not both",
            ))
        }
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("stdin_base64 is not valid base64: {e}"))
        })?,
        (None, None) => Vec::new(),
    };
    if stdin.len() as u64 > wf.stdin_max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "stdin is {} bytes, workflow {} accepts at most {} (limits.stdin_max)",
                stdin.len(),
                wf.name,
                wf.stdin_max
            ),
        ));
    }
    let max_ms = u64::try_from(wf.call_timeout.as_millis()).unwrap_or(u64::MAX);
    let timeout_ms = match body.timeout_ms {
        None => max_ms,
        Some(0) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "timeout_ms must be at least 1")),
        Some(t) if t > max_ms => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("timeout_ms {t} exceeds workflow {}'s call_timeout of {max_ms} ms; ask for less, or raise limits.call_timeout", wf.name),
            ))
        }
        Some(t) => t,
    };
    let id = broker.next_call_id();
    let call = ExecRequest { id, request_id: request_id.to_string(), argv: body.argv.clone(), stdin, timeout_ms };
    tracing::info!(workflow = %wf.name, argv0 = %body.argv[0], "exec");
    let rx = wf.pool.submit(Call::Exec(call), None).map_err(submit_error)?;
    let wait = Duration::from_millis(timeout_ms) + QUEUE_WAIT_MAX;
    let result = tokio::time::timeout(wait, rx).await.map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no worker of {} answered within {wait:?}; see `corral status` for its workers", wf.name),
        )
    })?;
    let (worker, outcome, limit) = match result {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the call was dropped by the broker; retry it",
            ))
        }
        Ok(Err(e)) => return Err(call_error(&wf, e)),
        Ok(Ok((worker, Answer::Done(outcome), limit))) => (worker, outcome, limit),
        Ok(Ok((_, Answer::Answered(_), _))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the worker answered an exec with an ask result; retry it",
            ))
        }
    };
    let (exit_code, signal) = match outcome.termination {
        Termination::Exited(c) => (Some(c), None),
        Termination::Signaled(s) => (None, Some(s)),
        Termination::NotStarted => (None, None),
    };
    let (stdout, stdout_base64) = api::encode_bytes(&outcome.stdout);
    let (stderr, stderr_base64) = api::encode_bytes(&outcome.stderr);
    let ms = |us: u64| us as f64 / 1000.0;
    let reply = ExecReply {
        request_id: request_id.to_string(),
        workflow: wf.name.clone(),
        worker,
        exit_code,
        signal,
        signal_name: signal.map(signal_name),
        error: outcome.error.or_else(|| limit.clone()),
        stdout,
        stdout_base64,
        stderr,
        stderr_base64,
        stdout_truncated: outcome.stdout_truncated,
        stderr_truncated: outcome.stderr_truncated,
        truncated: outcome.stdout_truncated || outcome.stderr_truncated,
        timed_out: outcome.timed_out,
        limit,
        wall_ms: ms(outcome.wall_us),
        cpu_user_ms: ms(outcome.cpu_user_us),
        cpu_system_ms: ms(outcome.cpu_system_us),
        peak_rss_kib: outcome.peak_rss_kib,
    };
    tracing::info!(workflow = %wf.name, worker, ?exit_code, ?signal, timed_out = reply.timed_out, wall_ms = reply.wall_ms, "exec done");
    Ok(json(StatusCode::OK, &reply, request_id))
}
