//! The raw system calls corral needs that `nix`, `caps` and `landlock` do
//! not wrap. Every `unsafe` block of the crate lives in this module or in
//! [`super::process`], each with its justification.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_int(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `landlock_create_ruleset(NULL, 0, VERSION)`: the kernel's Landlock ABI, or
/// why there is none (ENOSYS/EOPNOTSUPP: not in this kernel; EPERM: a seccomp
/// filter around us refuses it).
fn landlock_version() -> io::Result<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attribute pointer, size 0 and the VERSION flag the
    // kernel reads no memory and only returns a number (or -1 and errno).
    let ret = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    })?;
    Ok(u32::try_from(ret).unwrap_or(0))
}

/// The running kernel's Landlock ABI version, 0 when Landlock is absent or
/// disabled. Probed with the syscall itself: `/sys/kernel/security/lsm` is
/// not always there even when Landlock works.
pub fn landlock_abi() -> u32 {
    landlock_version().unwrap_or(0)
}

/// Whether the Landlock syscalls are refused with EPERM, i.e. by a seccomp
/// filter around us (a service's `SystemCallFilter=`), not by the kernel.
pub fn landlock_blocked() -> bool {
    matches!(landlock_version(), Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

/// Whether seccomp filters can be installed (`Seccomp:` field support).
pub fn seccomp_available() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
    let ret = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    ret >= 0
}

/// Closes every descriptor from `first` upwards.
pub fn close_fds_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes two integers and a flag; closing descriptors
    // we do not use is what we want (the caller owns no OwnedFd above `first`
    // that it will use afterwards).
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) }).map(drop)
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; on success the kernel returns a new
    // descriptor that nothing else owns, so wrapping it in OwnedFd is sound.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: see above: fd is fresh and owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resource usage of one reaped child.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rusage {
    pub user_us: u64,
    pub system_us: u64,
    pub max_rss_kib: u64,
}

fn micros(tv: libc::timeval) -> u64 {
    let s = u64::try_from(tv.tv_sec).unwrap_or(0);
    let us = u64::try_from(tv.tv_usec).unwrap_or(0);
    s * 1_000_000 + us
}

/// `wait4(2)` on one child, blocking; returns the raw wait status and usage.
pub fn wait4(pid: libc::pid_t) -> io::Result<(libc::c_int, Rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are to live locals of the right types.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        match check_int(ret) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let usage = Rusage {
        user_us: micros(ru.ru_utime),
        system_us: micros(ru.ru_stime),
        max_rss_kib: u64::try_from(ru.ru_maxrss).unwrap_or(0),
    };
    Ok((status, usage))
}

/// Whether capability `cap` is in the bounding set; `None` past the last
/// capability the kernel knows.
pub fn capbset_read(cap: u32) -> Option<bool> {
    // SAFETY: PR_CAPBSET_READ takes an integer and returns 0, 1 or -1.
    let ret = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
    (ret >= 0).then_some(ret == 1)
}

/// Drops `cap` from the bounding set (needs CAP_SETPCAP).
pub fn capbset_drop(cap: u32) -> io::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes an integer.
    check_int(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) }).map(drop)
}

/// Clears the ambient capability set.
pub fn ambient_clear() -> io::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    check_int(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) })
        .map(drop)
}

/// Takes a listening Unix stream socket that systemd passed (socket
/// activation), after checking that it is one.
pub fn listener_from_fd(fd: RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    let int_opt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut val: libc::c_int = 0;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
        // SAFETY: getsockopt writes at most `len` bytes into `val`, a live
        // local; it only inspects the descriptor.
        check_int(unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut val).cast(), &mut len) })?;
        Ok(val)
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX
        || int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM
        || int_opt(libc::SO_ACCEPTCONN)? != 1
    {
        return Err(io::Error::other(format!(
            "descriptor {fd} from systemd is not a listening Unix stream socket: check ListenStream= in corral.socket"
        )));
    }
    // SAFETY: systemd passed this descriptor to this process for it alone
    // (LISTEN_PID matched); it is a listening Unix stream socket (checked).
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// Reads `PR_GET_NO_NEW_PRIVS`.
pub fn no_new_privs() -> bool {
    // SAFETY: no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// Reads `PR_GET_DUMPABLE`.
pub fn dumpable() -> bool {
    // SAFETY: no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// Whether the peer of socket `fd` has hung up (closed its end).
pub fn hung_up(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [PollFd::new(fd, rdhup)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => {
            fds[0].revents().is_some_and(|r| r.intersects(rdhup | PollFlags::POLLHUP | PollFlags::POLLERR))
        }
        _ => false,
    }
}

/// Whether socket `fd` has a byte to read or its peer's end of file, without
/// reading it or waiting: `Err(WouldBlock)` when it has neither.
pub fn peek(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
        .map(drop)
        .map_err(io::Error::from)
}

fn cstring(s: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cpath(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `mount(2)`. `source`, `fstype` and `data` may be absent.
pub fn mount(
    source: Option<&str>,
    target: &std::path::Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    let target = cpath(target)?;
    let ptr = |c: &Option<std::ffi::CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that lives
    // until the call returns; mount reads them and keeps nothing.
    check_int(unsafe {
        libc::mount(ptr(&source), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast::<libc::c_void>())
    })
    .map(drop)
}

/// `struct mount_attr` of `mount_setattr(2)` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// `mount_setattr(2)` on the mount at `path` and every mount below it:
/// sets the `set` attributes and clears the `clear` ones, leaving the rest
/// (read-only, nodev, …) as they are. Linux 5.12+.
pub fn mount_setattr(path: &std::path::Path, set: u64, clear: u64) -> io::Result<()> {
    let path = cpath(path)?;
    let attr = MountAttr { attr_set: set, attr_clr: clear, propagation: 0, userns_fd: 0 };
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    // SAFETY: path is a NUL-terminated string and attr a live struct of the
    // size passed; the kernel only reads both.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Whether the file system at `path` is mounted `noexec` (or cannot be
/// asked).
pub fn is_noexec(path: &std::path::Path) -> bool {
    nix::sys::statvfs::statvfs(path).map_or(true, |s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
}

/// Moves the calling process to `SCHED_IDLE`: it runs only when no other
/// runnable task wants the CPU.
pub fn sched_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the pointer is to a live local of the right type.
    check_int(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }).map(drop)
}

/// Sets the calling process's nice value.
pub fn set_nice(nice: libc::c_int) -> io::Result<()> {
    // SAFETY: setpriority takes integers only.
    check_int(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) }).map(drop)
}

/// Which System V IPC object a [`ipc_remove`] removes.
#[derive(Debug, Clone, Copy)]
pub enum IpcKind {
    Shm,
    Msg,
    Sem,
}

/// Removes one System V IPC object of the calling process's IPC namespace.
pub fn ipc_remove(kind: IpcKind, id: libc::c_int) -> io::Result<()> {
    // SAFETY: IPC_RMID ignores the buffer argument, which is NULL; the ids
    // are plain integers.
    let ret = unsafe {
        match kind {
            IpcKind::Shm => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            IpcKind::Msg => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            IpcKind::Sem => libc::semctl(id, 0, libc::IPC_RMID),
        }
    };
    check_int(ret).map(drop)
}

/// How many System V IPC objects (shared memory segments, message queues,
/// semaphore sets) exist in the calling process's IPC namespace: three
/// `*_INFO` calls, in place of reading and parsing the three
/// `/proc/sysvipc` files after every call. `None` if one is refused.
pub fn ipc_objects() -> Option<usize> {
    // SHM_INFO from <linux/shm.h>; the libc crate does not export it.
    const SHM_INFO: libc::c_int = 14;
    // Large and aligned enough for struct shm_info (48 bytes), struct
    // msginfo (32) and struct seminfo (40), which the kernel writes.
    let mut buf = [0u64; 16];
    let ints = |b: &[u64; 16]| -> [libc::c_int; 8] {
        let mut out = [0; 8];
        for (i, v) in out.iter_mut().enumerate() {
            let word = b[i / 2].to_ne_bytes();
            let half = if i % 2 == 0 { &word[..4] } else { &word[4..] };
            *v = libc::c_int::from_ne_bytes([half[0], half[1], half[2], half[3]]);
        }
        out
    };
    let mut total = 0usize;
    // SAFETY: SHM_INFO writes a struct shm_info (48 bytes) to the buffer,
    // which holds 128 writable bytes and lives across the call.
    let ret = unsafe { libc::shmctl(0, SHM_INFO, buf.as_mut_ptr().cast()) };
    if ret < 0 {
        return None;
    }
    total += usize::try_from(ints(&buf)[0]).ok()?; // used_ids
    buf = [0; 16];
    // SAFETY: MSG_INFO writes a struct msginfo (32 bytes) to the buffer, as above.
    let ret = unsafe { libc::msgctl(0, libc::MSG_INFO, buf.as_mut_ptr().cast()) };
    if ret < 0 {
        return None;
    }
    total += usize::try_from(ints(&buf)[0]).ok()?; // msgpool: queues in use
    buf = [0; 16];
    // SAFETY: SEM_INFO writes a struct seminfo (40 bytes) through the
    // union semun pointer argument, to the buffer, as above.
    let ret = unsafe { libc::semctl(0, 0, libc::SEM_INFO, buf.as_mut_ptr()) };
    if ret < 0 {
        return None;
    }
    total += usize::try_from(ints(&buf)[7]).ok()?; // semusz: sets in use
    Some(total)
}

/// `mq_unlink(3)` of `/name`.
pub fn mq_unlink(name: &str) -> io::Result<()> {
    let name = cstring(&format!("/{name}"))?;
    // SAFETY: name is a NUL-terminated string that lives until the call returns.
    check_int(unsafe { libc::mq_unlink(name.as_ptr()) }).map(drop)
}

/// Signals an operator (or systemd, stopping a scope) sends to end a
/// process. The kernel drops them, from outside as from inside, for PID 1
/// of a PID namespace that has no handler: a worker would ignore
/// `kill WORKER`. [`exit_on_stop_signals`] makes it end on them.
pub const STOP_SIGNALS: [libc::c_int; 7] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGABRT, libc::SIGUSR1, libc::SIGUSR2];

/// The exit code of a worker that ended on stop signal `sig` (the shell's
/// convention): 128 + `sig`.
pub const STOP_EXIT_BASE: i32 = 128;

extern "C" fn exit_on_signal(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; it ends the process at once (the
    // kernel then ends the rest of its PID namespace).
    unsafe { libc::_exit(STOP_EXIT_BASE + sig) }
}

/// For PID 1 of a PID namespace: exit with code 128 + N on each of
/// [`STOP_SIGNALS`], as a process killed by it would be reported by a shell.
/// Crashes the kernel raises itself (SIGSEGV, SIGBUS, …) kill PID 1 anyway.
/// Tool children inherit the handlers only until their exec resets them.
pub fn exit_on_stop_signals() -> io::Result<()> {
    for sig in STOP_SIGNALS {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask
        // is a valid argument; the handler only calls _exit.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = exit_on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ipc_objects` counts each kind, so an empty count may skip the
    /// /proc/sysvipc reads: in a thread of its own IPC namespace (needs
    /// root, as the suites run), nothing else can add or remove objects.
    #[test]
    fn ipc_objects_counts_each_kind_of_system_v_object() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)
                .unwrap_or_else(|e| panic!("unshare(CLONE_NEWIPC): {e}: run the unit tests as root"));
            assert_eq!(ipc_objects(), Some(0));
            // SAFETY: semget, msgget and shmget take plain integers; each
            // makes a private object of this thread's IPC namespace.
            let sem = unsafe { libc::semget(libc::IPC_PRIVATE, 1, 0o600) };
            assert!(sem >= 0, "semget: {}", io::Error::last_os_error());
            assert_eq!(ipc_objects(), Some(1), "a semaphore set");
            // SAFETY: as above.
            let msg = unsafe { libc::msgget(libc::IPC_PRIVATE, 0o600) };
            assert!(msg >= 0, "msgget: {}", io::Error::last_os_error());
            assert_eq!(ipc_objects(), Some(2), "and a message queue");
            // SAFETY: as above.
            let shm = unsafe { libc::shmget(libc::IPC_PRIVATE, 4096, 0o600) };
            assert!(shm >= 0, "shmget: {}", io::Error::last_os_error());
            assert_eq!(ipc_objects(), Some(3), "and a shared memory segment");
            ipc_remove(IpcKind::Sem, sem).expect("remove the semaphore set");
            ipc_remove(IpcKind::Msg, msg).expect("remove the queue");
            ipc_remove(IpcKind::Shm, shm).expect("remove the segment");
            assert_eq!(ipc_objects(), Some(0));
        })
        .join()
        .expect("the IPC namespace thread");
    }
}
