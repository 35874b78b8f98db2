//! `uincall-enricher replay` (the real binary) against Apache Kafka and the
//! fake Uincall API.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use serde_json::Value;

use crate::testkit;
use uincall_enricher::dead_letter::header as dlq;
use uincall_enricher::replay::REPLAY_COUNT;

use crate::helpers::*;

/// A dead letter as the worker writes it, for session `s` of `tenant`.
struct Dead {
    session: String,
    tenant: String,
    class: &'static str,
    reason: &'static str,
    errcode: &'static str,
    partition: &'static str,
    offset: String,
    failed_at: &'static str,
}

impl Dead {
    fn new(session: &str, tenant: &str) -> Dead {
        Dead {
            session: session.to_string(),
            tenant: tenant.to_string(),
            class: "retries_exhausted",
            reason: "errcode 10001: record not ready",
            errcode: "10001",
            partition: "0",
            offset: "0".into(),
            failed_at: "2026-11-20T10:00:00.000Z",
        }
    }
}

async fn write_dead_letters(env: &TestEnv, dead: &[Dead]) {
    let values: Vec<String> = dead
        .iter()
        .map(|d| {
            format!(
                r#"{{"session_id":"{}","tenant_id":"{}"}}"#,
                d.session, d.tenant
            )
        })
        .collect();
    let headers: Vec<Vec<(&str, &str)>> = dead
        .iter()
        .map(|d| {
            vec![
                ("trace-id", "t-1"),
                (dlq::ERROR_CLASS, d.class),
                (dlq::REASON, d.reason),
                (dlq::ERRCODE, d.errcode),
                (dlq::TENANT_ID, d.tenant.as_str()),
                (dlq::SESSION_ID, d.session.as_str()),
                (dlq::SOURCE_TOPIC, env.input.as_str()),
                (dlq::SOURCE_PARTITION, d.partition),
                (dlq::SOURCE_OFFSET, d.offset.as_str()),
                (dlq::FAILED_AT, d.failed_at),
            ]
        })
        .collect();
    let records: Vec<RawRecord<'_>> = dead
        .iter()
        .zip(&values)
        .zip(&headers)
        .map(|((d, v), h)| (Some(d.session.as_str()), v.as_bytes(), h.as_slice()))
        .collect();
    env.produce_raw(&env.dlq, &records).await;
}

fn ends(env: &TestEnv) -> Vec<Vec<i64>> {
    [&env.input, &env.output, &env.dlq]
        .iter()
        .map(|t| testkit::end_offsets(&env.bootstrap(), t).unwrap())
        .collect()
}

/// The parts of an enriched record that do not depend on when and how
/// often it was fetched.
fn content(m: &OwnedMessage) -> Value {
    let mut v = enriched_json(m);
    v.as_object_mut().unwrap().remove("enrichment");
    v
}

#[tokio::test]
async fn dead_letters_of_an_outage_are_replayed_and_enriched_like_first_time_ones() {
    let env = TestEnv::new("replayok", 2, Duration::ZERO).await;
    let mut s = env.settings();
    // No systemic protection here: the outage must produce dead letters.
    s.systemic.failure_ratio = 1.0;
    s.systemic.dead_letter_ratio = 1.0;
    s.retry.max_attempts = 2;
    let worker = env.start_worker(s).await;
    env.api.set_outage(true);
    let sessions: Vec<String> = (0..30).map(|i| format!("call-{i:03}")).collect();
    env.seed(&sessions).await;
    let dead = env.read_dlq(sessions.len()).await;
    assert!(
        dead.iter()
            .all(|m| header(m, dlq::ERROR_CLASS).as_deref() == Some("retries_exhausted"))
    );
    env.api.set_outage(false);

    let (code, summary) = env.replay(&[]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary_count(&summary, "replayed"), 30, "{summary}");
    let replayed = env.read_output(sessions.len()).await;
    // The same sessions as first-time events, for comparison.
    env.seed(&sessions).await;
    let all = env.read_output(2 * sessions.len()).await;
    worker.stop().await.unwrap();

    let mut by_session: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in &all {
        by_session.entry(key(m)).or_default().push(content(m));
    }
    assert_eq!(by_session.len(), sessions.len());
    for (session, versions) in &by_session {
        assert_eq!(versions.len(), 2, "{session}");
        assert_eq!(versions[0], versions[1], "{session}: replayed ≠ first-time");
    }
    assert_eq!(replayed.len(), sessions.len());
    // A second run finds nothing new: its progress was committed.
    let (code, summary) = env.replay(&[]).await;
    assert_eq!((code, summary_count(&summary, "read")), (0, 0), "{summary}");
}

#[tokio::test]
async fn each_filter_selects_exactly_and_dry_run_writes_nothing() {
    let env = TestEnv::new("replayfilter", 1, Duration::ZERO).await;
    let t = env.tenant.clone();
    let mut dead: Vec<Dead> = (0..10)
        .map(|i| {
            let mut d = Dead::new(&format!("s-{i}"), &t);
            d.offset = (100 + i).to_string();
            d
        })
        .collect();
    dead[0].class = "permanent_error";
    dead[0].errcode = "40004";
    dead[0].reason = "permanent errcode 40004: session not found";
    dead[1].class = "invalid_event";
    dead[1].errcode = "";
    dead[2].tenant = "other-tenant".into();
    dead[3].partition = "1";
    dead[4].failed_at = "2026-11-22T10:00:00.000Z";
    write_dead_letters(&env, &dead).await;
    let sessions_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sessions_file.path(), "s-5\ns-6\n\nunknown\n").unwrap();
    let before = ends(&env);

    let sessions_arg = sessions_file.path().to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, u64)> = vec![
        (vec![], 10),
        (vec!["--error-class", "permanent_error"], 1),
        (
            vec![
                "--error-class",
                "permanent_error",
                "--error-class",
                "invalid_event",
            ],
            2,
        ),
        (vec!["--reason-contains", "not ready"], 9),
        (vec!["--errcode", "10001"], 8),
        (vec!["--tenant", "other-tenant"], 1),
        (vec!["--source-partition", "1"], 1),
        (vec!["--source-offsets", "105..108"], 3),
        (vec!["--failed-after", "2026-11-21T00:00:00Z"], 1),
        (vec!["--failed-before", "2026-11-21T00:00:00Z"], 9),
        (vec!["--sessions", &sessions_arg], 2),
        (
            vec![
                "--errcode",
                "10001",
                "--source-partition",
                "0",
                "--tenant",
                &t,
            ],
            6,
        ),
    ];
    for (args, want) in &cases {
        let mut all = vec!["--dry-run"];
        all.extend(args.iter().copied());
        let (code, summary) = env.replay(&all).await;
        assert_eq!(code, 0, "{args:?}: {summary}");
        assert_eq!(
            summary_count(&summary, "matched"),
            *want,
            "{args:?}:\n{summary}"
        );
        assert_eq!(
            summary_count(&summary, "skipped by filter"),
            10 - want,
            "{args:?}"
        );
    }
    let (_, summary) = env.replay(&["--dry-run", "--errcode", "10001"]).await;
    assert!(
        summary.contains("8  retries_exhausted: errcode 10001: record not ready"),
        "{summary}"
    );
    assert!(
        summary.contains("session=s-2 tenant=other-tenant"),
        "{summary}"
    );
    assert_eq!(ends(&env), before, "a dry run writes nothing");
    assert_eq!(
        testkit::committed_offsets(&env.bootstrap(), &format!("{}.replay", env.group), &env.dlq)
            .unwrap(),
        vec![None],
        "a dry run commits nothing"
    );

    // A real run with a filter: exactly the selected records, with their
    // original key, value and headers, and replay.count 1.
    let (code, summary) = env.replay(&["--tenant", "other-tenant"]).await;
    assert_eq!(code, 0, "{summary}");
    let input = testkit::read_topic(&env.bootstrap(), &env.input, 1, WAIT)
        .await
        .unwrap();
    assert_eq!(key(&input[0]), "s-2");
    assert_eq!(header(&input[0], REPLAY_COUNT).as_deref(), Some("1"));
    assert_eq!(header(&input[0], "trace-id").as_deref(), Some("t-1"));
    assert_eq!(header(&input[0], dlq::ERROR_CLASS), None);
    assert_eq!(ends(&env)[0], vec![1], "one record replayed");
}

#[tokio::test]
async fn a_killed_replay_rerun_loses_nothing() {
    let env = TestEnv::new("replaykill", 1, Duration::ZERO).await;
    let total = 600;
    let dead: Vec<Dead> = (0..total)
        .map(|i| Dead::new(&format!("k-{i:04}"), &env.tenant))
        .collect();
    write_dead_letters(&env, &dead).await;
    let dir = tempfile::tempdir().unwrap();
    let window = 8;
    let mut child = env.spawn_replay(
        &["--rate", "200", "--window", &window.to_string()],
        &dir.path().join("replay.log"),
    );
    testkit::read_topic(&env.bootstrap(), &env.input, 100, WAIT)
        .await
        .unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first = ends(&env)[0][0];
    assert!(first < total as i64, "the kill came after the end");

    let (code, summary) = env.replay(&["--window", &window.to_string()]).await;
    assert_eq!(code, 0, "{summary}");
    let written = ends(&env)[0][0] as usize;
    let input = testkit::read_topic(&env.bootstrap(), &env.input, written, WAIT)
        .await
        .unwrap();
    let distinct: BTreeSet<String> = input.iter().map(key).collect();
    assert_eq!(distinct.len(), total, "every dead letter replayed");
    let duplicates = input.len() - total;
    println!(
        "killed replay: {total} dead letters, killed after {first}, {duplicates} re-submitted twice"
    );
    assert!(
        duplicates <= 2 * window,
        "{duplicates} duplicates: more than the window and its commits in flight"
    );
}

#[tokio::test]
async fn loop_guard_stops_a_record_that_keeps_failing_and_direct_enriches_the_rest() {
    let env = TestEnv::new("replayloop", 1, Duration::ZERO).await;
    // One record the API will never answer, one it answers now.
    write_dead_letters(
        &env,
        &[
            Dead::new("permanent-1", &env.tenant),
            Dead::new("call-1", &env.tenant),
        ],
    )
    .await;
    for round in 1..=3 {
        let (code, summary) = env.replay(&["--direct", "--max-replays", "3"]).await;
        assert_eq!(code, 1, "a failed re-submission fails the run: {summary}");
        assert_eq!(summary_count(&summary, "failed"), 1, "round {round}");
        let dead = testkit::read_topic(&env.bootstrap(), &env.dlq, 2 + round, WAIT)
            .await
            .unwrap();
        let last = dead.last().unwrap();
        assert_eq!(key(last), "permanent-1");
        assert_eq!(
            header(last, REPLAY_COUNT),
            Some(round.to_string()),
            "the dead letter carries the replay count"
        );
        assert_eq!(
            header(last, dlq::ERROR_CLASS).as_deref(),
            Some("permanent_error")
        );
    }
    let out = env.read_output(1).await;
    assert_eq!(key(&out[0]), "call-1", "--direct enriched the good record");
    assert_eq!(enriched_json(&out[0])["enrichment"]["source"]["offset"], 0);

    let (code, summary) = env.replay(&["--direct", "--max-replays", "3"]).await;
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary_count(&summary, "skipped by loop guard"), 1);
    assert_eq!(summary_count(&summary, "replayed"), 0);
    assert_eq!(ends(&env)[2], vec![5], "not dead-lettered a fourth time");
}

#[tokio::test]
async fn a_truncated_dead_letter_is_reported_with_its_source_not_replayed() {
    let env = TestEnv::new("replaytrunc", 1, Duration::ZERO).await;
    let input = env.input.clone();
    let headers = [
        (dlq::ERROR_CLASS, "invalid_event"),
        (dlq::REASON, "unknown tenant nobody"),
        (dlq::TRUNCATED_TO, "12"),
        (dlq::ORIGINAL_SIZE, "40960"),
        (dlq::SOURCE_TOPIC, input.as_str()),
        (dlq::SOURCE_PARTITION, "0"),
        (dlq::SOURCE_OFFSET, "7"),
    ];
    let value = br#"{"session_id"#;
    env.produce_raw(&env.dlq, &[(Some("big-1"), &value[..12], &headers)])
        .await;
    let (code, summary) = env.replay(&[]).await;
    assert_eq!(code, 1, "{summary}");
    assert_eq!(summary_count(&summary, "skipped, truncated"), 1);
    assert_eq!(summary_count(&summary, "replayed"), 0);
    assert!(
        env.is_empty(&env.input),
        "a truncated value was re-submitted"
    );
}
