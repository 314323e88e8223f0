//! The proto3 JSON shapes of requests and answers, and their conversion to
//! and from the protobuf types (unknown fields are rejected).

use super::*;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct TopicJson {
    pub(super) name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) labels: HashMap<String, String>,
    pub(super) message_storage_policy: Option<Value>,
    pub(super) kms_key_name: Option<String>,
    pub(super) schema_settings: Option<Value>,
    pub(super) satisfies_pzs: Option<bool>,
    pub(super) message_retention_duration: Option<Value>,
    pub(super) state: Option<Value>,
    pub(super) ingestion_data_source_settings: Option<Value>,
    #[serde(deserialize_with = "nullable")]
    pub(super) message_transforms: Vec<Value>,
    #[serde(deserialize_with = "nullable")]
    pub(super) tags: HashMap<String, String>,
}

impl TopicJson {
    pub(super) fn into_pb(self, field: &str, name: String) -> pubrun_core::Result<pb::Topic> {
        Ok(pb::Topic {
            name,
            labels: self.labels,
            message_storage_policy: nested::<MessageStoragePolicyJson>(
                &format!("{field}message_storage_policy"),
                self.message_storage_policy,
            )?
            .map(|p| pb::MessageStoragePolicy {
                allowed_persistence_regions: p.allowed_persistence_regions,
                enforce_in_transit: p.enforce_in_transit.unwrap_or_default(),
            }),
            kms_key_name: self.kms_key_name.unwrap_or_default(),
            schema_settings: match nested::<SchemaSettingsJson>(
                &format!("{field}schema_settings"),
                self.schema_settings,
            )? {
                None => None,
                Some(s) => Some(pb::SchemaSettings {
                    schema: s.schema.unwrap_or_default(),
                    encoding: enum_i32(
                        &format!("{field}schema_settings.encoding"),
                        &s.encoding,
                        pb::Encoding::from_str_name,
                    )?,
                    first_revision_id: s.first_revision_id.unwrap_or_default(),
                    last_revision_id: s.last_revision_id.unwrap_or_default(),
                }),
            },
            satisfies_pzs: self.satisfies_pzs.unwrap_or_default(),
            message_retention_duration: duration(
                &format!("{field}message_retention_duration"),
                &self.message_retention_duration,
            )?,
            state: enum_i32(
                &format!("{field}state"),
                &self.state,
                pb::topic::State::from_str_name,
            )?,
            ingestion_data_source_settings: present(&self.ingestion_data_source_settings),
            message_transforms: present_each(&self.message_transforms),
            tags: self.tags,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct PushConfigJson {
    pub(super) push_endpoint: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) attributes: HashMap<String, String>,
    pub(super) oidc_token: Option<Value>,
    pub(super) pubsub_wrapper: Option<Value>,
    pub(super) no_wrapper: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct OidcTokenJson {
    pub(super) service_account_email: Option<String>,
    pub(super) audience: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PubsubWrapperJson {}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct NoWrapperJson {
    pub(super) write_metadata: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct MessageStoragePolicyJson {
    #[serde(deserialize_with = "nullable")]
    pub(super) allowed_persistence_regions: Vec<String>,
    pub(super) enforce_in_transit: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct SchemaSettingsJson {
    pub(super) schema: Option<String>,
    pub(super) encoding: Option<Value>,
    pub(super) first_revision_id: Option<String>,
    pub(super) last_revision_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct ExpirationPolicyJson {
    pub(super) ttl: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct DeadLetterPolicyJson {
    pub(super) dead_letter_topic: Option<String>,
    pub(super) max_delivery_attempts: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct RetryPolicyJson {
    pub(super) minimum_backoff: Option<Value>,
    pub(super) maximum_backoff: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct SubscriptionJson {
    pub(super) name: Option<String>,
    pub(super) topic: Option<String>,
    pub(super) push_config: Option<Value>,
    pub(super) bigquery_config: Option<Value>,
    pub(super) cloud_storage_config: Option<Value>,
    pub(super) bigtable_config: Option<Value>,
    pub(super) ack_deadline_seconds: Option<Value>,
    pub(super) retain_acked_messages: Option<bool>,
    pub(super) message_retention_duration: Option<Value>,
    #[serde(deserialize_with = "nullable")]
    pub(super) labels: HashMap<String, String>,
    pub(super) enable_message_ordering: Option<bool>,
    pub(super) expiration_policy: Option<Value>,
    pub(super) filter: Option<String>,
    pub(super) dead_letter_policy: Option<Value>,
    pub(super) retry_policy: Option<Value>,
    pub(super) detached: Option<bool>,
    pub(super) enable_exactly_once_delivery: Option<bool>,
    pub(super) topic_message_retention_duration: Option<Value>,
    pub(super) state: Option<Value>,
    pub(super) analytics_hub_subscription_info: Option<Value>,
    #[serde(deserialize_with = "nullable")]
    pub(super) message_transforms: Vec<Value>,
    #[serde(deserialize_with = "nullable")]
    pub(super) tags: HashMap<String, String>,
}

impl SubscriptionJson {
    pub(super) fn into_pb(
        self,
        field: &str,
        name: String,
    ) -> pubrun_core::Result<pb::Subscription> {
        let push_config = push_config_json(&format!("{field}push_config"), self.push_config)?;
        let expiration_policy = match nested::<ExpirationPolicyJson>(
            &format!("{field}expiration_policy"),
            self.expiration_policy,
        )? {
            None => None,
            Some(e) => Some(pb::ExpirationPolicy {
                ttl: duration(&format!("{field}expiration_policy.ttl"), &e.ttl)?,
            }),
        };
        let dead_letter_policy = match nested::<DeadLetterPolicyJson>(
            &format!("{field}dead_letter_policy"),
            self.dead_letter_policy,
        )? {
            None => None,
            Some(d) => Some(pb::DeadLetterPolicy {
                dead_letter_topic: d.dead_letter_topic.unwrap_or_default(),
                max_delivery_attempts: int32(
                    &format!("{field}dead_letter_policy.max_delivery_attempts"),
                    &d.max_delivery_attempts,
                )?,
            }),
        };
        let retry_policy =
            match nested::<RetryPolicyJson>(&format!("{field}retry_policy"), self.retry_policy)? {
                None => None,
                Some(r) => Some(pb::RetryPolicy {
                    minimum_backoff: duration(
                        &format!("{field}retry_policy.minimum_backoff"),
                        &r.minimum_backoff,
                    )?,
                    maximum_backoff: duration(
                        &format!("{field}retry_policy.maximum_backoff"),
                        &r.maximum_backoff,
                    )?,
                }),
            };
        Ok(pb::Subscription {
            name,
            topic: self.topic.unwrap_or_default(),
            push_config,
            bigquery_config: present(&self.bigquery_config),
            cloud_storage_config: present(&self.cloud_storage_config),
            bigtable_config: present(&self.bigtable_config),
            ack_deadline_seconds: int32(
                &format!("{field}ack_deadline_seconds"),
                &self.ack_deadline_seconds,
            )?,
            retain_acked_messages: self.retain_acked_messages.unwrap_or_default(),
            message_retention_duration: duration(
                &format!("{field}message_retention_duration"),
                &self.message_retention_duration,
            )?,
            labels: self.labels,
            enable_message_ordering: self.enable_message_ordering.unwrap_or_default(),
            expiration_policy,
            filter: self.filter.unwrap_or_default(),
            dead_letter_policy,
            retry_policy,
            detached: self.detached.unwrap_or_default(),
            enable_exactly_once_delivery: self.enable_exactly_once_delivery.unwrap_or_default(),
            topic_message_retention_duration: duration(
                &format!("{field}topic_message_retention_duration"),
                &self.topic_message_retention_duration,
            )?,
            state: enum_i32(
                &format!("{field}state"),
                &self.state,
                pb::subscription::State::from_str_name,
            )?,
            analytics_hub_subscription_info: present(&self.analytics_hub_subscription_info),
            message_transforms: present_each(&self.message_transforms),
            tags: self.tags,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct MessageJson {
    pub(super) data: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) attributes: HashMap<String, String>,
    pub(super) message_id: Option<String>,
    pub(super) publish_time: Option<Value>,
    pub(super) ordering_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct PublishJson {
    /// Bound from the path; accepted (and overridden) because it is a request field.
    #[allow(dead_code)]
    pub(super) topic: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) messages: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct PullJson {
    #[allow(dead_code)]
    pub(super) subscription: Option<String>,
    pub(super) return_immediately: Option<bool>,
    pub(super) max_messages: Option<Value>,
}

/// A `PushConfig` JSON object (`field` names it in errors).
pub(super) fn push_config_json(
    field: &str,
    v: Option<Value>,
) -> pubrun_core::Result<Option<pb::PushConfig>> {
    Ok(match nested::<PushConfigJson>(field, v)? {
        None => None,
        Some(p) => {
            let at = |f: &str| format!("{field}.{f}");
            let oidc = nested::<OidcTokenJson>(&at("oidc_token"), p.oidc_token)?;
            let pubsub_wrapper =
                nested::<PubsubWrapperJson>(&at("pubsub_wrapper"), p.pubsub_wrapper)?;
            let no_wrapper = nested::<NoWrapperJson>(&at("no_wrapper"), p.no_wrapper)?;
            if pubsub_wrapper.is_some() && no_wrapper.is_some() {
                return Err(Error::invalid(format!(
                    "{field}: set at most one of pubsub_wrapper and no_wrapper (they are a oneof)"
                )));
            }
            Some(pb::PushConfig {
                push_endpoint: p.push_endpoint.unwrap_or_default(),
                attributes: p.attributes,
                authentication_method: oidc.map(|o| {
                    pb::push_config::AuthenticationMethod::OidcToken(pb::push_config::OidcToken {
                        service_account_email: o.service_account_email.unwrap_or_default(),
                        audience: o.audience.unwrap_or_default(),
                    })
                }),
                wrapper: match (pubsub_wrapper, no_wrapper) {
                    (Some(_), _) => Some(pb::push_config::Wrapper::PubsubWrapper(
                        pb::push_config::PubsubWrapper {},
                    )),
                    (_, Some(n)) => Some(pb::push_config::Wrapper::NoWrapper(
                        pb::push_config::NoWrapper {
                            write_metadata: n.write_metadata.unwrap_or_default(),
                        },
                    )),
                    _ => None,
                },
            })
        }
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct ModifyPushConfigJson {
    pub(super) push_config: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct AcknowledgeJson {
    #[allow(dead_code)]
    pub(super) subscription: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) ack_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct ModifyAckDeadlineJson {
    #[allow(dead_code)]
    pub(super) subscription: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) ack_ids: Vec<String>,
    pub(super) ack_deadline_seconds: Option<Value>,
}

// ---------------------------------------------------------------------------
// JSON response shapes (proto3 JSON; default values omitted)
// ---------------------------------------------------------------------------

pub(super) fn put_str(m: &mut Map<String, Value>, key: &str, v: &str) {
    if !v.is_empty() {
        m.insert(key.to_string(), Value::String(v.to_string()));
    }
}

pub(super) fn put_bool(m: &mut Map<String, Value>, key: &str, v: bool) {
    if v {
        m.insert(key.to_string(), Value::Bool(true));
    }
}

pub(super) fn put_map(m: &mut Map<String, Value>, key: &str, v: &HashMap<String, String>) {
    if !v.is_empty() {
        let obj = v
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        m.insert(key.to_string(), Value::Object(obj));
    }
}

pub(super) fn put_duration(
    m: &mut Map<String, Value>,
    key: &str,
    v: &Option<prost_types::Duration>,
) {
    if let Some(d) = v {
        m.insert(key.to_string(), Value::String(format_duration(d)));
    }
}

pub(super) fn topic_json(t: &pb::Topic) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "name", &t.name);
    put_map(&mut m, "labels", &t.labels);
    put_str(&mut m, "kmsKeyName", &t.kms_key_name);
    put_bool(&mut m, "satisfiesPzs", t.satisfies_pzs);
    put_duration(
        &mut m,
        "messageRetentionDuration",
        &t.message_retention_duration,
    );
    if let Ok(s) = pb::topic::State::try_from(t.state) {
        if s != pb::topic::State::Unspecified {
            m.insert("state".into(), s.as_str_name().into());
        }
    }
    put_map(&mut m, "tags", &t.tags);
    Value::Object(m)
}

pub(super) fn subscription_json(s: &pb::Subscription) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "name", &s.name);
    put_str(&mut m, "topic", &s.topic);
    if let Some(p) = &s.push_config {
        let mut pm = Map::new();
        put_str(&mut pm, "pushEndpoint", &p.push_endpoint);
        put_map(&mut pm, "attributes", &p.attributes);
        if let Some(pb::push_config::Wrapper::NoWrapper(n)) = &p.wrapper {
            let mut nm = Map::new();
            put_bool(&mut nm, "writeMetadata", n.write_metadata);
            pm.insert("noWrapper".into(), Value::Object(nm));
        }
        m.insert("pushConfig".into(), Value::Object(pm));
    }
    if s.ack_deadline_seconds != 0 {
        m.insert("ackDeadlineSeconds".into(), s.ack_deadline_seconds.into());
    }
    put_bool(&mut m, "retainAckedMessages", s.retain_acked_messages);
    put_duration(
        &mut m,
        "messageRetentionDuration",
        &s.message_retention_duration,
    );
    put_map(&mut m, "labels", &s.labels);
    put_bool(&mut m, "enableMessageOrdering", s.enable_message_ordering);
    if let Some(e) = &s.expiration_policy {
        let mut em = Map::new();
        put_duration(&mut em, "ttl", &e.ttl);
        m.insert("expirationPolicy".into(), Value::Object(em));
    }
    put_str(&mut m, "filter", &s.filter);
    if let Some(d) = &s.dead_letter_policy {
        let mut dm = Map::new();
        put_str(&mut dm, "deadLetterTopic", &d.dead_letter_topic);
        if d.max_delivery_attempts != 0 {
            dm.insert("maxDeliveryAttempts".into(), d.max_delivery_attempts.into());
        }
        m.insert("deadLetterPolicy".into(), Value::Object(dm));
    }
    if let Some(r) = &s.retry_policy {
        let mut rm = Map::new();
        put_duration(&mut rm, "minimumBackoff", &r.minimum_backoff);
        put_duration(&mut rm, "maximumBackoff", &r.maximum_backoff);
        m.insert("retryPolicy".into(), Value::Object(rm));
    }
    put_bool(&mut m, "detached", s.detached);
    put_bool(
        &mut m,
        "enableExactlyOnceDelivery",
        s.enable_exactly_once_delivery,
    );
    put_duration(
        &mut m,
        "topicMessageRetentionDuration",
        &s.topic_message_retention_duration,
    );
    if let Ok(st) = pb::subscription::State::try_from(s.state) {
        if st != pb::subscription::State::Unspecified {
            m.insert("state".into(), st.as_str_name().into());
        }
    }
    put_map(&mut m, "tags", &s.tags);
    Value::Object(m)
}

pub(super) fn message_json(msg: &pb::PubsubMessage) -> Value {
    let mut m = Map::new();
    if !msg.data.is_empty() {
        m.insert("data".into(), STANDARD.encode(&msg.data).into());
    }
    put_map(&mut m, "attributes", &msg.attributes);
    put_str(&mut m, "messageId", &msg.message_id);
    if let Some(t) = &msg.publish_time {
        m.insert("publishTime".into(), format_timestamp(t).into());
    }
    put_str(&mut m, "orderingKey", &msg.ordering_key);
    Value::Object(m)
}

pub(super) fn received_json(r: &pb::ReceivedMessage) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "ackId", &r.ack_id);
    if let Some(msg) = &r.message {
        m.insert("message".into(), message_json(msg));
    }
    if r.delivery_attempt != 0 {
        m.insert("deliveryAttempt".into(), r.delivery_attempt.into());
    }
    Value::Object(m)
}

/// `{}`, or with exactly-once delivery and failed ack ids Google's error:
/// 400 INVALID_ARGUMENT whose `details` hold an `ErrorInfo` mapping each
/// failed ack id to `PERMANENT_FAILURE_INVALID_ACK_ID`.
pub(super) fn ack_outcome(r: pubrun_broker::AckResult) -> Outcome {
    if r.invalid.is_empty() {
        return Ok(empty());
    }
    let metadata: Map<String, Value> = r
        .invalid
        .into_iter()
        .map(|id| (id, Value::String(crate::grpc::INVALID_ACK_ID.into())))
        .collect();
    let mut body = Error::invalid(crate::grpc::ACK_ID_FAILURE_MESSAGE).json_body();
    body["error"]["details"] = serde_json::json!([{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": crate::grpc::ACK_ID_FAILURE_REASON,
        "domain": crate::grpc::PUBSUB_DOMAIN,
        "metadata": metadata,
    }]);
    Err(Fail(Box::new(
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response(),
    )))
}

pub(super) fn list_json(key: &str, items: Vec<Value>, next_page_token: &str) -> Value {
    let mut m = Map::new();
    if !items.is_empty() {
        m.insert(key.to_string(), Value::Array(items));
    }
    put_str(&mut m, "nextPageToken", next_page_token);
    Value::Object(m)
}
