//! `[[bucket]]` tables and their notification configs.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::topic::Topics;
use super::{Ctx, ManifestError};

/// A `[[bucket]]` table. The bucket name is checked by the buckets crate
/// when applied; notification topics must be declared here.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BucketDecl {
    pub name: String,
    pub notifications: Vec<NotificationDecl>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NotificationDecl {
    /// Full topic name.
    pub topic: String,
    /// Empty: every event type.
    pub event_types: Vec<String>,
    pub object_name_prefix: String,
    pub custom_attributes: BTreeMap<String, String>,
    /// `JSON_API_V1` (default) or `NONE`.
    pub payload_format: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBucket {
    name: Spanned<String>,
    #[serde(default)]
    notifications: Vec<Spanned<RawNotification>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotification {
    topic: String,
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    object_name_prefix: String,
    #[serde(default)]
    custom_attributes: BTreeMap<String, String>,
    payload_format: Option<String>,
}

impl RawBucket {
    pub(super) fn decl(
        &self,
        cx: &Ctx<'_>,
        topics: &Topics<'_>,
    ) -> Result<BucketDecl, ManifestError> {
        let mut notifications = Vec::new();
        for n in &self.notifications {
            let r = n.get_ref();
            let topic = topics.resolve(cx, &Spanned::new(n.span(), r.topic.clone()))?;
            const EVENTS: [&str; 4] = [
                "OBJECT_FINALIZE",
                "OBJECT_DELETE",
                "OBJECT_METADATA_UPDATE",
                "OBJECT_ARCHIVE",
            ];
            if let Some(bad) = r.event_types.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                return Err(cx.err(
                    n.span(),
                    format!("unknown event type \"{bad}\"; one of {}", EVENTS.join(", ")),
                ));
            }
            let payload_format = r
                .payload_format
                .clone()
                .unwrap_or_else(|| "JSON_API_V1".to_string());
            if payload_format != "JSON_API_V1" && payload_format != "NONE" {
                return Err(cx.err(
                    n.span(),
                    format!("payload_format is \"{payload_format}\"; one of JSON_API_V1, NONE"),
                ));
            }
            notifications.push(NotificationDecl {
                topic: topic.to_string(),
                event_types: r.event_types.clone(),
                object_name_prefix: r.object_name_prefix.clone(),
                custom_attributes: r.custom_attributes.clone(),
                payload_format,
            });
        }
        Ok(BucketDecl {
            name: self.name.get_ref().clone(),
            notifications,
        })
    }
}

named!(RawBucket => "bucket");
