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
