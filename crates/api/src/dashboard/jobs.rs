//! Jobs (as applied, trigger now) and schedules (pause, resume, run now).

use std::collections::BTreeMap;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Form;
use maud::html;
use pubrun_core::job::ExecutorSpec;
use pubrun_core::manifest::job_subscription;
use pubrun_core::{SubscriptionName, TopicName};
use serde::Deserialize;

use super::layout::{self, ago_ms, enc, status_badge, Nav};
use super::{see_other, Ctx, UiError, UiResult};

pub(crate) async fn list(ctx: Ctx) -> UiResult {
    let d = ctx.dispatcher()?;
    let jobs = d.jobs();
    let body = html! {
        h1 { "Jobs" }
        (layout::listing(jobs.is_empty(), html! { "No jobs. Declare them in " code { "pubrun.toml" } " and run " code { "pubrun apply" } "." }, html! {
            table #jobs {
                thead { tr { th { "Job" } th { "Topic" } th { "Executor" } th { "Pool" } th.num { "Concurrency" } th { "Timeout" } } }
                tbody {
                    @for j in &jobs {
                        tr {
                            td { a href={"/ui/jobs/" (enc(&j.name))} { (j.name) } }
                            td { (j.topic) }
                            td { @match &j.executor {
                                ExecutorSpec::Process(p) => { "process " code { (p.command) } }
                                ExecutorSpec::Docker(dk) => { "docker " code { (dk.image) } }
                            } }
                            td { (j.pool) }
                            td.num { (j.concurrency) }
                            td { (humantime::format_duration(j.timeout)) }
                        }
                    }
                }
            }
        }))
    };
    Ok(layout::page(&ctx, "Jobs", Nav::Jobs, body))
}

pub(crate) async fn show(ctx: Ctx, Path(name): Path<String>) -> UiResult {
    let d = ctx.dispatcher()?.clone();
    let spec = d.job(&name)?;
    let backlog = TopicName::parse(&spec.topic)
        .ok()
        .map(|t| job_subscription(t.project().id(), &name))
        .and_then(|s| SubscriptionName::parse(&s).ok())
        .and_then(|s| ctx.broker().backlog(&s).ok());
    let store = d.store().clone();
    let job = name.clone();
    let runs = store.list(Some(&job), None, 20).await?;
    // The spec names secrets by environment variable only, never values.
    let definition = serde_json::to_string_pretty(&spec).unwrap_or_default();
    let now = ctx.now_ms();
    let body = html! {
        h1 { "Job " (spec.name) }
        div.grid {
            div.card {
                dl.kv {
                    dt { "Topic" } dd { (spec.topic) }
                    dt { "Messages waiting" } dd { @match backlog { Some(n) => (n), None => "—" } }
                    dt { "Pool" } dd { (spec.pool) }
                    dt { "Runs" } dd { a href={"/ui/runs?job=" (enc(&spec.name))} { "all runs of this job" } }
                }
            }
            div.card {
                h2 style="margin-top:0" { "Trigger now" }
                form #trigger method="post" action={"/ui/jobs/" (enc(&spec.name)) "/trigger"} {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    label { "Message data (text)" textarea name="data" rows="3" {} }
                    label { "Attributes (one key=value a line)" textarea name="attributes" rows="3" {} }
                    p { button.primary type="submit" { "Trigger" } }
                }
            }
        }
        h2 { "Recent runs" }
        (layout::listing(runs.is_empty(), html! { "None yet." }, html! {
            table #job-runs {
                thead { tr { th { "Run" } th { "Status" } th.num { "Attempt" } th { "Created" } } }
                tbody { @for r in &runs { tr {
                    td { a href={"/ui/runs/" (r.id)} { (r.id) } }
                    td { (status_badge(r.status)) }
                    td.num { (r.attempt) "/" (r.max_attempts) }
                    td { (ago_ms(r.created_at_ms, now)) }
                } } }
            }
        }))
        h2 { "Definition as applied" }
        pre.light #definition { (definition) }
    };
    Ok(layout::page(&ctx, &format!("Job {name}"), Nav::Jobs, body))
}

#[derive(Deserialize)]
pub(crate) struct TriggerForm {
    #[serde(default)]
    data: String,
    #[serde(default)]
    attributes: String,
}

fn parse_attributes(text: &str) -> Result<BTreeMap<String, String>, UiError> {
    let mut m = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once('=').ok_or_else(|| {
            UiError::new(
                StatusCode::BAD_REQUEST,
                format!("attribute line {line:?} is not key=value"),
            )
        })?;
        m.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(m)
}

pub(crate) async fn trigger(
    ctx: Ctx,
    Path(name): Path<String>,
    Form(f): Form<TriggerForm>,
) -> UiResult {
    let d = ctx.dispatcher()?.clone();
    let attributes = parse_attributes(&f.attributes)?;
    let id = d.trigger(&name, f.data.into_bytes(), attributes).await?;
    Ok(see_other(&format!("/ui/runs/{id}")))
}

fn triggers(ctx: &Ctx) -> Result<&std::sync::Arc<pubrun_triggers::Triggers>, UiError> {
    super::enabled(&ctx.d.inner.triggers, "schedules")
}

pub(crate) async fn schedules(ctx: Ctx) -> UiResult {
    let list = triggers(&ctx)?.list_schedules().await?;
    let body = html! {
        h1 { "Schedules" }
        (layout::listing(list.is_empty(), html! { "No schedules. Declare " code { "[[schedule]]" } " tables in " code { "pubrun.toml" } "." }, html! {
            table #schedules {
                thead { tr { th { "Schedule" } th { "Cron" } th { "Topic" } th { "State" } th { "Next fire" } th { "Last fire" } th { "" } } }
                tbody {
                    @for s in &list {
                        @let base = format!("/ui/schedules/{}", enc(&s.name));
                        tr {
                            td { (s.name) }
                            td { code { (s.cron) } " " span.muted { (s.time_zone) } }
                            td { (s.topic) }
                            td { @if s.paused { (layout::badge("paused")) } @else { (layout::badge("active")) }
                                 @if let Some(e) = &s.last_error { br; span.error { (e) } } }
                            td { @match &s.next_fire_time { Some(t) => (t), None => span.muted { "—" } } }
                            td { @match &s.last_fire_time { Some(t) => (t), None => span.muted { "never" } } }
                            td {
                                @if s.paused { (layout::button(&ctx, &format!("{base}/resume"), "Resume", "")) }
                                @else { (layout::button(&ctx, &format!("{base}/pause"), "Pause", "")) }
                                " "
                                (layout::button(&ctx, &format!("{base}/run-now"), "Run now", ""))
                            }
                        }
                    }
                }
            }
        }))
    };
    Ok(layout::page(&ctx, "Schedules", Nav::Schedules, body))
}

pub(crate) async fn schedule_action(
    ctx: Ctx,
    Path((name, action)): Path<(String, String)>,
) -> UiResult {
    let t = triggers(&ctx)?;
    match action.as_str() {
        "pause" => {
            t.pause(&name).await?;
        }
        "resume" => {
            t.resume(&name).await?;
        }
        "run-now" => {
            t.run_now(&name).await?;
        }
        other => {
            return Err(UiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown schedule action {other:?}: pause, resume or run-now"),
            ))
        }
    }
    Ok(see_other("/ui/schedules"))
}

#[cfg(test)]
mod tests {
    use super::parse_attributes;

    #[test]
    fn attributes_are_key_value_lines() {
        let m = parse_attributes("a=1\n\n b = two=2 \n").unwrap();
        assert_eq!(m["a"], "1");
        assert_eq!(m["b"], "two=2");
        assert!(parse_attributes("novalue").is_err());
    }
}
