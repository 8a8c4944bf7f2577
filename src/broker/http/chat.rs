//! `POST /v1/chat/completions`: the OpenAI Chat Completions front. `model`
//! names a workflow; the last user message is the prompt and the messages
//! before it the conversation; the answer comes back as a chat completion,
//! or with `stream: true` as server-sent events written while the agent
//! loop runs: each step's text as the provider streams it, the loop's tool
//! calls and results as corral's extra (`corral`) on chunks without text,
//! then the finish chunk with the usage and `data: [DONE]`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::acting::Acting;
use super::ask::role;
use super::authorize::{resolve, Early};
use super::body::json;
use super::body::JsonBody;
use super::calls::call_id;
use super::error::ApiError;
use super::stream::{self, Render};
use super::{AppState, Caller};
use crate::api::{
    AskEvent, ChatBody, ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatExtras, ChatReply, ChatReplyMessage,
    ChatUsage,
};
use crate::broker::ask::{AskInput, AskResult};
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
    Extension(acting): Extension<Acting>,
    early: Option<Extension<Early>>,
    headers: axum::http::HeaderMap,
    body: JsonBody<ChatBody>,
) -> Result<Response, ApiError> {
    let broker = &front.broker;
    let request_id: &str = &caller.request_id;
    let mut body = body.value;
    let wf = resolve(broker, &caller.peer, &acting, early, &body.model)?;
    // `session` is corral's, not a model parameter.
    let field = match body.params.remove("session") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "session must be a string")),
    };
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
    let held = super::ask::admit(&front, &acting, &wf, caller.peer.uid, request_id)?;
    let session = super::sessions::open(broker, &caller.peer, &acting, &wf, &headers, field.as_deref()).await?;
    let registered = broker.calls.register(request_id, caller.peer.uid, call_id(&headers)?.as_deref())?;
    let cancel = Some(Arc::clone(&registered.cancel));
    let registered = registered.detach(Arc::clone(broker));
    let (events, streamed) = super::ask::channel(body.stream);
    // With a session, its history comes before the messages sent: a client
    // sends only the new turn.
    let messages = super::ask::with_history(broker, session.as_ref(), messages).await?;
    let turn = session.map(|s| super::ask::Turn { session: s, prompt: prompt.clone() });
    let session_dir = turn.as_ref().map(|t| t.session.dir.clone());
    let input = AskInput {
        prompt,
        conversation: messages,
        params,
        cancel,
        events,
        session_dir,
        member: acting.member.clone(),
        tools: acting.tools(),
    };
    let request_id = request_id.to_string();
    let done = super::ask::start(&front, (&caller, &acting), wf, input, (registered, held), turn)?;
    let id = format!("chatcmpl-{request_id}");
    let created = u64::try_from(utc::now()).unwrap_or(0);
    let finish = |r: &AskResult| match r.outcome.stop {
        AskStop::MaxSteps => "length",
        _ => "stop",
    };
    let usage = |r: &AskResult| ChatUsage {
        prompt_tokens: r.usage.prompt_tokens,
        completion_tokens: r.usage.completion_tokens,
        total_tokens: r.usage.total_tokens,
    };
    let Some(streamed) = streamed else {
        let r = done.await?;
        let reply = ChatReply {
            id,
            object: "chat.completion".into(),
            created,
            model: body.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatReplyMessage {
                    role: "assistant".into(),
                    content: r.outcome.answer.clone().unwrap_or_default(),
                },
                finish_reason: finish(&r).into(),
            }],
            usage: usage(&r),
            corral: ChatExtras { request_id: request_id.to_string(), transcript: r.transcript() },
        };
        return Ok(json(StatusCode::OK, &reply));
    };
    // Server-sent events while the loop runs: the role first, then the text
    // of every step as the provider streams it (steps apart by a blank
    // line), tool calls and results as corral's extra on empty chunks, then
    // the finish chunk with the usage, and `[DONE]`.
    let model = body.model;
    let chunk = move |delta: ChatDelta, finish: Option<&str>, usage: Option<ChatUsage>, corral: Option<AskEvent>| {
        stream::sse(&ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices: vec![ChatChunkChoice { index: 0, delta, finish_reason: finish.map(str::to_string) }],
            usage,
            corral,
        })
    };
    let head = chunk(ChatDelta { role: Some("assistant".into()), content: Some(String::new()) }, None, None, None);
    let render_chunk = chunk.clone();
    let mut last_step = None;
    let render: Render<AskEvent> = Box::new(move |event| match event {
        Some(AskEvent::Delta { step, content }) => {
            let apart = last_step.is_some_and(|s| s != step);
            last_step = Some(step);
            let content = if apart { format!("\n\n{content}") } else { content };
            render_chunk(ChatDelta { role: None, content: Some(content) }, None, None, None)
        }
        Some(e) => render_chunk(ChatDelta::default(), None, None, Some(e)),
        None => Vec::new(),
    });
    let last = async move {
        match done.await {
            Ok(r) => {
                let mut bytes = chunk(ChatDelta::default(), Some(finish(&r)), Some(usage(&r)), None);
                bytes.extend(b"data: [DONE]\n\n");
                bytes
            }
            // As OpenAI streams an error: a data line with `error`.
            Err(e) => stream::sse(&e.reply(&request_id)),
        }
    };
    Ok(stream::response(stream::SSE, head, streamed, render, last))
}
