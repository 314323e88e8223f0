//! The durable record of jobs and runs (SQLite in the data directory).
//!
//! What commits together, in one transaction:
//! - a new run *and* its dedup entry (so a duplicate message can never
//!   create a second run, even across a crash between commit and ack);
//! - a run's terminal state *and* its pending result message (outbox: the
//!   `result_published` flag is cleared; the dispatcher publishes and sets it,
//!   so a crash in between publishes the result again — at least once).
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: a commit that returned
//! survives power loss.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use pubrun_core::job::JobSpec;
use pubrun_core::run::{Exit, RunStatus};
use pubrun_core::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// The message a run was made for, kept so retries re-render the same parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceMessage {
    pub id: String,
    #[serde(skip)]
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    /// RFC 3339.
    pub publish_time: String,
    pub ordering_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub status: RunStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    pub message: SourceMessage,
    pub dedup_key: String,
    pub exit: Option<Exit>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// A queued run (retry) waits until then.
    pub not_before_ms: i64,
    /// Where the current/last attempt ran.
    pub machine: String,
    pub handle: String,
    pub cancel_requested: bool,
    pub result_published: bool,
}

const SCHEMA_VERSION: i64 = 3;

const MIGRATION_1: &str = r#"
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
"#;

/// Finding unpublished results must not scan every run ever made.
const MIGRATION_2: &str = r#"
CREATE INDEX runs_unpublished ON runs(id) WHERE result_published = 0;
"#;

/// The scheduler asks "oldest queued runs of job J" on every wake.
const MIGRATION_3: &str = r#"
CREATE INDEX runs_queued_by_job ON runs(job, id) WHERE status = 'queued';
"#;

pub struct RunStore {
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::unavailable(format!("run store: {e}"))
}

/// A queued run as the scheduler sees it (no message data).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRun {
    pub id: i64,
    pub job: String,
    pub cancel_requested: bool,
}

/// Outcome of trying to queue a run for a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    New(i64),
    /// A run with the same dedup key exists inside the window.
    Duplicate(i64),
}

impl RunStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(Error::precondition(format!(
                "{} was written by a newer pubrun (schema {version}); upgrade pubrun",
                path.display()
            )));
        }
        if version < 1 {
            conn.execute_batch(MIGRATION_1).map_err(db_err)?;
        }
        if version < 2 {
            conn.execute_batch(MIGRATION_2).map_err(db_err)?;
        }
        if version < 3 {
            conn.execute_batch(MIGRATION_3).map_err(db_err)?;
        }
        if version < SCHEMA_VERSION {
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(db_err)?;
        }
        Ok(RunStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- jobs ----

    pub fn put_job(&self, spec: &JobSpec) -> Result<()> {
        let json = serde_json::to_string(spec).expect("job spec serializes");
        self.conn()
            .execute("INSERT INTO jobs(name, spec) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec", params![spec.name, json])
            .map_err(db_err)?;
        Ok(())
    }

    pub fn delete_job(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM jobs WHERE name = ?1", params![name])
            .map_err(db_err)?
            > 0)
    }

    pub fn jobs(&self) -> Result<Vec<JobSpec>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT spec FROM jobs ORDER BY name")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let s = r.map_err(db_err)?;
            out.push(
                serde_json::from_str(&s)
                    .map_err(|e| Error::internal(format!("stored job spec: {e}")))?,
            );
        }
        Ok(out)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn()
            .execute("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", params![key, value])
            .map_err(db_err)?;
        Ok(())
    }

    // ---- runs ----

    /// Queues a run unless the dedup key is taken inside its window.
    pub fn enqueue(
        &self,
        job: &JobSpec,
        message: &SourceMessage,
        dedup_key: &str,
        now_ms: i64,
    ) -> Result<Enqueued> {
        let mut out =
            self.enqueue_batch(job, &[(message.clone(), dedup_key.to_string())], now_ms)?;
        Ok(out.pop().expect("one result per message"))
    }

    /// Queues runs for several messages in ONE transaction (one fsync): the
    /// intake's hot path. Later messages see the dedup keys of earlier ones.
    pub fn enqueue_batch(
        &self,
        job: &JobSpec,
        messages: &[(SourceMessage, String)],
        now_ms: i64,
    ) -> Result<Vec<Enqueued>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_err)?;
        let mut out = Vec::with_capacity(messages.len());
        for (message, dedup_key) in messages {
            let existing: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT run_id, expires_at_ms FROM dedup WHERE job = ?1 AND key = ?2",
                    params![job.name, dedup_key],
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
            let meta = serde_json::to_string(message).expect("message serializes");
            tx.execute(
                "INSERT INTO runs(job, status, attempt, max_attempts, message_id, message_meta, message_data, dedup_key, created_at_ms, not_before_ms)
                 VALUES (?1, 'queued', 1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![job.name, job.retries.max_attempts, message.id, meta, message.data, dedup_key, now_ms],
            )
            .map_err(db_err)?;
            let id = tx.last_insert_rowid();
            let expires = now_ms.saturating_add(job.dedup_window.as_millis() as i64);
            tx.execute(
                "INSERT INTO dedup(job, key, run_id, expires_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(job, key) DO UPDATE SET run_id = excluded.run_id, expires_at_ms = excluded.expires_at_ms",
                params![job.name, dedup_key, id, expires],
            )
            .map_err(db_err)?;
            out.push(Enqueued::New(id));
        }
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    /// The queued runs of a job that may start now (oldest first, at most
    /// `limit`), without their message data: the scheduler's hot query.
    pub fn startable(&self, job: &str, now_ms: i64, limit: usize) -> Result<Vec<QueuedRun>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, cancel_requested FROM runs WHERE status = 'queued' AND job = ?1 AND not_before_ms <= ?2
                 ORDER BY id LIMIT ?3",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![job, now_ms, limit as i64], |r| {
                Ok(QueuedRun {
                    id: r.get(0)?,
                    job: job.to_string(),
                    cancel_requested: r.get::<_, i64>(1)? != 0,
                })
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
    }

    /// Queued runs that are due (not waiting for a retry backoff), per job.
    pub fn due_queued_by_job(&self, now_ms: i64) -> Result<Vec<(String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT job, COUNT(*) FROM runs WHERE status = 'queued' AND not_before_ms <= ?1 GROUP BY job",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![now_ms], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
    }

    /// When the earliest queued run waiting for its backoff becomes due.
    pub fn next_due_ms(&self, now_ms: i64) -> Result<Option<i64>> {
        self.conn()
            .query_row("SELECT MIN(not_before_ms) FROM runs WHERE status = 'queued' AND not_before_ms > ?1", params![now_ms], |r| r.get(0))
            .map_err(db_err)
    }

    /// Queued runs whose job is not in `jobs` (deleted while they waited).
    pub fn queued_orphans(&self, jobs: &[String]) -> Result<Vec<QueuedRun>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, job, cancel_requested FROM runs WHERE status = 'queued'")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(QueuedRun {
                    id: r.get(0)?,
                    job: r.get(1)?,
                    cancel_requested: r.get::<_, i64>(2)? != 0,
                })
            })
            .map_err(db_err)?;
        let all = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?;
        Ok(all.into_iter().filter(|q| !jobs.contains(&q.job)).collect())
    }

    /// Drops dedup entries whose window has passed.
    pub fn prune_dedup(&self, now_ms: i64) -> Result<usize> {
        self.conn()
            .execute(
                "DELETE FROM dedup WHERE expires_at_ms <= ?1",
                params![now_ms],
            )
            .map_err(db_err)
    }

    fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
        let status: String = r.get("status")?;
        let meta: String = r.get("message_meta")?;
        let exit: Option<String> = r.get("exit")?;
        let mut message: SourceMessage = serde_json::from_str(&meta).unwrap_or_default();
        message.data = r.get("message_data")?;
        Ok(RunRecord {
            id: r.get("id")?,
            job: r.get("job")?,
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
            attempt: r.get("attempt")?,
            max_attempts: r.get("max_attempts")?,
            message,
            dedup_key: r.get("dedup_key")?,
            exit: exit.and_then(|e| serde_json::from_str(&e).ok()),
            created_at_ms: r.get("created_at_ms")?,
            started_at_ms: r.get("started_at_ms")?,
            ended_at_ms: r.get("ended_at_ms")?,
            not_before_ms: r.get("not_before_ms")?,
            machine: r.get("machine")?,
            handle: r.get("handle")?,
            cancel_requested: r.get::<_, i64>("cancel_requested")? != 0,
            result_published: r.get::<_, i64>("result_published")? != 0,
        })
    }

    pub fn get(&self, id: i64) -> Result<RunRecord> {
        self.conn()
            .query_row(
                "SELECT * FROM runs WHERE id = ?1",
                params![id],
                Self::row_to_run,
            )
            .optional()
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("run {id} not found")))
    }

    /// Newest first.
    pub fn list(
        &self,
        job: Option<&str>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<RunRecord>> {
        self.list_before(job, status, None, limit)
    }

    /// Newest first, only runs with an id below `before` (keyset paging for
    /// the dashboard: a page stays stable while new runs arrive).
    pub fn list_before(
        &self,
        job: Option<&str>,
        status: Option<RunStatus>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT * FROM runs WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2) AND id < ?3 ORDER BY id DESC LIMIT ?4",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(
                params![
                    job,
                    status.map(|s| s.as_str()),
                    before.unwrap_or(i64::MAX),
                    limit as i64
                ],
                Self::row_to_run,
            )
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
    }

    /// How many runs are in each status (statuses without runs are absent).
    pub fn count_by_status(&self) -> Result<Vec<(RunStatus, u64)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT status, COUNT(*) FROM runs GROUP BY status")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (s, n) = row.map_err(db_err)?;
            out.push((RunStatus::parse(&s)?, n as u64));
        }
        Ok(out)
    }

    pub fn with_status(&self, statuses: &[RunStatus]) -> Result<Vec<RunRecord>> {
        let mut out = Vec::new();
        for s in statuses {
            let conn = self.conn();
            let mut stmt = conn
                .prepare("SELECT * FROM runs WHERE status = ?1 ORDER BY id")
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![s.as_str()], Self::row_to_run)
                .map_err(db_err)?;
            out.extend(rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?);
        }
        Ok(out)
    }

    /// Moves a run along the state machine, checking the transition.
    fn transition(
        &self,
        id: i64,
        to: RunStatus,
        update: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_err)?;
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

    /// Claims a queued run for execution. Atomic: fails (FAILED_PRECONDITION)
    /// unless the run is queued *and* no cancel was requested, so a run is
    /// never started twice and a cancelled queued run never starts.
    pub fn mark_starting(&self, id: i64) -> Result<()> {
        let n = self
            .conn()
            .execute(
                "UPDATE runs SET status = 'starting' WHERE id = ?1 AND status = 'queued' AND cancel_requested = 0",
                params![id],
            )
            .map_err(db_err)?;
        if n == 1 {
            return Ok(());
        }
        let run = self.get(id)?;
        if run.cancel_requested && run.status == RunStatus::Queued {
            return Err(Error::precondition(format!("run {id} is being cancelled")));
        }
        run.status.check_transition(RunStatus::Starting)?;
        Err(Error::precondition(format!(
            "run {id} could not be claimed"
        )))
    }

    /// Ends a run that is still queued as cancelled, in one statement (so it
    /// cannot race with [`mark_starting`](Self::mark_starting)). Returns
    /// whether the run was queued.
    pub fn cancel_if_queued(
        &self,
        id: i64,
        exit: &Exit,
        now_ms: i64,
        has_result_topic: bool,
    ) -> Result<bool> {
        debug_assert_eq!(exit.status(), RunStatus::Cancelled);
        let json = serde_json::to_string(exit).expect("exit serializes");
        let n = self
            .conn()
            .execute(
                "UPDATE runs SET status = 'cancelled', cancel_requested = 1, exit = ?2, ended_at_ms = ?3, result_published = ?4
                 WHERE id = ?1 AND status = 'queued'",
                params![id, json, now_ms, if has_result_topic { 0 } else { 1 }],
            )
            .map_err(db_err)?;
        Ok(n == 1)
    }

    pub fn mark_running(&self, id: i64, machine: &str, handle: &str, now_ms: i64) -> Result<()> {
        self.transition(id, RunStatus::Running, |tx| {
            tx.execute(
                "UPDATE runs SET machine = ?2, handle = ?3, started_at_ms = COALESCE(started_at_ms, ?4) WHERE id = ?1",
                params![id, machine, handle, now_ms],
            )
            .map(|_| ())
        })
    }

    /// Back to the queue for another attempt (or the same one after an infra error).
    pub fn requeue(
        &self,
        id: i64,
        next_attempt: u32,
        not_before_ms: i64,
        last_exit: &Exit,
    ) -> Result<()> {
        let exit = serde_json::to_string(last_exit).expect("exit serializes");
        self.transition(id, RunStatus::Queued, |tx| {
            tx.execute(
                "UPDATE runs SET attempt = ?2, not_before_ms = ?3, exit = ?4 WHERE id = ?1",
                params![id, next_attempt, not_before_ms, exit],
            )
            .map(|_| ())
        })
    }

    /// Terminal state plus the outbox flag, in one commit.
    pub fn finish(
        &self,
        id: i64,
        exit: &Exit,
        now_ms: i64,
        has_result_topic: bool,
    ) -> Result<RunStatus> {
        let status = exit.status();
        let json = serde_json::to_string(exit).expect("exit serializes");
        self.transition(id, status, |tx| {
            tx.execute(
                "UPDATE runs SET exit = ?2, ended_at_ms = ?3, result_published = ?4 WHERE id = ?1",
                params![id, json, now_ms, if has_result_topic { 0 } else { 1 }],
            )
            .map(|_| ())
        })?;
        Ok(status)
    }

    pub fn request_cancel(&self, id: i64) -> Result<RunRecord> {
        let run = self.get(id)?;
        if run.status.is_terminal() {
            return Err(Error::precondition(format!(
                "run {id} already ended ({})",
                run.status
            )));
        }
        self.conn()
            .execute(
                "UPDATE runs SET cancel_requested = 1 WHERE id = ?1",
                params![id],
            )
            .map_err(db_err)?;
        self.get(id)
    }

    pub fn unpublished_results(&self) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT * FROM runs WHERE result_published = 0 ORDER BY id")
            .map_err(db_err)?;
        let rows = stmt.query_map([], Self::row_to_run).map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
    }

    pub fn mark_result_published(&self, id: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE runs SET result_published = 1 WHERE id = ?1",
                params![id],
            )
            .map_err(db_err)?;
        Ok(())
    }
}
