//! Landlock rulesets: one layer for the worker, a further one per tool call.
//!
//! Every right is asked for by the running kernel's ABI, so nothing is
//! silently dropped by the crate's compatibility logic: what the ABI cannot
//! express is decided here, in the open, and written into the report.

use std::path::{Path, PathBuf};

use landlock::{
    make_bitflags, Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::spec::Requirement;
use super::SandboxError;

/// The first ABI that restricts TCP bind/connect by port.
pub const ABI_TCP: u32 = 4;
/// The first ABI that scopes signals and abstract Unix sockets.
pub const ABI_SCOPES: u32 = 6;

/// The file and network rules of one layer.
pub struct Layer<'a> {
    pub read: &'a [PathBuf],
    pub write: &'a [PathBuf],
    pub exec: &'a [PathBuf],
    /// Read-only paths this layer needs beyond the policy (the worker reads
    /// `/proc` to find and kill a tool's descendants).
    pub extra_read: &'a [&'a Path],
    pub tcp_connect: &'a [u16],
    pub tcp_bind: &'a [u16],
}

/// A ruleset built and ready to enforce, with what it will and will not do,
/// and — for a tool call on a kernel without Landlock scopes — the seccomp
/// guard that stands in for them.
/// A tool's layer, ready for its child: see [`Prepared::into_child_layer`].
pub struct ChildLayer {
    pub(super) ruleset: Option<std::os::fd::OwnedFd>,
    pub(super) guard: Option<seccompiler::BpfProgram>,
}

pub struct Prepared {
    ruleset: Option<RulesetCreated>,
    pub report: Report,
    pub guard: Option<seccompiler::BpfProgram>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub abi: u32,
    pub status: String,
    pub fs: bool,
    pub tcp: bool,
    pub scopes: bool,
    pub notes: Vec<String>,
}

/// Builds a layer for a kernel of Landlock ABI `abi_num`. Path descriptors
/// are opened here, so a path that does not exist is noticed (and reported)
/// now, not skipped in silence.
pub fn prepare(layer: &Layer<'_>, abi_num: u32, requirement: Requirement) -> Result<Prepared, SandboxError> {
    let mut report = Report { abi: abi_num, ..Report::default() };
    if abi_num == 0 {
        if super::sys::landlock_blocked() {
            // Never a silent downgrade: a filter hiding Landlock is a
            // misconfiguration, whatever the policy's requirement.
            return Err(SandboxError::LandlockBlocked);
        }
        if requirement == Requirement::Required {
            return Err(SandboxError::LandlockUnavailable);
        }
        report.status = "not enforced".into();
        report.notes.push(
            "Landlock is not available on this kernel (needs Linux 5.13+ with landlock in the lsm= list): \
             file access is limited only by the worker's uid"
                .into(),
        );
        return Ok(Prepared { ruleset: None, report, guard: None });
    }
    let abi = ABI::from(i32::try_from(abi_num).unwrap_or(i32::MAX));
    let wants_tcp = !layer.tcp_connect.is_empty() || !layer.tcp_bind.is_empty();
    if wants_tcp && abi_num < ABI_TCP {
        if requirement == Requirement::Required {
            return Err(SandboxError::TcpNeedsAbi(abi_num));
        }
        report.notes.push(format!(
            "tcp_connect/tcp_bind need Landlock ABI {ABI_TCP} (Linux 6.7), the kernel has ABI {abi_num}: \
             all network access is refused instead (seccomp)"
        ));
    }

    let map = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi)).map_err(map)?;
    if abi_num >= ABI_TCP {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi)).map_err(map)?;
        report.tcp = true;
    }
    if abi_num >= ABI_SCOPES {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(map)?;
        report.scopes = true;
    } else {
        report.notes.push(format!(
            "signals and abstract Unix sockets are not scoped by Landlock (needs ABI {ABI_SCOPES}, Linux 6.12; \
             the kernel has ABI {abi_num}): seccomp refuses tools every Unix socket and any signal to their \
             worker or to all processes, and the broker refuses tenants that share a user"
        ));
    }
    let mut created = ruleset.create().map_err(map)?;

    let read: BitFlags<AccessFs> = make_bitflags!(AccessFs::{ReadFile | ReadDir});
    let exec = read | AccessFs::Execute;
    let write = AccessFs::from_all(abi) & !AccessFs::Execute;
    let dev_null = [PathBuf::from("/dev/null")];
    let extra: Vec<PathBuf> = layer.extra_read.iter().map(|p| p.to_path_buf()).collect();
    let groups: [(&[PathBuf], BitFlags<AccessFs>); 5] = [
        (layer.read, read),
        (&extra, read),
        (layer.exec, exec),
        (layer.write, write),
        (&dev_null, make_bitflags!(AccessFs::{ReadFile | WriteFile})),
    ];
    for (paths, access) in groups {
        for path in paths {
            let fd = match PathFd::new(path) {
                Ok(fd) => fd,
                Err(_) => {
                    report.notes.push(format!("{} does not exist here: its rule grants nothing", path.display()));
                    continue;
                }
            };
            let access = if path.is_dir() { access } else { access & AccessFs::from_file(abi) };
            created = created.add_rule(PathBeneath::new(fd, access)).map_err(map)?;
        }
    }
    if abi_num >= ABI_TCP {
        for &port in layer.tcp_connect {
            created = created.add_rule(NetPort::new(port, AccessNet::ConnectTcp)).map_err(map)?;
        }
        for &port in layer.tcp_bind {
            created = created.add_rule(NetPort::new(port, AccessNet::BindTcp)).map_err(map)?;
        }
    }
    report.fs = true;
    Ok(Prepared { ruleset: Some(created), report, guard: None })
}

impl Prepared {
    /// A second handle on the same ruleset (a duplicated descriptor), so a
    /// layer built once can be enforced in many children.
    pub fn try_clone(&self) -> std::io::Result<Prepared> {
        let ruleset = self.ruleset.as_ref().map(|r| r.try_clone()).transpose()?;
        Ok(Prepared { ruleset, report: self.report.clone(), guard: self.guard.clone() })
    }

    /// This layer as a tool child enforces it, with two system calls and
    /// nothing else ([`super::spawn`]): the ruleset's descriptor and the
    /// seccomp guard. A ruleset the kernel will not enforce is refused
    /// here, before any child starts, when Landlock is `required`.
    pub fn into_child_layer(self, requirement: Requirement) -> Result<ChildLayer, SandboxError> {
        let ruleset: Option<std::os::fd::OwnedFd> = self.ruleset.and_then(Into::into);
        if ruleset.is_none() && requirement == Requirement::Required {
            return Err(SandboxError::LandlockUnavailable);
        }
        Ok(ChildLayer { ruleset, guard: self.guard })
    }

    /// Restricts the calling thread (and the threads and children it creates
    /// afterwards). Sets `no_new_privs` as a side effect.
    pub fn enforce(self, requirement: Requirement) -> Result<Report, SandboxError> {
        if let Some(guard) = &self.guard {
            super::seccomp::apply(guard)?;
        }
        let mut report = self.report;
        let Some(ruleset) = self.ruleset else {
            return Ok(report);
        };
        let status = ruleset.restrict_self().map_err(|e| SandboxError::Landlock(e.to_string()))?;
        report.status = match status.ruleset {
            RulesetStatus::FullyEnforced => "fully enforced".into(),
            RulesetStatus::PartiallyEnforced => {
                report.notes.push(format!("Landlock only partially enforced (ABI {})", report.abi));
                "partially enforced".into()
            }
            RulesetStatus::NotEnforced => {
                if requirement == Requirement::Required {
                    return Err(SandboxError::LandlockUnavailable);
                }
                report.fs = false;
                report.tcp = false;
                report.scopes = false;
                report.notes.push("the kernel did not enforce the Landlock ruleset".into());
                "not enforced".into()
            }
        };
        Ok(report)
    }
}
