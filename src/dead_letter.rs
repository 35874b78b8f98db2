//! The dead-letter record: the original key and value bytes untouched, the
//! original headers kept, and `dlq.*` headers saying what failed, why, when
//! and where the record came from. Enough to replay without opening logs.

use chrono::{DateTime, Utc};

use crate::record::{self, Source, rfc3339};

/// Header names of a dead-letter record.
pub mod header {
    pub const PREFIX: &str = "dlq.";
    pub const ERROR_CLASS: &str = "dlq.error_class";
    pub const REASON: &str = "dlq.reason";
    pub const ERRCODE: &str = "dlq.errcode";
    pub const ERRMSG: &str = "dlq.errmsg";
    pub const HTTP_STATUS: &str = "dlq.http_status";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const FIRST_ATTEMPT_AT: &str = "dlq.first_attempt_at";
    pub const LAST_ATTEMPT_AT: &str = "dlq.last_attempt_at";
    pub const FAILED_AT: &str = "dlq.failed_at";
    pub const SOURCE_TOPIC: &str = "dlq.source_topic";
    pub const SOURCE_PARTITION: &str = "dlq.source_partition";
    pub const SOURCE_OFFSET: &str = "dlq.source_offset";
    pub const SOURCE_TIMESTAMP: &str = "dlq.source_timestamp";
    pub const CONSUMER_GROUP: &str = "dlq.consumer_group";
    pub const TENANT_ID: &str = "dlq.tenant_id";
    pub const SESSION_ID: &str = "dlq.session_id";
    pub const ENRICHER: &str = "dlq.enricher";
    /// Present when the topic refused the whole dead letter: the value was
    /// cut to this many bytes and the original headers left out.
    pub const TRUNCATED_TO: &str = "dlq.truncated_to";
    /// The original value's size in bytes, with `dlq.truncated_to`.
    pub const ORIGINAL_SIZE: &str = "dlq.original_size";
}

/// The value sizes to try, in order, when the dead-letter topic refuses a
/// dead letter of `len` bytes: a quarter of the topic's limit when known,
/// then halving, down to no value at all (the headers still say what
/// failed and where the original is: `dlq.source_*`).
pub fn truncated_sizes(len: usize, max_message_bytes: Option<usize>) -> Vec<usize> {
    let first = max_message_bytes.map_or(len / 2, |m| (m / 4).min(len / 2));
    let mut sizes: Vec<usize> =
        std::iter::successors(Some(first), |&n| (n > 0).then_some(n / 2)).collect();
    if sizes.last() != Some(&0) {
        sizes.push(0);
    }
    sizes
}

/// Why a record was dead-lettered; the value of `dlq.error_class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The event could not be read or names an unknown tenant; no API call.
    InvalidEvent,
    /// The API gave an answer that retrying will not change.
    PermanentError,
    /// Attempts or elapsed time ran out while the answer stayed a failure.
    RetriesExhausted,
    /// The output topic refused the enriched record (e.g. too large).
    PublishFailed,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 4] = [
        ErrorClass::InvalidEvent,
        ErrorClass::PermanentError,
        ErrorClass::RetriesExhausted,
        ErrorClass::PublishFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidEvent => "invalid_event",
            ErrorClass::PermanentError => "permanent_error",
            ErrorClass::RetriesExhausted => "retries_exhausted",
            ErrorClass::PublishFailed => "publish_failed",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known about a failed record.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub class: ErrorClass,
    pub reason: String,
    pub errcode: Option<i64>,
    pub errmsg: Option<String>,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub tenant_id: Option<String>,
    pub session_id: Option<String>,
}

impl DeadLetter {
    /// A failure before any API call.
    pub fn invalid(reason: String, tenant_id: Option<String>, session_id: Option<String>) -> Self {
        DeadLetter {
            class: ErrorClass::InvalidEvent,
            reason,
            errcode: None,
            errmsg: None,
            http_status: None,
            attempts: 0,
            first_attempt_at: None,
            last_attempt_at: None,
            tenant_id,
            session_id,
        }
    }

    /// The `dlq.*` headers, in a stable order.
    pub fn headers(
        &self,
        source: &Source,
        consumer_group: &str,
        failed_at: DateTime<Utc>,
    ) -> Vec<(&'static str, String)> {
        use header::*;
        let mut h = vec![
            (ERROR_CLASS, self.class.to_string()),
            (REASON, self.reason.clone()),
        ];
        if let Some(c) = self.errcode {
            h.push((ERRCODE, c.to_string()));
        }
        if let Some(m) = &self.errmsg {
            h.push((ERRMSG, m.clone()));
        }
        if let Some(s) = self.http_status {
            h.push((HTTP_STATUS, s.to_string()));
        }
        h.push((ATTEMPTS, self.attempts.to_string()));
        if let Some(t) = self.first_attempt_at {
            h.push((FIRST_ATTEMPT_AT, rfc3339(t)));
        }
        if let Some(t) = self.last_attempt_at {
            h.push((LAST_ATTEMPT_AT, rfc3339(t)));
        }
        h.push((FAILED_AT, rfc3339(failed_at)));
        h.push((SOURCE_TOPIC, source.topic.clone()));
        h.push((SOURCE_PARTITION, source.partition.to_string()));
        h.push((SOURCE_OFFSET, source.offset.to_string()));
        if let Some(ts) = source.timestamp_ms {
            h.push((SOURCE_TIMESTAMP, ts.to_string()));
        }
        h.push((CONSUMER_GROUP, consumer_group.to_string()));
        if let Some(t) = &self.tenant_id {
            h.push((TENANT_ID, t.clone()));
        }
        if let Some(s) = &self.session_id {
            h.push((SESSION_ID, s.clone()));
        }
        h.push((ENRICHER, record::ENRICHER.to_string()));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_sizes_shrink_to_nothing() {
        assert_eq!(truncated_sizes(100, None), vec![50, 25, 12, 6, 3, 1, 0]);
        assert_eq!(
            truncated_sizes(1 << 20, Some(4096)),
            vec![1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 0]
        );
        assert_eq!(truncated_sizes(0, None), vec![0]);
    }

    #[test]
    fn headers_hold_each_value_and_not_the_offset_in_the_partition() {
        let t1: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .into();
        let t2: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-01-01T00:00:09.5Z")
            .unwrap()
            .into();
        let dl = DeadLetter {
            class: ErrorClass::RetriesExhausted,
            reason: "errcode 7: busy".into(),
            errcode: Some(7),
            errmsg: Some("busy".into()),
            http_status: Some(200),
            attempts: 5,
            first_attempt_at: Some(t1),
            last_attempt_at: Some(t2),
            tenant_id: Some("t".into()),
            session_id: Some("s".into()),
        };
        let source = Source {
            topic: "in".into(),
            partition: 3,
            offset: 1234,
            timestamp_ms: Some(99),
        };
        let h: std::collections::HashMap<_, _> = dl.headers(&source, "g", t2).into_iter().collect();
        assert_eq!(h[header::ERROR_CLASS], "retries_exhausted");
        assert_eq!(h[header::REASON], "errcode 7: busy");
        assert_eq!(h[header::ERRCODE], "7");
        assert_eq!(h[header::ERRMSG], "busy");
        assert_eq!(h[header::HTTP_STATUS], "200");
        assert_eq!(h[header::ATTEMPTS], "5");
        assert_eq!(h[header::FIRST_ATTEMPT_AT], "2026-01-01T00:00:00.000Z");
        assert_eq!(h[header::LAST_ATTEMPT_AT], "2026-01-01T00:00:09.500Z");
        assert_eq!(h[header::FAILED_AT], "2026-01-01T00:00:09.500Z");
        assert_eq!(h[header::SOURCE_TOPIC], "in");
        assert_eq!(h[header::SOURCE_PARTITION], "3");
        assert_eq!(h[header::SOURCE_OFFSET], "1234");
        assert_eq!(h[header::SOURCE_TIMESTAMP], "99");
        assert_eq!(h[header::CONSUMER_GROUP], "g");
        assert_eq!(h[header::TENANT_ID], "t");
        assert_eq!(h[header::SESSION_ID], "s");
    }

    #[test]
    fn invalid_events_have_no_attempt_times() {
        let dl = DeadLetter::invalid("event is not JSON".into(), None, None);
        let source = Source {
            topic: "in".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
        };
        let names: Vec<_> = dl
            .headers(&source, "g", Utc::now())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(names.contains(&header::ATTEMPTS));
        assert!(!names.contains(&header::FIRST_ATTEMPT_AT));
        assert!(!names.contains(&header::ERRCODE));
        assert!(!names.contains(&header::SESSION_ID));
    }
}
