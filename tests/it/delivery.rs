use std::collections::BTreeSet;
use std::time::Duration;

use crate::testkit;
use rdkafka::Message;
use uincall_enricher::record::header as out_header;

use crate::helpers::*;

#[tokio::test]
async fn n_events_in_n_enriched_records_out_with_the_right_content() {
    let env = TestEnv::new("happy", 3, Duration::from_millis(5)).await;
    let sessions: Vec<String> = (0..60).map(|i| format!("call-{i:03}")).collect();
    env.seed(&sessions).await;
    let worker = env.start_worker(env.settings()).await;

    let out = env.read_output(sessions.len()).await;
    let stats = worker.stats.clone();
    worker.stop().await.expect("clean stop");
    assert_eq!(stats.enriched(), sessions.len() as u64);
    assert_eq!(stats.consumed(), sessions.len() as u64);

    let keys: BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(keys, sessions.iter().cloned().collect::<BTreeSet<_>>());
    for m in &out {
        let v = enriched_json(m);
        let k = key(m);
        assert_eq!(v["session_id"], k.as_str());
        assert_eq!(v["tenant_id"], env.tenant.as_str());
        assert_eq!(v["event"]["session_id"], k.as_str());
        assert_eq!(v["call"]["session_id"], k.as_str());
        assert_eq!(v["call"]["lists"][0]["id"], format!("frag-{k}"));
        assert!(v["call"]["hangup_reason"].is_i64(), "ver=1 was sent");
        assert!(v["labels"]["hangup_reason"]["name"].is_string());
        assert_eq!(v["enrichment"]["attempts"], 1);
        assert_eq!(v["enrichment"]["source"]["topic"], env.input.as_str());
        let partition = v["enrichment"]["source"]["partition"].as_i64().unwrap();
        assert!((0..env.partitions as i64).contains(&partition));
        assert_eq!(
            header(m, out_header::TENANT_ID).as_deref(),
            Some(env.tenant.as_str())
        );
        assert_eq!(header(m, out_header::SCHEMA_VERSION).as_deref(), Some("1"));
        assert_eq!(
            header(m, out_header::CONTENT_TYPE).as_deref(),
            Some("application/json")
        );
        assert_eq!(env.api.calls(&k), 1);
    }
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

#[tokio::test]
async fn clean_stop_commits_exactly_what_was_processed() {
    let env = TestEnv::new("commit", 3, Duration::ZERO).await;
    let sessions: Vec<String> = (0..30).map(|i| format!("c-{i}")).collect();
    env.seed(&sessions).await;
    let worker = env.start_worker(env.settings()).await;
    env.read_output(sessions.len()).await;
    worker.stop().await.expect("clean stop");

    // Each partition's committed offset is one past its last input record.
    let input = testkit::read_topic(&env.bootstrap(), &env.input, sessions.len(), WAIT)
        .await
        .unwrap();
    let mut expected = vec![None; env.partitions as usize];
    for m in &input {
        let slot = &mut expected[m.partition() as usize];
        *slot = Some(slot.unwrap_or(0).max(m.offset() + 1));
    }
    assert_eq!(env.committed(), expected);
}

#[tokio::test]
async fn api_calls_stay_within_the_window_while_the_broker_acknowledges() {
    // 40 ms per answer and 300 records: with room for twice the window
    // between consume and acknowledgement, the API must still never see
    // more than `max_in_flight` calls at once, and does see that many.
    let env = TestEnv::new("window", 3, Duration::from_millis(40)).await;
    let sessions: Vec<String> = (0..300).map(|i| format!("call-{i:03}")).collect();
    env.seed(&sessions).await;
    let mut s = env.settings();
    s.pipeline.max_in_flight = 8;
    let worker = env.start_worker(s).await;

    let out = env.read_output(sessions.len()).await;
    worker.stop().await.expect("clean stop");
    let keys: BTreeSet<String> = out.iter().map(key).collect();
    assert_eq!(keys.len(), sessions.len());
    assert_eq!(env.api.max_concurrent_calls(), 8);
}
