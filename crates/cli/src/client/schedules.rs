//! `pubrun schedules …` (pubrun's REST API under `/api/v1/schedules`).

use anyhow::Result;
use serde_json::{json, Value};

use super::api::{segment, Api};
use super::{output, SchedulesCommand};

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    }
}

fn row(s: &Value) -> Vec<String> {
    let state = if s.get("paused").and_then(Value::as_bool).unwrap_or(false) {
        "paused"
    } else {
        "active"
    };
    vec![
        text(s, "name"),
        text(s, "cron"),
        text(s, "timeZone"),
        state.to_string(),
        text(s, "nextFireTime"),
        text(s, "lastFireTime"),
        text(s, "topic"),
    ]
}

const HEADERS: [&str; 7] = [
    "NAME",
    "CRON",
    "TIME ZONE",
    "STATE",
    "NEXT",
    "LAST",
    "TOPIC",
];

pub async fn schedules(cmd: SchedulesCommand) -> Result<()> {
    match cmd {
        SchedulesCommand::List(conn) => {
            output::get_list(
                &conn,
                "/api/v1/schedules",
                "schedules",
                Some(
                    "no schedules (declare [[schedule]] tables in the manifest and `pubrun apply`)",
                ),
                &HEADERS,
                row,
            )
            .await
        }
        SchedulesCommand::Pause { name, conn } => change(&name, "pause", &conn).await,
        SchedulesCommand::Resume { name, conn } => change(&name, "resume", &conn).await,
        SchedulesCommand::RunNow { name, conn } => change(&name, "run-now", &conn).await,
    }
}

async fn change(name: &str, verb: &str, conn: &super::ConnArgs) -> Result<()> {
    let api = Api::new(conn)?;
    let path = format!("/api/v1/schedules/{}/{verb}", segment(name));
    let resp = api.post(&path, &json!({})).await?;
    if conn.json {
        return output::json(&resp);
    }
    match verb {
        "run-now" => {
            let id = resp
                .get("messageId")
                .map(|v| text(&json!({"v": v}), "v"))
                .unwrap_or_else(|| "-".into());
            output::out(&format!("schedule {name} fired now: message {id}\n"))
        }
        _ => {
            let s = resp.get("schedule").unwrap_or(&resp);
            output::out(&output::table(&HEADERS, &[row(s)]))
        }
    }
}
