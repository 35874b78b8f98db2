//! The consume loop and its phases: consuming (records taken, enriched
//! concurrently, offsets stored as prefixes complete), draining (no new
//! records; those in flight get until `pipeline.drain_timeout`), done
//! (flush, commit, leave the group).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::Offset;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::util::Timeout;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::commit;
use super::context::WorkerContext;
use super::enrich::{Disposition, Enricher};
use super::flow::{Change, Flow};
use super::input::InRecord;
use super::outgoing::Origin;
use super::transactions::{GroupMetadata, Transactions};
use crate::kafka;
use crate::offsets::{Assignment, Place, Start, Ticket};
use crate::record::Source;
use crate::settings::{Delivery, Settings};
use crate::stats::Stats;
use crate::systemic::Cause;

/// How often a progress line is logged while records flow.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// How often a worker out of its group asks a fresh client whether the
/// cluster answers (an answer counts for 30 s, see `Stats::lost_place`).
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// How long the window may stay full before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// A record task's report to the consume loop (its offset is already
/// stored by then).
type Completion = Result<Disposition, anyhow::Error>;

/// Where the consume loop is.
enum Phase {
    /// Taking records, enriching, publishing.
    Consuming,
    /// Shutdown requested or a fatal error: no new records or attempts;
    /// those in flight may finish until the deadline.
    Draining {
        deadline: Instant,
        fatal: Option<anyhow::Error>,
    },
    /// Nothing left in flight: flush, commit, leave the group.
    Done { fatal: Option<anyhow::Error> },
}

impl Phase {
    fn drain(timeout: Duration, fatal: Option<anyhow::Error>) -> Phase {
        Phase::Draining {
            deadline: Instant::now() + timeout,
            fatal,
        }
    }
}

/// What the consume loop keeps while consuming and draining.
struct Running {
    tasks: JoinSet<Completion>,
    flow: Flow,
    systemic: watch::Receiver<Option<Cause>>,
    /// Cancelled when draining starts: no new attempts, no backoff waits.
    stop_work: CancellationToken,
    helpers: Vec<JoinHandle<()>>,
    progress: Every,
    /// Once a second: idle partitions settled, membership checked; also
    /// wakes an idle loop, so liveness reflects a loop that runs.
    heartbeat: Every,
    /// `kafka.commit_interval`: commits what finished since the last one.
    commit: Every,
}

/// Work due by the clock in the consume loop. Its tick only wakes an idle
/// loop: a busy one (a record or a completion ready at every turn) never
/// reaches the tick's arm of the biased `select!`, so [`Every::due`] is
/// asked at every turn.
struct Every {
    tick: Interval,
    at: Instant,
    period: Duration,
}

impl Every {
    fn starting(at: Instant, period: Duration) -> Every {
        Every {
            tick: tokio::time::interval_at(at, period),
            at,
            period,
        }
    }

    /// Whether the time came; the next is then one period from `now`.
    fn due(&mut self, now: Instant) -> bool {
        if now < self.at {
            return false;
        }
        self.at = now + self.period;
        self.tick.reset();
        true
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The enrichment worker.
pub struct Worker {
    settings: Arc<Settings>,
    consumer: Arc<StreamConsumer<WorkerContext>>,
    enricher: Arc<Enricher>,
    assignment: Arc<Assignment>,
    /// `kafka.delivery = "exactly_once"`: outputs and offsets are committed
    /// in transactions (and never by the consumer).
    transactions: Option<Arc<Transactions>>,
    stats: Arc<Stats>,
    /// When a fresh client last asked the cluster for its metadata.
    probed_at: std::sync::Mutex<Option<Instant>>,
}

impl Worker {
    /// Creates the clients and checks that the three topics exist.
    pub async fn build(settings: Settings, stats: Arc<Stats>) -> anyhow::Result<Worker> {
        let settings = Arc::new(settings);
        let k = &settings.kafka;
        kafka::check_connection(k).await?;
        let assignment = Arc::new(Assignment::new(k.commit_metadata_max_bytes));
        let exactly_once = k.delivery == Delivery::ExactlyOnce;
        let context = WorkerContext::new(
            assignment.clone(),
            stats.clone(),
            settings.pipeline.revoke_drain,
            !exactly_once,
        );
        let consumer: StreamConsumer<WorkerContext> = kafka::consumer_config(k)
            .create_with_context(context)
            .map_err(kafka::config_error(k, "creating the Kafka consumer"))?;
        let consumer = Arc::new(consumer);
        let mut enricher = Enricher::build(settings.clone(), stats.clone()).await?;
        let mut transactions = None;
        if exactly_once {
            let of = consumer.clone();
            let group: GroupMetadata = Box::new(move || of.group_metadata());
            let max = enricher.max_message_bytes();
            let started =
                Transactions::start(&settings, stats.clone(), assignment.clone(), group, max);
            let started = Arc::new(started.await?);
            enricher = enricher.with_transactions(started.clone());
            transactions = Some(started);
        }
        let worker = Worker {
            settings,
            consumer,
            enricher: Arc::new(enricher),
            assignment,
            transactions,
            stats,
            probed_at: std::sync::Mutex::default(),
        };
        worker.check_topics().await?;
        Ok(worker)
    }

    async fn check_topics(&self) -> anyhow::Result<()> {
        let k = &self.settings.kafka;
        let consumer = self.consumer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(None, Timeout::After(Duration::from_secs(30)))
        })
        .await?
        .with_context(|| format!("reading metadata from kafka.brokers {}", k.brokers))?;
        for (key, topic) in [
            ("kafka.input_topic", &k.input_topic),
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
        ] {
            let found = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !found {
                bail!(
                    "topic `{topic}` ({key}) does not exist on {}; create it first",
                    k.brokers
                );
            }
        }
        Ok(())
    }

    /// Consumes until `shutdown` fires (or a fatal error), then drains
    /// within `pipeline.drain_timeout`, flushes, commits and leaves the
    /// group.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut run = self.start()?;
        let mut phase = Phase::Consuming;
        loop {
            phase = match phase {
                Phase::Consuming => self.consume(&mut run, &shutdown).await,
                Phase::Draining { deadline, fatal } => {
                    run.stop_work.cancel();
                    for h in run.helpers.drain(..) {
                        let _ = h.await;
                    }
                    self.drain(&mut run.tasks, deadline).await;
                    // What did not finish stays uncommitted; closing must
                    // not wait `revoke_drain` for tasks that are gone.
                    let abandoned = self.assignment.abandon_pending();
                    if abandoned > 0 {
                        info!(
                            abandoned,
                            "records unfinished at shutdown: not committed, re-delivered to the next owner"
                        );
                    }
                    Phase::Done { fatal }
                }
                Phase::Done { fatal } => {
                    self.finish().await;
                    if fatal.is_some() {
                        // A consumer that lost its way may never finish
                        // closing (librdkafka waits for a group coordinator
                        // it cannot find): the process's exit ends it.
                        std::mem::forget(self.consumer.clone());
                    }
                    return fatal.map_or(Ok(()), Err);
                }
            };
        }
    }

    /// Subscribes and starts the helpers (probe, token reload).
    fn start(&self) -> anyhow::Result<Running> {
        let s = &self.settings;
        self.consumer
            .subscribe(&[&s.kafka.input_topic])
            .context("subscribing to kafka.input_topic")?;
        info!(
            topic = %s.kafka.input_topic,
            group = %s.kafka.group_id,
            max_in_flight = s.pipeline.max_in_flight,
            "worker started"
        );
        let stop_work = CancellationToken::new();
        let pause_after = PAUSE_AFTER.min(s.kafka.max_poll_interval / 2);
        let start = Instant::now();
        Ok(Running {
            tasks: JoinSet::new(),
            flow: Flow::new(s.pipeline.max_in_flight, pause_after),
            systemic: self.enricher.breaker().subscribe(),
            helpers: self.enricher.start_helpers(&stop_work),
            stop_work,
            progress: Every::starting(start + PROGRESS_EVERY, PROGRESS_EVERY),
            heartbeat: Every::starting(start, Duration::from_secs(1)),
            commit: Every::starting(start + s.kafka.commit_interval, s.kafka.commit_interval),
        })
    }

    /// The consuming phase: each `select!` arm handles one event, then the
    /// flow decision is applied; returns the next phase.
    async fn consume(&self, run: &mut Running, shutdown: &CancellationToken) -> Phase {
        let drain_timeout = self.settings.pipeline.drain_timeout;
        loop {
            let in_flight = self.admitted(&run.tasks);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    info!(in_flight = run.tasks.len(), "shutdown requested, draining");
                    return Phase::drain(drain_timeout, None);
                }
                Some(joined) = run.tasks.join_next(), if !run.tasks.is_empty() => {
                    if let Err(e) = complete(joined) {
                        error!(error = format!("{e:#}"), "fatal error, stopping the worker");
                        return Phase::drain(drain_timeout, Some(e));
                    }
                }
                msg = self.consumer.recv(), if run.flow.takes_records(in_flight) => match msg {
                    Ok(m) => self.spawn(&mut run.tasks, &m, &run.stop_work),
                    Err(e) => if let Err(fatal) = self.consume_error(e) {
                        error!(error = format!("{fatal:#}"), "stopping the worker so that it is restarted");
                        return Phase::drain(drain_timeout, Some(fatal));
                    },
                },
                _ = sleep_until_some(run.flow.wake_at()) => {}
                Ok(()) = run.systemic.changed() => {
                    run.systemic.borrow_and_update();
                }
                _ = run.progress.tick.tick() => {}
                _ = run.heartbeat.tick.tick() => {}
                _ = run.commit.tick.tick() => {}
            }
            let now = Instant::now();
            if let Err(e) = self.on_time(run, now) {
                error!(
                    error = format!("{e:#}"),
                    "stopping the worker so that it is restarted"
                );
                return Phase::drain(drain_timeout, Some(e));
            }
            self.stats.beat();
            self.stats.set_in_flight(run.tasks.len());
            let (held, over_share) = self.enricher.waiting_records();
            self.stats.set_records_waiting(held, over_share);
            let in_flight = self.admitted(&run.tasks);
            let systemic = run.systemic.borrow().is_some();
            if let Some(change) = run.flow.decide(in_flight, now, systemic) {
                self.apply(change, &mut run.flow, in_flight);
            }
        }
    }

    /// The work due by the clock ([`Every`]): the progress line, the
    /// commit, and the heartbeat (idle partitions settled, membership
    /// checked: `Err` when the worker lost its place for good).
    fn on_time(&self, run: &mut Running, now: Instant) -> anyhow::Result<()> {
        if run.progress.due(now) {
            self.log_progress(run.tasks.len());
        }
        if let Some(e) = self.transactions.as_ref().and_then(|t| t.failure()) {
            bail!("the transactional producer failed for good: {e}");
        }
        if run.commit.due(now) && self.transactions.is_none() {
            self.commit_finished();
        }
        if run.heartbeat.due(now) {
            self.settle_idle_partitions(&run.stop_work);
            self.check_membership()?;
        }
        Ok(())
    }

    /// An error the consumer delivered instead of a record: counted by code
    /// and logged (at most every 10 s per code); `Err` when it is fatal (the
    /// consumer must be made anew: the worker stops and is restarted).
    /// librdkafka 2.12 neither skips a corrupt batch nor says where it is:
    /// the partition stops there, repeating the error, until its offset is
    /// moved past it (docs/operations.md, UincallEnricherStalled).
    fn consume_error(&self, e: KafkaError) -> anyhow::Result<()> {
        if self.stats.consume_error(e.rdkafka_error_code()) {
            warn!(error = %e, "kafka consume error (logged at most every 10 s per code; counted in uincall_enricher_consume_errors_total)");
        }
        match e {
            KafkaError::MessageConsumptionFatal(code) => Err(anyhow::anyhow!(
                "the Kafka consumer failed for good: {code}"
            )),
            _ => Ok(()),
        }
    }

    /// Fails when the worker's consumer has had no group coordinator, or no
    /// partition while not settled in its group, for `kafka.rejoin_timeout`
    /// while the cluster answers, or while it knows no broker at all: it
    /// lost its place and did not find it again, and a restart (a new
    /// consumer) does. `/healthz` says the same.
    fn check_membership(&self) -> anyhow::Result<()> {
        let limit = self.settings.kafka.rejoin_timeout;
        if let Some(why) = self.stats.lost_place(limit) {
            bail!(why);
        }
        if self.stats.unsettled_for().is_some_and(|(d, _)| d >= limit) {
            // Out of its group, but its own consumer sees no broker:
            // whether the cluster answers a fresh client tells an outage
            // from a consumer that lost its way.
            self.probe_cluster();
        }
        Ok(())
    }

    /// Asks the cluster for its metadata with a fresh client, at most every
    /// [`PROBE_EVERY`], in the background; an answer is noted in the stats.
    fn probe_cluster(&self) {
        let mut probed_at = self.probed_at.lock().unwrap();
        if probed_at.is_some_and(|t| t.elapsed() < PROBE_EVERY) {
            return;
        }
        *probed_at = Some(Instant::now());
        let (settings, stats) = (self.settings.clone(), self.stats.clone());
        tokio::spawn(async move {
            if kafka::cluster_answers(&settings.kafka, Duration::from_secs(5)).await {
                stats.cluster_answered();
            }
        });
    }

    /// Records counted against the window: all in flight but those waiting
    /// for a held tenant or for their tenant's share of the window, up to
    /// `pipeline.max_held_records` of them, and (with transactions) those
    /// whose output waits for its transaction, up to `max_in_flight`.
    fn admitted(&self, tasks: &JoinSet<Completion>) -> usize {
        let (held, over_share) = self.enricher.waiting_records();
        let held = held + over_share;
        let p = &self.settings.pipeline;
        let staged = self.transactions.as_ref().map_or(0, |t| t.waiting());
        let aside = held.min(p.max_held_records) + staged.min(p.max_in_flight);
        tasks.len().saturating_sub(aside)
    }

    /// Starts a task for one record; it stores its own offset when done.
    fn spawn(
        &self,
        tasks: &mut JoinSet<Completion>,
        m: &BorrowedMessage<'_>,
        stop: &CancellationToken,
    ) {
        let mut rec = InRecord::from_message(m);
        self.stats.record_consumed();
        let src = &rec.source;
        let ticket = match (self.assignment).start(&src.topic, src.partition, src.offset, stop) {
            Start::Run(ticket) => ticket,
            Start::FinishedBefore(moved) => {
                self.stats.record_finished_before();
                if moved.is_some() {
                    position_moved(&self.stats, &src.topic, src.partition);
                }
                return;
            }
        };
        if self.transactions.is_some() {
            rec.origin = Some(origin_of(src, &ticket));
        }
        let enricher = self.enricher.clone();
        let (assignment, stats) = (self.assignment.clone(), self.stats.clone());
        tasks.spawn(async move {
            let source = rec.source.clone();
            // Once the partition is revoked (past `revoke_drain`) the
            // record is its next owner's: the work is dropped where it
            // stands, a call under way too, and nothing more is written.
            let result = tokio::select! {
                biased;
                () = ticket.revoked.cancelled() => Ok(Disposition::Abandoned),
                result = enricher.process(rec, ticket.cancel.clone()) => result,
            };
            match &result {
                Ok(
                    Disposition::Enriched
                    | Disposition::DeadLettered(_)
                    | Disposition::Unwritable(_),
                ) => finished(&assignment, &stats, &source, &ticket),
                // The position never passes it; outputs behind it that wait
                // for a transaction are given up too.
                Ok(Disposition::Abandoned) => {
                    let s = &source;
                    assignment.give_up(&s.topic, s.partition, s.offset, ticket.id)
                }
                Err(_) => {}
            }
            result
        });
    }

    /// Pauses or resumes every assigned partition (and, through the
    /// context, those assigned later). A change the consumer refuses is
    /// decided again at the next turn of the loop.
    fn apply(&self, change: Change, flow: &mut Flow, in_flight: usize) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let pause = change == Change::Pause;
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = result {
            warn!(error = %e, "pause/resume failed");
            return;
        }
        debug!(paused = pause, in_flight, "flow control");
        flow.applied(change);
        self.consumer.context().set_paused(pause);
        self.stats.set_paused(pause);
    }

    /// Stores the consumer's position for partitions with nothing in
    /// flight: past transaction markers (which deliver no record), so a
    /// transactionally written input shows no lag once all is done.
    fn settle_idle_partitions(&self, stop: &CancellationToken) {
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        let positions = positions
            .elements()
            .into_iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
                _ => None,
            });
        let settled = self.assignment.settle(positions, stop);
        for (topic, partition) in &settled {
            position_moved(&self.stats, topic, *partition);
        }
        if !settled.is_empty() {
            debug!(
                partitions = settled.len(),
                "idle partitions settled at the consumer position"
            );
        }
    }

    /// Commits the partitions where something finished since the last
    /// commit (asynchronously: the outcome reaches the commit callback).
    fn commit_finished(&self) {
        let commits = self.assignment.commits(false);
        if let Err(e) = commit::commit(&*self.consumer, &commits, CommitMode::Async) {
            warn!(error = %e, "offset commit not sent; it is sent again at the next interval");
            (self.assignment)
                .commit_failed(commits.iter().map(|c| (c.topic.as_str(), c.partition)));
        }
    }

    /// The draining phase: waits for the records in flight until
    /// `deadline`, then abandons the rest (re-delivered after a restart).
    async fn drain(&self, tasks: &mut JoinSet<Completion>, deadline: Instant) {
        while !tasks.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // Finished records stored their offsets already.
                    warn!(abandoned = tasks.len(), "drain deadline reached; abandoned records will be re-delivered");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
                Some(joined) = tasks.join_next() => {
                    if let Err(e) = complete(joined) {
                        error!(error = format!("{e:#}"), "error while draining");
                    }
                }
            }
        }
    }

    /// The done phase: flush the producer, commit once more (in a last
    /// transaction with them), leave.
    async fn finish(&self) {
        if let Err(e) = self.enricher.flush(Duration::from_secs(10)).await {
            warn!(error = %e, "producer flush incomplete");
        }
        match &self.transactions {
            Some(transactions) => transactions.close().await,
            None => self.commit_all().await,
        }
        self.consumer.unsubscribe();
        self.log_progress(0);
        info!("worker stopped");
    }

    /// Commits every partition's position, waiting for the answer.
    async fn commit_all(&self) {
        let consumer = self.consumer.clone();
        let commits = self.assignment.commits(true);
        let committed = tokio::task::spawn_blocking(move || {
            commit::commit(&*consumer, &commits, CommitMode::Sync)
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled));
        if let Err(e) = committed {
            warn!(error = %e, "final commit failed; uncommitted records will be re-delivered")
        }
    }

    fn log_progress(&self, in_flight: usize) {
        let st = &self.stats;
        info!(
            consumed = st.consumed(),
            enriched = st.enriched(),
            dead_lettered = st.dead_lettered_total(),
            retries = st.retries(),
            systemic_failure = st.is_systemic(),
            in_flight,
            "progress"
        );
    }
}

/// Whose output a record's is, for its transaction.
fn origin_of(src: &Source, ticket: &Ticket) -> Origin {
    let place = Place {
        topic: src.topic.clone(),
        partition: src.partition,
        offset: src.offset,
        id: ticket.id,
    };
    let revoked = ticket.revoked.clone();
    Origin { place, revoked }
}

/// Finishes a record in its partition's tracker (committed with the next
/// commit).
fn finished(assignment: &Assignment, stats: &Stats, src: &Source, ticket: &Ticket) {
    let moved = assignment.finish(&src.topic, src.partition, src.offset, ticket.id);
    if moved.is_some() {
        position_moved(stats, &src.topic, src.partition);
    }
}

fn position_moved(stats: &Stats, topic: &str, partition: i32) {
    stats.partition_moved(topic, partition);
    stats.offset_stored();
}

/// A record task's end, as the consume loop sees it: an aborted task is an
/// abandoned record; a panic is a bug that must not advance the offset, and
/// a fatal error stops the worker (the record is re-delivered).
fn complete(joined: Result<Completion, tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(result) => result.map(|_| ()),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => bail!("a record task panicked: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_by_the_clock_is_due_once_per_period_from_when_it_ran() {
        let start = Instant::now();
        let mut every = Every::starting(start + Duration::from_secs(5), Duration::from_secs(5));
        assert!(!every.due(start));
        assert!(!every.due(start + Duration::from_millis(4_999)));
        // A busy loop asks late: it runs once, and the next is a period on.
        let late = start + Duration::from_secs(12);
        assert!(every.due(late));
        assert!(!every.due(late));
        assert!(!every.due(late + Duration::from_millis(4_999)));
        assert!(every.due(late + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_tick_wakes_an_idle_loop_at_the_due_time() {
        let start = Instant::now();
        let mut every = Every::starting(start + Duration::from_secs(1), Duration::from_secs(1));
        every.tick.tick().await;
        assert!(every.due(Instant::now()));
        // After it ran, the tick waits a whole period again.
        every.tick.tick().await;
        assert!(every.due(Instant::now()));
        assert!(Instant::now() >= start + Duration::from_secs(2));
    }
}
