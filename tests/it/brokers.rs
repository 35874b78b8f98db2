//! Broker faults: on a three-node Apache Kafka cluster (replication 3,
//! `min.insync.replicas` 2) each broker restarted in turn under load, as
//! broker maintenance does, then one killed outright; with transactions,
//! a lone broker frozen past the produce timeout.

use std::time::Duration;

use crate::testkit::KafkaCluster;
use uincall_enricher::pipeline::admitted_limit;

use crate::helpers::*;

/// (e) Two workers enrich while each of the three brokers is stopped
/// (SIGTERM, a controlled shutdown) and started again, waiting for every
/// replica to be back in sync before the next, then one broker is SIGKILLed
/// and restarted: every event enriched, no lag at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_brokers_and_a_crash_lose_nothing() {
    let (env, all, duplicates) = broker_maintenance("brokers", &[]).await;
    let bound = 4 * 2 * admitted_limit(8);
    println!(
        "broker maintenance: {} events, 3 brokers restarted in turn and one killed, 0 lost, {duplicates} duplicates (bound {bound})",
        all.len()
    );
    assert!(duplicates <= bound, "{duplicates} duplicates > {bound}");
    drop(env);
}

/// (e') The same with `kafka.delivery = "exactly_once"`: transactions go on
/// across the restarts (aborted and sent again when a broker goes), and
/// read with `read_committed` each session is out exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_brokers_with_transactions_writes_each_session_once() {
    let eos = [exactly_once()];
    let (env, all, _) = broker_maintenance("brokers-eos", &eos).await;
    assert_each_once(&env, &all).await;
    println!(
        "broker maintenance with transactions: {} events, each exactly once",
        all.len()
    );
}

/// How long each freeze of the broker lasts in
/// [`a_broker_frozen_past_the_produce_timeout_stops_no_worker_with_transactions`]:
/// past `kafka.produce_timeout` (1 s there), within the session timeout.
const FREEZE: Duration = Duration::from_secs(4);

/// (f) With transactions, the only broker frozen (SIGSTOP) three times
/// under load for longer than `kafka.produce_timeout`, as a long GC pause
/// does: the transactional calls under way time out. A commit that timed
/// out is made again until it ends (librdkafka refuses an abort meanwhile
/// as conflicting), an abort likewise. The worker never stops by itself,
/// and read with `read_committed` each session is out exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_past_the_produce_timeout_stops_no_worker_with_transactions() {
    let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(1))
        .await
        .unwrap()
        .expect("a broker starts");
    let mut env = TestEnv::on_cluster("frozen-eos", 6, Duration::from_millis(20), cluster).await;
    let all: Vec<String> = (0..1500).map(|i| format!("call-{i:06}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let follower = env.follow();
    let load = env.spawn_load(all.clone(), 100);
    let settings = [
        ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "8"),
        ("UINCALL__KAFKA__PRODUCE_TIMEOUT", "1s"),
        exactly_once(),
    ];
    let mut a = env.spawn_replica("a", dir.path(), &settings);
    follower.until_distinct(200).await;
    let mut cluster = env.cluster.take().unwrap();
    for round in 1..=3 {
        let before = follower.distinct();
        cluster.signal_node(0, "STOP").unwrap();
        tokio::time::sleep(FREEZE).await;
        cluster.signal_node(0, "CONT").unwrap();
        follower.until_distinct((before + 50).min(all.len())).await;
        let exited = a.child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "freeze {round}: the worker stopped by itself ({exited:?})"
        );
    }
    env.cluster = Some(cluster);
    load.await.unwrap();
    follower.finish(&all).await;
    a.stop().await;
    env.until_no_lag().await;
    assert_each_once(&env, &all).await;
}

/// Two workers (with `extra` settings) under load while each broker is
/// restarted in turn and one killed; returns the environment, the sessions
/// and the duplicates seen until all were out.
async fn broker_maintenance(name: &str, extra: &[(&str, &str)]) -> (TestEnv, Vec<String>, usize) {
    let cluster = tokio::task::spawn_blocking(|| KafkaCluster::start(3))
        .await
        .unwrap()
        .expect("a three-node cluster starts");
    let mut env = TestEnv::on_cluster(name, 6, Duration::from_millis(20), cluster).await;
    let total = std::env::var("BROKER_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500usize);
    let all: Vec<String> = (0..total).map(|i| format!("call-{i:06}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let follower = env.follow();
    // Load for the whole maintenance: ~100 events a second.
    let load = env.spawn_load(all.clone(), 100);
    let mut window = vec![("UINCALL__PIPELINE__MAX_IN_FLIGHT", "8")];
    window.extend_from_slice(extra);
    let a = env.spawn_replica("a", dir.path(), &window);
    let b = env.spawn_replica("b", dir.path(), &window);
    follower.until_distinct(200).await;

    let mut cluster = env.cluster.take().unwrap();
    for (i, signal) in [(0, "TERM"), (1, "TERM"), (2, "TERM"), (1, "KILL")] {
        let before = follower.distinct();
        cluster = tokio::task::spawn_blocking(move || {
            cluster.stop_node(i, signal)?;
            cluster.start_node(i)?;
            anyhow::Ok(cluster)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("broker {i} after SIG{signal}: {e:#}"));
        // The workers go on after each restart.
        follower.until_distinct((before + 50).min(all.len())).await;
    }
    env.cluster = Some(cluster);
    load.await.unwrap();
    let duplicates = follower.finish(&all).await;
    a.stop().await;
    b.stop().await;
    env.until_no_lag().await;
    (env, all, duplicates)
}
