//! Who owns a TCP socket on this host, read from `/proc/net/tcp` and
//! `/proc/net/tcp6` (the reader's network namespace). The broker uses it to
//! refuse a model endpoint on loopback that a user other than the expected
//! one has bound. No syscalls: the kernel's tables are text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// TCP states as `/proc/net/tcp` writes them.
const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0A;

/// One row of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub uid: u32,
}

/// Parses an address as the kernel prints it: `0100007F:2CAA` (IPv4, the
/// 32-bit word in host byte order) or 32 hex digits (IPv6, four such words).
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the (network-order) address
    // as a native integer: its native bytes are the address bytes.
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The rows of one table's text.
pub fn parse_table(text: &str) -> Vec<TcpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(TcpSocket {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                uid: f.get(7)?.parse().ok()?,
            })
        })
        .collect()
}

/// Every TCP socket of this network namespace, v4 and v6, from `proc`
/// (normally `/proc`).
pub fn read_all(proc: &Path) -> std::io::Result<Vec<TcpSocket>> {
    let mut out = parse_table(&std::fs::read_to_string(proc.join("net/tcp"))?);
    // No IPv6 in the kernel: no table, nothing to add.
    if let Ok(text) = std::fs::read_to_string(proc.join("net/tcp6")) {
        out.extend(parse_table(&text));
    }
    Ok(out)
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The listening sockets a connection to `target` could reach: bound to
/// that address or to a wildcard of either family, on its port.
pub fn listeners(all: &[TcpSocket], target: SocketAddr) -> Vec<TcpSocket> {
    let ip = unmapped(target.ip());
    all.iter()
        .filter(|s| s.state == LISTEN && s.local.port() == target.port())
        .filter(|s| {
            let local = unmapped(s.local.ip());
            local == ip || local.is_unspecified()
        })
        .cloned()
        .collect()
}

/// The server's end of the connection from `ours` to `theirs`: the socket
/// whose local address is `theirs` and remote is `ours`.
pub fn server_side(all: &[TcpSocket], ours: SocketAddr, theirs: SocketAddr) -> Option<TcpSocket> {
    let same = |a: SocketAddr, b: SocketAddr| unmapped(a.ip()) == unmapped(b.ip()) && a.port() == b.port();
    all.iter().find(|s| s.state == ESTABLISHED && same(s.local, theirs) && same(s.remote, ours)).cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:2CAA 0100007F:D431 01 00000000:00000000 00:00000000 00000000   999        0 3 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:2CAB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1003        0 4 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:2CAA 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1003        0 5 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn rows_are_read_with_addresses_ports_states_and_owners() {
        let v4 = parse_table(TCP);
        assert_eq!(v4.len(), 3);
        assert_eq!(v4[0].local, "127.0.0.1:11434".parse().unwrap());
        assert_eq!((v4[0].state, v4[0].uid), (LISTEN, 999));
        assert_eq!(v4[1].local, "0.0.0.0:22".parse().unwrap());
        assert_eq!(v4[2].remote, "127.0.0.1:54321".parse().unwrap());
        let v6 = parse_table(TCP6);
        assert_eq!(v6[0].local, "[::1]:11435".parse().unwrap());
        assert_eq!(v6[1].local, "[::]:11434".parse().unwrap());
    }

    #[test]
    fn every_listener_a_connection_could_reach_is_found() {
        let mut all = parse_table(TCP);
        all.extend(parse_table(TCP6));
        let owners = |t: &str| {
            let mut v: Vec<u32> = listeners(&all, t.parse().unwrap()).iter().map(|s| s.uid).collect();
            v.sort_unstable();
            v
        };
        // 127.0.0.1:11434: the exact one (999) and the v6 wildcard (1003).
        assert_eq!(owners("127.0.0.1:11434"), [999, 1003]);
        assert_eq!(owners("[::1]:11435"), [1003]);
        assert_eq!(owners("127.0.0.1:22"), [0]);
        assert!(owners("127.0.0.1:9").is_empty());
        let ours: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        let theirs: SocketAddr = "127.0.0.1:11434".parse().unwrap();
        assert_eq!(server_side(&all, ours, theirs).unwrap().uid, 999);
        assert!(server_side(&all, theirs, ours).is_none());
    }

    #[test]
    fn this_hosts_tables_parse() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let all = read_all(Path::new("/proc")).unwrap();
        let found = listeners(&all, addr);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].uid, nix::unistd::Uid::effective().as_raw());
    }
}
