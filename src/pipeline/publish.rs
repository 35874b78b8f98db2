//! Producing until the broker acknowledges: the produce policy
//! ([`crate::producer::produce_policy`]: which errors are worth another
//! try) and one backoff (the `retry` settings) for the worker and `replay`;
//! dead letters cut down when the topic refuses them whole.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

pub use super::outgoing::{Outgoing, ProduceError};
use super::transactions::Transactions;
use crate::dead_letter::{self, Stamp, Truncated};
use crate::kafka;
use crate::producer::{ProducePolicy, RenewingProducer, produce_policy};
use crate::retry;
use crate::settings::Settings;
use crate::stats::Stats;

/// The idempotent producer, the produce timeout and the retry schedule.
pub struct Publisher {
    producer: Arc<RenewingProducer>,
    /// Stops the producer's watchdog when the publisher goes.
    watchdog: CancellationToken,
    stats: Arc<Stats>,
    timeout: Duration,
    backoff: ExponentialBuilder,
    /// The smallest `max.message.bytes` of the topics written, when the
    /// cluster told it.
    max_message_bytes: Option<usize>,
    /// Kafka Connect's error headers on dead letters too.
    connect_headers: bool,
    /// `kafka.delivery = "exactly_once"`: outputs of input records go
    /// through transactions.
    transactions: Option<Arc<Transactions>>,
}

impl Publisher {
    /// A producer for `topics`, its batches sized to their
    /// `max.message.bytes` when the cluster tells it.
    pub async fn new(
        settings: &Settings,
        stats: Arc<Stats>,
        topics: &[&str],
    ) -> anyhow::Result<Publisher> {
        let k = &settings.kafka;
        let max_message_bytes = match k.max_message_bytes {
            Some(bytes) => Some(bytes),
            None => kafka::max_message_bytes(k, topics).await,
        };
        let config = kafka::producer_config(k, max_message_bytes);
        let producer = RenewingProducer::new(config, k.producer_renew_after)
            .map_err(kafka::config_error(k, "creating the Kafka producer"))?;
        let producer = Arc::new(producer);
        let watchdog = CancellationToken::new();
        let renewals = stats.clone();
        producer.watch(watchdog.clone(), move || renewals.producer_renewed());
        Ok(Publisher {
            producer,
            watchdog,
            stats,
            timeout: k.produce_timeout,
            backoff: retry::backoff(&settings.retry),
            max_message_bytes,
            connect_headers: settings.headers.kafka_connect,
            transactions: None,
        })
    }

    /// Outputs of input records are committed in `transactions` from now on.
    pub fn with_transactions(mut self, transactions: Arc<Transactions>) -> Publisher {
        self.transactions = Some(transactions);
        self
    }

    /// The smallest `max.message.bytes` of the topics written, when known.
    pub fn max_message_bytes(&self) -> Option<usize> {
        self.max_message_bytes
    }

    /// Produces until acknowledged, retrying what the broker may accept
    /// later (with the `retry` settings' backoff) until `stop`.
    pub async fn send(
        &self,
        out: Outgoing<'_>,
        stop: &CancellationToken,
    ) -> Result<(), ProduceError> {
        if let (Some(transactions), Some(origin)) = (&self.transactions, out.origin) {
            return transactions.stage(out, origin).await;
        }
        let mut delays = self.backoff.build();
        loop {
            let mut rec = FutureRecord::<[u8], [u8]>::to(out.topic)
                .payload(out.payload)
                .headers(out.headers.clone());
            if let Some(k) = out.key {
                rec = rec.key(k);
            }
            let error = match self.producer.send(rec, Timeout::After(self.timeout)).await {
                Ok(_) => return Ok(()),
                Err((e, _)) => e,
            };
            let policy = produce_policy(&error);
            self.stats
                .produce_error(policy.label(), error.rdkafka_error_code());
            let why = match policy {
                ProducePolicy::Reject(why) => {
                    warn!(topic = out.topic, error = %error, reason = why, "the broker refused the record");
                    return Err(ProduceError::Rejected(error));
                }
                ProducePolicy::Fatal(why) => {
                    error!(topic = out.topic, error = %error, reason = why, "the producer failed for good");
                    return Err(ProduceError::Fatal(error));
                }
                ProducePolicy::Retry(why) => why,
            };
            let delay = delays.next().unwrap_or(self.timeout);
            warn!(topic = out.topic, error = %error, reason = why, retry_in = ?delay, "produce failed, retrying");
            tokio::select! {
                _ = stop.cancelled() => return Err(ProduceError::Abandoned),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Publishes a dead letter: the original value and headers with the
    /// failure's `dlq.*` headers. When the topic refuses it (too large once
    /// the headers are added), smaller ones follow: the value cut, the
    /// original headers left out, and the key and the `dlq.*` texts cut to
    /// the value's size (at least [`dead_letter::TEXT_FLOOR`] bytes), with
    /// `dlq.truncated_to`, `dlq.original_size` and, for a cut key,
    /// `dlq.original_key_size` saying so.
    pub async fn dead_letter(
        &self,
        out: Outgoing<'_>,
        stamp: &Stamp,
        stop: &CancellationToken,
    ) -> Result<(), ProduceError> {
        let payload = out.payload;
        let full = stamp.onto(out.headers.clone(), self.connect_headers);
        let mut result = self
            .send(
                Outgoing {
                    headers: &full,
                    ..out
                },
                stop,
            )
            .await;
        for size in dead_letter::truncated_sizes(payload.len(), self.max_message_bytes) {
            let Err(ProduceError::Rejected(error)) = &result else {
                break;
            };
            warn!(error = %error, original_size = payload.len(), truncated_to = size, "the dead-letter topic refused the dead letter; writing it truncated");
            let texts = size.max(dead_letter::TEXT_FLOOR);
            let key = out.key.map(|k| &k[..k.len().min(texts)]);
            let truncated = Stamp {
                truncated: Some(Truncated {
                    to: size,
                    original_size: payload.len(),
                    original_key_size: (key != out.key).then(|| out.key.map_or(0, <[u8]>::len)),
                }),
                ..stamp.texts_cut(texts)
            };
            let headers = truncated.onto(OwnedHeaders::new(), self.connect_headers);
            let cut = Outgoing {
                key,
                payload: &payload[..size],
                headers: &headers,
                ..out
            };
            result = self.send(cut, stop).await;
        }
        result
    }

    /// Waits up to `limit` for what is still queued (on a blocking thread).
    pub async fn flush(&self, limit: Duration) -> anyhow::Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(limit)).await??;
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.watchdog.cancel();
    }
}
