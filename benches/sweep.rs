//! The benchmark sweep (docs/benchmarks.md): the worker binary, in its own
//! process, against a real Apache Kafka broker (one KRaft node in its own
//! JVM, `testkit::KafkaCluster`) and the fake Uincall API (in its own
//! process too), for each in-flight window × API latency, beside the raw
//! pipeline limit measured on the same broker in the same run.
//!
//!   cargo bench --bench sweep -- [--windows 1,16,64,256,1024]
//!       [--latencies-ms 0,50,200] [--max-events 100000] [--seconds 15]
//!
//! Each point: N events seeded (enough for about `--seconds` at the expected
//! rate, at most `--max-events`), the fake API and the worker started on
//! them, and then
//! - throughput: enriched records/s between the 5th and the 95th percentile
//!   of arrivals on the output topic (group join and the tail excluded);
//! - CPU: the worker's user + system seconds over the same stretch, per
//!   1 000 records; also, as cores (CPU seconds per second), the worker's,
//!   the broker's JVM, the fake API's process and this harness process
//!   (which seeds, paces and reads back);
//! - latency: with the backlog gone, events produced at half the measured
//!   rate for `--paced-seconds`; event sent → enriched record read back;
//! - peak RSS of the worker (VmHWM).
//!
//! `SWEEP_WORKER_BIN=PATH` measures another build of the worker instead;
//! `SWEEP_WORKER_LOG=LEVEL` sets its log level (default `warn`; the logs
//! are written beside the results).
//!
//! `--tenants` measures tenant isolation instead (`tenants.rs`): one
//! tenant's throughput alone and beside a tenant whose token the API
//! refuses, or whose own API answers in 2 s.
//!
//! `--ingest` measures the push receiver instead (`ingest.rs`): pushes a
//! second and answer latency at steady rates (`--push-rates`), from a load
//! generator in its own process, beside the broker's raw produce rate.
//!
//! `--backfill` measures `uincall-enricher backfill` instead
//! (`backfill.rs`): sessions a second from the fake API's call list, and
//! what `--skip-enriched` costs per million keys.
//!
//! The raw limit runs the same measurement on a consume + produce loop with
//! no HTTP call (this binary started with `--raw-pipe`): the worker's Kafka
//! client settings, at most as many records between consume and
//! acknowledgement as the worker allows, and an enriched record of the fake
//! API's shape as the payload.
//!
//! The fake API is this binary started with `--fake-api --latency-ms N`, one
//! process per point: it prints its address on stdout and serves until
//! SIGTERM, or until its stdin closes (the sweep is gone). Every child of
//! the sweep is stopped when the sweep leaves a point, fails, is
//! interrupted (SIGINT, SIGTERM), or dies (`PR_SET_PDEATHSIG`).

#[path = "sweep/backfill.rs"]
mod backfill;
#[path = "sweep/ingest.rs"]
mod ingest;
#[path = "sweep/nginx.rs"]
mod nginx;
#[path = "sweep/tenants.rs"]
mod tenants;
#[path = "../tests/testkit/mod.rs"]
mod testkit;
use testkit::KafkaCluster;

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uincall_enricher::detail::CallDetail;
use uincall_enricher::fake_api::{self, FakeApi, FakeApiConfig};
use uincall_enricher::offsets::{OffsetTracker, Start};
use uincall_enricher::pipeline::admitted_limit;
use uincall_enricher::settings::Settings;
use uincall_enricher::{kafka, record};

const PARTITIONS: i32 = 6;
const TENANT: &str = "t";
const TOKEN: &str = "bench-token";
/// How long a point may go without a new record on its output topic.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// The key of the records that show the reader is fetching (`Reader::wait_ready`).
const PROBE: &str = "sweep-reader-probe";

#[derive(Parser, Debug)]
#[command(about = "Throughput, latency, CPU and memory of the worker against its limits")]
struct Args {
    /// In-flight windows (`pipeline.max_in_flight`) to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256, 1024])]
    windows: Vec<usize>,
    /// Fake API latencies to measure, in milliseconds.
    #[arg(long = "latencies-ms", value_delimiter = ',', default_values_t = [0, 50, 200])]
    latencies_ms: Vec<u64>,
    /// Points as WINDOW/LATENCY_MS pairs (`1024/50,64/0`), measured in this
    /// order instead of every window at every latency.
    #[arg(long, value_delimiter = ',', value_parser = point)]
    points: Vec<(usize, u64)>,
    /// Most events seeded for one point.
    #[arg(long, default_value_t = 100_000)]
    max_events: usize,
    /// Fewest events seeded for one point.
    #[arg(long, default_value_t = 100)]
    min_events: usize,
    /// Target length of a point's backlog run at the expected rate.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Length of a point's latency run (events at half the measured rate).
    #[arg(long, default_value_t = 8.0)]
    paced_seconds: f64,
    /// Directory for results.csv, results.md, throughput.svg and the logs.
    #[arg(long, default_value = "target/sweep")]
    out: PathBuf,
    /// The API the worker calls: `nginx` (its echo module answers at almost
    /// no CPU; `scripts/install-nginx.sh`) or `fake` (this binary's fake
    /// API in its own process).
    #[arg(long, default_value = "nginx", value_parser = ["nginx", "fake"])]
    api: String,
    /// The worker's `kafka.delivery` modes, each measured at every point in
    /// turn (`at_least_once,exactly_once` puts them side by side).
    #[arg(long, value_delimiter = ',', default_values_t = ["at_least_once".to_string()], value_parser = ["at_least_once", "exactly_once"])]
    delivery: Vec<String>,
    /// With `--api nginx`: HTTP/2 without TLS, the worker told so
    /// (`api.http2 = "prior_knowledge"`).
    #[arg(long)]
    api_http2: bool,
    /// The share of events that repeat the session of one of the 6 000
    /// events before them (a minute at 100 events/s); API calls per input
    /// record are reported.
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Skip the unmeasured first point (window 256, 0 ms, 30 000 events)
    /// that warms the broker's JVM before anything is measured.
    #[arg(long)]
    no_warmup: bool,
    /// Skip the raw consume + produce runs (ratios are then to W/L only).
    #[arg(long)]
    no_raw: bool,
    /// A librdkafka property for the worker and the raw pipe alike
    /// (`kafka.properties`); repeatable.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = key_value)]
    kafka_properties: Vec<(String, String)>,
    /// Measure tenant isolation instead of the sweep (docs/benchmarks.md,
    /// "Tenants").
    #[arg(long)]
    tenants: bool,
    /// With `--tenants`: events of the measured tenant per run.
    #[arg(long, default_value_t = 12_000)]
    tenant_events: usize,
    /// With `--tenants`: events of the other tenant, spread among the
    /// measured tenant's (fewer than `pipeline.max_held_records`).
    #[arg(long, default_value_t = 3_000)]
    other_events: usize,
    /// With `--tenants`: runs of each scenario, alone and beside.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// With `--tenants`: the scenarios to run (`refused`, `slow`).
    #[arg(long, value_delimiter = ',', default_values_t = ["refused".to_string(), "slow".to_string()])]
    scenarios: Vec<String>,
    /// Measure the push receiver instead of the sweep (docs/benchmarks.md,
    /// "Push receiver").
    #[arg(long)]
    ingest: bool,
    /// With `--ingest`: the steady rates to push at, pushes a second.
    #[arg(long = "push-rates", value_delimiter = ',', default_values_t = [1000, 2500, 5000, 7500])]
    push_rates: Vec<u64>,
    /// With `--ingest`: how long to push at each rate, in seconds.
    #[arg(long = "push-seconds", default_value_t = 10.0)]
    push_seconds: f64,
    /// Internal: the load generator, pushing to this URL.
    #[arg(long = "push-load", hide = true)]
    push_load: Option<String>,
    /// Internal: the load generator's rate, with `--push-load`.
    #[arg(long = "push-rate", hide = true, default_value_t = 1000)]
    push_rate: u64,
    /// Measure the backfill instead of the sweep (docs/benchmarks.md,
    /// "Backfill").
    #[arg(long)]
    backfill: bool,
    /// With `--backfill`: sessions in the call list.
    #[arg(long, default_value_t = 100_000)]
    backfill_sessions: usize,
    /// With `--backfill`: how late the call list answers each page, in ms.
    #[arg(long, default_value_t = 50)]
    page_latency_ms: u64,
    /// With `--backfill`: keys on the output topic for the
    /// `--skip-enriched` measurement.
    #[arg(long, default_value_t = 1_000_000)]
    enriched_keys: usize,
    /// Internal: calls in the fake API's call list, with `--fake-api`.
    #[arg(long = "list-calls", hide = true, default_value_t = 0)]
    list_calls: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run the raw pipe (BROKERS INPUT OUTPUT GROUP LIMIT [KEY=VALUE]...).
    #[arg(long, hide = true, num_args = 5.., allow_hyphen_values = true)]
    raw_pipe: Option<Vec<String>>,
    /// Internal: serve the fake Uincall API (prints its address on stdout).
    #[arg(long, hide = true)]
    fake_api: bool,
    /// Internal: the fake API's latency in milliseconds, with `--fake-api`.
    #[arg(long = "latency-ms", hide = true, default_value_t = 0)]
    latency_ms: u64,
    /// Internal: a tenant whose token the fake API accepts, with
    /// `--fake-api`; repeatable.
    #[arg(long = "api-tenant", hide = true, default_values_t = [TENANT.to_string()])]
    api_tenants: Vec<String>,
}

fn point(s: &str) -> Result<(usize, u64), String> {
    let parsed = s
        .split_once('/')
        .and_then(|(w, l)| Some((w.parse().ok()?, l.parse().ok()?)));
    parsed.ok_or_else(|| format!("`{s}` is not WINDOW/LATENCY_MS"))
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
struct Measured {
    events: usize,
    rate: f64,
    cpu_ms_per_1000: f64,
    /// CPU seconds per second over the measured stretch.
    cpu_cores: f64,
    broker_cpu_cores: f64,
    /// The fake API's process (none in a raw run).
    api_cpu_cores: Option<f64>,
    /// This process: seeding, pacing and reading back.
    harness_cpu_cores: f64,
    peak_rss_mib: f64,
    /// API calls made for the backlog, per input record.
    api_calls_per_record: Option<f64>,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_samples: usize,
}

#[derive(Debug, Clone)]
struct Point {
    window: usize,
    latency_ms: u64,
    /// `kafka.delivery`.
    delivery: String,
    worker: Measured,
    raw: Option<Measured>,
}

/// The theoretical rate of `window` calls at once, each `latency_ms` long.
fn w_over_l(window: usize, latency_ms: u64) -> f64 {
    if latency_ms == 0 {
        f64::INFINITY
    } else {
        window as f64 * 1000.0 / latency_ms as f64
    }
}

impl Point {
    fn w_over_l(&self) -> f64 {
        w_over_l(self.window, self.latency_ms)
    }

    fn limit(&self) -> f64 {
        self.raw
            .as_ref()
            .map_or(self.w_over_l(), |r| r.rate.min(self.w_over_l()))
    }
}

/// What to start for a run.
enum Subject {
    Worker {
        window: usize,
        latency_ms: u64,
        exactly_once: bool,
    },
    Raw {
        limit: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(raw) = &args.raw_pipe {
        return rt.block_on(raw_pipe(raw));
    }
    if let Some(url) = &args.push_load {
        return rt.block_on(ingest::push_load(url, args.push_rate, args.push_seconds));
    }
    if args.fake_api {
        return rt.block_on(serve_fake_api(
            args.latency_ms,
            &args.api_tenants,
            args.list_calls,
        ));
    }
    if !args.bench {
        println!("sweep: a benchmark, run it with `cargo bench --bench sweep`");
        return Ok(());
    }
    rt.block_on(async {
        // Interrupted, the sweep is dropped: its children and the broker
        // are stopped on the way out.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            r = sweep(args) => r,
            _ = term.recv() => bail!("terminated"),
            _ = int.recv() => bail!("interrupted"),
        }
    })
}

async fn sweep(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let broker = KafkaCluster::start(1).context("starting the Apache Kafka broker")?;
    let bootstrap = broker.bootstrap();
    let broker_pid = broker.pid(0).context("the broker's JVM is not running")?;
    eprintln!(
        "broker {bootstrap} ({}, one KRaft node, JVM pid {broker_pid}), results in {}",
        kafka_version(),
        args.out.display()
    );
    let ctx = Ctx {
        bootstrap: &bootstrap,
        broker_pid,
        args: &args,
    };
    if args.tenants {
        return tenants::run(&ctx).await;
    }
    if args.ingest {
        return ingest::run(&ctx).await;
    }
    if args.backfill {
        return backfill::run(&ctx).await;
    }

    if !args.no_warmup {
        ctx.warm_up().await?;
    }
    let raw = ctx.raw_limits().await?;
    let points = ctx.measure_points(&raw).await?;
    write_results(&args.out, &points)?;
    plot(
        &args.out.join("throughput.svg"),
        &points,
        &args.latencies_ms,
    )?;
    print!("{}", std::fs::read_to_string(args.out.join("results.md"))?);
    Ok(())
}

/// The worker binary: this build's, or `SWEEP_WORKER_BIN` (another build,
/// to compare two versions on the same broker and machine).
fn worker_binary() -> PathBuf {
    std::env::var_os("SWEEP_WORKER_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_uincall-enricher")),
        PathBuf::from,
    )
}

struct Ctx<'a> {
    bootstrap: &'a str,
    broker_pid: u32,
    args: &'a Args,
}

/// The sweep's steps.
impl Ctx<'_> {
    /// An unmeasured point that warms the broker's JVM.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let warmup = Subject::Worker {
            window: 256,
            latency_ms: 0,
            exactly_once: false,
        };
        let m = self
            .run("warmup", 30_000.0 / self.args.seconds, warmup)
            .await;
        let m = m.context("the warm-up point")?;
        eprintln!("warm-up (not measured): {}", m.summary());
        Ok(())
    }

    /// The raw pipe at each window, unless `--no-raw`.
    async fn raw_limits(&self) -> anyhow::Result<HashMap<usize, Measured>> {
        let mut raw = HashMap::new();
        if self.args.no_raw {
            return Ok(raw);
        }
        for &w in &self.args.windows {
            let limit = admitted_limit(w);
            let expected = (limit as f64 * 1000.0 / 20.0).min(6000.0);
            let m = self
                .run(&format!("raw-w{w}"), expected, Subject::Raw { limit })
                .await
                .with_context(|| format!("raw pipe, window {w}"))?;
            eprintln!("raw  window {w:>4}: {}", m.summary());
            raw.insert(w, m);
        }
        Ok(raw)
    }

    /// The worker at each point: `--points`, else every window at every
    /// latency.
    async fn measure_points(&self, raw: &HashMap<usize, Measured>) -> anyhow::Result<Vec<Point>> {
        let args = self.args;
        let every = (args.latencies_ms.iter())
            .flat_map(|&l| args.windows.iter().map(move |&w| (w, l)))
            .collect();
        let measured = match args.points.is_empty() {
            true => every,
            false => args.points.clone(),
        };
        let mut points = Vec::new();
        let runs =
            (measured.into_iter()).flat_map(|(w, l)| args.delivery.iter().map(move |d| (w, l, d)));
        for (w, l, delivery) in runs {
            let expected = raw.get(&w).map_or(6000.0, |r| r.rate).min(w_over_l(w, l));
            let exactly_once = delivery == "exactly_once";
            let subject = Subject::Worker {
                window: w,
                latency_ms: l,
                exactly_once,
            };
            let tag = format!("w{w}-l{l}{}", if exactly_once { "-eos" } else { "" });
            let m = (self.run(&tag, expected, subject).await)
                .with_context(|| format!("worker, window {w}, latency {l} ms, {delivery}"))?;
            let p = Point {
                window: w,
                latency_ms: l,
                delivery: delivery.clone(),
                worker: m,
                raw: raw.get(&w).cloned(),
            };
            eprintln!(
                "worker window {w:>4} latency {l:>3} ms {delivery}: {} ({:.0} % of the limit)",
                p.worker.summary(),
                100.0 * p.worker.rate / p.limit()
            );
            points.push(p);
        }
        Ok(points)
    }

    /// Seeds a point's input topic, starts the subject on it and measures.
    async fn run(
        &self,
        tag: &str,
        expected_rate: f64,
        subject: Subject,
    ) -> anyhow::Result<Measured> {
        let (input, output, dlq) = (
            format!("{tag}-in"),
            format!("{tag}-out"),
            format!("{tag}-dlq"),
        );
        testkit::create_topics(
            self.bootstrap,
            &[(&input, PARTITIONS), (&output, PARTITIONS), (&dlq, 1)],
        )
        .await?;
        let n = ((expected_rate * self.args.seconds) as usize)
            .clamp(self.args.min_events, self.args.max_events);
        let sessions = sessions(tag, n, self.args.duplicates);
        testkit::produce(
            self.bootstrap,
            &input,
            sessions.iter().map(|s| event(s, TENANT)),
        )
        .await?;

        let mut reader = Reader::start(self.bootstrap, &output)?;
        reader.wait_ready(self.bootstrap, &output).await?;
        let log = std::fs::File::create(self.args.out.join(format!("{tag}.log")))?;
        let group = format!("{tag}-group");
        let (api, counter, base_url) = match &subject {
            Subject::Worker { latency_ms, .. } => {
                let (api, counter) = self.start_api(tag, *latency_ms).await?;
                let base_url = counter.base_url();
                (Some(api), Some(counter), base_url)
            }
            Subject::Raw { .. } => (None, None, String::new()),
        };
        let topics = [input.as_str(), &output, &dlq, &group];
        let mut command = self.subject_command(tag, &subject, topics, &base_url)?;
        command
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        let what = match &subject {
            Subject::Worker { .. } => "the worker",
            Subject::Raw { .. } => "the raw pipe",
        };
        let mut running = Running {
            subject: Proc::spawn(what, command)?,
            apis: api.into_iter().collect(),
        };
        let result = (self.measure(&mut running, reader, &input, n, counter.as_ref())).await;
        // The subject first, then the API it calls.
        running.stop();
        result
    }

    /// The command of a point's subject, on the topics and group `[input,
    /// output, dead letters, group]`; the worker calls `base_url`.
    fn subject_command(
        &self,
        tag: &str,
        subject: &Subject,
        topics @ [input, output, _, group]: [&str; 4],
        base_url: &str,
    ) -> anyhow::Result<Command> {
        Ok(match subject {
            Subject::Worker {
                window,
                exactly_once,
                ..
            } => {
                let config = self.config_file(tag, toml::Table::new())?;
                let mut c = self.worker_command(&config, topics, base_url, *window);
                // Set only when asked, as `--api-http2`.
                if *exactly_once {
                    c.env("UINCALL__KAFKA__DELIVERY", "exactly_once");
                }
                c
            }
            Subject::Raw { limit } => {
                let mut c = Command::new(std::env::current_exe()?);
                let properties =
                    (self.args.kafka_properties.iter()).map(|(k, v)| format!("{k}={v}"));
                c.arg("--raw-pipe")
                    .args([self.bootstrap, input, output, group, &limit.to_string()])
                    .args(properties);
                c
            }
        })
    }

    /// The worker on `config` (a settings file) and the topics and group
    /// `[input, output, dead letters, group]`, calling `base_url` with
    /// `window` calls at once.
    fn worker_command(
        &self,
        config: &Path,
        [input, output, dlq, group]: [&str; 4],
        base_url: &str,
        window: usize,
    ) -> Command {
        let mut c = Command::new(worker_binary());
        c.arg("--config").arg(config).arg("run").envs([
            ("UINCALL__KAFKA__BROKERS", self.bootstrap.to_string()),
            ("UINCALL__KAFKA__INPUT_TOPIC", input.to_string()),
            ("UINCALL__KAFKA__OUTPUT_TOPIC", output.to_string()),
            ("UINCALL__KAFKA__DEAD_LETTER_TOPIC", dlq.to_string()),
            ("UINCALL__KAFKA__GROUP_ID", group.to_string()),
            ("UINCALL__API__BASE_URL", base_url.to_string()),
            (
                &format!("UINCALL__API__TOKENS__{TENANT}"),
                TOKEN.to_string(),
            ),
            ("UINCALL__PIPELINE__MAX_IN_FLIGHT", window.to_string()),
            ("UINCALL__HTTP__LISTEN", "127.0.0.1:0".to_string()),
            (
                "UINCALL__LOG__LEVEL",
                std::env::var("SWEEP_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]);
        // Set only when asked: an older build measured beside this one
        // may not know the setting.
        if self.args.api_http2 {
            c.env("UINCALL__API__HTTP2", "prior_knowledge");
        }
        c
    }

    /// Starts the point's API (`--api`) at `latency_ms`.
    async fn start_api(&self, tag: &str, latency_ms: u64) -> anyhow::Result<(Proc, ApiCounter)> {
        if self.args.api == "fake" {
            let (api, base_url) = self.start_fake_api(tag, latency_ms, &[TENANT]).await?;
            return Ok((api, ApiCounter::Fake(base_url)));
        }
        let http2 = self.args.api_http2;
        let (api, nginx) = nginx::Nginx::start(&self.args.out, tag, latency_ms, http2)?;
        Ok((api, ApiCounter::Nginx(nginx)))
    }

    /// Starts the fake Uincall API in its own process (this binary with
    /// `--fake-api`), accepting `tenants`' token, and reads the address it
    /// serves on; returns it with its base URL.
    async fn start_fake_api(
        &self,
        tag: &str,
        latency_ms: u64,
        tenants: &[&str],
    ) -> anyhow::Result<(Proc, String)> {
        self.start_fake_api_with(tag, latency_ms, tenants, 0).await
    }

    /// [`Ctx::start_fake_api`] with `list_calls` calls in its call list.
    async fn start_fake_api_with(
        &self,
        tag: &str,
        latency_ms: u64,
        tenants: &[&str],
        list_calls: usize,
    ) -> anyhow::Result<(Proc, String)> {
        let log_path = self.args.out.join(format!("{tag}-api.log"));
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["--fake-api", "--latency-ms", &latency_ms.to_string()])
            .args(["--list-calls", &list_calls.to_string()])
            .args(tenants.iter().flat_map(|t| ["--api-tenant", t]))
            // Held open by `Proc`: the fake API exits when it closes.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log_path)?);
        let mut api = Proc::spawn("the fake API", command)?;
        let stdout = api.child.stdout.take().context("the fake API's stdout")?;
        // On a time-out `api` is dropped, which kills the process and ends
        // this blocking read.
        let (line, stdout) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                // Nothing follows the address unasked (`api_calls`): the
                // reader buffers nothing past it.
                let mut reader = std::io::BufReader::new(stdout);
                reader
                    .read_line(&mut line)
                    .map(|_| (line, reader.into_inner()))
            }),
        )
        .await
        .context("the fake API printed no address within 30 s")???;
        api.child.stdout = Some(stdout);
        let addr: SocketAddr = line.trim().parse().with_context(|| {
            format!(
                "the fake API printed {line:?}, not its address (see {})",
                log_path.display()
            )
        })?;
        Ok((api, format!("http://{addr}")))
    }

    /// A settings file: `root`, with `--kafka-property` as `kafka.properties`.
    fn config_file(&self, tag: &str, mut root: toml::Table) -> anyhow::Result<PathBuf> {
        let props: toml::Table = self
            .args
            .kafka_properties
            .iter()
            .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
            .collect();
        let mut kafka = toml::Table::new();
        kafka.insert("properties".into(), toml::Value::Table(props));
        root.insert("kafka".into(), toml::Value::Table(kafka));
        let path = self.args.out.join(format!("{tag}.toml"));
        std::fs::write(&path, toml::to_string(&root)?)?;
        Ok(path)
    }

    async fn measure(
        &self,
        running: &mut Running,
        mut reader: Reader,
        input: &str,
        n: usize,
        counter: Option<&ApiCounter>,
    ) -> anyhow::Result<Measured> {
        let pid = running.subject.pid().to_string();
        let broker = self.broker_pid.to_string();
        let api = running.apis.first().map(|a| a.pid().to_string());
        let (n5, n95) = ((n / 20).max(1), (n * 19 / 20).max(2));
        let sample = || {
            (
                Instant::now(),
                cpu_seconds(&pid),
                cpu_seconds(&broker),
                api.as_deref().map(cpu_seconds),
                cpu_seconds("self"),
            )
        };
        let mut at5 = None;
        let mut at95 = None;
        let mut seen = 0;
        while seen < n {
            let Some(_) = reader.next(running).await? else {
                bail!("no output for {IDLE_LIMIT:?} after {seen} of {n} records");
            };
            seen += 1;
            if seen == n5 {
                at5 = Some(sample());
            }
            if seen == n95 {
                at95 = Some(sample());
            }
        }
        let api_calls = ApiCounter::calls_of(counter, running).await?;
        let ((t0, c0, b0, a0, h0), (t1, c1, b1, a1, h1)) = (at5.unwrap(), at95.unwrap());
        let records = (n95 - n5) as f64;
        let secs = (t1 - t0).as_secs_f64();
        let rate = records / secs;
        let mut m = Measured {
            events: n,
            rate,
            cpu_ms_per_1000: (c1 - c0) * 1000.0 * 1000.0 / records,
            cpu_cores: (c1 - c0) / secs,
            broker_cpu_cores: (b1 - b0) / secs,
            api_cpu_cores: a0.zip(a1).map(|(a0, a1)| (a1 - a0) / secs),
            harness_cpu_cores: (h1 - h0) / secs,
            api_calls_per_record: api_calls.map(|c| c as f64 / n as f64),
            ..Measured::default()
        };

        let (p50, p99, samples) = self.latency(running, &mut reader, input, rate).await?;
        m.latency_p50_ms = p50;
        m.latency_p99_ms = p99;
        m.latency_samples = samples;
        m.peak_rss_mib = peak_rss_mib(&pid);
        Ok(m)
    }

    /// Latency below saturation: events at half the measured `rate`, sent
    /// → enriched record read back; p50, p99 and the samples, in ms.
    async fn latency(
        &self,
        running: &mut Running,
        reader: &mut Reader,
        input: &str,
        rate: f64,
    ) -> anyhow::Result<(f64, f64, usize)> {
        let paced_rate = (rate / 2.0).max(0.5);
        let count = ((paced_rate * self.args.paced_seconds) as usize).clamp(20, 20_000);
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let pacer = tokio::spawn(pace(
            self.bootstrap.to_string(),
            input.to_string(),
            count,
            paced_rate,
            sent.clone(),
        ));
        let mut latencies = Vec::with_capacity(count);
        while latencies.len() < count {
            let Some((key, at)) = reader.next(running).await? else {
                bail!("no output for {IDLE_LIMIT:?} in the latency run");
            };
            if let Some(t) = sent.lock().unwrap().remove(&key) {
                latencies.push((at - t).as_secs_f64() * 1000.0);
            }
        }
        pacer.await??;
        latencies.sort_by(f64::total_cmp);
        let p = |q| percentile(&latencies, q);
        Ok((p(0.50), p(0.99), latencies.len()))
    }
}

/// The API of a worker's point, and how to count the calls it served.
enum ApiCounter {
    /// The fake API at this base URL: the first of the run's APIs.
    Fake(String),
    Nginx(nginx::Nginx),
}

impl ApiCounter {
    fn base_url(&self) -> String {
        match self {
            ApiCounter::Fake(url) => url.clone(),
            ApiCounter::Nginx(n) => n.base_url(),
        }
    }

    /// The calls `counter`'s API served so far; none without one.
    async fn calls_of(
        counter: Option<&Self>,
        running: &mut Running,
    ) -> anyhow::Result<Option<u64>> {
        Ok(Some(match counter {
            None => return Ok(None),
            Some(ApiCounter::Fake(_)) => api_calls(&mut running.apis[0])?,
            // The status request counts itself.
            Some(ApiCounter::Nginx(n)) => n.requests().await? - 1,
        }))
    }
}

/// The sessions of `n` events of the point `tag`: a share `duplicates` of
/// them repeats the session of one of the 6 000 events before it.
fn sessions(tag: &str, n: usize, duplicates: f64) -> Vec<String> {
    const SPREAD: usize = 6_000;
    // A fixed sequence, the same for every build measured.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        let repeat = i > 0 && ((next() % 1_000_000) as f64) < duplicates * 1_000_000.0;
        let session = if repeat {
            out[i - 1 - (next() as usize % i.min(SPREAD))].clone()
        } else {
            format!("{tag}-{i:07}")
        };
        out.push(session);
    }
    out
}

fn event(session: &str, tenant: &str) -> (Option<Vec<u8>>, Vec<u8>) {
    let v = serde_json::json!({"session_id": session, "tenant_id": tenant});
    (
        Some(session.as_bytes().to_vec()),
        v.to_string().into_bytes(),
    )
}

/// Produces `count` events at `rate` per second, noting when each was sent.
async fn pace(
    bootstrap: String,
    topic: String,
    count: usize,
    rate: f64,
    sent: Arc<Mutex<HashMap<String, Instant>>>,
) -> anyhow::Result<()> {
    let producer: FutureProducer = testkit::client_config(&bootstrap)
        .set("linger.ms", "5")
        .create()?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = FuturesUnordered::new();
    for i in 0..count {
        tick.tick().await;
        let (key, payload) = event(&format!("{topic}-paced-{i:07}"), TENANT);
        let key = String::from_utf8(key.unwrap())?;
        sent.lock().unwrap().insert(key.clone(), Instant::now());
        let producer = producer.clone();
        let topic = topic.clone();
        acks.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(e, _)| e)
        });
        while let Some(Some(r)) = futures::FutureExt::now_or_never(acks.next()) {
            r?;
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(())
}

/// Reads a topic from the beginning on its own thread: each record's key
/// and when it was read.
struct Reader {
    rx: mpsc::UnboundedReceiver<(String, Instant)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn start(bootstrap: &str, topic: &str) -> anyhow::Result<Reader> {
        let consumer: BaseConsumer = testkit::client_config(bootstrap)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let at = Instant::now();
                        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                        if tx.send((key, at)).is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => eprintln!("reader: {e}"),
                    None => {}
                }
            }
        });
        Ok(Reader {
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until the reader is fetching every partition: a probe record
    /// written to each, before the subject starts, has come back. Without
    /// it a subject that writes its output fast (the raw pipe, with the
    /// group coordinator warm) can be done before the reader has fetched
    /// at all, and its output is then read as one burst: seen with Apache
    /// Kafka, a raw run at about 4 000 records/s measured at 67 000 to
    /// 290 000, with its CPU over a few milliseconds.
    async fn wait_ready(&mut self, bootstrap: &str, topic: &str) -> anyhow::Result<()> {
        let producer: FutureProducer = testkit::client_config(bootstrap).create()?;
        for p in 0..PARTITIONS {
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(p)
                        .key(PROBE)
                        .payload("{}"),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut probes = 0;
        while probes < PARTITIONS {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((key, _))) if key == PROBE => probes += 1,
                Ok(Some((key, _))) => bail!("{topic} has {key:?} before the subject started"),
                Ok(None) => bail!("the reader stopped"),
                Err(_) => bail!("the reader read {probes} of {PARTITIONS} probes within 60 s"),
            }
        }
        Ok(())
    }

    /// The next record read, or `None` after `IDLE_LIMIT` without one; an
    /// error when the subject or the fake API exited.
    async fn next(&mut self, running: &mut Running) -> anyhow::Result<Option<(String, Instant)>> {
        let deadline = Instant::now() + IDLE_LIMIT;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), self.rx.recv()).await {
                Ok(Some(r)) => return Ok(Some(r)),
                Ok(None) => bail!("the reader stopped"),
                Err(_) => {
                    running.check()?;
                    if Instant::now() > deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process of the sweep (the worker, the raw pipe or the fake API):
/// stopped when dropped, so on every path out of a point, an error and an
/// interrupted sweep included; killed by the kernel (`PR_SET_PDEATHSIG`)
/// when the sweep dies without unwinding.
struct Proc {
    what: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(what: &'static str, mut command: Command) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe, and the closure
        // neither allocates nor touches memory of ours.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The sweep died before the prctl: no signal would come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc { what, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error when the process has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.what);
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 30 s.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: a plain syscall; the child is not reaped yet, so its pid
        // is still its own.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within 30 s of SIGTERM: killed", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The processes of one run: the subject and, for the worker, the fake
/// API (one per API the worker calls).
struct Running {
    subject: Proc,
    apis: Vec<Proc>,
}

impl Running {
    /// An error when any of them has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        self.subject.check()?;
        for api in &mut self.apis {
            api.check()?;
        }
        Ok(())
    }

    /// Stops the subject, then the fake APIs.
    fn stop(&mut self) {
        self.subject.stop();
        for api in &mut self.apis {
            api.stop();
        }
    }
}

/// The calls a fake API process (`--fake-api`) has received so far: it
/// answers each line on its stdin with the count.
fn api_calls(api: &mut Proc) -> anyhow::Result<u64> {
    let child = &mut api.child;
    let stdin = child.stdin.as_mut().context("the fake API's stdin")?;
    stdin.write_all(b"calls\n")?;
    stdin.flush()?;
    let stdout = child.stdout.as_mut().context("the fake API's stdout")?;
    // Byte by byte: nothing past the line may be buffered away.
    let mut line = Vec::new();
    let mut byte = [0u8];
    while std::io::Read::read(stdout, &mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8(line)?.trim().parse()?)
}

/// `--fake-api`: serves the fake Uincall API with `latency_ms`, accepting
/// `TOKEN` for `tenants`, prints its address on stdout and serves until
/// SIGTERM or until stdin closes (the sweep holds it open). Each line read
/// on stdin is answered on stdout with the calls received so far.
async fn serve_fake_api(
    latency_ms: u64,
    tenants: &[String],
    list_calls: usize,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let api = Arc::new(
        FakeApi::start(FakeApiConfig {
            latency: Duration::from_millis(latency_ms),
            tokens: (tenants.iter())
                .map(|t| (t.clone(), TOKEN.to_string()))
                .collect(),
        })
        .await?,
    );
    if list_calls > 0 {
        for tenant in tenants {
            api.set_calls(tenant, backfill::list_calls(list_calls));
        }
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", api.addr())?;
        out.flush()?;
    }
    let counted = api.clone();
    std::thread::spawn(move || {
        for _ in std::io::stdin().lines().map_while(Result::ok) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", counted.total_calls());
            let _ = out.flush();
        }
        std::process::exit(0);
    });
    term.recv().await;
    drop(api);
    Ok(())
}

/// `--kafka-property` as the binary reads them: `UINCALL__KAFKA__PROPERTIES__…`.
fn kafka_property_vars(args: &Args) -> Vec<(String, String)> {
    (args.kafka_properties.iter())
        .map(|(k, v)| {
            let key = k.to_uppercase().replace('.', "_");
            (format!("UINCALL__KAFKA__PROPERTIES__{key}"), v.clone())
        })
        .collect()
}

/// Produces `n` records, `record(i)` giving key and value, at most
/// `in_flight` awaiting acknowledgement; the first error ends it.
async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    n: usize,
    in_flight: usize,
    record: impl Fn(usize) -> (String, String),
) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        if pending.len() >= in_flight
            && let Some(r) = pending.next().await
        {
            r?;
        }
        let (key, value) = record(i);
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&value),
                    Timeout::Never,
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))
        });
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// User + system CPU seconds of a process (`self` or a pid).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5), in clock ticks.
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

/// Asked once: the samples are taken while the subject runs, and a
/// `getconf` each time would be this process's CPU inside the stretch.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output();
        out.ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `NAME: N kB` line of a /proc file, in MiB.
fn proc_mib(path: &str, name: &str) -> Option<f64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// Peak resident memory of a process in MiB (VmHWM).
fn peak_rss_mib(pid: &str) -> f64 {
    proc_mib(&format!("/proc/{pid}/status"), "VmHWM").unwrap_or(0.0)
}

impl Measured {
    fn summary(&self) -> String {
        format!(
            "{} events, {:.0} records/s, {:.0} ms CPU per 1 000 ({:.2} cores; broker {:.2}, API {}, harness {:.2}), \
             latency p50 {:.1} ms p99 {:.1} ms ({} samples), peak RSS {:.1} MiB, API calls per record {}",
            self.events,
            self.rate,
            self.cpu_ms_per_1000,
            self.cpu_cores,
            self.broker_cpu_cores,
            self.api_cpu_cores
                .map_or("—".to_string(), |c| format!("{c:.2}")),
            self.harness_cpu_cores,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_samples,
            self.peak_rss_mib,
            self.api_calls_per_record
                .map_or("—".to_string(), |c| format!("{c:.3}")),
        )
    }
}

fn write_results(dir: &Path, points: &[Point]) -> anyhow::Result<()> {
    let mut csv = std::fs::File::create(dir.join("results.csv"))?;
    writeln!(
        csv,
        "latency_ms,window,events,records_per_s,w_over_l,raw_records_per_s,ratio_to_limit,\
         p50_ms,p99_ms,cpu_ms_per_1000,raw_cpu_ms_per_1000,worker_cores,broker_cores,api_cores,harness_cores,peak_rss_mib,raw_peak_rss_mib,api_calls_per_record,delivery"
    )?;
    let mut md = machine();
    md.push_str(
        "| API latency | window | delivery | events | records/s | W/L | raw limit | ratio to min | p50 | p99 | worker CPU / 1 000 | raw CPU / 1 000 | cores: worker / broker / API / harness | peak RSS | API calls / record |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let w = &p.worker;
        let raw_rate = p.raw.as_ref().map(|r| r.rate);
        let raw_cpu = p.raw.as_ref().map(|r| r.cpu_ms_per_1000);
        writeln!(
            csv,
            "{},{},{},{:.1},{:.1},{},{:.3},{:.1},{:.1},{:.1},{},{:.2},{:.2},{},{:.2},{:.1},{},{},{}",
            p.latency_ms,
            p.window,
            w.events,
            w.rate,
            p.w_over_l(),
            raw_rate.map_or(String::new(), |r| format!("{r:.1}")),
            w.rate / p.limit(),
            w.latency_p50_ms,
            w.latency_p99_ms,
            w.cpu_ms_per_1000,
            raw_cpu.map_or(String::new(), |r| format!("{r:.1}")),
            w.cpu_cores,
            w.broker_cpu_cores,
            w.api_cpu_cores.map_or(String::new(), |c| format!("{c:.2}")),
            w.harness_cpu_cores,
            w.peak_rss_mib,
            p.raw
                .as_ref()
                .map_or(String::new(), |r| format!("{:.1}", r.peak_rss_mib)),
            w.api_calls_per_record
                .map_or(String::new(), |c| format!("{c:.3}")),
            p.delivery,
        )?;
        md.push_str(&format!(
            "| {} ms | {} | {} | {} | {:.0} | {} | {} | {:.0} % | {:.0} ms | {:.0} ms | {:.0} ms | {} | {:.2} / {:.2} / {} / {:.2} | {:.0} MiB | {} |\n",
            p.latency_ms,
            p.window,
            p.delivery.replace('_', " "),
            w.events,
            w.rate,
            if p.latency_ms == 0 { "∞".to_string() } else { format!("{:.0}", p.w_over_l()) },
            raw_rate.map_or("—".to_string(), |r| format!("{r:.0}")),
            100.0 * w.rate / p.limit(),
            w.latency_p50_ms,
            w.latency_p99_ms,
            w.cpu_ms_per_1000,
            raw_cpu.map_or("—".to_string(), |r| format!("{r:.0} ms")),
            w.cpu_cores,
            w.broker_cpu_cores,
            w.api_cpu_cores
                .map_or("—".to_string(), |c| format!("{c:.2}")),
            w.harness_cpu_cores,
            w.peak_rss_mib,
            w.api_calls_per_record
                .map_or("—".to_string(), |c| format!("{c:.2}")),
        ));
    }
    std::fs::write(dir.join("results.md"), md)?;
    Ok(())
}

/// The machine and versions the figures were measured on.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = proc_mib("/proc/meminfo", "MemTotal").map_or(0.0, |mib| mib / 1024.0);
    let output = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "Machine: {cores} cores ({model}), {memory:.0} GiB; {}; broker {} (one KRaft node); commit {}\n\n",
        output("uname", &["-sr"]),
        kafka_version(),
        output("git", &["rev-parse", "--short", "HEAD"]),
    )
}

/// "Apache Kafka VERSION", the version read from the broker's jar
/// (`kafka_SCALA-VERSION.jar` in `testkit::kafka_lib`).
fn kafka_version() -> String {
    let version = testkit::kafka_lib()
        .ok()
        .and_then(|lib| std::fs::read_dir(lib).ok())
        .and_then(|entries| {
            entries.filter_map(Result::ok).find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (_, version) = name.strip_prefix("kafka_")?.split_once('-')?;
                version.strip_suffix(".jar").map(str::to_string)
            })
        })
        .unwrap_or_else(|| "(version unknown)".to_string());
    format!("Apache Kafka {version}")
}

/// Throughput against window, one line per latency, with W/L and the raw
/// limit as dashed lines.
fn plot(path: &Path, points: &[Point], latencies: &[u64]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let max_rate = points
        .iter()
        .flat_map(|p| [p.worker.rate, p.raw.as_ref().map_or(0.0, |r| r.rate)])
        .fold(1.0, f64::max);
    let windows: Vec<usize> = {
        let mut w: Vec<usize> = points.iter().map(|p| p.window).collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    let (lo, hi) = (
        *windows.first().unwrap_or(&1) as f64,
        *windows.last().unwrap_or(&1024) as f64,
    );
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "enriched records/s against in-flight window",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (lo.max(1.0) * 0.8..hi * 1.25).log_scale(),
            (1.0..max_rate * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("pipeline.max_in_flight (log scale)")
        .y_desc("records/s (log scale)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, &l) in latencies.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let series: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.latency_ms == l)
            .map(|p| (p.window as f64, p.worker.rate))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), colour.stroke_width(2)))?
            .label(format!("worker, API latency {l} ms"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
        chart.draw_series(series.iter().map(|&xy| Circle::new(xy, 4, colour.filled())))?;
        if l > 0 {
            let ideal: Vec<(f64, f64)> = windows
                .iter()
                .map(|&w| (w as f64, w_over_l(w, l).min(max_rate * 2.0)))
                .collect();
            chart
                .draw_series(DashedLineSeries::new(
                    ideal,
                    6,
                    4,
                    colour.mix(0.5).stroke_width(1),
                ))?
                .label(format!("W/L at {l} ms"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.mix(0.5)));
        }
    }
    let raw: Vec<(f64, f64)> = windows
        .iter()
        .filter_map(|&w| {
            points
                .iter()
                .find(|p| p.window == w)
                .and_then(|p| p.raw.as_ref())
                .map(|r| (w as f64, r.rate))
        })
        .collect();
    if !raw.is_empty() {
        chart
            .draw_series(DashedLineSeries::new(raw, 3, 3, BLACK.stroke_width(2)))?
            .label("raw consume + produce (no HTTP)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The raw pipeline: consume, produce an enriched-sized record, store the
/// offset once acknowledged; the worker's Kafka settings, no HTTP.
async fn raw_pipe(args: &[String]) -> anyhow::Result<()> {
    let [brokers, input, output, group, limit, properties @ ..] = args else {
        bail!("--raw-pipe BROKERS INPUT OUTPUT GROUP LIMIT [KEY=VALUE]...");
    };
    let limit: usize = limit.parse()?;
    let mut k = Settings::load_from(None, Vec::new())?.kafka;
    k.brokers = brokers.clone();
    k.group_id = group.clone();
    for p in properties {
        let (key, value) = key_value(p).map_err(anyhow::Error::msg)?;
        k.properties.insert(key, value);
    }
    let consumer: StreamConsumer = kafka::consumer_config(&k).create()?;
    let producer: FutureProducer = kafka::producer_config(&k, None).create()?;
    consumer.subscribe(&[input])?;
    let payload = sample_enriched();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tracker = OffsetTracker::default();
    // Never cancelled: the raw pipe has no rebalance handling.
    let records = CancellationToken::new();
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            Some((p, o, id, sent)) = pending.next(), if !pending.is_empty() => {
                let () = sent?;
                if let Some(next) = tracker.finish(input, p, o, id) {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(input, p, Offset::Offset(next))?;
                    consumer.store_offsets(&tpl)?;
                }
            }
            m = consumer.recv(), if pending.len() < limit => {
                let m = m?;
                let (p, o) = (m.partition(), m.offset());
                // Nothing restored here: every record runs.
                let Start::Run(ticket) = tracker.start(input, p, o, &records) else {
                    continue;
                };
                let id = ticket.id;
                let key = m.key().unwrap_or_default().to_vec();
                let (producer, payload, output) = (producer.clone(), payload.clone(), output.clone());
                pending.push(async move {
                    let sent = producer
                        .send(
                            FutureRecord::to(&output).key(&key).payload(payload.as_slice()),
                            Timeout::After(Duration::from_secs(30)),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| anyhow::Error::new(e));
                    (p, o, id, sent)
                });
            }
        }
    }
    Ok(())
}

/// An enriched record as the worker writes it for a fake API answer.
fn sample_enriched() -> Arc<Vec<u8>> {
    let data = fake_api::sample_record("raw-0000000", true, None);
    let call = CallDetail::from_data(&data)
        .expect("the fake API's record parses")
        .expect("the fake API's record has data");
    let event = serde_json::json!({"session_id": "raw-0000000", "tenant_id": TENANT});
    let source = record::Source {
        topic: "in".into(),
        partition: 0,
        offset: 0,
        timestamp_ms: Some(0),
    };
    Arc::new(record::to_json(&record::Inputs {
        session_id: "raw-0000000",
        tenant_id: TENANT,
        event: &event,
        call: &call,
        satisfaction_labels: &Default::default(),
        fetched_at: chrono::Utc::now(),
        attempts: 1,
        api_latency: Duration::ZERO,
        source: &source,
        reused: None,
    }))
}
