//! Per-call overhead of a sandboxed call through corral, against baselines
//! measured in the same run: bare fork+exec+wait of `/bin/true`, and
//! `bwrap --unshare-all --ro-bind / / /bin/true`.
//!
//! `cargo bench --bench overhead` (root for the worker's user switch; bwrap
//! optional). `CORRAL_BENCH_ITERS` sets the iterations (default 400). The
//! three are interleaved call by call, so a noisy neighbour hits all alike.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The `per_mille`/1000 quantile of sorted samples (nearest rank).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    // Nearest rank: the smallest sample with at least p of them at or below.
    let n = sorted.len();
    let rank = (1..=n).find(|&k| k * 1000 >= per_mille * n).unwrap_or(n);
    sorted[rank - 1]
}

struct Series {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Series {
    fn p(&mut self, per_mille: usize) -> Duration {
        self.samples.sort();
        percentile(&self.samples, per_mille)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let iters: usize = std::env::var("CORRAL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("corral-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/bench.toml"), POLICY).unwrap();
    let socket = dir.join("s.sock");
    let mut broker = Command::new(BIN)
        .args(["broker", "--policies"])
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
    let body = br#"{"workflow":"bench","argv":["/bin/true"]}"#.to_vec();
    let call = |rt: &tokio::runtime::Runtime| {
        let (status, bytes) = rt
            .block_on(corral::client::request(&socket, hyper::Method::POST, "/v1/exec", Some(body.clone())))
            .expect("broker call");
        assert!(status.is_success(), "{}", String::from_utf8_lossy(&bytes));
        assert!(bytes.windows(14).any(|w| w == b"\"exit_code\":0,"), "{}", String::from_utf8_lossy(&bytes));
    };
    // Wait for the broker and a warm worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            let (s, _) = rt
                .block_on(corral::client::request(&socket, hyper::Method::POST, "/v1/exec", Some(body.clone())))
                .unwrap_or((hyper::StatusCode::SERVICE_UNAVAILABLE, Default::default()));
            if s.is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "broker did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bwrap = Command::new("bwrap").arg("--version").output().is_ok_and(|o| o.status.success());

    let mut bare = Series { name: "fork+exec+wait /bin/true", samples: Vec::new() };
    let mut corral = Series { name: "corral exec (HTTP, worker, tool child)", samples: Vec::new() };
    let mut bw = Series { name: "bwrap --unshare-all --ro-bind / / /bin/true", samples: Vec::new() };
    for _ in 0..20 {
        call(&rt); // warm-up
    }
    for _ in 0..iters {
        let t = Instant::now();
        let st = Command::new("/bin/true").status().unwrap();
        bare.samples.push(t.elapsed());
        assert!(st.success());

        let t = Instant::now();
        call(&rt);
        corral.samples.push(t.elapsed());

        if bwrap {
            let t = Instant::now();
            let st =
                Command::new("bwrap").args(["--unshare-all", "--ro-bind", "/", "/", "/bin/true"]).status().unwrap();
            bw.samples.push(t.elapsed());
            assert!(st.success());
        }
    }
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let (bare50, bare99) = (bare.p(500), bare.p(990));
    println!("{iters} calls each, interleaved; median (p50) and p99 wall time per call\n");
    println!("| what | p50 ms | p99 ms | p50 / bare |");
    println!("|---|---|---|---|");
    let mut rows = vec![bare, corral];
    if bwrap {
        rows.push(bw);
    }
    for s in &mut rows {
        let (p50, p99) = (s.p(500), s.p(990));
        println!("| {} | {:.3} | {:.3} | {:.2}x |", s.name, ms(p50), ms(p99), p50.as_secs_f64() / bare50.as_secs_f64());
    }
    let c50 = rows[1].p(500);
    let c99 = rows[1].p(990);
    println!(
        "\ncorral overhead over bare spawn: p50 {:+.3} ms, p99 {:+.3} ms",
        ms(c50) - ms(bare50),
        ms(c99) - ms(bare99)
    );
    if bwrap {
        let b50 = rows[2].p(500);
        println!("corral p50 / bwrap p50: {:.2}", c50.as_secs_f64() / b50.as_secs_f64());
    } else {
        println!("bwrap not installed: no bwrap baseline (apt-get install bubblewrap)");
    }
}
