use std::time::Duration;

use chrono::DateTime;
use rdkafka::Message;

use uincall_enricher::dead_letter::header as dlq;
use uincall_enricher::fake_api::{ERRCODE_NOT_FOUND, ERRCODE_NOT_READY};

use crate::helpers::*;

#[tokio::test]
async fn transient_errcodes_then_success_are_published_without_dead_letter() {
    let env = TestEnv::new("transient", 1, Duration::ZERO).await;
    let sessions = vec![
        "transient3-a".to_string(),
        "transient1-b".to_string(),
        "http500-c".to_string(),
        "garbage-d".to_string(),
    ];
    env.seed(&sessions).await;
    let worker = env.start_worker(env.settings()).await;
    let out = env.read_output(sessions.len()).await;
    worker.stop().await.unwrap();

    for m in &out {
        let v = enriched_json(m);
        let k = key(m);
        let expected_attempts = match k.as_str() {
            "transient3-a" => 4,
            _ => 2,
        };
        assert_eq!(v["enrichment"]["attempts"], expected_attempts, "{k}");
        assert_eq!(env.api.calls(&k), expected_attempts, "{k}");
    }
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

#[tokio::test]
async fn permanent_errcode_goes_to_dead_letter_with_exact_headers() {
    let env = TestEnv::new("permanent", 1, Duration::ZERO).await;
    let value = format!(
        r#"{{"session_id":"permanent-1","tenant_id":"{}"}}"#,
        env.tenant
    );
    env.seed_raw(&[(
        Some("permanent-1"),
        value.as_bytes(),
        &[("trace-id", "abc-123")],
    )])
    .await;
    let input = testkit_input_message(&env).await;
    let worker = env.start_worker(env.settings()).await;
    let dead = env.read_dlq(1).await;
    worker.stop().await.unwrap();

    let m = &dead[0];
    assert_eq!(
        m.key(),
        Some("permanent-1".as_bytes()),
        "original key untouched"
    );
    assert_eq!(
        m.payload(),
        Some(value.as_bytes()),
        "original value untouched"
    );
    let h = |name| header(m, name).unwrap_or_else(|| panic!("header {name} missing"));
    assert_eq!(h("trace-id"), "abc-123", "original headers kept");
    assert_eq!(h(dlq::ERROR_CLASS), "permanent_error");
    assert_eq!(h(dlq::REASON), "permanent errcode 40004: session not found");
    assert_eq!(h(dlq::ERRCODE), ERRCODE_NOT_FOUND.to_string());
    assert_eq!(h(dlq::ERRMSG), "session not found");
    assert_eq!(h(dlq::HTTP_STATUS), "200");
    assert_eq!(h(dlq::ATTEMPTS), "1");
    let first = DateTime::parse_from_rfc3339(&h(dlq::FIRST_ATTEMPT_AT)).unwrap();
    let last = DateTime::parse_from_rfc3339(&h(dlq::LAST_ATTEMPT_AT)).unwrap();
    let failed = DateTime::parse_from_rfc3339(&h(dlq::FAILED_AT)).unwrap();
    assert!(first <= last && last <= failed);
    assert_eq!(h(dlq::SOURCE_TOPIC), env.input);
    assert_eq!(h(dlq::SOURCE_PARTITION), input.partition().to_string());
    assert_eq!(h(dlq::SOURCE_OFFSET), input.offset().to_string());
    assert_eq!(
        h(dlq::SOURCE_TIMESTAMP),
        input.timestamp().to_millis().unwrap().to_string()
    );
    assert_eq!(h(dlq::CONSUMER_GROUP), env.group);
    assert_eq!(h(dlq::TENANT_ID), env.tenant);
    assert_eq!(h(dlq::SESSION_ID), "permanent-1");
    assert_eq!(
        h(dlq::ENRICHER),
        format!("uincall-enricher/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        env.api.calls("permanent-1"),
        1,
        "no retry of a permanent errcode"
    );
    assert!(env.is_empty(&env.output), "nothing enriched");
}

async fn testkit_input_message(env: &TestEnv) -> rdkafka::message::OwnedMessage {
    crate::testkit::read_topic(&env.bootstrap(), &env.input, 1, WAIT)
        .await
        .unwrap()
        .remove(0)
}

#[tokio::test]
async fn exhausted_retries_dead_letter_with_the_last_errcode() {
    let env = TestEnv::new("exhausted", 1, Duration::ZERO).await;
    env.seed(&["transient99-x".to_string(), "nodata-y".to_string()])
        .await;
    let mut settings = env.settings();
    settings.retry.max_attempts = 3;
    let worker = env.start_worker(settings).await;
    let dead = env.read_dlq(2).await;
    worker.stop().await.unwrap();

    for m in &dead {
        let k = key(m);
        assert_eq!(
            header(m, dlq::ERROR_CLASS).as_deref(),
            Some("retries_exhausted"),
            "{k}"
        );
        assert_eq!(header(m, dlq::ATTEMPTS).as_deref(), Some("3"), "{k}");
        assert_eq!(env.api.calls(&k), 3, "{k}");
        match k.as_str() {
            "transient99-x" => {
                assert_eq!(header(m, dlq::ERRCODE), Some(ERRCODE_NOT_READY.to_string()));
                assert_eq!(header(m, dlq::ERRMSG).as_deref(), Some("record not ready"));
                assert_eq!(
                    header(m, dlq::REASON).as_deref(),
                    Some("errcode 10001: record not ready")
                );
            }
            "nodata-y" => {
                assert_eq!(header(m, dlq::ERRCODE).as_deref(), Some("0"));
                assert_eq!(
                    header(m, dlq::REASON).as_deref(),
                    Some("errcode 0 but no record yet")
                );
            }
            other => panic!("unexpected dead letter {other}"),
        }
    }
}

#[tokio::test]
async fn invalid_events_are_dead_lettered_without_an_api_call() {
    let env = TestEnv::new("invalid", 1, Duration::ZERO).await;
    env.seed_raw(&[
        (None, b"not json at all", &[]),
        (Some("k2"), br#"{"tenant_id":"whoever"}"#, &[]),
        (
            Some("k3"),
            br#"{"session_id":"s-3","tenant_id":"tenant-with-no-token"}"#,
            &[],
        ),
        (Some("k4"), b"", &[]),
    ])
    .await;
    let worker = env.start_worker(env.settings()).await;
    let dead = env.read_dlq(4).await;
    worker.stop().await.unwrap();

    let reasons: Vec<(Option<String>, String, String)> = dead
        .iter()
        .map(|m| {
            (
                header(m, dlq::SESSION_ID),
                header(m, dlq::ERROR_CLASS).unwrap(),
                header(m, dlq::REASON).unwrap(),
            )
        })
        .collect();
    assert!(
        reasons.iter().all(|(_, class, _)| class == "invalid_event"),
        "{reasons:?}"
    );
    assert!(reasons[0].2.starts_with("event is not JSON"), "{reasons:?}");
    assert_eq!(reasons[1].2, "event has no `session_id`");
    assert_eq!(
        reasons[2].2,
        "no access token is configured for tenant `tenant-with-no-token`"
    );
    assert_eq!(reasons[2].0.as_deref(), Some("s-3"));
    assert_eq!(reasons[3].2, "event has no payload");
    assert_eq!(dead[0].payload(), Some(&b"not json at all"[..]));
    assert_eq!(header(&dead[0], dlq::ATTEMPTS).as_deref(), Some("0"));
    assert_eq!(env.api.total_calls(), 0);
}
