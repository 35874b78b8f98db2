//! Logging and traces. Log lines go to stderr as JSON or text, filtered by
//! `log.level` or `RUST_LOG`. JSON lines are flat: `timestamp`, `level`,
//! `target`, `message` and the event's fields at the top level, the current
//! span under `span`, and `trace_id`/`span_id` when the line belongs to a
//! traced record. Record spans carry session_id and tenant_id, never a
//! token. Every line is written whole, with each secret the settings hold
//! (and each token read later) replaced by `[redacted]`, whoever wrote it:
//! librdkafka's own lines quote URLs and configuration. Traces: see
//! [`crate::otel`].

use std::borrow::Cow;
use std::io::Write;
use std::sync::{Arc, PoisonError, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};

use tracing::Level;
use tracing_log::AsLog;
use tracing_log::log::{LevelFilter as LogCrateLevel, set_max_level as set_log_crate_level};
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
    let log_crate_level = filter
        .max_level_hint()
        .map_or(LogCrateLevel::Trace, |l| l.as_log());
    // The worker's own spans, whatever the log level: a record's trace
    // does not depend on how much is logged.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(traces.tracer())
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        // Nothing reads OpenTelemetry's current context (headers come from
        // the span itself): no context switch at every poll of a record.
        .with_context_activation(false)
        .with_filter(Targets::new().with_target("uincall_enricher", Level::INFO));
    let lines = match log.format {
        LogFormat::Json => json_lines().boxed(),
        LogFormat::Text => fmt::layer().with_writer(redacting_stderr).boxed(),
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
    if installed {
        crate::otel::set_exporting(export);
        // The `log` records of libraries (rdkafka writes one per message
        // dropped, at trace) stop at the macro unless a line would show
        // them, instead of being turned into events and filtered out.
        set_log_crate_level(log_crate_level);
    }
    Ok(Telemetry {
        traces: installed.then_some(traces),
    })
}

/// Flat JSON lines with the trace and span ids of the current span.
fn json_lines() -> json_subscriber::JsonLayer<Registry, fn() -> Redacting<std::io::Stderr>> {
    let mut layer = json_subscriber::JsonLayer::new(redacting_stderr as fn() -> _);
    layer.with_timer("timestamp", fmt::time::SystemTime);
    layer.with_level("level");
    layer.with_target("target");
    layer.with_flattened_event();
    layer.with_current_span("span");
    layer.add_from_extension::<OtelData, _, _>("trace_id", |d| Some(d.trace_id()?.to_string()));
    layer.add_from_extension::<OtelData, _, _>("span_id", |d| Some(d.span_id()?.to_string()));
    layer
}

/// Secrets no log line may hold, and a matcher of them and their escaped
/// forms.
static SECRETS: RwLock<Redactions> = RwLock::new(Redactions {
    known: Vec::new(),
    matcher: None,
});

struct Redactions {
    known: Vec<String>,
    matcher: Option<Arc<AhoCorasick>>,
}

/// Secrets shorter than this are not looked for: replacing a few characters
/// wherever they occur would garble every line (and such a secret guards
/// little).
const SHORTEST_SECRET: usize = 6;

/// From now on, each of `secrets` is replaced by `[redacted]` in every log
/// line: as written, as a JSON string or `Debug` escapes it (a quote, a
/// backslash, a line break), and each line of one that has several (a PEM
/// key).
pub fn redact_in_logs(secrets: impl IntoIterator<Item = String>) {
    let mut r = SECRETS.write().unwrap_or_else(PoisonError::into_inner);
    let before = r.known.len();
    for s in secrets {
        let json = serde_json::to_string(&s).unwrap_or_default();
        let debug = format!("{s:?}");
        let escaped = [json.trim_matches('"'), debug.trim_matches('"')];
        let lines = s.lines().map(str::trim);
        let forms: Vec<String> = (escaped.into_iter().chain(lines).chain([s.as_str()]))
            .filter(|f| f.len() >= SHORTEST_SECRET)
            .map(str::to_string)
            .collect();
        for f in forms {
            if !r.known.contains(&f) {
                r.known.push(f);
            }
        }
    }
    if r.known.len() != before {
        // Leftmost-longest: a secret holding another is replaced whole.
        r.matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&r.known)
            .ok()
            .map(Arc::new);
    }
}

/// `line` with every registered secret replaced.
fn redact_line(line: &[u8]) -> Cow<'_, [u8]> {
    let matcher = (SECRETS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .matcher)
        .clone();
    match matcher {
        Some(m) if m.is_match(line) => {
            Cow::Owned(m.replace_all_bytes(line, &vec![&b"[redacted]"[..]; m.patterns_len()]))
        }
        _ => Cow::Borrowed(line),
    }
}

/// A log line's writer: it gathers the line and writes it, redacted, in
/// one piece when dropped (the end of the event).
pub struct Redacting<W: Write> {
    line: Vec<u8>,
    out: W,
}

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for Redacting<W> {
    fn drop(&mut self) {
        let _ = self.out.write_all(&redact_line(&self.line));
    }
}

fn redacting_stderr() -> Redacting<std::io::Stderr> {
    Redacting {
        line: Vec::with_capacity(256),
        out: std::io::stderr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_written_whole_with_every_secret_replaced() {
        redact_in_logs([
            "hunter2-long-secret".to_string(),
            "hunter2-long".to_string(),
            "abc".into(),
            "pass\"word\\x".into(),
            "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEF\n-----END KEY-----".into(),
        ]);
        let mut out = Vec::new();
        {
            let mut w = Redacting {
                line: Vec::new(),
                out: &mut out,
            };
            w.write_all(b"token hunter2-").unwrap();
            w.write_all(b"long-secret and hunter2-long, abc\n").unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "token [redacted] and [redacted], abc\n",
            "split across writes, the longer one whole, too short to look for"
        );
        assert!(matches!(redact_line(b"nothing here"), Cow::Borrowed(_)));
        // As a JSON log line writes them.
        let json = serde_json::json!({"password": "pass\"word\\x", "key": "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEF\n-----END KEY-----"}).to_string();
        let redacted = String::from_utf8(redact_line(json.as_bytes()).into_owned()).unwrap();
        assert_eq!(redacted, r#"{"password":"[redacted]","key":"[redacted]"}"#);
    }
}
