//! The per-record CPU path, without I/O (docs/benchmarks.md):
//!
//!   cargo bench --bench hot_path
//!
//! parse a call-ended event, classify an API answer (parse the envelope and
//! normalise the record), serialise the enriched record, and the three in a
//! row as the worker runs them.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uincall_enricher::classify::{ApiAnswer, ErrcodePolicy, Verdict, classify};
use uincall_enricher::event::{CallEnded, parse_event};
use uincall_enricher::fake_api::sample_record;
use uincall_enricher::record::{self, Source};
use uincall_enricher::settings::Settings;

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

criterion_group!(benches, hot_path);
criterion_main!(benches);
