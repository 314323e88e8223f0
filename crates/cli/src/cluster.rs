//! Which engines keep the server's state: the data directory (default) or,
//! with `--store postgres://…`, PostgreSQL (cluster mode: the Pub/Sub
//! catalog and log, jobs, runs, dedup keys, run logs, apply's ownership
//! record, pools, machines, bootstrap tokens, leases, cost spans, schedules,
//! schedule ticks, webhook definitions, and buckets with their objects'
//! bytes live there; see ARCHITECTURE.md). Also: following the cluster's
//! owner (forwarding) and stepping down.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pubrun_jobs::SharedRunStore;
use pubrun_store::directory::{Directory, REFRESH};
use pubrun_store::postgres::BROKER_OWNERSHIP;
use pubrun_store::runs::postgres::Fence;
use pubrun_store::triggers::{PostgresTriggerStore, SqliteTriggerStore, TriggerStore};
use pubrun_store::{
    EmbeddedStore, PostgresBucketStore, PostgresOptions, PostgresPoolStore, PostgresRunStore,
    PostgresStore, Store, StoreError,
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
                let store = PostgresStore::open_with(
                    PostgresOptions {
                        url: url.to_string(),
                        node_name,
                        lease_ttl,
                    },
                    rejoining(),
                )
                .await
                // The URL may hold a password: never echo it.
                .context("opening the PostgreSQL store (--store)")?;
                Ok(ServerStore::Postgres(Arc::new(store)))
            }
        }
    }

    /// In cluster mode (PostgreSQL, and a non-empty `url` for the other
    /// stores): the store, the URL and the fence of the ownership lease this
    /// server holds, which every write of the other stores carries.
    fn fenced<'a>(&'a self, url: Option<&'a str>) -> Option<(&'a PostgresStore, &'a str, Fence)> {
        match (self, url.filter(|u| !u.is_empty())) {
            (ServerStore::Postgres(s), Some(url)) => {
                let fence = Fence {
                    name: BROKER_OWNERSHIP.to_string(),
                    token: s.token(),
                };
                Some((s, url, fence))
            }
            _ => None,
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
        match self.fenced(url) {
            Some((s, url, fence)) => {
                let runs = PostgresRunStore::open(url, s.node_name(), Some(fence))
                    .await
                    .context("opening the run store in PostgreSQL (--store)")?;
                Ok(Arc::new(runs))
            }
            None => Ok(Arc::new(
                pubrun_jobs::RunStore::open(&data_dir.join("runs.db"))
                    .context("opening the run store")?,
            )),
        }
    }

    /// The pools service on the pool store that goes with this engine:
    /// `pools.db` in the data directory, or the same PostgreSQL with every
    /// write fenced by the ownership lease. The autoscaler and the lease
    /// sweep run only on the owner (a standby waits in [`open`](Self::open)),
    /// and an ex-owner's machine writes are refused before any provider call.
    pub async fn open_pools(
        &self,
        data_dir: &Path,
        url: Option<&str>,
    ) -> anyhow::Result<pubrun_pools::Pools> {
        let pools = match self.fenced(url) {
            Some((_, url, fence)) => {
                let store = PostgresPoolStore::open(url, Some(fence))
                    .await
                    .context("opening the pool store in PostgreSQL (--store)")?;
                pubrun_pools::Pools::with_store(Arc::new(store)).await
            }
            None => pubrun_pools::Pools::open(data_dir).await,
        };
        pools
            .map_err(anyhow::Error::msg)
            .context("opening the pools database")
    }

    /// The trigger store that goes with this engine: `triggers.db` in the
    /// data directory, or the same PostgreSQL (schedules, ticks and webhook
    /// definitions), its writes fenced by the ownership lease this server
    /// holds, like the run store's.
    pub async fn open_triggers(
        &self,
        data_dir: &Path,
        url: Option<&str>,
    ) -> anyhow::Result<Arc<dyn TriggerStore>> {
        match self.fenced(url) {
            Some((_, url, fence)) => {
                let triggers = PostgresTriggerStore::open(url, Some(fence))
                    .await
                    .context("opening the trigger store in PostgreSQL (--store)")?;
                Ok(Arc::new(triggers))
            }
            None => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating data directory {}", data_dir.display()))?;
                let path = data_dir.join(pubrun_triggers::DB_FILE);
                Ok(Arc::new(
                    SqliteTriggerStore::open_async(&path)
                        .await
                        .with_context(|| format!("opening {}", path.display()))?,
                ))
            }
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
        match self.fenced(url) {
            Some((_, url, fence)) => {
                let store = PostgresBucketStore::open(url, Some(fence))
                    .await
                    .context("opening the bucket store in PostgreSQL (--store)")?;
                pubrun_buckets::Buckets::with_store(Arc::new(store), broker)
                    .await
                    .context("opening bucket storage")
            }
            None => {
                pubrun_buckets::Buckets::open(data_dir, broker).context("opening bucket storage")
            }
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

/// `--advertise-addr` default: the listen address, or host name + port when
/// listening on every interface (0.0.0.0 / ::), which peers cannot dial.
pub fn default_advertise_addr(listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        default_node_name(listen.port())
    } else {
        listen.to_string()
    }
}

/// Registers this server in the cluster directory and follows who owns the
/// state: the receiver holds the owner's address while another live server
/// owns it, `None` while nobody does or this server does (never forward to
/// ourselves). Refreshed every [`REFRESH`]; a PostgreSQL outage keeps the
/// last known owner (it may still be serving).
pub async fn follow_owner(
    url: &str,
    node: &str,
    advertise: &str,
) -> anyhow::Result<(tokio::sync::watch::Receiver<Option<String>>, Arc<Directory>)> {
    let directory = loop {
        let r = match Directory::open(url).await {
            Ok(d) => d.register(node, advertise).await.map(|_| d),
            Err(e) => Err(e),
        };
        match r {
            Ok(d) => break d,
            Err(StoreError::Unavailable(e)) if rejoining() => {
                tracing::warn!(error = %e, "waiting for PostgreSQL to rejoin the cluster");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("registering this server in PostgreSQL (--store)"))
            }
        }
    };
    tracing::info!(node, address = advertise, "registered in the cluster");
    let directory = Arc::new(directory);
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (node, advertise) = (node.to_string(), advertise.to_string());
    let dir = directory.clone();
    tokio::spawn(async move {
        let directory = dir;
        loop {
            if let Err(e) = directory.register(&node, &advertise).await {
                tracing::debug!(error = %e, "could not refresh the cluster registration");
            }
            match directory.owner(BROKER_OWNERSHIP).await {
                Ok(owner) => {
                    let target = owner.filter(|o| o.node != node).and_then(|o| o.address);
                    tx.send_if_modified(|cur| {
                        if *cur != target {
                            tracing::info!(owner = ?target, "forwarding calls to the owner");
                            *cur = target;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => tracing::debug!(error = %e, "could not read the owner"),
            }
            tokio::time::sleep(REFRESH).await;
        }
    });
    Ok((rx, directory))
}

/// After losing ownership: kill the attempts this process runs (each
/// process job leads its own process group; the new owner retries them
/// without using up an attempt) and re-execute this binary with the same
/// arguments, so it rejoins as a standby once PostgreSQL is reachable.
pub fn restart_as_standby() -> ! {
    let me = std::process::id();
    for child in child_pids(me) {
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe {
            libc::killpg(child as libc::pid_t, libc::SIGKILL);
        }
    }
    use std::os::unix::process::CommandExt;
    let err = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(REJOINING_ENV, "1")
            .exec(),
        Err(e) => e,
    };
    tracing::error!(error = %err, "could not restart; exiting");
    std::process::exit(3)
}

/// Set on the re-executed process: wait for PostgreSQL instead of failing
/// fast when it is unreachable (the reason we stepped down may be an outage).
const REJOINING_ENV: &str = "PUBRUN_REJOINING";

fn rejoining() -> bool {
    std::env::var_os(REJOINING_ENV).is_some()
}

/// Direct children of `parent`, from /proc.
fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                // The command name may hold spaces and parentheses: fields
                // after the last ')' are state, then ppid.
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
