//! uincall-enricher: reads Uincall call-ended events from Kafka, fetches each
//! call's full record from the Uincall OpenAPI, and publishes an enriched
//! record (or a dead letter with the reason) at least once.
//!
//! Where things live:
//! - [`settings`]: layered configuration, validation, redacted printing.
//! - [`event`]: the call-ended event and why one is invalid.
//! - [`uincall`]: the HTTP client and the per-tenant access tokens.
//! - [`detail`]: the API's call record, read leniently into stable types.
//! - [`classify`]: one pure function turning an API answer into a decision.
//! - [`retry`]: backoff, attempt and time budgets, shutdown-aware waits.
//! - [`systemic`]: when the API fails as a whole: the breaker and its probe
//!   task.
//! - [`tenants`]: a tenant whose token is refused is held alone (its own
//!   breaker and probe); the others go on.
//! - [`rate_limit`]: calls per second per tenant, back-off on "too many".
//! - [`labels`]: decoded labels for the coded fields.
//! - [`record`]: the enriched record and its headers.
//! - [`dead_letter`]: the dead-letter record's `dlq.*` headers (written and
//!   read back as one typed value) and error classes.
//! - [`offsets`]: per-partition tracking of the committable offset.
//! - [`membership`]: the worker's standing in its consumer group, for
//!   liveness.
//! - [`pipeline`]: the worker: the consume loop and its phases, flow control,
//!   one record's enrichment, publishing (shared with replay), the
//!   consumer's callbacks.
//! - [`replay`]: dead letters back to the input topic (or enriched directly):
//!   filters, positions, re-submission, summary.
//! - [`ingest`]: the push receiver: Uincall's HTTP pushes into the input
//!   topic, answered once the broker acknowledged them.
//! - [`backfill`]: call-ended events from Uincall's call list, for calls
//!   whose event never arrived (and the nightly reconcile).
//! - [`kafka`]: librdkafka client configuration, the start-up connection
//!   check.
//! - [`producer`]: the produce policy, and the Kafka producer that replaces
//!   itself when stuck.
//! - [`stats`]: metrics and their log lines, one method per event.
//! - [`telemetry`]: logging set-up; [`otel`]: trace context in and out,
//!   spans, OTLP export.
//! - [`side_port`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token.
//! - [`demo`] (feature `demo`, on by default): the whole pipeline on
//!   embedded defaults, with [`fake_api`] (a local fake of the Uincall API)
//!   and [`topics`] (produce and read back), which tests and benchmarks
//!   use too. The Apache Kafka test brokers live in `tests/testkit`.

pub mod answers;
pub mod backfill;
pub mod classify;
pub mod dead_letter;
#[cfg(feature = "demo")]
pub mod demo;
pub mod detail;
pub mod event;
#[cfg(feature = "demo")]
pub mod fake_api;
pub mod ingest;
pub mod kafka;
pub mod labels;
pub mod membership;
pub mod offsets;
pub mod otel;
pub mod pipeline;
pub mod producer;
#[cfg(test)]
mod properties;
pub mod rate_limit;
pub mod record;
pub mod replay;
pub mod retry;
pub mod settings;
pub mod shutdown;
pub mod side_port;
pub mod stats;
pub mod systemic;
pub mod telemetry;
pub mod tenants;
#[cfg(feature = "demo")]
pub mod topics;
pub mod uincall;
