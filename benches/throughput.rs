//! End-to-end throughput through a real tansu broker: N call-ended events,
//! the fake Uincall API at a given latency, the worker at a given window.
//!
//!   cargo bench --bench throughput -- [--events N] [--latency-ms L] [--window W]
//!
//! Prints enriched records/s from the first enriched record to the last
//! (steady state, group join excluded) and the worker's CPU time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use uincall_enricher::fake_api::{FakeApi, FakeApiConfig};
use uincall_enricher::pipeline::Worker;
use uincall_enricher::settings::Settings;
use uincall_enricher::stats::Stats;
use uincall_enricher::testkit::{self, TansuBroker};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Peak resident memory of this process in MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
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
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: a benchmark, run it with `cargo bench --bench throughput`");
        return Ok(());
    }
    if let Ok(level) = std::env::var("BENCH_LOG") {
        uincall_enricher::telemetry::init(&uincall_enricher::settings::LogSettings {
            format: uincall_enricher::settings::LogFormat::Text,
            level,
        });
    }
    let events: usize = arg("--events", "20000").parse()?;
    let latency = Duration::from_millis(arg("--latency-ms", "50").parse()?);
    let defaults = Settings::load_from(None, Vec::new())?;
    let window: usize = arg("--window", &defaults.pipeline.max_in_flight.to_string()).parse()?;

    // sqlite storage: tansu 0.6.0's memory engine stalls a consumer that
    // resumes inside a record batch (docs/testing.md).
    let broker = TansuBroker::start()?;
    let bootstrap = broker.bootstrap();
    testkit::create_topics(&bootstrap, &[("in", 6), ("out", 6), ("dlq", 1)]).await?;
    let api = FakeApi::start(FakeApiConfig {
        latency,
        tokens: [("t".to_string(), "tok".to_string())].into(),
    })
    .await?;
    let seed_start = Instant::now();
    testkit::produce(
        &bootstrap,
        "in",
        (0..events).map(|i| {
            let s = format!("call-{i:07}");
            let v = serde_json::json!({"session_id": s, "tenant_id": "t"});
            (Some(s.into_bytes()), v.to_string().into_bytes())
        }),
    )
    .await?;
    eprintln!(
        "seeded {events} events in {:.1}s",
        seed_start.elapsed().as_secs_f64()
    );

    let mut s = defaults;
    s.kafka.brokers = bootstrap.clone();
    s.kafka.input_topic = "in".into();
    s.kafka.output_topic = "out".into();
    s.kafka.dead_letter_topic = "dlq".into();
    s.api.base_url = api.base_url().parse()?;
    s.api.tokens.insert("t".into(), SecretString::from("tok"));
    s.pipeline.max_in_flight = window;
    if let Ok(pool) = std::env::var("BENCH_POOL") {
        s.api.pool_max_idle_per_host = Some(pool.parse()?);
    }
    if let Ok(props) = std::env::var("BENCH_KAFKA_PROPS") {
        for kv in props.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').expect("key=value");
            s.kafka.properties.insert(k.into(), v.into());
        }
    }
    s.validate()?;

    let stats = Arc::new(Stats::default());
    let worker = Worker::build(s, stats.clone()).await?;
    let stop = CancellationToken::new();
    let cpu0 = cpu_seconds("self");
    let broker_pid = broker.pid().to_string();
    let broker_cpu0 = cpu_seconds(&broker_pid);
    let started = Instant::now();
    let run = tokio::spawn(worker.run_until_stopped(stop.clone()));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut first: Option<(Instant, u64)> = None;
    let limit = Instant::now() + Duration::from_secs(600);
    loop {
        tick.tick().await;
        let done = stats.enriched();
        if std::env::var_os("BENCH_TRACE").is_some() {
            eprintln!(
                "{:.2}s consumed={} enriched={} api_calls={} in_flight={} paused={}",
                started.elapsed().as_secs_f64(),
                stats.consumed(),
                done,
                stats.api_calls(),
                stats.in_flight(),
                stats.is_paused()
            );
        }
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        if done as usize >= events || Instant::now() > limit {
            break;
        }
    }
    let end = Instant::now();
    let cpu = cpu_seconds("self") - cpu0;
    let broker_cpu = cpu_seconds(&broker_pid) - broker_cpu0;
    stop.cancel();
    run.await??;
    let (t0, n0) = first.expect("records were enriched");
    let secs = (end - t0).as_secs_f64();
    let rate = (stats.enriched() - n0) as f64 / secs;
    println!(
        "storage=sqlite events={events} latency_ms={} window={window}: {:.0} enriched records/s over {:.1}s; \
         theoretical W/L = {:.0}/s; process CPU {:.2}s ({:.2} ms per record, fake API and test harness included); broker CPU {:.2}s; peak RSS {:.0} MiB",
        latency.as_millis(),
        rate,
        secs,
        if latency.is_zero() {
            f64::INFINITY
        } else {
            window as f64 / latency.as_secs_f64()
        },
        cpu,
        cpu * 1000.0 / events as f64,
        broker_cpu,
        peak_rss_mib(),
    );
    Ok(())
}
