//! Pools, machines, agents' bootstrap tokens, cost spans and leases, behind
//! [`PoolStore`], with two engines: [`SqlitePoolStore`] (`pools.db` in the
//! data directory, the default) and [`PostgresPoolStore`] (cluster mode,
//! `serve --store`, every write fenced by the ownership lease).
//!
//! A lease row is the single authority on whether an agent's report is
//! accepted: the result handler and the expiry sweep both end it with one
//! conditional UPDATE, so exactly one of them wins. A machine row is
//! written *before* a provider is asked to start or stop it, so that a
//! server whose writes are refused (it lost ownership) never asks.

pub mod postgres;
pub mod sqlite;

use pubrun_core::pool::{IllegalTransition, MachineState, PoolSpec};
use pubrun_core::run::Exit;
use pubrun_core::{Error, Result};
use serde::Serialize;

pub use postgres::PostgresPoolStore;
pub use sqlite::SqlitePoolStore;

/// A machine of a pool, as the server last recorded it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineRow {
    pub name: String,
    pub pool: String,
    pub provider: String,
    pub provider_id: String,
    pub state: MachineState,
    pub state_since_ms: i64,
    pub idle_since_ms: Option<i64>,
    pub created_ms: i64,
    pub cordoned: bool,
    pub slots: u32,
    pub last_error: String,
    /// The machine failed while it may still exist at its provider (its
    /// agent went silent, or a start failed half-way): the autoscaler
    /// stops it, and its cost span ends then.
    pub needs_stop: bool,
}

impl MachineRow {
    /// The one way a machine changes state: checked against the state
    /// machine, and `state_since_ms` follows. Refused changes leave it as is.
    pub fn set_state(&mut self, next: MachineState, now_ms: i64) -> Result<(), IllegalTransition> {
        self.state.check_transition(next)?;
        self.state = next;
        self.state_since_ms = now_ms;
        Ok(())
    }
}

/// Where a lease is in its life. Only `Assigned` and `Running` are active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Assigned,
    Running,
    Done,
    Revoked,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Assigned => "assigned",
            LeaseState::Running => "running",
            LeaseState::Done => "done",
            LeaseState::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<LeaseState> {
        Some(match s {
            "assigned" => LeaseState::Assigned,
            "running" => LeaseState::Running,
            "done" => LeaseState::Done,
            "revoked" => LeaseState::Revoked,
            _ => return None,
        })
    }

    pub fn is_active(self) -> bool {
        matches!(self, LeaseState::Assigned | LeaseState::Running)
    }
}

/// A lease: the fencing token of one attempt on one machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseRow {
    pub token: u64,
    pub run_id: String,
    pub job: String,
    pub attempt: u32,
    pub pool: String,
    pub machine: String,
    pub state: LeaseState,
    pub assigned_ms: i64,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub exit: Option<Exit>,
    pub reason: String,
}

/// What a new lease is for.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLease<'a> {
    pub run_id: &'a str,
    pub job: &'a str,
    pub attempt: u32,
    pub pool: &'a str,
    pub machine: &'a str,
    pub now_ms: i64,
}

/// A span of time a machine was up (what it costs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpSpan {
    pub machine: String,
    pub pool: String,
    pub start_ms: i64,
    /// `None` while the machine is up.
    pub end_ms: Option<i64>,
}

/// A one-time bootstrap token of a machine a pool started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub machine: String,
    pub pool: String,
    pub token: String,
}

/// How a lease ends.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEnd<'a> {
    /// The agent reported the attempt's exit.
    Done(&'a Exit),
    /// Taken back (the machine went silent), with why.
    Revoked(&'a str),
}

/// The durable state of pools. Errors are `pubrun_core` errors
/// (unavailable for a database fault or a write refused by the fence,
/// internal for a corrupt row).
#[async_trait::async_trait]
pub trait PoolStore: Send + Sync + 'static {
    // ---- pools ----

    /// Stores the spec; keeps the stored token unless `token` is given, and
    /// takes `fresh` for a new pool. Returns the token in force.
    async fn put_pool(&self, spec: &PoolSpec, token: Option<&str>, fresh: &str) -> Result<String>;
    async fn delete_pool(&self, name: &str) -> Result<()>;
    /// (spec, token) by name.
    async fn pools(&self) -> Result<Vec<(PoolSpec, String)>>;

    // ---- machines ----

    /// Writes a machine; a change of state is logged (one line per machine
    /// transition, whoever makes it).
    async fn upsert_machine(&self, m: &MachineRow) -> Result<()>;
    /// By pool, creation time, name.
    async fn machines(&self) -> Result<Vec<MachineRow>>;
    async fn machine(&self, name: &str) -> Result<Option<MachineRow>>;
    /// A machine name never used before in this store: `{prefix}-{pool}-{n}`
    /// with `n` one past the pool's last number (kept when the pool is
    /// removed and declared again), skipping any name that a machine row or
    /// a cost span still carries.
    async fn new_machine_name(&self, pool: &str, prefix: &str) -> Result<String>;
    /// Forgets a machine the provider has deleted (its cost spans and
    /// leases stay; its name is never given out again).
    async fn delete_machine(&self, name: &str) -> Result<()>;

    // ---- bootstrap tokens ----

    async fn put_bootstrap(&self, b: &Bootstrap) -> Result<()>;
    /// Every bootstrap token not yet used up.
    async fn bootstraps(&self) -> Result<Vec<Bootstrap>>;
    async fn delete_bootstrap(&self, machine: &str) -> Result<()>;

    // ---- cost spans ----

    /// Opens an up-span for `machine` unless one is open.
    async fn span_open(&self, machine: &str, pool: &str, now_ms: i64) -> Result<()>;
    /// Closes the open up-span of `machine`, if any (never before its start).
    async fn span_close(&self, machine: &str, now_ms: i64) -> Result<()>;
    /// Up-spans still open or ended after `since_ms`, by machine and start.
    async fn spans(&self, since_ms: i64) -> Result<Vec<UpSpan>>;

    // ---- leases ----

    /// A new lease in `Assigned`; returns its token (never reused).
    async fn new_lease(&self, lease: &NewLease<'_>) -> Result<u64>;
    async fn lease(&self, token: u64) -> Result<Option<LeaseRow>>;
    /// The newest lease of a run, if any.
    async fn lease_of_run(&self, run_id: &str) -> Result<Option<LeaseRow>>;
    /// Assigned or running, by token.
    async fn active_leases(&self) -> Result<Vec<LeaseRow>>;
    /// Leases (any state) not ended before `since_ms`, by token: cost reports.
    async fn leases_since(&self, since_ms: i64) -> Result<Vec<LeaseRow>>;
    /// `Assigned` → `Running`; false when the lease was not assigned.
    async fn lease_started(&self, token: u64, now_ms: i64) -> Result<bool>;
    /// Ends an active lease; false when it was no longer active (someone
    /// else won).
    async fn lease_end(&self, token: u64, end: LeaseEnd<'_>, now_ms: i64) -> Result<bool>;
}

fn corrupt(what: &str, key: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("pool store: corrupt {what} {key}: {e}"))
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("serializing: {e}")))
}

fn parse_spec(name: &str, spec: &str) -> Result<PoolSpec> {
    serde_json::from_str(spec).map_err(|e| corrupt("pool spec of", name, e))
}

fn parse_machine_state(name: &str, s: &str) -> Result<MachineState> {
    MachineState::parse(s).ok_or_else(|| corrupt("state of machine", name, format!("{s:?}")))
}

/// A lease row as stored (state and exit not yet parsed).
struct RawLease {
    token: i64,
    run_id: String,
    job: String,
    attempt: i64,
    pool: String,
    machine: String,
    state: String,
    assigned_ms: i64,
    started_ms: Option<i64>,
    ended_ms: Option<i64>,
    exit: Option<String>,
    reason: String,
}

impl RawLease {
    fn parse(self) -> Result<LeaseRow> {
        let key = self.token.to_string();
        let state = LeaseState::parse(&self.state)
            .ok_or_else(|| corrupt("state of lease", &key, format!("{:?}", self.state)))?;
        let exit = match self.exit {
            None => None,
            Some(e) => {
                Some(serde_json::from_str(&e).map_err(|e| corrupt("exit of lease", &key, e))?)
            }
        };
        Ok(LeaseRow {
            token: u64::try_from(self.token).map_err(|e| corrupt("lease", &key, e))?,
            run_id: self.run_id,
            job: self.job,
            attempt: u32::try_from(self.attempt)
                .map_err(|e| corrupt("attempt of lease", &key, e))?,
            pool: self.pool,
            machine: self.machine,
            state,
            assigned_ms: self.assigned_ms,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            exit,
            reason: self.reason,
        })
    }
}

/// Logs a machine's change of state (one line per transition).
fn log_transition(before: Option<&str>, m: &MachineRow) {
    if before != Some(m.state.as_str()) {
        tracing::info!(
            machine = m.name,
            pool = m.pool,
            provider = m.provider,
            from = before.unwrap_or("none"),
            state = m.state.as_str(),
            error = (!m.last_error.is_empty()).then_some(m.last_error.as_str()),
            "machine state changed"
        );
    }
}

fn lease_end_parts(end: &LeaseEnd<'_>) -> Result<(LeaseState, Option<String>, String)> {
    Ok(match end {
        LeaseEnd::Done(exit) => (LeaseState::Done, Some(to_json(exit)?), String::new()),
        LeaseEnd::Revoked(reason) => (LeaseState::Revoked, None, reason.to_string()),
    })
}

fn token_param(token: u64) -> Result<i64> {
    i64::try_from(token).map_err(|_| Error::invalid(format!("lease {token} is out of range")))
}
