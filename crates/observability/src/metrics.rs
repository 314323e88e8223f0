//! Every metric pubrun exports, in one registry per process.
//!
//! Counters and histograms are updated where things happen (publish, ack,
//! end of a run, store sync). Gauges that describe current state (backlog,
//! oldest unacked message, machines, runs waiting) are read at scrape time
//! from *sources* the server registers, so nothing is counted twice and
//! nothing drifts.
//!
//! The registry is process-wide (as with the `metrics` crate's recorder):
//! the hot paths count through a static, with no handle to thread through
//! every constructor. Tests that start several brokers in one process share
//! the counters.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Label pairs of one series, e.g. `[("job", "resize")]`.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    sources: Arc<Sources>,
    /// `pubrun_messages_published_total{topic}`
    pub published: Family<Labels, Counter>,
    /// `pubrun_messages_acked_total{subscription}`
    pub acked: Family<Labels, Counter>,
    /// `pubrun_runs_total{job,status}`: runs that reached a terminal status.
    pub runs: Family<Labels, Counter>,
    /// `pubrun_run_duration_seconds{job}`: start to end of the final attempt.
    pub run_duration: HistogramFamily,
    /// `pubrun_run_queue_wait_seconds{job}`: queued (or due, for a retry)
    /// to started.
    pub queue_wait: HistogramFamily,
    /// `pubrun_store_sync_seconds`: one fdatasync of the embedded log, or
    /// one commit of the PostgreSQL engine.
    pub store_sync: Histogram,
    /// `pubrun_run_log_syncs_total`: background syncs of the run logs'
    /// filesystem (`--sync interval`; `always` syncs each log instead).
    pub run_log_syncs: Counter,
}

fn duration_histogram() -> Histogram {
    // 50 ms … ~14 h
    Histogram::new(exponential_buckets(0.05, 2.0, 21))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let published = Family::<Labels, Counter>::default();
        let acked = Family::<Labels, Counter>::default();
        let runs = Family::<Labels, Counter>::default();
        let run_duration = HistogramFamily::new_with_constructor(duration_histogram as fn() -> _);
        let queue_wait = HistogramFamily::new_with_constructor(duration_histogram as fn() -> _);
        // 100 µs … ~3.3 s
        let store_sync = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let run_log_syncs = Counter::default();
        // Counter names get `_total` from the encoder.
        registry.register(
            "pubrun_messages_published",
            "Messages published, by topic.",
            published.clone(),
        );
        registry.register(
            "pubrun_messages_acked",
            "Messages acknowledged, by subscription.",
            acked.clone(),
        );
        registry.register(
            "pubrun_runs",
            "Runs that reached a terminal status, by job and status.",
            runs.clone(),
        );
        registry.register(
            "pubrun_run_duration_seconds",
            "Duration of a run's final attempt, from start to end.",
            run_duration.clone(),
        );
        registry.register(
            "pubrun_run_queue_wait_seconds",
            "Time an attempt waited between being due and starting.",
            queue_wait.clone(),
        );
        registry.register(
            "pubrun_store_sync_seconds",
            "Time of one durable write of the Pub/Sub store (fdatasync, or PostgreSQL commit).",
            store_sync.clone(),
        );
        registry.register(
            "pubrun_run_log_syncs",
            "Background syncs of the run logs' filesystem (--sync interval).",
            run_log_syncs.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Metrics {
            registry,
            sources,
            published,
            acked,
            runs,
            run_duration,
            queue_wait,
            store_sync,
            run_log_syncs,
        }
    }

    /// Registers (or replaces: a new server in the same process) the
    /// source `key`, called at every scrape.
    pub fn set_source(
        &self,
        key: &'static str,
        source: impl Fn() -> Vec<Sampled> + Send + Sync + 'static,
    ) {
        self.sources.0.write().insert(key, Box::new(source));
    }

    /// The exposition, in the OpenMetrics text format (which Prometheus
    /// scrapes as `application/openmetrics-text`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a family read at scrape time is a gauge or a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    /// A total kept elsewhere (a database), exported as is; the encoder
    /// adds `_total` to the name.
    Counter,
}

/// One metric family as a source reads it at scrape time.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<(Labels, f64)>,
}

type Source = Box<dyn Fn() -> Vec<Sampled> + Send + Sync>;

#[derive(Default)]
struct Sources(RwLock<BTreeMap<&'static str, Source>>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.read().keys()).finish()
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for source in self.0.read().values() {
            for fam in source() {
                let kind = match fam.kind {
                    Kind::Gauge => MetricType::Gauge,
                    Kind::Counter => MetricType::Counter,
                };
                let mut family = encoder.encode_descriptor(fam.name, fam.help, None, kind)?;
                for (labels, value) in &fam.samples {
                    let e = family.encode_family(labels)?;
                    match fam.kind {
                        Kind::Gauge => ConstGauge::new(*value).encode(e)?,
                        Kind::Counter => ConstCounter::new(*value).encode(e)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// A label set, e.g. `labels([("job", job)])`. Values are escaped here:
/// prometheus-client writes them as given, and a name with `"` or `\`
/// would otherwise break the exposition.
/// A counter series' value, 0 when it was never counted. Reading does not
/// create the series (it would appear in the exposition).
pub fn counter_value(family: &Family<Labels, Counter>, labels: &Labels) -> u64 {
    family.get(labels).map_or(0, |c| c.get())
}

pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k, escape(v))).collect()
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_histograms_and_sources() {
        let m = metrics();
        m.published
            .get_or_create(&labels([("topic", "t1")]))
            .inc_by(3);
        m.store_sync.observe(0.001);
        m.set_source("test", || {
            vec![Sampled {
                name: "pubrun_subscription_backlog_messages",
                help: "Unacked messages.",
                kind: Kind::Gauge,
                samples: vec![(labels([("subscription", "s\"1")]), 7.0)],
            }]
        });
        let text = m.encode();
        assert!(
            text.contains("pubrun_messages_published_total{topic=\"t1\"} 3"),
            "{text}"
        );
        assert!(text.contains("pubrun_store_sync_seconds_count 1"), "{text}");
        assert!(
            text.contains("pubrun_subscription_backlog_messages{subscription=\"s\\\"1\"} 7"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
