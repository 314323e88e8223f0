//! The embedded trigger store: `triggers.db` in the data directory (the file
//! and schema pubrun has always used), on the shared SQLite opener
//! (`crate::sqlite`). Several handles may open the same file; the claim
//! compare-and-set holds between them.

use std::collections::HashSet;
use std::path::Path;

use chrono::{DateTime, Utc};
use pubrun_core::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    check_scope, ms, Claim, DefKind, Definition, RawState, Replacement, ScheduleState, Scope,
    TickClaim, TriggerStore,
};
use crate::sqlite::{query_all, SqliteDb};

/// Numbered migrations (`PRAGMA user_version`); never edit a released one.
const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    r#"
CREATE TABLE definitions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    spec TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
"#,
];

const COLUMNS: &str = "name, cursor_ms, paused, config_paused, pending_tick_ms, claimed_by, claimed_at_ms, last_fired_ms, last_message_id, last_error";

fn db_err(e: rusqlite::Error) -> Error {
    Error::unavailable(format!("triggers.db: {e}"))
}

fn raw_state(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawState> {
    Ok(RawState {
        name: r.get(0)?,
        cursor_ms: r.get(1)?,
        paused: r.get::<_, i64>(2)? != 0,
        config_paused: r.get::<_, i64>(3)? != 0,
        pending_tick_ms: r.get(4)?,
        claimed_by: r.get(5)?,
        claimed_at_ms: r.get(6)?,
        last_fired_ms: r.get(7)?,
        last_message_id: r.get(8)?,
        last_error: r.get(9)?,
    })
}

pub struct SqliteTriggerStore {
    db: SqliteDb,
}

impl SqliteTriggerStore {
    /// Opens (creating, migrating) `path`, normally `<data_dir>/triggers.db`.
    /// Blocking; quick.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(SqliteDb::open_blocking(path, MIGRATIONS).map(|db| Self { db })?)
    }

    /// Records a value shown beside schedule `name` (`sql`: ?1 name, ?2
    /// the value, ?3 now).
    async fn note(
        &self,
        sql: &'static str,
        name: &str,
        value: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let params = (name.to_string(), value.to_string(), ms(now));
        self.db.execute(sql, params, db_err).await?;
        Ok(())
    }

    /// [`open`](Self::open) off the async runtime.
    pub async fn open_async(path: &Path) -> Result<Self> {
        Ok(SqliteDb::open(path, MIGRATIONS)
            .await
            .map(|db| Self { db })?)
    }
}

#[async_trait::async_trait]
impl TriggerStore for SqliteTriggerStore {
    async fn reconcile(&self, declared: &[(String, bool)], now: DateTime<Utc>) -> Result<()> {
        let declared = declared.to_vec();
        self.db
            .run(move |c| {
                let tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db_err)?;
                upsert_states(&tx, &declared, now)?;
                let keep: HashSet<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
                delete_states_except(&tx, &keep)?;
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn definitions(&self, kind: DefKind) -> Result<Vec<Definition>> {
        self.db.run(move |c| definitions(c, kind)).await
    }

    async fn replace_definitions(&self, r: Replacement<'_>) -> Result<Vec<Definition>> {
        let project = match r.scope {
            Scope::All => None,
            Scope::Project(p) => Some(p.to_string()),
        };
        let (kind, now, defs, declared) = (r.kind, r.now, r.defs.to_vec(), r.declared());
        self.db
            .run(move |c| {
                let scope = match &project {
                    None => Scope::All,
                    Some(p) => Scope::Project(p),
                };
                let tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db_err)?;
                let existing = definitions(&tx, kind)?;
                check_scope(kind, scope, &existing, &defs)?;
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
                for (d, _) in &defs {
                    tx.execute(
                    "INSERT INTO definitions (kind, name, project, spec) VALUES (?1, ?2, ?3, ?4)",
                    params![kind.as_str(), d.name, d.project, d.spec],
                )
                .map_err(db_err)?;
                }
                let all = definitions(&tx, kind)?;
                if kind == DefKind::Schedule {
                    upsert_states(&tx, &declared, now)?;
                    let keep = all.iter().map(|d| d.name.as_str()).collect();
                    delete_states_except(&tx, &keep)?;
                }
                tx.commit().map_err(db_err)?;
                Ok(all)
            })
            .await
    }

    async fn get(&self, name: &str) -> Result<Option<ScheduleState>> {
        let name = name.to_string();
        self.db
            .run(move |c| {
                c.query_row(
                    &format!("SELECT {COLUMNS} FROM schedules WHERE name = ?1"),
                    params![name],
                    raw_state,
                )
                .optional()
                .map_err(db_err)?
                .map(RawState::parse)
                .transpose()
            })
            .await
    }

    async fn list(&self) -> Result<Vec<ScheduleState>> {
        self.db
            .run(|c| {
                let sql = format!("SELECT {COLUMNS} FROM schedules ORDER BY name");
                let rows = query_all(c, &sql, [], raw_state).map_err(db_err)?;
                rows.into_iter().map(RawState::parse).collect()
            })
            .await
    }

    async fn claim(&self, c: TickClaim<'_>, expected_cursor: DateTime<Utc>) -> Result<bool> {
        let n = self.db.execute(
            "UPDATE schedules SET cursor_ms = ?3, pending_tick_ms = ?3, claimed_by = ?4, claimed_at_ms = ?5, updated_ms = ?5
             WHERE name = ?1 AND cursor_ms = ?2 AND paused = 0",
            (c.name.to_string(), ms(expected_cursor), ms(c.tick), c.owner.to_string(), ms(c.now)),
            db_err,
        );
        Ok(n.await? == 1)
    }

    async fn take_over(&self, c: TickClaim<'_>, from: &Claim) -> Result<bool> {
        let n = self.db.execute(
            "UPDATE schedules SET claimed_by = ?5, claimed_at_ms = ?6, updated_ms = ?6
             WHERE name = ?1 AND pending_tick_ms = ?2 AND claimed_by = ?3 AND claimed_at_ms = ?4",
            (
                c.name.to_string(),
                ms(c.tick),
                from.owner.clone(),
                ms(from.claimed_at),
                c.owner.to_string(),
                ms(c.now),
            ),
            db_err,
        );
        Ok(n.await? == 1)
    }

    async fn complete(&self, c: TickClaim<'_>, message_id: &str) -> Result<bool> {
        let (name, owner, message_id) = (
            c.name.to_string(),
            c.owner.to_string(),
            message_id.to_string(),
        );
        let (tick, now) = (c.tick, c.now);
        self.db.run(move |c| {
            let tx = c.transaction().map_err(db_err)?;
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
        })
        .await
    }

    async fn record_error(&self, name: &str, error: &str, now: DateTime<Utc>) -> Result<()> {
        let sql = "UPDATE schedules SET last_error = ?2, updated_ms = ?3 WHERE name = ?1";
        self.note(sql, name, error, now).await
    }

    async fn record_run_now(&self, name: &str, message_id: &str, now: DateTime<Utc>) -> Result<()> {
        let sql = "UPDATE schedules SET last_message_id = ?2, updated_ms = ?3 WHERE name = ?1";
        self.note(sql, name, message_id, now).await
    }

    async fn set_paused(&self, name: &str, paused: bool, now: DateTime<Utc>) -> Result<bool> {
        let sql = if paused {
            "UPDATE schedules SET paused = 1, updated_ms = ?2 WHERE name = ?1"
        } else {
            "UPDATE schedules SET cursor_ms = CASE WHEN paused = 1 THEN MAX(cursor_ms, ?2) ELSE cursor_ms END, paused = 0, updated_ms = ?2 WHERE name = ?1"
        };
        let n = self.db.execute(sql, (name.to_string(), ms(now)), db_err);
        Ok(n.await? == 1)
    }
}

fn definitions(conn: &Connection, kind: DefKind) -> Result<Vec<Definition>> {
    let sql = "SELECT name, project, spec FROM definitions WHERE kind = ?1 ORDER BY name";
    query_all(conn, sql, params![kind.as_str()], |r| {
        Ok(Definition {
            name: r.get(0)?,
            project: r.get(1)?,
            spec: r.get(2)?,
        })
    })
    .map_err(db_err)
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

fn delete_states_except(conn: &Connection, keep: &HashSet<&str>) -> Result<()> {
    let existing: Vec<String> = {
        let sql = "SELECT name FROM schedules";
        query_all(conn, sql, [], |r| r.get::<_, String>(0)).map_err(db_err)?
    };
    for name in existing.iter().filter(|n| !keep.contains(n.as_str())) {
        conn.execute("DELETE FROM schedules WHERE name = ?1", params![name])
            .map_err(db_err)?;
    }
    Ok(())
}
