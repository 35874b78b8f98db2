//! Integration tests: the real worker against Apache Kafka (its own JVM
//! process, KRaft) and an HTTP server speaking the Uincall API. Tests share
//! one broker per run with their own topics, group and API port; the
//! broker-fault tests start a three-node cluster of their own.

mod backfill;
mod brokers;
mod crash;
mod delivery;
mod faults;
mod group;
mod helpers;
mod ingest;
mod interop;
mod jaeger_receiver;
mod replay;
mod retries;
mod secrets;
mod secured;
mod shared_calls;
mod side_port;
mod tenants;
#[path = "../testkit/mod.rs"]
mod testkit;
mod traces;
