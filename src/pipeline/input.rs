//! The input record, copied out of the consumer so a task can own it.

use rdkafka::message::{BorrowedMessage, Headers, Message};

use super::outgoing::Origin;
use crate::dead_letter::header as dlq;
use crate::record::Source;

/// An input record, copied out of the consumer so a task can own it.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub source: Source,
    /// Its place in its partition's tracker once it runs (its outputs are
    /// committed with its offset in a transaction).
    pub origin: Option<Origin>,
}

impl InRecord {
    pub fn from_message(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        InRecord {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            source: Source {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
            },
            origin: None,
        }
    }

    /// The last value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter().rev())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
    }

    /// The record's own headers for producing it again: any `dlq.*` (and
    /// Kafka Connect error header) of an earlier failure dropped.
    pub fn headers_without_dlq(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        (self.headers.iter())
            .filter(|(k, _)| !k.starts_with(dlq::PREFIX) && !k.starts_with("__connect.errors."))
            .map(|(k, v)| (k.as_str(), v.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_its_last_value_as_text() {
        let rec = InRecord {
            key: None,
            payload: None,
            headers: vec![
                ("uincall.tenant".into(), Some(b"a".to_vec())),
                ("uincall.tenant".into(), Some(b"b".to_vec())),
                ("empty".into(), None),
                ("binary".into(), Some(vec![0xff, 0xfe])),
            ],
            source: Source {
                topic: "in".into(),
                partition: 0,
                offset: 0,
                timestamp_ms: None,
            },
            origin: None,
        };
        assert_eq!(rec.header("uincall.tenant"), Some("b"));
        assert_eq!(rec.header("empty"), None);
        assert_eq!(rec.header("binary"), None);
        assert_eq!(rec.header("missing"), None);
    }
}
