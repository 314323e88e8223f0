//! `pubrun topics …` and `pubrun subscriptions …`.

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use super::api::Api;
use super::args::{ConnArgs, NameArgs};
use super::{names, output, SubscriptionsCommand, TopicsCommand};

pub async fn topics(cmd: TopicsCommand) -> Result<()> {
    match cmd {
        TopicsCommand::Create { name, labels, conn } => {
            let api = Api::new(&conn)?;
            let topic = names::topic(&conn.project, &name)?;
            let mut body = Map::new();
            if !labels.is_empty() {
                body.insert("labels".into(), string_map("label", &labels)?);
            }
            let resp = api
                .put(&names::topic_path(&topic), &Value::Object(body))
                .await?;
            done(&conn, &resp, &format!("created topic {topic}"))
        }
        TopicsCommand::List(conn) => {
            list_in_project(&conn, "topics", &["TOPIC", "LABELS"], |t| {
                let name = str_field(t, "name");
                vec![
                    names::short(name, &conn.project, "topics").to_string(),
                    output::map_pairs(t.get("labels").unwrap_or(&Value::Null)),
                ]
            })
            .await
        }
        TopicsCommand::Get(NameArgs { name, conn }) => {
            let api = Api::new(&conn)?;
            let topic = names::topic(&conn.project, &name)?;
            let resp = api.get(&names::topic_path(&topic)).await?;
            show(&conn, &resp)
        }
        TopicsCommand::Delete(NameArgs { name, conn }) => {
            let api = Api::new(&conn)?;
            let topic = names::topic(&conn.project, &name)?;
            let resp = api.delete(&names::topic_path(&topic)).await?;
            done(&conn, &resp, &format!("deleted topic {topic}"))
        }
    }
}

/// Every one of the project's `collection` (Google's paged list) as a table,
/// or as `{"<collection>": [...]}` with `--json`.
pub async fn list_in_project(
    conn: &ConnArgs,
    collection: &str,
    headers: &[&str],
    row: impl FnMut(&Value) -> Vec<String>,
) -> Result<()> {
    let api = Api::new(conn)?;
    let path = names::project_path(&conn.project, collection);
    let items = api.list_all(&path, collection).await?;
    let mut whole = Map::new();
    whole.insert(collection.to_string(), Value::Array(items.clone()));
    output::list(
        conn.json,
        &Value::Object(whole),
        &items,
        Some(&format!("no {collection} in projects/{}", conn.project)),
        headers,
        row,
    )
}

pub async fn subscriptions(cmd: SubscriptionsCommand) -> Result<()> {
    match cmd {
        SubscriptionsCommand::Create {
            name,
            topic,
            ack_deadline,
            filter,
            enable_message_ordering,
            push_endpoint,
            labels,
            conn,
        } => {
            let api = Api::new(&conn)?;
            let sub = names::subscription(&conn.project, &name)?;
            let topic = names::topic(&conn.project, &topic)?;
            let mut body = Map::new();
            body.insert("topic".into(), json!(topic.to_string()));
            if let Some(secs) = ack_deadline {
                body.insert("ackDeadlineSeconds".into(), json!(secs));
            }
            if let Some(f) = filter {
                body.insert("filter".into(), json!(f));
            }
            if enable_message_ordering {
                body.insert("enableMessageOrdering".into(), json!(true));
            }
            if let Some(url) = push_endpoint {
                body.insert("pushConfig".into(), json!({ "pushEndpoint": url }));
            }
            if !labels.is_empty() {
                body.insert("labels".into(), string_map("label", &labels)?);
            }
            let resp = api
                .put(&names::subscription_path(&sub), &Value::Object(body))
                .await?;
            done(
                &conn,
                &resp,
                &format!("created subscription {sub} on {topic}"),
            )
        }
        SubscriptionsCommand::List {
            topic: Some(topic),
            conn,
        } => {
            let api = Api::new(&conn)?;
            let topic = names::topic(&conn.project, &topic)?;
            let path = format!("{}/subscriptions", names::topic_path(&topic));
            // Google answers this one with names only.
            let subs = api.list_all(&path, "subscriptions").await?;
            output::list(
                conn.json,
                &json!({ "subscriptions": subs }),
                &subs,
                Some(&format!("no subscriptions on {topic}")),
                &["SUBSCRIPTION"],
                |s| {
                    let name = s.as_str().unwrap_or_else(|| str_field(s, "name"));
                    vec![names::short(name, &conn.project, "subscriptions").to_string()]
                },
            )
        }
        SubscriptionsCommand::List { topic: None, conn } => {
            list_in_project(
                &conn,
                "subscriptions",
                &["SUBSCRIPTION", "TOPIC", "ACK DEADLINE", "LABELS"],
                |s| {
                    let ack = match s.get("ackDeadlineSeconds") {
                        Some(Value::Number(n)) => format!("{n}s"),
                        Some(Value::String(n)) if !n.is_empty() => format!("{n}s"),
                        _ => "-".into(),
                    };
                    vec![
                        names::short(str_field(s, "name"), &conn.project, "subscriptions")
                            .to_string(),
                        names::short(str_field(s, "topic"), &conn.project, "topics").to_string(),
                        ack,
                        output::map_pairs(s.get("labels").unwrap_or(&Value::Null)),
                    ]
                },
            )
            .await
        }
        SubscriptionsCommand::Get(NameArgs { name, conn }) => {
            let api = Api::new(&conn)?;
            let sub = names::subscription(&conn.project, &name)?;
            let resp = api.get(&names::subscription_path(&sub)).await?;
            show(&conn, &resp)
        }
        SubscriptionsCommand::ModifyPush {
            name,
            push_endpoint,
            conn,
        } => {
            let api = Api::new(&conn)?;
            let sub = names::subscription(&conn.project, &name)?;
            let config = match &push_endpoint {
                Some(url) => json!({ "pushEndpoint": url }),
                None => json!({}),
            };
            let path = format!("{}:modifyPushConfig", names::subscription_path(&sub));
            let resp = api.post(&path, &json!({ "pushConfig": config })).await?;
            let message = match push_endpoint {
                Some(url) => format!("subscription {sub} now pushes to {url}"),
                None => format!("subscription {sub} is now a pull subscription"),
            };
            done(&conn, &resp, &message)
        }
        SubscriptionsCommand::Seek(args) => super::snapshots::seek(args).await,
        SubscriptionsCommand::Delete(NameArgs { name, conn }) => {
            let api = Api::new(&conn)?;
            let sub = names::subscription(&conn.project, &name)?;
            let resp = api.delete(&names::subscription_path(&sub)).await?;
            done(&conn, &resp, &format!("deleted subscription {sub}"))
        }
    }
}

/// `KEY=VALUE` pairs as a JSON object; a key given twice is an error.
pub fn string_map(what: &str, pairs: &[(String, String)]) -> Result<Value> {
    let mut m = Map::new();
    for (k, v) in pairs {
        if m.insert(k.clone(), json!(v)).is_some() {
            bail!("{what} `{k}` is given more than once");
        }
    }
    Ok(Value::Object(m))
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn done(conn: &ConnArgs, resp: &Value, message: &str) -> Result<()> {
    if conn.json {
        output::json(resp)
    } else {
        output::out(&format!("{message}\n"))
    }
}

fn show(conn: &ConnArgs, resp: &Value) -> Result<()> {
    if conn.json {
        output::json(resp)
    } else {
        output::out(&output::fields(resp))
    }
}
