//! The pool store in PostgreSQL (cluster mode): tables `pubrun_pools`,
//! `pubrun_machines`, `pubrun_machine_spans`, `pubrun_machine_numbers`,
//! `pubrun_bootstrap_tokens` and `pubrun_leases`, created by the pools
//! migration of the shared `pubrun_schema` sequence (`crate::postgres`).
//!
//! Fencing as in the run store (`runs::postgres`): opened with a [`Fence`]
//! (the ownership lease the server holds, `broker` in `serve`), every write
//! runs in a transaction that first reads that ownership row `FOR SHARE`
//! and compares the token. A takeover updates the row, so it serializes
//! with in-flight writes: an ex-owner's write either committed before the
//! takeover or is refused and writes nothing. The autoscaler writes a
//! machine's row before it asks a provider to start or stop the machine,
//! so a partitioned ex-owner never starts or deletes machines. Reads are
//! not fenced. All statements are parameterized.

use pubrun_core::pool::PoolSpec;
use pubrun_core::{Error, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};

use super::{
    lease_end_parts, log_transition, parse_machine_state, parse_spec, to_json, token_param,
    Bootstrap, LeaseEnd, LeaseRow, MachineRow, NewLease, PoolStore, RawLease, UpSpan,
};
use crate::fenced::{query_map, FencedPg};
use crate::postgres::db_err;
use crate::runs::postgres::Fence;
use crate::StoreError;

/// The pools migration of `crate::postgres::MIGRATIONS`; never edit once released.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE pubrun_pools (
        name text PRIMARY KEY,
        spec text NOT NULL,
        token text NOT NULL
    );
    CREATE TABLE pubrun_machines (
        name text PRIMARY KEY,
        pool text NOT NULL,
        provider text NOT NULL,
        provider_id text NOT NULL DEFAULT '',
        state text NOT NULL,
        state_since_ms bigint NOT NULL,
        idle_since_ms bigint,
        created_ms bigint NOT NULL,
        cordoned boolean NOT NULL DEFAULT false,
        slots bigint NOT NULL DEFAULT 0,
        last_error text NOT NULL DEFAULT '',
        needs_stop boolean NOT NULL DEFAULT false
    );
    CREATE TABLE pubrun_machine_spans (
        id bigserial PRIMARY KEY,
        machine text NOT NULL,
        pool text NOT NULL,
        start_ms bigint NOT NULL,
        end_ms bigint
    );
    CREATE INDEX pubrun_machine_spans_by_machine ON pubrun_machine_spans (machine, start_ms);
    CREATE UNIQUE INDEX pubrun_machine_spans_open ON pubrun_machine_spans (machine) WHERE end_ms IS NULL;
    CREATE TABLE pubrun_machine_numbers (
        pool text PRIMARY KEY,
        last bigint NOT NULL
    );
    CREATE TABLE pubrun_bootstrap_tokens (
        machine text PRIMARY KEY,
        pool text NOT NULL,
        token text NOT NULL
    );
    CREATE TABLE pubrun_leases (
        token bigserial PRIMARY KEY,
        run_id text NOT NULL,
        job text NOT NULL,
        attempt bigint NOT NULL,
        pool text NOT NULL,
        machine text NOT NULL,
        state text NOT NULL,
        assigned_ms bigint NOT NULL,
        started_ms bigint,
        ended_ms bigint,
        exit text,
        reason text NOT NULL DEFAULT ''
    );
    CREATE INDEX pubrun_leases_by_run ON pubrun_leases (run_id, token);
    CREATE INDEX pubrun_leases_active ON pubrun_leases (state) WHERE state IN ('assigned', 'running');";

/// Connections per server: agents' polls and reports, the sweep and the
/// autoscaler overlap; each call is one short transaction.
const POOL: usize = 3;

const MACHINE_COLS: &str = "name, pool, provider, provider_id, state, state_since_ms, \
     idle_since_ms, created_ms, cordoned, slots, last_error, needs_stop";

const LEASE_COLS: &str = "token, run_id, job, attempt, pool, machine, state, \
     assigned_ms, started_ms, ended_ms, exit, reason";

fn pg(e: tokio_postgres::Error) -> Error {
    Error::from(db_err(e))
}

fn bad_row(e: tokio_postgres::Error) -> Error {
    Error::internal(format!("pool store: corrupt row: {e}"))
}

fn machine_row(r: &Row) -> Result<MachineRow> {
    let name: String = r.try_get(0).map_err(bad_row)?;
    let state: String = r.try_get(4).map_err(bad_row)?;
    let slots: i64 = r.try_get(9).map_err(bad_row)?;
    Ok(MachineRow {
        state: parse_machine_state(&name, &state)?,
        pool: r.try_get(1).map_err(bad_row)?,
        provider: r.try_get(2).map_err(bad_row)?,
        provider_id: r.try_get(3).map_err(bad_row)?,
        state_since_ms: r.try_get(5).map_err(bad_row)?,
        idle_since_ms: r.try_get(6).map_err(bad_row)?,
        created_ms: r.try_get(7).map_err(bad_row)?,
        cordoned: r.try_get(8).map_err(bad_row)?,
        slots: u32::try_from(slots)
            .map_err(|e| Error::internal(format!("pool store: slots of machine {name}: {e}")))?,
        last_error: r.try_get(10).map_err(bad_row)?,
        needs_stop: r.try_get(11).map_err(bad_row)?,
        name,
    })
}

fn lease_row(r: &Row) -> Result<LeaseRow> {
    RawLease {
        token: r.try_get(0).map_err(bad_row)?,
        run_id: r.try_get(1).map_err(bad_row)?,
        job: r.try_get(2).map_err(bad_row)?,
        attempt: r.try_get(3).map_err(bad_row)?,
        pool: r.try_get(4).map_err(bad_row)?,
        machine: r.try_get(5).map_err(bad_row)?,
        state: r.try_get(6).map_err(bad_row)?,
        assigned_ms: r.try_get(7).map_err(bad_row)?,
        started_ms: r.try_get(8).map_err(bad_row)?,
        ended_ms: r.try_get(9).map_err(bad_row)?,
        exit: r.try_get(10).map_err(bad_row)?,
        reason: r.try_get(11).map_err(bad_row)?,
    }
    .parse()
}

async fn query_machines<C: GenericClient + Sync>(
    c: &C,
    where_: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<MachineRow>> {
    let sql = format!("SELECT {MACHINE_COLS} FROM pubrun_machines {where_}");
    query_map(c, &sql, params, machine_row).await
}

async fn query_leases<C: GenericClient + Sync>(
    c: &C,
    where_: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<LeaseRow>> {
    let sql = format!("SELECT {LEASE_COLS} FROM pubrun_leases {where_}");
    query_map(c, &sql, params, lease_row).await
}

pub struct PostgresPoolStore {
    pg: FencedPg,
}

impl PostgresPoolStore {
    /// Connects and migrates the shared schema (refusing a newer one). With
    /// a `fence`, every write checks its token (see the module docs);
    /// without one writes are unguarded (tools, tests).
    pub async fn open(url: &str, fence: Option<Fence>) -> std::result::Result<Self, StoreError> {
        let pg = FencedPg::open(url, fence, "pools", POOL, "pool store").await?;
        Ok(PostgresPoolStore { pg })
    }

    /// Whether a write was refused because another server took the lease.
    pub fn is_fenced(&self) -> bool {
        self.pg.is_fenced()
    }
}

#[async_trait::async_trait]
impl PoolStore for PostgresPoolStore {
    async fn put_pool(&self, spec: &PoolSpec, token: Option<&str>, fresh: &str) -> Result<String> {
        let json = to_json(spec)?;
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let existing: Option<String> = tx
            .query_opt(
                "SELECT token FROM pubrun_pools WHERE name = $1 FOR UPDATE",
                &[&spec.name],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0));
        let token = token
            .map(str::to_string)
            .or(existing)
            .unwrap_or_else(|| fresh.to_string());
        tx.execute(
            "INSERT INTO pubrun_pools (name, spec, token) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, token = excluded.token",
            &[&spec.name, &json, &token],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(token)
    }

    async fn delete_pool(&self, name: &str) -> Result<()> {
        self.pg
            .write("DELETE FROM pubrun_pools WHERE name = $1", &[&name])
            .await?;
        Ok(())
    }

    async fn pools(&self) -> Result<Vec<(PoolSpec, String)>> {
        self.pg
            .query_map(
                "SELECT name, spec, token FROM pubrun_pools ORDER BY name",
                &[],
                |r| {
                    let name: String = r.try_get(0).map_err(bad_row)?;
                    let spec: String = r.try_get(1).map_err(bad_row)?;
                    Ok((parse_spec(&name, &spec)?, r.try_get(2).map_err(bad_row)?))
                },
            )
            .await
    }

    async fn upsert_machine(&self, m: &MachineRow) -> Result<()> {
        let slots = i64::from(m.slots);
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let before: Option<String> = tx
            .query_opt(
                "SELECT state FROM pubrun_machines WHERE name = $1 FOR UPDATE",
                &[&m.name],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0));
        tx.execute(
            "INSERT INTO pubrun_machines (name, pool, provider, provider_id, state, state_since_ms,
                     idle_since_ms, created_ms, cordoned, slots, last_error, needs_stop)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (name) DO UPDATE SET pool = excluded.pool, provider = excluded.provider,
                     provider_id = excluded.provider_id, state = excluded.state,
                     state_since_ms = excluded.state_since_ms, idle_since_ms = excluded.idle_since_ms,
                     cordoned = excluded.cordoned, slots = excluded.slots,
                     last_error = excluded.last_error, needs_stop = excluded.needs_stop",
            &[
                &m.name,
                &m.pool,
                &m.provider,
                &m.provider_id,
                &m.state.as_str(),
                &m.state_since_ms,
                &m.idle_since_ms,
                &m.created_ms,
                &m.cordoned,
                &slots,
                &m.last_error,
                &m.needs_stop,
            ],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        log_transition(before.as_deref(), m);
        Ok(())
    }

    async fn machines(&self) -> Result<Vec<MachineRow>> {
        let mut g = self.pg.conn().await;
        query_machines(&*g.get().await?, "ORDER BY pool, created_ms, name", &[]).await
    }

    async fn machine(&self, name: &str) -> Result<Option<MachineRow>> {
        let mut g = self.pg.conn().await;
        Ok(
            query_machines(&*g.get().await?, "WHERE name = $1", &[&name])
                .await?
                .pop(),
        )
    }

    async fn new_machine_name(&self, pool: &str, prefix: &str) -> Result<String> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        // The pool's counter row, locked: two namers of one pool take turns.
        tx.execute(
            "INSERT INTO pubrun_machine_numbers (pool, last) VALUES ($1, 0)
             ON CONFLICT (pool) DO NOTHING",
            &[&pool],
        )
        .await
        .map_err(pg)?;
        let last: i64 = tx
            .query_one(
                "SELECT last FROM pubrun_machine_numbers WHERE pool = $1 FOR UPDATE",
                &[&pool],
            )
            .await
            .map_err(pg)?
            .get(0);
        let mut n = last + 1;
        let name = loop {
            let candidate = format!("{prefix}-{pool}-{n}");
            let taken: bool = tx
                .query_one(
                    "SELECT EXISTS(SELECT 1 FROM pubrun_machines WHERE name = $1)
                         OR EXISTS(SELECT 1 FROM pubrun_machine_spans WHERE machine = $1)",
                    &[&candidate],
                )
                .await
                .map_err(pg)?
                .get(0);
            if !taken {
                break candidate;
            }
            n += 1;
        };
        tx.execute(
            "UPDATE pubrun_machine_numbers SET last = $2 WHERE pool = $1",
            &[&pool, &n],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(name)
    }

    async fn delete_machine(&self, name: &str) -> Result<()> {
        self.pg
            .write("DELETE FROM pubrun_machines WHERE name = $1", &[&name])
            .await?;
        Ok(())
    }

    async fn put_bootstrap(&self, b: &Bootstrap) -> Result<()> {
        self.pg
            .write(
                "INSERT INTO pubrun_bootstrap_tokens (machine, pool, token) VALUES ($1, $2, $3)
             ON CONFLICT (machine) DO UPDATE SET pool = excluded.pool, token = excluded.token",
                &[&b.machine, &b.pool, &b.token],
            )
            .await?;
        Ok(())
    }

    async fn bootstraps(&self) -> Result<Vec<Bootstrap>> {
        self.pg
            .query_map(
                "SELECT machine, pool, token FROM pubrun_bootstrap_tokens ORDER BY machine",
                &[],
                |r| {
                    Ok(Bootstrap {
                        machine: r.try_get(0).map_err(bad_row)?,
                        pool: r.try_get(1).map_err(bad_row)?,
                        token: r.try_get(2).map_err(bad_row)?,
                    })
                },
            )
            .await
    }

    async fn delete_bootstrap(&self, machine: &str) -> Result<()> {
        self.pg
            .write(
                "DELETE FROM pubrun_bootstrap_tokens WHERE machine = $1",
                &[&machine],
            )
            .await?;
        Ok(())
    }

    async fn span_open(&self, machine: &str, pool: &str, now_ms: i64) -> Result<()> {
        // At most one open span per machine (a partial unique index).
        self.pg
            .write(
                "INSERT INTO pubrun_machine_spans (machine, pool, start_ms) VALUES ($1, $2, $3)
             ON CONFLICT (machine) WHERE end_ms IS NULL DO NOTHING",
                &[&machine, &pool, &now_ms],
            )
            .await?;
        Ok(())
    }

    async fn span_close(&self, machine: &str, now_ms: i64) -> Result<()> {
        self.pg
            .write(
                "UPDATE pubrun_machine_spans SET end_ms = GREATEST(start_ms, $2)
             WHERE machine = $1 AND end_ms IS NULL",
                &[&machine, &now_ms],
            )
            .await?;
        Ok(())
    }

    async fn spans(&self, since_ms: i64) -> Result<Vec<UpSpan>> {
        self.pg
            .query_map(
                "SELECT machine, pool, start_ms, end_ms FROM pubrun_machine_spans
                 WHERE end_ms IS NULL OR end_ms > $1 ORDER BY machine, start_ms",
                &[&since_ms],
                |r| {
                    Ok(UpSpan {
                        machine: r.try_get(0).map_err(bad_row)?,
                        pool: r.try_get(1).map_err(bad_row)?,
                        start_ms: r.try_get(2).map_err(bad_row)?,
                        end_ms: r.try_get(3).map_err(bad_row)?,
                    })
                },
            )
            .await
    }

    async fn new_lease(&self, l: &NewLease<'_>) -> Result<u64> {
        let attempt = i64::from(l.attempt);
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let token: i64 = tx
            .query_one(
                "INSERT INTO pubrun_leases (run_id, job, attempt, pool, machine, state, assigned_ms)
                 VALUES ($1, $2, $3, $4, $5, 'assigned', $6) RETURNING token",
                &[&l.run_id, &l.job, &attempt, &l.pool, &l.machine, &l.now_ms],
            )
            .await
            .map_err(pg)?
            .get(0);
        tx.commit().await.map_err(pg)?;
        u64::try_from(token).map_err(|e| Error::internal(format!("lease token {token}: {e}")))
    }

    async fn lease(&self, token: u64) -> Result<Option<LeaseRow>> {
        let token = token_param(token)?;
        let mut g = self.pg.conn().await;
        Ok(
            query_leases(&*g.get().await?, "WHERE token = $1", &[&token])
                .await?
                .pop(),
        )
    }

    async fn lease_of_run(&self, run_id: &str) -> Result<Option<LeaseRow>> {
        let mut g = self.pg.conn().await;
        Ok(query_leases(
            &*g.get().await?,
            "WHERE run_id = $1 ORDER BY token DESC LIMIT 1",
            &[&run_id],
        )
        .await?
        .pop())
    }

    async fn active_leases(&self) -> Result<Vec<LeaseRow>> {
        let mut g = self.pg.conn().await;
        query_leases(
            &*g.get().await?,
            "WHERE state IN ('assigned', 'running') ORDER BY token",
            &[],
        )
        .await
    }

    async fn leases_since(&self, since_ms: i64) -> Result<Vec<LeaseRow>> {
        let mut g = self.pg.conn().await;
        query_leases(
            &*g.get().await?,
            "WHERE ended_ms IS NULL OR ended_ms > $1 ORDER BY token",
            &[&since_ms],
        )
        .await
    }

    async fn lease_started(&self, token: u64, now_ms: i64) -> Result<bool> {
        let token = token_param(token)?;
        let n = self
            .pg
            .write(
                "UPDATE pubrun_leases SET state = 'running', started_ms = $2
                 WHERE token = $1 AND state = 'assigned'",
                &[&token, &now_ms],
            )
            .await?;
        Ok(n == 1)
    }

    async fn lease_end(&self, token: u64, end: LeaseEnd<'_>, now_ms: i64) -> Result<bool> {
        let token = token_param(token)?;
        let (state, exit, reason) = lease_end_parts(&end)?;
        let n = self
            .pg
            .write(
                "UPDATE pubrun_leases SET state = $2, exit = $3, reason = $4, ended_ms = $5,
                     started_ms = COALESCE(started_ms, $5)
                 WHERE token = $1 AND state IN ('assigned', 'running')",
                &[&token, &state.as_str(), &exit, &reason, &now_ms],
            )
            .await?;
        Ok(n == 1)
    }
}
