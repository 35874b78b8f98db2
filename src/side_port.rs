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
use tracing::warn;

use crate::stats::Stats;

pub use crate::settings::LIVENESS_LIMIT;

#[derive(Clone)]
struct Side {
    stats: Arc<Stats>,
    limits: Liveness,
}

/// How long a stuck worker is given before `/healthz` fails.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// `pipeline.stall_timeout`: a partition with a backlog and no record
    /// finished.
    pub stall_timeout: Duration,
    /// `kafka.rejoin_timeout`: no group coordinator, or no partition and
    /// not settled in the group.
    pub rejoin_timeout: Duration,
    /// `pipeline.held_overflow = "wait"`: one held tenant makes every
    /// partition wait, as intended (no stall).
    pub held_stops_all: bool,
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<Stats>,
    limits: Liveness,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Side { stats, limits });
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
    if !stats.waiting_is_intended(side.limits.held_stops_all)
        && let Some((topic, partition, still)) = stats.stalled_partition(side.limits.stall_timeout)
    {
        return unavailable(format!(
            "stalled: {topic}/{partition} has a backlog and its position did not move for {}s\n",
            still.as_secs()
        ));
    }
    // Out of the group while the cluster answers: the consumer lost its
    // place and did not find it again.
    if let Some(why) = stats.lost_place(side.limits.rejoin_timeout) {
        warn!(reason = %why, "not alive");
        return unavailable(format!("{why}\n"));
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
            "not ready: systemic failure of every tenant with traffic: {held_text} (see uincall_enricher_tenant_held)\n"
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::{Broker, ConsumerGroup, Statistics};

    /// librdkafka's statistics with the group in `state`/`join_state` and
    /// brokers of the given sources and states.
    fn statistics(state: &str, join_state: &str, brokers: &[(&str, &str)]) -> Statistics {
        let mut s = Statistics {
            cgrp: Some(ConsumerGroup {
                state: state.into(),
                join_state: join_state.into(),
                ..ConsumerGroup::default()
            }),
            ..Statistics::default()
        };
        for (i, (source, broker_state)) in brokers.iter().enumerate() {
            let b = Broker {
                source: source.to_string(),
                state: broker_state.to_string(),
                ..Broker::default()
            };
            s.brokers.insert(format!("b{i}"), b);
        }
        s
    }

    async fn health(stats: &Arc<Stats>, rejoin_timeout: Duration) -> (StatusCode, String) {
        let side = Side {
            stats: stats.clone(),
            limits: Liveness {
                stall_timeout: Duration::from_secs(300),
                rejoin_timeout,
                held_stops_all: false,
            },
        };
        let response = healthz(State(side)).await.into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_worker_that_lost_its_place_and_knows_no_broker_is_not_alive() {
        let stats = Arc::new(Stats::default());
        stats.beat();
        let parts = [("in".to_string(), 0), ("in".to_string(), 1)];
        stats.partitions_changed(&parts, true);
        stats.kafka_statistics(&statistics("up", "steady", &[("learned", "UP")]));
        assert_eq!(health(&stats, Duration::ZERO).await.0, StatusCode::OK);
        // The assignment is lost; librdkafka forgets the only broker (a
        // metadata answer listed none) and stays looking for a coordinator.
        stats.partitions_changed(&parts, false);
        stats.kafka_statistics(&statistics("query-coord", "init", &[("internal", "UP")]));
        let (status, body) = health(&stats, Duration::ZERO).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("state query-coord/init, 0 partitions"),
            "{body}"
        );
        assert_eq!(
            health(&stats, Duration::from_secs(600)).await.0,
            StatusCode::OK
        );
        // A broker that is known but down is an outage, not a lost place...
        stats.kafka_statistics(&statistics("query-coord", "init", &[("learned", "DOWN")]));
        assert_eq!(health(&stats, Duration::ZERO).await.0, StatusCode::OK);
        // ...unless a fresh client gets the cluster's metadata meanwhile.
        stats.cluster_answered();
        assert_eq!(
            health(&stats, Duration::ZERO).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn a_spare_replica_settled_without_partitions_is_alive() {
        let stats = Arc::new(Stats::default());
        stats.beat();
        stats.partitions_changed(&[], true);
        stats.kafka_statistics(&statistics("up", "steady", &[("learned", "UP")]));
        assert_eq!(health(&stats, Duration::ZERO).await.0, StatusCode::OK);
    }
}
