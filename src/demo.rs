//! `uincall-enricher demo`: the real worker on embedded defaults, against
//! librdkafka's in-process mock Kafka cluster and the local fake Uincall API.
//! Seeds sample call-ended events (some with transient and permanent API
//! errors, some invalid), runs the worker until every event is accounted
//! for, then prints an enriched record, the dead letters and a summary.
//! Before the worker starts, the push receiver (`ingest`) takes a set of
//! Uincall pushes over HTTP and writes the call-ended ones to the same input
//! topic: the whole path from Uincall's push to the enriched record.

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
const DEMO_PUSH_SECRET: &str = "demo-push-secret-not-a-secret";

/// Options of `uincall-enricher demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Number of sample call-ended events (three invalid ones are added).
    #[arg(long, default_value_t = 200)]
    pub events: usize,
    /// Latency of the fake API per call, in milliseconds.
    #[arg(long = "api-latency-ms", default_value = "20", value_name = "MS", value_parser = parse_millis)]
    pub api_latency: Duration,
    /// Calls whose events arrive as Uincall's HTTP pushes through the push
    /// receiver (each call pushes a few events; one record push in four);
    /// 0 leaves the receiver out.
    #[arg(long, default_value_t = 20)]
    pub pushes: usize,
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
    // The mock cluster does not answer DescribeConfigs: its default.
    s.kafka.max_message_bytes = Some(1_000_000);
    s.api.base_url = base_url.parse()?;
    s.api
        .tokens
        .insert(DEMO_TENANT.into(), SecretString::from(DEMO_TOKEN));
    s.retry.min_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_secs(1);
    s.retry.max_attempts = 5;
    s.retry.permanent_errcodes = vec![ERRCODE_NOT_FOUND];
    s.pipeline.drain_timeout = Duration::from_secs(5);
    // The demo's pushes are all acknowledged, on a busy machine too.
    s.ingest.forward_timeout = Duration::from_secs(30);
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
    execute_to(opts, &mut std::io::stdout()).await
}

/// [`execute`], writing to `out`.
pub async fn execute_to(opts: DemoOptions, mut out: &mut impl Write) -> anyhow::Result<()> {
    let world = World::start(opts.api_latency).await?;
    writeln!(
        out,
        "in-process Kafka at {}; fake Uincall API at {} ({} ms per call)",
        world.brokers,
        world.api.base_url(),
        opts.api_latency.as_millis()
    )?;
    let events = sample_events(opts.events);
    let seeded = events.len();
    topics::produce(&world.brokers, &world.input, events).await?;
    writeln!(out, "seeded {seeded} call-ended events on {}", world.input)?;
    let pushed = match opts.pushes {
        0 => 0,
        calls => push_calls(&mut out, &world, calls).await?,
    };
    let total = seeded + pushed;
    let stats = Arc::new(Stats::default());
    let timing = run_worker(&world, stats.clone(), total as u64).await?;
    show_records(&mut out, &world, &stats).await?;
    show_summary(&mut out, &stats, total, &timing)?;
    Ok(())
}

/// Runs the push receiver against the demo's cluster and sends it the
/// pushes of `calls` calls as Uincall would: call-event pushes for the
/// call's progress and its hang-up (one call in four as a whole-session
/// record push, without `tenant_id`), one repeated hang-up and one push
/// with a wrong secret. Returns how many were forwarded to the input topic.
async fn push_calls(out: &mut impl Write, world: &World, calls: usize) -> anyhow::Result<usize> {
    let mut settings = settings(&world.brokers, &world.api.base_url())?;
    (settings.ingest.secrets).insert(DEMO_TENANT.into(), SecretString::from(DEMO_PUSH_SECRET));
    let local = |what| async move {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .with_context(|| format!("binding a local port for the receiver's {what}"))
    };
    let (listener, side) = (local("pushes").await?, local("side port").await?);
    let base = format!("http://{}/push/{DEMO_TENANT}", listener.local_addr()?);
    let side_addr = side.local_addr()?;
    let ready = format!("http://{side_addr}/readyz");
    let stop = CancellationToken::new();
    let receiver = tokio::spawn(crate::ingest::serve_on(
        settings,
        listener,
        side,
        stop.clone(),
    ));
    let client = reqwest::Client::new();
    let waiting = Instant::now();
    while !(client.get(&ready).send().await).is_ok_and(|r| r.status().is_success()) {
        if receiver.is_finished() || waiting.elapsed() > Duration::from_secs(30) {
            stop.cancel();
            receiver.await??;
            bail!("the push receiver did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let event = |session: &str, command: &str| {
        serde_json::json!({
            "session_id": session, "tenant_id": DEMO_TENANT, "command": command,
            "call_id": format!("{session}-leg-1"), "dir": "UP", "ani": "13800000000",
        })
    };
    let mut pushes = Vec::new();
    for i in 0..calls {
        let session = format!("push-{i:04}");
        let url = format!("{base}/{DEMO_PUSH_SECRET}");
        pushes.push((format!("{url}/call-event"), event(&session, "call_process")));
        pushes.push((format!("{url}/call-event"), event(&session, "call_talking")));
        if i % 4 == 3 {
            let record =
                serde_json::json!({"session_id": session, "call_id": format!("{session}-leg-1")});
            pushes.push((format!("{url}/call-record?type=1"), record));
        } else {
            pushes.push((format!("{url}/call-event"), event(&session, "call_hangup")));
        }
    }
    let url = format!("{base}/{DEMO_PUSH_SECRET}/call-event");
    pushes.push((url, event("push-0000", "call_hangup")));
    let url = format!("{base}/not-the-secret/call-event");
    pushes.push((url, event("push-forged", "call_hangup")));
    for (url, body) in &pushes {
        client.post(url).json(body).send().await?;
    }
    // The receiver's own account of its answers.
    let metrics = format!("http://{}/metrics", side_addr);
    let metrics = client.get(&metrics).send().await?.text().await?;
    let results = results(&metrics);
    stop.cancel();
    receiver.await??;
    let n = |r: &str| results.get(r).copied().unwrap_or(0);
    writeln!(
        out,
        "pushed {} Uincall pushes over HTTP to {base}/<secret>/…: {} call-ended forwarded to {} after the broker's acknowledgement, {} progress events answered and not forwarded, {} repeat answered and not forwarded again, {} with a wrong secret refused",
        pushes.len(),
        n("forwarded"),
        world.input,
        n("ignored"),
        n("duplicate"),
        n("unauthorized"),
    )?;
    Ok(n("forwarded") as usize)
}

/// `uincall_enricher_ingest_requests_total` by `result`, summed over kinds,
/// from the receiver's `/metrics` text.
fn results(metrics: &str) -> HashMap<String, u64> {
    let mut by_result = HashMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("uincall_enricher_ingest_requests_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").unwrap_or_default();
        let result = labels
            .split(',')
            .find_map(|l| l.strip_prefix("result=\"")?.strip_suffix('"'));
        if let (Some(result), Ok(value)) = (result, value.trim().parse::<f64>()) {
            *by_result.entry(result.to_string()).or_default() += value as u64;
        }
    }
    by_result
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
    let from_pushes = (enriched.iter())
        .filter(|m| topics::key(m).is_some_and(|k| k.starts_with("push-")))
        .count();
    if from_pushes > 0 {
        writeln!(
            out,
            "\n{from_pushes} enriched records came through the push receiver (keys push-…)"
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's whole path: seeded events and Uincall pushes through the
    /// receiver, every one enriched or dead-lettered, the pushes' records
    /// among the enriched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_takes_pushes_through_the_receiver_to_enriched_records() {
        let opts = DemoOptions {
            events: 10,
            api_latency: Duration::from_millis(1),
            pushes: 4,
        };
        let mut out = Vec::new();
        execute_to(opts, &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        for line in [
            "pushed 14 Uincall pushes",
            ": 4 call-ended forwarded",
            "8 progress events answered and not forwarded",
            "1 repeat answered and not forwarded again",
            "1 with a wrong secret refused",
            "4 enriched records came through the push receiver",
            "  events            17\n",
            "  enriched          13\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from:\n{out}");
        }
    }
}
