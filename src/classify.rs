//! One pure function decides what an API answer means: publish, retry later,
//! or dead-letter now, always with a reason.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use crate::detail::{Answer, CallDetail, Envelope};

/// What came back from one API call, before any interpretation.
#[derive(Debug, Clone)]
pub enum ApiAnswer {
    /// The server answered. `retry_after` is the parsed `Retry-After` header.
    Http {
        status: u16,
        retry_after: Option<Duration>,
        body: Bytes,
    },
    /// No answer: the message never contains the URL (it carries the token).
    Transport {
        kind: TransportKind,
        message: String,
    },
}

impl ApiAnswer {
    /// Whether this answer says the API is unreachable or broken as a whole
    /// (no answer, or HTTP 5xx) rather than anything about one record.
    pub fn is_outage(&self) -> bool {
        match self {
            ApiAnswer::Transport { .. } => true,
            ApiAnswer::Http { status, .. } => *status >= 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Timeout,
    Connect,
    Other,
}

/// Why a call did not give a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub reason: String,
    pub http_status: Option<u16>,
    pub errcode: Option<i64>,
    pub errmsg: Option<String>,
    pub retry_after: Option<Duration>,
}

impl ApiFailure {
    /// A failure known only by its reason.
    pub fn new(reason: impl Into<String>) -> Self {
        ApiFailure {
            reason: reason.into(),
            http_status: None,
            errcode: None,
            errmsg: None,
            retry_after: None,
        }
    }

    /// Replaces every occurrence of `secret` in the texts of this failure.
    pub fn redact(mut self, secret: &str) -> Self {
        if secret.is_empty() {
            return self;
        }
        self.reason = self.reason.replace(secret, "[redacted]");
        self.errmsg = self.errmsg.map(|m| m.replace(secret, "[redacted]"));
        self
    }
}

/// The decision for one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Publish(Box<CallDetail>),
    Retry(ApiFailure),
    DeadLetter(ApiFailure),
    /// The API is unusable for everyone (a systemic errcode): not this
    /// record's failure; the call does not count as an attempt.
    Systemic(ApiFailure),
    /// Too many calls (HTTP 429 or a rate-limited errcode): the tenant backs
    /// off; the call does not count as an attempt.
    RateLimited(ApiFailure),
}

impl Verdict {
    /// The failure, for every verdict but `Publish`.
    pub fn failure(&self) -> Option<&ApiFailure> {
        match self {
            Verdict::Publish(_) => None,
            Verdict::Retry(f)
            | Verdict::DeadLetter(f)
            | Verdict::Systemic(f)
            | Verdict::RateLimited(f) => Some(f),
        }
    }

    /// Removes `secret` from the failure texts, whatever the server echoed.
    pub fn redact(self, secret: &str) -> Self {
        match self {
            Verdict::Publish(d) => Verdict::Publish(d),
            Verdict::Retry(f) => Verdict::Retry(f.redact(secret)),
            Verdict::DeadLetter(f) => Verdict::DeadLetter(f.redact(secret)),
            Verdict::Systemic(f) => Verdict::Systemic(f.redact(secret)),
            Verdict::RateLimited(f) => Verdict::RateLimited(f.redact(secret)),
        }
    }
}

/// What errcodes mean. Unknown non-zero errcodes are retried: the record may
/// not be written yet when the call-ended event arrives.
#[derive(Debug, Clone, Default)]
pub struct ErrcodePolicy {
    pub permanent: HashSet<i64>,
    pub systemic: HashSet<i64>,
    pub rate_limited: HashSet<i64>,
}

impl ErrcodePolicy {
    pub fn from_settings(r: &crate::settings::RetrySettings) -> Self {
        ErrcodePolicy {
            permanent: r.permanent_errcodes.iter().copied().collect(),
            systemic: r.systemic_errcodes.iter().copied().collect(),
            rate_limited: r.rate_limited_errcodes.iter().copied().collect(),
        }
    }
}

const BODY_SNIPPET: usize = 200;

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(BODY_SNIPPET).collect();
    if text.chars().count() > BODY_SNIPPET {
        s.push('…');
    }
    s
}

/// Classifies one answer. Pure: same input, same verdict.
pub fn classify(answer: &ApiAnswer, policy: &ErrcodePolicy) -> Verdict {
    let (status, retry_after, body) = match answer {
        ApiAnswer::Transport { kind, message } => return transport_failure(*kind, message),
        ApiAnswer::Http {
            status,
            retry_after,
            body,
        } => (*status, *retry_after, body),
    };
    if !(200..300).contains(&status) {
        return http_failure(status, retry_after, body);
    }
    // One pass for the usual answer; what it cannot read is read again in
    // two steps, to tell a bad envelope from a record that does not fit.
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(_) => return classify_in_steps(status, retry_after, body, policy),
    };
    let data = answer.data.0;
    let read = (answer.errcode, answer.errmsg);
    envelope_verdict(status, retry_after, read, move || Ok(data), policy)
}

/// [`classify`] for a 2xx answer read in two steps: the envelope (its
/// `data` kept as text), then the record.
fn classify_in_steps(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    policy: &ErrcodePolicy,
) -> Verdict {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            let mut f = ApiFailure::new(format!(
                "answer is not a JSON envelope ({e}): {}",
                snippet(body)
            ));
            f.http_status = Some(status);
            return Verdict::Retry(f);
        }
    };
    let read = (envelope.errcode, envelope.errmsg.clone());
    envelope_verdict(status, retry_after, read, || envelope.detail(), policy)
}

/// What a 2xx answer's envelope says: its errcode, else its record
/// (`detail`, read only for errcode 0).
fn envelope_verdict(
    status: u16,
    retry_after: Option<Duration>,
    (errcode, errmsg): (i64, Option<String>),
    detail: impl FnOnce() -> Result<Option<CallDetail>, serde_json::Error>,
    policy: &ErrcodePolicy,
) -> Verdict {
    let failure = |reason: String| ApiFailure {
        reason,
        http_status: Some(status),
        errcode: Some(errcode),
        errmsg: errmsg.clone(),
        retry_after,
    };
    if errcode != 0 {
        let msg = errmsg.as_deref().unwrap_or("");
        return errcode_verdict(errcode, msg, policy, failure);
    }
    match detail() {
        Ok(Some(detail)) => Verdict::Publish(Box::new(detail)),
        Ok(None) => Verdict::Retry(failure("errcode 0 but no record yet".to_string())),
        Err(e) => Verdict::DeadLetter(failure(format!("record does not fit the model: {e}"))),
    }
}

/// No answer came: retried.
fn transport_failure(kind: TransportKind, message: &str) -> Verdict {
    let what = match kind {
        TransportKind::Timeout => "timeout",
        TransportKind::Connect => "connection error",
        TransportKind::Other => "request error",
    };
    Verdict::Retry(ApiFailure::new(format!("{what}: {message}")))
}

/// An HTTP status outside 2xx: rate limited for 429, else retried.
fn http_failure(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Verdict {
    // 5xx, 429 and 408 are transient by definition. Other statuses are
    // retried too: the API reports record errors through errcode, so an
    // HTTP error is about the route or the gateway, which gets fixed.
    let mut f = ApiFailure::new(format!("HTTP {status}: {}", snippet(body)));
    f.http_status = Some(status);
    f.retry_after = retry_after;
    if status == 429 {
        Verdict::RateLimited(f)
    } else {
        Verdict::Retry(f)
    }
}

/// A non-zero errcode, as the policy says (systemic first, then rate
/// limited, then permanent); an unknown one is retried. `failure` builds the
/// failure from a reason.
fn errcode_verdict(
    code: i64,
    msg: &str,
    policy: &ErrcodePolicy,
    failure: impl Fn(String) -> ApiFailure,
) -> Verdict {
    if policy.systemic.contains(&code) {
        Verdict::Systemic(failure(format!("systemic errcode {code}: {msg}")))
    } else if policy.rate_limited.contains(&code) {
        Verdict::RateLimited(failure(format!("rate limited, errcode {code}: {msg}")))
    } else if policy.permanent.contains(&code) {
        Verdict::DeadLetter(failure(format!("permanent errcode {code}: {msg}")))
    } else {
        Verdict::Retry(failure(format!("errcode {code}: {msg}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn http(status: u16, body: &str) -> ApiAnswer {
        ApiAnswer::Http {
            status,
            retry_after: None,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    pub(crate) fn policy() -> ErrcodePolicy {
        ErrcodePolicy {
            permanent: HashSet::from([40004]),
            systemic: HashSet::from([40001]),
            rate_limited: HashSet::from([503]),
        }
    }

    fn retry_reason(v: Verdict) -> ApiFailure {
        match v {
            Verdict::Retry(f) => f,
            other => panic!("expected retry, got {other:?}"),
        }
    }

    #[test]
    fn spec_example_is_published() {
        let body = include_str!("../tests/fixtures/spec_example_response.json");
        match classify(&http(200, body), &policy()) {
            Verdict::Publish(d) => assert_eq!(d.hangup_reason, Some(5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spec_example_verbatim_has_a_trailing_comma_and_is_retried_not_a_panic() {
        let body = include_str!("../tests/fixtures/spec_example_response_verbatim.txt");
        let f = retry_reason(classify(&http(200, body), &policy()));
        assert!(
            f.reason.starts_with("answer is not a JSON envelope"),
            "{}",
            f.reason
        );
    }

    #[test]
    fn nonzero_errcode_is_retried_by_default_with_errcode_and_errmsg() {
        let f = retry_reason(classify(
            &http(
                200,
                r#"{"errcode":10001,"errmsg":"记录不存在","data":null}"#,
            ),
            &policy(),
        ));
        assert_eq!(f.errcode, Some(10001));
        assert_eq!(f.errmsg.as_deref(), Some("记录不存在"));
        assert_eq!(f.reason, "errcode 10001: 记录不存在");
    }

    #[test]
    fn errcode_as_string_is_read() {
        let f = retry_reason(classify(
            &http(200, r#"{"errcode":"7","errmsg":"x"}"#),
            &policy(),
        ));
        assert_eq!(f.errcode, Some(7));
    }

    #[test]
    fn permanent_errcode_is_dead_lettered() {
        match classify(
            &http(200, r#"{"errcode":40004,"errmsg":"gone"}"#),
            &policy(),
        ) {
            Verdict::DeadLetter(f) => {
                assert_eq!(f.errcode, Some(40004));
                assert_eq!(f.reason, "permanent errcode 40004: gone");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errcode_zero_without_data_is_retried() {
        for body in [
            r#"{"errcode":0,"errmsg":"success"}"#,
            r#"{"errcode":0,"errmsg":"success","data":null}"#,
            r#"{"errcode":0,"errmsg":"success","data":[]}"#,
            r#"{"errcode":0,"errmsg":"success","data":{}}"#,
        ] {
            let f = retry_reason(classify(&http(200, body), &policy()));
            assert_eq!(f.reason, "errcode 0 but no record yet", "{body}");
        }
    }

    #[test]
    fn record_that_does_not_fit_is_dead_lettered() {
        let v = classify(
            &http(200, r#"{"errcode":0,"data":{"satisfaction":"very"}}"#),
            &policy(),
        );
        assert!(
            matches!(v, Verdict::DeadLetter(ref f) if f.reason.starts_with("record does not fit")),
            "{v:?}"
        );
    }

    #[test]
    fn systemic_and_rate_limited_errcodes_are_their_own_verdicts() {
        let v = classify(
            &http(200, r#"{"errcode":40001,"errmsg":"invalid access_token"}"#),
            &policy(),
        );
        assert!(
            matches!(&v, Verdict::Systemic(f) if f.reason == "systemic errcode 40001: invalid access_token" && f.errcode == Some(40001)),
            "{v:?}"
        );
        let v = classify(
            &http(200, r#"{"errcode":503,"errmsg":"频次限制"}"#),
            &policy(),
        );
        assert!(
            matches!(&v, Verdict::RateLimited(f) if f.errcode == Some(503)),
            "{v:?}"
        );
    }

    #[test]
    fn an_errcode_in_several_lists_is_systemic_then_rate_limited_then_permanent() {
        let all = HashSet::from([7]);
        let mut p = ErrcodePolicy {
            permanent: all.clone(),
            systemic: all.clone(),
            rate_limited: all,
        };
        let answer = http(200, r#"{"errcode":7,"errmsg":"x"}"#);
        assert!(matches!(classify(&answer, &p), Verdict::Systemic(_)));
        p.systemic.clear();
        assert!(matches!(classify(&answer, &p), Verdict::RateLimited(_)));
        p.rate_limited.clear();
        let v = classify(&answer, &p);
        assert!(
            matches!(&v, Verdict::DeadLetter(f) if f.reason == "permanent errcode 7: x"),
            "{v:?}"
        );
    }

    #[test]
    fn outages_are_transport_errors_and_5xx_only() {
        assert!(http(502, "").is_outage());
        assert!(!http(429, "").is_outage());
        assert!(!http(200, r#"{"errcode":1}"#).is_outage());
        assert!(
            ApiAnswer::Transport {
                kind: TransportKind::Connect,
                message: String::new()
            }
            .is_outage()
        );
    }

    #[test]
    fn http_errors_are_retried_with_status_and_retry_after() {
        for status in [500, 502, 503, 504, 408, 404, 401] {
            let f = retry_reason(classify(&http(status, "<html>oops</html>"), &policy()));
            assert_eq!(f.http_status, Some(status));
            assert!(f.reason.starts_with(&format!("HTTP {status}")));
        }
        let v = classify(
            &ApiAnswer::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
                body: Bytes::new(),
            },
            &policy(),
        );
        match v {
            Verdict::RateLimited(f) => assert_eq!(f.retry_after, Some(Duration::from_secs(3))),
            other => panic!("429 is rate limiting: {other:?}"),
        }
    }

    /// The one pass and the two steps agree on every kind of answer.
    #[test]
    fn one_pass_and_two_steps_give_the_same_verdict() {
        let spec = include_str!("../tests/fixtures/spec_example_response.json");
        let bodies = [
            spec,
            r#"{"errcode": 0, "data": {}}"#,
            r#"{"errcode": 0, "data": []}"#,
            r#"{"errcode": 0, "data": ""}"#,
            r#"{"errcode": 0, "data": null}"#,
            r#"{"errcode": 0}"#,
            r#"{"errcode": 0, "data": [{"session_id": 5}, 1]}"#,
            r#"{"errcode": 0, "data": [{}]}"#,
            r#"{"errcode": 0, "data": 42}"#,
            r#"{"errcode": 0, "data": {"satisfaction": "very"}}"#,
            r#"{"errcode": 0, "data": {"lists": {"a": 1}}}"#,
            r#"{"errcode": 0, "data": {"lists": [{"truename": "x", "new": [1]}], "brand_new": {"x": 1}}}"#,
            r#"{"errcode": "10001", "errmsg": "not yet", "data": 42}"#,
            r#"{"errcode": 40001, "errmsg": 7}"#,
            r#"{"errcode": "", "data": {}}"#,
            r#"{"errmsg": "no code"}"#,
            "not json",
        ];
        for body in bodies {
            let b = body.as_bytes();
            assert_eq!(
                classify(&http(200, body), &policy()),
                classify_in_steps(200, None, b, &policy()),
                "{body}"
            );
        }
    }

    #[test]
    fn garbage_bodies_are_retried() {
        for body in [
            "",
            "not json",
            "[1,2,3]",
            r#"{"no_errcode":true}"#,
            "\u{0}\u{1}",
        ] {
            retry_reason(classify(&http(200, body), &policy()));
        }
    }

    #[test]
    fn transport_errors_are_retried() {
        for (kind, word) in [
            (TransportKind::Timeout, "timeout"),
            (TransportKind::Connect, "connection error"),
            (TransportKind::Other, "request error"),
        ] {
            let f = retry_reason(classify(
                &ApiAnswer::Transport {
                    kind,
                    message: "boom".into(),
                },
                &policy(),
            ));
            assert_eq!(f.reason, format!("{word}: boom"));
        }
    }

    #[test]
    fn long_bodies_are_cut_in_reasons() {
        let body = "x".repeat(5000);
        let f = retry_reason(classify(&http(502, &body), &policy()));
        assert!(f.reason.len() < 300);
    }

    #[test]
    fn redact_removes_the_secret_everywhere() {
        let f = ApiFailure {
            reason: "HTTP 500: bad token abc123".into(),
            http_status: Some(500),
            errcode: Some(1),
            errmsg: Some("abc123 expired".into()),
            retry_after: None,
        }
        .redact("abc123");
        assert!(!f.reason.contains("abc123") && !f.errmsg.unwrap().contains("abc123"));
    }
}
