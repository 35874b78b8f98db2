use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rdkafka::message::OwnedMessage;
use std::time::Duration;

use crate::testkit;
use uincall_enricher::dead_letter::header as dlq;

use crate::helpers::*;

/// A pseudo-random number generator seeded from the clock; the seed is
/// printed so a failing run can be repeated (`FAULT_SEED`).
fn seeded() -> (u64, impl FnMut() -> u64) {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    let mut x = seed | 1;
    (seed, move || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

/// Reads `topic` from the start until `distinct` keys were seen (bounded by
/// `limit`), publishing the number of records read so far in `read`.
async fn read_distinct(
    bootstrap: String,
    topic: String,
    distinct: usize,
    limit: Duration,
    read: Arc<AtomicUsize>,
) -> Vec<OwnedMessage> {
    let mut keys = HashSet::new();
    testkit::read_topic_until(&bootstrap, &topic, limit, |msgs| {
        for m in &msgs[read.load(Ordering::Relaxed).min(msgs.len())..] {
            keys.insert(key(m));
        }
        read.store(msgs.len(), Ordering::Relaxed);
        keys.len() >= distinct
    })
    .await
    .unwrap()
}

/// Kills the worker with SIGKILL five times at random moments while records
/// flow (10 % of the events answered with transient errcodes first, 1 %
/// permanent), restarts it each time, and checks that every input session
/// ends on the output or dead-letter topic, and only permanent ones on the
/// latter. `FAULT_EVENTS` sets the number of events (scripts/faults.sh).
#[tokio::test]
async fn sigkill_five_times_mid_stream_and_restart_loses_nothing() {
    let env = TestEnv::new("crash", 3, Duration::from_millis(20)).await;
    let total: usize = std::env::var("FAULT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let sessions: Vec<String> = (0..total)
        .map(|i| match i % 100 {
            0..=9 => format!("transient2-{i:06}"),
            10 => format!("permanent-{i:06}"),
            _ => format!("call-{i:06}"),
        })
        .collect();
    env.seed(&sessions).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let window = [("UINCALL__PIPELINE__MAX_IN_FLIGHT", "16")];
    let (seed, mut random) = seeded();
    let mut kills: Vec<usize> = (0..5)
        .map(|_| total / 20 + (random() as usize) % (total * 17 / 20))
        .collect();
    kills.sort();
    println!("crash test: seed {seed}, SIGKILL after {kills:?} enriched records");

    // Generous for the long variant too: ~200 records/s is far below what
    // the worker does here.
    let limit = WAIT + Duration::from_millis(total as u64 * 5);
    let permanent = sessions
        .iter()
        .filter(|s| s.starts_with("permanent-"))
        .count();
    // One reader follows the output topic for the whole test (re-reading
    // it from the start at every kill loads the broker too much at 50 000).
    let read = Arc::new(AtomicUsize::new(0));
    let output = tokio::spawn(read_distinct(
        env.bootstrap(),
        env.output.clone(),
        total - permanent,
        limit * 7,
        read.clone(),
    ));
    for kill_after in kills {
        let mut child = env.spawn_binary(&log, &window);
        wait_until_within("enriched records before the kill", limit, || {
            read.load(Ordering::Relaxed) >= kill_after
        })
        .await;
        // SIGKILL, then restarted at once: the new member joins while the
        // dead one still holds its partitions until the session times out.
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let committed: i64 = env.committed().iter().flatten().sum();
    assert!(
        committed < total as i64,
        "the last kill came after the stream ended"
    );

    let mut child = env.spawn_binary(&log, &window);
    let out = output.await.unwrap();
    let dead = read_distinct(
        env.bootstrap(),
        env.dlq.clone(),
        permanent,
        limit,
        Arc::default(),
    )
    .await;
    sigterm(&child);
    let status = wait_exit(&mut child, WAIT).await;
    assert!(status.success(), "SIGTERM ends with exit 0: {status}");

    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in out.iter().chain(dead.iter()) {
        *seen.entry(key(m)).or_default() += 1;
    }
    let missing: Vec<&String> = sessions.iter().filter(|s| !seen.contains_key(*s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    for m in &out {
        let v = enriched_json(m);
        assert_eq!(v["session_id"], key(m).as_str());
    }
    for m in &dead {
        assert_eq!(
            header(m, dlq::ERROR_CLASS).as_deref(),
            Some("permanent_error"),
            "{}",
            key(m)
        );
        assert!(key(m).starts_with("permanent-"), "{}", key(m));
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "crash test: {total} events, 5 SIGKILLs, 0 lost, {} dead letters (all permanent), {duplicates} duplicates",
        dead.len()
    );
}
