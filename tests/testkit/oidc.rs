//! An OpenID Connect identity provider for the OAUTHBEARER tests: a token
//! endpoint (client credentials grant, the client's id and secret in HTTP
//! basic auth or the form) that issues RS256-signed JWTs, and the JWKS the
//! broker verifies them with. It serves on a loopback port from a thread
//! of its own, so a broker started before any test runtime can reach it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use serde_json::{Value, json};

/// The `iss` of every token, which the broker expects.
pub const ISSUER: &str = "https://idp.uincall-enricher.test";
/// The `aud` of every token, which the broker expects.
pub const AUDIENCE: &str = "kafka";
const KEY_ID: &str = "test-key-1";

pub struct TestOidc {
    /// Where clients ask for a token (`sasl.oauthbearer.token.endpoint.url`).
    pub token_url: String,
    /// Where the broker reads the signing key
    /// (`sasl.oauthbearer.jwks.endpoint.url`).
    pub jwks_url: String,
    pub client_id: String,
    pub client_secret: String,
    state: Arc<Provider>,
}

struct Provider {
    key: PKey<Private>,
    jwks: Value,
    client_id: String,
    client_secret: String,
    issued: AtomicUsize,
    refused: AtomicUsize,
}

impl TestOidc {
    pub fn start() -> anyhow::Result<TestOidc> {
        let rsa = Rsa::generate(2048)?;
        let jwks = json!({"keys": [{
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": KEY_ID,
            "n": URL_SAFE_NO_PAD.encode(rsa.n().to_vec()),
            "e": URL_SAFE_NO_PAD.encode(rsa.e().to_vec()),
        }]});
        let state = Arc::new(Provider {
            key: PKey::from_rsa(rsa)?,
            jwks,
            client_id: "uincall-enricher".into(),
            client_secret: format!("oidc-secret-{}", std::process::id()),
            issued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/oauth2/token", post(serve_token))
            .route("/jwks", get(serve_jwks))
            .with_state(state.clone());
        std::thread::Builder::new()
            .name("test-oidc".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the identity provider");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    axum::serve(listener, app).await.unwrap();
                });
            })?;
        Ok(TestOidc {
            token_url: format!("http://{addr}/oauth2/token"),
            jwks_url: format!("http://{addr}/jwks"),
            client_id: state.client_id.clone(),
            client_secret: state.client_secret.clone(),
            state,
        })
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Token requests refused (wrong client credentials) so far.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

async fn serve_jwks(State(p): State<Arc<Provider>>) -> Response {
    axum::Json(p.jwks.clone()).into_response()
}

/// The client's id and secret: HTTP basic auth, else the form's fields.
fn client_credentials(headers: &HeaderMap, form: &[(String, String)]) -> Option<(String, String)> {
    if let Some(basic) = (headers.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = String::from_utf8(STANDARD.decode(basic.trim()).ok()?).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        return Some((id.to_string(), secret.to_string()));
    }
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Some((field("client_id")?, field("client_secret")?))
}

async fn serve_token(State(p): State<Arc<Provider>>, headers: HeaderMap, body: String) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let grant = form
        .iter()
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.as_str());
    if grant != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    match client_credentials(&headers, &form) {
        Some((id, secret)) if id == p.client_id && secret == p.client_secret => {}
        _ => {
            p.refused.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": "invalid_client"})),
            )
                .into_response();
        }
    }
    let scope = form
        .iter()
        .find(|(k, _)| k == "scope")
        .map_or("", |(_, v)| v);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": ISSUER,
        "sub": p.client_id,
        "aud": AUDIENCE,
        "scope": scope,
        "iat": now,
        "exp": now + 3600,
    });
    let jwt = match sign(&p.key, &claims) {
        Ok(jwt) => jwt,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    p.issued.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({
        "access_token": jwt,
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": scope,
    }))
    .into_response()
}

/// A compact JWS (RS256) of `claims`.
fn sign(key: &PKey<Private>, claims: &Value) -> anyhow::Result<String> {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": KEY_ID});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signer = Signer::new(MessageDigest::sha256(), key)?;
    signer.update(input.as_bytes())?;
    let signature = signer.sign_to_vec()?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}
