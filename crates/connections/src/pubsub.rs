//! Pub/Sub over gRPC as a client: publish, streaming pull, acknowledge,
//! modify ack deadlines. A fresh token goes into every call's metadata.

use std::sync::Arc;

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use pubrun_core::connection::ConnectionSpec;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::credentials::TokenSource;
use crate::error::{ConnError, ErrorKind};

pub use pb::{PubsubMessage, ReceivedMessage};

#[derive(Clone)]
pub struct RemotePubsub {
    connection: String,
    endpoint: String,
    channel: Channel,
    tokens: Arc<TokenSource>,
}

/// An open StreamingPull. The request side stays open while this lives.
pub struct PullStream {
    inner: tonic::Streaming<pb::StreamingPullResponse>,
    _requests: mpsc::Sender<pb::StreamingPullRequest>,
    connection: String,
    subscription: String,
}

impl PullStream {
    /// The next batch; `Ok(None)` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Vec<ReceivedMessage>>, ConnError> {
        match self.inner.message().await {
            Ok(Some(r)) => Ok(Some(r.received_messages)),
            Ok(None) => Ok(None),
            Err(s) => Err(ConnError::from_status(
                &self.connection,
                &self.subscription,
                &s,
            )),
        }
    }
}

impl RemotePubsub {
    pub fn new(spec: &ConnectionSpec, tokens: Arc<TokenSource>) -> Result<RemotePubsub, ConnError> {
        let bad = |e: String| {
            ConnError::new(
                &spec.name,
                format!("pubsub_endpoint {}", spec.pubsub_endpoint),
                ErrorKind::InvalidArgument,
                e,
            )
        };
        let mut ep = Endpoint::from_shared(spec.pubsub_endpoint.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .user_agent("pubrun")
            .map_err(|e| bad(e.to_string()))?;
        if spec.pubsub_endpoint.starts_with("https://") {
            ep = ep
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(RemotePubsub {
            connection: spec.name.clone(),
            endpoint: spec.pubsub_endpoint.clone(),
            // Connects on first use and again after a failure.
            channel: ep.connect_lazy(),
            tokens,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, ConnError> {
        let token = self.tokens.token().await?;
        let mut req = tonic::Request::new(msg);
        let mut v: MetadataValue<_> =
            format!("Bearer {}", token.secret()).parse().map_err(|_| {
                ConnError::new(
                    &self.connection,
                    "access token",
                    ErrorKind::Credentials,
                    "not a valid header value",
                )
            })?;
        v.set_sensitive(true);
        req.metadata_mut().insert("authorization", v);
        req.set_timeout(std::time::Duration::from_secs(60));
        Ok(req)
    }

    /// One unary call: `msg` with a fresh token, sent by `rpc` on this
    /// connection's channel; a failure names `resource`.
    async fn unary<T, R, Fut>(
        &self,
        resource: &str,
        msg: T,
        rpc: impl FnOnce(Channel, tonic::Request<T>) -> Fut,
    ) -> Result<R, ConnError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let req = self.request(msg).await?;
        match rpc(self.channel.clone(), req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(resource, s).await),
        }
    }

    async fn fail(&self, resource: &str, s: tonic::Status) -> ConnError {
        if s.code() == tonic::Code::Unauthenticated {
            self.tokens.invalidate().await;
        }
        let mut e = ConnError::from_status(&self.connection, resource, &s);
        // "tcp connect error" alone does not say where: name the endpoint.
        if e.kind == ErrorKind::Unavailable && !e.message.contains(&self.endpoint) {
            let what = if s.message().contains("connect") || s.message().contains("transport") {
                "unreachable"
            } else {
                "unavailable"
            };
            e.message = format!("{} {what}: {}", self.endpoint, e.message);
        }
        e
    }

    /// Publishes to a topic (full name); returns the message ids.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<PubsubMessage>,
    ) -> Result<Vec<String>, ConnError> {
        let msg = pb::PublishRequest {
            topic: topic.to_string(),
            messages,
        };
        let r = self
            .unary(topic, msg, |ch, req| async move {
                PublisherClient::new(ch).publish(req).await
            })
            .await?;
        Ok(r.message_ids)
    }

    /// Opens a StreamingPull with flow control: the server sends no more
    /// than `max_outstanding` messages not yet acked (or nacked).
    pub async fn streaming_pull(
        &self,
        subscription: &str,
        max_outstanding: i64,
        ack_deadline_seconds: i32,
    ) -> Result<PullStream, ConnError> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::StreamingPullRequest {
            subscription: subscription.to_string(),
            stream_ack_deadline_seconds: ack_deadline_seconds,
            max_outstanding_messages: max_outstanding,
            client_id: format!("pubrun-{}", std::process::id()),
            ..Default::default()
        })
        .await
        .expect("receiver is alive");
        let mut req = self
            .request(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        // The stream lives long; only the unary calls get a deadline.
        req.metadata_mut().remove("grpc-timeout");
        let mut client = SubscriberClient::new(self.channel.clone());
        match client.streaming_pull(req).await {
            Ok(r) => Ok(PullStream {
                inner: r.into_inner(),
                _requests: tx,
                connection: self.connection.clone(),
                subscription: subscription.to_string(),
            }),
            Err(s) => Err(self.fail(subscription, s).await),
        }
    }

    pub async fn acknowledge(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
    ) -> Result<(), ConnError> {
        if ack_ids.is_empty() {
            return Ok(());
        }
        let msg = pb::AcknowledgeRequest {
            subscription: subscription.to_string(),
            ack_ids,
        };
        self.unary(subscription, msg, |ch, req| async move {
            SubscriberClient::new(ch).acknowledge(req).await
        })
        .await
    }

    /// Extends (or with 0 gives back) the leases of these messages.
    pub async fn modify_ack_deadline(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        seconds: i32,
    ) -> Result<(), ConnError> {
        let msg = pb::ModifyAckDeadlineRequest {
            subscription: subscription.to_string(),
            ack_ids,
            ack_deadline_seconds: seconds,
        };
        if msg.ack_ids.is_empty() {
            return Ok(());
        }
        self.unary(subscription, msg, |ch, req| async move {
            SubscriberClient::new(ch).modify_ack_deadline(req).await
        })
        .await
    }
}
