//! The plain data of the run store (no I/O): what a run store keeps per run
//! and what its calls return. Engines live in `pubrun-store::runs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::run::{Exit, RunStatus};

/// The message a run was made for, kept so retries re-render the same parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceMessage {
    pub id: String,
    #[serde(skip)]
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    /// RFC 3339.
    pub publish_time: String,
    pub ordering_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub status: RunStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    pub message: SourceMessage,
    pub dedup_key: String,
    pub exit: Option<Exit>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// A queued run (retry) waits until then.
    pub not_before_ms: i64,
    /// Where the current/last attempt ran.
    pub machine: String,
    pub handle: String,
    pub cancel_requested: bool,
    pub result_published: bool,
    /// Cluster mode: the server (`--node-name`) that claimed the current/last
    /// attempt; `None` on the embedded store (one server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A queued run as the scheduler sees it (no message data).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRun {
    pub id: i64,
    pub job: String,
    pub cancel_requested: bool,
}

/// Outcome of trying to queue a run for a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    New(i64),
    /// A run with the same dedup key exists inside the window.
    Duplicate(i64),
}
