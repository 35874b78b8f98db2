//! The enriched record published to the output topic (key = session_id).
//! Its JSON Schema is `docs/schema/enriched-record.v1.schema.json`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::detail::CallDetail;
use crate::labels::{self, Label};

/// Bumped on any change that is not a pure addition.
pub const SCHEMA_VERSION: u32 = 1;
pub const CONTENT_TYPE: &str = "application/json";

/// Header names of the enriched record.
pub mod header {
    pub const TENANT_ID: &str = "uincall-tenant-id";
    pub const SCHEMA_VERSION: &str = "uincall-schema-version";
    pub const CONTENT_TYPE: &str = "content-type";
}

/// The `$id` of the enriched record's JSON Schema (docs/schema).
pub const SCHEMA_ID: &str = "https://github.com/uincall-enricher/uincall-enricher/docs/schema/enriched-record.v1.schema.json";

/// The CloudEvents type of an enriched record.
pub const CLOUDEVENTS_TYPE: &str = "com.uincall.call.enriched.v1";

/// CloudEvents attributes of an enriched record (Kafka protocol binding,
/// binary mode: one `ce_` header each; the content type is the
/// `content-type` header already written).
pub fn cloudevents_headers(
    source: &str,
    session_id: &str,
    time: chrono::DateTime<chrono::Utc>,
) -> Vec<(&'static str, String)> {
    vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", session_id.to_string()),
        ("ce_source", source.to_string()),
        ("ce_type", CLOUDEVENTS_TYPE.to_string()),
        (
            "ce_time",
            time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        ("ce_subject", session_id.to_string()),
        ("ce_dataschema", SCHEMA_ID.to_string()),
    ]
}

/// Where an input record came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Broker or producer timestamp of the input record, ms since epoch.
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct EnrichedRecord<'a> {
    pub schema_version: u32,
    pub session_id: &'a str,
    pub tenant_id: &'a str,
    /// The call-ended event as received.
    pub event: &'a Value,
    /// The call detail, normalised.
    pub call: &'a CallDetail,
    pub labels: Labels,
    pub enrichment: Enrichment<'a>,
}

#[derive(Debug, Serialize)]
pub struct Labels {
    pub hangup_reason: Option<Label>,
    pub hangup_party: Option<Label>,
    pub call_direction: Option<Label>,
    pub satisfaction: Option<Label>,
    /// One entry per element of `call.lists`, in the same order.
    pub fragments: Vec<FragmentLabels>,
}

#[derive(Debug, Serialize)]
pub struct FragmentLabels {
    pub app_type: Option<Label>,
    pub call_direction: Option<Label>,
}

#[derive(Debug, Serialize)]
pub struct Enrichment<'a> {
    /// When the successful API answer arrived (RFC 3339, UTC).
    pub fetched_at: String,
    /// API calls made for this record, the successful one included.
    pub attempts: u32,
    /// Duration of the successful API call in milliseconds.
    pub api_latency_ms: u64,
    pub source: &'a Source,
    /// `uincall-enricher/<version>`.
    pub enricher: &'static str,
    /// Set when the answer was another record's of the same session:
    /// `in_flight` (its call was under way), `recent` (it was kept,
    /// `api.recent_answers_ttl`). `fetched_at`, `attempts` and
    /// `api_latency_ms` are then that call's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused: Option<&'static str>,
}

pub const ENRICHER: &str = concat!("uincall-enricher/", env!("CARGO_PKG_VERSION"));

/// Decodes the coded fields of a call.
pub fn labels_for(call: &CallDetail, satisfaction_labels: &BTreeMap<String, String>) -> Labels {
    Labels {
        hangup_reason: call.hangup_reason.map(labels::hangup_reason),
        hangup_party: call.hangup_party.map(labels::hangup_party),
        call_direction: call.call_direction.as_deref().map(labels::call_direction),
        satisfaction: call
            .satisfaction
            .map(|s| labels::satisfaction(s, satisfaction_labels)),
        fragments: call
            .lists
            .iter()
            .map(|f| FragmentLabels {
                app_type: f.app_type.as_deref().map(labels::app_type),
                call_direction: f.call_direction.as_deref().map(labels::call_direction),
            })
            .collect(),
    }
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Everything needed to write one enriched record.
pub struct Inputs<'a> {
    pub session_id: &'a str,
    pub tenant_id: &'a str,
    pub event: &'a Value,
    pub call: &'a CallDetail,
    pub satisfaction_labels: &'a BTreeMap<String, String>,
    pub fetched_at: DateTime<Utc>,
    pub attempts: u32,
    pub api_latency: Duration,
    pub source: &'a Source,
    /// See [`Enrichment::reused`].
    pub reused: Option<&'static str>,
}

/// Serialises the enriched record.
pub fn to_json(i: &Inputs<'_>) -> Vec<u8> {
    let record = EnrichedRecord {
        schema_version: SCHEMA_VERSION,
        session_id: i.session_id,
        tenant_id: i.tenant_id,
        event: i.event,
        call: i.call,
        labels: labels_for(i.call, i.satisfaction_labels),
        enrichment: Enrichment {
            fetched_at: rfc3339(i.fetched_at),
            attempts: i.attempts,
            api_latency_ms: i.api_latency.as_millis() as u64,
            source: i.source,
            enricher: ENRICHER,
            reused: i.reused,
        },
    };
    serde_json::to_vec(&record).expect("records serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detail::Envelope;

    #[test]
    fn cloudevents_name_the_shipped_schema_and_the_session() {
        let schema: serde_json::Value = serde_json::from_str(include_str!(
            "../docs/schema/enriched-record.v1.schema.json"
        ))
        .unwrap();
        assert_eq!(schema["$id"], SCHEMA_ID);
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00.5+08:00").unwrap();
        let hs = cloudevents_headers("/uincall-enricher", "s-1", at.into());
        let want = [
            ("ce_specversion", "1.0"),
            ("ce_id", "s-1"),
            ("ce_source", "/uincall-enricher"),
            ("ce_type", "com.uincall.call.enriched.v1"),
            ("ce_time", "2026-11-25T02:00:00.500Z"),
            ("ce_subject", "s-1"),
            ("ce_dataschema", SCHEMA_ID),
        ];
        let got: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(got, want);
    }

    pub fn spec_detail() -> CallDetail {
        let env: Envelope =
            serde_json::from_str(include_str!("../tests/fixtures/spec_example_response.json"))
                .unwrap();
        env.detail().unwrap().unwrap()
    }

    #[test]
    fn record_carries_event_call_labels_and_metadata() {
        let call = spec_detail();
        let event = serde_json::json!({"session_id": "s-1", "tenant_id": "t-1"});
        let source = Source {
            topic: "in".into(),
            partition: 2,
            offset: 41,
            timestamp_ms: Some(1_700_000_000_000),
        };
        let sat = BTreeMap::from([("2".to_string(), "满意".to_string())]);
        let bytes = to_json(&Inputs {
            session_id: "s-1",
            tenant_id: "t-1",
            event: &event,
            call: &call,
            satisfaction_labels: &sat,
            fetched_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
                .unwrap()
                .into(),
            attempts: 3,
            api_latency: Duration::from_millis(52),
            source: &source,
            reused: Some("recent"),
        });
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["event"], event);
        assert_eq!(v["call"]["lists"][0]["service_time"], 90);
        assert_eq!(v["call"]["lists"][0]["customer_name"], "多个匹配客户");
        assert_eq!(v["call"]["remark"], Value::Null);
        assert_eq!(v["labels"]["hangup_reason"]["name"], "outbound_failed");
        assert_eq!(v["labels"]["hangup_reason"]["label"], "外呼失败");
        assert_eq!(v["labels"]["call_direction"]["name"], "outbound");
        assert_eq!(v["labels"]["satisfaction"]["label"], "满意");
        assert_eq!(v["labels"]["fragments"][0]["app_type"]["name"], "agent");
        assert_eq!(v["enrichment"]["fetched_at"], "2026-01-02T03:04:05.678Z");
        assert_eq!(v["enrichment"]["attempts"], 3);
        assert_eq!(v["enrichment"]["api_latency_ms"], 52);
        assert_eq!(v["enrichment"]["source"]["offset"], 41);
        assert_eq!(v["enrichment"]["reused"], "recent");
    }
}
