//! `uincall-enricher backfill` against Apache Kafka and the fake API's call
//! list: windows and pages, every session once, the reconcile
//! (`--skip-enriched`), a kill and a rerun, the dry run, and the answers
//! that stop a run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime};
use uincall_enricher::fake_api::ListFault;

use crate::helpers::*;
use crate::testkit;

/// `n` sessions `bf-0000…` spread evenly over `days` days from 2026-08-01
/// 00:00 (wall clock in Shanghai, the default zone).
fn calls(n: usize, days: i64) -> Vec<(String, NaiveDateTime)> {
    calls_from(NaiveDate::from_ymd_opt(2026, 8, 1).unwrap(), n, days)
}

/// `n` sessions `bf-0000…` spread evenly over `days` days from `start`
/// 00:00 in Shanghai; the last one is before `start + days`.
fn calls_from(start: NaiveDate, n: usize, days: i64) -> Vec<(String, NaiveDateTime)> {
    let start = start.and_time(chrono::NaiveTime::MIN);
    let step = chrono::Duration::days(days) / n as i32;
    (0..n)
        .map(|i| (format!("bf-{i:04}"), start + step * i as i32))
        .collect()
}

/// The date `days` days before today in Shanghai (UTC+8 all year): a
/// range left open (no `--to`) ends now, so a test of one takes its start
/// from today to see the same windows on any day.
fn days_before_today(days: u64) -> NaiveDate {
    let shanghai = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
    let today = chrono::Utc::now().with_timezone(&shanghai).date_naive();
    today - chrono::Days::new(days)
}

/// The 90 days from 2026-08-01.
const RANGE: [&str; 4] = ["--from", "2026-08-01", "--to", "2026-10-30"];

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub log: String,
}

/// Runs `backfill ARGS` (for this test's tenant) to its end; the wait does
/// not block this test's runtime, which serves the fake API.
pub async fn backfill(env: &TestEnv, dir: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Ran {
    let log = dir.join("backfill.log");
    let child = spawn_backfill(env, &log, dir, args, extra_env, Stdio::piped());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

pub fn spawn_backfill(
    env: &TestEnv,
    log: &PathBuf,
    dir: &Path,
    args: &[&str],
    extra_env: &[(&str, &str)],
    stdout: Stdio,
) -> std::process::Child {
    let state = dir.join("state.json");
    let mut all = vec!["backfill", "--tenant", &env.tenant, "--state"];
    let state = state.to_str().unwrap().to_string();
    all.push(&state);
    all.extend_from_slice(args);
    env.spawn_command(&all, log, extra_env, stdout)
}

/// The keys on the input topic, and how many records it holds.
async fn input_keys(env: &TestEnv, n: usize) -> (BTreeSet<String>, usize) {
    let (records, total) = env.read_all(&env.input, n).await;
    (records.iter().map(key).collect(), total)
}

fn names(calls: &[(String, NaiveDateTime)]) -> BTreeSet<String> {
    calls.iter().map(|(s, _)| s.clone()).collect()
}

#[tokio::test]
async fn a_90_day_range_is_two_windows_and_every_session_once_then_enriched() {
    let env = TestEnv::new("backfill", 3, Duration::ZERO).await;
    let calls = calls(237, 90);
    env.api.set_calls(&env.tenant, calls.clone());
    let dir = tempfile::tempdir().unwrap();
    let ran = backfill(&env, dir.path(), &RANGE, &[]).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.log);
    assert!(
        ran.stdout.contains("submitted              237"),
        "{}",
        ran.stdout
    );
    assert!(!ran.log.contains(&env.token) && !ran.stdout.contains(&env.token));

    // Two windows (60 + 30 days, in Shanghai time), each paged to a short
    // page: 158 sessions = 50+50+50+8, 79 = 50+29.
    let asked: Vec<(String, String, u32)> = (env.api.list_requests().into_iter())
        .map(|r| (r.start_time, r.end_time, r.page))
        .collect();
    let (first, second) = (
        (
            "2026-08-01 00:00:00".to_string(),
            "2026-09-30 00:00:00".to_string(),
        ),
        (
            "2026-09-30 00:00:00".to_string(),
            "2026-10-30 00:00:00".to_string(),
        ),
    );
    let want: Vec<(String, String, u32)> = (1..=4)
        .map(|p| (first.0.clone(), first.1.clone(), p))
        .chain((1..=2).map(|p| (second.0.clone(), second.1.clone(), p)))
        .collect();
    assert_eq!(asked, want);

    // Each session once, as an event the worker reads.
    let (keys, total) = input_keys(&env, 237).await;
    assert_eq!(keys, names(&calls));
    assert_eq!(total, 237);
    let records = testkit::read_topic(&env.bootstrap(), &env.input, 1, WAIT)
        .await
        .unwrap();
    assert_eq!(
        header(&records[0], "uincall.source").as_deref(),
        Some("backfill")
    );
    assert_eq!(
        header(&records[0], "uincall.tenant").as_deref(),
        Some(env.tenant.as_str())
    );

    let worker = env.spawn_replica("worker", dir.path(), &[]);
    let out = env.read_output(237).await;
    worker.stop().await;
    assert_eq!(out.iter().map(key).collect::<BTreeSet<_>>(), names(&calls));
}

#[tokio::test]
async fn skip_enriched_submits_only_the_sessions_missing_from_the_output_topic() {
    let env = TestEnv::new("backfill-skip", 3, Duration::ZERO).await;
    let calls = calls(237, 90);
    env.api.set_calls(&env.tenant, calls.clone());
    // 100 of them enriched already (every other one, so most pages have
    // some).
    let enriched: Vec<&String> = calls.iter().map(|(s, _)| s).step_by(2).take(100).collect();
    let records: Vec<RawRecord<'_>> = (enriched.iter())
        .map(|s| (Some(s.as_str()), &b"{}"[..], &[][..]))
        .collect();
    env.produce_raw(&env.output, &records).await;
    let dir = tempfile::tempdir().unwrap();

    // The dry run says what is missing and writes nothing.
    let mut args = RANGE.to_vec();
    args.extend(["--skip-enriched", "--dry-run"]);
    let dry = backfill(&env, dir.path(), &args, &[]).await;
    assert_eq!(dry.code, 0, "{}\n{}", dry.stdout, dry.log);
    for line in [
        "sessions listed        237",
        "skipped, enriched      100",
        "would submit           137",
    ] {
        assert!(dry.stdout.contains(line), "{line}:\n{}", dry.stdout);
    }
    assert_eq!(
        dry.stdout
            .lines()
            .filter(|l| l.ends_with(" to submit"))
            .count(),
        2,
        "a line per window: {}",
        dry.stdout
    );
    assert!(env.is_empty(&env.input), "a dry run writes no event");
    assert!(!dir.path().join("state.json").exists(), "nor its state");

    let ran = backfill(&env, dir.path(), &args[..5], &[]).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.log);
    assert!(
        ran.stdout.contains("submitted              137"),
        "{}",
        ran.stdout
    );
    let (keys, total) = input_keys(&env, 137).await;
    assert_eq!(total, 137);
    let missing: BTreeSet<String> = (calls.iter().map(|(s, _)| s))
        .filter(|s| !enriched.contains(s))
        .cloned()
        .collect();
    assert_eq!(keys, missing);
}

#[tokio::test]
async fn killed_mid_run_a_rerun_continues_and_submits_every_session_once() {
    let env = TestEnv::new("backfill-kill", 3, Duration::ZERO).await;
    // No --to: the range ends when the run starts (90 days and part of
    // today: two windows, 60 days and the rest); the rerun keeps that end
    // (a later one would make it another run, started over).
    let from = days_before_today(90);
    let calls = calls_from(from, 237, 90);
    env.api.set_calls(&env.tenant, calls.clone());
    let dir = tempfile::tempdir().unwrap();
    let from = from.to_string();
    let open = ["--from", from.as_str()];
    // The first page is answered; the second hangs until the kill.
    env.api.set_list_fault(Some(ListFault::HangAfter(1)));
    let log = dir.path().join("first.log");
    let mut child = spawn_backfill(&env, &log, dir.path(), &open, &[], Stdio::null());
    wait_until("the second page asked", || {
        env.api.list_requests().len() >= 2
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    env.api.set_list_fault(None);
    assert_eq!(
        testkit::end_offsets(&env.bootstrap(), &env.input)
            .unwrap()
            .iter()
            .sum::<i64>(),
        50
    );

    let ran = backfill(&env, dir.path(), &open, &[]).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.log);
    assert!(
        ran.stdout.contains("continued from the state file"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("submitted              187"),
        "{}",
        ran.stdout
    );
    let rerun_pages: Vec<u32> = (env.api.list_requests().iter().skip(2))
        .map(|r| r.page)
        .collect();
    assert_eq!(
        rerun_pages,
        [2, 3, 4, 1, 2],
        "the rerun starts at the page the kill stopped"
    );
    let (keys, total) = input_keys(&env, 237).await;
    assert_eq!(keys, names(&calls));
    assert_eq!(total, 237, "no page submitted twice");

    // Done: a third run of the same range has nothing left.
    let again = backfill(&env, dir.path(), &open, &[]).await;
    assert_eq!(again.code, 0);
    assert!(
        again.stdout.contains("submitted              0"),
        "{}",
        again.stdout
    );
}

#[tokio::test]
async fn answers_that_stop_a_run_say_why_with_their_exit_code_and_no_token() {
    let env = TestEnv::new("backfill-stop", 1, Duration::ZERO).await;
    // An open range (to now) of ten days.
    let from = days_before_today(10);
    env.api.set_calls(&env.tenant, calls_from(from, 20, 10));
    let from = from.to_string();
    let dir = tempfile::tempdir().unwrap();
    let systemic = [("UINCALL__RETRY__SYSTEMIC_ERRCODES", "40001")];
    let cases = [
        (
            Some(ListFault::Unreadable),
            1,
            "data has keys [total, calls]",
        ),
        (Some(ListFault::Errcode(40001)), 3, "systemic errcode 40001"),
        (Some(ListFault::Outage), 3, "HTTP 503"),
        (
            Some(ListFault::Errcode(40004)),
            1,
            "permanent errcode 40004",
        ),
    ];
    for (fault, code, says) in cases {
        env.api.set_list_fault(fault.clone());
        let ran = backfill(&env, dir.path(), &["--from", &from, "--restart"], &systemic).await;
        assert_eq!(ran.code, code, "{fault:?}: {}\n{}", ran.stdout, ran.log);
        // librdkafka logs from its own threads, so one of its lines may
        // come after the run's last word.
        let last = (ran.log.lines().rev())
            .find(|l| !l.contains(r#""target":"librdkafka""#))
            .unwrap_or_default();
        assert!(last.contains(says), "{fault:?}: {last}");
        assert!(!ran.log.contains(&env.token) && !ran.stdout.contains(&env.token));
    }
    assert!(env.is_empty(&env.input));
}
