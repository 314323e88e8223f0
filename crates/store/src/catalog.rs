//! The catalog: every topic and subscription, with the internal ids and
//! cursors the log refers to.

use std::collections::BTreeMap;

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicEntry {
    pub uid: u64,
    pub config: TopicConfig,
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
