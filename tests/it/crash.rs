use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use uincall_enricher::dead_letter::header as dlq;
use uincall_enricher::testkit;

use crate::helpers::*;

/// Kills the worker with SIGKILL twice while records flow, restarts it, and
/// checks that every input session ends on the output or dead-letter topic.
#[tokio::test]
async fn sigkill_mid_stream_and_restart_loses_nothing() {
    let env = TestEnv::new("crash", 3, Duration::from_millis(20)).await;
    let total = 4000;
    let sessions: Vec<String> = (0..total)
        .map(|i| match i % 20 {
            0 => format!("transient2-{i:05}"),
            1 => format!("permanent-{i:05}"),
            _ => format!("call-{i:05}"),
        })
        .collect();
    env.seed(&sessions).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let window = [("UINCALL__PIPELINE__MAX_IN_FLIGHT", "16")];

    for kill_after in [300, 1500] {
        let mut child = env.spawn_binary(&log, &window);
        testkit::read_topic(&env.bootstrap(), &env.output, kill_after, WAIT)
            .await
            .unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let committed: i64 = env.committed().iter().flatten().sum();
        assert!(
            committed < total as i64,
            "the kill came after the stream ended"
        );
    }

    let mut child = env.spawn_binary(&log, &window);
    let done =
        |out: &[rdkafka::message::OwnedMessage]| out.iter().map(key).collect::<BTreeSet<_>>().len();
    let permanent = sessions
        .iter()
        .filter(|s| s.starts_with("permanent-"))
        .count();
    let out = testkit::read_topic_until(&env.bootstrap(), &env.output, WAIT, |m| {
        done(m) >= total - permanent
    })
    .await
    .unwrap();
    let dead =
        testkit::read_topic_until(&env.bootstrap(), &env.dlq, WAIT, |m| done(m) >= permanent)
            .await
            .unwrap();
    sigterm(&child);
    assert!(child.wait().unwrap().success(), "SIGTERM ends with exit 0");

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
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!("crash test: {total} events, 2 SIGKILLs, 0 lost, {duplicates} duplicates");
}
