//! The scheduler's clock: the system clock in production, a manual clock in
//! tests (no test waits for wall-clock minutes).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use tokio::sync::Notify;

/// Longest the system clock sleeps before the scheduler looks again, so a
/// wall-clock step (NTP, suspend) is noticed within this time.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// Resolves once `deadline` may have been reached. It may resolve early
    /// (the caller re-reads [`Clock::now`] and re-evaluates).
    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()>;

    /// Registers a notify to be woken whenever the clock is set by hand. The
    /// system clock never is, so its implementation does nothing.
    fn subscribe(&self, _wake: Arc<Notify>) {}
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let wait = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        // A millisecond of slack so the wake-up is at or after the tick.
        let wait = (wait + Duration::from_millis(1)).min(MAX_SLEEP);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to. Every [`ManualClock::set`] /
/// [`ManualClock::advance`] wakes the schedulers using it, which then
/// evaluate at the new time; [`crate::Scheduler::wait_evaluated`] tells a test
/// when that evaluation (and its publishes) are done.
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

struct ManualInner {
    now: Mutex<DateTime<Utc>>,
    subscribers: Mutex<Vec<Arc<Notify>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            inner: Arc::new(ManualInner {
                now: Mutex::new(start),
                subscribers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sets the time (it may also move backwards) and wakes the schedulers.
    pub fn set(&self, t: DateTime<Utc>) {
        *self.inner.now.lock().unwrap_or_else(|p| p.into_inner()) = t;
        for n in self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            // notify_one stores a permit when nobody waits: no lost wake-ups.
            n.notify_one();
        }
    }

    pub fn advance(&self, by: Duration) -> DateTime<Utc> {
        let t = self.now() + TimeDelta::from_std(by).expect("duration in range");
        self.set(t);
        t
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.inner.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        if self.now() >= deadline {
            Box::pin(std::future::ready(()))
        } else {
            // Woken through `subscribe` when the clock is set.
            Box::pin(std::future::pending())
        }
    }

    fn subscribe(&self, wake: Arc<Notify>) {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wake);
    }
}
