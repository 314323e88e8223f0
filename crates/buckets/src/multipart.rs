//! Streaming request bodies: a small buffered reader over an axum body and
//! the `multipart/related` parser of `uploadType=multipart` (metadata part,
//! then media part streamed to a temp file, never held whole in memory).

use axum::body::{Body, BodyDataStream};
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{Map, Value};

use crate::blob::BlobWriter;
use crate::error::{GcsError, GcsResult};

pub struct BodyReader {
    stream: BodyDataStream,
    buf: BytesMut,
    eof: bool,
}

fn body_error(e: impl std::fmt::Display) -> GcsError {
    GcsError::bad_request(format!("reading the request body failed: {e}"))
}

impl BodyReader {
    pub fn new(body: Body) -> Self {
        BodyReader {
            stream: body.into_data_stream(),
            buf: BytesMut::new(),
            eof: false,
        }
    }

    /// Appends the next chunk of the body to the buffer; false at the end.
    async fn fill(&mut self) -> GcsResult<bool> {
        if self.eof {
            return Ok(false);
        }
        match self.stream.next().await {
            Some(Ok(b)) => {
                self.buf.extend_from_slice(&b);
                Ok(true)
            }
            Some(Err(e)) => Err(body_error(e)),
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// The next piece of the body (buffered bytes first); `None` at the end.
    pub async fn next_chunk(&mut self) -> GcsResult<Option<Bytes>> {
        if !self.buf.is_empty() {
            return Ok(Some(self.buf.split().freeze()));
        }
        if self.eof {
            return Ok(None);
        }
        match self.stream.next().await {
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(body_error(e)),
            None => {
                self.eof = true;
                Ok(None)
            }
        }
    }

    /// Bytes before the next `pat` (which is consumed). At most `max` bytes.
    pub async fn read_until(&mut self, pat: &[u8], max: usize, what: &str) -> GcsResult<Vec<u8>> {
        let mut searched = 0;
        loop {
            if let Some(pos) = memchr::memmem::find(&self.buf[searched..], pat) {
                let pos = searched + pos;
                let out = self.buf[..pos].to_vec();
                self.buf.advance(pos + pat.len());
                return Ok(out);
            }
            searched = self.buf.len().saturating_sub(pat.len() - 1);
            if self.buf.len() > max + pat.len() {
                return Err(GcsError::bad_request(format!(
                    "{what} is larger than {max} bytes"
                )));
            }
            if !self.fill().await? {
                return Err(GcsError::bad_request(format!(
                    "malformed multipart body: {what} is not terminated"
                )));
            }
        }
    }

    /// Streams the bytes before the next `pat` into `sink`; consumes `pat`.
    pub async fn stream_until(&mut self, pat: &[u8], sink: &mut BlobWriter) -> GcsResult<()> {
        loop {
            if let Some(pos) = memchr::memmem::find(&self.buf, pat) {
                sink.write(&self.buf[..pos]).await?;
                self.buf.advance(pos + pat.len());
                return Ok(());
            }
            // Everything but a possible partial delimiter at the end is data.
            let safe = self.buf.len().saturating_sub(pat.len() - 1);
            if safe > 0 {
                sink.write(&self.buf[..safe]).await?;
                self.buf.advance(safe);
            }
            if !self.fill().await? {
                return Err(GcsError::bad_request(
                    "malformed multipart body: the media part has no closing boundary",
                ));
            }
        }
    }

    async fn peek(&mut self, n: usize) -> GcsResult<&[u8]> {
        while self.buf.len() < n {
            if !self.fill().await? {
                break;
            }
        }
        Ok(&self.buf[..n.min(self.buf.len())])
    }
}

/// The `boundary` parameter of a `multipart/related` content type.
pub fn boundary(content_type: &str) -> GcsResult<String> {
    let mut parts = content_type.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if !mime.starts_with("multipart/") {
        return Err(GcsError::invalid(format!(
            "uploadType=multipart needs Content-Type multipart/related; boundary=..., not '{content_type}'"
        )));
    }
    for p in parts {
        if let Some((k, v)) = p.split_once('=') {
            if k.trim().eq_ignore_ascii_case("boundary") {
                let b = v.trim().trim_matches('"').to_string();
                if !b.is_empty() && b.len() <= 200 {
                    return Ok(b);
                }
            }
        }
    }
    Err(GcsError::invalid(
        "multipart Content-Type has no boundary parameter",
    ))
}

fn content_type_of(headers: &[u8]) -> Option<String> {
    String::from_utf8_lossy(headers)
        .split("\r\n")
        .find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
}

/// Parsed metadata of a multipart upload; the media went into the writer.
pub struct Multipart {
    pub metadata: Map<String, Value>,
    pub media_content_type: Option<String>,
}

/// Reads `--B CRLF headers CRLF CRLF {json} CRLF --B CRLF headers CRLF CRLF media CRLF --B--`.
pub async fn parse(
    reader: &mut BodyReader,
    boundary: &str,
    sink: &mut BlobWriter,
) -> GcsResult<Multipart> {
    let dash = format!("--{boundary}").into_bytes();
    let delim = format!("\r\n--{boundary}").into_bytes();
    // Preamble (normally empty) up to the first boundary.
    reader
        .read_until(&dash, 64 * 1024, "multipart preamble")
        .await?;
    let h1 = reader
        .read_until(b"\r\n\r\n", 64 * 1024, "metadata part headers")
        .await?;
    if let Some(ct) = content_type_of(&h1) {
        if !ct.to_ascii_lowercase().starts_with("application/json") {
            return Err(GcsError::invalid(format!(
                "the first part of a multipart upload must be the JSON metadata (application/json), not '{ct}'"
            )));
        }
    }
    let json = reader.read_until(&delim, 2 << 20, "metadata part").await?;
    let metadata = if json.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(&json) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(GcsError::invalid("the metadata part must be a JSON object")),
            Err(e) => {
                return Err(GcsError::invalid(format!(
                    "the metadata part is not valid JSON: {e}"
                )))
            }
        }
    };
    if reader.peek(2).await? == b"--" {
        return Err(GcsError::invalid(
            "multipart upload has no media part (expected metadata, then media)",
        ));
    }
    let h2 = reader
        .read_until(b"\r\n\r\n", 64 * 1024, "media part headers")
        .await?;
    reader.stream_until(&delim, sink).await?;
    if reader.peek(2).await? != b"--" {
        return Err(GcsError::invalid(
            "multipart upload has more than two parts (expected metadata, then media)",
        ));
    }
    Ok(Multipart {
        metadata,
        media_content_type: content_type_of(&h2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/related; boundary=\"===abc==\"").unwrap(),
            "===abc=="
        );
        assert_eq!(boundary("multipart/related;boundary=xyz").unwrap(), "xyz");
        assert!(boundary("application/json").is_err());
        assert!(boundary("multipart/related").is_err());
    }

    async fn run(body: Vec<u8>, chunk: usize) -> GcsResult<(Multipart, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn pubrun_store::buckets::BucketStore> = std::sync::Arc::new(
            pubrun_store::SqliteBucketStore::open(dir.path())
                .await
                .unwrap(),
        );
        let chunks: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut r = BodyReader::new(Body::from_stream(futures::stream::iter(chunks)));
        let mut w = BlobWriter::new(store.clone()).await.unwrap();
        let m = parse(&mut r, "BB", &mut w).await?;
        let t = w.finish().await.unwrap();
        let mut data = Vec::new();
        let mut f = store.read_blob(t.id(), 0).await.unwrap().unwrap();
        tokio::io::AsyncReadExt::read_to_end(&mut f, &mut data)
            .await
            .unwrap();
        Ok((m, data))
    }

    #[tokio::test]
    async fn parses_in_any_chunking() {
        let media: Vec<u8> = (0..5000u32)
            .map(|i| (i % 251) as u8)
            .chain(b"\r\n--B".iter().copied())
            .collect();
        let mut body = b"--BB\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n{\"name\":\"x\",\"metadata\":{\"k\":\"v\"}}\r\n--BB\r\ncontent-type: text/csv\r\n\r\n".to_vec();
        body.extend_from_slice(&media);
        body.extend_from_slice(b"\r\n--BB--");
        for chunk in [1, 2, 3, 7, 64, 4096, 1 << 20] {
            let (m, data) = run(body.clone(), chunk).await.unwrap();
            assert_eq!(m.metadata["name"], "x");
            assert_eq!(m.media_content_type.as_deref(), Some("text/csv"));
            assert_eq!(data, media, "chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn rejects_truncated_bodies() {
        let body = b"--BB\r\ncontent-type: application/json\r\n\r\n{}\r\n--BB\r\n\r\nabc".to_vec();
        assert_eq!(run(body, 5).await.err().unwrap().status, 400);
        let body = b"--BB\r\ncontent-type: application/json\r\n\r\n{}\r\n--BB--".to_vec();
        assert_eq!(run(body, 5).await.err().unwrap().status, 400);
    }
}
