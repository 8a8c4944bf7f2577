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
