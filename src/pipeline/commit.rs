//! The worker commits its input offsets itself, each with the records
//! finished beyond it in the commit's metadata (see [`crate::offsets`]):
//! every `kafka.commit_interval` for the partitions where something
//! finished, at a revocation for the revoked ones (after the drain), and
//! once more at shutdown. librdkafka's own commit would leave out a
//! partition whose position did not move, and with it what finished past a
//! record waiting in its backoff.
//!
//! On assignment the committed metadata is read back, so records finished
//! before are skipped instead of being written again.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::offsets::{Assignment, Commit};

/// How long reading the committed offsets of new partitions may take.
const READ_COMMITTED: Duration = Duration::from_secs(5);

/// Commits `commits` (none: nothing to do).
pub fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    commits: &[Commit],
    mode: CommitMode,
) -> KafkaResult<()> {
    if commits.is_empty() {
        return Ok(());
    }
    match consumer.commit(&offsets_list(commits)?, mode) {
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
        other => other,
    }
}

/// The commits as a partition list, offsets with their metadata.
pub fn offsets_list(commits: &[Commit]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(commits.len());
    for c in commits {
        let mut e = tpl.add_partition(&c.topic, c.partition);
        e.set_offset(Offset::Offset(c.offset))?;
        if !c.metadata.is_empty() {
            e.set_metadata(&c.metadata);
        }
    }
    Ok(tpl)
}

/// Whether a failed commit says the metadata was too long for the broker.
pub fn metadata_too_long(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::ConsumerCommit(RDKafkaErrorCode::OffsetMetadataTooLarge)
    )
}

/// Reads the committed offsets of newly assigned partitions and hands
/// their metadata to `assignment`. A failure costs duplicates, not records:
/// every record past the committed offset is then processed again.
pub fn restore<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    assignment: &Assignment,
    assigned: &TopicPartitionList,
) {
    let committed = match consumer.committed_offsets(assigned.clone(), READ_COMMITTED) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "reading the committed offsets failed; records finished before are processed again");
            return;
        }
    };
    for e in committed.elements() {
        let Offset::Offset(offset) = e.offset() else {
            continue;
        };
        // Bytes that are not UTF-8 (another client's metadata) make
        // rdkafka panic, which must not cross librdkafka's callback.
        let text = std::panic::catch_unwind(AssertUnwindSafe(|| e.metadata().to_string()));
        let Ok(metadata) = text else {
            warn!(
                partition = e.partition(),
                "commit metadata is not text; ignored"
            );
            continue;
        };
        match assignment.restore(e.topic(), e.partition(), offset, &metadata) {
            Ok(0) => {}
            Ok(finished) => info!(
                partition = e.partition(),
                committed = offset,
                finished,
                "records finished before the last owner stopped are skipped"
            ),
            Err(err) => debug!(partition = e.partition(), error = %err, "commit metadata ignored"),
        }
    }
}
