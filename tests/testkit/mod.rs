//! Real neighbours for tests and benchmarks: Apache Kafka brokers in their
//! own processes (KRaft, from the jars `scripts/install-kafka.sh` fetches),
//! topic creation and offsets; producing and reading back come from the
//! library's `topics` (re-exported here). Test scaffolding: included by the
//! integration tests and the benchmarks (`#[path]`), never compiled into
//! the binary.
//!
//! `KAFKA_BOOTSTRAP=host:port` points [`shared_bootstrap`] at an existing
//! cluster instead of starting one; `KAFKA_LIB` names the jar directory.

#![allow(dead_code)] // each including target uses part of it

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

pub use uincall_enricher::topics::*;

pub mod jaeger;
pub mod oidc;

/// The directory holding the broker's jars: `KAFKA_LIB`, else what
/// `scripts/install-kafka.sh` prints (it fetches them on first use).
pub fn kafka_lib() -> anyhow::Result<PathBuf> {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    installed(&LIB, "KAFKA_LIB", "scripts/install-kafka.sh")
}

/// The path in variable `var`, else the one `script` prints (it installs
/// what is missing), found once per process.
fn installed(
    once: &OnceLock<Result<PathBuf, String>>,
    var: &str,
    script: &str,
) -> anyhow::Result<PathBuf> {
    once.get_or_init(|| {
        if let Some(p) = std::env::var_os(var) {
            return Ok(PathBuf::from(p));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed: {}", script.display(), out.status));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// An unused loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts broker processes from one thread that lives as long as this
/// process, each with `PR_SET_PDEATHSIG`: a test run that is killed, or a
/// shared broker that is never dropped, takes its brokers with it.
fn spawn_owned(mut command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("broker-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // Never returns while the process lives: the channel's
                // sender is a static.
            })
            .expect("a spawner thread");
        std::sync::Mutex::new(tx)
    });
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((command, reply))
        .expect("the spawner thread runs");
    answer.recv().expect("the spawner answers")
}

/// One node of a [`KafkaCluster`]: broker and controller in one process.
struct KafkaNode {
    id: u32,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The secured listeners, on a cluster started secured.
    secured: Option<Secured>,
}

/// A broker's secured listeners: SASL_SSL (SCRAM-SHA-512 and OAUTHBEARER
/// tokens verified with an identity provider's keys) and MTLS (TLS with a
/// client certificate required), both with the test CA's certificates.
#[derive(Clone)]
struct Secured {
    sasl_port: u16,
    mtls_port: u16,
    key_store: PathBuf,
    trust_store: PathBuf,
    jwks_url: String,
}

/// The SCRAM user of a secured test cluster.
pub const SCRAM_USER: &str = "enricher";
pub const SCRAM_PASSWORD: &str = "enricher-test-secret";

/// A test certificate authority and certificates made with the openssl
/// command: `ca.pem`; `broker.pem` (the broker's PKCS#8 key followed by its
/// certificate for 127.0.0.1 and the CA's); a client certificate and key
/// signed by the CA; and one signed by another CA the broker does not trust.
pub struct TestPki {
    pub ca: PathBuf,
    pub broker_key_store: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

impl TestPki {
    pub fn create(dir: &Path) -> anyhow::Result<TestPki> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        make_ca(dir, "ca", "/CN=uincall-enricher test CA")?;
        make_ca(dir, "stranger-ca", "/CN=another CA")?;
        issue(dir, "broker", "ca", "/CN=127.0.0.1", "san.ext")?;
        issue(dir, "client", "ca", "/CN=uincall-enricher", "client.ext")?;
        issue(
            dir,
            "stranger",
            "stranger-ca",
            "/CN=uincall-enricher",
            "client.ext",
        )?;
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "broker.key",
                "-out",
                "broker.p8",
            ],
        )?;
        let store: String = ["broker.p8", "broker.crt", "ca.pem"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)))
            .collect::<Result<_, _>>()?;
        std::fs::write(dir.join("broker.pem"), store)?;
        Ok(TestPki {
            ca: dir.join("ca.pem"),
            broker_key_store: dir.join("broker.pem"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            stranger_cert: dir.join("stranger.crt"),
            stranger_key: dir.join("stranger.key"),
        })
    }
}

/// Runs `openssl ARGS` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A self-signed CA `NAME.pem` (key `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str, subject: &str) -> anyhow::Result<()> {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem,
            "-days", "2", "-subj", subject,
        ],
    )
}

/// `NAME.key` and `NAME.crt` in `dir`, signed by the CA `CA`, with the
/// extensions in the file `ext`.
fn issue(dir: &Path, name: &str, ca: &str, subject: &str, ext: &str) -> anyhow::Result<()> {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ],
    )?;
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    )
}

/// The SASL_SSL and mTLS listeners of a secured node, and their settings.
fn secured(s: &Secured) -> (String, String) {
    (
        format!(
            ",SASL_SSL://127.0.0.1:{},MTLS://127.0.0.1:{}",
            s.sasl_port, s.mtls_port
        ),
        format!(
            "sasl.enabled.mechanisms=SCRAM-SHA-512,OAUTHBEARER\n\
                     listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                     listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;\n\
                     listener.name.sasl_ssl.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler\n\
                     sasl.oauthbearer.jwks.endpoint.url={jwks}\n\
                     sasl.oauthbearer.expected.audience={audience}\n\
                     sasl.oauthbearer.expected.issuer={issuer}\n\
                     ssl.keystore.type=PEM\n\
                     ssl.keystore.location={key_store}\n\
                     listener.name.mtls.ssl.client.auth=required\n\
                     listener.name.mtls.ssl.truststore.type=PEM\n\
                     listener.name.mtls.ssl.truststore.location={trust_store}\n",
            jwks = s.jwks_url,
            audience = oidc::AUDIENCE,
            issuer = oidc::ISSUER,
            key_store = s.key_store.display(),
            trust_store = s.trust_store.display(),
        ),
    )
}

impl KafkaNode {
    fn properties(&self, voters: &str, nodes: usize) -> String {
        let replicas = nodes.min(3);
        let min_isr = if nodes >= 3 { 2 } else { 1 };
        let (listener, secured) = self.secured.as_ref().map_or_else(Default::default, secured);
        format!(
            "process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}{listener}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}{listener}\n\
             inter.broker.listener.name=PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL\n\
             {secured}\
             log.dirs={logs}\n\
             num.partitions=1\n\
             default.replication.factor={replicas}\n\
             min.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={replicas}\n\
             offsets.topic.num.partitions=6\n\
             transaction.state.log.replication.factor={replicas}\n\
             transaction.state.log.min.isr={min_isr}\n\
             transaction.state.log.num.partitions=6\n\
             share.coordinator.state.topic.replication.factor={replicas}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n\
             group.consumer.session.timeout.ms=10000\n\
             group.consumer.min.session.timeout.ms=3000\n\
             group.consumer.heartbeat.interval.ms=1000\n\
             group.consumer.min.heartbeat.interval.ms=500\n\
             auto.create.topics.enable=false\n",
            id = self.id,
            port = self.port,
            cport = self.controller_port,
            logs = self.dir.join("data").display(),
        )
    }

    fn start(&mut self, lib: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))?;
        let mut java = Command::new("java");
        // Tests start many JVMs on two cores: the quick compiler only. A
        // benchmark that reports the broker's CPU sets KAFKA_JVM_FLAGS to
        // production-like flags instead.
        let flags = std::env::var("KAFKA_JVM_FLAGS")
            .unwrap_or_else(|_| "-Xms128m -Xmx768m -XX:+UseG1GC -XX:TieredStopAtLevel=1".into());
        java.args(flags.split_whitespace());
        if let Some(secured) = &self.secured {
            // Kafka fetches OAUTHBEARER keys only from URLs allowed here.
            java.arg(format!(
                "-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={}",
                secured.jwks_url
            ));
        }
        java.arg(format!(
            "-Dlog4j2.configurationFile={}",
            self.dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(lib.join("*"))
        .arg("kafka.Kafka")
        .arg(self.dir.join("server.properties"))
        .current_dir(&self.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        self.child = Some(spawn_owned(java).context("starting java (Java 17+ is required)")?);
        Ok(())
    }

    /// Waits until the client port accepts connections (the broker opens
    /// it only once it can serve).
    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                bail!(
                    "broker {} exited during start-up: {status}\n{tail}",
                    self.id
                );
            }
            let addr = ([127, 0, 0, 1], self.port).into();
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!(
                    "broker {} did not open port {} within {limit:?}",
                    self.id,
                    self.port
                );
            }
            // Poll interval while the port is not open yet.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        match self.child.as_ref() {
            Some(child) => {
                send_signal(child, signal).with_context(|| format!("signalling broker {}", self.id))
            }
            None => Ok(()),
        }
    }

    /// Stops the node (SIGTERM: a controlled shutdown that moves its
    /// leaderships; SIGKILL: a crash) and waits for the process to end.
    fn stop(&mut self, signal: &str) -> anyhow::Result<()> {
        self.signal(signal)?;
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        Ok(())
    }
}

/// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`) to a child process.
pub fn send_signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {} failed", child.id());
    }
    Ok(())
}

/// Apache Kafka in KRaft mode: one or more nodes, each broker and controller
/// in one JVM, on loopback ports, in a temporary directory; stopped when
/// dropped.
pub struct KafkaCluster {
    nodes: Vec<KafkaNode>,
    lib: PathBuf,
    _dir: tempfile::TempDir,
}

const LOG4J2: &str = "status = error
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
";

impl KafkaCluster {
    /// Formats and starts `nodes` nodes (1, or 3 with replication 3 and
    /// `min.insync.replicas` 2) and waits until each serves clients.
    pub fn start(nodes: usize) -> anyhow::Result<KafkaCluster> {
        KafkaCluster::start_with(nodes, None)
    }

    /// Like [`KafkaCluster::start`], each node also with a SASL_SSL listener
    /// ([`KafkaCluster::secured_bootstrap`]: SCRAM-SHA-512 with the user
    /// [`SCRAM_USER`], or OAUTHBEARER with a token of `oidc`) and an MTLS
    /// listener ([`KafkaCluster::mtls_bootstrap`]: a client certificate
    /// signed by the CA of `pki` required), with the broker certificate of
    /// `pki`.
    pub fn start_secured(
        nodes: usize,
        pki: &TestPki,
        oidc: &oidc::TestOidc,
    ) -> anyhow::Result<KafkaCluster> {
        KafkaCluster::start_with(nodes, Some((pki, oidc)))
    }

    fn start_with(
        nodes: usize,
        secured: Option<(&TestPki, &oidc::TestOidc)>,
    ) -> anyhow::Result<KafkaCluster> {
        let lib = kafka_lib()?;
        let dir = tempfile::Builder::new().prefix("kafka-").tempdir()?;
        let mut list: Vec<KafkaNode> = (1..=nodes as u32)
            .map(|id| KafkaNode {
                id,
                port: free_port(),
                controller_port: free_port(),
                dir: dir.path().join(format!("node-{id}")),
                child: None,
                secured: secured.map(|(pki, oidc)| Secured {
                    sasl_port: free_port(),
                    mtls_port: free_port(),
                    key_store: pki.broker_key_store.clone(),
                    trust_store: pki.ca.clone(),
                    jwks_url: oidc.jwks_url.clone(),
                }),
            })
            .collect();
        let voters = list
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = storage_tool(&lib, &["random-uuid"])?;
        for node in &mut list {
            std::fs::create_dir_all(&node.dir)?;
            std::fs::write(node.dir.join("log4j2.properties"), LOG4J2)?;
            let props = node.dir.join("server.properties");
            std::fs::write(&props, node.properties(&voters, nodes))?;
            let props = props.to_string_lossy();
            let mut args = vec!["format", "-t", cluster_id.trim(), "-c", &props];
            let scram = format!("SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]");
            if secured.is_some() {
                args.extend(["--add-scram", &scram]);
            }
            storage_tool(&lib, &args)?;
        }
        for node in &mut list {
            node.start(&lib)?;
        }
        let mut cluster = KafkaCluster {
            nodes: list,
            lib,
            _dir: dir,
        };
        for node in &mut cluster.nodes {
            node.wait_ready(Duration::from_secs(120))?;
        }
        cluster.wait_for_brokers(nodes, Duration::from_secs(120))?;
        Ok(cluster)
    }

    /// All nodes' SASL_SSL addresses, comma separated (a cluster started
    /// with [`KafkaCluster::start_secured`]).
    pub fn secured_bootstrap(&self) -> String {
        self.addresses(|s| s.sasl_port)
    }

    /// All nodes' MTLS addresses, comma separated (a cluster started with
    /// [`KafkaCluster::start_secured`]).
    pub fn mtls_bootstrap(&self) -> String {
        self.addresses(|s| s.mtls_port)
    }

    fn addresses(&self, port: impl Fn(&Secured) -> u16) -> String {
        self.nodes
            .iter()
            .filter_map(|n| Some(format!("127.0.0.1:{}", port(n.secured.as_ref()?))))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// All nodes' client addresses, comma separated.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The JVM's process id of node `i` (0-based), while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Sends node `i` (0-based) `signal` without waiting for anything:
    /// `STOP` freezes its JVM (a long GC pause, a VM migration), `CONT`
    /// thaws it.
    pub fn signal_node(&mut self, i: usize, signal: &str) -> anyhow::Result<()> {
        self.nodes[i].signal(signal)
    }

    /// Stops node `i` (0-based) with `signal` (`TERM` or `KILL`) and waits
    /// for its process to end.
    pub fn stop_node(&mut self, i: usize, signal: &str) -> anyhow::Result<()> {
        self.nodes[i].stop(signal)
    }

    /// Starts node `i` again on its data and waits until it serves clients
    /// and every partition has all its replicas in sync again.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let lib = self.lib.clone();
        let node = &mut self.nodes[i];
        node.start(&lib)?;
        node.wait_ready(Duration::from_secs(120))?;
        self.wait_for_brokers(self.nodes.len(), Duration::from_secs(120))?;
        self.wait_in_sync(Duration::from_secs(120))
    }

    /// Waits until the metadata lists `count` brokers.
    fn wait_for_brokers(&self, count: usize, limit: Duration) -> anyhow::Result<()> {
        let consumer: BaseConsumer = client_config(&self.bootstrap()).create()?;
        poll_until(limit, "brokers in the metadata", || {
            consumer
                .fetch_metadata(None, Timeout::After(Duration::from_secs(5)))
                .is_ok_and(|md| md.brokers().len() == count)
        })
    }

    /// Waits until every partition of every topic has all its replicas in
    /// sync (what an operator waits for before restarting the next broker).
    pub fn wait_in_sync(&self, limit: Duration) -> anyhow::Result<()> {
        let consumer: BaseConsumer = client_config(&self.bootstrap()).create()?;
        poll_until(limit, "all replicas in sync", || {
            consumer
                .fetch_metadata(None, Timeout::After(Duration::from_secs(5)))
                .is_ok_and(|md| {
                    md.topics().iter().all(|t| {
                        t.partitions().iter().all(|p| {
                            p.error().is_none()
                                && p.leader() >= 0
                                && p.isr().len() == p.replicas().len()
                        })
                    })
                })
        })
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.stop("KILL");
        }
    }
}

fn storage_tool(lib: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("java")
        .arg("-cp")
        .arg(lib.join("*"))
        .arg("kafka.tools.StorageTool")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running kafka.tools.StorageTool (Java 17+ is required)")?;
    if !out.status.success() {
        bail!(
            "kafka.tools.StorageTool {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Polls `cond` (a real readiness condition) until it holds, or fails after `limit`.
fn poll_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > limit {
            bail!("waited {limit:?} in vain for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The broker shared by every test of this process: `KAFKA_BOOTSTRAP` when
/// set, else a single-node cluster started on first use and stopped when
/// the process ends.
pub fn shared_bootstrap() -> String {
    static SHARED: OnceLock<String> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP")
                && !b.trim().is_empty()
            {
                return b;
            }
            let cluster = KafkaCluster::start(1).expect("an Apache Kafka broker starts");
            let bootstrap = cluster.bootstrap();
            // Lives as long as the process; its JVM dies with it.
            std::mem::forget(cluster);
            bootstrap
        })
        .clone()
}

/// How many replicas a new topic gets on this cluster: 3 where there are
/// three brokers or more, else 1.
pub fn replication_for(bootstrap: &str) -> anyhow::Result<i32> {
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    let md = consumer.fetch_metadata(None, Timeout::After(Duration::from_secs(10)))?;
    Ok(if md.brokers().len() >= 3 { 3 } else { 1 })
}

/// Creates topics with the given partition counts (replication 3 on a
/// cluster of three or more brokers, else 1).
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|&(name, partitions)| TopicSpec {
            name,
            partitions,
            config: &[],
        })
        .collect();
    create_topics_with(bootstrap, &specs).await
}

/// A topic to create, with topic-level configuration (e.g.
/// `max.message.bytes`).
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub config: &'a [(&'a str, &'a str)],
}

/// Creates topics as specified; waits until their leaders are known.
pub async fn create_topics_with(bootstrap: &str, topics: &[TopicSpec<'_>]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    let replication = replication_for(bootstrap)?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            t.config.iter().fold(
                NewTopic::new(t.name, t.partitions, TopicReplication::Fixed(replication)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for r in results {
        if let Err((topic, code)) = r {
            bail!("creating topic {topic}: {code}");
        }
    }
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    for t in topics {
        poll_until(Duration::from_secs(60), "the new topic's leaders", || {
            consumer
                .fetch_metadata(Some(t.name), Timeout::After(Duration::from_secs(5)))
                .is_ok_and(|md| {
                    md.topics().iter().any(|mt| {
                        mt.error().is_none()
                            && mt.partitions().len() == t.partitions as usize
                            && mt.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
        })?;
    }
    Ok(())
}

/// The high watermark of each partition of `topic`.
pub fn end_offsets(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<i64>> {
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    let parts = partition_count(&consumer, topic)?;
    (0..parts)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Timeout::After(Duration::from_secs(10)))
                .map(|(_, high)| high)
                .map_err(Into::into)
        })
        .collect()
}

/// The key of every record of `topic` visible to a `read_committed`
/// reader, from the start to the end of each partition (its last stable
/// offset).
pub fn keys_to_end(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<String>> {
    use rdkafka::message::Message;
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", format!("to-end-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()?;
    let parts = assign_from_start(&consumer, topic)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut at_end = std::collections::HashSet::new();
    let mut keys = Vec::new();
    while at_end.len() < parts as usize {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{topic}: only {} of {parts} partitions read to their end",
            at_end.len()
        );
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                keys.push(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => eprintln!("reading {topic} to its end: {e} (going on)"),
            None => {}
        }
    }
    Ok(keys)
}

/// The offsets `group` has committed for each partition of `topic`
/// (`None` where nothing is committed).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<Option<i64>>> {
    let committed = committed_with_metadata(bootstrap, group, topic)?;
    Ok(committed.into_iter().map(|c| c.map(|(o, _)| o)).collect())
}

/// Per partition of `topic`: the offset `group` committed and its metadata.
pub fn committed_with_metadata(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<Option<(i64, String)>>> {
    // `read_uncommitted`: the offsets committed now, not waiting for those
    // an open transaction carries (librdkafka asks for stable offsets when
    // reading committed, and a frozen replica's transaction stays open
    // until the brokers time it out).
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let parts = partition_count(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Timeout::After(Duration::from_secs(10)))?;
    Ok((0..parts)
        .map(|p| {
            let e = committed.find_partition(topic, p)?;
            match e.offset() {
                Offset::Offset(o) => Some((o, e.metadata().to_string())),
                _ => None,
            }
        })
        .collect())
}
