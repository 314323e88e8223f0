//! Crash recovery: torn writes at the tail of the newest segment are dropped
//! (and cut off so later appends land after good data); damage anywhere in a
//! closed segment is reported as corruption, never skipped.

mod common;

use std::path::Path;

use common::*;
use pubrun_store::{Record, Store, StoreError};

/// Writes `n` records through the store (each one acknowledged) and closes
/// it; returns the records and the end offset of each frame.
async fn build_log(dir: &Path, n: u64) -> (Vec<Record>, Vec<u64>) {
    let (store, recs, next) = open_replay(dir);
    assert!(recs.is_empty());
    assert_eq!(next, 1);
    let mut records = Vec::new();
    let mut ends = Vec::new();
    let mut end = 0;
    for s in 1..=n {
        let r = if s % 4 == 0 {
            ack(2, vec![s - 1, s - 3])
        } else {
            publish(1, [s], "built")
        };
        append_ok(&store, vec![r.clone()]).await;
        end += frame_len(&r);
        ends.push(end);
        records.push(r);
    }
    store.close();
    drop(store);
    assert_eq!(file_len(&seg_path(dir, 1)), end);
    (records, ends)
}

/// Reopens after damage and checks recovery: exactly `expect` is replayed,
/// the file is cut to `good_len`, and the log keeps working across another
/// append and reopen.
async fn check_recovers(dir: &Path, expect: &[Record], good_len: u64, what: &str) {
    let seg = seg_path(dir, 1);
    let (store, replayed, next) = open_replay(dir);
    assert_eq!(
        replayed, expect,
        "{what}: replay must return exactly the complete records"
    );
    assert_eq!(next, expected_next_seq(expect, 1), "{what}: next_seq");
    assert_eq!(
        file_len(&seg),
        good_len,
        "{what}: the torn tail must be cut off at recovery"
    );
    assert_eq!(store.log_bytes(), good_len, "{what}: log_bytes");

    let after = publish(1, [next], "after-recovery");
    append_ok(&store, vec![after.clone()]).await;
    drop(store);
    assert_eq!(
        file_len(&seg),
        good_len + frame_len(&after),
        "{what}: new frame must follow the good data directly"
    );
    let (_store, replayed, next2) = open_replay(dir);
    let mut want = expect.to_vec();
    want.push(after);
    assert_eq!(
        replayed, want,
        "{what}: records after recovery + one append"
    );
    assert_eq!(next2, next + 1, "{what}");
}

#[tokio::test]
async fn cut_inside_the_last_frame_drops_only_that_frame() {
    bounded(async {
        // Cut points inside the last frame: in its header, right after it,
        // inside the payload, one byte short.
        let probe = tempfile::tempdir().unwrap();
        let (records, ends) = build_log(probe.path(), 6).await;
        let n = ends.len();
        let last_len = ends[n - 1] - ends[n - 2];
        drop(probe);
        for cut in [1, 3, 4, 7, 8, 9, last_len / 2, last_len - 1] {
            let dir = tempfile::tempdir().unwrap();
            let (recs, ends2) = build_log(dir.path(), 6).await;
            assert_eq!(recs, records);
            assert_eq!(ends2, ends);
            truncate(&seg_path(dir.path(), 1), ends[n - 2] + cut);
            check_recovers(
                dir.path(),
                &records[..n - 1],
                ends[n - 2],
                &format!("cut {cut} bytes into last frame"),
            )
            .await;
        }
    })
    .await
}

#[tokio::test]
async fn garbage_after_the_last_frame_is_discarded() {
    bounded(async {
        let mut rng = Rng::new(7);
        let unacked = publish(1, [100, 101, 102], "never-acknowledged");
        let mut unacked_frame = Vec::new();
        unacked.encode_frame(&mut unacked_frame);

        let mut huge_len = Vec::new();
        huge_len.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        huge_len.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);

        let mut bad_crc = unacked_frame.clone();
        bad_crc[5] ^= 0x40;

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("one random byte", rng.bytes(1)),
            ("partial header", rng.bytes(7)),
            ("random header-sized", rng.bytes(8)),
            ("random kilobytes", rng.bytes(5000)),
            (
                "prefix of a real frame",
                unacked_frame[..unacked_frame.len() - 3].to_vec(),
            ),
            ("header of a real frame only", unacked_frame[..8].to_vec()),
            ("real frame with a bad checksum", bad_crc),
            ("header claiming 4 GiB", huge_len),
            // What a crash often leaves on ext4/xfs: the file size was
            // extended but the data blocks were never written.
            ("8 zero bytes", vec![0; 8]),
            ("a zero-filled page", vec![0; 4096]),
            (
                "zeros then garbage",
                [vec![0u8; 16], rng.bytes(40)].concat(),
            ),
        ];
        for (what, tail) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (records, ends) = build_log(dir.path(), 5).await;
            append_raw(&seg_path(dir.path(), 1), &tail);
            check_recovers(dir.path(), &records, *ends.last().unwrap(), what).await;
        }
    })
    .await
}

#[tokio::test]
async fn torn_tail_of_an_empty_log_recovers_to_empty() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = open_replay(dir.path());
        drop(store);
        append_raw(&seg_path(dir.path(), 1), &[9, 0, 0, 0, 1, 2]);
        check_recovers(dir.path(), &[], 0, "torn first frame").await;
    })
    .await
}

#[tokio::test]
async fn torn_tail_only_in_the_newest_segment() {
    bounded(async {
        // Two hand-made segments; the torn write is in the newest.
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<Record> = (1..=5).map(|s| publish(1, [s], "old")).collect();
        let new: Vec<Record> = vec![publish(1, [6, 7], "new"), ack(2, vec![1, 6])];
        write_segment(dir.path(), 1, &old);
        let new_len = write_segment(dir.path(), 6, &new);
        append_raw(
            &seg_path(dir.path(), 6),
            &frames(&[publish(1, [8], "torn")])[..20],
        );

        let (store, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, [old.clone(), new.clone()].concat());
        assert_eq!(next, 8);
        assert_eq!(file_len(&seg_path(dir.path(), 6)), new_len);
        let r = publish(1, [8], "after");
        append_ok(&store, vec![r.clone()]).await;
        drop(store);
        let (_s, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, [old, new, vec![r]].concat());
        assert_eq!(next, 9);
        assert_eq!(
            segment_files(dir.path()).len(),
            2,
            "appends go to the newest segment"
        );
    })
    .await
}

/// Two hand-made segments, seqs 1..=5 and 6..=8.
fn two_segments(dir: &Path) -> (Vec<Record>, Vec<Record>) {
    let old: Vec<Record> = (1..=5).map(|s| publish(1, [s], "closed")).collect();
    let new: Vec<Record> = (6..=8).map(|s| publish(1, [s], "active")).collect();
    write_segment(dir, 1, &old);
    write_segment(dir, 6, &new);
    (old, new)
}

fn assert_corrupt_in(err: StoreError, seg: &Path, what: &str) {
    match &err {
        StoreError::Corrupt { path, .. } => {
            assert_eq!(
                Path::new(path),
                seg,
                "{what}: the error must name the damaged segment"
            )
        }
        other => panic!("{what}: expected StoreError::Corrupt, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&seg.display().to_string()),
        "{what}: message names the file: {err}"
    );
}

#[tokio::test]
async fn damage_in_a_closed_segment_is_corruption() {
    bounded(async {
        // Sanity: the undamaged pair replays fully.
        {
            let dir = tempfile::tempdir().unwrap();
            let (old, new) = two_segments(dir.path());
            let (_s, replayed, next) = open_replay(dir.path());
            assert_eq!(replayed, [old, new].concat());
            assert_eq!(next, 9);
        }
        // Frame end offsets in the closed segment (frames differ in size).
        let old: Vec<Record> = (1..=5).map(|s| publish(1, [s], "closed")).collect();
        let ends: Vec<u64> = old
            .iter()
            .scan(0, |e, r| {
                *e += frame_len(r);
                Some(*e)
            })
            .collect();
        let ends: [u64; 5] = ends.try_into().unwrap();
        type Damage = Box<dyn Fn(&Path)>;
        let cases: Vec<(&str, Damage)> = vec![
            (
                "flipped payload bit in the middle frame",
                Box::new(move |p: &Path| {
                    let mut b = std::fs::read(p).unwrap();
                    b[(ends[1] + 12) as usize] ^= 0x01;
                    std::fs::write(p, b).unwrap();
                }),
            ),
            (
                "flipped length byte in the first frame",
                Box::new(|p: &Path| {
                    let mut b = std::fs::read(p).unwrap();
                    b[0] ^= 0x02;
                    std::fs::write(p, b).unwrap();
                }),
            ),
            (
                "truncated last frame",
                Box::new(move |p: &Path| truncate(p, ends[4] - 2)),
            ),
            (
                "cut inside a header",
                Box::new(move |p: &Path| truncate(p, ends[3] + 3)),
            ),
            (
                "trailing garbage",
                Box::new(|p: &Path| append_raw(p, &[0xAB; 11])),
            ),
            (
                "trailing zeros",
                Box::new(|p: &Path| append_raw(p, &[0; 64])),
            ),
        ];
        for (what, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            two_segments(dir.path());
            let closed = seg_path(dir.path(), 1);
            damage(&closed);
            let before = std::fs::read(&closed).unwrap();
            let err = replay_err(dir.path());
            assert_corrupt_in(err, &closed, what);
            // Reporting corruption must not "repair" (truncate) the evidence.
            assert_eq!(
                std::fs::read(&closed).unwrap(),
                before,
                "{what}: closed segment was modified"
            );
            // And it keeps failing: nothing was silently skipped for next time.
            assert_corrupt_in(replay_err(dir.path()), &closed, what);
        }
    })
    .await
}

#[tokio::test]
async fn checksummed_but_undecodable_frame_is_corruption() {
    bounded(async {
        // A frame whose checksum is right but whose payload is not a record
        // (unknown kind) is not a torn write: it is reported, even at the tail.
        let mut bogus = vec![99u8, 1, 2, 3];
        let mut frame = Vec::new();
        frame.extend_from_slice(&(bogus.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(&bogus).to_le_bytes());
        frame.append(&mut bogus);
        for in_closed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            two_segments(dir.path());
            let seg = seg_path(dir.path(), if in_closed { 1 } else { 6 });
            append_raw(&seg, &frame);
            assert_corrupt_in(
                replay_err(dir.path()),
                &seg,
                &format!("unknown kind, closed={in_closed}"),
            );
        }
    })
    .await
}
