//! A record to produce and what can come of it: shared by the publisher
//! and the transaction task.

use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;

use crate::offsets::Place;

/// A produce that did not get an acknowledgement.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The broker refuses this record (e.g. too large): it never will take
    /// it. (The text is a dead letter's `dlq.reason`: keep it stable.)
    #[error("the broker refused the record: {0}")]
    Rejected(KafkaError),
    /// The producer cannot go on (authorisation, idempotence state).
    #[error("the producer failed for good: {0}")]
    Fatal(KafkaError),
    #[error("shutdown before the broker acknowledged")]
    Abandoned,
}

/// One record to produce.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: &'a OwnedHeaders,
    /// The input record it is the output of, when it is one: with
    /// transactions, it is committed with that record's offset.
    pub origin: Option<&'a Origin>,
}

/// Whose output it is: the input record's place in its partition's
/// tracker, and the token cancelled when that partition is revoked.
#[derive(Debug, Clone)]
pub struct Origin {
    pub place: Place,
    pub revoked: CancellationToken,
}
