use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info};

use uincall_enricher::settings::{LogFormat, LogSettings, Settings};
use uincall_enricher::{pipeline::Worker, shutdown, side_port, stats::Stats, telemetry};

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
    Replay(Box<uincall_enricher::replay::ReplayArgs>),
    #[cfg(feature = "demo")]
    /// Run the whole pipeline on embedded defaults: an in-process Kafka
    /// cluster, a local fake Uincall API and sample events.
    Demo {
        /// Number of sample call-ended events (three invalid ones are added).
        #[arg(long, default_value_t = 200)]
        events: usize,
        /// Latency of the fake API per call, in milliseconds.
        #[arg(long, default_value_t = 20)]
        api_latency_ms: u64,
    },
}

/// Exit codes: 0 done, 1 runtime failure, 2 bad settings.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let code = execute(cli, &runtime);
    // A blocking metadata request may still wait for an unreachable broker
    // when a signal ends start-up; do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Loads the settings and sets up logging from them; bad settings are
/// reported on stderr with exit code 2.
fn load_for_logging(config: Option<&std::path::Path>) -> Result<Settings, ExitCode> {
    match Settings::load(config) {
        Ok(s) => {
            telemetry::init(&s.log);
            Ok(s)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn execute(cli: Cli, runtime: &tokio::runtime::Runtime) -> ExitCode {
    match cli.command {
        Command::CheckConfig => match Settings::load(cli.config.as_deref()) {
            Ok(s) => {
                print!("{}", s.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run => {
            let settings = match load_for_logging(cli.config.as_deref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            runtime.block_on(async {
                let result = async {
                    let stop = shutdown::on_signals()?;
                    let stats = Arc::new(Stats::default());
                    let listen = settings.http.listen;
                    let stall = settings.pipeline.stall_timeout;
                    let addr = side_port::serve(listen, stats.clone(), stall, stop.clone())
                        .await
                        .with_context(|| format!("binding http.listen {listen}"))?;
                    info!(%addr, "side port serving /healthz /readyz /metrics");
                    // A signal during start-up (broker not reachable yet) ends
                    // the process at once: nothing was consumed.
                    let worker = tokio::select! {
                        w = Worker::build(settings, stats) => w?,
                        _ = stop.cancelled() => return Ok(()),
                    };
                    worker.run_until_stopped(stop).await
                }
                .await;
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        error!(error = format!("{e:#}"), "worker failed");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Replay(args) => {
            let settings = match load_for_logging(cli.config.as_deref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let dry_run = args.dry_run;
            let result = runtime.block_on(async {
                let stop = shutdown::on_signals()?;
                uincall_enricher::replay::run(settings, *args, stop).await
            });
            match result {
                Ok(summary) => {
                    print!("{}", summary.render(dry_run));
                    if summary.failed > 0 || summary.skipped_truncated > 0 {
                        ExitCode::FAILURE
                    } else if summary.interrupted {
                        ExitCode::from(130)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    error!(error = format!("{e:#}"), "replay failed");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            events,
            api_latency_ms,
        } => {
            telemetry::init(&LogSettings {
                format: LogFormat::Text,
                level: "error".into(),
            });
            let opts = uincall_enricher::demo::DemoOptions {
                events,
                api_latency: Duration::from_millis(api_latency_ms),
            };
            match runtime.block_on(uincall_enricher::demo::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
