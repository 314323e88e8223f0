//! Runs: the filtered list, one run's page with its live log (SSE), and
//! the cancel / run-again actions.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use maud::{html, Markup};
use pubrun_core::job::{parse_gs_url, JobSpec, TRIGGER_INPUT};
use pubrun_core::run::{Exit, RunStatus};
use pubrun_jobs::{Dispatcher, RunRecord};
use pubrun_store::runs::RunPage;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::layout::{self, ago_ms, duration_ms, enc, status_badge, time_ms, Nav};
use super::{blocking, see_other, Ctx, Dashboard, UiError, UiResult};

const PAGE: usize = 50;
/// The most of a finished run's log shown inline (its tail).
const INLINE_LOG: u64 = 1 << 20;
/// Bytes one log event carries at most.
const LOG_EVENT: usize = 64 * 1024;
/// How often a live log checks for more bytes while the run is quiet.
const LOG_POLL: Duration = Duration::from_millis(250);
/// The most of a message's data shown.
const DATA_SHOWN: usize = 64 * 1024;

/// What ended an attempt, in words.
pub(crate) fn cause(x: &Exit) -> String {
    let mut parts = Vec::new();
    if x.cancelled() {
        parts.push("cancelled".to_string());
    }
    if x.timed_out() {
        parts.push("timed out".to_string());
    }
    if x.oom_killed {
        parts.push("out of memory".to_string());
    }
    if let Some(c) = x.exit_code {
        parts.push(format!("exit code {c}"));
    }
    if let Some(s) = x.signal {
        parts.push(format!("signal {s}"));
    }
    if x.killed_after_grace {
        parts.push("killed after the grace period".to_string());
    }
    if x.cause.keeps_attempt() {
        parts.push("infrastructure error".to_string());
    }
    if let Some(e) = &x.error {
        parts.push(e.clone());
    }
    parts.join(", ")
}

fn parse_id(id: &str) -> Result<i64, UiError> {
    id.parse().map_err(|_| {
        UiError::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a run id (run ids are numbers)"),
        )
    })
}

#[derive(Deserialize, Default)]
pub(crate) struct RunsQuery {
    #[serde(default)]
    job: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    before: Option<i64>,
}

pub(crate) async fn list(ctx: Ctx, q: Result<Query<RunsQuery>, QueryRejection>) -> UiResult {
    let q = super::query(q)?;
    let status = match q.status.as_str() {
        "" => None,
        s => Some(RunStatus::parse(s)?),
    };
    let d = ctx.dispatcher()?.clone();
    let jobs: Vec<String> = d.jobs().into_iter().map(|j| j.name).collect();
    let store = d.store().clone();
    let mut runs = store
        .list_before(RunPage {
            job: (!q.job.is_empty()).then(|| q.job.clone()),
            status,
            before: q.before,
            limit: PAGE + 1,
        })
        .await?;
    let more = runs.len() > PAGE;
    runs.truncate(PAGE);
    let now = ctx.now_ms();
    let filter_qs = |before: Option<i64>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        if !q.job.is_empty() {
            s.append_pair("job", &q.job);
        }
        if !q.status.is_empty() {
            s.append_pair("status", &q.status);
        }
        if let Some(b) = before {
            s.append_pair("before", &b.to_string());
        }
        s.finish()
    };
    const STATUSES: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::Starting,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Cancelled,
    ];
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/ui/runs" {
            label { "Job"
                select name="job" {
                    option value="" { "all jobs" }
                    @for j in &jobs { option value=(j) selected[*j == q.job] { (j) } }
                }
            }
            label { "Status"
                select name="status" {
                    option value="" { "any status" }
                    @for s in STATUSES { option value=(s.as_str()) selected[s.as_str() == q.status] { (s.as_str()) } }
                }
            }
            button type="submit" { "Filter" }
        }
        @if runs.is_empty() {
            p.muted { "No runs." }
        } @else {
            table #runs {
                thead { tr { th { "Run" } th { "Job" } th { "Status" } th.num { "Attempt" } th { "Created" } th { "Duration" } th { "Machine" } th { "Cause" } } }
                tbody {
                    @for r in &runs {
                        tr {
                            td { a href={"/ui/runs/" (r.id)} { (r.id) } }
                            td { a href={"/ui/runs?job=" (enc(&r.job))} { (r.job) } }
                            td { (status_badge(r.status)) }
                            td.num { (r.attempt) "/" (r.max_attempts) }
                            td title=(time_ms(r.created_at_ms)) { (ago_ms(r.created_at_ms, now)) }
                            td { (run_duration(r, now)) }
                            td { (r.machine) }
                            td { @if let Some(x) = &r.exit { (cause(x)) } }
                        }
                    }
                }
            }
        }
        div.pager {
            @if q.before.is_some() { a href={"/ui/runs?" (filter_qs(None))} { "« Newest" } }
            @if more { @if let Some(last) = runs.last() {
                a #next-page href={"/ui/runs?" (filter_qs(Some(last.id)))} { "Older »" }
            } }
        }
    };
    Ok(layout::page(&ctx, "Runs", Nav::Runs, body))
}

fn run_duration(r: &RunRecord, now: i64) -> String {
    match (r.started_at_ms, r.ended_at_ms) {
        (Some(s), Some(e)) => duration_ms(e - s),
        (Some(s), None) if !r.status.is_terminal() => format!("{} so far", duration_ms(now - s)),
        _ => String::new(),
    }
}

/// The history the run record can tell: when it was queued, started and
/// ended (the run store keeps one row per run, not per attempt).
fn history(r: &RunRecord, now: i64) -> Markup {
    html! {
        table #history {
            thead { tr { th { "When (UTC)" } th { "State" } th { "Detail" } } }
            tbody {
                tr { td { (time_ms(r.created_at_ms)) } td { (status_badge(RunStatus::Queued)) } td { "message " (r.message.id) } }
                @if r.status == RunStatus::Queued && r.not_before_ms > now {
                    tr { td { (time_ms(r.not_before_ms)) } td { (status_badge(RunStatus::Queued)) } td { "attempt " (r.attempt) " waits until then (retry backoff)" } }
                }
                @if let Some(s) = r.started_at_ms {
                    tr { td { (time_ms(s)) } td { (status_badge(RunStatus::Running)) }
                         td { "attempt " (r.attempt) @if !r.machine.is_empty() { " on " (r.machine) } } }
                }
                @if r.cancel_requested && !r.status.is_terminal() {
                    tr { td {} td { (status_badge(r.status)) } td { "cancel requested" } }
                }
                @if let Some(e) = r.ended_at_ms {
                    tr { td { (time_ms(e)) } td { (status_badge(r.status)) } td { @if let Some(x) = &r.exit { (cause(x)) } } }
                }
            }
        }
    }
}

fn message_data(data: &[u8]) -> Markup {
    let shown = &data[..data.len().min(DATA_SHOWN)];
    html! {
        @if data.is_empty() { span.muted { "(empty)" } }
        @else {
            @match std::str::from_utf8(shown) {
                Ok(t) => pre.light #message-data { (t) },
                Err(_) => span.muted { (layout::bytes(data.len() as u64)) " of binary data" },
            }
            @if shown.len() < data.len() { p.muted { "(first " (layout::bytes(DATA_SHOWN as u64)) " shown)" } }
        }
    }
}

/// A link to browse a `gs://bucket/prefix` (up to its first template).
fn gs_link(url: &str) -> Markup {
    let literal = url.split("{{").next().unwrap_or(url);
    match parse_gs_url(literal).ok() {
        Some((bucket, prefix)) => html! {
            a href={"/ui/buckets/" (enc(&bucket)) "?prefix=" (enc(&prefix))} { (url) }
        },
        None => html! { (url) },
    }
}

fn io_section(r: &RunRecord, spec: &JobSpec) -> Markup {
    html! {
        @if !spec.inputs.is_empty() || !spec.outputs.is_empty() {
            h2 { "Inputs and outputs" }
            table #io {
                thead { tr { th { "Kind" } th { "From" } th { "To" } } }
                tbody {
                    @for i in &spec.inputs {
                        tr { td { "input" }
                            td {
                                @if i.from == TRIGGER_INPUT {
                                    @match (r.message.attributes.get("bucketId"), r.message.attributes.get("objectId")) {
                                        (Some(b), Some(o)) => a href={"/ui/buckets/" (enc(b)) "/download?name=" (enc(o))} { "gs://" (b) "/" (o) },
                                        _ => "trigger (no object named by the message)",
                                    }
                                } @else { (gs_link(&i.from)) }
                            }
                            td { (i.to) } }
                    }
                    @for o in &spec.outputs {
                        tr { td { "output" } td { (o.from) } td { (gs_link(&o.to)) } }
                    }
                }
            }
        }
    }
}

pub(crate) async fn show(ctx: Ctx, Path(id): Path<String>) -> UiResult {
    let id = parse_id(&id)?;
    let d = ctx.dispatcher()?.clone();
    let store = d.store().clone();
    let r = store.get(id).await?;
    let spec = d.job(&r.job).ok();
    let now = ctx.now_ms();
    let live = !r.status.is_terminal();
    let log = if live {
        String::new()
    } else {
        read_tail(&d.log_path(id), INLINE_LOG).await
    };
    let body = html! {
        h1 { "Run " (r.id) " · " a href={"/ui/jobs/" (enc(&r.job))} { (r.job) } " "
            span #status class={"badge s-" (r.status.as_str())} { (r.status.as_str()) } }
        div.actions {
            @if live { (layout::button(&ctx, &format!("/ui/runs/{id}/cancel"), "Cancel", "danger")) }
            @if spec.is_some() { (layout::button(&ctx, &format!("/ui/runs/{id}/rerun"), "Run again", "")) }
        }
        div.grid {
            div.card {
                dl.kv #details {
                    dt { "Status" } dd { (status_badge(r.status)) @if r.cancel_requested && live { " (cancel requested)" } }
                    dt { "Attempt" } dd { (r.attempt) " of " (r.max_attempts) }
                    dt { "Machine" } dd { @if r.machine.is_empty() { span.muted { "—" } } @else { (r.machine) } }
                    @if !r.handle.is_empty() { dt { "Handle" } dd { code { (r.handle) } } }
                    dt { "Created" } dd { (time_ms(r.created_at_ms)) " UTC" }
                    @if let Some(s) = r.started_at_ms { dt { "Started" } dd { (time_ms(s)) " UTC" } }
                    @if let Some(e) = r.ended_at_ms { dt { "Ended" } dd { (time_ms(e)) " UTC" } }
                    dt { "Duration" } dd { (run_duration(&r, now)) }
                    dt { "Dedup key" } dd { code { (r.dedup_key) } }
                }
            }
            div.card {
                dl.kv #exit {
                    @match &r.exit {
                        Some(x) => {
                            dt { "Exit code" } dd { @match x.exit_code { Some(c) => (c), None => span.muted { "—" } } }
                            dt { "Cause" } dd { (cause(x)) }
                        }
                        None => { dt { "Exit" } dd.muted { "not ended yet" } }
                    }
                    @if let Some(s) = &spec {
                        dt { "Result topic" } dd {
                            @if s.result_topic.is_empty() { span.muted { "none" } }
                            @else { (s.result_topic) " — " @if r.result_published { "published" } @else if r.status.is_terminal() { "pending" } @else { "after the run" } }
                        }
                    }
                }
            }
        }
        h2 { "State history" }
        (history(&r, now))
        h2 { "Message (parameters)" }
        div.card {
            dl.kv #message {
                dt { "Message id" } dd { code { (r.message.id) } }
                dt { "Published" } dd { (r.message.publish_time) }
                @if !r.message.ordering_key.is_empty() { dt { "Ordering key" } dd { (r.message.ordering_key) } }
                dt { "Attributes" } dd {
                    @if r.message.attributes.is_empty() { span.muted { "none" } }
                    @else {
                        table #attributes { tbody { @for (k, v) in &r.message.attributes { tr { td { code { (k) } } td { (v) } } } } }
                    }
                }
                dt { "Data" } dd { (message_data(&r.message.data)) }
            }
        }
        @if let Some(s) = &spec { (io_section(&r, s)) }
        h2 { "Log" }
        @if live {
            pre #log data-live="1" data-src={"/ui/runs/" (id) "/log/events"} {}
        } @else {
            pre #log data-live="0" { (log) }
        }
    };
    Ok(layout::page(&ctx, &format!("Run {id}"), Nav::Runs, body))
}

/// The last `max` bytes of a log, as text.
async fn read_tail(path: &std::path::Path, max: u64) -> String {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let from = size.saturating_sub(max);
    if f.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if from > 0 {
        format!("[… first {} not shown]\n{text}", layout::bytes(from))
    } else {
        text
    }
}

struct Follow {
    d: std::sync::Arc<Dispatcher>,
    id: i64,
    /// File offset of the next byte to read.
    offset: u64,
    /// Read bytes not sent yet: the start of a UTF-8 character cut by a read.
    pending: Vec<u8>,
    status: Option<RunStatus>,
    /// Saw a terminal status: one more read, then end.
    ending: bool,
    done: bool,
}

impl Follow {
    async fn read_more(&mut self) -> std::io::Result<Vec<u8>> {
        let mut f = match tokio::fs::File::open(self.d.log_path(self.id)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        f.seek(std::io::SeekFrom::Start(self.offset)).await?;
        let mut buf = Vec::new();
        f.take(LOG_EVENT as u64).read_to_end(&mut buf).await?;
        self.offset += buf.len() as u64;
        Ok(buf)
    }

    /// The next event, or `None` at the end.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            let bytes = self.read_more().await.unwrap_or_default();
            if !bytes.is_empty() {
                self.pending.extend_from_slice(&bytes);
                let cut = match std::str::from_utf8(&self.pending) {
                    Ok(_) => self.pending.len(),
                    // An incomplete character at the end waits for its rest;
                    // anything else invalid is sent replaced.
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => self.pending.len(),
                };
                let text = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
                self.pending.drain(..cut);
                if text.is_empty() {
                    continue;
                }
                let sent_to = self.offset - self.pending.len() as u64;
                return Some(
                    Event::default()
                        .event("log")
                        .id(sent_to.to_string())
                        .data(serde_json::to_string(&text).unwrap_or_default()),
                );
            }
            if self.ending {
                self.done = true;
                return Some(Event::default().event("end").data("{}"));
            }
            let store = self.d.store().clone();
            let id = self.id;
            let status = store.get(id).await.ok().map(|r| r.status);
            let Some(status) = status else {
                self.done = true;
                return Some(Event::default().event("end").data("{}"));
            };
            if status.is_terminal() {
                // The log is complete once the end state is recorded: read
                // whatever came after the last read, then end.
                self.ending = true;
            }
            if self.status != Some(status) {
                self.status = Some(status);
                return Some(
                    Event::default()
                        .event("status")
                        .data(serde_json::to_string(status.as_str()).unwrap_or_default()),
                );
            }
            if !self.ending {
                tokio::time::sleep(LOG_POLL).await;
            }
        }
    }
}

/// `GET /ui/runs/{id}/log/events`: the run's log as server-sent events
/// (`log`: a JSON string of text; `status`: the run's status when it
/// changes; `end`), from the byte offset in `Last-Event-ID` when the
/// browser reconnects.
pub(crate) async fn log_events(
    State(dash): State<Dashboard>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, UiError> {
    let id = parse_id(&id)?;
    let d = super::enabled(&dash.inner.dispatcher, "jobs")?.clone();
    let store = d.store().clone();
    store.get(id).await?;
    let offset = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let follow = Follow {
        d,
        id,
        offset,
        pending: Vec::new(),
        status: None,
        ending: false,
        done: false,
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        let ev = f.next().await?;
        Some((Ok(ev), f))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

pub(crate) async fn cancel(ctx: Ctx, Path(id): Path<String>) -> UiResult {
    let id = parse_id(&id)?;
    let d = ctx.dispatcher()?.clone();
    blocking(move || d.cancel(id)).await?;
    Ok(see_other(&format!("/ui/runs/{id}")))
}

/// Run again: a new run of the same job for the same message data and
/// attributes (an explicit trigger, so `dedup_key` does not stop it).
pub(crate) async fn rerun(ctx: Ctx, Path(id): Path<String>) -> UiResult {
    let id = parse_id(&id)?;
    let d = ctx.dispatcher()?.clone();
    let store = d.store().clone();
    let r = store.get(id).await?;
    let new = d
        .trigger(&r.job, r.message.data, r.message.attributes)
        .await?;
    Ok(see_other(&format!("/ui/runs/{new}")))
}
