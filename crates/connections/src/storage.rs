//! Cloud Storage JSON API as a client: list, download (size and CRC32C
//! checked against the object's metadata) and resumable upload (CRC32C
//! declared up front, so the server refuses a corrupted object, and checked
//! again against what it stored).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use pubrun_core::connection::ConnectionSpec;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::credentials::TokenSource;
use crate::error::{ConnError, ErrorKind};

/// Bytes per upload request; a multiple of 256 KiB as Google requires.
pub const CHUNK: u64 = 8 << 20;
const ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct RemoteStorage {
    connection: String,
    endpoint: String,
    http: reqwest::Client,
    tokens: Arc<TokenSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectInfo {
    pub name: String,
    #[serde(default)]
    pub bucket: String,
    #[serde(default, deserialize_with = "de_u64")]
    pub size: u64,
    #[serde(default)]
    pub crc32c: Option<String>,
    #[serde(default)]
    pub generation: Option<String>,
}

fn de_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    // The JSON API sends int64 as strings.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        N(u64),
    }
    match N::deserialize(d)? {
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
        N::N(n) => Ok(n),
    }
}

/// CRC32C as the JSON API writes it: base64 of the big-endian value.
pub fn crc32c_b64(c: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes())
}

impl RemoteStorage {
    pub fn new(
        spec: &ConnectionSpec,
        tokens: Arc<TokenSource>,
        http: reqwest::Client,
    ) -> RemoteStorage {
        RemoteStorage {
            connection: spec.name.clone(),
            endpoint: spec.storage_endpoint.clone(),
            http,
            tokens,
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = Url::parse(&self.endpoint).expect("endpoint checked by the manifest");
        u.path_segments_mut()
            .expect("http(s) URL")
            .pop_if_empty()
            .extend(segments);
        u
    }

    fn err(&self, resource: &str, kind: ErrorKind, m: impl Into<String>) -> ConnError {
        ConnError::new(&self.connection, resource, kind, m)
    }

    /// Sends with a fresh token; an answer other than success (or 308, the
    /// resumable upload's "go on") is an error.
    async fn send(
        &self,
        resource: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ConnError> {
        let token = self.tokens.token().await?;
        let resp = rb.bearer_auth(token.secret()).send().await.map_err(|e| {
            let mut c = ConnError::from_reqwest(&self.connection, resource, &e);
            if e.is_connect() {
                c.message = format!("{} unreachable: {}", self.endpoint, c.message);
            }
            c
        })?;
        self.check(resource, resp).await
    }

    async fn check(
        &self,
        resource: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, ConnError> {
        let status = resp.status();
        if status.is_success() || status == StatusCode::PERMANENT_REDIRECT {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            self.tokens.invalidate().await;
        }
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.chars().take(300).collect());
        Err(self.err(
            resource,
            ErrorKind::from_http(status.as_u16()),
            format!("{status}: {msg}"),
        ))
    }

    /// Retries what is worth retrying (network, 429, 5xx) with backoff.
    async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, ConnError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ConnError>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match f().await {
                Err(e) if e.kind.is_retryable() && attempt < ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "storage request failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    pub async fn object(&self, bucket: &str, name: &str) -> Result<ObjectInfo, ConnError> {
        let res = format!("gs://{bucket}/{name}");
        self.retrying(|| async {
            let r = self
                .send(
                    &res,
                    self.http
                        .get(self.url(&["storage", "v1", "b", bucket, "o", name])),
                )
                .await?;
            r.json::<ObjectInfo>()
                .await
                .map_err(|e| ConnError::from_reqwest(&self.connection, &res, &e))
        })
        .await
    }

    /// Every object whose name starts with `prefix`, in name order.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>, ConnError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            items: Vec<ObjectInfo>,
            next_page_token: Option<String>,
        }
        let res = format!("gs://{bucket}/{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut u = self.url(&["storage", "v1", "b", bucket, "o"]);
            u.query_pairs_mut().append_pair("prefix", prefix);
            if let Some(t) = &token {
                u.query_pairs_mut().append_pair("pageToken", t);
            }
            let page: Page = self
                .retrying(|| async {
                    let r = self.send(&res, self.http.get(u.clone())).await?;
                    r.json::<Page>()
                        .await
                        .map_err(|e| ConnError::from_reqwest(&self.connection, &res, &e))
                })
                .await?;
            out.extend(page.items);
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Downloads one object to `dest` (created or replaced), checking its
    /// size and CRC32C; returns the size.
    pub async fn download(&self, bucket: &str, name: &str, dest: &Path) -> Result<u64, ConnError> {
        let res = format!("gs://{bucket}/{name}");
        let info = self.object(bucket, name).await?;
        self.retrying(|| async {
            let mut u = self.url(&["storage", "v1", "b", bucket, "o", name]);
            u.query_pairs_mut().append_pair("alt", "media");
            if let Some(g) = &info.generation {
                // The generation whose checksum we hold, not a newer one.
                u.query_pairs_mut().append_pair("generation", g);
            }
            let r = self.send(&res, self.http.get(u)).await?;
            let io = |e: std::io::Error| {
                self.err(&res, ErrorKind::Other, format!("{}: {e}", dest.display()))
            };
            let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
            let mut crc = 0u32;
            let mut n = 0u64;
            let mut body = r.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| ConnError::from_reqwest(&self.connection, &res, &e))?;
                crc = crc32c::crc32c_append(crc, &chunk);
                n += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(io)?;
            }
            file.flush().await.map_err(io)?;
            if n != info.size {
                return Err(self.err(
                    &res,
                    ErrorKind::Integrity,
                    format!("received {n} bytes, the object has {}", info.size),
                ));
            }
            if let Some(want) = &info.crc32c {
                if &crc32c_b64(crc) != want {
                    return Err(self.err(
                        &res,
                        ErrorKind::Integrity,
                        format!(
                            "CRC32C {} of the received data, the object's is {want}",
                            crc32c_b64(crc)
                        ),
                    ));
                }
            }
            Ok(n)
        })
        .await
    }

    /// Uploads a file with a resumable session, in [`CHUNK`]s; a failed
    /// chunk is resumed from what the server says it has.
    pub async fn upload(
        &self,
        bucket: &str,
        name: &str,
        src: &Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ObjectInfo, ConnError> {
        let res = format!("gs://{bucket}/{name}");
        let io =
            |e: std::io::Error| self.err(&res, ErrorKind::Other, format!("{}: {e}", src.display()));
        // Checksum first: declared with the session, the server checks it.
        let (size, crc) = {
            let mut f = tokio::fs::File::open(src).await.map_err(io)?;
            let mut buf = vec![0u8; 1 << 16];
            let (mut n, mut crc) = (0u64, 0u32);
            loop {
                let k = f.read(&mut buf).await.map_err(io)?;
                if k == 0 {
                    break;
                }
                crc = crc32c::crc32c_append(crc, &buf[..k]);
                n += k as u64;
            }
            (n, crc32c_b64(crc))
        };
        let session: Url = self
            .retrying(|| async {
                let mut u = self.url(&["upload", "storage", "v1", "b", bucket, "o"]);
                u.query_pairs_mut()
                    .append_pair("uploadType", "resumable")
                    .append_pair("name", name);
                let body = serde_json::json!({ "name": name, "metadata": metadata, "crc32c": crc });
                let r = self
                    .send(
                        &res,
                        self.http
                            .post(u)
                            .header("X-Upload-Content-Length", size)
                            .json(&body),
                    )
                    .await?;
                let loc = r
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        self.err(
                            &res,
                            ErrorKind::Other,
                            "no Location in the resumable session's answer",
                        )
                    })?;
                Url::parse(loc)
                    .map_err(|e| self.err(&res, ErrorKind::Other, format!("session URL: {e}")))
            })
            .await?;
        let mut offset = 0u64;
        let mut failures = 0;
        let mut file = tokio::fs::File::open(src).await.map_err(io)?;
        loop {
            let len = (size - offset).min(CHUNK);
            let mut buf = vec![0u8; len as usize];
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(io)?;
            file.read_exact(&mut buf).await.map_err(io)?;
            let range = if size == 0 {
                "bytes */0".to_string()
            } else {
                format!("bytes {offset}-{}/{size}", offset + len - 1)
            };
            let chunk = self
                .http
                .put(session.clone())
                .header("Content-Range", range)
                .body(buf);
            let sent = self.send(&res, chunk).await;
            match sent {
                Ok(r) if r.status() == StatusCode::PERMANENT_REDIRECT => {
                    offset = committed(&r).unwrap_or(offset + len);
                }
                Ok(r) => {
                    let info: ObjectInfo = r
                        .json()
                        .await
                        .map_err(|e| ConnError::from_reqwest(&self.connection, &res, &e))?;
                    if info.crc32c.as_deref().is_some_and(|c| c != crc) || info.size != size {
                        return Err(self.err(&res, ErrorKind::Integrity, format!(
                            "stored object has size {} CRC32C {:?}; sent {size} bytes with CRC32C {crc}",
                            info.size, info.crc32c
                        )));
                    }
                    return Ok(info);
                }
                Err(e) if e.kind.is_retryable() && failures + 1 < ATTEMPTS => {
                    failures += 1;
                    tracing::warn!(error = %e, "upload chunk failed; asking the session where to resume");
                    tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    let ask = self
                        .http
                        .put(session.clone())
                        .header("Content-Range", format!("bytes */{size}"));
                    let status = self.send(&res, ask).await;
                    match status {
                        Ok(r) if r.status() == StatusCode::PERMANENT_REDIRECT => {
                            offset = committed(&r).unwrap_or(0)
                        }
                        Ok(r) => {
                            return r
                                .json()
                                .await
                                .map_err(|e| ConnError::from_reqwest(&self.connection, &res, &e));
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The next offset after a 308: one past the end of its `Range: bytes=0-N`.
fn committed(r: &reqwest::Response) -> Option<u64> {
    match r.headers().get("range").and_then(|v| v.to_str().ok()) {
        Some(v) => v.rsplit('-').next()?.parse::<u64>().ok().map(|n| n + 1),
        None => Some(0),
    }
}
