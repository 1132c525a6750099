//! Where claims and completed records live.
//!
//! A [`Store`] arbitrates between instances and keeps completed records. Coalescing of concurrent
//! duplicates *inside one process* happens in front of the store, in the service: whatever the
//! store, concurrent duplicates on one instance reach it once.
//!
//! Every method is one atomic step (one round trip for a networked store):
//!
//! | step | meaning |
//! |---|---|
//! | [`claim`](Store::claim) | acquire the key, or learn that it is in flight or completed |
//! | [`complete`](Store::complete) | store the outcome — only with the current fencing token |
//! | [`release`](Store::release) | give the key up so a retry runs again — fenced likewise |
//! | [`extend`](Store::extend) | renew the lease while the handler runs — fenced likewise |
//! | [`wait`](Store::wait) | sleep until the key's claim may have changed, or a timeout |
//!
//! The crate runs the same conformance suite against every store it ships: [`MemoryStore`]
//! (always) and `RedisStore` (feature `redis`; Redis Cluster with `redis-cluster`).

use std::{future::Future, sync::Arc, time::Duration};

use crate::{
    key::{Fingerprint, StoreKey},
    record::Record,
};

mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
pub use memory::MemoryStore;

/// A fencing token: proof that the caller holds the current claim of a key.
///
/// A leader whose lease expired and was taken over holds a stale token; the store refuses its
/// `complete`, `release` and `extend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

/// What to do with a claim whose lease expired (its holder crashed or stalled without renewing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Reclaim {
    /// The next duplicate takes the claim over and runs the request: at-least-once for holders
    /// that crashed. The default.
    #[default]
    AfterLease,
    /// The key stays blocked until its TTL; duplicates are told the outcome is unknown:
    /// at-most-once.
    Never,
}

/// The parameters of a [`Store::claim`].
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    /// Fingerprint of the request making the claim.
    pub fingerprint: Fingerprint,
    /// How long the claim lasts unless it is extended.
    pub lease: Duration,
    /// How long a record for this key is kept once completed; also how long an expired claim
    /// stays blocked under [`Reclaim::Never`].
    pub ttl: Duration,
    /// What to do when the current claim's lease has expired.
    pub reclaim: Reclaim,
}

/// The answer to a [`Store::claim`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Claim {
    /// The caller now holds the key and must `complete` or `release` it.
    Acquired {
        /// The fencing token for the caller's later steps.
        token: Token,
    },
    /// Another request holds the key and its lease is live.
    InFlight {
        /// Fingerprint of the request holding the key.
        fingerprint: Fingerprint,
    },
    /// The key completed; the record holds the outcome.
    Completed(Arc<Record>),
    /// The holder's lease expired without an outcome, and [`Reclaim::Never`] forbids running
    /// the request again.
    Abandoned {
        /// Fingerprint of the request that held the key.
        fingerprint: Fingerprint,
    },
}

/// A store failure. Handled by the layer's [`FailureMode`](crate::FailureMode).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached, or the operation failed in transit.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The operation did not finish within the configured store timeout.
    #[error("store operation timed out")]
    Timeout,
    /// The store is full of in-flight claims and cannot take another key.
    #[error("store is at capacity")]
    Capacity,
    /// A stored value could not be decoded (corrupt, foreign, or from a future version).
    #[error("stored record is malformed: {0}")]
    Corrupt(String),
}

/// Shared state keyed by stored key. See the [module docs](self) for the contract.
///
/// Implementations must make each method one atomic step: never check-then-set.
pub trait Store: Send + Sync + 'static {
    /// Atomically: if the key is free (or its completed record expired, or its claim's lease
    /// expired and `req.reclaim` allows it), claim it for `req.lease` and return a fresh token;
    /// otherwise report the current state.
    fn claim(
        &self,
        key: StoreKey,
        req: ClaimRequest,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Stores `record` for `ttl` if `token` is the key's current claim. Returns `false` (and
    /// changes nothing) when the claim was lost.
    fn complete(
        &self,
        key: StoreKey,
        token: Token,
        record: Arc<Record>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Frees the key if `token` is its current claim, so a retry runs again. Returns `false`
    /// when the claim was lost.
    fn release(
        &self,
        key: StoreKey,
        token: Token,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Renews the lease if `token` is the key's current claim. Returns `false` when it was lost.
    fn extend(
        &self,
        key: StoreKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Resolves when the key's claim may have changed (completed, released, lease expired) or
    /// after `timeout`, whichever is first. Spurious wake-ups are allowed: callers claim again.
    fn wait(
        &self,
        key: StoreKey,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
