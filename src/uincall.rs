//! The Uincall OpenAPI client: one call-detail request, its answer captured
//! as [`ApiAnswer`] for [`crate::classify`]. The access token rides in the
//! query string, so no error produced here may print the URL.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use reqwest::header::RETRY_AFTER;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::classify::{ApiAnswer, TransportKind};
use crate::settings::{ApiSettings, Http2, TenantSettings};

/// Access tokens by tenant, shared by all in-flight calls.
#[derive(Clone, Default)]
pub struct TokenStore {
    tokens: Arc<RwLock<HashMap<String, SecretString>>>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenants: Vec<String> = self.tokens.read().unwrap().keys().cloned().collect();
        f.debug_struct("TokenStore")
            .field("tenants", &tenants)
            .finish()
    }
}

impl TokenStore {
    /// Tokens from the settings, then from `tokens_dir` (one file per tenant).
    pub fn from_settings(api: &ApiSettings) -> anyhow::Result<Self> {
        let mut tokens: HashMap<String, SecretString> = api
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(dir) = &api.tokens_dir {
            tokens.extend(read_tokens_dir(dir)?);
        }
        Ok(TokenStore {
            tokens: Arc::new(RwLock::new(tokens)),
        })
    }

    pub fn get(&self, tenant: &str) -> Option<SecretString> {
        self.tokens.read().unwrap().get(tenant).cloned()
    }

    pub fn insert(&self, tenant: &str, token: SecretString) {
        self.tokens
            .write()
            .unwrap()
            .insert(tenant.to_string(), token);
    }

    pub fn tenants(&self) -> usize {
        self.tokens.read().unwrap().len()
    }

    /// The tenants with a token, in order.
    pub fn tenant_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.tokens.read().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Reads `dir` again: new and changed tokens replace the old ones (a
    /// call under way keeps the token it started with). Tokens whose file
    /// is gone are kept: a Secret being rewritten may lack files for a
    /// moment. Returns how many tenants got a new token.
    pub fn reload_dir(&self, dir: &Path) -> anyhow::Result<usize> {
        let fresh = read_tokens_dir(dir)?;
        let mut tokens = self.tokens.write().unwrap();
        let mut changed = 0;
        for (tenant, token) in fresh {
            let same = tokens
                .get(&tenant)
                .is_some_and(|old| old.expose_secret() == token.expose_secret());
            if !same {
                tokens.insert(tenant, token);
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// Reads a mounted Secret: file name = tenant_id, content = token. Hidden
/// files (Kubernetes' `..data` links) are skipped.
fn read_tokens_dir(dir: &Path) -> anyhow::Result<Vec<(String, SecretString)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading api.tokens_dir {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let token = std::fs::read_to_string(entry.path())
            .with_context(|| format!("reading token file for tenant {name}"))?;
        let token = token.trim();
        if !token.is_empty() {
            out.push((name, SecretString::from(token.to_string())));
        }
    }
    crate::telemetry::redact_in_logs(out.iter().map(|(_, t)| t.expose_secret().to_string()));
    Ok(out)
}

/// Calls of the window per HTTP client where HTTP/2 may be spoken (a
/// common server limit of streams per connection is 100–128).
const STREAMS_PER_CONNECTION: usize = 100;

/// One HTTP client with `pool` idle connections at most.
fn http_client(api: &ApiSettings, pool: usize) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .timeout(api.request_timeout)
        .connect_timeout(api.connect_timeout)
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .user_agent(concat!("uincall-enricher/", env!("CARGO_PKG_VERSION")));
    // `auto`: HTTP/2 when the API offers it in the TLS handshake (ALPN).
    let builder = match api.http2 {
        Http2::Auto => builder,
        Http2::PriorKnowledge => builder.http2_prior_knowledge(),
        Http2::Never => builder.http1_only(),
    };
    builder.build().context("building the HTTP client")
}

/// Calls `GET {base}/openapi/call/v2/detail/{session_id}`.
#[derive(Debug, Clone)]
pub struct UincallClient {
    /// Clients taken in turn: over HTTP/2 each holds one connection, so
    /// the calls in flight spread over several (see [`STREAMS_PER_CONNECTION`]).
    http: Arc<[reqwest::Client]>,
    next: Arc<AtomicUsize>,
    base: Url,
    /// Tenants with an API of their own.
    bases: BTreeMap<String, Url>,
}

/// A `Retry-After` value: delay seconds, or an HTTP date (the wait until
/// then; none when it is past).
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    at.duration_since(now).ok()
}

/// One answer and how long it took.
#[derive(Debug, Clone)]
pub struct Timed {
    pub answer: ApiAnswer,
    pub latency: Duration,
}

impl UincallClient {
    /// `default_pool` is the keep-alive pool size when
    /// `api.pool_max_idle_per_host` is unset (the in-flight window).
    /// Where HTTP/2 may be spoken, one client per this many calls of the
    /// window: each client's single connection is one task that reads and
    /// writes every frame of its streams, and with thousands of streams on
    /// it that task waits its turn behind the records it serves (at window
    /// 1 024 on one connection a 50 ms API answered in 200–500 ms). The
    /// pool's idle connections are shared out among the clients.
    pub fn new(api: &ApiSettings, default_pool: usize) -> anyhow::Result<Self> {
        let clients = match api.http2 {
            Http2::Never => 1,
            Http2::Auto | Http2::PriorKnowledge => {
                default_pool.div_ceil(STREAMS_PER_CONNECTION).max(1)
            }
        };
        let pool = api.pool_max_idle_per_host.unwrap_or(default_pool);
        let http = (0..clients)
            .map(|_| http_client(api, pool.div_ceil(clients)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(UincallClient {
            http: http.into(),
            next: Arc::default(),
            base: api.base_url.clone(),
            bases: BTreeMap::new(),
        })
    }

    /// The next client in turn.
    fn http(&self) -> &reqwest::Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.http[i % self.http.len()]
    }

    /// Tenants with an API of their own (`tenants.<id>.base_url`).
    pub fn with_tenant_bases(mut self, tenants: &BTreeMap<String, TenantSettings>) -> Self {
        self.bases = tenants
            .iter()
            .filter_map(|(t, s)| Some((t.clone(), s.base_url.clone()?)))
            .collect();
        self
    }

    /// The request URL. Holds the token: never log or return it.
    fn detail_url(
        &self,
        session_id: &str,
        tenant_id: &str,
        token: &SecretString,
        call_type: Option<i64>,
    ) -> Url {
        let mut url = self.bases.get(tenant_id).unwrap_or(&self.base).clone();
        {
            let mut segments = url
                .path_segments_mut()
                .expect("api.base_url is validated as http(s)");
            segments.pop_if_empty();
            segments.extend(["openapi", "call", "v2", "detail", session_id]);
        }
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("tenant_id", tenant_id);
            q.append_pair("access_token", token.expose_secret());
            q.append_pair("ver", "1");
            if let Some(ct) = call_type {
                q.append_pair("call_type", &ct.to_string());
            }
        }
        url
    }

    /// The call list's URL (`POST {base}/openapi/call/v2`). Holds the
    /// token: never log or return it.
    fn list_url(&self, tenant_id: &str, token: &SecretString) -> Url {
        let mut url = self.bases.get(tenant_id).unwrap_or(&self.base).clone();
        {
            let mut segments = url
                .path_segments_mut()
                .expect("api.base_url is validated as http(s)");
            segments.pop_if_empty();
            segments.extend(["openapi", "call", "v2"]);
        }
        url.query_pairs_mut()
            .append_pair("tenant_id", tenant_id)
            .append_pair("access_token", token.expose_secret());
        url
    }

    /// Asks the call list (查询通话记录V2.0) for one page: `query` is the
    /// JSON body (`kind`, `page`, `size`, times). Never fails: every outcome
    /// is an answer.
    pub async fn list_page(
        &self,
        tenant_id: &str,
        token: &SecretString,
        query: &serde_json::Value,
    ) -> Timed {
        let url = self.list_url(tenant_id, token);
        let started = Instant::now();
        let answer = answer_of(self.http().post(url).json(query).send().await).await;
        Timed {
            answer,
            latency: started.elapsed(),
        }
    }

    /// The request URL as traces show it: the access token replaced by
    /// `REDACTED`.
    pub fn url_for_traces(&self, session_id: &str, tenant_id: &str, call_type: Option<i64>) -> Url {
        let redacted = SecretString::from("REDACTED");
        self.detail_url(session_id, tenant_id, &redacted, call_type)
    }

    /// Fetches the call detail. Never fails: every outcome is an answer.
    /// The current span's trace context goes with the request.
    pub async fn fetch_detail(
        &self,
        session_id: &str,
        tenant_id: &str,
        token: &SecretString,
        call_type: Option<i64>,
    ) -> Timed {
        let url = self.detail_url(session_id, tenant_id, token, call_type);
        let started = Instant::now();
        let mut request = self.http().get(url);
        for (name, value) in crate::otel::headers_of(&tracing::Span::current()) {
            request = request.header(name, value);
        }
        let answer = answer_of(request.send().await).await;
        Timed {
            answer,
            latency: started.elapsed(),
        }
    }
}

/// The answer of a request: status, `Retry-After` and body, or the
/// transport error without its URL.
async fn answer_of(sent: reqwest::Result<reqwest::Response>) -> ApiAnswer {
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, SystemTime::now()));
            match resp.bytes().await {
                Ok(body) => ApiAnswer::Http {
                    status,
                    retry_after,
                    body,
                },
                Err(e) => transport(e),
            }
        }
        Err(e) => transport(e),
    }
}

/// A transport error without its URL, with the cause chain.
fn transport(err: reqwest::Error) -> ApiAnswer {
    let kind = if err.is_timeout() {
        TransportKind::Timeout
    } else if err.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Other
    };
    let err = err.without_url();
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    ApiAnswer::Transport { kind, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn client(base: &str) -> UincallClient {
        let mut s = Settings::load_from(None, Vec::new()).unwrap();
        s.api.base_url = Url::parse(base).unwrap();
        UincallClient::new(&s.api, 8).unwrap()
    }

    #[test]
    fn calls_spread_over_a_client_per_hundred_of_the_window_where_http2_may_be_spoken() {
        let mut s = Settings::load_from(None, Vec::new()).unwrap();
        let mut clients = |http2, window| {
            s.api.http2 = http2;
            UincallClient::new(&s.api, window).unwrap().http.len()
        };
        assert_eq!(clients(Http2::Never, 1024), 1);
        assert_eq!(clients(Http2::Auto, 1024), 11);
        assert_eq!(clients(Http2::PriorKnowledge, 100), 1);
        assert_eq!(clients(Http2::PriorKnowledge, 101), 2);
        let t = UincallClient::new(&s.api, 300).unwrap();
        let taken: Vec<*const reqwest::Client> = (0..4).map(|_| t.http() as *const _).collect();
        assert_eq!(taken[0], taken[3], "in turn");
        assert!(taken[0] != taken[1] && taken[1] != taken[2] && taken[0] != taken[2]);
    }

    #[test]
    fn url_carries_ver_tenant_token_and_escapes_the_session_id() {
        let token = SecretString::from("tok");
        let url = client("https://api.example/prefix/").detail_url("a/b c", "t-1", &token, Some(5));
        assert_eq!(
            url.as_str(),
            "https://api.example/prefix/openapi/call/v2/detail/a%2Fb%20c?tenant_id=t-1&access_token=tok&ver=1&call_type=5"
        );
    }

    #[tokio::test]
    async fn connection_errors_never_show_the_token() {
        // Port 9 on loopback: nothing listens there.
        let token = SecretString::from("leakme0123456789");
        let t = client("http://127.0.0.1:9")
            .fetch_detail("s", "t", &token, None)
            .await;
        match t.answer {
            ApiAnswer::Transport { kind, message } => {
                assert_eq!(kind, TransportKind::Connect);
                assert!(!message.contains("leakme"), "{message}");
                assert!(!message.contains("access_token"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tokens_dir_is_read_skipping_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tenant-a"), "tok-a\n").unwrap();
        std::fs::write(dir.path().join("..data"), "x").unwrap();
        let mut s = Settings::load_from(None, Vec::new()).unwrap();
        s.api.tokens_dir = Some(dir.path().to_path_buf());
        let store = TokenStore::from_settings(&s.api).unwrap();
        assert_eq!(store.get("tenant-a").unwrap().expose_secret(), "tok-a");
        assert_eq!(store.tenants(), 1);

        // A rotated Secret: Kubernetes swaps the `..data` link; here the
        // file is rewritten and a tenant is added.
        std::fs::write(dir.path().join("tenant-a"), "tok-a2").unwrap();
        std::fs::write(dir.path().join("tenant-b"), "tok-b").unwrap();
        let old = store.get("tenant-a").unwrap();
        assert_eq!(store.reload_dir(dir.path()).unwrap(), 2);
        assert_eq!(store.get("tenant-a").unwrap().expose_secret(), "tok-a2");
        assert_eq!(old.expose_secret(), "tok-a", "a copy in use is unchanged");
        assert_eq!(store.reload_dir(dir.path()).unwrap(), 0, "nothing new");
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Wed, 25 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 25 Nov 2026 09:59:00 GMT", now),
            None,
            "past"
        );
        assert_eq!(retry_after("soon", now), None);
    }
}
