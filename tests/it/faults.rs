//! The faults the worker meets in production, against Apache Kafka
//! and the fake Uincall API: an API outage, an expired token, a rate limit,
//! SIGTERM under load, a broker restart. Longer variants: scripts/faults.sh.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::testkit;
use uincall_enricher::dead_letter::header as dlq;
use uincall_enricher::fake_api::ERRCODE_BAD_TOKEN;

use crate::helpers::*;

fn sessions(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:05}")).collect()
}

/// A duration from the environment (seconds), for the long variants.
fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Waits until the API has received `more` calls beyond `from`.
async fn api_calls_beyond(env: &TestEnv, from: u64, more: u64) {
    wait_until("API calls", || env.api.total_calls() >= from + more).await;
}

#[tokio::test]
async fn api_outage_pauses_without_dead_letters_and_drains_after() {
    let env = TestEnv::new("outage", 2, Duration::ZERO).await;
    let mut s = env.settings();
    // Without the systemic check these records would be dead-lettered
    // within ~100 ms of the outage: 3 attempts, 10..50 ms apart.
    s.retry.max_attempts = 3;
    let worker = env.start_worker(s).await;
    let side = serve_side_port(&worker).await;

    let before = sessions("before", 0..100);
    env.seed(&before).await;
    env.read_output(before.len()).await;
    until_status(&format!("{side}/readyz"), 200).await;

    env.api.set_outage(true);
    let during = sessions("during", 0..200);
    env.seed(&during).await;
    let body = until_status(&format!("{side}/readyz"), 503).await;
    assert!(body.contains("systemic failure"), "{body}");
    // The outage lasts while the probe is refused a few times (and at least
    // OUTAGE_SECS, 60 in scripts/faults.sh).
    let calls = env.api.total_calls();
    let began = std::time::Instant::now();
    let outage = tokio::time::sleep(env_secs("OUTAGE_SECS", 2));
    api_calls_beyond(&env, calls, 4).await;
    outage.await;
    assert!(worker.stats.is_systemic());
    assert_eq!(worker.stats.dead_lettered_total(), 0);
    env.api.set_outage(false);
    let lasted = began.elapsed();
    let refused = env.api.total_calls() - calls;

    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    let out = env.read_output(all.len()).await;
    let got: BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(got, all.iter().cloned().collect(), "backlog drained");
    until_status(&format!("{side}/readyz"), 200).await;
    let metrics = until_status(&format!("{side}/metrics"), 200).await;
    assert!(
        metrics.contains("uincall_enricher_systemic_failures_total{cause=\"outage\"} 1"),
        "{metrics}"
    );
    worker.stop().await.unwrap();
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
    println!(
        "API outage: in systemic failure for {:.1} s with {refused} API calls (the probe), {} events arrived during the outage, 0 dead letters, {} enriched after",
        lasted.as_secs_f64(),
        during.len(),
        all.len()
    );
}

/// Tokens in a directory, as a mounted Secret, read again every 100 ms.
struct TokensDir {
    dir: tempfile::TempDir,
    file: std::path::PathBuf,
}

impl TokensDir {
    fn new(env: &TestEnv) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(&env.tenant);
        std::fs::write(&file, &env.token).unwrap();
        TokensDir { dir, file }
    }

    fn settings(&self, env: &TestEnv) -> uincall_enricher::settings::Settings {
        let mut s = env.settings();
        s.api.tokens.clear();
        s.api.tokens_dir = Some(self.dir.path().to_path_buf());
        s.api.tokens_reload_interval = Duration::from_millis(100);
        s
    }

    /// The Secret is rewritten with a new token.
    fn replace(&self, token: &str) {
        std::fs::write(&self.file, token).unwrap();
    }

    /// 20 events enriched, then the API stops accepting the token and 50
    /// more events arrive; returns when `/readyz` reports the systemic
    /// failure.
    async fn expire_mid_stream(&self, env: &TestEnv, worker: &RunningWorker) -> Expired {
        let side = serve_side_port(worker).await;
        let first = sessions("first", 0..20);
        env.seed(&first).await;
        env.read_output(first.len()).await;
        let rotated = format!("{}-rotated", env.token);
        env.api.set_token(&env.tenant, &rotated);
        let second = sessions("second", 0..50);
        env.seed(&second).await;
        let body = until_status(&format!("{side}/readyz"), 503).await;
        assert!(body.contains("systemic failure"), "{body}");
        Expired {
            first,
            second,
            rotated,
            readyz: format!("{side}/readyz"),
        }
    }
}

struct Expired {
    first: Vec<String>,
    second: Vec<String>,
    /// The token the API wants now.
    rotated: String,
    readyz: String,
}

#[tokio::test]
async fn expired_token_pauses_and_recovers_when_the_token_file_is_replaced() {
    let env = TestEnv::new("token", 1, Duration::ZERO).await;
    let tokens = TokensDir::new(&env);
    let mut s = tokens.settings(&env);
    s.retry.systemic_errcodes = vec![ERRCODE_BAD_TOKEN];
    let worker = env.start_worker(s).await;
    let Expired {
        first,
        second,
        rotated,
        readyz,
    } = tokens.expire_mid_stream(&env, &worker).await;
    let calls = env.api.total_calls();
    api_calls_beyond(&env, calls, 2).await; // the probe is refused
    assert_eq!(worker.stats.dead_lettered_total(), 0);

    // The Secret is updated: the worker reloads it and resumes.
    tokens.replace(&rotated);
    let out = env.read_output(first.len() + second.len()).await;
    assert_eq!(
        out.iter().map(key).collect::<BTreeSet<_>>().len(),
        first.len() + second.len()
    );
    until_status(&readyz, 200).await;
    worker.stop().await.unwrap();
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

#[tokio::test]
async fn rate_limit_holds_calls_per_second_per_tenant() {
    let env = TestEnv::new("ratelimit", 3, Duration::ZERO).await;
    let mut s = env.settings();
    let limit = 40;
    s.rate_limit.per_tenant_per_second = limit;
    let all = sessions("call", 0..160);
    env.seed(&all).await;
    let worker = env.start_worker(s).await;
    env.read_output(all.len()).await;
    worker.stop().await.unwrap();

    let per_second = env.api.calls_per_second();
    let most = per_second.iter().copied().max().unwrap_or(0);
    assert!(
        most as f64 <= limit as f64 * 1.1,
        "a second had {most} calls, over {limit} + 10 %: {per_second:?}"
    );
    assert_eq!(env.api.total_calls(), all.len() as u64);
    println!("rate limit {limit}/s: calls per second {per_second:?}");
}

#[tokio::test]
async fn rate_limited_answers_slow_the_tenant_without_failing_records() {
    let env = TestEnv::new("limited", 1, Duration::ZERO).await;
    let mut s = env.settings();
    s.retry.max_attempts = 1; // any counted failure would dead-letter
    s.rate_limit.backoff_min = Duration::from_millis(20);
    let all: Vec<String> = (0..30).map(|i| format!("ratelimited2-{i:03}")).collect();
    env.seed(&all).await;
    let worker = env.start_worker(s).await;
    let out = env.read_output(all.len()).await;
    worker.stop().await.unwrap();
    for m in &out {
        let v = enriched_json(m);
        assert_eq!(v["enrichment"]["attempts"], 1, "{}", key(m));
        assert_eq!(env.api.calls(&key(m)), 3, "two 429s, then the record");
    }
    assert!(env.is_empty(&env.dlq));
}

/// Source (partition, offset) of every record on the output and
/// dead-letter topics.
async fn outputs_by_partition(env: &TestEnv) -> BTreeMap<i32, BTreeSet<i64>> {
    let total = |topic: &str| -> usize {
        testkit::end_offsets(&env.bootstrap(), topic)
            .unwrap()
            .iter()
            .sum::<i64>() as usize
    };
    let out = env.read_output(total(&env.output)).await;
    let dead = env.read_dlq(total(&env.dlq)).await;
    let mut by: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
    for m in &out {
        let v = enriched_json(m);
        let src = &v["enrichment"]["source"];
        by.entry(src["partition"].as_i64().unwrap() as i32)
            .or_default()
            .insert(src["offset"].as_i64().unwrap());
    }
    for m in &dead {
        let num = |h| header(m, h).unwrap().parse::<i64>().unwrap();
        by.entry(num(dlq::SOURCE_PARTITION) as i32)
            .or_default()
            .insert(num(dlq::SOURCE_OFFSET));
    }
    by
}

#[tokio::test]
async fn sigterm_under_load_exits_zero_and_commits_exactly_what_was_acknowledged() {
    let env = TestEnv::new("sigterm", 3, Duration::from_millis(20)).await;
    let all: Vec<String> = (0..3000)
        .map(|i| match i % 10 {
            0 => format!("transient1-{i:05}"),
            _ => format!("call-{i:05}"),
        })
        .collect();
    env.seed(&all).await;
    let dir = tempfile::tempdir().unwrap();
    // A drain long enough for every write under way to be acknowledged on
    // a loaded machine: one cut off by the drain's deadline is on the output
    // without its offset stored, which this test counts as an error.
    let mut child = env.spawn_binary(
        &dir.path().join("worker.log"),
        &[
            ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "64"),
            ("UINCALL__PIPELINE__DRAIN_TIMEOUT", "25s"),
            ("UINCALL__KAFKA__MAX_POLL_INTERVAL", "40s"),
        ],
    );
    testkit::read_topic(&env.bootstrap(), &env.output, 500, WAIT)
        .await
        .unwrap();
    sigterm(&child);
    let status = wait_exit(&mut child, WAIT).await;
    assert!(status.success(), "exit status {status}");

    let committed = env.committed();
    let done = outputs_by_partition(&env).await;
    let (mut processed, mut beyond) = (0, 0);
    for (p, c) in committed.iter().enumerate() {
        let offsets = done.get(&(p as i32)).cloned().unwrap_or_default();
        // Every record below the committed offset was acknowledged, and the
        // commit reaches the first one that was not: nothing lost, nothing
        // acknowledged left uncommitted for no reason.
        let prefix = (0..).take_while(|o| offsets.contains(o)).count() as i64;
        assert_eq!(c.unwrap_or(0), prefix, "partition {p}: {committed:?}");
        processed += prefix;
        // Records abandoned in a backoff wait leave gaps: what was
        // acknowledged past them is re-delivered (duplicates).
        beyond += offsets.len() as i64 - prefix;
    }
    assert!(
        processed < all.len() as i64,
        "SIGTERM came after the stream ended"
    );
    println!(
        "SIGTERM under load: committed {processed}, {beyond} acknowledged past the commit (re-delivered)"
    );
}

#[tokio::test]
async fn dead_letter_ratio_stops_a_flood_when_an_unlisted_errcode_fails_every_record() {
    let env = TestEnv::new("dlqratio", 1, Duration::ZERO).await;
    let tokens = TokensDir::new(&env);
    let mut s = tokens.settings(&env);
    // The token errcode is not listed as systemic: records fail one by one.
    s.retry.max_attempts = 2;
    s.systemic.record_window = 20;
    s.systemic.min_records = 10;
    s.systemic.dead_letter_ratio = 0.5;
    let worker = env.start_worker(s).await;
    let Expired {
        first,
        second,
        rotated,
        readyz,
    } = tokens.expire_mid_stream(&env, &worker).await;
    // 20 enriched outcomes in the window: the 11th dead letter would pass
    // half of it, so exactly 10 were written.
    let dead = env.read_dlq(10).await;
    let calls = env.api.total_calls();
    api_calls_beyond(&env, calls, 2).await; // the probe is refused
    assert_eq!(worker.stats.dead_lettered_total(), 10);

    tokens.replace(&rotated);
    let out = env
        .read_output(first.len() + second.len() - dead.len())
        .await;
    until_status(&readyz, 200).await;
    worker.stop().await.unwrap();
    let enriched: BTreeSet<String> = out.iter().map(key).collect();
    let dead: BTreeSet<String> = dead.iter().map(key).collect();
    assert_eq!(enriched.len() + dead.len(), first.len() + second.len());
    assert!(enriched.is_disjoint(&dead));
    for m in &env.read_dlq(10).await {
        assert_eq!(
            header(m, dlq::ERROR_CLASS).as_deref(),
            Some("retries_exhausted")
        );
    }
}

/// Only new sessions fail (every `permanent-` one, as after a bad API
/// deploy), while the old ones still answer. The hold that the dead-letter
/// ratio opens is tried with a held record's session, not an old good one,
/// so it stays open until `systemic.dead_letter_hold`, then gives up once:
/// the failures are the records' own and all are dead-lettered, with
/// `dead_letter_holds_given_up_total` 1. Before, each probe of an old
/// session healed it and the next window's worth of dead letters went
/// through: a cycle per probe for as long as the problem lasted.
#[tokio::test]
async fn a_dead_letter_hold_is_tried_with_the_kind_that_failed_and_gives_up_once() {
    use uincall_enricher::fake_api::ERRCODE_NOT_FOUND;
    let env = TestEnv::new("dlqhold", 1, Duration::ZERO).await;
    let mut s = env.settings();
    s.retry.permanent_errcodes = vec![ERRCODE_NOT_FOUND];
    s.systemic.record_window = 20;
    s.systemic.min_records = 10;
    s.systemic.dead_letter_ratio = 0.5;
    s.systemic.probe_min_delay = Duration::from_millis(200);
    s.systemic.probe_max_delay = Duration::from_millis(400);
    s.systemic.dead_letter_hold = Duration::from_secs(3);
    let worker = env.start_worker(s).await;
    let good = sessions("good", 0..20);
    env.seed(&good).await;
    let _ = env.read_output(good.len()).await;
    let bad = sessions("permanent", 0..200);
    env.seed(&bad).await;
    let dead = env.read_dlq(bad.len()).await;
    let stats = worker.stats.clone();
    worker.stop().await.unwrap();
    assert!(dead.iter().all(|m| bad.contains(&key(m))));
    let metrics = stats.encode();
    let openings = "uincall_enricher_systemic_failures_total{cause=\"dead_letter_ratio\"} ";
    let opened = (metrics.lines())
        .find_map(|l| l.strip_prefix(openings))
        .unwrap_or("0");
    assert_eq!(opened, "1", "holds opened");
    assert_eq!(stats.dead_letter_holds_given_up(), 1);
}
