//! `pubrun cluster`: the servers of a cluster and which one owns the state.

use anyhow::Result;
use serde_json::Value;

use super::api::Api;
use super::args::ConnArgs;
use super::output;

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn cluster(args: ClusterArgs) -> Result<()> {
    let resp = Api::new(&args.conn)?.get("/api/v1/cluster").await?;
    if args.conn.json {
        return output::json(&resp);
    }
    if resp["mode"] != "cluster" {
        output::out("embedded store: a single server (start servers with --store postgres://… to form a cluster)\n")?;
        return Ok(());
    }
    let nodes = resp["nodes"].as_array().map_or(&[][..], Vec::as_slice);
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let seen = n["seen_secs_ago"].as_f64().unwrap_or(f64::NAN);
            vec![
                n["name"].as_str().unwrap_or("-").to_string(),
                n["address"].as_str().unwrap_or("-").to_string(),
                if n["owner"] == Value::Bool(true) {
                    "owner".into()
                } else if seen < 5.0 {
                    "standby (forwards)".into()
                } else {
                    "gone?".into()
                },
                format!("{} ago", output::duration_ms((seen * 1000.0) as i64)),
            ]
        })
        .collect();
    output::out(&output::table(
        &["NODE", "ADDRESS", "ROLE", "LAST SEEN"],
        &rows,
    ))
}
