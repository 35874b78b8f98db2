//! What a push from Uincall asks for, decided from its kind, its query and
//! its body alone (no I/O): forward it to the input topic, answer it without
//! forwarding, or refuse it with a reason.

use serde_json::Value;

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

/// Why a push is refused (400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the body is not a JSON object")]
    NotJson,
    #[error("the body has no session_id")]
    NoSessionId,
    #[error("the body's tenant_id is not the tenant of the push URL")]
    OtherTenant,
}

/// Decides what to do with a push of `kind` for `tenant` (the one its URL
/// authenticated), `record_type` the query's `type`.
pub fn decide(
    kind: Kind,
    record_type: Option<&str>,
    body: &[u8],
    tenant: &str,
    forward_commands: &[String],
) -> Result<Decision, Refusal> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(Refusal::NotJson);
    };
    let text = |name: &str| match fields.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let session_id = text("session_id").ok_or(Refusal::NoSessionId)?;
    if let Some(claimed) = text("tenant_id")
        && claimed != tenant
    {
        return Err(Refusal::OtherTenant);
    }
    match kind {
        Kind::CallEvent => match text("command") {
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

    #[test]
    fn a_hangup_event_is_forwarded_and_other_commands_are_not() {
        let body = br#"{"session_id":"s-1","tenant_id":"t","command":"call_hangup","dir":"UP"}"#;
        assert_eq!(
            decide(Kind::CallEvent, None, body, "t", &hangup()),
            Ok(Decision::Forward {
                session_id: "s-1".into(),
                what: "call_hangup".into()
            })
        );
        let body = br#"{"session_id":"s-1","tenant_id":"t","command":"call_talking"}"#;
        assert_eq!(
            decide(Kind::CallEvent, None, body, "t", &hangup()),
            Ok(Decision::Ignore {
                why: "command call_talking".into()
            })
        );
    }

    #[test]
    fn only_whole_session_records_are_forwarded() {
        let body = br#"{"session_id":12345}"#;
        assert_eq!(
            decide(Kind::CallRecord, Some("1"), body, "t", &hangup()),
            Ok(Decision::Forward {
                session_id: "12345".into(),
                what: "type=1".into()
            })
        );
        for t in [Some("0"), None] {
            assert!(matches!(
                decide(Kind::CallRecord, t, body, "t", &hangup()),
                Ok(Decision::Ignore { .. })
            ));
        }
    }

    #[test]
    fn bodies_without_a_session_or_of_another_tenant_are_refused() {
        let cases: [(&[u8], Refusal); 5] = [
            (b"not json", Refusal::NotJson),
            (b"[1,2]", Refusal::NotJson),
            (br#"{"tenant_id":"t"}"#, Refusal::NoSessionId),
            (br#"{"session_id":"  "}"#, Refusal::NoSessionId),
            (
                br#"{"session_id":"s","tenant_id":"someone-else"}"#,
                Refusal::OtherTenant,
            ),
        ];
        for (body, refusal) in cases {
            assert_eq!(
                decide(Kind::CallEvent, None, body, "t", &hangup()),
                Err(refusal)
            );
        }
    }
}
