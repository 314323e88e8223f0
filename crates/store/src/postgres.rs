//! The PostgreSQL engine (cluster mode, first step: the Pub/Sub state only).
//!
//! Tables (migration 1):
//! - `pubrun_catalog(id = 1, body)`: the serialized [`Catalog`], the same JSON
//!   the embedded engine writes to `catalog.json`;
//! - `pubrun_log(pos, last_seq, record)`: one row per [`Record`], `record` is
//!   the same checksummed frame the embedded engine writes to a segment. The
//!   key is a log position, not a message seq, because acks and seeks carry
//!   no seq; `last_seq` is the highest seq a publish row introduces (NULL for
//!   acks and seeks) and is what `reclaim` and `replay` look at;
//! - `pubrun_ownership(name, holder, token, expires_at)`: ownership leases with
//!   fencing tokens. This step owns one name, `broker`: its holder keeps the
//!   whole Pub/Sub state in memory and is the only server that writes the two
//!   tables above.
//!
//! Fencing: `token` goes up on every takeover, and every write transaction
//! first reads the row `FOR SHARE` and compares the token with the one this
//! store acquired. A takeover updates that row, so it is serialized against
//! in-flight writes: an ex-owner's write either committed before the takeover
//! or sees the new token and is refused ([`StoreError::Fenced`]), whatever the
//! clocks say. Lease expiry uses the database's clock (`now()`) only.
//!
//! The trait's sync calls (`load_catalog`, `replay`, `reclaim`) must not need
//! the caller's runtime (the broker calls them from `#[tokio::test]`
//! current-thread runtimes and from `spawn_blocking`), so the engine runs its
//! connections on a small runtime of its own and callers wait on channels,
//! like the embedded engine's writer thread.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls, Transaction};

use crate::catalog::Catalog;
use crate::record::{read_frame, Frame, Record};
use crate::{AppendFuture, Store, StoreError};

/// The one owned name of this step: the whole Pub/Sub catalog and log.
pub const BROKER_OWNERSHIP: &str = "broker";

/// Schema version this binary creates and understands.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Numbered migrations: entry `i` takes the schema from version `i` to `i + 1`.
/// Never edit a released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: Pub/Sub catalog, log and ownership leases.
    "CREATE TABLE pubrun_catalog (
        id smallint PRIMARY KEY CHECK (id = 1),
        body text NOT NULL
    );
    CREATE TABLE pubrun_log (
        pos bigint PRIMARY KEY,
        last_seq bigint,
        record bytea NOT NULL
    );
    CREATE INDEX pubrun_log_last_seq ON pubrun_log (last_seq) WHERE last_seq IS NOT NULL;
    CREATE TABLE pubrun_ownership (
        name text PRIMARY KEY,
        holder text NOT NULL,
        token bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );",
    // 2: the run store (`runs::postgres`): jobs, runs, dedup keys, meta.
    crate::runs::postgres::MIGRATION,
    // 3: cluster members and the address each serves at (`directory`).
    crate::directory::MIGRATION,
    // 4: the pool store (`pools::postgres`): pools, machines, cost spans,
    // bootstrap tokens, leases.
    crate::pools::postgres::MIGRATION,
    // 5: the trigger store (`triggers::postgres`): schedules, ticks, definitions.
    crate::triggers::postgres::MIGRATION,
    // 6: buckets, objects, notification configs, outbox, uploads, object bytes.
    crate::buckets::postgres::MIGRATION,
];

/// Serializes migrations of concurrently starting servers
/// (`pg_advisory_xact_lock` key; any constant unlikely to clash).
const MIGRATION_LOCK: i64 = 0x7075_6272_756e_0001;

/// Upper bound of record bytes in one group-commit transaction.
const MAX_BATCH_BYTES: u64 = 32 * 1024 * 1024;
/// Rows per replay page.
const REPLAY_PAGE: i64 = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach PostgreSQL and who this server is.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://USER[:PASS]@HOST:PORT/DB[?sslmode=disable|prefer]`.
    pub url: String,
    /// Shown in the ownership table and logs; unique per server.
    pub node_name: String,
    /// How long an ownership lease lasts without renewal (renewed every third
    /// of it). A standby takes over at most this long after the owner died.
    pub lease_ttl: Duration,
}

/// A parsed store URL: the connection settings and, unless
/// `sslmode=disable`, the TLS connector (rustls).
#[derive(Clone)]
pub struct PgConfig {
    config: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Never shows the password.
impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl std::ops::Deref for PgConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl std::ops::DerefMut for PgConfig {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

impl PgConfig {
    /// Whether connections use TLS (when the server offers it, for `prefer`).
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens one connection (its driver task logs under `role`).
    pub async fn connect(&self, role: &'static str) -> Result<Client, tokio_postgres::Error> {
        let client = self.connect_plain(role).await?;
        if let crate::SyncMode::Interval(_) = crate::sync_mode() {
            // PostgreSQL's own "acknowledge before the WAL flush" (its WAL
            // writer flushes within a fraction of a second).
            client.batch_execute("SET synchronous_commit = off").await?;
        }
        Ok(client)
    }

    async fn connect_plain(&self, role: &'static str) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            None => {
                let (client, conn) = self.config.connect(NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(role, error = %e, "PostgreSQL connection ended");
                    }
                });
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(role, error = %e, "PostgreSQL connection ended");
                    }
                });
                Ok(client)
            }
        }
    }
}

/// Parses a store URL: `postgres://USER[:PASS]@HOST:PORT/DB[?sslmode=…&sslrootcert=FILE]`.
/// A password missing from the URL comes from `PGPASSWORD`.
///
/// TLS (rustls): `sslmode=disable` never uses it; `prefer` (the default) uses
/// it when the server offers it; `require`, `verify-ca` and `verify-full`
/// insist on it. Whenever TLS is used the server's certificate is verified,
/// host name included (libpq's `verify-full`), against `sslrootcert` (a PEM
/// file) or else the system's trusted roots: pubrun never encrypts to an
/// unauthenticated peer, since that protects against nothing on a network
/// where someone can read the traffic.
pub fn parse_url(url: &str) -> Result<PgConfig, StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Config(
            "the store URL must start with postgres:// (e.g. postgres://USER@HOST:5432/DB)".into(),
        ));
    }
    // tokio-postgres knows neither `sslrootcert` nor the verify-* modes:
    // take them out of the query before it parses the rest.
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut root_cert = None;
    let mut mode = "prefer".to_string();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslrootcert", v)) => root_cert = Some(v.to_string()),
            Some(("sslmode", v)) => mode = v.to_string(),
            _ => kept.push(pair),
        }
    }
    let pg_mode = match mode.as_str() {
        "disable" => "disable",
        "prefer" | "allow" => "prefer",
        "require" | "verify-ca" | "verify-full" => "require",
        other => {
            return Err(StoreError::Config(format!(
            "sslmode={other} is not known: use disable, prefer, require, verify-ca or verify-full"
        )))
        }
    };
    kept.push(match pg_mode {
        "disable" => "sslmode=disable",
        "prefer" => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let rebuilt = format!("{base}?{}", kept.join("&"));
    let mut config = Config::from_str(&rebuilt)
        .map_err(|e| StoreError::Config(format!("bad PostgreSQL URL: {e}")))?;
    if config.get_password().is_none() {
        if let Ok(pw) = std::env::var("PGPASSWORD") {
            config.password(pw);
        }
    }
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name("pubrun");
    let tls = match config.get_ssl_mode() {
        SslMode::Disable => None,
        _ => Some(tls_connector(root_cert.as_deref())?),
    };
    Ok(PgConfig { config, tls })
}

fn tls_connector(
    root_cert: Option<&str>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| StoreError::Config(format!("sslrootcert {path}: {e}")))?;
            if certs.is_empty() {
                return Err(StoreError::Config(format!(
                    "sslrootcert {path}: no PEM certificate in it"
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| StoreError::Config(format!("sslrootcert {path}: {e}")))?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, like curl.
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

pub(crate) fn db_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        // Class 22 (data exception): the value itself is refused, so a retry
        // fails the same way; reporting it as unavailability would make
        // clients retry forever.
        Some(db) if db.code().code().starts_with("22") => StoreError::Corrupt {
            path: "a value sent to PostgreSQL".into(),
            detail: format!("{}: {}", db.code().code(), db.message()),
        },
        Some(db) => StoreError::Unavailable(format!("{}: {}", db.code().code(), db.message())),
        None => {
            // The cause (refused connection, TLS certificate problem) is in
            // the source chain, not in the top-level message.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
                source = cause.source();
            }
            StoreError::Unavailable(msg)
        }
    }
}

/// An error for each of several callers that shared one failed transaction.
fn replicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::Fenced {
            name,
            token,
            current,
        } => StoreError::Fenced {
            name: name.clone(),
            token: *token,
            current: *current,
        },
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// One connection that reconnects with backoff: while PostgreSQL is away,
/// calls fail fast with `Unavailable` instead of hanging.
pub(crate) struct Conn {
    config: PgConfig,
    client: Option<Client>,
    next_try: Instant,
    backoff: Duration,
    role: &'static str,
}

impl Conn {
    pub(crate) fn new(config: PgConfig, role: &'static str) -> Self {
        Conn {
            config,
            client: None,
            next_try: Instant::now(),
            backoff: MIN_BACKOFF,
            role,
        }
    }

    pub(crate) async fn get(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(self.client.as_mut().unwrap());
        }
        if self.client.take().is_some() {
            tracing::warn!(
                role = self.role,
                "lost the PostgreSQL connection; reconnecting"
            );
        }
        let now = Instant::now();
        if now < self.next_try {
            return Err(StoreError::Unavailable(
                "reconnecting to PostgreSQL".to_string(),
            ));
        }
        match self.config.connect(self.role).await {
            Ok(client) => {
                self.backoff = MIN_BACKOFF;
                Ok(self.client.insert(client))
            }
            Err(e) => {
                self.next_try = now + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                tracing::warn!(role = self.role, error = %e, "cannot connect to PostgreSQL");
                Err(db_err(e))
            }
        }
    }

    /// Maps an error of a call on this connection, dropping the connection
    /// when it is the cause so that the next call reconnects.
    pub(crate) fn fail(&mut self, e: tokio_postgres::Error) -> StoreError {
        if e.is_closed() || self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        db_err(e)
    }
}

async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS pubrun_schema (version integer NOT NULL)")
        .await?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM pubrun_schema", &[])
        .await?
        .get(0);
    if found > SCHEMA_VERSION {
        // Rolled back on drop; the caller reports it.
        return Ok(());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        if i as i32 >= found {
            tx.batch_execute(sql).await?;
        }
    }
    if found < SCHEMA_VERSION {
        tx.execute("DELETE FROM pubrun_schema", &[]).await?;
        tx.execute(
            "INSERT INTO pubrun_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await?;
        tracing::info!(
            from = found,
            to = SCHEMA_VERSION,
            "migrated the PostgreSQL schema"
        );
    }
    tx.commit().await
}

/// Refuses a schema newer than this binary, else migrates it to ours.
pub(crate) async fn ensure_schema(client: &mut Client) -> Result<(), StoreError> {
    let found = schema_version(client).await.map_err(db_err)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    migrate(client).await.map_err(db_err)?;
    // A newer server may have migrated between the two reads.
    let found = schema_version(client).await.map_err(db_err)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// The schema version in the database (0 for none).
async fn schema_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pubrun_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one("SELECT coalesce(max(version), 0) FROM pubrun_schema", &[])
        .await?
        .get(0))
}

/// Takes `name` if it is free or its lease expired; `Some(token)` on success.
async fn try_acquire(
    client: &Client,
    name: &str,
    node: &str,
    ttl: Duration,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "INSERT INTO pubrun_ownership (name, holder, token, expires_at)
             VALUES ($1, $2, 1, now() + make_interval(secs => $3))
             ON CONFLICT (name) DO UPDATE
                SET holder = EXCLUDED.holder,
                    token = pubrun_ownership.token + 1,
                    expires_at = EXCLUDED.expires_at
                WHERE pubrun_ownership.expires_at < now()
             RETURNING token",
            &[&name, &node, &ttl.as_secs_f64()],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

async fn current_holder(
    client: &Client,
    name: &str,
) -> Result<Option<(String, f64)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT holder, extract(epoch FROM expires_at - now())::float8
             FROM pubrun_ownership WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Waits until this node holds `name` (a hot standby while another live
/// server holds it), surviving PostgreSQL outages meanwhile.
async fn acquire(conn: &mut Conn, name: &str, node: &str, ttl: Duration) -> i64 {
    let poll = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut announced = false;
    loop {
        let attempt = async {
            let client = conn.get().await?;
            match try_acquire(client, name, node, ttl).await {
                Ok(Some(token)) => Ok(Some(Ok(token))),
                Ok(None) => Ok(current_holder(client, name).await.ok().flatten().map(Err)),
                Err(e) => Err(conn.fail(e)),
            }
        };
        match attempt.await {
            Ok(Some(Ok(token))) => return token,
            Ok(Some(Err((holder, secs)))) if !announced => {
                tracing::info!(
                    %name, %holder, expires_in_s = secs,
                    "another server owns this; waiting as a hot standby"
                );
                announced = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "waiting for ownership: PostgreSQL unavailable"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// `(pos, frame)` of one log row.
type LogRow = (i64, Vec<u8>);

enum Req {
    Append {
        last_seqs: Vec<Option<i64>>,
        frames: Vec<Vec<u8>>,
        bytes: u64,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    SaveCatalog {
        body: String,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    LoadCatalog {
        done: std_mpsc::SyncSender<Result<Option<String>, StoreError>>,
    },
    ReplayPage {
        after: i64,
        done: std_mpsc::SyncSender<Result<Vec<LogRow>, StoreError>>,
    },
    Reclaim {
        lowest: i64,
        done: std_mpsc::SyncSender<Result<u64, StoreError>>,
    },
    Close {
        done: std_mpsc::SyncSender<()>,
    },
}

/// A write of the owner, run inside a fenced transaction.
enum Op<'a> {
    Append(&'a [Option<i64>], &'a [&'a [u8]]),
    Catalog(&'a str),
    Reclaim(i64),
}

impl Op<'_> {
    /// Returns bytes reclaimed (0 for other writes).
    async fn run(&self, tx: &Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
        match self {
            Op::Append(last_seqs, frames) => {
                // Positions continue after the highest one: only the owner
                // writes, one transaction at a time, so reading it here is
                // race-free, also right after a reconnect whose last commit
                // had an unknown outcome.
                tx.execute(
                    "INSERT INTO pubrun_log (pos, last_seq, record)
                     SELECT m.base + r.ord, r.last_seq, r.record
                     FROM (SELECT coalesce(max(pos), 0) AS base FROM pubrun_log) AS m,
                          unnest($1::bigint[], $2::bytea[]) WITH ORDINALITY AS r(last_seq, record, ord)",
                    &[last_seqs, frames],
                )
                .await?;
                Ok(0)
            }
            Op::Catalog(body) => {
                tx.execute(
                    "INSERT INTO pubrun_catalog (id, body) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                    &[body],
                )
                .await?;
                Ok(0)
            }
            Op::Reclaim(lowest) => {
                // Delete a prefix only, as the embedded engine does: up to the
                // first publish that still has a live seq or, when none has,
                // up to the last publish, kept (with everything after it) so
                // that replay still knows the highest seq ever handed out.
                // Acks in the prefix only name messages published before
                // them: dead ones.
                let row = tx
                    .query_one(
                        "WITH keep AS (
                            SELECT coalesce(
                                (SELECT pos FROM pubrun_log WHERE last_seq >= $1
                                 ORDER BY last_seq LIMIT 1),
                                (SELECT max(pos) FROM pubrun_log WHERE last_seq IS NOT NULL),
                                0) AS pos
                         ), gone AS (
                            DELETE FROM pubrun_log WHERE pos < (SELECT pos FROM keep)
                            RETURNING octet_length(record) AS n
                         )
                         SELECT coalesce(sum(n), 0)::bigint FROM gone",
                        &[lowest],
                    )
                    .await?;
                Ok(row.get::<_, i64>(0) as u64)
            }
        }
    }
}

/// The single writer: every write of this server goes through it, in
/// enqueue order, each checked against the fencing token in its transaction.
struct Writer {
    conn: Conn,
    node: String,
    token: i64,
    /// The token that fenced us off, once it happened (permanent).
    fenced: Option<i64>,
    lost: Arc<watch::Sender<bool>>,
    log_bytes: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Req>) {
        let mut next: Option<Req> = None;
        loop {
            let req = match next.take() {
                Some(r) => r,
                None => match rx.recv().await {
                    Some(r) => r,
                    None => {
                        self.release().await;
                        return;
                    }
                },
            };
            match req {
                Req::Append {
                    last_seqs,
                    frames,
                    bytes,
                    done,
                } => {
                    // Group commit: everything enqueued while the previous
                    // transaction was in flight goes into this one.
                    let mut last_seqs = last_seqs;
                    let mut frames = frames;
                    let mut total = bytes;
                    let mut waiters = vec![done];
                    while total < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(Req::Append {
                                last_seqs: l,
                                frames: f,
                                bytes: b,
                                done: d,
                            }) => {
                                last_seqs.extend(l);
                                frames.extend(f);
                                total += b;
                                waiters.push(d);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    match self.append(&last_seqs, &frames).await {
                        Ok(()) => {
                            self.log_bytes.fetch_add(total, Ordering::Relaxed);
                            for w in waiters {
                                let _ = w.send(Ok(()));
                            }
                        }
                        Err(e) => {
                            for w in waiters {
                                let _ = w.send(Err(replicate(&e)));
                            }
                        }
                    }
                }
                Req::SaveCatalog { body, done } => {
                    let _ = done.send(self.save_catalog(&body).await);
                }
                Req::LoadCatalog { done } => {
                    let _ = done.send(self.load_catalog().await);
                }
                Req::ReplayPage { after, done } => {
                    let _ = done.send(self.replay_page(after).await);
                }
                Req::Reclaim { lowest, done } => {
                    let r = self.reclaim(lowest).await;
                    if let Ok(freed) = r {
                        self.log_bytes.fetch_sub(
                            freed.min(self.log_bytes.load(Ordering::Relaxed)),
                            Ordering::Relaxed,
                        );
                    }
                    let _ = done.send(r);
                }
                Req::Close { done } => {
                    self.release().await;
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn fenced_error(&self, current: i64) -> StoreError {
        StoreError::Fenced {
            name: BROKER_OWNERSHIP.to_string(),
            token: self.token,
            current,
        }
    }

    /// Opens a transaction that holds the ownership row (shared) and has
    /// checked our token: the caller's writes in it are fenced.
    async fn fenced_tx<'a>(
        fenced: &mut Option<i64>,
        token: i64,
        lost: &watch::Sender<bool>,
        client: &'a mut Client,
    ) -> Result<Result<Transaction<'a>, i64>, tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let current: i64 = tx
            .query_opt(
                "SELECT token FROM pubrun_ownership WHERE name = $1 FOR SHARE",
                &[&BROKER_OWNERSHIP],
            )
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if current != token {
            if fenced.is_none() {
                tracing::error!(
                    ownership = BROKER_OWNERSHIP,
                    our_token = token,
                    current_token = current,
                    "another server took over; refusing this server's writes from now on"
                );
                let _ = lost.send(true);
            }
            *fenced = Some(current);
            return Ok(Err(current));
        }
        Ok(Ok(tx))
    }

    /// Runs `op` in a fenced transaction and commits it.
    async fn write(&mut self, op: Op<'_>) -> Result<u64, StoreError> {
        if let Some(current) = self.fenced {
            return Err(self.fenced_error(current));
        }
        let Writer {
            conn,
            fenced,
            token,
            lost,
            ..
        } = self;
        let client = conn.get().await?;
        let outcome = async {
            match Self::fenced_tx(fenced, *token, lost, client).await? {
                Ok(tx) => {
                    let v = op.run(&tx).await?;
                    let started = std::time::Instant::now();
                    tx.commit().await?;
                    pubrun_observability::metrics()
                        .store_sync
                        .observe(started.elapsed().as_secs_f64());
                    Ok(Ok(v))
                }
                Err(current) => Ok(Err(current)),
            }
        }
        .await;
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(current)) => Err(self.fenced_error(current)),
            Err(e) => Err(self.conn.fail(e)),
        }
    }

    async fn append(
        &mut self,
        last_seqs: &[Option<i64>],
        frames: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        if frames.is_empty() {
            return Ok(());
        }
        let frames: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        self.write(Op::Append(last_seqs, &frames)).await.map(|_| ())
    }

    async fn save_catalog(&mut self, body: &str) -> Result<(), StoreError> {
        self.write(Op::Catalog(body)).await.map(|_| ())
    }

    async fn reclaim(&mut self, lowest: i64) -> Result<u64, StoreError> {
        self.write(Op::Reclaim(lowest)).await
    }

    async fn load_catalog(&mut self) -> Result<Option<String>, StoreError> {
        let client = self.conn.get().await?;
        match client
            .query_opt("SELECT body FROM pubrun_catalog WHERE id = 1", &[])
            .await
        {
            Ok(row) => Ok(row.map(|r| r.get(0))),
            Err(e) => Err(self.conn.fail(e)),
        }
    }

    async fn replay_page(&mut self, after: i64) -> Result<Vec<LogRow>, StoreError> {
        let client = self.conn.get().await?;
        match client
            .query(
                "SELECT pos, record FROM pubrun_log WHERE pos > $1 ORDER BY pos LIMIT $2",
                &[&after, &REPLAY_PAGE],
            )
            .await
        {
            Ok(rows) => Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect()),
            Err(e) => Err(self.conn.fail(e)),
        }
    }

    /// Gives the lease up (best effort) so a standby takes over at once.
    async fn release(&mut self) {
        if self.fenced.is_some() {
            return;
        }
        let Ok(client) = self.conn.get().await else {
            return;
        };
        let r = client
            .execute(
                "UPDATE pubrun_ownership SET expires_at = now()
                 WHERE name = $1 AND holder = $2 AND token = $3",
                &[&BROKER_OWNERSHIP, &self.node, &self.token],
            )
            .await;
        match r {
            Ok(1) => tracing::info!(ownership = BROKER_OWNERSHIP, "released ownership"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not release ownership"),
        }
    }
}

/// Renews the lease every third of its TTL; a renewal that finds the token
/// changed means another server took over: we are fenced for good.
async fn renew_loop(
    mut conn: Conn,
    node: String,
    token: i64,
    ttl: Duration,
    lost: Arc<watch::Sender<bool>>,
    paused: Arc<AtomicBool>,
) {
    let period = ttl / 3;
    // When the last successful renewal was *sent*: the lease runs at least
    // until then + TTL by PostgreSQL's clock.
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        if paused.load(Ordering::Relaxed) || *lost.borrow() {
            continue;
        }
        let sent = Instant::now();
        let r = async {
            let client = conn.get().await?;
            client
                .execute(
                    "UPDATE pubrun_ownership SET expires_at = now() + make_interval(secs => $3)
                     WHERE name = $1 AND holder = $2 AND token = $4",
                    &[&BROKER_OWNERSHIP, &node, &ttl.as_secs_f64(), &token],
                )
                .await
                .map_err(|e| conn.fail(e))
        }
        .await;
        match r {
            Ok(1) => last_ok = sent,
            Ok(_) => {
                tracing::error!(
                    ownership = BROKER_OWNERSHIP,
                    token,
                    "ownership lease lost: another server took over; this server's writes are refused"
                );
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                if last_ok.elapsed() >= ttl {
                    // The lease has expired by now (our last renewal started
                    // before `last_ok`): a standby may own the state already.
                    // Step down rather than act on work we may not own; any
                    // write in the window is refused by fencing anyway.
                    tracing::error!(error = %e, ownership = BROKER_OWNERSHIP,
                        "cannot renew the ownership lease for a whole TTL: stepping down (a standby takes over)");
                    let _ = lost.send(true);
                    return;
                } else {
                    tracing::warn!(error = %e, "renewing the ownership lease failed; retrying");
                }
            }
        }
    }
}

/// Stops a runtime without blocking (dropping one inside async code panics).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub struct PostgresStore {
    node_name: String,
    token: i64,
    tx: Mutex<Option<mpsc::UnboundedSender<Req>>>,
    replayed: AtomicBool,
    log_bytes: Arc<AtomicU64>,
    lost: watch::Receiver<bool>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    renew_paused: Arc<AtomicBool>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    // Last: dropped after `close` ran in `Drop`.
    _rt: Runtime,
}

impl PostgresStore {
    /// Connects, migrates the schema, then waits until this node owns the
    /// `broker` name (a second server on the same database waits here as a
    /// hot standby until the owner's lease expires), and starts renewing it.
    pub async fn open(opts: PostgresOptions) -> Result<Self, StoreError> {
        Self::open_with(opts, false).await
    }

    /// [`open`](Self::open); with `wait_for_database`, keeps retrying while
    /// PostgreSQL is unreachable (a server that stepped down and rejoins)
    /// instead of failing fast (a fresh start with a wrong URL should say
    /// so at once).
    pub async fn open_with(
        opts: PostgresOptions,
        wait_for_database: bool,
    ) -> Result<Self, StoreError> {
        let config = parse_url(&opts.url)?;
        if opts.node_name.trim().is_empty() {
            return Err(StoreError::Config("the node name must not be empty".into()));
        }
        if opts.lease_ttl < Duration::from_millis(300) {
            return Err(StoreError::Config(
                "the ownership lease TTL must be at least 300ms".into(),
            ));
        }
        let rt = Runtime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("pubrun-postgres")
                .enable_all()
                .build()
                .map_err(|e| StoreError::Io {
                    path: "tokio runtime".into(),
                    source: e,
                })?,
        ));
        let handle = rt.0.as_ref().unwrap().handle().clone();
        let node = opts.node_name.clone();
        let ttl = opts.lease_ttl;
        let setup_config = config.clone();
        let wait = wait_for_database;
        let setup = handle.spawn(async move {
            let mut conn = Conn::new(setup_config, "writer");
            loop {
                let r = match conn.get().await {
                    Ok(client) => ensure_schema(client).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => break,
                    Err(StoreError::Unavailable(e)) if wait => {
                        tracing::warn!(error = %e, "waiting for PostgreSQL");
                        tokio::time::sleep(MAX_BACKOFF).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            let token = acquire(&mut conn, BROKER_OWNERSHIP, &node, ttl).await;
            tracing::info!(ownership = BROKER_OWNERSHIP, node = %node, token, "acquired ownership");
            Ok::<_, StoreError>((conn, token))
        });
        let (conn, token) = setup.await.map_err(|_| StoreError::Closed)??;

        let (lost_tx, lost) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        let log_bytes = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            conn,
            node: opts.node_name.clone(),
            token,
            fenced: None,
            lost: lost_tx.clone(),
            log_bytes: log_bytes.clone(),
        };
        handle.spawn(writer.run(rx));
        let renew_paused = Arc::new(AtomicBool::new(false));
        let renewer = handle.spawn(renew_loop(
            Conn::new(config, "lease"),
            opts.node_name.clone(),
            token,
            ttl,
            lost_tx,
            renew_paused.clone(),
        ));
        Ok(PostgresStore {
            node_name: opts.node_name,
            token,
            tx: Mutex::new(Some(tx)),
            replayed: AtomicBool::new(false),
            log_bytes,
            lost,
            renew_paused,
            renewer: Mutex::new(Some(renewer)),
            _rt: rt,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The fencing token this store writes under.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Becomes `true` once another server took the lease over: this store's
    /// writes are refused from then on and its in-memory state is stale.
    pub fn lease_lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing the lease, as if this server were cut off from
    /// PostgreSQL (tests of fencing).
    #[cfg(feature = "testing")]
    pub fn stop_renewing(&self) {
        self.renew_paused.store(true, Ordering::Relaxed);
    }

    /// Writes everything enqueued so far, releases the lease and refuses
    /// further appends. Idempotent.
    pub fn close(&self) {
        let Some(tx) = self.tx.lock().unwrap().take() else {
            return;
        };
        if let Some(h) = self.renewer.lock().unwrap().take() {
            h.abort();
        }
        let (done, wait) = std_mpsc::sync_channel(1);
        if tx.send(Req::Close { done }).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(60));
        }
    }

    /// Sends a request and waits for its reply on this (blocking) thread.
    fn call<T>(
        &self,
        make: impl FnOnce(std_mpsc::SyncSender<Result<T, StoreError>>) -> Req,
    ) -> Result<T, StoreError> {
        let (done, wait) = std_mpsc::sync_channel(1);
        {
            let guard = self.tx.lock().unwrap();
            let tx = guard.as_ref().ok_or(StoreError::Closed)?;
            tx.send(make(done)).map_err(|_| StoreError::Closed)?;
        }
        wait.recv().map_err(|_| StoreError::Closed)?
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn load_catalog(&self) -> Result<Catalog, StoreError> {
        match self.call(|done| Req::LoadCatalog { done })? {
            None => Ok(Catalog::new()),
            Some(body) => serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                path: "pubrun_catalog".into(),
                detail: e.to_string(),
            }),
        }
    }

    fn replay(&self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        let mut after = 0i64;
        let mut next_seq = 1u64;
        let mut total = 0u64;
        loop {
            let page = self.call(|done| Req::ReplayPage { after, done })?;
            if page.is_empty() {
                break;
            }
            for (pos, frame) in page {
                total += frame.len() as u64;
                let buf = Bytes::from(frame);
                let corrupt = |detail: String| StoreError::Corrupt {
                    path: format!("pubrun_log pos {pos}"),
                    detail,
                };
                match read_frame(&buf, 0).map_err(corrupt)? {
                    (Frame::Record(rec), end) if end == buf.len() => {
                        if let Some(s) = rec.last_seq() {
                            next_seq = next_seq.max(s + 1);
                        }
                        visit(rec);
                    }
                    _ => return Err(corrupt("not exactly one whole frame".into())),
                }
                after = pos;
            }
        }
        self.log_bytes.store(total, Ordering::Relaxed);
        self.replayed.store(true, Ordering::Release);
        Ok(next_seq)
    }

    async fn save_catalog(&self, catalog: &Catalog) -> Result<(), StoreError> {
        let body = serde_json::to_string_pretty(catalog).expect("catalog serializes");
        let (done, wait) = oneshot::channel();
        {
            let guard = self.tx.lock().unwrap();
            let tx = guard.as_ref().ok_or(StoreError::Closed)?;
            tx.send(Req::SaveCatalog { body, done })
                .map_err(|_| StoreError::Closed)?;
        }
        wait.await.map_err(|_| StoreError::Closed)?
    }

    fn append(&self, records: Vec<Record>) -> AppendFuture {
        let mut last_seqs = Vec::with_capacity(records.len());
        let mut frames = Vec::with_capacity(records.len());
        let mut bytes = 0u64;
        for r in &records {
            let mut f = Vec::with_capacity(64);
            r.encode_frame(&mut f);
            bytes += f.len() as u64;
            last_seqs.push(r.last_seq().map(|s| s as i64));
            frames.push(f);
        }
        let (done, rx) = oneshot::channel();
        let sent = self.replayed.load(Ordering::Acquire)
            && match &*self.tx.lock().unwrap() {
                Some(tx) => tx
                    .send(Req::Append {
                        last_seqs,
                        frames,
                        bytes,
                        done,
                    })
                    .is_ok(),
                None => false,
            };
        crate::append_answer(sent, rx)
    }

    fn reclaim(&self, lowest_live_seq: u64) -> Result<u64, StoreError> {
        let lowest = i64::try_from(lowest_live_seq).unwrap_or(i64::MAX);
        self.call(|done| Req::Reclaim { lowest, done })
    }

    /// Frame bytes of the rows this store replayed and appended, less those
    /// it reclaimed: the payload, not PostgreSQL's on-disk size (which also
    /// has row headers, the index, and dead tuples until VACUUM).
    fn log_bytes(&self) -> u64 {
        self.log_bytes.load(Ordering::Relaxed)
    }
}
