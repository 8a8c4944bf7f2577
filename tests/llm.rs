//! The LLM gateway end to end: a real broker, real sandboxed workers, and a
//! scripted OpenAI-compatible server on 127.0.0.1 standing in for the
//! provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user).unwrap().unwrap().uid.as_raw()
}

/// The messages the stub received in request `i`.
fn messages(stub: &Stub, i: usize) -> Vec<Value> {
    stub.received()[i].body["messages"].as_array().unwrap().clone()
}

/// The content of the last tool message the stub received in request `i`.
fn last_tool_result(stub: &Stub, i: usize) -> String {
    messages(stub, i)
        .iter()
        .rev()
        .find(|m| m["role"] == "tool")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_else(|| panic!("no tool message in request {i}"))
        .to_string()
}

fn ok_reply(code: u16, reply: &Value, b: &Broker) {
    assert_eq!(code, 200, "{reply:#}\nlog:\n{}", b.log_text());
}

#[test]
fn plain_answer_with_non_ascii_and_no_key() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("Grüß dich 👋 — 日本語もOK", 12, 7)]);
    let b = Broker::start("llm-plain", &[llm_policy("chat", "lab", &stub.base_url(), "")]);
    let (code, r) = b.ask("chat", "Sag Hallo auf Deutsch 🇩🇪, bitte: «ç»");
    ok_reply(code, &r, &b);
    assert_eq!(r["answer"], "Grüß dich 👋 — 日本語もOK");
    assert_eq!(r["stopped"], "answer");
    assert_eq!(r["steps"], 1);
    assert_eq!(r["usage"]["prompt_tokens"], 12);
    assert_eq!(r["usage"]["completion_tokens"], 7);
    assert_eq!(r["usage"]["total_tokens"], 19);
    let got = stub.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/v1/chat/completions");
    assert_eq!(got[0].body["model"], "stub-model");
    let msgs = messages(&stub, 0);
    assert_eq!(msgs.last().unwrap()["content"], "Sag Hallo auf Deutsch 🇩🇪, bitte: «ç»");
    let tools: Vec<&str> =
        got[0].body["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(tools, ["shell", "read_file", "write_file", "list_dir"]);
    assert!(
        !got[0].headers.contains_key("authorization"),
        "no credential, no Authorization header: {:?}",
        got[0].headers
    );
    // The ledger row matches.
    let row: (String, String, String, i64, i64, i64, String) = b
        .ledger()
        .query_row(
            "SELECT request_id, workflow, tenant, prompt_tokens, completion_tokens, tries, outcome FROM model_calls",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    assert_eq!(
        row,
        (r["request_id"].as_str().unwrap().to_string(), "chat".into(), "lab".into(), 12, 7, 1, "ok".into())
    );
}

#[test]
fn tool_calls_run_in_the_sandbox_and_escapes_fail() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![
        tool_call("c1", "shell", &json!({"command": "id -u; echo hi > note.txt"})),
        tool_call("c2", "shell", &json!({"command": "cat /etc/shadow"})),
        tool_call("c3", "write_file", &json!({"path": "ünï 🎉.txt", "content": "Grüße 🎉\n"})),
        answer("done ✅", 20, 3),
    ]);
    let b = Broker::start("llm-tools", &[llm_policy("agent", "lab", &stub.base_url(), "")]);
    let (code, r) = b.ask("agent", "make a note");
    ok_reply(code, &r, &b);
    assert_eq!(r["answer"], "done ✅");
    assert_eq!(r["steps"], 4);

    // The shell call really ran, as the worker user, in the workspace.
    let uid = uid_of("corral-test");
    let first = last_tool_result(&stub, 1);
    assert!(first.starts_with("exit code 0"), "{first}");
    assert!(first.contains(&format!("{uid}\n")), "{first}");
    let ws = b.workspace("lab", "agent");
    let note = ws.join("note.txt");
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "hi\n");
    assert_eq!(std::fs::metadata(&note).unwrap().uid(), uid);

    // The escape was fed back to the model as a failure.
    let second = last_tool_result(&stub, 2);
    assert!(second.contains("Permission denied"), "{second}");
    assert!(!second.starts_with("exit code 0"), "{second}");
    assert!(!second.contains("root:"), "{second}");

    // write_file with a non-ASCII name and content.
    assert_eq!(std::fs::read_to_string(ws.join("ünï 🎉.txt")).unwrap(), "Grüße 🎉\n");

    // Transcript and ledger agree with what happened.
    let t = r["transcript"].as_array().unwrap();
    assert_eq!(t.len(), 3);
    assert_eq!(t[0]["argv"], json!(["sh", "-c", "id -u; echo hi > note.txt"]));
    assert_eq!(t[0]["exit_code"], 0);
    assert_eq!(t[1]["argv"], json!(["sh", "-c", "cat /etc/shadow"]));
    assert_ne!(t[1]["exit_code"], 0);
    assert_eq!(t[2]["tool"], "write_file");
    let ledger = b.ledger();
    let rows: Vec<(String, String, Option<i64>, i64)> = ledger
        .prepare("SELECT tool, argv, exit_code, truncated FROM tool_calls ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].0, "shell");
    assert_eq!(serde_json::from_str::<Value>(&rows[0].1).unwrap(), t[0]["argv"]);
    assert_eq!(rows[0].2, Some(0));
    assert_ne!(rows[1].2, Some(0));
    let (calls, tokens): (i64, i64) = ledger
        .query_row("SELECT COUNT(*), SUM(total_tokens) FROM model_calls WHERE outcome = 'ok'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((calls, tokens), (4, 3 * 15 + 23));
    assert_eq!(r["usage"]["total_tokens"], 3 * 15 + 23);

    // The request id travelled to the worker: its log lines carry it.
    let id = r["request_id"].as_str().unwrap();
    let log = b.log_text();
    assert!(
        log.lines().any(|l| l.contains("tool call") && l.contains(&format!("request_id={id}"))),
        "no worker tool-call line with request_id={id}:\n{log}"
    );
}

#[test]
fn max_steps_stops_the_loop() {
    if !full_sandbox() {
        return;
    }
    let stub =
        Stub::start(vec![tool_call("a", "shell", &json!({"command": "true"})), tool_call("b", "list_dir", &json!({}))]);
    let b = Broker::start("llm-steps", &[llm_policy("loop", "lab", &stub.base_url(), "max_steps = 2")]);
    let (code, r) = b.ask("loop", "loop forever");
    ok_reply(code, &r, &b);
    assert_eq!(r["stopped"], "max_steps");
    assert!(r["answer"].is_null(), "{r:#}");
    assert_eq!(r["steps"], 2);
    assert_eq!(r["transcript"].as_array().unwrap().len(), 2);
    assert_eq!(stub.received().len(), 2);
    // `corral ask` says so and exits 1.
    stub.push(tool_call("c", "shell", &json!({"command": "true"})));
    stub.push(tool_call("d", "shell", &json!({"command": "true"})));
    let out = b.cli(None, &["ask", "loop", "again"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no answer after 2 model calls"), "{out:?}");
}

#[test]
fn rate_limit_is_retried_after_retry_after() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![api_error(429, "slow down").header("Retry-After", "1"), answer("patient", 5, 5)]);
    let b = Broker::start("llm-429", &[llm_policy("rl", "lab", &stub.base_url(), "")]);
    let (code, r) = b.ask("rl", "hi");
    ok_reply(code, &r, &b);
    assert_eq!(r["answer"], "patient");
    let got = stub.received();
    assert_eq!(got.len(), 2, "retried once");
    let waited = got[1].at - got[0].at;
    assert!(waited >= Duration::from_secs(1), "waited only {waited:?}");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    let tries: i64 = b.ledger().query_row("SELECT tries FROM model_calls", [], |r| r.get(0)).unwrap();
    assert_eq!(tries, 2);
}

#[test]
fn server_error_is_retried_and_persistent_failure_is_explained() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![api_error(500, "oops"), answer("recovered", 1, 1)]);
    let b = Broker::start("llm-500", &[llm_policy("flaky", "lab", &stub.base_url(), "")]);
    let (code, r) = b.ask("flaky", "hi");
    ok_reply(code, &r, &b);
    assert_eq!(r["answer"], "recovered");
    assert_eq!(stub.received().len(), 2);
    // Down for good: bounded tries, then a clear error.
    for _ in 0..4 {
        stub.push(api_error(503, "maintenance"));
    }
    let (code, r) = b.ask("flaky", "hi");
    assert_eq!(code, 502, "{r:#}");
    assert_eq!(r["error"]["code"], "provider_down");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("503") && msg.contains("after 4 tries") && msg.contains("retry later"), "{msg}");
    assert_eq!(stub.received().len(), 2 + 4);
}

#[test]
fn slow_provider_times_out() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("too late", 1, 1).delayed(Duration::from_secs(4))]);
    let b = Broker::start("llm-slow", &[llm_policy("slow", "lab", &stub.base_url(), "timeout = \"1s\"")]);
    let started = Instant::now();
    let (code, r) = b.ask("slow", "hi");
    let took = started.elapsed();
    assert_eq!(code, 504, "{r:#}");
    assert_eq!(r["error"]["code"], "provider_timeout");
    assert!(r["error"]["message"].as_str().unwrap().contains("llm.timeout"), "{r:#}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(stub.received().len(), 1, "timeouts are not retried");
    let outcome: String = b.ledger().query_row("SELECT outcome FROM model_calls", [], |r| r.get(0)).unwrap();
    assert_eq!(outcome, "provider_timeout");
}

#[test]
fn malformed_answers_and_provider_errors_are_explained() {
    if !full_sandbox() {
        return;
    }
    let mut bad = answer("", 0, 0);
    bad.body = "{\"choices\": [oops".into();
    let stub =
        Stub::start(vec![bad, api_error(401, "invalid api key"), api_error(404, "model 'stub-model' not found")]);
    let b = Broker::start(
        "llm-bad",
        &[llm_policy("bad", "lab", &stub.base_url(), "credential = \"CORRAL_TEST_NO_SUCH_KEY\"")],
    );
    let (code, r) = b.ask("bad", "hi");
    assert_eq!(code, 502, "{r:#}");
    assert_eq!(r["error"]["code"], "bad_provider_response");
    assert!(r["error"]["message"].as_str().unwrap().contains("not a chat completion"), "{r:#}");
    let (code, r) = b.ask("bad", "hi");
    assert_eq!((code, r["error"]["code"].as_str()), (502, Some("provider_unauthorized")), "{r:#}");
    assert!(r["error"]["message"].as_str().unwrap().contains("CORRAL_TEST_NO_SUCH_KEY"), "{r:#}");
    let (code, r) = b.ask("bad", "hi");
    assert_eq!((code, r["error"]["code"].as_str()), (502, Some("model_not_found")), "{r:#}");
    assert!(r["error"]["message"].as_str().unwrap().contains("llm.model"), "{r:#}");
    assert_eq!(stub.received().len(), 3, "4xx and bad JSON are not retried");
}

#[test]
fn daily_budget_is_enforced_and_resets() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("first", 100, 50)]);
    let b = Broker::start("llm-budget", &[llm_policy("budget", "lab", &stub.base_url(), "daily_tokens = 100")]);
    let (code, r) = b.ask("budget", "hi");
    ok_reply(code, &r, &b);
    // 150 of 100 tokens used: the next call is refused before the provider.
    let (code, r) = b.ask("budget", "hi again");
    assert_eq!(code, 429, "{r:#}");
    assert_eq!(r["error"]["code"], "budget_exhausted");
    let now = corral::utc::now();
    let midnight = corral::utc::format(corral::utc::day_start(now) + corral::utc::DAY);
    assert_eq!(r["error"]["resets_at"], midnight.as_str());
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("150 of 100") && msg.contains(&midnight), "{msg}");
    assert_eq!(stub.received().len(), 1);
    // The next day: yesterday's rows no longer count.
    b.ledger().execute("UPDATE model_calls SET time = time - 86400", []).unwrap();
    stub.push(answer("a new day", 10, 10));
    let (code, r) = b.ask("budget", "hi");
    ok_reply(code, &r, &b);
    assert_eq!(r["answer"], "a new day");
}

#[test]
fn usage_sums_by_workflow_tenant_and_model() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("1", 10, 1), answer("2", 20, 2), answer("3", 30, 3)]);
    let mut two = llm_policy("two", "lab", &stub.base_url(), "");
    two.text = two.text.replace("model = \"stub-model\"", "model = \"other-model\"");
    let b = Broker::start("llm-usage", &[llm_policy("one", "lab", &stub.base_url(), ""), two]);
    for wf in ["one", "one", "two"] {
        let (code, r) = b.ask(wf, "count");
        ok_reply(code, &r, &b);
    }
    let state = b.state.to_str().unwrap().to_string();
    let table = |by: &str| {
        let out = b.cli(None, &["usage", "--state-dir", &state, "--by", by]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let cols = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row {key}:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let wf = table("workflow");
    assert_eq!(cols(&wf, "one"), ["one", "2", "0", "30", "3", "33"]);
    assert_eq!(cols(&wf, "two"), ["two", "1", "0", "30", "3", "33"]);
    assert_eq!(cols(&table("tenant"), "lab"), ["lab", "3", "0", "60", "6", "66"]);
    let model = table("model");
    assert_eq!(cols(&model, "stub-model")[5], "33");
    assert_eq!(cols(&model, "other-model")[5], "33");
    let today = corral::utc::format(corral::utc::now());
    let out = b.cli(None, &["usage", "--state-dir", &state, "--since", &today[..10], "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    let out = b.cli(None, &["usage", "--state-dir", &state, "--since", "2999-01-01", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn the_key_never_reaches_a_tool() {
    if !full_sandbox() {
        return;
    }
    let secret = format!("sk-corral-{}-{}", std::process::id(), corral::utc::now());
    let (half_a, half_b) = secret.split_at(secret.len() / 2);
    // The tool assembles the secret in a shell variable (never in an argv or
    // the environment, where it would find itself) and searches for it.
    // Errors go to the workspace: the sandbox may not open /dev/null for
    // writing.
    let script = format!(
        r#"A='{half_a}'; B='{half_b}'; P="$A$B"
c=$(env); case "$c" in *"$P"*) echo "FOUND in env";; esac
printf '%s\n' "$P" | grep -alF -f - /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>>"$HOME/scan.err" | sed 's/^/FOUND in /'
n=$(printf '%s\n' "$P" | grep -aLF -f - /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>>"$HOME/scan.err" | wc -l)
printf '%s\n' "$P" | grep -rlF -f - /etc /usr/local "$HOME" /tmp /var/tmp /run /dev/shm 2>>"$HOME/scan.err" | sed 's/^/FOUND in file /'
echo "scanned $n proc files""#
    );
    let stub = Stub::start(vec![tool_call("k1", "shell", &json!({"command": script})), answer("nothing found", 1, 1)]);
    let b = Broker::start_with(
        "llm-key",
        &[llm_policy("keyed", "lab", &stub.base_url(), "credential = \"CORRAL_TEST_API_KEY\"")],
        BrokerOptions { env: vec![("CORRAL_TEST_API_KEY".into(), secret.clone())], ..BrokerOptions::default() },
    );
    let (code, r) = b.ask("keyed", "look for the key");
    ok_reply(code, &r, &b);
    let got = stub.received();
    assert_eq!(
        got[0].headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {secret}").as_str()),
        "the provider got the key"
    );
    let result = last_tool_result(&stub, 1);
    assert!(result.contains("scanned"), "the search did not finish: {result}");
    let scanned: u32 =
        result.split("scanned ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(scanned >= 2, "the tool could read its own /proc files: {result}");
    assert!(!result.contains("FOUND"), "{result}");
    assert!(!result.contains(&secret), "{result}");
    assert!(!b.log_text().contains(&secret), "the key is in the broker's log");
}

#[test]
fn chat_completions_plain_and_streamed() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("Bonjour 🥐", 3, 2), answer("Streamed ✓", 4, 1)]);
    let b = Broker::start("llm-chat", &[llm_policy("chat", "lab", &stub.base_url(), "")]);
    let body = json!({"model": "chat", "temperature": 0.2, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Salut ?"}
    ]});
    let (code, r) = b.http("POST", "/v1/chat/completions", Some(body.to_string().as_bytes()));
    ok_reply(code, &r, &b);
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "chat");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], "Bonjour 🥐");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["total_tokens"], 5);
    let sent = messages(&stub, 0);
    assert_eq!(sent[0]["role"], "system");
    assert_eq!(sent[0]["content"], "Be brief.");
    assert_eq!(sent[1]["content"], "Salut ?");

    let body = json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": [{"type": "text", "text": "stream it"}]}]});
    let (code, bytes) = b.http_raw("POST", "/v1/chat/completions", body.to_string().as_bytes());
    assert_eq!(code, 200);
    let text = String::from_utf8(bytes).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not SSE: {text}")))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "Streamed ✓");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert_eq!(messages(&stub, 1).last().unwrap()["content"], "stream it");

    // Unknown workflow: the usual error.
    let body = json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]});
    let (code, r) = b.http("POST", "/v1/chat/completions", Some(body.to_string().as_bytes()));
    assert_eq!((code, r["error"]["code"].as_str()), (404, Some("unknown_workflow")));
}

#[test]
fn cli_ask_and_canary_exit_codes() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![
        answer("The answer is 42.", 1, 1),
        answer("The answer is 42.", 1, 1),
        answer("I don't know", 1, 1),
        answer("The answer is 42.", 1, 1).delayed(Duration::from_millis(1500)),
    ]);
    let b = Broker::start("llm-cli", &[llm_policy("cli", "lab", &stub.base_url(), "")]);
    let out = b.cli(None, &["ask", "cli", "what is 6×7?"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "The answer is 42.\n");
    let canary = |expect: &str, latency: &str| {
        b.cli(None, &["canary", "cli", "--prompt", "6×7?", "--expect", expect, "--max-latency", latency])
    };
    let ok = canary(r"\b42\b", "10s");
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let wrong = canary(r"\b42\b", "10s");
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not match"), "{err}");
    let late = canary(r"42", "1s");
    assert_eq!(late.status.code(), Some(1), "{late:?}");
    assert!(String::from_utf8_lossy(&late.stderr).contains("--max-latency"), "{late:?}");
    // A workflow that does not exist: also one line, also non-zero.
    let missing = b.cli(None, &["canary", "nope", "--prompt", "p", "--expect", "x"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no workflow named"), "{missing:?}");
    let out = b.cli(None, &["ask", "nope", "hi"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    // A pattern the matcher does not take (Unicode classes) says so, and
    // what it takes instead; nothing is asked.
    let unicode = canary(r"\p{L}+", "10s");
    assert_eq!(unicode.status.code(), Some(1), "{unicode:?}");
    let err = String::from_utf8_lossy(&unicode.stderr);
    assert!(err.contains("invalid --expect") && err.contains("no Unicode classes"), "{err}");
}

#[test]
fn tenant_budget_counts_every_workflow_of_the_tenant() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("spent", 100, 50)]);
    let b = Broker::start(
        "llm-tenant",
        &[
            llm_policy("big", "lab", &stub.base_url(), ""),
            llm_policy("small", "lab", &stub.base_url(), "tenant_daily_tokens = 100"),
        ],
    );
    let (code, r) = b.ask("big", "spend");
    ok_reply(code, &r, &b);
    let (code, r) = b.ask("small", "and now?");
    assert_eq!(code, 429, "{r:#}");
    assert_eq!(r["error"]["code"], "budget_exhausted");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("tenant lab") && msg.contains("tenant_daily_tokens"), "{msg}");
    assert_eq!(stub.received().len(), 1);
}

/// A fake OpenAI-compatible provider run as `user` (python3 under
/// runuser), so its listening socket belongs to that user. It prints its
/// port, then one JSON line per request: path, Authorization, body.
struct FakeProvider {
    child: std::process::Child,
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

const FAKE_PROVIDER: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', 0))).decode('utf-8', 'replace')
        print(json.dumps({"path": self.path, "auth": self.headers.get('Authorization'), "body": body}), flush=True)
        reply = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "answered by " + sys.argv[1]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

impl FakeProvider {
    fn start(user: &str, port: u16) -> FakeProvider {
        use std::io::BufRead;
        let mut child = std::process::Command::new("runuser")
            .args(["-u", user, "--", "python3", "-c", FAKE_PROVIDER, user, &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                shared.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
        });
        FakeProvider { child, port, seen }
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        // runuser waits for python; end both.
        let _ = std::process::Command::new("pkill").args(["-KILL", "-P", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_squatted_model_port_never_sees_the_prompt_or_the_key() {
    if !full_sandbox() {
        return;
    }
    // mallory binds the provider's port first.
    let squatter = FakeProvider::start("mallory", 0);
    let port = squatter.port;
    let url = format!("http://127.0.0.1:{port}/v1");
    let extra = "endpoint_user = \"alice\"\ncredential = \"TESTKEY\"";
    let opts = BrokerOptions { env: vec![("TESTKEY".into(), "sk-secret-of-alice".into())], ..Default::default() };
    let b = Broker::start_with("llm-squat", &[llm_policy("chat", "lab", &url, extra)], opts);
    let (code, r) = b.ask("chat", "alice's private question");
    assert_eq!(code, 502, "{r:#}");
    assert_eq!(r["error"]["code"], "provider_untrusted", "{r:#}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("is held by") && msg.contains("mallory") && msg.contains("alice"), "{msg}");
    assert!(msg.contains("nothing was sent"), "{msg}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(squatter.seen().is_empty(), "the squatter received: {:?}", squatter.seen());
    assert!(!b.log_text().contains("sk-secret-of-alice"), "the key reached the log");

    // The real provider (run by the expected user) on the same port, with
    // the same policy: the check is made again for this call, and passes.
    drop(squatter);
    let provider = FakeProvider::start("alice", port);
    let (code, r) = b.ask("chat", "alice's private question");
    assert_eq!(code, 200, "{r:#}\nlog:\n{}", b.log_text());
    assert_eq!(r["answer"], "answered by alice");
    let seen = provider.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["auth"], "Bearer sk-secret-of-alice");
    assert!(seen[0]["body"].as_str().unwrap().contains("alice's private question"), "{seen:?}");
}

#[test]
fn policy_check_refuses_a_squattable_endpoint_and_says_how_to_fix_it() {
    let dir = scratch_dir("llm-policy-check");
    let open = llm_policy("chat", "lab", "http://127.0.0.1:11434/v1", "endpoint_socket = \"\"");
    // endpoint_socket = "" is not absolute: replaced by the case under test.
    let text = open.text.replace("endpoint_socket = \"\"\n", "");
    std::fs::write(dir.join("chat.toml"), &text).unwrap();
    let out = std::process::Command::new(BIN).args(["policy", "check"]).arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("llm.base_url: 127.0.0.1:11434 is a port any local user can bind"), "{err}");
    assert!(err.contains("endpoint_user = \"ollama\""), "{err}");
    // With the provider's user named, the same file passes and the report
    // says what the broker checks.
    std::fs::write(dir.join("chat.toml"), text.replace("[llm]\n", "[llm]\nendpoint_user = \"mallory\"\n")).unwrap();
    let out = std::process::Command::new(BIN).args(["policy", "check"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("the listener must belong to user mallory"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
