//! The operations behind the HTTP API, usable from Rust as well.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use pubrun_core::{Code, TopicName};
use pubrun_store::buckets::{
    BlobReader, BucketDeleted, BucketPage, Mutated, ObjectChange, ObjectPlan, ObjectRange, Reject,
};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::blob::{BlobWriter, TempBlob};
use crate::conditions::Conditions;
use crate::db::{notification_from, object_from, object_to};
use crate::error::{GcsError, GcsResult};
use crate::hash::{Digests, Expected};
use crate::model::{
    now_us, patch_string_map, BucketRow, NotificationConfig, ObjectMeta, ObjectResource, ObjectRow,
    EVENT_TYPES,
};
use crate::names::{shorten, validate_bucket_name, validate_object_name};
use crate::notify::{self, Event};
use crate::Buckets;

/// Where the bytes of a new object generation come from.
pub(crate) enum Source {
    /// A finished new blob (simple/multipart upload, compose, Rust API).
    Temp(TempBlob),
    /// The bytes of a resumable upload session (the blob named like it).
    Upload(String, Digests),
    /// The bytes of an existing blob (copy, rewrite).
    Duplicate(String, Digests),
}

pub(crate) struct Write {
    pub bucket: String,
    pub name: String,
    pub source: Source,
    pub meta: ObjectMeta,
    pub component_count: Option<i64>,
    pub conds: Conditions,
    pub base: String,
    /// A resumable session this write completes (marked done in the same commit).
    pub upload_id: Option<String>,
}

/// Reason used internally when a copy source vanished under us (retried).
const SOURCE_CHANGED: &str = "sourceChanged";

#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub page_token: Option<String>,
    /// 0 means the default (1000).
    pub max_results: usize,
    pub start_offset: Option<String>,
    pub end_offset: Option<String>,
    pub include_trailing_delimiter: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub items: Vec<ObjectRow>,
    pub prefixes: Vec<String>,
    pub next_page_token: Option<String>,
}

/// A notification config as a client asks for it.
#[derive(Debug, Clone, Default)]
pub struct NotificationSpec {
    /// `//pubsub.googleapis.com/projects/P/topics/T` or `projects/P/topics/T`.
    pub topic: String,
    /// `JSON_API_V1` (default) or `NONE`.
    pub payload_format: Option<String>,
    pub event_types: Vec<String>,
    pub object_name_prefix: String,
    pub custom_attributes: BTreeMap<String, String>,
}

pub(crate) struct ComposeSource {
    pub name: String,
    pub generation: Option<i64>,
    pub if_generation_match: Option<i64>,
}

fn live(o: &Option<ObjectRow>) -> Option<(i64, i64)> {
    o.as_ref().map(|o| (o.generation, o.metageneration))
}

/// A refusal decided inside a store transaction.
fn reject(e: GcsError) -> Reject {
    Box::new(e)
}

/// The error a transaction callback refused with.
fn rejected(r: Reject) -> GcsError {
    match r.downcast::<GcsError>() {
        Ok(e) => *e,
        Err(_) => GcsError::internal("a bucket transaction was refused for an unknown reason"),
    }
}

/// The live object and the bucket's notification configs, as the
/// transaction of a change found them.
fn parse_state(
    st: &pubrun_store::buckets::ObjectState,
) -> GcsResult<(Option<ObjectRow>, Vec<NotificationConfig>)> {
    let old = st.old.clone().map(object_from).transpose()?;
    let configs = st
        .notifications
        .iter()
        .map(notification_from)
        .collect::<GcsResult<Vec<_>>>()?;
    Ok((old, configs))
}

impl Buckets {
    // ---------------------------------------------------------------- buckets

    pub async fn create_bucket(
        &self,
        name: &str,
        project: &str,
        location: Option<String>,
        storage_class: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> GcsResult<BucketRow> {
        validate_bucket_name(name)?;
        if project.is_empty() {
            return Err(GcsError::required("Required parameter: project"));
        }
        let now = now_us();
        let row = BucketRow {
            name: name.to_string(),
            project: project.to_string(),
            created_us: now,
            updated_us: now,
            metageneration: 1,
            location: location.unwrap_or_else(|| "US".into()).to_ascii_uppercase(),
            storage_class: storage_class
                .unwrap_or_else(|| "STANDARD".into())
                .to_ascii_uppercase(),
            labels,
        };
        if !self.store().create_bucket(&row).await? {
            return Err(GcsError::conflict(format!(
                "Your previous request to create the named bucket succeeded and you already own it: {}",
                row.name
            )));
        }
        Ok(row)
    }

    /// Creates the bucket unless it exists (for manifests).
    pub async fn ensure_bucket(&self, name: &str, project: &str) -> GcsResult<BucketRow> {
        match self.get_bucket(name).await {
            Ok(b) => Ok(b),
            Err(e) if e.status == 404 => match self
                .create_bucket(name, project, None, None, BTreeMap::new())
                .await
            {
                Err(e) if e.status == 409 => self.get_bucket(name).await,
                r => r,
            },
            Err(e) => Err(e),
        }
    }

    pub async fn get_bucket(&self, name: &str) -> GcsResult<BucketRow> {
        self.store()
            .get_bucket(name)
            .await?
            .ok_or_else(|| GcsError::no_bucket(name))
    }

    /// One page of buckets; `project = None` lists every project's.
    pub async fn list_buckets(
        &self,
        project: Option<String>,
        prefix: String,
        page_token: Option<String>,
        max_results: usize,
    ) -> GcsResult<(Vec<BucketRow>, Option<String>)> {
        let max = if max_results == 0 {
            1000
        } else {
            max_results.min(1000)
        };
        let after = match page_token.filter(|t| !t.is_empty()) {
            Some(t) => String::from_utf8(
                B64URL
                    .decode(&t)
                    .map_err(|_| GcsError::invalid("Invalid pageToken"))?,
            )
            .map_err(|_| GcsError::invalid("Invalid pageToken"))?,
            None => String::new(),
        };
        let mut rows: Vec<BucketRow> = self
            .store()
            .list_buckets(BucketPage {
                project,
                prefix,
                after,
                limit: max + 1,
            })
            .await?;
        let next = if rows.len() > max {
            rows.truncate(max);
            Some(B64URL.encode(rows[max - 1].name.as_bytes()))
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Deletes an empty bucket (409 when objects remain).
    pub async fn delete_bucket(&self, name: &str) -> GcsResult<()> {
        match self.store().delete_bucket(name).await? {
            BucketDeleted::Missing => Err(GcsError::no_bucket(name)),
            BucketDeleted::NotEmpty => Err(GcsError::conflict(format!(
                "The bucket you tried to delete is not empty: {name}"
            ))),
            BucketDeleted::Deleted(uploads) => {
                for id in uploads {
                    self.forget_session(&id);
                }
                Ok(())
            }
        }
    }

    /// PATCH of a bucket: only `labels` (merged; `null` values remove) is writable here.
    pub async fn patch_bucket(
        &self,
        name: &str,
        body: Map<String, Value>,
        replace: bool,
    ) -> GcsResult<BucketRow> {
        let patch = move |mut b: BucketRow| -> GcsResult<BucketRow> {
            match body.get("labels") {
                None => {
                    if replace {
                        b.labels.clear()
                    }
                }
                Some(Value::Null) => b.labels.clear(),
                Some(Value::Object(m)) => {
                    if replace {
                        b.labels.clear();
                    }
                    patch_string_map(&mut b.labels, m, |k, v| match v {
                        Value::String(s) => Ok(s.clone()),
                        other => Err(GcsError::invalid(format!(
                            "Invalid label value for '{k}': {other}"
                        ))),
                    })?;
                }
                Some(other) => {
                    return Err(GcsError::invalid(format!(
                        "Invalid value for field 'labels': {other}"
                    )))
                }
            }
            b.metageneration += 1;
            b.updated_us = now_us();
            Ok(b)
        };
        match self
            .store()
            .update_bucket(name, Box::new(move |r| patch(r).map_err(reject)))
            .await?
        {
            None => Err(GcsError::no_bucket(name)),
            Some(Err(r)) => Err(rejected(r)),
            Some(Ok(b)) => Ok(b),
        }
    }

    // ---------------------------------------------------------------- objects

    /// Commits a new generation of an object: installs its blob, checks the
    /// preconditions against the live object, writes the index row and the
    /// notification events in one transaction, then removes the replaced blob.
    pub(crate) async fn commit(&self, w: Write) -> GcsResult<ObjectRow> {
        let store = self.inner.store.clone();
        // `temp` discards the new blob on every early return.
        let (temp, digests, blob_id) = match w.source {
            Source::Temp(t) => {
                let (d, id) = (t.digests, t.id().to_string());
                (Some(t), d, id)
            }
            Source::Upload(id, d) => (None, d, id),
            Source::Duplicate(src, d) => match store.copy_blob(&src).await? {
                Some(id) => (Some(TempBlob::adopt(store.clone(), id.clone(), d)), d, id),
                None => {
                    return Err(GcsError::new(
                        404,
                        SOURCE_CHANGED,
                        "the source object changed during the copy",
                    ))
                }
            },
        };
        let (bucket, name) = (w.bucket.clone(), w.name.clone());
        let decide = move |st: &pubrun_store::buckets::ObjectState| -> GcsResult<ObjectPlan> {
            let (old, configs) = parse_state(st)?;
            w.conds.check(live(&old), false)?;
            let generation = st
                .new_generation
                .ok_or_else(|| GcsError::internal("no generation was allocated"))?;
            let now = now_us();
            let row = ObjectRow {
                bucket: w.bucket.clone(),
                name: w.name.clone(),
                generation,
                metageneration: 1,
                size: digests.size,
                blob: blob_id,
                md5: digests.md5,
                crc32c: digests.crc32c,
                component_count: w.component_count,
                meta: w.meta,
                created_us: now,
                updated_us: now,
            };
            let mut events = vec![Event {
                kind: notify::FINALIZE,
                object: &row,
                overwrote_generation: old.as_ref().map(|o| o.generation),
                overwritten_by_generation: None,
                time_us: now,
            }];
            if let Some(o) = &old {
                events.push(Event {
                    kind: notify::DELETE,
                    object: o,
                    overwrote_generation: None,
                    overwritten_by_generation: Some(generation),
                    time_us: now,
                });
            }
            let outbox = notify::outbox_for(&configs, &events, &w.base);
            drop(events);
            let finish_upload = w
                .upload_id
                .as_ref()
                .map(|u| (u.clone(), row.to_json(&w.base).to_string()));
            Ok(ObjectPlan {
                put: Some(object_to(&row)?),
                delete: false,
                outbox,
                finish_upload,
            })
        };
        let res = store
            .mutate_object(ObjectChange {
                bucket: &bucket,
                name: &name,
                new_generation: true,
                decide: Box::new(move |st| decide(st).map_err(reject)),
            })
            .await?;
        let plan = match res {
            Err(r) => return Err(rejected(r)),
            Ok(Mutated::NoBucket) => return Err(GcsError::no_bucket(&bucket)),
            Ok(Mutated::Done { plan, .. }) => plan,
        };
        if let Some(t) = temp {
            t.take_id(); // now named by the object
        }
        if !plan.outbox.is_empty() {
            notify::wake(&self.inner);
        }
        object_from(
            plan.put
                .ok_or_else(|| GcsError::internal("a committed write without its row"))?,
        )
    }

    /// Fails fast (before receiving a body) when the bucket is missing or a
    /// precondition already fails. The commit checks again.
    pub(crate) async fn precheck_write(
        &self,
        bucket: &str,
        name: &str,
        conds: Conditions,
    ) -> GcsResult<()> {
        if self.store().get_bucket(bucket).await?.is_none() {
            return Err(GcsError::no_bucket(bucket));
        }
        if !conds.is_empty() {
            let old = self.store().get_object(bucket, name).await?;
            conds.check(live(&old.map(object_from).transpose()?), false)?;
        }
        Ok(())
    }

    /// Writes an object from a reader (Rust API; job outputs).
    pub async fn put_object<R: AsyncRead + Unpin>(
        &self,
        bucket: &str,
        name: &str,
        mut reader: R,
        meta: ObjectMeta,
        conds: Conditions,
    ) -> GcsResult<ObjectRow> {
        validate_object_name(name)?;
        self.precheck_write(bucket, name, conds).await?;
        let mut w = BlobWriter::new(self.inner.store.clone()).await?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]).await?;
        }
        let temp = w.finish().await?;
        self.commit(Write {
            bucket: bucket.into(),
            name: name.into(),
            source: Source::Temp(temp),
            meta,
            component_count: None,
            conds,
            base: self.base_url(),
            upload_id: None,
        })
        .await
    }

    /// The live object's metadata. `generation` other than the live one is 404
    /// (no versioning). Failing "not match" conditions are 304.
    pub async fn get_object(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
    ) -> GcsResult<ObjectRow> {
        if self.store().get_bucket(bucket).await?.is_none() {
            return Err(GcsError::no_bucket(bucket));
        }
        let o = self
            .store()
            .get_object(bucket, name)
            .await?
            .map(object_from)
            .transpose()?
            .ok_or_else(|| GcsError::no_object(bucket, name))?;
        if generation.is_some_and(|g| g != o.generation) {
            return Err(GcsError::no_object(bucket, name));
        }
        conds.check(Some((o.generation, o.metageneration)), true)?;
        Ok(o)
    }

    /// The live object and a stream of its bytes. With the embedded engine
    /// the bytes stay readable even if the object is replaced meanwhile; in
    /// PostgreSQL such a read fails rather than return a mix.
    pub async fn open_object(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
    ) -> GcsResult<(ObjectRow, BlobReader)> {
        self.open_object_at(bucket, name, generation, conds, |_| Ok(Some(0)))
            .await
            .map(|(row, r)| (row, r.expect("always opened")))
    }

    /// [`open_object`](Self::open_object) from the byte `start(&row)` says;
    /// `None` from it: only the row (no bytes wanted).
    pub(crate) async fn open_object_at(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
        start: impl Fn(&ObjectRow) -> GcsResult<Option<u64>>,
    ) -> GcsResult<(ObjectRow, Option<BlobReader>)> {
        for _ in 0..5 {
            let row = self.get_object(bucket, name, generation, conds).await?;
            let Some(from) = start(&row)? else {
                return Ok((row, None));
            };
            match self.store().read_blob(&row.blob, from).await? {
                Some(r) => return Ok((row, Some(r))),
                // Replaced between the lookup and the open: look again.
                None => continue,
            }
        }
        Err(GcsError::unavailable(format!(
            "object {bucket}/{name} kept changing while being opened; retry"
        )))
    }

    /// PATCH (`replace = false`) or PUT (`replace = true`) of an object's metadata.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_object(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
        body: Map<String, Value>,
        replace: bool,
        base: String,
    ) -> GcsResult<ObjectRow> {
        let (b, n) = (bucket.to_string(), name.to_string());
        let decide = move |st: &pubrun_store::buckets::ObjectState| -> GcsResult<ObjectPlan> {
            let (old, configs) = parse_state(st)?;
            let mut o = old.ok_or_else(|| GcsError::no_object(&b, &n))?;
            if generation.is_some_and(|g| g != o.generation) {
                return Err(GcsError::no_object(&b, &n));
            }
            conds.check(Some((o.generation, o.metageneration)), false)?;
            if replace {
                o.meta = ObjectMeta::from_resource(&body)?;
            } else {
                o.meta.patch(&body)?;
            }
            o.metageneration += 1;
            o.updated_us = now_us().max(o.updated_us);
            let ev = Event {
                kind: notify::METADATA_UPDATE,
                object: &o,
                overwrote_generation: None,
                overwritten_by_generation: None,
                time_us: o.updated_us,
            };
            let outbox = notify::outbox_for(&configs, &[ev], &base);
            Ok(ObjectPlan {
                put: Some(object_to(&o)?),
                delete: false,
                outbox,
                finish_upload: None,
            })
        };
        let plan = self.mutate(bucket, name, false, decide).await?;
        object_from(
            plan.put
                .ok_or_else(|| GcsError::internal("a committed update without its row"))?,
        )
    }

    /// Runs `decide` in a store transaction on one object and commits its
    /// plan; wakes the notification publisher when it stored events.
    async fn mutate(
        &self,
        bucket: &str,
        name: &str,
        new_generation: bool,
        decide: impl FnOnce(&pubrun_store::buckets::ObjectState) -> GcsResult<ObjectPlan>
            + Send
            + 'static,
    ) -> GcsResult<ObjectPlan> {
        let res = self
            .store()
            .mutate_object(ObjectChange {
                bucket,
                name,
                new_generation,
                decide: Box::new(move |st| decide(st).map_err(reject)),
            })
            .await?;
        match res {
            Err(r) => Err(rejected(r)),
            Ok(Mutated::NoBucket) => Err(GcsError::no_bucket(bucket)),
            Ok(Mutated::Done { plan, .. }) => {
                if !plan.outbox.is_empty() {
                    notify::wake(&self.inner);
                }
                Ok(*plan)
            }
        }
    }

    pub async fn delete_object(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
        base: String,
    ) -> GcsResult<()> {
        let (b, n) = (bucket.to_string(), name.to_string());
        let decide = move |st: &pubrun_store::buckets::ObjectState| -> GcsResult<ObjectPlan> {
            let (old, configs) = parse_state(st)?;
            let o = old.ok_or_else(|| GcsError::no_object(&b, &n))?;
            if generation.is_some_and(|g| g != o.generation) {
                return Err(GcsError::no_object(&b, &n));
            }
            conds.check(Some((o.generation, o.metageneration)), false)?;
            let ev = Event {
                kind: notify::DELETE,
                object: &o,
                overwrote_generation: None,
                overwritten_by_generation: None,
                time_us: now_us(),
            };
            Ok(ObjectPlan {
                put: None,
                delete: true,
                outbox: notify::outbox_for(&configs, &[ev], &base),
                finish_upload: None,
            })
        };
        self.mutate(bucket, name, false, decide).await?;
        Ok(())
    }

    /// One page of a listing, Cloud Storage style: names in byte order,
    /// `prefixes` for names with `delimiter` after `prefix`; `max_results`
    /// counts items and prefixes together.
    pub async fn list_objects(&self, bucket: &str, p: ListParams) -> GcsResult<ListPage> {
        let bucket = bucket.to_string();
        let max = if p.max_results == 0 {
            1000
        } else {
            p.max_results.min(1000)
        };
        let prefix = p.prefix.as_bytes().to_vec();
        let mut lower = prefix.clone();
        if let Some(so) = &p.start_offset {
            lower = lower.max(so.as_bytes().to_vec());
        }
        if let Some(t) = p.page_token.as_ref().filter(|t| !t.is_empty()) {
            let t = B64URL
                .decode(t)
                .map_err(|_| GcsError::invalid(format!("Invalid pageToken '{}'", shorten(t))))?;
            lower = lower.max(t);
        }
        let mut upper: Option<Vec<u8>> = if prefix.is_empty() {
            None
        } else {
            let mut u = prefix.clone();
            u.push(0xFF); // no UTF-8 name contains 0xFF: everything starting with `prefix` is below
            Some(u)
        };
        if let Some(eo) = p.end_offset.as_ref().filter(|e| !e.is_empty()) {
            let eo = eo.as_bytes().to_vec();
            upper = Some(match upper {
                Some(u) => u.min(eo),
                None => eo,
            });
        }
        let delim = p
            .delimiter
            .clone()
            .filter(|d| !d.is_empty())
            .map(String::into_bytes);
        let trailing = p.include_trailing_delimiter;
        {
            if self.store().get_bucket(&bucket).await?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            let mut page = ListPage::default();
            let mut count = 0usize;
            let mut more = false;
            'scan: loop {
                let batch = (max - count + 1).min(1001);
                let rows = self
                    .store()
                    .scan_objects(ObjectRange {
                        bucket: bucket.clone(),
                        lower: lower.clone(),
                        upper: upper.clone(),
                        limit: batch,
                    })
                    .await?;
                let n = rows.len();
                for row in rows {
                    let row = object_from(row)?;
                    if count >= max {
                        more = true;
                        break 'scan;
                    }
                    let name = row.name.as_bytes();
                    if let Some(d) = &delim {
                        if let Some(pos) = memchr::memmem::find(&name[prefix.len()..], d) {
                            let end = prefix.len() + pos + d.len();
                            let p = name[..end].to_vec();
                            page.prefixes.push(String::from_utf8_lossy(&p).into_owned());
                            count += 1;
                            if trailing && end == name.len() {
                                page.items.push(row);
                            }
                            lower = p;
                            lower.push(0xFF);
                            continue 'scan;
                        }
                    }
                    lower = name.to_vec();
                    lower.push(0); // the smallest name after this one
                    page.items.push(row);
                    count += 1;
                }
                if n < batch {
                    break;
                }
            }
            if more {
                page.next_page_token = Some(B64URL.encode(&lower));
            }
            Ok(page)
        }
    }

    /// Every object under `prefix` (all pages).
    pub async fn list_all_objects(&self, bucket: &str, prefix: &str) -> GcsResult<Vec<ObjectRow>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .list_objects(
                    bucket,
                    ListParams {
                        prefix: prefix.into(),
                        page_token: token,
                        ..Default::default()
                    },
                )
                .await?;
            out.extend(page.items);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// copy / rewrite: the destination gets the source's bytes (shared, not
    /// re-read) and its metadata, overridden by fields present in `body`.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_object(
        &self,
        src_bucket: &str,
        src_name: &str,
        src_generation: Option<i64>,
        src_conds: Conditions,
        dst_bucket: &str,
        dst_name: &str,
        dst_conds: Conditions,
        body: Option<Map<String, Value>>,
        base: String,
    ) -> GcsResult<ObjectRow> {
        validate_object_name(dst_name)?;
        for _ in 0..5 {
            let src = self
                .get_object(src_bucket, src_name, src_generation, Conditions::default())
                .await?;
            src_conds.check(Some((src.generation, src.metageneration)), false)?;
            let mut meta = src.meta.clone();
            if let Some(b) = &body {
                if b.contains_key("metadata") {
                    meta.metadata.clear();
                }
                meta.patch(b)?;
            }
            let digests = Digests {
                md5: src.md5,
                crc32c: src.crc32c,
                size: src.size,
            };
            let res = self
                .commit(Write {
                    bucket: dst_bucket.into(),
                    name: dst_name.into(),
                    source: Source::Duplicate(src.blob.clone(), digests),
                    meta,
                    component_count: src.component_count,
                    conds: dst_conds,
                    base: base.clone(),
                    upload_id: None,
                })
                .await;
            match res {
                Err(e) if e.reason == SOURCE_CHANGED => continue,
                r => return r,
            }
        }
        Err(GcsError::unavailable(format!(
            "source {src_bucket}/{src_name} kept changing during the copy; retry"
        )))
    }

    /// compose: concatenates up to 32 objects of one bucket into `dst`.
    /// As in Cloud Storage, composite objects have a CRC32C but no MD5.
    pub(crate) async fn compose(
        &self,
        bucket: &str,
        dst: &str,
        sources: Vec<ComposeSource>,
        dest: Map<String, Value>,
        conds: Conditions,
        base: String,
    ) -> GcsResult<ObjectRow> {
        validate_object_name(dst)?;
        if sources.is_empty() {
            return Err(GcsError::required(
                "Required field: sourceObjects (at least one source object)",
            ));
        }
        if sources.len() > 32 {
            return Err(GcsError::invalid(format!(
                "The number of source components provided ({}) exceeds the maximum (32)",
                sources.len()
            )));
        }
        let meta = ObjectMeta::from_resource(&dest)?;
        let expected = crate::model::expected_from_resource(&dest)?;
        if expected.md5.is_some() {
            return Err(GcsError::invalid(
                "md5Hash cannot be specified for a composite object; use crc32c",
            ));
        }
        self.precheck_write(bucket, dst, conds).await?;
        let mut opened = Vec::new();
        let mut components = 0i64;
        for s in &sources {
            validate_object_name(&s.name)?;
            let (row, file) = self
                .open_object(bucket, &s.name, s.generation, Conditions::default())
                .await?;
            if s.if_generation_match.is_some_and(|g| g != row.generation) {
                return Err(GcsError::precondition(
                    crate::conditions::PRECONDITION_FAILED,
                ));
            }
            components += row.component_count.unwrap_or(1);
            opened.push(file);
        }
        if components > 1024 {
            return Err(GcsError::invalid(format!(
                "The composite object would have {components} components; the limit is 1024"
            )));
        }
        let mut w = BlobWriter::new(self.inner.store.clone()).await?;
        let mut buf = vec![0u8; 256 * 1024];
        for mut f in opened {
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                w.write(&buf[..n]).await?;
            }
        }
        let mut temp = w.finish().await?;
        temp.digests.md5 = None;
        Expected {
            md5: None,
            crc32c: expected.crc32c,
        }
        .verify(&temp.digests)?;
        self.commit(Write {
            bucket: bucket.into(),
            name: dst.into(),
            source: Source::Temp(temp),
            meta,
            component_count: Some(components),
            conds,
            base,
            upload_id: None,
        })
        .await
    }

    // ---------------------------------------------------------- notifications

    pub async fn create_notification(
        &self,
        bucket: &str,
        spec: NotificationSpec,
    ) -> GcsResult<NotificationConfig> {
        let full = spec.topic.trim();
        let short = full
            .strip_prefix("//pubsub.googleapis.com/")
            .unwrap_or(full);
        let topic = TopicName::parse(short).map_err(|e| {
            GcsError::invalid(format!(
                "Invalid Cloud Pub/Sub topic '{full}': {}. It should look like \
                 '//pubsub.googleapis.com/projects/PROJECT/topics/TOPIC'",
                e.message
            ))
        })?;
        match self.inner.broker.get_topic(&topic) {
            Ok(_) => {}
            Err(e) if e.code == Code::NotFound => {
                return Err(GcsError::not_found(format!(
                    "Cloud Pub/Sub topic '{topic}' not found: create the topic before the notification config"
                )))
            }
            Err(e) => return Err(GcsError::unavailable(e.message)),
        }
        let payload_format = spec
            .payload_format
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "JSON_API_V1".into());
        if payload_format != "JSON_API_V1" && payload_format != "NONE" {
            return Err(GcsError::invalid(format!(
                "Invalid payload_format '{payload_format}': use JSON_API_V1 or NONE"
            )));
        }
        for e in &spec.event_types {
            if !EVENT_TYPES.contains(&e.as_str()) {
                return Err(GcsError::invalid(format!(
                    "Invalid event type '{e}': use one of {}",
                    EVENT_TYPES.join(", ")
                )));
            }
        }
        if spec.custom_attributes.len() > 90 {
            return Err(GcsError::invalid(
                "At most 90 custom_attributes are allowed",
            ));
        }
        for (k, v) in &spec.custom_attributes {
            if k.is_empty() || k.len() > 256 || k.starts_with("goog") {
                return Err(GcsError::invalid(format!(
                    "Invalid custom attribute key '{}': must be 1 to 256 bytes and not start with 'goog'",
                    shorten(k)
                )));
            }
            if v.len() > 1024 {
                return Err(GcsError::invalid(format!(
                    "Custom attribute '{}' is longer than 1024 bytes",
                    shorten(k)
                )));
            }
        }
        let bucket = bucket.to_string();
        let mut cfg = NotificationConfig {
            id: 0,
            bucket: bucket.clone(),
            topic: topic.to_string(),
            payload_format,
            event_types: spec.event_types,
            object_name_prefix: spec.object_name_prefix,
            custom_attributes: spec.custom_attributes,
        };
        let template = cfg.clone();
        let added = self
            .store()
            .add_notification(
                &bucket,
                100,
                Box::new(move |id| {
                    let mut c = template;
                    c.id = id;
                    serde_json::to_string(&c).expect("a notification config serializes")
                }),
            )
            .await?;
        match added {
            None => Err(GcsError::no_bucket(&bucket)),
            Some(Err(_)) => Err(GcsError::invalid(
                "A bucket can have at most 100 notification configurations",
            )),
            Some(Ok(rec)) => {
                cfg.id = rec.id;
                Ok(cfg)
            }
        }
    }

    pub async fn list_notifications(&self, bucket: &str) -> GcsResult<Vec<NotificationConfig>> {
        if self.store().get_bucket(bucket).await?.is_none() {
            return Err(GcsError::no_bucket(bucket));
        }
        self.store()
            .notifications(bucket)
            .await?
            .iter()
            .map(notification_from)
            .collect()
    }

    pub async fn get_notification(&self, bucket: &str, id: &str) -> GcsResult<NotificationConfig> {
        let not_found =
            || GcsError::not_found(format!("No such notification config: {bucket}/{id}"));
        let n: i64 = id.parse().map_err(|_| not_found())?;
        self.list_notifications(bucket)
            .await?
            .into_iter()
            .find(|c| c.id == n)
            .ok_or_else(not_found)
    }

    pub async fn delete_notification(&self, bucket: &str, id: &str) -> GcsResult<()> {
        let msg = format!("No such notification config: {bucket}/{id}");
        let n: i64 = id.parse().map_err(|_| GcsError::not_found(msg.clone()))?;
        if self.store().get_bucket(bucket).await?.is_none() {
            return Err(GcsError::no_bucket(bucket));
        }
        if !self.store().delete_notification(bucket, n).await? {
            return Err(GcsError::not_found(msg));
        }
        Ok(())
    }

    /// Forgets a resumable session's in-memory state (its lock and hash).
    pub(crate) fn forget_session(&self, id: &str) {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}
