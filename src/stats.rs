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

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
