//! `serve --sync`: `always` fsyncs before acknowledging each publish (the
//! default); `interval` acknowledges once written and syncs later, and still
//! loses nothing to `kill -9` (the page cache outlives the process).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use tonic::transport::Channel;

use common::{connect, create_topic_and_subscription, pull_now, Serve, ServeBuilder};

const TOPIC: &str = "projects/sync/topics/topic-one";
const SUB: &str = "projects/sync/subscriptions/sub-one";
const PUBLISHES: usize = 20;

async fn start(data: &Path, sync: &[&str]) -> (Serve, u16, Channel) {
    let server = ServeBuilder::new().data_dir(data).args(sync).spawn();
    let port = server.port();
    let ch = connect(port).await;
    (server, port, ch)
}

/// The value of `series` (a counter's or histogram's sample without
/// labels) from `/metrics`.
fn metric(port: u16, series: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// Syncs of the Pub/Sub log so far.
fn syncs(port: u16) -> f64 {
    metric(port, "pubrun_store_sync_seconds_count")
}

/// Waits (30 s at most) until `metric` passes `above`.
fn wait_metric_above(port: u16, series: &str, above: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(port, series) <= above {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates the topic and subscription, then publishes one message per
/// request, each awaited: returns the ids.
async fn publish_sequentially(ch: &Channel) -> HashSet<String> {
    create_topic_and_subscription(ch, TOPIC, SUB).await;
    let mut p = PublisherClient::new(ch.clone());
    let mut ids = HashSet::new();
    for i in 0..PUBLISHES {
        let r = p
            .publish(pb::PublishRequest {
                topic: TOPIC.into(),
                messages: vec![pb::PubsubMessage {
                    data: format!("m{i}").into_bytes().into(),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
        ids.extend(r.into_inner().message_ids);
    }
    ids
}

/// Pulls until `n` distinct messages arrived (60 s at most); returns one
/// delivery of each.
async fn pull_distinct(
    s: &mut SubscriberClient<Channel>,
    n: usize,
    what: &str,
) -> Vec<pb::ReceivedMessage> {
    let mut seen = HashSet::new();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: only {} of {n} published messages arrived",
            got.len()
        );
        for m in pull_now(s, SUB, 100).await.unwrap() {
            if seen.insert(m.message.as_ref().unwrap().message_id.clone()) {
                got.push(m);
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_syncs_before_each_acknowledged_publish() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port, ch) = start(dir.path(), &[]).await;
    let before = syncs(port);
    publish_sequentially(&ch).await;
    let done = syncs(port) - before;
    assert!(
        done >= PUBLISHES as f64,
        "{PUBLISHES} awaited publishes made only {done} fdatasyncs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_acknowledges_before_syncing_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, port, ch) =
        start(dir.path(), &["--sync", "interval", "--sync-interval", "1h"]).await;
    let before = syncs(port);
    let ids = publish_sequentially(&ch).await;
    assert_eq!(ids.len(), PUBLISHES);
    let done = syncs(port) - before;
    assert!(
        done < PUBLISHES as f64 / 2.0,
        "interval mode synced {done} times for {PUBLISHES} publishes"
    );

    server.child().kill().unwrap();
    server.kill();
    drop(ch);
    let (_server, _port, ch) = start(dir.path(), &[]).await;
    let mut s = SubscriberClient::new(ch);
    let got: HashSet<String> = pull_distinct(&mut s, ids.len(), "after kill -9")
        .await
        .into_iter()
        .map(|m| m.message.unwrap().message_id)
        .collect();
    assert_eq!(got, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_acks_survive_kill_9_and_the_log_is_synced_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, port, ch) = start(
        dir.path(),
        &["--sync", "interval", "--sync-interval", "200ms"],
    )
    .await;
    let before = syncs(port);
    let ids = publish_sequentially(&ch).await;
    let mut s = SubscriberClient::new(ch.clone());
    let got = pull_distinct(&mut s, ids.len(), "before kill -9").await;
    // Acknowledge half of them (each acknowledgement returned = written).
    let (acked, kept) = got.split_at(ids.len() / 2);
    s.acknowledge(pb::AcknowledgeRequest {
        subscription: SUB.into(),
        ack_ids: acked.iter().map(|m| m.ack_id.clone()).collect(),
    })
    .await
    .unwrap();
    // The background sync runs one interval after the first unsynced write.
    let series = "pubrun_store_sync_seconds_count";
    tokio::task::spawn_blocking(move || {
        wait_metric_above(
            port,
            series,
            before,
            "background fdatasync (200 ms interval)",
        )
    })
    .await
    .unwrap();

    server.child().kill().unwrap();
    server.kill();
    drop((s, ch));
    let (_server, _port, ch) = start(dir.path(), &[]).await;
    let mut s = SubscriberClient::new(ch);
    let want: HashSet<String> = kept
        .iter()
        .map(|m| m.message.as_ref().unwrap().message_id.clone())
        .collect();
    let back: HashSet<String> = pull_distinct(&mut s, want.len(), "after kill -9")
        .await
        .into_iter()
        .map(|m| m.message.unwrap().message_id)
        .collect();
    assert_eq!(back, want, "acknowledged messages came back after kill -9");
}

/// `interval`: a run's log is written out when its attempt ends and synced
/// by one background sync of its filesystem, not per run; `kill -9` right
/// after keeps it. `always` syncs each log itself and never runs that sync.
#[test]
fn interval_syncs_run_logs_in_the_background() {
    const SYNCED: &str = "pubrun_run_log_syncs_total";
    let manifest = include_str!("manifests/sync-run-log.toml");
    let always = ServeBuilder::new().config(manifest).start();
    let id = always.ok(&["jobs", "trigger", "say"]).trim().to_string();
    always.wait_json(&["runs", "show", &id], "the run succeeding", |v| {
        v["run"]["status"] == "succeeded"
    });
    assert_eq!(
        metric(always.port(), SYNCED),
        0.0,
        "always mode syncs each log"
    );
    drop(always);

    let dir = tempfile::tempdir().unwrap();
    let mut server = ServeBuilder::new()
        .data_dir(dir.path())
        .config(manifest)
        .args(["--sync", "interval", "--sync-interval", "200ms"])
        .start();
    let id = server.ok(&["jobs", "trigger", "say"]).trim().to_string();
    server.wait_json(&["runs", "show", &id], "the run succeeding", |v| {
        v["run"]["status"] == "succeeded"
    });
    wait_metric_above(server.port(), SYNCED, 0.0, "background sync of run logs");
    server.child().kill().unwrap();
    server.kill();
    let server = ServeBuilder::new().data_dir(dir.path()).start();
    let log = server.json(&["logs", &id]);
    assert!(
        log["log"]
            .as_str()
            .unwrap()
            .contains("said before the crash"),
        "{log}"
    );
}

#[test]
fn zero_interval_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_pubrun"))
        .args([
            "serve",
            "--sync",
            "interval",
            "--sync-interval",
            "0s",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--sync-interval must be more than 0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
