use std::time::Duration;

use uincall_enricher::dead_letter::header as dlq;

use crate::helpers::*;

#[tokio::test]
async fn the_token_never_appears_in_logs_or_dead_letter_headers() {
    let env = TestEnv::new("secret", 1, Duration::ZERO).await;
    // The fake answers HTTP 500 with a body echoing the request URL, token
    // included, as some gateways do.
    env.seed(&["echo500-1".to_string(), "call-ok".to_string()])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut child = env.spawn_binary(
        &log,
        &[("RUST_LOG", "debug"), ("UINCALL__RETRY__MAX_ATTEMPTS", "2")],
    );
    let dead = env.read_dlq(1).await;
    env.read_output(1).await;
    sigterm(&child);
    let status = wait_exit(&mut child, WAIT).await;
    assert!(status.success(), "worker exit: {status}");

    let m = &dead[0];
    assert_eq!(
        header(m, dlq::ERROR_CLASS).as_deref(),
        Some("retries_exhausted")
    );
    let reason = header(m, dlq::REASON).unwrap();
    assert!(
        reason.starts_with("HTTP 500: upstream error for GET"),
        "{reason}"
    );
    assert!(reason.contains("[redacted]"), "{reason}");
    use rdkafka::Message;
    use rdkafka::message::Headers;
    for h in m.headers().unwrap().iter() {
        let value = String::from_utf8_lossy(h.value.unwrap_or_default());
        assert!(
            !value.contains(&env.token),
            "header {} leaks the token",
            h.key
        );
    }
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("echo500-1"),
        "the log has the record's lines:\n{logs}"
    );
    assert!(logs.contains("API call failed"), "debug lines were written");
    assert!(!logs.contains(&env.token), "the log leaks the token");
    for (at, _) in logs.match_indices("access_token=") {
        let value = &logs[at + "access_token=".len()..];
        assert!(
            value.starts_with("[redacted]"),
            "a request URL with its token: {}",
            &logs[at..at + 60]
        );
    }
}

/// librdkafka's own log lines quote what it was given: an OIDC token
/// endpoint that cannot be reached is logged with its URL. Every line is
/// written with the settings' secrets replaced, whoever wrote it.
#[tokio::test]
async fn a_secret_in_librdkafkas_own_log_line_is_redacted() {
    let env = TestEnv::new("secret-rdkafka", 1, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let (in_url, client_secret) = ("query-secret-4711", "client-secret-4711");
    // Nothing listens on the discard port: the token request fails at once.
    let url = format!("http://127.0.0.1:9/token?client_secret={in_url}");
    let mut child = env.spawn_binary(
        &log,
        &[
            (
                "UINCALL__KAFKA__PROPERTIES__SECURITY_PROTOCOL",
                "SASL_PLAINTEXT",
            ),
            ("UINCALL__KAFKA__PROPERTIES__SASL_MECHANISM", "OAUTHBEARER"),
            (
                "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_METHOD",
                "oidc",
            ),
            (
                "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_ID",
                "enricher",
            ),
            (
                "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET",
                client_secret,
            ),
            (
                "UINCALL__KAFKA__PROPERTIES__SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                &url,
            ),
        ],
    );
    let status = wait_exit(&mut child, WAIT).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    let line = (text.lines())
        .find(|l| l.contains("\"target\":\"librdkafka\"") && l.contains("OIDC token from"))
        .unwrap_or_else(|| panic!("no librdkafka line quoting the endpoint:\n{text}"));
    assert!(line.contains("client_secret=[redacted]"), "{line}");
    assert!(
        !text.contains(in_url) && !text.contains(client_secret),
        "{text}"
    );
}
