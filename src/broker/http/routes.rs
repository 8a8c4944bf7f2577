//! The routes, and the gate every request passes before its handler runs
//! (and so before any byte of its body is read):
//!
//! 1. while the broker drains after SIGTERM: 503 `stopping`;
//! 2. a caller inside a sandbox (a worker's uid, or below a worker): 403;
//! 3. `x-corral-member`: only a delegate of the members file may send it
//!    (403), naming a member it has (403 `unknown_member`); the member and
//!    the chat go into the request's extensions as an [`Acting`];
//! 4. a call (`POST` exec, ask, chat): a caller who is no workflow's
//!    client (nor a delegate acting for a member) is refused 403; with an
//!    `x-corral-workflow` header the workflow is authorized here, and the
//!    body must then name the same one.
//!
//! Afterwards the gate renders the answer: an [`ApiError`], axum's own
//! rejections and caught panics all become the JSON error with the request
//! id, which every answer also carries as `x-corral-request-id`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Extension, Router};

use super::acting::{self, Acting};
use super::authorize::{authorize_for, Early};
use super::error::{render, ApiError};
use super::{ask, audit, calls, chat, exec, models, ops, sessions, status, AppState, Caller};
use crate::api::{
    ASK_PATH, AUDIT_PATH, AUDIT_VERIFY_PATH, CALL_PATH, CHAT_PATH, EXEC_PATH, HEALTH_PATH, METRICS_PATH, MODELS_PATH,
    OPENAPI_PATH, REQUEST_ID_HEADER, SESSIONS_PATH, SESSION_PATH, STATUS_PATH, USAGE_PATH, WORKFLOW_HEADER,
};
use crate::broker::auth::describe_uid;
use crate::broker::log::Escaped;
use crate::broker::Broker;

/// A model's page in `GET /v1/models/{id}`.
const MODEL_PATH: &str = "/v1/models/{id}";

/// Every route: method, path, handler. The router is built from this
/// list, and a test holds the OpenAPI document to it.
type Route = (&'static str, &'static str, fn() -> MethodRouter<AppState>);
pub const ROUTES: [Route; 15] = [
    ("post", EXEC_PATH, || post(exec::exec)),
    ("post", ASK_PATH, || post(ask::ask)),
    ("post", CHAT_PATH, || post(chat::chat)),
    ("get", STATUS_PATH, || get(status::status)),
    ("get", USAGE_PATH, || get(status::usage)),
    ("get", AUDIT_PATH, || get(audit::list)),
    ("get", AUDIT_VERIFY_PATH, || get(audit::verify)),
    ("get", MODELS_PATH, || get(models::list)),
    ("get", MODEL_PATH, || get(models::get)),
    ("get", HEALTH_PATH, || get(ops::healthz)),
    ("get", METRICS_PATH, || get(ops::metrics)),
    ("get", OPENAPI_PATH, || get(ops::openapi)),
    ("delete", CALL_PATH, || delete(calls::cancel)),
    ("get", SESSIONS_PATH, || get(sessions::list)),
    ("delete", SESSION_PATH, || delete(sessions::remove)),
];

pub(super) fn router(front: AppState) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |r, (_, path, handler)| r.route(path, handler()))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&front), gate))
        .with_state(front)
}

async fn gate(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match check(&front.broker, &caller, &mut req) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let (parts, body) = req.into_parts();
            super::body::linger(&parts.headers, body, front.gate.limits.body_max);
            e.into_response()
        }
    };
    finish(resp, &caller, &method, &path)
}

fn check(broker: &Broker, caller: &Caller, req: &mut Request) -> Result<(), ApiError> {
    let peer = &caller.peer;
    if broker.draining() {
        return Err(ApiError::stopping());
    }
    if broker.is_sandboxed_peer(peer, &caller.below_worker) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "refused a connection from inside a sandbox");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "requests from inside a corral sandbox are refused: tools may not call the broker",
        ));
    }
    let acting: Acting = acting::resolve(&broker.members(), peer, req.headers())?;
    if let Some(m) = acting.member_name() {
        tracing::Span::current().record("member", m);
    }
    let delegated = acting.delegated;
    req.extensions_mut().insert(acting.clone());
    let is_call = req.method() == Method::POST && matches!(req.uri().path(), EXEC_PATH | ASK_PATH | CHAT_PATH);
    if !is_call {
        return Ok(());
    }
    if let Some(name) = req.headers().get(WORKFLOW_HEADER) {
        let name = name.to_str().map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("{WORKFLOW_HEADER} is not text"))
        })?;
        let wf = authorize_for(broker, peer, &acting, name)?;
        req.extensions_mut().insert(Early(wf));
        return Ok(());
    }
    if !delegated && !broker.may_use_any(peer) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "uid {} may not use any workflow of this broker: ask its operator to add the user to a \
                 workflow's clients.users (or one of its groups to clients.groups)",
                describe_uid(peer.uid)
            ),
        ));
    }
    Ok(())
}

/// The final form of every answer: errors as JSON, the request id header.
fn finish(mut resp: Response, caller: &Caller, method: &Method, path: &str) -> Response {
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        let e = resp
            .extensions_mut()
            .remove::<ApiError>()
            .unwrap_or_else(|| ApiError::from_status(status, method.as_str(), &Escaped(path).to_string()));
        tracing::info!(code = e.code, status = e.status.as_u16(), why = %Escaped(&e.message), "request failed");
        resp = render(&e, &caller.request_id);
    }
    if let Ok(v) = HeaderValue::from_str(&caller.request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document describes exactly the routes the router has.
    #[test]
    fn the_openapi_document_and_the_routes_agree() {
        let doc: serde_json::Value = serde_json::from_str(ops::OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys().filter(|k| *k != "parameters") {
                documented.push((method.clone(), path.clone()));
            }
        }
        let mut routed: Vec<(String, String)> = ROUTES.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
    }
}
