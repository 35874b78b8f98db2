//! What a push from Uincall asks for, decided from its kind, its query and
//! its body alone (no I/O): forward it to the input topic, answer it without
//! forwarding, or refuse it with a reason. The body is read as the worker
//! will read it ([`parse_event`] with the same `event.*` fields), so what is
//! forwarded is what the worker enriches, for the tenant whose URL took it.

use serde_json::Value;

use crate::event::{InvalidEvent, parse_event};
use crate::settings::EventSettings;

/// The two pushes Uincall sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 通话事件推送: one per call state change, `command` says which.
    CallEvent,
    /// 通话记录推送: `?type=0` per call leg, `?type=1` the whole session
    /// after the call ended.
    CallRecord,
}

impl Kind {
    /// The last segment of the push URL.
    pub fn from_path(segment: &str) -> Option<Kind> {
        match segment {
            "call-event" => Some(Kind::CallEvent),
            "call-record" => Some(Kind::CallRecord),
            _ => None,
        }
    }

    /// The metric label and the `uincall.source` header's suffix.
    pub fn name(self) -> &'static str {
        match self {
            Kind::CallEvent => "call-event",
            Kind::CallRecord => "call-record",
        }
    }
}

/// What to do with a push.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// A call ended: write the body to the input topic under this key.
    /// `what` (the command, or the record type) tells a repeat of this
    /// push from another push of the session.
    Forward { session_id: String, what: String },
    /// Answered and counted, not forwarded (another command, a leg's
    /// record).
    Ignore { why: String },
}

/// Why a push is refused (400): the reason the worker would dead-letter it
/// for, or a body naming another tenant than its URL.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),
    #[error("the body's `{0}` names another tenant than the push URL")]
    OtherTenant(String),
}

/// Decides what to do with a push of `kind` for `tenant` (the one its URL
/// authenticated), `record_type` the query's `type`; session and tenant are
/// where `fields` say, the tenant defaulting to the URL's as the worker's
/// does (`uincall.tenant`).
pub fn decide(
    kind: Kind,
    record_type: Option<&str>,
    body: &[u8],
    tenant: &str,
    fields: &EventSettings,
    forward_commands: &[String],
) -> Result<Decision, Refusal> {
    let event = parse_event(Some(body), fields, Some(tenant))?;
    if event.tenant_id != tenant {
        return Err(Refusal::OtherTenant(fields.tenant_id_field.clone()));
    }
    let session_id = event.session_id;
    // Uincall's own field, whatever the event.* settings say.
    let command = match event.raw.get("command") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    };
    match kind {
        Kind::CallEvent => match command {
            Some(command) if forward_commands.contains(&command) => Ok(Decision::Forward {
                session_id,
                what: command,
            }),
            Some(command) => Ok(Decision::Ignore {
                why: format!("command {command}"),
            }),
            None => Ok(Decision::Ignore {
                why: "no command".into(),
            }),
        },
        Kind::CallRecord => match record_type.map(str::trim) {
            Some("1") => Ok(Decision::Forward {
                session_id,
                what: "type=1".into(),
            }),
            Some(t) => Ok(Decision::Ignore {
                why: format!("record type {t}"),
            }),
            None => Ok(Decision::Ignore {
                why: "record without type".into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hangup() -> Vec<String> {
        vec!["call_hangup".to_string()]
    }

    use super::super::tests::event_fields as fields;

    #[test]
    fn a_hangup_event_is_forwarded_and_other_commands_are_not() {
        let body = br#"{"session_id":"s-1","tenant_id":"t","command":"call_hangup","dir":"UP"}"#;
        assert_eq!(
            decide(Kind::CallEvent, None, body, "t", &fields(), &hangup()),
            Ok(Decision::Forward {
                session_id: "s-1".into(),
                what: "call_hangup".into()
            })
        );
        let body = br#"{"session_id":"s-1","tenant_id":"t","command":"call_talking"}"#;
        assert_eq!(
            decide(Kind::CallEvent, None, body, "t", &fields(), &hangup()),
            Ok(Decision::Ignore {
                why: "command call_talking".into()
            })
        );
    }

    #[test]
    fn only_whole_session_records_are_forwarded() {
        let body = br#"{"session_id":12345}"#;
        assert_eq!(
            decide(Kind::CallRecord, Some("1"), body, "t", &fields(), &hangup()),
            Ok(Decision::Forward {
                session_id: "12345".into(),
                what: "type=1".into()
            })
        );
        for t in [Some("0"), None] {
            assert!(matches!(
                decide(Kind::CallRecord, t, body, "t", &fields(), &hangup()),
                Ok(Decision::Ignore { .. })
            ));
        }
    }

    #[test]
    fn bodies_without_a_session_or_of_another_tenant_are_refused() {
        let field = |f: &str| f.to_string();
        let cases: [(&[u8], Refusal); 5] = [
            (b"[1,2]", InvalidEvent::NotObject.into()),
            (
                br#"{"tenant_id":"t"}"#,
                InvalidEvent::MissingField(field("session_id")).into(),
            ),
            (
                br#"{"session_id":"  "}"#,
                InvalidEvent::BadField(field("session_id")).into(),
            ),
            (
                br#"{"session_id":"s","tenant_id":"someone-else"}"#,
                Refusal::OtherTenant(field("tenant_id")),
            ),
            (
                br#"{"session_id":1e300}"#,
                InvalidEvent::InexactNumber(field("session_id")).into(),
            ),
        ];
        for (body, refusal) in cases {
            assert_eq!(
                decide(Kind::CallEvent, None, body, "t", &fields(), &hangup()),
                Err(refusal)
            );
        }
        assert!(matches!(
            decide(
                Kind::CallEvent,
                None,
                b"not json",
                "t",
                &fields(),
                &hangup()
            ),
            Err(Refusal::Invalid(InvalidEvent::NotJson(_)))
        ));
    }

    #[test]
    fn session_and_tenant_are_read_where_the_event_settings_say() {
        let fields = EventSettings {
            session_id_field: "data.sessionId".into(),
            tenant_id_field: "tenantId".into(),
            ..fields()
        };
        let decide = |body: &str| {
            decide(
                Kind::CallEvent,
                None,
                body.as_bytes(),
                "a",
                &fields,
                &hangup(),
            )
        };
        // The configured session field, not a top-level session_id.
        assert_eq!(
            decide(r#"{"data":{"sessionId":"s-1"},"session_id":"x","command":"call_hangup"}"#),
            Ok(Decision::Forward {
                session_id: "s-1".into(),
                what: "call_hangup".into()
            })
        );
        // Another tenant in the configured field is refused, whatever the
        // top-level tenant_id says; tenant_id alone is not read.
        assert_eq!(
            decide(r#"{"data":{"sessionId":"s"},"tenantId":"b","tenant_id":"a","command":"c"}"#),
            Err(Refusal::OtherTenant("tenantId".into()))
        );
        assert!(
            decide(r#"{"data":{"sessionId":"s"},"tenantId":"a","tenant_id":"b","command":"c"}"#)
                .is_ok()
        );
        assert_eq!(
            decide(r#"{"session_id":"s-1","command":"call_hangup"}"#),
            Err(InvalidEvent::MissingField("data.sessionId".into()).into())
        );
    }
}
