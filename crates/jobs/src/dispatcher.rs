//! The dispatcher: intake, scheduler, execution, recovery, results.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use pubrun_broker::{Broker, Delivered};
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

mod remote;

use crate::runstore::{Enqueued, QueuedRun, RunRecord, SharedRunStore, SourceMessage};

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
    /// Bucket storage for job inputs and outputs (set once by the server).
    buckets: OnceLock<pubrun_buckets::Buckets>,
    /// Executors of remote pools (set once by the server).
    pools: OnceLock<Arc<dyn PoolRouter>>,
    /// Due queued runs per job, for the metrics gauge (see `refresh_waiting`).
    waiting: Mutex<Vec<(String, u64)>>,
    /// Clients of the connections jobs use, by connection name.
    connections: Mutex<HashMap<String, Arc<pubrun_connections::Connection>>>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, JobState>,
    /// Runs in flight, with their cancel switches and whether they use a
    /// local slot (runs of a remote pool do not).
    active: HashMap<i64, (String, CancellationToken, bool)>,
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000) as u32;
    chrono_like(secs, sub)
}

/// RFC 3339 in UTC without pulling a date crate into this crate: civil-from-days.
fn chrono_like(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{:09}Z", nanos)
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
            buckets: OnceLock::new(),
            pools: OnceLock::new(),
            waiting: Mutex::default(),
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// Gives the dispatcher the bucket storage that job `inputs` are read
    /// from and `outputs` written to. Without it, a run of a job that
    /// declares inputs or outputs fails. Only the first call has an effect.
    pub fn set_pools(&self, p: Arc<dyn PoolRouter>) {
        let _ = self.pools.set(p);
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
        match self.store.due_queued_by_job(now_ms()).await {
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
                    let token = CancellationToken::new();
                    let local = spec.pool == LOCAL_POOL;
                    self.lock()
                        .active
                        .insert(run.id, (run.job.clone(), token.clone(), local));
                    tokio::spawn(async move { this.recover_run(run, spec, token).await });
                }
                None => {
                    let exit = Exit::failed(
                        EndCause::Cancelled,
                        "job was deleted while the run was in flight",
                    );
                    if let Err(e) = self.store.finish(run.id, &exit, now_ms(), false).await {
                        tracing::error!(run = run.id, error = %e, "could not end a run whose job was deleted");
                    }
                }
            }
        }
        let this = self.clone();
        tokio::spawn(async move { this.result_publisher().await });
        let this = self.clone();
        tokio::spawn(async move { this.scheduler().await });
        Ok(())
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

    fn start_intake(self: &Arc<Self>, spec: JobSpec) -> Result<()> {
        let this = self.clone();
        let name = spec.name.clone();
        let intake: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            if spec.connection.is_some() {
                Box::pin(async move { this.remote_intake(name).await })
            } else {
                let topic = TopicName::parse(&spec.topic)?;
                let sub =
                    SubscriptionName::parse(&job_subscription(topic.project().id(), &spec.name))?;
                Box::pin(async move { this.intake(name, sub).await })
            };
        // Spawned under the lock: the new intake must not look its job up
        // before the job is installed (it would find nothing, or the old
        // spec, and stop). Replacing the entry drops the old JobState, which
        // aborts the old intake.
        let mut st = self.lock();
        let intake = tokio::spawn(intake);
        let old = st.jobs.insert(spec.name.clone(), JobState { spec, intake });
        drop(st);
        drop(old);
        Ok(())
    }

    /// Streams the job's subscription; queues a run per message, then acks.
    async fn intake(self: Arc<Self>, job: String, sub: SubscriptionName) {
        let stream = match self.broker.open_stream(&sub, 60, 1000, 0) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(job, error = %e, "job intake cannot open its subscription");
                return;
            }
        };
        loop {
            let batch = match stream.next(500).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(job, error = %e, "job intake stopped");
                    return;
                }
            };
            let Ok(spec) = self.job(&job) else { return };
            let items: Vec<(SourceMessage, String)> =
                batch.iter().map(|d| source_and_key(&spec, d)).collect();
            let received = SystemTime::now();
            let queued: Vec<_> = match self.store.enqueue_batch(&spec, &items, now_ms()).await {
                Ok(ids) => {
                    for (id, (msg, _)) in ids.iter().zip(&items) {
                        log_queued(&spec.name, id, &msg.id);
                        if let Enqueued::New(run) = id {
                            delivery_span(&spec.name, *run, msg, received);
                        }
                    }
                    batch.into_iter().map(|d| d.ack_id).collect()
                }
                Err(e) => {
                    // Not acked: the messages come back after their lease.
                    tracing::error!(job = spec.name, error = %e, "could not queue runs");
                    Vec::new()
                }
            };
            if !queued.is_empty() {
                // The runs are durable: the scheduler need not wait for the
                // ack's own commit (a redelivery is caught by dedup).
                self.wake.notify_one();
                if let Err(e) = self.broker.acknowledge(&sub, &queued).await {
                    tracing::warn!(job, error = %e, "ack after queueing failed; duplicates will be caught by dedup");
                }
            }
        }
    }

    /// Queues a run for a message given by hand (`pubrun jobs trigger`).
    pub async fn trigger(
        &self,
        job: &str,
        data: Vec<u8>,
        attributes: BTreeMap<String, String>,
    ) -> Result<i64> {
        let spec = self.job(job)?;
        let now = now_ms();
        let msg = SourceMessage {
            id: format!(
                "manual-{now}-{}",
                self.trigger_seq.fetch_add(1, Ordering::Relaxed)
            ),
            data,
            attributes,
            publish_time: rfc3339(now * 1_000_000),
            ordering_key: String::new(),
        };
        let key = msg.id.clone();
        let received = SystemTime::now();
        let r = self.store.enqueue(&spec, &msg, &key, now).await?;
        log_queued(&spec.name, &r, &msg.id);
        // The run span's parent, as for a delivered message.
        if let Enqueued::New(run) = &r {
            delivery_span(&spec.name, *run, &msg, received);
        }
        self.wake.notify_one();
        match r {
            Enqueued::New(id) | Enqueued::Duplicate(id) => Ok(id),
        }
    }

    /// Cancels a run: a queued one (also one waiting for a retry) at once,
    /// a starting or running one via its executor. FAILED_PRECONDITION when
    /// the run has already ended.
    ///
    /// Races with the scheduler are settled in the run store: the cancel flag
    /// is set first, and [`RunStore::mark_starting`] refuses a flagged run, so
    /// either the run is still queued (and ends here) or it was claimed — and
    /// then its cancel switch is already in `active`, because the scheduler
    /// registers it before claiming.
    pub async fn cancel_run(&self, id: i64) -> Result<RunRecord> {
        let run = self.store.request_cancel(id).await?;
        let has_result = self
            .lock()
            .jobs
            .get(&run.job)
            .is_some_and(|j| !j.spec.result_topic.is_empty());
        let exit = Exit::failed(EndCause::Cancelled, "cancelled before it started");
        if self
            .store
            .cancel_if_queued(id, &exit, now_ms(), has_result)
            .await?
        {
            run_ended(&run, &exit, now_ms());
            self.results_wake.notify_one();
        } else if let Some((_, token, _)) = self.lock().active.get(&id) {
            token.cancel();
        }
        self.store.get(id).await
    }

    /// [`cancel_run`](Self::cancel_run) for synchronous callers. Blocks the
    /// thread: call it from a multi-threaded runtime or a blocking thread.
    pub fn cancel(&self, id: i64) -> Result<RunRecord> {
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| handle.block_on(self.cancel_run(id)))
    }

    // ---- scheduling and execution ----

    async fn scheduler(self: Arc<Self>) {
        let mut sweep_at = 0i64;
        loop {
            let now = now_ms();
            if now >= sweep_at {
                // Rare work: expired dedup keys, runs whose job was deleted.
                let _ = self.store.prune_dedup(now).await;
                let jobs: Vec<String> = self.lock().jobs.keys().cloned().collect();
                if let Ok(orphans) = self.store.queued_orphans(&jobs).await {
                    for q in orphans {
                        self.drop_queued(&q).await;
                    }
                }
                sweep_at = now + 60_000;
            }
            self.start_due_runs(now).await;
            let next_wake = match self.store.next_due_ms(now).await {
                Ok(Some(due)) => Duration::from_millis((due - now).clamp(1, 1000) as u64),
                _ => Duration::from_secs(1),
            };
            let _ = tokio::time::timeout(next_wake, self.wake.notified()).await;
        }
    }

    /// Starts queued runs that are due, oldest first per job, within each
    /// job's concurrency and the global slots. Reads only as many queued
    /// runs as could start, so a deep queue costs nothing per wake.
    async fn start_due_runs(self: &Arc<Self>, now: i64) {
        let mut capacity: Vec<(String, usize)> = {
            let st = self.lock();
            st.jobs
                .values()
                .map(|j| {
                    let running = st
                        .active
                        .values()
                        .filter(|(job, _, _)| job == &j.spec.name)
                        .count();
                    (
                        j.spec.name.clone(),
                        (j.spec.concurrency as usize).saturating_sub(running),
                    )
                })
                .filter(|(_, free)| *free > 0)
                .collect()
        };
        // Oldest waiting job first would need a join; name order is stable and fair enough.
        capacity.sort();
        for (job, free) in capacity {
            let remote = self
                .lock()
                .jobs
                .get(&job)
                .is_some_and(|j| j.spec.pool != LOCAL_POOL);
            // Runs of a remote pool wait for a machine, not for a local slot.
            let slots_left = if remote {
                usize::MAX
            } else {
                self.slots.saturating_sub(self.local_active())
            };
            if slots_left == 0 {
                continue;
            }
            let queued = match self
                .store
                .startable(&job, now, free.min(slots_left).saturating_add(8))
                .await
            {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(job, error = %e, "scheduler cannot read queued runs");
                    continue;
                }
            };
            let mut claimed = 0;
            for q in queued {
                if claimed >= free {
                    break;
                }
                if q.cancel_requested {
                    // Cancel requested between two attempts.
                    self.drop_queued(&q).await;
                    continue;
                }
                let token = CancellationToken::new();
                let spec = {
                    let mut st = self.lock();
                    if st.active.contains_key(&q.id) {
                        // Its previous attempt is still being recorded.
                        continue;
                    }
                    if !remote && st.active.values().filter(|a| a.2).count() >= self.slots {
                        break;
                    }
                    let Some(j) = st.jobs.get(&q.job) else { break };
                    let spec = j.spec.clone();
                    // Registered before it is claimed, so that a cancel
                    // that finds the run claimed also finds its switch.
                    st.active
                        .insert(q.id, (q.job.clone(), token.clone(), !remote));
                    spec
                };
                claimed += 1;
                // Claimed on its own task: the claims of one wake share a
                // group commit instead of waiting for each other's fsync.
                let this = self.clone();
                tokio::spawn(async move { this.claim_and_execute(q.id, spec, token).await });
            }
        }
    }

    /// Claims a run registered in `active` (durably: `starting`) and runs
    /// it; a run that cannot be claimed leaves `active` and frees its slot.
    async fn claim_and_execute(self: Arc<Self>, id: i64, spec: JobSpec, token: CancellationToken) {
        if let Err(e) = self.store.mark_starting(id).await {
            // No wake: the scheduler's next pass fills the slot (waking it
            // here would spin while the store refuses).
            self.lock().active.remove(&id);
            tracing::debug!(run = id, error = %e, "run not started");
            return;
        }
        let run = match self.store.get(id).await {
            Ok(r) => r,
            Err(e) => {
                self.lock().active.remove(&id);
                tracing::error!(run = id, error = %e, "claimed run cannot be read");
                return;
            }
        };
        // Waited since it was due: queued, or its retry's backoff ended.
        pubrun_observability::metrics()
            .queue_wait
            .get_or_create(&labels([("job", &run.job)]))
            .observe((now_ms() - run.not_before_ms).max(0) as f64 / 1000.0);
        self.execute(run, spec, token).await;
    }

    /// Ends a queued run that must not start: cancelled, or its job deleted.
    async fn drop_queued(&self, run: &QueuedRun) {
        let job = self
            .lock()
            .jobs
            .get(&run.job)
            .map(|j| j.spec.result_topic.clone());
        let error = match &job {
            Some(_) => "cancelled before it started".to_string(),
            None => format!("job {} was deleted before this run started", run.job),
        };
        let has_result = job.is_some_and(|t| !t.is_empty());
        let exit = Exit::failed(EndCause::Cancelled, error);
        match self
            .store
            .cancel_if_queued(run.id, &exit, now_ms(), has_result)
            .await
        {
            Ok(true) => {
                if let Ok(r) = self.store.get(run.id).await {
                    run_ended(&r, &exit, now_ms());
                }
                self.results_wake.notify_one()
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(run = run.id, error = %e, "cannot cancel queued run"),
        }
    }

    fn request(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        rendered: ExecutorSpec,
        (passed, secrets): (BTreeMap<String, String>, Secrets),
    ) -> std::io::Result<RunRequest> {
        let dir = self.data_dir.join("runs").join(run.id.to_string());
        let workdir = dir.join("work");
        // The message itself, as files: data of any size (argv and env are
        // limited to ~128 KiB per string) and attributes as JSON.
        let msg_dir = workdir.join(".pubrun");
        std::fs::create_dir_all(&msg_dir)?;
        std::fs::write(msg_dir.join("data"), &run.message.data)?;
        std::fs::write(
            msg_dir.join("attributes.json"),
            serde_json::to_vec(&run.message.attributes).unwrap_or_default(),
        )?;
        let seen_as = match &rendered {
            ExecutorSpec::Docker(_) => PathBuf::from("/workspace/.pubrun"),
            ExecutorSpec::Process(_) => msg_dir.clone(),
        };
        let mut env: BTreeMap<String, String> = [
            ("PUBRUN_RUN_ID".to_string(), run.id.to_string()),
            ("PUBRUN_JOB".to_string(), run.job.clone()),
            ("PUBRUN_ATTEMPT".to_string(), run.attempt.to_string()),
            ("PUBRUN_MESSAGE_ID".to_string(), run.message.id.clone()),
            (
                "PUBRUN_DATA_FILE".to_string(),
                seen_as.join("data").display().to_string(),
            ),
            (
                "PUBRUN_ATTRIBUTES_FILE".to_string(),
                seen_as.join("attributes.json").display().to_string(),
            ),
        ]
        .into_iter()
        .collect();
        env.extend(passed);
        Ok(RunRequest {
            run_id: run.id.to_string(),
            job: run.job.clone(),
            attempt: run.attempt,
            spec: rendered,
            workdir,
            timeout: spec.timeout,
            grace_period: spec.grace_period,
            env,
            secrets,
            outputs: spec.outputs.iter().map(|o| o.from.clone()).collect(),
        })
    }

    pub fn log_path(&self, id: i64) -> PathBuf {
        self.data_dir.join("runs").join(id.to_string()).join("log")
    }

    fn local_active(&self) -> usize {
        self.lock().active.values().filter(|a| a.2).count()
    }

    /// The executor of the job's pool: the server's own for `local`, the
    /// pool's (agents, machines) otherwise.
    fn executor_for(&self, spec: &JobSpec) -> Arc<dyn Executor> {
        if spec.pool != LOCAL_POOL {
            return match self.pools.get().and_then(|p| p.executor(&spec.pool)) {
                Some(e) => e,
                None => Arc::new(pubrun_exec::Unavailable(format!(
                    "pool {} is not declared on this server; the run waits until it is",
                    spec.pool
                ))),
            };
        }
        match spec.executor {
            ExecutorSpec::Process(_) => self.executors.process.clone(),
            ExecutorSpec::Docker(_) => self.executors.docker.clone(),
        }
    }

    /// One attempt and its record. A panic anywhere in it (templates,
    /// inputs, the executor, outputs, recording) fails this run with an
    /// `internal error:` cause and frees its slot; other runs go on.
    async fn execute(self: Arc<Self>, run: RunRecord, spec: JobSpec, token: CancellationToken) {
        let exit = match std::panic::AssertUnwindSafe(self.attempt(&run, &spec, token))
            .catch_unwind()
            .await
        {
            Ok(exit) => exit,
            Err(p) => {
                let exit = internal_error("running the attempt", &*p);
                self.note_in_log(run.id, &spec, &exit).await;
                exit
            }
        };
        self.settle_guarded(run, &spec, exit).await;
    }

    /// [`Self::settle`], and if that panics: the run fails as it can, and
    /// its slot is freed anyway.
    async fn settle_guarded(&self, run: RunRecord, spec: &JobSpec, exit: Exit) {
        let id = run.id;
        let settled = std::panic::AssertUnwindSafe(self.settle(run, spec, exit))
            .catch_unwind()
            .await;
        if let Err(p) = settled {
            let exit = internal_error("recording the end of the attempt", &*p);
            tracing::error!(run = id, error = exit.error.as_deref(), "run failed");
            if let Err(e) = self
                .store
                .finish(id, &exit, now_ms(), !spec.result_topic.is_empty())
                .await
            {
                tracing::error!(run = id, error = %e, "could not record the end of an attempt");
            }
            self.lock().active.remove(&id);
            self.wake.notify_one();
            self.results_wake.notify_one();
        }
    }

    /// Best effort: says in the run's log how the attempt ended.
    async fn note_in_log(&self, id: i64, spec: &JobSpec, exit: &Exit) {
        let secrets = server_env(spec, false)
            .map(|(_, s)| s.values())
            .unwrap_or_default();
        if let Ok(log) =
            LogSink::create_masking(self.log_path(id), spec.log_limit_bytes, secrets).await
        {
            log.note(&describe(exit)).await;
            log.flush().await;
        }
    }

    async fn attempt(&self, run: &RunRecord, spec: &JobSpec, token: CancellationToken) -> Exit {
        let t = traces::enabled().then(|| run_trace(run));
        let mut span = traces::start(|| SpanStart {
            attributes: vec![
                KeyValue::new("pubrun.job", run.job.clone()),
                KeyValue::new("pubrun.run_id", run.id),
                KeyValue::new("pubrun.attempt", i64::from(run.attempt)),
                KeyValue::new("pubrun.pool", spec.pool.clone()),
            ],
            ..SpanStart::new("attempt", t.as_ref().map(|t| &t.run))
        });
        let exit = self.attempt_inner(run, spec, token, &span).await;
        span.set("pubrun.status", exit.status().as_str());
        if let Some(c) = exit.exit_code {
            span.set("pubrun.exit_code", i64::from(c));
        }
        if exit.status() != RunStatus::Succeeded {
            span.error(exit.status().as_str());
        }
        exit
    }

    async fn attempt_inner(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        token: CancellationToken,
        span: &traces::Span,
    ) -> Exit {
        let ctx = context(run);
        let from_server = match server_env(spec, true) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let secrets = from_server.1.clone();
        let rendered = match render_spec(&spec.executor, &ctx) {
            Ok(r) => r,
            Err(e) => return parameters(e.message),
        };
        let mut req = match self.request(run, spec, rendered, from_server) {
            Ok(r) => r,
            Err(e) => {
                return Exit::failed(
                    EndCause::Infrastructure,
                    format!("cannot prepare run directory: {e}"),
                )
            }
        };
        let log = match LogSink::create_masking(
            self.log_path(run.id),
            spec.log_limit_bytes,
            secrets.values(),
        )
        .await
        {
            Ok(l) => Arc::new(l),
            Err(e) => {
                return Exit::failed(
                    EndCause::Infrastructure,
                    format!("cannot open run log: {e}"),
                )
            }
        };
        log.note(&format!(
            "attempt {} of {} starting",
            run.attempt, spec.retries.max_attempts
        ))
        .await;
        if token.is_cancelled() {
            // Cancelled between being claimed and here: never start it.
            let exit = Exit::failed(EndCause::Cancelled, "cancelled before it started");
            log.note(&describe(&exit)).await;
            log.flush().await;
            return exit;
        }
        let store = self.store.clone();
        let id = run.id;
        let (job, attempt) = (run.job.clone(), run.attempt);
        // The callback is synchronous and the store is not: the write runs
        // as a task that is awaited before the attempt's end is recorded, so
        // `running` is never written after the terminal state.
        let marking: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
        let marking2 = marking.clone();
        let on_started = Box::new(move |s: pubrun_exec::Started| {
            tracing::info!(
                run_id = id,
                job,
                attempt,
                machine = s.machine,
                status = "running",
                "run started"
            );
            let store = store.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = store
                    .mark_running(id, &s.machine, &s.handle, now_ms())
                    .await
                {
                    tracing::warn!(run = id, error = %e, "could not record running state");
                }
            });
            *marking2.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        });
        // The job continues the trace from its attempt (W3C env carrier).
        if let Some(tp) = span.traceparent() {
            req.env.insert("TRACEPARENT".into(), tp);
        }
        let workdir = req.workdir.clone();
        if !spec.inputs.is_empty() {
            let parent = span.context();
            let mut staging = traces::start(|| SpanStart::new("stage inputs", parent.as_ref()));
            let staged = self.stage_inputs(run, spec, &ctx, &workdir, &log).await;
            if staged.is_err() {
                staging.error("input staging failed");
            }
            drop(staging);
            if let Err(exit) = staged {
                log.note(&describe(&exit)).await;
                log.flush().await;
                return exit;
            }
        }
        let mut exit = self
            .executor_for(spec)
            .run(req, log.clone(), token, on_started)
            .await;
        let marked = marking.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = marked {
            let _ = task.await;
        }
        // Outputs are uploaded per `upload_outputs` (by default whatever the
        // attempt's status: partial results of a failed attempt are often
        // what one needs), never when the attempt did not start for an
        // infrastructure reason.
        let upload = match spec.upload_outputs {
            UploadOutputs::Always => true,
            UploadOutputs::OnSuccess => exit.status() == RunStatus::Succeeded,
        };
        if !spec.outputs.is_empty() && !exit.cause.keeps_attempt() && !upload {
            log.note("outputs not uploaded: the attempt did not succeed (upload_outputs = \"on_success\")")
                .await;
        }
        if !spec.outputs.is_empty() && !exit.cause.keeps_attempt() && upload {
            let parent = span.context();
            let mut uploading = traces::start(|| SpanStart::new("upload outputs", parent.as_ref()));
            let uploaded = self.stage_outputs(run, spec, &ctx, &workdir, &log).await;
            if uploaded.is_err() {
                uploading.error("output upload failed");
            }
            drop(uploading);
            if let Err(e) = uploaded {
                let e = format!("outputs: {e}");
                log.note(&e).await;
                exit.error = Some(match exit.error.take() {
                    Some(prev) => format!("{prev}; {e}"),
                    None => e,
                });
                // A timeout or cancel stays what ended the attempt.
                if exit.cause == EndCause::Exited {
                    exit.cause = EndCause::InputOutput;
                }
            }
        }
        // Results and the API show the error: no secret value in it.
        exit.error = exit.error.map(|e| secrets.mask(&e));
        log.note(&describe(&exit)).await;
        log.flush().await;
        exit
    }

    fn bucket_storage(&self) -> std::result::Result<&pubrun_buckets::Buckets, String> {
        self.buckets
            .get()
            .ok_or_else(|| "bucket storage is not available in this server".to_string())
    }

    /// Downloads the job's inputs into the working directory. Errors are
    /// the attempt's error (`parameters: …` when the message cannot name
    /// the input: not retried).
    async fn stage_inputs(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        ctx: &TemplateContext,
        workdir: &Path,
        log: &Arc<LogSink>,
    ) -> std::result::Result<(), Exit> {
        if let Some(c) = &spec.connection {
            return self
                .stage_inputs_remote(c, run, spec, ctx, workdir, log)
                .await;
        }
        for input in &spec.inputs {
            check_relative_path(&input.to).map_err(|e| parameters(format!("inputs.to: {e}")))?;
            let dest = workdir.join(&input.to);
            if input.from == TRIGGER_INPUT {
                let attr = |k: &str| run.message.attributes.get(k).filter(|v| !v.is_empty());
                let (Some(bucket), Some(object)) = (attr("bucketId"), attr("objectId")) else {
                    return Err(parameters(
                        "input \"trigger\" needs the message attributes bucketId and objectId \
                                (sent by bucket notifications); this message has none",
                    ));
                };
                let base = object.rsplit('/').next().unwrap_or("");
                if safe_relative(base).is_none() {
                    return Err(parameters(format_args!(
                        "input \"trigger\": object name \"{}\" has no usable file name",
                        object.escape_debug()
                    )));
                }
                let buckets = self
                    .bucket_storage()
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                let n = download(buckets, bucket, object, workdir, &dest.join(base))
                    .await
                    .map_err(|e| io_failure(format!("inputs: gs://{bucket}/{object}: {e}")))?;
                log.note(&format!(
                    "input gs://{bucket}/{object} ({n} bytes) -> {}{base}",
                    slash(&input.to)
                ))
                .await;
            } else {
                let url = template::render(&input.from, ctx)
                    .map_err(|e| parameters(format!("inputs.from: {}", e.message)))?;
                let (bucket, prefix) =
                    parse_gs_url(&url).map_err(|e| parameters(format!("inputs.from: {e}")))?;
                let buckets = self
                    .bucket_storage()
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                let objects = buckets
                    .list_all_objects(&bucket, &prefix)
                    .await
                    .map_err(|e| io_failure(format!("inputs: {url}: {e}")))?;
                tokio::fs::create_dir_all(&dest)
                    .await
                    .map_err(|e| io_failure(format!("inputs: {}: {e}", input.to)))?;
                let (mut files, mut bytes) = (0u64, 0u64);
                for o in objects {
                    let rel = &o.name[prefix.len()..];
                    let Some(rel) = safe_relative(rel) else {
                        if !o.name.ends_with('/') {
                            log.note(&format!(
                                "input {url}: skipped object \"{}\": its name would leave {}",
                                o.name.escape_debug(),
                                input.to
                            ))
                            .await;
                        }
                        continue;
                    };
                    bytes += download(buckets, &bucket, &o.name, workdir, &dest.join(&rel))
                        .await
                        .map_err(|e| {
                            io_failure(format!("inputs: gs://{bucket}/{}: {e}", o.name))
                        })?;
                    files += 1;
                }
                log.note(&format!(
                    "input {url}: {files} objects ({bytes} bytes) -> {}",
                    slash(&input.to)
                ))
                .await;
            }
        }
        Ok(())
    }

    /// Uploads every regular file under each output directory. The first
    /// failing upload ends the staging with its error.
    async fn stage_outputs(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        ctx: &TemplateContext,
        workdir: &Path,
        log: &Arc<LogSink>,
    ) -> std::result::Result<(), String> {
        if let Some(c) = &spec.connection {
            return self
                .stage_outputs_remote(c, run, spec, ctx, workdir, log)
                .await;
        }
        for output in &spec.outputs {
            check_relative_path(&output.from).map_err(|e| format!("outputs.from: {e}"))?;
            let url = template::render(&output.to, ctx)
                .map_err(|e| format!("outputs.to: {}", e.message))?;
            let (bucket, prefix) = parse_gs_url(&url).map_err(|e| format!("outputs.to: {e}"))?;
            let src = workdir.join(&output.from);
            check_no_symlink(workdir, &src).map_err(|e| format!("{}: {e}", output.from))?;
            match tokio::fs::symlink_metadata(&src).await {
                Ok(m) if m.is_dir() => {}
                _ => {
                    log.note(&format!(
                        "output {}: no such directory; nothing uploaded",
                        output.from
                    ))
                    .await;
                    continue;
                }
            }
            let buckets = self.bucket_storage()?;
            let files = walk_files(src.clone())
                .await
                .map_err(|e| format!("{}: {e}", output.from))?;
            let meta = pubrun_buckets::ObjectMeta {
                metadata: [
                    ("pubrun-run-id".to_string(), run.id.to_string()),
                    ("pubrun-job".to_string(), spec.name.clone()),
                    ("pubrun-attempt".to_string(), run.attempt.to_string()),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            };
            let mut bytes = 0u64;
            for rel in &files {
                let name = format!("{prefix}{rel}");
                let file = tokio::fs::File::open(src.join(rel))
                    .await
                    .map_err(|e| format!("{}{rel}: {e}", slash(&output.from)))?;
                let row = buckets
                    .put_object(&bucket, &name, file, meta.clone(), Default::default())
                    .await
                    .map_err(|e| format!("gs://{bucket}/{name}: {e}"))?;
                bytes += row.size;
            }
            log.note(&format!(
                "output {}: {} files ({bytes} bytes) -> {url}",
                slash(&output.from),
                files.len()
            ))
            .await;
        }
        Ok(())
    }

    /// After a restart: follows an attempt that was in flight, or declares
    /// it lost. A lost `running` attempt counts (retried per policy); a lost
    /// `starting` one never reported running, so as far as pubrun knows
    /// nothing ran and the same attempt is tried again.
    async fn recover_run(self: Arc<Self>, run: RunRecord, spec: JobSpec, token: CancellationToken) {
        let recovered = std::panic::AssertUnwindSafe(self.recover_attempt(&run, &spec, token))
            .catch_unwind()
            .await;
        let exit = match recovered {
            Ok(exit) => exit,
            Err(p) => {
                let exit = internal_error("recovering the attempt after a restart", &*p);
                self.note_in_log(run.id, &spec, &exit).await;
                exit
            }
        };
        self.settle_guarded(run, &spec, exit).await;
    }

    async fn recover_attempt(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        token: CancellationToken,
    ) -> Exit {
        // Secrets whose variable is gone now are only not masked: the
        // attempt is followed anyway.
        let from_server = server_env(spec, false).unwrap_or_default();
        let log =
            match tokio::fs::create_dir_all(self.data_dir.join("runs").join(run.id.to_string()))
                .await
            {
                Ok(()) => LogSink::create_masking(
                    self.log_path(run.id),
                    spec.log_limit_bytes,
                    from_server.1.values(),
                )
                .await
                .ok()
                .map(Arc::new),
                Err(_) => None,
            };
        if let Some(log) = &log {
            log.note(&format!(
                "server restarted; looking for attempt {} ({})",
                run.attempt, run.status
            ))
            .await;
        }
        let found = match (render_spec(&spec.executor, &context(run)), &log) {
            (Ok(rendered), Some(log)) => match self.request(run, spec, rendered, from_server) {
                Ok(req) => self.reattach(req, spec, log, &token).await,
                Err(_) => None,
            },
            _ => None,
        };
        let exit = found.unwrap_or_else(|| match run.status {
            // Cluster mode: this server took over from one that stopped
            // (or was cut off) with the attempt in flight. As for a lost
            // agent, that is not the job's fault: same attempt again.
            _ if self.store.shared() => Exit::failed(
                EndCause::Lost,
                format!(
                    "lost: the server running this attempt stopped ({})",
                    run.status
                ),
            ),
            RunStatus::Starting => Exit::failed(
                EndCause::Lost,
                "lost: pubrun restarted while this attempt was starting",
            ),
            _ => Exit::failed(
                EndCause::Interrupted,
                "lost: pubrun restarted while this attempt ran",
            ),
        });
        if let Some(log) = &log {
            log.note(&describe(&exit)).await;
            log.flush().await;
        }
        exit
    }

    /// Asks the executor for the attempt until it can answer. An engine that
    /// does not answer (Docker daemon down) is asked again with backoff: the
    /// attempt may still be alive, and starting it anew could run it twice.
    async fn reattach(
        &self,
        req: RunRequest,
        spec: &JobSpec,
        log: &Arc<LogSink>,
        token: &CancellationToken,
    ) -> Option<Exit> {
        let executor = self.executor_for(spec);
        let mut delay = REATTACH_FIRST_DELAY;
        loop {
            match executor
                .reattach(req.clone(), log.clone(), token.clone())
                .await
            {
                // `Lost` is an answer (a pool took the lease back), not
                // an engine that cannot be asked.
                Some(exit) if exit.cause == EndCause::Infrastructure => {
                    let why = exit.error.unwrap_or_default();
                    log.note(&format!(
                        "cannot look for the attempt yet ({why}); asking again in {delay:?}"
                    ))
                    .await;
                    tracing::warn!(run = req.run_id, error = why, "reattach failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = token.cancelled() => {
                            return Some(Exit::failed(EndCause::Cancelled, format!("cancelled while the engine did not answer ({why})")));
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                other => return other,
            }
        }
    }

    /// Records how an attempt ended: retry, or terminal state + result.
    async fn settle(&self, run: RunRecord, spec: &JobSpec, exit: Exit) {
        let id = run.id;
        let now = now_ms();
        if self.store.shared() {
            self.share_log(id).await;
        }
        let current = self.store.get(id).await.ok();
        let mut exit = exit;
        // A cancel asked for while it ran is why it ended, whatever else did.
        if current.as_ref().is_some_and(|r| r.cancel_requested) {
            exit.cause = EndCause::Cancelled;
        }
        let status = exit.status();
        let result = if exit.cause.keeps_attempt() {
            // Not the job's fault: wait and try the same attempt again.
            // A lost machine or lease: another machine can take it now.
            let delay = match exit.cause {
                EndCause::Lost => Duration::ZERO,
                _ => spec
                    .retries
                    .backoff(2, jitter())
                    .min(Duration::from_secs(30)),
            };
            tracing::info!(
                run_id = id,
                job = run.job,
                attempt = run.attempt,
                status = "queued",
                error = exit.error.as_deref(),
                retry_in_ms = delay.as_millis() as u64,
                "run requeued after an infrastructure error"
            );
            self.store
                .requeue(id, run.attempt, now + delay.as_millis() as i64, &exit)
                .await
        } else if matches!(status, RunStatus::Failed | RunStatus::TimedOut)
            && run.attempt < spec.retries.max_attempts
            && !exit.cause.is_final()
        {
            let next = run.attempt + 1;
            let delay = spec.retries.backoff(next, jitter());
            tracing::info!(
                run_id = id,
                job = run.job,
                attempt = run.attempt,
                status = "queued",
                attempt_status = status.as_str(),
                exit_code = exit.exit_code,
                error = exit.error.as_deref(),
                next_attempt = next,
                retry_in_ms = delay.as_millis() as u64,
                "run attempt failed; retrying"
            );
            self.store
                .requeue(id, next, now + delay.as_millis() as i64, &exit)
                .await
        } else {
            let r = self
                .store
                .finish(id, &exit, now, !spec.result_topic.is_empty())
                .await
                .map(|_| ());
            let ended = current.unwrap_or_else(|| run.clone());
            run_ended(
                &RunRecord {
                    attempt: run.attempt,
                    ..ended
                },
                &exit,
                now,
            );
            r
        };
        if let Err(e) = result {
            tracing::error!(run = id, error = %e, "could not record the end of an attempt");
        }
        // The slot is freed only once the run's new state is recorded.
        self.lock().active.remove(&id);
        self.wake.notify_one();
        self.results_wake.notify_one();
    }

    /// Clears a run's outbox flag; false (logged) when that write failed:
    /// the result is then published again on the next pass (at least once).
    async fn mark_result_published(&self, id: i64) -> bool {
        match self.store.mark_result_published(id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(run = id, error = %e, "could not record the result as published; it will be published again");
                false
            }
        }
    }

    /// Copies the run's log file into a shared store, so that every server
    /// of a cluster can show it (best effort: the file stays the source).
    async fn share_log(&self, id: i64) {
        let log = match tokio::fs::read(self.log_path(id)).await {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(run = id, error = %e, "cannot read the run log to share it");
                return;
            }
        };
        if let Err(e) = self.store.put_log(id, &log).await {
            tracing::warn!(run = id, error = %e, "cannot store the run log");
        }
    }

    /// The log of a run: this server's file, else the copy in a shared store
    /// (a run executed by another server of the cluster). None when neither.
    pub async fn run_log(&self, id: i64) -> Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.log_path(id)).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.store.shared() => {
                self.store.log(id).await
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(format!("reading the log of run {id}: {e}"))),
        }
    }

    /// The one task that publishes results, so that two runs ending at the
    /// same time never publish the same result twice. Failed publishes are
    /// retried every few seconds (outbox: at least once).
    async fn result_publisher(self: Arc<Self>) {
        loop {
            let retry = self.publish_pending_results().await;
            let wait = if retry {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(60)
            };
            let _ = tokio::time::timeout(wait, self.results_wake.notified()).await;
        }
    }

    /// Publishes the result message of every finished run not yet published.
    /// Returns whether some are left to retry.
    async fn publish_pending_results(&self) -> bool {
        let pending = match self.store.unpublished_results().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read pending results");
                return true;
            }
        };
        let mut retry = false;
        for run in pending {
            let spec = self.lock().jobs.get(&run.job).map(|j| j.spec.clone());
            let (topic, spec) = match spec {
                Some(s) if !s.result_topic.is_empty() => (s.result_topic.clone(), s),
                _ => {
                    retry |= !self.mark_result_published(run.id).await;
                    continue;
                }
            };
            let msg = self.result_message(&run, &spec).await;
            let published = match (&spec.connection, TopicName::parse(&topic)) {
                (Some(c), _) => self.publish_remote(c, &topic, msg).await,
                (None, Ok(t)) => self.broker.publish(&t, vec![msg]).await.map(|_| ()),
                (None, Err(e)) => Err(e),
            };
            match published {
                Ok(_) => {
                    retry |= !self.mark_result_published(run.id).await;
                }
                Err(e) if e.code == pubrun_core::Code::NotFound => {
                    // Retrying cannot help until someone creates the topic;
                    // dropping it beats warning forever.
                    tracing::warn!(run = run.id, topic, error = %e, "result topic does not exist; result dropped");
                    retry |= !self.mark_result_published(run.id).await;
                }
                Err(e) => {
                    tracing::warn!(run = run.id, topic, error = %e, "result not published yet; will retry");
                    retry = true;
                }
            }
        }
        retry
    }

    async fn result_message(&self, run: &RunRecord, spec: &JobSpec) -> OutgoingMessage {
        let exit = run.exit.clone().unwrap_or_default();
        let tail = pubrun_exec::log::tail(&self.log_path(run.id), 4096).await;
        // Lowest precedence first: the trigger's attributes, the job's
        // result_attributes, then pubrun's own.
        let mut attributes = if spec.result_trigger_attributes {
            run.message.attributes.clone()
        } else {
            BTreeMap::new()
        };
        let ctx = context(run);
        for (k, tmpl) in &spec.result_attributes {
            match template::render(tmpl, &ctx) {
                // A value Pub/Sub would refuse must not block the result.
                Ok(v) if v.len() > limits::MAX_ATTRIBUTE_VALUE_BYTES => {
                    tracing::warn!(
                        run = run.id,
                        attribute = k,
                        bytes = v.len(),
                        "result attribute longer than Pub/Sub allows; left out"
                    )
                }
                Ok(v) => {
                    attributes.insert(k.clone(), v);
                }
                // The run's result still goes out; the attribute says why
                // it is empty in the server log.
                Err(e) => {
                    tracing::warn!(run = run.id, attribute = k, error = %e, "result attribute cannot be rendered; left out")
                }
            }
        }
        attributes.insert("job".to_string(), run.job.clone());
        attributes.insert("run_id".to_string(), run.id.to_string());
        attributes.insert("status".to_string(), run.status.as_str().to_string());
        attributes.insert(
            "exit_code".to_string(),
            exit.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        );
        attributes.insert("attempt".to_string(), run.attempt.to_string());
        attributes.insert("source_message_id".to_string(), run.message.id.clone());
        // Downstream subscribers continue the trace from this run.
        if traces::enabled() {
            traces::inject(&run_trace(run).run, &mut attributes);
        }
        // Copied trigger attributes go first when there are too many.
        while attributes.len() > limits::MAX_ATTRIBUTES {
            let drop = attributes
                .keys()
                .find(|k| {
                    !pubrun_core::job::RESULT_ATTRIBUTES.contains(&k.as_str())
                        && !spec.result_attributes.contains_key(*k)
                })
                .or_else(|| {
                    attributes
                        .keys()
                        .find(|k| !pubrun_core::job::RESULT_ATTRIBUTES.contains(&k.as_str()))
                })
                .cloned();
            match drop {
                Some(k) => attributes.remove(&k),
                None => break,
            };
        }
        let summary = serde_json::json!({
            "run_id": run.id,
            "job": run.job,
            "status": run.status.as_str(),
            "attempt": run.attempt,
            "exit_code": exit.exit_code,
            "signal": exit.signal,
            "oom_killed": exit.oom_killed,
            "error": exit.error,
            "source_message_id": run.message.id,
            "created_at": rfc3339(run.created_at_ms * 1_000_000),
            "started_at": run.started_at_ms.map(|t| rfc3339(t * 1_000_000)),
            "ended_at": run.ended_at_ms.map(|t| rfc3339(t * 1_000_000)),
            "duration_ms": run.started_at_ms.zip(run.ended_at_ms).map(|(s, e)| e - s),
            "machine": run.machine,
            "log_tail": tail,
        });
        OutgoingMessage {
            data: serde_json::to_vec(&summary).unwrap().into(),
            attributes,
            ordering_key: String::new(),
        }
    }
}

/// One log line per queued run.
fn log_queued(job: &str, e: &Enqueued, message_id: &str) {
    match e {
        Enqueued::New(id) => {
            tracing::info!(
                run_id = id,
                job,
                message_id,
                status = "queued",
                "run queued"
            )
        }
        Enqueued::Duplicate(id) => tracing::debug!(
            run_id = id,
            job,
            message_id,
            "message deduplicated onto an existing run"
        ),
    }
}

/// The run's derived spans (see `pubrun_observability::traces`).
fn run_trace(run: &RunRecord) -> traces::RunTrace {
    traces::RunTrace::of(
        run.id,
        &run.message.attributes,
        &format!("{}/{}", run.message.id, run.message.publish_time),
    )
}

/// The delivery span: message handed to the job's intake → run queued.
fn delivery_span(job: &str, run_id: i64, msg: &SourceMessage, received: SystemTime) {
    if !traces::enabled() {
        return;
    }
    let t = traces::RunTrace::of(
        run_id,
        &msg.attributes,
        &format!("{}/{}", msg.id, msg.publish_time),
    );
    traces::start(|| SpanStart {
        kind: SpanKind::Consumer,
        id: Some(t.delivery.span_id()),
        // A root when the message carried no context: the derived trace.
        trace_id: Some(t.delivery.trace_id()),
        start: Some(received),
        attributes: vec![
            KeyValue::new("messaging.system", "gcp_pubsub"),
            KeyValue::new("messaging.operation", "deliver"),
            KeyValue::new("messaging.message.id", msg.id.clone()),
            KeyValue::new("pubrun.job", job.to_string()),
            KeyValue::new("pubrun.run_id", run_id),
        ],
        ..SpanStart::new("deliver", t.remote_parent.as_ref())
    });
}

/// The run span, queued → ended, recorded once the run has ended (its id
/// was derived, so attempts were its children all along).
fn run_span(run: &RunRecord, exit: &Exit, now: i64) {
    if !traces::enabled() {
        return;
    }
    let t = run_trace(run);
    let status = exit.status();
    let mut span = traces::start(|| SpanStart {
        id: Some(t.run.span_id()),
        start: Some(traces::at_ms(run.created_at_ms)),
        attributes: vec![
            KeyValue::new("pubrun.job", run.job.clone()),
            KeyValue::new("pubrun.run_id", run.id),
            KeyValue::new("pubrun.attempts", i64::from(run.attempt)),
            KeyValue::new("pubrun.status", status.as_str()),
            KeyValue::new("messaging.message.id", run.message.id.clone()),
        ],
        ..SpanStart::new("run", Some(&t.delivery))
    });
    if let Some(c) = exit.exit_code {
        span.set("pubrun.exit_code", i64::from(c));
    }
    if status != RunStatus::Succeeded {
        span.error(status.as_str());
    }
    // Not before its last attempt's span, which `now` (ms) may truncate.
    span.end_at(std::time::SystemTime::now().max(traces::at_ms(now)));
}

/// A run reached its terminal status: one log line, the run counters.
fn run_ended(run: &RunRecord, exit: &Exit, now: i64) {
    run_span(run, exit, now);
    let status = exit.status();
    let duration_s = run.started_at_ms.map(|s| (now - s).max(0) as f64 / 1000.0);
    tracing::info!(
        run_id = run.id,
        job = run.job,
        status = status.as_str(),
        attempt = run.attempt,
        exit_code = exit.exit_code,
        signal = exit.signal,
        oom_killed = exit.oom_killed,
        duration_s,
        machine = run.machine,
        error = exit.error.as_deref(),
        "run ended"
    );
    let m = pubrun_observability::metrics();
    m.runs
        .get_or_create(&labels([("job", &run.job), ("status", status.as_str())]))
        .inc();
    if let Some(d) = duration_s {
        m.run_duration
            .get_or_create(&labels([("job", &run.job)]))
            .observe(d);
    }
}

fn describe(exit: &Exit) -> String {
    let mut s = format!("attempt ended: {}", exit.status());
    if let Some(c) = exit.exit_code {
        s += &format!(", exit code {c}");
    }
    if let Some(sig) = exit.signal {
        s += &format!(", signal {sig}");
    }
    if exit.oom_killed {
        s += ", killed: out of memory";
    }
    if let Some(e) = &exit.error {
        s += &format!(", {e}");
    }
    s
}

fn slash(dir: &str) -> String {
    if dir.ends_with('/') {
        dir.to_string()
    } else {
        format!("{dir}/")
    }
}

/// An object name (or the part after an input's prefix) as a relative path
/// that stays below its directory; `None` for names that would escape it
/// (`..`, absolute, NUL, backslashes) or name a directory (`a/`, empty).
fn safe_relative(name: &str) -> Option<PathBuf> {
    if name.is_empty()
        || name.ends_with('/')
        || name.starts_with('/')
        || name.contains(['\0', '\\'])
    {
        return None;
    }
    let mut p = PathBuf::new();
    for c in name.split('/') {
        match c {
            "" | "." => continue,
            ".." => return None,
            c => p.push(c),
        }
    }
    (!p.as_os_str().is_empty()).then_some(p)
}

/// Refuses a path below `root` whose existing components include a
/// symbolic link (a previous attempt could have planted one to make
/// pubrun read or write outside the working directory).
fn check_no_symlink(root: &Path, path: &Path) -> std::io::Result<()> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other("outside the working directory"))?;
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::other(format!(
                    "{} is a symbolic link",
                    cur.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Streams one object into `dest` (below `root`); returns its size.
async fn download(
    buckets: &pubrun_buckets::Buckets,
    bucket: &str,
    object: &str,
    root: &Path,
    dest: &Path,
) -> std::result::Result<u64, String> {
    check_no_symlink(root, dest).map_err(|e| e.to_string())?;
    let (_, mut src) = buckets
        .open_object(bucket, object, None, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut out = tokio::fs::File::create(dest)
        .await
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let n = tokio::io::copy(&mut src, &mut out)
        .await
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Relative paths (with `/`) of the regular files below `dir`, sorted;
/// symbolic links are not followed.
async fn walk_files(dir: PathBuf) -> std::io::Result<Vec<String>> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut stack = vec![(dir, String::new())];
        while let Some((d, rel)) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ty = entry.file_type()?;
                let r = format!("{rel}{name}");
                if ty.is_dir() {
                    stack.push((entry.path(), format!("{r}/")));
                } else if ty.is_file() {
                    out.push(r);
                }
            }
        }
        out.sort();
        Ok(out)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// The run-store view of a delivered message and its dedup key.
fn source_and_key(spec: &JobSpec, d: &Delivered) -> (SourceMessage, String) {
    let m = &d.message;
    let msg = SourceMessage {
        id: m.id(),
        data: m.data.to_vec(),
        attributes: m.attributes.clone(),
        publish_time: rfc3339(m.publish_time_nanos),
        ordering_key: m.ordering_key.clone(),
    };
    let key = dedup_key(spec, &msg);
    (msg, key)
}

/// A message's dedup key: the job's `dedup_key` rendered, else its id.
fn dedup_key(spec: &JobSpec, msg: &SourceMessage) -> String {
    if spec.dedup_key.is_empty() {
        msg.id.clone()
    } else {
        let ctx = TemplateContext::from_message(
            &msg.data,
            msg.attributes.clone(),
            msg.id.clone(),
            msg.publish_time.clone(),
            msg.ordering_key.clone(),
        );
        // A key that cannot be rendered falls back to the message id: the
        // run is still created and its failure will say what is missing.
        // Even a panic must not leave the message unacked: it would come
        // back, and fail the same way, forever.
        let rendered = std::panic::catch_unwind(|| template::render(&spec.dedup_key, &ctx));
        match rendered {
            // PostgreSQL text cannot hold NUL (an object name can): every
            // engine stores the same key, with NUL as U+FFFD.
            Ok(Ok(k)) => k.replace('\0', "\u{FFFD}"),
            Ok(Err(e)) => {
                tracing::warn!(job = spec.name, message = msg.id, error = %e, "dedup_key cannot be rendered; using the message id");
                msg.id.clone()
            }
            Err(p) => {
                tracing::error!(
                    job = spec.name,
                    message = msg.id,
                    error = panic_message(&*p),
                    "dedup_key rendering panicked; using the message id"
                );
                msg.id.clone()
            }
        }
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

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_764_040_000_123_000_000),
            "2025-11-25T03:06:40.123000000Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }
}
