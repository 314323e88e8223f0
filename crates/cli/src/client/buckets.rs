//! `pubrun buckets …`, `pubrun objects …` (the Cloud Storage JSON API) and
//! `pubrun webhooks list` (pubrun's `/api/v1/webhooks`).

use anyhow::Result;
use reqwest::Method;
use serde_json::{json, Value};

use super::api::{segment, Api};
use super::{output, BucketsCommand, ConnArgs, ObjectsCommand};

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

pub async fn buckets(cmd: BucketsCommand) -> Result<()> {
    match cmd {
        BucketsCommand::List(conn) => {
            let api = Api::new(&conn)?;
            let resp = api
                .call(
                    Method::GET,
                    "/storage/v1/b",
                    &[("project", conn.project.as_str())],
                    None,
                )
                .await?;
            output::list(
                conn.json,
                &resp,
                output::items(&resp, "items"),
                None,
                &["NAME", "LOCATION", "CREATED"],
                |b| vec![s(b, "name"), s(b, "location"), s(b, "timeCreated")],
            )
        }
        BucketsCommand::Create { name, conn } => {
            let api = Api::new(&conn)?;
            let resp = api
                .call(
                    Method::POST,
                    "/storage/v1/b",
                    &[("project", conn.project.as_str())],
                    Some(&json!({ "name": name })),
                )
                .await?;
            if conn.json {
                return output::json(&resp);
            }
            output::out(&format!("created bucket {}\n", s(&resp, "name")))
        }
        BucketsCommand::Delete { name, conn } => {
            let api = Api::new(&conn)?;
            api.call(
                Method::DELETE,
                &format!("/storage/v1/b/{}", segment(&name)),
                &[],
                None,
            )
            .await?;
            if conn.json {
                return output::json(&json!({}));
            }
            output::out(&format!("deleted bucket {name}\n"))
        }
    }
}

pub async fn objects(cmd: ObjectsCommand) -> Result<()> {
    match cmd {
        ObjectsCommand::List {
            bucket,
            prefix,
            conn,
        } => {
            // gsutil habit: `objects ls gs://BUCKET/PREFIX`.
            let (bucket, prefix) = match bucket.strip_prefix("gs://") {
                Some(rest) => match rest.split_once('/') {
                    Some((b, p)) if prefix.is_empty() => (b.to_string(), p.to_string()),
                    Some((b, _)) => (b.to_string(), prefix),
                    None => (rest.to_string(), prefix),
                },
                None => (bucket, prefix),
            };
            let api = Api::new(&conn)?;
            let items = super::objects::list(&api, &bucket, &prefix).await?;
            output::list(
                conn.json,
                &json!({ "items": items }),
                &items,
                None,
                &["NAME", "SIZE", "GENERATION", "UPDATED"],
                |o| {
                    vec![
                        s(o, "name"),
                        s(o, "size"),
                        s(o, "generation"),
                        s(o, "updated"),
                    ]
                },
            )
        }
        ObjectsCommand::Transfer(cmd) => super::objects::run(cmd).await,
    }
}

pub async fn webhooks(conn: ConnArgs) -> Result<()> {
    output::get_list(
        &conn,
        "/api/v1/webhooks",
        "webhooks",
        None,
        &["NAME", "PATH", "AUTH", "TOPIC"],
        |w| {
            vec![
                s(w, "name"),
                format!("/hooks/{}", s(w, "name")),
                s(w, "auth"),
                s(w, "topic"),
            ]
        },
    )
    .await
}
