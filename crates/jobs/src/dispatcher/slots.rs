//! Slot bookkeeping: the runs in flight with their cancel switches, the
//! slots held for runs being claimed, and cancels that reached a claimed run
//! before its switch existed.
//!
//! A claim commits runs as `starting` and only then are their ids known
//! here (the intake starts new runs in the commit that queues them; the
//! scheduler claims several runs in one commit). So the slots are
//! *reserved* before the commit and each claimed run is *admitted* after
//! it. A cancel that finds the run `starting` but not yet admitted leaves a
//! mark, and admission cancels the new switch at once: whichever of the two
//! takes the state lock first, the cancel reaches the run.

use std::collections::{HashMap, HashSet};

use pubrun_exec::CancellationToken;

/// A run in flight.
pub(super) struct Active {
    pub job: String,
    pub token: CancellationToken,
    /// Holds one of the server's local slots (runs of a remote pool do not).
    pub local: bool,
}

#[derive(Default)]
pub(super) struct Slots {
    active: HashMap<i64, Active>,
    /// Slots held for claims in progress, per job.
    reserved: HashMap<String, usize>,
    /// How many of the reserved slots are local.
    reserved_local: usize,
    /// Runs a cancel found claimed but not admitted yet.
    cancel_marks: HashSet<i64>,
}

impl Slots {
    /// Runs of `job` in flight or being claimed.
    pub fn busy(&self, job: &str) -> usize {
        let running = self.active.values().filter(|a| a.job == job).count();
        running + self.reserved.get(job).copied().unwrap_or(0)
    }

    /// Local slots in use or reserved.
    pub fn local_busy(&self) -> usize {
        self.active.values().filter(|a| a.local).count() + self.reserved_local
    }

    /// Ids of `job`'s runs in flight.
    pub fn ids_of(&self, job: &str) -> Vec<i64> {
        self.active
            .iter()
            .filter(|(_, a)| a.job == job)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Holds `n` slots of `job` for a claim whose run ids are not known yet.
    pub fn reserve(&mut self, job: &str, local: bool, n: usize) {
        if n == 0 {
            return;
        }
        *self.reserved.entry(job.to_string()).or_default() += n;
        if local {
            self.reserved_local += n;
        }
    }

    /// Gives back `n` reserved slots that no run took.
    pub fn unreserve(&mut self, job: &str, local: bool, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(r) = self.reserved.get_mut(job) {
            *r = r.saturating_sub(n);
            if *r == 0 {
                self.reserved.remove(job);
            }
        }
        if local {
            self.reserved_local = self.reserved_local.saturating_sub(n);
        }
    }

    /// A claimed run takes one of its job's reserved slots and gets its
    /// cancel switch, already cancelled if a cancel came first.
    pub fn admit(&mut self, id: i64, job: &str, local: bool) -> CancellationToken {
        self.unreserve(job, local, 1);
        self.insert(id, job, local)
    }

    /// Registers a run in flight without a reservation (recovery at start).
    pub fn insert(&mut self, id: i64, job: &str, local: bool) -> CancellationToken {
        let token = CancellationToken::new();
        if self.cancel_marks.remove(&id) {
            token.cancel();
        }
        self.active.insert(
            id,
            Active {
                job: job.to_string(),
                token: token.clone(),
                local,
            },
        );
        token
    }

    /// The run's attempt is over and recorded: its slot is free.
    pub fn remove(&mut self, id: i64) {
        self.active.remove(&id);
        self.cancel_marks.remove(&id);
    }

    /// Cancels the run in flight, or marks it for its admission.
    pub fn cancel(&mut self, id: i64) {
        match self.active.get(&id) {
            Some(a) => a.token.cancel(),
            None => {
                self.cancel_marks.insert(id);
            }
        }
    }

    /// Drops the mark of a run that can no longer be admitted (ended, or
    /// queued with its cancel flag set, which no claim takes).
    pub fn forget_mark(&mut self, id: i64) {
        self.cancel_marks.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_before_admission_cancels_the_run_when_admitted() {
        let mut s = Slots::default();
        s.reserve("j", true, 2);
        assert_eq!((s.busy("j"), s.local_busy()), (2, 2));
        s.cancel(7);
        let early = s.admit(7, "j", true);
        assert!(early.is_cancelled());
        let other = s.admit(8, "j", true);
        assert!(!other.is_cancelled());
        assert_eq!((s.busy("j"), s.local_busy()), (2, 2));
        s.cancel(8);
        assert!(other.is_cancelled());
        s.remove(7);
        s.remove(8);
        assert_eq!((s.busy("j"), s.local_busy()), (0, 0));
    }

    #[test]
    fn remote_reservations_take_no_local_slot() {
        let mut s = Slots::default();
        s.reserve("r", false, 3);
        assert_eq!((s.busy("r"), s.local_busy()), (3, 0));
        s.unreserve("r", false, 3);
        assert_eq!(s.busy("r"), 0);
    }
}
