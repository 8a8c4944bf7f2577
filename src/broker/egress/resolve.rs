//! Names to addresses for the egress proxy: the broker resolves, never the
//! tool.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Looks names up in a hosts file of the operator's first (`--egress-hosts`:
/// `/etc/hosts` syntax, read again at every lookup), then with the system's
/// resolver (`/etc/hosts`, then DNS).
pub struct Resolver {
    hosts_file: Option<PathBuf>,
    system: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("the lookup took more than {LOOKUP_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    System(std::io::Error),
    #[error("not in the hosts file {0}")]
    NotInFile(String),
}

impl Resolver {
    /// `system`: whether names missing from `hosts_file` go to the system's
    /// resolver.
    pub fn new(hosts_file: Option<PathBuf>, system: bool) -> Resolver {
        Resolver { hosts_file, system }
    }

    /// Every address of `name` (lower case) with `port`. An address literal
    /// is its own answer.
    pub async fn lookup(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, LookupError> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(path) = &self.hosts_file {
            let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
            let found = from_hosts(&text, name);
            if !found.is_empty() {
                return Ok(found.into_iter().map(|ip| SocketAddr::new(ip, port)).collect());
            }
            if !self.system {
                return Err(LookupError::NotInFile(path.display().to_string()));
            }
        }
        let addrs = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, port)))
            .await
            .map_err(|_| LookupError::Timeout)?
            .map_err(LookupError::System)?;
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        Ok(out)
    }
}

/// The addresses `text` (hosts file syntax) gives `name`, in file order.
fn from_hosts(text: &str, name: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else { continue };
        if fields.any(|n| n.eq_ignore_ascii_case(name)) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_give_every_address_of_a_name() {
        let text = "# test\n198.51.100.7 a.test b.test\n10.0.0.1\tA.test # again\nnot-an-ip a.test\n::1 c.test\n";
        assert_eq!(
            from_hosts(text, "a.test"),
            ["198.51.100.7".parse::<IpAddr>().unwrap(), "10.0.0.1".parse().unwrap()]
        );
        assert_eq!(from_hosts(text, "c.test"), ["::1".parse::<IpAddr>().unwrap()]);
        assert!(from_hosts(text, "d.test").is_empty());
    }
}
