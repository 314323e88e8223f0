//! The embedded bucket engine: `<data_dir>/buckets/` exactly as before this
//! seam existed, so existing data opens unchanged:
//!
//! ```text
//! <data_dir>/buckets/
//!   index.db            SQLite: buckets, objects (name → blob id), notifications, outbox, uploads
//!   blobs/ab/ab12…ef    one immutable file per object generation (32 hex chars)
//!   uploads/<id>        bytes received so far by a resumable upload session
//!   tmp/                files being written by simple/multipart uploads, copies, composes
//! ```
//!
//! A new blob is written to `tmp/`, fsynced, then renamed into `blobs/` and
//! the directory fsynced, all before the index commit that makes it
//! visible; an upload's file moves into `blobs/` inside the commit that
//! completes it. Files no object (or live upload) refers to — a crash
//! between rename and commit, or after a commit that replaced an object —
//! are removed by [`sweep`](BucketStore::sweep), which `pubrun-buckets` runs
//! at start. Object names are BLOBs so that comparisons are byte order.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{
    bad_blob_id, checked_plan, is_blob_id, new_blob_id, now_us, BlobReader, BlobWriter,
    BucketDeleted, BucketMutation, BucketPage, BucketRecord, BucketStore, Mutated,
    NotificationRecord, ObjectChange, ObjectRange, ObjectRecord, ObjectState, OutboxMessage,
    OutboxRow, Reject, UploadRecord,
};
use crate::sqlite::{query_all, SqliteDb, SqliteError};
use crate::StoreError;

/// `index.db` migrations (`PRAGMA user_version`); v1 is the schema the
/// bucket crate created before the seam, byte for byte.
const SCHEMA: &[&str] = &[
    // v1
    "CREATE TABLE counters(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
     CREATE TABLE buckets(
        name TEXT PRIMARY KEY, project TEXT NOT NULL, created_us INTEGER NOT NULL,
        updated_us INTEGER NOT NULL, metageneration INTEGER NOT NULL, location TEXT NOT NULL,
        storage_class TEXT NOT NULL, labels TEXT NOT NULL);
     CREATE TABLE objects(
        bucket TEXT NOT NULL, name BLOB NOT NULL, generation INTEGER NOT NULL,
        metageneration INTEGER NOT NULL, size INTEGER NOT NULL, blob TEXT NOT NULL,
        md5 BLOB, crc32c INTEGER NOT NULL, component_count INTEGER, meta TEXT NOT NULL,
        created_us INTEGER NOT NULL, updated_us INTEGER NOT NULL,
        PRIMARY KEY(bucket, name));
     CREATE INDEX objects_blob ON objects(blob);
     CREATE TABLE notifications(bucket TEXT NOT NULL, id INTEGER NOT NULL, config TEXT NOT NULL,
        PRIMARY KEY(bucket, id));
     CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
        attributes TEXT NOT NULL, data BLOB NOT NULL, created_us INTEGER NOT NULL);
     CREATE TABLE uploads(id TEXT PRIMARY KEY, bucket TEXT NOT NULL, name BLOB NOT NULL,
        spec TEXT NOT NULL, total INTEGER, received INTEGER NOT NULL, done TEXT,
        created_us INTEGER NOT NULL);",
];

/// Errors of a call on the index: SQLite's, or the engine's own.
struct E(StoreError);

impl From<SqliteError> for E {
    fn from(e: SqliteError) -> Self {
        E(StoreError::Unavailable(format!("bucket index: {e}")))
    }
}

impl From<rusqlite::Error> for E {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => E(corrupt(e)),
            e => E(StoreError::Unavailable(format!("bucket index: {e}"))),
        }
    }
}

impl From<io::Error> for E {
    fn from(e: io::Error) -> Self {
        E(StoreError::io("bucket blob storage", e))
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        path: "buckets/index.db".into(),
        detail: e.to_string(),
    }
}

fn conv(col: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
}

pub struct SqliteBucketStore {
    db: SqliteDb,
    root: PathBuf,
}

impl SqliteBucketStore {
    /// Opens (creating) `root` (`<data_dir>/buckets`): migrates `index.db`
    /// and empties `tmp/`. Blocking: call from a blocking context or use
    /// [`open`](Self::open).
    pub fn open_blocking(root: &Path) -> Result<Self, StoreError> {
        for d in ["blobs", "uploads", "tmp"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| StoreError::io(root.join(d), e))?;
        }
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(|e| StoreError::io(&tmp, e))? {
            let entry = entry.map_err(|e| StoreError::io(&tmp, e))?;
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a temp file");
            }
        }
        let db = SqliteDb::open_blocking(&root.join("index.db"), SCHEMA)
            .map_err(|e| StoreError::Unavailable(format!("opening the bucket index: {e}")))?;
        Ok(SqliteBucketStore {
            db,
            root: root.to_path_buf(),
        })
    }

    /// [`open_blocking`](Self::open_blocking) on the blocking pool.
    pub async fn open(root: &Path) -> Result<Self, StoreError> {
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&root))
            .await
            .map_err(|e| StoreError::Unavailable(format!("bucket index task failed: {e}")))?
    }

    /// At start, before serving (blocking): expires upload sessions created
    /// before `expire_before_us` and removes every file no object or live
    /// session refers to. Returns (sessions expired, files removed).
    pub fn startup_blocking(&self, expire_before_us: i64) -> Result<(usize, u64), StoreError> {
        let files = Files {
            root: self.root.clone(),
        };
        self.db
            .call_blocking(|c| {
                let expired = expire_uploads(c, &files, expire_before_us)?;
                Ok((expired.len(), sweep(c, &files, 0)?))
            })
            .map_err(|E(e)| e)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Files) -> Result<T, E> + Send + 'static,
    ) -> Result<T, StoreError> {
        let files = Files {
            root: self.root.clone(),
        };
        self.db.call(move |c| f(c, &files)).await.map_err(|E(e)| e)
    }
}

/// Paths of blob files (ids checked: only hex ids become file names).
#[derive(Clone)]
struct Files {
    root: PathBuf,
}

impl Files {
    fn blob(&self, id: &str) -> PathBuf {
        self.root.join("blobs").join(&id[..2]).join(id)
    }
    fn upload(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }
    /// Renames `src` to the blob path of `id`, durably. Blocking.
    fn install(&self, src: &Path, id: &str) -> io::Result<()> {
        let dest = self.blob(id);
        let dir = dest.parent().expect("blob path has a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            sync_dir(&self.root.join("blobs"))?;
        }
        std::fs::rename(src, &dest)?;
        sync_dir(dir)
    }
    /// Removes a file; a missing one is not an error. Blocking.
    fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a blob file");
            }
        }
    }
    fn remove_blob(&self, id: &str) {
        if is_blob_id(id) {
            self.remove(&self.blob(id));
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn counter(c: &Connection, k: &str) -> rusqlite::Result<i64> {
    Ok(
        c.query_row("SELECT v FROM counters WHERE k = ?1", [k], |r| r.get(0))
            .optional()?
            .unwrap_or(0),
    )
}

fn set_counter(c: &Connection, k: &str, v: i64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO counters(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        params![k, v],
    )?;
    Ok(())
}

const BUCKET_COLS: &str =
    "name, project, created_us, updated_us, metageneration, location, storage_class, labels";

fn bucket_row(r: &Row) -> rusqlite::Result<BucketRecord> {
    let labels: String = r.get(7)?;
    Ok(BucketRecord {
        name: r.get(0)?,
        project: r.get(1)?,
        created_us: r.get(2)?,
        updated_us: r.get(3)?,
        metageneration: r.get(4)?,
        location: r.get(5)?,
        storage_class: r.get(6)?,
        labels: serde_json::from_str(&labels).map_err(|e| conv(7, e))?,
    })
}

fn get_bucket(c: &Connection, name: &str) -> rusqlite::Result<Option<BucketRecord>> {
    c.query_row(
        &format!("SELECT {BUCKET_COLS} FROM buckets WHERE name = ?1"),
        [name],
        bucket_row,
    )
    .optional()
}

fn put_bucket(c: &Connection, b: &BucketRecord) -> Result<(), E> {
    let labels = serde_json::to_string(&b.labels).map_err(|e| E(corrupt(e)))?;
    c.execute(
        &format!(
            "INSERT OR REPLACE INTO buckets({BUCKET_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ),
        params![
            b.name,
            b.project,
            b.created_us,
            b.updated_us,
            b.metageneration,
            b.location,
            b.storage_class,
            labels,
        ],
    )?;
    Ok(())
}

const OBJECT_COLS: &str = "bucket, name, generation, metageneration, size, blob, md5, crc32c, component_count, meta, created_us, updated_us";

fn object_row(r: &Row) -> rusqlite::Result<ObjectRecord> {
    let name: Vec<u8> = r.get(1)?;
    let md5: Option<Vec<u8>> = r.get(6)?;
    let crc: i64 = r.get(7)?;
    let size: i64 = r.get(4)?;
    Ok(ObjectRecord {
        bucket: r.get(0)?,
        name: String::from_utf8(name).map_err(|e| conv(1, e))?,
        generation: r.get(2)?,
        metageneration: r.get(3)?,
        size: u64::try_from(size).map_err(|e| conv(4, e))?,
        blob: r.get(5)?,
        md5: md5
            .map(|m| <[u8; 16]>::try_from(m.as_slice()).map_err(|e| conv(6, e)))
            .transpose()?,
        crc32c: u32::try_from(crc).map_err(|e| conv(7, e))?,
        component_count: r.get(8)?,
        meta: r.get(9)?,
        created_us: r.get(10)?,
        updated_us: r.get(11)?,
    })
}

fn get_object(c: &Connection, bucket: &str, name: &str) -> rusqlite::Result<Option<ObjectRecord>> {
    c.query_row(
        &format!("SELECT {OBJECT_COLS} FROM objects WHERE bucket = ?1 AND name = ?2"),
        params![bucket, name.as_bytes()],
        object_row,
    )
    .optional()
}

fn put_object(c: &Connection, o: &ObjectRecord) -> rusqlite::Result<()> {
    c.execute(
        &format!("INSERT OR REPLACE INTO objects({OBJECT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
        params![
            o.bucket,
            o.name.as_bytes(),
            o.generation,
            o.metageneration,
            o.size as i64,
            o.blob,
            o.md5.map(|m| m.to_vec()),
            o.crc32c as i64,
            o.component_count,
            o.meta,
            o.created_us,
            o.updated_us,
        ],
    )?;
    Ok(())
}

fn notifications(c: &Connection, bucket: &str) -> rusqlite::Result<Vec<NotificationRecord>> {
    let mut st =
        c.prepare_cached("SELECT id, config FROM notifications WHERE bucket = ?1 ORDER BY id")?;
    let rows = st.query_map([bucket], |r| {
        Ok(NotificationRecord {
            bucket: bucket.to_string(),
            id: r.get(0)?,
            config: r.get(1)?,
        })
    })?;
    rows.collect()
}

fn insert_outbox(c: &Connection, m: &OutboxMessage) -> Result<(), E> {
    let attrs = serde_json::to_string(&m.attributes).map_err(|e| E(corrupt(e)))?;
    c.execute(
        "INSERT INTO outbox(topic, attributes, data, created_us) VALUES (?1, ?2, ?3, ?4)",
        params![m.topic, attrs, m.data, now_us()],
    )?;
    Ok(())
}

fn blob_referenced(c: &Connection, blob: &str) -> rusqlite::Result<bool> {
    Ok(c.query_row(
        "SELECT 1 FROM objects WHERE blob = ?1 LIMIT 1",
        [blob],
        |_| Ok(()),
    )
    .optional()?
    .is_some())
}

fn upload_row(r: &Row) -> rusqlite::Result<UploadRecord> {
    let name: Vec<u8> = r.get(2)?;
    Ok(UploadRecord {
        id: r.get(0)?,
        bucket: r.get(1)?,
        name: String::from_utf8(name).map_err(|e| conv(2, e))?,
        spec: r.get(3)?,
        total: r
            .get::<_, Option<i64>>(4)?
            .map(|t| u64::try_from(t).map_err(|e| conv(4, e)))
            .transpose()?,
        received: u64::try_from(r.get::<_, i64>(5)?).map_err(|e| conv(5, e))?,
        done: r.get(6)?,
        created_us: r.get(7)?,
    })
}

#[async_trait::async_trait]
impl BucketStore for SqliteBucketStore {
    async fn create_bucket(&self, b: &BucketRecord) -> Result<bool, StoreError> {
        let b = b.clone();
        self.call(move |c, _| {
            let tx = c.transaction()?;
            if get_bucket(&tx, &b.name)?.is_some() {
                return Ok(false);
            }
            put_bucket(&tx, &b)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn get_bucket(&self, name: &str) -> Result<Option<BucketRecord>, StoreError> {
        let name = name.to_string();
        self.call(move |c, _| Ok(get_bucket(c, &name)?)).await
    }

    async fn update_bucket(
        &self,
        name: &str,
        f: BucketMutation,
    ) -> Result<Option<Result<BucketRecord, Reject>>, StoreError> {
        let name = name.to_string();
        self.call(move |c, _| {
            let tx = c.transaction()?;
            let Some(b) = get_bucket(&tx, &name)? else {
                return Ok(None);
            };
            match f(b) {
                Err(r) => Ok(Some(Err(r))),
                Ok(mut b) => {
                    b.name = name;
                    put_bucket(&tx, &b)?;
                    tx.commit()?;
                    Ok(Some(Ok(b)))
                }
            }
        })
        .await
    }

    async fn list_buckets(&self, page: BucketPage) -> Result<Vec<BucketRecord>, StoreError> {
        self.call(move |c, _| {
            let sql = format!(
                "SELECT {BUCKET_COLS} FROM buckets WHERE name > ?1 AND (?2 IS NULL OR project = ?2)
                 AND substr(name, 1, length(?3)) = ?3 ORDER BY name LIMIT ?4"
            );
            let p = params![page.after, page.project, page.prefix, page.limit as i64];
            Ok(query_all(c, &sql, p, bucket_row)?)
        })
        .await
    }

    async fn delete_bucket(&self, name: &str) -> Result<BucketDeleted, StoreError> {
        let name = name.to_string();
        self.call(move |c, files| {
            let tx = c.transaction()?;
            if get_bucket(&tx, &name)?.is_none() {
                return Ok(BucketDeleted::Missing);
            }
            let nonempty = tx
                .query_row(
                    "SELECT 1 FROM objects WHERE bucket = ?1 LIMIT 1",
                    [&name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if nonempty {
                return Ok(BucketDeleted::NotEmpty);
            }
            let uploads: Vec<String> = {
                let mut st = tx.prepare("SELECT id FROM uploads WHERE bucket = ?1")?;
                let rows = st.query_map([&name], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            tx.execute("DELETE FROM uploads WHERE bucket = ?1", [&name])?;
            tx.execute("DELETE FROM notifications WHERE bucket = ?1", [&name])?;
            tx.execute("DELETE FROM buckets WHERE name = ?1", [&name])?;
            tx.commit()?;
            for id in uploads.iter().filter(|id| is_blob_id(id)) {
                files.remove(&files.upload(id));
            }
            Ok(BucketDeleted::Deleted(uploads))
        })
        .await
    }

    async fn get_object(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<ObjectRecord>, StoreError> {
        let (bucket, name) = (bucket.to_string(), name.to_string());
        self.call(move |c, _| Ok(get_object(c, &bucket, &name)?))
            .await
    }

    async fn scan_objects(&self, range: ObjectRange) -> Result<Vec<ObjectRecord>, StoreError> {
        self.call(move |c, _| {
            let sql = format!(
                "SELECT {OBJECT_COLS} FROM objects WHERE bucket = ?1 AND name >= ?2 AND (?3 IS NULL OR name < ?3)
                 ORDER BY name LIMIT ?4"
            );
            let p = params![range.bucket, range.lower, range.upper, range.limit as i64];
            Ok(query_all(c, &sql, p, object_row)?)
        })
        .await
    }

    async fn mutate_object(
        &self,
        change: ObjectChange<'_>,
    ) -> Result<Result<Mutated, Reject>, StoreError> {
        let (bucket, name) = (change.bucket.to_string(), change.name.to_string());
        let (new_generation, decide) = (change.new_generation, change.decide);
        self.call(move |c, files| {
            let tx = c.transaction()?;
            if get_bucket(&tx, &bucket)?.is_none() {
                return Ok(Ok(Mutated::NoBucket));
            }
            let old = get_object(&tx, &bucket, &name)?;
            let new_generation = if new_generation {
                let g = now_us().max(counter(&tx, "generation")? + 1);
                set_counter(&tx, "generation", g)?;
                Some(g)
            } else {
                None
            };
            let state = ObjectState {
                old,
                notifications: notifications(&tx, &bucket)?,
                new_generation,
            };
            let plan = match checked_plan(decide, &state, &bucket, &name).map_err(E)? {
                Ok(p) => p,
                Err(r) => return Ok(Err(r)),
            };
            if let Some(row) = &plan.put {
                if !files.blob(&row.blob).exists() {
                    // A resumable upload's bytes become the object's blob.
                    files.install(&files.upload(&row.blob), &row.blob)?;
                }
                put_object(&tx, row)?;
            } else if plan.delete {
                tx.execute(
                    "DELETE FROM objects WHERE bucket = ?1 AND name = ?2",
                    params![bucket, name.as_bytes()],
                )?;
            }
            for m in &plan.outbox {
                insert_outbox(&tx, m)?;
            }
            if let Some((id, resource)) = &plan.finish_upload {
                tx.execute(
                    "UPDATE uploads SET done = ?2 WHERE id = ?1",
                    params![id, resource],
                )?;
            }
            tx.commit()?;
            let old = state.old;
            if let Some(o) = &old {
                let replaced = plan.put.as_ref().is_some_and(|p| p.blob != o.blob);
                if (replaced || (plan.put.is_none() && plan.delete))
                    && !blob_referenced(c, &o.blob)?
                {
                    files.remove_blob(&o.blob);
                }
            }
            Ok(Ok(Mutated::Done {
                plan: Box::new(plan),
                old: old.map(Box::new),
            }))
        })
        .await
    }

    async fn notifications(&self, bucket: &str) -> Result<Vec<NotificationRecord>, StoreError> {
        let bucket = bucket.to_string();
        self.call(move |c, _| Ok(notifications(c, &bucket)?)).await
    }

    async fn add_notification(
        &self,
        bucket: &str,
        max: usize,
        make: Box<dyn FnOnce(i64) -> String + Send>,
    ) -> Result<Option<Result<NotificationRecord, usize>>, StoreError> {
        let bucket = bucket.to_string();
        self.call(move |c, _| {
            let tx = c.transaction()?;
            if get_bucket(&tx, &bucket)?.is_none() {
                return Ok(None);
            }
            let count = notifications(&tx, &bucket)?.len();
            if count >= max {
                return Ok(Some(Err(count)));
            }
            let id = counter(&tx, "notification")? + 1;
            set_counter(&tx, "notification", id)?;
            let rec = NotificationRecord {
                bucket: bucket.clone(),
                id,
                config: make(id),
            };
            tx.execute(
                "INSERT OR REPLACE INTO notifications(bucket, id, config) VALUES (?1, ?2, ?3)",
                params![rec.bucket, rec.id, rec.config],
            )?;
            tx.commit()?;
            Ok(Some(Ok(rec)))
        })
        .await
    }

    async fn delete_notification(&self, bucket: &str, id: i64) -> Result<bool, StoreError> {
        let bucket = bucket.to_string();
        self.call(move |c, _| {
            Ok(c.execute(
                "DELETE FROM notifications WHERE bucket = ?1 AND id = ?2",
                params![bucket, id],
            )? > 0)
        })
        .await
    }

    async fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.call(move |c, _| {
            let mut st = c.prepare_cached(
                "SELECT id, topic, attributes, data FROM outbox ORDER BY id LIMIT ?1",
            )?;
            let rows = st.query_map([limit as i64], |r| {
                let attrs: String = r.get(2)?;
                Ok(OutboxRow {
                    id: r.get(0)?,
                    message: OutboxMessage {
                        topic: r.get(1)?,
                        attributes: serde_json::from_str::<BTreeMap<String, String>>(&attrs)
                            .map_err(|e| conv(2, e))?,
                        data: r.get(3)?,
                    },
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.call(move |c, _| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
                for id in &ids {
                    st.execute([id])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn outbox_len(&self) -> Result<i64, StoreError> {
        self.call(|c, _| Ok(c.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?))
            .await
    }

    async fn insert_upload(&self, u: &UploadRecord) -> Result<(), StoreError> {
        if !is_blob_id(&u.id) {
            return Err(bad_blob_id(&u.id));
        }
        let u = u.clone();
        self.call(move |c, files| {
            // The session's (empty) file first: a zero-byte upload installs it.
            std::fs::File::create(files.upload(&u.id))?.sync_all()?;
            sync_dir(&files.root.join("uploads"))?;
            c.execute(
                "INSERT INTO uploads(id, bucket, name, spec, total, received, done, created_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    u.id,
                    u.bucket,
                    u.name.as_bytes(),
                    u.spec,
                    u.total.map(|t| t as i64),
                    u.received as i64,
                    u.done,
                    u.created_us
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |c, _| {
            Ok(c.query_row(
                "SELECT id, bucket, name, spec, total, received, done, created_us FROM uploads WHERE id = ?1",
                [&id],
                upload_row,
            )
            .optional()?)
        })
        .await
    }

    async fn set_upload_progress(
        &self,
        id: &str,
        received: u64,
        total: Option<u64>,
    ) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |c, _| {
            c.execute(
                "UPDATE uploads SET received = ?2, total = COALESCE(?3, total) WHERE id = ?1",
                params![id, received as i64, total.map(|t| t as i64)],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call(move |c, files| {
            let n = c.execute("DELETE FROM uploads WHERE id = ?1", [&id])?;
            if is_blob_id(&id) {
                files.remove(&files.upload(&id));
            }
            Ok(n > 0)
        })
        .await
    }

    async fn expire_uploads(&self, before_us: i64) -> Result<Vec<String>, StoreError> {
        self.call(move |c, files| expire_uploads(c, files, before_us))
            .await
    }

    async fn blob_writer(
        &self,
        append_to: Option<(&str, u64)>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        let files = Files {
            root: self.root.clone(),
        };
        let (id, path, install, at) = match append_to {
            None => {
                let id = new_blob_id();
                let path = self.root.join("tmp").join(&id);
                (id, path, true, 0)
            }
            Some((id, at)) => {
                if !is_blob_id(id) {
                    return Err(bad_blob_id(id));
                }
                (id.to_string(), files.upload(id), false, at)
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(|e| StoreError::io(&path, e))?;
        file.set_len(at)
            .await
            .map_err(|e| StoreError::io(&path, e))?;
        file.seek(io::SeekFrom::Start(at))
            .await
            .map_err(|e| StoreError::io(&path, e))?;
        Ok(Box::new(FileWriter {
            id,
            file: Some(tokio::io::BufWriter::with_capacity(1 << 20, file)),
            path,
            install,
            files,
            written: at,
        }))
    }

    async fn read_blob(&self, id: &str, start: u64) -> Result<Option<BlobReader>, StoreError> {
        if !is_blob_id(id) {
            return Err(bad_blob_id(id));
        }
        let files = Files {
            root: self.root.clone(),
        };
        for path in [files.blob(id), files.upload(id)] {
            match tokio::fs::File::open(&path).await {
                Ok(mut f) => {
                    f.seek(io::SeekFrom::Start(start))
                        .await
                        .map_err(|e| StoreError::io(&path, e))?;
                    return Ok(Some(Box::new(f)));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        }
        Ok(None)
    }

    async fn copy_blob(&self, src: &str) -> Result<Option<String>, StoreError> {
        if !is_blob_id(src) {
            return Err(bad_blob_id(src));
        }
        let src = src.to_string();
        self.call(move |_, files| {
            let id = new_blob_id();
            let from = files.blob(&src);
            if !from.exists() {
                return Ok(None);
            }
            let tmp = files.root.join("tmp").join(&id);
            let copied = match std::fs::hard_link(&from, &tmp) {
                Ok(()) => Ok(()),
                Err(_) => {
                    std::fs::copy(&from, &tmp).and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                }
            };
            match copied {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    files.remove(&tmp);
                    return Ok(None);
                }
                r => r?,
            }
            files.install(&tmp, &id)?;
            Ok(Some(id))
        })
        .await
    }

    async fn discard_blob(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |c, files| {
            if is_blob_id(&id) && !blob_referenced(c, &id)? {
                files.remove_blob(&id);
            }
            Ok(())
        })
        .await
    }

    async fn sweep(&self, min_age_us: i64) -> Result<u64, StoreError> {
        self.call(move |c, files| sweep(c, files, min_age_us)).await
    }
}

fn sweep(c: &mut Connection, files: &Files, min_age_us: i64) -> Result<u64, E> {
    let old_enough = |p: &Path| -> bool {
        let age = std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_micros() as i64)
            .unwrap_or(i64::MAX);
        age >= min_age_us
    };
    let mut removed = 0;
    let active: HashSet<String> = {
        let mut st = c.prepare("SELECT id FROM uploads WHERE done IS NULL")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let uploads = files.root.join("uploads");
    for f in std::fs::read_dir(&uploads)? {
        let f = f?;
        if let Some(name) = f.file_name().to_str() {
            if is_blob_id(name) && !active.contains(name) && old_enough(&f.path()) {
                files.remove(&f.path());
                removed += 1;
            }
        }
    }
    for shard in std::fs::read_dir(files.root.join("blobs"))? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(shard.path())? {
            let f = f?;
            if let Some(name) = f.file_name().to_str() {
                if is_blob_id(name) && !blob_referenced(c, name)? && old_enough(&f.path()) {
                    files.remove(&f.path());
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

fn expire_uploads(c: &mut Connection, files: &Files, before_us: i64) -> Result<Vec<String>, E> {
    let tx = c.transaction()?;
    let ids: Vec<String> = {
        let mut st = tx.prepare("SELECT id FROM uploads WHERE created_us < ?1")?;
        let rows = st.query_map([before_us], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    tx.execute("DELETE FROM uploads WHERE created_us < ?1", [before_us])?;
    tx.commit()?;
    for id in ids.iter().filter(|id| is_blob_id(id)) {
        files.remove(&files.upload(id));
    }
    Ok(ids)
}

/// A blob file being written: `tmp/<id>` (installed into `blobs/` by
/// `finish`) or an upload's `uploads/<id>`.
struct FileWriter {
    id: String,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    path: PathBuf,
    install: bool,
    files: Files,
    written: u64,
}

#[async_trait::async_trait]
impl BlobWriter for FileWriter {
    fn id(&self) -> &str {
        &self.id
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let f = self.file.as_mut().ok_or(StoreError::Closed)?;
        f.write_all(data)
            .await
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StoreError> {
        let mut file = self.file.take().ok_or(StoreError::Closed)?;
        let path = self.path.clone();
        file.flush().await.map_err(|e| StoreError::io(&path, e))?;
        file.get_mut()
            .sync_all()
            .await
            .map_err(|e| StoreError::io(&path, e))?;
        drop(file);
        if self.install {
            let (files, id) = (self.files.clone(), self.id.clone());
            let p = path.clone();
            tokio::task::spawn_blocking(move || files.install(&p, &id))
                .await
                .map_err(|e| StoreError::Unavailable(format!("blob install task failed: {e}")))?
                .map_err(|e| StoreError::io(&path, e))?;
            self.install = false;
        }
        Ok(self.written)
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // An unfinished new blob goes at once; an upload's bytes stay.
        if self.install {
            let path = std::mem::take(&mut self.path);
            let remove = move || {
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove a temp blob");
                    }
                }
            };
            // Off the async workers when there are any (else `tmp/` is
            // emptied at the next start anyway).
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(remove)),
                Err(_) => remove(),
            }
        }
    }
}
