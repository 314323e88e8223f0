//! `GET /`: what is waiting, what runs, what failed, which machines are up.

use maud::html;
use pubrun_core::run::RunStatus;
use pubrun_jobs::RunRecord;

use super::layout::{self, ago_ms, duration_ms, enc, status_badge, Nav};
use super::rates;
use super::runs::cause;
use super::{Ctx, UiResult};

/// Finished runs a job's success rate is computed over.
const RATE_WINDOW: usize = 20;
/// Recent runs shown per job.
const LAST_RUNS: usize = 8;

struct JobRow {
    name: String,
    pool: String,
    last: Vec<RunRecord>,
    /// (succeeded, finished) among the last `RATE_WINDOW` finished runs.
    rate: (usize, usize),
}

pub(crate) async fn page(ctx: Ctx) -> UiResult {
    let now = ctx.now_ms();
    let (topics, subs) = ctx.broker().overview();
    let rates = ctx.d.inner.rates.current(
        &topics.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        &subs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
    );
    let (jobs, failures, active) = match ctx.d.inner.dispatcher.clone() {
        Some(d) => {
            let specs = d.jobs();
            let store = d.store().clone();
            async move {
                let mut rows = Vec::new();
                for s in specs {
                    let recent = store
                        .list(Some(&s.name), None, RATE_WINDOW + LAST_RUNS)
                        .await?;
                    let finished: Vec<_> = recent
                        .iter()
                        .filter(|r| r.status.is_terminal())
                        .take(RATE_WINDOW)
                        .collect();
                    let ok = finished
                        .iter()
                        .filter(|r| r.status == RunStatus::Succeeded)
                        .count();
                    rows.push(JobRow {
                        rate: (ok, finished.len()),
                        last: recent.into_iter().take(LAST_RUNS).collect(),
                        name: s.name,
                        pool: s.pool,
                    });
                }
                let mut failures = store.list(None, Some(RunStatus::Failed), 10).await?;
                failures.extend(store.list(None, Some(RunStatus::TimedOut), 10).await?);
                failures.sort_by_key(|r| std::cmp::Reverse(r.id));
                failures.truncate(10);
                let counts = store.count_by_status().await?;
                let n = |want: &[RunStatus]| {
                    counts
                        .iter()
                        .filter(|(s, _)| want.contains(s))
                        .map(|(_, n)| n)
                        .sum::<u64>()
                };
                let active = (
                    n(&[RunStatus::Starting, RunStatus::Running]),
                    n(&[RunStatus::Queued]),
                );
                Ok::<_, pubrun_core::Error>((rows, failures, active))
            }
            .await?
        }
        None => (Vec::new(), Vec::new(), (0, 0)),
    };
    let pools = match ctx.d.inner.pools.clone() {
        Some(p) => Some((
            p.machines().await.map_err(|e| {
                super::UiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e)
            })?,
            p,
        )),
        None => None,
    };
    let pools = pools.map(|(machines, p)| {
        p.specs()
            .into_iter()
            .map(|s| {
                let up: Vec<_> = machines
                    .iter()
                    .filter(|m| m.pool == s.name && m.state.is_up())
                    .collect();
                let busy = up
                    .iter()
                    .filter(|m| m.state == pubrun_core::pool::MachineState::Busy)
                    .count();
                (
                    s.name.clone(),
                    s.provider.kind(),
                    up.len(),
                    busy,
                    p.waiting(&s.name),
                    s.max_machines,
                )
            })
            .collect::<Vec<_>>()
    });

    let body = html! {
        h1 { "Overview" }
        div.stats {
            div.stat { b { (topics.len()) } span { "Topics" } }
            div.stat { b { (subs.len()) } span { "Subscriptions" } }
            div.stat { b #total-backlog { (subs.iter().map(|s| s.backlog).sum::<usize>()) } span { "Messages waiting" } }
            div.stat { b { (jobs.len()) } span { "Jobs" } }
            div.stat { b #runs-running { (active.0) } span { "Runs running" } }
            div.stat { b #runs-queued { (active.1) } span { "Runs queued" } }
        }
        h2 { "Topics" }
        (layout::listing(topics.is_empty(), html! { "No topics yet." }, html! {
            table #topics {
                thead { tr { th { "Topic" } th.num { "Subscriptions" } th.num { "Publish rate" } } }
                tbody {
                    @for t in &topics {
                        tr {
                            td { (t.name) }
                            td.num { (t.subscriptions) }
                            td.num { (rates::show(rates.published(&t.name))) }
                        }
                    }
                }
            }
        }))
        h2 { "Subscriptions" }
        (layout::listing(subs.is_empty(), html! { "No subscriptions yet." }, html! {
            table #subscriptions {
                thead { tr { th { "Subscription" } th { "Topic" } th.num { "Backlog" } th { "Oldest unacked" } th.num { "Ack rate" } th { "Delivery" } } }
                tbody {
                    @for s in &subs {
                        tr {
                            td { (s.name) }
                            td.muted { (s.topic) }
                            td.num { (s.backlog) }
                            td { @match s.oldest_unacked_nanos {
                                Some(n) => { (ago_ms(n / 1_000_000, now)) }
                                None => { span.muted { "—" } }
                            } }
                            td.num { (rates::show(rates.acked(&s.name))) }
                            td { @if s.push { "push" } @else { "pull" } }
                        }
                    }
                }
            }
            p.muted { "Rates are messages per second over the last minute, from the counters "
                code { "/metrics" } " exports." }
        }))
        h2 { "Jobs" }
        (layout::listing(jobs.is_empty(), html! { "No jobs. Declare them in " code { "pubrun.toml" } " and run " code { "pubrun apply" } "." }, html! {
            table #jobs {
                thead { tr { th { "Job" } th { "Pool" } th { "Last runs (newest first)" } th.num { "Success rate" } } }
                tbody {
                    @for j in &jobs {
                        tr {
                            td { a href={"/ui/jobs/" (enc(&j.name))} { (j.name) } }
                            td { (j.pool) }
                            td {
                                @for r in &j.last {
                                    a href={"/ui/runs/" (r.id)} title={"run " (r.id)} { (status_badge(r.status)) } " "
                                }
                                @if j.last.is_empty() { span.muted { "none yet" } }
                            }
                            td.num {
                                @if j.rate.1 == 0 { span.muted { "—" } }
                                @else { (format!("{:.0} %", 100.0 * j.rate.0 as f64 / j.rate.1 as f64)) " " span.muted { "of " (j.rate.1) } }
                            }
                        }
                    }
                }
            }
        }))
        @if let Some(pools) = pools.as_ref().filter(|p| !p.is_empty()) {
            h2 { "Machines" }
            table #pools {
                thead { tr { th { "Pool" } th { "Provider" } th.num { "Machines up" } th.num { "Busy" } th.num { "Max" } th.num { "Runs waiting" } } }
                tbody {
                    @for (name, kind, up, busy, waiting, max) in pools {
                        tr {
                            td { a href="/ui/pools" { (name) } }
                            td { (kind) }
                            td.num { (up) }
                            td.num { (busy) }
                            td.num { @if *max == 0 { "—" } @else { (max) } }
                            td.num { (waiting) }
                        }
                    }
                }
            }
        }
        h2 { "Recent failures" }
        (layout::listing(failures.is_empty(), html! { "None." }, html! {
            table #failures {
                thead { tr { th { "Run" } th { "Job" } th { "Status" } th { "Ended" } th { "Duration" } th { "Cause" } } }
                tbody {
                    @for r in &failures {
                        tr {
                            td { a href={"/ui/runs/" (r.id)} { (r.id) } }
                            td { (r.job) }
                            td { (status_badge(r.status)) }
                            td { @if let Some(e) = r.ended_at_ms { (ago_ms(e, now)) } }
                            td { @if let (Some(s), Some(e)) = (r.started_at_ms, r.ended_at_ms) { (duration_ms(e - s)) } }
                            td { @if let Some(x) = &r.exit { (cause(x)) } }
                        }
                    }
                }
            }
        }))
    };
    Ok(layout::page(&ctx, "Overview", Nav::Overview, body))
}
