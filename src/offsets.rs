//! Per-partition offset tracking: records finish out of order, but the offset
//! stored for commit is always the lowest one not yet finished, so a crash
//! re-delivers and never skips.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

/// One partition's records in flight.
#[derive(Debug, Default)]
pub struct PartitionTracker {
    pending: BTreeSet<i64>,
    /// One past the highest offset started.
    next_after_seen: Option<i64>,
    /// The last position reported as safe to commit (at first: where
    /// consumption began).
    reported: Option<i64>,
}

impl PartitionTracker {
    /// A record at `offset` was received and is being processed.
    pub fn start(&mut self, offset: i64) {
        self.pending.insert(offset);
        // The position before the first record is where consumption began:
        // nothing to report until the position passes it.
        self.reported.get_or_insert(offset);
        self.next_after_seen = Some(
            self.next_after_seen
                .map_or(offset + 1, |n| n.max(offset + 1)),
        );
    }

    /// The record at `offset` is acknowledged downstream. Returns the new
    /// position to commit (the next offset to consume) when it advanced.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        if !self.pending.remove(&offset) {
            return None;
        }
        let safe = match self.pending.first() {
            Some(&lowest) => lowest,
            None => self.next_after_seen?,
        };
        if self.reported.is_some_and(|r| r >= safe) {
            return None;
        }
        self.reported = Some(safe);
        Some(safe)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// Identifies a partition's tracker across rebalances: a completion that
/// carries an old id belongs to a revoked assignment and is ignored.
pub type TrackerId = u64;

static NEXT_TRACKER: AtomicU64 = AtomicU64::new(1);

/// The trackers of all currently assigned partitions.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), (TrackerId, PartitionTracker)>,
}

impl OffsetTracker {
    /// Records that `offset` started; creates the partition's tracker on the
    /// first record after an assignment.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) -> TrackerId {
        let (id, tracker) = self
            .partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                (
                    NEXT_TRACKER.fetch_add(1, Ordering::Relaxed),
                    PartitionTracker::default(),
                )
            });
        tracker.start(offset);
        *id
    }

    /// Records that `offset` finished; returns the position to store when it
    /// advanced. A completion for a revoked (or re-assigned) partition
    /// returns `None`: it is late, not wrong.
    pub fn finish(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        id: TrackerId,
    ) -> Option<i64> {
        match self.partitions.get_mut(&(topic.to_string(), partition)) {
            Some((current, tracker)) if *current == id => tracker.finish(offset),
            _ => None,
        }
    }

    /// Drops the trackers of revoked partitions.
    pub fn revoke(&mut self, revoked: impl IntoIterator<Item = (String, i32)>) {
        for key in revoked {
            self.partitions.remove(&key);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|(_, t)| t.in_flight()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completions_advance_one_by_one() {
        let mut t = PartitionTracker::default();
        for o in 10..13 {
            t.start(o);
        }
        assert_eq!(t.finish(10), Some(11));
        assert_eq!(t.finish(11), Some(12));
        assert_eq!(t.finish(12), Some(13));
    }

    #[test]
    fn out_of_order_completions_wait_for_the_lowest() {
        let mut t = PartitionTracker::default();
        for o in 0..5 {
            t.start(o);
        }
        assert_eq!(t.finish(3), None);
        assert_eq!(t.finish(1), None);
        assert_eq!(t.finish(4), None);
        assert_eq!(t.finish(0), Some(2)); // 2 is still pending
        assert_eq!(t.finish(2), Some(5));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps.
        let mut t = PartitionTracker::default();
        t.start(100);
        t.start(105);
        assert_eq!(t.finish(105), None);
        assert_eq!(t.finish(100), Some(106));
    }

    #[test]
    fn unknown_or_repeated_completions_are_ignored() {
        let mut t = PartitionTracker::default();
        t.start(1);
        assert_eq!(t.finish(7), None);
        assert_eq!(t.finish(1), Some(2));
        assert_eq!(t.finish(1), None);
    }

    #[test]
    fn never_reports_past_an_unfinished_record_exhaustively() {
        // Every completion order of 6 records: the reported position never
        // passes an unfinished offset and ends at one past the last.
        fn permutations(items: Vec<i64>) -> Vec<Vec<i64>> {
            if items.len() <= 1 {
                return vec![items];
            }
            let mut out = Vec::new();
            for i in 0..items.len() {
                let mut rest = items.clone();
                let x = rest.remove(i);
                for mut p in permutations(rest) {
                    p.insert(0, x);
                    out.push(p);
                }
            }
            out
        }
        for order in permutations((0..6).collect()) {
            let mut t = PartitionTracker::default();
            (0..6).for_each(|o| t.start(o));
            let mut done = BTreeSet::new();
            let mut last = None;
            for o in &order {
                done.insert(*o);
                if let Some(p) = t.finish(*o) {
                    assert!((0..p).all(|x| done.contains(&x)), "{order:?} reported {p}");
                    last = Some(p);
                }
            }
            assert_eq!(last, Some(6), "{order:?}");
        }
    }

    #[test]
    fn late_completion_after_revoke_is_ignored() {
        let mut all = OffsetTracker::default();
        let old = all.start("in", 0, 5);
        all.revoke([("in".to_string(), 0)]);
        let new = all.start("in", 0, 3); // re-assigned, re-delivered from 3
        assert_ne!(old, new);
        assert_eq!(all.finish("in", 0, 5, old), None);
        assert_eq!(all.finish("in", 0, 3, new), Some(4));
        assert_eq!(all.finish("in", 1, 0, new), None);
    }
}
