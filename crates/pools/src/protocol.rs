//! The agent protocol: JSON over HTTP on the server's one port, under
//! `/agent/v1/`, authenticated with the pool's token (`Authorization: Bearer`).
//! Register hands the agent a session; every later call carries it
//! (`X-Pubrun-Session`) with the agent's name (`X-Pubrun-Agent`), so the
//! pool token alone cannot act as another agent. All credentials travel in
//! headers and are checked before a body is read; bodies have limits (see
//! `http.rs`).
//!
//! ```text
//! agent                                   server
//!  POST register {pool,name,slots}  ─────► agent known, machine ready; {session}
//!  POST poll {free, running[]}      ─────► heartbeat; long-polls for work
//!                                   ◄───── {assign[], cancel[], revoked[]}
//!  GET  leases/L/workdir            ─────► tar of the run directory
//!  POST leases/L/started            ─────► run is running on NAME
//!  POST leases/L/log?offset=N       ─────► bytes appended once (offset dedups)
//!  PUT  leases/L/outputs            ─────► tar of the output directories
//!  POST leases/L/result {exit}      ─────► 200 recorded | 409 fenced
//! ```
//!
//! `L` is the lease's fencing token: a number that is never reused. A lease
//! that expired (no poll for `lease_timeout`) is revoked; from then on every
//! call naming it gets 409, so a partitioned agent that comes back late
//! cannot record anything for a run that was retried elsewhere.

use std::collections::BTreeMap;

use pubrun_core::job::ExecutorSpec;
use pubrun_core::run::Exit;
use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/agent/v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub pool: String,
    /// Unique name of this machine; an agent that reconnects uses the same.
    pub name: String,
    pub slots: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    /// Seconds without a poll after which the server takes runs back.
    pub lease_timeout_secs: f64,
    /// How long the server holds a poll open when there is no work.
    pub poll_secs: f64,
    /// This agent's session credential (a secret): sent on every later
    /// call. A new registration under the name ends it.
    pub session: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub name: String,
    /// Runs the agent could start now.
    pub free_slots: u32,
    /// Leases the agent holds (running, or finished but not yet reported).
    #[serde(default)]
    pub leases: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PollReply {
    #[serde(default)]
    pub assign: Vec<Assignment>,
    /// Leases whose runs were cancelled: stop them (gracefully) and report.
    #[serde(default)]
    pub cancel: Vec<u64>,
    /// Leases the server no longer honours: stop them, report nothing.
    #[serde(default)]
    pub revoked: Vec<u64>,
    /// The machine is being drained: take no new work.
    #[serde(default)]
    pub cordoned: bool,
}

/// One attempt leased to an agent: everything its executor needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub lease: u64,
    pub run_id: String,
    pub job: String,
    pub attempt: u32,
    pub spec: ExecutorSpec,
    pub timeout_secs: f64,
    pub grace_secs: f64,
    /// Run variables and `pass_env` values (from the server's environment).
    pub env: BTreeMap<String, String>,
    /// The job's secrets, read from the server's environment: the agent
    /// adds them to the job's environment and masks them in the log. The
    /// agent's own environment (its pool token) never reaches a job.
    #[serde(default)]
    pub secrets: pubrun_exec::Secrets,
    /// The run directory's path on the server: env values under it are
    /// rewritten to the agent's own copy.
    pub server_workdir: String,
    /// Directories to send back after the run (relative to the workdir).
    pub outputs: Vec<String>,
    /// Bytes of log the server keeps; the agent need not send more.
    pub log_limit: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Started {
    pub handle: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub exit: Exit,
}

/// Body of every non-2xx reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
