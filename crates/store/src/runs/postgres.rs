//! The run store in PostgreSQL (cluster mode): tables `pubrun_jobs`,
//! `pubrun_runs`, `pubrun_dedup`, `pubrun_meta`, created by migration 2 of
//! the shared `pubrun_schema` sequence (`crate::postgres`).
//!
//! - Dedup keys are unique cluster-wide: `(job, key)` is the primary key of
//!   `pubrun_dedup`, and a run is inserted in the same transaction as the
//!   key it took (`INSERT … ON CONFLICT DO UPDATE … WHERE expired`), so two
//!   servers racing on one key create one run: the loser waits on the row
//!   lock and then sees the live key.
//! - Claiming a queued run (`mark_starting`) locks it with
//!   `FOR UPDATE SKIP LOCKED` and records the claim owner (this node) and a
//!   claim token raised on every claim, for the multi-server claiming of a
//!   later step; today one server dispatches, so behaviour is that of SQLite.
//! - Fencing: opened with a [`Fence`] (the ownership lease the server holds,
//!   `broker` in `serve`), every write runs in a transaction that first
//!   reads that ownership row `FOR SHARE` and compares the token, as the
//!   Pub/Sub engine does. A takeover updates the row, so it serializes with
//!   in-flight writes: an ex-owner's write either committed before the
//!   takeover or is refused and writes nothing. Reads are not fenced.
//! - All statements are parameterized. Connections reconnect with backoff
//!   (calls fail UNAVAILABLE meanwhile), like the Pub/Sub engine's.

use pubrun_core::job::JobSpec;
use pubrun_core::run::RunStatus;
use pubrun_core::{Error, Result};

use tokio::sync::MutexGuard;
use tokio_postgres::{Client, GenericClient, Row, Transaction};

use super::{
    claim_refused, parse_jobs, to_json, Batch, Enqueued, QueuedRun, RawRun, Requeue, RunEnd,
    RunPage, RunRecord, RunStore,
};
use crate::fenced::{query_map, FencedPg};
use crate::postgres::{db_err, Conn};
use crate::StoreError;

/// Migration 2 of `crate::postgres::MIGRATIONS`; never edit once released.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE pubrun_jobs (
        name text PRIMARY KEY,
        spec text NOT NULL
    );
    CREATE TABLE pubrun_runs (
        id bigserial PRIMARY KEY,
        job text NOT NULL,
        status text NOT NULL,
        attempt integer NOT NULL,
        max_attempts integer NOT NULL,
        message_id text NOT NULL,
        message_meta text NOT NULL,
        message_data bytea NOT NULL,
        dedup_key text NOT NULL,
        exit text,
        created_at_ms bigint NOT NULL,
        started_at_ms bigint,
        ended_at_ms bigint,
        not_before_ms bigint NOT NULL,
        machine text NOT NULL DEFAULT '',
        handle text NOT NULL DEFAULT '',
        cancel_requested boolean NOT NULL DEFAULT false,
        result_published boolean NOT NULL DEFAULT true,
        claim_owner text,
        claim_token bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX pubrun_runs_by_status ON pubrun_runs (status, not_before_ms);
    CREATE INDEX pubrun_runs_by_job ON pubrun_runs (job, id);
    CREATE INDEX pubrun_runs_queued_by_job ON pubrun_runs (job, id) WHERE status = 'queued';
    CREATE INDEX pubrun_runs_unpublished ON pubrun_runs (id) WHERE NOT result_published;
    CREATE TABLE pubrun_dedup (
        job text NOT NULL,
        key text NOT NULL,
        run_id bigint NOT NULL,
        expires_at_ms bigint NOT NULL,
        PRIMARY KEY (job, key)
    );
    CREATE TABLE pubrun_meta (
        key text PRIMARY KEY,
        value text NOT NULL
    );
    CREATE TABLE pubrun_run_logs (
        run_id bigint PRIMARY KEY,
        body bytea NOT NULL
    );";

/// Connections per server: enough for the dispatcher, the API and apply to
/// overlap; a claim or enqueue is one short transaction.
const POOL: usize = 4;

const RUN_COLUMNS: &str = "id, job, status, attempt, max_attempts, message_meta, message_data, dedup_key, exit, \
     created_at_ms, started_at_ms, ended_at_ms, not_before_ms, machine, handle, cancel_requested, result_published, claim_owner";

fn pg(e: tokio_postgres::Error) -> Error {
    Error::from(db_err(e))
}

fn raw_run(r: &Row) -> Result<RawRun> {
    let g = |e: tokio_postgres::Error| Error::internal(format!("run store: corrupt run row: {e}"));
    Ok(RawRun {
        id: r.try_get(0).map_err(g)?,
        job: r.try_get(1).map_err(g)?,
        status: r.try_get(2).map_err(g)?,
        attempt: r.try_get::<_, i32>(3).map_err(g)?.into(),
        max_attempts: r.try_get::<_, i32>(4).map_err(g)?.into(),
        message_meta: r.try_get(5).map_err(g)?,
        message_data: r.try_get(6).map_err(g)?,
        dedup_key: r.try_get(7).map_err(g)?,
        exit: r.try_get(8).map_err(g)?,
        created_at_ms: r.try_get(9).map_err(g)?,
        started_at_ms: r.try_get(10).map_err(g)?,
        ended_at_ms: r.try_get(11).map_err(g)?,
        not_before_ms: r.try_get(12).map_err(g)?,
        machine: r.try_get(13).map_err(g)?,
        handle: r.try_get(14).map_err(g)?,
        cancel_requested: r.try_get(15).map_err(g)?,
        result_published: r.try_get(16).map_err(g)?,
        node: r.try_get(17).map_err(g)?,
    })
}

async fn query_runs<C: GenericClient + Sync>(
    c: &C,
    where_: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM pubrun_runs {where_}");
    query_map(c, &sql, params, |r| raw_run(r)?.parse()).await
}

async fn get_run<C: GenericClient + Sync>(c: &C, id: i64) -> Result<RunRecord> {
    query_runs(c, "WHERE id = $1", &[&id])
        .await?
        .pop()
        .ok_or_else(|| Error::not_found(format!("run {id} not found")))
}

fn attempts(n: u32) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(format!("attempt {n} is out of range")))
}

/// The ownership lease whose token guards this store's writes.
pub use crate::fenced::Fence;

pub struct PostgresRunStore {
    /// The connections and the write fence, shared with the other
    /// cluster-mode stores.
    db: FencedPg,
    node_name: String,
}

impl PostgresRunStore {
    /// Connects and migrates the shared schema (refusing a newer one).
    /// `node_name` is recorded as the claim owner of the runs this server
    /// starts; with a `fence`, every write checks its token (see the module
    /// docs), without one writes are unguarded (tools, tests).
    pub async fn open(
        url: &str,
        node_name: &str,
        fence: Option<Fence>,
    ) -> std::result::Result<Self, StoreError> {
        Ok(PostgresRunStore {
            db: FencedPg::open(url, fence, "runs", POOL, "run store").await?,
            node_name: node_name.to_string(),
        })
    }

    /// Whether a write was refused because another server took the lease.
    pub fn is_fenced(&self) -> bool {
        self.db.is_fenced()
    }

    /// Begins a write transaction that holds the fence's ownership row
    /// (shared) and has checked our token.
    async fn begin<'a>(&self, c: &'a mut Client) -> Result<Transaction<'a>> {
        Ok(self.db.begin(c).await?)
    }

    /// One fenced write statement, committed.
    async fn write(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        Ok(self.db.write(sql, params).await?)
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    async fn conn(&self) -> MutexGuard<'_, Conn> {
        self.db.conn().await
    }

    /// Moves a run along the state machine in one transaction (the row
    /// locked), checking the transition, then applies `update` ($1 = id).
    async fn transition(
        &self,
        id: i64,
        to: RunStatus,
        update: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<()> {
        let mut g = self.conn().await;
        let tx = self.begin(g.get().await?).await?;
        let row = tx
            .query_opt(
                "SELECT status FROM pubrun_runs WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| Error::not_found(format!("run {id} not found")))?;
        let status: String = row.get(0);
        RunStatus::parse(&status)?.check_transition(to)?;
        tx.execute(
            "UPDATE pubrun_runs SET status = $2 WHERE id = $1",
            &[&id, &to.as_str()],
        )
        .await
        .map_err(pg)?;
        let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
        all.extend_from_slice(params);
        tx.execute(update, &all).await.map_err(pg)?;
        tx.commit().await.map_err(pg)
    }
}

#[async_trait::async_trait]
impl RunStore for PostgresRunStore {
    async fn put_job(&self, spec: &JobSpec) -> Result<()> {
        let json = to_json(spec)?;
        self.write(
            "INSERT INTO pubrun_jobs (name, spec) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            &[&spec.name, &json],
        )
        .await?;
        Ok(())
    }

    async fn delete_job(&self, name: &str) -> Result<bool> {
        let n = self
            .write("DELETE FROM pubrun_jobs WHERE name = $1", &[&name])
            .await?;
        Ok(n > 0)
    }

    async fn jobs(&self) -> Result<Vec<JobSpec>> {
        let rows = self
            .db
            .query("SELECT spec FROM pubrun_jobs ORDER BY name", &[])
            .await?;
        parse_jobs(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn meta(&self, key: &str) -> Result<Option<String>> {
        let row = self
            .db
            .query_opt("SELECT value FROM pubrun_meta WHERE key = $1", &[&key])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.write(
            "INSERT INTO pubrun_meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )
        .await?;
        Ok(())
    }

    async fn enqueue_batch(&self, batch: Batch<'_>) -> Result<Vec<Enqueued>> {
        let Batch {
            job,
            messages,
            now_ms,
        } = batch;
        let max_attempts = attempts(job.retries.max_attempts)?;
        let window = i64::try_from(job.dedup_window.as_millis()).unwrap_or(i64::MAX);
        let expires = now_ms.saturating_add(window);
        let mut g = self.conn().await;
        let tx = self.begin(g.get().await?).await?;
        let mut out = Vec::with_capacity(messages.len());
        for (message, key) in messages {
            let id: i64 = tx
                .query_one(
                    "SELECT nextval(pg_get_serial_sequence('pubrun_runs', 'id'))",
                    &[],
                )
                .await
                .map_err(pg)?
                .get(0);
            // Takes the key unless a live entry holds it; a concurrent
            // inserter of the same key makes this wait for its commit.
            let took = tx
                .query_opt(
                    "INSERT INTO pubrun_dedup (job, key, run_id, expires_at_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (job, key) DO UPDATE
                        SET run_id = excluded.run_id, expires_at_ms = excluded.expires_at_ms
                        WHERE pubrun_dedup.expires_at_ms <= $5
                     RETURNING run_id",
                    &[&job.name, key, &id, &expires, &now_ms],
                )
                .await
                .map_err(pg)?;
            if took.is_none() {
                let existing: i64 = tx
                    .query_one(
                        "SELECT run_id FROM pubrun_dedup WHERE job = $1 AND key = $2",
                        &[&job.name, key],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                out.push(Enqueued::Duplicate(existing));
                continue;
            }
            let meta = to_json(message)?;
            tx.execute(
                "INSERT INTO pubrun_runs (id, job, status, attempt, max_attempts, message_id, message_meta,
                     message_data, dedup_key, created_at_ms, not_before_ms)
                 VALUES ($1, $2, 'queued', 1, $3, $4, $5, $6, $7, $8, $8)",
                &[
                    &id,
                    &job.name,
                    &max_attempts,
                    &message.id,
                    &meta,
                    &message.data,
                    key,
                    &now_ms,
                ],
            )
            .await
            .map_err(pg)?;
            out.push(Enqueued::New(id));
        }
        tx.commit().await.map_err(pg)?;
        Ok(out)
    }

    async fn startable(&self, job: &str, now_ms: i64, limit: usize) -> Result<Vec<QueuedRun>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .db
            .query(
                "SELECT id, cancel_requested FROM pubrun_runs
                 WHERE status = 'queued' AND job = $1 AND not_before_ms <= $2
                 ORDER BY id LIMIT $3",
                &[&job, &now_ms, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| QueuedRun {
                id: r.get(0),
                job: job.to_string(),
                cancel_requested: r.get(1),
            })
            .collect())
    }

    async fn due_queued_by_job(&self, now_ms: i64) -> Result<Vec<(String, u64)>> {
        let rows = self
            .db
            .query(
                "SELECT job, count(*) FROM pubrun_runs
                 WHERE status = 'queued' AND not_before_ms <= $1 GROUP BY job",
                &[&now_ms],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64))
            .collect())
    }

    async fn next_due_ms(&self, now_ms: i64) -> Result<Option<i64>> {
        let row = self.db.query_one(
                "SELECT min(not_before_ms) FROM pubrun_runs WHERE status = 'queued' AND not_before_ms > $1",
                &[&now_ms],
            ).await?;
        Ok(row.get(0))
    }

    async fn queued_orphans(&self, jobs: &[String]) -> Result<Vec<QueuedRun>> {
        let jobs = jobs.to_vec();
        let rows = self
            .db
            .query(
                "SELECT id, job, cancel_requested FROM pubrun_runs
                 WHERE status = 'queued' AND NOT (job = ANY($1)) ORDER BY id",
                &[&jobs],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| QueuedRun {
                id: r.get(0),
                job: r.get(1),
                cancel_requested: r.get(2),
            })
            .collect())
    }

    async fn prune_dedup(&self, now_ms: i64) -> Result<usize> {
        let n = self
            .write(
                "DELETE FROM pubrun_dedup WHERE expires_at_ms <= $1",
                &[&now_ms],
            )
            .await?;
        Ok(n as usize)
    }

    async fn get(&self, id: i64) -> Result<RunRecord> {
        let mut g = self.conn().await;
        get_run(&*g.get().await?, id).await
    }

    async fn list_before(&self, page: RunPage) -> Result<Vec<RunRecord>> {
        let job = page.job.as_deref();
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        let status = page.status.map(|s| s.as_str());
        let before = page.before.unwrap_or(i64::MAX);
        let mut g = self.conn().await;
        query_runs(
            &*g.get().await?,
            "WHERE ($1::text IS NULL OR job = $1) AND ($2::text IS NULL OR status = $2) AND id < $3
             ORDER BY id DESC LIMIT $4",
            &[&job, &status, &before, &limit],
        )
        .await
    }

    async fn count_by_status(&self) -> Result<Vec<(RunStatus, u64)>> {
        let rows = self
            .db
            .query(
                "SELECT status, COUNT(*) FROM pubrun_runs GROUP BY status",
                &[],
            )
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let s: String = r.get(0);
            let n: i64 = r.get(1);
            out.push((RunStatus::parse(&s)?, n as u64));
        }
        Ok(out)
    }

    async fn with_status(&self, statuses: &[RunStatus]) -> Result<Vec<RunRecord>> {
        let mut g = self.conn().await;
        let c = g.get().await?;
        let mut out = Vec::new();
        for s in statuses {
            out.extend(query_runs(&*c, "WHERE status = $1 ORDER BY id", &[&s.as_str()]).await?);
        }
        Ok(out)
    }

    async fn mark_starting(&self, id: i64) -> Result<()> {
        let n = self
            .write(
                "UPDATE pubrun_runs SET status = 'starting', claim_owner = $2, claim_token = claim_token + 1
                 WHERE id = (SELECT id FROM pubrun_runs
                             WHERE id = $1 AND status = 'queued' AND NOT cancel_requested
                             FOR UPDATE SKIP LOCKED)",
                &[&id, &self.node_name],
            )
            .await?;
        if n == 1 {
            return Ok(());
        }
        Err(claim_refused(&self.get(id).await?))
    }

    async fn cancel_if_queued(&self, id: i64, end: RunEnd<'_>) -> Result<bool> {
        debug_assert_eq!(end.exit.status(), RunStatus::Cancelled);
        let (json, published) = end.columns()?;
        let n = self
            .write(
                "UPDATE pubrun_runs SET status = 'cancelled', cancel_requested = true, exit = $2,
                     ended_at_ms = $3, result_published = $4
                 WHERE id = $1 AND status = 'queued'",
                &[&id, &json, &end.now_ms, &published],
            )
            .await?;
        Ok(n == 1)
    }

    async fn mark_running(&self, id: i64, machine: &str, handle: &str, now_ms: i64) -> Result<()> {
        self.transition(
            id,
            RunStatus::Running,
            "UPDATE pubrun_runs SET machine = $2, handle = $3,
                 started_at_ms = coalesce(started_at_ms, $4) WHERE id = $1",
            &[&machine, &handle, &now_ms],
        )
        .await
    }

    async fn requeue(&self, id: i64, again: Requeue<'_>) -> Result<()> {
        let exit = to_json(again.last_exit)?;
        let attempt = attempts(again.next_attempt)?;
        self.transition(
            id,
            RunStatus::Queued,
            "UPDATE pubrun_runs SET attempt = $2, not_before_ms = $3, exit = $4 WHERE id = $1",
            &[&attempt, &again.not_before_ms, &exit],
        )
        .await
    }

    async fn finish(&self, id: i64, end: RunEnd<'_>) -> Result<RunStatus> {
        let status = end.exit.status();
        let (json, published) = end.columns()?;
        self.transition(
            id,
            status,
            "UPDATE pubrun_runs SET exit = $2, ended_at_ms = $3, result_published = $4 WHERE id = $1",
            &[&json, &end.now_ms, &published],
        )
        .await?;
        Ok(status)
    }

    async fn request_cancel(&self, id: i64) -> Result<RunRecord> {
        let mut g = self.conn().await;
        let tx = self.begin(g.get().await?).await?;
        let status: String = tx
            .query_opt(
                "SELECT status FROM pubrun_runs WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| Error::not_found(format!("run {id} not found")))?
            .get(0);
        let status = RunStatus::parse(&status)?;
        if status.is_terminal() {
            return Err(Error::precondition(format!(
                "run {id} already ended ({status})"
            )));
        }
        tx.execute(
            "UPDATE pubrun_runs SET cancel_requested = true WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(pg)?;
        let run = get_run(&tx, id).await?;
        tx.commit().await.map_err(pg)?;
        Ok(run)
    }

    async fn unpublished_results(&self) -> Result<Vec<RunRecord>> {
        let mut g = self.conn().await;
        query_runs(
            &*g.get().await?,
            "WHERE NOT result_published ORDER BY id",
            &[],
        )
        .await
    }

    async fn mark_result_published(&self, id: i64) -> Result<()> {
        self.write(
            "UPDATE pubrun_runs SET result_published = true WHERE id = $1",
            &[&id],
        )
        .await?;
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn put_log(&self, id: i64, log: &[u8]) -> Result<()> {
        self.write(
            "INSERT INTO pubrun_run_logs (run_id, body) VALUES ($1, $2)
             ON CONFLICT (run_id) DO UPDATE SET body = excluded.body",
            &[&id, &log],
        )
        .await?;
        Ok(())
    }

    async fn log(&self, id: i64) -> Result<Option<Vec<u8>>> {
        let row = self
            .db
            .query_opt("SELECT body FROM pubrun_run_logs WHERE run_id = $1", &[&id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
