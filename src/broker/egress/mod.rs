//! Egress: what a workflow with `[network]` may reach, decided by the
//! broker for every connection its tools ask the proxy for
//! (`http/proxy.rs`).
//!
//! A destination passes when its name matches an `allow` rule and every
//! address the name resolves to is public (unless `private = true`). The
//! proxy then connects to one of exactly those addresses: a name cannot be
//! checked against one answer and reached at another (DNS rebinding).
//!
//! - [`address`]: which addresses count as loopback, private, link-local,
//!   metadata.
//! - [`resolve`]: names to addresses (a hosts file first, then the system).
//! - [`tally`]: what one call reached and was refused, and its caps.

pub mod address;
pub mod resolve;
pub mod tally;

use std::net::SocketAddr;

use crate::policy::network::normalize_host;
use crate::policy::Network;

pub use resolve::Resolver;
pub use tally::{CallTally, EgressReceipt};

/// Why the proxy refused a destination: the words go into the 403's body
/// and the call's receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// One workflow's egress rules, shared by the proxies of its workers.
pub struct Egress {
    pub workflow: String,
    pub network: Network,
    pub resolver: Resolver,
}

impl Egress {
    /// Whether `host:port` may be reached, and at which addresses. `host` as
    /// the client wrote it (any case, maybe bracketed or with a final dot).
    pub async fn check(&self, host: &str, port: u16) -> Result<(String, Vec<SocketAddr>), (String, Refusal)> {
        let Some(name) = normalize_host(host) else {
            let shown = host.escape_debug().to_string();
            return Err((shown.clone(), Refusal(format!("{shown:?} is not a host name or address"))));
        };
        if self.network.allows(&name, port).is_none() {
            let ports_for_name: Vec<String> =
                self.network.allow.iter().filter(|r| r.host.matches(&name)).map(|r| r.text.clone()).collect();
            let why = if ports_for_name.is_empty() {
                format!("{name} is not in [network] allow of workflow {}", self.workflow)
            } else {
                format!(
                    "port {port} of {name} is not allowed: [network] allow of workflow {} names it as {}",
                    self.workflow,
                    ports_for_name.join(", ")
                )
            };
            return Err((name, Refusal(why)));
        }
        let addrs = match self.resolver.lookup(&name, port).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => return Err((name.clone(), Refusal(format!("{name} has no address")))),
            Err(e) => return Err((name.clone(), Refusal(format!("{name} could not be resolved: {e}")))),
        };
        if !self.network.private {
            // Every answer, not just the first: a name that points at a
            // public address and at 127.0.0.1 is refused as a whole.
            if let Some((ip, kind)) = addrs.iter().find_map(|a| address::non_public(a.ip()).map(|k| (a.ip(), k))) {
                return Err((
                    name.clone(),
                    Refusal(format!(
                        "{name} resolves to {ip}, a {kind} address, and [network] private = false in workflow {}",
                        self.workflow
                    )),
                ));
            }
        }
        Ok((name, addrs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(allow: &[&str], private: bool, hosts: &str) -> (Egress, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("corral-egress-test-{}-{}", std::process::id(), allow.len()));
        std::fs::write(&path, hosts).unwrap();
        let network = Network {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            private,
            connections_max: 10,
            bytes_max: crate::policy::ByteSize::mib(1),
        };
        (Egress { workflow: "w".into(), network, resolver: Resolver::new(Some(path.clone()), false) }, path)
    }

    #[tokio::test]
    async fn names_outside_the_list_are_refused_before_any_lookup() {
        let (e, path) = egress(&["pypi.test"], false, "198.51.100.7 pypi.test\n");
        let ok = e.check("PyPI.test.", 443).await.unwrap();
        assert_eq!(ok.0, "pypi.test");
        assert_eq!(ok.1, vec!["198.51.100.7:443".parse::<SocketAddr>().unwrap()]);
        let (_, why) = e.check("evil.test", 443).await.unwrap_err();
        assert!(why.0.contains("not in [network] allow"), "{why:?}");
        let (_, why) = e.check("pypi.test", 22).await.unwrap_err();
        assert!(why.0.contains("port 22 of pypi.test is not allowed"), "{why:?}");
        let (_, why) = e.check("198.51.100.7", 443).await.unwrap_err();
        assert!(why.0.contains("not in [network] allow"), "{why:?}");
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn one_private_answer_refuses_the_name() {
        let hosts = "198.51.100.7 both.test\n10.1.2.3 both.test\n127.0.0.1 loop.test\n169.254.169.254 meta.test\n";
        let (e, path) = egress(&["both.test", "loop.test", "meta.test"], false, hosts);
        let (_, why) = e.check("both.test", 80).await.unwrap_err();
        assert!(why.0.contains("10.1.2.3, a private address"), "{why:?}");
        let (_, why) = e.check("loop.test", 80).await.unwrap_err();
        assert!(why.0.contains("loopback"), "{why:?}");
        let (_, why) = e.check("meta.test", 80).await.unwrap_err();
        assert!(why.0.contains("cloud metadata"), "{why:?}");
        std::fs::remove_file(path).unwrap();
        let (e, path) = egress(&["both.test", "loop.test"], true, hosts);
        assert_eq!(e.check("both.test", 80).await.unwrap().1.len(), 2);
        assert!(e.check("loop.test", 80).await.is_ok());
        std::fs::remove_file(path).unwrap();
    }
}
