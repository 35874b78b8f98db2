//! `--ingest`: the push receiver (`uincall-enricher ingest`, release build,
//! in its own process) against the same broker as the sweep
//! (docs/benchmarks.md, "Push receiver"). For each rate of `--push-rates`,
//! a load generator in a process of its own (this binary with
//! `--push-load`) sends call-ended pushes at that steady rate for
//! `--push-seconds` over keep-alive connections, each for a new session,
//! and reports the answers and their latency, measured from the moment the
//! push was due (so a generator or receiver falling behind shows as
//! latency, not as a lower rate). Beside it, in the same run, the raw
//! produce rate: this process producing records of the same size with the
//! receiver's producer settings (idempotent, `acks=all`) as fast as
//! acknowledgements come, `RAW_IN_FLIGHT` at a time. CPU as cores of the
//! receiver, the broker, the load generator and this process over each
//! stretch; the receiver's peak RSS.

use super::*;

const SECRET: &str = "bench-push-secret-0123456789";
const RAW_RECORDS: usize = 50_000;
const RAW_IN_FLIGHT: usize = 2_000;

/// A push body as Uincall sends it, for `session`.
fn push_body(session: &str) -> String {
    serde_json::json!({
        "session_id": session,
        "tenant_id": TENANT,
        "command": "call_hangup",
        "call_id": format!("{session}-c"),
        "queue_id": "q-01",
        "type": "1",
        "dir": "UP",
        "agent_num": "8001",
        "calldirection": "1",
        "agent_type": "1",
        "dnis": "02100000000",
        "ani": "13800000000",
        "call_result": "1",
        "remark": "",
    })
    .to_string()
}

/// What the load generator reports (one JSON line on its stdout).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LoadReport {
    sent: usize,
    ok: usize,
    other: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

pub async fn run(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let args = ctx.args;
    let topic = format!("push-bench-{}", std::process::id());
    testkit::create_topics(ctx.bootstrap, &[(&topic, PARTITIONS)]).await?;
    let listen = format!("127.0.0.1:{}", testkit::free_port());
    let side = format!("127.0.0.1:{}", testkit::free_port());
    let log = std::fs::File::create(args.out.join("ingest.log"))?;
    let mut command = Command::new(worker_binary());
    command
        .arg("ingest")
        .env_clear()
        .env("UINCALL__KAFKA__BROKERS", ctx.bootstrap)
        .env("UINCALL__KAFKA__INPUT_TOPIC", &topic)
        .env("UINCALL__INGEST__LISTEN", &listen)
        .env("UINCALL__HTTP__LISTEN", &side)
        .env(format!("UINCALL__INGEST__SECRETS__{TENANT}"), SECRET)
        .env("UINCALL__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    command.envs(kafka_property_vars(args));
    let mut receiver = Proc::spawn("the push receiver", command)?;
    let client = reqwest::Client::new();
    let ready = format!("http://{side}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        receiver.check()?;
        if client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the push receiver was not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let receiver_pid = receiver.pid().to_string();
    let broker_pid = ctx.broker_pid.to_string();

    let raw = raw_produce_rate(ctx, &topic).await?;
    let mut out = format!(
        "# Push receiver\n\n{}; topic of {PARTITIONS} partitions.\n\n\
         Raw produce rate (this process, the receiver's producer settings, {RAW_RECORDS} records of {} bytes, {RAW_IN_FLIGHT} in flight): **{raw:.0} records/s**\n\n\
         | rate asked | pushes/s answered | 200 | other | p50 ms | p99 ms | max ms | receiver cores | broker cores | load generator cores | harness cores |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        machine(),
        push_body("bench-000000-00000000").len(),
    );
    eprintln!("raw produce: {raw:.0} records/s");
    for &rate in &args.push_rates {
        let url = format!("http://{listen}/push/{TENANT}/{SECRET}/call-event");
        let mut load = Command::new(std::env::current_exe()?);
        load.args([
            "--push-load",
            &url,
            "--push-rate",
            &rate.to_string(),
            "--push-seconds",
            &args.push_seconds.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let cpu = |pid: &str| cpu_seconds(pid);
        let (r0, b0, h0) = (cpu(&receiver_pid), cpu(&broker_pid), cpu("self"));
        let started = Instant::now();
        let mut generator = Proc::spawn("the load generator", load)?;
        let generator_pid = generator.pid().to_string();
        let mut last_generator_cpu = 0.0;
        let line: String;
        let stdout = generator
            .child
            .stdout
            .take()
            .context("the generator's stdout")?;
        let reader = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        });
        tokio::pin!(reader);
        loop {
            tokio::select! {
                done = &mut reader => {
                    line = done??;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    // Its CPU while it runs: /proc forgets it at exit.
                    let now = cpu(&generator_pid);
                    if now > 0.0 {
                        last_generator_cpu = now;
                    }
                    receiver.check()?;
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (r1, b1, h1) = (cpu(&receiver_pid), cpu(&broker_pid), cpu("self"));
        generator.stop();
        let report: LoadReport = serde_json::from_str(line.trim())
            .with_context(|| format!("the generator's report: {line:?}"))?;
        let row = format!(
            "| {rate} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            report.ok as f64 / report.seconds,
            report.ok,
            report.other,
            report.p50_ms,
            report.p99_ms,
            report.max_ms,
            (r1 - r0) / elapsed,
            (b1 - b0) / elapsed,
            last_generator_cpu / elapsed,
            (h1 - h0) / elapsed,
        );
        eprint!("{row}");
        out.push_str(&row);
    }
    out.push_str(&format!(
        "\nReceiver peak RSS: {:.0} MiB.\n",
        peak_rss_mib(&receiver_pid)
    ));
    receiver.stop();
    let path = args.out.join("ingest.md");
    std::fs::write(&path, &out)?;
    println!("{out}");
    eprintln!("written to {}", path.display());
    Ok(())
}

/// Records a second this process gets acknowledged with the receiver's
/// producer settings.
async fn raw_produce_rate(ctx: &Ctx<'_>, topic: &str) -> anyhow::Result<f64> {
    let mut env = kafka_property_vars(ctx.args);
    env.push(("UINCALL__KAFKA__BROKERS".into(), ctx.bootstrap.into()));
    let settings = Settings::load_from(None, env)?;
    let producer: FutureProducer = kafka::producer_config(&settings.kafka, None).create()?;
    let started = Instant::now();
    produce_all(&producer, topic, RAW_RECORDS, RAW_IN_FLIGHT, |i| {
        let key = format!("raw-{i:08}");
        let body = push_body(&key);
        (key, body)
    })
    .await?;
    Ok(RAW_RECORDS as f64 / started.elapsed().as_secs_f64())
}

/// The load generator (`--push-load URL`): pushes at `rate` a second for
/// `seconds`, each due at its own instant, over a pool of keep-alive
/// connections; prints a [`LoadReport`].
pub async fn push_load(url: &str, rate: u64, seconds: f64) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .timeout(Duration::from_secs(30))
        .build()?;
    let total = (rate as f64 * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let run = std::process::id();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let body = push_body(&format!("bench-{run}-{i:08}"));
            let ok = client
                .post(&url)
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (ok, due.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut ok = 0;
    for t in tasks {
        let (fine, latency) = t.await?;
        ok += usize::from(fine);
        latencies.push(latency.as_secs_f64() * 1000.0);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let report = LoadReport {
        sent: total,
        ok,
        other: total - ok,
        seconds: elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
