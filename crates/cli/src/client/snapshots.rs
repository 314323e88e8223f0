//! `pubrun snapshots …` and `pubrun subscriptions seek …` over Google's
//! REST v1 (`/v1/projects/P/snapshots/S`, `/v1/…/subscriptions/S:seek`).

use anyhow::Result;
use pubrun_core::names::SnapshotName;
use serde_json::{json, Map, Value};

use super::api::Api;
use super::args::{parse_key_value, ConnArgs, NameArgs, SNAPSHOT_NAME};
use super::resources::{list_in_project, string_map};
use super::{names, output};

#[derive(clap::Subcommand)]
pub enum SnapshotsCommand {
    /// Capture a subscription's acknowledgement state (its unacked messages and
    /// everything published after now) for a later `subscriptions seek --snapshot`.
    Create {
        /// Snapshot id (in --project) or full name projects/P/snapshots/S.
        name: String,
        /// Subscription to capture: id (in --project) or full name.
        #[arg(long)]
        subscription: String,
        /// Label to set on the snapshot (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the project's snapshots.
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Show one snapshot.
    #[command(visible_alias = "describe")]
    #[command(mut_arg("name", |a| a.help(SNAPSHOT_NAME)))]
    Get(NameArgs),
    /// Delete a snapshot.
    #[command(visible_alias = "rm")]
    #[command(mut_arg("name", |a| a.help(SNAPSHOT_NAME)))]
    Delete(NameArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["time", "snapshot"])))]
pub struct SeekArgs {
    /// Subscription id (in --project) or full name projects/P/subscriptions/S.
    pub subscription: String,
    /// Messages published before this RFC 3339 time become acked, later ones
    /// unacked (acked ones only if retained), e.g. 2024-05-01T12:00:00Z.
    #[arg(long, value_name = "RFC3339")]
    pub time: Option<String>,
    /// Restore the acknowledgement state a snapshot captured (id or full name).
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `nightly` (in `project`) or `projects/P/snapshots/nightly`.
fn snapshot(project: &str, arg: &str) -> Result<SnapshotName> {
    names::resource(
        project,
        arg,
        "snapshot",
        "nightly",
        SnapshotName::parse,
        SnapshotName::new,
    )
}

fn snapshot_path(s: &SnapshotName) -> String {
    format!(
        "/v1/projects/{}/snapshots/{}",
        names::segment(s.project().id()),
        names::segment(s.id())
    )
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_string()
}

fn done(conn: &ConnArgs, resp: &Value, message: &str) -> Result<()> {
    if conn.json {
        output::json(resp)
    } else {
        output::out(&format!("{message}\n"))
    }
}

pub async fn snapshots(cmd: SnapshotsCommand) -> Result<()> {
    match cmd {
        SnapshotsCommand::Create {
            name,
            subscription,
            labels,
            conn,
        } => {
            let api = Api::new(&conn)?;
            let snap = snapshot(&conn.project, &name)?;
            let sub = names::subscription(&conn.project, &subscription)?;
            let mut body = Map::new();
            body.insert("subscription".into(), json!(sub.to_string()));
            if !labels.is_empty() {
                body.insert("labels".into(), string_map("label", &labels)?);
            }
            let resp = api.put(&snapshot_path(&snap), &Value::Object(body)).await?;
            done(
                &conn,
                &resp,
                &format!(
                    "created snapshot {snap} of {sub} (expires {})",
                    text(&resp, "expireTime")
                ),
            )
        }
        SnapshotsCommand::List(conn) => {
            list_in_project(
                &conn,
                "snapshots",
                &["SNAPSHOT", "TOPIC", "EXPIRES", "LABELS"],
                |s| {
                    vec![
                        names::short(&text(s, "name"), &conn.project, "snapshots").to_string(),
                        names::short(&text(s, "topic"), &conn.project, "topics").to_string(),
                        text(s, "expireTime"),
                        output::map_pairs(s.get("labels").unwrap_or(&Value::Null)),
                    ]
                },
            )
            .await
        }
        SnapshotsCommand::Get(NameArgs { name, conn }) => {
            let api = Api::new(&conn)?;
            let snap = snapshot(&conn.project, &name)?;
            let resp = api.get(&snapshot_path(&snap)).await?;
            if conn.json {
                output::json(&resp)
            } else {
                output::out(&output::fields(&resp))
            }
        }
        SnapshotsCommand::Delete(NameArgs { name, conn }) => {
            let api = Api::new(&conn)?;
            let snap = snapshot(&conn.project, &name)?;
            let resp = api.delete(&snapshot_path(&snap)).await?;
            done(&conn, &resp, &format!("deleted snapshot {snap}"))
        }
    }
}

pub async fn seek(args: SeekArgs) -> Result<()> {
    let conn = &args.conn;
    let api = Api::new(conn)?;
    let sub = names::subscription(&conn.project, &args.subscription)?;
    let (body, what) = match (&args.time, &args.snapshot) {
        // The server checks the format and says what it expects.
        (Some(t), None) => (json!({ "time": t }), format!("time {t}")),
        (None, Some(s)) => {
            let snap = snapshot(&conn.project, s)?;
            (
                json!({ "snapshot": snap.to_string() }),
                format!("snapshot {snap}"),
            )
        }
        _ => unreachable!("clap requires exactly one of --time and --snapshot"),
    };
    let path = format!("{}:seek", names::subscription_path(&sub));
    let resp = api.post(&path, &body).await?;
    done(conn, &resp, &format!("subscription {sub} sought to {what}"))
}
