//! `uincall-enricher demo`: the real worker on embedded defaults, against
//! librdkafka's in-process mock Kafka cluster and the local fake Uincall API.
//! Seeds sample call-ended events (some with transient and permanent API
//! errors, some invalid), runs the worker until every event is accounted
//! for, then prints an enriched record, the dead letters and a summary.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::mocking::MockCluster;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{ErrorClass, header as dlq};
use crate::fake_api::{ERRCODE_NOT_FOUND, FakeApi, FakeApiConfig};
use crate::pipeline::Worker;
use crate::settings::Settings;
use crate::stats::Stats;
use crate::topics;

pub const DEMO_TENANT: &str = "demo-tenant";
const DEMO_TOKEN: &str = "demo-token-not-a-secret";

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub events: usize,
    pub api_latency: Duration,
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

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let cluster = MockCluster::new(1).context("starting the in-process Kafka cluster")?;
    let brokers = cluster.bootstrap_servers();
    let base = Settings::load_from(None, Vec::new())?;
    let (input, output, dead) = (
        base.kafka.input_topic.clone(),
        base.kafka.output_topic.clone(),
        base.kafka.dead_letter_topic.clone(),
    );
    for (topic, parts) in [(&input, 3), (&output, 3), (&dead, 1)] {
        cluster.create_topic(topic, parts, 1)?;
    }
    let api = FakeApi::start(FakeApiConfig {
        latency: opts.api_latency,
        tokens: HashMap::from([(DEMO_TENANT.to_string(), DEMO_TOKEN.to_string())]),
    })
    .await?;
    writeln!(
        out,
        "in-process Kafka at {brokers}; fake Uincall API at {} ({} ms per call)",
        api.base_url(),
        opts.api_latency.as_millis()
    )?;

    let events = sample_events(opts.events);
    let total = events.len();
    topics::produce(&brokers, &input, events).await?;
    writeln!(out, "seeded {total} call-ended events on {input}")?;

    let stats = Arc::new(Stats::default());
    let worker = Worker::build(settings(&brokers, &api.base_url())?, stats.clone()).await?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(worker.run_until_stopped(stop.clone()));

    // Every event ends as an enriched record or a dead letter.
    let limit = Duration::from_secs(120);
    let progress = tokio::spawn({
        let stats = stats.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let done = stats.enriched() + stats.dead_lettered_total();
                eprint!("\r  processed {done}/{total}");
            }
        }
    });
    let mut waited = tokio::time::interval(Duration::from_millis(20));
    // Throughput is counted from the first record taken, after the group join.
    let mut first_taken: Option<Instant> = None;
    while (stats.enriched() + stats.dead_lettered_total()) < total as u64 {
        if first_taken.is_none() && stats.consumed() > 0 {
            first_taken = Some(Instant::now());
        }
        if started.elapsed() > limit || running.is_finished() {
            progress.abort();
            stop.cancel();
            bail!("the worker did not finish the demo events in {limit:?}");
        }
        waited.tick().await;
    }
    let elapsed = started.elapsed();
    let flowing = first_taken.map_or(elapsed, |t| t.elapsed());
    progress.abort();
    eprintln!();
    stop.cancel();
    running.await??;

    let enriched = topics::read_topic(
        &brokers,
        &output,
        stats.enriched() as usize,
        Duration::from_secs(30),
    )
    .await?;
    let dead_letters = topics::read_topic(
        &brokers,
        &dead,
        stats.dead_lettered_total() as usize,
        Duration::from_secs(30),
    )
    .await?;

    if let Some(first) = enriched
        .iter()
        .find(|m| topics::key(m).is_some_and(|k| k.starts_with("transient")))
    {
        let v: serde_json::Value = serde_json::from_slice(first.payload().unwrap_or_default())?;
        writeln!(
            out,
            "\none enriched record from {output} (key {}):",
            topics::key(first).unwrap_or_default()
        )?;
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    writeln!(out, "\ndead letters on {dead}:")?;
    for m in &dead_letters {
        writeln!(
            out,
            "  {:<22} {:<18} attempts={} {}",
            topics::header(m, dlq::SESSION_ID).unwrap_or_else(|| "-".into()),
            topics::header(m, dlq::ERROR_CLASS).unwrap_or_default(),
            topics::header(m, dlq::ATTEMPTS).unwrap_or_default(),
            topics::header(m, dlq::REASON).unwrap_or_default(),
        )?;
    }
    writeln!(out, "\nsummary")?;
    writeln!(out, "  events            {total}")?;
    writeln!(out, "  enriched          {}", stats.enriched())?;
    writeln!(
        out,
        "  API calls         {} ({} retries)",
        stats.api_calls(),
        stats.retries()
    )?;
    for class in ErrorClass::ALL {
        writeln!(
            out,
            "  dead-lettered     {:<18} {}",
            class.as_str(),
            stats.dead_lettered(class)
        )?;
    }
    writeln!(
        out,
        "  elapsed           {:.2} s, of which {:.2} s after the group join ({:.0} events/s)",
        elapsed.as_secs_f64(),
        flowing.as_secs_f64(),
        total as f64 / flowing.as_secs_f64().max(0.001)
    )?;
    Ok(())
}
