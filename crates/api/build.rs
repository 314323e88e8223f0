//! Generates tonic server stubs for `google.pubsub.v1.Publisher` and
//! `Subscriber`. The message types come ready-made from the maintained
//! `googleapis-tonic-google-pubsub-v1` crate (generated from Google's own
//! protos); that crate ships only clients, so we describe the two services'
//! methods here and let tonic-build emit the server side. No protoc needed.

use tonic_build::manual::{Builder, Method, Service};

const PB: &str = "googleapis_tonic_google_pubsub_v1::google::pubsub::v1";

fn method(name: &str, route: &str, input: &str, output: &str) -> Method {
    let ty = |t: &str| {
        if t == "Empty" {
            "crate::Empty".to_string()
        } else {
            format!("{PB}::{t}")
        }
    };
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type(ty(input))
        .output_type(ty(output))
        .codec_path("crate::codec::ProstCodec")
        .build()
}

fn main() {
    let publisher = Service::builder()
        .name("Publisher")
        .package("google.pubsub.v1")
        .method(method("create_topic", "CreateTopic", "Topic", "Topic"))
        .method(method(
            "update_topic",
            "UpdateTopic",
            "UpdateTopicRequest",
            "Topic",
        ))
        .method(method(
            "publish",
            "Publish",
            "PublishRequest",
            "PublishResponse",
        ))
        .method(method("get_topic", "GetTopic", "GetTopicRequest", "Topic"))
        .method(method(
            "list_topics",
            "ListTopics",
            "ListTopicsRequest",
            "ListTopicsResponse",
        ))
        .method(method(
            "list_topic_subscriptions",
            "ListTopicSubscriptions",
            "ListTopicSubscriptionsRequest",
            "ListTopicSubscriptionsResponse",
        ))
        .method(method(
            "list_topic_snapshots",
            "ListTopicSnapshots",
            "ListTopicSnapshotsRequest",
            "ListTopicSnapshotsResponse",
        ))
        .method(method(
            "delete_topic",
            "DeleteTopic",
            "DeleteTopicRequest",
            "Empty",
        ))
        .method(method(
            "detach_subscription",
            "DetachSubscription",
            "DetachSubscriptionRequest",
            "DetachSubscriptionResponse",
        ))
        .build();

    let streaming_pull = Method::builder()
        .name("streaming_pull")
        .route_name("StreamingPull")
        .input_type(format!("{PB}::StreamingPullRequest"))
        .output_type(format!("{PB}::StreamingPullResponse"))
        .codec_path("crate::codec::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();

    let subscriber = Service::builder()
        .name("Subscriber")
        .package("google.pubsub.v1")
        .method(method(
            "create_subscription",
            "CreateSubscription",
            "Subscription",
            "Subscription",
        ))
        .method(method(
            "get_subscription",
            "GetSubscription",
            "GetSubscriptionRequest",
            "Subscription",
        ))
        .method(method(
            "update_subscription",
            "UpdateSubscription",
            "UpdateSubscriptionRequest",
            "Subscription",
        ))
        .method(method(
            "list_subscriptions",
            "ListSubscriptions",
            "ListSubscriptionsRequest",
            "ListSubscriptionsResponse",
        ))
        .method(method(
            "delete_subscription",
            "DeleteSubscription",
            "DeleteSubscriptionRequest",
            "Empty",
        ))
        .method(method(
            "modify_ack_deadline",
            "ModifyAckDeadline",
            "ModifyAckDeadlineRequest",
            "Empty",
        ))
        .method(method(
            "acknowledge",
            "Acknowledge",
            "AcknowledgeRequest",
            "Empty",
        ))
        .method(method("pull", "Pull", "PullRequest", "PullResponse"))
        .method(streaming_pull)
        .method(method(
            "modify_push_config",
            "ModifyPushConfig",
            "ModifyPushConfigRequest",
            "Empty",
        ))
        .method(method(
            "get_snapshot",
            "GetSnapshot",
            "GetSnapshotRequest",
            "Snapshot",
        ))
        .method(method(
            "list_snapshots",
            "ListSnapshots",
            "ListSnapshotsRequest",
            "ListSnapshotsResponse",
        ))
        .method(method(
            "create_snapshot",
            "CreateSnapshot",
            "CreateSnapshotRequest",
            "Snapshot",
        ))
        .method(method(
            "update_snapshot",
            "UpdateSnapshot",
            "UpdateSnapshotRequest",
            "Snapshot",
        ))
        .method(method(
            "delete_snapshot",
            "DeleteSnapshot",
            "DeleteSnapshotRequest",
            "Empty",
        ))
        .method(method("seek", "Seek", "SeekRequest", "SeekResponse"))
        .build();

    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[publisher, subscriber]);
}
