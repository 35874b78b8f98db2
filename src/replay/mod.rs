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
//!
//! - [`filter`]: which dead letters a run selects (`--error-class` …), and
//!   the replay group that follows from them.
//! - [`positions`]: where each partition starts and ends, and the progress
//!   committed under the replay group.
//! - [`resubmit`]: reading a dead letter back and re-submitting it.
//! - [`summary`]: what a run did, printed at the end, and the exit code.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::dead_letter::Stamp;
use crate::kafka;
use crate::pipeline::InRecord;
use crate::settings::Settings;

mod filter;
mod positions;
mod resubmit;
mod summary;

pub use filter::Filter;
pub use summary::Summary;

use positions::{Progress, commit, start_and_end};
use resubmit::{Resubmitted, Target, read_dead_letter, resubmission};
use summary::note_match;

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
    #[command(flatten)]
    pub filter: Filter,
}

/// `uincall-enricher replay`: runs until done or SIGTERM/SIGINT, prints
/// the summary; the exit code says how it went (see
/// [`Summary::exit_code`]).
pub async fn run(settings: Settings, args: ReplayArgs) -> ExitCode {
    let dry_run = args.dry_run;
    let result = match crate::shutdown::on_signals() {
        Ok(stop) => execute(settings, args, stop).await,
        Err(e) => Err(e.into()),
    };
    match result {
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
pub async fn execute(
    settings: Settings,
    mut args: ReplayArgs,
    stop: CancellationToken,
) -> anyhow::Result<Summary> {
    args.filter.read_sessions()?;
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
        kafka::check_connection(k).await?;
        let topic = k.dead_letter_topic.clone();
        let group = (args.group.clone()).unwrap_or_else(|| args.filter.default_group(&k.group_id));
        let consumer: StreamConsumer = kafka::replay_consumer_config(k, &group)
            .create()
            .map_err(kafka::config_error(k, "creating the replay consumer"))?;
        let consumer = Arc::new(consumer);
        let positions = {
            let (consumer, topic) = (consumer.clone(), topic.clone());
            tokio::task::spawn_blocking(move || start_and_end(&consumer, &topic)).await??
        };
        let total = positions.values().map(|(s, e)| (e - s).max(0) as u64).sum();
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
                    let Some((partition, offset, rec)) = self.accept(msg) else {
                        continue;
                    };
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

    /// A dead letter just read, when it is to be re-submitted.
    fn accept(&mut self, msg: KafkaResult<BorrowedMessage<'_>>) -> Option<(i32, i64, InRecord)> {
        match msg {
            Ok(m) => match self.take(&m) {
                Next::Resubmit(rec) => Some((m.partition(), m.offset(), rec)),
                Next::Done => None,
            },
            Err(e) => {
                warn!(error = %e, "reading the dead-letter topic failed; retrying");
                None
            }
        }
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
