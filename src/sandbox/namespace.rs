//! Kernel namespaces of a worker: what tenants must
//! not share beyond the file system.
//!
//! A root broker starts each worker as PID 1 of new PID, mount and IPC
//! namespaces ([`super::process::spawn_worker`]). The worker, still root and
//! single-threaded, calls [`enter`] before it drops its privileges:
//!
//! - as PID 1, every tool call descends from it, and when it dies, for
//!   whatever reason, the kernel kills everything left in the namespace:
//!   there are no orphans, with or without systemd. It dies with the broker
//!   (parent-death signal, armed before its exec and again after the user
//!   switch).
//! - it mounts its own `/proc` (which shows only the namespace: the worker
//!   and its call), a private `noexec` `/dev/shm`, the IPC namespace's own
//!   POSIX queue file system, and remounts `noexec` every path a tool may
//!   read or write that no `exec` rule covers, so neither the dynamic
//!   loader nor `mmap(PROT_EXEC)` can run code from there.
//! - its IPC namespace is its own (SysV shared memory, semaphores, message
//!   queues, POSIX queues), with `kernel.shm_rmid_forced` set, and is
//!   emptied after every call ([`clean_ipc`]).
//!
//! Nothing of this is a container: the root file system, the network and
//! the users are the host's.

use std::path::{Path, PathBuf};

use super::spec::SandboxSpec;
use super::sys::{self, IpcKind};
use super::SandboxError;

/// What [`enter`] set up, for the worker's report.
#[derive(Debug, Default)]
pub struct Report {
    pub namespaces: Vec<String>,
    pub noexec: Vec<PathBuf>,
    /// Where the worker's IPC namespace's POSIX queues are mounted
    /// (`/dev/mqueue`, or `/dev/shm/.mqueue` where the host has none): the
    /// worker's Landlock layer must let it list the queues there.
    pub mqueue: Option<PathBuf>,
    /// The worker's private `/dev/shm`, emptied after each call
    /// ([`clean_shm`]); `None` where it has none (never the host's).
    pub shm: Option<PathBuf>,
    pub notes: Vec<String>,
}

impl Report {
    /// Whether the broker is still there, once the parent-death signal is
    /// armed: across a PID namespace `getppid` says 0, so the broker socket
    /// (on `sock`) tells instead — it hangs up when the broker dies.
    pub fn parent_alive(&self, broker_pid: u32, sock: std::os::fd::BorrowedFd<'_>) -> bool {
        if self.namespaces.is_empty() {
            nix::unistd::getppid().as_raw() == i32::try_from(broker_pid).unwrap_or(-1)
        } else {
            !sys::hung_up(sock)
        }
    }
}

fn ns_err(what: &'static str) -> impl Fn(std::io::Error) -> SandboxError {
    move |e| SandboxError::Namespace(what, e)
}

/// Sets up the worker's namespaces (see the module docs).
///
/// INVARIANT: called single-threaded, as root, before the privilege drop.
/// When the worker is not root (a broker run by an ordinary user, which
/// has no tenants to keep apart) there are no namespaces, and the report
/// says so; a root worker that is not PID 1 of its own namespace refuses.
pub fn enter(spec: &SandboxSpec) -> Result<Report, SandboxError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(Report {
            notes: vec![
                "no namespaces: the broker is not root, so its workers share the host's /proc, IPC and mounts".into()
            ],
            ..Report::default()
        });
    }
    if std::process::id() != 1 {
        return Err(SandboxError::Namespace(
            "find the worker as PID 1 of its own PID namespace",
            std::io::Error::from_raw_os_error(libc::ESRCH),
        ));
    }
    sys::exit_on_stop_signals().map_err(ns_err("handle stop signals as PID 1"))?;
    let mut report = mounts(spec)?;
    report.namespaces = vec!["pid".into(), "mount".into(), "ipc".into()];
    Ok(report)
}

/// Whether `path` is `base` or beneath it.
fn beneath(path: &Path, base: &Path) -> bool {
    path.starts_with(base)
}

/// The mounts of the worker's namespace (see the module docs).
fn mounts(spec: &SandboxSpec) -> Result<Report, SandboxError> {
    let mut report = Report::default();
    // Nothing mounted here may propagate back to the host.
    sys::mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(ns_err("make the mount namespace private"))?;
    let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount(Some("proc"), Path::new("/proc"), Some("proc"), hidden, None)
        .map_err(ns_err("mount /proc for the PID namespace"))?;
    // Per IPC namespace: a segment nobody has attached is removed at once.
    std::fs::write("/proc/sys/kernel/shm_rmid_forced", "1").map_err(ns_err("set kernel.shm_rmid_forced"))?;
    // Without a cgroup, RLIMIT_DATA does not count shared mappings: SysV
    // shared memory of the whole namespace is held to memory_max instead.
    if let Some(max) = spec.tool.data_max {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096);
        let pages = max / u64::try_from(page).unwrap_or(4096).max(1);
        std::fs::write("/proc/sys/kernel/shmmax", max.to_string()).map_err(ns_err("set kernel.shmmax"))?;
        std::fs::write("/proc/sys/kernel/shmall", pages.to_string()).map_err(ns_err("set kernel.shmall"))?;
    }
    // The sysctls of the new /proc stay read-only, as the host's are under
    // ProtectKernelTunables=.
    let sysctl = Path::new("/proc/sys");
    sys::mount(Some("/proc/sys"), sysctl, None, libc::MS_BIND | libc::MS_REC, None)
        .and_then(|()| sys::mount_setattr(sysctl, sys::MOUNT_ATTR_RDONLY, 0))
        .map_err(ns_err("make /proc/sys read-only"))?;

    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let size = spec.tool.data_max.map(|b| format!(",size={b}")).unwrap_or_default();
        sys::mount(Some("shm"), shm, Some("tmpfs"), hidden, Some(&format!("mode=1777{size}")))
            .map_err(ns_err("mount a private /dev/shm"))?;
        report.noexec.push(shm.to_path_buf());
        report.shm = Some(shm.to_path_buf());
    } else {
        report.notes.push("/dev/shm does not exist here: POSIX shared memory has no file system to live in".into());
    }
    // The IPC namespace's POSIX queues, listed after each call to remove
    // them: at /dev/mqueue, or inside the private /dev/shm where the host
    // has none (never a directory created on the host's /dev).
    let mq = if Path::new("/dev/mqueue").is_dir() {
        Some(PathBuf::from("/dev/mqueue"))
    } else if report.noexec.iter().any(|p| p == shm) {
        let dir = shm.join(".mqueue");
        std::fs::create_dir(&dir).map_err(ns_err("create a mount point for the POSIX queues"))?;
        Some(dir)
    } else {
        None
    };
    match mq {
        Some(dir) => {
            sys::mount(Some("mqueue"), &dir, Some("mqueue"), hidden, None)
                .map_err(ns_err("mount the IPC namespace's POSIX queues"))?;
            report.mqueue = Some(dir);
        }
        None => report.notes.push(
            "neither /dev/mqueue nor /dev/shm exists here: POSIX message queues a call leaves are removed only \
             when its worker ends"
                .into(),
        ),
    }
    noexec(spec, &mut report)?;
    Ok(report)
}

/// Remounts `noexec` every path a tool may read or write that no `exec` rule
/// covers, then gives exec back to the `exec` paths beneath them.
fn noexec(spec: &SandboxSpec, report: &mut Report) -> Result<(), SandboxError> {
    let real = |paths: &[PathBuf]| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = paths.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
        v.sort();
        v.dedup();
        v
    };
    let exec = real(&spec.exec);
    let mut visible = real(&spec.read);
    visible.extend(real(&spec.write));
    visible.sort();
    visible.dedup();
    // Already noexec as mounted here: /proc (ours), devices are not code.
    let skip = |p: &Path| beneath(p, Path::new("/proc")) || beneath(p, Path::new("/dev"));
    // Was each exec path executable before we touched anything?
    let exec_before: Vec<(PathBuf, bool)> = exec.iter().map(|e| (e.clone(), !sys::is_noexec(e))).collect();
    let mut done: Vec<PathBuf> = Vec::new();
    for p in &visible {
        if skip(p) || exec.iter().any(|e| beneath(p, e)) || done.iter().any(|d| beneath(p, d)) {
            continue;
        }
        bind_with(p, sys::MOUNT_ATTR_NOEXEC | sys::MOUNT_ATTR_NOSUID, 0)?;
        done.push(p.clone());
    }
    for (e, was_exec) in &exec_before {
        if *was_exec && done.iter().any(|d| beneath(e, d)) {
            bind_with(e, 0, sys::MOUNT_ATTR_NOEXEC)?;
        }
    }
    report.noexec.extend(done);
    Ok(())
}

/// Bind-mounts `path` onto itself (with what is mounted below it) and sets
/// and clears mount attributes on the new mounts only.
fn bind_with(path: &Path, set: u64, clear: u64) -> Result<(), SandboxError> {
    let src = path.to_str().ok_or(SandboxError::Namespace(
        "bind a path that is not UTF-8",
        std::io::Error::from_raw_os_error(libc::EINVAL),
    ))?;
    sys::mount(Some(src), path, None, libc::MS_BIND | libc::MS_REC, None)
        .and_then(|()| sys::mount_setattr(path, set, clear))
        .map_err(|e| SandboxError::NoExec(path.to_path_buf(), e))
}

/// The /proc/sysvipc files and the kind of object each lists.
const IPC_FILES: [(&str, IpcKind); 3] = [("shm", IpcKind::Shm), ("msg", IpcKind::Msg), ("sem", IpcKind::Sem)];

/// `MQUEUE_MAGIC` of `linux/magic.h` (not in the libc crate).
const MQUEUE_MAGIC: libc::c_long = 0x1980_0202;

/// A directory of the worker's own that is emptied after every call: its
/// private `/dev/shm` or its POSIX queue mount.
///
/// Both file systems count a directory's entries in its size (tmpfs and
/// mqueue add 20 bytes an entry; a rename, a link or a whiteout into it
/// too). So while the size is the one the last complete emptying left, no
/// entry was added since, and the listing (an open, reads and a close, each
/// checked by Landlock) is spared: one `stat` a call instead. The worker
/// alone writes there between calls, and every process of a call is dead
/// when it is emptied. On any other file system, and after an emptying
/// that could not remove everything, the directory is listed every time.
#[derive(Debug)]
pub struct Emptied {
    path: PathBuf,
    counts_entries: bool,
    /// The size right after the last emptying that removed everything.
    clean_size: std::cell::Cell<Option<u64>>,
}

impl Emptied {
    pub fn new(path: PathBuf) -> Emptied {
        let counts_entries = nix::sys::statfs::statfs(&path).is_ok_and(|fs| {
            let t = fs.filesystem_type();
            t == nix::sys::statfs::TMPFS_MAGIC || libc::c_long::from(t.0) == MQUEUE_MAGIC
        });
        Emptied { path, counts_entries, clean_size: std::cell::Cell::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> Option<u64> {
        std::fs::symlink_metadata(&self.path).ok().map(|m| m.len())
    }

    /// Whether something may have been added since the last complete
    /// emptying (never one on a file system that does not count entries).
    fn needs_listing(&self) -> bool {
        self.clean_size.get().is_none_or(|clean| self.size() != Some(clean))
    }

    /// Empties the directory with `remove`, which removes one entry (true),
    /// leaves it (false), or says why it could not, unless nothing was
    /// added since the last complete emptying. Returns how many entries
    /// were removed, and the ones that could not be.
    fn sweep(&self, mut remove: impl FnMut(&std::fs::DirEntry) -> Result<bool, String>) -> (usize, Vec<String>) {
        let (mut removed, mut failed) = (0, Vec::new());
        if !self.needs_listing() {
            return (removed, failed);
        }
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            self.clean_size.set(None);
            return (removed, failed);
        };
        for entry in entries.flatten() {
            match remove(&entry) {
                Ok(gone) => removed += usize::from(gone),
                Err(e) => failed.push(e),
            }
        }
        // The size a complete emptying left: the mark of "nothing added".
        let complete = failed.is_empty() && self.counts_entries;
        self.clean_size.set(if complete { self.size() } else { None });
        (removed, failed)
    }
}

/// Empties the worker's IPC namespace after a call: every System V shared
/// memory segment, message queue and semaphore set, and every POSIX
/// message queue. Returns how many objects were removed, and the ones
/// that could not be.
pub fn clean_ipc(mqueue: Option<&Emptied>) -> (usize, Vec<String>) {
    let mut removed = 0;
    let mut failed = Vec::new();
    // Most calls leave no System V object: three counting calls then spare
    // reading the three /proc/sysvipc files.
    let sysv = if sys::ipc_objects() == Some(0) { &[][..] } else { &IPC_FILES[..] };
    for &(file, kind) in sysv {
        let Ok(text) = std::fs::read_to_string(format!("/proc/sysvipc/{file}")) else {
            continue;
        };
        // "key id perms …", one header line.
        for id in text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse::<libc::c_int>().ok()) {
            match sys::ipc_remove(kind, id) {
                Ok(()) => removed += 1,
                Err(e) => failed.push(format!("{file} {id}: {e}")),
            }
        }
    }
    if let Some(dir) = mqueue {
        let (gone, left) = dir.sweep(|entry| {
            let Ok(name) = entry.file_name().into_string() else { return Ok(false) };
            sys::mq_unlink(&name).map(|()| true).map_err(|e| format!("mqueue /{name}: {e}"))
        });
        removed += gone;
        failed.extend(left);
    }
    (removed, failed)
}

/// Empties the worker's private `/dev/shm` after a call (all but `keep`, the
/// POSIX queue mount inside it where the host has no `/dev/mqueue`): POSIX
/// shared memory, semaphores and files a call left there do not reach the
/// next call. Every process of the call is dead by then. Returns how many
/// entries were removed, and the ones that could not be.
pub fn clean_shm(dir: &Emptied, keep: Option<&Path>) -> (usize, Vec<String>) {
    dir.sweep(|entry| {
        let path = entry.path();
        if keep.is_some_and(|k| k == path) {
            return Ok(false);
        }
        remove_tree(&path).map(|()| true).map_err(|e| format!("{}: {e}", path.display()))
    })
}

/// Removes `path` and what is beneath it without following symlinks,
/// giving back the owner's rights to directories a call closed (`chmod 0`).
fn remove_tree(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(path)?.flatten() {
        remove_tree(&entry.path())?;
    }
    std::fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(e: &Emptied) -> bool {
        e.counts_entries
    }

    #[test]
    fn an_emptied_directory_is_listed_again_as_soon_as_anything_is_added() {
        let shm = Path::new("/dev/shm");
        let root = shm.join(format!("corral-emptied-{}", std::process::id()));
        let (dir, outside) = (root.join("dir"), root.join("outside"));
        let _ = remove_tree(&root);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir(dir.join(".keep")).unwrap();
        let e = Emptied::new(dir.clone());
        assert!(counts(&e), "/dev/shm is not a tmpfs here: the test needs one");
        let keep = Some(dir.join(".keep"));
        let clean = || clean_shm(&e, keep.as_deref());

        // Never emptied: listed.
        std::fs::write(dir.join("a"), "x").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b"), "x").unwrap();
        assert!(e.needs_listing());
        assert_eq!(clean(), (2, Vec::<String>::new()));
        // Emptied, nothing added: the listing is spared, and the kept entry stays.
        assert!(!e.needs_listing());
        assert_eq!(clean(), (0, Vec::<String>::new()));
        assert!(dir.join(".keep").is_dir());

        // Each way in is seen: a new file, a rename from outside, a hard link,
        // a directory.
        let added: [&dyn Fn(); 4] = [
            &|| std::fs::write(dir.join("new"), "x").unwrap(),
            &|| {
                std::fs::write(outside.join("moved"), "x").unwrap();
                std::fs::rename(outside.join("moved"), dir.join("moved")).unwrap();
            },
            &|| {
                std::fs::write(outside.join("linked"), "x").unwrap();
                std::fs::hard_link(outside.join("linked"), dir.join("linked")).unwrap();
            },
            &|| std::fs::create_dir(dir.join("d")).unwrap(),
        ];
        for (i, add) in added.iter().enumerate() {
            add();
            assert!(e.needs_listing(), "way in {i} was not seen");
            assert_eq!(clean(), (1, Vec::<String>::new()), "way in {i}");
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "way in {i}: only the kept entry is left");
            assert!(!e.needs_listing());
        }
        remove_tree(&root).unwrap();

        // A file system that does not count entries in a directory's size
        // is listed every time.
        let here = Emptied::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src"));
        if !counts(&here) {
            assert_eq!(here.sweep(|_| Ok(false)), (0, Vec::<String>::new()));
            assert!(here.needs_listing());
        }
    }
}
