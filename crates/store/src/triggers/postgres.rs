//! The trigger store in PostgreSQL (cluster mode): tables
//! `pubrun_schedules` (one state row per schedule: cursor, claim, pause,
//! last fire) and `pubrun_trigger_definitions` (declared schedules and
//! webhooks with their projects), created by this module's migration in the
//! shared `pubrun_schema` sequence (`crate::postgres`).
//!
//! - The claim of a tick is the same compare-and-set `UPDATE … WHERE name =
//!   $1 AND cursor_ms = $2` as on SQLite; under READ COMMITTED a second
//!   scheduler's UPDATE waits for the first commit, re-checks the WHERE
//!   clause and changes nothing: a tick is claimed once cluster-wide.
//! - A replace of definitions locks `pubrun_trigger_definitions` (EXCLUSIVE,
//!   readers go on) so two applies never interleave their check and write.
//! - Fencing: opened with a [`Fence`] (the ownership lease the server holds,
//!   `broker` in `serve`), every write runs in a transaction that first reads
//!   that ownership row `FOR SHARE` and compares the token, as the run store
//!   does: an ex-owner's write either committed before the takeover or is
//!   refused (UNAVAILABLE, "taken over") and writes nothing. Reads are not
//!   fenced.
//! - All statements are parameterized. Connections reconnect with backoff
//!   (calls fail UNAVAILABLE meanwhile).

use chrono::{DateTime, Utc};
use pubrun_core::{Error, Result};
use tokio_postgres::{GenericClient, Row, Transaction};

use super::{
    check_scope, ms, Claim, DefKind, Definition, RawState, Replacement, ScheduleState, Scope,
    TickClaim, TriggerStore,
};
use crate::fenced::FencedPg;
use crate::postgres::db_err;
use crate::runs::postgres::Fence;
use crate::StoreError;

/// The trigger store's migration in `crate::postgres::MIGRATIONS`; never
/// edit once released.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE pubrun_schedules (
        name text PRIMARY KEY,
        cursor_ms bigint NOT NULL,
        paused boolean NOT NULL DEFAULT false,
        config_paused boolean NOT NULL DEFAULT false,
        pending_tick_ms bigint,
        claimed_by text,
        claimed_at_ms bigint,
        last_fired_ms bigint,
        last_message_id text,
        last_error text,
        updated_ms bigint NOT NULL
    );
    CREATE TABLE pubrun_trigger_definitions (
        kind text NOT NULL,
        name text NOT NULL,
        project text NOT NULL,
        spec text NOT NULL,
        PRIMARY KEY (kind, name)
    );";

/// Connections per server: the scheduler loop and the API overlap rarely.
const POOL: usize = 2;

const COLUMNS: &str = "name, cursor_ms, paused, config_paused, pending_tick_ms, claimed_by, claimed_at_ms, last_fired_ms, last_message_id, last_error";

fn pg(e: tokio_postgres::Error) -> Error {
    Error::from(db_err(e))
}

fn raw_state(r: &Row) -> Result<RawState> {
    let g = |e: tokio_postgres::Error| {
        Error::internal(format!("trigger store: corrupt schedule row: {e}"))
    };
    Ok(RawState {
        name: r.try_get(0).map_err(g)?,
        cursor_ms: r.try_get(1).map_err(g)?,
        paused: r.try_get(2).map_err(g)?,
        config_paused: r.try_get(3).map_err(g)?,
        pending_tick_ms: r.try_get(4).map_err(g)?,
        claimed_by: r.try_get(5).map_err(g)?,
        claimed_at_ms: r.try_get(6).map_err(g)?,
        last_fired_ms: r.try_get(7).map_err(g)?,
        last_message_id: r.try_get(8).map_err(g)?,
        last_error: r.try_get(9).map_err(g)?,
    })
}

async fn definitions<C: GenericClient + Sync>(c: &C, kind: DefKind) -> Result<Vec<Definition>> {
    let rows = c
        .query(
            "SELECT name, project, spec FROM pubrun_trigger_definitions WHERE kind = $1 ORDER BY name",
            &[&kind.as_str()],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            let g = |e: tokio_postgres::Error| {
                Error::internal(format!("trigger store: corrupt definition row: {e}"))
            };
            Ok(Definition {
                name: r.try_get(0).map_err(g)?,
                project: r.try_get(1).map_err(g)?,
                spec: r.try_get(2).map_err(g)?,
            })
        })
        .collect()
}

async fn upsert_states(
    tx: &Transaction<'_>,
    declared: &[(String, bool)],
    now: DateTime<Utc>,
) -> Result<()> {
    let now = ms(now);
    for (name, paused) in declared {
        tx.execute(
            "INSERT INTO pubrun_schedules (name, cursor_ms, paused, config_paused, updated_ms)
             VALUES ($1, $2, $3, $3, $2)
             ON CONFLICT (name) DO UPDATE SET
                paused = CASE WHEN pubrun_schedules.config_paused <> excluded.config_paused
                              THEN excluded.paused ELSE pubrun_schedules.paused END,
                cursor_ms = CASE WHEN pubrun_schedules.config_paused <> excluded.config_paused
                                      AND pubrun_schedules.paused AND NOT excluded.paused
                                 THEN GREATEST(pubrun_schedules.cursor_ms, excluded.cursor_ms)
                                 ELSE pubrun_schedules.cursor_ms END,
                config_paused = excluded.config_paused,
                updated_ms = excluded.updated_ms",
            &[name, &now, paused],
        )
        .await
        .map_err(pg)?;
    }
    Ok(())
}

async fn delete_states_except(tx: &Transaction<'_>, keep: &[String]) -> Result<()> {
    tx.execute(
        "DELETE FROM pubrun_schedules WHERE NOT (name = ANY($1))",
        &[&keep],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

pub struct PostgresTriggerStore {
    pg: FencedPg,
}

impl PostgresTriggerStore {
    /// Connects and migrates the shared schema (refusing a newer one). With
    /// a `fence`, every write checks its token (see the module docs);
    /// without one writes are unguarded (tools, tests).
    pub async fn open(url: &str, fence: Option<Fence>) -> std::result::Result<Self, StoreError> {
        let pg = FencedPg::open(url, fence, "triggers", POOL, "trigger store").await?;
        Ok(PostgresTriggerStore { pg })
    }

    /// Whether a write was refused because another server took the lease.
    pub fn is_fenced(&self) -> bool {
        self.pg.is_fenced()
    }

    /// Records a value shown beside schedule `name` (`sql`: $1 name, $2 the
    /// value, $3 now).
    async fn note(&self, sql: &str, name: &str, value: &str, now: DateTime<Utc>) -> Result<()> {
        self.pg.write(sql, &[&name, &value, &ms(now)]).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl TriggerStore for PostgresTriggerStore {
    async fn reconcile(&self, declared: &[(String, bool)], now: DateTime<Utc>) -> Result<()> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        upsert_states(&tx, declared, now).await?;
        let keep: Vec<String> = declared.iter().map(|(n, _)| n.clone()).collect();
        delete_states_except(&tx, &keep).await?;
        tx.commit().await.map_err(pg)
    }

    async fn definitions(&self, kind: DefKind) -> Result<Vec<Definition>> {
        let mut g = self.pg.conn().await;
        definitions(g.get().await?, kind).await
    }

    async fn replace_definitions(&self, r: Replacement<'_>) -> Result<Vec<Definition>> {
        let (kind, scope, defs) = (r.kind, r.scope, r.defs);
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        tx.batch_execute("LOCK TABLE pubrun_trigger_definitions IN EXCLUSIVE MODE")
            .await
            .map_err(pg)?;
        let existing = definitions(&tx, kind).await?;
        check_scope(kind, scope, &existing, defs)?;
        match scope {
            Scope::All => {
                tx.execute(
                    "DELETE FROM pubrun_trigger_definitions WHERE kind = $1",
                    &[&kind.as_str()],
                )
                .await
            }
            Scope::Project(p) => {
                tx.execute(
                    "DELETE FROM pubrun_trigger_definitions WHERE kind = $1 AND project = $2",
                    &[&kind.as_str(), &p],
                )
                .await
            }
        }
        .map_err(pg)?;
        for (d, _) in defs {
            tx.execute(
                "INSERT INTO pubrun_trigger_definitions (kind, name, project, spec) VALUES ($1, $2, $3, $4)",
                &[&kind.as_str(), &d.name, &d.project, &d.spec],
            )
            .await
            .map_err(pg)?;
        }
        let all = definitions(&tx, kind).await?;
        if kind == DefKind::Schedule {
            upsert_states(&tx, &r.declared(), r.now).await?;
            let keep: Vec<String> = all.iter().map(|d| d.name.clone()).collect();
            delete_states_except(&tx, &keep).await?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(all)
    }

    async fn get(&self, name: &str) -> Result<Option<ScheduleState>> {
        let row = self
            .pg
            .query_opt(
                &format!("SELECT {COLUMNS} FROM pubrun_schedules WHERE name = $1"),
                &[&name],
            )
            .await?;
        row.map(|r| raw_state(&r)?.parse()).transpose()
    }

    async fn list(&self) -> Result<Vec<ScheduleState>> {
        self.pg
            .query_map(
                &format!("SELECT {COLUMNS} FROM pubrun_schedules ORDER BY name"),
                &[],
                |r| raw_state(r)?.parse(),
            )
            .await
    }

    async fn claim(&self, c: TickClaim<'_>, expected_cursor: DateTime<Utc>) -> Result<bool> {
        let n = self
            .pg
            .write(
                "UPDATE pubrun_schedules SET cursor_ms = $3, pending_tick_ms = $3, claimed_by = $4,
                        claimed_at_ms = $5, updated_ms = $5
                 WHERE name = $1 AND cursor_ms = $2 AND NOT paused",
                &[
                    &c.name,
                    &ms(expected_cursor),
                    &ms(c.tick),
                    &c.owner,
                    &ms(c.now),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn take_over(&self, c: TickClaim<'_>, from: &Claim) -> Result<bool> {
        let n = self
            .pg.write(
                "UPDATE pubrun_schedules SET claimed_by = $5, claimed_at_ms = $6, updated_ms = $6
                 WHERE name = $1 AND pending_tick_ms = $2 AND claimed_by = $3 AND claimed_at_ms = $4",
                &[
                    &c.name,
                    &ms(c.tick),
                    &from.owner,
                    &ms(from.claimed_at),
                    &c.owner,
                    &ms(c.now),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn complete(&self, c: TickClaim<'_>, message_id: &str) -> Result<bool> {
        let TickClaim {
            name,
            tick,
            owner,
            now,
        } = c;
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let n = tx
            .execute(
                "UPDATE pubrun_schedules SET pending_tick_ms = NULL, claimed_by = NULL, claimed_at_ms = NULL,
                        last_error = NULL, updated_ms = $4
                 WHERE name = $1 AND pending_tick_ms = $2 AND claimed_by = $3",
                &[&name, &ms(tick), &owner, &ms(now)],
            )
            .await
            .map_err(pg)?;
        // The tick was published either way: show it.
        tx.execute(
            "UPDATE pubrun_schedules SET last_fired_ms = GREATEST(COALESCE(last_fired_ms, 0), $2),
                    last_message_id = $3
             WHERE name = $1",
            &[&name, &ms(tick), &message_id],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(n == 1)
    }

    async fn record_error(&self, name: &str, error: &str, now: DateTime<Utc>) -> Result<()> {
        let sql = "UPDATE pubrun_schedules SET last_error = $2, updated_ms = $3 WHERE name = $1";
        self.note(sql, name, error, now).await
    }

    async fn record_run_now(&self, name: &str, message_id: &str, now: DateTime<Utc>) -> Result<()> {
        let sql =
            "UPDATE pubrun_schedules SET last_message_id = $2, updated_ms = $3 WHERE name = $1";
        self.note(sql, name, message_id, now).await
    }

    async fn set_paused(&self, name: &str, paused: bool, now: DateTime<Utc>) -> Result<bool> {
        let sql = if paused {
            "UPDATE pubrun_schedules SET paused = true, updated_ms = $2 WHERE name = $1"
        } else {
            "UPDATE pubrun_schedules SET cursor_ms = CASE WHEN paused THEN GREATEST(cursor_ms, $2) ELSE cursor_ms END,
                    paused = false, updated_ms = $2
             WHERE name = $1"
        };
        let n = self.pg.write(sql, &[&name, &ms(now)]).await?;
        Ok(n == 1)
    }
}
