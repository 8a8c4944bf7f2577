//! The seccomp filter every worker installs on itself (and so on every tool
//! it starts): a deny list of the kernel interfaces that untrusted tool calls
//! have no business with, each answering `EPERM`.
//!
//! Two filters are stacked. The first (built with `seccompiler`) kills a
//! process that makes a syscall of a foreign architecture (32-bit `int 0x80`)
//! and refuses the listed calls. The second, hand-written, refuses `x32`
//! syscall numbers and makes `clone3` fail with `ENOSYS`, because its flags
//! live in memory a filter cannot read: libc then falls back to `clone`, whose
//! namespace flags the first filter checks.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::SandboxError;

/// Syscalls refused outright.
const DENIED: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("syslog", libc::SYS_syslog),
    ("quotactl", libc::SYS_quotactl),
    // A memfd's pages can be mapped executable whatever its seals (the
    // dynamic loader runs `/proc/self/fd/N`), and execveat runs it on
    // kernels without vm.memfd_noexec: a route around the exec rules.
    ("memfd_create", libc::SYS_memfd_create),
];

/// Namespace flags refused in `clone(2)`.
const CLONE_NS_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

/// The syscall names this filter refuses, for reports and docs.
pub fn denied_names() -> Vec<&'static str> {
    let mut names: Vec<_> = DENIED.iter().map(|(n, _)| *n).collect();
    names.extend(["clone(namespace flags)", "clone3(ENOSYS)", "x32 syscalls", "socket(non-unix)"]);
    names
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(seccomp_err)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(seccomp_err)
}

fn seccomp_err(e: seccompiler::BackendError) -> SandboxError {
    SandboxError::Seccomp(e.to_string())
}

fn as_u64(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// `socket(2)` rules: which calls to refuse. With `allow_tcp`, only TCP over
/// IPv4/IPv6 (plain or `IPPROTO_TCP`) joins Unix sockets; Landlock then
/// limits its ports. UDP, raw, SCTP and every other family stay refused,
/// because Landlock only knows TCP.
fn socket_rules(allow_tcp: bool) -> Result<Vec<SeccompRule>, SandboxError> {
    let unix = as_u64(libc::AF_UNIX);
    if !allow_tcp {
        return Ok(vec![rule(vec![cond(0, SeccompCmpOp::Ne, unix)?])?]);
    }
    let (inet, inet6) = (as_u64(libc::AF_INET), as_u64(libc::AF_INET6));
    let mut rules = vec![rule(vec![
        cond(0, SeccompCmpOp::Ne, unix)?,
        cond(0, SeccompCmpOp::Ne, inet)?,
        cond(0, SeccompCmpOp::Ne, inet6)?,
    ])?];
    for family in [inet, inet6] {
        // any socket type but SOCK_STREAM (the low 4 bits; the rest are flags)
        for ty in (0u64..16).filter(|&t| t != as_u64(libc::SOCK_STREAM)) {
            rules.push(rule(vec![cond(0, SeccompCmpOp::Eq, family)?, cond(1, SeccompCmpOp::MaskedEq(0xf), ty)?])?);
        }
        rules.push(rule(vec![
            cond(0, SeccompCmpOp::Eq, family)?,
            cond(2, SeccompCmpOp::Ne, 0)?,
            cond(2, SeccompCmpOp::Ne, as_u64(libc::IPPROTO_TCP))?,
        ])?);
    }
    Ok(rules)
}

fn deny_filter(allow_tcp: bool) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    let clone_rules = CLONE_NS_FLAGS
        .iter()
        .map(|&f| rule(vec![cond(0, SeccompCmpOp::MaskedEq(as_u64(f)), as_u64(f))?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    rules.insert(libc::SYS_socket, socket_rules(allow_tcp)?);
    deny_with_eperm(rules)
}

/// Compiles rules for this architecture: what they match fails with EPERM,
/// everything else is allowed.
fn deny_with_eperm(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SandboxError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SandboxError::Seccomp(format!("unsupported architecture {}", std::env::consts::ARCH)))?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM.unsigned_abs()), arch)
            .map_err(seccomp_err)?;
    filter.try_into().map_err(seccomp_err)
}

/// x32 numbers (bit 30 set) → EPERM; clone3 → ENOSYS; the rest allowed.
fn x32_and_clone3_filter() -> BpfProgram {
    // Classic BPF opcodes (linux/bpf_common.h).
    const LD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const X32_BIT: u32 = 0x4000_0000;
    let errno = |e: libc::c_int| libc::SECCOMP_RET_ERRNO | (e.unsigned_abs() & libc::SECCOMP_RET_DATA);
    let clone3 = u32::try_from(libc::SYS_clone3).unwrap_or(u32::MAX);
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        ins(LD_NR, 0, 0, 0), // seccomp_data.nr
        ins(JGE, 0, 1, X32_BIT),
        ins(RET, 0, 0, errno(libc::EPERM)),
        ins(JEQ, 0, 1, clone3),
        ins(RET, 0, 0, errno(libc::ENOSYS)),
        ins(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The guard each tool call gets on a kernel whose Landlock cannot scope
/// signals and abstract Unix sockets (ABI < 6), so that those promises are
/// held by seccomp instead: no Unix sockets at all (abstract ones cannot be
/// told apart, pathname ones would reach whatever their mode allows), and no
/// signal to the tool's own worker, to every process of the user (`kill -1`),
/// or through a pidfd. Other processes of the same uid belong to the same
/// workflow: the broker refuses, on such kernels, workflows that share a user.
pub fn tool_guard(worker_pid: u32) -> Result<BpfProgram, SandboxError> {
    let pid = u64::from(worker_pid);
    let neg_pid = u64::from(worker_pid.wrapping_neg());
    let all = u64::from(u32::MAX); // -1 as a 32-bit int
    let on_arg0 = |values: &[u64]| -> Result<Vec<SeccompRule>, SandboxError> {
        values.iter().map(|&v| rule(vec![cond(0, SeccompCmpOp::Eq, v)?])).collect()
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_socket, on_arg0(&[as_u64(libc::AF_UNIX)])?);
    rules.insert(libc::SYS_kill, on_arg0(&[pid, neg_pid, all])?);
    for nr in [
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_pidfd_open,
    ] {
        rules.insert(nr, on_arg0(&[pid])?);
    }
    rules.insert(libc::SYS_pidfd_send_signal, Vec::new());
    deny_with_eperm(rules)
}

/// Installs a prepared program on the calling thread.
pub fn apply(program: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(program).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// Installs both filters on the calling thread; they are inherited by every
/// child and cannot be removed.
pub fn install(allow_tcp: bool) -> Result<(), SandboxError> {
    let deny = deny_filter(allow_tcp)?;
    let guard = x32_and_clone3_filter();
    seccompiler::apply_filter(&guard).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    seccompiler::apply_filter(&deny).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child under `program` and returns its exit
    /// code: the filter can never be removed, so it must not touch the test
    /// harness itself.
    fn in_child(program: &BpfProgram, probe: fn() -> i32) -> i32 {
        // SAFETY: the child only makes system calls (no allocation, no locks)
        // and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = if apply(program).is_ok() { probe() } else { 99 };
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("child ended unexpectedly: {other:?}"),
            },
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn tool_guard_refuses_unix_sockets_and_signals_to_the_worker_only() {
        // The "worker" is this test process: the child's parent.
        let program = tool_guard(std::process::id()).unwrap();
        let code = in_child(&program, || {
            // SAFETY: plain syscalls with integer arguments or pointers to
            // live locals.
            unsafe {
                let mut bits = 0;
                // refused: a Unix socket, a signal to the worker, kill -1
                if libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) < 0 && errno() == libc::EPERM {
                    bits |= 1;
                }
                if libc::kill(libc::getppid(), 0) < 0 && errno() == libc::EPERM {
                    bits |= 2;
                }
                if libc::kill(-1, 0) < 0 && errno() == libc::EPERM {
                    bits |= 4;
                }
                // the neighbours: a socket pair, a signal to itself, an inet socket
                let mut pair = [0; 2];
                if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) == 0 {
                    bits |= 8;
                }
                if libc::kill(libc::getpid(), 0) == 0 {
                    bits |= 16;
                }
                if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 {
                    bits |= 32;
                }
                bits
            }
        });
        assert_eq!(code, 63, "bits: 1 unix refused, 2 worker signal refused, 4 kill -1 refused, 8 socketpair ok, 16 self signal ok, 32 inet ok");
    }
}
