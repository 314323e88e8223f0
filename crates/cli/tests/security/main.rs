//! Security regression tests against the real `pubrun` binary (issue 11).
//! One module per area.

mod agents;
#[path = "../common/mod.rs"]
mod common;
