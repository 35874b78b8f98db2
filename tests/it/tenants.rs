//! Tenants do not hurt each other: a failure confined to one tenant (its
//! token refused, its own API down, a flood of its dead letters) holds that
//! tenant's records only, and a slow tenant keeps to its share of the window.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::testkit;
use uincall_enricher::dead_letter::ErrorClass;
use uincall_enricher::fake_api::ERRCODE_BAD_TOKEN;

use crate::helpers::*;

fn sessions(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Events of `tenant`, for each session.
fn events(tenant: &str, sessions: &[String]) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    sessions
        .iter()
        .map(|s| {
            let v = serde_json::json!({"session_id": s, "tenant_id": tenant});
            (Some(s.as_bytes().to_vec()), v.to_string().into_bytes())
        })
        .collect()
}

/// Produces `tenant`'s events for `sessions` to the input topic.
async fn produce_events(env: &TestEnv, tenant: &str, sessions: &[String]) {
    testkit::produce(&env.bootstrap(), &env.input, events(tenant, sessions))
        .await
        .unwrap();
}

/// The keys (session ids) of the first `n` records on the output topic.
async fn output_keys(env: &TestEnv, n: usize) -> BTreeSet<String> {
    env.read_output(n).await.iter().map(key).collect()
}

/// The worker as a whole never entered systemic failure.
fn assert_never_systemic(stats: &uincall_enricher::stats::Stats) {
    let metrics = stats.encode();
    assert!(
        !metrics.contains("uincall_enricher_systemic_failures_total{"),
        "the worker as a whole never failed: {metrics}"
    );
}

/// A tenant `<tenant>-<suffix>` with a token and an API of its own (a second
/// fake answering in `latency`, `tenants.<id>.base_url`).
async fn tenant_with_own_api(
    env: &TestEnv,
    s: &mut uincall_enricher::settings::Settings,
    suffix: &str,
    latency: Duration,
) -> (String, uincall_enricher::fake_api::FakeApi) {
    use std::collections::HashMap;
    use uincall_enricher::fake_api::{FakeApi, FakeApiConfig};
    use uincall_enricher::settings::TenantSettings;

    let tenant = format!("{}-{suffix}", env.tenant);
    let own = FakeApi::start(FakeApiConfig {
        latency,
        tokens: HashMap::from([(tenant.clone(), env.token.clone())]),
    })
    .await
    .unwrap();
    let token = secrecy::SecretString::from(env.token.clone());
    s.api.tokens.insert(tenant.clone(), token);
    let settings = TenantSettings {
        base_url: Some(own.base_url().parse().unwrap()),
        ..Default::default()
    };
    s.tenants.insert(tenant.clone(), settings);
    (tenant, own)
}

/// A second tenant whose token (a file in a tokens directory, read every
/// 100 ms) the API will refuse once [`TokenTenant::refuse`] is called.
struct TokenTenant {
    id: String,
    file: std::path::PathBuf,
    rotated: String,
    _dir: tempfile::TempDir,
}

impl TokenTenant {
    /// Settings for it beside the test's tenant: tokens from files, its
    /// refusal a systemic errcode, at most 2 counted attempts (a counted
    /// failure would dead-letter soon), a window of 16, far smaller than the
    /// held records (they must give their places back, in the window and in
    /// what the loop admits).
    fn new(env: &TestEnv, s: &mut uincall_enricher::settings::Settings) -> TokenTenant {
        let id = format!("{}-b", env.tenant);
        let token = format!("{}-b", env.token);
        env.api.set_token(&id, &token);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(&env.tenant), &env.token).unwrap();
        let file = dir.path().join(&id);
        std::fs::write(&file, &token).unwrap();
        s.api.tokens.clear();
        s.api.tokens_dir = Some(dir.path().to_path_buf());
        s.api.tokens_reload_interval = Duration::from_millis(100);
        s.retry.systemic_errcodes = vec![ERRCODE_BAD_TOKEN];
        s.retry.max_attempts = 2;
        s.pipeline.max_in_flight = 16;
        TokenTenant {
            id,
            file,
            rotated: format!("{token}-rotated"),
            _dir: dir,
        }
    }

    /// One more tenant `<tenant>-<suffix>` whose token file sits beside
    /// this one's.
    fn another(&self, env: &TestEnv, suffix: &str) -> TokenTenant {
        let id = format!("{}-{suffix}", env.tenant);
        let token = format!("{}-{suffix}", env.token);
        env.api.set_token(&id, &token);
        let dir = self.file.parent().unwrap();
        let file = dir.join(&id);
        std::fs::write(&file, &token).unwrap();
        TokenTenant {
            id,
            file,
            rotated: format!("{token}-rotated"),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The API refuses the tenant's token from now on.
    fn refuse(&self, env: &TestEnv) {
        env.api.set_token(&self.id, &self.rotated);
    }

    /// The Secret is updated: the worker reads the token the API takes.
    fn rotate(&self) {
        std::fs::write(&self.file, &self.rotated).unwrap();
    }
}

#[tokio::test]
async fn a_tenant_whose_token_is_refused_is_held_alone_and_resumes_with_a_new_token() {
    let env = TestEnv::new("tenants", 2, Duration::from_millis(5)).await;
    let mut s = env.settings();
    let refused = TokenTenant::new(&env, &mut s);
    let (healthy, expired) = (env.tenant.clone(), refused.id.clone());
    let worker = env.start_worker(s).await;
    let side = serve_side_port(&worker).await;

    // The API refuses the second tenant's token from now on; its events
    // come first in both partitions, the healthy tenant's after them.
    refused.refuse(&env);
    let (held, fine) = (sessions("held", 100), sessions("fine", 400));
    produce_events(&env, &expired, &held).await;
    let started = Instant::now();
    produce_events(&env, &healthy, &fine).await;

    // Every record of the healthy tenant is enriched while the other waits.
    let out = env.read_output(fine.len()).await;
    let took = started.elapsed();
    let keys: BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(keys, fine.iter().cloned().collect::<BTreeSet<_>>());
    let ready = loop {
        let body = until_status(&format!("{side}/readyz"), 200).await;
        if body.contains("held tenants") {
            break body;
        }
    };
    assert!(
        ready.contains(&expired) && ready.contains("errcode"),
        "{ready}"
    );
    assert_eq!(worker.stats.dead_lettered_total(), 0);
    assert!(worker.stats.encode().contains(&format!(
        "uincall_enricher_tenant_held{{tenant=\"{expired}\"}} 1"
    )));
    println!(
        "healthy tenant: {} records in {took:?} while the other tenant was held",
        fine.len()
    );

    // The Secret is updated: the held tenant's records go on.
    refused.rotate();
    let keys = output_keys(&env, fine.len() + held.len()).await;
    assert_eq!(keys.len(), fine.len() + held.len());
    until_status(&format!("{side}/readyz"), 200).await;
    worker.stop().await.unwrap();
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

/// Every tenant with traffic fails (the API refuses the tokens of both
/// tenants that send events; the test's own tenant has a good token and no
/// traffic): the worker's failure, not a tenant's. Nothing is dead-lettered
/// for the sake of the idle tenant, `/readyz` says not ready, and every
/// record is enriched once the tokens are replaced. Before, past
/// `max_held_records` every further record was dead-lettered as
/// `tenant_held` and `/readyz` stayed 200.
#[tokio::test]
async fn a_failure_of_every_tenant_with_traffic_dead_letters_nothing_and_is_not_ready() {
    let env = TestEnv::new("everyheld", 2, Duration::from_millis(5)).await;
    let mut s = env.settings();
    let a = TokenTenant::new(&env, &mut s);
    let b = a.another(&env, "c");
    let max_held = 100;
    s.pipeline.max_held_records = max_held;
    let worker = env.start_worker(s).await;
    let side = serve_side_port(&worker).await;

    a.refuse(&env);
    b.refuse(&env);
    let (of_a, of_b) = (sessions("a", 750), sessions("b", 750));
    produce_events(&env, &a.id, &of_a).await;
    produce_events(&env, &b.id, &of_b).await;
    let ready = until_status(&format!("{side}/readyz"), 503).await;
    assert!(ready.contains("every tenant with traffic"), "{ready}");
    // More than may wait were read: the old rule dead-letters from here.
    wait_until("the held records fill what may wait", || {
        worker.stats.consumed() > max_held as u64
    })
    .await;
    assert_eq!(worker.stats.dead_lettered_total(), 0);

    a.rotate();
    b.rotate();
    let keys = output_keys(&env, of_a.len() + of_b.len()).await;
    assert_eq!(keys.len(), of_a.len() + of_b.len());
    until_status(&format!("{side}/readyz"), 200).await;
    worker.stop().await.unwrap();
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

/// One record of a held tenant ahead of another tenant's in the same
/// partitions: past `pipeline.max_hold` it is dead-lettered as
/// `tenant_held` (replayable), so the committed offsets reach the end and a
/// rebalance or restart re-delivers nothing behind it. Before, the held
/// record pinned its partition's committed offset for as long as its tenant
/// was held: every record enriched behind it came again at the next
/// rebalance.
#[tokio::test]
async fn a_record_held_past_max_hold_is_dead_lettered_and_the_offsets_move_on() {
    let env = TestEnv::new("maxhold", 2, Duration::from_millis(5)).await;
    let mut s = env.settings();
    let refused = TokenTenant::new(&env, &mut s);
    s.pipeline.max_hold = Duration::from_secs(2);
    let worker = env.start_worker(s).await;

    // The healthy tenant has traffic; then one held record in each
    // partition, then the healthy tenant's records behind them.
    let first = sessions("first", 1);
    produce_events(&env, &env.tenant, &first).await;
    let _ = output_keys(&env, first.len()).await;
    refused.refuse(&env);
    let held = sessions("held", 2);
    produce_events(&env, &refused.id, &held).await;
    let fine = sessions("fine", 200);
    produce_events(&env, &env.tenant, &fine).await;

    let _ = output_keys(&env, first.len() + fine.len()).await;
    env.until_no_lag().await;
    let dead = env.read_dlq(held.len()).await;
    for m in &dead {
        assert!(held.contains(&key(m)), "{}", key(m));
        assert_eq!(header(m, "dlq.error_class").as_deref(), Some("tenant_held"));
        let reason = header(m, "dlq.reason").unwrap();
        assert!(reason.contains("pipeline.max_hold (2s)"), "{reason}");
    }
    assert_never_systemic(&worker.stats);
    worker.stop().await.unwrap();
}

/// A partition pinned behind one held record while another tenant's
/// records behind it finish: its position does not move, and `/healthz`
/// says so once `pipeline.stall_timeout` passes (2 s here). Before, any
/// held tenant switched stall detection off for every partition, and
/// records finishing behind the pinned one counted as progress.
#[tokio::test]
async fn a_partition_pinned_behind_a_held_record_is_reported_stalled() {
    let env = TestEnv::new("pinned", 1, Duration::from_millis(5)).await;
    let mut s = env.settings();
    let refused = TokenTenant::new(&env, &mut s);
    let worker = env.start_worker(s).await;
    let liveness = uincall_enricher::side_port::Liveness {
        stall_timeout: Duration::from_secs(2),
        rejoin_timeout: Duration::from_secs(300),
        held_stops_all: false,
    };
    let side = uincall_enricher::side_port::serve(
        "127.0.0.1:0".parse().unwrap(),
        worker.stats.clone(),
        liveness,
        worker.stop.clone(),
    )
    .await
    .unwrap();

    let first = sessions("first", 1);
    produce_events(&env, &env.tenant, &first).await;
    let _ = output_keys(&env, first.len()).await;
    refused.refuse(&env);
    produce_events(&env, &refused.id, &sessions("held", 1)).await;
    let fine = sessions("fine", 50);
    produce_events(&env, &env.tenant, &fine).await;
    let _ = output_keys(&env, first.len() + fine.len()).await;
    let health = until_status(&format!("http://{side}/healthz"), 503).await;
    assert!(
        health.contains("stalled") && health.contains("position did not move"),
        "{health}"
    );
    worker.stop().await.unwrap();
}

/// Waits until `n` records of held tenants either wait or were
/// dead-lettered as `tenant_held`; returns (waiting, dead-lettered).
async fn until_held_or_spilled(worker: &RunningWorker, n: usize) -> (usize, usize) {
    let started = Instant::now();
    loop {
        let metrics = worker.stats.encode();
        let waiting: usize = (metrics.lines())
            .find_map(|l| l.strip_prefix("uincall_enricher_records_held "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let spilled = worker.stats.dead_lettered(ErrorClass::TenantHeld) as usize;
        if waiting + spilled == n {
            return (waiting, spilled);
        }
        assert!(
            started.elapsed() < WAIT,
            "{waiting} waiting, {spilled} dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn past_max_held_records_a_held_tenants_records_are_dead_lettered_and_the_others_go_on() {
    let env = TestEnv::new("spill", 2, Duration::from_millis(5)).await;
    let mut s = env.settings();
    let refused = TokenTenant::new(&env, &mut s);
    let max_held = 40;
    s.pipeline.max_held_records = max_held;
    let worker = env.start_worker(s).await;

    // 200 records of the refused tenant ahead of the healthy tenant's 300
    // in both partitions: more than may wait.
    // The healthy tenant has traffic: a record of its read first.
    let first = sessions("first", 1);
    produce_events(&env, &env.tenant, &first).await;
    let _ = output_keys(&env, first.len()).await;
    refused.refuse(&env);
    let (held, mut fine) = (sessions("held", 200), sessions("fine", 300));
    produce_events(&env, &refused.id, &held).await;
    produce_events(&env, &env.tenant, &fine).await;
    fine.extend(first);

    // Every record of the healthy tenant is enriched; of the refused
    // tenant's, those that cannot wait are dead-lettered as tenant_held.
    let keys = output_keys(&env, fine.len()).await;
    assert_eq!(keys, fine.iter().cloned().collect::<BTreeSet<_>>());
    let (waiting, spilled) = until_held_or_spilled(&worker, held.len()).await;
    // Exactly as many as may wait: none dead-lettered while there was room.
    assert_eq!(waiting, max_held);
    assert_eq!(worker.stats.dead_lettered_total() as usize, spilled);
    assert_never_systemic(&worker.stats);
    let dead = env.read_dlq(spilled).await;
    for m in &dead {
        assert!(held.contains(&key(m)), "{}", key(m));
        assert_eq!(header(m, "dlq.error_class").as_deref(), Some("tenant_held"));
        assert_eq!(header(m, "dlq.tenant_id"), Some(refused.id.clone()));
        let reason = header(m, "dlq.reason").unwrap();
        assert!(
            reason.contains("is held") && reason.contains("max_held_records"),
            "{reason}"
        );
    }
    println!("{waiting} held records waited, {spilled} dead-lettered as tenant_held");

    // The token is replaced: those that waited are enriched; replaying the
    // class brings the rest.
    refused.rotate();
    let _ = output_keys(&env, fine.len() + waiting).await;
    let (code, summary) = env.replay(&["--error-class", "tenant_held"]).await;
    assert_eq!(
        (code, summary_count(&summary, "replayed")),
        (0, spilled as u64),
        "{summary}"
    );
    let keys = output_keys(&env, fine.len() + held.len()).await;
    assert_eq!(keys.len(), fine.len() + held.len());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_tenant_with_an_api_of_its_own_is_enriched_from_it() {
    let env = TestEnv::new("ownapi", 2, Duration::ZERO).await;
    let mut s = env.settings();
    let (private, own) = tenant_with_own_api(&env, &mut s, "private", Duration::ZERO).await;
    let worker = env.start_worker(s).await;
    let (shared, theirs) = (sessions("shared", 30), sessions("private", 30));
    let mut all = events(&env.tenant, &shared);
    all.extend(events(&private, &theirs));
    testkit::produce(&env.bootstrap(), &env.input, all)
        .await
        .unwrap();

    let out = env.read_output(shared.len() + theirs.len()).await;
    worker.stop().await.unwrap();
    let keys: BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(keys.len(), shared.len() + theirs.len());
    for k in &theirs {
        assert_eq!((own.calls(k), env.api.calls(k)), (1, 0), "{k}");
    }
    for k in &shared {
        assert_eq!((env.api.calls(k), own.calls(k)), (1, 0), "{k}");
    }
    assert!(env.is_empty(&env.dlq));
}

#[tokio::test]
async fn a_slow_tenant_keeps_its_share_of_the_window_and_the_fast_one_goes_on() {
    // The fast tenant's API answers in 20 ms, the slow tenant's (its own
    // base URL) in 2 s.
    let env = TestEnv::new("share", 2, Duration::from_millis(20)).await;
    let mut s = env.settings();
    let (slow_tenant, slow_api) =
        tenant_with_own_api(&env, &mut s, "slow", Duration::from_secs(2)).await;
    s.pipeline.max_in_flight = 64; // a share of 32 each
    let worker = env.start_worker(s).await;

    // The slow tenant's events come first in both partitions.
    let (slow, fast) = (sessions("slow", 600), sessions("fast", 1000));
    produce_events(&env, &slow_tenant, &slow).await;
    let started = Instant::now();
    produce_events(&env, &env.tenant, &fast).await;
    // Every fast record has been asked for (each once: its API does not
    // fail); how far the slow tenant got meanwhile.
    let fast_api = &env.api;
    wait_until("every fast record asked for", || {
        fast_api.total_calls() >= fast.len() as u64
    })
    .await;
    let slow_calls = slow_api.total_calls();
    assert!(
        fast.iter().all(|k| fast_api.calls(k) == 1),
        "each asked for once"
    );
    let took = started.elapsed();
    let stats = worker.stats.clone();
    worker.stop().await.unwrap();
    let keys = output_keys(&env, stats.enriched() as usize).await;
    assert!(
        fast.iter().all(|k| keys.contains(k)),
        "every fast record published"
    );

    // Without a share the fast tenant's records are read only once the
    // loop has taken every slow record but the last window's: 472 or more
    // slow calls first. Within its share (32 places, 2 s each) the slow
    // tenant makes a few rounds of calls while the fast one goes through.
    assert!(
        slow_calls < 300,
        "the slow tenant made {slow_calls} calls before the fast tenant's {} records were enriched",
        fast.len()
    );
    println!(
        "fast tenant: {} records in {took:?} ({:.0}/s) beside a tenant answering in 2 s ({slow_calls} of its calls meanwhile)",
        fast.len(),
        fast.len() as f64 / took.as_secs_f64()
    );
}

/// A second tenant with a token and the same fake API.
fn add_tenant(env: &TestEnv, s: &mut uincall_enricher::settings::Settings, suffix: &str) -> String {
    let tenant = format!("{}-{suffix}", env.tenant);
    env.api.set_token(&tenant, &env.token);
    let token = secrecy::SecretString::from(env.token.clone());
    s.api.tokens.insert(tenant.clone(), token);
    tenant
}

#[tokio::test]
async fn a_tenant_whose_own_api_is_down_is_held_alone() {
    let env = TestEnv::new("ownapi-down", 2, Duration::ZERO).await;
    let mut s = env.settings();
    let (private, own) = tenant_with_own_api(&env, &mut s, "private", Duration::ZERO).await;
    own.set_outage(true);
    s.retry.max_attempts = 3; // counted failures would dead-letter soon
    let worker = env.start_worker(s).await;
    let side = serve_side_port(&worker).await;

    // The private tenant's events first in both partitions.
    let (down, fine) = (sessions("down", 100), sessions("fine", 300));
    produce_events(&env, &private, &down).await;
    produce_events(&env, &env.tenant, &fine).await;
    let keys = output_keys(&env, fine.len()).await;
    assert_eq!(keys, fine.iter().cloned().collect::<BTreeSet<_>>());
    let ready = until_status(&format!("{side}/readyz"), 200).await;
    assert!(ready.contains(&private), "held and listed: {ready}");
    assert_never_systemic(&worker.stats);
    assert_eq!(worker.stats.dead_lettered_total(), 0);

    // Its API is back: its records go on.
    own.set_outage(false);
    let keys = output_keys(&env, fine.len() + down.len()).await;
    assert_eq!(keys.len(), fine.len() + down.len());
    worker.stop().await.unwrap();
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

#[tokio::test]
async fn a_flood_of_one_tenants_dead_letters_holds_that_tenant_only() {
    use uincall_enricher::fake_api::ERRCODE_NOT_FOUND;

    let env = TestEnv::new("dlflood", 2, Duration::ZERO).await;
    let mut s = env.settings();
    let flooding = add_tenant(&env, &mut s, "flood");
    s.retry.permanent_errcodes = vec![ERRCODE_NOT_FOUND];
    // Once held, the tenant stays held for the test's length.
    s.systemic.probe_min_delay = Duration::from_secs(120);
    s.systemic.probe_max_delay = Duration::from_secs(120);
    let worker = env.start_worker(s).await;

    // Every session of the flooding tenant is unknown to the API; its
    // events come first in both partitions.
    let bad: Vec<String> = sessions("permanent-x", 200);
    let fine = sessions("fine", 300);
    produce_events(&env, &flooding, &bad).await;
    produce_events(&env, &env.tenant, &fine).await;
    let keys = output_keys(&env, fine.len()).await;
    assert_eq!(keys, fine.iter().cloned().collect::<BTreeSet<_>>());
    let held = worker.stats.held_tenants();
    assert!(
        held.get(&flooding).is_some_and(|c| c.contains("dead")),
        "{held:?}"
    );
    assert!(!held.contains_key(&env.tenant));
    assert_never_systemic(&worker.stats);
    // The tenant was held once its dead letters passed the share of its
    // own last records: far fewer than its events.
    let dead = worker.stats.dead_lettered_total();
    assert!((1..=20).contains(&dead), "{dead} dead letters");
    worker.stop().await.unwrap();
}
