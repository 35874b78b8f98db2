//! The trace receiver of the tracing tests on its own: what is sent to it
//! over OTLP/HTTP comes back from its query API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::testkit::jaeger::Jaeger;

#[tokio::test]
async fn jaeger_returns_the_spans_sent_over_otlp_http() {
    let jaeger = Jaeger::start().expect("Jaeger starts");
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let (parent, child) = ("eee19b7ec3c1b174", "eee19b7ec3c1b175");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let span = |id: &str, parent: Option<&str>, name: &str, kind: u8, attrs| {
        json!({
            "traceId": trace_id,
            "spanId": id,
            "parentSpanId": parent.unwrap_or(""),
            "name": name,
            "kind": kind,
            "startTimeUnixNano": (now - 2_000_000).to_string(),
            "endTimeUnixNano": now.to_string(),
            "attributes": attrs,
        })
    };
    let body = json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "jaeger-receiver-test"}},
            ]},
            "scopeSpans": [{
                "scope": {"name": "it"},
                "spans": [
                    span(parent, None, "handle", 2, json!([])),
                    span(child, Some(parent), "lookup", 3, json!([
                        {"key": "call.id", "value": {"stringValue": "call-1"}},
                        {"key": "attempt", "value": {"intValue": "2"}},
                    ])),
                ],
            }],
        }],
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/traces", jaeger.otlp_http_endpoint()))
        .json(&body)
        .send()
        .await
        .expect("OTLP/HTTP answers");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);

    let trace = jaeger
        .wait_for_trace(trace_id, Duration::from_secs(30), |t| t.spans.len() == 2)
        .await
        .expect("both spans arrive");
    let root = trace.span("handle").expect("the parent span");
    let lookup = trace.span("lookup").expect("the child span");
    assert_eq!(root.span_id, parent);
    assert_eq!(root.parent_span_id, None);
    assert_eq!(root.kind.as_deref(), Some("server"));
    assert_eq!(lookup.span_id, child);
    assert_eq!(lookup.parent_span_id.as_deref(), Some(parent));
    assert_eq!(lookup.kind.as_deref(), Some("client"));
    assert_eq!(lookup.attribute("call.id"), Some("call-1"));
    assert_eq!(lookup.attribute("attempt"), Some("2"));
    assert_eq!(lookup.service, "jaeger-receiver-test");
    assert!(
        jaeger
            .trace("00000000000000000000000000000001")
            .await
            .unwrap()
            .is_none(),
        "an unknown trace id is no trace"
    );
}
