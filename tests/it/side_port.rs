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
