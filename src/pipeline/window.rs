//! The window of `pipeline.max_in_flight` places, shared fairly between
//! tenants: a tenant holds at most its share (`pipeline.max_in_flight_per_tenant`)
//! while another tenant waits. A free place goes to whoever asks; when places
//! are scarce, a freed place goes to the waiting tenant that holds the
//! fewest, so a slow or backing-off tenant gives places back to the others
//! as its calls end.
//!
//! A tenant's records past its share (those holding places, then those
//! waiting) are *over its share* ([`Window::over_share`]) while they wait:
//! the consume loop does not count them against what it admits (like a held
//! tenant's records, up to `pipeline.max_held_records`), so it reads on past
//! a slow tenant's records to the other tenants' behind them.
//!
//! With one tenant only, its share is the whole window: nothing changes for
//! a single-tenant deployment.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Places in the window, handed to tenants fairly.
pub struct Window {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// The most places a tenant holds while others wait.
    share: AtomicUsize,
    /// The share that applies once there are several tenants.
    configured_share: usize,
    size: usize,
}

struct State {
    free: usize,
    tenants: HashMap<String, Tenant>,
}

#[derive(Default)]
struct Tenant {
    holding: usize,
    waiting: VecDeque<oneshot::Sender<Place>>,
}

/// One place in the window; given back when dropped.
pub struct Place {
    inner: Arc<Inner>,
    tenant: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.inner.give_back(&self.tenant);
    }
}

impl Window {
    /// A window of `size` places, each tenant's share `share` once there
    /// are several tenants (see [`Window::set_tenants`]).
    pub fn new(size: usize, share: usize) -> Window {
        let share = share.clamp(1, size.max(1));
        Window {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    free: size,
                    tenants: HashMap::new(),
                }),
                share: AtomicUsize::new(share),
                configured_share: share,
                size,
            }),
        }
    }

    /// Tells how many tenants have a token: with one (or none) the share is
    /// the whole window.
    pub fn set_tenants(&self, tenants: usize) {
        let inner = &self.inner;
        let share = if tenants <= 1 {
            inner.size
        } else {
            inner.configured_share
        };
        inner.share.store(share, Ordering::Relaxed);
    }

    /// A place for one of `tenant`'s records: at once if one is free, else
    /// when one is handed to it.
    pub async fn acquire(&self, tenant: &str) -> Place {
        let waiting = {
            let mut state = self.inner.state.lock().unwrap();
            if state.free > 0 {
                state.free -= 1;
                state.tenants.entry(tenant.to_string()).or_default().holding += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                let t = state.tenants.entry(tenant.to_string()).or_default();
                t.waiting.push_back(tx);
                Some(rx)
            }
        };
        match waiting {
            None => Place {
                inner: self.inner.clone(),
                tenant: tenant.to_string(),
            },
            // The sender is only dropped after sending (the state owns it
            // until then).
            Some(rx) => rx.await.expect("a waiting record is handed a place"),
        }
    }

    /// Records waiting for a place beyond their tenant's share: of a tenant
    /// holding `h` places with `w` records waiting, those of the `w` past
    /// the share. Cheap (per tenant, not per record: the loop asks at every
    /// turn); a record that gave up waiting (cancelled) is counted until the
    /// next place given back passes it over.
    pub fn over_share(&self) -> usize {
        let share = self.inner.share.load(Ordering::Relaxed);
        if share >= self.inner.size {
            // One tenant, or a share of the whole window: waiting for a
            // place is waiting for the window, counted as ever.
            return 0;
        }
        let state = self.inner.state.lock().unwrap();
        (state.tenants.values())
            .map(|t| {
                let waiting = t.waiting.len();
                (t.holding + waiting).saturating_sub(share).min(waiting)
            })
            .sum()
    }
}

impl Inner {
    /// A place given back: to the waiting tenant holding the fewest, else
    /// free. A waiter that gave up (its record cancelled) is passed over.
    fn give_back(self: &Arc<Self>, from: &str) {
        let mut state = self.state.lock().unwrap();
        if let Some(t) = state.tenants.get_mut(from) {
            t.holding -= 1;
        }
        loop {
            let next = (state.tenants.iter_mut())
                .filter(|(_, t)| !t.waiting.is_empty())
                .min_by_key(|(_, t)| t.holding);
            let Some((name, t)) = next else {
                state.free += 1;
                break;
            };
            let waiter = t.waiting.pop_front().expect("a waiting record");
            if waiter.is_closed() {
                continue;
            }
            t.holding += 1;
            let place = Place {
                inner: self.clone(),
                tenant: name.clone(),
            };
            // The receiver may be dropped between the check and the send:
            // the place comes back here, and is given back after the lock.
            if let Err(place) = waiter.send(place) {
                drop(state);
                drop(place);
                return;
            }
            break;
        }
        state
            .tenants
            .retain(|_, t| t.holding > 0 || !t.waiting.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `fut` once: `Some` if it is ready.
    fn now<F: std::future::Future>(fut: F) -> Option<F::Output> {
        futures::FutureExt::now_or_never(fut)
    }

    #[tokio::test]
    async fn a_freed_place_goes_to_the_tenant_holding_fewest() {
        let w = Window::new(4, 2);
        w.set_tenants(2);
        let mut slow: Vec<Place> = (0..4).map(|_| now(w.acquire("slow")).unwrap()).collect();
        // The window is full of the slow tenant's calls; both wait, the
        // slow tenant first.
        let mut more_slow = Box::pin(w.acquire("slow"));
        assert!(now(more_slow.as_mut()).is_none());
        let mut fast = Box::pin(w.acquire("fast"));
        assert!(now(fast.as_mut()).is_none());
        assert_eq!(w.over_share(), 1, "the slow tenant's waiting record");
        slow.pop();
        let fast = now(fast.as_mut())
            .expect("the fast tenant gets the freed place, though it asked later");
        assert!(now(more_slow.as_mut()).is_none());
        drop(fast);
        assert!(now(more_slow.as_mut()).is_some(), "then the slow one");
    }

    #[tokio::test]
    async fn records_past_the_share_count_whether_they_hold_or_wait() {
        let w = Window::new(2, 1);
        w.set_tenants(2);
        let _a = now(w.acquire("a")).unwrap();
        let _b = now(w.acquire("b")).unwrap();
        // Tenant a holds its share; of its three waiting records all are
        // past it; b's one waiting record is past its share too.
        let mut waiting: Vec<_> = ["a", "a", "a", "b"].map(|t| Box::pin(w.acquire(t))).into();
        for f in &mut waiting {
            assert!(now(f.as_mut()).is_none());
        }
        assert_eq!(w.over_share(), 4);
        // Records that give up are counted until a place given back passes
        // them over: b's own waiter gave up, so b's place goes to a's first.
        waiting.truncate(1);
        assert_eq!(w.over_share(), 4);
        drop(_b);
        assert!(now(waiting[0].as_mut()).is_some());
    }

    #[tokio::test]
    async fn free_places_go_to_whoever_asks_and_one_tenant_has_the_whole_window() {
        let w = Window::new(4, 1);
        w.set_tenants(1);
        let held: Vec<Place> = (0..4).map(|_| now(w.acquire("only")).unwrap()).collect();
        let mut waiting = Box::pin(w.acquire("only"));
        assert!(now(waiting.as_mut()).is_none());
        assert_eq!(w.over_share(), 0, "a single tenant is never over its share");
        w.set_tenants(3);
        assert_eq!(w.over_share(), 1, "with several tenants, a share of 1");
        drop(held);
        assert!(now(waiting.as_mut()).is_some());
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_is_passed_over_and_no_place_is_lost() {
        let w = Window::new(1, 1);
        let first = now(w.acquire("a")).unwrap();
        let mut gave_up = Box::pin(w.acquire("b"));
        assert!(now(gave_up.as_mut()).is_none());
        let mut next = Box::pin(w.acquire("c"));
        assert!(now(next.as_mut()).is_none());
        drop(gave_up);
        drop(first);
        let place = now(next.as_mut()).expect("the next waiter has the place");
        drop(place);
        assert!(now(w.acquire("d")).is_some(), "the place came back");
        assert!(w.inner.state.lock().unwrap().tenants.is_empty());
    }
}
