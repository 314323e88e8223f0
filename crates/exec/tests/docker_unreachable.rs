//! A Docker engine that does not answer is the infrastructure's failure, not
//! the job's. Its own test binary: it sets DOCKER_HOST for the whole process.
//! Needs no engine.

mod common;

use std::time::Duration;

use common::*;
use pubrun_core::job::ExecutorSpec;
use pubrun_exec::docker::DockerExecutor;
use pubrun_exec::{Attempt, Executor};

#[tokio::test]
async fn dead_docker_host_is_an_infra_error() {
    // The only test in this binary: nothing else reads the environment now.
    std::env::set_var("DOCKER_HOST", "unix:///nonexistent.sock");
    let ex =
        DockerExecutor::connect().expect("a missing socket is reported per run, not at connect");
    assert_eq!(ex.endpoint(), "unix:///nonexistent.sock");

    let fx = Fixture::new(1 << 20).await;
    let req = fx.request("dead", ExecutorSpec::Docker(docker(TEST_IMAGE, &["true"])));
    let (on_started, started) = started_channel();
    let exit = within(
        "run",
        ex.run(Attempt::new(req.clone(), fx.log.clone()).on_started(on_started)),
    )
    .await;
    assert_eq!(
        exit.cause,
        pubrun_exec::EndCause::Infrastructure,
        "{exit:?}"
    );
    let err = exit.error.clone().unwrap_or_default();
    eprintln!("error: {err}");
    assert!(
        err.starts_with("docker engine unreachable at unix:///nonexistent.sock: "),
        "{err}"
    );
    assert!(started.await.is_err(), "nothing started");

    let found = within(
        "reattach",
        ex.reattach(Attempt::new(req.clone(), fx.log.clone())),
    )
    .await;
    let exit = found.expect("unknown is not 'nothing survived'");
    assert_eq!(
        exit.cause,
        pubrun_exec::EndCause::Infrastructure,
        "{exit:?}"
    );

    // A TCP endpoint where nothing listens: refused, also infrastructure.
    let ex = DockerExecutor::with_host("tcp://127.0.0.1:9").unwrap();
    let mut req = req;
    req.timeout = Duration::from_secs(5);
    let exit = within("run", ex.run(Attempt::new(req, fx.log.clone()))).await;
    assert_eq!(
        exit.cause,
        pubrun_exec::EndCause::Infrastructure,
        "{exit:?}"
    );
    let err = exit.error.unwrap_or_default();
    eprintln!("error: {err}");
    assert!(
        err.starts_with("docker engine unreachable at tcp://127.0.0.1:9: "),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains("refused"),
        "the cause is named: {err}"
    );
}
