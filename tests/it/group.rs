//! The worker's life in a consumer group on Apache Kafka: scale-out and
//! scale-in under load, a rolling restart, partitions that come back after
//! being revoked while paused, calls under way when their partition moves,
//! a worker frozen past its session timeout,
//! the broker frozen past every session timeout, and input written
//! compressed and by transactional producers. Classic
//! (cooperative-sticky) and KIP-848 (`group.protocol=consumer`) groups both
//! where the protocol matters.

use std::time::Duration;

use crate::testkit;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use uincall_enricher::pipeline::admitted_limit;
use uincall_enricher::settings::Delivery;

use crate::helpers::*;

/// One test per consumer group protocol: classic (cooperative-sticky) and
/// KIP-848 (`consumer`).
macro_rules! per_protocol {
    ($scenario:ident: $classic:ident, $kip848:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $classic() {
            $scenario("classic").await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $kip848() {
            $scenario("consumer").await
        }
    };
}

/// The window of each replica in these tests.
const WINDOW: usize = 8;

fn sessions(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:06}")).collect()
}

/// The events of the CI run, or `GROUP_EVENTS` when larger.
fn events(ci: usize) -> usize {
    env_number("GROUP_EVENTS", ci).max(ci)
}

fn protocol_env(protocol: &str) -> Vec<(&'static str, &'static str)> {
    let protocol = match protocol {
        "classic" => "classic",
        _ => "consumer",
    };
    vec![
        ("UINCALL__KAFKA__GROUP_PROTOCOL", protocol),
        ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "8"),
    ]
}

/// Waits until the replicas' `/readyz` reports add up to `partitions`
/// assigned partitions with every replica in `busy` holding some (ready,
/// 200) and every other one holding none (503).
async fn until_assigned(replicas: &[&Replica], busy: usize, partitions: usize) {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let mut states = Vec::new();
        for r in replicas {
            states.push(r.readiness().await);
        }
        let total: usize = states.iter().map(|s| s.1).sum();
        let ready = states.iter().filter(|s| s.0 == 200 && s.1 > 0).count();
        let idle_unready = states.iter().all(|s| s.1 > 0 || s.0 == 503);
        if total == partitions && ready == busy && idle_unready {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "assignment never settled: {states:?} (want {partitions} over {busy} ready replicas)"
        );
    }
}

/// A group under load: 6 partitions, 3 000 events (or `GROUP_EVENTS`)
/// produced at 150/s in the background, the output and dead-letter topics
/// followed, replicas of the given protocol.
struct UnderLoad {
    env: TestEnv,
    all: Vec<String>,
    dir: tempfile::TempDir,
    follower: Follower,
    load: tokio::task::JoinHandle<()>,
    penv: Vec<(&'static str, &'static str)>,
}

impl UnderLoad {
    async fn start(name: &str, protocol: &str) -> UnderLoad {
        let env = TestEnv::new(&format!("{name}-{protocol}"), 6, Duration::from_millis(20)).await;
        UnderLoad::on(env, protocol, events(3000), 150)
    }

    /// Under load on `env`: `events` events at `rate` a second.
    fn on(env: TestEnv, protocol: &str, events: usize, rate: usize) -> UnderLoad {
        let all = sessions("call", events);
        let follower = env.follow();
        let load = env.spawn_load(all.clone(), rate);
        let mut dir = tempfile::tempdir().unwrap();
        // The replicas' logs outlive the test with `KEEP_LOGS` set.
        dir.disable_cleanup(std::env::var_os("KEEP_LOGS").is_some());
        UnderLoad {
            env,
            all,
            dir,
            follower,
            load,
            penv: protocol_env(protocol),
        }
    }

    fn replica(&self, name: &str) -> Replica {
        self.env.spawn_replica(name, self.dir.path(), &self.penv)
    }

    /// Waits until `more` sessions beyond those seen so far are out (or
    /// all of them).
    async fn progress(&self, more: usize) {
        let want = (self.follower.distinct() + more).min(self.all.len());
        self.follower.until_distinct(want).await;
    }

    /// The replicas started from now on commit their outputs with their
    /// input offsets in transactions (`kafka.delivery = "exactly_once"`).
    fn exactly_once(mut self) -> UnderLoad {
        self.penv.push(exactly_once());
        self
    }

    /// Waits for the whole load to be out, stops `replicas`, checks no lag
    /// and that, read with `read_committed` to the end, each session is
    /// out exactly once.
    async fn finish_exactly_once(self, replicas: Vec<Replica>, what: &str) {
        let all = self.all.clone();
        let (env, _) = self.drain(replicas).await;
        assert_each_once(&env, &all).await;
        println!("{what}: {} events, each exactly once", all.len());
    }

    /// Waits for the whole load to be out, stops `replicas`, checks no lag
    /// and that duplicates stay within `bound`; prints the figures.
    async fn finish(self, replicas: Vec<Replica>, bound: usize, what: &str) {
        let total = self.all.len();
        let (_, duplicates) = self.drain(replicas).await;
        println!("{what}: {total} events, 0 lost, {duplicates} duplicates (bound {bound})");
        assert!(duplicates <= bound, "{duplicates} duplicates > {bound}");
    }

    /// Waits for the whole load to be out (nothing lost), stops `replicas`
    /// and waits for no lag; returns the environment and the duplicates
    /// seen until every session was out.
    async fn drain(self, replicas: Vec<Replica>) -> (TestEnv, usize) {
        self.load.await.unwrap();
        let duplicates = self.follower.finish(&self.all).await;
        for r in replicas {
            r.stop().await;
        }
        self.env.until_no_lag().await;
        (self.env, duplicates)
    }
}

/// (a) One worker under load, scaled out to three and back to one: nothing
/// lost, duplicates within what was in flight, no lag at the end, and
/// `/readyz` tells who holds partitions at each step.
async fn scale_out_and_in(protocol: &str) {
    let group = UnderLoad::start("scale", protocol).await;
    let a = one_three_one(&group, false).await;
    // Four group changes; at most the admitted records of every replica
    // involved in each are re-delivered.
    let bound = 4 * 3 * admitted_limit(WINDOW);
    let what = format!("scale 1→3→1 ({protocol})");
    group.finish(vec![a], bound, &what).await;
}

per_protocol!(scale_out_and_in: scale_out_to_three_and_back_classic, scale_out_to_three_and_back_kip848);

/// Scales `group` from one replica to three while events flow and back to
/// one: the two leave by SIGTERM, or with `kill` the second by SIGKILL.
/// Returns the replica left, holding every partition.
async fn one_three_one(group: &UnderLoad, kill: bool) -> Replica {
    let a = group.replica("a");
    until_assigned(&[&a], 1, 6).await;
    group.progress(200).await;

    let b = group.replica("b");
    let c = group.replica("c");
    until_assigned(&[&a, &b, &c], 3, 6).await;
    group.progress(300).await;

    b.stop().await;
    match kill {
        true => c.signal("KILL"),
        false => c.stop().await,
    }
    until_assigned(&[&a], 1, 6).await;
    a
}

/// (a') The same with `kafka.delivery = "exactly_once"`, one of the two
/// replicas leaving by SIGKILL (a node lost) mid-transaction or not: each
/// session out exactly once, read with `read_committed`. At least once,
/// the killed replica's work since its last commit comes out twice.
async fn scale_out_and_in_exactly_once(protocol: &str) {
    let group = UnderLoad::start("scale-eos", protocol).await.exactly_once();
    let a = one_three_one(&group, true).await;
    let what = format!("scale 1→3→1 with transactions ({protocol})");
    group.finish_exactly_once(vec![a], &what).await;
}

per_protocol!(scale_out_and_in_exactly_once: scale_out_to_three_and_back_with_transactions_classic, scale_out_to_three_and_back_with_transactions_kip848);

/// (b) Three replicas under load, each SIGTERMed in turn and replaced, as a
/// rolling update does.
async fn rolling_restart(protocol: &str) {
    let group = UnderLoad::start("rolling", protocol).await;
    let mut replicas: Vec<Replica> = ["a", "b", "c"].map(|n| group.replica(n)).into();
    until_assigned(&replicas.iter().collect::<Vec<_>>(), 3, 6).await;
    for (i, name) in ["a2", "b2", "c2"].into_iter().enumerate() {
        group.progress(100).await;
        let old = std::mem::replace(&mut replicas[i], group.replica(name));
        old.stop().await;
        until_assigned(&replicas.iter().collect::<Vec<_>>(), 3, 6).await;
    }
    // Each restart is two group changes among three replicas.
    let bound = 3 * 2 * 3 * admitted_limit(WINDOW);
    let what = format!("rolling restart ({protocol})");
    group.finish(replicas, bound, &what).await;
}

per_protocol!(rolling_restart: rolling_restart_of_three_replicas_classic, rolling_restart_of_three_replicas_kip848);

/// Produces one event per session to each partition in turn.
async fn produce_round_robin(env: &TestEnv, sessions: &[String]) {
    let producer: FutureProducer = testkit::client_config(&env.bootstrap()).create().unwrap();
    for (i, s) in sessions.iter().enumerate() {
        let (key, value) = env.event(s);
        let rec = FutureRecord::<[u8], [u8]>::to(&env.input)
            .partition(i as i32 % env.partitions)
            .key(key.as_deref().unwrap())
            .payload(&value);
        producer
            .send(rec, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// (c) A worker pauses its partitions (here for an API outage, which keeps
/// them paused for as long as the test needs); some move to a second worker
/// and come back when it leaves, after the first worker resumed. New events
/// on every partition must then be enriched: a partition revoked while
/// paused must not come back paused (librdkafka keeps an application pause
/// on the partition across the revocation).
async fn revoke_while_paused(protocol: &str) {
    let env = TestEnv::new(&format!("paused-{protocol}"), 6, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let follower = env.follow();
    let penv = protocol_env(protocol);
    let a = env.spawn_replica("a", dir.path(), &penv);
    let first = sessions("first", 60);
    produce_round_robin(&env, &first).await;
    follower.until_distinct(first.len()).await;

    env.api.set_outage(true);
    let during = sessions("during", 30);
    produce_round_robin(&env, &during).await;
    let paused = "uincall_enricher_partitions_paused";
    let assigned = "uincall_enricher_partitions_assigned";
    wait_until_async("the first worker pauses its partitions", || async {
        a.metric(paused).await == Some(1.0)
    })
    .await;
    let b = env.spawn_replica("b", dir.path(), &penv);
    wait_until_async("the second worker takes half the partitions", || async {
        a.metric(assigned).await == Some(3.0) && b.metric(assigned).await == Some(3.0)
    })
    .await;
    env.api.set_outage(false);
    wait_until_async("the first worker resumes", || async {
        a.metric(paused).await == Some(0.0)
    })
    .await;
    follower.until_distinct(first.len() + during.len()).await;
    b.stop().await;
    until_assigned(&[&a], 1, 6).await;

    let fresh = sessions("call", 60);
    produce_round_robin(&env, &fresh).await;
    let all: Vec<String> = first.iter().chain(&during).chain(&fresh).cloned().collect();
    let duplicates = follower.finish(&all).await;
    a.stop().await;
    env.until_no_lag().await;
    println!("revoke while paused ({protocol}): 0 lost, {duplicates} duplicates");
}

per_protocol!(revoke_while_paused: partitions_revoked_while_paused_deliver_when_they_come_back_classic, partitions_revoked_while_paused_deliver_when_they_come_back_kip848);

/// (c') Calls under way when their partition moves: the API holds every
/// answer while a second worker joins and takes half the partitions (the
/// first waits `revoke_drain`, 1 s, then lets them go). When the answers
/// come, the first worker must write nothing for the partition it gave up:
/// each session is on the output topic once, enriched by its new owner.
/// Before, the old owner published them too (or dead-lettered one whose
/// last attempt it was, while the new owner enriched it).
async fn calls_under_way_at_a_revocation(protocol: &str) {
    let env = TestEnv::new(&format!("moved-{protocol}"), 2, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut penv = protocol_env(protocol);
    penv.push(("UINCALL__PIPELINE__REVOKE_DRAIN", "1s"));
    env.api.set_held(true);
    let a = env.spawn_replica("a", dir.path(), &penv);
    // As many as the window: every one of them is a call under way.
    let all = sessions("moved", WINDOW);
    produce_round_robin(&env, &all).await;
    wait_until_async("the first worker's calls are all under way", || async {
        env.api.total_calls() >= WINDOW as u64
    })
    .await;
    let b = env.spawn_replica("b", dir.path(), &penv);
    let assigned = "uincall_enricher_partitions_assigned";
    wait_until_async("the second worker takes a partition", || async {
        a.metric(assigned).await == Some(1.0) && b.metric(assigned).await == Some(1.0)
    })
    .await;
    env.api.set_held(false);
    let follower = env.follow();
    follower.until_distinct(all.len()).await;
    a.stop().await;
    b.stop().await;
    env.until_no_lag().await;
    let (_, written) = env.read_all(&env.output, all.len()).await;
    assert!(env.is_empty(&env.dlq));
    assert_eq!(
        written,
        all.len(),
        "records written after their partition moved ({protocol})"
    );
}

per_protocol!(calls_under_way_at_a_revocation: calls_under_way_when_a_partition_moves_write_nothing_classic, calls_under_way_when_a_partition_moves_write_nothing_kip848);

/// (d) A worker frozen (SIGSTOP) past its session timeout loses its
/// partitions to the other; when it thaws, its late completions must not
/// move any committed offset backwards.
async fn frozen_worker(protocol: &str) {
    frozen(protocol, false).await;
}

per_protocol!(frozen_worker: a_worker_frozen_past_its_session_commits_nothing_late_classic, a_worker_frozen_past_its_session_commits_nothing_late_kip848);

/// (d') The same with `kafka.delivery = "exactly_once"`: the thawed
/// worker's generation is stale, so its open transaction cannot commit the
/// offsets of partitions it lost and is aborted; none of its late outputs
/// becomes visible: read with `read_committed`, each session is out
/// exactly once.
async fn frozen_worker_exactly_once(protocol: &str) {
    frozen(protocol, true).await;
}

per_protocol!(frozen_worker_exactly_once: a_worker_frozen_past_its_session_is_fenced_classic, a_worker_frozen_past_its_session_is_fenced_kip848);

async fn frozen(protocol: &str, transactions: bool) {
    let name = format!(
        "frozen-{protocol}{}",
        if transactions { "-eos" } else { "" }
    );
    let env = TestEnv::new(&name, 6, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut all = sessions("call", 1500);
    // Slow records keep the frozen worker's window busy.
    all.extend(sessions("slow1000", 60));
    let follower = env.follow();
    let load = env.spawn_load(all.clone(), 200);
    let mut penv = protocol_env(protocol);
    if transactions {
        penv.push(exactly_once());
    }
    let a = env.spawn_replica("a", dir.path(), &penv);
    let b = env.spawn_replica("b", dir.path(), &penv);
    until_assigned(&[&a, &b], 2, 6).await;
    follower.until_distinct(300).await;

    a.signal("STOP");
    // The session times out (6 s classic, 10 s broker side for KIP-848).
    wait_until_async("the other worker takes every partition", || async {
        b.readiness().await == (200, 6)
    })
    .await;
    let floor = env.committed();
    a.signal("CONT");
    let mut highest = floor.clone();
    let check = |now: Vec<Option<i64>>, highest: &mut Vec<Option<i64>>| {
        for (p, (n, h)) in now.iter().zip(highest.iter_mut()).enumerate() {
            assert!(
                n >= h,
                "partition {p}: committed went back from {h:?} to {n:?}"
            );
            *h = *n;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while follower.distinct() < all.len() {
        tick.tick().await;
        check(env.committed(), &mut highest);
    }
    load.await.unwrap();
    let duplicates = follower.finish(&all).await;
    a.stop().await;
    b.stop().await;
    check(env.committed(), &mut highest);
    env.until_no_lag().await;
    if transactions {
        assert_each_once(&env, &all).await;
    }
    println!("frozen worker ({name}): 0 lost, {duplicates} duplicates, committed never went back");
}

/// Starts again each replica that stopped by itself (exit 1: it lost its
/// place in the group for `kafka.rejoin_timeout`), as Kubernetes restarts
/// a pod's container; notes when, from `since`.
fn restart_stopped(
    group: &UnderLoad,
    replicas: &mut [Replica],
    since: std::time::Instant,
    restarted: &mut Vec<Duration>,
) {
    for r in replicas.iter_mut() {
        if let Some(status) = r.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(1), "replica {} exited {status}", r.name);
            println!(
                "replica {} stopped by itself (exit 1); started again",
                r.name
            );
            *r = group.replica(&r.name);
            restarted.push(since.elapsed());
        }
    }
}

/// How long a freeze round may wait for the replicas: a replica that lost
/// its place stops after `rejoin_timeout` (30 s here) and a probe (10 s),
/// then starts and joins again.
const FREEZE_WAIT: Duration = Duration::from_secs(180);

/// Waits until the replicas hold the 6 partitions, each some, and then
/// until `more` events beyond those out now are out, restarting the
/// replicas that stop by themselves meanwhile. Returns when each of those
/// stopped, from `since`.
async fn until_assigned_and_out(
    group: &UnderLoad,
    replicas: &mut [Replica],
    since: std::time::Instant,
    more: usize,
) -> Vec<Duration> {
    let mut restarted = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut assigned = false;
    let want = (group.follower.distinct() + more).min(group.all.len());
    loop {
        tick.tick().await;
        restart_stopped(group, replicas, since, &mut restarted);
        let mut states = Vec::new();
        for r in replicas.iter() {
            states.push(r.readiness().await);
        }
        let total: usize = states.iter().map(|s| s.1).sum();
        assigned |= total == 6 && states.iter().all(|s| s.0 == 200 && s.1 > 0);
        if assigned && group.follower.distinct() >= want {
            return restarted;
        }
        assert!(
            since.elapsed() < FREEZE_WAIT,
            "after {FREEZE_WAIT:?} (assigned: {assigned}): {states:?}, {} of {want} out",
            group.follower.distinct()
        );
    }
}

/// A number from the environment variable `name`, else `default`.
fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Freezes the broker for [`FREEZE`], thaws it, and waits until every
/// replica is assigned again and 100 more events are out (see
/// [`until_assigned_and_out`]); returns when each replica that stopped by
/// itself did, from the thaw.
async fn freeze_and_thaw(
    cluster: &mut testkit::KafkaCluster,
    group: &UnderLoad,
    replicas: &mut [Replica],
    what: &str,
) -> Vec<Duration> {
    cluster.signal_node(0, "STOP").unwrap();
    tokio::time::sleep(FREEZE).await;
    cluster.signal_node(0, "CONT").unwrap();
    let thawed = std::time::Instant::now();
    let before = group.follower.distinct();
    let restarted = until_assigned_and_out(group, replicas, thawed, 100).await;
    println!(
        "{what}: assigned again and 100 more events out {:?} after the thaw ({before} out before, {} replicas restarted)",
        thawed.elapsed(),
        restarted.len()
    );
    restarted
}

/// How long each freeze of the broker lasts: past the session timeout of
/// both protocols (6 s on the worker for classic groups, 10 s on the
/// broker for KIP-848).
const FREEZE: Duration = Duration::from_secs(12);

/// (e) The broker's JVM frozen (SIGSTOP) for [`FREEZE`], three times under
/// load, as a long GC pause or a VM migration does: every member's session
/// expires and its assignment is lost. After each thaw every replica must
/// be assigned again by itself and enrich events; one replica for the
/// first freeze, two for the others (the one that lost its partitions
/// must not leave the other to carry everything).
async fn broker_frozen(protocol: &str) {
    let cluster = tokio::task::spawn_blocking(|| testkit::KafkaCluster::start(1))
        .await
        .unwrap()
        .expect("a broker starts");
    let name = format!("freeze-{protocol}");
    let mut env = TestEnv::on_cluster(&name, 6, Duration::from_millis(20), cluster).await;
    let mut cluster = env.cluster.take().unwrap();
    // A faster load and a bigger window than the other group tests' by
    // `FREEZE_RATE` and `FREEZE_WINDOW` (scripts/faults.sh): more in
    // flight when the broker stops.
    let rate = env_number("FREEZE_RATE", 150);
    // A minute of load at least, and the freezes stall it.
    let mut group = UnderLoad::on(env, protocol, events(6000).max(60 * rate), rate);
    let window = std::env::var("FREEZE_WINDOW").unwrap_or_else(|_| WINDOW.to_string());
    let window: &'static str = window.leak();
    group
        .penv
        .push(("UINCALL__PIPELINE__MAX_IN_FLIGHT", window));
    // Five classic session timeouts, three KIP-848 ones.
    group.penv.push(("UINCALL__KAFKA__REJOIN_TIMEOUT", "30s"));
    let mut replicas = vec![group.replica("a")];
    // When each replica that stopped by itself did, from its thaw.
    let mut stuck = Vec::new();
    until_assigned(&replicas.iter().collect::<Vec<_>>(), 1, 6).await;
    group.progress(200).await;
    // More rounds with `FREEZE_ROUNDS` (scripts/faults.sh).
    let rounds = env_number("FREEZE_ROUNDS", 3).max(3);
    for round in 1..=rounds {
        if round == 2 {
            replicas.push(group.replica("b"));
            until_assigned(&replicas.iter().collect::<Vec<_>>(), 2, 6).await;
        }
        let what = format!("freeze {round} ({protocol}, {} replicas)", replicas.len());
        stuck.extend(freeze_and_thaw(&mut cluster, &group, &mut replicas, &what).await);
    }
    // Each freeze loses every replica's whole assignment (one replica for
    // the first freeze, two after), re-delivering what it had admitted; a
    // producer replaced after a freeze sends again what it held, at most
    // as many. After a thaw, records go on flowing for a few seconds while
    // the coordinator refuses commits (unknown member), until the loss is
    // noticed: at most the load's rate for 10 s a freeze. A replica that
    // stopped by itself may have gone on fetching without a coordinator
    // from the thaw until it stopped, committing nothing: the load's rate
    // for that long (and 10 s more).
    let replica_freezes = 2 * rounds - 1;
    let uncommitted: f64 =
        (stuck.iter().map(|d| d.as_secs_f64() + 10.0).sum::<f64>()) + 10.0 * rounds as f64;
    let bound = replica_freezes * 2 * admitted_limit(window.parse().unwrap())
        + (uncommitted * rate as f64) as usize;
    let what = format!("broker frozen {rounds} times ({protocol})");
    group.finish(replicas, bound, &what).await;
    drop(cluster);
}

per_protocol!(broker_frozen: a_broker_frozen_past_the_session_timeout_leaves_no_replica_idle_classic, a_broker_frozen_past_the_session_timeout_leaves_no_replica_idle_kip848);

/// Sends `sessions` with a producer configured by `config`, in one
/// transaction when it has a `transactional.id` (committed or aborted).
async fn produce_with(env: &TestEnv, sessions: &[String], config: &[(&str, &str)], commit: bool) {
    let mut c: ClientConfig = testkit::client_config(&env.bootstrap());
    for (k, v) in config {
        c.set(*k, *v);
    }
    let transactional = config.iter().any(|(k, _)| *k == "transactional.id");
    let producer: FutureProducer = c.create().unwrap();
    let t = Timeout::After(Duration::from_secs(30));
    if transactional {
        producer.init_transactions(t).unwrap();
        producer.begin_transaction().unwrap();
    }
    for s in sessions {
        let (key, value) = env.event(s);
        let rec = FutureRecord::<[u8], [u8]>::to(&env.input)
            .key(key.as_deref().unwrap())
            .payload(&value);
        producer.send(rec, t).await.map_err(|(e, _)| e).unwrap();
    }
    if transactional {
        if commit {
            producer.commit_transaction(t).unwrap();
        } else {
            producer.abort_transaction(t).unwrap();
        }
    }
}

/// (g) Input written with every compression codec and by transactional
/// producers: every committed event is enriched, no aborted one is, and
/// the committed offsets reach the end of each partition (past the commit
/// markers, which deliver no record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_transactional_input_is_enriched_and_leaves_no_lag() {
    let env = TestEnv::new("codecs", 3, Duration::ZERO).await;
    let aborted = sessions("aborted", 30);
    produce_with(
        &env,
        &aborted,
        &[("transactional.id", "codecs-aborted")],
        false,
    )
    .await;
    let mut all = Vec::new();
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let batch = sessions(codec, 100);
        produce_with(
            &env,
            &batch,
            &[("compression.type", codec), ("linger.ms", "20")],
            true,
        )
        .await;
        all.extend(batch);
    }
    // Last: a committed transaction, so each partition ends on a marker.
    let txn = sessions("txn", 90);
    produce_with(
        &env,
        &txn,
        &[("transactional.id", "codecs-committed")],
        true,
    )
    .await;
    all.extend(txn);

    let worker = env.start_worker(env.settings()).await;
    let out = env.read_output(all.len()).await;
    env.until_no_lag().await;
    worker.stop().await.unwrap();
    let keys: std::collections::BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(keys.len(), all.len());
    assert!(
        aborted.iter().all(|s| !keys.contains(s)),
        "an aborted event was enriched"
    );
    assert!(env.is_empty(&env.dlq));
    for m in &out {
        enriched_json(m);
    }
}

/// Output and dead-letter topics that take at most 16 KiB per batch: valid
/// records batched together are not refused for their neighbour, a record
/// too large is dead-lettered alone, and a dead letter too large for its
/// topic is written truncated instead of stopping the worker: its value, and
/// when the key or the `dlq.*` texts alone are too large, those too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_for_their_topic_never_stop_the_worker_or_take_neighbours_along() {
    too_large("toolarge", Delivery::AtLeastOnce).await;
}

/// The same with `kafka.delivery = "exactly_once"`: the transaction that
/// carried the record too large is aborted, the record is dead-lettered,
/// its neighbours are written in the next transaction, and none is
/// aborted for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_for_their_topic_with_transactions_are_dead_lettered_alone() {
    too_large("toolarge-eos", Delivery::ExactlyOnce).await;
}

/// 400 valid events, an enriched record, a dead letter, and a key too
/// large for the output and dead-letter topics, with `delivery`.
async fn too_large(name: &str, delivery: Delivery) {
    use uincall_enricher::dead_letter::header as dlq;
    let env =
        TestEnv::with_output_config(name, 2, Duration::ZERO, &[("max.message.bytes", "16384")])
            .await;
    let mut events: Vec<(Option<Vec<u8>>, Vec<u8>)> =
        sessions("call", 400).iter().map(|s| env.event(s)).collect();
    // An enriched record of over 64 KiB.
    events.push(env.event("bulky64-000001"));
    // An event of 40 KiB for an unknown tenant: its dead letter is too large.
    let big = serde_json::json!({
        "session_id": "big-000001",
        "tenant_id": "nobody",
        "padding": "y".repeat(40 * 1024),
    })
    .to_string()
    .into_bytes();
    events.push((Some(b"big-000001".to_vec()), big.clone()));
    // A 20 000-byte key and session id: no value cut alone makes it fit.
    let long_id = "k".repeat(20_000);
    let long = serde_json::json!({"session_id": long_id, "tenant_id": "nobody"});
    events.push((
        Some(long_id.clone().into_bytes()),
        long.to_string().into_bytes(),
    ));
    testkit::produce(&env.bootstrap(), &env.input, events)
        .await
        .unwrap();

    let mut settings = env.settings();
    settings.kafka.delivery = delivery;
    let worker = env.start_worker(settings).await;
    let out = env.read_output(400).await;
    let dead = env.read_dlq(3).await;
    env.until_no_lag().await;
    worker
        .stop()
        .await
        .expect("the worker did not stop on its own");
    assert_eq!(out.len(), 400, "valid records refused with a neighbour");
    let by_key = |k: &str| dead.iter().find(|m| key(m) == k).unwrap();
    let bulky = by_key("bulky64-000001");
    assert_eq!(
        header(bulky, dlq::ERROR_CLASS).as_deref(),
        Some("publish_failed")
    );
    assert_eq!(header(bulky, dlq::TRUNCATED_TO), None);
    assert_value_cut(by_key("big-000001"), &big);
    assert_key_cut(&dead, &long_id);
}

/// `truncated` is the dead letter of `original` (an invalid event), its
/// value cut to fit the topic and saying so.
fn assert_value_cut(truncated: &rdkafka::message::OwnedMessage, original: &[u8]) {
    use rdkafka::Message;
    use uincall_enricher::dead_letter::header as dlq;
    assert_eq!(
        header(truncated, dlq::ERROR_CLASS).as_deref(),
        Some("invalid_event")
    );
    let kept: usize = header(truncated, dlq::TRUNCATED_TO)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        header(truncated, dlq::ORIGINAL_SIZE),
        Some(original.len().to_string())
    );
    assert_eq!(truncated.payload().unwrap(), &original[..kept]);
    assert!(kept > 0 && kept < 16384);
}

/// Among `dead`, the dead letter of the event keyed `long_id` (too long for
/// the topic alone) is there with its key cut and saying so.
fn assert_key_cut(dead: &[rdkafka::message::OwnedMessage], long_id: &str) {
    use rdkafka::Message;
    use uincall_enricher::dead_letter::header as dlq;
    let cut_key = (dead.iter())
        .find(|m| header(m, dlq::ORIGINAL_KEY_SIZE).is_some())
        .expect("the dead letter of the long key");
    assert_eq!(
        header(cut_key, dlq::ORIGINAL_KEY_SIZE),
        Some(long_id.len().to_string())
    );
    let key_kept = cut_key.key().unwrap();
    assert!(key_kept.len() < 16384 && long_id.as_bytes().starts_with(key_kept));
    let reason = header(cut_key, dlq::REASON);
    let says = format!("{} bytes long", long_id.len());
    assert!(
        reason.as_ref().is_some_and(|r| r.contains(&says)),
        "{reason:?}"
    );
}

/// A dead-letter topic that refuses even a bare dead letter (no value, cut
/// key and texts): each record is passed over, logged with its place and
/// counted, the offsets move on and the worker keeps running, where it used
/// to stop at the first such record and meet it again at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_at_every_size_is_passed_over_not_fatal() {
    let env = TestEnv::with_output_config(
        "unwritable",
        2,
        Duration::ZERO,
        &[("max.message.bytes", "200")],
    )
    .await;
    // Unknown tenants: straight to the dead-letter topic, which refuses.
    let events = (0..20).map(|n| {
        let session = format!("nobody-{n:06}");
        let value = serde_json::json!({"session_id": session, "tenant_id": "nobody"});
        (Some(session.into_bytes()), value.to_string().into_bytes())
    });
    testkit::produce(&env.bootstrap(), &env.input, events)
        .await
        .unwrap();
    let worker = env.start_worker(env.settings()).await;
    env.until_no_lag().await;
    assert_eq!(worker.stats.unwritable(), 20);
    assert_eq!(worker.stats.dead_lettered_total(), 0);
    assert!(!worker.handle.is_finished(), "the worker stopped by itself");
    worker.stop().await.expect("the worker stops cleanly");
    assert!(env.is_empty(&env.dlq));
}
