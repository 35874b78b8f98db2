//! Typed, layered settings: embedded defaults, an optional file, then
//! environment variables (`UINCALL__SECTION__KEY`). Unknown keys and invalid
//! values stop start-up with a message that names the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::SecretString;
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

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
    /// How often stored offsets (completed prefixes only) are committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long one produce may wait for the broker's acknowledgement before
    /// it is retried (librdkafka `message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// Extra librdkafka properties for consumer and producer (SASL, TLS,
    /// tuning). Underscores in keys read from the environment become dots.
    #[serde(default)]
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
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the side port serving `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
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

fn redact_map<S: Serializer>(
    map: &BTreeMap<String, SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.keys().map(|k| (k, "[redacted]")))
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

    /// Checks relations between values; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let k = &self.kafka;
        for (key, value) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.group_id", &k.group_id),
            ("kafka.input_topic", &k.input_topic),
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if k.output_topic == k.input_topic {
            return Err(invalid(
                "kafka.output_topic",
                "must differ from kafka.input_topic",
            ));
        }
        if k.dead_letter_topic == k.input_topic || k.dead_letter_topic == k.output_topic {
            return Err(invalid(
                "kafka.dead_letter_topic",
                "must differ from the input and output topics",
            ));
        }
        for reserved in [
            "group.id",
            "bootstrap.servers",
            "enable.auto.offset.store",
            "enable.idempotence",
            "acks",
        ] {
            if k.properties.contains_key(reserved) {
                return Err(invalid(
                    &format!("kafka.properties.{reserved}"),
                    "is set by the worker itself and cannot be overridden",
                ));
            }
        }
        if k.max_poll_interval <= self.pipeline.drain_timeout {
            return Err(invalid(
                "kafka.max_poll_interval",
                "must be longer than pipeline.drain_timeout",
            ));
        }
        if k.max_poll_interval < Duration::from_secs(1) {
            return Err(invalid("kafka.max_poll_interval", "must be at least 1s"));
        }
        if self.pipeline.revoke_drain >= k.max_poll_interval {
            return Err(invalid(
                "pipeline.revoke_drain",
                "must be shorter than kafka.max_poll_interval",
            ));
        }
        if k.group_protocol == GroupProtocol::Consumer
            && let Some(key) = ["partition.assignment.strategy", "heartbeat.interval.ms"]
                .into_iter()
                .find(|p| k.properties.contains_key(*p))
        {
            return Err(invalid(
                &format!("kafka.properties.{key}"),
                "is not supported with kafka.group_protocol = \"consumer\" (set broker side)",
            ));
        }
        if k.session_timeout < Duration::from_secs(1) {
            return Err(invalid("kafka.session_timeout", "must be at least 1s"));
        }
        if k.produce_timeout < Duration::from_millis(100) {
            return Err(invalid("kafka.produce_timeout", "must be at least 100ms"));
        }
        let a = &self.api;
        if !matches!(a.base_url.scheme(), "http" | "https") {
            return Err(invalid("api.base_url", "must be an http or https URL"));
        }
        if a.request_timeout.is_zero() {
            return Err(invalid("api.request_timeout", "must be more than 0s"));
        }
        if a.connect_timeout.is_zero() || a.connect_timeout > a.request_timeout {
            return Err(invalid(
                "api.connect_timeout",
                "must be more than 0s and at most api.request_timeout",
            ));
        }
        if let Some(dir) = &a.tokens_dir
            && !dir.is_dir()
        {
            return Err(invalid(
                "api.tokens_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
        for (key, value) in [
            ("event.session_id_field", &self.event.session_id_field),
            ("event.tenant_id_field", &self.event.tenant_id_field),
            ("event.call_type_field", &self.event.call_type_field),
        ] {
            if value.split('.').any(str::is_empty) {
                return Err(invalid(key, "must be a field name or dotted path"));
            }
        }
        let r = &self.retry;
        if r.min_delay.is_zero() {
            return Err(invalid("retry.min_delay", "must be more than 0s"));
        }
        if r.max_delay < r.min_delay {
            return Err(invalid(
                "retry.max_delay",
                "must be at least retry.min_delay",
            ));
        }
        if !(r.factor >= 1.0 && r.factor.is_finite()) {
            return Err(invalid("retry.factor", "must be a number of at least 1"));
        }
        if r.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        for (key, ratio) in [
            ("systemic.failure_ratio", self.systemic.failure_ratio),
            (
                "systemic.dead_letter_ratio",
                self.systemic.dead_letter_ratio,
            ),
        ] {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return Err(invalid(key, "must be a share in (0, 1]"));
            }
        }
        let y = &self.systemic;
        if y.call_window == 0 || y.min_calls == 0 || y.min_calls > y.call_window {
            return Err(invalid(
                "systemic.min_calls",
                "must be at least 1 and at most systemic.call_window",
            ));
        }
        if y.record_window == 0 || y.min_records == 0 || y.min_records > y.record_window {
            return Err(invalid(
                "systemic.min_records",
                "must be at least 1 and at most systemic.record_window",
            ));
        }
        if y.probe_min_delay.is_zero() || y.probe_max_delay < y.probe_min_delay {
            return Err(invalid(
                "systemic.probe_max_delay",
                "must be at least systemic.probe_min_delay, which must be more than 0s",
            ));
        }
        let l = &self.rate_limit;
        if l.per_tenant_per_second > 0 && l.burst == 0 {
            return Err(invalid("rate_limit.burst", "must be at least 1"));
        }
        if l.backoff_min.is_zero() || l.backoff_max < l.backoff_min {
            return Err(invalid(
                "rate_limit.backoff_max",
                "must be at least rate_limit.backoff_min, which must be more than 0s",
            ));
        }
        if a.tokens_reload_interval.is_zero() {
            return Err(invalid(
                "api.tokens_reload_interval",
                "must be more than 0s",
            ));
        }
        for (key, codes) in [
            ("retry.systemic_errcodes", &r.systemic_errcodes),
            ("retry.rate_limited_errcodes", &r.rate_limited_errcodes),
        ] {
            if let Some(c) = codes.iter().find(|c| r.permanent_errcodes.contains(c)) {
                return Err(invalid(
                    key,
                    format!("errcode {c} is also in retry.permanent_errcodes"),
                ));
            }
        }
        if self.pipeline.stall_timeout <= r.max_elapsed + a.request_timeout {
            return Err(invalid(
                "pipeline.stall_timeout",
                "must be longer than retry.max_elapsed plus api.request_timeout (a record retrying within its budget is not a stall)",
            ));
        }
        if self.pipeline.max_in_flight == 0 {
            return Err(invalid("pipeline.max_in_flight", "must be at least 1"));
        }
        if self.log.level.trim().is_empty()
            || tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
        {
            return Err(invalid("log.level", "is not a valid tracing filter"));
        }
        Ok(())
    }

    /// The effective settings as TOML, secrets replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("settings serialise to TOML")
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
}
