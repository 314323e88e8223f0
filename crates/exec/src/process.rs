//! Runs an attempt as a local child process.

pub struct ProcessExecutor;
