//! Retention, snapshots and Seek over gRPC and REST against an in-process server.

mod common;

use common::{start, Server};
use pubrun_api::pb;
use serde_json::json;
use tonic::Code;

const P: &str = "projects/seek";

fn dur(secs: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: secs,
        nanos: 0,
    }
}

impl Server {
    /// Pulls what is ready, acks it, returns the sorted data.
    #[allow(deprecated)]
    async fn drain(&mut self, sub: &str) -> Vec<String> {
        let got = self
            .subscriber
            .pull(pb::PullRequest {
                subscription: sub.to_string(),
                return_immediately: true,
                max_messages: 100,
            })
            .await
            .unwrap()
            .into_inner()
            .received_messages;
        if !got.is_empty() {
            self.subscriber
                .acknowledge(pb::AcknowledgeRequest {
                    subscription: sub.to_string(),
                    ack_ids: got.iter().map(|m| m.ack_id.clone()).collect(),
                })
                .await
                .unwrap();
        }
        let mut out: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8(m.message.as_ref().unwrap().data.to_vec()).unwrap())
            .collect();
        out.sort();
        out
    }
}

#[tokio::test]
async fn grpc_retention_settings_seek_and_snapshots() {
    let mut s = start().await;
    let topic = format!("{P}/topics/orders");
    let sub = format!("{P}/subscriptions/orders-sub");
    let created = s
        .grpc_topic(pb::Topic {
            name: topic.clone(),
            message_retention_duration: Some(dur(3600)),
            ..Default::default()
        })
        .await;
    assert_eq!(created.message_retention_duration, Some(dur(3600)));
    let err = s
        .publisher
        .create_topic(pb::Topic {
            name: format!("{P}/topics/too-long"),
            message_retention_duration: Some(dur(32 * 86400)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let created = s
        .subscriber
        .create_subscription(pb::Subscription {
            name: sub.clone(),
            topic: topic.clone(),
            retain_acked_messages: true,
            message_retention_duration: Some(dur(1200)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.retain_acked_messages);
    assert_eq!(created.message_retention_duration, Some(dur(1200)));
    assert_eq!(created.topic_message_retention_duration, Some(dur(3600)));
    let got = s.grpc_get_sub(&sub).await;
    assert!(got.retain_acked_messages);
    assert_eq!(got.message_retention_duration, Some(dur(1200)));

    s.grpc_publish(&topic, &["a", "b"]).await;
    assert_eq!(s.drain(&sub).await, ["a", "b"]);
    assert!(s.drain(&sub).await.is_empty());

    // Seek to the epoch: the acked messages come back.
    s.subscriber
        .seek(pb::SeekRequest {
            subscription: sub.clone(),
            target: Some(pb::seek_request::Target::Time(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            })),
        })
        .await
        .unwrap();
    assert_eq!(s.drain(&sub).await, ["a", "b"]);

    // A snapshot with an empty backlog holds everything published after it.
    let snap_name = format!("{P}/snapshots/before-c");
    let snap = s
        .subscriber
        .create_snapshot(pb::CreateSnapshotRequest {
            name: snap_name.clone(),
            subscription: sub.clone(),
            labels: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.name, snap_name);
    assert_eq!(snap.topic, topic);
    assert_eq!(snap.labels.get("k").map(String::as_str), Some("v"));
    let expire = snap.expire_time.unwrap().seconds;
    let now = chrono::Utc::now().timestamp();
    assert!((expire - (now + 7 * 86400)).abs() < 120, "expire {expire}");
    let err = s
        .subscriber
        .create_snapshot(pb::CreateSnapshotRequest {
            name: snap_name.clone(),
            subscription: sub.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = s
        .subscriber
        .create_snapshot(pb::CreateSnapshotRequest {
            name: format!("{P}/snapshots/other"),
            subscription: format!("{P}/subscriptions/missing"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = s
        .subscriber
        .create_snapshot(pb::CreateSnapshotRequest {
            name: format!("{P}/snapshots/tagged"),
            subscription: sub.clone(),
            tags: [("t".to_string(), "v".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tags"));

    s.grpc_publish(&topic, &["c"]).await;
    assert_eq!(s.drain(&sub).await, ["c"]);
    s.subscriber
        .seek(pb::SeekRequest {
            subscription: sub.clone(),
            target: Some(pb::seek_request::Target::Snapshot(snap_name.clone())),
        })
        .await
        .unwrap();
    assert_eq!(s.drain(&sub).await, ["c"]);

    let listed = s
        .subscriber
        .list_snapshots(pb::ListSnapshotsRequest {
            project: P.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.snapshots.len(), 1);
    let by_topic = s
        .publisher
        .list_topic_snapshots(pb::ListTopicSnapshotsRequest {
            topic: topic.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_topic.snapshots, vec![snap_name.clone()]);

    let updated = s
        .subscriber
        .update_snapshot(pb::UpdateSnapshotRequest {
            snapshot: Some(pb::Snapshot {
                name: snap_name.clone(),
                labels: [("k".to_string(), "w".to_string())].into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.labels.get("k").map(String::as_str), Some("w"));
    let err = s
        .subscriber
        .update_snapshot(pb::UpdateSnapshotRequest {
            snapshot: Some(pb::Snapshot {
                name: snap_name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["expire_time".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = s
        .subscriber
        .seek(pb::SeekRequest {
            subscription: sub.clone(),
            target: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    s.subscriber
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot: snap_name.clone(),
        })
        .await
        .unwrap();
    let err = s
        .subscriber
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot: snap_name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = s
        .subscriber
        .seek(pb::SeekRequest {
            subscription: sub.clone(),
            target: Some(pb::seek_request::Target::Snapshot(snap_name)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn rest_snapshots_and_seek() {
    use reqwest::Method;
    let mut s = start().await;
    let topic = format!("{P}/topics/rest-topic");
    let sub = format!("{P}/subscriptions/rest-sub");
    let (st, body) = s
        .rest(Method::PUT, &format!("/v1/{topic}"), Some(json!({})))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = s
        .rest(
            Method::PUT,
            &format!("/v1/{sub}"),
            Some(json!({"topic": topic, "retainAckedMessages": true, "messageRetentionDuration": "3600s"})),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["retainAckedMessages"], json!(true));
    assert_eq!(body["messageRetentionDuration"], json!("3600s"));

    s.grpc_publish(&topic, &["x", "y"]).await;
    assert_eq!(s.drain(&sub).await, ["x", "y"]);
    let (st, body) = s
        .rest(
            Method::POST,
            &format!("/v1/{sub}:seek"),
            Some(json!({"time": "2000-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!((st, &body), (200, &json!({})));
    assert_eq!(s.drain(&sub).await, ["x", "y"]);

    // PUT /v1/projects/P/snapshots/S creates from a subscription.
    let snap = format!("{P}/snapshots/rest-snap");
    s.grpc_publish(&topic, &["z"]).await;
    let (st, body) = s
        .rest(
            Method::PUT,
            &format!("/v1/{snap}"),
            Some(json!({"subscription": sub, "labels": {"team": "a"}})),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["name"], json!(snap));
    assert_eq!(body["topic"], json!(topic));
    assert_eq!(body["labels"], json!({"team": "a"}));
    assert!(body["expireTime"].as_str().unwrap().ends_with('Z'));
    let (st, again) = s
        .rest(
            Method::PUT,
            &format!("/v1/{snap}"),
            Some(json!({"subscription": sub})),
        )
        .await;
    assert_eq!(st, 409);
    assert_eq!(again["error"]["status"], json!("ALREADY_EXISTS"));
    let (st, bad) = s
        .rest(
            Method::PUT,
            &format!("/v1/{P}/snapshots/bad-field"),
            Some(json!({"subscription": sub, "bogus": 1})),
        )
        .await;
    assert_eq!(st, 400, "{bad}");

    assert_eq!(s.drain(&sub).await, ["z"]);
    let (st, _) = s
        .rest(
            Method::POST,
            &format!("/v1/{sub}:seek"),
            Some(json!({"snapshot": snap})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(s.drain(&sub).await, ["z"]);

    let (st, got) = s.rest(Method::GET, &format!("/v1/{snap}"), None).await;
    assert_eq!(st, 200);
    assert_eq!(got, body);
    let (_, list) = s
        .rest(Method::GET, &format!("/v1/{P}/snapshots"), None)
        .await;
    assert_eq!(list["snapshots"], json!([body]));
    let (_, list) = s
        .rest(Method::GET, &format!("/v1/{topic}/snapshots"), None)
        .await;
    assert_eq!(list, json!({"snapshots": [snap]}));
    let (st, patched) = s
        .rest(
            Method::PATCH,
            &format!("/v1/{snap}"),
            Some(json!({"snapshot": {"labels": {"team": "b"}}, "updateMask": "labels"})),
        )
        .await;
    assert_eq!(st, 200, "{patched}");
    assert_eq!(patched["labels"], json!({"team": "b"}));

    let (st, _) = s.rest(Method::DELETE, &format!("/v1/{snap}"), None).await;
    assert_eq!(st, 200);
    let (st, gone) = s.rest(Method::GET, &format!("/v1/{snap}"), None).await;
    assert_eq!(st, 404);
    assert_eq!(gone["error"]["status"], json!("NOT_FOUND"));
    let (st, _) = s
        .rest(
            Method::POST,
            &format!("/v1/{P}/subscriptions/missing:seek"),
            Some(json!({"time": "2000-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(st, 404);
}
