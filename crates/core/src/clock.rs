//! The one clock behind every time decision (publish times, retention,
//! schedules, run timestamps, leases, idle timeouts). Production code holds an
//! `Arc<dyn Clock>` set to [`SystemClock`]; tests hold a [`ManualClock`] and
//! move time by hand instead of waiting for it.
//!
//! Waiting belongs to the async crates: a waiter sleeps toward a deadline and
//! re-reads [`Clock::now`] when it wakes. A manual clock never passes a
//! deadline by itself, so it calls back every watcher registered with
//! [`Clock::on_set`] each time it is moved.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// A callback run whenever a manual clock is moved.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// Milliseconds since the Unix epoch (run and machine timestamps).
    fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }

    /// Nanoseconds since the Unix epoch (publish times). Saturates in 2262.
    fn now_nanos(&self) -> i64 {
        self.now().timestamp_nanos_opt().unwrap_or(i64::MAX)
    }

    /// True when time moves only when told to: a waiter must then wait for
    /// an [`Clock::on_set`] call rather than for real time to pass.
    fn is_manual(&self) -> bool {
        false
    }

    /// Registers `wake` to be called whenever the clock is moved by hand.
    /// The system clock never is, so by default this does nothing.
    fn on_set(&self, _wake: Wake) {}
}

/// Wall-clock time: the only place production code reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The system clock as the shared handle production code passes around.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// RFC 3339 in UTC with nanoseconds (`1970-01-01T00:00:00.000000000Z`), the
/// form of Pub/Sub publish times; `nanos` counts from the Unix epoch.
pub fn rfc3339_nanos(nanos: i64) -> String {
    DateTime::from_timestamp_nanos(nanos).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A clock that moves only when told to. Clones share one time.
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

struct ManualInner {
    now: Mutex<DateTime<Utc>>,
    watchers: Mutex<Vec<Wake>>,
}

/// A poisoned lock only means a watcher panicked; the time itself is whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            inner: Arc::new(ManualInner {
                now: Mutex::new(start),
                watchers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Starts at `nanos` since the Unix epoch.
    pub fn at_nanos(nanos: i64) -> Self {
        Self::new(DateTime::from_timestamp_nanos(nanos))
    }

    /// Starts at `ms` milliseconds since the Unix epoch.
    pub fn at_ms(ms: i64) -> Self {
        Self::new(DateTime::from_timestamp_millis(ms).unwrap_or_default())
    }

    /// Sets the time (it may also move backwards) and wakes the watchers.
    pub fn set(&self, t: DateTime<Utc>) {
        *lock(&self.inner.now) = t;
        // Clone the list so a watcher may register another without deadlock.
        let watchers: Vec<Wake> = lock(&self.inner.watchers).clone();
        for w in watchers {
            w();
        }
    }

    /// Moves the time forward by `d` and wakes the watchers.
    pub fn advance(&self, d: Duration) {
        let step = TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        let next = self.now().checked_add_signed(step).unwrap_or(self.now());
        self.set(next);
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now", &*lock(&self.inner.now))
            .finish_non_exhaustive()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *lock(&self.inner.now)
    }

    fn is_manual(&self) -> bool {
        true
    }

    fn on_set(&self, wake: Wake) {
        lock(&self.inner.watchers).push(wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn rfc3339_nanos_formats_known_instants() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(1_764_040_000_123_000_000),
            "2025-11-25T03:06:40.123000000Z"
        );
        assert_eq!(
            rfc3339_nanos(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(rfc3339_nanos(-1), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_wakes_its_watchers() {
        let clock = ManualClock::at_ms(1_000);
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        assert_eq!(shared.now_ms(), 1_000);
        assert_eq!(shared.now_nanos(), 1_000_000_000);
        assert!(shared.is_manual());

        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        shared.on_set(Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        clock.advance(Duration::from_millis(250));
        assert_eq!(shared.now_ms(), 1_250);
        clock.set(DateTime::from_timestamp_millis(500).unwrap());
        assert_eq!(shared.now_ms(), 500, "a manual clock may move backwards");
        assert_eq!(woken.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_system_clock_is_not_manual() {
        let c = system();
        assert!(!c.is_manual());
        assert!(c.now_ms() > 1_700_000_000_000);
    }
}
