//! Counters of what the worker did, shared by the pipeline, the side port
//! and the demo summary. Each is written where the matching log line is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::dead_letter::ErrorClass;

#[derive(Debug, Default)]
pub struct Stats {
    pub consumed: AtomicU64,
    pub enriched: AtomicU64,
    pub api_calls: AtomicU64,
    /// API calls after the first one of a record.
    pub retries: AtomicU64,
    pub in_flight: AtomicU64,
    pub paused: AtomicBool,
    /// Offsets stored for commit (completed prefixes advanced).
    pub offsets_stored: AtomicU64,
    /// Partitions of the input topic assigned to this worker.
    pub assigned_partitions: AtomicU64,
    /// When the consume loop last ran, ms since the Unix epoch (0: never).
    pub loop_beat_ms: AtomicU64,
    dead_lettered: [AtomicU64; 4],
}

fn index(class: ErrorClass) -> usize {
    ErrorClass::ALL
        .iter()
        .position(|c| *c == class)
        .expect("listed")
}

impl Stats {
    pub fn add_dead_lettered(&self, class: ErrorClass) {
        self.dead_lettered[index(class)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dead_lettered(&self, class: ErrorClass) -> u64 {
        self.dead_lettered[index(class)].load(Ordering::Relaxed)
    }

    pub fn dead_lettered_total(&self) -> u64 {
        ErrorClass::ALL.iter().map(|c| self.dead_lettered(*c)).sum()
    }

    /// Records that the consume loop ran just now.
    pub fn beat(&self) {
        self.loop_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long ago the consume loop last ran; `None` before it started.
    pub fn since_beat(&self) -> Option<std::time::Duration> {
        match self.loop_beat_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(std::time::Duration::from_millis(
                now_ms().saturating_sub(at),
            )),
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
