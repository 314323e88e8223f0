//! Waiting on [`pubrun_core::clock::Clock`]: the scheduler sleeps toward its
//! next tick on the system clock, and on a manual clock waits for the test to
//! move time (no test waits for wall-clock minutes).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use pubrun_core::clock::Clock;
use tokio::sync::Notify;

/// Longest the system clock sleeps before the scheduler looks again, so a
/// wall-clock step (NTP, suspend) is noticed within this time.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Resolves once `deadline` may have been reached. It may resolve early (the
/// caller re-reads [`Clock::now`] and re-evaluates). On a manual clock it
/// resolves only if the deadline has already passed: moving the clock wakes
/// the waiter through [`wake_on_set`] instead.
pub fn sleep_until(clock: &dyn Clock, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
    let now = clock.now();
    if clock.is_manual() {
        return if now >= deadline {
            Box::pin(std::future::ready(()))
        } else {
            Box::pin(std::future::pending())
        };
    }
    let wait = (deadline - now).to_std().unwrap_or(Duration::ZERO);
    // A millisecond of slack so the wake-up is at or after the tick.
    let wait = (wait + Duration::from_millis(1)).min(MAX_SLEEP);
    Box::pin(tokio::time::sleep(wait))
}

/// Notifies `wake` each time the clock is moved by hand. `notify_one` stores
/// a permit when nobody waits, so a move between two waits is not lost.
pub fn wake_on_set(clock: &dyn Clock, wake: Arc<Notify>) {
    clock.on_set(Arc::new(move || wake.notify_one()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use pubrun_core::clock::ManualClock;

    #[tokio::test]
    async fn a_manual_clock_sleeps_until_moved_past_the_deadline() {
        let clock = ManualClock::at_ms(0);
        let deadline = DateTime::from_timestamp_millis(1_000).unwrap();
        let wake = Arc::new(Notify::new());
        wake_on_set(&clock, wake.clone());

        let pending = sleep_until(&clock, deadline);
        assert!(futures::FutureExt::now_or_never(pending).is_none());

        clock.advance(Duration::from_secs(1));
        // The permit stored by the move makes this return at once.
        wake.notified().await;
        sleep_until(&clock, deadline).await;
    }
}
