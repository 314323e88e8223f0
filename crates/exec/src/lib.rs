//! Executors: how one attempt of a run is carried out.
//!
//! [`Executor`] is the seam: the dispatcher hands it a fully rendered
//! [`RunRequest`] and gets back an [`Exit`]. Executors never touch the broker
//! or the run store — they do not ack, retry or publish; they run one thing,
//! stream its output into a [`LogSink`], enforce the timeout (SIGTERM, grace
//! period, SIGKILL / `docker stop`) and report how it ended.

pub mod docker;
pub mod log;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use log::LogSink;
use pubrun_core::job::ExecutorSpec;
pub use pubrun_core::run::{EndCause, Exit};
pub use tokio_util::sync::CancellationToken;

/// One attempt, with every template already rendered.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub run_id: String,
    pub job: String,
    pub attempt: u32,
    pub spec: ExecutorSpec,
    /// Per-run directory on the server's disk; it exists. Processes start
    /// here unless the spec names a working dir; containers get it mounted
    /// at `/workspace`.
    pub workdir: PathBuf,
    pub timeout: Duration,
    pub grace_period: Duration,
    /// Extra environment: the run variables (PUBRUN_RUN_ID, PUBRUN_JOB,
    /// PUBRUN_ATTEMPT, …) and the job's `pass_env` values, read from the
    /// server's environment by the dispatcher.
    pub env: BTreeMap<String, String>,
    /// The job's secrets (values from the server's environment). They join
    /// the environment like `env` and are masked in the run's log.
    pub secrets: Secrets,
    /// Directories (relative to `workdir`) the job's outputs come from. A
    /// remote executor brings them back into `workdir` before it returns.
    pub outputs: Vec<String>,
}

/// Values of a job's secrets by variable name. `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

impl Secrets {
    /// The values to mask (non-empty ones).
    pub fn values(&self) -> Vec<String> {
        self.0.values().filter(|v| !v.is_empty()).cloned().collect()
    }

    /// `s` with every secret value replaced by [`log::MASK`].
    pub fn mask(&self, s: &str) -> String {
        let m = log::Masker::new(self.values());
        String::from_utf8_lossy(&m.mask_all(s.as_bytes())).into_owned()
    }
}

/// `PATH` of a process job when the executing process has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The base environment of a process job, from the executing process (the
/// server, or the agent on a pool machine): `PATH` (default
/// [`DEFAULT_PATH`]), `HOME` (the run's directory when unset), `LANG` and
/// `TZ` when set. Nothing else of that process's environment — tokens,
/// webhook secrets — reaches a job.
pub fn base_env(workdir: &std::path::Path) -> BTreeMap<String, String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".into(),
        var("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
    );
    env.insert(
        "HOME".into(),
        var("HOME").unwrap_or_else(|| workdir.display().to_string()),
    );
    for k in ["LANG", "TZ"] {
        if let Some(v) = var(k) {
            env.insert(k.into(), v);
        }
    }
    env
}

/// A job's environment on top of `base`: the declared `env`, then the
/// request's `env` (run variables, `pass_env`), then the secrets. Names in
/// the last three are disjoint (checked at apply), so only `base` is ever
/// overridden.
pub fn job_env(
    base: BTreeMap<String, String>,
    declared: &BTreeMap<String, String>,
    req: &RunRequest,
) -> BTreeMap<String, String> {
    let mut env = base;
    for (k, v) in declared.iter().chain(&req.env).chain(&req.secrets.0) {
        env.insert(k.clone(), v.clone());
    }
    env
}

/// Where an attempt is running, reported once it has started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Started {
    /// Host (or Docker endpoint) it runs on.
    pub machine: String,
    /// pid or container id.
    pub handle: String,
}

/// Called once when the process or container is running.
pub type OnStarted = Box<dyn FnOnce(Started) + Send>;

/// One attempt handed to an executor: what to run, where its output goes,
/// what stops it, and whom to tell once it is running.
pub struct Attempt {
    pub req: RunRequest,
    pub log: Arc<LogSink>,
    /// Cancelling it stops the attempt like a timeout does (graceful, then
    /// forced) and yields `cancelled = true`.
    pub cancel: CancellationToken,
    pub on_started: OnStarted,
}

impl Attempt {
    /// An attempt nobody cancels and nobody waits to see start.
    pub fn new(req: RunRequest, log: Arc<LogSink>) -> Self {
        Attempt {
            req,
            log,
            cancel: CancellationToken::new(),
            on_started: Box::new(|_| {}),
        }
    }

    pub fn cancel(self, cancel: CancellationToken) -> Self {
        Attempt { cancel, ..self }
    }

    pub fn on_started(self, on_started: OnStarted) -> Self {
        Attempt { on_started, ..self }
    }
}

#[async_trait::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs the attempt to its end.
    async fn run(&self, attempt: Attempt) -> Exit;

    /// After a server restart: if the attempt is still known to the engine
    /// (a container with label `pubrun.run_id`), follow it to its end and
    /// return how it ended. `None` when nothing survived (a lost process).
    ///
    /// The attempt is the one that was running: its request, a log that
    /// continues the attempt's log, and what stops it. It has started long
    /// ago, so its `on_started` is not called.
    ///
    /// The default: nothing survives a restart (a child process dies with
    /// the server that started it).
    async fn reattach(&self, attempt: Attempt) -> Option<Exit> {
        let _ = attempt;
        None
    }
}

/// Waits until a running attempt must be stopped: its time limit passed (a
/// zero timeout never does) or it was cancelled. Returns the attempt's
/// cause (`TimedOut`, `Cancelled`) and the words its log note starts with.
pub async fn stop_cause(timeout: Duration, cancel: &CancellationToken) -> (EndCause, String) {
    let limit = async {
        if timeout.is_zero() {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(timeout).await
        }
    };
    tokio::select! {
        _ = limit => (EndCause::TimedOut, format!("timed out after {}s", timeout.as_secs_f64())),
        _ = cancel.cancelled() => (EndCause::Cancelled, "cancelled".to_string()),
    }
}

/// Executors of the pools other than `local`, by pool name. The dispatcher
/// sends a run of a job with `pool = "P"` to `executor("P")`; it does not
/// know about agents or machines.
pub trait PoolRouter: Send + Sync + 'static {
    fn executor(&self, pool: &str) -> Option<Arc<dyn Executor>>;
}

/// Stands in for an executor that cannot work here (no Docker engine at
/// start, an undeclared pool): every attempt ends with an infrastructure
/// error, so the run waits and is tried again without using up attempts.
pub struct Unavailable(pub String);

#[async_trait::async_trait]
impl Executor for Unavailable {
    async fn run(&self, attempt: Attempt) -> Exit {
        attempt.log.note(&self.0).await;
        Exit::failed(EndCause::Infrastructure, self.0.clone())
    }
}

/// Runs blocking file-system work on tokio's blocking pool. A panic in it
/// becomes an I/O error, so callers handle one error, not two.
pub async fn blocking_io<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}
