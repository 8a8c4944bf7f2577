//! Kernel isolation between tenants beyond files:
//! SysV IPC and POSIX queues, exec routes around the exec rules, /proc,
//! memory no rlimit sees, CPU without a quota, and orphans after kill -9 of
//! a worker or of the broker. Every test runs in both modes (brokers as
//! plain children, or as units of the namespaced systemd with
//! CORRAL_TEST_UNDER_SYSTEMD=1) and asserts both sides: the attack fails
//! and a legitimate neighbour is still served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// `POST /v1/exec` from any thread (the Broker itself stays on the test's):
/// (status, reply), or (0, the error) when the connection broke.
fn raw_exec(socket: &Path, body: &Value) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let body = Some(body.to_string().into_bytes());
    match rt.block_on(corral::client::request(socket, hyper::Method::POST, "/v1/exec", body)) {
        Ok((status, bytes)) => (status.as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null)),
        Err(e) => (0, Value::String(e.to_string())),
    }
}

/// Whether this process's bounding set holds CAP_SYS_RESOURCE (so a root
/// broker started from here may lower its own oom_score_adj).
fn have_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bnd = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim();
    u64::from_str_radix(bnd, 16).unwrap() & (1 << 24) != 0
}

/// Runs `argv` in `workflow` on another thread: (status, reply).
fn exec_in_background(b: &Broker, workflow: &str, argv: &[&str]) -> std::thread::JoinHandle<(u16, Value)> {
    let socket = b.socket.clone();
    let body = json!({ "workflow": workflow, "argv": argv, "timeout_ms": 9000 });
    std::thread::spawn(move || raw_exec(&socket, &body))
}

/// The first worker of `workflow` in `state`: its PID as the broker reports it.
fn worker_in_state(b: &Broker, workflow: &str, state: &str) -> Option<u32> {
    let st = b.status();
    let wf = st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == workflow)?.clone();
    wf["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == state && k["pid"].is_u64())
        .map(|k| u32::try_from(k["pid"].as_u64().unwrap()).unwrap())
}

fn wait_busy(b: &Broker, workflow: &str) -> u32 {
    poll(Duration::from_secs(10), || worker_in_state(b, workflow, "busy")).expect("the worker never became busy")
}

/// The effective sandbox of the first worker of `workflow`.
fn sandbox_of(b: &Broker, workflow: &str) -> Value {
    let st = b.status();
    let wf = st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == workflow).unwrap().clone();
    wf["workers"].as_array().unwrap().iter().find_map(|k| k["sandbox"].as_object().cloned()).map(Value::Object).unwrap()
}

/// Host processes whose command line contains `needle`.
fn with_cmdline(needle: &str) -> Vec<(u32, String)> {
    host_processes().into_iter().filter(|(_, cmd)| cmd.contains(needle)).collect()
}

/// Waits until no host process's command line contains `needle`.
fn assert_gone_within(needle: &str, limit: Duration, what: &str) {
    let gone = poll(limit, || with_cmdline(needle).is_empty().then_some(()));
    assert!(gone.is_some(), "{what}: processes matching {needle:?} survived {limit:?}: {:#?}", with_cmdline(needle));
}

fn assert_ok(r: &Value) {
    assert_eq!(exit_code(r), Some(0), "{r:#}");
}

/// A policy for `tenant`, running as `user`, one worker.
fn tenant_policy(name: &str, tenant: &str, user: &str, sandbox_extra: &str, limits: &str) -> PolicyFile {
    policy(name, tenant, Some(user), sandbox_extra, limits, "min_idle = 1\nmax_workers = 1")
}

// ---- 1. SysV IPC and POSIX queues -------------------------------------------

const IPC_SCRIPT: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
IPC_CREAT = 0o1000
KEY_SHM, KEY_MSG, KEY_SEM = 0x5c0a1, 0x5c0a2, 0x5c0a3
def look(what, ret):
    print(what, ret, ctypes.get_errno() if ret < 0 else 0)
if sys.argv[1] == "make":
    shm = libc.shmget(KEY_SHM, 1 << 20, IPC_CREAT | 0o666)
    addr = libc.shmat(shm, None, 0)
    ctypes.memmove(addr, b"kid-secret", 10)
    # The legitimate side: the call reads back its own segment.
    again = libc.shmat(libc.shmget(KEY_SHM, 0, 0), None, 0)
    print("own", ctypes.string_at(again, 10).decode())
    print("made", shm >= 0, libc.msgget(KEY_MSG, IPC_CREAT | 0o666) >= 0, libc.semget(KEY_SEM, 1, IPC_CREAT | 0o666) >= 0)
    libc.mq_open(b"/corral-iso", os.O_CREAT | os.O_RDWR, 0o666, None)
    sys.stdout.flush()
    time.sleep(float(sys.argv[2]))
else:
    look("shm", libc.shmget(KEY_SHM, 0, 0))
    look("msg", libc.msgget(KEY_MSG, 0))
    look("sem", libc.semget(KEY_SEM, 0, 0))
    look("mq", libc.mq_unlink(b"/corral-iso"))
"#;

/// Every object of the "look" half is absent (ENOENT).
fn assert_nothing_there(r: &Value, who: &str) {
    assert_ok(r);
    for what in ["shm", "msg", "sem", "mq"] {
        assert!(stdout(r).contains(&format!("{what} -1 2\n")), "{who} found {what}: {r:#}");
    }
}

#[test]
fn sysv_ipc_and_posix_queues_are_private_and_do_not_outlive_the_call() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "iso-ipc",
        &[
            tenant_policy("kidipc", "kid", "corral-kid", "", ""),
            tenant_policy("aliceipc", "alice", "corral-alice", "", ""),
        ],
    );
    // kid makes a 0666 segment, queue, semaphore set and POSIX queue, and
    // holds them for 3 s.
    let kid = exec_in_background(&b, "kidipc", &["python3", "-c", IPC_SCRIPT, "make", "3"]);
    wait_busy(&b, "kidipc");
    std::thread::sleep(Duration::from_millis(800));
    // alice, meanwhile, finds none of them.
    let r = b.exec("aliceipc", &["python3", "-c", IPC_SCRIPT, "look"]);
    assert_nothing_there(&r, "alice, during kid's call");
    let (code, r) = kid.join().unwrap();
    assert_eq!(code, 200, "{r:#}");
    assert_ok(&r);
    assert!(stdout(&r).contains("own kid-secret\nmade True True True\n"), "the call's own IPC failed: {r:#}");
    // Nothing of it outlived the call: not for kid's next call either.
    let r = b.exec("kidipc", &["python3", "-c", IPC_SCRIPT, "look"]);
    assert_nothing_there(&r, "kid's next call");
    // Nor in the host's IPC namespace.
    let host = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    assert!(!host.lines().any(|l| l.split_whitespace().next() == Some(&0x5c0a1.to_string())), "{host}");
    // The workers report their namespaces.
    let sb = sandbox_of(&b, "kidipc");
    let ns: Vec<&str> = sb["namespaces"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(ns, ["pid", "mount", "ipc"], "{sb:#}");
}

// ---- 2. exec means what it says ---------------------------------------------

const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

#[test]
fn exec_rules_hold_against_the_loader_memfd_and_fexecve() {
    if !full_sandbox() {
        return;
    }
    let shm_name = format!("corral-iso-e-{}", std::process::id());
    let p = tenant_policy("kidexec", "kid", "corral-kid", "", "");
    // The same workflow, also allowed to write /dev/shm.
    let p = PolicyFile {
        text: p.text.replace("write = [\"{workspace}\"]", "write = [\"{workspace}\", \"/dev/shm\"]"),
        ..p
    };
    assert!(p.text.contains("\"/dev/shm\""), "{}", p.text);
    let b = Broker::start("iso-exec", std::slice::from_ref(&p));

    // A copied binary does not run directly (Landlock) ...
    let r = b.sh("kidexec", "cp /bin/echo ./e && ./e direct");
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(stderr(&r).contains("Permission denied"), "{r:#}");
    // ... nor through the dynamic loader (noexec mount: no mmap PROT_EXEC).
    if Path::new(LOADER).exists() {
        let r = b.sh("kidexec", &format!("cp /bin/echo ./e; {LOADER} ./e via-loader"));
        assert_ne!(exit_code(&r), Some(0), "{r:#}");
        assert!(!stdout(&r).contains("via-loader"), "the loader ran a workspace binary: {r:#}");
        // Neighbour: the loader still runs what the exec rules allow.
        let r = b.exec("kidexec", &[LOADER, "/bin/echo", "loader-ok"]);
        assert_eq!(stdout(&r), "loader-ok\n", "{r:#}");
    }
    // ... nor from a file descriptor (fexecve / execveat).
    let fexec = "import os\nfd = os.open('e', os.O_RDONLY)\nos.execve(fd, ['e', 'fexec'], {})";
    let r = b.sh("kidexec", &format!("cp /bin/echo ./e; python3 -c \"{fexec}\""));
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(!stdout(&r).contains("fexec"), "{r:#}");
    // ... nor from a memfd: there is none to make.
    let r = b.exec("kidexec", &["python3", "-c", "import os; os.memfd_create('x')"]);
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(stderr(&r).contains("PermissionError") || stderr(&r).contains("Operation not permitted"), "{r:#}");
    // ... nor from the worker's /dev/shm, which is its own and noexec.
    let r = b.sh("kidexec", &format!("cp /bin/echo /dev/shm/{shm_name} && /dev/shm/{shm_name} shm-direct"));
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(!stdout(&r).contains("shm-direct"), "{r:#}");
    if Path::new(LOADER).exists() {
        let r = b.sh("kidexec", &format!("cp /bin/echo /dev/shm/{shm_name}; {LOADER} /dev/shm/{shm_name} shm-loader"));
        assert_ne!(exit_code(&r), Some(0), "{r:#}");
        assert!(!stdout(&r).contains("shm-loader"), "{r:#}");
    }
    let r = b.sh("kidexec", &format!("echo data > /dev/shm/{shm_name}.txt && cat /dev/shm/{shm_name}.txt"));
    assert_eq!(stdout(&r), "data\n", "a private /dev/shm still holds data: {r:#}");
    assert!(!Path::new(&format!("/dev/shm/{shm_name}.txt")).exists(), "the worker's /dev/shm is the host's");

    // Neighbours: a script run by an interpreter the policy lists works, as
    // do the binaries of the exec rules.
    let r = b.sh("kidexec", "printf 'echo script-ok\\n' > s.sh && sh s.sh && /bin/echo bin-ok");
    assert_eq!(stdout(&r), "script-ok\nbin-ok\n", "{r:#}");
    let sb = sandbox_of(&b, "kidexec");
    let noexec: Vec<&str> = sb["noexec"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(noexec.contains(&"/dev/shm"), "{sb:#}");
    let ws = std::fs::canonicalize(b.workspace("kid", "kidexec")).unwrap();
    assert!(noexec.contains(&ws.to_str().unwrap()), "{sb:#}");

    // policy check says which interpreters the exec rules let run anything.
    let out = std::process::Command::new(BIN).args(["policy", "check"]).arg(b.dir.join("policies")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("interpreters allowed by exec: sh"), "{text}");
    assert!(text.contains("python3"), "{text}");
}

// ---- 3. /proc shows a call only itself -----------------------------------------

#[test]
fn proc_shows_a_call_only_itself() {
    if !full_sandbox() {
        return;
    }
    let mark = format!("corral-iso-argv-{}", std::process::id());
    let b = Broker::start(
        "iso-proc",
        &[
            tenant_policy("watcher", "ops", "corral-worker", "", ""),
            tenant_policy("victim", "alice", "corral-alice", "", ""),
        ],
    );
    let victim = exec_in_background(&b, "victim", &["sh", "-c", &format!("sleep 3; echo {mark}")]);
    wait_busy(&b, "victim");
    // The watcher's policy grants /proc: it sees only its own call.
    let r = b.sh(
        "watcher",
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done; echo count $(ls -d /proc/[0-9]* | wc -l)",
    );
    assert_ok(&r);
    let out = stdout(&r);
    assert!(!out.contains(&mark), "the argv of another tenant's call is visible: {out}");
    assert!(!out.contains("corral broker"), "the broker is visible: {out}");
    assert!(!out.contains("sleep 3"), "{out}");
    let count: usize = out.lines().find_map(|l| l.strip_prefix("count ")).unwrap().trim().parse().unwrap();
    assert!(count <= 6, "a call sees {count} processes: {out}");
    // Neighbour: its own processes, its worker as PID 1, and the kernel's
    // figures are there.
    let r = b.sh(
        "watcher",
        "sleep 2 & tr '\\0' ' ' < /proc/$!/cmdline; echo; tr '\\0' ' ' < /proc/1/cmdline; echo; head -1 /proc/meminfo",
    );
    assert_ok(&r);
    let out = stdout(&r);
    // (Before its exec the child still shows the shell's command line,
    // which names it too.)
    assert!(out.lines().next().unwrap().contains("sleep 2"), "{out}");
    assert!(out.contains("corral worker"), "{out}");
    assert!(out.contains("MemTotal:"), "{out}");
    let (code, r) = victim.join().unwrap();
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(stdout(&r), format!("{mark}\n"));
}

// ---- 6. memory that RLIMIT_AS does not see ---------------------------------------

const SHM_PIN: &str = r#"
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
n, mib = int(sys.argv[1]), int(sys.argv[2])
held = []
for i in range(n):
    sid = libc.shmget(0, mib << 20, 0o1000 | 0o600)
    addr = libc.shmat(sid, None, 0)
    if sid < 0 or addr in (None, ctypes.c_void_p(-1).value):
        print("refused", i, ctypes.get_errno()); sys.exit(3)
    ctypes.memset(addr, 7, mib << 20)
    held.append((sid, addr))
print("held", n * mib, flush=True)
if sys.argv[3] == "detach":
    sid, addr = held[0]
    libc.shmdt(addr)
    again = libc.shmat(sid, None, 0)
    print("after detach", "gone" if again in (None, ctypes.c_void_p(-1).value) else "pinned")
"#;

#[test]
fn memory_outside_rlimit_as_is_bounded() {
    if !full_sandbox() {
        return;
    }
    let p = tenant_policy("mem", "t", "corral-test", "", "memory_max = \"64M\"\nfile_size_max = \"1G\"");
    let p = PolicyFile {
        text: p
            .text
            .replace("memory_max = \"256M\"\n", "")
            .replace("write = [\"{workspace}\"]", "write = [\"{workspace}\", \"/dev/shm\"]"),
        ..p
    };
    let b = Broker::start("iso-mem", std::slice::from_ref(&p));
    // Neighbour: what fits works, in tmpfs and in SysV shared memory.
    let r = b.sh("mem", "head -c 8M /dev/urandom > /dev/shm/small && wc -c < /dev/shm/small");
    assert_eq!(stdout(&r), "8388608\n", "{r:#}");
    let r = b.exec("mem", &["python3", "-c", SHM_PIN, "1", "8", "detach"]);
    assert_ok(&r);
    // With shm_rmid_forced a segment nobody has attached is gone at once:
    // nothing stays pinned behind a call's back.
    assert!(stdout(&r).contains("held 8\nafter detach gone\n"), "{r:#}");

    // Tools are the OOM killer's first choice.
    let sb = sandbox_of(&b, "mem");
    assert_eq!(sb["oom_score_adj"], 1000, "{sb:#}");
    let r = b.exec("mem", &["cat", "/proc/self/oom_score_adj"]);
    assert_eq!(stdout(&r), "1000\n", "{r:#}");
    // The broker its last: -900 where it may lower its own (it needs
    // CAP_SYS_RESOURCE); where it may not, it says so and stays below its
    // tools.
    let broker_adj: i32 =
        std::fs::read_to_string(format!("/proc/{}/oom_score_adj", b.pid())).unwrap().trim().parse().unwrap();
    if have_sys_resource() {
        assert_eq!(broker_adj, -900);
    } else {
        assert!(broker_adj <= 0, "{broker_adj}");
        assert!(b.log_text().contains("could not lower the broker's oom_score_adj"), "{}", b.log_text());
    }

    // 128M in tmpfs with memory_max 64M.
    let (code, r) = b.exec_body(
        &json!({ "workflow": "mem", "argv": ["sh", "-c", "head -c 128M /dev/urandom > /dev/shm/big && echo wrote"] }),
    );
    assert!(code != 200 || !stdout(&r).contains("wrote"), "128M of tmpfs under memory_max 64M: {r:#}");
    // 4 x 32M of SysV shared memory, touched.
    let (code, r) = b.exec_body(&json!({ "workflow": "mem", "argv": ["python3", "-c", SHM_PIN, "4", "32", "hold"] }));
    assert!(code != 200 || !stdout(&r).contains("held 128"), "128M of shm under memory_max 64M: {r:#}");
    if b.is_unit() {
        // The scope's MemoryMax: the kernel charged the pages and OOM-killed.
        assert_eq!(code, 200, "{r:#}");
        // (tmpfs pages are in nobody's RSS, so for the tmpfs case above the
        // OOM killer may take the worker itself: its namespace, /dev/shm
        // included, goes with it and the call fails with 502.)
        let killed = r["signal"] == 9 || r["limit"].as_str().is_some_and(|l| l.contains("memory_max"));
        assert!(killed, "{r:#}");
    } else {
        // RLIMIT_AS: the mappings do not fit; /dev/shm is capped at memory_max.
        assert_eq!(code, 200, "{r:#}");
        assert!(stdout(&r).contains("refused"), "{r:#}");
        let r = b.sh("mem", "head -c 128M /dev/urandom > /dev/shm/big; echo rc=$?");
        assert!(stderr(&r).contains("No space left on device"), "{r:#}");
    }
    // The workflow still serves calls afterwards (a replacement if the
    // OOM killer took the worker).
    let back = poll(Duration::from_secs(10), || {
        let (code, r) = b.exec_body(&json!({ "workflow": "mem", "argv": ["echo", "back"] }));
        (code == 200 && stdout(&r) == "back\n").then_some(())
    });
    assert!(back.is_some(), "no worker after the memory tests:\n{}", b.log_text());
}

// ---- 7. CPU ------------------------------------------------------------------------

const BURN: &str = "b() { while :; do :; done; }; b & p1=$!; b & p2=$!; sleep 3; kill $p1 $p2; wait; echo burnt";

#[test]
fn cpu_burner_is_bounded_and_a_neighbour_is_served() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "iso-cpu",
        &[
            tenant_policy("burner", "kid", "corral-kid", "", "cpu_quota = \"25%\""),
            tenant_policy("neighbour", "alice", "corral-alice", "", ""),
        ],
    );
    let burner = exec_in_background(&b, "burner", &["sh", "-c", BURN]);
    wait_busy(&b, "burner");
    // The neighbour is served while the burner runs (a generous "it did not
    // hang" bound, no timing claim).
    let t = std::time::Instant::now();
    let r = b.exec("neighbour", &["python3", "-c", "print(sum(range(10**6)))"]);
    assert_eq!(stdout(&r), "499999500000\n", "{r:#}");
    assert!(t.elapsed() < Duration::from_secs(20), "the neighbour took {:?}", t.elapsed());
    let (code, r) = burner.join().unwrap();
    assert_eq!(code, 200, "{r:#}");
    assert!(stdout(&r).contains("burnt"), "{r:#}");
    let cpu_ms = r["cpu_user_ms"].as_f64().unwrap() + r["cpu_system_ms"].as_f64().unwrap();
    let wall_ms = r["wall_ms"].as_f64().unwrap();
    assert!(wall_ms >= 3000.0, "{r:#}");
    if b.is_unit() {
        // CPUQuota=25% of the scope: two busy loops get a quarter of a CPU
        // between them (bound: twice that, for a slow or noisy host).
        let ratio = cpu_ms / wall_ms;
        assert!(ratio <= 0.5, "the burner used {ratio:.2} CPUs under CPUQuota=25%: {r:#}");
        assert_eq!(sandbox_of(&b, "burner")["cpu_idle"], false);
    } else {
        // No quota: the tools run SCHED_IDLE, nice 19, and cannot leave it.
        assert_eq!(sandbox_of(&b, "burner")["cpu_idle"], true);
        let probe = r#"
import os
print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.getpriority(os.PRIO_PROCESS, 0))
for what, f in [("other", lambda: os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))),
                ("nice", lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))]:
    try:
        f(); print(what, "allowed")
    except PermissionError:
        print(what, "refused")
"#;
        let r = b.exec("burner", &["python3", "-c", probe]);
        assert_eq!(stdout(&r), "True 19\nother refused\nnice refused\n", "{r:#}");
    }
}

// ---- issue 9.2: no orphans ------------------------------------------------------------

#[test]
fn kill_9_of_a_busy_worker_leaves_no_process_of_its_call() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "iso-orphan-worker",
        &[tenant_policy("victim", "t", "corral-test", "", ""), tenant_policy("other", "alice", "corral-alice", "", "")],
    );
    let needle = "sleep 29.25";
    let call = exec_in_background(&b, "victim", &["sh", "-c", &format!("{needle}; echo late")]);
    let pid = wait_busy(&b, "victim");
    assert!(poll(Duration::from_secs(5), || (!with_cmdline(needle).is_empty()).then_some(())).is_some());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(b.host_pid(pid)).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The worker was PID 1 of its calls: the kernel ends them with it.
    assert_gone_within(needle, Duration::from_millis(1000), "after kill -9 of the worker");
    let (code, r) = call.join().unwrap();
    assert_eq!(code, 502, "{r:#}");
    // Neighbours: another workflow at once, and the same one on a new worker.
    let r = b.exec("other", &["echo", "other-ok"]);
    assert_eq!(stdout(&r), "other-ok\n");
    let back = poll(Duration::from_secs(10), || {
        let (code, r) = b.exec_body(&json!({ "workflow": "victim", "argv": ["echo", "back"] }));
        (code == 200 && stdout(&r) == "back\n").then_some(())
    });
    assert!(back.is_some(), "no replacement worker:\n{}", b.log_text());
}

/// A broker started by hand on `b`'s socket and state (rlimit mode), killed
/// when dropped.
struct Manual(std::process::Child);

impl Drop for Manual {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_9_of_the_broker_leaves_no_process_of_its_calls_and_a_new_broker_serves() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "iso-orphan-broker",
        &[tenant_policy("victim", "t", "corral-test", "", ""), tenant_policy("other", "alice", "corral-alice", "", "")],
    );
    let needle = "sleep 28.75";
    let call = exec_in_background(&b, "victim", &["sh", "-c", &format!("{needle}; echo late")]);
    wait_busy(&b, "victim");
    let workers: Vec<u32> = b.worker_host_pids("victim").into_iter().chain(b.worker_host_pids("other")).collect();
    assert!(poll(Duration::from_secs(5), || (!with_cmdline(needle).is_empty()).then_some(())).is_some());
    let broker = b.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(broker).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Workers die with their broker (parent-death signal), their calls with
    // them (PID namespace).
    assert_gone_within(needle, Duration::from_millis(1000), "after kill -9 of the broker");
    let alive: Vec<&u32> = workers.iter().filter(|p| Path::new(&format!("/proc/{p}/cmdline")).exists()).collect();
    let zombie_or_gone = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(true)
    };
    assert!(
        poll(Duration::from_millis(1000), || alive.iter().all(|p| zombie_or_gone(p)).then_some(())).is_some(),
        "workers outlived their broker: {alive:?}"
    );
    let (code, _) = call.join().unwrap();
    assert_ne!(code, 200);

    // A new broker on the same socket and state serves.
    let _manual = match (b.unit_name(), under_systemd()) {
        (Some(unit), Some(sd)) => {
            let out = nsenter(sd, &["systemctl", "start", unit]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            None
        }
        _ => Some(Manual(
            std::process::Command::new(BIN)
                .arg("broker")
                .arg("--policies")
                .arg(b.dir.join("policies"))
                .arg("--socket")
                .arg(&b.socket)
                .arg("--state-dir")
                .arg(&b.state)
                .arg("--systemd=off")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(b.dir.join("broker2.log")).unwrap())
                .spawn()
                .unwrap(),
        )),
    };
    let served = poll(Duration::from_secs(20), || {
        let sock = std::os::unix::net::UnixStream::connect(&b.socket).ok()?;
        drop(sock);
        let (code, r) = b.exec_body(&json!({ "workflow": "other", "argv": ["echo", "served"] }));
        (code == 200 && stdout(&r) == "served\n").then_some(())
    });
    assert!(served.is_some(), "the new broker does not serve:\n{}", b.log_text());
    let r = b.exec("victim", &["echo", "victim-ok"]);
    assert_eq!(stdout(&r), "victim-ok\n");
}
