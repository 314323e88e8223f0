//! Cluster mode, first step: two real `pubrun serve --store postgres://…`
//! processes on one throwaway PostgreSQL. The second waits as a hot standby
//! (forwarding every call to the first, never answering itself) while the first owns
//! the Pub/Sub state; after `kill -9` of the first it takes over within the
//! lease TTL and delivers exactly the messages that were not acknowledged.
//! Step 2: runs, jobs and run logs are in PostgreSQL too, so the new owner
//! lists the dead server's runs and retries its cut-off attempt.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;

use common::{
    answering_node, cluster_node, connect, create_topic_and_subscription, fill, free_port, poll,
    pull_now, read_log, two_nodes, wait_answered_by, wait_standby, Serve,
};

const TOPIC: &str = "projects/cluster/topics/events";
const SUB: &str = "projects/cluster/subscriptions/events-sub";
const LEASE_TTL: Duration = Duration::from_secs(2);

fn start(url: &str, node: &str, data: &Path, port: u16, log: &Path) -> Serve {
    cluster_node(url, node, LEASE_TTL, data, port, log).spawn()
}

async fn pull(
    sub: &mut SubscriberClient<tonic::transport::Channel>,
    max: i32,
) -> Vec<pb::ReceivedMessage> {
    pull_now(sub, SUB, max).await.expect("pull")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_takes_over_after_kill_9_and_delivers_exactly_the_unacked() {
    let (pg, _dirs, (data_a, data_b), (log_a, log_b)) = two_nodes();
    let read = read_log;

    let port_a = free_port();
    let mut a = start(&pg.url(), "a", &data_a, port_a, &log_a);
    a.wait_healthy();
    let ch = connect(port_a).await;
    create_topic_and_subscription(&ch, TOPIC, SUB).await;
    let mut publisher = PublisherClient::new(ch.clone());
    let mut sub = SubscriberClient::new(ch);

    let mut published = HashSet::new();
    for batch in 0..10 {
        let messages = (0..10)
            .map(|i| pb::PubsubMessage {
                data: format!("m{batch}-{i}").into_bytes().into(),
                ..Default::default()
            })
            .collect();
        let r = publisher
            .publish(pb::PublishRequest {
                topic: TOPIC.into(),
                messages,
            })
            .await
            .unwrap();
        published.extend(r.into_inner().message_ids);
    }
    assert_eq!(published.len(), 100);

    let mut acked = HashSet::new();
    while acked.len() < 30 {
        let msgs = pull(&mut sub, 30 - acked.len() as i32).await;
        let ack_ids = msgs.iter().map(|m| m.ack_id.clone()).collect();
        sub.acknowledge(pb::AcknowledgeRequest {
            subscription: SUB.into(),
            ack_ids,
        })
        .await
        .unwrap();
        acked.extend(msgs.into_iter().map(|m| m.message.unwrap().message_id));
    }
    assert_eq!(acked.len(), 30);

    // B waits as a standby: it must not serve while A holds the lease, for
    // several TTLs (A keeps renewing).
    let port_b = free_port();
    let mut b = start(&pg.url(), "b", &data_b, port_b, &log_b);
    let until = Instant::now() + LEASE_TTL * 3;
    let mut forwarded = false;
    while Instant::now() < until {
        assert!(
            b.child().try_wait().unwrap().is_none(),
            "standby exited:\n{}",
            read(&log_b)
        );
        // It forwards to A (any server answers), but never answers itself.
        let node = answering_node(port_b);
        assert!(
            node.is_none() || node.as_deref() == Some("a"),
            "the standby serves while A owns the Pub/Sub state: answered by {node:?}"
        );
        forwarded |= node.is_some();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(forwarded, "the standby never forwarded a call to A");
    assert!(
        read(&log_b).contains("waiting as a hot standby"),
        "standby log:\n{}",
        read(&log_b)
    );

    a.child().kill().expect("SIGKILL A");
    a.child().wait().unwrap();
    let killed = Instant::now();
    wait_answered_by(port_b, "b", Duration::from_secs(60), || read(&log_b));
    let took = killed.elapsed();
    // Lease expiry, one standby poll, replay and start.
    assert!(
        took < LEASE_TTL + Duration::from_secs(8),
        "takeover took {took:?}"
    );
    eprintln!("standby took over {took:?} after kill -9 (lease TTL {LEASE_TTL:?})");

    let mut sub = SubscriberClient::new(connect(port_b).await);
    let mut delivered = HashSet::new();
    loop {
        let msgs = pull(&mut sub, 1000).await;
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            let id = m.message.unwrap().message_id;
            assert!(!acked.contains(&id), "acknowledged message {id} came back");
            assert!(delivered.insert(id), "duplicate delivery");
        }
    }
    let expected: HashSet<String> = published.difference(&acked).cloned().collect();
    assert_eq!(delivered.len(), 70);
    assert_eq!(delivered, expected, "exactly the unacknowledged messages");
}

// ---- runs in PostgreSQL (issue 12, step 2) ----

/// Runs `pubrun ARGS --json` against `port`; panics with `log()` on failure.
fn cli_json(port: u16, args: &[&str], log: impl Fn() -> String) -> serde_json::Value {
    common::cli_json(port, None, args, log)
}

/// Polls `pubrun runs show ID` on `port` until `pred` holds (generous
/// patience: a slow CI box), returns that run.
fn wait_run(
    port: u16,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
    log: impl Fn() -> String,
) -> serde_json::Value {
    poll(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || {
            let run = cli_json(port, &["runs", "show", id], &log)["run"].clone();
            common::ready_if(pred(&run), run)
        },
        |run| {
            format!(
                "run {id} never became {what}; last seen {run:#}\n--- server log ---\n{}",
                log()
            )
        },
    )
}

fn is_terminal(run: &serde_json::Value) -> bool {
    matches!(
        run["status"].as_str(),
        Some("succeeded" | "failed" | "timed_out" | "cancelled")
    )
}

/// Ends the cut-off attempt's orphaned shell (it outlives a `kill -9` of its
/// server) however the test ends.
struct StopFile(std::path::PathBuf);

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"stop");
    }
}

/// Jobs, runs, dedup keys, run logs and job definitions live in
/// PostgreSQL: server A (started with the manifest) runs jobs; it is
/// killed with `kill -9` while one attempt runs; standby B (no manifest,
/// its own empty data dir) takes the lease, lists A's jobs and runs and
/// shows a finished run's log; the cut-off run is retried without using up
/// an attempt (as for a lost agent) and ends exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_survive_kill_9_of_the_server_running_them() {
    let (pg, dirs, (data_a, data_b), (log_a, log_b)) = two_nodes();
    let read = read_log;
    let marker = dirs.path().join("first-attempt-started");
    let stop = StopFile(dirs.path().join("stop"));
    // The slow job's first attempt marks that it started and runs until
    // told to stop; any later attempt sees the marker and succeeds at once.
    // `max_attempts = 1`: had the loss used up an attempt, the run would fail.
    let config = dirs.path().join("pubrun.toml");
    std::fs::write(
        &config,
        fill(
            include_str!("manifests/store-postgres-resume.toml"),
            &[("marker", &marker.display()), ("stop", &stop.0.display())],
        ),
    )
    .unwrap();

    let port_a = free_port();
    let mut a = cluster_node(&pg.url(), "a", LEASE_TTL, &data_a, port_a, &log_a)
        .arg("--config")
        .arg(&config)
        .spawn();
    a.wait_healthy();
    let la = || read(&log_a);

    let mut quick = Vec::new();
    for who in ["x", "y", "z"] {
        let r = cli_json(
            port_a,
            &["jobs", "trigger", "quick", "--attr", &format!("who={who}")],
            la,
        );
        quick.push(r["run"]["id"].to_string());
    }
    for id in &quick {
        let run = wait_run(port_a, id, "terminal", is_terminal, la);
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    let slow = cli_json(port_a, &["jobs", "trigger", "slow"], la)["run"]["id"].to_string();
    wait_run(port_a, &slow, "running", |r| r["status"] == "running", la);
    assert!(marker.exists(), "the first attempt started");

    let port_b = free_port();
    let mut b = start(&pg.url(), "b", &data_b, port_b, &log_b);
    let lb = || read(&log_b);
    wait_standby(&mut b, lb).await;

    // A dies with the slow attempt in flight.
    a.child().kill().expect("SIGKILL A");
    a.child().wait().unwrap();
    wait_answered_by(port_b, "b", Duration::from_secs(60), lb);

    // B knows A's jobs (it got no manifest) and A's runs.
    let jobs = cli_json(port_b, &["jobs", "list"], lb);
    let names: Vec<&str> = common::array(&jobs, "jobs")
        .iter()
        .filter_map(|j| j["name"].as_str())
        .collect();
    assert_eq!(names, ["quick", "slow"], "{jobs:#}");
    let runs = cli_json(port_b, &["runs"], lb);
    let mut ids: Vec<String> = common::array(&runs, "runs")
        .iter()
        .map(|r| r["id"].to_string())
        .collect();
    ids.sort();
    let mut want = quick.clone();
    want.push(slow.clone());
    want.sort();
    assert_eq!(ids, want, "B lists exactly A's runs: {runs:#}");
    for id in &quick {
        let run = cli_json(port_b, &["runs", "show", id], lb)["run"].clone();
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    // A finished run's log, written on A's disk, is shown by B.
    let log = cli_json(port_b, &["logs", &quick[0]], lb);
    assert!(
        log.to_string().contains("hello x"),
        "log of run {} through B: {log:#}",
        quick[0]
    );

    // The cut-off run: retried on B as the same attempt, ends once.
    let run = wait_run(port_b, &slow, "terminal", is_terminal, lb);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", lb());
    assert_eq!(
        run["attempt"], 1,
        "losing a server must not use up an attempt: {run:#}"
    );
    let slow_runs = cli_json(port_b, &["runs", "--job", "slow"], lb);
    assert_eq!(
        slow_runs["runs"].as_array().unwrap().len(),
        1,
        "{slow_runs:#}"
    );
    assert!(
        lb().contains("lost: the server running this attempt stopped"),
        "B's log says why the attempt was retried:\n{}",
        lb()
    );
    // Still exactly one terminal state a moment later (nothing re-runs it).
    let again = cli_json(port_b, &["runs", "show", &slow], lb)["run"].clone();
    assert_eq!(again["status"], "succeeded");
    assert_eq!(again["ended_at_ms"], run["ended_at_ms"]);
}
