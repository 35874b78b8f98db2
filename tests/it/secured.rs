//! Secured clusters, one test per way of authenticating: SASL_SSL with
//! SCRAM-SHA-512, SASL_SSL with OAUTHBEARER tokens from an OpenID Connect
//! provider (librdkafka's own OIDC client against a token endpoint and JWKS
//! served by the test), and mutual TLS. Each starts the real binary with
//! the variables the chart renders for that mode (the same fixture in
//! `tests/fixtures/kafka-auth/` is checked against the chart's rendering by
//! the deploy tests), values from the test's "Secret": the worker enriches
//! and dead-letters over the secured listener and reports ready, the push
//! receiver forwards and reports ready, `backfill` submits and reads the
//! output topic, `replay` re-submits, all over it; and wrong credentials
//! stop start-up of each at once with a message naming the cause and no
//! secret.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::backfill::{backfill, spawn_backfill};
use crate::helpers::*;
use crate::ingest::{event, post, spawn_receiver_with};
use crate::testkit::oidc::TestOidc;
use crate::testkit::{KafkaCluster, SCRAM_PASSWORD, SCRAM_USER, TestPki};

/// One secured broker for the three tests (SASL_SSL and MTLS listeners).
struct SecuredCluster {
    cluster: KafkaCluster,
    pki: TestPki,
    oidc: TestOidc,
}

fn secured() -> &'static SecuredCluster {
    static SECURED: OnceLock<SecuredCluster> = OnceLock::new();
    SECURED.get_or_init(|| {
        // Kept for the process: the broker reads its key store from here.
        let dir = tempfile::tempdir().unwrap().keep();
        let pki = TestPki::create(&dir.join("pki")).expect("test certificates");
        let oidc = TestOidc::start().expect("the identity provider starts");
        let cluster = KafkaCluster::start_secured(1, &pki, &oidc).expect("a secured broker starts");
        SecuredCluster { cluster, pki, oidc }
    })
}

/// What the pod's Secret holds for a mode: values by key, files by key.
#[derive(Clone)]
struct Secret {
    values: HashMap<&'static str, String>,
    files: HashMap<&'static str, PathBuf>,
}

impl Secret {
    fn with_value(mut self, key: &'static str, value: &str) -> Secret {
        self.values.insert(key, value.to_string());
        self
    }

    fn with_file(mut self, key: &'static str, path: &std::path::Path) -> Secret {
        self.files.insert(key, path.to_path_buf());
        self
    }
}

/// The environment a pod gets for `mode` (`tests/fixtures/kafka-auth/`):
/// its non-secret properties (the ConfigMap's, here as variables), and the
/// Secret's values and mounted files; `bootstrap` the secured listener.
fn auth_env(mode: &str, bootstrap: &str, secret: &Secret) -> Vec<(String, String)> {
    let path = format!(
        "{}/tests/fixtures/kafka-auth/{mode}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut env = vec![("UINCALL__KAFKA__BROKERS".to_string(), bootstrap.to_string())];
    for (property, value) in fixture["properties"].as_object().unwrap() {
        let value = match property.as_str() {
            // The test's identity provider instead of the example's.
            "sasl.oauthbearer.token.endpoint.url" => secured().oidc.token_url.clone(),
            _ => value.as_str().unwrap().to_string(),
        };
        let name = format!(
            "UINCALL__KAFKA__PROPERTIES__{}",
            property.to_ascii_uppercase().replace('.', "_")
        );
        env.push((name, value));
    }
    for var in fixture["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = match (var["secret"].as_str(), var["file"].as_str()) {
            (Some(key), None) => secret.values[key].clone(),
            (None, Some(key)) => secret.files[key].to_string_lossy().to_string(),
            _ => panic!("{path}: {var}"),
        };
        env.push((name, value));
    }
    env
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// With `good`, over the secured listener: the worker enriches two events
/// and dead-letters a broken one and both its health checks say 200; the
/// push receiver reports ready and forwards a push, and `backfill` (its
/// producer and its reader of the output topic) submits a call from the
/// call list, both enriched by the worker; `replay` re-submits the dead
/// letter. With `bad`, the worker, `replay`, the receiver and `backfill`
/// each stop at start-up with a last line naming `cause` and no `secret`.
async fn check_mode(
    mode: &str,
    bootstrap: &str,
    good: &Secret,
    bad: &Secret,
    cause: &str,
    secret: &str,
) {
    let env = TestEnv::on_bootstrap(mode, 1, Duration::ZERO, secured().cluster.bootstrap()).await;
    let dir = tempfile::tempdir().unwrap();

    let good = auth_env(mode, bootstrap, good);
    let worker = env.spawn_replica("worker", dir.path(), &pairs(&good));
    env.seed(&[format!("{mode}-1"), format!("{mode}-2")]).await;
    env.seed_raw(&[(Some("broken"), b"not json", &[])]).await;
    assert_eq!(env.read_output(2).await.len(), 2);
    assert_eq!(env.read_dlq(1).await.len(), 1);
    until_status(&format!("{}/readyz", worker.side), 200).await;
    until_status(&format!("{}/healthz", worker.side), 200).await;

    // The push receiver.
    let push_secret = "push-secret-0123456789";
    let receiver = spawn_receiver_with(
        &env,
        &dir.path().join("ingest.log"),
        push_secret,
        &pairs(&good),
    );
    until_status(&format!("{}/readyz", receiver.side), 200).await;
    let url = format!("{}/{}/{push_secret}/call-event", receiver.push, env.tenant);
    let pushed = format!("{mode}-pushed");
    let body = event(&env, &pushed, "call_hangup");
    let (status, _) = post(&reqwest::Client::new(), &url, None, body).await;
    assert_eq!(status, 200);
    drop(receiver);

    // The backfill, reading the output topic for what is enriched.
    let listed = format!("{mode}-listed");
    let at = chrono::NaiveDate::from_ymd_opt(2026, 8, 1)
        .unwrap()
        .and_hms_opt(10, 0, 0)
        .unwrap();
    env.api.set_calls(&env.tenant, vec![(listed.clone(), at)]);
    let range = [
        "--from",
        "2026-08-01",
        "--to",
        "2026-08-02",
        "--skip-enriched",
    ];
    let ran = backfill(&env, dir.path(), &range, &pairs(&good)).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.log);
    let enriched: BTreeSet<String> = env.read_output(4).await.iter().map(key).collect();
    assert!(
        enriched.contains(&pushed) && enriched.contains(&listed),
        "{enriched:?}"
    );
    worker.stop().await;

    let (code, summary) = env.replay_with_env(&[], &pairs(&good)).await;
    assert_eq!(
        (code, summary_count(&summary, "replayed")),
        (0, 1),
        "{summary}"
    );

    let bad = auth_env(mode, bootstrap, bad);
    for what in ["worker", "replay", "ingest", "backfill"] {
        let log = dir.path().join(format!("refused-{what}.log"));
        let (mut own, mut receiver);
        let child = match what {
            "worker" => {
                own = env.spawn_binary(&log, &pairs(&bad));
                &mut own
            }
            "replay" => {
                own = env.spawn_replay_with_env(&[], &log, &pairs(&bad));
                &mut own
            }
            "ingest" => {
                receiver = spawn_receiver_with(&env, &log, push_secret, &pairs(&bad));
                &mut receiver.child
            }
            _ => {
                own = spawn_backfill(&env, &log, dir.path(), &range, &pairs(&bad), Stdio::null());
                &mut own
            }
        };
        let status = wait_exit(child, WAIT).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(1), "{what}: {text}");
        let last = text.lines().last().unwrap_or_default();
        assert!(
            last.contains("refused the connection") && last.contains(cause),
            "{what}'s last line should name the cause `{cause}`:\n{text}"
        );
        assert!(!text.contains(secret), "{what}: {text}");
        println!("{mode}, {what} with wrong credentials: {last}");
    }
}

#[tokio::test]
async fn scram_over_sasl_ssl() {
    let s = secured();
    let good = Secret {
        values: HashMap::from([
            ("username", SCRAM_USER.to_string()),
            ("password", SCRAM_PASSWORD.to_string()),
        ]),
        files: HashMap::from([("ca.crt", s.pki.ca.clone())]),
    };
    let wrong = "not-the-password-4711";
    let bad = good.clone().with_value("password", wrong);
    let bootstrap = s.cluster.secured_bootstrap();
    check_mode(
        "scram",
        &bootstrap,
        &good,
        &bad,
        "SASL authentication error",
        wrong,
    )
    .await;
}

#[tokio::test]
async fn oauthbearer_tokens_from_an_oidc_provider() {
    let s = secured();
    let good = Secret {
        values: HashMap::from([
            ("client-id", s.oidc.client_id.clone()),
            ("client-secret", s.oidc.client_secret.clone()),
        ]),
        files: HashMap::from([("ca.crt", s.pki.ca.clone())]),
    };
    let wrong = "not-the-client-secret-4711";
    let bad = good.clone().with_value("client-secret", wrong);
    let bootstrap = s.cluster.secured_bootstrap();
    let (issued, refused) = (s.oidc.issued(), s.oidc.refused());
    check_mode("oauthbearer", &bootstrap, &good, &bad, "OAUTHBEARER", wrong).await;
    // The tokens came from the provider, and the wrong secret was refused
    // there.
    assert!(s.oidc.issued() > issued);
    assert!(s.oidc.refused() > refused);
}

#[tokio::test]
async fn mutual_tls() {
    let s = secured();
    let good = Secret {
        values: HashMap::new(),
        files: HashMap::from([
            ("ca.crt", s.pki.ca.clone()),
            ("tls.crt", s.pki.client_cert.clone()),
            ("tls.key", s.pki.client_key.clone()),
        ]),
    };
    // A certificate of a CA the broker does not trust.
    let bad = good
        .clone()
        .with_file("tls.crt", &s.pki.stranger_cert)
        .with_file("tls.key", &s.pki.stranger_key);
    let key = std::fs::read_to_string(&s.pki.stranger_key).unwrap();
    let key_body = key.lines().nth(1).unwrap().to_string();
    let bootstrap = s.cluster.mtls_bootstrap();
    check_mode(
        "mtls",
        &bootstrap,
        &good,
        &bad,
        "bad certificate",
        &key_body,
    )
    .await;
}
