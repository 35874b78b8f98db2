//! The sessions already enriched (`--skip-enriched`): the keys of the
//! output topic, read from its start up to the end offsets taken when the
//! run starts (records enriched meanwhile are not waited for). Partitions
//! are assigned directly under the group `<kafka.group_id>.backfill`
//! (librdkafka wants a group for `assign`, and looks up its coordinator:
//! Describe on it), which never joins and commits nothing.
//!
//! Each key is kept as a 128-bit digest, not as text (docs/benchmarks.md
//! has the measured memory and time per million keys); a false match (which
//! would skip a missing session) has odds of about 2^-128 per pair of keys.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::kafka;
use crate::settings::KafkaSettings;

/// The digests of the enriched sessions' keys.
#[derive(Debug, Default)]
pub struct Enriched {
    keys: HashSet<u128>,
}

/// The 128-bit digest of a key: two SipHash-1-3 passes (fixed keys, so
/// stable within the run) under different prefixes.
fn digest(key: &[u8]) -> u128 {
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

impl Enriched {
    pub fn contains(&self, session_id: &str) -> bool {
        self.keys.contains(&digest(session_id.as_bytes()))
    }

    pub fn insert(&mut self, key: &[u8]) {
        self.keys.insert(digest(key));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Reads the keys of `kafka.output_topic` up to its current end offsets;
/// `progress` is called with the records read so far and the total.
/// `None` when `stop` came first.
pub fn read(
    k: &KafkaSettings,
    stop: &CancellationToken,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Option<Enriched>> {
    let topic = &k.output_topic;
    let consumer: BaseConsumer = kafka::reader_config(k)
        .create()
        .map_err(kafka::config_error(k, "creating the output topic's reader"))?;
    let wait = Timeout::After(Duration::from_secs(30));
    let metadata = consumer
        .fetch_metadata(Some(topic), wait)
        .with_context(|| format!("reading the partitions of {topic}"))?;
    let partitions: Vec<i32> = (metadata.topics().iter())
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut open = HashSet::new();
    let mut total = 0u64;
    let mut ends = std::collections::HashMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, wait)
            .with_context(|| format!("reading the end offsets of {topic}"))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            open.insert(p);
            ends.insert(p, high);
            total += (high - low) as u64;
        }
    }
    // Sized once for every record: no rehash doubling the set at its peak.
    let mut enriched = Enriched {
        keys: HashSet::with_capacity(total as usize),
    };
    if open.is_empty() {
        return Ok(Some(enriched));
    }
    consumer.assign(&tpl)?;
    let mut read = 0u64;
    while !open.is_empty() {
        if stop.is_cancelled() {
            return Ok(None);
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                let end = ends[&m.partition()];
                if m.offset() < end {
                    read += 1;
                    if let Some(key) = m.key() {
                        enriched.insert(key);
                    }
                    if read.is_multiple_of(10_000) {
                        progress(read, total);
                    }
                }
                if m.offset() + 1 >= end {
                    open.remove(&m.partition());
                }
            }
            // The end of a partition (retention may have removed its last
            // records since the end offsets were taken).
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, topic, "reading the output topic failed; retrying");
            }
        }
    }
    progress(read, total);
    info!(
        topic,
        records = read,
        keys = enriched.len(),
        "enriched sessions read"
    );
    Ok(Some(enriched))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_their_digest() {
        let mut e = Enriched::default();
        e.insert(b"acf528a2-0001");
        assert!(e.contains("acf528a2-0001"));
        assert!(!e.contains("acf528a2-0002"));
        assert_ne!(digest(b"a"), digest(b"b"));
        assert_eq!(digest(b"a"), digest(b"a"));
    }
}
