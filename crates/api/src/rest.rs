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
use axum::extract::{FromRequestParts, OriginalUri, Path, RawQuery, State};
use axum::http::request::Parts;
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

mod codec;
mod snapshots;
mod subscriptions;
mod topics;
mod types;

use codec::*;
use subscriptions::*;
use topics::*;
use types::*;

/// Routes for `/v1/projects/{project}/topics/...` and `/subscriptions/...`.
pub fn router(pubsub: PubSub) -> Router {
    let projects = Router::new()
        .route(
            "/{project}/topics",
            listing("topics", in_project, PubSub::list_topics),
        )
        .route("/{project}/topics/{topic}", resource(topic_resource))
        .route(
            "/{project}/topics/{topic}/subscriptions",
            listing("subscriptions", of_topic, PubSub::list_topic_subscriptions),
        )
        .route(
            "/{project}/topics/{topic}/snapshots",
            listing("snapshots", of_topic, PubSub::list_topic_snapshots),
        )
        .route(
            "/{project}/snapshots",
            listing("snapshots", in_project, PubSub::list_snapshots),
        )
        .route(
            "/{project}/snapshots/{snapshot}",
            resource(snapshots::snapshot_resource),
        )
        .route(
            "/{project}/subscriptions",
            listing("subscriptions", in_project, PubSub::list_subscriptions),
        )
        .route(
            "/{project}/subscriptions/{subscription}",
            resource(subscription_resource),
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

/// The answer to a Delete call: `{}` once done.
fn deleted(done: pubrun_core::Result<()>) -> Outcome {
    done?;
    Ok(empty())
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
// Handlers
// ---------------------------------------------------------------------------

type Body = std::result::Result<Bytes, BytesRejection>;

/// What every handler reads before its body: the method, the path as the
/// client sent it (for error messages), the path parameters (checked by the
/// handler, so a bad one is answered in Google's shape) and the raw query.
struct Call<T> {
    method: Method,
    uri: Uri,
    path: std::result::Result<Path<T>, PathRejection>,
    query: Option<String>,
}

impl<T, S> FromRequestParts<S> for Call<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let path = Path::<T>::from_request_parts(parts, state).await;
        let OriginalUri(uri) = OriginalUri::from_request_parts(parts, state).await?;
        let RawQuery(query) = RawQuery::from_request_parts(parts, state).await?;
        Ok(Call {
            method: parts.method.clone(),
            uri,
            path,
            query,
        })
    }
}

/// A call on one resource, `/v1/projects/{project}/COLLECTION/{segment}`.
struct Resource {
    method: Method,
    uri: Uri,
    project: String,
    /// The resource id, with `:verb` after it for a custom method.
    segment: String,
    query: Option<String>,
}

/// The methods of a resource besides its custom ones.
const STANDARD_METHODS: &str = "GET, PUT, PATCH, DELETE";

impl Resource {
    /// 405 for a method this resource (or custom method) does not take.
    fn not_allowed(&self, allowed: &'static str) -> Fail {
        method_not_allowed(&self.method, &self.uri, allowed)
    }
}

/// The route of one resource's handler: checks the path parameters first,
/// then answers what `handle` returns (failures in Google's error shape).
fn resource<F, Fut>(handle: F) -> axum::routing::MethodRouter<PubSub>
where
    F: Fn(PubSub, Resource, Body) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    any(
        move |State(ps): State<PubSub>, call: Call<(String, String)>, body: Body| {
            let handle = handle.clone();
            async move {
                let (project, segment) = match path_params(call.path) {
                    Ok(p) => p,
                    Err(Fail(r)) => return *r,
                };
                let on = Resource {
                    method: call.method,
                    uri: call.uri,
                    project,
                    segment,
                    query: call.query,
                };
                finish(handle(ps, on, body).await)
            }
        },
    )
}

/// The route of a GET-only list: `parent` makes the full name of what the
/// path names, `list` answers the page (see [`Call::page`]).
fn listing<P, Req, Resp>(
    key: &'static str,
    parent: fn(P) -> String,
    list: fn(&PubSub, Req) -> pubrun_core::Result<Resp>,
) -> axum::routing::MethodRouter<PubSub>
where
    P: DeserializeOwned + Send + 'static,
    Req: ListRequest + 'static,
    Resp: ListResponse + 'static,
{
    any(move |State(ps): State<PubSub>, call: Call<P>| async move {
        call.page(key, |p, page_size, page_token| {
            let r = list(&ps, Req::new(parent(p), page_size, page_token))?;
            Ok(r.page())
        })
    })
}

fn in_project(project: String) -> String {
    format!("projects/{project}")
}

fn of_topic((project, topic): (String, String)) -> String {
    topic_name(&project, &topic)
}

/// A List request, from its parent's full name and the page asked for.
trait ListRequest {
    fn new(parent: String, page_size: i32, page_token: String) -> Self;
}

/// A List answer as a page: its items in proto3 JSON and the next page's token.
trait ListResponse {
    fn page(self) -> (Vec<Value>, String);
}

macro_rules! lists {
    ($($req:ident($parent:ident) -> $resp:ident.$items:ident as $json:expr;)*) => {$(
        impl ListRequest for pb::$req {
            fn new(parent: String, page_size: i32, page_token: String) -> Self {
                pb::$req { $parent: parent, page_size, page_token }
            }
        }

        impl ListResponse for pb::$resp {
            fn page(self) -> (Vec<Value>, String) {
                (self.$items.into_iter().map($json).collect(), self.next_page_token)
            }
        }
    )*};
}

lists! {
    ListTopicsRequest(project) -> ListTopicsResponse.topics as |t| topic_json(&t);
    ListSubscriptionsRequest(project) -> ListSubscriptionsResponse.subscriptions
        as |s| subscription_json(&s);
    ListSnapshotsRequest(project) -> ListSnapshotsResponse.snapshots
        as |s| snapshots::snapshot_json(&s);
    ListTopicSubscriptionsRequest(topic) -> ListTopicSubscriptionsResponse.subscriptions
        as Value::String;
    ListTopicSnapshotsRequest(topic) -> ListTopicSnapshotsResponse.snapshots as Value::String;
}

impl<T> Call<T> {
    /// Answers a GET-only list endpoint. Its checks, in order: the path
    /// parameters, the method, then `pageSize`/`pageToken`; `list` fetches
    /// the page (items and next token) answered as
    /// `{key: [...], "nextPageToken": "..."}`.
    fn page(
        self,
        key: &str,
        list: impl FnOnce(T, i32, String) -> pubrun_core::Result<(Vec<Value>, String)>,
    ) -> Response {
        let page = (|| {
            let params = path_params(self.path)?;
            if self.method != Method::GET {
                return Err(method_not_allowed(&self.method, &self.uri, "GET"));
            }
            let (page_size, page_token) = page_params(self.query)?;
            Ok(list(params, page_size, page_token)?)
        })();
        finish(page.map(|(items, next)| list_json(key, items, &next)))
    }
}

fn topic_name(project: &str, id: &str) -> String {
    format!("projects/{project}/topics/{id}")
}

fn subscription_name(project: &str, id: &str) -> String {
    format!("projects/{project}/subscriptions/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_in_either_spelling_once() {
        let read = |v: Value| from_object::<AcknowledgeJson>("", v);
        let both = ["ackIds", "ack_ids"].map(|k| read(serde_json::json!({ k: ["a"] })));
        for a in both {
            assert_eq!(a.unwrap().ack_ids, ["a"]);
        }
        let twice = read(serde_json::json!({"ackIds": ["a"], "ack_ids": ["b"]}));
        let twice = twice.err().expect("a field given twice is an error");
        assert!(
            twice.message.contains("duplicate field `ackIds`"),
            "{twice:?}"
        );
        // Unknown names are quoted as sent, also when they look like snake_case.
        for k in ["ack_Ids", "ack_idz", "ackIdz"] {
            let e = read(serde_json::json!({ k: [] })).err().expect(k);
            assert!(
                e.message.contains(&format!("Unknown name \"{k}\"")),
                "{e:?}"
            );
        }
    }

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
