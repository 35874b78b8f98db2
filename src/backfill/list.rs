//! Reading one page of the call list (查询通话记录V2.0). The answer's shape
//! is not documented beyond the usual envelope, so the reader is lenient:
//! the sessions are the list in `data`, or the one list of objects with a
//! `session_id` that `data` holds (under whatever name). An answer it
//! cannot read is an error naming the keys it saw (never a silent empty
//! page); a failed call is classified as the worker classifies its calls.

use serde_json::Value;

use crate::classify::{ApiAnswer, ApiFailure, ErrcodePolicy, Verdict, classify};

/// One session of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub session_id: String,
    pub call_type: Option<i64>,
}

/// Why a page gave no sessions.
#[derive(Debug, Clone, PartialEq)]
pub enum PageError {
    /// Worth another try after a backoff (transport error, HTTP error, an
    /// errcode not listed anywhere).
    Retry(ApiFailure),
    /// Too many calls: back off, not counted.
    RateLimited(ApiFailure),
    /// A systemic errcode: the API is unusable for this tenant.
    Systemic(ApiFailure),
    /// A permanent errcode: asking again gives the same answer.
    Permanent(ApiFailure),
    /// The answer came but its sessions cannot be found.
    Unreadable(String),
}

/// Names under which a list of sessions is looked for first.
const LIST_KEYS: [&str; 8] = [
    "list", "lists", "records", "rows", "items", "data", "result", "calls",
];

/// The sessions of one answer of the call list.
pub fn read_page(answer: &ApiAnswer, policy: &ErrcodePolicy) -> Result<Vec<Listed>, PageError> {
    if let ApiAnswer::Http { status, body, .. } = answer
        && (200..300).contains(status)
        && let Ok(Value::Object(envelope)) = serde_json::from_slice::<Value>(body)
    {
        match envelope.get("errcode") {
            Some(code) if is_zero(code) => {
                return match envelope.get("data") {
                    None | Some(Value::Null) => Ok(Vec::new()),
                    Some(data) => sessions(data).map_err(PageError::Unreadable),
                };
            }
            // A JSON object, but not the envelope: a shape this reader
            // does not know (a gateway's HTML page is retried below).
            None => {
                return Err(PageError::Unreadable(format!(
                    "the call list answered without an errcode: {}",
                    keys_of(answer)
                )));
            }
            Some(_) => {}
        }
    }
    Err(match classify(answer, policy) {
        Verdict::Retry(f) => PageError::Retry(f),
        Verdict::RateLimited(f) => PageError::RateLimited(f),
        Verdict::Systemic(f) => PageError::Systemic(f),
        Verdict::DeadLetter(f) => PageError::Permanent(f),
        // errcode 0 is handled above; a body that is JSON but not an
        // object with an errcode ends here.
        Verdict::Publish(_) => PageError::Unreadable(format!(
            "the call list answered without an errcode: {}",
            keys_of(answer)
        )),
    })
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_i64() == Some(0),
        Value::String(s) => s.trim() == "0",
        _ => false,
    }
}

/// The sessions in `data`: a list, or an object holding one.
fn sessions(data: &Value) -> Result<Vec<Listed>, String> {
    match data {
        Value::Array(items) => items.iter().map(listed).collect(),
        Value::Object(fields) => {
            let named = LIST_KEYS.iter().filter_map(|k| fields.get(*k));
            let others = fields.values();
            let found = named
                .chain(others)
                .find(|v| matches!(v, Value::Array(items) if items.iter().all(has_session)))
                .or_else(|| {
                    // One level down: `data: {data: {list: […]}}`.
                    fields
                        .values()
                        .find(|v| v.is_object() && sessions(v).is_ok())
                });
            match found {
                Some(v) => sessions(v),
                None => Err(format!(
                    "the call list answer holds no list of sessions: data has keys [{}]",
                    fields.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
            }
        }
        other => Err(format!(
            "the call list answer's data is {}, not a list of sessions",
            kind(other)
        )),
    }
}

fn has_session(item: &Value) -> bool {
    item.get("session_id").is_some_and(|v| id(v).is_some())
}

fn id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn listed(item: &Value) -> Result<Listed, String> {
    let Some(session_id) = item.get("session_id").and_then(id) else {
        let keys = match item {
            Value::Object(f) => format!(
                "keys [{}]",
                f.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            other => kind(other).to_string(),
        };
        return Err(format!(
            "a call list entry has no session_id: it has {keys}"
        ));
    };
    Ok(Listed {
        session_id,
        call_type: crate::event::call_type(item.get("call_type")),
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The top-level keys of an answer, for a message.
fn keys_of(answer: &ApiAnswer) -> String {
    let ApiAnswer::Http { body, .. } = answer else {
        return "no answer".into();
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(f)) => format!(
            "keys [{}]",
            f.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        Ok(other) => kind(&other).to_string(),
        Err(_) => "not JSON".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::tests::{http, policy};

    fn ids(body: &str) -> Result<Vec<String>, PageError> {
        read_page(&http(200, body), &policy())
            .map(|v| v.into_iter().map(|l| l.session_id).collect())
    }

    #[test]
    fn sessions_are_found_wherever_the_envelope_puts_them() {
        let want = Ok(vec!["a".to_string(), "7".to_string()]);
        assert_eq!(
            ids(r#"{"errcode":0,"data":[{"session_id":"a"},{"session_id":7}]}"#),
            want
        );
        assert_eq!(
            ids(r#"{"errcode":0,"data":{"total":2,"list":[{"session_id":"a"},{"session_id":7}]}}"#),
            want
        );
        assert_eq!(
            ids(
                r#"{"errcode":"0","errmsg":"ok","data":{"page":1,"calls_of_page":[{"session_id":"a"},{"session_id":7}]}}"#
            ),
            want
        );
        assert_eq!(
            ids(r#"{"errcode":0,"data":{"data":{"rows":[{"session_id":"a"},{"session_id":7}]}}}"#),
            want
        );
        assert_eq!(ids(r#"{"errcode":0,"data":[]}"#), Ok(vec![]));
        assert_eq!(
            ids(r#"{"errcode":0,"data":{"total":0,"list":[]}}"#),
            Ok(vec![])
        );
        assert_eq!(ids(r#"{"errcode":0,"data":null}"#), Ok(vec![]));
        let page = read_page(
            &http(
                200,
                r#"{"errcode":0,"data":[{"session_id":"a","call_type":"5"}]}"#,
            ),
            &policy(),
        )
        .unwrap();
        assert_eq!(page[0].call_type, Some(5));
    }

    #[test]
    fn an_answer_without_sessions_is_an_error_naming_what_it_saw() {
        let unreadable = |body: &str| match ids(body) {
            Err(PageError::Unreadable(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = unreadable(r#"{"errcode":0,"data":{"total":3,"calls":"three"}}"#);
        assert!(m.contains("data has keys [total, calls]"), "{m}");
        let m = unreadable(r#"{"errcode":0,"data":[{"id":"a","ani":"1"}]}"#);
        assert!(
            m.contains("no session_id") && m.contains("keys [id, ani]"),
            "{m}"
        );
        let m = unreadable(r#"{"errcode":0,"data":"none"}"#);
        assert!(m.contains("a string"), "{m}");
        let m = unreadable(r#"{"result":"ok"}"#);
        assert!(m.contains("keys [result]"), "{m}");
    }

    #[test]
    fn failures_are_classified_as_the_workers_calls_are() {
        let page = |status, body: &str| read_page(&http(status, body), &policy());
        assert!(matches!(
            page(200, r#"{"errcode":40001,"errmsg":"bad token"}"#),
            Err(PageError::Systemic(_))
        ));
        assert!(matches!(
            page(200, r#"{"errcode":503}"#),
            Err(PageError::RateLimited(_))
        ));
        assert!(matches!(
            page(200, r#"{"errcode":40004}"#),
            Err(PageError::Permanent(_))
        ));
        assert!(matches!(
            page(200, r#"{"errcode":1234}"#),
            Err(PageError::Retry(_))
        ));
        assert!(matches!(page(502, "bad gateway"), Err(PageError::Retry(_))));
        assert!(matches!(page(429, ""), Err(PageError::RateLimited(_))));
        assert!(matches!(page(200, "<html>"), Err(PageError::Retry(_))));
    }
}
