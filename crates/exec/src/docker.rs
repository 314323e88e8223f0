//! Runs an attempt as a container through the Docker Engine API (bollard).
//!
//! One attempt is one container named `pubrun-<run_id>-<attempt>` and
//! labelled `pubrun.run_id`, `pubrun.job` and `pubrun.attempt`, so a restarted
//! server finds it again ([`Executor::reattach`]).
//!
//! What the container gets:
//! * the image's entrypoint, with `spec.command` as its cmd when non-empty;
//! * `spec.env`, `req.env` (run variables, `pass_env`) and `req.secrets`
//!   as `KEY=VALUE` ([`crate::job_env`] without a base): nothing of the
//!   server's own environment reaches the container;
//! * the run's directory bound at `/workspace`, and `spec.mounts` as binds (a
//!   relative host path is taken relative to the run's directory);
//! * `memory_bytes` as the memory limit *and* the memory+swap limit, so the
//!   limit cannot be dodged by swapping; `cpus` as nano-CPUs; `network` as
//!   the network mode when set; `grace_period` as its stop timeout.
//! * The working directory is `/workspace`, where inputs are and outputs are
//!   collected, so relative paths mean the same for process and docker jobs;
//!   `working_dir` moves it (relative to `/workspace`, or absolute), and
//!   `working_dir = "image"` keeps the image's own `WORKDIR` for images that
//!   run `python app.py` from it.
//!
//! Exit codes are Docker's: a container killed by SIGKILL (timeout after the
//! grace period, OOM) ends with 137; `Exit::signal` stays `None` because
//! 128+n is only a convention. `oom_killed` comes from `State.OOMKilled`.
//!
//! Timeout and cancel: `docker stop -t GRACE` (SIGTERM, or the image's stop
//! signal, then SIGKILL after GRACE); if the container still runs after
//! that request (it failed or the engine did not kill), `docker kill`. The
//! attempt ends only when the container has really exited, and
//! `Exit::killed_after_grace` says whether SIGKILL was needed.
//!
//! Errors: anything Docker answers (image missing, pull refused, bad
//! command) is the job's error; no answer at all (socket missing, connection
//! refused, request timed out) is `EndCause::Infrastructure` with "docker engine
//! unreachable at …", so the run waits and tries the same attempt again.
//!
//! The connection is made lazily: [`DockerExecutor::connect`] only checks
//! that `DOCKER_HOST` is a usable address, and each run connects (and
//! negotiates the API version) until the engine answers once. A server
//! started while the engine is down therefore runs docker jobs once it
//! comes up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use pubrun_core::job::{DockerSpec, ExecutorSpec, PullPolicy};
use tokio::sync::OnceCell;

use crate::{
    stop_cause, Attempt, CancellationToken, EndCause, Executor, Exit, LogSink, OnStarted,
    RunRequest, Started,
};

/// Where Docker listens when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// How long the log stream may take to end after the container stopped.
const LOG_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Ordinary requests; a pull's progress stream answers quickly too.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub struct DockerExecutor {
    engine: Engine,
}

/// A Docker engine by address, its client made on first use: what the
/// docker executor and the docker machine provider (crate `pools`) share.
pub struct Engine {
    endpoint: String,
    timeout: Duration,
    client: OnceCell<Docker>,
}

/// Why a request to the engine failed.
#[derive(Debug)]
pub enum EngineError {
    /// No answer (or none that told its API version): try again later.
    Unreachable(String),
    /// The engine answered no.
    Refused(String),
}

impl Engine {
    /// Requests time out after `timeout`. Fails only for an address bollard
    /// cannot use (unknown scheme); an engine that is not running is found
    /// out per request.
    pub fn new(host: &str, timeout: Duration) -> Result<Self, String> {
        match Docker::connect_with_host(host) {
            Ok(_) | Err(DockerError::SocketNotFoundError(_)) => Ok(Engine {
                endpoint: host.to_string(),
                timeout,
                client: OnceCell::new(),
            }),
            Err(e) => Err(format!("cannot use docker host {host}: {}", chain(&e))),
        }
    }

    /// The engine's address.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn unreachable(&self, e: &DockerError) -> EngineError {
        EngineError::Unreachable(format!(
            "docker engine unreachable at {}: {}",
            self.endpoint(),
            chain(e)
        ))
    }

    /// `Unreachable` when the engine did not answer, else `Refused` with
    /// `what` first.
    pub fn classify(&self, what: &str, e: &DockerError) -> EngineError {
        if is_unreachable(e) {
            self.unreachable(e)
        } else {
            EngineError::Refused(format!("{what}: {}", docker_message(e)))
        }
    }

    /// A client that has talked to the engine once (API version negotiated:
    /// bollard speaks a newer API than e.g. Debian's Docker 20.10). Until
    /// then every error is `Unreachable`, so the caller retries.
    pub async fn client(&self) -> Result<Docker, EngineError> {
        self.client
            .get_or_try_init(|| async {
                let docker = Docker::connect_with_host(&self.endpoint)
                    .map_err(|e| self.unreachable(&e))?
                    .with_timeout(self.timeout);
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| match self.classify("", &e) {
                        EngineError::Refused(_) => EngineError::Unreachable(format!(
                            "docker engine at {} did not tell its API version: {}",
                            self.endpoint(),
                            docker_message(&e)
                        )),
                        unreachable => unreachable,
                    })
            })
            .await
            .cloned()
    }
}

impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unreachable(m) => Fail::Infra(m),
            EngineError::Refused(m) => Fail::Job(m),
        }
    }
}

/// What stopping a container on timeout or cancel took.
struct Stopped {
    took: Duration,
    /// `docker kill` was needed after `docker stop`.
    killed: bool,
}

/// Why an attempt could not run, before it has an exit code.
enum Fail {
    /// Docker answered no: the job's fault (image, command, limits).
    Job(String),
    /// Docker did not answer: retry the same attempt later.
    Infra(String),
}

impl Fail {
    fn into_exit(self) -> Exit {
        match self {
            Fail::Job(m) => Exit {
                error: Some(m),
                ..Default::default()
            },
            Fail::Infra(m) => Exit::failed(EndCause::Infrastructure, m),
        }
    }
}

/// No answer from the engine at all, as opposed to an answer that says no.
pub fn is_unreachable(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::SocketNotFoundError(_)
            | DockerError::HyperLegacyError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError
    )
}

pub fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// The error and its causes on one line ("client error (Connect): Connection
/// refused (os error 111)") — hyper's top-level message alone says little.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// The message Docker sent, without bollard's "Docker responded with …".
pub fn docker_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => chain(other),
    }
}

/// `image` with an explicit tag: pulling a reference without tag or digest
/// would pull every tag.
fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || last.contains('@') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// The registry host an image reference names (Docker's rule: a first path
/// component with a dot or a colon, or `localhost`), else Docker Hub.
fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "https://index.docker.io/v1/".to_string(),
    }
}

/// `pubrun-<run_id>-<attempt>`, with anything Docker does not allow in a
/// container name replaced by `-`.
pub fn container_name(run_id: &str, attempt: u32) -> String {
    let clean: String = run_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("pubrun-{clean}-{attempt}")
}

fn label_filters(run_id: &str, attempt: u32) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![
            format!("pubrun.run_id={run_id}"),
            format!("pubrun.attempt={attempt}"),
        ],
    )])
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl DockerExecutor {
    /// Uses `DOCKER_HOST` (default `unix:///var/run/docker.sock`). Fails only
    /// for an address bollard cannot use (unknown scheme); an engine that is
    /// not running is reported per run, as an infrastructure error.
    pub fn connect() -> Result<Self, String> {
        let host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        Self::with_host(host.as_deref().unwrap_or(DEFAULT_DOCKER_HOST))
    }

    /// Uses the engine at `host` (`unix://…`, `tcp://…`, `http://…`).
    pub fn with_host(host: &str) -> Result<Self, String> {
        let engine = Engine::new(host, REQUEST_TIMEOUT)?;
        Ok(DockerExecutor { engine })
    }

    /// The engine's address, as reported in [`Started::machine`].
    pub fn endpoint(&self) -> &str {
        self.engine.endpoint()
    }

    /// `Infra` when the engine did not answer, else `Job` with `what` first.
    fn classify(&self, what: &str, e: &DockerError) -> Fail {
        self.engine.classify(what, e).into()
    }

    async fn client(&self) -> Result<Docker, Fail> {
        Ok(self.engine.client().await?)
    }

    async fn ensure_image(
        &self,
        docker: &Docker,
        spec: &DockerSpec,
        log: &LogSink,
    ) -> Result<(), Fail> {
        let image = &spec.image;
        if image.is_empty() {
            return Err(Fail::Job("no image given".into()));
        }
        if spec.pull != PullPolicy::Always {
            match docker.inspect_image(image).await {
                Ok(_) => return Ok(()),
                Err(e) if is_status(&e, 404) => {
                    if spec.pull == PullPolicy::Never {
                        return Err(Fail::Job(format!(
                            "image {image}: not present on the docker host {} and pull = \"never\"",
                            self.endpoint()
                        )));
                    }
                }
                Err(e) => return Err(self.classify(&format!("image {image}"), &e)),
            }
        }
        self.pull(docker, spec, log).await
    }

    async fn pull(&self, docker: &Docker, spec: &DockerSpec, log: &LogSink) -> Result<(), Fail> {
        let image = &spec.image;
        let credentials = match &spec.auth {
            None => None,
            Some(auth) => {
                let password = std::env::var(&auth.password_env).map_err(|_| {
                    Fail::Job(format!(
                        "image {image}: the registry password is read from the environment variable {}, which is not set on the pubrun server",
                        auth.password_env
                    ))
                })?;
                let server = if auth.server.is_empty() {
                    registry_of(image)
                } else {
                    auth.server.clone()
                };
                Some(DockerCredentials {
                    username: Some(auth.username.clone()),
                    password: Some(password),
                    serveraddress: Some(server),
                    ..Default::default()
                })
            }
        };
        log.note(&format!("pulling image {image}")).await;
        let reference = with_tag(image);
        let options = CreateImageOptionsBuilder::new()
            .from_image(&reference)
            .build();
        let mut progress = docker.create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            if let Err(e) = item {
                return Err(self.classify(&format!("image {image}: pull failed"), &e));
            }
        }
        log.note(&format!("pulled image {image}")).await;
        Ok(())
    }

    fn container_body(
        &self,
        req: &RunRequest,
        spec: &DockerSpec,
    ) -> Result<ContainerCreateBody, Fail> {
        let workdir = std::path::absolute(&req.workdir)
            .map_err(|e| Fail::Infra(format!("run directory {}: {e}", req.workdir.display())))?;
        let mut binds = Vec::with_capacity(spec.mounts.len() + 1);
        binds.push(format!("{}:/workspace", workdir.display()));
        for m in &spec.mounts {
            let source = workdir.join(&m.source);
            binds.push(format!(
                "{}:{}{}",
                source.display(),
                m.target,
                if m.read_only { ":ro" } else { "" }
            ));
        }
        let env = crate::job_env(BTreeMap::new(), &spec.env, req);
        let labels = HashMap::from([
            ("pubrun.run_id".to_string(), req.run_id.clone()),
            ("pubrun.job".to_string(), req.job.clone()),
            ("pubrun.attempt".to_string(), req.attempt.to_string()),
        ]);
        let memory = spec.memory_bytes.map(|m| m.min(i64::MAX as u64) as i64);
        let host_config = HostConfig {
            binds: Some(binds),
            memory,
            memory_swap: memory,
            nano_cpus: spec.cpus.map(|c| (c * 1e9).round() as i64),
            network_mode: (!spec.network.is_empty()).then(|| spec.network.clone()),
            ..Default::default()
        };
        let working_dir = match spec.working_dir.as_str() {
            "image" => None,
            "" => Some("/workspace".to_string()),
            d if d.starts_with('/') => Some(d.to_string()),
            d => Some(format!("/workspace/{d}")),
        };
        Ok(ContainerCreateBody {
            image: Some(spec.image.clone()),
            working_dir,
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            stop_timeout: Some(req.grace_period.as_secs().min(i64::MAX as u64) as i64),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        })
    }

    /// Creates the attempt's container. A container of the same name left
    /// from an earlier try of this attempt is removed first, unless it is
    /// running: then it is followed instead (`Ok((id, true))`).
    async fn create(
        &self,
        docker: &Docker,
        req: &RunRequest,
        spec: &DockerSpec,
        log: &LogSink,
    ) -> Result<(String, bool), Fail> {
        let name = container_name(&req.run_id, req.attempt);
        let body = self.container_body(req, spec)?;
        let options = || Some(CreateContainerOptionsBuilder::new().name(&name).build());
        match docker.create_container(options(), body.clone()).await {
            Ok(r) => return Ok((r.id, false)),
            Err(e) if is_status(&e, 409) => {}
            Err(e) => {
                return Err(self.classify(
                    &format!("cannot create a container from image {}", spec.image),
                    &e,
                ))
            }
        }
        match docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                log.note(&format!(
                    "container {name} of this attempt is already running; following it"
                ))
                .await;
                return Ok((c.id.unwrap_or(name), true));
            }
            Ok(_) | Err(_) => {}
        }
        log.note(&format!(
            "removing the stale container {name} left by an earlier try"
        ))
        .await;
        if let Err(e) = docker
            .remove_container(
                &name,
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
            )
            .await
        {
            if !is_status(&e, 404) {
                return Err(self.classify(&format!("cannot remove the stale container {name}"), &e));
            }
        }
        docker
            .create_container(options(), body)
            .await
            .map(|r| (r.id, false))
            .map_err(|e| {
                self.classify(
                    &format!("cannot create a container from image {}", spec.image),
                    &e,
                )
            })
    }

    async fn remove(&self, docker: &Docker, id: &str) {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        if let Err(e) = docker.remove_container(id, Some(options)).await {
            if !is_status(&e, 404) {
                tracing::warn!(container = id, error = %chain(&e), "could not remove container");
            }
        }
    }

    /// Streams the container's logs (from `since`, a Unix time, or from the
    /// start) into `log`, waits for it to end — stopping it on timeout or
    /// cancel — then reads its exit state and removes it.
    async fn follow(
        &self,
        docker: &Docker,
        id: &str,
        req: &RunRequest,
        log: &Arc<LogSink>,
        cancel: &CancellationToken,
        since: Option<i64>,
    ) -> Exit {
        let mut logs_opts = LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true);
        if let Some(t) = since {
            logs_opts = logs_opts.since(t.clamp(0, i32::MAX as i64) as i32);
        }
        let mut stream = docker.logs(id, Some(logs_opts.build()));
        let sink = log.clone();
        let mut pump = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(out) => sink.write(&out.into_bytes()).await,
                    Err(_) => break,
                }
            }
        });

        let mut wait = docker.wait_container(
            id,
            Some(
                WaitContainerOptionsBuilder::new()
                    .condition("not-running")
                    .build(),
            ),
        );
        let mut cause = EndCause::Exited;
        let mut stopped = None;
        let waited = tokio::select! {
            w = wait.next() => w,
            (why, what) = stop_cause(req.timeout, cancel) => {
                cause = why;
                log.note(&format!("{what}: docker stop with {}s grace", req.grace_period.as_secs())).await;
                stopped = Some(self.stop(docker, id, req.grace_period, log).await);
                wait.next().await
            }
        };
        let mut exit = Exit {
            cause,
            ..Default::default()
        };
        let mut wait_code = None;
        match waited {
            Some(Ok(r)) => wait_code = Some(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => wait_code = Some(code),
            Some(Err(e)) if is_unreachable(&e) => {
                pump.abort();
                exit.error = Some(format!(
                    "docker engine unreachable at {} while the container ran: {}",
                    self.endpoint(),
                    chain(&e)
                ));
                exit.cause = EndCause::Infrastructure;
                return exit;
            }
            Some(Err(e)) => {
                exit.error = Some(format!(
                    "waiting for container {id}: {}",
                    docker_message(&e)
                ))
            }
            None => {}
        }

        if tokio::time::timeout(LOG_DRAIN_LIMIT, &mut pump)
            .await
            .is_err()
        {
            pump.abort();
            log.note(
                "the container's log stream did not end after it stopped; no longer reading it",
            )
            .await;
        }

        match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => {
                let state = c.state.unwrap_or_default();
                exit.exit_code = state
                    .exit_code
                    .map(|c| c as i32)
                    .or(wait_code.map(|c| c as i32));
                exit.oom_killed = state.oom_killed.unwrap_or(false);
                if let Some(err) = state.error.filter(|e| !e.is_empty()) {
                    exit.error.get_or_insert(format!("container: {err}"));
                }
            }
            Err(e) if is_unreachable(&e) => {
                exit.exit_code = wait_code.map(|c| c as i32);
                if exit.exit_code.is_none() {
                    exit.error = Some(format!(
                        "docker engine unreachable at {}: {}",
                        self.endpoint(),
                        chain(&e)
                    ));
                    exit.cause = EndCause::Infrastructure;
                }
            }
            Err(_) => exit.exit_code = wait_code.map(|c| c as i32),
        }
        if exit.oom_killed {
            log.note("the container ran out of memory and was killed (OOMKilled)")
                .await;
        }
        if let Some(stop) = stopped {
            // Docker's own SIGKILL at the end of `stop -t` leaves 137 after
            // the full grace period; a container that obeyed SIGTERM is
            // gone sooner (or exits with its own code).
            exit.killed_after_grace =
                stop.killed || (stop.took >= req.grace_period && exit.exit_code == Some(137));
            if exit.killed_after_grace {
                log.note(&format!(
                    "it did not stop within the {}s grace period and was killed (SIGKILL)",
                    req.grace_period.as_secs()
                ))
                .await;
            }
        }
        self.remove(docker, id).await;
        exit
    }

    /// `docker stop -t grace`: SIGTERM (or the image's stop signal), then
    /// SIGKILL after `grace`. The request lasts as long as the stop does. A
    /// container still running after it (the request failed or timed out)
    /// is killed with `docker kill`.
    async fn stop(&self, docker: &Docker, id: &str, grace: Duration, log: &LogSink) -> Stopped {
        let t0 = std::time::Instant::now();
        let t = grace.as_secs().min(i32::MAX as u64) as i32;
        let patient = docker.clone().with_timeout(grace + REQUEST_TIMEOUT);
        if let Err(e) = patient
            .stop_container(id, Some(StopContainerOptionsBuilder::new().t(t).build()))
            .await
        {
            if !is_status(&e, 404) && !is_status(&e, 304) {
                tracing::warn!(container = id, error = %chain(&e), "docker stop failed");
                log.note(&format!("docker stop failed: {}", docker_message(&e)))
                    .await;
            }
        }
        let running = match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
            Err(e) => !is_status(&e, 404),
        };
        let mut killed = false;
        if running {
            log.note("still running after docker stop: docker kill (SIGKILL)")
                .await;
            match docker
                .kill_container(
                    id,
                    Some(KillContainerOptionsBuilder::new().signal("KILL").build()),
                )
                .await
            {
                Ok(()) => killed = true,
                Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                Err(e) => {
                    tracing::warn!(container = id, error = %chain(&e), "docker kill failed")
                }
            }
        }
        Stopped {
            took: t0.elapsed(),
            killed,
        }
    }

    async fn start_and_follow(
        &self,
        req: &RunRequest,
        spec: &DockerSpec,
        log: &Arc<LogSink>,
        cancel: &CancellationToken,
        on_started: OnStarted,
    ) -> Result<Exit, Fail> {
        let docker = self.client().await?;
        self.ensure_image(&docker, spec, log).await?;
        if cancel.is_cancelled() {
            return Ok(Exit::failed(
                EndCause::Cancelled,
                "cancelled before it started",
            ));
        }
        let (id, already_running) = self.create(&docker, req, spec, log).await?;
        if !already_running {
            if let Err(e) = docker.start_container(&id, None).await {
                let fail = self.classify(
                    &format!("cannot start the container from image {}", spec.image),
                    &e,
                );
                if matches!(fail, Fail::Job(_)) {
                    self.remove(&docker, &id).await;
                }
                return Err(fail);
            }
        }
        on_started(Started {
            machine: self.endpoint().to_string(),
            handle: id.clone(),
        });
        Ok(self.follow(&docker, &id, req, log, cancel, None).await)
    }
}

#[async_trait::async_trait]
impl Executor for DockerExecutor {
    async fn run(&self, a: Attempt) -> Exit {
        let spec = match &a.req.spec {
            ExecutorSpec::Docker(d) => d.clone(),
            ExecutorSpec::Process(p) => {
                return Exit {
                    error: Some(format!(
                        "the docker executor cannot run a process job (command {})",
                        p.command
                    )),
                    ..Default::default()
                };
            }
        };
        if a.cancel.is_cancelled() {
            return Exit::failed(EndCause::Cancelled, "cancelled before it started");
        }
        match self
            .start_and_follow(&a.req, &spec, &a.log, &a.cancel, a.on_started)
            .await
        {
            Ok(exit) => exit,
            Err(fail) => fail.into_exit(),
        }
    }

    /// Finds the attempt's container by its labels. Running: its logs are
    /// followed from now on (what it printed while pubrun was down is not
    /// copied) and the timeout counts from now, not from its start. Exited:
    /// its whole log is copied once (lines captured before the restart
    /// appear again). Created but never started: removed, `None` (nothing
    /// ran). Either way the container is removed at the end. An engine that
    /// does not answer gives `Some` infra error, so the attempt is retried.
    async fn reattach(&self, a: Attempt) -> Option<Exit> {
        let Attempt {
            req, log, cancel, ..
        } = a;
        if !matches!(req.spec, ExecutorSpec::Docker(_)) {
            return None;
        }
        let docker = match self.client().await {
            Ok(d) => d,
            Err(f) => return Some(f.into_exit()),
        };
        let list = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&label_filters(&req.run_id, req.attempt))
            .build();
        let found = match docker.list_containers(Some(list)).await {
            Ok(l) => l,
            Err(e) => return Some(self.classify("listing containers", &e).into_exit()),
        };
        let id = found.into_iter().find_map(|c| c.id)?;
        let state = match docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => c.state.unwrap_or_default(),
            Err(e) if is_status(&e, 404) => return None,
            Err(e) => {
                return Some(
                    self.classify(&format!("inspecting container {id}"), &e)
                        .into_exit(),
                )
            }
        };
        match state.status {
            Some(ContainerStateStatusEnum::CREATED)
            | Some(ContainerStateStatusEnum::EMPTY)
            | None => {
                log.note(&format!(
                    "container {id} was created but never started; removing it"
                ))
                .await;
                self.remove(&docker, &id).await;
                None
            }
            _ if state.running == Some(true) => {
                let since = now_unix();
                log.note(&format!(
                    "reattached to running container {id}; following its output from now on"
                ))
                .await;
                Some(
                    self.follow(&docker, &id, &req, &log, &cancel, Some(since))
                        .await,
                )
            }
            _ => {
                log.note(&format!(
                    "container {id} ended while pubrun was down; its output follows"
                ))
                .await;
                let mut stream = docker.logs(
                    &id,
                    Some(LogsOptionsBuilder::new().stdout(true).stderr(true).build()),
                );
                while let Some(Ok(out)) = stream.next().await {
                    log.write(LogOutput::into_bytes(out).as_ref()).await;
                }
                let exit = Exit {
                    exit_code: state.exit_code.map(|c| c as i32),
                    oom_killed: state.oom_killed.unwrap_or(false),
                    error: state
                        .error
                        .filter(|e| !e.is_empty())
                        .map(|e| format!("container: {e}")),
                    ..Default::default()
                };
                self.remove(&docker, &id).await;
                Some(exit)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_references() {
        assert_eq!(container_name("42", 1), "pubrun-42-1");
        assert_eq!(container_name("a/b c", 3), "pubrun-a-b-c-3");
        assert_eq!(with_tag("busybox"), "busybox:latest");
        assert_eq!(with_tag("127.0.0.1:5000/x/y"), "127.0.0.1:5000/x/y:latest");
        assert_eq!(
            with_tag("127.0.0.1:5000/x/y:auth"),
            "127.0.0.1:5000/x/y:auth"
        );
        assert_eq!(with_tag("x@sha256:abc"), "x@sha256:abc");
        assert_eq!(registry_of("127.0.0.1:5000/x/y:auth"), "127.0.0.1:5000");
        assert_eq!(
            registry_of("registry.example.com/importer:latest"),
            "registry.example.com"
        );
        assert_eq!(
            registry_of("library/busybox"),
            "https://index.docker.io/v1/"
        );
        assert_eq!(registry_of("busybox"), "https://index.docker.io/v1/");
    }

    #[test]
    fn unsupported_host_is_refused_and_missing_socket_is_not() {
        assert!(DockerExecutor::with_host("ftp://nowhere").is_err());
        assert!(DockerExecutor::with_host("unix:///nonexistent.sock").is_ok());
    }
}
