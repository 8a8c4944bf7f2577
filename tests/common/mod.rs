//! Test harness: a real broker (the `corral` binary) on a private socket and
//! state directory, with policies written by the test.
//!
//! Features a test needs (root, Landlock, users, …) are checked with
//! [`require`]: on a laptop a missing feature skips the test with a reason;
//! when `CORRAL_TEST_REQUIRE` lists it (CI does), a missing feature fails
//! the test instead, so a skip can never hide a regression.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_corral");

/// Users the tests expect (created by `scripts/setup-test-host.sh`).
pub const WORKER_USER: &str = "corral-worker";
pub const USERS: &[&str] = &["corral-worker", "corral-alice", "corral-kid", "corral-test", "alice", "kid", "mallory"];

fn feature_present(feature: &str) -> Result<(), String> {
    match feature {
        "root" => {
            if nix::unistd::Uid::effective().is_root() {
                Ok(())
            } else {
                Err("not running as root".into())
            }
        }
        "landlock" => {
            let abi = corral::sandbox::probe().landlock_abi;
            if abi >= 1 {
                Ok(())
            } else {
                Err("the kernel has no Landlock".into())
            }
        }
        "landlock-tcp" => {
            let abi = corral::sandbox::probe().landlock_abi;
            if abi >= 4 {
                Ok(())
            } else {
                Err(format!("Landlock ABI {abi} < 4 (no TCP rules)"))
            }
        }
        "landlock-scopes" => {
            let abi = corral::sandbox::probe().landlock_abi;
            if abi >= 6 {
                Ok(())
            } else {
                Err(format!("Landlock ABI {abi} < 6 (no scopes)"))
            }
        }
        "seccomp" => {
            if corral::sandbox::probe().seccomp {
                Ok(())
            } else {
                Err("no seccomp".into())
            }
        }
        "users" => {
            let missing: Vec<_> =
                USERS.iter().filter(|u| nix::unistd::User::from_name(u).ok().flatten().is_none()).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("users {missing:?} missing: run scripts/setup-test-host.sh"))
            }
        }
        "python3" => which("python3"),
        "bwrap" => which("bwrap"),
        other => Err(format!("unknown feature {other}")),
    }
}

fn which(prog: &str) -> Result<(), String> {
    let found = std::env::var("PATH").unwrap_or_default().split(':').any(|d| Path::new(d).join(prog).is_file());
    if found {
        Ok(())
    } else {
        Err(format!("{prog} is not installed"))
    }
}

/// Whether every feature is present. A missing feature that
/// `CORRAL_TEST_REQUIRE` (comma-separated) lists panics; otherwise the test
/// should return early: it is skipped, and says why.
pub fn require(features: &[&str]) -> bool {
    let required = std::env::var("CORRAL_TEST_REQUIRE").unwrap_or_default();
    let required: Vec<&str> = required.split(',').map(str::trim).collect();
    for f in features {
        if let Err(why) = feature_present(f) {
            if required.contains(f) || required.contains(&"all") {
                panic!("required test feature {f} is missing: {why}");
            }
            eprintln!("SKIP: feature {f} missing: {why} (set CORRAL_TEST_REQUIRE to make this fatal)");
            return false;
        }
    }
    true
}

/// The usual requirements of a test that runs sandboxed calls as root.
pub fn full_sandbox() -> bool {
    require(&["root", "landlock", "seccomp", "users", "python3"])
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh directory for one broker, traversable by the worker users.
/// Lives under the target directory: `/tmp` may be private to a namespaced
/// systemd in other tests.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("corral-tests");
    let dir = base.join(format!("{name}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Every ancestor up to / must be searchable by the workers' users.
    let mut p = Some(dir.as_path());
    while let Some(d) = p {
        if d == Path::new("/") {
            break;
        }
        if let Ok(meta) = std::fs::metadata(d) {
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011));
            }
        }
        p = d.parent();
    }
    dir
}

/// A policy file, as a test writes it.
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// The shipped example policies.
pub fn shipped_policies() -> Vec<PolicyFile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            out.push(PolicyFile {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                text: std::fs::read_to_string(&path).unwrap(),
            });
        }
    }
    out
}

/// A running broker, killed on drop.
pub struct Broker {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    child: Child,
    pub log: PathBuf,
}

pub struct BrokerOptions {
    /// Extra environment for the broker process.
    pub env: Vec<(String, String)>,
    /// Wait until every workflow with min_idle > 0 has a ready worker.
    pub wait_ready: bool,
    /// Hook run in the broker's process before exec (e.g. a seccomp filter
    /// that hides Landlock). Must be async-signal-safe.
    pub pre_exec: Option<Box<dyn FnMut() -> std::io::Result<()> + Send + Sync>>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions { env: Vec::new(), wait_ready: true, pre_exec: None }
    }
}

impl Broker {
    pub fn start(name: &str, policies: &[PolicyFile]) -> Broker {
        Broker::start_with(name, policies, BrokerOptions::default())
    }

    pub fn start_with(name: &str, policies: &[PolicyFile], opts: BrokerOptions) -> Broker {
        let dir = scratch_dir(name);
        let pdir = dir.join("policies");
        std::fs::create_dir_all(&pdir).unwrap();
        for p in policies {
            std::fs::write(pdir.join(&p.name), &p.text).unwrap();
        }
        let socket = dir.join("corral.sock");
        let state = dir.join("state");
        let log = dir.join("broker.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("broker")
            .arg("--policies")
            .arg(&pdir)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            // These tests exercise the rlimit mode on any host; the systemd
            // suite (tests/systemd.rs) runs the real service.
            .arg("--systemd=off")
            .env("RUST_LOG", "info")
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(hook) = opts.pre_exec {
            use std::os::unix::process::CommandExt;
            // SAFETY: the hook is documented to be async-signal-safe.
            unsafe { cmd.pre_exec(hook) };
        }
        let child = cmd.spawn().unwrap();
        let broker = Broker { dir, socket, state, child, log };
        broker.wait_socket();
        if opts.wait_ready {
            broker.wait_ready();
        }
        broker
    }

    fn wait_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not open its socket; log:\n{}", self.log_text());
    }

    /// Waits until every available workflow with min_idle > 0 has an idle
    /// worker.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = self.status();
            let ready = st["workflows"].as_array().unwrap().iter().all(|w| {
                !w["unavailable"].is_null()
                    || w["min_idle"].as_u64() == Some(0)
                    || w["workers"].as_array().unwrap().iter().any(|k| k["state"] == "idle")
            });
            if ready {
                return;
            }
            if Instant::now() > deadline {
                panic!("workers did not become ready: {st:#}\nlog:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A raw HTTP request over the socket: (status code, JSON body).
    pub fn http(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, bytes) =
            rt.block_on(corral::client::request(&self.socket, method, path, body.map(<[u8]>::to_vec))).unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status.as_u16(), json)
    }

    pub fn status(&self) -> Value {
        let (code, body) = self.http("GET", "/v1/status", None);
        assert_eq!(code, 200, "{body}");
        body
    }

    /// `POST /v1/exec` with a JSON body: (status code, JSON reply).
    pub fn exec_body(&self, body: &Value) -> (u16, Value) {
        self.http("POST", "/v1/exec", Some(body.to_string().as_bytes()))
    }

    /// Runs `argv` in `workflow` and expects a 200 reply.
    pub fn exec(&self, workflow: &str, argv: &[&str]) -> Value {
        let (code, reply) = self.exec_body(&serde_json::json!({ "workflow": workflow, "argv": argv }));
        assert_eq!(code, 200, "exec {argv:?} in {workflow} failed: {reply:#}\nlog:\n{}", self.log_text());
        reply
    }

    /// `sh -c SCRIPT` in `workflow`.
    pub fn sh(&self, workflow: &str, script: &str) -> Value {
        self.exec(workflow, &["sh", "-c", script])
    }

    /// Runs the `corral` CLI against this broker, as `user` when given.
    pub fn cli(&self, user: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(args).env("CORRAL_SOCKET", &self.socket).stdin(Stdio::null());
        cmd.output().unwrap()
    }

    /// The workspace of `workflow` of `tenant`.
    pub fn workspace(&self, tenant: &str, workflow: &str) -> PathBuf {
        self.state.join("workspaces").join(tenant).join(workflow)
    }

    /// PIDs of the live workers of `workflow`.
    pub fn worker_pids(&self, workflow: &str) -> Vec<u32> {
        let st = self.status();
        st["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["name"] == workflow)
            .flat_map(|w| w["workers"].as_array().unwrap().clone())
            .filter_map(|k| k["pid"].as_u64().map(|p| u32::try_from(p).unwrap()))
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("broker log kept in {}", self.log.display());
        }
    }
}

/// stdout of an exec reply, as text.
pub fn stdout(reply: &Value) -> &str {
    reply["stdout"].as_str().unwrap_or("")
}

pub fn stderr(reply: &Value) -> &str {
    reply["stderr"].as_str().unwrap_or("")
}

pub fn exit_code(reply: &Value) -> Option<i64> {
    reply["exit_code"].as_i64()
}

/// A minimal policy for tests: `name`, tenant, optional user, extra TOML
/// appended to the [sandbox] table, and [limits] / [pool] overrides.
pub fn policy(
    name: &str,
    tenant: &str,
    user: Option<&str>,
    sandbox_extra: &str,
    limits: &str,
    pool: &str,
) -> PolicyFile {
    let user_line = user.map(|u| format!("user = \"{u}\"\n")).unwrap_or_default();
    let text = format!(
        r#"[workflow]
name = "{name}"
tenant = "{tenant}"
{user_line}clients = {{ users = [], groups = [] }}

[sandbox]
landlock = "required"
read = ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/alternatives", "/proc", "/dev/urandom"]
write = ["{{workspace}}"]
{sandbox_extra}

[limits]
memory_max = "256M"
tasks_max = 64
call_timeout = "10s"
{limits}

[pool]
{pool}
"#
    );
    PolicyFile { name: format!("{name}.toml"), text }
}
