//! The call record returned by `GET /openapi/call/v2/detail/{session_id}`,
//! normalised to stable types.
//!
//! The API documents some numbers as strings and sends them as numbers (and
//! the reverse); `""` and `null` both mean "none". Every known field is read
//! leniently into one type, and every unknown field is kept as it came.

mod read;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The answer envelope: `errcode` 0 means success. `D` is how `data` is
/// read: kept as text (the default, read into [`CallDetail`] after) or
/// straight into the record ([`Answer`]).
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope<D = Option<Box<RawValue>>> {
    #[serde(deserialize_with = "read::required_i64")]
    pub errcode: i64,
    #[serde(default, deserialize_with = "read::string")]
    pub errmsg: Option<String>,
    #[serde(default)]
    pub data: D,
}

/// The whole answer in one pass. An answer this cannot read is read again
/// as an [`Envelope`] first and its `data` after, to tell a bad envelope
/// from a record that does not fit.
pub type Answer = Envelope<read::Data>;

impl Envelope {
    /// The record in `data`; `None` means "no record yet".
    pub fn detail(&self) -> Result<Option<CallDetail>, serde_json::Error> {
        self.data
            .as_deref()
            .map_or(Ok(None), |d| CallDetail::from_json(d.get()))
    }
}

/// JSON kept as the API wrote it: written into the enriched record as it
/// is, never read into a tree.
#[derive(Debug, Clone)]
pub struct Raw(pub Box<RawValue>);

impl Raw {
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The value, read.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.get()).expect("a raw value is JSON")
    }
}

impl PartialEq for Raw {
    fn eq(&self, other: &Raw) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for Raw {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Fields this version does not know, in the order received (a name given
/// twice keeps its last value).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extra(Vec<(String, Raw)>);

impl Extra {
    pub fn get(&self, name: &str) -> Option<&Raw> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    fn insert(&mut self, name: String, value: Raw) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, old)) => *old = value,
            None => self.0.push((name, value)),
        }
    }
}

impl Serialize for Extra {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// One call (呼叫会话记录).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CallDetail {
    pub session_id: Option<String>,
    pub call_type: Option<i64>,
    /// Call tags: `{"tags": [[id, …], …]}` or none.
    pub tags: Option<Raw>,
    pub summary: Option<String>,
    pub remark: Option<String>,
    /// `call in` or `call out`.
    pub call_direction: Option<String>,
    /// Consecutive unanswered inbound calls; none for outbound calls.
    pub ignore_times: Option<i64>,
    /// Satisfaction score 1..4.
    pub satisfaction: Option<i64>,
    /// URL of the recording.
    pub record_file: Option<String>,
    /// The call's fragments (IVR, queue, agent legs).
    pub lists: Vec<CallFragment>,
    /// Call trail: `{"rows": [{recDesc, starttime, command, …}]}`.
    pub app_node_list: Option<Raw>,
    pub is_repeat: Option<bool>,
    /// Repeat-call window in hours (0, 24, 48).
    pub cycle_period: Option<i64>,
    pub call_in_today_num: Option<i64>,
    pub call_in_all_num: Option<i64>,
    /// Forms submitted by agents during the call.
    pub associate_datas: Vec<Raw>,
    /// Hang-up reason code (ver=1): 1, -1, -2, 2..5, 430..455, 500..505.
    pub hangup_reason: Option<i64>,
    /// Who hung up (ver=1): 1 customer, 2 agent, 4 system.
    pub hangup_party: Option<i64>,
    /// Fields this version does not know, kept as received.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One fragment of a call (呼叫片段).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CallFragment {
    pub id: Option<String>,
    pub customer_id: Option<String>,
    /// Customer name: the spec calls it `truename`, the API also sends
    /// `customer_name`; both are read and this holds whichever is set.
    pub customer_name: Option<String>,
    #[serde(skip_serializing)]
    pub truename: Option<String>,
    /// loginout, callmemory, app (IVR), queue, agent.
    pub app_type: Option<String>,
    pub service_type: Option<String>,
    /// Business number (the spec's spelling).
    pub bussiness_num: Option<String>,
    /// When handling started (the spec's spelling).
    pub alterting_time: Option<String>,
    /// Service duration in seconds.
    pub service_time: Option<i64>,
    pub service_start_time: Option<String>,
    pub service_stop_time: Option<String>,
    /// Queueing time in seconds.
    pub queue_time: Option<i64>,
    /// Ringing time in seconds.
    pub ringing_time: Option<i64>,
    pub answer_time: Option<String>,
    pub ani: Option<String>,
    pub ani_place: Option<String>,
    pub dnis: Option<String>,
    pub dnis_place: Option<String>,
    pub call_direction: Option<String>,
    /// Service quality tag.
    pub title: Option<String>,
    pub agent_num: Option<String>,
    pub agent_name: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl CallDetail {
    /// Reads the envelope's `data`, given as JSON text. The spec calls it
    /// an object array and shows an object: both are accepted. `None` means
    /// "no record yet" (`{}`, `[]`, `null`, `""`).
    pub fn from_json(data: &str) -> Result<Option<CallDetail>, serde_json::Error> {
        serde_json::from_str::<read::Data>(data).map(|d| d.0)
    }

    /// [`CallDetail::from_json`] for a value already parsed.
    pub fn from_data(data: &Value) -> Result<Option<CallDetail>, serde_json::Error> {
        CallDetail::from_json(&data.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec's example answer, with the one trailing comma the document
    /// has (after `associate_datas`) removed.
    pub const SPEC_EXAMPLE: &str = include_str!("../tests/fixtures/spec_example_response.json");

    #[test]
    fn parses_the_spec_example() {
        let env: Envelope = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        assert_eq!(env.errcode, 0);
        let d = env.detail().unwrap().unwrap();
        assert_eq!(
            d.session_id.as_deref(),
            Some("676dxxxx-xxxx-xxxx-xxxx-xxxxxxxxb334")
        );
        assert_eq!(d.call_type, Some(4)); // sent as "4"
        assert_eq!(d.satisfaction, Some(2));
        assert_eq!(d.hangup_reason, Some(5));
        assert_eq!(d.remark, None); // "" means none
        assert_eq!(d.cycle_period, None);
        assert_eq!(d.is_repeat, Some(false));
        assert_eq!(d.lists.len(), 1);
        let f = &d.lists[0];
        assert_eq!(f.customer_id, None);
        assert_eq!(f.customer_name.as_deref(), Some("多个匹配客户"));
        assert_eq!(f.service_time, Some(90)); // documented as string, sent as number
        assert_eq!(f.ringing_time, Some(7));
        assert_eq!(
            d.tags.as_ref().unwrap().value()["tags"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            d.app_node_list.as_ref().unwrap().value()["rows"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(d.associate_datas.len(), 2);
    }

    #[test]
    fn type_variants_are_normalised() {
        let d = CallDetail::from_data(&json!({
            "satisfaction": "3", "hangup_reason": "430", "hangup_party": "",
            "ignore_times": null, "is_repeat": "true", "tags": null, "lists": null,
            "record_file": "", "cycle_period": 24.0,
            "associate_datas": "",
        }))
        .unwrap()
        .unwrap();
        assert_eq!(d.satisfaction, Some(3));
        assert_eq!(d.hangup_reason, Some(430));
        assert_eq!(d.hangup_party, None);
        assert_eq!(d.is_repeat, Some(true));
        assert_eq!(d.tags, None);
        assert_eq!(d.record_file, None);
        assert_eq!(d.cycle_period, Some(24));
        assert!(d.lists.is_empty() && d.associate_datas.is_empty());
        let f: CallFragment = serde_json::from_value(
            json!({"truename": "未知客户", "service_time": "12", "agent_num": 1001}),
        )
        .unwrap();
        assert_eq!(f.service_time, Some(12));
        assert_eq!(f.agent_num.as_deref(), Some("1001"));
    }

    #[test]
    fn truename_fills_customer_name() {
        let d = CallDetail::from_data(&json!({"lists": [{"truename": "未知客户"}]}))
            .unwrap()
            .unwrap();
        assert_eq!(d.lists[0].customer_name.as_deref(), Some("未知客户"));
    }

    #[test]
    fn unknown_fields_are_kept() {
        let d = CallDetail::from_data(&json!({
            "session_id": "s", "brand_new": {"x": 1},
            "lists": [{"id": "f", "new_leg_field": [1, 2]}]
        }))
        .unwrap()
        .unwrap();
        assert_eq!(d.extra.get("brand_new").unwrap().value(), json!({"x": 1}));
        assert_eq!(
            d.lists[0].extra.get("new_leg_field").unwrap().value(),
            json!([1, 2])
        );
        let out = serde_json::to_value(&d).unwrap();
        assert_eq!(out["brand_new"], json!({"x": 1}));
        assert_eq!(out["lists"][0]["new_leg_field"], json!([1, 2]));
    }

    #[test]
    fn passed_on_fields_keep_their_text_and_their_lenient_forms() {
        let d = CallDetail::from_json(
            r#"{"tags": "{\"tags\": [[\"a\"]]}", "app_node_list": [], "extra": 1, "extra": {"b": 2}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            d.tags.unwrap().get(),
            r#"{"tags": [["a"]]}"#,
            "JSON text of an object"
        );
        assert_eq!(d.app_node_list, None, "an empty list is none");
        assert_eq!(
            d.extra.get("extra").unwrap().get(),
            r#"{"b": 2}"#,
            "the last of a name"
        );
        let out =
            serde_json::to_string(&CallDetail::from_json(r#"{"x": [1, 2]}"#).unwrap()).unwrap();
        assert!(out.ends_with(r#""x":[1, 2]}"#), "written as it came: {out}");
        for bad in [
            r#"{"tags": 5}"#,
            r#"{"tags": [1]}"#,
            r#"{"tags": "[1]"}"#,
            r#"{"tags": true}"#,
        ] {
            assert!(CallDetail::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn data_as_array_object_or_nothing() {
        assert!(CallDetail::from_data(&json!([])).unwrap().is_none());
        assert!(CallDetail::from_data(&json!({})).unwrap().is_none());
        assert!(CallDetail::from_data(&Value::Null).unwrap().is_none());
        let d = CallDetail::from_data(&json!([{"session_id": "a"}]))
            .unwrap()
            .unwrap();
        assert_eq!(d.session_id.as_deref(), Some("a"));
        assert!(CallDetail::from_data(&json!(42)).is_err());
    }

    #[test]
    fn wrong_types_are_errors_not_panics() {
        assert!(CallDetail::from_data(&json!({"satisfaction": "very"})).is_err());
        assert!(CallDetail::from_data(&json!({"lists": {"a": 1}})).is_err());
    }
}
