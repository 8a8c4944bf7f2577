//! The family's first steps (issue 12): a client named in a policy reaches
//! the socket and is served, a stranger is refused with the words that say
//! what to do, `doctor --as USER` tells the operator which; and the audit
//! trail: every call in the ledger, hash-chained, so an edited or deleted
//! row is found.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn family_policy() -> PolicyFile {
    let mut p = policy("chores", "fam", None, "", "", "min_idle = 1\nmax_workers = 2");
    p.text = p.text.replace("clients = { users = [], groups = [] }", "clients = { users = [\"alice\"], groups = [] }");
    p
}

#[test]
fn a_client_reaches_the_socket_and_a_stranger_is_told_why_not() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("family-reach", &[family_policy()]);
    // alice, a client, connects and is served.
    let out = b.cli(Some("alice"), &["exec", "chores", "--", "echo", "hi"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    // mallory reaches the socket (it is open) but is refused, told how to
    // become a client.
    let out = b.cli(Some("mallory"), &["exec", "chores", "--", "echo", "hi"]);
    assert!(!out.status.success(), "{out:?}");
    let t = text(&out);
    assert!(t.contains("may not use") && t.contains("clients.users") && t.contains("doctor --as"), "{t}");
    assert!(!t.contains("is it running"), "{t}");
    // doctor --as: both verdicts.
    let out = b.cli(None, &["doctor", "--as", "alice"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("alice can reach the broker's socket") && t.contains("alice may call: chores"), "{t}");
    let out = b.cli(None, &["doctor", "--as", "mallory"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("mallory can reach the broker's socket") && t.contains("mallory may call no workflow"), "{t}");
    // Only root may ask for another user.
    let out = b.cli(Some("alice"), &["doctor", "--as", "mallory"]);
    assert!(!out.status.success() && text(&out).contains("needs root"), "{out:?}");
    let (code, st) = b.http("GET", "/v1/status?as=mallory", None);
    assert_eq!((code, st["workflows"].as_array().map(Vec::len)), (200, Some(0)), "{st}");
    let (code, st) = b.http("GET", "/v1/status?as=alice", None);
    assert_eq!((code, st["workflows"][0]["name"].as_str()), (200, Some("chores")), "{st}");
    // A socket closed to alice: her error says she may not reach it (not
    // "is it running?"), doctor says so too; root still connects.
    std::fs::set_permissions(&b.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = b.cli(Some("alice"), &["exec", "chores", "--", "echo", "hi"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("may not reach the broker's socket") && t.contains("doctor --as"), "{t}");
    assert!(!t.contains("is it running"), "{t}");
    let out = b.cli(None, &["doctor", "--as", "alice"]);
    assert!(text(&out).contains("alice cannot reach the broker's socket"), "{}", text(&out));
    let out = b.cli(None, &["exec", "chores", "--", "echo", "root"]);
    assert!(out.status.success(), "{out:?}");
    std::fs::set_permissions(&b.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    // No socket at all: "is it running?".
    let out = std::process::Command::new(BIN)
        .args(["exec", "chores", "--", "true"])
        .env("CORRAL_SOCKET", b.dir.join("nothing.sock"))
        .output()
        .unwrap();
    assert!(text(&out).contains("is it running"), "{}", text(&out));
}

/// `corral audit --json` as `user`: the rows.
fn audit_rows(b: &Broker, user: Option<&str>, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(extra);
    let out = b.cli(user, &args);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn uid_of(name: &str) -> u64 {
    u64::from(nix::unistd::User::from_name(name).unwrap().unwrap().uid.as_raw())
}

#[test]
fn every_call_is_in_a_hash_chain_that_finds_an_edited_or_deleted_row() {
    if !full_sandbox() {
        return;
    }
    let stub = Stub::start(vec![answer("hello", 3, 2)]);
    let mut helper = llm_policy("helper", "fam-ai", &stub.base_url(), "");
    helper.text =
        helper.text.replace("clients = { users = [], groups = [] }", "clients = { users = [\"alice\"], groups = [] }");
    let mut chores = family_policy();
    chores.text = chores.text.replace("users = [\"alice\"]", "users = [\"alice\", \"kid\"]");
    let policies = [chores, helper];
    let b = Broker::start("family-audit", &policies);
    let run = |b: &Broker, user: Option<&str>, argv: &[&str]| {
        let mut args = vec!["exec", "chores", "--"];
        args.extend_from_slice(argv);
        b.cli(user, &args)
    };
    assert!(run(&b, Some("alice"), &["true"]).status.success());
    assert!(!run(&b, Some("alice"), &["false"]).status.success());
    assert!(run(&b, Some("kid"), &["true"]).status.success());
    let out = b.cli(Some("alice"), &["ask", "helper", "hi"]);
    assert!(out.status.success(), "{out:?}");
    // Exec rows are written in batches by the ledger's writer: wait for them.
    let all = poll(std::time::Duration::from_secs(10), || {
        let rows = audit_rows(&b, None, &[]);
        (rows.len() == 4).then_some(rows)
    })
    .unwrap_or_else(|| panic!("not 4 audit rows: {:?}", audit_rows(&b, None, &[])));
    let failed = all.iter().find(|r| r["outcome"] == "failed").expect("the failed exec");
    assert_eq!(failed["uid"], uid_of("alice"));
    assert_eq!(failed["kind"], "exec");
    assert!(all.iter().any(|r| r["kind"] == "ask" && r["workflow"] == "helper" && r["outcome"] == "ok"), "{all:?}");
    // Across a restart the chain runs on from the last row.
    let b = b.restart("family-audit", &policies);
    assert!(run(&b, Some("kid"), &["true"]).status.success());
    assert!(poll(std::time::Duration::from_secs(10), || (audit_rows(&b, None, &[]).len() == 5).then_some(())).is_some());
    let verify = |b: &Broker| {
        let out = b.cli(None, &["audit", "verify"]);
        (out.status.code(), text(&out))
    };
    let (code, t) = verify(&b);
    assert_eq!(code, Some(0), "{t}");
    assert!(t.contains("intact: 5 row(s)"), "{t}");
    // Each user sees their own rows only, whatever they ask for; root filters.
    let alice = audit_rows(&b, Some("alice"), &["--uid", &uid_of("kid").to_string()]);
    assert_eq!(alice.len(), 3, "{alice:?}");
    assert!(alice.iter().all(|r| r["uid"] == uid_of("alice")), "{alice:?}");
    let kid = audit_rows(&b, Some("kid"), &[]);
    assert_eq!(kid.len(), 2, "{kid:?}");
    assert!(audit_rows(&b, Some("mallory"), &[]).is_empty());
    assert_eq!(audit_rows(&b, None, &["--uid", &uid_of("kid").to_string()]).len(), 2);
    assert_eq!(audit_rows(&b, None, &["--workflow", "helper"]).len(), 1);
    // verify is root's.
    let out = b.cli(Some("alice"), &["audit", "verify"]);
    assert!(!out.status.success() && text(&out).contains("only root"), "{out:?}");
    // An edited outcome is found, at its row; put back, the chain holds.
    let id = failed["id"].as_i64().unwrap();
    let db = b.ledger();
    db.execute("UPDATE audit SET outcome = 'ok' WHERE id = ?1", [id]).unwrap();
    let (code, t) = verify(&b);
    assert_eq!(code, Some(1), "{t}");
    assert!(t.contains(&format!("BROKEN at row {id}")) && t.contains("edited"), "{t}");
    db.execute("UPDATE audit SET outcome = 'failed' WHERE id = ?1", [id]).unwrap();
    assert_eq!(verify(&b).0, Some(0));
    // A deleted row is found: the row after it names the gap.
    db.execute("DELETE FROM audit WHERE id = 2", []).unwrap();
    let (code, t) = verify(&b);
    assert_eq!(code, Some(1), "{t}");
    assert!(t.contains("BROKEN at row 3") && t.contains("deleted"), "{t}");
}
