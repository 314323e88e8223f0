//! Publish and ack rates for the overview, from the same counters
//! `/metrics` exports (`pubrun_messages_published_total{topic}`,
//! `pubrun_messages_acked_total{subscription}`): a sampler keeps about a
//! minute of counter readings, and a page divides the increase since the
//! oldest reading by the time between them, as Prometheus' `rate()` would.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use pubrun_observability::metrics::{counter_value, labels, metrics};

/// How far back a rate looks.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Sampling period of the background sampler.
const PERIOD: Duration = Duration::from_secs(5);
/// A rate over less time than this is noise: shown as unknown.
const MIN_SPAN: Duration = Duration::from_secs(2);

struct Sample {
    at: Instant,
    /// Counter values by topic (full name) / subscription (full name).
    published: HashMap<String, u64>,
    acked: HashMap<String, u64>,
}

#[derive(Default)]
pub(crate) struct Rates {
    samples: Mutex<VecDeque<Sample>>,
}

/// Messages per second, by topic and by subscription; `None` until the
/// sampler has a reading old enough.
pub(crate) struct Current {
    published: HashMap<String, f64>,
    acked: HashMap<String, f64>,
}

impl Current {
    pub fn published(&self, topic: &str) -> Option<f64> {
        self.published.get(topic).copied()
    }
    pub fn acked(&self, subscription: &str) -> Option<f64> {
        self.acked.get(subscription).copied()
    }
}

/// The counters now; `get`, not `get_or_create`: reading a series that
/// does not exist yet must not add it to `/metrics`.
fn reading(topics: &[String], subs: &[String]) -> Sample {
    let m = metrics();

    Sample {
        at: Instant::now(),
        published: topics
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    counter_value(&m.published, &labels([("topic", t)])),
                )
            })
            .collect(),
        acked: subs
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    counter_value(&m.acked, &labels([("subscription", s)])),
                )
            })
            .collect(),
    }
}

impl Rates {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the counters of these topics and subscriptions now, and
    /// forgets readings older than the window.
    pub fn sample(&self, topics: &[String], subs: &[String]) {
        self.record(reading(topics, subs));
    }

    /// Keeps `s`, forgetting readings older than the window before it.
    fn record(&self, s: Sample) {
        let mut q = self.lock();
        while q
            .front()
            .is_some_and(|f| s.at.duration_since(f.at) > WINDOW)
        {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// Rates now against the oldest reading in the window (also recorded,
    /// so a page viewed twice has a rate even without the sampler).
    pub fn current(&self, topics: &[String], subs: &[String]) -> Current {
        let now = reading(topics, subs);
        let mut out = Current {
            published: HashMap::new(),
            acked: HashMap::new(),
        };
        {
            let q = self.lock();
            if let Some(base) = q
                .iter()
                .find(|b| now.at.duration_since(b.at) <= WINDOW + PERIOD)
                .filter(|b| now.at.duration_since(b.at) >= MIN_SPAN)
            {
                let secs = now.at.duration_since(base.at).as_secs_f64();
                let per_sec = |cur: u64, old: Option<&u64>| {
                    // A name first seen since `base` counted from zero.
                    cur.saturating_sub(old.copied().unwrap_or(0)) as f64 / secs
                };
                out.published = now
                    .published
                    .iter()
                    .map(|(k, v)| (k.clone(), per_sec(*v, base.published.get(k))))
                    .collect();
                out.acked = now
                    .acked
                    .iter()
                    .map(|(k, v)| (k.clone(), per_sec(*v, base.acked.get(k))))
                    .collect();
            }
        }
        self.record(now);
        out
    }
}

/// Samples every `PERIOD` while the dashboard lives.
pub(crate) fn spawn_sampler(d: Weak<super::Inner>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return; // a router built outside a runtime (unit tests): rates from page views only
    };
    rt.spawn(async move {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = d.upgrade() else { return };
            let (topics, subs) = inner.broker.overview();
            let topics: Vec<String> = topics.into_iter().map(|t| t.name).collect();
            let subs: Vec<String> = subs.into_iter().map(|s| s.name).collect();
            inner.rates.sample(&topics, &subs);
        }
    });
}

/// `0.25/s`, `12/s`, `—`.
pub(crate) fn show(r: Option<f64>) -> String {
    match r {
        None => "—".to_string(),
        Some(0.0) => "0/s".to_string(),
        Some(r) if r < 10.0 => format!("{r:.2}/s"),
        Some(r) => format!("{r:.0}/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_an_old_enough_reading() {
        let r = Rates::default();
        let t = vec!["projects/rates-test/topics/t".to_string()];
        let c = r.current(&t, &[]);
        assert_eq!(c.published(&t[0]), None, "no earlier reading");
        // Backdate the reading, as if taken 10 s ago.
        r.lock().front_mut().unwrap().at -= Duration::from_secs(10);
        metrics()
            .published
            .get_or_create(&labels([("topic", &t[0])]))
            .inc_by(20);
        let c = r.current(&t, &[]);
        let got = c.published(&t[0]).unwrap();
        assert!((1.9..=2.1).contains(&got), "{got}");
        assert_eq!(show(Some(got)).chars().last(), Some('s'));
        assert_eq!(show(None), "—");
    }
}
