//! Buckets and objects behind the Cloud Storage JSON API v1 subset, with
//! Pub/Sub notifications published through the broker.
//!
//! - [`Buckets::open`] opens (or creates) `<data_dir>/buckets/` and starts the
//!   notification publisher; call it inside a Tokio runtime.
//! - [`router`] serves the HTTP API (`/storage/v1/...`, `/upload/storage/v1/...`,
//!   `/download/storage/v1/...`) so that the official clients work with
//!   `STORAGE_EMULATOR_HOST=http://HOST:PORT`. It has no fallback, so it can be
//!   merged into another router.
//! - [`Buckets::set_base_url`] sets the public URL of `selfLink`, `mediaLink`
//!   and upload `Location`s (never taken from a request's `Host`).
//! - The `Buckets` methods (create buckets, put/open/list objects, add
//!   notifications) are the same operations for Rust callers such as job
//!   input/output staging and manifest apply.
//!
//! Storage (index and bytes) is behind [`pubrun_store::buckets::BucketStore`]:
//! the embedded engine by default, PostgreSQL in cluster mode
//! ([`Buckets::with_store`]). Crash behaviour: see [`blob`] and [`notify`].

pub mod blob;
pub mod conditions;
pub mod db;
pub mod error;
pub mod hash;
mod http;
pub mod model;
mod multipart;
pub mod names;
pub mod notify;
mod service;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use pubrun_broker::Broker;
use pubrun_store::buckets::{BucketStore, SqliteBucketStore};
use tokio::sync::Notify;

pub use conditions::Conditions;
pub use error::{GcsError, GcsResult};
pub use http::router;
pub use model::{
    BucketResource, BucketRow, NotificationConfig, ObjectMeta, ObjectResource, ObjectRow,
};
pub use service::{ListPage, ListParams, NotificationSpec};

use hash::Hasher;

/// The bucket service. Cheap to clone.
#[derive(Clone)]
pub struct Buckets {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Index and bytes: the embedded engine or PostgreSQL.
    pub(crate) store: Arc<dyn BucketStore>,
    pub(crate) broker: Arc<Broker>,
    pub(crate) wake: Arc<Notify>,
    /// Per resumable session: a lock serialising its requests, and the
    /// running hash of the bytes received so far (rebuilt from the stored
    /// bytes after a restart or on another server).
    pub(crate) sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Hasher>>>>>,
    /// The public base URL of every link (see [`Buckets::set_base_url`]).
    pub(crate) default_base: Mutex<String>,
}

/// The largest object the server accepts: Google's limit, 5 TiB. A resumable
/// upload declaring a larger total is refused at once rather than left
/// unfinishable.
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;

/// `http://ADDR` for a listen address, with an unspecified address
/// (`0.0.0.0`, `[::]`) replaced by loopback: the base URL when no public URL
/// is configured. Clients on other hosts need a configured public URL.
pub fn listen_base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Uploads sessions are kept this long, as Google keeps them (a week).
const SESSION_LIFETIME_US: i64 = 7 * 24 * 3600 * 1_000_000;

impl Buckets {
    /// Opens `<data_dir>/buckets/` (the embedded engine): migrates the
    /// index, removes temp files, blobs no object refers to and expired
    /// upload sessions, and starts publishing pending notifications. Must be
    /// called inside a Tokio runtime.
    pub fn open(data_dir: &Path, broker: Arc<Broker>) -> anyhow::Result<Self> {
        let root = data_dir.join("buckets");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let store = SqliteBucketStore::open_blocking(&root)
            .with_context(|| format!("opening bucket storage in {}", root.display()))?;
        let (expired, orphans) = store
            .startup_blocking(model::now_us() - SESSION_LIFETIME_US)
            .context("cleaning up bucket storage")?;
        tracing::info!(orphans, expired_sessions = expired, dir = %root.display(), "opened bucket storage");
        Self::start(Arc::new(store), broker)
    }

    /// The service on any bucket engine (cluster mode: PostgreSQL). Expires
    /// old upload sessions and removes bytes no object or session refers to
    /// (blobs of writers that died, or of a server whose writes were fenced
    /// off), then starts publishing pending notifications. Call it once this
    /// server owns the bucket state.
    pub async fn with_store(
        store: Arc<dyn BucketStore>,
        broker: Arc<Broker>,
    ) -> anyhow::Result<Self> {
        let expired = store
            .expire_uploads(model::now_us() - SESSION_LIFETIME_US)
            .await
            .context("expiring old upload sessions")?;
        let orphans = store
            .sweep(0)
            .await
            .context("removing unreferenced blobs")?;
        tracing::info!(
            orphans,
            expired_sessions = expired.len(),
            "opened bucket storage"
        );
        Self::start(store, broker)
    }

    fn start(store: Arc<dyn BucketStore>, broker: Arc<Broker>) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner {
            store,
            broker,
            wake: Arc::new(Notify::new()),
            sessions: Mutex::new(HashMap::new()),
            default_base: Mutex::new("http://127.0.0.1:8085".to_string()),
        });
        let handle = tokio::runtime::Handle::try_current().context(
            "Buckets must be opened inside a Tokio runtime (it starts the notification publisher)",
        )?;
        handle.spawn(notify::run_publisher(Arc::downgrade(&inner)));
        Ok(Buckets { inner })
    }

    pub(crate) fn store(&self) -> &dyn BucketStore {
        &*self.inner.store
    }

    /// Sets the server's public base URL (`http(s)://host[:port][/prefix]`),
    /// used for `selfLink`, `mediaLink` and resumable upload `Location`s.
    /// Links never come from a request's `Host`/`X-Forwarded-Proto`: a client
    /// could point other clients' uploads elsewhere. Default
    /// `http://127.0.0.1:8085`; see [`listen_base_url`].
    pub fn set_base_url(&self, base: &str) -> anyhow::Result<()> {
        let base = base.trim_end_matches('/');
        let uri: ::http::Uri = base
            .parse()
            .with_context(|| format!("invalid public URL '{base}'"))?;
        anyhow::ensure!(
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some(),
            "invalid public URL '{base}': expected http(s)://HOST[:PORT][/PATH]"
        );
        anyhow::ensure!(
            uri.query().is_none() && !base.contains('#'),
            "invalid public URL '{base}': no query or fragment allowed"
        );
        *self
            .inner
            .default_base
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = base.to_string();
        Ok(())
    }

    pub(crate) fn base_url(&self) -> String {
        self.inner
            .default_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notifications committed but not yet published.
    pub async fn pending_notifications(&self) -> GcsResult<i64> {
        Ok(self.store().outbox_len().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_base_url_maps_unspecified_to_loopback() {
        let url = |s: &str| listen_base_url(s.parse().unwrap());
        assert_eq!(url("0.0.0.0:8085"), "http://127.0.0.1:8085");
        assert_eq!(url("[::]:9000"), "http://[::1]:9000");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(url("[fe80::1]:80"), "http://[fe80::1]:80");
    }

    #[tokio::test]
    async fn set_base_url_accepts_only_http_urls() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(Arc::new(
            pubrun_store::EmbeddedStore::open(dir.path().join("store")).unwrap(),
        ))
        .unwrap();
        let b = Buckets::open(dir.path(), broker).unwrap();
        b.set_base_url("https://storage.example.com/gcs/").unwrap();
        assert_eq!(b.base_url(), "https://storage.example.com/gcs");
        for bad in [
            "storage.example.com",
            "ftp://h",
            "http://",
            "http://h/?a=b",
            "http://h/#x",
            "http://h\n",
        ] {
            assert!(b.set_base_url(bad).is_err(), "{bad}");
        }
        assert_eq!(b.base_url(), "https://storage.example.com/gcs");
    }
}
