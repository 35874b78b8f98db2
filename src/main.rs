use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use uincall_enricher::settings::{self, Settings};
use uincall_enricher::{backfill, ingest, pipeline, replay, telemetry};

/// mimalloc: per-thread free lists where glibc's malloc took about a
/// quarter of the CPU profile under load (docs/benchmarks.md, "Allocator").
/// The `system-alloc` feature keeps glibc's.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Enriches Uincall call-ended events from Kafka with the full call record
/// from the Uincall OpenAPI, at least once, with a dead-letter topic.
///
/// Settings: embedded defaults, then --config FILE, then environment
/// variables UINCALL__<SECTION>__<KEY> (e.g. UINCALL__KAFKA__BROKERS).
/// See docs/configuration.md.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// A TOML settings file layered over the embedded defaults.
    #[arg(
        long,
        short,
        global = true,
        env = "UINCALL_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker until SIGTERM or SIGINT (then drain, commit, exit 0).
    Run,
    /// Validate the settings and print them with secrets redacted.
    CheckConfig,
    /// Re-submit dead letters (after fixing their cause): back to the input
    /// topic, or enriched directly with --direct. Filters select which;
    /// --dry-run shows what they select. Stops at the dead-letter topic's
    /// end as of the start; progress is committed under its own group, so a
    /// rerun continues. Exit code 1 when a re-submission failed, 130 when
    /// interrupted.
    Replay(Box<replay::ReplayArgs>),
    /// Receive Uincall's HTTP pushes (call events, call records) on
    /// ingest.listen and write the call-ended ones to the input topic,
    /// answering 200 only once the broker acknowledged them (503 when it
    /// did not: the sender may retry). Until SIGTERM or SIGINT (then finish
    /// the pushes in flight, exit 0). See docs/ingest.md.
    Ingest,
    /// Produce call-ended events for the calls Uincall's call list holds in
    /// a time range (per tenant, in windows of at most 60 days, page by
    /// page), so the worker enriches calls whose event never arrived; with
    /// --skip-enriched only those missing from the output topic (a
    /// reconcile). Resumes from its state file. Exit code 1 when it failed
    /// (an unreadable answer, Kafka), 3 when the API is unusable (systemic
    /// errcode, or unreachable through the retries), 130 when interrupted.
    /// See docs/backfill.md.
    Backfill(Box<backfill::BackfillArgs>),
    /// Run the whole pipeline on embedded defaults: an in-process Kafka
    /// cluster, a local fake Uincall API and sample events.
    #[cfg(feature = "demo")]
    Demo(uincall_enricher::demo::DemoOptions),
}

/// Exit codes: 0 done, 1 runtime failure, 2 bad settings (replay and
/// backfill: 130 when interrupted; backfill: 3 when the API is unusable).
fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let config = cli.config.as_deref();
    let code = match cli.command {
        Command::CheckConfig => settings::check_config(config),
        Command::Run => with_telemetry(config, |s| runtime.block_on(pipeline::run(s))),
        Command::Replay(args) => {
            with_telemetry(config, |s| runtime.block_on(replay::run(s, *args)))
        }
        Command::Ingest => with_telemetry(config, |s| runtime.block_on(ingest::run(s))),
        Command::Backfill(args) => {
            with_telemetry(config, |s| runtime.block_on(backfill::run(s, *args)))
        }
        #[cfg(feature = "demo")]
        Command::Demo(opts) => runtime.block_on(uincall_enricher::demo::run(opts)),
    };
    // A blocking metadata request may still wait for an unreachable broker
    // when a signal ends start-up; do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Loads the settings, sets up logging and traces from them and the
/// `OTEL_*` variables, runs `work`, then sends the spans still buffered.
/// Bad settings are reported on stderr with exit code 2.
fn with_telemetry(config: Option<&Path>, work: impl FnOnce(Settings) -> ExitCode) -> ExitCode {
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(&settings.log) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::redact_in_logs(settings.secrets());
    let code = work(settings);
    telemetry.shutdown();
    code
}
