//! Messages that cannot be turned into parameters, and bugs that panic on
//! the run path, fail their run with a cause and never wedge the others:
//! slots are freed, intake keeps acking, recovery after a restart settles.

mod common;

use std::sync::Arc;

use common::*;
use pubrun_core::run::RunStatus;
use pubrun_exec::{Executor, Exit};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `day` whose byte 10 is inside `é`: the old `date` filter sliced there and
/// panicked, leaking the run's slot for good.
const BAD_DAY: &str = "2026-11-0éxx";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_dates_fail_their_runs_and_free_every_slot() {
    let dir = tempdir();
    let env = env_in(dir.path(), 4).await;
    env.job(
        "name = \"daily\"\ntopic = \"days\"\nconcurrency = 8\nprocess = { command = \"echo\", args = [\"day={{ attributes.day | date }}\"] }\n",
        "days",
    )
    .await;
    for _ in 0..4 {
        env.publish("days", &[("day", BAD_DAY)], "").await;
    }
    let bad = env.wait_runs("daily", 4).await;
    env.publish("days", &[("day", "2026-11-25T10:00:00Z")], "")
        .await;
    let good = env.wait_runs("daily", 5).await.remove(4);
    let good = env.wait_end(good.id).await;
    assert_eq!(good.status, RunStatus::Succeeded, "{good:#?}");
    assert!(env.log(good.id).contains("day=2026-11-25\n"));
    for r in bad {
        let r = env.wait_end(r.id).await;
        assert_eq!(r.status, RunStatus::Failed, "{r:#?}");
        let err = r.exit.unwrap().error.unwrap();
        assert!(
            err.starts_with("parameters:") && err.contains("not an RFC 3339 time"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_that_cannot_render_does_not_block_the_intake() {
    let dir = tempdir();
    let env = env_in(dir.path(), 4).await;
    env.job(
        "name = \"keyed\"\ntopic = \"keyed-in\"\ndedup_key = \"{{ attributes.day | date }}\"\nprocess = { command = \"true\" }\n",
        "keyed-in",
    )
    .await;
    env.publish("keyed-in", &[("day", BAD_DAY)], "").await;
    env.publish("keyed-in", &[("day", "2026-11-25")], "").await;
    let runs = env.wait_runs("keyed", 2).await;
    env.wait_acked("keyed").await;
    // The bad key fell back to the message id; the good one is the day.
    assert_eq!(runs[1].dedup_key, "2026-11-25");
    assert_eq!(runs[0].dedup_key, runs[0].message.id);
    for r in runs {
        assert_eq!(env.wait_end(r.id).await.status, RunStatus::Succeeded);
    }
}

/// Panics on any attempt whose job is `panics`; runs others with `sh`.
struct PanicsFor(&'static str);

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

// `Executor` is an `async_trait`; this is what the macro would write.
impl Executor for PanicsFor {
    fn run<'a, 'b>(&'a self, attempt: pubrun_exec::Attempt) -> BoxFuture<'b, Exit>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            if attempt.req.job == self.0 {
                panic!("simulated bug in run {}", attempt.req.run_id);
            }
            pubrun_exec::process::ProcessExecutor::new()
                .run(attempt)
                .await
        })
    }

    fn reattach<'a, 'b>(&'a self, attempt: pubrun_exec::Attempt) -> BoxFuture<'b, Option<Exit>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move { panic!("simulated bug reattaching run {}", attempt.req.run_id) })
    }
}

fn panicking_executors() -> pubrun_jobs::Executors {
    let e: Arc<dyn Executor> = Arc::new(PanicsFor("panics"));
    pubrun_jobs::Executors {
        process: e.clone(),
        docker: e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_running_fails_the_run_and_frees_its_slot() {
    let dir = tempdir();
    // One slot: a leaked slot would stop every later run.
    let env = open_env(dir.path(), 1, panicking_executors()).await;
    env.job(
        "name = \"panics\"\ntopic = \"p-in\"\nconcurrency = 4\nretries = { max_attempts = 3, initial_backoff = \"100ms\" }\nprocess = { command = \"true\" }\n",
        "p-in",
    )
    .await;
    env.job(
        "name = \"fine\"\ntopic = \"f-in\"\nprocess = { command = \"echo\", args = [\"fine\"] }\n",
        "f-in",
    )
    .await;
    for _ in 0..4 {
        env.publish("p-in", &[], "x").await;
    }
    let bad = env.wait_runs("panics", 4).await;
    for r in &bad {
        let r = env.wait_end(r.id).await;
        assert_eq!(r.status, RunStatus::Failed, "{r:#?}");
        assert_eq!(r.attempt, 1, "a bug is not retried");
        let err = r.exit.unwrap().error.unwrap();
        assert!(
            err.starts_with("internal error:") && err.contains("simulated bug"),
            "{err}"
        );
        assert!(
            env.log(r.id).contains("internal error:"),
            "{}",
            env.log(r.id)
        );
    }
    env.publish("f-in", &[], "x").await;
    let good = env.first_run_end("fine").await;
    assert_eq!(good.status, RunStatus::Succeeded, "{good:#?}");
}

#[test]
fn a_panic_while_recovering_after_a_restart_fails_that_run() {
    let dir = tempdir();
    let rt = runtime();
    let id = rt.block_on(async {
        let env = open_env_unstarted(dir.path(), 1, panicking_executors()).await;
        env.job(
            "name = \"panics\"\ntopic = \"p-in\"\nprocess = { command = \"true\" }\n",
            "p-in",
        )
        .await;
        env.publish("p-in", &[], "x").await;
        let run = env.wait_runs("panics", 1).await.remove(0);
        // As if the server had stopped while the attempt was in flight.
        env.store.mark_starting(run.id).unwrap();
        env.store
            .mark_running(run.id, "host", "1", pubrun_jobs::dispatcher::now_ms())
            .unwrap();
        run.id
    });
    // The first server stops: every task is dropped where it stands.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    runtime().block_on(async {
        let env = open_env(dir.path(), 1, panicking_executors()).await;
        let r = env.wait_end(id).await;
        assert_eq!(r.status, RunStatus::Failed, "{r:#?}");
        let err = r.exit.unwrap().error.unwrap();
        assert!(
            err.contains("internal error:") && err.contains("reattaching"),
            "{err}"
        );
    });
}
