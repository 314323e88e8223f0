//! The catalog: every topic and subscription, with the internal ids and
//! cursors the log refers to.

use std::collections::BTreeMap;
use std::time::Duration;

use pubrun_core::config::Labels;
use pubrun_core::{SubscriptionConfig, TopicConfig};
use serde::{Deserialize, Serialize};

/// Version of the catalog file format; bump with a migration when it changes.
pub const CATALOG_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub version: u32,
    /// Internal ids are never reused, so a record in the log that names a
    /// deleted (and maybe re-created) resource is recognised and skipped.
    pub next_uid: u64,
    /// Keyed by full topic name.
    pub topics: BTreeMap<String, TopicEntry>,
    /// Keyed by full subscription name.
    pub subscriptions: BTreeMap<String, SubscriptionEntry>,
    /// Keyed by full snapshot name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshots: BTreeMap<String, SnapshotEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicEntry {
    pub uid: u64,
    pub config: TopicConfig,
    /// Google's topic `message_retention_duration`: every message is kept
    /// this long after publish, acked or not, and subscriptions may seek
    /// back within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_retention_duration: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionEntry {
    pub uid: u64,
    /// uid of the topic, `None` once the topic was deleted.
    pub topic_uid: Option<u64>,
    /// The subscription receives messages with `seq >= start_seq`: those
    /// published after it was created.
    pub start_seq: u64,
    pub config: SubscriptionConfig,
}

/// A snapshot: the ack state of a subscription at one moment. It holds the
/// messages that were unacked then (`seqs`) and every message published to
/// the topic from `from_seq` on, until `expire_time_nanos`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Full topic name, or `_deleted-topic_` once the topic is gone.
    pub topic: String,
    /// uid of the topic, `None` once the topic was deleted.
    pub topic_uid: Option<u64>,
    pub expire_time_nanos: i64,
    #[serde(default)]
    pub labels: Labels,
    pub from_seq: u64,
    /// Inclusive seq ranges, ascending and disjoint (a backlog is mostly runs).
    #[serde(default)]
    pub seqs: Vec<(u64, u64)>,
}

impl SnapshotEntry {
    /// Whether the snapshot counts `seq` as unacked.
    pub fn covers(&self, seq: u64) -> bool {
        seq >= self.from_seq || ranges_contain(&self.seqs, seq)
    }
}

/// Compresses ascending seqs into inclusive ranges.
pub fn to_ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == s => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

pub fn ranges_contain(ranges: &[(u64, u64)], seq: u64) -> bool {
    let i = ranges.partition_point(|(_, hi)| *hi < seq);
    ranges.get(i).is_some_and(|(lo, _)| *lo <= seq)
}

impl Catalog {
    pub fn new() -> Self {
        Catalog {
            version: CATALOG_VERSION,
            next_uid: 1,
            ..Default::default()
        }
    }

    pub fn allocate_uid(&mut self) -> u64 {
        let uid = self.next_uid;
        self.next_uid += 1;
        uid
    }
}
