//! Durable storage for pubrun, behind the [`Store`] trait.
//!
//! A store keeps two things:
//! - the **catalog**: topics and subscriptions (small, rewritten whole on change);
//! - the **log**: an ordered sequence of [`Record`]s — published message batches,
//!   acknowledgements and seeks — from which the broker rebuilds every subscription's
//!   backlog at start.
//!
//! The broker assigns sequence numbers; the store only promises that records
//! are durable, in the order `append` was called, when the returned future
//! resolves. `embedded` is the default single-node engine (segment files with
//! group commit); `postgres` keeps the same data in PostgreSQL for cluster
//! mode, written only by the holder of the `broker` ownership lease.

pub mod buckets;
pub mod catalog;
pub mod directory;
pub mod embedded;
mod fenced;
pub mod pools;
pub mod postgres;
pub mod record;
pub mod runs;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
pub mod triggers;

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

pub use buckets::{BucketStore, PostgresBucketStore, SqliteBucketStore};
pub use catalog::{Catalog, SnapshotEntry, SubscriptionEntry, TopicEntry};
pub use embedded::EmbeddedStore;
pub use pools::{PoolStore, PostgresPoolStore, SqlitePoolStore};
pub use postgres::{PostgresOptions, PostgresStore};
pub use record::{Record, SeekTarget};
pub use runs::{PostgresRunStore, RunStore, SqliteRunStore};
pub use triggers::{PostgresTriggerStore, SqliteTriggerStore, TriggerStore};

/// When a write counts as durable (`pubrun serve --sync`), for every engine
/// of the server: one setting per process, because a server's log, SQLite
/// databases and PostgreSQL sessions must promise the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Acknowledge after `fdatasync` (SQLite `synchronous = FULL`,
    /// PostgreSQL `synchronous_commit = on`): survives power loss.
    #[default]
    Always,
    /// Acknowledge after the write reached the OS; sync at most this long
    /// later (SQLite `synchronous = NORMAL`, PostgreSQL `synchronous_commit =
    /// off`). Survives `kill -9` (the page cache outlives the process); a
    /// power loss can lose what was acknowledged in the last interval.
    Interval(Duration),
}

static SYNC_MODE: OnceLock<SyncMode> = OnceLock::new();

/// Sets the process's [`SyncMode`] once, before any store opens. Later
/// calls are ignored (returns false).
pub fn set_sync_mode(mode: SyncMode) -> bool {
    SYNC_MODE.set(mode).is_ok()
}

/// The process's [`SyncMode`] (`Always` unless set).
pub fn sync_mode() -> SyncMode {
    SYNC_MODE.get().copied().unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another pubrun process")]
    Locked(String),
    #[error("corrupt data in {path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("the store is shut down")]
    Closed,
    /// PostgreSQL cannot be reached (or the connection broke mid-call); the
    /// engine reconnects in the background, nothing was acknowledged.
    #[error("PostgreSQL unavailable: {0}")]
    Unavailable(String),
    /// Another server took over the ownership lease: this server's writes
    /// are refused for good (it must stop serving what it owned).
    #[error("ownership of {name:?} was taken over by another server (our token {token}, now {current}); write refused")]
    Fenced {
        name: String,
        token: i64,
        current: i64,
    },
    /// The database was migrated by a newer pubrun.
    #[error("the PostgreSQL schema is version {found}, newer than this pubrun knows ({known}); upgrade pubrun")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl StoreError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<StoreError> for pubrun_core::Error {
    fn from(e: StoreError) -> Self {
        // A full disk or a failed fsync is an outage of this server, not bad
        // input: clients retry UNAVAILABLE, and nothing was acknowledged.
        pubrun_core::Error::unavailable(format!("storage failure: {e}"))
    }
}

pub type AppendFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// The future of an append an engine handed (`sent`) to its writer task:
/// the writer's answer, or `Closed` when the writer is gone.
pub(crate) fn append_answer(
    sent: bool,
    rx: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
) -> AppendFuture {
    Box::pin(async move {
        if !sent {
            return Err(StoreError::Closed);
        }
        rx.await.map_err(|_| StoreError::Closed)?
    })
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Loads the durable catalog (empty on a new store).
    fn load_catalog(&self) -> Result<Catalog, StoreError>;

    /// Calls `visit` for every record in log order and returns the next
    /// sequence number to assign (above every seq ever handed out). Called
    /// once, after `load_catalog` and before any `append`.
    fn replay(&self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError>;

    /// Durably replaces the catalog. Callers serialise saves (the broker
    /// holds its admin lock), so engines need not order concurrent saves.
    async fn save_catalog(&self, catalog: &Catalog) -> Result<(), StoreError>;

    /// Enqueues records for the log. Enqueue order is log order, so callers
    /// that need an order call this under their own lock; the returned future
    /// resolves once the records are durable.
    fn append(&self, records: Vec<Record>) -> AppendFuture;

    /// Drops log data whose messages all have `seq < lowest_live_seq`
    /// (acknowledged everywhere). Returns bytes reclaimed.
    fn reclaim(&self, lowest_live_seq: u64) -> Result<u64, StoreError>;

    /// Bytes the log occupies now.
    fn log_bytes(&self) -> u64;
}
