//! What operators and OpenAI clients probe: `GET /v1/models`, `/healthz`,
//! `/metrics`, `/v1/openapi.json`, and every exec call in the ledger. Each
//! caller sees their own: alice never learns of kid's workflows, and the
//! metrics are for root and the `--metrics-group` only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// `GET path` as `user` (root when `None`), with curl over the socket:
/// (status, body).
fn get_as(b: &Broker, user: Option<&str>, path: &str) -> (u16, String) {
    let mut cmd = Command::new("timeout");
    cmd.arg("20");
    if let Some(u) = user {
        cmd.args(["runuser", "-u", u, "--"]);
    }
    let out = cmd
        .args(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&b.socket)
        .arg(format!("http://corral{path}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl as {user:?}: {out:?}"));
    (code.trim().parse().unwrap_or_else(|_| panic!("curl as {user:?}: {out:?}")), body.to_string())
}

fn models_of(b: &Broker, user: Option<&str>) -> Vec<String> {
    let (code, body) = get_as(b, user, "/v1/models");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list", "{v:#}");
    let mut ids: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!((m["object"].as_str(), m["owned_by"].as_str()), (Some("model"), Some("corral")), "{m:#}");
            m["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids
}

fn for_clients(mut p: PolicyFile, users: &[&str]) -> PolicyFile {
    let list = users.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    p.text = p
        .text
        .replace("clients = { users = [], groups = [] }", &format!("clients = {{ users = [{list}], groups = [] }}"));
    p
}

/// An LLM test policy whose workers run as `user` (tenants never share one).
fn llm_as(name: &str, tenant: &str, user: &str, base_url: &str) -> PolicyFile {
    let mut p = llm_policy(name, tenant, base_url, "");
    p.text = p.text.replace("user = \"corral-test\"", &format!("user = \"{user}\""));
    p
}

fn uid(name: &str) -> i64 {
    i64::from(nix::unistd::User::from_name(name).unwrap().unwrap().uid.as_raw())
}

#[test]
fn models_metrics_and_the_ledger_show_each_caller_their_own() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(Vec::new());
    let policies = [
        for_clients(llm_as("chatty", "alice", "corral-alice", &stub.base_url()), &["alice"]),
        for_clients(
            policy("tools", "alice", Some("corral-alice"), "", "", "min_idle = 1\nmax_workers = 2"),
            &["alice"],
        ),
        for_clients(llm_as("secret", "kid", "corral-kid", &stub.base_url()), &["kid"]),
    ];
    let opts = BrokerOptions { env: vec![("CORRAL_METRICS_GROUP".into(), "alice".into())], ..BrokerOptions::default() };
    let b = Broker::start_with("ops-models", &policies, opts);

    // Models: the chat workflows each caller may use, and no other.
    assert_eq!(models_of(&b, Some("alice")), ["chatty"]);
    assert_eq!(models_of(&b, Some("kid")), ["secret"]);
    assert_eq!(models_of(&b, None), ["chatty", "secret"]);
    assert!(models_of(&b, Some("mallory")).is_empty());
    let (code, body) = get_as(&b, Some("alice"), "/v1/models/secret");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("model_not_found") && !body.contains("kid"), "{body}");
    let (code, body) = get_as(&b, Some("kid"), "/v1/models/secret");
    assert_eq!((code, serde_json::from_str::<Value>(&body).unwrap()["id"].as_str()), (200, Some("secret")), "{body}");

    // Ready once every pool has a worker up.
    poll(Duration::from_secs(20), || (get_as(&b, None, "/healthz").0 == 200).then_some(()))
        .unwrap_or_else(|| panic!("never ready: {:?}", get_as(&b, None, "/healthz")));
    let (_, body) = get_as(&b, Some("mallory"), "/healthz");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "ready", "{body}");

    // Calls: one that succeeds, one that fails, one by alice herself.
    assert_eq!(stdout(&b.exec("tools", &["echo", "hi"])), "hi\n");
    assert_eq!(exit_code(&b.sh("tools", "exit 3")), Some(3));
    let out = b.cli(Some("alice"), &["exec", "tools", "--", "true"]);
    assert!(out.status.success(), "{out:?}");

    // Metrics: root and the metrics group read them; mallory may not.
    let (code, text) = get_as(&b, None, "/metrics");
    assert_eq!(code, 200, "{text}");
    for line in [
        "corral_calls_total{workflow=\"tools\",outcome=\"ok\"} 2",
        "corral_calls_total{workflow=\"tools\",outcome=\"failed\"} 1",
        "corral_call_duration_seconds_count{workflow=\"tools\"} 3",
        "corral_call_duration_seconds_bucket{workflow=\"tools\",le=\"+Inf\"} 3",
        "corral_queue_depth{workflow=\"tools\"} 0",
        "# TYPE corral_tokens_total counter",
        "# TYPE corral_limit_kills_total counter",
        "corral_worker_restarts_total{workflow=\"tools\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert!(text.contains("corral_workers{workflow=\"tools\",state=\"idle\"} "), "{text}");
    assert_eq!(get_as(&b, Some("alice"), "/metrics").0, 200);
    let (code, body) = get_as(&b, Some("mallory"), "/metrics");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("--metrics-group"), "{body}");

    // The ledger has every exec call, with who made it.
    let rows = poll(Duration::from_secs(10), || {
        let rows: Vec<(i64, String, String, Option<i64>)> = b
            .ledger()
            .prepare("SELECT uid, argv, outcome, exit_code FROM exec_calls WHERE workflow = 'tools' ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (rows.len() == 3).then_some(rows)
    })
    .expect("three exec calls in the ledger");
    assert_eq!(rows[0], (0, json!(["echo", "hi"]).to_string(), "ok".into(), Some(0)));
    assert_eq!((rows[1].2.as_str(), rows[1].3), ("failed", Some(3)));
    assert_eq!((rows[2].0, rows[2].2.as_str()), (uid("alice"), "ok"));

    // The API describes itself.
    let (code, body) = get_as(&b, Some("mallory"), "/v1/openapi.json");
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["paths"]["/v1/exec"]["post"].is_object(), "{doc:#}");
}

#[test]
fn healthz_names_a_broken_workflow_only_to_those_who_may_use_it() {
    if !full_sandbox() {
        return;
    }
    let policies = [
        for_clients(policy("ghost", "kid", Some("corral-no-such-user"), "", "", "min_idle = 1"), &["kid"]),
        for_clients(policy("tools", "alice", Some("corral-alice"), "", "", "min_idle = 1"), &["alice"]),
    ];
    let b = Broker::start("ops-health", &policies);
    let health = |user| {
        let (code, body) = get_as(&b, user, "/healthz");
        (code, serde_json::from_str::<Value>(&body).unwrap()["error"].clone())
    };
    let (code, e) = health(Some("kid"));
    assert_eq!((code, e["code"].as_str()), (503, Some("not_ready")), "{e:#}");
    let why = e["message"].as_str().unwrap();
    assert!(why.contains("ghost: ") && why.contains("corral-no-such-user"), "{why}");
    // alice learns that something is wrong, not what kid has.
    let (code, e) = health(Some("alice"));
    assert_eq!(code, 503, "{e:#}");
    let why = e["message"].as_str().unwrap();
    assert!(why.contains("1 workflow(s) you may not use"), "{why}");
    assert!(!why.contains("ghost") && !why.contains("kid"), "{why}");
    // And she is served all the same.
    let out = b.cli(Some("alice"), &["exec", "tools", "--", "echo", "served"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "served\n", "{out:?}");
}

#[test]
fn chat_parameters_reach_the_model_and_those_it_cannot_honour_are_refused() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("{\"ok\": true}", 3, 2), answer("plain", 1, 1)]);
    let b = Broker::start("ops-params", &[llm_policy("chat", "lab", &stub.base_url(), "")]);
    let chat = |extra: Value| {
        let mut body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b.http("POST", "/v1/chat/completions", Some(body.to_string().as_bytes()))
    };
    let (code, r) =
        chat(json!({"temperature": 0.2, "max_tokens": 64, "seed": 11, "response_format": {"type": "json_object"}}));
    assert_eq!(code, 200, "{r:#}");
    let sent = &stub.received()[0].body;
    assert_eq!(
        (&sent["temperature"], &sent["max_tokens"], &sent["seed"], &sent["response_format"]["type"]),
        (&json!(0.2), &json!(64), &json!(11), &json!("json_object")),
        "{sent:#}"
    );
    // Refused by name, before any model call or worker.
    for (extra, name) in [
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (json!({"n": 3}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"temperature": "warm"}), "temperature"),
        (json!({"temprature": 0.1}), "temprature"),
    ] {
        let (code, r) = chat(extra);
        assert_eq!((code, r["error"]["code"].as_str()), (400, Some("bad_request")), "{r:#}");
        assert!(r["error"]["message"].as_str().unwrap().contains(&format!("parameter {name} ")), "{r:#}");
    }
    assert_eq!(stub.received().len(), 1, "a refused request reached the model");
    // A plain request goes through, with nothing added.
    let (code, r) = chat(json!({}));
    assert_eq!((code, r["choices"][0]["message"]["content"].as_str()), (200, Some("plain")), "{r:#}");
    let sent = &stub.received()[1].body;
    assert!(sent.get("temperature").is_none_or(Value::is_null), "{sent:#}");
}
