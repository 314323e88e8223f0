//! Security regression tests against the real `pubrun` binary (issue 11).
//! One module per area.

#[path = "../common/mod.rs"]
mod common;
mod agents;
