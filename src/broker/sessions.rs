//! Sessions: a conversation's own workspace and history.
//!
//! A call that names a session (`x-corral-session` or the body's `session`)
//! belongs to the session of its workflow, its owner and that id, created
//! on first use. The session has:
//!
//! - a directory, `<workspace>/sessions/<owner>/<id>`, made by the broker
//!   ([`super::workspace::make_session_dir`]); its calls run there under a
//!   Landlock layer of their own ([`crate::sandbox::session`]) that reaches
//!   neither other sessions nor the workspace above it;
//! - a history in the ledger (`session_messages`): the prompt and final
//!   answer of each ask, at most [`HISTORY_MESSAGES`] messages and
//!   [`HISTORY_BYTES`] bytes, oldest dropped first, prepended to the
//!   session's next ask;
//! - a last use: idle longer than the workflow's `[sessions].idle`, it
//!   expires ([`Sessions::sweep`] runs at start and periodically, and
//!   [`Sessions::open`] removes an expired session before reusing its id).
//!
//! An owner keeps at most `[sessions].max` sessions per workflow.

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension};

use super::auth::Peer;
use super::ledger::{Ledger, LedgerError};
use super::workspace::{self, WorkspaceError};
use super::Workflow;
use crate::protocol::{ChatMessage, Role};

/// Messages of history kept per session (the newest).
pub const HISTORY_MESSAGES: usize = 40;
/// Bytes of history kept per session (the newest messages that fit).
pub const HISTORY_BYTES: usize = 64 * 1024;
/// Longest session id.
pub const ID_MAX: usize = 64;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    workflow  TEXT NOT NULL,
    owner     TEXT NOT NULL,
    id        TEXT NOT NULL,
    created   INTEGER NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (workflow, owner, id)
);
CREATE TABLE IF NOT EXISTS session_messages (
    seq      INTEGER PRIMARY KEY,
    workflow TEXT NOT NULL,
    owner    TEXT NOT NULL,
    id       TEXT NOT NULL,
    role     TEXT NOT NULL,
    content  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS session_messages_session ON session_messages (workflow, owner, id, seq);
";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid session id {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'")]
    BadId(String),
    #[error(
        "you already keep {max} sessions in workflow {workflow} ([sessions].max): remove one with \
         `corral sessions rm --workflow {workflow} ID` (see `corral sessions`)"
    )]
    TooMany { workflow: String, max: u32 },
    #[error(
        "sessions need Landlock to keep their files apart, and this kernel has none: use Linux 5.13 or newer \
         with \"landlock\" in the lsm= boot parameter, or call without a session"
    )]
    NoLandlock,
    #[error("failed to prepare the session's directory: {0}")]
    Dir(#[from] WorkspaceError),
    #[error("failed to read or write the session in the ledger: {0}")]
    Ledger(#[from] LedgerError),
}

impl From<rusqlite::Error> for SessionError {
    fn from(e: rusqlite::Error) -> Self {
        SessionError::Ledger(LedgerError::Write(e))
    }
}

/// A valid session id: 1–64 of `[A-Za-z0-9._-]`, not starting with `.`
/// (so never `.` or `..`, and path-safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(text: &str) -> Result<SessionId, SessionError> {
        let ok = !text.is_empty()
            && text.len() <= ID_MAX
            && !text.starts_with('.')
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(SessionId(text.to_string()))
        } else {
            Err(SessionError::BadId(text.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whose a session is. Sessions of different owners are apart even with
/// the same id. The key is path-safe: it names a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOwner {
    key: String,
}

impl SessionOwner {
    /// The sessions of a client uid.
    pub fn uid(uid: u32) -> SessionOwner {
        SessionOwner { key: format!("uid-{uid}") }
    }

    /// The sessions of a member of the members file, whoever calls for her
    /// (a delegate, or her own login): apart from the delegate's own and
    /// from every other member's. Member names are path-safe (lowercase
    /// letters, digits, `-`, `_`; the members file's validation).
    pub fn member(name: &str) -> SessionOwner {
        SessionOwner { key: format!("member-{name}") }
    }

    /// An owner from its key, as stored (root's `?owner=`); `None` when it
    /// is not one of the forms above.
    pub fn from_key(key: &str) -> Option<SessionOwner> {
        if let Some(name) = key.strip_prefix("member-") {
            let safe = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
            return (!name.is_empty() && name.len() <= 40 && name.bytes().all(safe))
                .then(|| SessionOwner::member(name));
        }
        let uid = key.strip_prefix("uid-")?.parse::<u32>().ok()?;
        Some(SessionOwner::uid(uid))
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

/// The owner of the sessions of a call by `peer`, made for `member` when
/// there is one: the one place that says whose a session is.
pub fn owner_of(peer: &Peer, member: Option<&str>) -> SessionOwner {
    match member {
        Some(name) => SessionOwner::member(name),
        None => SessionOwner::uid(peer.uid),
    }
}

/// A session a call runs in.
#[derive(Debug, Clone)]
pub struct Opened {
    pub workflow: String,
    pub owner: SessionOwner,
    pub id: SessionId,
    pub dir: PathBuf,
}

/// One session, as listed.
#[derive(Debug, Clone)]
pub struct Row {
    pub workflow: String,
    pub owner: String,
    pub id: String,
    pub created: i64,
    pub last_used: i64,
    pub messages: u64,
    pub bytes: u64,
}

/// The sessions of every workflow, kept in the ledger's database.
pub struct Sessions {
    ledger: Arc<Ledger>,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

impl Sessions {
    pub fn new(ledger: Arc<Ledger>) -> Result<Sessions, LedgerError> {
        ledger.conn().execute_batch(SCHEMA).map_err(LedgerError::Write)?;
        Ok(Sessions { ledger })
    }

    /// The session `id` of `owner` in `wf`, created (with its directory) on
    /// first use, its last use set to `now`. An expired one is removed
    /// first and begins anew.
    pub fn open(&self, wf: &Workflow, owner: &SessionOwner, id: SessionId, now: i64) -> Result<Opened, SessionError> {
        if crate::sandbox::sys::landlock_abi() == 0 {
            return Err(SessionError::NoLandlock);
        }
        let idle = i64::try_from(wf.policy.sessions.idle.as_secs()).unwrap_or(i64::MAX);
        let spec = wf.pool.spec();
        // Expired sessions of this owner go first: they do not count.
        let expired: Vec<String> = {
            let conn = self.ledger.conn();
            let mut q =
                conn.prepare_cached("SELECT id FROM sessions WHERE workflow = ?1 AND owner = ?2 AND last_used < ?3")?;
            let rows = q.query_map(params![wf.name, owner.key(), now.saturating_sub(idle)], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for old in expired {
            self.remove_one(&spec.workspace, &wf.name, owner.key(), &old)?;
        }
        // The directory before the row: a directory that cannot be made
        // (a symlink planted where it goes) leaves no session behind.
        let known: Option<i64> = {
            let conn = self.ledger.conn();
            let known: Option<i64> = conn
                .query_row(
                    "SELECT created FROM sessions WHERE workflow = ?1 AND owner = ?2 AND id = ?3",
                    params![wf.name, owner.key(), id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            if known.is_none() {
                let count: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM sessions WHERE workflow = ?1 AND owner = ?2",
                    params![wf.name, owner.key()],
                    |r| r.get(0),
                )?;
                let max = wf.policy.sessions.max;
                if count >= i64::from(max) {
                    return Err(SessionError::TooMany { workflow: wf.name.clone(), max });
                }
            }
            known
        };
        let dir = workspace::make_session_dir(&spec.workspace, owner.key(), id.as_str(), spec.credentials.as_ref())?;
        if known.is_none() {
            tracing::info!(workflow = %wf.name, owner = owner.key(), session = id.as_str(), "session created");
        }
        self.ledger.conn().execute(
            "INSERT INTO sessions (workflow, owner, id, created, last_used) VALUES (?1, ?2, ?3, ?4, ?4) \
                 ON CONFLICT (workflow, owner, id) DO UPDATE SET last_used = excluded.last_used",
            params![wf.name, owner.key(), id.as_str(), now],
        )?;
        Ok(Opened { workflow: wf.name.clone(), owner: owner.clone(), id, dir })
    }

    /// The session's history, oldest first (never starting with an answer
    /// whose prompt was dropped).
    pub fn history(&self, s: &Opened) -> Result<Vec<ChatMessage>, SessionError> {
        let conn = self.ledger.conn();
        let mut q = conn.prepare_cached(
            "SELECT role, content FROM session_messages WHERE workflow = ?1 AND owner = ?2 AND id = ?3 ORDER BY seq",
        )?;
        let rows = q.query_map(params![s.workflow, s.owner.key(), s.id.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (role, content) = row?;
            let role = match role.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                _ => continue,
            };
            if out.is_empty() && role == Role::Assistant {
                continue;
            }
            out.push(ChatMessage::text(role, content));
        }
        Ok(out)
    }

    /// Adds one turn (the prompt and the final answer) to the session's
    /// history, then drops the oldest messages beyond the caps.
    pub fn append(&self, s: &Opened, prompt: &str, answer: &str, now: i64) -> Result<(), SessionError> {
        let mut conn = self.ledger.conn();
        let tx = conn.transaction()?;
        for (role, content) in [(Role::User, prompt), (Role::Assistant, answer)] {
            tx.execute(
                "INSERT INTO session_messages (workflow, owner, id, role, content) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![s.workflow, s.owner.key(), s.id.as_str(), role_name(role), content],
            )?;
        }
        // Newest first: keep while both caps hold, drop the rest.
        let sizes: Vec<(i64, i64)> = {
            let mut q = tx.prepare_cached(
                "SELECT seq, length(CAST(content AS BLOB)) FROM session_messages \
                 WHERE workflow = ?1 AND owner = ?2 AND id = ?3 ORDER BY seq DESC",
            )?;
            let rows =
                q.query_map(params![s.workflow, s.owner.key(), s.id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut bytes = 0usize;
        let mut cut = None;
        for (i, (seq, len)) in sizes.iter().enumerate() {
            bytes = bytes.saturating_add(usize::try_from(*len).unwrap_or(usize::MAX));
            if i >= HISTORY_MESSAGES || bytes > HISTORY_BYTES {
                cut = Some(*seq);
                break;
            }
        }
        if let Some(seq) = cut {
            tx.execute(
                "DELETE FROM session_messages WHERE workflow = ?1 AND owner = ?2 AND id = ?3 AND seq <= ?4",
                params![s.workflow, s.owner.key(), s.id.as_str(), seq],
            )?;
        }
        tx.execute(
            "UPDATE sessions SET last_used = ?4 WHERE workflow = ?1 AND owner = ?2 AND id = ?3",
            params![s.workflow, s.owner.key(), s.id.as_str(), now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Sessions, oldest first: of `owner` only when given, of `workflow`
    /// only when given.
    pub fn list(&self, owner: Option<&SessionOwner>, workflow: Option<&str>) -> Result<Vec<Row>, SessionError> {
        let conn = self.ledger.conn();
        let mut q = conn.prepare_cached(
            "SELECT s.workflow, s.owner, s.id, s.created, s.last_used, COUNT(m.seq), \
                    COALESCE(SUM(length(CAST(m.content AS BLOB))), 0) \
             FROM sessions s LEFT JOIN session_messages m \
                  ON m.workflow = s.workflow AND m.owner = s.owner AND m.id = s.id \
             WHERE (?1 IS NULL OR s.owner = ?1) AND (?2 IS NULL OR s.workflow = ?2) \
             GROUP BY s.workflow, s.owner, s.id ORDER BY s.created, s.workflow, s.id",
        )?;
        let rows = q.query_map(params![owner.map(SessionOwner::key), workflow], |r| {
            Ok(Row {
                workflow: r.get(0)?,
                owner: r.get(1)?,
                id: r.get(2)?,
                created: r.get(3)?,
                last_used: r.get(4)?,
                messages: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                bytes: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes the sessions `id` of `wf` of `owner` (of every owner when
    /// `None`): their history and directory. Returns how many there were.
    pub fn remove(&self, wf: &Workflow, owner: Option<&SessionOwner>, id: &SessionId) -> Result<usize, SessionError> {
        let owners: Vec<String> = {
            let conn = self.ledger.conn();
            let mut q = conn.prepare_cached(
                "SELECT owner FROM sessions WHERE workflow = ?1 AND id = ?2 AND (?3 IS NULL OR owner = ?3)",
            )?;
            let rows = q.query_map(params![wf.name, id.as_str(), owner.map(SessionOwner::key)], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for o in &owners {
            self.remove_one(&wf.pool.spec().workspace, &wf.name, o, id.as_str())?;
        }
        Ok(owners.len())
    }

    /// Removes one session: its directory first (a directory without a row
    /// would never be swept), then its rows.
    fn remove_one(
        &self,
        workspace: &std::path::Path,
        workflow: &str,
        owner: &str,
        id: &str,
    ) -> Result<(), SessionError> {
        workspace::remove_session_dir(workspace, owner, id)?;
        let mut conn = self.ledger.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM session_messages WHERE workflow = ?1 AND owner = ?2 AND id = ?3",
            params![workflow, owner, id],
        )?;
        tx.execute(
            "DELETE FROM sessions WHERE workflow = ?1 AND owner = ?2 AND id = ?3",
            params![workflow, owner, id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes every session idle longer than its workflow's
    /// `[sessions].idle`. Sessions of a workflow no longer in the policies
    /// are kept (it may come back). Returns how many were removed.
    pub fn sweep(&self, workflows: &[Arc<Workflow>], now: i64) -> usize {
        let mut removed = 0;
        for wf in workflows {
            let idle = i64::try_from(wf.policy.sessions.idle.as_secs()).unwrap_or(i64::MAX);
            let expired: Result<Vec<(String, String)>, rusqlite::Error> = (|| {
                let conn = self.ledger.conn();
                let mut q =
                    conn.prepare_cached("SELECT owner, id FROM sessions WHERE workflow = ?1 AND last_used < ?2")?;
                let rows = q.query_map(params![wf.name, now.saturating_sub(idle)], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })();
            for (owner, id) in expired.unwrap_or_default() {
                match self.remove_one(&wf.pool.spec().workspace, &wf.name, &owner, &id) {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        tracing::warn!(workflow = %wf.name, owner, id, "failed to remove an expired session: {e}")
                    }
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_path_safe() {
        for good in ["a", "chat-42", "x.y_z", "A9", &"a".repeat(64)] {
            assert!(SessionId::parse(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"a".repeat(65), "a\0"] {
            assert!(SessionId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(SessionOwner::uid(1000).key(), "uid-1000");
        assert_eq!(SessionOwner::from_key("uid-7"), Some(SessionOwner::uid(7)));
        assert_eq!(SessionOwner::from_key("uid-x"), None);
        assert_eq!(SessionOwner::from_key("../x"), None);
        assert_eq!(SessionOwner::from_key("member-kid"), Some(SessionOwner::member("kid")));
        assert_eq!(SessionOwner::from_key("member-../x"), None);
        assert_eq!(SessionOwner::from_key("member-"), None);
    }

    #[test]
    fn history_keeps_the_newest_messages_within_both_caps() {
        let dir = std::env::temp_dir().join(format!("corral-sessions-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sessions = Sessions::new(Arc::new(Ledger::open(&dir).unwrap())).unwrap();
        let open = |id: &str| Opened {
            workflow: "w".into(),
            owner: SessionOwner::uid(1),
            id: SessionId::parse(id).unwrap(),
            dir: dir.join(id),
        };
        let (a, b) = (open("a"), open("b"));
        for i in 0..30 {
            sessions.append(&a, &format!("q{i}"), &format!("r{i}"), 1).unwrap();
        }
        sessions.append(&b, "other", "session", 1).unwrap();
        let h = sessions.history(&a).unwrap();
        assert_eq!(h.len(), HISTORY_MESSAGES);
        assert_eq!((h[0].role, h[0].content.as_deref()), (Role::User, Some("q10")));
        assert_eq!(h[HISTORY_MESSAGES - 1].content.as_deref(), Some("r29"));
        assert_eq!(sessions.history(&b).unwrap().len(), 2, "sessions do not share history");
        // A turn that leaves room for one more message of the byte cap: the
        // answer "r29" is kept, its prompt dropped, so the history starts
        // with the new prompt instead (an answer never leads).
        let big = "x".repeat(HISTORY_BYTES - 4);
        sessions.append(&a, "p", &big, 1).unwrap();
        let h = sessions.history(&a).unwrap();
        let lens: Vec<usize> = h.iter().map(|m| m.content.as_deref().unwrap_or("").len()).collect();
        assert_eq!(lens, [1, HISTORY_BYTES - 4]);
        assert_eq!(h[0].role, Role::User);
        // The next turn pushes the big one out whole.
        sessions.append(&a, "small", &"y".repeat(200), 1).unwrap();
        let h = sessions.history(&a).unwrap();
        let lens: Vec<usize> = h.iter().map(|m| m.content.as_deref().unwrap_or("").len()).collect();
        assert_eq!(lens, [5, 200]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
