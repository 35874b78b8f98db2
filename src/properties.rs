//! Property tests over the two inputs the worker does not control: event
//! payloads and API answer bodies. Each runs 10 000 generated cases (more
//! with `PROPTEST_CASES`): none may panic, and every case must end as an
//! enriched record that parses back, or as a failure with a reason (a dead
//! letter, or a retry that ends as one).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::classify::{ApiAnswer, ErrcodePolicy, Verdict, classify};
use crate::event::parse_event;
use crate::record::{self, Source};
use crate::settings::EventSettings;

/// The cases of every property test: 10 000, or `PROPTEST_CASES`.
pub(crate) fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof!["1", "2", "-1", "", " ", "call in", "agent", "505"]
            .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the API's record and the event, plus arbitrary ones.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "session_id",
            "tenant_id",
            "call_type",
            "hangup_reason",
            "hangup_party",
            "satisfaction",
            "call_direction",
            "lists",
            "app_type",
            "service_time",
            "ringing_time",
            "tags",
            "ignore_times",
            "is_repeat",
            "app_node_list",
            "associate_datas",
            "record_file",
            "customer_name",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,10}",
    ]
}

/// Bytes that are sometimes JSON objects shaped like the real thing.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (json_value(), json_value(), json_value()).prop_map(|(s, t, c)| {
            json!({"session_id": s, "tenant_id": t, "call_type": c})
                .to_string()
                .into_bytes()
        }),
    ]
}

/// API answer bodies: garbage, envelopes with any errcode, and envelopes
/// whose `data` is a record with arbitrary field values.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let errcode = prop_oneof![
        Just(json!(0)),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!("0")),
        json_value(),
    ];
    let record = prop::collection::btree_map(field_name(), json_value(), 0..10)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (errcode, json_value(), prop_oneof![record, json_value()]).prop_map(|(e, m, d)| {
            json!({"errcode": e, "errmsg": m, "data": d})
                .to_string()
                .into_bytes()
        }),
    ]
}

fn fields() -> EventSettings {
    EventSettings {
        session_id_field: "session_id".into(),
        tenant_id_field: "tenant_id".into(),
        call_type_field: "call_type".into(),
    }
}

fn policy() -> ErrcodePolicy {
    ErrcodePolicy {
        permanent: [40004].into(),
        systemic: [40001].into(),
        rate_limited: [503].into(),
    }
}

/// Writes the enriched record for a published answer and checks it is a
/// JSON object with the session id.
fn enriched_parses_back(verdict: &Verdict) -> Result<(), TestCaseError> {
    if let Verdict::Publish(call) = verdict {
        let event = json!({"session_id": "s", "tenant_id": "t"});
        let source = Source {
            topic: "in".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
        };
        let bytes = record::to_json(&record::Inputs {
            session_id: "s",
            tenant_id: "t",
            event: &event,
            call,
            satisfaction_labels: &BTreeMap::new(),
            fetched_at: Utc::now(),
            attempts: 1,
            api_latency: Duration::from_millis(5),
            source: &source,
            reused: None,
        });
        let v: Value = serde_json::from_slice(&bytes).expect("the record is JSON");
        prop_assert_eq!(&v["session_id"], "s");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_event_payload_is_read_or_rejected_with_a_reason(bytes in payload()) {
        match parse_event(Some(&bytes), &fields(), None) {
            Ok(e) => {
                prop_assert!(!e.session_id.trim().is_empty());
                prop_assert!(!e.tenant_id.trim().is_empty());
            }
            Err(invalid) => prop_assert!(!invalid.to_string().is_empty()),
        }
    }

    #[test]
    fn every_api_body_gives_a_record_or_a_failure_with_a_reason(
        status in prop_oneof![Just(200u16), Just(429), Just(500), 100u16..600],
        bytes in body(),
    ) {
        let answer = ApiAnswer::Http { status, retry_after: None, body: Bytes::from(bytes) };
        let verdict = classify(&answer, &policy());
        match verdict.failure() {
            None => enriched_parses_back(&verdict)?,
            Some(f) => prop_assert!(!f.reason.is_empty()),
        }
    }
}
