//! Buckets and objects over real HTTP: lifecycle, downloads and ranges,
//! metadata, generations and preconditions, names that must not escape,
//! listing, copy/rewrite/compose, error shape.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn bucket_lifecycle() {
    let (_dir, _, s) = start_temp().await;

    let r = s
        .post_json(
            "/storage/v1/b?project=proj1",
            &json!({"name": "my-bucket", "labels": {"env": "test"}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["kind"], "storage#bucket");
    assert_eq!(b["name"], "my-bucket");
    assert_eq!(b["labels"]["env"], "test");
    assert_eq!(b["metageneration"], "1");

    let r = s
        .post_json("/storage/v1/b?project=proj1", &json!({"name": "my-bucket"}))
        .await;
    assert_eq!(error_of(r).await.0, 409);
    for bad in ["ab", "Upper", "-dash", "has space", "goog-x", "192.168.1.1"] {
        let r = s
            .post_json("/storage/v1/b?project=proj1", &json!({"name": bad}))
            .await;
        let (status, reason, msg) = error_of(r).await;
        assert_eq!((status, reason.as_str()), (400, "invalid"), "{bad}: {msg}");
    }
    let r = s
        .post_json(
            "/storage/v1/b?project=proj2",
            &json!({"name": "other-bucket"}),
        )
        .await;
    assert_eq!(r.status(), 200);

    let (st, v) = s.get_json("/storage/v1/b/my-bucket").await;
    assert_eq!((st, v["name"].as_str()), (200, Some("my-bucket")));
    let (_, v) = s.get_json("/storage/v1/b?project=proj1").await;
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["my-bucket"]);
    let (_, v) = s.get_json("/storage/v1/b?project=_").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let (_, v) = s.get_json("/storage/v1/b?project=_&maxResults=1").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let tok = v["nextPageToken"].as_str().unwrap().to_string();
    let (_, v2) = s
        .get_json(&format!(
            "/storage/v1/b?project=_&maxResults=1&pageToken={tok}"
        ))
        .await;
    assert_ne!(v2["items"][0]["name"], v["items"][0]["name"]);
    assert!(v2.get("nextPageToken").is_none());
    assert_eq!(
        s.get_error("/storage/v1/b").await.0,
        400,
        "project is required"
    );

    // Labels patch bumps metageneration.
    let r = s
        .patch_json(
            "/storage/v1/b/my-bucket",
            &json!({"labels": {"env": null, "team": "a"}}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["labels"], json!({"team": "a"}));
    assert_eq!(v["metageneration"], "2");

    s.put("my-bucket", "x", "data").await;
    let r = s.delete("/storage/v1/b/my-bucket").await;
    let (status, reason, _) = error_of(r).await;
    assert_eq!((status, reason.as_str()), (409, "conflict"));
    let r = s.delete("/storage/v1/b/my-bucket/o/x").await;
    assert_eq!(r.status(), 204);
    let r = s.delete("/storage/v1/b/my-bucket").await;
    assert_eq!(r.status(), 204);
    let (status, reason, _) = s.get_error("/storage/v1/b/my-bucket").await;
    assert_eq!((status, reason.as_str()), (404, "notFound"));
    s.stop().await;
}

#[tokio::test]
async fn upload_download_ranges_and_headers() {
    let (_dir, _, s) = start_with_bucket("bkt").await;
    let d = data(100_000, 1);
    let (md5, crc) = hashes(&d);
    let o = s.put("bkt", "dir/file.bin", d.clone()).await;
    assert_eq!(o["kind"], "storage#object");
    assert_eq!(o["name"], "dir/file.bin");
    assert_eq!(o["bucket"], "bkt");
    assert_eq!(o["size"], "100000");
    assert_eq!(o["md5Hash"], md5.as_str());
    assert_eq!(o["crc32c"], crc.as_str());
    assert_eq!(o["contentType"], "text/plain");
    assert_eq!(o["metageneration"], "1");
    let gen = o["generation"].as_str().unwrap().to_string();
    assert!(o["mediaLink"].as_str().unwrap().starts_with(&s.base));

    // Metadata, media by alt=media, by /download/ and by the mediaLink.
    let (st, m) = s.get_json("/storage/v1/b/bkt/o/dir%2Ffile.bin").await;
    assert_eq!(st, 200);
    assert_eq!(m["md5Hash"], md5.as_str());
    assert_eq!(s.get_bytes("bkt", "dir/file.bin").await, d);
    let r = s
        .get("/download/storage/v1/b/bkt/o/dir%2Ffile.bin?alt=media")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-goog-generation"], gen.as_str());
    assert_eq!(
        r.headers()["x-goog-hash"],
        format!("crc32c={crc},md5={md5}").as_str()
    );
    assert_eq!(r.headers()["content-length"], "100000");
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.bytes().await.unwrap().as_ref(), d.as_slice());
    let r = s
        .http
        .get(o["mediaLink"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), d.as_slice());

    // Ranges.
    let get_range = |range: &'static str| {
        let req = s
            .http
            .get(s.url("/storage/v1/b/bkt/o/dir%2Ffile.bin?alt=media"))
            .header("range", range);
        async move { req.send().await.unwrap() }
    };
    let r = get_range("bytes=10-19").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &d[10..20]);
    let r = get_range("bytes=99990-").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &d[99990..]);
    let r = get_range("bytes=-5").await;
    assert_eq!(r.headers()["content-range"], "bytes 99995-99999/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &d[99995..]);
    let r = get_range("bytes=50000-2000000").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().len(), 50000);
    let r = get_range("bytes=100000-").await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");

    // Generation selection: the live one works, another one is 404.
    let r = s
        .get(&format!(
            "/storage/v1/b/bkt/o/dir%2Ffile.bin?alt=media&generation={gen}"
        ))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.get_error("/storage/v1/b/bkt/o/dir%2Ffile.bin?alt=media&generation=1")
            .await
            .0,
        404
    );

    // An unencoded slash in the path also names the object.
    let (st, m) = s.get_json("/storage/v1/b/bkt/o/dir/file.bin").await;
    assert_eq!((st, m["name"].as_str()), (200, Some("dir/file.bin")));

    // Empty object.
    let o = s.put("bkt", "empty", Vec::<u8>::new()).await;
    assert_eq!(o["size"], "0");
    assert_eq!(o["md5Hash"], "1B2M2Y8AsgTpgAmY7PhCfg==");
    assert_eq!(o["crc32c"], "AAAAAA==");
    assert!(s.get_bytes("bkt", "empty").await.is_empty());

    // Missing things.
    let (status, reason, msg) = s.get_error("/storage/v1/b/bkt/o/nope").await;
    assert_eq!((status, reason.as_str()), (404, "notFound"));
    assert!(msg.contains("bkt/nope"), "{msg}");
    assert_eq!(
        s.get_error("/storage/v1/b/nobucket/o/x?alt=media").await.0,
        404
    );
    let r = s.put_raw("nobucket", "x", "d", "").await;
    assert_eq!(error_of(r).await.0, 404);
    let r = s
        .http
        .post(s.url("/upload/storage/v1/b/bkt/o?uploadType=media"))
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, reason, _) = error_of(r).await;
    assert_eq!((status, reason.as_str()), (400, "required"));
    assert_eq!(s.get_error("/storage/v1/b/bkt/iam").await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn metadata_patch_update_and_generations() {
    let (_dir, _, s) = start_with_bucket("bkt").await;
    let o1 = s.put("bkt", "obj", "one").await;
    let g1: i64 = o1["generation"].as_str().unwrap().parse().unwrap();
    let o2 = s.put("bkt", "obj", "two").await;
    let g2: i64 = o2["generation"].as_str().unwrap().parse().unwrap();
    assert!(g2 > g1, "generations increase: {g1} then {g2}");
    assert_eq!(s.get_bytes("bkt", "obj").await, b"two");

    // PATCH merges metadata and bumps metageneration.
    let r = s.patch_json("/storage/v1/b/bkt/o/obj", &json!({"metadata": {"a": "1", "b": "2"}, "contentType": "application/json", "cacheControl": "no-cache"})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["metageneration"], "2");
    assert_eq!(v["generation"], g2.to_string());
    assert_eq!(v["metadata"], json!({"a": "1", "b": "2"}));
    assert_eq!(v["contentType"], "application/json");
    let r = s
        .patch_json(
            "/storage/v1/b/bkt/o/obj",
            &json!({"metadata": {"a": null, "c": "3"}}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["metadata"], json!({"b": "2", "c": "3"}));
    assert_eq!(v["metageneration"], "3");
    assert_eq!(v["cacheControl"], "no-cache");
    // PUT replaces all writable metadata.
    let r = s
        .put_json(
            "/storage/v1/b/bkt/o/obj",
            &json!({"contentType": "text/csv"}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["contentType"], "text/csv");
    assert!(
        v.get("metadata").is_none() && v.get("cacheControl").is_none(),
        "{v}"
    );
    assert_eq!(v["metageneration"], "4");
    let r = s.get("/storage/v1/b/bkt/o/obj?alt=media").await;
    assert_eq!(r.headers()["content-type"], "text/csv");
    assert_eq!(r.headers()["x-goog-metageneration"], "4");
    let r = s
        .patch_json("/storage/v1/b/bkt/o/obj", &json!({"contentType": 12}))
        .await;
    assert_eq!(error_of(r).await.0, 400);

    // Preconditions on writes → 412.
    let r = s
        .put_raw("bkt", "obj", "three", "&ifGenerationMatch=0")
        .await;
    let (status, reason, _) = error_of(r).await;
    assert_eq!((status, reason.as_str()), (412, "conditionNotMet"));
    let r = s
        .put_raw("bkt", "new-obj", "x", "&ifGenerationMatch=0")
        .await;
    assert_eq!(
        r.status(),
        200,
        "ifGenerationMatch=0 creates an absent object"
    );
    let r = s
        .put_raw("bkt", "obj", "three", &format!("&ifGenerationMatch={g1}"))
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .put_raw(
            "bkt",
            "obj",
            "three",
            &format!("&ifGenerationNotMatch={g2}"),
        )
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .put_raw("bkt", "obj", "three", "&ifMetagenerationMatch=1")
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .put_raw("bkt", "absent", "x", "&ifMetagenerationMatch=1")
        .await;
    assert_eq!(error_of(r).await.0, 412);
    assert_eq!(
        s.get_bytes("bkt", "obj").await,
        b"two",
        "failed preconditions change nothing"
    );
    let r = s
        .put_raw(
            "bkt",
            "obj",
            "three",
            &format!("&ifGenerationMatch={g2}&ifMetagenerationMatch=4"),
        )
        .await;
    assert_eq!(r.status(), 200);
    let o3: Value = r.json().await.unwrap();
    let g3 = o3["generation"].as_str().unwrap().to_string();
    assert_eq!(o3["metageneration"], "1");

    // On reads: match failures 412, not-match failures 304.
    let r = s
        .get(&format!("/storage/v1/b/bkt/o/obj?ifGenerationMatch={g2}"))
        .await;
    assert_eq!(r.status(), 412);
    let r = s
        .get(&format!(
            "/storage/v1/b/bkt/o/obj?alt=media&ifGenerationNotMatch={g3}"
        ))
        .await;
    assert_eq!(r.status(), 304);
    let r = s
        .get(&format!(
            "/storage/v1/b/bkt/o/obj?alt=media&ifGenerationMatch={g3}"
        ))
        .await;
    assert_eq!(r.status(), 200);

    // Patch and delete preconditions.
    let r = s
        .patch_json(
            "/storage/v1/b/bkt/o/obj?ifMetagenerationMatch=7",
            &json!({"metadata": {"x": "y"}}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .patch_json(
            "/storage/v1/b/bkt/o/obj?ifMetagenerationNotMatch=1",
            &json!({"metadata": {"x": "y"}}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .delete(&format!("/storage/v1/b/bkt/o/obj?ifGenerationMatch={g2}"))
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s.delete("/storage/v1/b/bkt/o/obj?generation=5").await;
    assert_eq!(error_of(r).await.0, 404);
    let r = s
        .delete(&format!("/storage/v1/b/bkt/o/obj?ifGenerationMatch={g3}"))
        .await;
    assert_eq!(r.status(), 204);
    let r = s.delete("/storage/v1/b/bkt/o/obj").await;
    assert_eq!(error_of(r).await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn hostile_names_stay_inside_the_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let s = start(&dir, open_broker(&dir)).await;
    s.create_bucket("bkt").await;
    let long = "d/".repeat(511) + "xy"; // 1024 bytes
    let names: Vec<String> = vec![
        "../../escape".into(),
        "../outside.txt".into(),
        "/etc/passwd".into(),
        "/".into(),
        "a/../../b".into(),
        "nul\0byte".into(),
        "..\\windows\\path".into(),
        "ünïcødé/日本語/🎉.txt".into(),
        "a//b///c".into(),
        "...".into(),
        "%2F..%2F".into(),
        "space and ?query#frag".into(),
        long.clone(),
        "ı".into(),
        "i".into(),
        "A".into(),
        "a".into(),
    ];
    for (i, n) in names.iter().enumerate() {
        let o = s.put("bkt", n, format!("content {i}")).await;
        assert_eq!(o["name"].as_str().unwrap(), n.as_str());
    }
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            s.get_bytes("bkt", n).await,
            format!("content {i}").as_bytes(),
            "{n:?}"
        );
        let (st, v) = s.get_json(&format!("/storage/v1/b/bkt/o/{}", enc(n))).await;
        assert_eq!((st, v["name"].as_str()), (200, Some(n.as_str())));
    }
    let (_, v) = s.get_json("/storage/v1/b/bkt/o").await;
    let mut listed: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = names.iter().map(String::as_str).collect();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected, "no two names collide");

    for bad in [
        long.clone() + "z",
        "a\nb".into(),
        "a\rb".into(),
        ".".into(),
        "..".into(),
    ] {
        let r = s.put_raw("bkt", &bad, "x", "").await;
        assert_eq!(error_of(r).await.0, 400, "{bad:?}");
    }
    // Nothing was written outside the data dir, and every file inside has a name we chose.
    let outside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, [std::ffi::OsString::from("data")]);
    fn walk(p: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    let mut files = Vec::new();
    walk(&dir.join("buckets"), &mut files);
    for f in &files {
        let name = f.rsplit('/').next().unwrap();
        assert!(
            name.starts_with("index.db")
                || (name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())),
            "unexpected file {f}"
        );
    }
    assert_eq!(
        files.iter().filter(|f| f.contains("/blobs/")).count(),
        names.len()
    );
    s.stop().await;
}

#[tokio::test]
async fn listing_with_prefix_delimiter_and_pages() {
    let (_dir, _, s) = start_with_bucket("bkt").await;
    let names = [
        "a/1", "a/2", "a/b/3", "a/b/4", "b/5", "c", "d/", "d/6", "e", "f/g/h",
    ];
    for n in names {
        s.put("bkt", n, n).await;
    }
    let list = |q: &str| list_page(&s, q.to_string());
    let (items, prefixes, next) = list("").await;
    assert_eq!(items, names);
    assert_eq!(prefixes, Vec::<String>::new());
    assert!(next.is_none());

    let (items, prefixes, _) = list("delimiter=/").await;
    assert_eq!(items, ["c", "e"]);
    assert_eq!(prefixes, ["a/", "b/", "d/", "f/"]);
    let (items, prefixes, _) = list("delimiter=/&prefix=a/").await;
    assert_eq!(items, ["a/1", "a/2"]);
    assert_eq!(prefixes, ["a/b/"]);
    let (items, prefixes, _) = list("prefix=a/b").await;
    assert_eq!(items, ["a/b/3", "a/b/4"]);
    assert!(prefixes.is_empty());
    let (items, prefixes, _) = list("delimiter=/&includeTrailingDelimiter=true").await;
    assert_eq!(items, ["c", "d/", "e"]);
    assert_eq!(prefixes, ["a/", "b/", "d/", "f/"]);
    let (items, _, _) = list("startOffset=b&endOffset=e").await;
    assert_eq!(items, ["b/5", "c", "d/", "d/6"]);
    let (items, _, _) = list("prefix=zzz").await;
    assert!(items.is_empty());

    // Pages: items and prefixes count together; every entry once.
    for q in ["", "delimiter=/", "prefix=a/&delimiter=/"] {
        let (all_items, all_prefixes, _) = list(q).await;
        for size in 1..=4 {
            let (mut items, mut prefixes) = (Vec::new(), Vec::new());
            let mut token: Option<String> = None;
            for _ in 0..50 {
                let tq = token
                    .as_ref()
                    .map(|t| format!("&pageToken={t}"))
                    .unwrap_or_default();
                let (i, p, next) = list(&format!("{q}&maxResults={size}{tq}")).await;
                assert!(i.len() + p.len() <= size);
                items.extend(i);
                prefixes.extend(p);
                match next {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
            assert_eq!(items, all_items, "q={q} size={size}");
            assert_eq!(prefixes, all_prefixes, "q={q} size={size}");
        }
    }
    assert_eq!(
        s.get_error("/storage/v1/b/bkt/o?pageToken=***").await.0,
        400
    );
    assert_eq!(s.get_error("/storage/v1/b/nobucket/o").await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn copy_rewrite_and_compose() {
    let (_dir, _, s) = start_temp().await;
    s.create_bucket("src").await;
    s.create_bucket("dst").await;
    let d = data(300_000, 7);
    let (md5, crc) = hashes(&d);
    let src = s.put("src", "in/file", d.clone()).await;
    s.patch_json(
        "/storage/v1/b/src/o/in%2Ffile",
        &json!({"metadata": {"k": "v"}}),
    )
    .await;

    // copy keeps bytes and metadata.
    let r = s
        .http
        .post(s.url("/storage/v1/b/src/o/in%2Ffile/copyTo/b/dst/o/out%2Fcopy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["bucket"], "dst");
    assert_eq!(c["name"], "out/copy");
    assert_eq!(c["md5Hash"], md5.as_str());
    assert_eq!(c["crc32c"], crc.as_str());
    assert_eq!(c["metadata"]["k"], "v");
    assert_ne!(c["generation"], src["generation"]);
    assert_eq!(s.get_bytes("dst", "out/copy").await, d);
    // copy with metadata in the body overrides; destination preconditions apply.
    let r = s
        .post_json(
            "/storage/v1/b/src/o/in%2Ffile/copyTo/b/dst/o/out%2Fcopy?ifGenerationMatch=0",
            &json!({"contentType": "image/png"}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .http
        .post(s.url("/storage/v1/b/src/o/in%2Ffile/copyTo/b/dst/o/copy2?ifSourceGenerationMatch=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .post_json(
            "/storage/v1/b/src/o/in%2Ffile/copyTo/b/dst/o/copy2",
            &json!({"contentType": "image/png", "metadata": {"n": "m"}}),
        )
        .await;
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["contentType"], "image/png");
    assert_eq!(c["metadata"], json!({"n": "m"}));
    let r = s
        .http
        .post(s.url("/storage/v1/b/src/o/missing/copyTo/b/dst/o/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 404);

    // Overwriting or deleting the source leaves the copy intact (blobs are not shared by name).
    s.put("src", "in/file", "replaced").await;
    assert_eq!(s.get_bytes("dst", "out/copy").await, d);

    // rewrite answers with a rewriteResponse, done in one call.
    let r = s
        .post_json(
            "/storage/v1/b/dst/o/out%2Fcopy/rewriteTo/b/src/o/rewritten",
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let rw: Value = r.json().await.unwrap();
    assert_eq!(rw["kind"], "storage#rewriteResponse");
    assert_eq!(rw["done"], true);
    assert_eq!(rw["totalBytesRewritten"], "300000");
    assert_eq!(rw["objectSize"], "300000");
    assert_eq!(rw["resource"]["name"], "rewritten");
    assert_eq!(s.get_bytes("src", "rewritten").await, d);

    // compose.
    s.put("src", "p1", "hello ").await;
    s.put("src", "p2", "composed ").await;
    let p3 = s.put("src", "p3", "world").await;
    let body = json!({
        "sourceObjects": [{"name": "p1"}, {"name": "p2"}, {"name": "p3", "generation": p3["generation"], "objectPreconditions": {"ifGenerationMatch": p3["generation"]}}],
        "destination": {"contentType": "text/plain", "metadata": {"composed": "yes"}},
    });
    let r = s
        .post_json("/storage/v1/b/src/o/whole/compose", &body)
        .await;
    assert_eq!(r.status(), 200);
    let w: Value = r.json().await.unwrap();
    assert_eq!(s.get_bytes("src", "whole").await, b"hello composed world");
    assert_eq!(w["componentCount"], 3);
    assert_eq!(w["crc32c"], hashes(b"hello composed world").1.as_str());
    assert!(w.get("md5Hash").is_none(), "composite objects have no MD5");
    assert_eq!(w["metadata"]["composed"], "yes");
    assert_eq!(w["contentType"], "text/plain");
    // Composing a composite counts its components.
    let r = s
        .post_json(
            "/storage/v1/b/src/o/whole2/compose",
            &json!({"sourceObjects": [{"name": "whole"}, {"name": "p1"}]}),
        )
        .await;
    let w2: Value = r.json().await.unwrap();
    assert_eq!(w2["componentCount"], 4);
    assert_eq!(
        s.get_bytes("src", "whole2").await,
        b"hello composed worldhello "
    );
    let r = s.post_json("/storage/v1/b/src/o/bad/compose", &json!({"sourceObjects": [{"name": "p1", "objectPreconditions": {"ifGenerationMatch": 1}}]})).await;
    assert_eq!(error_of(r).await.0, 412);
    let r = s
        .post_json(
            "/storage/v1/b/src/o/bad/compose",
            &json!({"sourceObjects": [{"name": "nope"}]}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 404);
    let r = s
        .post_json(
            "/storage/v1/b/src/o/bad/compose",
            &json!({"sourceObjects": []}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 400);
    let many: Vec<Value> = (0..33).map(|_| json!({"name": "p1"})).collect();
    let r = s
        .post_json(
            "/storage/v1/b/src/o/bad/compose",
            &json!({"sourceObjects": many}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 400);
    let r = s
        .post_json(
            "/storage/v1/b/src/o/whole/compose?ifGenerationMatch=0",
            &body,
        )
        .await;
    assert_eq!(error_of(r).await.0, 412);
    s.stop().await;
}

#[tokio::test]
async fn rust_api_round_trip() {
    let (_dir, _, s) = start_temp().await;
    let b = s.buckets().clone();
    b.ensure_bucket("rust-side", "demo").await.unwrap();
    b.ensure_bucket("rust-side", "demo").await.unwrap();
    let meta = pubrun_buckets::ObjectMeta {
        content_type: Some("text/csv".into()),
        ..Default::default()
    };
    let row = b
        .put_object(
            "rust-side",
            "results/run-1/out.csv",
            &b"a,b\n1,2\n"[..],
            meta,
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(row.size, 8);
    let (_, mut f) = b
        .open_object(
            "rust-side",
            "results/run-1/out.csv",
            None,
            Default::default(),
        )
        .await
        .unwrap();
    let mut got = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut f, &mut got)
        .await
        .unwrap();
    assert_eq!(got, "a,b\n1,2\n");
    let all = b.list_all_objects("rust-side", "results/").await.unwrap();
    assert_eq!(all.len(), 1);
    // Visible over HTTP too.
    assert_eq!(
        s.get_bytes("rust-side", "results/run-1/out.csv").await,
        b"a,b\n1,2\n"
    );
    s.stop().await;
}

async fn list_page(s: &Server, q: String) -> (Vec<String>, Vec<String>, Option<String>) {
    let (st, v) = s.get_json(&format!("/storage/v1/b/bkt/o?{q}")).await;
    assert_eq!(st, 200, "{v}");
    let items: Vec<String> = v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| o["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    let prefixes: Vec<String> = v["prefixes"]
        .as_array()
        .map(|a| a.iter().map(|p| p.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (
        items,
        prefixes,
        v["nextPageToken"].as_str().map(str::to_string),
    )
}
