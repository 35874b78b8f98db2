//! `replay`: re-submits dead letters after their cause is fixed.
//!
//! A run reads the dead-letter topic from where the last run of the same
//! replay group stopped up to the end offsets captured at its start (records
//! that arrive meanwhile wait for the next run), keeps what the filters
//! select, and either produces each record back to the input topic (key,
//! value and headers as they were, `dlq.*` dropped) or, with `--direct`,
//! enriches it right away (published, or dead-lettered again). Producing
//! follows the worker's produce policy: a transient error is retried, not
//! a failure. Progress is committed under the replay group only for records
//! whose re-submission the broker acknowledged, as the contiguous prefix per
//! partition: Ctrl-C and a rerun continue where it stopped. Each
//! re-submission carries `replay.count`; a dead letter already replayed
//! `--max-replays` times is reported, not replayed again (the loop guard).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::dead_letter::{ErrorClass, Stamp, header as dlq};
use crate::kafka;
use crate::offsets::PartitionTracker;
use crate::pipeline::{Disposition, Enricher, InRecord, Outgoing, Publisher};
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
    #[command(flatten)]
    pub filter: Filter,
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
    /// (default: `<kafka.group_id>.replay`, plus a digest of the filters
    /// when any is set).
    #[arg(long, value_name = "ID")]
    pub group: Option<String>,
    /// Re-submissions awaiting acknowledgement at once (with `--direct`,
    /// API calls also stay within `pipeline.max_in_flight`).
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
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

/// The session ids listed in a file, one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sessions(pub HashSet<String>);

fn read_sessions(path: &str) -> Result<Sessions, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    Ok(Sessions(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Which dead letters to replay: each filter that is set must match, by
/// the dead letter's `dlq.*` headers.
#[derive(Debug, Default, Clone, clap::Args)]
#[command(next_help_heading = "Filters")]
pub struct Filter {
    /// Only this error class (dlq.error_class); repeatable.
    #[arg(long = "error-class", value_name = "CLASS")]
    pub error_classes: Vec<ErrorClass>,
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
    #[arg(long, value_name = "FILE", value_parser = read_sessions)]
    pub sessions: Option<Sessions>,
}

impl Filter {
    /// The replay group when `--group` is not given:
    /// `<kafka.group_id>.replay`, plus a digest of the filters when any is
    /// set. A run with other filters then starts from the beginning instead
    /// of after the records an earlier run skipped; the same filters
    /// continue where they stopped.
    pub fn default_group(&self, group_id: &str) -> String {
        let parts = self.described();
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

    /// The filters that are set, as `name=values` (values sorted).
    fn described(&self) -> Vec<String> {
        fn texts<T: ToString>(values: impl IntoIterator<Item = T>) -> Vec<String> {
            values.into_iter().map(|v| v.to_string()).collect()
        }
        let offsets = self.source_offsets.map(|(a, b)| format!("{a}..{b}"));
        let sessions = self.sessions.iter().flat_map(|s| s.0.iter());
        [
            ("class", texts(&self.error_classes)),
            ("reason", texts(&self.reason_contains)),
            ("errcode", texts(&self.errcodes)),
            ("tenant", texts(&self.tenants)),
            ("after", texts(self.failed_after.map(|t| t.to_rfc3339()))),
            ("before", texts(self.failed_before.map(|t| t.to_rfc3339()))),
            ("partition", texts(&self.source_partitions)),
            ("offsets", texts(offsets)),
            ("sessions", texts(sessions)),
        ]
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, mut values)| {
            values.sort();
            format!("{name}={}", values.join(","))
        })
        .collect()
    }

    /// Whether the dead letter passes every filter that is set.
    pub fn matches(&self, d: &Stamp) -> bool {
        fn any_of<T: PartialEq>(allowed: &[T], v: Option<T>) -> bool {
            allowed.is_empty() || v.is_some_and(|v| allowed.contains(&v))
        }
        let reason = d.reason.as_deref();
        any_of(&self.error_classes, d.error_class)
            && (self.reason_contains.as_ref())
                .is_none_or(|t| reason.is_some_and(|r| r.contains(t.as_str())))
            && any_of(&self.errcodes, d.errcode)
            && any_of(&self.tenants, d.tenant_id.clone())
            && any_of(&self.source_partitions, d.source_partition)
            && (self.failed_after).is_none_or(|t| d.failed_at.is_some_and(|a| a >= t))
            && (self.failed_before).is_none_or(|t| d.failed_at.is_some_and(|a| a < t))
            && (self.source_offsets)
                .is_none_or(|(from, to)| d.source_offset.is_some_and(|o| o >= from && o < to))
            && (self.sessions.as_ref())
                .is_none_or(|set| d.session_id.as_ref().is_some_and(|s| set.0.contains(s)))
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

    /// 1 when a re-submission failed or a dead letter could not be
    /// replayed, 130 when interrupted, else 0.
    pub fn exit_code(&self) -> ExitCode {
        if self.failed > 0 || self.skipped_truncated > 0 {
            ExitCode::FAILURE
        } else if self.interrupted {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        }
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

/// `uincall-enricher replay`: runs, prints the summary; the exit code says
/// how it went (see [`Summary::exit_code`]).
pub async fn main(settings: Settings, args: ReplayArgs, stop: CancellationToken) -> ExitCode {
    let dry_run = args.dry_run;
    match run(settings, args, stop).await {
        Ok(summary) => {
            print!("{}", summary.render(dry_run));
            summary.exit_code()
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "replay failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a replay until the captured end offsets, the limit or `stop`.
pub async fn run(
    settings: Settings,
    args: ReplayArgs,
    stop: CancellationToken,
) -> anyhow::Result<Summary> {
    let settings = Arc::new(settings);
    let Some(mut replay) = Replay::open(&settings, args).await? else {
        return Ok(Summary::default());
    };
    let target = Target::new(&settings, &replay.args).await?;
    let helper_stop = stop.child_token();
    let helpers = target.start_helpers(&helper_stop);
    replay.run(&target, &stop).await;
    helper_stop.cancel();
    for h in helpers {
        let _ = h.await;
    }
    Ok(replay.summary)
}

/// A replay run's state.
struct Replay {
    args: ReplayArgs,
    consumer: Arc<StreamConsumer>,
    topic: String,
    /// Per partition: where the run starts and the end captured at start.
    positions: HashMap<i32, (i64, i64)>,
    /// Partitions not read to their captured end yet.
    open: HashSet<i32>,
    summary: Summary,
    progress: Progress,
    /// Re-submissions started (for `--limit`).
    started: u64,
    limiter: Option<DefaultDirectRateLimiter>,
    bar: ProgressBar,
    total: u64,
    last_log: Instant,
}

/// What to do with a dead letter just read.
enum Next {
    /// Done with it without re-submitting (skipped, or a dry run).
    Done,
    Resubmit(InRecord),
}

impl Replay {
    /// Finds where each partition starts and ends and assigns those with
    /// records to read; `None` when there is nothing to read.
    async fn open(settings: &Settings, args: ReplayArgs) -> anyhow::Result<Option<Replay>> {
        let k = &settings.kafka;
        let topic = k.dead_letter_topic.clone();
        let group = (args.group.clone()).unwrap_or_else(|| args.filter.default_group(&k.group_id));
        let consumer: StreamConsumer = kafka::replay_consumer_config(k, &group)
            .create()
            .context("creating the replay consumer")?;
        let consumer = Arc::new(consumer);
        let positions = {
            let (consumer, topic) = (consumer.clone(), topic.clone());
            tokio::task::spawn_blocking(move || start_and_end(&consumer, &topic)).await??
        };
        let total = positions.values().map(|(s, e)| (e - s) as u64).sum();
        info!(topic = %topic, group = %group, records = total, direct = args.direct, dry_run = args.dry_run, "replay started");
        let open: HashSet<i32> = (positions.iter())
            .filter(|(_, (s, e))| s < e)
            .map(|(p, _)| *p)
            .collect();
        if open.is_empty() {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        for p in &open {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(positions[p].0))?;
        }
        consumer.assign(&tpl)?;
        let limiter = (args.rate)
            .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
        Ok(Some(Replay {
            args,
            consumer,
            topic,
            positions,
            open,
            summary: Summary::default(),
            progress: Progress::default(),
            started: 0,
            limiter,
            bar: progress_bar(total),
            total,
            last_log: Instant::now(),
        }))
    }

    /// Reads, re-submits within the window and commits progress until
    /// every partition reached its captured end, the limit or `stop`.
    async fn run(&mut self, target: &Target, stop: &CancellationToken) {
        let consumer = self.consumer.clone();
        let mut in_flight = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let limit_reached = self.args.limit.is_some_and(|l| self.started >= l);
            let window = self.args.window as usize;
            let taking = !self.open.is_empty() && !limit_reached && in_flight.len() < window;
            if !taking && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.summary.interrupted = true;
                    break;
                }
                Some((partition, offset, result)) = in_flight.next() => {
                    if self.ended(partition, offset, result) {
                        // Committed as it goes, so a killed run re-submits
                        // at most about the window again.
                        commit(&self.consumer, &self.topic, &mut self.progress.pending, CommitMode::Async);
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
                    let Next::Resubmit(rec) = self.take(&m) else {
                        continue;
                    };
                    drop(m);
                    if !self.wait_for_rate(stop).await {
                        break;
                    }
                    self.started += 1;
                    let stop = stop.clone();
                    in_flight.push(async move {
                        (partition, offset, target.resubmit(rec, stop).await)
                    });
                }
                _ = tick.tick() => self.tick(),
            }
        }
        // Interrupted: what is in flight finishes (acknowledged, or
        // abandoned at once) so its progress can be committed.
        while let Some((partition, offset, result)) = in_flight.next().await {
            self.ended(partition, offset, result);
        }
        if !self.args.dry_run {
            // Every partition's latest position once more, synchronously:
            // an asynchronous commit that failed is made good here.
            let mut all = self.progress.latest.clone();
            commit(&self.consumer, &self.topic, &mut all, CommitMode::Sync);
        }
        self.bar.finish_and_clear();
    }

    /// Sorts one dead letter: past the captured end, filtered out, stopped
    /// by the loop guard, truncated, counted by a dry run, or re-submitted.
    fn take(&mut self, m: &BorrowedMessage<'_>) -> Next {
        let (partition, offset) = (m.partition(), m.offset());
        let end = self.positions[&partition].1;
        if offset + 1 >= end {
            self.open.remove(&partition);
            if offset >= end {
                return Next::Done;
            }
        }
        self.bar.inc(1);
        self.summary.read += 1;
        self.progress.start(partition, offset);
        let (stamp, replays) = read_dead_letter(m);
        if self.skipped(&stamp, replays, partition, offset) {
            self.progress.done(partition, offset);
            return Next::Done;
        }
        Next::Resubmit(resubmission(m, &stamp, replays, &self.topic))
    }

    /// Whether a dead letter is done without a re-submission (counted).
    fn skipped(&mut self, stamp: &Stamp, replays: u32, partition: i32, offset: i64) -> bool {
        let s = &mut self.summary;
        if !self.args.filter.matches(stamp) {
            s.skipped_by_filter += 1;
            return true;
        }
        s.matched += 1;
        let session_id = stamp.session_id.as_deref().unwrap_or("-");
        if replays >= self.args.max_replays {
            s.skipped_by_loop_guard += 1;
            warn!(
                partition,
                offset,
                session_id,
                replays,
                "not replayed again: the loop guard (--max-replays) stops it"
            );
            return true;
        }
        if let Some(t) = stamp.truncated {
            s.skipped_truncated += 1;
            let original = format!(
                "{}/{}@{}",
                stamp.source_topic.as_deref().unwrap_or("-"),
                text_or_dash(stamp.source_partition),
                text_or_dash(stamp.source_offset)
            );
            warn!(
                partition,
                offset,
                kept_bytes = t.to,
                original_bytes = t.original_size,
                original,
                "not replayed: the dead letter holds only the start of the original; it is on the input topic at the source offset while retention lasts"
            );
            return true;
        }
        if self.args.dry_run {
            note_match(s, stamp, partition, offset);
            return true;
        }
        false
    }

    /// Waits for `--rate`; `false` when `stop` came first.
    async fn wait_for_rate(&mut self, stop: &CancellationToken) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        tokio::select! {
            _ = stop.cancelled() => {
                self.summary.interrupted = true;
                false
            }
            _ = limiter.until_ready() => true,
        }
    }

    /// Counts how a re-submission ended; `true` when the record is done
    /// (its partition's progress moved).
    fn ended(&mut self, partition: i32, offset: i64, result: Resubmitted) -> bool {
        let s = &mut self.summary;
        let done = match result {
            Resubmitted::Acknowledged => {
                s.replayed += 1;
                true
            }
            Resubmitted::DeadLetteredAgain(why) => {
                s.failed += 1;
                warn!(partition, offset, reason = %why, "replayed record failed again");
                true
            }
            Resubmitted::Failed(why) => {
                s.failed += 1;
                warn!(partition, offset, reason = %why, "replay failed; the record stays uncommitted");
                false
            }
            Resubmitted::Abandoned => false,
        };
        if done {
            self.progress.done(partition, offset);
        }
        done
    }

    /// Once a second: partitions whose position reached the end are done
    /// (their last records may have been deleted by retention meanwhile),
    /// progress is committed, a log line every few seconds off a terminal.
    fn tick(&mut self) {
        if let Ok(assigned) = self.consumer.position() {
            for e in assigned.elements() {
                if let Offset::Offset(o) = e.offset()
                    && o >= self.positions[&e.partition()].1
                {
                    self.open.remove(&e.partition());
                }
            }
        }
        if !self.args.dry_run {
            commit(
                &self.consumer,
                &self.topic,
                &mut self.progress.pending,
                CommitMode::Async,
            );
        }
        if self.bar.is_hidden() && self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            let s = &self.summary;
            info!(
                read = s.read,
                replayed = s.replayed,
                of = self.total,
                "replay progress"
            );
        }
    }
}

fn text_or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
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

fn note_match(summary: &mut Summary, d: &Stamp, partition: i32, offset: i64) {
    let class = text_or_dash(d.error_class);
    let reason = d.reason.as_deref().unwrap_or("-");
    *summary
        .by_reason
        .entry(format!("{class}: {reason}"))
        .or_default() += 1;
    if summary.sample.len() < SAMPLE {
        summary.sample.push(format!(
            "{}/{} session={} tenant={} {} failed_at={}",
            partition,
            offset,
            d.session_id.as_deref().unwrap_or("-"),
            d.tenant_id.as_deref().unwrap_or("-"),
            class,
            text_or_dash(d.failed_at.map(crate::record::rfc3339)),
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

/// A dead letter's `dlq.*` headers and how often it was replayed before.
fn read_dead_letter(m: &BorrowedMessage<'_>) -> (Stamp, u32) {
    let Some(hs) = m.headers() else {
        return (Stamp::default(), 0);
    };
    let stamp = Stamp::read(hs.iter().map(|h| (h.key, h.value)));
    let replays = hs
        .iter()
        .find(|h| h.key == REPLAY_COUNT)
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        .unwrap_or(0);
    (stamp, replays)
}

/// The record to re-submit: the original key and value, the original
/// headers without `dlq.*`, `replay.count` incremented and `replay.from`;
/// its source is the original input record.
fn resubmission(m: &BorrowedMessage<'_>, d: &Stamp, replays: u32, dlq_topic: &str) -> InRecord {
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
        Some((replays + 1).to_string().into_bytes()),
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
            topic: d.source_topic.clone().unwrap_or_default(),
            partition: d.source_partition.unwrap_or(-1),
            offset: d.source_offset.unwrap_or(-1),
            timestamp_ms: d.source_timestamp,
        },
    }
}

/// Where re-submissions go.
#[derive(Clone)]
enum Target {
    /// Back to the input topic, produced as the worker produces.
    Input(Arc<Publisher>, String),
    Direct(Arc<Enricher>),
}

impl Target {
    async fn new(settings: &Arc<Settings>, args: &ReplayArgs) -> anyhow::Result<Target> {
        if args.direct {
            let stats = Arc::new(Stats::default());
            let enricher = Enricher::build(settings.clone(), stats).await?;
            return Ok(Target::Direct(Arc::new(enricher)));
        }
        let topic = settings.kafka.input_topic.clone();
        let publisher = Publisher::new(settings, &[&topic]).await?;
        Ok(Target::Input(Arc::new(publisher), topic))
    }

    fn start_helpers(&self, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        match self {
            Target::Direct(e) => e.start_helpers(stop),
            Target::Input(..) => Vec::new(),
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
            Target::Input(publisher, topic) => {
                let headers = rec.headers_without_dlq();
                let out = Outgoing {
                    topic,
                    key: rec.key.as_deref(),
                    payload: rec.payload.as_deref().unwrap_or_default(),
                    headers: &headers,
                };
                match publisher.send(out, &stop).await {
                    Ok(()) => Resubmitted::Acknowledged,
                    Err(crate::pipeline::ProduceError::Abandoned) => Resubmitted::Abandoned,
                    Err(e) => Resubmitted::Failed(format!("producing to {topic}: {e}")),
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

    fn failure(pairs: &[(&str, &str)]) -> Stamp {
        Stamp::read(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
    }

    fn dead() -> Stamp {
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
        assert!(Filter::default().matches(&Stamp::default()));
    }

    #[test]
    fn each_filter_selects_on_its_header() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let cases: Vec<(Filter, bool)> = vec![
            (
                Filter {
                    error_classes: vec![ErrorClass::RetriesExhausted],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    error_classes: vec![ErrorClass::InvalidEvent],
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
                    sessions: Some(Sessions(["s1".to_string()].into())),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    sessions: Some(Sessions(["s2".to_string()].into())),
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
