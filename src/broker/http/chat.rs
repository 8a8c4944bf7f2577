//! `POST /v1/chat/completions`: the OpenAI Chat Completions front. `model`
//! names a workflow; the last user message is the prompt and the messages
//! before it the conversation; the answer comes back as a chat completion,
//! or with `stream: true` as server-sent events. The agent loop runs to its
//! end before the first event: the stream carries the whole answer in one
//! content chunk, then the finish chunk and `data: [DONE]`.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::ask::{ask_error, role};
use super::authorize::{resolve, Early};
use super::body::json;
use super::body::JsonBody;
use super::calls::call_id;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::api::{
    ChatBody, ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatExtras, ChatReply, ChatReplyMessage, ChatUsage,
};
use crate::broker::ask::{self, AskInput};
use crate::broker::llm::ModelParams;
use crate::protocol::{AskStop, ChatMessage, Role};
use crate::utc;

/// The text of a message's `content`: a string, or text parts.
fn text(content: &serde_json::Value) -> Result<String, ApiError> {
    match content {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Null => Ok(String::new()),
        serde_json::Value::Array(parts) => {
            Ok(parts.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).collect::<Vec<_>>().join("\n"))
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "message content must be a string or an array of text parts",
        )),
    }
}

pub(super) async fn chat(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    early: Option<Extension<Early>>,
    headers: axum::http::HeaderMap,
    body: JsonBody<ChatBody>,
) -> Result<Response, ApiError> {
    let broker = &front.broker;
    let request_id: &str = &caller.request_id;
    let body = body.value;
    let wf = resolve(broker, &caller.peer, early, &body.model)?;
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in &body.messages {
        if m.role == "tool" {
            continue; // the workflow's tools are its own
        }
        messages.push(ChatMessage::text(role(&m.role)?, text(&m.content)?));
    }
    let last_user = messages.iter().rposition(|m| m.role == Role::User).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "messages has no user message: the last user message is the prompt",
        )
    })?;
    let prompt = messages.remove(last_user).content.unwrap_or_default();
    messages.truncate(last_user);
    let params = ModelParams::from_request(&body.params)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    let registered = broker.calls.register(request_id, caller.peer.uid, call_id(&headers)?.as_deref())?;
    let cancel = Some(std::sync::Arc::clone(&registered.cancel));
    let input = AskInput { prompt, conversation: messages, params, cancel };
    let r = tokio::select! {
        r = ask::run(broker, &caller.peer, wf.clone(), input, request_id) => r.map_err(|e| ask_error(broker, &wf, e))?,
        () = front.stopped() => return Err(ApiError::stopping()),
    };
    let id = format!("chatcmpl-{request_id}");
    let created = u64::try_from(utc::now()).unwrap_or(0);
    let finish = match r.outcome.stop {
        AskStop::MaxSteps => "length",
        _ => "stop",
    };
    let content = r.outcome.answer.clone().unwrap_or_default();
    let usage = ChatUsage {
        prompt_tokens: r.usage.prompt_tokens,
        completion_tokens: r.usage.completion_tokens,
        total_tokens: r.usage.total_tokens,
    };
    if !body.stream {
        let reply = ChatReply {
            id,
            object: "chat.completion".into(),
            created,
            model: body.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatReplyMessage { role: "assistant".into(), content },
                finish_reason: finish.into(),
            }],
            usage,
            corral: ChatExtras { request_id: request_id.to_string(), transcript: r.transcript() },
        };
        return Ok(json(StatusCode::OK, &reply));
    }
    let chunk = |delta: ChatDelta, finish: Option<&str>, usage: Option<ChatUsage>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk".into(),
        created,
        model: body.model.clone(),
        choices: vec![ChatChunkChoice { index: 0, delta, finish_reason: finish.map(str::to_string) }],
        usage,
    };
    let events = [
        chunk(ChatDelta { role: Some("assistant".into()), content: Some(String::new()) }, None, None),
        chunk(ChatDelta { role: None, content: Some(content) }, None, None),
        chunk(ChatDelta::default(), Some(finish), Some(usage)),
    ];
    let mut sse = String::new();
    for e in &events {
        sse.push_str("data: ");
        sse.push_str(&serde_json::to_string(e).unwrap_or_default());
        sse.push_str("\n\n");
    }
    sse.push_str("data: [DONE]\n\n");
    let mut resp = sse.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}
