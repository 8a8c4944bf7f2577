//! Running an ask: the prompt goes to a worker of the workflow, which runs
//! the agent loop; every completion it asks for on the way is served here
//! by the gateway, with this request's budget, key and request id. Serves
//! `POST /v1/ask` and is shared with `/v1/chat/completions`.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tokio::sync::mpsc;

use super::api::{authorize, call_error, json, read_json, submit_error, ApiError, Reply, QUEUE_WAIT_MAX};
use super::auth::Peer;
use super::launcher::{Answer, Call, CompletionJob};
use super::llm::{CallContext, GatewayError};
use super::Broker;
use crate::api::{AskBody, AskReply, ToolCallReport, UsageReport};
use crate::protocol::{AskOutcome, AskRequest, AskStop, ChatMessage, Role, Usage, MAX_TOOL_CALLS_PER_STEP};
use crate::utc;

/// Cap on the time of one ask, whatever the policy's numbers multiply to.
const ASK_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// A prompt for a workflow.
pub struct AskInput {
    pub workflow: String,
    pub prompt: String,
    pub conversation: Vec<ChatMessage>,
}

/// An ask that ran.
pub struct AskResult {
    pub workflow: String,
    pub model: String,
    pub outcome: AskOutcome,
    /// The broker's own count of the ask's tokens.
    pub usage: Usage,
    pub model_calls: u32,
}

impl AskResult {
    pub fn transcript(&self) -> Vec<ToolCallReport> {
        self.outcome
            .transcript
            .iter()
            .map(|t| ToolCallReport {
                tool: t.tool.clone(),
                argv: t.argv.clone(),
                exit_code: t.exit_code,
                signal: t.signal,
                duration_ms: t.duration_ms,
                truncated: t.truncated,
                timed_out: t.timed_out,
                error: t.error.clone(),
            })
            .collect()
    }
}

/// A conversation role as the API spells it.
pub fn role(name: &str) -> Result<Role, ApiError> {
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

pub fn gateway_error(e: &GatewayError) -> ApiError {
    let mut err = ApiError::new(
        StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
        e.code(),
        e.to_string(),
    );
    err.resets_at = e.resets_at().map(utc::format);
    err
}

/// Runs `input` on a worker of its workflow, for `peer`.
pub async fn run(broker: &Broker, peer: &Peer, input: AskInput, request_id: &str) -> Result<AskResult, ApiError> {
    let wf = authorize(broker, peer, &input.workflow)?;
    let _in_flight = super::InFlight::new(&broker.in_flight);
    let llm =
        wf.policy.llm.as_ref().ok_or_else(|| gateway_error(&GatewayError::NoLlm { workflow: wf.name.clone() }))?;
    if input.prompt.contains('\0') {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "the prompt contains a NUL byte"));
    }
    let gateway = &broker.gateway;
    let ctx = CallContext { request_id, workflow: &wf.name, tenant: wf.policy.tenant.as_str(), llm: Some(llm) };
    // Fail fast, before a worker is busy with it.
    gateway.check_budget(&ctx, utc::now()).map_err(|e| gateway_error(&e))?;

    let step_time = gateway.worst_case(llm) + wf.call_timeout * MAX_TOOL_CALLS_PER_STEP;
    let timeout = (step_time * llm.max_steps).min(ASK_TIMEOUT_MAX);
    let call = AskRequest {
        id: broker.next_call_id(),
        request_id: request_id.to_string(),
        prompt: input.prompt,
        conversation: input.conversation,
        max_steps: llm.max_steps,
        model: llm.model.clone(),
        tool_timeout_ms: u64::try_from(wf.call_timeout.as_millis()).unwrap_or(u64::MAX),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    tracing::info!(workflow = %wf.name, model = %llm.model, max_steps = llm.max_steps, "ask");
    let (tx, mut rx) = mpsc::channel::<CompletionJob>(1);
    let mut done = wf.pool.submit(Call::Ask(call), Some(tx)).map_err(submit_error)?;
    let deadline = tokio::time::Instant::now() + timeout + QUEUE_WAIT_MAX;
    let mut usage = Usage::default();
    let mut model_calls = 0u32;
    let mut last_error: Option<GatewayError> = None;
    let mut asking = true;
    let result = loop {
        tokio::select! {
            job = rx.recv(), if asking => {
                let Some(job) = job else {
                    asking = false; // the call is over; its answer follows
                    continue;
                };
                let answer = gateway.complete(&ctx, &job.request).await;
                model_calls += 1;
                let reply = match answer {
                    Ok(c) => {
                        usage.add(c.usage);
                        Ok(c)
                    }
                    Err(e) => {
                        let text = e.to_string();
                        last_error = Some(e);
                        Err(text)
                    }
                };
                let _ = job.reply.send(reply);
            }
            r = &mut done => break r,
            () = tokio::time::sleep_until(deadline) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("no worker of {} finished the ask within {:?}; see `corral status`", wf.name, timeout + QUEUE_WAIT_MAX),
                ));
            }
        }
    };
    let outcome = match result {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the ask was dropped by the broker; retry it",
            ))
        }
        Ok(Err(e)) => return Err(call_error(&wf, e)),
        Ok(Ok((_, Answer::Answered(outcome), _))) => outcome,
        Ok(Ok((_, Answer::Done(_), _))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the worker answered an ask with an exec result; retry it",
            ))
        }
    };
    let now = utc::now();
    for t in &outcome.transcript {
        if let Err(e) = gateway.ledger().record_tool_call(now, request_id, &wf.name, wf.policy.tenant.as_str(), t) {
            tracing::error!("{e}");
        }
    }
    if outcome.usage != usage {
        tracing::warn!(workflow = %wf.name, worker_usage = ?outcome.usage, broker_usage = ?usage,
            "the worker's token count differs from the broker's; reporting the broker's");
    }
    if let AskStop::Failed(text) = &outcome.stop {
        return Err(match &last_error {
            Some(e) => gateway_error(e),
            None => ApiError::new(StatusCode::BAD_GATEWAY, "ask_failed", text.clone()),
        });
    }
    tracing::info!(workflow = %wf.name, steps = outcome.steps, tool_calls = outcome.transcript.len(),
        total_tokens = usage.total_tokens, stop = ?outcome.stop, "ask done");
    Ok(AskResult { workflow: wf.name.clone(), model: llm.model.clone(), outcome, usage, model_calls })
}

/// `POST /v1/ask`.
pub async fn ask_route(
    broker: &Broker,
    peer: Peer,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<Reply, ApiError> {
    let body: AskBody = read_json(req).await?;
    let conversation = body
        .conversation
        .iter()
        .map(|m| Ok(ChatMessage::text(role(&m.role)?, m.content.clone())))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let input = AskInput { workflow: body.workflow, prompt: body.prompt, conversation };
    let r = run(broker, &peer, input, request_id).await?;
    let reply = AskReply {
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
    };
    Ok(json(StatusCode::OK, &reply, request_id))
}
