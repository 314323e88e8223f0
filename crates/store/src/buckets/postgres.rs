//! The bucket engine in PostgreSQL (cluster mode): tables `pubrun_buckets`,
//! `pubrun_bucket_objects`, `pubrun_bucket_notifications`,
//! `pubrun_bucket_outbox`, `pubrun_bucket_uploads`, `pubrun_bucket_counters`,
//! and the bytes in `pubrun_bucket_blobs` / `pubrun_bucket_chunks`, created by
//! a migration of the shared `pubrun_schema` sequence (`crate::postgres`).
//!
//! - Bytes: a blob is a `pubrun_bucket_blobs` row and its `bytea` chunks of
//!   at most [`CHUNK`] bytes keyed by byte offset. A writer inserts each
//!   chunk as it fills (its own short transaction: nothing is buffered
//!   beyond one chunk), so an object of any size streams in; a reader
//!   fetches one chunk per query and hands it on through a channel of two,
//!   so a download never holds more than a few chunks. Chunks are invisible
//!   until an object row naming their blob commits; the commit that
//!   replaces or deletes an object deletes the old blob's chunks in the
//!   same transaction (`ON DELETE CASCADE`), and [`sweep`] removes blobs
//!   left by writers that died.
//! - Object names are `bytea`, so listing order is byte order as in SQLite.
//! - One writer per object name at a time (`pg_advisory_xact_lock` on the
//!   bucket/name), so preconditions are checked against what commits.
//! - Fencing: with a [`Fence`], every index write runs in a transaction
//!   that first reads the ownership row `FOR SHARE` and compares the token
//!   (as `runs::postgres`). Chunk writes are not fenced: they are invisible
//!   until a fenced commit references them.
//!
//! [`sweep`]: BucketStore::sweep

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio_postgres::{GenericClient, Row};

use super::{
    bad_blob_id, checked_plan, is_blob_id, new_blob_id, now_us, BlobReader, BlobWriter,
    BucketDeleted, BucketMutation, BucketPage, BucketRecord, BucketStore, Mutated,
    NotificationRecord, ObjectChange, ObjectRange, ObjectRecord, ObjectState, OutboxMessage,
    OutboxRow, Reject, UploadRecord,
};
use crate::fenced::FencedPg;
use crate::postgres::db_err;
use crate::runs::postgres::Fence;
use crate::StoreError;

/// Bytes per chunk row: large enough that per-row overhead is negligible,
/// small enough that a writer or reader holds little memory.
pub const CHUNK: usize = 1 << 20;

/// The bucket migration of `crate::postgres::MIGRATIONS`; never edit once released.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE pubrun_bucket_counters (
        k text PRIMARY KEY,
        v bigint NOT NULL
    );
    CREATE TABLE pubrun_buckets (
        name text PRIMARY KEY,
        project text NOT NULL,
        created_us bigint NOT NULL,
        updated_us bigint NOT NULL,
        metageneration bigint NOT NULL,
        location text NOT NULL,
        storage_class text NOT NULL,
        labels text NOT NULL
    );
    CREATE TABLE pubrun_bucket_blobs (
        id text PRIMARY KEY,
        created_us bigint NOT NULL
    );
    CREATE TABLE pubrun_bucket_chunks (
        blob text NOT NULL REFERENCES pubrun_bucket_blobs (id) ON DELETE CASCADE,
        pos bigint NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (blob, pos)
    );
    CREATE TABLE pubrun_bucket_objects (
        bucket text NOT NULL,
        name bytea NOT NULL,
        generation bigint NOT NULL,
        metageneration bigint NOT NULL,
        size bigint NOT NULL,
        blob text NOT NULL,
        md5 bytea,
        crc32c bigint NOT NULL,
        component_count bigint,
        meta text NOT NULL,
        created_us bigint NOT NULL,
        updated_us bigint NOT NULL,
        PRIMARY KEY (bucket, name)
    );
    CREATE INDEX pubrun_bucket_objects_blob ON pubrun_bucket_objects (blob);
    CREATE TABLE pubrun_bucket_notifications (
        bucket text NOT NULL,
        id bigint NOT NULL,
        config text NOT NULL,
        PRIMARY KEY (bucket, id)
    );
    CREATE TABLE pubrun_bucket_outbox (
        id bigserial PRIMARY KEY,
        topic text NOT NULL,
        attributes text NOT NULL,
        data bytea NOT NULL,
        created_us bigint NOT NULL
    );
    CREATE TABLE pubrun_bucket_uploads (
        id text PRIMARY KEY,
        bucket text NOT NULL,
        name bytea NOT NULL,
        spec text NOT NULL,
        total bigint,
        received bigint NOT NULL,
        done text,
        created_us bigint NOT NULL
    );
    CREATE INDEX pubrun_bucket_uploads_bucket ON pubrun_bucket_uploads (bucket);";

/// Connections per server: uploads, downloads and the API overlap.
const POOL: usize = 4;

fn pg(e: tokio_postgres::Error) -> StoreError {
    db_err(e)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        path: format!("PostgreSQL {what}"),
        detail: e.to_string(),
    }
}

/// Deletes a blob (its chunks cascade) unless an object or an upload
/// session still names it.
const RELEASE_BLOB: &str = "DELETE FROM pubrun_bucket_blobs WHERE id = $1
     AND NOT EXISTS (SELECT 1 FROM pubrun_bucket_objects WHERE blob = $1)
     AND NOT EXISTS (SELECT 1 FROM pubrun_bucket_uploads WHERE id = $1 AND done IS NULL)";

/// Deletes the upload sessions `sql` (a `DELETE … RETURNING id` over `param`)
/// picks and releases their blobs; their ids.
async fn drop_uploads(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    param: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Vec<String>, StoreError> {
    let ids: Vec<String> = tx
        .query(sql, &[param])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &ids {
        tx.execute(RELEASE_BLOB, &[id]).await.map_err(pg)?;
    }
    Ok(ids)
}

/// Buckets, objects and their bytes in PostgreSQL.
#[derive(Clone)]
pub struct PostgresBucketStore {
    pg: Arc<FencedPg>,
}

impl PostgresBucketStore {
    /// Connects and migrates the shared schema (refusing a newer one). With a
    /// `fence`, every index write checks its token (see the module docs).
    pub async fn open(url: &str, fence: Option<Fence>) -> Result<Self, StoreError> {
        let pg = FencedPg::open(url, fence, "buckets", POOL, "bucket store").await?;
        Ok(PostgresBucketStore { pg: Arc::new(pg) })
    }

    /// Whether a write was refused because another server took the lease.
    pub fn is_fenced(&self) -> bool {
        self.pg.is_fenced()
    }
}

const BUCKET_COLS: &str =
    "name, project, created_us, updated_us, metageneration, location, storage_class, labels";

fn bucket_row(r: &Row) -> Result<BucketRecord, StoreError> {
    let c = |e| corrupt("bucket row", e);
    let labels: String = r.try_get(7).map_err(c)?;
    Ok(BucketRecord {
        name: r.try_get(0).map_err(c)?,
        project: r.try_get(1).map_err(c)?,
        created_us: r.try_get(2).map_err(c)?,
        updated_us: r.try_get(3).map_err(c)?,
        metageneration: r.try_get(4).map_err(c)?,
        location: r.try_get(5).map_err(c)?,
        storage_class: r.try_get(6).map_err(c)?,
        labels: serde_json::from_str(&labels).map_err(|e| corrupt("bucket labels", e))?,
    })
}

async fn get_bucket<C: GenericClient + Sync>(
    c: &C,
    name: &str,
    lock: &str,
) -> Result<Option<BucketRecord>, StoreError> {
    c.query_opt(
        &format!("SELECT {BUCKET_COLS} FROM pubrun_buckets WHERE name = $1 {lock}"),
        &[&name],
    )
    .await
    .map_err(pg)?
    .map(|r| bucket_row(&r))
    .transpose()
}

/// What an existing bucket row gets from [`insert_bucket`]: replaced whole.
const REPLACE_BUCKET: &str = "DO UPDATE SET project = excluded.project,
    created_us = excluded.created_us, updated_us = excluded.updated_us,
    metageneration = excluded.metageneration, location = excluded.location,
    storage_class = excluded.storage_class, labels = excluded.labels";

/// Writes the row of `b`; `on_conflict` is what an existing row of that
/// name gets (`DO NOTHING`, [`REPLACE_BUCKET`]). Rows written.
async fn insert_bucket<C: GenericClient + Sync>(
    c: &C,
    b: &BucketRecord,
    on_conflict: &str,
) -> Result<u64, StoreError> {
    let labels = serde_json::to_string(&b.labels).map_err(|e| corrupt("bucket labels", e))?;
    c.execute(
        &format!(
            "INSERT INTO pubrun_buckets ({BUCKET_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (name) {on_conflict}"
        ),
        &[
            &b.name,
            &b.project,
            &b.created_us,
            &b.updated_us,
            &b.metageneration,
            &b.location,
            &b.storage_class,
            &labels,
        ],
    )
    .await
    .map_err(pg)
}

const OBJECT_COLS: &str = "bucket, name, generation, metageneration, size, blob, md5, crc32c, component_count, meta, created_us, updated_us";

fn object_row(r: &Row) -> Result<ObjectRecord, StoreError> {
    let c = |e| corrupt("object row", e);
    let name: Vec<u8> = r.try_get(1).map_err(c)?;
    let md5: Option<Vec<u8>> = r.try_get(6).map_err(c)?;
    let size: i64 = r.try_get(4).map_err(c)?;
    let crc: i64 = r.try_get(7).map_err(c)?;
    Ok(ObjectRecord {
        bucket: r.try_get(0).map_err(c)?,
        name: String::from_utf8(name).map_err(|e| corrupt("object name", e))?,
        generation: r.try_get(2).map_err(c)?,
        metageneration: r.try_get(3).map_err(c)?,
        size: u64::try_from(size).map_err(|e| corrupt("object size", e))?,
        blob: r.try_get(5).map_err(c)?,
        md5: md5
            .map(|m| <[u8; 16]>::try_from(m.as_slice()).map_err(|e| corrupt("object md5", e)))
            .transpose()?,
        crc32c: u32::try_from(crc).map_err(|e| corrupt("object crc32c", e))?,
        component_count: r.try_get(8).map_err(c)?,
        meta: r.try_get(9).map_err(c)?,
        created_us: r.try_get(10).map_err(c)?,
        updated_us: r.try_get(11).map_err(c)?,
    })
}

async fn get_object<C: GenericClient + Sync>(
    c: &C,
    bucket: &str,
    name: &str,
) -> Result<Option<ObjectRecord>, StoreError> {
    c.query_opt(
        &format!("SELECT {OBJECT_COLS} FROM pubrun_bucket_objects WHERE bucket = $1 AND name = $2"),
        &[&bucket, &name.as_bytes()],
    )
    .await
    .map_err(pg)?
    .map(|r| object_row(&r))
    .transpose()
}

async fn notifications<C: GenericClient + Sync>(
    c: &C,
    bucket: &str,
) -> Result<Vec<NotificationRecord>, StoreError> {
    let rows = c
        .query(
            "SELECT id, config FROM pubrun_bucket_notifications WHERE bucket = $1 ORDER BY id",
            &[&bucket],
        )
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(NotificationRecord {
                bucket: bucket.to_string(),
                id: r.try_get(0).map_err(|e| corrupt("notification row", e))?,
                config: r.try_get(1).map_err(|e| corrupt("notification row", e))?,
            })
        })
        .collect()
}

fn upload_row(r: &Row) -> Result<UploadRecord, StoreError> {
    let c = |e| corrupt("upload row", e);
    let name: Vec<u8> = r.try_get(2).map_err(c)?;
    let total: Option<i64> = r.try_get(4).map_err(c)?;
    let received: i64 = r.try_get(5).map_err(c)?;
    Ok(UploadRecord {
        id: r.try_get(0).map_err(c)?,
        bucket: r.try_get(1).map_err(c)?,
        name: String::from_utf8(name).map_err(|e| corrupt("upload name", e))?,
        spec: r.try_get(3).map_err(c)?,
        total: total
            .map(|t| u64::try_from(t).map_err(|e| corrupt("upload total", e)))
            .transpose()?,
        received: u64::try_from(received).map_err(|e| corrupt("upload received", e))?,
        done: r.try_get(6).map_err(c)?,
        created_us: r.try_get(7).map_err(c)?,
    })
}

fn i64_of(n: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Config(format!("{what} {n} is out of range")))
}

#[async_trait::async_trait]
impl BucketStore for PostgresBucketStore {
    async fn create_bucket(&self, b: &BucketRecord) -> Result<bool, StoreError> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let n = insert_bucket(&tx, b, "DO NOTHING").await?;
        tx.commit().await.map_err(pg)?;
        Ok(n == 1)
    }

    async fn get_bucket(&self, name: &str) -> Result<Option<BucketRecord>, StoreError> {
        let mut g = self.pg.conn().await;
        get_bucket(&*g.get().await?, name, "").await
    }

    async fn update_bucket(
        &self,
        name: &str,
        f: BucketMutation,
    ) -> Result<Option<Result<BucketRecord, Reject>>, StoreError> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let Some(b) = get_bucket(&tx, name, "FOR UPDATE").await? else {
            return Ok(None);
        };
        match f(b) {
            Err(r) => Ok(Some(Err(r))),
            Ok(mut b) => {
                b.name = name.to_string();
                insert_bucket(&tx, &b, REPLACE_BUCKET).await?;
                tx.commit().await.map_err(pg)?;
                Ok(Some(Ok(b)))
            }
        }
    }

    async fn list_buckets(&self, page: BucketPage) -> Result<Vec<BucketRecord>, StoreError> {
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        // `COLLATE "C"`: byte order, as SQLite compares text.
        let sql = format!(
            "SELECT {BUCKET_COLS} FROM pubrun_buckets
             WHERE name COLLATE \"C\" > $1 AND ($2::text IS NULL OR project = $2)
               AND left(name, length($3)) = $3
             ORDER BY name COLLATE \"C\" LIMIT $4"
        );
        self.pg
            .query_map(
                &sql,
                &[&page.after, &page.project, &page.prefix, &limit],
                bucket_row,
            )
            .await
    }

    async fn delete_bucket(&self, name: &str) -> Result<BucketDeleted, StoreError> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        if get_bucket(&tx, name, "FOR UPDATE").await?.is_none() {
            return Ok(BucketDeleted::Missing);
        }
        let nonempty = tx
            .query_opt(
                "SELECT 1 FROM pubrun_bucket_objects WHERE bucket = $1 LIMIT 1",
                &[&name],
            )
            .await
            .map_err(pg)?
            .is_some();
        if nonempty {
            return Ok(BucketDeleted::NotEmpty);
        }
        let uploads = drop_uploads(
            &tx,
            "DELETE FROM pubrun_bucket_uploads WHERE bucket = $1 RETURNING id",
            &name,
        )
        .await?;
        tx.execute(
            "DELETE FROM pubrun_bucket_notifications WHERE bucket = $1",
            &[&name],
        )
        .await
        .map_err(pg)?;
        tx.execute("DELETE FROM pubrun_buckets WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(BucketDeleted::Deleted(uploads))
    }

    async fn get_object(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<ObjectRecord>, StoreError> {
        let mut g = self.pg.conn().await;
        get_object(&*g.get().await?, bucket, name).await
    }

    async fn scan_objects(&self, range: ObjectRange) -> Result<Vec<ObjectRecord>, StoreError> {
        let limit = i64::try_from(range.limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {OBJECT_COLS} FROM pubrun_bucket_objects
             WHERE bucket = $1 AND name >= $2 AND ($3::bytea IS NULL OR name < $3)
             ORDER BY name LIMIT $4"
        );
        self.pg
            .query_map(
                &sql,
                &[&range.bucket, &range.lower, &range.upper, &limit],
                object_row,
            )
            .await
    }

    async fn mutate_object(
        &self,
        change: ObjectChange<'_>,
    ) -> Result<Result<Mutated, Reject>, StoreError> {
        let (bucket, name) = (change.bucket, change.name);
        let (new_generation, decide) = (change.new_generation, change.decide);
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        // One writer per object name: preconditions see what commits.
        // Bucket names never contain `/`: the key is unambiguous. It goes in
        // as bytes: an object name may hold NUL, which a `text` value cannot.
        let key = format!("{bucket}/{name}");
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(encode($1, 'hex'), 0))",
            &[&key.as_bytes()],
        )
        .await
        .map_err(pg)?;
        if get_bucket(&tx, bucket, "FOR SHARE").await?.is_none() {
            return Ok(Ok(Mutated::NoBucket));
        }
        let old = get_object(&tx, bucket, name).await?;
        let new_generation = if new_generation {
            let g: i64 = tx
                .query_one(
                    "INSERT INTO pubrun_bucket_counters (k, v) VALUES ('generation', $1)
                     ON CONFLICT (k) DO UPDATE
                        SET v = greatest(excluded.v, pubrun_bucket_counters.v + 1)
                     RETURNING v",
                    &[&now_us()],
                )
                .await
                .map_err(pg)?
                .get(0);
            Some(g)
        } else {
            None
        };
        let state = ObjectState {
            old,
            notifications: notifications(&tx, bucket).await?,
            new_generation,
        };
        let plan = match checked_plan(decide, &state, bucket, name)? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        if let Some(o) = &plan.put {
            // The bytes must exist (and stay: the share lock blocks a sweep).
            tx.query_opt(
                "SELECT 1 FROM pubrun_bucket_blobs WHERE id = $1 FOR SHARE",
                &[&o.blob],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "blob {} vanished before its object committed",
                    o.blob
                ))
            })?;
            let md5 = o.md5.map(|m| m.to_vec());
            tx.execute(
                &format!(
                    "INSERT INTO pubrun_bucket_objects ({OBJECT_COLS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (bucket, name) DO UPDATE SET generation = excluded.generation,
                        metageneration = excluded.metageneration, size = excluded.size,
                        blob = excluded.blob, md5 = excluded.md5, crc32c = excluded.crc32c,
                        component_count = excluded.component_count, meta = excluded.meta,
                        created_us = excluded.created_us, updated_us = excluded.updated_us"
                ),
                &[
                    &o.bucket,
                    &o.name.as_bytes(),
                    &o.generation,
                    &o.metageneration,
                    &i64_of(o.size, "object size")?,
                    &o.blob,
                    &md5,
                    &i64::from(o.crc32c),
                    &o.component_count,
                    &o.meta,
                    &o.created_us,
                    &o.updated_us,
                ],
            )
            .await
            .map_err(pg)?;
        } else if plan.delete {
            tx.execute(
                "DELETE FROM pubrun_bucket_objects WHERE bucket = $1 AND name = $2",
                &[&bucket, &name.as_bytes()],
            )
            .await
            .map_err(pg)?;
        }
        for m in &plan.outbox {
            let attrs = serde_json::to_string(&m.attributes)
                .map_err(|e| corrupt("outbox attributes", e))?;
            tx.execute(
                "INSERT INTO pubrun_bucket_outbox (topic, attributes, data, created_us)
                 VALUES ($1, $2, $3, $4)",
                &[&m.topic, &attrs, &m.data, &now_us()],
            )
            .await
            .map_err(pg)?;
        }
        if let Some((id, resource)) = &plan.finish_upload {
            tx.execute(
                "UPDATE pubrun_bucket_uploads SET done = $2 WHERE id = $1",
                &[id, resource],
            )
            .await
            .map_err(pg)?;
        }
        if let Some(o) = &state.old {
            let released = match &plan.put {
                Some(p) => p.blob != o.blob,
                None => plan.delete,
            };
            if released {
                tx.execute(RELEASE_BLOB, &[&o.blob]).await.map_err(pg)?;
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(Ok(Mutated::Done {
            plan: Box::new(plan),
            old: state.old.map(Box::new),
        }))
    }

    async fn notifications(&self, bucket: &str) -> Result<Vec<NotificationRecord>, StoreError> {
        let mut g = self.pg.conn().await;
        notifications(&*g.get().await?, bucket).await
    }

    async fn add_notification(
        &self,
        bucket: &str,
        max: usize,
        make: Box<dyn FnOnce(i64) -> String + Send>,
    ) -> Result<Option<Result<NotificationRecord, usize>>, StoreError> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        // The bucket row lock serializes adds to one bucket (the count).
        if get_bucket(&tx, bucket, "FOR UPDATE").await?.is_none() {
            return Ok(None);
        }
        let count = notifications(&tx, bucket).await?.len();
        if count >= max {
            return Ok(Some(Err(count)));
        }
        let id: i64 = tx
            .query_one(
                "INSERT INTO pubrun_bucket_counters (k, v) VALUES ('notification', 1)
                 ON CONFLICT (k) DO UPDATE SET v = pubrun_bucket_counters.v + 1
                 RETURNING v",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        let rec = NotificationRecord {
            bucket: bucket.to_string(),
            id,
            config: make(id),
        };
        tx.execute(
            "INSERT INTO pubrun_bucket_notifications (bucket, id, config) VALUES ($1, $2, $3)",
            &[&rec.bucket, &rec.id, &rec.config],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(Ok(rec)))
    }

    async fn delete_notification(&self, bucket: &str, id: i64) -> Result<bool, StoreError> {
        let n = self
            .pg
            .write(
                "DELETE FROM pubrun_bucket_notifications WHERE bucket = $1 AND id = $2",
                &[&bucket, &id],
            )
            .await?;
        Ok(n > 0)
    }

    async fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.pg
            .query_map(
                "SELECT id, topic, attributes, data FROM pubrun_bucket_outbox ORDER BY id LIMIT $1",
                &[&limit],
                |r| {
                    let c = |e| corrupt("outbox row", e);
                    let attrs: String = r.try_get(2).map_err(c)?;
                    Ok(OutboxRow {
                        id: r.try_get(0).map_err(c)?,
                        message: OutboxMessage {
                            topic: r.try_get(1).map_err(c)?,
                            attributes: serde_json::from_str::<BTreeMap<String, String>>(&attrs)
                                .map_err(|e| corrupt("outbox attributes", e))?,
                            data: r.try_get(3).map_err(c)?,
                        },
                    })
                },
            )
            .await
    }

    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.pg
            .write(
                "DELETE FROM pubrun_bucket_outbox WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(())
    }

    async fn outbox_len(&self) -> Result<i64, StoreError> {
        let mut g = self.pg.conn().await;
        Ok(g.get()
            .await?
            .query_one("SELECT count(*) FROM pubrun_bucket_outbox", &[])
            .await
            .map_err(pg)?
            .get(0))
    }

    async fn insert_upload(&self, u: &UploadRecord) -> Result<(), StoreError> {
        if !is_blob_id(&u.id) {
            return Err(bad_blob_id(&u.id));
        }
        let total = u.total.map(|t| i64_of(t, "upload total")).transpose()?;
        let received = i64_of(u.received, "upload received")?;
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        tx.execute(
            "INSERT INTO pubrun_bucket_uploads (id, bucket, name, spec, total, received, done, created_us)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &u.id,
                &u.bucket,
                &u.name.as_bytes(),
                &u.spec,
                &total,
                &received,
                &u.done,
                &u.created_us,
            ],
        )
        .await
        .map_err(pg)?;
        // The session's bytes: a blob named like the session.
        tx.execute(
            "INSERT INTO pubrun_bucket_blobs (id, created_us) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            &[&u.id, &now_us()],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let mut g = self.pg.conn().await;
        g.get()
            .await?
            .query_opt(
                "SELECT id, bucket, name, spec, total, received, done, created_us
                 FROM pubrun_bucket_uploads WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg)?
            .map(|r| upload_row(&r))
            .transpose()
    }

    async fn set_upload_progress(
        &self,
        id: &str,
        received: u64,
        total: Option<u64>,
    ) -> Result<(), StoreError> {
        let total = total.map(|t| i64_of(t, "upload total")).transpose()?;
        let received = i64_of(received, "upload received")?;
        self.pg.write(
            "UPDATE pubrun_bucket_uploads SET received = $2, total = COALESCE($3, total) WHERE id = $1",
            &[&id, &received, &total],
        )
        .await?;
        Ok(())
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let n = tx
            .execute("DELETE FROM pubrun_bucket_uploads WHERE id = $1", &[&id])
            .await
            .map_err(pg)?;
        tx.execute(RELEASE_BLOB, &[&id]).await.map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(n > 0)
    }

    async fn expire_uploads(&self, before_us: i64) -> Result<Vec<String>, StoreError> {
        let mut g = self.pg.conn().await;
        let tx = self.pg.begin(g.get().await?).await?;
        let ids = drop_uploads(
            &tx,
            "DELETE FROM pubrun_bucket_uploads WHERE created_us < $1 RETURNING id",
            &before_us,
        )
        .await?;
        tx.commit().await.map_err(pg)?;
        Ok(ids)
    }

    async fn blob_writer(
        &self,
        append_to: Option<(&str, u64)>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        let mut g = self.pg.conn().await;
        let c = g.get().await?;
        let (id, pos, fresh) = match append_to {
            None => {
                let id = new_blob_id();
                c.execute(
                    "INSERT INTO pubrun_bucket_blobs (id, created_us) VALUES ($1, $2)",
                    &[&id, &now_us()],
                )
                .await
                .map_err(pg)?;
                (id, 0, true)
            }
            Some((id, at)) => {
                if !is_blob_id(id) {
                    return Err(bad_blob_id(id));
                }
                let at = i64_of(at, "upload offset")?;
                // Fenced: a server that lost the lease must not cut a
                // session the new owner is writing.
                let tx = self.pg.begin(c).await?;
                tx.execute(
                    "INSERT INTO pubrun_bucket_blobs (id, created_us) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&id, &now_us()],
                )
                .await
                .map_err(pg)?;
                // Drop what lies beyond `at` (a retried chunk rewrites it).
                tx.execute(
                    "DELETE FROM pubrun_bucket_chunks WHERE blob = $1 AND pos >= $2",
                    &[&id, &at],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "UPDATE pubrun_bucket_chunks SET data = substring(data FROM 1 FOR ($2 - pos)::integer)
                     WHERE blob = $1 AND pos < $2 AND pos + length(data) > $2",
                    &[&id, &at],
                )
                .await
                .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
                (id.to_string(), at, false)
            }
        };
        drop(g);
        Ok(Box::new(ChunkWriter {
            pg: self.pg.clone(),
            id,
            pos,
            buf: Vec::new(),
            fresh,
            finished: false,
        }))
    }

    async fn read_blob(&self, id: &str, start: u64) -> Result<Option<BlobReader>, StoreError> {
        if !is_blob_id(id) {
            return Err(bad_blob_id(id));
        }
        {
            let mut g = self.pg.conn().await;
            let exists = g
                .get()
                .await?
                .query_opt("SELECT 1 FROM pubrun_bucket_blobs WHERE id = $1", &[&id])
                .await
                .map_err(pg)?
                .is_some();
            if !exists {
                return Ok(None);
            }
        }
        let (tx, rx) = mpsc::channel(2);
        let pg = self.pg.clone();
        let id = id.to_string();
        let start = i64_of(start, "read offset")?;
        tokio::spawn(async move {
            let mut cursor = start;
            loop {
                let next = next_chunk(&pg, &id, cursor).await;
                let done = !matches!(next, Ok(Some(_)));
                let item = match next {
                    Ok(Some(b)) => {
                        cursor += b.len() as i64;
                        Ok(b)
                    }
                    Ok(None) => return,
                    Err(e) => Err(std::io::Error::other(e)),
                };
                if tx.send(item).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Some(Box::new(ChunkReader {
            rx,
            cur: Bytes::new(),
        })))
    }

    async fn copy_blob(&self, src: &str) -> Result<Option<String>, StoreError> {
        if !is_blob_id(src) {
            return Err(bad_blob_id(src));
        }
        let id = new_blob_id();
        let mut g = self.pg.conn().await;
        let tx = g.get().await?.transaction().await.map_err(pg)?;
        if tx
            .query_opt(
                "SELECT 1 FROM pubrun_bucket_blobs WHERE id = $1 FOR SHARE",
                &[&src],
            )
            .await
            .map_err(pg)?
            .is_none()
        {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO pubrun_bucket_blobs (id, created_us) VALUES ($1, $2)",
            &[&id, &now_us()],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "INSERT INTO pubrun_bucket_chunks (blob, pos, data)
             SELECT $1, pos, data FROM pubrun_bucket_chunks WHERE blob = $2",
            &[&id, &src],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(id))
    }

    async fn discard_blob(&self, id: &str) -> Result<(), StoreError> {
        let mut g = self.pg.conn().await;
        g.get()
            .await?
            .execute(RELEASE_BLOB, &[&id])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn sweep(&self, min_age_us: i64) -> Result<u64, StoreError> {
        let mut g = self.pg.conn().await;
        let n = g
            .get()
            .await?
            .execute(
                "DELETE FROM pubrun_bucket_blobs b WHERE b.created_us < $1
                   AND NOT EXISTS (SELECT 1 FROM pubrun_bucket_objects o WHERE o.blob = b.id)
                   AND NOT EXISTS (SELECT 1 FROM pubrun_bucket_uploads u WHERE u.id = b.id)",
                &[&now_us().saturating_sub(min_age_us)],
            )
            .await
            .map_err(pg)?;
        Ok(n)
    }
}

/// The chunk holding byte `cursor` of a blob, from `cursor` on; `None` at
/// the end. A blob deleted mid-read (its object replaced) is an error, not
/// a short read.
async fn next_chunk(pg: &FencedPg, id: &str, cursor: i64) -> Result<Option<Bytes>, StoreError> {
    let mut g = pg.conn().await;
    let c = g.get().await?;
    let row = c
        .query_opt(
            "SELECT pos, data FROM pubrun_bucket_chunks WHERE blob = $1 AND pos <= $2
             ORDER BY pos DESC LIMIT 1",
            &[&id, &cursor],
        )
        .await
        .map_err(pg_err)?;
    if let Some(r) = row {
        let pos: i64 = r.get(0);
        let data: Vec<u8> = r.get(1);
        let end = pos + data.len() as i64;
        if end > cursor {
            let skip = usize::try_from(cursor - pos).map_err(|e| corrupt("chunk", e))?;
            return Ok(Some(Bytes::from(data).slice(skip..)));
        }
    }
    // No chunk holds `cursor`: the end of the blob, a gap, or a deleted blob.
    let exists = c
        .query_opt("SELECT 1 FROM pubrun_bucket_blobs WHERE id = $1", &[&id])
        .await
        .map_err(pg_err)?
        .is_some();
    if !exists {
        return Err(StoreError::Unavailable(format!(
            "blob {id} was deleted while being read (its object was replaced or deleted)"
        )));
    }
    let later = c
        .query_opt(
            "SELECT 1 FROM pubrun_bucket_chunks WHERE blob = $1 AND pos > $2 LIMIT 1",
            &[&id, &cursor],
        )
        .await
        .map_err(pg_err)?
        .is_some();
    if later {
        return Err(corrupt(
            "chunks",
            format!("blob {id} has a gap at byte {cursor}"),
        ));
    }
    Ok(None)
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    db_err(e)
}

/// Streams a blob into chunk rows, one short transaction per full chunk.
struct ChunkWriter {
    pg: Arc<FencedPg>,
    id: String,
    /// Offset of the first byte of `buf`.
    pos: i64,
    buf: Vec<u8>,
    /// A new blob (not an upload's): removed when dropped unfinished.
    fresh: bool,
    finished: bool,
}

impl ChunkWriter {
    async fn flush_chunk(&mut self, len: usize) -> Result<(), StoreError> {
        let data: Vec<u8> = self.buf.drain(..len).collect();
        let mut g = self.pg.conn().await;
        g.get()
            .await?
            .execute(
                "INSERT INTO pubrun_bucket_chunks (blob, pos, data) VALUES ($1, $2, $3)",
                &[&self.id, &self.pos, &data],
            )
            .await
            .map_err(pg)?;
        self.pos += len as i64;
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlobWriter for ChunkWriter {
    fn id(&self) -> &str {
        &self.id
    }

    async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                self.flush_chunk(CHUNK).await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StoreError> {
        if !self.buf.is_empty() {
            let n = self.buf.len();
            self.flush_chunk(n).await?;
        }
        self.finished = true;
        u64::try_from(self.pos).map_err(|e| corrupt("blob length", e))
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if self.fresh && !self.finished {
            // Abandoned mid-stream: drop what was written (else `sweep` will).
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                let (pg, id) = (self.pg.clone(), self.id.clone());
                h.spawn(async move {
                    let mut g = pg.conn().await;
                    if let Ok(c) = g.get().await {
                        if let Err(e) = c.execute(RELEASE_BLOB, &[&id]).await {
                            tracing::warn!(blob = %id, error = %e, "could not remove an abandoned blob; the sweep will");
                        }
                    }
                });
            }
        }
    }
}

/// The read side of a blob: chunks arrive from a task through a channel of two.
struct ChunkReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.cur.is_empty() {
                let n = self.cur.len().min(buf.remaining());
                let chunk = self.cur.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(b))) => self.cur = b,
            }
        }
    }
}
