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
//!
//! [`Store`]: pubrun_store::Store

mod broker;
mod subscription;

pub use broker::{Broker, Delivered, Page, StreamHandle, SubscriptionUpdate, TopicUpdate};
