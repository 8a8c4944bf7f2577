//! The everyday toolchain under the shipped `coding` policy (and, where it
//! makes sense, `shell-tools`): one test per tool, each doing real work,
//! each with the promises checked around it — the same workflow cannot
//! read another tenant's workspace, nor reach the network without a rule.
//!
//! One broker (the shipped `coding` and `shell-tools` policies) serves every
//! test, so the suite pays for one broker start, not one per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

/// The shipped policies the tests run under, unchanged.
fn shipped(name: &str) -> PolicyFile {
    shipped_policies().into_iter().find(|p| p.name == name).unwrap()
}

struct Shared {
    b: Broker,
    /// shell-tools' workspace (tenant ops), holding `secret.txt`.
    ops: PathBuf,
}

/// The broker every test of this binary uses, started by the first one and
/// stopped when the test process exits (`atexit`), so tests that run one
/// after the other (the guest runs them on one thread) share it too.
static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

const SECRET: &str = "ops-secret-5e7a";

extern "C" fn stop_shared() {
    // Dropping the last reference stops the broker (its unit, under systemd).
    let taken = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(taken);
}

/// The shared broker; `None` (skip) when a feature is missing and not
/// required.
fn shared(extra: &[&str]) -> Option<Arc<Shared>> {
    let mut features = vec!["root", "landlock", "seccomp", "users", "toolchain"];
    features.extend_from_slice(extra);
    if !require(&features) {
        return None;
    }
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        return Some(Arc::clone(s));
    }
    let b = Broker::start("toolchain", &[shipped("coding.toml"), shipped("shell-tools.toml")]);
    // The neighbour tenant's file, written by its own workflow.
    let r = b.sh("shell-tools", &format!("echo {SECRET} > secret.txt && cat secret.txt"));
    assert_eq!(stdout(&r), format!("{SECRET}\n"), "{r:#}");
    let ops = b.workspace("ops", "shell-tools");
    let s = Arc::new(Shared { b, ops });
    // SAFETY: registers a plain function with the C library; it runs once,
    // at process exit, after every test has returned.
    let registered = unsafe { libc::atexit(stop_shared) };
    assert_eq!(registered, 0, "atexit failed: the broker would outlive the tests");
    *slot = Some(Arc::clone(&s));
    Some(s)
}

/// Runs `script` with `sh -c` in `workflow` inside a fresh directory `dir`
/// of its workspace; asserts it exited 0 and returns its reply.
fn work(b: &Broker, workflow: &str, dir: &str, script: &str) -> Value {
    let full = format!("set -e; rm -rf {dir}; mkdir {dir}; cd {dir}; {script}");
    let r = b.sh(workflow, &full);
    assert_eq!(exit_code(&r), Some(0), "{workflow}: {script}\n{r:#}");
    r
}

/// The promises around every tool: `workflow` cannot read the other
/// tenant's workspace, and cannot connect to a loopback listener (no TCP
/// rule), while the neighbour (ops reading its own file) works.
fn promises_hold(s: &Shared, workflow: &str) {
    let b = &s.b;
    let secret = s.ops.join("secret.txt");
    if workflow != "shell-tools" {
        let r = b.exec(workflow, &["cat", secret.to_str().unwrap()]);
        assert_ne!(exit_code(&r), Some(0), "{r:#}");
        assert!(!stdout(&r).contains(SECRET), "{workflow} read ops' workspace: {r:#}");
        assert!(stderr(&r).contains("Permission denied"), "{r:#}");
    }
    let r = b.exec("shell-tools", &["cat", "secret.txt"]);
    assert_eq!(stdout(&r), format!("{SECRET}\n"), "the neighbour lost its own file: {r:#}");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let r = b.exec(
        workflow,
        &[
            "python3",
            "-c",
            "import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)\n    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)",
            &port,
        ],
    );
    assert!(stdout(&r).starts_with("refused"), "{workflow} reached the network without a rule: {r:#}");
    assert!(listener.accept().is_err(), "a connection arrived from {workflow}");
}

// ---- git --------------------------------------------------------------------------

const GIT: &str = r#"
export GIT_AUTHOR_NAME=a GIT_AUTHOR_EMAIL=a@example.org GIT_COMMITTER_NAME=a GIT_COMMITTER_EMAIL=a@example.org
git init -q -b main repo
cd repo
printf 'one\n' > f.txt
git add f.txt
git commit -qm first
git branch feature
git checkout -q feature
printf 'two\n' >> f.txt
git diff --stat | tail -1
git commit -qam second
git log --oneline | wc -l
git branch --list | tr -d ' *' | sort | tr '\n' ' '; echo
cd ..
git clone -q repo copy
git -C copy log --format=%s -1
git -C copy diff origin/main origin/feature --stat | tail -1
"#;

#[test]
fn git_init_commit_branch_diff_clone() {
    let Some(s) = shared(&[]) else { return };
    let r = work(&s.b, "coding", "git", GIT);
    let out = stdout(&r);
    assert!(out.contains("1 file changed, 1 insertion(+)"), "{r:#}");
    assert!(out.contains("\n2\nfeature main \n"), "two commits, two branches: {r:#}");
    // The clone checks out the default branch (feature was current when cloned: HEAD).
    assert!(out.contains("second\n"), "{r:#}");
    // No "unable to access '/etc/gitconfig'": the policy's GIT_CONFIG_NOSYSTEM.
    assert!(!stderr(&r).contains("gitconfig"), "{r:#}");
    // shell-tools too: its workspace is not executable, but git needs no exec there.
    let r = work(&s.b, "shell-tools", "git", GIT);
    assert!(stdout(&r).contains("feature main"), "{r:#}");
    promises_hold(&s, "coding");
}

// ---- python -----------------------------------------------------------------------

/// Builds a pure-Python wheel by hand (a zip with its metadata): no
/// network, no build backend needed.
const MKWHEEL: &str = r#"
import zipfile
files = {
    "hello/__init__.py": "def greet():\n    return 'hello from a local wheel'\n",
    "hello-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello\nVersion: 1.0\n",
    "hello-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: corral-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = "".join(n + ",,\n" for n in files) + "hello-1.0.dist-info/RECORD,,\n"
with zipfile.ZipFile("hello-1.0-py3-none-any.whl", "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
    z.writestr("hello-1.0.dist-info/RECORD", record)
"#;

#[test]
fn python_venv_with_pip_installs_a_local_wheel() {
    let Some(s) = shared(&[]) else { return };
    // The emulated CPUs of the Debian guest take minutes for ensurepip
    // (it installs and byte-compiles pip and setuptools): there the venv is
    // made without it, and pip runs from the same wheel ensurepip installs
    // (python3-pip-whl), reading the same system files.
    let (venv, pip) = if std::env::var_os("CORRAL_TEST_VENV_WITHOUT_ENSUREPIP").is_some() {
        ("python3 -m venv --without-pip v\nset -- /usr/share/python-wheels/pip-*.whl", "v/bin/python \"$1/pip\"")
    } else {
        ("python3 -m venv v", "v/bin/pip")
    };
    let script = format!(
        "{venv}\n\
         python3 -c '{}'\n\
         {pip} install -q --no-index --disable-pip-version-check hello-1.0-py3-none-any.whl\n\
         v/bin/python -c 'import hello; print(hello.greet())'",
        MKWHEEL.replace('\'', "'\"'\"'")
    );
    let r = work(&s.b, "coding", "venv", &script);
    assert_eq!(stdout(&r), "hello from a local wheel\n", "{r:#}");
    promises_hold(&s, "coding");
}

const PY_STDLIB: &str = r#"
import multiprocessing, os, sqlite3, tempfile
with multiprocessing.Pool(2) as pool:
    print("pool", pool.map(abs, [-1, -2, -3]))
lock = multiprocessing.Lock()
with lock:
    print("lock ok")
with tempfile.TemporaryDirectory() as d:
    db = sqlite3.connect(os.path.join(d, "t.db"))
    db.execute("create table t (n integer)")
    db.executemany("insert into t values (?)", [(i,) for i in range(10)])
    db.commit()
    print("sqlite", db.execute("select sum(n) from t").fetchone()[0])
    with tempfile.NamedTemporaryFile(dir=d) as f:
        f.write(b"x")
        print("tempfile", os.path.dirname(f.name) == d)
print("tmpdir", tempfile.gettempdir() == os.environ["TMPDIR"])
"#;

#[test]
fn python_multiprocessing_tempfile_sqlite() {
    let Some(s) = shared(&[]) else { return };
    let want = "pool [1, 2, 3]\nlock ok\nsqlite 45\ntempfile True\ntmpdir True\n";
    for wf in ["coding", "shell-tools"] {
        let r = s.b.exec(wf, &["python3", "-c", PY_STDLIB]);
        assert_eq!(stdout(&r), want, "{wf}: {r:#}");
    }
    // /dev/shm is the worker's own, and emptied after every call: what a
    // call leaves there is gone for the next one.
    let r = s.b.sh("coding", "echo left > /dev/shm/left-behind && ls /dev/shm");
    assert!(stdout(&r).contains("left-behind"), "{r:#}");
    let r = s.b.sh("coding", "ls -A /dev/shm; echo end");
    assert!(!stdout(&r).contains("left-behind"), "{r:#}");
    // ... and it is not executable.
    let r = s.b.sh("coding", "cp /usr/bin/true /dev/shm/t && /dev/shm/t; echo rc=$?");
    assert!(!stdout(&r).contains("rc=0"), "{r:#}");
    promises_hold(&s, "coding");
}

// ---- make, cc, c++ ----------------------------------------------------------------

const BUILD: &str = r#"
printf '#include <stdio.h>\nint main(void) { printf("c says %%d\\n", 6 * 7); return 0; }\n' > hello.c
printf '#include <iostream>\n#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; std::cout << "c++ says " << v.size() << std::endl; }\n' > hello.cc
printf 'all: hello hellocc\nhello: hello.c\n\tcc -O1 -o $@ $<\nhellocc: hello.cc\n\tc++ -O1 -o $@ $<\n' > Makefile
make -s
./hello
./hellocc
"#;

#[test]
fn make_cc_cxx_and_running_what_they_built() {
    let Some(s) = shared(&[]) else { return };
    let r = work(&s.b, "coding", "build", BUILD);
    assert_eq!(stdout(&r), "c says 42\nc++ says 3\n", "{r:#}");
    // shell-tools builds too, but may not run what it built: the reply
    // names the path and the rule.
    // (C only: c++ takes longer than its 10 s call_timeout on emulated CPUs.)
    let c_only = "printf 'int main(void) { return 0; }\\n' > hello.c && cc -o hello hello.c && ./hello";
    let (code, r) = s.b.exec_body(&json!({ "workflow": "shell-tools", "argv": ["sh", "-c", c_only] }));
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(exit_code(&r), Some(126), "{r:#}");
    let hint = r["sandbox_hint"].as_str().unwrap_or_default();
    let built = s.ops.join("hello");
    assert!(hint.contains(&format!("{} is outside sandbox.exec of workflow shell-tools", built.display())), "{r:#}");
    // A file outside every read rule: named with the rule.
    let r = s.b.exec("coding", &["cat", "/etc/shadow"]);
    let hint = r["sandbox_hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains("/etc/shadow is outside every sandbox.read and sandbox.write rule of workflow coding"),
        "{r:#}"
    );
    // A success, or a failure the sandbox had no part in, gets no hint.
    let r = s.b.sh("coding", "ls /nonexistent");
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(r["sandbox_hint"].is_null(), "{r:#}");
    promises_hold(&s, "coding");
}

// ---- node and npm -----------------------------------------------------------------

/// node allocates and touches 64 MiB, then reports its own limits.
const NODE: &str = r#"
const b = Buffer.alloc(64 << 20, 1);
let sum = 0; for (let i = 0; i < b.length; i += 4096) sum += b[i];
console.log("node touched", sum * 4096 === b.length);
"#;

#[test]
fn node_runs_under_the_shipped_memory_limits() {
    let Some(s) = shared(&["node"]) else { return };
    // shell-tools: memory_max 256M; coding: 1G. Without systemd that used
    // to be RLIMIT_AS, under which V8 could not reserve its code range.
    for wf in ["shell-tools", "coding"] {
        let r = s.b.exec(wf, &["node", "-e", NODE]);
        assert_eq!(stdout(&r), "node touched true\n", "{wf}: {r:#}");
    }
    // The limit still binds real use: 512 MiB touched under 256M fails
    // (RLIMIT_DATA refuses the allocation, or the scope's OOM killer ends it).
    let r = s.b.exec("shell-tools", &["node", "-e", "Buffer.alloc(512 << 20, 1); console.log('fit')"]);
    assert!(!stdout(&r).contains("fit") && exit_code(&r) != Some(0), "{r:#}");
    let limits = stdout(&s.b.exec("shell-tools", &["cat", "/proc/self/limits"])).to_string();
    let line = |name: &str| limits.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    let st = s.b.status().to_string();
    if s.b.is_unit() {
        // MemoryMax of the scope is the limit; no rlimit stands in.
        assert!(line("Max data size").contains("unlimited"), "{limits}");
        assert!(line("Max address space").contains("unlimited"), "{limits}");
        assert!(st.contains("MemoryMax"), "{st}");
    } else {
        assert!(line("Max data size").contains(&(256u64 << 20).to_string()), "{limits}");
        assert!(line("Max address space").contains(&(16u64 << 30).to_string()), "{limits}");
        // The status says what is enforced: RLIMIT_DATA, RLIMIT_AS a backstop.
        assert!(st.contains("RLIMIT_DATA = memory_max"), "{st}");
    }
    promises_hold(&s, "coding");
}

#[test]
fn npm_init_and_a_script() {
    let Some(s) = shared(&["node", "npm"]) else { return };
    let script = "npm init -y >/dev/null\n\
                  printf 'console.log(\"script ran\", process.argv.length)\\n' > hi.js\n\
                  npm pkg set scripts.hi='node hi.js'\n\
                  npm run -s hi";
    let r = work(&s.b, "coding", "npm", script);
    assert_eq!(stdout(&r), "script ran 2\n", "{r:#}");
    promises_hold(&s, "coding");
}

// ---- shell tools and ps -----------------------------------------------------------

const COREUTILS: &str = r#"
mkdir -p src/a src/b
for i in 3 1 2; do echo "line $i" > src/a/f$i.txt; done
echo "other" > src/b/g.txt
tar czf src.tgz src
gzip -t src.tgz
mkdir out && tar xzf src.tgz -C out
find out -name '*.txt' | sort | xargs cat | grep '^line' | sed 's/line/row/' | awk '{ s += $2 } END { print "sum", s }'
find out -type f | wc -l
printf 'b\na\nc\n' | sort -r | tr '\n' ' '; echo
echo hello | gzip | gzip -d
"#;

#[test]
fn tar_gzip_find_grep_sed_awk_sort_xargs() {
    let Some(s) = shared(&[]) else { return };
    for wf in ["coding", "shell-tools"] {
        let r = work(&s.b, wf, "coreutils", COREUTILS);
        assert_eq!(stdout(&r), "sum 6\n4\nc b a \nhello\n", "{wf}: {r:#}");
    }
    promises_hold(&s, "coding");
}

#[test]
fn ps_shows_the_calls_own_processes() {
    let Some(s) = shared(&[]) else { return };
    let r = s.b.sh("coding", "sleep 5 & ps -eo user:20,args --no-headers; kill $!");
    let out = stdout(&r);
    assert!(out.contains("sleep 5") && out.contains("ps -eo"), "{r:#}");
    // Only the worker and this call: no process of the host or of another
    // tenant's worker.
    for line in out.lines() {
        assert!(line.starts_with("corral-dev "), "a process that is not the call's: {line}\n{out}");
    }
    assert!(out.lines().count() <= 5, "{out}");
    assert!(out.contains("corral worker"), "{out}");
    promises_hold(&s, "coding");
}

/// The worker starts tools itself (`clone(CLONE_VM | CLONE_VFORK)`, then
/// `execve`), so it must do what `execvp` did: search the call's own
/// `PATH`, run a file without `#!` with `/bin/sh`, say which program is
/// missing, and start the tool with no signal blocked or ignored (`SIGPIPE`
/// at its default: `yes | head` ends).
#[test]
fn tools_start_as_execvp_would_with_default_signals() {
    let Some(s) = shared(&[]) else { return };
    let b = &s.b;
    let r = work(b, "coding", "plain", "printf 'echo from sh: $0\\n' > noshebang; chmod +x noshebang");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    let r = b.exec("coding", &["./plain/noshebang"]);
    assert_eq!(stdout(&r), "from sh: ./plain/noshebang\n", "{r:#}");

    let r = b.exec("coding", &["no-such-program-here"]);
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("no-such-program-here") && error.contains("No such file"), "{r:#}");

    // SIGPIPE at its default: `yes` dies of it quietly (ignored, it would
    // print "Broken pipe" and exit 1).
    let r = b.exec("coding", &["sh", "-c", "yes | head -n 2"]);
    assert_eq!((exit_code(&r), stdout(&r), stderr(&r)), (Some(0), "y\ny\n", ""), "{r:#}");
    let r = b.exec("coding", &["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"]);
    assert_eq!(
        stdout(&r),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
        "a signal blocked or ignored in the tool: {r:#}"
    );
    promises_hold(&s, "coding");
}
