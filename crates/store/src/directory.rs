//! Who is in the cluster and where each server listens (cluster mode).
//!
//! Every server registers its node name and the address it serves at in
//! `pubrun_nodes` (refreshed every few seconds). Servers that do not own the
//! `broker` name forward connections to the owner (its address is the
//! registered address of the ownership row's holder, while the lease is
//! live), so any server answers any call.

use std::time::Duration;

use tokio::sync::Mutex;

use crate::postgres::{ensure_schema, parse_url, Conn};
use crate::StoreError;

/// Migration 3 of `crate::postgres::MIGRATIONS`; never edit once released.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE pubrun_nodes (
        name text PRIMARY KEY,
        address text NOT NULL,
        seen_at timestamptz NOT NULL
    );";

/// A member as the directory lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    /// `host:port` it serves at.
    pub address: String,
    /// Seconds since it last registered (PostgreSQL's clock).
    pub seen_secs_ago: f64,
}

/// The live owner of an ownership name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    /// Its registered address; `None` when it never registered one.
    pub address: Option<String>,
    pub token: i64,
}

pub struct Directory {
    conn: Mutex<Conn>,
}

impl Directory {
    /// Connects (lazily: an unreachable PostgreSQL fails the first call, not
    /// this one) after bringing the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let mut conn = Conn::new(parse_url(url)?, "directory");
        ensure_schema(conn.get().await?).await?;
        Ok(Directory {
            conn: Mutex::new(conn),
        })
    }

    /// Records (or refreshes) this server's address.
    pub async fn register(&self, node: &str, address: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().await;
        let r = conn
            .get()
            .await?
            .execute(
                "INSERT INTO pubrun_nodes (name, address, seen_at) VALUES ($1, $2, now())
                 ON CONFLICT (name) DO UPDATE
                    SET address = EXCLUDED.address, seen_at = EXCLUDED.seen_at",
                &[&node, &address],
            )
            .await;
        r.map(|_| ()).map_err(|e| conn.fail(e))
    }

    /// The live holder of `name` and where it serves, if the lease has not
    /// expired.
    pub async fn owner(&self, name: &str) -> Result<Option<Owner>, StoreError> {
        let mut conn = self.conn.lock().await;
        let r = conn
            .get()
            .await?
            .query_opt(
                "SELECT o.holder, n.address, o.token
                 FROM pubrun_ownership o
                 LEFT JOIN pubrun_nodes n ON n.name = o.holder
                 WHERE o.name = $1 AND o.expires_at > now()",
                &[&name],
            )
            .await;
        let row = r.map_err(|e| conn.fail(e))?;
        Ok(row.map(|r| Owner {
            node: r.get(0),
            address: r.get(1),
            token: r.get(2),
        }))
    }

    /// Every registered member, most recently seen first.
    pub async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let mut conn = self.conn.lock().await;
        let r = conn
            .get()
            .await?
            .query(
                "SELECT name, address, extract(epoch FROM now() - seen_at)::float8
                 FROM pubrun_nodes ORDER BY seen_at DESC, name",
                &[],
            )
            .await;
        let rows = r.map_err(|e| conn.fail(e))?;
        Ok(rows
            .iter()
            .map(|r| Node {
                name: r.get(0),
                address: r.get(1),
                seen_secs_ago: r.get(2),
            })
            .collect())
    }
}

/// How often a server refreshes its registration and re-reads the owner.
pub const REFRESH: Duration = Duration::from_millis(500);
