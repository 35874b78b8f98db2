//! The worker: consume call-ended events, enrich each one concurrently,
//! publish the enriched record or a dead letter, and commit an input offset
//! only once everything below it in its partition is acknowledged by the
//! broker (with what finished past it in the commit's metadata).
//!
//! - [`worker`]: the consume loop and its phases (consuming, draining,
//!   done); each record in a task of its own that finishes its offset.
//! - [`flow`]: when the loop takes records, pauses and resumes (pure).
//! - [`enrich`]: one record: parse, fetch from the API, publish or
//!   dead-letter.
//! - [`publish`]: producing until acknowledged, with backoff; dead letters
//!   cut to fit (shared with `replay`); [`outgoing`] is what it produces.
//! - [`commit`]: committing input offsets, with the records finished past
//!   each in its metadata, and reading that back on assignment.
//! - [`transactions`]: with `kafka.delivery = "exactly_once"`, outputs and
//!   input offsets committed together in Kafka transactions.
//! - [`context`]: the consumer's callbacks (rebalances, commits, logs).
//! - [`input`]: the input record, owned by its task.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tracing::{error, info};

use crate::settings::Settings;
use crate::stats::Stats;
use crate::{shutdown, side_port};

mod commit;
mod context;
mod enrich;
mod flow;
mod input;
mod outgoing;
mod publish;
mod transactions;
mod window;
mod worker;

pub use crate::producer::{ProducePolicy, produce_policy};
pub use enrich::{Disposition, Enricher};
pub use flow::admitted_limit;
pub use input::InRecord;
pub use publish::{Outgoing, ProduceError, Publisher};
pub use worker::Worker;

/// `uincall-enricher run`: serves the side port, runs the worker until
/// SIGTERM or SIGINT (then drains, commits and leaves); exit code 1 when
/// it fails.
pub async fn run(settings: Settings) -> ExitCode {
    match serve(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "worker failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let stats = Arc::new(Stats::default());
    let listen = settings.http.listen;
    let limits = side_port::Liveness {
        stall_timeout: settings.pipeline.stall_timeout,
        rejoin_timeout: settings.kafka.rejoin_timeout,
        held_stops_all: settings.pipeline.held_overflow == crate::settings::HeldOverflow::Wait,
    };
    let addr = side_port::serve(listen, stats.clone(), limits, stop.clone())
        .await
        .with_context(|| format!("binding http.listen {listen}"))?;
    info!(%addr, "side port serving /healthz /readyz /metrics");
    // A signal during start-up (broker not reachable yet) ends the process
    // at once: nothing was consumed.
    let worker = tokio::select! {
        w = Worker::build(settings, stats) => w?,
        _ = stop.cancelled() => return Ok(()),
    };
    worker.run_until_stopped(stop).await
}
