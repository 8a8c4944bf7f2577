//! The token ledger: an SQLite file in the state directory
//! (`ledger.sqlite3`), written only by the broker.
//!
//! One row per model call the gateway made or refused (`model_calls`) and
//! one per tool call of an ask (`tool_calls`). Budgets are sums over these
//! rows since the last UTC midnight, so they are checked against what
//! providers reported to the broker, never against what a worker says.
//! Times are Unix seconds (UTC). `GET /v1/usage` (and so `corral usage`)
//! answers from it, each client with the rows of its own calls.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use crate::api::GroupBy;
use crate::protocol::{ToolRecord, Usage};
use crate::utc;

/// The ledger's file name inside the state directory.
pub const FILE_NAME: &str = "ledger.sqlite3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS model_calls (
    id                INTEGER PRIMARY KEY,
    time              INTEGER NOT NULL,
    request_id        TEXT NOT NULL,
    workflow          TEXT NOT NULL,
    tenant            TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens      INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    tries             INTEGER NOT NULL,
    outcome           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS model_calls_workflow_time ON model_calls (workflow, time);
CREATE INDEX IF NOT EXISTS model_calls_tenant_time ON model_calls (tenant, time);
CREATE TABLE IF NOT EXISTS exec_calls (
    id           INTEGER PRIMARY KEY,
    time         INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    workflow     TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    uid          INTEGER NOT NULL,
    argv         TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    exit_code    INTEGER,
    signal       INTEGER,
    duration_ms  INTEGER NOT NULL,
    stdout_bytes INTEGER NOT NULL,
    stderr_bytes INTEGER NOT NULL,
    timed_out    INTEGER NOT NULL,
    limit_hit    TEXT,
    ended_by     TEXT,
    created      INTEGER,
    modified     INTEGER,
    deleted      INTEGER,
    memory_peak_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS exec_calls_workflow_time ON exec_calls (workflow, time);
CREATE TABLE IF NOT EXISTS egress (
    id           INTEGER PRIMARY KEY,
    time         INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    workflow     TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    host         TEXT NOT NULL,
    port         INTEGER NOT NULL,
    allowed      INTEGER NOT NULL,
    connections  INTEGER NOT NULL,
    sent         INTEGER NOT NULL,
    received     INTEGER NOT NULL,
    reason       TEXT
);
CREATE INDEX IF NOT EXISTS egress_request ON egress (request_id);
CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY,
    time        INTEGER NOT NULL,
    request_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    workflow    TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    uid         INTEGER NOT NULL,
    member      TEXT,
    session     TEXT,
    outcome     TEXT NOT NULL,
    limit_hit   TEXT,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_uid_time ON audit (uid, time);
CREATE TABLE IF NOT EXISTS tool_calls (
    id           INTEGER PRIMARY KEY,
    time         INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    workflow     TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    tool         TEXT NOT NULL,
    argv         TEXT NOT NULL,
    exit_code    INTEGER,
    signal       INTEGER,
    duration_ms  INTEGER NOT NULL,
    stdout_bytes INTEGER NOT NULL,
    stderr_bytes INTEGER NOT NULL,
    truncated    INTEGER NOT NULL,
    timed_out    INTEGER NOT NULL
);
";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("failed to open the ledger {path}: {source}; check that the state directory exists and is writable by the broker")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("failed to create the ledger's tables in {path}: {source}")]
    Schema { path: PathBuf, source: rusqlite::Error },
    #[error("failed to restrict the ledger {path} to the broker: {source}")]
    Permissions { path: PathBuf, source: std::io::Error },
    #[error("failed to write to the ledger: {0}")]
    Write(#[source] rusqlite::Error),
    #[error("failed to read the ledger: {0}")]
    Read(#[source] rusqlite::Error),
}

/// One model call, as recorded.
#[derive(Debug, Clone)]
pub struct ModelCall<'a> {
    pub time: i64,
    pub request_id: &'a str,
    pub workflow: &'a str,
    pub tenant: &'a str,
    /// The client that asked (`SO_PEERCRED`); `None` in rows of old ledgers.
    pub uid: Option<u32>,
    /// The member the call was made for (the members file), if any.
    pub member: Option<&'a str>,
    pub model: &'a str,
    pub usage: Usage,
    pub latency_ms: u64,
    pub tries: u32,
    /// `ok`, or the error code (`budget_exhausted`, `timeout`, …).
    pub outcome: &'a str,
}

/// One `POST /v1/exec` call, as recorded. `Default` leaves every outcome
/// field empty, for a row that sets only what it knows.
#[derive(Debug, Clone, Default)]
pub struct ExecCall {
    pub time: i64,
    pub request_id: String,
    pub workflow: String,
    pub tenant: String,
    /// The client that asked (`SO_PEERCRED`).
    pub uid: u32,
    /// The member the call was made for (the members file), if any: goes
    /// into the audit trail.
    pub member: Option<String>,
    pub argv: Vec<String>,
    /// `ok`, `failed`, `timeout`, `limit`, or the error code of a call
    /// that got no result (`busy`, `quarantined`, …).
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub timed_out: bool,
    pub limit: Option<String>,
    /// With `[network]`: what the call reached and was refused (the
    /// `egress` table, a row per destination).
    pub egress: Option<crate::api::EgressReport>,
    /// The receipt's summary: the limit that ended the call
    /// (`timeout`, `memory_max`, …), paths created, modified and deleted
    /// (`None`: not known), and the peak memory in bytes.
    pub ended_by: Option<String>,
    pub created: Option<u64>,
    pub modified: Option<u64>,
    pub deleted: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    /// The session the call belonged to (the audit trail's `session`).
    pub session: Option<String>,
}

/// One call (exec or ask) in the audit trail, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    pub time: i64,
    pub request_id: String,
    /// `exec` or `ask`.
    pub kind: String,
    pub workflow: String,
    pub tenant: String,
    pub uid: u32,
    /// The member the call was made for (the members file), and the
    /// session it belonged to, when it had them.
    pub member: Option<String>,
    pub session: Option<String>,
    /// `ok`, `failed`, `timeout`, `limit`, or an error code.
    pub outcome: String,
    /// The limit that ended the call, if one did.
    pub limit: Option<String>,
}

/// A row of the audit trail, with its id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    pub id: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// What `verify` found: the rows checked, and the first broken one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditCheck {
    pub rows: u64,
    /// The id of the first row whose hash or link does not hold.
    pub broken_at: Option<i64>,
    pub why: Option<String>,
}

/// The hash before the first row.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256, hex, of a row's canonical content: a JSON array of its id,
/// fields in a fixed order, and the hash of the row before it. The id is
/// in it, so renumbering rows breaks the chain too.
fn audit_hash(id: i64, e: &AuditEntry, prev: &str) -> String {
    let canonical = serde_json::json!([
        id,
        e.time,
        e.request_id,
        e.kind,
        e.workflow,
        e.tenant,
        e.uid,
        e.member,
        e.session,
        e.outcome,
        e.limit,
        prev
    ])
    .to_string();
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Appends `e` to the chain in `conn` (inside the caller's transaction):
/// its link is the hash of the last row written, also by an earlier
/// broker, so the chain runs on across batches and restarts.
fn insert_audit(conn: &Connection, e: &AuditEntry) -> rusqlite::Result<()> {
    let last: Option<(i64, String)> = conn
        .prepare_cached("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(Some)
        .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, GENESIS.to_string()),
    };
    let hash = audit_hash(id, e, &prev);
    conn.prepare_cached(
        "INSERT INTO audit (id, time, request_id, kind, workflow, tenant, uid, member, session, outcome, \
         limit_hit, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        id,
        e.time,
        e.request_id,
        e.kind,
        e.workflow,
        e.tenant,
        e.uid,
        e.member,
        e.session,
        e.outcome,
        e.limit,
        prev,
        hash
    ])?;
    Ok(())
}

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(AuditRow, String, String)> {
    Ok((
        AuditRow {
            id: r.get(0)?,
            entry: AuditEntry {
                time: r.get(1)?,
                request_id: r.get(2)?,
                kind: r.get(3)?,
                workflow: r.get(4)?,
                tenant: r.get(5)?,
                uid: r.get(6)?,
                member: r.get(7)?,
                session: r.get(8)?,
                outcome: r.get(9)?,
                limit: r.get(10)?,
            },
        },
        r.get(11)?,
        r.get(12)?,
    ))
}

const AUDIT_COLUMNS: &str =
    "id, time, request_id, kind, workflow, tenant, uid, member, session, outcome, limit_hit, prev_hash, hash";

/// Which call a set of rows belongs to.
#[derive(Debug, Clone, Copy)]
pub struct CallRef<'a> {
    pub time: i64,
    pub request_id: &'a str,
    pub workflow: &'a str,
    pub tenant: &'a str,
    /// `exec` or `ask`.
    pub kind: &'a str,
}

/// Writes a call's egress rows in `conn` (a transaction or not).
fn insert_egress(conn: &Connection, call: &CallRef<'_>, r: &crate::api::EgressReport) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO egress (time, request_id, workflow, tenant, kind, host, port, allowed, connections, sent, \
         received, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    // One row per destination: reached ones with the call's cap, if any;
    // refused ones with the rule that refused them.
    let reached =
        r.reached.iter().map(|d| (&d.host, d.port, true, d.connections, d.sent, d.received, r.capped.as_deref()));
    let refused = r.refused.iter().map(|d| (&d.host, d.port, false, d.attempts, 0, 0, Some(d.reason.as_str())));
    for (host, port, allowed, connections, sent, received, reason) in reached.chain(refused) {
        insert.execute(params![
            call.time,
            call.request_id,
            call.workflow,
            call.tenant,
            call.kind,
            host,
            port,
            allowed,
            connections,
            to_i64(sent),
            to_i64(received),
            reason
        ])?;
    }
    Ok(())
}

/// Whose tokens a budget counts.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Workflow(&'a str),
    Tenant(&'a str),
    /// A member of the members file (rows recorded with her name).
    Member(&'a str),
}

/// One line of `corral usage`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    pub key: String,
    pub calls: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// A workflow's current hour far above its trailing average.
#[derive(Debug, Clone, PartialEq)]
pub struct Spike {
    pub hour_tokens: u64,
    pub hourly_average: f64,
}

pub struct Ledger {
    conn: Mutex<Connection>,
}

/// Ledgers written before the caller's uid was recorded lack the column.
fn add_uid_column(conn: &Connection) -> rusqlite::Result<()> {
    add_column(conn, "model_calls", "uid", "INTEGER")?;
    // Members came later still: a member's daily tokens are summed from it.
    add_column(conn, "model_calls", "member", "TEXT")
}

/// Ledgers written before exec calls had receipts lack their columns.
fn add_receipt_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (name, ty) in [
        ("ended_by", "TEXT"),
        ("created", "INTEGER"),
        ("modified", "INTEGER"),
        ("deleted", "INTEGER"),
        ("memory_peak_bytes", "INTEGER"),
    ] {
        add_column(conn, "exec_calls", name, ty)?;
    }
    Ok(())
}

/// Adds column `name` to `table` unless it is there already.
fn add_column(conn: &Connection, table: &str, name: &str, ty: &str) -> rusqlite::Result<()> {
    let has: bool =
        conn.query_row("SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2", params![table, name], |r| {
            r.get::<_, i64>(0).map(|n| n > 0)
        })?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {ty}"))?;
    }
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Ledger {
    /// Opens (creating if needed) `state_dir/ledger.sqlite3`, mode 0600:
    /// tools must not read other tenants' calls.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = state_dir.join(FILE_NAME);
        let conn = Connection::open(&path).map_err(|source| LedgerError::Open { path: path.clone(), source })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| LedgerError::Permissions { path: path.clone(), source })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
            .and_then(|()| conn.execute_batch(SCHEMA))
            .and_then(|()| add_uid_column(&conn))
            .and_then(|()| add_receipt_columns(&conn))
            .map_err(|source| LedgerError::Schema { path: path.clone(), source })?;
        Ok(Ledger { conn: Mutex::new(conn) })
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves a usable connection.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_model_call(&self, c: &ModelCall<'_>) -> Result<(), LedgerError> {
        self.conn()
            .execute(
                "INSERT INTO model_calls (time, request_id, workflow, tenant, model, prompt_tokens, \
                 completion_tokens, total_tokens, latency_ms, tries, outcome, uid, member) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    c.time,
                    c.request_id,
                    c.workflow,
                    c.tenant,
                    c.model,
                    to_i64(c.usage.prompt_tokens),
                    to_i64(c.usage.completion_tokens),
                    to_i64(c.usage.total_tokens),
                    to_i64(c.latency_ms),
                    c.tries,
                    c.outcome,
                    c.uid,
                    c.member
                ],
            )
            .map(drop)
            .map_err(LedgerError::Write)
    }

    pub fn record_tool_call(
        &self,
        time: i64,
        request_id: &str,
        workflow: &str,
        tenant: &str,
        t: &ToolRecord,
    ) -> Result<(), LedgerError> {
        let argv = serde_json::to_string(&t.argv).unwrap_or_default();
        self.conn()
            .execute(
                "INSERT INTO tool_calls (time, request_id, workflow, tenant, tool, argv, exit_code, \
                 signal, duration_ms, stdout_bytes, stderr_bytes, truncated, timed_out) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    time,
                    request_id,
                    workflow,
                    tenant,
                    t.tool,
                    argv,
                    t.exit_code,
                    t.signal,
                    to_i64(t.duration_ms),
                    to_i64(t.stdout_bytes),
                    to_i64(t.stderr_bytes),
                    t.truncated,
                    t.timed_out
                ],
            )
            .map(drop)
            .map_err(LedgerError::Write)
    }

    /// Records what one call did through the egress proxy.
    pub fn record_egress(&self, call: &CallRef<'_>, r: &crate::api::EgressReport) -> Result<(), LedgerError> {
        insert_egress(&self.conn(), call, r).map_err(LedgerError::Write)
    }

    /// Writes `calls` in one transaction (one sync for the batch).
    pub fn record_exec_calls(&self, calls: &[ExecCall]) -> Result<(), LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(LedgerError::Write)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO exec_calls (time, request_id, workflow, tenant, uid, argv, outcome, exit_code, \
                     signal, duration_ms, stdout_bytes, stderr_bytes, timed_out, limit_hit, ended_by, created, \
                     modified, deleted, memory_peak_bytes) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                )
                .map_err(LedgerError::Write)?;
            for c in calls {
                insert
                    .execute(params![
                        c.time,
                        c.request_id,
                        c.workflow,
                        c.tenant,
                        c.uid,
                        serde_json::to_string(&c.argv).unwrap_or_default(),
                        c.outcome,
                        c.exit_code,
                        c.signal,
                        to_i64(c.duration_ms),
                        to_i64(c.stdout_bytes),
                        to_i64(c.stderr_bytes),
                        c.timed_out,
                        c.limit,
                        c.ended_by,
                        c.created.map(to_i64),
                        c.modified.map(to_i64),
                        c.deleted.map(to_i64),
                        c.memory_peak_bytes.map(to_i64)
                    ])
                    .map_err(LedgerError::Write)?;
                let entry = AuditEntry {
                    time: c.time,
                    request_id: c.request_id.clone(),
                    kind: "exec".into(),
                    workflow: c.workflow.clone(),
                    tenant: c.tenant.clone(),
                    uid: c.uid,
                    member: c.member.clone(),
                    session: c.session.clone(),
                    outcome: c.outcome.clone(),
                    limit: c.limit.clone().or_else(|| c.ended_by.clone()),
                };
                insert_audit(&tx, &entry).map_err(LedgerError::Write)?;
                if let Some(r) = &c.egress {
                    let call = CallRef {
                        time: c.time,
                        request_id: &c.request_id,
                        workflow: &c.workflow,
                        tenant: &c.tenant,
                        kind: "exec",
                    };
                    insert_egress(&tx, &call, r).map_err(LedgerError::Write)?;
                }
            }
        }
        tx.commit().map_err(LedgerError::Write)
    }

    /// Appends one call (an ask; exec calls are chained as they are
    /// written) to the audit trail.
    pub fn record_audit(&self, e: &AuditEntry) -> Result<(), LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(LedgerError::Write)?;
        insert_audit(&tx, e).map_err(LedgerError::Write)?;
        tx.commit().map_err(LedgerError::Write)
    }

    /// The newest audit rows (at most `limit`), newest first, since
    /// `since`, of `uid`, `workflow` and `member` when given.
    pub fn audit(
        &self,
        since: i64,
        uid: Option<u32>,
        workflow: Option<&str>,
        member: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, LedgerError> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE time >= ?1 AND (?2 IS NULL OR uid = ?2) \
             AND (?3 IS NULL OR workflow = ?3) AND (?5 IS NULL OR member = ?5) ORDER BY id DESC LIMIT ?4"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql).map_err(LedgerError::Read)?;
        let rows = stmt
            .query_map(params![since, uid, workflow, limit, member], |r| audit_row(r).map(|(row, _, _)| row))
            .map_err(LedgerError::Read)?;
        rows.collect::<Result<_, _>>().map_err(LedgerError::Read)
    }

    /// Walks the whole chain: each row's hash must be that of its content
    /// and the row before's hash, and ids must run on without a gap.
    pub fn verify_audit(&self) -> Result<AuditCheck, LedgerError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY id")).map_err(LedgerError::Read)?;
        let rows = stmt.query_map([], audit_row).map_err(LedgerError::Read)?;
        let mut prev = GENESIS.to_string();
        let mut n = 0;
        for (expected_id, row) in (1i64..).zip(rows) {
            let (row, prev_hash, hash) = row.map_err(LedgerError::Read)?;
            n += 1;
            let broken = |why: String| Ok(AuditCheck { rows: n, broken_at: Some(row.id), why: Some(why) });
            if row.id != expected_id {
                return broken(format!(
                    "row {} follows row {}: row(s) {expected_id}..{} were deleted",
                    row.id,
                    expected_id - 1,
                    row.id - 1
                ));
            }
            if prev_hash != prev {
                return broken(format!("row {} does not link to the row before it: that row was changed", row.id));
            }
            if audit_hash(row.id, &row.entry, &prev_hash) != hash {
                return broken(format!("row {}'s content does not match its hash: the row was edited", row.id));
            }
            prev = hash;
        }
        Ok(AuditCheck { rows: n, broken_at: None, why: None })
    }

    /// Tokens of `scope` in `[from, to)`.
    pub fn tokens(&self, scope: Scope<'_>, from: i64, to: i64) -> Result<u64, LedgerError> {
        let (column, value) = match scope {
            Scope::Workflow(w) => ("workflow", w),
            Scope::Tenant(t) => ("tenant", t),
            Scope::Member(m) => ("member", m),
        };
        let sql = format!(
            "SELECT COALESCE(SUM(total_tokens), 0) FROM model_calls \
             WHERE {column} = ?1 AND time >= ?2 AND time < ?3"
        );
        self.conn()
            .query_row(&sql, params![value, from, to], |r| r.get::<_, i64>(0))
            .map(to_u64)
            .map_err(LedgerError::Read)
    }

    /// Tokens of `scope` since the last UTC midnight before `now`.
    pub fn tokens_today(&self, scope: Scope<'_>, now: i64) -> Result<u64, LedgerError> {
        self.tokens(scope, utc::day_start(now), i64::MAX)
    }

    /// Whether `workflow`'s tokens in the hour of `now` exceed `factor`
    /// times its hourly average over the 24 hours before that hour. No
    /// history, no spike: a new workflow has nothing to compare with.
    pub fn spike(&self, workflow: &str, now: i64, factor: f64) -> Result<Option<Spike>, LedgerError> {
        let hour = utc::hour_start(now);
        let current = self.tokens(Scope::Workflow(workflow), hour, i64::MAX)?;
        let trailing = self.tokens(Scope::Workflow(workflow), hour - utc::DAY, hour)?;
        let average = trailing as f64 / 24.0;
        Ok((average > 0.0 && current as f64 > factor * average)
            .then_some(Spike { hour_tokens: current, hourly_average: average }))
    }

    /// Model calls since `since`, summed per workflow, tenant or model;
    /// with `uid`, only the calls that client made.
    pub fn usage(&self, since: i64, by: GroupBy, uid: Option<u32>) -> Result<Vec<UsageRow>, LedgerError> {
        let column = match by {
            GroupBy::Workflow => "workflow",
            GroupBy::Tenant => "tenant",
            GroupBy::Model => "model",
        };
        let sql = format!(
            "SELECT {column}, COUNT(*), SUM(outcome != 'ok'), SUM(prompt_tokens), \
             SUM(completion_tokens), SUM(total_tokens) FROM model_calls WHERE time >= ?1 \
             AND (?2 IS NULL OR uid = ?2) GROUP BY {column} ORDER BY {column}"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql).map_err(LedgerError::Read)?;
        let rows = stmt
            .query_map(params![since, uid], |r| {
                Ok(UsageRow {
                    key: r.get(0)?,
                    calls: to_u64(r.get(1)?),
                    failed: to_u64(r.get(2)?),
                    prompt_tokens: to_u64(r.get(3)?),
                    completion_tokens: to_u64(r.get(4)?),
                    total_tokens: to_u64(r.get(5)?),
                })
            })
            .map_err(LedgerError::Read)?;
        rows.collect::<Result<_, _>>().map_err(LedgerError::Read)
    }
}

/// Rows queued and not yet committed at most: beyond, a row is dropped (and
/// the drop logged) rather than a call kept waiting on the disk. Counted,
/// not a bounded channel's size: a bounded channel allocates and touches
/// every slot when it is made (1.5 MiB of an idle broker's memory for this
/// many), an unbounded one as rows come.
const EXEC_LOG_BACKLOG: usize = 65_536;
/// Rows per transaction at most.
const EXEC_LOG_BATCH: usize = 512;
/// How long the writer gathers rows after the first before it commits.
/// Each commit rewrites the pages it touches and syncs the disk: one a
/// call costs as much CPU as a trivial tool call's own broker work at a
/// thousand calls a second (`cargo bench --bench front_door`). A reader of
/// the ledger through the API waits for the rows queued before it
/// ([`ExecLog::flush`]).
const EXEC_LOG_LINGER: Duration = Duration::from_millis(5);

enum LogMsg {
    Row(Box<ExecCall>),
    /// Acknowledged once every row queued before it is committed.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Writes exec calls to the ledger from a thread of its own, in batches:
/// a call never waits on SQLite or on the disk's sync.
pub struct ExecLog {
    tx: Mutex<Option<std::sync::mpsc::Sender<LogMsg>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Rows queued and not yet committed.
    pending: Arc<AtomicUsize>,
    backlog: usize,
}

impl ExecLog {
    pub fn start(ledger: std::sync::Arc<Ledger>) -> ExecLog {
        ExecLog::with_backlog(ledger, EXEC_LOG_BACKLOG)
    }

    fn with_backlog(ledger: std::sync::Arc<Ledger>, backlog: usize) -> ExecLog {
        let (tx, rx) = std::sync::mpsc::channel::<LogMsg>();
        let pending = Arc::new(AtomicUsize::new(0));
        let written = Arc::clone(&pending);
        let writer = std::thread::Builder::new()
            .name("exec-ledger".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = Vec::new();
                    let mut acks = Vec::new();
                    let take = |m: LogMsg, batch: &mut Vec<ExecCall>, acks: &mut Vec<_>| match m {
                        LogMsg::Row(c) => batch.push(*c),
                        LogMsg::Flush(ack) => acks.push(ack),
                    };
                    take(first, &mut batch, &mut acks);
                    let until = Instant::now() + EXEC_LOG_LINGER;
                    // Gather until the batch is full, the linger is over, or
                    // a reader waits. Asleep, not blocked on the channel: a
                    // row sent meanwhile wakes nobody (one context switch a
                    // call saved); a reader's flush unparks the thread.
                    loop {
                        while batch.len() + acks.len() < EXEC_LOG_BATCH {
                            match rx.try_recv() {
                                Ok(m) => take(m, &mut batch, &mut acks),
                                Err(_) => break,
                            }
                        }
                        let now = Instant::now();
                        if batch.len() + acks.len() >= EXEC_LOG_BATCH || !acks.is_empty() || now >= until {
                            break;
                        }
                        std::thread::park_timeout(until - now);
                    }
                    if !batch.is_empty() {
                        if let Err(e) = ledger.record_exec_calls(&batch) {
                            tracing::error!("{} exec call(s) not recorded: {e}", batch.len());
                        }
                        written.fetch_sub(batch.len(), Ordering::Relaxed);
                    }
                    for ack in acks {
                        let _ = ack.send(());
                    }
                }
            })
            .map_err(|e| tracing::error!("exec calls will not be recorded: no writer thread: {e}"))
            .ok();
        ExecLog { tx: Mutex::new(Some(tx)), writer: Mutex::new(writer), pending, backlog }
    }

    /// Queues `call` for the ledger, unless `backlog` rows already wait.
    pub fn record(&self, call: ExecCall) {
        let refused = |request_id: &str| {
            tracing::error!(request_id, "exec call not recorded: the ledger writer is behind or gone");
        };
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = tx.as_ref() else { return refused(&call.request_id) };
        if self.pending.fetch_add(1, Ordering::Relaxed) >= self.backlog {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return refused(&call.request_id);
        }
        if let Err(std::sync::mpsc::SendError(m)) = tx.send(LogMsg::Row(Box::new(call))) {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            if let LogMsg::Row(call) = m {
                refused(&call.request_id);
            }
        }
    }

    /// Blocks until every row queued before this call is committed (or the
    /// writer is gone): a reader of the ledger then sees every call that
    /// was answered before it asked. Call it off the async threads.
    pub fn flush(&self) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        let sent = {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            tx.as_ref().is_some_and(|tx| tx.send(LogMsg::Flush(ack)).is_ok())
        };
        if sent {
            // The writer may be asleep in its gathering: wake it.
            if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                w.thread().unpark();
            }
            let _ = done.recv();
        }
    }

    /// Writes what is queued and stops the writer.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_ledger() -> (Ledger, PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-ledger-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (Ledger::open(&dir).unwrap(), dir)
    }

    fn call(ledger: &Ledger, time: i64, workflow: &str, tenant: &str, model: &str, tokens: u64) {
        ledger
            .record_model_call(&ModelCall {
                time,
                request_id: "r",
                workflow,
                tenant,
                uid: Some(7),
                member: None,
                model,
                usage: Usage {
                    prompt_tokens: tokens / 2,
                    completion_tokens: tokens - tokens / 2,
                    total_tokens: tokens,
                },
                latency_ms: 1,
                tries: 1,
                outcome: "ok",
            })
            .unwrap();
    }

    #[test]
    fn budgets_count_since_utc_midnight_and_usage_groups() {
        let (l, dir) = temp_ledger();
        let now = utc::parse_date("2025-03-02").unwrap() + 10 * utc::HOUR;
        call(&l, now - utc::DAY, "w", "t", "m1", 1000); // yesterday
        call(&l, now - 60, "w", "t", "m1", 10);
        call(&l, now, "w2", "t", "m2", 5);
        assert_eq!(l.tokens_today(Scope::Workflow("w"), now).unwrap(), 10);
        assert_eq!(l.tokens_today(Scope::Tenant("t"), now).unwrap(), 15);
        let by_model = l.usage(0, GroupBy::Model, None).unwrap();
        assert_eq!(by_model.len(), 2);
        assert_eq!((by_model[0].key.as_str(), by_model[0].total_tokens, by_model[0].calls), ("m1", 1010, 2));
        let today = l.usage(utc::day_start(now), GroupBy::Tenant, None).unwrap();
        assert_eq!(today[0].total_tokens, 15);
        assert_eq!(today[0].prompt_tokens + today[0].completion_tokens, 15);
        assert_eq!(l.usage(0, GroupBy::Tenant, Some(7)).unwrap()[0].total_tokens, 1015, "uid 7 made every call");
        assert!(l.usage(0, GroupBy::Tenant, Some(8)).unwrap().is_empty(), "uid 8 made none");
        let mode = std::fs::metadata(dir.join(FILE_NAME)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn spike_needs_history_and_the_factor() {
        let (l, dir) = temp_ledger();
        let now = utc::parse_date("2025-03-02").unwrap() + 10 * utc::HOUR + 5;
        call(&l, now, "w", "t", "m", 1000);
        assert_eq!(l.spike("w", now, 5.0).unwrap(), None, "no history, no spike");
        // 24 tokens over the trailing day: 1 per hour on average.
        for h in 1..=24 {
            call(&l, utc::hour_start(now) - h * utc::HOUR, "w", "t", "m", 1);
        }
        let s = l.spike("w", now, 5.0).unwrap().unwrap();
        assert_eq!(s.hour_tokens, 1000);
        assert!((s.hourly_average - 1.0).abs() < 1e-9);
        assert_eq!(l.spike("w", now, 2000.0).unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_ledger_from_before_receipts_gains_their_columns() {
        let (ledger, dir) = temp_ledger();
        drop(ledger);
        let conn = Connection::open(dir.join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "DROP TABLE exec_calls; CREATE TABLE exec_calls (id INTEGER PRIMARY KEY, time INTEGER NOT NULL, \
             request_id TEXT NOT NULL, workflow TEXT NOT NULL, tenant TEXT NOT NULL, uid INTEGER NOT NULL, \
             argv TEXT NOT NULL, outcome TEXT NOT NULL, exit_code INTEGER, signal INTEGER, \
             duration_ms INTEGER NOT NULL, stdout_bytes INTEGER NOT NULL, stderr_bytes INTEGER NOT NULL, \
             timed_out INTEGER NOT NULL, limit_hit TEXT)",
        )
        .unwrap();
        drop(conn);
        let ledger = std::sync::Arc::new(Ledger::open(&dir).unwrap());
        ledger
            .record_exec_calls(&[ExecCall {
                time: 1,
                request_id: "r".into(),
                workflow: "w".into(),
                tenant: "t".into(),
                uid: 0,
                member: None,
                argv: vec!["true".into()],
                outcome: "timeout".into(),
                exit_code: None,
                signal: Some(9),
                duration_ms: 1,
                stdout_bytes: 0,
                stderr_bytes: 0,
                timed_out: true,
                limit: None,
                egress: None,
                ended_by: Some("timeout".into()),
                created: Some(1),
                modified: Some(0),
                deleted: None,
                memory_peak_bytes: Some(1 << 20),
                session: None,
            }])
            .unwrap();
        let row: (String, i64, Option<i64>) = ledger
            .conn()
            .query_row("SELECT ended_by, created, deleted FROM exec_calls", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(row, ("timeout".to_string(), 1, None));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_flush_waits_for_the_rows_queued_before_it() {
        let (ledger, dir) = temp_ledger();
        let ledger = std::sync::Arc::new(ledger);
        let log = ExecLog::start(std::sync::Arc::clone(&ledger));
        let count = || ledger.conn().query_row("SELECT COUNT(*) FROM exec_calls", [], |r| r.get::<_, i64>(0)).unwrap();
        for round in 1..=3 {
            for i in 0..round {
                let mut c = exec_row(i);
                c.request_id = format!("r-{round}-{i}");
                log.record(c);
            }
            log.flush();
            assert_eq!(count(), (1..=round).sum::<i64>(), "round {round}: rows queued before the flush are missing");
        }
        log.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn rows_beyond_the_backlog_are_dropped_and_the_next_ones_kept() {
        let (ledger, dir) = temp_ledger();
        let ledger = std::sync::Arc::new(ledger);
        let log = ExecLog::with_backlog(std::sync::Arc::clone(&ledger), 4);
        let count = || ledger.conn().query_row("SELECT COUNT(*) FROM exec_calls", [], |r| r.get::<_, i64>(0)).unwrap();
        {
            // The disk stalls: the writer cannot commit while this is held.
            let _stalled = ledger.conn();
            for i in 0..10 {
                log.record(exec_row(i));
            }
        }
        log.flush();
        assert_eq!(count(), 4, "the backlog holds 4 rows: the other 6 are dropped, not queued");
        // Committed rows leave the backlog: the next call is recorded.
        log.record(exec_row(10));
        log.flush();
        assert_eq!(count(), 5);
        log.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    fn exec_row(i: i64) -> ExecCall {
        ExecCall {
            time: i,
            request_id: format!("r-{i}"),
            workflow: "w".into(),
            tenant: "t".into(),
            uid: 1000,
            argv: vec!["true".into()],
            outcome: "ok".into(),
            exit_code: Some(0),
            duration_ms: 1,
            ..ExecCall::default()
        }
    }

    #[test]
    fn exec_calls_are_written_in_batches_and_flushed_on_close() {
        let (ledger, dir) = temp_ledger();
        let ledger = std::sync::Arc::new(ledger);
        let log = ExecLog::start(std::sync::Arc::clone(&ledger));
        for i in 0..1000u32 {
            log.record(ExecCall {
                time: 1,
                request_id: format!("r-{i}"),
                workflow: "w".into(),
                tenant: "t".into(),
                member: None,
                uid: 1000 + i % 2,
                argv: vec!["echo".into(), "it's".into()],
                outcome: "ok".into(),
                exit_code: Some(0),
                signal: None,
                duration_ms: 2,
                stdout_bytes: 5,
                stderr_bytes: 0,
                timed_out: false,
                limit: None,
                // The first call went through the egress proxy.
                egress: (i == 0).then(|| crate::api::EgressReport {
                    reached: vec![crate::api::EgressReached {
                        host: "pypi.org".into(),
                        port: 443,
                        connections: 2,
                        sent: 10,
                        received: 20,
                    }],
                    refused: vec![crate::api::EgressRefused {
                        host: "evil.org".into(),
                        port: 443,
                        attempts: 1,
                        reason: "not in [network] allow".into(),
                    }],
                    capped: None,
                }),
                ended_by: None,
                created: Some(u64::from(i % 3)),
                modified: None,
                deleted: Some(0),
                memory_peak_bytes: Some(4096),
                session: None,
            });
        }
        log.close();
        let conn = ledger.conn();
        let (n, uids, argv): (i64, i64, String) = conn
            .query_row("SELECT COUNT(*), COUNT(DISTINCT uid), MIN(argv) FROM exec_calls", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((n, uids), (1000, 2));
        assert_eq!(argv, r#"["echo","it's"]"#);
        let rows: Vec<(String, String, bool, i64)> = conn
            .prepare("SELECT request_id, host, allowed, received FROM egress ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![("r-0".into(), "pypi.org".into(), true, 20), ("r-0".into(), "evil.org".into(), false, 0)]
        );
        let created: i64 = conn.query_row("SELECT SUM(created) FROM exec_calls", [], |r| r.get(0)).unwrap();
        assert_eq!(created, 999);
        drop(conn);
        // The batches make one chain, and a new broker on the same ledger
        // continues it; an edit anywhere breaks it at that row.
        assert_eq!(ledger.verify_audit().unwrap(), AuditCheck { rows: 1000, broken_at: None, why: None });
        drop(ledger);
        let again = Ledger::open(&dir).unwrap();
        let entry = AuditEntry {
            time: 2,
            request_id: "a".into(),
            kind: "ask".into(),
            workflow: "w".into(),
            tenant: "t".into(),
            uid: 7,
            member: None,
            session: None,
            outcome: "ok".into(),
            limit: None,
        };
        again.record_audit(&entry).unwrap();
        assert_eq!(again.verify_audit().unwrap().broken_at, None);
        assert_eq!(again.audit(0, Some(7), None, None, 10).unwrap()[0].id, 1001);
        again.conn().execute("UPDATE audit SET uid = 1 WHERE id = 500", []).unwrap();
        assert_eq!(again.verify_audit().unwrap().broken_at, Some(500));
        let _ = std::fs::remove_dir_all(dir);
    }
}
