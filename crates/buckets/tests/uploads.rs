//! Multipart and resumable uploads over real HTTP, integrity checks, and a
//! resumable upload that survives an interrupted request and a restart.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

fn multipart_body(meta: &Value, content_type: &str, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = "===============7330845974216740156==";
    let mut body = format!(
        "--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n--{boundary}\r\ncontent-type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--").as_bytes());
    (format!("multipart/related; boundary=\"{boundary}\""), body)
}

#[tokio::test]
async fn multipart_uploads_and_integrity_checks() {
    let (_dir, _, s) = start_with_bucket("bkt").await;
    // Data that contains boundary-like bytes.
    let mut d = data(2_000_000, 3);
    d.extend_from_slice(b"\r\n--===============7330845974216740156=");
    d.extend_from_slice(&data(1000, 4));
    let (md5, crc) = hashes(&d);

    let post = |meta: Value, data: Vec<u8>, query: &'static str| {
        let (ct, body) = multipart_body(&meta, "application/x-thing", &data);
        let req = s
            .http
            .post(s.url(&format!(
                "/upload/storage/v1/b/bkt/o?uploadType=multipart{query}"
            )))
            .header("content-type", ct)
            .body(body);
        async move { req.send().await.unwrap() }
    };
    let r = post(json!({"name": "m/one", "metadata": {"who": "me"}, "md5Hash": md5, "crc32c": crc, "cacheControl": "private"}), d.clone(), "").await;
    assert_eq!(r.status(), 200);
    let o: Value = r.json().await.unwrap();
    assert_eq!(o["name"], "m/one");
    assert_eq!(
        o["contentType"], "application/x-thing",
        "media part type is used when metadata has none"
    );
    assert_eq!(o["metadata"]["who"], "me");
    assert_eq!(o["cacheControl"], "private");
    assert_eq!(o["md5Hash"], md5.as_str());
    assert_eq!(o["size"], d.len().to_string());
    assert_eq!(s.get_bytes("bkt", "m/one").await, d);

    // Name in the query wins; contentType in metadata wins.
    let r = post(
        json!({"name": "ignored", "contentType": "text/csv"}),
        b"a,b".to_vec(),
        "&name=m%2Ftwo",
    )
    .await;
    let o: Value = r.json().await.unwrap();
    assert_eq!(
        (o["name"].as_str(), o["contentType"].as_str()),
        (Some("m/two"), Some("text/csv"))
    );

    // Wrong checksums → 400 (naming the checksum), nothing stored.
    for (meta, names) in [
        (
            json!({"name": "bad-md5", "md5Hash": hashes(b"other").0}),
            "MD5",
        ),
        (
            json!({"name": "bad-crc", "crc32c": hashes(b"other").1}),
            "CRC32C",
        ),
        (json!({"name": "bad-format", "md5Hash": "not base64!"}), ""),
    ] {
        let (status, _, msg) = error_of(post(meta, d.clone(), "").await).await;
        assert_eq!(status, 400);
        assert!(msg.contains(names), "{msg}");
    }
    for n in ["bad-md5", "bad-crc", "bad-format"] {
        let (st, _) = s.get_json(&format!("/storage/v1/b/bkt/o/{n}")).await;
        assert_eq!(st, 404, "{n} must not exist");
    }
    // x-goog-hash on a simple upload: a wrong one is refused, right ones pass.
    for (hash, status) in [
        (format!("crc32c={}", hashes(b"other").1), 400),
        (format!("crc32c={crc},md5={md5}"), 200),
    ] {
        let r = s
            .http
            .post(s.url("/upload/storage/v1/b/bkt/o?uploadType=media&name=h"))
            .header("x-goog-hash", hash)
            .body(d.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }

    // Malformed multipart bodies: (content type, body).
    for (content_type, body) in [
        (
            "multipart/related; boundary=xx",
            "--xx\r\ncontent-type: application/json\r\n\r\n{\"name\":\"t\"}\r\n--xx\r\n\r\ntruncated",
        ),
        ("application/json", "{}"),
    ] {
        let r = s
            .http
            .post(s.url("/upload/storage/v1/b/bkt/o?uploadType=multipart"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(r).await.0, 400);
    }
    let r = post(json!({"name": "a\nb"}), b"x".to_vec(), "").await;
    assert_eq!(error_of(r).await.0, 400);
    let r = post(
        json!({"name": "m/one"}),
        b"x".to_vec(),
        "&ifGenerationMatch=0",
    )
    .await;
    assert_eq!(error_of(r).await.0, 412);
    s.stop().await;
}

async fn initiate(
    s: &Server,
    name: &str,
    total: Option<usize>,
    meta: Value,
    query: &str,
) -> reqwest::Response {
    let mut req = s
        .http
        .post(s.url(&format!(
            "/upload/storage/v1/b/bkt/o?uploadType=resumable&name={}{query}",
            enc(name)
        )))
        .header("x-upload-content-type", "application/octet-stream")
        .json(&meta);
    if let Some(t) = total {
        req = req.header("x-upload-content-length", t.to_string());
    }
    req.send().await.unwrap()
}

async fn session(s: &Server, name: &str, total: usize) -> String {
    let r = initiate(
        s,
        name,
        Some(total),
        json!({"metadata": {"kind": "big"}}),
        "",
    )
    .await;
    assert_eq!(r.status(), 200);
    r.headers()["location"].to_str().unwrap().to_string()
}

/// A PUT of `body` to a resumable session with the given `Content-Range`.
async fn put_range(
    s: &Server,
    url: &str,
    range: impl AsRef<str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    s.http
        .put(url)
        .header("content-range", range.as_ref())
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn put_chunk(
    s: &Server,
    url: &str,
    d: &[u8],
    start: usize,
    end: usize,
    total: Option<usize>,
) -> reqwest::Response {
    let total = total.map(|t| t.to_string()).unwrap_or_else(|| "*".into());
    put_range(
        s,
        url,
        format!("bytes {start}-{}/{total}", end - 1),
        d[start..end].to_vec(),
    )
    .await
}

/// The persisted offset: 308 with `Range: bytes=0-N` → N+1 (no header → 0).
async fn status(s: &Server, url: &str, total: Option<usize>) -> (u16, usize) {
    let total = total.map(|t| t.to_string()).unwrap_or_else(|| "*".into());
    let r = s
        .http
        .put(url)
        .header("content-range", format!("bytes */{total}"))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let n = match r.headers().get("range") {
        Some(v) => {
            v.to_str()
                .unwrap()
                .strip_prefix("bytes=0-")
                .unwrap()
                .parse::<usize>()
                .unwrap()
                + 1
        }
        None => 0,
    };
    (code, n)
}

#[tokio::test]
async fn resumable_upload_of_30_mib_with_an_interrupted_chunk() {
    let (dir, _, s) = start_with_bucket("bkt").await;
    let total = 30 * 1024 * 1024 + 12345;
    let d = data(total, 11);
    let (md5, crc) = hashes(&d);
    let url = session(&s, "big/file.bin", total).await;
    assert!(
        url.starts_with(&s.base) && url.contains("upload_id="),
        "{url}"
    );
    assert_eq!(status(&s, &url, None).await, (308, 0));

    let chunk = 4 * 1024 * 1024;
    let mut off = 0;
    // Three good chunks.
    for _ in 0..3 {
        let r = put_chunk(&s, &url, &d, off, off + chunk, Some(total)).await;
        assert_eq!(r.status(), 308);
        off += chunk;
        assert_eq!(
            r.headers()["range"].to_str().unwrap(),
            format!("bytes=0-{}", off - 1)
        );
    }
    // A chunk whose request dies after 1 MiB.
    let part = Bytes::copy_from_slice(&d[off..off + 1024 * 1024]);
    let stream = futures::stream::iter(vec![
        Ok::<Bytes, std::io::Error>(part),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client died",
        )),
    ]);
    let r = s
        .http
        .put(&url)
        .header(
            "content-range",
            format!("bytes {off}-{}/{total}", off + chunk - 1),
        )
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Ask where we are, resume from exactly there.
    let (code, persisted) = status(&s, &url, Some(total)).await;
    assert_eq!(code, 308);
    assert!(
        persisted >= off && persisted <= off + 1024 * 1024,
        "persisted {persisted}, sent through {}",
        off + 1024 * 1024
    );
    off = persisted;
    // Re-sending bytes the server already has is harmless (they are skipped).
    let back = off.saturating_sub(1000).max(3 * chunk);
    let r = put_chunk(&s, &url, &d, back, back + chunk, Some(total)).await;
    assert_eq!(r.status(), 308);
    off = back + chunk;
    // A chunk starting beyond what the server has is refused.
    let r = put_chunk(&s, &url, &d, off + 10, off + 20, Some(total)).await;
    assert_eq!(error_of(r).await.0, 400);
    while off < total {
        let end = (off + chunk).min(total);
        let r = put_chunk(&s, &url, &d, off, end, Some(total)).await;
        if end == total {
            assert_eq!(r.status(), 200);
            let o: Value = r.json().await.unwrap();
            assert_eq!(o["size"], total.to_string());
            assert_eq!(o["md5Hash"], md5.as_str());
            assert_eq!(o["crc32c"], crc.as_str());
            assert_eq!(o["metadata"]["kind"], "big");
        } else {
            assert_eq!(r.status(), 308);
        }
        off = end;
    }
    // The finished session answers with the object again.
    let r = s
        .http
        .put(&url)
        .header("content-range", format!("bytes */{total}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s.get("/storage/v1/b/bkt/o/big%2Ffile.bin?alt=media").await;
    assert_eq!(
        r.headers()["x-goog-hash"].to_str().unwrap(),
        format!("crc32c={crc},md5={md5}")
    );
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), total);
    assert!(got.as_ref() == d.as_slice());
    // Nothing is left in uploads/ or tmp/.
    assert_eq!(
        std::fs::read_dir(dir.path().join("buckets/uploads"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("buckets/tmp"))
            .unwrap()
            .count(),
        0
    );
    s.stop().await;
}

#[tokio::test]
async fn resumable_upload_survives_a_restart() {
    let (dir, broker, s) = start_with_bucket("bkt").await;
    let total = 3 * 1024 * 1024 + 7;
    let d = data(total, 5);
    let url = session(&s, "survivor", total).await;
    let r = put_chunk(&s, &url, &d, 0, 1024 * 1024, None).await;
    assert_eq!(r.status(), 308);
    let path_and_query = url.strip_prefix(&s.base).unwrap().to_string();
    s.stop().await;

    let s = start(dir.path(), broker.clone()).await;
    let url = s.url(&path_and_query);
    assert_eq!(status(&s, &url, None).await, (308, 1024 * 1024));
    let r = put_chunk(&s, &url, &d, 1024 * 1024, total, Some(total)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (st, o) = s.get_json("/storage/v1/b/bkt/o/survivor").await;
    assert_eq!(st, 200);
    assert_eq!(
        o["md5Hash"],
        hashes(&d).0.as_str(),
        "the hash was rebuilt from the persisted bytes"
    );
    assert_eq!(s.get_bytes("bkt", "survivor").await, d);
    s.stop().await;
}

#[tokio::test]
async fn resumable_edge_cases() {
    let (_dir, _, s) = start_with_bucket("bkt").await;

    // Unknown total until the last chunk; finish with `bytes */TOTAL`.
    let r = initiate(
        &s,
        "unknown-size",
        None,
        json!({"contentType": "text/plain"}),
        "",
    )
    .await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let d = data(1000, 9);
    assert_eq!(put_chunk(&s, &url, &d, 0, 1000, None).await.status(), 308);
    let r = s
        .http
        .put(&url)
        .header("content-range", "bytes */1000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o: Value = r.json().await.unwrap();
    assert_eq!(o["contentType"], "text/plain");
    assert_eq!(s.get_bytes("bkt", "unknown-size").await, d);

    // Whole object in one PUT without Content-Range.
    let r = initiate(&s, "one-shot", None, json!({}), "").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = s.http.put(&url).body("all at once").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.get_bytes("bkt", "one-shot").await, b"all at once");

    // Zero-byte object.
    let r = initiate(&s, "zero", Some(0), json!({}), "").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = s
        .http
        .put(&url)
        .header("content-range", "bytes */0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Checksum in the initiating metadata, checked at the end.
    let r = initiate(
        &s,
        "checked",
        Some(1000),
        json!({"md5Hash": hashes(b"nope").0}),
        "",
    )
    .await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = put_chunk(&s, &url, &d, 0, 1000, Some(1000)).await;
    assert_eq!(error_of(r).await.0, 400);
    let (st, _) = s.get_json("/storage/v1/b/bkt/o/checked").await;
    assert_eq!(st, 404);
    // x-goog-hash on the final chunk (as the Python client sends it).
    let r = initiate(&s, "checked2", Some(1000), json!({}), "").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = s
        .http
        .put(&url)
        .header("content-range", "bytes 0-999/1000")
        .header("x-goog-hash", format!("crc32c={}", hashes(b"nope").1))
        .body(d.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 400);

    // Preconditions: checked at start and at the end.
    s.put("bkt", "exists", "x").await;
    let r = initiate(&s, "exists", Some(3), json!({}), "&ifGenerationMatch=0").await;
    assert_eq!(error_of(r).await.0, 412);
    let r = initiate(&s, "race", Some(3), json!({}), "&ifGenerationMatch=0").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    s.put("bkt", "race", "someone else").await;
    let r = put_range(&s, &url, "bytes 0-2/3", "abc").await;
    assert_eq!(error_of(r).await.0, 412);
    assert_eq!(s.get_bytes("bkt", "race").await, b"someone else");

    // Cancel → 499; the session is gone.
    let r = initiate(&s, "cancelled", Some(10), json!({}), "").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = s.http.delete(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 499);
    let r = s
        .http
        .put(&url)
        .header("content-range", "bytes */10")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 404);
    let r = s
        .http
        .put(s.url("/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=../../etc"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 404);

    // Bad Content-Range, size mismatch, too many bytes.
    let r = initiate(&s, "strict", Some(10), json!({}), "").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = put_range(&s, &url, "bytes 0-9", "0123456789").await;
    assert_eq!(error_of(r).await.0, 400);
    let r = put_range(&s, &url, "bytes 0-9/11", "0123456789").await;
    assert_eq!(error_of(r).await.0, 400);
    let r = put_range(&s, &url, "bytes 0-4/10", "0123456789").await;
    assert_eq!(error_of(r).await.0, 400);
    assert_eq!(
        status(&s, &url, None).await,
        (308, 0),
        "a refused chunk stores nothing"
    );
    let r = put_range(&s, &url, "bytes 0-9/10", "0123456789").await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

/// Issue 11 item 6: the official client declares `crc32c`/`md5Hash` in the
/// object resource that opens the session and sends an `x-goog-hash` it
/// computed from the data with the last chunk. A wrong declared value must
/// fail the upload (400, nothing created, nothing published) even though that
/// header matches the data.
#[tokio::test]
async fn resumable_upload_checks_the_declared_checksums_at_finalize() {
    let (_dir, broker, s) = start_with_bucket("bkt").await;
    let sub = topic_with_sub(&broker, "events", "events-sub").await;
    let r = s
        .post_json(
            "/storage/v1/b/bkt/notificationConfigs",
            &json!({"topic": "projects/p/topics/events", "payload_format": "NONE"}),
        )
        .await;
    assert_eq!(r.status(), 200);

    let total = 300_000;
    let d = data(total, 21);
    let (md5, crc) = hashes(&d);
    let (wrong_md5, wrong_crc) = hashes(b"something else");
    let upload = |name: &'static str, meta: Value| {
        let (s, d, md5, crc) = (&s, &d, md5.clone(), crc.clone());
        async move {
            let r = initiate(s, name, Some(total), meta, "").await;
            assert_eq!(r.status(), 200);
            let url = r.headers()["location"].to_str().unwrap().to_string();
            let half = total / 2;
            assert_eq!(
                put_chunk(s, &url, d, 0, half, Some(total)).await.status(),
                308
            );
            s.http
                .put(&url)
                .header(
                    "content-range",
                    format!("bytes {half}-{}/{total}", total - 1),
                )
                .header("x-goog-hash", format!("crc32c={crc},md5={md5}"))
                .body(d[half..].to_vec())
                .send()
                .await
                .unwrap()
        }
    };

    let r = upload("bad-crc", json!({"name": "bad-crc", "crc32c": wrong_crc})).await;
    let (status, _, msg) = error_of(r).await;
    assert_eq!(status, 400);
    assert!(msg.contains("CRC32C"), "{msg}");
    let r = upload("bad-md5", json!({"name": "bad-md5", "md5Hash": wrong_md5})).await;
    let (status, _, msg) = error_of(r).await;
    assert_eq!(status, 400);
    assert!(msg.contains("MD5"), "{msg}");
    for n in ["bad-crc", "bad-md5"] {
        let (st, _) = s.get_json(&format!("/storage/v1/b/bkt/o/{n}")).await;
        assert_eq!(st, 404, "{n} must not exist");
    }
    // A wrong x-goog-hash with right declared values fails too.
    let r = initiate(
        &s,
        "bad-header",
        Some(3),
        json!({"crc32c": hashes(b"abc").1}),
        "",
    )
    .await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let r = s
        .http
        .put(&url)
        .header("content-range", "bytes 0-2/3")
        .header("x-goog-hash", format!("crc32c={wrong_crc}"))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 400);

    // Right declared values: created, and its notification is the only one.
    let r = upload(
        "good",
        json!({"name": "good", "crc32c": crc, "md5Hash": md5}),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(s.get_bytes("bkt", "good").await, d);
    let got = pull_n(&broker, &sub, 2, Duration::from_secs(3)).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|m| m.message.attributes["objectId"].as_str())
        .collect();
    assert_eq!(ids, ["good"], "a refused upload publishes nothing");
    s.stop().await;
}

/// Issue 11 item 13: `selfLink`, `mediaLink` and the session `Location` use
/// the server's base URL, never the request's `Host`/`X-Forwarded-Proto`.
#[tokio::test]
async fn links_ignore_the_request_host() {
    let (_dir, _, s) = start_with_bucket("bkt").await;
    // Sends as through a hostile proxy; the answer must be a 200.
    let evil = |req: reqwest::RequestBuilder| async {
        let r = req
            .header("host", "evil.example")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r
    };
    let check = |what: &str, link: &str| {
        assert!(
            link.starts_with(&format!("{}/", s.base)) && !link.contains("evil"),
            "{what}: {link}"
        );
    };
    let links = |what: &str, o: &Value, fields: &[&str]| {
        for f in fields {
            check(&format!("{what} {f}"), o[f].as_str().unwrap());
        }
    };

    let media = s.url("/upload/storage/v1/b/bkt/o?uploadType=media&name=a");
    let o: Value = evil(s.http.post(media).body("data"))
        .await
        .json()
        .await
        .unwrap();
    links("upload", &o, &["selfLink", "mediaLink"]);
    let get = s.http.get(s.url("/storage/v1/b/bkt/o/a"));
    let o: Value = evil(get).await.json().await.unwrap();
    links("get", &o, &["selfLink", "mediaLink"]);
    let b: Value = evil(s.http.get(s.url("/storage/v1/b/bkt")))
        .await
        .json()
        .await
        .unwrap();
    links("bucket", &b, &["selfLink"]);

    let resumable = s.url("/upload/storage/v1/b/bkt/o?uploadType=resumable&name=r");
    let r = evil(s.http.post(resumable).json(&json!({}))).await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    check("resumable Location", &url);
    let o: Value = evil(s.http.put(&url).body("resumed"))
        .await
        .json()
        .await
        .unwrap();
    links("resumable", &o, &["mediaLink"]);
    s.stop().await;
}

/// Issue 11 item 13: a total above the object size ceiling, or below the
/// bytes already received, is refused with 400 (it could never finish), and
/// the session stays usable.
#[tokio::test]
async fn resumable_upload_refuses_impossible_totals() {
    let (_dir, _, s) = start_with_bucket("bkt").await;
    let max = pubrun_buckets::MAX_OBJECT_SIZE;

    for v in [u64::MAX, max + 1] {
        let r = s
            .http
            .post(s.url("/upload/storage/v1/b/bkt/o?uploadType=resumable&name=x"))
            .header("x-upload-content-length", v.to_string())
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(r).await.0, 400, "X-Upload-Content-Length {v}");
    }

    let r = initiate(&s, "open-ended", None, json!({}), "").await;
    let url = r.headers()["location"].to_str().unwrap().to_string();
    let d = data(20, 2);
    for range in [
        format!("bytes 0-9/{}", u64::MAX),
        format!("bytes 0-9/{}", max + 1),
        format!("bytes {max}-{}/*", max + 9),
    ] {
        let r = put_range(&s, &url, &range, d[..10].to_vec()).await;
        assert_eq!(error_of(r).await.0, 400, "{range}");
    }
    let r = put_range(&s, &url, format!("bytes */{}", u64::MAX), "").await;
    assert_eq!(error_of(r).await.0, 400);
    assert_eq!(status(&s, &url, None).await, (308, 0), "nothing was stored");

    // 10 bytes received: a total of 5 contradicts them.
    assert_eq!(put_chunk(&s, &url, &d, 0, 10, None).await.status(), 308);
    let r = put_range(&s, &url, "bytes 0-4/5", d[..5].to_vec()).await;
    assert_eq!(error_of(r).await.0, 400);
    let r = put_range(&s, &url, "bytes */5", "").await;
    assert_eq!(error_of(r).await.0, 400);
    assert_eq!(status(&s, &url, None).await, (308, 10));
    let r = put_chunk(&s, &url, &d, 10, 20, Some(20)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(s.get_bytes("bkt", "open-ended").await, d);
    s.stop().await;
}
