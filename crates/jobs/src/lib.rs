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
//! job with a `result_topic` (by one publisher task, so runs ending together
//! do not publish twice).
//!
//! Claiming and cancelling: the scheduler claims a queued run with one
//! conditional update (`queued` and not cancel-requested → `starting`), after
//! registering the run's cancel switch; a cancel sets the flag first, then
//! either ends the still-queued run in one conditional update or finds the
//! switch. So a run is never started twice and a cancelled queued run never
//! starts. A run's slot is freed only after its new state is recorded.
//!
//! Restart: queued runs just wait for the scheduler; `running` attempts are
//! followed through [`pubrun_exec::Executor::reattach`] (asked again with
//! backoff while the engine does not answer) or marked lost and retried per
//! policy; a `starting` attempt that is not found never reported running, so
//! it is tried again without using up an attempt. In cluster mode (a shared
//! run store) an attempt the executor cannot find was cut off by the loss of
//! the server that ran it: it too is tried again as the same attempt, as
//! for a lost agent.

pub mod apply;
pub mod dispatcher;
pub mod runstore;

pub use dispatcher::{Dispatcher, Executors};
pub use runstore::{Enqueued, RunRecord, RunStore, RunStoreEngine, SharedRunStore, SourceMessage};
