//! Retry policy, dead letters, ordering keys, filters and exactly-once
//! delivery through both surfaces (gRPC with the generated client, REST over
//! HTTP) of an in-process server on port 0.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{next_response, start, Server};
use pubrun_api::grpc::{ErrorInfo, RpcStatus};
use pubrun_api::pb;
use serde_json::{json, Value};

const P: &str = "projects/sem";

fn topic(id: &str) -> String {
    format!("{P}/topics/{id}")
}

fn sub(id: &str) -> String {
    format!("{P}/subscriptions/{id}")
}

impl Server {
    async fn create_topic(&self, id: &str) {
        self.grpc_topic(pb::Topic {
            name: topic(id),
            ..Default::default()
        })
        .await;
    }

    async fn publish(&self, t: &str, messages: Vec<pb::PubsubMessage>) -> Vec<String> {
        let r = self
            .publisher
            .clone()
            .publish(pb::PublishRequest {
                topic: topic(t),
                messages,
            })
            .await
            .unwrap();
        r.into_inner().message_ids
    }

    #[allow(deprecated)]
    async fn pull(&self, s: &str, max: i32) -> Vec<pb::ReceivedMessage> {
        let r = self
            .subscriber
            .clone()
            .pull(pb::PullRequest {
                subscription: sub(s),
                max_messages: max,
                return_immediately: true,
            })
            .await
            .unwrap();
        r.into_inner().received_messages
    }

    /// Pulls until `n` messages arrived or `timeout` passed.
    async fn pull_n(&self, s: &str, n: usize, timeout: Duration) -> Vec<pb::ReceivedMessage> {
        let until = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < until {
            got.extend(self.pull(s, 100).await);
            if got.len() < n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        got
    }

    async fn modack(&self, s: &str, ack_ids: Vec<String>, secs: i32) -> Result<(), tonic::Status> {
        let r = pb::ModifyAckDeadlineRequest {
            subscription: sub(s),
            ack_ids,
            ack_deadline_seconds: secs,
        };
        self.subscriber
            .clone()
            .modify_ack_deadline(r)
            .await
            .map(|_| ())
    }

    async fn ack(&self, s: &str, ack_ids: Vec<String>) -> Result<(), tonic::Status> {
        self.subscriber
            .clone()
            .acknowledge(pb::AcknowledgeRequest {
                subscription: sub(s),
                ack_ids,
            })
            .await
            .map(|_| ())
    }
}

fn data(m: &str) -> pb::PubsubMessage {
    pb::PubsubMessage {
        data: m.to_string().into(),
        ..Default::default()
    }
}

fn attrs(m: &str, a: &[(&str, &str)]) -> pb::PubsubMessage {
    pb::PubsubMessage {
        data: m.to_string().into(),
        attributes: a
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn text(r: &pb::ReceivedMessage) -> String {
    String::from_utf8(r.message.as_ref().unwrap().data.to_vec()).unwrap()
}

fn plain_sub(id: &str, t: &str) -> pb::Subscription {
    pb::Subscription {
        name: sub(id),
        topic: topic(t),
        ..Default::default()
    }
}

fn error_info(s: &tonic::Status) -> ErrorInfo {
    use prost::Message as _;
    let st =
        RpcStatus::decode(s.details()).expect("grpc-status-details-bin is a google.rpc.Status");
    assert_eq!(
        (st.code, st.message.as_str()),
        (tonic::Code::InvalidArgument as i32, s.message())
    );
    assert_eq!(
        st.details[0].type_url,
        "type.googleapis.com/google.rpc.ErrorInfo"
    );
    ErrorInfo::decode(&st.details[0].value[..]).unwrap()
}

#[tokio::test]
async fn grpc_subscription_settings_round_trip_with_googles_defaults() {
    let s = start().await;
    s.create_topic("work").await;
    s.create_topic("dead").await;
    let created = s
        .grpc_sub(pb::Subscription {
            retry_policy: Some(pb::RetryPolicy {
                minimum_backoff: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                maximum_backoff: None,
            }),
            dead_letter_policy: Some(pb::DeadLetterPolicy {
                dead_letter_topic: topic("dead"),
                max_delivery_attempts: 0,
            }),
            enable_message_ordering: true,
            filter: "attributes:k".into(),
            enable_exactly_once_delivery: true,
            ..plain_sub("all-settings", "work")
        })
        .await
        .unwrap();
    let got = s.grpc_get_sub(&sub("all-settings")).await;
    for x in [created, got] {
        let r = x.retry_policy.unwrap();
        assert_eq!(
            r.minimum_backoff,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            r.maximum_backoff,
            Some(prost_types::Duration {
                seconds: 600,
                nanos: 0
            }),
            "Google's default"
        );
        let d = x.dead_letter_policy.unwrap();
        assert_eq!(
            (d.dead_letter_topic.as_str(), d.max_delivery_attempts),
            (topic("dead").as_str(), 5)
        );
        assert!(x.enable_message_ordering && x.enable_exactly_once_delivery);
        assert_eq!(x.filter, "attributes:k");
    }
    // Invalid settings are INVALID_ARGUMENT with a message saying what to fix.
    let bad = |f: fn(&mut pb::Subscription)| {
        let mut x = plain_sub("bad", "work");
        f(&mut x);
        x
    };
    for (x, says) in [
        (bad(|x| x.filter = "attributes.k = ".into()), "position 15"),
        (
            bad(|x| x.filter = "attributes.k = 'v' AND attributes.j = 'w' OR attributes:z".into()),
            "position",
        ),
        (
            bad(|x| {
                x.dead_letter_policy = Some(pb::DeadLetterPolicy {
                    dead_letter_topic: topic("dead"),
                    max_delivery_attempts: 3,
                })
            }),
            "between 5 and 100",
        ),
        (
            bad(|x| {
                x.retry_policy = Some(pb::RetryPolicy {
                    minimum_backoff: Some(prost_types::Duration {
                        seconds: 601,
                        nanos: 0,
                    }),
                    maximum_backoff: None,
                })
            }),
            "minimum_backoff",
        ),
    ] {
        let e = s.grpc_sub(x).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(says),
            "{} should say {says}",
            e.message()
        );
    }
    let e = s
        .grpc_sub(bad(|x| {
            x.dead_letter_policy = Some(pb::DeadLetterPolicy {
                dead_letter_topic: topic("nope"),
                max_delivery_attempts: 5,
            })
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Filter and ordering cannot be updated; retry policy, dead letters and exactly-once can.
    let update = |paths: &[&str], x: pb::Subscription| pb::UpdateSubscriptionRequest {
        subscription: Some(x),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    for path in ["filter", "enable_message_ordering"] {
        let e = s
            .subscriber
            .clone()
            .update_subscription(update(&[path], plain_sub("all-settings", "work")))
            .await;
        let e = e.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("cannot be changed"), "{}", e.message());
    }
    let u = s
        .subscriber
        .clone()
        .update_subscription(update(
            &[
                "retry_policy",
                "dead_letter_policy",
                "enable_exactly_once_delivery",
            ],
            plain_sub("all-settings", "work"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        u.retry_policy.is_none()
            && u.dead_letter_policy.is_none()
            && !u.enable_exactly_once_delivery
    );
    assert!(
        u.enable_message_ordering && u.filter == "attributes:k",
        "unchanged"
    );
}

#[tokio::test]
async fn grpc_dead_letters_arrive_with_attributes_and_delivery_attempt_counts() {
    let s = start().await;
    s.create_topic("work").await;
    s.create_topic("dead").await;
    s.grpc_sub(plain_sub("dead-sub", "dead")).await.unwrap();
    s.grpc_sub(pb::Subscription {
        dead_letter_policy: Some(pb::DeadLetterPolicy {
            dead_letter_topic: topic("dead"),
            max_delivery_attempts: 5,
        }),
        ..plain_sub("worker", "work")
    })
    .await
    .unwrap();
    let ids = s
        .publish("work", vec![attrs("poison", &[("origin", "test")])])
        .await;
    for attempt in 1..=5 {
        let got = s.pull_n("worker", 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "attempt {attempt}");
        assert_eq!(got[0].delivery_attempt, attempt);
        s.modack("worker", vec![got[0].ack_id.clone()], 0)
            .await
            .unwrap();
    }
    let dead = s.pull_n("dead-sub", 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "forwarded by the maintenance task");
    let m = dead[0].message.as_ref().unwrap();
    assert_eq!(text(&dead[0]), "poison");
    assert_ne!(
        m.message_id, ids[0],
        "a new message on the dead-letter topic"
    );
    assert_eq!(m.attributes["origin"], "test");
    assert_eq!(
        m.attributes["CloudPubSubDeadLetterSourceDeliveryCount"],
        "5"
    );
    assert_eq!(
        m.attributes["CloudPubSubDeadLetterSourceSubscription"],
        "worker"
    );
    assert_eq!(
        m.attributes["CloudPubSubDeadLetterSourceSubscriptionProject"],
        "sem"
    );
    assert!(m
        .attributes
        .contains_key("CloudPubSubDeadLetterSourceTopicPublishTime"));
    assert_eq!(
        dead[0].delivery_attempt, 0,
        "no dead-letter policy on dead-sub: unset"
    );
    assert!(s.pull("worker", 10).await.is_empty(), "acked on the source");
}

#[tokio::test]
async fn grpc_exactly_once_ack_errors_carry_error_info_and_streams_confirm() {
    let s = start().await;
    s.create_topic("work").await;
    s.grpc_sub(pb::Subscription {
        enable_exactly_once_delivery: true,
        ..plain_sub("eod", "work")
    })
    .await
    .unwrap();
    s.publish("work", vec![data("a"), data("b")]).await;
    let got = s.pull_n("eod", 2, Duration::from_secs(10)).await;
    let (a, b) = (got[0].ack_id.clone(), got[1].ack_id.clone());
    // Nack a: its ack id no longer holds a lease.
    s.modack("eod", vec![a.clone()], 0).await.unwrap();
    let e = s.ack("eod", vec![a.clone(), b.clone()]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let info = error_info(&e);
    assert_eq!(info.reason, "EXACTLY_ONCE_ACKID_FAILURE");
    assert_eq!(info.domain, "pubsub.googleapis.com");
    assert_eq!(
        info.metadata,
        HashMap::from([(a.clone(), "PERMANENT_FAILURE_INVALID_ACK_ID".to_string())])
    );
    // b was acked in the same request.
    let e = s.modack("eod", vec![b.clone()], 30).await.unwrap_err();
    assert!(error_info(&e).metadata.contains_key(&b));

    // StreamingPull: properties say exactly-once; acks are confirmed on the stream.
    let (tx, mut stream) = s.streaming_pull(&sub("eod")).await;
    let first = next_response(&mut stream).await;
    let props = first.subscription_properties.unwrap();
    assert!(props.exactly_once_delivery_enabled && !props.message_ordering_enabled);
    let redelivered = first.received_messages[0].ack_id.clone();
    tx.send(pb::StreamingPullRequest {
        ack_ids: vec![redelivered.clone(), a.clone()],
        modify_deadline_ack_ids: vec![b.clone()],
        modify_deadline_seconds: vec![20],
        ..Default::default()
    })
    .await
    .unwrap();
    let conf = next_response(&mut stream).await;
    let ack = conf.acknowledge_confirmation.unwrap();
    assert_eq!(
        (ack.ack_ids, ack.invalid_ack_ids),
        (vec![redelivered], vec![a])
    );
    let modack = conf.modify_ack_deadline_confirmation.unwrap();
    assert_eq!((modack.ack_ids, modack.invalid_ack_ids), (vec![], vec![b]));
    drop(tx);
}

#[tokio::test]
async fn grpc_ordered_stream_reports_ordering_and_delivers_each_key_in_order() {
    let s = start().await;
    s.create_topic("work").await;
    s.grpc_sub(pb::Subscription {
        enable_message_ordering: true,
        ..plain_sub("ordered", "work")
    })
    .await
    .unwrap();
    let keyed = |d: &str, k: &str| pb::PubsubMessage {
        data: d.to_string().into(),
        ordering_key: k.into(),
        ..Default::default()
    };
    for i in 0..5 {
        s.publish("work", vec![keyed(&format!("x{i}"), "x")]).await;
        s.publish("work", vec![keyed(&format!("y{i}"), "y")]).await;
    }
    let (tx, mut stream) = s.streaming_pull(&sub("ordered")).await;
    let mut seen: Vec<String> = Vec::new();
    let mut nacked = false;
    while seen.len() < 10 {
        let r = next_response(&mut stream).await;
        assert!(r.subscription_properties.unwrap().message_ordering_enabled);
        let mut acks = Vec::new();
        let mut skip_x = false;
        for m in &r.received_messages {
            let t = text(m);
            if skip_x && t.starts_with('x') {
                continue; // comes again after x2
            }
            if t == "x2" && !nacked {
                // Nack x2 once: it and everything after it of key x come again.
                nacked = true;
                tx.send(pb::StreamingPullRequest {
                    modify_deadline_ack_ids: vec![m.ack_id.clone()],
                    modify_deadline_seconds: vec![0],
                    ..Default::default()
                })
                .await
                .unwrap();
                skip_x = true;
                continue;
            }
            seen.push(t);
            acks.push(m.ack_id.clone());
        }
        if !acks.is_empty() {
            tx.send(pb::StreamingPullRequest {
                ack_ids: acks,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    for key in ["x", "y"] {
        let order: Vec<&String> = seen.iter().filter(|t| t.starts_with(key)).collect();
        let want: Vec<String> = (0..5).map(|i| format!("{key}{i}")).collect();
        assert_eq!(
            order,
            want.iter().collect::<Vec<_>>(),
            "key {key} in publish order"
        );
    }
}

#[tokio::test]
async fn rest_settings_filters_retry_and_exactly_once() {
    use reqwest::Method;
    let s = start().await;
    s.create_topic("work").await;
    s.create_topic("dead").await;
    let (code, body) = s
        .rest(
            Method::PUT,
            "/v1/projects/sem/subscriptions/rest-sub",
            json!({
                "topic": topic("work"),
                "retryPolicy": {"minimumBackoff": "1s", "maximumBackoff": "2.500s"},
                "deadLetterPolicy": {"deadLetterTopic": topic("dead"), "maxDeliveryAttempts": 7},
                "filter": "attributes.kind = \"keep\"",
                "enableExactlyOnceDelivery": true,
            }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["retryPolicy"],
        json!({"minimumBackoff": "1s", "maximumBackoff": "2.500s"})
    );
    assert_eq!(
        body["deadLetterPolicy"],
        json!({"deadLetterTopic": topic("dead"), "maxDeliveryAttempts": 7})
    );
    assert_eq!(body["filter"], "attributes.kind = \"keep\"");
    assert_eq!(body["enableExactlyOnceDelivery"], true);
    assert!(body.get("enableMessageOrdering").is_none());

    let (code, body) = s
        .rest(
            Method::PUT,
            "/v1/projects/sem/subscriptions/bad-filter",
            json!({"topic": topic("work"), "filter": "attributes."}),
        )
        .await;
    assert_eq!(
        (code, body["error"]["status"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("position 11"),
        "{body}"
    );
    let (code, body) = s
        .rest(
            Method::PATCH,
            "/v1/projects/sem/subscriptions/rest-sub",
            json!({"subscription": {"enableMessageOrdering": true}, "updateMask": "enableMessageOrdering"}),
        )
        .await;
    assert_eq!(code, 400, "{body}");

    s.publish(
        "work",
        vec![
            attrs("drop", &[("kind", "other")]),
            attrs("keep", &[("kind", "keep")]),
        ],
    )
    .await;
    let got = rest_pull(&s).await;
    assert_eq!(got.len(), 1, "the filter drops the other message: {got:?}");
    assert_eq!(
        got[0]["deliveryAttempt"], 1,
        "dead-letter policy: deliveryAttempt is set"
    );
    let first_ack = got[0]["ackId"].as_str().unwrap().to_string();

    // Nack; with minimumBackoff 1s it is not back at once, but within a few seconds.
    let nacked_at = Instant::now();
    let (code, _) = s
        .rest(
            Method::POST,
            "/v1/projects/sem/subscriptions/rest-sub:modifyAckDeadline",
            json!({"ackIds": [first_ack.clone()], "ackDeadlineSeconds": 0}),
        )
        .await;
    assert_eq!(code, 200);
    assert!(
        rest_pull(&s).await.is_empty(),
        "backoff: not redelivered immediately"
    );
    let mut again = Vec::new();
    while again.is_empty() && nacked_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = rest_pull(&s).await;
    }
    let waited = nacked_at.elapsed();
    assert!(
        waited >= Duration::from_millis(950),
        "redelivered after {waited:?}, before minimumBackoff"
    );
    assert_eq!(again.len(), 1, "redelivered after the backoff");
    assert_eq!(again[0]["deliveryAttempt"], 2);

    // Exactly-once: the superseded ack id fails with Google's details; the new one succeeds.
    let (code, body) = s
        .rest(
            Method::POST,
            "/v1/projects/sem/subscriptions/rest-sub:acknowledge",
            json!({"ackIds": [first_ack.clone()]}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    let e = &body["error"];
    assert_eq!(e["status"], "INVALID_ARGUMENT");
    assert_eq!(
        e["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );
    assert_eq!(e["details"][0]["reason"], "EXACTLY_ONCE_ACKID_FAILURE");
    assert_eq!(
        e["details"][0]["metadata"][&first_ack],
        "PERMANENT_FAILURE_INVALID_ACK_ID"
    );
    let (code, body) = s
        .rest(
            Method::POST,
            "/v1/projects/sem/subscriptions/rest-sub:acknowledge",
            json!({"ackIds": [again[0]["ackId"]]}),
        )
        .await;
    assert_eq!((code, body), (200, json!({})));
}

async fn rest_pull(s: &Server) -> Vec<Value> {
    let (code, body) = s
        .rest(
            reqwest::Method::POST,
            "/v1/projects/sem/subscriptions/rest-sub:pull",
            json!({"maxMessages": 10, "returnImmediately": true}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    body["receivedMessages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}
