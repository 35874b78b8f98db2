//! Traces (OpenTelemetry): a span per record, continuing the W3C
//! `traceparent`/`tracestate` of the input record's headers; a child span per
//! API call (its URL without the access token) and per write to the output
//! or dead-letter topic, whose context is written onto that record's
//! headers. Attributes follow the OpenTelemetry messaging conventions for
//! Kafka.
//!
//! Spans are exported with OTLP over HTTP when the standard variables ask
//! for it ([`Export::from_env`]), and not otherwise; the headers are written
//! either way, so a trace goes on through this worker whether or not it
//! exports. Without export a span's name and attributes are not built:
//! nothing would read them.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Tracer};
use rdkafka::message::{Header, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace-context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Whether and how spans are exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    Off,
    Otlp(OtlpProtocol),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    HttpJson,
}

impl Export {
    /// From the standard variables: off unless `OTEL_TRACES_EXPORTER=otlp`
    /// or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; `OTEL_SDK_DISABLED=true`
    /// or `OTEL_TRACES_EXPORTER=none` turn it off. The error names the
    /// variable.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Export, String> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(Export::Off);
        }
        let wanted = match set("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None => {
                set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                    || set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            }
            Some("none") => false,
            Some("otlp") => true,
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER: `{other}` is not supported (otlp or none)"
                ));
            }
        };
        if !wanted {
            return Ok(Export::Off);
        }
        let (name, protocol) = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|n| set(n).map(|v| (n, v)))
        .unwrap_or(("", "http/protobuf".into()));
        match protocol.trim() {
            "http/protobuf" => Ok(Export::Otlp(OtlpProtocol::HttpProtobuf)),
            "http/json" => Ok(Export::Otlp(OtlpProtocol::HttpJson)),
            "grpc" => Err(format!(
                "{name}: grpc is not built in; use http/protobuf (the collector's port 4318)"
            )),
            other => Err(format!(
                "{name}: `{other}` is not an OTLP protocol (http/protobuf or http/json)"
            )),
        }
    }
}

/// Whether the installed subscriber exports spans.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Tells whether the subscriber just installed exports spans.
pub fn set_exporting(export: Export) {
    EXPORTING.store(export != Export::Off, Ordering::Relaxed);
}

/// Whether span names and attributes are worth building: spans are
/// exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The tracer provider; [`Traces::shutdown`] sends what is still buffered.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// A provider exporting as `export` says. Without export, a record
    /// continues a sampled input trace and starts no sampled trace of its
    /// own (nothing would record it).
    pub fn start(export: Export) -> anyhow::Result<Traces> {
        let builder = SdkTracerProvider::builder().with_resource(resource());
        let provider = match export {
            Export::Off => builder
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
                .build(),
            Export::Otlp(protocol) => {
                let protocol = match protocol {
                    OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
                    OtlpProtocol::HttpJson => Protocol::HttpJson,
                };
                // The exporter's blocking HTTP client may not be built on
                // an async runtime's thread.
                let exporter = std::thread::spawn(move || {
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(protocol)
                        .build()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))??;
                builder.with_batch_exporter(exporter).build()
            }
        };
        Ok(Traces { provider })
    }

    pub fn tracer(&self) -> Tracer {
        self.provider.tracer("uincall-enricher")
    }

    /// Sends the spans still buffered (waits for the exporter).
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// `service.name` (unless `OTEL_SERVICE_NAME` names it) and
/// `service.version`, with `OTEL_RESOURCE_ATTRIBUTES`.
fn resource() -> Resource {
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name("uincall-enricher").build()
    }
}

/// An input record's headers, read as a carrier of trace context: the last
/// header of a name wins (as Kafka's `lastHeader`), a value that is not
/// UTF-8 is absent.
struct InputHeaders<'a>(&'a [(String, Option<Vec<u8>>)]);

impl Extractor for InputHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let (_, value) = self.0.iter().rev().find(|(k, _)| k == key)?;
        std::str::from_utf8(value.as_deref()?).ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The trace context the input record carries, if it carries a valid one;
/// anything unreadable is ignored (the record starts a trace of its own).
pub fn input_context(headers: &[(String, Option<Vec<u8>>)]) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(&InputHeaders(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Continues the input record's trace in `span` (a record's span, before
/// it is entered).
pub fn continue_trace(span: &tracing::Span, headers: &[(String, Option<Vec<u8>>)]) {
    if let Some(cx) = input_context(headers) {
        let _ = span.set_parent(cx);
    }
}

/// The trace-context headers of `span` (of the current span for none, the
/// child spans not made without export), `traceparent` first; none when
/// the span has no valid context (no tracer installed).
pub fn headers_of(span: &tracing::Span) -> Vec<(&'static str, String)> {
    let cx = match span.is_none() {
        true => tracing::Span::current().context(),
        false => span.context(),
    };
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut found = Injected::default();
    TraceContextPropagator::new().inject_context(&cx, &mut found);
    [(TRACEPARENT, found.parent), (TRACESTATE, found.state)]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)).filter(|(_, v)| !v.is_empty()))
        .collect()
}

/// The two trace-context headers as the propagator writes them (a map of
/// owned keys cost more than the rest of the header).
#[derive(Default)]
struct Injected {
    parent: Option<String>,
    state: Option<String>,
}

impl Injector for Injected {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.parent = Some(value),
            TRACESTATE => self.state = Some(value),
            _ => {}
        }
    }
}

/// `headers` with `span`'s trace context: any trace-context header they had
/// is replaced; kept as it was when the span has none.
pub fn with_trace<'a>(
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    span: &tracing::Span,
) -> OwnedHeaders {
    let ours = headers_of(span);
    let replaced = |k: &str| !ours.is_empty() && (k == TRACEPARENT || k == TRACESTATE);
    let kept = headers
        .filter(|(k, _)| !replaced(k))
        .fold(OwnedHeaders::new(), |hs, (key, value)| {
            hs.insert(Header { key, value })
        });
    ours.iter().fold(kept, |hs, (key, value)| {
        hs.insert(Header {
            key,
            value: Some(value.as_str()),
        })
    })
}

/// A record's span (`process <topic>`, kind consumer), continuing the
/// input record's trace, with the session and tenant of its event when it
/// could be read.
pub fn record_span(
    source: &crate::record::Source,
    group: &str,
    headers: &[(String, Option<Vec<u8>>)],
    event: Option<&crate::event::CallEnded>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "record",
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        partition = source.partition,
        offset = source.offset,
        session_id = event.map(|e| e.session_id.as_str()),
        tenant_id = event.map(|e| e.tenant_id.as_str()),
    );
    continue_trace(&span, headers);
    if !exporting() {
        return span;
    }
    span.record("otel.name", format!("process {}", source.topic));
    messaging(&span, &source.topic, "process");
    span.set_attribute("messaging.consumer.group.name", group.to_string());
    span.set_attribute(
        "messaging.destination.partition.id",
        source.partition.to_string(),
    );
    span.set_attribute("messaging.kafka.offset", source.offset);
    span
}

/// The span of a write to `topic` (`send <topic>`, kind producer); its
/// context goes onto the written record.
pub fn send_span(topic: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "send",
        otel.name = tracing::field::Empty,
        otel.kind = "producer"
    );
    if exporting() {
        span.record("otel.name", format!("send {topic}"));
        messaging(&span, topic, "send");
    }
    span
}

/// [`send_span`] for a record's enriched record or dead letter; without
/// export none, and the record's own span's context goes on the written
/// record (see [`headers_of`]).
pub fn record_send_span(topic: &str) -> tracing::Span {
    match exporting() {
        true => send_span(topic),
        false => tracing::Span::none(),
    }
}

fn messaging(span: &tracing::Span, topic: &str, operation: &'static str) {
    span.set_attribute("messaging.system", "kafka");
    span.set_attribute("messaging.destination.name", topic.to_string());
    span.set_attribute("messaging.operation.name", operation);
    span.set_attribute("messaging.operation.type", operation);
}

/// The span of one API call (kind client). `url` gives the URL, which
/// must not hold the access token: see `UincallClient::url_for_traces`.
/// Without export none: the request carries the record's span's context.
pub fn api_span(url: impl FnOnce() -> url::Url, attempt: u32) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "api_call",
        otel.name = "GET /openapi/call/v2/detail/{session_id}",
        otel.kind = "client",
    );
    let url = url();
    span.set_attribute("http.request.method", "GET");
    span.set_attribute("url.full", url.to_string());
    if let Some(host) = url.host_str() {
        span.set_attribute("server.address", host.to_string());
    }
    if let Some(port) = url.port_or_known_default() {
        span.set_attribute("server.port", i64::from(port));
    }
    span.set_attribute("uincall.attempt", i64::from(attempt));
    span
}

/// What the API answered, on its call's span.
pub fn api_answered(
    span: &tracing::Span,
    answer: &crate::classify::ApiAnswer,
    verdict: &crate::classify::Verdict,
) {
    use crate::classify::{ApiAnswer, Verdict};
    if !exporting() {
        return;
    }
    if let ApiAnswer::Http { status, .. } = answer {
        span.set_attribute("http.response.status_code", i64::from(*status));
    }
    let Some(failure) = verdict.failure() else {
        span.set_attribute("uincall.errcode", 0);
        return;
    };
    if let Some(errcode) = failure.errcode {
        span.set_attribute("uincall.errcode", errcode);
    }
    let class = match verdict {
        Verdict::Retry(_) => "retry",
        Verdict::DeadLetter(_) => "permanent",
        Verdict::Systemic(_) => "systemic",
        Verdict::RateLimited(_) => "rate_limited",
        Verdict::Publish(_) => unreachable!("a verdict with a failure"),
    };
    set_error(span, class, &failure.reason);
}

/// Marks `span` failed, with the error's class (`error.type`).
pub fn set_error(span: &tracing::Span, class: &str, description: &str) {
    if !exporting() {
        return;
    }
    span.set_attribute("error.type", class.to_string());
    span.set_status(Status::error(description.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rdkafka::message::Headers;
    use std::collections::HashMap;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn h(pairs: &[(&str, &[u8])]) -> Vec<(String, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_vec())))
            .collect()
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Runs `f` with a tracer installed for this thread.
    fn traced<T>(f: impl FnOnce() -> T) -> T {
        let traces = Traces::start(Export::Off).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(traces.tracer()));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn written(hs: &OwnedHeaders) -> Vec<(String, String)> {
        hs.iter()
            .map(|h| {
                let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                (h.key.to_string(), v.into_owned())
            })
            .collect()
    }

    #[test]
    fn export_is_off_unless_asked_for_and_errors_name_the_variable() {
        assert_eq!(Export::from_env(env(&[])), Ok(Export::Off));
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            Export::from_env(env(&[endpoint])),
            Ok(Export::Otlp(OtlpProtocol::HttpProtobuf))
        );
        let json = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json");
        assert_eq!(
            Export::from_env(env(&[endpoint, json])),
            Ok(Export::Otlp(OtlpProtocol::HttpJson))
        );
        let off = [("OTEL_TRACES_EXPORTER", "none"), endpoint];
        assert_eq!(Export::from_env(env(&off)), Ok(Export::Off));
        let disabled = [("OTEL_SDK_DISABLED", "true"), endpoint];
        assert_eq!(Export::from_env(env(&disabled)), Ok(Export::Off));
        let err = Export::from_env(env(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]));
        assert!(err.unwrap_err().starts_with("OTEL_EXPORTER_OTLP_PROTOCOL:"));
        let err = Export::from_env(env(&[("OTEL_TRACES_EXPORTER", "zipkin")]));
        assert!(err.unwrap_err().starts_with("OTEL_TRACES_EXPORTER:"));
    }

    #[test]
    fn a_record_continues_the_input_trace_and_writes_its_own_span() {
        let out = traced(|| {
            let span = tracing::info_span!("record");
            continue_trace(&span, &h(&[(TRACEPARENT, PARENT.as_bytes())]));
            let child = span.in_scope(|| tracing::info_span!("send"));
            let input = [
                ("k", Some(&b"v"[..])),
                (TRACEPARENT, Some(PARENT.as_bytes())),
            ];
            written(&with_trace(input.into_iter(), &child))
        });
        assert_eq!(out[0], ("k".into(), "v".into()));
        assert_eq!(out.len(), 2, "the input's traceparent replaced: {out:?}");
        let (key, value) = &out[1];
        assert_eq!(key, TRACEPARENT);
        let parts: Vec<&str> = value.split('-').collect();
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(parts[2], "00f067aa0ba902b7", "a span of its own");
        assert_eq!(parts[3], "01", "sampled as its parent");
    }

    #[test]
    fn without_a_tracer_the_headers_stay_as_they_were() {
        let span = tracing::info_span!("record");
        let input = [(TRACEPARENT, Some(PARENT.as_bytes()))];
        let out = written(&with_trace(input.into_iter(), &span));
        assert_eq!(out, vec![(TRACEPARENT.to_string(), PARENT.to_string())]);
    }

    #[test]
    fn the_last_traceparent_header_counts() {
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = input_context(&h(&[
            (TRACEPARENT, PARENT.as_bytes()),
            (TRACEPARENT, other.as_bytes()),
        ]));
        let tid = cx.unwrap().span().span_context().trace_id().to_string();
        assert_eq!(tid, "0af7651916cd43dd8448eb211c80319c");
    }

    /// A header value: often almost a traceparent, sometimes anything.
    fn header_value() -> impl Strategy<Value = Option<Vec<u8>>> {
        let near = (
            "[0-9a-fA-F]{0,3}",
            "[0-9a-fA-Fxz]{0,34}",
            "[0-9a-f-]{0,18}",
            "[0-9a-f]{0,3}",
            "(-.{0,8})?",
        )
            .prop_map(|(v, t, s, f, rest)| format!("{v}-{t}-{s}-{f}{rest}").into_bytes());
        prop_oneof![
            3 => near.prop_map(Some),
            1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Some),
            1 => Just(None),
            1 => Just(Some(PARENT.as_bytes().to_vec())),
        ]
    }

    fn header_set() -> impl Strategy<Value = Vec<(String, Option<Vec<u8>>)>> {
        let key = prop_oneof![
            Just(TRACEPARENT.to_string()),
            Just(TRACESTATE.to_string()),
            Just("Traceparent".to_string()),
            "[a-z.]{1,12}",
        ];
        proptest::collection::vec((key, header_value()), 0..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Whatever trace headers a record carries, reading them never
        /// fails, and the record's own records carry exactly one
        /// traceparent, valid, in the input's trace when that one was
        /// valid.
        #[test]
        fn broken_trace_headers_never_fail_a_record(headers in header_set()) {
            let input = input_context(&headers);
            let out = traced(|| {
                let span = tracing::info_span!("record");
                continue_trace(&span, &headers);
                let carried = headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
                written(&with_trace(carried, &span))
            });
            let ours: Vec<&String> = out.iter().filter(|(k, _)| k == TRACEPARENT).map(|(_, v)| v).collect();
            prop_assert_eq!(ours.len(), 1, "{:?}", out);
            let parsed = input_context(&h(&[(TRACEPARENT, ours[0].as_bytes())]));
            prop_assert!(parsed.is_some(), "{}", ours[0]);
            if let Some(cx) = input {
                let want = cx.span().span_context().trace_id();
                prop_assert_eq!(parsed.unwrap().span().span_context().trace_id(), want);
            }
        }
    }
}
