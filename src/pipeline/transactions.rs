//! Exactly once (`kafka.delivery = "exactly_once"`): a record task hands its
//! output (the enriched record or the dead letter) to the transaction task
//! and waits. Every `kafka.transaction_interval`, or as soon as
//! `kafka.transaction_max_records` outputs came, that task commits in one
//! Kafka transaction the outputs whose partition is done below them, with
//! the input offsets past them (`send_offsets_to_transaction` with the
//! consumer's group metadata, KIP-447). Outputs that finish early wait,
//! bounded by the window.
//!
//! - A `read_committed` reader sees an output exactly when its input
//!   offset is committed: a crash, a rebalance or an abort re-delivers it
//!   and nothing of it was visible.
//! - A transaction the brokers refuse to commit is aborted and its outputs
//!   sent again in a new one, without those of partitions revoked
//!   meanwhile (their next owner writes them).
//! - A replica that lost its partitions (frozen past its session) cannot
//!   commit their offsets: its generation is stale, its transaction is
//!   aborted. One restarted with the same `transactional.id` fences the
//!   one before it. A fenced or failed producer stops the worker (exit 1);
//!   its outputs never become dead letters.
//! - An output the producer refuses (too large) is answered `Rejected`, so
//!   the record's task writes its dead letter instead, as without
//!   transactions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::commit;
use super::outgoing::{Origin, Outgoing, ProduceError};
use crate::kafka::{self, Logged};
use crate::offsets::{Assignment, Commit, Place};
use crate::producer::{ProducePolicy, produce_policy};
use crate::settings::Settings;
use crate::stats::{Stats, TransactionEnd};

/// The consumer's group metadata now (`None` while it has none).
pub type GroupMetadata = Box<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>;

type Reply = Result<(), ProduceError>;

/// An output waiting for its transaction.
struct Staged {
    origin: Origin,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: OwnedHeaders,
    reply: oneshot::Sender<Reply>,
}

/// The transaction task's handle.
pub struct Transactions {
    staged: mpsc::UnboundedSender<Staged>,
    /// Outputs handed over and not yet answered.
    waiting: Arc<AtomicUsize>,
    /// The error that stopped the transactional producer for good.
    failed: Arc<OnceLock<KafkaError>>,
    closing: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Transactions {
    /// Creates the transactional producer (fencing an earlier one with the
    /// same `transactional.id`) and starts the transaction task.
    pub async fn start(
        settings: &Settings,
        stats: Arc<Stats>,
        assignment: Arc<Assignment>,
        group: GroupMetadata,
        max_message_bytes: Option<usize>,
    ) -> anyhow::Result<Transactions> {
        let k = &settings.kafka;
        let config = kafka::transactional_producer_config(k, max_message_bytes);
        let producer: FutureProducer<Logged> =
            config
                .create_with_context(Logged)
                .map_err(kafka::config_error(
                    k,
                    "creating the transactional producer",
                ))?;
        let producer = Arc::new(producer);
        let id = kafka::transactional_id(k);
        let init = producer.clone();
        let timeout = k.transaction_timeout;
        tokio::task::spawn_blocking(move || init.init_transactions(timeout))
            .await?
            .with_context(|| {
                format!(
                    "starting transactions as kafka.transactional_id `{id}` \
                     (the principal needs Write and Describe on that TransactionalId)"
                )
            })?;
        info!(transactional_id = %id, "exactly once: outputs and input offsets are committed in Kafka transactions");
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(OnceLock::new());
        let closing = CancellationToken::new();
        let coordinator = Coordinator {
            producer,
            assignment,
            stats,
            group,
            timeout: k.produce_timeout,
            interval: k.transaction_interval,
            max_records: k.transaction_max_records,
            waiting: BTreeMap::new(),
            came: 0,
            failed: failed.clone(),
            closing: closing.clone(),
        };
        let task = tokio::spawn(coordinator.run(rx));
        Ok(Transactions {
            staged: tx,
            waiting: Arc::default(),
            failed,
            closing,
            task: Mutex::new(Some(task)),
        })
    }

    /// Hands `out`, the output of the record at `origin`, to the next
    /// transaction that may carry it; returns once that is committed
    /// (`Abandoned` when the partition was revoked first). Shutdown does not
    /// end the wait: outputs are committed while the worker drains.
    pub async fn stage(&self, out: Outgoing<'_>, origin: &Origin) -> Reply {
        if let Some(e) = self.failed.get() {
            return Err(ProduceError::Fatal(e.clone()));
        }
        let (reply, answer) = oneshot::channel();
        let staged = Staged {
            origin: origin.clone(),
            topic: out.topic.to_string(),
            key: out.key.map(<[u8]>::to_vec),
            payload: out.payload.to_vec(),
            headers: out.headers.clone(),
            reply,
        };
        if self.staged.send(staged).is_err() {
            return Err(ProduceError::Abandoned);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _answered = Answered(&self.waiting);
        tokio::select! {
            biased;
            answered = answer => answered.unwrap_or(Err(ProduceError::Abandoned)),
            () = origin.revoked.cancelled() => Err(ProduceError::Abandoned),
        }
    }

    /// Outputs waiting for their transaction now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The error that stopped the transactions, if one did.
    pub fn failure(&self) -> Option<KafkaError> {
        self.failed.get().cloned()
    }

    /// Commits what is ready and the offsets due in a last transaction,
    /// then stops the task.
    pub async fn close(&self) {
        self.closing.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Counts an output's wait off when it ends, however it ends.
struct Answered<'a>(&'a AtomicUsize);

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a transaction did not commit.
enum Failure {
    /// The producer refused these outputs (by their index in the batch):
    /// they never fit.
    Rejected(Vec<(usize, KafkaError)>),
    /// Aborted: its outputs may be sent again in a new transaction.
    Aborted(KafkaError),
    /// The producer cannot go on.
    Fatal(KafkaError),
}

impl Failure {
    fn of(e: KafkaError) -> Failure {
        match &e {
            KafkaError::Transaction(t) if t.is_fatal() => Failure::Fatal(e),
            KafkaError::Transaction(t) if t.txn_requires_abort() || t.is_retriable() => {
                Failure::Aborted(e)
            }
            // Any other transactional error is a state the producer should
            // never be in: a fresh process starts from a clean one.
            KafkaError::Transaction(_) => Failure::Fatal(e),
            _ => Failure::Aborted(e),
        }
    }
}

/// The pauses before a transaction or a call is tried again: 100 ms
/// doubling to 5 s.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .build()
}

/// Whether librdkafka says the transactional call that returned `e` may be
/// made again: a commit or an abort that timed out goes on in the
/// background and the same call resumes it.
fn resumable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t)
        if t.is_retriable() && !t.txn_requires_abort() && !t.is_fatal())
}

/// The transaction task.
struct Coordinator {
    producer: Arc<FutureProducer<Logged>>,
    assignment: Arc<Assignment>,
    stats: Arc<Stats>,
    group: GroupMetadata,
    /// Limit of each blocking call (`kafka.produce_timeout`).
    timeout: Duration,
    interval: Duration,
    max_records: usize,
    /// Outputs by partition tracker, by input offset.
    waiting: BTreeMap<(String, i32, u64), BTreeMap<i64, Staged>>,
    /// Outputs that came since the last transaction.
    came: usize,
    failed: Arc<OnceLock<KafkaError>>,
    closing: CancellationToken,
}

impl Coordinator {
    async fn run(mut self, mut staged: mpsc::UnboundedReceiver<Staged>) {
        let mut next = Instant::now() + self.interval;
        loop {
            tokio::select! {
                biased;
                () = self.closing.cancelled() => break,
                s = staged.recv() => match s {
                    Some(s) => self.hold(s),
                    None => break,
                },
                () = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() < next && self.came < self.max_records {
                continue;
            }
            // Everything handed over meanwhile goes into this one.
            while let Ok(s) = staged.try_recv() {
                self.hold(s);
            }
            // The interval runs from a transaction's start: one that took
            // longer is followed at once by the next.
            let began = Instant::now();
            if self.transact().await.is_err() {
                return;
            }
            next = began + self.interval;
        }
        while let Ok(s) = staged.try_recv() {
            self.hold(s);
        }
        let _ = self.transact().await;
    }

    fn hold(&mut self, s: Staged) {
        if s.origin.revoked.is_cancelled() {
            return;
        }
        let p = &s.origin.place;
        let key = (p.topic.clone(), p.partition, p.id);
        let offset = p.offset;
        self.waiting.entry(key).or_default().insert(offset, s);
        self.came += 1;
    }

    /// Takes the outputs with everything below them in their partition
    /// done; answers those that never can be (behind a record given up),
    /// drops those of revoked partitions (their tasks ended).
    fn take_ready(&mut self) -> Vec<Staged> {
        let assignment = &self.assignment;
        let mut batch = Vec::new();
        self.waiting.retain(|(topic, partition, id), staged| {
            let Some(ready) = assignment.ready(topic, *partition, *id, |o| staged.contains_key(&o))
            else {
                return false;
            };
            if let Some(from) = ready.given_up_from {
                for s in staged.split_off(&from).into_values() {
                    let _ = s.reply.send(Err(ProduceError::Abandoned));
                }
            }
            let rest = match ready.below {
                Some(below) => staged.split_off(&below),
                None => BTreeMap::new(),
            };
            batch.extend(std::mem::replace(staged, rest).into_values());
            !staged.is_empty()
        });
        batch
    }

    /// One transaction of what is ready (and the offsets due), sent again
    /// after an abort; `Err` once the producer failed for good.
    async fn transact(&mut self) -> Result<(), ()> {
        self.came = 0;
        let mut batch = self.take_ready();
        let mut delays = retry_delays();
        loop {
            // The group's generation is taken before the partitions still
            // owned are: a transaction that carries a partition revoked
            // afterwards sends its offsets with the generation before the
            // revocation, which the coordinator refuses once the partition
            // moved (KIP-447), and is aborted. Taken later, the next
            // generation would commit offsets of a partition another
            // replica already reads from the old ones.
            let group = (self.group)();
            batch.retain(|s| !s.origin.revoked.is_cancelled());
            let places: Vec<Place> = batch.iter().map(|s| s.origin.place.clone()).collect();
            let commits = self.assignment.commits_finishing(&places);
            if batch.is_empty() && commits.is_empty() {
                return Ok(());
            }
            let began = Instant::now();
            let error = match self.attempt(&batch, &commits, group).await {
                Ok(()) => {
                    self.assignment.committed(&places, &commits);
                    // The consumer's own statistics never see these.
                    for c in &commits {
                        (self.stats).committed_in_transaction(&c.topic, c.partition, c.offset);
                    }
                    self.stats
                        .transaction(TransactionEnd::Committed(began.elapsed()));
                    for s in batch {
                        let _ = s.reply.send(Ok(()));
                    }
                    return Ok(());
                }
                Err(Failure::Rejected(rejected)) => {
                    self.stats.transaction(TransactionEnd::Aborted);
                    self.answer_rejected(batch, rejected);
                    return Ok(());
                }
                Err(Failure::Fatal(e)) => {
                    self.fail(batch, e);
                    return Err(());
                }
                Err(Failure::Aborted(e)) => e,
            };
            self.stats.transaction(TransactionEnd::Aborted);
            if self.closing.is_cancelled() {
                warn!(error = %error, records = batch.len(), "the last transaction did not commit while the worker stopped: unless it still commits in the background, it is aborted and its records are re-delivered to the partitions' next owner");
                return Ok(());
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            warn!(error = %error, records = batch.len(), retry_in = ?delay, "transaction aborted; its outputs are sent again in a new one");
            tokio::time::sleep(delay).await;
        }
    }

    /// Answers the outputs the producer refused; the others wait again.
    fn answer_rejected(&mut self, batch: Vec<Staged>, mut rejected: Vec<(usize, KafkaError)>) {
        for (i, s) in batch.into_iter().enumerate() {
            match rejected.iter().position(|(r, _)| *r == i) {
                Some(at) => {
                    let (_, e) = rejected.swap_remove(at);
                    let _ = s.reply.send(Err(ProduceError::Rejected(e)));
                }
                None => self.hold(s),
            }
        }
    }

    /// The producer failed for good: every output waiting is answered so,
    /// and later ones too ([`Transactions::stage`]).
    fn fail(&mut self, batch: Vec<Staged>, e: KafkaError) {
        self.stats.transaction(TransactionEnd::Failed);
        error!(error = %e, "the transactional producer failed for good (fenced by a newer producer with the same kafka.transactional_id, or its state was lost): the worker stops; nothing of the open transaction becomes visible");
        let _ = self.failed.set(e.clone());
        let waiting = std::mem::take(&mut self.waiting);
        let all = batch
            .into_iter()
            .chain(waiting.into_values().flat_map(BTreeMap::into_values));
        for s in all {
            let _ = s.reply.send(Err(ProduceError::Fatal(e.clone())));
        }
    }

    /// Begin, produce, send the offsets, commit; aborts on failure.
    async fn attempt(
        &self,
        batch: &[Staged],
        commits: &[Commit],
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<(), Failure> {
        self.resumed(|p| p.begin_transaction())
            .await
            .map_err(Failure::of)?;
        let deliveries = match self.produce(batch) {
            Ok(deliveries) => deliveries,
            Err(failure) => return Err(self.abort(failure).await),
        };
        // The offsets are sent while the records are acknowledged, and the
        // commit begins once all are: rust-rdkafka's commit first flushes,
        // and a flush that finds a record unacknowledged looks again only
        // after 100 ms (most commits took that long). The wait is bounded
        // as the flush was: a record unacknowledged for
        // `kafka.produce_timeout` aborts the transaction.
        let acknowledged = tokio::time::timeout(self.timeout, refused(deliveries));
        let (sent, refused) = tokio::join!(self.send_offsets(commits, group), acknowledged);
        let unacknowledged = KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut);
        match refused {
            Err(_) => return Err(self.abort(Failure::Aborted(unacknowledged)).await),
            Ok(refused) if !refused.is_empty() => {
                return Err(self.abort(Failure::Rejected(refused)).await);
            }
            Ok(_) => {}
        }
        let committed = match sent {
            Ok(()) => self.commit().await,
            Err(e) => Err(e),
        };
        let Err(e) = committed else {
            return Ok(());
        };
        Err(self.abort(Failure::of(e)).await)
    }

    /// Produces the batch's outputs in the open transaction; their
    /// delivery reports in the batch's order.
    fn produce(&self, batch: &[Staged]) -> Result<Vec<DeliveryFuture>, Failure> {
        let mut deliveries = Vec::with_capacity(batch.len());
        for s in batch {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&s.topic)
                .payload(&s.payload)
                .headers(s.headers.clone());
            if let Some(key) = &s.key {
                rec = rec.key(key);
            }
            match self.producer.send_result(rec) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    return Err(match produce_policy(&e) {
                        ProducePolicy::Reject(_) => Failure::Rejected(vec![(deliveries.len(), e)]),
                        _ => Failure::Aborted(e),
                    });
                }
            }
        }
        Ok(deliveries)
    }

    /// Sends the input offsets `commits` to the open transaction, again
    /// with the same offsets and group metadata when retried, as librdkafka
    /// asks.
    async fn send_offsets(
        &self,
        commits: &[Commit],
        group: Option<ConsumerGroupMetadata>,
    ) -> KafkaResult<()> {
        if commits.is_empty() {
            return Ok(());
        }
        let offsets = commit::offsets_list(commits)?;
        let group = Arc::new(group.ok_or(KafkaError::Canceled)?);
        let timeout = self.timeout;
        self.resumed(move |p| p.send_offsets_to_transaction(&offsets, &group, timeout))
            .await
    }

    async fn commit(&self) -> KafkaResult<()> {
        let timeout = self.timeout;
        self.resumed(move |p| p.commit_transaction(timeout)).await
    }

    /// Aborts the open transaction; a producer that cannot abort is given
    /// up (unless the worker is closing: its transaction is aborted by the
    /// broker or fenced by the next producer with its id).
    async fn abort(&self, failure: Failure) -> Failure {
        if matches!(failure, Failure::Fatal(_)) {
            return failure;
        }
        let timeout = self.timeout;
        match self.resumed(move |p| p.abort_transaction(timeout)).await {
            Ok(()) => failure,
            Err(e) if self.closing.is_cancelled() => Failure::Aborted(e),
            Err(e) => match Failure::of(e) {
                Failure::Aborted(e) => Failure::Fatal(e),
                other => other,
            },
        }
    }

    /// Makes a transactional call, again after a pause for as long as it
    /// is [`resumable`] and the worker is not closing. A commit that timed
    /// out must be resumed, never aborted: librdkafka refuses any other
    /// call meanwhile as conflicting.
    async fn resumed<T: Send + 'static>(
        &self,
        call: impl Fn(&FutureProducer<Logged>) -> KafkaResult<T> + Send + Sync + 'static,
    ) -> KafkaResult<T> {
        let call = Arc::new(call);
        let mut delays = retry_delays();
        loop {
            let again = call.clone();
            match self.blocking(move |p| again(p)).await {
                Err(e) if resumable(&e) && !self.closing.is_cancelled() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    warn!(error = %e, retry_in = ?delay, "a transactional call did not finish in time; it is made again");
                    tokio::time::sleep(delay).await;
                }
                done => return done,
            }
        }
    }

    /// Runs a blocking producer call on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&FutureProducer<Logged>) -> KafkaResult<T> + Send + 'static,
    ) -> KafkaResult<T> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || call(&producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }
}

/// Waits for every delivery report; returns the outputs the broker
/// refused for good, by index.
async fn refused(deliveries: Vec<DeliveryFuture>) -> Vec<(usize, KafkaError)> {
    let mut refused = Vec::new();
    for (i, delivery) in deliveries.into_iter().enumerate() {
        if let Ok(Err((e, _))) = delivery.await
            && matches!(produce_policy(&e), ProducePolicy::Reject(_))
        {
            refused.push((i, e));
        }
    }
    refused
}
