//! The durable record of schedules, schedule ticks and trigger definitions,
//! behind [`TriggerStore`], with two engines: [`SqliteTriggerStore`]
//! (`triggers.db` in the data directory, the default) and
//! [`PostgresTriggerStore`] (cluster mode, `serve --store`).
//!
//! One state row per schedule:
//!
//! - `cursor`: every tick at or before it is settled (claimed, or passed
//!   over by the missed policy or a pause). **Claiming a tick is a
//!   compare-and-set on this column**: `UPDATE … SET cursor = tick WHERE
//!   name = ? AND cursor = <value read>`. Of several schedulers that read the
//!   same cursor, exactly one update matches the row; the others see 0 rows
//!   changed and skip the tick. This holds on both engines: SQLite
//!   serializes writers, and under PostgreSQL's READ COMMITTED the second
//!   UPDATE waits for the first to commit and re-checks its WHERE clause.
//! - `pending` ([`Claim`]): the outbox. The claim commits *before* the
//!   publish; a successful publish clears it ([`TriggerStore::complete`]). A
//!   claim older than the scheduler's lease is taken over (again by
//!   compare-and-set, [`TriggerStore::take_over`]) and published again: a
//!   crash between claim and publish re-publishes the tick (at least once).
//! - `paused`, `config_paused`: the run-time pause state and the declared
//!   `paused` it was last reconciled with.
//! - `last_fired`, `last_message_id`, `last_error`: for display.
//!
//! And one [`Definition`] per declared schedule or webhook: the spec as JSON
//! and the project whose manifest declared it. Definitions are the durable
//! truth a restarted (or taking-over) server serves; a project's apply
//! replaces only its own rows. Webhook specs hold only the *names* of the
//! environment variables with their secrets, never a secret.

pub mod postgres;
pub mod sqlite;

use chrono::{DateTime, Utc};
use pubrun_core::{Error, Result};

pub use postgres::PostgresTriggerStore;
pub use sqlite::SqliteTriggerStore;

/// What a definition declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefKind {
    Schedule,
    Webhook,
}

impl DefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DefKind::Schedule => "schedule",
            DefKind::Webhook => "webhook",
        }
    }
}

/// A declared schedule or webhook: its spec as JSON and the project that
/// declared it (the owner: only that project's apply changes or deletes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub name: String,
    pub project: String,
    pub spec: String,
}

/// Whose definitions a replace covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every definition of the kind, whatever its project.
    All,
    /// Only the definitions of this project; a name another project holds is
    /// an error.
    Project(&'a str),
}

/// A replace of the definitions of `kind` within `scope` by `defs`, each
/// with its declared pause state (see [`TriggerStore::replace_definitions`]).
#[derive(Debug, Clone, Copy)]
pub struct Replacement<'a> {
    pub kind: DefKind,
    pub scope: Scope<'a>,
    pub defs: &'a [(Definition, bool)],
    pub now: DateTime<Utc>,
}

impl Replacement<'_> {
    /// The declared schedules `(name, paused)` the state rows follow.
    pub(crate) fn declared(&self) -> Vec<(String, bool)> {
        self.defs
            .iter()
            .map(|(d, p)| (d.name.clone(), *p))
            .collect()
    }
}

/// A claimed tick not yet published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub tick: DateTime<Utc>,
    pub owner: String,
    pub claimed_at: DateTime<Utc>,
}

/// A tick of a schedule that `owner` claims (or holds, or completes) at
/// `now`: what every call on a claim names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickClaim<'a> {
    pub name: &'a str,
    pub tick: DateTime<Utc>,
    pub owner: &'a str,
    pub now: DateTime<Utc>,
}

/// One schedule's durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleState {
    pub name: String,
    pub cursor: DateTime<Utc>,
    pub paused: bool,
    pub config_paused: bool,
    pub pending: Option<Claim>,
    pub last_fired: Option<DateTime<Utc>>,
    pub last_message_id: Option<String>,
    pub last_error: Option<String>,
}

/// Schedules' state rows and the definitions of schedules and webhooks.
/// Errors are `pubrun_core` errors: failed precondition for a name another
/// project holds (or a database written by a newer pubrun), unavailable for
/// a database fault or a write refused by the fence, internal for a corrupt
/// row.
#[async_trait::async_trait]
pub trait TriggerStore: Send + Sync + 'static {
    /// Makes the state rows match the declared schedules `(name, paused)`: a
    /// new schedule starts at `now` (earlier ticks never fire) with
    /// `paused = declared`; for an existing one, a change of the declared
    /// `paused` overrides the run-time state, otherwise the run-time state
    /// stays. Rows of schedules no longer declared are deleted.
    async fn reconcile(&self, declared: &[(String, bool)], now: DateTime<Utc>) -> Result<()>;

    /// The definitions of `kind`, by name.
    async fn definitions(&self, kind: DefKind) -> Result<Vec<Definition>>;

    /// Replaces the definitions of `r.kind` within `r.scope` by `r.defs`, in
    /// one transaction; nothing changes on an error (a name that another
    /// project holds). For schedules the state rows follow in the same
    /// transaction: the `bool` gives each definition's declared pause state
    /// (see [`reconcile`](Self::reconcile)), and rows of schedules no longer
    /// defined are deleted. Returns every definition of the kind afterwards.
    async fn replace_definitions(&self, r: Replacement<'_>) -> Result<Vec<Definition>>;

    async fn get(&self, name: &str) -> Result<Option<ScheduleState>>;

    /// By name.
    async fn list(&self) -> Result<Vec<ScheduleState>>;

    /// Claims the tick if the cursor is still `expected_cursor` and the
    /// schedule is not paused. True if this caller won. A claim supersedes
    /// an older pending claim (the older tick then counts as missed).
    async fn claim(&self, c: TickClaim<'_>, expected_cursor: DateTime<Utc>) -> Result<bool>;

    /// Takes over `from`, the pending claim of the tick as read (expired
    /// lease, or this owner retrying). True if this caller won.
    async fn take_over(&self, c: TickClaim<'_>, from: &Claim) -> Result<bool>;

    /// Records a published tick and clears its claim (if still the owner's);
    /// true if the claim was cleared. The tick is shown as fired either way.
    async fn complete(&self, c: TickClaim<'_>, message_id: &str) -> Result<bool>;

    /// Records a failed publish; the claim stays pending.
    async fn record_error(&self, name: &str, error: &str, now: DateTime<Utc>) -> Result<()>;

    /// Records a run-now publish.
    async fn record_run_now(&self, name: &str, message_id: &str, now: DateTime<Utc>) -> Result<()>;

    /// Pauses or resumes. Resuming moves the cursor to `now`: ticks that
    /// passed while paused never fire. Returns false for an unknown name.
    async fn set_paused(&self, name: &str, paused: bool, now: DateTime<Utc>) -> Result<bool>;
}

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn corrupt(name: &str, what: &str) -> Error {
    Error::internal(format!(
        "trigger store: corrupt {what} in schedule {name:?}"
    ))
}

fn from_ms(name: &str, what: &str, v: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v).ok_or_else(|| corrupt(name, what))
}

/// The refusal of a name that another project's manifest declared.
pub(crate) fn owned_elsewhere(kind: DefKind, name: &str, other: &str) -> Error {
    Error::precondition(format!(
        "{} \"{}\" belongs to project \"{}\" (declared by its manifest); {} names are server-wide: rename it, or remove it from project \"{}\"'s manifest first",
        kind.as_str(),
        name,
        other,
        kind.as_str(),
        other
    ))
}

/// Checks that no definition in `defs` takes a name another project holds.
pub(crate) fn check_scope(
    kind: DefKind,
    scope: Scope<'_>,
    existing: &[Definition],
    defs: &[(Definition, bool)],
) -> Result<()> {
    if let Scope::Project(project) = scope {
        for (d, _) in defs {
            if let Some(other) = existing
                .iter()
                .find(|e| e.name == d.name && e.project != project)
            {
                return Err(owned_elsewhere(kind, &d.name, &other.project));
            }
        }
    }
    Ok(())
}

/// A state row as stored: both engines read into this, and a row that does
/// not parse is an error, never a default.
pub(crate) struct RawState {
    pub name: String,
    pub cursor_ms: i64,
    pub paused: bool,
    pub config_paused: bool,
    pub pending_tick_ms: Option<i64>,
    pub claimed_by: Option<String>,
    pub claimed_at_ms: Option<i64>,
    pub last_fired_ms: Option<i64>,
    pub last_message_id: Option<String>,
    pub last_error: Option<String>,
}

impl RawState {
    pub(crate) fn parse(self) -> Result<ScheduleState> {
        let name = self.name;
        let pending = match (self.pending_tick_ms, self.claimed_by, self.claimed_at_ms) {
            (None, _, _) => None,
            (Some(tick), Some(owner), Some(at)) => Some(Claim {
                tick: from_ms(&name, "pending tick", tick)?,
                owner,
                claimed_at: from_ms(&name, "claim time", at)?,
            }),
            _ => return Err(corrupt(&name, "claim (owner or time missing)")),
        };
        Ok(ScheduleState {
            cursor: from_ms(&name, "cursor", self.cursor_ms)?,
            paused: self.paused,
            config_paused: self.config_paused,
            pending,
            last_fired: match self.last_fired_ms {
                None => None,
                Some(v) => Some(from_ms(&name, "last fire time", v)?),
            },
            last_message_id: self.last_message_id,
            last_error: self.last_error,
            name,
        })
    }
}
