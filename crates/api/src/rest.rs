//! The Pub/Sub REST v1 mapping (`/v1/projects/...`), transcoded onto [`PubSub`].
//!
//! Every route turns its path, query and JSON body into the protobuf request
//! the gRPC service takes, calls the same [`PubSub`] method, and renders the
//! protobuf answer as proto3 JSON (camelCase names, base64 bytes, `"604800s"`
//! durations, RFC 3339 timestamps, default values omitted). No Pub/Sub
//! semantics live here, so the two surfaces cannot drift apart.
//!
//! Routes, as Google's `http` annotations define them:
//!
//! | method | path | rpc |
//! |---|---|---|
//! | PUT / GET / PATCH / DELETE | `/v1/projects/P/topics/T` | CreateTopic / GetTopic / UpdateTopic / DeleteTopic |
//! | GET | `/v1/projects/P/topics` | ListTopics |
//! | GET | `/v1/projects/P/topics/T/subscriptions` | ListTopicSubscriptions |
//! | GET | `/v1/projects/P/topics/T/snapshots` | ListTopicSnapshots |
//! | POST | `/v1/projects/P/topics/T:publish` | Publish |
//! | PUT / GET / PATCH / DELETE | `/v1/projects/P/subscriptions/S` | Create / Get / Update / DeleteSubscription |
//! | GET | `/v1/projects/P/subscriptions` | ListSubscriptions |
//! | POST | `/v1/projects/P/subscriptions/S:pull` / `:acknowledge` / `:modifyAckDeadline` | Pull / Acknowledge / ModifyAckDeadline |
//! | PUT / GET / PATCH / DELETE, GET | `/v1/projects/P/snapshots/S`, `/v1/projects/P/snapshots` | snapshots (`rest/snapshots.rs`) |
//! | POST | `/v1/projects/P/subscriptions/S:seek` | Seek |
//!
//! Errors, including malformed JSON, unknown fields, unknown custom verbs and
//! wrong HTTP methods, are answered in Google's JSON error shape.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use pubrun_core::Error;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::grpc::PubSub;
use crate::pb;
use crate::status::HttpError;

mod snapshots;

/// Routes for `/v1/projects/{project}/topics/...` and `/subscriptions/...`.
pub fn router(pubsub: PubSub) -> Router {
    let projects = Router::new()
        .route("/{project}/topics", any(topics_collection))
        .route("/{project}/topics/{topic}", any(topic_resource))
        .route(
            "/{project}/topics/{topic}/subscriptions",
            any(topic_subscriptions),
        )
        .route("/{project}/topics/{topic}/snapshots", any(topic_snapshots))
        .route("/{project}/snapshots", any(snapshots::snapshots_collection))
        .route(
            "/{project}/snapshots/{snapshot}",
            any(snapshots::snapshot_resource),
        )
        .route("/{project}/subscriptions", any(subscriptions_collection))
        .route(
            "/{project}/subscriptions/{subscription}",
            any(subscription_resource),
        )
        // Anything else under /v1/projects gets Google's error shape instead
        // of the gRPC router's fallback. Nesting keeps this fallback local.
        .fallback(unknown_path)
        .with_state(pubsub);
    Router::new().nest("/v1/projects", projects)
}

// ---------------------------------------------------------------------------
// Replies and errors
// ---------------------------------------------------------------------------

/// A finished error response (Google's JSON error shape).
struct Fail(Box<Response>);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail(Box::new(HttpError(e).into_response()))
    }
}

type Outcome = std::result::Result<Value, Fail>;

fn finish(o: Outcome) -> Response {
    match o {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(Fail(r)) => *r,
    }
}

fn empty() -> Value {
    Value::Object(Map::new())
}

fn method_not_allowed(method: &Method, uri: &Uri, allowed: &'static str) -> Fail {
    let mut r = crate::status::with_status(
        StatusCode::METHOD_NOT_ALLOWED,
        &Error::unimplemented(format!(
            "HTTP method {method} is not allowed on {}; allowed: {allowed}",
            uri.path()
        )),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    Fail(Box::new(r))
}

fn unimplemented(what: &str) -> Fail {
    Error::unimplemented(format!("{what} is not supported by this pubrun version")).into()
}

fn unknown_verb(uri: &Uri, collection: &str, verb: &str, supported: &str) -> Fail {
    Error::not_found(format!(
        "unknown method \"{verb}\" in {} (custom methods on {collection}: {supported})",
        uri.path()
    ))
    .into()
}

async fn unknown_path(OriginalUri(uri): OriginalUri) -> Response {
    let segs: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    if let ["v1", "projects", _, "schemas", ..] = segs.as_slice() {
        return *unimplemented("schemas").0;
    }
    HttpError(Error::not_found(format!(
        "{} is not a Pub/Sub v1 REST resource (expected /v1/projects/PROJECT/topics/... or /v1/projects/PROJECT/subscriptions/...)",
        uri.path()
    )))
    .into_response()
}

// ---------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------

fn path_params<T>(p: std::result::Result<Path<T>, PathRejection>) -> std::result::Result<T, Fail> {
    match p {
        Ok(Path(v)) => Ok(v),
        Err(r) => Err(Error::invalid(format!("invalid request path: {}", r.body_text())).into()),
    }
}

/// Splits `id:verb` at the first ':' (resource ids cannot contain ':').
fn split_verb(seg: &str) -> (&str, Option<&str>) {
    match seg.split_once(':') {
        Some((id, verb)) => (id, Some(verb)),
        None => (seg, None),
    }
}

/// Parses a JSON request body; an empty body means `{}`.
fn parse_body<T: DeserializeOwned + Default>(
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<T, Fail> {
    let bytes =
        match body {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(Error::invalid(
                "request payload size exceeds the server's limit (Pub/Sub allows at most 10 MB per publish request)",
            )
            .into()),
            Err(r) => return Err(Error::invalid(format!("could not read the request body: {}", r.body_text())).into()),
        };
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    let v: Value = serde_json::from_slice(text)
        .map_err(|e| Error::invalid(format!("Invalid JSON payload received. {e}")))?;
    if !v.is_object() {
        return Err(Error::invalid(format!(
            "Invalid JSON payload received. The request body must be a JSON object, not {}",
            json_kind(&v)
        ))
        .into());
    }
    Ok(from_object("", v)?)
}

/// Deserializes a message-typed value. Only objects (or null) are accepted:
/// serde would otherwise also read a struct from a JSON array.
fn from_object<T: DeserializeOwned + Default>(at: &str, v: Value) -> pubrun_core::Result<T> {
    let at_msg = if at.is_empty() {
        String::new()
    } else {
        format!(" (at '{at}')")
    };
    match v {
        Value::Null => Ok(T::default()),
        Value::Object(_) => serde_json::from_value(v).map_err(|e| {
            let e = e.to_string();
            match e.strip_prefix("unknown field `").and_then(|r| r.split_once('`')) {
                // Google's wording for a field the message does not have.
                Some((name, _)) => {
                    let at = if at.is_empty() { String::new() } else { format!(" at '{at}'") };
                    Error::invalid(format!(
                        "Invalid JSON payload received. Unknown name \"{name}\"{at}: Cannot find field."
                    ))
                }
                None => Error::invalid(format!("Invalid JSON payload received. {e}{at_msg}")),
            }
        }),
        other => Err(Error::invalid(format!(
            "Invalid JSON payload received. Expected an object{at_msg}, got {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Query parameters every Google API accepts and that do not bind to the request.
const SYSTEM_PARAMS: &[&str] = &[
    "$.xgafv",
    "access_token",
    "alt",
    "callback",
    "fields",
    "key",
    "oauth_token",
    "prettyPrint",
    "quotaUser",
    "uploadType",
    "upload_protocol",
];

/// Parses the query string; `allowed` are the camelCase request fields that may
/// be bound from it (snake_case spellings are accepted too).
fn parse_query(
    q: Option<String>,
    allowed: &[&str],
) -> std::result::Result<HashMap<String, String>, Fail> {
    let mut out = HashMap::new();
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if SYSTEM_PARAMS.contains(&k.as_str()) {
            continue;
        }
        let camel = snake_to_camel(&k);
        if !allowed.contains(&camel.as_str()) {
            return Err(Error::invalid(format!(
                "Invalid JSON payload received. Unknown name \"{k}\": Cannot bind query parameter. Field '{k}' could not be found in request message."
            ))
            .into());
        }
        out.insert(camel, v);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> std::result::Result<String, Fail> {
    let bad = || {
        Fail::from(Error::invalid(format!(
            "invalid percent-encoding in query string: \"{s}\""
        )))
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn snake_to_camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn camel_to_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `pageSize` / `pageToken` from the query string.
fn page_params(q: Option<String>) -> std::result::Result<(i32, String), Fail> {
    let mut q = parse_query(q, &["pageSize", "pageToken"])?;
    let size = match q.remove("pageSize") {
        None => 0,
        Some(s) => s.trim().parse::<i32>().map_err(|_| {
            Error::invalid(format!(
                "Invalid value at 'page_size' (TYPE_INT32), \"{s}\": expected an integer"
            ))
        })?,
    };
    Ok((size, q.remove("pageToken").unwrap_or_default()))
}

/// `null` means the field's default, as in proto3 JSON.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An int32 field: a JSON number or a string holding one.
fn int32(field: &str, v: &Option<Value>) -> pubrun_core::Result<i32> {
    let n = match v {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Number(n)) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| f as i64)
        }),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.and_then(|n| i32::try_from(n).ok()).ok_or_else(|| {
        Error::invalid(format!(
            "Invalid value at '{field}' (TYPE_INT32), {}: expected an integer",
            v.as_ref().map(Value::to_string).unwrap_or_default()
        ))
    })
}

/// A `google.protobuf.Duration` field: `"3.5s"`.
fn duration(field: &str, v: &Option<Value>) -> pubrun_core::Result<Option<prost_types::Duration>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_duration(s).map(Some).ok_or_else(|| {
            Error::invalid(format!(
                "Invalid value at '{field}' (type.googleapis.com/google.protobuf.Duration), \"{s}\": expected seconds with up to 9 fractional digits and the suffix 's', e.g. \"604800s\""
            ))
        }),
        Some(other) => Err(Error::invalid(format!(
            "Invalid value at '{field}' (type.googleapis.com/google.protobuf.Duration), {other}: expected a string such as \"604800s\""
        ))),
    }
}

fn parse_duration(s: &str) -> Option<prost_types::Duration> {
    let body = s.strip_suffix('s')?;
    let (neg, body) = match body.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let (secs, frac) = match body.split_once('.') {
        Some((a, b)) if !b.is_empty() => (a, b),
        Some(_) => return None,
        None => (body, ""),
    };
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if secs.is_empty() || !digits(secs) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let seconds: i64 = secs.parse().ok().filter(|s| *s <= 315_576_000_000)?;
    let nanos: i32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(if neg {
        prost_types::Duration {
            seconds: -seconds,
            nanos: -nanos,
        }
    } else {
        prost_types::Duration { seconds, nanos }
    })
}

/// Proto3 JSON: 0, 3, 6 or 9 fractional digits and the suffix `s`.
fn format_duration(d: &prost_types::Duration) -> String {
    let sign = if d.seconds < 0 || d.nanos < 0 {
        "-"
    } else {
        ""
    };
    format!(
        "{sign}{}{}s",
        d.seconds.unsigned_abs(),
        fraction(d.nanos.unsigned_abs())
    )
}

#[allow(clippy::manual_is_multiple_of)] // u32::is_multiple_of needs Rust 1.87; MSRV is 1.85
fn fraction(nanos: u32) -> String {
    if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    }
}

/// A `google.protobuf.Timestamp` field: RFC 3339.
fn timestamp(
    field: &str,
    v: &Option<Value>,
) -> pubrun_core::Result<Option<prost_types::Timestamp>> {
    let bad = |shown: String| {
        Error::invalid(format!(
            "Invalid value at '{field}' (type.googleapis.com/google.protobuf.Timestamp), {shown}: expected RFC 3339, e.g. \"2024-01-02T03:04:05.123Z\""
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| bad(format!("\"{s}\"")))?;
            Ok(Some(prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            }))
        }
        Some(other) => Err(bad(other.to_string())),
    }
}

/// Proto3 JSON: Z-normalized RFC 3339 with 0, 3, 6 or 9 fractional digits.
fn format_timestamp(t: &prost_types::Timestamp) -> String {
    let secs = t.seconds + i64::from(t.nanos.div_euclid(1_000_000_000));
    let nanos = t.nanos.rem_euclid(1_000_000_000) as u32;
    match chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0) {
        Some(dt) => format!("{}{}Z", dt.format("%Y-%m-%dT%H:%M:%S"), fraction(nanos)),
        None => "1970-01-01T00:00:00Z".to_string(),
    }
}

/// Decodes `bytes` fields: standard or URL-safe alphabet, padded or not.
fn decode_base64(s: &str) -> std::result::Result<Bytes, base64::DecodeError> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let normalized: String = s
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT.decode(normalized).map(Bytes::from)
}

/// Output-only or unsupported message fields: present (non-null) means set.
fn present<T: Default>(v: &Option<Value>) -> Option<T> {
    v.as_ref().filter(|v| !v.is_null()).map(|_| T::default())
}

/// A nested message field, parsed with its own unknown-field checks.
fn nested<T: DeserializeOwned + Default>(
    at: &str,
    v: Option<Value>,
) -> pubrun_core::Result<Option<T>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => from_object(at, v).map(Some),
    }
}

fn enum_i32(
    field: &str,
    v: &Option<Value>,
    from_name: impl Fn(&str) -> Option<i32>,
) -> pubrun_core::Result<i32> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => from_name(s).ok_or_else(|| {
            Error::invalid(format!(
                "Invalid value at '{field}', \"{s}\": not a valid enum value name"
            ))
        }),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Invalid value at '{field}', {n}: not a valid enum value"
                ))
            }),
        Some(other) => Err(Error::invalid(format!(
            "Invalid value at '{field}', {other}: not a valid enum value"
        ))),
    }
}

/// `updateMask` is a comma-separated string of camelCase (or snake_case) paths.
fn field_mask(mask: Option<String>) -> Option<prost_types::FieldMask> {
    mask.map(|m| prost_types::FieldMask {
        paths: m
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split('.')
                    .map(camel_to_snake)
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------
// JSON request shapes (proto3 JSON; unknown fields are rejected)
// ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct TopicJson {
    name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    labels: HashMap<String, String>,
    #[serde(alias = "message_storage_policy")]
    message_storage_policy: Option<Value>,
    #[serde(alias = "kms_key_name")]
    kms_key_name: Option<String>,
    #[serde(alias = "schema_settings")]
    schema_settings: Option<Value>,
    #[serde(alias = "satisfies_pzs")]
    satisfies_pzs: Option<bool>,
    #[serde(alias = "message_retention_duration")]
    message_retention_duration: Option<Value>,
    state: Option<Value>,
    #[serde(alias = "ingestion_data_source_settings")]
    ingestion_data_source_settings: Option<Value>,
    #[serde(alias = "message_transforms", deserialize_with = "nullable")]
    message_transforms: Vec<Value>,
    #[serde(deserialize_with = "nullable")]
    tags: HashMap<String, String>,
}

impl TopicJson {
    fn into_pb(self, field: &str, name: String) -> pubrun_core::Result<pb::Topic> {
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
                        |n| pb::Encoding::from_str_name(n).map(|e| e as i32),
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
            state: enum_i32(&format!("{field}state"), &self.state, |s| {
                pb::topic::State::from_str_name(s).map(|s| s as i32)
            })?,
            ingestion_data_source_settings: present(&self.ingestion_data_source_settings),
            message_transforms: self
                .message_transforms
                .iter()
                .map(|_| Default::default())
                .collect(),
            tags: self.tags,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct PushConfigJson {
    #[serde(alias = "push_endpoint")]
    push_endpoint: Option<String>,
    #[serde(deserialize_with = "nullable")]
    attributes: HashMap<String, String>,
    #[serde(alias = "oidc_token")]
    oidc_token: Option<Value>,
    #[serde(alias = "pubsub_wrapper")]
    pubsub_wrapper: Option<Value>,
    #[serde(alias = "no_wrapper")]
    no_wrapper: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct OidcTokenJson {
    #[serde(alias = "service_account_email")]
    service_account_email: Option<String>,
    audience: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PubsubWrapperJson {}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct NoWrapperJson {
    #[serde(alias = "write_metadata")]
    write_metadata: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct MessageStoragePolicyJson {
    #[serde(alias = "allowed_persistence_regions", deserialize_with = "nullable")]
    allowed_persistence_regions: Vec<String>,
    #[serde(alias = "enforce_in_transit")]
    enforce_in_transit: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct SchemaSettingsJson {
    schema: Option<String>,
    encoding: Option<Value>,
    #[serde(alias = "first_revision_id")]
    first_revision_id: Option<String>,
    #[serde(alias = "last_revision_id")]
    last_revision_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct ExpirationPolicyJson {
    ttl: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct DeadLetterPolicyJson {
    #[serde(alias = "dead_letter_topic")]
    dead_letter_topic: Option<String>,
    #[serde(alias = "max_delivery_attempts")]
    max_delivery_attempts: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct RetryPolicyJson {
    #[serde(alias = "minimum_backoff")]
    minimum_backoff: Option<Value>,
    #[serde(alias = "maximum_backoff")]
    maximum_backoff: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct SubscriptionJson {
    name: Option<String>,
    topic: Option<String>,
    #[serde(alias = "push_config")]
    push_config: Option<Value>,
    #[serde(alias = "bigquery_config")]
    bigquery_config: Option<Value>,
    #[serde(alias = "cloud_storage_config")]
    cloud_storage_config: Option<Value>,
    #[serde(alias = "bigtable_config")]
    bigtable_config: Option<Value>,
    #[serde(alias = "ack_deadline_seconds")]
    ack_deadline_seconds: Option<Value>,
    #[serde(alias = "retain_acked_messages")]
    retain_acked_messages: Option<bool>,
    #[serde(alias = "message_retention_duration")]
    message_retention_duration: Option<Value>,
    #[serde(deserialize_with = "nullable")]
    labels: HashMap<String, String>,
    #[serde(alias = "enable_message_ordering")]
    enable_message_ordering: Option<bool>,
    #[serde(alias = "expiration_policy")]
    expiration_policy: Option<Value>,
    filter: Option<String>,
    #[serde(alias = "dead_letter_policy")]
    dead_letter_policy: Option<Value>,
    #[serde(alias = "retry_policy")]
    retry_policy: Option<Value>,
    detached: Option<bool>,
    #[serde(alias = "enable_exactly_once_delivery")]
    enable_exactly_once_delivery: Option<bool>,
    #[serde(alias = "topic_message_retention_duration")]
    topic_message_retention_duration: Option<Value>,
    state: Option<Value>,
    #[serde(alias = "analytics_hub_subscription_info")]
    analytics_hub_subscription_info: Option<Value>,
    #[serde(alias = "message_transforms", deserialize_with = "nullable")]
    message_transforms: Vec<Value>,
    #[serde(deserialize_with = "nullable")]
    tags: HashMap<String, String>,
}

impl SubscriptionJson {
    fn into_pb(self, field: &str, name: String) -> pubrun_core::Result<pb::Subscription> {
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
            state: enum_i32(&format!("{field}state"), &self.state, |s| {
                pb::subscription::State::from_str_name(s).map(|s| s as i32)
            })?,
            analytics_hub_subscription_info: present(&self.analytics_hub_subscription_info),
            message_transforms: self
                .message_transforms
                .iter()
                .map(|_| Default::default())
                .collect(),
            tags: self.tags,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct UpdateTopicJson {
    topic: Option<Value>,
    #[serde(alias = "update_mask")]
    update_mask: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct UpdateSubscriptionJson {
    subscription: Option<Value>,
    #[serde(alias = "update_mask")]
    update_mask: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct MessageJson {
    data: Option<String>,
    #[serde(deserialize_with = "nullable")]
    attributes: HashMap<String, String>,
    #[serde(alias = "message_id")]
    message_id: Option<String>,
    #[serde(alias = "publish_time")]
    publish_time: Option<Value>,
    #[serde(alias = "ordering_key")]
    ordering_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct PublishJson {
    /// Bound from the path; accepted (and overridden) because it is a request field.
    #[allow(dead_code)]
    topic: Option<String>,
    #[serde(deserialize_with = "nullable")]
    messages: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct PullJson {
    #[allow(dead_code)]
    subscription: Option<String>,
    #[serde(alias = "return_immediately")]
    return_immediately: Option<bool>,
    #[serde(alias = "max_messages")]
    max_messages: Option<Value>,
}

/// A `PushConfig` JSON object (`field` names it in errors).
fn push_config_json(field: &str, v: Option<Value>) -> pubrun_core::Result<Option<pb::PushConfig>> {
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
struct ModifyPushConfigJson {
    #[serde(alias = "push_config")]
    push_config: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct AcknowledgeJson {
    #[allow(dead_code)]
    subscription: Option<String>,
    #[serde(alias = "ack_ids", deserialize_with = "nullable")]
    ack_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct ModifyAckDeadlineJson {
    #[allow(dead_code)]
    subscription: Option<String>,
    #[serde(alias = "ack_ids", deserialize_with = "nullable")]
    ack_ids: Vec<String>,
    #[serde(alias = "ack_deadline_seconds")]
    ack_deadline_seconds: Option<Value>,
}

// ---------------------------------------------------------------------------
// JSON response shapes (proto3 JSON; default values omitted)
// ---------------------------------------------------------------------------

fn put_str(m: &mut Map<String, Value>, key: &str, v: &str) {
    if !v.is_empty() {
        m.insert(key.to_string(), Value::String(v.to_string()));
    }
}

fn put_bool(m: &mut Map<String, Value>, key: &str, v: bool) {
    if v {
        m.insert(key.to_string(), Value::Bool(true));
    }
}

fn put_map(m: &mut Map<String, Value>, key: &str, v: &HashMap<String, String>) {
    if !v.is_empty() {
        let obj = v
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        m.insert(key.to_string(), Value::Object(obj));
    }
}

fn put_duration(m: &mut Map<String, Value>, key: &str, v: &Option<prost_types::Duration>) {
    if let Some(d) = v {
        m.insert(key.to_string(), Value::String(format_duration(d)));
    }
}

fn topic_json(t: &pb::Topic) -> Value {
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

fn subscription_json(s: &pb::Subscription) -> Value {
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

fn message_json(msg: &pb::PubsubMessage) -> Value {
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

fn received_json(r: &pb::ReceivedMessage) -> Value {
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
fn ack_outcome(r: pubrun_broker::AckResult) -> Outcome {
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

fn list_json(key: &str, items: Vec<Value>, next_page_token: &str) -> Value {
    let mut m = Map::new();
    if !items.is_empty() {
        m.insert(key.to_string(), Value::Array(items));
    }
    put_str(&mut m, "nextPageToken", next_page_token);
    Value::Object(m)
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

type Body = std::result::Result<Bytes, BytesRejection>;
type OneParam = std::result::Result<Path<String>, PathRejection>;
type TwoParams = std::result::Result<Path<(String, String)>, PathRejection>;

/// The checks every GET-only list endpoint makes, in order: the path
/// parameters, the method, then `pageSize`/`pageToken`.
fn list_params<T>(
    method: &Method,
    uri: &Uri,
    path: std::result::Result<Path<T>, PathRejection>,
    q: Option<String>,
) -> std::result::Result<(T, i32, String), Fail> {
    let params = path_params(path)?;
    if method != Method::GET {
        return Err(method_not_allowed(method, uri, "GET"));
    }
    let (page_size, page_token) = page_params(q)?;
    Ok((params, page_size, page_token))
}

fn topic_name(project: &str, id: &str) -> String {
    format!("projects/{project}/topics/{id}")
}

fn subscription_name(project: &str, id: &str) -> String {
    format!("projects/{project}/subscriptions/{id}")
}

async fn topics_collection(
    State(ps): State<PubSub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    path: OneParam,
    RawQuery(q): RawQuery,
) -> Response {
    finish(
        async {
            let (project, page_size, page_token) = list_params(&method, &uri, path, q)?;
            let r = ps.list_topics(pb::ListTopicsRequest {
                project: format!("projects/{project}"),
                page_size,
                page_token,
            })?;
            Ok(list_json(
                "topics",
                r.topics.iter().map(topic_json).collect(),
                &r.next_page_token,
            ))
        }
        .await,
    )
}

async fn topic_resource(
    State(ps): State<PubSub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    path: TwoParams,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    finish(
        async {
            let (project, seg) = path_params(path)?;
            let (id, verb) = split_verb(&seg);
            let name = topic_name(&project, id);
            match verb {
                None => {
                    parse_query(q, &[])?;
                    match method {
                        Method::PUT => {
                            let t: TopicJson = parse_body(body)?;
                            Ok(topic_json(&ps.create_topic(t.into_pb("", name)?).await?))
                        }
                        Method::GET => Ok(topic_json(&ps.get_topic(pb::GetTopicRequest { topic: name })?)),
                        Method::PATCH => {
                            let u: UpdateTopicJson = parse_body(body)?;
                            let topic = from_object::<TopicJson>("topic", u.topic.unwrap_or_default())?;
                            let topic = topic.into_pb("topic.", name)?;
                            let r =
                                pb::UpdateTopicRequest { topic: Some(topic), update_mask: field_mask(u.update_mask) };
                            Ok(topic_json(&ps.update_topic(r).await?))
                        }
                        Method::DELETE => {
                            ps.delete_topic(pb::DeleteTopicRequest { topic: name }).await?;
                            Ok(empty())
                        }
                        _ => Err(method_not_allowed(&method, &uri, "GET, PUT, PATCH, DELETE")),
                    }
                }
                Some("publish") => {
                    if method != Method::POST {
                        return Err(method_not_allowed(&method, &uri, "POST"));
                    }
                    parse_query(q, &[])?;
                    let p: PublishJson = parse_body(body)?;
                    let mut messages = Vec::with_capacity(p.messages.len());
                    for (i, m) in p.messages.into_iter().enumerate() {
                        let m: MessageJson = from_object(&format!("messages[{i}]"), m)?;
                        let data = match m.data.as_deref() {
                            None | Some("") => Bytes::new(),
                            Some(s) => decode_base64(s).map_err(|e| {
                                Error::invalid(format!(
                                    "Invalid value at 'messages[{i}].data' (TYPE_BYTES), base64 decoding failed: {e}"
                                ))
                            })?,
                        };
                        messages.push(pb::PubsubMessage {
                            data,
                            attributes: m.attributes,
                            message_id: m.message_id.unwrap_or_default(),
                            publish_time: timestamp(&format!("messages[{i}].publish_time"), &m.publish_time)?,
                            ordering_key: m.ordering_key.unwrap_or_default(),
                        });
                    }
                    let r = ps.publish(pb::PublishRequest { topic: name, messages }).await?;
                    let mut m = Map::new();
                    m.insert("messageIds".into(), r.message_ids.into());
                    Ok(Value::Object(m))
                }
                Some(other) => Err(unknown_verb(&uri, "topics", other, "publish")),
            }
        }
        .await,
    )
}

async fn topic_subscriptions(
    State(ps): State<PubSub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    path: TwoParams,
    RawQuery(q): RawQuery,
) -> Response {
    finish(
        async {
            let ((project, topic), page_size, page_token) = list_params(&method, &uri, path, q)?;
            let r = ps.list_topic_subscriptions(pb::ListTopicSubscriptionsRequest {
                topic: topic_name(&project, &topic),
                page_size,
                page_token,
            })?;
            Ok(list_json(
                "subscriptions",
                r.subscriptions.into_iter().map(Value::String).collect(),
                &r.next_page_token,
            ))
        }
        .await,
    )
}

async fn topic_snapshots(
    State(ps): State<PubSub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    path: TwoParams,
    RawQuery(q): RawQuery,
) -> Response {
    finish(
        async {
            let ((project, topic), page_size, page_token) = list_params(&method, &uri, path, q)?;
            snapshots::topic_snapshots(&ps, topic_name(&project, &topic), page_size, page_token)
        }
        .await,
    )
}

async fn subscriptions_collection(
    State(ps): State<PubSub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    path: OneParam,
    RawQuery(q): RawQuery,
) -> Response {
    finish(
        async {
            let (project, page_size, page_token) = list_params(&method, &uri, path, q)?;
            let r = ps.list_subscriptions(pb::ListSubscriptionsRequest {
                project: format!("projects/{project}"),
                page_size,
                page_token,
            })?;
            Ok(list_json(
                "subscriptions",
                r.subscriptions.iter().map(subscription_json).collect(),
                &r.next_page_token,
            ))
        }
        .await,
    )
}

const SUBSCRIPTION_VERBS: &str =
    "pull, acknowledge, modifyAckDeadline, modifyPushConfig, seek, detach";

#[allow(deprecated)] // PullRequest.return_immediately
async fn subscription_resource(
    State(ps): State<PubSub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    path: TwoParams,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    finish(
        async {
            let (project, seg) = path_params(path)?;
            let (id, verb) = split_verb(&seg);
            let name = subscription_name(&project, id);
            let Some(verb) = verb else {
                parse_query(q, &[])?;
                return match method {
                    Method::PUT => {
                        let s: SubscriptionJson = parse_body(body)?;
                        Ok(subscription_json(
                            &ps.create_subscription(s.into_pb("", name)?).await?,
                        ))
                    }
                    Method::GET => Ok(subscription_json(
                        &ps.get_subscription(pb::GetSubscriptionRequest { subscription: name })?,
                    )),
                    Method::PATCH => {
                        let u: UpdateSubscriptionJson = parse_body(body)?;
                        let sub = from_object::<SubscriptionJson>(
                            "subscription",
                            u.subscription.unwrap_or_default(),
                        )?;
                        let sub = sub.into_pb("subscription.", name)?;
                        let r = pb::UpdateSubscriptionRequest {
                            subscription: Some(sub),
                            update_mask: field_mask(u.update_mask),
                        };
                        Ok(subscription_json(&ps.update_subscription(r).await?))
                    }
                    Method::DELETE => {
                        ps.delete_subscription(pb::DeleteSubscriptionRequest {
                            subscription: name,
                        })
                        .await?;
                        Ok(empty())
                    }
                    _ => Err(method_not_allowed(&method, &uri, "GET, PUT, PATCH, DELETE")),
                };
            };
            if !SUBSCRIPTION_VERBS.split(", ").any(|v| v == verb) {
                return Err(unknown_verb(
                    &uri,
                    "subscriptions",
                    verb,
                    SUBSCRIPTION_VERBS,
                ));
            }
            if method != Method::POST {
                return Err(method_not_allowed(&method, &uri, "POST"));
            }
            parse_query(q, &[])?;
            match verb {
                "pull" => {
                    let p: PullJson = parse_body(body)?;
                    let r = pb::PullRequest {
                        subscription: name,
                        return_immediately: p.return_immediately.unwrap_or_default(),
                        max_messages: int32("max_messages", &p.max_messages)?,
                    };
                    let got = ps.pull(r, None).await?;
                    Ok(list_json(
                        "receivedMessages",
                        got.received_messages.iter().map(received_json).collect(),
                        "",
                    ))
                }
                "acknowledge" => {
                    let a: AcknowledgeJson = parse_body(body)?;
                    let r = ps
                        .acknowledge(pb::AcknowledgeRequest {
                            subscription: name,
                            ack_ids: a.ack_ids,
                        })
                        .await?;
                    ack_outcome(r)
                }
                "modifyAckDeadline" => {
                    let m: ModifyAckDeadlineJson = parse_body(body)?;
                    let r = ps.modify_ack_deadline(pb::ModifyAckDeadlineRequest {
                        subscription: name,
                        ack_ids: m.ack_ids,
                        ack_deadline_seconds: int32(
                            "ack_deadline_seconds",
                            &m.ack_deadline_seconds,
                        )?,
                    })?;
                    ack_outcome(r)
                }
                "modifyPushConfig" => {
                    let m: ModifyPushConfigJson = parse_body(body)?;
                    ps.modify_push_config(pb::ModifyPushConfigRequest {
                        subscription: name,
                        push_config: push_config_json("push_config", m.push_config)?,
                    })
                    .await?;
                    Ok(empty())
                }
                "seek" => snapshots::seek(&ps, name, body).await,
                _ => Err(unimplemented("DetachSubscription")),
            }
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_in_proto3_json_form() {
        for (text, secs, nanos) in [
            ("604800s", 604800, 0),
            ("3.5s", 3, 500_000_000),
            ("0.000001s", 0, 1000),
            ("-1.000000001s", -1, -1),
        ] {
            let d = parse_duration(text).unwrap();
            assert_eq!((d.seconds, d.nanos), (secs, nanos), "{text}");
        }
        assert_eq!(
            format_duration(&prost_types::Duration {
                seconds: 3,
                nanos: 500_000_000
            }),
            "3.500s"
        );
        assert_eq!(
            format_duration(&prost_types::Duration {
                seconds: 604800,
                nanos: 0
            }),
            "604800s"
        );
        for bad in [
            "",
            "s",
            "10",
            "1.s",
            "1.0000000001s",
            "abc s",
            "1e3s",
            "+1s",
        ] {
            assert!(parse_duration(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_z_normalized_with_3_6_or_9_digits() {
        let t = |seconds, nanos| format_timestamp(&prost_types::Timestamp { seconds, nanos });
        assert_eq!(t(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(t(1_700_000_000, 120_000_000), "2023-11-14T22:13:20.120Z");
        assert_eq!(
            t(1_700_000_000, 123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
    }

    #[test]
    fn base64_accepts_both_alphabets_with_or_without_padding() {
        let want = Bytes::from_static(&[0xfb, 0xff, 0xfe, 0x41]);
        for s in ["+//+QQ==", "+//+QQ", "-__-QQ==", "-__-QQ"] {
            assert_eq!(decode_base64(s).unwrap(), want, "{s}");
        }
        assert!(decode_base64("not base64!").is_err());
    }

    #[test]
    fn masks_and_query_names_convert_case() {
        let m = field_mask(Some(
            "ackDeadlineSeconds, labels,message_retention_duration".into(),
        ))
        .unwrap();
        assert_eq!(
            m.paths,
            [
                "ack_deadline_seconds",
                "labels",
                "message_retention_duration"
            ]
        );
        assert_eq!(snake_to_camel("page_token"), "pageToken");
        assert_eq!(
            percent_decode("projects%2Fp+x").ok().unwrap(),
            "projects/p x"
        );
        assert!(percent_decode("%zz").is_err());
    }
}
