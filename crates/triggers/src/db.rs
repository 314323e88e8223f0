//! The durable record of schedules: `<data_dir>/triggers.db` (SQLite, WAL,
//! `synchronous = FULL`).
//!
//! One row per schedule:
//!
//! - `cursor_ms`: every tick at or before it is settled (claimed, or passed
//!   over by the missed policy or a pause). **Claiming a tick is a
//!   compare-and-set on this column**: `UPDATE … SET cursor_ms = tick WHERE
//!   name = ? AND cursor_ms = <value read>`. Of several schedulers that read
//!   the same cursor, exactly one update matches a row; the others see 0 rows
//!   changed and skip the tick. Two schedulers on one `triggers.db` (tests),
//!   or several servers sharing a PostgreSQL store later (the same statement
//!   is atomic there under READ COMMITTED: the second UPDATE re-checks the
//!   WHERE clause after the first commits), fire a tick once.
//! - `pending_tick_ms`, `claimed_by`, `claimed_at_ms`: the outbox. The claim
//!   commits *before* the publish; a successful publish clears it. A claim
//!   older than the lease ([`crate::scheduler::CLAIM_LEASE`]) is taken over
//!   (again by compare-and-set) and published again: a crash between claim
//!   and publish re-publishes the tick (at least once).
//! - `paused`, `config_paused`: the run-time pause state and the declared
//!   `paused` it was last reconciled with.
//! - `last_fired_ms`, `last_message_id`, `last_error`: for display.
//!
//! And one row per declared schedule or webhook in `definitions` (schema 2):
//! the spec as JSON and the project whose manifest declared it. Definitions
//! are the durable truth a restarted server serves; a project's apply
//! replaces only its own rows. Webhook specs hold only the *names* of the
//! environment variables with their secrets, never a secret.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use pubrun_core::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension};

const SCHEMA_VERSION: i64 = 2;

const MIGRATION_1: &str = r#"
CREATE TABLE schedules (
    name TEXT PRIMARY KEY,
    cursor_ms INTEGER NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    config_paused INTEGER NOT NULL DEFAULT 0,
    pending_tick_ms INTEGER,
    claimed_by TEXT,
    claimed_at_ms INTEGER,
    last_fired_ms INTEGER,
    last_message_id TEXT,
    last_error TEXT,
    updated_ms INTEGER NOT NULL
);
"#;

const MIGRATION_2: &str = r#"
CREATE TABLE definitions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    spec TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
"#;

/// What a row of `definitions` declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefKind {
    Schedule,
    Webhook,
}

impl DefKind {
    fn as_str(self) -> &'static str {
        match self {
            DefKind::Schedule => "schedule",
            DefKind::Webhook => "webhook",
        }
    }
}

/// A declared schedule or webhook: its spec as JSON and the project that
/// declared it (the owner: only that project's apply changes or deletes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub name: String,
    pub project: String,
    pub spec: String,
}

/// Whose definitions a replace covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every definition of the kind, whatever its project.
    All,
    /// Only the definitions of this project; a name another project holds is
    /// an error.
    Project(&'a str),
}

/// A claimed tick not yet published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub tick: DateTime<Utc>,
    pub owner: String,
    pub claimed_at: DateTime<Utc>,
}

/// One schedule's durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleState {
    pub name: String,
    pub cursor: DateTime<Utc>,
    pub paused: bool,
    pub config_paused: bool,
    pub pending: Option<Claim>,
    pub last_fired: Option<DateTime<Utc>>,
    pub last_message_id: Option<String>,
    pub last_error: Option<String>,
}

pub struct TriggerDb {
    conn: Mutex<Connection>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::unavailable(format!("triggers.db: {e}"))
}

const COLUMNS: &str =
    "name, cursor_ms, paused, config_paused, pending_tick_ms, claimed_by, claimed_at_ms, last_fired_ms, last_message_id, last_error";

fn row_to_state(r: &rusqlite::Row<'_>) -> rusqlite::Result<ScheduleState> {
    let pending_tick: Option<i64> = r.get(4)?;
    let claimed_by: Option<String> = r.get(5)?;
    let claimed_at: Option<i64> = r.get(6)?;
    Ok(ScheduleState {
        name: r.get(0)?,
        cursor: from_ms(r.get(1)?),
        paused: r.get::<_, i64>(2)? != 0,
        config_paused: r.get::<_, i64>(3)? != 0,
        pending: pending_tick.map(|t| Claim {
            tick: from_ms(t),
            owner: claimed_by.unwrap_or_default(),
            claimed_at: from_ms(claimed_at.unwrap_or(0)),
        }),
        last_fired: r.get::<_, Option<i64>>(7)?.map(from_ms),
        last_message_id: r.get(8)?,
        last_error: r.get(9)?,
    })
}

impl TriggerDb {
    /// Opens (creating and migrating) the database at `path`. Several
    /// handles may open the same file.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        let mut db = TriggerDb {
            conn: Mutex::new(conn),
        };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<()> {
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(Error::precondition(format!(
                "triggers.db has schema version {version}, newer than this pubrun understands ({SCHEMA_VERSION}); upgrade pubrun"
            )));
        }
        if version < 1 {
            tx.execute_batch(MIGRATION_1).map_err(db_err)?;
        }
        if version < 2 {
            tx.execute_batch(MIGRATION_2).map_err(db_err)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the rows match the declared schedules: a new schedule starts
    /// at `now` (earlier ticks never fire) with `paused = declared`; for an
    /// existing one, a change of the declared `paused` overrides the run-time
    /// state, otherwise the run-time state stays. Rows of schedules no longer
    /// declared are deleted.
    pub fn reconcile(&self, declared: &[(String, bool)], now: DateTime<Utc>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        upsert_states(&tx, declared, now)?;
        let keep: std::collections::HashSet<&str> =
            declared.iter().map(|(n, _)| n.as_str()).collect();
        delete_states_except(&tx, &keep)?;
        tx.commit().map_err(db_err)
    }

    /// The definitions of `kind`, by name.
    pub fn definitions(&self, kind: DefKind) -> Result<Vec<Definition>> {
        definitions(&self.conn(), kind)
    }

    /// Replaces the definitions of `kind` within `scope` by `defs`, in one
    /// transaction; nothing changes on an error (a name that another project
    /// holds). For schedules the state rows follow in the same transaction:
    /// `paused` gives each new definition's declared pause state (see
    /// [`TriggerDb::reconcile`]), and rows of schedules no longer defined are
    /// deleted. Returns every definition of `kind` afterwards.
    pub fn replace_definitions(
        &self,
        kind: DefKind,
        scope: Scope<'_>,
        defs: &[(Definition, bool)],
        now: DateTime<Utc>,
    ) -> Result<Vec<Definition>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let existing = definitions(&tx, kind)?;
        if let Scope::Project(project) = scope {
            for (d, _) in defs {
                if let Some(other) = existing
                    .iter()
                    .find(|e| e.name == d.name && e.project != project)
                {
                    return Err(Error::precondition(format!(
                        "{} \"{}\" belongs to project \"{}\" (declared by its manifest); {} names are server-wide: rename it, or remove it from project \"{}\"'s manifest first",
                        kind.as_str(),
                        d.name,
                        other.project,
                        kind.as_str(),
                        other.project
                    )));
                }
            }
        }
        match scope {
            Scope::All => tx.execute(
                "DELETE FROM definitions WHERE kind = ?1",
                params![kind.as_str()],
            ),
            Scope::Project(p) => tx.execute(
                "DELETE FROM definitions WHERE kind = ?1 AND project = ?2",
                params![kind.as_str(), p],
            ),
        }
        .map_err(db_err)?;
        for (d, _) in defs {
            tx.execute(
                "INSERT INTO definitions (kind, name, project, spec) VALUES (?1, ?2, ?3, ?4)",
                params![kind.as_str(), d.name, d.project, d.spec],
            )
            .map_err(db_err)?;
        }
        let all = definitions(&tx, kind)?;
        if kind == DefKind::Schedule {
            let declared: Vec<(String, bool)> =
                defs.iter().map(|(d, p)| (d.name.clone(), *p)).collect();
            upsert_states(&tx, &declared, now)?;
            let keep = all.iter().map(|d| d.name.as_str()).collect();
            delete_states_except(&tx, &keep)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(all)
    }

    pub fn get(&self, name: &str) -> Result<Option<ScheduleState>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM schedules WHERE name = ?1"),
                params![name],
                row_to_state,
            )
            .optional()
            .map_err(db_err)
    }

    pub fn list(&self) -> Result<Vec<ScheduleState>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(&format!("SELECT {COLUMNS} FROM schedules ORDER BY name"))
            .map_err(db_err)?;
        let rows = st.query_map([], row_to_state).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Claims `tick` if the cursor is still `expected_cursor`. True if this
    /// caller won. A claim supersedes an older pending claim (the older tick
    /// then counts as missed).
    pub fn claim(
        &self,
        name: &str,
        expected_cursor: DateTime<Utc>,
        tick: DateTime<Utc>,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE schedules SET cursor_ms = ?3, pending_tick_ms = ?3, claimed_by = ?4, claimed_at_ms = ?5, updated_ms = ?5
                 WHERE name = ?1 AND cursor_ms = ?2 AND paused = 0",
                params![name, ms(expected_cursor), ms(tick), owner, ms(now)],
            )
            .map_err(db_err)?;
        Ok(n == 1)
    }

    /// Takes over the pending claim `claim` (expired lease, or this owner
    /// retrying). True if this caller won.
    pub fn take_over(
        &self,
        name: &str,
        claim: &Claim,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE schedules SET claimed_by = ?5, claimed_at_ms = ?6, updated_ms = ?6
                 WHERE name = ?1 AND pending_tick_ms = ?2 AND claimed_by = ?3 AND claimed_at_ms = ?4",
                params![name, ms(claim.tick), claim.owner, ms(claim.claimed_at), owner, ms(now)],
            )
            .map_err(db_err)?;
        Ok(n == 1)
    }

    /// Records a published tick and clears its claim (if still ours).
    pub fn complete(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        owner: &str,
        message_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_err)?;
        let n = tx
            .execute(
                "UPDATE schedules SET pending_tick_ms = NULL, claimed_by = NULL, claimed_at_ms = NULL, last_error = NULL, updated_ms = ?4
                 WHERE name = ?1 AND pending_tick_ms = ?2 AND claimed_by = ?3",
                params![name, ms(tick), owner, ms(now)],
            )
            .map_err(db_err)?;
        // The tick was published either way: show it.
        tx.execute(
            "UPDATE schedules SET last_fired_ms = MAX(COALESCE(last_fired_ms, 0), ?2), last_message_id = ?3 WHERE name = ?1",
            params![name, ms(tick), message_id],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(n == 1)
    }

    /// Records a failed publish; the claim stays pending and is retried after
    /// its lease.
    pub fn record_error(&self, name: &str, error: &str, now: DateTime<Utc>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE schedules SET last_error = ?2, updated_ms = ?3 WHERE name = ?1",
                params![name, error, ms(now)],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Records a run-now publish.
    pub fn record_run_now(&self, name: &str, message_id: &str, now: DateTime<Utc>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE schedules SET last_message_id = ?2, updated_ms = ?3 WHERE name = ?1",
                params![name, message_id, ms(now)],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Pauses or resumes. Resuming moves the cursor to `now`: ticks that
    /// passed while paused never fire. Returns false for an unknown name.
    pub fn set_paused(&self, name: &str, paused: bool, now: DateTime<Utc>) -> Result<bool> {
        let sql = if paused {
            "UPDATE schedules SET paused = 1, updated_ms = ?2 WHERE name = ?1"
        } else {
            "UPDATE schedules SET cursor_ms = CASE WHEN paused = 1 THEN MAX(cursor_ms, ?2) ELSE cursor_ms END, paused = 0, updated_ms = ?2 WHERE name = ?1"
        };
        let n = self
            .conn()
            .execute(sql, params![name, ms(now)])
            .map_err(db_err)?;
        Ok(n == 1)
    }
}

fn definitions(conn: &Connection, kind: DefKind) -> Result<Vec<Definition>> {
    let mut st = conn
        .prepare("SELECT name, project, spec FROM definitions WHERE kind = ?1 ORDER BY name")
        .map_err(db_err)?;
    let rows = st
        .query_map(params![kind.as_str()], |r| {
            Ok(Definition {
                name: r.get(0)?,
                project: r.get(1)?,
                spec: r.get(2)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

fn upsert_states(conn: &Connection, declared: &[(String, bool)], now: DateTime<Utc>) -> Result<()> {
    for (name, paused) in declared {
        conn.execute(
            "INSERT INTO schedules (name, cursor_ms, paused, config_paused, updated_ms) VALUES (?1, ?2, ?3, ?3, ?2)
             ON CONFLICT(name) DO UPDATE SET
                paused = CASE WHEN config_paused != excluded.config_paused THEN excluded.paused ELSE paused END,
                cursor_ms = CASE WHEN config_paused != excluded.config_paused AND paused = 1 AND excluded.paused = 0
                                 THEN MAX(cursor_ms, excluded.cursor_ms) ELSE cursor_ms END,
                config_paused = excluded.config_paused,
                updated_ms = excluded.updated_ms",
            params![name, ms(now), *paused as i64],
        )
        .map_err(db_err)?;
    }
    Ok(())
}

fn delete_states_except(conn: &Connection, keep: &std::collections::HashSet<&str>) -> Result<()> {
    let existing: Vec<String> = {
        let mut st = conn.prepare("SELECT name FROM schedules").map_err(db_err)?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)?
    };
    for name in existing.iter().filter(|n| !keep.contains(n.as_str())) {
        conn.execute("DELETE FROM schedules WHERE name = ?1", params![name])
            .map_err(db_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + s, 0).unwrap()
    }

    #[test]
    fn claim_is_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let a = TriggerDb::open(&dir.path().join("triggers.db")).unwrap();
        let b = TriggerDb::open(&dir.path().join("triggers.db")).unwrap();
        a.reconcile(&[("s".into(), false)], t(0)).unwrap();
        let st = b.get("s").unwrap().unwrap();
        assert_eq!(st.cursor, t(0));
        assert!(a.claim("s", st.cursor, t(60), "a", t(60)).unwrap());
        assert!(!b.claim("s", st.cursor, t(60), "b", t(60)).unwrap());
        let st = b.get("s").unwrap().unwrap();
        assert_eq!(
            st.pending,
            Some(Claim {
                tick: t(60),
                owner: "a".into(),
                claimed_at: t(60)
            })
        );
        // Only the owner completes; then the claim is gone.
        assert!(!b.complete("s", t(60), "b", "7", t(61)).unwrap());
        assert!(a.complete("s", t(60), "a", "7", t(61)).unwrap());
        let st = a.get("s").unwrap().unwrap();
        assert_eq!(st.pending, None);
        assert_eq!(st.last_fired, Some(t(60)));
        assert_eq!(st.last_message_id.as_deref(), Some("7"));
    }

    #[test]
    fn take_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = TriggerDb::open(&dir.path().join("triggers.db")).unwrap();
        a.reconcile(&[("s".into(), false)], t(0)).unwrap();
        assert!(a.claim("s", t(0), t(60), "a", t(60)).unwrap());
        let claim = a.get("s").unwrap().unwrap().pending.unwrap();
        assert!(a.take_over("s", &claim, "b", t(200)).unwrap());
        assert!(!a.take_over("s", &claim, "c", t(200)).unwrap());
        assert_eq!(a.get("s").unwrap().unwrap().pending.unwrap().owner, "b");
    }

    #[test]
    fn pause_resume_and_reconcile() {
        let dir = tempfile::tempdir().unwrap();
        let db = TriggerDb::open(&dir.path().join("triggers.db")).unwrap();
        db.reconcile(&[("s".into(), false), ("gone".into(), false)], t(0))
            .unwrap();
        assert!(db.set_paused("s", true, t(10)).unwrap());
        assert!(
            !db.claim("s", t(0), t(60), "a", t(60)).unwrap(),
            "no claim while paused"
        );
        // Re-applying the same declaration keeps the run-time pause.
        db.reconcile(&[("s".into(), false)], t(20)).unwrap();
        let st = db.get("s").unwrap().unwrap();
        assert!(st.paused);
        assert!(db.get("gone").unwrap().is_none());
        // Resume moves the cursor past the pause.
        assert!(db.set_paused("s", false, t(500)).unwrap());
        assert_eq!(db.get("s").unwrap().unwrap().cursor, t(500));
        // Declaring paused = true pauses; declaring false again resumes.
        db.reconcile(&[("s".into(), true)], t(600)).unwrap();
        assert!(db.get("s").unwrap().unwrap().paused);
        db.reconcile(&[("s".into(), false)], t(700)).unwrap();
        let st = db.get("s").unwrap().unwrap();
        assert!(!st.paused);
        assert_eq!(st.cursor, t(700));
        assert!(!db.set_paused("nope", true, t(0)).unwrap());
    }
}
