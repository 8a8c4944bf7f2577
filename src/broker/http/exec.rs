//! `POST /v1/exec`: one command in a workflow's sandbox; with `"stream":
//! true` its output as NDJSON lines while it runs, the result last.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use base64::Engine;
use tokio::sync::oneshot;

use super::acting::{may_exec, Acting};
use super::authorize::{resolve, Early};
use super::body::json;
use super::body::JsonBody;
use super::calls::{call_id, Detached};
use super::error::ApiError;
use super::error::{call_error, dropped, submit_error};
use super::stream::{self, Render, Utf8Splitter};
use super::{AppState, Caller};
use crate::api::{self, ExecBody, ExecEvent, ExecReply};
use crate::broker::egress::EgressReceipt;
use crate::broker::launcher::{signal_name, Answer, Call, CallEvent};
use crate::broker::ledger::{ExecCall, ExecLog};
use crate::broker::log::Escaped;
use crate::broker::pool::{CallResult, Served, QUEUE_WAIT_MAX};
use crate::broker::InFlight;
use crate::broker::Workflow;
use crate::protocol::{ExecOutcome, ExecRequest, OutStream, Termination};
use crate::utc;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub(super) async fn exec(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(acting): Extension<Acting>,
    early: Option<Extension<Early>>,
    headers: HeaderMap,
    body: JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let broker = &front.broker;
    let body = &body.value;
    let wf = resolve(broker, &caller.peer, &acting, early, &body.workflow)?;
    may_exec(&acting)?;
    let _in_flight = InFlight::new(&broker.in_flight);
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(bad("argv is empty: give the command and its arguments, e.g. [\"ls\", \"-l\"]"));
    }
    if body.argv.iter().any(|a| a.contains('\0')) {
        return Err(bad("argv contains a NUL byte, which no command line can carry"));
    }
    let stdin = match (&body.stdin, &body.stdin_base64) {
        (Some(_), Some(_)) => return Err(bad("give either stdin or stdin_base64, not both")),
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad(format!("stdin_base64 is not valid base64: {e}")))?,
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
        Some(0) => return Err(bad("timeout_ms must be at least 1")),
        Some(t) if t > max_ms => {
            return Err(bad(format!(
                "timeout_ms {t} exceeds workflow {}'s call_timeout of {max_ms} ms; ask for less, or raise \
                 limits.call_timeout",
                wf.name
            )))
        }
        Some(t) => t,
    };
    let session = super::sessions::open(broker, &caller.peer, &acting, &wf, &headers, body.session.as_deref()).await?;
    let request_id = caller.request_id.to_string();
    let id = broker.next_call_id();
    let stream = body.stream;
    let receipt = wf.policy.limits.receipts;
    let call = ExecRequest {
        id,
        request_id: request_id.clone(),
        argv: body.argv.clone(),
        stdin,
        timeout_ms,
        stream,
        receipt,
        session_dir: session.as_ref().map(|s| s.dir.clone()),
    };
    tracing::info!(workflow = %wf.name, argv0 = %Escaped(&body.argv[0]), stream, "exec");
    let registered = broker.calls.register(&request_id, caller.peer.uid, call_id(&headers)?.as_deref())?;
    let row = ExecCall {
        time: utc::now(),
        request_id: request_id.clone(),
        workflow: wf.name.clone(),
        tenant: wf.policy.tenant.to_string(),
        uid: caller.peer.uid,
        member: acting.member_name().map(str::to_string),
        argv: body.argv.clone(),
        outcome: "cancelled".into(),
        session: session.map(|s| s.id.as_str().to_string()),
        ..ExecCall::default()
    };
    let started = Instant::now();
    // Held until the call's answer is written, or dropped with it. A
    // refusal is in the audit trail, with the limit.
    let held = match super::rates::admit(&front, &acting, &wf, false) {
        Ok(held) => held,
        Err(refused) => {
            let mut row = Row { log: &broker.exec_log, started, call: Some(row) };
            row.finish(refused.error.code, None, refused.limit.as_ref(), None);
            return Err(refused.error);
        }
    };
    let (events, streamed) = if stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let cancel = Arc::clone(&registered.cancel);
    let rx = match wf.pool.submit(Call::Exec(call), None, events, Some(cancel)) {
        Ok(rx) => rx,
        Err(e) => {
            let e = submit_error(broker, e);
            Row { log: &broker.exec_log, started, call: Some(row) }.finish(e.code, None, None, None);
            return Err(e);
        }
    };
    let registered = registered.detach(Arc::clone(broker));
    let argv0 = body.argv[0].clone();
    let done = answer(Arc::clone(&front), wf, argv0, request_id.clone(), timeout_ms, rx, row, started, registered);
    let done = async move {
        let _held = held;
        done.await
    };
    let Some(streamed) = streamed else {
        return done.await.map(|reply| json(StatusCode::OK, &reply));
    };
    // The output as it comes, then the result (or the error) as the last line.
    let mut splitters = [Utf8Splitter::default(), Utf8Splitter::default()];
    let render: Render<CallEvent> = Box::new(move |event| {
        let mut bytes = Vec::new();
        let mut put = |which: OutStream, chunk: Option<api::Chunk>| {
            if let Some(c) = chunk {
                bytes.extend(stream::line(&match which {
                    OutStream::Stdout => ExecEvent::Stdout(c),
                    OutStream::Stderr => ExecEvent::Stderr(c),
                }));
            }
        };
        match event {
            Some(CallEvent::Output(chunk)) => {
                let i = usize::from(chunk.stream == OutStream::Stderr);
                put(chunk.stream, splitters[i].push(&chunk.data));
            }
            Some(CallEvent::Tool(_)) => {}
            None => {
                put(OutStream::Stdout, splitters[0].finish());
                put(OutStream::Stderr, splitters[1].finish());
            }
        }
        bytes
    });
    let last = async move {
        match done.await {
            Ok(reply) => stream::line(&ExecEvent::Result(Box::new(reply))),
            Err(e) => stream::line(&ExecEvent::Error(e.reply(&request_id))),
        }
    };
    Ok(stream::response(stream::NDJSON, Vec::new(), streamed, render, last))
}

/// Waits for the worker's answer to a submitted call and makes the reply;
/// records the call in the ledger either way (as `cancelled` when this is
/// dropped first: the client went away).
#[allow(clippy::too_many_arguments)]
async fn answer(
    front: AppState,
    wf: Arc<Workflow>,
    argv0: String,
    request_id: String,
    timeout_ms: u64,
    rx: oneshot::Receiver<CallResult>,
    row: ExecCall,
    started: Instant,
    registered: Detached,
) -> Result<ExecReply, ApiError> {
    let broker = &front.broker;
    let _in_flight = InFlight::new(&broker.in_flight);
    let mut row = Row { log: &broker.exec_log, started, call: Some(row) };
    let (worker, outcome, limit, egress) = match run(&front, &wf, rx, timeout_ms).await {
        Ok(done) => done,
        Err(e) => {
            row.finish(e.code, None, None, None);
            return Err(e);
        }
    };
    drop(registered);
    let recorded = match (&limit, outcome.timed_out, outcome.cancelled, outcome.termination) {
        (Some(_), _, _, _) => "limit",
        (None, true, _, _) => "timeout",
        (None, false, true, _) => "cancelled",
        (None, false, false, Termination::Exited(0)) => "ok",
        _ => "failed",
    };
    let receipt = super::receipt::receipt(&outcome, limit.as_deref(), wf.pool.spec().tool.file_size_max);
    row.receipt(&receipt);
    let egress = egress.as_ref().map(super::proxy::report);
    row.finish(recorded, Some(&outcome), limit.as_ref(), egress.as_ref());
    let (exit_code, signal) = match outcome.termination {
        Termination::Exited(c) => (Some(c), None),
        Termination::Signaled(s) => (None, Some(s)),
        Termination::NotStarted => (None, None),
    };
    let sandbox_hint = sandbox_hint(&wf.pool, &argv0, &outcome);
    let (stdout, stdout_base64) = api::encode_bytes(&outcome.stdout);
    let (stderr, stderr_base64) = api::encode_bytes(&outcome.stderr);
    let ms = |us: u64| us as f64 / 1000.0;
    let reply = ExecReply {
        request_id,
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
        cancelled: outcome.cancelled,
        limit,
        sandbox_hint,
        egress,
        wall_ms: ms(outcome.wall_us),
        cpu_user_ms: ms(outcome.cpu_user_us),
        cpu_system_ms: ms(outcome.cpu_system_us),
        peak_rss_kib: outcome.peak_rss_kib,
        receipt: Some(receipt),
    };
    tracing::info!(workflow = %wf.name, worker, ?exit_code, ?signal, timed_out = reply.timed_out, wall_ms = reply.wall_ms, "exec done");
    Ok(reply)
}

/// Waits for the worker's answer to a queued call.
async fn run(
    front: &AppState,
    wf: &Workflow,
    rx: oneshot::Receiver<CallResult>,
    timeout_ms: u64,
) -> Result<(u64, ExecOutcome, Option<String>, Option<EgressReceipt>), ApiError> {
    let broker = &front.broker;
    let wait = Duration::from_millis(timeout_ms) + QUEUE_WAIT_MAX;
    let result = tokio::select! {
        r = tokio::time::timeout(wait, rx) => r.map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no worker of {} answered within {wait:?}; see `corral status` for its workers", wf.name),
            )
        })?,
        () = front.stopped() => return Err(ApiError::stopping()),
    };
    match result {
        Err(_) => Err(dropped(broker, "call")),
        Ok(Err(e)) => Err(call_error(broker, wf, e)),
        Ok(Ok(Served { worker, answer: Answer::Done(outcome), limit, egress })) => Ok((worker, outcome, limit, egress)),
        Ok(Ok(Served { answer: Answer::Answered(_), .. })) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the worker answered an exec with an ask result; retry it",
        )),
    }
}

/// The call's row in the ledger: written when it ends, or, when the client
/// went away first (the handler is dropped), as `cancelled`.
struct Row<'a> {
    log: &'a ExecLog,
    started: Instant,
    call: Option<ExecCall>,
}

impl Row<'_> {
    /// Copies the receipt's summary into the row.
    fn receipt(&mut self, r: &crate::api::Receipt) {
        let Some(call) = self.call.as_mut() else { return };
        call.ended_by.clone_from(&r.ended_by);
        if let Some(c) = &r.changes {
            (call.created, call.modified, call.deleted) =
                (Some(c.created_count), Some(c.modified_count), c.deleted_count);
        }
        call.memory_peak_bytes = r.memory_peak_bytes;
    }

    fn finish(
        &mut self,
        outcome: &str,
        done: Option<&ExecOutcome>,
        limit: Option<&String>,
        egress: Option<&api::EgressReport>,
    ) {
        let Some(mut call) = self.call.take() else { return };
        call.outcome = outcome.to_string();
        if let Some(o) = done {
            (call.exit_code, call.signal) = match o.termination {
                Termination::Exited(c) => (Some(c), None),
                Termination::Signaled(s) => (None, Some(s)),
                Termination::NotStarted => (None, None),
            };
            call.stdout_bytes = o.stdout.len() as u64;
            call.stderr_bytes = o.stderr.len() as u64;
            call.timed_out = o.timed_out;
        }
        call.limit = limit.cloned();
        call.egress = egress.cloned();
        call.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.log.record(call);
    }
}

impl Drop for Row<'_> {
    fn drop(&mut self) {
        if self.call.is_some() {
            self.finish("cancelled", None, None, None);
        }
    }
}

/// Which rule of the workflow's sandbox a failed call likely ran into (see
/// [`crate::sandbox::refusal`]); `None` for a call that succeeded.
fn sandbox_hint(pool: &crate::broker::pool::Pool, argv0: &str, outcome: &ExecOutcome) -> Option<String> {
    if matches!(outcome.termination, Termination::Exited(0)) {
        return None;
    }
    let spec = pool.spec();
    match (&outcome.termination, &outcome.error) {
        (Termination::NotStarted, Some(e)) => {
            // "cannot execute `./a`: Permission denied": name the file itself.
            let argv0 = Path::new(argv0);
            if argv0.components().count() < 2 && !argv0.is_absolute() {
                return None; // found through PATH: no path of its own to name
            }
            let line = format!("{}: {e}\n", spec.workspace.join(argv0).display());
            crate::sandbox::refusal::hint(spec, line.as_bytes(), true)
        }
        _ => crate::sandbox::refusal::hint(spec, &outcome.stderr, true),
    }
}
