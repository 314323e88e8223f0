//! Retry policy, dead letters, ordering keys, filters and exactly-once
//! delivery over the real embedded store. Time is injected (`pull_at`,
//! `modify_ack_deadline_at`, `expire_leases`) so no test sleeps.

use std::time::{Duration, Instant};

use pubrun_broker::{Delivered, DeliveryUpdate, SubscriptionUpdate};
use pubrun_core::config::{DeadLetterPolicy, RetryPolicy};
use pubrun_core::{Code, OutgoingMessage, SubscriptionConfig};

mod common;
use common::*;

fn keyed(data: &str, key: &str) -> OutgoingMessage {
    OutgoingMessage {
        data: data.to_string().into(),
        ordering_key: key.to_string(),
        ..Default::default()
    }
}

fn ids(d: &[Delivered]) -> Vec<String> {
    d.iter().map(|m| m.ack_id.clone()).collect()
}

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retry_policy_backs_off_exponentially_on_nack_and_expiry() {
    let (_dir, b) = fresh();
    make_topic(&b, "t").await;
    let created = b
        .create_subscription(SubscriptionConfig {
            retry_policy: Some(RetryPolicy::new(Some(10 * SEC), Some(25 * SEC)).unwrap()),
            ..sub_config("backoff", "t")
        })
        .await
        .unwrap();
    assert_eq!(created.retry_policy.unwrap().maximum_backoff, 25 * SEC);
    b.create_subscription(sub_config("immediate", "t"))
        .await
        .unwrap();
    b.publish(&topic("t"), vec![msg("m")]).await.unwrap();

    let t0 = Instant::now();
    for s in ["backoff", "immediate"] {
        let got = b.pull_at(&subn(s), 10, t0).unwrap();
        b.modify_ack_deadline_at(&subn(s), &ids(&got), 0, t0)
            .unwrap();
    }
    // Without a retry policy a nack redelivers at once.
    assert_eq!(b.pull_at(&subn("immediate"), 10, t0).unwrap().len(), 1);
    // With one, not before minimum_backoff (10 s) ...
    assert!(b
        .pull_at(&subn("backoff"), 10, t0 + 9 * SEC)
        .unwrap()
        .is_empty());
    assert_eq!(
        b.backlog(&subn("backoff")).unwrap(),
        1,
        "a delayed message is still owed"
    );
    let t1 = t0 + 10 * SEC;
    let again = b.pull_at(&subn("backoff"), 10, t1).unwrap();
    assert_eq!(datas(&again), ["m"]);
    // ... and the second failure (an expired lease this time) doubles it: 20 s.
    let t2 = t1 + 10 * SEC;
    b.expire_leases(t2);
    assert!(b
        .pull_at(&subn("backoff"), 10, t2 + 19 * SEC)
        .unwrap()
        .is_empty());
    // The maintenance tick makes it ready when due (a waiting pull wakes).
    b.expire_leases(t2 + 20 * SEC);
    let third = b.pull_at(&subn("backoff"), 10, t2 + 20 * SEC).unwrap();
    assert_eq!(third[0].attempt, 3);
    // Third failure: 40 s, capped at maximum_backoff (25 s).
    let t3 = t2 + 20 * SEC;
    b.modify_ack_deadline_at(&subn("backoff"), &ids(&third), 0, t3)
        .unwrap();
    assert!(b
        .pull_at(&subn("backoff"), 10, t3 + 24 * SEC)
        .unwrap()
        .is_empty());
    assert_eq!(
        b.pull_at(&subn("backoff"), 10, t3 + 25 * SEC)
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn retry_policy_is_validated_updated_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path());
        make_topic(&b, "t").await;
        let bad = RetryPolicy {
            minimum_backoff: 20 * SEC,
            maximum_backoff: 10 * SEC,
        };
        let err = b
            .create_subscription(SubscriptionConfig {
                retry_policy: Some(bad),
                ..sub_config("s", "t")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        b.create_subscription(sub_config("s", "t")).await.unwrap();
        let policy = RetryPolicy::new(Some(5 * SEC), None).unwrap();
        let updated = b
            .update_subscription_with(
                &subn("s"),
                SubscriptionUpdate::default(),
                DeliveryUpdate {
                    retry_policy: Some(Some(policy)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(updated.retry_policy, Some(policy));
    }
    let b = open(dir.path());
    let got = b.get_subscription(&subn("s")).unwrap();
    assert_eq!(got.retry_policy.unwrap().minimum_backoff, 5 * SEC);
    // The policy applies after the restart.
    b.publish(&topic("t"), vec![msg("x")]).await.unwrap();
    let t0 = Instant::now();
    let d = b.pull_at(&subn("s"), 1, t0).unwrap();
    b.modify_ack_deadline_at(&subn("s"), &ids(&d), 0, t0)
        .unwrap();
    assert!(b.pull_at(&subn("s"), 1, t0 + 4 * SEC).unwrap().is_empty());
    assert_eq!(b.pull_at(&subn("s"), 1, t0 + 5 * SEC).unwrap().len(), 1);
    // Removing it restores immediate redelivery.
    b.update_subscription_with(
        &subn("s"),
        SubscriptionUpdate::default(),
        DeliveryUpdate {
            retry_policy: Some(None),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let t1 = t0 + 5 * SEC;
    let d = b.pull_at(&subn("s"), 1, t1 + 20 * SEC);
    assert!(d.unwrap().is_empty(), "still leased");
    b.expire_leases(t1 + 20 * SEC);
    assert_eq!(b.pull_at(&subn("s"), 1, t1 + 20 * SEC).unwrap().len(), 1);
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dead_letter_policy_forwards_after_max_attempts_with_googles_attributes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path());
        make_topic(&b, "work").await;
        make_topic(&b, "dlq").await;
        b.create_subscription(sub_config("dlq-sub", "dlq"))
            .await
            .unwrap();
        b.create_subscription(SubscriptionConfig {
            dead_letter_policy: DeadLetterPolicy::new(&topic("dlq").to_string(), 5).unwrap(),
            ..sub_config("worker", "work")
        })
        .await
        .unwrap();
        b.publish(
            &topic("work"),
            vec![with_attrs("poison", &[("k", "v")]), msg("fine")],
        )
        .await
        .unwrap();
        let mut t = Instant::now();
        for attempt in 1..=5 {
            let got = b.pull_at(&subn("worker"), 10, t).unwrap();
            let poison: Vec<&Delivered> = got
                .iter()
                .filter(|d| &d.message.data[..] == b"poison")
                .collect();
            assert_eq!(poison.len(), 1, "attempt {attempt}");
            assert_eq!(
                poison[0].delivery_attempt, attempt,
                "delivery_attempt is reported with a dead-letter policy"
            );
            let fine: Vec<String> = got
                .iter()
                .filter(|d| &d.message.data[..] == b"fine")
                .map(|d| d.ack_id.clone())
                .collect();
            if !fine.is_empty() {
                b.acknowledge(&subn("worker"), &fine).await.unwrap();
            }
            if attempt % 2 == 1 {
                b.modify_ack_deadline_at(&subn("worker"), &[poison[0].ack_id.clone()], 0, t)
                    .unwrap();
            } else {
                t += 11 * SEC;
                b.expire_leases(t);
            }
        }
        // The sixth attempt does not happen: the message moves instead.
        assert!(b.pull_at(&subn("worker"), 10, t).unwrap().is_empty());
        assert_eq!(b.forward_dead_letters().await, 1);
        assert_eq!(
            b.backlog(&subn("worker")).unwrap(),
            0,
            "acked on the source"
        );
        let dead = b.pull(&subn("dlq-sub"), 10, None).await.unwrap();
        assert_eq!(datas(&dead), ["poison"]);
        let a = &dead[0].message.attributes;
        assert_eq!(a["k"], "v", "the original attributes stay");
        assert_eq!(a["CloudPubSubDeadLetterSourceDeliveryCount"], "5");
        assert_eq!(a["CloudPubSubDeadLetterSourceSubscription"], "sub-worker");
        assert_eq!(a["CloudPubSubDeadLetterSourceSubscriptionProject"], "p");
        let when = &a["CloudPubSubDeadLetterSourceTopicPublishTime"];
        assert!(
            when.ends_with('Z') && when.contains('T'),
            "RFC 3339: {when}"
        );
        assert_eq!(
            dead[0].delivery_attempt, 0,
            "the dead-letter subscription has no policy itself"
        );
    }
    // The ack on the source is durable.
    let b = open(dir.path());
    assert_eq!(b.backlog(&subn("worker")).unwrap(), 0);
    assert_eq!(b.backlog(&subn("dlq-sub")).unwrap(), 1);
}

#[tokio::test]
async fn dead_letter_policy_is_validated_and_forwarding_retries_when_the_topic_is_gone() {
    let (_dir, b) = fresh();
    make_topic(&b, "work").await;
    let with = |topic_name: String, attempts: i32| SubscriptionConfig {
        dead_letter_policy: Some(DeadLetterPolicy {
            dead_letter_topic: topic_name,
            max_delivery_attempts: attempts,
        }),
        ..sub_config("s", "work")
    };
    for attempts in [4, 101] {
        let err = b
            .create_subscription(with(topic("work").to_string(), attempts))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(err.message.contains("between 5 and 100"), "{}", err.message);
    }
    let err = b
        .create_subscription(with("projects/p/topix/x".into(), 5))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(
        err.message.contains("dead_letter_policy"),
        "{}",
        err.message
    );
    let err = b
        .create_subscription(with(topic("missing").to_string(), 5))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound);
    make_topic(&b, "dlq").await;
    // 0 attempts means Google's default, 5.
    let created = b
        .create_subscription(with(topic("dlq").to_string(), 0))
        .await
        .unwrap();
    assert_eq!(created.dead_letter_policy.unwrap().max_delivery_attempts, 5);

    b.publish(&topic("work"), vec![msg("x")]).await.unwrap();
    let t = Instant::now();
    for _ in 0..5 {
        let d = b.pull_at(&subn("s"), 1, t).unwrap();
        b.modify_ack_deadline_at(&subn("s"), &ids(&d), 0, t)
            .unwrap();
    }
    b.delete_topic(&topic("dlq")).await.unwrap();
    assert_eq!(
        b.forward_dead_letters().await,
        0,
        "the dead-letter topic is gone"
    );
    assert_eq!(b.backlog(&subn("s")).unwrap(), 1, "nothing is lost");
    make_topic(&b, "dlq").await;
    b.create_subscription(sub_config("dlq-sub", "dlq"))
        .await
        .unwrap();
    // Retried after a pause; the message is never delivered a sixth time.
    assert!(b.pull_at(&subn("s"), 1, t + 11 * SEC).unwrap().is_empty());
    b.expire_leases(Instant::now() + 11 * SEC);
    assert!(b
        .pull_at(&subn("s"), 1, Instant::now() + 11 * SEC)
        .unwrap()
        .is_empty());
    assert_eq!(b.forward_dead_letters().await, 1);
    assert_eq!(b.backlog(&subn("s")).unwrap(), 0);
    assert_eq!(b.backlog(&subn("dlq-sub")).unwrap(), 1);
    // Removing the policy (update) is possible, and the attempts stop counting.
    let updated = b
        .update_subscription_with(
            &subn("s"),
            SubscriptionUpdate::default(),
            DeliveryUpdate {
                dead_letter_policy: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.dead_letter_policy, None);
}

// ---------------------------------------------------------------------------
// Ordering keys
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ordering_keys_deliver_in_publish_order_across_publish_calls_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path());
        make_topic(&b, "t").await;
        b.create_subscription(SubscriptionConfig {
            enable_message_ordering: true,
            ..sub_config("ordered", "t")
        })
        .await
        .unwrap();
        b.create_subscription(sub_config("unordered", "t"))
            .await
            .unwrap();
        for i in 0..3 {
            b.publish(
                &topic("t"),
                vec![
                    keyed(&format!("a{i}"), "A"),
                    keyed(&format!("b{i}"), "B"),
                    msg(&format!("u{i}")),
                ],
            )
            .await
            .unwrap();
        }
        let t = Instant::now();
        // A batch of 2 takes a0 and its successor a1; a2 is not handed out
        // while they are outstanding, B's head is.
        assert_eq!(
            datas(&b.pull_at(&subn("ordered"), 2, t).unwrap()),
            ["a0", "a1"]
        );
        let rest = b.pull_at(&subn("ordered"), 100, t).unwrap();
        assert_eq!(datas(&rest), ["b0", "b1", "b2", "u0", "u1", "u2"]);
        // The unordered subscription hands out everything at once.
        assert_eq!(b.pull_at(&subn("unordered"), 100, t).unwrap().len(), 9);
    }
    // After a restart every unacked message is ready again, still in order.
    let b = open(dir.path());
    let t = Instant::now();
    let got = b.pull_at(&subn("ordered"), 1, t).unwrap();
    assert_eq!(datas(&got), ["a0"]);
    // Nack a0: it comes back first; a1 and a2 follow it.
    b.modify_ack_deadline_at(&subn("ordered"), &ids(&got), 0, t)
        .unwrap();
    let all = b.pull_at(&subn("ordered"), 100, t).unwrap();
    let a: Vec<String> = datas(&all)
        .into_iter()
        .filter(|d| d.starts_with('a'))
        .collect();
    assert_eq!(a, ["a0", "a1", "a2"]);
    // Nack a1 while a0 and a2 are outstanding: a1 and a2 wait for a0.
    let a1: Vec<String> = all
        .iter()
        .filter(|d| &d.message.data[..] == b"a1")
        .map(|d| d.ack_id.clone())
        .collect();
    b.modify_ack_deadline_at(&subn("ordered"), &a1, 0, t)
        .unwrap();
    assert!(b.pull_at(&subn("ordered"), 100, t).unwrap().is_empty());
    let a0: Vec<String> = all
        .iter()
        .filter(|d| &d.message.data[..] == b"a0")
        .map(|d| d.ack_id.clone())
        .collect();
    b.acknowledge(&subn("ordered"), &a0).await.unwrap();
    assert_eq!(
        datas(&b.pull_at(&subn("ordered"), 100, t).unwrap()),
        ["a1", "a2"]
    );
}

#[tokio::test]
async fn ordering_is_fixed_at_creation() {
    let (_dir, b) = fresh();
    make_topic(&b, "t").await;
    let s = b
        .create_subscription(SubscriptionConfig {
            enable_message_ordering: true,
            ..sub_config("o", "t")
        })
        .await
        .unwrap();
    assert!(s.enable_message_ordering);
    // UpdateSubscription has no way to change it (nor the filter).
    let u = SubscriptionUpdate {
        labels: Some(Default::default()),
        ..Default::default()
    };
    assert!(
        b.update_subscription(&subn("o"), u)
            .await
            .unwrap()
            .enable_message_ordering
    );
}

// ---------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn filtered_out_messages_are_never_delivered_nor_backlog_even_after_replay() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path());
        make_topic(&b, "t").await;
        let f = r#"attributes.kind = "a" OR (hasPrefix(attributes.region, "eu-") AND NOT attributes:skip)"#;
        b.create_subscription(SubscriptionConfig {
            filter: f.into(),
            ..sub_config("filtered", "t")
        })
        .await
        .unwrap();
        b.create_subscription(sub_config("all", "t")).await.unwrap();
        b.publish(
            &topic("t"),
            vec![
                with_attrs("1", &[("kind", "a")]),
                with_attrs("2", &[("kind", "b")]),
                with_attrs("3", &[("region", "eu-west")]),
                with_attrs("4", &[("region", "eu-west"), ("skip", "")]),
                with_attrs("5", &[("region", "us-east")]),
                msg("6"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            b.backlog(&subn("filtered")).unwrap(),
            2,
            "non-matching messages are not backlog"
        );
        assert_eq!(b.backlog(&subn("all")).unwrap(), 6);
        assert_eq!(b.get_subscription(&subn("filtered")).unwrap().filter, f);
    }
    let b = open(dir.path());
    assert_eq!(
        b.backlog(&subn("filtered")).unwrap(),
        2,
        "replay applies the same filter"
    );
    assert_eq!(
        datas(&b.pull(&subn("filtered"), 100, None).await.unwrap()),
        ["1", "3"]
    );
}

#[tokio::test]
async fn bad_filters_are_invalid_argument_with_a_position() {
    let (_dir, b) = fresh();
    make_topic(&b, "t").await;
    for (f, pos) in [
        ("attributes.k = ", 15),
        ("attributes.k = \"v\" AND", 22),
        ("kind = \"x\"", 0),
    ] {
        let err = b
            .create_subscription(SubscriptionConfig {
                filter: f.into(),
                ..sub_config("bad", "t")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{f}");
        assert!(
            err.message.contains(&format!("position {pos}")),
            "{f}: {}",
            err.message
        );
    }
    assert_eq!(
        b.get_subscription(&subn("bad")).unwrap_err().code,
        Code::NotFound
    );
}

// ---------------------------------------------------------------------------
// Exactly-once delivery
// ---------------------------------------------------------------------------

#[tokio::test]
async fn exactly_once_rejects_expired_and_superseded_ack_ids() {
    let (_dir, b) = fresh();
    make_topic(&b, "t").await;
    b.create_subscription(SubscriptionConfig {
        enable_exactly_once_delivery: true,
        ..sub_config("eod", "t")
    })
    .await
    .unwrap();
    b.create_subscription(sub_config("plain", "t"))
        .await
        .unwrap();
    b.publish(&topic("t"), vec![msg("1"), msg("2"), msg("3")])
        .await
        .unwrap();

    let got = b.pull(&subn("eod"), 3, None).await.unwrap();
    // A valid ack is confirmed.
    let r = b
        .acknowledge_confirmed(&subn("eod"), &[got[0].ack_id.clone()])
        .await
        .unwrap();
    assert!(r.exactly_once);
    assert_eq!(
        (r.succeeded, r.invalid),
        (vec![got[0].ack_id.clone()], vec![])
    );
    // Acking it again fails: the message is already acked.
    let r = b
        .acknowledge_confirmed(&subn("eod"), &[got[0].ack_id.clone()])
        .await
        .unwrap();
    assert_eq!(r.invalid, [got[0].ack_id.clone()]);
    // An expired lease's ack id fails, and the message stays owed.
    b.expire_leases(Instant::now() + 11 * SEC);
    let r = b
        .acknowledge_confirmed(&subn("eod"), &ids(&got[1..]))
        .await
        .unwrap();
    assert_eq!(r.invalid, ids(&got[1..]));
    assert!(r.succeeded.is_empty());
    assert_eq!(b.backlog(&subn("eod")).unwrap(), 2);
    // Redelivered: the old ack id is superseded, the new one works; a
    // malformed one in the same request is reported, not fatal.
    let again = b.pull(&subn("eod"), 3, None).await.unwrap();
    assert_eq!(again.len(), 2);
    let mut mixed = vec![
        got[1].ack_id.clone(),
        again[0].ack_id.clone(),
        "garbage".to_string(),
    ];
    mixed.push(again[0].ack_id.clone()); // the same id twice is one ack
    let r = b.acknowledge_confirmed(&subn("eod"), &mixed).await.unwrap();
    assert_eq!(
        r.succeeded,
        [again[0].ack_id.clone(), again[0].ack_id.clone()]
    );
    assert_eq!(r.invalid, [got[1].ack_id.clone(), "garbage".to_string()]);
    // Modacks are checked the same way.
    let r = b
        .modify_ack_deadline_confirmed(
            &subn("eod"),
            &[got[2].ack_id.clone(), again[1].ack_id.clone()],
            60,
        )
        .unwrap();
    assert_eq!(
        (r.succeeded, r.invalid),
        (vec![again[1].ack_id.clone()], vec![got[2].ack_id.clone()])
    );
    b.expire_leases(Instant::now() + 30 * SEC);
    assert!(
        b.pull(&subn("eod"), 3, None).await.unwrap().is_empty(),
        "the extension held"
    );
    assert_eq!(b.backlog(&subn("eod")).unwrap(), 1);

    // Without exactly-once an expired lease's ack still counts, as before.
    let plain = b.pull(&subn("plain"), 3, None).await.unwrap();
    b.expire_leases(Instant::now() + 11 * SEC);
    let r = b
        .acknowledge_confirmed(&subn("plain"), &ids(&plain))
        .await
        .unwrap();
    assert!(!r.exactly_once && r.invalid.is_empty());
    assert_eq!(b.backlog(&subn("plain")).unwrap(), 0);
    assert_eq!(
        b.acknowledge(&subn("plain"), &["garbage".into()])
            .await
            .unwrap_err()
            .code,
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn exactly_once_can_be_switched_by_update() {
    let (_dir, b) = fresh();
    make_topic(&b, "t").await;
    b.create_subscription(sub_config("s", "t")).await.unwrap();
    let stream = b.open_stream(&subn("s"), 10, 0, 0).unwrap();
    assert!(!stream.properties().exactly_once_delivery);
    let u = b
        .update_subscription_with(
            &subn("s"),
            SubscriptionUpdate::default(),
            DeliveryUpdate {
                enable_exactly_once_delivery: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(u.enable_exactly_once_delivery);
    assert!(stream.properties().exactly_once_delivery);
    assert!(!stream.properties().message_ordering);
}

/// The dashboard's summary: backlog per subscription, the publish time of
/// its oldest unacked message, and the count going down as acks arrive.
#[tokio::test]
async fn overview_counts_backlog_and_oldest_unacked() {
    let (_dir, b) = fresh();
    make_topic(&b, "ov").await;
    make_topic(&b, "ov-empty").await;
    b.create_subscription(sub_config("ov-a", "ov"))
        .await
        .unwrap();
    b.create_subscription(sub_config("ov-b", "ov"))
        .await
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    b.publish(&topic("ov"), vec![msg("1"), msg("2"), msg("3")])
        .await
        .unwrap();
    let got = b.pull_at(&subn("ov-a"), 2, Instant::now()).unwrap();
    assert_eq!(got.len(), 2);
    b.acknowledge(&subn("ov-a"), &ids(&got)).await.unwrap();

    let (topics, subs) = b.overview();
    let t: Vec<_> = topics
        .iter()
        .map(|t| (t.name.as_str(), t.subscriptions))
        .collect();
    assert_eq!(
        t,
        [
            ("projects/p/topics/topic-ov", 2),
            ("projects/p/topics/topic-ov-empty", 0)
        ]
    );
    let s: Vec<_> = subs.iter().map(|s| (s.name.as_str(), s.backlog)).collect();
    assert_eq!(
        s,
        [
            ("projects/p/subscriptions/sub-ov-a", 1),
            ("projects/p/subscriptions/sub-ov-b", 3)
        ]
    );
    for s in &subs {
        let oldest = s
            .oldest_unacked_nanos
            .expect("a backlog has an oldest message");
        assert!(oldest >= before, "{} {oldest} < {before}", s.name);
        assert_eq!(s.topic, "projects/p/topics/topic-ov");
        assert!(!s.push);
    }
    // Everything acked: no backlog, no oldest message.
    let rest = b.pull_at(&subn("ov-a"), 10, Instant::now()).unwrap();
    b.acknowledge(&subn("ov-a"), &ids(&rest)).await.unwrap();
    let (_, subs) = b.overview();
    assert_eq!(subs[0].backlog, 0);
    assert_eq!(subs[0].oldest_unacked_nanos, None);
}
