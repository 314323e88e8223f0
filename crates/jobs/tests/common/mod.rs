//! Shared setup for the dispatcher's integration tests: the real embedded
//! store, the real broker, the real run store and the real executors, in a
//! temporary data directory. Tests wait for events by polling the run store
//! (every 50 ms, up to [`WAIT`]); they never sleep to synchronise.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubrun_broker::Broker;
use pubrun_core::job::JobSpec;
use pubrun_core::run::RunStatus;
use pubrun_core::{OutgoingMessage, SubscriptionConfig, SubscriptionName, TopicConfig, TopicName};
use pubrun_exec::Executor;
use pubrun_jobs::{Dispatcher, Executors, RunRecord, RunStore};
use pubrun_store::runs::RunPage;
use pubrun_store::EmbeddedStore;

/// How long any awaited event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

pub const PROJECT: &str = "p";

pub fn topic_name(id: &str) -> String {
    format!("projects/{PROJECT}/topics/{id}")
}

pub fn job_sub(job: &str) -> SubscriptionName {
    SubscriptionName::parse(&pubrun_core::manifest::job_subscription(PROJECT, job)).unwrap()
}

/// Everything a test talks to.
pub struct Env {
    pub dir: PathBuf,
    pub broker: Arc<Broker>,
    pub store: Arc<RunStore>,
    pub dispatcher: Arc<Dispatcher>,
}

pub fn process_executors() -> Executors {
    let process: Arc<dyn Executor> = Arc::new(pubrun_exec::process::ProcessExecutor::new());
    // Process-only tests never hand a run to the docker slot.
    Executors {
        process: process.clone(),
        docker: process,
    }
}

/// Opens the store, broker and run store of `dir` (retrying while a
/// previous, just-killed instance still holds the directory lock) and starts
/// a dispatcher with `slots` global slots.
pub async fn open_env(dir: &Path, slots: usize, executors: Executors) -> Env {
    let env = open_env_unstarted(dir, slots, executors).await;
    env.dispatcher.start().await.unwrap();
    env
}

/// Like [`open_env`] without starting the dispatcher: put_job starts
/// intakes, so messages become queued runs, but nothing runs.
pub async fn open_env_unstarted(dir: &Path, slots: usize, executors: Executors) -> Env {
    let deadline = Instant::now() + WAIT;
    let store = loop {
        match EmbeddedStore::open(dir) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot open data dir {}: {e}", dir.display()),
        }
    };
    let broker = Broker::open(Arc::new(store)).unwrap();
    broker.spawn_maintenance();
    let store = Arc::new(RunStore::open(&dir.join("runs.db")).unwrap());
    let dispatcher = Dispatcher::new(
        broker.clone(),
        store.clone(),
        dir.to_path_buf(),
        executors,
        slots,
    );
    Env {
        dir: dir.to_path_buf(),
        broker,
        store,
        dispatcher,
    }
}

pub async fn env_in(dir: &Path, slots: usize) -> Env {
    open_env(dir, slots, process_executors()).await
}

/// A job from a `[[job]]` TOML snippet; topics it names are declared for it.
pub fn job(toml_job: &str, topics: &[&str]) -> JobSpec {
    let mut src = format!("project = \"{PROJECT}\"\n");
    for t in topics {
        src += &format!("[[topic]]\nname = \"{t}\"\n");
    }
    src += "[[job]]\n";
    src += toml_job;
    let m = pubrun_core::manifest::parse("test.toml", &src)
        .unwrap_or_else(|e| panic!("bad test job: {e}\n{src}"));
    m.jobs.into_iter().next().unwrap()
}

impl Env {
    pub async fn topic(&self, id: &str) {
        self.broker
            .create_topic(TopicConfig {
                name: topic_name(id),
                labels: Default::default(),
            })
            .await
            .unwrap();
    }

    pub async fn subscription(&self, id: &str, topic: &str) -> SubscriptionName {
        let name = format!("projects/{PROJECT}/subscriptions/{id}");
        self.broker
            .create_subscription(SubscriptionConfig {
                name: name.clone(),
                topic: topic_name(topic),
                labels: Default::default(),
                ack_deadline_seconds: 60,
                ..Default::default()
            })
            .await
            .unwrap();
        SubscriptionName::parse(&name).unwrap()
    }

    /// Creates the topic and puts the job.
    pub async fn job(&self, toml_job: &str, topic: &str) -> JobSpec {
        self.topic(topic).await;
        let spec = job(toml_job, &[topic]);
        self.dispatcher.put_job(spec.clone()).await.unwrap();
        spec
    }

    /// Publishes one message; returns its id. (Pub/Sub refuses a message
    /// with neither data nor attributes, so empty data becomes "-" then.)
    pub async fn publish(&self, topic: &str, attrs: &[(&str, &str)], data: &str) -> String {
        let data = if data.is_empty() && attrs.is_empty() {
            "-"
        } else {
            data
        };
        let attributes: BTreeMap<String, String> = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let msg = OutgoingMessage {
            data: data.to_string().into_bytes().into(),
            attributes,
            ordering_key: String::new(),
        };
        self.broker
            .publish(&TopicName::parse(&topic_name(topic)).unwrap(), vec![msg])
            .await
            .unwrap()
            .remove(0)
    }

    /// Runs of a job, oldest first.
    pub fn runs(&self, job: &str) -> Vec<RunRecord> {
        let mut v = self
            .store
            .list_before(&RunPage {
                job: Some(job.to_string()),
                limit: 10_000,
                ..RunPage::default()
            })
            .unwrap();
        v.reverse();
        v
    }

    /// Waits until the job has at least `n` runs; returns them oldest first.
    pub async fn wait_runs(&self, job: &str, n: usize) -> Vec<RunRecord> {
        let what = format!("{n} runs of job {job}");
        wait_for(&what, || {
            let r = self.runs(job);
            async move { (r.len() >= n).then_some(r) }
        })
        .await
    }

    /// Waits until the run's status satisfies `pred`.
    pub async fn wait_run(
        &self,
        id: i64,
        what: &str,
        pred: impl Fn(&RunRecord) -> bool,
    ) -> RunRecord {
        let last = std::sync::Mutex::new(None);
        let r = wait_for_or(&format!("run {id}: {what}"), || {
            let r = self.store.get(id).unwrap();
            let ok = pred(&r);
            *last.lock().unwrap() = Some(r.clone());
            async move { ok.then_some(r) }
        })
        .await;
        match r {
            Some(r) => r,
            None => panic!(
                "timed out after {WAIT:?} waiting for run {id}: {what}; last seen {:#?}\nlog:\n{}",
                last.lock().unwrap(),
                self.log(id)
            ),
        }
    }

    pub async fn wait_status(&self, id: i64, status: RunStatus) -> RunRecord {
        self.wait_run(id, &format!("status {status}"), |r| r.status == status)
            .await
    }

    /// Waits for the run to end (any terminal status).
    pub async fn wait_end(&self, id: i64) -> RunRecord {
        self.wait_run(id, "terminal status", |r| r.status.is_terminal())
            .await
    }

    /// Waits for the job's first run and then for its end.
    pub async fn first_run_end(&self, job: &str) -> RunRecord {
        let run = self.wait_runs(job, 1).await.remove(0);
        self.wait_end(run.id).await
    }

    /// Waits until every message of the job's subscription is acked.
    pub async fn wait_acked(&self, job: &str) {
        let sub = job_sub(job);
        wait_for(&format!("backlog 0 on {sub}"), || {
            let n = self.broker.backlog(&sub).unwrap();
            async move { (n == 0).then_some(()) }
        })
        .await
    }

    pub fn log(&self, id: i64) -> String {
        std::fs::read_to_string(self.dispatcher.log_path(id)).unwrap_or_default()
    }
}

/// Polls `check` every 50 ms until it yields `Some`, up to [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    pubrun_testkit::eventually(what, WAIT, check).await
}

/// [`wait_for`], but `None` after [`WAIT`] instead of a panic.
pub async fn wait_for_or<T, F, Fut>(_what: &str, check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    pubrun_testkit::poll(WAIT, check).await
}

/// A single-quoted shell word.
pub fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The error a run ended with ("" when none).
pub fn run_error(run: &RunRecord) -> String {
    run.exit
        .as_ref()
        .and_then(|e| e.error.clone())
        .unwrap_or_default()
}

/// A two-worker multi-thread runtime: one per "server" in restart tests,
/// shut down to simulate a crash.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
