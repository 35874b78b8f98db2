//! A secured cluster: the real binary connects over SASL_SSL (SCRAM-SHA-512,
//! a test CA) with the variables the chart's `extraEnv` would give it, and a
//! wrong password stops start-up with a message naming the problem, not the
//! password.

use std::time::Duration;

use crate::helpers::*;
use crate::testkit::{KafkaCluster, SCRAM_PASSWORD, SCRAM_USER, TestPki};

/// The variables a pod gets for SASL_SSL with SCRAM (password from a Secret
/// through `extraEnv`), for `password`.
fn sasl_env(bootstrap: &str, ca: &str, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("UINCALL__KAFKA__BROKERS", bootstrap.to_string()),
        (
            "UINCALL__KAFKA__PROPERTIES__SECURITY_PROTOCOL",
            "SASL_SSL".into(),
        ),
        (
            "UINCALL__KAFKA__PROPERTIES__SASL_MECHANISM",
            "SCRAM-SHA-512".into(),
        ),
        (
            "UINCALL__KAFKA__PROPERTIES__SASL_USERNAME",
            SCRAM_USER.into(),
        ),
        ("UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD", password.into()),
        (
            "UINCALL__KAFKA__PROPERTIES__SSL_CA_LOCATION",
            ca.to_string(),
        ),
    ]
}

#[tokio::test]
async fn the_worker_enriches_over_sasl_ssl_and_a_wrong_password_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(&dir.path().join("pki")).unwrap();
    let cluster = KafkaCluster::start_secured(1, &pki).unwrap();
    let secured = cluster.secured_bootstrap();
    let env = TestEnv::on_cluster("sasl", 2, Duration::ZERO, cluster).await;
    let ca = pki.ca.to_string_lossy().to_string();

    // The right password: records are enriched over the secured listener.
    let good = sasl_env(&secured, &ca, SCRAM_PASSWORD);
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let log = dir.path().join("worker.log");
    let mut child = env.spawn_binary(&log, &good);
    env.seed(&["sasl-1".to_string(), "sasl-2".to_string()])
        .await;
    let out = env.read_output(2).await;
    assert_eq!(out.len(), 2);
    sigterm(&child);
    assert!(wait_exit(&mut child, WAIT).await.success());

    // A wrong password: start-up fails, saying why, without the password.
    let wrong_password = "not-the-password-4711";
    let bad = sasl_env(&secured, &ca, wrong_password);
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bad_log = dir.path().join("wrong.log");
    let mut child = env.spawn_binary(&bad_log, &bad);
    let status = wait_exit(&mut child, Duration::from_secs(120)).await;
    let text = std::fs::read_to_string(&bad_log).unwrap();
    assert!(!status.success(), "{text}");
    // librdkafka's error lines say why; the worker's last line says it
    // could not read the cluster's metadata.
    assert!(text.contains("SASL authentication error"), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.contains("worker failed") && last.contains("kafka.brokers"),
        "{text}"
    );
    assert!(!text.contains(wrong_password), "{text}");
    println!(
        "start-up with a wrong password ended: {status}; its last line: {}",
        text.lines().last().unwrap_or_default()
    );
}
