//! `pubrun objects cp|cat|rm`: moving bytes between files and `gs://` URLs
//! the way gsutil users expect, over the server's Cloud Storage JSON API.
//!
//! - Uploads up to [`RESUMABLE_THRESHOLD`] go in one request with their
//!   checksums in `x-goog-hash`, so the server refuses damaged bytes.
//!   Larger files use a resumable session sent in [`CHUNK`]-sized pieces
//!   (never the whole file in memory); the session URL is kept in a tracker
//!   file, so running the same `cp` again after an interruption continues
//!   where the server stopped instead of starting over.
//! - Downloads stream into `DST.pubrun-part` and are renamed only after the
//!   CRC32C (and MD5, when the object has one) match the object's metadata.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use md5::Digest as _;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::api::{segment, Api};
use super::ConnArgs;

/// Files above this size are uploaded with a resumable session.
pub const RESUMABLE_THRESHOLD: u64 = 8 << 20;
/// Bytes per resumable-upload request (a multiple of 256 KiB, as Google asks).
const CHUNK: usize = 8 << 20;
/// Attempts per chunk when the connection fails mid-transfer.
const CHUNK_ATTEMPTS: u32 = 4;
/// Test-only fault injection: stop the process (as a crash or Ctrl-C would)
/// after this many resumable chunks were acknowledged.
const STOP_AFTER_CHUNKS_ENV: &str = "PUBRUN_CP_TEST_STOP_AFTER_CHUNKS";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(clap::Subcommand)]
pub enum ObjectsTransfer {
    /// Copy a file or directory to gs://BUCKET/OBJECT, or an object (or, with
    /// -r, every object under a prefix) to a local path. Checksums are
    /// verified; large uploads resume when the command is run again.
    Cp {
        /// A local path or gs://BUCKET/OBJECT.
        src: String,
        /// A local path or gs://BUCKET/OBJECT. A destination ending in `/`
        /// (or an existing local directory) receives the source's base name.
        dst: String,
        /// Copy a directory (upload) or every object under a prefix
        /// (download); the source's last path segment is kept as a directory.
        #[arg(short = 'r', long, visible_short_alias = 'R')]
        recursive: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print an object's bytes to standard output (checksum verified at the end).
    Cat {
        /// gs://BUCKET/OBJECT
        url: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete an object, or with -r every object under a prefix.
    Rm {
        /// gs://BUCKET/OBJECT, or gs://BUCKET/PREFIX with -r.
        url: String,
        /// Delete the object named PREFIX and every object under PREFIX/
        /// (gs://BUCKET alone: every object; the bucket itself stays).
        #[arg(short = 'r', long, visible_short_alias = 'R')]
        recursive: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Local(PathBuf),
    /// `object` may be empty (the bucket's root) or end in `/` (a folder).
    Gcs {
        bucket: String,
        object: String,
    },
}

fn parse_location(s: &str) -> Result<Location> {
    let Some(rest) = s.strip_prefix("gs://") else {
        if s.contains("://") {
            bail!("`{s}`: only local paths and gs://BUCKET/OBJECT URLs can be copied");
        }
        return Ok(Location::Local(PathBuf::from(s)));
    };
    let (bucket, object) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("`{s}` names no bucket; expected gs://BUCKET/OBJECT");
    }
    Ok(Location::Gcs {
        bucket: bucket.to_string(),
        object: object.to_string(),
    })
}

fn gcs_url(bucket: &str, object: &str) -> String {
    format!("gs://{bucket}/{object}")
}

fn object_path(bucket: &str, object: &str) -> String {
    format!("/storage/v1/b/{}/o/{}", segment(bucket), segment(object))
}

pub async fn run(cmd: ObjectsTransfer) -> Result<()> {
    match cmd {
        ObjectsTransfer::Cp {
            src,
            dst,
            recursive,
            conn,
        } => {
            let api = Api::for_transfers(&conn)?;
            cp(
                &api,
                parse_location(&src)?,
                parse_location(&dst)?,
                recursive,
            )
            .await
        }
        ObjectsTransfer::Cat { url, conn } => {
            let api = Api::for_transfers(&conn)?;
            let Location::Gcs { bucket, object } = parse_location(&url)? else {
                bail!("`{url}` is not a gs://BUCKET/OBJECT URL");
            };
            if object.is_empty() || object.ends_with('/') {
                bail!("`{url}` names no object; expected gs://BUCKET/OBJECT");
            }
            let meta = api.get(&object_path(&bucket, &object)).await?;
            let mut out = tokio::io::stdout();
            let result = match download(&api, &bucket, &object, &meta, &mut out, false).await {
                Ok(_) => out.flush().await.map_err(Into::into),
                Err(e) => Err(e),
            };
            match result {
                // `objects cat … | head`: the reader had enough; not an error.
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
                {
                    Ok(())
                }
                other => other,
            }
        }
        ObjectsTransfer::Rm {
            url,
            recursive,
            conn,
        } => {
            let api = Api::new(&conn)?;
            let Location::Gcs { bucket, object } = parse_location(&url)? else {
                bail!("`{url}` is not a gs://BUCKET/OBJECT URL");
            };
            rm(&api, &bucket, &object, recursive).await
        }
    }
}

// ------------------------------------------------------------------ cp

async fn cp(api: &Api, src: Location, dst: Location, recursive: bool) -> Result<()> {
    match (src, dst) {
        (Location::Local(src), Location::Gcs { bucket, object }) => {
            let meta = tokio::fs::metadata(&src)
                .await
                .with_context(|| format!("cannot read {}", src.display()))?;
            // The bucket first: a typo should not cost a walk of the tree.
            api.get(&format!("/storage/v1/b/{}", segment(&bucket)))
                .await
                .with_context(|| format!("cannot copy to gs://{bucket}"))?;
            if meta.is_dir() {
                if !recursive {
                    bail!(
                        "{} is a directory; pass -r to copy it and everything in it",
                        src.display()
                    );
                }
                let base = folder(&object, &file_name(&src)?);
                let files = walk(&src)?;
                if files.is_empty() {
                    bail!("{} holds no files; nothing copied", src.display());
                }
                for rel in files {
                    let name = format!("{base}{}", slash_path(&rel)?);
                    upload(api, &src.join(&rel), &bucket, &name).await?;
                }
                Ok(())
            } else {
                let name = if object.is_empty() || object.ends_with('/') {
                    format!("{object}{}", file_name(&src)?)
                } else {
                    object
                };
                upload(api, &src, &bucket, &name).await
            }
        }
        (Location::Gcs { bucket, object }, Location::Local(dst)) => {
            if recursive {
                return download_tree(api, &bucket, &object, &dst).await;
            }
            if object.is_empty() || object.ends_with('/') {
                bail!(
                    "{} names no object; pass -r to copy every object under it",
                    gcs_url(&bucket, &object)
                );
            }
            let meta = api
                .get(&object_path(&bucket, &object))
                .await
                .map_err(|e| e.context(format!("cannot copy {}", gcs_url(&bucket, &object))))?;
            let last = object.rsplit('/').next().unwrap_or(&object);
            let target = if dst.is_dir() || dst.to_string_lossy().ends_with('/') {
                dst.join(safe_relative(last)?)
            } else {
                dst
            };
            download_to_file(api, &bucket, &object, &meta, &target).await
        }
        (Location::Local(_), Location::Local(_)) => {
            bail!("both paths are local; one side of `objects cp` must be gs://BUCKET/OBJECT")
        }
        (Location::Gcs { .. }, Location::Gcs { .. }) => {
            bail!("copying between gs:// URLs is not supported yet; copy to a local file and back")
        }
    }
}

/// `PREFIX/NAME/` for a directory named NAME copied to `gs://B/PREFIX`.
fn folder(object: &str, name: &str) -> String {
    match object.trim_end_matches('/') {
        "" => format!("{name}/"),
        p => format!("{p}/{name}/"),
    }
}

fn file_name(p: &Path) -> Result<String> {
    // `.` or `dir/..` have no name of their own: use the resolved directory's.
    let name = match p.file_name() {
        Some(n)
            if p.components()
                .next_back()
                .is_some_and(|c| matches!(c, std::path::Component::Normal(_))) =>
        {
            n.to_owned()
        }
        _ => p
            .canonicalize()
            .ok()
            .and_then(|c| c.file_name().map(ToOwned::to_owned))
            .ok_or_else(|| anyhow!("{} has no file name", p.display()))?,
    };
    name.into_string()
        .map_err(|_| anyhow!("{} is not valid UTF-8; object names must be", p.display()))
}

fn slash_path(rel: &Path) -> Result<String> {
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    parts
        .map(|p| p.join("/"))
        .ok_or_else(|| anyhow!("{} is not valid UTF-8; object names must be", rel.display()))
}

/// Every regular file under `root`, relative to it, sorted. Symbolic links
/// are followed to files; directories reached through links are not walked
/// (they could loop).
fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            let ty = e.file_type()?;
            let child = rel.join(e.file_name());
            if ty.is_dir() {
                stack.push(child);
            } else if ty.is_file() || (ty.is_symlink() && e.path().is_file()) {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// An object name (or its tail) as a path under a download directory:
/// names that would climb out of it (`..`, absolute) are refused.
fn safe_relative(name: &str) -> Result<PathBuf> {
    let mut p = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => continue,
            ".." => bail!(
                "object name `{name}` contains `..`; refusing to write outside the destination"
            ),
            x if x.contains('\0') || x.contains('\\') => {
                bail!("object name `{name}` cannot be a local file name")
            }
            x => p.push(x),
        }
    }
    if p.as_os_str().is_empty() {
        bail!("object name `{name}` has no file name part");
    }
    Ok(p)
}

// ------------------------------------------------------------------ upload

struct Digests {
    crc32c: u32,
    md5: [u8; 16],
}

impl Digests {
    fn crc_b64(&self) -> String {
        B64.encode(self.crc32c.to_be_bytes())
    }
    fn md5_b64(&self) -> String {
        B64.encode(self.md5)
    }
}

#[derive(Default)]
struct Hasher {
    crc: u32,
    md5: md5::Md5,
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.md5.update(data);
    }
    fn finish(self) -> Digests {
        Digests {
            crc32c: self.crc,
            md5: self.md5.finalize().into(),
        }
    }
}

async fn hash_file(path: &Path) -> Result<Digests> {
    let mut f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

async fn upload(api: &Api, src: &Path, bucket: &str, name: &str) -> Result<()> {
    let size = tokio::fs::metadata(src)
        .await
        .with_context(|| format!("cannot read {}", src.display()))?
        .len();
    let dst = gcs_url(bucket, name);
    let digests = hash_file(src).await?;
    let object = if size <= RESUMABLE_THRESHOLD {
        let bytes = tokio::fs::read(src)
            .await
            .with_context(|| format!("cannot read {}", src.display()))?;
        if bytes.len() as u64 != size {
            bail!("{} changed while it was being copied", src.display());
        }
        let path = format!("/upload/storage/v1/b/{}/o", segment(bucket));
        let resp = api
            .send(
                Method::POST,
                &path,
                &[("uploadType", "media"), ("name", name)],
                &[
                    ("content-type", "application/octet-stream".into()),
                    (
                        "x-goog-hash",
                        format!("crc32c={},md5={}", digests.crc_b64(), digests.md5_b64()),
                    ),
                ],
                Some(bytes.into()),
            )
            .await
            .with_context(|| format!("uploading {} to {dst}", src.display()))?;
        json_body(api, resp, &path).await?
    } else {
        resumable_upload(api, src, size, &digests, bucket, name).await?
    };
    verify_remote(&object, size, &digests, &dst)?;
    println!("{} -> {dst} ({size} bytes)", src.display());
    Ok(())
}

async fn json_body(api: &Api, resp: reqwest::Response, path: &str) -> Result<Value> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| api.body_error(&Method::POST, path, &e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("the server's answer to {path} is not JSON: {e}"))
}

/// The object the server stored must hold what we hashed.
fn verify_remote(object: &Value, size: u64, d: &Digests, dst: &str) -> Result<()> {
    let got_size = object
        .get("size")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u64>().ok());
    let got_crc = object.get("crc32c").and_then(Value::as_str);
    if got_size != Some(size) || got_crc != Some(d.crc_b64().as_str()) {
        bail!(
            "checksum mismatch after upload to {dst}: sent {size} bytes with crc32c {}, the server holds {} bytes with crc32c {}",
            d.crc_b64(),
            got_size.map_or("?".into(), |s| s.to_string()),
            got_crc.unwrap_or("?")
        );
    }
    Ok(())
}

/// What a tracker file remembers about an unfinished resumable upload.
#[derive(serde::Serialize, serde::Deserialize)]
struct Tracker {
    /// Path and query of the session (relative to --addr, so a proxy or a
    /// mapped port in the server's own idea of its URL does not matter).
    session: String,
}

/// `$PUBRUN_STATE_DIR`, else `$XDG_STATE_HOME/pubrun`, else `~/.local/state/pubrun`.
fn state_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("PUBRUN_STATE_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("pubrun")))
        .or_else(|| env("HOME").map(|h| h.join(".local/state/pubrun")))
}

/// One tracker per (server, file content, destination): a changed file or
/// another destination never resumes a session meant for something else.
fn tracker_path(
    api: &Api,
    src: &Path,
    d: &Digests,
    size: u64,
    bucket: &str,
    name: &str,
) -> Option<PathBuf> {
    let abs = std::path::absolute(src).ok()?;
    let key = format!(
        "{}\n{}\n{size}\n{}\n{}\n{bucket}\n{name}",
        api.base(),
        abs.display(),
        d.crc_b64(),
        d.md5_b64()
    );
    let id: [u8; 16] = md5::Md5::digest(key.as_bytes()).into();
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    Some(state_dir()?.join("uploads").join(hex))
}

fn read_tracker(path: Option<&Path>) -> Option<Tracker> {
    serde_json::from_slice(&std::fs::read(path?).ok()?).ok()
}

fn write_tracker(path: Option<&Path>, t: &Tracker) {
    let Some(path) = path else { return };
    // Best effort: without a tracker the upload still works, it just cannot
    // resume in a later run.
    let _ = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .and_then(|_| std::fs::write(path, serde_json::to_vec(t).expect("serializes")));
}

/// The session's path and query, from the absolute `Location` the server gave.
fn session_path(location: &str) -> Result<String> {
    let url = reqwest::Url::parse(location)
        .map_err(|e| anyhow!("the server gave an invalid upload session URL {location:?}: {e}"))?;
    Ok(match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    })
}

/// Bytes the server holds for a session, from a 308's `Range: bytes=0-N`.
fn received_from(resp: &reqwest::Response) -> Result<u64> {
    let Some(range) = resp.headers().get("range") else {
        return Ok(0);
    };
    let r = range.to_str().unwrap_or("");
    r.strip_prefix("bytes=0-")
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|n| n + 1)
        .ok_or_else(|| anyhow!("the server sent an unexpected Range header {r:?}"))
}

/// Where a session stands.
enum Status {
    Received(u64),
    Done(Value),
    /// Expired, cancelled, or from another server's data.
    Gone,
}

async fn session_status(api: &Api, session: &str, size: u64) -> Result<Status> {
    let resp = api
        .send(
            Method::PUT,
            session,
            &[],
            &[("content-range", format!("bytes */{size}"))],
            Some(Vec::new().into()),
        )
        .await;
    let resp = match resp {
        Ok(r) => r,
        // Storage errors carry the HTTP code ("404"), Pub/Sub-style ones the name.
        Err(e)
            if e.downcast_ref::<super::api::ServerError>()
                .is_some_and(|s| s.code == "404" || s.code == "NOT_FOUND") =>
        {
            return Ok(Status::Gone)
        }
        Err(e) => return Err(e),
    };
    if resp.status() == reqwest::StatusCode::PERMANENT_REDIRECT {
        return Ok(Status::Received(received_from(&resp)?));
    }
    Ok(Status::Done(json_body(api, resp, session).await?))
}

async fn resumable_upload(
    api: &Api,
    src: &Path,
    size: u64,
    d: &Digests,
    bucket: &str,
    name: &str,
) -> Result<Value> {
    let dst = gcs_url(bucket, name);
    let tracker = tracker_path(api, src, d, size, bucket, name);
    let mut offset = 0u64;
    let mut session = None;
    if let Some(t) = read_tracker(tracker.as_deref()) {
        match session_status(api, &t.session, size).await? {
            Status::Done(obj) => {
                let _ = tracker.as_ref().map(std::fs::remove_file);
                return Ok(obj);
            }
            Status::Received(n) => {
                eprintln!(
                    "resuming the upload of {} to {dst} at byte {n} of {size}",
                    src.display()
                );
                offset = n;
                session = Some(t.session);
            }
            Status::Gone => {
                eprintln!("the earlier upload session for {dst} is gone; starting over");
            }
        }
    }
    let session = match session {
        Some(s) => s,
        None => {
            let path = format!("/upload/storage/v1/b/{}/o", segment(bucket));
            let meta = json!({
                "name": name,
                "contentType": "application/octet-stream",
                // The server refuses to commit bytes that do not match.
                "crc32c": d.crc_b64(),
                "md5Hash": d.md5_b64(),
            });
            let resp = api
                .send(
                    Method::POST,
                    &path,
                    &[("uploadType", "resumable"), ("name", name)],
                    &[
                        ("content-type", "application/json".into()),
                        ("x-upload-content-length", size.to_string()),
                    ],
                    Some(serde_json::to_vec(&meta)?.into()),
                )
                .await
                .with_context(|| format!("starting the upload of {} to {dst}", src.display()))?;
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    anyhow!("the server started an upload session without a Location")
                })?;
            let s = session_path(location)?;
            write_tracker(tracker.as_deref(), &Tracker { session: s.clone() });
            s
        }
    };

    let stop_after: Option<u32> = std::env::var(STOP_AFTER_CHUNKS_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let bar = progress(size, &format!("{} -> {dst}", src.display()));
    bar.set_position(offset);
    let mut file = tokio::fs::File::open(src)
        .await
        .with_context(|| format!("cannot open {}", src.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut chunks = 0u32;
    let mut failures = 0u32;
    loop {
        let n = (size - offset).min(CHUNK as u64) as usize;
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        file.read_exact(&mut buf[..n])
            .await
            .with_context(|| format!("{} changed while it was being copied", src.display()))?;
        let range = if n == 0 {
            format!("bytes */{size}")
        } else {
            format!("bytes {offset}-{}/{size}", offset + n as u64 - 1)
        };
        let sent = api
            .send(
                Method::PUT,
                &session,
                &[],
                &[("content-range", range)],
                Some(buf[..n].to_vec().into()),
            )
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e)
                if e.downcast_ref::<super::api::TransportError>().is_some()
                    && failures + 1 < CHUNK_ATTEMPTS =>
            {
                // The connection broke mid-chunk: ask how much arrived and go on from there.
                failures += 1;
                eprintln!("upload of {dst} interrupted ({e:#}); resuming");
                match session_status(api, &session, size).await? {
                    Status::Received(r) => offset = r,
                    Status::Done(obj) => {
                        bar.finish_and_clear();
                        let _ = tracker.as_ref().map(std::fs::remove_file);
                        return Ok(obj);
                    }
                    Status::Gone => {
                        bail!("the upload session for {dst} disappeared; run the command again")
                    }
                }
                continue;
            }
            Err(e) => return Err(e.context(format!("uploading {} to {dst}", src.display()))),
        };
        if resp.status() != reqwest::StatusCode::PERMANENT_REDIRECT {
            bar.finish_and_clear();
            let obj = json_body(api, resp, &session).await?;
            if let Some(t) = &tracker {
                let _ = std::fs::remove_file(t);
            }
            return Ok(obj);
        }
        let received = received_from(&resp)?;
        if received <= offset && n > 0 {
            failures += 1;
            if failures >= CHUNK_ATTEMPTS {
                bail!("the server keeps refusing the bytes of {dst} at offset {offset}");
            }
        }
        offset = received;
        bar.set_position(offset);
        chunks += 1;
        if stop_after.is_some_and(|s| chunks >= s) {
            bar.abandon();
            eprintln!("stopping after {chunks} chunks ({STOP_AFTER_CHUNKS_ENV})");
            std::process::exit(3);
        }
    }
}

/// A bar on standard error for transfers above the threshold, when it is a
/// terminal; hidden otherwise (indicatif checks).
fn progress(size: u64, label: &str) -> indicatif::ProgressBar {
    if size <= RESUMABLE_THRESHOLD {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(size),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(label.to_string());
    bar
}

// ------------------------------------------------------------------ download

/// Streams an object into `out`; fails when the bytes do not match the
/// object's size and checksums (`meta` is its resource, whose generation
/// is pinned so a concurrent overwrite cannot mix two versions).
async fn download<W: tokio::io::AsyncWrite + Unpin>(
    api: &Api,
    bucket: &str,
    object: &str,
    meta: &Value,
    out: &mut W,
    show_progress: bool,
) -> Result<u64> {
    let url = gcs_url(bucket, object);
    let field = |k: &str| meta.get(k).and_then(Value::as_str).map(str::to_string);
    let size: u64 = field("size").and_then(|s| s.parse().ok()).unwrap_or(0);
    let generation = field("generation").unwrap_or_default();
    let path = object_path(bucket, object);
    let mut query = vec![("alt", "media")];
    if !generation.is_empty() {
        query.push(("generation", generation.as_str()));
    }
    let mut resp = api
        .send(Method::GET, &path, &query, &[], None)
        .await
        .with_context(|| format!("downloading {url}"))?;
    let bar = if show_progress {
        progress(size, &url)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut h = Hasher::default();
    let mut n = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| api.body_error(&Method::GET, &path, &e))?
    {
        h.update(&chunk);
        out.write_all(&chunk).await?;
        n += chunk.len() as u64;
        bar.set_position(n);
    }
    bar.finish_and_clear();
    let d = h.finish();
    if n != size {
        bail!("download of {url} is incomplete: got {n} of {size} bytes");
    }
    if let Some(want) = field("crc32c") {
        if want != d.crc_b64() {
            bail!(
                "checksum mismatch downloading {url}: the object's crc32c is {want}, the bytes received have {} — the copy is corrupt",
                d.crc_b64()
            );
        }
    }
    if let Some(want) = field("md5Hash") {
        if want != d.md5_b64() {
            bail!(
                "checksum mismatch downloading {url}: the object's md5 is {want}, the bytes received have {} — the copy is corrupt",
                d.md5_b64()
            );
        }
    }
    Ok(n)
}

/// Download into `DST.pubrun-part`, then rename: DST never holds a partial
/// or unverified copy.
async fn download_to_file(
    api: &Api,
    bucket: &str,
    object: &str,
    meta: &Value,
    dst: &Path,
) -> Result<()> {
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut part = dst.as_os_str().to_owned();
    part.push(".pubrun-part");
    let part = PathBuf::from(part);
    let mut file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("cannot create {}", part.display()))?;
    let result = async {
        let n = download(api, bucket, object, meta, &mut file, true).await?;
        file.flush().await?;
        file.sync_all().await?;
        Ok::<_, anyhow::Error>(n)
    }
    .await;
    drop(file);
    match result {
        Ok(n) => {
            tokio::fs::rename(&part, dst)
                .await
                .with_context(|| format!("cannot write {}", dst.display()))?;
            println!(
                "{} -> {} ({n} bytes)",
                gcs_url(bucket, object),
                dst.display()
            );
            Ok(())
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(e)
        }
    }
}

/// Every object of `bucket` under `prefix`, page after page.
pub(super) async fn list(api: &Api, bucket: &str, prefix: &str) -> Result<Vec<Value>> {
    let path = format!("/storage/v1/b/{}/o", segment(bucket));
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let mut q = vec![("prefix", prefix)];
        if !token.is_empty() {
            q.push(("pageToken", token.as_str()));
        }
        let resp = api.call(Method::GET, &path, &q, None).await?;
        items.extend(
            resp.get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
        match resp.get("nextPageToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() && t != token => token = t.to_string(),
            _ => return Ok(items),
        }
    }
}

/// The objects `-r` means: the object named PREFIX and those under PREFIX/.
async fn list_tree(api: &Api, bucket: &str, object: &str) -> Result<(String, Vec<Value>)> {
    let base = object.trim_end_matches('/');
    let prefix = if base.is_empty() {
        String::new()
    } else {
        format!("{base}/")
    };
    let mut items = list(api, bucket, &prefix).await?;
    if !base.is_empty() {
        if let Ok(o) = api.get(&object_path(bucket, base)).await {
            items.insert(0, o);
        }
    }
    Ok((prefix, items))
}

async fn download_tree(api: &Api, bucket: &str, object: &str, dst: &Path) -> Result<()> {
    let (prefix, items) = list_tree(api, bucket, object)
        .await
        .with_context(|| format!("cannot copy {}", gcs_url(bucket, object)))?;
    if items.is_empty() {
        bail!("no objects match {}", gcs_url(bucket, object));
    }
    let base = object.trim_end_matches('/');
    // gs://B/a/dir -> DST/dir/...; gs://B -> DST/...
    let root = match base.rsplit('/').next() {
        Some(last) if !last.is_empty() => dst.join(safe_relative(last)?),
        _ => dst.to_path_buf(),
    };
    for o in items {
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let target = if name == base {
            root.clone()
        } else {
            root.join(safe_relative(name.strip_prefix(&prefix).unwrap_or(&name))?)
        };
        download_to_file(api, bucket, &name, &o, &target).await?;
    }
    Ok(())
}

// ------------------------------------------------------------------ rm

async fn rm(api: &Api, bucket: &str, object: &str, recursive: bool) -> Result<()> {
    let names: Vec<String> = if recursive {
        let (_, items) = list_tree(api, bucket, object)
            .await
            .with_context(|| format!("cannot remove {}", gcs_url(bucket, object)))?;
        if items.is_empty() {
            bail!("no objects match {}", gcs_url(bucket, object));
        }
        items
            .iter()
            .filter_map(|o| o.get("name").and_then(Value::as_str).map(str::to_string))
            .collect()
    } else {
        if object.is_empty() || object.ends_with('/') {
            bail!(
                "{} names no object; pass -r to remove every object under it",
                gcs_url(bucket, object)
            );
        }
        vec![object.to_string()]
    };
    for name in names {
        api.delete(&object_path(bucket, &name))
            .await
            .with_context(|| format!("cannot remove {}", gcs_url(bucket, &name)))?;
        println!("removed {}", gcs_url(bucket, &name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("gs://b/a/c.txt").unwrap(),
            Location::Gcs {
                bucket: "b".into(),
                object: "a/c.txt".into()
            }
        );
        assert_eq!(
            parse_location("gs://b").unwrap(),
            Location::Gcs {
                bucket: "b".into(),
                object: "".into()
            }
        );
        assert_eq!(
            parse_location("./x").unwrap(),
            Location::Local("./x".into())
        );
        assert!(parse_location("gs:///o").is_err());
        assert!(parse_location("s3://b/o").is_err());
    }

    #[test]
    fn folders_and_names() {
        assert_eq!(folder("", "tree"), "tree/");
        assert_eq!(folder("up/", "tree"), "up/tree/");
        assert_eq!(folder("up", "tree"), "up/tree/");
        assert_eq!(safe_relative("a//b/./c").unwrap(), PathBuf::from("a/b/c"));
        assert!(safe_relative("a/../../etc/passwd").is_err());
        assert!(safe_relative("/").is_err());
        assert_eq!(safe_relative("/abs").unwrap(), PathBuf::from("abs"));
    }

    #[test]
    fn digests_match_googles_encoding() {
        let mut h = Hasher::default();
        h.update(b"hello world");
        let d = h.finish();
        // Values from the server's own tests (crates/buckets/src/hash.rs).
        assert_eq!(d.crc_b64(), "yZRlqg==");
        assert_eq!(d.md5_b64(), "XrY7u+Ae7tCTyyK7j1rNww==");
    }
}
