//! GCE pools end to end: a real `pubrun serve --config pubrun.toml` child
//! whose `[[pool]]` has `provider = "gce"` pointing at the Compute Engine
//! fake (`pubrun_pools::provider::gce_fake`, served by this test), with
//! the access token in `access_token_env`. The fake's boot hook runs the
//! real `pubrun agent` from the instance metadata, as the startup script
//! would on a real instance. Nothing here touches real GCP.
//!
//! Every wait polls with a deadline ([`PATIENCE`]); no sleep is used to
//! order events.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use pubrun_pools::provider::gce_fake::{FakeGce, FakeGceConfig};
use serde_json::{json, Value};

use common::{fill, Serve, ServeBuilder, BIN};

/// Generous: the happy path takes seconds, but the machine is shared.
const PATIENCE: Duration = Duration::from_secs(90);
const PROJECT: &str = "demo-gce";
const ZONE: &str = "europe-west1-b";
/// The fake's only accepted bearer token, handed to the server through
/// `access_token_env`.
const GCE_TOKEN: &str = "fake-gce-token-pools-gce";
const GCE_TOKEN_ENV: &str = "PUBRUN_TEST_GCE_ACCESS_TOKEN";
/// The pool's agent token (`token_env`), so the test knows what the
/// instance metadata must carry.
const POOL_TOKEN: &str = "pool-token-0123456789abcdef";
const POOL_TOKEN_ENV: &str = "PUBRUN_TEST_GCE_POOL_TOKEN";
const PRICE: f64 = 3.6;

/// Polls `$body` (an `Option`, may `.await`) until it is `Some`; panics
/// with `$what` and the logs after [`PATIENCE`].
macro_rules! wait_until {
    ($env:expr, $what:expr, $body:expr) => {{
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = $body {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "{} not within {:?}\n{}",
                $what,
                PATIENCE,
                $env.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

struct Env {
    // Dropped in this order: the server first, then the fake (which kills
    // the agents it started), then the directory.
    server: Serve,
    fake: FakeGce,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Env {
    /// The fake (agents run through a wrapper that gives each its own data
    /// directory), then `pubrun serve` with a gce pool `pool` on it and a
    /// process job `crunch` on topic `work` running there. Instances take
    /// `boot_delay` to become RUNNING (at insert and at start).
    async fn start(pool: &str, boot_delay: Duration) -> Env {
        Env::start_with(
            pool,
            boot_delay,
            "when_idle = \"stop\"\n",
            "echo crunched {{ attributes.n }}",
        )
        .await
    }

    /// As [`Env::start`], with `pool_extra` instead of `when_idle = "stop"`
    /// and the job running `script`.
    async fn start_with(pool: &str, boot_delay: Duration, pool_extra: &str, script: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::create_dir_all(&agents).unwrap();
        let wrapper = dir.path().join("pubrun-on-instance");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nPUBRUN_AGENT_DATA_DIR='{}/agent-data-'$$\nexport PUBRUN_AGENT_DATA_DIR\nexec '{BIN}' \"$@\"\n",
                agents.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let fake = FakeGce::start(FakeGceConfig {
            token: GCE_TOKEN.into(),
            boot_delay,
            stop_delay: Duration::from_millis(300),
            agent_binary: Some(wrapper),
            agent_log_dir: Some(agents),
        })
        .await
        .unwrap();

        let port = common::free_port();
        let m = manifest(pool, port, &fake.api_base())
            .replace("when_idle = \"stop\"\n", pool_extra)
            .replace(
                "echo crunched {{ attributes.n }}",
                &script.replace('"', "\\\""),
            );
        let server = ServeBuilder::new()
            .dir(dir.path())
            .port(port)
            .config(m)
            .log_level("info")
            .env(GCE_TOKEN_ENV, GCE_TOKEN)
            .env(POOL_TOKEN_ENV, POOL_TOKEN)
            .patience(PATIENCE)
            .start();
        Env {
            server,
            fake,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// The server's log and every agent's, for failure messages.
    fn logs(&self) -> String {
        let mut out = format!("--- server log ---\n{}", self.server.log());
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("agents"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            out.push_str(&format!(
                "--- {} ---\n{}",
                f.display(),
                std::fs::read_to_string(f).unwrap_or_default()
            ));
        }
        out
    }

    async fn get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()));
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    async fn get_text(&self, path: &str) -> String {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status}: {text}");
        text
    }

    /// Publishes to topic `work` with attribute `n`; returns the message id.
    async fn publish(&self, n: u32) -> String {
        let body = json!({"messages": [{
            "data": base64::engine::general_purpose::STANDARD.encode(format!("{{\"n\": {n}}}")),
            "attributes": {"n": n.to_string()},
        }]});
        let resp = self
            .http
            .post(self.url("/v1/projects/demo/topics/work:publish"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "publish: {status}: {v}");
        v["messageIds"][0]
            .as_str()
            .unwrap_or_else(|| panic!("publish: {v}"))
            .to_string()
    }

    async fn runs(&self) -> Vec<Value> {
        self.get("/api/v1/runs?job=crunch").await["runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The id of the run made from message `msg_id`, once it exists.
    async fn run_of(&self, msg_id: &str) -> i64 {
        wait_until!(self, format!("a run for message {msg_id}"), {
            self.runs()
                .await
                .iter()
                .find(|r| r["message"]["id"] == msg_id)
                .and_then(|r| r["id"].as_i64())
        })
    }

    async fn wait_terminal(&self, id: i64) -> Value {
        wait_until!(self, format!("run {id} ending"), {
            let run = self.get(&format!("/api/v1/runs/{id}")).await["run"].clone();
            matches!(
                run["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled")
            )
            .then_some(run)
        })
    }

    async fn machines(&self) -> Vec<Value> {
        self.get("/api/v1/machines").await["machines"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn machine(&self, name: &str) -> Option<Value> {
        self.machines()
            .await
            .into_iter()
            .find(|m| m["name"] == name)
    }

    fn instance(&self, name: &str) -> Option<Value> {
        self.fake.instance(PROJECT, ZONE, name)
    }

    fn status_of(&self, name: &str) -> Option<String> {
        self.instance(name)
            .and_then(|i| i["status"].as_str().map(str::to_string))
    }
}

fn manifest(pool: &str, port: u16, api_base: &str) -> String {
    fill(
        include_str!("manifests/pools-gce.toml"),
        &[
            ("pool", &pool),
            ("PROJECT", &PROJECT),
            ("ZONE", &ZONE),
            ("api_base", &api_base),
            ("GCE_TOKEN_ENV", &GCE_TOKEN_ENV),
            ("port", &port),
            ("POOL_TOKEN_ENV", &POOL_TOKEN_ENV),
            ("PRICE", &PRICE),
        ],
    )
}

fn item(v: &Value, key: &str) -> Option<String> {
    v["metadata"]["items"]
        .as_array()?
        .iter()
        .find(|i| i["key"] == key)
        .and_then(|i| i["value"].as_str().map(str::to_string))
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gce_pool_starts_runs_stops_and_restarts_an_instance() {
    // Booting takes longer than lease_timeout, as on real GCE: the agent
    // of the instance's previous boot (silent since the stop) must not get
    // the restarting machine marked failed.
    let env = Env::start("gpu", Duration::from_secs(7)).await;
    let name = "prt-gpu-1";

    // Nothing waits: no machine is started.
    assert!(env.machines().await.is_empty(), "{}", env.logs());
    assert!(env.fake.inserts().is_empty());

    // A message: the autoscaler inserts an instance named after name_prefix.
    let msg = env.publish(1).await;
    let run_id = env.run_of(&msg).await;
    let inserts = wait_until!(env, "an instances.insert at the fake", {
        let i = env.fake.inserts();
        (!i.is_empty()).then_some(i)
    });
    let body = &inserts[0];
    assert_eq!(body["name"], name, "{body:#}");
    assert_eq!(
        body["machineType"],
        format!("zones/{ZONE}/machineTypes/n2-highmem-8"),
        "{body:#}"
    );
    assert_eq!(body["disks"][0]["boot"], true, "{body:#}");
    assert_eq!(
        body["disks"][0]["initializeParams"]["sourceImage"],
        "projects/debian-cloud/global/images/family/debian-12",
        "{body:#}"
    );
    assert_eq!(
        body["networkInterfaces"][0]["network"], "global/networks/default",
        "{body:#}"
    );
    assert_eq!(body["labels"]["pubrun-pool"], "gpu", "{body:#}");
    assert_eq!(body["labels"]["pubrun-machine"], name, "{body:#}");
    let server_url = env.server.addr();
    assert_eq!(item(body, "pubrun-server"), Some(server_url), "{body:#}");
    assert_eq!(item(body, "pubrun-pool").as_deref(), Some("gpu"));
    assert_eq!(item(body, "pubrun-name").as_deref(), Some(name));
    assert_eq!(item(body, "pubrun-slots").as_deref(), Some("1"));
    // Not the pool token: a one-time bootstrap token for this start.
    let bootstrap = item(body, "pubrun-token").unwrap_or_default();
    assert!(bootstrap.len() >= 32 && bootstrap != POOL_TOKEN, "{body:#}");
    let script = item(body, "startup-script").unwrap_or_default();
    assert!(
        script.starts_with("#!") && script.contains("agent --server"),
        "{script}"
    );
    assert!(
        !script.contains(POOL_TOKEN),
        "the token is metadata, not script"
    );

    // The instance runs (the agent is started by the boot hook).
    wait_until!(env, format!("{name} RUNNING at the fake"), {
        (env.status_of(name).as_deref() == Some("RUNNING")).then_some(())
    });
    let id = env.instance(name).unwrap()["id"].clone();
    assert!(id.as_str().is_some_and(|s| !s.is_empty()), "{id}");

    // The run is leased to it and succeeds there.
    let run = env.wait_terminal(run_id).await;
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert_eq!(run["exit"]["exit_code"], 0, "{run:#}");
    assert_eq!(run["machine"], name, "{run:#}\n{}", env.logs());
    let pid = env.fake.agent_pid(PROJECT, ZONE, name);
    let log = env.get_text(&format!("/api/v1/runs/{run_id}/log")).await;
    assert!(log.contains("crunched 1\n"), "{log}");
    assert_eq!(log.matches("crunched").count(), 1, "{log}");
    assert!(log.contains(&format!("leased to machine {name}")), "{log}");
    assert!(log.contains(&format!("running on agent {name}")), "{log}");

    // The agent registered under the machine's name.
    let agents = env.get("/api/v1/agents").await;
    let agent = agents["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("{agents:#}"));
    assert_eq!(agent["pool"], "gpu", "{agent}");
    assert_eq!(agent["slots"], 1, "{agent}");
    let pid = pid.unwrap_or_else(|| panic!("no agent process for {name}\n{}", env.logs()));
    assert!(process_exists(pid), "agent {pid} is not running");

    // Its agent traded the bootstrap token for the pool token: what the
    // metadata still holds opens nothing.
    let refused = env
        .http
        .post(env.url("/agent/v1/register"))
        .bearer_auth(&bootstrap)
        .json(&json!({"pool": "gpu", "name": name, "slots": 1, "labels": {}, "version": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    // Idle for idle_timeout: stopped (not deleted: when_idle = "stop"),
    // and its agent is gone.
    wait_until!(env, format!("{name} TERMINATED at the fake"), {
        (env.status_of(name).as_deref() == Some("TERMINATED")).then_some(())
    });
    assert_eq!(env.instance(name).unwrap()["id"], id, "the same instance");
    assert_eq!(env.fake.agent_pid(PROJECT, ZONE, name), None);
    wait_until!(env, format!("agent process {pid} ending"), {
        (!process_exists(pid)).then_some(())
    });
    let m = wait_until!(env, format!("{name} stopped on the server"), {
        env.machine(name).await.filter(|m| m["state"] == "stopped")
    });
    assert_eq!(m["last_error"], "", "{m:#}");
    assert_eq!(
        env.fake.operations(PROJECT, ZONE, name),
        ["insert", "stop"],
        "{}",
        env.logs()
    );

    // A second message starts the same instance again: no new instance.
    let msg2 = env.publish(2).await;
    let run2 = env.run_of(&msg2).await;
    assert_ne!(run2, run_id);
    let run = env.wait_terminal(run2).await;
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(run["machine"], name, "{run:#}\n{}", env.logs());
    let log = env.get_text(&format!("/api/v1/runs/{run2}/log")).await;
    assert!(log.contains("crunched 2\n"), "{log}");
    let ops = env.fake.operations(PROJECT, ZONE, name);
    // A fresh bootstrap token is set before the start.
    assert!(
        ops.starts_with(&[
            "insert".into(),
            "stop".into(),
            "setMetadata".into(),
            "start".into()
        ]),
        "{ops:?}"
    );
    let again = item(&env.instance(name).unwrap(), "pubrun-token").unwrap_or_default();
    assert!(again.len() >= 32 && again != bootstrap && again != POOL_TOKEN);
    assert_eq!(ops.iter().filter(|o| *o == "insert").count(), 1, "{ops:?}");
    assert_eq!(env.instance(name).unwrap()["id"], id, "the same instance");
    let new_pid = env.fake.agent_pid(PROJECT, ZONE, name);
    assert!(
        new_pid.is_some_and(|p| p != pid),
        "a new agent runs after the restart: {new_pid:?} (was {pid})"
    );
    let names: Vec<Value> = env
        .machines()
        .await
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert_eq!(names, [json!(name)], "one machine, reused");

    // Its up-time is costed to the pool.
    let cost = env.get("/api/v1/cost").await;
    let pool = cost["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pool"] == "gpu"))
        .unwrap_or_else(|| panic!("{cost:#}"))
        .clone();
    let secs = pool["machine_seconds"].as_f64().unwrap_or(0.0);
    assert!(secs > 0.0, "{pool:#}");
    assert_eq!(pool["price_per_hour"], PRICE, "{pool:#}");
    let c = pool["cost"]
        .as_f64()
        .unwrap_or_else(|| panic!("no cost: {pool:#}"));
    assert!(c > 0.0, "{pool:#}");
    assert!(
        (c - secs * PRICE / 3600.0).abs() < 1e-6,
        "cost {c} for {secs} s at {PRICE}/h"
    );
    let costed: Vec<i64> = cost["runs"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["run_id"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        costed.contains(&run_id) && costed.contains(&run2),
        "{cost:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_insert_marks_the_machine_failed_and_a_new_one_takes_the_run() {
    let env = Env::start("flaky", Duration::from_millis(300)).await;
    env.fake.fail_next_insert(
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone 'projects/demo-gce/zones/europe-west1-b' does not have enough resources available to fulfill the request.",
    );
    let msg = env.publish(7).await;
    let run_id = env.run_of(&msg).await;

    // The first machine fails with the operation's error, and its cost
    // span is closed (nothing was left running).
    let failed = wait_until!(env, "prt-flaky-1 failed", {
        env.machine("prt-flaky-1")
            .await
            .filter(|m| m["state"] == "failed")
    });
    let err = failed["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("creating instance prt-flaky-1")
            && err.contains("ZONE_RESOURCE_POOL_EXHAUSTED")
            && err.contains("does not have enough resources"),
        "{failed:#}"
    );
    assert!(!err.contains("[not stopped]"), "{failed:#}");

    // A new machine is started, and the run (still its first attempt) ends there.
    let run = env.wait_terminal(run_id).await;
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert_eq!(run["machine"], "prt-flaky-2", "{run:#}");
    let log = env.get_text(&format!("/api/v1/runs/{run_id}/log")).await;
    assert_eq!(log.matches("crunched 7\n").count(), 1, "{log}");
    assert_eq!(log.matches("leased to machine").count(), 1, "{log}");
    assert_eq!(env.runs().await.len(), 1, "one run for one message");

    assert_eq!(
        env.fake.operations(PROJECT, ZONE, "prt-flaky-1"),
        ["insert"]
    );
    assert!(
        env.instance("prt-flaky-1").is_none(),
        "the failed insert left no instance"
    );
    assert!(env.instance("prt-flaky-2").is_some());
    assert_eq!(
        env.fake.operations(PROJECT, ZONE, "prt-flaky-2")[0],
        "insert"
    );
    let m = env.machine("prt-flaky-1").await.unwrap();
    assert_eq!(m["state"], "failed", "stays failed: {m:#}");
}

/// A spot instance reclaimed by Google mid-run (deleted, as
/// `instanceTerminationAction = DELETE` does): its agent dies with it, the
/// lease is lost, the run goes to a new machine (same attempt) and ends
/// there once; the reclaimed machine is never started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_spot_instance_loses_its_lease_and_is_replaced() {
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.1; done; echo crunched {{{{ attributes.n }}}}",
        gate.display()
    );
    let env = Env::start_with(
        "spot",
        Duration::from_millis(300),
        "when_idle = \"delete\"\nspot = true\n",
        &script,
    )
    .await;
    let msg = env.publish(5).await;
    let run_id = env.run_of(&msg).await;
    wait_until!(env, "the run running on prt-spot-1", {
        let run = env.get(&format!("/api/v1/runs/{run_id}")).await["run"].clone();
        (run["status"] == "running" && run["machine"] == "prt-spot-1").then_some(())
    });
    let body = env.fake.inserts().remove(0);
    assert_eq!(body["scheduling"]["provisioningModel"], "SPOT", "{body}");
    assert_eq!(
        body["scheduling"]["instanceTerminationAction"], "DELETE",
        "{body}"
    );

    env.fake.reclaim(PROJECT, ZONE, "prt-spot-1");
    // The work may finish on whichever machine gets it next.
    std::fs::write(&gate, "").unwrap();

    let run = env.wait_terminal(run_id).await;
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", env.logs());
    assert_eq!(run["machine"], "prt-spot-2", "{run:#}");
    assert_eq!(
        run["attempt"], 1,
        "a lost lease is not a failed attempt: {run:#}"
    );
    let log = env.get_text(&format!("/api/v1/runs/{run_id}/log")).await;
    assert_eq!(log.matches("crunched 5\n").count(), 1, "{log}");
    assert_eq!(env.runs().await.len(), 1, "one run for one message");
    // Gone, not restarted behind the autoscaler's back.
    assert!(env.instance("prt-spot-1").is_none());
    assert_eq!(env.fake.operations(PROJECT, ZONE, "prt-spot-1"), ["insert"]);
    if let Some(m) = env.machine("prt-spot-1").await {
        assert!(m["state"] != "ready" && m["state"] != "busy", "{m:#}");
    }
}
