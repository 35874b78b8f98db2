//! The dead-letter record: the original key and value bytes untouched, the
//! original headers kept, and `dlq.*` headers saying what failed, why, when
//! and where the record came from. Enough to replay without opening logs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};

use crate::classify::ApiFailure;
use crate::event::CallEnded;
use crate::record::{self, Source, rfc3339};
use crate::retry::Attempts;

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
    /// With `dlq.truncated_to`, when the key was cut too (to at most
    /// `dlq.truncated_to` bytes, or [`super::TEXT_FLOOR`]): its size.
    pub const ORIGINAL_KEY_SIZE: &str = "dlq.original_key_size";
}

/// A cut dead letter keeps at least this many bytes of its key and of each
/// `dlq.*` text (reason, errmsg, tenant, session), however small its value
/// becomes.
pub const TEXT_FLOOR: usize = 128;

/// `text` cut to at most `max` bytes at a character boundary, a cut one
/// ending in `…` (within the `max`).
pub fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let room = max.saturating_sub('…'.len_utf8());
    let end = (0..=room)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &text[..end])
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The event could not be read or names an unknown tenant; no API call.
    InvalidEvent,
    /// The API gave an answer that retrying will not change.
    PermanentError,
    /// Attempts or elapsed time ran out while the answer stayed a failure.
    RetriesExhausted,
    /// The output topic refused the enriched record (e.g. too large).
    PublishFailed,
    /// Its tenant was held and `pipeline.max_held_records` records waited
    /// already (`pipeline.held_overflow = "dead_letter"`): not a failure of
    /// the record; replay it once the tenant is resumed.
    TenantHeld,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::InvalidEvent,
        ErrorClass::PermanentError,
        ErrorClass::RetriesExhausted,
        ErrorClass::PublishFailed,
        ErrorClass::TenantHeld,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidEvent => "invalid_event",
            ErrorClass::PermanentError => "permanent_error",
            ErrorClass::RetriesExhausted => "retries_exhausted",
            ErrorClass::PublishFailed => "publish_failed",
            ErrorClass::TenantHeld => "tenant_held",
        }
    }
}

impl std::str::FromStr for ErrorClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown error class {s:?}"))
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

    /// A record of a held tenant that could not wait (`reason` says why).
    pub fn tenant_held(reason: String, event: &CallEnded) -> Self {
        DeadLetter {
            class: ErrorClass::TenantHeld,
            tenant_id: Some(event.tenant_id.clone()),
            session_id: Some(event.session_id.clone()),
            ..DeadLetter::invalid(reason, None, None)
        }
    }

    /// A failure after API calls (or after the call, at publishing): what
    /// the last answer said and when the attempts were.
    pub fn after_attempts(
        class: ErrorClass,
        failure: ApiFailure,
        attempts: &Attempts,
        event: &CallEnded,
    ) -> Self {
        DeadLetter {
            class,
            reason: failure.reason,
            errcode: failure.errcode,
            errmsg: failure.errmsg,
            http_status: failure.http_status,
            attempts: attempts.count,
            first_attempt_at: Some(attempts.first_at),
            last_attempt_at: Some(attempts.last_at),
            tenant_id: Some(event.tenant_id.clone()),
            session_id: Some(event.session_id.clone()),
        }
    }

    /// The `dlq.*` headers of this failure, for a record from `source`.
    pub fn stamp(&self, source: &Source, consumer_group: &str, failed_at: DateTime<Utc>) -> Stamp {
        Stamp {
            error_class: Some(self.class),
            reason: Some(self.reason.clone()),
            errcode: self.errcode,
            errmsg: self.errmsg.clone(),
            http_status: self.http_status,
            attempts: Some(self.attempts),
            first_attempt_at: self.first_attempt_at,
            last_attempt_at: self.last_attempt_at,
            failed_at: Some(failed_at),
            source_topic: Some(source.topic.clone()),
            source_partition: Some(source.partition),
            source_offset: Some(source.offset),
            source_timestamp: source.timestamp_ms,
            consumer_group: Some(consumer_group.to_string()),
            tenant_id: self.tenant_id.clone(),
            session_id: self.session_id.clone(),
            enricher: Some(record::ENRICHER.to_string()),
            truncated: None,
        }
    }
}

/// A dead letter whose value was cut because the topic refused it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// `dlq.truncated_to`: bytes of the original value kept.
    pub to: usize,
    /// `dlq.original_size`: the original value's size in bytes.
    pub original_size: usize,
    /// `dlq.original_key_size`: the original key's size, when it was cut.
    pub original_key_size: Option<usize>,
}

/// The `dlq.*` headers of a dead letter, typed both ways: the worker writes
/// them ([`Stamp::headers`]), replay reads them back ([`Stamp::read`]).
/// Reading is lenient (a dead letter from another version may lack some):
/// a header that is missing or unreadable is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stamp {
    pub error_class: Option<ErrorClass>,
    pub reason: Option<String>,
    pub errcode: Option<i64>,
    pub errmsg: Option<String>,
    pub http_status: Option<u16>,
    pub attempts: Option<u32>,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub source_timestamp: Option<i64>,
    pub consumer_group: Option<String>,
    pub tenant_id: Option<String>,
    pub session_id: Option<String>,
    pub enricher: Option<String>,
    pub truncated: Option<Truncated>,
}

/// Header values by name, as text.
struct Found<'a>(HashMap<&'a str, String>);

impl Found<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn parse<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.0.get(name).and_then(|v| v.parse().ok())
    }

    fn time(&self, name: &str) -> Option<DateTime<Utc>> {
        let t = DateTime::parse_from_rfc3339(self.0.get(name)?).ok()?;
        Some(t.with_timezone(&Utc))
    }
}

fn text(v: &Option<impl ToString>) -> Option<String> {
    v.as_ref().map(ToString::to_string)
}

fn time(v: &Option<DateTime<Utc>>) -> Option<String> {
    v.map(rfc3339)
}

impl Stamp {
    /// The headers, in a stable order; absent values are left out.
    /// Kafka Connect's names for the same facts (what its dead-letter
    /// readers look for): the source record's place, the error class as the
    /// exception's class name, the reason as its message.
    pub fn connect_headers(&self) -> Vec<(&'static str, String)> {
        [
            ("__connect.errors.topic", self.source_topic.clone()),
            ("__connect.errors.partition", text(&self.source_partition)),
            ("__connect.errors.offset", text(&self.source_offset)),
            (
                "__connect.errors.exception.class.name",
                text(&self.error_class),
            ),
            ("__connect.errors.exception.message", self.reason.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    /// `headers` with the `dlq.*` headers added, and Kafka Connect's with
    /// `connect` (`headers.kafka_connect`).
    pub fn onto(&self, headers: OwnedHeaders, connect: bool) -> OwnedHeaders {
        let mut ours = self.headers();
        if connect {
            ours.extend(self.connect_headers());
        }
        ours.iter().fold(headers, |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        })
    }

    pub fn headers(&self) -> Vec<(&'static str, String)> {
        use header::*;
        let truncated = self.truncated.as_ref();
        [
            (ERROR_CLASS, text(&self.error_class)),
            (REASON, self.reason.clone()),
            (ERRCODE, text(&self.errcode)),
            (ERRMSG, self.errmsg.clone()),
            (HTTP_STATUS, text(&self.http_status)),
            (ATTEMPTS, text(&self.attempts)),
            (FIRST_ATTEMPT_AT, time(&self.first_attempt_at)),
            (LAST_ATTEMPT_AT, time(&self.last_attempt_at)),
            (FAILED_AT, time(&self.failed_at)),
            (SOURCE_TOPIC, self.source_topic.clone()),
            (SOURCE_PARTITION, text(&self.source_partition)),
            (SOURCE_OFFSET, text(&self.source_offset)),
            (SOURCE_TIMESTAMP, text(&self.source_timestamp)),
            (CONSUMER_GROUP, self.consumer_group.clone()),
            (TENANT_ID, self.tenant_id.clone()),
            (SESSION_ID, self.session_id.clone()),
            (ENRICHER, self.enricher.clone()),
            (TRUNCATED_TO, truncated.map(|t| t.to.to_string())),
            (
                ORIGINAL_SIZE,
                truncated.map(|t| t.original_size.to_string()),
            ),
            (
                ORIGINAL_KEY_SIZE,
                truncated.and_then(|t| t.original_key_size.map(|n| n.to_string())),
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    /// Reads the `dlq.*` headers among a record's headers.
    pub fn read<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> Stamp {
        let found = Found(
            headers
                .into_iter()
                .filter(|(k, _)| k.starts_with(header::PREFIX))
                .filter_map(|(k, v)| Some((k, String::from_utf8_lossy(v?).into_owned())))
                .collect(),
        );
        use header::*;
        let f = &found;
        Stamp {
            error_class: f.parse(ERROR_CLASS),
            reason: f.get(REASON),
            errcode: f.parse(ERRCODE),
            errmsg: f.get(ERRMSG),
            http_status: f.parse(HTTP_STATUS),
            attempts: f.parse(ATTEMPTS),
            first_attempt_at: f.time(FIRST_ATTEMPT_AT),
            last_attempt_at: f.time(LAST_ATTEMPT_AT),
            failed_at: f.time(FAILED_AT),
            source_topic: f.get(SOURCE_TOPIC),
            source_partition: f.parse(SOURCE_PARTITION),
            source_offset: f.parse(SOURCE_OFFSET),
            source_timestamp: f.parse(SOURCE_TIMESTAMP),
            consumer_group: f.get(CONSUMER_GROUP),
            tenant_id: f.get(TENANT_ID),
            session_id: f.get(SESSION_ID),
            enricher: f.get(ENRICHER),
            // Present at all means cut, even when the value is unreadable.
            truncated: f.0.contains_key(TRUNCATED_TO).then(|| Truncated {
                to: f.parse(TRUNCATED_TO).unwrap_or(0),
                original_size: f.parse(ORIGINAL_SIZE).unwrap_or(0),
                original_key_size: f.parse(ORIGINAL_KEY_SIZE),
            }),
        }
    }

    /// This stamp with each free text (reason, errmsg, tenant, session,
    /// consumer group) cut to at most `max` bytes.
    pub fn texts_cut(&self, max: usize) -> Stamp {
        let cut = |t: &Option<String>| t.as_deref().map(|t| cut_text(t, max));
        Stamp {
            reason: cut(&self.reason),
            errmsg: cut(&self.errmsg),
            tenant_id: cut(&self.tenant_id),
            session_id: cut(&self.session_id),
            consumer_group: cut(&self.consumer_group),
            ..self.clone()
        }
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

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    /// A record that ran out of retries, and where it came from.
    fn exhausted() -> (DeadLetter, Source) {
        let dl = DeadLetter {
            class: ErrorClass::RetriesExhausted,
            reason: "errcode 7: busy".into(),
            errcode: Some(7),
            errmsg: Some("busy".into()),
            http_status: Some(200),
            attempts: 5,
            first_attempt_at: Some(at("2026-01-01T00:00:00Z")),
            last_attempt_at: Some(at("2026-01-01T00:00:09.5Z")),
            tenant_id: Some("t".into()),
            session_id: Some("s".into()),
        };
        let source = Source {
            topic: "in".into(),
            partition: 3,
            offset: 1234,
            timestamp_ms: Some(99),
        };
        (dl, source)
    }

    #[test]
    fn headers_hold_each_value_and_not_the_offset_in_the_partition() {
        let (dl, source) = exhausted();
        let t2 = at("2026-01-01T00:00:09.5Z");
        let h: std::collections::HashMap<_, _> =
            dl.stamp(&source, "g", t2).headers().into_iter().collect();
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
            .stamp(&source, "g", Utc::now())
            .headers()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(names.contains(&header::ATTEMPTS));
        assert!(!names.contains(&header::FIRST_ATTEMPT_AT));
        assert!(!names.contains(&header::ERRCODE));
        assert!(!names.contains(&header::SESSION_ID));
    }

    #[test]
    fn stamps_read_back_as_written() {
        let (mut dl, source) = exhausted();
        dl.errmsg = Some("超时".into());
        let mut stamp = dl.stamp(&source, "g", at("2026-01-01T00:00:02Z"));
        stamp.truncated = Some(Truncated {
            to: 1024,
            original_size: 1 << 20,
            original_key_size: Some(20_000),
        });
        let headers = stamp.headers();
        let read = Stamp::read(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))));
        assert_eq!(read, stamp);
        // Other headers are ignored; unreadable values are absent.
        let read = Stamp::read([
            ("traceparent", Some(&b"00-abc"[..])),
            (header::ERROR_CLASS, Some(&b"no_such_class"[..])),
            (header::SOURCE_OFFSET, Some(&b"forty"[..])),
            (header::REASON, None),
        ]);
        assert_eq!(read, Stamp::default());
        // A cut dead letter stays cut, whatever its sizes say.
        let read = Stamp::read([(header::TRUNCATED_TO, Some(&b""[..]))]);
        let cut = Truncated {
            to: 0,
            original_size: 0,
            original_key_size: None,
        };
        assert_eq!(read.truncated, Some(cut));
    }

    #[test]
    fn texts_are_cut_at_a_character_within_the_bound() {
        assert_eq!(cut_text("short", 10), "short");
        assert_eq!(cut_text("abcdefghij", 10), "abcdefghij");
        assert_eq!(cut_text("abcdefghijk", 10), "abcdefg…");
        let cut = cut_text(&"超".repeat(100), 10);
        assert!(cut.len() <= 10 && cut.ends_with('…'), "{cut}");
        assert_eq!(cut, "超超…");
        let (dl, source) = exhausted();
        let mut stamp = dl.stamp(&source, "g", Utc::now());
        stamp.session_id = Some("s".repeat(20_000));
        stamp.errmsg = Some("e".repeat(20_000));
        let cut = stamp.texts_cut(TEXT_FLOOR);
        let longest = cut.headers().iter().map(|(_, v)| v.len()).max().unwrap();
        assert!(longest <= TEXT_FLOOR, "{longest}");
        assert_eq!(cut.source_offset, stamp.source_offset);
    }
}
