//! The dispatcher: the `Dispatcher` type, its state and public API (jobs,
//! triggers, cancel, logs), plus shared helpers. The work is split along its
//! seams into submodules: `intake` (per-job subscription intake, dedup,
//! queueing, cancel), `scheduler` (slots, claiming, waking), `execute`
//! (attempts and restart recovery), `staging` (inputs/outputs, run
//! directories), `results` (settling, retries/ends, result publishing) and
//! `remote` (jobs on a connection).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use pubrun_broker::{Broker, Delivered};
use pubrun_core::clock::{rfc3339_nanos, Clock, SystemClock};
use pubrun_core::job::{
    check_relative_path, parse_gs_url, ExecutorSpec, JobSpec, UploadOutputs, TRIGGER_INPUT,
};
use pubrun_core::limits;
use pubrun_core::manifest::job_subscription;
use pubrun_core::pool::LOCAL_POOL;
use pubrun_core::run::{EndCause, Exit, RunStatus};
use pubrun_core::template::{self, TemplateContext};
use pubrun_core::{
    Error, OutgoingMessage, Result, SubscriptionConfig, SubscriptionName, TopicName,
};
use pubrun_exec::{CancellationToken, Executor, LogSink, PoolRouter, RunRequest, Secrets};
use pubrun_observability::metrics::labels;
use pubrun_observability::traces::{self, KeyValue, SpanKind, SpanStart};
use tokio::sync::Notify;

mod execute;
mod intake;
mod remote;
mod results;
mod scheduler;
mod slots;
mod staging;

use self::intake::*;
use self::results::*;
use self::scheduler::prepare_run_dir;
use self::staging::*;

use crate::runstore::{
    Batch, Enqueued, QueuedRun, Requeue, RunEnd, RunRecord, SharedRunStore, SourceMessage,
};

/// Executors by kind. Docker is optional: without an engine, docker runs
/// fail with an infrastructure error and wait.
#[derive(Clone)]
pub struct Executors {
    pub process: Arc<dyn Executor>,
    pub docker: Arc<dyn Executor>,
}

pub struct Dispatcher {
    broker: Arc<Broker>,
    store: SharedRunStore,
    data_dir: PathBuf,
    executors: Executors,
    slots: usize,
    state: Mutex<State>,
    /// Wakes the scheduler (a run was queued, a slot was freed).
    wake: Notify,
    /// Wakes the result publisher (a run ended).
    results_wake: Notify,
    /// Makes ids of manually triggered messages unique.
    trigger_seq: AtomicU64,
    /// Set by `start` once runs found in flight are registered: only then
    /// may an intake start runs itself (before it, runs only queue).
    running: AtomicBool,
    /// Bucket storage for job inputs and outputs (set once by the server).
    buckets: OnceLock<pubrun_buckets::Buckets>,
    /// Executors of remote pools (set once by the server).
    pools: OnceLock<Arc<dyn PoolRouter>>,
    /// Due queued runs per job, for the metrics gauge (see `refresh_waiting`).
    waiting: Mutex<Vec<(String, u64)>>,
    /// Clients of the connections jobs use, by connection name.
    connections: Mutex<HashMap<String, Arc<pubrun_connections::Connection>>>,
    /// Every time the dispatcher records or decides on (set once by tests
    /// that move a manual clock; the system clock otherwise).
    clock: OnceLock<Arc<dyn Clock>>,
    /// When run logs reach the disk (follows the server's `--sync`).
    log_sync: LogSync,
    /// Where run working directories go when not in the data directory
    /// (`serve --work-dir`, set once); they are removed when their run ends.
    work_root: OnceLock<PathBuf>,
}

/// When a run's log reaches the disk.
enum LogSync {
    /// Synced at the end of each attempt (`--sync always`).
    EachAttempt,
    /// Written out at the end of each attempt; their filesystem is synced
    /// at most `every` later (`--sync interval`): one sync for many runs
    /// instead of a journal commit per run. `dirty` wakes the syncer.
    Interval { every: Duration, dirty: Notify },
}

impl LogSync {
    fn of_server() -> LogSync {
        match pubrun_store::sync_mode() {
            pubrun_store::SyncMode::Always => LogSync::EachAttempt,
            pubrun_store::SyncMode::Interval(every) => LogSync::Interval {
                every,
                dirty: Notify::new(),
            },
        }
    }
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, JobState>,
    /// Runs in flight and slots held for claims (see `slots`).
    inflight: slots::Slots,
}

struct JobState {
    spec: JobSpec,
    intake: tokio::task::JoinHandle<()>,
}

impl Drop for JobState {
    fn drop(&mut self) {
        self.intake.abort();
    }
}

/// First wait before asking an unreachable engine again about an attempt
/// found in flight at startup.
const REATTACH_FIRST_DELAY: Duration = Duration::from_millis(250);

pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

fn jitter() -> f64 {
    // Not cryptographic: spreads retries. Nanosecond clock noise is enough.
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (n % 1000) as f64 / 1000.0
}

/// Renders every template of an executor spec for one run attempt.
fn render_spec(spec: &ExecutorSpec, ctx: &TemplateContext) -> Result<ExecutorSpec> {
    let r = |s: &String| template::render(s, ctx);
    let env = |m: &BTreeMap<String, String>| -> Result<BTreeMap<String, String>> {
        m.iter().map(|(k, v)| Ok((k.clone(), r(v)?))).collect()
    };
    Ok(match spec {
        ExecutorSpec::Process(p) => {
            let mut p = p.clone();
            p.command = r(&p.command)?;
            p.args = p.args.iter().map(r).collect::<Result<_>>()?;
            p.env = env(&p.env)?;
            ExecutorSpec::Process(p)
        }
        ExecutorSpec::Docker(d) => {
            let mut d = d.clone();
            d.command = d.command.iter().map(r).collect::<Result<_>>()?;
            d.env = env(&d.env)?;
            ExecutorSpec::Docker(d)
        }
    })
}

/// The values a run gets from the server's environment: `pass_env`
/// variables that are set, and every secret. A secret whose variable is not
/// set fails the run (`EndCause::Parameters`, not retried: waiting will not
/// set it) when `strict`, and is left out otherwise.
fn server_env(
    spec: &JobSpec,
    strict: bool,
) -> std::result::Result<(BTreeMap<String, String>, Secrets), Exit> {
    let passed = spec
        .pass_env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    let mut secrets = BTreeMap::new();
    for (name, r) in &spec.secrets {
        match std::env::var(&r.env) {
            Ok(v) => {
                secrets.insert(name.clone(), v);
            }
            Err(_) if strict => {
                return Err(parameters(format_args!(
                    "secret {name}: the server's environment variable {} is not set",
                    r.env
                )))
            }
            Err(_) => {}
        }
    }
    Ok((passed, Secrets(secrets)))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A failure that came from a bug in pubrun (a panic), not the job.
fn internal_error(while_: &str, p: &(dyn std::any::Any + Send)) -> Exit {
    Exit::failed(
        EndCause::Internal,
        format!(
            "internal error: pubrun panicked while {while_}: {}",
            panic_message(p)
        ),
    )
}

/// The message cannot make a valid attempt: not retried. The text keeps
/// the `parameters:` word for people; the decision is the cause.
fn parameters(msg: impl std::fmt::Display) -> Exit {
    Exit::failed(EndCause::Parameters, format!("parameters: {msg}"))
}

/// An input download (or output upload) failed: retried per the policy.
fn io_failure(msg: impl std::fmt::Display) -> Exit {
    Exit::failed(EndCause::InputOutput, msg.to_string())
}

fn context(run: &RunRecord) -> TemplateContext {
    let m = &run.message;
    let mut ctx = TemplateContext::from_message(
        &m.data,
        m.attributes.clone(),
        m.id.clone(),
        m.publish_time.clone(),
        m.ordering_key.clone(),
    );
    ctx.run.id = run.id.to_string();
    ctx.run.attempt = run.attempt;
    ctx.job.name = run.job.clone();
    ctx
}

impl Dispatcher {
    pub fn new(
        broker: Arc<Broker>,
        store: SharedRunStore,
        data_dir: PathBuf,
        executors: Executors,
        slots: usize,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            broker,
            store,
            data_dir,
            executors,
            slots: slots.max(1),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            results_wake: Notify::new(),
            trigger_seq: AtomicU64::new(0),
            running: AtomicBool::new(false),
            buckets: OnceLock::new(),
            pools: OnceLock::new(),
            waiting: Mutex::default(),
            connections: Mutex::new(HashMap::new()),
            clock: OnceLock::new(),
            log_sync: LogSync::of_server(),
            work_root: OnceLock::new(),
        })
    }

    /// Makes `clock` the dispatcher's time; call before [`Dispatcher::start`].
    /// A second call is ignored (the first clock stays).
    pub fn set_clock(&self, clock: Arc<dyn Clock>) {
        let _ = self.clock.set(clock);
    }

    /// The dispatcher's clock (the system clock unless one was set).
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.get_or_init(pubrun_core::clock::system).clone()
    }

    /// Now on the dispatcher's clock, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.clock().now_ms()
    }

    /// Gives the dispatcher the bucket storage that job `inputs` are read
    /// from and `outputs` written to. Without it, a run of a job that
    /// declares inputs or outputs fails. Only the first call has an effect.
    pub fn set_pools(&self, p: Arc<dyn PoolRouter>) {
        let _ = self.pools.set(p);
    }

    /// Puts run working directories in `dir/ID` instead of the data
    /// directory's `runs/ID/work` (logs stay there), and removes each when
    /// its run ends. Call before [`Dispatcher::start`]; only the first call
    /// has an effect. The directory is this server's alone.
    pub fn set_work_dir(&self, dir: PathBuf) {
        let _ = self.work_root.set(dir);
    }

    pub fn set_buckets(&self, b: pubrun_buckets::Buckets) {
        let _ = self.buckets.set(b);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the due queued runs per job into the cache that
    /// [`waiting_by_job`](Self::waiting_by_job) returns (the metrics
    /// handler calls this before a scrape: gauges are read synchronously).
    pub async fn refresh_waiting(&self) {
        match self.store.due_queued_by_job(self.now_ms()).await {
            Ok(w) => *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = w,
            Err(e) => tracing::warn!(error = %e, "cannot count waiting runs"),
        }
    }

    /// Due queued runs per job, as of the last [`refresh_waiting`](Self::refresh_waiting).
    pub fn waiting_by_job(&self) -> Vec<(String, u64)> {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn store(&self) -> &SharedRunStore {
        &self.store
    }

    /// Recovers and starts every loop: job intakes, runs that were in flight,
    /// unpublished results, the scheduler.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        for spec in self.store.jobs().await? {
            self.start_intake(spec)?;
        }
        // Only attempts that were in flight when the previous server stopped
        // are looked for; queued runs simply wait for the scheduler.
        for run in self
            .store
            .with_status(&[RunStatus::Starting, RunStatus::Running])
            .await?
        {
            let this = self.clone();
            let spec = self.lock().jobs.get(&run.job).map(|j| j.spec.clone());
            match spec {
                Some(spec) => {
                    let local = spec.pool == LOCAL_POOL;
                    let token = self.lock().inflight.insert(run.id, &run.job, local);
                    tokio::spawn(async move { this.recover_run(run, spec, token).await });
                }
                None => {
                    let exit = Exit::failed(
                        EndCause::Cancelled,
                        "job was deleted while the run was in flight",
                    );
                    let end = RunEnd {
                        exit: &exit,
                        now_ms: self.now_ms(),
                        has_result_topic: false,
                    };
                    if let Err(e) = self.store.finish(run.id, end).await {
                        tracing::error!(run = run.id, error = %e, "could not end a run whose job was deleted");
                    }
                }
            }
        }
        self.running.store(true, Ordering::Release);
        if self.work_root.get().is_some() {
            let this = self.clone();
            tokio::spawn(async move { this.sweep_work_dirs().await });
        }
        let this = self.clone();
        tokio::spawn(async move { this.result_publisher().await });
        let this = self.clone();
        tokio::spawn(async move { this.scheduler().await });
        if matches!(self.log_sync, LogSync::Interval { .. }) {
            let this = self.clone();
            tokio::spawn(async move { this.log_syncer().await });
        }
        Ok(())
    }

    /// Ends an attempt's writing to its log: synced now, or written out for
    /// the background syncer.
    async fn close_log(&self, log: &LogSink) {
        match &self.log_sync {
            LogSync::EachAttempt => log.flush().await,
            LogSync::Interval { dirty, .. } => {
                log.flush_unsynced().await;
                dirty.notify_one();
            }
        }
    }

    /// Removes the working directory of a run that ended, when it lives
    /// in a `--work-dir` (scratch, often memory): off the caller's path.
    fn discard_work_dir(&self, id: i64) {
        if self.work_root.get().is_none() {
            return;
        }
        let dir = self.run_dirs(id).0;
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(run = id, dir = %dir.display(), error = %e, "cannot remove the run's working directory")
            }
        });
    }

    /// At start: removes `--work-dir` directories of runs that ended while
    /// no server was there to remove them (a crash between the run's end
    /// and the removal).
    async fn sweep_work_dirs(self: Arc<Self>) {
        let Some(root) = self.work_root.get().cloned() else {
            return;
        };
        let ids = pubrun_exec::blocking_io(move || {
            let mut ids: Vec<i64> = Vec::new();
            for entry in std::fs::read_dir(&root)? {
                if let Some(id) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
                    ids.push(id);
                }
            }
            Ok(ids)
        })
        .await;
        let ids = match ids {
            Ok(ids) => ids,
            Err(e) => return tracing::warn!(error = %e, "cannot list the work directory"),
        };
        for id in ids {
            if matches!(self.store.get(id).await, Ok(run) if run.status.is_terminal()) {
                self.discard_work_dir(id);
            }
        }
    }

    /// `--sync interval`: syncs the run logs' filesystem at most one
    /// interval after an attempt wrote its log out.
    async fn log_syncer(self: Arc<Self>) {
        let LogSync::Interval { every, dirty } = &self.log_sync else {
            return;
        };
        let runs = self.data_dir.join("runs");
        loop {
            // A log closed while a sync runs leaves a permit: synced next.
            dirty.notified().await;
            tokio::time::sleep(*every).await;
            let dir = runs.clone();
            match pubrun_exec::blocking_io(move || pubrun_exec::log::sync_filesystem(&dir)).await {
                Ok(()) => {
                    pubrun_observability::metrics::metrics().run_log_syncs.inc();
                }
                Err(e) => tracing::warn!(error = %e, "cannot sync the run logs"),
            };
        }
    }

    // ---- jobs ----

    /// Creates or replaces a job: its subscription, its record, its intake.
    pub async fn put_job(self: &Arc<Self>, spec: JobSpec) -> Result<()> {
        // A spec from JSON has not been through the manifest parser.
        pubrun_core::filter::parse(&spec.filter).map_err(Error::from)?;
        spec.check_environment()
            .map_err(|e| Error::invalid(format!("job {}: {e}", spec.name)))?;
        if spec.connection.is_some() {
            return self.put_remote_job(spec).await;
        }
        let topic = TopicName::parse(&spec.topic)?;
        self.broker.get_topic(&topic)?;
        if !spec.result_topic.is_empty() {
            self.broker
                .get_topic(&TopicName::parse(&spec.result_topic)?)?;
        }
        let project = topic.project().id().to_string();
        let sub_name = SubscriptionName::parse(&job_subscription(&project, &spec.name))?;
        match self.broker.get_subscription(&sub_name) {
            // Topic and filter are fixed at creation: a change replaces the
            // subscription (its unacked backlog goes with it).
            Ok(existing) if existing.topic == spec.topic && existing.filter == spec.filter => {}
            Ok(_) => {
                self.broker.delete_subscription(&sub_name).await?;
                self.create_job_sub(&sub_name, &spec).await?;
            }
            Err(e) if e.code == pubrun_core::Code::NotFound => {
                self.create_job_sub(&sub_name, &spec).await?
            }
            Err(e) => return Err(e),
        }
        self.store.put_job(&spec).await?;
        self.start_intake(spec)?;
        self.wake.notify_one();
        Ok(())
    }

    async fn create_job_sub(&self, name: &SubscriptionName, spec: &JobSpec) -> Result<()> {
        self.broker
            .create_subscription(SubscriptionConfig {
                name: name.to_string(),
                topic: spec.topic.clone(),
                labels: [("pubrun-job".to_string(), spec.name.clone())]
                    .into_iter()
                    .collect(),
                ack_deadline_seconds: 60,
                filter: spec.filter.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn delete_job(&self, name: &str) -> Result<()> {
        let spec = self.lock().jobs.remove(name).map(|j| j.spec.clone());
        let Some(spec) = spec else {
            return Err(Error::not_found(format!("job {name} not found")));
        };
        self.store.delete_job(name).await?;
        // Its waiting runs end now rather than at the next sweep.
        let jobs: Vec<String> = self.lock().jobs.keys().cloned().collect();
        for q in self.store.queued_orphans(&jobs).await? {
            self.drop_queued(&q).await;
        }
        if spec.connection.is_some() {
            // Nothing of ours to delete on the connection's side.
            return Ok(());
        }
        let topic = TopicName::parse(&spec.topic)?;
        let sub = SubscriptionName::parse(&job_subscription(topic.project().id(), name))?;
        match self.broker.delete_subscription(&sub).await {
            Ok(()) => Ok(()),
            Err(e) if e.code == pubrun_core::Code::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn jobs(&self) -> Vec<JobSpec> {
        let mut v: Vec<JobSpec> = self.lock().jobs.values().map(|j| j.spec.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn job(&self, name: &str) -> Result<JobSpec> {
        self.lock()
            .jobs
            .get(name)
            .map(|j| j.spec.clone())
            .ok_or_else(|| Error::not_found(format!("job {name} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_names() {
        assert_eq!(safe_relative("a/b.csv"), Some(PathBuf::from("a/b.csv")));
        assert_eq!(safe_relative("./a//b"), Some(PathBuf::from("a/b")));
        for bad in [
            "",
            "../evil",
            "a/../../b",
            "/etc/passwd",
            "dir/",
            "a\0b",
            "a\\..\\b",
            ".",
        ] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
    }
}
