//! Segments and space reclaim: only a prefix of closed segments whose every
//! message is below the live watermark is deleted, the active segment never
//! is, `log_bytes` follows, and `next_seq` never goes backwards. Also the
//! writer's own segment roll, driven from a hand-made ~64 MiB tail.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::*;
use pubrun_store::{Record, Store};

/// The writer starts a new segment once the active one reaches this size
/// (`SEGMENT_BYTES` in embedded.rs).
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

struct Crafted {
    /// (base, records, bytes) per segment, oldest first; the last is active.
    segs: Vec<(u64, Vec<Record>, u64)>,
}

impl Crafted {
    fn all_from(&self, first_seg: usize) -> Vec<Record> {
        self.segs[first_seg..]
            .iter()
            .flat_map(|s| s.1.clone())
            .collect()
    }
    fn bytes_from(&self, first_seg: usize) -> u64 {
        self.segs[first_seg..].iter().map(|s| s.2).sum()
    }
}

/// Segments 1 (seqs 1..=10), 11 (11..=20), 21 (21..=30) closed, and the
/// active segment 31 holding `active` (acks for older messages ride along in
/// every segment).
fn craft(dir: &Path, active: Vec<Record>) -> Crafted {
    let mut segs = Vec::new();
    for base in [1u64, 11, 21] {
        let mut recs = Vec::new();
        for s in (base..base + 10).step_by(2) {
            recs.push(publish(1, [s, s + 1], &format!("seg{base}")));
            recs.push(ack(5, vec![s]));
        }
        let bytes = write_segment(dir, base, &recs);
        segs.push((base, recs, bytes));
    }
    let bytes = write_segment(dir, 31, &active);
    segs.push((31, active, bytes));
    Crafted { segs }
}

fn disk_bytes(dir: &Path) -> u64 {
    segment_files(dir).iter().map(|s| s.1).sum()
}

fn bases(dir: &Path) -> Vec<u64> {
    segment_files(dir).iter().map(|s| s.0).collect()
}

#[tokio::test]
async fn reclaim_deletes_only_a_dead_prefix_of_closed_segments() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let c = craft(
            dir.path(),
            vec![publish(1, 31..=35, "active"), ack(5, vec![1, 31])],
        );
        let (store, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, c.all_from(0));
        assert_eq!(next, 36);
        assert_eq!(store.log_bytes(), c.bytes_from(0));
        assert_eq!(store.log_bytes(), disk_bytes(dir.path()));

        // Segment 1 still holds seq 10 >= 5 and 10: nothing goes.
        assert_eq!(store.reclaim(0).unwrap(), 0);
        assert_eq!(store.reclaim(5).unwrap(), 0);
        assert_eq!(store.reclaim(10).unwrap(), 0);
        assert_eq!(bases(dir.path()), vec![1, 11, 21, 31]);

        // 11: every seq of segment 1 is dead, segment 11 holds 11..=20.
        assert_eq!(store.reclaim(11).unwrap(), c.segs[0].2);
        assert_eq!(bases(dir.path()), vec![11, 21, 31]);
        assert_eq!(store.log_bytes(), c.bytes_from(1));
        assert_eq!(store.log_bytes(), disk_bytes(dir.path()));
        // Idempotent.
        assert_eq!(store.reclaim(11).unwrap(), 0);

        // 25: segment 11 is dead, segment 21 (max 30) is not.
        assert_eq!(store.reclaim(25).unwrap(), c.segs[1].2);
        assert_eq!(bases(dir.path()), vec![21, 31]);
        assert_eq!(store.log_bytes(), c.bytes_from(2));

        // Appends keep working while segments are deleted.
        let more = publish(1, [36], "after-reclaim");
        append_ok(&store, vec![more.clone()]).await;
        assert_eq!(store.log_bytes(), c.bytes_from(2) + frame_len(&more));

        // Everything is dead, yet the active segment stays.
        assert_eq!(store.reclaim(u64::MAX).unwrap(), c.segs[2].2);
        assert_eq!(bases(dir.path()), vec![31]);
        assert_eq!(store.log_bytes(), c.segs[3].2 + frame_len(&more));
        assert_eq!(store.log_bytes(), disk_bytes(dir.path()));
        assert_eq!(store.reclaim(u64::MAX).unwrap(), 0);
        drop(store);

        let (store, replayed, next) = open_replay(dir.path());
        let mut want = c.all_from(3);
        want.push(more);
        assert_eq!(
            replayed, want,
            "the active segment's records survive reclaim"
        );
        assert_eq!(next, 37);
        assert_eq!(store.log_bytes(), disk_bytes(dir.path()));
    })
    .await
}

#[tokio::test]
async fn reclaim_after_reopen_sees_the_same_segments() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let c = craft(dir.path(), vec![publish(1, [31], "active")]);
        let (store, _, _) = open_replay(dir.path());
        assert_eq!(
            store.reclaim(21).unwrap(),
            c.segs[0].2 + c.segs[1].2,
            "two segments at once"
        );
        drop(store);
        // A reopened store knows the remaining closed segment.
        let (store, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, c.all_from(2));
        assert_eq!(next, 32);
        assert_eq!(store.log_bytes(), c.bytes_from(2));
        assert_eq!(store.reclaim(31).unwrap(), c.segs[2].2);
        assert_eq!(bases(dir.path()), vec![31]);
    })
    .await
}

#[tokio::test]
async fn next_seq_never_goes_backwards_when_only_an_empty_active_segment_is_left() {
    bounded(async {
        // The writer had just rolled to segment 31 when it stopped, so the
        // active segment is empty and all seqs live in closed segments.
        let dir = tempfile::tempdir().unwrap();
        let c = craft(dir.path(), vec![]);
        let (store, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, c.all_from(0));
        assert_eq!(next, 31);
        assert_eq!(store.reclaim(u64::MAX).unwrap(), c.bytes_from(0));
        assert_eq!(store.log_bytes(), 0);
        assert_eq!(
            bases(dir.path()),
            vec![31],
            "the empty active segment must stay: it carries next_seq"
        );
        drop(store);

        let (store, replayed, next) = open_replay(dir.path());
        assert!(replayed.is_empty());
        assert_eq!(
            next, 31,
            "seqs 1..=30 were handed out; they must never be reused"
        );
        let r = publish(1, [31], "reused?");
        append_ok(&store, vec![r.clone()]).await;
        drop(store);
        let (_s, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, vec![r]);
        assert_eq!(next, 32);
    })
    .await
}

/// ~64 MiB of publishes in hand-made segment 1: seqs 1..=64, 1 MiB each.
fn craft_full_segment(dir: &Path) -> (Vec<Record>, u64) {
    let data = Bytes::from(vec![0x5Au8; 1024 * 1024]);
    let recs: Vec<Record> = (1..=64u64)
        .map(|s| Record::Publish {
            topic_uid: 1,
            messages: vec![message(s, "full", data.clone())],
        })
        .collect();
    let bytes = write_segment(dir, 1, &recs);
    assert!(bytes >= SEGMENT_BYTES);
    (recs, bytes)
}

#[tokio::test]
async fn writer_rolls_a_full_segment_and_reclaims_it() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (_, seg1_bytes) = craft_full_segment(dir.path());
        let (store, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed.len(), 64);
        assert_eq!(next, 65);

        // This append lands in the full segment, after which the writer
        // starts segment 66 (named after the next seq).
        let r65 = publish(1, [65], "last-in-seg1");
        append_ok(&store, vec![r65.clone()]).await;
        let r66 = publish(1, [66], "first-in-seg66");
        let a = ack(2, vec![1, 65, 66]);
        append_ok(&store, vec![r66.clone(), a.clone()]).await;
        assert_eq!(
            bases(dir.path()),
            vec![1, 66],
            "the writer must have rolled to a new segment"
        );
        let seg1 = seg1_bytes + frame_len(&r65);
        assert_eq!(file_len(&seg_path(dir.path(), 1)), seg1);
        assert_eq!(store.log_bytes(), disk_bytes(dir.path()));

        // The rolled segment is known to reclaim without a reopen.
        assert_eq!(
            store.reclaim(65).unwrap(),
            0,
            "seq 65 is in segment 1 and still live"
        );
        assert_eq!(store.reclaim(66).unwrap(), seg1);
        assert_eq!(bases(dir.path()), vec![66]);
        assert_eq!(store.log_bytes(), frame_len(&r66) + frame_len(&a));
        drop(store);

        let (_s, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed, vec![r66.clone(), a.clone()]);
        assert_eq!(next, 67);
    })
    .await
}

#[tokio::test]
async fn roll_of_a_segment_without_publishes_keeps_the_active_segment_safe() {
    bounded(async {
        // Segment 1 holds seqs 1..=5; the active segment 6 then filled with
        // acknowledgements only (a backlog being drained, nothing new
        // published), so when it fills up the next seq is still 6.
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<Record> = (1..=5).map(|s| publish(1, [s], "old")).collect();
        let old_bytes = write_segment(dir.path(), 1, &old);
        // Big seq values encode as 10-byte varints: ~1 MiB per frame.
        let big_ack = ack(3, (0..100_000u64).map(|i| u64::MAX - i).collect());
        let mut acks_bytes = Vec::new();
        while (acks_bytes.len() as u64) < SEGMENT_BYTES {
            big_ack.encode_frame(&mut acks_bytes);
        }
        let ack_frames = acks_bytes.len() as u64 / frame_len(&big_ack);
        std::fs::write(seg_path(dir.path(), 6), &acks_bytes).unwrap();
        drop(acks_bytes);

        let (store, replayed, next) = open_replay(dir.path());
        assert_eq!(replayed.len() as u64, 5 + ack_frames);
        assert_eq!(next, 6);

        // Fills the segment past its limit, with no new seq.
        let a = ack(3, vec![1, 2]);
        append_ok(&store, vec![a.clone()]).await;
        let p6 = publish(1, [6], "new");
        append_ok(&store, vec![p6.clone()]).await;
        assert_eq!(
            store.log_bytes(),
            disk_bytes(dir.path()),
            "log_bytes must match the files on disk"
        );

        // The broker reclaims with lowest = next_seq (7) when nothing is
        // pending: segment 1 is dead, but the segment holding seq 6 is not.
        let freed = store.reclaim(7).unwrap();
        assert_eq!(freed, old_bytes, "only segment 1 may be reclaimed");
        assert_eq!(store.log_bytes(), disk_bytes(dir.path()));
        drop(store);

        let (_s, replayed, next) = open_replay(dir.path());
        assert_eq!(
            next, 7,
            "seq 6 was acknowledged as durable; next_seq must stay above it"
        );
        assert_eq!(replayed.len() as u64, ack_frames + 2);
        assert_eq!(&replayed[replayed.len() - 2..], &[a, p6]);
    })
    .await
}
