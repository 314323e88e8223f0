//! Helpers shared by the `pubrun` binary's integration tests: the one
//! `pubrun serve` harness ([`ServeBuilder`] → [`Serve`]), client commands
//! ([`Cli`]), a child process guard and waiting for a server to come up.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use tonic::transport::Channel;

pub use pubrun_testkit::{free_port, poll_until as poll, poll_until_async as poll_async, ready_if};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pubrun");

/// A manifest template (a file in `tests/manifests`, read with `include_str!`)
/// with each `@key@` replaced by its value: the manifests are data files
/// rather than `format!` strings with every brace doubled.
pub fn fill(template: &str, vars: &[(&str, &dyn std::fmt::Display)]) -> String {
    vars.iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(&format!("@{key}@"), &value.to_string())
        })
}

/// A `pubrun serve` child, killed when dropped (also when a test panics).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `GET /healthz` on the port answers 200.
pub fn healthz(port: u16) -> bool {
    healthz_response(port).is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

fn healthz_response(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    Some(resp)
}

/// Cluster mode: the node that answered a healthy `GET /healthz` on the
/// port (its `x-pubrun-node` header), whichever server the port belongs to.
pub fn answering_node(port: u16) -> Option<String> {
    let resp = healthz_response(port)?;
    if !resp.starts_with("HTTP/1.1 200") {
        return None;
    }
    resp.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-pubrun-node")
            .then(|| v.trim().to_string())
    })
}

/// Waits until `GET /healthz` on `port` is answered by `node` (directly or
/// forwarded), panicking with `log()` after `patience`.
pub fn wait_answered_by(port: u16, node: &str, patience: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + patience;
    loop {
        let seen = answering_node(port);
        if seen.as_deref() == Some(node) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} not answered by node {node} within {patience:?} (last: {seen:?})\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the server child on `port` is healthy; panics (with `log()`
/// appended) if it exits first or is not healthy within `patience`.
pub fn wait_healthy(child: &mut Child, port: u16, patience: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "pubrun serve exited before becoming healthy: {status}\n{}",
                log()
            );
        }
        if healthz(port) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pubrun serve not healthy on port {port} within {patience:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A gRPC channel to the server on `port`, retried for up to 60 s.
pub async fn connect(port: u16) -> Channel {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pubrun did not listen on {url} within 60 s");
}

/// What `pubrun serve` reads from the environment: cleared for every server
/// so that a developer's shell never changes a test.
const SERVE_ENV: &[&str] = &[
    "PUBRUN_TOKEN",
    "PUBRUN_TOKEN_FILE",
    "PUBRUN_LISTEN",
    "PUBRUN_DATA_DIR",
    "PUBRUN_CONFIG",
    "PUBRUN_LOG_FORMAT",
    "PUBRUN_METRICS_TOKEN",
    "PUBRUN_STORE",
    "PUBRUN_NODE_NAME",
    "PUBRUN_ADVERTISE_ADDR",
    "PUBRUN_PUBLIC_URL",
    "PUBRUN_ALLOWED_HOSTS",
];

/// How `pubrun serve` is started: a fresh temp dir holding `data/`,
/// `serve.log` (its stderr) and `pubrun.toml` (with [`ServeBuilder::config`]),
/// a free port on 127.0.0.1, `PUBRUN_LOG=warn`, no token. Cloned by
/// [`Serve::restart`] to start the same server again.
#[derive(Clone)]
pub struct ServeBuilder {
    dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    port: Option<u16>,
    config: Option<String>,
    token: Option<String>,
    log_level: String,
    log_name: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    patience: Duration,
    append_log: bool,
    shell: Option<String>,
}

impl Default for ServeBuilder {
    fn default() -> Self {
        ServeBuilder {
            dir: None,
            data_dir: None,
            port: None,
            config: None,
            token: None,
            log_level: "warn".into(),
            log_name: "serve.log".into(),
            args: Vec::new(),
            envs: Vec::new(),
            patience: Duration::from_secs(60),
            append_log: false,
            shell: None,
        }
    }
}

impl ServeBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the log, config and (by default) `data/` in `dir`, which the
    /// caller owns, instead of a fresh temp dir.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// `--data-dir` (default `<dir>/data`).
    pub fn data_dir(mut self, data: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(data.into());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Writes `manifest` to `<dir>/pubrun.toml` and passes `--config`.
    pub fn config(mut self, manifest: impl Into<String>) -> Self {
        self.config = Some(manifest.into());
        self
    }

    /// `--token TOKEN`; clients made by [`Serve::client`] send it too.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// [`ServeBuilder::token`] when there is one, else no token.
    pub fn maybe_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(Into::into);
        self
    }

    /// [`ServeBuilder::config`] when there is a manifest, else none.
    pub fn maybe_config(mut self, manifest: Option<&str>) -> Self {
        self.config = manifest.map(Into::into);
        self
    }

    /// `PUBRUN_LOG` (default `warn`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// The file in `dir` that takes the server's stderr (default `serve.log`).
    pub fn log_name(mut self, name: &str) -> Self {
        self.log_name = name.into();
        self
    }

    /// The log at `path` (its dir becomes [`ServeBuilder::dir`]).
    pub fn log_file(self, path: &Path) -> Self {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let mut b = self.dir(path.parent().unwrap());
        b.log_name = name;
        b
    }

    /// Appends to an existing log at start instead of truncating it (a
    /// restart through [`Serve::restart`] always appends).
    pub fn append_log(mut self) -> Self {
        self.append_log = true;
        self
    }

    /// A cluster-mode node: `--store URL --node-name NODE`, the owner lease's
    /// TTL through `PUBRUN_LEASE_TTL_MS`, `PUBRUN_LOG=info`.
    pub fn cluster(store_url: &str, node: &str, lease_ttl: Duration) -> Self {
        ServeBuilder::new()
            .args(["--store", store_url, "--node-name", node])
            .env("PUBRUN_LEASE_TTL_MS", lease_ttl.as_millis().to_string())
            .log_level("info")
    }

    /// Starts the server through `sh -c SCRIPT sh pubrun serve …` (a script
    /// ending in `exec "$@"`), e.g. to lower a limit first.
    pub fn via_shell(mut self, script: &str) -> Self {
        self.shell = Some(script.into());
        self
    }

    /// How long the server may take to become healthy (default 60 s).
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), Some(value.into())));
        self
    }

    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), None));
        self
    }

    /// Starts the server and waits until `GET /healthz` answers.
    pub fn start(self) -> Serve {
        let mut server = self.spawn();
        server.wait_healthy();
        server
    }

    /// Starts the server without waiting for it.
    pub fn spawn(mut self) -> Serve {
        let tmp = match &self.dir {
            Some(_) => None,
            None => {
                let t = tempfile::tempdir().unwrap();
                self.dir = Some(t.path().to_path_buf());
                Some(Arc::new(t))
            }
        };
        self.port.get_or_insert_with(free_port);
        if !self.append_log {
            let dir = self.dir.as_deref().unwrap();
            std::fs::File::create(dir.join(&self.log_name)).unwrap();
        }
        let mut server = Serve {
            child: None,
            spec: self,
            _tmp: tmp,
        };
        server.respawn();
        server
    }

    /// The `pubrun serve` command this builder runs (dir and port resolved).
    fn command(&self) -> Command {
        let dir = self.dir.as_deref().expect("dir resolved by spawn");
        let data = self.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let mut cmd = match &self.shell {
            Some(script) => {
                let mut c = Command::new("sh");
                c.args(["-c", script, "sh", BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port.expect("port resolved")))
            .arg("--data-dir")
            .arg(data);
        if let Some(manifest) = &self.config {
            let path = dir.join("pubrun.toml");
            std::fs::write(&path, manifest).unwrap();
            cmd.arg("--config").arg(path);
        }
        if let Some(t) = &self.token {
            cmd.args(["--token", t]);
        }
        cmd.args(&self.args);
        for key in SERVE_ENV {
            cmd.env_remove(key);
        }
        cmd.env("PUBRUN_LOG", &self.log_level);
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        // Appended, so a restarted server's log follows the first one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(&self.log_name))
            .unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        cmd
    }
}

/// A running `pubrun serve` (killed when dropped, also when a test panics)
/// with its port, dir, token and log.
pub struct Serve {
    child: Option<Child>,
    spec: ServeBuilder,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Serve {
    pub fn port(&self) -> u16 {
        self.spec.port.unwrap()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// `addr()` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.addr())
    }

    pub fn token(&self) -> Option<&str> {
        self.spec.token.as_deref()
    }

    /// The dir holding the log, the config and (by default) the data.
    pub fn dir(&self) -> &Path {
        self.spec.dir.as_deref().unwrap()
    }

    /// `dir()/name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.spec
            .data_dir
            .clone()
            .unwrap_or_else(|| self.path("data"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.path(&self.spec.log_name)
    }

    /// What the server logged so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("server is running")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Waits until `GET /healthz` answers; panics with the log if the server
    /// exits first or takes longer than its patience.
    pub fn wait_healthy(&mut self) {
        let (port, patience, log) = (self.port(), self.spec.patience, self.log_path());
        wait_healthy(self.child(), port, patience, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        });
    }

    /// SIGKILL, then reaps the process (no-op when not running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a graceful stop) and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server is running");
        let pid = c.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        c.wait().unwrap()
    }

    /// Starts the same server again (same dir, port, flags) without waiting.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "stop the server before respawning");
        self.child = Some(self.spec.command().spawn().expect("spawn pubrun serve"));
    }

    /// Kills the server if it runs and starts it again, healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.respawn();
        self.wait_healthy();
    }

    /// A client command (`pubrun ARGS`) aimed at this server, with its own
    /// client state directory (resumable uploads) inside the test's.
    pub fn client(&self, args: &[&str]) -> Cli {
        let mut cli = Cli::new(args)
            .env("PUBRUN_ADDR", self.addr())
            .env("PUBRUN_STATE_DIR", self.path("state"));
        if let Some(t) = self.token() {
            cli = cli.env("PUBRUN_TOKEN", t);
        }
        cli
    }

    /// What the server, and an agent logging to `agent.log` beside it, wrote
    /// so far (for failure messages).
    pub fn logs(&self) -> String {
        let mut all = format!("--- server log ---\n{}", self.log());
        if let Ok(agent) = std::fs::read_to_string(self.path("agent.log")) {
            all.push_str(&format!("\n--- agent log ---\n{agent}"));
        }
        all
    }

    /// Runs `pubrun ARGS` against this server; never asserts.
    pub fn run(&self, args: &[&str]) -> Ran {
        self.client(args).ran(None)
    }

    /// Runs `pubrun ARGS` with `stdin` as its input; never asserts.
    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Ran {
        self.client(args).ran(Some(stdin))
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            r.code == 0,
            "`pubrun {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            args.join(" "),
            r.code,
            r.stdout,
            r.stderr,
            self.logs()
        );
        r.stdout
    }

    /// Runs and asserts a failure that printed nothing to stdout; returns
    /// stderr (where the error must be).
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            r.code != 0,
            "`pubrun {}` should have failed but exited 0:\nstdout: {}\nstderr: {}",
            args.join(" "),
            r.stdout,
            r.stderr
        );
        assert!(
            r.stdout.is_empty(),
            "a failing `pubrun {}` printed to stdout: {}",
            args.join(" "),
            r.stdout
        );
        r.stderr
    }

    /// `pubrun ARGS --json`, asserted to succeed, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "`pubrun {}` printed invalid JSON ({e}):\n{out}",
                a.join(" ")
            )
        })
    }

    /// Polls `pubrun ARGS --json` every 100 ms until `pred` holds (within
    /// the builder's patience); returns that answer.
    pub fn wait_json(
        &self,
        args: &[&str],
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let patience = self.spec.patience;
        poll(
            patience,
            Duration::from_millis(100),
            || {
                let v = self.json(args);
                ready_if(pred(&v), v)
            },
            |v| {
                let args = args.join(" ");
                format!(
                    "{what} did not happen within {patience:?}; last `pubrun {args}`: {v:#}\n{}",
                    self.logs()
                )
            },
        )
    }
}

/// A finished client command: its exit code (-1 for a signal) and output.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A `pubrun` client command, its environment cleared of the developer's
/// `PUBRUN_TOKEN`/`PUBRUN_PROJECT`/`PUBRUN_ADDR`.
pub struct Cli(Command);

impl Cli {
    pub fn new(args: &[&str]) -> Cli {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("PUBRUN_TOKEN")
            .env_remove("PUBRUN_PROJECT")
            .env_remove("PUBRUN_ADDR")
            .env_remove("PUBRUN_CP_TEST_STOP_AFTER_CHUNKS")
            .stdin(Stdio::null());
        Cli(cmd)
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Cli {
        self.0.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Cli {
        self.0.env_remove(key);
        self
    }

    pub fn command(&mut self) -> &mut Command {
        &mut self.0
    }

    pub fn output(mut self) -> Output {
        self.0.output().expect("run pubrun")
    }

    /// Runs (reading `stdin` when given) and keeps what it printed.
    pub fn ran(self, stdin: Option<&[u8]>) -> Ran {
        let out = match stdin {
            Some(input) => self.output_with_stdin(input),
            None => self.output(),
        };
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs with `input` on stdin.
    pub fn output_with_stdin(mut self, input: &[u8]) -> Output {
        let mut child = self
            .0
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pubrun");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs, asserts success; its stdout.
    pub fn ok(self) -> String {
        let what = format!("{:?}", self.0.get_args().collect::<Vec<_>>());
        stdout_ok(&what, self.output())
    }

    /// [`Cli::ok`] whose failure message ends with `log()` (the server's log).
    pub fn ok_or_log(self, log: impl Fn() -> String) -> String {
        let what = format!("{:?}", self.0.get_args().collect::<Vec<_>>());
        let out = self.output();
        assert!(
            out.status.success(),
            "`pubrun {what}` failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs, asserts failure; its stderr.
    pub fn fails(self) -> String {
        let what = format!("{:?}", self.0.get_args().collect::<Vec<_>>());
        let out = self.output();
        assert!(!out.status.success(), "pubrun {what} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
}

/// `out`'s stdout after asserting it succeeded (`what` names the command).
pub fn stdout_ok(what: &str, out: Output) -> String {
    pubrun_testkit::output_ok(&format!("pubrun {what}"), &out)
}

/// `pubrun ARGS --json` against the server on `port`, in `project` (or none:
/// `PUBRUN_PROJECT` cleared); panics with `log()` (the servers' logs) when
/// the command fails.
pub fn cli_json(
    port: u16,
    project: Option<&str>,
    args: &[&str],
    log: impl Fn() -> String,
) -> serde_json::Value {
    let mut cli = Cli::new(args)
        .env("PUBRUN_ADDR", format!("http://127.0.0.1:{port}"))
        .env_remove("PUBRUN_PROJECT");
    cli.command().arg("--json");
    if let Some(p) = project {
        cli = cli.env("PUBRUN_PROJECT", p);
    }
    let out = cli.output();
    assert!(
        out.status.success(),
        "`pubrun {}` failed: {}\n--- server log ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Cluster mode: server `node` on the store at `url`, with its data in
/// `data`, its log in `log` and a port fixed up front (so that a test can
/// name a node's port before the node is up, or restart it on the same one).
pub fn cluster_node(
    url: &str,
    node: &str,
    lease_ttl: Duration,
    data: &Path,
    port: u16,
    log: &Path,
) -> ServeBuilder {
    ServeBuilder::cluster(url, node, lease_ttl)
        .data_dir(data)
        .port(port)
        .log_file(log)
}

/// Cluster mode: two nodes' places on one throwaway PostgreSQL: a temp dir
/// holding their data dirs (`a`, `b`) and their logs (`a.log`, `b.log`).
pub fn two_nodes() -> (
    pubrun_store::testing::TempPostgres,
    tempfile::TempDir,
    (PathBuf, PathBuf),
    (PathBuf, PathBuf),
) {
    let pg = pubrun_store::testing::TempPostgres::start();
    let dirs = tempfile::tempdir().unwrap();
    let at = |name: &str| dirs.path().join(name);
    let (data, logs) = ((at("a"), at("b")), (at("a.log"), at("b.log")));
    (pg, dirs, data, logs)
}

/// A log file as it is now (empty while it does not exist yet).
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Cluster mode: waits (60 s at most) until `server` logs, in `log()`, that
/// it waits as a hot standby; panics if it exits first.
pub async fn wait_standby(server: &mut Serve, log: impl Fn() -> String) {
    let log = &log;
    poll_async(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let ready = log().contains("waiting as a hot standby");
            if !ready {
                let running = server.child().try_wait().unwrap().is_none();
                assert!(running, "standby exited:\n{}", log());
            }
            std::future::ready(ready_if(ready, ()))
        },
        |()| format!("never became a standby:\n{}", log()),
    )
    .await
}

/// Creates `topic` and a subscription `subscription` on it (600 s ack
/// deadline, so nothing is redelivered during a test) through `ch`.
pub async fn create_topic_and_subscription(ch: &Channel, topic: &str, subscription: &str) {
    create_topic_and_subscription_as(ch, None, topic, subscription).await
}

/// [`create_topic_and_subscription`] sending `token` as a bearer token.
pub async fn create_topic_and_subscription_as(
    ch: &Channel,
    token: Option<&str>,
    topic: &str,
    subscription: &str,
) {
    pb::publisher_client::PublisherClient::new(ch.clone())
        .create_topic(bearer(
            token,
            pb::Topic {
                name: topic.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    pb::subscriber_client::SubscriberClient::new(ch.clone())
        .create_subscription(bearer(
            token,
            pb::Subscription {
                name: subscription.into(),
                topic: topic.into(),
                ack_deadline_seconds: 600,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

/// A gRPC request carrying `token` (when given) as a bearer token.
pub fn bearer<T>(token: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

/// Opens a StreamingPull on `subscription` with the given stream ack
/// deadline. The stream stays open while the returned sender lives; dropping
/// it half-closes the stream.
pub async fn open_streaming_pull(
    ch: &Channel,
    subscription: &str,
    ack_deadline_seconds: i32,
) -> (
    tokio::sync::mpsc::Sender<pb::StreamingPullRequest>,
    tonic::Streaming<pb::StreamingPullResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::StreamingPullRequest {
        subscription: subscription.into(),
        stream_ack_deadline_seconds: ack_deadline_seconds,
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = pb::subscriber_client::SubscriberClient::new(ch.clone())
        .streaming_pull(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// One `Pull` of up to `max` messages that returns at once, empty or not.
#[allow(deprecated)] // `return_immediately` is deprecated but is what these tests poll with
pub async fn pull_now(
    sub: &mut pb::subscriber_client::SubscriberClient<Channel>,
    subscription: &str,
    max: i32,
) -> Result<Vec<pb::ReceivedMessage>, tonic::Status> {
    let r = sub
        .pull(pb::PullRequest {
            subscription: subscription.into(),
            max_messages: max,
            return_immediately: true,
        })
        .await?;
    Ok(r.into_inner().received_messages)
}

/// Deterministic bytes (xorshift) that never repeat a chunk, so an upload
/// or resume off by a chunk shows.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = (seed ^ 0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The array at `key` of a JSON reply (panics, showing the reply, when
/// there is none).
pub fn array<'a>(v: &'a serde_json::Value, key: &str) -> &'a [serde_json::Value] {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array {key:?} in {v:#}"))
}

/// A server and one HTTP client for all of a test's requests (a test adds
/// its own requests in an `impl`); derefs to the [`Serve`].
pub struct HttpServe {
    pub serve: Serve,
    pub http: reqwest::Client,
    /// The temp dir the test made for the server, when it made one.
    pub dir: Option<tempfile::TempDir>,
}

impl std::ops::Deref for HttpServe {
    type Target = Serve;
    fn deref(&self) -> &Serve {
        &self.serve
    }
}

/// The line of a CLI table whose first column is `first`.
pub fn table_row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row starting with {first:?} in:\n{table}"))
}

/// Sends `req` (`what` names it in the panic), asserts a 2xx and returns the
/// body as JSON (`null` when it is not JSON, e.g. empty).
pub async fn ok_json(req: reqwest::RequestBuilder, what: &str) -> serde_json::Value {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{what}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// Sends `req` and parses the reply as JSON (panics when either fails).
pub async fn json_reply(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.unwrap().json().await.unwrap()
}
