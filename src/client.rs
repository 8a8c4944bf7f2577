//! A minimal HTTP/1.1 client over the broker's Unix socket, for the CLI.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "failed to connect to the broker at {path}: {source}; is it running? Start it with `corral broker` \
         (or `systemctl start corral`), or point --socket / CORRAL_SOCKET at its socket"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error(
        "this user may not reach the broker's socket {path} ({source}): ask its operator to add the user to \
         a workflow's clients.users (or one of its groups to clients.groups) in a policy, then run \
         `systemctl reload corral` (or re-run scripts/install.sh); the operator can check with \
         `corral doctor --as USER`"
    )]
    Denied { path: PathBuf, source: std::io::Error },
    #[error("HTTP exchange with the broker failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("failed to build request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// A failed connect: permission errors say who may reach the socket;
/// anything else (no socket, nobody listening) asks whether it runs.
fn connect_error(socket: &Path, source: std::io::Error) -> ClientError {
    let path = socket.to_path_buf();
    match source.kind() {
        // EACCES and EPERM both.
        std::io::ErrorKind::PermissionDenied => ClientError::Denied { path, source },
        _ => ClientError::Connect { path, source },
    }
}

/// Sends one request and returns the status and the whole body.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    request_for(socket, method, path, None, body).await
}

/// Like [`request`], for a call of `workflow`: names it in the
/// `x-corral-workflow` header, so the broker authorizes the caller before
/// it reads the body.
pub async fn request_for(
    socket: &Path,
    method: Method,
    path: &str,
    workflow: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let (status, body) = request_streamed(socket, method, path, workflow, body).await?;
    let bytes = body.collect().await?.to_bytes();
    Ok((status, bytes))
}

/// Like [`request_for`], but returns the body as it arrives: for answers
/// the broker streams.
pub async fn request_streamed(
    socket: &Path,
    method: Method,
    path: &str,
    workflow: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Incoming), ClientError> {
    let headers: &[(&str, &str)] = match workflow {
        Some(w) => &[(crate::api::WORKFLOW_HEADER, w)],
        None => &[],
    };
    let resp = send(socket, method, path, headers, body.unwrap_or_default()).await?;
    Ok((resp.status(), resp.into_body()))
}

/// Sends one request with `headers` on a new connection to `socket`.
async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<hyper::Response<Incoming>, ClientError> {
    let stream = UnixStream::connect(socket).await.map_err(|source| connect_error(socket, source))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "corral")
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    Ok(sender.send_request(req.body(Full::new(Bytes::from(body)))?).await?)
}

/// One whole exchange with extra request headers, returning the answer's
/// headers too: for callers that act on behalf of someone (the chat
/// bridges' `x-corral-member`, …) and read `Retry-After` or the request id.
pub async fn request_with_headers(
    socket: &Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
    let resp = send(socket, method, path, headers, body).await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}
