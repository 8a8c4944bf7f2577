//! `corral bridge telegram` against a local stand-in of the Bot API (on
//! 127.0.0.1) and a broker: the real one with the local model stub, or a
//! scripted one on a Unix socket for the answers today's broker does not
//! give (unknown members, rate limits). The bridge runs as corral-bot, the
//! user of its unit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "4242:SECRET-test_token-never-logged";

// The bridge's fixed replies (src/bridge/telegram.rs).
const NOT_A_MEMBER: &str = "Sorry, you are not a member.";
const NOT_ALLOWED: &str = "Sorry, that is not allowed here.";
const FAILED: &str = "Sorry, something went wrong; please try again later.";

// ---- a Bot API stand-in -------------------------------------------------

/// A call the stand-in received: method, JSON body, when.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    body: Value,
    at: Instant,
}

#[derive(Default)]
struct BotState {
    /// Every update queued, oldest first.
    updates: Vec<Value>,
    /// Telegram's confirmation: updates below it are never sent again.
    confirmed: i64,
    next_id: i64,
    /// getUpdates calls to answer with a 500 (without confirming).
    fail_polls: usize,
    calls: Vec<Call>,
}

/// Serves getUpdates from a queue as Telegram does (every update from the
/// offset on, again and again until an offset confirms it), records
/// sendMessage and sendChatAction, and answers 401 to any other token.
struct BotApi {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<BotState>>,
}

impl BotApi {
    fn start() -> BotApi {
        let state = Arc::new(Mutex::new(BotState { next_id: 100, ..BotState::default() }));
        let shared = Arc::clone(&state);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, std::convert::Infallible>(bot_answer(shared, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        BotApi { addr: rx.recv().unwrap(), state }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a text message; returns its update id.
    fn message(&self, chat: i64, kind: &str, from: i64, text: &str) -> i64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.updates.push(json!({"update_id": id, "message": {
            "message_id": id, "date": 1, "text": text,
            "chat": {"id": chat, "type": kind},
            "from": {"id": from, "is_bot": false, "first_name": "x"}}}));
        id
    }

    fn fail_next_polls(&self, n: usize) {
        self.state.lock().unwrap().fail_polls = n;
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The texts sent to `chat`, in order.
    fn sent(&self, chat: i64) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "sendMessage" && c.body["chat_id"] == chat)
            .map(|c| c.body["text"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Waits until `chat` got `n` messages (and a moment more, so that an
    /// extra one would show), then returns them.
    fn wait_sent(&self, chat: i64, n: usize) -> Vec<String> {
        let got = poll(Duration::from_secs(30), || (self.sent(chat).len() >= n).then_some(()));
        assert!(got.is_some(), "chat {chat}: not {n} messages: {:?}", self.calls());
        std::thread::sleep(Duration::from_millis(300));
        self.sent(chat)
    }

    /// The methods called for `chat`, in order.
    fn methods(&self, chat: i64) -> Vec<String> {
        self.calls().into_iter().filter(|c| c.body["chat_id"] == chat).map(|c| c.method).collect()
    }
}

fn bot_reply(status: u16, body: &Value) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let mut resp = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body.to_string())));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    resp
}

async fn bot_answer(
    state: Arc<Mutex<BotState>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let body: Value =
        serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap_or(Value::Null);
    let Some(method) = path.strip_prefix(&format!("/bot{TOKEN}/")).map(str::to_string) else {
        return bot_reply(401, &json!({"ok": false, "error_code": 401, "description": "Unauthorized"}));
    };
    {
        let mut s = state.lock().unwrap();
        s.calls.push(Call { method: method.clone(), body: body.clone(), at: Instant::now() });
        if method == "getUpdates" && s.fail_polls > 0 {
            s.fail_polls -= 1;
            return bot_reply(500, &json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}));
        }
    }
    if method != "getUpdates" {
        return bot_reply(200, &json!({"ok": true, "result": true}));
    }
    // Long polling, shortened: at most 1 s.
    let deadline = Instant::now() + Duration::from_secs(body["timeout"].as_u64().unwrap_or(0).min(1));
    loop {
        let pending: Vec<Value> = {
            let mut s = state.lock().unwrap();
            if let Some(o) = body["offset"].as_i64() {
                s.confirmed = s.confirmed.max(o);
            }
            let confirmed = s.confirmed;
            s.updates.iter().filter(|u| u["update_id"].as_i64().unwrap() >= confirmed).cloned().collect()
        };
        if !pending.is_empty() || Instant::now() >= deadline {
            return bot_reply(200, &json!({"ok": true, "result": pending}));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the bridge -----------------------------------------------------------

/// A running `corral bridge telegram` as corral-bot; SIGTERM on drop.
struct Bridge {
    child: Child,
    log: PathBuf,
}

fn bot_user() -> nix::unistd::User {
    nix::unistd::User::from_name("corral-bot").unwrap().expect("corral-bot: run scripts/setup-test-host.sh")
}

/// A token file corral-bot alone can read.
fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("telegram-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    let u = bot_user();
    std::os::unix::fs::chown(&path, Some(u.uid.as_raw()), Some(u.gid.as_raw())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

impl Bridge {
    fn start(dir: &Path, name: &str, api_base: &str, socket: &Path, extra: &[&str]) -> Bridge {
        let log = dir.join(format!("{name}.log"));
        let u = bot_user();
        let child = Command::new(BIN)
            .args(["bridge", "telegram", "--api-base", api_base, "--poll-timeout", "1s", "--socket"])
            .arg(socket)
            .arg("--token-file")
            .arg(token_file(dir))
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("CREDENTIALS_DIRECTORY")
            .uid(u.uid.as_raw())
            .gid(u.gid.as_raw())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Bridge { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = poll(Duration::from_secs(25), || self.child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = self.child.kill();
        }
        status
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn assert_no_token(log: &str) {
    assert!(!log.contains(TOKEN) && !log.contains("SECRET-test_token"), "the token is in the log:\n{log}");
}

// ---- with the real broker and the model stub ---------------------------

#[test]
fn a_member_is_answered_a_refused_call_gets_one_short_line_and_bot_api_failures_are_retried() {
    if !full_sandbox() || !require(&["users"]) {
        return;
    }
    let long = (0..1100).map(|i| format!("w{i:04}")).collect::<Vec<_>>().join(" ");
    assert!(long.len() > 5000);
    let model = Stub::start(vec![answer("hello from the model", 3, 2), answer(&long, 3, 2), answer("again", 3, 2)]);
    let clients = |p: &mut PolicyFile, users: &str| {
        p.text = p.text.replace(
            "clients = { users = [], groups = [] }",
            &format!("clients = {{ users = [{users}], groups = [] }}"),
        );
    };
    let mut helper = llm_policy("helper", "fam", &model.base_url(), "");
    clients(&mut helper, "\"corral-bot\"");
    // corral-bot is no client of "closed".
    let mut closed = llm_policy("closed", "fam", &model.base_url(), "");
    clients(&mut closed, "\"alice\"");
    // corral-bot is the members file's delegate; alice is Telegram user
    // 1001, and may use "helper" only.
    let dir = scratch_dir("bridge-real");
    let members = dir.join("members.toml");
    std::fs::write(
        &members,
        "[delegates]\nusers = [\"corral-bot\"]\n\n[[member]]\nname = \"alice\"\ntenant = \"fam\"\n\
         telegram = [1001]\nworkflows = [\"helper\"]\n",
    )
    .unwrap();
    let env = vec![("CORRAL_MEMBERS".to_string(), members.display().to_string())];
    let b = Broker::start_in("bridge-real", dir, &[helper, closed], BrokerOptions { env, ..BrokerOptions::default() });

    let api = BotApi::start();
    let bridge = Bridge::start(&b.dir, "bridge", &api.base(), &b.socket, &["--workflow", "helper"]);
    let refused_api = BotApi::start();
    let refused = Bridge::start(&b.dir, "refused", &refused_api.base(), &b.socket, &["--workflow", "closed"]);

    // A member's message: "typing…", then the model's answer; the model saw
    // the message alone.
    api.message(1001, "private", 1001, "hi");
    assert_eq!(api.wait_sent(1001, 1), vec!["hello from the model"]);
    let methods = api.methods(1001);
    assert_eq!(methods.first().map(String::as_str), Some("sendChatAction"), "{methods:?}");
    let typing = api.calls().into_iter().find(|c| c.method == "sendChatAction").unwrap();
    assert_eq!(typing.body["action"], "typing");
    let prompt = &model.received()[0].body["messages"];
    let last = prompt.as_array().unwrap().last().unwrap();
    assert_eq!((last["role"].as_str(), last["content"].as_str()), (Some("user"), Some("hi")), "{prompt}");

    // A long answer comes in pieces of at most 4096 characters, whole.
    api.message(1001, "private", 1001, "something long");
    let sent = api.wait_sent(1001, 3);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(
        sent[1..].iter().all(|p| p.chars().count() <= 4096),
        "{:?}",
        sent.iter().map(String::len).collect::<Vec<_>>()
    );
    assert_eq!(sent[1..].concat(), long);

    // The Bot API fails a poll: the bridge polls again (after its backoff)
    // and answers the next message once; no update is answered twice.
    api.fail_next_polls(1);
    let failed_at = Instant::now();
    poll(Duration::from_secs(5), || (api.state.lock().unwrap().fail_polls == 0).then_some(()))
        .expect("the bridge did not poll");
    api.message(1002, "private", 1001, "after the failure");
    assert_eq!(api.wait_sent(1002, 1), vec!["again"]);
    let polls_after = api.calls().iter().filter(|c| c.method == "getUpdates" && c.at > failed_at).count();
    assert!(polls_after >= 2, "no poll after the 500");
    assert!(bridge.log_text().contains("the Bot API refused getUpdates: 500"), "{}", bridge.log_text());
    assert_eq!(api.sent(1001).len(), 3, "{:?}", api.sent(1001));
    assert_eq!(model.received().len(), 3, "a message was asked twice");

    // alice may not use "closed" (the members file lists only "helper"):
    // one short line, nothing of the broker's message, and nothing else
    // sent; the detail is in the log.
    refused_api.message(2001, "private", 1001, "let me in");
    let sent = refused_api.wait_sent(2001, 1);
    assert_eq!(sent, vec![NOT_ALLOWED]);
    let log = refused.log_text();
    assert!(log.contains("code=forbidden") && log.contains("may not use workflow"), "{log}");
    assert!(!sent[0].contains("alice") && !sent[0].contains("closed"), "{sent:?}");
    assert_eq!(model.received().len(), 3, "a refused call reached the model");

    for (name, mut br) in [("bridge", bridge), ("refused", refused)] {
        let status = br.stop();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{name} did not stop cleanly:\n{}", br.log_text());
        assert_no_token(&br.log_text());
    }
}

// ---- with a scripted broker --------------------------------------------

/// A request the scripted broker received: headers and body.
#[derive(Clone, Debug)]
struct Asked {
    /// The caller's uid (SO_PEERCRED).
    uid: u32,
    headers: std::collections::BTreeMap<String, String>,
    body: Value,
}

/// A broker on a Unix socket that answers each ask by its prompt, as the
/// broker of the members branch will: 403 `unknown_member`, 429
/// `rate_limited` with Retry-After, 500; "slow …" after 4.5 s; else an
/// answer that echoes the prompt.
fn scripted_broker(socket: &Path) -> Arc<Mutex<Vec<Asked>>> {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&asked);
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let uid = stream.peer_cred().unwrap().uid();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, std::convert::Infallible>(broker_answer(shared, uid, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    asked
}

async fn broker_answer(
    asked: Arc<Mutex<Vec<Asked>>>,
    uid: u32,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use http_body_util::BodyExt;
    let headers =
        req.headers().iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let body: Value =
        serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap_or(Value::Null);
    asked.lock().unwrap().push(Asked { uid, headers, body: body.clone() });
    let prompt = body["prompt"].as_str().unwrap_or("").to_string();
    let error = |status: u16, code: &str, message: &str| {
        let mut r =
            bot_reply(status, &json!({"error": {"code": code, "message": message, "request_id": "req-scripted"}}));
        r.headers_mut().insert("x-corral-request-id", hyper::header::HeaderValue::from_static("req-scripted"));
        r
    };
    match prompt.as_str() {
        "who am i" => error(403, "unknown_member", "telegram:3001 is linked to no member in /etc/corral/members.toml"),
        "too fast" => {
            let mut r = error(429, "rate_limited", "member kid: 5 requests per minute (members.toml)");
            r.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("7"));
            r
        }
        "boom" => error(500, "internal", "the ledger is locked at /var/lib/corral/ledger.sqlite3"),
        p => {
            if p.starts_with("slow") {
                tokio::time::sleep(Duration::from_millis(4500)).await;
            }
            bot_reply(
                200,
                &json!({"request_id": "req-ok", "workflow": "family-chat", "model": "m", "answer": format!("re: {p}"),
                        "stopped": "answer", "steps": 1, "transcript": [],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "model_calls": 1}}),
            )
        }
    }
}

#[test]
fn members_chats_and_sessions_reach_the_broker_and_its_refusals_stay_short() {
    if !require(&["root", "users"]) {
        return;
    }
    let dir = scratch_dir("bridge-scripted");
    let socket = dir.join("broker.sock");
    let asked = scripted_broker(&socket);
    let api = BotApi::start();
    let mut bridge = Bridge::start(&dir, "bridge", &api.base(), &socket, &[]);

    // Chat 3001 (private) is slow; the group -100123 is answered meanwhile,
    // and 3001's second message waits for its first.
    api.message(3001, "private", 3001, "slow one");
    std::thread::sleep(Duration::from_millis(300));
    api.message(3001, "private", 3001, "two");
    api.message(-100123, "supergroup", 3002, "hello group");
    assert_eq!(api.wait_sent(-100123, 1), vec!["re: hello group"]);
    assert!(api.sent(3001).is_empty(), "{:?}", api.sent(3001));
    assert_eq!(api.wait_sent(3001, 2), vec!["re: slow one", "re: two"]);
    // "typing…" renewed during the 4.5 s ask.
    let typing_before = {
        let calls = api.calls();
        let answered = calls.iter().find(|c| c.method == "sendMessage" && c.body["chat_id"] == 3001).unwrap().at;
        calls.iter().filter(|c| c.method == "sendChatAction" && c.body["chat_id"] == 3001 && c.at < answered).count()
    };
    assert!(typing_before >= 2, "typing sent {typing_before} time(s) during a 4.5 s ask");

    // What the broker was told: the member, the kind of chat, the session
    // of the chat; the workflow left to the broker.
    let by_prompt = |p: &str| asked.lock().unwrap().iter().find(|a| a.body["prompt"] == p).cloned().unwrap();
    let private = by_prompt("two");
    assert_eq!(private.uid, bot_user().uid.as_raw());
    assert_eq!(private.headers["x-corral-member"], "telegram:3001");
    assert_eq!(private.headers["x-corral-chat"], "private");
    assert_eq!(private.headers["x-corral-session"], "tg-3001");
    assert_eq!(private.body["workflow"], "");
    assert!(!private.headers.contains_key("x-corral-workflow"), "{private:?}");
    assert!(private.body.get("conversation").is_none(), "the bridge sent history: {private:?}");
    let group = by_prompt("hello group");
    assert_eq!(group.headers["x-corral-member"], "telegram:3002");
    assert_eq!(group.headers["x-corral-chat"], "group");
    assert_eq!(group.headers["x-corral-session"], "tg-m100123");

    // A stranger: "not a member", and nothing else, nothing of the reason.
    api.message(4001, "private", 4001, "who am i");
    let sent = api.wait_sent(4001, 1);
    assert_eq!(sent, vec![NOT_A_MEMBER]);
    // Rate limited: slow down, with the broker's Retry-After.
    api.message(4002, "private", 4002, "too fast");
    assert_eq!(api.wait_sent(4002, 1), vec!["Slow down: retry in 7 s."]);
    // Any other failure: a generic line; the detail and the request id in
    // the log only.
    api.message(4003, "private", 4003, "boom");
    assert_eq!(api.wait_sent(4003, 1), vec![FAILED]);
    // A channel is not served: no ask, no reply. The loop goes on after all
    // of the above.
    api.message(-100999, "channel", 4004, "from a channel");
    api.message(4005, "private", 4005, "still there");
    assert_eq!(api.wait_sent(4005, 1), vec!["re: still there"]);
    assert!(api.methods(-100999).is_empty(), "{:?}", api.methods(-100999));
    assert!(!asked.lock().unwrap().iter().any(|a| a.body["prompt"] == "from a channel"));

    assert_eq!(bridge.stop().and_then(|s| s.code()), Some(0), "{}", bridge.log_text());
    let log = bridge.log_text();
    assert!(log.contains("req-scripted") && log.contains("the ledger is locked"), "{log}");
    assert_no_token(&log);
    // Every update answered once.
    let answered: usize = [3001, -100123, 4001, 4002, 4003, 4005].iter().map(|c| api.sent(*c).len()).sum();
    assert_eq!(answered, 7);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_token_stays_out_of_the_log_when_the_bot_api_fails_or_refuses_it() {
    if !require(&["root", "users"]) {
        return;
    }
    let dir = scratch_dir("bridge-token");
    let socket = dir.join("none.sock");
    // Nothing listens there: connection errors (reqwest's, which name the URL).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut unreachable = Bridge::start(&dir, "unreachable", &format!("http://127.0.0.1:{port}"), &socket, &[]);
    let log = poll(Duration::from_secs(10), || {
        let l = unreachable.log_text();
        l.contains("polling again").then_some(l)
    })
    .unwrap_or_else(|| panic!("no retry logged: {}", unreachable.log_text()));
    assert!(log.contains("could not be reached (getUpdates)"), "{log}");
    assert_eq!(unreachable.stop().and_then(|s| s.code()), Some(0));
    assert_no_token(&unreachable.log_text());

    // A stand-in that knows another token: 401, and the bridge ends (a
    // refused token does not get better by retrying), saying what to do.
    let api = BotApi::start();
    let u = bot_user();
    let other = dir.join("other-token");
    std::fs::write(&other, "4242:ANOTHER-token\n").unwrap();
    std::os::unix::fs::chown(&other, Some(u.uid.as_raw()), None).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(BIN)
        .args(["bridge", "telegram", "--api-base", &api.base(), "--poll-timeout", "1s", "--socket"])
        .arg(&socket)
        .arg("--token-file")
        .arg(&other)
        .uid(u.uid.as_raw())
        .gid(u.gid.as_raw())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("401") && err.contains("token is refused"), "{err}");
    assert!(!err.contains("ANOTHER-token"), "{err}");
    // The token file of another user: refused to read, and said so.
    let path = token_file(&dir);
    std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
    let out = Command::new(BIN)
        .args(["bridge", "telegram", "--api-base", &api.base(), "--token-file"])
        .arg(&path)
        .uid(u.uid.as_raw())
        .gid(u.gid.as_raw())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("failed to read the bot token"), "{err}");
    // Without --token-file or a credential directory: where to put it.
    let out = Command::new(BIN).args(["bridge", "telegram"]).env_remove("CREDENTIALS_DIRECTORY").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("LoadCredential=telegram-token"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the unit -------------------------------------------------------------

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/units/corral-bridge-telegram.service");

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_shipped_unit_verifies_and_its_exposure_stays_low() {
    if !require(&["root"]) {
        return;
    }
    // verify needs the binary of ExecStart= and the units it names.
    let dir = scratch_dir("bridge-unit");
    let unit = std::fs::read_to_string(UNIT).unwrap().replace("/usr/local/bin/corral", BIN);
    let path = dir.join("corral-bridge-telegram.service");
    std::fs::write(&path, unit).unwrap();
    for u in ["corral.socket", "corral.slice"] {
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("units").join(u), dir.join(u)).unwrap();
    }
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    assert!(out.status.success() && text(&out).trim().is_empty(), "{}", text(&out));
    let out =
        Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&path).output().unwrap();
    let report = text(&out);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for corral-bridge-telegram.service:").map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    // Measured: 1.1 (what is left: the network, AF_UNIX/INET, no
    // IPAddressDeny=, the host's root directory, ProtectClock's rtc; see
    // the unit). corral.service: 3.9.
    assert!(level <= 1.1, "exposure {level} > 1.1:\n{report}");
    // The bridge's own user, no capability, the token as a credential.
    for line in
        ["User=corral-bot", "CapabilityBoundingSet=\n", "LoadCredential=telegram-token:/etc/corral/telegram-token"]
    {
        assert!(std::fs::read_to_string(UNIT).unwrap().contains(line), "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_shipped_unit_runs_the_bridge_as_corral_bot_with_its_credential() {
    if !require(&["root", "users", "systemd"]) {
        return;
    }
    let Some(sd) = systemd_pid() else { return };
    let dir = scratch_dir("bridge-in-unit");
    let socket = dir.join("broker.sock");
    let asked = scripted_broker(&socket);
    let api = BotApi::start();
    let token = token_file(&dir);
    // A systemd that is the machine's PID 1 (the guest) hands the token
    // over as the unit says: a credential from a root-only file. The
    // namespaced systemd of the host's tests cannot (it builds each
    // credential directory in a mount that does not propagate back to its
    // own namespace: the service finds an empty 0700 root directory), so
    // there the unit reads corral-bot's own file with --token-file.
    let credential = sd == 1;
    if credential {
        std::os::unix::fs::chown(&token, Some(0), Some(0)).unwrap();
    }
    // The shipped unit, with the test's binary, socket, Bot API and token;
    // without the dependency on the real corral.socket.
    let mut unit = String::new();
    for line in std::fs::read_to_string(UNIT).unwrap().lines() {
        let key = line.split('=').next().unwrap_or("");
        match key {
            "ExecStart" => {
                unit.push_str(&format!(
                    "ExecStart={BIN} bridge telegram --socket {} --api-base {} --poll-timeout 1s",
                    socket.display(),
                    api.base()
                ));
                if !credential {
                    unit.push_str(&format!(" --token-file {}", token.display()));
                }
                unit.push('\n');
                // PrivateTmp would hide a checkout under /tmp (CI clones
                // there): bind the scratch space and the binary back.
                if BIN.starts_with("/tmp") || BIN.starts_with("/var/tmp") {
                    unit.push_str(&format!("BindPaths={}\n", env!("CARGO_TARGET_TMPDIR")));
                    unit.push_str(&format!("BindReadOnlyPaths={BIN}\n"));
                }
            }
            "LoadCredential" if credential => {
                unit.push_str(&format!("LoadCredential=telegram-token:{}\n", token.display()))
            }
            "LoadCredential" | "Requires" | "ConditionPathExists" | "Restart" | "WantedBy" => {}
            _ => {
                unit.push_str(line);
                unit.push('\n');
            }
        }
    }
    let name = format!("corral-test-bridge-{}.service", std::process::id());
    let unit_file = PathBuf::from(format!("/proc/{sd}/root/run/systemd/system/{name}"));
    std::fs::write(&unit_file, unit).unwrap();
    let out = nsenter(sd, &["systemctl", "start", &name]);
    let journal = || text(&nsenter(sd, &["journalctl", "--no-pager", "-o", "cat", "-u", &name]));
    assert!(out.status.success(), "{}\n{}", text(&out), journal());

    api.message(5001, "private", 5001, "from the unit");
    let sent = poll(Duration::from_secs(20), || {
        let s = api.sent(5001);
        (!s.is_empty()).then_some(s)
    });
    let stop = nsenter(sd, &["systemctl", "stop", &name]);
    let log = journal();
    let _ = std::fs::remove_file(&unit_file);
    let _ = nsenter(sd, &["systemctl", "reset-failed", &name]);
    assert_eq!(sent, Some(vec!["re: from the unit".to_string()]), "{log}");
    assert!(stop.status.success(), "{}", text(&stop));
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].uid, bot_user().uid.as_raw(), "the unit's calls are not corral-bot's");
    assert_eq!(asked[0].headers["x-corral-member"], "telegram:5001");
    assert!(log.contains("telegram bridge: polling"), "{log}");
    assert_no_token(&log);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the family, end to end ----------------------------------------------

/// The texts of the messages of model request `i` (role: content), for
/// asserting what each ask's model saw.
fn seen(model: &Stub, i: usize) -> String {
    let got = model.received();
    let msgs = got[i].body["messages"].as_array().cloned().unwrap_or_default();
    msgs.iter()
        .map(|m| format!("{}: {}", m["role"].as_str().unwrap_or(""), m["content"].as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tool names model request `i` offered.
fn offered(model: &Stub, i: usize) -> Vec<String> {
    model.received()[i].body["tools"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["function"]["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// A family on Telegram, through the bridge and the real broker, as the
/// README walks it: two members (alice, and the kid with a small rate
/// limit), each with her own workflow and tenant; a private chat and a
/// group chat the two share; a stranger. What each side gets, what the
/// model sees (the sessions' histories, the tools each chat allows), and
/// the audit trail of it all, verified and then broken by an edit.
#[test]
fn a_family_on_telegram_members_chats_limits_sessions_and_the_audit_trail() {
    if !full_sandbox() || !require(&["users"]) {
        return;
    }
    const ALICE: i64 = 1001;
    const KID: i64 = 1002;
    const GROUP: i64 = -500;
    const STRANGER: i64 = 3003;
    let model = Stub::start(vec![
        answer("noted", 3, 2),
        tool_call("c1", "shell", &json!({"command": "echo private-note > note.txt && cat note.txt"})),
        answer("saved", 3, 2),
        tool_call("c2", "shell", &json!({"command": "id"})),
        answer("not here", 3, 2),
        answer("hello kid", 3, 2),
        answer("I do not know", 3, 2),
        answer("swordfish", 3, 2),
    ]);
    let own = |name: &str, tenant: &str, user: &str| {
        let mut p = llm_policy(name, tenant, &model.base_url(), "");
        p.text = p.text.replace("user = \"corral-test\"", &format!("user = \"{user}\""));
        p
    };
    let policies = [own("alice-chat", "fam-alice", "corral-alice"), own("homework", "fam-kid", "corral-kid")];
    let dir = scratch_dir("bridge-family");
    let members = dir.join("members.toml");
    std::fs::write(
        &members,
        r#"[delegates]
users = ["corral-bot"]

[[member]]
name = "alice"
tenant = "fam-alice"
telegram = [1001]
workflows = ["alice-chat"]
chats.group = ["read_file"]

[[member]]
name = "kid"
tenant = "fam-kid"
telegram = [1002]
workflows = ["homework"]
requests_per_minute = 2
"#,
    )
    .unwrap();
    let env = vec![("CORRAL_MEMBERS".to_string(), members.display().to_string())];
    let b = Broker::start_in("bridge-family", dir, &policies, BrokerOptions { env, ..BrokerOptions::default() });
    let api = BotApi::start();
    let mut bridge = Bridge::start(&b.dir, "family", &api.base(), &b.socket, &[]);

    // alice, in her private chat: told a secret; then a note written by
    // the shell tool, which her private chat allows.
    api.message(ALICE, "private", ALICE, "the password is swordfish");
    assert_eq!(api.wait_sent(ALICE, 1), ["noted"]);
    api.message(ALICE, "private", ALICE, "save a note");
    assert_eq!(api.wait_sent(ALICE, 2), ["noted", "saved"]);
    assert!(seen(&model, 1).contains("swordfish"), "her session's history:\n{}", seen(&model, 1));
    assert_eq!(offered(&model, 1).len(), 4, "a private chat offers every tool");
    let ran = seen(&model, 2);
    assert!(ran.contains("exit code 0") && ran.contains("private-note"), "{ran}");

    // alice in the group chat: another session (no secret in it), and
    // only read_file; the shell call the model makes anyway is refused.
    api.message(GROUP, "group", ALICE, "run id");
    assert_eq!(api.wait_sent(GROUP, 1), ["not here"]);
    assert!(!seen(&model, 3).contains("swordfish"), "{}", seen(&model, 3));
    assert_eq!(offered(&model, 3), ["read_file"]);
    let refused = seen(&model, 4);
    assert!(refused.contains("not allowed") && !refused.contains("uid="), "{refused}");

    // The kid, in the same group chat and in his own: his own sessions,
    // which hold nothing of alice's.
    api.message(GROUP, "group", KID, "hi from kid");
    assert_eq!(api.wait_sent(GROUP, 2), ["not here", "hello kid"]);
    api.message(KID, "private", KID, "what is the password?");
    assert_eq!(api.wait_sent(KID, 1), ["I do not know"]);
    for i in [5, 6] {
        let s = seen(&model, i);
        assert!(!s.contains("swordfish") && !s.contains("run id") && !s.contains("not here"), "request {i}:\n{s}");
    }

    // The kid's third message within the minute: slowed down, and nothing
    // reaches the model; alice is served at the same moment, and her
    // private session still holds the secret.
    api.message(KID, "private", KID, "and again");
    api.message(ALICE, "private", ALICE, "what is the password?");
    let kid = api.wait_sent(KID, 2);
    assert!(kid[1].starts_with("Slow down: retry in "), "{kid:?}");
    assert_eq!(api.wait_sent(ALICE, 3), ["noted", "saved", "swordfish"]);
    let last = seen(&model, 7);
    assert!(last.contains("swordfish") && last.contains("saved"), "{last}");

    // A stranger: one short line, nothing else, no model call.
    api.message(STRANGER, "private", STRANGER, "hello?");
    assert_eq!(api.wait_sent(STRANGER, 1), [NOT_A_MEMBER]);
    assert_eq!(model.received().len(), 8, "the refused calls reached the model");

    // Four sessions: alice's and the kid's in the group, and each one's
    // private chat; alice's note is in her private session's directory.
    let out = b.cli(None, &["sessions", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let sessions: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut pairs: Vec<(String, String)> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["owner"].as_str().unwrap().to_string(), s["id"].as_str().unwrap().to_string()))
        .collect();
    pairs.sort();
    let want = [
        ("member-alice", "tg-1001"),
        ("member-alice", "tg-m500"),
        ("member-kid", "tg-1002"),
        ("member-kid", "tg-m500"),
    ];
    assert_eq!(pairs, want.map(|(o, i)| (o.to_string(), i.to_string())));
    let note = b.workspace("fam-alice", "alice-chat").join("sessions/member-alice/tg-1001/note.txt");
    assert_eq!(std::fs::read_to_string(&note).unwrap_or_default(), "private-note\n", "{}", note.display());

    // The audit trail: every ask with its member and session, the kid's
    // refusal with the limit; intact, then broken by an edit.
    let rows = poll(Duration::from_secs(10), || {
        let out = b.cli(None, &["audit", "--json"]);
        let rows: Value = serde_json::from_slice(&out.stdout).ok()?;
        let rows = rows.as_array()?.clone();
        (rows.len() >= 7).then_some(rows)
    })
    .expect("seven audit rows");
    let of = |m: &str| rows.iter().filter(|r| r["member"] == m).count();
    assert_eq!((of("alice"), of("kid")), (4, 3), "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["session"].as_str().is_some_and(|s| s.starts_with("tg-")) || r["outcome"] == "rate_limited"),
        "{rows:?}"
    );
    let limited = rows.iter().find(|r| r["outcome"] == "rate_limited").expect("the kid's refusal");
    assert_eq!(limited["member"], "kid");
    assert!(limited["limit"].as_str().is_some_and(|l| l.contains("requests_per_minute = 2")), "{limited}");
    let verify = || {
        let out = b.cli(None, &["audit", "verify"]);
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (code, t) = verify();
    assert_eq!(code, Some(0), "{t}");
    let id = limited["id"].as_i64().unwrap();
    b.ledger().execute("UPDATE audit SET member = 'alice' WHERE id = ?1", [id]).unwrap();
    let (code, t) = verify();
    assert_eq!(code, Some(1), "{t}");
    assert!(t.contains(&format!("BROKEN at row {id}")), "{t}");

    assert_eq!(bridge.stop().and_then(|s| s.code()), Some(0), "{}", bridge.log_text());
    assert_no_token(&bridge.log_text());
}
