//! Trace context through the real binary: the input's W3C `traceparent`
//! goes on in the enriched record and the dead letter, whether or not
//! spans are exported; with `OTEL_EXPORTER_OTLP_ENDPOINT` the spans reach a
//! real OTLP receiver.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::OwnedMessage;

use crate::helpers::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// The parts of a record's single `traceparent` header (version, trace id,
/// span id, flags); fails when there is none or more than one.
fn trace_of(m: &OwnedMessage) -> [String; 4] {
    use rdkafka::message::{Headers, Message};
    let values: Vec<String> = m
        .headers()
        .map(|hs| {
            hs.iter()
                .filter(|h| h.key == "traceparent")
                .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(values.len(), 1, "one traceparent: {values:?}");
    let parts: Vec<String> = values[0].split('-').map(str::to_string).collect();
    assert_eq!(parts.len(), 4, "{values:?}");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    [0, 1, 2, 3].map(|i| parts[i].clone())
}

#[tokio::test]
async fn the_input_trace_goes_on_in_the_enriched_record_and_the_dead_letter() {
    let env = TestEnv::new("traceparent", 1, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    // Spans do not depend on the log level (only warnings logged here).
    let mut child = env.spawn_binary(&log, &[("UINCALL__LOG__LEVEL", "warn")]);

    let parent = traceparent(TRACE, PARENT_SPAN);
    let state = "vendor=abc";
    let dl_trace = "0af7651916cd43dd8448eb211c80319c";
    let dl_parent = traceparent(dl_trace, "b7ad6b7169203331");
    let (traced, broken, bare) = (
        env.event("traced-1").1,
        env.event("broken-1").1,
        env.event("bare-1").1,
    );
    let permanent = env.event("permanent-1").1;
    let traced_headers = [("traceparent", parent.as_str()), ("tracestate", state)];
    let broken_headers = [(
        "traceparent",
        "00-zz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )];
    let dl_headers = [("traceparent", dl_parent.as_str())];
    env.seed_raw(&[
        (Some("traced-1"), &traced, &traced_headers),
        (Some("broken-1"), &broken, &broken_headers),
        (Some("bare-1"), &bare, &[]),
        (Some("permanent-1"), &permanent, &dl_headers),
    ])
    .await;

    let out = env.read_output(3).await;
    let dead = env.read_dlq(1).await;
    sigterm(&child);
    assert!(
        wait_exit(&mut child, Duration::from_secs(30))
            .await
            .success()
    );
    let by_key: HashMap<String, &OwnedMessage> = out.iter().map(|m| (key(m), m)).collect();

    // The traced record's trace goes on, from a span of the worker's own,
    // with the input's tracestate and sampling decision.
    let t = trace_of(by_key["traced-1"]);
    assert_eq!((t[1].as_str(), t[3].as_str()), (TRACE, "01"));
    assert_ne!(t[2], PARENT_SPAN);
    assert_eq!(
        header(by_key["traced-1"], "tracestate").as_deref(),
        Some(state)
    );
    // An unreadable traceparent, or none: a trace of the record's own, not
    // sampled (nothing records it here).
    for k in ["broken-1", "bare-1"] {
        let t = trace_of(by_key[k]);
        assert_ne!(t[1], TRACE, "{k}");
        assert_eq!(t[3], "00", "{k}");
    }
    // The dead letter: the input's trace, its traceparent replaced, not
    // repeated.
    let t = trace_of(&dead[0]);
    assert_eq!(t[1], dl_trace);
    assert_ne!(t[2], "b7ad6b7169203331");

    // Log lines of a traced record carry its trace id at the top level.
    let lines = std::fs::read_to_string(&log).unwrap();
    let dead_line = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["span"]["session_id"] == "permanent-1")
        .unwrap_or_else(|| panic!("a log line of the dead-lettered record:\n{lines}"));
    assert_eq!(dead_line["trace_id"], dl_trace, "{dead_line}");
    assert_eq!(dead_line["span_id"].as_str().map(str::len), Some(16));
}

#[tokio::test]
async fn spans_reach_a_real_otlp_receiver_without_the_token() {
    let jaeger = crate::testkit::jaeger::Jaeger::start().unwrap();
    let env = TestEnv::new("otlp", 1, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let endpoint = jaeger.otlp_http_endpoint();
    let mut child = env.spawn_binary(
        &log,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "enricher-under-test"),
        ],
    );
    let parent = traceparent(TRACE, PARENT_SPAN);
    let event = env.event("otlp-1").1;
    let headers = [("traceparent", parent.as_str())];
    env.seed_raw(&[(Some("otlp-1"), &event, &headers)]).await;
    let out = env.read_output(1).await;
    let written = trace_of(&out[0]);

    let input_topic = format!("process {}", env.input);
    let output_topic = format!("send {}", env.output);
    let complete = |t: &crate::testkit::jaeger::Trace| {
        [
            input_topic.as_str(),
            "GET /openapi/call/v2/detail/{session_id}",
            output_topic.as_str(),
        ]
        .iter()
        .all(|name| t.span(name).is_some())
    };
    let trace = jaeger
        .wait_for_trace(TRACE, Duration::from_secs(60), complete)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\nworker log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    sigterm(&child);
    assert!(
        wait_exit(&mut child, Duration::from_secs(30))
            .await
            .success()
    );

    // The record's span continues the input's, as a consumer.
    let record = trace.span(&input_topic).unwrap();
    assert_eq!(record.service, "enricher-under-test");
    assert_eq!(record.parent_span_id.as_deref(), Some(PARENT_SPAN));
    assert_eq!(record.kind.as_deref(), Some("consumer"));
    let group = env.settings().kafka.group_id;
    let attrs = [
        ("messaging.system", "kafka"),
        ("messaging.destination.name", env.input.as_str()),
        ("messaging.consumer.group.name", group.as_str()),
        ("messaging.destination.partition.id", "0"),
        ("messaging.kafka.offset", "0"),
        ("session_id", "otlp-1"),
        ("tenant_id", env.tenant.as_str()),
    ];
    for (k, v) in attrs {
        assert_eq!(record.attribute(k), Some(v), "{k}: {record:#?}");
    }
    // The API call: a client span under the record's, its URL without the
    // token.
    let call = trace
        .span("GET /openapi/call/v2/detail/{session_id}")
        .unwrap();
    assert_eq!(
        call.parent_span_id.as_deref(),
        Some(record.span_id.as_str())
    );
    assert_eq!(call.kind.as_deref(), Some("client"));
    assert_eq!(call.attribute("http.response.status_code"), Some("200"));
    let url = call.attribute("url.full").unwrap();
    assert!(url.contains("/openapi/call/v2/detail/otlp-1?"), "{url}");
    assert!(url.contains("access_token=REDACTED"), "{url}");
    // The write: a producer span under the record's, whose context the
    // enriched record carries.
    let send = trace.span(&output_topic).unwrap();
    assert_eq!(
        send.parent_span_id.as_deref(),
        Some(record.span_id.as_str())
    );
    assert_eq!(send.kind.as_deref(), Some("producer"));
    assert_eq!(
        written[2], send.span_id,
        "the enriched record's traceparent"
    );
    // The token is in no attribute of any span.
    for span in &trace.spans {
        for (k, v) in &span.attributes {
            assert!(!v.contains(&env.token), "{}: {k} = {v}", span.name);
        }
    }
}
