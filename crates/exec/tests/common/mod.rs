//! Shared helpers for the executor tests: requests in a temporary run
//! directory, a log sink next to it, and waiting for conditions by polling
//! (never sleeping to synchronise).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pubrun_core::job::{DockerSpec, ExecutorSpec, ProcessSpec};
use pubrun_core::run::RunStatus;
use pubrun_exec::{
    Attempt, CancellationToken, Executor, Exit, LogSink, OnStarted, RunRequest, Started,
};
use pubrun_testkit::run_script;
use tokio::sync::oneshot;

/// How long any awaited event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub workdir: PathBuf,
    pub log: Arc<LogSink>,
}

impl Fixture {
    pub async fn new(log_limit: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().join("work");
        std::fs::create_dir(&workdir).unwrap();
        let log = Arc::new(
            LogSink::create(dir.path().join("run.log"), log_limit)
                .await
                .unwrap(),
        );
        Fixture { dir, workdir, log }
    }

    pub fn request(&self, run_id: &str, spec: ExecutorSpec) -> RunRequest {
        RunRequest {
            run_id: run_id.to_string(),
            job: "test-job".to_string(),
            attempt: 1,
            spec,
            workdir: self.workdir.clone(),
            timeout: Duration::from_secs(60),
            grace_period: Duration::from_secs(10),
            env: BTreeMap::from([("PUBRUN_RUN_ID".to_string(), run_id.to_string())]),
            outputs: Vec::new(),
            secrets: Default::default(),
        }
    }

    /// The log as written so far.
    pub async fn log_text(&self) -> String {
        self.log.flush().await;
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Polls the log until it contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let start = Instant::now();
        loop {
            if self.log_text().await.contains(needle) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "log never showed {needle:?}; it has:\n{}",
                self.log_text().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates `name` in the run directory (the signal a test container or
    /// process waits for).
    pub fn release(&self, name: &str) {
        std::fs::write(self.workdir.join(name), b"go").unwrap();
    }
}

pub fn process(command: &str, args: &[&str]) -> ExecutorSpec {
    ExecutorSpec::Process(ProcessSpec {
        command: command.to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

pub fn sh(script: &str) -> ExecutorSpec {
    process("sh", &["-c", script])
}

pub fn docker(image: &str, command: &[&str]) -> DockerSpec {
    DockerSpec {
        image: image.to_string(),
        command: command.iter().map(|s| s.to_string()).collect(),
        pull: pubrun_core::job::PullPolicy::Never,
        ..Default::default()
    }
}

/// An `OnStarted` that reports through a channel.
pub fn started_channel() -> (OnStarted, oneshot::Receiver<Started>) {
    let (tx, rx) = oneshot::channel();
    (Box::new(move |s| drop(tx.send(s))), rx)
}

/// Runs `req` on `ex` and cancels it once it has started and, with
/// `after_log`, once its log shows that text; returns how it ended and when
/// the cancel went out.
pub async fn run_cancelled(
    fx: &Fixture,
    ex: &impl Executor,
    req: RunRequest,
    after_log: Option<&str>,
) -> (Exit, Instant) {
    let cancel = CancellationToken::new();
    let (on_started, started) = started_channel();
    let attempt = Attempt::new(req, fx.log.clone())
        .cancel(cancel.clone())
        .on_started(on_started);
    let (exit, cancelled_at) = tokio::join!(within("run", ex.run(attempt)), async {
        started.await.expect("on_started");
        if let Some(text) = after_log {
            fx.wait_for_log(text).await;
        }
        cancel.cancel();
        Instant::now()
    });
    (exit, cancelled_at)
}

/// A job that says `ready`, then waits; on SIGTERM it says `bye` and exits 0.
pub const TERM_HANDLER: &str = r#"trap "echo bye; exit 0" TERM; echo ready; sleep 60 & wait"#;

/// Runs `req` (a [`TERM_HANDLER`] job) with a 2 s timeout and a 30 s grace
/// period on `ex`, and checks what every executor promises: the
/// timeout's SIGTERM reached the handler, which ended the run (exit 0) in
/// less than `limit`, well within the grace period. Returns the log.
pub async fn timeout_runs_the_term_handler(
    fx: &Fixture,
    ex: &impl Executor,
    mut req: RunRequest,
    limit: Duration,
) -> String {
    req.timeout = Duration::from_secs(2);
    req.grace_period = Duration::from_secs(30);
    let t0 = Instant::now();
    let exit = within("run", ex.run(Attempt::new(req, fx.log.clone()))).await;
    assert!(exit.timed_out(), "{exit:?}");
    assert_eq!(
        exit.exit_code,
        Some(0),
        "the TERM handler's exit code: {exit:?}\n{}",
        fx.log_text().await
    );
    assert_eq!(exit.status(), RunStatus::TimedOut);
    assert!(
        t0.elapsed() < limit,
        "ended by the handler, not the grace period: {:?}",
        t0.elapsed()
    );
    let log = fx.log_text().await;
    assert!(log.contains("ready\n") && log.contains("bye\n"), "{log}");
    log
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    pubrun_testkit::within(what, WAIT, f).await
}

pub const TEST_IMAGE: &str = "pubrun-test/busybox:latest";

/// Whether the Docker tests can run: an engine answers (else SKIPPED, a
/// failure under `CI=true`) and the test image is built (else a failure).
pub fn docker_ready(test: &str) -> bool {
    if !pubrun_testkit::require_docker(test) {
        return false;
    }
    static IMAGE: OnceLock<Result<(), String>> = OnceLock::new();
    match IMAGE.get_or_init(|| run_script("docker-test-image.sh", &[]).map(|_| ())) {
        Ok(()) => true,
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The port of the password-protected test registry (scripts/docker-registry.sh).
pub fn registry_port(test: &str) -> Option<u16> {
    if !docker_ready(test) {
        return None;
    }
    static PORT: OnceLock<Result<u16, String>> = OnceLock::new();
    let port = PORT.get_or_init(|| {
        let out = run_script("docker-registry.sh", &[])?;
        let last = out.lines().last().unwrap_or_default();
        last.parse::<u16>()
            .map_err(|e| format!("docker-registry.sh printed {out:?}, not a port: {e}"))
    });
    match port {
        Ok(p) => Some(*p),
        Err(e) => panic!("{test}: {e}"),
    }
}
