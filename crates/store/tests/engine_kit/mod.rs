//! What the per-trait engine suites (`run_engines`, `trigger_engines`,
//! `pool_engines`, `bucket_engines`) share: each engine's durable state (a
//! temp dir for SQLite, a throwaway PostgreSQL cluster) and `all_engines!`,
//! which instantiates every generic test for both. Each suite implements its
//! own `Engine` trait (opening its store) for [`Sqlite`] and [`Postgres`].

use pubrun_store::testing::TempPostgres;

/// The embedded engine's files live in `dir`.
pub struct Sqlite {
    pub dir: tempfile::TempDir,
}

impl Sqlite {
    pub fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

/// A throwaway cluster: these tests fail (never skip) without PostgreSQL.
pub struct Postgres {
    pub pg: TempPostgres,
}

impl Postgres {
    pub fn new() -> Self {
        Postgres {
            pg: TempPostgres::start(),
        }
    }
}

/// Instantiates each generic `async fn test(e: impl Engine)` of the suite
/// for both engines, as `sqlite::test` and `postgres::test`, each under the
/// suite's own `bounded` (so a stuck engine fails instead of hanging).
macro_rules! all_engines {
    ($($test:ident),* $(,)?) => {
        all_engines!(@suite sqlite, Sqlite::new(), [$($test),*]);
        all_engines!(@suite postgres, Postgres::new(), [$($test),*]);
    };
    (@suite $engine:ident, $make:expr, [$($test:ident),*]) => {
        mod $engine {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    bounded(super::$test($make)).await
                }
            )*
        }
    };
}

/// Declares what a suite needs of its store trait `$store`: `bounded` (the
/// suite's per-test time bound, in seconds) and the `Engine` trait, whose
/// `open` makes a new handle on one engine's durable state, implemented for
/// [`Sqlite`] (`$dir`: its temp dir) and [`Postgres`] (`$url`: its URL).
macro_rules! store_engines {
    (
        store: $store:ident,
        bound_secs: $secs:expr,
        sqlite: |$dir:ident| $sqlite:expr,
        postgres: |$url:ident| $pg:expr $(,)?
    ) => {
        /// Fails the test instead of hanging when an engine stops answering.
        async fn bounded<F: std::future::Future>(f: F) -> F::Output {
            tokio::time::timeout(std::time::Duration::from_secs($secs), f)
                .await
                .expect(concat!(stringify!($store), " test timed out"))
        }

        /// Opens (another handle on) one engine's durable state.
        trait Engine: Send + Sync + 'static {
            async fn open(&self) -> std::sync::Arc<dyn $store>;
        }

        impl Engine for engine_kit::Sqlite {
            async fn open(&self) -> std::sync::Arc<dyn $store> {
                let $dir = self.dir.path();
                std::sync::Arc::new($sqlite)
            }
        }

        impl Engine for engine_kit::Postgres {
            async fn open(&self) -> std::sync::Arc<dyn $store> {
                let $url = self.pg.url();
                std::sync::Arc::new($pg)
            }
        }
    };
}

/// The broker ownership lease taken as server `node` (TTL 1 s), as a server
/// holds it while it writes: the fencing tests take it from `a` to `b`.
pub async fn lease(pg: &TempPostgres, node: &str) -> pubrun_store::PostgresStore {
    pubrun_store::PostgresStore::open(pubrun_store::PostgresOptions {
        url: pg.url(),
        node_name: node.into(),
        lease_ttl: std::time::Duration::from_secs(1),
    })
    .await
    .unwrap()
}

/// The fence of writes made under the broker lease's `token`.
pub fn fence(token: i64) -> pubrun_store::runs::postgres::Fence {
    pubrun_store::runs::postgres::Fence {
        name: pubrun_store::postgres::BROKER_OWNERSHIP.to_string(),
        token,
    }
}

/// Asserts that each of `refused`, a write made under a stale ownership
/// token, failed as fenced: `Unavailable`, saying the lease was taken over.
#[allow(dead_code)] // the bucket suite's store reports fencing as a `StoreError`
pub fn assert_fenced(refused: impl IntoIterator<Item = pubrun_core::Result<()>>) {
    for r in refused {
        let err = r.expect_err("a stale token must not write");
        assert_eq!(err.code, pubrun_core::Code::Unavailable, "{err}");
        assert!(err.message.contains("taken over"), "{err}");
    }
}

/// Runs `sql` on the SQLite file at `path` behind the store's back (a file
/// an older pubrun wrote, a row corrupted on disk).
#[allow(dead_code)] // the run and bucket suites never edit their files by hand
pub fn run_sql(path: &std::path::Path, sql: &str) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(sql).unwrap();
}
