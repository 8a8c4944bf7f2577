//! Is the provider the one the policy trusts? Checked before every
//! completion (the port could have been taken since the policy loaded) and,
//! for a loopback port, again on every connection: the provider's end of
//! the connected socket must belong to the expected user. See
//! [`crate::policy::endpoint`] for the rules.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connection, HttpInfo};

use crate::policy::endpoint::{Endpoint, PRIVILEGED_BELOW};
use crate::sockets;

/// How the HTTP client must reach a trusted endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    /// The network as usual (https; a privileged loopback port).
    Network,
    /// A loopback port: every connection's peer socket must belong to `uid`.
    PeerUid(u32),
    /// Plain http over this Unix socket.
    Unix(PathBuf),
}

/// Why an endpoint is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distrust {
    /// Someone else holds the endpoint, or could have: nothing is sent.
    Untrusted(String),
    /// Nothing is there (the provider is not running).
    Absent(String),
}

fn uid_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

fn owner_uid(owner: &str) -> Result<u32, Distrust> {
    match nix::unistd::User::from_name(owner) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(Distrust::Untrusted(format!(
            "llm.endpoint_user {owner:?} does not exist on this host, so no listener can be trusted; \
             install the provider (it creates its user) or fix endpoint_user"
        ))),
        Err(e) => Err(Distrust::Untrusted(format!("failed to look up llm.endpoint_user {owner:?}: {e}"))),
    }
}

/// The first port an unprivileged user may bind here (per network
/// namespace; 1024 unless lowered).
fn unprivileged_start(proc: &Path) -> u16 {
    std::fs::read_to_string(proc.join("sys/net/ipv4/ip_unprivileged_port_start"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(PRIVILEGED_BELOW)
}

/// Checks `endpoint` now. `proc` is normally `/proc`.
pub fn check(endpoint: &Endpoint, proc: &Path) -> Result<Route, Distrust> {
    match endpoint {
        Endpoint::Tls => Ok(Route::Network),
        Endpoint::PrivilegedPort { addr } => {
            let start = unprivileged_start(proc);
            if addr.port() >= start {
                return Err(Distrust::Untrusted(format!(
                    "port {} is not privileged on this host (net.ipv4.ip_unprivileged_port_start = {start}), so any \
                     user can bind it; set llm.endpoint_user to the provider's user, or restore the sysctl to 1024",
                    addr.port()
                )));
            }
            Ok(Route::Network)
        }
        Endpoint::OwnedPort { addr, owner } => {
            let uid = owner_uid(owner)?;
            let all = sockets::read_all(proc).map_err(|e| {
                Distrust::Untrusted(format!(
                    "failed to read {}/net/tcp to check who listens on {addr}: {e}",
                    proc.display()
                ))
            })?;
            let listeners = sockets::listeners(&all, *addr);
            if listeners.is_empty() {
                return Err(Distrust::Absent(format!(
                    "nothing listens on {addr}; start the provider (as user {owner})"
                )));
            }
            if let Some(other) = listeners.iter().find(|l| l.uid != uid) {
                return Err(Distrust::Untrusted(format!(
                    "{addr} is held by {} ({}), not by user {owner} (uid {uid}) as llm.endpoint_user says: another \
                     local user may have bound the port first; nothing was sent. Stop that process and restart the \
                     provider, or fix endpoint_user",
                    uid_name(other.uid),
                    other.local
                )));
            }
            Ok(Route::PeerUid(uid))
        }
        Endpoint::UnixSocket { path, owner } => {
            let uid = owner.as_deref().map(owner_uid).transpose()?;
            check_socket_path(path, uid)?;
            Ok(Route::Unix(path.clone()))
        }
    }
}

/// The socket must belong to root or `uid`, and no one else may be able to
/// create or replace it: its directory, and every directory above it, is
/// writable only by root or `uid` (a sticky, world-writable ancestor such
/// as /tmp is fine above the socket's own directory, never as it).
fn check_socket_path(path: &Path, uid: Option<u32>) -> Result<(), Distrust> {
    let trusted = |o: u32| o == 0 || Some(o) == uid;
    let who = uid.map_or("root".to_string(), |u| format!("root or {}", uid_name(u)));
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Distrust::Absent(format!("no socket at {}; start the provider", path.display())))
        }
        Err(e) => return Err(Distrust::Untrusted(format!("failed to inspect {}: {e}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(Distrust::Untrusted(format!("{} is not a Unix socket", path.display())));
    }
    if !trusted(meta.uid()) {
        return Err(Distrust::Untrusted(format!(
            "{} belongs to {}, not {who}: another local user may have created it",
            path.display(),
            uid_name(meta.uid())
        )));
    }
    let mut dir = path.parent();
    let mut own_dir = true;
    while let Some(d) = dir {
        let m =
            std::fs::metadata(d).map_err(|e| Distrust::Untrusted(format!("failed to inspect {}: {e}", d.display())))?;
        let others_write = m.mode() & 0o022 != 0;
        let sticky = m.mode() & 0o1000 != 0;
        if !trusted(m.uid()) || (others_write && (own_dir || !sticky)) {
            return Err(Distrust::Untrusted(format!(
                "{} (owner {}, mode {:o}) lets users other than {who} create or replace {}; move the socket to a \
                 directory only they can write, e.g. /run/<provider>/",
                d.display(),
                uid_name(m.uid()),
                m.mode() & 0o7777,
                path.display()
            )));
        }
        own_dir = false;
        dir = d.parent();
    }
    Ok(())
}

/// How long the provider's end of a fresh connection may take to show in
/// `/proc/net/tcp` (the kernel makes it when the handshake completes).
const PEER_APPEAR: Duration = Duration::from_millis(200);

/// Checks the peer of a connected loopback socket: its owner must be `uid`.
async fn check_peer(info: &HttpInfo, uid: u32, proc: &Path) -> Result<(), String> {
    let (ours, theirs) = (info.local_addr(), info.remote_addr());
    let deadline = tokio::time::Instant::now() + PEER_APPEAR;
    loop {
        let all = sockets::read_all(proc).map_err(|e| format!("failed to read {}/net/tcp: {e}", proc.display()))?;
        match sockets::server_side(&all, ours, theirs) {
            Some(peer) if peer.uid == uid => return Ok(()),
            Some(peer) => {
                return Err(format!(
                    "refused the connection to {theirs}: its socket belongs to {}, not to {} (llm.endpoint_user); \
                     nothing was sent",
                    uid_name(peer.uid),
                    uid_name(uid)
                ))
            }
            None if tokio::time::Instant::now() >= deadline => {
                return Err(format!("refused the connection to {theirs}: could not find its owner in /proc/net/tcp"))
            }
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector layer for reqwest: every new connection is checked with
/// [`check_peer`] before a byte of the request is written.
#[derive(Clone)]
pub struct PeerCheckLayer {
    pub uid: u32,
    pub proc: PathBuf,
}

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;
    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck { inner, uid: self.uid, proc: self.proc.clone() }
    }
}

#[derive(Clone)]
pub struct PeerCheck<S> {
    inner: S,
    uid: u32,
    proc: PathBuf,
}

impl<S, R> tower::Service<R> for PeerCheck<S>
where
    S: tower::Service<R>,
    S::Response: Connection + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let connecting = self.inner.call(req);
        let (uid, proc) = (self.uid, self.proc.clone());
        Box::pin(async move {
            let conn = connecting.await.map_err(Into::into)?;
            let mut extras = hyper::http::Extensions::new();
            conn.connected().get_extras(&mut extras);
            let info = extras.get::<HttpInfo>().ok_or("refused the connection: its addresses are unknown")?;
            check_peer(info, uid, &proc).await?;
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_listener_of_another_user_is_refused_and_our_own_is_trusted() {
        let me = nix::unistd::Uid::effective().as_raw();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let owner = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(me)).unwrap().unwrap().name;
        let proc = Path::new("/proc");
        let ours = Endpoint::OwnedPort { addr, owner };
        assert_eq!(check(&ours, proc), Ok(Route::PeerUid(me)));
        // The same port, expected to belong to another user: refused.
        let other = if me == 0 { "nobody" } else { "root" };
        let theirs = Endpoint::OwnedPort { addr, owner: other.into() };
        match check(&theirs, proc) {
            Err(Distrust::Untrusted(m)) => assert!(m.contains("is held by") && m.contains(other), "{m}"),
            r => panic!("{r:?}"),
        }
        drop(l);
        assert!(matches!(check(&ours, proc), Err(Distrust::Absent(_))));
    }

    /// Through reqwest, as the gateway connects: the provider's end of the
    /// socket must belong to the expected uid, or nothing is sent.
    #[test]
    fn the_peer_of_every_connection_is_checked_before_the_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = std::sync::Arc::clone(&requests);
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    let mut buf = [0u8; 4096];
                    if s.read(&mut buf).await.unwrap_or(0) > 0 {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                    }
                }
            });
            let me = nix::unistd::Uid::effective().as_raw();
            crate::broker::llm::install_tls_provider();
            let client = |uid| {
                reqwest::Client::builder()
                    .no_proxy()
                    .connector_layer(PeerCheckLayer { uid, proc: PathBuf::from("/proc") })
                    .build()
                    .unwrap()
            };
            let url = format!("http://{addr}/v1/chat/completions");
            let err = client(me.wrapping_add(54321)).post(&url).body("secret prompt").send().await.unwrap_err();
            let chain = crate::error_chain(&err);
            assert!(chain.contains("its socket belongs to"), "{chain}");
            assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 0, "the request was sent");
            let ok = client(me).post(&url).body("prompt").send().await.unwrap();
            assert_eq!(ok.text().await.unwrap(), "ok");
            assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn a_socket_in_a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("corral-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_socket_path(&path, None);
        if nix::unistd::Uid::effective().is_root() {
            assert!(matches!(&e, Err(Distrust::Untrusted(m)) if m.contains("create or replace")), "{e:?}");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            // /tmp above it is sticky and world-writable: fine.
            assert_eq!(check_socket_path(&path, None), Ok(()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
