//! `GET /v1/models` and `GET /v1/models/{id}`: the workflows the caller may
//! chat with (those with an `[llm]` table), in the OpenAI shape, so that
//! OpenAI clients and chat front ends find them. To a caller who may not
//! use it, a workflow is as absent as one that does not exist.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::body::json;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::api::{Model, ModelList};

fn model(id: String, created: u64) -> Model {
    Model { id, object: "model".into(), created, owned_by: "corral".into() }
}

/// When the broker started, as the models' `created`.
fn created(front: &AppState) -> u64 {
    let now = u64::try_from(crate::utc::now()).unwrap_or(0);
    now.saturating_sub(front.broker.started.elapsed().as_secs())
}

pub(super) async fn list(State(front): State<AppState>, Extension(caller): Extension<Caller>) -> Response {
    let created = created(&front);
    let data = front.broker.chat_workflows_of(&caller.peer).into_iter().map(|id| model(id, created)).collect();
    json(StatusCode::OK, &ModelList { object: "list".into(), data })
}

pub(super) async fn get(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !front.broker.chat_workflows_of(&caller.peer).contains(&id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            "no such model for you: GET /v1/models lists the workflows you may chat with",
        ));
    }
    Ok(json(StatusCode::OK, &model(id, created(&front))))
}
