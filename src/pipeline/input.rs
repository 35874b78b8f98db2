//! The input record, copied out of the consumer so a task can own it.

use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::dead_letter::header as dlq;
use crate::record::Source;

/// An input record, copied out of the consumer so a task can own it.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub source: Source,
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
        }
    }

    /// The record's own headers for producing it again: any `dlq.*` (and
    /// Kafka Connect error header) of an earlier failure dropped.
    pub fn headers_without_dlq(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        (self.headers.iter())
            .filter(|(k, _)| !k.starts_with(dlq::PREFIX) && !k.starts_with("__connect.errors."))
            .map(|(k, v)| (k.as_str(), v.as_deref()))
    }
}
