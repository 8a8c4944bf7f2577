//! Reading a JSON request body, only once the caller has passed the gate
//! (see [`super::routes`]): its declared length must fit the body cap and
//! the caller's share of the body budget before a byte is read, and the
//! whole body must arrive within the body timeout.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::{ApiError, LENGTH_REQUIRED};
use super::limits::{BodyHold, Refusal};
use super::{AppState, Caller};

/// How long a refused body is read and thrown away, so that a client still
/// sending it gets to read the answer instead of a broken pipe (a lingering
/// close, as web servers do). Memory-free; bounded in time and bytes.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards `body` for at most [`LINGER`], when its declared
/// length is at most `max` (a larger one is not worth reading: the
/// connection just closes).
pub(super) fn linger(headers: &axum::http::HeaderMap, body: axum::body::Body, max: u64) {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<u64>().ok());
    if !declared.is_some_and(|n| n > 0 && n <= max) {
        return;
    }
    // A client that waits for "100 Continue" sends nothing until told to,
    // and polling the body would tell it to after the final answer.
    if headers.get(header::EXPECT).is_some() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let _ = tokio::time::timeout(LINGER, async { while let Some(Ok(_)) = body.frame().await {} }).await;
    });
}

/// A parsed body, and the budget it holds until the request ends (the
/// parsed value holds about as much as the bytes did).
pub struct JsonBody<T> {
    pub value: T,
    _hold: BodyHold,
}

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, front: &AppState) -> Result<Self, ApiError> {
        let limits = &front.gate.limits;
        let deadline = tokio::time::Instant::now() + limits.body_timeout;
        let uid = req.extensions().get::<Caller>().map_or(u32::MAX, |c| c.peer.uid);
        let (parts, body) = req.into_parts();
        let refuse = |e: ApiError, body: axum::body::Body| {
            linger(&parts.headers, body, limits.body_max.saturating_mul(2));
            Err(e)
        };
        let headers = &parts.headers;
        if headers.contains_key(header::TRANSFER_ENCODING) {
            return Err(ApiError::new(StatusCode::LENGTH_REQUIRED, "length_required", LENGTH_REQUIRED));
        }
        let Some(declared) = headers.get(header::CONTENT_LENGTH) else {
            return Err(ApiError::new(StatusCode::LENGTH_REQUIRED, "length_required", LENGTH_REQUIRED));
        };
        let Some(len) = declared.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "Content-Length is not a number"));
        };
        if len > limits.body_max {
            let e = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body of {len} bytes exceeds the limit of {} bytes; send less stdin", limits.body_max),
            );
            return refuse(e, body);
        }
        let hold = match front.gate.reserve_body(uid, len) {
            Ok(h) => h,
            Err(r) => return refuse(budget_refusal(r, limits.bodies_per_uid), body),
        };
        let cap = usize::try_from(len).unwrap_or(usize::MAX);
        let mut bytes = Vec::with_capacity(cap);
        let mut body = body;
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("failed to read the request body: {e}"),
                    )
                })?;
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > cap {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            "the body is longer than its Content-Length",
                        ));
                    }
                    bytes.extend_from_slice(&data);
                }
            }
            Ok(())
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "the request body did not arrive within {:?} ({} of {len} bytes came)",
                        limits.body_timeout,
                        bytes.len()
                    ),
                ))
            }
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("request body is not a valid request: {e}; see the README for the fields"),
            )
        })?;
        Ok(JsonBody { value, _hold: hold })
    }
}

fn budget_refusal(r: Refusal, per_uid: u64) -> ApiError {
    match r {
        Refusal::Uid => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!(
                "this user already has {per_uid} bytes of request bodies in flight, its share: retry when a \
                     request of its own has ended"
            ),
        ),
        Refusal::Total => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the broker holds as many request bodies as it may; retry in a moment",
        ),
    }
}

/// A JSON answer.
pub(super) fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (status, bytes).into_response();
    resp.headers_mut().insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
