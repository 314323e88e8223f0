//! Cluster mode, first step: two real `pubrun serve --store postgres://…`
//! processes on one throwaway PostgreSQL. The second waits as a hot standby
//! (it does not listen, so `/healthz` does not answer) while the first owns
//! the Pub/Sub state; after `kill -9` of the first it takes over within the
//! lease TTL and delivers exactly the messages that were not acknowledged.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use pubrun_store::testing::TempPostgres;

use common::{connect, free_port, healthz, wait_healthy, Server};

const TOPIC: &str = "projects/cluster/topics/events";
const SUB: &str = "projects/cluster/subscriptions/events-sub";
const LEASE_TTL: Duration = Duration::from_secs(2);

fn start(url: &str, node: &str, data: &Path, port: u16, log: &Path) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_pubrun"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .args(["--store", url, "--node-name", node])
        .env("PUBRUN_LEASE_TTL_MS", LEASE_TTL.as_millis().to_string())
        .env("PUBRUN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start pubrun");
    Server(child)
}

#[allow(deprecated)]
async fn pull(
    sub: &mut SubscriberClient<tonic::transport::Channel>,
    max: i32,
) -> Vec<pb::ReceivedMessage> {
    sub.pull(pb::PullRequest {
        subscription: SUB.into(),
        max_messages: max,
        return_immediately: true,
    })
    .await
    .expect("pull")
    .into_inner()
    .received_messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_takes_over_after_kill_9_and_delivers_exactly_the_unacked() {
    let pg = TempPostgres::start();
    let dirs = tempfile::tempdir().unwrap();
    let (data_a, data_b) = (dirs.path().join("a"), dirs.path().join("b"));
    let (log_a, log_b) = (dirs.path().join("a.log"), dirs.path().join("b.log"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    let port_a = free_port();
    let mut a = start(&pg.url(), "a", &data_a, port_a, &log_a);
    wait_healthy(&mut a.0, port_a, Duration::from_secs(60), || read(&log_a));
    let ch = connect(port_a).await;
    let mut publisher = PublisherClient::new(ch.clone());
    let mut sub = SubscriberClient::new(ch);
    publisher
        .create_topic(pb::Topic {
            name: TOPIC.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    sub.create_subscription(pb::Subscription {
        name: SUB.into(),
        topic: TOPIC.into(),
        ack_deadline_seconds: 600,
        ..Default::default()
    })
    .await
    .unwrap();

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
    while Instant::now() < until {
        assert!(
            b.0.try_wait().unwrap().is_none(),
            "standby exited:\n{}",
            read(&log_b)
        );
        assert!(
            !healthz(port_b),
            "the standby serves while A owns the Pub/Sub state"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        read(&log_b).contains("waiting as a hot standby"),
        "standby log:\n{}",
        read(&log_b)
    );

    a.0.kill().expect("SIGKILL A");
    a.0.wait().unwrap();
    let killed = Instant::now();
    wait_healthy(&mut b.0, port_b, Duration::from_secs(60), || read(&log_b));
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
