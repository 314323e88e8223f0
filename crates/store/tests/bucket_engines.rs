//! One bucket-store test suite for every engine (`BucketStore` trait): each
//! `async fn` below takes an engine factory and is instantiated by
//! `all_engines!` for the embedded engine (SQLite index + blob directory in
//! a temp dir) and PostgreSQL (a throwaway `TempPostgres` cluster).
//! PostgreSQL-only: fencing (a write under a stale ownership token is
//! refused and writes nothing).
//!
//! PostgreSQL tests FAIL when Debian's `postgresql` package is missing:
//! they never skip.

#[macro_use]
mod engine_kit;

use engine_kit::{Postgres, Sqlite};
use pubrun_store::buckets::{
    BucketDeleted, BucketPage, BucketRecord, BucketStore, Mutated, ObjectChange, ObjectPlan,
    ObjectRange, ObjectRecord, OutboxMessage, Reject, UploadRecord,
};
use pubrun_store::testing::TempPostgres;
use pubrun_store::{PostgresBucketStore, SqliteBucketStore, StoreError};
use tokio::io::AsyncReadExt;

store_engines! {
    store: BucketStore,
    bound_secs: 180,
    sqlite: |dir| SqliteBucketStore::open(&dir.join("buckets"))
        .await
        .expect("open buckets/"),
    postgres: |url| PostgresBucketStore::open(&url, None)
        .await
        .expect("open PostgreSQL bucket store"),
}

fn bucket(name: &str, project: &str) -> BucketRecord {
    BucketRecord {
        name: name.into(),
        project: project.into(),
        created_us: 1,
        updated_us: 1,
        metageneration: 1,
        location: "US".into(),
        storage_class: "STANDARD".into(),
        labels: [("team".to_string(), "ml".to_string())].into(),
    }
}

/// Deterministic bytes of any length (not a repeating short pattern).
fn bytes_of(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Streams `data` into a new blob in uneven pieces; its id.
async fn write_blob(s: &dyn BucketStore, data: &[u8]) -> String {
    let mut w = s.blob_writer(None).await.unwrap();
    let id = w.id().to_string();
    for piece in data.chunks(300_007) {
        w.write(piece).await.unwrap();
    }
    assert_eq!(w.finish().await.unwrap(), data.len() as u64);
    id
}

async fn read_all(s: &dyn BucketStore, id: &str, start: u64) -> Option<Vec<u8>> {
    let mut r = s.read_blob(id, start).await.unwrap()?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    Some(out)
}

fn row(bucket: &str, name: &str, generation: i64, blob: &str, size: u64) -> ObjectRecord {
    ObjectRecord {
        bucket: bucket.into(),
        name: name.into(),
        generation,
        metageneration: 1,
        size,
        blob: blob.into(),
        md5: Some([7; 16]),
        crc32c: 0xdead_beef,
        component_count: None,
        meta: "{\"contentType\":\"text/plain\"}".into(),
        created_us: generation,
        updated_us: generation,
    }
}

/// Writes `data` as the new generation of `bucket/name`, with one outbox
/// message per notification config; returns the committed row.
async fn put(s: &dyn BucketStore, bucket: &str, name: &str, data: &[u8]) -> ObjectRecord {
    let blob = write_blob(s, data).await;
    let (b, n, size) = (bucket.to_string(), name.to_string(), data.len() as u64);
    let blob2 = blob.clone();
    let res = s
        .mutate_object(ObjectChange {
            bucket,
            name,
            new_generation: true,
            decide: Box::new(move |st| {
                let g = st.new_generation.expect("a generation was asked for");
                let outbox = st
                    .notifications
                    .iter()
                    .map(|c| OutboxMessage {
                        topic: c.config.clone(),
                        attributes: [("objectId".to_string(), n.clone())].into(),
                        data: g.to_string().into_bytes(),
                    })
                    .collect();
                Ok(ObjectPlan {
                    put: Some(row(&b, &n, g, &blob2, size)),
                    outbox,
                    ..Default::default()
                })
            }),
        })
        .await
        .unwrap();
    match res {
        Ok(Mutated::Done { plan, .. }) => plan.put.unwrap(),
        Ok(Mutated::NoBucket) => panic!("no bucket {bucket}"),
        Err(_) => panic!("refused"),
    }
}

fn page(project: Option<&str>, prefix: &str, after: &str, limit: usize) -> BucketPage {
    BucketPage {
        project: project.map(str::to_string),
        prefix: prefix.into(),
        after: after.into(),
        limit,
    }
}

fn range(bucket: &str, lower: &[u8], upper: Option<&[u8]>, limit: usize) -> ObjectRange {
    ObjectRange {
        bucket: bucket.into(),
        lower: lower.into(),
        upper: upper.map(<[u8]>::to_vec),
        limit,
    }
}

fn names(rows: &[ObjectRecord]) -> Vec<&str> {
    rows.iter().map(|r| r.name.as_str()).collect()
}

// ---------------------------------------------------------------- the suite

async fn bucket_crud(e: impl Engine) {
    let s = e.open().await;
    assert!(s.create_bucket(&bucket("alpha", "p1")).await.unwrap());
    assert!(!s.create_bucket(&bucket("alpha", "p2")).await.unwrap());
    assert!(s.create_bucket(&bucket("alpine", "p2")).await.unwrap());
    assert!(s.create_bucket(&bucket("beta", "p1")).await.unwrap());
    let a = s.get_bucket("alpha").await.unwrap().unwrap();
    assert_eq!(a, bucket("alpha", "p1"));
    assert!(s.get_bucket("nope").await.unwrap().is_none());

    let all = s.list_buckets(page(None, "", "", 10)).await.unwrap();
    assert_eq!(
        all.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "alpine", "beta"]
    );
    let p1 = s.list_buckets(page(Some("p1"), "", "", 10)).await.unwrap();
    assert_eq!(p1.len(), 2);
    let al = s
        .list_buckets(page(None, "alp", "alpha", 10))
        .await
        .unwrap();
    assert_eq!(al.len(), 1);
    assert_eq!(al[0].name, "alpine");
    assert_eq!(
        s.list_buckets(page(None, "", "", 1)).await.unwrap().len(),
        1
    );

    let updated = s
        .update_bucket(
            "alpha",
            Box::new(|mut b| {
                b.labels.insert("env".into(), "prod".into());
                b.metageneration += 1;
                Ok(b)
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_else(|_| panic!("refused"));
    assert_eq!(updated.metageneration, 2);
    let refused = s
        .update_bucket("alpha", Box::new(|_| Err(Box::new("no") as Reject)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*refused.unwrap_err().downcast::<&str>().unwrap(), "no");
    assert!(s
        .update_bucket("nope", Box::new(Ok))
        .await
        .unwrap()
        .is_none());

    put(&*s, "beta", "x", b"x").await;
    assert_eq!(
        s.delete_bucket("beta").await.unwrap(),
        BucketDeleted::NotEmpty
    );
    assert_eq!(
        s.delete_bucket("nope").await.unwrap(),
        BucketDeleted::Missing
    );
    assert_eq!(
        s.delete_bucket("alpine").await.unwrap(),
        BucketDeleted::Deleted(vec![])
    );

    // Durable: a reopened engine sees the same.
    drop(s);
    let s = e.open().await;
    let b = s.get_bucket("alpha").await.unwrap().unwrap();
    assert_eq!(b.labels["env"], "prod");
    assert!(s.get_bucket("alpine").await.unwrap().is_none());
}

async fn objects_put_get_list_and_generations(e: impl Engine) {
    let s = e.open().await;
    s.create_bucket(&bucket("b", "p")).await.unwrap();
    let mut last = 0;
    // NUL is a legal object name byte; PostgreSQL `text` cannot hold it.
    for name in ["a/1", "a/2", "a/b/3", "ab", "b", "nul\0byte", "é"] {
        let r = put(&*s, "b", name, name.as_bytes()).await;
        assert!(r.generation > last, "generations increase");
        last = r.generation;
    }
    let got = s.get_object("b", "a/2").await.unwrap().unwrap();
    assert_eq!(got.size, 3);
    assert_eq!(got.md5, Some([7; 16]));
    assert_eq!(got.crc32c, 0xdead_beef);
    assert_eq!(read_all(&*s, &got.blob, 0).await.unwrap(), b"a/2");
    assert!(s.get_object("b", "zzz").await.unwrap().is_none());
    assert!(s.get_object("other", "a/2").await.unwrap().is_none());

    let all = s.scan_objects(range("b", b"", None, 100)).await.unwrap();
    assert_eq!(
        names(&all),
        ["a/1", "a/2", "a/b/3", "ab", "b", "nul\0byte", "é"]
    );
    let under_a = s
        .scan_objects(range("b", b"a/", Some(b"a/\xff"), 100))
        .await
        .unwrap();
    assert_eq!(names(&under_a), ["a/1", "a/2", "a/b/3"]);
    let page = s.scan_objects(range("b", b"a/1\0", None, 2)).await.unwrap();
    assert_eq!(names(&page), ["a/2", "a/b/3"]);
    // Byte order: "é" (0xC3…) after "b".
    let tail = s.scan_objects(range("b", b"b\0", None, 10)).await.unwrap();
    assert_eq!(names(&tail), ["nul\0byte", "é"]);
    let got = s.get_object("b", "nul\0byte").await.unwrap().unwrap();
    assert_eq!(read_all(&*s, &got.blob, 0).await.unwrap(), b"nul\0byte");

    // Overwrite: a new generation, new bytes; the old blob is released.
    let old = s.get_object("b", "ab").await.unwrap().unwrap();
    let new = put(&*s, "b", "ab", b"second").await;
    assert!(new.generation > old.generation);
    assert_eq!(read_all(&*s, &new.blob, 0).await.unwrap(), b"second");
    assert!(s.read_blob(&old.blob, 0).await.unwrap().is_none());

    // A metadata update keeps the blob and the generation.
    let res = s
        .mutate_object(ObjectChange {
            bucket: "b",
            name: "ab",
            new_generation: false,
            decide: Box::new(|st| {
                assert!(st.new_generation.is_none());
                let mut o = st.old.clone().unwrap();
                o.metageneration += 1;
                o.meta = "{\"contentType\":\"a/b\"}".into();
                Ok(ObjectPlan {
                    put: Some(o),
                    ..Default::default()
                })
            }),
        })
        .await
        .unwrap();
    assert!(matches!(res, Ok(Mutated::Done { .. })));
    let meta = s.get_object("b", "ab").await.unwrap().unwrap();
    assert_eq!(meta.metageneration, 2);
    assert_eq!(meta.generation, new.generation);
    assert_eq!(meta.meta, "{\"contentType\":\"a/b\"}");
    assert_eq!(read_all(&*s, &meta.blob, 0).await.unwrap(), b"second");

    // Missing bucket; refusal writes nothing.
    let res = s
        .mutate_object(ObjectChange {
            bucket: "nope",
            name: "x",
            new_generation: true,
            decide: Box::new(|_| Ok(ObjectPlan::default())),
        })
        .await
        .unwrap();
    assert!(matches!(res, Ok(Mutated::NoBucket)));
    let blob = write_blob(&*s, b"refused").await;
    let res = s
        .mutate_object(ObjectChange {
            bucket: "b",
            name: "ab",
            new_generation: true,
            decide: Box::new(|_| Err(Box::new(412u16) as Reject)),
        })
        .await
        .unwrap();
    assert_eq!(*res.unwrap_err().downcast::<u16>().unwrap(), 412);
    s.discard_blob(&blob).await.unwrap();
    assert!(s.read_blob(&blob, 0).await.unwrap().is_none());
    assert_eq!(s.get_object("b", "ab").await.unwrap().unwrap(), meta);

    // Generations stay above those handed out, across a reopen.
    drop(s);
    let s = e.open().await;
    let again = put(&*s, "b", "later", b"z").await;
    assert!(again.generation > last.max(new.generation));
}

async fn large_object_streams_byte_exact(e: impl Engine) {
    let s = e.open().await;
    s.create_bucket(&bucket("big", "p")).await.unwrap();
    // Several 1 MiB chunks and a partial one.
    let data = bytes_of(3 * (1 << 20) + 123_457, 42);
    let r = put(&*s, "big", "blob.bin", &data).await;
    assert_eq!(r.size, data.len() as u64);
    let back = read_all(&*s, &r.blob, 0).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ");
    // From offsets: inside a chunk, on a chunk boundary, at the end.
    for start in [
        1usize,
        (1 << 20) - 1,
        1 << 20,
        2 * (1 << 20) + 5,
        data.len(),
    ] {
        let part = read_all(&*s, &r.blob, start as u64).await.unwrap();
        assert!(part == data[start..], "from {start}");
    }
    // Copies are independent of their source.
    let copy = s.copy_blob(&r.blob).await.unwrap().unwrap();
    assert_ne!(copy, r.blob);
    assert!(read_all(&*s, &copy, 0).await.unwrap() == data);
    assert!(s.copy_blob(&"0".repeat(32)).await.unwrap().is_none());
}

async fn delete_removes_bytes(e: impl Engine) {
    let s = e.open().await;
    s.create_bucket(&bucket("d", "p")).await.unwrap();
    let r = put(&*s, "d", "gone", &bytes_of(2 * (1 << 20) + 9, 1)).await;
    let res = s
        .mutate_object(ObjectChange {
            bucket: "d",
            name: "gone",
            new_generation: false,
            decide: Box::new(|st| {
                assert!(st.old.is_some());
                Ok(ObjectPlan {
                    delete: true,
                    ..Default::default()
                })
            }),
        })
        .await
        .unwrap();
    match res {
        Ok(Mutated::Done { old, .. }) => assert_eq!(old.unwrap().blob, r.blob),
        _ => panic!("delete refused"),
    }
    assert!(s.get_object("d", "gone").await.unwrap().is_none());
    assert!(s.read_blob(&r.blob, 0).await.unwrap().is_none());
    assert_eq!(
        s.delete_bucket("d").await.unwrap(),
        BucketDeleted::Deleted(vec![])
    );

    // A finished blob nobody committed is swept; a committed one is not.
    s.create_bucket(&bucket("d", "p")).await.unwrap();
    let kept = put(&*s, "d", "kept", b"kept").await;
    let orphan = write_blob(&*s, b"orphan").await;
    assert!(
        s.sweep(3_600_000_000).await.unwrap() == 0,
        "young blobs stay"
    );
    assert!(s.sweep(0).await.unwrap() >= 1);
    assert!(s.read_blob(&orphan, 0).await.unwrap().is_none());
    assert_eq!(read_all(&*s, &kept.blob, 0).await.unwrap(), b"kept");
}

async fn notifications_and_outbox(e: impl Engine) {
    let s = e.open().await;
    s.create_bucket(&bucket("n", "p")).await.unwrap();
    s.create_bucket(&bucket("m", "p")).await.unwrap();
    let a = s
        .add_notification("n", 2, Box::new(|id| format!("projects/p/topics/t{id}")))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let b = s
        .add_notification("m", 2, Box::new(|id| format!("projects/p/topics/t{id}")))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(b.id > a.id, "ids are unique across buckets");
    let c = s
        .add_notification("n", 2, Box::new(|id| format!("projects/p/topics/t{id}")))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        s.add_notification("n", 2, Box::new(|_| unreachable!()))
            .await
            .unwrap()
            .unwrap()
            .unwrap_err(),
        2
    );
    assert!(s
        .add_notification("nope", 2, Box::new(|_| unreachable!()))
        .await
        .unwrap()
        .is_none());
    let cfgs = s.notifications("n").await.unwrap();
    assert_eq!(cfgs.iter().map(|c| c.id).collect::<Vec<_>>(), [a.id, c.id]);
    assert_eq!(cfgs[0].config, format!("projects/p/topics/t{}", a.id));

    // Each change commits its outbox rows with it, in order.
    assert_eq!(s.outbox_len().await.unwrap(), 0);
    let r1 = put(&*s, "n", "one", b"1").await;
    let r2 = put(&*s, "n", "two", b"2").await;
    put(&*s, "m", "other", b"3").await;
    assert_eq!(s.outbox_len().await.unwrap(), 5);
    let pending = s.pending_outbox(100).await.unwrap();
    assert_eq!(pending.len(), 5);
    assert!(pending.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        pending[0].message.data,
        r1.generation.to_string().into_bytes()
    );
    assert_eq!(pending[0].message.attributes["objectId"], "one");
    assert_eq!(
        pending[2].message.data,
        r2.generation.to_string().into_bytes()
    );
    assert_eq!(
        pending[4].message.topic,
        format!("projects/p/topics/t{}", b.id)
    );
    s.delete_outbox(&[pending[0].id, pending[1].id])
        .await
        .unwrap();
    let rest = s.pending_outbox(2).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].id, pending[2].id);

    // Survives a reopen (published again after a crash: at least once).
    drop(s);
    let s = e.open().await;
    assert_eq!(s.outbox_len().await.unwrap(), 3);
    assert!(s.delete_notification("n", a.id).await.unwrap());
    assert!(!s.delete_notification("n", a.id).await.unwrap());
    assert_eq!(s.notifications("n").await.unwrap().len(), 1);
}

async fn resumable_upload_state_and_bytes(e: impl Engine) {
    let s = e.open().await;
    s.create_bucket(&bucket("u", "p")).await.unwrap();
    let id = pubrun_store::buckets::new_blob_id();
    let up = UploadRecord {
        id: id.clone(),
        bucket: "u".into(),
        name: "up/loaded".into(),
        spec: "{\"meta\":{}}".into(),
        total: None,
        received: 0,
        done: None,
        created_us: 1_000,
    };
    s.insert_upload(&up).await.unwrap();
    assert_eq!(s.get_upload(&id).await.unwrap().unwrap(), up);

    let data = bytes_of((1 << 20) + 700_000, 9);
    let (first, second) = data.split_at(1_100_000);
    let mut w = s.blob_writer(Some((&id, 0))).await.unwrap();
    w.write(first).await.unwrap();
    assert_eq!(w.finish().await.unwrap(), first.len() as u64);
    s.set_upload_progress(&id, first.len() as u64, None)
        .await
        .unwrap();
    // A retried request rewrites from an earlier offset: later bytes drop.
    let mut w = s.blob_writer(Some((&id, 1_000_000))).await.unwrap();
    w.write(&data[1_000_000..1_050_000]).await.unwrap();
    w.finish().await.unwrap();
    assert!(read_all(&*s, &id, 0).await.unwrap() == data[..1_050_000]);
    let mut w = s.blob_writer(Some((&id, 1_050_000))).await.unwrap();
    w.write(&data[1_050_000..first.len()]).await.unwrap();
    w.write(second).await.unwrap();
    assert_eq!(w.finish().await.unwrap(), data.len() as u64);
    s.set_upload_progress(&id, data.len() as u64, Some(data.len() as u64))
        .await
        .unwrap();
    let got = s.get_upload(&id).await.unwrap().unwrap();
    assert_eq!(
        (got.received, got.total),
        (data.len() as u64, Some(data.len() as u64))
    );
    // Upload bytes survive a reopen and a sweep.
    drop(s);
    let s = e.open().await;
    s.sweep(0).await.unwrap();
    assert!(read_all(&*s, &id, 0).await.unwrap() == data);

    // Completing: the object takes the upload's bytes, the session is done.
    let (idc, size) = (id.clone(), data.len() as u64);
    let res = s
        .mutate_object(ObjectChange {
            bucket: "u",
            name: "up/loaded",
            new_generation: true,
            decide: Box::new(move |st| {
                let g = st.new_generation.unwrap();
                Ok(ObjectPlan {
                    put: Some(row("u", "up/loaded", g, &idc, size)),
                    finish_upload: Some((idc.clone(), "{\"name\":\"up/loaded\"}".into())),
                    ..Default::default()
                })
            }),
        })
        .await
        .unwrap();
    assert!(matches!(res, Ok(Mutated::Done { .. })));
    let done = s.get_upload(&id).await.unwrap().unwrap();
    assert_eq!(done.done.as_deref(), Some("{\"name\":\"up/loaded\"}"));
    let obj = s.get_object("u", "up/loaded").await.unwrap().unwrap();
    assert!(read_all(&*s, &obj.blob, 0).await.unwrap() == data);
    // Forgetting the session keeps the object's bytes.
    assert!(s.delete_upload(&id).await.unwrap());
    assert!(!s.delete_upload(&id).await.unwrap());
    s.sweep(0).await.unwrap();
    assert!(read_all(&*s, &obj.blob, 0).await.unwrap() == data);

    // An abandoned session: deleting or expiring it drops its bytes.
    let id2 = pubrun_store::buckets::new_blob_id();
    s.insert_upload(&UploadRecord {
        id: id2.clone(),
        created_us: 10,
        ..up.clone()
    })
    .await
    .unwrap();
    let mut w = s.blob_writer(Some((&id2, 0))).await.unwrap();
    w.write(b"partial").await.unwrap();
    w.finish().await.unwrap();
    let id3 = pubrun_store::buckets::new_blob_id();
    s.insert_upload(&UploadRecord {
        id: id3.clone(),
        created_us: i64::MAX / 2,
        ..up.clone()
    })
    .await
    .unwrap();
    assert_eq!(
        s.expire_uploads(1_000_000).await.unwrap(),
        vec![id2.clone()]
    );
    assert!(s.get_upload(&id2).await.unwrap().is_none());
    assert!(s.read_blob(&id2, 0).await.unwrap().is_none());
    assert!(s.get_upload(&id3).await.unwrap().is_some());
    // Deleting the bucket drops its sessions.
    let res = s
        .mutate_object(ObjectChange {
            bucket: "u",
            name: "up/loaded",
            new_generation: false,
            decide: Box::new(|_| {
                Ok(ObjectPlan {
                    delete: true,
                    ..Default::default()
                })
            }),
        })
        .await
        .unwrap();
    assert!(res.is_ok());
    assert_eq!(
        s.delete_bucket("u").await.unwrap(),
        BucketDeleted::Deleted(vec![id3.clone()])
    );
    assert!(s.get_upload(&id3).await.unwrap().is_none());
}

all_engines!(
    bucket_crud,
    objects_put_get_list_and_generations,
    large_object_streams_byte_exact,
    delete_removes_bytes,
    notifications_and_outbox,
    resumable_upload_state_and_bytes,
);

/// A bucket store opened under an ownership token writes while the token is
/// current; once another server took the lease, every index write is
/// refused (`Fenced`) and writes nothing; reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_under_a_stale_token_are_refused() {
    bounded(async {
        let pg = TempPostgres::start();
        let lease = engine_kit::lease(&pg, "a").await;
        let a = PostgresBucketStore::open(&pg.url(), Some(engine_kit::fence(lease.token())))
            .await
            .unwrap();
        a.create_bucket(&bucket("f", "p")).await.unwrap();
        put(&a, "f", "before", b"before").await;
        assert!(!a.is_fenced());

        lease.stop_renewing();
        let b_lease = engine_kit::lease(&pg, "b").await;
        assert!(b_lease.token() > lease.token());
        let b = PostgresBucketStore::open(&pg.url(), Some(engine_kit::fence(b_lease.token())))
            .await
            .unwrap();

        // The late writer can stream bytes (invisible) but not commit them.
        let blob = write_blob(&a, b"late").await;
        let late = a
            .mutate_object(ObjectChange {
                bucket: "f",
                name: "late",
                new_generation: true,
                decide: Box::new(move |st| {
                    Ok(ObjectPlan {
                        put: Some(row("f", "late", st.new_generation.unwrap(), &blob, 4)),
                        ..Default::default()
                    })
                }),
            })
            .await;
        let fenced = |r: Result<(), StoreError>| {
            let e = r.expect_err("a stale token must not write");
            assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
            assert!(e.to_string().contains("taken over"), "{e}");
        };
        fenced(late.map(|_| ()));
        fenced(a.create_bucket(&bucket("g", "p")).await.map(|_| ()));
        fenced(a.delete_bucket("f").await.map(|_| ()));
        fenced(
            a.add_notification("f", 10, Box::new(|_| "t".into()))
                .await
                .map(|_| ()),
        );
        fenced(a.delete_outbox(&[1]).await);
        let session = pubrun_store::buckets::new_blob_id();
        fenced(a.blob_writer(Some((&session, 0))).await.map(|_| ()));
        fenced(
            a.insert_upload(&UploadRecord {
                id: pubrun_store::buckets::new_blob_id(),
                bucket: "f".into(),
                name: "x".into(),
                spec: "{}".into(),
                total: None,
                received: 0,
                done: None,
                created_us: 0,
            })
            .await,
        );
        assert!(a.is_fenced());
        // Reads still work; nothing late was written; the new owner writes.
        assert!(a.get_object("f", "before").await.unwrap().is_some());
        assert!(b.get_object("f", "late").await.unwrap().is_none());
        assert!(b.get_bucket("g").await.unwrap().is_none());
        put(&b, "f", "after", b"after").await;
        // The refused write's bytes are swept.
        assert!(b.sweep(0).await.unwrap() >= 1);
    })
    .await;
}

/// A value PostgreSQL refuses (here NUL in a `text` column) is reported as
/// such, not as unavailability: a client retrying would fail forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refused_value_is_not_unavailability() {
    bounded(async {
        let engine = Postgres::new();
        let s = engine.open().await;
        let err = s
            .create_bucket(&bucket("nul\0name", "p"))
            .await
            .expect_err("PostgreSQL text cannot hold NUL");
        assert!(
            matches!(err, pubrun_store::StoreError::Corrupt { .. }),
            "{err:?}"
        );
    })
    .await
}
