//! Sessions (issue 12): each conversation of a workflow gets a directory of
//! its own and a history. A session's calls reach neither another
//! session's files nor the workspace above them, by any path; the broker
//! keeps the history of each session apart and prepends it; idle sessions
//! expire; an owner keeps a bounded number; `corral sessions` lists and
//! removes them, each user their own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn uid_of(name: &str) -> u32 {
    nix::unistd::User::from_name(name).unwrap().unwrap().uid.as_raw()
}

/// `sh -c SCRIPT` in `session` of `workflow`, as root: (status, reply).
fn in_session(b: &Broker, workflow: &str, session: &str, script: &str) -> (u16, Value) {
    b.exec_body(&json!({"workflow": workflow, "argv": ["sh", "-c", script], "session": session}))
}

/// Like [`in_session`], expecting a 200 reply; returns it.
fn run(b: &Broker, workflow: &str, session: &str, script: &str) -> Value {
    let (code, reply) = in_session(b, workflow, session, script);
    assert_eq!(code, 200, "{script} in session {session}: {reply:#}");
    reply
}

fn ok(reply: &Value) -> bool {
    exit_code(reply) == Some(0)
}

fn shared_policy(name: &str, extra: &str) -> PolicyFile {
    let mut p = policy(name, "fam", None, "", "", "min_idle = 1\nmax_workers = 1");
    p.text = p
        .text
        .replace("clients = { users = [], groups = [] }", "clients = { users = [\"alice\", \"kid\"], groups = [] }");
    p.text.push_str(extra);
    p
}

#[test]
fn a_session_reaches_neither_another_session_nor_the_workspace() {
    if !full_sandbox() {
        return;
    }
    // "wide" may read the whole state directory, its workspace included:
    // no session layer could narrow that, so its sessions are refused.
    let dir = scratch_dir("sessions-apart");
    let mut wide = shared_policy("wide", "");
    wide.text = wide.text.replace(r#""/dev/urandom"]"#, &format!(r#""/dev/urandom", "{}"]"#, dir.display()));
    let b =
        Broker::start_in("sessions-apart", dir.clone(), &[shared_policy("notes", ""), wide], BrokerOptions::default());
    assert!(ok(&b.sh("wide", "true")));
    let r = run(&b, "wide", "w", "true");
    assert!(!ok(&r), "{r:#}");
    assert!(
        r["error"].as_str().unwrap_or("").contains(&format!("rule {} contains the workspace", dir.display())),
        "{r:#}"
    );
    let ws = b.workspace("fam", "notes");
    // One worker serves every call below: what keeps sessions apart is the
    // layer of each call, not the worker.
    assert!(ok(&b.sh("notes", "echo top-secret > top.txt")));
    let a = run(&b, "notes", "a", "echo a-secret > a.txt && pwd && echo \"$HOME $TMPDIR\"");
    assert!(ok(&a), "{a:#}");
    let a_dir = ws.join("sessions/uid-0/a");
    let b_dir = ws.join("sessions/uid-0/b");
    let lines: Vec<&str> = stdout(&a).lines().collect();
    assert_eq!(lines[0], a_dir.to_str().unwrap(), "{a:#}");
    assert_eq!(lines[1], format!("{} {}", a_dir.display(), a_dir.display()), "HOME and TMPDIR follow the session");
    // The receipt walks the session's directory: paths relative to it.
    assert_eq!(a["receipt"]["changes"]["created"][0]["path"], "a.txt", "{a:#}");
    assert!(ok(&run(&b, "notes", "b", "echo b-own > b.txt")));

    // Session B, every way to session A's file and to the workspace.
    let a_file = a_dir.join("a.txt");
    let top = ws.join("top.txt");
    let attacks = [
        "cat ../a/a.txt".to_string(),
        format!("cat {}", a_file.display()),
        format!("ls {}", a_dir.display()),
        "ls ..".to_string(),
        "echo x > ../a/evil".to_string(),
        format!("echo x > {}/evil", a_dir.display()),
        "cat ../../../top.txt".to_string(),
        format!("cat {}", top.display()),
        format!("ls {}", ws.display()),
        format!("echo x > {}/evil", ws.display()),
        format!("cd {} && cat top.txt", ws.display()),
        format!("ln -s {} steal && cat steal", a_file.display()),
    ];
    for attack in &attacks {
        let r = run(&b, "notes", "b", attack);
        assert!(!ok(&r), "session b ran {attack:?}: {r:#}");
        assert!(!stdout(&r).contains("secret"), "{attack:?}: {r:#}");
    }
    assert!(!a_dir.join("evil").exists() && !ws.join("evil").exists());
    // A symlink planted in A towards B's file (and the workspace's) leads
    // nowhere either, and B reading through A's symlink neither.
    let r = run(
        &b,
        "notes",
        "a",
        &format!(
            "ln -s {} to-b; ln -s {} to-top; cat to-b || cat to-top",
            b_dir.join("b.txt").display(),
            top.display()
        ),
    );
    assert!(!ok(&r) && !stdout(&r).contains("b-own") && !stdout(&r).contains("top-secret"), "{r:#}");
    let r = run(&b, "notes", "b", &format!("cat {}/to-top", a_dir.display()));
    assert!(!ok(&r), "{r:#}");

    // The other side: each session still has its own files, and a call
    // without a session still has the workspace (sessions included).
    assert_eq!(stdout(&run(&b, "notes", "a", "cat a.txt")), "a-secret\n");
    assert_eq!(stdout(&run(&b, "notes", "b", "cat b.txt")), "b-own\n");
    assert_eq!(stdout(&b.sh("notes", "cat top.txt sessions/uid-0/b/b.txt")), "top-secret\nb-own\n");

    // Another owner's session of the same id is another directory.
    let out = b.cli(Some("alice"), &["exec", "--session", "a", "notes", "--", "sh", "-c", "pwd; cat a.txt"]);
    let alice_dir = ws.join(format!("sessions/uid-{}/a", uid_of("alice")));
    assert!(!out.status.success(), "alice read root's session file: {}", text(&out));
    assert_eq!(text(&out).lines().next(), Some(alice_dir.to_str().unwrap()), "{}", text(&out));
    let out = b.cli(Some("alice"), &["exec", "--session", "a", "notes", "--", "cat", a_file.to_str().unwrap()]);
    assert!(!out.status.success() && !text(&out).contains("a-secret"), "{}", text(&out));
    let out = b.cli(Some("alice"), &["exec", "--session", "a", "notes", "--", "sh", "-c", "echo mine > m; cat m"]);
    assert!(out.status.success() && out.stdout == b"mine\n", "{}", text(&out));

    // Bad ids, and a header that disagrees with the body, are refused.
    for bad in ["", ".", "..", ".x", "a/b", &"x".repeat(65)] {
        let (code, reply) = in_session(&b, "notes", bad, "true");
        assert_eq!(code, 400, "{bad:?}: {reply:#}");
        assert!(reply["error"]["message"].as_str().unwrap().contains("session id"), "{reply:#}");
    }
    assert!(!ws.join("sessions/uid-0/x").exists());
    let curl = |header: &str, body: &Value| {
        let out = std::process::Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&b.socket)
            .args(["-H", "content-type: application/json", "-H", header, "-d"])
            .arg(body.to_string())
            .arg("http://corral/v1/exec")
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let r = curl("x-corral-session: a", &json!({"workflow": "notes", "argv": ["pwd"], "session": "b"}));
    assert!(r["error"]["message"].as_str().unwrap_or("").contains("differ"), "{r:#}");
    let r = curl("x-corral-session: hdr", &json!({"workflow": "notes", "argv": ["pwd"]}));
    assert_eq!(stdout(&r).trim_end(), ws.join("sessions/uid-0/hdr").to_str().unwrap(), "{r:#}");

    // The audit trail names the session.
    let rows = poll(std::time::Duration::from_secs(10), || {
        let c = b.ledger();
        let n: i64 = c.query_row("SELECT COUNT(*) FROM audit WHERE session = 'b'", [], |r| r.get(0)).unwrap();
        (n >= 2).then_some(n)
    });
    assert!(rows.is_some(), "no audit row with session b");
}

fn messages(r: &Received) -> Vec<(String, String)> {
    r.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap_or("").to_string(), m["content"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn ask_in(b: &Broker, workflow: &str, session: &str, prompt: &str) -> Value {
    let body = json!({"workflow": workflow, "prompt": prompt, "session": session});
    let (code, reply) = b.http("POST", "/v1/ask", Some(body.to_string().as_bytes()));
    assert_eq!(code, 200, "{reply:#}");
    reply
}

fn session_dir(ws: &Path, owner: &str, id: &str) -> PathBuf {
    ws.join("sessions").join(owner).join(id)
}

#[test]
fn a_session_keeps_its_history_and_its_tools_write_in_its_directory() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![
        tool_call("c1", "write_file", &json!({"path": "note.txt", "content": "remember"})),
        answer("first answer", 3, 2),
        answer("second answer", 3, 2),
        answer("other session", 3, 2),
        answer("alice's answer", 3, 2),
        answer("chat answer", 3, 2),
        answer("after restart", 3, 2),
    ]);
    let mut p = llm_policy("helper", "fam-ai", &stub.base_url(), "");
    p.text = p.text.replace("clients = { users = [], groups = [] }", "clients = { users = [\"alice\"], groups = [] }");
    let policies = [p];
    let b = Broker::start("sessions-history", &policies);
    let ws = b.workspace("fam-ai", "helper");

    ask_in(&b, "helper", "s1", "hello one");
    // The tool's file is in the session's directory, not the workspace.
    assert_eq!(std::fs::read_to_string(session_dir(&ws, "uid-0", "s1").join("note.txt")).unwrap(), "remember");
    assert!(!ws.join("note.txt").exists());
    let r = ask_in(&b, "helper", "s1", "hello two");
    assert_eq!(r["answer"], "second answer");
    let got = stub.received();
    assert_eq!(got.len(), 3);
    let second = messages(&got[2]);
    let user_turns: Vec<&str> = second.iter().filter(|(r, _)| r == "user").map(|(_, c)| c.as_str()).collect();
    assert_eq!(user_turns, ["hello one", "hello two"], "{second:?}");
    assert!(second.contains(&("assistant".into(), "first answer".into())), "{second:?}");
    // Tool internals are not history.
    assert!(!second.iter().any(|(r, _)| r == "tool"), "{second:?}");

    // Another session of the same owner starts empty.
    ask_in(&b, "helper", "s2", "hello three");
    let third = messages(&stub.received()[3]);
    assert!(!third.iter().any(|(_, c)| c.contains("hello one") || c.contains("first answer")), "{third:?}");

    // Another owner's session with the same id has none of root's history.
    let out = b.cli(Some("alice"), &["ask", "--session", "s1", "helper", "from alice"]);
    assert!(out.status.success() && text(&out).contains("alice's answer"), "{}", text(&out));
    let fourth = messages(&stub.received()[4]);
    assert_eq!(fourth, [("user".to_string(), "from alice".to_string())], "alice saw root's history: {fourth:?}");

    // /v1/chat/completions: the client sends only the new turn.
    let body = json!({"model": "helper", "session": "s1", "messages": [{"role": "user", "content": "chat turn"}]});
    let (code, reply) = b.http("POST", "/v1/chat/completions", Some(body.to_string().as_bytes()));
    assert_eq!((code, &reply["choices"][0]["message"]["content"]), (200, &json!("chat answer")), "{reply:#}");
    let fifth: Vec<String> = messages(&stub.received()[5]).into_iter().map(|(_, c)| c).collect();
    assert_eq!(fifth, ["hello one", "first answer", "hello two", "second answer", "chat turn"], "{fifth:?}");

    // The history is in the ledger: it survives a restart.
    let b = b.restart("sessions-history", &policies);
    ask_in(&b, "helper", "s1", "after");
    let sixth: Vec<String> = messages(&stub.received()[6]).into_iter().map(|(_, c)| c).collect();
    assert_eq!(sixth.first().map(String::as_str), Some("hello one"), "{sixth:?}");
    assert_eq!(sixth.len(), 7, "{sixth:?}");
    let rows = |b: &Broker, owner: &str, id: &str| -> i64 {
        b.ledger()
            .query_row(
                "SELECT COUNT(*) FROM session_messages WHERE workflow = 'helper' AND owner = ?1 AND id = ?2",
                [owner, id],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(rows(&b, "uid-0", "s1"), 8);
    assert_eq!(rows(&b, &format!("uid-{}", uid_of("alice")), "s1"), 2);
}

#[test]
fn sessions_expire_are_capped_and_are_listed_and_removed_by_their_owner() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("short-lived", 3, 2)]);
    let mut brief = llm_policy("brief", "fam-ai", &stub.base_url(), "");
    brief.text.push_str("\n[sessions]\nidle = \"2s\"\n");
    let capped = shared_policy("capped", "\n[sessions]\nmax = 2\n");
    let b = Broker::start("sessions-life", &[brief, capped]);
    let alice = format!("uid-{}", uid_of("alice"));
    let ws = b.workspace("fam", "capped");
    let exec_as = |user: &str, id: &str| b.cli(Some(user), &["exec", "--session", id, "capped", "--", "true"]);

    // The cap: a third session of alice is refused, saying what to do;
    // kid's own are counted apart.
    assert!(exec_as("alice", "x1").status.success());
    assert!(exec_as("alice", "x2").status.success());
    assert!(exec_as("alice", "x1").status.success(), "an existing session is not a new one");
    let out = exec_as("alice", "x3");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("corral sessions rm --workflow capped"), "{}", text(&out));
    assert!(!session_dir(&ws, &alice, "x3").exists());
    assert!(exec_as("kid", "x1").status.success());

    // `corral sessions`: each user their own; root everyone's.
    let list = |user: Option<&str>| -> Vec<Value> {
        let out = b.cli(user, &["sessions", "--workflow", "capped", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    };
    let ids = |rows: &[Value]| -> Vec<String> {
        rows.iter().map(|r| format!("{}/{}", r["owner"].as_str().unwrap(), r["id"].as_str().unwrap())).collect()
    };
    assert_eq!(ids(&list(Some("alice"))), [format!("{alice}/x1"), format!("{alice}/x2")]);
    let kid = format!("uid-{}", uid_of("kid"));
    assert_eq!(ids(&list(Some("kid"))), [format!("{kid}/x1")]);
    assert_eq!(list(None).len(), 3);
    let out = b.cli(Some("alice"), &["sessions"]);
    assert!(out.status.success() && text(&out).contains("x2"), "{}", text(&out));

    // kid cannot remove alice's x2 (his own x1 is another session), nor
    // name an owner; alice can, and then opens x3.
    let out = b.cli(Some("kid"), &["sessions", "rm", "--workflow", "capped", "x2"]);
    assert!(!out.status.success() && text(&out).contains("no session"), "{}", text(&out));
    let out = b.cli(Some("kid"), &["sessions", "rm", "--workflow", "capped", "--owner", &alice, "x1"]);
    assert!(!out.status.success() && text(&out).contains("only root"), "{}", text(&out));
    assert!(session_dir(&ws, &alice, "x2").is_dir() && session_dir(&ws, &alice, "x1").is_dir());
    let out = b.cli(Some("alice"), &["sessions", "rm", "--workflow", "capped", "x2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!session_dir(&ws, &alice, "x2").exists());
    assert!(exec_as("alice", "x3").status.success());
    // Root removes any: kid's x1, by owner.
    let out = b.cli(None, &["sessions", "rm", "--workflow", "capped", "--owner", &kid, "x1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!session_dir(&ws, &kid, "x1").exists() && session_dir(&ws, &alice, "x1").is_dir());
    // A symlink planted in place of a session's directory (as a call
    // outside every session could) is neither used nor followed by the
    // removal; nor is one inside it.
    let bait = b.dir.join("bait");
    std::fs::create_dir_all(&bait).unwrap();
    std::fs::write(bait.join("keep"), "keep").unwrap();
    let x1 = session_dir(&ws, &alice, "x1");
    std::fs::remove_dir_all(&x1).unwrap();
    std::os::unix::fs::symlink(&bait, &x1).unwrap();
    let out = b.cli(Some("alice"), &["exec", "--session", "x1", "capped", "--", "sh", "-c", "echo x > planted"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!bait.join("planted").exists());
    assert!(b.cli(Some("alice"), &["sessions", "rm", "--workflow", "capped", "x1"]).status.success());
    assert!(!x1.exists() && bait.join("keep").is_file(), "the removal followed a planted symlink");
    assert!(b
        .cli(Some("alice"), &["exec", "--session", "x4", "capped", "--", "ln", "-s", bait.to_str().unwrap(), "out"])
        .status
        .success());
    assert!(b.cli(Some("alice"), &["sessions", "rm", "--workflow", "capped", "x4"]).status.success());
    assert!(bait.join("keep").is_file(), "the removal followed a symlink inside the session");

    // Expiry: idle "2s" removes the directory and the history.
    let brief_ws = b.workspace("fam-ai", "brief");
    ask_in(&b, "brief", "soon", "remember me");
    let rows = |table: &str| -> i64 {
        b.ledger()
            .query_row(&format!("SELECT COUNT(*) FROM {table} WHERE workflow = 'brief'"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!((rows("sessions"), rows("session_messages")), (1, 2));
    assert!(session_dir(&brief_ws, "uid-0", "soon").is_dir());
    let gone = poll(std::time::Duration::from_secs(10), || {
        (rows("sessions") == 0 && !session_dir(&brief_ws, "uid-0", "soon").exists()).then_some(())
    });
    assert!(gone.is_some(), "the idle session was not swept");
    assert_eq!(rows("session_messages"), 0);
    // The capped workflow's sessions (idle 24h) are still there.
    assert!(session_dir(&ws, &alice, "x3").is_dir());
}
