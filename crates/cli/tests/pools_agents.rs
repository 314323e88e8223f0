//! A pool of agents, end to end with real processes: `pubrun serve` with an
//! `agents` pool and two `pubrun agent` processes on this machine.
//!
//! - a run is leased, executed on an agent, its log shipped and its result
//!   recorded;
//! - an agent frozen (SIGSTOP: as good as a cut network) past the lease
//!   timeout loses the run to the other agent; when it wakes up, its late
//!   log and result are refused and the run is recorded once;
//! - the server killed while an agent runs, and started again after the run
//!   ended: the agent reconnects and reports it, still attempt 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Cli, Serve, ServeBuilder, BIN};

const PATIENCE: Duration = Duration::from_secs(120);
const TOKEN: &str = "crew-token-for-tests";

fn manifest() -> String {
    include_str!("manifests/pools-agents.toml").to_string()
}

struct Env {
    server: Serve,
    agents: Vec<(String, Child)>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            // A stopped process must be continued to die of SIGKILL promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &a.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

impl Env {
    /// [`Env::new`] with agent `name` started and joined.
    fn with_agent(name: &str) -> Env {
        let mut env = Env::new();
        env.start_agent(name);
        env.wait_agents(&[name]);
        env
    }

    fn new() -> Env {
        let server = ServeBuilder::new()
            .config(manifest())
            .env("CREW_TOKEN", TOKEN)
            .log_level("info")
            .patience(PATIENCE)
            .start();
        Env {
            server,
            agents: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.server.path(name)
    }

    /// Starts the server again on the same port and data.
    fn start_server(&mut self) {
        self.server.respawn();
        self.server.wait_healthy();
    }

    fn kill_server(&mut self) {
        self.server.kill();
    }

    fn start_agent(&mut self, name: &str) {
        let log = std::fs::File::create(self.path(&format!("agent-{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args([
                "agent",
                "--server",
                &format!("http://127.0.0.1:{}", self.server.port()),
            ])
            .args(["--pool", "crew", "--name", name, "--slots", "1"])
            .arg("--data-dir")
            .arg(self.path(&format!("agent-{name}")))
            .env("PUBRUN_TOKEN", TOKEN)
            .env("PUBRUN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pubrun agent");
        self.agents.push((name.to_string(), child));
    }

    fn agent_pid(&self, name: &str) -> u32 {
        self.agents.iter().find(|(n, _)| n == name).unwrap().1.id()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["serve.log", "agent-a.log", "agent-b.log"] {
            let text = std::fs::read_to_string(self.path(f)).unwrap_or_default();
            out.push_str(&format!("--- {f} ---\n{text}\n"));
        }
        out
    }

    fn cli(&self, args: &[&str]) -> String {
        Cli::new(args)
            .env("PUBRUN_ADDR", self.server.addr())
            .ok_or_log(|| self.logs())
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli(&a)).unwrap()
    }

    /// GET on the admin API (no server token in these tests).
    fn get(&self, path: &str) -> Value {
        let url = self.server.url(path);
        let body = common_http_get(&url);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Polls `probe` until it returns Some, for up to PATIENCE.
    fn wait<T>(&self, what: &str, probe: impl FnMut() -> Option<T>) -> T {
        pubrun_testkit::wait_until(what, PATIENCE, probe, || self.logs())
    }

    fn publish(&self, secs: u32) -> String {
        self.publish_marked(secs, "")
    }

    /// `mark`: a file the job creates when it has ended (on this machine).
    fn publish_marked(&self, secs: u32, mark: &str) -> String {
        let data = serde_json::json!({ "secs": secs, "mark": mark }).to_string();
        // The run appears a moment after the publish returns: wait for an id
        // not seen before, or an earlier run would stand in for this one.
        let before = self.run_ids();
        self.cli(&["publish", "work", "--data", &data]);
        self.wait("a new run of nap", || {
            self.run_ids().into_iter().find(|id| !before.contains(id))
        })
    }

    fn run_ids(&self) -> Vec<String> {
        let runs = self.json(&["runs", "--job", "nap"]);
        runs["runs"]
            .as_array()
            .map(|a| a.iter().map(|r| r["id"].to_string()).collect())
            .unwrap_or_default()
    }

    fn run_log(&self, id: &str) -> String {
        self.json(&["logs", id])["log"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_log(&self, id: &str, needle: &str) -> String {
        self.wait(&format!("run {id} log containing {needle:?}"), || {
            let log = self.run_log(id);
            log.contains(needle).then_some(log)
        })
    }

    fn wait_terminal(&self, id: &str) -> Value {
        self.wait(&format!("run {id} ends"), || {
            let run = self.json(&["runs", "show", id])["run"].clone();
            matches!(
                run["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled")
            )
            .then_some(run)
        })
    }

    fn wait_agents(&self, names: &[&str]) {
        self.wait(&format!("agents {names:?} connected"), || {
            let agents = self.get("/api/v1/agents");
            let have: Vec<&str> = agents["agents"]
                .as_array()?
                .iter()
                .filter_map(|a| a["name"].as_str())
                .collect();
            names.iter().all(|n| have.contains(n)).then_some(())
        });
    }
}

/// A tiny blocking HTTP GET (the tests need nothing more).
fn common_http_get(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::get(url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        r.text().await.unwrap()
    })
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

#[test]
fn a_run_executes_on_an_agent_and_a_frozen_agent_loses_it_to_another() {
    let mut env = Env::with_agent("a");

    // A short run: executed on a, log shipped, result recorded.
    let first = env.publish(0);
    let run = env.wait_terminal(&first);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    let log = env.run_log(&first);
    assert!(log.contains("leased to machine a"), "{log}");
    assert!(log.contains("running on agent a"), "{log}");
    assert_eq!(count(&log, "begin\n"), 1, "{log}");
    assert_eq!(count(&log, "end\n"), 1, "{log}");

    // A longer run starts on a; b joins; a freezes (its child keeps going).
    let second = env.publish(8);
    env.wait(&format!("run {second} begins on a"), || {
        let log = env.run_log(&second);
        (log.contains("running on agent a") && log.contains("begin\n")).then_some(())
    });
    env.start_agent("b");
    env.wait_agents(&["a", "b"]);
    let a = env.agent_pid("a");
    signal(a, "-STOP");

    // Past the lease timeout the run goes to b, same attempt.
    let log = env.wait_log(&second, "running on agent b");
    assert!(log.contains("lost:"), "the lost lease is noted:\n{log}");
    // a wakes up after its child ended; its late log and result are refused.
    signal(a, "-CONT");
    let run = env.wait_terminal(&second);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(
        run["attempt"], 1,
        "a lost lease uses up no attempt: {run:#}"
    );
    assert_eq!(run["machine"], "b", "{run:#}");
    let agent_a_log = env.path("agent-a.log");
    env.wait("agent a told its lease is gone", || {
        (file_contains(&agent_a_log, "409")
            || file_contains(&agent_a_log, "fenced")
            || file_contains(&agent_a_log, "revoked"))
        .then_some(())
    });
    let log = env.run_log(&second);
    assert_eq!(count(&log, "begin\n"), 2, "one begin per lease:\n{log}");
    assert_eq!(count(&log, "end\n"), 1, "only b's end is accepted:\n{log}");
    // The run's final record stays b's.
    let again = env.json(&["runs", "show", &second])["run"].clone();
    assert_eq!(again["status"], "succeeded");
    assert_eq!(again["ended_at_ms"], run["ended_at_ms"], "{again:#}");

    // Both machines' time is in the cost report, the runs with it.
    let cost = env.get("/api/v1/cost");
    let crew = common::array(&cost, "pools")
        .iter()
        .find(|p| p["pool"] == "crew")
        .unwrap_or_else(|| panic!("{cost:#}"));
    assert!(crew["run_seconds"].as_f64().unwrap() > 0.0, "{cost:#}");
    let run_ids: Vec<String> = common::array(&cost, "runs")
        .iter()
        .map(|r| r["run_id"].to_string())
        .collect();
    assert!(
        run_ids
            .iter()
            .any(|r| r.trim_matches('"') == second.trim_matches('"')),
        "{cost:#}"
    );
}

#[test]
fn a_stopping_agent_hands_its_run_back() {
    let mut env = Env::with_agent("a");
    let id = env.publish(30);
    env.wait(&format!("run {id} begins on a"), || {
        let log = env.run_log(&id);
        (log.contains("running on agent a") && log.contains("begin\n")).then_some(())
    });
    env.start_agent("b");
    env.wait_agents(&["a", "b"]);
    // SIGTERM: a stops its run and reports it as handed back, then exits.
    signal(env.agent_pid("a"), "-TERM");
    let deadline = Instant::now() + PATIENCE;
    let exited = loop {
        let (_, child) = env.agents.iter_mut().find(|(n, _)| n == "a").unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent a still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exited.success(), "agent a: {exited}\n{}", env.logs());
    let log = env.wait_log(&id, "running on agent b");
    assert!(
        log.contains("agent a stopped during the run"),
        "handed back, not timed out:\n{log}"
    );
    let run = env.json(&["runs", "show", &id])["run"].clone();
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert_eq!(run["status"], "running", "{run:#}");
    assert_eq!(run["machine"], "b", "{run:#}");
}

#[test]
fn a_server_restart_does_not_lose_a_run_on_an_agent() {
    let mut env = Env::with_agent("a");
    let mark = env.path("ended");
    let id = env.publish_marked(3, mark.to_str().unwrap());
    env.wait_log(&id, "begin\n");
    env.kill_server();
    // The run ends while the server is down; the agent reports it when it
    // is back.
    env.wait("the run ends on the agent", || mark.exists().then_some(()));
    env.start_server();
    let run = env.wait_terminal(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(run["attempt"], 1, "{run:#}");
    let log = env.run_log(&id);
    assert_eq!(count(&log, "begin\n"), 1, "ran once:\n{log}");
    assert_eq!(count(&log, "end\n"), 1, "{log}");
    assert!(!log.contains("lost:"), "{log}");
}
