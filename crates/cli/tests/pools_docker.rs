//! Docker pools end to end with the real engine: a real `pubrun serve`
//! listening on the gateway of a docker network made for the test (the
//! gateway address is on this host, so the machine containers reach the
//! server there), `provider = "docker"` pools of the agent image that
//! scripts/agent-image.sh builds from this very binary, and jobs on them.
//!
//! - `machines_come_with_work_and_go_when_idle`: no work, no machines;
//!   three runs start two machines (`max_machines = 2`), succeed with their
//!   logs at `/api/v1/runs/{id}/log`; idle past `idle_timeout`, the machines
//!   are deleted (docker has no container of the pool left) and cost is
//!   reported; two more runs start machines under new names (never a
//!   deleted machine's), each with its own cost row;
//! - `a_partitioned_machine_loses_its_run_to_another`: the container of a
//!   machine running a long run is cut from the network
//!   (`docker network disconnect`) past `lease_timeout`: the lease is taken
//!   back, the run runs again on a new machine and is recorded once; the
//!   partitioned machine is stopped and deleted (it would go on costing);
//!   a late result or log for the old lease gets 409 and changes nothing;
//! - `docker_jobs_run_on_docker_socket_machines`: a container job on a pool
//!   with `docker_socket = true`: its work directory (message file in,
//!   output file back to a bucket) resolves on the host.
//!
//! Events are awaited by polling the REST API (up to [`PATIENCE`]); no fixed
//! sleeps. Containers and networks are removed by label/name when a test
//! ends, whatever happened. Without a Docker engine the tests print SKIPPED,
//! except under CI=true where they fail. They run one at a time (a lock):
//! lease timeouts of a few seconds and a 2-core machine do not mix with
//! three servers and their machines at once.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pubrun_core::run::Exit;
use pubrun_pools::http::AGENT_HEADER;
use pubrun_pools::protocol::{Report, PREFIX};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const PATIENCE: Duration = Duration::from_secs(120);
const AGENT_IMAGE: &str = "pubrun-agent:dev";
const JOB_IMAGE: &str = "pubrun-test/busybox:latest";
const SERVER_TOKEN: &str = "server-token-pools-docker";
const POOL_TOKEN: &str = "pool-token-pools-docker";
const POOL_LABEL: &str = "pubrun.pool";

fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).stdin(Stdio::null()).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("{cmd}: {e}")),
    }
}

fn docker(args: &[&str]) -> (bool, String) {
    sh("docker", args)
}

/// The engine answers, the agent image is built from this binary and the
/// busybox job image exists; otherwise SKIPPED (a failure under CI=true).
/// Also serializes the tests (see the module doc).
fn ready(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !pubrun_testkit::require_docker(test) {
        return None;
    }
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let ready = READY.get_or_init(|| {
        pubrun_testkit::run_script("agent-image.sh", &[BIN, AGENT_IMAGE])?;
        pubrun_testkit::run_script("docker-test-image.sh", &[])?;
        Ok(())
    });
    match ready {
        Ok(()) => Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())),
        Err(why) => panic!("{test}: {why}"),
    }
}

/// One test's world: a docker network, a server on its gateway, a pool
/// named uniquely (machine containers are `pubrun-POOL-N`). Dropping it
/// kills the server and removes the pool's containers, the job containers
/// of its jobs and the network.
struct Env {
    dir: tempfile::TempDir,
    pool: String,
    net: String,
    gateway: String,
    port: u16,
    server: Option<common::Server>,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    _serial: MutexGuard<'static, ()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.take();
        for filter in [
            format!("label={POOL_LABEL}={}", self.pool),
            // Job containers: job names carry the pool name.
            format!("label=pubrun.job={}", self.job("boxed")),
        ] {
            let (_, ids) = docker(&["ps", "-aq", "--filter", &filter]);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                docker(&args);
            }
        }
        docker(&["network", "rm", &self.net]);
    }
}

impl Env {
    /// `pool_keys`: extra lines of the `[[pool]]`; `rest`: more manifest
    /// (jobs), where `POOL` stands for the pool's name.
    fn new(serial: MutexGuard<'static, ()>, tag: &str, pool_keys: &str, rest: &str) -> Env {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let pool = format!("pd-{tag}-{}-{}", std::process::id(), nanos % 100_000);
        let net = format!("pubrun-test-{pool}");
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = docker(&[
            "network",
            "create",
            "--label",
            "pubrun.test=pools_docker",
            &net,
        ]);
        assert!(ok, "docker network create {net}: {out}");
        let mut env = Env {
            dir,
            pool: pool.clone(),
            net: net.clone(),
            gateway: String::new(),
            port: 0,
            server: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
            _serial: serial,
        };
        let (ok, gw) = docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            &net,
        ]);
        assert!(ok, "docker network inspect {net}: {gw}");
        env.gateway = gw
            .split_whitespace()
            .find(|g| g.parse::<std::net::Ipv4Addr>().is_ok())
            .unwrap_or_else(|| panic!("network {net} has no IPv4 gateway: {gw}"))
            .to_string();
        // A free port on the gateway address (this host's side of the network).
        env.port = std::net::TcpListener::bind((env.gateway.as_str(), 0))
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", env.gateway))
            .local_addr()
            .unwrap()
            .port();
        let manifest = common::fill(
            include_str!("manifests/pools-docker.toml"),
            &[
                ("pool", &pool),
                ("AGENT_IMAGE", &AGENT_IMAGE),
                ("net", &net),
                ("gw", &env.gateway),
                ("port", &env.port),
                ("pool_keys", &pool_keys),
                ("rest", &rest.replace("POOL", &pool)),
            ],
        );
        std::fs::write(env.path("pubrun.toml"), manifest).unwrap();
        env.start_server();
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn job(&self, name: &str) -> String {
        format!("{}-{name}", self.pool)
    }

    fn addr(&self) -> String {
        format!("http://{}:{}", self.gateway, self.port)
    }

    fn start_server(&mut self) {
        // Appended to: a restarted server's log follows the first one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("serve.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("{}:{}", self.gateway, self.port),
            ])
            .args(["--token", SERVER_TOKEN])
            .arg("--data-dir")
            .arg(self.path("data"))
            .arg("--config")
            .arg(self.path("pubrun.toml"))
            .env("PD_POOL_TOKEN", POOL_TOKEN)
            .env("PUBRUN_LOG", "info")
            .env_remove("PUBRUN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pubrun serve");
        let mut server = common::Server(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = server.0.try_wait().unwrap() {
                panic!("pubrun serve exited: {status}\n{}", self.logs());
            }
            if self.request("GET", "/healthz", None, &[]).0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pubrun serve not healthy\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.server = Some(server);
    }

    /// The server's log and every machine container's (agent) log.
    fn logs(&self) -> String {
        let mut out = format!(
            "--- serve.log ---\n{}\n",
            std::fs::read_to_string(self.path("serve.log")).unwrap_or_default()
        );
        let (_, names) = self.docker_ps("{{.Names}}");
        for name in names.split_whitespace() {
            let (_, log) = docker(&["logs", name]);
            out.push_str(&format!("--- docker logs {name} ---\n{log}\n"));
        }
        out
    }

    /// A request with the server token unless `headers` bring their own
    /// Authorization; returns (status, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let url = format!("{}{path}", self.addr());
        let mut req = self
            .http
            .request(method.parse().unwrap(), &url)
            .timeout(Duration::from_secs(30));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            req = req.bearer_auth(SERVER_TOKEN);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        self.rt.block_on(async {
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    (status, r.text().await.unwrap_or_default())
                }
                Err(e) => (0, e.to_string()),
            }
        })
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = self.request("GET", path, None, &[]);
        assert_eq!(status, 200, "GET {path}: {body}\n{}", self.logs());
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    fn cli(&self, args: &[&str]) -> String {
        common::Cli::new(args)
            .env("PUBRUN_ADDR", self.addr())
            .env("PUBRUN_TOKEN", SERVER_TOKEN)
            .env("PUBRUN_PROJECT", "demo")
            .ok_or_log(|| self.logs())
    }

    /// Polls `probe` until it returns Some, for up to PATIENCE.
    fn wait<T>(&self, what: &str, probe: impl FnMut() -> Option<T>) -> T {
        pubrun_testkit::wait_until(what, PATIENCE, probe, || self.logs())
    }

    /// Publishes to `topic`; returns the id of the run made for it.
    fn publish(&self, topic: &str, job: &str, data: &str) -> i64 {
        let msg = self
            .cli(&["publish", topic, "--data", data])
            .trim()
            .to_string();
        let job = self.job(job);
        self.wait(&format!("a run of {job} for message {msg}"), || {
            let runs = self.get(&format!("/api/v1/runs?job={job}&limit=1000"));
            runs["runs"].as_array()?.iter().find_map(|r| {
                let id = r["message"]["id"].as_str()?;
                (id == msg || id.rsplit('/').next() == Some(msg.as_str()))
                    .then(|| r["id"].as_i64())
                    .flatten()
            })
        })
    }

    fn run(&self, id: i64) -> Value {
        self.get(&format!("/api/v1/runs/{id}"))["run"].clone()
    }

    fn run_log(&self, id: i64) -> String {
        let (status, body) = self.request("GET", &format!("/api/v1/runs/{id}/log"), None, &[]);
        assert_eq!(status, 200, "log of run {id}: {body}");
        body
    }

    fn wait_log(&self, id: i64, what: &str, mut ok: impl FnMut(&str) -> bool) -> String {
        self.wait(&format!("run {id}: {what}"), || {
            let log = self.run_log(id);
            ok(&log).then_some(log)
        })
    }

    fn wait_terminal(&self, id: i64) -> Value {
        self.wait(&format!("run {id} ends"), || {
            let run = self.run(id);
            matches!(
                run["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled")
            )
            .then_some(run)
        })
    }

    /// The pool's machines as the server records them.
    fn machines(&self) -> Vec<Value> {
        self.get("/api/v1/machines")["machines"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["pool"] == self.pool.as_str())
            .cloned()
            .collect()
    }

    /// The cost report, and its row for this pool.
    fn cost(&self) -> (Value, Value) {
        let cost = self.get("/api/v1/cost");
        let pool = common::array(&cost, "pools")
            .iter()
            .find(|p| p["pool"] == self.pool.as_str())
            .unwrap_or_else(|| panic!("{cost:#}"))
            .clone();
        (cost, pool)
    }

    /// Machines of the pool in the cost report, sorted (one row each).
    fn cost_machines(&self) -> Vec<String> {
        let cost = self.get("/api/v1/cost");
        let mut v: Vec<String> = common::array(&cost, "machines")
            .iter()
            .filter(|m| m["pool"] == self.pool.as_str())
            .filter_map(|m| m["machine"].as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// Names of the agents `pubrun agents` lists for this pool.
    fn agents(&self) -> Vec<String> {
        self.get("/api/v1/agents")["agents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["pool"] == self.pool.as_str())
            .filter_map(|a| a["name"].as_str().map(str::to_string))
            .collect()
    }

    fn machines_up(&self) -> usize {
        let pools = self.get("/api/v1/pools");
        let p = common::array(&pools, "pools")
            .iter()
            .find(|p| p["name"] == self.pool.as_str())
            .unwrap_or_else(|| panic!("pool {} not listed: {pools:#}", self.pool))
            .clone();
        p["machines_up"].as_u64().unwrap() as usize
    }

    /// `docker ps -a` of the pool's containers, one line each in `format`.
    fn docker_ps(&self, format: &str) -> (bool, String) {
        let label = format!("label={POOL_LABEL}={}", self.pool);
        docker(&["ps", "-a", "--filter", &label, "--format", format])
    }

    /// The pool's containers per docker: (name, state).
    fn containers(&self) -> Vec<(String, String)> {
        let (ok, out) = self.docker_ps("{{.Names}} {{.State}}");
        assert!(ok, "docker ps: {out}");
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect()
    }

    fn running_containers(&self) -> usize {
        self.containers()
            .iter()
            .filter(|(_, s)| s == "running")
            .count()
    }

    /// Waits until the server counts no machine up and docker has no
    /// container of the pool left (docker pools delete idle machines).
    fn wait_pool_empty(&self) {
        self.wait("the pool back to 0 machines", || {
            (self.machines_up() == 0 && self.containers().is_empty()).then_some(())
        });
        for m in self.machines() {
            assert!(
                matches!(m["state"].as_str(), Some("stopped" | "failed")),
                "{m:#}"
            );
        }
    }
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// `leased to machine NAME (lease N)` lines of a run log, in order.
fn leases(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("leased to machine ")? + "leased to machine ".len()..];
            let (name, rest) = rest.split_once(" (lease ")?;
            let n = rest.split(')').next()?.trim().parse().ok()?;
            Some((name.to_string(), n))
        })
        .collect()
}

const NAP_JOB: &str = r#"
[[job]]
name = "POOL-nap"
topic = "work"
pool = "POOL"
process = { command = "sh", args = ["-c", "echo begin {{ data.n }}; sleep {{ data.secs }}; echo end {{ data.n }}"] }
concurrency = 4
retries = { max_attempts = 2, initial_backoff = "1s", max_backoff = "2s" }
"#;

#[test]
fn machines_come_with_work_and_go_when_idle() {
    let Some(serial) = ready("machines_come_with_work_and_go_when_idle") else {
        return;
    };
    // A long lease timeout: this test is about scaling, not lost leases.
    let env = Env::new(serial, "scale", "lease_timeout = \"60s\"", NAP_JOB);
    let started = Instant::now();

    // No work: no machine, now and for a few autoscaler passes.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(3) {
        assert_eq!(env.machines_up(), 0);
        assert!(env.containers().is_empty(), "{:?}", env.containers());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(env.machines().is_empty());

    // Three runs: two machines (max_machines), never more.
    let ids: Vec<i64> = (1..=3)
        .map(|n| env.publish("work", "nap", &format!(r#"{{"n": {n}, "secs": 3}}"#)))
        .collect();
    let mut most_up = 0;
    let mut most_running = 0;
    let runs: Vec<Value> = ids
        .iter()
        .map(|&id| {
            env.wait(&format!("run {id} ends"), || {
                most_up = most_up.max(env.machines_up());
                most_running = most_running.max(env.running_containers());
                let run = env.run(id);
                matches!(
                    run["status"].as_str(),
                    Some("succeeded" | "failed" | "timed_out" | "cancelled")
                )
                .then_some(run)
            })
        })
        .collect();
    assert!((1..=2).contains(&most_up), "machines up at once: {most_up}");
    assert!(
        most_running <= 2,
        "containers running at once: {most_running}"
    );
    let machines = env.machines();
    assert!(
        (1..=2).contains(&machines.len()),
        "machines ever started: {machines:#?}"
    );
    for (n, (run, id)) in runs.iter().zip(&ids).enumerate() {
        let n = n + 1;
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
        assert_eq!(run["attempt"], 1, "{run:#}");
        let machine = run["machine"].as_str().unwrap_or_default();
        assert!(
            machine.starts_with(&format!("pubrun-{}-", env.pool)),
            "{run:#}"
        );
        // The log, shipped from the machine, is the server's.
        let log = env.run_log(*id);
        assert!(
            log.contains(&format!("running on agent {machine}")),
            "{log}"
        );
        assert_eq!(count(&log, &format!("begin {n}\n")), 1, "{log}");
        assert_eq!(count(&log, &format!("end {n}\n")), 1, "{log}");
    }
    eprintln!(
        "3 runs on {} machine(s) done after {:?}",
        machines.len(),
        started.elapsed()
    );

    // Idle past idle_timeout: deleted, per the server and per docker.
    env.wait_pool_empty();
    eprintln!("pool empty again after {:?}", started.elapsed());

    // The machines' time is in the cost report, the runs' share with it.
    let (cost, pool) = env.cost();
    assert!(pool["run_seconds"].as_f64().unwrap() > 0.0, "{pool:#}");
    let text = env.cli(&["cost"]);
    assert!(text.contains(&env.pool), "{text}");
    let first_wave = env.cost_machines();
    assert!(!first_wave.is_empty(), "{cost:#}");
    assert!(env.agents().is_empty(), "agents of deleted machines listed");

    // Up again from zero (issue 11 item 4): new machines get new names —
    // an old one may still be in the middle of being deleted — and cost
    // rows of their own.
    let ids: Vec<i64> = (4..=5)
        .map(|n| env.publish("work", "nap", &format!(r#"{{"n": {n}, "secs": 2}}"#)))
        .collect();
    for id in ids {
        let run = env.wait_terminal(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
        assert_eq!(run["attempt"], 1, "{run:#}");
        let machine = run["machine"].as_str().unwrap_or_default().to_string();
        assert!(
            !first_wave.contains(&machine),
            "machine name {machine} reused from {first_wave:?}"
        );
    }
    env.wait_pool_empty();
    let all = env.cost_machines();
    let mut distinct = all.clone();
    distinct.dedup();
    assert_eq!(distinct, all, "one cost row per machine: {all:?}");
    assert!(all.len() > first_wave.len(), "{first_wave:?} then {all:?}");
    assert!(env.agents().is_empty(), "agents of deleted machines listed");
}

#[test]
fn a_partitioned_machine_loses_its_run_to_another() {
    let Some(serial) = ready("a_partitioned_machine_loses_its_run_to_another") else {
        return;
    };
    let env = Env::new(serial, "cut", "lease_timeout = \"5s\"", NAP_JOB);

    // A long run starts on the first machine.
    let id = env.publish("work", "nap", r#"{"n": 1, "secs": 20}"#);
    let log = env.wait_log(id, "begins on a machine", |l| {
        l.contains("begin 1\n") && !leases(l).is_empty()
    });
    let (first, lease) = leases(&log)[0].clone();
    assert_eq!(env.containers(), [(first.clone(), "running".to_string())]);

    // Cut off: the server hears nothing from it past lease_timeout.
    let (ok, out) = docker(&["network", "disconnect", "-f", &env.net, &first]);
    assert!(ok, "docker network disconnect: {out}");
    let cut_at = Instant::now();

    // The run is taken back and runs again on another machine.
    let log = env.wait_log(id, "leased to a second machine", |l| leases(l).len() >= 2);
    assert!(log.contains("lost:"), "the lost lease is noted:\n{log}");
    let (second, second_lease) = leases(&log)[1].clone();
    assert_ne!(second, first, "{log}");
    assert!(second_lease > lease, "fencing tokens grow: {log}");
    eprintln!(
        "lease taken back and given to {second} {:?} after the cut",
        cut_at.elapsed()
    );

    // The partitioned machine is stopped and deleted: it would cost money
    // (and its run's effects would be doubled) for nothing.
    env.wait(&format!("the partitioned machine {first} deleted"), || {
        (!env.containers().iter().any(|(n, _)| *n == first)).then_some(())
    });
    // Reconnecting it, were it still there, would not bring it back.
    let (reconnected, _) = docker(&["network", "connect", &env.net, &first]);
    assert!(!reconnected, "{first} still exists");

    let run = env.wait_terminal(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(run["machine"], second.as_str(), "{run:#}");
    // A lost lease is the infrastructure's fault: it uses up no attempt.
    assert_eq!(run["attempt"], 1, "{run:#}");
    let log = env.run_log(id);
    assert_eq!(count(&log, "begin 1\n"), 2, "one begin per lease:\n{log}");
    assert_eq!(
        count(&log, "end 1\n"),
        1,
        "only the second lease ends:\n{log}"
    );
    let runs = env.get(&format!("/api/v1/runs?job={}", env.job("nap")));
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        1,
        "recorded once: {runs:#}"
    );

    // What the old machine's agent would say late, with its own credentials
    // (name + pool token), is refused: 409 for its result and its log.
    let report = serde_json::to_vec(&Report {
        exit: Exit {
            exit_code: Some(3),
            error: Some("late".into()),
            ..Default::default()
        },
    })
    .unwrap();
    let auth = format!("Bearer {POOL_TOKEN}");
    let headers = [
        ("authorization", auth.as_str()),
        (AGENT_HEADER, first.as_str()),
    ];
    let (status, body) = env.request(
        "POST",
        &format!("{PREFIX}/leases/{lease}/result"),
        Some(report.clone()),
        &headers,
    );
    assert_eq!(status, 409, "late result: {body}");
    let (status, body) = env.request(
        "POST",
        &format!("{PREFIX}/leases/{lease}/log?offset=0"),
        Some(b"late bytes\n".to_vec()),
        &headers,
    );
    assert_eq!(status, 409, "late log: {body}");
    // A wrong token learns nothing about the lease.
    let (status, _) = env.request(
        "POST",
        &format!("{PREFIX}/leases/{lease}/result"),
        Some(report),
        &[
            ("authorization", "Bearer wrong"),
            (AGENT_HEADER, first.as_str()),
        ],
    );
    assert!(status == 401 || status == 404, "wrong token: {status}");
    let again = env.run(id);
    for key in ["status", "attempt", "machine", "exit", "ended_at_ms"] {
        assert_eq!(
            again[key], run[key],
            "the late calls changed the run's {key}: {again:#}"
        );
    }
    assert_eq!(env.run_log(id), log, "the late calls changed the log");

    // Idle: back to no machines.
    env.wait_pool_empty();
    let machines = env.machines();
    let first_row = machines
        .iter()
        .find(|m| m["name"] == first.as_str())
        .unwrap();
    assert!(
        first_row["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("not heard from"),
        "{first_row:#}"
    );
}

#[test]
fn docker_jobs_run_on_docker_socket_machines() {
    let Some(serial) = ready("docker_jobs_run_on_docker_socket_machines") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let machines_dir = tmp.path().join("machines");
    let env = Env::new(
        serial,
        "sock",
        &format!(
            "lease_timeout = \"60s\"\ndocker_socket = true\nmachine_data_dir = \"{}\"",
            machines_dir.display()
        ),
        &format!(
            r#"
[[bucket]]
name = "POOL-out"

[[job]]
name = "POOL-boxed"
topic = "work"
pool = "POOL"
docker = {{ image = "{JOB_IMAGE}", command = ["sh", "-c", "cd /workspace; echo data: $(cat $PUBRUN_DATA_FILE); mkdir -p out; echo made in a container > out/proof.txt; echo boxed done"] }}
outputs = [{{ from = "out/", to = "gs://POOL-out/{{{{ run.id }}}}/" }}]
retries = {{ max_attempts = 1 }}
"#
        ),
    );
    let id = env.publish("work", "boxed", "hello from the host");
    let run = env.wait_terminal(id);
    let log = env.run_log(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{log}\n{}", env.logs());
    let machine = run["machine"].as_str().unwrap().to_string();
    assert!(
        log.contains(&format!("running on agent {machine}")),
        "{log}"
    );
    // The message file the agent fetched into its work directory was in the
    // job container's /workspace: the bind mount resolved on the host.
    assert!(log.contains("data: hello from the host\n"), "{log}");
    assert!(log.contains("boxed done\n"), "{log}");

    // The machine: the socket and its directory at the same path inside.
    let (ok, inspect) = docker(&[
        "inspect",
        "-f",
        "{{json .HostConfig.Binds}} {{json .Config.Cmd}}",
        &machine,
    ]);
    assert!(ok, "{inspect}");
    let dir = format!("{}/{machine}", machines_dir.display());
    assert!(inspect.contains(&format!("{dir}:{dir}")), "{inspect}");
    assert!(inspect.contains("docker.sock:"), "{inspect}");
    assert!(
        inspect.contains(&format!("\"--data-dir\",\"{dir}\"")),
        "{inspect}"
    );

    // The output came back from the job container through the agent.
    let object = format!("{id}/proof.txt");
    let (status, body) = env.request(
        "GET",
        &format!(
            "/storage/v1/b/{}-out/o/{}?alt=media",
            env.pool,
            object.replace('/', "%2F")
        ),
        None,
        &[],
    );
    assert_eq!(status, 200, "{object}: {body}");
    assert_eq!(body, "made in a container\n");

    // Idle: the machine goes, and no job container is left behind.
    env.wait_pool_empty();
    let (_, left) = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=pubrun.job={}", env.job("boxed")),
    ]);
    assert!(left.trim().is_empty(), "job containers left: {left}");
    // Nor the deleted machine's directory.
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
}

#[test]
fn a_killed_machine_and_a_server_restart_lose_no_run() {
    let Some(serial) = ready("a_killed_machine_and_a_server_restart_lose_no_run") else {
        return;
    };
    let mut env = Env::new(serial, "kill", "lease_timeout = \"5s\"", NAP_JOB);

    // Two long runs, one per machine.
    let one = env.publish("work", "nap", r#"{"n": 1, "secs": 15}"#);
    let two = env.publish("work", "nap", r#"{"n": 2, "secs": 15}"#);
    let log_one = env.wait_log(one, "run 1 begins", |l| {
        l.contains("begin 1\n") && !leases(l).is_empty()
    });
    let log_two = env.wait_log(two, "run 2 begins", |l| {
        l.contains("begin 2\n") && !leases(l).is_empty()
    });
    let (killed, _) = leases(&log_one)[0].clone();
    let (survivor, _) = leases(&log_two)[0].clone();
    assert_ne!(killed, survivor, "one run per machine");

    // The machine of run 1 dies; the server restarts while run 2 runs.
    let (ok, out) = docker(&["kill", &killed]);
    assert!(ok, "docker kill {killed}: {out}");
    env.server.take();
    env.start_server();

    // Run 1 is taken back from the dead machine and runs again elsewhere.
    let log = env.wait_log(one, "run 1 leased again", |l| leases(l).len() >= 2);
    assert_ne!(leases(&log)[1].0, killed, "{log}");
    for id in [one, two] {
        let run = env.wait_terminal(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
        assert_eq!(run["attempt"], 1, "{run:#}\n{}", env.run_log(id));
    }
    // Run 2 finished where it was, through the restart; each ended once.
    assert_eq!(env.run(two)["machine"], survivor.as_str());
    let log_two = env.run_log(two);
    assert_eq!(leases(&log_two).len(), 1, "{log_two}");
    assert_eq!(count(&log_two, "end 2\n"), 1, "{log_two}");
    assert_eq!(count(&env.run_log(one), "end 1\n"), 1);
    let runs = env.get(&format!("/api/v1/runs?job={}", env.job("nap")));
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2, "{runs:#}");

    // Back to no machines, and the cost report adds up.
    env.wait_pool_empty();
    let (cost, pool) = env.cost();
    let f = |v: &Value| v.as_f64().unwrap();
    // The sum of `field` over this pool's rows of the report's `list`.
    let pool_sum = |list: &str, field: &str| -> f64 {
        common::array(&cost, list)
            .iter()
            .filter(|row| row["pool"] == env.pool.as_str())
            .map(|row| f(&row[field]))
            .sum()
    };
    let machine_sum = pool_sum("machines", "seconds");
    let run_sum = pool_sum("runs", "machine_seconds");
    let close = |a: f64, b: f64| (a - b).abs() < 0.01;
    assert!(close(f(&pool["machine_seconds"]), machine_sum), "{cost:#}");
    assert!(close(f(&pool["run_seconds"]), run_sum), "{cost:#}");
    assert!(
        close(
            f(&pool["run_seconds"]) + f(&pool["idle_seconds"]),
            f(&pool["machine_seconds"])
        ),
        "{cost:#}"
    );
    // Both runs slept 15 s on some machine; run 1 twice.
    assert!(run_sum >= 30.0, "{cost:#}");
    assert!(
        close(f(&pool["cost"]), f(&pool["machine_seconds"]) * 3.2 / 3600.0),
        "{cost:#}"
    );
}
