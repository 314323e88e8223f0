//! `GET /metrics`: the Prometheus exposition. Counters and histograms are
//! counted where things happen (broker, dispatcher, store); the state
//! gauges are read here, at scrape time, from the broker, the run store and
//! the pools.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use pubrun_broker::Broker;
use pubrun_core::pool::{MachineState, LOCAL_POOL};
use pubrun_observability::metrics::{labels, metrics, Kind, Sampled, CONTENT_TYPE};

const ALL_MACHINE_STATES: [MachineState; 7] = [
    MachineState::Provisioning,
    MachineState::Ready,
    MachineState::Busy,
    MachineState::Idle,
    MachineState::Stopping,
    MachineState::Stopped,
    MachineState::Failed,
];

/// Who may read `/metrics`: with a server token, its holder or the
/// holder of the read-only metrics token; without one, anyone (as the
/// API itself is open then).
#[derive(Clone)]
pub struct MetricsAuth {
    pub server_token: Option<String>,
    pub metrics_token: Option<String>,
    /// Its waiting-runs cache is refreshed before each scrape (the run
    /// store is async, gauge sources are not).
    pub dispatcher: Option<Arc<pubrun_jobs::Dispatcher>>,
    /// Its machine gauges are refreshed before each scrape, likewise.
    pub pools: Option<pubrun_pools::Pools>,
}

pub(crate) async fn handler(State(auth): State<Arc<MetricsAuth>>, req: Request) -> Response {
    if auth.server_token.is_some() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(pubrun_core::secret::bearer_token);
        let ok = given.is_some_and(|g| {
            [&auth.server_token, &auth.metrics_token]
                .into_iter()
                .flatten()
                .any(|t| pubrun_core::secret::verify_bearer(t.as_bytes(), g.as_bytes()))
        });
        if !ok {
            return crate::status::HttpError(pubrun_core::Error::new(
                pubrun_core::Code::Unauthenticated,
                "missing or wrong bearer token: send Authorization: Bearer <token> \
                 (the server's --token, or its --metrics-token)",
            ))
            .into_response();
        }
    }
    if let Some(d) = &auth.dispatcher {
        d.refresh_waiting().await;
    }
    if let Some(p) = &auth.pools {
        p.refresh_gauges().await;
    }
    let mut resp = metrics().encode().into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// Makes this server's state the source of the gauges (replacing the
/// previous server's, in tests that start several in one process).
pub fn install_sources(
    broker: &Arc<Broker>,
    dispatcher: Option<&Arc<pubrun_jobs::Dispatcher>>,
    pools: Option<&pubrun_pools::Pools>,
) {
    let broker: Weak<Broker> = Arc::downgrade(broker);
    let dispatcher = dispatcher.map(Arc::downgrade);
    let pools = pools.cloned();
    metrics().set_source("server", move || {
        let mut out = Vec::new();
        if let Some(b) = broker.upgrade() {
            out.extend(subscription_families(&b));
        }
        let dispatcher = dispatcher.as_ref().and_then(Weak::upgrade);
        out.extend(pool_families(dispatcher.as_deref(), pools.as_ref()));
        out
    });
}

fn subscription_families(broker: &Broker) -> Vec<Sampled> {
    let now = broker.now_nanos();
    let stats = broker.subscription_stats();
    let backlog = stats
        .iter()
        .map(|s| (labels([("subscription", &s.name)]), s.backlog as f64))
        .collect();
    let age = stats
        .iter()
        .map(|s| {
            let age = s
                .oldest_unacked_publish_nanos
                .map_or(0.0, |t| (now - t).max(0) as f64 / 1e9);
            (labels([("subscription", &s.name)]), age)
        })
        .collect();
    vec![
        Sampled {
            name: "pubrun_subscription_backlog_messages",
            help: "Unacknowledged messages of a subscription (ready and leased).",
            kind: Kind::Gauge,
            samples: backlog,
        },
        Sampled {
            name: "pubrun_subscription_oldest_unacked_age_seconds",
            help: "Age of the oldest unacknowledged message of a subscription (0 when none).",
            kind: Kind::Gauge,
            samples: age,
        },
    ]
}

fn pool_families(
    dispatcher: Option<&pubrun_jobs::Dispatcher>,
    pools: Option<&pubrun_pools::Pools>,
) -> Vec<Sampled> {
    let now = pubrun_pools::now_ms();
    // Runs waiting: due in the run store (by their job's pool) plus, for
    // remote pools, those handed to the pool and waiting for a machine.
    let mut waiting: BTreeMap<String, u64> = BTreeMap::new();
    waiting.insert(LOCAL_POOL.to_string(), 0);
    if let Some(d) = dispatcher {
        let pool_of: BTreeMap<String, String> =
            d.jobs().into_iter().map(|j| (j.name, j.pool)).collect();
        for (job, n) in d.waiting_by_job() {
            let pool = pool_of.get(&job).map_or(LOCAL_POOL, String::as_str);
            *waiting.entry(pool.to_string()).or_default() += n;
        }
    }
    let mut machines: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut machine_ms: BTreeMap<String, i64> = BTreeMap::new();
    if let Some(p) = pools {
        for spec in p.specs() {
            *waiting.entry(spec.name.clone()).or_default() += p.waiting(&spec.name) as u64;
            for s in ALL_MACHINE_STATES {
                machines.insert((spec.name.clone(), s.as_str()), 0);
            }
            machine_ms.insert(spec.name.clone(), 0);
        }
        let gauges = p.gauges();
        for m in gauges.machines {
            *machines.entry((m.pool, m.state.as_str())).or_default() += 1;
        }
        for s in gauges.spans {
            *machine_ms.entry(s.pool).or_default() += (s.end_ms.unwrap_or(now) - s.start_ms).max(0);
        }
    }
    vec![
        Sampled {
            name: "pubrun_runs_waiting",
            help: "Runs due to start that wait for a slot or a machine, by pool.",
            kind: Kind::Gauge,
            samples: waiting
                .iter()
                .map(|(p, n)| (labels([("pool", p)]), *n as f64))
                .collect(),
        },
        Sampled {
            name: "pubrun_machines",
            help: "Machines of a pool by state.",
            kind: Kind::Gauge,
            samples: machines
                .iter()
                .map(|((p, s), n)| (labels([("pool", p), ("state", s)]), *n as f64))
                .collect(),
        },
        Sampled {
            name: "pubrun_machine_seconds",
            help: "Machine up-time of a pool, summed over its machines (what it is billed for).",
            kind: Kind::Counter,
            samples: machine_ms
                .iter()
                .map(|(p, ms)| (labels([("pool", p)]), *ms as f64 / 1000.0))
                .collect(),
        },
    ]
}
