//! The operations behind the HTTP API, usable from Rust as well.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use pubrun_core::{Code, TopicName};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::blob::TempBlob;
use crate::conditions::Conditions;
use crate::db;
use crate::error::{GcsError, GcsResult};
use crate::hash::{Digests, Expected};
use crate::model::{now_us, BucketRow, NotificationConfig, ObjectMeta, ObjectRow, EVENT_TYPES};
use crate::names::{shorten, validate_bucket_name, validate_object_name};
use crate::notify::{self, Event};
use crate::Buckets;

/// Where the bytes of a new object generation come from.
pub(crate) enum Source {
    /// A finished temp file (simple/multipart upload, compose, Rust API).
    Temp(TempBlob),
    /// A finished resumable-upload file.
    File(PathBuf, Digests),
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
        self.db(move |c| {
            let tx = c.transaction()?;
            if db::get_bucket(&tx, &row.name)?.is_some() {
                return Err(GcsError::conflict(format!(
                    "Your previous request to create the named bucket succeeded and you already own it: {}",
                    row.name
                )));
            }
            db::put_bucket(&tx, &row)?;
            tx.commit()?;
            Ok(row)
        })
        .await
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
        let name = name.to_string();
        self.db(move |c| db::get_bucket(c, &name)?.ok_or_else(|| GcsError::no_bucket(&name)))
            .await
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
        self.db(move |c| {
            let mut rows = db::list_buckets(c, project.as_deref(), &prefix, &after, max + 1)?;
            let next = if rows.len() > max {
                rows.truncate(max);
                Some(B64URL.encode(rows[max - 1].name.as_bytes()))
            } else {
                None
            };
            Ok((rows, next))
        })
        .await
    }

    /// Deletes an empty bucket (409 when objects remain).
    pub async fn delete_bucket(&self, name: &str) -> GcsResult<()> {
        let name = name.to_string();
        let uploads = self
            .db(move |c| {
                let tx = c.transaction()?;
                if db::get_bucket(&tx, &name)?.is_none() {
                    return Err(GcsError::no_bucket(&name));
                }
                if !db::bucket_is_empty(&tx, &name)? {
                    return Err(GcsError::conflict(format!(
                        "The bucket you tried to delete is not empty: {name}"
                    )));
                }
                let uploads = db::delete_bucket(&tx, &name)?;
                tx.commit()?;
                Ok(uploads)
            })
            .await?;
        for id in uploads {
            self.drop_session_file(&id);
        }
        Ok(())
    }

    /// PATCH of a bucket: only `labels` (merged; `null` values remove) is writable here.
    pub async fn patch_bucket(
        &self,
        name: &str,
        body: Map<String, Value>,
        replace: bool,
    ) -> GcsResult<BucketRow> {
        let name = name.to_string();
        self.db(move |c| {
            let tx = c.transaction()?;
            let mut b = db::get_bucket(&tx, &name)?.ok_or_else(|| GcsError::no_bucket(&name))?;
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
                    for (k, v) in m {
                        match v {
                            Value::Null => {
                                b.labels.remove(k);
                            }
                            Value::String(s) => {
                                b.labels.insert(k.clone(), s.clone());
                            }
                            other => {
                                return Err(GcsError::invalid(format!(
                                    "Invalid label value for '{k}': {other}"
                                )))
                            }
                        }
                    }
                }
                Some(other) => {
                    return Err(GcsError::invalid(format!(
                        "Invalid value for field 'labels': {other}"
                    )))
                }
            }
            b.metageneration += 1;
            b.updated_us = now_us();
            db::put_bucket(&tx, &b)?;
            tx.commit()?;
            Ok(b)
        })
        .await
    }

    // ---------------------------------------------------------------- objects

    /// Commits a new generation of an object: installs its blob, checks the
    /// preconditions against the live object, writes the index row and the
    /// notification events in one transaction, then removes the replaced blob.
    pub(crate) async fn commit(&self, w: Write) -> GcsResult<ObjectRow> {
        let inner = self.inner.clone();
        let (row, events) =
            tokio::task::spawn_blocking(move || -> GcsResult<(ObjectRow, usize)> {
                let (blob_id, digests) = match w.source {
                    Source::Temp(t) => (inner.blobs.install(t.path())?, t.digests),
                    Source::File(p, d) => (inner.blobs.install(&p)?, d),
                    Source::Duplicate(b, d) => match inner.blobs.duplicate(&b) {
                        Ok(id) => (id, d),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            return Err(GcsError::new(
                                404,
                                SOURCE_CHANGED,
                                "the source object changed during the copy",
                            ))
                        }
                        Err(e) => return Err(e.into()),
                    },
                };
                let mut conn = inner.lock_db();
                let result = (|| -> GcsResult<(ObjectRow, Option<ObjectRow>, usize)> {
                    let tx = conn.transaction()?;
                    if db::get_bucket(&tx, &w.bucket)?.is_none() {
                        return Err(GcsError::no_bucket(&w.bucket));
                    }
                    let old = db::get_object(&tx, &w.bucket, &w.name)?;
                    w.conds.check(live(&old), false)?;
                    let generation = db::next_generation(&tx)?;
                    let now = now_us();
                    let row = ObjectRow {
                        bucket: w.bucket.clone(),
                        name: w.name.clone(),
                        generation,
                        metageneration: 1,
                        size: digests.size,
                        blob: blob_id.clone(),
                        md5: digests.md5,
                        crc32c: digests.crc32c,
                        component_count: w.component_count,
                        meta: w.meta.clone(),
                        created_us: now,
                        updated_us: now,
                    };
                    db::put_object(&tx, &row)?;
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
                    let n = notify::enqueue(&tx, &w.bucket, &events, &w.base)?;
                    drop(events);
                    if let Some(u) = &w.upload_id {
                        db::finish_upload(&tx, u, &row.to_json(&w.base).to_string())?;
                    }
                    tx.commit()?;
                    Ok((row, old, n))
                })();
                drop(conn);
                match result {
                    Err(e) => {
                        inner.blobs.remove(&blob_id);
                        Err(e)
                    }
                    Ok((row, old, n)) => {
                        if let Some(o) = old {
                            inner.blobs.remove(&o.blob);
                        }
                        Ok((row, n))
                    }
                }
            })
            .await
            .map_err(|e| GcsError::internal(format!("commit task failed: {e}")))??;
        if events > 0 {
            notify::wake(&self.inner);
        }
        Ok(row)
    }

    /// Fails fast (before receiving a body) when the bucket is missing or a
    /// precondition already fails. The commit checks again.
    pub(crate) async fn precheck_write(
        &self,
        bucket: &str,
        name: &str,
        conds: Conditions,
    ) -> GcsResult<()> {
        let (bucket, name) = (bucket.to_string(), name.to_string());
        self.db(move |c| {
            if db::get_bucket(c, &bucket)?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            if !conds.is_empty() {
                conds.check(live(&db::get_object(c, &bucket, &name)?), false)?;
            }
            Ok(())
        })
        .await
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
        let mut w = self.inner.blobs.writer().await?;
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
        let (bucket, name) = (bucket.to_string(), name.to_string());
        self.db(move |c| {
            if db::get_bucket(c, &bucket)?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            let o = db::get_object(c, &bucket, &name)?
                .ok_or_else(|| GcsError::no_object(&bucket, &name))?;
            if generation.is_some_and(|g| g != o.generation) {
                return Err(GcsError::no_object(&bucket, &name));
            }
            conds.check(Some((o.generation, o.metageneration)), true)?;
            Ok(o)
        })
        .await
    }

    /// The live object and an open handle on its bytes (which stay readable
    /// even if the object is replaced meanwhile).
    pub async fn open_object(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
    ) -> GcsResult<(ObjectRow, tokio::fs::File)> {
        for _ in 0..5 {
            let row = self.get_object(bucket, name, generation, conds).await?;
            match tokio::fs::File::open(self.inner.blobs.blob_path(&row.blob)).await {
                Ok(f) => return Ok((row, f)),
                // Replaced between the lookup and the open: look again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
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
        let (bucket, name) = (bucket.to_string(), name.to_string());
        let (row, events) = self
            .db(move |c| {
                let tx = c.transaction()?;
                if db::get_bucket(&tx, &bucket)?.is_none() {
                    return Err(GcsError::no_bucket(&bucket));
                }
                let mut o = db::get_object(&tx, &bucket, &name)?
                    .ok_or_else(|| GcsError::no_object(&bucket, &name))?;
                if generation.is_some_and(|g| g != o.generation) {
                    return Err(GcsError::no_object(&bucket, &name));
                }
                conds.check(Some((o.generation, o.metageneration)), false)?;
                if replace {
                    o.meta = ObjectMeta::from_resource(&body)?;
                } else {
                    o.meta.patch(&body)?;
                }
                o.metageneration += 1;
                o.updated_us = now_us().max(o.updated_us);
                db::put_object(&tx, &o)?;
                let ev = Event {
                    kind: notify::METADATA_UPDATE,
                    object: &o,
                    overwrote_generation: None,
                    overwritten_by_generation: None,
                    time_us: o.updated_us,
                };
                let n = notify::enqueue(&tx, &bucket, &[ev], &base)?;
                tx.commit()?;
                Ok((o, n))
            })
            .await?;
        if events > 0 {
            notify::wake(&self.inner);
        }
        Ok(row)
    }

    pub async fn delete_object(
        &self,
        bucket: &str,
        name: &str,
        generation: Option<i64>,
        conds: Conditions,
        base: String,
    ) -> GcsResult<()> {
        let (bucket, name) = (bucket.to_string(), name.to_string());
        let inner = self.inner.clone();
        let events = self
            .db(move |c| {
                let tx = c.transaction()?;
                if db::get_bucket(&tx, &bucket)?.is_none() {
                    return Err(GcsError::no_bucket(&bucket));
                }
                let o = db::get_object(&tx, &bucket, &name)?
                    .ok_or_else(|| GcsError::no_object(&bucket, &name))?;
                if generation.is_some_and(|g| g != o.generation) {
                    return Err(GcsError::no_object(&bucket, &name));
                }
                conds.check(Some((o.generation, o.metageneration)), false)?;
                db::delete_object(&tx, &bucket, &name)?;
                let ev = Event {
                    kind: notify::DELETE,
                    object: &o,
                    overwrote_generation: None,
                    overwritten_by_generation: None,
                    time_us: now_us(),
                };
                let n = notify::enqueue(&tx, &bucket, &[ev], &base)?;
                tx.commit()?;
                inner.blobs.remove(&o.blob);
                Ok(n)
            })
            .await?;
        if events > 0 {
            notify::wake(&self.inner);
        }
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
        self.db(move |c| {
            if db::get_bucket(c, &bucket)?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            let mut page = ListPage::default();
            let mut count = 0usize;
            let mut more = false;
            'scan: loop {
                let batch = (max - count + 1).min(1001);
                let rows = db::scan_objects(c, &bucket, &lower, upper.as_deref(), batch)?;
                let n = rows.len();
                for row in rows {
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
        })
        .await
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
        let mut w = self.inner.blobs.writer().await?;
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
        self.db(move |c| {
            let tx = c.transaction()?;
            if db::get_bucket(&tx, &bucket)?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            if db::notifications(&tx, &bucket)?.len() >= 100 {
                return Err(GcsError::invalid(
                    "A bucket can have at most 100 notification configurations",
                ));
            }
            cfg.id = db::next_notification_id(&tx)?;
            db::put_notification(&tx, &cfg)?;
            tx.commit()?;
            Ok(cfg)
        })
        .await
    }

    pub async fn list_notifications(&self, bucket: &str) -> GcsResult<Vec<NotificationConfig>> {
        let bucket = bucket.to_string();
        self.db(move |c| {
            if db::get_bucket(c, &bucket)?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            Ok(db::notifications(c, &bucket)?)
        })
        .await
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
        let bucket = bucket.to_string();
        self.db(move |c| {
            if db::get_bucket(c, &bucket)?.is_none() {
                return Err(GcsError::no_bucket(&bucket));
            }
            if !db::delete_notification(c, &bucket, n)? {
                return Err(GcsError::not_found(msg));
            }
            Ok(())
        })
        .await
    }

    pub(crate) fn drop_session_file(&self, id: &str) {
        if crate::blob::is_id(id) {
            let _ = std::fs::remove_file(self.inner.blobs.upload_path(id));
        }
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}
