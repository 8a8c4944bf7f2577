//! What a receipt costs: `/bin/true` through corral on a workspace of
//! 10,000 files (100 directories of 100 files) with receipts on, against
//! the same call on an empty workspace and on the same 10,000 files with
//! `[limits].receipts = false`, in one broker, interleaved call by call.
//!
//! `cargo bench --bench receipts` as root. Under the namespaced systemd of
//! the tests: `CORRAL_TEST_SYSTEMD_PID=$(scripts/sd-ns/ns.sh pid) cargo
//! bench --bench receipts` (the bench re-runs itself inside that namespace;
//! the workers then get their scopes). `CORRAL_BENCH_ITERS` sets the calls
//! per row (default 300), `CORRAL_BENCH_FILES` the files (default 10000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_corral");

/// One workflow of the bench: its name and its `[limits]`.
fn policy(name: &str, limits: &str) -> String {
    format!(
        r#"[workflow]
name = "{name}"
tenant = "bench"

[sandbox]
landlock = "required"
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"]
write = ["{{workspace}}"]

[limits]
{limits}

[pool]
min_idle = 1
max_workers = 1
"#
    )
}

fn body(workflow: &str) -> Vec<u8> {
    format!(r#"{{"workflow":"{workflow}","argv":["/bin/true"]}}"#).into_bytes()
}

fn percentile(sorted: &[f64], per_mille: usize) -> f64 {
    let n = sorted.len();
    let rank = (1..=n).find(|&k| k * 1000 >= per_mille * n).unwrap_or(n);
    sorted[rank - 1]
}

/// Re-runs the bench inside the namespaced systemd of the tests, when one
/// is named and this host has none; returns whether systemd is reachable.
fn systemd_here() -> bool {
    if Path::new("/run/systemd/system").is_dir() {
        return true;
    }
    match std::env::var("CORRAL_TEST_SYSTEMD_PID") {
        Ok(pid) if std::env::var_os("CORRAL_BENCH_IN_NS").is_none() => {
            let st = Command::new("nsenter")
                .args(["-t", &pid, "-m", "-p", "--"])
                .arg(std::env::current_exe().unwrap())
                .args(std::env::args().skip(1))
                .env("CORRAL_BENCH_IN_NS", "1")
                .status()
                .unwrap();
            std::process::exit(st.code().unwrap_or(1));
        }
        _ => false,
    }
}

/// One call: (client-side ms, the reply).
fn call(rt: &tokio::runtime::Runtime, socket: &Path, workflow: &str) -> (f64, serde_json::Value) {
    let t = Instant::now();
    let (status, bytes) = rt
        .block_on(corral::client::request(socket, hyper::Method::POST, "/v1/exec", Some(body(workflow))))
        .expect("broker call");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(status.is_success(), "{}", String::from_utf8_lossy(&bytes));
    let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(reply["exit_code"], 0, "{reply:#}");
    (ms, reply)
}

fn main() {
    let systemd = systemd_here();
    let iters: usize = std::env::var("CORRAL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let files: usize = std::env::var("CORRAL_BENCH_FILES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let dir = PathBuf::from(format!("/run/corral-bench-receipts-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    for (name, limits) in [("empty", ""), ("full", ""), ("full-off", "receipts = false")] {
        std::fs::write(dir.join(format!("policies/{name}.toml")), policy(name, limits)).unwrap();
    }
    let socket = dir.join("s.sock");
    let mut broker = Command::new(BIN)
        .args(["broker", "--instance", "bench-receipts", "--systemd", if systemd { "required" } else { "off" }])
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for wf in ["empty", "full", "full-off"] {
        loop {
            let ok = std::os::unix::net::UnixStream::connect(&socket).is_ok()
                && rt
                    .block_on(corral::client::request(&socket, hyper::Method::POST, "/v1/exec", Some(body(wf))))
                    .is_ok_and(|(s, _)| s.is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "broker did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The workspaces exist now (the broker made them): fill two of them.
    for wf in ["full", "full-off"] {
        let ws = dir.join("state/workspaces/bench").join(wf);
        for i in 0..files {
            let sub = ws.join(format!("d{:03}", i / 100));
            if i % 100 == 0 {
                std::fs::create_dir_all(&sub).unwrap();
            }
            std::fs::write(sub.join(format!("f{i:05}")), [b'x'; 100]).unwrap();
        }
    }
    let (_, r) = call(&rt, &socket, "full");
    let c = &r["receipt"]["changes"];
    assert!(c["incomplete"].is_null() && c["created_count"] == 0, "{c:#}");
    let entries = c["entries"].as_u64().unwrap();

    for _ in 0..20 {
        for wf in ["empty", "full", "full-off"] {
            call(&rt, &socket, wf); // warm-up
        }
    }
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("empty workspace, receipts on", Vec::new(), Vec::new()),
        ("10k files, receipts on", Vec::new(), Vec::new()),
        ("10k files, receipts = false", Vec::new(), Vec::new()),
    ];
    for _ in 0..iters {
        for (row, wf) in rows.iter_mut().zip(["empty", "full", "full-off"]) {
            let (ms, reply) = call(&rt, &socket, wf);
            row.1.push(ms);
            let walk = reply["receipt"]["changes"]["walk_us"].as_f64().unwrap_or(0.0) / 1000.0;
            row.2.push(walk);
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(broker.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);

    for row in &mut rows {
        row.1.sort_by(f64::total_cmp);
        row.2.sort_by(f64::total_cmp);
    }
    let base = percentile(&rows[0].1, 500);
    println!(
        "{iters} calls of /bin/true per row, interleaved, fresh connection each; {} mode; the full workspaces \
         hold {entries} entries\n",
        if systemd { "systemd" } else { "rlimit" }
    );
    println!("| what | p50 ms | p99 ms | p50 − empty ms | p50 / empty | both walks p50 ms (worker's figure) |");
    println!("|---|---|---|---|---|---|");
    for (name, times, walks) in &rows {
        let p50 = percentile(times, 500);
        println!(
            "| {name} | {p50:.3} | {:.3} | {:+.3} | {:.2}x | {:.3} |",
            percentile(times, 990),
            p50 - base,
            p50 / base,
            percentile(walks, 500)
        );
    }
}
