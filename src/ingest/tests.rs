//! Property test of the push URLs: 10 000 generated requests (more with
//! `PROPTEST_CASES`): any kind segment, right, wrong or missing secrets in
//! the path or in basic auth, any `type`, any headers, bodies that are
//! events, other JSON, bytes or too large, sent through the receiver's
//! router to librdkafka's in-process mock cluster. None may panic or be
//! answered 5xx (the broker is up), and each answer is the one its request
//! calls for: 404/401 without the secret, 413 over the limit, 400 for what
//! `push::decide` refuses, else 200.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use proptest::prelude::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::push::{self, Kind};
use super::{Receiver, push_routes};
use crate::properties::config;
use crate::settings::Settings;

const TENANT: &str = "t-1";
const SECRET: &str = "push-secret-0123456789";
const LIMIT: usize = 2048;

/// How a request presents itself.
#[derive(Debug, Clone)]
enum Auth {
    PathRight,
    PathWrong(String),
    PathOtherTenant,
    BasicRight,
    BasicWrong(String),
    /// An `Authorization` header that is not valid basic auth.
    BasicGarbage(String),
    None,
}

fn auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        3 => Just(Auth::PathRight),
        1 => "[a-zA-Z0-9_-]{0,24}".prop_map(Auth::PathWrong),
        1 => Just(Auth::PathOtherTenant),
        3 => Just(Auth::BasicRight),
        1 => "[ -~]{0,24}".prop_map(Auth::BasicWrong),
        1 => "[ -~]{0,40}".prop_map(Auth::BasicGarbage),
        1 => Just(Auth::None),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let field = || {
        prop_oneof![
            Just(Value::Null),
            "\\PC{0,10}".prop_map(Value::String),
            any::<i64>().prop_map(|n| json!(n)),
            Just(json!("call_hangup")),
            Just(json!(TENANT)),
        ]
    };
    let event = (
        proptest::option::of(field()),
        proptest::option::of(prop_oneof![Just(json!(TENANT)), field()]),
        proptest::option::of(prop_oneof![
            Just(json!("call_hangup")),
            Just(json!("call_talking")),
            field()
        ]),
    )
        .prop_map(|(session, tenant, command)| {
            let mut o = serde_json::Map::new();
            for (k, v) in [
                ("session_id", session),
                ("tenant_id", tenant),
                ("command", command),
            ] {
                if let Some(v) = v {
                    o.insert(k.into(), v);
                }
            }
            Value::Object(o).to_string().into_bytes()
        });
    prop_oneof![
        6 => event,
        2 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => (LIMIT + 1..LIMIT * 3).prop_map(|n| vec![b' '; n]),
        1 => Just(b"[]".to_vec()),
    ]
}

/// The answer a request calls for.
fn expected(kind: Option<Kind>, auth: &Auth, record_type: Option<&str>, body: &[u8]) -> StatusCode {
    let Some(kind) = kind else {
        return StatusCode::NOT_FOUND;
    };
    match auth {
        Auth::PathRight | Auth::BasicRight => {}
        Auth::PathWrong(_) | Auth::PathOtherTenant => return StatusCode::NOT_FOUND,
        Auth::BasicWrong(_) | Auth::BasicGarbage(_) | Auth::None => {
            return StatusCode::UNAUTHORIZED;
        }
    }
    if body.len() > LIMIT {
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    match push::decide(
        kind,
        record_type,
        body,
        TENANT,
        &event_fields(),
        &["call_hangup".to_string()],
    ) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// The embedded defaults' `event.*`.
pub(super) fn event_fields() -> crate::settings::EventSettings {
    Settings::load_from(None, Vec::<(String, String)>::new())
        .unwrap()
        .event
}

fn request(
    kind: &str,
    auth: &Auth,
    record_type: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Request<Body> {
    let query = record_type
        .map(|t| {
            format!(
                "?type={}",
                url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            )
        })
        .unwrap_or_default();
    let path = match auth {
        Auth::PathRight => format!("/push/{TENANT}/{SECRET}/{kind}"),
        Auth::PathWrong(s) if s.is_empty() => format!("/push/{TENANT}/x{s}/{kind}"),
        Auth::PathWrong(s) => format!("/push/{TENANT}/{s}/{kind}"),
        Auth::PathOtherTenant => format!("/push/t-2/{SECRET}/{kind}"),
        _ => format!("/push/{kind}"),
    };
    let mut req = Request::post(format!("{path}{query}"));
    if let Ok(v) = axum::http::HeaderValue::from_str(content_type) {
        req = req.header("content-type", v);
    }
    let basic = |user: &str, secret: &str| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        format!("Basic {b64}")
    };
    let authorization = match auth {
        Auth::BasicRight => Some(basic(TENANT, SECRET)),
        Auth::BasicWrong(s) => Some(basic(TENANT, s)),
        Auth::BasicGarbage(s) => Some(s.clone()),
        _ => None,
    };
    if let Some(a) = authorization
        && let Ok(v) = axum::http::HeaderValue::from_str(&a)
    {
        req = req.header("authorization", v);
    }
    req.body(Body::from(body)).unwrap()
}

/// A receiver writing to librdkafka's in-process mock cluster, with the
/// secrets of `t-1` and `t-2`, the body limit [`LIMIT`] and `extra`
/// settings.
fn mock_receiver(
    extra: &[(&str, &str)],
) -> (MockCluster<'static, DefaultProducerContext>, Arc<Receiver>) {
    let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let mut env = vec![
        (
            "UINCALL__KAFKA__BROKERS".to_string(),
            cluster.bootstrap_servers(),
        ),
        ("UINCALL__KAFKA__PROPERTIES__LINGER_MS".into(), "0".into()),
        // Every record a test expects acknowledged is, on a loaded machine
        // too (`extra` may set less for a test that wants the 503).
        ("UINCALL__INGEST__FORWARD_TIMEOUT".into(), "60s".into()),
        ("UINCALL__INGEST__MAX_BODY_BYTES".into(), LIMIT.to_string()),
        (format!("UINCALL__INGEST__SECRETS__{TENANT}"), SECRET.into()),
        (
            "UINCALL__INGEST__SECRETS__t-2".into(),
            "another-secret-0123456789".into(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = Settings::load_from(None, env).unwrap();
    cluster
        .create_topic(&settings.kafka.input_topic, 1, 1)
        .unwrap();
    let receiver = Receiver::new(&settings, Default::default()).unwrap();
    (cluster, receiver)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The count of `result` pushes of `kind` on the receiver's metrics.
fn count(r: &Receiver, kind: Kind, result: &'static str) -> u64 {
    r.metrics
        .requests
        .get_or_create(&super::RequestLabels {
            kind: kind.name(),
            result,
        })
        .get()
}

fn hangup(session: &str) -> Request<Body> {
    let body = json!({"session_id": session, "tenant_id": TENANT, "command": "call_hangup"});
    request(
        "call-event",
        &Auth::PathRight,
        None,
        "application/json",
        body.to_string().into_bytes(),
    )
}

#[test]
fn a_repeated_push_is_answered_and_not_forwarded_again() {
    let rt = runtime();
    let (_cluster, receiver) = mock_receiver(&[]);
    let router = push_routes(receiver.clone());
    for session in ["a", "a", "b", "a"] {
        let resp = rt
            .block_on(router.clone().oneshot(hangup(session)))
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(count(&receiver, Kind::CallEvent, "forwarded"), 2);
    assert_eq!(count(&receiver, Kind::CallEvent, "duplicate"), 2);

    // Off with a window of 0s.
    let (_cluster, receiver) = mock_receiver(&[("UINCALL__INGEST__DEDUP_WINDOW", "0s")]);
    let router = push_routes(receiver.clone());
    for _ in 0..2 {
        rt.block_on(router.clone().oneshot(hangup("a"))).unwrap();
    }
    assert_eq!(count(&receiver, Kind::CallEvent, "forwarded"), 2);
}

#[test]
fn a_tenant_over_its_rate_is_told_to_retry_and_the_others_go_on() {
    let rt = runtime();
    let (_cluster, receiver) = mock_receiver(&[("UINCALL__INGEST__PER_TENANT_PER_SECOND", "5")]);
    // One push an hour: the second within the hour is over the rate,
    // however slow the machine.
    let mut receiver = Arc::into_inner(receiver).unwrap();
    receiver.limiter = Some(governor::RateLimiter::keyed(
        governor::Quota::with_period(std::time::Duration::from_secs(3600)).unwrap(),
    ));
    let receiver = Arc::new(receiver);
    let router = push_routes(receiver.clone());
    let first = rt.block_on(router.clone().oneshot(hangup("r-1"))).unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = rt.block_on(router.clone().oneshot(hangup("r-2"))).unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // Another tenant has its own allowance.
    let body = json!({"session_id": "r-3", "tenant_id": "t-2", "command": "call_hangup"});
    let other = Request::post("/push/t-2/another-secret-0123456789/call-event")
        .body(Body::from(body.to_string()))
        .unwrap();
    let other = rt.block_on(router.clone().oneshot(other)).unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(count(&receiver, Kind::CallEvent, "rate_limited"), 1);
}

#[test]
fn pushes_from_outside_the_allowed_networks_are_forbidden() {
    use axum::extract::ConnectInfo;
    let rt = runtime();
    let (_cluster, receiver) =
        mock_receiver(&[("UINCALL__INGEST__ALLOW_FROM", "10.1.0.0/16, 192.168.0.0/24")]);
    let router = push_routes(receiver.clone());
    let from = |ip: &str, session: &str| {
        let mut req = hangup(session);
        let addr: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(addr));
        req
    };
    let status = |req: Request<Body>| rt.block_on(router.clone().oneshot(req)).unwrap().status();
    assert_eq!(status(from("10.1.2.3", "n-1")), StatusCode::OK);
    assert_eq!(status(from("10.2.0.1", "n-2")), StatusCode::FORBIDDEN);
    // An IPv4 client of a dual-stack listener is the IPv4 address it is.
    assert_eq!(status(from("[::ffff:10.1.2.4]", "n-4")), StatusCode::OK);
    assert_eq!(
        status(from("[::ffff:10.2.0.2]", "n-5")),
        StatusCode::FORBIDDEN
    );
    // No known source: refused while a list is set.
    assert_eq!(status(hangup("n-3")), StatusCode::FORBIDDEN);
    assert_eq!(count(&receiver, Kind::CallEvent, "forbidden"), 3);
}

#[test]
fn pushes_beyond_the_in_flight_bound_are_answered_503_at_once() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (cluster, receiver) = mock_receiver(&[
        ("UINCALL__INGEST__MAX_IN_FLIGHT", "4"),
        ("UINCALL__INGEST__FORWARD_TIMEOUT", "60s"),
    ]);
    let router = push_routes(receiver.clone());
    // The producer knows the cluster before it goes away.
    let first = rt
        .block_on(router.clone().oneshot(hangup("before")))
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    cluster.broker_down(1).unwrap();
    // Four pushes wait for an acknowledgement that cannot come yet.
    let held: Vec<_> = (0..4)
        .map(|i| rt.spawn(router.clone().oneshot(hangup(&format!("held-{i}")))))
        .collect();
    let started = std::time::Instant::now();
    while receiver.metrics.in_flight.get() < 4 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the four pushes never waited for the broker"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let over = rt.block_on(router.clone().oneshot(hangup("over"))).unwrap();
    assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(over.headers()["retry-after"], "1");
    assert_eq!(count(&receiver, Kind::CallEvent, "busy"), 1);
    // Back: the held pushes are acknowledged, and places are free again.
    cluster.broker_up(1).unwrap();
    for h in held {
        let resp = rt.block_on(h).unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let after = rt
        .block_on(router.clone().oneshot(hangup("after")))
        .unwrap();
    assert_eq!(after.status(), StatusCode::OK);
}

#[test]
fn every_push_gets_the_answer_it_calls_for_and_never_a_5xx() {
    let rt = runtime();
    let (_cluster, receiver) = mock_receiver(&[]);
    let router = push_routes(receiver);
    let kind = prop_oneof![
        3 => Just("call-event".to_string()),
        2 => Just("call-record".to_string()),
        1 => "[a-z_-]{1,12}".prop_map(|s| s),
    ];
    let record_type = proptest::option::of(prop_oneof![
        Just("1".to_string()),
        Just("0".to_string()),
        "\\PC{0,4}"
    ]);
    let content_type = prop_oneof![Just("application/json".to_string()), "[ -~]{0,30}"];
    proptest!(config(), |(kind in kind, auth in auth(), record_type in record_type, content_type in content_type, body in body())| {
        let want = expected(Kind::from_path(&kind), &auth, record_type.as_deref(), &body);
        let req = request(&kind, &auth, record_type.as_deref(), &content_type, body);
        let resp = rt.block_on(router.clone().oneshot(req)).unwrap();
        let status = resp.status();
        prop_assert!(!status.is_server_error(), "{status} for {kind} {auth:?}");
        prop_assert_eq!(status, want, "{} {:?} {:?}", kind, auth, record_type);
        let bytes = rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 16)).unwrap();
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        prop_assert_eq!(answer["code"].as_u64(), Some(status.as_u16() as u64), "{}", answer);
    });
}

#[test]
fn a_producer_failed_for_good_stops_the_receiver_and_a_refused_record_is_413() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let rt = runtime();
    let (cluster, receiver) = mock_receiver(&[]);
    let router = push_routes(receiver.clone());
    // The broker refuses the record itself: the sender must not retry it.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let refused = rt.block_on(router.clone().oneshot(hangup("big"))).unwrap();
    assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(count(&receiver, Kind::CallEvent, "rejected"), 1);
    assert!(!receiver.stop.is_cancelled());
    // Not authorised to write the topic: no push can ever be forwarded,
    // so the receiver stops (and exits 1) rather than answer 503 for ever.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let resp = rt
        .block_on(router.clone().oneshot(hangup("denied")))
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(receiver.stop.is_cancelled());
    let why = receiver.failure.get().expect("the failure is kept");
    assert!(why.contains("authoriz"), "{why}");
    let ready = rt.block_on(super::readyz(axum::extract::State(receiver.clone())));
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// A record read back: key, value, and headers as text.
struct Record {
    key: Option<String>,
    value: Vec<u8>,
    headers: std::collections::BTreeMap<String, String>,
}

/// The first `n` records on `topic` of the mock cluster.
fn records(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    topic: &str,
    n: usize,
) -> Vec<Record> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "ingest-tests")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{} of {n} records on {topic}",
            out.len()
        );
        if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(100)) {
            let headers = (m.headers().into_iter())
                .flat_map(|h| h.iter())
                .map(|h| {
                    let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_string(), v.into_owned())
                })
                .collect();
            out.push(Record {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

#[test]
fn a_push_for_a_tenant_without_an_access_token_is_forwarded_flagged() {
    let rt = runtime();
    let (cluster, receiver) = mock_receiver(&[("UINCALL__INGEST__TOKEN_TENANTS", "t-2, t-3")]);
    let router = push_routes(receiver.clone());
    let resp = rt.block_on(router.clone().oneshot(hangup("f-1"))).unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json!({"session_id": "f-2", "tenant_id": "t-2", "command": "call_hangup"});
    let known = Request::post("/push/t-2/another-secret-0123456789/call-event")
        .body(Body::from(body.to_string()))
        .unwrap();
    assert_eq!(
        rt.block_on(router.clone().oneshot(known)).unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(count(&receiver, Kind::CallEvent, "flagged"), 1);
    assert_eq!(count(&receiver, Kind::CallEvent, "forwarded"), 1);
    let input = records(&cluster, &receiver.topic, 2);
    let flag = |tenant: &str| {
        let r = (input.iter())
            .find(|r| r.headers.get("uincall.tenant").map(String::as_str) == Some(tenant))
            .unwrap();
        r.headers.get(super::FLAG_HEADER).cloned()
    };
    assert_eq!(flag(TENANT).as_deref(), Some(super::NO_ACCESS_TOKEN));
    assert_eq!(flag("t-2"), None);
}

#[test]
fn refused_pushes_are_dead_lettered_as_received_with_the_reason() {
    let rt = runtime();
    let refusing = [("UINCALL__INGEST__DEAD_LETTER_REFUSED", "true")];
    let (cluster, receiver) = mock_receiver(&refusing);
    let topic = receiver.dead_letter_topic.clone().unwrap();
    cluster.create_topic(&topic, 1, 1).unwrap();
    let refused = |receiver: &Arc<Receiver>, body: &[u8]| {
        let req = request(
            "call-event",
            &Auth::PathRight,
            None,
            "application/json",
            body.to_vec(),
        );
        let router = push_routes(receiver.clone());
        rt.block_on(router.oneshot(req)).unwrap().status()
    };
    assert_eq!(
        refused(&receiver, b"not json at all"),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        refused(&receiver, br#"{"command":"call_hangup"}"#),
        StatusCode::BAD_REQUEST
    );
    let letters = records(&cluster, &topic, 2);
    let Record { value, headers, .. } = &letters[0];
    assert_eq!(value, b"not json at all");
    assert_eq!(headers["dlq.error_class"], "invalid_event");
    assert!(
        headers["dlq.reason"].contains("event is not JSON"),
        "{headers:?}"
    );
    assert_eq!(headers["dlq.tenant_id"], TENANT);
    assert_eq!(headers["uincall.source"], "uincall.push.call-event");
    assert!(letters[1].headers["dlq.reason"].contains("has no `session_id`"));
    assert_eq!(count(&receiver, Kind::CallEvent, "invalid"), 2);
    // Not acknowledged (a receiver of its own with a short forward timeout,
    // its broker down): the sender is told to retry, not that it is wrong.
    let (down, receiver) =
        mock_receiver(&[refusing[0], ("UINCALL__INGEST__FORWARD_TIMEOUT", "1s")]);
    down.create_topic(&topic, 1, 1).unwrap();
    down.broker_down(1).unwrap();
    assert_eq!(
        refused(&receiver, b"still not json"),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(count(&receiver, Kind::CallEvent, "invalid"), 0);
}

#[test]
fn a_record_the_broker_refuses_is_dead_lettered_before_the_413() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let rt = runtime();
    let (cluster, receiver) = mock_receiver(&[("UINCALL__INGEST__DEAD_LETTER_REFUSED", "true")]);
    let topic = receiver.dead_letter_topic.clone().unwrap();
    cluster.create_topic(&topic, 1, 1).unwrap();
    // The input topic's write refuses it; the dead-letter write goes on.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let router = push_routes(receiver.clone());
    let resp = rt.block_on(router.oneshot(hangup("big"))).unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let letter = records(&cluster, &topic, 1).remove(0);
    assert!(String::from_utf8_lossy(&letter.value).contains(r#""session_id":"big""#));
    assert_eq!(letter.headers["dlq.error_class"], "publish_failed");
    assert!(
        letter.headers["dlq.reason"].contains("refused by the broker"),
        "{:?}",
        letter.headers
    );
    assert_eq!(count(&receiver, Kind::CallEvent, "rejected"), 1);
}

#[test]
fn session_and_tenant_are_read_where_the_worker_reads_them() {
    let rt = runtime();
    let (cluster, receiver) = mock_receiver(&[
        ("UINCALL__EVENT__SESSION_ID_FIELD", "sessionId"),
        ("UINCALL__EVENT__TENANT_ID_FIELD", "tenantId"),
    ]);
    let router = push_routes(receiver.clone());
    let push = |body: Value| {
        let req = request(
            "call-event",
            &Auth::PathRight,
            None,
            "application/json",
            body.to_string().into_bytes(),
        );
        rt.block_on(router.clone().oneshot(req)).unwrap().status()
    };
    // t-1's secret, a body naming t-2 where the worker looks: refused.
    let other = json!({"sessionId": "s-1", "tenantId": "t-2", "tenant_id": TENANT, "command": "call_hangup"});
    assert_eq!(push(other), StatusCode::BAD_REQUEST);
    // The configured session field is the key, a top-level session_id not.
    let own = json!({"sessionId": "s-2", "tenantId": TENANT, "session_id": "x", "command": "call_hangup"});
    assert_eq!(push(own), StatusCode::OK);
    // A number past 2^53 is the key as written; past 64 bits, refused.
    let big = r#"{"sessionId": 9007199254740993, "command": "call_hangup"}"#;
    assert_eq!(push(serde_json::from_str(big).unwrap()), StatusCode::OK);
    let forwarded = records(&cluster, &receiver.topic, 2);
    assert_eq!(forwarded[0].key.as_deref(), Some("s-2"));
    assert_eq!(forwarded[0].headers["uincall.tenant"], TENANT);
    assert_eq!(forwarded[1].key.as_deref(), Some("9007199254740993"));
    let req = request(
        "call-event",
        &Auth::PathRight,
        None,
        "application/json",
        br#"{"sessionId": 18446744073709551616, "command": "call_hangup"}"#.to_vec(),
    );
    let resp = rt.block_on(router.clone().oneshot(req)).unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(count(&receiver, Kind::CallEvent, "invalid"), 2);
}

#[test]
fn a_session_id_past_the_cap_is_refused_with_a_clear_400() {
    let rt = runtime();
    let (_cluster, receiver) = mock_receiver(&[]);
    let router = push_routes(receiver.clone());
    let long = "s".repeat(crate::event::MAX_ID_BYTES + 1);
    let resp = rt.block_on(router.oneshot(hangup(&long))).unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = rt
        .block_on(axum::body::to_bytes(resp.into_body(), 4096))
        .unwrap();
    let msg = serde_json::from_slice::<Value>(&body).unwrap()["msg"].clone();
    assert!(
        msg.as_str()
            .unwrap()
            .contains("`session_id` is 257 bytes long"),
        "{msg}"
    );
    assert!(receiver.forwarded.as_ref().unwrap().is_empty());
}

#[test]
fn a_lower_case_basic_scheme_is_basic_auth() {
    let rt = runtime();
    let (_cluster, receiver) = mock_receiver(&[]);
    let router = push_routes(receiver.clone());
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{TENANT}:{SECRET}"));
    for scheme in ["basic", "BASIC", "Basic"] {
        let body = json!({"session_id": scheme, "tenant_id": TENANT, "command": "call_hangup"});
        let req = Request::post("/push/call-event")
            .header("authorization", format!("{scheme} {b64}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = rt.block_on(router.clone().oneshot(req)).unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    let req = Request::post("/push/call-event")
        .header("authorization", format!("Bearer {b64}"))
        .body(Body::from("{}"))
        .unwrap();
    let resp = rt.block_on(router.oneshot(req)).unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn a_body_broken_off_is_unreadable_not_too_large() {
    let rt = runtime();
    let (_cluster, receiver) = mock_receiver(&[]);
    let router = push_routes(receiver.clone());
    let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![
        Ok(b"{\"session_id\":"),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "gone",
        )),
    ];
    let req = Request::post(format!("/push/{TENANT}/{SECRET}/call-event"))
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let resp = rt.block_on(router.oneshot(req)).unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(count(&receiver, Kind::CallEvent, "unreadable"), 1);
    assert_eq!(count(&receiver, Kind::CallEvent, "too_large"), 0);
}

/// How long a test waits for what it expects over a socket: far above the
/// settings' hundreds of milliseconds, so that a loaded machine passes.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Settings for [`super::serve_on`] against librdkafka's mock cluster (the
/// input topic created), with the secret of [`TENANT`] and `extra`.
fn mock_settings(
    extra: &[(&str, &str)],
) -> (MockCluster<'static, DefaultProducerContext>, Settings) {
    let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let mut env = vec![
        (
            "UINCALL__KAFKA__BROKERS".to_string(),
            cluster.bootstrap_servers(),
        ),
        ("UINCALL__KAFKA__PROPERTIES__LINGER_MS".into(), "0".into()),
        ("UINCALL__INGEST__FORWARD_TIMEOUT".into(), "60s".into()),
        (format!("UINCALL__INGEST__SECRETS__{TENANT}"), SECRET.into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = Settings::load_from(None, env).unwrap();
    cluster
        .create_topic(&settings.kafka.input_topic, 1, 1)
        .unwrap();
    (cluster, settings)
}

/// The receiver served on loopback: its push address, its stop and its
/// task.
async fn serve_on_loopback(
    settings: Settings,
) -> (
    std::net::SocketAddr,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let side = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(super::serve_on(settings, listener, side, stop.clone()));
    (addr, stop, server)
}

/// Reads until the server closes the connection (end of stream or reset)
/// and returns what it sent before; panics if it stays open [`PATIENCE`].
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let read_all = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all)
        .await
        .expect("the server kept the connection open")
}

/// Reads one answer (head and `content-length` body) and returns it as
/// text; panics if it does not come within [`PATIENCE`].
async fn one_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let read_one = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = (text[..end].lines())
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .map_or(0, |v| v.parse::<usize>().unwrap());
                if got.len() >= end + 4 + length {
                    return text;
                }
            }
            let n = stream.read(&mut buf).await.expect("reading the answer");
            assert!(n > 0, "closed before a whole answer: {text:?}");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read_one)
        .await
        .expect("no answer")
}

/// A call-ended push for [`TENANT`] over HTTP/1.1, whole.
fn raw_push(session: &str) -> Vec<u8> {
    let body = json!({"session_id": session, "tenant_id": TENANT, "command": "call_hangup"});
    let body = body.to_string();
    format!(
        "POST /push/{TENANT}/{SECRET}/call-event HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn connect(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_ends_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let (_cluster, settings) = mock_settings(&[
        ("UINCALL__INGEST__HEADER_TIMEOUT", "300ms"),
        // Not the idle timeout closing it.
        ("UINCALL__INGEST__IDLE_TIMEOUT", "1h"),
    ]);
    let (addr, stop, server) = serve_on_loopback(settings).await;
    let mut slow = connect(addr).await;
    slow.write_all(
        format!("POST /push/{TENANT}/{SECRET}/call-event HTTP/1.1\r\nhost: x\r\nx-pad: ")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answered = until_closed(&mut slow).await;
    assert!(!answered.starts_with(b"HTTP/1.1 2"), "{answered:?}");
    // The receiver goes on serving.
    let mut fine = connect(addr).await;
    fine.write_all(&raw_push("h-1")).await.unwrap();
    assert!(one_answer(&mut fine).await.starts_with("HTTP/1.1 200"));
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_half_way_is_answered_408_and_gives_its_place_back() {
    use tokio::io::AsyncWriteExt;
    let (_cluster, settings) = mock_settings(&[
        ("UINCALL__INGEST__BODY_TIMEOUT", "300ms"),
        ("UINCALL__INGEST__MAX_IN_FLIGHT", "1"),
    ]);
    let (addr, stop, server) = serve_on_loopback(settings).await;
    let whole = raw_push("b-1");
    let mut stalled = connect(addr).await;
    stalled.write_all(&whole[..whole.len() - 20]).await.unwrap();
    let answer = one_answer(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":408"), "{answer}");
    // Its body was not read whole: the connection is not kept.
    until_closed(&mut stalled).await;
    // The only `max_in_flight` place is free again.
    let mut next = connect(addr).await;
    next.write_all(&raw_push("b-2")).await.unwrap();
    let answer = one_answer(&mut next).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_max_connections_is_closed_at_once_and_the_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let (_cluster, settings) = mock_settings(&[
        ("UINCALL__INGEST__MAX_CONNECTIONS", "4"),
        ("UINCALL__INGEST__IDLE_TIMEOUT", "1h"),
    ]);
    let (addr, stop, server) = serve_on_loopback(settings).await;
    // Accepted in the order they connected: these four hold the places.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(connect(addr).await);
    }
    let mut fifth = connect(addr).await;
    assert_eq!(until_closed(&mut fifth).await, b"");
    for (i, stream) in open.iter_mut().enumerate() {
        stream
            .write_all(&raw_push(&format!("c-{i}")))
            .await
            .unwrap();
        let answer = one_answer(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_without_a_request_is_closed_after_the_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    let (_cluster, settings) = mock_settings(&[("UINCALL__INGEST__IDLE_TIMEOUT", "300ms")]);
    let (addr, stop, server) = serve_on_loopback(settings).await;
    let mut kept = connect(addr).await;
    kept.write_all(&raw_push("i-1")).await.unwrap();
    let answer = one_answer(&mut kept).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(until_closed(&mut kept).await, b"");
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_with_stalled_clients_returns_ok_after_the_shutdown_timeout() {
    use tokio::io::AsyncWriteExt;
    let (_cluster, settings) = mock_settings(&[
        ("UINCALL__INGEST__SHUTDOWN_TIMEOUT", "500ms"),
        // Only the shutdown deadline may end these.
        ("UINCALL__INGEST__HEADER_TIMEOUT", "1h"),
        ("UINCALL__INGEST__BODY_TIMEOUT", "1h"),
        ("UINCALL__INGEST__IDLE_TIMEOUT", "1h"),
    ]);
    let (addr, stop, server) = serve_on_loopback(settings).await;
    let mut silent = connect(addr).await;
    let mut half_head = connect(addr).await;
    half_head.write_all(b"POST /push/").await.unwrap();
    // A body that stops half-way, once the receiver is reading it (hyper
    // sends 100 Continue when the handler asks for the body).
    let mut half_body = connect(addr).await;
    let whole = String::from_utf8(raw_push("s-1")).unwrap();
    let (head, body) = whole.split_once("\r\n\r\n").unwrap();
    let head = format!("{head}\r\nexpect: 100-continue\r\n\r\n");
    half_body.write_all(head.as_bytes()).await.unwrap();
    let go_on = one_answer(&mut half_body).await;
    assert!(go_on.starts_with("HTTP/1.1 100"), "{go_on}");
    half_body.write_all(&body.as_bytes()[..10]).await.unwrap();
    stop.cancel();
    let stopped = tokio::time::timeout(PATIENCE, server)
        .await
        .expect("serve_on did not return after the shutdown timeout");
    stopped.unwrap().unwrap();
    for stream in [&mut silent, &mut half_head, &mut half_body] {
        until_closed(stream).await;
    }
}
