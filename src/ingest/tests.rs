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
use crate::settings::Settings;

const TENANT: &str = "t-1";
const SECRET: &str = "push-secret-0123456789";
const LIMIT: usize = 2048;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

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
        &["call_hangup".to_string()],
    ) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
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

#[test]
fn every_push_gets_the_answer_it_calls_for_and_never_a_5xx() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let settings = Settings::load_from(
        None,
        [
            (
                "UINCALL__KAFKA__BROKERS",
                cluster.bootstrap_servers().as_str(),
            ),
            ("UINCALL__KAFKA__PROPERTIES__LINGER_MS", "0"),
            ("UINCALL__INGEST__MAX_BODY_BYTES", &LIMIT.to_string()),
            (
                format!("UINCALL__INGEST__SECRETS__{TENANT}").as_str(),
                SECRET,
            ),
            ("UINCALL__INGEST__SECRETS__t-2", "another-secret-0123456789"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    cluster
        .create_topic(&settings.kafka.input_topic, 1, 1)
        .unwrap();
    let receiver: Arc<Receiver> = Receiver::new(&settings).unwrap();
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
