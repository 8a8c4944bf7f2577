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
pub const USERS: &[&str] = &[
    "corral-worker",
    "corral-alice",
    "corral-kid",
    "corral-dev",
    "corral-test",
    "corral-bot",
    "alice",
    "kid",
    "mallory",
];

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
        "systemd" => match systemd_pid() {
            Some(_) => Ok(()),
            None => Err("no namespaced systemd: set CORRAL_TEST_SYSTEMD_PID (scripts/sd-ns/ns.sh start)".into()),
        },
        "python3" => which("python3"),
        "curl" => which("curl"),
        // ip(8), to build the network namespaces tests/egress.rs uses as
        // its internet.
        "iproute2" => which("ip"),
        // What tests/toolchain.rs runs inside the sandbox, from the paths the
        // policies' PATH (/usr/bin:/bin) finds: git, make, C and C++
        // compilers, python3 with venv and ensurepip (python3-venv).
        "toolchain" => {
            let missing: Vec<&str> = ["git", "make", "cc", "c++", "python3", "tar", "gzip", "ps"]
                .into_iter()
                .filter(|p| !Path::new("/usr/bin").join(p).is_file())
                .collect();
            if !missing.is_empty() {
                return Err(format!("{missing:?} not in /usr/bin: run scripts/setup-test-host.sh"));
            }
            let venv = Command::new("/usr/bin/python3").args(["-c", "import venv, ensurepip"]).output();
            match venv {
                Ok(o) if o.status.success() => Ok(()),
                _ => Err("python3 has no venv/ensurepip: install python3-venv".into()),
            }
        }
        // The official OpenAI Python client, in the venv that
        // scripts/setup-test-host.sh makes (tests/stream.rs).
        "openai-client" => {
            let python = openai_python();
            match Command::new(&python).args(["-c", "import openai"]).output() {
                Ok(o) if o.status.success() => Ok(()),
                _ => Err(format!("{} cannot import openai: run scripts/setup-test-host.sh", python.display())),
            }
        }
        "node" => usr_bin("node"),
        "npm" => usr_bin("npm"),
        "bwrap" => which("bwrap"),
        other => Err(format!("unknown feature {other}")),
    }
}

/// The Python of the venv holding the `openai` package:
/// `$CORRAL_TEST_OPENAI_VENV/bin/python3`, by default under
/// /opt/corral-test/openai.
pub fn openai_python() -> PathBuf {
    let venv = std::env::var_os("CORRAL_TEST_OPENAI_VENV").unwrap_or_else(|| "/opt/corral-test/openai".into());
    Path::new(&venv).join("bin/python3")
}

fn usr_bin(prog: &str) -> Result<(), String> {
    if Path::new("/usr/bin").join(prog).is_file() {
        Ok(())
    } else {
        Err(format!("/usr/bin/{prog} is not installed"))
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

/// A running broker, killed on drop: a child process of the test (rlimit
/// mode), or a transient-ish service of the namespaced systemd (systemd mode,
/// see [`under_systemd`]).
pub struct Broker {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    child: Option<Child>,
    /// systemd mode: the unit, and the namespaced systemd's PID (from here).
    unit: Option<(String, u32)>,
    pub log: PathBuf,
    /// The broker's extra environment (rlimit mode: for a restart).
    env: Vec<(String, String)>,
    netns: Option<Netns>,
}

/// A network namespace a test made, for a broker to run in: its path as
/// seen from the test, and as seen by the namespaced systemd (for
/// `NetworkNamespacePath=` of a unit).
#[derive(Clone, Debug)]
pub struct Netns {
    pub host_path: PathBuf,
    pub unit_path: PathBuf,
}

type PreExec = Box<dyn FnMut() -> std::io::Result<()> + Send + Sync>;

/// Starts `corral broker` on `dir`'s policies, socket and state, as a child
/// of the test (rlimit mode), logging to `log`.
fn spawn_broker(
    dir: &Path,
    log: &std::fs::File,
    env: &[(String, String)],
    pre_exec: Option<PreExec>,
    netns: Option<&Netns>,
) -> Child {
    let mut cmd = match netns {
        // nsenter enters the namespace and execs the broker: same process.
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.host_path.display())).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("broker")
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--socket")
        .arg(dir.join("corral.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        // These tests exercise the rlimit mode on any host; with
        // CORRAL_TEST_UNDER_SYSTEMD=1 they run as units instead.
        .arg("--systemd=off")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().unwrap());
    if let Some(hook) = pre_exec {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook is documented to be async-signal-safe.
        unsafe { cmd.pre_exec(hook) };
    }
    cmd.spawn().unwrap()
}

pub struct BrokerOptions {
    /// Extra environment for the broker process.
    pub env: Vec<(String, String)>,
    /// Wait until every workflow with min_idle > 0 has a ready worker.
    pub wait_ready: bool,
    /// Hook run in the broker's process before exec (e.g. a seccomp filter
    /// that hides Landlock). Must be async-signal-safe.
    pub pre_exec: Option<PreExec>,
    /// Run the broker in this network namespace (both modes).
    pub netns: Option<Netns>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions { env: Vec::new(), wait_ready: true, pre_exec: None, netns: None }
    }
}

impl Broker {
    pub fn start(name: &str, policies: &[PolicyFile]) -> Broker {
        Broker::start_with(name, policies, BrokerOptions::default())
    }

    pub fn start_with(name: &str, policies: &[PolicyFile], opts: BrokerOptions) -> Broker {
        Broker::start_in(name, scratch_dir(name), policies, opts)
    }

    /// Starts a broker in `dir` (from [`scratch_dir`]), keeping what is in
    /// it already (a state directory left by an earlier broker); the
    /// policies replace any there.
    pub fn start_in(name: &str, dir: PathBuf, policies: &[PolicyFile], opts: BrokerOptions) -> Broker {
        let pdir = dir.join("policies");
        let _ = std::fs::remove_dir_all(&pdir);
        std::fs::create_dir_all(&pdir).unwrap();
        for p in policies {
            std::fs::write(pdir.join(&p.name), &p.text).unwrap();
        }
        let socket = dir.join("corral.sock");
        let state = dir.join("state");
        let log = dir.join("broker.log");
        let wait_ready = opts.wait_ready;
        let broker = match under_systemd() {
            Some(sd) => {
                assert!(
                    opts.pre_exec.is_none(),
                    "a broker with a pre_exec hook cannot run as a unit: skip the test with skip_under_systemd()"
                );
                let unit = start_unit(sd, name, &dir, &opts.env, opts.netns.as_ref());
                Broker {
                    dir,
                    socket,
                    state,
                    child: None,
                    unit: Some((unit, sd)),
                    log,
                    env: opts.env,
                    netns: opts.netns,
                }
            }
            None => {
                let child = spawn_broker(
                    &dir,
                    &std::fs::File::create(&log).unwrap(),
                    &opts.env,
                    opts.pre_exec,
                    opts.netns.as_ref(),
                );
                Broker { dir, socket, state, child: Some(child), unit: None, log, env: opts.env, netns: opts.netns }
            }
        };
        broker.wait_socket();
        if wait_ready {
            broker.wait_ready();
        }
        broker
    }

    /// Whether this broker runs as a unit of the namespaced systemd.
    pub fn is_unit(&self) -> bool {
        self.unit.is_some()
    }

    /// The unit's name (systemd mode).
    pub fn unit_name(&self) -> Option<&str> {
        self.unit.as_ref().map(|(u, _)| u.as_str())
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

    /// What the broker logged: its stderr file, or the unit's journal.
    pub fn log_text(&self) -> String {
        match &self.unit {
            Some((unit, sd)) => {
                // Workers log from their own scopes: corral-<instance>-*.scope.
                let instance = unit.rsplit('-').next().unwrap_or("").trim_end_matches(".service");
                let scopes = format!("corral-{instance}-*.scope");
                let out = nsenter(*sd, &["journalctl", "--no-pager", "-o", "json", "-u", unit, "-u", &scopes]);
                // One line per entry, as the plain log reads: the message,
                // then its CORRAL_* fields as key=value.
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .map(|e| {
                        let mut line = e["MESSAGE"].as_str().unwrap_or("").to_string();
                        if let Some(fields) = e.as_object() {
                            for (k, v) in fields {
                                if let (Some(name), Some(v)) = (k.strip_prefix("CORRAL_"), v.as_str()) {
                                    line.push_str(&format!(" {}={v}", name.to_lowercase()));
                                }
                            }
                        }
                        line + "\n"
                    })
                    .collect()
            }
            None => std::fs::read_to_string(&self.log).unwrap_or_default(),
        }
    }

    /// The broker's PID as seen from here (the test's PID namespace).
    pub fn pid(&self) -> u32 {
        match (&self.child, &self.unit) {
            (Some(c), _) => c.id(),
            (None, Some((_, sd))) => {
                host_pid(*sd, self.ns_pid()).unwrap_or_else(|| panic!("broker PID {} not found", self.ns_pid()))
            }
            (None, None) => unreachable!("a broker is a child or a unit"),
        }
    }

    /// The broker's PID as the broker, its workers and their tools see it
    /// (the PID namespace of the systemd it runs under).
    pub fn ns_pid(&self) -> u32 {
        match &self.unit {
            Some((unit, sd)) => {
                let pid = systemctl_show(*sd, unit, "MainPID");
                let pid: u32 = pid.parse().unwrap_or_else(|_| panic!("MainPID of {unit}: {pid:?}"));
                assert_ne!(pid, 0, "{unit} has no main process; log:\n{}", self.log_text());
                pid
            }
            None => self.pid(),
        }
    }

    /// A PID the broker reported (status, as its workers see it), as seen
    /// from here: the same number in rlimit mode, translated in systemd mode.
    pub fn host_pid(&self, pid: u32) -> u32 {
        match &self.unit {
            Some((_, sd)) => host_pid(*sd, pid).unwrap_or_else(|| panic!("namespace PID {pid} not found")),
            None => pid,
        }
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

    /// PIDs of the live workers of `workflow`, as seen from here.
    pub fn worker_host_pids(&self, workflow: &str) -> Vec<u32> {
        self.worker_pids(workflow).into_iter().map(|p| self.host_pid(p)).collect()
    }

    /// PIDs of the live workers of `workflow`, as the broker reports them
    /// (namespace PIDs in systemd mode: what a tool would use).
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

impl Broker {
    /// SIGTERM to the broker, as systemd or an operator stops it: the drain
    /// starts (systemd mode: `systemctl stop --no-block`).
    pub fn terminate(&self) {
        match &self.unit {
            Some((unit, sd)) => {
                let out = nsenter(*sd, &["systemctl", "stop", "--no-block", unit]);
                assert!(out.status.success(), "systemctl stop {unit}: {out:?}");
            }
            None => nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap(),
        }
    }

    /// Waits until the broker has exited; false when it still runs after
    /// `limit`.
    pub fn wait_stopped(&mut self, limit: Duration) -> bool {
        let unit = self.unit.clone();
        let child = &mut self.child;
        poll(limit, || match (&unit, child.as_mut()) {
            (Some((unit, sd)), _) => {
                let state = systemctl_show(*sd, unit, "ActiveState");
                (state == "inactive" || state == "failed").then_some(())
            }
            (None, Some(c)) => c.try_wait().unwrap().map(|_| ()),
            (None, None) => Some(()),
        })
        .is_some()
    }

    /// Starts a broker again on the same socket, state directory and
    /// policies, once the last one has stopped; waits until it serves.
    pub fn start_again(&mut self) {
        match &self.unit {
            Some((unit, sd)) => {
                let out = nsenter(*sd, &["systemctl", "start", unit]);
                assert!(out.status.success(), "systemctl start {unit}: {out:?}\nlog:\n{}", self.log_text());
            }
            None => {
                let log = std::fs::OpenOptions::new().append(true).open(&self.log).unwrap();
                self.child = Some(spawn_broker(&self.dir, &log, &self.env, None, self.netns.as_ref()));
            }
        }
        self.wait_socket();
        self.wait_ready();
    }
}

impl Broker {
    /// Stops this broker (SIGTERM, or `systemctl stop`) and starts a new one
    /// on the same directory and state with `policies`.
    pub fn restart(mut self, name: &str, policies: &[PolicyFile]) -> Broker {
        self.stop();
        let dir = self.dir.clone();
        // Drop must not remove the directory the next broker uses.
        self.dir = PathBuf::new();
        Broker::start_in(name, dir, policies, BrokerOptions::default())
    }

    fn stop(&mut self) {
        if self.unit.is_some() && std::thread::panicking() {
            let _ = std::fs::write(&self.log, self.log_text());
        }
        if let Some((unit, sd)) = self.unit.take() {
            let _ = nsenter(sd, &["systemctl", "stop", &unit]);
            let _ = std::fs::remove_file(unit_path(sd, &unit));
        }
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        if self.dir.as_os_str().is_empty() {
            return;
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("broker log kept in {}", self.log.display());
        }
    }
}

// ---- systemd mode -------------------------------------------------------

/// The namespaced systemd named by `CORRAL_TEST_SYSTEMD_PID`, when that
/// process is alive and is a systemd (its PID as seen from here).
pub fn systemd_pid() -> Option<u32> {
    let pid: u32 = std::env::var("CORRAL_TEST_SYSTEMD_PID").ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "systemd").then_some(pid)
}

/// systemd mode: `CORRAL_TEST_UNDER_SYSTEMD=1` runs every [`Broker`] as a
/// unit of the namespaced systemd (with `--systemd required`, so workers get
/// real scopes). Returns that systemd's PID. Asking for the mode without a
/// live systemd is an error, not a silent fall-back to rlimit mode.
pub fn under_systemd() -> Option<u32> {
    if std::env::var("CORRAL_TEST_UNDER_SYSTEMD").as_deref() != Ok("1") {
        return None;
    }
    match systemd_pid() {
        Some(pid) => Some(pid),
        None => panic!(
            "CORRAL_TEST_UNDER_SYSTEMD=1, but CORRAL_TEST_SYSTEMD_PID does not name a live systemd \
             (start one with scripts/sd-ns/ns.sh start)"
        ),
    }
}

/// For tests that cannot run their broker as a unit: true (and a printed
/// reason) in systemd mode; the test then returns.
pub fn skip_under_systemd(why: &str) -> bool {
    if under_systemd().is_some() {
        eprintln!("SKIP in systemd mode: {why}");
        return true;
    }
    false
}

/// Runs `args` inside the namespace of the systemd `sd` (PID and mount
/// namespaces), with a 60 s guard.
pub fn nsenter(sd: u32, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .args(["nsenter", "-t", &sd.to_string(), "-m", "-p", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `systemctl show -p PROP --value UNIT` inside the namespace.
pub fn systemctl_show(sd: u32, unit: &str, prop: &str) -> String {
    let out = nsenter(sd, &["systemctl", "show", "-p", prop, "--value", unit]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The host PID of the process that is `ns_pid` inside the PID namespace
/// of `sd`: scans `NSpid:` lines of the processes in that namespace, and of
/// their children in namespaces of their own (a worker is PID 1 of its own
/// PID namespace, a child of the broker).
pub fn host_pid(sd: u32, ns_pid: u32) -> Option<u32> {
    let ns = std::fs::read_link(format!("/proc/{sd}/ns/pid")).ok()?;
    let field = |pid: &str, name: &str| -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix(name)).map(|l| l.trim().to_string())
    };
    // How deep sd's namespace is: its NSpid has one entry per level.
    let level = field(&sd.to_string(), "NSpid:")?.split_whitespace().count();
    let in_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() == Some(&ns);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = pid.to_string();
        let Some(nspid) = field(&p, "NSpid:") else {
            continue;
        };
        let inner = nspid.split_whitespace().nth(level - 1).and_then(|s| s.parse::<u32>().ok());
        if inner != Some(ns_pid) {
            continue;
        }
        if in_ns(&p) || field(&p, "PPid:").is_some_and(|pp| in_ns(&pp)) {
            return Some(pid);
        }
    }
    None
}

/// Where a test unit's file goes: the namespace's private /run.
fn unit_path(sd: u32, unit: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{sd}/root/run/systemd/system/{unit}"))
}

/// Quotes a word for a unit file's command line or `Environment=`.
fn unit_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$"))
}

/// The text of a test broker's unit: units/corral.service (same hardening,
/// Type=notify, watchdog) with its own command line, write access to the
/// scratch directory only, the test's environment, and no [Install].
/// Left out: LoadCredential= (no provider keys in tests) and the
/// Runtime/State/ConfigurationDirectory= of the real service (a test broker
/// keeps everything in its scratch directory).
pub fn test_unit_text(
    name: &str,
    dir: &Path,
    instance: &str,
    env: &[(String, String)],
    netns: Option<&Netns>,
) -> String {
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("units/corral.service")).unwrap();
    let q = |p: &Path| unit_quote(&p.display().to_string());
    let mut out = String::new();
    let mut section = String::new();
    let mut saw_exec = false;
    for line in shipped.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.to_string();
        }
        if section == "[Install]" {
            continue;
        }
        let key = t.split('=').next().unwrap_or("");
        match key {
            "Description" => {
                out.push_str(&format!("Description=corral test broker {name}\n"));
                continue;
            }
            "LoadCredential"
            | "RuntimeDirectory"
            | "RuntimeDirectoryPreserve"
            | "StateDirectory"
            | "StateDirectoryMode"
            | "ConfigurationDirectory" => continue,
            "ExecStart" => {
                saw_exec = true;
                out.push_str(&format!(
                    "ExecStart={} broker --policies {} --socket {} --state-dir {} --systemd required --instance {}\n",
                    unit_quote(BIN),
                    q(&dir.join("policies")),
                    q(&dir.join("corral.sock")),
                    q(&dir.join("state")),
                    instance,
                ));
                out.push_str(&format!("ReadWritePaths={}\n", q(dir)));
                // The unit's PrivateTmp would hide a checkout under /tmp (CI
                // may clone there): bind the scratch dir and the binary back,
                // taken from the host's view.
                if dir.starts_with("/tmp") || dir.starts_with("/var/tmp") {
                    // All of the tests' scratch space: some tests keep files
                    // (a setuid binary, say) beside the broker's own dir.
                    out.push_str(&format!("BindPaths={}\n", q(Path::new(env!("CARGO_TARGET_TMPDIR")))));
                    out.push_str(&format!("BindReadOnlyPaths={}\n", unit_quote(BIN)));
                }
                out.push_str("Environment=RUST_LOG=info\n");
                for (k, v) in env {
                    out.push_str(&format!("Environment={}\n", unit_quote(&format!("{k}={v}"))));
                }
                if let Some(ns) = netns {
                    // A single path: systemd takes it unquoted (a quoted
                    // one is ignored with a warning).
                    out.push_str(&format!("NetworkNamespacePath={}\n", ns.unit_path.display()));
                }
                // A crashed test broker fails its test; it is not restarted.
                out.push_str("Restart=no\n");
                continue;
            }
            "Restart" => continue,
            _ => {}
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(saw_exec, "units/corral.service has no ExecStart=");
    out
}

static UNIT_SEQ: AtomicU32 = AtomicU32::new(0);

/// Writes and starts `corral-test-<name>-<pid>x<n>.service`; returns its name.
fn start_unit(sd: u32, name: &str, dir: &Path, env: &[(String, String)], netns: Option<&Netns>) -> String {
    let n = UNIT_SEQ.fetch_add(1, Ordering::Relaxed);
    let instance = format!("t{}x{n}", std::process::id());
    let unit = format!("corral-test-{name}-{instance}.service");
    let text = test_unit_text(name, dir, &instance, env, netns);
    std::fs::write(unit_path(sd, &unit), text).unwrap();
    // A unit never loaded before is found on disk without a daemon-reload.
    let out = nsenter(sd, &["systemctl", "start", &unit]);
    if !out.status.success() {
        let journal = nsenter(sd, &["journalctl", "--no-pager", "-o", "cat", "-u", &unit]);
        let _ = std::fs::remove_file(unit_path(sd, &unit));
        panic!(
            "systemctl start {unit} failed: {}{}\njournal:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&journal.stdout)
        );
    }
    unit
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

// ---------------------------------------------------------------------------
// LLM gateway helpers: a scripted OpenAI-compatible stub server on loopback.

/// One scripted answer of the [`Stub`].
#[derive(Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
    /// A streamed answer stops after its first piece of text until this
    /// turns true.
    pub hold: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Scripted {
    pub fn json(status: u16, body: &Value) -> Scripted {
        Scripted { status, headers: Vec::new(), body: body.to_string(), delay: Duration::ZERO, hold: None }
    }

    /// When streamed: the rest of the text waits for `gate`.
    pub fn held(mut self, gate: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Scripted {
        self.hold = Some(std::sync::Arc::clone(gate));
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Scripted {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn delayed(mut self, d: Duration) -> Scripted {
        self.delay = d;
        self
    }
}

/// A final answer with the given usage.
pub fn answer(text: &str, prompt_tokens: u64, completion_tokens: u64) -> Scripted {
    Scripted::json(
        200,
        &serde_json::json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 1, "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
        }),
    )
}

/// A tool call of `name` with `arguments` (a JSON value), 10 + 5 tokens.
pub fn tool_call(id: &str, name: &str, arguments: &Value) -> Scripted {
    Scripted::json(
        200,
        &serde_json::json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 1, "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": null,
                                     "tool_calls": [{"id": id, "type": "function",
                                        "function": {"name": name, "arguments": arguments.to_string()}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        }),
    )
}

/// An OpenAI-style error body.
pub fn api_error(status: u16, message: &str) -> Scripted {
    Scripted::json(
        status,
        &serde_json::json!({"error": {"message": message, "type": "error", "param": null, "code": null}}),
    )
}

/// A request the stub received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Value,
    pub at: Instant,
}

#[derive(Default)]
struct StubState {
    script: std::collections::VecDeque<Scripted>,
    received: Vec<Received>,
}

/// An OpenAI-compatible server on 127.0.0.1 that answers from a script and
/// records every request (headers included). Stops with the test process.
pub struct Stub {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<StubState>>,
}

impl Stub {
    pub fn start(script: Vec<Scripted>) -> Stub {
        use std::sync::{Arc, Mutex};
        let state = Arc::new(Mutex::new(StubState { script: script.into(), received: Vec::new() }));
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, std::convert::Infallible>(stub_answer(shared, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        let addr = rx.recv().unwrap();
        Stub { addr, state }
    }

    /// The `base_url` of the stub for a policy.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn push(&self, s: Scripted) {
        self.state.lock().unwrap().script.push_back(s);
    }
}

type StubBody = http_body_util::combinators::BoxBody<hyper::body::Bytes, std::convert::Infallible>;

/// A body written piece by piece from a channel.
struct ChanBody(tokio::sync::mpsc::Receiver<hyper::body::Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// The server-sent events of a scripted `chat.completion`, as a provider
/// streams it: the text a word at a time, each tool call's arguments in
/// two halves, the finish reason, then the usage and `[DONE]`.
fn sse_events(answer: &Value) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        serde_json::json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1,
            "model": "stub-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let msg = &answer["choices"][0]["message"];
    let mut events = vec![chunk(serde_json::json!({"role": "assistant", "content": ""}), Value::Null)];
    if let Some(text) = msg["content"].as_str() {
        for word in text.split_inclusive(' ') {
            events.push(chunk(serde_json::json!({"content": word}), Value::Null));
        }
    }
    for (i, call) in msg["tool_calls"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let args = call["function"]["arguments"].as_str().unwrap_or("");
        let (a, b) = args.split_at(args.len() / 2);
        events.push(chunk(
            serde_json::json!({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": a}}]}),
            Value::Null,
        ));
        events
            .push(chunk(serde_json::json!({"tool_calls": [{"index": i, "function": {"arguments": b}}]}), Value::Null));
    }
    events.push(chunk(serde_json::json!({}), answer["choices"][0]["finish_reason"].clone()));
    let mut usage = chunk(Value::Null, Value::Null);
    usage["choices"] = serde_json::json!([]);
    usage["usage"] = answer["usage"].clone();
    events.push(usage);
    events.into_iter().map(|e| format!("data: {e}\n\n")).chain(["data: [DONE]\n\n".to_string()]).collect()
}

async fn stub_answer(
    state: std::sync::Arc<std::sync::Mutex<StubState>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<StubBody> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let headers =
        req.headers().iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let streamed = body["stream"] == Value::Bool(true);
    let next = {
        let mut s = state.lock().unwrap();
        s.received.push(Received { path, headers, body, at: Instant::now() });
        s.script.pop_front()
    };
    let next = next.unwrap_or_else(|| api_error(500, "stub script exhausted"));
    if !next.delay.is_zero() {
        tokio::time::sleep(next.delay).await;
    }
    let answer: Value = serde_json::from_str(&next.body).unwrap_or(Value::Null);
    if streamed && next.status == 200 && answer["object"] == "chat.completion" {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hold = next.hold.clone();
        tokio::spawn(async move {
            for (i, event) in sse_events(&answer).into_iter().enumerate() {
                if tx.send(hyper::body::Bytes::from(event)).await.is_err() {
                    return;
                }
                // The first text piece is event 1 (after the role).
                if let (1, Some(gate)) = (i, &hold) {
                    while !gate.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        let mut resp = hyper::Response::new(ChanBody(rx).boxed());
        resp.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/event-stream"));
        return resp;
    }
    let mut resp = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(next.body)).boxed());
    *resp.status_mut() = hyper::StatusCode::from_u16(next.status).unwrap();
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    for (k, v) in next.headers {
        resp.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            hyper::header::HeaderValue::from_str(&v).unwrap(),
        );
    }
    resp
}

/// A test policy (see [`policy`]) for user corral-test with an `[llm]`
/// table pointing at `base_url`; `llm_extra` is appended to that table.
pub fn llm_policy(name: &str, tenant: &str, base_url: &str, llm_extra: &str) -> PolicyFile {
    let mut p = policy(name, tenant, Some("corral-test"), "", "", "min_idle = 1\nmax_workers = 1");
    let steps = if llm_extra.contains("max_steps") { "" } else { "max_steps = 4\n" };
    // The stub listens on a loopback port of the test process (root).
    let owner = if llm_extra.contains("endpoint_") { "" } else { "endpoint_user = \"root\"\n" };
    p.text
        .push_str(&format!("\n[llm]\nbase_url = \"{base_url}\"\nmodel = \"stub-model\"\n{owner}{steps}{llm_extra}\n"));
    p
}

impl Broker {
    /// A raw HTTP request: (status, headers, body bytes).
    pub fn http_raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, bytes) =
            rt.block_on(corral::client::request(&self.socket, method, path, Some(body.to_vec()))).unwrap();
        (status.as_u16(), bytes.to_vec())
    }

    /// `POST /v1/ask`: (status, reply).
    pub fn ask(&self, workflow: &str, prompt: &str) -> (u16, Value) {
        let body = serde_json::json!({"workflow": workflow, "prompt": prompt});
        self.http("POST", "/v1/ask", Some(body.to_string().as_bytes()))
    }

    /// The broker's ledger, opened read-write (tests may edit rows).
    pub fn ledger(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.state.join("ledger.sqlite3")).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }
}

/// Every process of the host (as seen here): (pid, command line with
/// spaces for NULs).
pub fn host_processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
    }
    out
}

/// Polls `f` every 20 ms until it returns `Some` or `limit` passes.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
