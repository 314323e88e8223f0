//! A cancel that arrives while a run is being claimed: the claim has
//! committed the run as `starting`, but the dispatcher has not registered
//! its cancel switch yet. A run store that holds the claim's answer back
//! makes that window as wide as the test needs, with no sleeps.

mod common;

use std::sync::Arc;

use common::*;
use pubrun_broker::Broker;
use pubrun_core::job::JobSpec;
use pubrun_core::run::{Exit, RunStatus};
use pubrun_core::Result;
use pubrun_jobs::runstore::{Claimed, Enqueued, QueuedRun, RunStoreEngine, SourceMessage};
use pubrun_jobs::{Dispatcher, RunRecord, RunStore};
use pubrun_store::EmbeddedStore;
use tokio::sync::{mpsc, Semaphore};

/// The embedded run store, except that a claim's runs are reported on
/// `claimed` and its answer waits for a permit of `release`.
struct HeldClaims {
    inner: Arc<RunStore>,
    claimed: mpsc::UnboundedSender<Vec<i64>>,
    release: Arc<Semaphore>,
}

impl HeldClaims {
    async fn hold(&self, started: &[RunRecord]) {
        if started.is_empty() {
            return;
        }
        let _ = self.claimed.send(started.iter().map(|r| r.id).collect());
        self.release.acquire().await.unwrap().forget();
    }
}

#[async_trait::async_trait]
impl RunStoreEngine for HeldClaims {
    async fn put_job(&self, spec: &JobSpec) -> Result<()> {
        RunStoreEngine::put_job(&*self.inner, spec).await
    }
    async fn delete_job(&self, name: &str) -> Result<bool> {
        RunStoreEngine::delete_job(&*self.inner, name).await
    }
    async fn jobs(&self) -> Result<Vec<JobSpec>> {
        RunStoreEngine::jobs(&*self.inner).await
    }
    async fn meta(&self, key: &str) -> Result<Option<String>> {
        RunStoreEngine::meta(&*self.inner, key).await
    }
    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        RunStoreEngine::set_meta(&*self.inner, key, value).await
    }
    async fn enqueue_batch(
        &self,
        job: &JobSpec,
        messages: &[(SourceMessage, String)],
        now_ms: i64,
    ) -> Result<Vec<Enqueued>> {
        RunStoreEngine::enqueue_batch(&*self.inner, job, messages, now_ms).await
    }
    async fn enqueue_starting(
        &self,
        job: &JobSpec,
        messages: &[(SourceMessage, String)],
        now_ms: i64,
        start: usize,
    ) -> Result<(Vec<Enqueued>, Vec<RunRecord>)> {
        let r =
            RunStoreEngine::enqueue_starting(&*self.inner, job, messages, now_ms, start).await?;
        self.hold(&r.1).await;
        Ok(r)
    }
    async fn startable(&self, job: &str, now_ms: i64, limit: usize) -> Result<Vec<QueuedRun>> {
        RunStoreEngine::startable(&*self.inner, job, now_ms, limit).await
    }
    async fn claim_due(
        &self,
        job: &str,
        now_ms: i64,
        limit: usize,
        skip: &[i64],
    ) -> Result<Claimed> {
        let c = RunStoreEngine::claim_due(&*self.inner, job, now_ms, limit, skip).await?;
        self.hold(&c.started).await;
        Ok(c)
    }
    async fn due_queued_by_job(&self, now_ms: i64) -> Result<Vec<(String, u64)>> {
        RunStoreEngine::due_queued_by_job(&*self.inner, now_ms).await
    }
    async fn next_due_ms(&self, now_ms: i64) -> Result<Option<i64>> {
        RunStoreEngine::next_due_ms(&*self.inner, now_ms).await
    }
    async fn queued_orphans(&self, jobs: &[String]) -> Result<Vec<QueuedRun>> {
        RunStoreEngine::queued_orphans(&*self.inner, jobs).await
    }
    async fn prune_dedup(&self, now_ms: i64) -> Result<usize> {
        RunStoreEngine::prune_dedup(&*self.inner, now_ms).await
    }
    async fn get(&self, id: i64) -> Result<RunRecord> {
        RunStoreEngine::get(&*self.inner, id).await
    }
    async fn list_before(
        &self,
        job: Option<&str>,
        status: Option<RunStatus>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RunRecord>> {
        RunStoreEngine::list_before(&*self.inner, job, status, before, limit).await
    }
    async fn count_by_status(&self) -> Result<Vec<(RunStatus, u64)>> {
        RunStoreEngine::count_by_status(&*self.inner).await
    }
    async fn with_status(&self, statuses: &[RunStatus]) -> Result<Vec<RunRecord>> {
        RunStoreEngine::with_status(&*self.inner, statuses).await
    }
    async fn mark_starting(&self, id: i64) -> Result<()> {
        RunStoreEngine::mark_starting(&*self.inner, id).await
    }
    async fn cancel_if_queued(
        &self,
        id: i64,
        exit: &Exit,
        now_ms: i64,
        has_result_topic: bool,
    ) -> Result<bool> {
        RunStoreEngine::cancel_if_queued(&*self.inner, id, exit, now_ms, has_result_topic).await
    }
    async fn mark_running(&self, id: i64, machine: &str, handle: &str, now_ms: i64) -> Result<()> {
        RunStoreEngine::mark_running(&*self.inner, id, machine, handle, now_ms).await
    }
    async fn requeue(
        &self,
        id: i64,
        next_attempt: u32,
        not_before_ms: i64,
        last_exit: &Exit,
    ) -> Result<()> {
        RunStoreEngine::requeue(&*self.inner, id, next_attempt, not_before_ms, last_exit).await
    }
    async fn finish(
        &self,
        id: i64,
        exit: &Exit,
        now_ms: i64,
        has_result_topic: bool,
    ) -> Result<RunStatus> {
        RunStoreEngine::finish(&*self.inner, id, exit, now_ms, has_result_topic).await
    }
    async fn request_cancel(&self, id: i64) -> Result<RunRecord> {
        RunStoreEngine::request_cancel(&*self.inner, id).await
    }
    async fn unpublished_results(&self) -> Result<Vec<RunRecord>> {
        RunStoreEngine::unpublished_results(&*self.inner).await
    }
    async fn mark_result_published(&self, id: i64) -> Result<()> {
        RunStoreEngine::mark_result_published(&*self.inner, id).await
    }
    fn shared(&self) -> bool {
        false
    }
    async fn put_log(&self, id: i64, log: &[u8]) -> Result<()> {
        RunStoreEngine::put_log(&*self.inner, id, log).await
    }
    async fn log(&self, id: i64) -> Result<Option<Vec<u8>>> {
        RunStoreEngine::log(&*self.inner, id).await
    }
}

/// An env whose dispatcher claims through [`HeldClaims`]; the claimed ids
/// arrive on the receiver, and each held claim waits for one permit.
async fn held_env(
    dir: &std::path::Path,
) -> (Env, mpsc::UnboundedReceiver<Vec<i64>>, Arc<Semaphore>) {
    let broker = Broker::open(Arc::new(EmbeddedStore::open(dir).unwrap())).unwrap();
    broker.spawn_maintenance();
    let inner = Arc::new(RunStore::open(&dir.join("runs.db")).unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let held = HeldClaims {
        inner: inner.clone(),
        claimed: tx,
        release: release.clone(),
    };
    let dispatcher = Dispatcher::new(
        broker.clone(),
        Arc::new(held),
        dir.to_path_buf(),
        process_executors(),
        4,
    );
    dispatcher.start().await.unwrap();
    let env = Env {
        dir: dir.to_path_buf(),
        broker,
        store: inner,
        dispatcher,
    };
    (env, rx, release)
}

const SLEEPER: &str = "name = \"sleeper\"\ntopic = \"naps\"\nconcurrency = 1\ngrace_period = \"1s\"\nprocess = { command = \"sh\", args = [\"-c\", 'echo started; exec sleep 60'] }\n";

/// The cancel lands after the claim committed `starting` and before the
/// run's switch exists: the run must end cancelled without starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_between_claim_and_start_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (env, mut claimed, release) = held_env(dir.path()).await;
    env.job(SLEEPER, "naps").await;
    env.publish("naps", &[], "first").await;
    let ids = tokio::time::timeout(WAIT, claimed.recv())
        .await
        .expect("a claim")
        .unwrap();
    let id = ids[0];
    assert_eq!(env.store.get(id).unwrap().status, RunStatus::Starting);

    let r = env.dispatcher.cancel_run(id).await.unwrap();
    assert!(r.cancel_requested, "{r:#?}");
    release.add_permits(1);

    let run = env.wait_end(id).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{}", env.log(id));
    assert_eq!(
        run.started_at_ms, None,
        "the process never started: {run:#?}"
    );
    assert!(
        env.log(id).contains("cancelled before it started"),
        "{}",
        env.log(id)
    );
}

/// The same through the scheduler: a run that waited in the queue is
/// claimed when the slot frees, and the cancel lands inside that claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_inside_the_schedulers_claim_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (env, mut claimed, release) = held_env(dir.path()).await;
    env.job(SLEEPER, "naps").await;
    env.publish("naps", &[], "first").await;
    let first = tokio::time::timeout(WAIT, claimed.recv())
        .await
        .expect("a claim")
        .unwrap()[0];
    release.add_permits(1);
    env.wait_status(first, RunStatus::Running).await;

    // Concurrency 1: the second waits in the queue.
    env.publish("naps", &[], "second").await;
    let second = env.wait_runs("sleeper", 2).await[1].id;
    assert_eq!(env.store.get(second).unwrap().status, RunStatus::Queued);

    env.dispatcher.cancel_run(first).await.unwrap();
    let ids = tokio::time::timeout(WAIT, claimed.recv())
        .await
        .expect("the scheduler's claim")
        .unwrap();
    assert_eq!(ids, [second]);
    env.dispatcher.cancel_run(second).await.unwrap();
    release.add_permits(1);

    let run = env.wait_end(second).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{}", env.log(second));
    assert_eq!(run.started_at_ms, None, "{run:#?}");
    assert_eq!(env.wait_end(first).await.status, RunStatus::Cancelled);
}
