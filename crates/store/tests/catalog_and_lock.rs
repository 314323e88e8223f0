//! The catalog file (atomic replace, leftovers, corruption) and the
//! data-directory lock.

mod common;

use std::path::Path;

use common::*;
use pubrun_store::{Catalog, EmbeddedStore, Store, StoreError};

fn catalog_path(dir: &Path) -> std::path::PathBuf {
    dir.join("catalog.json")
}

#[tokio::test]
async fn leftover_temp_catalog_is_ignored_and_overwritten() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let good = sample_catalog(2);
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.save_catalog(&good).await.unwrap();
        }
        // A crash between writing the temp file and renaming it.
        let tmp = dir.path().join("catalog.json.tmp");
        std::fs::write(&tmp, b"{\"version\": 1, \"next_uid\": 99, \"topi").unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store.load_catalog().unwrap(),
            good,
            "the half-written temp file is not the catalog"
        );

        // A longer leftover must not leak into the next save (truncation).
        std::fs::write(&tmp, vec![b' '; 100_000]).unwrap();
        let next = sample_catalog(1);
        store.save_catalog(&next).await.unwrap();
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.load_catalog().unwrap(), next);

        // A leftover temp file with no catalog at all: still a fresh store.
        let fresh = tempfile::tempdir().unwrap();
        std::fs::write(fresh.path().join("catalog.json.tmp"), b"garbage").unwrap();
        let store = EmbeddedStore::open(fresh.path()).unwrap();
        assert_eq!(store.load_catalog().unwrap(), Catalog::new());
    })
    .await
}

#[tokio::test]
async fn corrupt_catalog_is_reported_with_its_path() {
    bounded(async {
        for (what, bytes) in [
            (
                "truncated json",
                b"{\"version\": 1, \"next_uid\": 3, \"topics\": {".to_vec(),
            ),
            ("not json", b"\x00\x01\x02garbage".to_vec()),
            ("empty file", Vec::new()),
            ("wrong shape", b"[1, 2, 3]".to_vec()),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(catalog_path(dir.path()), &bytes).unwrap();
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let err = store.load_catalog().expect_err(what);
            let want = catalog_path(dir.path()).display().to_string();
            match &err {
                StoreError::Corrupt { path, detail } => {
                    assert_eq!(path, &want, "{what}");
                    assert!(!detail.is_empty(), "{what}");
                }
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
            assert!(
                err.to_string().contains(&want),
                "{what}: message must name the file: {err}"
            );
            // Not silently replaced by an empty catalog either.
            assert_eq!(
                std::fs::read(catalog_path(dir.path())).unwrap(),
                bytes,
                "{what}"
            );
        }
    })
    .await
}

#[tokio::test]
async fn the_data_directory_is_locked_while_open() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (first, _, _) = open_replay(dir.path());
        let r = publish(1, [1], "first");
        append_ok(&first, vec![r.clone()]).await;

        for _ in 0..2 {
            match EmbeddedStore::open(dir.path()) {
                Err(StoreError::Locked(d)) => assert_eq!(d, dir.path().display().to_string()),
                Err(other) => panic!("expected Locked, got {other:?}"),
                Ok(_) => panic!("a second open of a locked directory must fail"),
            }
        }
        // From another thread too (the lock is not per thread).
        let d = dir.path().to_path_buf();
        let other_thread = std::thread::spawn(move || EmbeddedStore::open(&d).err())
            .join()
            .unwrap();
        assert!(
            matches!(other_thread, Some(StoreError::Locked(_))),
            "{other_thread:?}"
        );

        // The failed opens disturbed nothing: the first store keeps working.
        let r2 = publish(1, [2], "still-first");
        append_ok(&first, vec![r2.clone()]).await;
        first.close();
        // Closing stops the writer; dropping releases the lock.
        drop(first);

        let (second, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, vec![r, r2]);
        assert_eq!(next, 3);
        assert!(matches!(
            EmbeddedStore::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
        drop(second);
        // And again after a drop without close.
        EmbeddedStore::open(dir.path()).expect("lock released on drop");
    })
    .await
}

#[tokio::test]
async fn open_creates_the_directory() {
    bounded(async {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("a/b/data");
        let (store, recs, next) = open_replay(&dir);
        assert!(recs.is_empty());
        assert_eq!(next, 1);
        append_ok(&store, vec![publish(1, [1], "x")]).await;
        assert!(dir.join("log").is_dir());
        assert!(dir.join("LOCK").exists());
    })
    .await
}
