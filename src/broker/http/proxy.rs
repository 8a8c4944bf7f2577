//! The egress proxy of one worker: the only listener inside the worker's
//! network namespace (`127.0.0.1:3128` there), served by the broker.
//!
//! It speaks what `HTTP_PROXY` / `HTTPS_PROXY` clients send: `CONNECT
//! host:port` (a tunnel; TLS stays end to end) and plain `http://` requests
//! in absolute form (forwarded, one upstream connection per request). Each
//! destination is checked ([`Egress::check`]) before a byte leaves: refused
//! ones get a 403 whose body names the rule. The proxy connects to exactly
//! the addresses it checked.
//!
//! Every connection belongs to the call in progress ([`CallTally`]): it
//! counts against that call's caps, appears in its receipt, and is aborted
//! when the call ends.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::broker::egress::tally::ConnBytes;
use crate::broker::egress::{CallTally, Egress, EgressReceipt};

/// How long a client has to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Each direction's buffer in a tunnel: tokio's default (8 KiB) costs a
/// tunnel more than half the throughput of a direct download here.
const TUNNEL_BUFFER: usize = 64 << 10;
/// How long the proxy tries to reach a destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// One worker's proxy. Dropping it stops the proxy and ends the call in
/// progress.
pub struct Proxy {
    egress: Arc<Egress>,
    current: Arc<Mutex<Option<Arc<CallTally>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Serves `listener` (made by [`crate::sandbox::net::listen_in`]).
    pub fn start(listener: std::net::TcpListener, egress: Arc<Egress>) -> io::Result<Proxy> {
        let listener = TcpListener::from_std(listener)?;
        let current: Arc<Mutex<Option<Arc<CallTally>>>> = Arc::default();
        let accept = tokio::spawn(accept_loop(listener, egress.clone(), current.clone()));
        Ok(Proxy { egress, current, accept })
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<Arc<CallTally>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call starts: connections from now on are its.
    pub fn begin_call(&self) {
        let n = &self.egress.network;
        let old = self.current().replace(CallTally::new(n.connections_max, n.bytes_max.0));
        if let Some(old) = old {
            old.finish();
        }
    }

    /// The call ended: its connections are aborted; what it did.
    pub fn end_call(&self) -> Option<EgressReceipt> {
        self.current().take().map(|t| t.finish())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(t) = self.current().take() {
            t.finish();
        }
    }
}

async fn accept_loop(listener: TcpListener, egress: Arc<Egress>, current: Arc<Mutex<Option<Arc<CallTally>>>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, most likely: the tool's own doing.
                tracing::warn!(workflow = %egress.workflow, "egress proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tally = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let egress = egress.clone();
        let conn_tally = tally.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, egress.clone(), conn_tally.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
        // No call in progress: the request gets its 403; nothing outlives
        // a call, so nothing should be here at all.
        if let Some(t) = tally {
            t.track(task.abort_handle());
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    resp
}

fn refused(host: &str, port: u16, why: &str) -> Response<ProxyBody> {
    text(StatusCode::FORBIDDEN, format!("corral egress proxy: {host}:{port} refused: {why}\n"))
}

async fn handle(
    req: Request<Incoming>,
    egress: Arc<Egress>,
    tally: Option<Arc<CallTally>>,
) -> Result<Response<ProxyBody>, Infallible> {
    let Some(tally) = tally else {
        return Ok(text(StatusCode::FORBIDDEN, "corral egress proxy: no call is in progress\n".into()));
    };
    let (host, port) = match target(&req) {
        Ok(t) => t,
        Err(resp) => return Ok(resp),
    };
    let (name, addrs) = match egress.check(&host, port).await {
        Ok(ok) => ok,
        Err((name, why)) => {
            tracing::info!(workflow = %egress.workflow, host = %name, port, "egress refused: {}", why.0);
            tally.refuse(&name, port, &why);
            return Ok(refused(&name, port, &why.0));
        }
    };
    let bytes = match tally.admit(&name, port) {
        Ok(b) => b,
        Err(why) => return Ok(refused(&name, port, &why.0)),
    };
    let upstream = match connect(&addrs).await {
        Ok(s) => Counted { inner: s, bytes, tally: tally.clone() },
        Err(e) => {
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                format!("corral egress proxy: could not reach {name}:{port}: {e}\n"),
            ))
        }
    };
    if req.method() == Method::CONNECT {
        let task = tokio::spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(req).await else { return };
            let mut client = TokioIo::new(upgraded);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, TUNNEL_BUFFER, TUNNEL_BUFFER)
                .await;
        });
        tally.track(task.abort_handle());
        return Ok(Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed()));
    }
    Ok(forward(req, upstream, &name, port, &tally).await)
}

/// The destination of a proxy request: the authority of a `CONNECT`, or
/// of an absolute `http://` URI.
#[allow(clippy::result_large_err)]
fn target(req: &Request<Incoming>) -> Result<(String, u16), Response<ProxyBody>> {
    let uri = req.uri();
    let Some(auth) = uri.authority() else {
        return Err(text(
            StatusCode::BAD_REQUEST,
            "corral egress proxy: this is a proxy; send requests through it (HTTP_PROXY / HTTPS_PROXY) \
             with an absolute http:// URI or CONNECT host:port\n"
                .into(),
        ));
    };
    if req.method() == Method::CONNECT {
        return Ok((auth.host().to_string(), auth.port_u16().unwrap_or(443)));
    }
    match uri.scheme_str() {
        Some("http") => Ok((auth.host().to_string(), auth.port_u16().unwrap_or(80))),
        _ => Err(text(
            StatusCode::BAD_REQUEST,
            "corral egress proxy: only http:// is forwarded; https goes through CONNECT (HTTPS_PROXY)\n".into(),
        )),
    }
}

async fn connect(addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut last = io::Error::other("no address");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"))
            }
        }
    }
    Err(last)
}

/// Sends one plain-http request on its own upstream connection, in origin
/// form, and streams the answer back.
async fn forward(
    mut req: Request<Incoming>,
    upstream: Counted,
    name: &str,
    port: u16,
    tally: &CallTally,
) -> Response<ProxyBody> {
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    match path.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return text(StatusCode::BAD_REQUEST, "corral egress proxy: invalid request path\n".into()),
    }
    let headers = req.headers_mut();
    headers.remove("proxy-connection");
    headers.remove("proxy-authorization");
    let host = if port == 80 { name.to_string() } else { format!("{name}:{port}") };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&host) {
        headers.insert(hyper::header::HOST, v);
    }
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(pair) => pair,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("corral egress proxy: {name}:{port}: {e}\n")),
    };
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    tally.track(task.abort_handle());
    match sender.send_request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("corral egress proxy: {name}:{port}: {e}\n")),
    }
}

/// An upstream connection that counts its bytes for the call's receipt and
/// `bytes_max`.
struct Counted {
    inner: TcpStream,
    bytes: Arc<ConnBytes>,
    tally: Arc<CallTally>,
}

impl Counted {
    fn count(&self, n: usize, received: bool) -> io::Result<()> {
        let n = n as u64;
        let counter = if received { &self.bytes.received } else { &self.bytes.sent };
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.tally.add_bytes(n).map_err(io::Error::other)
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // Never read past the call's byte budget.
        let left = self.tally.remaining().map_err(io::Error::other)?;
        let room = usize::try_from(left).unwrap_or(usize::MAX).min(buf.remaining());
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = r {
            buf.advance(n);
            if n > 0 {
                self.count(n, true)?;
            }
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let left = self.tally.remaining().map_err(io::Error::other)?;
        let buf = &buf[..usize::try_from(left).unwrap_or(usize::MAX).min(buf.len())];
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(n, false)?;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A call's receipt as the API shows it.
pub(crate) fn report(r: &EgressReceipt) -> crate::api::EgressReport {
    crate::api::EgressReport {
        reached: r
            .reached
            .iter()
            .map(|d| crate::api::EgressReached {
                host: d.host.clone(),
                port: d.port,
                connections: d.connections,
                sent: d.sent,
                received: d.received,
            })
            .collect(),
        refused: r
            .refused
            .iter()
            .map(|d| crate::api::EgressRefused {
                host: d.host.clone(),
                port: d.port,
                attempts: d.attempts,
                reason: d.reason.clone(),
            })
            .collect(),
        capped: r.capped.clone(),
    }
}
