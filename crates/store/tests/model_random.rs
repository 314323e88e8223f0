//! Model-based randomized test: appends (concurrent groups, multi-record
//! calls, un-awaited appends before shutdown), clean reopens, crashes that
//! leave fully written but unacknowledged frames plus a torn fragment, and
//! reclaim calls, checked after every reopen against an in-memory model of
//! the log. Deterministic per seed; a failure prints the seed and step.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::*;
use pubrun_store::{EmbeddedStore, Record, Store};

struct Model {
    /// Every record that must be in the log, in log order.
    records: Vec<Record>,
    /// Seqs published so far (acks pick from these).
    published: Vec<u64>,
    /// Next seq to assign, as the broker would after replay.
    next_seq: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.records.iter().map(frame_len).sum()
    }

    fn gen_record(&mut self, rng: &mut Rng) -> Record {
        if !self.published.is_empty() && rng.chance(30) {
            let n = rng.range(1, 6) as usize;
            let seqs = (0..n)
                .map(|_| self.published[rng.below(self.published.len())])
                .collect();
            return ack(rng.range(1, 4), seqs);
        }
        let n = rng.range(1, 5);
        let messages = (0..n)
            .map(|_| {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.published.push(seq);
                let size = if rng.chance(3) {
                    rng.range(50_000, 200_000)
                } else {
                    rng.range(0, 600)
                };
                message(
                    seq,
                    &format!("m{seq}"),
                    Bytes::from(rng.bytes(size as usize)),
                )
            })
            .collect();
        Record::Publish {
            topic_uid: rng.range(1, 4),
            messages,
        }
    }

    fn gen_call(&mut self, rng: &mut Rng) -> Vec<Record> {
        let n = if rng.chance(20) { rng.range(2, 5) } else { 1 };
        (0..n).map(|_| self.gen_record(rng)).collect()
    }
}

/// Reopens and checks the log against the model; returns the new store.
fn reopen_and_check(dir: &Path, model: &mut Model, ctx: &str) -> EmbeddedStore {
    let (store, replayed, next) = open_replay(dir);
    assert_eq!(replayed.len(), model.records.len(), "{ctx}: record count");
    for (i, (got, want)) in replayed.iter().zip(&model.records).enumerate() {
        assert!(
            got == want,
            "{ctx}: record {i} differs:\n got {got:?}\nwant {want:?}"
        );
    }
    assert_eq!(
        next,
        expected_next_seq(&model.records, 1),
        "{ctx}: next_seq"
    );
    assert_eq!(store.log_bytes(), model.bytes(), "{ctx}: log_bytes");
    assert_eq!(
        file_len(&last_segment(dir)),
        model.bytes(),
        "{ctx}: segment cut to its good length"
    );
    // Like the broker: seqs of torn, never-acknowledged publishes are reused.
    model.next_seq = next;
    let live: std::collections::BTreeSet<u64> = model
        .records
        .iter()
        .flat_map(|r| match r {
            Record::Publish { messages, .. } => messages.iter().map(|m| m.seq).collect(),
            Record::Ack { .. } | Record::Seek { .. } => vec![],
        })
        .collect();
    model.published.retain(|s| live.contains(s));
    store
}

async fn run(seed: u64, steps: usize) {
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model {
        records: Vec::new(),
        published: Vec::new(),
        next_seq: 1,
    };
    let mut store = reopen_and_check(dir.path(), &mut model, &format!("seed {seed} initial"));
    let (mut appends, mut reopens, mut crashes) = (0, 0, 0);
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let roll = rng.range(0, 100);
        if roll < 55 {
            // A group of concurrent appends, awaited together: all must succeed
            // and land in call order.
            let k = rng.range(1, 8);
            let mut futs = Vec::new();
            for _ in 0..k {
                let call = model.gen_call(&mut rng);
                futs.push(store.append(call.clone()));
                model.records.extend(call);
            }
            for f in futs {
                bounded(f)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: append failed: {e}"));
            }
            appends += k;
            assert_eq!(
                store.log_bytes(),
                model.bytes(),
                "{ctx}: log_bytes after appends"
            );
        } else if roll < 70 {
            // Clean restart, sometimes with appends still in flight: shutdown
            // writes everything already enqueued.
            for _ in 0..rng.range(0, 3) {
                let call = model.gen_call(&mut rng);
                drop(store.append(call.clone()));
                model.records.extend(call);
            }
            if rng.chance(50) {
                store.close();
            }
            drop(store);
            store = reopen_and_check(dir.path(), &mut model, &format!("{ctx} (clean reopen)"));
            reopens += 1;
        } else if roll < 95 {
            // Crash: the writer had written some frames completely (never
            // acknowledged, but whole frames are replayed) and then a torn
            // fragment.
            drop(store);
            let seg = last_segment(dir.path());
            assert_eq!(file_len(&seg), model.bytes(), "{ctx}");
            let mut tail = Vec::new();
            for _ in 0..rng.range(0, 3) {
                let r = model.gen_record(&mut rng);
                r.encode_frame(&mut tail);
                model.records.push(r);
            }
            let torn = model.gen_record(&mut rng);
            let mut f = Vec::new();
            torn.encode_frame(&mut f);
            // The torn record's seqs were never made durable: forget them.
            if let Record::Publish { messages, .. } = &torn {
                model.published.retain(|p| *p < messages[0].seq);
            }
            match rng.range(0, 4) {
                0 => tail.extend_from_slice(&f[..rng.range(1, f.len() as u64) as usize]),
                1 => {
                    let n = rng.range(1, 300) as usize;
                    tail.extend(rng.bytes(n));
                }
                2 => tail.extend(std::iter::repeat_n(0u8, rng.range(1, 5000) as usize)),
                _ => {
                    // A whole frame whose payload was not fully written.
                    let cut = rng.range(9, f.len() as u64) as usize;
                    let whole = f.clone();
                    for b in &mut f[cut..] {
                        *b = 0;
                    }
                    if f == whole {
                        *f.last_mut().unwrap() ^= 1;
                    }
                    tail.extend_from_slice(&f);
                }
            }
            append_raw(&seg, &tail);
            store = reopen_and_check(dir.path(), &mut model, &format!("{ctx} (crash recovery)"));
            crashes += 1;
        } else {
            // One segment only (no roll at these sizes): nothing to reclaim,
            // whatever the watermark, and nothing may be lost.
            let lowest = rng.range(0, model.next_seq + 10);
            assert_eq!(
                store.reclaim(lowest).unwrap(),
                0,
                "{ctx}: the active segment is never reclaimed"
            );
            assert_eq!(store.log_bytes(), model.bytes(), "{ctx}");
        }
    }
    drop(store);
    let _ = reopen_and_check(dir.path(), &mut model, &format!("seed {seed} final"));
    assert!(
        appends > 0 && reopens > 0 && crashes > 0,
        "seed {seed}: every operation was exercised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_appends_reopens_and_torn_tails_match_the_model() {
    bounded(async {
        for seed in [1, 2, 3, 0xC0FFEE, 20260501] {
            run(seed, 80).await;
        }
    })
    .await
}
