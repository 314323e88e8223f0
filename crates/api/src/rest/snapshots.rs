//! REST v1 for snapshots and seek, as Google's `http` annotations define them:
//!
//! | method | path | rpc |
//! |---|---|---|
//! | PUT / GET / PATCH / DELETE | `/v1/projects/P/snapshots/S` | Create / Get / Update / DeleteSnapshot |
//! | GET | `/v1/projects/P/snapshots` | ListSnapshots |
//! | POST | `/v1/projects/P/subscriptions/S:seek` | Seek |

use std::collections::HashMap;

use axum::http::Method;
use pubrun_core::Error;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    deleted, empty, format_timestamp, nullable, parse_body, parse_query, parse_update, put_map,
    put_str, timestamp, Body, Fail, Outcome, Resource, STANDARD_METHODS,
};
use crate::grpc::PubSub;
use crate::pb;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct CreateSnapshotJson {
    subscription: Option<String>,
    #[serde(deserialize_with = "nullable")]
    labels: HashMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    tags: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct SnapshotJson {
    name: Option<String>,
    topic: Option<String>,
    expire_time: Option<Value>,
    #[serde(deserialize_with = "nullable")]
    labels: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct SeekJson {
    #[allow(dead_code)]
    subscription: Option<String>,
    time: Option<Value>,
    snapshot: Option<String>,
}

pub(super) fn snapshot_json(s: &pb::Snapshot) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "name", &s.name);
    put_str(&mut m, "topic", &s.topic);
    if let Some(t) = &s.expire_time {
        m.insert("expireTime".into(), format_timestamp(t).into());
    }
    let labels: HashMap<String, String> = s.labels.clone().into_iter().collect();
    put_map(&mut m, "labels", &labels);
    Value::Object(m)
}

fn snapshot_name(project: &str, id: &str) -> String {
    format!("projects/{project}/snapshots/{id}")
}

pub(super) async fn snapshot_resource(ps: PubSub, mut on: Resource, body: Body) -> Outcome {
    if on.segment.contains(':') {
        return Err(Error::not_found(format!("{} has no custom methods", on.uri.path())).into());
    }
    let name = snapshot_name(&on.project, &on.segment);
    parse_query(on.query.take(), &[])?;
    match on.method {
        Method::PUT => {
            let c: CreateSnapshotJson = parse_body(body)?;
            let r = pb::CreateSnapshotRequest {
                name,
                subscription: c.subscription.unwrap_or_default(),
                labels: c.labels.into_iter().collect(),
                tags: c.tags.into_iter().collect(),
            };
            Ok(snapshot_json(&ps.create_snapshot(r).await?))
        }
        Method::GET => Ok(snapshot_json(
            &ps.get_snapshot(pb::GetSnapshotRequest { snapshot: name })?,
        )),
        Method::PATCH => {
            let (s, update_mask) = parse_update::<SnapshotJson>(body, "snapshot")?;
            let snapshot = Some(pb::Snapshot {
                name,
                topic: s.topic.unwrap_or_default(),
                expire_time: timestamp("snapshot.expire_time", &s.expire_time)?,
                labels: s.labels.into_iter().collect(),
            });
            let _ = s.name; // the path names the snapshot
            let r = pb::UpdateSnapshotRequest {
                snapshot,
                update_mask,
            };
            Ok(snapshot_json(&ps.update_snapshot(r).await?))
        }
        Method::DELETE => deleted(
            ps.delete_snapshot(pb::DeleteSnapshotRequest { snapshot: name })
                .await,
        ),
        _ => Err(on.not_allowed(STANDARD_METHODS)),
    }
}

/// `POST /v1/projects/P/subscriptions/S:seek` with `{"time": ...}` or `{"snapshot": ...}`.
pub(super) async fn seek(ps: &PubSub, subscription: String, body: Body) -> Outcome {
    let s: SeekJson = parse_body(body)?;
    let target = match (timestamp("time", &s.time)?, s.snapshot) {
        (Some(t), None) => Some(pb::seek_request::Target::Time(t)),
        (None, Some(n)) => Some(pb::seek_request::Target::Snapshot(n)),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(
                Error::invalid("set only one of time and snapshot (they are a oneof)").into(),
            )
        }
    };
    ps.seek(pb::SeekRequest {
        subscription,
        target,
    })
    .await
    .map_err(Fail::from)?;
    Ok(empty())
}
