//! What the egress proxy costs: the same HTTP requests from inside the
//! sandbox, through the proxy of a `[network]` workflow (its own network
//! namespace, the broker's proxy) and directly (`tcp_connect` to the
//! server's port, no namespace), interleaved round by round.
//!
//! Measured by a python script inside the call, so the broker's own call
//! overhead is not in the figures: the latency of a fresh connection plus
//! one small `GET` (direct: to the server; proxied: an absolute-form `GET`
//! to the proxy, which resolves, checks, connects and forwards), the
//! latency of a `CONNECT` tunnel setup, and the throughput of a 64 MiB
//! download (forwarded and tunnelled).
//!
//! Everything stays on loopback: the server listens on 127.0.0.1, the
//! proxied workflow names it `bench.test` (a hosts file given to the
//! broker) with `private = true`.
//!
//! `cargo bench --bench egress` as root (rlimit mode). `CORRAL_BENCH_ROUNDS`
//! sets the rounds (default 5), each of 200 small requests and one download
//! per path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_corral");
const BIG: usize = 64 << 20;

fn policy(name: &str, extra: &str) -> String {
    format!(
        r#"[workflow]
name = "{name}"
tenant = "bench"

[sandbox]
landlock = "required"
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/proc", "/dev/urandom"]
write = ["{{workspace}}"]
{extra}

[limits]
call_timeout = "120s"

[pool]
min_idle = 1
max_workers = 1
"#
    )
}

/// An HTTP/1.1 server on loopback: `/big` is 64 MiB, anything else 2 bytes.
fn serve(l: TcpListener) {
    let big = vec![b'x'; BIG];
    let big = std::sync::Arc::new(big);
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let big = big.clone();
        std::thread::spawn(move || {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let is_big = String::from_utf8_lossy(&head).split_whitespace().nth(1).is_some_and(|p| p.ends_with("/big"));
            let body: &[u8] = if is_big { &big } else { b"ok" };
            let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = c.write_all(body);
        });
    }
}

/// Run inside the sandbox: argv = mode, host, port, target-host.
/// Prints "small_us_p50 connect_us_p50 forward_mbps tunnel_mbps" (tunnel
/// figures 0 in direct mode).
const SCRIPT: &str = r#"
import socket, sys, time
mode, host, port, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def get(path, tunnel=False):
    s = socket.create_connection((host, port))
    if tunnel:
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        req = "GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
    elif mode == "proxied":
        req = "GET http://%s%s HTTP/1.1\r\nHost: x\r\n\r\n" % (target, path)
    else:
        req = "GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
    s.sendall(req.encode())
    n = 0
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        n += len(b)
    s.close()
    return n
def p50(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
small = []
for _ in range(200):
    t = time.perf_counter(); get("/small"); small.append((time.perf_counter() - t) * 1e6)
conn = []
if mode == "proxied":
    for _ in range(200):
        t = time.perf_counter()
        s = socket.create_connection((host, port))
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        conn.append((time.perf_counter() - t) * 1e6)
        s.close()
t = time.perf_counter(); n = get("/big"); fwd = n / (time.perf_counter() - t) / 1e6
tun = 0.0
if mode == "proxied":
    t = time.perf_counter(); n = get("/big", tunnel=True); tun = n / (time.perf_counter() - t) / 1e6
print("%.1f %.1f %.1f %.1f" % (p50(small), p50(conn) if conn else 0.0, fwd, tun))
"#;

fn exec(rt: &tokio::runtime::Runtime, socket: &Path, workflow: &str, argv: &[&str]) -> serde_json::Value {
    let body = serde_json::json!({ "workflow": workflow, "argv": argv }).to_string().into_bytes();
    let (status, bytes) =
        rt.block_on(corral::client::request(socket, hyper::Method::POST, "/v1/exec", Some(body))).expect("broker call");
    let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert!(status.is_success() && reply["exit_code"] == 0, "{reply:#}");
    reply
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("CORRAL_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || serve(listener));

    let dir = PathBuf::from(format!("/run/corral-bench-egress-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("hosts"), "127.0.0.1 bench.test\n").unwrap();
    let proxied = format!(
        "\n[network]\nallow = [\"bench.test:{port}\"]\nprivate = true\nconnections_max = 1000\nbytes_max = \"1G\"\n"
    );
    std::fs::write(dir.join("policies/proxied.toml"), policy("proxied", &proxied)).unwrap();
    std::fs::write(dir.join("policies/direct.toml"), policy("direct", &format!("tcp_connect = [{port}]"))).unwrap();
    let socket = dir.join("s.sock");
    let mut broker = Command::new(BIN)
        .args(["broker", "--instance", "bench-egress", "--systemd", "off"])
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("CORRAL_EGRESS_HOSTS", dir.join("hosts"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "broker did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let port_s = port.to_string();
    let target = format!("bench.test:{port}");
    let run = |mode: &str| -> Vec<f64> {
        let (wf, host, p) = match mode {
            "proxied" => ("proxied", "127.0.0.1", "3128"),
            _ => ("direct", "127.0.0.1", port_s.as_str()),
        };
        let r = exec(&rt, &socket, wf, &["python3", "-c", SCRIPT, mode, host, p, &target]);
        r["stdout"].as_str().unwrap().split_whitespace().map(|x| x.parse().unwrap()).collect()
    };
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct.push(run("direct"));
        proxied.push(run("proxied"));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(broker.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let col = |rows: &[Vec<f64>], i: usize| median(rows.iter().map(|r| r[i]).collect());
    let (d_small, p_small, p_conn) = (col(&direct, 0), col(&proxied, 0), col(&proxied, 1));
    let (d_mbps, p_fwd, p_tun) = (col(&direct, 2), col(&proxied, 2), col(&proxied, 3));
    println!("{rounds} rounds, interleaved; medians of the rounds' p50s; 200 requests and one 64 MiB download per path and round\n");
    println!("| what | direct | proxied | proxied / direct |");
    println!("|---|---|---|---|");
    println!(
        "| new connection + small GET, p50 µs | {d_small:.0} | {p_small:.0} (forwarded) | {:.2}x |",
        p_small / d_small
    );
    println!(
        "| CONNECT tunnel set up, p50 µs | {d_small:.0} (connect + GET) | {p_conn:.0} | {:.2}x |",
        p_conn / d_small
    );
    println!("| 64 MiB download, MB/s | {d_mbps:.0} | {p_fwd:.0} (forwarded) | {:.2}x |", p_fwd / d_mbps);
    println!("| 64 MiB download, MB/s | {d_mbps:.0} | {p_tun:.0} (tunnel) | {:.2}x |", p_tun / d_mbps);
}
