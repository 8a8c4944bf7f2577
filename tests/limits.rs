//! Resource limits and failure handling: timeouts that reach daemonized
//! descendants, output caps, memory and process limits, dead, stuck and busy
//! workers. Each case pairs the abuse with a neighbour that must still work,
//! so a setup that refuses everything cannot pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// 1 MiB, the `output_max` of the flood tests.
const MIB: usize = 1 << 20;

/// A test policy with `line` replacing the harness default `default`
/// (e.g. `tasks_max = 64`), so no TOML key appears twice.
fn with(mut p: PolicyFile, default: &str, line: &str) -> PolicyFile {
    assert!(p.text.contains(default), "policy has no {default:?}:\n{}", p.text);
    p.text = p.text.replacen(default, line, 1);
    p
}

/// A test policy that may also read `path`.
fn allow_read(p: PolicyFile, path: &str) -> PolicyFile {
    with(p, "\"/dev/urandom\"", &format!("\"/dev/urandom\", \"{path}\""))
}

/// `POST /v1/exec` with a timeout: (status, reply).
fn exec_t(b: &Broker, wf: &str, argv: &[&str], timeout_ms: u64) -> (u16, Value) {
    b.exec_body(&json!({ "workflow": wf, "argv": argv, "timeout_ms": timeout_ms }))
}

/// One process on the host.
#[derive(Debug)]
struct Proc {
    pid: u32,
    uid: u32,
    cmdline: String,
}

/// Every process on the host (those that vanish while we look are skipped).
fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        // "Uid:\treal\teffective\tsaved\tfs"
        let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push(Proc { pid, uid, cmdline });
    }
    out
}

fn with_cmdline(needle: &str) -> Vec<Proc> {
    processes().into_iter().filter(|p| p.cmdline.contains(needle)).collect()
}

/// Waits until no process's command line contains `needle`; panics with the
/// survivors after `limit`.
fn assert_gone(needle: &str, limit: Duration) {
    let gone = poll(limit, || with_cmdline(needle).is_empty().then_some(()));
    assert!(gone.is_some(), "processes matching {needle:?} survived: {:#?}", with_cmdline(needle));
}

/// The status entry of `workflow`.
fn wf_status(b: &Broker, workflow: &str) -> Value {
    let st = b.status();
    st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == workflow).cloned().unwrap()
}

/// The first worker of `workflow` in `state`: (pid, worker status).
fn worker_in_state(b: &Broker, workflow: &str, state: &str) -> Option<(u32, Value)> {
    let w = wf_status(b, workflow);
    w["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == state && k["pid"].is_u64())
        .map(|k| (u32::try_from(k["pid"].as_u64().unwrap()).unwrap(), k.clone()))
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), sig).unwrap();
}

/// Whether `pid` exists at all (alive or zombie).
fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn timeout_kills_daemonized_grandchild() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("lim-timeout", &[policy("lim", "t", None, "", "", "")]);

    // Neighbour: a command within its time returns normally.
    let (code, ok) = exec_t(&b, "lim", &["sh", "-c", "sleep 0.1; echo fine"], 2000);
    assert_eq!(code, 200, "{ok:#}");
    assert_eq!(ok["timed_out"], false, "{ok:#}");
    assert_eq!(exit_code(&ok), Some(0), "{ok:#}");
    assert_eq!(stdout(&ok), "fine\n", "{ok:#}");

    // A grandchild that left the call's session and process group.
    let call = {
        let socket = b.socket.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let body = json!({
                "workflow": "lim",
                "argv": ["sh", "-c", "setsid sh -c \"sleep 77.7\" & sleep 30"],
                // Long enough for the daemon to start even on the
                // emulated CPUs of the Debian guest (shell start-up alone
                // took 350 ms of CPU there, and 500 ms came first).
                "timeout_ms": 3000,
            });
            let reply = raw_exec(&socket, &body);
            (reply, t.elapsed())
        })
    };
    // It really runs during the call (so "gone" below means killed).
    let seen = poll(Duration::from_secs(3), || {
        with_cmdline("sleep 77.7").into_iter().find(|p| p.cmdline.starts_with("sleep 77.7"))
    });
    let ((code, r), took) = call.join().unwrap();
    assert!(seen.is_some(), "the daemonized `sleep 77.7` never ran: {r:#}");
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(r["timed_out"], true, "{r:#}");
    assert_eq!(r["signal"], 9, "{r:#}");
    assert_eq!(r["signal_name"], "SIGKILL", "{r:#}");
    assert!(r["exit_code"].is_null(), "{r:#}");
    assert_eq!(r["receipt"]["ended_by"], "timeout", "{r:#}");
    assert!(took < Duration::from_secs(7), "a 3 s call took {took:?}");
    assert_gone("77.7", Duration::from_secs(2));

    // Without a timeout: the command exits, its daemon does not outlive it.
    let t = Instant::now();
    let (code, r) = exec_t(
        &b,
        "lim",
        &["sh", "-c", "setsid sleep 66.6 & until grep -q 66.6 /proc/$!/cmdline; do sleep 0.01; done; echo started"],
        5000,
    );
    let took = t.elapsed();
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert_eq!(stdout(&r), "started\n", "{r:#}");
    assert_eq!(r["timed_out"], false, "{r:#}");
    assert!(r["receipt"]["ended_by"].is_null(), "{r:#}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // Right after the answer, not eventually: the call ends with its tree.
    let left = with_cmdline("66.6");
    assert!(left.is_empty(), "daemonized sleep outlived its call: {left:#?}");
}

/// `POST /v1/exec` from any thread (the Broker itself stays on the test's).
fn raw_exec(socket: &std::path::Path, body: &Value) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, bytes) = rt
        .block_on(corral::client::request(socket, hyper::Method::POST, "/v1/exec", Some(body.to_string().into_bytes())))
        .unwrap();
    (status.as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[test]
fn output_flood_is_capped() {
    if !full_sandbox() {
        return;
    }
    let p = allow_read(policy("flood", "t", None, "", "output_max = \"1M\"", ""), "/dev/zero");
    let b = Broker::start("lim-flood", &[p]);

    // Neighbour: small output is whole.
    let r = b.exec("flood", &["echo", "hello"]);
    assert_eq!(stdout(&r), "hello\n", "{r:#}");
    assert_eq!(r["stdout_truncated"], false, "{r:#}");
    assert_eq!(r["truncated"], false, "{r:#}");

    // 20 MB of zero bytes: exactly 1 MiB kept, the writer is never blocked.
    let t = Instant::now();
    let r = b.exec("flood", &["head", "-c", "20000000", "/dev/zero"]);
    let took = t.elapsed();
    assert_eq!(exit_code(&r), Some(0), "{}", stderr(&r));
    let out = stdout(&r);
    assert_eq!(out.len(), MIB, "stdout length");
    assert!(out.bytes().all(|c| c == 0), "stdout is not all zero bytes");
    assert!(r["stdout_base64"].is_null(), "zero bytes are valid UTF-8");
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr_truncated"], false);
    assert_eq!(r["truncated"], true);
    assert_eq!(r["timed_out"], false);
    // The cap cut the output; it did not end the call.
    assert!(r["receipt"]["ended_by"].is_null(), "{r:#}");
    assert_eq!(r["receipt"]["limits_reached"], json!(["output_max"]), "{r:#}");
    assert!(took < Duration::from_secs(5), "20 MB flood took {took:?}");

    // Endless output: the timeout ends it, the cap holds.
    let (code, r) = exec_t(&b, "flood", &["yes"], 1000);
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["signal"], 9);
    assert_eq!(stdout(&r).len(), MIB);
    assert!(stdout(&r).starts_with("y\ny\n"));
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["truncated"], true);
    assert_eq!(r["receipt"]["ended_by"], "timeout", "{r:#}");
    assert_eq!(r["receipt"]["limits_reached"], json!(["timeout", "output_max"]), "{r:#}");

    // stderr has its own cap, independent of stdout.
    let r = b.sh("flood", "echo visible; head -c 3000000 /dev/zero >&2");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert_eq!(stdout(&r), "visible\n");
    assert_eq!(stderr(&r).len(), MIB);
    assert_eq!(r["stderr_truncated"], true);
    assert_eq!(r["stdout_truncated"], false);
    assert_eq!(r["truncated"], true);
}

#[test]
fn memory_hog_fails_alone() {
    if !full_sandbox() {
        return;
    }
    let p = with(policy("mem", "t", None, "", "", "max_workers = 1"), "memory_max = \"256M\"", "memory_max = \"256M\"");
    let b = Broker::start("lim-mem", &[p]);
    let before = b.worker_pids("mem");

    // Neighbour: 50 MiB fits under 256M.
    let r = b.exec("mem", &["python3", "-c", "b = bytearray(50 << 20); print(len(b))"]);
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert_eq!(stdout(&r), format!("{}\n", 50 << 20));
    assert!(r["receipt"]["ended_by"].is_null(), "{r:#}");
    let peak = r["receipt"]["memory_peak_bytes"].as_u64().unwrap_or(0);
    assert!(peak >= 50 << 20, "peak {peak} below the 50 MiB the tool filled: {r:#}");

    // 1 GiB does not.
    let r = b.exec("mem", &["python3", "-c", "b = bytearray(1 << 30)"]);
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    if b.is_unit() {
        // The scope's MemoryMax: the kernel's OOM killer ends the tool, and
        // the reply says which limit did it.
        assert_eq!(r["signal"], 9, "python should be OOM-killed: {r:#}");
        let limit = r["limit"].as_str().unwrap_or_default();
        assert!(limit.contains("memory_max 256M reached"), "{r:#}");
        assert_eq!(r["receipt"]["ended_by"], "memory_max", "{r:#}");
    } else {
        // RLIMIT_AS: the allocation fails inside python.
        assert!(r["exit_code"].is_i64(), "python should fail cleanly, not be killed: {r:#}");
        assert!(stderr(&r).contains("MemoryError"), "{r:#}");
        assert!(r["limit"].is_null(), "{r:#}");
        // The command ended on its own, with its error.
        assert!(r["receipt"]["ended_by"].is_null(), "{r:#}");
    }

    // The broker and the same worker carry on.
    let r = b.exec("mem", &["python3", "-c", "print('still here')"]);
    assert_eq!(stdout(&r), "still here\n", "{r:#}");
    assert_eq!(b.worker_pids("mem"), before, "the worker was replaced");
}

/// Nothing of a fork bomb is left (polled up to 3 s): only the workflow's
/// worker runs as `uid`.
fn assert_no_bomb_left(b: &Broker, uid: u32) {
    let workers = b.worker_host_pids("bomb");
    assert_eq!(workers.len(), 1, "{:#}", b.status());
    let survivors =
        || -> Vec<Proc> { processes().into_iter().filter(|p| p.uid == uid && !workers.contains(&p.pid)).collect() };
    let clean = poll(Duration::from_secs(3), || survivors().is_empty().then_some(()));
    assert!(clean.is_some(), "fork bomb survivors of uid {uid}: {:#?}", survivors());
}

#[test]
fn fork_bomb_is_contained() {
    if !full_sandbox() {
        return;
    }
    // Its own user: RLIMIT_NPROC counts per uid, so the bomb cannot starve
    // the workers of other tests (they run as other users).
    let p =
        with(policy("bomb", "t", Some("corral-test"), "", "", "max_workers = 1"), "tasks_max = 64", "tasks_max = 32");
    let b = Broker::start("lim-bomb", &[p]);
    let uid = nix::unistd::User::from_name("corral-test").unwrap().unwrap().uid.as_raw();

    // Neighbour: a few subprocesses are fine.
    let r = b.sh("bomb", "for i in 1 2 3 4 5; do (true) & done; wait; echo ok");
    assert_eq!(stdout(&r), "ok\n", "{r:#}");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");

    // The classic bomb: its top-level shell exits 0 at once (the bomb runs
    // in the background), and the end of the call kills what it left.
    let t = Instant::now();
    let (code, r) = exec_t(&b, "bomb", &["bash", "-c", ":(){ :|:& };:"], 2000);
    let took = t.elapsed();
    assert_eq!(code, 200, "{r:#}\nlog:\n{}", b.log_text());
    assert!(took < Duration::from_secs(5), "the bomb call took {took:?}");
    assert_no_bomb_left(&b, uid);

    // A bomb that keeps its call alive until the timeout: it runs into
    // RLIMIT_NPROC, the timeout ends the call, nothing survives.
    let t = Instant::now();
    let (code, r) = exec_t(&b, "bomb", &["bash", "-c", ":(){ :|:& };:; sleep 5"], 2000);
    let took = t.elapsed();
    assert_eq!(code, 200, "{r:#}\nlog:\n{}", b.log_text());
    assert!(r["timed_out"] == true || exit_code(&r).is_some_and(|c| c != 0), "{r:#}");
    assert!(stderr(&r).contains("Resource temporarily unavailable"), "the bomb never hit tasks_max: {r:#}");
    if b.is_unit() {
        // The scope's TasksMax refused the forks, and the reply says so.
        let limit = r["limit"].as_str().unwrap_or_default();
        assert!(limit.contains("tasks_max 32 reached"), "{r:#}");
        assert_eq!(r["receipt"]["ended_by"], "tasks_max", "{r:#}");
    }
    assert!(took < Duration::from_secs(6), "the bomb call took {took:?}");
    assert_no_bomb_left(&b, uid);

    // And the workflow still serves calls.
    let r = b.sh("bomb", "for i in 1 2 3 4 5; do (true) & done; wait; echo ok");
    assert_eq!(stdout(&r), "ok\n", "{r:#}");
}

#[test]
fn worker_killed_mid_call_is_reported_and_replaced() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("lim-kill", &[policy("victim", "t", None, "", "", "min_idle = 1\nmax_workers = 1")]);
    let call = {
        let socket = b.socket.clone();
        std::thread::spawn(move || raw_exec(&socket, &json!({ "workflow": "victim", "argv": ["sleep", "5"] })))
    };
    let (pid, _) = poll(Duration::from_secs(5), || worker_in_state(&b, "victim", "busy")).expect("worker never busy");
    signal(b.host_pid(pid), nix::sys::signal::Signal::SIGKILL);
    let (code, r) = call.join().unwrap();
    assert_eq!(code, 502, "{r:#}");
    assert_eq!(r["error"]["code"], "worker_died", "{r:#}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("signal 9 (SIGKILL)"), "{msg}");
    assert!(r["error"]["request_id"].is_string(), "{r:#}");

    // A replacement serves the next call.
    let ok = poll(Duration::from_secs(5), || {
        let (code, r) = exec_t(&b, "victim", &["echo", "back"], 2000);
        (code == 200).then_some(r)
    })
    .expect("no replacement worker");
    assert_eq!(stdout(&ok), "back\n", "{ok:#}");
    let (new_pid, k) = worker_in_state(&b, "victim", "idle").expect("no idle worker");
    assert_ne!(new_pid, pid, "{k:#}");
    assert!(k["restarts"].as_u64().unwrap() >= 1, "{k:#}");
    assert!(k["last_exit"].as_str().unwrap_or("").contains("SIGKILL"), "{k:#}");
}

#[test]
fn stuck_worker_is_killed_after_the_backstop() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("lim-stuck", &[policy("stuck", "t", None, "", "", "min_idle = 1\nmax_workers = 1")]);
    let call = {
        let socket = b.socket.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = raw_exec(&socket, &json!({ "workflow": "stuck", "argv": ["sleep", "5"], "timeout_ms": 300 }));
            (r, t.elapsed())
        })
    };
    let (ns_pid, _) = poll(Duration::from_secs(5), || worker_in_state(&b, "stuck", "busy")).expect("worker never busy");
    let pid = b.host_pid(ns_pid);
    // A stopped worker cannot enforce the call's own timeout: the broker
    // sees it stopped (within 250 ms) rather than wait for the 5 s backstop.
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let ((code, r), took) = call.join().unwrap();
    assert_eq!(code, 502, "{r:#}");
    assert_eq!(r["error"]["code"], "worker_died", "{r:#}");
    assert!(r["error"]["message"].as_str().unwrap().contains("stopped"), "{r:#}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}, not before the backstop");
    // The stopped worker was killed and reaped, not left behind.
    assert!(
        poll(Duration::from_secs(2), || (!pid_exists(pid)).then_some(())).is_some(),
        "stopped worker {pid} still exists"
    );

    let ok = poll(Duration::from_secs(5), || {
        let (code, r) = exec_t(&b, "stuck", &["echo", "back"], 2000);
        (code == 200).then_some(r)
    })
    .expect("no replacement worker");
    assert_eq!(stdout(&ok), "back\n", "{ok:#}");
    assert_ne!(b.worker_pids("stuck"), vec![ns_pid]);
}

#[test]
fn full_queue_answers_busy_at_once() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("lim-busy", &[policy("busy", "t", None, "", "", "min_idle = 1\nmax_workers = 1\nqueue = 1")]);
    let spawn_call = |argv: Value| {
        let socket = b.socket.clone();
        std::thread::spawn(move || raw_exec(&socket, &json!({ "workflow": "busy", "argv": argv })))
    };
    let first = spawn_call(json!(["sh", "-c", "sleep 2; echo first"]));
    poll(Duration::from_secs(5), || worker_in_state(&b, "busy", "busy")).expect("worker never busy");
    let second = spawn_call(json!(["echo", "second"]));
    poll(Duration::from_secs(5), || (wf_status(&b, "busy")["queue_depth"] == 1).then_some(()))
        .expect("second call never queued");

    let t = Instant::now();
    let (code, r) = b.exec_body(&json!({ "workflow": "busy", "argv": ["echo", "third"] }));
    let took = t.elapsed();
    assert_eq!(code, 429, "{r:#}");
    assert_eq!(r["error"]["code"], "busy", "{r:#}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("pool.max_workers") && msg.contains("pool.queue"), "{msg}");
    assert!(took < Duration::from_millis(500), "busy answer took {took:?}");

    let (code, r) = first.join().unwrap();
    assert_eq!((code, stdout(&r)), (200, "first\n"), "{r:#}");
    let (code, r) = second.join().unwrap();
    assert_eq!((code, stdout(&r)), (200, "second\n"), "{r:#}");
}
