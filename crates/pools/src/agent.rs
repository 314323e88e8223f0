//! `pubrun agent`: the worker side of the agent protocol.
//!
//! The agent registers, then polls. Each poll is also its heartbeat and
//! carries the leases it holds; each reply may assign runs, cancel some, or
//! revoke leases the server no longer honours. A leased run is executed
//! with the same executors as the server; its log is written to a local
//! file and shipped by offset, so nothing is lost or doubled while the
//! server is unreachable. Every call is retried with backoff until it
//! succeeds or the server answers 409 (fenced): a run that finished while
//! the agent was cut off is reported when it is back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubrun_core::job::ExecutorSpec;
use pubrun_core::run::{EndCause, Exit};
use pubrun_exec::{Attempt, CancellationToken, Executor, LogSink, RunRequest};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::http::{AGENT_HEADER, SESSION_HEADER};
use crate::protocol::{Assignment, Poll, PollReply, Register, Registered, Report, Started, PREFIX};

pub struct AgentConfig {
    /// Base URL of the server, e.g. `http://10.0.0.2:8085`.
    pub server: String,
    pub pool: String,
    pub name: String,
    pub token: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    /// Run directories and logs of leased runs.
    pub data_dir: PathBuf,
    pub process: Arc<dyn Executor>,
    pub docker: Arc<dyn Executor>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Below the shortest lease timeout (5 s): an agent that was cut off comes
/// back before a restarted server gives its runs away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const LOG_SHIP_EVERY: Duration = Duration::from_millis(300);

struct Held {
    /// Stop the run (cancelled by a user, or revoked).
    cancel: CancellationToken,
    /// The server no longer honours the lease: stop reporting.
    revoked: CancellationToken,
}

struct Agent {
    cfg: AgentConfig,
    http: reqwest::Client,
    /// The session of the current registration (empty before the first).
    session: Mutex<String>,
    /// The token sent: `cfg.token` until a registration hands over the
    /// pool token in exchange for a one-time bootstrap token.
    token: Mutex<String>,
    held: Mutex<HashMap<u64, Held>>,
    /// Set when the agent stops: runs it cancels go back to the queue.
    handing_back: std::sync::atomic::AtomicBool,
    /// Notified whenever a lease is let go of.
    released: tokio::sync::Notify,
}

/// Why a call gave up.
enum CallError {
    /// 409: the lease is not ours any more.
    Fenced(String),
    /// 400: retrying will not help.
    Fatal(String),
    /// Told to stop (revoked lease, shutdown).
    Stopped,
}

pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let agent = Arc::new(Agent {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?,
        held: Mutex::new(HashMap::new()),
        session: Mutex::new(String::new()),
        token: Mutex::new(cfg.token.clone()),
        handing_back: std::sync::atomic::AtomicBool::new(false),
        released: tokio::sync::Notify::new(),
        cfg,
    });
    std::fs::create_dir_all(agent.cfg.data_dir.join("leases"))?;
    let result = poll_loop(&agent, &shutdown).await;
    agent.hand_back().await;
    result
}

/// How long a stopping agent waits for its runs to stop and be reported.
const HAND_BACK_WAIT: Duration = Duration::from_secs(8);

async fn poll_loop(agent: &Arc<Agent>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut backoff = FIRST_BACKOFF;
    'session: loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let reg = Register {
            pool: agent.cfg.pool.clone(),
            name: agent.cfg.name.clone(),
            slots: agent.cfg.slots,
            labels: agent.cfg.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let registered: Registered = match agent
            .post_json("/register", &reg, Duration::from_secs(15))
            .await
        {
            Ok(r) => r,
            Err(Failure::Status(code, msg))
                if code == StatusCode::UNAUTHORIZED || code == StatusCode::BAD_REQUEST =>
            {
                anyhow::bail!("the server refused this agent ({code}): {msg}");
            }
            // The name is held by a live agent (maybe this one, whose
            // registration reply was lost): free after its lease timeout.
            Err(Failure::Status(StatusCode::CONFLICT, msg)) => {
                tracing::warn!(reason = msg, retry_in = ?backoff, "name in use; retrying");
                if sleep_or_stop(backoff, shutdown).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue 'session;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot register; retrying");
                if sleep_or_stop(backoff, shutdown).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue 'session;
            }
        };
        tracing::info!(
            server = agent.cfg.server,
            pool = agent.cfg.pool,
            name = agent.cfg.name,
            "registered"
        );
        *agent.session.lock().unwrap_or_else(|p| p.into_inner()) = registered.session;
        if let Some(t) = registered.token {
            *agent.token.lock().unwrap_or_else(|p| p.into_inner()) = t;
        }
        backoff = FIRST_BACKOFF;
        let poll_timeout = Duration::from_secs_f64(registered.poll_secs) + Duration::from_secs(10);
        loop {
            let (free, leases) = {
                let held = agent.held.lock().unwrap_or_else(|p| p.into_inner());
                (
                    agent.cfg.slots.saturating_sub(held.len() as u32),
                    held.keys().copied().collect::<Vec<_>>(),
                )
            };
            let poll = Poll {
                name: agent.cfg.name.clone(),
                free_slots: free,
                leases,
            };
            let reply: PollReply = tokio::select! {
                r = agent.post_json("/poll", &poll, poll_timeout) => match r {
                    Ok(r) => r,
                    // Unknown (a restarted server) or our session ended:
                    // register again. Anything else: poll again with the
                    // same session (a new registration would have to wait
                    // for this one's lease timeout).
                    Err(e) => {
                        let again = matches!(
                            e,
                            Failure::Status(StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED, _)
                        );
                        tracing::warn!(error = %e, retry_in = ?backoff, register_again = again, "poll failed");
                        if sleep_or_stop(backoff, shutdown).await {
                            return Ok(());
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        if again {
                            continue 'session;
                        }
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            backoff = FIRST_BACKOFF;
            agent.handle(reply);
        }
    }
}

impl Agent {
    /// Stopping (SIGTERM, `docker stop`, instance shutdown): stop the runs
    /// held here and report each as the infrastructure's failure, so the
    /// server queues it again with the same attempt instead of waiting for
    /// the lease to time out.
    async fn hand_back(&self) {
        self.handing_back
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + HAND_BACK_WAIT;
        loop {
            let released = self.released.notified();
            let n = {
                let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                for h in held.values() {
                    h.cancel.cancel();
                }
                held.len()
            };
            if n == 0 {
                return;
            }
            tracing::info!(runs = n, "handing runs back to the server");
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                tracing::warn!(
                    runs = n,
                    "runs not handed back in time; their leases will expire"
                );
                return;
            }
        }
    }

    fn handle(self: &Arc<Self>, reply: PollReply) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for lease in reply.revoked {
            if let Some(h) = held.get(&lease) {
                tracing::warn!(lease, "lease revoked by the server; stopping its run");
                h.revoked.cancel();
                h.cancel.cancel();
            }
        }
        for lease in reply.cancel {
            if let Some(h) = held.get(&lease) {
                h.cancel.cancel();
            }
        }
        for a in reply.assign {
            let h = Held {
                cancel: CancellationToken::new(),
                revoked: CancellationToken::new(),
            };
            let (cancel, revoked) = (h.cancel.clone(), h.revoked.clone());
            held.insert(a.lease, h);
            let this = self.clone();
            tokio::spawn(async move {
                let lease = a.lease;
                this.run_lease(a, cancel, revoked).await;
                this.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&lease);
                this.released.notify_waiters();
            });
        }
    }

    fn token(&self) -> String {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn session(&self) -> String {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.cfg.server.trim_end_matches('/'))
    }

    async fn post_json<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<R, Failure> {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(self.token())
            .header(AGENT_HEADER, &self.cfg.name)
            .header(SESSION_HEADER, self.session())
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| Failure::Transport(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Failure::Status(status, error_text(resp).await));
        }
        resp.json()
            .await
            .map_err(|e| Failure::Transport(e.to_string()))
    }

    /// Sends a request until it succeeds; retries transport errors,
    /// 5xx/404 (server restarting) and 401 (session ended: the poll loop
    /// registers again, and the next try carries the new session) with
    /// backoff.
    async fn call(
        &self,
        revoked: &CancellationToken,
        what: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CallError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if revoked.is_cancelled() {
                return Err(CallError::Stopped);
            }
            let r = make()
                .bearer_auth(self.token())
                .header(AGENT_HEADER, &self.cfg.name)
                .header(SESSION_HEADER, self.session())
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) if resp.status() == StatusCode::CONFLICT => {
                    return Err(CallError::Fenced(error_text(resp).await));
                }
                Ok(resp) if resp.status() == StatusCode::BAD_REQUEST => {
                    return Err(CallError::Fatal(error_text(resp).await));
                }
                Ok(resp) => {
                    let s = resp.status();
                    tracing::debug!(what, status = %s, "server not ready; retrying");
                }
                Err(e) => tracing::debug!(what, error = %e, "call failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = revoked.cancelled() => return Err(CallError::Stopped),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn run_lease(
        self: &Arc<Self>,
        a: Assignment,
        cancel: CancellationToken,
        revoked: CancellationToken,
    ) {
        let lease = a.lease;
        let dir = self.cfg.data_dir.join("leases").join(lease.to_string());
        let work = dir.join("work");
        tracing::info!(
            lease,
            run = a.run_id,
            job = a.job,
            attempt = a.attempt,
            "run leased"
        );
        match self.execute(&a, &dir, &work, cancel, &revoked).await {
            Ok(()) => tracing::info!(lease, "run reported"),
            Err(CallError::Fenced(m)) => tracing::warn!(
                lease,
                reason = m,
                "server rejected the report: the run was taken back"
            ),
            Err(CallError::Fatal(m)) => {
                tracing::error!(lease, reason = m, "server refused the report")
            }
            Err(CallError::Stopped) => tracing::warn!(lease, "lease revoked; nothing reported"),
        }
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }

    async fn execute(
        self: &Arc<Self>,
        a: &Assignment,
        dir: &Path,
        work: &Path,
        cancel: CancellationToken,
        revoked: &CancellationToken,
    ) -> Result<(), CallError> {
        let lease = a.lease;
        // 1. The run directory (message files, staged inputs).
        let resp = self
            .call(revoked, "workdir", || {
                self.http.get(self.url(&format!("/leases/{lease}/workdir")))
            })
            .await?;
        let tar = resp
            .bytes()
            .await
            .map_err(|e| CallError::Fatal(format!("reading the run directory: {e}")))?;
        let work_owned = work.to_path_buf();
        let unpacked = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&work_owned)?;
            let mut ar = tar::Archive::new(std::io::Cursor::new(tar));
            for entry in ar.entries()? {
                let mut e = entry?;
                let kind = e.header().entry_type();
                if kind.is_file() || kind.is_dir() {
                    e.unpack_in(&work_owned)?;
                }
            }
            Ok(())
        })
        .await;
        let exit = match unpacked {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("cannot unpack the run directory: {e}")),
            Err(e) => Some(e.to_string()),
        };
        let log_path = dir.join("log");
        let log = match LogSink::create_masking(&log_path, a.log_limit, a.secrets.values()).await {
            Ok(l) => Arc::new(l),
            Err(e) => {
                return self
                    .report(
                        lease,
                        revoked,
                        Exit::failed(
                            EndCause::Infrastructure,
                            format!("agent {} cannot write a log: {e}", self.cfg.name),
                        ),
                    )
                    .await
            }
        };
        if let Some(error) = exit {
            return self
                .report(
                    lease,
                    revoked,
                    Exit::failed(EndCause::Infrastructure, error),
                )
                .await;
        }
        // 2. Run it, shipping the log as it grows.
        let req = self.request(a, work);
        let executor = match &a.spec {
            ExecutorSpec::Process(_) => self.cfg.process.clone(),
            ExecutorSpec::Docker(_) => self.cfg.docker.clone(),
        };
        let done = CancellationToken::new();
        let shipper = {
            let this = self.clone();
            let (done, revoked, log_path) = (done.clone(), revoked.clone(), log_path.clone());
            tokio::spawn(async move { this.ship_log(lease, &log_path, done, revoked).await })
        };
        let on_started = {
            let this = self.clone();
            let revoked = revoked.clone();
            Box::new(move |s: pubrun_exec::Started| {
                tokio::spawn(async move {
                    let body = Started { handle: s.handle };
                    let _ = this
                        .call(&revoked, "started", || {
                            this.http
                                .post(this.url(&format!("/leases/{lease}/started")))
                                .json(&body)
                        })
                        .await;
                });
            })
        };
        log.note(&format!("running on agent {}", self.cfg.name))
            .await;
        let mut exit = executor
            .run(Attempt {
                req,
                log: log.clone(),
                cancel,
                on_started,
            })
            .await;
        if exit.cancelled() && self.handing_back.load(std::sync::atomic::Ordering::SeqCst) {
            exit = Exit::failed(
                EndCause::Lost,
                format!(
                    "lost: agent {} stopped during the run; it goes back to the queue",
                    self.cfg.name
                ),
            );
        }
        log.note(&format!("agent {}: attempt ended", self.cfg.name))
            .await;
        log.flush().await;
        done.cancel();
        match shipper.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(CallError::Fatal(e.to_string())),
        }
        // 3. Outputs back to the server, then the result.
        if !a.outputs.is_empty() && !exit.cause.keeps_attempt() {
            let work = work.to_path_buf();
            let outputs = a.outputs.clone();
            let packed = tokio::task::spawn_blocking(move || pack_outputs(&work, &outputs)).await;
            match packed {
                Ok(Ok(tar)) => {
                    let tar = bytes::Bytes::from(tar);
                    self.call(revoked, "outputs", || {
                        self.http
                            .put(self.url(&format!("/leases/{lease}/outputs")))
                            .body(tar.clone())
                    })
                    .await?;
                }
                Ok(Err(e)) => tracing::warn!(lease, error = %e, "cannot pack outputs"),
                Err(e) => tracing::warn!(lease, error = %e, "cannot pack outputs"),
            }
        }
        self.report(lease, revoked, exit).await
    }

    async fn report(
        &self,
        lease: u64,
        revoked: &CancellationToken,
        exit: Exit,
    ) -> Result<(), CallError> {
        let body = Report { exit };
        self.call(revoked, "result", || {
            self.http
                .post(self.url(&format!("/leases/{lease}/result")))
                .json(&body)
        })
        .await
        .map(|_| ())
    }

    fn request(&self, a: &Assignment, work: &Path) -> RunRequest {
        // Paths the server put in the environment point at its own copy of
        // the run directory; here they mean ours.
        let local = work.display().to_string();
        let env = a
            .env
            .iter()
            .map(|(k, v)| {
                let v = match v.strip_prefix(&a.server_workdir) {
                    Some(rest) if !a.server_workdir.is_empty() => format!("{local}{rest}"),
                    _ => v.clone(),
                };
                (k.clone(), v)
            })
            .collect();
        RunRequest {
            run_id: a.run_id.clone(),
            job: a.job.clone(),
            attempt: a.attempt,
            spec: a.spec.clone(),
            workdir: work.to_path_buf(),
            timeout: Duration::from_secs_f64(a.timeout_secs),
            grace_period: Duration::from_secs_f64(a.grace_secs),
            env,
            secrets: a.secrets.clone(),
            outputs: a.outputs.clone(),
        }
    }

    /// Sends the local log file to the server from the offset it has, until
    /// `done` and everything is sent.
    async fn ship_log(
        &self,
        lease: u64,
        path: &Path,
        done: CancellationToken,
        revoked: CancellationToken,
    ) -> Result<(), CallError> {
        let mut sent: u64 = 0;
        loop {
            let finished = done.is_cancelled();
            let size = tokio::fs::metadata(path)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            while sent < size {
                let mut f = match tokio::fs::File::open(path).await {
                    Ok(f) => f,
                    Err(_) => break,
                };
                let _ = f.seek(std::io::SeekFrom::Start(sent)).await;
                let mut buf = vec![0u8; ((size - sent) as usize).min(1 << 20)];
                let n = f.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                let chunk = bytes::Bytes::from(buf);
                let offset = sent;
                let resp = self
                    .call(&revoked, "log", || {
                        self.http
                            .post(self.url(&format!("/leases/{lease}/log?offset={offset}")))
                            .body(chunk.clone())
                    })
                    .await;
                match resp {
                    Ok(r) => {
                        let received = r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|v| v["received"].as_u64())
                            .unwrap_or(offset + n as u64);
                        sent = received;
                    }
                    // A bad offset (server lost count): start over from 0.
                    Err(CallError::Fatal(m)) if m.contains("resend from") => {
                        sent = m
                            .rsplit("resend from ")
                            .next()
                            .and_then(|s| s.trim().parse().ok())
                            .unwrap_or(0);
                    }
                    Err(e) => return Err(e),
                }
            }
            if finished {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(LOG_SHIP_EVERY) => {}
                _ = done.cancelled() => {}
            }
        }
    }
}

/// A tar of the declared output directories (regular files only).
fn pack_outputs(work: &Path, outputs: &[String]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for o in outputs {
        let rel = o.trim_start_matches("./").trim_end_matches('/');
        let src = work.join(rel);
        if src.is_dir() {
            b.append_dir_all(if rel.is_empty() { "." } else { rel }, &src)?;
        }
    }
    b.into_inner()
}

async fn error_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    match resp.json::<serde_json::Value>().await {
        Ok(v) => v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string()),
        Err(_) => status.to_string(),
    }
}

#[derive(Debug)]
enum Failure {
    Transport(String),
    Status(StatusCode, String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transport(e) => write!(f, "{e}"),
            Failure::Status(s, m) => write!(f, "{s}: {m}"),
        }
    }
}

/// Sleeps, or returns true when told to stop first.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}
