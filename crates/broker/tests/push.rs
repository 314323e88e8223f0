//! Push delivery (`push.rs`) against a small HTTP receiver on 127.0.0.1 that
//! records every request and answers as each test scripts it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine as _;
use pubrun_broker::{Broker, DeliveryUpdate, SubscriptionUpdate};
use pubrun_core::config::{DeadLetterPolicy, NoWrapper, PushConfig, RetryPolicy};
use pubrun_core::{Code, OutgoingMessage, SubscriptionConfig};
use serde_json::Value;
use tokio::sync::mpsc;

mod common;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Req {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("wrapped push body is JSON")
    }
    fn message_id(&self) -> String {
        self.json()["message"]["messageId"]
            .as_str()
            .unwrap()
            .to_string()
    }
    fn data(&self) -> String {
        let b64 = self.json()["message"]["data"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    }
}

/// How the receiver answers: a status, after an optional delay.
type Script = Arc<dyn Fn(&Req) -> (u16, Duration) + Send + Sync>;

struct Receiver {
    base: String,
    rx: mpsc::UnboundedReceiver<Req>,
}

impl Receiver {
    async fn next(&mut self) -> Req {
        tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .expect("no push request arrived in time")
            .expect("receiver stopped")
    }
    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

async fn receiver(script: impl Fn(&Req) -> (u16, Duration) + Send + Sync + 'static) -> Receiver {
    let (tx, rx) = mpsc::unbounded_channel();
    let state: (mpsc::UnboundedSender<Req>, Script) = (tx, Arc::new(script));
    async fn handle(
        State((tx, script)): State<(mpsc::UnboundedSender<Req>, Script)>,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let req = Req {
            path: uri.path().to_string(),
            headers,
            body,
            at: Instant::now(),
        };
        let (status, delay) = script(&req);
        let _ = tx.send(req);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        StatusCode::from_u16(status).unwrap()
    }
    let app = axum::Router::new().fallback(handle).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver {
        base: format!("http://{addr}"),
        rx,
    }
}

fn ok(_: &Req) -> (u16, Duration) {
    (200, Duration::ZERO)
}

struct Env {
    broker: Arc<Broker>,
    _push: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let (dir, broker) = fresh();
    broker.spawn_maintenance();
    let push = pubrun_broker::push::spawn(&broker);
    Env {
        broker,
        _push: push,
        _dir: dir,
    }
}

fn push(endpoint: String) -> Option<PushConfig> {
    Some(PushConfig {
        push_endpoint: endpoint,
        ..Default::default()
    })
}

/// A subscription with ack deadline 10 s, pushing when `push_config` is set.
fn push_sub(id: &str, t: &str, push_config: Option<PushConfig>) -> SubscriptionConfig {
    SubscriptionConfig {
        push_config,
        ..sub_config(id, t)
    }
}

/// A message with attribute `color`.
fn colored(data: &str, color: &str) -> OutgoingMessage {
    OutgoingMessage {
        attributes: BTreeMap::from([("color".to_string(), color.to_string())]),
        ..msg(data)
    }
}

/// Waits (polling) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn wrapped_envelope_and_success_codes_ack() {
    let e = env().await;
    let b = &e.broker;
    let mut r = receiver(|req: &Req| {
        // /code/N answers N.
        let code = req.path.rsplit('/').next().unwrap().parse().unwrap_or(200);
        (code, Duration::ZERO)
    })
    .await;
    make_topic(b, "t").await;
    for code in [200, 201, 202, 204] {
        b.create_subscription(push_sub(
            &format!("s{code}"),
            "t",
            push(r.endpoint(&format!("/code/{code}"))),
        ))
        .await
        .unwrap();
    }
    let keyed = OutgoingMessage {
        ordering_key: "k1".into(),
        ..colored("hello push", "red")
    };
    let ids = b.publish(&topic("t"), vec![keyed]).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let req = r.next().await;
        assert_eq!(
            req.headers["content-type"], "application/json",
            "{:?}",
            req.headers
        );
        let v = req.json();
        let code = req.path.rsplit('/').next().unwrap().to_string();
        assert_eq!(
            v["subscription"],
            format!("projects/p/subscriptions/sub-s{code}")
        );
        let m = &v["message"];
        assert_eq!(m["data"], "aGVsbG8gcHVzaA==");
        assert_eq!(req.data(), "hello push");
        assert_eq!(m["attributes"], serde_json::json!({"color": "red"}));
        assert_eq!(m["messageId"], ids[0]);
        assert_eq!(m["message_id"], ids[0]);
        assert_eq!(m["orderingKey"], "k1");
        let t = m["publishTime"].as_str().unwrap();
        assert_eq!(m["publish_time"], t);
        assert!(t.ends_with('Z'), "{t}");
        chrono::DateTime::parse_from_rfc3339(t).unwrap();
        // No dead-letter policy: no deliveryAttempt, as Google.
        assert!(v.get("deliveryAttempt").is_none(), "{v}");
        seen.push(code);
    }
    seen.sort();
    assert_eq!(seen, ["200", "201", "202", "204"]);
    // Every success code acked: the backlogs drain, durably.
    for code in [200, 201, 202, 204] {
        let s = subn(&format!("s{code}"));
        eventually("ack", || b.backlog(&s).unwrap() == 0).await;
    }
}

#[tokio::test]
async fn failure_is_redelivered_after_push_backoff_or_retry_policy() {
    let e = env().await;
    let b = &e.broker;
    let calls: Arc<Mutex<HashMap<String, u32>>> = Default::default();
    let c = calls.clone();
    let mut r = receiver(move |req: &Req| {
        let key = format!("{}{}", req.path, req.message_id());
        let mut calls = c.lock().unwrap();
        let n = calls.entry(key).or_default();
        *n += 1;
        (if *n == 1 { 500 } else { 200 }, Duration::ZERO)
    })
    .await;
    make_topic(b, "t").await;
    b.create_subscription(push_sub("default", "t", push(r.endpoint("/default"))))
        .await
        .unwrap();
    let mut with_policy = push_sub("policy", "t", push(r.endpoint("/policy")));
    with_policy.retry_policy =
        Some(RetryPolicy::new(Some(Duration::from_secs(1)), Some(Duration::from_secs(2))).unwrap());
    b.create_subscription(with_policy).await.unwrap();
    b.publish(&topic("t"), vec![msg("x")]).await.unwrap();

    let mut by_path: HashMap<String, Vec<Req>> = HashMap::new();
    for _ in 0..4 {
        let req = r.next().await;
        by_path.entry(req.path.clone()).or_default().push(req);
    }
    let gap = |p: &str| {
        let v = &by_path[p];
        assert_eq!(v.len(), 2, "{p}: {v:?}");
        assert_eq!(v[0].message_id(), v[1].message_id());
        v[1].at - v[0].at
    };
    // Without a retry policy: Google's push backoff (starts at 100 ms).
    let g = gap("/default");
    assert!(g >= Duration::from_millis(90), "redelivered after {g:?}");
    // With one: its minimum backoff.
    let g = gap("/policy");
    assert!(g >= Duration::from_millis(950), "redelivered after {g:?}");
    for s in ["default", "policy"] {
        eventually("ack", || b.backlog(&subn(s)).unwrap() == 0).await;
    }
}

#[tokio::test]
async fn slow_endpoint_past_the_ack_deadline_is_redelivered() {
    let e = env().await;
    let b = &e.broker;
    let first = Arc::new(Mutex::new(true));
    let f = first.clone();
    let mut r = receiver(move |_: &Req| {
        let mut first = f.lock().unwrap();
        if std::mem::take(&mut *first) {
            (200, Duration::from_secs(120)) // answers far too late
        } else {
            (200, Duration::ZERO)
        }
    })
    .await;
    make_topic(b, "t").await;
    b.create_subscription(push_sub("s", "t", push(r.endpoint("/slow"))))
        .await
        .unwrap();
    b.publish(&topic("t"), vec![msg("slow")]).await.unwrap();
    let a = r.next().await;
    let c = r.next().await;
    assert_eq!(a.message_id(), c.message_id());
    let waited = c.at - a.at;
    // The ack deadline is 10 s: no redelivery before it (nearly) ran out.
    assert!(
        waited >= Duration::from_secs(9),
        "redelivered after {waited:?}"
    );
    eventually("ack", || b.backlog(&subn("s")).unwrap() == 0).await;
}

#[tokio::test]
async fn failing_endpoint_dead_letters_after_max_attempts() {
    let e = env().await;
    let b = &e.broker;
    let mut r = receiver(|_: &Req| (503, Duration::ZERO)).await;
    make_topic(b, "t").await;
    make_topic(b, "dead").await;
    b.create_subscription(push_sub("dead-sub", "dead", None))
        .await
        .unwrap();
    let mut c = push_sub("s", "t", push(r.endpoint("/fail")));
    c.dead_letter_policy = DeadLetterPolicy::new(&topic("dead").to_string(), 5).unwrap();
    b.create_subscription(c).await.unwrap();
    let ids = b.publish(&topic("t"), vec![msg("doomed")]).await.unwrap();
    for attempt in 1..=5 {
        let req = r.next().await;
        assert_eq!(req.message_id(), ids[0]);
        assert_eq!(req.json()["deliveryAttempt"], attempt, "{}", req.json());
    }
    let got = b.pull(&subn("dead-sub"), 10, Some(TIMEOUT)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].message.data[..], b"doomed");
    assert_eq!(
        got[0].message.attributes["CloudPubSubDeadLetterSourceDeliveryCount"],
        "5"
    );
    eventually("source acked", || b.backlog(&subn("s")).unwrap() == 0).await;
    // Exactly five attempts reached the endpoint.
    assert!(r.rx.try_recv().is_err());
}

#[tokio::test]
async fn ordering_key_waits_for_the_previous_message() {
    let e = env().await;
    let b = &e.broker;
    // Per key: requests in flight now, and the data acked so far in order.
    #[derive(Default)]
    struct Seen {
        in_flight: HashMap<String, u32>,
        overlap: bool,
        failed_once: std::collections::HashSet<String>,
        acked: HashMap<String, Vec<String>>,
    }
    let seen: Arc<Mutex<Seen>> = Default::default();
    let s2 = seen.clone();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let app_state = (s2, done_tx);
    // A receiver that tracks overlap itself, so it needs enter/leave hooks.
    async fn handle(
        State((seen, done)): State<(Arc<Mutex<Seen>>, mpsc::UnboundedSender<()>)>,
        body: Bytes,
    ) -> StatusCode {
        let v: Value = serde_json::from_slice(&body).unwrap();
        let key = v["message"]["orderingKey"].as_str().unwrap().to_string();
        let data = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v["message"]["data"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        {
            let mut s = seen.lock().unwrap();
            let n = s.in_flight.entry(key.clone()).or_default();
            *n += 1;
            if *n > 1 {
                s.overlap = true;
            }
        }
        // Give a wrongly sent successor time to overlap.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut s = seen.lock().unwrap();
        *s.in_flight.get_mut(&key).unwrap() -= 1;
        // Every third message fails its first delivery.
        let idx: u32 = data.rsplit('-').next().unwrap().parse().unwrap();
        if idx % 3 == 1 && s.failed_once.insert(data.clone()) {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        s.acked.entry(key).or_default().push(data);
        let _ = done.send(());
        StatusCode::OK
    }
    let app = axum::Router::new().fallback(handle).with_state(app_state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    make_topic(b, "t").await;
    let mut c = push_sub("s", "t", push(format!("http://{addr}/ordered")));
    c.enable_message_ordering = true;
    b.create_subscription(c).await.unwrap();
    let n = 12;
    let mut batch = Vec::new();
    for i in 0..n {
        for key in ["a", "b"] {
            batch.push(OutgoingMessage {
                data: format!("{key}-{i}").into(),
                ordering_key: key.into(),
                ..Default::default()
            });
        }
    }
    b.publish(&topic("t"), batch).await.unwrap();
    for _ in 0..2 * n {
        tokio::time::timeout(TIMEOUT, done_rx.recv())
            .await
            .expect("all messages acked in time");
    }
    {
        let s = seen.lock().unwrap();
        assert!(!s.overlap, "two messages of one key were in flight at once");
        for key in ["a", "b"] {
            let want: Vec<String> = (0..n).map(|i| format!("{key}-{i}")).collect();
            assert_eq!(s.acked[key], want, "key {key}");
        }
    }
    eventually("ack", || b.backlog(&subn("s")).unwrap() == 0).await;
}

#[tokio::test]
async fn switching_to_pull_stops_pushing_and_back_resumes() {
    let e = env().await;
    let b = &e.broker;
    let mut r = receiver(ok).await;
    make_topic(b, "t").await;
    b.create_subscription(push_sub("s", "t", push(r.endpoint("/p"))))
        .await
        .unwrap();
    b.publish(&topic("t"), vec![msg("one")]).await.unwrap();
    assert_eq!(r.next().await.data(), "one");
    eventually("ack", || b.backlog(&subn("s")).unwrap() == 0).await;

    let to = |p: Option<PushConfig>| DeliveryUpdate {
        push_config: Some(p),
        ..Default::default()
    };
    let c = b
        .update_subscription_with(&subn("s"), SubscriptionUpdate::default(), to(None))
        .await
        .unwrap();
    assert_eq!(c.push_config, None);
    b.publish(&topic("t"), vec![msg("two")]).await.unwrap();
    let got = b.pull(&subn("s"), 10, Some(TIMEOUT)).await.unwrap();
    assert_eq!(&got[0].message.data[..], b"two");
    b.acknowledge(&subn("s"), &[got[0].ack_id.clone()])
        .await
        .unwrap();

    b.update_subscription_with(
        &subn("s"),
        SubscriptionUpdate::default(),
        to(push(r.endpoint("/q"))),
    )
    .await
    .unwrap();
    b.publish(&topic("t"), vec![msg("three")]).await.unwrap();
    let req = r.next().await;
    assert_eq!((req.path.as_str(), req.data().as_str()), ("/q", "three"));
    // "two" went to the puller only.
    assert!(r.rx.try_recv().is_err());
}

#[tokio::test]
async fn push_subscriptions_resume_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = receiver(ok).await;
    {
        let b = open(dir.path());
        make_topic(&b, "t").await;
        b.create_subscription(push_sub("s", "t", push(r.endpoint("/boot"))))
            .await
            .unwrap();
        // No push manager yet: the message waits in the backlog.
        b.publish(&topic("t"), vec![msg("kept")]).await.unwrap();
    }
    let b = open(dir.path());
    b.spawn_maintenance();
    let _push = pubrun_broker::push::spawn(&b);
    assert_eq!(r.next().await.data(), "kept");
    eventually("ack", || b.backlog(&subn("s")).unwrap() == 0).await;
}

#[tokio::test]
async fn unwrapped_payload_with_metadata_headers() {
    let e = env().await;
    let b = &e.broker;
    let mut r = receiver(ok).await;
    make_topic(b, "t").await;
    b.create_subscription(push_sub(
        "s",
        "t",
        Some(PushConfig {
            push_endpoint: r.endpoint("/raw"),
            no_wrapper: Some(NoWrapper {
                write_metadata: true,
            }),
            ..Default::default()
        }),
    ))
    .await
    .unwrap();
    let ids = b
        .publish(&topic("t"), vec![colored("raw bytes", "blue")])
        .await
        .unwrap();
    let req = r.next().await;
    assert_eq!(&req.body[..], b"raw bytes");
    let h = &req.headers;
    assert_eq!(h["color"], "blue");
    assert_eq!(h["x-goog-pubsub-message-id"], ids[0].as_str());
    assert_eq!(
        h["x-goog-pubsub-subscription-name"],
        "projects/p/subscriptions/sub-s"
    );
    assert!(h.contains_key("x-goog-pubsub-publish-time"));
    eventually("ack", || b.backlog(&subn("s")).unwrap() == 0).await;
}

#[tokio::test]
async fn push_configs_are_checked() {
    let e = env().await;
    let b = &e.broker;
    make_topic(b, "t").await;
    let bad = |endpoint: &str, attrs: &[(&str, &str)]| PushConfig {
        push_endpoint: endpoint.to_string(),
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    for (cfg, mention) in [
        (bad("ftp://x/y", &[]), "push_endpoint"),
        (bad("http://", &[]), "push_endpoint"),
        (bad("https:///push", &[]), "push_endpoint"),
        (
            bad("http://h/p", &[("x-goog-version", "v1beta1")]),
            "v1beta1",
        ),
        (bad("http://h/p", &[("other", "1")]), "other"),
    ] {
        let err = b
            .create_subscription(push_sub("s", "t", Some(cfg)))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(err.message.contains(mention), "{}", err.message);
    }
    let c = b
        .create_subscription(push_sub(
            "s",
            "t",
            Some(bad("http://127.0.0.1:9/p", &[("x-goog-version", "v1")])),
        ))
        .await
        .unwrap();
    assert_eq!(c.push_config.unwrap().attributes["x-goog-version"], "v1");
    // An empty endpoint is a pull subscription.
    let c = b
        .create_subscription(push_sub("pull", "t", Some(PushConfig::default())))
        .await
        .unwrap();
    assert_eq!(c.push_config, None);
}
