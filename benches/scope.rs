//! Cost of starting a worker with its systemd scope, against
//! `systemd-run --scope --quiet /bin/true` and a worker start without a
//! scope, measured in the same run under a real systemd.
//!
//! `cargo bench --bench scope`. Needs systemd: either this machine's PID 1,
//! or the namespaced one of the tests (`scripts/sd-ns/ns.sh start`, then
//! `CORRAL_TEST_SYSTEMD_PID=$(scripts/sd-ns/ns.sh pid) cargo bench --bench
//! scope`; the bench re-runs itself inside that namespace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_corral");
const POLICY: &str = r#"[workflow]
name = "bench"
tenant = "bench"

[sandbox]
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"]

[pool]
min_idle = 1
max_workers = 1
"#;

fn median_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |per_mille: usize| v[((v.len() * per_mille).div_ceil(1000)).clamp(1, v.len()) - 1];
    (at(500), at(990))
}

/// `corral broker` on `policies`, its state under `dir`.
fn broker(dir: &Path, policies: &Path, socket: &Path, systemd: &str) -> std::process::Child {
    Command::new(BIN)
        .args(["broker", "--systemd", systemd, "--instance", "bench", "--policies"])
        .arg(policies)
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGTERM, and wait for it to end.
fn stop(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// Starts a broker, waits for its worker, returns the worker's start_ms.
fn worker_start_ms(dir: &Path, systemd: &str) -> f64 {
    let socket = dir.join("s.sock");
    let mut child = broker(dir, &dir.join("policies"), &socket, systemd);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ms = loop {
        assert!(Instant::now() < deadline, "broker did not start a worker");
        if let Ok((s, body)) = rt.block_on(corral::client::request(&socket, hyper::Method::GET, "/v1/status", None)) {
            if s.is_success() {
                let st: corral::api::Status = serde_json::from_slice(&body).unwrap();
                if let Some(ms) = st.workflows[0].workers.first().and_then(|w| w.start_ms) {
                    break ms;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    stop(&mut child);
    ms
}

/// Starts a broker with `n` workflows (one warm worker each), returns the
/// time from its spawn until every pool reports a ready worker.
fn pools_start_ms(dir: &Path, systemd: &str, n: usize) -> f64 {
    let policies = dir.join(format!("policies-{n}"));
    let _ = std::fs::remove_dir_all(&policies);
    std::fs::create_dir_all(&policies).unwrap();
    for i in 0..n {
        let text = POLICY.replace("name = \"bench\"", &format!("name = \"bench{i}\""));
        std::fs::write(policies.join(format!("bench{i}.toml")), text).unwrap();
    }
    let socket = dir.join("many.sock");
    let t = Instant::now();
    let mut child = broker(dir, &policies, &socket, systemd);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ms = loop {
        assert!(Instant::now() < deadline, "{n} pools did not start");
        if let Ok((s, body)) = rt.block_on(corral::client::request(&socket, hyper::Method::GET, "/v1/status", None)) {
            if s.is_success() {
                let st: corral::api::Status = serde_json::from_slice(&body).unwrap();
                let ready = st
                    .workflows
                    .iter()
                    .filter(|w| w.workers.iter().any(|k| k.start_ms.is_some() && k.state == "idle"))
                    .count();
                if ready == n {
                    break t.elapsed().as_secs_f64() * 1000.0;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&policies);
    ms
}

fn main() {
    if !Path::new("/run/systemd/system").is_dir() {
        match std::env::var("CORRAL_TEST_SYSTEMD_PID") {
            Ok(pid) if std::env::var_os("CORRAL_BENCH_IN_NS").is_none() => {
                let me = std::env::current_exe().unwrap();
                let st = Command::new("nsenter")
                    .args(["-t", &pid, "-m", "-p", "--"])
                    .arg(me)
                    .args(std::env::args().skip(1))
                    .env("CORRAL_BENCH_IN_NS", "1")
                    .status()
                    .unwrap();
                std::process::exit(st.code().unwrap_or(1));
            }
            _ => {
                println!("scope bench skipped: no systemd here (see the comment at the top of benches/scope.rs)");
                return;
            }
        }
    }
    let iters: usize = std::env::var("CORRAL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let dir = Path::new("/run/corral-bench");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/bench.toml"), POLICY).unwrap();

    let (mut scoped, mut plain, mut run) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        scoped.push(worker_start_ms(dir, "required"));
        plain.push(worker_start_ms(dir, "off"));
        let t = Instant::now();
        let st = Command::new("systemd-run").args(["--scope", "--quiet", "/bin/true"]).status().unwrap();
        assert!(st.success());
        run.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let reps: usize = std::env::var("CORRAL_BENCH_POOL_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let (mut many_scoped, mut many_plain) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        many_scoped.push(pools_start_ms(dir, "required", 100));
        many_plain.push(pools_start_ms(dir, "off", 100));
    }
    let _ = std::fs::remove_dir_all(dir);
    println!("{iters} starts each, interleaved; worker start = spawn until the confined worker reports ready\n");
    println!("| what | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (name, v) in [
        ("worker start with its scope (D-Bus StartTransientUnit + join)", scoped),
        ("worker start without systemd (--systemd off)", plain),
        ("systemd-run --scope --quiet /bin/true (whole command)", run),
    ] {
        let (p50, p99) = median_p99(v);
        println!("| {name} | {p50:.2} | {p99:.2} |");
    }
    println!("\n{reps} broker starts each, interleaved: spawn until all 100 pools report an idle, ready worker\n");
    println!("| what | p50 ms | max ms |");
    println!("|---|---|---|");
    for (name, v) in [("100 workflows, with scopes", many_scoped), ("100 workflows, --systemd off", many_plain)] {
        let max = v.iter().copied().fold(0.0, f64::max);
        let (p50, _) = median_p99(v);
        println!("| {name} | {p50:.0} | {max:.0} |");
    }
}
