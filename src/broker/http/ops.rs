//! For operators and the tools they run: `GET /healthz`, `GET /metrics`
//! (Prometheus text) and `GET /v1/openapi.json`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::error::ApiError;
use super::{AppState, Caller};
use crate::api::GroupBy;
use crate::broker::auth::describe_uid;
use crate::broker::pool::metrics::{Counters, DURATION_BUCKETS};
use crate::broker::pool::status::{PoolStatus, WorkerState};

/// The API's OpenAPI document, as kept in the repository.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Why a pool cannot serve now, if it cannot: unavailable, quarantined, or
/// no worker up yet where it keeps one.
fn not_ready(p: &PoolStatus) -> Option<String> {
    if let Some(why) = &p.unavailable {
        return Some(why.clone());
    }
    let up = p.workers.iter().any(|w| matches!(w.state, WorkerState::Idle | WorkerState::Busy));
    (p.min_idle > 0 && !up).then(|| "no worker is up yet (starting, or restarting after a failure)".to_string())
}

/// 200 when every pool is ready; else 503 with the reasons, named for the
/// workflows the caller may use and counted for the others.
pub(super) async fn healthz(State(front): State<AppState>, Extension(caller): Extension<Caller>) -> Response {
    let broker = &front.broker;
    let mut reasons = Vec::new();
    let mut others = 0;
    let mut ready = 0;
    for (wf, pool) in broker.pools() {
        let status = pool.status();
        match not_ready(&status) {
            None => ready += 1,
            Some(why) if wf.clients.allows(&caller.peer) => reasons.push(format!("{}: {why}", wf.name)),
            Some(_) => others += 1,
        }
    }
    if reasons.is_empty() && others == 0 {
        let body = serde_json::json!({ "status": "ready", "workflows": ready });
        return super::body::json(StatusCode::OK, &body);
    }
    if others > 0 {
        reasons.push(format!("{others} workflow(s) you may not use"));
    }
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("not ready: {}", reasons.join("; ")))
        .into_response()
}

/// Prometheus text exposition of every pool's counters and the ledger's
/// tokens; root, the broker's user and `--metrics-group` only.
pub(super) async fn metrics(
    State(front): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let broker = &front.broker;
    if !broker.may_read_metrics(&caller.peer) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "uid {} may not read the metrics: they are for root and the group the broker names with \
                 --metrics-group",
                describe_uid(caller.peer.uid)
            ),
        ));
    }
    let pools: Vec<(String, PoolStatus, Counters)> =
        broker.pools().into_iter().map(|(wf, p)| (wf.name.clone(), p.status(), p.call_counters())).collect();
    let tokens = super::status::ledger_usage(&front, 0, GroupBy::Workflow, None).await?;
    let tokens: Vec<(String, u64, u64)> =
        tokens.into_iter().map(|r| (r.key, r.prompt_tokens, r.completion_tokens)).collect();
    let mut resp = render(&pools, &tokens).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(resp)
}

pub(super) async fn openapi() -> Response {
    let mut resp = OPENAPI.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A label value, escaped as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The text exposition: pools as (name, status, counters), tokens as
/// (workflow, prompt, completion).
fn render(pools: &[(String, PoolStatus, Counters)], tokens: &[(String, u64, u64)]) -> String {
    let mut out = String::new();
    family(&mut out, "corral_calls_total", "counter", "Calls by workflow and outcome.");
    for (wf, _, c) in pools {
        for (outcome, n) in &c.calls {
            let _ =
                writeln!(out, "corral_calls_total{{workflow=\"{}\",outcome=\"{}\"}} {n}", label(wf), outcome.as_str());
        }
    }
    family(
        &mut out,
        "corral_call_duration_seconds",
        "histogram",
        "Time from a call's arrival to its answer, queue wait included.",
    );
    for (wf, _, c) in pools {
        let wf = label(wf);
        let mut cumulative = 0;
        for (bound, n) in DURATION_BUCKETS.iter().zip(c.duration_buckets) {
            cumulative += n;
            let _ =
                writeln!(out, "corral_call_duration_seconds_bucket{{workflow=\"{wf}\",le=\"{bound}\"}} {cumulative}");
        }
        let _ =
            writeln!(out, "corral_call_duration_seconds_bucket{{workflow=\"{wf}\",le=\"+Inf\"}} {}", c.duration_count);
        let _ = writeln!(out, "corral_call_duration_seconds_sum{{workflow=\"{wf}\"}} {}", c.duration_sum_s);
        let _ = writeln!(out, "corral_call_duration_seconds_count{{workflow=\"{wf}\"}} {}", c.duration_count);
    }
    family(&mut out, "corral_queue_depth", "gauge", "Calls waiting for a worker.");
    for (wf, s, _) in pools {
        let _ = writeln!(out, "corral_queue_depth{{workflow=\"{}\"}} {}", label(wf), s.queue_depth);
    }
    family(&mut out, "corral_workers", "gauge", "Worker slots by state.");
    let states =
        [WorkerState::Starting, WorkerState::Idle, WorkerState::Busy, WorkerState::Backoff, WorkerState::Quarantined];
    for (wf, s, _) in pools {
        for state in states {
            let n = s.workers.iter().filter(|w| w.state == state).count();
            let _ = writeln!(out, "corral_workers{{workflow=\"{}\",state=\"{}\"}} {n}", label(wf), state.as_str());
        }
    }
    family(
        &mut out,
        "corral_worker_restarts_total",
        "counter",
        "Worker starts after a worker ended or failed to start.",
    );
    for (wf, _, c) in pools {
        let _ = writeln!(out, "corral_worker_restarts_total{{workflow=\"{}\"}} {}", label(wf), c.restarts);
    }
    family(&mut out, "corral_limit_kills_total", "counter", "Calls ended by a limit, by limit.");
    for (wf, _, c) in pools {
        for (limit, n) in &c.kills {
            let _ = writeln!(out, "corral_limit_kills_total{{workflow=\"{}\",limit=\"{limit}\"}} {n}", label(wf));
        }
    }
    family(&mut out, "corral_tokens_total", "counter", "Model tokens in the ledger, by workflow and kind.");
    for (wf, prompt, completion) in tokens {
        let wf = label(wf);
        let _ = writeln!(out, "corral_tokens_total{{workflow=\"{wf}\",kind=\"prompt\"}} {prompt}");
        let _ = writeln!(out, "corral_tokens_total{{workflow=\"{wf}\",kind=\"completion\"}} {completion}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::pool::metrics::Outcome;
    use std::time::Duration;

    #[test]
    fn the_histogram_is_cumulative_and_labels_are_escaped() {
        let mut c = Counters::default();
        c.call(Outcome::Ok, Duration::from_micros(500));
        c.call(Outcome::Ok, Duration::from_millis(30));
        c.call(Outcome::Timeout, Duration::from_secs(100));
        c.kill("call_timeout");
        let text = render(&[("w\"x".into(), status(), c)], &[("w\"x".into(), 7, 3)]);
        assert!(text.contains("corral_calls_total{workflow=\"w\\\"x\",outcome=\"ok\"} 2"), "{text}");
        assert!(text.contains("le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("le=\"60\"} 2\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("corral_limit_kills_total{workflow=\"w\\\"x\",limit=\"call_timeout\"} 1"), "{text}");
        assert!(text.contains("corral_tokens_total{workflow=\"w\\\"x\",kind=\"prompt\"} 7"), "{text}");
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }

    fn status() -> PoolStatus {
        PoolStatus {
            workflow: "w".into(),
            tenant: "t".into(),
            user: None,
            workspace: String::new(),
            unavailable: None,
            quarantine: None,
            queue_depth: 0,
            queue_capacity: 1,
            min_idle: 1,
            max_workers: 1,
            enforcement: Vec::new(),
            workers: Vec::new(),
            disk: None,
        }
    }

    #[test]
    fn a_pool_without_a_worker_up_is_not_ready() {
        let mut s = status();
        assert!(not_ready(&s).is_some());
        s.min_idle = 0;
        assert!(not_ready(&s).is_none(), "a pool that keeps none idle starts on demand");
        s.unavailable = Some("quarantined".into());
        assert_eq!(not_ready(&s).as_deref(), Some("quarantined"));
    }
}
