//! Cluster mode: pools, machines, agents' leases and cost spans live in
//! PostgreSQL. Server A (`serve --store postgres://… --config` declaring an
//! `agents` pool) takes an agent's registration; after `kill -9` of A,
//! standby B (no manifest, its own empty data directory) takes over and
//! serves the same pool, token, machine and cost from PostgreSQL; no
//! `pools.db` is written on either server's disk.

mod common;

use std::path::Path;
use std::time::Duration;

use pubrun_store::testing::TempPostgres;
use serde_json::{json, Value};

use common::{free_port, wait_answered_by, Serve, ServeBuilder};

const MANIFEST: &str = include_str!("manifests/pools-cluster.toml");

fn start(url: &str, node: &str, dir: &Path, port: u16, config: Option<&Path>) -> Serve {
    let mut b = ServeBuilder::cluster(url, node, Duration::from_millis(2000))
        .dir(dir)
        .log_name(&format!("{node}.log"))
        .data_dir(dir.join(format!("data-{node}")))
        .port(port);
    if let Some(c) = config {
        b = b.arg("--config").arg(c);
    }
    b.spawn()
}

async fn get(port: u16, path: &str) -> Value {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .unwrap();
    assert!(r.status().is_success(), "GET {path}: {}", r.status());
    r.json().await.unwrap()
}

/// Agent `laptop-1` of pool `laptops` registers with the server on `port`
/// (`what` names the step in the panic).
async fn register(port: u16, token: &str, what: &str) {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/agent/v1/register"))
        .bearer_auth(token)
        .json(&json!({"pool": "laptops", "name": "laptop-1", "slots": 2}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{what}: {}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_machines_and_cost_survive_kill_9_of_the_owner() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pubrun.toml");
    std::fs::write(&config, MANIFEST).unwrap();
    let read = |node: &str| {
        std::fs::read_to_string(dir.path().join(format!("{node}.log"))).unwrap_or_default()
    };

    let port_a = free_port();
    let mut a = start(&pg.url(), "a", dir.path(), port_a, Some(&config));
    a.wait_healthy();
    let token = get(port_a, "/api/v1/pools/laptops/token").await["token"]
        .as_str()
        .unwrap()
        .to_string();
    // An agent joins: its machine row and cost span are written.
    register(port_a, &token, "register").await;
    let machines = get(port_a, "/api/v1/machines").await;
    assert_eq!(machines["machines"][0]["name"], "laptop-1", "{machines:#}");

    let port_b = free_port();
    let mut b = start(&pg.url(), "b", dir.path(), port_b, None);
    // B is a standby: calls through it are answered by A.
    wait_answered_by(port_b, "a", Duration::from_secs(60), || read("b"));
    a.child().kill().expect("SIGKILL A");
    let _ = a.child().wait();
    wait_answered_by(port_b, "b", Duration::from_secs(60), || read("b"));
    assert!(b.child().try_wait().unwrap().is_none(), "{}", read("b"));

    // B has the pool with the same token (a joined agent keeps working),
    // the machine and its cost, all from PostgreSQL.
    let pools = get(port_b, "/api/v1/pools").await;
    assert_eq!(pools["pools"][0]["name"], "laptops", "{pools:#}");
    assert_eq!(
        get(port_b, "/api/v1/pools/laptops/token").await["token"],
        token.as_str()
    );
    let machines = get(port_b, "/api/v1/machines").await;
    let m = &machines["machines"][0];
    assert_eq!(
        (m["name"].as_str(), m["pool"].as_str()),
        (Some("laptop-1"), Some("laptops")),
        "{machines:#}"
    );
    let cost = get(port_b, "/api/v1/cost?since_ms=0").await;
    assert_eq!(cost["machines"][0]["machine"], "laptop-1", "{cost:#}");
    assert!(
        cost["machines"][0]["seconds"].as_f64().unwrap() > 0.0,
        "{cost:#}"
    );
    // The agent registers again with the new owner (sessions are in memory).
    register(port_b, &token, "register with B").await;
    for node in ["a", "b"] {
        let db = dir.path().join(format!("data-{node}")).join("pools.db");
        assert!(!db.exists(), "{} written in cluster mode", db.display());
    }
}
