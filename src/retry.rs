//! Where retries happen: exponential backoff with jitter and caps (backon's
//! schedule), an optional first delay, a limit on attempts and on elapsed
//! time, `Retry-After` honoured, and shutdown that interrupts a wait.
//!
//! Before every call a record passes its [`Gate`] (the API out of systemic
//! failure, the tenant's rate limit). Time spent at the gate, and calls whose
//! verdict blames the API as a whole or a rate limit, do not count against
//! the record's budget.
//!
//! The same schedule ([`backoff`], without the limits) spaces the retries
//! of a produce (`pipeline::publish`); the systemic-failure probe doubles
//! its own delay between `systemic.probe_min_delay` and `probe_max_delay`.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::classify::{ApiFailure, Verdict};
use crate::detail::CallDetail;
use crate::settings::RetrySettings;

/// The retry schedule of one record.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_attempts: u32,
    pub max_elapsed: Duration,
    /// The wait after a call that did not count (systemic, rate limited).
    pub min_delay: Duration,
    backoff: ExponentialBuilder,
}

/// The `retry` settings' delays (`min_delay` growing by `factor` up to
/// `max_delay`, with jitter when set), without a limit on attempts: the
/// schedule of API retries (which add the limits) and of produce retries.
pub fn backoff(r: &RetrySettings) -> ExponentialBuilder {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(r.min_delay)
        .with_max_delay(r.max_delay)
        .with_factor(r.factor)
        .without_max_times();
    if r.jitter {
        backoff.with_jitter()
    } else {
        backoff
    }
}

impl RetryPolicy {
    pub fn from_settings(r: &RetrySettings) -> Self {
        RetryPolicy {
            initial_delay: r.initial_delay,
            max_attempts: r.max_attempts,
            max_elapsed: r.max_elapsed,
            min_delay: r.min_delay,
            backoff: backoff(r).with_max_times(r.max_attempts.saturating_sub(1) as usize),
        }
    }
}

/// How many calls a record took and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempts {
    pub count: u32,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

/// How the retries of one record ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    Done(Box<CallDetail>, Attempts),
    /// A verdict said dead-letter now.
    Permanent(ApiFailure, Attempts),
    /// Attempts or elapsed time ran out; the last failure is kept.
    Exhausted(ApiFailure, Attempts),
    /// Shutdown came first: nothing is published, the offset is not stored.
    Abandoned,
}

/// What a record waits for before each call.
pub trait Gate {
    /// Waits until a call may go; `false` when shutdown came first.
    fn pass(&self, shutdown: &CancellationToken) -> impl Future<Output = bool> + Send;
}

/// A gate that never waits.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGate;

impl Gate for NoGate {
    async fn pass(&self, shutdown: &CancellationToken) -> bool {
        !shutdown.is_cancelled()
    }
}

/// Calls `attempt` until its verdict is final, the budget is spent or
/// `shutdown` fires (which ends a backoff wait at once). `attempt` receives
/// the 1-based number of the attempt it would be. A `Systemic` or
/// `RateLimited` verdict is not counted: the record waits `min_delay` (or
/// the `Retry-After`) and at the gate, and calls again.
pub async fn run<F, Fut>(
    policy: &RetryPolicy,
    shutdown: &CancellationToken,
    gate: &impl Gate,
    mut attempt: F,
) -> RetryOutcome
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Verdict>,
{
    let Some(mut budget) = Budget::start(policy, shutdown).await else {
        return RetryOutcome::Abandoned;
    };
    let first_at = Utc::now();
    let mut count = 0;
    loop {
        if !budget.hold(gate.pass(shutdown)).await {
            return RetryOutcome::Abandoned;
        }
        // A call under way when shutdown starts is let finish (it is bounded
        // by the request timeout, shorter than the drain deadline); no new
        // call starts after it.
        if shutdown.is_cancelled() {
            return RetryOutcome::Abandoned;
        }
        let verdict = attempt(count + 1).await;
        if let Verdict::Systemic(f) | Verdict::RateLimited(f) = &verdict {
            // At least `min_delay`: a `Retry-After: 0` must not spin.
            let wait = f.retry_after.unwrap_or_default().max(policy.min_delay);
            if !budget.hold(pause(wait, shutdown)).await {
                return RetryOutcome::Abandoned;
            }
            continue;
        }
        count += 1;
        let attempts = Attempts {
            count,
            first_at,
            last_at: Utc::now(),
        };
        let failure = match verdict {
            Verdict::Publish(detail) => return RetryOutcome::Done(detail, attempts),
            Verdict::DeadLetter(f) => return RetryOutcome::Permanent(f, attempts),
            Verdict::Retry(f) | Verdict::Systemic(f) | Verdict::RateLimited(f) => f,
        };
        let Some(delay) = budget.next_delay(&failure) else {
            return RetryOutcome::Exhausted(failure, attempts);
        };
        if !pause(delay, shutdown).await {
            return RetryOutcome::Abandoned;
        }
    }
}

/// What is left of one record's retry budget: the backoff schedule, and the
/// time since the record started less the time it was held (at the gate, or
/// waiting after a call that did not count).
struct Budget {
    delays: ExponentialBackoff,
    started: Instant,
    held: Duration,
    max_elapsed: Duration,
}

impl Budget {
    /// Starts the clock, then waits `initial_delay` (which counts); `None`
    /// when shutdown came first.
    async fn start(policy: &RetryPolicy, shutdown: &CancellationToken) -> Option<Budget> {
        let started = Instant::now();
        if !policy.initial_delay.is_zero() && !pause(policy.initial_delay, shutdown).await {
            return None;
        }
        Some(Budget {
            delays: policy.backoff.build(),
            started,
            held: Duration::ZERO,
            max_elapsed: policy.max_elapsed,
        })
    }

    /// Awaits `wait` without counting its time against `max_elapsed`.
    async fn hold(&mut self, wait: impl Future<Output = bool>) -> bool {
        let since = Instant::now();
        let passed = wait.await;
        self.held += since.elapsed();
        passed
    }

    /// The wait before the next attempt after `failure`: the next backoff
    /// delay, at least its `Retry-After`. `None` when the attempts are used
    /// up or the wait would end after `max_elapsed`.
    fn next_delay(&mut self, failure: &ApiFailure) -> Option<Duration> {
        let mut delay = self.delays.next()?;
        if let Some(after) = failure.retry_after {
            delay = delay.max(after);
        }
        let spent = self.started.elapsed().saturating_sub(self.held);
        (spent + delay <= self.max_elapsed).then_some(delay)
    }
}

/// Sleeps unless shut down first; `false` means shutdown.
async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ApiFailure;
    use std::sync::{Arc, Mutex};

    fn settings() -> RetrySettings {
        RetrySettings {
            initial_delay: Duration::ZERO,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            factor: 2.0,
            max_attempts: 6,
            max_elapsed: Duration::from_secs(3600),
            jitter: false,
            permanent_errcodes: vec![],
            systemic_errcodes: vec![],
            rate_limited_errcodes: vec![],
        }
    }

    fn fail(reason: &str) -> Verdict {
        Verdict::Retry(ApiFailure {
            reason: reason.into(),
            http_status: None,
            errcode: Some(1),
            errmsg: None,
            retry_after: None,
        })
    }

    fn detail() -> Box<CallDetail> {
        Box::new(
            CallDetail::from_data(&serde_json::json!({"session_id": "s"}))
                .unwrap()
                .unwrap(),
        )
    }

    /// Runs `run` with a script of verdicts, recording when each attempt
    /// happened (paused time: the instants are exact).
    async fn scripted(policy: RetryPolicy, script: Vec<Verdict>) -> (RetryOutcome, Vec<Duration>) {
        let start = Instant::now();
        let at = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let shutdown = CancellationToken::new();
        let out = run(&policy, &shutdown, &NoGate, |_| {
            at.lock().unwrap().push(start.elapsed());
            let v = script
                .lock()
                .unwrap()
                .next()
                .unwrap_or_else(|| fail("again"));
            async move { v }
        })
        .await;
        let times = at.lock().unwrap().clone();
        (out, times)
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap() {
        let (out, times) = scripted(RetryPolicy::from_settings(&settings()), vec![]).await;
        let secs: Vec<u64> = times.iter().map(Duration::as_secs).collect();
        // delays 1, 2, 4, 8, 8 -> attempts at 0, 1, 3, 7, 15, 23
        assert_eq!(secs, vec![0, 1, 3, 7, 15, 23]);
        match out {
            RetryOutcome::Exhausted(f, a) => {
                assert_eq!(a.count, 6);
                assert_eq!(f.reason, "again");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_then_success() {
        let (out, times) = scripted(
            RetryPolicy::from_settings(&settings()),
            vec![fail("a"), fail("b"), Verdict::Publish(detail())],
        )
        .await;
        assert_eq!(times.len(), 3);
        assert!(matches!(
            out,
            RetryOutcome::Done(_, Attempts { count: 3, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn initial_delay_and_jitter_stay_within_bounds() {
        let mut s = settings();
        s.initial_delay = Duration::from_secs(5);
        s.jitter = true;
        let (_, times) = scripted(RetryPolicy::from_settings(&s), vec![]).await;
        assert_eq!(times[0], Duration::from_secs(5));
        // With jitter each delay d becomes d + [0, d): between d and 2d.
        let nominal = [1u64, 2, 4, 8, 8];
        for (i, w) in times.windows(2).enumerate() {
            let gap = w[1] - w[0];
            let d = Duration::from_secs(nominal[i]);
            assert!(gap >= d && gap <= 2 * d, "gap {i}: {gap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_budget_ends_retries_early() {
        let mut s = settings();
        s.max_elapsed = Duration::from_secs(5);
        let (out, times) = scripted(RetryPolicy::from_settings(&s), vec![]).await;
        // attempts at 0, 1, 3; the next (at 7) would pass 5s.
        assert_eq!(times.len(), 3);
        assert!(matches!(out, RetryOutcome::Exhausted(..)));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_stretches_the_delay() {
        let slow = Verdict::Retry(ApiFailure {
            reason: "429".into(),
            http_status: Some(429),
            errcode: None,
            errmsg: None,
            retry_after: Some(Duration::from_secs(30)),
        });
        let (_, times) = scripted(
            RetryPolicy::from_settings(&settings()),
            vec![slow, Verdict::Publish(detail())],
        )
        .await;
        assert_eq!(times[1], Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn systemic_and_rate_limited_calls_do_not_count_against_the_budget() {
        let mut s = settings();
        s.max_attempts = 2;
        s.max_elapsed = Duration::from_secs(3);
        let systemic = || {
            Verdict::Systemic(ApiFailure {
                reason: "systemic errcode 40001".into(),
                http_status: Some(200),
                errcode: Some(40001),
                errmsg: None,
                retry_after: None,
            })
        };
        let limited = Verdict::RateLimited(ApiFailure {
            reason: "HTTP 429".into(),
            http_status: Some(429),
            errcode: None,
            errmsg: None,
            retry_after: Some(Duration::from_secs(10)),
        });
        let mut script = vec![fail("a")];
        script.extend((0..20).map(|_| systemic()));
        script.push(limited);
        script.push(Verdict::Publish(detail()));
        let (out, times) = scripted(RetryPolicy::from_settings(&s), script).await;
        // 23 calls over 1 + 20 + 10 s: far past max_elapsed (3 s) and
        // max_attempts (2), yet only two calls counted.
        assert_eq!(times.len(), 23);
        assert_eq!(*times.last().unwrap(), Duration::from_secs(31));
        assert!(
            matches!(out, RetryOutcome::Done(_, Attempts { count: 2, .. })),
            "{out:?}"
        );
    }

    /// A gate closed for a while: the wait is not part of the budget.
    struct ClosedFor(Duration);

    impl Gate for ClosedFor {
        async fn pass(&self, shutdown: &CancellationToken) -> bool {
            pause(self.0, shutdown).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn time_at_the_gate_does_not_count_against_max_elapsed() {
        let mut s = settings();
        s.max_elapsed = Duration::from_secs(5);
        let policy = RetryPolicy::from_settings(&s);
        let shutdown = CancellationToken::new();
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        let out = run(
            &policy,
            &shutdown,
            &ClosedFor(Duration::from_secs(60)),
            move |_| {
                *c.lock().unwrap() += 1;
                async { fail("x") }
            },
        )
        .await;
        // As in elapsed_budget_ends_retries_early: three calls, though each
        // waited a minute at the gate first.
        assert_eq!(*calls.lock().unwrap(), 3);
        assert!(matches!(out, RetryOutcome::Exhausted(..)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_initial_delay_counts_against_the_budget_but_held_time_does_not() {
        let mut s = settings();
        s.initial_delay = Duration::from_secs(5);
        s.max_elapsed = Duration::from_secs(7);
        let policy = RetryPolicy::from_settings(&s);
        let mut budget = Budget::start(&policy, &CancellationToken::new())
            .await
            .unwrap();
        let failure = ApiFailure::new("again");
        // 5s spent: the first backoff (1s) fits.
        assert_eq!(budget.next_delay(&failure), Some(Duration::from_secs(1)));
        // 60s held do not count: 5s spent and the second backoff (2s) fits.
        assert!(
            budget
                .hold(pause(Duration::from_secs(60), &CancellationToken::new()))
                .await
        );
        assert_eq!(budget.next_delay(&failure), Some(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(1)).await;
        // 6s counted: 4s more would end after max_elapsed.
        assert_eq!(budget.next_delay(&failure), None);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_verdict_stops_at_once() {
        let perm = Verdict::DeadLetter(ApiFailure {
            reason: "permanent errcode 4".into(),
            http_status: Some(200),
            errcode: Some(4),
            errmsg: None,
            retry_after: None,
        });
        let (out, times) = scripted(RetryPolicy::from_settings(&settings()), vec![perm]).await;
        assert_eq!(times.len(), 1);
        assert!(matches!(
            out,
            RetryOutcome::Permanent(_, Attempts { count: 1, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_interrupts_a_backoff_wait() {
        let policy = RetryPolicy::from_settings(&settings());
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        let out = run(&policy, &shutdown, &NoGate, move |_| {
            *c.lock().unwrap() += 1;
            // Shut down while the first failure waits for its retry.
            trigger.cancel();
            async { fail("x") }
        })
        .await;
        assert_eq!(out, RetryOutcome::Abandoned);
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_under_way_at_shutdown_is_finished_and_published() {
        let policy = RetryPolicy::from_settings(&settings());
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let out = run(&policy, &shutdown, &NoGate, move |_| {
            trigger.cancel();
            async { Verdict::Publish(detail()) }
        })
        .await;
        assert!(matches!(out, RetryOutcome::Done(..)));
    }
}
