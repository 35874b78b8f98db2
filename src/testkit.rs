//! Real neighbours for tests and benchmarks: a tansu broker in its own
//! process, topic creation, producing events and reading topics back.
//!
//! `scripts/install-tansu.sh` installs the broker; `TANSU_BIN` may point at
//! another binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

/// Where the tansu binary is: `TANSU_BIN`, then `PATH`, then `~/.cargo/bin`.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "the tansu broker is not installed: run scripts/install-tansu.sh (or set TANSU_BIN)",
    )
}

/// An unused loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A tansu broker process on loopback; killed when dropped.
pub struct TansuBroker {
    child: Child,
    port: u16,
    storage: String,
    /// Working directory of the broker (its sqlite file lives there).
    dir: tempfile::TempDir,
}

impl TansuBroker {
    /// A broker with sqlite storage in a fresh temporary directory.
    ///
    /// sqlite rather than `memory://`: tansu 0.6.0's memory engine answers a
    /// fetch from an offset inside a record batch with the *next* batch only
    /// (the records after that offset in its own batch are skipped), and
    /// reports the high watermark as one past the last batch's base offset.
    /// A consumer resuming from a committed offset would lose records there;
    /// the sqlite engine serves both correctly.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_storage("sqlite://tansu.db".to_string(), free_port())
    }

    /// A broker with the given storage URL (`memory://tansu/`,
    /// `sqlite://FILE` relative to the broker's own directory) on `port`.
    pub fn start_with_storage(storage: String, port: u16) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tansu-").tempdir()?;
        let child = spawn_tansu(&storage, port, dir.path())?;
        let mut broker = TansuBroker {
            child,
            port,
            storage,
            dir,
        };
        broker.wait_ready(Duration::from_secs(60))?;
        Ok(broker)
    }

    /// Waits until the broker answers a metadata request (polling a real
    /// readiness condition, bounded by `limit`).
    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let consumer: BaseConsumer = client_config(&self.bootstrap()).create()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("tansu exited during start-up: {status}");
            }
            if consumer
                .fetch_metadata(None, Timeout::After(Duration::from_secs(2)))
                .is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!(
                    "tansu did not answer on port {} within {limit:?}",
                    self.port
                );
            }
            // Poll interval while the port is not open yet.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id (for resource measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and
    /// storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_tansu(&self.storage, self.port, self.dir.path())?;
        self.wait_ready(Duration::from_secs(60))
    }
}

fn spawn_tansu(storage: &str, port: u16, dir: &std::path::Path) -> anyhow::Result<Child> {
    let bin = tansu_binary()?;
    let url = format!("tcp://127.0.0.1:{port}");
    Command::new(&bin)
        .arg("broker")
        .args(["--storage-engine", storage])
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client configuration for test helpers.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
    c
}

/// Creates topics with the given partition counts (replication 1).
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((topic, code)) = r {
            bail!("creating topic {topic}: {code}");
        }
    }
    Ok(())
}

/// Produces records (key, payload) and waits for every acknowledgement.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    records: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u8>)>,
) -> anyhow::Result<usize> {
    let producer: FutureProducer = client_config(bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?;
    let mut pending = Vec::new();
    for (key, payload) in records {
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&topic).payload(&payload);
            if let Some(k) = &key {
                rec = rec.key(k);
            }
            producer
                .send(rec, Timeout::After(Duration::from_secs(30)))
                .await
                .map_err(|(e, _)| e)
        });
    }
    let n = pending.len();
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(n)
}

/// Reads `topic` from the beginning until `count` records arrived or `limit`
/// passed (an error: the records did not come).
pub async fn read_topic(
    bootstrap: &str,
    topic: &str,
    count: usize,
    limit: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    read_topic_until(bootstrap, topic, limit, |msgs| msgs.len() >= count)
        .await
        .with_context(|| format!("waiting for {count} records on {topic}"))
}

/// Reads `topic` from the beginning until `done` holds for what was read.
pub async fn read_topic_until(
    bootstrap: &str,
    topic: &str,
    limit: Duration,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: StreamConsumer = client_config(bootstrap)
        .set("group.id", format!("reader-{}", free_port()))
        .set("enable.auto.commit", "false")
        .create()?;
    let parts = partition_count(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out: Vec<OwnedMessage> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&out) {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => bail!("reading {topic}: {e}"),
            Err(_) => bail!(
                "read {} records from {topic} before the time limit",
                out.len()
            ),
        }
    }
    Ok(out)
}

fn partition_count<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
) -> anyhow::Result<i32> {
    let md = consumer.fetch_metadata(Some(topic), Timeout::After(Duration::from_secs(10)))?;
    let t = md.topics().first().context("no metadata for topic")?;
    if t.partitions().is_empty() {
        bail!("topic {topic} has no partitions");
    }
    Ok(t.partitions().len() as i32)
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

/// The offsets `group` has committed for each partition of `topic`
/// (`None` where nothing is committed).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<Option<i64>>> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let parts = partition_count(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Timeout::After(Duration::from_secs(10)))?;
    Ok((0..parts)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            },
        )
        .collect())
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let hs = m.headers()?;
    hs.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).to_string())
}

/// The record's key as text.
pub fn key(m: &OwnedMessage) -> Option<String> {
    m.key().map(|k| String::from_utf8_lossy(k).to_string())
}
