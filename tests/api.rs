//! The client-facing surface: HTTP errors and their stable codes, the fields
//! of an exec result, the `corral` CLI as a command stand-in, who may call
//! which workflow, a kernel without Landlock, and a second broker on a live
//! socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One HTTP exchange with everything a test checks.
struct Answer {
    status: u16,
    request_id_header: Option<String>,
    body: Value,
}

/// A raw request over the broker socket that also returns the request-id
/// header (the harness `http` helper drops headers).
fn request(b: &Broker, method: &str, path: &str, body: Vec<u8>) -> Answer {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(&b.socket).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "corral")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let request_id_header =
            resp.headers().get(corral::api::REQUEST_ID_HEADER).map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, request_id_header, body }
    })
}

/// Asserts an error answer: status, code, a message, and the request id in
/// both the body and the header. Returns the message.
fn expect_error(a: &Answer, status: u16, code: &str) -> String {
    let body = &a.body;
    assert_eq!(a.status, status, "{body:#}");
    assert_eq!(body["error"]["code"], code, "{body:#}");
    let msg = body["error"]["message"].as_str().expect("error.message");
    assert!(msg.len() > 10, "message too short to help: {msg:?}");
    let id = body["error"]["request_id"].as_str().expect("error.request_id");
    assert!(!id.is_empty());
    assert_eq!(a.request_id_header.as_deref(), Some(id), "header and body request ids differ");
    msg.to_string()
}

fn exec_json(b: &Broker, body: &Value) -> Answer {
    request(b, "POST", "/v1/exec", body.to_string().into_bytes())
}

#[test]
fn http_errors_have_stable_codes() {
    if !full_sandbox() {
        return;
    }
    // Each workflow its own user, so its own tenant (a tenant is one user):
    // below Landlock ABI 6 the broker refuses required workflows that share
    // a user (their tools could signal each other).
    let b = Broker::start(
        "api-errors",
        &[
            policy("api", "t", None, "", "stdin_max = \"1K\"", ""),
            policy("other", "t2", Some("corral-test"), "", "", "min_idle = 0"),
        ],
    );

    // Neighbour: a good request, with the header too.
    let ok = exec_json(&b, &json!({ "workflow": "api", "argv": ["echo", "ok"] }));
    assert_eq!(ok.status, 200, "{:#}", ok.body);
    assert_eq!(ok.body["stdout"], "ok\n");
    assert_eq!(ok.request_id_header.as_deref(), ok.body["request_id"].as_str());
    let st = request(&b, "GET", "/v1/status", Vec::new());
    assert_eq!(st.status, 200);
    assert!(st.request_id_header.is_some());

    let a = request(&b, "POST", "/v1/exec", b"{not json".to_vec());
    expect_error(&a, 400, "invalid_json");

    let a = exec_json(&b, &json!({ "workflow": "api", "argv": ["true"], "bogus": 1 }));
    let msg = expect_error(&a, 400, "invalid_json");
    assert!(msg.contains("bogus"), "{msg}");

    let a = exec_json(&b, &json!({ "workflow": "api", "argv": [] }));
    expect_error(&a, 400, "bad_request");
    let a = exec_json(&b, &json!({ "workflow": "api", "argv": [""] }));
    expect_error(&a, 400, "bad_request");

    let a = exec_json(&b, &json!({ "workflow": "nope", "argv": ["true"] }));
    let msg = expect_error(&a, 404, "unknown_workflow");
    assert!(msg.contains("nope") && msg.contains("api") && msg.contains("other"), "{msg}");

    let a = request(&b, "GET", "/v2/whatever", Vec::new());
    expect_error(&a, 404, "not_found");

    let a = request(&b, "GET", "/v1/exec", Vec::new());
    expect_error(&a, 405, "method_not_allowed");

    // Over the 8 MiB body limit.
    let big = json!({ "workflow": "api", "argv": ["true"], "stdin": "x".repeat((8 << 20) + 16) });
    let a = exec_json(&b, &big);
    expect_error(&a, 413, "too_large");

    // stdin_max = 1K: 1024 bytes pass, 1025 do not.
    let a = exec_json(&b, &json!({ "workflow": "api", "argv": ["wc", "-c"], "stdin": "y".repeat(1024) }));
    assert_eq!(a.status, 200, "{:#}", a.body);
    assert_eq!(a.body["stdout"].as_str().unwrap().trim(), "1024");
    let a = exec_json(&b, &json!({ "workflow": "api", "argv": ["wc", "-c"], "stdin": "y".repeat(1025) }));
    let msg = expect_error(&a, 413, "too_large");
    assert!(msg.contains("stdin_max"), "{msg}");

    // call_timeout = 10s: 10000 ms is allowed, 10001 is not.
    let a = exec_json(&b, &json!({ "workflow": "api", "argv": ["true"], "timeout_ms": 10000 }));
    assert_eq!(a.status, 200, "{:#}", a.body);
    let a = exec_json(&b, &json!({ "workflow": "api", "argv": ["true"], "timeout_ms": 10001 }));
    let msg = expect_error(&a, 400, "bad_request");
    assert!(msg.contains("call_timeout"), "{msg}");

    // The broker is still fine.
    assert_eq!(b.exec("api", &["echo", "still"])["stdout"], "still\n");
}

#[test]
fn exec_reports_result_fields() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("api-fields", &[policy("f", "t", None, "", "", "")]);

    let r = b.exec("f", &["python3", "-c", "b = bytearray(20 << 20)"]);
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert!(r["signal"].is_null() && r["signal_name"].is_null() && r["error"].is_null(), "{r:#}");
    assert_eq!(r["workflow"], "f");
    assert!(r["worker"].as_u64().unwrap() >= 1, "{r:#}");
    assert!(r["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{r:#}");
    assert!(r["wall_ms"].as_f64().unwrap() > 0.0, "{r:#}");
    let cpu = r["cpu_user_ms"].as_f64().unwrap() + r["cpu_system_ms"].as_f64().unwrap();
    assert!(cpu > 0.0, "python used no CPU? {r:#}");
    assert!(r["peak_rss_kib"].as_u64().unwrap() >= 20000, "{r:#}");
    assert_eq!(r["timed_out"], false);
    assert_eq!(r["truncated"], false);

    let r = b.sh("f", "echo out; echo err >&2; exit 3");
    assert_eq!(exit_code(&r), Some(3), "{r:#}");
    assert_eq!(stdout(&r), "out\n");
    assert_eq!(stderr(&r), "err\n");
    assert!(r["signal"].is_null(), "{r:#}");

    let r = b.sh("f", "kill -TERM $$");
    assert!(r["exit_code"].is_null(), "{r:#}");
    assert_eq!(r["signal"], 15, "{r:#}");
    assert_eq!(r["signal_name"], "SIGTERM", "{r:#}");
    assert_eq!(r["timed_out"], false, "{r:#}");

    let r = b.exec("f", &["no-such-command-corral"]);
    assert!(r["exit_code"].is_null(), "{r:#}");
    assert!(r["signal"].is_null(), "{r:#}");
    let err = r["error"].as_str().expect("error set");
    assert!(err.contains("no-such-command-corral"), "{err}");

    // stdin as text.
    let (code, r) = b.exec_body(&json!({ "workflow": "f", "argv": ["cat"], "stdin": "line 1\nline 2\n" }));
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(stdout(&r), "line 1\nline 2\n");
    assert!(r["stdout_base64"].is_null());

    // stdin as bytes: every byte value, back as exact bytes.
    let bytes: Vec<u8> = (0..=255).collect();
    let (code, r) = b.exec_body(&json!({ "workflow": "f", "argv": ["cat"], "stdin_base64": B64.encode(&bytes) }));
    assert_eq!(code, 200, "{r:#}");
    let back = B64.decode(r["stdout_base64"].as_str().expect("non-UTF-8 stdout comes as base64")).unwrap();
    assert_eq!(back, bytes);
    assert!(stdout(&r).contains('\u{FFFD}'), "the text form is the lossy rendering");

    // Non-ASCII text round trips through argv and stdout as text.
    let text = "héllo ✓ 🦀";
    let r = b.sh("f", &format!("echo \"{text}\""));
    assert_eq!(stdout(&r), format!("{text}\n"));
    assert!(r["stdout_base64"].is_null(), "{r:#}");
    let r = b.exec("f", &["printf", "%s|", text, "ünï"]);
    assert_eq!(stdout(&r), format!("{text}|ünï|"));
}

/// `corral` run by hand, with piped stdin.
fn cli_stdin(b: &Broker, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("CORRAL_SOCKET", &b.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cli_behaves_like_the_command() {
    if !full_sandbox() {
        return;
    }
    // Each workflow its own user, so its own tenant (a tenant is one user):
    // below Landlock ABI 6 the broker refuses required workflows that share
    // a user (their tools could signal each other).
    let b = Broker::start(
        "api-cli",
        &[policy("cli", "t", None, "", "", ""), policy("spare", "t2", Some("corral-test"), "", "", "min_idle = 0")],
    );

    let out = b.cli(None, &["exec", "cli", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let out = b.cli(None, &["exec", "cli", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");

    let out = b.cli(None, &["exec", "cli", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143), "{out:?}");

    let t = Instant::now();
    let out = b.cli(None, &["exec", "--timeout-ms", "300", "cli", "--", "sleep", "5"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(text(&out.stderr).contains("timed out"), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());

    let out = b.cli(None, &["exec", "cli", "--", "no-such-command-corral"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(text(&out.stderr).contains("no-such-command-corral"), "{out:?}");

    let out = b.cli(None, &["exec", "--json", "cli", "--", "sh", "-c", "echo j; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let j: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(j["exit_code"], 7, "{j:#}");
    assert_eq!(j["stdout"], "j\n", "{j:#}");

    // Exact bytes out, also when they are not UTF-8.
    let out = b.cli(None, &["exec", "cli", "--", "printf", "\\377\\376"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, vec![255u8, 254]);

    // -i sends stdin: text, and arbitrary bytes.
    let out = cli_stdin(&b, &["exec", "-i", "cli", "--", "tr", "a-z", "A-Z"], b"shout\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "SHOUT\n");
    let bytes: Vec<u8> = (0..=255).rev().collect();
    let out = cli_stdin(&b, &["exec", "-i", "cli", "--", "cat"], &bytes);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, bytes);
    // Without -i the command's stdin is empty.
    let out = cli_stdin(&b, &["exec", "cli", "--", "wc", "-c"], b"ignored");
    assert_eq!(text(&out.stdout).trim(), "0", "{out:?}");

    // corral's own failures: 125 and a message.
    let out = b.cli(None, &["exec", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("[unknown_workflow]") && err.contains("nope"), "{err}");
    let out = Command::new(BIN)
        .args(["exec", "--socket", b.dir.join("absent.sock").to_str().unwrap(), "cli", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(text(&out.stderr).contains("is it running?"), "{out:?}");

    let out = b.cli(None, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = text(&out.stdout);
    for name in ["cli", "spare", "worker", "WORKFLOW"] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
    let out = b.cli(None, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let st: Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    let names: Vec<&str> = st["workflows"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cli", "spare"]);
    assert!(st["broker"]["pid"].as_u64().is_some(), "{st:#}");
}

#[test]
fn multi_tenant_clients_and_workspaces() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("api-tenants", &shipped_policies());

    // mallory is nobody's client.
    let out = b.cli(Some("mallory"), &["exec", "homework", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("(mallory) may not use workflow homework"), "{err}");
    assert!(err.contains("[forbidden]"), "{err}");

    // kid may use homework, which runs as corral-kid, but not family-chat.
    let out = b.cli(Some("kid"), &["exec", "homework", "--", "id", "-un"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "corral-kid\n");
    let out = b.cli(Some("kid"), &["exec", "family-chat", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("(kid) may not use workflow family-chat") && err.contains("[forbidden]"), "{err}");

    // alice may use both.
    let out = b.cli(Some("alice"), &["exec", "family-chat", "--", "id", "-un"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "corral-alice\n");
    let out = b.cli(Some("alice"), &["exec", "homework", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Workspaces: owned by the workflow's user, in a tenant directory of
    // root's that only the tenant's group may traverse (tests/workspace.rs).
    for (tenant, wf, owner) in [("kid", "homework", "corral-kid"), ("alice", "family-chat", "corral-alice")] {
        let user = nix::unistd::User::from_name(owner).unwrap().unwrap();
        let ws = b.workspace(tenant, wf);
        let meta = std::fs::metadata(&ws).unwrap();
        assert_eq!(meta.uid(), user.uid.as_raw(), "{} not owned by {owner}", ws.display());
        assert_eq!(meta.mode() & 0o7777, 0o700, "{} mode {:o}", ws.display(), meta.mode());
        let meta = std::fs::metadata(ws.parent().unwrap()).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, user.gid.as_raw(), 0o710));
    }
    let r = b.exec("homework", &["id", "-un"]);
    assert_eq!(stdout(&r), "corral-kid\n");
    let r = b.exec("homework", &["sh", "-c", "echo hi > note && cat note && pwd"]);
    assert_eq!(stdout(&r), format!("hi\n{}\n", b.workspace("kid", "homework").display()), "{r:#}");
}

/// A seccomp filter that makes the three Landlock syscalls fail with ENOSYS,
/// as on a kernel without Landlock (x86_64 numbers).
fn hide_landlock() -> Vec<libc::sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const LANDLOCK_SYSCALLS: [u32; 3] = [444, 445, 446];
    let code = |c: u32| u16::try_from(c).unwrap();
    let stmt = |c: u32, k: u32| libc::sock_filter { code: code(c), jt: 0, jf: 0, k };
    let jeq =
        |k: u32, jt: u8| libc::sock_filter { code: code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K), jt, jf: 0, k };
    let load = |offset: u32| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    let allow = stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    let enosys = stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | (u32::try_from(libc::ENOSYS).unwrap() & libc::SECCOMP_RET_DATA),
    );
    vec![
        load(4), // seccomp_data.arch
        jeq(AUDIT_ARCH_X86_64, 1),
        allow,   // another ABI: leave it alone
        load(0), // seccomp_data.nr
        jeq(LANDLOCK_SYSCALLS[0], 3),
        jeq(LANDLOCK_SYSCALLS[1], 2),
        jeq(LANDLOCK_SYSCALLS[2], 1),
        allow,
        enosys,
    ]
}

#[test]
fn missing_landlock_is_reported_not_hidden() {
    if !full_sandbox() {
        return;
    }
    if skip_under_systemd("the broker needs a pre_exec seccomp hook that hides Landlock; a unit cannot take one") {
        return;
    }
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIP: the Landlock-hiding filter uses x86_64 syscall numbers");
        return;
    }
    let mut filter = hide_landlock();
    let len = u16::try_from(filter.len()).unwrap();
    let hook = move || -> std::io::Result<()> {
        let prog = libc::sock_fprog { len, filter: filter.as_mut_ptr() };
        // SAFETY: prctl with integer arguments only; async-signal-safe.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `prog` points at `filter`, which lives (unmoved) in this
        // closure for the duration of the call; the kernel copies it.
        // Async-signal-safe: no allocation between fork and exec.
        if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const prog) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let best = policy("ll-best", "t", None, "", "", "");
    let best =
        PolicyFile { text: best.text.replacen("landlock = \"required\"", "landlock = \"best-effort\"", 1), ..best };
    assert!(best.text.contains("best-effort"));
    let policies = [policy("ll-required", "t", None, "", "", ""), best];
    let opts = BrokerOptions { wait_ready: false, pre_exec: Some(Box::new(hook)), ..BrokerOptions::default() };
    let b = Broker::start_with("api-nolandlock", &policies, opts);

    let find = |st: &Value, name: &str| {
        st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let st = loop {
        let st = b.status();
        let req = find(&st, "ll-required");
        let best = find(&st, "ll-best");
        let best_idle = best["workers"].as_array().unwrap().iter().any(|k| k["state"] == "idle");
        if !req["unavailable"].is_null() && best_idle {
            break st;
        }
        assert!(Instant::now() < deadline, "never settled: {st:#}\nlog:\n{}", b.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st["broker"]["landlock_abi"], 0, "the filter did not hide Landlock: {st:#}");

    // Required: unavailable, saying why and what to do.
    let why = find(&st, "ll-required")["unavailable"].as_str().unwrap().to_string();
    assert!(why.contains("Landlock") && why.contains("best-effort") && why.contains("5.13"), "{why}");
    let t = Instant::now();
    let a = exec_json(&b, &json!({ "workflow": "ll-required", "argv": ["true"] }));
    let took = t.elapsed();
    let msg = expect_error(&a, 503, "unavailable");
    assert!(msg.contains("ll-required") && msg.contains(&why), "{msg}");
    assert!(took < Duration::from_secs(2), "unavailable answer took {took:?}");

    // Best effort: serves calls, and says plainly what it lacks.
    let r = b.exec("ll-best", &["echo", "served"]);
    assert_eq!(stdout(&r), "served\n");
    let w = find(&b.status(), "ll-best");
    assert!(w["unavailable"].is_null(), "{w:#}");
    let sandbox = &w["workers"][0]["sandbox"];
    assert_eq!(sandbox["landlock_abi"], 0, "{sandbox:#}");
    assert_eq!(sandbox["landlock"], "not enforced", "{sandbox:#}");
    assert_eq!(sandbox["landlock_fs"], false, "{sandbox:#}");
    let notes = sandbox["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n.as_str().unwrap().contains("Landlock is not available")),
        "no note about the missing Landlock: {sandbox:#}"
    );
    let table = text(&b.cli(None, &["status"]).stdout);
    assert!(table.contains("weaker than asked: Landlock is not available"), "{table}");
    assert!(table.contains("UNAVAILABLE: landlock = \"required\""), "{table}");

    // Without Landlock the worker's uid still guards root's files.
    let r = b.exec("ll-best", &["cat", "/etc/shadow"]);
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(stderr(&r).contains("Permission denied"), "{r:#}");
    assert!(!stdout(&r).contains("root:"), "{r:#}");
    let r = b.exec("ll-best", &["cat", "/etc/passwd"]);
    assert!(stdout(&r).contains("root:x:0:0"), "{r:#}");
}

/// `corral broker` on `socket` with `b`'s policies, in rlimit mode like the
/// harness (so it never touches systemd scopes of this host).
fn broker_cmd(b: &Broker, socket: &std::path::Path, state: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("broker")
        .arg("--policies")
        .arg(b.dir.join("policies"))
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(b.dir.join(state))
        .arg("--systemd=off")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// Runs `corral broker` on `socket` and waits (up to 15 s) for it to exit.
fn run_broker(b: &Broker, socket: &std::path::Path, state: &str) -> Option<std::process::Output> {
    let mut child = broker_cmd(b, socket, state).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still running: stop it (our own child, by its handle).
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn second_broker_refuses_a_live_socket() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("api-socket", &[policy("sock", "t", None, "", "", "min_idle = 0")]);

    let out = run_broker(&b, &b.socket, "state2").expect("second broker kept running on a live socket");
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("another broker is already listening on") && err.contains("corral.sock"), "{err}");
    // The first broker keeps its socket and serves on.
    assert!(b.socket.exists());
    assert_eq!(b.exec("sock", &["echo", "first"])["stdout"], "first\n");

    // A path that is not a socket is left alone.
    let file = b.dir.join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let out = run_broker(&b, &file, "state3").expect("broker started on a regular file");
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stderr).contains("is not a socket"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // Neighbour: a stale socket (no one listening) is replaced.
    let stale = b.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists() && std::os::unix::net::UnixStream::connect(&stale).is_err());
    let mut child = broker_cmd(&b, &stale, "state4").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut listening = false;
    while Instant::now() < deadline && !listening {
        listening = std::os::unix::net::UnixStream::connect(&stale).is_ok();
        assert!(child.try_wait().unwrap().is_none(), "broker on a stale socket exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "broker never listened on the stale socket");
}

/// A RUST_LOG the filter cannot read is said on stderr, with the syntax,
/// and logging goes on at info (here, a worker started by hand without its
/// broker: it logs why it stops); a valid one is taken silently.
#[test]
fn a_bad_rust_log_is_reported_and_a_good_one_taken() {
    let run = |filter: &str| {
        let out = Command::new(BIN)
            .arg("worker")
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bad = run("corral=debug,x=%%");
    assert!(bad.contains("RUST_LOG=\"corral=debug,x=%%\" is not a filter"), "{bad}");
    assert!(bad.contains("LEVEL or TARGET=LEVEL"), "{bad}");
    let good = run("corral=debug,warn");
    assert!(!good.contains("is not a filter"), "{good}");
}

/// The functions a worker runs, then those an idle broker runs, are linked
/// in front of the rest of the code (`build/code-order.ld`, `build.rs`), so
/// that each process maps a few hundred KiB of code rather than most of the
/// binary (README, Footprint). Both sections are there, before `.text`, and
/// hold what the script names: a script whose patterns stopped matching (a
/// new toolchain's names) leaves them nearly empty.
#[test]
fn the_workers_and_then_the_brokers_code_come_first() {
    let out = Command::new("readelf").args(["-SW", BIN]).output().expect("readelf (binutils)");
    let table = String::from_utf8_lossy(&out.stdout);
    // "[16] .text.worker PROGBITS 00000000001e94c0 1e84c0 056bb8 00 AX 0 0 16"
    let section = |name: &str| {
        table.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|w| *w == name)?;
            let hex = |i: usize| u64::from_str_radix(f.get(at + i)?, 16).ok();
            Some((hex(2)?, hex(4)?))
        })
    };
    let text = section(".text").unwrap_or_else(|| panic!("no .text in the section table:\n{table}"));
    let (worker, broker) = (section(".text.worker"), section(".text.broker"));
    if std::env::var_os("CORRAL_NO_CODE_ORDER").is_some() {
        assert!(worker.is_none() && broker.is_none(), "CORRAL_NO_CODE_ORDER is set, yet the code is ordered");
        return;
    }
    let hint = "build.rs passes build/code-order.ld to the linker when a probe link takes it; \
                run scripts/code-order/order.sh after a toolchain change";
    let (Some(worker), Some(broker)) = (worker, broker) else {
        panic!("the binary has no .text.worker or .text.broker ({hint}):\n{table}")
    };
    assert!(
        worker.0 < broker.0 && broker.0 < text.0,
        "worker, broker, then the rest: {worker:x?} {broker:x?} {text:x?}"
    );
    assert!(worker.1 >= 128 << 10, "the worker's code is {} bytes: its patterns match too little ({hint})", worker.1);
    assert!(broker.1 >= 512 << 10, "the broker's code is {} bytes: its patterns match too little ({hint})", broker.1);
}

/// Where the C library can load packed relative relocations (glibc 2.36 or
/// later), the binary has them (`build.rs`); elsewhere it is linked as
/// before. Every other test runs the binary, so it loads either way.
#[test]
fn relative_relocations_are_packed_where_glibc_reads_them() {
    let glibc = Command::new("getconf").arg("GNU_LIBC_VERSION").output().unwrap();
    let glibc = String::from_utf8_lossy(&glibc.stdout).trim().to_string();
    let version = glibc
        .strip_prefix("glibc ")
        .and_then(|v| v.split_once('.'))
        .and_then(|(major, rest)| Some((major.parse::<u32>().ok()?, rest.split('.').next()?.parse::<u32>().ok()?)));
    let dynamic = Command::new("readelf").args(["-d", BIN]).output().expect("readelf (binutils)");
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    assert!(dynamic.contains("(NEEDED)"), "readelf read no dynamic section: {dynamic}");
    let packed = dynamic.contains("(RELR)");
    if std::env::var_os("CORRAL_NO_RELR").is_some() {
        assert!(!packed, "CORRAL_NO_RELR is set, yet the binary is packed");
    } else {
        assert_eq!(packed, version.is_some_and(|v| v >= (2, 36)), "{glibc:?}, dynamic section:\n{dynamic}");
    }
}
