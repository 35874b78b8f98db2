//! Calls per second to the API, per tenant (a token bucket, governor's
//! GCRA), and the back-off of a tenant after the API said "too many calls"
//! (HTTP 429 or a rate-limited errcode). Both are per replica: the tenant's
//! quota must cover the limit times the number of replicas.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settings::{RateLimitSettings, TenantSettings};

/// A tenant's back-off after rate-limited answers.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    /// Rate-limited answers in a row; the next back-off doubles with each.
    streak: u32,
}

#[derive(Debug)]
pub struct RateLimits {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Tenants with a limit of their own (`tenants.<id>.per_second`; `None`:
    /// no limit).
    own: HashMap<String, Option<DefaultDirectRateLimiter>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    min: Duration,
    max: Duration,
}

impl RateLimits {
    pub fn new(s: &RateLimitSettings, tenants: &BTreeMap<String, TenantSettings>) -> Self {
        let burst = NonZeroU32::new(s.burst).unwrap_or(NonZeroU32::MIN);
        let quota = |rate| NonZeroU32::new(rate).map(|r| Quota::per_second(r).allow_burst(burst));
        let own = tenants
            .iter()
            .filter_map(|(t, o)| Some((t.clone(), quota(o.per_second?).map(RateLimiter::direct))))
            .collect();
        RateLimits {
            limiter: quota(s.per_tenant_per_second).map(RateLimiter::keyed),
            own,
            backoff: Mutex::new(HashMap::new()),
            min: s.backoff_min,
            max: s.backoff_max,
        }
    }

    /// Waits until `tenant` may make a call; `false` on shutdown.
    pub async fn acquire(&self, tenant: &str, shutdown: &CancellationToken) -> bool {
        loop {
            let until = self.backoff.lock().unwrap().get(tenant).map(|b| b.until);
            match until {
                Some(at) if at > Instant::now() => {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                _ => break,
            }
        }
        if let Some(own) = self.own.get(tenant) {
            let Some(limiter) = own else { return true };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return false,
                _ = limiter.until_ready() => {}
            }
        } else if let Some(limiter) = &self.limiter {
            let key = tenant.to_string();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return false,
                _ = limiter.until_key_ready(&key) => {}
            }
        }
        true
    }

    /// The API said "too many calls" for `tenant`: its calls wait for
    /// `Retry-After`, or a back-off that doubles per episode in a row. The
    /// answers of calls that were already under way when a back-off began
    /// belong to the same episode and do not double it. Returns the wait.
    pub fn limited(&self, tenant: &str, retry_after: Option<Duration>) -> Duration {
        let mut map = self.backoff.lock().unwrap();
        let now = Instant::now();
        let entry = map.entry(tenant.to_string()).or_insert(Backoff {
            until: now,
            streak: 0,
        });
        if entry.until <= now {
            let doubled = self
                .min
                .saturating_mul(1u32 << entry.streak.min(16))
                .min(self.max);
            entry.streak = entry.streak.saturating_add(1);
            // `Retry-After` wins, but no less than `backoff_min`.
            entry.until = now + retry_after.map_or(doubled, |a| a.max(self.min));
        } else if let Some(after) = retry_after {
            entry.until = entry.until.max(now + after);
        }
        entry.until - now
    }

    /// A call of `tenant` was not rate limited: the back-off starts over.
    pub fn answered(&self, tenant: &str) {
        let mut map = self.backoff.lock().unwrap();
        if map.get(tenant).is_some_and(|b| b.until <= Instant::now()) {
            map.remove(tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_tenant_per_second: u32) -> RateLimitSettings {
        RateLimitSettings {
            per_tenant_per_second,
            burst: 1,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
        }
    }

    fn limits() -> RateLimits {
        RateLimits::new(&settings(0), &BTreeMap::new())
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_per_episode_up_to_the_cap_and_resets() {
        let l = limits();
        let stop = CancellationToken::new();
        let mut waits = Vec::new();
        for _ in 0..5 {
            let wait = l.limited("t", None);
            // Answers of calls under way in the same episode: no doubling.
            assert_eq!(l.limited("t", None), wait);
            waits.push(wait.as_secs());
            let start = Instant::now();
            assert!(l.acquire("t", &stop).await);
            assert_eq!(start.elapsed(), wait);
        }
        assert_eq!(waits, vec![1, 2, 4, 5, 5]);
        l.answered("t");
        assert_eq!(l.limited("t", None), Duration::from_secs(1), "reset");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_wins_and_other_tenants_are_not_slowed() {
        let l = limits();
        let stop = CancellationToken::new();
        assert_eq!(
            l.limited("a", Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        let start = Instant::now();
        assert!(l.acquire("b", &stop).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(l.acquire("a", &stop).await);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_backoff_wait() {
        let l = limits();
        let stop = CancellationToken::new();
        l.limited("t", Some(Duration::from_secs(3600)));
        stop.cancel();
        assert!(!l.acquire("t", &stop).await);
    }

    #[tokio::test]
    async fn a_tenant_with_a_limit_of_its_own_keeps_to_it_and_the_others_to_theirs() {
        use futures::poll;
        let own = |per_second| TenantSettings {
            per_second: Some(per_second),
            ..Default::default()
        };
        let tenants = BTreeMap::from([("slow".to_string(), own(1)), ("free".to_string(), own(0))]);
        let l = RateLimits::new(&settings(1000), &tenants);
        let stop = CancellationToken::new();
        assert!(l.acquire("slow", &stop).await);
        let mut second = std::pin::pin!(l.acquire("slow", &stop));
        assert!(
            poll!(second.as_mut()).is_pending(),
            "1 per second: the next call waits"
        );
        for _ in 0..20 {
            assert!(
                l.acquire("free", &stop).await,
                "0: no limit for this tenant"
            );
        }
        assert!(
            l.acquire("other", &stop).await,
            "the others keep the common limit"
        );
    }
}
