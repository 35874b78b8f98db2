//! One record, start to end: parse the event, fetch its call record from the
//! API (retries, rate limits, systemic failure), then publish the enriched
//! record or a dead letter and wait for the broker's acknowledgement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use rdkafka::message::OwnedHeaders;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use super::input::InRecord;
use super::publish::{Outgoing, ProduceError, Publisher};
use super::transactions::Transactions;
use super::window::{Place, Window};
use crate::answers::{Answered, Answers, CallKey, Turn};
use crate::classify::{ApiAnswer, ApiFailure, ErrcodePolicy, Verdict, classify};
use crate::dead_letter::{DeadLetter, ErrorClass};
use crate::detail::CallDetail;
use crate::event::{CallEnded, InvalidEvent, parse_event};
use crate::otel;
use crate::rate_limit::RateLimits;
use crate::record;
use crate::retry::{self, Attempts, Gate, RetryOutcome, RetryPolicy};
use crate::settings::{HeldOverflow, Settings};
use crate::stats::Stats;
use crate::systemic::{Breaker, CallOutcome, Cause, DeadLetterGate, Probe, ProbeTarget};
use crate::tenants::{NewTenants, Tenants};
use crate::uincall::{Timed, TokenStore, UincallClient};

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Enriched,
    DeadLettered(ErrorClass),
    /// The dead-letter topic refused its dead letter at every size: passed
    /// over (logged with its place, counted), so that one record cannot
    /// stop the partition.
    Unwritable(ErrorClass),
    /// Shutdown came first; the offset stays unstored and is re-delivered.
    Abandoned,
}

/// What the API calls about one record came to.
enum Fetched {
    Record {
        call: Box<CallDetail>,
        attempts: Attempts,
        latency: Duration,
        /// Another record's answer (`record::Enrichment::reused`).
        reused: Option<&'static str>,
    },
    Failed(DeadLetter),
    Abandoned,
}

/// What every record task needs.
pub struct Enricher {
    settings: Arc<Settings>,
    client: UincallClient,
    tokens: TokenStore,
    errcodes: ErrcodePolicy,
    retry: RetryPolicy,
    breaker: Arc<Breaker>,
    tenants: Tenants,
    /// Breakers of newly held tenants, for the task that probes them.
    new_tenants: Mutex<Option<NewTenants>>,
    limits: RateLimits,
    publisher: Publisher,
    stats: Arc<Stats>,
    /// `pipeline.max_in_flight` places, shared between tenants: records
    /// between their first API call and their verdict (retries and waits at
    /// the gate included).
    window: Window,
    /// Calls shared by the records of one session, and answers kept.
    answers: Arc<Answers>,
}

/// What a record's last API call was: how long it took, and whether it was
/// another record's (joined while under way).
#[derive(Default)]
struct LastCall {
    latency_us: AtomicU64,
    joined: std::sync::atomic::AtomicBool,
}

/// What a record waits for before each API call: its tenant not held (the
/// record gives its window place back meanwhile and counts as held), a
/// place in the window (within its tenant's share while others wait), the
/// end of a systemic failure, then its tenant's rate limit.
struct RecordGate<'a> {
    enricher: &'a Enricher,
    tenant: &'a str,
    /// The record's `pipeline.max_in_flight` place, while it has one.
    slot: Mutex<Option<Place>>,
    /// Why the record could not wait for its held tenant
    /// (`pipeline.held_overflow`): it is dead-lettered as `tenant_held`.
    spilled: Mutex<Option<String>>,
    /// Whether it waited for its tenant before: it keeps its claim to wait
    /// (a newer record cannot take its room).
    waited: std::sync::atomic::AtomicBool,
    /// When it first waited for its held tenant (`pipeline.max_hold`).
    waiting_since: Mutex<Option<Instant>>,
}

impl<'a> RecordGate<'a> {
    fn new(enricher: &'a Enricher, tenant: &'a str) -> Self {
        RecordGate {
            enricher,
            tenant,
            slot: Mutex::new(None),
            spilled: Mutex::new(None),
            waited: std::sync::atomic::AtomicBool::new(false),
            waiting_since: Mutex::new(None),
        }
    }

    /// Waits while the tenant is held, without a window place and counted
    /// as held; `false` on shutdown, or when the record cannot wait (see
    /// [`RecordGate::spilled`]).
    async fn wait_for_tenant(&self, stop: &CancellationToken) -> bool {
        let e = self.enricher;
        while let Some(held) = e.tenants.get(self.tenant).filter(|b| b.is_open()) {
            self.slot.lock().unwrap().take();
            let waited_before = self.waited.swap(true, Ordering::SeqCst);
            let room = e.room_to_hold().filter(|_| !waited_before);
            let _counted = match room {
                None => e.tenants.hold(),
                Some(room) => match e.tenants.try_hold(room) {
                    Some(counted) => counted,
                    // Shutdown or a revocation: abandoned, not dead-lettered.
                    None if stop.is_cancelled() => return false,
                    None => {
                        let cause = held.cause().map(|c| c.to_string()).unwrap_or_default();
                        *self.spilled.lock().unwrap() = Some(format!(
                            "tenant {} is held ({cause}) and pipeline.max_held_records ({}) records wait already; replay it once the tenant is resumed",
                            self.tenant, e.settings.pipeline.max_held_records
                        ));
                        return false;
                    }
                },
            };
            let since = *self
                .waiting_since
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
            let bound = since + e.settings.pipeline.max_hold;
            let _waiting = e.stats.waiting_at_gate();
            tokio::select! {
                closed = held.wait_closed(stop) => if !closed {
                    return false;
                },
                () = tokio::time::sleep_until(bound) => {
                    // Past the bound it goes only while others go on: a
                    // failure of every tenant with traffic waits.
                    if e.room_to_hold().is_some() {
                        let cause = held.cause().map(|c| c.to_string()).unwrap_or_default();
                        *self.spilled.lock().unwrap() = Some(format!(
                            "tenant {} is held ({cause}) and this record waited pipeline.max_hold ({}) while other tenants went on; replay it once the tenant is resumed",
                            self.tenant,
                            humantime::format_duration(e.settings.pipeline.max_hold)
                        ));
                        return false;
                    }
                    // Checked again after another bound's worth of waiting.
                    *self.waiting_since.lock().unwrap() = Some(Instant::now());
                }
            }
        }
        true
    }

    /// The dead letter of a record that could not wait for its held tenant.
    fn spilled(&self, event: &CallEnded) -> Option<DeadLetter> {
        let reason = self.spilled.lock().unwrap().take()?;
        Some(DeadLetter::tenant_held(reason, event))
    }

    /// Takes a window place unless the record has one; `false` on shutdown.
    async fn take_slot(&self, stop: &CancellationToken) -> bool {
        if self.slot.lock().unwrap().is_some() {
            return true;
        }
        let slot = tokio::select! {
            slot = self.enricher.window.acquire(self.tenant) => slot,
            _ = stop.cancelled() => return false,
        };
        *self.slot.lock().unwrap() = Some(slot);
        true
    }
}

impl Gate for RecordGate<'_> {
    async fn pass(&self, shutdown: &CancellationToken) -> bool {
        let e = self.enricher;
        self.wait_for_tenant(shutdown).await
            && self.take_slot(shutdown).await
            && e.wait_breaker_closed(shutdown).await
            && e.limits.acquire(self.tenant, shutdown).await
    }
}

/// The probe of one held tenant: asks with the worker's client and the
/// tenant's token, reports per tenant (it does not make the worker unready
/// unless every tenant is held).
struct TenantProbe {
    enricher: Arc<Enricher>,
    tenant: String,
}

impl Probe for TenantProbe {
    async fn ask(&self, t: &ProbeTarget) -> Result<(ApiAnswer, Verdict), String> {
        self.enricher.ask(t).await
    }

    fn opened(&self, cause: &Cause) {
        self.enricher.stats.tenant_held(&self.tenant, cause);
    }

    fn failed(&self, reason: &str, next_in: Duration) {
        self.enricher.stats.probe_failed(reason, next_in);
    }

    fn closed(&self, lasted: Duration) {
        self.enricher.stats.tenant_released(&self.tenant, lasted);
    }

    fn gave_up(&self, cause: &Cause, lasted: Duration) {
        self.enricher.stats.tenant_released(&self.tenant, lasted);
        (self.enricher.stats).dead_letter_hold_given_up(cause, Some(&self.tenant));
    }
}

fn probe_target(event: &CallEnded) -> ProbeTarget {
    ProbeTarget {
        session_id: event.session_id.clone(),
        tenant_id: event.tenant_id.clone(),
        call_type: event.call_type,
    }
}

/// The enriched record's headers (CloudEvents' too when `cloudevents`
/// names the source), with the trace context of its `send` span.
fn enriched_headers(
    event: &CallEnded,
    cloudevents: Option<&str>,
    fetched_at: chrono::DateTime<Utc>,
    send: &tracing::Span,
) -> OwnedHeaders {
    let mut ours = vec![
        (record::header::TENANT_ID, event.tenant_id.clone()),
        (
            record::header::SCHEMA_VERSION,
            record::SCHEMA_VERSION.to_string(),
        ),
        (
            record::header::CONTENT_TYPE,
            record::CONTENT_TYPE.to_string(),
        ),
    ];
    if let Some(source) = cloudevents {
        ours.extend(record::cloudevents_headers(
            source,
            &event.session_id,
            fetched_at,
        ));
    }
    let ours = ours.iter().map(|(k, v)| (*k, Some(v.as_bytes())));
    otel::with_trace(ours, send)
}

impl Enricher {
    /// The API client, tokens, policies and the producer, from the settings.
    pub async fn build(settings: Arc<Settings>, stats: Arc<Stats>) -> anyhow::Result<Enricher> {
        let k = &settings.kafka;
        let topics = [k.output_topic.as_str(), k.dead_letter_topic.as_str()];
        let publisher = Publisher::new(&settings, stats.clone(), &topics).await?;
        let tokens = TokenStore::from_settings(&settings.api)?;
        if tokens.tenants() == 0 {
            warn!(
                "no access tokens are configured: every event will be dead-lettered as invalid_event"
            );
        }
        let p = &settings.pipeline;
        let window = Window::new(p.max_in_flight, p.max_in_flight_per_tenant());
        let r = &settings.retry;
        let listed = [
            &r.permanent_errcodes,
            &r.systemic_errcodes,
            &r.rate_limited_errcodes,
        ];
        stats.set_errcode_labels(listed.into_iter().flatten().copied());
        let (tenants, new_tenants) = Tenants::new(&settings.systemic);
        let enricher = Enricher {
            client: UincallClient::new(&settings.api, settings.pipeline.max_in_flight)?
                .with_tenant_bases(&settings.tenants),
            tenants,
            new_tenants: Mutex::new(Some(new_tenants)),
            tokens,
            errcodes: ErrcodePolicy::from_settings(&settings.retry),
            retry: RetryPolicy::from_settings(&settings.retry),
            breaker: Arc::new(Breaker::new(&settings.systemic)),
            limits: RateLimits::new(&settings.rate_limit, &settings.tenants),
            publisher,
            stats,
            window,
            answers: Answers::new(
                settings.api.recent_answers_bytes,
                settings.api.recent_answers_ttl,
            ),
            settings,
        };
        enricher.tokens_known();
        Ok(enricher)
    }

    /// Outputs of input records are committed in `transactions` from now on
    /// (`kafka.delivery = "exactly_once"`).
    pub fn with_transactions(self, transactions: Arc<Transactions>) -> Enricher {
        Enricher {
            publisher: self.publisher.with_transactions(transactions),
            ..self
        }
    }

    /// The smallest `max.message.bytes` of the output topics, when known.
    pub fn max_message_bytes(&self) -> Option<usize> {
        self.publisher.max_message_bytes()
    }

    /// Tells what depends on which tenants have a token: the readiness
    /// count, the `tenant` label, the window's share (at start and after
    /// every reload).
    fn tokens_known(&self) {
        let count = self.tokens.tenants();
        self.stats.set_known_tenants(count);
        let labelled: Vec<String> = (self.settings.tenants.keys().cloned())
            .chain(self.tokens.tenant_ids())
            .collect();
        let max = self.settings.http.tenant_labels;
        (self.stats).label_tenants(max, labelled.iter().map(String::as_str));
        self.window.set_tenants(count);
    }

    /// Starts what runs beside the record tasks until `stop`: the
    /// systemic-failure probe and the token reload.
    pub fn start_helpers(self: &Arc<Self>, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        let mut helpers = vec![
            self.breaker.start_probe(self.clone(), stop.clone()),
            tokio::spawn(self.clone().reload_tokens(stop.clone())),
        ];
        if let Some(new_tenants) = self.new_tenants.lock().unwrap().take() {
            helpers.push(tokio::spawn(
                self.clone().probe_tenants(new_tenants, stop.clone()),
            ));
        }
        helpers
    }

    /// Starts the probe of each tenant's breaker as it is created; runs
    /// until `stop`, then waits for the probes.
    async fn probe_tenants(self: Arc<Self>, mut created: NewTenants, stop: CancellationToken) {
        let mut probes = Vec::new();
        loop {
            let (tenant, breaker) = tokio::select! {
                _ = stop.cancelled() => break,
                next = created.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            let probe = Arc::new(TenantProbe {
                enricher: self.clone(),
                tenant,
            });
            probes.push(breaker.start_probe(probe, stop.clone()));
        }
        for p in probes {
            let _ = p.await;
        }
    }

    /// With `pipeline.held_overflow = "dead_letter"` while some tenant
    /// with traffic (a record read within five minutes) is not held, and
    /// the worker as a whole is not in systemic failure: how many records
    /// of held tenants may wait, `pipeline.max_held_records`. `None`: held
    /// records always wait; when every tenant with traffic is held the
    /// failure is the worker's, and no record is dead-lettered for the sake
    /// of a tenant without records (a tenant with a token and no traffic
    /// does not count).
    ///
    /// Records over their tenant's share are not subtracted: they share the
    /// bound in what the consume loop counts, but they drain, so as held
    /// records grow the loop reads less ahead of the other tenants (down to
    /// the window) rather than a held record being dead-lettered for
    /// another tenant's read-ahead.
    fn room_to_hold(&self) -> Option<usize> {
        let p = &self.settings.pipeline;
        if p.held_overflow != HeldOverflow::DeadLetter || self.breaker.is_open() {
            return None;
        }
        let active = self.stats.active_tenants();
        let others_go_on = active.iter().any(|t| !self.tenants.is_held(t));
        others_go_on.then_some(p.max_held_records)
    }

    /// Records waiting now for their held tenant, and for a window place
    /// while their tenant holds its share or more.
    pub fn waiting_records(&self) -> (usize, usize) {
        (self.tenants.held_records(), self.window.over_share())
    }

    /// The systemic-failure state (the consume loop pauses on it).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Waits until the worker's breaker is closed, counted meanwhile as a
    /// record waiting at its gate (a revocation does not wait for it);
    /// `false` on shutdown.
    async fn wait_breaker_closed(&self, stop: &CancellationToken) -> bool {
        if !self.breaker.is_open() {
            return true;
        }
        let _waiting = self.stats.waiting_at_gate();
        self.breaker.wait_closed(stop).await
    }

    /// Waits up to `limit` for what the producer still holds.
    pub async fn flush(&self, limit: Duration) -> anyhow::Result<()> {
        self.publisher.flush(limit).await
    }

    /// Parses, enriches and publishes one record, or dead-letters it;
    /// returns once the broker acknowledged either (or shutdown came first).
    /// The work runs in the record's span, made once the event is read so
    /// that its session and tenant are there from the start.
    pub async fn process(
        &self,
        rec: InRecord,
        stop: CancellationToken,
    ) -> Result<Disposition, anyhow::Error> {
        let event = self.read_event(&rec);
        let group = &self.settings.kafka.group_id;
        let span = otel::record_span(&rec.source, group, &rec.headers, event.as_ref().ok());
        self.process_event(rec, event, stop).instrument(span).await
    }

    async fn process_event(
        &self,
        rec: InRecord,
        event: Result<CallEnded, Box<DeadLetter>>,
        stop: CancellationToken,
    ) -> Result<Disposition, anyhow::Error> {
        let (event, token) = match event.and_then(|e| self.token_of(e)) {
            Ok(parsed) => parsed,
            Err(dl) => return self.dead_letter(&rec, *dl, &stop).await,
        };
        self.stats.tenant_seen(&event.tenant_id);
        match self.fetch(&event, &token, &stop).await {
            Fetched::Abandoned => Ok(Disposition::Abandoned),
            Fetched::Failed(dl) => self.dead_letter(&rec, dl, &stop).await,
            Fetched::Record {
                call,
                attempts,
                latency,
                reused,
            } => {
                let fetched = (call.as_ref(), &attempts, latency, reused);
                self.publish(&rec, &event, fetched, &stop).await
            }
        }
    }

    /// The event, or the dead letter of an unreadable one.
    fn read_event(&self, rec: &InRecord) -> Result<CallEnded, Box<DeadLetter>> {
        let s = &self.settings;
        // An event without a tenant field: the tenant whose push URL it came
        // through (`uincall-enricher ingest`), else `api.default_tenant`.
        let default_tenant =
            (rec.header(crate::event::TENANT_HEADER)).or(s.api.default_tenant.as_deref());
        parse_event(rec.payload.as_deref(), &s.event, default_tenant)
            .map_err(|invalid| Box::new(DeadLetter::invalid(invalid.to_string(), None, None)))
    }

    /// The event with its tenant's token, or the dead letter of an event of
    /// a tenant without one.
    fn token_of(&self, event: CallEnded) -> Result<(CallEnded, SecretString), Box<DeadLetter>> {
        match self.tokens.get(&event.tenant_id) {
            Some(token) => Ok((event, token)),
            None => Err(Box::new(DeadLetter::invalid(
                InvalidEvent::UnknownTenant(event.tenant_id.clone()).to_string(),
                Some(event.tenant_id),
                Some(event.session_id),
            ))),
        }
    }

    /// Calls the API, within the window of `pipeline.max_in_flight`, until
    /// a verdict is final. A dead letter held (its tenant held, or the API
    /// failing as a whole) starts over once that ends.
    async fn fetch(
        &self,
        event: &CallEnded,
        token: &SecretString,
        stop: &CancellationToken,
    ) -> Fetched {
        let key = CallKey::new(&event.tenant_id, &event.session_id, event.call_type);
        if let Some(kept) = self.recent_answer(&key) {
            return kept;
        }
        // Dropped on return with its window place: the next record's calls
        // start while this one is published.
        let gate = RecordGate::new(self, &event.tenant_id);
        let last_call = LastCall::default();
        let (last, key) = (&last_call, &key);
        loop {
            let outcome = retry::run(&self.retry, stop, &gate, move |n| {
                self.attempt(event, key, token, n, last)
            })
            .await;
            let failed = |class, f, a: Attempts| {
                Fetched::Failed(DeadLetter::after_attempts(class, f, &a, event))
            };
            return match outcome {
                RetryOutcome::Abandoned => match gate.spilled(event) {
                    Some(dl) => Fetched::Failed(dl),
                    None => Fetched::Abandoned,
                },
                RetryOutcome::Permanent(..) | RetryOutcome::Exhausted(..)
                    if self.holds_dead_letter(event) =>
                {
                    debug!(
                        "dead letter held (tenant held or systemic failure); the record starts over"
                    );
                    if !(gate.wait_for_tenant(stop).await && self.wait_breaker_closed(stop).await) {
                        return gate
                            .spilled(event)
                            .map_or(Fetched::Abandoned, Fetched::Failed);
                    }
                    continue;
                }
                RetryOutcome::Permanent(f, a) => failed(ErrorClass::PermanentError, f, a),
                RetryOutcome::Exhausted(f, a) => failed(ErrorClass::RetriesExhausted, f, a),
                RetryOutcome::Done(call, attempts) => {
                    self.records_breaker(event)
                        .on_enriched(|| probe_target(event));
                    let latency = last_call.latency_us.load(Ordering::Relaxed);
                    let joined = last_call.joined.load(Ordering::Relaxed);
                    Fetched::Record {
                        call,
                        attempts,
                        latency: Duration::from_micros(latency),
                        reused: joined.then_some("in_flight"),
                    }
                }
            };
        }
    }

    /// The record of a session whose answer was kept
    /// (`api.recent_answers_ttl`): no call, no window place.
    fn recent_answer(&self, key: &CallKey) -> Option<Fetched> {
        let kept = self.answers.recent(key)?;
        let answer = ApiAnswer::Http {
            status: 200,
            retry_after: None,
            body: kept.body,
        };
        let Verdict::Publish(call) = classify(&answer, &self.errcodes) else {
            return None;
        };
        self.stats.api_call_saved("recent");
        let at = kept.fetched_at;
        Some(Fetched::Record {
            call,
            attempts: Attempts {
                count: 1,
                first_at: at,
                last_at: at,
            },
            latency: kept.latency,
            reused: Some("recent"),
        })
    }

    /// Whether a record's dead letter must wait: its tenant is held, the
    /// API fails as a whole, or this dead letter makes too many (of its
    /// tenant's records when there are several tenants, else of all).
    fn holds_dead_letter(&self, event: &CallEnded) -> bool {
        let gate = self.records_breaker(event);
        self.tenants.is_held(&event.tenant_id)
            || self.breaker.is_open()
            || gate.on_dead_letter(|| probe_target(event)) == DeadLetterGate::Hold
    }

    /// The breaker told of each record's outcome (enriched or
    /// dead-lettered): with several tenants the record's tenant's, so a
    /// flood of one tenant's dead letters holds that tenant only; with one,
    /// the worker's.
    fn records_breaker(&self, event: &CallEnded) -> Arc<Breaker> {
        if self.tokens.tenants() > 1 {
            self.tenants.breaker(&event.tenant_id)
        } else {
            self.breaker.clone()
        }
    }

    /// The breaker told of a call's outcome: a systemic errcode is the
    /// tenant's (its token), as is anything from a tenant's API of its own
    /// (`tenants.<id>.base_url`); the rest tells about the API as a whole.
    fn calls_breaker(&self, tenant: &str, outcome: &CallOutcome) -> Arc<Breaker> {
        let own_api = (self.settings.tenants.get(tenant)).is_some_and(|t| t.base_url.is_some());
        if own_api || matches!(outcome, CallOutcome::Systemic(_)) {
            self.tenants.breaker(tenant)
        } else {
            self.breaker.clone()
        }
    }

    /// One API call for the record (attempt `n`), or the outcome of the
    /// call another record of its session has under way. The record making
    /// the call tells the breaker and the rate limits of its outcome; a
    /// failure while the API fails as a whole is not the record's attempt.
    async fn attempt(
        &self,
        event: &CallEnded,
        key: &CallKey,
        started_with: &SecretString,
        n: u32,
        last: &LastCall,
    ) -> Verdict {
        let (answered, joined) = loop {
            let leader = match self.answers.turn(key.clone()) {
                Turn::Join(joined) => match joined.outcome().await {
                    Some(answered) => break (answered.as_ref().clone(), true),
                    // The record making it went away: this one calls.
                    None => continue,
                },
                Turn::Lead(leader) => leader,
            };
            let answered = self.own_attempt(event, started_with, n).await;
            leader.done(&answered, Utc::now());
            (self.stats).recent_answers_kept(self.answers.kept_bytes());
            break (answered, false);
        };
        if joined {
            self.stats.api_call_saved("in_flight");
        }
        let latency = answered.timed.latency.as_micros() as u64;
        last.latency_us.store(latency, Ordering::Relaxed);
        last.joined.store(joined, Ordering::Relaxed);
        let verdict = self.breaker.blame(answered.verdict);
        match self.tenants.get(&event.tenant_id) {
            Some(held) => held.blame(verdict),
            None => verdict,
        }
    }

    /// The record's own API call, with the breaker and the rate limits
    /// told of its outcome.
    async fn own_attempt(
        &self,
        event: &CallEnded,
        started_with: &SecretString,
        n: u32,
    ) -> Answered {
        // A rotated token is used from the next call on.
        let token = self
            .tokens
            .get(&event.tenant_id)
            .unwrap_or_else(|| started_with.clone());
        let (session, tenant) = (&event.session_id, &event.tenant_id);
        let (timed, verdict) = self.call(session, tenant, event.call_type, &token, n).await;
        let outcome = CallOutcome::of(&timed.answer, &verdict);
        (self.calls_breaker(tenant, &outcome)).on_call(outcome, || probe_target(event));
        match &verdict {
            Verdict::RateLimited(f) => {
                let wait = self.limits.limited(tenant, f.retry_after);
                self.stats.api_rate_limited(&f.reason, wait);
            }
            _ => self.limits.answered(tenant),
        }
        Answered { timed, verdict }
    }

    /// Publishes the enriched record; one the output topic refuses (too
    /// large) is dead-lettered as `publish_failed`.
    async fn publish(
        &self,
        rec: &InRecord,
        event: &CallEnded,
        (call, attempts, api_latency, reused): (
            &CallDetail,
            &Attempts,
            Duration,
            Option<&'static str>,
        ),
        stop: &CancellationToken,
    ) -> Result<Disposition, anyhow::Error> {
        let s = &self.settings;
        let payload = record::to_json(&record::Inputs {
            session_id: &event.session_id,
            tenant_id: &event.tenant_id,
            event: &event.raw,
            call,
            satisfaction_labels: &s.labels.satisfaction,
            fetched_at: attempts.last_at,
            attempts: attempts.count,
            api_latency,
            source: &rec.source,
            reused,
        });
        let send = otel::record_send_span(&s.kafka.output_topic);
        let h = &s.headers;
        let cloudevents = h.cloudevents.then_some(h.cloudevents_source.as_str());
        let headers = enriched_headers(event, cloudevents, attempts.last_at, &send);
        let out = Outgoing {
            topic: &s.kafka.output_topic,
            key: Some(event.session_id.as_bytes()),
            payload: &payload,
            headers: &headers,
            origin: rec.origin.as_ref(),
        };
        match self.publisher.send(out, stop).instrument(send).await {
            Ok(()) => {
                (self.stats).record_end_to_end("enriched", rec.source.timestamp_ms);
                self.stats.record_enriched(attempts.count);
                (self.stats).record_tenant(Some(&event.tenant_id), "enriched");
                Ok(Disposition::Enriched)
            }
            Err(ProduceError::Abandoned) => Ok(Disposition::Abandoned),
            Err(e @ ProduceError::Fatal(_)) => {
                Err(anyhow::Error::new(e)).context("publishing an enriched record")
            }
            Err(e @ ProduceError::Rejected(_)) => {
                let failure = ApiFailure::new(e.to_string());
                let dl =
                    DeadLetter::after_attempts(ErrorClass::PublishFailed, failure, attempts, event);
                self.dead_letter(rec, dl, stop).await
            }
        }
    }

    /// Publishes `rec`'s dead letter: its own key, value and headers with
    /// the failure's `dlq.*` headers.
    async fn dead_letter(
        &self,
        rec: &InRecord,
        dl: DeadLetter,
        stop: &CancellationToken,
    ) -> Result<Disposition, anyhow::Error> {
        let k = &self.settings.kafka;
        let stamp = dl.stamp(&rec.source, &k.group_id, Utc::now());
        let span = tracing::Span::current();
        otel::set_error(&span, dl.class.as_str(), &dl.reason);
        let send = otel::record_send_span(&k.dead_letter_topic);
        let headers = otel::with_trace(rec.headers_without_dlq(), &send);
        let out = Outgoing {
            topic: &k.dead_letter_topic,
            key: rec.key.as_deref(),
            payload: rec.payload.as_deref().unwrap_or_default(),
            headers: &headers,
            origin: rec.origin.as_ref(),
        };
        let written = self.publisher.dead_letter(out, &stamp, stop);
        match written.instrument(send).await {
            Ok(()) => {
                (self.stats).record_end_to_end("dead_lettered", rec.source.timestamp_ms);
                self.stats.record_dead_lettered(&dl);
                (self.stats).record_tenant(dl.tenant_id.as_deref(), "dead_lettered");
                Ok(Disposition::DeadLettered(dl.class))
            }
            Err(ProduceError::Abandoned) => Ok(Disposition::Abandoned),
            Err(ProduceError::Rejected(e)) => {
                let src = &rec.source;
                error!(
                    error = %e,
                    error_class = %dl.class,
                    reason = %dl.reason,
                    topic = %src.topic,
                    partition = src.partition,
                    offset = src.offset,
                    dead_letter_topic = %k.dead_letter_topic,
                    "the dead-letter topic refused this record's dead letter at every size; passing over it (it is still on its topic at this offset until retention)"
                );
                self.stats.record_unwritable();
                Ok(Disposition::Unwritable(dl.class))
            }
            Err(e) => Err(anyhow::Error::new(e)).context(format!(
                "writing to the dead-letter topic {}; the record stays uncommitted",
                k.dead_letter_topic
            )),
        }
    }

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
        let url = || (self.client).url_for_traces(session_id, tenant_id, call_type);
        let span = otel::api_span(url, attempt);
        let timed = (self.client)
            .fetch_detail(session_id, tenant_id, token, call_type)
            .instrument(span.clone())
            .await;
        let verdict = classify(&timed.answer, &self.errcodes).redact(token.expose_secret());
        otel::api_answered(&span, &timed.answer, &verdict);
        self.stats.api_call(&verdict, timed.latency, attempt);
        (timed, verdict)
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
                Ok(changed) => {
                    self.tokens_known();
                    info!(
                        changed,
                        tenants = self.tokens.tenants(),
                        "access tokens reloaded from api.tokens_dir"
                    )
                }
                Err(e) => warn!(
                    error = format!("{e:#}"),
                    "reading api.tokens_dir failed; the tokens in use are kept"
                ),
            }
        }
    }
}

/// The systemic-failure probe asks with the worker's client and tokens and
/// reports to its metrics.
impl Probe for Enricher {
    async fn ask(&self, t: &ProbeTarget) -> Result<(ApiAnswer, Verdict), String> {
        let token = self
            .tokens
            .get(&t.tenant_id)
            .ok_or_else(|| format!("no access token for tenant {}", t.tenant_id))?;
        let (timed, verdict) = self
            .call(&t.session_id, &t.tenant_id, t.call_type, &token, 0)
            .await;
        Ok((timed.answer, verdict))
    }

    fn opened(&self, cause: &Cause) {
        self.stats.systemic_entered(cause);
    }

    fn failed(&self, reason: &str, next_in: Duration) {
        self.stats.probe_failed(reason, next_in);
    }

    fn closed(&self, lasted: Duration) {
        self.stats.systemic_left(lasted);
    }

    fn gave_up(&self, cause: &Cause, lasted: Duration) {
        self.stats.systemic_left(lasted);
        self.stats.dead_letter_hold_given_up(cause, None);
    }
}
