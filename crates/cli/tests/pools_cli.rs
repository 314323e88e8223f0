//! Pools, machines, agents and cost as a user drives them: the real `pubrun`
//! binary against a real `pubrun serve --config pubrun.toml` declaring an
//! `agents` pool, with a real `pubrun agent` process joining it with the
//! token `pubrun pools token` printed, and a process job running there.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{table_row, Serve, ServeBuilder, Server, BIN};
use serde_json::Value;

/// Long enough for a slow, busy CI machine; the happy path takes seconds.
const PATIENCE: Duration = Duration::from_secs(90);

/// The job sleeps a little so its run has measurable machine time.
const MANIFEST: &str = include_str!("manifests/pools-cli.toml");

fn start() -> Serve {
    ServeBuilder::new()
        .config(MANIFEST)
        .log_level("info")
        .patience(PATIENCE)
        .start()
}

/// The entry of `list[key]` whose `field` is `name`.
fn find<'a>(v: &'a Value, key: &str, field: &str, name: &str) -> Option<&'a Value> {
    v[key]
        .as_array()?
        .iter()
        .find(|e| e[field].as_str() == Some(name))
}

#[test]
fn agent_joins_runs_a_job_and_is_cordoned_and_costed() {
    let s = start();

    // The pool as declared, before anything joined.
    let pools = s.json(&["pools"]);
    let laptops = find(&pools, "pools", "name", "laptops")
        .unwrap_or_else(|| panic!("pool laptops not listed: {pools:#}"));
    assert_eq!(laptops["provider"]["kind"], "agents", "{laptops:#}");
    assert_eq!(laptops["machines_up"], 0, "{laptops:#}");
    assert_eq!(laptops["price_per_hour"], 3.6, "{laptops:#}");
    let table = s.ok(&["pools"]);
    assert!(table.starts_with("NAME "), "{table}");
    let row: Vec<&str> = table_row(&table, "laptops").split_whitespace().collect();
    assert_eq!(
        row,
        ["laptops", "agents", "0", "-", "-", "0", "3.60"],
        "{table}"
    );
    assert_eq!(s.ok(&["pools", "list"]), table);

    // The token, alone on a line, as `$(pubrun pools token laptops)` takes it.
    let out = s.ok(&["pools", "token", "laptops"]);
    assert!(
        out.ends_with('\n') && out.lines().count() == 1,
        "not one line: {out:?}"
    );
    let token = out.trim().to_string();
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{out:?}"
    );
    assert_eq!(
        s.json(&["pools", "token", "laptops"])["token"],
        token.as_str()
    );
    let err = s.fails(&["pools", "token", "nope"]);
    assert!(err.contains("no pool named nope"), "{err}");

    // A real agent joins with that token.
    let agent_log = std::fs::File::create(s.path("agent.log")).unwrap();
    let _agent = Server(
        Command::new(BIN)
            .args([
                "agent",
                "--server",
                &s.addr(),
                "--pool",
                "laptops",
                "--name",
                "laptop-1",
                "--slots",
                "1",
                "--label",
                "site=test",
                "--data-dir",
            ])
            .arg(s.path("agent-data"))
            .env("PUBRUN_TOKEN", &token)
            .env("PUBRUN_LOG", "info")
            .env_remove("PUBRUN_SERVER")
            .env_remove("PUBRUN_POOL")
            .env_remove("PUBRUN_AGENT_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(agent_log)
            .spawn()
            .expect("spawn pubrun agent"),
    );
    let agents = s.wait_json(&["agents"], "agent laptop-1 joining", |v| {
        find(v, "agents", "name", "laptop-1").is_some()
    });
    let a = find(&agents, "agents", "name", "laptop-1").unwrap();
    assert_eq!(a["pool"], "laptops", "{a:#}");
    assert_eq!(a["slots"], 1, "{a:#}");
    let table = s.ok(&["agents"]);
    let row = table_row(&table, "laptop-1");
    assert!(
        row.contains("laptops") && row.contains("site=test"),
        "{table}"
    );

    // A run of the pool's job goes to the agent and succeeds there.
    let id = s.ok(&["jobs", "trigger", "hello", "--data", "x"]);
    let id = id.trim();
    assert!(!id.is_empty(), "no run id printed");
    let run = s.wait_json(&["runs", "show", id], "run succeeding", |v| {
        matches!(
            v["run"]["status"].as_str(),
            Some("succeeded" | "failed" | "timed_out" | "cancelled")
        )
    });
    assert_eq!(run["run"]["status"], "succeeded", "{run:#}\n{}", s.logs());
    assert_eq!(run["run"]["machine"], "laptop-1", "{run:#}");
    let log = s.ok(&["logs", id]);
    assert!(log.contains("hi from hello"), "{log}");

    // The machine, up and uncordoned.
    let machines = s.json(&["machines"]);
    let m = find(&machines, "machines", "name", "laptop-1")
        .unwrap_or_else(|| panic!("machine laptop-1 not listed: {machines:#}"));
    assert_eq!(m["pool"], "laptops", "{m:#}");
    assert_eq!(m["cordoned"], false, "{m:#}");
    assert!(
        matches!(m["state"].as_str(), Some("ready" | "idle" | "busy")),
        "{m:#}"
    );
    let table = s.ok(&["machines"]);
    let row: Vec<&str> = table_row(&table, "laptop-1").split_whitespace().collect();
    assert_eq!(row[1], "laptops", "{table}");
    assert_eq!(row[5], "no", "cordoned column: {table}");
    let pools = s.json(&["pools"]);
    assert_eq!(
        find(&pools, "pools", "name", "laptops").unwrap()["machines_up"],
        1,
        "{pools:#}"
    );

    // Cordon and uncordon flip `cordoned`; the command shows the new state,
    // and so does the machine list.
    let listed_cordoned = |want: bool| {
        let m = s.json(&["machines"]);
        assert_eq!(
            find(&m, "machines", "name", "laptop-1").unwrap()["cordoned"],
            want,
            "{m:#}"
        );
    };
    let out = s.ok(&["machines", "cordon", "laptop-1"]);
    let row: Vec<&str> = table_row(&out, "laptop-1").split_whitespace().collect();
    assert_eq!(row[5], "yes", "{out}");
    listed_cordoned(true);
    let resp = s.json(&["machines", "uncordon", "laptop-1"]);
    assert_eq!(resp["machine"]["cordoned"], false, "{resp:#}");
    listed_cordoned(false);
    let resp = s.json(&["machines", "drain", "laptop-1"]);
    assert_eq!(resp["machine"]["cordoned"], true, "{resp:#}");
    listed_cordoned(true);

    // An unknown machine is an error that says so.
    for action in ["cordon", "uncordon", "drain"] {
        let err = s.fails(&["machines", action, "nope"]);
        assert!(err.contains("no machine named nope"), "{action}: {err}");
    }

    // Cost: the pool's machine time, the run's share of it.
    let cost = s.json(&["cost"]);
    let p = find(&cost, "pools", "pool", "laptops")
        .unwrap_or_else(|| panic!("pool laptops not in the cost report: {cost:#}"));
    let run_secs = p["run_seconds"].as_f64().unwrap_or(0.0);
    let machine_secs = p["machine_seconds"].as_f64().unwrap_or(0.0);
    assert!(run_secs > 0.0, "{cost:#}");
    assert!(machine_secs >= run_secs, "{cost:#}");
    assert!(p["cost"].as_f64().unwrap_or(0.0) > 0.0, "{cost:#}");
    let r = find(&cost, "runs", "run_id", id)
        .unwrap_or_else(|| panic!("run {id} not in the cost report: {cost:#}"));
    assert_eq!(r["job"], "hello", "{r:#}");
    assert_eq!(r["pool"], "laptops", "{r:#}");
    assert!(r["machine_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{r:#}");
    assert_eq!(r["machines"][0], "laptop-1", "{r:#}");

    let table = s.ok(&["cost", "--runs", "--machines"]);
    assert!(table_row(&table, "laptops").contains("3.60"), "{table}");
    assert!(table.contains("total cost: "), "{table}");
    assert!(table_row(&table, id).contains("hello"), "{table}");
    assert!(table_row(&table, "laptop-1").contains("laptops"), "{table}");

    // --since: a recent window still has the run; the future is refused.
    let recent = s.json(&["cost", "--since", "1h"]);
    assert!(find(&recent, "runs", "run_id", id).is_some(), "{recent:#}");
    let since = recent["since_ms"].as_i64().unwrap_or(0);
    assert!(since > 0, "--since 1h sent no time: {recent:#}");
    let at = s.json(&["cost", "--since", "2000-01-01T00:00:00Z"]);
    assert_eq!(at["since_ms"], 946_684_800_000i64, "{at:#}");
    assert!(find(&at, "runs", "run_id", id).is_some(), "{at:#}");

    let err = s.fails(&["cost", "--since", "garbage"]);
    assert!(
        err.contains("--since") && err.contains("garbage") && err.contains("neither a duration"),
        "{err}"
    );
    let err = s.fails(&["cost", "--since", "2999-01-01T00:00:00Z"]);
    assert!(err.contains("in the future"), "{err}");
}

/// A run that waits for a pool machine says so, not "starting".
#[test]
fn a_run_waiting_for_a_pool_machine_is_shown_as_such() {
    let s = start();
    s.ok(&["publish", "work", "--data", "x"]);
    let runs = s.wait_json(&["runs"], "a run waiting for a machine", |v| {
        v["runs"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["waiting_for_machine"] == "laptops"))
    });
    let id = runs["runs"][0]["id"].to_string();
    assert_eq!(runs["runs"][0]["status"], "starting", "{runs:#}");
    let table = s.ok(&["runs"]);
    let row: Vec<&str> = table_row(&table, &id).split_whitespace().collect();
    assert_eq!(row[2], "waiting-for-machine", "{table}");
    let shown = s.ok(&["runs", "show", &id]);
    assert!(
        shown.contains("waiting for a machine in pool laptops"),
        "{shown}"
    );
}
