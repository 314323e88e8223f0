//! Security regression tests against the real `pubrun` binary (issue 11).

#[path = "../common/mod.rs"]
mod common;

mod job_env;
