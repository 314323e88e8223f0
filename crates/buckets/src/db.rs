//! The metadata index (`buckets/index.db`, SQLite in WAL mode with
//! `synchronous=FULL`): buckets, objects, notification configs, the
//! notification outbox and resumable upload sessions.
//!
//! Object names are stored as BLOBs so that comparisons (listing order,
//! prefixes, page tokens) are plain byte comparisons of their UTF-8.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::conditions::Conditions;
use crate::hash::Expected;
use crate::model::{now_us, BucketRow, NotificationConfig, ObjectMeta, ObjectRow};

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

pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let mut c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in SCHEMA.iter().enumerate().skip(version as usize) {
        let tx = c.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(c)
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

/// A new object generation: microseconds since the epoch, strictly greater
/// than every generation handed out before (also across restarts and clock
/// steps backwards). Call inside the write transaction.
pub fn next_generation(c: &Connection) -> rusqlite::Result<i64> {
    let last = counter(c, "generation")?;
    let g = now_us().max(last + 1);
    set_counter(c, "generation", g)?;
    Ok(g)
}

pub fn next_notification_id(c: &Connection) -> rusqlite::Result<i64> {
    let id = counter(c, "notification")? + 1;
    set_counter(c, "notification", id)?;
    Ok(id)
}

// ---- buckets ----

fn bucket_row(r: &Row) -> rusqlite::Result<BucketRow> {
    let labels: String = r.get(7)?;
    Ok(BucketRow {
        name: r.get(0)?,
        project: r.get(1)?,
        created_us: r.get(2)?,
        updated_us: r.get(3)?,
        metageneration: r.get(4)?,
        location: r.get(5)?,
        storage_class: r.get(6)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
    })
}

const BUCKET_COLS: &str =
    "name, project, created_us, updated_us, metageneration, location, storage_class, labels";

pub fn get_bucket(c: &Connection, name: &str) -> rusqlite::Result<Option<BucketRow>> {
    c.query_row(
        &format!("SELECT {BUCKET_COLS} FROM buckets WHERE name = ?1"),
        [name],
        bucket_row,
    )
    .optional()
}

pub fn put_bucket(c: &Connection, b: &BucketRow) -> rusqlite::Result<()> {
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
            serde_json::to_string(&b.labels).expect("labels serialize"),
        ],
    )?;
    Ok(())
}

/// Buckets with `name > after`, in name order. `project = None`: all projects.
pub fn list_buckets(
    c: &Connection,
    project: Option<&str>,
    prefix: &str,
    after: &str,
    limit: usize,
) -> rusqlite::Result<Vec<BucketRow>> {
    let mut st = c.prepare(&format!(
        "SELECT {BUCKET_COLS} FROM buckets WHERE name > ?1 AND (?2 IS NULL OR project = ?2)
         AND substr(name, 1, length(?3)) = ?3 ORDER BY name LIMIT ?4"
    ))?;
    let rows = st.query_map(params![after, project, prefix, limit as i64], bucket_row)?;
    rows.collect()
}

pub fn bucket_is_empty(c: &Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(c.query_row(
        "SELECT 1 FROM objects WHERE bucket = ?1 LIMIT 1",
        [name],
        |_| Ok(()),
    )
    .optional()?
    .is_none())
}

/// Removes a bucket with its notification configs and upload sessions;
/// returns the upload ids whose files should go.
pub fn delete_bucket(c: &Connection, name: &str) -> rusqlite::Result<Vec<String>> {
    let uploads: Vec<String> = {
        let mut st = c.prepare("SELECT id FROM uploads WHERE bucket = ?1")?;
        let rows = st.query_map([name], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    c.execute("DELETE FROM uploads WHERE bucket = ?1", [name])?;
    c.execute("DELETE FROM notifications WHERE bucket = ?1", [name])?;
    c.execute("DELETE FROM buckets WHERE name = ?1", [name])?;
    Ok(uploads)
}

// ---- objects ----

const OBJECT_COLS: &str =
    "bucket, name, generation, metageneration, size, blob, md5, crc32c, component_count, meta, created_us, updated_us";

fn object_row(r: &Row) -> rusqlite::Result<ObjectRow> {
    let name: Vec<u8> = r.get(1)?;
    let md5: Option<Vec<u8>> = r.get(6)?;
    let meta: String = r.get(9)?;
    let crc: i64 = r.get(7)?;
    Ok(ObjectRow {
        bucket: r.get(0)?,
        name: String::from_utf8(name).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, Box::new(e))
        })?,
        generation: r.get(2)?,
        metageneration: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        blob: r.get(5)?,
        md5: md5.and_then(|m| <[u8; 16]>::try_from(m.as_slice()).ok()),
        crc32c: crc as u32,
        component_count: r.get(8)?,
        meta: serde_json::from_str::<ObjectMeta>(&meta).unwrap_or_default(),
        created_us: r.get(10)?,
        updated_us: r.get(11)?,
    })
}

pub fn get_object(c: &Connection, bucket: &str, name: &str) -> rusqlite::Result<Option<ObjectRow>> {
    c.query_row(
        &format!("SELECT {OBJECT_COLS} FROM objects WHERE bucket = ?1 AND name = ?2"),
        params![bucket, name.as_bytes()],
        object_row,
    )
    .optional()
}

pub fn put_object(c: &Connection, o: &ObjectRow) -> rusqlite::Result<()> {
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
            serde_json::to_string(&o.meta).expect("metadata serializes"),
            o.created_us,
            o.updated_us,
        ],
    )?;
    Ok(())
}

pub fn delete_object(c: &Connection, bucket: &str, name: &str) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM objects WHERE bucket = ?1 AND name = ?2",
        params![bucket, name.as_bytes()],
    )?;
    Ok(())
}

/// Objects with `lower <= name < upper` in byte order.
pub fn scan_objects(
    c: &Connection,
    bucket: &str,
    lower: &[u8],
    upper: Option<&[u8]>,
    limit: usize,
) -> rusqlite::Result<Vec<ObjectRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {OBJECT_COLS} FROM objects WHERE bucket = ?1 AND name >= ?2 AND (?3 IS NULL OR name < ?3)
         ORDER BY name LIMIT ?4"
    ))?;
    let rows = st.query_map(params![bucket, lower, upper, limit as i64], object_row)?;
    rows.collect()
}

pub fn blob_referenced(c: &Connection, blob: &str) -> rusqlite::Result<bool> {
    Ok(c.query_row(
        "SELECT 1 FROM objects WHERE blob = ?1 LIMIT 1",
        [blob],
        |_| Ok(()),
    )
    .optional()?
    .is_some())
}

// ---- notifications ----

pub fn notifications(c: &Connection, bucket: &str) -> rusqlite::Result<Vec<NotificationConfig>> {
    let mut st =
        c.prepare_cached("SELECT config FROM notifications WHERE bucket = ?1 ORDER BY id")?;
    let rows = st.query_map([bucket], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        if let Ok(n) = serde_json::from_str(&r?) {
            out.push(n);
        }
    }
    Ok(out)
}

pub fn put_notification(c: &Connection, n: &NotificationConfig) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO notifications(bucket, id, config) VALUES (?1, ?2, ?3)",
        params![
            n.bucket,
            n.id,
            serde_json::to_string(n).expect("config serializes")
        ],
    )?;
    Ok(())
}

pub fn delete_notification(c: &Connection, bucket: &str, id: i64) -> rusqlite::Result<bool> {
    Ok(c.execute(
        "DELETE FROM notifications WHERE bucket = ?1 AND id = ?2",
        params![bucket, id],
    )? > 0)
}

// ---- outbox ----

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub attributes: BTreeMap<String, String>,
    pub data: Vec<u8>,
}

pub fn insert_outbox(
    c: &Connection,
    topic: &str,
    attributes: &BTreeMap<String, String>,
    data: &[u8],
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO outbox(topic, attributes, data, created_us) VALUES (?1, ?2, ?3, ?4)",
        params![
            topic,
            serde_json::to_string(attributes).expect("attributes serialize"),
            data,
            now_us()
        ],
    )?;
    Ok(())
}

pub fn pending_outbox(c: &Connection, limit: usize) -> rusqlite::Result<Vec<OutboxRow>> {
    let mut st =
        c.prepare_cached("SELECT id, topic, attributes, data FROM outbox ORDER BY id LIMIT ?1")?;
    let rows = st.query_map([limit as i64], |r| {
        let attrs: String = r.get(2)?;
        Ok(OutboxRow {
            id: r.get(0)?,
            topic: r.get(1)?,
            attributes: serde_json::from_str(&attrs).unwrap_or_default(),
            data: r.get(3)?,
        })
    })?;
    rows.collect()
}

pub fn delete_outbox(c: &Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let mut st = c.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
    for id in ids {
        st.execute([id])?;
    }
    Ok(())
}

pub fn outbox_len(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
}

// ---- resumable upload sessions ----

/// What the initiating request of a resumable upload fixed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadSpec {
    pub meta: ObjectMeta,
    pub conditions: Conditions,
    pub expected_md5: Option<String>,
    pub expected_crc32c: Option<String>,
}

impl UploadSpec {
    pub fn expected(&self) -> Expected {
        Expected {
            md5: self.expected_md5.clone(),
            crc32c: self.expected_crc32c.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UploadRow {
    pub id: String,
    pub bucket: String,
    pub name: String,
    pub spec: UploadSpec,
    pub total: Option<u64>,
    pub received: u64,
    /// The object resource (JSON) once the upload completed.
    pub done: Option<String>,
    pub created_us: i64,
}

pub fn insert_upload(c: &Connection, u: &UploadRow) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO uploads(id, bucket, name, spec, total, received, done, created_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            u.id,
            u.bucket,
            u.name.as_bytes(),
            serde_json::to_string(&u.spec).expect("spec serializes"),
            u.total.map(|t| t as i64),
            u.received as i64,
            u.done,
            u.created_us
        ],
    )?;
    Ok(())
}

pub fn get_upload(c: &Connection, id: &str) -> rusqlite::Result<Option<UploadRow>> {
    c.query_row(
        "SELECT id, bucket, name, spec, total, received, done, created_us FROM uploads WHERE id = ?1",
        [id],
        |r| {
            let name: Vec<u8> = r.get(2)?;
            let spec: String = r.get(3)?;
            Ok(UploadRow {
                id: r.get(0)?,
                bucket: r.get(1)?,
                name: String::from_utf8_lossy(&name).into_owned(),
                spec: serde_json::from_str(&spec).unwrap_or_default(),
                total: r.get::<_, Option<i64>>(4)?.map(|t| t as u64),
                received: r.get::<_, i64>(5)? as u64,
                done: r.get(6)?,
                created_us: r.get(7)?,
            })
        },
    )
    .optional()
}

pub fn set_upload_progress(
    c: &Connection,
    id: &str,
    received: u64,
    total: Option<u64>,
) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE uploads SET received = ?2, total = COALESCE(?3, total) WHERE id = ?1",
        params![id, received as i64, total.map(|t| t as i64)],
    )?;
    Ok(())
}

pub fn finish_upload(c: &Connection, id: &str, resource: &str) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE uploads SET done = ?2 WHERE id = ?1",
        params![id, resource],
    )?;
    Ok(())
}

pub fn delete_upload(c: &Connection, id: &str) -> rusqlite::Result<()> {
    c.execute("DELETE FROM uploads WHERE id = ?1", [id])?;
    Ok(())
}

/// Ids of sessions still receiving data.
pub fn active_uploads(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare("SELECT id FROM uploads WHERE done IS NULL")?;
    let rows = st.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// Drops sessions older than `before_us` (Google keeps them a week); returns their ids.
pub fn expire_uploads(c: &Connection, before_us: i64) -> rusqlite::Result<Vec<String>> {
    let ids: Vec<String> = {
        let mut st = c.prepare("SELECT id FROM uploads WHERE created_us < ?1")?;
        let rows = st.query_map([before_us], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    c.execute("DELETE FROM uploads WHERE created_us < ?1", [before_us])?;
    Ok(ids)
}
