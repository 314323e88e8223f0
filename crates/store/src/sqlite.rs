//! The one SQLite opener of the embedded engine's databases (runs today;
//! pools, triggers and the bucket index are to move onto it): WAL with
//! `synchronous = FULL` (a commit that returned survives power loss),
//! numbered migrations applied in one transaction together with
//! `user_version`, a database written by a newer pubrun refused, and every
//! call run off the async runtime (`spawn_blocking`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

/// Why opening or using a SQLite database failed.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("{path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    #[error("{path} was written by a newer pubrun (schema {found}, this one knows {known}); upgrade pubrun")]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("the database task failed: {0}")]
    Task(String),
}

/// An open SQLite database: one connection, used by one blocking call at a time.
#[derive(Clone)]
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl SqliteDb {
    /// Opens (creating) `path` and migrates it: `migrations[i]` takes the
    /// schema from version `i` to `i + 1` (`PRAGMA user_version`). Blocking:
    /// call it from [`open`](Self::open) or a blocking context.
    pub fn open_blocking(path: &Path, migrations: &[&str]) -> Result<Self, SqliteError> {
        let err = |source| SqliteError::Db {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // NORMAL in WAL mode: commits reach the OS, the WAL is synced at
        // checkpoints (kill -9 safe, not power-loss safe): `--sync interval`.
        let synchronous = match crate::sync_mode() {
            crate::SyncMode::Always => "FULL",
            crate::SyncMode::Interval(_) => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        let known = migrations.len() as i64;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let found: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if found > known {
            return Err(SqliteError::TooNew {
                path: path.display().to_string(),
                found,
                known,
            });
        }
        for sql in &migrations[found as usize..] {
            tx.execute_batch(sql).map_err(err)?;
        }
        if found < known {
            // `user_version` lives in the file header and commits with the DDL.
            tx.pragma_update(None, "user_version", known).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(SqliteDb {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// [`open_blocking`](Self::open_blocking) on the blocking pool.
    pub async fn open(
        path: &Path,
        migrations: &'static [&'static str],
    ) -> Result<Self, SqliteError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path, migrations))
            .await
            .map_err(|e| SqliteError::Task(e.to_string()))?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection on this thread (blocking callers: tests, tools).
    pub fn call_blocking<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Runs `f` on the connection, off the async runtime.
    pub async fn call<T, E>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: Send + 'static + From<SqliteError>,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside `f` poisons the lock; SQLite rolled back the
            // unfinished transaction, so the connection is still sound.
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| E::from(SqliteError::Task(e.to_string())))?
    }
}
