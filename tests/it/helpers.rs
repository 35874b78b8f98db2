//! Spawns the real neighbours (Apache Kafka in its own process, the fake
//! Uincall API) and the worker, in-process or as the real binary, with typed
//! handles. Tests share one broker (`testkit::shared_bootstrap`) with their
//! own topics and group; broker-fault tests start their own cluster.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use secrecy::SecretString;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::testkit::{self, KafkaCluster, TopicSpec};
use uincall_enricher::fake_api::{ERRCODE_NOT_FOUND, FakeApi, FakeApiConfig};
use uincall_enricher::pipeline::Worker;
use uincall_enricher::settings::Settings;
use uincall_enricher::stats::Stats;

/// Generous bound for records to appear; a test that hits it has failed.
pub const WAIT: Duration = Duration::from_secs(90);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's world: its own topics, group, tenant and fake API, on the
/// shared broker or a cluster of its own.
pub struct TestEnv {
    bootstrap: String,
    /// A cluster of this test's own (broker faults), when it has one.
    pub cluster: Option<KafkaCluster>,
    pub api: FakeApi,
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
    pub tenant: String,
    pub token: String,
    pub partitions: i32,
}

/// A test's input, output and dead-letter topics; `output_config` on the
/// last two (the dead-letter topic has one partition).
async fn create_env_topics(
    bootstrap: &str,
    [input, output, dlq]: [&String; 3],
    partitions: i32,
    output_config: &[(&str, &str)],
) {
    let spec = |name, partitions, config| TopicSpec {
        name,
        partitions,
        config,
    };
    testkit::create_topics_with(
        bootstrap,
        &[
            spec(input, partitions, &[]),
            spec(output, partitions, output_config),
            spec(dlq, 1, output_config),
        ],
    )
    .await
    .expect("topics");
}

impl TestEnv {
    /// On the broker shared by this test run.
    pub async fn new(name: &str, partitions: i32, latency: Duration) -> TestEnv {
        Self::build(name, partitions, latency, None, &[]).await
    }

    /// On a cluster of this test's own.
    pub async fn on_cluster(
        name: &str,
        partitions: i32,
        latency: Duration,
        cluster: KafkaCluster,
    ) -> TestEnv {
        Self::build(name, partitions, latency, Some(cluster), &[]).await
    }

    /// On a cluster that outlives this test (`bootstrap`: its plaintext
    /// listener, where the test makes its topics).
    pub async fn on_bootstrap(
        name: &str,
        partitions: i32,
        latency: Duration,
        bootstrap: String,
    ) -> TestEnv {
        Self::build_at(name, partitions, latency, Some(bootstrap), None, &[]).await
    }

    /// On the shared broker, with topic-level configuration for the output
    /// and dead-letter topics (e.g. `max.message.bytes`).
    pub async fn with_output_config(
        name: &str,
        partitions: i32,
        latency: Duration,
        config: &[(&str, &str)],
    ) -> TestEnv {
        Self::build(name, partitions, latency, None, config).await
    }

    async fn build(
        name: &str,
        partitions: i32,
        latency: Duration,
        cluster: Option<KafkaCluster>,
        output_config: &[(&str, &str)],
    ) -> TestEnv {
        Self::build_at(name, partitions, latency, None, cluster, output_config).await
    }

    async fn build_at(
        name: &str,
        partitions: i32,
        latency: Duration,
        bootstrap: Option<String>,
        cluster: Option<KafkaCluster>,
        output_config: &[(&str, &str)],
    ) -> TestEnv {
        let bootstrap = match (bootstrap, &cluster) {
            (Some(b), _) => b,
            (None, Some(c)) => c.bootstrap(),
            (None, None) => testkit::shared_bootstrap(),
        };
        // Unique across runs too: KAFKA_BOOTSTRAP may name a cluster that
        // keeps earlier runs' topics.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let n = format!("{seq}-{}-{}", std::process::id(), run_stamp());
        let [input, output, dlq] = ["in", "out", "dlq"].map(|t| format!("{name}-{n}-{t}"));
        create_env_topics(
            &bootstrap,
            [&input, &output, &dlq],
            partitions,
            output_config,
        )
        .await;
        let tenant = format!("tenant-{name}-{n}");
        let token = format!("tok{seq:03}{:x}", std::process::id()).repeat(2);
        let api = FakeApi::start(FakeApiConfig {
            latency,
            tokens: HashMap::from([(tenant.clone(), token.clone())]),
        })
        .await
        .expect("fake api");
        TestEnv {
            bootstrap,
            cluster,
            api,
            input,
            output,
            dlq,
            group: format!("{name}-{n}-group"),
            tenant,
            token,
            partitions,
        }
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// Settings with quick retries, for this test's topics and group.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::load_from(None, Vec::new()).unwrap();
        s.kafka.brokers = self.bootstrap();
        s.kafka.input_topic = self.input.clone();
        s.kafka.output_topic = self.output.clone();
        s.kafka.dead_letter_topic = self.dlq.clone();
        s.kafka.group_id = self.group.clone();
        s.kafka.session_timeout = Duration::from_secs(6);
        s.kafka.max_poll_interval = Duration::from_secs(10);
        s.kafka.commit_interval = Duration::from_millis(500);
        s.api.base_url = self.api.base_url().parse().unwrap();
        s.api
            .tokens
            .insert(self.tenant.clone(), SecretString::from(self.token.clone()));
        s.retry.min_delay = Duration::from_millis(10);
        s.retry.max_delay = Duration::from_millis(50);
        s.retry.max_attempts = 5;
        s.retry.permanent_errcodes = vec![ERRCODE_NOT_FOUND];
        s.pipeline.drain_timeout = Duration::from_secs(5);
        s.pipeline.revoke_drain = Duration::from_secs(3);
        s.systemic.call_window = 20;
        s.systemic.min_calls = 10;
        s.systemic.probe_min_delay = Duration::from_millis(50);
        s.systemic.probe_max_delay = Duration::from_millis(400);
        s.validate().unwrap();
        s
    }

    /// The same settings as environment variables, for the real binary.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let s = self.settings();
        vec![
            ("UINCALL__KAFKA__BROKERS".into(), s.kafka.brokers),
            ("UINCALL__KAFKA__INPUT_TOPIC".into(), s.kafka.input_topic),
            ("UINCALL__KAFKA__OUTPUT_TOPIC".into(), s.kafka.output_topic),
            (
                "UINCALL__KAFKA__DEAD_LETTER_TOPIC".into(),
                s.kafka.dead_letter_topic,
            ),
            ("UINCALL__KAFKA__GROUP_ID".into(), s.kafka.group_id),
            ("UINCALL__KAFKA__SESSION_TIMEOUT".into(), "6s".into()),
            ("UINCALL__KAFKA__MAX_POLL_INTERVAL".into(), "10s".into()),
            ("UINCALL__KAFKA__COMMIT_INTERVAL".into(), "500ms".into()),
            ("UINCALL__API__BASE_URL".into(), self.api.base_url()),
            (
                format!("UINCALL__API__TOKENS__{}", self.tenant),
                self.token.clone(),
            ),
            ("UINCALL__RETRY__MIN_DELAY".into(), "10ms".into()),
            ("UINCALL__RETRY__MAX_DELAY".into(), "50ms".into()),
            ("UINCALL__RETRY__MAX_ATTEMPTS".into(), "5".into()),
            (
                "UINCALL__RETRY__PERMANENT_ERRCODES".into(),
                ERRCODE_NOT_FOUND.to_string(),
            ),
            ("UINCALL__PIPELINE__DRAIN_TIMEOUT".into(), "5s".into()),
            ("UINCALL__PIPELINE__REVOKE_DRAIN".into(), "3s".into()),
            ("UINCALL__SYSTEMIC__CALL_WINDOW".into(), "20".into()),
            ("UINCALL__SYSTEMIC__MIN_CALLS".into(), "10".into()),
            ("UINCALL__SYSTEMIC__PROBE_MIN_DELAY".into(), "50ms".into()),
            ("UINCALL__SYSTEMIC__PROBE_MAX_DELAY".into(), "400ms".into()),
            ("UINCALL__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ]
    }

    /// A call-ended event for this test's tenant.
    pub fn event(&self, session: &str) -> (Option<Vec<u8>>, Vec<u8>) {
        let v = serde_json::json!({"session_id": session, "tenant_id": self.tenant, "ended_at": "2026-11-23T10:00:00+08:00"});
        (
            Some(session.as_bytes().to_vec()),
            v.to_string().into_bytes(),
        )
    }

    pub async fn seed(&self, sessions: &[String]) {
        testkit::produce(
            &self.bootstrap(),
            &self.input,
            sessions.iter().map(|s| self.event(s)),
        )
        .await
        .expect("seeding events");
    }

    /// Produces raw payloads (key, value, headers) to the input topic.
    pub async fn seed_raw(&self, records: &[RawRecord<'_>]) {
        self.produce_raw(&self.input, records).await
    }

    /// Produces raw payloads (key, value, headers) to `topic`.
    pub async fn produce_raw(&self, topic: &str, records: &[RawRecord<'_>]) {
        let producer: FutureProducer = testkit::client_config(&self.bootstrap()).create().unwrap();
        for (key, value, headers) in records {
            let mut hs = OwnedHeaders::new();
            for (k, v) in *headers {
                hs = hs.insert(Header {
                    key: k,
                    value: Some(*v),
                });
            }
            let mut rec = FutureRecord::<str, [u8]>::to(topic)
                .payload(value)
                .headers(hs);
            if let Some(k) = key {
                rec = rec.key(k);
            }
            producer
                .send(rec, Timeout::After(Duration::from_secs(30)))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }

    /// Starts the worker in this process.
    pub async fn start_worker(&self, settings: Settings) -> RunningWorker {
        let stats = Arc::new(Stats::default());
        let worker = Worker::build(settings, stats.clone())
            .await
            .expect("worker builds");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(stop.clone()));
        RunningWorker {
            stop,
            handle,
            stats,
        }
    }

    pub async fn read_output(&self, n: usize) -> Vec<OwnedMessage> {
        testkit::read_topic(&self.bootstrap(), &self.output, n, WAIT)
            .await
            .unwrap()
    }

    pub async fn read_dlq(&self, n: usize) -> Vec<OwnedMessage> {
        testkit::read_topic(&self.bootstrap(), &self.dlq, n, WAIT)
            .await
            .unwrap()
    }

    /// The first `n` records of `topic`, and how many it holds in all.
    pub async fn read_all(&self, topic: &str, n: usize) -> (Vec<OwnedMessage>, usize) {
        let records = testkit::read_topic(&self.bootstrap(), topic, n, WAIT)
            .await
            .unwrap();
        let total: i64 = testkit::end_offsets(&self.bootstrap(), topic)
            .unwrap()
            .iter()
            .sum();
        (records, total as usize)
    }

    /// Whether a topic holds no record.
    pub fn is_empty(&self, topic: &str) -> bool {
        testkit::end_offsets(&self.bootstrap(), topic)
            .unwrap()
            .iter()
            .all(|&o| o == 0)
    }

    /// The offsets this test's group has committed on the input topic.
    pub fn committed(&self) -> Vec<Option<i64>> {
        testkit::committed_offsets(&self.bootstrap(), &self.group, &self.input).unwrap()
    }

    /// Starts the real binary (`run`) with this test's settings; its stderr
    /// goes to `log`.
    pub fn spawn_binary(&self, log: &PathBuf, extra_env: &[(&str, &str)]) -> Child {
        self.spawn_command(&["run"], log, extra_env, Stdio::null())
    }

    /// Runs `uincall-enricher replay ARGS` to its end; returns the exit
    /// code and what it printed on stdout (the summary). The wait does not
    /// block this test's runtime, which serves the fake API.
    pub async fn replay(&self, args: &[&str]) -> (i32, String) {
        self.replay_with_env(args, &[]).await
    }

    /// [`TestEnv::replay`] with more environment variables.
    pub async fn replay_with_env(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec!["replay"];
        all.extend_from_slice(args);
        let child = self.spawn_command(
            &all,
            &dir.path().join("replay.log"),
            extra_env,
            Stdio::piped(),
        );
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let code = out.status.code().unwrap_or(-1);
        // Exit 1 with no summary: the run itself failed.
        if (code != 0 && code != 1) || stdout.is_empty() {
            let log = std::fs::read_to_string(dir.path().join("replay.log")).unwrap_or_default();
            panic!("replay {args:?} exited {code}:\n{stdout}\n{log}");
        }
        (code, stdout)
    }

    /// Starts `uincall-enricher replay ARGS` in the background.
    pub fn spawn_replay(&self, args: &[&str], log: &PathBuf) -> Child {
        self.spawn_replay_with_env(args, log, &[])
    }

    /// [`TestEnv::spawn_replay`] with more environment variables.
    pub fn spawn_replay_with_env(
        &self,
        args: &[&str],
        log: &PathBuf,
        extra_env: &[(&str, &str)],
    ) -> Child {
        let mut all = vec!["replay"];
        all.extend_from_slice(args);
        self.spawn_command(&all, log, extra_env, Stdio::null())
    }

    pub fn spawn_command(
        &self,
        args: &[&str],
        log: &PathBuf,
        extra_env: &[(&str, &str)],
        stdout: Stdio,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_uincall-enricher"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env_vars())
            .envs(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("worker binary starts")
    }
}

/// Seconds since the epoch at this process's first call: tells runs apart.
fn run_stamp() -> u64 {
    static STAMP: OnceLock<u64> = OnceLock::new();
    *STAMP.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    })
}

/// An input record as (key, value, headers).
pub type RawRecord<'a> = (Option<&'a str>, &'a [u8], &'a [(&'a str, &'a str)]);

pub struct RunningWorker {
    pub stop: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
    pub stats: Arc<Stats>,
}

impl RunningWorker {
    /// Stops like SIGTERM does and returns the worker's result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.handle.await.expect("worker task")
    }
}

/// A number from a summary line such as `  replayed   12`.
pub fn summary_count(summary: &str, label: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix(label)?;
            rest.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no `{label}` in the summary:\n{summary}"))
}

/// Serves the side port of an in-process worker on a free loopback port;
/// returns its base URL.
pub async fn serve_side_port(worker: &RunningWorker) -> String {
    let addr = uincall_enricher::side_port::serve(
        "127.0.0.1:0".parse().unwrap(),
        worker.stats.clone(),
        uincall_enricher::side_port::Liveness {
            stall_timeout: Duration::from_secs(300),
            rejoin_timeout: Duration::from_secs(300),
            held_stops_all: false,
        },
        worker.stop.clone(),
    )
    .await
    .unwrap();
    format!("http://{addr}")
}

/// Polls `url` until its status is `want` (bounded by WAIT); returns the body.
pub async fn until_status(url: &str, want: u16) -> String {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Ok(resp) = reqwest::get(url).await
            && resp.status().as_u16() == want
        {
            return resp.text().await.unwrap();
        }
        assert!(started.elapsed() < WAIT, "{url} never answered {want}");
    }
}

/// Polls `cond` until it holds (bounded by WAIT).
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, WAIT, cond).await
}

/// Polls `cond` until it holds (bounded by `limit`).
pub async fn wait_until_within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !cond() {
        assert!(started.elapsed() < limit, "waited in vain for {what}");
        tick.tick().await;
    }
}

/// Waits for a child to exit, killing it and failing past `limit`. Polls
/// without blocking this test's runtime (it serves the fake API).
pub async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the process did not exit within {limit:?}");
        }
        tick.tick().await;
    }
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &Child) {
    testkit::send_signal(child, "TERM").unwrap();
}

/// The enriched-record schema shipped in docs/, compiled once.
fn schema() -> &'static jsonschema::Validator {
    static SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let text = include_str!("../../docs/schema/enriched-record.v1.schema.json");
        let v: Value = serde_json::from_str(text).unwrap();
        jsonschema::validator_for(&v).expect("the schema compiles")
    })
}

/// Parses an enriched record and checks it against the JSON Schema.
pub fn enriched_json(m: &OwnedMessage) -> Value {
    let v: Value = serde_json::from_slice(m.payload().expect("payload")).expect("JSON");
    let errors: Vec<String> = schema()
        .iter_errors(&v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "record does not match the schema: {errors:?}\n{v:#}"
    );
    v
}

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    testkit::header(m, name)
}

pub fn key(m: &OwnedMessage) -> String {
    testkit::key(m).unwrap_or_default()
}

/// A worker binary of a group, with its own side port.
pub struct Replica {
    pub name: String,
    pub child: Child,
    pub side: String,
    /// Its stderr: its last lines are printed when the test fails.
    pub log: PathBuf,
}

impl Replica {
    /// `/readyz`: the status and the number of partitions it reports as
    /// assigned (0 when not ready).
    pub async fn readiness(&self) -> (u16, usize) {
        let Ok(resp) = reqwest::get(format!("{}/readyz", self.side)).await else {
            return (0, 0);
        };
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let n = text
            .strip_prefix("ready: ")
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (status, n)
    }

    /// A metric's value from `/metrics` (`name` with its labels, as printed).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.side))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// SIGTERM, then waits for exit 0.
    pub async fn stop(mut self) {
        sigterm(&self.child);
        let status = wait_exit(&mut self.child, WAIT).await;
        assert!(status.success(), "replica {} exited {status}", self.name);
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`).
    pub fn signal(&self, signal: &str) {
        testkit::send_signal(&self.child, signal)
            .unwrap_or_else(|e| panic!("replica {}: {e:#}", self.name));
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            print_tail(&self.name, &self.log);
        }
    }
}

/// How many of a failed test's replica log lines are printed.
const LOG_TAIL: usize = 80;

/// Prints the last [`LOG_TAIL`] lines of a replica's log (a failed test's
/// output then says what the workers did).
fn print_tail(name: &str, log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL);
    eprintln!(
        "--- replica {name}: last {} lines of {} ---",
        lines.len() - from,
        log.display()
    );
    for line in &lines[from..] {
        eprintln!("{line}");
    }
}

impl TestEnv {
    /// Starts a worker binary in this test's group, its stderr in
    /// `dir/NAME.log`, its side port on a free loopback port.
    pub fn spawn_replica(
        &self,
        name: &str,
        dir: &std::path::Path,
        extra_env: &[(&str, &str)],
    ) -> Replica {
        let listen = format!("127.0.0.1:{}", testkit::free_port());
        let client_id = format!("{}-{name}", self.group);
        // Replicas on one host share its name: each its own transactional
        // id, kept when it is started again under the same name.
        let mut env: Vec<(&str, &str)> = vec![
            ("UINCALL__HTTP__LISTEN", &listen),
            ("UINCALL__KAFKA__CLIENT_ID", &client_id),
            ("UINCALL__KAFKA__TRANSACTIONAL_ID", &client_id),
        ];
        env.extend_from_slice(extra_env);
        let log = dir.join(format!("{name}.log"));
        let child = self.spawn_binary(&log, &env);
        Replica {
            name: name.to_string(),
            child,
            side: format!("http://{listen}"),
            log,
        }
    }

    /// Per partition of the input topic: end offset minus committed offset.
    pub fn lag(&self) -> Vec<i64> {
        let end = testkit::end_offsets(&self.bootstrap(), &self.input).unwrap();
        let committed = self.committed();
        end.iter()
            .zip(committed)
            .map(|(e, c)| e - c.unwrap_or(0))
            .collect()
    }

    /// Waits until every input partition's committed offset is its end
    /// offset (transaction markers included).
    pub async fn until_no_lag(&self) {
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let lag = self.lag();
            if lag.iter().all(|&l| l == 0) {
                return;
            }
            assert!(started.elapsed() < WAIT, "lag stays at {lag:?}");
        }
    }

    /// Produces events for `sessions` paced at `per_second` in the
    /// background (load that lasts while the group changes).
    pub fn spawn_load(&self, sessions: Vec<String>, per_second: usize) -> JoinHandle<()> {
        let records: Vec<_> = sessions.iter().map(|s| self.event(s)).collect();
        let (bootstrap, topic) = (self.bootstrap(), self.input.clone());
        tokio::spawn(async move {
            let mut producer = load_producer(&bootstrap);
            // One batch every 20 ms.
            let per_tick = (per_second / 50).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for chunk in records.chunks(per_tick) {
                tick.tick().await;
                let mut left = chunk.to_vec();
                while !left.is_empty() {
                    left = send_all(&producer, &topic, left).await;
                    if !left.is_empty() {
                        // A producer that times out after a broker fault
                        // may stay stuck (librdkafka); the load goes on
                        // with a fresh one.
                        producer = load_producer(&bootstrap);
                    }
                }
            }
        })
    }

    /// How often each key is on the output and dead-letter topics, read
    /// with `read_committed` to the end of every partition (the last stable
    /// offset: an open transaction's records are not counted).
    pub async fn outputs_to_end(&self) -> HashMap<String, usize> {
        self.keys_to_end(&[&self.output, &self.dlq]).await
    }

    /// How often each key is on `topics`, read with `read_committed` to
    /// the end of every partition.
    pub async fn keys_to_end(&self, topics: &[&String]) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for topic in topics {
            let (bootstrap, topic) = (self.bootstrap(), topic.to_string());
            let keys =
                tokio::task::spawn_blocking(move || testkit::keys_to_end(&bootstrap, &topic))
                    .await
                    .unwrap()
                    .unwrap();
            for k in keys {
                *seen.entry(k).or_default() += 1;
            }
        }
        seen
    }

    /// Follows the output and dead-letter topics in the background.
    pub fn follow(&self) -> Follower {
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let stop = CancellationToken::new();
        let tasks = [self.output.clone(), self.dlq.clone()].map(|topic| {
            let (bootstrap, seen, stop) = (self.bootstrap(), seen.clone(), stop.clone());
            tokio::spawn(follow_topic(bootstrap, topic, seen, stop))
        });
        Follower { seen, stop, tasks }
    }
}

/// How long a follower's reader may get nothing before a fresh one takes
/// over from where it was.
const READER_IDLE: Duration = Duration::from_secs(15);

/// Reads `topic` from its start until `stop`, counting each record's key
/// in `seen`. A reader that gets nothing for [`READER_IDLE`] is replaced by
/// a fresh one from the next offsets: librdkafka can stay stuck after a
/// broker that froze fences itself (see src/producer.rs), and a stuck
/// reader would make the worker look idle.
async fn follow_topic(
    bootstrap: String,
    topic: String,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    stop: CancellationToken,
) {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::{Offset, TopicPartitionList};
    let mut next: HashMap<i32, i64> = HashMap::new();
    while !stop.is_cancelled() {
        let consumer: StreamConsumer = testkit::client_config(&bootstrap)
            .set("group.id", format!("follower-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let Ok(parts) = testkit::partition_count(&consumer, &topic) else {
            // The broker is not answering yet: ask again in a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..parts {
            let at = next
                .get(&p)
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(&topic, p, at).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = tokio::time::timeout(READER_IDLE, consumer.recv()) => m,
            };
            match m {
                Ok(Ok(m)) => {
                    *seen.lock().unwrap().entry(key(&m.detach())).or_default() += 1;
                    next.insert(m.partition(), m.offset() + 1);
                }
                Ok(Err(e)) => eprintln!("following {topic}: {e} (going on)"),
                Err(_) => break,
            }
        }
    }
}

/// The load's producer: 30 s for each record, idempotent (a request
/// retried after a broker restart writes its records once).
fn load_producer(bootstrap: &str) -> FutureProducer {
    testkit::client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("load producer")
}

/// Sends `records` to `topic`; returns those not acknowledged.
async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    records: Vec<(Option<Vec<u8>>, Vec<u8>)>,
) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let sends = records.iter().map(|(key, value)| {
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic).payload(value);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        producer.send(rec, Timeout::Never)
    });
    let results = futures::future::join_all(sends).await;
    let failed: Vec<_> = (records.into_iter().zip(results))
        .filter_map(|(r, sent)| sent.err().map(|(e, _)| (r, e)))
        .collect();
    if let Some((_, e)) = failed.first() {
        eprintln!(
            "load: {} records not acknowledged ({e}), sent again",
            failed.len()
        );
    }
    failed.into_iter().map(|(r, _)| r).collect()
}

/// Keys seen on the output and dead-letter topics, with how often.
pub struct Follower {
    seen: Arc<Mutex<HashMap<String, usize>>>,
    stop: CancellationToken,
    tasks: [JoinHandle<()>; 2],
}

impl Follower {
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits until `n` distinct keys were seen; fails when none more came
    /// for `WAIT` (a long backlog on a loaded machine is not a failure, a
    /// stop is).
    pub async fn until_distinct(&self, n: usize) {
        let mut seen = self.distinct();
        let mut moved = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while seen < n {
            tick.tick().await;
            let now = self.distinct();
            if now > seen {
                (seen, moved) = (now, std::time::Instant::now());
            }
            assert!(
                moved.elapsed() < WAIT,
                "waited in vain for {n} distinct sessions out: {seen} out, none more for {WAIT:?}"
            );
        }
    }

    /// Stops following once every session in `all` was seen; returns the
    /// number of duplicates (records beyond the first per session).
    pub async fn finish(self, all: &[String]) -> usize {
        self.until_distinct(all.len()).await;
        // Counted: what was read until now. The readers stop at their next
        // record, or are aborted below.
        self.stop.cancel();
        let seen = self.seen.lock().unwrap().clone();
        let missing: Vec<&String> = all.iter().filter(|s| !seen.contains_key(*s)).collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        for t in self.tasks {
            t.abort();
        }
        seen.values().map(|n| n - 1).sum()
    }
}

/// The setting of the exactly-once tests: `kafka.delivery =
/// "exactly_once"`, or what `DELIVERY_UNDER_TEST` says: with
/// `at_least_once` they must fail (duplicates seen), which shows they can.
pub fn exactly_once() -> (&'static str, &'static str) {
    let delivery = match std::env::var("DELIVERY_UNDER_TEST").as_deref() {
        Ok("at_least_once") => "at_least_once",
        _ => "exactly_once",
    };
    ("UINCALL__KAFKA__DELIVERY", delivery)
}

/// Read with `read_committed` to the end of the output and dead-letter
/// topics, each of `all` is on them exactly as often as on the input topic
/// (once, unless the load sent it again after a failed send), and nothing
/// else is.
pub async fn assert_each_once(env: &TestEnv, all: &[String]) {
    let seen = env.outputs_to_end().await;
    let input = env.keys_to_end(&[&env.input]).await;
    let mut twice: Vec<_> = (seen.iter())
        .filter(|(k, n)| **n > input.get(*k).copied().unwrap_or(1))
        .map(|(k, n)| (k, *n, input.get(k).copied().unwrap_or(0)))
        .collect();
    twice.sort();
    assert!(
        twice.is_empty(),
        "{} written more often than they are in (session, out, in): {twice:?}",
        twice.len()
    );
    let missing: Vec<_> = all.iter().filter(|s| !seen.contains_key(*s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(seen.len(), all.len(), "sessions out that were not in");
}

/// Polls an async condition until it holds (bounded by WAIT).
pub async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !cond().await {
        assert!(started.elapsed() < WAIT, "waited in vain for {what}");
        tick.tick().await;
    }
}

/// Whose metrics: the worker's, or the push receiver's
/// (`uincall_enricher_ingest_…`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Worker,
    Receiver,
}

/// Every metric of `process` that the chart's Grafana dashboard (its
/// panels' and variables' queries) or its alert rules name is one that
/// `metrics` (that process's `/metrics`) serves.
pub fn only_served_metrics_are_monitored(metrics: &str, process: Process) {
    let served: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/uincall-enricher");
    let read = |path: &str| std::fs::read_to_string(format!("{chart}/{path}")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("dashboards/uincall-enricher.json")).unwrap();
    let panels = (dashboard["panels"].as_array().unwrap().iter())
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap().to_string());
    let variables = (dashboard["templating"]["list"].as_array().unwrap().iter())
        .filter(|v| v["type"] == "query")
        .map(|v| v["query"].as_str().unwrap().to_string());
    let queries: Vec<String> = panels.chain(variables).collect();
    for query in &queries {
        assert!(query.contains("uincall_enricher_"), "{query}");
    }
    // The rules' template: its Go template actions name no metric.
    let rules = read("templates/prometheusrule.yaml");
    let mut queried: BTreeSet<&str> = (queries.iter().map(String::as_str))
        .chain([rules.as_str()])
        .flat_map(|text| text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("uincall_enricher_"))
        .collect();
    queried.retain(|name| {
        name.starts_with("uincall_enricher_ingest_") == (process == Process::Receiver)
    });
    assert!(!queried.is_empty());
    for name in queried {
        assert!(
            served.contains(name),
            "the dashboard or an alert queries {name}, which /metrics does not serve:\n{metrics}"
        );
    }
}
