//! `google.pubsub.v1` Publisher and Subscriber over gRPC.
//!
//! [`PubSub`] holds the logic on protobuf types; the tonic traits below and
//! the REST transcoder in `rest.rs` both call it, so the two surfaces cannot
//! drift apart.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use pubrun_broker::{
    AckResult, Broker, Delivered, DeliveryUpdate, ListRequest, SubscriptionUpdate, TopicUpdate,
};
use pubrun_core::config::{DeadLetterPolicy, NoWrapper, PushConfig, RetryPolicy};
use pubrun_core::{
    Error, OutgoingMessage, ProjectName, Result, SubscriptionConfig, SubscriptionName, TopicConfig,
    TopicName,
};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use crate::pubsub_server::{publisher_server, subscriber_server};
use crate::status::to_status;

/// Longest a unary Pull waits for a first message before answering empty.
const PULL_WAIT: Duration = Duration::from_secs(5);
/// Most messages sent in one StreamingPullResponse.
const STREAM_BATCH: usize = 1000;

#[derive(Clone)]
pub struct PubSub {
    pub broker: Arc<Broker>,
    /// Flips to true on server shutdown so that long-lived streams end.
    pub shutdown: watch::Receiver<bool>,
}

pub(crate) fn hash_to_btree(
    m: std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn unsupported(what: &str) -> Error {
    Error::invalid(format!(
        "{what} is not supported by this pubrun version; leave it unset"
    ))
}

pub fn topic_to_pb(t: &TopicConfig) -> pb::Topic {
    pb::Topic {
        name: t.name.clone(),
        labels: t.labels.clone().into_iter().collect(),
        state: pb::topic::State::Active as i32,
        ..Default::default()
    }
}

/// `message_retention_duration` is not part of `TopicConfig`: see
/// `snapshots::topic_retention_from_pb`.
pub fn topic_from_pb(t: pb::Topic) -> Result<TopicConfig> {
    if t.schema_settings.is_some() {
        return Err(unsupported("schema_settings"));
    }
    if !t.kms_key_name.is_empty() {
        return Err(unsupported("kms_key_name"));
    }
    if t.ingestion_data_source_settings.is_some() {
        return Err(unsupported("ingestion_data_source_settings"));
    }
    if !t.message_transforms.is_empty() {
        return Err(unsupported("message_transforms"));
    }
    Ok(TopicConfig {
        name: t.name,
        labels: hash_to_btree(t.labels),
    })
}

pub(crate) fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A `google.protobuf.Duration` field as a std `Duration`; negative is invalid.
pub(crate) fn duration_from_pb(
    field: &str,
    d: Option<prost_types::Duration>,
) -> Result<Option<Duration>> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 => Err(Error::invalid(
            format!("{field} must be a non-negative duration"),
        )),
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
    }
}

pub fn sub_to_pb(s: &SubscriptionConfig) -> pb::Subscription {
    pb::Subscription {
        name: s.name.clone(),
        topic: s.topic.clone(),
        ack_deadline_seconds: s.ack_deadline_seconds,
        labels: s.labels.clone().into_iter().collect(),
        retry_policy: s.retry_policy.map(|r| pb::RetryPolicy {
            minimum_backoff: Some(duration_to_pb(r.minimum_backoff)),
            maximum_backoff: Some(duration_to_pb(r.maximum_backoff)),
        }),
        dead_letter_policy: s.dead_letter_policy.as_ref().map(|d| pb::DeadLetterPolicy {
            dead_letter_topic: d.dead_letter_topic.clone(),
            max_delivery_attempts: d.max_delivery_attempts,
        }),
        enable_message_ordering: s.enable_message_ordering,
        filter: s.filter.clone(),
        enable_exactly_once_delivery: s.enable_exactly_once_delivery,
        // The default (7 days) is reported too, as Google does.
        message_retention_duration: Some(duration_to_pb(s.retention())),
        retain_acked_messages: s.retain_acked_messages,
        push_config: Some(push_config_to_pb(s.push_config.as_ref())),
        state: pb::subscription::State::Active as i32,
        ..Default::default()
    }
}

/// A pull subscription reports an empty push config, as Google does.
fn push_config_to_pb(p: Option<&PushConfig>) -> pb::PushConfig {
    let Some(p) = p else {
        return pb::PushConfig::default();
    };
    pb::PushConfig {
        push_endpoint: p.push_endpoint.clone(),
        attributes: p.attributes.clone().into_iter().collect(),
        authentication_method: None,
        wrapper: p.no_wrapper.map(|n| {
            pb::push_config::Wrapper::NoWrapper(pb::push_config::NoWrapper {
                write_metadata: n.write_metadata,
            })
        }),
    }
}

/// `None` (or an empty endpoint) is pull delivery. Authenticated push is
/// refused by name; the endpoint and attributes are checked by the broker.
pub fn push_config_from_pb(p: Option<pb::PushConfig>) -> Result<Option<PushConfig>> {
    let Some(p) = p else { return Ok(None) };
    if p.authentication_method.is_some() {
        return Err(unsupported("push_config.oidc_token (authenticated push)"));
    }
    let no_wrapper = match p.wrapper {
        Some(pb::push_config::Wrapper::NoWrapper(n)) => Some(NoWrapper {
            write_metadata: n.write_metadata,
        }),
        Some(pb::push_config::Wrapper::PubsubWrapper(_)) | None => None,
    };
    PushConfig {
        push_endpoint: p.push_endpoint,
        attributes: hash_to_btree(p.attributes),
        no_wrapper,
    }
    .check()
}

pub fn sub_from_pb(s: pb::Subscription) -> Result<SubscriptionConfig> {
    let push_config = push_config_from_pb(s.push_config)?;
    let message_retention_duration =
        duration_from_pb("message_retention_duration", s.message_retention_duration)?;
    if s.expiration_policy
        .as_ref()
        .is_some_and(|p| p.ttl.is_some())
    {
        return Err(unsupported(
            "expiration_policy.ttl (subscriptions never expire here)",
        ));
    }
    if s.bigtable_config.is_some() {
        return Err(unsupported("bigtable_config"));
    }
    if !s.message_transforms.is_empty() {
        return Err(unsupported("message_transforms"));
    }
    if s.bigquery_config.is_some() || s.cloud_storage_config.is_some() {
        return Err(unsupported(
            "export subscriptions (bigquery_config / cloud_storage_config)",
        ));
    }
    Ok(SubscriptionConfig {
        name: s.name,
        topic: s.topic,
        labels: hash_to_btree(s.labels),
        ack_deadline_seconds: s.ack_deadline_seconds,
        retry_policy: retry_policy_from_pb(s.retry_policy)?,
        dead_letter_policy: dead_letter_policy_from_pb(s.dead_letter_policy)?,
        enable_message_ordering: s.enable_message_ordering,
        filter: s.filter,
        enable_exactly_once_delivery: s.enable_exactly_once_delivery,
        push_config,
        message_retention_duration,
        retain_acked_messages: s.retain_acked_messages,
    })
}

/// Google's defaults (10 s, 600 s) for unset backoffs; bounds are checked.
fn retry_policy_from_pb(r: Option<pb::RetryPolicy>) -> Result<Option<RetryPolicy>> {
    let Some(r) = r else { return Ok(None) };
    let min = duration_from_pb("retry_policy.minimum_backoff", r.minimum_backoff)?;
    let max = duration_from_pb("retry_policy.maximum_backoff", r.maximum_backoff)?;
    RetryPolicy::new(min, max).map(Some)
}

/// An empty policy (no topic) means none; 0 attempts means Google's 5.
fn dead_letter_policy_from_pb(d: Option<pb::DeadLetterPolicy>) -> Result<Option<DeadLetterPolicy>> {
    match d {
        None => Ok(None),
        Some(d) => DeadLetterPolicy::new(&d.dead_letter_topic, d.max_delivery_attempts),
    }
}

/// What Google answers when exactly-once acks or modacks name ack ids that
/// expired, were superseded by a redelivery or are malformed.
pub const ACK_ID_FAILURE_MESSAGE: &str = "Some acknowledgement ids in the request were invalid. This could be because the acknowledgement ids have expired or the acknowledgement ids were malformed.";
pub const ACK_ID_FAILURE_REASON: &str = "EXACTLY_ONCE_ACKID_FAILURE";
pub const INVALID_ACK_ID: &str = "PERMANENT_FAILURE_INVALID_ACK_ID";
pub const PUBSUB_DOMAIN: &str = "pubsub.googleapis.com";

/// `google.rpc.Status`, for the `grpc-status-details-bin` trailer (public so
/// that tests read the details the official clients read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// `google.rpc.ErrorInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorInfo {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(string, tag = "2")]
    pub domain: String,
    #[prost(map = "string, string", tag = "3")]
    pub metadata: std::collections::HashMap<String, String>,
}

/// INVALID_ARGUMENT with an `ErrorInfo` detail whose metadata maps each
/// failed ack id to `PERMANENT_FAILURE_INVALID_ACK_ID`: what the official
/// clients read to fail exactly those acks (Python: `_get_ack_errors`).
pub fn ack_id_failure_status(invalid: &[String]) -> Status {
    use prost::Message as _;
    let info = ErrorInfo {
        reason: ACK_ID_FAILURE_REASON.to_string(),
        domain: PUBSUB_DOMAIN.to_string(),
        metadata: invalid
            .iter()
            .map(|id| (id.clone(), INVALID_ACK_ID.to_string()))
            .collect(),
    };
    let status = RpcStatus {
        code: pubrun_core::Code::InvalidArgument.grpc_code(),
        message: ACK_ID_FAILURE_MESSAGE.to_string(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.ErrorInfo".to_string(),
            value: info.encode_to_vec(),
        }],
    };
    Status::with_details(
        tonic::Code::InvalidArgument,
        ACK_ID_FAILURE_MESSAGE,
        status.encode_to_vec().into(),
    )
}

fn ack_reply(r: Result<AckResult>) -> GrpcResult<()> {
    match r {
        Ok(r) if !r.invalid.is_empty() => Err(ack_id_failure_status(&r.invalid)),
        Ok(_) => Ok(Response::new(())),
        Err(e) => Err(to_status(e)),
    }
}

pub(crate) fn timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn received_to_pb(d: Delivered) -> pb::ReceivedMessage {
    let m = &d.message;
    pb::ReceivedMessage {
        ack_id: d.ack_id,
        message: Some(pb::PubsubMessage {
            data: m.data.clone(),
            attributes: m
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            message_id: m.id(),
            publish_time: Some(timestamp(m.publish_time_nanos)),
            ordering_key: m.ordering_key.clone(),
        }),
        // Google sets delivery_attempt only with a dead-letter policy; the
        // broker reports 0 otherwise.
        delivery_attempt: d.delivery_attempt.min(i32::MAX as u32) as i32,
    }
}

pub(crate) fn mask_paths(mask: Option<prost_types::FieldMask>) -> Result<Vec<String>> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(Error::invalid(
            "update_mask must name at least one field to update",
        ));
    }
    Ok(paths)
}

impl PubSub {
    pub fn new(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) -> Self {
        PubSub { broker, shutdown }
    }

    pub async fn create_topic(&self, t: pb::Topic) -> Result<pb::Topic> {
        TopicName::parse(&t.name)?;
        let retention = crate::snapshots::topic_retention_from_pb(&t)?;
        let created = self
            .broker
            .create_topic_with_retention(topic_from_pb(t)?, retention)
            .await?;
        Ok(self.topic_pb(&created))
    }

    pub async fn update_topic(&self, r: pb::UpdateTopicRequest) -> Result<pb::Topic> {
        let topic = r.topic.ok_or_else(|| Error::invalid("topic must be set"))?;
        let name = TopicName::parse(&topic.name)?;
        let mut update = TopicUpdate::default();
        let mut retention = None;
        for path in mask_paths(r.update_mask)? {
            match path.as_str() {
                "labels" => update.labels = Some(hash_to_btree(topic.labels.clone())),
                "message_retention_duration" => {
                    retention = Some(crate::snapshots::topic_retention_from_pb(&topic)?)
                }
                other => {
                    return Err(Error::invalid(format!(
                        "cannot update field \"{other}\" of a topic; supported: labels, message_retention_duration"
                    )))
                }
            }
        }
        let updated = self
            .broker
            .update_topic_with(&name, update, retention)
            .await?;
        Ok(self.topic_pb(&updated))
    }

    pub async fn publish(&self, r: pb::PublishRequest) -> Result<pb::PublishResponse> {
        let name = TopicName::parse(&r.topic)?;
        let messages = r
            .messages
            .into_iter()
            .map(|m| OutgoingMessage {
                data: m.data,
                attributes: hash_to_btree(m.attributes),
                ordering_key: m.ordering_key,
            })
            .collect();
        let message_ids = self.broker.publish(&name, messages).await?;
        Ok(pb::PublishResponse { message_ids })
    }

    pub fn get_topic(&self, r: pb::GetTopicRequest) -> Result<pb::Topic> {
        Ok(self.topic_pb(&self.broker.get_topic(&TopicName::parse(&r.topic)?)?))
    }

    pub fn list_topics(&self, r: pb::ListTopicsRequest) -> Result<pb::ListTopicsResponse> {
        let project = ProjectName::parse(&r.project)?;
        let page =
            self.broker
                .list_topics(ListRequest::new(&project, r.page_size, &r.page_token))?;
        Ok(pb::ListTopicsResponse {
            topics: page.items.iter().map(|t| self.topic_pb(t)).collect(),
            next_page_token: page.next_page_token,
        })
    }

    pub fn list_topic_subscriptions(
        &self,
        r: pb::ListTopicSubscriptionsRequest,
    ) -> Result<pb::ListTopicSubscriptionsResponse> {
        let topic = TopicName::parse(&r.topic)?;
        let page = self.broker.list_topic_subscriptions(ListRequest::new(
            &topic,
            r.page_size,
            &r.page_token,
        ))?;
        Ok(pb::ListTopicSubscriptionsResponse {
            subscriptions: page.items,
            next_page_token: page.next_page_token,
        })
    }

    pub async fn delete_topic(&self, r: pb::DeleteTopicRequest) -> Result<()> {
        self.broker.delete_topic(&TopicName::parse(&r.topic)?).await
    }

    pub async fn create_subscription(&self, s: pb::Subscription) -> Result<pb::Subscription> {
        SubscriptionName::parse(&s.name)?;
        let created = self.broker.create_subscription(sub_from_pb(s)?).await?;
        Ok(self.sub_pb(&created))
    }

    pub fn get_subscription(&self, r: pb::GetSubscriptionRequest) -> Result<pb::Subscription> {
        Ok(self.sub_pb(
            &self
                .broker
                .get_subscription(&SubscriptionName::parse(&r.subscription)?)?,
        ))
    }

    pub async fn update_subscription(
        &self,
        r: pb::UpdateSubscriptionRequest,
    ) -> Result<pb::Subscription> {
        let sub = r
            .subscription
            .ok_or_else(|| Error::invalid("subscription must be set"))?;
        let name = SubscriptionName::parse(&sub.name)?;
        let mut update = SubscriptionUpdate::default();
        let mut delivery = DeliveryUpdate::default();
        for path in mask_paths(r.update_mask)? {
            match path.as_str() {
                "ack_deadline_seconds" => update.ack_deadline_seconds = Some(sub.ack_deadline_seconds),
                "labels" => update.labels = Some(hash_to_btree(sub.labels.clone())),
                "retry_policy" => delivery.retry_policy = Some(retry_policy_from_pb(sub.retry_policy)?),
                "dead_letter_policy" => {
                    delivery.dead_letter_policy = Some(dead_letter_policy_from_pb(sub.dead_letter_policy.clone())?)
                }
                "enable_exactly_once_delivery" => {
                    delivery.enable_exactly_once_delivery = Some(sub.enable_exactly_once_delivery)
                }
                "push_config" => {
                    delivery.push_config = Some(push_config_from_pb(sub.push_config.clone())?)
                }
                "message_retention_duration" => {
                    delivery.message_retention_duration = Some(duration_from_pb(
                        "message_retention_duration",
                        sub.message_retention_duration,
                    )?)
                }
                "retain_acked_messages" => {
                    delivery.retain_acked_messages = Some(sub.retain_acked_messages)
                }
                "filter" | "enable_message_ordering" => {
                    return Err(Error::invalid(format!(
                        "{path} cannot be changed after the subscription is created; create a new subscription instead"
                    )))
                }
                other => {
                    return Err(Error::invalid(format!(
                        "cannot update field \"{other}\" of a subscription; supported: ack_deadline_seconds, labels, retry_policy, dead_letter_policy, enable_exactly_once_delivery, push_config, message_retention_duration, retain_acked_messages"
                    )))
                }
            }
        }
        Ok(self.sub_pb(
            &self
                .broker
                .update_subscription_with(&name, update, delivery)
                .await?,
        ))
    }

    pub fn list_subscriptions(
        &self,
        r: pb::ListSubscriptionsRequest,
    ) -> Result<pb::ListSubscriptionsResponse> {
        let project = ProjectName::parse(&r.project)?;
        let page = self.broker.list_subscriptions(ListRequest::new(
            &project,
            r.page_size,
            &r.page_token,
        ))?;
        Ok(pb::ListSubscriptionsResponse {
            subscriptions: page.items.iter().map(|s| self.sub_pb(s)).collect(),
            next_page_token: page.next_page_token,
        })
    }

    /// Switches between push (an endpoint) and pull (an empty or unset
    /// push config); the backlog is kept either way.
    pub async fn modify_push_config(&self, r: pb::ModifyPushConfigRequest) -> Result<()> {
        let name = SubscriptionName::parse(&r.subscription)?;
        let delivery = DeliveryUpdate {
            push_config: Some(push_config_from_pb(r.push_config)?),
            ..Default::default()
        };
        self.broker
            .update_subscription_with(&name, SubscriptionUpdate::default(), delivery)
            .await?;
        Ok(())
    }

    /// Pull and StreamingPull on a push subscription fail as Google's do.
    pub fn refuse_push(&self, name: &SubscriptionName) -> Result<()> {
        if self.broker.get_subscription(name)?.push_config.is_some() {
            return Err(Error::precondition(
                "This method is not supported for push subscriptions; switch it to pull with ModifyPushConfig first",
            ));
        }
        Ok(())
    }

    pub async fn delete_subscription(&self, r: pb::DeleteSubscriptionRequest) -> Result<()> {
        self.broker
            .delete_subscription(&SubscriptionName::parse(&r.subscription)?)
            .await
    }

    /// With exactly-once delivery, `invalid` lists the ack ids that failed;
    /// the surfaces turn a non-empty list into Google's error with details.
    pub fn modify_ack_deadline(&self, r: pb::ModifyAckDeadlineRequest) -> Result<AckResult> {
        self.broker.modify_ack_deadline_confirmed(
            &SubscriptionName::parse(&r.subscription)?,
            &r.ack_ids,
            r.ack_deadline_seconds,
        )
    }

    /// As `modify_ack_deadline`.
    pub async fn acknowledge(&self, r: pb::AcknowledgeRequest) -> Result<AckResult> {
        self.broker
            .acknowledge_confirmed(&SubscriptionName::parse(&r.subscription)?, &r.ack_ids)
            .await
    }

    /// `client_deadline` is what is left of the caller's gRPC timeout.
    #[allow(deprecated)]
    pub async fn pull(
        &self,
        r: pb::PullRequest,
        client_deadline: Option<Duration>,
    ) -> Result<pb::PullResponse> {
        let name = SubscriptionName::parse(&r.subscription)?;
        self.refuse_push(&name)?;
        let wait = if r.return_immediately {
            None
        } else {
            // Answer (possibly empty) a little before the caller gives up.
            let cap = client_deadline
                .map(|d| d.saturating_sub(d / 10))
                .unwrap_or(PULL_WAIT);
            Some(cap.min(PULL_WAIT))
        };
        let got = self.broker.pull(&name, r.max_messages, wait).await?;
        Ok(pb::PullResponse {
            received_messages: got.into_iter().map(received_to_pb).collect(),
        })
    }
}

/// Parses gRPC's `grpc-timeout` header (e.g. `9999990u`).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type GrpcResult<T> = std::result::Result<Response<T>, Status>;

fn reply<T>(r: Result<T>) -> GrpcResult<T> {
    r.map(Response::new).map_err(to_status)
}

#[tonic::async_trait]
impl publisher_server::Publisher for PubSub {
    async fn create_topic(&self, r: Request<pb::Topic>) -> GrpcResult<pb::Topic> {
        reply(PubSub::create_topic(self, r.into_inner()).await)
    }
    async fn update_topic(&self, r: Request<pb::UpdateTopicRequest>) -> GrpcResult<pb::Topic> {
        reply(PubSub::update_topic(self, r.into_inner()).await)
    }
    async fn publish(&self, r: Request<pb::PublishRequest>) -> GrpcResult<pb::PublishResponse> {
        reply(PubSub::publish(self, r.into_inner()).await)
    }
    async fn get_topic(&self, r: Request<pb::GetTopicRequest>) -> GrpcResult<pb::Topic> {
        reply(PubSub::get_topic(self, r.into_inner()))
    }
    async fn list_topics(
        &self,
        r: Request<pb::ListTopicsRequest>,
    ) -> GrpcResult<pb::ListTopicsResponse> {
        reply(PubSub::list_topics(self, r.into_inner()))
    }
    async fn list_topic_subscriptions(
        &self,
        r: Request<pb::ListTopicSubscriptionsRequest>,
    ) -> GrpcResult<pb::ListTopicSubscriptionsResponse> {
        reply(PubSub::list_topic_subscriptions(self, r.into_inner()))
    }
    async fn list_topic_snapshots(
        &self,
        r: Request<pb::ListTopicSnapshotsRequest>,
    ) -> GrpcResult<pb::ListTopicSnapshotsResponse> {
        reply(PubSub::list_topic_snapshots(self, r.into_inner()))
    }
    async fn delete_topic(&self, r: Request<pb::DeleteTopicRequest>) -> GrpcResult<()> {
        reply(PubSub::delete_topic(self, r.into_inner()).await)
    }
    async fn detach_subscription(
        &self,
        _r: Request<pb::DetachSubscriptionRequest>,
    ) -> GrpcResult<pb::DetachSubscriptionResponse> {
        Err(Status::unimplemented(
            "DetachSubscription is not supported by this pubrun version",
        ))
    }
}

#[tonic::async_trait]
impl subscriber_server::Subscriber for PubSub {
    async fn create_subscription(
        &self,
        r: Request<pb::Subscription>,
    ) -> GrpcResult<pb::Subscription> {
        reply(PubSub::create_subscription(self, r.into_inner()).await)
    }
    async fn get_subscription(
        &self,
        r: Request<pb::GetSubscriptionRequest>,
    ) -> GrpcResult<pb::Subscription> {
        reply(PubSub::get_subscription(self, r.into_inner()))
    }
    async fn update_subscription(
        &self,
        r: Request<pb::UpdateSubscriptionRequest>,
    ) -> GrpcResult<pb::Subscription> {
        reply(PubSub::update_subscription(self, r.into_inner()).await)
    }
    async fn list_subscriptions(
        &self,
        r: Request<pb::ListSubscriptionsRequest>,
    ) -> GrpcResult<pb::ListSubscriptionsResponse> {
        reply(PubSub::list_subscriptions(self, r.into_inner()))
    }
    async fn delete_subscription(
        &self,
        r: Request<pb::DeleteSubscriptionRequest>,
    ) -> GrpcResult<()> {
        reply(PubSub::delete_subscription(self, r.into_inner()).await)
    }
    async fn modify_ack_deadline(
        &self,
        r: Request<pb::ModifyAckDeadlineRequest>,
    ) -> GrpcResult<()> {
        ack_reply(PubSub::modify_ack_deadline(self, r.into_inner()))
    }
    async fn acknowledge(&self, r: Request<pb::AcknowledgeRequest>) -> GrpcResult<()> {
        ack_reply(PubSub::acknowledge(self, r.into_inner()).await)
    }
    async fn pull(&self, r: Request<pb::PullRequest>) -> GrpcResult<pb::PullResponse> {
        let deadline = grpc_timeout(&r);
        reply(PubSub::pull(self, r.into_inner(), deadline).await)
    }

    type StreamingPullStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::StreamingPullResponse, Status>> + Send>>;

    async fn streaming_pull(
        &self,
        r: Request<Streaming<pb::StreamingPullRequest>>,
    ) -> GrpcResult<Self::StreamingPullStream> {
        let mut input = r.into_inner();
        let first = match input.message().await? {
            Some(m) => m,
            None => {
                return Err(Status::invalid_argument(
                    "the first StreamingPullRequest must name a subscription",
                ))
            }
        };
        let name = SubscriptionName::parse(&first.subscription).map_err(to_status)?;
        self.refuse_push(&name).map_err(to_status)?;
        if !(0..=600).contains(&first.stream_ack_deadline_seconds)
            || (1..10).contains(&first.stream_ack_deadline_seconds)
        {
            return Err(Status::invalid_argument(format!(
                "stream_ack_deadline_seconds is {}; it must be between 10 and 600",
                first.stream_ack_deadline_seconds
            )));
        }
        let handle = self
            .broker
            .open_stream(
                &name,
                first.stream_ack_deadline_seconds,
                first.max_outstanding_messages,
                first.max_outstanding_bytes,
            )
            .map_err(to_status)?;
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move { run_stream(this, handle, first, input, tx).await });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn modify_push_config(&self, r: Request<pb::ModifyPushConfigRequest>) -> GrpcResult<()> {
        reply(PubSub::modify_push_config(self, r.into_inner()).await)
    }
    // Snapshots and seek: `snapshots.rs`.
    async fn get_snapshot(&self, r: Request<pb::GetSnapshotRequest>) -> GrpcResult<pb::Snapshot> {
        reply(PubSub::get_snapshot(self, r.into_inner()))
    }
    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> GrpcResult<pb::ListSnapshotsResponse> {
        reply(PubSub::list_snapshots(self, r.into_inner()))
    }
    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> GrpcResult<pb::Snapshot> {
        reply(PubSub::create_snapshot(self, r.into_inner()).await)
    }
    async fn update_snapshot(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> GrpcResult<pb::Snapshot> {
        reply(PubSub::update_snapshot(self, r.into_inner()).await)
    }
    async fn delete_snapshot(&self, r: Request<pb::DeleteSnapshotRequest>) -> GrpcResult<()> {
        reply(PubSub::delete_snapshot(self, r.into_inner()).await)
    }
    async fn seek(&self, r: Request<pb::SeekRequest>) -> GrpcResult<pb::SeekResponse> {
        reply(PubSub::seek(self, r.into_inner()).await)
    }
}

/// Applies the ack / modack parts of one StreamingPullRequest. With
/// exactly-once delivery the outcome is confirmed on the stream (the
/// returned response) instead of failing the stream.
async fn apply_stream_request(
    ps: &PubSub,
    handle: &pubrun_broker::StreamHandle,
    req: &pb::StreamingPullRequest,
) -> Result<Option<pb::StreamingPullResponse>> {
    use pb::streaming_pull_response::{AcknowledgeConfirmation, ModifyAckDeadlineConfirmation};
    let sub = handle.subscription();
    if req.modify_deadline_seconds.len() != req.modify_deadline_ack_ids.len() {
        return Err(Error::invalid(
            "modify_deadline_seconds and modify_deadline_ack_ids must have the same length",
        ));
    }
    if req.ack_ids.is_empty() && req.modify_deadline_ack_ids.is_empty() {
        return Ok(None);
    }
    let props = handle.properties();
    let eod = props.exactly_once_delivery;
    // A write that could not be made durable is a temporary failure of those
    // ack ids with exactly-once (the client retries them); without it the
    // stream fails as before.
    let temporary = |e: Error, ids: &[String], failed: &mut Vec<String>| -> Result<()> {
        if eod && e.code == pubrun_core::Code::Unavailable {
            failed.extend_from_slice(ids);
            Ok(())
        } else {
            Err(e)
        }
    };
    let mut ack_conf = AcknowledgeConfirmation::default();
    if !req.ack_ids.is_empty() {
        match ps.broker.acknowledge_confirmed(sub, &req.ack_ids).await {
            Ok(r) => {
                ack_conf.ack_ids = r.succeeded;
                ack_conf.invalid_ack_ids = r.invalid;
            }
            Err(e) => temporary(e, &req.ack_ids, &mut ack_conf.temporary_failed_ack_ids)?,
        }
    }
    // Group ack ids by deadline so each distinct deadline is one call.
    let mut by_deadline: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for (secs, id) in req
        .modify_deadline_seconds
        .iter()
        .zip(&req.modify_deadline_ack_ids)
    {
        by_deadline.entry(*secs).or_default().push(id.clone());
    }
    let mut mod_conf = ModifyAckDeadlineConfirmation::default();
    for (secs, ids) in by_deadline {
        let r = ps.broker.modify_ack_deadline_confirmed(sub, &ids, secs)?;
        mod_conf.ack_ids.extend(r.succeeded);
        mod_conf.invalid_ack_ids.extend(r.invalid);
    }
    if !eod {
        return Ok(None);
    }
    Ok(Some(pb::StreamingPullResponse {
        acknowledge_confirmation: (!req.ack_ids.is_empty()).then_some(ack_conf),
        modify_ack_deadline_confirmation: (!req.modify_deadline_ack_ids.is_empty())
            .then_some(mod_conf),
        subscription_properties: Some(subscription_properties(props)),
        ..Default::default()
    }))
}

fn subscription_properties(
    p: pubrun_broker::DeliveryProperties,
) -> pb::streaming_pull_response::SubscriptionProperties {
    pb::streaming_pull_response::SubscriptionProperties {
        exactly_once_delivery_enabled: p.exactly_once_delivery,
        message_ordering_enabled: p.message_ordering,
    }
}

/// Drives one StreamingPull: a reader applies acks and modacks as they come,
/// the writer sends messages whenever the flow-control quota has room.
async fn run_stream(
    ps: PubSub,
    mut handle: pubrun_broker::StreamHandle,
    first: pb::StreamingPullRequest,
    mut input: Streaming<pb::StreamingPullRequest>,
    tx: mpsc::Sender<std::result::Result<pb::StreamingPullResponse, Status>>,
) {
    match apply_stream_request(&ps, &handle, &first).await {
        Ok(None) => {}
        Ok(Some(confirmation)) => {
            if tx.send(Ok(confirmation)).await.is_err() {
                return;
            }
        }
        Err(e) => {
            let _ = tx.send(Err(to_status(e))).await;
            return;
        }
    }
    let mut shutdown = ps.shutdown.clone();
    let (req_tx, mut req_rx) = mpsc::channel::<pb::StreamingPullRequest>(16);
    // Reading is its own task so that a slow ack never stalls delivery.
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = input.message().await {
            if req_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let _ = tx.send(Err(Status::unavailable("server is shutting down; reconnect"))).await;
                break;
            }
            _ = tx.closed() => break,
            req = req_rx.recv() => {
                let Some(req) = req else { break };
                if req.stream_ack_deadline_seconds != 0 {
                    if let Err(e) = handle.set_ack_deadline(req.stream_ack_deadline_seconds) {
                        let _ = tx.send(Err(to_status(e))).await;
                        break;
                    }
                }
                match apply_stream_request(&ps, &handle, &req).await {
                    Ok(None) => {}
                    Ok(Some(confirmation)) => {
                        if tx.send(Ok(confirmation)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        break;
                    }
                }
            }
            got = handle.next(STREAM_BATCH) => {
                match got {
                    Ok(msgs) => {
                        let resp = pb::StreamingPullResponse {
                            received_messages: msgs.into_iter().map(received_to_pb).collect(),
                            subscription_properties: Some(subscription_properties(handle.properties())),
                            ..Default::default()
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        break;
                    }
                }
            }
        }
    }
    reader.abort();
}
