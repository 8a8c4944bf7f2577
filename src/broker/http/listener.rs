//! The Unix socket: bind it safely, or take it from systemd.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another broker is already listening on {0}: stop it first, or use another --socket")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket: remove it, or use another --socket")]
    NotASocket(PathBuf),
    #[error("failed to bind {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// Binds `path`, replacing a stale socket left by a dead broker but never a
/// live one or a file that is not a socket. The socket is mode 0666: who may
/// do what is decided per request from the peer's credentials.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let err = |source| BindError::Bind { path: path.to_path_buf(), source };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

/// Takes a listening socket from systemd (socket activation).
pub fn from_std(listener: std::os::unix::net::UnixListener) -> Result<UnixListener, BindError> {
    let err = |source| BindError::Bind { path: PathBuf::from("(socket from systemd)"), source };
    listener.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(listener).map_err(err)
}
