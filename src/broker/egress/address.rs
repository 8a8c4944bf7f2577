//! Which addresses a workflow with `private = false` may not reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Cloud metadata services (instance credentials live there): AWS, GCP,
/// Azure and others at 169.254.169.254 (and AWS's fd00:ec2::254), Oracle at
/// 192.0.0.192, Alibaba at 100.100.100.200.
const METADATA_V4: [Ipv4Addr; 3] =
    [Ipv4Addr::new(169, 254, 169, 254), Ipv4Addr::new(192, 0, 0, 192), Ipv4Addr::new(100, 100, 100, 200)];
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// `Some(kind)` when `ip` is not a public unicast address: "loopback",
/// "private", "link-local", "cloud metadata", "shared (CGNAT)",
/// "unspecified", "multicast" or "reserved". IPv4 inside IPv6 (mapped,
/// NAT64, 6to4) is judged by its IPv4 address.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(if METADATA_V4.contains(&ip) {
        "cloud metadata"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        "shared (CGNAT)"
    } else if o[0] == 0 {
        "unspecified"
    } else if ip.is_multicast() {
        "multicast"
    } else if o[0] >= 240 || (o[0] == 192 && o[1] == 0 && o[2] == 0) {
        // 240/4 and the broadcast address; 192.0.0.0/24 (IETF protocol
        // assignments, with Oracle's metadata).
        "reserved"
    } else {
        return None;
    })
}

/// The IPv4 address held by two IPv6 segments.
fn embedded(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return non_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return non_public_v4(embedded(s[1], s[2]));
    }
    Some(if ip == METADATA_V6 {
        "cloud metadata"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if (s[0] & 0xfe00) == 0xfc00 {
        // fc00::/7, unique local addresses: IPv6's private networks.
        "private"
    } else if (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
        // link-local, and the deprecated site-local.
        "link-local"
    } else if ip.is_multicast() {
        "multicast"
    } else if s[0] == 0 {
        // ::/8 beyond the two above: IPv4-compatible and other reserved forms.
        "reserved"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Option<&'static str> {
        non_public(s.parse().unwrap())
    }

    #[test]
    fn private_loopback_and_metadata_are_named() {
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.5.4", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.1.1", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("192.0.0.192", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd12:3456::1", "private"),
            ("fc00::1", "private"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("fd00:ec2::254", "cloud metadata"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
            ("2002:c0a8:0101::1", "private"),
            ("::127.0.0.1", "reserved"),
        ] {
            assert_eq!(kind(ip), Some(want), "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "198.51.100.7",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "151.101.0.223",
            "2001:db8::1",
            "2a04:4e42::223",
            "::ffff:198.51.100.7",
        ] {
            assert_eq!(kind(ip), None, "{ip}");
        }
    }
}
