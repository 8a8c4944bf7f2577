//! Credentials: leave root for the workflow's user, empty every capability
//! set, and arm the process flags that keep privileges from coming back.

use caps::CapSet;
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{getresgid, getresuid, setgroups, setresgid, setresuid, Gid, Uid};

use super::spec::Credentials;
use super::{sys, SandboxError};

/// What [`drop_privileges`] achieved.
pub struct CredReport {
    pub uid: u32,
    pub gid: u32,
    pub capabilities_cleared: bool,
    pub notes: Vec<String>,
}

/// Highest capability number we probe; the kernel answers EINVAL past its last.
const CAP_PROBE_MAX: u32 = 63;

/// Drops to `creds` and empties every capability set.
///
/// INVARIANT: the order below is the one that works: the bounding set can only
/// be cleared while we still hold CAP_SETPCAP, i.e. before `setresuid`; the
/// parent-death signal is reset by a credential change, so it is armed after.
///
/// `parent_alive` says whether the process the worker must die with is still
/// there, once the parent-death signal is armed.
pub fn drop_privileges(
    creds: Option<&Credentials>,
    parent_alive: &dyn Fn() -> bool,
) -> Result<CredReport, SandboxError> {
    let mut notes = Vec::new();
    let root = Uid::effective().is_root();
    let target = match creds {
        Some(c) if c.uid == 0 => return Err(SandboxError::RootTarget(c.user.clone())),
        Some(c) if !root && c.uid != Uid::current().as_raw() => return Err(SandboxError::CannotSwitch(c.user.clone())),
        None if root => return Err(SandboxError::NoUserAsRoot),
        other => other,
    };

    let mut bounding_kept = false;
    for cap in 0..=CAP_PROBE_MAX {
        match sys::capbset_read(cap) {
            None => break,
            Some(false) => {}
            Some(true) => {
                if sys::capbset_drop(cap).is_err() {
                    bounding_kept = true;
                }
            }
        }
    }
    if bounding_kept {
        notes.push(
            "capability bounding set not cleared: the broker lacks CAP_SETPCAP (run it as root); \
             no_new_privs still keeps exec from granting capabilities"
                .to_string(),
        );
    }
    sys::ambient_clear().map_err(|e| SandboxError::Syscall("clear ambient capabilities", e))?;

    if let Some(c) = target {
        if root {
            let gid = Gid::from_raw(c.gid);
            let uid = Uid::from_raw(c.uid);
            setgroups(&[gid]).map_err(|e| SandboxError::Switch("setgroups", c.user.clone(), e))?;
            setresgid(gid, gid, gid).map_err(|e| SandboxError::Switch("setresgid", c.user.clone(), e))?;
            setresuid(uid, uid, uid).map_err(|e| SandboxError::Switch("setresuid", c.user.clone(), e))?;
        }
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).map_err(|e| SandboxError::Caps(set_name(set), e.to_string()))?;
    }

    // Verify rather than trust: read back ids and every set.
    let u = getresuid().map_err(|e| SandboxError::Syscall("getresuid", e.into()))?;
    let g = getresgid().map_err(|e| SandboxError::Syscall("getresgid", e.into()))?;
    let (ruid, euid, suid) = (u.real, u.effective, u.saved);
    let (rgid, egid, sgid) = (g.real, g.effective, g.saved);
    if ruid != euid || euid != suid || rgid != egid || egid != sgid {
        return Err(SandboxError::Verify(format!(
            "uids {ruid}/{euid}/{suid} gids {rgid}/{egid}/{sgid} differ after the switch"
        )));
    }
    if euid.is_root() {
        return Err(SandboxError::Verify("still uid 0 after the switch".into()));
    }
    let mut cleared = !bounding_kept;
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable, CapSet::Ambient] {
        let held = caps::read(None, set).map_err(|e| SandboxError::Caps(set_name(set), e.to_string()))?;
        if !held.is_empty() {
            return Err(SandboxError::Verify(format!("{} set not empty: {held:?}", set_name(set))));
        }
    }
    if !bounding_kept {
        cleared &= (0..=CAP_PROBE_MAX).all(|c| sys::capbset_read(c) != Some(true));
    }

    prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| SandboxError::Syscall("arm parent-death signal", e.into()))?;
    // The parent may have died before the signal was armed.
    if !parent_alive() {
        return Err(SandboxError::Orphaned);
    }
    prctl::set_no_new_privs().map_err(|e| SandboxError::Syscall("set no_new_privs", e.into()))?;
    prctl::set_dumpable(false).map_err(|e| SandboxError::Syscall("clear dumpable", e.into()))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| SandboxError::Syscall("disable core dumps", e.into()))?;

    Ok(CredReport { uid: euid.as_raw(), gid: egid.as_raw(), capabilities_cleared: cleared, notes })
}

fn set_name(set: CapSet) -> &'static str {
    match set {
        CapSet::Ambient => "ambient",
        CapSet::Bounding => "bounding",
        CapSet::Effective => "effective",
        CapSet::Inheritable => "inheritable",
        CapSet::Permitted => "permitted",
    }
}
