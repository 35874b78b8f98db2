//! Per-partition offset tracking: records finish out of order, but the offset
//! stored for commit is always the lowest one not yet finished, so a crash
//! re-delivers and never skips.
//!
//! [`Assignment`] is the shared form the worker uses: the record tasks
//! finish their records (and store the new position themselves, so finished
//! work is stored even when the consume loop is busy or shutting down), the
//! rebalance callback drains and forgets revoked partitions, and the loop
//! settles idle partitions at the consumer's position.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

mod finished;
mod transactional;
pub use finished::{Finished, Unreadable};
pub use transactional::{Place, Ready};

/// One partition's records in flight.
#[derive(Debug, Default, Clone)]
pub struct PartitionTracker {
    pending: BTreeSet<i64>,
    /// One past the highest offset started.
    next_after_seen: Option<i64>,
    /// The last position reported as safe to commit (at first: where
    /// consumption began).
    reported: Option<i64>,
    /// Offsets given up unfinished (at shutdown): no longer in flight, but
    /// the position never passes them and they are not finished.
    abandoned: BTreeSet<i64>,
    /// Offsets a commit's metadata said were finished before this
    /// assignment: skipped when they come again.
    finished_before: Finished,
    /// Something finished since the last [`PartitionTracker::commit`].
    changed: bool,
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
        self.changed = true;
        let safe = match self.pending.first() {
            Some(&lowest) => lowest,
            None => self.next_after_seen?,
        };
        let safe = self.abandoned.first().map_or(safe, |&a| a.min(safe));
        if self.reported.is_some_and(|r| r >= safe) {
            return None;
        }
        self.reported = Some(safe);
        Some(safe)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Gives up what is still pending (shutdown: its tasks are gone): none
    /// of it is in flight any more, and the position stays before the
    /// lowest of it. Returns how many.
    pub fn abandon_pending(&mut self) -> usize {
        let pending = std::mem::take(&mut self.pending);
        let n = pending.len();
        self.abandoned.extend(pending);
        n
    }

    /// Whether a commit's metadata said `offset` was finished before.
    pub fn finished_before(&self, offset: i64) -> bool {
        self.finished_before.contains(offset)
    }

    /// The position to commit and the records finished beyond it (those
    /// seen and no longer pending or abandoned, and those finished before
    /// this assignment that have not come again), when something finished
    /// since the last call.
    pub fn commit(&mut self) -> Option<(i64, Finished)> {
        let position = self.reported.filter(|_| self.changed)?;
        self.changed = false;
        let seen_end = self.next_after_seen.unwrap_or(position).max(position);
        let mut unfinished: Vec<i64> = (self.pending.range(position..))
            .chain(self.abandoned.range(position..))
            .copied()
            .collect();
        if !self.abandoned.is_empty() {
            unfinished.sort_unstable();
        }
        let mut cursor = position;
        let mut runs = Vec::with_capacity(unfinished.len() + 1);
        for offset in unfinished.into_iter().chain([seen_end]) {
            runs.push((cursor, offset));
            cursor = offset + 1;
        }
        runs.extend(self.finished_before.runs_from(seen_end));
        Some((position, Finished::from_runs(runs)))
    }

    /// With nothing pending, the consumer's `position` (past transaction
    /// markers and compacted gaps that deliver no record) becomes the
    /// position to commit. Returns it when it advanced.
    pub fn settle(&mut self, position: i64) -> Option<i64> {
        if !self.pending.is_empty()
            || !self.abandoned.is_empty()
            || self.reported.is_some_and(|r| r >= position)
        {
            return None;
        }
        self.reported = Some(position);
        self.changed = true;
        self.next_after_seen = Some(self.next_after_seen.map_or(position, |n| n.max(position)));
        Some(position)
    }
}

/// Identifies a partition's tracker across rebalances: a completion that
/// carries an old id belongs to a revoked assignment and is ignored.
pub type TrackerId = u64;

static NEXT_TRACKER: AtomicU64 = AtomicU64::new(1);

/// One assigned partition: its tracker, the token that cancels its
/// records when it is revoked or the worker stops, and the one that says
/// it was revoked.
#[derive(Debug)]
struct Owned {
    id: TrackerId,
    tracker: PartitionTracker,
    cancel: CancellationToken,
    revoked: CancellationToken,
}

/// The trackers of all currently assigned partitions.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), Owned>,
    /// When partitions were last revoked, for [`OffsetTracker::settle`].
    revoked_at: HashMap<(String, i32), Instant>,
    /// Assigned partitions' finished offsets read from their commit
    /// metadata, until the partition's first record creates its tracker.
    restored: HashMap<(String, i32), Finished>,
}

/// A partition's position to commit and the metadata that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub metadata: String,
}

/// After a partition is revoked, the consumer's `position()` for it stays
/// the old assignment's until librdkafka's fetcher has stopped (it then
/// reads INVALID until the first record of the new assignment): a
/// partition assigned back within this long is not settled before one of
/// its records arrived.
const STALE_POSITION_AFTER_REVOKE: Duration = Duration::from_secs(10);

/// A record's start: run it, or it was finished before this assignment
/// (with the position to store when that advanced it).
#[derive(Debug)]
pub enum Start {
    Run(Ticket),
    FinishedBefore(Option<i64>),
}

#[cfg(test)]
impl Start {
    fn run(self) -> Ticket {
        match self {
            Start::Run(ticket) => ticket,
            Start::FinishedBefore(_) => panic!("finished before"),
        }
    }
}

/// What a record task holds: which tracker it belongs to, the token that
/// is cancelled when its partition is revoked or the worker stops (waits
/// end, no new call starts), and the one cancelled only when the partition
/// was revoked: from then on the record is another owner's, and nothing of
/// it may be written here.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub id: TrackerId,
    pub cancel: CancellationToken,
    pub revoked: CancellationToken,
}

impl OffsetTracker {
    fn owned(&mut self, topic: &str, partition: i32, parent: &CancellationToken) -> &mut Owned {
        let key = (topic.to_string(), partition);
        let restored = &mut self.restored;
        self.partitions.entry(key).or_insert_with_key(|key| Owned {
            id: NEXT_TRACKER.fetch_add(1, Ordering::Relaxed),
            tracker: PartitionTracker {
                finished_before: restored.remove(key).unwrap_or_default(),
                ..PartitionTracker::default()
            },
            cancel: parent.child_token(),
            revoked: CancellationToken::new(),
        })
    }

    /// What a newly assigned partition's commit metadata said was finished.
    pub fn restore(&mut self, topic: &str, partition: i32, finished: Finished) {
        let key = (topic.to_string(), partition);
        if !self.partitions.contains_key(&key) {
            self.restored.insert(key, finished);
        }
    }

    /// The commits of the partitions where something finished since the
    /// last call (of all of them with `all`), with metadata of at most
    /// `max_bytes`; `only` limits them to some partitions.
    pub fn commits(
        &mut self,
        max_bytes: usize,
        all: bool,
        only: Option<&[(String, i32)]>,
    ) -> Vec<Commit> {
        let mut commits = (self.partitions.iter_mut())
            .filter(|(key, _)| only.is_none_or(|keys| keys.contains(key)))
            .filter_map(|((topic, partition), owned)| {
                owned.tracker.changed |= all;
                let (offset, finished) = owned.tracker.commit()?;
                Some(Commit {
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    metadata: finished.encode(offset, max_bytes),
                })
            })
            .collect::<Vec<_>>();
        commits.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        commits
    }

    /// Records that `offset` started; creates the partition's tracker on the
    /// first record after an assignment, its token a child of `parent`. A
    /// record the commit metadata said was finished is finished at once.
    pub fn start(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        parent: &CancellationToken,
    ) -> Start {
        let owned = self.owned(topic, partition, parent);
        owned.tracker.start(offset);
        let ticket = Ticket {
            id: owned.id,
            cancel: owned.cancel.clone(),
            revoked: owned.revoked.clone(),
        };
        if owned.tracker.finished_before(offset) {
            return Start::FinishedBefore(owned.tracker.finish(offset));
        }
        Start::Run(ticket)
    }

    /// Settles a partition with nothing pending at the consumer's
    /// `position` ([`PartitionTracker::settle`]).
    pub fn settle(
        &mut self,
        topic: &str,
        partition: i32,
        position: i64,
        parent: &CancellationToken,
    ) -> Option<i64> {
        let key = (topic.to_string(), partition);
        self.revoked_at
            .retain(|_, at| at.elapsed() < STALE_POSITION_AFTER_REVOKE);
        if !self.partitions.contains_key(&key) && self.revoked_at.contains_key(&key) {
            // No record of this assignment yet: the position may be the
            // last one's, past records nobody finished.
            return None;
        }
        self.owned(topic, partition, parent)
            .tracker
            .settle(position)
    }

    /// Records in flight in the given partitions.
    pub fn in_flight_of(&self, partitions: &[(String, i32)]) -> usize {
        partitions
            .iter()
            .filter_map(|k| self.partitions.get(k))
            .map(|o| o.tracker.in_flight())
            .sum()
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
            Some(owned) if owned.id == id => owned.tracker.finish(offset),
            _ => None,
        }
    }

    /// Drops the trackers of revoked partitions and cancels their records;
    /// returns how many were cancelled.
    pub fn revoke<'a>(&mut self, revoked: impl IntoIterator<Item = &'a (String, i32)>) -> usize {
        let now = Instant::now();
        revoked
            .into_iter()
            .inspect(|key| {
                self.revoked_at.insert((*key).clone(), now);
                self.restored.remove(*key);
            })
            .filter_map(|key| self.partitions.remove(key))
            .map(|owned| {
                owned.revoked.cancel();
                owned.cancel.cancel();
                owned.tracker.in_flight()
            })
            .sum()
    }

    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|o| o.tracker.in_flight())
            .sum()
    }

    fn abandon_pending(&mut self) -> usize {
        (self.partitions.values_mut())
            .map(|o| o.tracker.abandon_pending())
            .sum()
    }
}

/// How a revocation went: records that finished within the drain, and
/// records cancelled (re-delivered to the partition's next owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revoked partitions' last commits (what finished is final).
    pub commits: Vec<Commit>,
    pub drained: usize,
    pub cancelled: usize,
    /// Of those cancelled, how many were not waited for: every record in
    /// flight was waiting for a held tenant or the breaker.
    pub not_waited_for: usize,
}

/// The [`OffsetTracker`] shared by the consume loop, the record tasks and
/// the rebalance callback.
#[derive(Debug, Default)]
pub struct Assignment {
    tracker: Mutex<OffsetTracker>,
    /// Notified whenever a record finishes (a revocation waits on it).
    finished: Condvar,
    /// Longest commit metadata (`kafka.commit_metadata_max_bytes`); 0 once
    /// the broker refused metadata that long.
    metadata_max_bytes: AtomicUsize,
}

impl Assignment {
    pub fn new(metadata_max_bytes: usize) -> Self {
        Assignment {
            metadata_max_bytes: AtomicUsize::new(metadata_max_bytes),
            ..Assignment::default()
        }
    }

    pub fn start(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        parent: &CancellationToken,
    ) -> Start {
        self.tracker
            .lock()
            .unwrap()
            .start(topic, partition, offset, parent)
    }

    /// Reads a newly assigned partition's commit metadata (committed at
    /// `offset`); returns how many records beyond it were finished.
    pub fn restore(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        metadata: &str,
    ) -> Result<u64, Unreadable> {
        let finished = Finished::decode(offset, metadata)?;
        let n = finished.len();
        (self.tracker.lock().unwrap()).restore(topic, partition, finished);
        Ok(n)
    }

    /// The commits due: of the partitions where something finished since
    /// the last call, or of all of them with `all` (shutdown).
    pub fn commits(&self, all: bool) -> Vec<Commit> {
        let max = self.metadata_max_bytes.load(Ordering::Relaxed);
        self.tracker.lock().unwrap().commits(max, all, None)
    }

    /// A commit of these partitions failed: they are committed again at
    /// the next interval, finished or not meanwhile.
    pub fn commit_failed<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut tracker = self.tracker.lock().unwrap();
        for (topic, partition) in partitions {
            if let Some(owned) = tracker.partitions.get_mut(&(topic.to_string(), partition)) {
                owned.tracker.changed = true;
            }
        }
    }

    /// The broker refused the metadata as too long: commits carry none
    /// from now on (a crash re-delivers what finished past the position).
    pub fn metadata_refused(&self) {
        self.metadata_max_bytes.store(0, Ordering::Relaxed);
    }

    /// Finishes a record: the partition's new safe position when it
    /// advanced (decided under the lock, so a revocation cannot come
    /// between the decision and the next commit).
    pub fn finish(&self, topic: &str, partition: i32, offset: i64, id: TrackerId) -> Option<i64> {
        let next = self
            .tracker
            .lock()
            .unwrap()
            .finish(topic, partition, offset, id);
        self.finished.notify_all();
        next
    }

    /// Settles idle partitions at the consumer's positions (see
    /// [`PartitionTracker::settle`]): the partitions whose position moved.
    pub fn settle(
        &self,
        positions: impl IntoIterator<Item = (String, i32, i64)>,
        parent: &CancellationToken,
    ) -> Vec<(String, i32)> {
        let mut tracker = self.tracker.lock().unwrap();
        positions
            .into_iter()
            .filter(|(topic, partition, position)| {
                tracker
                    .settle(topic, *partition, *position, parent)
                    .is_some()
            })
            .map(|(topic, partition, _)| (topic, partition))
            .collect()
    }

    /// Waits up to `drain` for the revoked partitions' records to finish
    /// (each finished one stores its position meanwhile), then forgets the
    /// partitions and cancels what is still in flight there. It stops
    /// waiting early while every record in flight is one of `waiting()`
    /// (waiting for a held tenant or the breaker: none of them finishes).
    pub fn revoke(
        &self,
        revoked: &[(String, i32)],
        drain: Duration,
        waiting: impl Fn() -> usize,
    ) -> Revoked {
        let deadline = Instant::now() + drain;
        let mut tracker = self.tracker.lock().unwrap();
        let before = tracker.in_flight_of(revoked);
        let mut not_waited_for = 0;
        while tracker.in_flight_of(revoked) > 0 {
            if tracker.in_flight() <= waiting() {
                not_waited_for = tracker.in_flight_of(revoked);
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Woken by each finished record; the waiting count is looked at
            // again at least this often.
            let step = left.min(Duration::from_millis(100));
            tracker = self.finished.wait_timeout(tracker, step).unwrap().0;
        }
        let max = self.metadata_max_bytes.load(Ordering::Relaxed);
        let commits = tracker.commits(max, true, Some(revoked));
        let cancelled = tracker.revoke(revoked);
        Revoked {
            commits,
            drained: before - cancelled,
            cancelled,
            not_waited_for,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.tracker.lock().unwrap().in_flight()
    }

    /// At shutdown, once the record tasks are done or gone: what is still
    /// pending is given up ([`PartitionTracker::abandon_pending`]), so the
    /// revocation that closing the consumer brings waits for nothing.
    /// Returns how many records.
    pub fn abandon_pending(&self) -> usize {
        let abandoned = self.tracker.lock().unwrap().abandon_pending();
        self.finished.notify_all();
        abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(topic: &str, partition: i32, offset: i64, metadata: &str) -> Commit {
        Commit {
            topic: topic.into(),
            partition,
            offset,
            metadata: metadata.into(),
        }
    }

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
    fn late_completion_after_revoke_is_ignored_and_its_record_cancelled() {
        let stop = CancellationToken::new();
        let mut all = OffsetTracker::default();
        let old = all.start("in", 0, 5, &stop).run();
        assert_eq!(all.revoke(&[("in".to_string(), 0)]), 1);
        assert!(old.cancel.is_cancelled());
        let new = all.start("in", 0, 3, &stop).run(); // re-assigned, re-delivered from 3
        assert_ne!(old.id, new.id);
        assert!(!new.cancel.is_cancelled());
        assert_eq!(all.finish("in", 0, 5, old.id), None);
        assert_eq!(all.finish("in", 0, 3, new.id), Some(4));
        assert_eq!(all.finish("in", 1, 0, new.id), None);
        stop.cancel();
        assert!(
            new.cancel.is_cancelled(),
            "stopping cancels every partition"
        );
    }

    #[test]
    fn an_idle_partition_settles_at_the_position_past_a_transaction_marker() {
        let mut t = PartitionTracker::default();
        t.start(7);
        assert_eq!(t.settle(9), None, "a record is pending");
        assert_eq!(t.finish(7), Some(8));
        // The commit marker at 8: the consumer's position is 9.
        assert_eq!(t.settle(9), Some(9));
        assert_eq!(t.settle(9), None, "reported once");
        assert_eq!(t.settle(8), None, "never backwards");
        t.start(9);
        assert_eq!(t.finish(9), Some(10));
    }

    #[test]
    fn a_partition_that_delivered_nothing_settles_at_the_position() {
        let stop = CancellationToken::new();
        let mut all = OffsetTracker::default();
        assert_eq!(all.settle("in", 2, 41, &stop), Some(41));
        assert_eq!(all.settle("in", 2, 41, &stop), None);
    }

    #[test]
    fn records_given_up_at_shutdown_hold_the_position_and_no_drain() {
        let mut t = PartitionTracker::default();
        for o in 10..14 {
            t.start(o);
        }
        assert_eq!(t.finish(10), Some(11));
        // 11 and 12 were abandoned (their tasks ended), 13 never came back.
        assert_eq!(t.abandon_pending(), 3);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.finish(13), None, "a late completion moves nothing");
        assert_eq!(t.settle(14), None, "nor does the consumer's position");

        let stop = CancellationToken::new();
        let shared = Assignment::default();
        let _a = shared.start("in", 0, 5, &stop).run();
        let _b = shared.start("in", 1, 7, &stop).run();
        assert_eq!(shared.abandon_pending(), 2);
        // The revocation of closing: nothing to wait for, nothing to cancel
        // (a 60 s drain that waited would also report them cancelled).
        let revoked = shared.revoke(
            &[("in".to_string(), 0), ("in".to_string(), 1)],
            Duration::from_secs(60),
            || 0,
        );
        assert_eq!(
            revoked,
            Revoked {
                commits: vec![commit("in", 0, 5, ""), commit("in", 1, 7, "")],
                drained: 0,
                cancelled: 0,
                not_waited_for: 0,
            }
        );
    }

    #[test]
    fn a_partition_assigned_back_at_once_is_not_settled_at_the_old_position() {
        let stop = CancellationToken::new();
        let mut all = OffsetTracker::default();
        // Records 100..150 in flight; revoked (none finished, nothing
        // committed past 100) and assigned back.
        for o in 100..151 {
            all.start("in", 0, o, &stop).run();
        }
        all.revoke(&[("in".to_string(), 0)]);
        // The consumer's position is still the old assignment's: 151.
        assert_eq!(all.settle("in", 0, 151, &stop), None);
        // Once a record of the new assignment arrived, settling works again.
        let t = all.start("in", 0, 100, &stop).run();
        assert_eq!(all.finish("in", 0, 100, t.id), Some(101));
        assert_eq!(all.settle("in", 0, 120, &stop), Some(120));
        // Another partition never revoked settles at once.
        assert_eq!(all.settle("in", 1, 7, &stop), Some(7));
    }

    #[test]
    fn a_revocation_does_not_wait_for_records_that_wait_at_their_gate() {
        let stop = CancellationToken::new();
        let shared = Assignment::default();
        let _held = shared.start("in", 0, 0, &stop).run();
        // The one record in flight waits for its held tenant: a drain of a
        // minute would wait for nothing.
        let revoked = shared.revoke(&[("in".to_string(), 0)], Duration::from_secs(60), || 1);
        assert_eq!(
            revoked,
            Revoked {
                commits: vec![commit("in", 0, 0, "")],
                drained: 0,
                cancelled: 1,
                not_waited_for: 1
            }
        );
    }

    #[test]
    fn revoke_with_no_drain_cancels_only_the_revoked_partition() {
        let stop = CancellationToken::new();
        let shared = Assignment::default();
        let a = shared.start("in", 0, 0, &stop).run();
        let b = shared.start("in", 0, 1, &stop).run();
        let other = shared.start("in", 1, 0, &stop).run();
        let revoked = shared.revoke(&[("in".to_string(), 0)], Duration::ZERO, || 0);
        assert_eq!(
            revoked,
            Revoked {
                commits: vec![commit("in", 0, 0, "")],
                drained: 0,
                cancelled: 2,
                not_waited_for: 0,
            }
        );
        assert!(a.cancel.is_cancelled() && b.cancel.is_cancelled());
        assert!(a.revoked.is_cancelled() && b.revoked.is_cancelled());
        assert!(!other.cancel.is_cancelled() && !other.revoked.is_cancelled());
        assert_eq!(shared.in_flight(), 1);
        // Stopping the worker cancels the work, but the partition is still
        // this worker's: what finishes may be written.
        stop.cancel();
        assert!(other.cancel.is_cancelled() && !other.revoked.is_cancelled());
        assert_eq!(
            shared.finish("in", 0, 0, a.id),
            None,
            "a revoked partition moved"
        );
    }

    #[test]
    fn revoke_waits_for_records_that_finish_within_the_drain() {
        let stop = CancellationToken::new();
        let shared = std::sync::Arc::new(Assignment::default());
        let a = shared.start("in", 0, 0, &stop).run();
        let b = shared.start("in", 0, 1, &stop).run();
        let stored = std::sync::Arc::new(Mutex::new(Vec::new()));
        let finisher = {
            let (shared, stored) = (shared.clone(), stored.clone());
            std::thread::spawn(move || {
                for (offset, t) in [(1, b), (0, a)] {
                    stored
                        .lock()
                        .unwrap()
                        .extend(shared.finish("in", 0, offset, t.id));
                }
            })
        };
        // Ends as soon as both finished: a broken wait would run the whole
        // minute and cancel them.
        let revoked = shared.revoke(&[("in".to_string(), 0)], Duration::from_secs(60), || 0);
        finisher.join().unwrap();
        assert_eq!(revoked.cancelled, 0);
        assert_eq!(*stored.lock().unwrap(), vec![2]);
    }

    #[test]
    fn a_commit_carries_the_records_finished_past_its_position() {
        let mut t = PartitionTracker::default();
        assert_eq!(t.commit(), None, "nothing seen");
        for o in 10..20 {
            t.start(o);
        }
        assert_eq!(t.commit(), None, "nothing finished");
        // 11 waits in its backoff; the others finish around it.
        for o in [10, 12, 13, 15, 16, 17, 19] {
            t.finish(o);
        }
        let (position, finished) = t.commit().unwrap();
        assert_eq!(position, 11);
        assert_eq!(
            finished.runs_from(0).collect::<Vec<_>>(),
            [(12, 14), (15, 18), (19, 20)]
        );
        assert_eq!(t.commit(), None, "nothing new since");
        t.finish(14);
        let (position, finished) = t.commit().unwrap();
        assert_eq!(position, 11);
        assert_eq!(
            finished.runs_from(0).collect::<Vec<_>>(),
            [(12, 18), (19, 20)]
        );
    }

    #[test]
    fn records_given_up_at_shutdown_are_not_finished() {
        let mut t = PartitionTracker::default();
        for o in 0..6 {
            t.start(o);
        }
        for o in [0, 2, 4] {
            t.finish(o);
        }
        t.abandon_pending();
        let (position, finished) = t.commit().unwrap();
        assert_eq!(position, 1);
        assert_eq!(finished.runs_from(0).collect::<Vec<_>>(), [(2, 3), (4, 5)]);
    }

    #[test]
    fn records_finished_before_are_skipped_and_stay_finished_until_they_come() {
        let stop = CancellationToken::new();
        let all = Assignment::new(4096);
        // The last owner committed 100 with 101..103 and 105..200 finished.
        let before = Finished::from_runs([(101, 103), (105, 200)]);
        let n = all
            .restore("in", 0, 100, &before.encode(100, 4096))
            .unwrap();
        assert_eq!(n, 97);
        let a = all.start("in", 0, 100, &stop).run();
        assert!(matches!(
            all.start("in", 0, 101, &stop),
            Start::FinishedBefore(None)
        ));
        assert!(matches!(
            all.start("in", 0, 102, &stop),
            Start::FinishedBefore(None)
        ));
        let b = all.start("in", 0, 103, &stop).run();
        // A commit now keeps what has not come again as finished.
        let commits = all.commits(false);
        let runs = |c: &Commit| {
            let f = Finished::decode(c.offset, &c.metadata).unwrap();
            f.runs_from(0).collect::<Vec<_>>()
        };
        assert_eq!(commits[0].offset, 100);
        assert_eq!(runs(&commits[0]), [(101, 103), (105, 200)]);
        all.finish("in", 0, 100, a.id);
        all.finish("in", 0, 103, b.id);
        let commits = all.commits(false);
        assert_eq!(commits[0].offset, 104);
        assert_eq!(runs(&commits[0]), [(105, 200)]);
        // Finishing the record at the position moves it past the run.
        let c = all.start("in", 0, 104, &stop).run();
        assert!(matches!(
            all.start("in", 0, 105, &stop),
            Start::FinishedBefore(None)
        ));
        assert_eq!(all.finish("in", 0, 104, c.id), Some(106));
        assert!(matches!(
            all.start("in", 0, 106, &stop),
            Start::FinishedBefore(Some(107))
        ));
    }

    #[test]
    fn a_revocation_commits_what_finished_and_forgets_what_was_restored() {
        let stop = CancellationToken::new();
        let all = Assignment::new(4096);
        all.restore("in", 1, 0, &Finished::from_runs([(1, 2)]).encode(0, 4096))
            .unwrap();
        let a = all.start("in", 0, 0, &stop).run();
        let _b = all.start("in", 0, 1, &stop).run();
        all.finish("in", 0, 0, a.id);
        let revoked = all.revoke(
            &[("in".to_string(), 0), ("in".to_string(), 1)],
            Duration::ZERO,
            || 0,
        );
        assert_eq!(revoked.commits, [commit("in", 0, 1, "")]);
        // Assigned again without metadata: nothing is skipped.
        assert!(matches!(all.start("in", 1, 1, &stop), Start::Run(_)));
    }

    #[test]
    fn metadata_the_brokers_refused_is_not_sent_again() {
        let stop = CancellationToken::new();
        let all = Assignment::new(4096);
        for o in 0..3 {
            all.start("in", 0, o, &stop).run();
        }
        let t = all.start("in", 0, 3, &stop).run();
        all.finish("in", 0, 3, t.id);
        assert_ne!(all.commits(false)[0].metadata, "");
        all.metadata_refused();
        all.commit_failed([("in", 0)]);
        assert_eq!(all.commits(false), [commit("in", 0, 0, "")]);
    }
}
