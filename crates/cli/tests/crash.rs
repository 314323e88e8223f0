//! `kill -9` under publish load: every acknowledged publish survives, and no
//! acknowledged ack comes back. Drives the real binary over gRPC.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use tonic::transport::Channel;

use common::{connect, create_topic_and_subscription, pull_now, Serve, ServeBuilder};

/// Spawns a server on `data` and connects (not waiting for health: the
/// gRPC connect retries).
async fn start(data: &Path) -> (Serve, Channel) {
    let server = ServeBuilder::new().data_dir(data).spawn();
    let ch = connect(server.port()).await;
    (server, ch)
}

const TOPIC: &str = "projects/crash/topics/load";
const SUB: &str = "projects/crash/subscriptions/load-sub";

/// Panics when there are `ids`, saying how many `what` and the first five.
fn assert_none(ids: &[&String], what: &str) {
    assert!(
        ids.is_empty(),
        "{} {what}, e.g. {:?}",
        ids.len(),
        &ids[..ids.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_publish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, ch) = start(dir.path()).await;
    create_topic_and_subscription(&ch, TOPIC, SUB).await;

    // id → payload of every publish the server acknowledged.
    let published: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    // ids whose Acknowledge call returned OK.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    // ids of an Acknowledge sent but not answered when the server died: the
    // server may or may not have made it durable, so either outcome is right.
    let ack_in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut client = PublisherClient::new(ch.clone());
        let published = published.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let batch: Vec<pb::PubsubMessage> = (0..10)
                    .map(|j| pb::PubsubMessage {
                        data: format!("w{w}-{i}-{j}").into_bytes().into(),
                        ..Default::default()
                    })
                    .collect();
                let datas: Vec<Vec<u8>> = batch.iter().map(|m| m.data.to_vec()).collect();
                match client
                    .publish(pb::PublishRequest {
                        topic: TOPIC.into(),
                        messages: batch,
                    })
                    .await
                {
                    Ok(r) => {
                        let mut p = published.lock().unwrap();
                        for (id, d) in r.into_inner().message_ids.into_iter().zip(datas) {
                            p.insert(id, d);
                        }
                    }
                    Err(_) => break, // the server died
                }
            }
        }));
    }
    {
        let mut sub = SubscriberClient::new(ch.clone());
        let acked = acked.clone();
        let in_flight = ack_in_flight.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(msgs) = pull_now(&mut sub, SUB, 50).await else {
                    break;
                };
                if msgs.is_empty() {
                    continue;
                }
                let ack_ids = msgs.iter().map(|m| m.ack_id.clone()).collect();
                let ids: Vec<String> = msgs
                    .iter()
                    .map(|m| m.message.as_ref().unwrap().message_id.clone())
                    .collect();
                in_flight.lock().unwrap().extend(ids.iter().cloned());
                match sub
                    .acknowledge(pb::AcknowledgeRequest {
                        subscription: SUB.into(),
                        ack_ids,
                    })
                    .await
                {
                    Ok(_) => {
                        let mut f = in_flight.lock().unwrap();
                        for id in &ids {
                            f.remove(id);
                        }
                        acked.lock().unwrap().extend(ids);
                    }
                    Err(_) => break,
                }
            }
        }));
    }

    // Kill once real load has been acknowledged on both paths.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (p, a) = (published.lock().unwrap().len(), acked.lock().unwrap().len());
        if p >= 5_000 && a >= 500 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "load did not build up: {p} published, {a} acked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.child().kill().expect("SIGKILL pubrun");
    server.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let published = published.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    let ack_in_flight = ack_in_flight.lock().unwrap().clone();
    drop(server);

    let (_server, ch) = start(dir.path()).await;
    let mut sub = SubscriberClient::new(ch);
    let mut delivered: HashMap<String, Vec<u8>> = HashMap::new();
    loop {
        let msgs = pull_now(&mut sub, SUB, 1000)
            .await
            .expect("pull after restart");
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            let m = m.message.unwrap();
            assert!(
                delivered
                    .insert(m.message_id.clone(), m.data.to_vec())
                    .is_none(),
                "duplicate in one drain"
            );
        }
    }

    let lost: Vec<&String> = published
        .keys()
        .filter(|id| {
            !acked.contains(*id) && !ack_in_flight.contains(*id) && !delivered.contains_key(*id)
        })
        .collect();
    assert_none(&lost, "acknowledged publishes lost after kill -9");
    let resurrected: Vec<&String> = acked
        .iter()
        .filter(|id| delivered.contains_key(*id))
        .collect();
    assert_none(&resurrected, "acked messages came back");
    for (id, data) in &delivered {
        if let Some(want) = published.get(id) {
            assert_eq!(
                data, want,
                "payload of message {id} changed across the crash"
            );
        }
    }
    eprintln!(
        "crash test: {} publishes acknowledged, {} acked before kill, {} redelivered after restart",
        published.len(),
        acked.len(),
        delivered.len()
    );
}
