//! The worker: consume call-ended events, enrich each one concurrently,
//! publish the enriched record or a dead letter, and store an input offset
//! only once everything below it in its partition is acknowledged by the
//! broker.
//!
//! - [`worker`]: the consume loop and its phases (consuming, draining,
//!   done); each record in a task of its own that stores its offset.
//! - [`flow`]: when the loop takes records, pauses and resumes (pure).
//! - [`enrich`]: one record: parse, fetch from the API, publish or
//!   dead-letter.
//! - [`publish`]: producing until acknowledged, the produce policy, dead
//!   letters cut to fit (shared with `replay`).
//! - [`context`]: the consumer's callbacks (rebalances, commits, logs).
//! - [`input`]: the input record, owned by its task.

mod context;
mod enrich;
mod flow;
mod input;
mod publish;
mod worker;

pub use enrich::{Disposition, Enricher};
pub use flow::admitted_limit;
pub use input::InRecord;
pub use publish::{Outgoing, ProduceError, ProducePolicy, Publisher, produce_policy};
pub use worker::Worker;
