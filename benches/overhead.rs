//! One table: the cost of one trivial call (`/bin/true`) through corral and
//! through the other ways to run it, measured in the same run, interleaved
//! call by call (a noisy neighbour hits every row alike):
//!
//! - bare `fork`+`exec`+`wait` (the kernel's own cost, the baseline);
//! - corral: `POST /v1/exec` on a fresh connection (as the CLI makes it) and
//!   on a kept-alive one, to a warm worker, which runs the tool as its
//!   sandboxed child; and on a fresh connection from a bare blocking client
//!   (one `write`, then read to the end of the answer), which parts the
//!   broker's cost of a connection from the client's own (hyper's);
//! - `bwrap --unshare-all --ro-bind / / /bin/true` (if installed);
//! - `systemd-run --scope --quiet /bin/true` (if systemd is reachable);
//! - `nsjail -Mo --quiet -R / -- /bin/true` (if installed).
//!
//! `cargo bench --bench overhead` as root. Under the namespaced systemd of
//! the tests: `CORRAL_TEST_SYSTEMD_PID=$(scripts/sd-ns/ns.sh pid) cargo bench
//! --bench overhead` (the bench re-runs itself inside that namespace; the
//! broker's workers then get their scopes). `CORRAL_BENCH_ITERS` sets the
//! calls per row (default 400); `CORRAL_BENCH_BIN` the corral binary to
//! measure (default: the one cargo built with the bench, e.g. to measure
//! the shipped `cargo build --release` binary from a bench built without LTO).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

const BIN: &str = env!("CARGO_BIN_EXE_corral");

const POLICY: &str = r#"[workflow]
name = "bench"
tenant = "bench"

[sandbox]
landlock = "required"
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"]
write = ["{workspace}"]

[pool]
min_idle = 1
max_workers = 1
"#;

const BODY: &[u8] = br#"{"workflow":"bench","argv":["/bin/true"]}"#;

/// The `per_mille`/1000 quantile of sorted samples (nearest rank).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    let n = sorted.len();
    let rank = (1..=n).find(|&k| k * 1000 >= per_mille * n).unwrap_or(n);
    sorted[rank - 1]
}

struct Series {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Series { name, samples: Vec::new() }
    }
    fn p(&mut self, per_mille: usize) -> Duration {
        self.samples.sort();
        percentile(&self.samples, per_mille)
    }
    fn time(&mut self, f: impl FnOnce()) {
        let t = Instant::now();
        f();
        self.samples.push(t.elapsed());
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn check_exec_answer(status: hyper::StatusCode, bytes: &[u8]) {
    assert!(status.is_success(), "{}", String::from_utf8_lossy(bytes));
    assert!(bytes.windows(14).any(|w| w == b"\"exit_code\":0,"), "{}", String::from_utf8_lossy(bytes));
}

/// One HTTP/1.1 connection to the broker, kept alive across calls.
struct KeptAlive {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeptAlive {
    async fn open(socket: &Path) -> Self {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        KeptAlive { send }
    }

    /// One call; returns the worker's own wall time for it (spawn to reap).
    async fn exec(&mut self) -> Duration {
        self.send.ready().await.unwrap();
        let req = hyper::Request::post("http://localhost/v1/exec")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(BODY)))
            .unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        check_exec_answer(status, &bytes);
        let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        Duration::from_secs_f64(answer["wall_ms"].as_f64().unwrap() / 1000.0)
    }

    async fn status(&mut self) {
        self.send.ready().await.unwrap();
        let req = hyper::Request::get("http://localhost/v1/status").body(Full::new(Bytes::new())).unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        assert!(resp.status().is_success());
        resp.into_body().collect().await.unwrap();
    }
}

/// One call on a new connection from a blocking client that writes the
/// whole request at once and reads the answer to its `content-length`: a
/// fresh connection with no client library around it.
fn fresh_bare_client(socket: &Path) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut req = format!(
        "POST /v1/exec HTTP/1.1\r\nhost: corral\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes();
    req.extend_from_slice(BODY);
    s.write_all(&req).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_end, length) = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the broker closed before its answer: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..i]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no content-length: {head}"));
            break (i + 4, length);
        }
    };
    while got.len() < head_end + length {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the answer was cut short");
        got.extend_from_slice(&buf[..n]);
    }
    let status = got.get(9..12).and_then(|code| hyper::StatusCode::from_bytes(code).ok());
    check_exec_answer(
        status.unwrap_or_else(|| panic!("no status line: {}", String::from_utf8_lossy(&got))),
        &got[head_end..],
    );
}

fn installed(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn run_ok(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?}: {st}");
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

fn main() {
    let systemd = systemd_here();
    let iters: usize = std::env::var("CORRAL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let dir = PathBuf::from(format!("/run/corral-bench-overhead-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/bench.toml"), POLICY).unwrap();
    let socket = dir.join("s.sock");
    let bin = std::env::var("CORRAL_BENCH_BIN").unwrap_or_else(|_| BIN.to_string());
    let mut broker = Command::new(&bin)
        .args(["broker", "--instance", "bench-overhead", "--systemd", if systemd { "required" } else { "off" }])
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
    let fresh = |rt: &tokio::runtime::Runtime| {
        let (status, bytes) = rt
            .block_on(corral::client::request(&socket, hyper::Method::POST, "/v1/exec", Some(BODY.to_vec())))
            .expect("broker call");
        check_exec_answer(status, &bytes);
    };
    // Wait for the broker and a warm worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            let (s, _) = rt
                .block_on(corral::client::request(&socket, hyper::Method::POST, "/v1/exec", Some(BODY.to_vec())))
                .unwrap_or((hyper::StatusCode::SERVICE_UNAVAILABLE, Default::default()));
            if s.is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "broker did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut kept = rt.block_on(KeptAlive::open(&socket));
    let bwrap = installed("bwrap", "--version");
    let nsjail = installed("nsjail", "--help");

    let mut bare = Series::new("fork+exec+wait /bin/true");
    let mut c_fresh = Series::new("corral exec, fresh connection");
    let mut c_kept = Series::new("corral exec, kept-alive connection");
    let mut c_bare_client = Series::new("(corral exec, fresh connection, a bare blocking client)");
    let mut in_worker = Series::new("(its part in the worker: spawn to reap, as it reports)");
    let mut status = Series::new("(GET /v1/status, kept-alive: HTTP without a call)");
    let mut bw = Series::new("bwrap --unshare-all --ro-bind / / /bin/true");
    let mut sd = Series::new("systemd-run --scope --quiet /bin/true");
    let mut nj = Series::new("nsjail -Mo --quiet -R / -- /bin/true");
    for _ in 0..20 {
        fresh(&rt); // warm-up
        rt.block_on(kept.exec());
    }
    for _ in 0..iters {
        bare.time(|| run_ok("/bin/true", &[]));
        c_fresh.time(|| fresh(&rt));
        c_bare_client.time(|| fresh_bare_client(&socket));
        let t = Instant::now();
        let wall = rt.block_on(kept.exec());
        c_kept.samples.push(t.elapsed());
        in_worker.samples.push(wall);
        status.time(|| rt.block_on(kept.status()));
        if bwrap {
            bw.time(|| run_ok("bwrap", &["--unshare-all", "--ro-bind", "/", "/", "/bin/true"]));
        }
        if systemd {
            sd.time(|| run_ok("systemd-run", &["--scope", "--quiet", "/bin/true"]));
        }
        if nsjail {
            nj.time(|| run_ok("nsjail", &["-Mo", "--quiet", "-R", "/", "--", "/bin/true"]));
        }
    }
    drop(kept);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(broker.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let (bare50, bare99) = (bare.p(500), bare.p(990));
    println!("{iters} calls per row, interleaved; wall time per call, client side\n");
    println!("| what | p50 ms | p99 ms | p50 − bare ms | p50 / bare | p99 / bare |");
    println!("|---|---|---|---|---|---|");
    let mut rows = vec![bare, c_fresh, c_kept, c_bare_client, in_worker, status];
    for (s, on) in [(bw, bwrap), (sd, systemd), (nj, nsjail)] {
        if on {
            rows.push(s);
        }
    }
    for s in &mut rows {
        let (p50, p99) = (s.p(500), s.p(990));
        println!(
            "| {} | {:.3} | {:.3} | {:+.3} | {:.2}x | {:.2}x |",
            s.name,
            ms(p50),
            ms(p99),
            ms(p50) - ms(bare50),
            p50.as_secs_f64() / bare50.as_secs_f64(),
            p99.as_secs_f64() / bare99.as_secs_f64()
        );
    }
    for (what, on, hint) in [
        ("bwrap", bwrap, "apt-get install bubblewrap"),
        ("systemd-run --scope", systemd, "run under systemd, or set CORRAL_TEST_SYSTEMD_PID"),
        ("nsjail", nsjail, "not packaged in Debian 12: build it from github.com/google/nsjail"),
    ] {
        if !on {
            println!("\n{what}: not measured ({hint})");
        }
    }
}
