//! `[network]`: the names a workflow's tools may reach, through the broker's
//! egress proxy. The grammar of an `allow` entry, and the matching.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

use super::units::ByteSize;

/// Ports an entry without `:port` allows.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// Default `[network].connections_max`: connections of one call.
pub const DEFAULT_CONNECTIONS_MAX: u32 = 256;
/// Default `[network].bytes_max`: bytes of one call, both ways together.
pub const DEFAULT_BYTES_MAX: ByteSize = ByteSize::gib(1);

/// `[network]`: tools reach the network only through the broker's proxy,
/// and only these destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    /// `allow`: destinations, in file order.
    pub allow: Vec<AllowRule>,
    /// `private`: whether names may resolve to loopback, private, link-local
    /// or cloud metadata addresses. Default `false`.
    pub private: bool,
    /// Connections one call may open through the proxy.
    pub connections_max: u32,
    /// Bytes one call may move through the proxy, both ways together.
    pub bytes_max: ByteSize,
}

impl Network {
    /// The first rule that allows `host:port` (`host` in lower case, no
    /// trailing dot).
    pub fn allows(&self, host: &str, port: u16) -> Option<&AllowRule> {
        self.allow.iter().find(|r| r.matches(host, port))
    }
}

/// One `allow` entry: a host pattern and its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowRule {
    pub host: HostPattern,
    /// The entry's port, or [`DEFAULT_PORTS`].
    pub ports: Vec<u16>,
    /// The entry as written.
    pub text: String,
}

impl AllowRule {
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.ports.contains(&port) && self.host.matches(host)
    }
}

/// A host as an `allow` entry names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HostPattern {
    /// One name, or one address literal.
    Exact(String),
    /// `*.example.org`: any name with at least one more label before
    /// `.example.org` (not `example.org` itself). Holds `example.org`.
    AnySubdomain(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::AnySubdomain(base) => {
                host.len() > base.len() + 1
                    && host.ends_with(base.as_str())
                    && host.as_bytes()[host.len() - base.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::AnySubdomain(base) => write!(f, "*.{base}"),
        }
    }
}

/// Whether `name` is a DNS name: labels of letters, digits, `-` and `_`
/// (some service names have one), 1 to 63 bytes, not starting or ending
/// with `-`, at most 253 bytes in all.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A host as a client names it (CONNECT authority, URL host): lower case,
/// without a trailing dot or IPv6 brackets. `None` when it is neither a DNS
/// name nor an address.
pub fn normalize_host(host: &str) -> Option<String> {
    let h = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    is_dns_name(&h).then_some(h)
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let example = "expected a host name with an optional port, e.g. \"pypi.org\", \"*.pythonhosted.org\" \
                       or \"api.github.com:443\"";
        // "[v6]:port", "[v6]", "host:port", "host" (a bare v6 has several ':').
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| format!("invalid entry {text:?}: {example}"))?;
            match after {
                "" => (h, None),
                p if p.starts_with(':') => (h, Some(&p[1..])),
                _ => return Err(format!("invalid entry {text:?}: {example}")),
            }
        } else if text.matches(':').count() == 1 {
            let (h, p) = text.split_once(':').unwrap_or((text, ""));
            (h, Some(p))
        } else {
            (text, None)
        };
        let ports = match port {
            None => DEFAULT_PORTS.to_vec(),
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 => vec![n],
                _ => return Err(format!("invalid port {p:?} in {text:?}: expected a TCP port from 1 to 65535")),
            },
        };
        let pattern = if let Some(base) = host.strip_prefix("*.") {
            let base = base.to_ascii_lowercase();
            if base.parse::<IpAddr>().is_ok() || !is_dns_name(&base) || !base.contains('.') {
                return Err(format!(
                    "invalid entry {text:?}: `*.` must be followed by a domain of at least two labels, \
                     e.g. \"*.pythonhosted.org\""
                ));
            }
            HostPattern::AnySubdomain(base)
        } else if host.contains('*') {
            return Err(format!(
                "invalid entry {text:?}: `*` may only be the whole leftmost label, as in \"*.example.org\""
            ));
        } else {
            match normalize_host(host) {
                Some(h) => HostPattern::Exact(h),
                None => return Err(format!("invalid entry {text:?}: {example}")),
            }
        };
        Ok(AllowRule { host: pattern, ports, text: text.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn entries_parse_with_default_ports() {
        assert_eq!(rule("PyPI.org").host, HostPattern::Exact("pypi.org".into()));
        assert_eq!(rule("pypi.org").ports, vec![80, 443]);
        assert_eq!(rule("api.github.com:443").ports, vec![443]);
        assert_eq!(rule("*.pythonhosted.org").host, HostPattern::AnySubdomain("pythonhosted.org".into()));
        assert_eq!(rule("198.51.100.7:8080").host, HostPattern::Exact("198.51.100.7".into()));
        assert_eq!(rule("[2001:db8::1]:443").host, HostPattern::Exact("2001:db8::1".into()));
        assert_eq!(rule("2001:db8::1").ports, vec![80, 443]);
    }

    #[test]
    fn bad_entries_say_what_is_valid() {
        for bad in
            ["", "*", "*.org", "a.*.org", "foo*.org", "pypi.org:0", "pypi.org:99999", "pypi.org:", "-a.org", "a b.org"]
        {
            let e = bad.parse::<AllowRule>().expect_err(bad);
            assert!(e.contains("expected") || e.contains("may only") || e.contains("e.g."), "{bad}: {e}");
        }
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let r = rule("*.pythonhosted.org");
        assert!(r.matches("files.pythonhosted.org", 443));
        assert!(r.matches("a.b.pythonhosted.org", 80));
        assert!(!r.matches("pythonhosted.org", 443));
        assert!(!r.matches("evilpythonhosted.org", 443));
        assert!(!r.matches("files.pythonhosted.org", 22));
        let exact = rule("pypi.org:443");
        assert!(exact.matches("pypi.org", 443));
        assert!(!exact.matches("pypi.org", 80));
        assert!(!exact.matches("www.pypi.org", 443));
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("PyPI.org.").as_deref(), Some("pypi.org"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
        assert_eq!(normalize_host("a..b"), None);
        assert_eq!(normalize_host("evil.org/x"), None);
    }
}
