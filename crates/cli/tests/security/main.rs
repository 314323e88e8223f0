//! Security regression tests of the `pubrun` binary, one module per area.

#[path = "../common/mod.rs"]
mod common;

mod server;
