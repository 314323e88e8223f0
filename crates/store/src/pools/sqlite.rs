//! The embedded pool store: `pools.db` in the data directory, on the shared
//! SQLite opener (`crate::sqlite`). Migration 1 is the schema pubrun wrote
//! before the opener existed (all `IF NOT EXISTS`), so a `pools.db` of an
//! older pubrun (user_version 0, tables present) opens and migrates.

use std::path::Path;

use pubrun_core::pool::PoolSpec;
use pubrun_core::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    lease_end_parts, log_transition, parse_machine_state, parse_spec, to_json, token_param,
    Bootstrap, LeaseEnd, LeaseRow, MachineRow, NewLease, PoolStore, RawLease, UpSpan,
};
use crate::sqlite::{query_all, SqliteDb};

/// Numbered migrations (`PRAGMA user_version`); never edit a released one.
const MIGRATIONS: &[&str] = &[
    r#"
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
CREATE TABLE IF NOT EXISTS machine_numbers (
    pool TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    machine TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    token TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_run ON leases(run_id, token);
CREATE INDEX IF NOT EXISTS leases_active ON leases(state) WHERE state IN ('assigned', 'running');
"#,
    // 2: "failed but maybe still running" was a " [not stopped]" suffix of
    // last_error; it is a column now.
    "ALTER TABLE machines ADD COLUMN needs_stop INTEGER NOT NULL DEFAULT 0;
     UPDATE machines SET needs_stop = 1,
         last_error = substr(last_error, 1, length(last_error) - length(' [not stopped]'))
     WHERE last_error LIKE '% [not stopped]';",
];

fn db_err(e: rusqlite::Error) -> Error {
    Error::unavailable(format!("pool store: {e}"))
}

const MACHINE_COLS: &str = "name, pool, provider, provider_id, state, state_since_ms, \
     idle_since_ms, created_ms, cordoned, slots, last_error, needs_stop";

const LEASE_COLS: &str = "token, run_id, job, attempt, pool, machine, state, \
     assigned_ms, started_ms, ended_ms, exit, reason";

pub struct SqlitePoolStore {
    db: SqliteDb,
}

impl SqlitePoolStore {
    /// Opens (creating, migrating) `path` off the async runtime.
    pub async fn open(path: &Path) -> Result<Self> {
        Ok(SqliteDb::open(path, MIGRATIONS)
            .await
            .map(|db| Self { db })?)
    }
}

fn machine_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(MachineRow, String)> {
    let state: String = r.get(4)?;
    Ok((
        MachineRow {
            name: r.get(0)?,
            pool: r.get(1)?,
            provider: r.get(2)?,
            provider_id: r.get(3)?,
            // Parsed by the caller: a bad state is an error, not a default.
            state: pubrun_core::pool::MachineState::Failed,
            state_since_ms: r.get(5)?,
            idle_since_ms: r.get(6)?,
            created_ms: r.get(7)?,
            cordoned: r.get(8)?,
            slots: r.get(9)?,
            last_error: r.get(10)?,
            needs_stop: r.get(11)?,
        },
        state,
    ))
}

fn query_machines(
    c: &Connection,
    where_: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<MachineRow>> {
    let sql = format!("SELECT {MACHINE_COLS} FROM machines {where_}");
    let rows = query_all(c, &sql, params, machine_row).map_err(db_err)?;
    rows.into_iter()
        .map(|(mut m, state)| {
            m.state = parse_machine_state(&m.name, &state)?;
            Ok(m)
        })
        .collect()
}

fn raw_lease(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawLease> {
    Ok(RawLease {
        token: r.get(0)?,
        run_id: r.get(1)?,
        job: r.get(2)?,
        attempt: r.get(3)?,
        pool: r.get(4)?,
        machine: r.get(5)?,
        state: r.get(6)?,
        assigned_ms: r.get(7)?,
        started_ms: r.get(8)?,
        ended_ms: r.get(9)?,
        exit: r.get(10)?,
        reason: r.get(11)?,
    })
}

fn query_leases(
    c: &Connection,
    where_: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<LeaseRow>> {
    let sql = format!("SELECT {LEASE_COLS} FROM leases {where_}");
    let rows = query_all(c, &sql, params, raw_lease).map_err(db_err)?;
    rows.into_iter().map(RawLease::parse).collect()
}

#[async_trait::async_trait]
impl PoolStore for SqlitePoolStore {
    async fn put_pool(&self, spec: &PoolSpec, token: Option<&str>, fresh: &str) -> Result<String> {
        let json = to_json(spec)?;
        let name = spec.name.clone();
        let token = token.map(str::to_string);
        let fresh = fresh.to_string();
        self.db
            .run(move |c| {
                let tx = c.transaction().map_err(db_err)?;
                let existing: Option<String> = tx
                    .query_row("SELECT token FROM pools WHERE name = ?1", [&name], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(db_err)?;
                let token = token.or(existing).unwrap_or(fresh);
                tx.execute(
                    "INSERT INTO pools(name, spec, token) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET spec = ?2, token = ?3",
                    params![name, json, token],
                )
                .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(token)
            })
            .await
    }

    async fn delete_pool(&self, name: &str) -> Result<()> {
        let sql = "DELETE FROM pools WHERE name = ?1";
        self.db.execute(sql, (name.to_string(),), db_err).await?;
        Ok(())
    }

    async fn pools(&self) -> Result<Vec<(PoolSpec, String)>> {
        self.db
            .run(|c| {
                let sql = "SELECT name, spec, token FROM pools ORDER BY name";
                let rows = query_all(c, sql, [], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(db_err)?;
                rows.into_iter()
                    .map(|(name, spec, token)| Ok((parse_spec(&name, &spec)?, token)))
                    .collect()
            })
            .await
    }

    async fn upsert_machine(&self, m: &MachineRow) -> Result<()> {
        let m = m.clone();
        self.db
            .run(move |c| {
                let tx = c.transaction().map_err(db_err)?;
                let before: Option<String> = tx
                    .query_row(
                        "SELECT state FROM machines WHERE name = ?1",
                        [&m.name],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err)?;
                tx.execute(
                    "INSERT INTO machines(name, pool, provider, provider_id, state, state_since_ms,
                         idle_since_ms, created_ms, cordoned, slots, last_error, needs_stop)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT(name) DO UPDATE SET pool = ?2, provider = ?3, provider_id = ?4,
                         state = ?5, state_since_ms = ?6, idle_since_ms = ?7, cordoned = ?9,
                         slots = ?10, last_error = ?11, needs_stop = ?12",
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
                        m.last_error,
                        m.needs_stop,
                    ],
                )
                .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                log_transition(before.as_deref(), &m);
                Ok(())
            })
            .await
    }

    async fn machines(&self) -> Result<Vec<MachineRow>> {
        self.db
            .run(|c| query_machines(c, "ORDER BY pool, created_ms, name", []))
            .await
    }

    async fn machine(&self, name: &str) -> Result<Option<MachineRow>> {
        let name = name.to_string();
        self.db
            .run(move |c| Ok(query_machines(c, "WHERE name = ?1", [name])?.pop()))
            .await
    }

    async fn new_machine_name(&self, pool: &str, prefix: &str) -> Result<String> {
        let pool = pool.to_string();
        let prefix = prefix.to_string();
        self.db
            .run(move |c| {
                let tx = c.transaction().map_err(db_err)?;
                let last: i64 = tx
                    .query_row(
                        "SELECT last FROM machine_numbers WHERE pool = ?1",
                        [&pool],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err)?
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
                        .map_err(db_err)?;
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
                .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(name)
            })
            .await
    }

    async fn delete_machine(&self, name: &str) -> Result<()> {
        let sql = "DELETE FROM machines WHERE name = ?1";
        self.db.execute(sql, (name.to_string(),), db_err).await?;
        Ok(())
    }

    async fn put_bootstrap(&self, b: &Bootstrap) -> Result<()> {
        let sql =
            "INSERT OR REPLACE INTO bootstrap_tokens (machine, pool, token) VALUES (?1, ?2, ?3)";
        let b = b.clone();
        self.db
            .execute(sql, (b.machine, b.pool, b.token), db_err)
            .await?;
        Ok(())
    }

    async fn bootstraps(&self) -> Result<Vec<Bootstrap>> {
        self.db
            .run(|c| {
                let sql = "SELECT machine, pool, token FROM bootstrap_tokens ORDER BY machine";
                query_all(c, sql, [], |r| {
                    Ok(Bootstrap {
                        machine: r.get(0)?,
                        pool: r.get(1)?,
                        token: r.get(2)?,
                    })
                })
                .map_err(db_err)
            })
            .await
    }

    async fn delete_bootstrap(&self, machine: &str) -> Result<()> {
        let sql = "DELETE FROM bootstrap_tokens WHERE machine = ?1";
        self.db.execute(sql, (machine.to_string(),), db_err).await?;
        Ok(())
    }

    async fn span_open(&self, machine: &str, pool: &str, now_ms: i64) -> Result<()> {
        let machine = machine.to_string();
        let pool = pool.to_string();
        self.db
            .run(move |c| {
                let tx = c.transaction().map_err(db_err)?;
                let open: Option<i64> = tx
                    .query_row(
                        "SELECT id FROM machine_spans WHERE machine = ?1 AND end_ms IS NULL",
                        [&machine],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err)?;
                if open.is_none() {
                    tx.execute(
                        "INSERT INTO machine_spans(machine, pool, start_ms) VALUES (?1, ?2, ?3)",
                        params![machine, pool, now_ms],
                    )
                    .map_err(db_err)?;
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn span_close(&self, machine: &str, now_ms: i64) -> Result<()> {
        let sql = "UPDATE machine_spans SET end_ms = MAX(start_ms, ?2)
                 WHERE machine = ?1 AND end_ms IS NULL";
        self.db
            .execute(sql, (machine.to_string(), now_ms), db_err)
            .await?;
        Ok(())
    }

    async fn spans(&self, since_ms: i64) -> Result<Vec<UpSpan>> {
        self.db
            .run(move |c| {
                let sql = "SELECT machine, pool, start_ms, end_ms FROM machine_spans
                     WHERE end_ms IS NULL OR end_ms > ?1 ORDER BY machine, start_ms";
                query_all(c, sql, [since_ms], |r| {
                    Ok(UpSpan {
                        machine: r.get(0)?,
                        pool: r.get(1)?,
                        start_ms: r.get(2)?,
                        end_ms: r.get(3)?,
                    })
                })
                .map_err(db_err)
            })
            .await
    }

    async fn new_lease(&self, l: &NewLease<'_>) -> Result<u64> {
        let (run_id, job, pool, machine) = (
            l.run_id.to_string(),
            l.job.to_string(),
            l.pool.to_string(),
            l.machine.to_string(),
        );
        let (attempt, now_ms) = (l.attempt, l.now_ms);
        self.db
            .run(move |c| {
                c.execute(
                    "INSERT INTO leases(run_id, job, attempt, pool, machine, state, assigned_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'assigned', ?6)",
                    params![run_id, job, attempt, pool, machine, now_ms],
                )
                .map_err(db_err)?;
                Ok(c.last_insert_rowid() as u64)
            })
            .await
    }

    async fn lease(&self, token: u64) -> Result<Option<LeaseRow>> {
        let token = token_param(token)?;
        self.db
            .run(move |c| Ok(query_leases(c, "WHERE token = ?1", [token])?.pop()))
            .await
    }

    async fn lease_of_run(&self, run_id: &str) -> Result<Option<LeaseRow>> {
        let run_id = run_id.to_string();
        self.db
            .run(move |c| {
                Ok(
                    query_leases(c, "WHERE run_id = ?1 ORDER BY token DESC LIMIT 1", [run_id])?
                        .pop(),
                )
            })
            .await
    }

    async fn active_leases(&self) -> Result<Vec<LeaseRow>> {
        self.db
            .run(|c| {
                query_leases(
                    c,
                    "WHERE state IN ('assigned', 'running') ORDER BY token",
                    [],
                )
            })
            .await
    }

    async fn leases_since(&self, since_ms: i64) -> Result<Vec<LeaseRow>> {
        self.db
            .run(move |c| {
                query_leases(
                    c,
                    "WHERE ended_ms IS NULL OR ended_ms > ?1 ORDER BY token",
                    [since_ms],
                )
            })
            .await
    }

    async fn lease_started(&self, token: u64, now_ms: i64) -> Result<bool> {
        let sql = "UPDATE leases SET state = 'running', started_ms = ?2
                     WHERE token = ?1 AND state = 'assigned'";
        let n = self.db.execute(sql, (token_param(token)?, now_ms), db_err);
        Ok(n.await? == 1)
    }

    async fn lease_end(&self, token: u64, end: LeaseEnd<'_>, now_ms: i64) -> Result<bool> {
        let sql = "UPDATE leases SET state = ?2, exit = ?3, reason = ?4, ended_ms = ?5,
                         started_ms = COALESCE(started_ms, ?5)
                     WHERE token = ?1 AND state IN ('assigned', 'running')";
        let (state, exit, reason) = lease_end_parts(&end)?;
        let params = (token_param(token)?, state.as_str(), exit, reason, now_ms);
        Ok(self.db.execute(sql, params, db_err).await? == 1)
    }
}
