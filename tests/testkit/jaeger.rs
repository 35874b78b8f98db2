//! Jaeger v2 as the OpenTelemetry trace receiver of a test: its own process
//! with in-memory storage, OTLP over HTTP and gRPC on loopback ports of its
//! own, and the query API the spans are read back from (`/api/v3/traces`).
//!
//! `JAEGER_BIN` names the binary; else `scripts/install-jaeger.sh` builds it
//! on first use.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The Jaeger binary: `JAEGER_BIN`, else what `scripts/install-jaeger.sh`
/// prints (it builds the binary on first use).
pub fn jaeger_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    super::installed(&BIN, "JAEGER_BIN", "scripts/install-jaeger.sh")
}

/// A running Jaeger; killed when dropped.
pub struct Jaeger {
    child: Child,
    otlp_http: u16,
    otlp_grpc: u16,
    query_http: u16,
    dir: tempfile::TempDir,
}

/// One trace as the query API returns it.
#[derive(Debug, Clone)]
pub struct Trace {
    pub trace_id: String,
    pub spans: Vec<Span>,
}

/// One span: ids in lower-case hex, attribute values as strings (arrays and
/// maps as their OTLP JSON).
#[derive(Debug, Clone)]
pub struct Span {
    /// The `service.name` of the span's resource.
    pub service: String,
    pub name: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    /// `internal`, `server`, `client`, `producer` or `consumer`.
    pub kind: Option<String>,
    /// `ok` or `error`, when set.
    pub status: Option<String>,
    pub attributes: Vec<(String, String)>,
}

impl Trace {
    /// The first span named `name`.
    pub fn span(&self, name: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.name == name)
    }

    /// The span with id `span_id`.
    pub fn span_by_id(&self, span_id: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.span_id == span_id)
    }
}

impl Span {
    /// The value of attribute `key`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Jaeger {
    /// Starts Jaeger on free loopback ports and waits until its OTLP and
    /// query ports accept connections.
    pub fn start() -> anyhow::Result<Jaeger> {
        let bin = jaeger_bin()?;
        let dir = tempfile::Builder::new().prefix("jaeger-").tempdir()?;
        let (otlp_http, otlp_grpc) = (super::free_port(), super::free_port());
        let (query_http, query_grpc) = (super::free_port(), super::free_port());
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            config_yaml(otlp_http, otlp_grpc, query_http, query_grpc),
        )?;
        let log = std::fs::File::create(dir.path().join("jaeger.log"))?;
        let mut command = Command::new(&bin);
        command
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child =
            super::spawn_owned(command).with_context(|| format!("starting {}", bin.display()))?;
        let mut jaeger = Jaeger {
            child,
            otlp_http,
            otlp_grpc,
            query_http,
            dir,
        };
        jaeger.wait_ready(Duration::from_secs(60))?;
        Ok(jaeger)
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let ports = [self.otlp_http, self.otlp_grpc, self.query_http];
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Jaeger exited during start-up: {status}\n{}",
                    self.log_tail()
                );
            }
            let open = |port: u16| {
                let addr = ([127, 0, 0, 1], port).into();
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            };
            if ports.into_iter().all(open) {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!(
                    "Jaeger did not open ports {ports:?} within {limit:?}\n{}",
                    self.log_tail()
                );
            }
            // Poll interval while the ports are not open yet.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines Jaeger logged.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("jaeger.log")).unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.reverse();
        tail.join("\n")
    }

    /// The OTLP/HTTP base URL (`/v1/traces` below it).
    pub fn otlp_http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http)
    }

    /// The OTLP/gRPC endpoint.
    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc)
    }

    /// The query service's base URL (API and UI).
    pub fn query_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.query_http)
    }

    /// The trace with id `trace_id_hex` (32 hex digits), `None` while Jaeger
    /// has none of its spans.
    pub async fn trace(&self, trace_id_hex: &str) -> anyhow::Result<Option<Trace>> {
        let url = format!("{}/api/v3/traces/{trace_id_hex}", self.query_endpoint());
        let resp = reqwest::get(&url)
            .await
            .with_context(|| format!("GET {url}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {body}");
        }
        let json: Value =
            serde_json::from_str(&body).with_context(|| format!("GET {url}: {body}"))?;
        parse_trace(trace_id_hex, &json)
            .map(Some)
            .with_context(|| format!("GET {url}: {body}"))
    }

    /// Polls [`Jaeger::trace`] until the trace is there and `cond` holds for
    /// it; fails after `limit`, showing what was there last.
    pub async fn wait_for_trace(
        &self,
        trace_id_hex: &str,
        limit: Duration,
        cond: impl Fn(&Trace) -> bool,
    ) -> anyhow::Result<Trace> {
        let started = Instant::now();
        loop {
            let last = self.trace(trace_id_hex).await?;
            match last {
                Some(trace) if cond(&trace) => return Ok(trace),
                _ if started.elapsed() > limit => {
                    bail!(
                        "trace {trace_id_hex} not as expected within {limit:?}; last seen: {last:#?}"
                    )
                }
                // Poll interval while the spans are not all there yet.
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Receivers → storage, nothing else: every listener on a port of this
/// instance's own, no sampling, health, metrics or zpages endpoints, and no
/// traces of Jaeger's own.
fn config_yaml(otlp_http: u16, otlp_grpc: u16, query_http: u16, query_grpc: u16) -> String {
    format!(
        "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: 127.0.0.1:{query_http}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp_http}
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
    )
}

/// Reads the OTLP/JSON `{"result": {"resourceSpans": [...]}}` of the v3 API.
fn parse_trace(trace_id: &str, json: &Value) -> anyhow::Result<Trace> {
    let resources = json
        .pointer("/result/resourceSpans")
        .and_then(Value::as_array)
        .context("no result.resourceSpans")?;
    let mut spans = Vec::new();
    for rs in resources {
        let resource = attributes(&rs["resource"]["attributes"]);
        let service = resource
            .iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let scope_spans = rs["scopeSpans"].as_array().into_iter().flatten();
        for span in scope_spans.flat_map(|ss| ss["spans"].as_array().into_iter().flatten()) {
            let text = |key: &str| span[key].as_str().filter(|s| !s.is_empty());
            spans.push(Span {
                service: service.clone(),
                name: text("name").unwrap_or_default().to_string(),
                span_id: text("spanId").unwrap_or_default().to_lowercase(),
                parent_span_id: text("parentSpanId").map(str::to_lowercase),
                kind: enum_name(
                    &span["kind"],
                    &["internal", "server", "client", "producer", "consumer"],
                ),
                status: enum_name(&span["status"]["code"], &["ok", "error"]),
                attributes: attributes(&span["attributes"]),
            });
        }
    }
    Ok(Trace {
        trace_id: trace_id.to_lowercase(),
        spans,
    })
}

/// An OTLP enum, as a number or a `SPAN_KIND_SERVER`-style name, as one of
/// `names` (which start at value 1; 0 is "unset").
fn enum_name(v: &Value, names: &[&str]) -> Option<String> {
    let i = match v {
        Value::Number(n) => n.as_u64()? as usize,
        Value::String(s) => {
            let lower = s.to_lowercase();
            return names
                .iter()
                .find(|n| lower.ends_with(&format!("_{n}")))
                .map(|n| n.to_string());
        }
        _ => return None,
    };
    names.get(i.checked_sub(1)?).map(|n| n.to_string())
}

/// OTLP `[{"key": k, "value": {"stringValue": v}}]` as `(k, v)` pairs.
fn attributes(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key = kv["key"].as_str().unwrap_or_default().to_string();
            (key, any_value(&kv["value"]))
        })
        .collect()
}

fn any_value(v: &Value) -> String {
    let Some((_, inner)) = v.as_object().and_then(|o| o.iter().next()) else {
        return String::new();
    };
    match inner {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
