//! What pubrun tells its operators: Prometheus metrics (`metrics.rs`) and
//! log setup, text or JSON (`logging.rs`), and OpenTelemetry traces
//! exported over OTLP when configured (`traces.rs`). Every crate that counts
//! something depends on this one; the metric names live here only.

pub mod logging;
pub mod metrics;
pub mod traces;

pub use logging::{init_logging, LogFormat};
pub use metrics::{metrics, Metrics};
