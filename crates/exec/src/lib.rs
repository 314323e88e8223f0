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
pub use pubrun_core::run::Exit;
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
    /// Extra environment (PUBRUN_RUN_ID, PUBRUN_JOB, PUBRUN_ATTEMPT, …).
    pub env: BTreeMap<String, String>,
    /// Directories (relative to `workdir`) the job's outputs come from. A
    /// remote executor brings them back into `workdir` before it returns.
    pub outputs: Vec<String>,
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

#[async_trait::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs the attempt to its end. Cancelling `cancel` stops it like a
    /// timeout does (graceful, then forced) and yields `cancelled = true`.
    async fn run(
        &self,
        req: RunRequest,
        log: Arc<LogSink>,
        cancel: CancellationToken,
        on_started: OnStarted,
    ) -> Exit;

    /// After a server restart: if the attempt is still known to the engine
    /// (a container with label `pubrun.run_id`), follow it to its end and
    /// return how it ended. `None` when nothing survived (a lost process).
    async fn reattach(
        &self,
        req: RunRequest,
        log: Arc<LogSink>,
        cancel: CancellationToken,
    ) -> Option<Exit>;
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
    async fn run(
        &self,
        _req: RunRequest,
        log: Arc<LogSink>,
        _cancel: CancellationToken,
        _on_started: OnStarted,
    ) -> Exit {
        log.note(&self.0).await;
        Exit {
            error: Some(self.0.clone()),
            infra_error: true,
            ..Default::default()
        }
    }

    async fn reattach(
        &self,
        _req: RunRequest,
        _log: Arc<LogSink>,
        _cancel: CancellationToken,
    ) -> Option<Exit> {
        None
    }
}
