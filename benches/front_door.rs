//! The front door under load and under attack, as root:
//!
//! 1. throughput and latency of `POST /v1/exec` at concurrency 1, 4, 8, 32
//!    and 100 (each client on its own keep-alive connection), quoted
//!    against concurrency 1, and the throughput against bare spawns of the
//!    same command from as many threads (at most 32), half just before the
//!    level and half just after. 100, not 128: one uid may hold 128
//!    connections, and a level's clients connect while the last level's
//!    may still be closing;
//! 2. a neighbour's call latency (root, one call at a time) while uid
//!    mallory holds 1,000 connections, and while uid alice (a client)
//!    holds 1,000 half-sent 8 MiB bodies, quoted against the same calls
//!    with nobody attacking, in the same run;
//! 3. the broker's RSS idle, during each attack, and after.
//!
//! `cargo bench --bench front_door` (needs root, python3 and the users
//! mallory and alice: `scripts/setup-test-host.sh`).
//! `CORRAL_BENCH_CALLS` sets the calls per concurrency level (default 2000);
//! `CORRAL_BENCH_WORKERS` the pool's `max_workers` (default 4; `min_idle`
//! is half of it, so the pool grows under load as it would in use);
//! `CORRAL_BENCH_LEVELS` the concurrency levels (default `1,4,8,32,100`;
//! each 1 to 100); `CORRAL_BENCH_LOAD_ONLY=1` skips the attacks (parts 2
//! and 3);
//! `CORRAL_BENCH_BIN` the corral binary to measure (default: cargo's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

const BIN: &str = env!("CARGO_BIN_EXE_corral");

const POLICY: &str = r#"[workflow]
name = "bench"
tenant = "bench"
clients = { users = ["alice"], groups = [] }

[sandbox]
landlock = "required"
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"]
write = ["{workspace}"]

[pool]
min_idle = {min_idle}
max_workers = {max_workers}
queue = 256
"#;

/// Opens n connections as another user, sends a payload (and pad bytes
/// of "x") on each, prints
/// one line when done, holds them until stdin closes.
const HELPER: &str = r#"
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
payload = bytes.fromhex(sys.argv[3]) + b"x" * int(sys.argv[4])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if payload:
            s.sendall(payload)
        socks.append(s)
    except OSError:
        pass
print("HELD", len(socks), flush=True)
sys.stdin.read()
"#;

fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    let n = sorted.len();
    let rank = (1..=n).find(|&k| k * 1000 >= per_mille * n).unwrap_or(n);
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(socket: &Path) -> Sender {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// One exec of `echo TOKEN`; true when served (false: 429 busy).
async fn call(sender: &mut Sender, token: &str) -> bool {
    let body = format!(r#"{{"workflow":"bench","argv":["echo","{token}"]}}"#);
    let req = hyper::Request::post("/v1/exec")
        .header("host", "corral")
        .header("x-corral-workflow", "bench")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.ready().await.expect("connection lost");
    let resp = sender.send_request(req).await.expect("call lost");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    match status {
        200 => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["stdout"], format!("{token}\n"));
            true
        }
        429 => false,
        s => panic!("{s}: {}", String::from_utf8_lossy(&bytes)),
    }
}

/// `calls` calls from `level` clients: (latencies of served calls, busy,
/// wall time).
async fn level(socket: &Path, level: usize, calls: usize) -> (Vec<Duration>, usize, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(calls)));
    let busy = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..level {
        let (next, lat, busy, socket) = (Arc::clone(&next), Arc::clone(&lat), Arc::clone(&busy), socket.to_path_buf());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&socket).await;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= calls {
                    return;
                }
                let t = Instant::now();
                if call(&mut sender, &format!("c{level}-{i}")).await {
                    lat.lock().unwrap().push(t.elapsed());
                } else {
                    busy.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = started.elapsed();
    let mut lat = std::mem::take(&mut *lat.lock().unwrap());
    lat.sort();
    (lat, busy.load(Ordering::SeqCst), wall)
}

/// The baseline of a level: `calls` bare spawns of `/bin/echo TOKEN` (its
/// output read through a pipe and checked, as corral's worker does), from
/// `level` threads of this process: the kernel's own cost of the same
/// work on the same cores, with nothing around it. Calls per second.
fn bare_level(level: usize, calls: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..level)
        .map(|_| {
            let next = Arc::clone(&next);
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= calls {
                    return;
                }
                let token = format!("b{level}-{i}");
                let out = Command::new("/bin/echo").arg(&token).stderr(Stdio::null()).output().unwrap();
                assert_eq!(out.stdout, format!("{token}\n").as_bytes());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    calls as f64 / started.elapsed().as_secs_f64()
}

/// `n` sequential neighbour calls on fresh connections (as a CLI makes
/// them): sorted latencies.
async fn neighbour(socket: &Path, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let mut sender = connect(socket).await;
        assert!(call(&mut sender, &format!("n{i}")).await, "the neighbour was refused");
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

struct Attack(Child);

impl Attack {
    fn start(user: &str, socket: &Path, n: usize, payload: &[u8], pad: usize) -> (Attack, String) {
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new("runuser")
            .args([
                "-u",
                user,
                "--",
                "python3",
                "-c",
                HELPER,
                socket.to_str().unwrap(),
                &n.to_string(),
                &hex,
                &pad.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // Let the broker answer the refused ones and settle.
        std::thread::sleep(Duration::from_millis(1500));
        (Attack(child), line.trim().to_string())
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn main() {
    let calls: usize = std::env::var("CORRAL_BENCH_CALLS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("corral-bench-fd-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let workers: u32 = std::env::var("CORRAL_BENCH_WORKERS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let policy =
        POLICY.replace("{min_idle}", &(workers / 2).max(1).to_string()).replace("{max_workers}", &workers.to_string());
    std::fs::write(dir.join("policies/bench.toml"), policy).unwrap();
    // The attackers must reach the socket.
    let mut p = Some(dir.as_path());
    while let Some(d) = p {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(d) {
            let mode = m.permissions().mode();
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011));
        }
        p = d.parent();
    }
    let socket = dir.join("s.sock");
    let mut broker = Command::new(std::env::var("CORRAL_BENCH_BIN").unwrap_or_else(|_| BIN.to_string()))
        .args(["broker", "--systemd", "off", "--policies"])
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
    let pid = broker.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "broker did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(async {
        let mut s = connect(&socket).await;
        for i in 0..50 {
            while !call(&mut s, &format!("warm{i}")).await {}
        }
    });

    println!(
        "## Throughput: {calls} exec calls per level, each client on its own keep-alive connection; \
         max_workers = {workers}\n"
    );
    println!(
        "| concurrency | calls/s | bare spawns/s | calls / bare | p50 ms | p99 ms | p50 / p50 at 1 | busy (429) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut base = None;
    let levels: Vec<usize> = std::env::var("CORRAL_BENCH_LEVELS")
        .ok()
        .map(|s| s.split(',').filter_map(|l| l.trim().parse().ok()).filter(|&l| (1..=100).contains(&l)).collect())
        .filter(|l: &Vec<usize>| !l.is_empty())
        .unwrap_or_else(|| vec![1, 4, 8, 32, 100]);
    for c in levels {
        // Half the bare spawns before the level and half after: a neighbour's
        // load that comes or goes meanwhile weighs on both.
        let before = bare_level(c.min(32), calls / 2);
        let (lat, busy, wall) = rt.block_on(level(&socket, c, calls));
        let after = bare_level(c.min(32), calls / 2);
        let bare = 2.0 / (1.0 / before + 1.0 / after);
        let (p50, p99) = (percentile(&lat, 500), percentile(&lat, 990));
        let b = *base.get_or_insert(p50);
        let rate = calls as f64 / wall.as_secs_f64();
        println!(
            "| {c} | {rate:.0} | {bare:.0} | {:.2}x | {:.3} | {:.3} | {:.2}x | {busy} |",
            rate / bare,
            ms(p50),
            ms(p99),
            p50.as_secs_f64() / b.as_secs_f64()
        );
    }

    let users_ok = ["mallory", "alice"].iter().all(|u| nix::unistd::User::from_name(u).ok().flatten().is_some());
    if std::env::var_os("CORRAL_BENCH_LOAD_ONLY").is_some() {
        println!("\nattacks skipped (CORRAL_BENCH_LOAD_ONLY)");
    } else if !users_ok {
        println!("\nusers mallory and alice missing: no attack figures (scripts/setup-test-host.sh)");
    } else {
        let n = 300;
        let idle_rss = rss_kib(pid);
        println!("\n## A neighbour's call (root, fresh connection each, {n} calls) under attack\n");
        println!("| while | p50 ms | p99 ms | p50 / quiet | broker RSS KiB |");
        println!("|---|---|---|---|---|");
        let quiet = rt.block_on(neighbour(&socket, n));
        let q50 = percentile(&quiet, 500);
        let row = |what: &str, lat: &[Duration], rss: u64| {
            let p50 = percentile(lat, 500);
            println!(
                "| {what} | {:.3} | {:.3} | {:.2}x | {rss} |",
                ms(p50),
                ms(percentile(lat, 990)),
                p50.as_secs_f64() / q50.as_secs_f64()
            );
        };
        row("nobody attacks", &quiet, rss_kib(pid));
        let (a, held) = Attack::start("mallory", &socket, 1000, b"", 0);
        let lat = rt.block_on(neighbour(&socket, n));
        row(&format!("mallory opens 1,000 connections ({held} at the client)"), &lat, rss_kib(pid));
        drop(a);
        let half_head: &[u8] = b"POST /v1/exec HTTP/1.1\r\nHost: corral\r\nContent-Ty";
        let (a, held) = Attack::start("mallory", &socket, 1000, half_head, 0);
        let lat = rt.block_on(neighbour(&socket, n));
        row(&format!("mallory sends 1,000 half heads ({held})"), &lat, rss_kib(pid));
        drop(a);
        // A client of the workflow: 1,000 bodies that declare 8 MiB and
        // send 1 MiB of it, then stall.
        let body = b"POST /v1/exec HTTP/1.1\r\nHost: corral\r\nx-corral-workflow: bench\r\nContent-Length: 8388608\r\n\r\n{\"workflow\":\"bench\",\"argv\":[\"true\"],\"stdin\":\"".to_vec();
        let (a, held) = Attack::start("alice", &socket, 1000, &body, 1 << 20);
        let lat = rt.block_on(neighbour(&socket, n));
        let during = rss_kib(pid);
        row(&format!("alice sends 1,000 half 8 MiB bodies ({held})"), &lat, during);
        drop(a);
        std::thread::sleep(Duration::from_millis(2500));
        println!(
            "\nbroker RSS: idle {idle_rss} KiB, {during} KiB during the half bodies ({:.2}x), {} KiB 2.5 s after",
            during as f64 / idle_rss as f64,
            rss_kib(pid)
        );
    }
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
