//! Crash and restart. The first "server" lives in its own tokio runtime;
//! shutting that runtime down drops every task mid-flight (intake, scheduler,
//! executors, result publisher) without any orderly stop — what survives is
//! only what was durably written. Then everything is opened again on the same
//! data directory in a fresh runtime.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pubrun_core::run::RunStatus;
use pubrun_exec::Executor;
use pubrun_jobs::Executors;

/// Kills the first server: every task is dropped where it stands.
fn crash(rt: tokio::runtime::Runtime) {
    rt.shutdown_timeout(Duration::from_secs(10));
}

#[test]
fn queued_runs_proceed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let spec_toml = format!(
        "name = \"later\"\ntopic = \"backlog\"\nprocess = {{ command = \"sh\", args = [\"-c\", 'echo \"ran $PUBRUN_MESSAGE_ID\" >> \"$F\"'], env = {{ F = {:?} }} }}\n",
        trace.to_str().unwrap()
    );
    let rt = runtime();
    let ids = rt.block_on(async {
        // Intakes run, the scheduler does not: the runs stay queued.
        let env = open_env_unstarted(dir.path(), 4, process_executors()).await;
        env.job(&spec_toml, "backlog").await;
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(env.publish("backlog", &[], &format!("m{i}")).await);
        }
        let runs = env.wait_runs("later", 3).await;
        env.wait_acked("later").await;
        assert!(runs.iter().all(|r| r.status == RunStatus::Queued));
        ids
    });
    crash(rt);
    assert!(!trace.exists(), "nothing ran before the crash");

    // Messages that arrive while no dispatcher runs wait in the job's
    // subscription and are taken as soon as it starts.
    let rt = runtime();
    let late_ids = rt.block_on(async {
        let store = pubrun_store::EmbeddedStore::open(dir.path()).unwrap();
        let broker = pubrun_broker::Broker::open(Arc::new(store)).unwrap();
        let mut late = Vec::new();
        for i in 0..2 {
            let msg = pubrun_core::OutgoingMessage {
                data: format!("late{i}").into_bytes().into(),
                ..Default::default()
            };
            late.extend(
                broker
                    .publish(
                        &pubrun_core::TopicName::parse(&topic_name("backlog")).unwrap(),
                        vec![msg],
                    )
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(broker.backlog(&job_sub("later")).unwrap(), 2);
        late
    });
    crash(rt);
    let ids: Vec<String> = ids.into_iter().chain(late_ids).collect();

    let rt = runtime();
    rt.block_on(async {
        let env = env_in(dir.path(), 4).await;
        let runs = env.wait_runs("later", 5).await;
        env.wait_acked("later").await;
        let runs_now = env.runs("later");
        assert_eq!(
            runs_now.len(),
            5,
            "acked messages are not delivered again: {runs_now:#?}"
        );
        for r in &runs {
            let r = env.wait_end(r.id).await;
            assert_eq!(r.status, RunStatus::Succeeded, "{}", env.log(r.id));
            assert_eq!(r.attempt, 1);
        }
        let text = std::fs::read_to_string(&trace).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        let mut want: Vec<String> = ids.iter().map(|i| format!("ran {i}")).collect();
        want.sort();
        assert_eq!(lines, want);
        assert_eq!(env.broker.backlog(&job_sub("later")).unwrap(), 0);
    });
}

#[test]
fn lost_process_runs_are_retried_per_policy() {
    let dir = tempfile::tempdir().unwrap();
    // The first attempt of the "first" message outlives the crash only
    // briefly (a short sleep, so the orphan does not linger).
    let cmd = r#"echo "attempt $PUBRUN_ATTEMPT of $MSG"; if [ "$PUBRUN_ATTEMPT" = 1 ] && [ "$MSG" = first ]; then exec sleep 3; fi"#;
    let jobs = [
        ("retried", "max_attempts = 2, initial_backoff = \"100ms\""),
        ("one-shot", "max_attempts = 1"),
    ];
    let rt = runtime();
    let before = rt.block_on(async {
        let env = env_in(dir.path(), 8).await;
        env.topic("crashy").await;
        for (name, retries) in jobs {
            let spec = job(
                &format!(
                    "name = \"{name}\"\ntopic = \"crashy\"\nconcurrency = 1\nretries = {{ {retries} }}\nprocess = {{ command = \"sh\", args = [\"-c\", {}], env = {{ MSG = \"{{{{ text }}}}\" }} }}\n",
                    serde_json::to_string(cmd).unwrap()
                ),
                &["crashy"],
            );
            env.dispatcher.put_job(spec).await.unwrap();
        }
        env.publish("crashy", &[], "first").await;
        env.publish("crashy", &[], "second").await;
        let mut before = Vec::new();
        for (name, _) in jobs {
            let runs = env.wait_runs(name, 2).await;
            env.wait_status(runs[0].id, RunStatus::Running).await;
            env.wait_acked(name).await;
            // Concurrency 1: the second run waits behind the first.
            assert_eq!(env.store.get(runs[1].id).unwrap().status, RunStatus::Queued);
            before.push((name, runs[0].id, runs[1].id));
        }
        before
    });
    crash(rt);

    let rt = runtime();
    rt.block_on(async {
        let env = env_in(dir.path(), 8).await;
        for (name, first, second) in before {
            let f = env.wait_end(first).await;
            let log = env.log(first);
            assert!(
                log.contains("lost"),
                "{name}: the log says what happened:\n{log}"
            );
            match name {
                "retried" => {
                    assert_eq!(f.status, RunStatus::Succeeded, "{f:#?}\n{log}");
                    assert_eq!(f.attempt, 2, "the lost attempt counts: {f:#?}");
                    assert!(log.contains("attempt 2 of first"), "{log}");
                }
                _ => {
                    assert_eq!(f.status, RunStatus::Failed, "{f:#?}\n{log}");
                    assert_eq!(f.attempt, 1);
                    let err = f
                        .exit
                        .as_ref()
                        .and_then(|e| e.error.clone())
                        .unwrap_or_default();
                    assert!(err.contains("lost"), "{err}");
                }
            }
            let s = env.wait_end(second).await;
            assert_eq!(
                s.status,
                RunStatus::Succeeded,
                "{name}: the queued run proceeds: {}",
                env.log(second)
            );
            assert_eq!(s.attempt, 1);
            assert_eq!(env.runs(name).len(), 2);
        }
    });
}

#[test]
fn a_run_caught_starting_is_tried_again_without_using_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let id = rt.block_on(async {
        let env = open_env_unstarted(dir.path(), 4, process_executors()).await;
        env.job("name = \"caught\"\ntopic = \"caught-in\"\nprocess = { command = \"echo\", args = [\"ran\"] }\n", "caught-in").await;
        env.publish("caught-in", &[], "x").await;
        let run = env.wait_runs("caught", 1).await.remove(0);
        // The crash comes after the scheduler claimed the run and before
        // the executor reported it running.
        env.store.mark_starting(run.id).unwrap();
        run.id
    });
    crash(rt);
    let rt = runtime();
    rt.block_on(async {
        let env = env_in(dir.path(), 4).await;
        let run = env.wait_end(id).await;
        let log = env.log(id);
        assert_eq!(
            run.status,
            RunStatus::Succeeded,
            "max_attempts = 1, yet nothing had run: {run:#?}\n{log}"
        );
        assert_eq!(run.attempt, 1);
        assert!(log.contains("ran"), "{log}");
    });
}

/// An engine that does not answer twice, then reports the attempt ended.
struct FlakyEngine {
    reattaches: std::sync::atomic::AtomicUsize,
    runs: std::sync::atomic::AtomicUsize,
}

// `Executor` is an `async_trait`; this is what the macro would write.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl Executor for FlakyEngine {
    fn run<'a, 'b>(&'a self, _attempt: pubrun_exec::Attempt) -> BoxFuture<'b, pubrun_exec::Exit>
    where
        'a: 'b,
        Self: 'b,
    {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async {
            pubrun_exec::Exit {
                error: Some("a recovered attempt must not be started again".into()),
                ..Default::default()
            }
        })
    }

    fn reattach<'a, 'b>(
        &'a self,
        _attempt: pubrun_exec::Attempt,
    ) -> BoxFuture<'b, Option<pubrun_exec::Exit>>
    where
        'a: 'b,
        Self: 'b,
    {
        let n = self
            .reattaches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            Some(if n < 2 {
                pubrun_exec::Exit::failed(
                    pubrun_exec::EndCause::Infrastructure,
                    "docker engine unreachable",
                )
            } else {
                pubrun_exec::Exit {
                    exit_code: Some(0),
                    ..Default::default()
                }
            })
        })
    }
}

#[test]
fn reattach_waits_for_an_engine_that_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let id = rt.block_on(async {
        let env = open_env_unstarted(dir.path(), 4, process_executors()).await;
        env.job("name = \"patient\"\ntopic = \"patient-in\"\ndocker = { image = \"pubrun-test/none:latest\" }\n", "patient-in").await;
        env.publish("patient-in", &[], "x").await;
        let run = env.wait_runs("patient", 1).await.remove(0);
        // As if a container had been started and reported running.
        env.store.mark_starting(run.id).unwrap();
        env.store.mark_running(run.id, "engine", "container-1", pubrun_jobs::dispatcher::now_ms()).unwrap();
        run.id
    });
    crash(rt);
    let engine = Arc::new(FlakyEngine {
        reattaches: Default::default(),
        runs: Default::default(),
    });
    let rt = runtime();
    rt.block_on(async {
        let executors = Executors {
            process: Arc::new(pubrun_exec::process::ProcessExecutor::new()),
            docker: engine.clone(),
        };
        let env = open_env(dir.path(), 4, executors).await;
        let run = env.wait_end(id).await;
        let log = env.log(id);
        assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
        assert_eq!(run.attempt, 1);
        assert!(log.contains("asking again"), "{log}");
    });
    assert_eq!(
        engine.reattaches.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    assert_eq!(
        engine.runs.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the attempt was followed, not started anew"
    );
}

/// Whether a Docker engine answers (see `pubrun_testkit::require_docker`);
/// then builds the busybox test image, failing the test if that fails.
fn docker_available(test: &str) -> bool {
    if !pubrun_testkit::require_docker(test) {
        return false;
    }
    if let Err(e) = pubrun_testkit::run_script("docker-test-image.sh", &[]) {
        panic!("{test}: {e}");
    }
    true
}

fn docker_executors() -> Executors {
    let docker: Arc<dyn Executor> = Arc::new(
        pubrun_exec::docker::DockerExecutor::connect()
            .unwrap_or_else(|e| panic!("docker engine: {e}")),
    );
    Executors {
        process: Arc::new(pubrun_exec::process::ProcessExecutor::new()),
        docker,
    }
}

#[test]
fn running_container_is_reattached_after_a_restart() {
    if !docker_available("running_container_is_reattached_after_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec_toml = r#"name = "boxed"
topic = "containers"
docker = { image = "pubrun-test/busybox:latest", pull = "never", command = ["sh", "-c", "echo up; sleep 4; echo done; exit 7"] }
"#;
    let rt = runtime();
    let id = rt.block_on(async {
        let env = open_env(dir.path(), 4, docker_executors()).await;
        env.job(spec_toml, "containers").await;
        env.publish("containers", &[], "").await;
        let run = env.wait_runs("boxed", 1).await.remove(0);
        let run = env.wait_status(run.id, RunStatus::Running).await;
        assert!(
            !run.handle.is_empty(),
            "the container id is recorded: {run:#?}"
        );
        run.id
    });
    crash(rt);

    let rt = runtime();
    rt.block_on(async {
        let env = open_env(dir.path(), 4, docker_executors()).await;
        let run = env.wait_end(id).await;
        let log = env.log(id);
        assert_eq!(run.status, RunStatus::Failed, "{run:#?}\n{log}");
        let exit = run.exit.clone().unwrap();
        assert_eq!(
            exit.exit_code,
            Some(7),
            "the container's real exit code: {run:#?}\n{log}"
        );
        // Followed, not given up: a lost attempt would end with an error.
        assert!(exit.error.is_none(), "not lost: {run:#?}\n{log}");
        assert_eq!(run.attempt, 1);
        assert!(!log.contains("lost"), "{log}");
    });
}
