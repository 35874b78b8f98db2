//! The worker: consume call-ended events, enrich each one concurrently, publish
//! the enriched record or a dead letter, and store an input offset only once
//! everything below it in its partition is acknowledged by the broker.
//!
//! `Worker::build` connects and checks the topics; `run_until_stopped` runs
//! until the shutdown token fires, then drains, flushes, commits and leaves
//! the group.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::classify::{ApiFailure, ErrcodePolicy, Verdict, classify};
use crate::dead_letter::{self, DeadLetter, ErrorClass, header as dlq};
use crate::event::{InvalidEvent, parse_event};
use crate::kafka;
use crate::offsets::{Assignment, Ticket};
use crate::rate_limit::RateLimits;
use crate::record::{self, Source};
use crate::retry::{self, Gate, RetryOutcome, RetryPolicy};
use crate::settings::Settings;
use crate::stats::Stats;
use crate::systemic::{Breaker, CallOutcome, Cause, DeadLetterGate, ProbeTarget};
use crate::uincall::{Timed, TokenStore, UincallClient};

/// How often a progress line is logged while records flow.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// How long the window may stay full before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Flow-control state of the consume loop.
#[derive(Debug, Default)]
struct Flow {
    paused: bool,
    /// The API is in systemic failure: stay paused whatever the window.
    systemic: bool,
    /// Since when the in-flight window has been full.
    full_since: Option<tokio::time::Instant>,
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Consumer callbacks: a revocation drains the revoked partitions' records
/// for `pipeline.revoke_drain`, then cancels and forgets them; an assigned
/// partition takes the consume loop's pause state; librdkafka's own logs go
/// to `tracing`.
pub struct WorkerContext {
    assignment: Arc<Assignment>,
    stats: Arc<Stats>,
    /// The consume loop's pause state, for partitions assigned meanwhile
    /// (librdkafka keeps an application pause across a revocation).
    paused: AtomicBool,
    revoke_drain: Duration,
}

/// Runs `f`, which blocks, without stalling the runtime: on a
/// multi-threaded runtime's worker the other tasks move to other threads.
/// `None` on a current-thread runtime, where blocking would stop the very
/// tasks being waited for.
fn blocking<T>(f: impl FnOnce() -> T) -> Option<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::CurrentThread) => None,
        Ok(_) => Some(tokio::task::block_in_place(f)),
        Err(_) => Some(f()),
    }
}

impl ClientContext for WorkerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.stats.kafka_statistics(&statistics);
    }
}

fn log_librdkafka(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            error!(target: "librdkafka", fac, "{message}")
        }
        L::Warning => warn!(target: "librdkafka", fac, "{message}"),
        L::Notice | L::Info => info!(target: "librdkafka", fac, "{message}"),
        L::Debug => debug!(target: "librdkafka", fac, "{message}"),
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = partitions(tpl);
            // Records that finish within the drain store their offsets
            // (committed with the revocation); the rest are cancelled. A
            // lost assignment (session timed out) commits nothing: no drain.
            let lost = consumer.assignment_lost();
            let drain = if lost {
                Duration::ZERO
            } else {
                self.revoke_drain
            };
            let done = blocking(|| self.assignment.revoke(&revoked, drain))
                .unwrap_or_else(|| self.assignment.revoke(&revoked, Duration::ZERO));
            info!(
                lost,
                partitions = ?revoked,
                drained = done.drained,
                cancelled = done.cancelled,
                "partitions revoked"
            );
            self.stats.partitions_changed(&revoked, false);
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                let paused = self.paused.load(Ordering::SeqCst);
                info!(partitions = ?assigned, paused, "partitions assigned");
                let applied = if paused {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(e) = applied {
                    warn!(error = %e, "setting the pause state of assigned partitions failed");
                }
                self.stats.partitions_changed(&assigned, true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.stats.offsets_committed(true);
                debug!(offsets = ?offsets.to_topic_map(), "offsets committed")
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.stats.offsets_committed(false);
                warn!(error = %e, "offset commit failed; it is retried at the next interval")
            }
        }
    }
}

/// An input record, copied out of the consumer so a task can own it.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub source: Source,
}

impl InRecord {
    pub fn from_message(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        InRecord {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            source: Source {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
            },
        }
    }
}

impl InRecord {
    /// The record's own headers for producing it again: any `dlq.*` of an
    /// earlier failure dropped.
    pub fn headers_without_dlq(&self) -> OwnedHeaders {
        self.headers
            .iter()
            .filter(|(k, _)| !k.starts_with(dlq::PREFIX))
            .fold(OwnedHeaders::new(), |hs, (k, v)| {
                hs.insert(Header {
                    key: k,
                    value: v.as_deref(),
                })
            })
    }
}

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Enriched,
    DeadLettered(ErrorClass),
    /// Shutdown came first; the offset stays unstored and is re-delivered.
    Abandoned,
}

/// A produce that did not get an acknowledgement.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProduceError {
    /// The broker refuses this record (e.g. too large): it never will take it.
    #[error("the broker refused the record: {0}")]
    Rejected(KafkaError),
    /// The producer cannot go on (authorisation, idempotence state).
    #[error("the producer failed for good: {0}")]
    Fatal(KafkaError),
    #[error("shutdown before the broker acknowledged")]
    Abandoned,
}

/// What to do about a produce error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProducePolicy {
    /// The broker may take it later (timeouts, leader changes, a corrupt
    /// batch on the wire).
    Retry,
    /// The broker refuses this record and always will (too large, invalid).
    Reject,
    /// The producer cannot go on (authorisation, idempotence state).
    Fatal,
}

pub(crate) fn produce_policy(e: &KafkaError) -> ProducePolicy {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidRecord) => {
            ProducePolicy::Reject
        }
        Some(
            C::Fatal
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidProducerIdMapping
            | C::UnsupportedForMessageFormat,
        ) => ProducePolicy::Fatal,
        // CORRUPT_MESSAGE (InvalidMessage) included: a batch damaged in
        // transit is sent again.
        _ => ProducePolicy::Retry,
    }
}

/// What every record task needs.
pub struct Enricher {
    settings: Arc<Settings>,
    client: UincallClient,
    tokens: TokenStore,
    errcodes: ErrcodePolicy,
    retry: RetryPolicy,
    breaker: Breaker,
    limits: RateLimits,
    producer: FutureProducer,
    /// The smallest `max.message.bytes` of the output and dead-letter
    /// topics, when the cluster told it.
    max_message_bytes: Option<usize>,
    stats: Arc<Stats>,
    /// `pipeline.max_in_flight` permits: records between their first API
    /// call and their verdict (retries and waits at the gate included).
    enriching: Semaphore,
}

/// What a record waits for before each API call: the end of a systemic
/// failure, then its tenant's rate limit.
struct RecordGate<'a> {
    breaker: &'a Breaker,
    limits: &'a RateLimits,
    tenant: &'a str,
}

impl Gate for RecordGate<'_> {
    async fn pass(&self, shutdown: &CancellationToken) -> bool {
        self.breaker.wait_closed(shutdown).await && self.limits.acquire(self.tenant, shutdown).await
    }
}

/// Records the worker holds between consume and acknowledgement for a
/// window of `max_in_flight`: that many being enriched, and as many again
/// whose enriched record (or dead letter) waits for the broker's
/// acknowledgement, so the API calls go on while the broker writes.
pub fn admitted_limit(max_in_flight: usize) -> usize {
    max_in_flight.saturating_mul(2)
}

fn probe_target(event: &crate::event::CallEnded) -> ProbeTarget {
    ProbeTarget {
        session_id: event.session_id.clone(),
        tenant_id: event.tenant_id.clone(),
        call_type: event.call_type,
    }
}

impl Enricher {
    /// The API client, tokens, policies and the producer, from the settings;
    /// the producer's batches sized to the output and dead-letter topics'
    /// `max.message.bytes` when the cluster tells it.
    pub async fn build(settings: Arc<Settings>, stats: Arc<Stats>) -> anyhow::Result<Enricher> {
        let k = &settings.kafka;
        let max_bytes = kafka::max_message_bytes(k, &[&k.output_topic, &k.dead_letter_topic]).await;
        let producer: FutureProducer = kafka::producer_config(k, max_bytes)
            .create()
            .context("creating the Kafka producer")?;
        let tokens = TokenStore::from_settings(&settings.api)?;
        if tokens.tenants() == 0 {
            warn!(
                "no access tokens are configured: every event will be dead-lettered as invalid_event"
            );
        }
        Ok(Enricher {
            client: UincallClient::new(&settings.api, settings.pipeline.max_in_flight)?,
            tokens,
            errcodes: ErrcodePolicy::from_settings(&settings.retry),
            retry: RetryPolicy::from_settings(&settings.retry),
            breaker: Breaker::new(&settings.systemic),
            limits: RateLimits::new(&settings.rate_limit),
            producer,
            max_message_bytes: max_bytes,
            stats,
            enriching: Semaphore::new(settings.pipeline.max_in_flight),
            settings,
        })
    }

    /// Starts what runs beside the record tasks until `stop`: the
    /// systemic-failure probe and the token reload.
    pub fn start_helpers(self: &Arc<Self>, stop: &CancellationToken) -> [JoinHandle<()>; 2] {
        [
            tokio::spawn(self.clone().supervise_systemic(stop.clone())),
            tokio::spawn(self.clone().reload_tokens(stop.clone())),
        ]
    }

    /// Enriches one record and publishes it, or dead-letters it; returns
    /// once the broker acknowledged either (or shutdown came first).
    pub async fn process(
        &self,
        rec: InRecord,
        stop: CancellationToken,
    ) -> Result<Disposition, anyhow::Error> {
        let s = &self.settings;
        let event = match parse_event(
            rec.payload.as_deref(),
            &s.event,
            s.api.default_tenant.as_deref(),
        ) {
            Ok(e) => e,
            Err(invalid) => {
                return self
                    .dead_letter(
                        &rec,
                        DeadLetter::invalid(invalid.to_string(), None, None),
                        &stop,
                    )
                    .await;
            }
        };
        let span = tracing::Span::current();
        span.record("session_id", event.session_id.as_str());
        span.record("tenant_id", event.tenant_id.as_str());
        let Some(token) = self.tokens.get(&event.tenant_id) else {
            let reason = InvalidEvent::UnknownTenant(event.tenant_id.clone()).to_string();
            let dl = DeadLetter::invalid(
                reason,
                Some(event.tenant_id.clone()),
                Some(event.session_id.clone()),
            );
            return self.dead_letter(&rec, dl, &stop).await;
        };
        let latency_us = std::sync::atomic::AtomicU64::new(0);
        let gate = RecordGate {
            breaker: &self.breaker,
            limits: &self.limits,
            tenant: &event.tenant_id,
        };
        let slot = tokio::select! {
            slot = self.enriching.acquire() => slot.expect("the semaphore is never closed"),
            _ = stop.cancelled() => return Ok(Disposition::Abandoned),
        };
        let outcome = loop {
            let outcome = retry::run(&self.retry, &stop, &gate, |attempt| {
                let (latency_us, started_with) = (&latency_us, &token);
                let event = &event;
                async move {
                    // A rotated token is used from the next call on.
                    let token = self
                        .tokens
                        .get(&event.tenant_id)
                        .unwrap_or_else(|| started_with.clone());
                    let (t, verdict) = self
                        .call(
                            &event.session_id,
                            &event.tenant_id,
                            event.call_type,
                            &token,
                            attempt,
                        )
                        .await;
                    latency_us.store(t.latency.as_micros() as u64, Ordering::Relaxed);
                    self.breaker
                        .on_call(CallOutcome::of(&t.answer, &verdict), || probe_target(event));
                    match &verdict {
                        Verdict::RateLimited(f) => {
                            let wait = self.limits.limited(&event.tenant_id, f.retry_after);
                            self.stats.api_rate_limited(&f.reason, wait);
                        }
                        _ => self.limits.answered(&event.tenant_id),
                    }
                    match verdict {
                        // The API as a whole fails: not this record's attempt.
                        Verdict::Retry(f) if self.breaker.is_open() => Verdict::Systemic(f),
                        v => v,
                    }
                }
            })
            .await;
            match &outcome {
                RetryOutcome::Permanent(..) | RetryOutcome::Exhausted(..)
                    if self.breaker.on_dead_letter(|| probe_target(&event))
                        == DeadLetterGate::Hold =>
                {
                    debug!("dead letter held during systemic failure; the record starts over");
                    if !self.breaker.wait_closed(&stop).await {
                        return Ok(Disposition::Abandoned);
                    }
                    continue;
                }
                RetryOutcome::Done(..) => self.breaker.on_enriched(|| probe_target(&event)),
                _ => {}
            }
            break outcome;
        };
        // The next record's calls start while this one is published.
        drop(slot);
        let failed = |class: ErrorClass, f: ApiFailure, a: &retry::Attempts| DeadLetter {
            class,
            reason: f.reason,
            errcode: f.errcode,
            errmsg: f.errmsg,
            http_status: f.http_status,
            attempts: a.count,
            first_attempt_at: Some(a.first_at),
            last_attempt_at: Some(a.last_at),
            tenant_id: Some(event.tenant_id.clone()),
            session_id: Some(event.session_id.clone()),
        };
        match outcome {
            RetryOutcome::Abandoned => Ok(Disposition::Abandoned),
            RetryOutcome::Permanent(f, a) => {
                self.dead_letter(&rec, failed(ErrorClass::PermanentError, f, &a), &stop)
                    .await
            }
            RetryOutcome::Exhausted(f, a) => {
                self.dead_letter(&rec, failed(ErrorClass::RetriesExhausted, f, &a), &stop)
                    .await
            }
            RetryOutcome::Done(call, attempts) => {
                let payload = record::to_json(&record::Inputs {
                    session_id: &event.session_id,
                    tenant_id: &event.tenant_id,
                    event: &event.raw,
                    call: &call,
                    satisfaction_labels: &s.labels.satisfaction,
                    fetched_at: attempts.last_at,
                    attempts: attempts.count,
                    api_latency: Duration::from_micros(latency_us.load(Ordering::Relaxed)),
                    source: &rec.source,
                });
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: record::header::TENANT_ID,
                        value: Some(event.tenant_id.as_str()),
                    })
                    .insert(Header {
                        key: record::header::SCHEMA_VERSION,
                        value: Some(&record::SCHEMA_VERSION.to_string()),
                    })
                    .insert(Header {
                        key: record::header::CONTENT_TYPE,
                        value: Some(record::CONTENT_TYPE),
                    });
                let produced = self
                    .produce(
                        &s.kafka.output_topic,
                        Some(event.session_id.as_bytes()),
                        &payload,
                        &headers,
                        &stop,
                    )
                    .await;
                match produced {
                    Ok(()) => {
                        self.stats.record_enriched(attempts.count);
                        Ok(Disposition::Enriched)
                    }
                    Err(ProduceError::Abandoned) => Ok(Disposition::Abandoned),
                    Err(ProduceError::Fatal(e)) => Err(e).context("publishing an enriched record"),
                    Err(e @ ProduceError::Rejected(_)) => {
                        let dl = failed(
                            ErrorClass::PublishFailed,
                            ApiFailure::new(e.to_string()),
                            &attempts,
                        );
                        self.dead_letter(&rec, dl, &stop).await
                    }
                }
            }
        }
    }

    /// Publishes the original bytes with the failure in `dlq.*` headers.
    /// When the topic refuses it (too large once the headers are added), a
    /// smaller one follows: the value cut, the original headers left out,
    /// `dlq.truncated_to` and `dlq.original_size` saying so.
    async fn dead_letter(
        &self,
        rec: &InRecord,
        dl: DeadLetter,
        stop: &CancellationToken,
    ) -> Result<Disposition, anyhow::Error> {
        let s = &self.settings;
        let dlq_headers = dl.headers(&rec.source, &s.kafka.group_id, Utc::now());
        let with = |headers: OwnedHeaders, extra: &[(&str, String)]| {
            dlq_headers
                .iter()
                .map(|(k, v)| (*k, v))
                .chain(extra.iter().map(|(k, v)| (*k, v)))
                .fold(headers, |hs, (k, v)| {
                    hs.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    })
                })
        };
        let payload = rec.payload.as_deref().unwrap_or_default();
        let (topic, key) = (&s.kafka.dead_letter_topic, rec.key.as_deref());
        let full = with(rec.headers_without_dlq(), &[]);
        let mut result = self.produce(topic, key, payload, &full, stop).await;
        for size in dead_letter::truncated_sizes(payload.len(), self.max_message_bytes) {
            let Err(ProduceError::Rejected(e)) = &result else {
                break;
            };
            warn!(error = %e, original_size = payload.len(), truncated_to = size, "the dead-letter topic refused the dead letter; writing it truncated");
            let extra = [
                (dlq::TRUNCATED_TO, size.to_string()),
                (dlq::ORIGINAL_SIZE, payload.len().to_string()),
            ];
            let headers = with(OwnedHeaders::new(), &extra);
            result = self
                .produce(topic, key, &payload[..size], &headers, stop)
                .await;
        }
        match result {
            Ok(()) => {
                self.stats.record_dead_lettered(&dl);
                Ok(Disposition::DeadLettered(dl.class))
            }
            Err(ProduceError::Abandoned) => Ok(Disposition::Abandoned),
            Err(e) => Err(anyhow::Error::new(e)).context(format!(
                "writing to the dead-letter topic {}; the record stays uncommitted",
                s.kafka.dead_letter_topic
            )),
        }
    }

    /// Produces until acknowledged, retrying what the broker may accept later.
    async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &OwnedHeaders,
        stop: &CancellationToken,
    ) -> Result<(), ProduceError> {
        let mut delay = Duration::from_millis(200);
        loop {
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(payload)
                .headers(headers.clone());
            if let Some(k) = key {
                rec = rec.key(k);
            }
            let timeout = Timeout::After(self.settings.kafka.produce_timeout);
            let err = match self.producer.send(rec, timeout).await {
                Ok(_) => return Ok(()),
                Err((e, _)) => e,
            };
            match produce_policy(&err) {
                ProducePolicy::Reject => return Err(ProduceError::Rejected(err)),
                ProducePolicy::Fatal => return Err(ProduceError::Fatal(err)),
                ProducePolicy::Retry => {
                    warn!(topic, error = %err, retry_in = ?delay, "produce failed, retrying")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(ProduceError::Abandoned),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

impl Enricher {
    /// One call-detail request, classified with the token removed from
    /// every text, and counted; `attempt` is the record's attempt it would
    /// be (0 for a probe).
    async fn call(
        &self,
        session_id: &str,
        tenant_id: &str,
        call_type: Option<i64>,
        token: &SecretString,
        attempt: u32,
    ) -> (Timed, Verdict) {
        let timed = self
            .client
            .fetch_detail(session_id, tenant_id, token, call_type)
            .await;
        let verdict = classify(&timed.answer, &self.errcodes).redact(token.expose_secret());
        self.stats.api_call(&verdict, timed.latency, attempt);
        (timed, verdict)
    }

    /// Follows the systemic-failure state: on entering it, logs and counts
    /// once, probes the API with backoff until an answer shows it works,
    /// then closes the breaker (records resume, the consume loop resumes).
    async fn supervise_systemic(self: Arc<Self>, stop: CancellationToken) {
        let mut state = self.breaker.subscribe();
        loop {
            let cause = tokio::select! {
                _ = stop.cancelled() => return,
                open = state.wait_for(Option::is_some) => match open {
                    Ok(cause) => cause.clone().expect("waited for Some"),
                    Err(_) => return,
                },
            };
            let since = tokio::time::Instant::now();
            self.stats.systemic_entered(&cause);
            if !self.probe_until_healed(&cause, &stop).await {
                return;
            }
            self.breaker.close();
            self.stats.systemic_left(since.elapsed());
        }
    }

    /// Calls the API about a session (one it answered before, when there
    /// is one) with a doubling delay; `false` on shutdown.
    async fn probe_until_healed(&self, cause: &Cause, stop: &CancellationToken) -> bool {
        let s = &self.settings.systemic;
        let mut delay = s.probe_min_delay;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            let target = self.breaker.probe_target(cause);
            let known_good = self.breaker.has_good();
            let token = target.as_ref().and_then(|t| self.tokens.get(&t.tenant_id));
            let reason = match (target, token) {
                (Some(t), Some(token)) => {
                    let (answer, verdict) = tokio::select! {
                        _ = stop.cancelled() => return false,
                        a = self.call(&t.session_id, &t.tenant_id, t.call_type, &token, 0) => a,
                    };
                    if Breaker::heals(cause, &answer.answer, &verdict, known_good) {
                        return true;
                    }
                    verdict.failure().map_or_else(
                        || "answered, but not a record".to_string(),
                        |f| f.reason.clone(),
                    )
                }
                (Some(t), None) => format!("no access token for tenant {}", t.tenant_id),
                (None, _) => "no session to probe with yet".to_string(),
            };
            delay = (delay * 2).min(s.probe_max_delay);
            self.stats.probe_failed(&reason, delay);
        }
    }

    /// Reads `api.tokens_dir` again every `api.tokens_reload_interval`.
    async fn reload_tokens(self: Arc<Self>, stop: CancellationToken) {
        let api = &self.settings.api;
        let Some(dir) = &api.tokens_dir else { return };
        let mut every = tokio::time::interval(api.tokens_reload_interval);
        every.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            match self.tokens.reload_dir(dir) {
                Ok(0) => {}
                Ok(changed) => info!(
                    changed,
                    tenants = self.tokens.tenants(),
                    "access tokens reloaded from api.tokens_dir"
                ),
                Err(e) => warn!(
                    error = format!("{e:#}"),
                    "reading api.tokens_dir failed; the tokens in use are kept"
                ),
            }
        }
    }
}

/// A record task's report to the consume loop (its offset is already
/// stored by then).
type Completion = Result<Disposition, anyhow::Error>;

/// The enrichment worker.
pub struct Worker {
    settings: Arc<Settings>,
    consumer: Arc<StreamConsumer<WorkerContext>>,
    enricher: Arc<Enricher>,
    assignment: Arc<Assignment>,
    stats: Arc<Stats>,
}

impl Worker {
    /// Creates the clients and checks that the three topics exist.
    pub async fn build(settings: Settings, stats: Arc<Stats>) -> anyhow::Result<Worker> {
        let settings = Arc::new(settings);
        let k = &settings.kafka;
        let assignment = Arc::new(Assignment::default());
        let consumer: StreamConsumer<WorkerContext> = kafka::consumer_config(k)
            .create_with_context(WorkerContext {
                assignment: assignment.clone(),
                stats: stats.clone(),
                paused: AtomicBool::new(false),
                revoke_drain: settings.pipeline.revoke_drain,
            })
            .context("creating the Kafka consumer")?;
        let consumer = Arc::new(consumer);
        let enricher = Arc::new(Enricher::build(settings.clone(), stats.clone()).await?);
        let worker = Worker {
            settings,
            consumer,
            enricher,
            assignment,
            stats,
        };
        worker.check_topics().await?;
        Ok(worker)
    }

    async fn check_topics(&self) -> anyhow::Result<()> {
        let k = &self.settings.kafka;
        let consumer = self.consumer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(None, Timeout::After(Duration::from_secs(30)))
        })
        .await?
        .with_context(|| format!("reading metadata from kafka.brokers {}", k.brokers))?;
        for (key, topic) in [
            ("kafka.input_topic", &k.input_topic),
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
        ] {
            let found = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !found {
                bail!(
                    "topic `{topic}` ({key}) does not exist on {}; create it first",
                    k.brokers
                );
            }
        }
        Ok(())
    }

    /// Consumes until `shutdown` fires, then drains within
    /// `pipeline.drain_timeout`, flushes, commits and leaves the group.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let s = self.settings.clone();
        self.consumer
            .subscribe(&[&s.kafka.input_topic])
            .context("subscribing to kafka.input_topic")?;
        info!(
            topic = %s.kafka.input_topic,
            group = %s.kafka.group_id,
            max_in_flight = s.pipeline.max_in_flight,
            "worker started"
        );
        // Cancelled when draining starts: no new attempts, no backoff waits.
        let stop_work = CancellationToken::new();
        let mut systemic = self.enricher.breaker.subscribe();
        let helpers = self.enricher.start_helpers(&stop_work);
        let mut tasks: JoinSet<Completion> = JoinSet::new();
        let mut flow = Flow::default();
        let pause_after = PAUSE_AFTER.min(s.kafka.max_poll_interval / 2);
        let mut fatal: Option<anyhow::Error> = None;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        // Wakes the loop at least once a second, so liveness reflects a
        // loop that runs, not one that happens to have records.
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    info!(in_flight = tasks.len(), "shutdown requested, draining");
                    break;
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = complete(joined) {
                        error!(error = format!("{e:#}"), "fatal error, stopping the worker");
                        fatal = Some(e);
                        break;
                    }
                }
                // While the window is full, records wait in librdkafka's
                // queue; polling resumes when there is room or once paused.
                msg = self.consumer.recv(), if flow.paused || tasks.len() < admitted_limit(s.pipeline.max_in_flight) => match msg {
                    Ok(m) => {
                        let rec = InRecord::from_message(&m);
                        drop(m);
                        self.spawn(&mut tasks, rec, &stop_work);
                    }
                    Err(e) => warn!(error = %e, "kafka consume error"),
                },
                _ = sleep_until_some(flow.full_since.map(|t| t + pause_after)), if !flow.paused => {
                    self.set_paused(true, tasks.len(), &mut flow);
                }
                Ok(()) = systemic.changed() => {
                    flow.systemic = systemic.borrow_and_update().is_some();
                    if flow.systemic {
                        self.set_paused(true, tasks.len(), &mut flow);
                    }
                }
                _ = progress.tick() => self.log_progress(tasks.len()),
                _ = heartbeat.tick() => self.settle_idle_partitions(&stop_work),
            }
            self.stats.beat();
            self.flow_control(tasks.len(), &mut flow);
        }
        stop_work.cancel();
        for h in helpers {
            let _ = h.await;
        }
        self.drain(&mut tasks).await;
        self.finish().await;
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn spawn(&self, tasks: &mut JoinSet<Completion>, rec: InRecord, stop: &CancellationToken) {
        self.stats.record_consumed();
        let src = &rec.source;
        let ticket = self
            .assignment
            .start(&src.topic, src.partition, src.offset, stop);
        let span = info_span!(
            "record",
            partition = src.partition,
            offset = src.offset,
            session_id = tracing::field::Empty,
            tenant_id = tracing::field::Empty,
        );
        let enricher = self.enricher.clone();
        let (assignment, consumer, stats) = (
            self.assignment.clone(),
            self.consumer.clone(),
            self.stats.clone(),
        );
        tasks.spawn(
            async move {
                let source = rec.source.clone();
                let result = enricher.process(rec, ticket.cancel.clone()).await;
                if matches!(
                    result,
                    Ok(Disposition::Enriched | Disposition::DeadLettered(_))
                ) {
                    store_finished(&assignment, &consumer, &stats, &source, &ticket);
                }
                result
            }
            .instrument(span),
        );
    }

    /// Stores the consumer's position for partitions with nothing in
    /// flight: past transaction markers (which deliver no record), so a
    /// transactionally written input shows no lag once all is done.
    fn settle_idle_partitions(&self, stop: &CancellationToken) {
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        let positions = positions
            .elements()
            .into_iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
                _ => None,
            });
        let stored = self
            .assignment
            .settle(positions, stop, |topic, partition, next| {
                store_offset(&self.consumer, topic, partition, next)
            });
        match stored {
            Ok(0) => {}
            Ok(n) => {
                debug!(
                    partitions = n,
                    "idle partitions settled at the consumer position"
                );
                self.stats.offset_stored()
            }
            Err(e) => debug!(error = %e, "idle position not stored"),
        }
    }

    /// Tracks how long the window has been full, and resumes paused
    /// partitions once the window is half empty.
    fn flow_control(&self, in_flight: usize, flow: &mut Flow) {
        self.stats.set_in_flight(in_flight);
        let max = admitted_limit(self.settings.pipeline.max_in_flight);
        if in_flight >= max {
            flow.full_since
                .get_or_insert_with(tokio::time::Instant::now);
        } else {
            flow.full_since = None;
        }
        if flow.paused && !flow.systemic && in_flight <= max / 2 {
            self.set_paused(false, in_flight, flow);
        }
    }

    /// Pauses or resumes every assigned partition (and, through the
    /// context, those assigned later). Pausing lets the consume
    /// loop go on polling (group membership, rebalances) without taking
    /// records; librdkafka drops what it prefetched and fetches it again on
    /// resume, which is why the loop first just stops taking records and
    /// pauses only when the window stays full for `PAUSE_AFTER`.
    fn set_paused(&self, pause: bool, in_flight: usize, flow: &mut Flow) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = result {
            warn!(error = %e, "pause/resume failed");
            return;
        }
        if flow.paused != pause {
            debug!(paused = pause, in_flight, "flow control");
        }
        flow.paused = pause;
        self.consumer
            .context()
            .paused
            .store(pause, Ordering::SeqCst);
        self.stats.set_paused(pause);
    }

    async fn drain(&self, tasks: &mut JoinSet<Completion>) {
        let deadline = tokio::time::sleep(self.settings.pipeline.drain_timeout);
        tokio::pin!(deadline);
        while !tasks.is_empty() {
            tokio::select! {
                _ = &mut deadline => {
                    // Finished records stored their offsets already.
                    warn!(abandoned = tasks.len(), "drain deadline reached; abandoned records will be re-delivered");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
                Some(joined) = tasks.join_next() => {
                    if let Err(e) = complete(joined) {
                        error!(error = format!("{e:#}"), "error while draining");
                    }
                }
            }
        }
    }

    async fn finish(&self) {
        let producer = self.enricher.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r.map_err(anyhow::Error::from));
        if let Err(e) = flushed {
            warn!(error = %e, "producer flush incomplete");
        }
        let consumer = self.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await
                .unwrap_or(Err(KafkaError::Canceled));
        match committed {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                warn!(error = %e, "final commit failed; uncommitted records will be re-delivered")
            }
        }
        self.consumer.unsubscribe();
        self.log_progress(0);
        info!("worker stopped");
    }

    fn log_progress(&self, in_flight: usize) {
        let st = &self.stats;
        info!(
            consumed = st.consumed(),
            enriched = st.enriched(),
            dead_lettered = st.dead_lettered_total(),
            retries = st.retries(),
            systemic_failure = st.is_systemic(),
            in_flight,
            "progress"
        );
    }
}

/// Stores a finished record's partition position when it advanced.
fn store_finished(
    assignment: &Assignment,
    consumer: &StreamConsumer<WorkerContext>,
    stats: &Stats,
    src: &Source,
    ticket: &Ticket,
) {
    stats.partition_moved(&src.topic, src.partition);
    let stored = assignment.finish(&src.topic, src.partition, src.offset, ticket.id, |next| {
        store_offset(consumer, &src.topic, src.partition, next)
    });
    match stored {
        None => {}
        Some(Ok(())) => stats.offset_stored(),
        // The partition was revoked meanwhile: its new owner re-reads.
        Some(Err(e)) => debug!(error = %e, partition = src.partition, "offset not stored"),
    }
}

fn store_offset(
    consumer: &StreamConsumer<WorkerContext>,
    topic: &str,
    partition: i32,
    next: i64,
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
    consumer.store_offsets(&tpl)
}

/// A record task's end, as the consume loop sees it: an aborted task is an
/// abandoned record; a panic is a bug that must not advance the offset, and
/// a fatal error stops the worker (the record is re-delivered).
fn complete(joined: Result<Completion, tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(result) => result.map(|_| ()),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => bail!("a record task panicked: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_errors_map_to_retry_reject_or_fatal() {
        let policy = |code| produce_policy(&KafkaError::MessageProduction(code));
        use RDKafkaErrorCode as C;
        // CORRUPT_MESSAGE: a batch damaged on the wire is sent again.
        assert_eq!(policy(C::InvalidMessage), ProducePolicy::Retry);
        assert_eq!(policy(C::MessageTimedOut), ProducePolicy::Retry);
        assert_eq!(policy(C::NotLeaderForPartition), ProducePolicy::Retry);
        assert_eq!(policy(C::MessageSizeTooLarge), ProducePolicy::Reject);
        assert_eq!(policy(C::InvalidRecord), ProducePolicy::Reject);
        assert_eq!(policy(C::TopicAuthorizationFailed), ProducePolicy::Fatal);
    }
}
