//! The API layer: one port that speaks gRPC (Pub/Sub v1) and HTTP/1.1 (the
//! Pub/Sub REST mapping, health, later GCS JSON and pubrun's own REST).
//!
//! Handlers translate wire shapes into `pubrun_core`/`pubrun_broker` calls
//! and map [`pubrun_core::Error`] to gRPC status or Google's JSON error body
//! in exactly one place each (`status.rs`).

mod body_limit;
pub mod cluster;
pub mod codec;
pub mod conn;
pub mod csrf;
pub mod dashboard;
pub mod forward;
pub mod grpc;
pub mod jobs_api;
pub mod metrics;
pub mod rest;
pub mod server;
pub mod snapshots;
pub mod status;

/// Generated server stubs for `google.pubsub.v1.Publisher` / `Subscriber`.
pub mod pubsub_server {
    include!(concat!(env!("OUT_DIR"), "/google.pubsub.v1.Publisher.rs"));
    include!(concat!(env!("OUT_DIR"), "/google.pubsub.v1.Subscriber.rs"));
}

/// Wire types of `google.pubsub.v1`.
pub use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;

pub use conn::ConnLimits;
pub use server::{serve, ServeOptions};

/// `google.protobuf.Empty`, which prost represents as `()`.
pub type Empty = ();
