//! Pub/Sub semantics, independent of storage.
//!
//! The [`Broker`] owns the in-memory view of every topic and subscription:
//! which messages each subscription still owes (its backlog), which of them
//! are leased to a subscriber until a deadline, and which are ready to hand
//! out. Every change that must survive a crash goes through the [`Store`]
//! first:
//!
//! - a publish is visible to subscribers only after its record is durable;
//! - an ack is answered only after its record is durable;
//! - leases are deliberately *not* durable: after a restart every unacked
//!   message is ready again, which is what at-least-once delivery allows.
//!   Delivery attempts (what dead-lettering counts and retry backoff grows
//!   with) and pending backoffs are in memory too, so a restart starts every
//!   message again at attempt 1 — Google documents its count as best effort;
//! - a subscription's filter is applied when messages are added to it, on
//!   publish and on log replay alike, so non-matching messages never become
//!   backlog;
//! - a dead letter is published to the dead-letter topic (durably) before it
//!   is acked on its subscription (durably), so a crash in between forwards it
//!   twice rather than losing it.
//!
//! The semantics per subscription (retry backoff, dead letters, ordering
//! keys, exactly-once ack checks) are in `subscription.rs`; retention,
//! snapshots and Seek in `broker/retention.rs`.
//!
//! [`Store`]: pubrun_store::Store

mod broker;
mod msg;
pub mod push;
mod seqmap;
mod subscription;

pub use broker::{
    AckResult, Broker, Delivered, DeliveryProperties, DeliveryUpdate, ListRequest, Page,
    StreamHandle, SubscriptionStats, SubscriptionUpdate, TopicUpdate,
};
// Retention, snapshots and seek: `broker/retention.rs`.
pub use broker::SnapshotInfo;
// The dashboard's summary: `broker/overview.rs`.
pub use broker::{SubscriptionSummary, TopicSummary};
