//! The connections a cluster-mode store (pools, triggers, buckets) keeps to
//! the shared PostgreSQL database, and the fence its writes pass: a write
//! transaction first takes the ownership row (shared) and checks that this
//! server still holds the token it was opened with, so a server that lost
//! the ownership to another can no longer write.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row, Transaction};

use crate::postgres::{db_err, ensure_schema, parse_url, Conn};
use crate::StoreError;

/// The ownership lease a cluster-mode store's writes are fenced by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The row of `pubrun_ownership` (e.g. `broker`).
    pub name: String,
    /// The token this server acquired it with.
    pub token: i64,
}

pub(crate) struct FencedPg {
    conns: Vec<Mutex<Conn>>,
    next: AtomicUsize,
    fence: Option<Fence>,
    /// Set (for good) once a write was refused by the fence.
    fenced: AtomicBool,
    /// Names the store in the log line of the first refused write.
    store: &'static str,
}

impl FencedPg {
    /// `size` connections tagged `role`; the first migrates the shared
    /// schema (refusing a newer one). Without a `fence` writes are unguarded
    /// (tools, tests).
    pub(crate) async fn open(
        url: &str,
        fence: Option<Fence>,
        role: &'static str,
        size: usize,
        store: &'static str,
    ) -> Result<Self, StoreError> {
        let config = parse_url(url)?;
        let mut first = Conn::new(config.clone(), role);
        ensure_schema(first.get().await?).await?;
        let mut conns = vec![Mutex::new(first)];
        conns.extend((1..size).map(|_| Mutex::new(Conn::new(config.clone(), role))));
        Ok(FencedPg {
            conns,
            next: AtomicUsize::new(0),
            fence,
            fenced: AtomicBool::new(false),
            store,
        })
    }

    /// Whether a write was refused because another server took the lease.
    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// A free connection if there is one, else the next in turn.
    pub(crate) async fn conn(&self) -> MutexGuard<'_, Conn> {
        for c in &self.conns {
            if let Ok(g) = c.try_lock() {
                return g;
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].lock().await
    }

    /// Begins a write transaction that holds the fence's ownership row
    /// (shared) and has checked our token.
    pub(crate) async fn begin<'a>(&self, c: &'a mut Client) -> Result<Transaction<'a>, StoreError> {
        let tx = c.transaction().await.map_err(db_err)?;
        let Some(fence) = &self.fence else {
            return Ok(tx);
        };
        let current: i64 = tx
            .query_opt(
                "SELECT token FROM pubrun_ownership WHERE name = $1 FOR SHARE",
                &[&fence.name],
            )
            .await
            .map_err(db_err)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if current != fence.token {
            if !self.fenced.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    ownership = %fence.name,
                    our_token = fence.token,
                    current_token = current,
                    "{}: another server took over; refusing this server's writes",
                    self.store
                );
            }
            return Err(StoreError::Fenced {
                name: fence.name.clone(),
                token: fence.token,
                current,
            });
        }
        Ok(tx)
    }

    /// An unfenced read: the rows `sql` answers.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut g = self.conn().await;
        g.get().await?.query(sql, params).await.map_err(db_err)
    }

    /// An unfenced read: each row `sql` answers, made by `row`.
    pub(crate) async fn query_map<T, E: From<StoreError>>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        row: impl FnMut(&Row) -> Result<T, E>,
    ) -> Result<Vec<T>, E> {
        let mut g = self.conn().await;
        query_map(&*g.get().await?, sql, params, row).await
    }

    /// An unfenced read of at most one row.
    pub(crate) async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let mut g = self.conn().await;
        g.get().await?.query_opt(sql, params).await.map_err(db_err)
    }

    /// An unfenced read of exactly one row.
    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        let mut g = self.conn().await;
        g.get().await?.query_one(sql, params).await.map_err(db_err)
    }

    /// One fenced write statement, committed; rows affected.
    pub(crate) async fn write(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let mut g = self.conn().await;
        let tx = self.begin(g.get().await?).await?;
        let n = tx.execute(sql, params).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(n)
    }
}

/// Each row `sql` answers on `c` (a connection or a transaction), made by
/// `row`: the one query-and-collect of the cluster-mode stores.
pub(crate) async fn query_map<C: GenericClient + Sync, T, E: From<StoreError>>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    row: impl FnMut(&Row) -> Result<T, E>,
) -> Result<Vec<T>, E> {
    let rows = c.query(sql, params).await.map_err(db_err)?;
    rows.iter().map(row).collect()
}
