//! Cancelling calls: a client that goes away, `DELETE /v1/calls/{id}` from
//! the same caller (and no one else), Ctrl-C on `corral exec`, and an ask
//! cut during its tool call. Each time the call's processes are gone at
//! once, the worker serves the next call, and the ledger says `cancelled`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Host PIDs of processes whose command line is `sleep SECS`.
fn sleeping(secs: &str) -> Vec<u32> {
    let want = format!("sleep {secs} ");
    host_processes().into_iter().filter(|(_, c)| *c == want).map(|(p, _)| p).collect()
}

/// Waits until a `sleep SECS` runs.
fn wait_started(b: &Broker, secs: &str) {
    poll(Duration::from_secs(20), || (!sleeping(secs).is_empty()).then_some(()))
        .unwrap_or_else(|| panic!("sleep {secs} never ran\nlog:\n{}", b.log_text()));
}

/// Waits until no `sleep SECS` is left; how long that took.
fn wait_gone(b: &Broker, secs: &str) -> Duration {
    let t = Instant::now();
    poll(Duration::from_secs(5), || sleeping(secs).is_empty().then_some(()))
        .unwrap_or_else(|| panic!("sleep {secs} outlived its cancelled call\nlog:\n{}", b.log_text()));
    t.elapsed()
}

/// Sends `body` to `path` from a thread of its own; the returned function
/// closes that client's connection (its call still running) and waits for it.
fn call_then_leave(b: &Broker, path: &'static str, body: Value) -> impl FnOnce() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let socket = b.socket.clone();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            tokio::select! {
                r = corral::client::request(&socket, hyper::Method::POST, path, Some(body.to_string().into_bytes())) => {
                    panic!("the call ended before its client went away: {r:?}")
                }
                _ = stopped => {}
            }
        });
    });
    move || {
        stop.send(()).unwrap();
        client.join().unwrap();
    }
}

fn for_clients(mut p: PolicyFile, users: &[&str]) -> PolicyFile {
    let list = users.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    p.text = p
        .text
        .replace("clients = { users = [], groups = [] }", &format!("clients = {{ users = [{list}], groups = [] }}"));
    p
}

/// One worker only: the call after a cancelled one must be served by the
/// same worker, which must therefore be free again.
fn single(name: &str) -> PolicyFile {
    let mut p = policy(name, "t", Some("corral-test"), "", "", "min_idle = 1\nmax_workers = 1\nqueue = 4");
    p.text = p.text.replace("call_timeout = \"10s\"", "call_timeout = \"60s\"");
    p
}

/// The outcomes the ledger recorded for `workflow`, oldest first.
fn outcomes(b: &Broker, workflow: &str, n: usize) -> Vec<String> {
    poll(Duration::from_secs(10), || {
        let rows: Vec<String> = b
            .ledger()
            .prepare("SELECT outcome FROM exec_calls WHERE workflow = ?1 ORDER BY id")
            .unwrap()
            .query_map([workflow], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (rows.len() >= n).then_some(rows)
    })
    .unwrap_or_else(|| panic!("fewer than {n} exec calls of {workflow} in the ledger"))
}

#[test]
fn a_client_that_goes_away_cancels_its_call_and_the_worker_serves_on() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("cancel-gone", &[single("w")]);
    let worker = b.worker_pids("w");
    let leave =
        call_then_leave(&b, "/v1/exec", json!({"workflow": "w", "argv": ["sh", "-c", "sleep 20.5; touch too-far"]}));
    wait_started(&b, "20.5");
    leave();
    let took = wait_gone(&b, "20.5");
    eprintln!("tool tree gone {took:?} after the client went away");
    assert_eq!(stdout(&b.exec("w", &["echo", "next"])), "next\n");
    assert_eq!(b.worker_pids("w"), worker, "the worker was replaced, not reused");
    assert!(!b.workspace("t", "w").join("too-far").exists());
    assert_eq!(outcomes(&b, "w", 2), ["cancelled", "ok"]);
}

#[test]
fn delete_cancels_a_call_of_ones_own_and_of_no_one_else() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("cancel-delete", &[for_clients(single("w"), &["alice", "kid"])]);
    // alice names her call so she can cancel it before its answer.
    let call = Command::new("runuser")
        .args(["-u", "alice", "--", "curl", "-s", "--unix-socket"])
        .arg(&b.socket)
        .args(["-H", "x-corral-call-id: job-1", "-d"])
        .arg(json!({"workflow": "w", "argv": ["sh", "-c", "echo started; sleep 20.25"]}).to_string())
        .arg("http://corral/v1/exec")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_started(&b, "20.25");
    let delete = |user: &str| {
        let out = Command::new("runuser")
            .args(["-u", user, "--", "curl", "-s", "-X", "DELETE", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&b.socket)
            .arg("http://corral/v1/calls/job-1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse::<u16>().unwrap(), body.to_string())
    };
    // Another client of the workflow, and a stranger: not theirs.
    for user in ["kid", "mallory"] {
        let (code, body) = delete(user);
        assert_eq!(code, 404, "{user}: {body}");
    }
    assert!(!sleeping("20.25").is_empty(), "someone else's DELETE cancelled alice's call");
    let (code, body) = delete("alice");
    assert_eq!(code, 200, "{body}");
    let took = wait_gone(&b, "20.25");
    eprintln!("tool tree gone {took:?} after DELETE");
    // alice's call answers at once, with what it had written.
    let out = call.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["cancelled"].as_bool(), r["signal"].as_i64()), (Some(true), Some(9)), "{r:#}");
    assert_eq!(stdout(&r), "started\n", "{r:#}");
    // Cancelled once is enough: the id is free again, the worker serves.
    assert_eq!(delete("alice").0, 404);
    assert_eq!(stdout(&b.exec("w", &["echo", "next"])), "next\n");
    assert_eq!(outcomes(&b, "w", 2), ["cancelled", "ok"]);
}

#[test]
fn ctrl_c_on_corral_exec_cancels_the_call() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("cancel-ctrl-c", &[single("w")]);
    let mut cli = Command::new(BIN)
        .args(["exec", "w", "--", "sleep", "20.75"])
        .env("CORRAL_SOCKET", &b.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_started(&b, "20.75");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(cli.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = cli.wait().unwrap();
    assert!(!status.success(), "{status:?}");
    let took = wait_gone(&b, "20.75");
    eprintln!("tool tree gone {took:?} after Ctrl-C");
    assert_eq!(stdout(&b.exec("w", &["echo", "next"])), "next\n");
}

#[test]
fn an_ask_cut_during_its_tool_call_kills_the_tool_and_asks_the_model_no_more() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![
        tool_call("c1", "shell", &json!({"command": "sleep 20.125"})),
        answer("should never be asked for", 1, 1),
    ]);
    let mut p = llm_policy("agent", "lab", &stub.base_url(), "");
    p.text = p.text.replace("call_timeout = \"10s\"", "call_timeout = \"60s\"");
    let b = Broker::start("cancel-ask", &[p]);
    let leave = call_then_leave(&b, "/v1/ask", json!({"workflow": "agent", "prompt": "wait"}));
    wait_started(&b, "20.125");
    leave();
    let took = wait_gone(&b, "20.125");
    eprintln!("the ask's tool gone {took:?} after its client went away");
    // The worker is free (it answers an exec), and the model heard no more.
    assert_eq!(stdout(&b.exec("agent", &["echo", "next"])), "next\n");
    assert_eq!(stub.received().len(), 1, "a model request after the cancel");
}
