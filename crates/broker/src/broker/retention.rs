//! Retention and replay: message retention on topics and subscriptions,
//! `retain_acked_messages`, snapshots and Seek.
//!
//! Acked messages normally leave memory at once. A message stays in its
//! topic's *kept* set while something may still want it back:
//! - the topic's `message_retention_duration` covers it (by publish time);
//! - a subscription of the topic with `retain_acked_messages` has a
//!   retention that covers it;
//! - an unexpired snapshot of the topic counts it as unacked.
//!
//! Publish and log replay apply the same rule (`State::distribute`), so the
//! kept set is rebuilt at start. A Seek removes from the backlog what the
//! target acks and re-adds from the kept set what it unacks (and the
//! subscription may receive); it is logged as one `Seek` record that replay
//! applies the same way. Expired messages leave the backlog and the kept set
//! by publish time (a pure function of the clock, so no record is needed),
//! which raises the lowest live seq and lets `reclaim` delete segments.
//!
//! Wall time comes from a [`Clock`] so tests can move it days ahead.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubrun_core::clock::Clock;
use pubrun_core::config::{
    check_retention, validate_labels, Labels, MAX_SUBSCRIPTION_RETENTION, MAX_TOPIC_RETENTION,
};
use pubrun_core::names::{SnapshotName, DELETED_TOPIC};
use pubrun_core::{
    Error, ProjectName, Result, SubscriptionConfig, SubscriptionName, TopicConfig, TopicName,
};
use pubrun_store::catalog::to_ranges;
use pubrun_store::{Catalog, Record, SeekTarget, SnapshotEntry, TopicEntry};

use super::{page_of_names, page_under, Broker, ListRequest, Page, State, TopicUpdate};
use crate::msg::{keeps, Msg};

/// Google: a snapshot lives 7 days minus the age of the oldest unacked
/// message, and one that would live less than an hour is refused.
const SNAPSHOT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
const MIN_SNAPSHOT_LIFETIME: Duration = Duration::from_secs(3600);

fn nanos(d: Duration) -> i64 {
    d.as_nanos().min(i64::MAX as u128) as i64
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Full topic name, or `_deleted-topic_`.
    pub topic: String,
    pub expire_time_nanos: i64,
    pub labels: Labels,
}

fn info(name: &str, s: &SnapshotEntry) -> SnapshotInfo {
    SnapshotInfo {
        name: name.to_string(),
        topic: s.topic.clone(),
        expire_time_nanos: s.expire_time_nanos,
        labels: s.labels.clone(),
    }
}

/// What keeps a topic's messages after they were acked.
#[derive(Default)]
struct Holders {
    /// The topic's own retention.
    topic_window: Option<Duration>,
    /// Longest of the topic's retention and the retention of its
    /// subscriptions that retain acked messages.
    window: Option<Duration>,
    snapshots: Vec<SnapshotEntry>,
}

/// Runtime retention state, part of the broker's `State`.
pub(super) struct Retention {
    pub clock: Arc<dyn Clock>,
    /// topic uid → messages kept for seeks, by seq.
    kept: HashMap<u64, BTreeMap<u64, Msg>>,
    holders: HashMap<u64, Holders>,
    /// sub uid → (next seq at the time, target) of its last seek: a publish
    /// that was in flight during the seek is judged by the target when it
    /// arrives, as replay judges it (its record precedes the seek's).
    seek_marks: HashMap<u64, (u64, SeekTarget)>,
}

impl Retention {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Retention {
            clock,
            kept: HashMap::new(),
            holders: HashMap::new(),
            seek_marks: HashMap::new(),
        }
    }

    /// Rebuilds the holders from the catalog after a change.
    pub fn sync(&mut self, c: &Catalog) {
        self.holders.clear();
        for t in c.topics.values() {
            let h = self.holders.entry(t.uid).or_default();
            h.topic_window = t.message_retention_duration;
            h.window = t.message_retention_duration;
        }
        for s in c.subscriptions.values() {
            if let (Some(t), true) = (s.topic_uid, s.config.retain_acked_messages) {
                let h = self.holders.entry(t).or_default();
                h.window = h.window.max(Some(s.config.retention()));
            }
        }
        for s in c.snapshots.values() {
            if let Some(t) = s.topic_uid {
                self.holders.entry(t).or_default().snapshots.push(s.clone());
            }
        }
        let live: std::collections::HashSet<u64> =
            c.subscriptions.values().map(|s| s.uid).collect();
        self.seek_marks.retain(|uid, _| live.contains(uid));
    }

    fn wants(&self, topic_uid: u64, m: &Msg, now: i64) -> bool {
        let Some(h) = self.holders.get(&topic_uid) else {
            return false;
        };
        h.window
            .is_some_and(|w| m.publish_time_nanos() > now.saturating_sub(nanos(w)))
            || h.snapshots
                .iter()
                .any(|s| s.expire_time_nanos > now && s.covers(m.seq()))
    }

    /// Keeps the messages of a publish (or replayed publish) that a holder wants.
    pub fn keep(&mut self, topic_uid: u64, messages: &[Msg]) {
        let now = self.clock.now_nanos();
        for m in messages {
            if self.wants(topic_uid, m, now) {
                self.kept
                    .entry(topic_uid)
                    .or_default()
                    .insert(m.seq(), m.clone());
            }
        }
    }

    /// Whether subscription `uid` takes `m` given its last seek.
    pub fn admits(&self, uid: u64, m: &Msg) -> bool {
        self.seek_marks
            .get(&uid)
            .is_none_or(|(bound, target)| m.seq() >= *bound || keeps(target, m))
    }

    /// Lowest kept seq (reclaim must not drop its segment).
    pub fn lowest_kept(&self) -> Option<u64> {
        self.kept
            .values()
            .filter_map(|m| m.keys().next())
            .min()
            .copied()
    }
}

/// Applies a seek to subscription `uid` (live and on replay).
pub(super) fn apply_seek(st: &mut State, uid: u64, target: SeekTarget, now: Instant) {
    let State {
        catalog,
        subs,
        ret,
        next_seq,
        ..
    } = st;
    let Some(entry) = catalog.subscriptions.values().find(|s| s.uid == uid) else {
        return;
    };
    let Some(sub) = subs.get_mut(&uid) else {
        return;
    };
    let now_nanos = ret.clock.now_nanos();
    let acked: Vec<u64> = sub
        .backlog
        .iter()
        .filter(|(_, p)| !keeps(&target, &p.msg))
        .map(|(s, _)| s)
        .collect();
    for s in acked {
        sub.remove(s, now);
    }
    if let Some(kept) = entry.topic_uid.and_then(|t| ret.kept.get(&t)) {
        let h = ret.holders.get(&entry.topic_uid.unwrap());
        let topic_window = h.and_then(|h| h.topic_window);
        let sub_cutoff = now_nanos.saturating_sub(nanos(entry.config.retention()));
        for (seq, m) in kept {
            if sub.backlog.contains_key(seq) || !keeps(&target, m) {
                continue;
            }
            let eligible = match &target {
                // The snapshot retained it for exactly this.
                SeekTarget::Snapshot { .. } => true,
                SeekTarget::Time { .. } => {
                    topic_window.is_some_and(|w| {
                        m.publish_time_nanos() > now_nanos.saturating_sub(nanos(w))
                    }) || (entry.config.retain_acked_messages
                        && *seq >= entry.start_seq
                        && m.publish_time_nanos() > sub_cutoff)
                }
            };
            if eligible {
                sub.add(m.clone(), now);
            }
        }
    }
    ret.seek_marks.insert(uid, (*next_seq, target));
    sub.notify.notify_waiters();
}

/// Drops messages older than their retention from backlogs and from the
/// kept sets. Returns how many left backlogs.
pub(super) fn expire(st: &mut State, now: Instant) -> usize {
    let State {
        catalog, subs, ret, ..
    } = st;
    let now_nanos = ret.clock.now_nanos();
    let mut dropped = 0;
    for entry in catalog.subscriptions.values() {
        let Some(sub) = subs.get_mut(&entry.uid) else {
            continue;
        };
        // Topic retention keeps messages available to subscribers too.
        let topic_window = entry
            .topic_uid
            .and_then(|t| ret.holders.get(&t))
            .and_then(|h| h.topic_window);
        let window = entry
            .config
            .retention()
            .max(topic_window.unwrap_or_default());
        let cutoff = now_nanos.saturating_sub(nanos(window));
        // Seqs follow publish order, so the expired messages are a prefix.
        let old: Vec<u64> = sub
            .backlog
            .iter()
            .take_while(|(_, p)| p.msg.publish_time_nanos() <= cutoff)
            .map(|(s, _)| s)
            .collect();
        for s in &old {
            sub.remove(*s, now);
        }
        dropped += old.len();
    }
    let Retention { kept, holders, .. } = ret;
    kept.retain(|topic, msgs| {
        let Some(h) = holders.get(topic) else {
            return false;
        };
        let cutoff = h
            .window
            .map(|w| now_nanos.saturating_sub(nanos(w)))
            .unwrap_or(i64::MAX);
        let gone: Vec<u64> = msgs
            .iter()
            .take_while(|(_, m)| m.publish_time_nanos() <= cutoff)
            .filter(|(seq, _)| {
                !h.snapshots
                    .iter()
                    .any(|s| s.expire_time_nanos > now_nanos && s.covers(**seq))
            })
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            msgs.remove(&s);
        }
        !msgs.is_empty()
    });
    dropped
}

/// Checks a subscription's retention settings (creation and update).
pub(super) fn check_subscription(config: &SubscriptionConfig) -> Result<()> {
    if let Some(d) = config.message_retention_duration {
        check_retention("message_retention_duration", d, MAX_SUBSCRIPTION_RETENTION)?;
    }
    Ok(())
}

fn check_topic_retention(d: Option<Duration>) -> Result<()> {
    if let Some(d) = d {
        check_retention("message_retention_duration", d, MAX_TOPIC_RETENTION)?;
    }
    Ok(())
}

impl Broker {
    /// Creates a topic with a message retention (`None`: acked messages are
    /// not kept for the topic).
    pub async fn create_topic_with_retention(
        &self,
        config: TopicConfig,
        retention: Option<Duration>,
    ) -> Result<TopicConfig> {
        TopicName::parse(&config.name)?;
        validate_labels(&config.labels)?;
        check_topic_retention(retention)?;
        self.change_catalog(|c, _| {
            if c.topics.contains_key(&config.name) {
                return Err(Error::already_exists(format!(
                    "topic {} already exists",
                    config.name
                )));
            }
            let uid = c.allocate_uid();
            c.topics.insert(
                config.name.clone(),
                TopicEntry {
                    uid,
                    config: config.clone(),
                    message_retention_duration: retention,
                },
            );
            Ok(config)
        })
        .await
    }

    /// `update_topic` that may also set (`Some(Some)`) or clear
    /// (`Some(None)`) the topic's message retention.
    pub async fn update_topic_with(
        &self,
        name: &TopicName,
        update: TopicUpdate,
        retention: Option<Option<Duration>>,
    ) -> Result<TopicConfig> {
        if let Some(l) = &update.labels {
            validate_labels(l)?;
        }
        if let Some(r) = retention {
            check_topic_retention(r)?;
        }
        let key = name.to_string();
        self.change_catalog(|c, _| {
            let t = c
                .topics
                .get_mut(&key)
                .ok_or_else(|| Error::not_found(format!("topic {key} not found")))?;
            if let Some(l) = update.labels {
                t.config.labels = l;
            }
            if let Some(r) = retention {
                t.message_retention_duration = r;
            }
            Ok(t.config.clone())
        })
        .await
    }

    /// The topic's message retention, if it has one.
    pub fn topic_retention(&self, topic: &str) -> Option<Duration> {
        self.lock()
            .catalog
            .topics
            .get(topic)
            .and_then(|t| t.message_retention_duration)
    }

    /// The wall clock the broker stamps and expires messages with.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.lock().ret.clock.clone()
    }

    /// Seeks to a time: messages published before it become acked, those
    /// at or after it unacked (acked ones only if they were retained).
    pub async fn seek_to_time(&self, name: &SubscriptionName, time_nanos: i64) -> Result<()> {
        self.seek(name, |_, _| Ok(SeekTarget::Time { nanos: time_nanos }))
            .await
    }

    /// Seeks to a snapshot of the same topic.
    pub async fn seek_to_snapshot(
        &self,
        name: &SubscriptionName,
        snapshot: &SnapshotName,
    ) -> Result<()> {
        let key = snapshot.to_string();
        self.seek(name, |c, topic_uid| {
            let now = self.lock_free_now();
            let s = c
                .snapshots
                .get(&key)
                .filter(|s| s.expire_time_nanos > now)
                .ok_or_else(|| Error::not_found(format!("snapshot {key} not found")))?;
            if s.topic_uid.is_none() || s.topic_uid != topic_uid {
                return Err(Error::precondition(format!(
                    "snapshot {key} is of topic {}, not of the subscription's topic; seek only to snapshots of the same topic",
                    s.topic
                )));
            }
            Ok(SeekTarget::Snapshot {
                from_seq: s.from_seq,
                seqs: s.seqs.clone(),
            })
        })
        .await
    }

    fn lock_free_now(&self) -> i64 {
        self.clock.now_nanos()
    }

    async fn seek(
        &self,
        name: &SubscriptionName,
        target: impl FnOnce(&Catalog, Option<u64>) -> Result<SeekTarget>,
    ) -> Result<()> {
        let durable = {
            let mut st = self.lock();
            let entry = st.sub_entry(name)?;
            let (uid, topic_uid) = (entry.uid, entry.topic_uid);
            let target = target(&st.catalog, topic_uid)?;
            apply_seek(&mut st, uid, target.clone(), Instant::now());
            // Enqueued under the lock: the log orders it among publishes and
            // acks as memory did.
            self.store.append(vec![Record::Seek {
                sub_uid: uid,
                target,
            }])
        };
        durable.await?;
        Ok(())
    }

    /// Drops expired messages (from backlogs and kept sets). The
    /// maintenance task calls this; tests call it after moving the clock.
    pub fn expire_retained(&self) -> usize {
        // A snapshot being created pins messages before its catalog entry
        // is installed: let it finish first.
        let Ok(_admin) = self.admin.try_lock() else {
            return 0;
        };
        let mut st = self.lock();
        let n = expire(&mut st, Instant::now());
        if n > 0 {
            tracing::info!(messages = n, "expired messages past their retention");
        }
        n
    }

    /// Deletes expired snapshots, then expired messages.
    pub async fn run_retention(&self) -> Result<usize> {
        let now = self.clock.now_nanos();
        let any = self
            .lock()
            .catalog
            .snapshots
            .values()
            .any(|s| s.expire_time_nanos <= now);
        if any {
            self.change_catalog(|c, _| {
                c.snapshots.retain(|_, s| s.expire_time_nanos > now);
                Ok(())
            })
            .await?;
        }
        Ok(self.expire_retained())
    }

    // ---- snapshots ----

    /// Captures the subscription's ack state: its unacked messages now and
    /// everything published to its topic from now on.
    pub async fn create_snapshot(
        &self,
        name: &SnapshotName,
        subscription: &SubscriptionName,
        labels: Labels,
    ) -> Result<SnapshotInfo> {
        validate_labels(&labels)?;
        let key = name.to_string();
        let sub_key = subscription.to_string();
        let _guard = self.admin.lock().await;
        let (catalog, result) = {
            let mut st = self.lock();
            let now = st.ret.clock.now_nanos();
            if st
                .catalog
                .snapshots
                .get(&key)
                .is_some_and(|s| s.expire_time_nanos > now)
            {
                return Err(Error::already_exists(format!(
                    "snapshot {key} already exists"
                )));
            }
            let entry = st.sub_entry(subscription)?.clone();
            let Some(topic_uid) = entry.topic_uid else {
                return Err(Error::precondition(format!(
                    "subscription {sub_key} has no topic (it was deleted); a snapshot needs one"
                )));
            };
            let sub = st.subs.get(&entry.uid).expect("catalog and runtime agree");
            let oldest = sub
                .backlog
                .values()
                .map(|p| p.msg.publish_time_nanos())
                .min()
                .unwrap_or(now);
            let expire = oldest.saturating_add(nanos(SNAPSHOT_LIFETIME));
            if expire - now < nanos(MIN_SNAPSHOT_LIFETIME) {
                return Err(Error::precondition(format!(
                    "the backlog of {sub_key} is too old: a snapshot of it would expire in less than 1 hour"
                )));
            }
            let msgs: Vec<Msg> = sub.backlog.values().map(|p| p.msg.clone()).collect();
            // Publishes in flight are not in the backlog yet: start there.
            let from_seq = st
                .inflight
                .keys()
                .next()
                .copied()
                .unwrap_or(st.next_seq)
                .min(st.next_seq);
            let snap = SnapshotEntry {
                topic: entry.config.topic.clone(),
                topic_uid: Some(topic_uid),
                expire_time_nanos: expire,
                labels,
                from_seq,
                seqs: to_ranges(msgs.iter().map(|m| m.seq())),
            };
            // Pin them now: an ack before the catalog is saved must not
            // drop them (pruning waits for the admin lock we hold).
            let kept = st.ret.kept.entry(topic_uid).or_default();
            for m in msgs {
                kept.insert(m.seq(), m);
            }
            let mut c = st.catalog.clone();
            let out = info(&key, &snap);
            c.snapshots.insert(key.clone(), snap);
            (c, out)
        };
        self.store.save_catalog(&catalog).await?;
        let mut st = self.lock();
        st.catalog = catalog;
        st.sync_runtime();
        Ok(result)
    }

    pub fn get_snapshot(&self, name: &SnapshotName) -> Result<SnapshotInfo> {
        let st = self.lock();
        let now = st.ret.clock.now_nanos();
        let key = name.to_string();
        st.catalog
            .snapshots
            .get(&key)
            .filter(|s| s.expire_time_nanos > now)
            .map(|s| info(&key, s))
            .ok_or_else(|| Error::not_found(format!("snapshot {key} not found")))
    }

    pub fn list_snapshots(&self, req: ListRequest<ProjectName>) -> Result<Page<SnapshotInfo>> {
        let st = self.lock();
        let now = st.ret.clock.now_nanos();
        page_under(&st.catalog.snapshots, "snapshots", req, |k, s| {
            (s.expire_time_nanos > now).then(|| info(k, s))
        })
    }

    /// Names of the topic's snapshots.
    pub fn list_topic_snapshots(&self, req: ListRequest<TopicName>) -> Result<Page<String>> {
        let st = self.lock();
        let now = st.ret.clock.now_nanos();
        let uid = st.topic(req.parent)?.uid;
        page_of_names(&st.catalog.snapshots, req, |s| {
            s.topic_uid == Some(uid) && s.expire_time_nanos > now
        })
    }

    pub async fn update_snapshot_labels(
        &self,
        name: &SnapshotName,
        labels: Labels,
    ) -> Result<SnapshotInfo> {
        validate_labels(&labels)?;
        let key = name.to_string();
        let now = self.clock.now_nanos();
        self.change_catalog(|c, _| {
            let s = c
                .snapshots
                .get_mut(&key)
                .filter(|s| s.expire_time_nanos > now)
                .ok_or_else(|| Error::not_found(format!("snapshot {key} not found")))?;
            s.labels = labels;
            Ok(info(&key, s))
        })
        .await
    }

    pub async fn delete_snapshot(&self, name: &SnapshotName) -> Result<()> {
        let key = name.to_string();
        let now = self.clock.now_nanos();
        self.change_catalog(|c, _| match c.snapshots.remove(&key) {
            Some(s) if s.expire_time_nanos > now => Ok(()),
            _ => Err(Error::not_found(format!("snapshot {key} not found"))),
        })
        .await
    }
}

/// When a topic is deleted its snapshots stay, detached, as in Google.
pub(super) fn detach_snapshots(c: &mut Catalog, topic_uid: u64) {
    for s in c
        .snapshots
        .values_mut()
        .filter(|s| s.topic_uid == Some(topic_uid))
    {
        s.topic_uid = None;
        s.topic = DELETED_TOPIC.to_string();
    }
}
