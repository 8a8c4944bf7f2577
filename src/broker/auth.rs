//! Who may call a workflow: the peer's uid and gid from `SO_PEERCRED`,
//! checked against the workflow's `clients`.

use nix::unistd::{getgrouplist, Gid, Uid, User};

/// A connected client, as the kernel vouches for it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// The resolved `clients` of a workflow.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Clients {
    /// root and the broker's own user may call every workflow; anyone else
    /// must be listed, by user or by one of their groups.
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == Uid::effective().as_raw() || self.uids.contains(&peer.uid) {
            return true;
        }
        if self.gids.is_empty() {
            return false;
        }
        if self.gids.contains(&peer.gid) {
            return true;
        }
        // Supplementary groups, from the group database.
        let Ok(Some(user)) = User::from_uid(Uid::from_raw(peer.uid)) else {
            return false;
        };
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        getgrouplist(&name, Gid::from_raw(peer.gid))
            .map(|groups| groups.iter().any(|g| self.gids.contains(&g.as_raw())))
            .unwrap_or(false)
    }
}

/// A readable name for a uid: "1001 (mallory)".
pub fn describe_uid(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{uid} ({})", u.name),
        _ => uid.to_string(),
    }
}

/// `/proc/PID/stat` of `pid`, in one read: `read_to_string` sees size 0
/// and probes in growing steps from 32 bytes (six reads for one line).
/// Read on every request (the caller's ancestry) and every call (the
/// worker's state).
pub(crate) fn proc_stat(pid: u32) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    String::from_utf8(buf).ok()
}

/// The parent PID of `pid`, from `/proc/PID/stat` (field 4, after the
/// parenthesised command name, which may itself contain spaces or ')').
fn parent_of(pid: u32) -> Option<u32> {
    let stat = proc_stat(pid)?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` lives in the caller's own PID namespace, as far as
/// `/proc` tells (false when it cannot be read).
pub fn shares_pid_namespace(pid: u32) -> bool {
    static OWN: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| std::fs::read_link("/proc/self/ns/pid").ok());
    own.as_ref().is_some_and(|own| std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns == *own))
}

/// Whether `pid` is one of `workers` or descends from one. Every process a
/// tool starts stays below its worker: the worker is a child subreaper, so
/// even a daemonized process is reparented to it.
pub fn descends_from_any(pid: u32, workers: &[u32]) -> bool {
    let mut cur = pid;
    for _ in 0..256 {
        if workers.contains(&cur) {
            return true;
        }
        match parent_of(cur) {
            Some(p) if p > 1 && p != cur => cur = p,
            _ => return false,
        }
    }
    // A chain that long is not a normal client: refuse rather than guess.
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestry_finds_own_parent_and_not_strangers() {
        let me = std::process::id();
        let parent = parent_of(me).expect("own parent");
        assert!(descends_from_any(me, &[parent]));
        assert!(descends_from_any(me, &[me]));
        assert!(!descends_from_any(me, &[u32::MAX - 1]));
        assert!(!descends_from_any(parent, &[me]), "a parent does not descend from its child");
        assert!(shares_pid_namespace(me) && shares_pid_namespace(parent));
        assert!(!shares_pid_namespace(u32::MAX - 1), "no such process");
    }
}
