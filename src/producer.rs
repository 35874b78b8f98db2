//! The Kafka producer of every process: one produce policy for its errors
//! (retry, reject, fatal), and a producer that replaces itself when it
//! stops making progress.
//!
//! librdkafka 2.12 can leave a partition without a leader for good after
//! the broker was fenced for a moment, as a broker whose JVM froze past
//! `broker.session.timeout.ms` is: its log says `new leader-1 not found in
//! cache` (confluentinc/librdkafka#5430), and from then on every record to
//! that partition times out while a new producer is acknowledged at once.
//! So every send is counted; when records have waited and nothing was
//! acknowledged for `kafka.producer_renew_after`, a watchdog builds a fresh
//! producer, sends go to it from then on, and what the stuck one still
//! holds is purged (its senders see a retryable error and send again, to
//! the fresh one).
//!
//! librdkafka 2.12 also forgets every broker a metadata answer leaves out,
//! and a broker that fenced itself answers without itself: a client of a
//! one-broker cluster is then left knowing no broker and never bootstraps
//! again (confluentinc/librdkafka#5301). The producer's statistics tell it;
//! a producer that has known no broker for `renew_after` is replaced too,
//! whether records wait or not.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{OwnedMessage, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Statistics};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What to do about a produce error, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducePolicy {
    /// The broker may take it later.
    Retry(&'static str),
    /// The broker refuses this record and always will.
    Reject(&'static str),
    /// The producer cannot go on.
    Fatal(&'static str),
}

impl ProducePolicy {
    /// The `policy` label of `produce_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            ProducePolicy::Retry(_) => "retry",
            ProducePolicy::Reject(_) => "reject",
            ProducePolicy::Fatal(_) => "fatal",
        }
    }
}

/// The produce policy: a pure function of the error.
pub fn produce_policy(e: &KafkaError) -> ProducePolicy {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidRecord) => {
            ProducePolicy::Reject("too large or invalid for the topic")
        }
        Some(
            C::Fatal
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidProducerIdMapping
            | C::UnsupportedForMessageFormat,
        ) => ProducePolicy::Fatal("not authorised, or the idempotent producer's state is lost"),
        // CORRUPT_MESSAGE (InvalidMessage) included: a batch damaged in
        // transit is sent again.
        _ => ProducePolicy::Retry("timeout, leader change or a batch damaged in transit"),
    }
}

/// How often the watchdog looks at the producer's progress.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Records waiting for an acknowledgement, and when the producer last made
/// progress (an answer from the broker, or the first record after a quiet
/// time that did not end in a timeout).
#[derive(Debug)]
struct Progress {
    waiting: usize,
    since: Instant,
    /// The last record to finish got no answer (timed out): records that
    /// time out one by one while none else waits still count as one stall.
    unanswered: bool,
}

impl Progress {
    /// How long records have waited without any progress; `None` when none
    /// waits.
    fn stalled_for(&self, now: Instant) -> Option<Duration> {
        (self.waiting > 0).then(|| now.saturating_duration_since(self.since))
    }
}

/// How often a producer's statistics tell which brokers it knows.
const STATISTICS_EVERY: &str = "5000";

/// Brokers the bootstrap list named or metadata announced (not librdkafka's
/// internal and logical ones).
pub fn known_brokers(s: &Statistics) -> usize {
    (s.brokers.values())
        .filter(|b| matches!(b.source.as_str(), "learned" | "configured"))
        .count()
}

/// Since when a producer has known no broker, from its statistics.
#[derive(Default)]
struct Forgotten(Mutex<Option<Instant>>);

impl Forgotten {
    fn observe(&self, known: usize) {
        let mut since = self.0.lock().unwrap();
        match known {
            0 => {
                since.get_or_insert_with(Instant::now);
            }
            _ => *since = None,
        }
    }

    /// How long the producer has known no broker at all.
    fn forgotten_for(&self, now: Instant) -> Option<Duration> {
        let since = *self.0.lock().unwrap();
        since.map(|t| now.saturating_duration_since(t))
    }
}

/// The producer's callbacks: its logs to `tracing`, its statistics to
/// [`Forgotten`].
pub struct Watched(Arc<Forgotten>);

impl ClientContext for Watched {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::log_librdkafka(level, fac, message);
    }

    fn stats(&self, statistics: Statistics) {
        self.0.observe(known_brokers(&statistics));
    }
}

type Watchable = FutureProducer<Watched>;

/// The producer in use, what its statistics said, and the number of
/// renewals so far.
struct Current {
    producer: Watchable,
    forgotten: Arc<Forgotten>,
    renewals: u64,
}

impl Current {
    fn create(config: &ClientConfig, renewals: u64) -> KafkaResult<Current> {
        let forgotten = Arc::new(Forgotten::default());
        let producer = config.create_with_context(Watched(forgotten.clone()))?;
        Ok(Current {
            producer,
            forgotten,
            renewals,
        })
    }
}

/// An idempotent producer (as `config` says) replaced when stuck.
pub struct RenewingProducer {
    config: ClientConfig,
    current: RwLock<Current>,
    progress: Mutex<Progress>,
    /// `kafka.producer_renew_after`; zero: never renewed.
    renew_after: Duration,
}

/// Counts a send as waiting until it is dropped.
struct Waiting<'a>(&'a Mutex<Progress>);

impl<'a> Waiting<'a> {
    fn start(progress: &'a Mutex<Progress>) -> Self {
        let mut p = progress.lock().unwrap();
        if p.waiting == 0 && !p.unanswered {
            p.since = Instant::now();
        }
        p.waiting += 1;
        Waiting(progress)
    }

    /// How the record ended: the broker answered (an acknowledgement or a
    /// refusal), or not (a timeout, a purge).
    fn finish(self, answered: bool) {
        let mut p = self.0.lock().unwrap();
        p.unanswered = !answered;
        if answered {
            p.since = Instant::now();
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().waiting -= 1;
    }
}

/// Whether a produce error came from the broker (progress) rather than from
/// waiting in vain.
fn broker_answered(e: &KafkaError) -> bool {
    !matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::PurgeQueue
                | RDKafkaErrorCode::PurgeInflight
                | RDKafkaErrorCode::QueueFull
        )
    )
}

impl RenewingProducer {
    pub fn new(mut config: ClientConfig, renew_after: Duration) -> KafkaResult<RenewingProducer> {
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", STATISTICS_EVERY);
        }
        Ok(RenewingProducer {
            current: RwLock::new(Current::create(&config, 0)?),
            config,
            progress: Mutex::new(Progress {
                waiting: 0,
                since: Instant::now(),
                unanswered: false,
            }),
            renew_after,
        })
    }

    /// The producer in use now.
    pub fn producer(&self) -> Watchable {
        self.current.read().unwrap().producer.clone()
    }

    /// How many times the producer was replaced.
    pub fn renewals(&self) -> u64 {
        self.current.read().unwrap().renewals
    }

    /// Sends one record with the producer in use; `queue_timeout` as
    /// [`FutureProducer::send`] takes it.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: impl Into<Timeout>,
    ) -> Result<(i32, i64), (KafkaError, OwnedMessage)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let producer = self.producer();
        let waiting = Waiting::start(&self.progress);
        let result = producer
            .send(record, queue_timeout)
            .await
            .map(|d| (d.partition, d.offset));
        waiting.finish(match &result {
            Ok(_) => true,
            Err((e, _)) => broker_answered(e),
        });
        result
    }

    /// How long records have waited without any acknowledgement; `None`
    /// when none waits.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.progress.lock().unwrap().stalled_for(Instant::now())
    }

    /// Why the producer in use is stuck, if it is.
    fn stuck(&self) -> Option<String> {
        let limit = self.renew_after;
        if limit.is_zero() {
            return None;
        }
        if let Some(d) = self.stalled_for().filter(|d| *d >= limit) {
            return Some(format!(
                "records waited {}s with no answer from the broker",
                d.as_secs()
            ));
        }
        let forgotten = (self.current.read().unwrap().forgotten).forgotten_for(Instant::now());
        forgotten.filter(|d| *d >= limit).map(|d| {
            format!(
                "it has known no broker for {}s (librdkafka forgot them all)",
                d.as_secs()
            )
        })
    }

    /// Replaces the producer when it is stuck; called by
    /// [`RenewingProducer::watch`]. The stuck producer's records are purged
    /// (their senders send them again) and it is closed on a blocking
    /// thread.
    fn renew_if_stuck(&self) -> KafkaResult<bool> {
        let Some(why) = self.stuck() else {
            return Ok(false);
        };
        let renewals = self.renewals() + 1;
        let fresh = Current::create(&self.config, renewals)?;
        let old = std::mem::replace(&mut *self.current.write().unwrap(), fresh).producer;
        // The fresh producer gets its own `renew_after` from now.
        let mut progress = self.progress.lock().unwrap();
        (progress.since, progress.unanswered) = (Instant::now(), false);
        drop(progress);
        warn!(
            reason = why,
            "the Kafka producer is stuck; replaced by a fresh one"
        );
        tokio::task::spawn_blocking(move || {
            old.purge(PurgeConfig::default().queue().inflight());
            drop(old);
        });
        Ok(true)
    }

    /// The watchdog: renews the producer when stuck, until `stop`. Calls
    /// `renewed` after each renewal (for a metric).
    pub fn watch(
        self: &Arc<Self>,
        stop: CancellationToken,
        renewed: impl Fn() + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match this.renew_if_stuck() {
                    Ok(true) => renewed(),
                    Ok(false) => {}
                    Err(e) => {
                        info!(error = %e, "a fresh Kafka producer could not be created; trying again")
                    }
                }
            }
        })
    }

    /// Waits up to `limit` for what is still queued.
    pub fn flush(&self, limit: Duration) -> KafkaResult<()> {
        self.producer().flush(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn stalled(p: &Mutex<Progress>) -> Option<Duration> {
        p.lock().unwrap().stalled_for(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn a_producer_is_stalled_only_while_records_wait_without_answers() {
        let p = Mutex::new(Progress {
            waiting: 0,
            since: Instant::now(),
            unanswered: false,
        });
        assert_eq!(stalled(&p), None);
        let first = Waiting::start(&p);
        tokio::time::advance(10 * SECOND).await;
        let second = Waiting::start(&p);
        // The second record started while the first waited: the stall
        // counts from the first.
        assert_eq!(stalled(&p), Some(10 * SECOND));
        first.finish(true);
        assert_eq!(stalled(&p), Some(Duration::ZERO));
        second.finish(true);
        assert_eq!(stalled(&p), None);
        // After a quiet time, a new record starts a new count.
        tokio::time::advance(60 * SECOND).await;
        let third = Waiting::start(&p);
        assert_eq!(stalled(&p), Some(Duration::ZERO));
        // It times out; the next one, sent when none waits, goes on
        // counting from the last answer.
        tokio::time::advance(5 * SECOND).await;
        third.finish(false);
        let fourth = Waiting::start(&p);
        tokio::time::advance(5 * SECOND).await;
        assert_eq!(stalled(&p), Some(10 * SECOND));
        fourth.finish(true);
        assert_eq!(stalled(&p), None);
    }

    #[test]
    fn timeouts_and_purges_are_no_answer_from_the_broker() {
        let e = |code| KafkaError::MessageProduction(code);
        assert!(!broker_answered(&e(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!broker_answered(&e(RDKafkaErrorCode::PurgeInflight)));
        assert!(broker_answered(&e(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(broker_answered(&e(RDKafkaErrorCode::NotLeaderForPartition)));
    }

    #[tokio::test]
    async fn a_stuck_producer_is_renewed_and_its_records_given_back() {
        let mut config = ClientConfig::new();
        // Nothing listens there: every record waits.
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "600000");
        let p = Arc::new(RenewingProducer::new(config, Duration::from_secs(2)).unwrap());
        assert!(!p.renew_if_stuck().unwrap(), "nothing waits");
        let sender = p.clone();
        let sent = tokio::spawn(async move {
            sender
                .send(
                    FutureRecord::<str, str>::to("t").payload("x"),
                    Timeout::Never,
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        });
        let waited = std::time::Instant::now();
        while !p.renew_if_stuck().unwrap() {
            assert!(waited.elapsed() < Duration::from_secs(60), "never renewed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(waited.elapsed() >= Duration::from_secs(2), "renewed early");
        assert_eq!(p.renewals(), 1);
        // The stuck producer's record was purged: its sender may send again.
        let e = tokio::time::timeout(Duration::from_secs(60), sent)
            .await
            .expect("the purged record is given back")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::PurgeQueue),
            "{e}"
        );
    }

    #[test]
    fn produce_errors_map_to_retry_reject_or_fatal() {
        let policy = |code| produce_policy(&KafkaError::MessageProduction(code));
        let kind = |p: ProducePolicy| p.label();
        use RDKafkaErrorCode as C;
        // CORRUPT_MESSAGE: a batch damaged on the wire is sent again.
        assert_eq!(kind(policy(C::InvalidMessage)), "retry");
        assert_eq!(kind(policy(C::MessageTimedOut)), "retry");
        assert_eq!(kind(policy(C::NotLeaderForPartition)), "retry");
        assert_eq!(kind(policy(C::MessageSizeTooLarge)), "reject");
        assert_eq!(kind(policy(C::InvalidRecord)), "reject");
        assert_eq!(kind(policy(C::TopicAuthorizationFailed)), "fatal");
        assert_eq!(kind(policy(C::Fatal)), "fatal");
    }
}
