//! Pools and machines: state, cordon / drain, cost.

use axum::extract::Path;
use axum::http::StatusCode;
use maud::html;

use super::layout::{self, ago_ms, badge, duration_ms, enc, Nav};
use super::{see_other, Ctx, UiError, UiResult};

/// The cost window shown.
const COST_WINDOW_MS: i64 = 24 * 3600 * 1000;

fn service(ctx: &Ctx) -> Result<&pubrun_pools::Pools, UiError> {
    super::enabled(&ctx.d.inner.pools, "pools")
}

fn money(v: &serde_json::Value) -> String {
    v.as_f64()
        .map(|c| format!("{c:.2}"))
        .unwrap_or_else(|| "—".into())
}

pub(crate) async fn page(ctx: Ctx) -> UiResult {
    let p = service(&ctx)?.clone();
    let now = ctx.now_ms();
    let specs = p.specs();
    let machines = p
        .machines()
        .await
        .map_err(|e| UiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let runs = p.runs_by_machine();
    let agents = p
        .agents()
        .await
        .map_err(|e| UiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let cost = p
        .cost_report(now - COST_WINDOW_MS, now)
        .await
        .map_err(|e| UiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let pool_cost = |name: &str| {
        cost["pools"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["pool"] == name))
            .cloned()
            .unwrap_or_default()
    };
    let machine_cost = |name: &str| {
        cost["machines"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["machine"] == name))
            .map(|c| money(&c["cost"]))
            .unwrap_or_else(|| "—".into())
    };
    let body = html! {
        h1 { "Pools" }
        (layout::listing(specs.is_empty(), html! { "No pools declared: every run executes on this server. Declare " code { "[[pool]]" } " tables to run elsewhere." }, html! {
            table #pools {
                thead { tr { th { "Pool" } th { "Provider" } th.num { "Up" } th.num { "Min–max" } th.num { "Runs waiting" } th.num { "Price / h" } th.num { "Machine time, 24 h" } th.num { "Cost, 24 h" } } }
                tbody {
                    @for s in &specs {
                        @let c = pool_cost(&s.name);
                        tr {
                            td { (s.name) }
                            td { (s.provider.kind()) }
                            td.num { (machines.iter().filter(|m| m.pool == s.name && m.state.is_up()).count()) }
                            td.num { (s.min_machines) "–" @if s.max_machines == 0 { "∞" } @else { (s.max_machines) } }
                            td.num { (p.waiting(&s.name)) }
                            td.num { @match s.price_per_hour { Some(v) => (format!("{v:.2}")), None => "—" } }
                            td.num { @match c["machine_seconds"].as_f64() { Some(v) => (duration_ms((v * 1000.0) as i64)), None => "—" } }
                            td.num { (money(&c["cost"])) }
                        }
                    }
                }
            }
            p.muted { "Total cost, last 24 h: " (money(&cost["total_cost"])) }
        }))
        h2 { "Machines" }
        (layout::listing(machines.is_empty(), html! { "No machines." }, html! {
            table #machines {
                thead { tr { th { "Machine" } th { "Pool" } th { "State" } th { "Since" } th.num { "Runs" } th.num { "Cost, 24 h" } th { "Last error" } th { "" } } }
                tbody {
                    @for m in &machines {
                        @let base = format!("/ui/machines/{}", enc(&m.name));
                        tr {
                            td { (m.name) br; span.muted { (m.provider) " " (m.provider_id) } }
                            td { (m.pool) }
                            td { (badge(m.state.as_str())) @if m.cordoned { " " (badge("cordoned")) } }
                            td { (ago_ms(m.state_since_ms, now)) }
                            td.num { (runs.get(&m.name).copied().unwrap_or(0)) "/" (m.slots) }
                            td.num { (machine_cost(&m.name)) }
                            td.error { (m.last_error) }
                            td {
                                @if m.state.is_up() {
                                    @if m.cordoned { (layout::button(&ctx, &format!("{base}/uncordon"), "Uncordon", "")) }
                                    @else {
                                        (layout::button(&ctx, &format!("{base}/cordon"), "Cordon", "")) " "
                                        (layout::button(&ctx, &format!("{base}/drain"), "Drain", "danger"))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }))
        h2 { "Connected agents" }
        (layout::listing(agents.is_empty(), html! { "None." }, html! {
            table #agents {
                thead { tr { th { "Agent" } th { "Pool" } th.num { "Runs / slots" } th { "Last seen" } th { "Version" } } }
                tbody { @for a in &agents { tr {
                    td { (a["name"].as_str().unwrap_or("")) }
                    td { (a["pool"].as_str().unwrap_or("")) }
                    td.num { (a["runs"]) "/" (a["slots"]) }
                    td { @if let Some(t) = a["last_seen_ms"].as_i64() { (ago_ms(t, now)) } }
                    td { (a["version"].as_str().unwrap_or("")) }
                } } }
            }
        }))
    };
    Ok(layout::page(&ctx, "Pools", Nav::Pools, body))
}

pub(crate) async fn machine_action(
    ctx: Ctx,
    Path((name, action)): Path<(String, String)>,
) -> UiResult {
    let p = service(&ctx)?;
    let r = match action.as_str() {
        "cordon" => p.cordon(&name, true).await,
        "uncordon" => p.cordon(&name, false).await,
        "drain" => p.drain(&name).await,
        other => {
            return Err(UiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown machine action {other:?}: cordon, uncordon or drain"),
            ))
        }
    };
    r.map_err(|e| {
        let code = if e.starts_with("no machine") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        };
        UiError::new(code, e)
    })?;
    Ok(see_other("/ui/pools"))
}
