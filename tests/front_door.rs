//! The front door under hostile local users: slow and greedy clients of
//! another uid (half-sent heads and bodies, idle keep-alives, a huge
//! declared length) while a neighbour is served; 411/413 and the one JSON
//! error shape for malformed requests; fuzzed bodies on every endpoint;
//! many calls at several concurrency levels, none lost, wrong or hung; the
//! drain after SIGTERM; and what an error or the log may show.
//!
//! `CORRAL_TEST_LOAD_CALLS` scales the load test (default 10,000 calls) and
//! `CORRAL_TEST_FUZZ_BODIES` the fuzzing (default 5,000 bodies per
//! endpoint), for slow guests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// "Did not hang": far above any normal answer, far below a test timeout.
const HANG: Duration = Duration::from_secs(60);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

// ---- raw connections as another uid ----------------------------------------

/// Opens `n` connections to `socket` as `user`, sends `payload` on each,
/// reports after a moment how each was answered, and holds them until
/// dropped.
const HELPER: &str = r#"
import json, socket, sys, time
path, n, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
socks, failed = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if payload:
            s.sendall(payload)
    except OSError:
        failed += 1
        continue
    socks.append(s)
time.sleep(float(sys.argv[4]))
answers, open_ = {}, 0
for s in socks:
    s.setblocking(False)
    data, closed = b"", False
    while True:
        try:
            chunk = s.recv(65536)
        except BlockingIOError:
            break
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    if data:
        code = data.split(b" ", 2)[1].decode()
        answers[code] = answers.get(code, 0) + 1
        if code != "200" and b"x-corral-request-id" not in data:
            answers["no_request_id"] = answers.get("no_request_id", 0) + 1
    if not closed:
        open_ += 1
print("HELPER " + json.dumps({"open": open_, "failed": failed, "answers": answers}), flush=True)
sys.stdin.read()
"#;

struct Attack {
    child: Child,
    stdin: Option<ChildStdin>,
    report: Value,
}

/// How long an attack waits for the broker's answers before it reports
/// (`CORRAL_TEST_ATTACK_SETTLE` seconds; longer on an emulated guest).
fn settle() -> String {
    std::env::var("CORRAL_TEST_ATTACK_SETTLE").unwrap_or_else(|_| "1.5".into())
}

impl Attack {
    fn start(user: &str, socket: &Path, n: usize, payload: &[u8]) -> Attack {
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new("runuser")
            .args([
                "-u",
                user,
                "--",
                "python3",
                "-c",
                HELPER,
                socket.to_str().unwrap(),
                &n.to_string(),
                &hex,
                &settle(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let report: Value = serde_json::from_str(line.strip_prefix("HELPER ").expect("helper report")).unwrap();
        eprintln!("{user} x{n}: {report}");
        Attack { child, stdin, report }
    }

    fn answered(&self, code: &str) -> u64 {
        self.report["answers"][code].as_u64().unwrap_or(0)
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `corral exec WORKFLOW -- echo TOKEN` as `user` (root when `None`), with
/// a hang guard; asserts it is served.
fn neighbour_served(b: &Broker, user: Option<&str>, workflow: &str, token: &str) {
    let started = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.arg(HANG.as_secs().to_string());
    if let Some(u) = user {
        cmd.args(["runuser", "-u", u, "--"]);
    }
    let out = cmd
        .args([BIN, "exec", workflow, "--", "echo", token])
        .env("CORRAL_SOCKET", &b.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{user:?} was not served by {workflow}: {out:?}\nlog:\n{}", b.log_text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{token}\n"));
    eprintln!("neighbour {user:?} served by {workflow} in {:?}", started.elapsed());
}

const CAP: u64 = 128; // conns_per_uid
const HALF_HEAD: &[u8] = b"POST /v1/exec HTTP/1.1\r\nHost: corral\r\nContent-Ty";

fn half_body(workflow_header: Option<&str>) -> Vec<u8> {
    let header = workflow_header.map(|w| format!("x-corral-workflow: {w}\r\n")).unwrap_or_default();
    format!(
        "POST /v1/exec HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json\r\n{header}\
         Content-Length: 8388608\r\n\r\n{{\"workflow\": \"homework\", \"argv\": [\"true\"], \"stdin\": \""
    )
    .into_bytes()
}

#[test]
fn a_hostile_uid_cannot_starve_its_neighbours() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("front-hostile", &shipped_policies());
    let pid = b.pid();
    neighbour_served(&b, Some("kid"), "homework", "before");
    let idle_rss = rss_kib(pid);

    // 1000 connections that say nothing: mallory gets her share, no more.
    let a = Attack::start("mallory", &b.socket, 1000, b"");
    assert!(a.report["open"].as_u64().unwrap() <= CAP, "{}", a.report);
    assert!(a.answered("429") + CAP >= 1000, "beyond its cap a uid is refused at once: {}", a.report);
    assert_eq!(a.answered("no_request_id"), 0, "{}", a.report);
    neighbour_served(&b, None, "shell-tools", "root-during-idle-conns");
    neighbour_served(&b, Some("alice"), "family-chat", "alice-during-idle-conns");
    drop(a);

    // 1000 half-sent request heads.
    let a = Attack::start("mallory", &b.socket, 1000, HALF_HEAD);
    assert!(a.report["open"].as_u64().unwrap() <= CAP, "{}", a.report);
    neighbour_served(&b, Some("kid"), "homework", "during-half-heads");
    drop(a);

    // 1000 stalled 8 MiB bodies from a uid that is no workflow's client:
    // refused before a byte of body is read.
    let a = Attack::start("mallory", &b.socket, 1000, &half_body(None));
    assert_eq!(a.answered("200"), 0, "{}", a.report);
    assert!(a.answered("403") >= 1 && a.answered("403") <= CAP, "{}", a.report);
    neighbour_served(&b, Some("kid"), "homework", "during-mallory-bodies");
    drop(a);

    // The same from alice, a client: her body budget (16 MiB) holds two;
    // every other is refused at once; kid is served, and the broker stays
    // small.
    let a = Attack::start("alice", &b.socket, 1000, &half_body(Some("homework")));
    let held = a.report["open"].as_u64().unwrap();
    assert!(held <= 2 + CAP, "{}", a.report);
    assert!(a.answered("429") >= 1000 - CAP, "{}", a.report);
    neighbour_served(&b, Some("kid"), "homework", "during-alice-bodies");
    let during = rss_kib(pid);
    eprintln!("broker RSS: idle {idle_rss} KiB, during 1000 half bodies {during} KiB");
    assert!(during < idle_rss + 64 * 1024, "RSS grew from {idle_rss} to {during} KiB");
    drop(a);

    // 1000 keep-alive connections left idle after one request each.
    let a = Attack::start("alice", &b.socket, 1000, b"GET /v1/status HTTP/1.1\r\nHost: corral\r\n\r\n");
    assert!(a.answered("200") <= CAP && a.answered("200") >= 1, "{}", a.report);
    assert!(a.answered("429") + CAP >= 1000, "{}", a.report);
    neighbour_served(&b, Some("kid"), "homework", "during-keepalives");
    drop(a);

    // A declared length of 99999999999 that then stalls: 413 at once.
    let a = Attack::start(
        "alice",
        &b.socket,
        1,
        b"POST /v1/exec HTTP/1.1\r\nHost: corral\r\nx-corral-workflow: homework\r\nContent-Length: 99999999999\r\n\r\n{",
    );
    assert_eq!(a.answered("413"), 1, "{}", a.report);
    drop(a);

    neighbour_served(&b, Some("kid"), "homework", "after");
    let after = rss_kib(pid);
    eprintln!("broker RSS after the attacks: {after} KiB");
    assert!(after < idle_rss + 32 * 1024, "RSS {after} KiB stayed far above {idle_rss} KiB");
}

// ---- one raw HTTP exchange ---------------------------------------------------

struct Raw {
    status: u16,
    head: String,
    body: Value,
}

fn read_answer(s: &mut UnixStream) -> Raw {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert_eq!(n, 1, "connection closed before an answer; got {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    Raw { status, head, body: serde_json::from_slice(&body).unwrap_or(Value::Null) }
}

fn raw(b: &Broker, request: &[u8]) -> Raw {
    let mut s = UnixStream::connect(&b.socket).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    s.write_all(request).unwrap();
    read_answer(&mut s)
}

/// The one error shape: status, code, a message, the request id in body
/// and header.
fn assert_error(r: &Raw, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}\n{}", r.head, r.body);
    assert_eq!(r.body["error"]["code"], code, "{}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().len() > 10, "{}", r.body);
    let id = r.body["error"]["request_id"].as_str().unwrap();
    assert!(r.head.to_ascii_lowercase().contains(&format!("x-corral-request-id: {id}")), "{}", r.head);
}

#[test]
fn malformed_requests_get_the_json_error() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("front-malformed", &[policy("fd", "fd", None, "", "", "min_idle = 1\nmax_workers = 1")]);
    // A head that stalls half way: 408 after the head timeout (10 s).
    let slow = {
        let socket = b.socket.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            s.write_all(HALF_HEAD).unwrap();
            let started = Instant::now();
            (read_answer(&mut s), started.elapsed())
        })
    };

    // A keep-alive connection left idle after its answer: closed after the
    // idle timeout (30 s), with no answer owed.
    let idle = {
        let socket = b.socket.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n").unwrap();
            assert_eq!(read_answer(&mut s).status, 200);
            let started = Instant::now();
            let mut rest = Vec::new();
            let n = s.read_to_end(&mut rest).expect("the idle connection was not closed");
            (n, started.elapsed())
        })
    };
    let body = br#"{"workflow": "fd", "argv": ["echo", "ok"]}"#;
    // Neighbour: a well-formed request.
    let ok = raw(
        &b,
        &[format!("POST /v1/exec HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body]
            .concat(),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["stdout"], "ok\n");

    // No length: 411, chunked or absent.
    let r =
        raw(&b, b"POST /v1/exec HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n");
    assert_error(&r, 411, "length_required");
    let r = raw(&b, b"POST /v1/exec HTTP/1.1\r\nHost: c\r\n\r\n");
    assert_error(&r, 411, "length_required");
    // Above the cap: 413 before a byte of body.
    let r = raw(&b, b"POST /v1/exec HTTP/1.1\r\nHost: c\r\nContent-Length: 99999999999\r\n\r\n");
    assert_error(&r, 413, "too_large");
    // Bad JSON, wrong method, unknown path.
    let r = raw(&b, b"POST /v1/exec HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\n{nope");
    assert_error(&r, 400, "invalid_json");
    let r = raw(&b, b"DELETE /v1/status HTTP/1.1\r\nHost: c\r\n\r\n");
    assert_error(&r, 405, "method_not_allowed");
    let r = raw(&b, b"GET /etc/passwd HTTP/1.1\r\nHost: c\r\n\r\n");
    assert_error(&r, 404, "not_found");
    // Not HTTP at all, a bad header, a head too large: hyper's own
    // answers, in the same shape.
    let r = raw(&b, b"HELLO\r\n\r\n");
    assert_error(&r, 400, "bad_request");
    let r = raw(&b, b"GET /v1/status HTTP/1.1\r\nHost: c\r\nContent-Length: x1\r\n\r\n");
    assert_error(&r, 400, "bad_request");
    let big = format!("GET /v1/status HTTP/1.1\r\nHost: c\r\nX-Big: {}\r\n\r\n", "a".repeat(64 << 10));
    let r = raw(&b, big.as_bytes());
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.body["error"]["code"], "too_large", "{}", r.body);
    // The workflow header must match the body.
    let r = raw(
        &b,
        &[
            format!(
                "POST /v1/exec HTTP/1.1\r\nHost: c\r\nx-corral-workflow: other\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat(),
    );
    assert_error(&r, 404, "unknown_workflow");

    let (r, took) = slow.join().unwrap();
    assert_error(&r, 408, "timeout");
    assert!(took < HANG, "{took:?}");
    let (n, took) = idle.join().unwrap();
    assert_eq!(n, 0, "an idle connection gets no bytes, only its end");
    assert!(took >= Duration::from_secs(20) && took < HANG, "idle connection closed after {took:?}");
    // Still serving.
    assert_eq!(b.exec("fd", &["echo", "still"])["stdout"], "still\n");
}

#[test]
fn errors_and_logs_show_nothing_of_other_tenants() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("front-leaks", &shipped_policies());
    // kid may use homework only: a workflow that exists (family-chat) and
    // one that does not answer alike, and name no other workflow or file.
    let answer = |wf: &str| {
        let out = b.cli(Some("kid"), &["exec", wf, "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let exists = answer("family-chat");
    let absent = answer("no-such-thing");
    assert_eq!(exists.replace("family-chat", "X"), absent.replace("no-such-thing", "X"));
    assert!(exists.contains("[forbidden]") && exists.contains("homework"), "{exists}");
    for secret in ["shell-tools", ".toml", "policies"] {
        assert!(!exists.contains(secret), "{secret} leaked: {exists}");
    }
    // mallory, nobody's client, is refused before her body is read, and
    // learns of no workflow.
    let out = b.cli(Some("mallory"), &["exec", "homework", "--", "true"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("[forbidden]") && err.contains("none"), "{err}");
    // Root still learns which exist.
    let (code, r) = b.exec_body(&json!({"workflow": "nope", "argv": ["true"]}));
    assert_eq!(code, 404);
    assert!(r["error"]["message"].as_str().unwrap().contains("shell-tools"), "{r}");

    // A forged log line in argv[0] stays on its line.
    let forged = "FORGED-LINE corral: root session opened";
    let (code, _) = b.exec_body(&json!({"workflow": "homework", "argv": [format!("nosuch\n{forged}")]}));
    assert_eq!(code, 200);
    neighbour_served(&b, Some("kid"), "homework", "after-forgery");
    let log = b.log_text();
    assert!(log.contains("FORGED-LINE"), "the argv was not logged at all:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED-LINE")), "a forged line reached the log:\n{log}");
}

// ---- fuzzing -------------------------------------------------------------------

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "-",
    "1e999",
    "\\u0000",
    "\\ud800",
    "\u{0}",
    "\n",
    "é",
    "\"workflow\"",
    "\"argv\"",
    "\"stdin_base64\"",
    "\"messages\"",
    "\"role\"",
    "99999999999999999999",
];

fn fuzz_body(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = if b.is_empty() { 0 } else { rng.below(b.len()) };
        match rng.below(7) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 => b.insert(at, u8::try_from(rng.below(256)).unwrap()),
            2 => b.truncate(at),
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                b.splice(at..at, t.iter().copied());
            }
            4 => {
                let depth = 1 + rng.below(5000);
                b = [vec![b'['; depth], b.clone()].concat();
            }
            5 => {
                let junk: Vec<u8> = (0..rng.below(2048)).map(|_| u8::try_from(rng.below(256)).unwrap()).collect();
                b.splice(at..at, junk);
            }
            _ => {
                let end = (at + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
        }
    }
    b
}

#[test]
fn fuzzed_bodies_on_every_endpoint_then_a_neighbour_is_served() {
    if !full_sandbox() {
        return;
    }
    let mut nb = policy("nb", "nb", Some("corral-test"), "", "", "min_idle = 1\nmax_workers = 1");
    nb.text =
        nb.text.replace("clients = { users = [], groups = [] }", "clients = { users = [\"alice\"], groups = [] }");
    let b = Broker::start(
        "front-fuzz",
        &[policy("fz", "fz", None, "", "", "min_idle = 1\nmax_workers = 2\nqueue = 64"), nb],
    );
    let pid = b.pid();
    let before = rss_kib(pid);
    let seeds: [(&str, &str, &[u8]); 5] = [
        ("POST", "/v1/exec", br#"{"workflow": "fz", "argv": ["echo", "fz"], "stdin": "x", "timeout_ms": 2000}"#),
        (
            "POST",
            "/v1/ask",
            br#"{"workflow": "fz", "prompt": "hi", "conversation": [{"role": "user", "content": "a"}]}"#,
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"model": "fz", "messages": [{"role": "user", "content": "hi"}], "stream": true}"#,
        ),
        ("GET", "/v1/status", b""),
        ("GET", "/v1/usage?by=tenant&since=2025-01-01", b""),
    ];
    let count = env_count("CORRAL_TEST_FUZZ_BODIES", 5000) * seeds.len();
    let mut rng = Rng(0x00C0_FFEE_D15E_A5E5);
    let mut s = UnixStream::connect(&b.socket).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..count {
        let (method, path, seed) = seeds[i % seeds.len()];
        let body = fuzz_body(&mut rng, seed);
        let path = if method == "GET" && rng.below(2) == 0 {
            // Fuzz the query instead.
            let q: String = (0..rng.below(40)).map(|_| char::from(b"az09=&%?+._-"[rng.below(12)])).collect();
            format!("{}?{q}", path.split('?').next().unwrap())
        } else {
            path.to_string()
        };
        let head = format!("{method} {path} HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\n\r\n", body.len());
        if s.write_all(&[head.as_bytes(), &body].concat()).is_err() {
            s = UnixStream::connect(&b.socket).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            s.write_all(&[head.as_bytes(), &body].concat()).unwrap();
        }
        let r = read_answer(&mut s);
        *by_status.entry(r.status).or_default() += 1;
        assert!(r.status < 500 || r.status == 503, "fuzz case {i} on {path}: {}\n{}", r.head, r.body);
        if r.status >= 400 {
            let id = r.body["error"]["request_id"].as_str().unwrap_or_else(|| panic!("case {i}: {}", r.body));
            assert!(r.head.contains(id), "case {i}: {}", r.head);
        } else if !r.head.contains("text/event-stream") {
            assert!(!r.body.is_null(), "case {i}: a 2xx without JSON: {}", r.head);
        }
        if r.head.to_ascii_lowercase().contains("connection: close") {
            s = UnixStream::connect(&b.socket).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
        }
    }
    eprintln!("{count} fuzzed bodies ({} per endpoint): answers by status {by_status:?}", count / seeds.len());
    assert!(by_status.get(&400).copied().unwrap_or(0) > count / 4, "the fuzzer hardly fuzzed: {by_status:?}");
    neighbour_served(&b, Some("alice"), "nb", "after-fuzz");
    assert_eq!(b.exec("fz", &["echo", "alive"])["stdout"], "alive\n");
    // Give the trimmer its second, then compare.
    std::thread::sleep(Duration::from_millis(1500));
    let after = rss_kib(pid);
    eprintln!("broker RSS: {before} KiB before, {after} KiB after {count} fuzzed bodies");
    assert!(after < before + 32 * 1024, "RSS grew from {before} to {after} KiB");
}

// ---- load --------------------------------------------------------------------

#[test]
fn calls_at_concurrency_1_to_128_are_none_lost_wrong_or_hung() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "front-load",
        &[policy("load", "load", Some("corral-test"), "", "", "min_idle = 2\nmax_workers = 4\nqueue = 256")],
    );
    let total = env_count("CORRAL_TEST_LOAD_CALLS", 10_000);
    // CORRAL_TEST_LOAD_MAX_CONCURRENCY caps the levels (the guest: 64).
    let max = env_count("CORRAL_TEST_LOAD_MAX_CONCURRENCY", 128);
    let levels: Vec<usize> = [1usize, 8, 32, 128].into_iter().filter(|l| *l <= max).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for &level in &levels {
        let calls = total / levels.len();
        let started = Instant::now();
        let (ok, busy) = rt.block_on(load_level(&b.socket, level, calls));
        eprintln!("concurrency {level}: {calls} calls, {ok} ok, {busy} busy (429), in {:?}", started.elapsed());
        assert_eq!(ok + busy, calls);
        assert!(ok > 0, "no call at concurrency {level} was served");
    }
    assert_eq!(b.exec("load", &["echo", "after"])["stdout"], "after\n");
}

/// `calls` exec calls from `level` clients with a connection each; returns
/// (served, busy). Panics on a lost, wrong or hung answer.
async fn load_level(socket: &Path, level: usize, calls: usize) -> (usize, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..level {
        let next = Arc::clone(&next);
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut busy) = (0usize, 0usize);
            let mut conn: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>> =
                None;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= calls {
                    return (ok, busy);
                }
                let token = format!("call-{level}-{i}");
                if conn.as_mut().is_none_or(|c| c.is_closed()) {
                    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
                    let (sender, c) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
                    tokio::spawn(c);
                    conn = Some(sender);
                }
                let sender = conn.as_mut().unwrap();
                let body = json!({"workflow": "load", "argv": ["echo", &token]}).to_string();
                let req = hyper::Request::post("/v1/exec")
                    .header("host", "corral")
                    .header("x-corral-workflow", "load")
                    .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    .unwrap();
                let answer = tokio::time::timeout(HANG, async {
                    sender.ready().await?;
                    let resp = sender.send_request(req).await?;
                    let status = resp.status().as_u16();
                    let close = resp.headers().get("connection").is_some_and(|v| v == "close");
                    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
                    Ok::<_, hyper::Error>((status, close, bytes))
                })
                .await;
                let (status, close, bytes) = match answer {
                    Err(_) => panic!("call {token} hung"),
                    Ok(Err(e)) => panic!("call {token} lost: {e}"),
                    Ok(Ok(a)) => a,
                };
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                match status {
                    200 => {
                        assert_eq!(v["stdout"], format!("{token}\n"), "call {token} got another's answer: {v}");
                        ok += 1;
                    }
                    429 => {
                        assert_eq!(v["error"]["code"], "busy", "{v}");
                        busy += 1;
                    }
                    s => panic!("call {token}: {s} {v}"),
                }
                if close {
                    conn = None;
                }
            }
        }));
    }
    let mut sum = (0, 0);
    for t in tasks {
        let (ok, busy) = t.await.unwrap();
        sum.0 += ok;
        sum.1 += busy;
    }
    sum
}

// ---- drain -------------------------------------------------------------------

#[test]
fn draining_broker_answers_stopping_and_cut_calls_say_so() {
    if !full_sandbox() || skip_under_systemd("signals the broker process directly") {
        return;
    }
    let mut p = policy("dr", "dr", None, "", "", "min_idle = 2\nmax_workers = 2");
    p.text = p.text.replace("call_timeout = \"10s\"", "call_timeout = \"60s\"");
    let b = Broker::start("front-drain", &[p]);
    // One call outlives the drain (10 s), one ends within it.
    let long = {
        let socket = b.socket.clone();
        std::thread::spawn(move || {
            let body = json!({"workflow": "dr", "argv": ["sleep", "30"]}).to_string();
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            s.write_all(
                format!("POST /v1/exec HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
            )
            .unwrap();
            read_answer(&mut s)
        })
    };
    let short = {
        let socket = b.socket.clone();
        std::thread::spawn(move || {
            let body = json!({"workflow": "dr", "argv": ["sh", "-c", "sleep 1; echo done"]}).to_string();
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(HANG)).unwrap();
            s.write_all(
                format!("POST /v1/exec HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
            )
            .unwrap();
            read_answer(&mut s)
        })
    };
    let busy = poll(Duration::from_secs(10), || {
        let st = b.status();
        let n = st["workflows"][0]["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "busy").count();
        (n == 2).then_some(())
    });
    assert!(busy.is_some(), "the calls did not start");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(b.pid()).unwrap()), nix::sys::signal::SIGTERM)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = raw(&b, b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n");
    assert_error(&r, 503, "stopping");
    let s = short.join().unwrap();
    assert_eq!(s.status, 200, "a call that ends within the drain is answered: {}", s.body);
    assert_eq!(s.body["stdout"], "done\n");
    let l = long.join().unwrap();
    assert_error(&l, 503, "stopping");
}

// ---- usage -------------------------------------------------------------------

#[test]
fn usage_shows_each_caller_its_own_calls() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("a", 10, 1), answer("b", 20, 2)]);
    let mut p = llm_policy("shared", "fam", &stub.base_url(), "");
    p.text = p
        .text
        .replace("clients = { users = [], groups = [] }", "clients = { users = [\"alice\", \"kid\"], groups = [] }");
    let b = Broker::start("front-usage", &[p]);
    for user in ["alice", "kid"] {
        let out = b.cli(Some(user), &["ask", "shared", "hi"]);
        assert!(out.status.success(), "{out:?}");
    }
    let rows = |user: Option<&str>| -> Value {
        let out = b.cli(user, &["usage", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(rows(Some("alice"))[0]["total_tokens"], 11, "alice sees her own call only");
    assert_eq!(rows(Some("kid"))[0]["total_tokens"], 22, "kid sees his own call only");
    assert_eq!(rows(None)[0]["total_tokens"], 33, "root sees all");
    assert_eq!(rows(Some("mallory")).as_array().unwrap().len(), 0, "mallory made none");
    // doctor asks the broker through the same API, as its user.
    let out = b.cli(Some("kid"), &["doctor", "--policies", b.dir.join("policies").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("answers on") && text.contains("1 workflow(s) you may use"), "{text}");
    let out = b.cli(Some("mallory"), &["doctor", "--policies", b.dir.join("policies").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 workflow(s) you may use"), "{out:?}");
}

// ---- a client that does not read ----------------------------------------------

#[test]
fn a_client_that_never_reads_its_answer_is_dropped() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "front-unread",
        &[policy("ur", "ur", None, "", "output_max = \"4M\"", "min_idle = 1\nmax_workers = 2")],
    );
    // About 6 MB of JSON: far more than the socket buffers hold.
    let body = json!({"workflow": "ur", "argv": ["sh", "-c", "yes | head -c 4000000"]}).to_string();
    let mut s = UnixStream::connect(&b.socket).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    s.write_all(
        format!("POST /v1/exec HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .unwrap();
    // Never read for longer than the write timeout (30 s)…
    std::thread::sleep(Duration::from_secs(36));
    // …meanwhile others are served…
    assert_eq!(b.exec("ur", &["echo", "neighbour"])["stdout"], "neighbour\n");
    // …and the answer was cut: what the buffers held, then the end.
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("the answer began") + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("content-length");
    assert!(len > 4_000_000, "{head}");
    assert!(got.len() - head_end < len, "the whole answer was delivered to a client that did not read");
}
