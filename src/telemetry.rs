//! Logging and traces. Log lines go to stderr as JSON or text, filtered by
//! `log.level` or `RUST_LOG`. JSON lines are flat: `timestamp`, `level`,
//! `target`, `message` and the event's fields at the top level, the current
//! span under `span`, and `trace_id`/`span_id` when the line belongs to a
//! traced record. Record spans carry session_id and tenant_id, never a
//! token. Traces: see [`crate::otel`].

use tracing::Level;
use tracing_opentelemetry::OtelData;
use tracing_subscriber::filter::{FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::otel::{Export, Traces};
use crate::settings::{LogFormat, LogSettings};

/// What must outlive the work: the trace exporter's buffer.
pub struct Telemetry {
    traces: Option<Traces>,
}

impl Telemetry {
    /// Sends the spans still buffered.
    pub fn shutdown(self) {
        if let Some(t) = self.traces {
            t.shutdown();
        }
    }
}

/// Installs the global subscriber (a second call installs nothing). Fails,
/// naming the variable, on an `OTEL_*` setting it cannot follow.
pub fn init(log: &LogSettings) -> anyhow::Result<Telemetry> {
    let export = Export::from_env(|k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
    let traces = Traces::start(export)?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // The worker's own spans, whatever the log level: a record's trace
    // does not depend on how much is logged.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(traces.tracer())
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target("uincall_enricher", Level::INFO));
    let lines = match log.format {
        LogFormat::Json => json_lines().boxed(),
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    // Log lines as the level says, with the worker's spans whatever it
    // says: a warning inside a record names its record and trace.
    let ours = filter_fn(|m| m.is_span() && m.target().starts_with("uincall_enricher"));
    let installed = tracing_subscriber::registry()
        .with(vec![
            spans.boxed(),
            lines.with_filter(filter.or(ours)).boxed(),
        ])
        .try_init()
        .is_ok();
    Ok(Telemetry {
        traces: installed.then_some(traces),
    })
}

/// Flat JSON lines with the trace and span ids of the current span.
fn json_lines() -> json_subscriber::JsonLayer<Registry, fn() -> std::io::Stderr> {
    let mut layer = json_subscriber::JsonLayer::stderr();
    layer.with_timer("timestamp", fmt::time::SystemTime);
    layer.with_level("level");
    layer.with_target("target");
    layer.with_flattened_event();
    layer.with_current_span("span");
    layer.add_from_extension::<OtelData, _, _>("trace_id", |d| Some(d.trace_id()?.to_string()));
    layer.add_from_extension::<OtelData, _, _>("span_id", |d| Some(d.span_id()?.to_string()));
    layer
}
