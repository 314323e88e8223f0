//! One subscription's backlog and lease table.
//!
//! Pure bookkeeping with the clock passed in, so it is tested without time
//! passing. Every backlog message sits in exactly one [`Slot`]:
//!
//! | slot | meaning | index |
//! |---|---|---|
//! | `Ready` | may be handed out now | `ready` |
//! | `Leased` | handed out until a deadline | `expiries` (one `(deadline, seq)` each) |
//! | `Delayed` | retry-policy backoff after a nack or an expired lease | `delayed` (one `(until, seq)` each) |
//! | `Waiting` | ordering: behind an earlier message of its ordering key | — |
//! | `DeadLetter` | to be forwarded to the dead-letter topic, then acked | `dead_letters` |
//!
//! With message ordering, `keys[k]` holds every backlog message with the
//! non-empty ordering key `k` except those in `DeadLetter` (forwarding is best
//! effort and, as Google documents, not ordered). The leased messages of a key
//! form a prefix of its queue; when none is leased the first one is `Ready` or
//! `Delayed` and the others wait; when some are leased all others wait. So the
//! next message of a key is never handed out while an earlier one is
//! outstanding, except several in one [`SubState::take`] (one response), in
//! order — which is how Google batches them too. A nack or expiry of one
//! returns it and every later leased message of its key, so they are
//! redelivered after it, in order.
//!
//! Delivery attempts (`Entry::attempts`) live in memory only, like leases:
//! after a restart every message starts again at attempt 1. Google documents
//! its own count as best effort as well.
//!
//! A stream's `outstanding` counts the leased messages delivered on it.
//!
//! Memory: a backlog entry ([`Entry`]) is 24 bytes (the packed message's
//! pointer, attempts, a one-byte state) in a [`SeqMap`]; the data of a
//! `Leased` or `Delayed` slot and a pending backoff (`not_before`) live in
//! side maps keyed by seq, which only hold the few outstanding / backed-off
//! messages. `ready` is a bitmap [`SeqSet`]. A 1M-message backlog costs ~25
//! bytes per message here on top of the (shared) message itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubrun_core::config::RetryPolicy;
use pubrun_core::filter::Filter;

use crate::msg::Msg;
use crate::seqmap::{SeqMap, SeqSet};

/// A message taken out of the backlog, with everything needed to put it back
/// ([`SubState::restore`]).
pub(crate) struct Pending {
    pub msg: Msg,
    /// Deliveries so far (1 after the first delivery).
    pub attempts: u32,
    pub slot: Slot,
    /// Earliest redelivery earned by the last failed delivery (retry policy);
    /// applied when the message next becomes eligible.
    pub not_before: Option<Instant>,
}

/// A backlog entry. The slot's data (a lease, a backoff end) and
/// `not_before` are in the side maps of [`SubState`].
pub(crate) struct Entry {
    pub msg: Msg,
    /// Deliveries so far (1 after the first delivery).
    pub attempts: u32,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    Leased,
    Delayed,
    Waiting,
    DeadLetter,
    DeadLetterForwarding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Ready,
    Leased(Lease),
    Delayed(Instant),
    Waiting,
    /// `forwarding`: handed to the broker's forwarder, which will ack it or
    /// give it back.
    DeadLetter {
        forwarding: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub deadline: Instant,
    pub stream: Option<u64>,
}

#[derive(Default)]
pub(crate) struct StreamQuota {
    /// 0 = unlimited.
    pub max_messages: u64,
    pub max_bytes: u64,
    pub messages: u64,
    pub bytes: u64,
}

impl StreamQuota {
    fn room(&self, next_size: u64) -> bool {
        let msgs_ok = self.max_messages == 0 || self.messages < self.max_messages;
        // Like the real service, a single message larger than the byte budget
        // is still delivered when nothing else is outstanding.
        let bytes_ok =
            self.max_bytes == 0 || self.bytes == 0 || self.bytes + next_size <= self.max_bytes;
        msgs_ok && bytes_ok
    }
}

/// The delivery settings of a subscription, from its catalog entry.
#[derive(Default, Clone)]
pub(crate) struct Policy {
    pub ordered: bool,
    pub retry: Option<RetryPolicy>,
    /// `max_delivery_attempts` of the dead-letter policy, if there is one.
    pub max_attempts: Option<u32>,
    pub exactly_once: bool,
    /// Applied when messages are added (publish and replay alike).
    pub filter: Filter,
}

pub(crate) struct SubState {
    pub uid: u64,
    /// Receives messages with `seq >= start_seq` (from the catalog entry).
    pub start_seq: u64,
    pub ack_deadline: Duration,
    pub policy: Policy,
    pub backlog: SeqMap<Entry>,
    /// The lease of each `Leased` entry.
    leases: HashMap<u64, Lease>,
    /// The end of the backoff of each `Delayed` entry.
    delays: HashMap<u64, Instant>,
    /// `Pending::not_before` of the entries that have one.
    not_before: HashMap<u64, Instant>,
    pub ready: SeqSet,
    pub expiries: BTreeSet<(Instant, u64)>,
    pub delayed: BTreeSet<(Instant, u64)>,
    pub dead_letters: BTreeSet<u64>,
    /// Ordering only: the queue of each non-empty ordering key.
    pub keys: HashMap<String, BTreeSet<u64>>,
    pub streams: HashMap<u64, StreamQuota>,
    pub notify: Arc<tokio::sync::Notify>,
}

/// A message handed to a subscriber.
pub(crate) struct Handout {
    pub seq: u64,
    pub msg: Msg,
    pub attempt: u32,
}

/// A message to forward to the dead-letter topic.
pub(crate) struct DeadLetter {
    pub seq: u64,
    pub msg: Msg,
    pub attempts: u32,
}

enum Leasing {
    Done(Handout),
    NoRoom,
    DeadLettered,
}

impl SubState {
    pub fn new(uid: u64, ack_deadline_secs: i32) -> Self {
        SubState {
            uid,
            start_seq: 0,
            ack_deadline: Duration::from_secs(ack_deadline_secs as u64),
            policy: Policy::default(),
            backlog: SeqMap::new(),
            leases: HashMap::new(),
            delays: HashMap::new(),
            not_before: HashMap::new(),
            ready: SeqSet::new(),
            expiries: BTreeSet::new(),
            delayed: BTreeSet::new(),
            dead_letters: BTreeSet::new(),
            keys: HashMap::new(),
            streams: HashMap::new(),
            notify: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The slot of a backlog message (`None`: not in the backlog).
    fn slot_of(&self, seq: u64) -> Option<Slot> {
        let e = self.backlog.get(&seq)?;
        Some(match e.state {
            State::Ready => Slot::Ready,
            State::Leased => Slot::Leased(self.leases[&seq]),
            State::Delayed => Slot::Delayed(self.delays[&seq]),
            State::Waiting => Slot::Waiting,
            State::DeadLetter => Slot::DeadLetter { forwarding: false },
            State::DeadLetterForwarding => Slot::DeadLetter { forwarding: true },
        })
    }

    /// The slot of a message known to be in the backlog.
    #[cfg(test)]
    fn slot(&self, seq: u64) -> Slot {
        self.slot_of(seq).expect("message is in the backlog")
    }

    /// Sets the slot of a backlog message (not its index: callers do that).
    fn set_slot(&mut self, seq: u64, slot: Slot) {
        let e = self
            .backlog
            .get_mut(&seq)
            .expect("message is in the backlog");
        match e.state {
            State::Leased => {
                self.leases.remove(&seq);
            }
            State::Delayed => {
                self.delays.remove(&seq);
            }
            _ => {}
        }
        e.state = match slot {
            Slot::Ready => State::Ready,
            Slot::Leased(l) => {
                self.leases.insert(seq, l);
                State::Leased
            }
            Slot::Delayed(t) => {
                self.delays.insert(seq, t);
                State::Delayed
            }
            Slot::Waiting => State::Waiting,
            Slot::DeadLetter { forwarding: false } => State::DeadLetter,
            Slot::DeadLetter { forwarding: true } => State::DeadLetterForwarding,
        };
    }

    fn set_not_before(&mut self, seq: u64, t: Option<Instant>) {
        match t {
            Some(t) => self.not_before.insert(seq, t),
            None => self.not_before.remove(&seq),
        };
    }

    fn is_waiting(&self, seq: u64) -> bool {
        self.backlog[&seq].state == State::Waiting
    }

    /// The ordering key that orders this message here, if any.
    fn key_of(&self, msg: &Msg) -> Option<String> {
        let key = msg.ordering_key();
        (self.policy.ordered && !key.is_empty()).then(|| key.to_string())
    }

    /// Adds a newly published (or replayed) message. Returns false when the
    /// filter does not match: such a message is never part of the backlog.
    pub fn add(&mut self, msg: Msg, now: Instant) -> bool {
        if !self.policy.filter.matches_with(|k| msg.attribute(k)) {
            return false;
        }
        let seq = msg.seq();
        let key = self.key_of(&msg);
        let state = if key.is_some() {
            State::Waiting
        } else {
            State::Ready
        };
        if let Some(old) = self.backlog.insert(
            seq,
            Entry {
                msg,
                attempts: 0,
                state,
            },
        ) {
            // Not expected (callers add a seq once); keep the side maps clean.
            match old.state {
                State::Leased => {
                    if let Some(l) = self.leases.remove(&seq) {
                        self.expiries.remove(&(l.deadline, seq));
                    }
                }
                State::Delayed => {
                    if let Some(t) = self.delays.remove(&seq) {
                        self.delayed.remove(&(t, seq));
                    }
                }
                State::DeadLetter | State::DeadLetterForwarding => {
                    self.dead_letters.remove(&seq);
                }
                State::Ready => {
                    self.ready.remove(&seq);
                }
                State::Waiting => {}
            }
            self.not_before.remove(&seq);
        }
        match key {
            Some(k) => self.enqueue_keyed(&k, seq, now),
            None => {
                self.ready.insert(seq);
            }
        }
        true
    }

    /// Puts a waiting message into its key's queue and restores the key's
    /// invariant. Normally it is the newest and just waits its turn; one that
    /// lands before others (concurrent publishes of one key completing out of
    /// order, a failed ack or forward giving a message back) sends every later
    /// message of the key back to waiting, so they are redelivered after it.
    fn enqueue_keyed(&mut self, key: &str, seq: u64, now: Instant) {
        let set = self.keys.entry(key.to_string()).or_default();
        set.insert(seq);
        let later: Vec<u64> = set.range(seq + 1..).copied().collect();
        for s in later {
            if matches!(
                self.backlog[&s].state,
                State::Ready | State::Leased | State::Delayed
            ) {
                self.detach(s);
            }
        }
        self.fix_key(key, now);
    }

    /// Makes the first message of a key eligible when nothing of the key is
    /// outstanding.
    fn fix_key(&mut self, key: &str, now: Instant) {
        let Some(set) = self.keys.get(key) else {
            return;
        };
        let Some(&first) = set.first() else {
            self.keys.remove(key);
            return;
        };
        if self.is_waiting(first) {
            self.make_eligible(first, now);
        }
    }

    /// Waiting → Ready, or Delayed while its backoff runs.
    fn make_eligible(&mut self, seq: u64, now: Instant) {
        debug_assert!(self.is_waiting(seq), "eligible message is waiting");
        match self.not_before.get(&seq).copied() {
            Some(t) if t > now => {
                self.set_slot(seq, Slot::Delayed(t));
                self.delayed.insert((t, seq));
            }
            _ => {
                self.not_before.remove(&seq);
                self.set_slot(seq, Slot::Ready);
                self.ready.insert(seq);
            }
        }
    }

    /// Takes a message out of whatever index its slot puts it in (releasing
    /// its lease and quota) and leaves it `Waiting`. Returns the old slot.
    fn detach(&mut self, seq: u64) -> Slot {
        let Some(old) = self.slot_of(seq) else {
            return Slot::Waiting;
        };
        self.set_slot(seq, Slot::Waiting);
        let size = self.backlog[&seq].msg.size() as u64;
        self.unindex(seq, old, size);
        old
    }

    /// Removes `seq` from the index of `slot`, releasing a lease's quota.
    fn unindex(&mut self, seq: u64, slot: Slot, size: u64) {
        match slot {
            Slot::Ready => {
                self.ready.remove(&seq);
            }
            Slot::Leased(l) => {
                self.expiries.remove(&(l.deadline, seq));
                if let Some(q) = l.stream.and_then(|s| self.streams.get_mut(&s)) {
                    q.messages = q.messages.saturating_sub(1);
                    q.bytes = q.bytes.saturating_sub(size);
                }
            }
            Slot::Delayed(t) => {
                self.delayed.remove(&(t, seq));
            }
            Slot::Waiting => {}
            Slot::DeadLetter { .. } => {
                self.dead_letters.remove(&seq);
            }
        }
    }

    /// Removes an acked message from the backlog, wherever it is. The
    /// returned `Pending` carries the slot it had.
    pub fn remove(&mut self, seq: u64, now: Instant) -> Option<Pending> {
        let slot = self.slot_of(seq)?;
        let e = self.backlog.remove(&seq).expect("slot_of found it");
        self.leases.remove(&seq);
        self.delays.remove(&seq);
        let p = Pending {
            msg: e.msg,
            attempts: e.attempts,
            slot,
            not_before: self.not_before.remove(&seq),
        };
        self.unindex(seq, p.slot, p.msg.size() as u64);
        if self.policy.ordered && !p.msg.ordering_key().is_empty() {
            let k = p.msg.ordering_key();
            if let Some(set) = self.keys.get_mut(k) {
                set.remove(&seq);
            }
            self.fix_key(k, now);
        }
        Some(p)
    }

    /// Puts back a message that `remove` took out (an ack that failed to
    /// persist): still leased if its lease has not run out (and, with
    /// ordering, everything before it in its key is leased too), else eligible.
    pub fn restore(&mut self, seq: u64, p: Pending, now: Instant) {
        if self.backlog.contains_key(&seq) {
            return;
        }
        let key = self.key_of(&p.msg);
        let lease = match p.slot {
            Slot::Leased(l) if l.deadline > now => Some(l),
            _ => None,
        };
        let lease = lease.filter(|_| {
            key.as_ref().is_none_or(|k| {
                self.keys.get(k).is_none_or(|set| {
                    set.range(..seq)
                        .all(|s| self.backlog[s].state == State::Leased)
                })
            })
        });
        let size = p.msg.size() as u64;
        self.backlog.insert(
            seq,
            Entry {
                msg: p.msg,
                attempts: p.attempts,
                state: State::Waiting,
            },
        );
        self.set_not_before(seq, p.not_before);
        match (lease, key) {
            (Some(l), key) => {
                let l = Lease {
                    stream: l.stream.filter(|s| self.streams.contains_key(s)),
                    ..l
                };
                if let Some(q) = l.stream.and_then(|s| self.streams.get_mut(&s)) {
                    q.messages += 1;
                    q.bytes += size;
                }
                self.set_slot(seq, Slot::Leased(l));
                self.expiries.insert((l.deadline, seq));
                if let Some(k) = key {
                    let set = self.keys.entry(k).or_default();
                    set.insert(seq);
                    // A successor made eligible meanwhile waits again.
                    let later: Vec<u64> = set.range(seq + 1..).copied().collect();
                    for s in later {
                        if matches!(self.backlog[&s].state, State::Ready | State::Delayed) {
                            self.detach(s);
                        }
                    }
                }
            }
            (None, Some(k)) => self.enqueue_keyed(&k, seq, now),
            (None, None) => self.make_eligible(seq, now),
        }
    }

    /// Moves messages whose backoff has passed to `ready`. Returns how many.
    pub fn release_due(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(t, seq)) = self.delayed.first() {
            if t > now {
                break;
            }
            self.delayed.pop_first();
            debug_assert!(self.backlog.contains_key(&seq), "delayed implies backlog");
            self.set_slot(seq, Slot::Ready);
            self.not_before.remove(&seq);
            self.ready.insert(seq);
            n += 1;
        }
        n
    }

    /// Leases one eligible (`Ready`, or `Waiting` next in its key) message.
    fn lease(
        &mut self,
        seq: u64,
        now: Instant,
        deadline: Duration,
        stream: Option<u64>,
    ) -> Leasing {
        let p = &self.backlog[&seq];
        if self
            .policy
            .max_attempts
            .is_some_and(|max| p.attempts >= max)
        {
            // Redelivered without failing itself (it followed an earlier
            // message of its key) and out of attempts: forward instead.
            self.move_to_dead_letters(seq, now);
            return Leasing::DeadLettered;
        }
        let size = p.msg.size() as u64;
        let was_ready = p.state == State::Ready;
        if let Some(q) = stream.and_then(|s| self.streams.get_mut(&s)) {
            if !q.room(size) {
                return Leasing::NoRoom;
            }
            q.messages += 1;
            q.bytes += size;
        }
        if was_ready {
            self.ready.remove(&seq);
        }
        let d = now + deadline;
        self.set_slot(
            seq,
            Slot::Leased(Lease {
                deadline: d,
                stream,
            }),
        );
        self.expiries.insert((d, seq));
        let p = self.backlog.get_mut(&seq).unwrap();
        p.attempts += 1;
        Leasing::Done(Handout {
            seq,
            msg: p.msg.clone(),
            attempt: p.attempts,
        })
    }

    /// Leases up to `max` ready messages until `now + deadline`, in seq order,
    /// respecting the stream's flow-control quota. With ordering, a message's
    /// successors of the same key follow it in the same batch.
    pub fn take(
        &mut self,
        max: usize,
        now: Instant,
        deadline: Duration,
        stream: Option<u64>,
    ) -> Vec<Handout> {
        self.release_due(now);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(seq) = self.ready.first_key() else {
                break;
            };
            let h = match self.lease(seq, now, deadline, stream) {
                Leasing::Done(h) => h,
                Leasing::NoRoom => break,
                Leasing::DeadLettered => continue,
            };
            let key = self.key_of(&h.msg);
            out.push(h);
            let Some(key) = key else { continue };
            let mut cur = seq;
            while out.len() < max {
                let Some(next) = self
                    .keys
                    .get(&key)
                    .and_then(|s| s.range(cur + 1..).next().copied())
                else {
                    break;
                };
                if !self.is_waiting(next) || self.not_before.get(&next).is_some_and(|t| *t > now) {
                    break;
                }
                match self.lease(next, now, deadline, stream) {
                    Leasing::Done(h) => {
                        out.push(h);
                        cur = next;
                    }
                    Leasing::NoRoom | Leasing::DeadLettered => break,
                }
            }
        }
        out
    }

    /// A delivery failed (nack or expired lease): back off, or dead-letter
    /// when the attempts are used up. With ordering, the later leased
    /// messages of its key are returned too, to be redelivered after it.
    fn fail(&mut self, seq: u64, now: Instant) {
        if !matches!(self.slot_of(seq), Some(Slot::Leased(_))) {
            return;
        }
        self.detach(seq);
        let key = self.key_of(&self.backlog[&seq].msg);
        if let Some(k) = &key {
            let later: Vec<u64> = self
                .keys
                .get(k)
                .map(|s| s.range(seq + 1..).copied().collect())
                .unwrap_or_default();
            for s in later {
                if self.backlog[&s].state == State::Leased {
                    self.detach(s);
                }
            }
        }
        let attempts = self.backlog[&seq].attempts;
        if self.policy.max_attempts.is_some_and(|max| attempts >= max) {
            self.move_to_dead_letters(seq, now);
            return;
        }
        let nb = self.policy.retry.map(|r| now + r.backoff(attempts));
        self.set_not_before(seq, nb);
        match key {
            Some(k) => self.fix_key(&k, now),
            None => self.make_eligible(seq, now),
        }
    }

    fn move_to_dead_letters(&mut self, seq: u64, now: Instant) {
        self.detach(seq);
        self.set_slot(seq, Slot::DeadLetter { forwarding: false });
        self.dead_letters.insert(seq);
        if let Some(k) = self.key_of(&self.backlog[&seq].msg) {
            if let Some(set) = self.keys.get_mut(&k) {
                set.remove(&seq);
            }
            self.fix_key(&k, now);
        }
    }

    /// Hands the messages awaiting dead-lettering to the forwarder; they
    /// stay in the backlog (and out of delivery) until acked or given back.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        for &seq in &self.dead_letters {
            let p = self
                .backlog
                .get_mut(&seq)
                .expect("dead letter is in the backlog");
            if p.state == State::DeadLetter {
                p.state = State::DeadLetterForwarding;
                out.push(DeadLetter {
                    seq,
                    msg: p.msg.clone(),
                    attempts: p.attempts,
                });
            }
        }
        out
    }

    /// Gives back a dead letter that could not be forwarded (or whose policy
    /// was removed meanwhile): eligible again after `delay`.
    pub fn return_dead_letter(&mut self, seq: u64, now: Instant, delay: Duration) {
        if !matches!(self.slot_of(seq), Some(Slot::DeadLetter { .. })) {
            return;
        }
        self.detach(seq);
        self.set_not_before(seq, (!delay.is_zero()).then(|| now + delay));
        let key = self.key_of(&self.backlog[&seq].msg);
        match key {
            Some(k) => self.enqueue_keyed(&k, seq, now),
            None => self.make_eligible(seq, now),
        }
    }

    /// True when `seq` is leased, unexpired, by delivery `attempt`: what an
    /// exactly-once ack or modack must name.
    pub fn holds_lease(&self, seq: u64, attempt: u32, now: Instant) -> bool {
        self.backlog.get(&seq).is_some_and(|p| {
            p.attempts == attempt && p.state == State::Leased && self.leases[&seq].deadline > now
        })
    }

    /// Sets a new deadline for a leased message; `None` nacks it. Returns
    /// false when the message is no longer leased (acked or expired).
    pub fn modify(&mut self, seq: u64, new_deadline: Option<Instant>, now: Instant) -> bool {
        let Some(Slot::Leased(lease)) = self.slot_of(seq) else {
            return false;
        };
        match new_deadline {
            Some(d) => {
                self.leases.insert(
                    seq,
                    Lease {
                        deadline: d,
                        ..lease
                    },
                );
                self.expiries.remove(&(lease.deadline, seq));
                self.expiries.insert((d, seq));
            }
            None => self.fail(seq, now),
        }
        true
    }

    /// Fails every lease whose deadline passed and releases due backoffs.
    /// Returns how many messages became ready or were dead-lettered.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(d, seq)) = self.expiries.first() {
            if d > now {
                break;
            }
            self.fail(seq, now);
            n += 1;
        }
        n + self.release_due(now)
    }

    /// Leases taken on a closed stream no longer count against any quota.
    pub fn forget_stream(&mut self, id: u64) {
        self.streams.remove(&id);
        for l in self.leases.values_mut() {
            if l.stream == Some(id) {
                l.stream = None;
            }
        }
    }

    pub fn oldest_seq(&self) -> Option<u64> {
        self.backlog.first_key()
    }

    /// Checks every invariant in the module docs; for tests.
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut counts = [0usize; 5];
        for (seq, p) in self.backlog.iter() {
            match self.slot(seq) {
                Slot::Ready => {
                    counts[0] += 1;
                    assert!(self.ready.contains_key(&seq));
                }
                Slot::Leased(l) => {
                    counts[1] += 1;
                    assert!(self.expiries.contains(&(l.deadline, seq)));
                }
                Slot::Delayed(t) => {
                    counts[2] += 1;
                    assert!(self.delayed.contains(&(t, seq)));
                }
                Slot::Waiting => {
                    counts[3] += 1;
                    assert!(
                        self.key_of(&p.msg).is_some(),
                        "only ordered messages wait: {seq}"
                    );
                }
                Slot::DeadLetter { .. } => {
                    counts[4] += 1;
                    assert!(self.dead_letters.contains(&seq));
                }
            }
            if let Some(k) = self.key_of(&p.msg) {
                let queued = self.keys.get(&k).is_some_and(|s| s.contains(&seq));
                assert_eq!(
                    queued,
                    !matches!(self.slot(seq), Slot::DeadLetter { .. }),
                    "key queue membership of {seq}"
                );
            }
        }
        assert_eq!(counts[0], self.ready.len());
        assert_eq!(counts[1], self.expiries.len());
        assert_eq!(counts[1], self.leases.len(), "one lease per leased entry");
        assert_eq!(counts[2], self.delayed.len());
        assert_eq!(counts[2], self.delays.len(), "one end per delayed entry");
        assert_eq!(counts[4], self.dead_letters.len());
        assert!(
            self.not_before.keys().all(|s| self.backlog.contains_key(s)),
            "not_before only for backlog entries"
        );
        for (k, set) in &self.keys {
            assert!(!set.is_empty(), "empty queue for key {k}");
            let slots: Vec<Slot> = set.iter().map(|s| self.slot(*s)).collect();
            let leased = slots
                .iter()
                .take_while(|s| matches!(s, Slot::Leased(_)))
                .count();
            let rest = &slots[leased..];
            assert!(
                !rest.iter().any(|s| matches!(s, Slot::Leased(_))),
                "leased messages of {k} are a prefix: {slots:?}"
            );
            match rest.split_first() {
                Some((first, others)) if leased == 0 => {
                    assert!(
                        matches!(first, Slot::Ready | Slot::Delayed(_)),
                        "head of {k} is eligible: {slots:?}"
                    );
                    assert!(
                        others.iter().all(|s| *s == Slot::Waiting),
                        "the rest of {k} waits: {slots:?}"
                    );
                }
                _ => assert!(
                    rest.iter().all(|s| *s == Slot::Waiting),
                    "behind outstanding messages of {k}: {slots:?}"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use pubrun_core::Message;

    fn msg(seq: u64, len: usize) -> Msg {
        keyed(seq, len, "")
    }

    fn keyed(seq: u64, len: usize, key: &str) -> Msg {
        Msg::new(&Message {
            seq,
            data: Bytes::from(vec![b'x'; len]),
            attributes: Default::default(),
            ordering_key: key.to_string(),
            publish_time_nanos: 0,
        })
    }

    fn seqs(h: &[Handout]) -> Vec<u64> {
        h.iter().map(|h| h.seq).collect()
    }

    const S10: Duration = Duration::from_secs(10);

    /// The per-message cost the module docs (and bench/broker-results.md) state.
    #[test]
    fn backlog_entry_is_small() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn lease_expire_and_redeliver() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        for i in 1..=3 {
            s.add(msg(i, 1), t0);
        }
        let got = s.take(2, t0, S10, None);
        assert_eq!(seqs(&got), vec![1, 2]);
        s.check_invariants();
        assert_eq!(s.expire(t0 + Duration::from_secs(9)), 0);
        assert!(s.modify(2, Some(t0 + Duration::from_secs(60)), t0));
        assert_eq!(s.expire(t0 + Duration::from_secs(10)), 1);
        s.check_invariants();
        // Message 1 comes back first, with its attempt counted.
        let again = s.take(1, t0 + Duration::from_secs(11), S10, None);
        assert_eq!((again[0].seq, again[0].attempt), (1, 2));
        assert!(s.remove(2, t0).is_some());
        assert!(!s.modify(2, None, t0), "acked message cannot be nacked");
        s.check_invariants();
    }

    #[test]
    fn nack_makes_ready_now() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.add(msg(1, 1), t0);
        s.take(1, t0, S10, None);
        assert!(s.take(1, t0, S10, None).is_empty());
        assert!(s.modify(1, None, t0));
        assert_eq!(s.take(1, t0, S10, None).len(), 1);
        s.check_invariants();
    }

    #[test]
    fn stream_quota_limits_outstanding() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        for i in 1..=10 {
            s.add(msg(i, 100), t0);
        }
        s.streams.insert(
            7,
            StreamQuota {
                max_messages: 3,
                max_bytes: 0,
                ..Default::default()
            },
        );
        assert_eq!(s.take(100, t0, S10, Some(7)).len(), 3);
        assert!(s.take(100, t0, S10, Some(7)).is_empty());
        s.remove(1, t0);
        assert_eq!(s.take(100, t0, S10, Some(7)).len(), 1);
        s.streams.insert(
            8,
            StreamQuota {
                max_messages: 0,
                max_bytes: 250,
                ..Default::default()
            },
        );
        assert_eq!(s.take(100, t0, S10, Some(8)).len(), 2);
        // An expired lease frees its quota.
        s.expire(t0 + Duration::from_secs(11));
        assert_eq!(s.streams[&7].messages, 0);
        assert_eq!(s.streams[&8].bytes, 0);
        s.check_invariants();
    }

    #[test]
    fn retry_policy_delays_redelivery_exponentially() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.policy.retry = Some(
            RetryPolicy::new(Some(Duration::from_secs(2)), Some(Duration::from_secs(5))).unwrap(),
        );
        s.add(msg(1, 1), t0);
        s.add(msg(2, 1), t0);
        assert_eq!(seqs(&s.take(1, t0, S10, None)), [1]);
        // Nacked after its first delivery: back after 2 s, not before.
        s.modify(1, None, t0);
        s.check_invariants();
        assert_eq!(
            seqs(&s.take(10, t0, S10, None)),
            [2],
            "the delayed message is not handed out"
        );
        assert!(s
            .take(10, t0 + Duration::from_millis(1999), S10, None)
            .is_empty());
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(seqs(&s.take(10, t1, S10, None)), [1]);
        // The second failure is an expiry: 4 s.
        let t2 = t1 + S10;
        assert_eq!(s.expire(t2), 2, "both leases ran out");
        s.check_invariants();
        assert!(s
            .take(10, t2 + Duration::from_millis(3999), S10, None)
            .iter()
            .all(|h| h.seq == 2));
        // The maintenance path releases due messages too.
        assert_eq!(s.expire(t2 + Duration::from_secs(4)), 1);
        assert_eq!(s.ready.len(), 1);
        let h = s.take(10, t2 + Duration::from_secs(4), S10, None);
        assert_eq!((h[0].seq, h[0].attempt), (1, 3));
        // Third failure: 8 s capped at the 5 s maximum.
        let t3 = t2 + Duration::from_secs(4);
        s.modify(1, None, t3);
        assert_eq!(s.delayed.first().unwrap().0, t3 + Duration::from_secs(5));
        s.check_invariants();
    }

    #[test]
    fn dead_letter_after_max_attempts() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.policy.max_attempts = Some(5);
        s.add(msg(1, 1), t0);
        for attempt in 1..=5 {
            let h = s.take(1, t0, S10, None);
            assert_eq!((h[0].seq, h[0].attempt), (1, attempt));
            if attempt % 2 == 0 {
                s.modify(1, None, t0);
            } else {
                s.expire(t0 + Duration::from_secs(60));
            }
            s.check_invariants();
        }
        assert!(s.take(1, t0, S10, None).is_empty(), "no sixth delivery");
        let dl = s.take_dead_letters();
        assert_eq!((dl.len(), dl[0].seq, dl[0].attempts), (1, 1, 5));
        assert!(
            s.take_dead_letters().is_empty(),
            "handed to the forwarder once"
        );
        s.check_invariants();
        // Forwarding failed: the message comes back after the delay and is
        // dead-lettered again instead of being delivered.
        s.return_dead_letter(1, t0, Duration::from_secs(1));
        s.check_invariants();
        assert!(s.take(1, t0 + Duration::from_secs(1), S10, None).is_empty());
        assert_eq!(s.take_dead_letters().len(), 1);
        assert!(s.remove(1, t0).is_some());
        s.check_invariants();
        assert!(s.backlog.is_empty());
    }

    #[test]
    fn ordering_key_blocks_until_earlier_settled() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.policy.ordered = true;
        for (i, k) in [(1, "a"), (2, "b"), (3, "a"), (4, ""), (5, "a"), (6, "b")] {
            s.add(keyed(i, 1, k), t0);
        }
        s.check_invariants();
        // One batch: each key's queue in order, unkeyed messages as usual.
        let got = s.take(2, t0, S10, None);
        assert_eq!(
            seqs(&got),
            [1, 3],
            "a's successors follow it in the same batch"
        );
        s.check_invariants();
        // 5 is not handed out in a later batch while 1 and 3 are outstanding.
        assert_eq!(seqs(&s.take(10, t0, S10, None)), [2, 6, 4]);
        s.check_invariants();
        s.remove(1, t0);
        assert!(
            s.take(10, t0, S10, None).is_empty(),
            "3 is still outstanding"
        );
        s.add(keyed(8, 1, "a"), t0);
        s.remove(3, t0);
        assert_eq!(seqs(&s.take(10, t0, S10, None)), [5, 8]);
        s.check_invariants();
        // Restart the scenario for "a": 1 and 3 outstanding, 5 waiting.
        let mut s = SubState::new(1, 10);
        s.policy.ordered = true;
        for (i, k) in [(1, "a"), (2, "b"), (3, "a"), (4, ""), (5, "a"), (6, "b")] {
            s.add(keyed(i, 1, k), t0);
        }
        assert_eq!(seqs(&s.take(10, t0, S10, None)), [1, 3, 5, 2, 6, 4]);
        s.check_invariants();
        // Nack of 3: 3 and 5 (later, outstanding) return; 1 stays leased, so
        // they wait behind it.
        s.modify(3, None, t0);
        s.check_invariants();
        assert!(s.take(10, t0, S10, None).is_empty());
        s.remove(1, t0);
        s.check_invariants();
        let again = s.take(10, t0, S10, None);
        assert_eq!(seqs(&again), [3, 5]);
        assert_eq!(again.iter().map(|h| h.attempt).collect::<Vec<_>>(), [2, 2]);
        // A message published while its key is outstanding waits.
        s.add(keyed(7, 1, "b"), t0);
        assert!(s.take(10, t0, S10, None).is_empty());
        s.remove(2, t0);
        s.remove(6, t0);
        assert_eq!(seqs(&s.take(10, t0, S10, None)), [7]);
        // Expiry of the head returns the whole outstanding tail of its key.
        s.expire(t0 + Duration::from_secs(11));
        s.check_invariants();
        assert_eq!(
            seqs(&s.take(10, t0 + Duration::from_secs(11), S10, None)),
            [3, 5, 4, 7],
            "4 (unkeyed) expired too"
        );
        s.check_invariants();
    }

    #[test]
    fn ordering_with_backoff_and_dead_letters() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.policy.ordered = true;
        s.policy.max_attempts = Some(5);
        s.policy.retry = Some(
            RetryPolicy::new(Some(Duration::from_secs(1)), Some(Duration::from_secs(1))).unwrap(),
        );
        for i in 1..=3 {
            s.add(keyed(i, 1, "k"), t0);
        }
        let mut t = t0;
        // The head fails five times; its successors never overtake it.
        for attempt in 1..=5 {
            let got = s.take(1, t, S10, None);
            assert_eq!(seqs(&got), [1]);
            s.modify(1, None, t);
            s.check_invariants();
            if attempt < 5 {
                assert!(
                    s.take(10, t, S10, None).is_empty(),
                    "2 and 3 wait behind the delayed head"
                );
            }
            t += Duration::from_secs(1);
        }
        // Dead-lettered: it leaves the key, and the next one goes.
        assert_eq!(s.dead_letters.len(), 1);
        s.check_invariants();
        assert_eq!(seqs(&s.take(10, t, S10, None)), [2, 3]);
        assert_eq!(s.take_dead_letters()[0].seq, 1);
        s.remove(1, t);
        s.check_invariants();
    }

    #[test]
    fn filter_keeps_non_matching_messages_out() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.policy.filter = pubrun_core::filter::parse("attributes:keep").unwrap();
        let mut m = msg(1, 1).to_message().as_ref().clone();
        assert!(!s.add(Msg::new(&m), t0));
        m.seq = 2;
        m.attributes.insert("keep".into(), "".into());
        assert!(s.add(Msg::new(&m), t0));
        assert_eq!(s.backlog.keys().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn exactly_once_lease_check_and_failed_ack_restore() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.add(msg(1, 1), t0);
        let h = s.take(1, t0, S10, None);
        assert!(s.holds_lease(1, h[0].attempt, t0));
        assert!(!s.holds_lease(1, h[0].attempt + 1, t0));
        assert!(
            !s.holds_lease(1, h[0].attempt, t0 + S10),
            "expired at the deadline"
        );
        // An ack that fails to persist keeps the lease it had.
        let p = s.remove(1, t0).unwrap();
        s.restore(1, p, t0);
        s.check_invariants();
        assert!(s.holds_lease(1, 1, t0));
        // Nacked and redelivered: the old delivery no longer holds it.
        s.modify(1, None, t0);
        s.take(1, t0, S10, None);
        assert!(!s.holds_lease(1, 1, t0) && s.holds_lease(1, 2, t0));
    }

    /// Random operations keep every invariant.
    #[test]
    fn random_operations_keep_invariants() {
        let mut next = crate::seqmap::test_rng(0x2545F4914F6CDD1D);
        for round in 0..20 {
            let t0 = Instant::now();
            let mut s = SubState::new(1, 10);
            s.policy.ordered = round % 2 == 0;
            s.policy.max_attempts = (round % 3 == 0).then_some(5);
            s.policy.retry = (round % 4 < 2).then(|| {
                RetryPolicy::new(Some(Duration::from_secs(1)), Some(Duration::from_secs(4)))
                    .unwrap()
            });
            s.streams.insert(
                1,
                StreamQuota {
                    max_messages: 5,
                    ..Default::default()
                },
            );
            let mut seq = 0;
            let mut t = t0;
            for _ in 0..2000 {
                match next(8) {
                    0 | 1 => {
                        seq += 1;
                        let key = ["", "a", "b", "c"][next(4) as usize];
                        s.add(keyed(seq, 1, key), t);
                    }
                    2 => {
                        s.take(
                            next(4) as usize + 1,
                            t,
                            S10,
                            if next(2) == 0 { Some(1) } else { None },
                        );
                    }
                    3 => {
                        if let Some(&(_, q)) = s
                            .expiries
                            .iter()
                            .nth(next(s.expiries.len() as u64 + 1) as usize)
                        {
                            s.modify(q, None, t);
                        }
                    }
                    4 => {
                        let pick = s
                            .backlog
                            .keys()
                            .nth(next(s.backlog.len() as u64 + 1) as usize);
                        if let Some(q) = pick {
                            if let Some(p) = s.remove(q, t) {
                                if next(4) == 0 {
                                    s.restore(q, p, t);
                                }
                            }
                        }
                    }
                    5 => t += Duration::from_millis(next(5000)),
                    6 => {
                        s.expire(t);
                    }
                    _ => {
                        for d in s.take_dead_letters() {
                            if next(2) == 0 {
                                s.remove(d.seq, t);
                            } else {
                                s.return_dead_letter(d.seq, t, Duration::from_secs(1));
                            }
                        }
                    }
                }
                s.check_invariants();
            }
        }
    }
}
