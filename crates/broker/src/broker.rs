//! The broker: catalog operations, publish, pull, ack, streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pubrun_core::config::{normalize_ack_deadline, validate_labels, Labels};
use pubrun_core::limits::{DEFAULT_PAGE_SIZE, MAX_ACK_DEADLINE_SECS, MAX_PAGE_SIZE};
use pubrun_core::message::validate_publish;
use pubrun_core::names::DELETED_TOPIC;
use pubrun_core::{
    Error, Message, OutgoingMessage, ProjectName, Result, SubscriptionConfig, SubscriptionName, TopicConfig,
    TopicName,
};
use pubrun_store::{Catalog, Record, Store, SubscriptionEntry, TopicEntry};

use crate::subscription::{StreamQuota, SubState};

/// A message handed to a subscriber, with the ack id that settles it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub ack_id: String,
    pub message: Arc<Message>,
    /// 1 on first delivery.
    pub delivery_attempt: u32,
}

/// One page of a List call.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Empty when this is the last page.
    pub next_page_token: String,
}

/// Fields an UpdateTopic may change; `None` leaves a field alone.
#[derive(Debug, Default, Clone)]
pub struct TopicUpdate {
    pub labels: Option<Labels>,
}

/// Fields an UpdateSubscription may change; `None` leaves a field alone.
#[derive(Debug, Default, Clone)]
pub struct SubscriptionUpdate {
    pub ack_deadline_seconds: Option<i32>,
    pub labels: Option<Labels>,
}

pub struct Broker {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    /// Serialises catalog changes so that each save writes a complete,
    /// ordered catalog.
    admin: tokio::sync::Mutex<()>,
    next_stream_id: AtomicU64,
}

struct State {
    catalog: Catalog,
    next_seq: u64,
    /// topic uid → uids of its subscriptions.
    topic_subs: HashMap<u64, Vec<u64>>,
    subs: HashMap<u64, SubState>,
    /// First seqs of publishes that are assigned but not yet distributed,
    /// so that reclaim never drops their segment.
    inflight: BTreeMap<u64, usize>,
}

impl State {
    fn topic(&self, name: &TopicName) -> Result<&TopicEntry> {
        self.catalog.topics.get(&name.to_string()).ok_or_else(|| Error::not_found(format!("topic {name} not found")))
    }

    fn sub_entry(&self, name: &SubscriptionName) -> Result<&SubscriptionEntry> {
        self.catalog
            .subscriptions
            .get(&name.to_string())
            .ok_or_else(|| Error::not_found(format!("subscription {name} not found")))
    }

    fn sub_mut(&mut self, name: &SubscriptionName) -> Result<&mut SubState> {
        let uid = self.sub_entry(name)?.uid;
        Ok(self.subs.get_mut(&uid).expect("catalog and runtime agree"))
    }

    /// Brings runtime state in line with the catalog after a change.
    fn sync_runtime(&mut self) {
        let cat = &self.catalog;
        self.topic_subs.clear();
        for s in cat.subscriptions.values() {
            if let Some(t) = s.topic_uid {
                self.topic_subs.entry(t).or_default().push(s.uid);
            }
            let st = self.subs.entry(s.uid).or_insert_with(|| SubState::new(s.uid, s.config.ack_deadline_seconds));
            st.ack_deadline = Duration::from_secs(s.config.ack_deadline_seconds as u64);
        }
        let live: std::collections::HashSet<u64> = cat.subscriptions.values().map(|s| s.uid).collect();
        self.subs.retain(|uid, st| {
            let keep = live.contains(uid);
            if !keep {
                // Wake streams and pulls so they notice the subscription is gone.
                st.notify.notify_waiters();
            }
            keep
        });
    }

    fn distribute(&mut self, topic_uid: u64, messages: &[Arc<Message>]) {
        let Some(subs) = self.topic_subs.get(&topic_uid) else { return };
        for uid in subs {
            let Some(entry) = self.catalog.subscriptions.values().find(|s| s.uid == *uid) else { continue };
            let start = entry.start_seq;
            let st = self.subs.get_mut(uid).expect("runtime has every catalog sub");
            let mut added = false;
            for m in messages.iter().filter(|m| m.seq >= start) {
                st.add(m.clone());
                added = true;
            }
            if added {
                st.notify.notify_waiters();
            }
        }
    }
}

fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn ack_id(sub_uid: u64, seq: u64, attempt: u32) -> String {
    format!("{sub_uid}-{seq}-{attempt}")
}

/// Returns (sub uid, seq) of a well-formed ack id.
fn parse_ack_id(id: &str) -> Result<(u64, u64)> {
    let mut parts = id.split('-');
    let parsed = (|| {
        let sub = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        parts.next()?.parse::<u32>().ok()?;
        parts.next().is_none().then_some((sub, seq))
    })();
    parsed.ok_or_else(|| Error::invalid(format!("invalid ack id \"{id}\": pass ack ids exactly as received")))
}

fn page<T: Clone>(all: impl Iterator<Item = (String, T)>, page_size: i32, token: &str) -> Result<Page<T>> {
    if page_size < 0 {
        return Err(Error::invalid("page_size must not be negative"));
    }
    let size = if page_size == 0 { DEFAULT_PAGE_SIZE } else { (page_size as usize).min(MAX_PAGE_SIZE) };
    let mut items = Vec::new();
    let mut last = String::new();
    let mut more = false;
    for (key, item) in all.filter(|(k, _)| token.is_empty() || k.as_str() > token) {
        if items.len() == size {
            more = true;
            break;
        }
        last = key;
        items.push(item);
    }
    Ok(Page { items, next_page_token: if more { last } else { String::new() } })
}

impl Broker {
    /// Recovers state from `store` and returns a broker ready to serve.
    pub fn open(store: Arc<dyn Store>) -> Result<Arc<Self>> {
        let catalog = store.load_catalog()?;
        let mut state = State {
            catalog,
            next_seq: 1,
            topic_subs: HashMap::new(),
            subs: HashMap::new(),
            inflight: BTreeMap::new(),
        };
        state.sync_runtime();
        let started = Instant::now();
        let mut records = 0u64;
        let next_seq = store.replay(&mut |rec| {
            records += 1;
            match rec {
                Record::Publish { topic_uid, messages } => {
                    let msgs: Vec<Arc<Message>> = messages.into_iter().map(Arc::new).collect();
                    state.distribute(topic_uid, &msgs);
                }
                Record::Ack { sub_uid, seqs } => {
                    if let Some(st) = state.subs.get_mut(&sub_uid) {
                        for s in seqs {
                            st.remove(s);
                        }
                    }
                }
            }
        })?;
        state.next_seq = next_seq;
        let backlog: usize = state.subs.values().map(|s| s.backlog.len()).sum();
        tracing::info!(records, backlog, next_seq, elapsed_ms = started.elapsed().as_millis() as u64, "recovered broker state");
        Ok(Arc::new(Broker {
            state: Mutex::new(state),
            store,
            admin: tokio::sync::Mutex::new(()),
            next_stream_id: AtomicU64::new(1),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs lease expiry and space reclaim until the broker is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                let Some(broker) = weak.upgrade() else { break };
                broker.expire_leases(Instant::now());
                n += 1;
                if n % 50 == 0 {
                    let b = broker.clone();
                    let _ = tokio::task::spawn_blocking(move || b.reclaim()).await;
                }
            }
        })
    }

    /// Returns expired leases to their subscriptions' ready queues.
    pub fn expire_leases(&self, now: Instant) {
        let mut st = self.lock();
        for sub in st.subs.values_mut() {
            if sub.expire(now) > 0 {
                sub.notify.notify_waiters();
            }
        }
    }

    /// Deletes log data no subscription needs any more. Returns bytes freed.
    pub fn reclaim(&self) -> u64 {
        let lowest = {
            let st = self.lock();
            let backlog_min = st.subs.values().filter_map(|s| s.oldest_seq()).min();
            let inflight_min = st.inflight.keys().next().copied();
            [Some(st.next_seq), backlog_min, inflight_min].into_iter().flatten().min().unwrap()
        };
        match self.store.reclaim(lowest) {
            Ok(freed) => {
                if freed > 0 {
                    tracing::info!(freed, "reclaimed log space");
                }
                freed
            }
            Err(e) => {
                tracing::warn!(error = %e, "reclaiming log space failed");
                0
            }
        }
    }

    pub fn log_bytes(&self) -> u64 {
        self.store.log_bytes()
    }

    /// Applies `change` to a copy of the catalog, saves it, then installs it.
    async fn change_catalog<R>(&self, change: impl FnOnce(&mut Catalog, u64) -> Result<R>) -> Result<R> {
        let _guard = self.admin.lock().await;
        let (catalog, result) = {
            let st = self.lock();
            let mut c = st.catalog.clone();
            let r = change(&mut c, st.next_seq)?;
            (c, r)
        };
        self.store.save_catalog(&catalog).await?;
        let mut st = self.lock();
        st.catalog = catalog;
        st.sync_runtime();
        Ok(result)
    }

    // ---- topics ----

    pub async fn create_topic(&self, config: TopicConfig) -> Result<TopicConfig> {
        TopicName::parse(&config.name)?;
        validate_labels(&config.labels)?;
        self.change_catalog(|c, _| {
            if c.topics.contains_key(&config.name) {
                return Err(Error::already_exists(format!("topic {} already exists", config.name)));
            }
            let uid = c.allocate_uid();
            c.topics.insert(config.name.clone(), TopicEntry { uid, config: config.clone() });
            Ok(config)
        })
        .await
    }

    pub fn get_topic(&self, name: &TopicName) -> Result<TopicConfig> {
        Ok(self.lock().topic(name)?.config.clone())
    }

    pub async fn update_topic(&self, name: &TopicName, update: TopicUpdate) -> Result<TopicConfig> {
        if let Some(l) = &update.labels {
            validate_labels(l)?;
        }
        let key = name.to_string();
        self.change_catalog(|c, _| {
            let t = c.topics.get_mut(&key).ok_or_else(|| Error::not_found(format!("topic {key} not found")))?;
            if let Some(l) = update.labels {
                t.config.labels = l;
            }
            Ok(t.config.clone())
        })
        .await
    }

    pub fn list_topics(&self, project: &ProjectName, page_size: i32, token: &str) -> Result<Page<TopicConfig>> {
        let st = self.lock();
        let prefix = format!("{project}/topics/");
        page(
            st.catalog.topics.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(k, t)| (k.clone(), t.config.clone())),
            page_size,
            token,
        )
    }

    pub async fn delete_topic(&self, name: &TopicName) -> Result<()> {
        let key = name.to_string();
        self.change_catalog(|c, _| {
            let t = c.topics.remove(&key).ok_or_else(|| Error::not_found(format!("topic {key} not found")))?;
            // As in Google Pub/Sub, subscriptions outlive their topic and keep
            // their backlog; they just stop receiving.
            for s in c.subscriptions.values_mut().filter(|s| s.topic_uid == Some(t.uid)) {
                s.topic_uid = None;
                s.config.topic = DELETED_TOPIC.to_string();
            }
            Ok(())
        })
        .await
    }

    pub fn list_topic_subscriptions(&self, topic: &TopicName, page_size: i32, token: &str) -> Result<Page<String>> {
        let st = self.lock();
        let uid = st.topic(topic)?.uid;
        page(
            st.catalog.subscriptions.iter().filter(|(_, s)| s.topic_uid == Some(uid)).map(|(k, _)| (k.clone(), k.clone())),
            page_size,
            token,
        )
    }

    /// Durably appends the messages and returns their ids.
    pub async fn publish(&self, topic: &TopicName, messages: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        validate_publish(&messages)?;
        let publish_time_nanos = now_nanos();
        let (topic_uid, msgs, durable) = {
            let mut st = self.lock();
            let topic_uid = st.topic(topic)?.uid;
            let first = st.next_seq;
            st.next_seq += messages.len() as u64;
            let msgs: Vec<Message> = messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| Message {
                    seq: first + i as u64,
                    data: m.data,
                    attributes: m.attributes,
                    ordering_key: m.ordering_key,
                    publish_time_nanos,
                })
                .collect();
            *st.inflight.entry(first).or_default() += 1;
            // Enqueue under the lock: log order is seq order.
            let durable = self.store.append(vec![Record::Publish { topic_uid, messages: msgs.clone() }]);
            (topic_uid, msgs, durable)
        };
        let first = msgs[0].seq;
        let result = durable.await;
        let mut st = self.lock();
        if let Some(n) = st.inflight.get_mut(&first) {
            *n -= 1;
            if *n == 0 {
                st.inflight.remove(&first);
            }
        }
        result?;
        let ids = msgs.iter().map(Message::id).collect();
        let arcs: Vec<Arc<Message>> = msgs.into_iter().map(Arc::new).collect();
        st.distribute(topic_uid, &arcs);
        Ok(ids)
    }

    // ---- subscriptions ----

    pub async fn create_subscription(&self, mut config: SubscriptionConfig) -> Result<SubscriptionConfig> {
        SubscriptionName::parse(&config.name)?;
        let topic = TopicName::parse(&config.topic)?;
        validate_labels(&config.labels)?;
        config.ack_deadline_seconds = normalize_ack_deadline(config.ack_deadline_seconds)?;
        self.change_catalog(|c, next_seq| {
            if c.subscriptions.contains_key(&config.name) {
                return Err(Error::already_exists(format!("subscription {} already exists", config.name)));
            }
            let topic_uid = c.topics.get(&config.topic).ok_or_else(|| Error::not_found(format!("topic {topic} not found")))?.uid;
            let uid = c.allocate_uid();
            c.subscriptions.insert(
                config.name.clone(),
                SubscriptionEntry { uid, topic_uid: Some(topic_uid), start_seq: next_seq, config: config.clone() },
            );
            Ok(config)
        })
        .await
    }

    pub fn get_subscription(&self, name: &SubscriptionName) -> Result<SubscriptionConfig> {
        Ok(self.lock().sub_entry(name)?.config.clone())
    }

    pub async fn update_subscription(&self, name: &SubscriptionName, update: SubscriptionUpdate) -> Result<SubscriptionConfig> {
        if let Some(l) = &update.labels {
            validate_labels(l)?;
        }
        let deadline = update.ack_deadline_seconds.map(normalize_ack_deadline).transpose()?;
        let key = name.to_string();
        self.change_catalog(|c, _| {
            let s = c.subscriptions.get_mut(&key).ok_or_else(|| Error::not_found(format!("subscription {key} not found")))?;
            if let Some(d) = deadline {
                s.config.ack_deadline_seconds = d;
            }
            if let Some(l) = update.labels {
                s.config.labels = l;
            }
            Ok(s.config.clone())
        })
        .await
    }

    pub fn list_subscriptions(&self, project: &ProjectName, page_size: i32, token: &str) -> Result<Page<SubscriptionConfig>> {
        let st = self.lock();
        let prefix = format!("{project}/subscriptions/");
        page(
            st.catalog
                .subscriptions
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, s)| (k.clone(), s.config.clone())),
            page_size,
            token,
        )
    }

    pub async fn delete_subscription(&self, name: &SubscriptionName) -> Result<()> {
        let key = name.to_string();
        self.change_catalog(|c, _| {
            c.subscriptions.remove(&key).ok_or_else(|| Error::not_found(format!("subscription {key} not found")))?;
            Ok(())
        })
        .await
    }

    /// Number of messages the subscription still owes (ready + leased).
    pub fn backlog(&self, name: &SubscriptionName) -> Result<usize> {
        let mut st = self.lock();
        Ok(st.sub_mut(name)?.backlog.len())
    }

    /// Leases up to `max` messages. With `wait`, blocks up to that long for
    /// the first message to arrive.
    pub async fn pull(&self, name: &SubscriptionName, max: i32, wait: Option<Duration>) -> Result<Vec<Delivered>> {
        if max <= 0 {
            return Err(Error::invalid("max_messages must be greater than 0"));
        }
        let max = (max as usize).min(pubrun_core::limits::MAX_PULL_MESSAGES);
        let until = wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            let notify = {
                let mut st = self.lock();
                let sub = st.sub_mut(name)?;
                let got = sub.take(max, Instant::now(), sub.ack_deadline, None);
                if !got.is_empty() || until.is_none() {
                    let uid = sub.uid;
                    return Ok(got
                        .into_iter()
                        .map(|h| Delivered { ack_id: ack_id(uid, h.seq, h.attempt), message: h.msg, delivery_attempt: h.attempt })
                        .collect());
                }
                sub.notify.clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering so a publish in between is not missed.
            {
                let mut st = self.lock();
                let sub = st.sub_mut(name)?;
                if !sub.ready.is_empty() {
                    continue;
                }
            }
            if tokio::time::timeout_at(until.unwrap(), notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// Acknowledges messages; returns once the acks are durable. Unknown or
    /// already-acked ids are ignored, as in at-least-once Pub/Sub.
    pub async fn acknowledge(&self, name: &SubscriptionName, ack_ids: &[String]) -> Result<()> {
        if ack_ids.is_empty() {
            return Err(Error::invalid("ack_ids must not be empty"));
        }
        let parsed: Vec<(u64, u64)> = ack_ids.iter().map(|a| parse_ack_id(a)).collect::<Result<_>>()?;
        let (uid, removed, durable) = {
            let mut st = self.lock();
            let sub = st.sub_mut(name)?;
            let uid = sub.uid;
            let mut removed = Vec::new();
            for (s_uid, seq) in parsed {
                if s_uid == uid {
                    if let Some(p) = sub.remove(seq) {
                        removed.push((seq, p));
                    }
                }
            }
            if removed.is_empty() {
                return Ok(());
            }
            sub.notify.notify_waiters(); // stream quotas may have room now
            let seqs = removed.iter().map(|(s, _)| *s).collect();
            let durable = self.store.append(vec![Record::Ack { sub_uid: uid, seqs }]);
            (uid, removed, durable)
        };
        if let Err(e) = durable.await {
            let mut st = self.lock();
            if let Some(sub) = st.subs.get_mut(&uid) {
                for (seq, p) in removed {
                    sub.restore(seq, p);
                }
                sub.notify.notify_waiters();
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Extends or shortens leases; 0 seconds nacks (redeliver now).
    pub fn modify_ack_deadline(&self, name: &SubscriptionName, ack_ids: &[String], seconds: i32) -> Result<()> {
        if !(0..=MAX_ACK_DEADLINE_SECS).contains(&seconds) {
            return Err(Error::invalid(format!(
                "ack_deadline_seconds is {seconds}; it must be between 0 and {MAX_ACK_DEADLINE_SECS}"
            )));
        }
        if ack_ids.is_empty() {
            return Err(Error::invalid("ack_ids must not be empty"));
        }
        let parsed: Vec<(u64, u64)> = ack_ids.iter().map(|a| parse_ack_id(a)).collect::<Result<_>>()?;
        let mut st = self.lock();
        let sub = st.sub_mut(name)?;
        let uid = sub.uid;
        let deadline = (seconds > 0).then(|| Instant::now() + Duration::from_secs(seconds as u64));
        let mut nacked = false;
        for (s_uid, seq) in parsed {
            if s_uid == uid && sub.modify(seq, deadline) && deadline.is_none() {
                nacked = true;
            }
        }
        if nacked {
            sub.notify.notify_waiters();
        }
        Ok(())
    }

    /// Opens a streaming-pull session with its own flow-control quota.
    pub fn open_stream(
        self: &Arc<Self>,
        name: &SubscriptionName,
        ack_deadline_secs: i32,
        max_messages: i64,
        max_bytes: i64,
    ) -> Result<StreamHandle> {
        let deadline = normalize_ack_deadline(ack_deadline_secs)?;
        let id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let sub = st.sub_mut(name)?;
        sub.streams.insert(
            id,
            StreamQuota { max_messages: max_messages.max(0) as u64, max_bytes: max_bytes.max(0) as u64, ..Default::default() },
        );
        Ok(StreamHandle {
            broker: self.clone(),
            sub: name.clone(),
            sub_uid: sub.uid,
            id,
            deadline: Duration::from_secs(deadline as u64),
            notify: sub.notify.clone(),
        })
    }
}

/// A streaming-pull session. Dropping it forgets its quota; its leased
/// messages stay leased until acked or expired.
pub struct StreamHandle {
    broker: Arc<Broker>,
    sub: SubscriptionName,
    sub_uid: u64,
    id: u64,
    deadline: Duration,
    notify: Arc<tokio::sync::Notify>,
}

impl StreamHandle {
    pub fn subscription(&self) -> &SubscriptionName {
        &self.sub
    }

    pub fn set_ack_deadline(&mut self, secs: i32) -> Result<()> {
        self.deadline = Duration::from_secs(normalize_ack_deadline(secs)? as u64);
        Ok(())
    }

    /// Waits until messages are ready and the quota has room, then leases up
    /// to `max` of them. Fails with NOT_FOUND if the subscription is deleted.
    pub async fn next(&self, max: usize) -> Result<Vec<Delivered>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.broker.lock();
                let sub = match st.subs.get_mut(&self.sub_uid) {
                    Some(s) => s,
                    None => return Err(Error::not_found(format!("subscription {} not found", self.sub))),
                };
                let got = sub.take(max, Instant::now(), self.deadline, Some(self.id));
                if !got.is_empty() {
                    let uid = self.sub_uid;
                    return Ok(got
                        .into_iter()
                        .map(|h| Delivered { ack_id: ack_id(uid, h.seq, h.attempt), message: h.msg, delivery_attempt: h.attempt })
                        .collect());
                }
            }
            notified.await;
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let mut st = self.broker.lock();
        if let Some(sub) = st.subs.get_mut(&self.sub_uid) {
            sub.streams.remove(&self.id);
            // Leases taken on this stream no longer count against any quota.
            for p in sub.backlog.values_mut() {
                if let Some(l) = p.lease.as_mut().filter(|l| l.stream == Some(self.id)) {
                    l.stream = None;
                }
            }
        }
    }
}
