//! Security regression tests of the `pubrun` binary (issue 11), one module per area.

#[path = "../common/mod.rs"]
mod common;

mod agents;
mod job_env;
mod server;
