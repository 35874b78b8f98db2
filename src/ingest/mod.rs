//! `uincall-enricher ingest`: receives Uincall's pushes over HTTP and writes
//! the call-ended ones to `kafka.input_topic` (key `session_id`, the body as
//! received, headers for the source, tenant and receive time). A push is
//! answered 200 only after the broker acknowledged it (idempotent producer,
//! `acks=all`), 503 when it did not within `ingest.forward_timeout`, so a
//! sender that retries loses nothing. Each tenant's pushes are
//! authenticated by a secret in the URL path or by HTTP basic auth
//! (Uincall signs nothing); secrets are compared in constant time and never
//! logged. Health checks and metrics are on `http.listen`.

pub mod dedup;
mod logged;
pub mod push;
mod server;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::util::Timeout;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::dead_letter::{ErrorClass, Stamp};
use crate::event::{FLAG_HEADER, NO_ACCESS_TOKEN, TENANT_HEADER};
use crate::kafka;
use crate::producer::{ProducePolicy, RenewingProducer, produce_policy};
use crate::settings::{EventSettings, Settings};
use dedup::Recent;
use logged::{Throttle, shown};
use push::{Decision, Kind, Refusal};

/// Runs the receiver until SIGTERM or SIGINT: then stops accepting, answers
/// the pushes in flight (each waits for its acknowledgement), flushes and
/// exits 0.
pub async fn run(settings: Settings) -> ExitCode {
    let result = match crate::shutdown::on_signals() {
        Ok(stop) => serve(settings, stop).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "ingest failed");
            ExitCode::FAILURE
        }
    }
}

/// What the handlers share.
struct Receiver {
    producer: Arc<RenewingProducer>,
    /// `ingest.forward_timeout`: acknowledgements stopped this long while
    /// pushes wait makes the receiver not ready.
    forward_timeout: Duration,
    topic: String,
    secrets: HashMap<String, SecretString>,
    /// `event.*`: where session and tenant are, as the worker reads them.
    event: EventSettings,
    forward_commands: Vec<String>,
    max_body_bytes: usize,
    allow_from: Vec<IpNet>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Forwarded pushes, for `ingest.dedup_window`.
    forwarded: Option<Recent>,
    /// Places for pushes being read and forwarded (`ingest.max_in_flight`).
    slots: Semaphore,
    /// Stops the receiver; cancelled here too when the producer failed for
    /// good (authorisation, lost idempotence state), so that it exits 1 and
    /// is restarted with a new producer instead of answering 503 for ever.
    stop: CancellationToken,
    /// Why the producer failed for good.
    failure: std::sync::OnceLock<String>,
    /// `ingest.token_tenants` (None: not checked), and the tenants already
    /// logged as flagged.
    token_tenants: Option<HashSet<String>>,
    flagged: Mutex<HashSet<String>>,
    /// `ingest.dead_letter_refused`: where refused bodies go, if anywhere.
    dead_letter_topic: Option<String>,
    /// `headers.kafka_connect`: Kafka Connect's error headers on those.
    connect_headers: bool,
    /// Lines for pushes refused for their secret, and for their source.
    wrong_secret_log: Throttle,
    forbidden_log: Throttle,
    metrics: Metrics,
}

/// Serves pushes on `ingest.listen` and health checks and metrics on
/// `http.listen` until `stop`.
pub async fn serve(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
    let (i, http) = (&settings.ingest, &settings.http);
    let listener = tokio::net::TcpListener::bind(i.listen)
        .await
        .with_context(|| format!("binding ingest.listen {}", i.listen))?;
    let side_listener = tokio::net::TcpListener::bind(http.listen)
        .await
        .with_context(|| format!("binding http.listen {}", http.listen))?;
    serve_on(settings, listener, side_listener, stop).await
}

/// [`serve`] on listeners already bound: pushes on `listener`, health
/// checks and metrics on `side_listener`.
pub async fn serve_on(
    settings: Settings,
    listener: tokio::net::TcpListener,
    side_listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let k = &settings.kafka;
    let i = &settings.ingest;
    kafka::check_connection(k).await?;
    // A producer that failed for good stops the receiver as a signal does.
    let stop = stop.child_token();
    let receiver = Receiver::new(&settings, stop.clone())?;
    let renewals = receiver.clone();
    let watchdog = (receiver.producer).watch(stop.clone(), move || {
        renewals.metrics.producer_renewals.inc();
    });
    let pushes = push_routes(receiver.clone());
    let side = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(receiver.clone());
    if let Some(known) = &receiver.token_tenants {
        for tenant in i.secrets.keys().filter(|t| !known.contains(*t)) {
            warn!(
                tenant,
                "tenant has a push secret but is not in ingest.token_tenants: its pushes will be flagged and dead-lettered by the worker"
            );
        }
    }
    info!(
        addr = %listener.local_addr()?,
        side = %side_listener.local_addr()?,
        topic = %k.input_topic,
        tenants = i.secrets.len(),
        "ingest serving pushes"
    );
    let side_stop = stop.clone();
    // With the push port's bounds too: a stalled probe or scrape must not
    // hold the shutdown either.
    let limits = server::Limits::new(i);
    let side_server = tokio::spawn(server::serve(side_listener, side, limits, side_stop));
    // Graceful: stops accepting, then waits for the requests in flight,
    // each until its record is acknowledged or refused, at most
    // `ingest.shutdown_timeout`.
    server::serve(listener, pushes, limits, stop.clone()).await;
    let _ = side_server.await;
    let _ = watchdog.await;
    let producer = receiver.producer.clone();
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
        .await?
        .context("flushing the producer")?;
    if let Some(why) = receiver.failure.get() {
        anyhow::bail!("the Kafka producer failed for good: {why}");
    }
    info!("ingest stopped");
    Ok(())
}

impl Receiver {
    fn new(settings: &Settings, stop: CancellationToken) -> anyhow::Result<Arc<Receiver>> {
        let (k, i) = (&settings.kafka, &settings.ingest);
        let mut config = kafka::producer_config(k, None);
        // A push waits this long for its acknowledgement; past it librdkafka
        // gives the record up and the sender is told to retry.
        config.set(
            "message.timeout.ms",
            i.forward_timeout.as_millis().to_string(),
        );
        let producer = RenewingProducer::new(config, k.producer_renew_after)
            .map_err(kafka::config_error(k, "creating the Kafka producer"))?;
        let limiter = NonZeroU32::new(i.per_tenant_per_second)
            .map(|n| RateLimiter::keyed(Quota::per_second(n)));
        let forwarded = NonZeroUsize::new(i.dedup_capacity)
            .filter(|_| !i.dedup_window.is_zero())
            .map(|n| Recent::new(n, i.dedup_window));
        Ok(Arc::new(Receiver {
            producer: Arc::new(producer),
            forward_timeout: i.forward_timeout,
            topic: k.input_topic.clone(),
            secrets: i.secrets.clone().into_iter().collect(),
            event: settings.event.clone(),
            forward_commands: i.forward_commands.clone(),
            max_body_bytes: i.max_body_bytes,
            allow_from: i.allow_from.clone(),
            limiter,
            forwarded,
            slots: Semaphore::new(i.max_in_flight),
            stop,
            failure: std::sync::OnceLock::new(),
            token_tenants: (!i.token_tenants.is_empty())
                .then(|| i.token_tenants.iter().cloned().collect()),
            flagged: Mutex::new(HashSet::new()),
            dead_letter_topic: i.dead_letter_refused.then(|| k.dead_letter_topic.clone()),
            connect_headers: settings.headers.kafka_connect,
            wrong_secret_log: Throttle::default(),
            forbidden_log: Throttle::default(),
            metrics: Metrics::new(),
        }))
    }
}

/// The push URLs: the secret in the path, or HTTP basic auth; before
/// either, the source address against `ingest.allow_from`.
fn push_routes(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route(
            "/push/{tenant}/{secret}/{kind}",
            post(push_with_path_secret),
        )
        .route("/push/{kind}", post(push_with_basic_auth))
        .layer(middleware::from_fn_with_state(
            receiver.clone(),
            allowed_source,
        ))
        .with_state(receiver)
}

/// 403 for a connection from outside `ingest.allow_from` (when set). An
/// IPv4 client of a dual-stack listener (`::ffff:a.b.c.d`) is taken as the
/// IPv4 address it is.
async fn allowed_source(State(r): State<Arc<Receiver>>, req: Request, next: Next) -> Response {
    if r.allow_from.is_empty() {
        return next.run(req).await;
    }
    let peer = (req.extensions().get::<ConnectInfo<SocketAddr>>()).map(|c| c.0.ip().to_canonical());
    match peer {
        Some(ip) if r.allow_from.iter().any(|net| net.contains(&ip)) => next.run(req).await,
        _ => {
            let kind = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .and_then(Kind::from_path);
            if let Some(not_logged) = r.forbidden_log.admit() {
                warn!(
                    peer = ?peer,
                    not_logged,
                    "push refused: source not in ingest.allow_from (logged at most once a second; not_logged: those refused since the last line)"
                );
            }
            if let Some(kind) = kind {
                r.metrics.count(kind, "forbidden");
            }
            answer(StatusCode::FORBIDDEN, "forbidden")
        }
    }
}

/// Uincall's answer shape: `{"code":200,"data":null,"msg":"success"}`.
fn answer(status: StatusCode, msg: &str) -> Response {
    let body = json!({"code": status.as_u16(), "data": null, "msg": msg});
    (status, axum::Json(body)).into_response()
}

async fn push_with_path_secret(
    State(r): State<Arc<Receiver>>,
    Path((tenant, secret, kind)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let Some(kind) = Kind::from_path(&kind) else {
        return answer(StatusCode::NOT_FOUND, "not found");
    };
    if !r.authentic(&tenant, &secret) {
        r.log_wrong_secret(Some(&tenant), kind);
        // Not found, as any other unknown URL: a guess learns nothing.
        return r.reply(kind, "unauthorized", StatusCode::NOT_FOUND, "not found");
    }
    r.receive(kind, &tenant, query.get("type").map(String::as_str), body)
        .await
}

async fn push_with_basic_auth(
    State(r): State<Arc<Receiver>>,
    Path(kind): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(kind) = Kind::from_path(&kind) else {
        return answer(StatusCode::NOT_FOUND, "not found");
    };
    match basic_credentials(&headers) {
        Some((tenant, secret)) if r.authentic(&tenant, &secret) => {
            r.receive(kind, &tenant, query.get("type").map(String::as_str), body)
                .await
        }
        credentials => {
            let tenant = credentials.map(|(tenant, _)| tenant);
            r.log_wrong_secret(tenant.as_deref(), kind);
            let mut resp = r.reply(
                kind,
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"uincall-enricher\""),
            );
            resp
        }
    }
}

/// The tenant and secret of an `Authorization: Basic` header (the scheme
/// in any case, as RFC 9110 has it).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (tenant, secret) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((tenant.to_string(), secret.to_string()))
}

impl Receiver {
    /// Logs a push refused for its secret with the tenant its URL names
    /// (never the secret; cut to 64 characters), at most once a second: the
    /// sender chooses both how many and the tenant string, so the log is
    /// not theirs to fill. Every one is counted (`result="unauthorized"`).
    fn log_wrong_secret(&self, tenant: Option<&str>, kind: Kind) {
        if let Some(not_logged) = self.wrong_secret_log.admit() {
            info!(
                tenant = tenant.map(shown),
                kind = kind.name(),
                not_logged,
                "push refused: wrong secret (logged at most once a second; not_logged: those refused since the last line)"
            );
        }
    }

    /// Whether `secret` is `tenant`'s push secret (compared in constant
    /// time).
    fn authentic(&self, tenant: &str, secret: &str) -> bool {
        self.secrets.get(tenant).is_some_and(|known| {
            bool::from(known.expose_secret().as_bytes().ct_eq(secret.as_bytes()))
        })
    }

    /// Counts the push's result and answers it.
    fn reply(&self, kind: Kind, result: &'static str, status: StatusCode, msg: &str) -> Response {
        self.metrics.count(kind, result);
        answer(status, msg)
    }

    /// [`Receiver::reply`] telling the sender to retry after `secs`.
    fn reply_retry(
        &self,
        kind: Kind,
        result: &'static str,
        status: StatusCode,
        msg: &str,
        secs: u64,
    ) -> Response {
        let mut resp = self.reply(kind, result, status, msg);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }

    /// A push authenticated for `tenant`: admitted (rate and place), read,
    /// decided, then forwarded once, answered, or refused.
    async fn receive(
        &self,
        kind: Kind,
        tenant: &str,
        record_type: Option<&str>,
        body: Body,
    ) -> Response {
        if let Some(resp) = self.over_rate(kind, tenant) {
            return resp;
        }
        // Held until the push is answered: its body and its record.
        let _slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                debug!(
                    tenant,
                    kind = kind.name(),
                    "push refused: ingest.max_in_flight reached"
                );
                return self.reply_retry(
                    kind,
                    "busy",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many pushes in flight; retry",
                    1,
                );
            }
        };
        let body = match self.read_body(kind, tenant, body).await {
            Ok(body) => body,
            Err(resp) => return resp,
        };
        let decision = push::decide(
            kind,
            record_type,
            &body,
            tenant,
            &self.event,
            &self.forward_commands,
        );
        match decision {
            Err(refusal) => self.refuse(kind, tenant, &refusal, &body).await,
            Ok(Decision::Ignore { why }) => {
                debug!(
                    tenant,
                    kind = kind.name(),
                    why,
                    "push answered, not forwarded"
                );
                self.reply(kind, "ignored", StatusCode::OK, "success")
            }
            Ok(Decision::Forward { session_id, what }) => {
                self.forward_once(kind, tenant, &session_id, &what, &body)
                    .await
            }
        }
    }

    /// The 429 for a tenant over `ingest.per_tenant_per_second`.
    fn over_rate(&self, kind: Kind, tenant: &str) -> Option<Response> {
        let limiter = self.limiter.as_ref()?;
        let not_until = limiter.check_key(&tenant.to_string()).err()?;
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        debug!(
            tenant,
            kind = kind.name(),
            "push refused: over ingest.per_tenant_per_second"
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        Some(self.reply_retry(
            kind,
            "rate_limited",
            StatusCode::TOO_MANY_REQUESTS,
            "too many pushes; retry",
            secs,
        ))
    }

    /// The whole body, or `Err` with the answer when it did not arrive in
    /// time (408), broke off (400) or is over `ingest.max_body_bytes` (413).
    async fn read_body(&self, kind: Kind, tenant: &str, body: Body) -> Result<Bytes, Response> {
        let e = match axum::body::to_bytes(body, self.max_body_bytes).await {
            Ok(body) => return Ok(body),
            Err(e) => e,
        };
        let (result, status, msg) = if server::timed_out(&e) {
            info!(
                tenant,
                kind = kind.name(),
                "push refused: body not read whole within ingest.body_timeout"
            );
            let msg = "the body did not arrive in time";
            ("timeout", StatusCode::REQUEST_TIMEOUT, msg)
        } else if !over_limit(&e) {
            // The sender hung up or sent a broken body; it will not read
            // this answer, or should send the push again.
            info!(tenant, kind = kind.name(), error = %e, "push refused: body could not be read");
            let msg = "the body could not be read";
            ("unreadable", StatusCode::BAD_REQUEST, msg)
        } else {
            info!(
                tenant,
                kind = kind.name(),
                limit = self.max_body_bytes,
                "push refused: body too large"
            );
            ("too_large", StatusCode::PAYLOAD_TOO_LARGE, "body too large")
        };
        Err(self.reply(kind, result, status, msg))
    }

    /// 400 with the reason, once the refused push is dead-lettered (with
    /// `ingest.dead_letter_refused`).
    async fn refuse(&self, kind: Kind, tenant: &str, refusal: &Refusal, body: &Bytes) -> Response {
        info!(tenant, kind = kind.name(), reason = %refusal, "push refused");
        let reason = format!("push refused by the receiver: {refusal}");
        let class = ErrorClass::InvalidEvent;
        if let Err(resp) = self.dead_letter(kind, tenant, class, reason, body).await {
            return resp;
        }
        self.reply(
            kind,
            "invalid",
            StatusCode::BAD_REQUEST,
            &refusal.to_string(),
        )
    }

    /// Forwards the push unless it was forwarded within
    /// `ingest.dedup_window` (then answered 200 as it was).
    async fn forward_once(
        &self,
        kind: Kind,
        tenant: &str,
        session_id: &str,
        what: &str,
        body: &Bytes,
    ) -> Response {
        let key = Recent::key(&[tenant, kind.name(), session_id, what]);
        if (self.forwarded.as_ref()).is_some_and(|recent| recent.seen(&key)) {
            debug!(
                tenant,
                kind = kind.name(),
                session_id,
                "repeated push answered, not forwarded again"
            );
            return self.reply(kind, "duplicate", StatusCode::OK, "success");
        }
        let resp = self.forward(kind, tenant, session_id, body).await;
        if let Some(recent) = &self.forwarded
            && resp.status() == StatusCode::OK
        {
            recent.remember(key);
        }
        resp
    }

    /// Writes the push to the input topic and answers once the broker
    /// acknowledged it.
    async fn forward(&self, kind: Kind, tenant: &str, session_id: &str, body: &Bytes) -> Response {
        let started = Instant::now();
        let in_flight = InFlight::new(&self.metrics.in_flight);
        let mut headers = push_headers(kind, tenant);
        let flagged = self.without_token(tenant);
        if flagged {
            headers = headers.insert(Header {
                key: FLAG_HEADER,
                value: Some(NO_ACCESS_TOKEN),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(session_id)
            .payload(&body[..])
            .headers(headers);
        let sent = self.producer.send(record, Timeout::Never).await;
        drop(in_flight);
        match sent {
            Ok(_) => {
                self.metrics
                    .forward_seconds
                    .observe(started.elapsed().as_secs_f64());
                debug!(tenant, kind = kind.name(), session_id, "push forwarded");
                let result = if flagged { "flagged" } else { "forwarded" };
                self.reply(kind, result, StatusCode::OK, "success")
            }
            Err((e, _)) => {
                warn!(tenant, kind = kind.name(), session_id, error = %e, "push not acknowledged by the broker");
                if let ProducePolicy::Reject(why) = produce_policy(&e) {
                    // Refused for good: kept where an operator finds it.
                    let reason = format!("push refused by the broker: {e} ({why})");
                    let class = ErrorClass::PublishFailed;
                    if let Err(resp) = self.dead_letter(kind, tenant, class, reason, body).await {
                        return resp;
                    }
                }
                self.not_acknowledged(kind, &e)
            }
        }
    }

    /// The answer to a push whose record the broker did not acknowledge:
    /// 413 for a record it refuses for good, else 503 (the sender retries).
    /// A producer that failed for good stops the receiver.
    fn not_acknowledged(&self, kind: Kind, e: &KafkaError) -> Response {
        match produce_policy(e) {
            ProducePolicy::Reject(why) => self.reply(
                kind,
                "rejected",
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the broker refuses this event: {why}"),
            ),
            policy => {
                if let ProducePolicy::Fatal(why) = policy {
                    let why = format!("{e} ({why})");
                    error!(error = %why, "the Kafka producer failed for good; stopping the receiver");
                    let _ = self.failure.set(why);
                    self.stop.cancel();
                }
                self.reply_retry(
                    kind,
                    "unavailable",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the broker did not acknowledge the event; retry",
                    5,
                )
            }
        }
    }

    /// Whether `ingest.token_tenants` is set and leaves `tenant` out
    /// (logged the first time).
    fn without_token(&self, tenant: &str) -> bool {
        let Some(known) = &self.token_tenants else {
            return false;
        };
        if known.contains(tenant) {
            return false;
        }
        if self.flagged.lock().unwrap().insert(tenant.to_string()) {
            warn!(
                tenant,
                "push for a tenant not in ingest.token_tenants: forwarded with uincall.flag=no_access_token; the worker will dead-letter it until it has the tenant's token"
            );
        }
        true
    }

    /// With `ingest.dead_letter_refused`, writes a refused push to the
    /// dead-letter topic as received, with its class and reason; `Err`
    /// with the answer when the broker did not acknowledge it.
    async fn dead_letter(
        &self,
        kind: Kind,
        tenant: &str,
        class: ErrorClass,
        reason: String,
        body: &Bytes,
    ) -> Result<(), Response> {
        let Some(topic) = &self.dead_letter_topic else {
            return Ok(());
        };
        let stamp = Stamp {
            error_class: Some(class),
            reason: Some(reason),
            failed_at: Some(chrono::Utc::now()),
            tenant_id: Some(tenant.to_string()),
            enricher: Some(crate::record::ENRICHER.to_string()),
            ..Stamp::default()
        };
        let headers = stamp.onto(push_headers(kind, tenant), self.connect_headers);
        let record = FutureRecord::<(), _>::to(topic)
            .payload(&body[..])
            .headers(headers);
        match self.producer.send(record, Timeout::Never).await {
            Ok(_) => {
                self.metrics.dead_letters.inc();
                Ok(())
            }
            Err((e, _)) => {
                warn!(tenant, kind = kind.name(), error = %e, "refused push not acknowledged by the broker");
                Err(self.not_acknowledged(kind, &e))
            }
        }
    }
}

/// Whether reading a body failed at `ingest.max_body_bytes` (rather than
/// because the sender broke off).
fn over_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Where a push came from: `uincall.source`, `uincall.tenant`,
/// `uincall.received_at`.
fn push_headers(kind: Kind, tenant: &str) -> OwnedHeaders {
    let source = format!("uincall.push.{}", kind.name());
    let received_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    OwnedHeaders::new()
        .insert(Header {
            key: "uincall.source",
            value: Some(source.as_str()),
        })
        .insert(Header {
            key: TENANT_HEADER,
            value: Some(tenant),
        })
        .insert(Header {
            key: "uincall.received_at",
            value: Some(received_at.as_str()),
        })
}

/// Counts a push in flight until dropped (also when the sender hangs up
/// and the request is abandoned).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Ready while a broker answers a metadata request and the producer has
/// not failed for good.
async fn readyz(State(r): State<Arc<Receiver>>) -> Response {
    if r.failure.get().is_some() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the producer failed").into_response();
    }
    if let Some(stalled) = (r.producer.stalled_for()).filter(|d| *d >= r.forward_timeout) {
        let why = format!(
            "no acknowledgement from the broker for {}s while pushes wait",
            stalled.as_secs()
        );
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    let producer = r.producer.producer();
    let reached = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok()
    })
    .await
    .unwrap_or(false);
    match reached {
        true => (StatusCode::OK, "ready").into_response(),
        false => (StatusCode::SERVICE_UNAVAILABLE, "no broker reached").into_response(),
    }
}

async fn metrics(State(r): State<Arc<Receiver>>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &r.metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    /// forwarded, flagged, duplicate, ignored, invalid, unreadable,
    /// timeout, too_large, rejected,
    /// unauthorized, forbidden, rate_limited, busy, unavailable.
    result: &'static str,
}

/// The receiver's metrics.
struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    forward_seconds: Histogram,
    in_flight: Gauge,
    dead_letters: Counter,
    producer_renewals: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let requests = Family::<RequestLabels, Counter>::default();
        // 1 ms .. ~16 s.
        let forward_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let in_flight = Gauge::default();
        let dead_letters = Counter::default();
        let producer_renewals = Counter::default();
        let mut registry = Registry::with_prefix("uincall_enricher_ingest");
        registry.register(
            "requests",
            "Pushes received, by kind and result",
            requests.clone(),
        );
        registry.register_with_unit(
            "forward",
            "Time from a push's arrival to the broker's acknowledgement",
            Unit::Seconds,
            forward_seconds.clone(),
        );
        registry.register(
            "in_flight",
            "Pushes waiting for the broker's acknowledgement",
            in_flight.clone(),
        );
        registry.register(
            "dead_letters",
            "Refused pushes written to the dead-letter topic (ingest.dead_letter_refused)",
            dead_letters.clone(),
        );
        registry.register(
            "producer_renewals",
            "Kafka producers replaced by a fresh one after pushes waited kafka.producer_renew_after with no answer from the broker",
            producer_renewals.clone(),
        );
        Metrics {
            registry,
            requests,
            forward_seconds,
            in_flight,
            dead_letters,
            producer_renewals,
        }
    }

    fn count(&self, kind: Kind, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                kind: kind.name(),
                result,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests;
