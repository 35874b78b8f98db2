//! The HTTP side port: `/healthz` (the consume loop is running),
//! `/readyz` (partitions are assigned) and `/metrics` (Prometheus text).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::ErrorClass;
use crate::stats::Stats;

/// The consume loop wakes at least every second; a loop silent for this
/// long is stuck.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(stats);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(addr)
}

async fn healthz(State(stats): State<Arc<Stats>>) -> impl IntoResponse {
    match stats.since_beat() {
        Some(d) if d <= LIVENESS_LIMIT => (StatusCode::OK, "ok\n".to_string()),
        Some(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("consume loop silent for {}s\n", d.as_secs()),
        ),
        None => (StatusCode::OK, "starting\n".to_string()),
    }
}

async fn readyz(State(stats): State<Arc<Stats>>) -> impl IntoResponse {
    let assigned = Stats::get(&stats.assigned_partitions);
    if assigned > 0 {
        (
            StatusCode::OK,
            format!("ready: {assigned} partitions assigned\n"),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no partition assigned\n".to_string(),
        )
    }
}

async fn metrics(State(stats): State<Arc<Stats>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&stats),
    )
}

/// Prometheus text exposition of the worker's counters.
pub fn render(stats: &Stats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let g = Stats::get;
    metric(
        "uincall_enricher_records_consumed_total",
        "counter",
        "Input records taken for processing.",
        &[("", g(&stats.consumed))],
    );
    metric(
        "uincall_enricher_records_enriched_total",
        "counter",
        "Enriched records acknowledged by the broker.",
        &[("", g(&stats.enriched))],
    );
    let by_class: Vec<(String, u64)> = ErrorClass::ALL
        .iter()
        .map(|c| (format!("{{error_class=\"{c}\"}}"), stats.dead_lettered(*c)))
        .collect();
    let by_class: Vec<(&str, u64)> = by_class.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "uincall_enricher_records_dead_lettered_total",
        "counter",
        "Dead letters acknowledged by the broker, by error class.",
        &by_class,
    );
    metric(
        "uincall_enricher_api_calls_total",
        "counter",
        "Calls to the Uincall call-detail API.",
        &[("", g(&stats.api_calls))],
    );
    metric(
        "uincall_enricher_api_retries_total",
        "counter",
        "API calls after the first one of a record.",
        &[("", g(&stats.retries))],
    );
    metric(
        "uincall_enricher_offsets_stored_total",
        "counter",
        "Times a partition's committable offset advanced.",
        &[("", g(&stats.offsets_stored))],
    );
    metric(
        "uincall_enricher_records_in_flight",
        "gauge",
        "Records being processed now.",
        &[("", g(&stats.in_flight))],
    );
    metric(
        "uincall_enricher_partitions_paused",
        "gauge",
        "1 while the assigned partitions are paused.",
        &[(
            "",
            stats.paused.load(std::sync::atomic::Ordering::Relaxed) as u64,
        )],
    );
    metric(
        "uincall_enricher_partitions_assigned",
        "gauge",
        "Input partitions assigned to this worker.",
        &[("", g(&stats.assigned_partitions))],
    );
    out
}
