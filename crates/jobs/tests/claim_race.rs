//! A cancel that arrives while a run is being claimed: the claim has
//! committed the run as `starting`, but the dispatcher has not registered
//! its cancel switch yet. The run store's claim hook (feature `testing`)
//! holds the claim's answer back, which makes that window as wide as the
//! test needs, with no sleeps.

mod common;

use std::sync::Arc;

use common::*;
use pubrun_broker::Broker;
use pubrun_core::run::RunStatus;
use pubrun_jobs::{Dispatcher, RunStore};
use pubrun_store::EmbeddedStore;
use tokio::sync::{mpsc, Semaphore};

/// The claims the run store holds: each claim's run ids arrive on
/// `claimed`, and its answer waits for one permit of `release`.
struct Held {
    claimed: mpsc::UnboundedReceiver<Vec<i64>>,
    release: Arc<Semaphore>,
}

impl Held {
    /// The run ids of the next claim, now held.
    async fn next(&mut self, what: &str) -> Vec<i64> {
        tokio::time::timeout(WAIT, self.claimed.recv())
            .await
            .expect(what)
            .unwrap()
    }

    /// Lets one held claim answer.
    fn release(&self) {
        self.release.add_permits(1);
    }
}

/// An env whose run store holds its claims, with the sleeper job and its
/// first message published; the first run's claim is held. Returns that
/// run's id.
async fn first_claim_held(dir: &std::path::Path) -> (Env, Held, i64) {
    let broker = Broker::open(Arc::new(EmbeddedStore::open(dir).unwrap())).unwrap();
    broker.spawn_maintenance();
    let (tx, rx) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let permits = release.clone();
    let store = RunStore::open(&dir.join("runs.db"))
        .unwrap()
        .with_claim_hook(Box::new(move |ids| {
            let _ = tx.send(ids);
            let permits = permits.clone();
            Box::pin(async move { permits.acquire().await.unwrap().forget() })
        }));
    let store = Arc::new(store);
    let dispatcher = Dispatcher::new(
        broker.clone(),
        store.clone(),
        dir.to_path_buf(),
        process_executors(),
        4,
    );
    dispatcher.start().await.unwrap();
    let env = Env {
        dir: dir.to_path_buf(),
        broker,
        store,
        dispatcher,
    };
    let mut held = Held {
        claimed: rx,
        release,
    };
    env.job(SLEEPER, "naps").await;
    env.publish("naps", &[], "first").await;
    let id = held.next("a claim").await[0];
    (env, held, id)
}

const SLEEPER: &str = "name = \"sleeper\"\ntopic = \"naps\"\nconcurrency = 1\ngrace_period = \"1s\"\nprocess = { command = \"sh\", args = [\"-c\", 'echo started; exec sleep 60'] }\n";

/// The cancel lands after the claim committed `starting` and before the
/// run's switch exists: the run must end cancelled without starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_between_claim_and_start_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (env, held, id) = first_claim_held(dir.path()).await;
    assert_eq!(env.store.get(id).unwrap().status, RunStatus::Starting);

    let r = env.dispatcher.cancel_run(id).await.unwrap();
    assert!(r.cancel_requested, "{r:#?}");
    held.release();

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
    let (env, mut held, first) = first_claim_held(dir.path()).await;
    held.release();
    env.wait_status(first, RunStatus::Running).await;

    // Concurrency 1: the second waits in the queue.
    env.publish("naps", &[], "second").await;
    let second = env.wait_runs("sleeper", 2).await[1].id;
    assert_eq!(env.store.get(second).unwrap().status, RunStatus::Queued);

    env.dispatcher.cancel_run(first).await.unwrap();
    assert_eq!(held.next("the scheduler's claim").await, [second]);
    env.dispatcher.cancel_run(second).await.unwrap();
    held.release();

    let run = env.wait_end(second).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{}", env.log(second));
    assert_eq!(run.started_at_ms, None, "{run:#?}");
    assert_eq!(env.wait_end(first).await.status, RunStatus::Cancelled);
}
