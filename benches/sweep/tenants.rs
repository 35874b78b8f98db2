//! `--tenants`: tenant isolation, measured on the worker binary against the
//! same broker as the sweep (docs/benchmarks.md, "Tenants"). Each scenario
//! compares the throughput of tenant `t` alone with its throughput beside
//! another tenant; the worker's settings are the same in both runs (window
//! 64, both tenants with a token, `retry.systemic_errcodes = [40001]`):
//!
//! - refused: one fake API at 20 ms, which refuses the other tenant's token
//!   (errcode 40001, "invalid access_token");
//! - slow: `t`'s fake API at 20 ms, and the other tenant's own API
//!   (`[tenants."s"] base_url`, a second fake API process) at 2 s.
//!
//! A run: fresh topics, the fake API(s) and the worker started, one event of
//! `t` enriched (the group has joined, the worker fetches); then all events
//! are produced at once, the other tenant's (in the run beside it) spread
//! evenly among `t`'s, so they share every partition. `t`'s throughput is
//! its events over the time from the first produce to its last enriched
//! record read back; CPU (as cores) of the worker, the broker, the fake
//! APIs and this process over the same stretch; the worker's `/metrics`
//! sampled every 100 ms for the most records over their tenant's share,
//! held and in flight.

use std::fmt::Write as _;

use uincall_enricher::fake_api::ERRCODE_BAD_TOKEN;

use super::*;

const WINDOW: usize = 64;
const FAST_MS: u64 = 20;
const SLOW_MS: u64 = 2_000;
const METRICS_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Refused,
    Slow,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Refused => "refused",
            Scenario::Slow => "slow",
        }
    }

    /// The other tenant's id.
    fn other(self) -> &'static str {
        match self {
            Scenario::Refused => "r",
            Scenario::Slow => "s",
        }
    }
}

/// The most seen on the worker's `/metrics` during a run.
#[derive(Debug, Clone, Copy, Default)]
struct Gauges {
    over_share: f64,
    held: f64,
    in_flight: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
struct TenantRun {
    /// `t`'s records/s, and the seconds they took.
    rate: f64,
    secs: f64,
    /// Seconds until every event was acknowledged by the broker.
    produce_secs: f64,
    /// The other tenant's records enriched, and its API calls (refused, or
    /// to its own API), by the time of `t`'s last record.
    other_enriched: usize,
    other_calls: u64,
    /// Records dead-lettered as `tenant_held` (the refused tenant's past
    /// `pipeline.max_held_records`) by then.
    other_dead_lettered: u64,
    /// Cores: the worker, the broker, the fake APIs together, this process.
    cores: [f64; 4],
    gauges: Gauges,
    /// The worker's peak RSS (VmHWM) by `t`'s last record.
    peak_rss_mib: f64,
}

impl TenantRun {
    fn summary(&self) -> String {
        let [w, b, a, h] = self.cores;
        format!(
            "t {:.0} records/s ({:.2} s; produced in {:.2} s); other tenant {} enriched, {} calls, {} dead-lettered; \
             most over share {:.0}, held {:.0}, in flight {:.0}; cores worker {w:.2}, broker {b:.2}, APIs {a:.2}, harness {h:.2}; \
             worker peak RSS {:.0} MiB",
            self.rate,
            self.secs,
            self.produce_secs,
            self.other_enriched,
            self.other_calls,
            self.other_dead_lettered,
            self.gauges.over_share,
            self.gauges.held,
            self.gauges.in_flight,
            self.peak_rss_mib,
        )
    }
}

/// Both scenarios, each `--runs` times alone and beside; the table is
/// printed and written to `tenants.md` in `--out`.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let args = ctx.args;
    let mut md = machine();
    writeln!(
        md,
        "Window {WINDOW}, `t`'s API {FAST_MS} ms; {} events of `t`, beside it {} of the other tenant.\n\n\
         | scenario | run | `t` alone | `t` beside | beside / alone | other tenant by `t`'s last record: enriched, calls, dead-lettered | most over share / held / in flight: alone; beside | worker peak RSS: alone; beside | cores alone: worker / broker / APIs / harness | cores beside |\n\
         |---|---|---|---|---|---|---|---|---|---|",
        args.tenant_events, args.other_events
    )?;
    for scenario in [Scenario::Refused, Scenario::Slow] {
        if !args.scenarios.iter().any(|s| s == scenario.name()) {
            continue;
        }
        for i in 1..=args.runs {
            let mut both = Vec::new();
            for beside in [false, true] {
                let what = format!(
                    "{} {i}, {}",
                    scenario.name(),
                    if beside { "beside" } else { "alone" }
                );
                let r = run_once(ctx, scenario, beside, i)
                    .await
                    .with_context(|| what.clone())?;
                eprintln!("{what}: {}", r.summary());
                both.push(r);
            }
            let (alone, beside) = (&both[0], &both[1]);
            let cores =
                |c: [f64; 4]| format!("{:.2} / {:.2} / {:.2} / {:.2}", c[0], c[1], c[2], c[3]);
            let gauges =
                |g: Gauges| format!("{:.0} / {:.0} / {:.0}", g.over_share, g.held, g.in_flight);
            writeln!(
                md,
                "| {} | {i} | {:.0}/s | {:.0}/s | {:.0} % | {}, {}, {} | {}; {} | {:.0}; {:.0} MiB | {} | {} |",
                scenario.name(),
                alone.rate,
                beside.rate,
                100.0 * beside.rate / alone.rate,
                beside.other_enriched,
                beside.other_calls,
                beside.other_dead_lettered,
                gauges(alone.gauges),
                gauges(beside.gauges),
                alone.peak_rss_mib,
                beside.peak_rss_mib,
                cores(alone.cores),
                cores(beside.cores),
            )?;
        }
    }
    std::fs::write(args.out.join("tenants.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// One run: `t` alone, or beside the scenario's other tenant.
async fn run_once(
    ctx: &Ctx<'_>,
    scenario: Scenario,
    beside: bool,
    i: usize,
) -> anyhow::Result<TenantRun> {
    let tag = format!(
        "tenants-{}-{}-{i}",
        scenario.name(),
        if beside { "beside" } else { "alone" }
    );
    let [input, output, dlq, group] = ["in", "out", "dlq", "group"].map(|s| format!("{tag}-{s}"));
    testkit::create_topics(
        ctx.bootstrap,
        &[(&input, PARTITIONS), (&output, PARTITIONS), (&dlq, 1)],
    )
    .await?;
    let mut reader = Reader::start(ctx.bootstrap, &output)?;
    reader.wait_ready(ctx.bootstrap, &output).await?;

    // The API knows `t`'s token only: the other tenant's is refused, or
    // it has an API of its own.
    let other = scenario.other();
    let (api, base_url) = ctx.start_fake_api(&tag, FAST_MS, &[TENANT]).await?;
    let mut apis = vec![api];
    // A short drain: records still waiting at the end are abandoned soon.
    let mut settings = format!(
        "[api.tokens]\n{other} = \"{TOKEN}\"\n\
         [retry]\nsystemic_errcodes = [{ERRCODE_BAD_TOKEN}]\n\
         [pipeline]\ndrain_timeout = \"2s\"\n"
    );
    if scenario == Scenario::Slow {
        let slow_tag = format!("{tag}-slow");
        let (api, url) = ctx.start_fake_api(&slow_tag, SLOW_MS, &[other]).await?;
        apis.push(api);
        writeln!(settings, "[tenants.{other}]\nbase_url = \"{url}\"")?;
    }
    let config = ctx.config_file(&tag, settings.parse()?)?;
    let side = format!("127.0.0.1:{}", testkit::free_port());
    let log = std::fs::File::create(ctx.args.out.join(format!("{tag}.log")))?;
    let mut command =
        ctx.worker_command(&config, [&input, &output, &dlq, &group], &base_url, WINDOW);
    command
        .env("UINCALL__HTTP__LISTEN", &side)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
    // Dropped on every way out: stops the worker, then the fake APIs.
    let mut running = Running {
        subject: Proc::spawn("the worker", command)?,
        apis,
    };
    // One event of `t` enriched: the worker has joined and fetches.
    let warm = format!("{tag}-warm");
    testkit::produce(ctx.bootstrap, &input, [event(&warm, TENANT)]).await?;
    loop {
        let Some((key, _)) = reader.next(&mut running).await? else {
            bail!("the first event was not enriched within {IDLE_LIMIT:?}");
        };
        if key == warm {
            break;
        }
    }

    // `t`'s events, and the other tenant's spread evenly among them.
    let (n, m) = (
        ctx.args.tenant_events,
        if beside { ctx.args.other_events } else { 0 },
    );
    let (mine, theirs) = (format!("{tag}-t-"), format!("{tag}-o-"));
    let mut events = Vec::with_capacity(n + m);
    let (mut a, mut b) = (0, 0);
    for j in 0..n + m {
        if (j + 1) * m / (n + m) > b {
            events.push(event(&format!("{theirs}{b:06}"), other));
            b += 1;
        } else {
            events.push(event(&format!("{mine}{a:06}"), TENANT));
            a += 1;
        }
    }

    let pids: Vec<String> = [running.subject.pid(), ctx.broker_pid]
        .into_iter()
        .chain(running.apis.iter().map(Proc::pid))
        .map(|p| p.to_string())
        .chain(["self".to_string()])
        .collect();
    let cpu = || pids.iter().map(|p| cpu_seconds(p)).collect::<Vec<f64>>();
    let metrics = format!("http://{side}/metrics");
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_gauges(metrics.clone(), stop_sampling.clone()));

    let (t0, c0) = (Instant::now(), cpu());
    testkit::produce(ctx.bootstrap, &input, events).await?;
    let produce_secs = t0.elapsed().as_secs_f64();
    let (mut seen, mut other_enriched, mut last) = (0, 0, t0);
    while seen < n {
        let Some((key, at)) = reader.next(&mut running).await? else {
            bail!("no output for {IDLE_LIMIT:?} after {seen} of {n} records of `t`");
        };
        if key.starts_with(&mine) {
            seen += 1;
            last = at;
        } else if key.starts_with(&theirs) {
            other_enriched += 1;
        }
    }
    let (t1, c1) = (Instant::now(), cpu());
    let peak_rss_mib = peak_rss_mib(&pids[0]);
    let other_calls = match scenario {
        Scenario::Refused => refused_calls(&metrics).await?,
        Scenario::Slow => api_calls(&mut running.apis[1])?,
    };
    let other_dead_lettered = tenant_held(&metrics).await?;
    stop_sampling.cancel();
    let gauges = sampler.await?;

    let secs = (last - t0).as_secs_f64();
    let wall = (t1 - t0).as_secs_f64();
    let d: Vec<f64> = c0.iter().zip(&c1).map(|(a, b)| (b - a) / wall).collect();
    let apis: f64 = d[2..d.len() - 1].iter().sum();
    Ok(TenantRun {
        rate: n as f64 / secs,
        secs,
        produce_secs,
        other_enriched,
        other_calls,
        other_dead_lettered,
        cores: [d[0], d[1], apis, d[d.len() - 1]],
        gauges,
        peak_rss_mib,
    })
}

/// The worker's `/metrics`.
async fn fetch_metrics(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    Ok(client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The value of a metric line starting with `name` (labels included).
fn values<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(move |l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Samples the gauges every `METRICS_EVERY` until `stop`; the most of each.
async fn sample_gauges(url: String, stop: CancellationToken) -> Gauges {
    let client = reqwest::Client::new();
    let mut most = Gauges::default();
    let mut tick = tokio::time::interval(METRICS_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return most,
            _ = tick.tick() => {}
        }
        let Ok(text) = fetch_metrics(&client, &url).await else {
            continue;
        };
        let gauge = |name: &str| values(&text, name).fold(0.0, f64::max);
        most.over_share = most
            .over_share
            .max(gauge("uincall_enricher_records_over_share "));
        most.held = most.held.max(gauge("uincall_enricher_records_held "));
        most.in_flight = most
            .in_flight
            .max(gauge("uincall_enricher_records_in_flight "));
    }
}

/// Records dead-lettered as `tenant_held`.
async fn tenant_held(url: &str) -> anyhow::Result<u64> {
    let text = fetch_metrics(&reqwest::Client::new(), url).await?;
    let name = "uincall_enricher_records_dead_lettered_total{error_class=\"tenant_held\"} ";
    Ok(values(&text, name).sum::<f64>() as u64)
}

/// API calls answered with the refused-token errcode (the other tenant's).
async fn refused_calls(url: &str) -> anyhow::Result<u64> {
    let text = fetch_metrics(&reqwest::Client::new(), url).await?;
    let errcode = format!("errcode=\"{ERRCODE_BAD_TOKEN}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("uincall_enricher_api_calls_total{") && l.contains(&errcode))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
