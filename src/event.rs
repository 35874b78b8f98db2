//! The call-ended event: where session_id, tenant_id and call_type are found,
//! and why an event is unusable.

use serde_json::Value;

use crate::settings::EventSettings;

/// The header naming the tenant whose push URL a record came through (or
/// whose call list a backfill read); the worker takes it for an event
/// without a tenant field.
pub const TENANT_HEADER: &str = "uincall.tenant";

/// Set on a forwarded push the receiver has doubts about; its value says
/// which ([`NO_ACCESS_TOKEN`]).
pub const FLAG_HEADER: &str = "uincall.flag";

/// The tenant is not in `ingest.token_tenants`.
pub const NO_ACCESS_TOKEN: &str = "no_access_token";

/// The longest session or tenant id taken, in bytes. Uincall's ids are tens
/// of bytes; a longer one is refused rather than carried into keys, caches
/// and URLs.
pub const MAX_ID_BYTES: usize = 256;

/// A call-ended event that names a call the API can be asked about.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEnded {
    pub session_id: String,
    pub tenant_id: String,
    pub call_type: Option<i64>,
    /// The event as received, carried into the enriched record.
    pub raw: Value,
}

/// Why an event cannot be enriched; it goes to the dead-letter topic with
/// class `invalid_event` and this text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("event has no payload")]
    Empty,
    #[error("event is not JSON: {0}")]
    NotJson(String),
    #[error("event is not a JSON object")]
    NotObject,
    #[error("event has no `{0}`")]
    MissingField(String),
    #[error("event field `{0}` is not a non-empty string or number")]
    BadField(String),
    #[error(
        "event field `{0}` is a number that is not a whole number of at most 64 bits, which cannot be kept exactly; send it as a string"
    )]
    InexactNumber(String),
    #[error("event field `{field}` is {bytes} bytes long; an id may have at most {MAX_ID_BYTES}")]
    TooLong { field: String, bytes: usize },
    #[error("event has no `{0}` and no api.default_tenant is set")]
    NoTenant(String),
    #[error("no access token is configured for tenant `{0}`")]
    UnknownTenant(String),
}

fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |v, key| v.get(key))
}

/// A string id from a string or integer field, as written (an integer
/// beyond 64 bits or with a fraction is refused, never rounded); `None` when
/// absent or null.
fn id_field(root: &Value, path: &str) -> Result<Option<String>, InvalidEvent> {
    let id = match lookup(root, path) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(Value::Number(_)) => return Err(InvalidEvent::InexactNumber(path.to_string())),
        Some(_) => return Err(InvalidEvent::BadField(path.to_string())),
    };
    if id.len() > MAX_ID_BYTES {
        return Err(InvalidEvent::TooLong {
            field: path.to_string(),
            bytes: id.len(),
        });
    }
    Ok(Some(id))
}

/// Reads an event payload. Pure: no I/O, no token look-up.
pub fn parse_event(
    payload: Option<&[u8]>,
    fields: &EventSettings,
    default_tenant: Option<&str>,
) -> Result<CallEnded, InvalidEvent> {
    let bytes = payload
        .filter(|b| !b.is_empty())
        .ok_or(InvalidEvent::Empty)?;
    let raw: Value =
        serde_json::from_slice(bytes).map_err(|e| InvalidEvent::NotJson(e.to_string()))?;
    if !raw.is_object() {
        return Err(InvalidEvent::NotObject);
    }
    let session_id = id_field(&raw, &fields.session_id_field)?
        .ok_or_else(|| InvalidEvent::MissingField(fields.session_id_field.clone()))?;
    let tenant_id = match id_field(&raw, &fields.tenant_id_field)? {
        Some(t) => t,
        None => default_tenant
            .map(str::to_string)
            .ok_or_else(|| InvalidEvent::NoTenant(fields.tenant_id_field.clone()))?,
    };
    // call_type is optional: a value that is not an integer is ignored rather
    // than failing the event, since the API call works without it.
    let call_type = call_type(lookup(&raw, &fields.call_type_field));
    Ok(CallEnded {
        session_id,
        tenant_id,
        call_type,
        raw,
    })
}

/// A `call_type` value: an integer, or text holding one; anything else is
/// none.
pub fn call_type(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> EventSettings {
        EventSettings {
            session_id_field: "session_id".into(),
            tenant_id_field: "tenant_id".into(),
            call_type_field: "call_type".into(),
        }
    }

    #[test]
    fn reads_session_tenant_and_call_type() {
        let e = parse_event(
            Some(br#"{"session_id":"s-1","tenant_id":"t-1","call_type":"5","x":1}"#),
            &fields(),
            None,
        )
        .unwrap();
        assert_eq!(e.session_id, "s-1");
        assert_eq!(e.tenant_id, "t-1");
        assert_eq!(e.call_type, Some(5));
        assert_eq!(e.raw["x"], 1);
    }

    #[test]
    fn nested_fields_and_default_tenant() {
        let f = EventSettings {
            session_id_field: "data.sid".into(),
            ..fields()
        };
        let e = parse_event(Some(br#"{"data":{"sid":12345}}"#), &f, Some("t-d")).unwrap();
        assert_eq!(e.session_id, "12345");
        assert_eq!(e.tenant_id, "t-d");
        assert_eq!(e.call_type, None);
    }

    #[test]
    fn every_kind_of_bad_event_has_a_reason() {
        let f = fields();
        let cases: &[(Option<&[u8]>, InvalidEvent)] = &[
            (None, InvalidEvent::Empty),
            (Some(b""), InvalidEvent::Empty),
            (Some(b"[1,2]"), InvalidEvent::NotObject),
            (
                Some(br#"{"tenant_id":"t"}"#),
                InvalidEvent::MissingField("session_id".into()),
            ),
            (
                Some(br#"{"session_id":"  ","tenant_id":"t"}"#),
                InvalidEvent::BadField("session_id".into()),
            ),
            (
                Some(br#"{"session_id":{"a":1},"tenant_id":"t"}"#),
                InvalidEvent::BadField("session_id".into()),
            ),
            (
                Some(br#"{"session_id":"s"}"#),
                InvalidEvent::NoTenant("tenant_id".into()),
            ),
        ];
        for (payload, expected) in cases {
            assert_eq!(&parse_event(*payload, &f, None).unwrap_err(), expected);
        }
        assert!(matches!(
            parse_event(Some(b"not json"), &f, None),
            Err(InvalidEvent::NotJson(_))
        ));
    }

    #[test]
    fn numeric_ids_are_kept_exactly_or_refused() {
        let f = fields();
        let read = |body: &str| parse_event(Some(body.as_bytes()), &f, Some("t"));
        // Past 2^53 (where a double would round) and up to u64::MAX: exact.
        for n in [
            "9007199254740993",
            "18446744073709551615",
            "-9007199254740993",
        ] {
            let e = read(&format!(r#"{{"session_id":{n}}}"#)).unwrap();
            assert_eq!(e.session_id, n);
        }
        // Past 64 bits, or not whole: refused, never rounded into another id.
        for n in [
            "18446744073709551616",
            "123456789012345678901234567890",
            "1.5",
            "1e3",
        ] {
            assert_eq!(
                read(&format!(r#"{{"session_id":{n}}}"#)),
                Err(InvalidEvent::InexactNumber("session_id".into())),
                "{n}"
            );
        }
    }

    #[test]
    fn an_id_longer_than_the_cap_is_refused_with_its_length() {
        let f = fields();
        let at_cap = "s".repeat(MAX_ID_BYTES);
        let body = format!(r#"{{"session_id":"{at_cap}","tenant_id":"t"}}"#);
        assert_eq!(
            parse_event(Some(body.as_bytes()), &f, None)
                .unwrap()
                .session_id,
            at_cap
        );
        let body = format!(r#"{{"session_id":"{at_cap}x","tenant_id":"t"}}"#);
        let refused = parse_event(Some(body.as_bytes()), &f, None).unwrap_err();
        assert_eq!(
            refused,
            InvalidEvent::TooLong {
                field: "session_id".into(),
                bytes: MAX_ID_BYTES + 1
            }
        );
        assert!(refused.to_string().contains("257 bytes long"), "{refused}");
        let body = format!(
            r#"{{"session_id":"s","tenant_id":"{}"}}"#,
            "t".repeat(60_000)
        );
        assert!(matches!(
            parse_event(Some(body.as_bytes()), &f, None),
            Err(InvalidEvent::TooLong { .. })
        ));
    }
}
