//! `[network]`: tools reach the allowed names through the broker's egress
//! proxy, and nothing else.
//!
//! The "internet" is a network namespace this test makes (the world): its
//! loopback interface carries a public-looking address (198.51.100.10, a
//! documentation range), a private one (10.20.30.40), the cloud metadata
//! address (169.254.169.254), an IPv6 ULA, and its own 127.0.0.1, each with
//! a small HTTP server that counts its visitors. The broker runs inside the
//! world too (in both modes), so every packet of these tests, refused or
//! not, stays in namespaces the test made: a broken sandbox can at worst
//! reach the world's servers, and their counters say so.
//!
//! Names come from a hosts file given to the broker (`CORRAL_EGRESS_HOSTS`),
//! rewritten by the rebinding test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PUBLIC: &str = "198.51.100.10";
const PRIVATE: &str = "10.20.30.40";
const METADATA: &str = "169.254.169.254";
const ULA: &str = "fd00:c0de::10";

const HOSTS: &str = "\
198.51.100.10 pypi.test files.pythonhosted.test notlisted.test
10.20.30.40 private.test
127.0.0.1 loop.test
169.254.169.254 meta.test
198.51.100.10 rebind.test
10.20.30.40 rebind.test
fd00:c0de::10 ula.test
198.51.100.10 moving.test
";

/// The world's servers: visitors per listening address.
struct World {
    holder: Child,
    /// The process holding the namespace (the holder's child in systemd
    /// mode, where nsenter forks).
    sleeper: u32,
    netns: Netns,
    hits: Vec<(SocketAddr, Arc<AtomicU32>)>,
}

impl World {
    fn hits(&self, addr: &str) -> u32 {
        let addr: SocketAddr = addr.parse().unwrap();
        self.hits.iter().find(|(a, _)| *a == addr).map(|(_, n)| n.load(Ordering::SeqCst)).unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.sleeper as i32), nix::sys::signal::SIGKILL);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The process whose network namespace is the world: `sleep` under
/// `unshare --net`, started inside the namespaced systemd's PID and mount
/// namespaces in systemd mode so that its unit can name it.
fn hold_world() -> (Child, u32, Netns) {
    let (mut cmd, sd) = match under_systemd() {
        Some(sd) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &sd.to_string(), "-m", "-p", "--", "unshare", "--net", "--", "sleep", "3600"]);
            (c, Some(sd))
        }
        None => {
            let mut c = Command::new("unshare");
            c.args(["--net", "--", "sleep", "3600"]);
            (c, None)
        }
    };
    // No inherited output: the sleeper must not keep a test's pipe open.
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // nsenter -p forks: the sleeper is its child.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sleeper = loop {
        let pid = match sd {
            None => Some(child.id()),
            Some(_) => std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                .ok()
                .and_then(|s| s.split_whitespace().next().map(|p| p.parse().unwrap())),
        };
        if let Some(pid) = pid {
            let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
            let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if net != ours && comm.trim() == "sleep" {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "the world's namespace did not appear");
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap();
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap().split_whitespace().last().unwrap();
    let netns = Netns {
        host_path: PathBuf::from(format!("/proc/{sleeper}/ns/net")),
        unit_path: PathBuf::from(format!("/proc/{nspid}/ns/net")),
    };
    (child, sleeper, netns)
}

fn make_world() -> World {
    let (holder, sleeper, netns) = hold_world();
    let ns = netns.host_path.display().to_string();
    let script = format!(
        "set -e; ip link set lo up; ip addr add {PUBLIC}/32 dev lo; ip addr add {PRIVATE}/32 dev lo; \
         ip addr add {METADATA}/32 dev lo; ip -6 addr add {ULA}/128 dev lo"
    );
    let out = Command::new("nsenter").arg(format!("--net={ns}")).args(["--", "sh", "-c", &script]).output().unwrap();
    assert!(out.status.success(), "setting up the world failed: {out:?}");
    let addrs: Vec<SocketAddr> = [
        format!("{PUBLIC}:80"),
        format!("{PUBLIC}:8080"),
        format!("{PRIVATE}:80"),
        format!("{METADATA}:80"),
        "127.0.0.1:80".into(),
        format!("[{ULA}]:80"),
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    // Bind inside the world from a thread of our own: setns moves only it.
    let ns_file = std::fs::File::open(&netns.host_path).unwrap();
    let listeners = std::thread::spawn(move || {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // A new IPv6 address is tentative until the kernel's address work
        // has run (even on lo, where there is no DAD to do): binding it
        // in that moment fails with EADDRNOTAVAIL, so try again briefly.
        let bind = |a: &SocketAddr| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match TcpListener::bind(a) {
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    r => break r.unwrap_or_else(|e| panic!("binding {a} in the world: {e}")),
                }
            }
        };
        addrs.iter().map(|a| (*a, bind(a))).collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let mut hits = Vec::new();
    for (addr, l) in listeners {
        let n = Arc::new(AtomicU32::new(0));
        hits.push((addr, n.clone()));
        std::thread::spawn(move || serve(l, addr, n));
    }
    World { holder, sleeper, netns, hits }
}

/// A tiny HTTP/1.1 server: `GET /big` answers 4 MiB, anything else
/// `hello from ADDR PATH`; every connection counts as a visit.
fn serve(l: TcpListener, addr: SocketAddr, hits: Arc<AtomicU32>) {
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        hits.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head);
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body =
                if path == "/big" { vec![b'x'; 4 << 20] } else { format!("hello from {addr} {path}").into_bytes() };
            let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = c.write_all(&body);
        });
    }
}

struct Shared {
    world: World,
    b: Broker,
    hosts: PathBuf,
    /// The model of the `agent` workflow, inside the world.
    stub: Stub,
}

static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);
/// One test at a time: they count the world's visitors.
static SERIAL: Mutex<()> = Mutex::new(());

extern "C" fn stop_shared() {
    let taken = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(taken);
}

/// A workflow of tenant `web` (one tenant, one user).
fn web_policy(name: &str, network: &str) -> PolicyFile {
    let mut p = policy(name, "web", Some("corral-test"), "", "", "min_idle = 1\nmax_workers = 2");
    p.text.push_str(network);
    p
}

/// One world and one broker for every test of this binary (see
/// toolchain.rs for why it is stopped at exit), and the turn of the test.
fn shared() -> Option<(Arc<Shared>, std::sync::MutexGuard<'static, ()>)> {
    if !require(&["root", "landlock", "seccomp", "users", "python3", "curl", "iproute2"]) {
        return None;
    }
    let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((started()?, turn))
}

fn started() -> Option<Arc<Shared>> {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        return Some(Arc::clone(s));
    }
    let world = make_world();
    let dir = scratch_dir("egress");
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, HOSTS).unwrap();
    let web = web_policy(
        "web",
        r#"
[network]
allow = ["pypi.test", "*.pythonhosted.test", "private.test", "loop.test", "meta.test", "rebind.test", "ula.test", "moving.test"]
connections_max = 6
bytes_max = "1M"
"#,
    );
    let inside = web_policy("inside", "\n[network]\nallow = [\"private.test\", \"loop.test:80\"]\nprivate = true\n");
    // The same tenant, no [network]: today's behaviour, no network at all.
    let offline = web_policy("offline", "");
    // An agent whose model (a stub inside the world, on its loopback) asks
    // for one tool call that reaches an allowed name and a refused one.
    let ns_file = std::fs::File::open(&world.netns.host_path).unwrap();
    let stub = std::thread::spawn(move || {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        Stub::start(vec![
            tool_call(
                "e1",
                "shell",
                &serde_json::json!({"command": "curl -sS http://pypi.test/agent; curl -sS http://notlisted.test/"}),
            ),
            answer("fetched", 1, 1),
        ])
    })
    .join()
    .unwrap();
    let mut agent = llm_policy("agent", "web", &stub.base_url(), "");
    agent.text.push_str("\n[network]\nallow = [\"pypi.test\"]\n");
    let opts = BrokerOptions {
        env: vec![("CORRAL_EGRESS_HOSTS".into(), hosts.display().to_string())],
        netns: Some(world.netns.clone()),
        ..BrokerOptions::default()
    };
    let b = Broker::start_in("egress", dir, &[web, inside, offline, agent], opts);
    // Before any call: the broker must be inside the world, or its proxy's
    // connections would leave this machine.
    let world_ns = std::fs::read_link(&world.netns.host_path).unwrap();
    let broker_ns = std::fs::read_link(format!("/proc/{}/ns/net", b.pid())).unwrap();
    assert_eq!(broker_ns, world_ns, "the broker is not in the test's network namespace; sending nothing");
    let s = Arc::new(Shared { world, b, hosts, stub });
    // SAFETY: registers a plain function with the C library; it runs once,
    // at process exit, after every test has returned.
    assert_eq!(unsafe { libc::atexit(stop_shared) }, 0);
    *slot = Some(Arc::clone(&s));
    Some(s)
}

fn egress(r: &Value) -> &Value {
    &r["egress"]
}

fn reached<'a>(r: &'a Value, host: &str) -> Option<&'a Value> {
    egress(r)["reached"].as_array()?.iter().find(|d| d["host"] == host)
}

fn refused<'a>(r: &'a Value, host: &str) -> Option<&'a Value> {
    egress(r)["refused"].as_array()?.iter().find(|d| d["host"] == host)
}

const PY_GET: &str =
    "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())";

#[test]
fn allowed_names_work_with_curl_and_python() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let before = s.world.hits(&format!("{PUBLIC}:80"));
    // Plain http, forwarded.
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "http://pypi.test/simple/"]);
    assert_eq!(stdout(&r), format!("hello from {PUBLIC}:80 /simple/"), "{r:#}");
    let d = reached(&r, "pypi.test").unwrap_or_else(|| panic!("no receipt: {r:#}"));
    assert_eq!((d["port"].as_u64(), d["connections"].as_u64()), (Some(80), Some(1)), "{r:#}");
    assert!(d["sent"].as_u64().unwrap() > 0 && d["received"].as_u64().unwrap() > 20, "{r:#}");
    // A tunnel (CONNECT), the way https goes, to a name under a wildcard.
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "--proxytunnel", "http://files.pythonhosted.test/pkg"]);
    assert_eq!(stdout(&r), format!("hello from {PUBLIC}:80 /pkg"), "{r:#}");
    assert!(reached(&r, "files.pythonhosted.test").is_some(), "{r:#}");
    // python's urllib, from the environment alone.
    let r = b.exec("web", &["python3", "-c", PY_GET, "http://pypi.test/py"]);
    assert_eq!(stdout(&r).trim(), format!("hello from {PUBLIC}:80 /py"), "{r:#}");
    assert_eq!(s.world.hits(&format!("{PUBLIC}:80")), before + 3);
    // The ledger has a row per destination (written in batches: wait).
    let ledger = rusqlite::Connection::open_with_flags(
        b.state.join("ledger.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let id = r["request_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let row: (String, i64, i64, i64) = loop {
        let found =
            ledger.query_row("SELECT host, port, allowed, received FROM egress WHERE request_id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            });
        match found {
            Ok(row) => break row,
            Err(e) if Instant::now() > deadline => panic!("no egress row for {id}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!((row.0.as_str(), row.1, row.2), ("pypi.test", 80, 1));
    assert!(row.3 > 20, "{row:?}");
}

#[test]
fn denied_names_ports_and_addresses_get_a_403_naming_the_rule() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let quiet = [
        format!("{PUBLIC}:8080"),
        format!("{PRIVATE}:80"),
        format!("{METADATA}:80"),
        "127.0.0.1:80".into(),
        format!("[{ULA}]:80"),
    ];
    let before: Vec<u32> = quiet.iter().map(|a| s.world.hits(a)).collect();
    let public_before = s.world.hits(&format!("{PUBLIC}:80"));
    for (url, host, words) in [
        ("http://notlisted.test/", "notlisted.test", "notlisted.test is not in [network] allow of workflow web"),
        ("http://pypi.test:8080/", "pypi.test", "port 8080 of pypi.test is not allowed"),
        ("http://198.51.100.10/", PUBLIC, "198.51.100.10 is not in [network] allow"),
        ("http://private.test/", "private.test", "10.20.30.40, a private address"),
        ("http://loop.test/", "loop.test", "127.0.0.1, a loopback address"),
        ("http://meta.test/", "meta.test", "169.254.169.254, a cloud metadata address"),
        ("http://rebind.test/", "rebind.test", "10.20.30.40, a private address"),
        ("http://ula.test/", "ula.test", "fd00:c0de::10, a private address"),
    ] {
        let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "-w", "%{http_code}", url]);
        let out = stdout(&r);
        assert!(out.ends_with("403") && out.contains(words), "{url}: {r:#}");
        let d = refused(&r, host).unwrap_or_else(|| panic!("{url}: no refusal in the receipt: {r:#}"));
        assert!(d["reason"].as_str().unwrap().contains(words), "{r:#}");
        assert!(egress(&r)["reached"].as_array().unwrap().is_empty(), "{r:#}");
        // The same through a tunnel.
        let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "--proxytunnel", url]);
        assert_ne!(exit_code(&r), Some(0), "{url} through CONNECT: {r:#}");
        assert!(refused(&r, host).is_some(), "{r:#}");
    }
    let after: Vec<u32> = quiet.iter().map(|a| s.world.hits(a)).collect();
    assert_eq!(before, after, "a refused destination got a connection");
    assert_eq!(s.world.hits(&format!("{PUBLIC}:80")), public_before, "a refused request reached the public server");
    // The neighbour in the same workflow: an allowed name still works.
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "http://pypi.test/after"]);
    assert_eq!(stdout(&r), format!("hello from {PUBLIC}:80 /after"), "{r:#}");
}

/// Everything a tool could try instead of the proxy, in one script: each
/// line prints what happened.
const AROUND: &str = r#"
import socket, sys
def tcp(host, port, family=socket.AF_INET):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect((host, port))
        return "connected"
    except OSError as e:
        return "refused %s" % e.errno
print("direct-ip", tcp("198.51.100.10", 80))
print("direct-private", tcp("10.20.30.40", 80))
print("proxy-port-elsewhere", tcp("127.0.0.2", 3128))
print("proxy-port-v6", tcp("::1", 3128, socket.AF_INET6))
print("world-loopback", tcp("127.0.0.1", 80))
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"x", ("198.51.100.10", 53))
    print("udp sent")
except OSError as e:
    print("udp refused", e.errno)
try:
    socket.getaddrinfo("pypi.test", 80)
    print("dns resolved")
except OSError as e:
    print("dns failed")
print("proxy", tcp("127.0.0.1", 3128))
"#;

#[test]
fn no_way_around_the_proxy() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let public = format!("{PUBLIC}:80");
    let private = format!("{PRIVATE}:80");
    let before = (s.world.hits(&public), s.world.hits(&private), s.world.hits("127.0.0.1:80"));
    let r = b.exec("web", &["python3", "-c", AROUND]);
    let out = stdout(&r);
    for line in ["direct-ip", "direct-private", "proxy-port-elsewhere", "proxy-port-v6", "world-loopback"] {
        let got = out.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("{line}: {r:#}"));
        assert!(got.contains("refused"), "{got}\n{r:#}");
    }
    assert!(out.contains("udp refused"), "{r:#}");
    assert!(out.contains("dns failed"), "{r:#}");
    // The legitimate way out is open in the same call.
    assert!(out.contains("proxy connected"), "{r:#}");
    // Without the proxy variables, curl has nowhere to go.
    let r =
        b.sh("web", "unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY; curl -sS --max-time 5 http://198.51.100.10/");
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert_eq!(
        (s.world.hits(&public), s.world.hits(&private), s.world.hits("127.0.0.1:80")),
        before,
        "a tool reached the world without the proxy"
    );
    // What the worker reported about its namespace.
    let st = b.status();
    let web = st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == "web").unwrap();
    let eff = web["workers"].as_array().unwrap().iter().find_map(|w| w["sandbox"]["egress"].as_str());
    assert!(eff.is_some_and(|e| e.contains("loopback only")), "{web:#}");
}

#[test]
fn rebinding_between_calls_is_caught() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "http://moving.test/one"]);
    assert_eq!(stdout(&r), format!("hello from {PUBLIC}:80 /one"), "{r:#}");
    let private_before = s.world.hits(&format!("{PRIVATE}:80"));
    std::fs::write(&s.hosts, HOSTS.replace("198.51.100.10 moving.test", "10.20.30.40 moving.test")).unwrap();
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "http://moving.test/two"]);
    std::fs::write(&s.hosts, HOSTS).unwrap();
    assert!(stdout(&r).contains("10.20.30.40, a private address"), "{r:#}");
    assert_eq!(s.world.hits(&format!("{PRIVATE}:80")), private_before, "the rebound name was reached");
}

#[test]
fn per_call_caps_hold_and_reset() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    // bytes_max = 1M; /big is 4 MiB.
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "http://pypi.test/big"]);
    assert_ne!(exit_code(&r), Some(0), "{r:#}");
    assert!(egress(&r)["capped"].as_str().is_some_and(|c| c.contains("bytes_max")), "{r:#}");
    let d = reached(&r, "pypi.test").unwrap();
    let moved = d["received"].as_u64().unwrap() + d["sent"].as_u64().unwrap();
    assert!(moved > 512 << 10 && moved <= 1 << 20, "{moved} bytes moved under a 1M cap: {r:#}");
    // connections_max = 6: the seventh connection of a call is refused.
    let r = b.sh(
        "web",
        "for i in 1 2 3 4 5 6 7; do curl -s --max-time 10 -o /dev/null -w '%{http_code} ' http://pypi.test/$i; done",
    );
    assert_eq!(stdout(&r), "200 200 200 200 200 200 403 ", "{r:#}");
    assert!(egress(&r)["capped"].as_str().is_some_and(|c| c.contains("connections_max = 6")), "{r:#}");
    // The next call starts from zero.
    let r = b.exec("web", &["curl", "-sS", "--max-time", "10", "http://pypi.test/fresh"]);
    assert_eq!(stdout(&r), format!("hello from {PUBLIC}:80 /fresh"), "{r:#}");
}

#[test]
fn a_neighbour_without_network_still_has_none() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let before = s.world.hits(&format!("{PUBLIC}:80"));
    let r = b.exec("offline", &["python3", "-c", AROUND]);
    let out = stdout(&r);
    for line in ["direct-ip", "proxy-port-elsewhere", "world-loopback", "proxy"] {
        let got = out.lines().find(|l| l.starts_with(&format!("{line} "))).unwrap_or_else(|| panic!("{line}: {r:#}"));
        assert!(got.contains("refused"), "{got}\n{r:#}");
    }
    let r = b.sh(
        "offline",
        "env | grep -ci proxy; curl -sS --max-time 5 -x http://127.0.0.1:3128 http://pypi.test/ || echo failed",
    );
    assert!(stdout(&r).starts_with("0\n") && stdout(&r).ends_with("failed\n"), "{r:#}");
    assert!(r["egress"].is_null(), "{r:#}");
    assert_eq!(s.world.hits(&format!("{PUBLIC}:80")), before);
    // It still works otherwise.
    let r = b.sh("offline", "echo fine");
    assert_eq!(stdout(&r), "fine\n");
}

#[test]
fn private_true_reaches_private_names_only_when_listed() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let before = s.world.hits(&format!("{PRIVATE}:80"));
    let r = b.exec("inside", &["curl", "-sS", "--max-time", "10", "http://private.test/in"]);
    assert_eq!(stdout(&r), format!("hello from {PRIVATE}:80 /in"), "{r:#}");
    assert_eq!(s.world.hits(&format!("{PRIVATE}:80")), before + 1);
    let r = b.exec("inside", &["curl", "-sS", "--max-time", "10", "http://pypi.test/"]);
    assert!(stdout(&r).contains("not in [network] allow of workflow inside"), "{r:#}");
}

#[test]
fn an_asks_tool_calls_go_through_the_proxy_and_into_its_receipt() {
    let Some((s, _turn)) = shared() else { return };
    let b = &s.b;
    let before = s.world.hits(&format!("{PUBLIC}:80"));
    let (code, r) = b.ask("agent", "fetch it");
    assert_eq!(code, 200, "{r:#}");
    assert_eq!(r["answer"], "fetched", "{r:#}");
    let d = reached(&r, "pypi.test").unwrap_or_else(|| panic!("no receipt: {r:#}"));
    assert!(d["received"].as_u64().unwrap() > 20, "{r:#}");
    let d = refused(&r, "notlisted.test").unwrap_or_else(|| panic!("no refusal: {r:#}"));
    assert!(d["reason"].as_str().unwrap().contains("not in [network] allow of workflow agent"), "{r:#}");
    assert_eq!(s.world.hits(&format!("{PUBLIC}:80")), before + 1);
    // The tool's output went back to the model.
    let fed = s.stub.received().iter().any(|q| q.body.to_string().contains(&format!("hello from {PUBLIC}:80 /agent")));
    assert!(fed, "the tool's output did not reach the model");
    // And the ledger has both rows, as an ask's.
    let id = r["request_id"].as_str().unwrap();
    let rows: Vec<(String, bool, String)> = b
        .ledger()
        .prepare("SELECT host, allowed, kind FROM egress WHERE request_id = ?1 ORDER BY id")
        .unwrap()
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec![("pypi.test".into(), true, "ask".into()), ("notlisted.test".into(), false, "ask".into())]);
}
