//! `POST /v1/exec`: one command in a workflow's sandbox.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use base64::Engine;
use tokio::sync::Notify;

use super::authorize::{resolve, Early};
use super::body::json;
use super::body::JsonBody;
use super::calls::call_id;
use super::error::ApiError;
use super::error::{call_error, dropped, submit_error};
use super::{AppState, Caller};
use crate::api::{self, ExecBody, ExecReply};
use crate::broker::launcher::{signal_name, Answer, Call};
use crate::broker::ledger::{ExecCall, ExecLog};
use crate::broker::log::Escaped;
use crate::broker::pool::QUEUE_WAIT_MAX;
use crate::broker::InFlight;
use crate::broker::Workflow;
use crate::protocol::{ExecOutcome, ExecRequest, Termination};
use crate::utc;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub(super) async fn exec(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
    early: Option<Extension<Early>>,
    headers: HeaderMap,
    body: JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let broker = &front.broker;
    let body = &body.value;
    let wf = resolve(broker, &caller.peer, early, &body.workflow)?;
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
    let request_id = caller.request_id.to_string();
    let id = broker.next_call_id();
    let receipt = wf.policy.limits.receipts;
    let call = ExecRequest { id, request_id: request_id.clone(), argv: body.argv.clone(), stdin, timeout_ms, receipt };
    tracing::info!(workflow = %wf.name, argv0 = %Escaped(&body.argv[0]), "exec");
    let calls = &broker.calls;
    let registered = calls.register(&request_id, caller.peer.uid, call_id(&headers)?.as_deref())?;
    let mut row = Row {
        log: &broker.exec_log,
        started: Instant::now(),
        call: Some(ExecCall {
            time: utc::now(),
            request_id: request_id.clone(),
            workflow: wf.name.clone(),
            tenant: wf.policy.tenant.to_string(),
            uid: caller.peer.uid,
            argv: body.argv.clone(),
            outcome: "cancelled".into(),
            exit_code: None,
            signal: None,
            duration_ms: 0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            timed_out: false,
            limit: None,
            ended_by: None,
            created: None,
            modified: None,
            deleted: None,
            memory_peak_bytes: None,
        }),
    };
    let (worker, outcome, limit) = match run(&front, &wf, call, timeout_ms, Arc::clone(&registered.cancel)).await {
        Ok(done) => done,
        Err(e) => {
            row.finish(e.code, None, None);
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
    row.finish(recorded, Some(&outcome), limit.as_ref());
    let (exit_code, signal) = match outcome.termination {
        Termination::Exited(c) => (Some(c), None),
        Termination::Signaled(s) => (None, Some(s)),
        Termination::NotStarted => (None, None),
    };
    let sandbox_hint = sandbox_hint(&wf.pool, &body.argv[0], &outcome);
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
        wall_ms: ms(outcome.wall_us),
        cpu_user_ms: ms(outcome.cpu_user_us),
        cpu_system_ms: ms(outcome.cpu_system_us),
        peak_rss_kib: outcome.peak_rss_kib,
        receipt: Some(receipt),
    };
    tracing::info!(workflow = %wf.name, worker, ?exit_code, ?signal, timed_out = reply.timed_out, wall_ms = reply.wall_ms, "exec done");
    Ok(json(StatusCode::OK, &reply))
}

/// Queues the call and waits for its worker's answer.
async fn run(
    front: &AppState,
    wf: &Workflow,
    call: ExecRequest,
    timeout_ms: u64,
    cancel: Arc<Notify>,
) -> Result<(u64, ExecOutcome, Option<String>), ApiError> {
    let broker = &front.broker;
    let rx = wf.pool.submit(Call::Exec(call), None, Some(cancel)).map_err(|e| submit_error(broker, e))?;
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
        Ok(Ok((worker, Answer::Done(outcome), limit))) => Ok((worker, outcome, limit)),
        Ok(Ok((_, Answer::Answered(_), _))) => Err(ApiError::new(
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

    fn finish(&mut self, outcome: &str, done: Option<&ExecOutcome>, limit: Option<&String>) {
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
        call.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.log.record(call);
    }
}

impl Drop for Row<'_> {
    fn drop(&mut self) {
        if self.call.is_some() {
            self.finish("cancelled", None, None);
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
