//! librdkafka client configuration: what the worker sets itself (delivery
//! guarantees) and what the operator may add (`kafka.properties`).

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::settings::{GroupProtocol, KafkaSettings};

/// `kafka.client_id`, else `uincall-enricher-$HOSTNAME` (the pod name on
/// Kubernetes), else `uincall-enricher`.
pub fn client_id(k: &KafkaSettings) -> String {
    if let Some(id) = &k.client_id {
        return id.clone();
    }
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .map_or_else(
            || "uincall-enricher".to_string(),
            |h| format!("uincall-enricher-{h}"),
        )
}

fn base(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("client.id", client_id(k))
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

/// Consumer: offsets are stored by the worker only for completed prefixes
/// and committed in the background (and once more on shutdown). Classic
/// groups use the cooperative-sticky assignor (a rebalance revokes only the
/// partitions that move); KIP-848 groups are assigned by the broker.
pub fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = base(k);
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", millis(k.commit_interval))
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
    if !k.properties.contains_key("queued.max.messages.kbytes") {
        // Read-ahead beyond the window only hides fetch latency; librdkafka's
        // 64 MiB default is resident memory on a backlog.
        c.set("queued.max.messages.kbytes", "16384");
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

fn millis(d: std::time::Duration) -> String {
    d.as_millis().to_string()
}

/// The smallest `max.message.bytes` of `topics` (topic configuration, or the
/// broker's default it inherits); `None` when the cluster does not say
/// (no DescribeConfigs permission, an old broker), and the producer keeps
/// librdkafka's defaults.
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
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("16384"));
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
    fn batches_never_exceed_the_topics_limit() {
        let c = producer_config(&kafka(&[]), Some(16384));
        assert_eq!(c.get("message.max.bytes"), Some("16384"));
        assert_eq!(c.get("batch.size"), Some("15360"));
        let c = producer_config(&kafka(&[]), None);
        assert_eq!(c.get("batch.size"), None);
    }
}
