//! Broker semantics over the real embedded store, with the clock injected
//! where leases are concerned (no waiting for deadlines).

use std::time::{Duration, Instant};

use pubrun_broker::{Broker, ListRequest, SubscriptionUpdate};
use pubrun_core::{Code, OutgoingMessage, SubscriptionConfig};

mod common;
use common::*;

async fn setup(b: &Broker, t: &str, subs: &[&str]) {
    make_topic(b, t).await;
    for s in subs {
        b.create_subscription(sub_config(s, t)).await.unwrap();
    }
}

fn msgs(prefix: &str, n: usize) -> Vec<OutgoingMessage> {
    (0..n).map(|i| msg(&format!("{prefix}{i}"))).collect()
}

#[tokio::test]
async fn every_subscription_gets_every_message_published_after_it() {
    let (_dir, b) = fresh();
    setup(&b, "events", &["early"]).await;
    b.publish(&topic("events"), msgs("a", 3)).await.unwrap();
    setup_sub_only(&b, "late", "events").await;
    b.publish(&topic("events"), msgs("b", 2)).await.unwrap();
    assert_eq!(
        datas(&b.pull(&subn("early"), 100, None).await.unwrap()),
        ["a0", "a1", "a2", "b0", "b1"]
    );
    assert_eq!(
        datas(&b.pull(&subn("late"), 100, None).await.unwrap()),
        ["b0", "b1"]
    );
}

async fn setup_sub_only(b: &Broker, s: &str, t: &str) {
    b.create_subscription(SubscriptionConfig {
        ack_deadline_seconds: 0,
        ..sub_config(s, t)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn expired_lease_is_redelivered_and_acked_message_is_not() {
    let (_dir, b) = fresh();
    setup(&b, "t-lease", &["s-lease"]).await;
    b.publish(&topic("t-lease"), msgs("m", 2)).await.unwrap();
    let got = b.pull(&subn("s-lease"), 10, None).await.unwrap();
    assert_eq!(got.len(), 2);
    assert!(
        b.pull(&subn("s-lease"), 10, None).await.unwrap().is_empty(),
        "leased messages are not handed out twice"
    );
    b.acknowledge(&subn("s-lease"), &[got[0].ack_id.clone()])
        .await
        .unwrap();
    b.expire_leases(Instant::now() + Duration::from_secs(11));
    let again = b.pull(&subn("s-lease"), 10, None).await.unwrap();
    assert_eq!(datas(&again), ["m1"]);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        again[0].delivery_attempt, 0,
        "Google reports delivery_attempt only with a dead-letter policy"
    );
    assert_eq!(
        again[0].message.id(),
        got[1].message.id(),
        "same message id on redelivery"
    );
}

#[tokio::test]
async fn extended_lease_is_not_redelivered_and_nack_is_immediate() {
    let (_dir, b) = fresh();
    setup(&b, "t-mod", &["s-mod"]).await;
    b.publish(&topic("t-mod"), msgs("m", 1)).await.unwrap();
    let got = b.pull(&subn("s-mod"), 10, None).await.unwrap();
    b.modify_ack_deadline(&subn("s-mod"), &[got[0].ack_id.clone()], 60)
        .unwrap();
    b.expire_leases(Instant::now() + Duration::from_secs(30));
    assert!(b.pull(&subn("s-mod"), 10, None).await.unwrap().is_empty());
    b.modify_ack_deadline(&subn("s-mod"), &[got[0].ack_id.clone()], 0)
        .unwrap();
    assert_eq!(b.pull(&subn("s-mod"), 10, None).await.unwrap().len(), 1);
    let err = b
        .modify_ack_deadline(&subn("s-mod"), &[got[0].ack_id.clone()], 601)
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    let err = b
        .acknowledge(&subn("s-mod"), &["garbage".into()])
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
}

#[tokio::test]
async fn waiting_pull_wakes_on_publish() {
    let (_dir, b) = fresh();
    setup(&b, "t-wait", &["s-wait"]).await;
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        b2.pull(&subn("s-wait"), 10, Some(Duration::from_secs(60)))
            .await
    });
    tokio::task::yield_now().await;
    b.publish(&topic("t-wait"), msgs("x", 1)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("pull woke up")
        .unwrap()
        .unwrap();
    assert_eq!(datas(&got), ["x0"]);
}

#[tokio::test]
async fn state_survives_restart_and_acks_stay_acked() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path());
        setup(&b, "t-restart", &["s-restart"]).await;
        b.publish(&topic("t-restart"), msgs("r", 5)).await.unwrap();
        let got = b.pull(&subn("s-restart"), 2, None).await.unwrap();
        b.acknowledge(
            &subn("s-restart"),
            &got.iter().map(|d| d.ack_id.clone()).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        b.update_subscription(
            &subn("s-restart"),
            SubscriptionUpdate {
                ack_deadline_seconds: Some(42),
                labels: None,
            },
        )
        .await
        .unwrap();
    }
    let b = open(dir.path());
    assert_eq!(
        b.get_subscription(&subn("s-restart"))
            .unwrap()
            .ack_deadline_seconds,
        42
    );
    // Leases are not durable: the leased-but-unacked ones come back too.
    assert_eq!(
        datas(&b.pull(&subn("s-restart"), 100, None).await.unwrap()),
        ["r2", "r3", "r4"]
    );
    // Ids keep increasing after a restart.
    let ids = b.publish(&topic("t-restart"), msgs("n", 1)).await.unwrap();
    assert!(ids[0].parse::<u64>().unwrap() > 5);
}

#[tokio::test]
async fn stream_respects_flow_control_and_ends_when_subscription_is_deleted() {
    let (_dir, b) = fresh();
    setup(&b, "t-stream", &["s-stream"]).await;
    b.publish(&topic("t-stream"), msgs("s", 5)).await.unwrap();
    let stream = b.open_stream(&subn("s-stream"), 10, 2, 0).unwrap();
    let first = stream.next(100).await.unwrap();
    assert_eq!(first.len(), 2, "max_outstanding_messages = 2");
    let blocked = tokio::time::timeout(Duration::from_millis(200), stream.next(100)).await;
    assert!(blocked.is_err(), "no more while 2 are outstanding");
    b.acknowledge(&subn("s-stream"), &[first[0].ack_id.clone()])
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), stream.next(100))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.len(), 1);
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        // Drain the quota first so the stream must wait.
        let s = b2.open_stream(&subn("s-stream"), 10, 1, 0).unwrap();
        let _ = s.next(1).await;
        s.next(1).await
    });
    b.delete_subscription(&subn("s-stream")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.unwrap_err().code, Code::NotFound);
}

#[tokio::test]
async fn errors_carry_google_codes() {
    let (_dir, b) = fresh();
    setup(&b, "t-err", &["s-err"]).await;
    let dup = b.create_topic(topic_config("t-err")).await;
    assert_eq!(dup.unwrap_err().code, Code::AlreadyExists);
    assert_eq!(
        b.publish(&topic("missing"), msgs("x", 1))
            .await
            .unwrap_err()
            .code,
        Code::NotFound
    );
    assert_eq!(
        b.pull(&subn("missing"), 1, None).await.unwrap_err().code,
        Code::NotFound
    );
    assert_eq!(
        b.pull(&subn("s-err"), 0, None).await.unwrap_err().code,
        Code::InvalidArgument
    );
    let bad_deadline = b
        .create_subscription(SubscriptionConfig {
            ack_deadline_seconds: 601,
            ..sub_config("s-err2", "t-err")
        })
        .await;
    assert_eq!(bad_deadline.unwrap_err().code, Code::InvalidArgument);
    let no_topic = b.create_subscription(sub_config("s-err3", "nope")).await;
    assert_eq!(no_topic.unwrap_err().code, Code::NotFound);
    assert_eq!(
        b.publish(&topic("t-err"), vec![OutgoingMessage::default()])
            .await
            .unwrap_err()
            .code,
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn deleting_a_topic_keeps_its_subscriptions_and_backlog() {
    let (_dir, b) = fresh();
    setup(&b, "t-del", &["s-del"]).await;
    b.publish(&topic("t-del"), msgs("d", 2)).await.unwrap();
    b.delete_topic(&topic("t-del")).await.unwrap();
    assert_eq!(
        b.get_subscription(&subn("s-del")).unwrap().topic,
        "_deleted-topic_"
    );
    assert_eq!(b.pull(&subn("s-del"), 10, None).await.unwrap().len(), 2);
    // A re-created topic of the same name does not feed the old subscription.
    setup(&b, "t-del", &[]).await;
    b.publish(&topic("t-del"), msgs("e", 1)).await.unwrap();
    b.expire_leases(Instant::now() + Duration::from_secs(11));
    assert_eq!(
        datas(&b.pull(&subn("s-del"), 10, None).await.unwrap()),
        ["d0", "d1"]
    );
}

#[tokio::test]
async fn list_pages_through_everything_once() {
    let (_dir, b) = fresh();
    for i in 0..7 {
        setup(&b, &format!("page-{i}"), &[]).await;
    }
    let project = pubrun_core::ProjectName::from_id("p").unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = b
            .list_topics(ListRequest::new(&project, 3, &token))
            .unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.into_iter().map(|t| t.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7);
    seen.dedup();
    assert_eq!(seen.len(), 7);
    let other = pubrun_core::ProjectName::from_id("other").unwrap();
    assert!(b
        .list_topics(ListRequest::new(&other, 0, ""))
        .unwrap()
        .items
        .is_empty());
}
