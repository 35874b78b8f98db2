//! Systemic failure: when the API fails as a whole (it is down, the token is
//! invalid, or most records end as dead letters) no record is at fault, so
//! none may be dead-lettered for it. The [`Breaker`] watches API calls and
//! record outcomes; once open, records wait at their gate, the consume loop
//! pauses, `/readyz` fails and a probe calls the API with backoff until an
//! answer shows it works again.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;
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
    /// A session whose call last failed: the probe when nothing succeeded yet.
    last_failed: Option<ProbeTarget>,
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

    /// A record was enriched: the API works for this session.
    pub fn on_enriched(&self, target: impl FnOnce() -> ProbeTarget) {
        let mut inner = self.inner.lock().unwrap();
        inner.records.push(false);
        inner.last_good = Some(target());
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
    /// one that got it (a token is per tenant), otherwise one the API
    /// answered with a record before, else the last failing one.
    pub fn probe_target(&self, cause: &Cause) -> Option<ProbeTarget> {
        let inner = self.inner.lock().unwrap();
        let (first, second) = match cause {
            Cause::Errcode(_) => (&inner.last_failed, &inner.last_good),
            _ => (&inner.last_good, &inner.last_failed),
        };
        first.clone().or_else(|| second.clone())
    }

    /// Whether any record was enriched since start.
    pub fn has_good(&self) -> bool {
        self.inner.lock().unwrap().last_good.is_some()
    }

    /// Whether a probe's answer shows the API works again for `cause`.
    /// `known_good` says whether the probe asked about a session the API
    /// answered with a record before.
    pub fn heals(cause: &Cause, answer: &ApiAnswer, verdict: &Verdict, known_good: bool) -> bool {
        match cause {
            // A record for a session that had one proves that records can be
            // enriched again. With no such session (nothing enriched since
            // start), an answer that is no outage must do: the records may
            // simply all be bad, and waiting for ever would wedge the worker.
            Cause::DeadLetters { .. } if known_good => matches!(verdict, Verdict::Publish(_)),
            Cause::DeadLetters { .. } => CallOutcome::of(answer, verdict) == CallOutcome::Answered,
            Cause::Outage { .. } | Cause::Errcode(_) => {
                CallOutcome::of(answer, verdict) == CallOutcome::Answered
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ApiFailure;
    use bytes::Bytes;
    use std::time::Duration;

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
        assert_eq!(
            b.probe_target(b.cause().as_ref().unwrap()),
            Some(target("good2"))
        );
        // A systemic errcode (a tenant's token) is probed with its session.
        assert_eq!(b.probe_target(&Cause::Errcode(1)), Some(target("bad")));
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
        assert!(Breaker::heals(&down, &answered, &retry, true));
        assert!(!Breaker::heals(&down, &outage, &retry, true));
        assert!(!Breaker::heals(
            &Cause::Errcode(1),
            &answered,
            &systemic,
            true
        ));
        let dl = Cause::DeadLetters {
            dead: 3,
            records: 5,
        };
        assert!(!Breaker::heals(&dl, &answered, &retry, true));
        assert!(Breaker::heals(&dl, &answered, &retry, false), "no wedge");
        assert!(!Breaker::heals(&dl, &outage, &retry, false));
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
}
