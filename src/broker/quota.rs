//! `[limits].disk_max`: a workspace of a fixed size.
//!
//! Each workflow with `disk_max` gets an ext4 image of that size,
//! `STATE_DIR/images/<tenant>/<workflow>.ext4` (root 0600 in a root 0700
//! directory), loop-mounted by the broker on its workspace with `nosuid`,
//! `nodev` and — unless the policy's `exec` rules cover the workspace —
//! `noexec`. The kernel enforces the size: a write past it fails with
//! `ENOSPC`, and the call's reply names `disk_max` in its `limit` field.
//!
//! The mount lives in the broker's own mount namespace: the service's
//! (`PrivateMounts=yes`) under systemd, one it makes at start otherwise
//! ([`own_mount_namespace`]). Workers are its children and inherit it;
//! nobody else sees it, and when the broker ends — stopped or killed — the
//! namespace goes with it, unmounting every image and freeing its loop
//! device (mount(8) sets autoclear). A restart mounts the same images again:
//! an image is formatted once, when it is created, and never again. A
//! larger `disk_max` grows it (offline, before it is mounted); a smaller one
//! is refused, as is dropping `disk_max` from a workflow whose files live in
//! an image.
//!
//! Why not project quotas: the owner of a file may change its project id
//! (`FS_IOC_FSSETXATTR`), so a tool could take its files out of the quota,
//! and few root file systems are mounted with `prjquota`. An image of a
//! fixed size cannot be escaped from inside.
//!
//! The tools are util-linux's `mount`/`umount` and e2fsprogs' `mkfs.ext4`,
//! `e2fsck` and `resize2fs`, run with an empty environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::policy::ByteSize;

/// Where the tools are looked for (the broker's PATH may be anything).
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The tools the quota needs, with the Debian package of each.
const TOOLS: [(&str, &str); 6] = [
    ("mount", "mount"),
    ("cp", "coreutils"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
];

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("disk_max cannot be enforced here: {0}")]
    Unsupported(String),
    #[error("failed to {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("failed to {what}: {tool} said: {detail}")]
    Tool { what: String, tool: &'static str, detail: String },
    #[error(
        "disk_max {max} is smaller than the workspace's image ({size}): shrinking is not supported; \
         set disk_max back to at least {size}, or move the files out, delete {image} and restart the broker"
    )]
    Shrink { max: ByteSize, size: ByteSize, image: PathBuf },
    #[error(
        "the files already in the workspace ({used}) do not fit in disk_max {max}: \
         delete some from {workspace}, or raise disk_max"
    )]
    TooFull { used: String, max: ByteSize, workspace: PathBuf },
    #[error(
        "the workspace's files live in the image {image}, made while the policy had disk_max: \
         put disk_max back, or copy the files out, delete the image and restart the broker"
    )]
    Orphan { image: PathBuf },
}

/// One workflow's quota.
#[derive(Debug)]
pub struct Quota {
    workflow: String,
    /// As the policy says it.
    pub max: ByteSize,
    image: PathBuf,
    workspace: PathBuf,
    noexec: bool,
    /// The size of the mounted image, which lags `max` after a reload that
    /// grew it (0 until attached).
    in_force: std::sync::atomic::AtomicU64,
}

/// A workspace's usage, for status.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub used: u64,
    /// The file system's size: the image less ext4's own metadata.
    pub size: u64,
    pub available: u64,
    pub inodes_free: u64,
}

/// The image of a workflow.
pub fn image_path(images_dir: &Path, workflow: &str) -> PathBuf {
    images_dir.join(format!("{workflow}.ext4"))
}

/// Finds one of [`TOOLS`].
fn tool(name: &'static str) -> Result<PathBuf, QuotaError> {
    TOOL_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file()).ok_or_else(|| {
        let package = TOOLS.iter().find(|(t, _)| *t == name).map_or("e2fsprogs", |(_, p)| p);
        QuotaError::Unsupported(format!("{name} is not installed: install {package} (apt-get install {package})"))
    })
}

/// Runs a tool with an empty environment; `ok` lists the exit codes that
/// mean success.
fn run(name: &'static str, args: &[&std::ffi::OsStr], what: String, ok: &[i32]) -> Result<(), QuotaError> {
    let path = tool(name)?;
    let out = Command::new(&path)
        .args(args)
        .env_clear()
        .env("PATH", TOOL_DIRS.join(":"))
        .stdin(Stdio::null())
        .output()
        .map_err(|source| QuotaError::Io { op: "run", path: path.clone(), source })?;
    match out.status.code() {
        Some(c) if ok.contains(&c) => Ok(()),
        _ => {
            let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if detail.is_empty() {
                detail = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            Err(QuotaError::Tool { what, tool: name, detail: format!("{detail} ({})", out.status) })
        }
    }
}

/// What this host offers for `disk_max`: `Ok(how)` or `Err(why not)`. Checks
/// the tools, the loop driver and ext4; not whether the broker will be
/// allowed to use them (root, and a unit that lets it: see units/corral.service).
pub fn host_support() -> Result<String, String> {
    for (name, _) in TOOLS {
        tool(name).map_err(|e| e.to_string())?;
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("disk_max cannot be enforced here: /dev/loop-control is missing: load the loop module \
                    (modprobe loop)"
            .into());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.split_whitespace().last() == Some("ext4")) {
        return Err("disk_max cannot be enforced here: the kernel has no ext4 (modprobe ext4)".into());
    }
    Ok("an ext4 image of disk_max per workflow, loop-mounted on its workspace (nosuid, nodev; noexec \
        unless the exec rules cover it) in the broker's mount namespace; a full workspace fails writes \
        with ENOSPC"
        .into())
}

/// Whether the broker has a mount namespace of its own (set once, by
/// [`own_mount_namespace`]).
static PRIVATE_MOUNTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Gives a broker started as root a mount namespace of its own, so that the
/// quota mounts are its alone and end with it; mounts of the host still
/// propagate in. Call before any thread exists, and after the broker's own
/// path is known: `/proc/self/exe` names a file on a mount of the old
/// namespace, which from the new one reads as a path relative to that
/// mount (`/corral-install/bin/corral` for a binary below a `/run` mount).
/// Under systemd, where the unit may forbid a new namespace, the service's
/// own (`PrivateMounts=yes`) serves.
pub fn own_mount_namespace() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        let _ = PRIVATE_MOUNTS.set(false);
        return Ok(());
    }
    use nix::mount::{mount, MsFlags};
    let made = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("failed to create a mount namespace for the workspace quotas: {e}"))
        .and_then(|()| {
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
                .map_err(|e| format!("failed to make the broker's mounts private: {e}"))
        });
    // A service's namespace: systemd sets INVOCATION_ID, and corral.service
    // has PrivateMounts=yes.
    let service = std::env::var_os("INVOCATION_ID").is_some();
    let _ = PRIVATE_MOUNTS.set(made.is_ok() || service);
    match made {
        Err(_) if service => Ok(()),
        other => other,
    }
}

fn private_namespace() -> bool {
    PRIVATE_MOUNTS.get().copied().unwrap_or(false)
}

/// Whether `path` is a mount point in this namespace.
fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines().filter_map(|l| l.split(' ').nth(4)).any(|mp| unescape_mountinfo(mp) == want)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Quota {
    pub fn new(workflow: &str, max: ByteSize, image: PathBuf, workspace: PathBuf, noexec: bool) -> Quota {
        // mountinfo has absolute paths.
        let workspace = std::path::absolute(&workspace).unwrap_or(workspace);
        Quota { workflow: workflow.to_string(), max, image, workspace, noexec, in_force: 0.into() }
    }

    /// Mounts the workflow's image on its (existing, empty) workspace,
    /// creating or growing the image first. A workspace already mounted
    /// (a reload) is kept as it is.
    pub fn attach(&self, owner: Option<(u32, u32)>) -> Result<(), QuotaError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(QuotaError::Unsupported(
                "the broker is not root, so it cannot mount the workspace image: run it as root, or remove \
                 disk_max"
                    .into(),
            ));
        }
        if !private_namespace() {
            return Err(QuotaError::Unsupported(
                "the broker has no mount namespace of its own, and will not leave mounts in the host's".into(),
            ));
        }
        host_support().map_err(QuotaError::Unsupported)?;
        let size = self.image_size()?;
        if let Some(size) = size.filter(|s| *s > self.max.0) {
            return Err(QuotaError::Shrink { max: self.max, size: ByteSize(size), image: self.image.clone() });
        }
        if is_mounted(&self.workspace) {
            self.in_force.store(size.unwrap_or(self.max.0), std::sync::atomic::Ordering::Relaxed);
            if size.is_some_and(|s| s < self.max.0) {
                tracing::warn!(
                    workflow = %self.workflow,
                    "disk_max grew to {}; the mounted image grows when the broker next starts",
                    self.max
                );
            }
            return Ok(());
        }
        match size {
            Some(s) if s < self.max.0 => self.grow()?,
            Some(_) => {}
            None => {
                let mut entries = std::fs::read_dir(&self.workspace).map_err(|source| QuotaError::Io {
                    op: "read",
                    path: self.workspace.clone(),
                    source,
                })?;
                let has_files = entries.next().is_some();
                self.create(owner)?;
                if has_files {
                    if let Err(e) = self.migrate() {
                        let _ = std::fs::remove_file(&self.image);
                        return Err(e);
                    }
                }
            }
        }
        let mut options = String::from("loop,nosuid,nodev");
        if self.noexec {
            options.push_str(",noexec");
        }
        run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                self.image.as_os_str(),
                self.workspace.as_os_str(),
            ],
            format!("mount the disk_max image of workflow {}", self.workflow),
            &[0],
        )?;
        if size.is_none() {
            // mkfs's lost+found would be the only thing in a new workspace.
            let _ = std::fs::remove_dir(self.workspace.join("lost+found"));
        }
        self.in_force.store(self.max.0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The workspace held files before it had `disk_max` (an upgrade, or a
    /// policy that gained it): copy them into the new image, then move the
    /// originals out of the tenant's reach, beside the image, for the
    /// operator to delete. Files that do not fit are refused, not cut.
    fn migrate(&self) -> Result<(), QuotaError> {
        let staging = self.image.with_extension("migrating");
        let aside = self.image.with_extension("before-disk_max");
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| QuotaError::Io { op, path, source }
        };
        let _ = std::fs::remove_dir(&staging);
        std::fs::create_dir(&staging).map_err(io("create", &staging))?;
        let what = format!("copy the files of workflow {} into its new disk_max image", self.workflow);
        let options = "loop,nosuid,nodev,noexec";
        let mount_args = [
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            self.image.as_os_str(),
            staging.as_os_str(),
        ];
        run("mount", &mount_args, what.clone(), &[0])?;
        let mut source = self.workspace.clone().into_os_string();
        source.push("/.");
        let cp_args = ["-a".as_ref(), "--one-file-system".as_ref(), source.as_os_str(), staging.as_os_str()];
        let copied = run("cp", &cp_args, what.clone(), &[0]);
        let unmounted = run("umount", &[staging.as_os_str()], what, &[0]);
        let _ = std::fs::remove_dir(&staging);
        if let Err(e) = copied {
            let used = dir_size(&self.workspace);
            return Err(if used > self.max.0 / 10 * 9 {
                QuotaError::TooFull { used: mib(used), max: self.max, workspace: self.workspace.clone() }
            } else {
                e
            });
        }
        unmounted?;
        std::fs::rename(&self.workspace, &aside).map_err(io("move aside", &self.workspace))?;
        std::fs::create_dir(&self.workspace).map_err(io("create", &self.workspace))?;
        tracing::warn!(
            workflow = %self.workflow,
            "copied the files of the workspace into its new {} image; the originals are in {} (root's): \
             delete them when done",
            self.max,
            aside.display()
        );
        Ok(())
    }

    fn image_size(&self) -> Result<Option<u64>, QuotaError> {
        match std::fs::symlink_metadata(&self.image) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Err(QuotaError::Unsupported(format!("{} is not a regular file", self.image.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(QuotaError::Io { op: "inspect", path: self.image.clone(), source }),
        }
    }

    /// Formats a new image: written beside its final name and renamed into
    /// place once complete, so an image that exists is always whole and is
    /// never formatted again.
    fn create(&self, owner: Option<(u32, u32)>) -> Result<(), QuotaError> {
        let fresh = self.image.with_extension("ext4.new");
        let _ = std::fs::remove_file(&fresh);
        let io = |op, source| QuotaError::Io { op, path: fresh.clone(), source };
        {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&fresh)
                .map_err(|e| io("create", e))?;
            f.set_len(self.max.0).map_err(|e| io("size", e))?;
        }
        let (uid, gid) = owner.unwrap_or((0, 0));
        let extended = format!("root_owner={uid}:{gid},nodiscard");
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                "-L".as_ref(),
                "corral".as_ref(),
                "-E".as_ref(),
                extended.as_ref(),
                fresh.as_os_str(),
            ],
            format!("format the disk_max image of workflow {}", self.workflow),
            &[0],
        )?;
        std::fs::rename(&fresh, &self.image).map_err(|source| QuotaError::Io {
            op: "rename into place",
            path: self.image.clone(),
            source,
        })?;
        tracing::info!(workflow = %self.workflow, image = %self.image.display(), "created a {} workspace image", self.max);
        Ok(())
    }

    /// Grows an unmounted image to `max`: check, extend the file, resize.
    fn grow(&self) -> Result<(), QuotaError> {
        let what = format!("grow the disk_max image of workflow {} to {}", self.workflow, self.max);
        // e2fsck: 0 clean, 1 errors corrected.
        run("e2fsck", &["-f".as_ref(), "-p".as_ref(), self.image.as_os_str()], what.clone(), &[0, 1])?;
        let f = std::fs::OpenOptions::new().write(true).open(&self.image).map_err(|source| QuotaError::Io {
            op: "open",
            path: self.image.clone(),
            source,
        })?;
        f.set_len(self.max.0).map_err(|source| QuotaError::Io { op: "extend", path: self.image.clone(), source })?;
        run("resize2fs", &[self.image.as_os_str()], what, &[0])?;
        tracing::info!(workflow = %self.workflow, "grew the workspace image to {}", self.max);
        Ok(())
    }

    /// Unmounts the image (the broker is stopping). Lazily when a straggler
    /// still holds it.
    pub fn detach(&self) {
        if !is_mounted(&self.workspace) {
            return;
        }
        let path = self.workspace.as_os_str();
        let what = format!("unmount the workspace of workflow {}", self.workflow);
        if let Err(e) = run("umount", &[path], what.clone(), &[0]) {
            tracing::warn!(workflow = %self.workflow, "{e}; detaching it lazily");
            if let Err(e) = run("umount", &["-l".as_ref(), path], what, &[0]) {
                tracing::error!(workflow = %self.workflow, "{e}");
            }
        }
    }

    /// The workspace's usage, while mounted.
    pub fn usage(&self) -> Option<Usage> {
        if !is_mounted(&self.workspace) {
            return None;
        }
        let s = nix::sys::statvfs::statvfs(&self.workspace).ok()?;
        let frsize = s.fragment_size();
        let blocks = s.blocks();
        Some(Usage {
            used: blocks.saturating_sub(s.blocks_free()).saturating_mul(frsize),
            size: blocks.saturating_mul(frsize),
            available: s.blocks_available().saturating_mul(frsize),
            inodes_free: s.files_free(),
        })
    }

    /// `disk_max 16M`, or what holds until a restart grows the image.
    fn limit_name(&self) -> String {
        let in_force = self.in_force.load(std::sync::atomic::Ordering::Relaxed);
        if in_force != 0 && in_force < self.max.0 {
            format!("disk_max {} (still {} until the broker restarts)", self.max, ByteSize(in_force))
        } else {
            format!("disk_max {}", self.max)
        }
    }

    /// After a call: the limit it ran into, when the workspace is full.
    pub fn limit_hit(&self) -> Option<String> {
        let u = self.usage()?;
        // ext4 keeps a little back for its own metadata; a write refused
        // with ENOSPC leaves less than this.
        let slack = (u.size / 256).max(64 * 1024);
        if u.available < slack {
            Some(format!(
                "{} of workflow {} was reached: the workspace is full ({} used); delete files to write again",
                self.limit_name(),
                self.workflow,
                mib(u.used)
            ))
        } else if u.inodes_free == 0 {
            Some(format!(
                "{} of workflow {} was reached: the workspace has no free inodes; delete files to create more",
                self.limit_name(),
                self.workflow
            ))
        } else {
            None
        }
    }

    /// Refuses a workflow without `disk_max` whose files live in an image.
    pub fn check_orphan(image: &Path) -> Result<(), QuotaError> {
        if image.exists() {
            return Err(QuotaError::Orphan { image: image.to_path_buf() });
        }
        Ok(())
    }
}

/// Bytes of the files beneath `dir` (not following symlinks, one file system).
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() && m.dev() == top.dev() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/tail\\04"), "/tail\\04");
    }
}
