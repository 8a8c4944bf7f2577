//! The state directory and the workspaces in it: who owns what, and which
//! modes keep one tenant out of another's files.
//!
//! ```text
//! STATE_DIR/                       root             0711  ledger.sqlite3 and other files: 0600
//! ├── images/                      root             0700  disk_max images (see `quota`)
//! └── workspaces/                  root             0711
//!     └── <tenant>/                root:<group>     0710  <group>: the tenant's worker group
//!         └── <workflow>/          <user>:<group>   0700  the workspace
//! ```
//!
//! A worker owns its workspace and may chmod it to anything (a tool's
//! `chmod 777 .` succeeds). What keeps everyone else out is the directory
//! above it: it belongs to root, so no worker can change it, and only the
//! tenant's group may traverse it, so no other user can reach inside the
//! workspace whatever its mode. The broker (root) reaches everything; the
//! workers of a tenant's other workflows run as the same user and group, so
//! they traverse the tenant directory too, and Landlock keeps each to its
//! own workspace.
//!
//! Older versions made the tenant directory belong to the worker user. Every
//! start re-applies owners and modes, through descriptors opened with
//! `O_NOFOLLOW`: a tenant who owned its directory could have swapped a
//! workspace for a symlink to a file of root's, and a path-based `chown`
//! would have followed it.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use nix::unistd::{fchown, Gid, Uid};

use crate::protocol::Credentials;

/// Mode of the state directory and of `workspaces/`: root's, traversable,
/// not listable (tenant names are nobody else's business).
const STATE_MODE: u32 = 0o711;
/// Mode of `images/`: the quota images are the broker's alone.
const IMAGES_MODE: u32 = 0o700;
/// Mode of a tenant directory: root's; only the tenant's group traverses it.
const TENANT_MODE: u32 = 0o710;
/// Mode of a workspace (the worker may change it; see the module docs).
const WORKSPACE_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("failed to {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: Errno },
    #[error(
        "{path} is not a directory (a symlink or a file left by an older version?): remove it and restart the broker"
    )]
    NotDirectory { path: PathBuf },
}

/// Creates the state directory with `workspaces/` and `images/`, and (on
/// every start) resets their modes and makes the files in the state
/// directory itself private to root: the ledger holds every tenant's calls.
pub fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    let workspaces = dir.join("workspaces");
    let images = dir.join("images");
    std::fs::create_dir_all(&workspaces)?;
    std::fs::create_dir_all(&images)?;
    for (d, mode) in [(dir, STATE_MODE), (workspaces.as_path(), STATE_MODE), (images.as_path(), IMAGES_MODE)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// `state_dir/images/<tenant>`, the directory of a tenant's quota images
/// (created, root 0700).
pub fn images_dir(state_dir: &Path, tenant: &str) -> std::io::Result<PathBuf> {
    let dir = state_dir.join("images").join(tenant);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(IMAGES_MODE))?;
    Ok(dir)
}

/// Creates (or repairs) `state_dir/workspaces/<tenant>/<workflow>` with the
/// owners and modes of the module docs. `creds` is `None` when the broker is
/// not root and workers keep its user: then both levels are its own, 0700.
/// Idempotent; also run on the root of a freshly mounted quota image.
pub fn make_workspace(
    state_dir: &Path,
    tenant: &str,
    workflow: &str,
    creds: Option<&Credentials>,
) -> Result<PathBuf, WorkspaceError> {
    let workspaces = state_dir.join("workspaces");
    let top = open(&workspaces, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY, Mode::empty())
        .map_err(|source| WorkspaceError::Io { op: "open", path: workspaces.clone(), source })?;
    let tenant_path = workspaces.join(tenant);
    let (tenant_owner, tenant_mode) = match creds {
        Some(c) => (Some((Uid::from_raw(0), Gid::from_raw(c.gid))), TENANT_MODE),
        None => (None, WORKSPACE_MODE),
    };
    // The tenant directory first: once it is root's, no worker can swap
    // the entries in it while the workspace is being fixed.
    let tenant_fd = ensure_dir(&top, tenant, &tenant_path, tenant_owner, tenant_mode)?;
    let ws_path = tenant_path.join(workflow);
    let ws_owner = creds.map(|c| (Uid::from_raw(c.uid), Gid::from_raw(c.gid)));
    ensure_dir(&tenant_fd, workflow, &ws_path, ws_owner, WORKSPACE_MODE)?;
    Ok(ws_path)
}

/// `mkdir` (if missing), then open without following a symlink, then set
/// owner and mode on the descriptor.
fn ensure_dir(
    parent: &OwnedFd,
    name: &str,
    path: &Path,
    owner: Option<(Uid, Gid)>,
    mode: u32,
) -> Result<OwnedFd, WorkspaceError> {
    let io = |op, source| WorkspaceError::Io { op, path: path.to_path_buf(), source };
    match mkdirat(parent, name, Mode::from_bits_truncate(WORKSPACE_MODE)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io("create", e)),
    }
    let fd = openat(
        parent,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => WorkspaceError::NotDirectory { path: path.to_path_buf() },
        e => io("open", e),
    })?;
    if let Some((uid, gid)) = owner {
        fchown(&fd, Some(uid), Some(gid)).map_err(|e| io("change the owner of", e))?;
    }
    fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(|e| io("change the mode of", e))?;
    Ok(fd)
}

/// Opens the directory `workspace/a/b/…` one component at a time, never
/// following a symlink: every level below the workspace belongs to the
/// worker user, so a call outside any session could have planted one.
fn open_beneath(workspace: &Path, parts: &[&str]) -> Result<OwnedFd, WorkspaceError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut fd = open(workspace, flags, Mode::empty()).map_err(|source| WorkspaceError::Io {
        op: "open",
        path: workspace.to_path_buf(),
        source,
    })?;
    let mut path = workspace.to_path_buf();
    for part in parts {
        path.push(part);
        fd = openat(&fd, *part, flags, Mode::empty()).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => WorkspaceError::NotDirectory { path: path.clone() },
            e => WorkspaceError::Io { op: "open", path: path.clone(), source: e },
        })?;
    }
    Ok(fd)
}

/// Creates (or repairs) `workspace/sessions/<owner>/<id>`, each level owned
/// by the worker user, mode 0700, through descriptors opened with
/// `O_NOFOLLOW` (see [`open_beneath`]). The session's own layer of Landlock
/// (`sandbox::session`) is what keeps sessions apart: they all belong to
/// the same user.
pub fn make_session_dir(
    workspace: &Path,
    owner: &str,
    id: &str,
    creds: Option<&Credentials>,
) -> Result<PathBuf, WorkspaceError> {
    let owner_ids = creds.map(|c| (Uid::from_raw(c.uid), Gid::from_raw(c.gid)));
    let mut fd = open_beneath(workspace, &[])?;
    let mut path = workspace.to_path_buf();
    for part in ["sessions", owner, id] {
        path.push(part);
        fd = ensure_dir(&fd, part, &path, owner_ids, WORKSPACE_MODE)?;
    }
    Ok(path)
}

/// Removes `workspace/sessions/<owner>/<id>` and everything in it, if it
/// exists. The levels above it are opened without following symlinks and
/// the removal goes through the descriptor of its parent
/// (`/proc/self/fd/N/<id>`), so a symlink planted at any level cannot send
/// it elsewhere. Inside, `std::fs::remove_dir_all` does not follow symlinks
/// and, since Rust 1.58.1, walks with `openat`/`unlinkat` on descriptors
/// opened `O_NOFOLLOW`, so swapping a directory for a symlink during the
/// walk does not redirect it either (CVE-2022-21658,
/// <https://blog.rust-lang.org/2022/01/20/cve-2022-21658.html>).
pub fn remove_session_dir(workspace: &Path, owner: &str, id: &str) -> Result<(), WorkspaceError> {
    use std::os::fd::AsRawFd;
    let parent = match open_beneath(workspace, &["sessions", owner]) {
        Ok(fd) => fd,
        Err(WorkspaceError::Io { source: Errno::ENOENT, .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let target = PathBuf::from(format!("/proc/self/fd/{}/{id}", parent.as_raw_fd()));
    match std::fs::remove_dir_all(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WorkspaceError::Io {
            op: "remove",
            path: workspace.join("sessions").join(owner).join(id),
            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        }),
    }
}
