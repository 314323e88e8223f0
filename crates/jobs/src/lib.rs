//! Jobs and runs.
//!
//! The [`Dispatcher`] turns messages into runs and runs into results:
//!
//! ```text
//! job subscription ──intake──► run store (queued, dedup) ──ack message
//!                                  │
//!                  scheduler (per-job concurrency, global slots, backoff)
//!                                  ▼
//!                  executor (process | docker) ──► run store (terminal state + outbox)
//!                                                        └──► result topic
//! ```
//!
//! Invariants: a message is acked only after its run (or the fact that it
//! is a duplicate) is committed; executors never ack, retry or publish; a
//! result message is published at least once for every finished run of a
//! job with a `result_topic`.

pub mod apply;
pub mod dispatcher;
pub mod runstore;

pub use dispatcher::{Dispatcher, Executors};
pub use runstore::{Enqueued, RunRecord, RunStore, SourceMessage};
