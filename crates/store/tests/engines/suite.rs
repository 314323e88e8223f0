//! The engine-agnostic store tests: generic over an [`Engine`] (a factory
//! that opens, and reopens, one store's durable state), instantiated for
//! every engine by `store_suite!` in main.rs, as quickwit runs one metastore
//! suite against each backend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::common::*;
use pubrun_store::{Catalog, Record, Store, StoreError};

pub trait Engine: Send + Sync + 'static {
    type S: Store;
    /// Opens the store on this engine's durable state (the same state on
    /// every call: a reopen). The previous store must be dropped first.
    async fn open(&self) -> Self::S;
    /// Writes everything enqueued, then refuses appends.
    fn close(store: &Self::S);
}

pub async fn open_replay<E: Engine>(e: &E) -> (E::S, Vec<Record>, u64) {
    let store = e.open().await;
    let mut recs = Vec::new();
    let next = store.replay(&mut |r| recs.push(r)).expect("replay");
    (store, recs, next)
}

async fn append_ok<S: Store>(store: &S, records: Vec<Record>) {
    bounded(store.append(records)).await.expect("append");
}

const TASKS: u64 = 50;
const APPENDS_PER_TASK: u64 = 100;
/// Appends a task enqueues before awaiting them, so group commit batches
/// many callers and many records of one caller.
const IN_FLIGHT: usize = 8;

/// Which task produced a record: publishes carry it as topic uid, acks as
/// sub uid + 1000.
fn owner(r: &Record) -> u64 {
    match r {
        Record::Publish { topic_uid, .. } => *topic_uid,
        Record::Ack { sub_uid, .. } => sub_uid - 1000,
        Record::Seek { sub_uid, .. } => sub_uid - 1000,
    }
}

/// Runs TASKS tasks that each append APPENDS_PER_TASK calls. Seqs are assigned
/// and `append` called under one lock, as the broker does, so log order must
/// also be seq order. Returns each task's records in its append order.
async fn concurrent_appends<S: Store>(store: Arc<S>, first_seq: u64) -> BTreeMap<u64, Vec<Record>> {
    let next_seq = Arc::new(Mutex::new(first_seq));
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        let next_seq = next_seq.clone();
        handles.push(tokio::spawn(async move {
            let mut mine: Vec<Record> = Vec::new();
            let mut my_seqs: Vec<u64> = Vec::new();
            let mut pending = Vec::new();
            for i in 0..APPENDS_PER_TASK {
                let fut = {
                    let mut next = next_seq.lock().unwrap();
                    let mut batch = Vec::new();
                    // Some calls carry two records in one append.
                    let records_in_call = if i % 10 == 9 { 2 } else { 1 };
                    for j in 0..records_in_call {
                        if (i + j) % 4 == 3 && !my_seqs.is_empty() {
                            let take = my_seqs.len().min(3);
                            let seqs: Vec<u64> = my_seqs.drain(..take).collect();
                            batch.push(ack(1000 + task, seqs));
                        } else {
                            let n = 1 + (i + j) % 3;
                            let seqs: Vec<u64> = (*next..*next + n).collect();
                            *next += n;
                            my_seqs.extend(&seqs);
                            batch.push(publish(task, seqs, &format!("t{task}-i{i}-j{j}")));
                        }
                    }
                    mine.extend(batch.iter().cloned());
                    store.append(batch)
                };
                pending.push(fut);
                if pending.len() == IN_FLIGHT {
                    for f in pending.drain(..) {
                        f.await.expect("append");
                    }
                }
            }
            for f in pending.drain(..) {
                f.await.expect("append");
            }
            (task, mine)
        }));
    }
    let mut by_task = BTreeMap::new();
    for h in handles {
        let (task, mine) = h.await.unwrap();
        by_task.insert(task, mine);
    }
    by_task
}

fn check_log(replayed: &[Record], next: u64, expected: &[BTreeMap<u64, Vec<Record>>]) {
    // Every task's records appear exactly, and in its append order.
    let mut got: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
    for r in replayed {
        got.entry(owner(r)).or_default().push(r.clone());
    }
    let mut want: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
    for round in expected {
        for (task, recs) in round {
            want.entry(*task).or_default().extend(recs.iter().cloned());
        }
    }
    assert_eq!(
        got.len(),
        want.len(),
        "records from unexpected or missing tasks"
    );
    for (task, w) in &want {
        let g = got.get(task).map(Vec::as_slice).unwrap_or(&[]);
        assert_eq!(g.len(), w.len(), "task {task}: record count");
        assert!(
            g == w.as_slice(),
            "task {task}: records differ or are out of order"
        );
    }
    // Enqueue order is log order: seqs were handed out under the same lock
    // as append was called, so they must be strictly ascending in the log
    // and form the contiguous range 1..next.
    let seqs: Vec<u64> = replayed.iter().flat_map(seqs_of).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "publish seqs are not in log order"
    );
    assert_eq!(seqs.first().copied(), Some(1));
    assert_eq!(
        *seqs.last().unwrap() + 1,
        next,
        "next_seq must be just above every seq"
    );
    assert_eq!(seqs.len() as u64, next - 1, "seqs must be contiguous");
}

fn seqs_of(r: &Record) -> Vec<u64> {
    match r {
        Record::Publish { messages, .. } => messages.iter().map(|m| m.seq).collect(),
        Record::Ack { .. } | Record::Seek { .. } => vec![],
    }
}

pub async fn concurrent_appends_round_trip_through_reopen<E: Engine>(e: E) {
    let (store, recs, next) = open_replay(&e).await;
    assert!(recs.is_empty());
    assert_eq!(next, 1, "a new store starts at seq 1");
    assert_eq!(store.log_bytes(), 0);
    let store = Arc::new(store);

    let round1 = concurrent_appends(store.clone(), 1).await;
    let total_bytes: u64 = round1.values().flatten().map(frame_len).sum();
    assert_eq!(
        store.log_bytes(),
        total_bytes,
        "log_bytes counts every durable frame"
    );
    E::close(&store);
    drop(store);

    let (store, replayed, next) = open_replay(&e).await;
    check_log(&replayed, next, std::slice::from_ref(&round1));
    assert_eq!(store.log_bytes(), total_bytes);

    // Recovery leaves the log ready for more: a second round continues the
    // same log, and this time the store is only dropped, not closed.
    let store = Arc::new(store);
    let round2 = concurrent_appends(store.clone(), next).await;
    drop(store);

    let (store, replayed, next) = open_replay(&e).await;
    check_log(&replayed, next, &[round1, round2]);
    // Replay is repeatable: a third open (no appends) sees the same log.
    drop(store);
    let (_store, again, next2) = open_replay(&e).await;
    assert_eq!(again, replayed);
    assert_eq!(next2, next);
}

pub async fn close_writes_everything_enqueued_then_refuses_appends<E: Engine>(e: E) {
    let (store, _, next) = open_replay(&e).await;
    assert_eq!(next, 1);
    // Enqueue without awaiting, then close: close must return only after
    // every enqueued record is written, and every future must resolve Ok.
    let mut expected = Vec::new();
    let mut futs = Vec::new();
    for s in 1..=200u64 {
        let r = if s % 5 == 0 {
            ack(9, vec![s - 1, s - 2])
        } else {
            publish(7, [s], "pre-close")
        };
        expected.push(r.clone());
        futs.push(store.append(vec![r]));
    }
    E::close(&store);
    for f in futs {
        f.await
            .expect("an append enqueued before close must complete");
    }
    assert!(matches!(
        store.append(vec![publish(7, [1000], "late")]).await,
        Err(StoreError::Closed)
    ));
    E::close(&store); // idempotent
    drop(store);

    let (_store, replayed, next) = open_replay(&e).await;
    assert_eq!(replayed, expected);
    assert_eq!(
        next, 200,
        "seq 200 was an ack, so the last published seq is 199"
    );
}

pub async fn append_before_replay_is_refused<E: Engine>(e: E) {
    let store = e.open().await;
    assert!(matches!(
        store.append(vec![publish(1, [1], "early")]).await,
        Err(StoreError::Closed)
    ));
    let mut n = 0;
    assert_eq!(store.replay(&mut |_| n += 1).unwrap(), 1);
    assert_eq!(n, 0, "the refused append must not have reached the log");
    append_ok(&store, vec![publish(1, [1], "ok")]).await;
    drop(store);
    let (_s, recs, next) = open_replay(&e).await;
    assert_eq!(recs, vec![publish(1, [1], "ok")]);
    assert_eq!(next, 2);
}

pub async fn large_records_round_trip<E: Engine>(e: E) {
    let (store, _, _) = open_replay(&e).await;
    let mut rng = Rng::new(42);
    let big = Record::Publish {
        topic_uid: 3,
        messages: (1..=4u64)
            .map(|s| {
                message(
                    s,
                    "big",
                    bytes::Bytes::from(rng.bytes(3 * 1024 * 1024 + s as usize)),
                )
            })
            .collect(),
    };
    let empty_data = Record::Publish {
        topic_uid: 3,
        messages: vec![message(5, "", bytes::Bytes::new())],
    };
    let many_acks = ack(4, (1..=100_000).collect());
    let recs = vec![big, empty_data, many_acks];
    append_ok(&store, recs.clone()).await;
    drop(store);
    let (store, replayed, next) = open_replay(&e).await;
    assert_eq!(replayed, recs);
    assert_eq!(next, 6);
    assert_eq!(store.log_bytes(), recs.iter().map(frame_len).sum::<u64>());
}

pub async fn a_new_store_has_an_empty_catalog<E: Engine>(e: E) {
    let store = e.open().await;
    let c = store.load_catalog().unwrap();
    assert_eq!(c, Catalog::new());
    assert_eq!(c.next_uid, 1);
}

pub async fn saved_catalog_survives_reopen_and_replacement<E: Engine>(e: E) {
    let first = sample_catalog(3);
    let second = sample_catalog(5);
    {
        let store = e.open().await;
        store.save_catalog(&first).await.unwrap();
        assert_eq!(store.load_catalog().unwrap(), first, "visible at once");
    }
    {
        let store = e.open().await;
        assert_eq!(
            store.load_catalog().unwrap(),
            first,
            "durable across reopen"
        );
        store.save_catalog(&second).await.unwrap();
    }
    let store = e.open().await;
    assert_eq!(store.load_catalog().unwrap(), second, "replaced whole");
    // Saving the catalog does not touch the log.
    let mut n = 0;
    assert_eq!(store.replay(&mut |_| n += 1).unwrap(), 1);
    assert_eq!(n, 0);
}

/// Reclaim drops only dead log data: what replays afterwards is a suffix of
/// the log that still holds every record from the first live publish on,
/// `log_bytes` shrinks by what was freed, and `next_seq` never goes back,
/// even once every message is dead.
pub async fn reclaim_keeps_a_live_suffix_and_next_seq<E: Engine>(e: E) {
    let (store, _, _) = open_replay(&e).await;
    let mut log = Vec::new();
    for s in 1..=200u64 {
        let data = bytes::Bytes::from(vec![b'x'; 300]);
        let p = Record::Publish {
            topic_uid: 1,
            messages: vec![message(s, "r", data)],
        };
        log.push(p.clone());
        append_ok(&store, vec![p]).await;
        if s <= 150 {
            let a = ack(2, vec![s]);
            log.push(a.clone());
            append_ok(&store, vec![a]).await;
        }
    }
    let before = store.log_bytes();
    assert_eq!(before, log.iter().map(frame_len).sum::<u64>());
    let freed = store.reclaim(151).unwrap();
    assert!(freed > 0, "most of the log is dead and must be reclaimed");
    assert_eq!(store.log_bytes(), before - freed);
    assert_eq!(
        store.reclaim(151).unwrap(),
        0,
        "nothing more to free at the same mark"
    );
    drop(store);

    let (store, replayed, next) = open_replay(&e).await;
    assert_eq!(next, 201);
    assert!(replayed.len() < log.len());
    assert_eq!(
        replayed[..],
        log[log.len() - replayed.len()..],
        "a suffix of the log"
    );
    let first_live = log
        .iter()
        .position(|r| r.last_seq().is_some_and(|s| s >= 151))
        .unwrap();
    assert!(
        log.len() - replayed.len() <= first_live,
        "a record needed for seq >= 151 was dropped"
    );
    assert_eq!(
        store.log_bytes(),
        replayed.iter().map(frame_len).sum::<u64>()
    );

    // Everything dead: next_seq must still not go backwards.
    let a = ack(2, (151..=200).collect());
    append_ok(&store, vec![a]).await;
    store.reclaim(201).unwrap();
    drop(store);
    let (_store, _, next) = open_replay(&e).await;
    assert_eq!(next, 201, "next_seq never goes backwards after reclaim");
}
