//! A worker's own network namespace, for workflows with `[network]`.
//!
//! The broker starts such a worker in a new network namespace: it has a
//! loopback interface and nothing else, so no packet of a tool can leave
//! it, whatever the address, port or protocol. The broker holds one
//! listening socket inside ([`spawn_in_new_netns`]): its egress proxy, the
//! only way out. The worker checks that it got such a namespace
//! ([`only_loopback`]) before it confines itself.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

/// The proxy's port inside every worker's namespace (the address is
/// 127.0.0.1; the namespace is the worker's alone, so the port is free).
pub const PROXY_PORT: u16 = 3128;

/// Runs `spawn` (which starts a worker) inside a new network namespace whose
/// loopback interface is up and where a listener on `127.0.0.1:port` waits:
/// the worker is born in the namespace, after the listener. The returned
/// listener (non-blocking) belongs to the caller (the broker); its own
/// threads stay where they were.
///
/// A short-lived thread makes the namespace (`unshare` changes only the
/// calling thread) and the listener. The clone itself happens on the
/// calling thread, which enters the namespace for that one call and goes
/// back: the worker's parent must be a thread that lives as long as the
/// broker, since the worker's parent-death signal fires when the thread
/// that cloned it ends.
pub fn spawn_in_new_netns<T>(port: u16, spawn: impl FnOnce() -> io::Result<T>) -> io::Result<(T, TcpListener)> {
    let step = |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let (ns, listener) = std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("netns-make".into()).spawn_scoped(scope, || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .map_err(step("unshare a network namespace"))?;
            loopback_up().map_err(step("bring up its loopback interface"))?;
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(step("listen on 127.0.0.1"))?;
            listener.set_nonblocking(true)?;
            let ns = std::fs::File::open("/proc/thread-self/ns/net").map_err(step("open the new namespace"))?;
            Ok::<_, io::Error>((ns, listener))
        })?;
        thread.join().map_err(|_| io::Error::other("the thread that made the network namespace panicked"))?
    })?;
    let home = std::fs::File::open("/proc/thread-self/ns/net").map_err(step("open the broker's namespace"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)
        .map_err(step("enter the new namespace"))?;
    let spawned = spawn();
    if let Err(e) = nix::sched::setns(&home, nix::sched::CloneFlags::CLONE_NEWNET) {
        // A broker thread left in a worker's namespace would open its later
        // sockets (model calls, proxied connections) there: stop at once.
        eprintln!("corral: failed to return to the broker's network namespace after starting a worker: {e}");
        std::process::abort();
    }
    Ok((spawned?, listener))
}

/// Sets `IFF_UP` on `lo` of the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`, a
    // live local of the type the request expects, on a socket we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // IFF_UP is 1: it fits the short the kernel keeps flags in.
    let up = libc::c_short::try_from(libc::IFF_UP).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the kernel just filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= up };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The network interfaces of the calling process's namespace, from
/// `/proc/self/net/dev`.
pub fn interfaces() -> io::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/net/dev")?;
    Ok(text.lines().skip(2).filter_map(|l| l.split(':').next()).map(|n| n.trim().to_string()).collect())
}

/// Whether the calling process's network namespace holds a loopback
/// interface only.
pub fn only_loopback() -> io::Result<bool> {
    Ok(interfaces()? == ["lo"])
}
