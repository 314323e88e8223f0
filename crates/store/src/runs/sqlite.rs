//! The embedded run store: `runs.db` in the data directory, on the shared
//! SQLite opener (`crate::sqlite`).

use std::path::Path;

use pubrun_core::job::JobSpec;
use pubrun_core::run::RunStatus;
use pubrun_core::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    claim_refused, parse_jobs, to_json, Batch, Claimed, Enqueued, QueuedRun, RawRun, Requeue,
    RunEnd, RunPage, RunRecord, RunStore,
};
use crate::sqlite::{query_all, SqliteDb, SqliteError};

/// Numbered migrations (`PRAGMA user_version`); never edit a released one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    message_meta TEXT NOT NULL,
    message_data BLOB NOT NULL,
    dedup_key TEXT NOT NULL,
    exit TEXT,
    created_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER,
    ended_at_ms INTEGER,
    not_before_ms INTEGER NOT NULL,
    machine TEXT NOT NULL DEFAULT '',
    handle TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result_published INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX runs_by_status ON runs(status, not_before_ms);
CREATE INDEX runs_by_job ON runs(job, id);
CREATE TABLE dedup (
    job TEXT NOT NULL,
    key TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (job, key)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    // 2: finding unpublished results must not scan every run ever made.
    "CREATE INDEX runs_unpublished ON runs(id) WHERE result_published = 0;",
    // 3: the scheduler asks "oldest queued runs of job J" on every wake.
    "CREATE INDEX runs_queued_by_job ON runs(job, id) WHERE status = 'queued';",
    // 4: run logs (the engine interface has them; `serve` keeps the embedded
    // engine's logs as files, so this table stays empty there).
    "CREATE TABLE run_logs (run_id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
];

fn db_err(e: rusqlite::Error) -> Error {
    Error::unavailable(format!("run store: {e}"))
}

impl From<SqliteError> for Error {
    fn from(e: SqliteError) -> Self {
        match e {
            SqliteError::TooNew { .. } => Error::precondition(e.to_string()),
            _ => Error::unavailable(format!("run store: {e}")),
        }
    }
}

pub struct SqliteRunStore {
    db: SqliteDb,
    #[cfg(feature = "testing")]
    on_claim: Option<ClaimHook>,
}

/// What a test runs when a claim (the intake's `enqueue_starting` or the
/// scheduler's `claim_due`) has committed runs as `starting`, before the
/// claim answers: it gets their ids, and the claim waits for its future. It
/// holds the window between the commit and the dispatcher's registering of
/// the runs open for as long as the test needs (feature `testing`).
#[cfg(feature = "testing")]
pub type ClaimHook = Box<
    dyn Fn(Vec<i64>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// The blocking forms of the calls that tests and tools make outside the
/// dispatcher (same SQL as the [`RunStore`] methods of the same names).
impl SqliteRunStore {
    /// Opens (creating, migrating) `path`. Blocking; quick.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(SqliteRunStore {
            db: SqliteDb::open_blocking(path, MIGRATIONS)?,
            #[cfg(feature = "testing")]
            on_claim: None,
        })
    }

    /// The same store, with `hook` run on every claim (see [`ClaimHook`]).
    #[cfg(feature = "testing")]
    pub fn with_claim_hook(mut self, hook: ClaimHook) -> Self {
        self.on_claim = Some(hook);
        self
    }

    pub fn get(&self, id: i64) -> Result<RunRecord> {
        self.db.call_blocking(|c| get_run(c, id))
    }

    /// Blocking [`RunStore::list_before`](super::RunStore::list_before).
    pub fn list_before(&self, page: &RunPage) -> Result<Vec<RunRecord>> {
        self.db.call_blocking(|c| list_runs(c, page))
    }

    pub fn prune_dedup(&self, now_ms: i64) -> Result<usize> {
        self.db.call_blocking(|c| prune_dedup(c, now_ms))
    }

    pub fn mark_starting(&self, id: i64) -> Result<()> {
        self.db.call_blocking(|c| mark_starting(c, id))
    }

    pub fn mark_running(&self, id: i64, machine: &str, handle: &str, now_ms: i64) -> Result<()> {
        self.db
            .call_blocking(|c| mark_running(c, id, machine, handle, now_ms))
    }
}

impl SqliteRunStore {
    /// A query, on the read connection (never waits for a commit's fsync).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.db.read(f).await
    }

    /// A change, in the next group commit: answered once it is durable.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.db.write(f).await
    }

    /// Runs the test's [`ClaimHook`], if any, on the runs a claim started.
    async fn claimed(&self, started: &[RunRecord]) {
        #[cfg(feature = "testing")]
        if let (Some(hook), false) = (&self.on_claim, started.is_empty()) {
            hook(started.iter().map(|r| r.id).collect()).await;
        }
        let _ = started;
    }
}

const RUN_COLUMNS: &str = "id, job, status, attempt, max_attempts, message_meta, message_data, dedup_key, exit, \
     created_at_ms, started_at_ms, ended_at_ms, not_before_ms, machine, handle, cancel_requested, result_published";

fn raw_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: r.get(0)?,
        job: r.get(1)?,
        status: r.get(2)?,
        attempt: r.get(3)?,
        max_attempts: r.get(4)?,
        message_meta: r.get(5)?,
        message_data: r.get(6)?,
        dedup_key: r.get(7)?,
        exit: r.get(8)?,
        created_at_ms: r.get(9)?,
        started_at_ms: r.get(10)?,
        ended_at_ms: r.get(11)?,
        not_before_ms: r.get(12)?,
        machine: r.get(13)?,
        handle: r.get(14)?,
        cancel_requested: r.get::<_, i64>(15)? != 0,
        result_published: r.get::<_, i64>(16)? != 0,
        node: None,
    })
}

fn query_runs(
    conn: &Connection,
    where_: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs {where_}");
    let rows = query_all(conn, &sql, params, raw_run).map_err(db_err)?;
    rows.into_iter().map(RawRun::parse).collect()
}

fn get_run(conn: &Connection, id: i64) -> Result<RunRecord> {
    query_runs(conn, "WHERE id = ?1", params![id])?
        .pop()
        .ok_or_else(|| Error::not_found(format!("run {id} not found")))
}

/// Moves a run along the state machine inside one transaction, checking the transition.
fn transition(
    conn: &mut Connection,
    id: i64,
    to: RunStatus,
    update: impl FnOnce(&Connection) -> rusqlite::Result<usize>,
) -> Result<()> {
    // A savepoint: its own transaction for blocking callers, nested in the
    // group's for the writer thread.
    let tx = conn.savepoint().map_err(db_err)?;
    let status: String = tx
        .query_row("SELECT status FROM runs WHERE id = ?1", params![id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db_err)?
        .ok_or_else(|| Error::not_found(format!("run {id} not found")))?;
    RunStatus::parse(&status)?.check_transition(to)?;
    tx.execute(
        "UPDATE runs SET status = ?2 WHERE id = ?1",
        params![id, to.as_str()],
    )
    .map_err(db_err)?;
    update(&tx).map_err(db_err)?;
    tx.commit().map_err(db_err)
}

fn list_runs(c: &Connection, page: &RunPage) -> Result<Vec<RunRecord>> {
    query_runs(
        c,
        "WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2) AND id < ?3 ORDER BY id DESC LIMIT ?4",
        params![
            page.job,
            page.status.map(|s| s.as_str()),
            page.before.unwrap_or(i64::MAX),
            page.limit as i64
        ],
    )
}

fn count_by_status(c: &Connection) -> Result<Vec<(RunStatus, u64)>> {
    let sql = "SELECT status, COUNT(*) FROM runs GROUP BY status";
    let rows = query_all(c, sql, [], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })
    .map_err(db_err)?;
    rows.into_iter()
        .map(|(s, n)| Ok((RunStatus::parse(&s)?, n as u64)))
        .collect()
}

fn prune_dedup(c: &Connection, now_ms: i64) -> Result<usize> {
    c.execute(
        "DELETE FROM dedup WHERE expires_at_ms <= ?1",
        params![now_ms],
    )
    .map_err(db_err)
}

fn mark_starting(c: &Connection, id: i64) -> Result<()> {
    let n = c
        .execute(
            "UPDATE runs SET status = 'starting' WHERE id = ?1 AND status = 'queued' AND cancel_requested = 0",
            params![id],
        )
        .map_err(db_err)?;
    if n == 1 {
        return Ok(());
    }
    Err(claim_refused(&get_run(c, id)?))
}

/// [`RunStore::startable`]: the due queued runs of `job`, oldest first.
fn startable(c: &Connection, job: &str, now_ms: i64, limit: usize) -> Result<Vec<QueuedRun>> {
    let sql = "SELECT id, cancel_requested FROM runs WHERE status = 'queued' AND job = ?1 AND not_before_ms <= ?2
             ORDER BY id LIMIT ?3";
    query_all(c, sql, params![job, now_ms, limit as i64], |r| {
        Ok(QueuedRun {
            id: r.get(0)?,
            job: job.to_string(),
            cancel_requested: r.get::<_, i64>(1)? != 0,
        })
    })
    .map_err(db_err)
}

/// [`RunStore::claim_due`] in one transaction: claimed runs are read back
/// whole before the commit, so the caller needs no second query.
fn claim_due(
    c: &mut Connection,
    job: &str,
    now_ms: i64,
    limit: usize,
    skip: &[i64],
) -> Result<Claimed> {
    let tx = c.savepoint().map_err(db_err)?;
    let due = startable(
        &tx,
        job,
        now_ms,
        limit.saturating_add(8).saturating_add(skip.len()),
    )?;
    let mut out = Claimed::default();
    for q in due {
        if skip.contains(&q.id) {
            continue;
        }
        if q.cancel_requested {
            out.cancelled.push(q);
        } else if out.started.len() < limit {
            mark_starting(&tx, q.id)?;
            out.started.push(get_run(&tx, q.id)?);
        }
    }
    tx.commit().map_err(db_err)?;
    Ok(out)
}

fn mark_running(
    c: &mut Connection,
    id: i64,
    machine: &str,
    handle: &str,
    now_ms: i64,
) -> Result<()> {
    transition(c, id, RunStatus::Running, |tx| {
        tx.execute(
            "UPDATE runs SET machine = ?2, handle = ?3, started_at_ms = COALESCE(started_at_ms, ?4) WHERE id = ?1",
            params![id, machine, handle, now_ms],
        )
    })
}

/// A [`Batch`] with its inputs owned (it runs on another thread).
struct EnqueueBatch {
    job: String,
    now_ms: i64,
    max_attempts: u32,
    window_ms: i64,
    /// (message meta JSON, message id, data, dedup key)
    items: Vec<(String, String, Vec<u8>, String)>,
}

impl EnqueueBatch {
    fn new(batch: Batch<'_>) -> Result<Self> {
        let job = batch.job;
        let mut items = Vec::with_capacity(batch.messages.len());
        for (m, key) in batch.messages {
            items.push((to_json(m)?, m.id.clone(), m.data.clone(), key.clone()));
        }
        Ok(EnqueueBatch {
            job: job.name.clone(),
            now_ms: batch.now_ms,
            max_attempts: job.retries.max_attempts,
            window_ms: i64::try_from(job.dedup_window.as_millis()).unwrap_or(i64::MAX),
            items,
        })
    }

    /// Queues the batch; the first `start` new runs are inserted as
    /// `starting` instead, unless an older due run of the job is queued.
    fn run(self, c: &mut Connection, start: usize) -> Result<(Vec<Enqueued>, Vec<RunRecord>)> {
        let (name, now_ms) = (self.job, self.now_ms);
        let tx = c.savepoint().map_err(db_err)?;
        let mut start = start;
        if start > 0 {
            let waiting: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM runs WHERE status = 'queued' AND job = ?1 AND not_before_ms <= ?2)",
                    params![name, now_ms],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if waiting {
                start = 0;
            }
        }
        let mut started = Vec::with_capacity(start);
        let mut out = Vec::with_capacity(self.items.len());
        for (meta, message_id, data, dedup_key) in self.items {
            let existing: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT run_id, expires_at_ms FROM dedup WHERE job = ?1 AND key = ?2",
                    params![name, dedup_key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db_err)?;
            if let Some((run_id, expires)) = existing {
                if expires > now_ms {
                    out.push(Enqueued::Duplicate(run_id));
                    continue;
                }
            }
            let status = if started.len() < start {
                RunStatus::Starting
            } else {
                RunStatus::Queued
            };
            tx.execute(
                "INSERT INTO runs(job, status, attempt, max_attempts, message_id, message_meta, message_data, dedup_key, created_at_ms, not_before_ms)
                 VALUES (?1, ?8, 1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![name, self.max_attempts, message_id, meta, data, dedup_key, now_ms, status.as_str()],
            )
            .map_err(db_err)?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO dedup(job, key, run_id, expires_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(job, key) DO UPDATE SET run_id = excluded.run_id, expires_at_ms = excluded.expires_at_ms",
                params![name, dedup_key, id, now_ms.saturating_add(self.window_ms)],
            )
            .map_err(db_err)?;
            out.push(Enqueued::New(id));
            if status == RunStatus::Starting {
                started.push(get_run(&tx, id)?);
            }
        }
        tx.commit().map_err(db_err)?;
        Ok((out, started))
    }
}

#[async_trait::async_trait]
impl RunStore for SqliteRunStore {
    async fn put_job(&self, spec: &JobSpec) -> Result<()> {
        let json = to_json(spec)?;
        let name = spec.name.clone();
        self.write(move |c| {
            c.execute("INSERT INTO jobs(name, spec) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec", params![name, json])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn delete_job(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |c| {
            Ok(c.execute("DELETE FROM jobs WHERE name = ?1", params![name])
                .map_err(db_err)?
                > 0)
        })
        .await
    }

    async fn jobs(&self) -> Result<Vec<JobSpec>> {
        let specs = self
            .read(|c| {
                let sql = "SELECT spec FROM jobs ORDER BY name";
                query_all(c, sql, [], |r| r.get::<_, String>(0)).map_err(db_err)
            })
            .await?;
        parse_jobs(specs)
    }

    async fn meta(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_string());
        self.write(move |c| {
            c.execute("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", params![key, value])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn enqueue_batch(&self, batch: Batch<'_>) -> Result<Vec<Enqueued>> {
        let batch = EnqueueBatch::new(batch)?;
        Ok(self.write(move |c| batch.run(c, 0)).await?.0)
    }

    async fn enqueue_starting(
        &self,
        batch: Batch<'_>,
        start: usize,
    ) -> Result<(Vec<Enqueued>, Vec<RunRecord>)> {
        let batch = EnqueueBatch::new(batch)?;
        let out = self.write(move |c| batch.run(c, start)).await?;
        self.claimed(&out.1).await;
        Ok(out)
    }

    async fn startable(&self, job: &str, now_ms: i64, limit: usize) -> Result<Vec<QueuedRun>> {
        let job = job.to_string();
        self.read(move |c| startable(c, &job, now_ms, limit)).await
    }

    async fn claim_due(
        &self,
        job: &str,
        now_ms: i64,
        limit: usize,
        skip: &[i64],
    ) -> Result<Claimed> {
        let (job, skip) = (job.to_string(), skip.to_vec());
        let out = self
            .write(move |c| claim_due(c, &job, now_ms, limit, &skip))
            .await?;
        self.claimed(&out.started).await;
        Ok(out)
    }

    async fn due_queued_by_job(&self, now_ms: i64) -> Result<Vec<(String, u64)>> {
        self.read(move |c| {
            let sql = "SELECT job, COUNT(*) FROM runs WHERE status = 'queued' AND not_before_ms <= ?1 GROUP BY job";
            query_all(c, sql, params![now_ms], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(db_err)
        })
        .await
    }

    async fn next_due_ms(&self, now_ms: i64) -> Result<Option<i64>> {
        self.read(move |c| {
            c.query_row("SELECT MIN(not_before_ms) FROM runs WHERE status = 'queued' AND not_before_ms > ?1", params![now_ms], |r| r.get(0))
                .map_err(db_err)
        })
        .await
    }

    async fn queued_orphans(&self, jobs: &[String]) -> Result<Vec<QueuedRun>> {
        let all = self
            .read(|c| {
                let sql = "SELECT id, job, cancel_requested FROM runs WHERE status = 'queued'";
                query_all(c, sql, [], |r| {
                    Ok(QueuedRun {
                        id: r.get(0)?,
                        job: r.get(1)?,
                        cancel_requested: r.get::<_, i64>(2)? != 0,
                    })
                })
                .map_err(db_err)
            })
            .await?;
        Ok(all.into_iter().filter(|q| !jobs.contains(&q.job)).collect())
    }

    async fn prune_dedup(&self, now_ms: i64) -> Result<usize> {
        self.write(move |c| prune_dedup(c, now_ms)).await
    }

    async fn get(&self, id: i64) -> Result<RunRecord> {
        self.read(move |c| get_run(c, id)).await
    }

    async fn list_before(&self, page: RunPage) -> Result<Vec<RunRecord>> {
        self.read(move |c| list_runs(c, &page)).await
    }

    async fn count_by_status(&self) -> Result<Vec<(RunStatus, u64)>> {
        self.read(|c| count_by_status(c)).await
    }

    async fn with_status(&self, statuses: &[RunStatus]) -> Result<Vec<RunRecord>> {
        let statuses = statuses.to_vec();
        self.read(move |c| {
            let mut out = Vec::new();
            for s in statuses {
                out.extend(query_runs(
                    c,
                    "WHERE status = ?1 ORDER BY id",
                    params![s.as_str()],
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn mark_starting(&self, id: i64) -> Result<()> {
        self.write(move |c| mark_starting(c, id)).await
    }

    async fn cancel_if_queued(&self, id: i64, end: RunEnd<'_>) -> Result<bool> {
        debug_assert_eq!(end.exit.status(), RunStatus::Cancelled);
        let ((json, published), now_ms) = (end.columns()?, end.now_ms);
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE runs SET status = 'cancelled', cancel_requested = 1, exit = ?2, ended_at_ms = ?3, result_published = ?4
                     WHERE id = ?1 AND status = 'queued'",
                    params![id, json, now_ms, published],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn mark_running(&self, id: i64, machine: &str, handle: &str, now_ms: i64) -> Result<()> {
        let (machine, handle) = (machine.to_string(), handle.to_string());
        self.write(move |c| mark_running(c, id, &machine, &handle, now_ms))
            .await
    }

    async fn requeue(&self, id: i64, again: Requeue<'_>) -> Result<()> {
        let exit = to_json(again.last_exit)?;
        let (attempt, not_before_ms) = (again.next_attempt, again.not_before_ms);
        self.write(move |c| {
            transition(c, id, RunStatus::Queued, |tx| {
                tx.execute(
                    "UPDATE runs SET attempt = ?2, not_before_ms = ?3, exit = ?4 WHERE id = ?1",
                    params![id, attempt, not_before_ms, exit],
                )
            })
        })
        .await
    }

    async fn finish(&self, id: i64, end: RunEnd<'_>) -> Result<RunStatus> {
        let status = end.exit.status();
        let ((json, published), now_ms) = (end.columns()?, end.now_ms);
        self.write(move |c| {
            transition(c, id, status, |tx| {
                tx.execute(
                    "UPDATE runs SET exit = ?2, ended_at_ms = ?3, result_published = ?4 WHERE id = ?1",
                    params![id, json, now_ms, published],
                )
            })
        })
        .await?;
        Ok(status)
    }

    async fn request_cancel(&self, id: i64) -> Result<RunRecord> {
        self.write(move |c| {
            let tx = c.savepoint().map_err(db_err)?;
            let run = get_run(&tx, id)?;
            if run.status.is_terminal() {
                return Err(Error::precondition(format!(
                    "run {id} already ended ({})",
                    run.status
                )));
            }
            tx.execute(
                "UPDATE runs SET cancel_requested = 1 WHERE id = ?1",
                params![id],
            )
            .map_err(db_err)?;
            let run = get_run(&tx, id)?;
            tx.commit().map_err(db_err)?;
            Ok(run)
        })
        .await
    }

    async fn unpublished_results(&self) -> Result<Vec<RunRecord>> {
        self.read(|c| query_runs(c, "WHERE result_published = 0 ORDER BY id", []))
            .await
    }

    async fn mark_result_published(&self, id: i64) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE runs SET result_published = 1 WHERE id = ?1",
                params![id],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    fn shared(&self) -> bool {
        false
    }

    async fn put_log(&self, id: i64, log: &[u8]) -> Result<()> {
        let log = log.to_vec();
        self.write(move |c| {
            c.execute(
                "INSERT INTO run_logs(run_id, body) VALUES (?1, ?2)
                 ON CONFLICT(run_id) DO UPDATE SET body = excluded.body",
                params![id, log],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn log(&self, id: i64) -> Result<Option<Vec<u8>>> {
        self.read(move |c| {
            c.query_row(
                "SELECT body FROM run_logs WHERE run_id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }
}
