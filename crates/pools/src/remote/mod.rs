//! The server side of remote pools: attempts waiting for a machine, agents,
//! live leases, and the [`Executor`] the dispatcher uses for a pool.
//!
//! An attempt handed to [`PoolExecutor::run`] waits in its pool's queue
//! until an agent of that pool polls with a free slot. The poll takes it,
//! writes a lease (fresh fencing token) to the pool store and returns it. From
//! then on the agent drives the lease through HTTP calls (see
//! `protocol.rs`); `run` follows the lease's events and returns the exit the
//! agent reported, or an infrastructure error when the lease expired — the
//! dispatcher then queues the attempt again and another machine takes it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubrun_core::clock::{self, Clock, SystemClock};
use pubrun_core::pool::{MachineState, PoolSpec};
use pubrun_core::run::{EndCause, Exit};
use pubrun_exec::{Attempt, CancellationToken, Executor, LogSink, OnStarted, RunRequest};
use tokio::sync::{mpsc, Notify};

use crate::db::{Bootstrap, LeaseEnd, LeaseState, MachineRow, NewLease, PoolStore};
use crate::http::{AGENT_HEADER, SESSION_HEADER};
use crate::protocol::{Assignment, Poll, PollReply, Register, Registered};
use crate::provider::MachineProvider;

mod agents;
mod executor;
mod leases;
mod sweep;

pub(crate) use agents::random_token;
pub use agents::Creds;
pub use executor::PoolExecutor;

/// Wall-clock milliseconds for callers without a [`Pools`] at hand (the
/// metrics); everything in this crate reads [`Pools::now_ms`], so tests can
/// hand it a manual clock.
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// How long a poll is held open when there is nothing to do.
const POLL_HOLD: Duration = Duration::from_secs(10);

pub(crate) enum Event {
    Assigned { token: u64, machine: String },
    Started { handle: String },
    Ended(Exit),
}

/// An attempt waiting for a machine.
struct Pending {
    seq: u64,
    req: RunRequest,
    log: Arc<LogSink>,
    events: mpsc::UnboundedSender<Event>,
}

/// A lease this server process is following.
pub(crate) struct LiveLease {
    pub pool: String,
    pub machine: String,
    pub workdir: PathBuf,
    pub outputs: Vec<String>,
    pub log: Arc<LogSink>,
    /// Log bytes received so far (the agent's next offset).
    pub log_received: u64,
    /// After a restart the count is unknown: take the agent's next offset.
    pub log_resync: bool,
    pub events: mpsc::UnboundedSender<Event>,
    pub cancel_requested: bool,
    pub cancel_sent: bool,
}

pub(crate) struct AgentEntry {
    pub pool: String,
    /// The credential register handed out (a secret): every later call of
    /// this agent carries it, so the pool token alone cannot act as it.
    pub session: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    pub last_seen_ms: i64,
    /// Polls open right now (a held poll proves the agent is alive).
    pub polling: u32,
    pub registered_ms: i64,
    pub version: String,
}

#[derive(Clone)]
pub(crate) struct PoolEntry {
    pub spec: PoolSpec,
    pub token: String,
}

#[derive(Default)]
pub(crate) struct State {
    pub pools: HashMap<String, PoolEntry>,
    waiting: HashMap<String, VecDeque<Pending>>,
    pub leases: HashMap<u64, LiveLease>,
    pub agents: HashMap<String, AgentEntry>,
    /// machine -> (pool, one-time bootstrap token), mirrored in the pool store.
    pub bootstraps: HashMap<String, (String, String)>,
}

pub(crate) struct Inner {
    pub store: Arc<dyn PoolStore>,
    pub state: Mutex<State>,
    /// Wakes held polls (work queued, a cancel to deliver).
    pub work: Notify,
    pub seq: AtomicU64,
    pub providers: Mutex<HashMap<String, Arc<dyn MachineProvider>>>,
    /// Every time this crate reads (leases, machine states, agents' last
    /// calls, cost windows).
    pub clock: Arc<dyn Clock>,
    /// Leases found active at boot get this long for their agent to return.
    pub boot_ms: i64,
    /// What the metrics gauges show, read by [`Pools::refresh_gauges`].
    pub gauges: Mutex<Gauges>,
}

/// The machine rows and up-spans as last read for the metrics gauges (the
/// store is async, gauge sources are not).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub machines: Vec<MachineRow>,
    pub spans: Vec<crate::db::UpSpan>,
}

/// Pools service: owned by the server, shared by the HTTP handlers, the
/// pool executors, the lease sweeper and the autoscaler.
#[derive(Clone)]
pub struct Pools {
    pub(crate) inner: Arc<Inner>,
}

impl Inner {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why an error reply: mapped to HTTP statuses by `http.rs`.
#[derive(Debug)]
pub enum AgentError {
    /// 401: wrong token for this pool.
    Unauthorized(String),
    /// 401: the session is not (or no longer) this agent's: register again.
    BadSession(String),
    /// 404: unknown agent (server restarted): register again.
    UnknownAgent(String),
    /// 404: no remote pool is declared, so there is no agent protocol.
    NoPools,
    /// 409: the lease is no longer honoured (fenced).
    Fenced(String),
    /// 409: the name belongs to an agent that is still alive.
    NameTaken(String),
    /// 413: the body is over the route's limit.
    TooLarge(String),
    /// 503: the server is not ready to take this yet; retry.
    NotReady(String),
    /// 400
    Invalid(String),
    /// 500
    Internal(String),
}

impl Pools {
    /// The embedded engine: `pools.db` in the data directory.
    pub async fn open(data_dir: &std::path::Path) -> Result<Pools, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let store = pubrun_store::SqlitePoolStore::open(&data_dir.join("pools.db"))
            .await
            .map_err(|e| e.to_string())?;
        Pools::with_store(Arc::new(store)).await
    }

    /// On any engine (PostgreSQL in cluster mode), on the system clock.
    pub async fn with_store(store: Arc<dyn PoolStore>) -> Result<Pools, String> {
        Pools::with_clock(store, clock::system()).await
    }

    /// On any engine and `clock`: loads the declared pools and the unused
    /// bootstrap tokens.
    pub async fn with_clock(
        store: Arc<dyn PoolStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Pools, String> {
        let mut state = State::default();
        for (spec, token) in store.pools().await.map_err(|e| e.to_string())? {
            state
                .pools
                .insert(spec.name.clone(), PoolEntry { spec, token });
        }
        for b in store.bootstraps().await.map_err(|e| e.to_string())? {
            state.bootstraps.insert(b.machine, (b.pool, b.token));
        }
        Ok(Pools {
            inner: Arc::new(Inner {
                store,
                state: Mutex::new(state),
                work: Notify::new(),
                seq: AtomicU64::new(1),
                providers: Mutex::new(HashMap::new()),
                boot_ms: clock.now_ms(),
                clock,
                gauges: Mutex::new(Gauges::default()),
            }),
        })
    }

    /// Now, in milliseconds since the Unix epoch, on this service's clock.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub fn store(&self) -> &Arc<dyn PoolStore> {
        &self.inner.store
    }

    /// Reads the machine rows and up-spans the metrics gauges show (before
    /// a scrape); on a store error the previous reading stays.
    pub async fn refresh_gauges(&self) {
        let read = async {
            let machines = self.inner.store.machines().await?;
            let spans = self.inner.store.spans(0).await?;
            Ok::<_, pubrun_core::Error>(Gauges { machines, spans })
        };
        match read.await {
            Ok(g) => *self.inner.gauges.lock().unwrap_or_else(|p| p.into_inner()) = g,
            Err(e) => tracing::warn!(error = %e, "cannot read machines for the metrics"),
        }
    }

    /// The last reading of [`refresh_gauges`](Self::refresh_gauges).
    pub fn gauges(&self) -> Gauges {
        self.inner
            .gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every machine row (all pools).
    pub async fn machines(&self) -> Result<Vec<MachineRow>, String> {
        self.inner.store.machines().await.map_err(|e| e.to_string())
    }

    pub(crate) async fn machine(&self, name: &str) -> Result<Option<MachineRow>, String> {
        self.inner
            .store
            .machine(name)
            .await
            .map_err(|e| e.to_string())
    }

    /// Writes a machine row. With the PostgreSQL engine the write is fenced:
    /// an error here means this server may no longer act on the machine.
    pub(crate) async fn put_machine(&self, m: &MachineRow) -> Result<(), String> {
        self.inner
            .store
            .upsert_machine(m)
            .await
            .map_err(|e| e.to_string())
    }

    /// Closes a machine's cost span where nothing else depends on it: a
    /// failure is logged (the span stays open and is closed by the next
    /// stop or start of the machine).
    pub(crate) async fn span_close_logged(&self, machine: &str, now: i64) {
        if let Err(e) = self.inner.store.span_close(machine, now).await {
            tracing::error!(machine, error = %e, "cannot close the machine's cost span");
        }
    }

    pub fn specs(&self) -> Vec<PoolSpec> {
        let mut v: Vec<PoolSpec> = self
            .inner
            .lock()
            .pools
            .values()
            .map(|p| p.spec.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The agent token of a pool (a secret).
    pub fn token(&self, pool: &str) -> Option<String> {
        self.inner.lock().pools.get(pool).map(|p| p.token.clone())
    }

    /// The pool whose machine run `run_id` waits for, if it waits.
    pub fn waiting_pool(&self, run_id: &str) -> Option<String> {
        let st = self.inner.lock();
        st.waiting
            .iter()
            .find(|(_, q)| q.iter().any(|p| p.req.run_id == run_id))
            .map(|(pool, _)| pool.clone())
    }

    /// Runs waiting for a machine in `pool`.
    pub fn waiting(&self, pool: &str) -> usize {
        self.inner.lock().waiting.get(pool).map_or(0, |q| q.len())
    }

    /// Live leases per machine.
    pub fn runs_by_machine(&self) -> HashMap<String, u32> {
        let st = self.inner.lock();
        let mut m = HashMap::new();
        for l in st.leases.values() {
            *m.entry(l.machine.clone()).or_insert(0) += 1;
        }
        m
    }

    // ---- agent protocol (called by http.rs) ----

    /// Whether any pool takes agents (agents, docker, gce): without one the
    /// agent protocol answers 404 before reading anything.
    pub(crate) fn has_remote_pool(&self) -> bool {
        self.inner
            .lock()
            .pools
            .values()
            .any(|p| !matches!(p.spec.provider, pubrun_core::pool::ProviderSpec::Local))
    }

    /// Whether `token` is the token of some pool agents may join: checked
    /// from the headers before any body is read.
    pub(crate) fn token_known(&self, token: &str) -> bool {
        let st = self.inner.lock();
        // Every pool is compared (no early exit), each in constant time.
        st.pools
            .values()
            .filter(|p| !matches!(p.spec.provider, pubrun_core::pool::ProviderSpec::Local))
            .fold(false, |found, p| {
                pubrun_core::secret::verify_bearer(p.token.as_bytes(), token.as_bytes()) | found
            })
            | st.bootstraps.values().fold(false, |found, (_, b)| {
                pubrun_core::secret::verify_bearer(b.as_bytes(), token.as_bytes()) | found
            })
    }

    pub fn executor(&self, pool: &str) -> Option<Arc<dyn Executor>> {
        let st = self.inner.lock();
        let p = st.pools.get(pool)?;
        if matches!(p.spec.provider, pubrun_core::pool::ProviderSpec::Local) {
            return None;
        }
        Some(Arc::new(PoolExecutor {
            pools: self.clone(),
            pool: pool.to_string(),
        }))
    }

    pub fn set_provider(&self, pool: &str, p: Option<Arc<dyn MachineProvider>>) {
        let mut m = self
            .inner
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match p {
            Some(p) => m.insert(pool.to_string(), p),
            None => m.remove(pool),
        };
    }

    pub fn provider(&self, pool: &str) -> Option<Arc<dyn MachineProvider>> {
        self.inner
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pool)
            .cloned()
    }

    /// Agents known now: (name, pool, slots, running leases, last seen, labels, version).
    /// Agents of machines that are stopped, deleted or failed are left out
    /// (a stopped machine's agent is gone even before the sweep notices).
    pub async fn agents(&self) -> Result<Vec<serde_json::Value>, String> {
        let up: std::collections::HashSet<String> = self
            .machines()
            .await?
            .into_iter()
            .filter(|m| m.state.is_up())
            .map(|m| m.name)
            .collect();
        let st = self.inner.lock();
        let mut v: Vec<_> = st
            .agents
            .iter()
            .filter(|(name, _)| up.contains(*name))
            .map(|(name, a)| {
                let runs = st.leases.values().filter(|l| &l.machine == name).count();
                serde_json::json!({
                    "name": name,
                    "pool": a.pool,
                    "slots": a.slots,
                    "runs": runs,
                    "last_seen_ms": a.last_seen_ms,
                    "registered_ms": a.registered_ms,
                    "labels": a.labels,
                    "version": a.version,
                })
            })
            .collect();
        v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(v)
    }

    // ---- used by PoolExecutor ----

    fn enqueue(
        &self,
        pool: &str,
        req: RunRequest,
        log: Arc<LogSink>,
    ) -> (u64, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .lock()
            .waiting
            .entry(pool.to_string())
            .or_default()
            .push_back(Pending {
                seq,
                req,
                log,
                events: tx,
            });
        self.inner.work.notify_waiters();
        (seq, rx)
    }

    fn dequeue(&self, pool: &str, seq: u64) -> bool {
        let mut st = self.inner.lock();
        let Some(q) = st.waiting.get_mut(pool) else {
            return false;
        };
        let before = q.len();
        q.retain(|p| p.seq != seq);
        before != q.len()
    }

    fn request_cancel(&self, token: u64) {
        if let Some(l) = self.inner.lock().leases.get_mut(&token) {
            l.cancel_requested = true;
        }
        self.inner.work.notify_waiters();
    }
}

impl Pools {
    /// Replaces the declared pools (apply). Tokens: from `token_env` when
    /// set (it must be set in the server's environment), else the one
    /// stored for the pool, else a fresh random one.
    pub async fn set_pools(&self, specs: Vec<PoolSpec>) -> Result<(), String> {
        let mut tokens = Vec::new();
        let mut providers = Vec::new();
        for s in &specs {
            let from_env = if s.token_env.is_empty() {
                None
            } else {
                match std::env::var(&s.token_env) {
                    Ok(v) if !v.is_empty() => Some(v),
                    _ => {
                        return Err(format!(
                            "pool \"{}\": environment variable {} is not set for the server; set it or remove token_env",
                            s.name, s.token_env
                        ))
                    }
                }
            };
            tokens.push(from_env);
            providers
                .push(crate::provider::build(s).map_err(|e| format!("pool \"{}\": {e}", s.name))?);
        }
        let old: Vec<String> = self.inner.lock().pools.keys().cloned().collect();
        for name in old {
            if !specs.iter().any(|s| s.name == name) {
                self.inner
                    .store
                    .delete_pool(&name)
                    .await
                    .map_err(|e| e.to_string())?;
                self.inner.lock().pools.remove(&name);
                self.set_provider(&name, None);
            }
        }
        for ((spec, token), provider) in specs.into_iter().zip(tokens).zip(providers) {
            let fresh = random_token()?;
            let token = self
                .inner
                .store
                .put_pool(&spec, token.as_deref(), &fresh)
                .await
                .map_err(|e| e.to_string())?;
            self.set_provider(&spec.name, provider);
            self.inner
                .lock()
                .pools
                .insert(spec.name.clone(), PoolEntry { spec, token });
        }
        self.inner.work.notify_waiters();
        Ok(())
    }
}
