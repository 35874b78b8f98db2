use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rdkafka::message::OwnedMessage;
use std::time::Duration;

use crate::testkit;
use uincall_enricher::dead_letter::header as dlq;
use uincall_enricher::offsets::Finished;

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

/// The worker settings the crash test takes from the environment
/// (scripts/faults.sh): FAULT_WINDOW, the records in flight (16);
/// FAULT_METADATA_MAX_BYTES (4096; 0 measures the duplicates without commit
/// metadata); FAULT_COMMIT_INTERVAL (500ms).
fn fault_settings() -> Vec<(&'static str, String)> {
    [
        ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "FAULT_WINDOW", "16"),
        (
            "UINCALL__KAFKA__COMMIT_METADATA_MAX_BYTES",
            "FAULT_METADATA_MAX_BYTES",
            "4096",
        ),
        (
            "UINCALL__KAFKA__COMMIT_INTERVAL",
            "FAULT_COMMIT_INTERVAL",
            "500ms",
        ),
    ]
    .into_iter()
    .map(|(key, var, default)| (key, std::env::var(var).unwrap_or(default.into())))
    .collect()
}

/// Every session on the output or the dead-letter topic, each enriched
/// record about its key, and only permanent failures dead-lettered (as
/// such); returns how many records were written more than once.
fn check_outcome(sessions: &[String], out: &[OwnedMessage], dead: &[OwnedMessage]) -> usize {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in out.iter().chain(dead.iter()) {
        *seen.entry(key(m)).or_default() += 1;
    }
    let missing: Vec<&String> = sessions.iter().filter(|s| !seen.contains_key(*s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    for m in out {
        let v = enriched_json(m);
        assert_eq!(v["session_id"], key(m).as_str());
    }
    for m in dead {
        assert_eq!(
            header(m, dlq::ERROR_CLASS).as_deref(),
            Some("permanent_error"),
            "{}",
            key(m)
        );
        assert!(key(m).starts_with("permanent-"), "{}", key(m));
    }
    seen.values().map(|n| n - 1).sum()
}

/// Starts the binary and SIGKILLs it once `read` (records seen on the
/// output topic) reaches each of `kills`.
async fn kill_at(
    env: &TestEnv,
    log: &PathBuf,
    window: &[(&str, &str)],
    kills: &[usize],
    read: &AtomicUsize,
    limit: Duration,
) {
    for &kill_after in kills {
        let mut child = env.spawn_binary(log, window);
        wait_until_within("enriched records before the kill", limit, || {
            read.load(Ordering::Relaxed) >= kill_after
        })
        .await;
        // SIGKILL, then restarted at once: the new member joins while the
        // dead one still holds its partitions until the session times out.
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// `FAULT_EVENTS` sessions (4 000): 10 % answered "not ready" twice, 1 %
/// permanently failing, the rest answered at once.
fn crash_sessions() -> Vec<String> {
    let total: usize = std::env::var("FAULT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    (0..total)
        .map(|i| match i % 100 {
            0..=9 => format!("transient2-{i:06}"),
            10 => format!("permanent-{i:06}"),
            _ => format!("call-{i:06}"),
        })
        .collect()
}

/// Kills the worker with SIGKILL five times at random moments while records
/// flow (10 % of the events answered with transient errcodes first, 1 %
/// permanent), restarts it each time, and checks that every input session
/// ends on the output or dead-letter topic, and only permanent ones on the
/// latter. `FAULT_EVENTS` sets the number of events (scripts/faults.sh).
#[tokio::test]
async fn sigkill_five_times_mid_stream_and_restart_loses_nothing() {
    sigkill_five_times("crash", &[]).await;
}

/// The same with `kafka.delivery = "exactly_once"` (the restarted worker
/// keeps its transactional id, as a pod does, and fences the killed one):
/// read with `read_committed` to the end, each session is on the output or
/// the dead-letter topic exactly once. The test above, at least once, sees
/// duplicates after most kills.
#[tokio::test]
async fn sigkill_five_times_with_transactions_writes_each_session_once() {
    let delivery = [exactly_once()];
    let env = sigkill_five_times("crash-eos", &delivery).await;
    assert_each_once(&env, &crash_sessions()).await;
}

/// Five moments to SIGKILL the worker at, in records out of `total`
/// (between 5 % and 90 %), printed with the seed that repeats them.
fn random_kills(total: usize) -> Vec<usize> {
    let (seed, mut random) = seeded();
    let mut kills: Vec<usize> = (0..5)
        .map(|_| total / 20 + (random() as usize) % (total * 17 / 20))
        .collect();
    kills.sort();
    println!("crash test: seed {seed}, SIGKILL after {kills:?} enriched records");
    kills
}

/// [`sigkill_five_times_mid_stream_and_restart_loses_nothing`] with
/// `extra` settings; returns the test's environment once the worker ended.
async fn sigkill_five_times(name: &str, extra: &[(&str, &str)]) -> TestEnv {
    let env = TestEnv::new(name, 3, Duration::from_millis(20)).await;
    let sessions = crash_sessions();
    let total = sessions.len();
    env.seed(&sessions).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let settings = fault_settings();
    let mut window: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    window.extend_from_slice(extra);
    let kills = random_kills(total);

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
    kill_at(&env, &log, &window, &kills, &read, limit).await;
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

    let duplicates = check_outcome(&sessions, &out, &dead);
    println!(
        "crash test ({name}): {total} events, 5 SIGKILLs, 0 lost, {} dead letters (all permanent), {duplicates} duplicates",
        dead.len()
    );
    env
}

/// Records after the one that waits in its backoff in
/// [`crash_behind_a_waiting_record`].
const FOLLOWERS: usize = 300;

/// The committed offset of the test's one input partition and how many
/// records its metadata says finished past it (read without blocking the
/// runtime that serves the fake API).
async fn committed_and_finished(env: &TestEnv) -> Option<(i64, u64)> {
    let (bootstrap, group, input) = (env.bootstrap(), env.group.clone(), env.input.clone());
    let committed = tokio::task::spawn_blocking(move || {
        testkit::committed_with_metadata(&bootstrap, &group, &input)
    })
    .await
    .unwrap()
    .ok()?;
    let (offset, metadata) = committed.into_iter().next()??;
    let finished = Finished::decode(offset, &metadata).expect("the worker's own metadata");
    Some((offset, finished.len()))
}

/// One input partition: a session the API answers "not ready" for long,
/// then FOLLOWERS sessions that finish around it. Once all followers are
/// written and their finish committed (the offset stays at the waiting
/// record), the worker is SIGKILLed and started again with one attempt per
/// record, so the waiting record is dead-lettered. Returns how many
/// records the output topic holds and its distinct sessions, and the dead
/// letters.
async fn crash_behind_a_waiting_record(
    name: &str,
    metadata_max_bytes: &str,
) -> (usize, usize, Vec<OwnedMessage>) {
    let env = TestEnv::new(name, 1, Duration::from_millis(5)).await;
    let mut sessions = vec!["transient1000000-waits".to_string()];
    sessions.extend((0..FOLLOWERS).map(|i| format!("call-{i:04}")));
    env.seed(&sessions).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let metadata = (
        "UINCALL__KAFKA__COMMIT_METADATA_MAX_BYTES",
        metadata_max_bytes,
    );
    let waits = [
        metadata,
        ("UINCALL__RETRY__MAX_ATTEMPTS", "100000"),
        ("UINCALL__RETRY__MAX_ELAPSED", "5m"),
        ("UINCALL__RETRY__MAX_DELAY", "500ms"),
    ];
    let mut child = env.spawn_binary(&log, &waits);
    read_distinct(
        env.bootstrap(),
        env.output.clone(),
        FOLLOWERS,
        WAIT,
        Arc::default(),
    )
    .await;
    let want = if metadata_max_bytes == "0" {
        0
    } else {
        FOLLOWERS as u64
    };
    wait_until_async("the followers' finish committed", || async {
        committed_and_finished(&env).await == Some((0, want))
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = env.spawn_binary(&log, &[metadata, ("UINCALL__RETRY__MAX_ATTEMPTS", "1")]);
    let dead = env.read_dlq(1).await;
    wait_until_async("the partition committed to its end", || async {
        committed_and_finished(&env).await.map(|(o, _)| o) == Some(FOLLOWERS as i64 + 1)
    })
    .await;
    sigterm(&child);
    let status = wait_exit(&mut child, WAIT).await;
    assert!(status.success(), "SIGTERM ends with exit 0: {status}");
    let (out, total) = env.read_all(&env.output, FOLLOWERS).await;
    let distinct: HashSet<String> = out.iter().map(key).collect();
    (total, distinct.len(), dead)
}

/// With the finished records in the commit metadata, the restarted worker
/// skips every follower: each session is on the output topic once, and the
/// waiting record (the one unfinished) is processed again.
#[tokio::test]
async fn a_crash_re_delivers_only_what_was_unfinished() {
    let (total, distinct, dead) = crash_behind_a_waiting_record("unfinished", "4096").await;
    assert_eq!(distinct, FOLLOWERS);
    assert_eq!(
        total,
        FOLLOWERS,
        "sessions written twice: {}",
        total - distinct
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(key(&dead[0]), "transient1000000-waits");
}

/// The same crash without metadata (`kafka.commit_metadata_max_bytes = 0`):
/// every follower is written a second time. What the test above guards
/// against.
#[tokio::test]
async fn without_commit_metadata_a_crash_re_delivers_all_behind_the_waiting_record() {
    let (total, distinct, dead) = crash_behind_a_waiting_record("unfinished-off", "0").await;
    assert_eq!(distinct, FOLLOWERS);
    assert_eq!(total, 2 * FOLLOWERS);
    assert_eq!(dead.len(), 1);
}

/// With `kafka.delivery = "exactly_once"`, the followers of a record that
/// retries for long wait for it: none of them is visible while it retries
/// (at least three more of its calls after every follower was answered),
/// the window holds them, and nothing is committed past it. The worker is
/// then SIGKILLed and started again with one attempt per record: the
/// waiting record is dead-lettered, each follower enriched, every session
/// exactly once. At least once without commit metadata writes all 300
/// twice here ([`without_commit_metadata_a_crash_re_delivers_all_behind_the_waiting_record`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transactions_records_behind_a_waiting_one_wait_and_a_crash_writes_none_twice() {
    let env = TestEnv::new("unfinished-eos", 1, Duration::from_millis(5)).await;
    let waiting = "transient1000000-waits";
    let followers: Vec<String> = (0..FOLLOWERS).map(|i| format!("call-{i:04}")).collect();
    let mut sessions = vec![waiting.to_string()];
    sessions.extend(followers.iter().cloned());
    env.seed(&sessions).await;
    let dir = tempfile::tempdir().unwrap();
    let eos = exactly_once();
    let window = ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "200");
    let waits = [
        eos,
        window,
        ("UINCALL__RETRY__MAX_ATTEMPTS", "100000"),
        ("UINCALL__RETRY__MAX_ELAPSED", "5m"),
        ("UINCALL__RETRY__MAX_DELAY", "500ms"),
    ];
    let worker = env.spawn_replica("w", dir.path(), &waits);
    wait_until("every follower answered", || {
        followers.iter().all(|s| env.api.calls(s) >= 1)
    })
    .await;
    let calls = env.api.calls(waiting);
    wait_until("three more calls of the waiting record", || {
        env.api.calls(waiting) >= calls + 3
    })
    .await;
    let seen = env.outputs_to_end().await;
    assert!(
        seen.is_empty(),
        "visible before the waiting record: {seen:?}"
    );
    let committed = env.committed();
    assert!(
        matches!(committed[..], [None | Some(0)]),
        "committed past the waiting record: {committed:?}"
    );
    let in_flight = worker.metric("uincall_enricher_records_in_flight").await;
    assert_eq!(in_flight, Some(sessions.len() as f64));
    worker.signal("KILL");
    drop(worker);

    let retry_once = [eos, window, ("UINCALL__RETRY__MAX_ATTEMPTS", "1")];
    let worker = env.spawn_replica("w", dir.path(), &retry_once);
    wait_until("the partition committed to its end", || {
        env.committed() == vec![Some(sessions.len() as i64)]
    })
    .await;
    worker.stop().await;
    assert_each_once(&env, &sessions).await;
    let dead = env.read_dlq(1).await;
    assert_eq!(key(&dead[0]), waiting);
}
