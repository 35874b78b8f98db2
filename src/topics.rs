//! Small Kafka client helpers for the demo, the tests and the benchmarks:
//! produce records and wait for their acknowledgements, read a topic back
//! from the beginning, a record's key and headers as text.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

/// A client configuration for these helpers: quiet librdkafka logs.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
    c
}

/// Produces records (key, payload) and waits for every acknowledgement.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    records: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u8>)>,
) -> anyhow::Result<usize> {
    let producer: FutureProducer = client_config(bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?;
    let mut pending = Vec::new();
    for (key, payload) in records {
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&topic).payload(&payload);
            if let Some(k) = &key {
                rec = rec.key(k);
            }
            producer
                .send(rec, Timeout::After(Duration::from_secs(30)))
                .await
                .map_err(|(e, _)| e)
        });
    }
    let n = pending.len();
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(n)
}

/// Reads `topic` from the beginning until `count` records arrived or `limit`
/// passed (an error: the records did not come).
pub async fn read_topic(
    bootstrap: &str,
    topic: &str,
    count: usize,
    limit: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    read_topic_until(bootstrap, topic, limit, |msgs| msgs.len() >= count)
        .await
        .with_context(|| format!("waiting for {count} records on {topic}"))
}

/// Reads `topic` from the beginning until `done` holds for what was read.
pub async fn read_topic_until(
    bootstrap: &str,
    topic: &str,
    limit: Duration,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: StreamConsumer = client_config(bootstrap)
        .set("group.id", reader_group())
        .set("enable.auto.commit", "false")
        // Only what transactions committed (and what was written without one).
        .set("isolation.level", "read_committed")
        .create()?;
    assign_from_start(&consumer, topic)?;
    let mut out: Vec<OwnedMessage> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&out) {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            // Broker restarts surface as errors the consumer recovers from;
            // the time limit bounds a reader that never does.
            Ok(Err(e)) => eprintln!("reading {topic}: {e} (going on)"),
            Err(_) => bail!(
                "read {} records from {topic} before the time limit",
                out.len()
            ),
        }
    }
    Ok(out)
}

/// Assigns every partition of `topic` to `consumer`, each from its start;
/// returns how many there are.
pub fn assign_from_start<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
) -> anyhow::Result<i32> {
    let parts = partition_count(consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(parts)
}

pub fn partition_count<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
) -> anyhow::Result<i32> {
    let md = consumer.fetch_metadata(Some(topic), Timeout::After(Duration::from_secs(10)))?;
    let t = md.topics().first().context("no metadata for topic")?;
    if t.partitions().is_empty() {
        bail!("topic {topic} has no partitions");
    }
    Ok(t.partitions().len() as i32)
}

/// A group id of its own for each reader (it commits nothing).
fn reader_group() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "reader-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let hs = m.headers()?;
    hs.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).to_string())
}

/// The record's key as text.
pub fn key(m: &OwnedMessage) -> Option<String> {
    m.key().map(|k| String::from_utf8_lossy(k).to_string())
}
