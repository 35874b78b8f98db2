//! The consumer's callbacks: a revocation drains the revoked partitions'
//! records for `pipeline.revoke_drain`, then cancels and forgets them; an
//! assigned partition takes the consume loop's pause state; commits and
//! librdkafka's statistics go to the metrics, its logs to `tracing`. The
//! revoked partitions' last commits are sent before they move, and an
//! assigned partition's commit metadata is read back ([`commit`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientContext, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::commit;
use crate::offsets::Assignment;
use crate::stats::Stats;

/// What the consumer's callbacks need.
pub struct WorkerContext {
    assignment: Arc<Assignment>,
    stats: Arc<Stats>,
    /// The consume loop's pause state, for partitions assigned meanwhile
    /// (librdkafka keeps an application pause across a revocation).
    paused: AtomicBool,
    revoke_drain: Duration,
    /// Whether the revoked partitions' offsets are committed here; with
    /// transactions they are committed with their outputs only.
    commits: bool,
}

impl WorkerContext {
    pub fn new(
        assignment: Arc<Assignment>,
        stats: Arc<Stats>,
        revoke_drain: Duration,
        commits: bool,
    ) -> Self {
        WorkerContext {
            assignment,
            stats,
            paused: AtomicBool::new(false),
            revoke_drain,
            commits,
        }
    }

    /// The pause state partitions assigned from now on take.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

/// Runs `f`, which blocks, without stalling the runtime: on a
/// multi-threaded runtime's worker the other tasks move to other threads.
/// `None` on a current-thread runtime, where blocking would stop the very
/// tasks being waited for.
fn blocking<T>(f: impl FnOnce() -> T) -> Option<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::CurrentThread) => None,
        Ok(_) => Some(tokio::task::block_in_place(f)),
        Err(_) => Some(f()),
    }
}

impl ClientContext for WorkerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::log_librdkafka(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.stats.kafka_statistics(&statistics);
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = partitions(tpl);
            // Records that finish within the drain store their offsets
            // (committed with the revocation); the rest are cancelled. A
            // lost assignment (session timed out) commits nothing: no drain.
            let lost = consumer.assignment_lost();
            let drain = if lost {
                Duration::ZERO
            } else {
                self.revoke_drain
            };
            // Records waiting for a held tenant or the breaker cannot
            // finish within the drain: it does not wait for them.
            let waiting = || self.stats.records_waiting_at_gate();
            let done = blocking(|| self.assignment.revoke(&revoked, drain, waiting))
                .unwrap_or_else(|| self.assignment.revoke(&revoked, Duration::ZERO, waiting));
            if !lost && self.commits {
                // What finished is committed before the partitions move
                // (with transactions, it was: a record finishes when the
                // transaction with its output and offset is committed).
                let committed =
                    blocking(|| commit::commit(consumer, &done.commits, CommitMode::Sync))
                        .unwrap_or_else(|| {
                            commit::commit(consumer, &done.commits, CommitMode::Async)
                        });
                if let Err(e) = committed {
                    warn!(error = %e, partitions = ?revoked, "commit at revocation failed; the next owner re-reads what finished since the last commit");
                }
            }
            info!(
                lost,
                partitions = ?revoked,
                drained = done.drained,
                cancelled = done.cancelled,
                not_waited_for = done.not_waited_for,
                "partitions revoked"
            );
            self.stats.partitions_changed(&revoked, false);
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                if blocking(|| commit::restore(consumer, &self.assignment, tpl)).is_none() {
                    debug!("commit metadata not read on a current-thread runtime");
                }
                let paused = self.paused.load(Ordering::SeqCst);
                info!(partitions = ?assigned, paused, "partitions assigned");
                let applied = if paused {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(e) = applied {
                    warn!(error = %e, "setting the pause state of assigned partitions failed");
                }
                self.stats.partitions_changed(&assigned, true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.stats.offsets_committed(true);
                debug!(offsets = ?offsets.to_topic_map(), "offsets committed")
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.stats.offsets_committed(false);
                if commit::metadata_too_long(&e) {
                    error!(
                        error = %e,
                        "the brokers refused the commit metadata as too long (offset.metadata.max.bytes); \
                         committing without it from now on: lower kafka.commit_metadata_max_bytes"
                    );
                    self.assignment.metadata_refused();
                }
                let failed = offsets.elements();
                (self.assignment).commit_failed(failed.iter().map(|e| (e.topic(), e.partition())));
                warn!(error = %e, "offset commit failed; it is retried at the next interval")
            }
        }
    }
}
