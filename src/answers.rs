//! API answers shared between the records of one session: calls for the
//! same (tenant, session, call type) in flight at once become one call,
//! and the answer of a session enriched lately is reused for
//! `api.recent_answers_ttl` (bounded by `api.recent_answers_bytes`).
//!
//! Events of a session come more than once: a push and a backfill of the
//! same call, a re-delivery after a crash or a rebalance, a replay. Each
//! still gets its own output record; only the API call is shared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use lru::LruCache;
use tokio::sync::watch;

use crate::classify::Verdict;
use crate::uincall::Timed;

/// What a call is known by: tenant, session and call type, framed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallKey(Box<str>);

impl CallKey {
    pub fn new(tenant: &str, session: &str, call_type: Option<i64>) -> CallKey {
        let ct = call_type.map(|c| c.to_string()).unwrap_or_default();
        // Lengths first: no two (tenant, session) pairs share a key.
        CallKey(format!("{}:{}:{tenant}{session}{ct}", tenant.len(), session.len()).into())
    }

    fn bytes(&self) -> usize {
        self.0.len()
    }
}

/// One call's outcome, as every record that waited for it sees it.
#[derive(Debug, Clone)]
pub struct Answered {
    pub timed: Timed,
    pub verdict: Verdict,
}

/// A successful answer kept for reuse.
#[derive(Debug, Clone)]
pub struct Recent {
    /// The answer's body as received (copied: it pins no read buffer).
    pub body: Bytes,
    pub fetched_at: DateTime<Utc>,
    pub latency: Duration,
    kept_at: Instant,
}

/// How a record gets its answer.
pub enum Turn {
    /// Make the call, then [`Leader::done`] to hand its outcome to the
    /// records that joined. Dropped before that (shutdown, revocation),
    /// the records that joined make their own call.
    Lead(Leader),
    /// Another record's call for the same key is under way: wait for it.
    Join(Joined),
}

/// The record making a shared call.
pub struct Leader {
    answers: Arc<Answers>,
    key: CallKey,
    /// Tells this call's entry from a later one of the same key.
    id: u64,
    tx: watch::Sender<Option<Arc<Answered>>>,
}

/// Where a call's outcome is awaited.
type Shared = watch::Receiver<Option<Arc<Answered>>>;

/// A record waiting for another's call.
pub struct Joined(Shared);

impl Joined {
    /// The shared outcome; `None` when the record making the call went
    /// away without one.
    pub async fn outcome(mut self) -> Option<Arc<Answered>> {
        let answered = self.0.wait_for(Option::is_some).await.ok()?;
        answered.clone()
    }
}

impl Leader {
    /// Hands the outcome to the records that joined (cloned only when some
    /// did); a successful answer (`Publish`) is kept for reuse.
    pub fn done(mut self, answered: &Answered, fetched_at: DateTime<Utc>) {
        if let (Verdict::Publish(_), crate::classify::ApiAnswer::Http { body, .. }) =
            (&answered.verdict, &answered.timed.answer)
        {
            (self.answers).keep(&self.key, body, fetched_at, answered.timed.latency);
        }
        // Out of the map first: no record joins after the count below.
        self.leave();
        if self.tx.receiver_count() > 0 {
            self.tx.send_replace(Some(Arc::new(answered.clone())));
        }
    }

    /// Takes this call out of the calls under way.
    fn leave(&mut self) {
        let mut calls = self.answers.in_flight.lock().unwrap();
        // Only this call's entry: a later leader may hold the key already.
        if calls.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            calls.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Calls in flight and answers kept.
pub struct Answers {
    in_flight: Mutex<HashMap<CallKey, (u64, Shared)>>,
    next_id: std::sync::atomic::AtomicU64,
    recent: Mutex<Kept>,
    ttl: Duration,
}

/// The kept answers, least recently used first out, and their bytes.
struct Kept {
    answers: LruCache<CallKey, Recent>,
    bytes: usize,
    max_bytes: usize,
}

/// What an entry costs beyond its key and body: the entry, its list
/// links and the map's slot, rounded up.
const ENTRY_OVERHEAD: usize = 160;

impl Answers {
    /// Answers kept at most `ttl` and `max_bytes` in all (0: none kept).
    pub fn new(max_bytes: usize, ttl: Duration) -> Arc<Answers> {
        Arc::new(Answers {
            in_flight: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
            recent: Mutex::new(Kept {
                answers: LruCache::unbounded(),
                bytes: 0,
                max_bytes,
            }),
            ttl,
        })
    }

    /// The answer kept for `key`, if it is younger than the ttl.
    pub fn recent(&self, key: &CallKey) -> Option<Recent> {
        let mut kept = self.recent.lock().unwrap();
        let entry = kept.answers.get(key)?;
        if entry.kept_at.elapsed() < self.ttl {
            return Some(entry.clone());
        }
        kept.remove(key);
        None
    }

    /// Leads the call for `key`, or joins the one under way.
    pub fn turn(self: &Arc<Self>, key: CallKey) -> Turn {
        let mut calls = self.in_flight.lock().unwrap();
        if let Some((_, rx)) = calls.get(&key) {
            return Turn::Join(Joined(rx.clone()));
        }
        // Records that join clone the map's receiver; it is dropped when
        // the call leaves the map, so that only theirs are counted then.
        let (tx, rx) = watch::channel(None);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        calls.insert(key.clone(), (id, rx));
        Turn::Lead(Leader {
            answers: self.clone(),
            key,
            id,
            tx,
        })
    }

    /// Bytes of the answers kept now (keys, bodies and entries).
    pub fn kept_bytes(&self) -> usize {
        self.recent.lock().unwrap().bytes
    }

    fn keep(&self, key: &CallKey, body: &Bytes, fetched_at: DateTime<Utc>, latency: Duration) {
        let mut kept = self.recent.lock().unwrap();
        let needed = cost(key, body.len());
        if self.ttl.is_zero() || needed > kept.max_bytes {
            return;
        }
        kept.remove(key);
        while kept.bytes + needed > kept.max_bytes {
            let Some((old, r)) = kept.answers.pop_lru() else {
                break;
            };
            kept.bytes -= cost(&old, r.body.len());
        }
        let recent = Recent {
            body: Bytes::copy_from_slice(body),
            fetched_at,
            latency,
            kept_at: Instant::now(),
        };
        kept.answers.put(key.clone(), recent);
        kept.bytes += needed;
    }
}

impl Kept {
    fn remove(&mut self, key: &CallKey) {
        if let Some(r) = self.answers.pop(key) {
            self.bytes -= cost(key, r.body.len());
        }
    }
}

fn cost(key: &CallKey, body: usize) -> usize {
    key.bytes() + body + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{ApiAnswer, ApiFailure};
    use crate::detail::CallDetail;

    fn ok(body: &str) -> Answered {
        let detail: CallDetail = serde_json::from_str(r#"{"session_id": "s"}"#).unwrap();
        Answered {
            timed: Timed {
                answer: ApiAnswer::Http {
                    status: 200,
                    retry_after: None,
                    body: Bytes::copy_from_slice(body.as_bytes()),
                },
                latency: Duration::from_millis(7),
            },
            verdict: Verdict::Publish(Box::new(detail)),
        }
    }

    fn lead(answers: &Arc<Answers>, key: &CallKey) -> Leader {
        match answers.turn(key.clone()) {
            Turn::Lead(l) => l,
            Turn::Join(_) => panic!("no call was under way"),
        }
    }

    fn join(answers: &Arc<Answers>, key: &CallKey) -> Joined {
        match answers.turn(key.clone()) {
            Turn::Join(j) => j,
            Turn::Lead(_) => panic!("the call under way was not joined"),
        }
    }

    #[test]
    fn keys_tell_their_parts_apart() {
        assert_eq!(CallKey::new("t", "s", None), CallKey::new("t", "s", None));
        assert_ne!(
            CallKey::new("t", "s", None),
            CallKey::new("t", "s", Some(4))
        );
        assert_ne!(CallKey::new("ab", "c", None), CallKey::new("a", "bc", None));
    }

    #[tokio::test]
    async fn calls_under_way_at_once_are_one_and_all_see_its_outcome() {
        let answers = Answers::new(1 << 20, Duration::from_secs(60));
        let key = CallKey::new("t", "s-1", None);
        let leader = lead(&answers, &key);
        let joined: Vec<Joined> = (0..3).map(|_| join(&answers, &key)).collect();
        // Another session is a call of its own.
        let _other = lead(&answers, &CallKey::new("t", "s-2", None));
        leader.done(&ok("{}"), Utc::now());
        for j in joined {
            let answered = j.outcome().await.expect("the leader's outcome");
            assert!(matches!(answered.verdict, Verdict::Publish(_)));
        }
        // Done: the next record finds the answer kept, or leads anew.
        assert!(answers.recent(&key).is_some());
        let _next = lead(&answers, &key);
    }

    #[tokio::test]
    async fn a_leader_gone_without_an_outcome_lets_the_next_record_call() {
        let answers = Answers::new(1 << 20, Duration::from_secs(60));
        let key = CallKey::new("t", "s-1", None);
        let leader = lead(&answers, &key);
        let joined = join(&answers, &key);
        drop(leader);
        assert!(joined.outcome().await.is_none());
        let _next = lead(&answers, &key);
    }

    #[tokio::test]
    async fn failures_are_shared_but_not_kept() {
        let answers = Answers::new(1 << 20, Duration::from_secs(60));
        let key = CallKey::new("t", "s-1", None);
        let leader = lead(&answers, &key);
        let joined = join(&answers, &key);
        let mut failed = ok("{}");
        failed.verdict = Verdict::Retry(ApiFailure::new("errcode 1"));
        leader.done(&failed, Utc::now());
        let shared = joined.outcome().await.unwrap();
        assert!(matches!(shared.verdict, Verdict::Retry(_)));
        assert!(answers.recent(&key).is_none());
        assert_eq!(answers.kept_bytes(), 0);
    }

    #[test]
    fn kept_answers_stay_within_their_bytes_the_oldest_out_first() {
        let body = "x".repeat(1000);
        let max = 5 * (1000 + ENTRY_OVERHEAD + 20);
        let answers = Answers::new(max, Duration::from_secs(60));
        let keys: Vec<CallKey> = (0..20)
            .map(|i| CallKey::new("t", &format!("s-{i:04}"), None))
            .collect();
        for k in &keys {
            lead(&answers, k).done(&ok(&body), Utc::now());
            assert!(answers.kept_bytes() <= max);
        }
        assert!(answers.recent(&keys[19]).is_some());
        assert!(answers.recent(&keys[0]).is_none(), "the oldest went first");
        let kept = keys.iter().filter(|k| answers.recent(k).is_some()).count();
        assert_eq!(kept, 5);
        let got = answers.recent(&keys[19]).unwrap();
        assert_eq!(got.body.len(), 1000);
        assert_eq!(got.latency, Duration::from_millis(7));
    }

    #[test]
    fn nothing_is_kept_with_zero_bytes_or_zero_ttl_and_old_answers_expire() {
        let key = CallKey::new("t", "s-1", None);
        for answers in [
            Answers::new(0, Duration::from_secs(60)),
            Answers::new(1 << 20, Duration::ZERO),
        ] {
            lead(&answers, &key).done(&ok("{}"), Utc::now());
            assert!(answers.recent(&key).is_none());
            assert_eq!(answers.kept_bytes(), 0);
        }
        let answers = Answers::new(1 << 20, Duration::from_millis(1));
        lead(&answers, &key).done(&ok("{}"), Utc::now());
        let kept_at = answers
            .recent
            .lock()
            .unwrap()
            .answers
            .peek(&key)
            .unwrap()
            .kept_at;
        // Expiry is read from the clock: wait until it has moved past.
        while kept_at.elapsed() < Duration::from_millis(1) {
            std::thread::yield_now();
        }
        assert!(answers.recent(&key).is_none());
        assert_eq!(
            answers.kept_bytes(),
            0,
            "an expired answer is dropped when asked"
        );
    }
}
