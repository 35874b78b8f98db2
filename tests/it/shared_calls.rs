//! Events of one session share the API call: at once, one call; again
//! within `api.recent_answers_ttl`, no call. Every event still gets its
//! own enriched record.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn events_of_one_session_make_one_api_call_and_each_gets_its_record() {
    let env = TestEnv::new("shared-calls", 1, Duration::ZERO).await;
    let first: Vec<String> = ["a", "a", "b", "a", "c", "a"]
        .iter()
        .map(|s| format!("shared-{s}"))
        .collect();
    // Held: no call can end before every record has come to its call.
    env.api.set_held(true);
    env.seed(&first).await;
    let worker = env.start_worker(env.settings()).await;
    wait_until("a call for each session", || env.api.total_calls() >= 3).await;
    env.api.set_held(false);
    let out = env.read_output(first.len()).await;
    assert_eq!(env.api.total_calls(), 3, "one call per session");
    let stats = &worker.stats;
    let saved = stats.api_calls_saved("in_flight") + stats.api_calls_saved("recent");
    assert_eq!(saved, 3);
    let reused = |m| {
        enriched_json(m)["enrichment"]["reused"]
            .as_str()
            .map(String::from)
    };
    let marked = out.iter().filter(|m| reused(m).is_some()).count();
    assert_eq!(marked, 3, "the records that made no call say so");

    // Later events of an enriched session: answered from the kept answer.
    let again = vec!["shared-a".to_string(), "shared-c".to_string()];
    env.seed(&again).await;
    let all = env.read_output(first.len() + again.len()).await;
    assert_eq!(
        env.api.total_calls(),
        3,
        "no call for a session enriched lately"
    );
    for m in &all[first.len()..] {
        let v = enriched_json(m);
        assert_eq!(v["enrichment"]["reused"], "recent", "{}", key(m));
        assert_eq!(v["enrichment"]["attempts"], 1);
        assert_eq!(v["call"]["session_id"], key(m));
    }
    assert!(worker.stats.api_calls_saved("recent") >= 2);
    worker.stop().await.unwrap();
    assert!(env.is_empty(&env.dlq), "nothing dead-lettered");
}

#[tokio::test]
async fn with_no_bytes_for_answers_a_later_event_is_asked_again() {
    let env = TestEnv::new("shared-off", 1, Duration::ZERO).await;
    let mut s = env.settings();
    s.api.recent_answers_bytes = 0;
    env.seed(&["off-a".to_string()]).await;
    let worker = env.start_worker(s).await;
    env.read_output(1).await;
    env.seed(&["off-a".to_string()]).await;
    env.read_output(2).await;
    worker.stop().await.unwrap();
    assert_eq!(env.api.total_calls(), 2);
}
