//! The in-process store.

use std::{
    collections::VecDeque,
    fmt,
    future::{Future, ready},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry as MapEntry};
use tokio::{sync::Notify, time::Instant};

use super::{Claim, ClaimRequest, Reclaim, Store, StoreError, Token};
use crate::{
    key::{Fingerprint, KeyHashBuilder, StoreKey},
    record::Record,
};

/// Bytes accounted to an entry beyond its record (key, state, map slot, queue slot).
const ENTRY_OVERHEAD: usize = 160;
/// How often at most an over-capacity store sweeps every entry for expired ones.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// `last_sweep` before the first sweep.
const NEVER: u64 = u64::MAX;

/// An in-memory [`Store`], bounded by entries and by bytes.
///
/// Cheap to clone: clones share the same map, so several layers (or several routers) in one
/// process can share one store.
///
/// When full, it frees room by dropping expired records first, then the oldest completed ones.
/// In-flight claims are never evicted: a store full of them refuses new keys with
/// [`StoreError::Capacity`], which the layer answers per its failure mode.
///
/// ```
/// use tower_idempotency::MemoryStore;
/// let store = MemoryStore::new().max_entries(50_000).max_bytes(64 << 20);
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<StoreKey, Entry, KeyHashBuilder>,
    /// Completed keys in completion order, with the sequence number that names the completion
    /// (a stale item, whose key completed again or went away, is skipped).
    order: Mutex<VecDeque<(StoreKey, u64)>>,
    len: AtomicUsize,
    bytes: AtomicUsize,
    seq: AtomicU64,
    /// Times are kept as nanoseconds since this instant: 8 bytes instead of 16.
    epoch: Instant,
    /// When the last sweep started (nanoseconds since `epoch`), or [`NEVER`].
    last_sweep: AtomicU64,
    max_entries: usize,
    max_bytes: usize,
}

/// One key. Kept to 32 bytes, so that a map slot (with its 32-byte key) is 64: the map is
/// the store's memory, and each claim at capacity touches two slots nobody touched lately
/// (the new key's and the evicted one's).
struct Entry {
    /// In flight: the end of the lease; completed or abandoned: the expiry.
    until: u64,
    /// In flight: the claim's token; completed or abandoned: the sequence number of that
    /// transition, which names it in the eviction queue.
    seq: u64,
    state: State,
}

enum State {
    InFlight(Box<Claimed>),
    Completed(Arc<Record>),
    Abandoned(Box<Fingerprint>),
}

/// What an in-flight claim holds besides its lease and token.
struct Claimed {
    fingerprint: Fingerprint,
    /// The TTL of the record to come (also of the abandoned mark, under `Reclaim::Never`).
    ttl: Duration,
    notify: Option<Arc<Notify>>,
}

impl Entry {
    /// Whether a sweep may drop this entry. An in-flight claim goes once its lease and then
    /// its TTL have passed, as the key of a Redis claim does: its holder stopped renewing a
    /// lease ago and never came back (a runtime shut down mid-request), and the slot must not
    /// stay taken forever.
    fn expired(&self, now: u64) -> bool {
        match &self.state {
            State::InFlight(claimed) => after(self.until, claimed.ttl) <= now,
            State::Completed(_) | State::Abandoned(_) => self.until <= now,
        }
    }

    /// The sequence number that names this entry in the eviction queue, if it is queued.
    fn queued_seq(&self) -> Option<u64> {
        match &self.state {
            State::InFlight(_) => None,
            State::Completed(_) | State::Abandoned(_) => Some(self.seq),
        }
    }

    /// The claim of `token`, if this entry is it.
    fn claimed_by(&self, token: Token) -> Option<&Claimed> {
        match &self.state {
            State::InFlight(c) if self.seq == token.0 => Some(c),
            _ => None,
        }
    }

    /// Bytes accounted to this entry.
    fn size(&self) -> usize {
        ENTRY_OVERHEAD
            + match &self.state {
                State::Completed(record) => record.size(),
                State::InFlight(_) | State::Abandoned(_) => 0,
            }
    }
}

/// `now` plus `d`, in nanoseconds, saturating.
fn after(now: u64, d: Duration) -> u64 {
    now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
    }
}

impl MemoryStore {
    /// Default bound on the number of keys: 100,000.
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
    /// Default bound on accounted bytes: 256 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

    /// A store with the default bounds ([`DEFAULT_MAX_ENTRIES`](Self::DEFAULT_MAX_ENTRIES),
    /// [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES)).
    pub fn new() -> Self {
        Self::with_bounds(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_BYTES)
    }

    fn with_bounds(max_entries: usize, max_bytes: usize) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher(KeyHashBuilder::default()),
                order: Mutex::new(VecDeque::new()),
                len: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                seq: AtomicU64::new(1),
                epoch: Instant::now(),
                last_sweep: AtomicU64::new(NEVER),
                max_entries: max_entries.max(1),
                max_bytes,
            }),
        }
    }

    /// Bounds the number of keys held (in flight and completed). Default 100,000.
    ///
    /// Set it before the store is shared: it returns a new, empty store.
    pub fn max_entries(self, n: usize) -> Self {
        Self::with_bounds(n, self.inner.max_bytes)
    }

    /// Bounds the bytes held by records (bodies, headers, and a fixed per-entry overhead).
    /// Default 256 MiB. A record larger than the whole bound is kept as "completed, not
    /// replayable".
    ///
    /// Set it before the store is shared: it returns a new, empty store.
    pub fn max_bytes(self, n: usize) -> Self {
        Self::with_bounds(self.inner.max_entries, n)
    }

    /// Number of keys held now (in flight and completed, expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Acquire)
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes accounted now.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Acquire)
    }
}

impl Inner {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Now, in nanoseconds since the epoch (on tokio's clock, so a paused clock applies).
    fn now(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, at: u64) -> Instant {
        self.epoch + Duration::from_nanos(at)
    }

    fn add_bytes(&self, old: usize, new: usize) {
        if new >= old {
            self.bytes.fetch_add(new - old, Ordering::AcqRel);
        } else {
            self.bytes.fetch_sub(old - new, Ordering::AcqRel);
        }
    }

    fn push_order(&self, key: StoreKey, seq: u64) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push_back((key, seq));
        // Stale items pile up when keys are dropped on expiry without eviction pressure.
        if order.len() > 2 * self.max_entries + 64 {
            order.retain(|(k, s)| self.map.get(k).is_some_and(|e| e.queued_seq() == Some(*s)));
        }
    }

    /// Removes `key` if `pred` holds, keeping the counters right.
    fn remove_if(&self, key: &StoreKey, pred: impl FnOnce(&Entry) -> bool) -> bool {
        match self.map.remove_if(key, |_, e| pred(e)) {
            Some((_, e)) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                self.bytes.fetch_sub(e.size(), Ordering::AcqRel);
                true
            }
            None => false,
        }
    }

    /// Drops every expired record, at most once per [`SWEEP_INTERVAL`].
    fn sweep(&self, now: u64) {
        let last = self.last_sweep.load(Ordering::Acquire);
        let interval = u64::try_from(SWEEP_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        if last != NEVER && now.saturating_sub(last) < interval {
            return;
        }
        // One sweeper at a time: the others go on without.
        if self
            .last_sweep
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let mut freed = 0usize;
        let mut freed_bytes = 0usize;
        self.map.retain(|_, e| {
            let keep = !e.expired(now);
            if !keep {
                freed += 1;
                freed_bytes += e.size();
            }
            keep
        });
        self.len.fetch_sub(freed, Ordering::AcqRel);
        self.bytes.fetch_sub(freed_bytes, Ordering::AcqRel);
    }

    /// Evicts one completed record: an expired one if a sweep finds any, else the oldest.
    /// Must not be called while holding a map guard. Returns `false` when nothing can go.
    fn evict_one(&self, now: u64) -> bool {
        let before = self.len.load(Ordering::Acquire);
        self.sweep(now);
        if self.len.load(Ordering::Acquire) < before {
            return true;
        }
        loop {
            let next = {
                let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
                order.pop_front()
            };
            let Some((key, seq)) = next else {
                return false;
            };
            if self.remove_if(&key, |e| e.queued_seq() == Some(seq)) {
                return true;
            }
        }
    }

    /// Takes one entry slot, evicting if needed.
    fn reserve_slot(&self, now: u64) -> Result<(), StoreError> {
        loop {
            let n = self.len.load(Ordering::Acquire);
            if n < self.max_entries {
                if self
                    .len
                    .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if !self.evict_one(now) {
                return Err(StoreError::Capacity);
            }
        }
    }

    fn enforce_bytes(&self, now: u64) {
        while self.bytes.load(Ordering::Acquire) > self.max_bytes {
            if !self.evict_one(now) {
                return;
            }
        }
    }

    /// A fresh claim; returns it and its token.
    fn in_flight(&self, req: &ClaimRequest, now: u64) -> (Entry, u64) {
        let token = self.next_seq();
        let entry = Entry {
            until: after(now, req.lease),
            seq: token,
            state: State::InFlight(Box::new(Claimed {
                fingerprint: req.fingerprint,
                ttl: req.ttl,
                notify: None,
            })),
        };
        (entry, token)
    }

    /// Decides a claim against an existing entry, updating it in place (an expired record or an
    /// expired lease is replaced by a fresh claim). The second value is the sequence number of
    /// an entry this call just marked abandoned: the caller queues it for eviction once the
    /// map guard is gone.
    fn claim_existing(&self, e: &mut Entry, req: &ClaimRequest, now: u64) -> (Claim, Option<u64>) {
        let live = e.until > now;
        match &mut e.state {
            State::Completed(record) if live => {
                return (Claim::Completed(record.clone()), None);
            }
            State::Abandoned(fingerprint) if live => {
                let fingerprint = **fingerprint;
                return (Claim::Abandoned { fingerprint }, None);
            }
            State::InFlight(claimed) if !live => {
                if let Some(n) = claimed.notify.take() {
                    n.notify_waiters();
                }
                if req.reclaim == Reclaim::Never {
                    let fingerprint = claimed.fingerprint;
                    let expires = after(now, claimed.ttl);
                    let seq = self.next_seq();
                    *e = Entry {
                        until: expires,
                        seq,
                        state: State::Abandoned(Box::new(fingerprint)),
                    };
                    return (Claim::Abandoned { fingerprint }, Some(seq));
                }
                // Compare-and-set: the expired claim is replaced by ours in the same step.
            }
            State::InFlight(claimed) => {
                let fingerprint = claimed.fingerprint;
                return (Claim::InFlight { fingerprint }, None);
            }
            // An expired record: the key is free again.
            State::Completed(_) | State::Abandoned(_) => {}
        }
        let old = e.size();
        let (fresh, token) = self.in_flight(req, now);
        *e = fresh;
        self.add_bytes(old, ENTRY_OVERHEAD);
        (
            Claim::Acquired {
                token: Token(token),
            },
            None,
        )
    }

    /// Claims a key that had no entry, in a slot already reserved.
    fn claim_vacant(&self, key: StoreKey, req: &ClaimRequest, now: u64) -> (Claim, Option<u64>) {
        match self.map.entry(key) {
            MapEntry::Vacant(v) => {
                let (entry, token) = self.in_flight(req, now);
                v.insert(entry);
                self.bytes.fetch_add(ENTRY_OVERHEAD, Ordering::AcqRel);
                let token = Token(token);
                (Claim::Acquired { token }, None)
            }
            MapEntry::Occupied(mut o) => {
                // Lost a race with another claim of the same key: give the slot back.
                self.len.fetch_sub(1, Ordering::AcqRel);
                self.claim_existing(o.get_mut(), req, now)
            }
        }
    }
}

impl MemoryStore {
    fn claim_now(&self, key: StoreKey, req: ClaimRequest) -> Result<Claim, StoreError> {
        let inner = &*self.inner;
        let now = inner.now();
        let existing = inner
            .map
            .get_mut(&key)
            .map(|mut e| inner.claim_existing(&mut e, &req, now));
        let (claim, abandoned) = match existing {
            Some(decided) => decided,
            None => {
                inner.reserve_slot(now)?;
                inner.claim_vacant(key, &req, now)
            }
        };
        if let Some(seq) = abandoned {
            inner.push_order(key, seq);
        }
        Ok(claim)
    }

    fn complete_now(
        &self,
        key: StoreKey,
        token: Token,
        record: Arc<Record>,
        ttl: Duration,
    ) -> bool {
        let inner = &*self.inner;
        let now = inner.now();
        let record = if record.size() + ENTRY_OVERHEAD > inner.max_bytes {
            Arc::new(Record {
                fingerprint: record.fingerprint,
                response: None,
            })
        } else {
            record
        };
        let seq = {
            let Some(mut e) = inner.map.get_mut(&key) else {
                return false;
            };
            let e = &mut *e;
            let notify = match &mut e.state {
                State::InFlight(claimed) if e.seq == token.0 => claimed.notify.take(),
                _ => return false,
            };
            let old = e.size();
            let seq = inner.next_seq();
            *e = Entry {
                until: after(now, ttl),
                seq,
                state: State::Completed(record),
            };
            inner.add_bytes(old, e.size());
            if let Some(n) = notify {
                n.notify_waiters();
            }
            seq
        };
        inner.push_order(key, seq);
        inner.enforce_bytes(now);
        true
    }

    fn release_now(&self, key: StoreKey, token: Token) -> bool {
        let mut notify = None;
        let removed = self.inner.remove_if(&key, |e| match e.claimed_by(token) {
            Some(claimed) => {
                notify = claimed.notify.clone();
                true
            }
            None => false,
        });
        if let Some(n) = notify {
            n.notify_waiters();
        }
        removed
    }

    fn extend_now(&self, key: StoreKey, token: Token, lease: Duration) -> bool {
        let now = self.inner.now();
        let Some(mut e) = self.inner.map.get_mut(&key) else {
            return false;
        };
        if e.claimed_by(token).is_none() {
            return false;
        }
        e.until = after(now, lease);
        true
    }

    /// The notifier of `key`'s live claim, its token and when its lease ends; `None` if it
    /// has none.
    fn watch(&self, key: &StoreKey) -> Option<(Arc<Notify>, u64, Instant)> {
        let mut guard = self.inner.map.get_mut(key)?;
        let e = &mut *guard;
        match &mut e.state {
            State::InFlight(claimed) => Some((
                claimed.notify.get_or_insert_with(Default::default).clone(),
                e.seq,
                self.inner.instant(e.until),
            )),
            _ => None,
        }
    }

    fn still_held(&self, key: &StoreKey, token: u64) -> bool {
        self.inner
            .map
            .get(key)
            .is_some_and(|e| e.claimed_by(Token(token)).is_some())
    }
}

impl Store for MemoryStore {
    fn claim(
        &self,
        key: StoreKey,
        req: ClaimRequest,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        ready(self.claim_now(key, req))
    }

    fn complete(
        &self,
        key: StoreKey,
        token: Token,
        record: Arc<Record>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        ready(Ok(self.complete_now(key, token, record, ttl)))
    }

    fn release(
        &self,
        key: StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        ready(Ok(self.release_now(key, token)))
    }

    fn extend(
        &self,
        key: StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        ready(Ok(self.extend_now(key, token, lease)))
    }

    fn wait(
        &self,
        key: StoreKey,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let this = self.clone();
        async move {
            let Some((notify, token, lease_until)) = this.watch(&key) else {
                return Ok(());
            };
            let notified = notify.notified();
            // Completed between `watch` and `notified()`: the notification is already gone.
            if !this.still_held(&key, token) {
                return Ok(());
            }
            let until_lease = lease_until.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(timeout.min(until_lease), notified).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_request(ttl: Duration) -> ClaimRequest {
        ClaimRequest {
            fingerprint: Fingerprint([7; 32]),
            lease: Duration::from_secs(10),
            ttl,
            reclaim: Reclaim::AfterLease,
        }
    }

    /// A claim whose holder never settles it stops taking a slot after its lease and TTL.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_claim_frees_its_slot_after_lease_and_ttl() {
        let store = MemoryStore::new().max_entries(1);
        let req = claim_request(Duration::from_secs(60));
        let claim = store.claim(StoreKey([1; 32]), req).await.unwrap();
        assert!(matches!(claim, Claim::Acquired { .. }));
        // Full of a live claim: a new key is refused.
        let other = store.claim(StoreKey([2; 32]), req).await;
        assert!(matches!(other, Err(StoreError::Capacity)), "{other:?}");
        // Lease (10 s) + TTL (60 s) later, the dead claim is swept and the slot is free.
        tokio::time::advance(Duration::from_secs(71)).await;
        let other = store.claim(StoreKey([2; 32]), req).await.unwrap();
        assert!(matches!(other, Claim::Acquired { .. }));
        assert_eq!(store.len(), 1);
    }

    /// A map slot is the 32-byte key plus the entry: keep it to one 64-byte cache line's worth.
    #[test]
    fn an_entry_is_32_bytes() {
        assert_eq!(size_of::<Entry>(), 32);
        assert_eq!(size_of::<(StoreKey, Entry)>(), 64);
    }
}
