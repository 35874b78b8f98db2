//! Header conventions of other tools, when asked for: CloudEvents on the
//! enriched record, Kafka Connect's error headers on the dead letter.

use std::time::Duration;

use rdkafka::message::Message;

use crate::helpers::*;

#[tokio::test]
async fn cloudevents_and_kafka_connect_headers_are_written_when_asked_for() {
    let env = TestEnv::new("interop", 1, Duration::ZERO).await;
    let mut s = env.settings();
    s.headers.cloudevents = true;
    s.headers.cloudevents_source = "urn:example:enricher".into();
    s.headers.kafka_connect = true;
    let worker = env.start_worker(s).await;
    env.seed(&["ce-1".to_string(), "permanent-1".to_string()])
        .await;
    let out = env.read_output(1).await;
    let dead = env.read_dlq(1).await;
    worker.stop().await.unwrap();

    let m = &out[0];
    let h = |name: &str| header(m, name);
    assert_eq!(h("ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(h("ce_id").as_deref(), Some("ce-1"));
    assert_eq!(h("ce_subject").as_deref(), Some("ce-1"));
    assert_eq!(h("ce_source").as_deref(), Some("urn:example:enricher"));
    assert_eq!(
        h("ce_type").as_deref(),
        Some("com.uincall.call.enriched.v1")
    );
    assert_eq!(
        h("ce_dataschema").as_deref(),
        Some(uincall_enricher::record::SCHEMA_ID)
    );
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    // ce_time is the record's fetched_at.
    let record = enriched_json(m);
    let time = chrono::DateTime::parse_from_rfc3339(&h("ce_time").unwrap()).unwrap();
    let fetched =
        chrono::DateTime::parse_from_rfc3339(record["enrichment"]["fetched_at"].as_str().unwrap())
            .unwrap();
    assert_eq!(time.timestamp_millis(), fetched.timestamp_millis());

    let d = &dead[0];
    let h = |name: &str| header(d, name);
    assert_eq!(h("__connect.errors.topic"), Some(env.input.clone()));
    assert_eq!(h("__connect.errors.partition").as_deref(), Some("0"));
    assert_eq!(h("__connect.errors.offset").as_deref(), Some("1"));
    assert_eq!(
        h("__connect.errors.exception.class.name").as_deref(),
        Some("permanent_error")
    );
    assert_eq!(
        h("__connect.errors.exception.message"),
        h("dlq.reason"),
        "the same reason under both names"
    );
    assert_eq!(h("dlq.error_class").as_deref(), Some("permanent_error"));
    assert_eq!(d.key(), Some(&b"permanent-1"[..]));
}

#[tokio::test]
async fn no_interop_headers_unless_asked_for() {
    let env = TestEnv::new("interop-off", 1, Duration::ZERO).await;
    let worker = env.start_worker(env.settings()).await;
    env.seed(&["plain-1".to_string(), "permanent-2".to_string()])
        .await;
    let out = env.read_output(1).await;
    let dead = env.read_dlq(1).await;
    worker.stop().await.unwrap();
    for m in [&out[0], &dead[0]] {
        use rdkafka::message::Headers;
        let names: Vec<String> = m
            .headers()
            .map(|hs| hs.iter().map(|h| h.key.to_string()).collect())
            .unwrap_or_default();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("ce_") || n.starts_with("__connect")),
            "{names:?}"
        );
    }
}
