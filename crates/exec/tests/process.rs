//! The process executor against real child processes (`/bin/sh`).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use pubrun_core::job::{DockerSpec, ExecutorSpec, ProcessSpec};
use pubrun_core::run::RunStatus;
use pubrun_exec::process::ProcessExecutor;
use pubrun_exec::{Attempt, CancellationToken, Executor, LogSink, Secrets};

async fn run(fx: &Fixture, req: pubrun_exec::RunRequest) -> pubrun_exec::Exit {
    within(
        "run",
        ProcessExecutor::new().run(Attempt::new(req, fx.log.clone())),
    )
    .await
}

#[tokio::test]
async fn exit_codes_are_reported() {
    let fx = Fixture::new(1 << 20).await;
    let ok = run(&fx, fx.request("r1", process("true", &[]))).await;
    assert_eq!(ok.exit_code, Some(0), "{ok:?}");
    assert_eq!(ok.signal, None);
    assert_eq!(ok.status(), RunStatus::Succeeded);

    let three = run(&fx, fx.request("r2", sh("exit 3"))).await;
    assert_eq!(three.exit_code, Some(3), "{three:?}");
    assert!(three.error.is_none() && !three.timed_out() && !three.cancelled());
    assert_eq!(three.status(), RunStatus::Failed);
}

#[tokio::test]
async fn stdout_and_stderr_are_both_captured() {
    let fx = Fixture::new(1 << 20).await;
    let script =
        "for i in 1 2 3; do echo out-$i; echo err-$i >&2; done; seq 1 2000 | sed 's/^/line-/'";
    let exit = run(&fx, fx.request("r", sh(script))).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    let log = fx.log_text().await;
    for i in 1..=3 {
        assert!(
            log.contains(&format!("out-{i}\n")),
            "stdout line {i} missing:\n{log}"
        );
        assert!(
            log.contains(&format!("err-{i}\n")),
            "stderr line {i} missing:\n{log}"
        );
    }
    for i in 1..=2000 {
        assert!(log.contains(&format!("line-{i}\n")), "line-{i} missing");
    }
}

#[tokio::test]
async fn output_is_streamed_while_the_process_runs() {
    let fx = Fixture::new(1 << 20).await;
    // Prints, then waits for the test to create `go`: the line must reach
    // the log before the process can end.
    let script = "echo early-line; while [ ! -e go ]; do sleep 0.05; done; echo late-line";
    let ex = ProcessExecutor::new();
    let req = fx.request("r", sh(script));
    let (exit, ()) = tokio::join!(
        within("run", ex.run(Attempt::new(req, fx.log.clone()))),
        async {
            fx.wait_for_log("early-line").await;
            assert!(!fx.log_text().await.contains("late-line"));
            fx.release("go");
        }
    );
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert!(fx.log_text().await.contains("late-line"));
}

#[tokio::test]
async fn args_env_and_working_directory_reach_the_process() {
    let fx = Fixture::new(1 << 20).await;
    std::fs::create_dir(fx.workdir.join("sub")).unwrap();
    let spec = ExecutorSpec::Process(ProcessSpec {
        command: "sh".into(),
        args: vec![
            "-c".into(),
            r#"printf '[%s]' "$@"; echo; echo "FROM_SPEC=$FROM_SPEC BOTH=$BOTH RUN=$PUBRUN_RUN_ID PATH_SET=${PATH:+yes}"; pwd"#.into(),
            "argv0".into(),
            "two words".into(),
            "{{ not-a-template }}".into(),
        ],
        env: BTreeMap::from([("FROM_SPEC".into(), "s p e c".into()), ("BOTH".into(), "spec".into())]),
        working_dir: "sub".into(),
    });
    let mut req = fx.request("run-42", spec);
    req.env.insert("BOTH".into(), "request".into());
    let exit = run(&fx, req).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    let log = fx.log_text().await;
    assert!(log.contains("[two words][{{ not-a-template }}]\n"), "{log}");
    assert!(
        log.contains("FROM_SPEC=s p e c BOTH=request RUN=run-42 PATH_SET=yes\n"),
        "{log}"
    );
    let sub = fx.workdir.join("sub").canonicalize().unwrap();
    assert!(
        log.contains(&format!("{}\n", sub.display())),
        "cwd should be {}:\n{log}",
        sub.display()
    );

    // Without working_dir the run directory is the cwd.
    let fx2 = Fixture::new(1 << 20).await;
    let exit = run(&fx2, fx2.request("r", sh("pwd"))).await;
    assert_eq!(exit.exit_code, Some(0));
    let wd = fx2.workdir.canonicalize().unwrap();
    assert!(fx2
        .log_text()
        .await
        .contains(&format!("{}\n", wd.display())));
}

/// Names a job may see: the base, what the request declares, and what
/// `sh` itself sets.
fn assert_only_declared_names(log: &str, declared: &[&str]) {
    let allowed: Vec<&str> = ["PATH", "HOME", "LANG", "TZ", "PWD", "SHLVL", "_", "OLDPWD"]
        .into_iter()
        .chain(declared.iter().copied())
        .collect();
    for line in log.lines().filter(|l| !l.starts_with("[pubrun]")) {
        if let Some((name, _)) = line.split_once('=') {
            assert!(
                allowed.contains(&name),
                "{name} leaked into the job:\n{log}"
            );
        }
    }
}

#[tokio::test]
async fn the_environment_is_clean_and_secrets_are_masked() {
    // A variable of the executing process (the server, an agent) that no
    // job may see; before the fix every job inherited it.
    std::env::set_var("PUBRUN_EXEC_TEST_SERVER_ONLY", "server-only-value");
    let fx = Fixture::new(1 << 20).await;
    let mut spec = sh(r#"env; test "$DB_PASSWORD" = "pa55-w0rd" && echo secret-received"#);
    if let ExecutorSpec::Process(p) = &mut spec {
        p.env.insert("MODE".into(), "declared".into());
    }
    let mut req = fx.request("run-7", spec);
    req.env
        .insert("HTTP_PROXY".into(), "http://proxy:3128".into());
    req.secrets = Secrets(BTreeMap::from([("DB_PASSWORD".into(), "pa55-w0rd".into())]));
    let log = std::sync::Arc::new(
        LogSink::create_masking(
            fx.dir.path().join("masked.log"),
            1 << 20,
            req.secrets.values(),
        )
        .await
        .unwrap(),
    );
    let exit = within(
        "run",
        ProcessExecutor::new().run(Attempt::new(req, log.clone())),
    )
    .await;
    log.flush().await;
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(exit.exit_code, Some(0), "{exit:?}\n{text}");
    assert!(
        text.contains("secret-received\n"),
        "the job got its secret:\n{text}"
    );
    assert!(text.contains("DB_PASSWORD=***\n"), "{text}");
    assert!(!text.contains("pa55-w0rd"), "{text}");
    assert!(!text.contains("server-only-value"), "{text}");
    for line in [
        "MODE=declared\n",
        "HTTP_PROXY=http://proxy:3128\n",
        "PUBRUN_RUN_ID=run-7\n",
    ] {
        assert!(text.contains(line), "missing {line:?}:\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("PATH=")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("HOME=")), "{text}");
    assert_only_declared_names(
        &text,
        &["MODE", "HTTP_PROXY", "PUBRUN_RUN_ID", "DB_PASSWORD"],
    );
}

#[tokio::test]
async fn on_started_reports_host_and_pid() {
    let fx = Fixture::new(1 << 20).await;
    let (on_started, rx) = started_channel();
    let exit = within(
        "run",
        ProcessExecutor::new().run(
            Attempt::new(fx.request("r", sh("echo pid=$$")), fx.log.clone()).on_started(on_started),
        ),
    )
    .await;
    assert_eq!(exit.exit_code, Some(0));
    let started = rx.await.expect("on_started was not called");
    assert!(!started.machine.is_empty());
    assert!(
        fx.log_text()
            .await
            .contains(&format!("pid={}\n", started.handle)),
        "handle {:?} is not the pid",
        started.handle
    );
}

#[tokio::test]
async fn timeout_sends_sigterm_to_the_group_and_a_handler_can_finish() {
    let fx = Fixture::new(1 << 20).await;
    let req = fx.request("r", sh(TERM_HANDLER));
    let limit = Duration::from_secs(20);
    let log = timeout_runs_the_term_handler(&fx, &ProcessExecutor::new(), req, limit).await;
    assert!(
        log.contains("timed out"),
        "a note says why it ended:\n{log}"
    );
}

#[tokio::test]
async fn sigterm_ignored_means_sigkill_after_the_grace_period() {
    let fx = Fixture::new(1 << 20).await;
    let mut req = fx.request("r", sh(r#"trap "" TERM; echo ready; sleep 60 & wait"#));
    req.timeout = Duration::from_secs(1);
    req.grace_period = Duration::from_secs(1);
    let t0 = Instant::now();
    let exit = run(&fx, req).await;
    assert!(exit.timed_out(), "{exit:?}");
    assert!(exit.killed_after_grace, "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert_eq!(exit.exit_code, None);
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "SIGKILL only after the grace period"
    );
    assert!(fx.log_text().await.contains("SIGKILL"));
}

#[tokio::test]
async fn cancel_stops_the_process() {
    let fx = Fixture::new(1 << 20).await;
    let req = fx.request("r", process("sleep", &["60"]));
    let (exit, _) = run_cancelled(&fx, &ProcessExecutor::new(), req, None).await;
    assert!(exit.cancelled(), "{exit:?}");
    assert!(!exit.timed_out());
    assert!(!exit.killed_after_grace, "SIGTERM was enough: {exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGTERM), "{exit:?}");
    assert_eq!(exit.status(), RunStatus::Cancelled);
}

#[tokio::test]
async fn already_cancelled_never_starts() {
    let fx = Fixture::new(1 << 20).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (on_started, started) = started_channel();
    let exit = ProcessExecutor::new()
        .run(
            Attempt::new(fx.request("r", sh("touch ran")), fx.log.clone())
                .cancel(cancel)
                .on_started(on_started),
        )
        .await;
    assert!(exit.cancelled());
    assert!(started.await.is_err(), "on_started must not be called");
    assert!(!fx.workdir.join("ran").exists());
}

#[tokio::test]
async fn a_missing_or_unexecutable_command_is_a_clear_error() {
    let fx = Fixture::new(1 << 20).await;
    let exit = run(&fx, fx.request("r", process("pubrun-no-such-command", &[]))).await;
    let err = exit.error.clone().expect("an error");
    assert!(
        err.starts_with("cannot start `pubrun-no-such-command`: No such file or directory"),
        "{err}"
    );
    assert_eq!(exit.exit_code, None);
    assert!(!exit.cause.keeps_attempt());
    assert_eq!(exit.status(), RunStatus::Failed);

    let script = fx.workdir.join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let exit = run(&fx, fx.request("r", process(script.to_str().unwrap(), &[]))).await;
    let err = exit.error.expect("an error");
    assert!(
        err.contains("cannot start") && err.contains("Permission denied"),
        "{err}"
    );

    let mut spec = ProcessSpec {
        command: "true".into(),
        ..Default::default()
    };
    spec.working_dir = "/nonexistent/dir".into();
    let exit = run(&fx, fx.request("r", ExecutorSpec::Process(spec))).await;
    let err = exit.error.expect("an error");
    assert!(
        err.contains("working directory /nonexistent/dir does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn log_limit_truncates_and_marks() {
    let fx = Fixture::new(100).await;
    let exit = run(
        &fx,
        fx.request(
            "r",
            sh("head -c 1000 /dev/zero | tr '\\0' x; echo; echo tail-end >&2"),
        ),
    )
    .await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    let log = fx.log_text().await;
    assert!(log.starts_with(&"x".repeat(100)), "{log}");
    assert!(
        !log.contains(&"x".repeat(101)),
        "more than the limit was kept"
    );
    assert!(log.contains("log limit reached"), "{log}");
    assert!(!log.contains("tail-end"));
    assert_eq!(
        fx.log.dropped().await,
        1000 + 1 + "tail-end\n".len() as u64 - 100
    );
}

#[tokio::test]
async fn background_leftovers_do_not_hold_the_run() {
    let fx = Fixture::new(1 << 20).await;
    let t0 = Instant::now();
    let exit = run(&fx, fx.request("r", sh("sleep 60 & echo main-done"))).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "waited for the background sleep: {:?}",
        t0.elapsed()
    );
    assert!(fx.log_text().await.contains("main-done"));
}

#[tokio::test]
async fn docker_spec_is_refused_and_nothing_is_reattached() {
    let fx = Fixture::new(1 << 20).await;
    let exit = run(
        &fx,
        fx.request(
            "r",
            ExecutorSpec::Docker(DockerSpec {
                image: "x".into(),
                ..Default::default()
            }),
        ),
    )
    .await;
    assert!(exit.error.unwrap().contains("cannot run a docker job"));
    let found = ProcessExecutor::new()
        .reattach(Attempt::new(fx.request("r", sh("true")), fx.log.clone()))
        .await;
    assert!(found.is_none());
}
