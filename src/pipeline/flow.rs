//! Flow control: when the consume loop takes records, and when it pauses
//! or resumes its partitions. A pure decision from the records in flight,
//! the time and the systemic-failure state; the loop applies it.
//!
//! While the window is full the loop just stops taking records (they wait
//! in librdkafka's queue). Only when it stays full for `pause_after` are the
//! partitions paused: pausing lets the loop go on polling (group
//! membership, rebalances) without taking records, but librdkafka drops
//! what it prefetched and fetches it again on resume. A systemic failure
//! pauses at once. Paused partitions resume once the window is half empty
//! and the API is not failing as a whole.

use std::time::Duration;

use tokio::time::Instant;

/// Records the worker holds between consume and acknowledgement for a
/// window of `max_in_flight`: that many being enriched, and as many again
/// whose enriched record (or dead letter) waits for the broker's
/// acknowledgement, so the API calls go on while the broker writes.
pub fn admitted_limit(max_in_flight: usize) -> usize {
    max_in_flight.saturating_mul(2)
}

/// What the loop should do to its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Pause,
    Resume,
}

/// The flow-control state of the consume loop.
#[derive(Debug)]
pub struct Flow {
    /// Records admitted at most (see [`admitted_limit`]).
    limit: usize,
    pause_after: Duration,
    /// Whether the partitions are paused (as last applied).
    paused: bool,
    /// Since when the window has been full.
    full_since: Option<Instant>,
}

impl Flow {
    pub fn new(max_in_flight: usize, pause_after: Duration) -> Flow {
        Flow {
            limit: admitted_limit(max_in_flight),
            pause_after,
            paused: false,
            full_since: None,
        }
    }

    /// Whether the loop takes another record now. While paused it polls
    /// anyway: librdkafka delivers nothing from paused partitions, and
    /// polling keeps the group membership.
    pub fn takes_records(&self, in_flight: usize) -> bool {
        self.paused || in_flight < self.limit
    }

    /// When the loop must decide again although nothing else happens (the
    /// window full for `pause_after`); `None` while paused or not full.
    pub fn wake_at(&self) -> Option<Instant> {
        match self.paused {
            true => None,
            false => self.full_since.map(|t| t + self.pause_after),
        }
    }

    /// The change due now, if any.
    pub fn decide(&mut self, in_flight: usize, now: Instant, systemic: bool) -> Option<Change> {
        if in_flight >= self.limit {
            self.full_since.get_or_insert(now);
        } else {
            self.full_since = None;
        }
        let full_too_long = self.wake_at().is_some_and(|at| now >= at);
        if !self.paused && (systemic || full_too_long) {
            Some(Change::Pause)
        } else if self.paused && !systemic && in_flight <= self.limit / 2 {
            Some(Change::Resume)
        } else {
            None
        }
    }

    /// The consumer carried the change out.
    pub fn applied(&mut self, change: Change) {
        self.paused = change == Change::Pause;
    }

    #[cfg(test)]
    fn is_paused(&self) -> bool {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// A window of 4 (8 admitted) that pauses after a second full.
    fn flow() -> Flow {
        Flow::new(4, SECOND)
    }

    fn step(f: &mut Flow, in_flight: usize, systemic: bool) -> Option<Change> {
        let change = f.decide(in_flight, Instant::now(), systemic);
        if let Some(c) = change {
            f.applied(c);
        }
        change
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_window_stops_taking_at_once_and_pauses_only_after_a_while() {
        let mut f = flow();
        assert!(f.takes_records(7));
        assert_eq!(step(&mut f, 8, false), None);
        assert!(!f.takes_records(8), "full: records wait in librdkafka");
        let wake = f.wake_at().expect("a full window wakes the loop");
        tokio::time::advance(SECOND - Duration::from_millis(1)).await;
        assert_eq!(step(&mut f, 8, false), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(Instant::now(), wake);
        assert_eq!(step(&mut f, 8, false), Some(Change::Pause));
        assert!(f.takes_records(8), "paused: polling goes on");
        assert_eq!(f.wake_at(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_that_empties_in_time_is_not_paused() {
        let mut f = flow();
        step(&mut f, 8, false);
        tokio::time::advance(SECOND / 2).await;
        assert_eq!(step(&mut f, 7, false), None);
        assert_eq!(f.wake_at(), None, "the full stretch ended");
        step(&mut f, 8, false);
        tokio::time::advance(SECOND / 2).await;
        assert_eq!(
            step(&mut f, 8, false),
            None,
            "a new full stretch starts from zero"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paused_partitions_resume_once_the_window_is_half_empty() {
        let mut f = flow();
        step(&mut f, 8, false);
        tokio::time::advance(SECOND).await;
        assert_eq!(step(&mut f, 8, false), Some(Change::Pause));
        assert_eq!(step(&mut f, 5, false), None);
        assert_eq!(step(&mut f, 4, false), Some(Change::Resume));
        assert!(!f.is_paused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_systemic_failure_pauses_at_once_and_holds_the_pause() {
        let mut f = flow();
        assert_eq!(step(&mut f, 0, true), Some(Change::Pause));
        tokio::time::advance(SECOND * 60).await;
        assert_eq!(step(&mut f, 0, true), None, "empty, but the API fails");
        assert_eq!(step(&mut f, 0, false), Some(Change::Resume));
    }

    #[test]
    fn a_change_the_consumer_refused_is_asked_again() {
        let mut f = flow();
        let now = Instant::now();
        assert_eq!(f.decide(0, now, true), Some(Change::Pause));
        // Not applied (pause failed): the next decision asks again.
        assert_eq!(f.decide(0, now, true), Some(Change::Pause));
    }
}
