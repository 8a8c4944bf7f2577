//! Members and delegation (issue 12 points 2 and 4): a delegate (a bot's
//! uid) acts for the members of the members file and nobody else can claim
//! to be one; a member's rights depend on the chat; members and tenants are
//! held to their rate limits and concurrency caps (429 with Retry-After)
//! while their neighbours are served in the same moment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The bot: the delegate of the members file.
const BOT: &str = "corral-dev";

/// A raw HTTP request over a Unix socket, sent by a `python3` as `user`:
/// what a bot running as its own uid does.
const CLIENT: &str = r#"
import socket, sys
sock, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
head = "".join(h + "\r\n" for h in sys.argv[4:])
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
s.sendall(("POST %s HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
           "Connection: close\r\n%s\r\n" % (path, len(body), head)).encode() + body)
out = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    out += d
sys.stdout.buffer.write(out)
"#;

fn client(b: &Broker, user: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", user, "--", "python3", "-c", CLIENT])
        .arg(&b.socket)
        .arg(path)
        .arg(body.to_string())
        .args(headers.iter().map(|(k, v)| format!("{k}: {v}")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// An answer: status, headers (lowercase names), JSON body.
struct Reply {
    code: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

fn parse(out: &Output) -> Reply {
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no answer: {out:?}"));
    let mut lines = head.lines();
    let code = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply { code, headers, body: serde_json::from_str(body).unwrap_or(Value::Null) }
}

/// `POST path` as `user` with `headers`.
fn post(b: &Broker, user: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    parse(&client(b, user, path, headers, body).output().unwrap())
}

/// An exec the bot makes for `member` in a `chat`.
fn exec_for(b: &Broker, member: &str, chat: &str, body: &Value) -> Reply {
    post(b, BOT, "/v1/exec", &[("x-corral-member", member), ("x-corral-chat", chat)], body)
}

fn start(name: &str, policies: &[PolicyFile], members: &str) -> Broker {
    let dir = scratch_dir(name);
    let file = dir.join("members.toml");
    std::fs::write(&file, members).unwrap();
    let env = vec![("CORRAL_MEMBERS".to_string(), file.display().to_string())];
    Broker::start_in(name, dir, policies, BrokerOptions { env, ..BrokerOptions::default() })
}

fn with_clients(mut p: PolicyFile, users: &str) -> PolicyFile {
    p.text = p.text.replace("clients = { users = [], groups = [] }", &format!("clients = {{ users = [{users}] }}"));
    p
}

fn shell(name: &str, tenant: &str, user: &str) -> PolicyFile {
    policy(name, tenant, Some(user), "", "", "min_idle = 1\nmax_workers = 2")
}

fn audit_rows(b: &Broker, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(extra);
    let out = b.cli(None, &args);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn uid_of(name: &str) -> u64 {
    u64::from(nix::unistd::User::from_name(name).unwrap().unwrap().uid.as_raw())
}

const FAMILY: &str = r#"
[delegates]
users = ["corral-dev"]

[[member]]
name = "alice"
tenant = "fam-alice"
user = "alice"
telegram = [111]
workflows = ["alice-sh", "alice-ai"]
tokens_per_day = 40
chats.group = ["read_file"]

[[member]]
name = "kid"
tenant = "fam-kid"
workflows = ["kid-sh"]
"#;

#[test]
fn a_delegate_acts_for_members_with_their_rights_and_nobody_else_can_claim_one() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(Vec::new());
    let mut ai = llm_policy("alice-ai", "fam-alice", &stub.base_url(), "");
    ai.text = ai.text.replace("user = \"corral-test\"", "user = \"corral-alice\"");
    let policies = [
        with_clients(shell("alice-sh", "fam-alice", "corral-alice"), "\"alice\""),
        ai,
        shell("kid-sh", "fam-kid", "corral-kid"),
    ];
    let b = start("members-rights", &policies, FAMILY);
    let echo = |wf: &str| json!({"workflow": wf, "argv": ["echo", "hi"]});

    // The bot acts for alice (no workflow named: her first), by name and by
    // her Telegram id; it is no workflow's client.
    let r = exec_for(&b, "alice", "private", &json!({"argv": ["echo", "hi"]}));
    assert_eq!((r.code, r.body["workflow"].as_str(), stdout(&r.body)), (200, Some("alice-sh"), "hi\n"), "{}", r.body);
    let r = exec_for(&b, "telegram:111", "private", &echo("alice-sh"));
    assert_eq!(r.code, 200, "{}", r.body);
    let r = post(&b, BOT, "/v1/exec", &[], &echo("alice-sh"));
    assert_eq!((r.code, r.body["error"]["code"].as_str()), (403, Some("forbidden")), "on its own, the bot is nobody");
    // For kid, alice's workflow is refused; his own is served.
    let r = exec_for(&b, "kid", "private", &echo("alice-sh"));
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("member kid may not use workflow"), "{}", r.body);
    assert_eq!(exec_for(&b, "kid", "private", &echo("kid-sh")).code, 200);

    // Nobody else may claim to be a member: not mallory, not alice for kid.
    for user in ["mallory", "alice"] {
        let r = post(&b, user, "/v1/exec", &[("x-corral-member", "kid")], &echo("kid-sh"));
        assert_eq!((r.code, r.body["error"]["code"].as_str()), (403, Some("forbidden")), "{user}: {}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap().contains("[delegates]"), "{}", r.body);
    }
    // A member the file does not have, or an unlinked Telegram id.
    for who in ["bob", "telegram:999"] {
        let r = exec_for(&b, who, "private", &echo("alice-sh"));
        assert_eq!((r.code, r.body["error"]["code"].as_str()), (403, Some("unknown_member")), "{who}: {}", r.body);
    }

    // Rights per chat: no exec from a group chat, where alice has read_file only.
    let r = exec_for(&b, "alice", "group", &echo("alice-sh"));
    assert_eq!((r.code, r.body["error"]["code"].as_str()), (403, Some("forbidden")), "{}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("chats.group of alice does not include shell"));
    // In a group chat the model is offered read_file only, and a shell call
    // is refused with words it reads; read_file works.
    std::fs::write(b.workspace("fam-alice", "alice-ai").join("note.txt"), "the note\n").unwrap();
    stub.push(tool_call("c1", "shell", &json!({"command": "echo pwned"})));
    stub.push(answer("no shell here", 3, 2));
    stub.push(tool_call("c2", "read_file", &json!({"path": "note.txt"})));
    stub.push(answer("read it", 3, 2));
    let ask = |prompt: &str| json!({"workflow": "alice-ai", "prompt": prompt});
    let headers = [("x-corral-member", "telegram:111"), ("x-corral-chat", "group")];
    let r = post(&b, BOT, "/v1/ask", &headers, &ask("run it"));
    assert_eq!(r.code, 200, "{}", r.body);
    let t = &r.body["transcript"][0];
    assert_eq!(t["tool"], "shell");
    assert!(t["error"].as_str().unwrap().contains("not allowed in this chat"), "{t}");
    let got = stub.received();
    let offered: Vec<&str> =
        got[0].body["tools"].as_array().unwrap().iter().filter_map(|t| t["function"]["name"].as_str()).collect();
    assert_eq!(offered, ["read_file"], "{}", got[0].body);
    assert!(got[1].body.to_string().contains("not allowed in this chat"));
    let r = post(&b, BOT, "/v1/ask", &headers, &ask("read it"));
    assert_eq!((r.code, r.body["transcript"][0]["exit_code"].as_i64()), (200, Some(0)), "{}", r.body);
    assert!(stub.received()[3].body.to_string().contains("the note"));
    // Her daily tokens (40) are spent: the next ask is refused at the door,
    // her exec is still served.
    let r = post(&b, BOT, "/v1/ask", &[("x-corral-member", "alice")], &ask("more"));
    assert_eq!((r.code, r.body["error"]["code"].as_str()), (429, Some("rate_limited")), "{}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("tokens_per_day = 40"), "{}", r.body);
    let retry: u64 = r.headers["retry-after"].parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    assert_eq!(exec_for(&b, "alice", "private", &echo("alice-sh")).code, 200);
    let refused = poll(Duration::from_secs(10), || {
        audit_rows(&b, &["--member", "alice"]).into_iter().find(|r| r["outcome"] == "rate_limited")
    });
    assert_eq!(refused.unwrap()["limit"], "member alice tokens_per_day = 40");
    // Her own login's calls are hers too.
    assert!(b.cli(Some("alice"), &["exec", "alice-sh", "--", "true"]).status.success());

    // The audit trail and the ledger name the member.
    let rows = poll(Duration::from_secs(10), || {
        let rows = audit_rows(&b, &["--member", "alice"]);
        (rows.len() >= 6).then_some(rows)
    })
    .unwrap_or_else(|| panic!("alice's rows: {:?}", audit_rows(&b, &[])));
    assert!(rows.iter().all(|r| r["member"] == "alice"), "{rows:?}");
    assert!(rows.iter().any(|r| r["kind"] == "ask" && r["uid"] == uid_of(BOT)), "{rows:?}");
    assert!(rows.iter().any(|r| r["kind"] == "exec" && r["uid"] == uid_of("alice")), "{rows:?}");
    assert!(audit_rows(&b, &["--member", "kid"]).iter().all(|r| r["member"] == "kid"));
    let tokens: i64 = b
        .ledger()
        .query_row("SELECT COALESCE(SUM(total_tokens), 0) FROM model_calls WHERE member = 'alice'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tokens, 40);

    // A reload reads the file again; a broken one keeps the running one.
    let file = b.dir.join("members.toml");
    std::fs::write(&file, FAMILY.replace("name = \"kid\"", "name = \"kiddo\"")).unwrap();
    kill(Pid::from_raw(i32::try_from(b.pid()).unwrap()), Signal::SIGHUP).unwrap();
    let served =
        poll(Duration::from_secs(10), || (exec_for(&b, "kiddo", "private", &echo("kid-sh")).code == 200).then_some(()));
    assert!(served.is_some(), "kiddo after the reload");
    assert_eq!(exec_for(&b, "kid", "private", &echo("kid-sh")).code, 403);
    std::fs::write(&file, FAMILY.replace("tokens_per_day", "tokens_per_dya")).unwrap();
    kill(Pid::from_raw(i32::try_from(b.pid()).unwrap()), Signal::SIGHUP).unwrap();
    let logged = poll(Duration::from_secs(10), || b.log_text().contains("tokens_per_dya").then_some(()));
    assert!(logged.is_some(), "{}", b.log_text());
    assert_eq!(exec_for(&b, "kiddo", "private", &echo("kid-sh")).code, 200, "the running file stays");
}

const LIMITS: &str = r#"
[delegates]
users = ["corral-dev"]

[[member]]
name = "alice"
tenant = "fam-alice"
workflows = ["alice-sh"]
requests_per_minute = 100

[[member]]
name = "kid"
tenant = "fam-kid"
workflows = ["kid-sh"]
requests_per_minute = 5
concurrent = 1

[tenant.house]
requests_per_minute = 2
"#;

/// Waits until `file` exists.
fn wait_for(file: &Path) {
    assert!(
        poll(Duration::from_secs(10), || file.exists().then_some(())).is_some(),
        "{} never appeared",
        file.display()
    );
}

#[test]
fn a_member_over_his_limits_gets_429_while_his_neighbours_are_served() {
    if !full_sandbox() {
        return;
    }
    let policies = [
        shell("alice-sh", "fam-alice", "corral-alice"),
        shell("kid-sh", "fam-kid", "corral-kid"),
        shell("house-sh", "house", "corral-test"),
    ];
    let b = start("members-limits", &policies, LIMITS);
    let kid_ws = b.workspace("fam-kid", "kid-sh");
    let kid = |script: &str| json!({"workflow": "kid-sh", "argv": ["sh", "-c", script]});
    let alice = json!({"workflow": "alice-sh", "argv": ["echo", "alice"]});
    let refused = |r: &Reply, limit: &str| {
        assert_eq!((r.code, r.body["error"]["code"].as_str()), (429, Some("rate_limited")), "{}", r.body);
        let m = r.body["error"]["message"].as_str().unwrap();
        assert!(m.contains(limit), "{m}");
        r.headers["retry-after"].parse::<u64>().unwrap()
    };
    let bot_kid = [("x-corral-member", "kid")];

    // Concurrency: while kid's call runs, his next one is refused, and alice
    // is served in that same moment.
    let slow: Child = client(&b, BOT, "/v1/exec", &bot_kid, &kid("touch started; sleep 2")).spawn().unwrap();
    wait_for(&kid_ws.join("started"));
    let r = exec_for(&b, "kid", "private", &kid("true"));
    assert_eq!(refused(&r, "member kid has 1 call(s) running, its limit (concurrent = 1)"), 1);
    assert_eq!(stdout(&exec_for(&b, "alice", "private", &alice).body), "alice\n");
    assert_eq!(parse(&slow.wait_with_output().unwrap()).code, 200);
    // The slot comes back when the call ends, and when its client goes away.
    assert_eq!(exec_for(&b, "kid", "private", &kid("true")).code, 200);
    let mut gone = client(&b, BOT, "/v1/exec", &bot_kid, &kid("touch gone; sleep 30")).spawn().unwrap();
    wait_for(&kid_ws.join("gone"));
    // runuser forks: the client holding the connection is its child, and
    // killing runuser alone would leave it connected until the call's own
    // timeout (10 s) freed the slot. Kill the client itself, and look for
    // the slot well before that timeout.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", gone.id())).unwrap();
    assert!(!children.trim().is_empty(), "runuser has no child");
    for pid in children.split_whitespace() {
        kill(Pid::from_raw(pid.parse().unwrap()), Signal::SIGKILL).unwrap();
    }
    let _ = gone.wait();
    let back = poll(Duration::from_secs(5), || {
        let r = exec_for(&b, "kid", "private", &kid("true"));
        (r.code == 200).then_some(())
    });
    assert!(back.is_some(), "kid's slot was not released when his client went away");
    // Requests per minute: the fifth call in the minute is his last.
    assert_eq!(exec_for(&b, "kid", "private", &kid("true")).code, 200);
    let r = exec_for(&b, "kid", "private", &kid("true"));
    let retry = refused(&r, "member kid made 5 call(s) in the last minute, its limit (requests_per_minute = 5)");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(exec_for(&b, "alice", "private", &alice).code, 200, "alice is served while kid waits");
    // His refusals are in the audit trail, with the limit.
    let limited = poll(Duration::from_secs(10), || {
        let rows = audit_rows(&b, &["--member", "kid"]);
        let limited: Vec<Value> = rows.into_iter().filter(|r| r["outcome"] == "rate_limited").collect();
        limited.first().is_some_and(|r| r["limit"] == "member kid requests_per_minute = 5").then_some(limited)
    })
    .unwrap_or_else(|| panic!("{:?}", audit_rows(&b, &["--member", "kid"])));
    assert!(limited.iter().skip(1).all(|r| r["limit"] == "member kid concurrent = 1"), "{limited:?}");
    assert!(limited.len() >= 2, "{limited:?}");

    // A tenant's cap counts everyone's calls to its workflows, members or
    // not (here root's own).
    for _ in 0..2 {
        b.exec("house-sh", &["true"]);
    }
    let (code, r) = b.exec_body(&json!({"workflow": "house-sh", "argv": ["true"]}));
    assert_eq!((code, r["error"]["code"].as_str()), (429, Some("rate_limited")), "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("tenant house made 2 call(s)"), "{r}");
    assert_eq!(stdout(&b.exec("alice-sh", &["echo", "other tenant"])), "other tenant\n");
}
