//! Resources as stored in the index and as rendered in JSON API v1 shape.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use pubrun_store::buckets::{BucketRecord, ObjectRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{GcsError, GcsResult};
use crate::hash::{crc32c_b64, md5_b64, Expected};

/// Characters left alone when a name goes into a URL path segment
/// (RFC 3986 unreserved); `/` is encoded, as the official clients do.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// RFC 3339 UTC with milliseconds, as Cloud Storage prints times.
pub fn rfc3339_millis(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// RFC 3339 UTC with microseconds (notification `eventTime`).
pub fn rfc3339_micros(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

// ---- buckets ----

/// A bucket: the store's record as it is (no field needs parsing).
pub type BucketRow = BucketRecord;

/// How a [`BucketRow`] appears in the JSON API (a trait because the record
/// type is the storage crate's).
pub trait BucketResource {
    fn to_json(&self, base: &str) -> Value;
}

impl BucketResource for BucketRow {
    fn to_json(&self, base: &str) -> Value {
        json!({
            "kind": "storage#bucket",
            "id": self.name,
            "selfLink": format!("{base}/storage/v1/b/{}", enc(&self.name)),
            "projectNumber": "0",
            "name": self.name,
            "timeCreated": rfc3339_millis(self.created_us),
            "updated": rfc3339_millis(self.updated_us),
            "metageneration": self.metageneration.to_string(),
            "location": self.location,
            "locationType": "region",
            "storageClass": self.storage_class,
            "etag": B64.encode(format!("{}", self.metageneration)),
            "labels": self.labels,
            "versioning": {"enabled": false},
            "iamConfiguration": {
                "uniformBucketLevelAccess": {"enabled": true},
                "publicAccessPrevention": "enforced"
            },
        })
    }
}

// ---- objects ----

/// The writable metadata of an object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_time: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

const STRING_FIELDS: [&str; 6] = [
    "contentType",
    "contentEncoding",
    "contentDisposition",
    "contentLanguage",
    "cacheControl",
    "customTime",
];

impl ObjectMeta {
    fn field(&mut self, key: &str) -> &mut Option<String> {
        match key {
            "contentType" => &mut self.content_type,
            "contentEncoding" => &mut self.content_encoding,
            "contentDisposition" => &mut self.content_disposition,
            "contentLanguage" => &mut self.content_language,
            "cacheControl" => &mut self.cache_control,
            "customTime" => &mut self.custom_time,
            _ => unreachable!("not a string field: {key}"),
        }
    }

    /// Metadata from an object resource a client sent with an upload, copy,
    /// compose or update (full replacement of the writable fields).
    pub fn from_resource(body: &Map<String, Value>) -> GcsResult<Self> {
        let mut m = ObjectMeta::default();
        m.apply(body, false)?;
        Ok(m)
    }

    /// Applies a PATCH body: fields present replace, `null` clears; the
    /// `metadata` map is merged key by key (a `null` value removes the key;
    /// `"metadata": null` removes all).
    pub fn patch(&mut self, body: &Map<String, Value>) -> GcsResult<()> {
        self.apply(body, true)
    }

    fn apply(&mut self, body: &Map<String, Value>, merge: bool) -> GcsResult<()> {
        for key in STRING_FIELDS {
            match body.get(key) {
                None => {}
                Some(Value::Null) => *self.field(key) = None,
                Some(Value::String(s)) => {
                    if key == "customTime" {
                        chrono::DateTime::parse_from_rfc3339(s).map_err(|_| {
                            GcsError::invalid(format!(
                                "Invalid customTime '{s}': expected an RFC 3339 timestamp"
                            ))
                        })?;
                    }
                    *self.field(key) = Some(s.clone())
                }
                Some(other) => {
                    return Err(GcsError::invalid(format!(
                        "Invalid value for field '{key}': {other}: expected a string"
                    )))
                }
            }
        }
        match body.get("metadata") {
            None => {}
            Some(Value::Null) => self.metadata.clear(),
            Some(Value::Object(map)) => {
                if !merge {
                    self.metadata.clear();
                }
                patch_string_map(&mut self.metadata, map, |k, v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    Value::Bool(b) => Ok(b.to_string()),
                    other => Err(GcsError::invalid(format!(
                        "Invalid value for metadata key '{k}': {other}: expected a string"
                    ))),
                })?;
            }
            Some(other) => {
                return Err(GcsError::invalid(format!(
                    "Invalid value for field 'metadata': {other}: expected an object"
                )))
            }
        }
        Ok(())
    }
}

/// Applies a JSON object to a string map, key by key: `null` removes the
/// key, any other value is stored as `value` makes it a string (or refuses it).
pub(crate) fn patch_string_map(
    map: &mut BTreeMap<String, String>,
    patch: &Map<String, Value>,
    value: impl Fn(&str, &Value) -> GcsResult<String>,
) -> GcsResult<()> {
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            map.insert(k.clone(), value(k, v)?);
        }
    }
    Ok(())
}

/// Checksums asserted inside an object resource (`md5Hash`, `crc32c`).
pub fn expected_from_resource(body: &Map<String, Value>) -> GcsResult<Expected> {
    let get = |k: &str| -> GcsResult<Option<String>> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(GcsError::invalid(format!(
                "Invalid value for field '{k}': {other}: expected a string"
            ))),
        }
    };
    let e = Expected {
        md5: get("md5Hash")?,
        crc32c: get("crc32c")?,
    };
    e.validate_format()?;
    Ok(e)
}

/// An object: the stored record with its metadata parsed.
pub type ObjectRow = ObjectRecord<ObjectMeta>;

/// How an [`ObjectRow`] appears in the JSON API and in download headers (a
/// trait because the record type is the storage crate's).
pub trait ObjectResource {
    fn content_type(&self) -> &str;
    fn etag(&self) -> String;
    /// `x-goog-hash` header value.
    fn goog_hash(&self) -> String;
    fn to_json(&self, base: &str) -> Value;
}

impl ObjectResource for ObjectRow {
    fn content_type(&self) -> &str {
        self.meta
            .content_type
            .as_deref()
            .unwrap_or("application/octet-stream")
    }

    fn etag(&self) -> String {
        let mut b = self.generation.to_be_bytes().to_vec();
        b.extend_from_slice(&self.metageneration.to_be_bytes());
        B64.encode(b)
    }

    fn goog_hash(&self) -> String {
        let mut s = format!("crc32c={}", crc32c_b64(self.crc32c));
        if let Some(m) = &self.md5 {
            s.push_str(&format!(",md5={}", md5_b64(m)));
        }
        s
    }

    fn to_json(&self, base: &str) -> Value {
        let mut v = json!({
            "kind": "storage#object",
            "id": format!("{}/{}/{}", self.bucket, self.name, self.generation),
            "selfLink": format!("{base}/storage/v1/b/{}/o/{}", enc(&self.bucket), enc(&self.name)),
            "mediaLink": format!(
                "{base}/download/storage/v1/b/{}/o/{}?generation={}&alt=media",
                enc(&self.bucket), enc(&self.name), self.generation
            ),
            "name": self.name,
            "bucket": self.bucket,
            "generation": self.generation.to_string(),
            "metageneration": self.metageneration.to_string(),
            "contentType": self.content_type(),
            "storageClass": "STANDARD",
            "size": self.size.to_string(),
            "crc32c": crc32c_b64(self.crc32c),
            "etag": self.etag(),
            "timeCreated": rfc3339_millis(self.created_us),
            "updated": rfc3339_millis(self.updated_us),
            "timeStorageClassUpdated": rfc3339_millis(self.created_us),
            "timeFinalized": rfc3339_millis(self.created_us),
        });
        let o = v.as_object_mut().expect("object");
        if let Some(m) = &self.md5 {
            o.insert("md5Hash".into(), md5_b64(m).into());
        }
        if let Some(c) = self.component_count {
            o.insert("componentCount".into(), c.into());
        }
        let meta = serde_json::to_value(&self.meta).expect("metadata serializes");
        for (k, val) in meta.as_object().expect("object").iter() {
            if k != "contentType" {
                o.insert(k.clone(), val.clone());
            }
        }
        v
    }
}

// ---- notifications ----

pub const EVENT_TYPES: [&str; 4] = [
    "OBJECT_FINALIZE",
    "OBJECT_METADATA_UPDATE",
    "OBJECT_DELETE",
    "OBJECT_ARCHIVE",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationConfig {
    pub id: i64,
    pub bucket: String,
    /// `projects/P/topics/T`.
    pub topic: String,
    pub payload_format: String,
    /// Empty: every event type.
    pub event_types: Vec<String>,
    pub object_name_prefix: String,
    pub custom_attributes: BTreeMap<String, String>,
}

impl NotificationConfig {
    pub fn matches(&self, event: &str, object: &str) -> bool {
        (self.event_types.is_empty() || self.event_types.iter().any(|e| e == event))
            && object.starts_with(&self.object_name_prefix)
    }

    pub fn to_json(&self, base: &str) -> Value {
        let mut v = json!({
            "kind": "storage#notification",
            "id": self.id.to_string(),
            "topic": format!("//pubsub.googleapis.com/{}", self.topic),
            "payload_format": self.payload_format,
            "etag": self.id.to_string(),
            "selfLink": format!("{base}/storage/v1/b/{}/notificationConfigs/{}", enc(&self.bucket), self.id),
        });
        let o = v.as_object_mut().expect("object");
        if !self.event_types.is_empty() {
            o.insert("event_types".into(), json!(self.event_types));
        }
        if !self.object_name_prefix.is_empty() {
            o.insert("object_name_prefix".into(), json!(self.object_name_prefix));
        }
        if !self.custom_attributes.is_empty() {
            o.insert("custom_attributes".into(), json!(self.custom_attributes));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_merges_metadata_and_clears_fields() {
        let mut m = ObjectMeta::from_resource(
            json!({"contentType": "text/plain", "cacheControl": "no-cache", "metadata": {"a": "1", "b": "2"}})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        m.patch(
            json!({"cacheControl": null, "metadata": {"a": null, "c": "3"}})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.cache_control, None);
        assert_eq!(
            m.metadata.into_iter().collect::<Vec<_>>(),
            [("b".into(), "2".into()), ("c".into(), "3".into())]
        );
        let mut m = ObjectMeta::default();
        assert!(m
            .patch(json!({"contentType": 5}).as_object().unwrap())
            .is_err());
        assert!(m
            .patch(json!({"customTime": "yesterday"}).as_object().unwrap())
            .is_err());
    }

    #[test]
    fn encodes_names_for_links() {
        assert_eq!(enc("a/b c?d#%"), "a%2Fb%20c%3Fd%23%25");
        assert_eq!(enc("ü"), "%C3%BC");
    }

    #[test]
    fn notification_filter() {
        let n = NotificationConfig {
            id: 1,
            bucket: "b".into(),
            topic: "projects/p/topics/t".into(),
            payload_format: "JSON_API_V1".into(),
            event_types: vec!["OBJECT_FINALIZE".into()],
            object_name_prefix: "csv/".into(),
            custom_attributes: Default::default(),
        };
        assert!(n.matches("OBJECT_FINALIZE", "csv/a.csv"));
        assert!(!n.matches("OBJECT_DELETE", "csv/a.csv"));
        assert!(!n.matches("OBJECT_FINALIZE", "txt/a.csv"));
    }
}
