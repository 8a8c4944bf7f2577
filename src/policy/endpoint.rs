//! Where a workflow's model provider listens, and why the broker may trust
//! it with prompts, tool results and the API key.
//!
//! A provider is trusted only where no unprivileged local user could have
//! taken its place:
//!
//! - `https://` anywhere: TLS authenticates the server;
//! - plain `http://` over a Unix socket (`endpoint_socket`) whose directory
//!   only root or `endpoint_user` can write;
//! - plain `http://` to a loopback address on a port below the kernel's
//!   `ip_unprivileged_port_start` (1024): only root can bind it;
//! - plain `http://` to a loopback address on any other port only when
//!   `endpoint_user` names the user that runs the provider: before every
//!   connection the broker checks that the listener belongs to that user,
//!   and after connecting that the peer socket does.
//!
//! Anything else (plain http to another host, or to a loopback port anyone
//! could bind first) is refused when the policy loads.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Serialize;

/// How the broker decides that an endpoint is the real provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Endpoint {
    /// `https://`: the server's certificate.
    Tls,
    /// Plain http over a Unix socket.
    UnixSocket { path: PathBuf, owner: Option<String> },
    /// Plain http to a loopback port only root can bind.
    PrivilegedPort { addr: SocketAddr },
    /// Plain http to a loopback port anyone could bind: trusted only while
    /// its listener belongs to `owner`.
    OwnedPort { addr: SocketAddr, owner: String },
}

/// The lowest port an unprivileged user cannot bind, by default.
pub const PRIVILEGED_BELOW: u16 = 1024;

impl Endpoint {
    /// One line for `corral policy check`: what is checked.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Tls => "https: the provider is authenticated by its TLS certificate".into(),
            Endpoint::UnixSocket { path, owner } => format!(
                "Unix socket {}: its directory must be writable only by root{}; checked before every connection",
                path.display(),
                owner.as_ref().map(|o| format!(" or {o}")).unwrap_or_default()
            ),
            Endpoint::PrivilegedPort { addr } => format!(
                "loopback {addr}, a privileged port (only root can bind it); checked against \
                 net.ipv4.ip_unprivileged_port_start before every connection"
            ),
            Endpoint::OwnedPort { addr, owner } => format!(
                "loopback {addr}: the listener must belong to user {owner}; checked before every connection \
                 (/proc/net/tcp) and on the connected socket"
            ),
        }
    }
}

/// The host part of an `http://` URL as an address: a literal IPv4 or
/// bracketed IPv6 address.
fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Classifies `[llm]`'s endpoint. The error says what is wrong and how to
/// fix it.
pub fn classify(base_url: &str, owner: Option<&str>, socket: Option<&str>) -> Result<Endpoint, String> {
    let url = url::Url::parse(base_url).map_err(|e| {
        if !base_url.is_ascii() {
            // corral is built without Unicode domain name tables.
            return format!(
                "invalid URL {base_url:?}: {e}; a host name must be ASCII: write an international name in \
                 its punycode form (xn--…)"
            );
        }
        format!("invalid URL {base_url:?}: {e}; expected e.g. \"https://api.openai.com/v1\" or \"http://127.0.0.1:11434/v1\"")
    })?;
    let owner = owner.map(str::to_string);
    if let Some(path) = socket {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "endpoint_socket {path:?} is not an absolute path: give e.g. \"/run/ollama/api.sock\""
            ));
        }
        return match url.scheme() {
            "http" | "https" => Ok(Endpoint::UnixSocket { path, owner }),
            s => Err(format!("unsupported scheme {s:?}: use http:// (or https://) with endpoint_socket")),
        };
    }
    match url.scheme() {
        "https" => return Ok(Endpoint::Tls),
        "http" => {}
        s => return Err(format!("unsupported scheme {s:?}: use https:// (or http:// for a provider on this host)")),
    }
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let Some(ip) = literal_ip(host).filter(IpAddr::is_loopback) else {
        let hint = if host.eq_ignore_ascii_case("localhost") {
            "write the address instead of the name (http://127.0.0.1:…), so no resolver decides where prompts go"
        } else {
            "use https://, so the provider is authenticated and the prompts, tool results and key are encrypted"
        };
        return Err(format!(
            "plain http to {host:?} is refused: anyone on the path could read or answer the calls; {hint}"
        ));
    };
    let addr = SocketAddr::new(ip, port);
    match owner {
        Some(owner) => Ok(Endpoint::OwnedPort { addr, owner }),
        None if port < PRIVILEGED_BELOW => Ok(Endpoint::PrivilegedPort { addr }),
        None => Err(format!(
            "{addr} is a port any local user can bind before the provider does, and would then receive the \
             prompts, tool results and key: set llm.endpoint_user to the user that runs the provider \
             (e.g. endpoint_user = \"ollama\" for Ollama's packages), or serve it on a Unix socket \
             (llm.endpoint_socket), on a port below {PRIVILEGED_BELOW}, or over https"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn https_unix_sockets_privileged_and_owned_ports_pass() {
        assert_eq!(classify("https://api.openai.com/v1", None, None).unwrap(), Endpoint::Tls);
        assert_eq!(
            classify("http://127.0.0.1:11434/v1", Some("ollama"), None).unwrap(),
            Endpoint::OwnedPort { addr: "127.0.0.1:11434".parse().unwrap(), owner: "ollama".into() }
        );
        assert_eq!(
            classify("http://[::1]:80/v1", None, None).unwrap(),
            Endpoint::PrivilegedPort { addr: "[::1]:80".parse().unwrap() }
        );
        assert_eq!(
            classify("http://127.0.0.1/v1", None, None).unwrap(),
            Endpoint::PrivilegedPort { addr: "127.0.0.1:80".parse().unwrap() }
        );
        assert_eq!(
            classify("http://localhost/v1", None, Some("/run/llm/api.sock")).unwrap(),
            Endpoint::UnixSocket { path: "/run/llm/api.sock".into(), owner: None }
        );
    }

    #[test]
    fn an_international_host_name_is_asked_for_in_punycode() {
        let e = classify("https://bücher.example/v1", None, None).unwrap_err();
        assert!(e.contains("punycode"), "{e}");
        assert_eq!(classify("https://xn--bcher-kva.example/v1", None, None).unwrap(), Endpoint::Tls);
    }

    #[test]
    fn squattable_and_remote_plain_http_are_refused_with_a_fix() {
        let e = classify("http://127.0.0.1:11434/v1", None, None).unwrap_err();
        assert!(e.contains("endpoint_user") && e.contains("ollama") && e.contains("https"), "{e}");
        let e = classify("http://192.168.1.5:11434/v1", Some("ollama"), None).unwrap_err();
        assert!(e.contains("https://"), "{e}");
        let e = classify("http://localhost:11434/v1", Some("ollama"), None).unwrap_err();
        assert!(e.contains("127.0.0.1"), "{e}");
        let e = classify("http://localhost/v1", None, Some("run/api.sock")).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        assert!(classify("ftp://127.0.0.1/v1", None, None).is_err());
    }
}
