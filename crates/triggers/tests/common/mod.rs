//! Setup the triggers tests share: a broker on an embedded store with the
//! topic and pull subscription triggers publish to, serving a router on a
//! free port, and reading back what was published.

#![allow(dead_code)]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pubrun_broker::Broker;
use pubrun_core::clock::ManualClock;
use pubrun_core::{Message, SubscriptionConfig, SubscriptionName, TopicConfig};
use pubrun_store::EmbeddedStore;
use pubrun_triggers::Triggers;

pub fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A broker on an embedded store in `dir/broker`, with `topic` and its
/// subscription `sub`.
pub async fn broker(dir: &Path, topic: &str, sub: &str) -> Arc<Broker> {
    let broker = Broker::open(Arc::new(EmbeddedStore::open(dir.join("broker")).unwrap())).unwrap();
    create_topic(&broker, topic, sub).await;
    broker
}

/// Creates `topic` and a pull subscription `sub` on it (ack deadline 60 s).
pub async fn create_topic(broker: &Broker, topic: &str, sub: &str) {
    broker
        .create_topic(TopicConfig {
            name: topic.into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    broker
        .create_subscription(SubscriptionConfig {
            name: sub.into(),
            topic: topic.into(),
            ack_deadline_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Serves `router` on a free port of 127.0.0.1 for the rest of the test.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, router).into_future());
    addr
}

/// One pull of what is ready on `sub` (up to 100), acked.
pub async fn pull_acked(broker: &Broker, sub: &str) -> Vec<Arc<Message>> {
    let sub = SubscriptionName::parse(sub).unwrap();
    let got = broker.pull(&sub, 100, None).await.unwrap();
    if !got.is_empty() {
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        broker.acknowledge(&sub, &ids).await.unwrap();
    }
    got.into_iter().map(|d| d.message).collect()
}

/// A test's data directory, its broker and a manual clock.
pub struct Env {
    pub _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub broker: Arc<Broker>,
    pub clock: ManualClock,
}

impl Env {
    /// A broker on an embedded store in `dir` with `topic` and its
    /// subscription `sub`; the clock at `start` (RFC 3339).
    pub async fn new(topic: &str, sub: &str, start: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path(), topic, sub).await;
        Env::with(dir, broker, start)
    }

    /// The same over a broker the test made itself in `dir`.
    pub fn with(dir: tempfile::TempDir, broker: Arc<Broker>, start: &str) -> Env {
        Env {
            data: dir.path().join("data"),
            _dir: dir,
            broker,
            clock: ManualClock::new(utc(start)),
        }
    }

    /// `Triggers` on the data directory, publishing to the broker, on the
    /// manual clock (a second call: a restarted server).
    pub async fn triggers(&self) -> Arc<Triggers> {
        Arc::new(
            Triggers::open_with_clock(
                &self.data,
                self.broker.clone(),
                Arc::new(self.clock.clone()),
            )
            .await
            .unwrap(),
        )
    }
}

/// Waits until `t`'s scheduler has evaluated (and published) at `at`.
pub async fn evaluated(t: &Triggers, at: DateTime<Utc>) {
    tokio::time::timeout(Duration::from_secs(10), t.scheduler().wait_evaluated(at))
        .await
        .expect("scheduler evaluated");
}

/// The names of the schedules `t` lists, in its order.
pub async fn schedule_names(t: &Triggers) -> Vec<String> {
    t.list_schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}
