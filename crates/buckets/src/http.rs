//! The HTTP surface: Cloud Storage JSON API v1 paths.
//!
//! Paths are parsed by hand from the raw (still percent-encoded) URI so that
//! an object name is exactly what the client encoded: `a%2Fb` is the name
//! `a/b`, and `..`, `%00` or unicode are just bytes of a name. An unencoded
//! `/` inside an object name is accepted too (the rest of the path is the name).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use percent_encoding::percent_decode_str;
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use crate::blob::{self, BlobWriter};
use crate::conditions::Conditions;
use crate::db::{self, UploadRow, UploadSpec};
use crate::error::{GcsError, GcsResult};
use crate::hash::{Expected, Hasher};
use crate::model::{
    enc, expected_from_resource, now_us, BucketResource, ObjectMeta, ObjectResource,
};
use crate::multipart::{self, BodyReader};
use crate::names::validate_object_name;
use crate::service::{ComposeSource, ListParams, NotificationSpec, Source, Write};
use crate::{Buckets, MAX_OBJECT_SIZE};

/// The router for every Cloud Storage path. It has no fallback, so it can be
/// merged into the server's router.
pub fn router(state: Buckets) -> Router {
    Router::new()
        .route("/storage/v1/b", any(buckets_root))
        .route("/storage/v1/b/", any(buckets_root))
        .route("/storage/v1/b/{*rest}", any(json_api))
        .route("/upload/storage/v1/b/{*rest}", any(upload_api))
        .route("/download/storage/v1/b/{*rest}", any(download_api))
        .with_state(state)
}

/// What every handler needs from the request line and headers.
struct Ctx {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    base: String,
}

impl Ctx {
    /// `base` is the server's public URL: links never come from the request's
    /// `Host` or `X-Forwarded-Proto`, which any client (or a DNS-rebinding
    /// page) controls.
    fn new(b: &Buckets, req: &Request) -> Self {
        let query = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        Ctx {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query,
            headers: req.headers().clone(),
            base: b.base_url(),
        }
    }

    fn q(&self, k: &str) -> Option<String> {
        self.query.get(k).cloned()
    }

    fn q_i64(&self, k: &str) -> GcsResult<Option<i64>> {
        match self.query.get(k).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                GcsError::invalid(format!(
                    "Invalid value for parameter '{k}': '{v}' is not an integer"
                ))
            }),
        }
    }

    fn q_bool(&self, k: &str) -> bool {
        self.query.get(k).is_some_and(|v| v == "true" || v == "1")
    }

    fn conds(&self, source: bool) -> GcsResult<Conditions> {
        Conditions::from_query(&|k| self.q(k), source)
    }

    fn header(&self, k: &str) -> Option<String> {
        self.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Checksums from `x-goog-hash` headers.
    fn goog_hash(&self) -> GcsResult<Expected> {
        let mut e = Expected::default();
        for v in self.headers.get_all("x-goog-hash") {
            let v = v
                .to_str()
                .map_err(|_| GcsError::invalid("x-goog-hash header is not ASCII"))?;
            e.add_goog_hash_header(v)?;
        }
        e.validate_format()?;
        Ok(e)
    }

    /// The path after `prefix`, split at `/` and percent-decoded.
    fn segments(&self, prefix: &str) -> GcsResult<Vec<String>> {
        let rest = self.path.strip_prefix(prefix).unwrap_or("");
        rest.split('/')
            .map(|s| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| {
                        GcsError::invalid(
                            "the request path is not valid UTF-8 after percent-decoding",
                        )
                    })
            })
            .collect()
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut resp = (status, v.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    resp
}

fn ok(v: Value) -> GcsResult<Response> {
    Ok(json_response(StatusCode::OK, &v))
}

fn no_content() -> GcsResult<Response> {
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn no_endpoint(ctx: &Ctx) -> GcsError {
    GcsError::not_found(format!(
        "no such Cloud Storage endpoint in pubrun: {} {}",
        ctx.method, ctx.path
    ))
}

fn finish(r: GcsResult<Response>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A JSON object body (empty body: empty object). Bounded at 16 MiB.
async fn read_json(body: Body) -> GcsResult<Map<String, Value>> {
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .map_err(|e| GcsError::bad_request(format!("reading the request body failed: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(GcsError::invalid("the request body must be a JSON object")),
        Err(e) => Err(GcsError::invalid(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

fn str_field(m: &Map<String, Value>, k: &str) -> GcsResult<Option<String>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(GcsError::invalid(format!(
            "Invalid value for field '{k}': {other}: expected a string"
        ))),
    }
}

fn int_field(v: Option<&Value>, what: &str) -> GcsResult<Option<i64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| GcsError::invalid(format!("Invalid {what}: {n}"))),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| GcsError::invalid(format!("Invalid {what}: '{s}'"))),
        Some(other) => Err(GcsError::invalid(format!("Invalid {what}: {other}"))),
    }
}

fn string_map(
    v: Option<&Value>,
    what: &str,
) -> GcsResult<std::collections::BTreeMap<String, String>> {
    match v {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(GcsError::invalid(format!(
                    "Invalid value in {what} for '{k}': {other}: expected a string"
                ))),
            })
            .collect(),
        Some(other) => Err(GcsError::invalid(format!(
            "Invalid {what}: {other}: expected an object"
        ))),
    }
}

// ------------------------------------------------------------------ buckets

async fn buckets_root(State(b): State<Buckets>, req: Request) -> Response {
    let ctx = Ctx::new(&b, &req);
    finish(buckets_root_inner(b, ctx, req.into_body()).await)
}

/// `project` as given; `<none>` and `_` (clients without a project) mean all.
fn project_filter(ctx: &Ctx) -> GcsResult<Option<String>> {
    match ctx.q("project") {
        None => Err(GcsError::required("Required parameter: project")),
        Some(p) if p.is_empty() || p == "<none>" || p == "_" => Ok(None),
        Some(p) => Ok(Some(p)),
    }
}

async fn buckets_root_inner(b: Buckets, ctx: Ctx, body: Body) -> GcsResult<Response> {
    match ctx.method {
        Method::GET => {
            let project = project_filter(&ctx)?;
            let max = ctx.q_i64("maxResults")?.unwrap_or(0).max(0) as usize;
            let (rows, next) = b
                .list_buckets(
                    project,
                    ctx.q("prefix").unwrap_or_default(),
                    ctx.q("pageToken"),
                    max,
                )
                .await?;
            let mut v = json!({"kind": "storage#buckets"});
            if !rows.is_empty() {
                v["items"] = rows.iter().map(|r| r.to_json(&ctx.base)).collect();
            }
            if let Some(n) = next {
                v["nextPageToken"] = n.into();
            }
            ok(v)
        }
        Method::POST => {
            let project = ctx
                .q("project")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "_".into());
            let body = read_json(body).await?;
            let name = str_field(&body, "name")?
                .ok_or_else(|| GcsError::required("Required field: name"))?;
            let labels = string_map(body.get("labels"), "labels")?;
            let row = b
                .create_bucket(
                    &name,
                    &project,
                    str_field(&body, "location")?,
                    str_field(&body, "storageClass")?,
                    labels,
                )
                .await?;
            ok(row.to_json(&ctx.base))
        }
        _ => Err(no_endpoint(&ctx)),
    }
}

async fn json_api(State(b): State<Buckets>, req: Request) -> Response {
    let ctx = Ctx::new(&b, &req);
    finish(json_api_inner(b, ctx, req.into_body()).await)
}

async fn json_api_inner(b: Buckets, ctx: Ctx, body: Body) -> GcsResult<Response> {
    let segs = ctx.segments("/storage/v1/b/")?;
    let bucket = segs[0].clone();
    let rest: Vec<&str> = segs[1..].iter().map(String::as_str).collect();
    let m = ctx.method.clone();
    match rest.as_slice() {
        [] | [""] => match m {
            Method::GET => ok(b.get_bucket(&bucket).await?.to_json(&ctx.base)),
            Method::DELETE => {
                b.delete_bucket(&bucket).await?;
                no_content()
            }
            Method::PATCH | Method::PUT => {
                let body = read_json(body).await?;
                ok(b.patch_bucket(&bucket, body, m == Method::PUT).await?.to_json(&ctx.base))
            }
            _ => Err(no_endpoint(&ctx)),
        },
        ["o"] | ["o", ""] => match m {
            Method::GET => list_objects(&b, &ctx, &bucket).await,
            Method::POST => Err(GcsError::invalid(format!(
                "upload object data to {}/upload/storage/v1/b/{}/o?uploadType=media|multipart|resumable",
                ctx.base,
                enc(&bucket)
            ))),
            _ => Err(no_endpoint(&ctx)),
        },
        ["o", tail @ ..] => {
            if m == Method::POST {
                return match tail {
                    [name, "compose"] => compose(&b, &ctx, &bucket, name, body).await,
                    [src, verb @ ("copyTo" | "rewriteTo"), "b", dst_bucket, "o", dst @ ..] if !dst.is_empty() => {
                        copy(&b, &ctx, &bucket, src, dst_bucket, &dst.join("/"), *verb == "rewriteTo", body).await
                    }
                    _ => Err(no_endpoint(&ctx)),
                };
            }
            let name = tail.join("/");
            match m {
                Method::GET | Method::HEAD => {
                    if ctx.q("alt").as_deref() == Some("media") {
                        download(&b, &ctx, &bucket, &name).await
                    } else {
                        let row = b.get_object(&bucket, &name, ctx.q_i64("generation")?, ctx.conds(false)?).await?;
                        ok(row.to_json(&ctx.base))
                    }
                }
                Method::PATCH | Method::PUT => {
                    let body = read_json(body).await?;
                    let row = b
                        .update_object(
                            &bucket,
                            &name,
                            ctx.q_i64("generation")?,
                            ctx.conds(false)?,
                            body,
                            m == Method::PUT,
                            ctx.base.clone(),
                        )
                        .await?;
                    ok(row.to_json(&ctx.base))
                }
                Method::DELETE => {
                    b.delete_object(&bucket, &name, ctx.q_i64("generation")?, ctx.conds(false)?, ctx.base.clone())
                        .await?;
                    no_content()
                }
                _ => Err(no_endpoint(&ctx)),
            }
        }
        ["notificationConfigs"] | ["notificationConfigs", ""] => match m {
            Method::GET => {
                let items: Vec<Value> =
                    b.list_notifications(&bucket).await?.iter().map(|n| n.to_json(&ctx.base)).collect();
                ok(json!({"kind": "storage#notifications", "items": items}))
            }
            Method::POST => {
                let body = read_json(body).await?;
                let event_types = match body.get("event_types") {
                    None | Some(Value::Null) => vec![],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|e| {
                            e.as_str().map(str::to_string).ok_or_else(|| GcsError::invalid(format!("Invalid event type {e}")))
                        })
                        .collect::<GcsResult<_>>()?,
                    Some(other) => return Err(GcsError::invalid(format!("Invalid event_types: {other}: expected a list"))),
                };
                let spec = NotificationSpec {
                    topic: str_field(&body, "topic")?.ok_or_else(|| GcsError::required("Required field: topic"))?,
                    payload_format: str_field(&body, "payload_format")?,
                    event_types,
                    object_name_prefix: str_field(&body, "object_name_prefix")?.unwrap_or_default(),
                    custom_attributes: string_map(body.get("custom_attributes"), "custom_attributes")?,
                };
                ok(b.create_notification(&bucket, spec).await?.to_json(&ctx.base))
            }
            _ => Err(no_endpoint(&ctx)),
        },
        ["notificationConfigs", id] => match m {
            Method::GET => ok(b.get_notification(&bucket, id).await?.to_json(&ctx.base)),
            Method::DELETE => {
                b.delete_notification(&bucket, id).await?;
                no_content()
            }
            _ => Err(no_endpoint(&ctx)),
        },
        _ => Err(no_endpoint(&ctx)),
    }
}

async fn list_objects(b: &Buckets, ctx: &Ctx, bucket: &str) -> GcsResult<Response> {
    let params = ListParams {
        prefix: ctx.q("prefix").unwrap_or_default(),
        delimiter: ctx.q("delimiter"),
        page_token: ctx.q("pageToken"),
        max_results: ctx.q_i64("maxResults")?.unwrap_or(0).max(0) as usize,
        start_offset: ctx.q("startOffset"),
        end_offset: ctx.q("endOffset"),
        include_trailing_delimiter: ctx.q_bool("includeTrailingDelimiter"),
    };
    let page = b.list_objects(bucket, params).await?;
    let mut v = json!({"kind": "storage#objects"});
    if !page.items.is_empty() {
        v["items"] = page.items.iter().map(|r| r.to_json(&ctx.base)).collect();
    }
    if !page.prefixes.is_empty() {
        v["prefixes"] = json!(page.prefixes);
    }
    if let Some(t) = page.next_page_token {
        v["nextPageToken"] = t.into();
    }
    ok(v)
}

#[allow(clippy::too_many_arguments)]
async fn copy(
    b: &Buckets,
    ctx: &Ctx,
    src_bucket: &str,
    src: &str,
    dst_bucket: &str,
    dst: &str,
    rewrite: bool,
    body: Body,
) -> GcsResult<Response> {
    let body = read_json(body).await?;
    let row = b
        .copy_object(
            src_bucket,
            src,
            ctx.q_i64("sourceGeneration")?,
            ctx.conds(true)?,
            dst_bucket,
            dst,
            ctx.conds(false)?,
            if body.is_empty() { None } else { Some(body) },
            ctx.base.clone(),
        )
        .await?;
    if rewrite {
        ok(json!({
            "kind": "storage#rewriteResponse",
            "totalBytesRewritten": row.size.to_string(),
            "objectSize": row.size.to_string(),
            "done": true,
            "resource": row.to_json(&ctx.base),
        }))
    } else {
        ok(row.to_json(&ctx.base))
    }
}

async fn compose(
    b: &Buckets,
    ctx: &Ctx,
    bucket: &str,
    dst: &str,
    body: Body,
) -> GcsResult<Response> {
    let body = read_json(body).await?;
    let sources = match body.get("sourceObjects") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                let name = s
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| GcsError::required("Required field: sourceObjects[].name"))?
                    .to_string();
                let generation = int_field(s.get("generation"), "sourceObjects[].generation")?;
                let if_generation_match = int_field(
                    s.get("objectPreconditions")
                        .and_then(|p| p.get("ifGenerationMatch")),
                    "sourceObjects[].objectPreconditions.ifGenerationMatch",
                )?;
                Ok(ComposeSource {
                    name,
                    generation,
                    if_generation_match,
                })
            })
            .collect::<GcsResult<Vec<_>>>()?,
        _ => return Err(GcsError::required("Required field: sourceObjects")),
    };
    let dest = match body.get("destination") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    let row = b
        .compose(
            bucket,
            dst,
            sources,
            dest,
            ctx.conds(false)?,
            ctx.base.clone(),
        )
        .await?;
    ok(row.to_json(&ctx.base))
}

// ----------------------------------------------------------------- download

async fn download_api(State(b): State<Buckets>, req: Request) -> Response {
    let ctx = Ctx::new(&b, &req);
    finish(
        async {
            if ctx.method != Method::GET && ctx.method != Method::HEAD {
                return Err(no_endpoint(&ctx));
            }
            let segs = ctx.segments("/download/storage/v1/b/")?;
            match segs.as_slice() {
                [bucket, o, name @ ..] if o == "o" && !name.is_empty() => {
                    download(&b, &ctx, bucket, &name.join("/")).await
                }
                _ => Err(no_endpoint(&ctx)),
            }
        }
        .await,
    )
}

/// `Range: bytes=a-b | a- | -n` → inclusive byte range; `Ok(None)` serves
/// the whole object (no header, several ranges, or a form we ignore as
/// RFC 9110 allows).
fn parse_range(h: Option<&str>, size: u64) -> GcsResult<Option<(u64, u64)>> {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') || size == 0 {
        return Ok(None);
    }
    let Some((a, z)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, z) = (a.trim(), z.trim());
    let unsatisfiable = || {
        Err(GcsError::range_not_satisfiable(format!(
            "Request range not satisfiable: bytes={spec} of an object of {size} bytes"
        )))
    };
    if a.is_empty() {
        let Ok(n) = z.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 {
            return unsatisfiable();
        }
        return Ok(Some((size.saturating_sub(n), size - 1)));
    }
    let Ok(start) = a.parse::<u64>() else {
        return Ok(None);
    };
    let end = if z.is_empty() {
        size - 1
    } else {
        match z.parse::<u64>() {
            Ok(e) if e >= start => e.min(size - 1),
            _ => return Ok(None),
        }
    };
    if start >= size {
        return unsatisfiable();
    }
    Ok(Some((start, end)))
}

async fn download(b: &Buckets, ctx: &Ctx, bucket: &str, name: &str) -> GcsResult<Response> {
    let range_header = ctx.header("range");
    let head = ctx.method == Method::HEAD;
    let (row, file) = b
        .open_object_at(
            bucket,
            name,
            ctx.q_i64("generation")?,
            ctx.conds(false)?,
            |row| match parse_range(range_header.as_deref(), row.size) {
                Ok(Some((s, _))) if !head => Ok(Some(s)),
                Ok(None) if !head => Ok(Some(0)),
                // Unsatisfiable (answered below) or HEAD: no bytes needed.
                _ => Ok(None),
            },
        )
        .await?;
    let size = row.size;
    let range = match parse_range(range_header.as_deref(), size) {
        Err(e) => {
            let mut r = e.into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Ok(r);
        }
        Ok(r) => r,
    };
    let (status, len) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, e - s + 1),
        None => (StatusCode::OK, size),
    };
    let body = match file {
        Some(file) if !head => {
            Body::from_stream(ReaderStream::with_capacity(file.take(len), 256 * 1024))
        }
        _ => Body::empty(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set("content-type", row.content_type().to_string());
    set("content-length", len.to_string());
    set("accept-ranges", "bytes".into());
    set("etag", format!("\"{}\"", row.etag()));
    set("last-modified", httpdate(row.updated_us));
    set("x-goog-generation", row.generation.to_string());
    set("x-goog-metageneration", row.metageneration.to_string());
    set("x-goog-hash", row.goog_hash());
    set("x-goog-stored-content-length", size.to_string());
    set(
        "x-goog-stored-content-encoding",
        row.meta
            .content_encoding
            .clone()
            .unwrap_or_else(|| "identity".into()),
    );
    set("x-goog-storage-class", "STANDARD".into());
    if let Some((s, e)) = range {
        set("content-range", format!("bytes {s}-{e}/{size}"));
    }
    if let Some(v) = &row.meta.content_encoding {
        set("content-encoding", v.clone());
    }
    if let Some(v) = &row.meta.content_disposition {
        set("content-disposition", v.clone());
    }
    if let Some(v) = &row.meta.content_language {
        set("content-language", v.clone());
    }
    if let Some(v) = &row.meta.cache_control {
        set("cache-control", v.clone());
    }
    for (k, v) in &row.meta.metadata {
        if let (Ok(name), Ok(val)) = (
            header::HeaderName::from_bytes(format!("x-goog-meta-{k}").as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(name, val);
        }
    }
    Ok(resp)
}

fn httpdate(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

// ------------------------------------------------------------------ uploads

async fn upload_api(State(b): State<Buckets>, req: Request) -> Response {
    let ctx = Ctx::new(&b, &req);
    finish(upload_inner(b, ctx, req.into_body()).await)
}

async fn upload_inner(b: Buckets, ctx: Ctx, body: Body) -> GcsResult<Response> {
    let segs = ctx.segments("/upload/storage/v1/b/")?;
    let bucket = match segs.as_slice() {
        [bucket, o] if o == "o" => bucket.clone(),
        [bucket, o, last] if o == "o" && last.is_empty() => bucket.clone(),
        _ => return Err(no_endpoint(&ctx)),
    };
    if let Some(id) = ctx.q("upload_id") {
        return match ctx.method {
            Method::PUT | Method::POST => resumable_put(&b, &ctx, &id, body).await,
            Method::DELETE => cancel_upload(&b, &id).await,
            _ => Err(no_endpoint(&ctx)),
        };
    }
    if ctx.method != Method::POST {
        return Err(no_endpoint(&ctx));
    }
    match ctx.q("uploadType").as_deref() {
        Some("media") | None => simple_upload(&b, &ctx, &bucket, body).await,
        Some("multipart") => multipart_upload(&b, &ctx, &bucket, body).await,
        Some("resumable") => start_resumable(&b, &ctx, &bucket, body).await,
        Some(other) => Err(GcsError::invalid(format!(
            "Invalid uploadType '{other}': use media, multipart or resumable"
        ))),
    }
}

fn content_type_header(ctx: &Ctx) -> Option<String> {
    ctx.header("content-type").filter(|c| !c.is_empty())
}

async fn simple_upload(b: &Buckets, ctx: &Ctx, bucket: &str, body: Body) -> GcsResult<Response> {
    let name = ctx
        .q("name")
        .ok_or_else(|| GcsError::required("Required parameter: name"))?;
    validate_object_name(&name)?;
    let conds = ctx.conds(false)?;
    let expected = ctx.goog_hash()?;
    b.precheck_write(bucket, &name, conds).await?;
    let meta = ObjectMeta {
        content_type: content_type_header(ctx),
        content_encoding: ctx.q("contentEncoding"),
        ..Default::default()
    };
    let mut w = BlobWriter::new(b.inner.store.clone()).await?;
    let mut reader = BodyReader::new(body);
    while let Some(chunk) = reader.next_chunk().await? {
        w.write(&chunk).await?;
    }
    let object = NewObject::new(bucket, name, meta, conds);
    commit_upload(b, ctx, w, expected, object).await
}

/// The object a one-request upload creates.
struct NewObject<'a> {
    bucket: &'a str,
    name: String,
    meta: ObjectMeta,
    conds: Conditions,
}

impl<'a> NewObject<'a> {
    fn new(bucket: &'a str, name: String, meta: ObjectMeta, conds: Conditions) -> Self {
        NewObject {
            bucket,
            name,
            meta,
            conds,
        }
    }
}

/// Ends a one-request upload: the blob just written must match the hashes
/// the client sent, then it becomes the object.
async fn commit_upload(
    b: &Buckets,
    ctx: &Ctx,
    w: BlobWriter,
    expected: Expected,
    object: NewObject<'_>,
) -> GcsResult<Response> {
    let temp = w.finish().await?;
    expected.verify(&temp.digests)?;
    let row = b
        .commit(Write {
            bucket: object.bucket.into(),
            name: object.name,
            source: Source::Temp(temp),
            meta: object.meta,
            component_count: None,
            conds: object.conds,
            base: ctx.base.clone(),
            upload_id: None,
        })
        .await?;
    ok(row.to_json(&ctx.base))
}

async fn multipart_upload(b: &Buckets, ctx: &Ctx, bucket: &str, body: Body) -> GcsResult<Response> {
    let boundary = multipart::boundary(&content_type_header(ctx).unwrap_or_default())?;
    let conds = ctx.conds(false)?;
    let mut expected = ctx.goog_hash()?;
    // Bucket first (the name is in the body); the commit checks everything again.
    b.get_bucket(bucket).await?;
    if let Some(name) = ctx.q("name") {
        validate_object_name(&name)?;
        b.precheck_write(bucket, &name, conds).await?;
    }
    let mut w = BlobWriter::new(b.inner.store.clone()).await?;
    let mut reader = BodyReader::new(body);
    let parsed = multipart::parse(&mut reader, &boundary, &mut w).await?;
    let name = match ctx.q("name") {
        Some(n) => n,
        None => str_field(&parsed.metadata, "name")?
            .ok_or_else(|| GcsError::required("Required parameter: name"))?,
    };
    validate_object_name(&name)?;
    let from_meta = expected_from_resource(&parsed.metadata)?;
    expected.md5 = expected.md5.or(from_meta.md5);
    expected.crc32c = expected.crc32c.or(from_meta.crc32c);
    let mut meta = ObjectMeta::from_resource(&parsed.metadata)?;
    if meta.content_type.is_none() {
        meta.content_type = parsed.media_content_type.clone();
    }
    if meta.content_encoding.is_none() {
        meta.content_encoding = ctx.q("contentEncoding");
    }
    let object = NewObject::new(bucket, name, meta, conds);
    commit_upload(b, ctx, w, expected, object).await
}

async fn start_resumable(b: &Buckets, ctx: &Ctx, bucket: &str, body: Body) -> GcsResult<Response> {
    let metadata = read_json(body).await?;
    let name = match ctx.q("name") {
        Some(n) => n,
        None => str_field(&metadata, "name")?
            .ok_or_else(|| GcsError::required("Required parameter: name"))?,
    };
    validate_object_name(&name)?;
    let conds = ctx.conds(false)?;
    b.precheck_write(bucket, &name, conds).await?;
    let expected = expected_from_resource(&metadata)?;
    let mut meta = ObjectMeta::from_resource(&metadata)?;
    if meta.content_type.is_none() {
        meta.content_type = ctx
            .header("x-upload-content-type")
            .filter(|c| !c.is_empty());
    }
    if meta.content_encoding.is_none() {
        meta.content_encoding = ctx.q("contentEncoding");
    }
    let total = match ctx.header("x-upload-content-length") {
        None => None,
        Some(v) => {
            let t = v.trim().parse::<u64>().map_err(|_| {
                GcsError::invalid(format!(
                    "Invalid X-Upload-Content-Length '{v}': expected a byte count"
                ))
            })?;
            check_object_size(t)?;
            Some(t)
        }
    };
    let id = blob::new_id();
    let row = UploadRow {
        id: id.clone(),
        bucket: bucket.to_string(),
        name: name.clone(),
        spec: UploadSpec {
            meta,
            conditions: conds,
            expected_md5: expected.md5,
            expected_crc32c: expected.crc32c,
        },
        total,
        received: 0,
        done: None,
        created_us: now_us(),
    };
    b.store().insert_upload(&db::upload_to(&row)?).await?;
    let location = format!(
        "{}/upload/storage/v1/b/{}/o?uploadType=resumable&name={}&upload_id={id}",
        ctx.base,
        enc(bucket),
        enc(&name)
    );
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(|e| GcsError::internal(e.to_string()))?,
    );
    h.insert(
        "x-guploader-uploadid",
        HeaderValue::from_str(&id).expect("hex id"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    Ok(resp)
}

/// 400 for a size above [`MAX_OBJECT_SIZE`]: such an upload could never finish.
fn check_object_size(size: u64) -> GcsResult<()> {
    if size > MAX_OBJECT_SIZE {
        return Err(GcsError::invalid(format!(
            "Invalid upload size {size}: the maximum object size is {MAX_OBJECT_SIZE} bytes (5 TiB)"
        )));
    }
    Ok(())
}

/// What a `Content-Range` header on a session PUT says.
#[derive(Debug, PartialEq, Eq)]
enum ChunkRange {
    /// `bytes */T` or `bytes */*`: a status query (or a zero-byte finish).
    Query { total: Option<u64> },
    /// `bytes S-E/T` or `bytes S-E/*`.
    Data {
        start: u64,
        end: u64,
        total: Option<u64>,
    },
    /// No header: the body is the whole object.
    Whole,
}

fn parse_content_range(h: Option<&str>) -> GcsResult<ChunkRange> {
    let Some(h) = h else {
        return Ok(ChunkRange::Whole);
    };
    let bad = || {
        GcsError::invalid(format!("Invalid Content-Range '{h}': expected 'bytes S-E/TOTAL', 'bytes S-E/*' or 'bytes */TOTAL'"))
    };
    let spec = h
        .trim()
        .strip_prefix("bytes")
        .ok_or_else(bad)?
        .trim_start_matches([' ', '=']);
    let (range, total) = spec.split_once('/').ok_or_else(bad)?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().map_err(|_| bad())?),
    };
    if range.trim() == "*" {
        if let Some(t) = total {
            check_object_size(t)?;
        }
        return Ok(ChunkRange::Query { total });
    }
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let start = s.trim().parse::<u64>().map_err(|_| bad())?;
    let end = e.trim().parse::<u64>().map_err(|_| bad())?;
    if end < start || total.is_some_and(|t| end >= t) {
        return Err(bad());
    }
    if let Some(t) = total {
        check_object_size(t)?;
    }
    check_object_size(end.saturating_add(1))?;
    Ok(ChunkRange::Data { start, end, total })
}

fn resume_incomplete(received: u64) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let h = resp.headers_mut();
    if received > 0 {
        h.insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes=0-{}", received - 1)).expect("ascii"),
        );
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

fn no_session(id: &str) -> GcsError {
    GcsError::not_found(format!(
        "No such upload session '{}': it expired, was cancelled, or never existed; start a new resumable upload",
        crate::names::shorten(id)
    ))
}

impl Buckets {
    fn session_lock(&self, id: &str) -> std::sync::Arc<tokio::sync::Mutex<Option<Hasher>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }
}

async fn resumable_put(b: &Buckets, ctx: &Ctx, id: &str, body: Body) -> GcsResult<Response> {
    if !blob::is_id(id) {
        return Err(no_session(id));
    }
    let lock = b.session_lock(id);
    let mut hasher = lock.lock().await;
    let session = b
        .store()
        .get_upload(id)
        .await?
        .map(db::upload_from)
        .transpose()?
        .ok_or_else(|| no_session(id))?;
    if let Some(done) = &session.done {
        // Completed before: answer as the completing request did.
        let v: Value = serde_json::from_str(done).unwrap_or(Value::Null);
        return ok(v);
    }
    let range = parse_content_range(ctx.header("content-range").as_deref())?;
    let extra = ctx.goog_hash()?;
    let mut total = session.total;
    let declared_total = match &range {
        ChunkRange::Query { total } | ChunkRange::Data { total, .. } => *total,
        ChunkRange::Whole => None,
    };
    if let Some(t) = declared_total {
        if total.is_some_and(|t0| t0 != t) {
            return Err(GcsError::invalid(format!(
                "Content-Range total {t} differs from the upload's declared size {}",
                total.unwrap_or_default()
            )));
        }
        total = Some(t);
    }
    let received = session.received;
    if let Some(t) = total.filter(|t| received > *t) {
        return Err(GcsError::invalid(format!(
            "Invalid Content-Range total {t}: the session already holds {received} bytes"
        )));
    }
    let (start, declared_len) = match range {
        ChunkRange::Query { .. } => {
            if total == Some(received) {
                return finalize(b, ctx, session, &mut hasher, extra).await;
            }
            if total != session.total {
                b.store().set_upload_progress(id, received, total).await?;
            }
            return Ok(resume_incomplete(received));
        }
        ChunkRange::Data { start, end, .. } => (start, Some(end - start + 1)),
        ChunkRange::Whole => (0, None),
    };
    if start > received {
        return Err(GcsError::invalid(format!(
            "Invalid request: the chunk starts at byte {start} but only {received} bytes of this upload were received; \
             query the upload status (Content-Range: bytes */*) and resume from there"
        )));
    }
    if hasher.as_ref().map(Hasher::len) != Some(received) {
        *hasher = Some(rehash(b, id, received).await?);
    }
    // Bytes beyond `received` were never acknowledged (a crash mid-chunk):
    // the writer cuts them.
    let mut w = b.store().blob_writer(Some((id, received))).await?;
    let h = hasher.as_mut().expect("set above");
    let mut skip = received - start;
    let mut body_len = 0u64;
    let mut written = 0u64;
    let mut reader = BodyReader::new(body);
    // `Err(Keep)`: the client went away; keep what arrived so it can resume
    // from the Range we report. `Err(Discard)`: the request is invalid; store
    // nothing of it.
    enum Fail {
        Keep(GcsError),
        Discard(GcsError),
    }
    let mut failure = None;
    loop {
        let chunk = match reader.next_chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                failure = Some(Fail::Keep(e));
                break;
            }
        };
        body_len += chunk.len() as u64;
        if declared_len.is_some_and(|d| body_len > d) {
            failure = Some(Fail::Discard(GcsError::invalid(format!(
                "the request body is longer than its Content-Range ({} bytes)",
                declared_len.unwrap_or_default()
            ))));
            break;
        }
        let mut data = &chunk[..];
        let s = (skip as usize).min(data.len());
        data = &data[s..];
        skip -= s as u64;
        if data.is_empty() {
            continue;
        }
        if received + written + data.len() as u64 > total.unwrap_or(MAX_OBJECT_SIZE) {
            failure = Some(Fail::Discard(GcsError::invalid(match total {
                Some(t) => format!("the upload is longer than its declared size {t}"),
                None => format!(
                    "the upload is larger than the maximum object size ({MAX_OBJECT_SIZE} bytes)"
                ),
            })));
            break;
        }
        if let Err(e) = w.write(data).await {
            failure = Some(Fail::Discard(e.into()));
            break;
        }
        h.update(data);
        written += data.len() as u64;
    }
    let failure = match failure {
        Some(Fail::Discard(e)) => {
            // Nothing of it counts: the next request's writer cuts back to
            // `received`, and the hash is rebuilt from the stored bytes.
            drop(w);
            *hasher = None;
            return Err(e);
        }
        Some(Fail::Keep(e)) => Some(e),
        None => None,
    };
    w.finish().await?;
    let new_received = received + written;
    if declared_len.is_none() && failure.is_none() {
        // No Content-Range: this one request carried the whole object.
        total = Some(new_received);
    }
    b.store()
        .set_upload_progress(id, new_received, total)
        .await?;
    if let Some(e) = failure {
        return Err(e);
    }
    if total == Some(new_received) {
        let mut session = session;
        session.total = total;
        session.received = new_received;
        return finalize(b, ctx, session, &mut hasher, extra).await;
    }
    Ok(resume_incomplete(new_received))
}

/// The running hash of the first `len` bytes of a session's stored bytes.
async fn rehash(b: &Buckets, id: &str, len: u64) -> GcsResult<Hasher> {
    if len == 0 {
        return Ok(Hasher::new());
    }
    let mut f = b
        .store()
        .read_blob(id, 0)
        .await?
        .ok_or_else(|| GcsError::internal("an upload session's bytes are missing"))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = f.read(&mut buf[..(left.min(1 << 20) as usize)]).await?;
        if n == 0 {
            return Err(GcsError::internal(
                "an upload session's stored bytes are shorter than recorded",
            ));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h)
}

async fn finalize(
    b: &Buckets,
    ctx: &Ctx,
    session: UploadRow,
    hasher: &mut Option<Hasher>,
    extra: Expected,
) -> GcsResult<Response> {
    if hasher.as_ref().map(Hasher::len) != Some(session.received) {
        *hasher = Some(rehash(b, &session.id, session.received).await?);
    }
    // Bytes past `received` (a discarded request, a crash mid-chunk) were
    // never acknowledged and must not become part of the object.
    b.store()
        .blob_writer(Some((&session.id, session.received)))
        .await?
        .finish()
        .await?;
    let digests = hasher.take().expect("set above").finish();
    // Both must hold, as at Google: what the session was opened with
    // (`md5Hash`/`crc32c` in the object resource) and the final request's
    // `x-goog-hash`, which the official client computes from the data it sent
    // and which therefore must not override a wrong declared value.
    let declared = session.spec.expected();
    let id = session.id.clone();
    let end_session = |b: &Buckets| {
        let b = b.clone();
        let id = id.clone();
        async move {
            if let Err(e) = b.store().delete_upload(&id).await {
                tracing::warn!(upload = %id, error = %e, "could not end an upload session; it expires in a week");
            }
            b.forget_session(&id);
        }
    };
    if let Err(e) = declared
        .verify(&digests)
        .and_then(|()| extra.verify(&digests))
    {
        end_session(b).await;
        return Err(e);
    }
    let res = b
        .commit(Write {
            bucket: session.bucket.clone(),
            name: session.name.clone(),
            source: Source::Upload(session.id.clone(), digests),
            meta: session.spec.meta.clone(),
            component_count: None,
            conds: session.spec.conditions,
            base: ctx.base.clone(),
            upload_id: Some(session.id.clone()),
        })
        .await;
    match res {
        Ok(row) => {
            b.inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session.id);
            ok(row.to_json(&ctx.base))
        }
        Err(e) => {
            end_session(b).await;
            Err(e)
        }
    }
}

async fn cancel_upload(b: &Buckets, id: &str) -> GcsResult<Response> {
    if !blob::is_id(id) {
        return Err(no_session(id));
    }
    let lock = b.session_lock(id);
    let _g = lock.lock().await;
    let existed = b.store().delete_upload(id).await?;
    b.forget_session(id);
    if !existed {
        return Err(no_session(id));
    }
    // Google answers a cancelled session with 499 Client Closed Request.
    Ok(Response::builder()
        .status(499)
        .body(Body::empty())
        .expect("valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=0-4"), 10).unwrap(), Some((0, 4)));
        assert_eq!(parse_range(Some("bytes=5-"), 10).unwrap(), Some((5, 9)));
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), Some((7, 9)));
        assert_eq!(parse_range(Some("bytes=-30"), 10).unwrap(), Some((0, 9)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10).unwrap(), Some((8, 9)));
        assert_eq!(parse_range(Some("bytes=10-"), 10).unwrap_err().status, 416);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=4-2"), 10).unwrap(), None);
        assert_eq!(parse_range(Some("items=0-1"), 10).unwrap(), None);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range(None).unwrap(), ChunkRange::Whole);
        assert_eq!(
            parse_content_range(Some("bytes */*")).unwrap(),
            ChunkRange::Query { total: None }
        );
        assert_eq!(
            parse_content_range(Some("bytes */100")).unwrap(),
            ChunkRange::Query { total: Some(100) }
        );
        assert_eq!(
            parse_content_range(Some("bytes 0-9/100")).unwrap(),
            ChunkRange::Data {
                start: 0,
                end: 9,
                total: Some(100)
            }
        );
        assert_eq!(
            parse_content_range(Some("bytes 10-19/*")).unwrap(),
            ChunkRange::Data {
                start: 10,
                end: 19,
                total: None
            }
        );
        assert!(parse_content_range(Some("bytes 9-0/100")).is_err());
        assert!(parse_content_range(Some("bytes 0-100/100")).is_err());
        assert!(parse_content_range(Some("0-1/2")).is_err());
        // Beyond the object size ceiling: refused, whatever the form.
        let huge = format!("{}", MAX_OBJECT_SIZE + 1);
        assert!(parse_content_range(Some(&format!("bytes 0-9/{huge}"))).is_err());
        assert!(parse_content_range(Some(&format!("bytes */{huge}"))).is_err());
        assert!(parse_content_range(Some(&format!("bytes 0-{}/*", MAX_OBJECT_SIZE))).is_err());
        assert!(
            parse_content_range(Some("bytes 0-18446744073709551614/18446744073709551615")).is_err()
        );
        assert!(
            parse_content_range(Some("bytes 18446744073709551615-18446744073709551615/*")).is_err()
        );
        assert!(parse_content_range(Some(&format!("bytes */{MAX_OBJECT_SIZE}"))).is_ok());
    }
}
