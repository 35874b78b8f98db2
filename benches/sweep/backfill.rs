//! `--backfill`: `uincall-enricher backfill` (release build, in its own
//! process) against the same broker as the sweep and the fake API's call
//! list in a process of its own, answering each page `--page-latency-ms`
//! late (docs/benchmarks.md, "Backfill"). One tenant, `--backfill-sessions`
//! calls over 30 days (one window): sessions a second over the whole run,
//! CPU as cores of the backfill, the fake API, the broker and this process,
//! and the backfill's peak RSS. Then what `--skip-enriched` costs: a dry
//! run over the first day's calls with and without reading
//! `--enriched-keys` keys from the output topic first; the difference in
//! time and peak RSS, per million keys.

use super::*;

/// The calls of the fake's list: `n` over 30 days from 2026-08-01 00:00.
pub fn list_calls(n: usize) -> Vec<(String, chrono::NaiveDateTime)> {
    let start = chrono::NaiveDate::from_ymd_opt(2026, 8, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap();
    let step = chrono::Duration::days(30) / n.max(1) as i32;
    (0..n)
        .map(|i| {
            (
                format!("{:08x}-bf00-4000-8000-{:012x}", i, i),
                start + step * i as i32,
            )
        })
        .collect()
}

/// What one backfill process did.
struct Measured {
    seconds: f64,
    cores: f64,
    api_cores: f64,
    broker_cores: f64,
    harness_cores: f64,
    peak_rss_mib: f64,
    stdout: String,
}

pub async fn run(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let args = ctx.args;
    let run = std::process::id();
    let (input, output) = (format!("backfill-in-{run}"), format!("backfill-out-{run}"));
    testkit::create_topics(
        ctx.bootstrap,
        &[(&input, PARTITIONS), (&output, PARTITIONS)],
    )
    .await?;
    let sessions = args.backfill_sessions;
    let (mut api, base_url) = ctx
        .start_fake_api_with("backfill", args.page_latency_ms, &[TENANT], sessions)
        .await?;
    let whole = backfill(
        ctx,
        &api,
        &base_url,
        &input,
        &output,
        &["--to", "2026-08-31"],
        "whole",
    )
    .await?;
    let submitted = testkit::end_offsets(ctx.bootstrap, &input)?
        .iter()
        .sum::<i64>();
    let mut out = format!(
        "# Backfill\n\n{}; input topic of {PARTITIONS} partitions; the fake API's call list answers each page {} ms late.\n\n\
         `backfill` of {sessions} sessions (one tenant, one 30-day window, pages of 50): **{:.0} sessions/s** ({:.1} s; {submitted} events on the input topic)\n\n\
         | backfill cores | fake API cores | broker cores | harness cores | backfill peak RSS MiB |\n|---|---|---|---|---|\n\
         | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |\n",
        machine().trim_end(),
        args.page_latency_ms,
        sessions as f64 / whole.seconds,
        whole.seconds,
        whole.cores,
        whole.api_cores,
        whole.broker_cores,
        whole.harness_cores,
        whole.peak_rss_mib,
    );
    eprint!("{out}");

    // --skip-enriched: the output topic's keys read first.
    let keys = args.enriched_keys;
    produce_keys(ctx.bootstrap, &output, keys).await?;
    let day = ["--to", "2026-08-02", "--dry-run"];
    let without = backfill(ctx, &api, &base_url, &input, &output, &day, "dry").await?;
    let mut with_keys = day.to_vec();
    with_keys.push("--skip-enriched");
    let with = backfill(
        ctx, &api, &base_url, &input, &output, &with_keys, "dry-skip",
    )
    .await?;
    let per_million = 1_000_000.0 / keys as f64;
    let row = format!(
        "\n`--skip-enriched` over {keys} keys on the output topic (dry run over the first day's calls, with and without): \
         {:.1} s and {:.0} MiB peak RSS with, {:.1} s and {:.0} MiB without: **{:.1} s and {:.0} MiB per million keys**.\n",
        with.seconds,
        with.peak_rss_mib,
        without.seconds,
        without.peak_rss_mib,
        (with.seconds - without.seconds) * per_million,
        (with.peak_rss_mib - without.peak_rss_mib) * per_million,
    );
    eprint!("{row}");
    out.push_str(&row);
    if !with.stdout.contains("skipped, enriched") {
        bail!("the dry run printed no summary:\n{}", with.stdout);
    }
    api.stop();
    let path = args.out.join("backfill.md");
    std::fs::write(&path, &out)?;
    println!("{out}");
    eprintln!("written to {}", path.display());
    Ok(())
}

/// Runs `backfill --tenant t --from 2026-08-01 EXTRA` to its end, sampling
/// the CPU of each process while it runs (/proc forgets it at exit).
async fn backfill(
    ctx: &Ctx<'_>,
    api: &Proc,
    base_url: &str,
    input: &str,
    output: &str,
    extra: &[&str],
    tag: &str,
) -> anyhow::Result<Measured> {
    let out = &ctx.args.out;
    let state = out.join(format!("backfill-{tag}.state.json"));
    let _ = std::fs::remove_file(&state);
    let mut command = Command::new(worker_binary());
    command
        .args([
            "backfill",
            "--tenant",
            TENANT,
            "--from",
            "2026-08-01",
            "--state",
        ])
        .arg(&state)
        .args(extra)
        .env_clear()
        .env("UINCALL__KAFKA__BROKERS", ctx.bootstrap)
        .env("UINCALL__KAFKA__INPUT_TOPIC", input)
        .env("UINCALL__KAFKA__OUTPUT_TOPIC", output)
        .env("UINCALL__API__BASE_URL", base_url)
        .env(format!("UINCALL__API__TOKENS__{TENANT}"), TOKEN)
        .env("UINCALL__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(
            out.join(format!("backfill-{tag}.log")),
        )?);
    command.envs(kafka_property_vars(ctx.args));
    let (api_pid, broker_pid) = (api.pid().to_string(), ctx.broker_pid.to_string());
    let (a0, b0, h0) = (
        cpu_seconds(&api_pid),
        cpu_seconds(&broker_pid),
        cpu_seconds("self"),
    );
    let started = Instant::now();
    let mut child = Proc::spawn("the backfill", command)?;
    let pid = child.pid().to_string();
    let stdout = child.child.stdout.take().context("the backfill's stdout")?;
    let reader = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut text).map(|_| text)
    });
    tokio::pin!(reader);
    let (mut cores_seconds, mut rss) = (0.0, 0.0);
    let stdout = loop {
        tokio::select! {
            done = &mut reader => break done??,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let now = cpu_seconds(&pid);
                if now > 0.0 {
                    cores_seconds = now;
                    rss = peak_rss_mib(&pid);
                }
            }
        }
    };
    let status = child.child.wait()?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("backfill {extra:?} exited {status}:\n{stdout}");
    }
    Ok(Measured {
        seconds,
        cores: cores_seconds / seconds,
        api_cores: (cpu_seconds(&api_pid) - a0) / seconds,
        broker_cores: (cpu_seconds(&broker_pid) - b0) / seconds,
        harness_cores: (cpu_seconds("self") - h0) / seconds,
        peak_rss_mib: rss,
        stdout,
    })
}

/// `n` records with UUID-shaped keys on `topic`, as the worker's enriched
/// records are keyed.
async fn produce_keys(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = testkit::client_config(bootstrap)
        .set("linger.ms", "20")
        .create()?;
    produce_all(&producer, topic, n, 5_000, |i| {
        (
            format!("{:08x}-0e00-4000-8000-{:012x}", i, i),
            "{}".to_string(),
        )
    })
    .await
}
