//! The durable record of jobs and runs, behind [`RunStore`], with two
//! engines: [`SqliteRunStore`] (`runs.db` in the data directory, the
//! default) and [`PostgresRunStore`] (cluster mode, `serve --store`).
//!
//! What commits together, in one transaction, on every engine:
//! - a new run *and* its dedup entry (so a duplicate message can never
//!   create a second run, even across a crash between commit and ack; in
//!   PostgreSQL the `(job, key)` primary key makes a key unique cluster-wide);
//! - a run's terminal state *and* its pending result message (outbox: the
//!   `result_published` flag is cleared; the dispatcher publishes and sets it,
//!   so a crash in between publishes the result again — at least once).

pub mod postgres;
pub mod sqlite;

use pubrun_core::job::JobSpec;
use pubrun_core::run::{Exit, RunStatus};
use pubrun_core::Result;

pub use postgres::PostgresRunStore;
pub use pubrun_core::runrecord::{Enqueued, QueuedRun, RunRecord, SourceMessage};
#[cfg(feature = "testing")]
pub use sqlite::ClaimHook;
pub use sqlite::SqliteRunStore;

/// Messages to queue runs for, in one transaction: each with its dedup key.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub job: &'a JobSpec,
    pub messages: &'a [(SourceMessage, String)],
    pub now_ms: i64,
}

/// A page of runs, newest first: only those of `job` and in `status` when
/// given, and with an id below `before` (keyset paging, so a page stays
/// stable while new runs arrive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunPage {
    pub job: Option<String>,
    pub status: Option<RunStatus>,
    pub before: Option<i64>,
    pub limit: usize,
}

/// How a run ends: its exit, when, and whether a result message is owed
/// (then the outbox flag is cleared in the same commit).
#[derive(Debug, Clone, Copy)]
pub struct RunEnd<'a> {
    pub exit: &'a Exit,
    pub now_ms: i64,
    pub has_result_topic: bool,
}

impl RunEnd<'_> {
    /// The stored exit (JSON) and the `result_published` flag.
    fn columns(&self) -> Result<(String, bool)> {
        Ok((to_json(self.exit)?, !self.has_result_topic))
    }
}

/// Another attempt of a run (or the same one after an infra error).
#[derive(Debug, Clone, Copy)]
pub struct Requeue<'a> {
    pub next_attempt: u32,
    pub not_before_ms: i64,
    pub last_exit: &'a Exit,
}

/// What [`RunStore::claim_due`] found.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Claimed: now `starting`, oldest first.
    pub started: Vec<RunRecord>,
    /// Due, but a cancel was requested: to be ended, not started.
    pub cancelled: Vec<QueuedRun>,
}

/// Jobs, runs, dedup keys, the result outbox and a small key/value `meta`
/// table (apply's ownership record). Calls are what the dispatcher and
/// apply use; errors are `pubrun_core` errors (not found, failed
/// precondition for a refused transition, unavailable for a database fault,
/// internal for a corrupt row).
#[async_trait::async_trait]
pub trait RunStore: Send + Sync + 'static {
    // ---- jobs ----
    async fn put_job(&self, spec: &JobSpec) -> Result<()>;
    /// Whether the job existed.
    async fn delete_job(&self, name: &str) -> Result<bool>;
    /// By name.
    async fn jobs(&self) -> Result<Vec<JobSpec>>;

    // ---- meta ----
    async fn meta(&self, key: &str) -> Result<Option<String>>;
    async fn set_meta(&self, key: &str, value: &str) -> Result<()>;

    // ---- runs ----

    /// Queues runs for several messages in ONE transaction (one fsync): the
    /// intake's hot path. A message whose dedup key is taken inside its
    /// window creates nothing; later messages see the keys of earlier ones.
    async fn enqueue_batch(&self, batch: Batch<'_>) -> Result<Vec<Enqueued>>;

    /// Queues a run unless the dedup key is taken inside its window.
    async fn enqueue(
        &self,
        job: &JobSpec,
        message: &SourceMessage,
        dedup_key: &str,
        now_ms: i64,
    ) -> Result<Enqueued> {
        let messages = [(message.clone(), dedup_key.to_string())];
        let batch = Batch {
            job,
            messages: &messages,
            now_ms,
        };
        let mut out = self.enqueue_batch(batch).await?;
        out.pop()
            .ok_or_else(|| pubrun_core::Error::internal("enqueue returned no result"))
    }

    /// [`enqueue_batch`](Self::enqueue_batch), and in the same commit the
    /// first `start` new runs go straight to `starting` (claimed, as by
    /// [`mark_starting`](Self::mark_starting)) — but only when no older run
    /// of the job is queued and due (those start first). Returns the
    /// outcome per message and the runs started, whole. The default starts
    /// none: the scheduler claims them as usual.
    async fn enqueue_starting(
        &self,
        batch: Batch<'_>,
        start: usize,
    ) -> Result<(Vec<Enqueued>, Vec<RunRecord>)> {
        let _ = start;
        Ok((self.enqueue_batch(batch).await?, Vec::new()))
    }

    /// The queued runs of a job that may start now (oldest first, at most
    /// `limit`), without their message data: the scheduler's hot query.
    async fn startable(&self, job: &str, now_ms: i64, limit: usize) -> Result<Vec<QueuedRun>>;

    /// Claims (as [`mark_starting`](Self::mark_starting)) up to `limit` due
    /// queued runs of `job`, oldest first, and returns them whole; due
    /// queued runs with a cancel requested are returned apart, unclaimed
    /// (to be ended, never started). Runs in `skip` are left alone (their
    /// previous attempt is still being recorded). The default makes one
    /// call per run.
    async fn claim_due(
        &self,
        job: &str,
        now_ms: i64,
        limit: usize,
        skip: &[i64],
    ) -> Result<Claimed> {
        let mut out = Claimed::default();
        let look = limit.saturating_add(8).saturating_add(skip.len());
        for q in self.startable(job, now_ms, look).await? {
            if skip.contains(&q.id) {
                continue;
            }
            if q.cancel_requested {
                out.cancelled.push(q);
            } else if out.started.len() < limit {
                match self.mark_starting(q.id).await {
                    Ok(()) => out.started.push(self.get(q.id).await?),
                    // Taken meanwhile (another server, a cancel): skip it.
                    Err(e) if e.code == pubrun_core::Code::FailedPrecondition => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// Queued runs that are due (not waiting for a retry backoff), per job:
    /// the `pubrun_runs_waiting` gauge.
    async fn due_queued_by_job(&self, now_ms: i64) -> Result<Vec<(String, u64)>>;

    /// When the earliest queued run waiting for its backoff becomes due.
    async fn next_due_ms(&self, now_ms: i64) -> Result<Option<i64>>;

    /// Queued runs whose job is not in `jobs` (deleted while they waited).
    async fn queued_orphans(&self, jobs: &[String]) -> Result<Vec<QueuedRun>>;

    /// Drops dedup entries whose window has passed; returns how many.
    async fn prune_dedup(&self, now_ms: i64) -> Result<usize>;

    async fn get(&self, id: i64) -> Result<RunRecord>;

    /// Newest first.
    async fn list(
        &self,
        job: Option<&str>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<RunRecord>> {
        self.list_before(RunPage {
            job: job.map(str::to_string),
            status,
            before: None,
            limit,
        })
        .await
    }

    /// One [`RunPage`] (the dashboard pages with `before`).
    async fn list_before(&self, page: RunPage) -> Result<Vec<RunRecord>>;

    /// How many runs are in each status (statuses without runs are absent).
    async fn count_by_status(&self) -> Result<Vec<(RunStatus, u64)>>;

    /// Runs in any of `statuses`, oldest first per status (recovery at start).
    async fn with_status(&self, statuses: &[RunStatus]) -> Result<Vec<RunRecord>>;

    /// Claims a queued run for execution. Atomic: fails (FAILED_PRECONDITION)
    /// unless the run is queued *and* no cancel was requested, so a run is
    /// never started twice and a cancelled queued run never starts.
    async fn mark_starting(&self, id: i64) -> Result<()>;

    /// Ends a run that is still queued as cancelled, in one statement (so it
    /// cannot race with [`mark_starting`](Self::mark_starting)). Returns
    /// whether the run was queued.
    async fn cancel_if_queued(&self, id: i64, end: RunEnd<'_>) -> Result<bool>;

    async fn mark_running(&self, id: i64, machine: &str, handle: &str, now_ms: i64) -> Result<()>;

    /// Back to the queue for another attempt (or the same one after an infra error).
    async fn requeue(&self, id: i64, again: Requeue<'_>) -> Result<()>;

    /// Terminal state plus the outbox flag, in one commit.
    async fn finish(&self, id: i64, end: RunEnd<'_>) -> Result<RunStatus>;

    /// Flags a run for cancellation (refused once it ended); returns it.
    async fn request_cancel(&self, id: i64) -> Result<RunRecord>;

    /// Ended runs whose result message is not published yet, oldest first.
    async fn unpublished_results(&self) -> Result<Vec<RunRecord>>;

    async fn mark_result_published(&self, id: i64) -> Result<()>;

    // ---- run logs ----

    /// Whether this engine is shared by several servers (PostgreSQL): then
    /// the dispatcher copies each attempt's log into it ([`put_log`](Self::put_log)),
    /// so that any server can show it. The embedded engine answers false and
    /// logs stay files in the data directory, as before.
    fn shared(&self) -> bool;

    /// Stores (replacing) the log of a run: the latest attempt's, as the
    /// local log file holds it.
    async fn put_log(&self, id: i64, log: &[u8]) -> Result<()>;

    /// The stored log of a run, if any was stored.
    async fn log(&self, id: i64) -> Result<Option<Vec<u8>>>;
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| pubrun_core::Error::internal(format!("serializing: {e}")))
}

fn corrupt(id: i64, what: &str, e: impl std::fmt::Display) -> pubrun_core::Error {
    pubrun_core::Error::internal(format!("run store: corrupt {what} in run {id}: {e}"))
}

/// A run row as stored (JSON and text columns not yet parsed): both engines
/// read into this, and a row that does not parse is an error, never a default.
struct RawRun {
    id: i64,
    job: String,
    status: String,
    attempt: i64,
    max_attempts: i64,
    message_meta: String,
    message_data: Vec<u8>,
    dedup_key: String,
    exit: Option<String>,
    created_at_ms: i64,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
    not_before_ms: i64,
    machine: String,
    handle: String,
    cancel_requested: bool,
    result_published: bool,
    node: Option<String>,
}

impl RawRun {
    fn parse(self) -> Result<RunRecord> {
        let id = self.id;
        let mut message: SourceMessage =
            serde_json::from_str(&self.message_meta).map_err(|e| corrupt(id, "message", e))?;
        message.data = self.message_data;
        let exit = match self.exit {
            None => None,
            Some(e) => Some(serde_json::from_str(&e).map_err(|e| corrupt(id, "exit", e))?),
        };
        Ok(RunRecord {
            id,
            job: self.job,
            status: RunStatus::parse(&self.status).map_err(|e| corrupt(id, "status", e))?,
            attempt: u32::try_from(self.attempt).map_err(|e| corrupt(id, "attempt", e))?,
            max_attempts: u32::try_from(self.max_attempts)
                .map_err(|e| corrupt(id, "max_attempts", e))?,
            message,
            dedup_key: self.dedup_key,
            exit,
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
            ended_at_ms: self.ended_at_ms,
            not_before_ms: self.not_before_ms,
            machine: self.machine,
            handle: self.handle,
            cancel_requested: self.cancel_requested,
            result_published: self.result_published,
            node: self.node,
        })
    }
}

/// Why `mark_starting` claimed nothing, from the run as it is now.
fn claim_refused(run: &RunRecord) -> pubrun_core::Error {
    if run.cancel_requested && run.status == RunStatus::Queued {
        return pubrun_core::Error::precondition(format!("run {} is being cancelled", run.id));
    }
    if let Err(e) = run.status.check_transition(RunStatus::Starting) {
        return e;
    }
    pubrun_core::Error::precondition(format!("run {} could not be claimed", run.id))
}

fn parse_jobs(specs: Vec<String>) -> Result<Vec<JobSpec>> {
    specs
        .iter()
        .map(|s| {
            serde_json::from_str(s)
                .map_err(|e| pubrun_core::Error::internal(format!("stored job spec: {e}")))
        })
        .collect()
}
