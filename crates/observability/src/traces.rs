//! OpenTelemetry traces, exported over OTLP/HTTP (protobuf) when an
//! endpoint is configured; otherwise every call here is one branch on an
//! unset `OnceLock` and allocates nothing.
//!
//! The trace context travels in message attributes as Google's client
//! libraries carry it: the W3C `traceparent`/`tracestate` values under
//! `googclient_traceparent`/`googclient_tracestate`. A run's own spans
//! (delivery, run) get span ids derived from the trace id and the run id,
//! so that the run span (queued → ended, possibly across attempts and
//! restarts) can be a parent before it is exported, without storing
//! anything new in the run store.
//!
//! Span attributes are names, ids and statuses only: never message data,
//! attribute values, parameters or environment values (secrets live there).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use opentelemetry::trace::{SpanContext, SpanKind, TraceId};
pub use opentelemetry::KeyValue;

use opentelemetry::trace::{
    Span as _, SpanId, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The attribute Google's client libraries put a W3C `traceparent` in.
pub const TRACEPARENT_ATTRIBUTE: &str = "googclient_traceparent";
/// … and its `tracestate`.
pub const TRACESTATE_ATTRIBUTE: &str = "googclient_tracestate";

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TraceInitError(String);

/// Flushes and stops the exporter when dropped (end of `serve`).
pub struct TracesGuard(Option<SdkTracerProvider>);

impl Drop for TracesGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.shutdown();
        }
    }
}

/// Turns tracing on when `endpoint` (an OTLP/HTTP base URL, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; `/v1/traces` is appended) is given.
/// Batch export settings come from the standard `OTEL_BSP_*` variables.
pub fn init_traces(
    endpoint: Option<&str>,
    service_name: &str,
) -> Result<TracesGuard, TraceInitError> {
    let Some(endpoint) = endpoint.filter(|e| !e.is_empty()) else {
        return Ok(TracesGuard(None));
    };
    let base = endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| TraceInitError(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let _ = TRACER.set(provider.tracer("pubrun"));
    Ok(TracesGuard(Some(provider)))
}

/// Whether spans are recorded at all.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// A W3C `traceparent` header value.
pub fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Parses a W3C `traceparent` (version 00 layout; later versions are read
/// by their first four fields, as the spec asks).
pub fn parse_traceparent(s: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = s.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = tracestate
        .and_then(|t| t.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        state,
    ))
}

/// The trace context a message carries, if any.
pub fn from_attributes(attrs: &BTreeMap<String, String>) -> Option<SpanContext> {
    parse_traceparent(
        attrs.get(TRACEPARENT_ATTRIBUTE)?,
        attrs.get(TRACESTATE_ATTRIBUTE).map(String::as_str),
    )
}

/// Puts `sc` in a message's attributes (replacing what it carried).
pub fn inject(sc: &SpanContext, attrs: &mut BTreeMap<String, String>) {
    attrs.insert(TRACEPARENT_ATTRIBUTE.into(), traceparent(sc));
    let state = sc.trace_state().header();
    if state.is_empty() {
        attrs.remove(TRACESTATE_ATTRIBUTE);
    } else {
        attrs.insert(TRACESTATE_ATTRIBUTE.into(), state);
    }
}

/// FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
fn fnv(parts: &[&[u8]], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for p in parts {
        for b in p.iter().chain(b"\0") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

/// The spans pubrun derives for one run: `delivery` (message → run queued)
/// and `run` (queued → ended), both computable again from the run record.
#[derive(Debug, Clone)]
pub struct RunTrace {
    /// The publisher's context from the message, if it carried one.
    pub remote_parent: Option<SpanContext>,
    pub delivery: SpanContext,
    pub run: SpanContext,
}

impl RunTrace {
    /// `message_key` identifies the message when it carries no trace
    /// context (its id and publish time): the trace id is derived from it.
    pub fn of(run_id: i64, attrs: &BTreeMap<String, String>, message_key: &str) -> RunTrace {
        let remote_parent = from_attributes(attrs).filter(|p| p.is_sampled());
        let trace_id = match &remote_parent {
            Some(p) => p.trace_id(),
            None => {
                let id = run_id.to_le_bytes();
                let k = message_key.as_bytes();
                let hi = fnv(&[k, &id], 1);
                let lo = fnv(&[k, &id], 2);
                TraceId::from_bytes(((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes())
            }
        };
        let t = trace_id.to_bytes();
        let id = run_id.to_le_bytes();
        let derived = |kind: &[u8]| {
            SpanContext::new(
                trace_id,
                SpanId::from_bytes(fnv(&[&t, &id, kind], 3).to_be_bytes()),
                TraceFlags::SAMPLED,
                false,
                remote_parent
                    .as_ref()
                    .map(|p| p.trace_state().clone())
                    .unwrap_or_default(),
            )
        };
        RunTrace {
            delivery: derived(b"delivery"),
            run: derived(b"run"),
            remote_parent,
        }
    }
}

/// A span being recorded, or nothing when tracing is off. Ends when
/// dropped (or at [`Span::end_at`]).
pub struct Span(Option<opentelemetry_sdk::trace::Span>);

/// What a span is started from.
pub struct SpanStart<'a> {
    pub name: &'static str,
    pub kind: SpanKind,
    pub parent: Option<&'a SpanContext>,
    /// A derived id (see [`RunTrace`]); random when `None`.
    pub id: Option<SpanId>,
    /// The trace of a root span (a parent's trace wins); random when `None`.
    pub trace_id: Option<TraceId>,
    pub start: Option<SystemTime>,
    pub attributes: Vec<KeyValue>,
}

impl<'a> SpanStart<'a> {
    pub fn new(name: &'static str, parent: Option<&'a SpanContext>) -> Self {
        SpanStart {
            name,
            kind: SpanKind::Internal,
            parent,
            id: None,
            trace_id: None,
            start: None,
            attributes: Vec::new(),
        }
    }
}

/// Starts a span; the closure building it runs only when tracing is on.
pub fn start<'a>(f: impl FnOnce() -> SpanStart<'a>) -> Span {
    let Some(tracer) = TRACER.get() else {
        return Span(None);
    };
    let s = f();
    let mut b = tracer
        .span_builder(s.name)
        .with_kind(s.kind)
        .with_attributes(s.attributes);
    b.span_id = s.id;
    b.trace_id = s.trace_id;
    if let Some(t) = s.start {
        b = b.with_start_time(t);
    }
    let cx = match s.parent {
        Some(p) => Context::new().with_remote_span_context(p.clone()),
        None => Context::new(),
    };
    Span(Some(b.start_with_context(tracer, &cx)))
}

impl Span {
    pub fn context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|s| s.span_context().clone())
    }

    /// The W3C `traceparent` of this span, for a job's `TRACEPARENT`.
    pub fn traceparent(&self) -> Option<String> {
        self.context().map(|c| traceparent(&c))
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed; `why` must hold no secret.
    pub fn error(&mut self, why: impl Into<String>) {
        if let Some(s) = &mut self.0 {
            s.set_status(Status::error(why.into()));
        }
    }

    pub fn end_at(mut self, t: SystemTime) {
        if let Some(s) = &mut self.0 {
            s.end_with_timestamp(t);
        }
    }
}

/// Milliseconds since the epoch as a span time.
pub fn at_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp, Some("k=v")).unwrap();
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(traceparent(&sc), tp);
        assert_eq!(sc.trace_state().header(), "k=v");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad}");
        }
    }

    #[test]
    fn run_spans_are_derived_stably() {
        let mut attrs = BTreeMap::new();
        let a = RunTrace::of(7, &attrs, "1/2026");
        let b = RunTrace::of(7, &attrs, "1/2026");
        assert_eq!(a.run, b.run);
        assert_ne!(a.run.span_id(), a.delivery.span_id());
        assert_ne!(RunTrace::of(8, &attrs, "1/2026").run, a.run);
        inject(
            &parse_traceparent(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            )
            .unwrap(),
            &mut attrs,
        );
        let c = RunTrace::of(7, &attrs, "1/2026");
        assert_eq!(
            c.run.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(c.remote_parent.is_some());
    }
}
