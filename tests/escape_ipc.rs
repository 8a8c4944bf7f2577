//! Escapes through descriptors and sockets: a tool must not inherit the
//! worker's broker socket, and must not be able to call the broker through
//! its public socket (Landlock cannot restrict pathname Unix sockets before
//! ABI 9, so the broker itself refuses callers from inside a sandbox).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn tool_inherits_only_its_stdio() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("fds", &shipped_policies());
    // python lists its own descriptors: only 0, 1, 2 (and the listing's own).
    let r = b.exec(
        "shell-tools",
        &["python3", "-c", "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"],
    );
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    let fds: Vec<u32> = serde_json::from_str(stdout(&r).trim()).unwrap();
    // 0,1,2 plus the directory descriptor listdir holds while it reads.
    assert_eq!(&fds[..3], &[0, 1, 2], "{r:#}");
    assert!(fds.len() <= 4, "tool inherited descriptors: {fds:?}");
    // The neighbour: a descriptor the tool opens itself is there.
    let r = b.sh("shell-tools", "exec 7>$HOME/f; ls /proc/self/fd");
    assert!(stdout(&r).split_whitespace().any(|f| f == "7"), "{r:#}");
}

const CALL_BROKER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = b'{"workflow":"shell-tools","argv":["id"]}'
s.sendall(b"POST /v1/exec HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
out = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    out += chunk
print(out.decode(errors="replace"))
"#;

#[test]
fn tool_cannot_call_the_broker_through_its_socket() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("selfcall", &shipped_policies());
    let sock = b.socket.to_str().unwrap().to_string();
    let r = b.exec("shell-tools", &["python3", "-c", CALL_BROKER, &sock]);
    if corral::sandbox::probe().landlock_abi < 6 {
        // Without Landlock scopes tools get no Unix sockets at all (seccomp).
        assert_ne!(exit_code(&r), Some(0), "{r:#}");
        assert!(stderr(&r).contains("PermissionError") || stderr(&r).contains("Operation not permitted"), "{r:#}");
    } else {
        assert_eq!(exit_code(&r), Some(0), "the connection itself is possible (ABI < 9): {r:#}");
        let answer = stdout(&r);
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(answer.contains("inside a corral sandbox"), "{answer}");
        assert!(!answer.contains("uid="), "the inner call must not run: {answer}");
    }
    // The neighbour: the same request from outside any sandbox works.
    let outside = std::process::Command::new("python3").args(["-c", CALL_BROKER, &sock]).output().unwrap();
    let text = String::from_utf8_lossy(&outside.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("uid="), "{text}");
}

#[test]
fn status_shows_a_tenant_only_its_own_workflows() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("status-tenant", &shipped_policies());
    let out = b.cli(Some("kid"), &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = st["workflows"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["homework"], "kid sees only homework");
    // root sees every workflow.
    let all: Vec<String> =
        b.status()["workflows"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(all, ["coding", "family-chat", "homework", "shell-tools"]);
}

/// A policy of `tenant` that may also write /dev/shm (POSIX shared memory).
fn shm_policy(name: &str, tenant: &str, user: &str) -> PolicyFile {
    let p = policy(name, tenant, Some(user), "", "", "min_idle = 1\nmax_workers = 1");
    let text = p.text.replace("write = [\"{workspace}\"]", "write = [\"{workspace}\", \"/dev/shm\"]");
    assert!(text.contains("\"/dev/shm\""), "{text}");
    PolicyFile { text, ..p }
}

#[test]
fn posix_shared_memory_of_one_tenant_is_not_another_tenants() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "shm-tenants",
        &[shm_policy("kidshm", "kid", "corral-kid"), shm_policy("aliceshm", "alice", "corral-alice")],
    );
    let name = format!("corral-shm-{}", std::process::id());
    // kid's call makes a world-readable POSIX shm object and reads it back.
    let r = b.sh("kidshm", &format!("umask 0; echo kid-secret > /dev/shm/{name} && cat /dev/shm/{name}"));
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert_eq!(stdout(&r), "kid-secret\n", "{r:#}");
    // alice, with the same rights on /dev/shm, finds nothing: each worker
    // has its own.
    let r = b.sh("aliceshm", &format!("ls -A /dev/shm; cat /dev/shm/{name}"));
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(stderr(&r).contains("No such file"), "{r:#}");
    assert!(!stdout(&r).contains("corral-shm"), "{r:#}");
    // Nor is it in the host's /dev/shm.
    assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
    // Nor in kid's own next calls: the worker empties its /dev/shm after
    // each call (and spares the listing only while nothing was added).
    for round in 0..2 {
        let r = b.sh("kidshm", &format!("ls -A /dev/shm; mkdir /dev/shm/d{round} && echo x > /dev/shm/d{round}/f"));
        assert_eq!(exit_code(&r), Some(0), "{r:#}");
        let left: Vec<&str> = stdout(&r).lines().filter(|l| *l != ".mqueue").collect();
        assert!(left.is_empty(), "round {round}: a call found what an earlier one left: {r:#}");
    }
}
