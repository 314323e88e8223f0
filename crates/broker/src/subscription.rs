//! One subscription's backlog and lease table.
//!
//! Pure bookkeeping with the clock passed in, so it is tested without time
//! passing. Invariants:
//! - every backlog message is in exactly one of `ready` or `leases`;
//! - `expiries` holds exactly one `(deadline, seq)` per leased message;
//! - a stream's `outstanding` counts the leased messages delivered on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubrun_core::Message;

pub(crate) struct Pending {
    pub msg: Arc<Message>,
    /// Deliveries so far (1 after the first delivery).
    pub attempts: u32,
    pub lease: Option<Lease>,
}

#[derive(Clone, Copy)]
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
        let bytes_ok = self.max_bytes == 0 || self.bytes == 0 || self.bytes + next_size <= self.max_bytes;
        msgs_ok && bytes_ok
    }
}

pub(crate) struct SubState {
    pub uid: u64,
    pub ack_deadline: Duration,
    pub backlog: BTreeMap<u64, Pending>,
    pub ready: BTreeSet<u64>,
    pub expiries: BTreeSet<(Instant, u64)>,
    pub streams: HashMap<u64, StreamQuota>,
    pub notify: Arc<tokio::sync::Notify>,
}

/// A message handed to a subscriber.
pub(crate) struct Handout {
    pub seq: u64,
    pub msg: Arc<Message>,
    pub attempt: u32,
}

impl SubState {
    pub fn new(uid: u64, ack_deadline_secs: i32) -> Self {
        SubState {
            uid,
            ack_deadline: Duration::from_secs(ack_deadline_secs as u64),
            backlog: BTreeMap::new(),
            ready: BTreeSet::new(),
            expiries: BTreeSet::new(),
            streams: HashMap::new(),
            notify: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn add(&mut self, msg: Arc<Message>) {
        let seq = msg.seq;
        self.backlog.insert(seq, Pending { msg, attempts: 0, lease: None });
        self.ready.insert(seq);
    }

    /// Removes an acked message from the backlog, wherever it is.
    pub fn remove(&mut self, seq: u64) -> Option<Pending> {
        let p = self.backlog.remove(&seq)?;
        self.ready.remove(&seq);
        if let Some(l) = p.lease {
            self.expiries.remove(&(l.deadline, seq));
            self.release_quota(l.stream, p.msg.size());
        }
        Some(p)
    }

    /// Puts back a message that `remove` took out (an ack that failed to persist).
    pub fn restore(&mut self, seq: u64, p: Pending) {
        self.backlog.insert(seq, Pending { lease: None, ..p });
        self.ready.insert(seq);
    }

    fn release_quota(&mut self, stream: Option<u64>, size: usize) {
        if let Some(q) = stream.and_then(|s| self.streams.get_mut(&s)) {
            q.messages = q.messages.saturating_sub(1);
            q.bytes = q.bytes.saturating_sub(size as u64);
        }
    }

    /// Leases up to `max` ready messages until `now + deadline`, in seq order,
    /// respecting the stream's flow-control quota.
    pub fn take(&mut self, max: usize, now: Instant, deadline: Duration, stream: Option<u64>) -> Vec<Handout> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&seq) = self.ready.first() else { break };
            let size = self.backlog[&seq].msg.size() as u64;
            if let Some(q) = stream.and_then(|s| self.streams.get_mut(&s)) {
                if !q.room(size) {
                    break;
                }
                q.messages += 1;
                q.bytes += size;
            }
            self.ready.pop_first();
            let p = self.backlog.get_mut(&seq).expect("ready implies backlog");
            p.attempts += 1;
            let d = now + deadline;
            p.lease = Some(Lease { deadline: d, stream });
            self.expiries.insert((d, seq));
            out.push(Handout { seq, msg: p.msg.clone(), attempt: p.attempts });
        }
        out
    }

    /// Sets a new deadline for a leased message; `None` nacks it. Returns
    /// false when the message is no longer leased (acked or expired).
    pub fn modify(&mut self, seq: u64, new_deadline: Option<Instant>) -> bool {
        let Some(p) = self.backlog.get_mut(&seq) else { return false };
        let Some(lease) = p.lease else { return false };
        self.expiries.remove(&(lease.deadline, seq));
        match new_deadline {
            Some(d) => {
                p.lease = Some(Lease { deadline: d, ..lease });
                self.expiries.insert((d, seq));
            }
            None => {
                p.lease = None;
                let size = p.msg.size();
                self.ready.insert(seq);
                self.release_quota(lease.stream, size);
            }
        }
        true
    }

    /// Returns every lease whose deadline passed to `ready`. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(d, seq)) = self.expiries.first() {
            if d > now {
                break;
            }
            self.expiries.pop_first();
            if let Some(p) = self.backlog.get_mut(&seq) {
                let stream = p.lease.take().and_then(|l| l.stream);
                let size = p.msg.size();
                self.ready.insert(seq);
                self.release_quota(stream, size);
                n += 1;
            }
        }
        n
    }

    pub fn oldest_seq(&self) -> Option<u64> {
        self.backlog.keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(seq: u64, len: usize) -> Arc<Message> {
        Arc::new(Message {
            seq,
            data: Bytes::from(vec![b'x'; len]),
            attributes: Default::default(),
            ordering_key: String::new(),
            publish_time_nanos: 0,
        })
    }

    fn check_invariants(s: &SubState) {
        let leased = s.backlog.values().filter(|p| p.lease.is_some()).count();
        assert_eq!(leased + s.ready.len(), s.backlog.len());
        assert_eq!(leased, s.expiries.len());
    }

    #[test]
    fn lease_expire_and_redeliver() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        for i in 1..=3 {
            s.add(msg(i, 1));
        }
        let got = s.take(2, t0, Duration::from_secs(10), None);
        assert_eq!(got.iter().map(|h| h.seq).collect::<Vec<_>>(), vec![1, 2]);
        check_invariants(&s);
        assert_eq!(s.expire(t0 + Duration::from_secs(9)), 0);
        assert!(s.modify(2, Some(t0 + Duration::from_secs(60))));
        assert_eq!(s.expire(t0 + Duration::from_secs(10)), 1);
        check_invariants(&s);
        // Message 1 comes back first, with its attempt counted.
        let again = s.take(1, t0 + Duration::from_secs(11), Duration::from_secs(10), None);
        assert_eq!((again[0].seq, again[0].attempt), (1, 2));
        assert!(s.remove(2).is_some());
        assert!(!s.modify(2, None), "acked message cannot be nacked");
        check_invariants(&s);
    }

    #[test]
    fn nack_makes_ready_now() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        s.add(msg(1, 1));
        s.take(1, t0, Duration::from_secs(10), None);
        assert!(s.take(1, t0, Duration::from_secs(10), None).is_empty());
        assert!(s.modify(1, None));
        assert_eq!(s.take(1, t0, Duration::from_secs(10), None).len(), 1);
        check_invariants(&s);
    }

    #[test]
    fn stream_quota_limits_outstanding() {
        let t0 = Instant::now();
        let mut s = SubState::new(1, 10);
        for i in 1..=10 {
            s.add(msg(i, 100));
        }
        s.streams.insert(7, StreamQuota { max_messages: 3, max_bytes: 0, ..Default::default() });
        assert_eq!(s.take(100, t0, Duration::from_secs(10), Some(7)).len(), 3);
        assert!(s.take(100, t0, Duration::from_secs(10), Some(7)).is_empty());
        s.remove(1);
        assert_eq!(s.take(100, t0, Duration::from_secs(10), Some(7)).len(), 1);
        s.streams.insert(8, StreamQuota { max_messages: 0, max_bytes: 250, ..Default::default() });
        assert_eq!(s.take(100, t0, Duration::from_secs(10), Some(8)).len(), 2);
        // An expired lease frees its quota.
        s.expire(t0 + Duration::from_secs(11));
        assert_eq!(s.streams[&7].messages, 0);
        assert_eq!(s.streams[&8].bytes, 0);
        check_invariants(&s);
    }
}
