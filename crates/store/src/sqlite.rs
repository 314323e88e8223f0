//! The one SQLite opener of the embedded engine's databases (runs today;
//! pools, triggers and the bucket index are to move onto it): WAL with
//! `synchronous = FULL` (a commit that returned survives power loss),
//! numbered migrations applied in one transaction together with
//! `user_version`, a database written by a newer pubrun refused, and every
//! call run off the async runtime (`spawn_blocking`).
//!
//! Group commit ([`SqliteDb::write`]): writes queue up for one writer thread,
//! which runs everything waiting in ONE transaction (each call in its own
//! savepoint, so a failed call undoes only itself) and one commit, the
//! single fsync. Every caller gets its answer only after that commit
//! returned, so what a caller acts on is as durable as with a commit of its
//! own. Reads from async callers ([`SqliteDb::read`]) use a second,
//! read-only connection: in WAL mode they never wait behind a commit's fsync.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
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
    /// The group commit a write was part of failed: nothing of it is kept.
    #[error("{path}: commit failed: {detail}")]
    Commit { path: String, detail: String },
}

/// Every row `sql` yields, each made by `row`: the one prepare, query and
/// collect of the engines.
pub(crate) fn query_all<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut st = c.prepare_cached(sql)?;
    let rows = st.query_map(params, row)?;
    rows.collect()
}

/// The error of a database call: anything a SQLite fault converts into.
pub trait DbError: From<SqliteError> + Send + 'static {}
impl<E: From<SqliteError> + Send + 'static> DbError for E {}

/// Most calls one group commit takes (bounds how long one holds the lock).
const MAX_GROUP: usize = 512;

/// An open SQLite database: one connection, used by one blocking call at a
/// time; plus, once used, the group-commit writer and a read connection.
#[derive(Clone)]
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
    writer: Arc<OnceLock<mpsc::Sender<Box<dyn Pending>>>>,
    /// Opened on first use; a failed open is retried by the next read.
    reader: Arc<Mutex<Option<Connection>>>,
}

/// One queued write: applied inside the group's transaction, answered after
/// its commit.
trait Pending: Send {
    /// Runs the call; whether it succeeded (a failure is rolled back to its savepoint).
    fn apply(&mut self, conn: &mut Connection) -> bool;
    /// Sends the answer: the call's own, or `failed` if the commit was not made.
    fn answer(self: Box<Self>, failed: Option<&SqliteError>);
}

struct Call<F, T, E> {
    f: Option<F>,
    result: Option<Result<T, E>>,
    reply: tokio::sync::oneshot::Sender<Result<T, E>>,
}

impl<F, T, E> Pending for Call<F, T, E>
where
    F: FnOnce(&mut Connection) -> Result<T, E> + Send,
    T: Send,
    E: Send + From<SqliteError>,
{
    fn apply(&mut self, conn: &mut Connection) -> bool {
        let Some(f) = self.f.take() else { return false };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn))) {
            Ok(r) => {
                let ok = r.is_ok();
                self.result = Some(r);
                ok
            }
            Err(_) => false,
        }
    }

    fn answer(self: Box<Self>, failed: Option<&SqliteError>) {
        let r = match (failed, self.result) {
            // Nothing of the group was kept, whatever the call answered.
            (Some(e), _) => Err(E::from(copy_err(e))),
            (_, Some(r)) => r,
            (_, None) => Err(E::from(SqliteError::Task(
                "the call panicked or was not run".into(),
            ))),
        };
        // The caller may have gone away (its future dropped): nothing to tell.
        let _ = self.reply.send(r);
    }
}

fn copy_err(e: &SqliteError) -> SqliteError {
    match e {
        SqliteError::Commit { path, detail } => SqliteError::Commit {
            path: path.clone(),
            detail: detail.clone(),
        },
        other => SqliteError::Task(other.to_string()),
    }
}

/// The writer thread: one transaction and one commit per group of waiting calls.
fn write_groups(
    conn: Arc<Mutex<Connection>>,
    path: String,
    queue: mpsc::Receiver<Box<dyn Pending>>,
) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        let failed = commit_group(&mut conn, &mut group).err().map(|detail| {
            // Whatever the group did is undone; each call reports the failure.
            // (SQLite may have rolled back already; a failed rollback is reported too.)
            let detail = match conn.is_autocommit() {
                true => detail,
                false => match conn.execute_batch("ROLLBACK") {
                    Ok(()) => detail,
                    Err(e) => format!("{detail}; rollback failed: {e}"),
                },
            };
            SqliteError::Commit {
                path: path.clone(),
                detail,
            }
        });
        drop(conn);
        for p in group {
            p.answer(failed.as_ref());
        }
    }
}

fn commit_group(conn: &mut Connection, group: &mut [Box<dyn Pending>]) -> Result<(), String> {
    let sql = |conn: &Connection, q: &str| conn.execute_batch(q).map_err(|e| e.to_string());
    sql(conn, "BEGIN IMMEDIATE")?;
    for p in group.iter_mut() {
        sql(conn, "SAVEPOINT pubrun_call")?;
        if !p.apply(conn) {
            sql(conn, "ROLLBACK TO pubrun_call")?;
        }
        sql(conn, "RELEASE pubrun_call")?;
    }
    sql(conn, "COMMIT")
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
            writer: Arc::default(),
            reader: Arc::default(),
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
    pub async fn call<T: Send + 'static, E: DbError>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
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

    /// [`call`](Self::call) for the engines whose errors are pubrun's own.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> pubrun_core::Result<T> + Send + 'static,
    ) -> pubrun_core::Result<T> {
        self.call(f).await
    }

    /// One statement, by [`run`](Self::run): the rows it changed. `err`
    /// names the store in a fault (each store words its own).
    pub async fn execute<P: rusqlite::Params + Send + 'static>(
        &self,
        sql: &'static str,
        params: P,
        err: fn(rusqlite::Error) -> pubrun_core::Error,
    ) -> pubrun_core::Result<usize> {
        self.run(move |c| c.execute(sql, params).map_err(err)).await
    }

    /// Runs the write `f` in the next group commit (see the module docs) and
    /// answers once that commit returned. `f` must not begin or commit a
    /// transaction itself (a savepoint is fine).
    pub async fn write<T: Send + 'static, E: DbError>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let call: Box<dyn Pending> = Box::new(Call {
            f: Some(f),
            result: None,
            reply,
        });
        let queue = self.writer.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let (conn, path) = (self.conn.clone(), self.path.display().to_string());
            std::thread::Builder::new()
                .name("sqlite-writer".into())
                .spawn(move || write_groups(conn, path, rx))
                .expect("spawning the SQLite writer thread");
            tx
        });
        queue
            .send(call)
            .map_err(|_| E::from(SqliteError::Task("the writer thread stopped".into())))?;
        answer
            .await
            .map_err(|_| E::from(SqliteError::Task("the writer thread stopped".into())))?
    }

    /// Runs the read-only `f` on the read connection, off the async runtime.
    pub async fn read<T: Send + 'static, E: DbError>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = this.reader.lock().unwrap_or_else(|p| p.into_inner());
            let conn = match reader.as_mut() {
                Some(c) => c,
                None => reader.insert(this.open_reader().map_err(|source| {
                    E::from(SqliteError::Db {
                        path: this.path.display().to_string(),
                        source,
                    })
                })?),
            };
            f(conn)
        })
        .await
        .map_err(|e| E::from(SqliteError::Task(e.to_string())))?
    }

    /// A second connection that can only read (a write through it fails).
    fn open_reader(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open(self.path.as_path())?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &[&str] = &["CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL);"];

    fn call(
        f: impl FnOnce(&mut Connection) -> Result<(), SqliteError> + Send + 'static,
    ) -> (
        Box<dyn Pending>,
        tokio::sync::oneshot::Receiver<Result<(), SqliteError>>,
    ) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let call = Call {
            f: Some(f),
            result: None,
            reply,
        };
        (Box::new(call), answer)
    }

    fn insert(k: &'static str) -> impl FnOnce(&mut Connection) -> Result<(), SqliteError> {
        move |c| {
            c.execute("INSERT INTO t(k, n) VALUES (?1, 1)", [k])
                .map(|_| ())
                .map_err(|e| SqliteError::Task(e.to_string()))
        }
    }

    fn keys(db: &SqliteDb) -> Vec<String> {
        db.call_blocking(|c| {
            let mut s = c.prepare("SELECT k FROM t ORDER BY k").unwrap();
            let rows = s.query_map([], |r| r.get(0)).unwrap();
            rows.collect::<rusqlite::Result<Vec<String>>>().unwrap()
        })
    }

    /// One group, one commit: a call that fails halfway undoes only its own
    /// changes, and each caller gets its own answer.
    #[test]
    fn a_failed_call_leaves_the_rest_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDb::open_blocking(&dir.path().join("g.db"), SCHEMA).unwrap();
        let (a, a_answer) = call(insert("a"));
        let (b, b_answer) = call(|c| {
            insert("b")(c)?;
            insert("a")(c) // taken by the first call: fails after writing b
        });
        let (d, d_answer) = call(insert("d"));
        let mut group = vec![a, b, d];
        db.call_blocking(|c| commit_group(c, &mut group)).unwrap();
        for p in group {
            p.answer(None);
        }
        assert!(a_answer.blocking_recv().unwrap().is_ok());
        assert!(b_answer.blocking_recv().unwrap().is_err());
        assert!(d_answer.blocking_recv().unwrap().is_ok());
        assert_eq!(keys(&db), ["a", "d"]);
    }

    /// A group whose commit failed answers every call with the failure,
    /// also the calls that succeeded inside it.
    #[test]
    fn a_failed_commit_fails_every_call() {
        let (a, a_answer) = call(|_| Ok(()));
        let failed = SqliteError::Commit {
            path: "x".into(),
            detail: "disk I/O error".into(),
        };
        a.answer(Some(&failed));
        let err = a_answer.blocking_recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("commit failed"), "{err}");
    }

    /// Through the writer thread: many concurrent writes all land, and the
    /// read connection sees each one once its write returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_committed_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDb::open(&dir.path().join("w.db"), SCHEMA)
            .await
            .unwrap();
        let writes = (0..200).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let k = format!("k{i:03}");
                let k2 = k.clone();
                db.write(move |c| {
                    c.execute("INSERT INTO t(k, n) VALUES (?1, 1)", [&k2])
                        .map(|_| ())
                        .map_err(|e| SqliteError::Task(e.to_string()))
                })
                .await
                .unwrap();
                let seen: i64 = db
                    .read(move |c| {
                        c.query_row("SELECT COUNT(*) FROM t WHERE k = ?1", [&k], |r| r.get(0))
                            .map_err(|e| SqliteError::Task(e.to_string()))
                    })
                    .await
                    .unwrap();
                assert_eq!(seen, 1);
            })
        });
        for w in writes.collect::<Vec<_>>() {
            w.await.unwrap();
        }
        assert_eq!(keys(&db).len(), 200);
        let refused = db
            .read(|c| {
                c.execute("INSERT INTO t(k, n) VALUES ('r', 1)", [])
                    .map_err(|e| SqliteError::Task(e.to_string()))
            })
            .await;
        assert!(refused.is_err(), "the read connection must not write");
    }
}
