//! The Docker executor against the real engine, with the busybox test image
//! built by scripts/docker-test-image.sh and a password-protected registry
//! from scripts/docker-registry.sh. Without an engine these tests print
//! SKIPPED, except under CI=true where they fail.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, RemoveImageOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bollard::Docker;
use common::*;
use futures::StreamExt;
use pubrun_core::job::{DockerSpec, ExecutorSpec, PullPolicy, RegistryAuth};
use pubrun_core::run::RunStatus;
use pubrun_exec::docker::{container_name, DockerExecutor};
use pubrun_exec::{Attempt, Executor, Exit, RunRequest};

fn executor() -> DockerExecutor {
    DockerExecutor::connect().expect("DOCKER_HOST is usable")
}

/// A run id no other test (or earlier test run) uses.
fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn req(fx: &Fixture, name: &str, spec: DockerSpec) -> RunRequest {
    fx.request(&unique(name), ExecutorSpec::Docker(spec))
}

async fn run(fx: &Fixture, req: RunRequest) -> Exit {
    within(
        "docker run",
        executor().run(Attempt::new(req, fx.log.clone())),
    )
    .await
}

/// Containers of this run id and attempt, stopped ones included.
async fn containers_of(
    docker: &Docker,
    run_id: &str,
    attempt: u32,
) -> Vec<bollard::models::ContainerSummary> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("pubrun.run_id={run_id}"),
            format!("pubrun.attempt={attempt}"),
        ],
    )]);
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
}

async fn assert_removed(docker: &Docker, req: &RunRequest) {
    assert!(
        containers_of(docker, &req.run_id, req.attempt)
            .await
            .is_empty(),
        "container of {} was not removed",
        req.run_id
    );
    let name = container_name(&req.run_id, req.attempt);
    assert!(
        docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
            .is_err(),
        "{name} still exists"
    );
}

/// A container that prints `waiting`, then waits for the test to create
/// /workspace/<file>, then runs `then`.
fn wait_for_file(file: &str, then: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo waiting; while [ ! -e /workspace/{file} ]; do sleep 0.1; done; {then}"),
    ]
}

#[tokio::test]
async fn exit_code_logs_env_and_workspace() {
    if !docker_ready("exit_code_logs_env_and_workspace") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    std::fs::write(fx.workdir.join("input.txt"), "from the host\n").unwrap();
    let mut spec = docker(
        TEST_IMAGE,
        &[
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; echo \"FOO=$FOO BOTH=$BOTH RUN=$PUBRUN_RUN_ID\"; cat /workspace/input.txt; \
             echo made > /workspace/output.txt; exit 7",
        ],
    );
    spec.env = BTreeMap::from([("FOO".into(), "a b".into()), ("BOTH".into(), "spec".into())]);
    let mut r = req(&fx, "exit7", spec);
    r.env.insert("BOTH".into(), "request".into());
    let run_id = r.run_id.clone();
    let exit = run(&fx, r.clone()).await;
    assert_eq!(exit.exit_code, Some(7), "{exit:?}\n{}", fx.log_text().await);
    assert!(
        exit.error.is_none()
            && !exit.oom_killed
            && !exit.timed_out()
            && !exit.cause.keeps_attempt(),
        "{exit:?}"
    );
    assert_eq!(exit.status(), RunStatus::Failed);
    let log = fx.log_text().await;
    for line in [
        "to-stdout\n",
        "to-stderr\n",
        &format!("FOO=a b BOTH=request RUN={run_id}\n"),
        "from the host\n",
    ] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    assert_eq!(
        std::fs::read_to_string(fx.workdir.join("output.txt")).unwrap(),
        "made\n"
    );
    assert_removed(&pubrun_testkit::docker_client().await, &r).await;
}

/// Relative paths mean the same as for process jobs: the container starts in
/// `/workspace` (the run's directory) unless the job moves it.
#[tokio::test]
async fn the_working_directory_is_the_workspace_unless_the_job_says_otherwise() {
    if !docker_ready("the_working_directory_is_the_workspace_unless_the_job_says_otherwise") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let spec = docker(
        TEST_IMAGE,
        &[
            "sh",
            "-c",
            "echo \"cwd=$(pwd)\"; mkdir -p out; echo rel > out/result.txt",
        ],
    );
    let exit = run(&fx, req(&fx, "cwd-default", spec)).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}\n{}", fx.log_text().await);
    assert!(
        fx.log_text().await.contains("cwd=/workspace\n"),
        "{}",
        fx.log_text().await
    );
    assert_eq!(
        std::fs::read_to_string(fx.workdir.join("out/result.txt")).unwrap(),
        "rel\n",
        "a relative output path lands in the run's directory"
    );

    let fx = Fixture::new(1 << 20).await;
    std::fs::create_dir_all(fx.workdir.join("sub")).unwrap();
    let mut spec = docker(TEST_IMAGE, &["sh", "-c", "echo \"cwd=$(pwd)\""]);
    spec.working_dir = "sub".into();
    run(&fx, req(&fx, "cwd-sub", spec)).await;
    assert!(
        fx.log_text().await.contains("cwd=/workspace/sub\n"),
        "{}",
        fx.log_text().await
    );

    let fx = Fixture::new(1 << 20).await;
    let mut spec = docker(TEST_IMAGE, &["sh", "-c", "echo \"cwd=$(pwd)\""]);
    spec.working_dir = "image".into();
    run(&fx, req(&fx, "cwd-image", spec)).await;
    assert!(
        fx.log_text().await.contains("cwd=/\n"),
        "the image's WORKDIR: {}",
        fx.log_text().await
    );
}

#[tokio::test]
async fn labels_and_name_while_running_and_removed_after() {
    if !docker_ready("labels_and_name_while_running_and_removed_after") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let ex = executor();
    let r = req(&fx, "labels", docker(TEST_IMAGE, &[]));
    let r = RunRequest {
        spec: ExecutorSpec::Docker(DockerSpec {
            command: wait_for_file("go", "echo released"),
            ..docker(TEST_IMAGE, &[])
        }),
        ..r
    };
    let docker = pubrun_testkit::docker_client().await;
    let (on_started, started) = started_channel();
    let (exit, ()) = tokio::join!(
        within(
            "run",
            ex.run(Attempt::new(r.clone(), fx.log.clone()).on_started(on_started))
        ),
        async {
            let started = started.await.expect("on_started");
            assert_eq!(started.machine, ex.endpoint());
            let found = containers_of(&docker, &r.run_id, 1).await;
            assert_eq!(found.len(), 1, "{found:?}");
            let c = &found[0];
            assert_eq!(
                c.id.as_deref(),
                Some(started.handle.as_str()),
                "handle is the container id"
            );
            assert_eq!(
                c.names.as_deref(),
                Some(&[format!("/pubrun-{}-1", r.run_id)][..])
            );
            let labels = c.labels.clone().unwrap_or_default();
            assert_eq!(labels.get("pubrun.run_id"), Some(&r.run_id));
            assert_eq!(
                labels.get("pubrun.job").map(String::as_str),
                Some("test-job")
            );
            assert_eq!(labels.get("pubrun.attempt").map(String::as_str), Some("1"));
            assert_eq!(
                c.state,
                Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
            );
            // Output reaches the log while the container still runs.
            fx.wait_for_log("waiting\n").await;
            fx.release("go");
        }
    );
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    let log = fx.log_text().await;
    assert!(
        log.contains("waiting\n") && log.contains("released\n"),
        "{log}"
    );
    assert_removed(&docker, &r).await;
}

#[tokio::test]
async fn timeout_stops_the_container_and_its_term_handler_runs() {
    if !docker_ready("timeout_stops_the_container_and_its_term_handler_runs") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let r = req(
        &fx,
        "timeout",
        docker(TEST_IMAGE, &["sh", "-c", TERM_HANDLER]),
    );
    let limit = Duration::from_secs(25);
    timeout_runs_the_term_handler(&fx, &executor(), r.clone(), limit).await;
    assert_removed(&pubrun_testkit::docker_client().await, &r).await;
}

#[tokio::test]
async fn cancel_kills_a_container_that_ignores_sigterm_after_the_grace_period() {
    if !docker_ready("cancel_kills_a_container_that_ignores_sigterm_after_the_grace_period") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    // busybox `sh` as PID 1 (no --init) ignoring SIGTERM: only SIGKILL ends it.
    let mut r = req(
        &fx,
        "cancel",
        docker(
            TEST_IMAGE,
            &["sh", "-c", "trap '' TERM; echo ready; sleep 1000"],
        ),
    );
    r.grace_period = Duration::from_secs(2);
    let (exit, cancelled_at) = run_cancelled(&fx, &executor(), r.clone(), Some("ready")).await;
    let took = cancelled_at.elapsed();
    assert!(exit.cancelled(), "{exit:?}");
    assert_eq!(
        exit.exit_code,
        Some(137),
        "SIGKILL after the grace period: {exit:?}"
    );
    assert!(
        exit.killed_after_grace,
        "the record says it was killed: {exit:?}"
    );
    assert_eq!(exit.status(), RunStatus::Cancelled);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2 + 30),
        "ended {took:?} after the cancel; the grace period is 2s"
    );
    let log = fx.log_text().await;
    assert!(log.contains("grace period and was killed"), "{log}");
    assert_removed(&pubrun_testkit::docker_client().await, &r).await;
}

#[tokio::test]
async fn a_container_that_obeys_sigterm_is_not_reported_killed() {
    if !docker_ready("a_container_that_obeys_sigterm_is_not_reported_killed") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let mut r = req(
        &fx,
        "obeys",
        docker(
            TEST_IMAGE,
            &[
                "sh",
                "-c",
                "trap 'exit 3' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        ),
    );
    r.grace_period = Duration::from_secs(20);
    let (exit, _) = run_cancelled(&fx, &executor(), r, Some("ready")).await;
    assert!(exit.cancelled(), "{exit:?}");
    assert_eq!(exit.exit_code, Some(3), "{exit:?}");
    assert!(!exit.killed_after_grace, "{exit:?}");
}

#[tokio::test]
async fn only_declared_environment_and_masked_secrets_reach_the_container() {
    if !docker_ready("only_declared_environment_and_masked_secrets_reach_the_container") {
        return;
    }
    std::env::set_var("PUBRUN_EXEC_TEST_SERVER_ONLY", "server-only-value");
    let fx = Fixture::new(1 << 20).await;
    let mut spec = docker(
        TEST_IMAGE,
        &[
            "sh",
            "-c",
            r#"env; test "$DB_PASSWORD" = "pa55-w0rd" && echo secret-received"#,
        ],
    );
    spec.env = BTreeMap::from([("MODE".into(), "declared".into())]);
    let mut r = req(&fx, "env", spec);
    r.env
        .insert("HTTP_PROXY".into(), "http://proxy:3128".into());
    r.secrets = pubrun_exec::Secrets(BTreeMap::from([("DB_PASSWORD".into(), "pa55-w0rd".into())]));
    let log = std::sync::Arc::new(
        pubrun_exec::LogSink::create_masking(
            fx.dir.path().join("masked.log"),
            1 << 20,
            r.secrets.values(),
        )
        .await
        .unwrap(),
    );
    let exit = within("run", executor().run(Attempt::new(r.clone(), log.clone()))).await;
    log.flush().await;
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(exit.exit_code, Some(0), "{exit:?}\n{text}");
    assert!(text.contains("secret-received\n"), "{text}");
    assert!(text.contains("DB_PASSWORD=***\n"), "{text}");
    assert!(
        !text.contains("pa55-w0rd") && !text.contains("server-only-value"),
        "{text}"
    );
    for line in ["MODE=declared\n", "HTTP_PROXY=http://proxy:3128\n"] {
        assert!(text.contains(line), "missing {line:?}:\n{text}");
    }
    assert_removed(&pubrun_testkit::docker_client().await, &r).await;
}

#[tokio::test]
async fn out_of_memory_is_reported() {
    if !docker_ready("out_of_memory_is_reported") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    // dd's 64 MiB block buffer is filled by the read: far over the 8 MiB limit.
    let mut spec = docker(
        TEST_IMAGE,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    spec.memory_bytes = Some(8 << 20);
    spec.cpus = Some(0.5);
    let r = req(&fx, "oom", spec);
    let exit = run(&fx, r.clone()).await;
    assert!(exit.oom_killed, "{exit:?}\n{}", fx.log_text().await);
    assert_eq!(exit.exit_code, Some(137), "{exit:?}");
    assert_eq!(exit.status(), RunStatus::Failed);
    assert_removed(&pubrun_testkit::docker_client().await, &r).await;
}

#[tokio::test]
async fn missing_image_is_a_job_error() {
    if !docker_ready("missing_image_is_a_job_error") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let exit = run(
        &fx,
        req(&fx, "never", docker("pubrun-test/not-there:latest", &[])),
    )
    .await;
    let err = exit.error.clone().expect("an error");
    eprintln!("error: {err}");
    assert!(
        err.starts_with("image pubrun-test/not-there:latest: not present"),
        "{err}"
    );
    assert!(err.contains("pull = \"never\""), "{err}");
    assert!(!exit.cause.keeps_attempt());
    assert_eq!(exit.status(), RunStatus::Failed);

    // Nothing listens on 127.0.0.1:9: the pull fails, the engine answered.
    let mut spec = docker("127.0.0.1:9/pubrun/not-there:latest", &[]);
    spec.pull = PullPolicy::IfNotPresent;
    let exit = run(&fx, req(&fx, "ifnotpresent", spec)).await;
    let err = exit.error.clone().expect("an error");
    eprintln!("error: {err}");
    assert!(
        err.starts_with("image 127.0.0.1:9/pubrun/not-there:latest: pull failed: "),
        "{err}"
    );
    assert!(!exit.cause.keeps_attempt(), "{exit:?}");
}

#[tokio::test]
async fn a_bad_command_is_a_job_error() {
    if !docker_ready("a_bad_command_is_a_job_error") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let r = req(&fx, "badcmd", docker(TEST_IMAGE, &["/no/such/program"]));
    let exit = run(&fx, r.clone()).await;
    let err = exit.error.clone().unwrap_or_default();
    eprintln!("error: {err}");
    assert!(
        err.starts_with("cannot start the container from image pubrun-test/busybox:latest"),
        "{exit:?}"
    );
    assert!(!exit.cause.keeps_attempt());
    assert_removed(&pubrun_testkit::docker_client().await, &r).await;
}

/// Registry passwords for the tests, set once, before any pull reads them.
fn registry_env() -> (&'static str, &'static str) {
    static SET: OnceLock<()> = OnceLock::new();
    SET.get_or_init(|| {
        let good = std::env::var("PUBRUN_TEST_REGISTRY_PASSWORD")
            .unwrap_or_else(|_| "pubrun-test-secret".into());
        std::env::set_var("PUBRUN_EXEC_TEST_GOOD_PASSWORD", good);
        std::env::set_var("PUBRUN_EXEC_TEST_BAD_PASSWORD", "not-the-password");
    });
    (
        "PUBRUN_EXEC_TEST_GOOD_PASSWORD",
        "PUBRUN_EXEC_TEST_BAD_PASSWORD",
    )
}

fn registry_spec(port: u16, password_env: &str) -> DockerSpec {
    let user = std::env::var("PUBRUN_TEST_REGISTRY_USER").unwrap_or_else(|_| "pubrun".into());
    DockerSpec {
        image: format!("127.0.0.1:{port}/pubrun/busybox:auth"),
        command: vec!["echo".into(), "from-the-registry".into()],
        pull: PullPolicy::Always,
        auth: Some(RegistryAuth {
            username: user,
            password_env: password_env.into(),
            server: String::new(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn private_registry_pull_with_the_right_password() {
    let Some(port) = registry_port("private_registry_pull_with_the_right_password") else {
        return;
    };
    let (good, _) = registry_env();
    let fx = Fixture::new(1 << 20).await;
    let spec = registry_spec(port, good);
    let image = spec.image.clone();
    let exit = run(&fx, req(&fx, "pull-good", spec)).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}\n{}", fx.log_text().await);
    assert!(fx.log_text().await.contains("from-the-registry\n"));
    // Leave no copy behind: the next run must authenticate again.
    let _ = pubrun_testkit::docker_client()
        .await
        .remove_image(
            &image,
            Some(RemoveImageOptionsBuilder::new().force(true).build()),
            None,
        )
        .await;
}

#[tokio::test]
async fn private_registry_refuses_a_wrong_or_missing_password() {
    let Some(port) = registry_port("private_registry_refuses_a_wrong_or_missing_password") else {
        return;
    };
    let (_, bad) = registry_env();
    let fx = Fixture::new(1 << 20).await;

    let exit = run(&fx, req(&fx, "pull-bad", registry_spec(port, bad))).await;
    let err = exit.error.clone().expect("an error");
    eprintln!("error: {err}");
    let image = format!("127.0.0.1:{port}/pubrun/busybox:auth");
    assert!(
        err.starts_with(&format!("image {image}: pull failed: ")),
        "{err}"
    );
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    assert!(!exit.cause.keeps_attempt(), "{exit:?}");

    let exit = run(
        &fx,
        req(
            &fx,
            "pull-noenv",
            registry_spec(port, "PUBRUN_EXEC_TEST_UNSET_PASSWORD"),
        ),
    )
    .await;
    let err = exit.error.clone().expect("an error");
    eprintln!("error: {err}");
    assert!(
        err.contains("environment variable PUBRUN_EXEC_TEST_UNSET_PASSWORD, which is not set"),
        "{err}"
    );
    assert!(!exit.cause.keeps_attempt());

    let mut anonymous = registry_spec(port, bad);
    anonymous.auth = None;
    let exit = run(&fx, req(&fx, "pull-anon", anonymous)).await;
    let err = exit.error.clone().expect("an error");
    eprintln!("error: {err}");
    assert!(
        err.starts_with(&format!("image {image}: pull failed: ")),
        "{err}"
    );
}

/// Starts a run in a task, waits until it is running, then aborts the task
/// as a crash of the server would end it: the container keeps running.
async fn start_and_crash(fx: &Fixture, r: RunRequest) -> pubrun_exec::Started {
    let (on_started, started) = started_channel();
    let log = fx.log.clone();
    let task = tokio::spawn(async move {
        executor()
            .run(Attempt::new(r, log).on_started(on_started))
            .await
    });
    let started = within("start", started).await.expect("on_started");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    started
}

#[tokio::test]
async fn reattach_follows_a_running_container_to_its_end() {
    if !docker_ready("reattach_follows_a_running_container_to_its_end") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let mut r = req(&fx, "reattach-running", docker(TEST_IMAGE, &[]));
    r.spec = ExecutorSpec::Docker(DockerSpec {
        command: wait_for_file("go", "echo after-reattach; exit 5"),
        ..docker(TEST_IMAGE, &[])
    });
    let started = start_and_crash(&fx, r.clone()).await;
    let docker = pubrun_testkit::docker_client().await;
    let state = docker
        .inspect_container(&started.handle, None::<InspectContainerOptions>)
        .await
        .unwrap()
        .state
        .unwrap();
    assert_eq!(
        state.running,
        Some(true),
        "the container outlives the dropped run"
    );

    let ex = executor();
    let (found, ()) = tokio::join!(
        within(
            "reattach",
            ex.reattach(Attempt::new(r.clone(), fx.log.clone()))
        ),
        async {
            fx.wait_for_log("reattached to running container").await;
            fx.release("go");
        }
    );
    let exit = found.expect("the running container is found");
    assert_eq!(exit.exit_code, Some(5), "{exit:?}\n{}", fx.log_text().await);
    assert!(
        fx.log_text().await.contains("after-reattach\n"),
        "{}",
        fx.log_text().await
    );
    assert_removed(&docker, &r).await;
}

#[tokio::test]
async fn reattach_collects_a_container_that_ended_meanwhile() {
    if !docker_ready("reattach_collects_a_container_that_ended_meanwhile") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let mut r = req(&fx, "reattach-exited", docker(TEST_IMAGE, &[]));
    r.spec = ExecutorSpec::Docker(DockerSpec {
        command: wait_for_file("go", "echo ended-alone; exit 4"),
        ..docker(TEST_IMAGE, &[])
    });
    let started = start_and_crash(&fx, r.clone()).await;
    let docker = pubrun_testkit::docker_client().await;
    let mut wait = docker.wait_container(
        &started.handle,
        Some(
            WaitContainerOptionsBuilder::new()
                .condition("not-running")
                .build(),
        ),
    );
    fx.release("go");
    within("container end", wait.next()).await;

    let fresh = Fixture::new(1 << 20).await; // the restarted server's log
    let exit = within(
        "reattach",
        executor().reattach(Attempt::new(r.clone(), fresh.log.clone())),
    )
    .await
    .expect("the exited container is found");
    assert_eq!(exit.exit_code, Some(4), "{exit:?}");
    assert!(!exit.timed_out() && !exit.cancelled() && exit.error.is_none());
    assert!(
        fresh.log_text().await.contains("ended-alone\n"),
        "{}",
        fresh.log_text().await
    );
    assert_removed(&docker, &r).await;

    // Nothing left: nothing to reattach to.
    let none = executor()
        .reattach(Attempt::new(r.clone(), fresh.log.clone()))
        .await;
    assert!(none.is_none(), "{none:?}");
}

#[tokio::test]
async fn a_stale_container_of_the_same_attempt_is_replaced() {
    if !docker_ready("a_stale_container_of_the_same_attempt_is_replaced") {
        return;
    }
    let fx = Fixture::new(1 << 20).await;
    let r = req(
        &fx,
        "stale",
        docker(TEST_IMAGE, &["sh", "-c", "echo second-try"]),
    );
    // A container left by an earlier try of this attempt (created, never started).
    let docker = pubrun_testkit::docker_client().await;
    let body = bollard::models::ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        cmd: Some(vec!["true".into()]),
        ..Default::default()
    };
    let name = container_name(&r.run_id, r.attempt);
    docker
        .create_container(
            Some(
                bollard::query_parameters::CreateContainerOptionsBuilder::new()
                    .name(&name)
                    .build(),
            ),
            body,
        )
        .await
        .unwrap();
    let exit = run(&fx, r.clone()).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}\n{}", fx.log_text().await);
    assert!(fx.log_text().await.contains("second-try\n"));
    assert_removed(&docker, &r).await;
}
