//! Pub/Sub notifications for object changes.
//!
//! Events are computed inside the index transaction that changes the object
//! and stored in the outbox by that same commit (on every engine, see
//! [`pubrun_store::buckets`]), so an event exists
//! if and only if its change committed. A background task publishes the
//! outbox in order through the broker and deletes each row once the broker
//! has made the message durable; rows left by a crash are published again at
//! start (at-least-once, like every Pub/Sub delivery).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use pubrun_core::{Code, OutgoingMessage, TopicName};
use pubrun_store::buckets::OutboxMessage;

use crate::model::{rfc3339_micros, NotificationConfig, ObjectResource, ObjectRow};
use crate::Inner;

pub const FINALIZE: &str = "OBJECT_FINALIZE";
pub const METADATA_UPDATE: &str = "OBJECT_METADATA_UPDATE";
pub const DELETE: &str = "OBJECT_DELETE";

pub struct Event<'a> {
    pub kind: &'static str,
    pub object: &'a ObjectRow,
    /// OBJECT_FINALIZE that replaced a live object: its generation.
    pub overwrote_generation: Option<i64>,
    /// OBJECT_DELETE caused by an overwrite: the new generation.
    pub overwritten_by_generation: Option<i64>,
    pub time_us: i64,
}

/// The messages Cloud Storage would publish for `ev`: one per matching
/// config, with Google's attributes and (for `JSON_API_V1`) the object
/// resource as data.
pub fn messages_for(
    configs: &[NotificationConfig],
    ev: &Event,
    base: &str,
) -> Vec<(String, BTreeMap<String, String>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut payload: Option<Vec<u8>> = None;
    for n in configs
        .iter()
        .filter(|n| n.matches(ev.kind, &ev.object.name))
    {
        let mut a = n.custom_attributes.clone();
        a.insert(
            "notificationConfig".into(),
            format!(
                "projects/_/buckets/{}/notificationConfigs/{}",
                n.bucket, n.id
            ),
        );
        a.insert("eventType".into(), ev.kind.into());
        a.insert("payloadFormat".into(), n.payload_format.clone());
        a.insert("bucketId".into(), ev.object.bucket.clone());
        a.insert("objectId".into(), ev.object.name.clone());
        a.insert("objectGeneration".into(), ev.object.generation.to_string());
        a.insert("eventTime".into(), rfc3339_micros(ev.time_us));
        if let Some(g) = ev.overwrote_generation {
            a.insert("overwroteGeneration".into(), g.to_string());
        }
        if let Some(g) = ev.overwritten_by_generation {
            a.insert("overwrittenByGeneration".into(), g.to_string());
        }
        let data = if n.payload_format == "JSON_API_V1" {
            payload
                .get_or_insert_with(|| {
                    serde_json::to_vec_pretty(&ev.object.to_json(base))
                        .expect("resource serializes")
                })
                .clone()
        } else {
            Vec::new()
        };
        out.push((n.topic.clone(), a, data));
    }
    out
}

/// The outbox rows of `events` (committed by the caller in the
/// transaction that makes the change).
pub fn outbox_for(
    configs: &[NotificationConfig],
    events: &[Event],
    base: &str,
) -> Vec<OutboxMessage> {
    let mut out = Vec::new();
    if configs.is_empty() {
        return out;
    }
    for ev in events {
        for (topic, attributes, data) in messages_for(configs, ev, base) {
            out.push(OutboxMessage {
                topic,
                attributes,
                data,
            });
        }
    }
    out
}

/// Publishes the outbox until the [`Inner`] it serves is dropped.
pub(crate) async fn run_publisher(inner: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(me) = inner.upgrade() else { return };
        let wake = me.wake.clone();
        let rows = match me.store.pending_outbox(500).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading the notification outbox failed; retrying");
                drop(me);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if rows.is_empty() {
            drop(me);
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            continue;
        }
        let mut failed = false;
        let mut i = 0;
        while i < rows.len() {
            // Consecutive rows for one topic go in one publish call.
            let mut j = i + 1;
            let mut bytes = rows[i].message.data.len();
            while j < rows.len()
                && rows[j].message.topic == rows[i].message.topic
                && j - i < 100
                && bytes + rows[j].message.data.len() < 8 << 20
            {
                bytes += rows[j].message.data.len();
                j += 1;
            }
            let batch = &rows[i..j];
            let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
            let drop_batch = match TopicName::parse(&batch[0].message.topic) {
                Err(e) => {
                    tracing::warn!(topic = %batch[0].message.topic, error = %e, "dropping notifications for an invalid topic");
                    true
                }
                Ok(topic) => {
                    let msgs = batch
                        .iter()
                        .map(|r| OutgoingMessage {
                            data: r.message.data.clone().into(),
                            attributes: r.message.attributes.clone(),
                            ordering_key: String::new(),
                        })
                        .collect();
                    match me.broker.publish(&topic, msgs).await {
                        Ok(_) => true,
                        Err(e) if matches!(e.code, Code::NotFound | Code::InvalidArgument) => {
                            tracing::warn!(%topic, error = %e, count = ids.len(), "dropping bucket notifications: the topic cannot take them");
                            true
                        }
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "publishing bucket notifications failed; will retry");
                            false
                        }
                    }
                }
            };
            if !drop_batch {
                failed = true;
                break;
            }
            if let Err(e) = me.store.delete_outbox(&ids).await {
                tracing::warn!(
                    error = %e,
                    "could not mark notifications as published; they may be published again"
                );
                failed = true;
                break;
            }
            i = j;
        }
        drop(me);
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

/// Wakes the publisher (after a commit that stored events).
pub(crate) fn wake(inner: &Arc<Inner>) {
    inner.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectMeta;

    fn obj() -> ObjectRow {
        ObjectRow {
            bucket: "in".into(),
            name: "csv/a.csv".into(),
            generation: 1700000000000001,
            metageneration: 1,
            size: 3,
            blob: "0".repeat(32),
            md5: None,
            crc32c: 0,
            component_count: None,
            meta: ObjectMeta::default(),
            created_us: 1700000000000001,
            updated_us: 1700000000000001,
        }
    }

    #[test]
    fn attributes_follow_google() {
        let cfg = NotificationConfig {
            id: 7,
            bucket: "in".into(),
            topic: "projects/demo/topics/uploads".into(),
            payload_format: "JSON_API_V1".into(),
            event_types: vec![],
            object_name_prefix: "csv/".into(),
            custom_attributes: [("team".to_string(), "ml".to_string())].into(),
        };
        let o = obj();
        let ev = Event {
            kind: FINALIZE,
            object: &o,
            overwrote_generation: Some(5),
            overwritten_by_generation: None,
            time_us: o.created_us,
        };
        let msgs = messages_for(std::slice::from_ref(&cfg), &ev, "http://h");
        assert_eq!(msgs.len(), 1);
        let (topic, a, data) = &msgs[0];
        assert_eq!(topic, "projects/demo/topics/uploads");
        assert_eq!(
            a["notificationConfig"],
            "projects/_/buckets/in/notificationConfigs/7"
        );
        assert_eq!(a["eventType"], "OBJECT_FINALIZE");
        assert_eq!(a["payloadFormat"], "JSON_API_V1");
        assert_eq!(a["bucketId"], "in");
        assert_eq!(a["objectId"], "csv/a.csv");
        assert_eq!(a["objectGeneration"], "1700000000000001");
        assert_eq!(a["overwroteGeneration"], "5");
        assert_eq!(a["eventTime"], "2023-11-14T22:13:20.000001Z");
        assert_eq!(a["team"], "ml");
        let v: serde_json::Value = serde_json::from_slice(data).unwrap();
        assert_eq!(v["name"], "csv/a.csv");
        assert_eq!(v["kind"], "storage#object");

        let none = NotificationConfig {
            payload_format: "NONE".into(),
            ..cfg.clone()
        };
        assert!(messages_for(&[none], &ev, "http://h")[0].2.is_empty());
        let other = obj();
        let other = ObjectRow {
            name: "txt/b".into(),
            ..other
        };
        let ev2 = Event {
            object: &other,
            ..ev
        };
        assert!(messages_for(&[cfg], &ev2, "http://h").is_empty());
    }
}
