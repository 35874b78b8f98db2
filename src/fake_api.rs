//! A local fake of the Uincall OpenAPI call-detail endpoint, for the demo,
//! the tests and the benchmarks. It speaks the documented API: HTTP 200 with
//! `errcode`/`errmsg`/`data`, records shaped like the spec's example, and
//! faults chosen by the session id's prefix:
//!
//! | session id starts with | answer |
//! |---|---|
//! | `transient{N}-` | errcode 10001 "record not ready" for the first N calls, then the record |
//! | `permanent-` | errcode 40004 "session not found", always |
//! | `http500-` | HTTP 500 on the first call, then the record |
//! | `garbage-` | a body that is not JSON on the first call, then the record |
//! | `echo500-` | HTTP 500 whose body echoes the request URL (token included), always |
//! | `nodata-` | errcode 0 without data, always |
//! | `ratelimited{N}-` | HTTP 429 "too many requests" for the first N calls, then the record |
//! | `slow{MS}-` | the record, MS milliseconds later than the configured latency |
//! | `bulky{KIB}-` | the record with an extra field `padding` of KIB kibibytes |
//! | anything else | the record |
//!
//! A wrong tenant or token gets errcode 40001 "invalid access_token".
//!
//! The call list (查询通话记录V2.0, `POST /openapi/call/v2`) serves the
//! calls given to [`FakeApi::set_calls`]: those of the tenant whose
//! `start_time` is in `[start_time, end_time)` (a range longer than 60 days
//! is cut to 60 days from its start, silently, as the real API does), by
//! start time, `size` (at most 50) per 1-based `page`, as
//! `{"errcode":0,"data":{"total":…,"list":[…]}}`; [`FakeApi::set_list_fault`]
//! makes it answer an errcode, an unreadable shape or HTTP 503 instead.
//!
//! Faults can be switched on while it runs: a total outage (HTTP 503 for
//! every call, [`FakeApi::set_outage`]) and token rotation
//! ([`FakeApi::set_token`]). It counts calls per second of its own clock
//! ([`FakeApi::calls_per_second`]) for rate-limit checks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::NaiveDateTime;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The errcode the fake answers for a wrong tenant or token.
pub const ERRCODE_BAD_TOKEN: i64 = 40001;
/// The errcode of `transient{N}-` sessions while "not ready".
pub const ERRCODE_NOT_READY: i64 = 10001;
/// The errcode of `permanent-` sessions.
pub const ERRCODE_NOT_FOUND: i64 = 40004;

/// What the fake serves.
#[derive(Debug, Clone)]
pub struct FakeApiConfig {
    /// Added to every answer.
    pub latency: Duration,
    /// Valid tokens by tenant.
    pub tokens: HashMap<String, String>,
}

impl Default for FakeApiConfig {
    fn default() -> Self {
        FakeApiConfig {
            latency: Duration::ZERO,
            tokens: HashMap::new(),
        }
    }
}

struct Shared {
    calls: Mutex<HashMap<String, u32>>,
    total: AtomicU64,
    /// Valid tokens by tenant (replaceable while running).
    tokens: RwLock<HashMap<String, String>>,
    outage: AtomicBool,
    started: Instant,
    /// Calls received in each second since `started`.
    per_second: Mutex<Vec<u64>>,
    /// Calls being answered now, and the most there ever were at once.
    concurrent: AtomicU64,
    max_concurrent: AtomicU64,
    /// The call list: per tenant, (start time, session id) by start time.
    list: RwLock<HashMap<String, Vec<(NaiveDateTime, String)>>>,
    list_fault: RwLock<Option<ListFault>>,
    /// Every page asked: (tenant, start_time, end_time, page).
    list_requests: Mutex<Vec<ListRequest>>,
    /// While true, call-detail answers wait (a test decides when the calls
    /// under way end).
    held: tokio::sync::watch::Sender<bool>,
}

/// What the call list answers instead of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListFault {
    /// This errcode, from the next page on.
    Errcode(i64),
    /// errcode 0 with a `data` that holds no list of sessions.
    Unreadable,
    /// HTTP 503.
    Outage,
    /// The answer is this many milliseconds late.
    Slow(u64),
    /// Pages are answered for the first N requests; later ones are not
    /// answered for ten minutes.
    HangAfter(usize),
}

/// One page asked of the call list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    pub tenant: String,
    pub start_time: String,
    pub end_time: String,
    pub page: u32,
}

/// Counts a call as concurrent while it is being answered.
struct Answering<'a>(&'a Shared);

impl<'a> Answering<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_concurrent.fetch_max(now, Ordering::SeqCst);
        Answering(shared)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.concurrent.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running fake; stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeApi {
    /// Serves on an ephemeral loopback port.
    pub async fn start(config: FakeApiConfig) -> std::io::Result<FakeApi> {
        Self::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: FakeApiConfig) -> std::io::Result<FakeApi> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            calls: Mutex::default(),
            total: AtomicU64::new(0),
            tokens: RwLock::new(config.tokens.clone()),
            outage: AtomicBool::new(false),
            started: Instant::now(),
            per_second: Mutex::default(),
            concurrent: AtomicU64::new(0),
            max_concurrent: AtomicU64::new(0),
            list: RwLock::default(),
            list_fault: RwLock::default(),
            list_requests: Mutex::default(),
            held: tokio::sync::watch::Sender::new(false),
        });
        let app = Router::new()
            .route("/openapi/call/v2/detail/{session_id}", get(detail))
            .route("/openapi/call/v2", post(call_list))
            .with_state((Arc::new(config), shared.clone()));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(FakeApi { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `api.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls received for one session id.
    pub fn calls(&self, session_id: &str) -> u32 {
        self.shared
            .calls
            .lock()
            .unwrap()
            .get(session_id)
            .copied()
            .unwrap_or(0)
    }

    /// Calls received in all.
    pub fn total_calls(&self) -> u64 {
        self.shared.total.load(Ordering::Relaxed)
    }

    /// While on, call-detail answers wait (received and counted, not
    /// answered) until it is off again.
    pub fn set_held(&self, held: bool) {
        self.shared.held.send_replace(held);
    }

    /// While on, every call gets HTTP 503 (the API is down for everyone).
    pub fn set_outage(&self, down: bool) {
        self.shared.outage.store(down, Ordering::Relaxed);
    }

    /// Replaces a tenant's valid token (the old one is refused from now on).
    pub fn set_token(&self, tenant: &str, token: &str) {
        self.shared
            .tokens
            .write()
            .unwrap()
            .insert(tenant.to_string(), token.to_string());
    }

    /// The most calls that were being answered at the same time.
    pub fn max_concurrent_calls(&self) -> u64 {
        self.shared.max_concurrent.load(Ordering::SeqCst)
    }

    /// The calls the call list holds for `tenant`: session ids and their
    /// start times (wall clock, as the API writes them).
    pub fn set_calls(&self, tenant: &str, calls: Vec<(String, NaiveDateTime)>) {
        let mut calls: Vec<(NaiveDateTime, String)> =
            calls.into_iter().map(|(s, t)| (t, s)).collect();
        calls.sort();
        (self.shared.list.write().unwrap()).insert(tenant.to_string(), calls);
    }

    /// From now on the call list answers `fault` instead of pages (`None`:
    /// pages again).
    pub fn set_list_fault(&self, fault: Option<ListFault>) {
        *self.shared.list_fault.write().unwrap() = fault;
    }

    /// Every page asked of the call list, in order.
    pub fn list_requests(&self) -> Vec<ListRequest> {
        self.shared.list_requests.lock().unwrap().clone()
    }

    /// Calls received in each whole second since the fake started.
    pub fn calls_per_second(&self) -> Vec<u64> {
        self.shared.per_second.lock().unwrap().clone()
    }
}

#[derive(Debug, Deserialize)]
struct DetailQuery {
    tenant_id: Option<String>,
    access_token: Option<String>,
    ver: Option<String>,
    call_type: Option<String>,
}

fn errcode(code: i64, msg: &str) -> Response {
    axum::Json(json!({"errcode": code, "errmsg": msg, "data": null})).into_response()
}

async fn detail(
    State((config, shared)): State<(Arc<FakeApiConfig>, Arc<Shared>)>,
    Path(session_id): Path<String>,
    Query(q): Query<DetailQuery>,
    OriginalUri(uri): OriginalUri,
) -> Response {
    shared.total.fetch_add(1, Ordering::Relaxed);
    let _answering = Answering::enter(&shared);
    shared.count_in_this_second();
    let attempt = shared.count_attempt(&session_id);
    let slow = Duration::from_millis(prefix_number(&session_id, "slow").unwrap_or(0));
    if !(config.latency + slow).is_zero() {
        tokio::time::sleep(config.latency + slow).await;
    }
    let _ = shared.held.subscribe().wait_for(|held| !held).await;
    if shared.outage.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "service unavailable").into_response();
    }
    let tenant = q.tenant_id.as_deref().unwrap_or_default();
    let token_ok = shared.token_ok(tenant, q.access_token.as_deref());
    if let Some(fault) = fault(&session_id, attempt, token_ok, &uri) {
        return fault;
    }
    let with_ver = q.ver.as_deref() == Some("1");
    let mut data = sample_record(&session_id, with_ver, q.call_type.as_deref());
    if let Some(kib) = prefix_number(&session_id, "bulky") {
        data["padding"] = Value::String("x".repeat(kib as usize * 1024));
    }
    axum::Json(json!({
        "errcode": 0,
        "errmsg": "success",
        "data": data,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    tenant_id: Option<String>,
    access_token: Option<String>,
}

/// The API's time format, wall clock in the tenant's zone.
const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

async fn call_list(
    State((config, shared)): State<(Arc<FakeApiConfig>, Arc<Shared>)>,
    Query(q): Query<ListQuery>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    shared.total.fetch_add(1, Ordering::Relaxed);
    let tenant = q.tenant_id.unwrap_or_default();
    let text = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let number = |k: &str, default: u64| body.get(k).and_then(Value::as_u64).unwrap_or(default);
    let page = number("page", 1).max(1) as u32;
    let size = number("size", 10).clamp(1, 50) as usize;
    // Recorded on arrival: a test sees the request while it is answered.
    let nth = {
        let mut requests = shared.list_requests.lock().unwrap();
        requests.push(ListRequest {
            tenant: tenant.clone(),
            start_time: text("start_time"),
            end_time: text("end_time"),
            page,
        });
        requests.len()
    };
    let fault = shared.list_fault.read().unwrap().clone();
    let slow = match fault {
        Some(ListFault::Slow(ms)) => Duration::from_millis(ms),
        Some(ListFault::HangAfter(n)) if nth > n => Duration::from_secs(600),
        _ => Duration::ZERO,
    };
    if !(config.latency + slow).is_zero() {
        tokio::time::sleep(config.latency + slow).await;
    }
    if let Some(answer) = fault.and_then(list_fault_answer) {
        return answer;
    }
    if !shared.token_ok(&tenant, q.access_token.as_deref()) {
        return errcode(ERRCODE_BAD_TOKEN, "invalid access_token");
    }
    list_page(&shared, &tenant, &body, page, size)
}

/// The answer a list fault gives instead of a page, if it gives one.
fn list_fault_answer(fault: ListFault) -> Option<Response> {
    match fault {
        ListFault::Outage => {
            Some((StatusCode::SERVICE_UNAVAILABLE, "service unavailable").into_response())
        }
        ListFault::Errcode(code) => Some(errcode(code, "refused")),
        ListFault::Unreadable => Some(
            axum::Json(json!({"errcode": 0, "data": {"total": 1, "calls": "one"}})).into_response(),
        ),
        ListFault::Slow(_) | ListFault::HangAfter(_) => None,
    }
}

/// One page of `tenant`'s call list, for the range the request's body asks.
fn list_page(shared: &Shared, tenant: &str, body: &Value, page: u32, size: usize) -> Response {
    let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
    let parse = |k: &str| NaiveDateTime::parse_from_str(text(k), TIME_FORMAT).ok();
    // The time range applies only with all=true; without times, the last
    // week. A range over 60 days is cut to 60 days from its start.
    let now = chrono::Local::now().naive_local();
    let (start, end) = match (
        body.get("all") == Some(&json!(true)),
        parse("start_time"),
        parse("end_time"),
    ) {
        (true, Some(s), Some(e)) => (s, e.min(s + chrono::Duration::days(60))),
        _ => (now - chrono::Duration::days(7), now),
    };
    let list = shared.list.read().unwrap();
    let calls: Vec<&(NaiveDateTime, String)> = (list.get(tenant).into_iter().flatten())
        .filter(|(t, _)| *t >= start && *t < end)
        .collect();
    let rows: Vec<Value> = (calls.iter().skip((page as usize - 1) * size).take(size))
        .map(|(t, s)| {
            json!({
                "session_id": s,
                "start_time": t.format(TIME_FORMAT).to_string(),
                "call_direction": "call in",
            })
        })
        .collect();
    axum::Json(json!({
        "errcode": 0,
        "errmsg": "success",
        "data": {"total": calls.len(), "page": page, "size": size, "list": rows},
    }))
    .into_response()
}

impl Shared {
    /// Counts a call in the current second of the fake's clock.
    fn count_in_this_second(&self) {
        let second = self.started.elapsed().as_secs() as usize;
        let mut per_second = self.per_second.lock().unwrap();
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += 1;
    }

    /// Counts a call for `session_id`; the 1-based attempt it is.
    fn count_attempt(&self, session_id: &str) -> u32 {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(session_id.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// Whether `token` is the tenant's valid token now.
    fn token_ok(&self, tenant: &str, token: Option<&str>) -> bool {
        match (self.tokens.read().unwrap().get(tenant), token) {
            (Some(expected), Some(given)) => expected == given,
            _ => false,
        }
    }
}

/// What to answer instead of the record on this attempt (the table in the
/// module docs), if anything: `echo500-` first, as a gateway answers before
/// the token is read, then a wrong token, then the other faults.
fn fault(session_id: &str, attempt: u32, token_ok: bool, uri: &Uri) -> Option<Response> {
    let answer = if session_id.starts_with("echo500-") {
        // Some gateways echo the request line: the token must not leak from it.
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("upstream error for GET {uri}"),
        )
            .into_response()
    } else if !token_ok {
        errcode(ERRCODE_BAD_TOKEN, "invalid access_token")
    } else if fails_first(session_id, "transient", attempt) {
        errcode(ERRCODE_NOT_READY, "record not ready")
    } else if fails_first(session_id, "ratelimited", attempt) {
        (StatusCode::TOO_MANY_REQUESTS, "too many requests").into_response()
    } else if session_id.starts_with("permanent-") {
        errcode(ERRCODE_NOT_FOUND, "session not found")
    } else if session_id.starts_with("http500-") && attempt == 1 {
        (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
    } else if session_id.starts_with("garbage-") && attempt == 1 {
        (StatusCode::OK, "<html>gateway timeout</html>").into_response()
    } else if session_id.starts_with("nodata-") {
        axum::Json(json!({"errcode": 0, "errmsg": "success"})).into_response()
    } else {
        return None;
    };
    Some(answer)
}

/// Whether a session `{prefix}{N}-…` fails this attempt: its first N calls
/// do (N missing: the first call).
fn fails_first(session_id: &str, prefix: &str, attempt: u32) -> bool {
    session_id.strip_prefix(prefix).is_some_and(|rest| {
        let n: u32 = rest
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        attempt <= n
    })
}

/// N of a session id `{prefix}{N}-…`.
fn prefix_number(session_id: &str, prefix: &str) -> Option<u64> {
    session_id
        .strip_prefix(prefix)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// A record shaped like the spec's example, varied by the session id.
pub fn sample_record(session_id: &str, with_ver: bool, call_type: Option<&str>) -> Value {
    let h = session_id
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    let outbound = h % 2 == 0;
    let reasons = [1, -1, 2, 5, 430, 434, 437, 502];
    let mut record = json!({
        "session_id": session_id,
        "call_type": call_type.unwrap_or("4"),
        "tags": if h % 3 == 0 { Value::Null } else {
            json!({"tags": [["992cxxxxf52exxxx2a46xxxxxxxx99e5"], ["895exxxx1595xxxxec31xxxxxxxx309a"]]})
        },
        "remark": "",
        "summary": "备注",
        "call_direction": if outbound { "call out" } else { "call in" },
        "ignore_times": if outbound { Value::Null } else { json!(h % 3) },
        // The API sends this documented string as a number (and vice versa).
        "satisfaction": if h % 2 == 0 { json!(1 + h % 4) } else { json!((1 + h % 4).to_string()) },
        "record_file": format!("https://example.invalid/ykfRecord?url=2023/03/10/{session_id}.wav"),
        "lists": [{
            "id": format!("frag-{session_id}"),
            "customer_id": "",
            "customer_name": if h % 5 == 0 { "未知客户" } else { "多个匹配客户" },
            "app_type": "agent",
            "service_type": "dialout",
            "bussiness_num": "02811111111",
            "alterting_time": "2023-03-10 18:14:18",
            "service_time": 30 + h % 300,
            "service_start_time": "2023-03-10 18:14:18",
            "service_stop_time": "2023-03-10 18:15:48",
            "ani": "02811111111",
            "ani_place": "四川成都",
            "dnis": "13000000000",
            "dnis_place": "北京",
            "call_direction": if outbound { "call out" } else { "call in" },
            "ringing_time": h % 20,
            "agent_num": "1001",
            "agent_name": "张三(1001)"
        }],
        "app_node_list": {"rows": [
            {"recDesc": "响铃", "starttime": "2023-03-10 18:14:18", "command": "座席:张三(1001)[1001]"},
            {"recDesc": "接听", "color": "#0bbd87", "starttime": "2023-03-10 18:14:25", "command": "座席:张三(1001)[1001]"},
            {"recDesc": "挂机", "starttime": "2023-03-10 18:15:48", "command": "挂机"}
        ]},
        "is_repeat": h % 7 == 0,
        "cycle_period": null,
        "call_in_today_num": h % 3,
        "call_in_all_num": h % 11,
        "associate_datas": [{"agent_num": 1001, "agent_name": "张三(1001)", "remark": "电话测试备注", "submit_at": "2023-03-10 11:33:42"}]
    });
    if with_ver {
        record["hangup_reason"] = json!(reasons[(h % reasons.len() as u64) as usize]);
        record["hangup_party"] = json!(["1", "2", "4"][(h % 3) as usize]);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errcode of a JSON answer.
    async fn errcode_of(answer: Response) -> i64 {
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice::<Value>(&body).unwrap()["errcode"]
            .as_i64()
            .unwrap()
    }

    #[tokio::test]
    async fn a_session_prefix_picks_the_fault_and_echo500_comes_before_the_token() {
        let uri: Uri = "/openapi/call/v2/detail/s?access_token=t".parse().unwrap();
        let echo = fault("echo500-a", 1, false, &uri).unwrap();
        assert_eq!(echo.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bad_token = fault("transient2-a", 1, false, &uri).unwrap();
        assert_eq!(errcode_of(bad_token).await, ERRCODE_BAD_TOKEN);
        let not_ready = fault("transient2-a", 2, true, &uri).unwrap();
        assert_eq!(errcode_of(not_ready).await, ERRCODE_NOT_READY);
        assert!(fault("transient2-a", 3, true, &uri).is_none());
        let limited = fault("ratelimited-a", 1, true, &uri).unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(fault("ratelimited-a", 2, true, &uri).is_none());
        let not_found = fault("permanent-a", 9, true, &uri).unwrap();
        assert_eq!(errcode_of(not_found).await, ERRCODE_NOT_FOUND);
        assert!(fault("http500-a", 1, true, &uri).is_some());
        assert!(fault("http500-a", 2, true, &uri).is_none());
        assert!(fault("nodata-a", 5, true, &uri).is_some());
        assert!(fault("slow100-a", 1, true, &uri).is_none());
    }

    #[test]
    fn a_counted_prefix_fails_its_first_n_calls_and_one_without_n() {
        assert!(fails_first("transient3-a", "transient", 3));
        assert!(!fails_first("transient3-a", "transient", 4));
        assert!(fails_first("transient-a", "transient", 1));
        assert!(!fails_first("transient-a", "transient", 2));
        assert!(!fails_first("permanent-a", "transient", 1));
    }
}
