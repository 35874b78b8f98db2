//! Typed, layered settings: embedded defaults, an optional file, then
//! environment variables (`UINCALL__SECTION__KEY`). Unknown keys and invalid
//! values stop start-up with a message that names the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

/// The consume loop wakes at least every second; a loop silent for this
/// long is stuck (`/healthz` fails). A rebalance's revocation holds the
/// loop for up to `pipeline.revoke_drain`, which must stay under it.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// The defaults compiled into the binary (`config/default.toml`).
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "UINCALL";

/// Every setting of the worker. Field docs are the reference; they are
/// mirrored in `docs/configuration.md`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub api: ApiSettings,
    pub event: EventSettings,
    pub retry: RetrySettings,
    pub pipeline: PipelineSettings,
    pub systemic: SystemicSettings,
    pub rate_limit: RateLimitSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub labels: LabelSettings,
    /// Header conventions of other tools, opt-in.
    #[serde(default)]
    pub headers: HeaderSettings,
    /// Per-tenant overrides, by tenant_id (`[tenants."<tenant_id>"]`).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
    /// `uincall-enricher ingest`: Uincall's HTTP pushes into the input topic.
    #[serde(default)]
    pub ingest: IngestSettings,
    /// `uincall-enricher backfill`: call-ended events from the call list.
    #[serde(default)]
    pub backfill: BackfillSettings,
}

/// The backfill from the call list (`uincall-enricher backfill`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillSettings {
    /// The zone the call list's times are in, and `--from`/`--to` without
    /// an offset (an IANA name); `tenants.<id>.time_zone` overrides it.
    pub time_zone: String,
    /// The longest window asked of the call list at once; at most 60 (the
    /// API cuts a longer range to 60 days from its start, silently).
    pub window_days: u32,
    /// Sessions asked per page; at most 50 (the API's limit).
    pub page_size: u32,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        BackfillSettings {
            time_zone: "Asia/Shanghai".into(),
            window_days: 60,
            page_size: 50,
        }
    }
}

impl BackfillSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        check(
            self.time_zone.parse::<chrono_tz::Tz>().is_ok(),
            "backfill.time_zone",
            "must be an IANA time zone name such as Asia/Shanghai",
        )?;
        check(
            (1..=60).contains(&self.window_days),
            "backfill.window_days",
            "must be between 1 and 60 (the call list cuts longer ranges)",
        )?;
        check(
            (1..=50).contains(&self.page_size),
            "backfill.page_size",
            "must be between 1 and 50 (the call list's limit)",
        )
    }
}

/// The push receiver (`uincall-enricher ingest`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// Where Uincall's pushes are received (its health checks and metrics
    /// are on `http.listen`).
    pub listen: SocketAddr,
    /// Call-event pushes whose `command` is one of these are forwarded
    /// (`call_hangup`: the call ended); others are answered and counted.
    #[serde(deserialize_with = "text_list")]
    pub forward_commands: Vec<String>,
    /// Larger bodies are refused with 413.
    pub max_body_bytes: usize,
    /// How long a push waits for the broker's acknowledgement before it is
    /// answered 503 (the sender may retry).
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// The secret of each tenant's push URL (`/push/<tenant>/<secret>/…`,
    /// or HTTP basic auth with the tenant as user). Never logged or printed.
    #[serde(serialize_with = "redact_map")]
    pub secrets: BTreeMap<String, SecretString>,
    /// Networks pushes are accepted from (CIDR); empty: any. The address is
    /// the connection's peer (behind an Ingress, the controller's).
    #[serde(deserialize_with = "text_list")]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Pushes a second per tenant (0: no limit); beyond it 429.
    pub per_tenant_per_second: u32,
    /// A push repeated within this window after it was forwarded (same
    /// tenant, kind, session and command or type) is answered 200 and not
    /// forwarded again; `0s` turns this off.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Forwarded pushes remembered for that (the oldest forgotten first).
    pub dedup_capacity: usize,
    /// Pushes being read and forwarded at once; beyond it a push is answered
    /// 503 at once (the sender may retry), so an overload costs neither
    /// memory nor the answers of the pushes already taken.
    pub max_in_flight: usize,
    /// Tenants the worker holds an API access token for (names only; the
    /// receiver holds no tokens). When set, a push for any other tenant is
    /// still forwarded, with the header `uincall.flag: no_access_token`,
    /// counted as `result="flagged"` and logged once per tenant: the worker
    /// will dead-letter it (`invalid_event`) until the token is added.
    /// Empty: not checked.
    #[serde(deserialize_with = "text_list")]
    pub token_tenants: Vec<String>,
    /// Write each push refused with 400 (not JSON, no `session_id`, another
    /// tenant) to the dead-letter topic as received, with the reason in
    /// `dlq.reason`; the 400 is answered once the broker has it (503 if it
    /// does not, so the sender tries again).
    pub dead_letter_refused: bool,
    /// How long a request's head (request line and headers) may take to
    /// arrive, from its first byte; past it the connection is closed, so a
    /// sender that never finishes its head holds no memory for long.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a push's whole body may take to arrive once its head has;
    /// past it the push is answered 408 and gives its `max_in_flight` place
    /// back (a total, not a per-read, deadline: a slow drip is cut too).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// How long a connection may wait for a request (first connected, or
    /// kept alive after an answer) before it is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once on the push port; one more is closed as
    /// soon as it is accepted (each costs a socket and buffers).
    pub max_connections: usize,
    /// On SIGTERM, how long the pushes in flight may take to be answered
    /// before their connections are closed and the producer is flushed.
    /// Shorter than the pod's grace period (Kubernetes: 30s), longer than
    /// `forward_timeout`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            listen: "0.0.0.0:8080".parse().unwrap(),
            forward_commands: vec!["call_hangup".into()],
            max_body_bytes: 64 * 1024,
            forward_timeout: Duration::from_secs(5),
            secrets: BTreeMap::new(),
            allow_from: Vec::new(),
            per_tenant_per_second: 0,
            dedup_window: Duration::from_secs(600),
            dedup_capacity: 50_000,
            max_in_flight: 1024,
            token_tenants: Vec::new(),
            dead_letter_refused: false,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}

impl IngestSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        check(
            !self.forward_commands.is_empty()
                && self.forward_commands.iter().all(|c| !c.trim().is_empty()),
            "ingest.forward_commands",
            "must name at least one command, none empty",
        )?;
        check(
            self.max_body_bytes >= 1024,
            "ingest.max_body_bytes",
            "must be at least 1024",
        )?;
        more_than_zero("ingest.forward_timeout", self.forward_timeout)?;
        at_most(
            "ingest.forward_timeout",
            self.forward_timeout,
            LIBRDKAFKA_MAX_MS,
        )?;
        check(
            self.max_in_flight > 0,
            "ingest.max_in_flight",
            "must be at least 1",
        )?;
        check(
            self.dedup_window.is_zero() || self.dedup_capacity > 0,
            "ingest.dedup_capacity",
            "must be at least 1 while ingest.dedup_window is on",
        )?;
        // Deadlines of the push port's connections: none may be 0s (every
        // request would fail) or absurd (a clock past its range).
        for (key, value) in [
            ("ingest.header_timeout", self.header_timeout),
            ("ingest.body_timeout", self.body_timeout),
            ("ingest.idle_timeout", self.idle_timeout),
            ("ingest.shutdown_timeout", self.shutdown_timeout),
        ] {
            more_than_zero(key, value)?;
            at_most(key, value, Duration::from_secs(24 * 3600))?;
        }
        check(
            self.max_connections > 0,
            "ingest.max_connections",
            "must be at least 1",
        )?;
        for (tenant, secret) in &self.secrets {
            check(
                secret.expose_secret().len() >= 16,
                &format!("ingest.secrets.{tenant}"),
                "must be at least 16 characters (it is all that authenticates a push)",
            )?;
        }
        Ok(())
    }
}

/// What one tenant does differently.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// The tenant's own API (a private deployment) instead of `api.base_url`.
    #[serde(default)]
    pub base_url: Option<Url>,
    /// The tenant's calls per second from this replica instead of
    /// `rate_limit.per_tenant_per_second` (0 = no limit).
    #[serde(default)]
    pub per_second: Option<u32>,
    /// The tenant's time zone for the backfill instead of
    /// `backfill.time_zone`.
    #[serde(default)]
    pub time_zone: Option<String>,
}

impl TenantSettings {
    fn validate(&self, tenant: &str) -> Result<(), SettingsError> {
        check(
            (self.time_zone.as_deref()).is_none_or(|z| z.parse::<chrono_tz::Tz>().is_ok()),
            &format!("tenants.{tenant}.time_zone"),
            "must be an IANA time zone name such as Asia/Shanghai",
        )?;
        match &self.base_url {
            Some(url) if !matches!(url.scheme(), "http" | "https") => Err(invalid(
                &format!("tenants.{tenant}.base_url"),
                "must be an http or https URL",
            )),
            _ => Ok(()),
        }
    }
}

/// `pipeline.held_overflow`: a held tenant's record when
/// `pipeline.max_held_records` wait already.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HeldOverflow {
    /// Dead-lettered (`tenant_held`, replayable), so the other tenants'
    /// records go on being read.
    #[default]
    DeadLetter,
    /// Waits too: the worker stops taking records, every tenant waits.
    Wait,
}

/// What the output topics promise a `read_committed` reader
/// (`kafka.delivery`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Each record's output at least once; a crash re-delivers what was
    /// unfinished (and what finished since the last commit).
    #[default]
    AtLeastOnce,
    /// Each record's output and its input offset in one Kafka transaction:
    /// a `read_committed` reader sees each output once.
    ExactlyOnce,
}

/// The consumer group protocol (`kafka.group_protocol`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    #[default]
    Classic,
    Consumer,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Consumer group shared by all replicas; Kafka spreads partitions over them.
    pub group_id: String,
    /// Topic carrying the call-ended events.
    pub input_topic: String,
    /// Topic the enriched records are published to (key = session_id).
    pub output_topic: String,
    /// Topic receiving what could not be enriched, with the reason in headers.
    pub dead_letter_topic: String,
    /// Consumer group protocol: `classic` (the rebalance protocol every
    /// broker speaks; the worker uses the cooperative-sticky assignor) or
    /// `consumer` (KIP-848, Kafka 4.0+: the broker assigns, no stop-the-world
    /// rebalances; session timeout and heartbeat are set broker side).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// This replica's client id in broker logs, quotas and group listings.
    /// Unset: `uincall-enricher-` followed by `$HOSTNAME` (the pod name on
    /// Kubernetes).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Group session timeout (classic protocol); a worker silent for this
    /// long loses its partitions.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest gap between two polls before the group evicts the worker. The
    /// worker keeps polling while paused, so this only bounds a stuck process.
    /// Must be longer than `pipeline.drain_timeout`.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// A worker whose consumer has no group coordinator, or holds no
    /// partition and is not settled in its group, for this long while the
    /// cluster answers has lost its place for good: `/healthz` fails (and
    /// the log says why) and the worker stops so that it is restarted. A
    /// spare replica, settled without partitions, is not concerned. Several
    /// session timeouts.
    #[serde(with = "humantime_serde")]
    pub rejoin_timeout: Duration,
    /// How often the worker commits input offsets (each the lowest offset
    /// not yet finished, with the records finished past it as metadata).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Longest metadata string of a commit: the records finished past the
    /// committed offset, skipped by the partition's next owner. At most the
    /// brokers' `offset.metadata.max.bytes` (4096 by default); 0 sends none.
    pub commit_metadata_max_bytes: usize,
    /// How long one produce may wait for the broker's acknowledgement before
    /// it is retried (librdkafka `message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// A producer whose records have waited this long without any answer
    /// from the broker is replaced by a fresh one (librdkafka can stay stuck
    /// after a broker fault while a new producer is acknowledged at once);
    /// `0s` never replaces it. Shorter than `produce_timeout` makes recovery
    /// quicker than a record's own timeout.
    #[serde(with = "humantime_serde")]
    pub producer_renew_after: Duration,
    /// The output and dead-letter topics' `max.message.bytes`, when the
    /// worker should not ask the cluster for it (DescribeConfigs) at start:
    /// a cluster that does not answer that request (librdkafka's mock
    /// cluster) otherwise costs 30 s before the defaults are kept.
    #[serde(default)]
    pub max_message_bytes: Option<usize>,
    /// `at_least_once` (default) or `exactly_once`: outputs and input
    /// offsets committed in Kafka transactions (readers must set
    /// `isolation.level=read_committed`).
    #[serde(default)]
    pub delivery: Delivery,
    /// The producer's `transactional.id` with `exactly_once`: stable per
    /// replica, so that a restarted replica fences its predecessor, and
    /// distinct between live replicas. Unset: `<group_id>-$HOSTNAME` (the
    /// pod name on Kubernetes).
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// With `exactly_once`: how often the outputs whose partition is done
    /// below them are committed in a transaction (the latency a reader
    /// sees on top of the API's).
    #[serde(with = "humantime_serde")]
    pub transaction_interval: Duration,
    /// With `exactly_once`: a transaction is committed as soon as this many
    /// outputs wait, before the interval is over.
    pub transaction_max_records: usize,
    /// With `exactly_once`: how long the broker keeps a transaction open
    /// before aborting it (librdkafka `transaction.timeout.ms`), e.g. that
    /// of a frozen replica; readers' `read_committed` position waits for
    /// it meanwhile. At most the brokers' `transaction.max.timeout.ms`.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Extra librdkafka properties for consumer and producer (SASL, TLS,
    /// tuning). Underscores in keys read from the environment become dots.
    /// Secret-looking values (see [`is_secret_property`]) are printed
    /// redacted.
    #[serde(default, serialize_with = "redact_secret_properties")]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Base URL of the Uincall OpenAPI, e.g. `https://ykf.uincall.com`.
    pub base_url: Url,
    /// Limit for one API call, connection to last body byte.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Limit for establishing a connection; shorter than `request_timeout`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Keep-alive connections kept open to the API. Unset: as many as
    /// `pipeline.max_in_flight`, so a full window reuses its connections
    /// instead of opening and closing them (which halved throughput at 512).
    #[serde(default)]
    pub pool_max_idle_per_host: Option<usize>,
    /// Tenant used when an event carries no tenant field.
    #[serde(default)]
    pub default_tenant: Option<String>,
    /// Directory with one file per tenant (file name = tenant_id, content =
    /// access token), e.g. a mounted Kubernetes Secret.
    #[serde(default)]
    pub tokens_dir: Option<PathBuf>,
    /// How often `tokens_dir` is read again, so a rotated token (a replaced
    /// Secret) is used without a restart. In-flight calls keep the token they
    /// started with; the next call of every record uses the new one.
    #[serde(with = "humantime_serde")]
    pub tokens_reload_interval: Duration,
    /// Access tokens by tenant_id. Secrets: never logged or printed.
    #[serde(default, serialize_with = "redact_map")]
    pub tokens: BTreeMap<String, SecretString>,
    /// Memory for the answers of sessions enriched lately, reused when an
    /// event of the same session comes again within `recent_answers_ttl`
    /// (a push and a backfill of one call, a re-delivery, a replay); keys,
    /// bodies and entries counted. 0 keeps none.
    pub recent_answers_bytes: usize,
    /// How long an answer is reused; 0s keeps none.
    #[serde(with = "humantime_serde")]
    pub recent_answers_ttl: Duration,
    /// HTTP/2 to the API: `auto` (when the API offers it over TLS),
    /// `prior_knowledge` (always, also over plain http: for an API known to
    /// speak it), `never`.
    pub http2: Http2,
}

/// `api.http2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Http2 {
    Auto,
    PriorKnowledge,
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Where the session id is in the event; dots descend into objects
    /// (`data.session_id`).
    pub session_id_field: String,
    /// Where the tenant id is; falls back to `api.default_tenant`.
    pub tenant_id_field: String,
    /// Where an optional `call_type` is; passed on to the API when present.
    pub call_type_field: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Wait before the first call: the record may not be written yet when the
    /// call-ended event arrives.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// First backoff delay.
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    /// Largest backoff delay (before jitter); at least `min_delay`.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Growth of the delay per attempt; at least 1.
    pub factor: f32,
    /// Attempts per record (first call included) before `retries_exhausted`.
    pub max_attempts: u32,
    /// Longest time a record may spend retrying before `retries_exhausted`.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
    /// Add random jitter to each delay, so replicas do not retry in step.
    pub jitter: bool,
    /// Errcodes that will not change by retrying: dead-letter at once. In the
    /// environment: a comma-separated list.
    #[serde(default, deserialize_with = "errcode_list")]
    pub permanent_errcodes: Vec<i64>,
    /// Errcodes that say the API is unusable for everyone (an invalid or
    /// expired token): the worker enters systemic failure instead of
    /// retrying or dead-lettering (see `[systemic]`).
    #[serde(default, deserialize_with = "errcode_list")]
    pub systemic_errcodes: Vec<i64>,
    /// Errcodes that say "too many calls": the tenant's calls back off
    /// (`[rate_limit]`), the record is not failed and the call does not
    /// count as an attempt. HTTP 429 is always treated this way.
    #[serde(default, deserialize_with = "errcode_list")]
    pub rate_limited_errcodes: Vec<i64>,
}

/// When a failure is the API as a whole rather than one record: the worker
/// pauses consumption, dead-letters nothing because of it, reports not
/// ready, probes the API with backoff and resumes when it answers again.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SystemicSettings {
    /// How many of the most recent API calls are judged together.
    pub call_window: usize,
    /// Calls needed in the window before the failure share is judged.
    pub min_calls: usize,
    /// Share (0..1] of the window's calls failing with a transport error or
    /// HTTP 5xx that means the API is down.
    pub failure_ratio: f64,
    /// How many of the most recent record outcomes (enriched, or
    /// dead-lettered for an API reason) are judged together.
    pub record_window: usize,
    /// Outcomes needed in the window before the dead-letter share is judged.
    pub min_records: usize,
    /// Share of the record window that may be dead-lettered; above it the
    /// next dead letter is held and the worker enters systemic failure
    /// (getsentry/arroyo's DlqLimit). 1.0 turns this check off.
    pub dead_letter_ratio: f64,
    /// First wait before probing the API again; doubles up to `probe_max_delay`.
    #[serde(with = "humantime_serde")]
    pub probe_min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_max_delay: Duration,
    /// How long a hold opened by `dead_letter_ratio` lasts while every
    /// trial (a held record's session asked again) fails; then those
    /// failures are taken as the records' own and dead-lettered, with an
    /// error line and `dead_letter_holds_given_up_total`, until records
    /// succeed again.
    #[serde(with = "humantime_serde")]
    pub dead_letter_hold: Duration,
}

/// Calls per second to the API, per tenant and per replica.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Most calls per second per tenant from this replica; 0 = no limit.
    /// The tenant's quota must cover this times the number of replicas.
    pub per_tenant_per_second: u32,
    /// Calls that may go at once after a quiet spell; 1 spreads calls
    /// evenly, so no one-second span exceeds the limit by more than one.
    pub burst: u32,
    /// First back-off of a tenant after a rate-limited answer (when no
    /// `Retry-After` says more); doubles per rate-limited answer in a row.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Records being enriched at once (API calls, with their retries and
    /// waits), over all assigned partitions; as many again may wait for the
    /// broker's acknowledgement. When both are full the partitions are
    /// paused (polling goes on).
    pub max_in_flight: usize,
    /// On SIGTERM, how long in-flight records may take to finish; the rest is
    /// abandoned uncommitted and re-delivered later.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// When partitions are revoked (a rebalance), how long their in-flight
    /// records may take to finish so their offsets are committed; the rest
    /// is cancelled and re-delivered to the partition's next owner. The
    /// rebalance waits for it: keep it short.
    #[serde(with = "humantime_serde")]
    pub revoke_drain: Duration,
    /// `/healthz` fails when an assigned partition has a backlog and none of
    /// its records finished for this long (outside systemic failure, where
    /// waiting is intended). Longer than `retry.max_elapsed` plus
    /// `api.request_timeout`: a record retrying within its budget is no stall.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Records of held tenants (their token refused) that may wait beside
    /// the window; beyond it they count against the window, so the worker
    /// stops taking records and memory stays bounded.
    pub max_held_records: usize,
    /// What a held tenant's record does when `max_held_records` are
    /// waiting already and another tenant is not held.
    pub held_overflow: HeldOverflow,
    /// With `held_overflow = "dead_letter"`, how long one record may wait
    /// for its held tenant while another tenant with traffic goes on; then
    /// it is dead-lettered as `tenant_held` (replay it once the tenant is
    /// resumed), so the committed offset of its partition moves on and a
    /// rebalance or restart re-delivers only what followed it since.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// The most places of the window one tenant holds while another
    /// tenant's records wait for one (a free place goes to whoever asks).
    /// Unset: half the window. With one tenant it has the whole window.
    pub max_in_flight_per_tenant: Option<usize>,
}

impl PipelineSettings {
    /// `max_in_flight_per_tenant`, or half the window.
    pub fn max_in_flight_per_tenant(&self) -> usize {
        (self.max_in_flight_per_tenant).unwrap_or(self.max_in_flight.div_ceil(2))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the side port serving `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// Tenants that get a `tenant` label of their own on `/metrics`: those
    /// with an access token or a `[tenants]` section, the first this many;
    /// any other tenant is `other`.
    #[serde(default = "default_tenant_labels")]
    pub tenant_labels: usize,
}

fn default_tenant_labels() -> usize {
    100
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `json` (one object per line) or `text`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,uincall_enricher=debug`;
    /// `RUST_LOG` wins when set.
    pub level: String,
}

/// Headers written for tools that read records by convention.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderSettings {
    /// CloudEvents (Kafka binding, binary mode) on enriched records:
    /// `ce_specversion`, `ce_id` and `ce_subject` (the session id),
    /// `ce_source`, `ce_type`, `ce_time`, `ce_dataschema`.
    pub cloudevents: bool,
    /// The events' `ce_source` (a URI reference).
    pub cloudevents_source: String,
    /// Kafka Connect's error headers on dead letters
    /// (`__connect.errors.topic`, `.partition`, `.offset`,
    /// `.exception.class.name`, `.exception.message`) beside `dlq.*`.
    pub kafka_connect: bool,
}

impl Default for HeaderSettings {
    fn default() -> Self {
        HeaderSettings {
            cloudevents: false,
            cloudevents_source: "/uincall-enricher".into(),
            kafka_connect: false,
        }
    }
}

impl HeaderSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        check(
            !self.cloudevents_source.trim().is_empty()
                && url::Url::parse("http://base/")
                    .and_then(|b| b.join(&self.cloudevents_source))
                    .is_ok(),
            "headers.cloudevents_source",
            "must be a URI reference, e.g. /uincall-enricher or urn:example:enricher",
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSettings {
    /// Labels of the satisfaction score by value, as the console shows them.
    #[serde(default)]
    pub satisfaction: BTreeMap<String, String>,
}

/// A setting that cannot be used, with the key that names it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// One rule: `Ok` when `holds`, else the key with what its value must be.
fn check(holds: bool, key: &str, message: impl Into<String>) -> Result<(), SettingsError> {
    if holds {
        Ok(())
    } else {
        Err(invalid(key, message))
    }
}

fn not_empty(key: &str, value: &str) -> Result<(), SettingsError> {
    check(!value.trim().is_empty(), key, "must not be empty")
}

fn more_than_zero(key: &str, value: Duration) -> Result<(), SettingsError> {
    check(!value.is_zero(), key, "must be more than 0s")
}

/// `value` at least `floor`; the message writes the floor as in the
/// settings (`1s`, `100ms`).
fn at_least(key: &str, value: Duration, floor: Duration) -> Result<(), SettingsError> {
    check(
        value >= floor,
        key,
        format!("must be at least {}", humantime::format_duration(floor)),
    )
}

/// The longest librdkafka takes for a `*.ms` property such as
/// `message.timeout.ms` (a 32-bit signed count of milliseconds).
const LIBRDKAFKA_MAX_MS: Duration = Duration::from_millis(i32::MAX as u64);

/// `value` at most `ceiling` (librdkafka's range of the property it becomes).
fn at_most(key: &str, value: Duration, ceiling: Duration) -> Result<(), SettingsError> {
    check(
        value <= ceiling,
        key,
        format!("must be at most {}", humantime::format_duration(ceiling)),
    )
}

/// A share in (0, 1]; NaN is not one.
fn share(key: &str, value: f64) -> Result<(), SettingsError> {
    check(
        value > 0.0 && value <= 1.0,
        key,
        "must be a share in (0, 1]",
    )
}

/// A back-off range: the first delay more than 0s, the largest at least the
/// first. The error names the largest.
fn delay_range(
    (min_key, min): (&str, Duration),
    (max_key, max): (&str, Duration),
) -> Result<(), SettingsError> {
    check(
        !min.is_zero() && max >= min,
        max_key,
        format!("must be at least {min_key}, which must be more than 0s"),
    )
}

/// How many entries of a window are needed before it is judged: at least 1
/// and at most the window. The error names the count.
fn within_window(
    (count_key, count): (&str, usize),
    (window_key, window): (&str, usize),
) -> Result<(), SettingsError> {
    check(
        window != 0 && count != 0 && count <= window,
        count_key,
        format!("must be at least 1 and at most {window_key}"),
    )
}

fn redact_map<S: Serializer>(
    map: &BTreeMap<String, SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.keys().map(|k| (k, "[redacted]")))
}

/// Whether a librdkafka property holds a secret: a password, a secret, a
/// token or credential, a private key (`ssl.key.pem`; not a file location),
/// or a whole SASL/OAUTHBEARER configuration. Where a secret is
/// (`*.location`) and where a token is fetched (`*.url`) are not secrets
/// as a whole (a URL's secret parts: [`property_secrets`]).
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with(".location") || k.ends_with(".url") {
        return false;
    }
    [
        "password",
        "passphrase",
        "secret",
        "token",
        "credential",
        "jaas",
        "oauthbearer.config",
    ]
    .iter()
    .any(|w| k.contains(w))
        || k.contains("key")
}

/// The secret parts of a librdkafka property's value: all of it for a
/// secret-looking property; for a `*.url` (a token endpoint may carry
/// credentials) its password and the values of secret-looking query
/// parameters (`client_secret=…`); else nothing.
pub fn property_secrets(key: &str, value: &str) -> Vec<String> {
    if is_secret_property(key) {
        return vec![value.to_string()];
    }
    if !key.to_ascii_lowercase().ends_with(".url") {
        return Vec::new();
    }
    // Read as written (a parser would give the password percent-encoded,
    // which is not what the text holds): scheme://userinfo@host/path?query.
    let Some((_, rest)) = value.split_once("://") else {
        // Not a URL: shown only if nothing in it could be a credential.
        return match value.contains(['@', '?']) {
            true => vec![value.to_string()],
            false => Vec::new(),
        };
    };
    // The userinfo's password, or all of it when it is a token alone: up to
    // the last `@`, as a password may hold `/`, `?` or `#` (base64 does);
    // an `@` further on (in a query) makes more of it redacted, not less.
    let userinfo = (rest.rsplit_once('@')).map(|(userinfo, _)| match userinfo.split_once(':') {
        Some((_, password)) => password,
        None => userinfo,
    });
    let query = (rest.split_once('?'))
        .map(|(_, q)| q.split('#').next().unwrap_or_default())
        .unwrap_or_default();
    let query_secrets = (query.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| is_secret_property(name))
        .map(|(_, v)| v);
    (userinfo.into_iter())
        .chain(query_secrets)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

/// `text` with every occurrence of each of `secrets` replaced.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "[redacted]"))
}

fn redact_secret_properties<S: Serializer>(
    map: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map((map.iter()).map(|(k, v)| (k, redact(v, &property_secrets(k, v)))))
}

/// A list of errcodes from TOML (`[1, 2]`) or the environment (`"1,2"`).
fn errcode_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<i64>),
        One(i64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::List(v) => Ok(v),
        Raw::One(n) => Ok(vec![n]),
        Raw::Text(t) => t
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an errcode")))
            })
            .collect(),
    }
}

/// A list from TOML (`["a", "b"]`) or the environment (`"a,b"`), each item
/// parsed as `T`.
fn text_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    let items: Vec<String> = match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::Text(t) => t.split(',').map(str::to_string).collect(),
    };
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<T>()
                .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
        })
        .collect()
}

impl Settings {
    /// Defaults, then `file` when given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULTS_TOML, FileFormat::Toml));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(invalid(
                    "--config",
                    format!("{} is not a readable file", path.display()),
                ));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.normalise();
        settings.validate()?;
        Ok(settings)
    }

    fn normalise(&mut self) {
        // librdkafka property names use dots; an environment variable cannot.
        self.kafka.properties = std::mem::take(&mut self.kafka.properties)
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
        self.kafka.brokers = self.kafka.brokers.trim().to_string();
    }

    /// Checks the poll interval against the pipeline's drains, then every
    /// section, then the stall timeout against the retry budget; the error
    /// names the key. A poll interval too short for the drain is reported as
    /// such even when it is also below the kafka section's 1s floor.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let (k, p) = (&self.kafka, &self.pipeline);
        check(
            k.max_poll_interval > p.drain_timeout,
            "kafka.max_poll_interval",
            "must be longer than pipeline.drain_timeout",
        )?;
        self.kafka.validate()?;
        check(
            p.revoke_drain < k.max_poll_interval,
            "pipeline.revoke_drain",
            "must be shorter than kafka.max_poll_interval",
        )?;
        check(
            p.revoke_drain < LIVENESS_LIMIT,
            "pipeline.revoke_drain",
            "must be shorter than 30s (a revocation holds the consume loop, and /healthz fails when it is silent that long)",
        )?;
        self.api.validate()?;
        self.event.validate()?;
        self.retry.validate()?;
        self.systemic.validate()?;
        self.rate_limit.validate()?;
        check(
            p.stall_timeout > (self.retry.max_elapsed).saturating_add(self.api.request_timeout),
            "pipeline.stall_timeout",
            "must be longer than retry.max_elapsed plus api.request_timeout (a record retrying within its budget is not a stall)",
        )?;
        check(
            p.held_overflow != HeldOverflow::DeadLetter || p.stall_timeout > p.max_hold,
            "pipeline.stall_timeout",
            "must be longer than pipeline.max_hold (a record waiting for its held tenant is not a stall)",
        )?;
        self.pipeline.validate()?;
        for (tenant, t) in &self.tenants {
            t.validate(tenant)?;
        }
        self.headers.validate()?;
        self.ingest.validate()?;
        self.backfill.validate()?;
        self.log.validate()
    }

    /// Every secret these settings hold: access tokens, push secrets, and
    /// the secret values (or parts) of `kafka.properties`.
    pub fn secrets(&self) -> Vec<String> {
        (self.api.tokens.values())
            .chain(self.ingest.secrets.values())
            .map(|s| s.expose_secret().to_string())
            .chain(self.kafka.secrets())
            .collect()
    }

    /// The effective settings as TOML, secrets replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("settings serialise to TOML")
    }
}

/// `uincall-enricher check-config`: prints the effective settings with
/// secrets redacted; bad settings are reported on stderr with exit code 2.
pub fn check_config(config: Option<&Path>) -> ExitCode {
    match Settings::load(config) {
        Ok(s) => {
            print!("{}", s.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// librdkafka properties the worker sets itself.
const RESERVED_PROPERTIES: [&str; 7] = [
    "group.id",
    "bootstrap.servers",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "transactional.id",
    "transaction.timeout.ms",
];

/// librdkafka properties the broker decides under the `consumer` protocol.
const CLASSIC_ONLY_PROPERTIES: [&str; 2] =
    ["partition.assignment.strategy", "heartbeat.interval.ms"];

impl KafkaSettings {
    /// The secret values (or parts of values) of `properties`.
    pub fn secrets(&self) -> Vec<String> {
        (self.properties.iter())
            .flat_map(|(key, v)| property_secrets(key, v))
            .collect()
    }

    /// Names and topics set and distinct, no property the worker or the
    /// group protocol owns, timeouts within their ranges.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_names()?;
        if let Some(p) = self.first_property(&RESERVED_PROPERTIES) {
            return Err(invalid(
                &format!("kafka.properties.{p}"),
                "is set by the worker itself and cannot be overridden",
            ));
        }
        if self.group_protocol == GroupProtocol::Consumer
            && let Some(p) = self.first_property(&CLASSIC_ONLY_PROPERTIES)
        {
            return Err(invalid(
                &format!("kafka.properties.{p}"),
                "is not supported with kafka.group_protocol = \"consumer\" (set broker side)",
            ));
        }
        self.validate_durations()
    }

    /// Names and topics set, topics distinct, a sane `max_message_bytes`.
    fn validate_names(&self) -> Result<(), SettingsError> {
        for (key, value) in [
            ("kafka.brokers", &self.brokers),
            ("kafka.group_id", &self.group_id),
            ("kafka.input_topic", &self.input_topic),
            ("kafka.output_topic", &self.output_topic),
            ("kafka.dead_letter_topic", &self.dead_letter_topic),
        ] {
            not_empty(key, value)?;
        }
        check(
            self.max_message_bytes.is_none_or(|b| b >= 1024),
            "kafka.max_message_bytes",
            "must be at least 1024 when set",
        )?;
        check(
            self.output_topic != self.input_topic,
            "kafka.output_topic",
            "must differ from kafka.input_topic",
        )?;
        check(
            self.dead_letter_topic != self.input_topic
                && self.dead_letter_topic != self.output_topic,
            "kafka.dead_letter_topic",
            "must differ from the input and output topics",
        )
    }

    /// Timeouts above their floors and within librdkafka's ranges.
    fn validate_durations(&self) -> Result<(), SettingsError> {
        at_least(
            "kafka.max_poll_interval",
            self.max_poll_interval,
            Duration::from_secs(1),
        )?;
        at_least(
            "kafka.session_timeout",
            self.session_timeout,
            Duration::from_secs(1),
        )?;
        at_least(
            "kafka.produce_timeout",
            self.produce_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "kafka.commit_interval",
            self.commit_interval,
            Duration::from_millis(10),
        )?;
        // librdkafka's ranges of the properties these become.
        let hour = Duration::from_secs(3600);
        at_most("kafka.session_timeout", self.session_timeout, hour)?;
        at_most("kafka.max_poll_interval", self.max_poll_interval, 24 * hour)?;
        at_most("kafka.commit_interval", self.commit_interval, 24 * hour)?;
        self.validate_transactions()?;
        at_most(
            "kafka.produce_timeout",
            self.produce_timeout,
            LIBRDKAFKA_MAX_MS,
        )
    }

    /// The transaction settings in their ranges (checked in either mode, so
    /// that switching modes does not reveal a bad value).
    fn validate_transactions(&self) -> Result<(), SettingsError> {
        at_least(
            "kafka.transaction_interval",
            self.transaction_interval,
            Duration::from_millis(1),
        )?;
        at_most(
            "kafka.transaction_interval",
            self.transaction_interval,
            Duration::from_secs(60),
        )?;
        check(
            self.transaction_max_records >= 1,
            "kafka.transaction_max_records",
            "must be at least 1",
        )?;
        at_least(
            "kafka.transaction_timeout",
            self.transaction_timeout,
            Duration::from_secs(1),
        )?;
        check(
            self.transaction_timeout > self.transaction_interval,
            "kafka.transaction_timeout",
            "must be longer than kafka.transaction_interval",
        )?;
        check(
            self.transactional_id
                .as_ref()
                .is_none_or(|id| !id.trim().is_empty()),
            "kafka.transactional_id",
            "must not be empty when set",
        )
    }

    /// The first of `names` set in `properties`.
    fn first_property(&self, names: &[&'static str]) -> Option<&'static str> {
        names
            .iter()
            .copied()
            .find(|p| self.properties.contains_key(*p))
    }
}

impl ApiSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        check(
            matches!(self.base_url.scheme(), "http" | "https"),
            "api.base_url",
            "must be an http or https URL",
        )?;
        more_than_zero("api.request_timeout", self.request_timeout)?;
        check(
            !self.connect_timeout.is_zero() && self.connect_timeout <= self.request_timeout,
            "api.connect_timeout",
            "must be more than 0s and at most api.request_timeout",
        )?;
        if let Some(dir) = &self.tokens_dir {
            check(
                dir.is_dir(),
                "api.tokens_dir",
                format!("{} is not a directory", dir.display()),
            )?;
        }
        more_than_zero("api.tokens_reload_interval", self.tokens_reload_interval)
    }
}

impl EventSettings {
    /// Every field is a name or a dotted path without empty steps.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (key, value) in [
            ("event.session_id_field", &self.session_id_field),
            ("event.tenant_id_field", &self.tenant_id_field),
            ("event.call_type_field", &self.call_type_field),
        ] {
            check(
                !value.split('.').any(str::is_empty),
                key,
                "must be a field name or dotted path",
            )?;
        }
        Ok(())
    }
}

impl RetrySettings {
    /// A usable backoff, and no errcode in two lists: a systemic or
    /// rate-limited errcode is never also permanent.
    pub fn validate(&self) -> Result<(), SettingsError> {
        more_than_zero("retry.min_delay", self.min_delay)?;
        check(
            self.max_delay >= self.min_delay,
            "retry.max_delay",
            "must be at least retry.min_delay",
        )?;
        check(
            self.factor >= 1.0 && self.factor.is_finite(),
            "retry.factor",
            "must be a number of at least 1",
        )?;
        check(
            self.max_attempts > 0,
            "retry.max_attempts",
            "must be at least 1",
        )?;
        for (key, codes) in [
            ("retry.systemic_errcodes", &self.systemic_errcodes),
            ("retry.rate_limited_errcodes", &self.rate_limited_errcodes),
        ] {
            if let Some(c) = codes.iter().find(|c| self.permanent_errcodes.contains(c)) {
                return Err(invalid(
                    key,
                    format!("errcode {c} is also in retry.permanent_errcodes"),
                ));
            }
        }
        Ok(())
    }
}

impl SystemicSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        share("systemic.failure_ratio", self.failure_ratio)?;
        share("systemic.dead_letter_ratio", self.dead_letter_ratio)?;
        within_window(
            ("systemic.min_calls", self.min_calls),
            ("systemic.call_window", self.call_window),
        )?;
        within_window(
            ("systemic.min_records", self.min_records),
            ("systemic.record_window", self.record_window),
        )?;
        delay_range(
            ("systemic.probe_min_delay", self.probe_min_delay),
            ("systemic.probe_max_delay", self.probe_max_delay),
        )?;
        check(
            self.dead_letter_hold >= self.probe_min_delay,
            "systemic.dead_letter_hold",
            "must be at least systemic.probe_min_delay (one trial)",
        )
    }
}

impl RateLimitSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        check(
            self.per_tenant_per_second == 0 || self.burst > 0,
            "rate_limit.burst",
            "must be at least 1",
        )?;
        delay_range(
            ("rate_limit.backoff_min", self.backoff_min),
            ("rate_limit.backoff_max", self.backoff_max),
        )
    }
}

impl PipelineSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        check(
            self.max_in_flight > 0,
            "pipeline.max_in_flight",
            "must be at least 1",
        )?;
        let share = self.max_in_flight_per_tenant();
        check(
            share > 0 && share <= self.max_in_flight,
            "pipeline.max_in_flight_per_tenant",
            "must be at least 1 and at most pipeline.max_in_flight",
        )?;
        check(
            self.max_hold >= Duration::from_secs(1),
            "pipeline.max_hold",
            "must be at least 1s (to let held records wait without a bound, set pipeline.held_overflow = \"wait\")",
        )
    }
}

impl LogSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        check(
            !self.level.trim().is_empty()
                && tracing_subscriber::EnvFilter::try_new(&self.level).is_ok(),
            "log.level",
            "is not a valid tracing filter",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn defaults() -> Settings {
        Settings::load_from(None, env(&[])).unwrap()
    }

    /// The key and message of an invalid setting.
    fn rejected(result: Result<(), SettingsError>) -> (String, String) {
        match result {
            Err(SettingsError::Invalid { key, message }) => (key, message),
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn each_section_validates_itself_and_names_its_key() {
        let s = defaults();
        let mut kafka = s.kafka.clone();
        kafka.dead_letter_topic = kafka.output_topic.clone();
        assert_eq!(rejected(kafka.validate()).0, "kafka.dead_letter_topic");
        let mut api = s.api.clone();
        api.connect_timeout = api.request_timeout + Duration::from_secs(1);
        assert_eq!(rejected(api.validate()).0, "api.connect_timeout");
        let mut event = s.event.clone();
        event.tenant_id_field = "data.".into();
        assert_eq!(rejected(event.validate()).0, "event.tenant_id_field");
        let mut retry = s.retry.clone();
        retry.permanent_errcodes = vec![40001];
        retry.rate_limited_errcodes = vec![40001];
        assert_eq!(
            rejected(retry.validate()),
            (
                "retry.rate_limited_errcodes".into(),
                "errcode 40001 is also in retry.permanent_errcodes".into()
            )
        );
        let mut systemic = s.systemic.clone();
        systemic.min_records = systemic.record_window + 1;
        assert_eq!(rejected(systemic.validate()).0, "systemic.min_records");
        let mut rate_limit = s.rate_limit.clone();
        rate_limit.per_tenant_per_second = 10;
        rate_limit.burst = 0;
        assert_eq!(rejected(rate_limit.validate()).0, "rate_limit.burst");
        let mut pipeline = s.pipeline.clone();
        pipeline.max_in_flight = 0;
        assert_eq!(rejected(pipeline.validate()).0, "pipeline.max_in_flight");
        let mut log = s.log.clone();
        log.level = " ".into();
        assert_eq!(rejected(log.validate()).0, "log.level");
    }

    #[test]
    fn shared_rules_keep_their_messages() {
        let s = defaults();
        let mut kafka = s.kafka.clone();
        kafka.produce_timeout = Duration::from_millis(99);
        assert_eq!(
            rejected(kafka.validate()),
            (
                "kafka.produce_timeout".into(),
                "must be at least 100ms".into()
            )
        );
        kafka.produce_timeout = Duration::from_millis(100);
        kafka.session_timeout = Duration::from_millis(999);
        assert_eq!(
            rejected(kafka.validate()),
            ("kafka.session_timeout".into(), "must be at least 1s".into())
        );
        let mut systemic = s.systemic.clone();
        systemic.dead_letter_ratio = f64::NAN;
        assert_eq!(
            rejected(systemic.validate()),
            (
                "systemic.dead_letter_ratio".into(),
                "must be a share in (0, 1]".into()
            )
        );
        systemic.dead_letter_ratio = 1.0;
        systemic.probe_min_delay = Duration::ZERO;
        assert_eq!(
            rejected(systemic.validate()),
            (
                "systemic.probe_max_delay".into(),
                "must be at least systemic.probe_min_delay, which must be more than 0s".into()
            )
        );
        let mut rate_limit = s.rate_limit.clone();
        rate_limit.backoff_max = rate_limit.backoff_min / 2;
        assert_eq!(
            rejected(rate_limit.validate()),
            (
                "rate_limit.backoff_max".into(),
                "must be at least rate_limit.backoff_min, which must be more than 0s".into()
            )
        );
    }

    #[test]
    fn rules_across_sections_name_their_key() {
        let mut s = defaults();
        // Below the kafka section's 1s floor too: the drain is what it is too short for.
        s.kafka.max_poll_interval = Duration::from_millis(500);
        assert_eq!(
            rejected(s.validate()),
            (
                "kafka.max_poll_interval".into(),
                "must be longer than pipeline.drain_timeout".into()
            )
        );
        let mut s = defaults();
        s.pipeline.stall_timeout = s.retry.max_elapsed;
        assert_eq!(rejected(s.validate()).0, "pipeline.stall_timeout");
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.pipeline.max_in_flight, 512);
        assert_eq!(s.kafka.input_topic, "uincall.call-ended");
        assert_eq!(s.retry.min_delay, Duration::from_millis(500));
    }

    #[test]
    fn environment_overrides_with_double_underscore() {
        let s = Settings::load_from(
            None,
            env(&[
                ("UINCALL__KAFKA__BROKERS", "b1:9092,b2:9092"),
                ("UINCALL__PIPELINE__MAX_IN_FLIGHT", "64"),
                ("UINCALL__RETRY__PERMANENT_ERRCODES", "40001,40002"),
                ("UINCALL__API__TOKENS__TENANT-A", "s3cr3t"),
                ("UINCALL__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(s.pipeline.max_in_flight, 64);
        assert_eq!(s.retry.permanent_errcodes, vec![40001, 40002]);
        assert!(s.api.tokens.contains_key("tenant-a"));
        assert_eq!(
            s.kafka
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("SASL_SSL")
        );
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = Settings::load_from(None, env(&[("UINCALL__KAFKA__BROKER", "x")])).unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err = Settings::load_from(None, env(&[("UINCALL__PIPELINE__MAX_IN_FLIGHT", "lots")]))
            .unwrap_err();
        assert!(err.to_string().contains("max_in_flight"), "{err}");
        let err =
            Settings::load_from(None, env(&[("UINCALL__RETRY__MAX_DELAY", "100ms")])).unwrap_err();
        assert!(err.to_string().contains("retry.max_delay"), "{err}");
        let err =
            Settings::load_from(None, env(&[("UINCALL__API__BASE_URL", "not a url")])).unwrap_err();
        assert!(err.to_string().contains("base_url"), "{err}");
    }

    #[test]
    fn durations_past_what_librdkafka_takes_or_absurd_name_the_key() {
        for (var, value, key) in [
            (
                "UINCALL__KAFKA__SESSION_TIMEOUT",
                "2h",
                "kafka.session_timeout",
            ),
            (
                "UINCALL__KAFKA__COMMIT_INTERVAL",
                "25h",
                "kafka.commit_interval",
            ),
            (
                "UINCALL__KAFKA__PRODUCE_TIMEOUT",
                "30days",
                "kafka.produce_timeout",
            ),
            (
                "UINCALL__INGEST__FORWARD_TIMEOUT",
                "30days",
                "ingest.forward_timeout",
            ),
            // Added to api.request_timeout in a check: no overflow.
            (
                "UINCALL__RETRY__MAX_ELAPSED",
                "18446744073709551615s",
                "pipeline.stall_timeout",
            ),
        ] {
            let err = Settings::load_from(None, env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
        let err = Settings::load_from(
            None,
            env(&[
                ("UINCALL__KAFKA__MAX_POLL_INTERVAL", "25h"),
                ("UINCALL__PIPELINE__STALL_TIMEOUT", "26h"),
            ]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("kafka.max_poll_interval")
                && err.to_string().contains("at most 1day"),
            "{err}"
        );
    }

    #[test]
    fn group_settings_that_cannot_work_name_the_key() {
        let err = Settings::load_from(None, env(&[("UINCALL__PIPELINE__REVOKE_DRAIN", "400s")]))
            .unwrap_err();
        assert!(err.to_string().contains("pipeline.revoke_drain"), "{err}");
        let err = Settings::load_from(None, env(&[("UINCALL__KAFKA__GROUP_PROTOCOL", "eager")]))
            .unwrap_err();
        assert!(err.to_string().contains("group_protocol"), "{err}");
        let err = Settings::load_from(
            None,
            env(&[
                ("UINCALL__KAFKA__GROUP_PROTOCOL", "consumer"),
                (
                    "UINCALL__KAFKA__PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY",
                    "range",
                ),
            ]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("kafka.properties.partition.assignment.strategy"),
            "{err}"
        );
        let s = Settings::load_from(None, env(&[("UINCALL__KAFKA__GROUP_PROTOCOL", "consumer")]))
            .unwrap();
        assert_eq!(s.kafka.group_protocol, GroupProtocol::Consumer);
    }

    #[test]
    fn redacted_output_hides_tokens_and_loads_back() {
        let s = Settings::load_from(
            None,
            env(&[(
                "UINCALL__API__TOKENS__T1",
                "670253572927b24acffc41078ddabcde",
            )]),
        )
        .unwrap();
        let text = s.to_redacted_toml();
        assert!(!text.contains("670253572927"), "{text}");
        assert!(text.contains("[redacted]"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, &text).unwrap();
        let again = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(again.kafka.output_topic, s.kafka.output_topic);
    }

    #[test]
    fn push_secrets_are_redacted_and_a_short_one_is_named() {
        let secret = "push-secret-not-for-print";
        let s =
            Settings::load_from(None, env(&[("UINCALL__INGEST__SECRETS__t1", secret)])).unwrap();
        let text = s.to_redacted_toml();
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("[ingest.secrets]"), "{text}");
        let e = Settings::load_from(None, env(&[("UINCALL__INGEST__SECRETS__t1", "short")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ingest.secrets.t1"), "{e}");
        assert!(!e.contains("short\""), "{e}");
        let e = Settings::load_from(
            None,
            env(&[("UINCALL__INGEST__ALLOW_FROM", "10.0.0.0/8,10.0.0.0/33")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ingest.allow_from") && e.contains("10.0.0.0/33"),
            "{e}"
        );
        let s = Settings::load_from(
            None,
            env(&[(
                "UINCALL__INGEST__FORWARD_COMMANDS",
                "call_hangup, call_talking",
            )]),
        )
        .unwrap();
        assert_eq!(s.ingest.forward_commands, ["call_hangup", "call_talking"]);
    }

    #[test]
    fn push_port_deadlines_and_connection_cap_are_read_and_zero_is_named() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        let i = &s.ingest;
        assert_eq!(i.header_timeout, Duration::from_secs(10));
        assert_eq!(i.body_timeout, Duration::from_secs(10));
        assert_eq!(i.idle_timeout, Duration::from_secs(60));
        assert_eq!(i.max_connections, 1024);
        assert_eq!(i.shutdown_timeout, Duration::from_secs(20));
        let s = Settings::load_from(
            None,
            env(&[
                ("UINCALL__INGEST__HEADER_TIMEOUT", "250ms"),
                ("UINCALL__INGEST__MAX_CONNECTIONS", "4"),
            ]),
        )
        .unwrap();
        assert_eq!(s.ingest.header_timeout, Duration::from_millis(250));
        assert_eq!(s.ingest.max_connections, 4);
        for (var, value, key) in [
            (
                "UINCALL__INGEST__HEADER_TIMEOUT",
                "0s",
                "ingest.header_timeout",
            ),
            ("UINCALL__INGEST__BODY_TIMEOUT", "0s", "ingest.body_timeout"),
            ("UINCALL__INGEST__IDLE_TIMEOUT", "0s", "ingest.idle_timeout"),
            (
                "UINCALL__INGEST__SHUTDOWN_TIMEOUT",
                "0s",
                "ingest.shutdown_timeout",
            ),
            (
                "UINCALL__INGEST__IDLE_TIMEOUT",
                "30days",
                "ingest.idle_timeout",
            ),
            (
                "UINCALL__INGEST__MAX_CONNECTIONS",
                "0",
                "ingest.max_connections",
            ),
        ] {
            let err = Settings::load_from(None, env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn secret_kafka_properties_are_redacted_and_the_rest_shown() {
        let secret = "hunter2-not-for-print";
        let s = Settings::load_from(
            None,
            env(&[
                ("UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD", secret),
                ("UINCALL__KAFKA__PROPERTIES__SSL_KEY_PEM", secret),
                (
                    "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET",
                    secret,
                ),
                (
                    "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_CONFIG",
                    secret,
                ),
                (
                    "UINCALL__KAFKA__PROPERTIES__SSL_KEY_LOCATION",
                    "/etc/kafka/client.key",
                ),
                ("UINCALL__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
                (
                    "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                    "https://login.example.com/token",
                ),
                (
                    "UINCALL__KAFKA__PROPERTIES__HTTPS_EXAMPLE_URL",
                    format!(
                        "https://user:{secret}@idp.example.com/t?client_secret={secret}&scope=kafka"
                    )
                    .as_str(),
                ),
                // A password as a parser would percent-encode it, and a
                // token alone before the host.
                (
                    "UINCALL__KAFKA__PROPERTIES__HTTPS_OTHER_URL",
                    "https://user:pa=ss:w@rd==@idp.example.com/t",
                ),
                (
                    "UINCALL__KAFKA__PROPERTIES__HTTPS_SLASH_URL",
                    "https://user:ab/cd?e#f==@idp.example.com/t",
                ),
                (
                    "UINCALL__KAFKA__PROPERTIES__HTTPS_TOKEN_URL",
                    "https://tok3n-not-for-print@idp.example.com/t#x",
                ),
                ("UINCALL__KAFKA__PROPERTIES__SSL_KEYSTORE_PASSWORD", secret),
                ("UINCALL__KAFKA__PROPERTIES__SSL_KEY_PASSWORD", secret),
                ("UINCALL__KAFKA__PROPERTIES__SASL_JAAS_CONFIG", secret),
                (
                    "UINCALL__KAFKA__PROPERTIES__SSL_KEYSTORE_LOCATION",
                    "/etc/kafka/client.p12",
                ),
            ]),
        )
        .unwrap();
        let text = s.to_redacted_toml();
        assert!(!text.contains(secret), "{text}");
        assert!(
            text.contains(
                "\"sasl.oauthbearer.token.endpoint.url\" = \"https://login.example.com/token\""
            ),
            "{text}"
        );
        for key in [
            "sasl.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "ssl.keystore.password",
            "ssl.key.password",
            "sasl.jaas.config",
        ] {
            assert!(
                text.contains(&format!("\"{key}\" = \"[redacted]\"")),
                "{key}: {text}"
            );
        }
        assert!(
            text.contains("\"ssl.key.location\" = \"/etc/kafka/client.key\""),
            "{text}"
        );
        assert!(
            text.contains("\"ssl.keystore.location\" = \"/etc/kafka/client.p12\""),
            "{text}"
        );
        assert!(
            text.contains("\"https.example.url\" = \"https://user:[redacted]@idp.example.com/t?client_secret=[redacted]&scope=kafka\""),
            "{text}"
        );
        assert!(
            text.contains("\"https.other.url\" = \"https://user:[redacted]@idp.example.com/t\""),
            "{text}"
        );
        assert!(
            text.contains("\"https.token.url\" = \"https://[redacted]@idp.example.com/t#x\""),
            "{text}"
        );
        assert!(
            text.contains("\"https.slash.url\" = \"https://user:[redacted]@idp.example.com/t\""),
            "{text}"
        );
        assert!(
            !text.contains("pa=ss") && !text.contains("tok3n") && !text.contains("ab/cd"),
            "{text}"
        );
        assert!(
            text.contains("\"security.protocol\" = \"SASL_SSL\""),
            "{text}"
        );
    }

    #[test]
    fn tenant_overrides_load_and_a_bad_url_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        let toml =
            "[tenants.\"t-private\"]\nbase_url = \"https://uincall.example\"\nper_second = 5\n";
        std::fs::write(&path, toml).unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        let t = &s.tenants["t-private"];
        assert_eq!(
            t.base_url.as_ref().unwrap().as_str(),
            "https://uincall.example/"
        );
        assert_eq!(t.per_second, Some(5));
        std::fs::write(&path, "[tenants.t1]\nbase_url = \"ftp://x\"\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tenants.t1.base_url"), "{e}");
        std::fs::write(&path, "[tenants.t1]\nper_secnd = 5\n").unwrap();
        let e = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("per_secnd"), "{e}");
    }
}
