//! `pubrun objects cp|cat|rm` as a gsutil user runs them: the real binary
//! against a real `pubrun serve`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{noise, Serve, ServeBuilder, BIN};

/// Above the 8 MiB resumable threshold and spanning three 8 MiB chunks.
const BIG: usize = 20 * 1024 * 1024 + 12345;

/// Client commands against the harness's server, with their own state dir.
impl Serve {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("PUBRUN_ADDR", self.addr())
            .env("PUBRUN_STATE_DIR", self.path("state"))
            .env_remove("PUBRUN_TOKEN")
            .env_remove("PUBRUN_CP_TEST_STOP_AFTER_CHUNKS")
            .stdin(Stdio::null());
        c
    }

    /// `pubrun objects cp SRC gs://bkt/big.bin`, made to stop after
    /// `stop_after_chunks` chunks when given.
    fn cp_big(&self, src: &Path, stop_after_chunks: Option<&str>) -> std::process::Output {
        let mut c = self.cmd(&["objects", "cp", src.to_str().unwrap(), "gs://bkt/big.bin"]);
        if let Some(n) = stop_after_chunks {
            c.env("PUBRUN_CP_TEST_STOP_AFTER_CHUNKS", n);
        }
        c.output().unwrap()
    }
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn directory_round_trip_cat_and_rm() {
    let s = ServeBuilder::new().start();
    let work = tempfile::tempdir().unwrap();
    s.ok(&["buckets", "create", "bkt"]);

    let tree = work.path().join("tree");
    write(&tree.join("a.txt"), b"hello world\n");
    write(&tree.join("sub/b.txt"), b"second\n");
    write(&tree.join("sub/deeper/c.bin"), &noise(1000, 7));
    write(&tree.join("sub/empty"), b"");
    write(&tree.join("big.bin"), &noise(BIG, 42));

    let out = s.ok(&[
        "objects",
        "cp",
        "-r",
        tree.to_str().unwrap(),
        "gs://bkt/up/",
    ]);
    assert!(out.contains("gs://bkt/up/tree/big.bin"), "{out}");
    let ls = s.ok(&["objects", "ls", "bkt"]);
    for name in [
        "up/tree/a.txt",
        "up/tree/sub/b.txt",
        "up/tree/sub/deeper/c.bin",
        "up/tree/sub/empty",
        "up/tree/big.bin",
    ] {
        assert!(ls.contains(name), "{name} missing from\n{ls}");
    }
    // Without -r a directory is refused, clearly.
    let e = s.fails(&["objects", "cp", tree.to_str().unwrap(), "gs://bkt/"]);
    assert!(e.contains("pass -r"), "{e}");

    let dl = work.path().join("dl");
    s.ok(&[
        "objects",
        "cp",
        "-r",
        "gs://bkt/up/tree",
        dl.to_str().unwrap(),
    ]);
    assert_eq!(files(&dl.join("tree")), files(&tree));
    assert!(
        !files(&dl)
            .iter()
            .any(|(p, _)| p.to_string_lossy().ends_with(".pubrun-part")),
        "no partial files stay behind"
    );

    // One file each way; a destination ending in / gets the base name.
    s.ok(&[
        "objects",
        "cp",
        tree.join("a.txt").to_str().unwrap(),
        "gs://bkt/single/",
    ]);
    let one = work.path().join("one");
    std::fs::create_dir(&one).unwrap();
    s.ok(&[
        "objects",
        "cp",
        "gs://bkt/single/a.txt",
        one.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(one.join("a.txt")).unwrap(), b"hello world\n");
    s.ok(&[
        "objects",
        "cp",
        "gs://bkt/up/tree/big.bin",
        one.join("renamed.bin").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(one.join("renamed.bin")).unwrap(),
        noise(BIG, 42)
    );

    // The server's checksums are those of the local bytes.
    let meta: serde_json::Value =
        serde_json::from_str(&s.ok(&["objects", "ls", "bkt", "--prefix", "single/", "--json"]))
            .unwrap();
    assert_eq!(meta["items"][0]["crc32c"], crc_b64(b"hello world\n"));

    assert_eq!(
        s.ok(&["objects", "cat", "gs://bkt/up/tree/sub/b.txt"]),
        "second\n"
    );
    let big = s
        .cmd(&["objects", "cat", "gs://bkt/up/tree/big.bin"])
        .output()
        .unwrap();
    assert!(big.status.success());
    assert_eq!(big.stdout, noise(BIG, 42));

    let out = s.ok(&["objects", "rm", "gs://bkt/single/a.txt"]);
    assert!(out.contains("removed gs://bkt/single/a.txt"), "{out}");
    let e = s.fails(&["objects", "rm", "gs://bkt/single/a.txt"]);
    assert!(
        e.contains("NOT_FOUND") || e.contains("No such object"),
        "{e}"
    );
    let e = s.fails(&["objects", "rm", "gs://bkt/up/"]);
    assert!(e.contains("pass -r"), "{e}");
    let out = s.ok(&["objects", "rm", "-r", "gs://bkt/up/tree/sub"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    let ls = s.ok(&["objects", "ls", "bkt"]);
    assert!(ls.contains("up/tree/a.txt") && !ls.contains("sub/"), "{ls}");
    s.ok(&["objects", "rm", "-r", "gs://bkt"]);
    assert!(!s.ok(&["objects", "ls", "bkt"]).contains("up/"));
}

fn crc_b64(data: &[u8]) -> String {
    use base64::Engine as _;
    // CRC32C (Castagnoli), bitwise: the test must not share the CLI's code.
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    base64::engine::general_purpose::STANDARD.encode((!crc).to_be_bytes())
}

/// A server with bucket `bkt`, and a temp dir holding `big.bin`: BIG bytes of
/// noise from `seed`, to upload.
fn big_upload(seed: u64) -> (Serve, tempfile::TempDir, PathBuf) {
    let s = ServeBuilder::new().start();
    let work = tempfile::tempdir().unwrap();
    s.ok(&["buckets", "create", "bkt"]);
    let src = work.path().join("big.bin");
    write(&src, &noise(BIG, seed));
    (s, work, src)
}

#[test]
fn an_interrupted_large_upload_resumes_where_it_stopped() {
    let (s, work, src) = big_upload(9);

    let out = s.cp_big(&src, Some("1"));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !s.ok(&["objects", "ls", "bkt"]).contains("big.bin"),
        "nothing committed yet"
    );

    let out = s.cp_big(&src, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("at byte {} of {BIG}", 8 << 20)),
        "{err}"
    );

    let back = work.path().join("back.bin");
    s.ok(&["objects", "cp", "gs://bkt/big.bin", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), noise(BIG, 9));
    // The tracker is gone once the upload finished: the next cp starts afresh.
    let out = s.cp_big(&src, None);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("resuming"));
}

#[test]
fn a_vanished_upload_session_starts_over() {
    let (s, _work, src) = big_upload(11);
    let out = s.cp_big(&src, Some("1"));
    assert_eq!(out.status.code(), Some(3));

    // Cancel the session behind the CLI's back (as expiry would).
    let trackers = files(&s.dir().join("state/uploads"));
    assert_eq!(trackers.len(), 1, "one tracker file");
    let t: serde_json::Value = serde_json::from_slice(&trackers[0].1).unwrap();
    let session = t["session"].as_str().unwrap();
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    use std::io::{Read, Write};
    write!(
        sock,
        "DELETE {session} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 499") || resp.starts_with("HTTP/1.1 2"),
        "{resp}"
    );

    let out = s.cp_big(&src, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("is gone; starting over"), "{err}");
    assert_eq!(
        s.cmd(&["objects", "cat", "gs://bkt/big.bin"])
            .output()
            .unwrap()
            .stdout,
        noise(BIG, 11)
    );
}

#[test]
fn a_corrupted_download_is_detected_and_not_written() {
    let s = ServeBuilder::new().start();
    let work = tempfile::tempdir().unwrap();
    s.ok(&["buckets", "create", "bkt"]);
    let content = noise(4096, 3);
    let src = work.path().join("f.bin");
    write(&src, &content);
    s.ok(&["objects", "cp", src.to_str().unwrap(), "gs://bkt/f.bin"]);

    // Flip a byte of the stored blob behind the server's back (disk rot).
    let blob = files(&s.dir().join("data"))
        .into_iter()
        .find(|(_, data)| *data == content)
        .map(|(p, _)| s.dir().join("data").join(p))
        .expect("the object's blob in the data dir");
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    let mut bad = content.clone();
    bad[100] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();

    let dst = work.path().join("out.bin");
    let e = s.fails(&["objects", "cp", "gs://bkt/f.bin", dst.to_str().unwrap()]);
    assert!(
        e.contains("checksum mismatch") && e.contains("corrupt"),
        "{e}"
    );
    assert!(
        !dst.exists(),
        "a corrupt copy must not be left at the destination"
    );
    assert!(!work.path().join("out.bin.pubrun-part").exists());
    // `cat` streams as it reads (like gsutil): the bytes before the check
    // reach stdout, the failure is in the exit code and on stderr.
    let r = s.run(&["objects", "cat", "gs://bkt/f.bin"]);
    assert_ne!(r.code, 0, "a corrupt download must fail");
    assert!(r.stderr.contains("checksum mismatch"), "{}", r.stderr);
}

#[test]
fn a_missing_bucket_is_a_clear_error() {
    let s = ServeBuilder::new().start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("f.txt");
    write(&src, b"x");
    let e = s.fails(&["objects", "cp", src.to_str().unwrap(), "gs://nope/f.txt"]);
    assert!(
        e.contains("gs://nope") && e.contains("bucket does not exist"),
        "{e}"
    );
    let e = s.fails(&[
        "objects",
        "cp",
        "gs://nope/f.txt",
        work.path().to_str().unwrap(),
    ]);
    assert!(
        e.contains("gs://nope/f.txt") && e.contains("does not exist"),
        "{e}"
    );
    let e = s.fails(&["objects", "cat", "gs://nope/f.txt"]);
    assert!(e.contains("does not exist"), "{e}");
    let e = s.fails(&[
        "objects",
        "cp",
        src.to_str().unwrap(),
        work.path().join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("both paths are local"), "{e}");
}
