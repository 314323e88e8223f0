//! `pools.db`: pools and their tokens, machines and their states, the spans
//! of time each machine was up (for cost), and leases (the fencing tokens).
//!
//! A lease row is the single authority on whether a report is accepted: the
//! result handler and the expiry sweep both change it with one conditional
//! UPDATE, so exactly one of them wins.

use std::path::Path;
use std::sync::Mutex;

use pubrun_core::pool::{MachineState, PoolSpec};
use pubrun_core::run::Exit;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

pub type Result<T> = std::result::Result<T, String>;

fn err(e: rusqlite::Error) -> String {
    format!("pools database: {e}")
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    token TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    name TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    provider TEXT NOT NULL,
    provider_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    state_since_ms INTEGER NOT NULL,
    idle_since_ms INTEGER,
    created_ms INTEGER NOT NULL,
    cordoned INTEGER NOT NULL DEFAULT 0,
    slots INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS machine_spans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine TEXT NOT NULL,
    pool TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER
);
CREATE INDEX IF NOT EXISTS spans_by_machine ON machine_spans(machine, start_ms);
CREATE TABLE IF NOT EXISTS leases (
    token INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    pool TEXT NOT NULL,
    machine TEXT NOT NULL,
    state TEXT NOT NULL,
    assigned_ms INTEGER NOT NULL,
    started_ms INTEGER,
    ended_ms INTEGER,
    exit TEXT,
    reason TEXT NOT NULL DEFAULT ''
);
-- The last machine number handed out per pool: names are never reused,
-- so a new machine never collides with one still being deleted and its
-- cost spans never merge with an older machine's.
CREATE TABLE IF NOT EXISTS machine_numbers (
    pool TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
-- One-time bootstrap tokens of machines a pool started (gce): the
-- instance's metadata holds one instead of the pool token; its agent
-- trades it for the pool token at first contact, and it is dropped once
-- that agent has called back with the pool token.
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    machine TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    token TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_run ON leases(run_id, token);
CREATE INDEX IF NOT EXISTS leases_active ON leases(state) WHERE state IN ('assigned', 'running');
"#;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineRow {
    pub name: String,
    pub pool: String,
    pub provider: String,
    pub provider_id: String,
    pub state: MachineState,
    pub state_since_ms: i64,
    pub idle_since_ms: Option<i64>,
    pub created_ms: i64,
    pub cordoned: bool,
    pub slots: u32,
    pub last_error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Assigned,
    Running,
    Done,
    Revoked,
}

impl LeaseState {
    fn as_str(self) -> &'static str {
        match self {
            LeaseState::Assigned => "assigned",
            LeaseState::Running => "running",
            LeaseState::Done => "done",
            LeaseState::Revoked => "revoked",
        }
    }
    fn parse(s: &str) -> LeaseState {
        match s {
            "assigned" => LeaseState::Assigned,
            "running" => LeaseState::Running,
            "done" => LeaseState::Done,
            _ => LeaseState::Revoked,
        }
    }
    pub fn is_active(self) -> bool {
        matches!(self, LeaseState::Assigned | LeaseState::Running)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseRow {
    pub token: u64,
    pub run_id: String,
    pub job: String,
    pub attempt: u32,
    pub pool: String,
    pub machine: String,
    pub state: LeaseState,
    pub assigned_ms: i64,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub exit: Option<Exit>,
    pub reason: String,
}

pub struct PoolsDb {
    conn: Mutex<Connection>,
}

/// An up-span: (machine, pool, start ms, end ms or None while up).
pub type UpSpan = (String, String, i64, Option<i64>);

impl PoolsDb {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(PoolsDb {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- pools ----

    /// Stores the spec; keeps the existing token unless `token` is given.
    /// Returns the token in force.
    pub fn put_pool(&self, spec: &PoolSpec, token: Option<&str>, fresh: &str) -> Result<String> {
        let c = self.conn();
        let existing: Option<String> = c
            .query_row(
                "SELECT token FROM pools WHERE name = ?1",
                [&spec.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let token = token
            .map(str::to_string)
            .or(existing)
            .unwrap_or_else(|| fresh.to_string());
        let json = serde_json::to_string(spec).map_err(|e| e.to_string())?;
        c.execute(
            "INSERT INTO pools(name, spec, token) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET spec = ?2, token = ?3",
            params![spec.name, json, token],
        )
        .map_err(err)?;
        Ok(token)
    }

    pub fn delete_pool(&self, name: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM pools WHERE name = ?1", [name])
            .map_err(err)?;
        Ok(())
    }

    pub fn pools(&self) -> Result<Vec<(PoolSpec, String)>> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT spec, token FROM pools ORDER BY name")
            .map_err(err)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (spec, token) = row.map_err(err)?;
            match serde_json::from_str(&spec) {
                Ok(s) => out.push((s, token)),
                Err(e) => tracing::error!(error = %e, "unreadable pool spec in pools.db; skipped"),
            }
        }
        Ok(out)
    }

    // ---- machines ----

    /// Writes a machine; a change of state is logged (one line per
    /// machine transition, whoever makes it).
    pub fn upsert_machine(&self, m: &MachineRow) -> Result<()> {
        let c = self.conn();
        let before: Option<String> = c
            .query_row(
                "SELECT state FROM machines WHERE name = ?1",
                [&m.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if before.as_deref() != Some(m.state.as_str()) {
            tracing::info!(
                machine = m.name,
                pool = m.pool,
                provider = m.provider,
                from = before.as_deref().unwrap_or("none"),
                state = m.state.as_str(),
                error = (!m.last_error.is_empty()).then_some(m.last_error.as_str()),
                "machine state changed"
            );
        }
        c.execute(
            "INSERT INTO machines(name, pool, provider, provider_id, state, state_since_ms,
                     idle_since_ms, created_ms, cordoned, slots, last_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT(name) DO UPDATE SET pool = ?2, provider = ?3, provider_id = ?4,
                     state = ?5, state_since_ms = ?6, idle_since_ms = ?7, cordoned = ?9,
                     slots = ?10, last_error = ?11",
            params![
                m.name,
                m.pool,
                m.provider,
                m.provider_id,
                m.state.as_str(),
                m.state_since_ms,
                m.idle_since_ms,
                m.created_ms,
                m.cordoned,
                m.slots,
                m.last_error
            ],
        )
        .map_err(err)?;
        Ok(())
    }

    fn row_to_machine(r: &rusqlite::Row<'_>) -> rusqlite::Result<MachineRow> {
        let state: String = r.get(4)?;
        Ok(MachineRow {
            name: r.get(0)?,
            pool: r.get(1)?,
            provider: r.get(2)?,
            provider_id: r.get(3)?,
            state: MachineState::parse(&state).unwrap_or(MachineState::Failed),
            state_since_ms: r.get(5)?,
            idle_since_ms: r.get(6)?,
            created_ms: r.get(7)?,
            cordoned: r.get(8)?,
            slots: r.get(9)?,
            last_error: r.get(10)?,
        })
    }

    const MACHINE_COLS: &'static str = "name, pool, provider, provider_id, state, state_since_ms,
        idle_since_ms, created_ms, cordoned, slots, last_error";

    pub fn machines(&self) -> Result<Vec<MachineRow>> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!(
                "SELECT {} FROM machines ORDER BY pool, created_ms, name",
                Self::MACHINE_COLS
            ))
            .map_err(err)?;
        let rows = st.query_map([], Self::row_to_machine).map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    pub fn machine(&self, name: &str) -> Result<Option<MachineRow>> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {} FROM machines WHERE name = ?1",
                    Self::MACHINE_COLS
                ),
                [name],
                Self::row_to_machine,
            )
            .optional()
            .map_err(err)
    }

    /// A machine name never used before in this database:
    /// `{prefix}-{pool}-{n}` with `n` one past the pool's last number
    /// (kept when the pool is removed and declared again), skipping any
    /// name that a machine row or a cost span still carries.
    pub fn new_machine_name(&self, pool: &str, prefix: &str) -> Result<String> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(err)?;
        let last: i64 = tx
            .query_row(
                "SELECT last FROM machine_numbers WHERE pool = ?1",
                [pool],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?
            .unwrap_or(0);
        let mut n = last + 1;
        let name = loop {
            let candidate = format!("{prefix}-{pool}-{n}");
            let taken: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM machines WHERE name = ?1)
                         OR EXISTS(SELECT 1 FROM machine_spans WHERE machine = ?1)",
                    [&candidate],
                    |r| r.get(0),
                )
                .map_err(err)?;
            if !taken {
                break candidate;
            }
            n += 1;
        };
        tx.execute(
            "INSERT INTO machine_numbers(pool, last) VALUES (?1, ?2)
             ON CONFLICT(pool) DO UPDATE SET last = ?2",
            params![pool, n],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(name)
    }

    /// Forgets a machine the provider has deleted (its cost spans and
    /// leases stay; its name is never given out again).
    pub fn put_bootstrap(&self, machine: &str, pool: &str, token: &str) -> Result<()> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO bootstrap_tokens (machine, pool, token) VALUES (?1, ?2, ?3)",
                [machine, pool, token],
            )
            .map_err(err)?;
        Ok(())
    }

    /// (machine, pool, token) of every bootstrap token not yet used up.
    pub fn bootstraps(&self) -> Result<Vec<(String, String, String)>> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT machine, pool, token FROM bootstrap_tokens")
            .map_err(err)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(err)?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(err)
    }

    pub fn delete_bootstrap(&self, machine: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM bootstrap_tokens WHERE machine = ?1", [machine])
            .map_err(err)?;
        Ok(())
    }

    pub fn delete_machine(&self, name: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM machines WHERE name = ?1", [name])
            .map_err(err)?;
        Ok(())
    }

    /// Opens an up-span for `machine` unless one is open.
    pub fn span_open(&self, machine: &str, pool: &str, now_ms: i64) -> Result<()> {
        let c = self.conn();
        let open: Option<i64> = c
            .query_row(
                "SELECT id FROM machine_spans WHERE machine = ?1 AND end_ms IS NULL",
                [machine],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if open.is_none() {
            c.execute(
                "INSERT INTO machine_spans(machine, pool, start_ms) VALUES (?1, ?2, ?3)",
                params![machine, pool, now_ms],
            )
            .map_err(err)?;
        }
        Ok(())
    }

    pub fn span_close(&self, machine: &str, now_ms: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE machine_spans SET end_ms = MAX(start_ms, ?2) WHERE machine = ?1 AND end_ms IS NULL",
                params![machine, now_ms],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Up-spans overlapping `[since, until)`: (machine, pool, start, end or None).
    pub fn spans(&self, since_ms: i64) -> Result<Vec<UpSpan>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT machine, pool, start_ms, end_ms FROM machine_spans
                 WHERE end_ms IS NULL OR end_ms > ?1 ORDER BY machine, start_ms",
            )
            .map_err(err)?;
        let rows = st
            .query_map([since_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    // ---- leases ----

    pub fn new_lease(
        &self,
        run_id: &str,
        job: &str,
        attempt: u32,
        pool: &str,
        machine: &str,
        now_ms: i64,
    ) -> Result<u64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO leases(run_id, job, attempt, pool, machine, state, assigned_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'assigned', ?6)",
            params![run_id, job, attempt, pool, machine, now_ms],
        )
        .map_err(err)?;
        Ok(c.last_insert_rowid() as u64)
    }

    fn row_to_lease(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRow> {
        let state: String = r.get(6)?;
        let exit: Option<String> = r.get(10)?;
        Ok(LeaseRow {
            token: r.get::<_, i64>(0)? as u64,
            run_id: r.get(1)?,
            job: r.get(2)?,
            attempt: r.get(3)?,
            pool: r.get(4)?,
            machine: r.get(5)?,
            state: LeaseState::parse(&state),
            assigned_ms: r.get(7)?,
            started_ms: r.get(8)?,
            ended_ms: r.get(9)?,
            exit: exit.and_then(|e| serde_json::from_str(&e).ok()),
            reason: r.get(11)?,
        })
    }

    const LEASE_COLS: &'static str = "token, run_id, job, attempt, pool, machine, state,
        assigned_ms, started_ms, ended_ms, exit, reason";

    pub fn lease(&self, token: u64) -> Result<Option<LeaseRow>> {
        self.conn()
            .query_row(
                &format!("SELECT {} FROM leases WHERE token = ?1", Self::LEASE_COLS),
                [token as i64],
                Self::row_to_lease,
            )
            .optional()
            .map_err(err)
    }

    /// The newest lease of a run's attempt, if any.
    pub fn lease_of_run(&self, run_id: &str) -> Result<Option<LeaseRow>> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {} FROM leases WHERE run_id = ?1 ORDER BY token DESC LIMIT 1",
                    Self::LEASE_COLS
                ),
                [run_id],
                Self::row_to_lease,
            )
            .optional()
            .map_err(err)
    }

    pub fn active_leases(&self) -> Result<Vec<LeaseRow>> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!(
                "SELECT {} FROM leases WHERE state IN ('assigned', 'running') ORDER BY token",
                Self::LEASE_COLS
            ))
            .map_err(err)?;
        let rows = st.query_map([], Self::row_to_lease).map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    /// Leases (any state) that ran since `since_ms`, for cost reports.
    pub fn leases_since(&self, since_ms: i64) -> Result<Vec<LeaseRow>> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!(
                "SELECT {} FROM leases WHERE ended_ms IS NULL OR ended_ms > ?1 ORDER BY token",
                Self::LEASE_COLS
            ))
            .map_err(err)?;
        let rows = st.query_map([since_ms], Self::row_to_lease).map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    pub fn lease_started(&self, token: u64, now_ms: i64) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE leases SET state = 'running', started_ms = ?2
                 WHERE token = ?1 AND state = 'assigned'",
                params![token as i64, now_ms],
            )
            .map_err(err)?;
        Ok(n == 1)
    }

    /// Ends an active lease: `Done` with the agent's exit, or `Revoked`.
    /// Returns false when the lease was no longer active (someone else won).
    pub fn lease_end(
        &self,
        token: u64,
        state: LeaseState,
        exit: Option<&Exit>,
        reason: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let exit = exit.map(|e| serde_json::to_string(e).unwrap_or_default());
        let n = self
            .conn()
            .execute(
                "UPDATE leases SET state = ?2, exit = ?3, reason = ?4, ended_ms = ?5,
                     started_ms = COALESCE(started_ms, ?5)
                 WHERE token = ?1 AND state IN ('assigned', 'running')",
                params![token as i64, state.as_str(), exit, reason, now_ms],
            )
            .map_err(err)?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, pool: &str, state: MachineState) -> MachineRow {
        MachineRow {
            name: name.into(),
            pool: pool.into(),
            provider: "docker".into(),
            provider_id: String::new(),
            state,
            state_since_ms: 0,
            idle_since_ms: None,
            created_ms: 0,
            cordoned: false,
            slots: 1,
            last_error: String::new(),
        }
    }

    #[test]
    fn machine_names_are_never_given_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = PoolsDb::open(&dir.path().join("pools.db")).unwrap();
        let a = db.new_machine_name("p", "pubrun").unwrap();
        let b = db.new_machine_name("p", "pubrun").unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("pubrun-p-1", "pubrun-p-2"));
        for n in [&a, &b] {
            db.upsert_machine(&row(n, "p", MachineState::Provisioning))
                .unwrap();
            db.span_open(n, "p", 10).unwrap();
            db.span_close(n, 20).unwrap();
            // Deleted by the provider: the row goes, the name stays used.
            db.delete_machine(n).unwrap();
        }
        assert!(db.machines().unwrap().is_empty());
        let c = db.new_machine_name("p", "pubrun").unwrap();
        let d = db.new_machine_name("p", "pubrun").unwrap();
        assert_eq!((c.as_str(), d.as_str()), ("pubrun-p-3", "pubrun-p-4"));
        // Each machine has its own cost row.
        let spans = db.spans(0).unwrap();
        assert_eq!(spans.len(), 2);
        assert_ne!(spans[0].0, spans[1].0);
        // Other pools count on their own; a pool removed and declared again
        // does not start over.
        assert_eq!(db.new_machine_name("q", "pubrun").unwrap(), "pubrun-q-1");
        db.delete_pool("p").unwrap();
        assert_eq!(db.new_machine_name("p", "pubrun").unwrap(), "pubrun-p-5");
    }

    #[test]
    fn names_left_by_an_older_database_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let db = PoolsDb::open(&dir.path().join("pools.db")).unwrap();
        // Rows and spans written before numbers were kept.
        db.upsert_machine(&row("pubrun-p-1", "p", MachineState::Stopped))
            .unwrap();
        db.span_open("pubrun-p-2", "p", 0).unwrap();
        assert_eq!(db.new_machine_name("p", "pubrun").unwrap(), "pubrun-p-3");
    }
}
