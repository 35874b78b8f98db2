//! Systemic failure: when the API fails as a whole (it is down, the token is
//! invalid, or most records end as dead letters) no record is at fault, so
//! none may be dead-lettered for it. The [`Breaker`] watches API calls and
//! record outcomes; once open, records wait at their gate, the consume loop
//! pauses, `/readyz` fails and the breaker's probe task
//! ([`Breaker::start_probe`]) calls the API with backoff until an answer
//! shows it works again.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::classify::{ApiAnswer, Verdict};
use crate::settings::SystemicSettings;

/// Why the API is judged unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Too many of the recent calls failed with a transport error or 5xx.
    Outage { failed: usize, calls: usize },
    /// An errcode listed in `retry.systemic_errcodes`.
    Errcode(i64),
    /// Too many of the recent records would be dead-lettered.
    DeadLetters { dead: usize, records: usize },
}

impl Cause {
    /// A short label for metrics (bounded set).
    pub fn label(&self) -> &'static str {
        match self {
            Cause::Outage { .. } => "outage",
            Cause::Errcode(_) => "systemic_errcode",
            Cause::DeadLetters { .. } => "dead_letter_ratio",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Outage { failed, calls } => write!(
                f,
                "{failed} of the last {calls} API calls failed (transport error or HTTP 5xx)"
            ),
            Cause::Errcode(code) => write!(f, "the API answered systemic errcode {code}"),
            Cause::DeadLetters { dead, records } => write!(
                f,
                "{dead} of the last {records} records would be dead-lettered"
            ),
        }
    }
}

/// What one API call says about the API as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The API answered (whatever it said about the record).
    Answered,
    /// Transport error or HTTP 5xx.
    Outage,
    /// A systemic errcode.
    Systemic(i64),
}

impl CallOutcome {
    pub fn of(answer: &ApiAnswer, verdict: &Verdict) -> Self {
        match verdict {
            Verdict::Systemic(f) => CallOutcome::Systemic(f.errcode.unwrap_or_default()),
            _ if answer.is_outage() => CallOutcome::Outage,
            _ => CallOutcome::Answered,
        }
    }
}

/// A record the probe can ask the API about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub session_id: String,
    pub tenant_id: String,
    pub call_type: Option<i64>,
}

/// The last `cap` yes/no observations and how many were "bad".
#[derive(Debug)]
struct Window {
    seen: VecDeque<bool>,
    bad: usize,
    cap: usize,
}

impl Window {
    fn new(cap: usize) -> Self {
        Window {
            seen: VecDeque::with_capacity(cap),
            bad: 0,
            cap,
        }
    }

    fn push(&mut self, bad: bool) {
        if self.seen.len() == self.cap && self.seen.pop_front() == Some(true) {
            self.bad -= 1;
        }
        self.seen.push_back(bad);
        self.bad += bad as usize;
    }

    /// `Some((bad, len))` when at least `min` observations show a bad share
    /// above `ratio` (or equal to it, for a ratio of 1).
    fn over(&self, min: usize, ratio: f64) -> Option<(usize, usize)> {
        let len = self.seen.len();
        if len < min {
            return None;
        }
        let share = self.bad as f64 / len as f64;
        let over = if ratio >= 1.0 { false } else { share > ratio };
        over.then_some((self.bad, len))
    }

    fn clear(&mut self) {
        self.seen.clear();
        self.bad = 0;
    }
}

#[derive(Debug)]
struct Inner {
    calls: Window,
    records: Window,
    /// A session the API last answered with a record: the best probe.
    last_good: Option<ProbeTarget>,
    /// A session whose call last failed: the probe when nothing succeeded
    /// yet, and the one a dead-letter hold is tried with.
    last_failed: Option<ProbeTarget>,
    /// A dead-letter hold gave up (`systemic.dead_letter_hold`): dead
    /// letters are the records' own, allowed without opening, until enriched
    /// records bring the window's share down to the ratio again.
    accepting: bool,
}

/// How probing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probed {
    Healed,
    /// A dead-letter hold lasted `systemic.dead_letter_hold` with every
    /// trial failing: the failures are taken as the records' own.
    GaveUp,
    Stopped,
}

/// Whether the dead letter of a record may be written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterGate {
    Allow,
    /// Systemic failure: hold the record and start it over once closed.
    Hold,
}

/// The systemic-failure state shared by every record task, the consume loop,
/// the probe and the side port.
#[derive(Debug)]
pub struct Breaker {
    settings: SystemicSettings,
    inner: Mutex<Inner>,
    /// `Some(cause)` while open.
    state: watch::Sender<Option<Cause>>,
}

impl Breaker {
    pub fn new(settings: &SystemicSettings) -> Self {
        Breaker {
            inner: Mutex::new(Inner {
                calls: Window::new(settings.call_window),
                records: Window::new(settings.record_window),
                last_good: None,
                last_failed: None,
                accepting: false,
            }),
            settings: settings.clone(),
            state: watch::Sender::new(None),
        }
    }

    /// Follows the state: `Some(cause)` while open.
    pub fn subscribe(&self) -> watch::Receiver<Option<Cause>> {
        self.state.subscribe()
    }

    pub fn is_open(&self) -> bool {
        self.state.borrow().is_some()
    }

    pub fn cause(&self) -> Option<Cause> {
        self.state.borrow().clone()
    }

    fn open(&self, cause: Cause) {
        self.state.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(cause);
                true
            } else {
                false
            }
        });
    }

    /// Closes the breaker and starts both windows afresh.
    pub fn close(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.calls.clear();
        inner.records.clear();
        drop(inner);
        self.state.send_if_modified(|s| s.take().is_some());
    }

    /// Takes one API call's outcome into account, opening the breaker when
    /// it shows a systemic failure.
    pub fn on_call(&self, outcome: CallOutcome, target: impl FnOnce() -> ProbeTarget) {
        let mut inner = self.inner.lock().unwrap();
        if outcome != CallOutcome::Answered {
            inner.last_failed = Some(target());
        }
        if self.is_open() {
            return;
        }
        let cause = match outcome {
            CallOutcome::Systemic(code) => Some(Cause::Errcode(code)),
            CallOutcome::Outage | CallOutcome::Answered => {
                inner.calls.push(outcome == CallOutcome::Outage);
                let s = &self.settings;
                inner
                    .calls
                    .over(s.min_calls, s.failure_ratio)
                    .map(|(failed, calls)| Cause::Outage { failed, calls })
            }
        };
        drop(inner);
        if let Some(cause) = cause {
            self.open(cause);
        }
    }

    /// A retryable failure while the breaker is open is the API's, not the
    /// record's: it becomes `Systemic` (not counted as an attempt).
    pub fn blame(&self, verdict: Verdict) -> Verdict {
        match verdict {
            Verdict::Retry(f) if self.is_open() => Verdict::Systemic(f),
            v => v,
        }
    }

    /// A record was enriched: the API works for this session.
    pub fn on_enriched(&self, target: impl FnOnce() -> ProbeTarget) {
        let mut inner = self.inner.lock().unwrap();
        inner.records.push(false);
        inner.last_good = Some(target());
        let s = &self.settings;
        if inner.accepting
            && inner
                .records
                .over(s.min_records, s.dead_letter_ratio)
                .is_none()
        {
            // Records succeed again: a new flood of dead letters is held.
            inner.accepting = false;
        }
    }

    /// A record is about to be dead-lettered for an API reason: may it be?
    /// While open, or when this dead letter pushes the share of dead letters
    /// over `dead_letter_ratio`, it is held instead.
    pub fn on_dead_letter(&self, target: impl FnOnce() -> ProbeTarget) -> DeadLetterGate {
        let mut inner = self.inner.lock().unwrap();
        inner.last_failed = Some(target());
        if self.is_open() {
            return DeadLetterGate::Hold;
        }
        inner.records.push(true);
        if inner.accepting {
            return DeadLetterGate::Allow;
        }
        let s = &self.settings;
        let over = inner.records.over(s.min_records, s.dead_letter_ratio);
        if let Some((dead, records)) = over {
            // The held record is not counted: it was not dead-lettered.
            inner.records.seen.pop_back();
            inner.records.bad -= 1;
            drop(inner);
            self.open(Cause::DeadLetters { dead, records });
            return DeadLetterGate::Hold;
        }
        DeadLetterGate::Allow
    }

    /// The session the probe should ask about: for a systemic errcode the
    /// one that got it (a token is per tenant), for too many dead letters a
    /// held record's (the kind that failed: an old session proves
    /// nothing), for an outage one the API answered with a record before;
    /// else whichever there is.
    pub fn probe_target(&self, cause: &Cause) -> Option<ProbeTarget> {
        let inner = self.inner.lock().unwrap();
        let (first, second) = match cause {
            Cause::Errcode(_) | Cause::DeadLetters { .. } => (&inner.last_failed, &inner.last_good),
            Cause::Outage { .. } => (&inner.last_good, &inner.last_failed),
        };
        first.clone().or_else(|| second.clone())
    }

    /// Whether a probe's answer shows the API works again for `cause`.
    pub fn heals(cause: &Cause, answer: &ApiAnswer, verdict: &Verdict) -> bool {
        match cause {
            // A record for a session of the kind that failed: records can be
            // enriched again. (Held for ever otherwise? No: see
            // `systemic.dead_letter_hold`.)
            Cause::DeadLetters { .. } => matches!(verdict, Verdict::Publish(_)),
            Cause::Outage { .. } | Cause::Errcode(_) => {
                CallOutcome::of(answer, verdict) == CallOutcome::Answered
            }
        }
    }

    /// Ends a dead-letter hold that gave up: closed, the record window kept
    /// (not cleared, as [`Breaker::close`] does), and dead letters allowed
    /// until records succeed again.
    fn accept_dead_letters(&self) {
        self.inner.lock().unwrap().accepting = true;
        self.state.send_if_modified(|s| s.take().is_some());
    }

    /// Waits until the breaker is closed; `false` when shutdown came first.
    pub async fn wait_closed(&self, shutdown: &CancellationToken) -> bool {
        let mut rx = self.state.subscribe();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            r = rx.wait_for(Option::is_none) => r.is_ok(),
        }
    }
}

/// How the probe reaches the API and where it reports: the worker's client,
/// tokens and metrics.
pub trait Probe: Send + Sync + 'static {
    /// Asks the API about `target`: its answer and verdict, or why it could
    /// not ask (e.g. no access token for the tenant).
    fn ask(
        &self,
        target: &ProbeTarget,
    ) -> impl Future<Output = Result<(ApiAnswer, Verdict), String>> + Send;
    /// The breaker opened.
    fn opened(&self, cause: &Cause);
    /// A probe did not show the API works; the next one is in `next_in`.
    fn failed(&self, reason: &str, next_in: Duration);
    /// The breaker closed after `lasted`.
    fn closed(&self, lasted: Duration);
    /// A dead-letter hold gave up after `lasted`: the held records' failures
    /// are taken as their own and dead-lettered.
    fn gave_up(&self, cause: &Cause, lasted: Duration);
}

impl Breaker {
    /// Starts the probe task, which runs until `stop`: whenever the
    /// breaker opens, it reports once, then asks the API with a doubling
    /// delay (`probe_min_delay` to `probe_max_delay`) until an answer shows
    /// the API works, and closes the breaker (records and the consume loop
    /// resume).
    pub fn start_probe<P: Probe>(
        self: &Arc<Self>,
        probe: Arc<P>,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let breaker = self.clone();
        tokio::spawn(async move {
            let mut state = breaker.subscribe();
            loop {
                let cause = tokio::select! {
                    _ = stop.cancelled() => return,
                    open = state.wait_for(Option::is_some) => match open {
                        Ok(cause) => cause.clone().expect("waited for Some"),
                        Err(_) => return,
                    },
                };
                let since = tokio::time::Instant::now();
                probe.opened(&cause);
                match breaker.probe_until_healed(&*probe, &cause, &stop).await {
                    Probed::Healed => {
                        breaker.close();
                        probe.closed(since.elapsed());
                    }
                    Probed::GaveUp => {
                        breaker.accept_dead_letters();
                        probe.gave_up(&cause, since.elapsed());
                    }
                    Probed::Stopped => return,
                }
            }
        })
    }

    /// Asks about a session ([`Breaker::probe_target`]) with a doubling
    /// delay until the answer heals `cause`; a dead-letter hold gives up
    /// after `systemic.dead_letter_hold`.
    async fn probe_until_healed(
        &self,
        probe: &impl Probe,
        cause: &Cause,
        stop: &CancellationToken,
    ) -> Probed {
        let started = tokio::time::Instant::now();
        let mut delay = self.settings.probe_min_delay;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Probed::Stopped,
                _ = tokio::time::sleep(delay) => {}
            }
            if matches!(cause, Cause::DeadLetters { .. })
                && started.elapsed() >= self.settings.dead_letter_hold
            {
                return Probed::GaveUp;
            }
            let reason = match self.probe_target(cause) {
                None => "no session to probe with yet".to_string(),
                Some(target) => {
                    let asked = tokio::select! {
                        _ = stop.cancelled() => return Probed::Stopped,
                        a = probe.ask(&target) => a,
                    };
                    match asked {
                        Ok((answer, verdict)) if Breaker::heals(cause, &answer, &verdict) => {
                            return Probed::Healed;
                        }
                        Ok((_, verdict)) => verdict.failure().map_or_else(
                            || "answered, but not a record".to_string(),
                            |f| f.reason.clone(),
                        ),
                        Err(why) => why,
                    }
                }
            };
            delay = (delay * 2).min(self.settings.probe_max_delay);
            probe.failed(&reason, delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ApiFailure;
    use bytes::Bytes;

    fn settings() -> SystemicSettings {
        SystemicSettings {
            call_window: 10,
            min_calls: 5,
            failure_ratio: 0.8,
            record_window: 10,
            min_records: 4,
            dead_letter_ratio: 0.5,
            probe_min_delay: Duration::from_secs(1),
            probe_max_delay: Duration::from_secs(8),
            dead_letter_hold: Duration::from_secs(60),
        }
    }

    fn target(s: &str) -> ProbeTarget {
        ProbeTarget {
            session_id: s.into(),
            tenant_id: "t".into(),
            call_type: None,
        }
    }

    #[test]
    fn a_few_failures_among_answers_do_not_open() {
        let b = Breaker::new(&settings());
        for i in 0..100 {
            let o = if i % 3 == 0 {
                CallOutcome::Outage
            } else {
                CallOutcome::Answered
            };
            b.on_call(o, || target("s"));
        }
        assert!(!b.is_open());
    }

    #[test]
    fn most_calls_failing_opens_after_min_calls() {
        let b = Breaker::new(&settings());
        for _ in 0..4 {
            b.on_call(CallOutcome::Outage, || target("down"));
            assert!(!b.is_open(), "fewer than min_calls");
        }
        b.on_call(CallOutcome::Outage, || target("down"));
        assert_eq!(
            b.cause(),
            Some(Cause::Outage {
                failed: 5,
                calls: 5
            })
        );
        assert_eq!(
            b.probe_target(b.cause().as_ref().unwrap()),
            Some(target("down"))
        );
    }

    #[test]
    fn a_systemic_errcode_opens_at_once_and_close_starts_afresh() {
        let b = Breaker::new(&settings());
        let mut rx = b.subscribe();
        b.on_call(CallOutcome::Systemic(40001), || target("s"));
        assert_eq!(b.cause(), Some(Cause::Errcode(40001)));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // Further failures while open change nothing.
        b.on_call(CallOutcome::Outage, || target("s"));
        assert!(!rx.has_changed().unwrap());
        b.close();
        assert!(!b.is_open());
        for _ in 0..4 {
            b.on_call(CallOutcome::Outage, || target("s"));
        }
        assert!(!b.is_open(), "the window was cleared on close");
    }

    #[test]
    fn dead_letters_over_the_ratio_are_held() {
        let b = Breaker::new(&settings());
        b.on_enriched(|| target("good"));
        b.on_enriched(|| target("good2"));
        assert_eq!(b.on_dead_letter(|| target("bad")), DeadLetterGate::Allow); // 1 of 3
        assert_eq!(b.on_dead_letter(|| target("bad")), DeadLetterGate::Allow); // 2 of 4 = 0.5, not over
        assert_eq!(b.on_dead_letter(|| target("bad")), DeadLetterGate::Hold); // 3 of 5
        assert_eq!(
            b.cause(),
            Some(Cause::DeadLetters {
                dead: 3,
                records: 5
            })
        );
        assert_eq!(
            b.on_dead_letter(|| target("bad")),
            DeadLetterGate::Hold,
            "held while open"
        );
        // Tried with a held record's session (the kind that failed), as a
        // systemic errcode (a tenant's token) is; an outage with one the
        // API answered before.
        assert_eq!(
            b.probe_target(b.cause().as_ref().unwrap()),
            Some(target("bad"))
        );
        assert_eq!(b.probe_target(&Cause::Errcode(1)), Some(target("bad")));
        let down = Cause::Outage {
            failed: 5,
            calls: 5,
        };
        assert_eq!(b.probe_target(&down), Some(target("good2")));
    }

    #[test]
    fn a_ratio_of_one_never_holds_dead_letters() {
        let mut s = settings();
        s.dead_letter_ratio = 1.0;
        let b = Breaker::new(&s);
        for _ in 0..50 {
            assert_eq!(b.on_dead_letter(|| target("bad")), DeadLetterGate::Allow);
        }
    }

    #[test]
    fn what_heals_depends_on_the_cause() {
        let answered = ApiAnswer::Http {
            status: 200,
            retry_after: None,
            body: Bytes::new(),
        };
        let retry = Verdict::Retry(ApiFailure::new("errcode 10001"));
        let systemic = Verdict::Systemic(ApiFailure::new("systemic"));
        let outage = ApiAnswer::Http {
            status: 503,
            retry_after: None,
            body: Bytes::new(),
        };
        let down = Cause::Outage {
            failed: 5,
            calls: 5,
        };
        assert!(Breaker::heals(&down, &answered, &retry));
        assert!(!Breaker::heals(&down, &outage, &retry));
        assert!(!Breaker::heals(&Cause::Errcode(1), &answered, &systemic));
        let dl = Cause::DeadLetters {
            dead: 3,
            records: 5,
        };
        // Only a record heals a dead-letter hold: an answer is not enough.
        assert!(!Breaker::heals(&dl, &answered, &retry));
        assert!(!Breaker::heals(&dl, &outage, &retry));
    }

    #[tokio::test]
    async fn waiters_are_released_on_close_and_by_shutdown() {
        let b = std::sync::Arc::new(Breaker::new(&settings()));
        let stop = CancellationToken::new();
        assert!(b.wait_closed(&stop).await, "closed: passes at once");
        b.on_call(CallOutcome::Systemic(1), || target("s"));
        let waiter = {
            let (b, stop) = (b.clone(), stop.clone());
            tokio::spawn(async move { b.wait_closed(&stop).await })
        };
        b.close();
        assert!(waiter.await.unwrap());
        b.on_call(CallOutcome::Systemic(1), || target("s"));
        stop.cancel();
        assert!(!b.wait_closed(&stop).await);
    }

    #[test]
    fn failures_while_open_are_blamed_on_the_api() {
        let b = Breaker::new(&settings());
        let retry = || Verdict::Retry(ApiFailure::new("HTTP 503"));
        assert_eq!(b.blame(retry()), retry(), "closed: the record's attempt");
        b.on_call(CallOutcome::Systemic(40001), || target("s"));
        assert_eq!(
            b.blame(retry()),
            Verdict::Systemic(ApiFailure::new("HTTP 503"))
        );
        let dead = Verdict::DeadLetter(ApiFailure::new("not found"));
        assert_eq!(
            b.blame(dead.clone()),
            dead,
            "an answer about the record stays"
        );
    }

    /// A probe whose API fails `failures` times, then answers with a record.
    struct ScriptedProbe {
        failures: Mutex<u32>,
        reports: Mutex<Vec<String>>,
    }

    impl Probe for ScriptedProbe {
        async fn ask(&self, target: &ProbeTarget) -> Result<(ApiAnswer, Verdict), String> {
            let mut left = self.failures.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(format!("{} still down", target.session_id));
            }
            // An answer about the record, whatever it says: the token works.
            let body = Bytes::from_static(br#"{"errcode":10001,"errmsg":"not found"}"#);
            let answer = ApiAnswer::Http {
                status: 200,
                retry_after: None,
                body,
            };
            Ok((answer, Verdict::DeadLetter(ApiFailure::new("not found"))))
        }
        fn opened(&self, cause: &Cause) {
            self.reports.lock().unwrap().push(format!("opened {cause}"));
        }
        fn failed(&self, reason: &str, next_in: Duration) {
            let line = format!("failed {reason}, next in {}s", next_in.as_secs());
            self.reports.lock().unwrap().push(line);
        }
        fn closed(&self, lasted: Duration) {
            let line = format!("closed after {}s", lasted.as_secs());
            self.reports.lock().unwrap().push(line);
        }
        fn gave_up(&self, cause: &Cause, lasted: Duration) {
            let line = format!("gave up {cause} after {}s", lasted.as_secs());
            self.reports.lock().unwrap().push(line);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_backs_off_doubling_until_the_api_answers_then_closes() {
        let b = Arc::new(Breaker::new(&settings()));
        let probe = Arc::new(ScriptedProbe {
            failures: Mutex::new(4),
            reports: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let task = b.start_probe(probe.clone(), stop.clone());
        b.on_call(CallOutcome::Systemic(40001), || target("s1"));
        assert!(b.wait_closed(&stop).await);
        assert_eq!(
            *probe.reports.lock().unwrap(),
            [
                "opened the API answered systemic errcode 40001",
                "failed s1 still down, next in 2s",
                "failed s1 still down, next in 4s",
                "failed s1 still down, next in 8s",
                "failed s1 still down, next in 8s",
                // 1 + 2 + 4 + 8 + 8 seconds of waiting.
                "closed after 23s",
            ]
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_hold_tries_a_held_record_and_gives_up_after_its_bound() {
        let b = Arc::new(Breaker::new(&settings()));
        // The probe's API answers every session, but never with a record.
        let probe = Arc::new(ScriptedProbe {
            failures: Mutex::new(0),
            reports: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let task = b.start_probe(probe.clone(), stop.clone());
        b.on_enriched(|| target("old"));
        let gates: Vec<_> = (0..3).map(|_| b.on_dead_letter(|| target("new"))).collect();
        assert_eq!(gates.last(), Some(&DeadLetterGate::Hold));
        let cause = b.cause().unwrap();
        // Tried with the kind that failed, not the old session.
        assert_eq!(b.probe_target(&cause), Some(target("new")));
        assert!(b.wait_closed(&stop).await);
        let reports = probe.reports.lock().unwrap().clone();
        assert_eq!(
            reports.first().map(String::as_str),
            Some(format!("opened {cause}").as_str())
        );
        // 1 + 2 + 4 + 8 × 7 = 63 s: the first wait past the 60 s bound.
        assert_eq!(
            reports.last().map(String::as_str),
            Some(format!("gave up {cause} after 63s").as_str())
        );
        // The records' own failures now: allowed, the breaker stays closed.
        for _ in 0..20 {
            assert_eq!(b.on_dead_letter(|| target("new")), DeadLetterGate::Allow);
        }
        assert!(!b.is_open());
        // Records succeed again: a new flood is held again.
        for _ in 0..10 {
            b.on_enriched(|| target("good"));
        }
        let gates: Vec<_> = (0..10)
            .map(|_| b.on_dead_letter(|| target("bad")))
            .collect();
        assert!(gates.contains(&DeadLetterGate::Hold), "{gates:?}");
        stop.cancel();
        task.await.unwrap();
    }
}
