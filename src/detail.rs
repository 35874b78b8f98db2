//! The call record returned by `GET /openapi/call/v2/detail/{session_id}`,
//! normalised to stable types.
//!
//! The API documents some numbers as strings and sends them as numbers (and
//! the reverse); `""` and `null` both mean "none". Every known field is read
//! leniently into one type, and every unknown field is kept as it came.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The answer envelope: `errcode` 0 means success.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(deserialize_with = "lenient::required_i64")]
    pub errcode: i64,
    #[serde(default, deserialize_with = "lenient::string")]
    pub errmsg: Option<String>,
    /// Kept as text and read straight into [`CallDetail`]: no
    /// intermediate tree.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

impl Envelope {
    /// The record in `data`; `None` means "no record yet".
    pub fn detail(&self) -> Result<Option<CallDetail>, serde_json::Error> {
        self.data
            .as_deref()
            .map_or(Ok(None), |d| CallDetail::from_json(d.get()))
    }
}

/// One call (呼叫会话记录).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CallDetail {
    #[serde(default, deserialize_with = "lenient::string")]
    pub session_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::i64")]
    pub call_type: Option<i64>,
    /// Call tags: `{"tags": [[id, …], …]}` or none.
    #[serde(default, deserialize_with = "lenient::object")]
    pub tags: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub summary: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub remark: Option<String>,
    /// `call in` or `call out`.
    #[serde(default, deserialize_with = "lenient::string")]
    pub call_direction: Option<String>,
    /// Consecutive unanswered inbound calls; none for outbound calls.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub ignore_times: Option<i64>,
    /// Satisfaction score 1..4.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub satisfaction: Option<i64>,
    /// URL of the recording.
    #[serde(default, deserialize_with = "lenient::string")]
    pub record_file: Option<String>,
    /// The call's fragments (IVR, queue, agent legs).
    #[serde(default, deserialize_with = "lenient::vec")]
    pub lists: Vec<CallFragment>,
    /// Call trail: `{"rows": [{recDesc, starttime, command, …}]}`.
    #[serde(default, deserialize_with = "lenient::object")]
    pub app_node_list: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub is_repeat: Option<bool>,
    /// Repeat-call window in hours (0, 24, 48).
    #[serde(default, deserialize_with = "lenient::i64")]
    pub cycle_period: Option<i64>,
    #[serde(default, deserialize_with = "lenient::i64")]
    pub call_in_today_num: Option<i64>,
    #[serde(default, deserialize_with = "lenient::i64")]
    pub call_in_all_num: Option<i64>,
    /// Forms submitted by agents during the call.
    #[serde(default, deserialize_with = "lenient::vec")]
    pub associate_datas: Vec<Value>,
    /// Hang-up reason code (ver=1): 1, -1, -2, 2..5, 430..455, 500..505.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub hangup_reason: Option<i64>,
    /// Who hung up (ver=1): 1 customer, 2 agent, 4 system.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub hangup_party: Option<i64>,
    /// Fields this version does not know, kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One fragment of a call (呼叫片段).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CallFragment {
    #[serde(default, deserialize_with = "lenient::string")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub customer_id: Option<String>,
    /// Customer name: the spec calls it `truename`, the API also sends
    /// `customer_name`; both are read and this holds whichever is set.
    #[serde(default, deserialize_with = "lenient::string")]
    pub customer_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::string", skip_serializing)]
    pub truename: Option<String>,
    /// loginout, callmemory, app (IVR), queue, agent.
    #[serde(default, deserialize_with = "lenient::string")]
    pub app_type: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub service_type: Option<String>,
    /// Business number (the spec's spelling).
    #[serde(default, deserialize_with = "lenient::string")]
    pub bussiness_num: Option<String>,
    /// When handling started (the spec's spelling).
    #[serde(default, deserialize_with = "lenient::string")]
    pub alterting_time: Option<String>,
    /// Service duration in seconds.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub service_time: Option<i64>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub service_start_time: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub service_stop_time: Option<String>,
    /// Queueing time in seconds.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub queue_time: Option<i64>,
    /// Ringing time in seconds.
    #[serde(default, deserialize_with = "lenient::i64")]
    pub ringing_time: Option<i64>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub answer_time: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub ani: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub ani_place: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub dnis: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub dnis_place: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub call_direction: Option<String>,
    /// Service quality tag.
    #[serde(default, deserialize_with = "lenient::string")]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub agent_num: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub agent_name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CallDetail {
    /// Reads the envelope's `data`, given as JSON text. The spec calls it
    /// an object array and shows an object: both are accepted. `None` means
    /// "no record yet" (`{}`, `[]`, `null`, `""`).
    pub fn from_json(data: &str) -> Result<Option<CallDetail>, serde_json::Error> {
        let text = data.trim();
        let object = match text.as_bytes().first() {
            Some(b'{') if is_empty_object(text) => return Ok(None),
            Some(b'{') => text,
            Some(b'[') => match serde_json::from_str::<Vec<&RawValue>>(text)?.first() {
                None => return Ok(None),
                Some(first) => return CallDetail::from_object(first.get()).map(Some),
            },
            Some(b'n') | None => return Ok(None),
            Some(b'"') if text == "\"\"" => return Ok(None),
            _ => {
                let v: Value = serde_json::from_str(text)?;
                return Err(serde::de::Error::custom(format!(
                    "data is a {}, not an object",
                    kind(&v)
                )));
            }
        };
        CallDetail::from_object(object).map(Some)
    }

    /// [`CallDetail::from_json`] for a value already parsed.
    pub fn from_data(data: &Value) -> Result<Option<CallDetail>, serde_json::Error> {
        CallDetail::from_json(&data.to_string())
    }

    fn from_object(text: &str) -> Result<CallDetail, serde_json::Error> {
        let mut detail: CallDetail = serde_json::from_str(text)?;
        for f in &mut detail.lists {
            if f.customer_name.is_none() {
                f.customer_name = f.truename.clone();
            }
        }
        Ok(detail)
    }
}

/// `{}` with any whitespace inside.
fn is_empty_object(text: &str) -> bool {
    text.strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .is_some_and(|inside| inside.trim().is_empty())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Deserialisers that accept the type variants the API is known to send.
mod lenient {
    use super::*;
    use serde::de::Error;

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => None,
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            other => {
                return Err(D::Error::custom(format!(
                    "expected a string, got {}",
                    kind(&other)
                )));
            }
        })
    }

    fn to_i64(v: &Value) -> Result<Option<i64>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| format!("{n} is not an integer")),
            Value::String(s) if s.trim().is_empty() => Ok(None),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| format!("{s:?} is not an integer")),
            other => Err(format!("expected an integer, got {}", kind(other))),
        }
    }

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        to_i64(&Value::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn required_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        to_i64(&Value::deserialize(d)?)
            .map_err(D::Error::custom)?
            .ok_or_else(|| D::Error::custom("errcode is empty"))
    }

    pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => None,
            Value::Bool(b) => Some(b),
            Value::Number(n) => Some(n.as_f64() != Some(0.0)),
            Value::String(s) => match s.trim() {
                "" => None,
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                other => return Err(D::Error::custom(format!("{other:?} is not a boolean"))),
            },
            other => {
                return Err(D::Error::custom(format!(
                    "expected a boolean, got {}",
                    kind(&other)
                )));
            }
        })
    }

    pub fn object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Object(m) => Some(m),
            Value::Null => None,
            Value::String(s) if s.trim().is_empty() => None,
            // Some fields are documented as strings holding JSON.
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(Value::Object(m)) => Some(m),
                _ => return Err(D::Error::custom("expected an object or JSON text of one")),
            },
            // An empty list stands for "none" in several PHP-style APIs.
            Value::Array(a) if a.is_empty() => None,
            other => {
                return Err(D::Error::custom(format!(
                    "expected an object, got {}",
                    kind(&other)
                )));
            }
        })
    }

    pub fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: serde::de::DeserializeOwned,
    {
        match Value::deserialize(d)? {
            Value::Null => Ok(Vec::new()),
            Value::String(s) if s.trim().is_empty() => Ok(Vec::new()),
            v @ Value::Array(_) => serde_json::from_value(v).map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "expected an array, got {}",
                kind(&other)
            ))),
        }
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
            d.tags.as_ref().unwrap()["tags"].as_array().unwrap().len(),
            2
        );
        assert_eq!(
            d.app_node_list.as_ref().unwrap()["rows"]
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
        assert_eq!(d.extra["brand_new"], json!({"x": 1}));
        assert_eq!(d.lists[0].extra["new_leg_field"], json!([1, 2]));
        let out = serde_json::to_value(&d).unwrap();
        assert_eq!(out["brand_new"], json!({"x": 1}));
        assert_eq!(out["lists"][0]["new_leg_field"], json!([1, 2]));
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
