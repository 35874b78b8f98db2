//! The receiver's de-duplication cache costs the same per push whatever the
//! sender puts in its session id: its memory is bounded by
//! `ingest.dedup_capacity` alone. Measured with an allocator that counts the
//! bytes this test's own thread holds (a test binary of its own, so no other
//! test's allocations are counted).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::num::NonZeroUsize;
use std::time::Duration;

use uincall_enricher::ingest::dedup::Recent;

struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: a thread being torn down has no counter left.
    let _ = HELD.try_with(|held| held.set(held.get() + delta));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.with(Cell::get)
}

/// Fills a cache of `capacity` with `pushes` distinct pushes whose session
/// ids are `id_bytes` long; the bytes it then holds.
fn bytes_held(capacity: usize, pushes: usize, id_bytes: usize) -> isize {
    let before = held();
    let recent = Recent::new(
        NonZeroUsize::new(capacity).unwrap(),
        Duration::from_secs(600),
    );
    for n in 0..pushes {
        let mut session = format!("{n:020}");
        session.extend(std::iter::repeat_n('s', id_bytes.saturating_sub(20)));
        let key = Recent::key(&["t-1", "call-event", &session, "call_hangup"]);
        if !recent.seen(&key) {
            recent.remember(key);
        }
    }
    assert_eq!(recent.len(), capacity.min(pushes));
    let after = held();
    drop(recent);
    after - before
}

#[test]
fn the_dedup_cache_holds_a_fixed_size_per_push_whatever_the_session_id() {
    const CAPACITY: usize = 1_000;
    let short = bytes_held(CAPACITY, CAPACITY, 20);
    // 16 KB session ids (1 000 of 60 KB each once added 111 MiB).
    let long = bytes_held(CAPACITY, CAPACITY, 16_000);
    assert_eq!(short, long, "an entry's cost depends on its session id");
    let per_entry = long / CAPACITY as isize;
    eprintln!("{long} bytes for {CAPACITY} remembered pushes: {per_entry} each");
    assert!(
        per_entry <= 256,
        "{per_entry} bytes per remembered push ({long} for {CAPACITY})"
    );
    // Three times the capacity: the oldest are forgotten, nothing grows.
    assert_eq!(bytes_held(CAPACITY, 3 * CAPACITY, 16_000), long);
}
