//! librdkafka client configuration: what the worker sets itself (delivery
//! guarantees) and what the operator may add (`kafka.properties`).

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::settings::KafkaSettings;

fn base(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set(
            "client.id",
            concat!("uincall-enricher-", env!("CARGO_PKG_VERSION")),
        )
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

/// Consumer: offsets are stored by the worker only for completed prefixes
/// and committed in the background (and once more on shutdown).
pub fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base(k);
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", millis(k.commit_interval))
        .set("session.timeout.ms", millis(k.session_timeout))
        .set("max.poll.interval.ms", millis(k.max_poll_interval))
        .set("enable.partition.eof", "false");
    if !k.properties.contains_key("statistics.interval.ms") {
        // Lag, committed offsets and broker state for /metrics and the
        // health checks.
        c.set("statistics.interval.ms", "5000");
    }
    if !k.properties.contains_key("auto.offset.reset") {
        c.set("auto.offset.reset", "earliest");
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

/// Producer: idempotent, acknowledged by all in-sync replicas.
pub fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", millis(k.produce_timeout));
    if !k.properties.contains_key("linger.ms") {
        c.set("linger.ms", "5");
    }
    c
}

fn millis(d: std::time::Duration) -> String {
    d.as_millis().to_string()
}
