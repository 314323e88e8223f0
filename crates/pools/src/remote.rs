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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pubrun_core::pool::{MachineState, PoolSpec};
use pubrun_core::run::{EndCause, Exit};
use pubrun_exec::{CancellationToken, Executor, LogSink, OnStarted, RunRequest};
use tokio::sync::{mpsc, Notify};

use crate::db::{Bootstrap, LeaseEnd, LeaseState, MachineRow, NewLease, PoolStore};
use crate::http::{AGENT_HEADER, SESSION_HEADER};
use crate::protocol::{Assignment, Poll, PollReply, Register, Registered};
use crate::provider::MachineProvider;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    /// On any engine (PostgreSQL in cluster mode): loads the declared pools
    /// and the unused bootstrap tokens.
    pub async fn with_store(store: Arc<dyn PoolStore>) -> Result<Pools, String> {
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
                boot_ms: now_ms(),
                gauges: Mutex::new(Gauges::default()),
            }),
        })
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

    /// A one-time bootstrap token for a machine this server starts: its
    /// instance metadata carries it instead of the pool token, so what
    /// anyone reading the metadata later finds is useless once the agent
    /// has joined.
    pub async fn mint_bootstrap(&self, machine: &str, pool: &str) -> Result<String, String> {
        let token = random_token()?;
        self.inner
            .store
            .put_bootstrap(&Bootstrap {
                machine: machine.to_string(),
                pool: pool.to_string(),
                token: token.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        self.inner
            .lock()
            .bootstraps
            .insert(machine.to_string(), (pool.to_string(), token.clone()));
        Ok(token)
    }

    /// Whether `token` is the unused bootstrap token of machine `name` of `pool`.
    fn bootstrap_matches(&self, name: &str, pool: &str, token: &str) -> bool {
        self.inner
            .lock()
            .bootstraps
            .get(name)
            .is_some_and(|(p, b)| {
                p == pool && pubrun_core::secret::verify_bearer(b.as_bytes(), token.as_bytes())
            })
    }

    /// The agent `name` has called with the pool token it was handed: its
    /// bootstrap token is used up.
    async fn bootstrap_used(&self, name: &str) {
        let had = self.inner.lock().bootstraps.remove(name).is_some();
        if had {
            if let Err(e) = self.inner.store.delete_bootstrap(name).await {
                tracing::warn!(machine = name, error = %e, "cannot drop a used bootstrap token");
            }
        }
    }

    fn check_token(&self, pool: &str, token: &str) -> Result<PoolSpec, AgentError> {
        let st = self.inner.lock();
        let Some(p) = st.pools.get(pool) else {
            return Err(AgentError::Unauthorized(format!(
                "pool {pool} is not declared on this server"
            )));
        };
        if !p.spec.provider.on_demand()
            && !matches!(p.spec.provider, pubrun_core::pool::ProviderSpec::Agents)
        {
            return Err(AgentError::Invalid(format!(
                "pool {pool} is a {} pool: agents cannot join it",
                p.spec.provider.kind()
            )));
        }
        if !pubrun_core::secret::verify_bearer(p.token.as_bytes(), token.as_bytes()) {
            return Err(AgentError::Unauthorized(format!(
                "wrong token for pool {pool}"
            )));
        }
        Ok(p.spec.clone())
    }

    /// The pool of the agent `c.name`, if `c` carries its pool's token and
    /// its current session.
    async fn agent_pool(&self, c: &Creds<'_>) -> Result<String, AgentError> {
        let (pool, session_ok) = {
            let st = self.inner.lock();
            let a = st.agents.get(c.name).ok_or_else(|| {
                AgentError::UnknownAgent(format!("agent {} is not registered", c.name))
            })?;
            (
                a.pool.clone(),
                pubrun_core::secret::verify_bearer(a.session.as_bytes(), c.session.as_bytes()),
            )
        };
        self.check_token(&pool, c.token)?;
        if !session_ok {
            return Err(AgentError::BadSession(format!(
                "no valid session for agent {} (header {SESSION_HEADER}): register again",
                c.name
            )));
        }
        // Its registration's answer (with the pool token) has arrived.
        self.bootstrap_used(c.name).await;
        Ok(pool)
    }

    /// Checks an agent's credentials (before its body is read).
    pub(crate) async fn check_agent(&self, c: &Creds<'_>) -> Result<(), AgentError> {
        self.agent_pool(c).await.map(|_| ())
    }

    /// Registers an agent and hands it a fresh session. A name held by an
    /// agent heard from within the pool's `lease_timeout` is refused
    /// (`NameTaken`) unless the caller presents that agent's session; once
    /// that agent has been silent longer, it is treated as lost (its leases
    /// are taken back) and the name is free.
    pub async fn register(
        &self,
        r: Register,
        token: &str,
        session: Option<&str>,
    ) -> Result<Registered, AgentError> {
        validate_agent_name(&r.name)?;
        if r.slots == 0 || r.slots > 1000 {
            return Err(AgentError::Invalid("slots must be 1..1000".into()));
        }
        // The pool token, or (once) the machine's bootstrap token, which
        // the answer trades for the pool token.
        let (spec, handed) = match self.check_token(&r.pool, token) {
            Ok(spec) => (spec, None),
            Err(AgentError::Unauthorized(m)) => {
                if !self.bootstrap_matches(&r.name, &r.pool, token) {
                    return Err(AgentError::Unauthorized(m));
                }
                let pool_token = self.token(&r.pool).ok_or(AgentError::Unauthorized(m))?;
                (self.check_token(&r.pool, &pool_token)?, Some(pool_token))
            }
            Err(e) => return Err(e),
        };
        let now = now_ms();
        let existing = self.machine(&r.name).await.map_err(AgentError::Internal)?;
        if let Some(m) = &existing {
            if m.pool != r.pool {
                return Err(AgentError::Invalid(format!(
                    "machine {} belongs to pool {}, not {}",
                    r.name, m.pool, r.pool
                )));
            }
        }
        if spec.provider.on_demand() && existing.is_none() {
            return Err(AgentError::Invalid(format!(
                "pool {} starts its own machines; {} is not one of them",
                r.pool, r.name
            )));
        }
        let new_session = random_token().map_err(AgentError::Internal)?;
        self.claim_name(&r, &new_session, session, now).await?;
        let recorded = self.record_registered(&r, &spec, now).await;
        if let Err(e) = recorded {
            // Give the name back: this registration did not happen.
            let mut st = self.inner.lock();
            if st
                .agents
                .get(&r.name)
                .is_some_and(|a| a.session == new_session)
            {
                st.agents.remove(&r.name);
            }
            return Err(AgentError::Internal(e));
        }
        tracing::info!(
            agent = r.name,
            pool = r.pool,
            slots = r.slots,
            "agent registered"
        );
        self.refresh_machine(&r.name).await;
        Ok(Registered {
            lease_timeout_secs: spec.lease_timeout.as_secs_f64(),
            poll_secs: poll_hold(&spec).as_secs_f64(),
            session: new_session,
            token: handed,
        })
    }

    /// The machine of a registered agent is up (its row read again: taking
    /// the name over from a lost agent may have just changed it).
    async fn record_registered(
        &self,
        r: &Register,
        spec: &PoolSpec,
        now: i64,
    ) -> Result<(), String> {
        let mut m = self.machine(&r.name).await?.unwrap_or(MachineRow {
            name: r.name.clone(),
            pool: r.pool.clone(),
            provider: spec.provider.kind().to_string(),
            provider_id: String::new(),
            state: MachineState::Provisioning,
            state_since_ms: now,
            idle_since_ms: None,
            created_ms: now,
            cordoned: false,
            slots: r.slots,
            last_error: String::new(),
            needs_stop: false,
        });
        m.slots = r.slots;
        if !matches!(
            m.state,
            MachineState::Ready | MachineState::Busy | MachineState::Idle
        ) {
            m.set_state(MachineState::Ready, now)
                .map_err(|e| format!("machine {}: {e}", m.name))?;
            m.idle_since_ms = Some(now);
            m.last_error.clear();
            m.needs_stop = false;
        }
        self.put_machine(&m).await?;
        self.inner
            .store
            .span_open(&m.name, &m.pool, now)
            .await
            .map_err(|e| format!("opening the cost span of machine {}: {e}", m.name))
    }

    /// Takes the name `r.name` for a new session, in one step under the
    /// lock so two registrations cannot both win.
    async fn claim_name(
        &self,
        r: &Register,
        new_session: &str,
        presented: Option<&str>,
        now: i64,
    ) -> Result<(), AgentError> {
        enum Holder {
            Free,
            /// The live holder itself (it presented its session).
            Itself,
            Live {
                silent_ms: i64,
                timeout_ms: i64,
            },
            /// Silent past its lease timeout: lost.
            Lost,
        }
        let holder = |st: &State| match st.agents.get(&r.name) {
            None => Holder::Free,
            Some(a) => {
                let timeout_ms = st
                    .pools
                    .get(&a.pool)
                    .map_or(30_000, |p| p.spec.lease_timeout.as_millis() as i64);
                let silent_ms = now - a.last_seen_ms;
                if a.polling == 0 && silent_ms > timeout_ms {
                    Holder::Lost
                } else if presented.is_some_and(|s| {
                    pubrun_core::secret::verify_bearer(a.session.as_bytes(), s.as_bytes())
                }) {
                    Holder::Itself
                } else {
                    Holder::Live {
                        silent_ms,
                        timeout_ms,
                    }
                }
            }
        };
        let entry = AgentEntry {
            pool: r.pool.clone(),
            session: new_session.to_string(),
            slots: r.slots,
            labels: r.labels.clone(),
            last_seen_ms: now,
            polling: 0,
            registered_ms: now,
            version: r.version.clone(),
        };
        let taken = |silent_ms: i64, timeout_ms: i64| {
            AgentError::NameTaken(format!(
                "agent name {} belongs to a live agent (heard from {} s ago); it is free once that agent has been silent for {} s",
                r.name,
                silent_ms.max(0) / 1000,
                timeout_ms / 1000
            ))
        };
        {
            let mut st = self.inner.lock();
            match holder(&st) {
                Holder::Free | Holder::Itself => {
                    st.agents.insert(r.name.clone(), entry);
                    return Ok(());
                }
                Holder::Live {
                    silent_ms,
                    timeout_ms,
                } => return Err(taken(silent_ms, timeout_ms)),
                Holder::Lost => {}
            }
        }
        // Lost, as the sweep would find it: its leases are taken back (and
        // its session dropped) before the name changes hands.
        self.sweep(now).await;
        let mut st = self.inner.lock();
        match holder(&st) {
            Holder::Live {
                silent_ms,
                timeout_ms,
            } => Err(taken(silent_ms, timeout_ms)),
            _ => {
                st.agents.insert(r.name.clone(), entry);
                Ok(())
            }
        }
    }

    /// Forgets the agent of a machine that was stopped or deleted.
    pub(crate) fn forget_agent(&self, name: &str) {
        self.inner.lock().agents.remove(name);
    }

    pub async fn poll(&self, c: &Creds<'_>, p: Poll) -> Result<PollReply, AgentError> {
        let pool = self.agent_pool(c).await?;
        if p.name != c.name {
            return Err(AgentError::Invalid(format!(
                "poll names agent {} but header {AGENT_HEADER} says {}",
                p.name, c.name
            )));
        }
        let hold = {
            let st = self.inner.lock();
            st.pools
                .get(&pool)
                .map(|e| poll_hold(&e.spec))
                .unwrap_or(POLL_HOLD)
        };
        let _open = OpenPoll::new(self.clone(), p.name.clone());
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            // Register interest before looking, so a wake in between is kept.
            let notified = self.inner.work.notified();
            let reply = self.poll_once(&p, &pool).await?;
            if !reply.assign.is_empty() || !reply.cancel.is_empty() || !reply.revoked.is_empty() {
                return Ok(reply);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(reply);
            }
        }
    }

    async fn poll_once(&self, p: &Poll, pool: &str) -> Result<PollReply, AgentError> {
        let now = now_ms();
        let cordoned = self
            .machine(&p.name)
            .await
            .map_err(AgentError::Internal)?
            .is_some_and(|m| m.cordoned || !m.state.is_up() || m.state == MachineState::Stopping);
        let mut reply = PollReply {
            cordoned,
            ..Default::default()
        };
        let unknown: Vec<u64> = {
            let mut st = self.inner.lock();
            if let Some(a) = st.agents.get_mut(&p.name) {
                a.last_seen_ms = now;
            }
            let mut unknown = Vec::new();
            for &token in &p.leases {
                match st.leases.get(&token) {
                    Some(l) if l.machine == p.name => {}
                    Some(_) => reply.revoked.push(token),
                    None => unknown.push(token),
                }
            }
            unknown
        };
        // Not followed in memory: after a restart one may be waiting to be
        // re-attached; only the store knows.
        for token in unknown {
            match self.inner.store.lease(token).await {
                Ok(Some(row)) if row.state.is_active() && row.machine == p.name => {}
                Ok(_) => reply.revoked.push(token),
                Err(e) => return Err(AgentError::Internal(e.to_string())),
            }
        }
        // Attempts for the free slots, out of the queue; each is handed out
        // only once its lease is written.
        let taken: Vec<Pending> = {
            let mut st = self.inner.lock();
            for (token, l) in st.leases.iter_mut() {
                if l.machine == p.name && l.cancel_requested && !l.cancel_sent {
                    l.cancel_sent = true;
                    reply.cancel.push(*token);
                }
            }
            // The poll's own count dates from when it was sent; a long poll
            // may have been held since. Runs that ended meanwhile (reported,
            // so no longer leased here) free their slots now, or an agent
            // with full slots would wait out the whole hold per run.
            let slots = st.agents.get(&p.name).map_or(0, |a| a.slots);
            let live = st.leases.values().filter(|l| l.machine == p.name).count() as u32;
            let free = p.free_slots.max(slots.saturating_sub(live));
            let mut taken = Vec::new();
            while (taken.len() as u32) < free && !cordoned {
                let Some(pending) = st.waiting.get_mut(pool).and_then(|q| q.pop_front()) else {
                    break;
                };
                if pending.events.is_closed() {
                    continue; // its run was cancelled or the server is stopping
                }
                taken.push(pending);
            }
            taken
        };
        let mut assigned = Vec::new();
        let mut unassigned = Vec::new();
        let mut taken = taken.into_iter();
        while let Some(pending) = taken.next() {
            let req = &pending.req;
            let lease = NewLease {
                run_id: &req.run_id,
                job: &req.job,
                attempt: req.attempt,
                pool,
                machine: &p.name,
                now_ms: now,
            };
            match self.inner.store.new_lease(&lease).await {
                Ok(token) => assigned.push((token, pending)),
                Err(e) => {
                    tracing::warn!(pool, machine = p.name, error = %e, "cannot write a lease; the run waits");
                    unassigned.push(pending);
                    unassigned.extend(taken.by_ref());
                }
            }
        }
        {
            let mut st = self.inner.lock();
            if !unassigned.is_empty() {
                // Back to the front of the queue, in their order.
                let q = st.waiting.entry(pool.to_string()).or_default();
                for pending in unassigned.into_iter().rev() {
                    q.push_front(pending);
                }
            }
            for (token, pending) in assigned {
                let req = &pending.req;
                reply.assign.push(Assignment {
                    lease: token,
                    run_id: req.run_id.clone(),
                    job: req.job.clone(),
                    attempt: req.attempt,
                    spec: req.spec.clone(),
                    timeout_secs: req.timeout.as_secs_f64(),
                    grace_secs: req.grace_period.as_secs_f64(),
                    env: req.env.clone(),
                    secrets: req.secrets.clone(),
                    server_workdir: req.workdir.display().to_string(),
                    outputs: req.outputs.clone(),
                    log_limit: pending.log.limit(),
                });
                // Sent and followed under one lock: a cancel that comes
                // with `Assigned` finds the lease.
                let _ = pending.events.send(Event::Assigned {
                    token,
                    machine: p.name.clone(),
                });
                st.leases.insert(
                    token,
                    LiveLease {
                        pool: pool.to_string(),
                        machine: p.name.clone(),
                        workdir: pending.req.workdir.clone(),
                        outputs: pending.req.outputs.clone(),
                        log: pending.log,
                        log_received: 0,
                        log_resync: false,
                        events: pending.events,
                        cancel_requested: false,
                        cancel_sent: false,
                    },
                );
            }
        }
        if !reply.assign.is_empty() {
            self.refresh_machine(&p.name).await;
        }
        Ok(reply)
    }

    /// The live lease `token` held by agent `name`, checked against the
    /// database: `Fenced` when it is no longer honoured.
    pub(crate) async fn live<T>(
        &self,
        c: &Creds<'_>,
        lease: u64,
        f: impl FnOnce(&mut LiveLease) -> T,
    ) -> Result<T, AgentError> {
        let name = c.name;
        let _pool = match self.agent_pool(c).await {
            Ok(p) => p,
            // An agent forgotten for its silence (or whose name another
            // agent has since taken) comes back: the leases it held were
            // taken back, so it gets 409 for them (not 404/401, which it
            // would retry until it registers again). A live lease of the
            // name stays out of its reach.
            Err(e @ (AgentError::UnknownAgent(_) | AgentError::BadSession(_))) => {
                return match self.stored_lease(lease).await? {
                    Some(row) if row.machine == name && !row.state.is_active() => {
                        self.check_token(&row.pool, c.token)?;
                        Err(AgentError::Fenced(format!(
                            "lease {lease} is no longer {name}'s ({})",
                            if row.reason.is_empty() {
                                "-"
                            } else {
                                &row.reason
                            }
                        )))
                    }
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        {
            let mut st = self.inner.lock();
            if let Some(l) = st.leases.get_mut(&lease) {
                if l.machine != name {
                    return Err(AgentError::Fenced(format!(
                        "lease {lease} belongs to {}",
                        l.machine
                    )));
                }
                return Ok(f(l));
            }
        }
        match self.stored_lease(lease).await? {
            Some(row) if row.state.is_active() && row.machine == name => Err(AgentError::NotReady(
                format!("lease {lease} is being recovered after a server restart; try again"),
            )),
            Some(row) => Err(AgentError::Fenced(format!(
                "lease {lease} is {} ({}); the run is no longer yours",
                match row.state {
                    LeaseState::Done => "already reported",
                    _ => "revoked",
                },
                if row.reason.is_empty() {
                    "-"
                } else {
                    &row.reason
                }
            ))),
            None => Err(AgentError::Fenced(format!("no lease {lease}"))),
        }
    }

    async fn stored_lease(&self, lease: u64) -> Result<Option<crate::db::LeaseRow>, AgentError> {
        self.inner
            .store
            .lease(lease)
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))
    }

    pub async fn started(
        &self,
        c: &Creds<'_>,
        lease: u64,
        handle: String,
    ) -> Result<(), AgentError> {
        self.live(c, lease, |_| ()).await?;
        self.inner
            .store
            .lease_started(lease, now_ms())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        self.live(c, lease, |l| {
            let _ = l.events.send(Event::Started { handle });
        })
        .await
    }

    /// Appends log bytes starting at `offset`; returns the new total. Bytes
    /// already received (a retried call) are skipped.
    pub async fn log(
        &self,
        c: &Creds<'_>,
        lease: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<u64, AgentError> {
        let (log, received) = self
            .live(c, lease, |l| {
                if l.log_resync {
                    l.log_resync = false;
                    l.log_received = offset;
                }
                (l.log.clone(), l.log_received)
            })
            .await?;
        if offset > received {
            return Err(AgentError::Invalid(format!(
                "log offset {offset} is past the {received} bytes received; resend from {received}"
            )));
        }
        let skip = (received - offset) as usize;
        if skip < bytes.len() {
            log.write(&bytes[skip..]).await;
        }
        let total = offset.max(received) + bytes.len().saturating_sub(skip) as u64;
        let total = total.max(received);
        self.live(c, lease, |l| {
            l.log_received = l.log_received.max(total);
            l.log_received
        })
        .await
    }

    pub async fn report(&self, c: &Creds<'_>, lease: u64, exit: Exit) -> Result<(), AgentError> {
        self.live(c, lease, |_| ()).await?;
        let ok = self
            .inner
            .store
            .lease_end(lease, LeaseEnd::Done(&exit), now_ms())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        if !ok {
            return Err(AgentError::Fenced(format!("lease {lease} was revoked")));
        }
        let l = self.inner.lock().leases.remove(&lease);
        if let Some(l) = l {
            let _ = l.events.send(Event::Ended(exit));
        }
        // A slot is free: the agent's held poll may take the next run.
        self.inner.work.notify_waiters();
        self.refresh_machine(c.name).await;
        Ok(())
    }

    /// Takes back leases whose agent has not been heard of for the pool's
    /// lease timeout, and forgets silent agents. Called every second.
    pub async fn sweep(&self, now: i64) {
        let mut expired = Vec::new();
        let mut lost_agents = Vec::new();
        {
            let st = self.inner.lock();
            for (name, a) in &st.agents {
                let Some(p) = st.pools.get(&a.pool) else {
                    continue;
                };
                let timeout = p.spec.lease_timeout.as_millis() as i64;
                if a.polling == 0 && now - a.last_seen_ms > timeout {
                    lost_agents.push((name.clone(), now - a.last_seen_ms));
                }
            }
            for (token, l) in &st.leases {
                let seen = st
                    .agents
                    .get(&l.machine)
                    .map(|a| (a.polling, a.last_seen_ms));
                let timeout = st
                    .pools
                    .get(&l.pool)
                    .map_or(30_000, |p| p.spec.lease_timeout.as_millis() as i64);
                let silent = match seen {
                    Some((polling, last)) => polling == 0 && now - last > timeout,
                    // Unknown agent (server restarted and it did not come back).
                    None => now - self.inner.boot_ms > timeout,
                };
                if silent {
                    expired.push((*token, l.machine.clone(), timeout));
                }
            }
        }
        // Machines that were up before a restart and whose agent has not
        // come back since: as lost as an agent that went silent.
        let machines = match self.machines().await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "lease sweep cannot read machines");
                Vec::new()
            }
        };
        {
            let st = self.inner.lock();
            for m in machines {
                let up = matches!(
                    m.state,
                    MachineState::Ready | MachineState::Busy | MachineState::Idle
                );
                let timeout = st
                    .pools
                    .get(&m.pool)
                    .map_or(30_000, |p| p.spec.lease_timeout.as_millis() as i64);
                let silent_ms = now - self.inner.boot_ms.max(m.state_since_ms);
                if up && !st.agents.contains_key(&m.name) && silent_ms > timeout {
                    lost_agents.push((m.name, silent_ms));
                }
            }
        }
        for (token, machine, timeout) in expired {
            let reason = format!("machine {machine} not heard from for {} s", timeout / 1000);
            match self
                .inner
                .store
                .lease_end(token, LeaseEnd::Revoked(&reason), now)
                .await
            {
                Ok(true) => {
                    tracing::warn!(
                        lease = token,
                        machine,
                        "lease expired; the run goes back to the queue"
                    );
                    let l = self.inner.lock().leases.remove(&token);
                    if let Some(l) = l {
                        let exit = if l.cancel_requested {
                            Exit::failed(EndCause::Cancelled, format!("cancelled; {reason}"))
                        } else {
                            Exit::failed(
                                EndCause::Lost,
                                format!("lost: {reason}; retrying on another machine"),
                            )
                        };
                        let _ = l.events.send(Event::Ended(exit));
                    }
                }
                Ok(false) => {
                    self.inner.lock().leases.remove(&token);
                }
                Err(e) => tracing::error!(lease = token, error = %e, "cannot revoke lease"),
            }
        }
        for (name, silent_ms) in lost_agents {
            self.inner.lock().agents.remove(&name);
            tracing::warn!(agent = name, silent_ms, "agent lost");
            let mut m = match self.machine(&name).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(machine = name, error = %e, "cannot read a lost agent's machine");
                    continue;
                }
            };
            // Only a machine this agent serves: one (re)starting since
            // is waiting for its next agent (boot_timeout covers it).
            if matches!(
                m.state,
                MachineState::Ready | MachineState::Busy | MachineState::Idle
            ) {
                if let Err(e) = m.set_state(MachineState::Failed, now) {
                    tracing::error!(machine = name, error = %e, "cannot record a lost machine");
                    continue;
                }
                m.last_error = format!("agent not heard from for {} s", silent_ms / 1000);
                // Still up as far as we know (a partition): the autoscaler
                // stops it, and the cost span ends then.
                m.needs_stop = self.provider(&m.pool).is_some();
                if let Err(e) = self.put_machine(&m).await {
                    tracing::error!(machine = name, error = %e, "cannot record a lost machine");
                    continue;
                }
                if !m.needs_stop {
                    self.span_close_logged(&name, now).await;
                }
            }
        }
    }

    /// Keeps a machine's busy/idle state in line with its live leases.
    pub(crate) async fn refresh_machine(&self, name: &str) {
        let runs = self
            .inner
            .lock()
            .leases
            .values()
            .filter(|l| l.machine == name)
            .count();
        let mut m = match self.machine(name).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(machine = name, error = %e, "cannot read machine state");
                return;
            }
        };
        let want = if runs > 0 {
            MachineState::Busy
        } else {
            MachineState::Idle
        };
        if matches!(
            m.state,
            MachineState::Ready | MachineState::Busy | MachineState::Idle
        ) && m.state != want
        {
            let now = now_ms();
            if let Err(e) = m.set_state(want, now) {
                tracing::warn!(machine = name, error = %e, "cannot record machine state");
                return;
            }
            m.idle_since_ms = (runs == 0).then_some(now);
            if let Err(e) = self.put_machine(&m).await {
                tracing::warn!(machine = name, error = %e, "cannot record machine state");
            }
        }
    }

    /// Sets cordon (no new runs) on a machine.
    pub async fn cordon(&self, name: &str, on: bool) -> Result<MachineRow, String> {
        let mut m = self
            .machine(name)
            .await?
            .ok_or_else(|| format!("no machine {name}"))?;
        m.cordoned = on;
        self.put_machine(&m).await?;
        Ok(m)
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

fn poll_hold(spec: &PoolSpec) -> Duration {
    (spec.lease_timeout / 3).clamp(Duration::from_secs(1), POLL_HOLD)
}

/// Marks an agent as polling for as long as the poll is open.
struct OpenPoll {
    pools: Pools,
    name: String,
}

impl OpenPoll {
    fn new(pools: Pools, name: String) -> Self {
        if let Some(a) = pools.inner.lock().agents.get_mut(&name) {
            a.polling += 1;
        }
        OpenPoll { pools, name }
    }
}

impl Drop for OpenPoll {
    fn drop(&mut self) {
        if let Some(a) = self.pools.inner.lock().agents.get_mut(&self.name) {
            a.polling = a.polling.saturating_sub(1);
            a.last_seen_ms = now_ms();
        }
    }
}

/// The executor of one remote pool.
pub struct PoolExecutor {
    pools: Pools,
    pool: String,
}

impl PoolExecutor {
    async fn follow(
        &self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        mut token: Option<u64>,
        waiting_seq: Option<u64>,
        log: Arc<LogSink>,
        cancel: CancellationToken,
        mut on_started: Option<OnStarted>,
    ) -> Exit {
        let mut machine = String::new();
        let mut cancel_sent = false;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Assigned { token: t, machine: m }) => {
                        token = Some(t);
                        log.note(&format!("leased to machine {m} (lease {t})")).await;
                        machine = m;
                        if cancel.is_cancelled() {
                            self.pools.request_cancel(t);
                            cancel_sent = true;
                        }
                    }
                    Some(Event::Started { handle }) => {
                        if let Some(f) = on_started.take() {
                            f(pubrun_exec::Started { machine: machine.clone(), handle: format!("lease {} {handle}", token.unwrap_or(0)) });
                        }
                    }
                    Some(Event::Ended(exit)) => return exit,
                    None => {
                        return Exit::failed(EndCause::Infrastructure, "pool executor stopped")
                    }
                },
                _ = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    match token {
                        Some(t) => self.pools.request_cancel(t),
                        None => {
                            if waiting_seq.is_some_and(|s| self.pools.dequeue(&self.pool, s)) {
                                return Exit::failed(
                                    EndCause::Cancelled,
                                    "cancelled while waiting for a machine",
                                );
                            }
                            // Taken by a poll just now: `Assigned` is on its way.
                        }
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Executor for PoolExecutor {
    async fn run(
        &self,
        req: RunRequest,
        log: Arc<LogSink>,
        cancel: CancellationToken,
        on_started: OnStarted,
    ) -> Exit {
        log.note(&format!("waiting for a machine of pool {}", self.pool))
            .await;
        let (seq, rx) = self.pools.enqueue(&self.pool, req, log.clone());
        self.follow(rx, None, Some(seq), log, cancel, Some(on_started))
            .await
    }

    async fn reattach(
        &self,
        req: RunRequest,
        log: Arc<LogSink>,
        cancel: CancellationToken,
    ) -> Option<Exit> {
        let row = match self.pools.inner.store.lease_of_run(&req.run_id).await {
            Ok(row) => row?,
            Err(e) => {
                tracing::error!(run = req.run_id, error = %e, "cannot read the run's lease");
                return None;
            }
        };
        if row.attempt != req.attempt {
            return None;
        }
        match row.state {
            LeaseState::Done => return row.exit,
            // Taken back from a silent machine: the same attempt runs again.
            LeaseState::Revoked => {
                return Some(Exit::failed(
                    EndCause::Lost,
                    format!(
                        "lost: lease {} on machine {} was taken back; retrying on another machine",
                        row.token, row.machine
                    ),
                ))
            }
            LeaseState::Assigned | LeaseState::Running => {}
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.pools.inner.lock().leases.insert(
            row.token,
            LiveLease {
                pool: self.pool.clone(),
                machine: row.machine.clone(),
                workdir: req.workdir.clone(),
                outputs: req.outputs.clone(),
                log: log.clone(),
                log_received: 0,
                log_resync: true,
                events: tx,
                cancel_requested: false,
                cancel_sent: false,
            },
        );
        log.note(&format!(
            "waiting for machine {} to report lease {}",
            row.machine, row.token
        ))
        .await;
        Some(
            self.follow(rx, Some(row.token), None, log, cancel, None)
                .await,
        )
    }
}

impl pubrun_exec::PoolRouter for Pools {
    fn executor(&self, pool: &str) -> Option<Arc<dyn Executor>> {
        Pools::executor(self, pool)
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

/// 32 random bytes from the operating system's CSPRNG, hex (pool tokens,
/// agent sessions). No fallback: without randomness there is no secret.
pub(crate) fn random_token() -> Result<String, String> {
    token_from(getrandom::fill)
}

fn token_from(
    fill: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>,
) -> Result<String, String> {
    let mut buf = [0u8; 32];
    fill(&mut buf).map_err(|e| {
        format!("cannot generate a secret token: no randomness from the operating system: {e}")
    })?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The credentials of an agent's call after register, all from headers.
pub struct Creds<'a> {
    pub name: &'a str,
    pub token: &'a str,
    pub session: &'a str,
}

/// Agent names become machine names, log lines and label values: 1-63 of
/// `A-Z a-z 0-9 . _ -`.
pub fn validate_agent_name(name: &str) -> Result<(), AgentError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "agent name {name:?} is not valid: use 1-63 of A-Z a-z 0-9 . _ -"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_a_failing_generator_is_an_error() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(a, "0".repeat(64));
        // No randomness: an error, never a predictable token.
        let e = token_from(|_| Err(getrandom::Error::UNSUPPORTED)).unwrap_err();
        assert!(e.contains("randomness"), "{e}");
    }

    #[test]
    fn agent_names_are_checked() {
        for ok in ["a", "pubrun-big-12", "host.example_1", &"x".repeat(63)] {
            assert!(validate_agent_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a b", "a\nb", "bell\u{7}", "a/b", "é", &"x".repeat(64)] {
            assert!(validate_agent_name(bad).is_err(), "{bad:?}");
        }
    }
}
