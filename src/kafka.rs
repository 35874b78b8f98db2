//! librdkafka client configuration: what the worker sets itself (delivery
//! guarantees) and what the operator may add (`kafka.properties`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use tracing::{debug, error, info, warn};

use crate::settings::{GroupProtocol, KafkaSettings, redact};

/// `kafka.client_id`, else `uincall-enricher-$HOSTNAME` (the pod name on
/// Kubernetes), else `uincall-enricher`.
pub fn client_id(k: &KafkaSettings) -> String {
    if let Some(id) = &k.client_id {
        return id.clone();
    }
    hostname().map_or_else(
        || "uincall-enricher".to_string(),
        |h| format!("uincall-enricher-{h}"),
    )
}

/// `kafka.transactional_id`, else `<group_id>-$HOSTNAME` (the pod name on
/// Kubernetes: stable across the pod's restarts, distinct between pods),
/// else the group id.
pub fn transactional_id(k: &KafkaSettings) -> String {
    if let Some(id) = &k.transactional_id {
        return id.clone();
    }
    hostname().map_or_else(|| k.group_id.clone(), |h| format!("{}-{h}", k.group_id))
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn base(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("client.id", client_id(k))
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    // The system's CA certificates for TLS listeners and an OIDC token
    // endpoint: OpenSSL is linked in statically and its own default
    // directory (/usr/local/ssl) is empty in the image; `probe` finds the
    // ca-certificates bundle.
    for (location, pem) in [
        ("ssl.ca.location", "ssl.ca.pem"),
        ("https.ca.location", "https.ca.pem"),
    ] {
        if !k.properties.contains_key(location) && !k.properties.contains_key(pem) {
            c.set(location, "probe");
        }
    }
    c
}

/// Consumer: the worker commits offsets itself, only for completed
/// prefixes, with the records finished past them as metadata
/// (`pipeline::commit`). Classic
/// groups use the cooperative-sticky assignor (a rebalance revokes only the
/// partitions that move); KIP-848 groups are assigned by the broker.
pub fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base(k);
    c.set("group.id", &k.group_id)
        // The worker commits itself (pipeline::commit): librdkafka's
        // commits carry no metadata and skip partitions that did not move.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("max.poll.interval.ms", millis(k.max_poll_interval))
        .set("enable.partition.eof", "false");
    match k.group_protocol {
        GroupProtocol::Classic => {
            c.set("session.timeout.ms", millis(k.session_timeout));
            if !k.properties.contains_key("partition.assignment.strategy") {
                c.set("partition.assignment.strategy", "cooperative-sticky");
            }
        }
        GroupProtocol::Consumer => {
            c.set("group.protocol", "consumer");
        }
    }
    if !k.properties.contains_key("statistics.interval.ms") {
        // Lag, committed offsets and broker state for /metrics and the
        // health checks.
        c.set("statistics.interval.ms", "5000");
    }
    if !k.properties.contains_key("auto.offset.reset") {
        c.set("auto.offset.reset", "earliest");
    }
    // Read-ahead beyond the window only hides fetch latency; librdkafka's
    // defaults (100 000 records a partition, 64 MiB) are resident memory on
    // a backlog. Once a partition's queue is past them librdkafka waits
    // `fetch.queue.backoff.ms` (1 s) before it fetches again: with queues
    // this small that put 0.7 s on the median latency of paced events.
    for (key, value) in [
        ("queued.max.messages.kbytes", "2048"),
        ("queued.min.messages", "1000"),
        ("fetch.queue.backoff.ms", "10"),
    ] {
        if !k.properties.contains_key(key) {
            c.set(key, value);
        }
    }
    c
}

/// The replay's consumer: assigned partitions, progress committed by the
/// replay itself only for acknowledged re-submissions.
pub fn replay_consumer_config(k: &KafkaSettings, group: &str) -> ClientConfig {
    let mut c = base(k);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    c
}

/// A reader of assigned partitions (`<kafka.group_id>.backfill`: never
/// joined, nothing committed), from the earliest offset, told when it
/// reaches a partition's end.
pub fn reader_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = replay_consumer_config(k, &format!("{}.backfill", k.group_id));
    c.set("enable.partition.eof", "true");
    // It reads one pass, start to end, records of a few bytes: librdkafka's
    // default prefetch (up to 100 000 records per partition) buys no speed
    // and was most of its memory.
    for (key, value) in [
        ("queued.min.messages", "10000"),
        ("queued.max.messages.kbytes", "8192"),
    ] {
        if !k.properties.contains_key(key) {
            c.set(key, value);
        }
    }
    c
}

/// Producer: idempotent, acknowledged by all in-sync replicas. With
/// `max_message_bytes` (the smallest `max.message.bytes` of the topics it
/// writes) no batch is built larger than the broker takes: a record too
/// large is refused alone, never together with the valid records batched
/// beside it.
pub fn producer_config(k: &KafkaSettings, max_message_bytes: Option<usize>) -> ClientConfig {
    let mut c = base(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", millis(k.produce_timeout));
    if let Some(max) = max_message_bytes {
        // Room for the batch's own framing (61 bytes in v2 record batches).
        let batch = max.saturating_sub(1024).max(1);
        if !k.properties.contains_key("batch.size") {
            c.set("batch.size", batch.to_string());
        }
        if !k.properties.contains_key("message.max.bytes") {
            c.set("message.max.bytes", max.max(1000).to_string());
        }
    }
    if !k.properties.contains_key("linger.ms") {
        c.set("linger.ms", "5");
    }
    c
}

/// The producer of `kafka.delivery = "exactly_once"`: [`producer_config`]
/// with the transactional id and timeout (a record's timeout cannot be
/// longer than its transaction's), and no linger: a transaction's records
/// are all produced at once, and its commit waits until they are
/// acknowledged (a linger only delays that).
pub fn transactional_producer_config(
    k: &KafkaSettings,
    max_message_bytes: Option<usize>,
) -> ClientConfig {
    let mut c = producer_config(k, max_message_bytes);
    if !k.properties.contains_key("linger.ms") {
        c.set("linger.ms", "0");
    }
    c.set("transactional.id", transactional_id(k))
        .set("transaction.timeout.ms", millis(k.transaction_timeout))
        .set(
            "message.timeout.ms",
            millis(k.produce_timeout.min(k.transaction_timeout)),
        );
    c
}

/// librdkafka's log lines as `tracing` events of target `librdkafka`.
pub fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            error!(target: "librdkafka", fac, "{message}")
        }
        L::Warning => warn!(target: "librdkafka", fac, "{message}"),
        L::Notice | L::Info => info!(target: "librdkafka", fac, "{message}"),
        L::Debug => debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// A client whose librdkafka logs go to `tracing`, and nothing more.
pub struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }
}

/// How long start-up waits for the cluster's metadata.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The first authentication or TLS failure librdkafka reports while
/// connecting (its reason, secrets removed).
#[derive(Default)]
struct ConnectWatch {
    secrets: Vec<String>,
    refused: Mutex<Option<String>>,
}

impl ClientContext for ConnectWatch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code()
            && is_refusal(code, reason)
        {
            let mut refused = self.refused.lock().unwrap();
            refused.get_or_insert_with(|| redact(reason, &self.secrets));
        }
    }
}

impl ProducerContext for ConnectWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Errors that waiting does not cure: the cluster refused the client's
/// credentials (SASL, an OAUTHBEARER token that could not be had), the TLS
/// handshake failed here (an untrusted certificate, a plaintext client on a
/// TLS listener), or the broker ended it with a TLS alert (it refused the
/// client's certificate: librdkafka reports that as a failed receive).
fn is_refusal(code: RDKafkaErrorCode, reason: &str) -> bool {
    match code {
        RDKafkaErrorCode::Authentication
        | RDKafkaErrorCode::SSL
        | RDKafkaErrorCode::SaslAuthenticationFailed => true,
        RDKafkaErrorCode::BrokerTransportFailure => {
            reason.contains("SSL routines") && reason.contains(" alert ")
        }
        _ => false,
    }
}

/// For a client that could not be created: librdkafka's refusal of a
/// property quotes the value, which may be a secret, so every secret-looking
/// `kafka.properties` value is removed from the message (the property's
/// name stays).
pub fn config_error(k: &KafkaSettings, what: &str) -> impl FnOnce(KafkaError) -> anyhow::Error {
    let (secrets, what) = (k.secrets(), what.to_string());
    move |e| anyhow::anyhow!("{what}: {}", redact(&e.to_string(), &secrets))
}

/// Connects to `kafka.brokers` with the configured security settings and
/// reads the cluster's metadata, so that start-up ends at once with the
/// reason when the cluster refuses the client (credentials, certificates)
/// rather than after the clients' timeouts with only "could not read".
pub async fn check_connection(k: &KafkaSettings) -> anyhow::Result<()> {
    let watch = ConnectWatch {
        secrets: k.secrets(),
        ..ConnectWatch::default()
    };
    let client: BaseProducer<ConnectWatch> = base(k)
        .create_with_context(watch)
        .map_err(config_error(k, "creating the Kafka client"))?;
    let brokers = k.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        // Short first waits notice a refusal soon; longer ones let a slow
        // cluster answer.
        let mut wait = Duration::from_millis(250);
        loop {
            let attempt = client.client().fetch_metadata(None, wait);
            wait = (wait * 2).min(Duration::from_secs(4));
            // Delivers librdkafka's queued events (log lines, then errors)
            // to the context: one poll with no wait takes a single event,
            // and an error behind a few log lines was seen only 20 s later.
            client.poll(Duration::from_millis(100));
            if let Some(reason) = client.context().refused.lock().unwrap().take() {
                bail!(
                    "the Kafka cluster at kafka.brokers {brokers} refused the connection: \
                     {reason} (check security.protocol, sasl.* and ssl.* in kafka.properties)"
                );
            }
            match attempt {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "could not read metadata from kafka.brokers {brokers} within {}s: {e}",
                        CONNECT_TIMEOUT.as_secs()
                    )
                }
                Err(_) => {}
            }
        }
    })
    .await?
}

fn millis(d: std::time::Duration) -> String {
    d.as_millis().to_string()
}

/// The smallest `max.message.bytes` of `topics` (topic configuration, or the
/// broker's default it inherits); `None` when the cluster does not say
/// (no DescribeConfigs permission, an old broker), and the producer keeps
/// librdkafka's defaults.
/// Whether a new client, bootstrapped afresh, gets the cluster's metadata
/// with at least one broker within `limit`: the cluster answers, whatever
/// an older client that lost its way believes.
pub async fn cluster_answers(k: &KafkaSettings, limit: Duration) -> bool {
    let config = base(k);
    tokio::task::spawn_blocking(move || {
        let Ok(client) = config.create::<BaseProducer>() else {
            return false;
        };
        let answered = client.client().fetch_metadata(None, limit);
        answered.is_ok_and(|m| !m.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}

pub async fn max_message_bytes(k: &KafkaSettings, topics: &[&str]) -> Option<usize> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = base(k).create().ok()?;
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(std::time::Duration::from_secs(30)));
    let results = match admin.describe_configs(&specs, &opts).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "reading the topics' max.message.bytes failed; producer defaults kept");
            return None;
        }
    };
    results
        .into_iter()
        .filter_map(|r| r.ok())
        .filter_map(|r| r.get("max.message.bytes")?.value.as_deref()?.parse().ok())
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn kafka(pairs: &[(&str, &str)]) -> KafkaSettings {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, env).unwrap().kafka
    }

    #[test]
    fn classic_groups_use_the_cooperative_sticky_assignor() {
        let c = consumer_config(&kafka(&[]));
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(c.get("session.timeout.ms"), Some("45000"));
        assert_eq!(c.get("group.protocol"), None);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("2048"));
        assert_eq!(c.get("queued.min.messages"), Some("1000"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn ca_certificates_are_probed_unless_given() {
        let c = producer_config(&kafka(&[]), None);
        assert_eq!(c.get("ssl.ca.location"), Some("probe"));
        assert_eq!(c.get("https.ca.location"), Some("probe"));
        let c = consumer_config(&kafka(&[
            (
                "UINCALL__KAFKA__PROPERTIES__SSL_CA_LOCATION",
                "/etc/kafka/ca.crt",
            ),
            (
                "UINCALL__KAFKA__PROPERTIES__HTTPS_CA_PEM",
                "-----BEGIN CERTIFICATE-----",
            ),
        ]));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/kafka/ca.crt"));
        assert_eq!(c.get("https.ca.location"), None);
    }

    #[test]
    fn kip848_groups_leave_session_and_assignor_to_the_broker() {
        let c = consumer_config(&kafka(&[("UINCALL__KAFKA__GROUP_PROTOCOL", "consumer")]));
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        assert_eq!(c.get("session.timeout.ms"), None);
        assert_eq!(c.get("partition.assignment.strategy"), None);
    }

    #[test]
    fn client_id_is_the_setting_or_names_the_host() {
        let k = kafka(&[("UINCALL__KAFKA__CLIENT_ID", "enricher-7")]);
        assert_eq!(client_id(&k), "enricher-7");
        assert!(client_id(&kafka(&[])).starts_with("uincall-enricher"));
    }

    #[test]
    fn refusals_are_credentials_and_tls_not_the_network() {
        use RDKafkaErrorCode as C;
        let refused = [
            (
                C::Authentication,
                "SASL authentication error: Authentication failed",
            ),
            (
                C::Authentication,
                "Failed to acquire SASL OAUTHBEARER token: 401",
            ),
            (C::SSL, "SSL handshake failed: certificate verify failed"),
            (
                C::BrokerTransportFailure,
                "Receive failed: error:0A000412:SSL routines::ssl/tls alert bad certificate: SSL alert number 42",
            ),
        ];
        for (code, reason) in refused {
            assert!(is_refusal(code, reason), "{code:?} {reason}");
        }
        let transient = [
            (
                C::BrokerTransportFailure,
                "Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
            ),
            (
                C::BrokerTransportFailure,
                "Receive failed: error:0A000126:SSL routines::unexpected eof while reading",
            ),
            (C::AllBrokersDown, "1/1 brokers are down"),
        ];
        for (code, reason) in transient {
            assert!(!is_refusal(code, reason), "{code:?} {reason}");
        }
    }

    #[test]
    fn a_refused_property_is_named_without_its_secret_value() {
        use rdkafka::consumer::BaseConsumer;
        let secret = "hunter2-not-for-print";
        let k = kafka(&[
            ("UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD", secret),
            ("UINCALL__KAFKA__PROPERTIES__SSL_KEYSTORE_PASSWORDX", secret),
        ]);
        let e = match consumer_config(&k).create::<BaseConsumer>() {
            Ok(_) => panic!("an unknown property is refused"),
            Err(e) => e,
        };
        // librdkafka's own message quotes the value.
        assert!(e.to_string().contains(secret));
        let shown = format!("{:#}", config_error(&k, "creating the Kafka consumer")(e));
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("ssl.keystore.passwordx"), "{shown}");
    }

    #[test]
    fn refusal_reasons_lose_every_secret() {
        let secrets = vec!["hunter2".to_string(), String::new()];
        assert_eq!(
            redact("password hunter2 refused (hunter2)", &secrets),
            "password [redacted] refused ([redacted])"
        );
    }

    #[test]
    fn batches_never_exceed_the_topics_limit() {
        let c = producer_config(&kafka(&[]), Some(16384));
        assert_eq!(c.get("message.max.bytes"), Some("16384"));
        assert_eq!(c.get("batch.size"), Some("15360"));
        let c = producer_config(&kafka(&[]), None);
        assert_eq!(c.get("batch.size"), None);
    }
}
