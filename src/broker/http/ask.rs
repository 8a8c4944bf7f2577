//! `POST /v1/ask` (with `"stream": true`, NDJSON [`AskEvent`] lines while
//! the loop runs), and what it shares with `/v1/chat/completions`: running
//! the ask, and the mapping of an [`AskError`] to the API's error.

use crate::broker::ledger::AuditEntry;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::acting::Acting;
use super::authorize::{resolve, Early};
use super::body::json;
use super::body::JsonBody;
use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::calls::{call_id, Detached};
use super::error::ApiError;
use super::error::{call_error, dropped, submit_error};
use super::stream::{self, Render};
use super::{AppState, Caller};
use crate::api::{AskBody, AskEvent, AskReply, UsageReport};
use crate::broker::ask::{self, AskError, AskInput, AskResult};
use crate::broker::llm::GatewayError;
use crate::broker::sessions::Opened;
use crate::broker::{Broker, Workflow};
use crate::protocol::{AskStop, ChatMessage, Role};
use crate::utc;

/// A conversation role as the API spells it.
pub(super) fn role(name: &str) -> Result<Role, ApiError> {
    match name {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("unknown role {other:?} in the conversation: use system, user or assistant"),
        )),
    }
}

pub(super) fn gateway_error(e: &GatewayError) -> ApiError {
    let mut err = ApiError::new(
        StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
        e.code(),
        e.to_string(),
    );
    err.resets_at = e.resets_at().map(utc::format);
    err
}

pub(super) fn ask_error(broker: &Broker, wf: &Workflow, e: AskError) -> ApiError {
    match e {
        AskError::Gateway(g) => gateway_error(&g),
        AskError::NulInPrompt => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        AskError::Submit(s) => submit_error(broker, s),
        AskError::Call(c) => call_error(broker, wf, c),
        AskError::Timeout { .. } if broker.draining() => ApiError::stopping(),
        AskError::Timeout { .. } => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", e.to_string()),
        AskError::Dropped => dropped(broker, "ask"),
        AskError::WrongAnswer => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        AskError::Failed(text) if broker.draining() => ApiError { message: text, ..ApiError::stopping() },
        AskError::Failed(text) => ApiError::new(StatusCode::BAD_GATEWAY, "ask_failed", text),
        AskError::Cancelled => ApiError::new(StatusCode::CONFLICT, "cancelled", e.to_string()),
    }
}

pub(super) async fn ask(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(acting): Extension<Acting>,
    early: Option<Extension<Early>>,
    headers: axum::http::HeaderMap,
    body: JsonBody<AskBody>,
) -> Result<Response, ApiError> {
    let broker = &front.broker;
    let body = body.value;
    let wf = resolve(broker, &caller.peer, &acting, early, &body.workflow)?;
    let conversation = body
        .conversation
        .iter()
        .map(|m| Ok(ChatMessage::text(role(&m.role)?, m.content.clone())))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let held = admit(&front, &acting, &wf, caller.peer.uid, &caller.request_id)?;
    let session = super::sessions::open(broker, &caller.peer, &acting, &wf, &headers, body.session.as_deref()).await?;
    let conversation = with_history(broker, session.as_ref(), conversation).await?;
    let registered = broker.calls.register(&caller.request_id, caller.peer.uid, call_id(&headers)?.as_deref())?;
    let cancel = Some(Arc::clone(&registered.cancel));
    let registered = registered.detach(Arc::clone(broker));
    let (events, streamed) = channel(body.stream);
    let turn = session.map(|s| Turn { session: s, prompt: body.prompt.clone() });
    let session_dir = turn.as_ref().map(|t| t.session.dir.clone());
    let input = AskInput {
        prompt: body.prompt,
        conversation,
        params: Default::default(),
        cancel,
        events,
        session_dir,
        member: acting.member.clone(),
        tools: acting.tools(),
    };
    let request_id = caller.request_id.to_string();
    let done = start(&front, (&caller, &acting), wf, input, (registered, held), turn)?;
    let Some(streamed) = streamed else {
        return Ok(json(StatusCode::OK, &reply(&request_id, &done.await?)));
    };
    let render: Render<AskEvent> = Box::new(|event| event.map(|e| stream::line(&e)).unwrap_or_default());
    let last = async move {
        match done.await {
            Ok(r) => stream::line(&AskEvent::Result(Box::new(reply(&request_id, &r)))),
            Err(e) => stream::line(&AskEvent::Error(e.reply(&request_id))),
        }
    };
    Ok(stream::response(stream::NDJSON, Vec::new(), streamed, render, last))
}

/// An ask of a session: its prompt goes into the session's history with
/// the answer.
pub(super) struct Turn {
    pub session: Opened,
    pub prompt: String,
}

/// The session's history (when the call has a session), then `rest`.
pub(super) async fn with_history(
    broker: &Arc<Broker>,
    session: Option<&Opened>,
    rest: Vec<ChatMessage>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(s) = session.cloned() else { return Ok(rest) };
    let b = Arc::clone(broker);
    let mut history = tokio::task::spawn_blocking(move || b.sessions.history(&s))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "reading the history failed"))?
        .map_err(super::sessions::session_error)?;
    history.extend(rest);
    Ok(history)
}

/// [`super::rates::admit`] for an ask or a chat completion; a refusal
/// over a limit goes into the audit trail (off the async threads, not
/// waited for).
pub(super) fn admit(
    front: &AppState,
    acting: &Acting,
    wf: &Workflow,
    uid: u32,
    request_id: &str,
) -> Result<super::rates::Held, ApiError> {
    let refused = match super::rates::admit(front, acting, wf, true) {
        Ok(held) => return Ok(held),
        Err(refused) => refused,
    };
    if let Some(limit) = refused.limit {
        let entry = AuditEntry {
            time: crate::utc::now(),
            request_id: request_id.to_string(),
            kind: "ask".into(),
            workflow: wf.name.clone(),
            tenant: wf.policy.tenant.to_string(),
            uid,
            member: acting.member_name().map(str::to_string),
            session: None,
            outcome: refused.error.code.to_string(),
            limit: Some(limit),
        };
        let broker = Arc::clone(&front.broker);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = broker.gateway.ledger().record_audit(&entry) {
                tracing::error!("refused ask not recorded in the audit trail: {e}");
            }
        });
    }
    Err(refused.error)
}

/// The events channel of an ask that streams.
pub(super) fn channel(stream: bool) -> (Option<UnboundedSender<AskEvent>>, Option<UnboundedReceiver<AskEvent>>) {
    if !stream {
        return (None, None);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Some(tx), Some(rx))
}

/// Queues the ask `input` of `caller` (acting as `acting`) on `wf`, or
/// fails at once; then the future of its answer, which waits for it or
/// until the broker stops. The future owns what it needs: a streamed
/// answer runs it after the handler has returned (errors before the ask
/// was queued kept their status). The ask, whatever its end, goes into the
/// audit trail of the caller (uid, the member it acts for, request id).
/// Holds the ask's rate limit slots until it ends.
pub(super) fn start(
    front: &AppState,
    (caller, acting): (&Caller, &Acting),
    wf: Arc<Workflow>,
    input: AskInput,
    held: (Detached, super::rates::Held),
    turn: Option<Turn>,
) -> Result<impl std::future::Future<Output = Result<AskResult, ApiError>> + Send + 'static, ApiError> {
    let broker = &front.broker;
    let request_id = caller.request_id.to_string();
    let submitted =
        ask::submit(broker, &caller.peer, wf.clone(), input, &request_id).map_err(|e| ask_error(broker, &wf, e))?;
    let member = acting.member_name().map(str::to_string);
    Ok(run_held(Arc::clone(front), wf, submitted, held, (caller.peer.uid, member, request_id), turn))
}

async fn run_held(
    front: AppState,
    wf: Arc<Workflow>,
    submitted: ask::Submitted,
    _held: (Detached, super::rates::Held),
    (uid, member, request_id): (u32, Option<String>, String),
    turn: Option<Turn>,
) -> Result<AskResult, ApiError> {
    let broker = &front.broker;
    let r = tokio::select! {
        r = submitted.wait(broker) => r.map_err(|e| ask_error(broker, &wf, e)),
        () = front.stopped() => Err(ApiError::stopping()),
    };
    let (outcome, limit) = match &r {
        Ok(a) if matches!(a.outcome.stop, AskStop::MaxSteps) => ("ok".to_string(), Some("max_steps".to_string())),
        Ok(_) => ("ok".to_string(), None),
        Err(e) => (e.code.to_string(), None),
    };
    let entry = AuditEntry {
        time: crate::utc::now(),
        request_id,
        kind: "ask".into(),
        workflow: wf.name.clone(),
        tenant: wf.policy.tenant.to_string(),
        uid,
        member,
        session: turn.as_ref().map(|t| t.session.id.as_str().to_string()),
        outcome,
        limit,
    };
    // A final answer goes into the session's history with its prompt.
    let answer = r.as_ref().ok().and_then(|a| a.outcome.answer.clone()).filter(|_| turn.is_some());
    let broker = Arc::clone(broker);
    let written = tokio::task::spawn_blocking(move || {
        if let (Some(t), Some(answer)) = (&turn, answer) {
            if let Err(e) = broker.sessions.append(&t.session, &t.prompt, &answer, crate::utc::now()) {
                tracing::error!("ask not added to its session's history: {e}");
            }
        }
        broker.gateway.ledger().record_audit(&entry)
    })
    .await;
    if let Ok(Err(e)) = written {
        tracing::error!("ask not recorded in the audit trail: {e}");
    }
    r
}

fn reply(request_id: &str, r: &AskResult) -> AskReply {
    AskReply {
        request_id: request_id.to_string(),
        workflow: r.workflow.clone(),
        model: r.model.clone(),
        answer: r.outcome.answer.clone(),
        stopped: match r.outcome.stop {
            AskStop::MaxSteps => "max_steps",
            _ => "answer",
        }
        .to_string(),
        steps: r.outcome.steps,
        transcript: r.transcript(),
        usage: UsageReport {
            prompt_tokens: r.usage.prompt_tokens,
            completion_tokens: r.usage.completion_tokens,
            total_tokens: r.usage.total_tokens,
            model_calls: r.model_calls,
        },
        egress: r.egress.clone(),
    }
}
