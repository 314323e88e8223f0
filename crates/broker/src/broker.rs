//! The broker: catalog operations, publish, pull, ack, streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pubrun_core::config::{
    normalize_ack_deadline, validate_labels, DeadLetterPolicy, Labels, PushConfig, RetryPolicy,
};
use pubrun_core::filter::{self, Filter};
use pubrun_core::limits::{DEFAULT_PAGE_SIZE, MAX_ACK_DEADLINE_SECS, MAX_PAGE_SIZE};
use pubrun_core::message::validate_publish;
use pubrun_core::names::DELETED_TOPIC;
use pubrun_core::{
    Error, Message, OutgoingMessage, ProjectName, Result, SubscriptionConfig, SubscriptionName,
    TopicConfig, TopicName,
};
use pubrun_observability::metrics::labels;
use pubrun_observability::traces;
use pubrun_store::{AppendFuture, Catalog, Record, Store, SubscriptionEntry, TopicEntry};

use crate::msg::Msg;
use crate::subscription::{Handout, Pending, Policy, StreamQuota, SubState};

mod overview;
mod retention;
pub use overview::{SubscriptionSummary, TopicSummary};
use pubrun_core::clock::{Clock, SystemClock};
pub use retention::SnapshotInfo;

/// How long a dead letter waits before forwarding is tried again after it
/// failed (the dead-letter topic was deleted, the disk is full, ...).
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(10);

/// A message handed to a subscriber, with the ack id that settles it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub ack_id: String,
    pub message: Arc<Message>,
    /// Google's `delivery_attempt`: 1 on first delivery, counting nacks and
    /// expired leases, and 0 (unset) unless the subscription has a
    /// dead-letter policy, as Google reports it.
    pub delivery_attempt: u32,
    /// The delivery count whatever the policy (1 on first delivery).
    pub attempt: u32,
}

/// Outcome of an Acknowledge or ModifyAckDeadline. Without exactly-once
/// delivery every well-formed ack id is accepted (acks of expired leases
/// still count; unknown ones are ignored, as Google does). With it, ack ids
/// whose lease expired or that were superseded by a redelivery fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckResult {
    pub exactly_once: bool,
    /// Ack ids that were applied (with exactly-once: confirmed).
    pub succeeded: Vec<String>,
    /// With exactly-once only: ack ids rejected as
    /// `PERMANENT_FAILURE_INVALID_ACK_ID` (expired, superseded, already
    /// acked, malformed or of another subscription).
    pub invalid: Vec<String>,
}

/// A subscription's delivery settings that streaming pull reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryProperties {
    pub exactly_once_delivery: bool,
    pub message_ordering: bool,
}

/// What a List call asks for, as Google's `List*Request`s put it: the
/// resources of `parent` (a project, or a topic's attached ones), at most
/// `page_size` of them (0: the default), after `page_token` (empty: from the
/// start).
#[derive(Debug)]
pub struct ListRequest<'a, P> {
    pub parent: &'a P,
    pub page_size: i32,
    pub page_token: &'a str,
}

impl<'a, P> ListRequest<'a, P> {
    pub fn new(parent: &'a P, page_size: i32, page_token: &'a str) -> Self {
        ListRequest {
            parent,
            page_size,
            page_token,
        }
    }
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

/// Delivery settings an UpdateSubscription may change; `None` leaves a field
/// alone. (`filter` and `enable_message_ordering` are fixed at creation.)
#[derive(Debug, Default, Clone)]
pub struct DeliveryUpdate {
    /// `Some(None)` removes the policy.
    pub retry_policy: Option<Option<RetryPolicy>>,
    /// `Some(None)` removes the policy.
    pub dead_letter_policy: Option<Option<DeadLetterPolicy>>,
    pub enable_exactly_once_delivery: Option<bool>,
    /// `Some(None)` goes back to the default (7 days).
    pub message_retention_duration: Option<Option<Duration>>,
    pub retain_acked_messages: Option<bool>,
    /// `Some(None)` switches to pull delivery.
    pub push_config: Option<Option<PushConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// `projects/P/subscriptions/S`
    pub name: String,
    /// Unacked messages (ready + leased).
    pub backlog: usize,
    pub oldest_unacked_publish_nanos: Option<i64>,
}

pub struct Broker {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    /// Serialises catalog changes so that each save writes a complete,
    /// ordered catalog.
    admin: tokio::sync::Mutex<()>,
    next_stream_id: AtomicU64,
    /// Wall clock for publish times and retention (injectable for tests).
    clock: Arc<dyn Clock>,
    /// Bumped after every catalog change, so push workers follow it.
    catalog_version: tokio::sync::watch::Sender<u64>,
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
    /// Retained messages, seek marks (`retention.rs`).
    ret: retention::Retention,
}

impl State {
    fn topic(&self, name: &TopicName) -> Result<&TopicEntry> {
        self.catalog
            .topics
            .get(&name.to_string())
            .ok_or_else(|| Error::not_found(format!("topic {name} not found")))
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
            let st = self
                .subs
                .entry(s.uid)
                .or_insert_with(|| SubState::new(s.uid, s.config.ack_deadline_seconds));
            st.ack_deadline = Duration::from_secs(s.config.ack_deadline_seconds as u64);
            st.start_seq = s.start_seq;
            let filter = if st.policy.filter.is_all() && !s.config.filter.is_empty() {
                // Validated at creation and immutable: parsed once.
                filter::parse(&s.config.filter).unwrap_or_else(|e| {
                    tracing::error!(subscription = %s.config.name, error = %e, "stored filter does not parse; delivering every message");
                    Filter::all()
                })
            } else {
                st.policy.filter.clone()
            };
            st.policy = Policy {
                ordered: s.config.enable_message_ordering,
                // Push without a retry policy backs off as Google's push does.
                retry: s.config.retry_policy.or_else(|| {
                    s.config
                        .push_config
                        .as_ref()
                        .map(|_| crate::push::PUSH_BACKOFF)
                }),
                max_attempts: s
                    .config
                    .dead_letter_policy
                    .as_ref()
                    .map(|d| d.max_delivery_attempts.max(1) as u32),
                exactly_once: s.config.enable_exactly_once_delivery,
                filter,
            };
        }
        let live: std::collections::HashSet<u64> =
            cat.subscriptions.values().map(|s| s.uid).collect();
        self.subs.retain(|uid, st| {
            let keep = live.contains(uid);
            if !keep {
                // Wake streams and pulls so they notice the subscription is gone.
                st.notify.notify_waiters();
            }
            keep
        });
        self.ret.sync(&self.catalog);
    }

    /// Adds messages to every subscription of the topic that was created
    /// before them and whose filter they match. Publish and log replay both
    /// come here, so a filter is applied identically to both.
    fn distribute(&mut self, topic_uid: u64, messages: &[Msg]) {
        self.ret.keep(topic_uid, messages);
        let Some(subs) = self.topic_subs.get(&topic_uid) else {
            return;
        };
        let now = Instant::now();
        for uid in subs {
            let st = self
                .subs
                .get_mut(uid)
                .expect("runtime has every catalog sub");
            let start = st.start_seq;
            let mut added = false;
            let ret = &self.ret;
            for m in messages
                .iter()
                .filter(|m| m.seq() >= start && ret.admits(*uid, m))
            {
                added |= st.add(m.clone(), now);
            }
            if added {
                st.notify.notify_waiters();
            }
        }
    }
}

/// An ack id names the subscription, the message and the delivery attempt,
/// so that exactly-once delivery can tell a superseded delivery's ack id.
fn ack_id(sub_uid: u64, seq: u64, attempt: u32) -> String {
    format!("{sub_uid}-{seq}-{attempt}")
}

/// Returns (sub uid, seq, attempt) of a well-formed ack id.
fn parse_ack_id(id: &str) -> Result<(u64, u64, u32)> {
    let mut parts = id.split('-');
    let parsed = (|| {
        let sub = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse::<u32>().ok()?;
        parts.next().is_none().then_some((sub, seq, attempt))
    })();
    parsed.ok_or_else(|| {
        Error::invalid(format!(
            "invalid ack id \"{id}\": pass ack ids exactly as received"
        ))
    })
}

/// (sub uid, seq) of every ack id. Outside exactly-once one malformed id
/// refuses the whole request, before any is applied.
fn parse_all_ack_ids(ids: &[String]) -> Result<Vec<(u64, u64)>> {
    ids.iter()
        .map(|id| parse_ack_id(id).map(|(sub, seq, _)| (sub, seq)))
        .collect()
}

fn delivered(uid: u64, policy: &Policy, h: Handout) -> Delivered {
    Delivered {
        ack_id: ack_id(uid, h.seq, h.attempt),
        message: h.msg.to_message(),
        delivery_attempt: if policy.max_attempts.is_some() {
            h.attempt
        } else {
            0
        },
        attempt: h.attempt,
    }
}

/// Re-checks a retry policy's bounds (the API layer applies the defaults).
fn check_retry_policy(p: Option<RetryPolicy>) -> Result<Option<RetryPolicy>> {
    p.map(|p| RetryPolicy::new(Some(p.minimum_backoff), Some(p.maximum_backoff)))
        .transpose()
}

/// Checks a dead-letter policy's topic name and attempts (5..=100; 0 means 5).
fn check_dead_letter_policy(p: Option<DeadLetterPolicy>) -> Result<Option<DeadLetterPolicy>> {
    let Some(p) = p else { return Ok(None) };
    let checked = DeadLetterPolicy::new(&p.dead_letter_topic, p.max_delivery_attempts)?;
    if let Some(d) = &checked {
        TopicName::parse(&d.dead_letter_topic).map_err(|e| {
            Error::invalid(format!(
                "dead_letter_policy.dead_letter_topic: {}",
                e.message
            ))
        })?;
    }
    Ok(checked)
}

/// "The operation will fail if the topic does not exist."
fn dead_letter_topic_exists(c: &Catalog, p: &Option<DeadLetterPolicy>) -> Result<()> {
    match p {
        Some(d) if !c.topics.contains_key(&d.dead_letter_topic) => Err(Error::not_found(format!(
            "dead_letter_policy.dead_letter_topic: topic {} not found; create it first",
            d.dead_letter_topic
        ))),
        _ => Ok(()),
    }
}

/// One page of the entries of `map` (a catalog collection such as
/// `topics`) that belong to the request's project, skipping those `item`
/// drops.
fn page_under<V, T: Clone>(
    map: &BTreeMap<String, V>,
    collection: &str,
    req: ListRequest<ProjectName>,
    mut item: impl FnMut(&str, &V) -> Option<T>,
) -> Result<Page<T>> {
    let prefix = format!("{}/{collection}/", req.parent);
    // Names under one prefix are contiguous in the sorted map.
    let under = map
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(k, v)| Some((k.clone(), item(k, v)?)));
    page(under, req)
}

/// One page of the names in `map` whose entry `keep` accepts (the
/// resources attached to one topic).
fn page_of_names<V, P>(
    map: &BTreeMap<String, V>,
    req: ListRequest<P>,
    keep: impl Fn(&V) -> bool,
) -> Result<Page<String>> {
    let names = map
        .iter()
        .filter(|(_, v)| keep(v))
        .map(|(k, _)| (k.clone(), k.clone()));
    page(names, req)
}

fn page<T: Clone, P>(
    all: impl Iterator<Item = (String, T)>,
    req: ListRequest<P>,
) -> Result<Page<T>> {
    let (page_size, token) = (req.page_size, req.page_token);
    if page_size < 0 {
        return Err(Error::invalid("page_size must not be negative"));
    }
    let size = if page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        (page_size as usize).min(MAX_PAGE_SIZE)
    };
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
    Ok(Page {
        items,
        next_page_token: if more { last } else { String::new() },
    })
}

impl Broker {
    /// Recovers state from `store` and returns a broker ready to serve.
    pub fn open(store: Arc<dyn Store>) -> Result<Arc<Self>> {
        Self::open_with_clock(store, Arc::new(SystemClock))
    }

    /// `open` with another wall clock (tests move it days ahead).
    pub fn open_with_clock(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Arc<Self>> {
        let catalog = store.load_catalog()?;
        let mut state = State {
            catalog,
            next_seq: 1,
            topic_subs: HashMap::new(),
            subs: HashMap::new(),
            inflight: BTreeMap::new(),
            ret: retention::Retention::new(clock.clone()),
        };
        state.sync_runtime();
        let started = Instant::now();
        let mut records = 0u64;
        let next_seq = store.replay(&mut |rec| {
            records += 1;
            match rec {
                Record::Publish {
                    topic_uid,
                    messages,
                } => {
                    // Packed (copied): replayed payloads slice a whole log
                    // segment, which an unacked message must not pin.
                    let msgs: Vec<Msg> = messages.iter().map(Msg::new).collect();
                    state.distribute(topic_uid, &msgs);
                }
                Record::Ack { sub_uid, seqs } => {
                    if let Some(st) = state.subs.get_mut(&sub_uid) {
                        let now = Instant::now();
                        for s in seqs {
                            st.remove(s, now);
                        }
                    }
                }
                Record::Seek { sub_uid, target } => {
                    retention::apply_seek(&mut state, sub_uid, target, Instant::now());
                }
            }
        })?;
        state.next_seq = next_seq;
        retention::expire(&mut state, Instant::now());
        let backlog: usize = state.subs.values().map(|s| s.backlog.len()).sum();
        tracing::info!(
            records,
            backlog,
            next_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered broker state"
        );
        Ok(Arc::new(Broker {
            state: Mutex::new(state),
            store,
            admin: tokio::sync::Mutex::new(()),
            next_stream_id: AtomicU64::new(1),
            clock,
            catalog_version: tokio::sync::watch::channel(0).0,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs lease expiry, retry backoffs, dead-letter forwarding and space
    /// reclaim until the broker is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let forwarding = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                let Some(broker) = weak.upgrade() else { break };
                broker.expire_leases(Instant::now());
                // Forwarding awaits durable writes: its own task, one at a time,
                // so a slow disk never holds up lease expiry.
                if broker.has_dead_letters() && !forwarding.swap(true, Ordering::AcqRel) {
                    let (b, flag) = (broker.clone(), forwarding.clone());
                    tokio::spawn(async move {
                        b.forward_dead_letters().await;
                        flag.store(false, Ordering::Release);
                    });
                }
                n += 1;
                if n.is_multiple_of(10) {
                    if let Err(e) = broker.run_retention().await {
                        tracing::warn!(error = %e, "expiring snapshots failed");
                    }
                }
                if n.is_multiple_of(50) {
                    let b = broker.clone();
                    let _ = tokio::task::spawn_blocking(move || b.reclaim()).await;
                }
            }
        })
    }

    /// Returns expired leases to their subscriptions (after the retry
    /// policy's backoff, or to the dead-letter queue) and makes messages
    /// whose backoff has passed ready.
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
            [
                Some(st.next_seq),
                backlog_min,
                inflight_min,
                st.ret.lowest_kept(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap()
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
    async fn change_catalog<R>(
        &self,
        change: impl FnOnce(&mut Catalog, u64) -> Result<R>,
    ) -> Result<R> {
        let _guard = self.admin.lock().await;
        let (catalog, result) = {
            let st = self.lock();
            let mut c = st.catalog.clone();
            let r = change(&mut c, st.next_seq)?;
            (c, r)
        };
        self.store.save_catalog(&catalog).await?;
        {
            let mut st = self.lock();
            st.catalog = catalog;
            st.sync_runtime();
        }
        self.catalog_version.send_modify(|v| *v += 1);
        Ok(result)
    }

    /// Changes whenever the catalog does (push workers watch it).
    pub(crate) fn catalog_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.catalog_version.subscribe()
    }

    /// Every push subscription: (uid, config).
    pub(crate) fn push_subscriptions(&self) -> Vec<(u64, SubscriptionConfig)> {
        self.lock()
            .catalog
            .subscriptions
            .values()
            .filter(|s| s.config.push_config.is_some())
            .map(|s| (s.uid, s.config.clone()))
            .collect()
    }

    // ---- topics ----

    pub async fn create_topic(&self, config: TopicConfig) -> Result<TopicConfig> {
        self.create_topic_with_retention(config, None).await
    }

    pub fn get_topic(&self, name: &TopicName) -> Result<TopicConfig> {
        Ok(self.lock().topic(name)?.config.clone())
    }

    pub async fn update_topic(&self, name: &TopicName, update: TopicUpdate) -> Result<TopicConfig> {
        self.update_topic_with(name, update, None).await
    }

    pub fn list_topics(&self, req: ListRequest<ProjectName>) -> Result<Page<TopicConfig>> {
        let st = self.lock();
        page_under(&st.catalog.topics, "topics", req, |_, t| {
            Some(t.config.clone())
        })
    }

    pub async fn delete_topic(&self, name: &TopicName) -> Result<()> {
        let key = name.to_string();
        self.change_catalog(|c, _| {
            let t = c
                .topics
                .remove(&key)
                .ok_or_else(|| Error::not_found(format!("topic {key} not found")))?;
            // As in Google Pub/Sub, subscriptions outlive their topic and keep
            // their backlog; they just stop receiving.
            for s in c
                .subscriptions
                .values_mut()
                .filter(|s| s.topic_uid == Some(t.uid))
            {
                s.topic_uid = None;
                s.config.topic = DELETED_TOPIC.to_string();
            }
            retention::detach_snapshots(c, t.uid);
            Ok(())
        })
        .await
    }

    pub fn list_topic_subscriptions(&self, req: ListRequest<TopicName>) -> Result<Page<String>> {
        let st = self.lock();
        let uid = st.topic(req.parent)?.uid;
        page_of_names(&st.catalog.subscriptions, req, |s| s.topic_uid == Some(uid))
    }

    /// Durably appends the messages and returns their ids.
    pub async fn publish(
        &self,
        topic: &TopicName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<String>> {
        validate_publish(&messages)?;
        let topic = topic.to_string();
        if !traces::enabled() {
            return self.append(&topic, messages).await;
        }
        // One span per message, each a child of the context it carries.
        let mut spans: Vec<traces::Span> = messages
            .iter()
            .map(|m| {
                let parent = traces::from_attributes(&m.attributes);
                traces::start(|| traces::SpanStart {
                    kind: traces::SpanKind::Producer,
                    attributes: vec![
                        traces::KeyValue::new("messaging.system", "gcp_pubsub"),
                        traces::KeyValue::new("messaging.operation", "publish"),
                        traces::KeyValue::new("messaging.destination.name", topic.clone()),
                    ],
                    ..traces::SpanStart::new("publish", parent.as_ref())
                })
            })
            .collect();
        let res = self.append(&topic, messages).await;
        match &res {
            Ok(ids) => {
                for (span, id) in spans.iter_mut().zip(ids) {
                    span.set("messaging.message.id", id.clone());
                }
            }
            Err(e) => spans.iter_mut().for_each(|s| s.error(e.to_string())),
        }
        res
    }

    /// Publishes without the client-facing limits: dead letters carry four
    /// more attributes than their publisher may have been allowed.
    async fn append(&self, topic: &str, messages: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        let publish_time_nanos = self.clock.now_nanos();
        let (topic_uid, msgs, durable) = {
            let mut st = self.lock();
            let topic_uid = st
                .catalog
                .topics
                .get(topic)
                .ok_or_else(|| Error::not_found(format!("topic {topic} not found")))?
                .uid;
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
            let durable = self.store.append(vec![Record::Publish {
                topic_uid,
                messages: msgs.clone(),
            }]);
            (topic_uid, msgs, durable)
        };
        // What the broker keeps in memory: each message packed into one
        // exactly-sized allocation. The payload is copied so that it does not
        // pin the request buffer it was decoded from (a zero-copy slice of a
        // gRPC request keeps its whole decode buffer, >= 8 KiB, alive); the
        // store's copy of `msgs` is dropped once written.
        let packed: Vec<Msg> = msgs.iter().map(Msg::new).collect();
        drop(msgs);
        let first = packed[0].seq();
        let result = durable.await;
        let mut st = self.lock();
        if let Some(n) = st.inflight.get_mut(&first) {
            *n -= 1;
            if *n == 0 {
                st.inflight.remove(&first);
            }
        }
        result?;
        let ids = packed.iter().map(|m| m.seq().to_string()).collect();
        st.distribute(topic_uid, &packed);
        drop(st);
        pubrun_observability::metrics()
            .published
            .get_or_create(&labels([("topic", topic)]))
            .inc_by(packed.len() as u64);
        Ok(ids)
    }

    // ---- subscriptions ----

    pub async fn create_subscription(
        &self,
        mut config: SubscriptionConfig,
    ) -> Result<SubscriptionConfig> {
        SubscriptionName::parse(&config.name)?;
        let topic = TopicName::parse(&config.topic)?;
        validate_labels(&config.labels)?;
        config.ack_deadline_seconds = normalize_ack_deadline(config.ack_deadline_seconds)?;
        filter::parse(&config.filter)?;
        config.retry_policy = check_retry_policy(config.retry_policy)?;
        config.dead_letter_policy = check_dead_letter_policy(config.dead_letter_policy)?;
        retention::check_subscription(&config)?;
        config.push_config = config
            .push_config
            .map(PushConfig::check)
            .transpose()?
            .flatten();
        self.change_catalog(|c, next_seq| {
            if c.subscriptions.contains_key(&config.name) {
                return Err(Error::already_exists(format!(
                    "subscription {} already exists",
                    config.name
                )));
            }
            let topic_uid = c
                .topics
                .get(&config.topic)
                .ok_or_else(|| Error::not_found(format!("topic {topic} not found")))?
                .uid;
            dead_letter_topic_exists(c, &config.dead_letter_policy)?;
            let uid = c.allocate_uid();
            c.subscriptions.insert(
                config.name.clone(),
                SubscriptionEntry {
                    uid,
                    topic_uid: Some(topic_uid),
                    start_seq: next_seq,
                    config: config.clone(),
                },
            );
            Ok(config)
        })
        .await
    }

    pub fn get_subscription(&self, name: &SubscriptionName) -> Result<SubscriptionConfig> {
        Ok(self.lock().sub_entry(name)?.config.clone())
    }

    pub async fn update_subscription(
        &self,
        name: &SubscriptionName,
        update: SubscriptionUpdate,
    ) -> Result<SubscriptionConfig> {
        self.update_subscription_with(name, update, DeliveryUpdate::default())
            .await
    }

    /// `update_subscription` that may also change delivery settings.
    pub async fn update_subscription_with(
        &self,
        name: &SubscriptionName,
        update: SubscriptionUpdate,
        delivery: DeliveryUpdate,
    ) -> Result<SubscriptionConfig> {
        if let Some(l) = &update.labels {
            validate_labels(l)?;
        }
        let deadline = update
            .ack_deadline_seconds
            .map(normalize_ack_deadline)
            .transpose()?;
        let retry = delivery.retry_policy.map(check_retry_policy).transpose()?;
        let dead_letter = delivery
            .dead_letter_policy
            .map(check_dead_letter_policy)
            .transpose()?;
        let push = delivery
            .push_config
            .map(|p| p.map(PushConfig::check).transpose().map(Option::flatten))
            .transpose()?;
        let key = name.to_string();
        self.change_catalog(|c, _| {
            if let Some(d) = &dead_letter {
                dead_letter_topic_exists(c, d)?;
            }
            let s = c
                .subscriptions
                .get_mut(&key)
                .ok_or_else(|| Error::not_found(format!("subscription {key} not found")))?;
            if let Some(d) = deadline {
                s.config.ack_deadline_seconds = d;
            }
            if let Some(l) = update.labels {
                s.config.labels = l;
            }
            if let Some(r) = retry {
                s.config.retry_policy = r;
            }
            if let Some(d) = dead_letter {
                s.config.dead_letter_policy = d;
            }
            if let Some(e) = delivery.enable_exactly_once_delivery {
                s.config.enable_exactly_once_delivery = e;
            }
            if let Some(r) = delivery.message_retention_duration {
                s.config.message_retention_duration = r;
            }
            if let Some(r) = delivery.retain_acked_messages {
                s.config.retain_acked_messages = r;
            }
            retention::check_subscription(&s.config)?;
            if let Some(p) = push {
                s.config.push_config = p;
            }
            Ok(s.config.clone())
        })
        .await
    }

    pub fn list_subscriptions(
        &self,
        req: ListRequest<ProjectName>,
    ) -> Result<Page<SubscriptionConfig>> {
        let st = self.lock();
        page_under(&st.catalog.subscriptions, "subscriptions", req, |_, s| {
            Some(s.config.clone())
        })
    }

    pub async fn delete_subscription(&self, name: &SubscriptionName) -> Result<()> {
        let key = name.to_string();
        self.change_catalog(|c, _| {
            c.subscriptions
                .remove(&key)
                .ok_or_else(|| Error::not_found(format!("subscription {key} not found")))?;
            Ok(())
        })
        .await
    }

    /// Every subscription's backlog and the publish time of its oldest
    /// unacked message (for metrics and the dashboard), by full name.
    pub fn subscription_stats(&self) -> Vec<SubscriptionStats> {
        let st = self.lock();
        st.catalog
            .subscriptions
            .iter()
            .filter_map(|(name, e)| {
                let sub = st.subs.get(&e.uid)?;
                // Seqs follow publish order: the first is the oldest.
                let oldest = sub
                    .backlog
                    .first_key()
                    .and_then(|seq| sub.backlog.get(&seq))
                    .map(|p| p.msg.publish_time_nanos());
                Some(SubscriptionStats {
                    name: name.clone(),
                    backlog: sub.backlog.len(),
                    oldest_unacked_publish_nanos: oldest,
                })
            })
            .collect()
    }

    /// The wall clock's now, in nanoseconds since the epoch (the clock
    /// publish times come from).
    pub fn now_nanos(&self) -> i64 {
        self.clock.now_nanos()
    }

    /// Number of messages the subscription still owes (ready + leased).
    pub fn backlog(&self, name: &SubscriptionName) -> Result<usize> {
        let mut st = self.lock();
        Ok(st.sub_mut(name)?.backlog.len())
    }

    /// Leases up to `max` messages. With `wait`, blocks up to that long for
    /// the first message to arrive.
    pub async fn pull(
        &self,
        name: &SubscriptionName,
        max: i32,
        wait: Option<Duration>,
    ) -> Result<Vec<Delivered>> {
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
                    return Ok(got
                        .into_iter()
                        .map(|h| delivered(sub.uid, &sub.policy, h))
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
            if tokio::time::timeout_at(until.unwrap(), notified)
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
        }
    }

    /// `pull` without waiting, as of `now`: the clock-injected form for tests
    /// of backoffs and deadlines.
    pub fn pull_at(
        &self,
        name: &SubscriptionName,
        max: usize,
        now: Instant,
    ) -> Result<Vec<Delivered>> {
        let mut st = self.lock();
        let sub = st.sub_mut(name)?;
        let got = sub.take(max, now, sub.ack_deadline, None);
        Ok(got
            .into_iter()
            .map(|h| delivered(sub.uid, &sub.policy, h))
            .collect())
    }

    /// Acknowledges messages; returns once the acks are durable. Unknown or
    /// already-acked ids are ignored, as in at-least-once Pub/Sub; with
    /// exactly-once delivery, use [`Broker::acknowledge_confirmed`] to learn
    /// which ids failed.
    pub async fn acknowledge(&self, name: &SubscriptionName, ack_ids: &[String]) -> Result<()> {
        self.acknowledge_confirmed(name, ack_ids).await.map(|_| ())
    }

    /// Acknowledges messages and says which ack ids took effect; returns
    /// once the acks are durable.
    pub async fn acknowledge_confirmed(
        &self,
        name: &SubscriptionName,
        ack_ids: &[String],
    ) -> Result<AckResult> {
        if ack_ids.is_empty() {
            return Err(Error::invalid("ack_ids must not be empty"));
        }
        let now = Instant::now();
        let (uid, removed, durable, result) = {
            let mut st = self.lock();
            let sub = st.sub_mut(name)?;
            let uid = sub.uid;
            let mut result = AckResult {
                exactly_once: sub.policy.exactly_once,
                ..Default::default()
            };
            let mut removed = Vec::new();
            if sub.policy.exactly_once {
                let mut acked = std::collections::HashSet::new();
                for id in ack_ids {
                    match parse_ack_id(id) {
                        Ok((s, seq, attempt)) if s == uid && sub.holds_lease(seq, attempt, now) => {
                            removed
                                .push((seq, sub.remove(seq, now).expect("leased implies backlog")));
                            acked.insert((seq, attempt));
                            result.succeeded.push(id.clone());
                        }
                        // The same ack id twice in one request.
                        Ok((s, seq, attempt)) if s == uid && acked.contains(&(seq, attempt)) => {
                            result.succeeded.push(id.clone())
                        }
                        _ => result.invalid.push(id.clone()),
                    }
                }
            } else {
                for (s, seq) in parse_all_ack_ids(ack_ids)? {
                    if s == uid {
                        if let Some(p) = sub.remove(seq, now) {
                            removed.push((seq, p));
                        }
                    }
                }
                result.succeeded = ack_ids.to_vec();
            }
            if removed.is_empty() {
                return Ok(result);
            }
            sub.notify.notify_waiters(); // stream quotas may have room now
            let seqs = removed.iter().map(|(s, _)| *s).collect();
            let durable = self.store.append(vec![Record::Ack { sub_uid: uid, seqs }]);
            (uid, removed, durable, result)
        };
        self.persist_acks(&name.to_string(), uid, removed, durable)
            .await?;
        Ok(result)
    }

    /// Awaits the Ack record of messages already removed under the lock; if
    /// it fails, puts them back (leases included) and returns UNAVAILABLE.
    async fn persist_acks(
        &self,
        sub_name: &str,
        uid: u64,
        removed: Vec<(u64, Pending)>,
        durable: AppendFuture,
    ) -> Result<()> {
        if let Err(e) = durable.await {
            let mut st = self.lock();
            if let Some(sub) = st.subs.get_mut(&uid) {
                let now = Instant::now();
                for (seq, p) in removed {
                    sub.restore(seq, p, now);
                }
                sub.notify.notify_waiters();
            }
            return Err(e.into());
        }
        pubrun_observability::metrics()
            .acked
            .get_or_create(&labels([("subscription", sub_name)]))
            .inc_by(removed.len() as u64);
        Ok(())
    }

    /// Extends or shortens leases; 0 seconds nacks (redeliver, after the
    /// retry policy's backoff if there is one).
    pub fn modify_ack_deadline(
        &self,
        name: &SubscriptionName,
        ack_ids: &[String],
        seconds: i32,
    ) -> Result<()> {
        self.modify_ack_deadline_at(name, ack_ids, seconds, Instant::now())
            .map(|_| ())
    }

    /// `modify_ack_deadline`, saying which ack ids took effect.
    pub fn modify_ack_deadline_confirmed(
        &self,
        name: &SubscriptionName,
        ack_ids: &[String],
        seconds: i32,
    ) -> Result<AckResult> {
        self.modify_ack_deadline_at(name, ack_ids, seconds, Instant::now())
    }

    /// `modify_ack_deadline_confirmed` as of `now` (clock-injected, for tests).
    pub fn modify_ack_deadline_at(
        &self,
        name: &SubscriptionName,
        ack_ids: &[String],
        seconds: i32,
        now: Instant,
    ) -> Result<AckResult> {
        if !(0..=MAX_ACK_DEADLINE_SECS).contains(&seconds) {
            return Err(Error::invalid(format!(
                "ack_deadline_seconds is {seconds}; it must be between 0 and {MAX_ACK_DEADLINE_SECS}"
            )));
        }
        if ack_ids.is_empty() {
            return Err(Error::invalid("ack_ids must not be empty"));
        }
        let mut st = self.lock();
        let sub = st.sub_mut(name)?;
        let uid = sub.uid;
        let deadline = (seconds > 0).then(|| now + Duration::from_secs(seconds as u64));
        let mut result = AckResult {
            exactly_once: sub.policy.exactly_once,
            ..Default::default()
        };
        let mut nacked = false;
        if sub.policy.exactly_once {
            for id in ack_ids {
                match parse_ack_id(id) {
                    Ok((s, seq, attempt)) if s == uid && sub.holds_lease(seq, attempt, now) => {
                        sub.modify(seq, deadline, now);
                        nacked |= deadline.is_none();
                        result.succeeded.push(id.clone());
                    }
                    _ => result.invalid.push(id.clone()),
                }
            }
        } else {
            for (s, seq) in parse_all_ack_ids(ack_ids)? {
                if s == uid && sub.modify(seq, deadline, now) && deadline.is_none() {
                    nacked = true;
                }
            }
            result.succeeded = ack_ids.to_vec();
        }
        if nacked {
            sub.notify.notify_waiters();
        }
        Ok(result)
    }

    fn has_dead_letters(&self) -> bool {
        self.lock()
            .subs
            .values()
            .any(|s| !s.dead_letters.is_empty())
    }

    /// Forwards messages that used up their delivery attempts to their
    /// subscription's dead-letter topic, with the attributes Google adds, then
    /// acks them on the subscription (durably). Forwarding that fails (the
    /// topic was deleted, the disk is full) is retried later; a crash between
    /// the two steps may forward a message twice, which Google's best-effort
    /// dead lettering allows too. Returns how many were forwarded. The
    /// maintenance task calls this; tests may call it directly.
    pub async fn forward_dead_letters(&self) -> usize {
        struct Batch {
            uid: u64,
            sub_id: String,
            project: String,
            topic: String,
            letters: Vec<crate::subscription::DeadLetter>,
        }
        let batches = {
            let mut st = self.lock();
            let State { catalog, subs, .. } = &mut *st;
            let now = Instant::now();
            let mut out = Vec::new();
            for entry in catalog.subscriptions.values() {
                let Some(sub) = subs.get_mut(&entry.uid) else {
                    continue;
                };
                if sub.dead_letters.is_empty() {
                    continue;
                }
                let letters = sub.take_dead_letters();
                match &entry.config.dead_letter_policy {
                    Some(p) if !letters.is_empty() => {
                        let name = SubscriptionName::parse(&entry.config.name).ok();
                        out.push(Batch {
                            uid: entry.uid,
                            sub_id: name
                                .as_ref()
                                .map(|n| n.id().to_string())
                                .unwrap_or_default(),
                            project: name
                                .as_ref()
                                .map(|n| n.project().id().to_string())
                                .unwrap_or_default(),
                            topic: p.dead_letter_topic.clone(),
                            letters,
                        });
                    }
                    Some(_) => {}
                    None => {
                        // The policy was removed meanwhile: deliver them again.
                        for l in letters {
                            sub.return_dead_letter(l.seq, now, Duration::ZERO);
                        }
                        sub.notify.notify_waiters();
                    }
                }
            }
            out
        };
        let mut forwarded = 0;
        for b in batches {
            for chunk in b.letters.chunks(100) {
                let messages = chunk
                    .iter()
                    .map(|l| {
                        let mut attributes = l.msg.attributes();
                        attributes.insert(
                            "CloudPubSubDeadLetterSourceDeliveryCount".into(),
                            l.attempts.to_string(),
                        );
                        attributes.insert(
                            "CloudPubSubDeadLetterSourceSubscription".into(),
                            b.sub_id.clone(),
                        );
                        attributes.insert(
                            "CloudPubSubDeadLetterSourceSubscriptionProject".into(),
                            b.project.clone(),
                        );
                        attributes.insert(
                            "CloudPubSubDeadLetterSourceTopicPublishTime".into(),
                            crate::push::rfc3339(l.msg.publish_time_nanos()),
                        );
                        OutgoingMessage {
                            data: l.msg.data_bytes(),
                            attributes,
                            ordering_key: l.msg.ordering_key().to_string(),
                        }
                    })
                    .collect();
                let seqs: Vec<u64> = chunk.iter().map(|l| l.seq).collect();
                let result = match self.append(&b.topic, messages).await {
                    Ok(_) => self.ack_forwarded(b.uid, &seqs).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => forwarded += seqs.len(),
                    Err(e) => {
                        tracing::warn!(
                            subscription = %b.sub_id, dead_letter_topic = %b.topic, messages = seqs.len(), error = %e,
                            "forwarding to the dead-letter topic failed; will retry"
                        );
                        let mut st = self.lock();
                        if let Some(sub) = st.subs.get_mut(&b.uid) {
                            let now = Instant::now();
                            for s in seqs {
                                sub.return_dead_letter(s, now, DEAD_LETTER_RETRY);
                            }
                        }
                    }
                }
            }
        }
        forwarded
    }

    /// Acks forwarded dead letters on their source subscription.
    async fn ack_forwarded(&self, uid: u64, seqs: &[u64]) -> Result<()> {
        let (sub_name, removed, durable) = {
            let mut st = self.lock();
            let sub_name = st
                .catalog
                .subscriptions
                .iter()
                .find(|(_, e)| e.uid == uid)
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            let Some(sub) = st.subs.get_mut(&uid) else {
                return Ok(());
            };
            let now = Instant::now();
            let removed: Vec<(u64, Pending)> = seqs
                .iter()
                .filter_map(|&s| sub.remove(s, now).map(|p| (s, p)))
                .collect();
            if removed.is_empty() {
                return Ok(());
            }
            sub.notify.notify_waiters();
            let durable = self.store.append(vec![Record::Ack {
                sub_uid: uid,
                seqs: removed.iter().map(|(s, _)| *s).collect(),
            }]);
            (sub_name, removed, durable)
        };
        self.persist_acks(&sub_name, uid, removed, durable).await
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
            StreamQuota {
                max_messages: max_messages.max(0) as u64,
                max_bytes: max_bytes.max(0) as u64,
                ..Default::default()
            },
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

    /// The subscription's current exactly-once and ordering settings.
    pub fn properties(&self) -> DeliveryProperties {
        let st = self.broker.lock();
        st.subs
            .get(&self.sub_uid)
            .map(|s| DeliveryProperties {
                exactly_once_delivery: s.policy.exactly_once,
                message_ordering: s.policy.ordered,
            })
            .unwrap_or_default()
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
                    None => {
                        return Err(Error::not_found(format!(
                            "subscription {} not found",
                            self.sub
                        )))
                    }
                };
                let got = sub.take(max, Instant::now(), self.deadline, Some(self.id));
                if !got.is_empty() {
                    return Ok(got
                        .into_iter()
                        .map(|h| delivered(self.sub_uid, &sub.policy, h))
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
            sub.forget_stream(self.id);
        }
    }
}
