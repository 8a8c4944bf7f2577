//! Fault injection: workers killed, stopped or crashing, and the broker
//! stopped with calls in flight. Every test also checks that the callers,
//! or a neighbouring workflow, are still served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), sig).unwrap();
}

fn workflow(st: &Value, name: &str) -> Value {
    st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap()
}

/// The PID (as seen here) of an idle worker of `name` other than `not`.
fn idle_worker(b: &Broker, name: &str, not: Option<u32>, limit: Duration) -> u32 {
    poll(limit, || {
        let wf = workflow(&b.status(), name);
        wf["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "idle")
            .filter_map(|w| w["pid"].as_u64())
            .filter_map(|p| host(b, u32::try_from(p).unwrap()))
            .find(|p| Some(*p) != not)
    })
    .unwrap_or_else(|| panic!("no new idle worker of {name}: {:#}\nlog:\n{}", b.status(), b.log_text()))
}

/// A PID the broker reported, as seen here; `None` when that process is
/// already gone (status may still show a worker just killed).
fn host(b: &Broker, pid: u32) -> Option<u32> {
    if b.is_unit() {
        host_pid(systemd_pid().unwrap(), pid)
    } else {
        Some(pid)
    }
}

fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('T')))
}

fn gone(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}

/// One worker at most, as homework has: a crash there stalls every call.
/// Each tenant its own user: below Landlock ABI 6 tenants may not share one.
fn single(name: &str, tenant: &str) -> PolicyFile {
    let user = if tenant == "t" { "corral-test" } else { "corral-worker" };
    policy(name, tenant, Some(user), "", "", "min_idle = 1\nmax_workers = 1\nqueue = 8")
}

#[test]
fn twenty_kills_of_an_idle_worker_never_lock_callers_out() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("faults-kills", &[single("solo", "t")]);
    let mut last = None;
    let started = Instant::now();
    for _ in 0..20 {
        let pid = idle_worker(&b, "solo", last, Duration::from_secs(10));
        signal(pid, Signal::SIGKILL);
        assert!(poll(Duration::from_secs(5), || gone(pid).then_some(())).is_some(), "{pid} survived SIGKILL");
        last = Some(pid);
    }
    // The next call is served within its own timeout: no 30 s backoff.
    let timeout_ms = 5000;
    let t = Instant::now();
    let (code, r) = b.exec_body(&json!({"workflow": "solo", "argv": ["echo", "served"], "timeout_ms": timeout_ms}));
    let took = t.elapsed();
    assert_eq!(code, 200, "{r:#}\nlog:\n{}", b.log_text());
    assert_eq!(stdout(&r), "served\n");
    assert!(took < Duration::from_millis(timeout_ms), "the call waited {took:?}");
    eprintln!("after 20 kills in {:?}: the next call answered in {took:?}", started.elapsed());
    // Outside kills are not the workflow's fault: no quarantine.
    let wf = workflow(&b.status(), "solo");
    assert!(wf["unavailable"].is_null(), "{wf:#}");
    assert!(wf["workers"][0]["restarts"].as_u64().unwrap() >= 20, "{wf:#}");
    assert!(wf["workers"][0]["last_exit"].as_str().unwrap().contains("signal 9"), "{wf:#}");
}

#[test]
fn a_stopped_worker_is_replaced_and_calls_get_an_answer_in_time() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("faults-stop", &[single("frozen", "t"), single("nb", "u")]);
    // Stopped while idle: the call goes to a fresh worker.
    let stopped = idle_worker(&b, "frozen", None, Duration::from_secs(10));
    signal(stopped, Signal::SIGSTOP);
    assert!(poll(Duration::from_secs(5), || is_stopped(stopped).then_some(())).is_some(), "{stopped} not stopped");
    let t = Instant::now();
    let (code, r) = b.exec_body(&json!({"workflow": "frozen", "argv": ["echo", "fresh"], "timeout_ms": 3000}));
    assert_eq!(code, 200, "{r:#}\nlog:\n{}", b.log_text());
    assert_eq!(stdout(&r), "fresh\n");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    assert!(poll(Duration::from_secs(5), || gone(stopped).then_some(())).is_some(), "the stopped worker lives on");
    assert_eq!(stdout(&b.exec("nb", &["echo", "neighbour"])), "neighbour\n");

    // Stopped during a call: a clear error well within the call's timeout.
    let busy = idle_worker(&b, "frozen", Some(stopped), Duration::from_secs(10));
    let socket = b.socket.clone();
    let call = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let body = json!({"workflow": "frozen", "argv": ["sleep", "3"], "timeout_ms": 8000}).to_string();
        let t = Instant::now();
        let (status, bytes) = rt
            .block_on(corral::client::request(&socket, hyper::Method::POST, "/v1/exec", Some(body.into_bytes())))
            .unwrap();
        (status.as_u16(), serde_json::from_slice::<Value>(&bytes).unwrap(), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    signal(busy, Signal::SIGSTOP);
    let (code, r, took) = call.join().unwrap();
    assert!(took < Duration::from_secs(8), "the stopped call took {took:?}: {r:#}");
    if code != 200 {
        assert_eq!(r["error"]["code"], "worker_died", "{r:#}");
        assert!(r["error"]["message"].as_str().unwrap().contains("stopped"), "{r:#}");
    }
    assert!(poll(Duration::from_secs(5), || gone(busy).then_some(())).is_some(), "the stopped worker lives on");
    let (code, r) = b.exec_body(&json!({"workflow": "frozen", "argv": ["echo", "again"], "timeout_ms": 3000}));
    assert_eq!((code, stdout(&r)), (200, "again\n"), "{r:#}");
    assert_eq!(stdout(&b.exec("nb", &["echo", "neighbour"])), "neighbour\n");
}

#[test]
fn an_operators_sigterm_ends_a_worker_and_it_is_replaced() {
    if !full_sandbox() {
        return;
    }
    // A worker is PID 1 of its own PID namespace, which the kernel shields
    // from signals it has no handler for: `kill WORKER` must still end it.
    let b = Broker::start("faults-term", &[single("solo", "t"), single("nb", "u")]);
    let pid = idle_worker(&b, "solo", None, Duration::from_secs(10));
    signal(pid, Signal::SIGTERM);
    assert!(poll(Duration::from_secs(5), || gone(pid).then_some(())).is_some(), "{pid} ignored SIGTERM");
    // Replaced at once, as an outside kill (not counted towards quarantine).
    let next = idle_worker(&b, "solo", Some(pid), Duration::from_secs(5));
    assert_ne!(next, pid);
    let wf = workflow(&b.status(), "solo");
    let last = wf["workers"][0]["last_exit"].as_str().unwrap_or_default().to_string();
    assert!(last.contains("SIGTERM"), "{wf:#}");
    assert!(wf["quarantined_until"].is_null(), "{wf:#}");
    assert_eq!(stdout(&b.exec("solo", &["echo", "back"])), "back\n");
    assert_eq!(stdout(&b.exec("nb", &["echo", "neighbour"])), "neighbour\n");
}

#[test]
fn a_crashing_workflow_is_quarantined_and_its_neighbour_is_served() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("faults-crash", &[single("crashy", "t"), single("nb", "u")]);
    // Five crashes (SIGABRT: the worker's own failure, not an outside kill).
    let mut last = None;
    for n in 1..=5 {
        let pid = idle_worker(&b, "crashy", last, Duration::from_secs(10));
        signal(pid, Signal::SIGABRT);
        last = Some(pid);
        if n == 4 {
            // Backing off (800 ms) with no worker up: a call that cannot
            // wait that long gets an error within its own timeout.
            poll(Duration::from_secs(5), || {
                (workflow(&b.status(), "crashy")["workers"][0]["state"] == "backoff").then_some(())
            })
            .expect("no backoff after 4 crashes");
            let t = Instant::now();
            let (code, r) = b.exec_body(&json!({"workflow": "crashy", "argv": ["true"], "timeout_ms": 100}));
            assert!(t.elapsed() < Duration::from_millis(700), "took {:?}: {r:#}", t.elapsed());
            assert_eq!((code, r["error"]["code"].as_str()), (503, Some("no_worker")), "{r:#}");
            let msg = r["error"]["message"].as_str().unwrap();
            assert!(msg.contains("no worker of crashy could start within") && msg.contains("SIGABRT"), "{msg}");
        }
    }
    let wf = poll(Duration::from_secs(10), || {
        let wf = workflow(&b.status(), "crashy");
        (!wf["quarantined_until"].is_null()).then_some(wf)
    })
    .unwrap_or_else(|| panic!("not quarantined: {:#}\nlog:\n{}", b.status(), b.log_text()));
    let why = wf["unavailable"].as_str().unwrap();
    assert!(why.contains("quarantined") && why.contains("5 times") && why.contains("SIGABRT"), "{why}");
    assert!(why.contains("SIGHUP") && why.contains(wf["quarantined_until"].as_str().unwrap()), "{why}");
    assert_eq!(wf["workers"][0]["state"], "quarantined", "{wf:#}");
    // Calls fail at once, saying why.
    let t = Instant::now();
    let (code, r) = b.exec_body(&json!({"workflow": "crashy", "argv": ["true"]}));
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!((code, r["error"]["code"].as_str()), (503, Some("quarantined")), "{r:#}");
    assert_eq!(r["error"]["message"], why, "{r:#}");
    // `corral status` says so too.
    let table = String::from_utf8_lossy(&b.cli(None, &["status"]).stdout).into_owned();
    assert!(table.contains("UNAVAILABLE: workflow crashy is quarantined"), "{table}");
    // The neighbour is served throughout.
    assert_eq!(stdout(&b.exec("nb", &["echo", "neighbour"])), "neighbour\n");
    // A reload lifts the quarantine: the workflow serves again.
    signal(b.pid(), Signal::SIGHUP);
    let pid = idle_worker(&b, "crashy", last, Duration::from_secs(10));
    assert!(!gone(pid));
    assert_eq!(stdout(&b.exec("crashy", &["echo", "back"])), "back\n");
    assert!(workflow(&b.status(), "crashy")["unavailable"].is_null());
}

/// `n` exec calls of `sleep secs` at once, each on its own thread:
/// (status, reply) per call; a lost connection is a panic in its thread.
fn calls_in_flight(b: &Broker, workflow: &str, n: usize, secs: &str) -> Vec<std::thread::JoinHandle<(u16, Value)>> {
    (0..n)
        .map(|i| {
            let socket = b.socket.clone();
            let body = json!({"workflow": workflow, "argv": ["sh", "-c", format!("sleep {secs}; echo call {i}")]});
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let (status, bytes) = rt
                    .block_on(corral::client::request(
                        &socket,
                        hyper::Method::POST,
                        "/v1/exec",
                        Some(body.to_string().into_bytes()),
                    ))
                    .unwrap_or_else(|e| panic!("call {i} lost its connection: {e}"));
                let reply = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("call {i}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
                (status.as_u16(), reply)
            })
        })
        .collect()
}

/// Waits until `n` workers of `workflow` are busy.
fn wait_busy(b: &Broker, workflow: &str, n: usize) {
    poll(Duration::from_secs(20), || {
        let wf = self::workflow(&b.status(), workflow);
        let busy = wf["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "busy").count();
        (busy >= n).then_some(())
    })
    .unwrap_or_else(|| panic!("{n} calls never ran at once: {:#}\nlog:\n{}", b.status(), b.log_text()));
}

fn wide(name: &str) -> PolicyFile {
    policy(name, "t", Some("corral-test"), "", "", "min_idle = 1\nmax_workers = 10\nqueue = 32")
}

#[test]
fn sigterm_lets_calls_in_flight_finish_and_a_new_broker_serves_after() {
    if !full_sandbox() {
        return;
    }
    let mut b = Broker::start("faults-drain", &[wide("busy")]);
    let calls = calls_in_flight(&b, "busy", 10, "4");
    wait_busy(&b, "busy", 10);
    let workers = b.worker_host_pids("busy");
    b.terminate();
    // While it drains, new calls get a 503 `stopping`, not a refused
    // connection. (Probe with status, which never queues: an exec sent
    // before the signal lands would wait behind the ten busy workers.)
    poll(Duration::from_secs(5), || (b.http("GET", "/v1/status", None).0 == 503).then_some(()))
        .unwrap_or_else(|| panic!("the broker did not start draining\nlog:\n{}", b.log_text()));
    let (code, r) = b.exec_body(&json!({"workflow": "busy", "argv": ["true"]}));
    assert_eq!((code, r["error"]["code"].as_str()), (503, Some("stopping")), "{r:#}");
    assert!(r["error"]["message"].as_str().unwrap().contains("retry"), "{r:#}");
    // Every call in flight gets its answer (the drain time is 10 s).
    for (i, c) in calls.into_iter().enumerate() {
        let (code, r) = c.join().unwrap();
        assert_eq!(code, 200, "call {i}: {r:#}");
        assert_eq!(stdout(&r), format!("call {i}\n"), "{r:#}");
    }
    assert!(b.wait_stopped(Duration::from_secs(20)), "the broker did not stop\nlog:\n{}", b.log_text());
    // No leftovers: its workers are gone, and so is the socket.
    for pid in workers {
        assert!(gone(pid), "worker {pid} outlived the broker");
    }
    assert!(std::os::unix::net::UnixStream::connect(&b.socket).is_err(), "the socket still answers");
    // A new broker on the same socket and state directory serves.
    b.start_again();
    assert_eq!(stdout(&b.exec("busy", &["echo", "after"])), "after\n");
}

#[test]
fn calls_still_running_when_the_drain_ends_get_a_stopping_error() {
    if !full_sandbox() {
        return;
    }
    let opts = BrokerOptions { env: vec![("CORRAL_DRAIN_TIMEOUT".into(), "1s".into())], ..BrokerOptions::default() };
    // Calls that outlast the drain by far: their own timeout must not end
    // them first (the harness's 10 s would, where workers start slowly).
    let mut slow = wide("slow");
    slow.text = slow.text.replace("call_timeout = \"10s\"", "call_timeout = \"60s\"");
    let mut b = Broker::start_with("faults-drain-end", &[slow], opts);
    // An unusual duration, to find leftovers by their command line.
    // Long enough that all five run at once even where workers start
    // slowly (an emulated guest).
    let calls = calls_in_flight(&b, "slow", 5, "27.25");
    wait_busy(&b, "slow", 5);
    let t = Instant::now();
    b.terminate();
    for (i, c) in calls.into_iter().enumerate() {
        let (code, r) = c.join().unwrap();
        assert_eq!((code, r["error"]["code"].as_str()), (503, Some("stopping")), "call {i}: {r:#}");
        assert!(r["error"]["message"].as_str().unwrap().contains("stopping"), "{r:#}");
    }
    // Cut at the 1 s drain, not run to their 27 s end.
    assert!(t.elapsed() < Duration::from_secs(20), "the drain took {:?}", t.elapsed());
    assert!(b.wait_stopped(Duration::from_secs(20)), "the broker did not stop\nlog:\n{}", b.log_text());
    // The calls cut short left nothing running.
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x0027.25\x00"))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(leftovers.is_empty(), "tool processes outlived the broker: {leftovers:?}");
    b.start_again();
    assert_eq!(stdout(&b.exec("slow", &["echo", "after"])), "after\n");
}
