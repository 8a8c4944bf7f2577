//! Running an ask: the prompt goes to a worker of the workflow, which runs
//! the agent loop; every completion it asks for on the way is served here
//! by the gateway, with this request's budget, key and request id. The
//! HTTP routes (`POST /v1/ask`, `/v1/chat/completions`) authorize the
//! caller, call [`submit`] (which fails at once when the ask cannot run)
//! and [`Submitted::wait`], and map an [`AskError`] to their answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::auth::Peer;
use super::launcher::{Answer, Call, CallEvent, CompletionJob};
use super::llm::{CallContext, Deltas, GatewayError, ModelParams};
use super::pool::{Failure, Served, SubmitError, QUEUE_WAIT_MAX};
use super::{Broker, Workflow};
use crate::api::{AskEvent, ToolCallEvent, ToolCallReport, ToolResultEvent};
use crate::protocol::{AskOutcome, AskRequest, AskStop, ChatMessage, Usage, MAX_TOOL_CALLS_PER_STEP};
use crate::utc;

/// Cap on the time of one ask, whatever the policy's numbers multiply to.
const ASK_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// A prompt for a workflow.
pub struct AskInput {
    pub prompt: String,
    pub conversation: Vec<ChatMessage>,
    /// Sampling parameters for the model (`/v1/chat/completions`).
    pub params: ModelParams,
    /// Notified to cancel the ask (`DELETE /v1/calls/{id}`).
    pub cancel: Option<Arc<tokio::sync::Notify>>,
    /// Set for a streamed ask: the model's text as the provider streams it,
    /// each tool call and each tool result go here while the loop runs.
    pub events: Option<mpsc::UnboundedSender<AskEvent>>,
    /// The session's directory, for an ask in a session.
    pub session_dir: Option<std::path::PathBuf>,
    /// The member the ask is made for: recorded with its model calls, held
    /// to her `tokens_per_day`.
    pub member: Option<Arc<crate::policy::Member>>,
    /// The tools the worker may offer the model; `None`: all of them.
    pub tools: Option<Vec<String>>,
}

/// An ask that ran.
pub struct AskResult {
    pub workflow: String,
    pub model: String,
    pub outcome: AskOutcome,
    /// The broker's own count of the ask's tokens.
    pub usage: Usage,
    pub model_calls: u32,
    /// With `[network]`: what the ask's tools reached and were refused.
    pub egress: Option<crate::api::EgressReport>,
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

/// Why an ask failed.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("the prompt contains a NUL byte")]
    NulInPrompt,
    #[error(transparent)]
    Submit(SubmitError),
    #[error("the worker failed")]
    Call(Failure),
    #[error("no worker of {workflow} finished the ask within {after:?}; see `corral status`")]
    Timeout { workflow: String, after: Duration },
    #[error("the ask was dropped by the broker; retry it")]
    Dropped,
    #[error("the worker answered an ask with an exec result; retry it")]
    WrongAnswer,
    #[error("{0}")]
    Failed(String),
    #[error("the ask was cancelled by its client (DELETE /v1/calls/…)")]
    Cancelled,
}

/// An ask queued on its workflow's pool: what [`Submitted::wait`] needs to
/// serve its completions and collect its answer. Owns all of it, so a
/// streamed answer can run it after its handler has returned.
pub struct Submitted {
    wf: Arc<Workflow>,
    uid: u32,
    member: Option<Arc<crate::policy::Member>>,
    request_id: String,
    params: ModelParams,
    timeout: Duration,
    completions: mpsc::Receiver<CompletionJob>,
    tools: Option<mpsc::UnboundedReceiver<CallEvent>>,
    events: Option<mpsc::UnboundedSender<AskEvent>>,
    done: tokio::sync::oneshot::Receiver<super::pool::CallResult>,
}

/// Checks `input` (a model, the budget) and queues it on a worker of `wf`,
/// for `peer` (whom the caller has authorized). Fails at once, before any
/// answer begins, when it cannot run.
pub fn submit(
    broker: &Broker,
    peer: &Peer,
    wf: Arc<Workflow>,
    input: AskInput,
    request_id: &str,
) -> Result<Submitted, AskError> {
    let llm = wf.policy.llm.as_ref().ok_or_else(|| GatewayError::NoLlm { workflow: wf.name.clone() })?;
    if input.prompt.contains('\0') {
        return Err(AskError::NulInPrompt);
    }
    let gateway = &broker.gateway;
    let ctx = CallContext {
        request_id,
        workflow: &wf.name,
        tenant: wf.policy.tenant.as_str(),
        llm: Some(llm),
        uid: Some(peer.uid),
        member: input.member.as_ref().map(|m| (m.name.as_str(), m.tokens_per_day)),
        params: &input.params,
    };
    // Fail fast, before a worker is busy with it.
    gateway.check_budget(&ctx, utc::now())?;

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
        stream: input.events.is_some(),
        session_dir: input.session_dir,
        tools: input.tools,
    };
    tracing::info!(workflow = %wf.name, model = %llm.model, max_steps = llm.max_steps, "ask");
    let (tx, completions) = mpsc::channel::<CompletionJob>(1);
    let events = input.events;
    let (tools_tx, tools) = match &events {
        Some(_) => {
            let (t, r) = mpsc::unbounded_channel();
            (Some(t), Some(r))
        }
        None => (None, None),
    };
    let done = wf.pool.submit(Call::Ask(call), Some(tx), tools_tx, input.cancel).map_err(AskError::Submit)?;
    Ok(Submitted {
        wf,
        uid: peer.uid,
        member: input.member,
        request_id: request_id.to_string(),
        params: input.params,
        timeout,
        completions,
        tools,
        events,
        done,
    })
}

impl Submitted {
    /// Serves the ask's completions until its worker answers.
    pub async fn wait(self, broker: &Broker) -> Result<AskResult, AskError> {
        let _in_flight = super::InFlight::new(&broker.in_flight);
        let Submitted { wf, uid, member, request_id, params, timeout, completions, tools, events, done } = self;
        let llm = wf.policy.llm.as_ref().ok_or_else(|| GatewayError::NoLlm { workflow: wf.name.clone() })?;
        let request_id = request_id.as_str();
        let ctx = CallContext {
            request_id,
            workflow: &wf.name,
            tenant: wf.policy.tenant.as_str(),
            llm: Some(llm),
            uid: Some(uid),
            member: member.as_ref().map(|m| (m.name.as_str(), m.tokens_per_day)),
            params: &params,
        };
        collect(broker, &wf, llm, &ctx, timeout, completions, tools, events, done).await
    }
}

/// The loop of [`Submitted::wait`].
#[allow(clippy::too_many_arguments)]
async fn collect(
    broker: &Broker,
    wf: &Workflow,
    llm: &crate::policy::Llm,
    ctx: &CallContext<'_>,
    timeout: Duration,
    mut rx: mpsc::Receiver<CompletionJob>,
    mut tools_rx: Option<mpsc::UnboundedReceiver<CallEvent>>,
    events: Option<mpsc::UnboundedSender<AskEvent>>,
    mut done: tokio::sync::oneshot::Receiver<super::pool::CallResult>,
) -> Result<AskResult, AskError> {
    let gateway = &broker.gateway;
    let request_id = ctx.request_id;
    let send = |e: AskEvent| {
        if let Some(tx) = &events {
            let _ = tx.send(e);
        }
    };
    let deadline = tokio::time::Instant::now() + timeout + QUEUE_WAIT_MAX;
    let mut usage = Usage::default();
    let mut model_calls = 0u32;
    let mut last_error: Option<GatewayError> = None;
    let mut asking = true;
    let result = loop {
        tokio::select! {
            // A tool's result was sent before the next step's request.
            biased;
            Some(event) = async { tools_rx.as_mut()?.recv().await } => {
                if let CallEvent::Tool(t) = event {
                    let r = &t.record;
                    send(AskEvent::ToolResult(ToolResultEvent {
                        step: t.step,
                        id: t.call_id,
                        report: ToolCallReport {
                            tool: r.tool.clone(),
                            argv: r.argv.clone(),
                            exit_code: r.exit_code,
                            signal: r.signal,
                            duration_ms: r.duration_ms,
                            truncated: r.truncated,
                            timed_out: r.timed_out,
                            error: r.error.clone(),
                        },
                        result: t.result,
                    }));
                }
            }
            job = rx.recv(), if asking => {
                let Some(job) = job else {
                    asking = false; // the call is over; its answer follows
                    continue;
                };
                let step = job.request.step;
                let on_delta = |text: &str| send(AskEvent::Delta { step, content: text.to_string() });
                let deltas: Option<&Deltas<'_>> = if events.is_some() { Some(&on_delta) } else { None };
                let answer = gateway.complete(ctx, &job.request, deltas).await;
                model_calls += 1;
                let reply = match answer {
                    Ok(c) => {
                        usage.add(c.usage);
                        for call in &c.message.tool_calls {
                            send(AskEvent::ToolCall(ToolCallEvent {
                                step,
                                id: call.id.clone(),
                                name: call.name.clone(),
                                arguments: call.arguments.clone(),
                            }));
                        }
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
                return Err(AskError::Timeout { workflow: wf.name.clone(), after: timeout + QUEUE_WAIT_MAX });
            }
        }
    };
    let outcome = match result {
        Err(_) => return Err(AskError::Dropped),
        Ok(Err(e)) => return Err(AskError::Call(e)),
        Ok(Ok(Served { answer: Answer::Answered(outcome), egress, .. })) => (outcome, egress),
        Ok(Ok(Served { answer: Answer::Done(_), .. })) => return Err(AskError::WrongAnswer),
    };
    let (outcome, egress) = outcome;
    let egress = egress.as_ref().map(super::http::proxy::report);
    let now = utc::now();
    if let Some(report) = &egress {
        let call = super::ledger::CallRef {
            time: now,
            request_id,
            workflow: &wf.name,
            tenant: wf.policy.tenant.as_str(),
            kind: "ask",
        };
        if let Err(e) = gateway.ledger().record_egress(&call, report) {
            tracing::error!("{e}");
        }
    }
    for t in &outcome.transcript {
        if let Err(e) = gateway.ledger().record_tool_call(now, request_id, &wf.name, wf.policy.tenant.as_str(), t) {
            tracing::error!("{e}");
        }
    }
    if outcome.usage != usage {
        tracing::warn!(workflow = %wf.name, worker_usage = ?outcome.usage, broker_usage = ?usage,
            "the worker's token count differs from the broker's; reporting the broker's");
    }
    if outcome.stop == AskStop::Cancelled {
        return Err(AskError::Cancelled);
    }
    if let AskStop::Failed(text) = &outcome.stop {
        return Err(match last_error {
            Some(e) => AskError::Gateway(e),
            None => AskError::Failed(text.clone()),
        });
    }
    tracing::info!(workflow = %wf.name, steps = outcome.steps, tool_calls = outcome.transcript.len(),
        total_tokens = usage.total_tokens, stop = ?outcome.stop, "ask done");
    Ok(AskResult { workflow: wf.name.clone(), model: llm.model.clone(), outcome, usage, model_calls, egress })
}
