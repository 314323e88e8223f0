//! The one in-process test server of the api tests: an embedded store in a
//! temp dir, a broker, `pubrun_api::serve` on a free port of 127.0.0.1, and
//! clients for both surfaces (REST over HTTP, gRPC).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use pubrun_api::pb;
use pubrun_api::pb::publisher_client::PublisherClient;
use pubrun_api::pb::subscriber_client::SubscriberClient;
use pubrun_api::ServeOptions;
use pubrun_broker::Broker;
use pubrun_store::EmbeddedStore;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Stops serving when dropped (also when a test panics).
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub http: reqwest::Client,
    pub channel: Channel,
    pub publisher: PublisherClient<Channel>,
    pub subscriber: SubscriberClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(pubrun_api::serve(
        listener,
        broker,
        ServeOptions::default(),
        async move {
            let _ = rx.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        publisher: PublisherClient::new(channel.clone()),
        subscriber: SubscriberClient::new(channel.clone()),
        channel,
        stop: Some(tx),
        _dir: dir,
    }
}

/// One request on the open stream of a StreamingPull, and its responses.
pub type Stream = (
    tokio::sync::mpsc::Sender<pb::StreamingPullRequest>,
    tonic::Streaming<pb::StreamingPullResponse>,
);

impl Server {
    /// One REST call, with `body` as JSON when there is one: the status and
    /// the JSON reply.
    pub async fn rest(
        &self,
        method: reqwest::Method,
        path: &str,
        body: impl Into<Option<Value>>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body.into() {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// CreateTopic over gRPC; panics when refused.
    pub async fn grpc_topic(&self, t: pb::Topic) -> pb::Topic {
        self.publisher
            .clone()
            .create_topic(t)
            .await
            .unwrap()
            .into_inner()
    }

    /// CreateSubscription over gRPC.
    pub async fn grpc_sub(&self, s: pb::Subscription) -> Result<pb::Subscription, tonic::Status> {
        self.subscriber
            .clone()
            .create_subscription(s)
            .await
            .map(|r| r.into_inner())
    }

    /// GetSubscription over gRPC, `name` in full.
    pub async fn grpc_get_sub(&self, name: &str) -> pb::Subscription {
        self.subscriber
            .clone()
            .get_subscription(pb::GetSubscriptionRequest {
                subscription: name.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Publishes one message per text to `topic` (in full) over gRPC.
    pub async fn grpc_publish(&self, topic: &str, texts: &[&str]) -> Vec<String> {
        self.publisher
            .clone()
            .publish(pb::PublishRequest {
                topic: topic.to_string(),
                messages: texts
                    .iter()
                    .map(|d| pb::PubsubMessage {
                        data: d.to_string().into_bytes().into(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .message_ids
    }

    /// Opens a StreamingPull on `sub` (in full) with a 60 s ack deadline.
    pub async fn streaming_pull(&self, sub: &str) -> Stream {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(pb::StreamingPullRequest {
            subscription: sub.to_string(),
            stream_ack_deadline_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap();
        let stream = self
            .subscriber
            .clone()
            .streaming_pull(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    }
}

/// The stream's next response, within 10 s.
pub async fn next_response(
    stream: &mut tonic::Streaming<pb::StreamingPullResponse>,
) -> pb::StreamingPullResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a streaming pull response in time")
        .unwrap()
        .unwrap()
}
