//! `POST /v1/exec`: one command in a workflow's sandbox.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use base64::Engine;

use super::authorize::{resolve, Early};
use super::body::json;
use super::body::JsonBody;
use super::error::ApiError;
use super::error::{call_error, dropped, submit_error};
use super::{AppState, Caller};
use crate::api::{self, ExecBody, ExecReply};
use crate::broker::launcher::{signal_name, Answer, Call};
use crate::broker::ledger::ExecCall;
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
    let call = ExecRequest { id, request_id: request_id.clone(), argv: body.argv.clone(), stdin, timeout_ms };
    tracing::info!(workflow = %wf.name, argv0 = %Escaped(&body.argv[0]), "exec");
    let started = Instant::now();
    let record = |outcome: &str, done: Option<&ExecOutcome>, limit: Option<&String>| {
        broker.exec_log.record(ExecCall {
            time: utc::now(),
            request_id: request_id.clone(),
            workflow: wf.name.clone(),
            tenant: wf.policy.tenant.to_string(),
            uid: caller.peer.uid,
            argv: body.argv.clone(),
            outcome: outcome.to_string(),
            exit_code: done.and_then(|o| match o.termination {
                Termination::Exited(c) => Some(c),
                _ => None,
            }),
            signal: done.and_then(|o| match o.termination {
                Termination::Signaled(s) => Some(s),
                _ => None,
            }),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            stdout_bytes: done.map_or(0, |o| o.stdout.len() as u64),
            stderr_bytes: done.map_or(0, |o| o.stderr.len() as u64),
            timed_out: done.is_some_and(|o| o.timed_out),
            limit: limit.cloned(),
        });
    };
    let (worker, outcome, limit) = match run(&front, &wf, call, timeout_ms).await {
        Ok(done) => done,
        Err(e) => {
            record(e.code, None, None);
            return Err(e);
        }
    };
    let recorded = match (&limit, outcome.timed_out, outcome.termination) {
        (Some(_), _, _) => "limit",
        (None, true, _) => "timeout",
        (None, false, Termination::Exited(0)) => "ok",
        _ => "failed",
    };
    record(recorded, Some(&outcome), limit.as_ref());
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
        limit,
        sandbox_hint,
        wall_ms: ms(outcome.wall_us),
        cpu_user_ms: ms(outcome.cpu_user_us),
        cpu_system_ms: ms(outcome.cpu_system_us),
        peak_rss_kib: outcome.peak_rss_kib,
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
) -> Result<(u64, ExecOutcome, Option<String>), ApiError> {
    let broker = &front.broker;
    let rx = wf.pool.submit(Call::Exec(call), None).map_err(|e| submit_error(broker, e))?;
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
