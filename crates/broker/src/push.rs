//! Push delivery: one worker per push subscription POSTs its messages to the
//! subscription's endpoint, as Google's push subscriptions do.
//!
//! A worker is an internal streaming consumer of the broker (like a job's
//! intake): it leases messages with the subscription's ack deadline and
//! settles each by the endpoint's answer. HTTP 102, 200, 201, 202 and 204
//! ack; any other status, a connection error or no answer within the ack
//! deadline nacks, so the message is redelivered after the subscription's
//! retry-policy backoff — or, without a retry policy, Google's push backoff
//! ([`PUSH_BACKOFF`], applied by the broker) — and dead-lettered once its
//! attempts run out.
//!
//! Concurrency is a window of outstanding requests per subscription: it
//! starts at [`INITIAL_WINDOW`], grows by one per success up to
//! [`MAX_WINDOW`] and halves on every failure (Google likewise scales push
//! concurrency with the endpoint's success rate). With message ordering the
//! broker hands out a key's next message only after the previous one is
//! acked, and messages of one key that arrive in the same batch are sent one
//! after another.
//!
//! [`spawn`] starts a manager that follows the catalog: it starts a worker
//! for every push subscription (at boot too), restarts it when the push
//! config or ack deadline changes, and stops it when the subscription is
//! deleted or switched to pull. A stopped worker nacks what it still had in
//! flight, so those messages are delivered again at once rather than after
//! their lease.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use pubrun_core::config::{PushConfig, RetryPolicy};
use pubrun_core::{SubscriptionConfig, SubscriptionName};
use tokio::task::{JoinHandle, JoinSet};

use crate::{Broker, Delivered};

/// Redelivery backoff of a push subscription without a retry policy:
/// exponential from 100 ms up to 60 s, as Google documents push backoff.
pub const PUSH_BACKOFF: RetryPolicy = RetryPolicy {
    minimum_backoff: Duration::from_millis(100),
    maximum_backoff: Duration::from_secs(60),
};

/// Outstanding push requests per subscription at start and at most.
pub const INITIAL_WINDOW: usize = 8;
pub const MAX_WINDOW: usize = 64;

/// A request gets the ack deadline minus this, so that a timeout is nacked
/// while the lease still holds (a nack after the lease expired could hit the
/// message's next delivery, which reuses its sequence number).
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// The User-Agent Google's push requests carry.
const USER_AGENT: &str =
    "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)";

/// Starts the push manager. It runs until the broker is dropped or the
/// handle is aborted; aborting it stops every worker.
pub fn spawn(broker: &Arc<Broker>) -> JoinHandle<()> {
    let weak = Arc::downgrade(broker);
    let mut changes = broker.catalog_changes();
    tokio::spawn(async move {
        let client = match reqwest::Client::builder().user_agent(USER_AGENT).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the push HTTP client; push delivery is off");
                return;
            }
        };
        let mut workers: HashMap<u64, Worker> = HashMap::new();
        loop {
            changes.borrow_and_update();
            match weak.upgrade() {
                Some(b) => reconcile(&b, &mut workers, &client),
                None => break,
            }
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
}

/// Brings the running workers in line with the catalog's push subscriptions.
fn reconcile(broker: &Arc<Broker>, workers: &mut HashMap<u64, Worker>, client: &reqwest::Client) {
    let want: HashMap<u64, SubscriptionConfig> = broker.push_subscriptions().into_iter().collect();
    workers.retain(|uid, w| want.get(uid).is_some_and(|c| w.serves(c)) && !w.task.is_finished());
    for (uid, config) in want {
        if workers.contains_key(&uid) {
            continue;
        }
        match Worker::start(broker, &config, client) {
            Some(w) => {
                workers.insert(uid, w);
            }
            None => continue,
        }
    }
}

struct Worker {
    broker: Arc<Broker>,
    name: SubscriptionName,
    push: PushConfig,
    ack_deadline_seconds: i32,
    task: JoinHandle<()>,
    /// Ack ids leased to this worker and not yet settled.
    inflight: Arc<Mutex<HashSet<String>>>,
}

/// What one worker needs to build and send requests.
struct Target {
    name: SubscriptionName,
    full_name: String,
    push: PushConfig,
    timeout: Duration,
    client: reqwest::Client,
    broker: Arc<Broker>,
    inflight: Arc<Mutex<HashSet<String>>>,
}

impl Worker {
    fn start(
        broker: &Arc<Broker>,
        config: &SubscriptionConfig,
        client: &reqwest::Client,
    ) -> Option<Worker> {
        let push = config.push_config.clone()?;
        let name = SubscriptionName::parse(&config.name).ok()?;
        let stream = match broker.open_stream(&name, config.ack_deadline_seconds, 0, 0) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(subscription = %name, error = %e, "push worker cannot open its subscription");
                return None;
            }
        };
        let inflight = Arc::new(Mutex::new(HashSet::new()));
        let deadline = Duration::from_secs(config.ack_deadline_seconds.max(1) as u64);
        let target = Arc::new(Target {
            name: name.clone(),
            full_name: config.name.clone(),
            push: push.clone(),
            timeout: deadline.saturating_sub(DEADLINE_MARGIN),
            client: client.clone(),
            broker: broker.clone(),
            inflight: inflight.clone(),
        });
        let ordered = config.enable_message_ordering;
        tracing::info!(subscription = %name, endpoint = %push.push_endpoint, "push delivery started");
        let task = tokio::spawn(run(stream, target, ordered));
        Some(Worker {
            broker: broker.clone(),
            name,
            push,
            ack_deadline_seconds: config.ack_deadline_seconds,
            task,
            inflight,
        })
    }

    fn serves(&self, c: &SubscriptionConfig) -> bool {
        c.push_config.as_ref() == Some(&self.push)
            && c.ack_deadline_seconds == self.ack_deadline_seconds
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Aborting drops the worker's JoinSet, which aborts its requests.
        self.task.abort();
        let ids: Vec<String> = lock(&self.inflight).drain().collect();
        if !ids.is_empty() {
            // The subscription may be gone already; then there is nothing to return.
            let _ = self.broker.modify_ack_deadline(&self.name, &ids, 0);
        }
        tracing::info!(subscription = %self.name, "push delivery stopped");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Outcome of one delivery task: messages it settled and how many of
/// their requests succeeded or failed.
struct Settled {
    done: usize,
    ok: usize,
    failed: usize,
}

async fn run(stream: crate::StreamHandle, target: Arc<Target>, ordered: bool) {
    let mut window = INITIAL_WINDOW;
    let mut outstanding = 0usize;
    let mut tasks: JoinSet<Settled> = JoinSet::new();
    loop {
        tokio::select! {
            got = stream.next(window - outstanding), if outstanding < window => {
                let batch = match got {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::info!(subscription = %target.name, error = %e, "push worker stopped");
                        return;
                    }
                };
                outstanding += batch.len();
                lock(&target.inflight).extend(batch.iter().map(|d| d.ack_id.clone()));
                for chain in chains(batch, ordered) {
                    tasks.spawn(deliver_chain(target.clone(), chain));
                }
            }
            Some(res) = tasks.join_next() => {
                let Ok(s) = res else { continue };
                outstanding = outstanding.saturating_sub(s.done);
                window = (window + s.ok).min(MAX_WINDOW);
                for _ in 0..s.failed {
                    window = (window / 2).max(1);
                }
            }
        }
    }
}

/// Splits a batch into what may be sent concurrently: every message on its
/// own, except that with ordering the messages of one key form one chain.
fn chains(batch: Vec<Delivered>, ordered: bool) -> Vec<Vec<Delivered>> {
    let mut out: Vec<Vec<Delivered>> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for d in batch {
        let key = &d.message.ordering_key;
        if ordered && !key.is_empty() {
            if let Some(&i) = by_key.get(key) {
                out[i].push(d);
                continue;
            }
            by_key.insert(key.clone(), out.len());
        }
        out.push(vec![d]);
    }
    out
}

/// Sends a chain in order, acking each success. On a failure the message is
/// nacked; with ordering the broker then takes back the rest of its key
/// too, so those are not sent now (they come again after it).
async fn deliver_chain(target: Arc<Target>, chain: Vec<Delivered>) -> Settled {
    let mut s = Settled {
        done: 0,
        ok: 0,
        failed: 0,
    };
    let len = chain.len();
    for d in chain {
        let ok = send(&target, &d).await;
        let ids = [d.ack_id.clone()];
        let settled = if ok {
            target.broker.acknowledge(&target.name, &ids).await
        } else {
            target.broker.modify_ack_deadline(&target.name, &ids, 0)
        };
        if let Err(e) = settled {
            tracing::debug!(subscription = %target.name, error = %e, "settling a pushed message failed");
        }
        lock(&target.inflight).remove(&d.ack_id);
        s.done += 1;
        if ok {
            s.ok += 1;
        } else {
            s.failed += 1;
            break;
        }
    }
    if s.done < len {
        // The rest were returned by the broker with the failed one.
        s.done = len;
    }
    s
}

/// POSTs one message; true when the endpoint acked it.
async fn send(t: &Target, d: &Delivered) -> bool {
    let m = &d.message;
    let req = t.client.post(&t.push.push_endpoint).timeout(t.timeout);
    let req = match t.push.no_wrapper {
        None => req
            .header("content-type", "application/json")
            .body(envelope(&t.full_name, d).to_string()),
        Some(nw) => {
            let mut req = req
                .header("content-type", "application/octet-stream")
                .body(m.data.clone());
            if nw.write_metadata {
                req = req
                    .header("x-goog-pubsub-subscription-name", &t.full_name)
                    .header("x-goog-pubsub-message-id", m.id())
                    .header("x-goog-pubsub-publish-time", rfc3339(m.publish_time_nanos));
                if !m.ordering_key.is_empty() {
                    req = req.header("x-goog-pubsub-ordering-key", &m.ordering_key);
                }
                for (k, v) in &m.attributes {
                    // Attributes that are no valid header are left out rather
                    // than failing the delivery forever.
                    match (
                        reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                        reqwest::header::HeaderValue::from_str(v),
                    ) {
                        (Ok(k), Ok(v)) => req = req.header(k, v),
                        _ => {
                            tracing::debug!(subscription = %t.name, attribute = %k, "attribute cannot be a header; not sent")
                        }
                    }
                }
            }
            req
        }
    };
    match req.send().await {
        Ok(r) => {
            let code = r.status().as_u16();
            let ok = matches!(code, 102 | 200 | 201 | 202 | 204);
            if !ok {
                tracing::debug!(subscription = %t.name, status = code, "push endpoint did not ack");
            }
            ok
        }
        Err(e) => {
            tracing::debug!(subscription = %t.name, error = %e, "push request failed");
            false
        }
    }
}

/// Google's wrapped push body. Both spellings of the id and publish time
/// are sent, as Google does; `deliveryAttempt` only with a dead-letter policy.
pub fn envelope(subscription: &str, d: &Delivered) -> serde_json::Value {
    let m = &d.message;
    let mut msg = serde_json::Map::new();
    if !m.data.is_empty() {
        msg.insert(
            "data".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&m.data)
                .into(),
        );
    }
    if !m.attributes.is_empty() {
        msg.insert(
            "attributes".into(),
            serde_json::to_value(&m.attributes).unwrap_or_default(),
        );
    }
    let id = m.id();
    let time = rfc3339(m.publish_time_nanos);
    msg.insert("messageId".into(), id.clone().into());
    msg.insert("message_id".into(), id.into());
    msg.insert("publishTime".into(), time.clone().into());
    msg.insert("publish_time".into(), time.into());
    if !m.ordering_key.is_empty() {
        msg.insert("orderingKey".into(), m.ordering_key.clone().into());
    }
    let mut body = serde_json::Map::new();
    body.insert("message".into(), msg.into());
    body.insert("subscription".into(), subscription.into());
    if d.delivery_attempt > 0 {
        body.insert("deliveryAttempt".into(), d.delivery_attempt.into());
    }
    body.into()
}

/// RFC 3339 in UTC with `Z`, as Google writes publish times (push headers
/// and wrappers, the dead-letter source attribute).
pub(crate) fn rfc3339(nanos: i64) -> String {
    chrono::DateTime::from_timestamp(
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000) as u32,
    )
    .unwrap_or_default()
    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
