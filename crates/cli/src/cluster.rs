//! Which engines keep the server's state: the data directory (default) or,
//! with `--store postgres://…`, PostgreSQL (cluster mode, in progress: the
//! Pub/Sub catalog and log, jobs, runs, dedup keys, run logs, apply's
//! ownership record, and buckets with their objects' bytes live there so
//! far; the rest is still in the data directory, see ARCHITECTURE.md).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pubrun_jobs::SharedRunStore;
use pubrun_store::postgres::BROKER_OWNERSHIP;
use pubrun_store::runs::postgres::Fence;
use pubrun_store::{
    EmbeddedStore, PostgresBucketStore, PostgresOptions, PostgresRunStore, PostgresStore, Store,
};

pub enum ServerStore {
    Embedded(Arc<EmbeddedStore>),
    Postgres(Arc<PostgresStore>),
}

/// `--node-name` default: host name + port.
pub fn default_node_name(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pubrun".to_string());
    format!("{host}:{port}")
}

impl ServerStore {
    /// Opens the engine. With PostgreSQL this waits, as a hot standby, while
    /// another live server owns the Pub/Sub state.
    pub async fn open(
        data_dir: &Path,
        url: Option<&str>,
        node_name: String,
        lease_ttl: Duration,
    ) -> anyhow::Result<Self> {
        match url.filter(|u| !u.is_empty()) {
            None => Ok(ServerStore::Embedded(Arc::new(
                EmbeddedStore::open(data_dir)
                    .with_context(|| format!("opening data directory {}", data_dir.display()))?,
            ))),
            Some(url) => {
                tracing::info!(node = %node_name, "cluster mode: Pub/Sub state in PostgreSQL; waiting for ownership");
                let store = PostgresStore::open(PostgresOptions {
                    url: url.to_string(),
                    node_name,
                    lease_ttl,
                })
                .await
                // The URL may hold a password: never echo it.
                .context("opening the PostgreSQL store (--store)")?;
                Ok(ServerStore::Postgres(Arc::new(store)))
            }
        }
    }

    /// The run store that goes with this engine: `runs.db` in the data
    /// directory, or the same PostgreSQL, its writes fenced by the
    /// ownership lease this server holds (one owner writes runs, as it
    /// writes the Pub/Sub log).
    pub async fn open_runs(
        &self,
        data_dir: &Path,
        url: Option<&str>,
    ) -> anyhow::Result<SharedRunStore> {
        match (self, url.filter(|u| !u.is_empty())) {
            (ServerStore::Postgres(s), Some(url)) => {
                let fence = Fence {
                    name: BROKER_OWNERSHIP.to_string(),
                    token: s.token(),
                };
                let runs = PostgresRunStore::open(url, s.node_name(), Some(fence))
                    .await
                    .context("opening the run store in PostgreSQL (--store)")?;
                Ok(Arc::new(runs))
            }
            _ => Ok(Arc::new(
                pubrun_jobs::RunStore::open(&data_dir.join("runs.db"))
                    .context("opening the run store")?,
            )),
        }
    }

    /// The bucket service on this engine: `<data_dir>/buckets/` (index and
    /// blob files), or the same PostgreSQL — bucket metadata, notification
    /// configs and outbox, upload sessions and object bytes — with its
    /// writes fenced by the ownership lease this server holds.
    pub async fn open_buckets(
        &self,
        data_dir: &Path,
        url: Option<&str>,
        broker: Arc<pubrun_broker::Broker>,
    ) -> anyhow::Result<pubrun_buckets::Buckets> {
        match (self, url.filter(|u| !u.is_empty())) {
            (ServerStore::Postgres(s), Some(url)) => {
                let fence = Fence {
                    name: BROKER_OWNERSHIP.to_string(),
                    token: s.token(),
                };
                let store = PostgresBucketStore::open(url, Some(fence))
                    .await
                    .context("opening the bucket store in PostgreSQL (--store)")?;
                pubrun_buckets::Buckets::with_store(Arc::new(store), broker)
                    .await
                    .context("opening bucket storage")
            }
            _ => pubrun_buckets::Buckets::open(data_dir, broker).context("opening bucket storage"),
        }
    }

    pub fn as_store(&self) -> Arc<dyn Store> {
        match self {
            ServerStore::Embedded(s) => s.clone(),
            ServerStore::Postgres(s) => s.clone(),
        }
    }

    /// Resolves once another server took the Pub/Sub state over (never for
    /// the embedded engine).
    pub async fn lease_lost(&self) {
        match self {
            ServerStore::Embedded(_) => std::future::pending().await,
            ServerStore::Postgres(s) => {
                let mut lost = s.lease_lost();
                if lost.wait_for(|l| *l).await.is_err() {
                    std::future::pending::<()>().await
                }
            }
        }
    }

    pub fn close(&self) {
        match self {
            ServerStore::Embedded(s) => s.close(),
            ServerStore::Postgres(s) => s.close(),
        }
    }
}
