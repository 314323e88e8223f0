//! Helpers shared by the store integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use pubrun_core::Message;
use pubrun_store::{
    Catalog, EmbeddedStore, Record, Store, StoreError, SubscriptionEntry, TopicEntry,
};

/// Generous per-test bound: a hung append future fails the test instead of the run.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out (an append future never resolved?)")
}

/// Small deterministic PRNG (splitmix64): no extra dependencies, reproducible by seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo);
        lo + self.next_u64() % (hi - lo)
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

pub fn message(seq: u64, tag: &str, data: Bytes) -> Message {
    let mut attributes = BTreeMap::new();
    attributes.insert("tag".to_string(), tag.to_string());
    if seq.is_multiple_of(2) {
        attributes.insert("even".to_string(), "yes".to_string());
    }
    Message {
        seq,
        data,
        attributes,
        ordering_key: if seq.is_multiple_of(3) {
            format!("key-{}", seq % 7)
        } else {
            String::new()
        },
        publish_time_nanos: 1_700_000_000_000_000_000 + seq as i64,
    }
}

/// A publish record for `seqs` (ascending) on `topic_uid`.
pub fn publish(topic_uid: u64, seqs: impl IntoIterator<Item = u64>, tag: &str) -> Record {
    Record::Publish {
        topic_uid,
        messages: seqs
            .into_iter()
            .map(|s| message(s, tag, Bytes::from(format!("payload {tag} #{s}"))))
            .collect(),
    }
}

pub fn ack(sub_uid: u64, seqs: Vec<u64>) -> Record {
    Record::Ack { sub_uid, seqs }
}

pub fn frame_len(r: &Record) -> u64 {
    let mut v = Vec::new();
    r.encode_frame(&mut v);
    v.len() as u64
}

pub fn frames(records: &[Record]) -> Vec<u8> {
    let mut v = Vec::new();
    for r in records {
        r.encode_frame(&mut v);
    }
    v
}

pub fn log_dir(dir: &Path) -> PathBuf {
    dir.join("log")
}

pub fn seg_path(dir: &Path, base: u64) -> PathBuf {
    log_dir(dir).join(format!("{base:020}.seg"))
}

/// Writes a segment file by hand, as the writer would have, and returns its size.
pub fn write_segment(dir: &Path, base: u64, records: &[Record]) -> u64 {
    fs::create_dir_all(log_dir(dir)).unwrap();
    let bytes = frames(records);
    fs::write(seg_path(dir, base), &bytes).unwrap();
    bytes.len() as u64
}

/// `(base, size)` of every segment file, ascending by base.
pub fn segment_files(dir: &Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = fs::read_dir(log_dir(dir))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let base = name.strip_suffix(".seg")?.parse().ok()?;
            Some((base, e.metadata().ok()?.len()))
        })
        .collect();
    v.sort_unstable();
    v
}

pub fn last_segment(dir: &Path) -> PathBuf {
    let (base, _) = *segment_files(dir).last().expect("at least one segment");
    seg_path(dir, base)
}

pub fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

pub fn append_raw(p: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(p).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

pub fn truncate(p: &Path, len: u64) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.set_len(len).unwrap();
    f.sync_all().unwrap();
}

/// Opens the store and replays it, returning the store (ready for appends),
/// every replayed record and the next seq.
pub fn open_replay(dir: &Path) -> (EmbeddedStore, Vec<Record>, u64) {
    let store = EmbeddedStore::open(dir).expect("open store");
    let mut recs = Vec::new();
    let next = store.replay(&mut |r| recs.push(r)).expect("replay");
    (store, recs, next)
}

/// Opens and replays, returning the replay error (the store is dropped).
pub fn replay_err(dir: &Path) -> StoreError {
    let store = EmbeddedStore::open(dir).expect("open store");
    let mut n = 0usize;
    match store.replay(&mut |_| n += 1) {
        Ok(next) => {
            panic!("replay succeeded ({n} records, next_seq {next}) but corruption was expected")
        }
        Err(e) => e,
    }
}

/// The next seq a correct replay must return for `records` in a log whose
/// newest segment starts at `floor`.
pub fn expected_next_seq(records: &[Record], floor: u64) -> u64 {
    records
        .iter()
        .filter_map(|r| r.last_seq())
        .map(|s| s + 1)
        .max()
        .unwrap_or(1)
        .max(floor)
}

pub async fn append_ok(store: &EmbeddedStore, records: Vec<Record>) {
    bounded(store.append(records)).await.expect("append");
}

/// A catalog with a few resources. Configs are built from JSON so these
/// tests keep compiling when optional config fields are added.
pub fn sample_catalog(n_topics: u64) -> Catalog {
    let mut c = Catalog::new();
    for t in 0..n_topics {
        let uid = c.allocate_uid();
        let name = format!("projects/p/topics/t{t}");
        let config = serde_json::from_value(serde_json::json!({
            "name": name,
            "labels": {"team": "ünïcode-☃", "n": t.to_string()},
        }))
        .unwrap();
        c.topics.insert(
            name.clone(),
            TopicEntry {
                uid,
                config,
                message_retention_duration: None,
            },
        );
        let sub_uid = c.allocate_uid();
        let sub_name = format!("projects/p/subscriptions/s{t}");
        let config = serde_json::from_value(serde_json::json!({
            "name": sub_name,
            "topic": name,
            "ack_deadline_seconds": 10 + t,
        }))
        .unwrap();
        c.subscriptions.insert(
            sub_name,
            SubscriptionEntry {
                uid: sub_uid,
                topic_uid: if t % 2 == 0 { Some(uid) } else { None },
                start_seq: 7 * t,
                config,
            },
        );
    }
    c
}
