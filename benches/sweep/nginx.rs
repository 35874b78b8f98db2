//! nginx with its echo module as the Uincall API: it answers every
//! call-detail request with the fake API's record for the asked session
//! after the point's latency, at almost no CPU of its own, so the worker's
//! share of the machine is what it would be against a remote API.
//!
//! One process (`master_process off`), its own prefix directory under the
//! sweep's output, listening on loopback; `stub_status` counts the requests
//! it served (API calls per input record). HTTP/1.1, or HTTP/2 without TLS
//! (prior knowledge) with `--api-http2`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Proc;
use uincall_enricher::fake_api;

/// The echo module as Debian installs it (`libnginx-mod-http-echo`).
const ECHO_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_echo_module.so";
/// Stands for the session id in the answer's text; nginx puts the asked one.
const SESSION: &str = "__SESSION__";
const STATUS_PATH: &str = "/nginx_status";

/// Where a running nginx serves.
pub struct Nginx {
    addr: SocketAddr,
    http2: bool,
}

impl Nginx {
    /// Starts nginx for the point `tag` in `out`, answering after
    /// `latency_ms`; returns its process once it accepts connections.
    pub fn start(
        out: &Path,
        tag: &str,
        latency_ms: u64,
        http2: bool,
    ) -> anyhow::Result<(Proc, Nginx)> {
        which_nginx()?;
        // Absolute: nginx reads `-c` relative to its prefix `-p`.
        let prefix = std::path::absolute(out.join(format!("{tag}-nginx")))?;
        std::fs::create_dir_all(prefix.join("logs"))?;
        // A port nobody holds now; nginx binds it a moment later.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, config(addr, latency_ms, http2))?;
        let mut command = Command::new("nginx");
        command
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prefix.join("logs/stderr.log"))?);
        let mut proc = Proc::spawn("nginx", command)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            proc.check()
                .with_context(|| format!("see {}", prefix.join("logs").display()))?;
            if Instant::now() > deadline {
                bail!("nginx did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((proc, Nginx { addr, http2 }))
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests served so far, this one and earlier status requests
    /// included.
    pub async fn requests(&self) -> anyhow::Result<u64> {
        let client = match self.http2 {
            true => reqwest::Client::builder().http2_prior_knowledge(),
            false => reqwest::Client::builder(),
        };
        let text = (client.build()?)
            .get(format!("http://{}{STATUS_PATH}", self.addr))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        // "Active connections: 1\nserver accepts handled requests\n 1 1 7\n…"
        let numbers = text.lines().nth(2).context("stub_status has no counts")?;
        let requests = numbers.split_whitespace().nth(2);
        Ok(requests
            .context("stub_status has no request count")?
            .parse()?)
    }
}

fn which_nginx() -> anyhow::Result<()> {
    let found = Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status();
    if !found.is_ok_and(|s| s.success()) || !Path::new(ECHO_MODULE).exists() {
        bail!("nginx with its echo module is needed: run `bash scripts/install-nginx.sh`");
    }
    Ok(())
}

/// The whole configuration: one server, the detail route and the counter.
fn config(addr: SocketAddr, latency_ms: u64, http2: bool) -> String {
    let answer = serde_json::json!({
        "errcode": 0,
        "errmsg": "success",
        "data": fake_api::sample_record(SESSION, true, None),
    })
    .to_string()
    .replace('\\', "\\\\")
    .replace('\'', "\\'")
    .replace(SESSION, "${session}");
    let sleep = if latency_ms > 0 {
        format!("echo_sleep {:.3};", latency_ms as f64 / 1000.0)
    } else {
        String::new()
    };
    let http2 = if http2 { " http2" } else { "" };
    format!(
        r#"load_module {ECHO_MODULE};
daemon off;
master_process off;
pid nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 4096;
    client_body_temp_path tmp;
    server {{
        listen {addr}{http2};
        location = {STATUS_PATH} {{ stub_status; }}
        location ~ ^/openapi/call/v2/detail/(?<session>[^/]+)$ {{
            {sleep}
            echo -n '{answer}';
        }}
    }}
}}
"#
    )
}
