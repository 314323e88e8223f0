//! Cost report: machine-seconds per machine, per pool and per run.
//!
//! A machine's up-time comes from `machine_spans`; a run's time on it from
//! its leases. The split (each instant shared equally among the runs on the
//! machine then; instants without a run are the pool's idle time) is the
//! pure `pubrun_core::cost::share_machine_time`.

use std::collections::BTreeMap;

use pubrun_core::cost::{cost, share_machine_time, Span};
use serde_json::{json, Value};

use crate::remote::Pools;

impl Pools {
    pub async fn cost_report(&self, since_ms: i64, now_ms: i64) -> Result<Value, String> {
        let prices: BTreeMap<String, Option<f64>> = self
            .specs()
            .into_iter()
            .map(|s| (s.name, s.price_per_hour))
            .collect();
        let clip = |start: i64, end: Option<i64>| -> Option<Span> {
            let s = start.max(since_ms);
            let e = end.unwrap_or(now_ms).min(now_ms);
            (e > s).then_some(Span {
                start_ms: s,
                end_ms: e,
            })
        };
        // machine → (pool, up spans)
        let mut up: BTreeMap<String, (String, Vec<Span>)> = BTreeMap::new();
        let spans = self
            .store()
            .spans(since_ms)
            .await
            .map_err(|e| e.to_string())?;
        for span in spans {
            if let Some(s) = clip(span.start_ms, span.end_ms) {
                up.entry(span.machine)
                    .or_insert_with(|| (span.pool, Vec::new()))
                    .1
                    .push(s);
            }
        }
        // machine → [(run_id, job, span)]
        let mut runs: BTreeMap<String, Vec<(String, String, Span)>> = BTreeMap::new();
        let leases = self
            .store()
            .leases_since(since_ms)
            .await
            .map_err(|e| e.to_string())?;
        for l in leases {
            let start = l.started_ms.unwrap_or(l.assigned_ms);
            let end = if l.state.is_active() {
                None
            } else {
                l.ended_ms
            };
            if let Some(s) = clip(start, end) {
                runs.entry(l.machine.clone())
                    .or_default()
                    .push((l.run_id, l.job, s));
            }
        }
        let mut per_pool: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
        let mut per_run: BTreeMap<String, (String, String, f64, Vec<String>)> = BTreeMap::new();
        let mut machines = Vec::new();
        for (machine, (pool, spans)) in &up {
            let mine = runs.get(machine).cloned().unwrap_or_default();
            let run_spans: Vec<Span> = mine.iter().map(|(_, _, s)| *s).collect();
            let (shares, idle) = share_machine_time(spans, &run_spans);
            let total: f64 = spans
                .iter()
                .map(|s| (s.end_ms - s.start_ms) as f64 / 1000.0)
                .sum();
            let price = prices.get(pool).copied().flatten();
            machines.push(json!({
                "machine": machine,
                "pool": pool,
                "seconds": total,
                "idle_seconds": idle,
                "cost": cost(total, price),
            }));
            let p = per_pool.entry(pool.clone()).or_default();
            p.0 += total;
            p.1 += total - idle;
            p.2 += idle;
            for ((run_id, job, _), secs) in mine.iter().zip(shares) {
                let r = per_run
                    .entry(run_id.clone())
                    .or_insert_with(|| (job.clone(), pool.clone(), 0.0, Vec::new()));
                r.2 += secs;
                if !r.3.contains(machine) {
                    r.3.push(machine.clone());
                }
            }
        }
        let mut total_cost = 0.0;
        let pools: Vec<Value> = per_pool
            .iter()
            .map(|(pool, (secs, busy, idle))| {
                let price = prices.get(pool).copied().flatten();
                let c = cost(*secs, price);
                total_cost += c.unwrap_or(0.0);
                json!({
                    "pool": pool,
                    "machine_seconds": secs,
                    "run_seconds": busy,
                    "idle_seconds": idle,
                    "price_per_hour": price,
                    "cost": c,
                })
            })
            .collect();
        let runs: Vec<Value> = per_run
            .into_iter()
            .map(|(run_id, (job, pool, secs, machines))| {
                let price = prices.get(&pool).copied().flatten();
                json!({
                    "run_id": run_id,
                    "job": job,
                    "pool": pool,
                    "machines": machines,
                    "machine_seconds": secs,
                    "cost": cost(secs, price),
                })
            })
            .collect();
        Ok(json!({
            "since_ms": since_ms,
            "until_ms": now_ms,
            "pools": pools,
            "machines": machines,
            "runs": runs,
            "total_cost": total_cost,
        }))
    }
}
