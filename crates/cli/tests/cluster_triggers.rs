//! Cluster mode: schedules, schedule ticks and webhook definitions live in
//! PostgreSQL. Server A (started with a manifest declaring an every-minute
//! schedule and a webhook) fires a tick; standby B (no manifest, its own
//! empty data dir) takes over after `kill -9` of A, lists the schedule with
//! A's last tick, serves `POST /hooks/NAME`, and fires the next tick — and
//! no tick is ever published twice.
//!
//! Real minutes pass: the schedule's cron has a minute's resolution, so the
//! test takes one to two minutes.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::subscriber_client::SubscriberClient;

use common::{
    cluster_node, connect, free_port, read_log, two_nodes, wait_answered_by, wait_standby, Serve,
};

const LEASE_TTL: Duration = Duration::from_secs(2);
const SUB: &str = "projects/cluster/subscriptions/ticks-sub";

const MANIFEST: &str = include_str!("manifests/cluster-triggers.toml");

fn start(
    url: &str,
    node: &str,
    data: &Path,
    port: u16,
    log: &Path,
    config: Option<&Path>,
) -> Serve {
    let mut b = cluster_node(url, node, LEASE_TTL, data, port, log);
    if let Some(c) = config {
        b = b.arg("--config").arg(c);
    }
    b.spawn()
}

/// Runs `pubrun ARGS --json` against `port`; panics with `log()` on failure.
fn cli_json(port: u16, args: &[&str], log: impl Fn() -> String) -> serde_json::Value {
    common::cli_json(port, None, args, log)
}

/// The schedule as `pubrun schedules list` shows it on `port`.
fn schedule(port: u16, log: impl Fn() -> String) -> serde_json::Value {
    let list = cli_json(port, &["schedules", "list"], &log);
    let all = list["schedules"].as_array().expect("schedules array");
    assert_eq!(all.len(), 1, "{list:#}");
    assert_eq!(all[0]["name"], "every-minute", "{list:#}");
    all[0].clone()
}

/// Polls the schedule on `port` until its last fire time is set and
/// differs from `after`; returns it.
fn wait_fired(port: u16, after: Option<&str>, log: impl Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let s = schedule(port, &log);
        if let Some(t) = s["lastFireTime"].as_str() {
            if Some(t) != after {
                return t.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new tick after {after:?}: {s:#}\n--- server log ---\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `POST /hooks/NAME` with a body; returns the status line.
fn post_hook(port: u16, name: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /hooks/{name} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedules_and_webhooks_fail_over_and_no_tick_fires_twice() {
    let (pg, dirs, (data_a, data_b), (log_a, log_b)) = two_nodes();
    let read = read_log;
    let config = dirs.path().join("pubrun.toml");
    std::fs::write(&config, MANIFEST).unwrap();

    let port_a = free_port();
    let mut a = start(&pg.url(), "a", &data_a, port_a, &log_a, Some(&config));
    a.wait_healthy();
    let la = || read(&log_a);

    // A fires a tick (at the next full minute).
    let first = wait_fired(port_a, None, la);

    let port_b = free_port();
    let mut b = start(&pg.url(), "b", &data_b, port_b, &log_b, None);
    let lb = || read(&log_b);
    wait_standby(&mut b, lb).await;

    a.child().kill().expect("SIGKILL A");
    a.child().wait().unwrap();
    wait_answered_by(port_b, "b", Duration::from_secs(60), lb);

    // B serves A's schedule (it got no manifest) with A's last tick, and
    // A's webhook.
    let s = schedule(port_b, lb);
    assert_eq!(s["lastFireTime"].as_str(), Some(first.as_str()), "{s:#}");
    assert_eq!(s["cron"], "* * * * *", "{s:#}");
    assert_eq!(s["paused"], false, "{s:#}");
    let status = post_hook(port_b, "deploy", "ship it");
    assert!(
        status.starts_with("HTTP/1.1 2"),
        "POST /hooks/deploy on B: {status}\n{}",
        lb()
    );

    // B fires the next tick, never A's again.
    let second = wait_fired(port_b, Some(&first), lb);
    assert!(second > first, "{second} after {first}");

    // Every message through B: each tick once, the hook's message once.
    let mut sub = SubscriberClient::new(connect(port_b).await);
    let mut ticks: Vec<String> = Vec::new();
    let mut hooks = 0;
    let mut empty = 0;
    while empty < 3 {
        #[allow(deprecated)]
        let msgs = sub
            .pull(pb::PullRequest {
                subscription: SUB.into(),
                max_messages: 100,
                return_immediately: true,
            })
            .await
            .expect("pull")
            .into_inner()
            .received_messages;
        if msgs.is_empty() {
            empty += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        sub.acknowledge(pb::AcknowledgeRequest {
            subscription: SUB.into(),
            ack_ids: msgs.iter().map(|m| m.ack_id.clone()).collect(),
        })
        .await
        .unwrap();
        for m in msgs {
            let m = m.message.unwrap();
            match m.attributes.get("scheduledTime") {
                Some(t) => {
                    assert_eq!(&m.data[..], b"tick");
                    assert_eq!(m.attributes["schedule"], "every-minute");
                    ticks.push(t.clone());
                }
                None => {
                    assert_eq!(&m.data[..], b"ship it");
                    hooks += 1;
                }
            }
        }
    }
    assert_eq!(hooks, 1, "the webhook's message, once");
    let unique: HashSet<&String> = ticks.iter().collect();
    assert_eq!(unique.len(), ticks.len(), "a tick fired twice: {ticks:?}");
    assert!(ticks.contains(&first), "A's tick {first}: {ticks:?}");
    assert!(ticks.contains(&second), "B's tick {second}: {ticks:?}");
    assert!(
        lb().contains("schedule fired"),
        "B fired a tick itself:\n{}",
        lb()
    );
}
