//! The I/O-free core of pubrun.
//!
//! Everything here is plain data and pure functions: resource names and their
//! validation rules, Pub/Sub limits, the message type, resource configs and the
//! single error type that every API layer maps to gRPC and HTTP codes. No
//! file, socket or clock access happens in this crate, so it is unit-testable
//! without setup.

pub mod clock;
pub mod config;
pub mod connection;
pub mod cost;
pub mod error;
pub mod filter;
pub mod job;
pub mod limits;
pub mod manifest;
pub mod message;
pub mod names;
pub mod pool;
pub mod run;
pub mod runrecord;
pub mod secret;
pub mod template;
pub mod trigger;

pub use config::{SubscriptionConfig, TopicConfig};
pub use cost::{cost, share_machine_time, Span};
pub use error::{Code, Error, Result};
pub use message::{Message, OutgoingMessage};
pub use names::{ProjectName, SubscriptionName, TopicName};
pub use pool::{
    autoscale, IllegalTransition, MachineState, MachineView, PoolSpec, ProviderSpec, ScaleAction,
};
