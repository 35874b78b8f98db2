//! What `kafka.delivery = "exactly_once"` asks of the trackers: which
//! outputs may join a transaction (those with every record below them in
//! their partition done), the commits a transaction carries (computed as
//! if its records were finished, without finishing them), and finishing
//! them once the transaction is committed.
//!
//! A record's output is committed in the transaction that commits an
//! offset past it: the offset a partition's next owner starts from never
//! leaves behind an output that is visible, nor passes one that is not.

use super::{Assignment, Commit, OffsetTracker, PartitionTracker, TrackerId};
use std::sync::atomic::Ordering;

/// One input record: its partition's tracker and its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub id: TrackerId,
}

/// Where a partition's staged outputs stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Outputs below this offset may join a transaction (`None`: all of
    /// them): everything before them in the partition is staged or done.
    pub below: Option<i64>,
    /// Outputs from this offset on never can: a record below them was
    /// given up unfinished (shutdown), so no offset past it is committed.
    pub given_up_from: Option<i64>,
}

impl PartitionTracker {
    fn ready(&self, staged: impl Fn(i64) -> bool) -> Ready {
        let unstaged = self.pending.iter().copied().find(|&o| !staged(o));
        let given_up_from = self.abandoned.first().copied();
        let below = match (unstaged, given_up_from) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ready {
            below,
            given_up_from,
        }
    }

    /// A record given up unfinished: no longer in flight, and the position
    /// never passes it.
    fn give_up(&mut self, offset: i64) {
        if self.pending.remove(&offset) {
            self.abandoned.insert(offset);
        }
    }
}

impl OffsetTracker {
    /// The commits of the partitions in `batch` (as if its records were
    /// finished) and of those where something finished since the last
    /// commit; nothing changes.
    fn commits_finishing(&self, max_bytes: usize, batch: &[Place]) -> Vec<Commit> {
        let mut commits: Vec<Commit> = (self.partitions.iter())
            .filter_map(|((topic, partition), owned)| {
                let mine = batch
                    .iter()
                    .filter(|p| &p.topic == topic && p.partition == *partition && p.id == owned.id);
                let mut tracker = owned.tracker.clone();
                for p in mine {
                    tracker.finish(p.offset);
                }
                let (offset, finished) = tracker.commit()?;
                Some(Commit {
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    metadata: finished.encode(offset, max_bytes),
                })
            })
            .collect();
        commits.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        commits
    }
}

impl Assignment {
    /// Where the staged outputs of a partition (of tracker `id`) stand;
    /// `None` when the partition is no longer this tracker's (revoked).
    pub fn ready(
        &self,
        topic: &str,
        partition: i32,
        id: TrackerId,
        staged: impl Fn(i64) -> bool,
    ) -> Option<Ready> {
        let tracker = self.tracker.lock().unwrap();
        let owned = tracker.partitions.get(&(topic.to_string(), partition))?;
        (owned.id == id).then(|| owned.tracker.ready(staged))
    }

    /// The commits a transaction carrying `batch`'s outputs sends.
    pub fn commits_finishing(&self, batch: &[Place]) -> Vec<Commit> {
        let max = self.metadata_max_bytes.load(Ordering::Relaxed);
        self.tracker.lock().unwrap().commits_finishing(max, batch)
    }

    /// The transaction that sent `commits` with `batch`'s outputs is
    /// committed: its records are finished, and a partition whose commit
    /// is still the one sent has nothing new to commit.
    pub fn committed(&self, batch: &[Place], commits: &[Commit]) {
        let max = self.metadata_max_bytes.load(Ordering::Relaxed);
        let mut tracker = self.tracker.lock().unwrap();
        for p in batch {
            tracker.finish(&p.topic, p.partition, p.offset, p.id);
        }
        for c in commits {
            let Some(owned) = (tracker.partitions).get_mut(&(c.topic.clone(), c.partition)) else {
                continue;
            };
            let now = owned.tracker.commit();
            let same = now.is_some_and(|(offset, finished)| {
                offset == c.offset && finished.encode(offset, max) == c.metadata
            });
            owned.tracker.changed |= !same;
        }
        drop(tracker);
        self.finished.notify_all();
    }

    /// A record given up unfinished (shutdown or revocation came first);
    /// one of a revoked (or re-assigned) partition is ignored, as in
    /// [`Assignment::finish`].
    pub fn give_up(&self, topic: &str, partition: i32, offset: i64, id: TrackerId) {
        let mut tracker = self.tracker.lock().unwrap();
        if let Some(owned) = (tracker.partitions).get_mut(&(topic.to_string(), partition))
            && owned.id == id
        {
            owned.tracker.give_up(offset);
        }
        drop(tracker);
        self.finished.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn place(offset: i64, id: TrackerId) -> Place {
        Place {
            topic: "in".into(),
            partition: 0,
            offset,
            id,
        }
    }

    fn started(offsets: &[i64]) -> (Assignment, TrackerId) {
        let a = Assignment::new(4096);
        let stop = CancellationToken::new();
        let mut id = 0;
        for &o in offsets {
            id = a.start("in", 0, o, &stop).run().id;
        }
        (a, id)
    }

    #[test]
    fn only_outputs_with_everything_below_them_staged_are_ready() {
        let (a, id) = started(&[10, 11, 12, 13]);
        let staged = |o: i64| o == 10 || o == 12 || o == 13;
        let ready = a.ready("in", 0, id, staged).unwrap();
        assert_eq!(ready.below, Some(11));
        let all = a.ready("in", 0, id, |_| true).unwrap();
        assert_eq!(all.below, None);
        assert_eq!(a.ready("in", 0, id + 1, |_| true), None);
    }

    #[test]
    fn a_transaction_commits_past_its_records_and_finishes_them_only_once_committed() {
        let (a, id) = started(&[10, 11, 12]);
        let batch = [place(10, id), place(11, id)];
        let commits = a.commits_finishing(&batch);
        assert_eq!(commits.len(), 1);
        assert_eq!(commits[0].offset, 12);
        // Nothing finished yet: a transaction aborted leaves all in flight.
        assert_eq!(a.in_flight(), 3);
        a.committed(&batch, &commits);
        assert_eq!(a.in_flight(), 1);
        // What was committed is not committed again.
        assert!(a.commits_finishing(&[]).is_empty());
    }

    #[test]
    fn outputs_behind_a_record_given_up_are_never_ready() {
        let (a, id) = started(&[10, 11, 12]);
        a.give_up("in", 0, 11, id);
        let ready = a.ready("in", 0, id, |o| o != 11).unwrap();
        assert_eq!(ready.below, Some(11));
        assert_eq!(ready.given_up_from, Some(11));
        let commits = a.commits_finishing(&[place(10, id)]);
        assert_eq!(commits[0].offset, 11);
    }
}
