//! The push receiver (`uincall-enricher ingest`) in its own process against
//! the broker, pushed to over real HTTP: the call-ended pushes of each kind
//! reach the input topic, each once, and the worker enriches them; other
//! pushes are answered and counted, not forwarded; wrong secrets, bodies
//! that are not events and bodies over the limit are refused with their
//! status, and no secret reaches a log line.

use std::collections::BTreeSet;
use std::process::Child;
use std::time::Duration;

use rdkafka::Message;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::testkit;

/// A running receiver: its push base URL and side port.
pub struct Receiver {
    pub child: Child,
    pub push: String,
    pub side: String,
    log: std::path::PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what the receiver said last.
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("last lines of the receiver's log:\n{}", tail.join("\n"));
        }
    }
}

fn spawn_receiver(env: &TestEnv, log: &std::path::Path, secret: &str) -> Receiver {
    spawn_receiver_with(env, log, secret, &[])
}

pub fn spawn_receiver_with(
    env: &TestEnv,
    log: &std::path::Path,
    secret: &str,
    extra: &[(&str, &str)],
) -> Receiver {
    let listen = format!("127.0.0.1:{}", testkit::free_port());
    let side = format!("127.0.0.1:{}", testkit::free_port());
    let secret_var = format!("UINCALL__INGEST__SECRETS__{}", env.tenant);
    let mut vars = vec![
        ("UINCALL__INGEST__LISTEN", listen.as_str()),
        ("UINCALL__HTTP__LISTEN", side.as_str()),
        ("UINCALL__INGEST__MAX_BODY_BYTES", "4096"),
        // Every push a test expects answered 200 is acknowledged within
        // this on a loaded machine (`extra` may set less).
        ("UINCALL__INGEST__FORWARD_TIMEOUT", "30s"),
        (secret_var.as_str(), secret),
    ];
    vars.extend_from_slice(extra);
    let child = env.spawn_command(
        &["ingest"],
        &log.to_path_buf(),
        &vars,
        std::process::Stdio::null(),
    );
    Receiver {
        child,
        push: format!("http://{listen}/push"),
        side: format!("http://{side}"),
        log: log.to_path_buf(),
    }
}

/// Posts `body` to `url` (optionally with basic auth); the status and the
/// answer's JSON (`Null` when it is not JSON).
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    basic: Option<(&str, &str)>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = client.post(url).body(body);
    if let Some((user, password)) = basic {
        req = req.basic_auth(user, Some(password));
    }
    let resp = req.send().await.expect("the receiver answers");
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(Value::Null);
    (status, json)
}

pub fn event(env: &TestEnv, session: &str, command: &str) -> Vec<u8> {
    json!({
        "session_id": session,
        "tenant_id": env.tenant,
        "command": command,
        "call_id": format!("c-{session}"),
        "dir": "UP",
        "agent_num": "8001",
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn pushes_of_each_kind_reach_the_input_topic_once_and_are_enriched() {
    let env = TestEnv::new("ingest", 2, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "push-secret-0123456789";
    let log = dir.path().join("ingest.log");
    // A second tenant the worker has no access token for, and refused
    // bodies kept on the dead-letter topic.
    let (no_token, no_token_secret) = ("tenant-without-token", "another-secret-0123456789");
    let no_token_var = format!("UINCALL__INGEST__SECRETS__{no_token}");
    let mut receiver = spawn_receiver_with(
        &env,
        &log,
        secret,
        &[
            (no_token_var.as_str(), no_token_secret),
            ("UINCALL__INGEST__TOKEN_TENANTS", env.tenant.as_str()),
            ("UINCALL__INGEST__DEAD_LETTER_REFUSED", "true"),
            ("UINCALL__HEADERS__KAFKA_CONNECT", "true"),
        ],
    );
    until_status(&format!("{}/readyz", receiver.side), 200).await;
    let pushing = Pushing {
        client: reqwest::Client::new(),
        path: format!("{}/{}/{secret}", receiver.push, env.tenant),
        push: receiver.push.clone(),
        secret,
    };
    let forwarded = push_every_kind(&env, &pushing, (no_token, no_token_secret)).await;
    push_ignored(&env, &pushing).await;
    push_refused(&env, &pushing).await;
    assert_input_topic(&env, &forwarded, no_token).await;
    assert_receiver_counts(&receiver).await;

    // The worker enriches what the receiver wrote, and dead-letters the
    // flagged push beside the two bodies the receiver refused.
    let worker = env.spawn_replica("worker", dir.path(), &[]);
    let out = env.read_output(forwarded.len()).await;
    let enriched: BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(enriched, forwarded);
    let dead = env.read_dlq(3).await;
    worker.stop().await;
    assert_dead_letters(&env, &dead);

    sigterm(&receiver.child);
    assert!(wait_exit(&mut receiver.child, WAIT).await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains("not-the-secret"), "{text}");
    assert!(!text.contains(no_token_secret), "{text}");
}

/// Where and how the first test pushes.
struct Pushing {
    client: reqwest::Client,
    /// The push URL with the tenant and its secret in the path.
    path: String,
    /// The receiver's push address.
    push: String,
    secret: &'static str,
}

/// Pushes that are forwarded (20 hang-ups with the secret in the path, 10
/// whole-session records with basic auth, one for a tenant without a
/// token); the forwarded sessions of the test's tenant.
async fn push_every_kind(
    env: &TestEnv,
    p: &Pushing,
    (no_token, no_token_secret): (&str, &str),
) -> BTreeSet<String> {
    let (client, path, secret) = (&p.client, &p.path, p.secret);
    let success = json!({"code": 200, "data": null, "msg": "success"});
    let mut forwarded = BTreeSet::new();
    for i in 0..20 {
        let s = format!("push-event-{i}");
        let answer = post(
            client,
            &format!("{path}/call-event"),
            None,
            event(env, &s, "call_hangup"),
        )
        .await;
        assert_eq!(answer, (200, success.clone()));
        forwarded.insert(s);
    }
    for i in 0..10 {
        let s = format!("push-record-{i}");
        let url = format!("{}/call-record?type=1", p.push);
        // Half without a tenant field: the worker takes the push URL's.
        let body = match i % 2 {
            0 => json!({"session_id": s, "tenant_id": env.tenant}),
            _ => json!({"session_id": s, "call_type": 1}),
        };
        let body = body.to_string().into_bytes();
        let answer = post(client, &url, Some((&env.tenant, secret)), body).await;
        assert_eq!(answer, (200, success.clone()));
        forwarded.insert(s);
    }
    // Forwarded and flagged: the worker has no token for this tenant.
    let flagged =
        json!({"session_id": "push-flagged", "tenant_id": no_token, "command": "call_hangup"});
    let answer = post(
        client,
        &format!("{}/{no_token}/{no_token_secret}/call-event", p.push),
        None,
        flagged.to_string().into_bytes(),
    )
    .await;
    assert_eq!(answer, (200, success));
    forwarded
}

/// Pushes answered 200 and not forwarded: other commands, a leg's record.
async fn push_ignored(env: &TestEnv, p: &Pushing) {
    let (client, path) = (&p.client, &p.path);
    let success = json!({"code": 200, "data": null, "msg": "success"});
    for command in ["call_process", "call_talking", "callout_process"] {
        let answer = post(
            client,
            &format!("{path}/call-event"),
            None,
            event(env, "push-talking", command),
        )
        .await;
        assert_eq!(answer, (200, success.clone()));
    }
    let leg = json!({"session_id": "push-leg", "tenant_id": env.tenant})
        .to_string()
        .into_bytes();
    assert_eq!(
        post(client, &format!("{path}/call-record?type=0"), None, leg).await,
        (200, success)
    );
}

/// Pushes refused: wrong secrets, no credentials, not JSON, another
/// tenant, too large.
async fn push_refused(env: &TestEnv, p: &Pushing) {
    let (client, path) = (&p.client, &p.path);
    let wrong = format!(
        "{}/{}/not-the-secret-0000000/call-event",
        p.push, env.tenant
    );
    assert_eq!(
        post(client, &wrong, None, event(env, "x", "call_hangup"))
            .await
            .0,
        404
    );
    let url = format!("{}/call-event", p.push);
    let basic_wrong = post(
        client,
        &url,
        Some((&env.tenant, "not-the-secret-0000000")),
        event(env, "x", "call_hangup"),
    )
    .await;
    assert_eq!(basic_wrong.0, 401);
    assert_eq!(
        post(client, &url, None, event(env, "x", "call_hangup"))
            .await
            .0,
        401
    );
    let (status, answer) = post(
        client,
        &format!("{path}/call-event"),
        None,
        b"not json".to_vec(),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_u64()),
        (400, Some(400)),
        "{answer}"
    );
    let other = json!({"session_id": "x", "tenant_id": "someone-else", "command": "call_hangup"});
    assert_eq!(
        post(
            client,
            &format!("{path}/call-event"),
            None,
            other.to_string().into_bytes()
        )
        .await
        .0,
        400
    );
    let mut big = event(env, "big", "call_hangup");
    big.extend(std::iter::repeat_n(b' ', 8192));
    assert_eq!(
        post(client, &format!("{path}/call-event"), None, big)
            .await
            .0,
        413
    );
}

/// Exactly the forwarded pushes are on the input topic, each once, with the
/// body as sent and the source headers.
async fn assert_input_topic(env: &TestEnv, forwarded: &BTreeSet<String>, no_token: &str) {
    let (input, total) = env.read_all(&env.input, forwarded.len() + 1).await;
    assert_eq!(total, forwarded.len() + 1);
    let (flagged, input): (Vec<_>, Vec<_>) =
        input.into_iter().partition(|m| key(m) == "push-flagged");
    assert_eq!(flagged.len(), 1);
    assert_eq!(
        header(&flagged[0], "uincall.tenant").as_deref(),
        Some(no_token)
    );
    assert_eq!(
        header(&flagged[0], "uincall.flag").as_deref(),
        Some("no_access_token")
    );
    let keys: BTreeSet<String> = input.iter().map(key).collect();
    assert_eq!(&keys, forwarded);
    for m in &input {
        assert_eq!(header(m, "uincall.flag"), None);
        let source = header(m, "uincall.source").unwrap();
        let k = key(m);
        let want = if k.starts_with("push-event") {
            "uincall.push.call-event"
        } else {
            "uincall.push.call-record"
        };
        assert_eq!(source, want);
        assert_eq!(
            header(m, "uincall.tenant").as_deref(),
            Some(env.tenant.as_str())
        );
        assert!(header(m, "uincall.received_at").is_some());
        let body: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(body["session_id"], k.as_str());
    }
}

/// The receiver's counts on `/metrics`.
async fn assert_receiver_counts(receiver: &Receiver) {
    let metrics = reqwest::get(format!("{}/metrics", receiver.side))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (line, want) in [
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-event\",result=\"forwarded\"}",
            20,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-record\",result=\"forwarded\"}",
            10,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-event\",result=\"ignored\"}",
            3,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-record\",result=\"ignored\"}",
            1,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-event\",result=\"unauthorized\"}",
            3,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-event\",result=\"invalid\"}",
            2,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-event\",result=\"too_large\"}",
            1,
        ),
        (
            "uincall_enricher_ingest_requests_total{kind=\"call-event\",result=\"flagged\"}",
            1,
        ),
        ("uincall_enricher_ingest_dead_letters_total", 2),
        ("uincall_enricher_ingest_forward_seconds_count", 31),
    ] {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse::<f64>().ok());
        assert_eq!(value, Some(want as f64), "{line}:\n{metrics}");
    }
    only_served_metrics_are_monitored(&metrics, Process::Receiver);
}

/// The two bodies the receiver refused, dead-lettered by it with the
/// worker's reasons, and the flagged push, dead-lettered by the worker.
fn assert_dead_letters(env: &TestEnv, dead: &[rdkafka::message::OwnedMessage]) {
    let (raw, worker_dead): (Vec<_>, Vec<_>) = (dead.iter())
        .partition(|m| header(m, "dlq.reason").is_some_and(|r| r.starts_with("push refused")));
    let mut reasons: Vec<String> = (raw.iter())
        .map(|m| header(m, "dlq.reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    // The worker's own reasons (`event is not JSON: ` and serde's words).
    assert!(
        reasons[0].starts_with("push refused by the receiver: event is not JSON: "),
        "{reasons:?}"
    );
    assert_eq!(
        reasons[1],
        "push refused by the receiver: the body's `tenant_id` names another tenant than the push URL"
    );
    assert!(raw.iter().any(|m| m.payload() == Some(&b"not json"[..])));
    for m in &raw {
        assert_eq!(
            header(m, "dlq.error_class").as_deref(),
            Some("invalid_event")
        );
        assert_eq!(
            header(m, "dlq.tenant_id").as_deref(),
            Some(env.tenant.as_str())
        );
        // Kafka Connect's names for the class and the reason; a push has
        // no source record, so no topic, partition or offset.
        assert_eq!(
            header(m, "__connect.errors.exception.class.name").as_deref(),
            Some("invalid_event")
        );
        assert_eq!(
            header(m, "__connect.errors.exception.message"),
            header(m, "dlq.reason")
        );
        assert_eq!(header(m, "__connect.errors.topic"), None);
    }
    assert_eq!(worker_dead.len(), 1);
    assert_eq!(key(worker_dead[0]), "push-flagged");
    assert_eq!(
        header(worker_dead[0], "dlq.error_class").as_deref(),
        Some("invalid_event")
    );
    let reason = header(worker_dead[0], "dlq.reason").unwrap();
    assert!(reason.contains("no access token"), "{reason}");
}

/// Pushers posting hang-ups for distinct sessions until `stop`; every
/// answer (0: no answer) by session.
struct Load {
    answers: std::sync::Arc<std::sync::Mutex<Vec<(String, u16)>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(env: &TestEnv, url: String, pushers: usize) -> Load {
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let tasks = (0..pushers)
            .map(|w| {
                let (answers, stop, client, url) =
                    (answers.clone(), stop.clone(), client.clone(), url.clone());
                let tenant = env.tenant.clone();
                tokio::spawn(async move {
                    for n in 0.. {
                        if stop.is_cancelled() {
                            return;
                        }
                        let session = format!("load-{w}-{n:05}");
                        let body = json!({"session_id": session, "tenant_id": tenant, "command": "call_hangup"});
                        let status = match client.post(&url).body(body.to_string()).send().await {
                            Ok(resp) => resp.status().as_u16(),
                            Err(_) => 0,
                        };
                        answers.lock().unwrap().push((session, status));
                    }
                })
            })
            .collect();
        Load {
            answers,
            stop,
            tasks,
        }
    }

    fn count(&self, status: u16) -> usize {
        (self.answers.lock().unwrap().iter())
            .filter(|(_, s)| *s == status)
            .count()
    }

    async fn until(&self, status: u16, n: usize) {
        let started = std::time::Instant::now();
        while self.count(status) < n {
            if started.elapsed() > WAIT {
                let mut seen = std::collections::BTreeMap::new();
                for (_, s) in self.answers.lock().unwrap().iter() {
                    *seen.entry(*s).or_insert(0) += 1;
                }
                panic!(
                    "waited in vain for {n} pushes answered {status}; answers by status so far: {seen:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Vec<(String, u16)> {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut self.answers.lock().unwrap())
    }
}

/// Sends one record to the input topic with a new idempotent producer
/// until it is acknowledged (within `WAIT`); how long that took.
async fn idempotent_produce_acknowledged(env: &TestEnv) -> Duration {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = testkit::client_config(&env.bootstrap())
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "5000")
        .create()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let record = FutureRecord::to(&env.input)
            .key("broker-ready")
            .payload("{}");
        match producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => return started.elapsed(),
            Err((e, _)) => assert!(
                started.elapsed() < WAIT,
                "the restarted broker acknowledged no idempotent producer in {WAIT:?}: {e}"
            ),
        }
    }
}

/// Every session answered 200 is on the input topic.
async fn every_acknowledged_push_is_on_the_topic(
    env: &TestEnv,
    answers: &[(String, u16)],
) -> usize {
    let acknowledged: BTreeSet<&str> = (answers.iter())
        .filter(|(_, s)| *s == 200)
        .map(|(k, _)| k.as_str())
        .collect();
    let input = testkit::read_topic_until(&env.bootstrap(), &env.input, WAIT, |msgs| {
        let keys: BTreeSet<String> = msgs.iter().map(key).collect();
        acknowledged.iter().all(|k| keys.contains(*k))
    })
    .await
    .unwrap_or_else(|e| panic!("a push answered 200 is missing from the input topic: {e:#}"));
    input.len()
}

#[tokio::test]
async fn pushes_answered_200_survive_a_broker_outage_and_those_during_it_get_503() {
    let cluster = tokio::task::spawn_blocking(|| testkit::KafkaCluster::start(1))
        .await
        .unwrap()
        .expect("a broker starts");
    let mut env = TestEnv::on_cluster("ingest-outage", 2, Duration::ZERO, cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "push-secret-0123456789";
    let receiver = spawn_receiver_with(
        &env,
        &dir.path().join("ingest.log"),
        secret,
        &[("UINCALL__INGEST__FORWARD_TIMEOUT", "2s")],
    );
    let ready = format!("{}/readyz", receiver.side);
    until_status(&ready, 200).await;
    let url = format!("{}/{}/{secret}/call-event", receiver.push, env.tenant);
    let load = Load::start(&env, url, 4);
    load.until(200, 100).await;

    let mut cluster = env.cluster.take().unwrap();
    cluster = tokio::task::spawn_blocking(move || cluster.stop_node(0, "TERM").map(|_| cluster))
        .await
        .unwrap()
        .unwrap();
    load.until(503, 8).await;
    until_status(&ready, 503).await;
    let before_restart = load.count(200);
    cluster = tokio::task::spawn_blocking(move || cluster.start_node(0).map(|_| cluster))
        .await
        .unwrap()
        .unwrap();
    env.cluster = Some(cluster);
    // The broker hands out producer ids again (after a restart it answers
    // "coordinator load in progress" for a while): a fresh idempotent
    // producer of the test's own is acknowledged. A receiver that stays
    // stuck past this is the receiver's fault, not the broker's.
    let waited = idempotent_produce_acknowledged(&env).await;
    println!("an idempotent producer was acknowledged {waited:?} after the restart");
    load.until(200, before_restart + 100).await;
    until_status(&ready, 200).await;
    let answers = load.finish().await;

    let on_topic = every_acknowledged_push_is_on_the_topic(&env, &answers).await;
    let count = |status| answers.iter().filter(|(_, s)| *s == status).count();
    assert!(count(503) > 0);
    assert_eq!(
        count(200) + count(503),
        answers.len(),
        "every push answered 200 or 503"
    );
    println!(
        "broker outage under push load: {} pushes, {} answered 200 (all on the topic), {} answered 503, {} records on the topic (and the test's own after the restart)",
        answers.len(),
        count(200),
        count(503),
        on_topic - 1
    );
}

#[tokio::test]
async fn sigterm_under_push_load_loses_no_acknowledged_push_and_exits_0() {
    let env = TestEnv::new("ingest-stop", 2, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "push-secret-0123456789";
    let mut receiver = spawn_receiver(&env, &dir.path().join("ingest.log"), secret);
    until_status(&format!("{}/readyz", receiver.side), 200).await;
    let url = format!("{}/{}/{secret}/call-event", receiver.push, env.tenant);
    let load = Load::start(&env, url, 4);
    load.until(200, 200).await;
    sigterm(&receiver.child);
    let status = wait_exit(&mut receiver.child, WAIT).await;
    assert!(status.success(), "{status}");
    let answers = load.finish().await;
    let on_topic = every_acknowledged_push_is_on_the_topic(&env, &answers).await;
    // After the stop nothing is accepted: no answer at all, never a 5xx.
    let refused = answers.iter().filter(|(_, s)| *s == 0).count();
    assert!(
        answers.iter().all(|(_, s)| *s == 200 || *s == 0),
        "{answers:?}"
    );
    println!(
        "SIGTERM under push load: {} answered 200 (all on the topic, {on_topic} records), {refused} not accepted after the stop",
        answers.len() - refused
    );
}

/// How long each freeze of the broker lasts: past the receiver's forward
/// timeout (2 s here) and the broker's own `broker.session.timeout.ms`
/// (9 s), so that it fences itself on the thaw.
const FREEZE: Duration = Duration::from_secs(12);

/// The broker's JVM frozen (SIGSTOP) three times under 16 pushers, as a
/// long GC pause or a VM migration does: during each freeze pushes get 503
/// and `/readyz` says why; after each thaw pushes are answered 200 again,
/// the producer replaced if it stays stuck (librdkafka can keep a partition
/// leaderless for good after the broker fenced itself), and every push
/// answered 200 is on the topic.
#[tokio::test]
async fn a_broker_frozen_past_the_forward_timeout_leaves_the_receiver_open_after_each_thaw() {
    let cluster = tokio::task::spawn_blocking(|| testkit::KafkaCluster::start(1))
        .await
        .unwrap()
        .expect("a broker starts");
    let mut env = TestEnv::on_cluster("ingest-freeze", 2, Duration::ZERO, cluster).await;
    let mut cluster = env.cluster.take().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = "push-secret-0123456789";
    let receiver = spawn_receiver_with(
        &env,
        &dir.path().join("ingest.log"),
        secret,
        &[
            ("UINCALL__INGEST__FORWARD_TIMEOUT", "2s"),
            ("UINCALL__KAFKA__PRODUCER_RENEW_AFTER", "5s"),
        ],
    );
    let ready = format!("{}/readyz", receiver.side);
    until_status(&ready, 200).await;
    let url = format!("{}/{}/{secret}/call-event", receiver.push, env.tenant);
    let load = Load::start(&env, url, 16);
    load.until(200, 100).await;
    for round in 1..=3 {
        let refused = load.count(503);
        cluster.signal_node(0, "STOP").unwrap();
        let frozen = std::time::Instant::now();
        load.until(503, refused + 16).await;
        let why = until_status(&ready, 503).await;
        tokio::time::sleep(FREEZE.saturating_sub(frozen.elapsed())).await;
        cluster.signal_node(0, "CONT").unwrap();
        let thawed = std::time::Instant::now();
        let answered = load.count(200);
        load.until(200, answered + 100).await;
        until_status(&ready, 200).await;
        println!(
            "freeze {round}: /readyz said {:?} while frozen; 100 more pushes answered 200 {:?} after the thaw",
            why.trim(),
            thawed.elapsed()
        );
    }
    let answers = load.finish().await;
    let on_topic = every_acknowledged_push_is_on_the_topic(&env, &answers).await;
    let count = |status| answers.iter().filter(|(_, s)| *s == status).count();
    let renewals = metric_of(&receiver, "uincall_enricher_ingest_producer_renewals_total").await;
    println!(
        "broker frozen 3 times under 16 pushers: {} answered 200 (all on the topic, {on_topic} records), {} answered 503, producer renewed {renewals} times",
        count(200),
        count(503)
    );
    assert_eq!(
        count(200) + count(503),
        answers.len(),
        "every push answered 200 or 503"
    );
    drop(cluster);
}

/// A metric's value from the receiver's `/metrics` (0 when absent).
async fn metric_of(receiver: &Receiver, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", receiver.side))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
