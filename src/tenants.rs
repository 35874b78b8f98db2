//! Tenants do not hurt each other: a failure confined to one tenant holds
//! **that tenant's** records, not the worker. Each tenant can have a breaker
//! of its own (the same [`Breaker`]), opened by a systemic errcode (an
//! expired or invalid access token: a token is per tenant), by the failures
//! of its own API (`tenants.<id>.base_url`), or, with several tenants, by
//! too many of its records being dead-lettered; a probe asks the API about
//! that tenant's sessions. The other tenants go on at full speed.
//!
//! A held record gives its place in the window back and waits; it is not
//! counted against the consume loop's window either, up to
//! `pipeline.max_held_records` (beyond that the loop stops taking records, so
//! memory stays bounded). Its offset is not committed while it waits: after a
//! restart it, and what followed it in its partition, is read again. With
//! `pipeline.held_overflow = "dead_letter"` (the default), a held tenant's
//! record past that bound is dead-lettered as `tenant_held` instead, while
//! another tenant with a token is not held and the worker as a whole is
//! not, so the others' records go on being read (a record that waited
//! before keeps its claim, so the count can pass the bound by those).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::settings::SystemicSettings;
use crate::systemic::Breaker;

/// Newly created tenant breakers, for the task that starts their probes.
pub type NewTenants = mpsc::UnboundedReceiver<(String, Arc<Breaker>)>;

/// Every tenant's breaker, created when the tenant first gets a systemic
/// errcode.
pub struct Tenants {
    settings: SystemicSettings,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    /// Newly created breakers, for the task that starts their probes.
    created: mpsc::UnboundedSender<(String, Arc<Breaker>)>,
    /// Records waiting for their tenant now.
    held: AtomicUsize,
}

/// A held record, counted while it lives.
pub struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Tenants {
    /// The tenants, and the receiving end of newly created breakers.
    pub fn new(settings: &SystemicSettings) -> (Tenants, NewTenants) {
        let (created, rx) = mpsc::unbounded_channel();
        let tenants = Tenants {
            settings: settings.clone(),
            breakers: Mutex::new(HashMap::new()),
            created,
            held: AtomicUsize::new(0),
        };
        (tenants, rx)
    }

    /// The tenant's breaker, if it ever had one.
    pub fn get(&self, tenant: &str) -> Option<Arc<Breaker>> {
        self.breakers.lock().unwrap().get(tenant).cloned()
    }

    /// The tenant's breaker, created (and announced) on first use.
    pub fn breaker(&self, tenant: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap();
        if let Some(b) = breakers.get(tenant) {
            return b.clone();
        }
        let b = Arc::new(Breaker::new(&self.settings));
        breakers.insert(tenant.to_string(), b.clone());
        // The receiver lives as long as the worker's helpers; a send after
        // they stopped (shutdown) needs no probe.
        let _ = self.created.send((tenant.to_string(), b.clone()));
        b
    }

    /// Whether the tenant's records are held now.
    pub fn is_held(&self, tenant: &str) -> bool {
        self.get(tenant).is_some_and(|b| b.is_open())
    }

    /// Counts a record as held until the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        self.held.fetch_add(1, Ordering::SeqCst);
        Held(&self.held)
    }

    /// As [`Tenants::hold`] while fewer than `room` records are held;
    /// `None` when that many are.
    pub fn try_hold(&self, room: usize) -> Option<Held<'_>> {
        (self.held)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < room).then_some(n + 1)
            })
            .ok()
            .map(|_| Held(&self.held))
    }

    /// Records held now.
    pub fn held_records(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemic::{CallOutcome, ProbeTarget};

    fn settings() -> SystemicSettings {
        crate::settings::Settings::load_from(None, Vec::new())
            .unwrap()
            .systemic
    }

    #[test]
    fn a_tenant_is_held_alone_and_its_breaker_announced_once() {
        let (tenants, mut created) = Tenants::new(&settings());
        let target = || ProbeTarget {
            session_id: "s".into(),
            tenant_id: "t1".into(),
            call_type: None,
        };
        tenants
            .breaker("t1")
            .on_call(CallOutcome::Systemic(40001), target);
        assert!(tenants.is_held("t1"));
        assert!(!tenants.is_held("t2"), "the other tenant goes on");
        let _ = tenants.breaker("t1");
        assert_eq!(created.try_recv().unwrap().0, "t1");
        assert!(created.try_recv().is_err(), "announced once");
    }

    #[test]
    fn try_hold_counts_up_to_its_room_only() {
        let (tenants, _created) = Tenants::new(&settings());
        let first = tenants.try_hold(2).expect("room for two");
        let second = tenants.try_hold(2).expect("room for two");
        assert!(tenants.try_hold(2).is_none());
        assert_eq!(tenants.held_records(), 2);
        drop(first);
        assert!(tenants.try_hold(2).is_some(), "a place came free");
        drop(second);
        assert_eq!(tenants.held_records(), 0);
    }

    #[test]
    fn held_records_are_counted_while_they_wait() {
        let (tenants, _created) = Tenants::new(&settings());
        let a = tenants.hold();
        let b = tenants.hold();
        assert_eq!(tenants.held_records(), 2);
        drop(a);
        drop(b);
        assert_eq!(tenants.held_records(), 0);
    }
}
