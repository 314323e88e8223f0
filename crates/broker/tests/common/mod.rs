//! What the broker's integration tests share: a broker over the embedded
//! store in a test's directory, resource names in project `p` (`topic-ID`, `sub-ID`: valid however short the id), and message
//! builders. (Each test binary uses a part.)
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use pubrun_broker::{Broker, Delivered};
use pubrun_core::{OutgoingMessage, SubscriptionConfig, SubscriptionName, TopicConfig, TopicName};
use pubrun_store::EmbeddedStore;

pub fn open(dir: &Path) -> Arc<Broker> {
    Broker::open(Arc::new(EmbeddedStore::open(dir).unwrap())).unwrap()
}

/// A broker in a fresh directory (kept while the returned guard lives).
pub fn fresh() -> (tempfile::TempDir, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    (dir, b)
}

pub fn topic(id: &str) -> TopicName {
    TopicName::parse(&format!("projects/p/topics/topic-{id}")).unwrap()
}

pub fn subn(id: &str) -> SubscriptionName {
    SubscriptionName::parse(&format!("projects/p/subscriptions/sub-{id}")).unwrap()
}

pub async fn make_topic(b: &Broker, t: &str) {
    b.create_topic(topic_config(t)).await.unwrap();
}

pub fn topic_config(t: &str) -> TopicConfig {
    TopicConfig {
        name: topic(t).to_string(),
        labels: Default::default(),
    }
}

/// A pull subscription `id` on topic `t` with a 10 s ack deadline.
pub fn sub_config(id: &str, t: &str) -> SubscriptionConfig {
    SubscriptionConfig {
        name: subn(id).to_string(),
        topic: topic(t).to_string(),
        ack_deadline_seconds: 10,
        ..Default::default()
    }
}

pub fn msg(data: &str) -> OutgoingMessage {
    OutgoingMessage {
        data: data.to_string().into(),
        ..Default::default()
    }
}

pub fn with_attrs(data: &str, attrs: &[(&str, &str)]) -> OutgoingMessage {
    OutgoingMessage {
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..msg(data)
    }
}

/// The data of delivered messages, in delivery order.
pub fn datas(d: &[Delivered]) -> Vec<String> {
    d.iter()
        .map(|m| String::from_utf8(m.message.data.to_vec()).unwrap())
        .collect()
}
