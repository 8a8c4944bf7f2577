//! The escape suite: each case asserts that an attack from inside a tool call
//! fails *and* that its legitimate neighbour succeeds, so a setup that denies
//! everything cannot pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn reading_etc_shadow_fails_but_etc_passwd_works() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("shadow", &shipped_policies());
    let attack = b.exec("shell-tools", &["cat", "/etc/shadow"]);
    assert_ne!(exit_code(&attack), Some(0), "{attack:#}");
    assert!(stderr(&attack).contains("Permission denied"), "{attack:#}");
    assert!(!stdout(&attack).contains("root:"), "{attack:#}");
    let ok = b.exec("shell-tools", &["cat", "/etc/passwd"]);
    assert_eq!(exit_code(&ok), Some(0), "{ok:#}");
    assert!(stdout(&ok).contains("root:x:0:0"), "{ok:#}");
}

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// A Python prelude for syscall probes: `sc(nr, *args)` returns
/// `(result, errno)` of `syscall(2)` through ctypes.
const PY_PRELUDE: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return r, ctypes.get_errno()
"#;

/// Runs a Python probe (prefixed with [`PY_PRELUDE`]) in `workflow`; expects
/// it to exit 0 and returns its stdout.
fn py(b: &Broker, workflow: &str, code: &str) -> String {
    let script = format!("{PY_PRELUDE}\n{code}");
    let r = b.exec(workflow, &["python3", "-c", &script]);
    assert_eq!(exit_code(&r), Some(0), "python probe failed: {r:#}");
    stdout(&r).to_string()
}

/// The value printed for `key` by a probe that prints `key value` lines.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no `{key}` line in probe output:\n{out}"))
        .trim()
}

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user).unwrap().unwrap_or_else(|| panic!("user {user} missing")).uid.as_raw()
}

/// A syscall probe is x86_64-specific; on other arches the test says so.
fn x86_64_only() -> bool {
    if cfg!(target_arch = "x86_64") {
        true
    } else {
        eprintln!("SKIP: syscall numbers in this test are x86_64's");
        false
    }
}

fn assert_ok(r: &Value) {
    assert_eq!(exit_code(r), Some(0), "{r:#}");
}

fn assert_denied(r: &Value, msg: &str) {
    assert_denied_any(r, &[msg]);
}

/// Refused with one of `msgs` (a process outside the worker's PID
/// namespace is not even there: "No such process", "No such file").
fn assert_denied_any(r: &Value, msgs: &[&str]) {
    assert_ne!(exit_code(r), Some(0), "attack succeeded: {r:#}");
    assert!(msgs.iter().any(|m| stderr(r).contains(m)), "expected one of {msgs:?}: {r:#}");
}

#[test]
fn writing_outside_the_workspace_fails_but_the_workspace_works() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("write", &shipped_policies());
    let tag = format!("corral-escape-{}", std::process::id());

    // /etc: not writable by Landlock (nor by the uid); as a unit, the
    // service's ProtectSystem=strict makes it read-only even before that.
    let etc = format!("/etc/{tag}");
    let r = b.sh("shell-tools", &format!("echo pwned > {etc}"));
    assert_denied(&r, if b.is_unit() { "Read-only file system" } else { "Permission denied" });
    assert!(!Path::new(&etc).exists());

    // /tmp is world-writable: only Landlock stands in the way (as a unit,
    // /tmp is the service's PrivateTmp=, writable too). Looked at through the
    // broker's own root, so the check sees the /tmp the tool saw.
    let tmp = format!("/tmp/{tag}");
    let r = b.sh("shell-tools", &format!("echo pwned > {tmp}"));
    assert_denied(&r, "Permission denied");
    let broker_root = format!("/proc/{}/root", b.pid());
    assert!(Path::new(&format!("{broker_root}/tmp")).is_dir(), "the broker's /tmp is not visible from here");
    assert!(!Path::new(&format!("{broker_root}{tmp}")).exists());

    // The other tenant's workspace, both ways. Workspaces with disk_max are
    // mounted in the broker's mount namespace: look through its root.
    let in_broker = |p: &Path| Path::new(&broker_root).join(p.strip_prefix("/").unwrap());
    let alice_ws = b.workspace("alice", "family-chat");
    let kid_ws = b.workspace("kid", "homework");
    for (wf, target) in [("homework", &alice_ws), ("family-chat", &kid_ws)] {
        let file = target.join("pwned");
        let r = b.sh(wf, &format!("echo pwned > {}", file.display()));
        assert_denied(&r, "Permission denied");
        assert!(!in_broker(&file).exists(), "{wf} wrote {}", file.display());
    }

    // Neighbour: each workflow writes its own workspace ($HOME), and the file
    // is there on the host, owned by the worker's uid.
    for (wf, ws, user) in [
        ("homework", &kid_ws, "corral-kid"),
        ("family-chat", &alice_ws, "corral-alice"),
        ("shell-tools", &b.workspace("ops", "shell-tools"), WORKER_USER),
    ] {
        let r = b.sh(wf, "echo mine > \"$HOME/own.txt\" && cat \"$HOME/own.txt\"");
        assert_ok(&r);
        assert_eq!(stdout(&r), "mine\n", "{r:#}");
        let path = in_broker(&ws.join("own.txt"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.uid(), uid_of(user), "{}", path.display());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine\n");
    }
}

#[test]
fn links_from_the_workspace_do_not_reach_outside() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("links", &shipped_policies());
    // A secret the worker's uid could read: only Landlock stands in the way.
    let secret = b.dir.join("secret.txt");
    std::fs::write(&secret, "top-secret-link-target\n").unwrap();
    let uid = uid_of(WORKER_USER);
    std::os::unix::fs::chown(&secret, Some(uid), None).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = secret.display();

    // Sanity: the uid alone could read it.
    let out =
        std::process::Command::new("runuser").args(["-u", WORKER_USER, "--", "cat"]).arg(&secret).output().unwrap();
    assert!(out.status.success(), "{out:?}");

    let r = b.sh("shell-tools", &format!("ln -s {s} \"$HOME/l\" && cat \"$HOME/l\""));
    assert_denied(&r, "Permission denied");
    assert!(!stdout(&r).contains("top-secret"), "{r:#}");

    let r = b.sh("shell-tools", &format!("ln {s} \"$HOME/h\"; cat \"$HOME/h\""));
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    // Landlock refuses a link that would give the file more rights than it
    // has where it is: EXDEV.
    assert!(stderr(&r).contains("ln: failed to create hard link"), "{r:#}");
    assert!(stderr(&r).contains("Invalid cross-device link"), "{r:#}");
    assert!(!stdout(&r).contains("top-secret"), "{r:#}");
    assert!(!b.workspace("ops", "shell-tools").join("h").exists());

    // Neighbour: links to a file inside the workspace work.
    let r = b.sh(
        "shell-tools",
        "echo inside > \"$HOME/f\" && ln -s \"$HOME/f\" \"$HOME/l2\" && ln \"$HOME/f\" \"$HOME/h2\" \
         && cat \"$HOME/l2\" \"$HOME/h2\"",
    );
    assert_ok(&r);
    assert_eq!(stdout(&r), "inside\ninside\n", "{r:#}");
}

#[test]
fn broker_proc_environ_and_mem_are_unreadable() {
    if !full_sandbox() {
        return;
    }
    let secret = format!("s3cr3t-{}-environ", std::process::id());
    let opts = BrokerOptions { env: vec![("CORRAL_TEST_SECRET".into(), secret.clone())], ..Default::default() };
    let b = Broker::start_with("environ", &shipped_policies(), opts);
    // Sanity: the secret is really in the broker's environment.
    let env = std::fs::read(format!("/proc/{}/environ", b.pid())).unwrap();
    assert!(String::from_utf8_lossy(&env).contains(&secret));

    // The broker as the tools see it (a namespace PID under systemd).
    let pid = b.ns_pid();
    for file in ["environ", "mem"] {
        let r = b.exec("shell-tools", &["cat", &format!("/proc/{pid}/{file}")]);
        assert_denied_any(&r, &["Permission denied", "No such file or directory"]);
        assert!(!stdout(&r).contains(&secret), "{r:#}");
        assert!(!stderr(&r).contains(&secret), "{r:#}");
    }
    // The worker (the tool's parent) does not leak it either, nor the tool's
    // own environment.
    let r = b.sh("shell-tools", "cat /proc/$PPID/environ; env");
    assert!(!stdout(&r).contains(&secret), "{r:#}");
    assert!(stderr(&r).contains("Permission denied"), "{r:#}");

    // Neighbour: the tool's own status is readable.
    let r = b.exec("shell-tools", &["cat", "/proc/self/status"]);
    assert_ok(&r);
    assert!(stdout(&r).contains("Pid:"), "{r:#}");
}

#[test]
fn ptrace_fails_everywhere_but_signalling_own_child_works() {
    if !full_sandbox() || !x86_64_only() {
        return;
    }
    let b = Broker::start("ptrace", &shipped_policies());
    let code = format!(
        r#"
import signal, time
PTRACE_ATTACH = 16
child = os.fork()
if child == 0:
    time.sleep(10)
    os._exit(0)
for name, pid in [("child", child), ("worker", os.getppid()), ("broker", {broker})]:
    r, e = sc(101, PTRACE_ATTACH, pid, 0, 0)
    print(name, r, e)
r, e = sc(39)
print("getpid", r == os.getpid(), e)
print("kill", libc.kill(child, signal.SIGTERM))
_, status = os.waitpid(child, 0)
print("child-signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1)
"#,
        broker = b.ns_pid()
    );
    let out = py(&b, "shell-tools", &code);
    for who in ["child", "worker", "broker"] {
        assert_eq!(field(&out, who), format!("-1 {}", libc::EPERM), "{out}");
    }
    assert_eq!(field(&out, "getpid"), "True 0", "{out}");
    assert_eq!(field(&out, "kill"), "0", "{out}");
    assert_eq!(field(&out, "child-signal"), "15", "{out}");
}

#[test]
fn signals_to_other_processes_fail_but_own_children_work() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("signals", &shipped_policies());
    let others = b.worker_pids("family-chat");
    assert!(!others.is_empty(), "no family-chat worker");
    // PIDs as the tool sees them (namespace PIDs under systemd).
    for pid in others.iter().copied().chain([b.ns_pid()]) {
        let r = b.sh("shell-tools", &format!("kill -0 {pid}"));
        assert_denied_any(&r, &["Operation not permitted", "No such process"]);
    }
    if require(&["landlock-scopes"]) {
        // Same uid, but the tool's own Landlock scope keeps it from its worker.
        let r = b.sh("shell-tools", "kill -0 $PPID");
        assert_denied(&r, "Operation not permitted");
    }
    // The workers are all still alive.
    for pid in &others {
        assert!(Path::new(&format!("/proc/{}", b.host_pid(*pid))).exists());
    }
    // Neighbour: its own child.
    let r = b.sh("shell-tools", "sleep 5 & kill $!; wait $!; echo rc=$?");
    assert_ok(&r);
    assert_eq!(stdout(&r), "rc=143\n", "{r:#}");
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn tcp_is_refused_without_rules_and_limited_to_listed_ports() {
    if !full_sandbox() {
        return;
    }
    let lp = TcpListener::bind("127.0.0.1:0").unwrap();
    let lq = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = lp.local_addr().unwrap().port();
    let q = lq.local_addr().unwrap().port();
    let bind_ok = free_port();
    let bind_no = free_port();
    let mut policies = shipped_policies();
    let ports = format!("tcp_connect = [{p}]\ntcp_bind = [{bind_ok}]");
    // Its own user, so its own tenant (a tenant is one user): below Landlock
    // ABI 6 the broker refuses required workflows that share a user
    // (shell-tools runs as corral-worker).
    policies.push(policy("net", "net", Some("corral-test"), &ports, "", ""));
    let b = Broker::start("tcp", &policies);

    let probe = format!(
        r#"
import socket
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, e.errno)
def connect(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(("127.0.0.1", port))
    s.sendall(b"hello-from-sandbox")
    s.close()
def bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    s.close()
attempt("connect-p", lambda: connect({p}))
attempt("connect-q", lambda: connect({q}))
attempt("bind-ok", lambda: bind({bind_ok}))
attempt("bind-no", lambda: bind({bind_no}))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
"#
    );

    // shell-tools: no network at all; socket(AF_INET) itself is refused.
    let out = py(&b, "shell-tools", &probe);
    let eperm = libc::EPERM.to_string();
    for name in ["connect-p", "connect-q", "bind-ok", "bind-no", "udp"] {
        assert_eq!(field(&out, name), eperm, "{name}: {out}");
    }
    // Unix sockets: scoped by Landlock from ABI 6; below it refused outright
    // (abstract ones could not be told apart).
    let abi = corral::sandbox::probe().landlock_abi;
    let unix = if abi >= 6 { "ok".to_string() } else { eperm.clone() };
    assert_eq!(field(&out, "unix"), unix, "ABI {abi}: {out}");
    let r = b.exec("shell-tools", &["bash", "-c", &format!("echo x > /dev/tcp/127.0.0.1/{p}")]);
    assert_denied(&r, "Operation not permitted");
    lp.set_nonblocking(true).unwrap();
    assert!(lp.accept().is_err(), "shell-tools reached the listener");

    let abi = corral::sandbox::probe().landlock_abi;
    if !require(&["landlock-tcp"]) {
        // No Landlock TCP rules (ABI < 4): a required workflow that lists
        // ports refuses to run, naming the key and the kernel that has them.
        let (code, r) = b.exec_body(&serde_json::json!({ "workflow": "net", "argv": ["true"] }));
        assert_eq!(code, 503, "{r:#}");
        assert_eq!(r["error"]["code"], "unavailable", "{r:#}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("sandbox.tcp_connect") && msg.contains("Linux 6.7"), "{msg}");
        // The same ports with landlock = "best-effort": it runs, with no
        // network at all (seccomp), not with an unrestricted one.
        let mut be = policy("net", "net", Some("corral-test"), &ports, "", "");
        be.text = be.text.replacen("landlock = \"required\"", "landlock = \"best-effort\"", 1);
        let b2 = Broker::start("tcp-be", &[be]);
        let out = py(&b2, "net", &probe);
        for name in ["connect-p", "connect-q", "bind-ok", "bind-no", "udp"] {
            assert_eq!(field(&out, name), eperm, "best-effort {name} on ABI {abi}: {out}");
        }
        let r = b2.exec("net", &["bash", "-c", &format!("echo x > /dev/tcp/127.0.0.1/{p}")]);
        assert_denied(&r, "Operation not permitted");
        assert!(lp.accept().is_err(), "best-effort net reached the listed port on ABI {abi}");
        lq.set_nonblocking(true).unwrap();
        assert!(lq.accept().is_err(), "best-effort net reached an unlisted port on ABI {abi}");
        // The workflow says what holds the network promise.
        let st = b2.status();
        let wf = st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == "net").unwrap().clone();
        let net = wf["enforcement"].as_array().unwrap().iter().find(|e| e["promise"] == "network").unwrap().clone();
        assert!(net["by"].as_str().unwrap_or_default().starts_with("none"), "{wf:#}");
        return;
    }
    // net: exactly the listed ports.
    let out = py(&b, "net", &probe);
    assert_eq!(field(&out, "connect-p"), "ok", "{out}");
    assert_eq!(field(&out, "connect-q"), libc::EACCES.to_string(), "{out}");
    assert_eq!(field(&out, "bind-ok"), "ok", "{out}");
    assert_eq!(field(&out, "bind-no"), libc::EACCES.to_string(), "{out}");
    assert_eq!(field(&out, "udp"), eperm, "{out}");
    // The listener on P got the connection and its bytes; Q got nothing.
    lp.set_nonblocking(false).unwrap();
    let (mut conn, _) = lp.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello-from-sandbox");
    lq.set_nonblocking(true).unwrap();
    assert!(lq.accept().is_err(), "net reached the unlisted port");
}

#[test]
fn user_namespaces_cannot_be_created_but_fork_works() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("userns", &shipped_policies());
    let r = b.exec("shell-tools", &["unshare", "-U", "true"]);
    assert_denied(&r, "Operation not permitted");
    let out = py(
        &b,
        "shell-tools",
        r#"
CLONE_NEWUSER = 0x10000000
ctypes.set_errno(0)
print("libc-unshare", libc.unshare(CLONE_NEWUSER), ctypes.get_errno())
if hasattr(os, "unshare"):
    try:
        os.unshare(os.CLONE_NEWUSER)
        print("os-unshare ok")
    except OSError as e:
        print("os-unshare", e.errno)
else:
    print("os-unshare absent")  # Python < 3.12: the libc probe above stands in
"#,
    );
    assert_eq!(field(&out, "libc-unshare"), format!("-1 {}", libc::EPERM), "{out}");
    let os_unshare = field(&out, "os-unshare");
    assert!(os_unshare == libc::EPERM.to_string() || os_unshare == "absent", "{out}");
    // Neighbour: a plain fork.
    let r = b.sh("shell-tools", "(true) && echo ok");
    assert_ok(&r);
    assert_eq!(stdout(&r), "ok\n");
}

#[test]
fn mount_fails_but_mkdir_in_the_workspace_works() {
    if !full_sandbox() || !x86_64_only() {
        return;
    }
    let b = Broker::start("mount", &shipped_policies());
    // Neighbour first: the mount point can be made.
    let r = b.sh("shell-tools", "mkdir \"$HOME/m\" && test -d \"$HOME/m\" && echo made");
    assert_ok(&r);
    assert_eq!(stdout(&r), "made\n");
    let ws = b.workspace("ops", "shell-tools");
    let m = ws.join("m");
    let r = b.exec("shell-tools", &["mount", "-t", "tmpfs", "none", m.to_str().unwrap()]);
    // util-linux's answer to EPERM from mount(2) (exit 32: mount failure).
    assert_eq!(exit_code(&r), Some(32), "{r:#}");
    assert!(stderr(&r).contains("must be superuser"), "{r:#}");
    let out = py(
        &b,
        "shell-tools",
        &format!(
            r#"
r, e = sc(165, ctypes.c_char_p(b"none"), ctypes.c_char_p(b"{m}"), ctypes.c_char_p(b"tmpfs"), 0, 0)
print("mount", r, e)
"#,
            m = m.display()
        ),
    );
    assert_eq!(field(&out, "mount"), format!("-1 {}", libc::EPERM), "{out}");
    // Nothing got mounted there.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(m.to_str().unwrap()), "{mounts}");
}

#[test]
fn setuid_root_binary_does_not_elevate() {
    if !full_sandbox() {
        return;
    }
    /// Removes the setuid-root copy even when the test fails.
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let bin = scratch_dir("suid-bin");
    let _cleanup = RemoveOnDrop(bin.clone());
    let id = bin.join("id");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    std::os::unix::fs::chown(&id, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let d = bin.display();

    // Sanity: without no_new_privs the binary elevates.
    let out =
        std::process::Command::new("runuser").args(["-u", WORKER_USER, "--"]).arg(&id).arg("-u").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n", "{out:?}");

    let mut p = policy(
        "suid",
        "ops",
        None,
        &format!(r#"exec = ["/usr/bin", "/bin", "/usr/lib", "/lib", "/lib64", "{d}"]"#),
        "",
        "",
    );
    p.text = p.text.replace(r#""/dev/urandom"]"#, &format!(r#""/dev/urandom", "{d}"]"#));
    assert!(p.text.contains(&format!(r#""{d}"]"#)), "{}", p.text);
    let b = Broker::start("suid", &[p]);
    let r = b.exec("suid", &[id.to_str().unwrap(), "-u"]);
    assert_ok(&r);
    assert_eq!(stdout(&r), format!("{}\n", uid_of(WORKER_USER)), "{r:#}");
    let r = b.exec("suid", &[id.to_str().unwrap(), "-ru"]);
    assert_ok(&r);
    assert_eq!(stdout(&r), format!("{}\n", uid_of(WORKER_USER)), "{r:#}");
}

#[test]
fn capabilities_are_empty_and_no_new_privs_and_seccomp_set() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("caps", &shipped_policies());
    for wf in ["shell-tools", "homework", "family-chat"] {
        let r = b.exec(wf, &["cat", "/proc/self/status"]);
        if wf != "shell-tools" {
            // No /proc in these policies: that is the point of them.
            assert_denied(&r, "Permission denied");
            continue;
        }
        assert_ok(&r);
        let status = stdout(&r);
        let get = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
                .unwrap_or_else(|| panic!("no {key} in {status}"))
                .trim()
                .to_string()
        };
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(get(cap), "0000000000000000", "{cap}: {status}");
        }
        assert_eq!(get("NoNewPrivs"), "1", "{status}");
        assert_eq!(get("Seccomp"), "2", "{status}");
        let uid = uid_of(WORKER_USER).to_string();
        assert!(get("Uid").split_whitespace().all(|u| u == uid), "{status}");
    }
}

#[test]
fn kernel_modules_cannot_be_loaded_or_removed() {
    if !full_sandbox() || !x86_64_only() {
        return;
    }
    let b = Broker::start("modules", &shipped_policies());
    let out = py(
        &b,
        "shell-tools",
        r#"
img = ctypes.create_string_buffer(64)
print("init_module", *sc(175, ctypes.cast(img, ctypes.c_void_p), 64, ctypes.c_char_p(b"")))
fd = os.open("/usr/bin/true", os.O_RDONLY)
print("finit_module", *sc(313, fd, ctypes.c_char_p(b""), 0))
print("delete_module", *sc(176, ctypes.c_char_p(b"ext4"), 0))
r, e = sc(39)
print("getpid", r == os.getpid(), e)
"#,
    );
    for name in ["init_module", "finit_module", "delete_module"] {
        assert_eq!(field(&out, name), format!("-1 {}", libc::EPERM), "{out}");
    }
    assert_eq!(field(&out, "getpid"), "True 0", "{out}");
}

#[test]
fn io_uring_is_refused_but_eventfd_works() {
    if !full_sandbox() || !x86_64_only() {
        return;
    }
    let b = Broker::start("iouring", &shipped_policies());
    let out = py(
        &b,
        "shell-tools",
        r#"
params = ctypes.create_string_buffer(120)
print("io_uring_setup", *sc(425, 8, ctypes.cast(params, ctypes.c_void_p)))
r, e = sc(290, 0, 0)
print("eventfd2", r >= 0, e)
"#,
    );
    assert_eq!(field(&out, "io_uring_setup"), format!("-1 {}", libc::EPERM), "{out}");
    assert_eq!(field(&out, "eventfd2"), "True 0", "{out}");
}

#[test]
fn binaries_outside_the_exec_rules_do_not_run() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("exec", &shipped_policies());
    let r = b.sh("shell-tools", "cp /bin/true \"$HOME/t\" && chmod +x \"$HOME/t\" && \"$HOME/t\"");
    assert_eq!(exit_code(&r), Some(126), "{r:#}");
    assert!(stderr(&r).contains("Permission denied"), "{r:#}");
    let t = b.workspace("ops", "shell-tools").join("t");
    assert!(t.is_file(), "the copy was not made: {r:#}");

    let (code, reply) = b.exec_body(&serde_json::json!({
        "workflow": "shell-tools",
        "argv": [t.to_str().unwrap()],
    }));
    assert_eq!(code, 200, "{reply:#}");
    let err = reply["error"].as_str().unwrap_or_else(|| panic!("no error: {reply:#}"));
    assert!(err.contains("Permission denied"), "{reply:#}");
    assert!(reply["exit_code"].is_null(), "{reply:#}");

    // Neighbour: a binary under the exec rules.
    let r = b.exec("shell-tools", &["/bin/true"]);
    assert_ok(&r);
    assert!(r["error"].is_null(), "{r:#}");
}

#[test]
fn dangerous_syscalls_are_refused() {
    if !full_sandbox() || !x86_64_only() {
        return;
    }
    let b = Broker::start("syscalls", &shipped_policies());
    let out = py(
        &b,
        "shell-tools",
        r#"
buf = ctypes.cast(ctypes.create_string_buffer(256), ctypes.c_void_p)
for name, nr, args in [
    ("bpf", 321, (0, buf, 128)),
    ("perf_event_open", 298, (buf, 0, -1, -1, 0)),
    ("keyctl", 250, (0, -3, 0)),
    ("userfaultfd", 323, (0,)),
    ("process_vm_readv", 310, (os.getppid(), buf, 1, buf, 1, 0)),
    ("clone3", 435, (buf, 88)),
]:
    print(name, *sc(nr, *args))
r, e = sc(39)
print("getpid", r == os.getpid(), e)
"#,
    );
    for name in ["bpf", "perf_event_open", "keyctl", "userfaultfd", "process_vm_readv"] {
        assert_eq!(field(&out, name), format!("-1 {}", libc::EPERM), "{name}: {out}");
    }
    assert_eq!(field(&out, "clone3"), format!("-1 {}", libc::ENOSYS), "{out}");
    assert_eq!(field(&out, "getpid"), "True 0", "{out}");
}

#[test]
fn landlock_required_is_honoured() {
    use corral::protocol::Requirement;
    use corral::sandbox::{enforcement, SandboxError};
    // Ports on a kernel without Landlock TCP: required refuses, best effort
    // runs with no network at all and says so.
    assert!(matches!(enforcement(Requirement::Required, true, 3), Err(SandboxError::TcpNeedsAbi(3))));
    let rows = enforcement(Requirement::BestEffort, true, 3).unwrap();
    let net = rows.iter().find(|r| r.promise == "network").unwrap();
    assert!(net.by.starts_with("none"), "{}", net.by);
    // No Landlock at all.
    assert!(matches!(enforcement(Requirement::Required, false, 0), Err(SandboxError::LandlockUnavailable)));
    assert!(enforcement(Requirement::BestEffort, false, 0).is_ok());
    // Neighbour: on a kernel with TCP rules, required ports are fine.
    let rows = enforcement(Requirement::Required, true, 4).unwrap();
    let net = rows.iter().find(|r| r.promise == "network").unwrap();
    assert!(net.by.starts_with("listed TCP ports"), "{}", net.by);

    // And on this kernel a required policy with a port starts for real, or
    // (ABI < 4) is refused with the key and the kernel that has TCP rules.
    if !require(&["root", "landlock", "users"]) {
        return;
    }
    let b = Broker::start("required", &[policy("req", "ops", None, "tcp_connect = [1]", "", "")]);
    if !require(&["landlock-tcp"]) {
        let (code, r) = b.exec_body(&serde_json::json!({ "workflow": "req", "argv": ["true"] }));
        assert_eq!(code, 503, "{r:#}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("sandbox.tcp_connect") && msg.contains("Linux 6.7"), "{msg}");
        return;
    }
    let r = b.exec("req", &["true"]);
    assert_ok(&r);
}
