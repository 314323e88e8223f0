//! Retention and replay over the real embedded store: message retention on
//! subscriptions and topics, `retain_acked_messages`, Seek to a time and to a
//! snapshot, snapshots across a restart, and disk space coming back once
//! messages expire. Wall time is a `ManualClock` moved by hand; nothing sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pubrun_broker::{Broker, DeliveryUpdate, ListRequest, SubscriptionUpdate};
use pubrun_core::clock::ManualClock;
use pubrun_core::names::SnapshotName;
use pubrun_core::Code;
use pubrun_store::EmbeddedStore;

mod common;
use common::{msg, sub_config, subn, topic, topic_config};

/// 2024-01-01T00:00:00Z.
const T0: i64 = 1_704_067_200_000_000_000;
const MIN: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn open(dir: &std::path::Path, clock: &ManualClock) -> Arc<Broker> {
    // Small segments so that a few KiB of messages span several of them.
    let store = EmbeddedStore::open_with_segment_bytes(dir, 4 * 1024).unwrap();
    Broker::open_with_clock(Arc::new(store), Arc::new(clock.clone())).unwrap()
}

/// A broker in a fresh directory whose clock stands at [`T0`] until moved.
fn at_t0() -> (tempfile::TempDir, ManualClock, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_nanos(T0);
    let b = open(dir.path(), &clock);
    (dir, clock, b)
}

fn snap(id: &str) -> SnapshotName {
    SnapshotName::parse(&format!("projects/p/snapshots/snap-{id}")).unwrap()
}

async fn make_topic(b: &Broker, t: &str, retention: Option<Duration>) {
    b.create_topic_with_retention(topic_config(t), retention)
        .await
        .unwrap();
}

async fn publish(b: &Broker, t: &str, datas: &[&str]) {
    for d in datas {
        b.publish(&topic(t), vec![msg(d)]).await.unwrap();
    }
}

/// Pulls everything ready, acks it, returns the data in delivery order.
async fn drain(b: &Broker, s: &str) -> Vec<String> {
    let got = b.pull_at(&subn(s), 1000, Instant::now()).unwrap();
    if !got.is_empty() {
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        b.acknowledge(&subn(s), &ids).await.unwrap();
    }
    let mut out: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8(d.message.data.to_vec()).unwrap())
        .collect();
    out.sort();
    out
}

fn kib(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}{i:03}{}", "x".repeat(1024)))
        .collect()
}

#[tokio::test]
async fn expired_messages_leave_the_backlog_and_their_segments_are_deleted() {
    let (_dir, clock, b) = at_t0();
    make_topic(&b, "t", None).await;
    let mut cfg = sub_config("s", "t");
    cfg.message_retention_duration = Some(10 * MIN);
    b.create_subscription(cfg).await.unwrap();
    let old = kib("old", 20);
    publish(&b, "t", &old.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(b.reclaim(), 0, "unacked messages keep their segments");
    let before = b.log_bytes();
    assert!(before > 20 * 1024);

    // Nine minutes: still retained.
    clock.advance(9 * MIN);
    assert_eq!(b.expire_retained(), 0);
    assert_eq!(b.backlog(&subn("s")).unwrap(), 20);
    // Past ten minutes: gone, unacked or not, and the disk space with them.
    clock.advance(2 * MIN);
    publish(&b, "t", &["fresh"]).await;
    assert_eq!(b.expire_retained(), 20);
    assert_eq!(b.backlog(&subn("s")).unwrap(), 1);
    let freed = b.reclaim();
    assert!(freed > 16 * 1024, "freed only {freed} bytes");
    assert!(
        b.log_bytes() < before / 2,
        "log_bytes {} did not shrink from {before}",
        b.log_bytes()
    );
    assert_eq!(drain(&b, "s").await, vec!["fresh".to_string()]);
}

#[tokio::test]
async fn retain_acked_messages_keeps_acked_messages_for_seek_until_they_expire() {
    let (_dir, clock, b) = at_t0();
    make_topic(&b, "t", None).await;
    let mut cfg = sub_config("keep", "t");
    cfg.message_retention_duration = Some(10 * MIN);
    cfg.retain_acked_messages = true;
    b.create_subscription(cfg).await.unwrap();
    b.create_subscription(sub_config("plain", "t"))
        .await
        .unwrap();
    let data = kib("m", 12);
    publish(
        &b,
        "t",
        &data.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(drain(&b, "keep").await.len(), 12);
    assert_eq!(drain(&b, "plain").await.len(), 12);
    // Acked everywhere, but "keep" retains them: no space comes back.
    assert_eq!(b.reclaim(), 0);
    let before = b.log_bytes();

    // Seek back: the acked messages are delivered again on "keep" only.
    b.seek_to_time(&subn("keep"), T0).await.unwrap();
    b.seek_to_time(&subn("plain"), T0).await.unwrap();
    assert_eq!(drain(&b, "keep").await.len(), 12);
    assert!(drain(&b, "plain").await.is_empty());

    // After the retention they expire, the space is reclaimed and a seek
    // finds nothing to redeliver.
    clock.advance(11 * MIN);
    publish(&b, "t", &["late"]).await;
    b.expire_retained();
    assert!(b.reclaim() > 8 * 1024);
    assert!(b.log_bytes() < before);
    b.seek_to_time(&subn("keep"), T0).await.unwrap();
    assert_eq!(drain(&b, "keep").await, vec!["late".to_string()]);
}

#[tokio::test]
async fn seek_to_time_acks_earlier_and_unacks_later_messages() {
    let (dir, clock, b) = at_t0();
    make_topic(&b, "t", None).await;
    b.create_subscription(sub_config("s", "t")).await.unwrap();
    let mut cfg = sub_config("r", "t");
    cfg.retain_acked_messages = true;
    b.create_subscription(cfg).await.unwrap();
    publish(&b, "t", &["a1", "a2"]).await;
    clock.advance(MIN);
    let t1 = T0 + 60_000_000_000;
    publish(&b, "t", &["b1", "b2"]).await;

    // Without retained acks: a seek forward purges what came before.
    b.seek_to_time(&subn("s"), t1).await.unwrap();
    assert_eq!(drain(&b, "s").await, vec!["b1", "b2"]);

    // With them: everything acked is delivered again after a seek back, and
    // only what was published at or after the time.
    assert_eq!(drain(&b, "r").await.len(), 4);
    b.seek_to_time(&subn("r"), t1).await.unwrap();
    assert_eq!(drain(&b, "r").await, vec!["b1", "b2"]);
    b.seek_to_time(&subn("r"), T0).await.unwrap();
    assert_eq!(drain(&b, "r").await, vec!["a1", "a2", "b1", "b2"]);

    // The seek is durable: after a restart the state is the same.
    b.seek_to_time(&subn("r"), t1).await.unwrap();
    drop(b);
    let b = open(dir.path(), &clock);
    assert_eq!(drain(&b, "r").await, vec!["b1", "b2"]);
    assert!(drain(&b, "s").await.is_empty());

    let err = b.seek_to_time(&subn("nope"), T0).await.unwrap_err();
    assert_eq!(err.code, Code::NotFound);
}

#[tokio::test]
async fn snapshots_capture_the_backlog_and_survive_a_restart() {
    let (dir, clock, b) = at_t0();
    make_topic(&b, "t", None).await;
    make_topic(&b, "other", None).await;
    b.create_subscription(sub_config("s", "t")).await.unwrap();
    b.create_subscription(sub_config("o", "other"))
        .await
        .unwrap();
    publish(&b, "t", &["m1"]).await;
    assert_eq!(drain(&b, "s").await, vec!["m1"]);
    clock.advance(DAY);
    publish(&b, "t", &["m2"]).await;
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("env".to_string(), "test".to_string());
    let info = b
        .create_snapshot(&snap("before"), &subn("s"), labels.clone())
        .await
        .unwrap();
    // 7 days after the oldest unacked message (m2, published now).
    assert_eq!(
        info.expire_time_nanos,
        T0 + (DAY + 7 * DAY).as_nanos() as i64
    );
    assert_eq!(info.topic, topic("t").to_string());
    assert_eq!(info.labels, labels);
    publish(&b, "t", &["m3"]).await;
    assert_eq!(drain(&b, "s").await, vec!["m2", "m3"]);

    // The snapshot holds m2 and everything published after it.
    b.seek_to_snapshot(&subn("s"), &snap("before"))
        .await
        .unwrap();
    assert_eq!(drain(&b, "s").await, vec!["m2", "m3"]);

    // Errors as Google documents them.
    let e = b
        .create_snapshot(&snap("before"), &subn("s"), Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    let e = b
        .create_snapshot(&snap("x"), &subn("missing"), Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::NotFound);
    let e = b
        .seek_to_snapshot(&subn("o"), &snap("before"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e:?}");
    let e = b
        .seek_to_snapshot(&subn("s"), &snap("missing"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::NotFound);

    // A restart keeps the snapshot and the messages it holds.
    drop(b);
    let b = open(dir.path(), &clock);
    assert_eq!(b.get_snapshot(&snap("before")).unwrap(), info);
    let page = b
        .list_snapshots(ListRequest::new(
            &pubrun_core::ProjectName::parse("projects/p").unwrap(),
            0,
            "",
        ))
        .unwrap();
    assert_eq!(page.items, vec![info.clone()]);
    assert_eq!(
        b.list_topic_snapshots(ListRequest::new(&topic("t"), 0, ""))
            .unwrap()
            .items,
        vec![snap("before").to_string()]
    );
    assert!(drain(&b, "s").await.is_empty(), "acks survive the restart");
    b.seek_to_snapshot(&subn("s"), &snap("before"))
        .await
        .unwrap();
    assert_eq!(drain(&b, "s").await, vec!["m2", "m3"]);

    b.delete_snapshot(&snap("before")).await.unwrap();
    assert_eq!(
        b.get_snapshot(&snap("before")).unwrap_err().code,
        Code::NotFound
    );
    assert_eq!(
        b.delete_snapshot(&snap("before")).await.unwrap_err().code,
        Code::NotFound
    );
}

#[tokio::test]
async fn snapshots_of_an_old_backlog_are_refused_and_snapshots_expire() {
    let (dir, clock, b) = at_t0();
    make_topic(&b, "t", None).await;
    b.create_subscription(sub_config("s", "t")).await.unwrap();
    // An empty backlog: the snapshot lives the full 7 days.
    let empty = b
        .create_snapshot(&snap("empty"), &subn("s"), Default::default())
        .await
        .unwrap();
    assert_eq!(empty.expire_time_nanos, T0 + (7 * DAY).as_nanos() as i64);
    publish(&b, "t", &["old"]).await;
    clock.advance(7 * DAY - 30 * MIN);
    let e = b
        .create_snapshot(&snap("late"), &subn("s"), Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e:?}");
    // Past its expire time the snapshot is gone.
    clock.advance(31 * MIN);
    assert_eq!(
        b.get_snapshot(&snap("empty")).unwrap_err().code,
        Code::NotFound
    );
    b.run_retention().await.unwrap();
    drop(b);
    let b = open(dir.path(), &clock);
    assert_eq!(
        b.get_snapshot(&snap("empty")).unwrap_err().code,
        Code::NotFound
    );
}

#[tokio::test]
async fn topic_retention_lets_a_new_subscription_seek_back_before_it_existed() {
    let (_dir, clock, b) = at_t0();
    make_topic(&b, "t", Some(DAY)).await;
    assert_eq!(b.topic_retention(&topic("t").to_string()), Some(DAY));
    publish(&b, "t", &["early"]).await;
    b.create_subscription(sub_config("late", "t"))
        .await
        .unwrap();
    assert!(drain(&b, "late").await.is_empty());
    b.seek_to_time(&subn("late"), T0).await.unwrap();
    assert_eq!(drain(&b, "late").await, vec!["early"]);
    // A day later the topic no longer holds it.
    clock.advance(DAY + MIN);
    b.expire_retained();
    b.seek_to_time(&subn("late"), T0).await.unwrap();
    assert!(drain(&b, "late").await.is_empty());
}

#[tokio::test]
async fn retention_bounds_are_checked() {
    let (_dir, _clock, b) = at_t0();
    let e = b
        .create_topic_with_retention(topic_config("t"), Some(5 * MIN))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("message_retention_duration"));
    make_topic(&b, "t", Some(31 * DAY)).await;
    let mut cfg = sub_config("s", "t");
    cfg.message_retention_duration = Some(8 * DAY);
    let e = b.create_subscription(cfg).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    b.create_subscription(sub_config("s", "t")).await.unwrap();
    let e = b
        .update_subscription_with(
            &subn("s"),
            SubscriptionUpdate::default(),
            DeliveryUpdate {
                message_retention_duration: Some(Some(Duration::from_secs(1))),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    let c = b
        .update_subscription_with(
            &subn("s"),
            SubscriptionUpdate::default(),
            DeliveryUpdate {
                message_retention_duration: Some(Some(DAY)),
                retain_acked_messages: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(c.message_retention_duration, Some(DAY));
    assert!(c.retain_acked_messages);
}
