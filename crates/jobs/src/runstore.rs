//! The durable record of jobs and runs, as the dispatcher sees it: any
//! engine behind [`pubrun_store::RunStore`] (embedded SQLite by default,
//! PostgreSQL with `serve --store`). Engines and what commits together are
//! in `pubrun_store::runs`.

use std::sync::Arc;

pub use pubrun_store::runs::{
    Batch, Claimed, Enqueued, QueuedRun, Requeue, RunEnd, RunPage, RunRecord, SourceMessage,
};

/// The run-store interface (the trait every engine implements).
pub use pubrun_store::runs::RunStore as RunStoreEngine;

/// The embedded engine (`runs.db` in the data directory), under the name
/// callers have always used; it also has blocking forms of the calls tests
/// make (`open`, `get`, `list`, `enqueue`, …).
pub type RunStore = pubrun_store::SqliteRunStore;

/// What the dispatcher, apply and the API hold: one engine, shared.
pub type SharedRunStore = Arc<dyn RunStoreEngine>;
