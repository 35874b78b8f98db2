use std::time::{Duration, Instant};

use crate::testkit;

use crate::helpers::*;

#[tokio::test]
async fn side_port_serves_health_readiness_and_metrics_of_the_real_binary() {
    let env = TestEnv::new("sideport", 2, Duration::ZERO).await;
    env.seed(&[
        "call-1".to_string(),
        "call-2".to_string(),
        "permanent-3".to_string(),
    ])
    .await;
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mut child = env.spawn_binary(
        &dir.path().join("worker.log"),
        &[("UINCALL__HTTP__LISTEN", &listen)],
    );
    let base = format!("http://{listen}");

    let ready = until_status(&format!("{base}/readyz"), 200).await;
    assert_eq!(ready, "ready: 2 partitions assigned\n");
    assert_eq!(until_status(&format!("{base}/healthz"), 200).await, "ok\n");
    env.read_output(2).await;
    env.read_dlq(1).await;
    // The counters follow the broker's acknowledgements.
    let started = Instant::now();
    let metrics = loop {
        let text = until_status(&format!("{base}/metrics"), 200).await;
        // The lag comes with the consumer's statistics, a little later.
        if text.contains("uincall_enricher_records_enriched_total 2\n")
            && text.contains("uincall_enricher_consumer_lag{")
        {
            break text;
        }
        assert!(
            started.elapsed() < WAIT,
            "metrics never showed 2 enriched records:\n{text}"
        );
    };
    assert!(
        metrics.contains("uincall_enricher_records_consumed_total 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "uincall_enricher_records_dead_lettered_total{error_class=\"permanent_error\"} 1\n"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("uincall_enricher_partitions_assigned 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE uincall_enricher_api_calls counter"),
        "{metrics}"
    );
    // Build, and each output's time from the input record's timestamp.
    for line in [
        concat!(
            "uincall_enricher_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"} 1\n"
        ),
        "uincall_enricher_record_end_to_end_duration_seconds_count{outcome=\"enriched\"} 2\n",
        "uincall_enricher_record_end_to_end_duration_seconds_count{outcome=\"dead_lettered\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    assert!(!metrics.contains(&env.token));
    only_served_metrics_are_monitored(&metrics, Process::Worker);

    sigterm(&child);
    assert!(wait_exit(&mut child, WAIT).await.success());
}

/// With `kafka.delivery = "exactly_once"` a partition's position moves as
/// the transactions carrying its records commit (the consumer commits
/// nothing itself, so its own statistics keep the offset it found): a
/// worker that works through a backlog for several times
/// `pipeline.stall_timeout` (3 s here) in a group with a committed offset
/// is live all along, `/healthz` 200 at every look, and its
/// `consumer_lag` ends at 0. Fails when the committed transactions do not
/// reach the stall check and the lag (the partition then looks stalled
/// after 3 s with a growing lag, and Kubernetes would restart a busy
/// worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transactions_a_long_backlog_is_progress_not_a_stall() {
    let env = TestEnv::new("stall-eos", 1, Duration::from_millis(5)).await;
    let first: Vec<String> = (0..20).map(|i| format!("first-{i:02}")).collect();
    env.seed(&first).await;
    let dir = tempfile::tempdir().unwrap();
    let short = [
        exactly_once(),
        ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "4"),
        ("UINCALL__PIPELINE__STALL_TIMEOUT", "3s"),
        ("UINCALL__PIPELINE__MAX_HOLD", "1s"),
        ("UINCALL__RETRY__MAX_ELAPSED", "1s"),
        ("UINCALL__API__REQUEST_TIMEOUT", "1s"),
        ("UINCALL__API__CONNECT_TIMEOUT", "500ms"),
        // The lag the stall check needs, known every half second.
        ("UINCALL__KAFKA__PROPERTIES__STATISTICS_INTERVAL_MS", "500"),
    ];
    let worker = env.spawn_replica("w", dir.path(), &short);
    // The group's coordinator may not answer at once: asked again.
    let (bootstrap, group, input) = (env.bootstrap(), env.group.clone(), env.input.clone());
    wait_until("the first events committed", || {
        let committed = testkit::committed_offsets(&bootstrap, &group, &input).ok();
        committed == Some(vec![Some(first.len() as i64)])
    })
    .await;
    worker.stop().await;
    let mut sessions: Vec<String> = (0..2000).map(|i| format!("call-{i:05}")).collect();
    env.seed(&sessions).await;
    sessions.extend(first);
    let worker = env.spawn_replica("w", dir.path(), &short);
    let follower = env.follow();
    let started = Instant::now();
    let looks = live_until_out(&worker, &follower, sessions.len(), started).await;
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(6),
        "the backlog took {took:?}, not enough to show a stall"
    );
    let lag = format!(
        "uincall_enricher_consumer_lag{{topic=\"{}\",partition=\"0\"}}",
        env.input
    );
    wait_until_async("the worker's lag at 0", || async {
        worker.metric(&lag).await == Some(0.0)
    })
    .await;
    worker.stop().await;
    println!(
        "{} events in {took:?}, /healthz 200 at {looks} looks",
        sessions.len()
    );
}

/// Asks `worker`'s `/healthz` every 100 ms until `n` sessions are out,
/// asserting 200 at every answer; returns how many answers came.
async fn live_until_out(
    worker: &Replica,
    follower: &Follower,
    n: usize,
    started: Instant,
) -> usize {
    let mut looks = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while follower.distinct() < n {
        tick.tick().await;
        // Not answering yet at start.
        let Ok(resp) = reqwest::get(format!("{}/healthz", worker.side)).await else {
            continue;
        };
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "after {:?}: {body}", started.elapsed());
        looks += 1;
    }
    looks
}
