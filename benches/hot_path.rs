//! The per-record CPU path, without I/O (docs/benchmarks.md):
//!
//!   cargo bench --bench hot_path
//!
//! parse a call-ended event, classify an API answer (parse the envelope and
//! normalise the record, in one pass), serialise the enriched record, and
//! the three in a row as the worker runs them; then what sharing calls
//! adds to a record that makes its own call (lead it, keep its answer in a
//! full store of answers), and what a record of a session enriched lately
//! costs instead of its call (find the kept answer and read it); and a
//! record's trace span without export, under the worker's own subscriber
//! at log level `warn` (made, entered at each of its task's polls, its
//! context written as the output's headers, closed).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uincall_enricher::answers::{Answered, Answers, CallKey, Turn};
use uincall_enricher::classify::{ApiAnswer, ErrcodePolicy, Verdict, classify};
use uincall_enricher::event::{CallEnded, parse_event};
use uincall_enricher::fake_api::sample_record;
use uincall_enricher::otel;
use uincall_enricher::record::{self, Source};
use uincall_enricher::settings::Settings;
use uincall_enricher::uincall::Timed;

struct Fixture {
    settings: Settings,
    policy: ErrcodePolicy,
    event: Vec<u8>,
    answer: ApiAnswer,
    source: Source,
}

fn fixture() -> Fixture {
    let settings = Settings::load_from(None, Vec::new()).expect("embedded defaults load");
    let session = "7c3f0e6a-2b1d-4a8e-9f00-00000000a1b2";
    let event = serde_json::json!({
        "session_id": session,
        "tenant_id": "tenant-0001",
        "ended_at": "2026-11-23T10:00:00+08:00",
        "call_type": 4,
    });
    let body = serde_json::json!({
        "errcode": 0,
        "errmsg": "success",
        "data": sample_record(session, true, Some("4")),
    });
    Fixture {
        policy: ErrcodePolicy::from_settings(&settings.retry),
        settings,
        event: serde_json::to_vec(&event).unwrap(),
        answer: ApiAnswer::Http {
            status: 200,
            retry_after: None,
            body: Bytes::from(serde_json::to_vec(&body).unwrap()),
        },
        source: Source {
            topic: "uincall.call-ended".into(),
            partition: 3,
            offset: 1_234_567,
            timestamp_ms: Some(1_764_000_000_000),
        },
    }
}

fn parse(f: &Fixture) -> CallEnded {
    parse_event(Some(&f.event), &f.settings.event, None).expect("the event parses")
}

fn enriched(f: &Fixture, event: &CallEnded, verdict: &Verdict) -> Vec<u8> {
    let Verdict::Publish(call) = verdict else {
        panic!("the answer is publishable: {verdict:?}");
    };
    record::to_json(&record::Inputs {
        session_id: &event.session_id,
        tenant_id: &event.tenant_id,
        event: &event.raw,
        call,
        satisfaction_labels: &f.settings.labels.satisfaction,
        fetched_at: chrono::Utc::now(),
        attempts: 1,
        api_latency: Duration::from_millis(48),
        source: &f.source,
        reused: None,
    })
}

fn hot_path(c: &mut Criterion) {
    let f = fixture();
    let event = parse(&f);
    let verdict = classify(&f.answer, &f.policy);
    let record = enriched(&f, &event, &verdict);

    let mut g = c.benchmark_group("per_record");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_event", |b| b.iter(|| parse(black_box(&f))));
    g.bench_function("classify_answer", |b| {
        b.iter(|| classify(black_box(&f.answer), &f.policy))
    });
    g.bench_function("serialise_record", |b| {
        b.iter(|| enriched(&f, black_box(&event), black_box(&verdict)))
    });
    g.bench_function("all_three", |b| {
        b.iter(|| {
            let event = parse(black_box(&f));
            let verdict = classify(black_box(&f.answer), &f.policy);
            enriched(&f, &event, &verdict)
        })
    });
    share_and_reuse(&mut g, &f);
    record_span(&mut g, &f, &event);
    g.finish();
    eprintln!(
        "event {} bytes, API answer {} bytes, enriched record {} bytes",
        f.event.len(),
        match &f.answer {
            ApiAnswer::Http { body, .. } => body.len(),
            _ => 0,
        },
        record.len()
    );
}

/// A call shared and an answer reused, the store of answers full at its
/// default size (so every answer kept evicts the oldest).
fn share_and_reuse(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    f: &Fixture,
) {
    let store = Answers::new(
        f.settings.api.recent_answers_bytes,
        Duration::from_secs(300),
    );
    let answered = Answered {
        timed: Timed {
            answer: f.answer.clone(),
            latency: Duration::from_millis(48),
        },
        verdict: classify(&f.answer, &f.policy),
    };
    let mut n = 0u64;
    let lead_and_keep = |n: u64| {
        let key = CallKey::new("tenant-0001", &format!("session-{n:012}"), Some(4));
        match store.turn(key) {
            Turn::Lead(leader) => leader.done(&answered, chrono::Utc::now()),
            Turn::Join(_) => unreachable!("no call is under way"),
        }
    };
    for _ in 0..20_000 {
        lead_and_keep(n);
        n += 1;
    }
    g.bench_function("share_own_call", |b| {
        b.iter(|| {
            lead_and_keep(n);
            n += 1;
        })
    });
    let last = CallKey::new("tenant-0001", &format!("session-{:012}", n - 1), Some(4));
    g.bench_function("reuse_kept_answer", |b| {
        b.iter(|| {
            let kept = store.recent(black_box(&last)).expect("kept");
            let answer = ApiAnswer::Http {
                status: 200,
                retry_after: None,
                body: kept.body,
            };
            classify(&answer, &f.policy)
        })
    });
}

/// How often a record's task is polled (and its span entered) in this
/// sketch: the call's connection, request and answer, the rate limit and
/// the window, the write's acknowledgement.
const POLLS: usize = 8;

/// A record's span as the worker makes and uses it, without export.
fn record_span(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    f: &Fixture,
    event: &CallEnded,
) {
    let mut log = f.settings.log.clone();
    log.level = "warn".into();
    let _telemetry = uincall_enricher::telemetry::init(&log).expect("the subscriber installs");
    let headers: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    g.bench_function("record_span", |b| {
        b.iter(|| {
            let span = otel::record_span(&f.source, "uincall-enricher", &headers, Some(event));
            for _ in 0..POLLS {
                let _polled = span.enter();
            }
            let _polled = span.enter();
            black_box(otel::headers_of(&tracing::Span::none()))
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
