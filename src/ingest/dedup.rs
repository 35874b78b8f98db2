//! The pushes forwarded lately, for `ingest.dedup_window`. Each is
//! remembered by the SHA-256 digest of its key (tenant, kind, session,
//! command or type), so an entry costs the same whatever a sender puts in
//! its session id, and the cache's memory is bounded by
//! `ingest.dedup_capacity` alone.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use sha2::{Digest, Sha256};

/// A push's key, digested.
pub type Key = [u8; 32];

/// Forwarded pushes and when, the oldest forgotten first.
pub struct Recent {
    forwarded: Mutex<LruCache<Key, Instant>>,
    window: Duration,
}

impl Recent {
    pub fn new(capacity: NonZeroUsize, window: Duration) -> Recent {
        Recent {
            forwarded: Mutex::new(LruCache::new(capacity)),
            window,
        }
    }

    /// The key of a push made of `parts`; each part is framed by its
    /// length, so no two lists of parts share a key.
    pub fn key(parts: &[&str]) -> Key {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.finalize().into()
    }

    /// Whether the push `key` was forwarded within the window.
    pub fn seen(&self, key: &Key) -> bool {
        let mut forwarded = self.forwarded.lock().unwrap();
        match forwarded.get(key) {
            Some(at) if at.elapsed() < self.window => true,
            Some(_) => {
                forwarded.pop(key);
                false
            }
            None => false,
        }
    }

    /// Remembers the push `key` as forwarded now.
    pub fn remember(&self, key: Key) {
        self.forwarded.lock().unwrap().put(key, Instant::now());
    }

    /// How many pushes are remembered.
    pub fn len(&self) -> usize {
        self.forwarded.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_their_parts_apart() {
        assert_eq!(Recent::key(&["t", "s-1"]), Recent::key(&["t", "s-1"]));
        assert_ne!(Recent::key(&["t", "s-1"]), Recent::key(&["t", "s-2"]));
        // The same bytes split otherwise are another push.
        assert_ne!(Recent::key(&["ab", "c"]), Recent::key(&["a", "bc"]));
    }

    #[test]
    fn a_push_is_seen_within_the_window_and_the_oldest_is_forgotten() {
        let recent = Recent::new(NonZeroUsize::new(2).unwrap(), Duration::from_secs(600));
        let [a, b, c] = ["a", "b", "c"].map(|s| Recent::key(&[s]));
        assert!(!recent.seen(&a));
        recent.remember(a);
        recent.remember(b);
        assert!(recent.seen(&a));
        recent.remember(c);
        assert!(!recent.seen(&b), "the least recently used is forgotten");
        assert_eq!(recent.len(), 2);

        let expired = Recent::new(NonZeroUsize::new(2).unwrap(), Duration::ZERO);
        expired.remember(a);
        assert!(!expired.seen(&a));
        assert!(expired.is_empty(), "an expired push is dropped when asked");
    }
}
