//! One test suite for every store engine (`suite.rs`, instantiated below for
//! `embedded` and `postgres`), plus the PostgreSQL-only tests: fencing,
//! schema versions and surviving a PostgreSQL restart. The embedded engine's
//! file-specific tests (torn tails, segments, LOCK) are in the other targets.
//!
//! PostgreSQL tests start a throwaway cluster (`TempPostgres`) and FAIL when
//! Debian's `postgresql` package is not installed: they never skip.

#[path = "../common/mod.rs"]
mod common;
mod suite;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use pubrun_store::testing::TempPostgres;
use pubrun_store::{EmbeddedStore, PostgresOptions, PostgresStore, Record, Store, StoreError};
use suite::Engine;

pub struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Embedded {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Engine for Embedded {
    type S = EmbeddedStore;
    async fn open(&self) -> EmbeddedStore {
        // The LOCK is an flock on an open file description. Other tests in
        // this binary start processes (initdb, postgres): a child between
        // fork and exec holds a copy of every descriptor, so the lock of a
        // store dropped just then outlives the drop until that exec. Only
        // `Locked` is waited out, and only for a bounded time.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Small segments, so that reclaim has closed segments to drop.
            match EmbeddedStore::open_with_segment_bytes(self.dir.path(), 16 * 1024) {
                Ok(store) => return store,
                Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("open store: {e:?}"),
            }
        }
    }
    fn close(store: &EmbeddedStore) {
        store.close()
    }
}

pub struct Postgres {
    pg: TempPostgres,
    opens: AtomicU64,
}

impl Postgres {
    fn new() -> Self {
        Postgres {
            pg: TempPostgres::start(),
            opens: AtomicU64::new(0),
        }
    }
}

fn pg_options(url: String, node: &str, ttl: Duration) -> PostgresOptions {
    PostgresOptions {
        url,
        node_name: node.to_string(),
        lease_ttl: ttl,
    }
}

impl Engine for Postgres {
    type S = PostgresStore;
    async fn open(&self) -> PostgresStore {
        // A dropped store released its lease, so a reopen does not wait.
        let n = self.opens.fetch_add(1, Ordering::Relaxed);
        let opts = pg_options(self.pg.url(), &format!("node-{n}"), Duration::from_secs(10));
        bounded(PostgresStore::open(opts))
            .await
            .expect("open PostgreSQL store")
    }
    fn close(store: &PostgresStore) {
        store.close()
    }
}

macro_rules! store_suite {
    ($engine:ident, $make:expr, [$($test:ident),* $(,)?]) => {
        mod $engine {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    bounded(suite::$test($make)).await
                }
            )*
        }
    };
}

macro_rules! all_engines {
    ($($test:ident),* $(,)?) => {
        store_suite!(embedded, Embedded::new(), [$($test),*]);
        store_suite!(postgres, Postgres::new(), [$($test),*]);
    };
}

all_engines!(
    concurrent_appends_round_trip_through_reopen,
    close_writes_everything_enqueued_then_refuses_appends,
    append_before_replay_is_refused,
    large_records_round_trip,
    a_new_store_has_an_empty_catalog,
    saved_catalog_survives_reopen_and_replacement,
    reclaim_keeps_a_live_suffix_and_next_seq,
);

async fn open_pg(
    pg: &TempPostgres,
    node: &str,
    ttl: Duration,
) -> Result<PostgresStore, StoreError> {
    bounded(PostgresStore::open(pg_options(pg.url(), node, ttl))).await
}

/// A second server takes over once the first's lease expired (it stopped
/// renewing, as when cut off from PostgreSQL); the first's late append is
/// refused with `Fenced` and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ex_owner_is_fenced_after_a_takeover() {
    bounded(async {
        let pg = TempPostgres::start();
        let ttl = Duration::from_secs(1);
        let a = open_pg(&pg, "a", ttl).await.unwrap();
        a.replay(&mut |_| {}).unwrap();
        a.append(vec![publish(1, [1], "from-a")]).await.unwrap();

        a.stop_renewing();
        let started = Instant::now();
        let b = open_pg(&pg, "b", ttl).await.unwrap();
        assert!(b.token() > a.token(), "a takeover raises the fencing token");
        assert!(
            started.elapsed() < ttl * 5,
            "took {:?} to take over",
            started.elapsed()
        );

        let late = a.append(vec![publish(1, [2], "late-from-a")]).await;
        assert!(
            matches!(late, Err(StoreError::Fenced { .. })),
            "got {late:?}"
        );
        assert!(
            *a.lease_lost().borrow(),
            "the ex-owner knows it lost the lease"
        );
        let cat = a.save_catalog(&sample_catalog(1)).await;
        assert!(
            matches!(cat, Err(StoreError::Fenced { .. })),
            "catalog write: {cat:?}"
        );

        let mut recs = Vec::new();
        assert_eq!(b.replay(&mut |r| recs.push(r)).unwrap(), 2);
        assert_eq!(
            recs,
            vec![publish(1, [1], "from-a")],
            "the fenced write left nothing"
        );
        assert_eq!(b.load_catalog().unwrap(), pubrun_store::Catalog::new());
        b.append(vec![publish(1, [2], "from-b")]).await.unwrap();
        drop(a); // a fenced store does not release b's lease
        drop(b);
        let c = open_pg(&pg, "c", ttl).await.unwrap();
        let mut recs = Vec::new();
        c.replay(&mut |r| recs.push(r)).unwrap();
        assert_eq!(
            recs,
            vec![publish(1, [1], "from-a"), publish(1, [2], "from-b")]
        );
    })
    .await
}

/// While the owner is alive, a second server waits (hot standby); it takes
/// over as soon as the owner shuts down cleanly (the lease is released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_standby_waits_while_the_owner_lives() {
    bounded(async {
        let pg = TempPostgres::start();
        let ttl = Duration::from_secs(1);
        let a = open_pg(&pg, "a", ttl).await.unwrap();
        let url = pg.url();
        let standby =
            tokio::spawn(async move { PostgresStore::open(pg_options(url, "b", ttl)).await });
        // Several TTLs: a renewing owner keeps it.
        tokio::time::sleep(ttl * 3).await;
        assert!(
            !standby.is_finished(),
            "the standby took over from a live owner"
        );
        a.close();
        let b = bounded(standby).await.unwrap().unwrap();
        assert!(b.token() > a.token());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_newer_than_the_binary_is_refused() {
    bounded(async {
        let pg = TempPostgres::start();
        drop(open_pg(&pg, "a", Duration::from_secs(5)).await.unwrap());
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .execute("UPDATE pubrun_schema SET version = 99", &[])
            .await
            .unwrap();
        match open_pg(&pg, "a", Duration::from_secs(5)).await {
            Err(StoreError::SchemaTooNew { found: 99, known }) => {
                assert_eq!(known, pubrun_store::postgres::SCHEMA_VERSION)
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a schema newer than the binary was accepted"),
        }
    })
    .await
}

#[test]
fn postgres_url_rules() {
    use pubrun_store::postgres::parse_url;
    assert!(
        parse_url("postgres://u@h:5432/db").unwrap().uses_tls(),
        "prefer by default"
    );
    assert!(!parse_url("postgres://u@h:5432/db?sslmode=disable")
        .unwrap()
        .uses_tls());
    for mode in ["prefer", "require", "verify-ca", "verify-full"] {
        let url = format!("postgres://u@h:5432/db?sslmode={mode}&application_name=x");
        assert!(parse_url(&url).unwrap().uses_tls(), "{mode}");
    }
    let e = parse_url("postgres://u@h:5432/db?sslmode=sometimes").unwrap_err();
    assert!(
        e.to_string().contains("sslmode=sometimes is not known"),
        "{e}"
    );
    let e =
        parse_url("postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent.pem").unwrap_err();
    assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    assert!(parse_url("mysql://u@h/db").is_err());
}

/// TLS to PostgreSQL: verified against `sslrootcert`; a server whose
/// certificate the given CA did not sign is refused; `disable` stays clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_is_used_and_verified() {
    bounded(async {
        let mut pg = TempPostgres::start();
        let ca = pg.enable_tls();
        let ssl_in_use = |url: String| async move {
            let client = pubrun_store::postgres::parse_url(&url)
                .unwrap()
                .connect("test")
                .await?;
            let row = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await?;
            Ok::<bool, tokio_postgres::Error>(row.get(0))
        };
        let base = pg.url().replace("?sslmode=disable", "");
        let verified = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
        assert!(ssl_in_use(verified.clone()).await.unwrap(), "TLS in use");
        assert!(
            !ssl_in_use(pg.url()).await.unwrap(),
            "sslmode=disable is clear text"
        );
        // The system's roots do not know the throwaway CA: refused, not downgraded.
        let err = ssl_in_use(format!("{base}?sslmode=require"))
            .await
            .unwrap_err();
        let mut err: &dyn std::error::Error = &err;
        let mut chain = err.to_string();
        while let Some(cause) = err.source() {
            chain = format!("{chain}: {cause}");
            err = cause;
        }
        let err = chain;
        assert!(
            err.contains("certificate") || err.contains("UnknownIssuer"),
            "{err}"
        );
        // The whole store works over TLS.
        let store = PostgresStore::open(pg_options(verified, "a", Duration::from_secs(5)))
            .await
            .unwrap();
        store.replay(&mut |_| {}).unwrap();
        store
            .append(vec![publish(1, [1], "over tls")])
            .await
            .unwrap();
    })
    .await
}

/// PostgreSQL goes away: appends fail (UNAVAILABLE for clients), then work
/// again after it is back, and every acknowledged record is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_fails_appends_then_recovers_without_loss() {
    bounded(async {
        let pg = TempPostgres::start();
        let store = open_pg(&pg, "a", Duration::from_secs(10)).await.unwrap();
        store.replay(&mut |_| {}).unwrap();
        let mut acked: Vec<Record> = Vec::new();
        let mut attempted: Vec<Record> = Vec::new();
        let mut seq = 1;
        for _ in 0..20 {
            let r = publish(1, [seq], "before");
            seq += 1;
            store.append(vec![r.clone()]).await.unwrap();
            acked.push(r);
        }
        pg.stop();
        let r = publish(1, [seq], "while-down");
        attempted.push(r.clone());
        let err = store
            .append(vec![r])
            .await
            .expect_err("append with PostgreSQL down");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let status = pubrun_core::Error::from(err);
        assert_eq!(status.code, pubrun_core::Code::Unavailable);
        seq += 1;
        pg.start_again();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = publish(1, [seq], "after");
            seq += 1;
            attempted.push(r.clone());
            match store.append(vec![r.clone()]).await {
                Ok(()) => {
                    acked.push(r);
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "never recovered: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        for _ in 0..5 {
            let r = publish(1, [seq], "after");
            seq += 1;
            store.append(vec![r.clone()]).await.unwrap();
            acked.push(r);
        }
        drop(store);
        let store = open_pg(&pg, "b", Duration::from_secs(10)).await.unwrap();
        let mut replayed = Vec::new();
        store.replay(&mut |r| replayed.push(r)).unwrap();
        let mut it = replayed.iter();
        for a in &acked {
            assert!(
                it.any(|r| r == a),
                "acknowledged record lost or out of order: {a:?}"
            );
        }
        for r in &replayed {
            assert!(
                acked.contains(r) || attempted.contains(r),
                "unknown record {r:?}"
            );
        }
    })
    .await
}
