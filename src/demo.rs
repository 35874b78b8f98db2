//! `uincall-enricher demo`: the real worker on embedded defaults, against
//! librdkafka's in-process mock Kafka cluster and the local fake Uincall API.
//! Seeds sample call-ended events (some with transient and permanent API
//! errors, some invalid), runs the worker until every event is accounted
//! for, then prints an enriched record, the dead letters and a summary.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{ErrorClass, header as dlq};
use crate::fake_api::{ERRCODE_NOT_FOUND, FakeApi, FakeApiConfig};
use crate::pipeline::Worker;
use crate::settings::{LogFormat, LogSettings, Settings};
use crate::stats::Stats;
use crate::telemetry;
use crate::topics;

pub const DEMO_TENANT: &str = "demo-tenant";
const DEMO_TOKEN: &str = "demo-token-not-a-secret";

/// Options of `uincall-enricher demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Number of sample call-ended events (three invalid ones are added).
    #[arg(long, default_value_t = 200)]
    pub events: usize,
    /// Latency of the fake API per call, in milliseconds.
    #[arg(long = "api-latency-ms", default_value = "20", value_name = "MS", value_parser = parse_millis)]
    pub api_latency: Duration,
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    s.parse()
        .map(Duration::from_millis)
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))
}

/// The sample events: mostly plain calls, some that the fake API answers
/// with transient or permanent errors, and three invalid ones.
pub fn sample_events(n: usize) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut events = Vec::with_capacity(n + 3);
    for i in 0..n {
        let session = match i % 50 {
            0..=4 => format!("transient2-{i:06}"),
            5 => format!("permanent-{i:06}"),
            6 => format!("http500-{i:06}"),
            7 => format!("garbage-{i:06}"),
            _ => format!("call-{i:06}"),
        };
        let payload = serde_json::json!({
            "event": "call_ended",
            "session_id": session,
            "tenant_id": DEMO_TENANT,
            "ended_at": "2026-11-23T10:00:00+08:00",
        });
        events.push((Some(session.into_bytes()), payload.to_string().into_bytes()));
    }
    events.push((None, b"this is not JSON".to_vec()));
    events.push((None, br#"{"tenant_id":"demo-tenant"}"#.to_vec()));
    events.push((
        Some(b"call-x".to_vec()),
        br#"{"session_id":"call-x","tenant_id":"tenant-without-token"}"#.to_vec(),
    ));
    events
}

/// Settings for a worker talking to `brokers` and the fake at `base_url`.
pub fn settings(brokers: &str, base_url: &str) -> anyhow::Result<Settings> {
    let mut s = Settings::load_from(None, Vec::new())?;
    s.kafka.brokers = brokers.to_string();
    s.kafka.group_id = "uincall-enricher-demo".into();
    s.kafka.commit_interval = Duration::from_secs(1);
    s.api.base_url = base_url.parse()?;
    s.api
        .tokens
        .insert(DEMO_TENANT.into(), SecretString::from(DEMO_TOKEN));
    s.retry.min_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_secs(1);
    s.retry.max_attempts = 5;
    s.retry.permanent_errcodes = vec![ERRCODE_NOT_FOUND];
    s.pipeline.drain_timeout = Duration::from_secs(5);
    s.validate()?;
    Ok(s)
}

/// `uincall-enricher demo`: runs the demo with its own quiet logging;
/// exit code 1 when it fails.
pub async fn run(opts: DemoOptions) -> ExitCode {
    let telemetry = telemetry::init(&LogSettings {
        format: LogFormat::Text,
        level: "error".into(),
    });
    let code = match execute(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    match telemetry {
        Ok(t) => tokio::task::block_in_place(|| t.shutdown()),
        Err(e) => eprintln!("traces were not set up: {e:#}"),
    }
    code
}

/// The in-process cluster with the three topics and the fake API.
struct World {
    /// Kept for the demo's lifetime: dropping it stops the brokers.
    _cluster: MockCluster<'static, DefaultProducerContext>,
    brokers: String,
    api: FakeApi,
    input: String,
    output: String,
    dead: String,
}

impl World {
    async fn start(api_latency: Duration) -> anyhow::Result<World> {
        let cluster = MockCluster::new(1).context("starting the in-process Kafka cluster")?;
        let k = Settings::load_from(None, Vec::new())?.kafka;
        for (topic, parts) in [
            (&k.input_topic, 3),
            (&k.output_topic, 3),
            (&k.dead_letter_topic, 1),
        ] {
            cluster.create_topic(topic, parts, 1)?;
        }
        let api = FakeApi::start(FakeApiConfig {
            latency: api_latency,
            tokens: HashMap::from([(DEMO_TENANT.to_string(), DEMO_TOKEN.to_string())]),
        })
        .await?;
        Ok(World {
            brokers: cluster.bootstrap_servers(),
            _cluster: cluster,
            api,
            input: k.input_topic,
            output: k.output_topic,
            dead: k.dead_letter_topic,
        })
    }
}

/// How long the worker took.
struct Timing {
    elapsed: Duration,
    /// From the first record taken (after the group join) to the end.
    flowing: Duration,
}

pub async fn execute(opts: DemoOptions) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let world = World::start(opts.api_latency).await?;
    writeln!(
        out,
        "in-process Kafka at {}; fake Uincall API at {} ({} ms per call)",
        world.brokers,
        world.api.base_url(),
        opts.api_latency.as_millis()
    )?;
    let events = sample_events(opts.events);
    let total = events.len();
    topics::produce(&world.brokers, &world.input, events).await?;
    writeln!(out, "seeded {total} call-ended events on {}", world.input)?;
    let stats = Arc::new(Stats::default());
    let timing = run_worker(&world, stats.clone(), total as u64).await?;
    show_records(&mut out, &world, &stats).await?;
    show_summary(&mut out, &stats, total, &timing)?;
    Ok(())
}

/// Runs the worker until every event is accounted for (enriched or
/// dead-lettered), with a progress line on stderr; then stops it.
async fn run_worker(world: &World, stats: Arc<Stats>, total: u64) -> anyhow::Result<Timing> {
    let settings = settings(&world.brokers, &world.api.base_url())?;
    let worker = Worker::build(settings, stats.clone()).await?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(worker.run_until_stopped(stop.clone()));
    let limit = Duration::from_secs(120);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut first_taken: Option<Instant> = None;
    let mut shown = Instant::now();
    loop {
        let done = stats.enriched() + stats.dead_lettered_total();
        if shown.elapsed() >= Duration::from_millis(500) || done >= total {
            shown = Instant::now();
            eprint!("\r  processed {done}/{total}");
        }
        if done >= total {
            break;
        }
        if first_taken.is_none() && stats.consumed() > 0 {
            first_taken = Some(Instant::now());
        }
        if started.elapsed() > limit || running.is_finished() {
            stop.cancel();
            bail!("the worker did not finish the demo events in {limit:?}");
        }
        tick.tick().await;
    }
    eprintln!();
    let timing = Timing {
        elapsed: started.elapsed(),
        flowing: first_taken.map_or(started.elapsed(), |t| t.elapsed()),
    };
    stop.cancel();
    running.await??;
    Ok(timing)
}

/// Prints one enriched record (one that needed retries) and every dead
/// letter, read back from their topics.
async fn show_records(out: &mut impl Write, world: &World, stats: &Stats) -> anyhow::Result<()> {
    let wait = Duration::from_secs(30);
    let (enriched, dead) = (
        stats.enriched() as usize,
        stats.dead_lettered_total() as usize,
    );
    let enriched = topics::read_topic(&world.brokers, &world.output, enriched, wait).await?;
    let dead_letters = topics::read_topic(&world.brokers, &world.dead, dead, wait).await?;
    let retried = enriched
        .iter()
        .find(|m| topics::key(m).is_some_and(|k| k.starts_with("transient")));
    if let Some(first) = retried {
        let v: serde_json::Value = serde_json::from_slice(first.payload().unwrap_or_default())?;
        let key = topics::key(first).unwrap_or_default();
        writeln!(
            out,
            "\none enriched record from {} (key {key}):",
            world.output
        )?;
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    writeln!(out, "\ndead letters on {}:", world.dead)?;
    for m in &dead_letters {
        let h = |name| topics::header(m, name).unwrap_or_default();
        let session = topics::header(m, dlq::SESSION_ID).unwrap_or_else(|| "-".into());
        let (class, attempts, reason) = (h(dlq::ERROR_CLASS), h(dlq::ATTEMPTS), h(dlq::REASON));
        writeln!(
            out,
            "  {session:<22} {class:<18} attempts={attempts} {reason}"
        )?;
    }
    Ok(())
}

fn show_summary(
    out: &mut impl Write,
    stats: &Stats,
    total: usize,
    t: &Timing,
) -> std::io::Result<()> {
    writeln!(out, "\nsummary")?;
    writeln!(out, "  events            {total}")?;
    writeln!(out, "  enriched          {}", stats.enriched())?;
    let (calls, retries) = (stats.api_calls(), stats.retries());
    writeln!(out, "  API calls         {calls} ({retries} retries)")?;
    for class in ErrorClass::ALL {
        let n = stats.dead_lettered(class);
        writeln!(out, "  dead-lettered     {:<18} {n}", class.as_str())?;
    }
    writeln!(
        out,
        "  elapsed           {:.2} s, of which {:.2} s after the group join ({:.0} events/s)",
        t.elapsed.as_secs_f64(),
        t.flowing.as_secs_f64(),
        total as f64 / t.flowing.as_secs_f64().max(0.001)
    )
}
