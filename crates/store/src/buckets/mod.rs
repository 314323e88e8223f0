//! Buckets, objects and object bytes behind ONE trait, [`BucketStore`], with
//! two engines: [`SqliteBucketStore`] (`<data_dir>/buckets/`: the SQLite
//! index `index.db` and one file per blob, the embedded default, reading
//! data written before this seam existed) and [`PostgresBucketStore`]
//! (cluster mode: `pubrun_bucket*` tables, bytes in 1 MiB `bytea` chunks).
//!
//! Why one trait for the index *and* the bytes: an object generation is
//! only real when its index row and its bytes agree, and each engine has a
//! different way to make that atomic (the embedded engine renames a fsynced
//! file into `blobs/` before the index commit and removes unreferenced
//! files at start; PostgreSQL writes chunks under a staged blob id and the
//! object row that references them commits in one transaction with the
//! deletion of the bytes it replaced). Two traits would have to leak that
//! protocol to the caller.
//!
//! The store knows rows, not Cloud Storage semantics: object metadata,
//! notification configs and upload specs are opaque JSON text chosen by
//! `pubrun-buckets`, and the decisions taken inside a transaction
//! (preconditions, which notifications an event produces) are a callback
//! ([`ObjectMutation`]) run between the transaction's reads and writes, so
//! that on every engine these commit together, in one transaction:
//! - an object's new row (or its deletion), the generation counter, the
//!   notification outbox rows of the change, the completion of the
//!   resumable upload that produced it, and (PostgreSQL) the release of the
//!   replaced bytes.
//!
//! Blobs: [`BucketStore::blob_writer`] streams bytes into a new blob (or
//! appends to a resumable upload's, whose blob id is the upload id) and
//! [`BlobWriter::finish`] makes them durable; a blob is visible only through
//! an object row that names it. [`BucketStore::read_blob`] streams a blob
//! back from an offset. Blobs no object or live upload refers to are removed
//! ([`BucketStore::sweep`]).

pub mod postgres;
pub mod sqlite;

use std::any::Any;
use std::collections::BTreeMap;

use tokio::io::AsyncRead;

pub use postgres::PostgresBucketStore;
pub use sqlite::SqliteBucketStore;

use crate::StoreError;

/// A bucket as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRecord {
    pub name: String,
    pub project: String,
    pub created_us: i64,
    pub updated_us: i64,
    pub metageneration: i64,
    pub location: String,
    pub storage_class: String,
    pub labels: BTreeMap<String, String>,
}

/// The live generation of an object as stored. `meta` is the caller's
/// metadata: JSON text here (`M = String`); the buckets crate holds the same
/// record with it parsed, so the fields are declared only here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord<M = String> {
    pub bucket: String,
    pub name: String,
    pub generation: i64,
    pub metageneration: i64,
    pub size: u64,
    /// The blob holding the bytes: 32 lowercase hex characters.
    pub blob: String,
    pub md5: Option<[u8; 16]>,
    pub crc32c: u32,
    /// Set for composite objects.
    pub component_count: Option<i64>,
    pub meta: M,
    pub created_us: i64,
    pub updated_us: i64,
}

impl<M> ObjectRecord<M> {
    /// The same record with its metadata converted by `f` (parsed from or
    /// serialized to the stored JSON).
    pub fn try_map_meta<N, E>(
        self,
        f: impl FnOnce(M) -> Result<N, E>,
    ) -> Result<ObjectRecord<N>, E> {
        Ok(ObjectRecord {
            meta: f(self.meta)?,
            bucket: self.bucket,
            name: self.name,
            generation: self.generation,
            metageneration: self.metageneration,
            size: self.size,
            blob: self.blob,
            md5: self.md5,
            crc32c: self.crc32c,
            component_count: self.component_count,
            created_us: self.created_us,
            updated_us: self.updated_us,
        })
    }
}

/// A page of buckets: names above `after` that start with `prefix`, in name
/// order; `project = None`: every project's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketPage {
    pub project: Option<String>,
    pub prefix: String,
    pub after: String,
    pub limit: usize,
}

/// The objects of `bucket` with `lower <= name < upper` (byte order of the
/// UTF-8 names; no `upper`: to the end), at most `limit`, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectRange {
    pub bucket: String,
    pub lower: Vec<u8>,
    pub upper: Option<Vec<u8>>,
    pub limit: usize,
}

/// A notification config; `config` is the caller's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationRecord {
    pub bucket: String,
    pub id: i64,
    pub config: String,
}

/// A message waiting in the notification outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub topic: String,
    pub attributes: BTreeMap<String, String>,
    pub data: Vec<u8>,
}

/// An outbox row (its id orders the outbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub message: OutboxMessage,
}

/// A resumable upload session. Its bytes are the blob whose id is `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub id: String,
    pub bucket: String,
    pub name: String,
    /// The caller's JSON.
    pub spec: String,
    pub total: Option<u64>,
    pub received: u64,
    /// The object resource (JSON) once the upload completed.
    pub done: Option<String>,
    pub created_us: i64,
}

/// What a transaction on one object found, for [`ObjectMutation`].
#[derive(Debug, Clone)]
pub struct ObjectState {
    /// The live object, if any.
    pub old: Option<ObjectRecord>,
    /// The bucket's notification configs, by id.
    pub notifications: Vec<NotificationRecord>,
    /// A new generation (strictly above every one handed out before, also
    /// across restarts and clock steps), when asked for.
    pub new_generation: Option<i64>,
}

/// What to write, decided inside the transaction.
#[derive(Debug, Clone, Default)]
pub struct ObjectPlan {
    /// `Some`: the object's new row (same bucket and name).
    pub put: Option<ObjectRecord>,
    /// Delete the live object (ignored when `put` is set).
    pub delete: bool,
    pub outbox: Vec<OutboxMessage>,
    /// Mark this upload session done with this resource JSON.
    pub finish_upload: Option<(String, String)>,
}

/// A refusal decided by the caller's callback, handed back untouched
/// (`pubrun-buckets` downcasts it to its error type).
pub type Reject = Box<dyn Any + Send>;

/// The decision callback of [`BucketStore::mutate_object`]: runs once, inside
/// the write transaction, after the reads and before any write.
pub type ObjectMutation = Box<dyn FnOnce(&ObjectState) -> Result<ObjectPlan, Reject> + Send>;

/// A change of object `name` in `bucket`, planned by `decide` (see
/// [`BucketStore::mutate_object`]); `new_generation` asks for a generation.
pub struct ObjectChange<'a> {
    pub bucket: &'a str,
    pub name: &'a str,
    pub new_generation: bool,
    pub decide: ObjectMutation,
}

/// The decision callback of [`BucketStore::update_bucket`].
pub type BucketMutation = Box<dyn FnOnce(BucketRecord) -> Result<BucketRecord, Reject> + Send>;

/// What [`BucketStore::mutate_object`] did.
#[derive(Debug, Clone)]
pub enum Mutated {
    /// The bucket does not exist; nothing written.
    NoBucket,
    /// Committed: the plan as applied, and the replaced/deleted row.
    Done {
        plan: Box<ObjectPlan>,
        old: Option<Box<ObjectRecord>>,
    },
}

/// What [`BucketStore::delete_bucket`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketDeleted {
    Missing,
    NotEmpty,
    /// Deleted with its notification configs and upload sessions (whose
    /// ids are returned; their bytes are gone too).
    Deleted(Vec<String>),
}

/// Bytes being written into a blob. Dropped without [`finish`], the bytes
/// written are left for [`BucketStore::sweep`] (or removed at once where the
/// engine can).
///
/// [`finish`]: BlobWriter::finish
#[async_trait::async_trait]
pub trait BlobWriter: Send {
    /// The blob's id.
    fn id(&self) -> &str;
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError>;
    /// Makes every byte written durable; returns the blob's length.
    async fn finish(self: Box<Self>) -> Result<u64, StoreError>;
}

/// A blob's bytes from some offset on.
pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

/// 32 lowercase hex characters: the only strings used as blob ids (and
/// turned into file names by the embedded engine).
pub fn is_blob_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Runs the caller's decision on `state`; a row it plans must still be the
/// object asked for and name a blob id (both engines write it as given).
pub(crate) fn checked_plan(
    decide: ObjectMutation,
    state: &ObjectState,
    bucket: &str,
    name: &str,
) -> Result<Result<ObjectPlan, Reject>, StoreError> {
    let plan = match decide(state) {
        Ok(p) => p,
        Err(r) => return Ok(Err(r)),
    };
    if let Some(o) = &plan.put {
        if o.bucket != bucket || o.name != name || !is_blob_id(&o.blob) {
            return Err(StoreError::Config(
                "a planned object row must keep its bucket, name and a blob id".into(),
            ));
        }
    }
    Ok(Ok(plan))
}

/// A fresh random blob (or upload) id.
pub fn new_blob_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub(crate) fn bad_blob_id(id: &str) -> StoreError {
    StoreError::Config(format!("blob id {id:?} is not 32 hex characters"))
}

/// Bucket metadata, objects, notification configs, the notification
/// outbox, resumable upload sessions and object bytes. Every write is one
/// transaction; errors are [`StoreError`]s (`Unavailable` for a database
/// fault, `Fenced` when another server took the ownership lease, `Corrupt`
/// for a row that does not parse).
#[async_trait::async_trait]
pub trait BucketStore: Send + Sync + 'static {
    // ---- buckets ----
    /// Inserts the bucket unless one of that name exists; whether it did.
    async fn create_bucket(&self, b: &BucketRecord) -> Result<bool, StoreError>;
    async fn get_bucket(&self, name: &str) -> Result<Option<BucketRecord>, StoreError>;
    /// Read-modify-write of a bucket in one transaction; `Ok(None)`: no such bucket.
    async fn update_bucket(
        &self,
        name: &str,
        f: BucketMutation,
    ) -> Result<Option<Result<BucketRecord, Reject>>, StoreError>;
    async fn list_buckets(&self, page: BucketPage) -> Result<Vec<BucketRecord>, StoreError>;
    /// Deletes an empty bucket with its notification configs and uploads.
    async fn delete_bucket(&self, name: &str) -> Result<BucketDeleted, StoreError>;

    // ---- objects ----
    async fn get_object(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<ObjectRecord>, StoreError>;
    async fn scan_objects(&self, range: ObjectRange) -> Result<Vec<ObjectRecord>, StoreError>;
    /// Reads the live object and the bucket's notification configs, lets
    /// `decide` plan the change, and commits the plan in the same
    /// transaction (see the module docs). A planned row's blob must have
    /// been finished; the replaced or deleted row's blob is released. When
    /// `decide` refuses, nothing is written and the refusal is returned.
    async fn mutate_object(
        &self,
        change: ObjectChange<'_>,
    ) -> Result<Result<Mutated, Reject>, StoreError>;

    // ---- notification configs ----
    async fn notifications(&self, bucket: &str) -> Result<Vec<NotificationRecord>, StoreError>;
    /// Adds a config with a new id (unique across buckets) unless the bucket
    /// is missing (`Ok(None)`) or already has `max` configs (`Ok(Some(Err(count)))`).
    /// `make(id)` returns the config JSON.
    async fn add_notification(
        &self,
        bucket: &str,
        max: usize,
        make: Box<dyn FnOnce(i64) -> String + Send>,
    ) -> Result<Option<Result<NotificationRecord, usize>>, StoreError>;
    /// Whether it existed.
    async fn delete_notification(&self, bucket: &str, id: i64) -> Result<bool, StoreError>;

    // ---- outbox ----
    /// The oldest `limit` messages not yet published, in commit order.
    async fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError>;
    async fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError>;
    async fn outbox_len(&self) -> Result<i64, StoreError>;

    // ---- resumable uploads ----
    async fn insert_upload(&self, u: &UploadRecord) -> Result<(), StoreError>;
    async fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError>;
    async fn set_upload_progress(
        &self,
        id: &str,
        received: u64,
        total: Option<u64>,
    ) -> Result<(), StoreError>;
    /// Deletes the session and its bytes (unless an object took them);
    /// whether it existed.
    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError>;
    /// Deletes sessions created before `before_us` with their bytes; their ids.
    async fn expire_uploads(&self, before_us: i64) -> Result<Vec<String>, StoreError>;

    // ---- blobs ----
    /// A writer of a new blob (`append_to = None`) or appending to the
    /// upload blob `id` after its first `at` bytes (later bytes dropped at
    /// once; in PostgreSQL that cut is a fenced write).
    async fn blob_writer(
        &self,
        append_to: Option<(&str, u64)>,
    ) -> Result<Box<dyn BlobWriter>, StoreError>;
    /// Streams a blob from byte `start`; `Ok(None)`: no such blob (it was
    /// replaced since the object row was read).
    async fn read_blob(&self, id: &str, start: u64) -> Result<Option<BlobReader>, StoreError>;
    /// A new blob with the bytes of `src`; `Ok(None)` when `src` is gone.
    async fn copy_blob(&self, src: &str) -> Result<Option<String>, StoreError>;
    /// Removes a blob no row refers to (a write whose commit was refused).
    async fn discard_blob(&self, id: &str) -> Result<(), StoreError>;
    /// Removes blobs that no object or live upload refers to and that are
    /// older than `min_age_us` (writers still streaming are younger);
    /// returns how many.
    async fn sweep(&self, min_age_us: i64) -> Result<u64, StoreError>;
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
