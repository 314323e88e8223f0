//! Pools: where runs execute when a job names a pool other than `local`.
//!
//! - `remote`: the server side — runs waiting per pool, agents, live leases
//!   and [`PoolExecutor`], the executor the dispatcher uses for a pool;
//! - `protocol` + `http`: the agent protocol on the server's port, and the
//!   pools/machines/agents/cost REST API;
//! - `agent`: the worker side (`pubrun agent`);
//! - `provider`: the [`provider::MachineProvider`] seam and its docker and
//!   gce implementations; `autoscaler` drives it;
//! - `db`: the records of the pool store (`pubrun_store::pools`: machines,
//!   up-time spans, leases = fencing tokens; `pools.db` or PostgreSQL);
//! - `cost`: machine-seconds per machine, pool and run.

pub mod agent;
mod autoscaler;
mod cost;
pub mod db;
pub mod http;
pub mod protocol;
pub mod provider;
mod remote;

pub use remote::{now_ms, Gauges, PoolExecutor, Pools};
