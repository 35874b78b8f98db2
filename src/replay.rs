//! `replay`: re-submits dead letters after their cause is fixed.
//!
//! A run reads the dead-letter topic from where the last run of the same
//! replay group stopped up to the end offsets captured at its start (records
//! that arrive meanwhile wait for the next run), keeps what the filters
//! select, and either produces each record back to the input topic (key,
//! value and headers as they were, `dlq.*` dropped) or, with `--direct`,
//! enriches it right away (published, or dead-lettered again). Progress is
//! committed under the replay group only for records whose re-submission
//! the broker acknowledged, as the contiguous prefix per partition: Ctrl-C
//! and a rerun continue where it stopped. Each re-submission carries
//! `replay.count`; a dead letter already replayed `--max-replays` times is
//! reported, not replayed again (the loop guard).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use governor::{Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dead_letter::header as dlq;
use crate::kafka;
use crate::offsets::PartitionTracker;
use crate::pipeline::{Disposition, Enricher, InRecord};
use crate::record::Source;
use crate::settings::Settings;
use crate::stats::Stats;

/// Header counting how often a record was replayed.
pub const REPLAY_COUNT: &str = "replay.count";
/// Header naming the dead letter a record was replayed from
/// (`topic/partition/offset`).
pub const REPLAYED_FROM: &str = "replay.from";

/// Options of `uincall-enricher replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Enrich and publish straight to the output topic (dead-lettering
    /// again on failure) instead of producing back to the input topic.
    #[arg(long)]
    pub direct: bool,
    /// Show what the filters select (counts by reason and a sample); write
    /// and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only this error class (dlq.error_class); repeatable.
    #[arg(long = "error-class", value_name = "CLASS")]
    pub error_classes: Vec<String>,
    /// Only dead letters whose reason (dlq.reason) contains this text.
    #[arg(long, value_name = "TEXT")]
    pub reason_contains: Option<String>,
    /// Only this API errcode (dlq.errcode); repeatable.
    #[arg(long = "errcode", value_name = "N")]
    pub errcodes: Vec<i64>,
    /// Only this tenant (dlq.tenant_id); repeatable.
    #[arg(long = "tenant", value_name = "ID")]
    pub tenants: Vec<String>,
    /// Only dead letters that failed at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub failed_after: Option<DateTime<Utc>>,
    /// Only dead letters that failed before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub failed_before: Option<DateTime<Utc>>,
    /// Only records from this input partition (dlq.source_partition); repeatable.
    #[arg(long = "source-partition", value_name = "N")]
    pub source_partitions: Vec<i32>,
    /// Only records from this input offset range, `FROM..TO` (TO excluded).
    #[arg(long, value_name = "FROM..TO", value_parser = parse_range)]
    pub source_offsets: Option<(i64, i64)>,
    /// Only the session ids listed in this file, one per line.
    #[arg(long, value_name = "FILE")]
    pub sessions: Option<PathBuf>,
    /// Replay at most this many records (the rest waits for the next run).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// At most this many records per second.
    #[arg(long, value_name = "N")]
    pub rate: Option<NonZeroU32>,
    /// Replays of one record after which it is reported, not replayed.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_replays: u32,
    /// Consumer group that keeps the replay's progress
    /// (default: `<kafka.group_id>.replay`).
    #[arg(long, value_name = "ID")]
    pub group: Option<String>,
    /// Re-submissions awaiting acknowledgement at once (with `--direct`,
    /// API calls also stay within `pipeline.max_in_flight`).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub window: usize,
}

fn parse_range(s: &str) -> Result<(i64, i64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not FROM..TO"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| format!("{v:?} is not an offset"))
    };
    Ok((num(a)?, num(b)?))
}

/// The `dlq.*` headers of one dead letter.
#[derive(Debug, Default, Clone)]
pub struct Failure {
    headers: HashMap<String, String>,
}

impl Failure {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.get(name).and_then(|v| v.parse().ok())
    }

    fn replay_count(&self) -> u32 {
        self.num(REPLAY_COUNT).unwrap_or(0)
    }
}

/// What a dead letter must look like to be replayed.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub error_classes: Vec<String>,
    pub reason_contains: Option<String>,
    pub errcodes: Vec<i64>,
    pub tenants: Vec<String>,
    pub failed_after: Option<DateTime<Utc>>,
    pub failed_before: Option<DateTime<Utc>>,
    pub source_partitions: Vec<i32>,
    pub source_offsets: Option<(i64, i64)>,
    pub sessions: Option<HashSet<String>>,
}

impl Filter {
    fn from_args(a: &ReplayArgs) -> anyhow::Result<Filter> {
        let sessions = match &a.sessions {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --sessions {}", path.display()))?;
                Some(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect(),
                )
            }
        };
        Ok(Filter {
            error_classes: a.error_classes.clone(),
            reason_contains: a.reason_contains.clone(),
            errcodes: a.errcodes.clone(),
            tenants: a.tenants.clone(),
            failed_after: a.failed_after,
            failed_before: a.failed_before,
            source_partitions: a.source_partitions.clone(),
            source_offsets: a.source_offsets,
            sessions,
        })
    }

    /// The replay group when `--group` is not given:
    /// `<kafka.group_id>.replay`, plus a digest of the filters when any is
    /// set. A run with other filters then starts from the beginning instead
    /// of after the records an earlier run skipped; the same filters
    /// continue where they stopped.
    pub fn default_group(&self, group_id: &str) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut add = |name: &str, mut values: Vec<String>| {
            if !values.is_empty() {
                values.sort();
                parts.push(format!("{name}={}", values.join(",")));
            }
        };
        add("class", self.error_classes.clone());
        add("reason", self.reason_contains.iter().cloned().collect());
        add(
            "errcode",
            self.errcodes.iter().map(i64::to_string).collect(),
        );
        add("tenant", self.tenants.clone());
        add(
            "after",
            self.failed_after.iter().map(|t| t.to_rfc3339()).collect(),
        );
        add(
            "before",
            self.failed_before.iter().map(|t| t.to_rfc3339()).collect(),
        );
        add(
            "partition",
            self.source_partitions.iter().map(i32::to_string).collect(),
        );
        add(
            "offsets",
            self.source_offsets
                .iter()
                .map(|(a, b)| format!("{a}..{b}"))
                .collect(),
        );
        add(
            "sessions",
            self.sessions.iter().flatten().cloned().collect(),
        );
        if parts.is_empty() {
            return format!("{group_id}.replay");
        }
        // FNV-1a: stable across builds and platforms.
        let digest = parts
            .join(";")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
            });
        format!("{group_id}.replay.{digest:016x}")
    }

    /// Whether the dead letter passes every filter that is set.
    pub fn matches(&self, f: &Failure) -> bool {
        fn any_of<T: PartialEq>(allowed: &[T], v: Option<T>) -> bool {
            allowed.is_empty() || v.is_some_and(|v| allowed.contains(&v))
        }
        let failed_at = f
            .get(dlq::FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let offset: Option<i64> = f.num(dlq::SOURCE_OFFSET);
        any_of(
            &self.error_classes,
            f.get(dlq::ERROR_CLASS).map(String::from),
        ) && self
            .reason_contains
            .as_ref()
            .is_none_or(|t| f.get(dlq::REASON).is_some_and(|r| r.contains(t.as_str())))
            && any_of(&self.errcodes, f.num(dlq::ERRCODE))
            && any_of(&self.tenants, f.get(dlq::TENANT_ID).map(String::from))
            && any_of(&self.source_partitions, f.num(dlq::SOURCE_PARTITION))
            && self
                .failed_after
                .is_none_or(|t| failed_at.is_some_and(|a| a >= t))
            && self
                .failed_before
                .is_none_or(|t| failed_at.is_some_and(|a| a < t))
            && self
                .source_offsets
                .is_none_or(|(from, to)| offset.is_some_and(|o| o >= from && o < to))
            && self
                .sessions
                .as_ref()
                .is_none_or(|set| f.get(dlq::SESSION_ID).is_some_and(|s| set.contains(s)))
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Dead letters read (up to the captured end offsets).
    pub read: u64,
    pub matched: u64,
    /// Re-submissions acknowledged (enriched or back on the input topic).
    pub replayed: u64,
    pub skipped_by_filter: u64,
    pub skipped_by_loop_guard: u64,
    /// Selected dead letters that hold only the start of the original value
    /// (`dlq.truncated_to`): not replayable, reported with where the
    /// original is.
    pub skipped_truncated: u64,
    /// Re-submissions that failed (with `--direct`: dead-lettered again).
    pub failed: u64,
    /// Stopped by a signal before the end.
    pub interrupted: bool,
    /// With `--dry-run`: matches by `error_class: reason`.
    pub by_reason: BTreeMap<String, u64>,
    /// With `--dry-run`: a few matches, as text lines.
    pub sample: Vec<String>,
}

impl Summary {
    pub fn render(&self, dry_run: bool) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: u64| out.push_str(&format!("  {k:<22} {v}\n"));
        line("read", self.read);
        line("matched", self.matched);
        if !dry_run {
            line("replayed", self.replayed);
        }
        line("skipped by filter", self.skipped_by_filter);
        line("skipped by loop guard", self.skipped_by_loop_guard);
        line("skipped, truncated", self.skipped_truncated);
        if !dry_run {
            line("failed", self.failed);
        }
        if dry_run {
            out.push_str("matches by reason:\n");
            for (reason, n) in &self.by_reason {
                out.push_str(&format!("  {n:>8}  {reason}\n"));
            }
            out.push_str("sample:\n");
            for s in &self.sample {
                out.push_str(&format!("  {s}\n"));
            }
        }
        if self.interrupted {
            out.push_str("interrupted: run again to continue\n");
        }
        out
    }
}

const SAMPLE: usize = 10;

/// How one matched record ended.
enum Resubmitted {
    Acknowledged,
    /// With `--direct`: the record failed again and its new dead letter was
    /// acknowledged (it is done: the next run sees the new dead letter).
    DeadLetteredAgain(String),
    /// Nothing reached the broker: the record stays uncommitted.
    Failed(String),
    /// Shutdown came first: not committed, replayed by the next run.
    Abandoned,
}

/// Runs a replay until the captured end offsets, the limit or `stop`.
pub async fn run(
    settings: Settings,
    args: ReplayArgs,
    stop: CancellationToken,
) -> anyhow::Result<Summary> {
    let filter = Filter::from_args(&args)?;
    if args.window == 0 {
        bail!("--window must be at least 1");
    }
    let settings = Arc::new(settings);
    let k = &settings.kafka;
    let topic = k.dead_letter_topic.clone();
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| filter.default_group(&k.group_id));
    let consumer: StreamConsumer = kafka::replay_consumer_config(k, &group)
        .create()
        .context("creating the replay consumer")?;
    let consumer = Arc::new(consumer);
    let positions = {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        tokio::task::spawn_blocking(move || start_and_end(&consumer, &topic)).await??
    };
    let total: i64 = positions.values().map(|(s, e)| e - s).sum();
    info!(
        topic = %topic,
        group = %group,
        records = total,
        direct = args.direct,
        dry_run = args.dry_run,
        "replay started"
    );
    let mut summary = Summary::default();
    let mut open: HashSet<i32> = positions
        .iter()
        .filter(|(_, (s, e))| s < e)
        .map(|(p, _)| *p)
        .collect();
    if open.is_empty() {
        return Ok(summary);
    }
    let mut tpl = TopicPartitionList::new();
    for p in &open {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(positions[p].0))?;
    }
    consumer.assign(&tpl)?;

    let target = Target::new(&settings, &args).await?;
    let helper_stop = stop.child_token();
    let helpers = target.start_helpers(&helper_stop);
    let limiter = args
        .rate
        .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
    let bar = progress_bar(total as u64);
    let mut progress = Progress::default();
    let mut in_flight = FuturesUnordered::new();
    let mut started: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_log = Instant::now();
    loop {
        let limit_reached = args.limit.is_some_and(|l| started >= l);
        let taking = !open.is_empty() && !limit_reached && in_flight.len() < args.window;
        if !taking && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                summary.interrupted = true;
                break;
            }
            Some((partition, offset, result)) = in_flight.next() => {
                if ended(&mut summary, partition, offset, result) {
                    progress.done(partition, offset);
                    // Committed as it goes (asynchronously), so a killed run
                    // re-submits at most about the window again.
                    commit(&consumer, &topic, &mut progress.pending, CommitMode::Async);
                }
            }
            msg = consumer.recv(), if taking => {
                let m = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "reading the dead-letter topic failed; retrying");
                        continue;
                    }
                };
                let (partition, offset) = (m.partition(), m.offset());
                let end = positions[&partition].1;
                if offset + 1 >= end {
                    open.remove(&partition);
                    if offset >= end {
                        continue;
                    }
                }
                bar.inc(1);
                summary.read += 1;
                progress.start(partition, offset);
                let failure = failure_of(&m);
                if !filter.matches(&failure) {
                    summary.skipped_by_filter += 1;
                    progress.done(partition, offset);
                    continue;
                }
                summary.matched += 1;
                if failure.replay_count() >= args.max_replays {
                    summary.skipped_by_loop_guard += 1;
                    warn!(
                        partition,
                        offset,
                        session_id = failure.get(dlq::SESSION_ID).unwrap_or("-"),
                        replays = failure.replay_count(),
                        "not replayed again: the loop guard (--max-replays) stops it"
                    );
                    progress.done(partition, offset);
                    continue;
                }
                if let Some(kept) = failure.get(dlq::TRUNCATED_TO) {
                    summary.skipped_truncated += 1;
                    warn!(
                        partition,
                        offset,
                        kept_bytes = kept,
                        original_bytes = failure.get(dlq::ORIGINAL_SIZE).unwrap_or("-"),
                        original = format!(
                            "{}/{}@{}",
                            failure.get(dlq::SOURCE_TOPIC).unwrap_or("-"),
                            failure.get(dlq::SOURCE_PARTITION).unwrap_or("-"),
                            failure.get(dlq::SOURCE_OFFSET).unwrap_or("-")
                        ),
                        "not replayed: the dead letter holds only the start of the original; it is on the input topic at the source offset while retention lasts"
                    );
                    progress.done(partition, offset);
                    continue;
                }
                if args.dry_run {
                    note_match(&mut summary, &failure, partition, offset);
                    progress.done(partition, offset);
                    continue;
                }
                if let Some(l) = &limiter {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            summary.interrupted = true;
                            break;
                        }
                        _ = l.until_ready() => {}
                    }
                }
                started += 1;
                let rec = resubmission(&m, &failure, &topic);
                drop(m);
                let target = target.clone();
                let stop = stop.clone();
                in_flight.push(async move {
                    (partition, offset, target.resubmit(rec, stop).await)
                });
            }
            _ = tick.tick() => {
                // A partition whose last records cannot be fetched (deleted
                // by retention meanwhile) ends when the position reaches
                // the end.
                if let Ok(assigned) = consumer.position() {
                    for e in assigned.elements() {
                        if let Offset::Offset(o) = e.offset()
                            && o >= positions[&e.partition()].1
                        {
                            open.remove(&e.partition());
                        }
                    }
                }
                if !args.dry_run {
                    commit(&consumer, &topic, &mut progress.pending, CommitMode::Async);
                }
                if bar.is_hidden() && last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    info!(read = summary.read, replayed = summary.replayed, of = total, "replay progress");
                }
            }
        }
    }
    // Interrupted: what is in flight finishes (the producer acknowledges or
    // times out) so its progress can be committed.
    while let Some((partition, offset, result)) = in_flight.next().await {
        if ended(&mut summary, partition, offset, result) {
            progress.done(partition, offset);
        }
    }
    if !args.dry_run {
        // Every partition's latest position once more, synchronously: an
        // asynchronous commit that failed is made good here.
        let mut all = progress.latest.clone();
        commit(&consumer, &topic, &mut all, CommitMode::Sync);
    }
    bar.finish_and_clear();
    helper_stop.cancel();
    for h in helpers {
        let _ = h.await;
    }
    Ok(summary)
}

/// Counts how a re-submission ended; `true` when the record is done (its
/// offset may be committed).
fn ended(summary: &mut Summary, partition: i32, offset: i64, result: Resubmitted) -> bool {
    match result {
        Resubmitted::Acknowledged => {
            summary.replayed += 1;
            true
        }
        Resubmitted::DeadLetteredAgain(why) => {
            summary.failed += 1;
            warn!(partition, offset, reason = %why, "replayed record failed again");
            true
        }
        Resubmitted::Failed(why) => {
            summary.failed += 1;
            warn!(partition, offset, reason = %why, "replay failed; the record stays uncommitted");
            false
        }
        Resubmitted::Abandoned => false,
    }
}

/// The replay group's positions: per partition, the contiguous prefix of
/// records that are done.
#[derive(Default)]
struct Progress {
    trackers: HashMap<i32, PartitionTracker>,
    /// Positions that advanced since the last commit.
    pending: HashMap<i32, i64>,
    /// The latest position of every partition.
    latest: HashMap<i32, i64>,
}

impl Progress {
    fn start(&mut self, partition: i32, offset: i64) {
        self.trackers.entry(partition).or_default().start(offset);
    }

    fn done(&mut self, partition: i32, offset: i64) {
        if let Some(next) = self
            .trackers
            .get_mut(&partition)
            .and_then(|t| t.finish(offset))
        {
            self.pending.insert(partition, next);
            self.latest.insert(partition, next);
        }
    }
}

fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    to_commit: &mut HashMap<i32, i64>,
    mode: CommitMode,
) {
    if to_commit.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in to_commit.iter() {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => to_commit.clear(),
        Err(e) => warn!(error = %e, "committing the replay's progress failed; retried"),
    }
}

fn note_match(summary: &mut Summary, f: &Failure, partition: i32, offset: i64) {
    let class = f.get(dlq::ERROR_CLASS).unwrap_or("-");
    let reason = f.get(dlq::REASON).unwrap_or("-");
    *summary
        .by_reason
        .entry(format!("{class}: {reason}"))
        .or_default() += 1;
    if summary.sample.len() < SAMPLE {
        summary.sample.push(format!(
            "{}/{} session={} tenant={} {} failed_at={}",
            partition,
            offset,
            f.get(dlq::SESSION_ID).unwrap_or("-"),
            f.get(dlq::TENANT_ID).unwrap_or("-"),
            class,
            f.get(dlq::FAILED_AT).unwrap_or("-"),
        ));
    }
}

/// The group's committed offsets, asked again while the group's coordinator
/// is still being found or loaded (a new group on a new cluster answers
/// NOT_COORDINATOR for a moment), for up to 30 s.
fn committed_offsets(
    consumer: &StreamConsumer,
    tpl: &TopicPartitionList,
) -> rdkafka::error::KafkaResult<TopicPartitionList> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut delay = Duration::from_millis(100);
    loop {
        match consumer.committed_offsets(tpl.clone(), Timeout::After(Duration::from_secs(10))) {
            Err(KafkaError::MetadataFetch(
                C::NotCoordinator | C::CoordinatorLoadInProgress | C::CoordinatorNotAvailable,
            )) if Instant::now() + delay < deadline => {
                warn!(retry_in = ?delay, "the group coordinator is not ready yet; asking again");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            result => return result,
        }
    }
}

/// Where each partition of `topic` starts (the group's committed offset,
/// else the beginning) and ends (the high watermark now).
fn start_and_end(
    consumer: &StreamConsumer,
    topic: &str,
) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
    let timeout = Timeout::After(Duration::from_secs(30));
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let parts = md
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .with_context(|| format!("topic `{topic}` (kafka.dead_letter_topic) does not exist"))?
        .partitions()
        .len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(topic, p);
    }
    let committed = committed_offsets(consumer, &tpl)?;
    let mut out = HashMap::new();
    for p in 0..parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let start = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        out.insert(p, (start, high));
    }
    Ok(out)
}

fn failure_of(m: &BorrowedMessage<'_>) -> Failure {
    let mut headers = HashMap::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            if let Some(v) = h.value {
                headers.insert(h.key.to_string(), String::from_utf8_lossy(v).to_string());
            }
        }
    }
    Failure { headers }
}

/// The record to re-submit: the original key and value, the original
/// headers without `dlq.*`, `replay.count` incremented and `replay.from`;
/// its source is the original input record.
fn resubmission(m: &BorrowedMessage<'_>, f: &Failure, dlq_topic: &str) -> InRecord {
    let mut headers: Vec<(String, Option<Vec<u8>>)> = m
        .headers()
        .map(|hs| {
            hs.iter()
                .filter(|h| {
                    !h.key.starts_with(dlq::PREFIX)
                        && h.key != REPLAY_COUNT
                        && h.key != REPLAYED_FROM
                })
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    headers.push((
        REPLAY_COUNT.to_string(),
        Some((f.replay_count() + 1).to_string().into_bytes()),
    ));
    headers.push((
        REPLAYED_FROM.to_string(),
        Some(format!("{dlq_topic}/{}/{}", m.partition(), m.offset()).into_bytes()),
    ));
    InRecord {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
        source: Source {
            topic: f.get(dlq::SOURCE_TOPIC).unwrap_or_default().to_string(),
            partition: f.num(dlq::SOURCE_PARTITION).unwrap_or(-1),
            offset: f.num(dlq::SOURCE_OFFSET).unwrap_or(-1),
            timestamp_ms: f.num(dlq::SOURCE_TIMESTAMP),
        },
    }
}

/// Where re-submissions go.
#[derive(Clone)]
enum Target {
    Input {
        producer: FutureProducer,
        topic: String,
        timeout: Duration,
    },
    Direct(Arc<Enricher>),
}

impl Target {
    async fn new(settings: &Arc<Settings>, args: &ReplayArgs) -> anyhow::Result<Target> {
        if args.direct {
            let stats = Arc::new(Stats::default());
            return Ok(Target::Direct(Arc::new(
                Enricher::build(settings.clone(), stats).await?,
            )));
        }
        let k = &settings.kafka;
        let max_bytes = kafka::max_message_bytes(k, &[&k.input_topic]).await;
        Ok(Target::Input {
            producer: kafka::producer_config(k, max_bytes)
                .create()
                .context("creating the Kafka producer")?,
            topic: settings.kafka.input_topic.clone(),
            timeout: settings.kafka.produce_timeout,
        })
    }

    fn start_helpers(&self, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        match self {
            Target::Direct(e) => e.start_helpers(stop).into(),
            Target::Input { .. } => Vec::new(),
        }
    }

    async fn resubmit(&self, rec: InRecord, stop: CancellationToken) -> Resubmitted {
        match self {
            Target::Direct(enricher) => match enricher.process(rec, stop).await {
                Ok(Disposition::Enriched) => Resubmitted::Acknowledged,
                Ok(Disposition::DeadLettered(class)) => {
                    Resubmitted::DeadLetteredAgain(format!("dead-lettered again ({class})"))
                }
                Ok(Disposition::Abandoned) => Resubmitted::Abandoned,
                Err(e) => Resubmitted::Failed(format!("{e:#}")),
            },
            Target::Input {
                producer,
                topic,
                timeout,
            } => {
                let mut r = FutureRecord::<[u8], [u8]>::to(topic)
                    .payload(rec.payload.as_deref().unwrap_or_default())
                    .headers(rec.headers_without_dlq());
                if let Some(k) = &rec.key {
                    r = r.key(k);
                }
                match producer.send(r, Timeout::After(*timeout)).await {
                    Ok(_) => Resubmitted::Acknowledged,
                    Err((e, _)) => Resubmitted::Failed(format!("producing to {topic}: {e}")),
                }
            }
        }
    }
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} dead letters read, {per_sec}, eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(pairs: &[(&str, &str)]) -> Failure {
        Failure {
            headers: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn dead() -> Failure {
        failure(&[
            (dlq::ERROR_CLASS, "retries_exhausted"),
            (dlq::REASON, "errcode 10001: record not ready"),
            (dlq::ERRCODE, "10001"),
            (dlq::TENANT_ID, "t1"),
            (dlq::SESSION_ID, "s1"),
            (dlq::SOURCE_PARTITION, "2"),
            (dlq::SOURCE_OFFSET, "40"),
            (dlq::FAILED_AT, "2026-11-20T10:00:00.000Z"),
        ])
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        assert!(Filter::default().matches(&dead()));
        assert!(Filter::default().matches(&Failure::default()));
    }

    #[test]
    fn each_filter_selects_on_its_header() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let cases: Vec<(Filter, bool)> = vec![
            (
                Filter {
                    error_classes: vec!["retries_exhausted".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    error_classes: vec!["invalid_event".into()],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    reason_contains: Some("not ready".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    reason_contains: Some("token".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    errcodes: vec![40001, 10001],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    errcodes: vec![40001],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    tenants: vec!["t1".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    tenants: vec!["t2".into()],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    source_partitions: vec![2],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    source_partitions: vec![0, 1],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    source_offsets: Some((40, 41)),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    source_offsets: Some((0, 40)),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    failed_after: Some(t("2026-11-20T10:00:00Z")),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    failed_after: Some(t("2026-11-20T10:00:01Z")),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    failed_before: Some(t("2026-11-20T10:00:01Z")),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    failed_before: Some(t("2026-11-20T10:00:00Z")),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    sessions: Some(["s1".to_string()].into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    sessions: Some(["s2".to_string()].into()),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (f, want)) in cases.iter().enumerate() {
            assert_eq!(f.matches(&dead()), *want, "case {i}: {f:?}");
        }
        // A header the filter needs and the dead letter lacks: no match.
        let f = Filter {
            errcodes: vec![10001],
            ..Default::default()
        };
        assert!(!f.matches(&failure(&[(dlq::ERROR_CLASS, "invalid_event")])));
    }

    #[test]
    fn the_default_group_follows_the_filters() {
        let none = Filter::default();
        assert_eq!(none.default_group("g"), "g.replay");
        let a = Filter {
            tenants: vec!["t2".into(), "t1".into()],
            ..Default::default()
        };
        let b = Filter {
            tenants: vec!["t1".into(), "t2".into()],
            ..Default::default()
        };
        let c = Filter {
            tenants: vec!["t1".into()],
            ..Default::default()
        };
        assert!(a.default_group("g").starts_with("g.replay."));
        assert_eq!(
            a.default_group("g"),
            b.default_group("g"),
            "order does not matter"
        );
        assert_ne!(a.default_group("g"), c.default_group("g"));
    }

    #[test]
    fn offset_ranges_parse() {
        assert_eq!(parse_range("10..20"), Ok((10, 20)));
        assert!(parse_range("10-20").is_err());
        assert!(parse_range("a..2").is_err());
    }
}
