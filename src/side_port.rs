//! The HTTP side port: `/healthz` (the consume loop runs and no assigned
//! partition with a backlog is stuck), `/readyz` (partitions assigned, a
//! broker connected, the API not in systemic failure) and `/metrics`
//! (OpenMetrics text, see [`crate::stats`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// The consume loop wakes at least every second; a loop silent for this
/// long is stuck.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Side {
    stats: Arc<Stats>,
    /// `pipeline.stall_timeout`.
    stall_timeout: Duration,
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<Stats>,
    stall_timeout: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Side {
            stats,
            stall_timeout,
        });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(addr)
}

fn unavailable(why: String) -> (StatusCode, String) {
    (StatusCode::SERVICE_UNAVAILABLE, why)
}

async fn healthz(State(side): State<Side>) -> impl IntoResponse {
    let stats = &side.stats;
    match stats.since_beat() {
        None => return (StatusCode::OK, "starting\n".to_string()),
        Some(d) if d > LIVENESS_LIMIT => {
            return unavailable(format!("consume loop silent for {}s\n", d.as_secs()));
        }
        Some(_) => {}
    }
    // Waiting out a systemic failure, or a held tenant, is intended, not a
    // stall: a restart would not help (readiness and metrics report it).
    if !stats.is_systemic()
        && stats.held_tenants().is_empty()
        && let Some((topic, partition, still)) = stats.stalled_partition(side.stall_timeout)
    {
        return unavailable(format!(
            "stalled: {topic}/{partition} has a backlog and no record finished for {}s\n",
            still.as_secs()
        ));
    }
    (StatusCode::OK, "ok\n".to_string())
}

async fn readyz(State(side): State<Side>) -> impl IntoResponse {
    let stats = &side.stats;
    let assigned = stats.assigned_partitions();
    let held = stats.held_tenants();
    let held_text = held
        .iter()
        .map(|(t, why)| format!("{t} ({why})"))
        .collect::<Vec<_>>()
        .join(", ");
    if stats.is_systemic() {
        unavailable("not ready: systemic failure of the API (see the log and uincall_enricher_systemic_failure)\n".to_string())
    } else if stats.every_tenant_held() {
        unavailable(format!(
            "not ready: systemic failure of every tenant: {held_text} (see uincall_enricher_tenant_held)\n"
        ))
    } else if !stats.broker_reachable() {
        unavailable("not ready: no Kafka broker connected\n".to_string())
    } else if assigned == 0 {
        unavailable("not ready: no partition assigned\n".to_string())
    } else {
        let held = match held.is_empty() {
            true => String::new(),
            false => format!("; held tenants: {held_text}"),
        };
        (
            StatusCode::OK,
            format!("ready: {assigned} partitions assigned{held}\n"),
        )
    }
}

async fn metrics(State(side): State<Side>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        side.stats.encode(),
    )
}
