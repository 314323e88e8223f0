//! `GET /api/v1/cluster`: which servers form the cluster, where each listens,
//! and which one owns the state (and so answered: standbys forward).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pubrun_store::directory::Directory;
use pubrun_store::postgres::BROKER_OWNERSHIP;
use serde_json::json;

/// What the cluster route reads: this server's name and the directory in
/// PostgreSQL (cluster mode only).
#[derive(Clone)]
pub struct ClusterView {
    pub node: String,
    pub directory: Arc<Directory>,
}

pub(crate) async fn handler(State(view): State<Option<ClusterView>>) -> Response {
    let Some(view) = view else {
        return Json(json!({"mode": "embedded", "nodes": []})).into_response();
    };
    let owner = match view.directory.owner(BROKER_OWNERSHIP).await {
        Ok(o) => o,
        Err(e) => return crate::status::HttpError(e.into()).into_response(),
    };
    let nodes = match view.directory.nodes().await {
        Ok(n) => n,
        Err(e) => return crate::status::HttpError(e.into()).into_response(),
    };
    let owner_name = owner.as_ref().map(|o| o.node.clone());
    Json(json!({
        "mode": "cluster",
        "node": view.node,
        "owner": owner.map(|o| json!({"node": o.node, "address": o.address, "token": o.token})),
        "nodes": nodes.iter().map(|n| json!({
            "name": n.name,
            "address": n.address,
            "seen_secs_ago": n.seen_secs_ago,
            "owner": Some(&n.name) == owner_name.as_ref(),
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}
