//! Push subscriptions through both surfaces: create with a push config,
//! ModifyPushConfig (REST `:modifyPushConfig` and gRPC) between push and
//! pull, and Pull refused on a push subscription as Google refuses it.

mod common;

use std::time::Duration;

use axum::body::Bytes;
use common::start;
use pubrun_api::pb;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(30);

/// An endpoint that acks everything and hands each JSON body to the test.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
            "ok"
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/push"), rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .expect("no push in time")
        .unwrap()
}

#[tokio::test]
async fn modify_push_config_over_rest() {
    use reqwest::Method;
    let s = start().await;
    let (endpoint, mut rx) = receiver().await;
    let (code, _) = s
        .rest(Method::PUT, "/v1/projects/p/topics/topic-r", json!({}))
        .await;
    assert_eq!(code, 200);
    let (code, body) = s
        .rest(
            Method::PUT,
            "/v1/projects/p/subscriptions/sub-r",
            json!({"topic": "projects/p/topics/topic-r", "pushConfig": {"pushEndpoint": endpoint, "attributes": {"x-goog-version": "v1"}}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["pushConfig"]["pushEndpoint"], endpoint);
    assert_eq!(body["pushConfig"]["attributes"]["x-goog-version"], "v1");

    let publish = |data: &str| json!({"messages": [{"data": base64_of(data)}]});
    s.rest(
        Method::POST,
        "/v1/projects/p/topics/topic-r:publish",
        publish("one"),
    )
    .await;
    let got = next(&mut rx).await;
    assert_eq!(got["message"]["data"], base64_of("one"));
    assert_eq!(got["subscription"], "projects/p/subscriptions/sub-r");

    // Pull on a push subscription: FAILED_PRECONDITION, as Google.
    let (code, body) = s
        .rest(
            Method::POST,
            "/v1/projects/p/subscriptions/sub-r:pull",
            json!({"maxMessages": 1}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["status"], "FAILED_PRECONDITION");

    // Authenticated push is refused by name.
    let (code, body) = s
        .rest(
            Method::POST,
            "/v1/projects/p/subscriptions/sub-r:modifyPushConfig",
            json!({"pushConfig": {"pushEndpoint": endpoint, "oidcToken": {"serviceAccountEmail": "a@b.c"}}}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("oidc_token"),
        "{body}"
    );

    // An empty push config switches to pull.
    let (code, body) = s
        .rest(
            Method::POST,
            "/v1/projects/p/subscriptions/sub-r:modifyPushConfig",
            json!({"pushConfig": {}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (_, body) = s
        .rest(Method::GET, "/v1/projects/p/subscriptions/sub-r", json!({}))
        .await;
    assert_eq!(body["pushConfig"], json!({}), "{body}");
    s.rest(
        Method::POST,
        "/v1/projects/p/topics/topic-r:publish",
        publish("two"),
    )
    .await;
    let (code, body) = s
        .rest(
            Method::POST,
            "/v1/projects/p/subscriptions/sub-r:pull",
            json!({"maxMessages": 10}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["receivedMessages"][0]["message"]["data"],
        base64_of("two")
    );
    assert!(rx.try_recv().is_err(), "a pull subscription must not push");
}

#[tokio::test]
async fn modify_push_config_over_grpc() {
    let mut s = start().await;
    let (endpoint, mut rx) = receiver().await;
    let topic = "projects/p/topics/topic-g".to_string();
    let sub = "projects/p/subscriptions/sub-g".to_string();
    s.grpc_topic(pb::Topic {
        name: topic.clone(),
        ..Default::default()
    })
    .await;
    let created = s
        .grpc_sub(pb::Subscription {
            name: sub.clone(),
            topic: topic.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.push_config.unwrap().push_endpoint, "");

    s.subscriber
        .modify_push_config(pb::ModifyPushConfigRequest {
            subscription: sub.clone(),
            push_config: Some(pb::PushConfig {
                push_endpoint: endpoint.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let got = s.grpc_get_sub(&sub).await;
    assert_eq!(got.push_config.unwrap().push_endpoint, endpoint);

    s.grpc_publish(&topic, &["pushed"]).await;
    let body = next(&mut rx).await;
    assert_eq!(body["message"]["data"], base64_of("pushed"));

    #[allow(deprecated)]
    let err = s
        .subscriber
        .pull(pb::PullRequest {
            subscription: sub.clone(),
            max_messages: 1,
            return_immediately: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // Switch back to pull through UpdateSubscription with a push_config mask.
    s.subscriber
        .update_subscription(pb::UpdateSubscriptionRequest {
            subscription: Some(pb::Subscription {
                name: sub.clone(),
                push_config: Some(pb::PushConfig::default()),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["push_config".into()],
            }),
        })
        .await
        .unwrap();
    s.grpc_publish(&topic, &["pulled"]).await;
    let pulled = s
        .subscriber
        .pull(pb::PullRequest {
            subscription: sub,
            max_messages: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        &pulled.received_messages[0].message.as_ref().unwrap().data[..],
        b"pulled"
    );
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
