//! Where each partition of the dead-letter topic starts (the replay
//! group's committed offset) and ends (the high watermark at the start),
//! and the progress committed as records are done.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::offsets::PartitionTracker;

/// The replay group's positions: per partition, the contiguous prefix of
/// records that are done.
#[derive(Default)]
pub(super) struct Progress {
    trackers: HashMap<i32, PartitionTracker>,
    /// Positions that advanced since the last commit.
    pub(super) pending: HashMap<i32, i64>,
    /// The latest position of every partition.
    pub(super) latest: HashMap<i32, i64>,
}

impl Progress {
    pub(super) fn start(&mut self, partition: i32, offset: i64) {
        self.trackers.entry(partition).or_default().start(offset);
    }

    pub(super) fn done(&mut self, partition: i32, offset: i64) {
        if let Some(next) = self
            .trackers
            .get_mut(&partition)
            .and_then(|t| t.finish(offset))
        {
            self.pending.insert(partition, next);
            self.latest.insert(partition, next);
        }
    }
}

pub(super) fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    to_commit: &mut HashMap<i32, i64>,
    mode: CommitMode,
) {
    if to_commit.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in to_commit.iter() {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => to_commit.clear(),
        Err(e) => warn!(error = %e, "committing the replay's progress failed; retried"),
    }
}

/// The group's committed offsets, asked again while the group's coordinator
/// is still being found or loaded (a new group on a new cluster answers
/// NOT_COORDINATOR for a moment), for up to 30 s.
fn committed_offsets(
    consumer: &StreamConsumer,
    tpl: &TopicPartitionList,
) -> rdkafka::error::KafkaResult<TopicPartitionList> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut delay = Duration::from_millis(100);
    loop {
        match consumer.committed_offsets(tpl.clone(), Timeout::After(Duration::from_secs(10))) {
            Err(KafkaError::MetadataFetch(
                C::NotCoordinator | C::CoordinatorLoadInProgress | C::CoordinatorNotAvailable,
            )) if Instant::now() + delay < deadline => {
                warn!(retry_in = ?delay, "the group coordinator is not ready yet; asking again");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            result => return result,
        }
    }
}

/// Where each partition of `topic` starts (the group's committed offset,
/// else the beginning) and ends (the high watermark now).
pub(super) fn start_and_end(
    consumer: &StreamConsumer,
    topic: &str,
) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
    let timeout = Timeout::After(Duration::from_secs(30));
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let parts = md
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .with_context(|| format!("topic `{topic}` (kafka.dead_letter_topic) does not exist"))?
        .partitions()
        .len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(topic, p);
    }
    let committed = committed_offsets(consumer, &tpl)?;
    let mut out = HashMap::new();
    for p in 0..parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let start = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        out.insert(p, (start, high));
    }
    Ok(out)
}
