//! What the worker did, as Prometheus metrics (prometheus-client) and as log
//! lines. Each event has one method here that writes both, with the same
//! labels, so logs and metrics never disagree. The side port encodes the
//! registry; the demo and the tests read the counters.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tracing::{debug, error, info, warn};

use crate::classify::Verdict;
use crate::dead_letter::{DeadLetter, ErrorClass};
use crate::membership::Membership;
use crate::systemic::Cause;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    error_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    /// HTTP status, or `transport` when no answer came.
    status: String,
    /// The envelope's errcode, or `none`.
    errcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReuseLabel {
    reuse: &'static str,
}

/// The ways a record's API call is saved (the `reuse` label).
const REUSES: [&str; 2] = ["in_flight", "recent"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    /// A tenant with an access token (the configured set bounds it).
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantOutcomeLabels {
    /// A tenant with a label of its own, or `other` (see [`TenantLabels`]).
    tenant: String,
    outcome: &'static str,
}

/// Which tenants have a `tenant` label of their own: those announced (with
/// an access token or a `[tenants]` section), the first `max`; any other
/// tenant id is `other`. Bounded whatever the input says.
#[derive(Default)]
struct TenantLabels {
    max: usize,
    labelled: HashSet<String>,
}

impl TenantLabels {
    fn label(&self, tenant: &str) -> String {
        match self.labelled.contains(tenant) {
            true => tenant.to_string(),
            false => "other".to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    /// `enriched` or `dead_lettered`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProduceErrorLabels {
    /// What the produce policy did about it: `retry`, `reject` or `fatal`.
    policy: &'static str,
    /// librdkafka's error code name (a fixed set), e.g. `MessageTimedOut`.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumeErrorLabels {
    /// librdkafka's error code name (a fixed set), e.g. `BadMessage`.
    code: String,
}

/// How input offsets were committed: by the consumer, by result; with
/// `kafka.delivery = "exactly_once"` in transactions, by result, and how
/// long a committed one took from begin to commit.
struct Commits {
    offsets: Family<ResultLabel, Counter>,
    transactions: Family<ResultLabel, Counter>,
    transaction_duration: Histogram,
}

impl Default for Commits {
    fn default() -> Self {
        Commits {
            offsets: Family::default(),
            transactions: Family::default(),
            transaction_duration: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

/// Progress of one assigned input partition, for stall detection.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// When the partition's position (the offset stored for commit) last
    /// moved on (or it was assigned): records finishing behind one that
    /// does not are no progress.
    moved_at: Instant,
    /// Records between the committed offset and the end (librdkafka's
    /// `consumer_lag`; -1 until known).
    lag: i64,
    /// With transactions: the offset the last one committed (the consumer
    /// commits nothing itself, so its statistics keep the offset it found).
    committed: Option<i64>,
}

/// A record waiting at its gate ([`Stats::waiting_at_gate`]).
pub struct WaitingAtGate<'a>(&'a AtomicU64);

impl Drop for WaitingAtGate<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Stats {
    registry: Registry,
    consumed: Counter,
    finished_before: Counter,
    enriched: Counter,
    dead_lettered: Family<ClassLabel, Counter>,
    unwritable: Counter,
    dead_letter_holds_given_up: Counter,
    api_calls: Family<AnswerLabels, Counter>,
    api_latency: Histogram,
    retries: Counter,
    rate_limited: Counter,
    /// API calls a record did not make: `in_flight` (joined another
    /// record's call for its session), `recent` (its session's answer was
    /// kept).
    api_calls_saved: Family<ReuseLabel, Counter>,
    recent_answers_bytes: Gauge,
    offsets_stored: Counter,
    commits: Commits,
    in_flight: Gauge,
    paused: Gauge,
    assigned: Gauge,
    systemic: Gauge,
    systemic_entered: Family<CauseLabel, Counter>,
    consumer_lag: Family<PartitionLabels, Gauge>,
    committed_offset: Family<PartitionLabels, Gauge>,
    end_to_end: Family<OutcomeLabel, Histogram>,
    tenant_held: Family<TenantLabel, Gauge>,
    records_held: Gauge,
    records_over_share: Gauge,
    /// Held tenants and why, for the side port.
    held_tenants: Mutex<std::collections::BTreeMap<String, String>>,
    /// Tenants with an access token.
    known_tenants: AtomicU64,
    /// Tenants whose records were read, and when last.
    tenants_seen: Mutex<HashMap<String, Instant>>,
    /// Records waiting at their gate for a held tenant or the worker's
    /// breaker: none of them finishes before that ends.
    waiting_at_gate: AtomicU64,
    /// Errcodes shown as themselves in the `errcode` label.
    errcode_labels: std::sync::RwLock<HashSet<i64>>,
    tenant_records: Family<TenantOutcomeLabels, Counter>,
    tenant_labels: std::sync::RwLock<TenantLabels>,
    produce_errors: Family<ProduceErrorLabels, Counter>,
    producer_renewals: Counter,
    consume_errors: Family<ConsumeErrorLabels, Counter>,
    /// When each consume error code was last logged.
    consume_errors_logged: Mutex<HashMap<String, Instant>>,
    /// Every API call (the labelled family cannot be summed).
    api_calls_total: AtomicU64,
    /// The worker's standing in its consumer group, for liveness.
    membership: Mutex<Membership>,
    /// Brokers the consumer is connected to (-1: not known yet).
    brokers_up: AtomicI64,
    /// Brokers the consumer knows at all, connected or not (-1: not known
    /// yet); 0 when librdkafka forgot them all.
    brokers_known: AtomicI64,
    /// When a fresh client last got the cluster's metadata, ms since the
    /// Unix epoch (0: never asked).
    cluster_answered_ms: AtomicU64,
    /// When the consume loop last ran, ms since the Unix epoch (0: never).
    loop_beat_ms: AtomicU64,
    progress: Mutex<HashMap<(String, i32), Progress>>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("consumed", &self.consumed())
            .field("enriched", &self.enriched())
            .finish_non_exhaustive()
    }
}

/// Buckets of the end-to-end latency histogram, in seconds (10 ms … 1 h):
/// from the input record's timestamp to the broker's acknowledgement of
/// its output, a backlog included.
/// A tenant has traffic while a record of its was read this recently: a
/// failure that holds every such tenant is the worker's, not a tenant's
/// (not ready, and no `tenant_held` dead letters for another's sake).
pub const TENANT_ACTIVE_WITHIN: Duration = Duration::from_secs(300);

const END_TO_END_BUCKETS: [f64; 15] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The `result` label of `offset_commits_total`: ok, then error.
const COMMIT_RESULTS: [&str; 2] = ["ok", "error"];

/// How a transaction ended (the `result` label of `transactions_total`).
#[derive(Debug, Clone, Copy)]
pub enum TransactionEnd {
    /// Committed, after this long from its begin.
    Committed(Duration),
    /// Aborted: its outputs are sent again.
    Aborted,
    /// The producer was fenced or failed for good.
    Failed,
}

impl TransactionEnd {
    const LABELS: [&str; 3] = ["committed", "aborted", "failed"];

    fn label(self) -> &'static str {
        match self {
            TransactionEnd::Committed(_) => Self::LABELS[0],
            TransactionEnd::Aborted => Self::LABELS[1],
            TransactionEnd::Failed => Self::LABELS[2],
        }
    }
}

/// Buckets of the API latency histogram, in seconds (5 ms … 20 s).
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0,
];

impl Default for Stats {
    fn default() -> Self {
        let s = Stats {
            consumed: Counter::default(),
            finished_before: Counter::default(),
            enriched: Counter::default(),
            dead_lettered: Family::default(),
            unwritable: Counter::default(),
            dead_letter_holds_given_up: Counter::default(),
            api_calls: Family::default(),
            api_latency: Histogram::new(LATENCY_BUCKETS),
            retries: Counter::default(),
            rate_limited: Counter::default(),
            api_calls_saved: Family::default(),
            recent_answers_bytes: Gauge::default(),
            offsets_stored: Counter::default(),
            commits: Commits::default(),
            in_flight: Gauge::default(),
            paused: Gauge::default(),
            assigned: Gauge::default(),
            systemic: Gauge::default(),
            systemic_entered: Family::default(),
            consumer_lag: Family::default(),
            committed_offset: Family::default(),
            end_to_end: Family::new_with_constructor(|| Histogram::new(END_TO_END_BUCKETS)),
            produce_errors: Family::default(),
            producer_renewals: Counter::default(),
            tenant_held: Family::default(),
            records_held: Gauge::default(),
            records_over_share: Gauge::default(),
            held_tenants: Mutex::new(Default::default()),
            known_tenants: AtomicU64::new(0),
            tenants_seen: Mutex::default(),
            consume_errors: Family::default(),
            consume_errors_logged: Mutex::default(),
            waiting_at_gate: Default::default(),
            errcode_labels: Default::default(),
            tenant_records: Family::default(),
            tenant_labels: Default::default(),
            api_calls_total: AtomicU64::new(0),
            brokers_up: AtomicI64::new(-1),
            brokers_known: AtomicI64::new(-1),
            cluster_answered_ms: AtomicU64::new(0),
            loop_beat_ms: AtomicU64::new(0),
            membership: Mutex::default(),
            progress: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        let mut registry = Registry::with_prefix("uincall_enricher");
        registry.register(
            "build",
            "The running build (value 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        s.register_records(&mut registry);
        s.register_api(&mut registry);
        s.register_consumer(&mut registry);
        s.register_systemic(&mut registry);
        s.register_partitions(&mut registry);
        Stats { registry, ..s }
    }
}

/// Registration of the metrics, by concern; the order is the order of
/// `/metrics`.
impl Stats {
    /// Records taken, enriched and dead-lettered.
    fn register_records(&self, r: &mut Registry) {
        r.register(
            "records_consumed",
            "Input records taken for processing",
            self.consumed.clone(),
        );
        r.register(
            "records_finished_before",
            "Input records skipped as the commit metadata said a previous owner of the partition finished them",
            self.finished_before.clone(),
        );
        r.register(
            "records_enriched",
            "Enriched records acknowledged by the broker",
            self.enriched.clone(),
        );
        r.register(
            "records_dead_lettered",
            "Dead letters acknowledged by the broker, by error class",
            self.dead_lettered.clone(),
        );
        r.register(
            "records_unwritable",
            "Records whose dead letter the dead-letter topic refused at every size, down to no value and cut key and texts: passed over, each logged with its place on the input topic",
            self.unwritable.clone(),
        );
        r.register(
            "tenant_records",
            "Records acknowledged by the broker, by tenant (those with a label of their own, see http.tenant_labels; the rest other) and outcome (enriched, dead_lettered)",
            self.tenant_records.clone(),
        );
        r.register_with_unit(
            "record_end_to_end_duration",
            "From the input record's timestamp to the broker's acknowledgement of the enriched record or dead letter, by outcome",
            Unit::Seconds,
            self.end_to_end.clone(),
        );
        r.register(
            "consume_errors",
            "Errors the Kafka consumer delivered instead of a record, by librdkafka's error code (a corrupt batch repeats its error at every fetch: the partition does not move on)",
            self.consume_errors.clone(),
        );
        r.register(
            "produce_errors",
            "Produce attempts the broker did not acknowledge, by what the produce policy did (retry, reject, fatal) and librdkafka's error code",
            self.produce_errors.clone(),
        );
        r.register(
            "producer_renewals",
            "Kafka producers replaced by a fresh one after records waited kafka.producer_renew_after with no answer from the broker",
            self.producer_renewals.clone(),
        );
    }

    /// Calls to the API: answers, latency, retries and rate limits.
    fn register_api(&self, r: &mut Registry) {
        r.register(
            "api_calls",
            "Calls to the Uincall call-detail API, by HTTP status and errcode",
            self.api_calls.clone(),
        );
        r.register_with_unit(
            "api_call_duration",
            "Duration of one API call, connection to last body byte",
            Unit::Seconds,
            self.api_latency.clone(),
        );
        r.register(
            "api_retries",
            "API calls after the first counted attempt of a record",
            self.retries.clone(),
        );
        r.register(
            "api_rate_limited",
            "Rate-limited answers (HTTP 429 or a rate-limited errcode)",
            self.rate_limited.clone(),
        );
        // Both series from the start, at 0: a rate over them is 0, not
        // absent, before the first call is saved.
        for reuse in REUSES {
            let _ = self.api_calls_saved.get_or_create(&ReuseLabel { reuse });
        }
        r.register(
            "api_calls_saved",
            "API calls a record did not make, by reuse: in_flight (it waited for another record's call for the same session), recent (its session's answer was kept, api.recent_answers_ttl)",
            self.api_calls_saved.clone(),
        );
        r.register_with_unit(
            "recent_answers",
            "Memory the kept answers take (keys, bodies and entries), at most api.recent_answers_bytes",
            Unit::Bytes,
            self.recent_answers_bytes.clone(),
        );
    }

    /// The consumer: offsets stored and committed, records in flight, pause
    /// and assignment.
    fn register_consumer(&self, r: &mut Registry) {
        r.register(
            "offsets_stored",
            "Times a partition's position to commit advanced",
            self.offsets_stored.clone(),
        );
        for result in COMMIT_RESULTS {
            let _ = self.commits.offsets.get_or_create(&ResultLabel { result });
        }
        r.register(
            "offset_commits",
            "Offset commits to the group coordinator, by result",
            self.commits.offsets.clone(),
        );
        for result in TransactionEnd::LABELS {
            let _ = self
                .commits
                .transactions
                .get_or_create(&ResultLabel { result });
        }
        r.register(
            "transactions",
            "Kafka transactions of kafka.delivery = exactly_once (outputs with their input offsets), by result: committed, aborted (sent again) or failed (the producer was fenced or failed for good)",
            self.commits.transactions.clone(),
        );
        r.register_with_unit(
            "transaction_duration",
            "From a committed transaction's begin to its commit",
            Unit::Seconds,
            self.commits.transaction_duration.clone(),
        );
        r.register(
            "records_in_flight",
            "Records between consume and acknowledgement now (at most twice pipeline.max_in_flight)",
            self.in_flight.clone(),
        );
        r.register(
            "partitions_paused",
            "1 while the assigned partitions are paused",
            self.paused.clone(),
        );
        r.register(
            "partitions_assigned",
            "Input partitions assigned to this worker",
            self.assigned.clone(),
        );
    }

    /// Systemic failure: whether the worker is in it, and how often it
    /// entered it.
    fn register_systemic(&self, r: &mut Registry) {
        r.register(
            "systemic_failure",
            "1 while the API is judged failing as a whole (consumption paused, not ready)",
            self.systemic.clone(),
        );
        r.register(
            "systemic_failures",
            "Times the worker entered systemic failure, by cause",
            self.systemic_entered.clone(),
        );
        r.register(
            "dead_letter_holds_given_up",
            "Holds opened by systemic.dead_letter_ratio that lasted systemic.dead_letter_hold with every trial failing: their dead letters were then written as the records' own",
            self.dead_letter_holds_given_up.clone(),
        );
        r.register(
            "tenant_held",
            "1 while the tenant's records are held (its access token refused: a systemic errcode); the other tenants go on",
            self.tenant_held.clone(),
        );
        r.register(
            "records_held",
            "Records waiting for their held tenant now (not counted in the window, up to pipeline.max_held_records)",
            self.records_held.clone(),
        );
        r.register(
            "records_over_share",
            "Records waiting for a place in the window while their tenant holds its share (pipeline.max_in_flight_per_tenant) or more; not counted in the window, like held records",
            self.records_over_share.clone(),
        );
    }

    /// Per assigned input partition, from librdkafka's statistics: lag and
    /// committed offset.
    fn register_partitions(&self, r: &mut Registry) {
        r.register(
            "consumer_lag",
            "Records between the committed offset and the end of the partition",
            self.consumer_lag.clone(),
        );
        r.register(
            "committed_offset",
            "Last offset committed for the partition",
            self.committed_offset.clone(),
        );
    }
}

/// Text of one API answer for the `status` and `errcode` labels.
/// The labels of one answer: the HTTP status (a bounded set) and the
/// errcode, itself only when it is 0 or one of `shown` (the configured
/// lists), else `other`: the API, not us, decides which codes exist.
fn answer_labels(verdict: &Verdict, shown: &HashSet<i64>) -> AnswerLabels {
    let (status, errcode) = match verdict.failure() {
        None => (Some(200), Some(0)),
        Some(f) => (f.http_status, f.errcode),
    };
    let errcode = match errcode {
        None => "none".to_string(),
        Some(c) if c == 0 || shown.contains(&c) => c.to_string(),
        Some(_) => "other".to_string(),
    };
    AnswerLabels {
        status: status.map_or_else(|| "transport".to_string(), |s| s.to_string()),
        errcode,
    }
}

impl Stats {
    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    pub fn consumed(&self) -> u64 {
        self.consumed.get()
    }

    pub fn enriched(&self) -> u64 {
        self.enriched.get()
    }

    pub fn api_calls(&self) -> u64 {
        self.api_calls_total.load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.get()
    }

    pub fn dead_lettered(&self, class: ErrorClass) -> u64 {
        self.dead_lettered
            .get_or_create(&ClassLabel {
                error_class: class.as_str(),
            })
            .get()
    }

    pub fn dead_lettered_total(&self) -> u64 {
        ErrorClass::ALL.iter().map(|c| self.dead_lettered(*c)).sum()
    }

    pub fn record_consumed(&self) {
        self.consumed.inc();
    }

    pub fn record_finished_before(&self) {
        self.finished_before.inc();
    }

    pub fn record_enriched(&self, attempts: u32) {
        self.enriched.inc();
        debug!(attempts, "enriched");
    }

    /// A record's output was acknowledged: the time since the input
    /// record's timestamp (none when it has none, or it lies ahead).
    pub fn record_end_to_end(&self, outcome: &'static str, input_timestamp_ms: Option<i64>) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let Some(ms) = input_timestamp_ms.map(|t| now_ms - t).filter(|ms| *ms >= 0) else {
            return;
        };
        self.end_to_end
            .get_or_create(&OutcomeLabel { outcome })
            .observe(ms as f64 / 1000.0);
    }

    /// A produce the broker did not acknowledge (logged where it happens).
    pub fn produce_error(
        &self,
        policy: &'static str,
        code: Option<rdkafka::types::RDKafkaErrorCode>,
    ) {
        let code = code.map_or_else(|| "none".to_string(), |c| format!("{c:?}"));
        self.produce_errors
            .get_or_create(&ProduceErrorLabels { policy, code })
            .inc();
    }

    /// An error the consumer delivered instead of a record; whether to log
    /// it (at most every 10 s per code: a corrupt batch repeats its error at
    /// every fetch).
    pub fn consume_error(&self, code: Option<rdkafka::types::RDKafkaErrorCode>) -> bool {
        let code = code.map_or_else(|| "none".to_string(), |c| format!("{c:?}"));
        self.consume_errors
            .get_or_create(&ConsumeErrorLabels { code: code.clone() })
            .inc();
        let mut logged = self.consume_errors_logged.lock().unwrap();
        let now = Instant::now();
        match logged.get(&code) {
            Some(at) if now.duration_since(*at) < Duration::from_secs(10) => false,
            _ => {
                logged.insert(code, now);
                true
            }
        }
    }

    /// The producer was replaced by a fresh one (logged by the producer).
    pub fn producer_renewed(&self) {
        self.producer_renewals.inc();
    }

    pub fn record_dead_lettered(&self, dl: &DeadLetter) {
        self.dead_lettered
            .get_or_create(&ClassLabel {
                error_class: dl.class.as_str(),
            })
            .inc();
        warn!(
            error_class = %dl.class,
            reason = %dl.reason,
            errcode = dl.errcode,
            attempts = dl.attempts,
            "dead-lettered"
        );
    }

    /// A record whose dead letter the topic refused at every size.
    pub fn record_unwritable(&self) {
        self.unwritable.inc();
    }

    pub fn unwritable(&self) -> u64 {
        self.unwritable.get()
    }

    /// One API call: its answer (by status and errcode) and duration.
    /// `attempt` is the record's counted attempt this call would be.
    pub fn api_call(&self, verdict: &Verdict, latency: Duration, attempt: u32) {
        let labels = answer_labels(verdict, &self.errcode_labels.read().unwrap());
        self.api_calls.get_or_create(&labels).inc();
        self.api_calls_total.fetch_add(1, Ordering::Relaxed);
        self.api_latency.observe(latency.as_secs_f64());
        if attempt > 1 {
            self.retries.inc();
        }
        if let Verdict::Retry(f) = verdict {
            debug!(attempt, reason = %f.reason, "API call failed");
        }
    }

    /// A record's answer came from another record's call (`in_flight`) or
    /// from the kept answers (`recent`): one of [`REUSES`].
    pub fn api_call_saved(&self, reuse: &'static str) {
        self.api_calls_saved
            .get_or_create(&ReuseLabel { reuse })
            .inc();
    }

    /// What the kept answers take now, after a call's answer was kept.
    pub fn recent_answers_kept(&self, bytes: usize) {
        self.recent_answers_bytes.set(bytes as i64);
    }

    pub fn api_calls_saved(&self, reuse: &'static str) -> u64 {
        self.api_calls_saved
            .get_or_create(&ReuseLabel { reuse })
            .get()
    }

    pub fn api_rate_limited(&self, reason: &str, wait: Duration) {
        self.rate_limited.inc();
        info!(reason, wait = ?wait, "rate limited by the API: the tenant's calls back off");
    }

    pub fn systemic_entered(&self, cause: &Cause) {
        self.systemic.set(1);
        self.systemic_entered
            .get_or_create(&CauseLabel {
                cause: cause.label(),
            })
            .inc();
        error!(cause = %cause, "systemic failure: consumption paused, nothing is dead-lettered for it, probing the API");
    }

    pub fn systemic_left(&self, lasted: Duration) {
        // Waiting was intended: stall detection starts afresh.
        for p in self.progress.lock().unwrap().values_mut() {
            p.moved_at = Instant::now();
        }
        self.systemic.set(0);
        info!(lasted = ?lasted, "the API answers again: systemic failure over, consumption resumes");
    }

    /// A hold opened by `systemic.dead_letter_ratio` lasted
    /// `systemic.dead_letter_hold` with every trial failing.
    pub fn dead_letter_hold_given_up(&self, cause: &Cause, tenant: Option<&str>) {
        self.dead_letter_holds_given_up.inc();
        error!(
            cause = %cause,
            tenant,
            "dead letters held for systemic.dead_letter_hold and every trial failed: taken as the records' own and dead-lettered from now on, until records succeed again"
        );
    }

    pub fn dead_letter_holds_given_up(&self) -> u64 {
        self.dead_letter_holds_given_up.get()
    }

    pub fn probe_failed(&self, reason: &str, next_in: Duration) {
        warn!(reason, next_in = ?next_in, "probe: the API still fails");
    }

    /// The tenant's records are held from now on.
    pub fn tenant_held(&self, tenant: &str, cause: &Cause) {
        let label = TenantLabel {
            tenant: tenant.to_string(),
        };
        self.tenant_held.get_or_create(&label).set(1);
        (self.held_tenants.lock().unwrap()).insert(tenant.to_string(), cause.to_string());
        error!(tenant, cause = %cause, "tenant held: its records wait (not dead-lettered) until a probe shows the API answers it again; the other tenants go on");
    }

    /// The tenant's records go on again.
    pub fn tenant_released(&self, tenant: &str, lasted: Duration) {
        let label = TenantLabel {
            tenant: tenant.to_string(),
        };
        self.tenant_held.get_or_create(&label).set(0);
        self.held_tenants.lock().unwrap().remove(tenant);
        info!(tenant, lasted = ?lasted, "tenant released: its records go on");
    }

    /// Held tenants and why.
    pub fn held_tenants(&self) -> std::collections::BTreeMap<String, String> {
        self.held_tenants.lock().unwrap().clone()
    }

    /// The errcodes the `errcode` label shows as themselves (the
    /// configured lists); any other non-zero errcode is `other`.
    pub fn set_errcode_labels(&self, codes: impl IntoIterator<Item = i64>) {
        *self.errcode_labels.write().unwrap() = codes.into_iter().collect();
    }

    /// Gives tenants a label of their own, up to `max` in all (see
    /// `http.tenant_labels`); each of them shows `tenant_held` 0 from now
    /// on, so a tenant not held is a series at 0 rather than none.
    pub fn label_tenants<'a>(&self, max: usize, tenants: impl IntoIterator<Item = &'a str>) {
        let mut labels = self.tenant_labels.write().unwrap();
        labels.max = max;
        for t in tenants {
            if labels.labelled.len() >= labels.max {
                break;
            }
            labels.labelled.insert(t.to_string());
        }
        for t in &labels.labelled {
            let label = TenantLabel { tenant: t.clone() };
            let _ = self.tenant_held.get_or_create(&label);
        }
    }

    /// A record of `tenant` ended as `outcome` (enriched, dead_lettered).
    pub fn record_tenant(&self, tenant: Option<&str>, outcome: &'static str) {
        let tenant = tenant.map_or_else(
            || "other".to_string(),
            |t| self.tenant_labels.read().unwrap().label(t),
        );
        let labels = TenantOutcomeLabels { tenant, outcome };
        self.tenant_records.get_or_create(&labels).inc();
    }

    /// Tenants with an access token (set at start and on every reload).
    pub fn set_known_tenants(&self, n: usize) {
        self.known_tenants.store(n as u64, Ordering::Relaxed);
    }

    /// Counts a record as waiting at its gate until the guard is dropped.
    pub fn waiting_at_gate(&self) -> WaitingAtGate<'_> {
        self.waiting_at_gate.fetch_add(1, Ordering::SeqCst);
        WaitingAtGate(&self.waiting_at_gate)
    }

    /// Records waiting at their gate now.
    pub fn records_waiting_at_gate(&self) -> usize {
        self.waiting_at_gate.load(Ordering::SeqCst) as usize
    }

    /// A record of `tenant` (one with a token) was read.
    pub fn tenant_seen(&self, tenant: &str) {
        self.tenant_seen_at(tenant, Instant::now());
    }

    fn tenant_seen_at(&self, tenant: &str, at: Instant) {
        let mut seen = self.tenants_seen.lock().unwrap();
        match seen.get_mut(tenant) {
            Some(last) => *last = at,
            None => {
                seen.insert(tenant.to_string(), at);
            }
        }
    }

    /// The tenants with traffic: a record of theirs read within
    /// [`TENANT_ACTIVE_WITHIN`].
    pub fn active_tenants(&self) -> Vec<String> {
        self.active_tenants_at(Instant::now())
    }

    fn active_tenants_at(&self, now: Instant) -> Vec<String> {
        let mut seen = self.tenants_seen.lock().unwrap();
        seen.retain(|_, at| now.saturating_duration_since(*at) < TENANT_ACTIVE_WITHIN);
        seen.keys().cloned().collect()
    }

    /// Whether partitions that do not move are waiting as intended, not
    /// stalled (a restart would not help; readiness and metrics report
    /// it): a systemic failure, every tenant with traffic held, or any
    /// held tenant when `held_stops_all` (`pipeline.held_overflow =
    /// "wait"`). One held tenant among others that go on is no excuse: its
    /// records wait at most `pipeline.max_hold`.
    pub fn waiting_is_intended(&self, held_stops_all: bool) -> bool {
        self.is_systemic()
            || self.every_tenant_held()
            || (held_stops_all && !self.held_tenants.lock().unwrap().is_empty())
    }

    /// Every tenant with a token is held, or every tenant with traffic:
    /// the worker can do nothing useful (a tenant with a token and no
    /// traffic does not make it ready).
    pub fn every_tenant_held(&self) -> bool {
        self.every_tenant_held_at(Instant::now())
    }

    fn every_tenant_held_at(&self, now: Instant) -> bool {
        let known = self.known_tenants.load(Ordering::Relaxed) as usize;
        let active = self.active_tenants_at(now);
        let held = self.held_tenants.lock().unwrap();
        (known > 0 && held.len() >= known)
            || (!active.is_empty() && active.iter().all(|t| held.contains_key(t)))
    }

    /// Records waiting for a held tenant, and for their tenant's share of
    /// the window.
    pub fn set_records_waiting(&self, held: usize, over_share: usize) {
        self.records_held.set(held as i64);
        self.records_over_share.set(over_share as i64);
    }

    pub fn is_systemic(&self) -> bool {
        self.systemic.get() != 0
    }

    pub fn offset_stored(&self) {
        self.offsets_stored.inc();
    }

    pub fn offsets_committed(&self, ok: bool) {
        let [ok_label, error_label] = COMMIT_RESULTS;
        let result = if ok { ok_label } else { error_label };
        self.commits
            .offsets
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A transaction ended.
    pub fn transaction(&self, end: TransactionEnd) {
        let result = end.label();
        self.commits
            .transactions
            .get_or_create(&ResultLabel { result })
            .inc();
        if let TransactionEnd::Committed(took) = end {
            self.commits
                .transaction_duration
                .observe(took.as_secs_f64());
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.get().max(0) as u64
    }

    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.set(n as i64);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.set(paused as i64);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.get() != 0
    }

    pub fn assigned_partitions(&self) -> u64 {
        self.assigned.get().max(0) as u64
    }

    /// Partitions assigned (`true`) or revoked.
    pub fn partitions_changed(&self, parts: &[(String, i32)], assigned: bool) {
        let mut progress = self.progress.lock().unwrap();
        for (topic, partition) in parts {
            let key = (topic.clone(), *partition);
            if assigned {
                progress.insert(
                    key,
                    Progress {
                        moved_at: Instant::now(),
                        lag: -1,
                        committed: None,
                    },
                );
            } else {
                progress.remove(&key);
                let labels = PartitionLabels {
                    topic: topic.clone(),
                    partition: *partition,
                };
                self.consumer_lag.remove(&labels);
                self.committed_offset.remove(&labels);
            }
        }
        self.assigned.set(progress.len() as i64);
        let mut membership = self.membership.lock().unwrap();
        membership.assigned(progress.len(), Instant::now());
    }

    /// How long the worker has had no group coordinator, or no partition
    /// while not settled in its group (see [`Membership`]), and the group's
    /// state; `None` while it is fine.
    pub fn unsettled_for(&self) -> Option<(Duration, String)> {
        self.membership
            .lock()
            .unwrap()
            .unsettled_for(Instant::now())
    }

    /// The partition's position moved on (a new offset stored).
    /// A transaction committed `offset` for a partition: its position moved
    /// (for the stall check), and its lag counts from there.
    pub fn committed_in_transaction(&self, topic: &str, partition: i32, offset: i64) {
        let mut progress = self.progress.lock().unwrap();
        if let Some(p) = progress.get_mut(&(topic.to_string(), partition)) {
            if p.committed.is_none_or(|c| offset > c) {
                p.moved_at = Instant::now();
            }
            p.committed = Some(offset);
        }
        self.offsets_stored.inc();
    }

    pub fn partition_moved(&self, topic: &str, partition: i32) {
        let mut progress = self.progress.lock().unwrap();
        if let Some(p) = progress.get_mut(&(topic.to_string(), partition)) {
            p.moved_at = Instant::now();
        }
    }

    /// librdkafka's periodic statistics: lag and committed offsets of the
    /// assigned partitions, and whether any broker is connected.
    pub fn kafka_statistics(&self, s: &rdkafka::Statistics) {
        let up = s
            .brokers
            .values()
            .filter(|b| matches!(b.source.as_str(), "learned" | "configured") && b.state == "UP")
            .count();
        self.brokers_up.store(up as i64, Ordering::Relaxed);
        let known = crate::producer::known_brokers(s) as i64;
        self.brokers_known.store(known, Ordering::Relaxed);
        if let Some(g) = &s.cgrp {
            let mut membership = self.membership.lock().unwrap();
            if membership.group_state(&g.state, &g.join_state, Instant::now()) {
                info!(state = %g.state, join_state = %g.join_state, assigned = g.assignment_size, "consumer group state");
            }
        }
        let mut progress = self.progress.lock().unwrap();
        for (topic, t) in &s.topics {
            for (partition, p) in &t.partitions {
                let Some(entry) = progress.get_mut(&(topic.clone(), *partition)) else {
                    continue;
                };
                let labels = PartitionLabels {
                    topic: topic.clone(),
                    partition: *partition,
                };
                let (lag, committed) = match entry.committed {
                    Some(c) if p.ls_offset >= 0 => ((p.ls_offset - c).max(0), c),
                    _ => (p.consumer_lag, p.committed_offset),
                };
                if lag >= 0 {
                    entry.lag = lag;
                    self.consumer_lag.get_or_create(&labels).set(lag);
                }
                if committed >= 0 {
                    self.committed_offset.get_or_create(&labels).set(committed);
                }
            }
        }
    }

    /// A fresh client got the cluster's metadata just now.
    pub fn cluster_answered(&self) {
        self.cluster_answered_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Why the worker has lost its place in its consumer group for good,
    /// if it has: out of its group (see [`Membership`]) for `limit` while
    /// the cluster is there or librdkafka forgot it. The one rule behind
    /// `/healthz` and the worker's stop.
    pub fn lost_place(&self, limit: Duration) -> Option<String> {
        let (d, state) = self.unsettled_for().filter(|(d, _)| *d >= limit)?;
        self.cluster_there_or_forgotten().then(|| {
            format!(
                "lost its place in the consumer group (state {state}) for {}s while the cluster answers, past kafka.rejoin_timeout ({})",
                d.as_secs(),
                humantime::format_duration(limit)
            )
        })
    }

    /// Whether the consumer is stuck away from a cluster that is there: a
    /// broker it is connected to answers, or a fresh client got the
    /// cluster's metadata within [`PROBE_RECENT`], or librdkafka forgot
    /// every broker (after a metadata answer that listed none, as a broker
    /// that fenced itself gives; it never bootstraps again,
    /// confluentinc/librdkafka#5301).
    fn cluster_there_or_forgotten(&self) -> bool {
        let answered = self.cluster_answered_ms.load(Ordering::Relaxed);
        let recent = PROBE_RECENT.as_millis() as u64;
        let fresh = answered != 0 && now_ms().saturating_sub(answered) <= recent;
        self.broker_reachable() || fresh || self.brokers_known.load(Ordering::Relaxed) == 0
    }

    /// `false` once statistics show no broker connected.
    pub fn broker_reachable(&self) -> bool {
        self.brokers_up.load(Ordering::Relaxed) != 0
    }

    /// A partition with a backlog that has not moved for `limit`, if any.
    pub fn stalled_partition(&self, limit: Duration) -> Option<(String, i32, Duration)> {
        self.stalled_at(limit, Instant::now())
    }

    fn stalled_at(&self, limit: Duration, now: Instant) -> Option<(String, i32, Duration)> {
        let progress = self.progress.lock().unwrap();
        progress
            .iter()
            .map(|((t, n), p)| (t, *n, p.lag, now.saturating_duration_since(p.moved_at)))
            .find(|(_, _, lag, still)| *lag > 0 && *still > limit)
            .map(|(t, n, _, still)| (t.clone(), n, still))
    }

    /// Records that the consume loop ran just now.
    pub fn beat(&self) {
        self.loop_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long ago the consume loop last ran; `None` before it started.
    pub fn since_beat(&self) -> Option<Duration> {
        match self.loop_beat_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(now_ms().saturating_sub(at))),
        }
    }
}

/// A fresh client's answer ([`Stats::cluster_answered`]) counts for this
/// long; the worker asks more often than that while out of its group.
const PROBE_RECENT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ApiFailure;

    #[test]
    fn the_tenant_label_is_bounded_whatever_the_input() {
        let s = Stats::default();
        s.label_tenants(2, ["a", "b", "c"]);
        for t in ["a", "b", "c", "unknown-1", "unknown-2"] {
            s.record_tenant(Some(t), "enriched");
        }
        s.record_tenant(None, "dead_lettered");
        let text = s.encode();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("uincall_enricher_tenant_records_total"))
            .collect();
        assert_eq!(
            lines.len(),
            4,
            "a, b, other enriched; other dead-lettered: {lines:?}"
        );
        assert!(
            text.contains(
                "uincall_enricher_tenant_records_total{tenant=\"other\",outcome=\"enriched\"} 3"
            ),
            "{text}"
        );
    }

    #[test]
    fn metrics_have_units_labels_and_no_secret() {
        let s = Stats::default();
        s.set_errcode_labels([10001]);
        s.record_consumed();
        s.api_call(
            &Verdict::Retry(ApiFailure {
                reason: "errcode 10001".into(),
                http_status: Some(200),
                errcode: Some(10001),
                errmsg: None,
                retry_after: None,
            }),
            Duration::from_millis(30),
            1,
        );
        s.api_call(
            &Verdict::Retry(ApiFailure::new("timeout")),
            Duration::from_secs(10),
            2,
        );
        s.api_call(
            &Verdict::DeadLetter(ApiFailure {
                reason: "errcode 77777".into(),
                http_status: Some(200),
                errcode: Some(77777),
                errmsg: None,
                retry_after: None,
            }),
            Duration::from_millis(30),
            1,
        );
        s.partitions_changed(&[("in".into(), 3)], true);
        let two_seconds_ago = chrono::Utc::now().timestamp_millis() - 2_000;
        s.record_end_to_end("enriched", Some(two_seconds_ago));
        s.record_end_to_end("enriched", None);
        s.produce_error(
            "retry",
            Some(rdkafka::types::RDKafkaErrorCode::MessageTimedOut),
        );
        let text = s.encode();
        for line in [
            concat!(
                "uincall_enricher_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
            "uincall_enricher_record_end_to_end_duration_seconds_count{outcome=\"enriched\"} 1",
            "uincall_enricher_record_end_to_end_duration_seconds_bucket{le=\"1.0\",outcome=\"enriched\"} 0",
            "uincall_enricher_record_end_to_end_duration_seconds_bucket{le=\"2.5\",outcome=\"enriched\"} 1",
            "uincall_enricher_produce_errors_total{policy=\"retry\",code=\"MessageTimedOut\"} 1",
            "# UNIT uincall_enricher_record_end_to_end_duration_seconds seconds",
            "uincall_enricher_records_consumed_total 1",
            "uincall_enricher_api_calls_total{status=\"200\",errcode=\"10001\"} 1",
            "uincall_enricher_api_calls_total{status=\"transport\",errcode=\"none\"} 1",
            "uincall_enricher_api_calls_total{status=\"200\",errcode=\"other\"} 1",
            "uincall_enricher_api_call_duration_seconds_count 3",
            "uincall_enricher_api_retries_total 1",
            "uincall_enricher_partitions_assigned 1",
            "# UNIT uincall_enricher_api_call_duration_seconds seconds",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(s.api_calls(), 3);
        assert!(
            !text.contains("77777"),
            "an unlisted errcode is not a label value"
        );
    }

    #[test]
    fn every_metric_is_served_once_in_the_order_of_its_concern() {
        let s = Stats::default();
        // A labelled family is only served once it has a child.
        let partition = PartitionLabels {
            topic: "in".into(),
            partition: 0,
        };
        s.dead_lettered
            .get_or_create(&ClassLabel { error_class: "x" })
            .inc();
        s.api_calls
            .get_or_create(&AnswerLabels {
                status: "200".into(),
                errcode: "0".into(),
            })
            .inc();
        s.commits
            .offsets
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
        s.systemic_entered
            .get_or_create(&CauseLabel { cause: "x" })
            .inc();
        s.tenant_held("t", &Cause::Errcode(40001));
        s.consumer_lag.get_or_create(&partition).set(1);
        s.committed_offset.get_or_create(&partition).set(1);
        s.record_end_to_end("enriched", Some(0));
        s.produce_error("retry", None);
        s.consume_error(None);
        s.record_tenant(None, "enriched");
        s.api_call_saved("recent");
        let text = s.encode();
        let served: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP uincall_enricher_"))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(
            served,
            [
                "build",
                "records_consumed",
                "records_finished_before",
                "records_enriched",
                "records_dead_lettered",
                "records_unwritable",
                "tenant_records",
                "record_end_to_end_duration_seconds",
                "consume_errors",
                "produce_errors",
                "producer_renewals",
                "api_calls",
                "api_call_duration_seconds",
                "api_retries",
                "api_rate_limited",
                "api_calls_saved",
                "recent_answers_bytes",
                "offsets_stored",
                "offset_commits",
                "transactions",
                "transaction_duration_seconds",
                "records_in_flight",
                "partitions_paused",
                "partitions_assigned",
                "systemic_failure",
                "systemic_failures",
                "dead_letter_holds_given_up",
                "tenant_held",
                "records_held",
                "records_over_share",
                "consumer_lag",
                "committed_offset",
            ]
        );
    }

    #[test]
    fn a_partition_with_backlog_and_no_progress_is_stalled() {
        let s = Stats::default();
        s.partitions_changed(&[("in".into(), 0), ("in".into(), 1)], true);
        let later = Instant::now() + Duration::from_secs(120);
        // Lag unknown: never stalled.
        assert!(s.stalled_at(Duration::ZERO, later).is_none());
        {
            let mut p = s.progress.lock().unwrap();
            p.get_mut(&("in".to_string(), 1)).unwrap().lag = 5;
            p.get_mut(&("in".to_string(), 0)).unwrap().lag = 0;
        }
        let (t, n, _) = s.stalled_at(Duration::from_secs(60), later).unwrap();
        assert_eq!((t.as_str(), n), ("in", 1));
        assert!(s.stalled_at(Duration::from_secs(300), later).is_none());
        s.partition_moved("in", 1);
        assert!(
            s.stalled_at(Duration::from_secs(60), Instant::now())
                .is_none()
        );
        s.partitions_changed(&[("in".into(), 1)], false);
        assert!(s.stalled_at(Duration::ZERO, later).is_none());
        assert_eq!(s.assigned_partitions(), 1);
    }

    #[test]
    fn every_tenant_with_traffic_held_is_every_tenant_held() {
        let s = Stats::default();
        s.set_known_tenants(3);
        assert!(!s.every_tenant_held(), "nothing read, nothing held");
        s.tenant_seen("a");
        s.tenant_seen("b");
        s.tenant_held("a", &Cause::Errcode(40100));
        assert!(!s.every_tenant_held(), "b has traffic and goes on");
        s.tenant_held("b", &Cause::Errcode(40100));
        // c has a token and no traffic: it does not keep the worker ready.
        assert!(s.every_tenant_held());
        s.tenant_seen("c");
        assert!(!s.every_tenant_held());
        assert_eq!(s.active_tenants().len(), 3);
        // Later, with no record of c since: c has no traffic any more.
        let later = Instant::now() + TENANT_ACTIVE_WITHIN * 2;
        s.tenant_seen_at("a", later);
        s.tenant_seen_at("b", later);
        assert!(s.every_tenant_held_at(later));
        assert_eq!(s.active_tenants_at(later).len(), 2);
    }

    #[test]
    fn one_held_tenant_among_others_does_not_excuse_a_stall() {
        let s = Stats::default();
        s.set_known_tenants(2);
        s.tenant_seen("a");
        s.tenant_seen("b");
        assert!(!s.waiting_is_intended(false));
        s.tenant_held("a", &Cause::Errcode(40100));
        assert!(
            !s.waiting_is_intended(false),
            "b goes on: a stall is a stall"
        );
        assert!(
            s.waiting_is_intended(true),
            "held_overflow = wait: all wait"
        );
        s.tenant_held("b", &Cause::Errcode(40100));
        assert!(
            s.waiting_is_intended(false),
            "every tenant with traffic held"
        );
    }
}
