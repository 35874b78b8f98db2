//! The worker's standing in its consumer group, for liveness: a worker whose
//! consumer has no group coordinator (librdkafka's group state other than
//! `up`), or that holds no partition and is not settled in its group (join
//! state other than `steady`), has lost its place and not found it again.
//! One that holds none while `up` and `steady` is a spare replica (more
//! replicas than partitions), which is fine. Before the first statistics
//! nothing is known, and nothing is judged.

use std::time::{Duration, Instant};

/// What the consumer last said of its group, and since when the worker has
/// been without partitions and unsettled.
#[derive(Debug, Default)]
pub struct Membership {
    state: String,
    join_state: String,
    assigned: usize,
    /// Since when the worker has held no partition while not settled;
    /// `None` while it holds some or is settled.
    unsettled_since: Option<Instant>,
}

impl Membership {
    fn settled(&self) -> bool {
        self.state.is_empty()
            || (self.state == "up" && (self.assigned > 0 || self.join_state == "steady"))
    }

    fn update(&mut self, now: Instant) {
        match self.settled() {
            true => self.unsettled_since = None,
            false => {
                self.unsettled_since.get_or_insert(now);
            }
        }
    }

    /// librdkafka's statistics: the group's state and join state. Returns
    /// whether either changed.
    pub fn group_state(&mut self, state: &str, join_state: &str, now: Instant) -> bool {
        let changed = self.state != state || self.join_state != join_state;
        if changed {
            self.state = state.to_string();
            self.join_state = join_state.to_string();
        }
        self.update(now);
        changed
    }

    /// The number of partitions assigned now.
    pub fn assigned(&mut self, partitions: usize, now: Instant) {
        self.assigned = partitions;
        self.update(now);
    }

    /// How long the worker has held no partition while not settled in its
    /// group, and the group's state as `state/join state`.
    pub fn unsettled_for(&self, now: Instant) -> Option<(Duration, String)> {
        let since = self.unsettled_since?;
        let state = format!(
            "{}/{}, {} partitions",
            self.state, self.join_state, self.assigned
        );
        Some((now.saturating_duration_since(since), state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_spare_replica_that_is_settled_is_never_unsettled() {
        let (mut m, t0) = (Membership::default(), Instant::now());
        m.group_state("up", "steady", t0);
        m.assigned(0, t0);
        assert_eq!(m.unsettled_for(t0 + 600 * SECOND), None);
    }

    #[test]
    fn without_partitions_and_out_of_steady_the_time_counts_until_either_comes_back() {
        let (mut m, t0) = (Membership::default(), Instant::now());
        m.group_state("up", "steady", t0);
        m.assigned(6, t0);
        // The assignment is lost: partitions go, the join state moves on.
        m.assigned(0, t0 + SECOND);
        assert_eq!(m.unsettled_for(t0 + SECOND), None, "still steady");
        assert!(m.group_state("up", "wait-join", t0 + 2 * SECOND));
        assert!(!m.group_state("up", "wait-join", t0 + 5 * SECOND));
        let (d, state) = m.unsettled_for(t0 + 62 * SECOND).unwrap();
        assert_eq!(
            (d, state.as_str()),
            (60 * SECOND, "up/wait-join, 0 partitions")
        );
        // Another state without partitions keeps counting from the first.
        m.group_state("query-coord", "init", t0 + 70 * SECOND);
        assert_eq!(m.unsettled_for(t0 + 72 * SECOND).unwrap().0, 70 * SECOND);
        // Partitions again, but still no coordinator (a KIP-848 member that
        // kept its partitions through the loss): still counting.
        m.assigned(3, t0 + 80 * SECOND);
        assert_eq!(m.unsettled_for(t0 + 90 * SECOND).unwrap().0, 88 * SECOND);
        // Up again: settled.
        m.group_state("up", "wait-join", t0 + 95 * SECOND);
        assert_eq!(m.unsettled_for(t0 + 96 * SECOND), None);
    }

    #[test]
    fn nothing_is_judged_before_the_first_statistics() {
        let (mut m, t0) = (Membership::default(), Instant::now());
        m.assigned(0, t0);
        assert_eq!(m.unsettled_for(t0 + 600 * SECOND), None);
    }
}
