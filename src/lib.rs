//! Tower middleware that makes non-idempotent HTTP requests safe to retry.
//!
//! A user double-clicks "Pay", a mobile client times out and retries, a gateway retries a paid
//! API call after a connection reset: without protection each duplicate runs the side effect
//! again. With [`IdempotencyLayer`], the inner service runs **once** per logical request, and
//! every duplicate — concurrent or later — receives the same response, marked
//! `idempotent-replayed: true`.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! async fn pay() -> &'static str {
//!     "charged"
//! }
//!
//! # #[tokio::main] async fn main() {
//! let app = Router::new()
//!     .route("/payments", post(pay))
//!     .layer(IdempotencyLayer::new(MemoryStore::new()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```
//!
//! # How a request is handled
//!
//! - Only covered methods (`POST`, `PATCH` by default) are handled; others pass through
//!   untouched.
//! - The key is the `Idempotency-Key` header (an RFC 9651 string `"abc"` or a bare token
//!   `abc`); without one, it is derived from the request ([`KeyMode`]).
//! - Keys are namespaced by a **scope**, the principal of the request, so one user never gets
//!   another's response. The default scope hashes the `Authorization` and `Cookie` headers;
//!   scope by user id where you have one ([`IdempotencyLayer::scope`]).
//! - The body is buffered (1 MiB by default) and hashed in one pass into a fingerprint of
//!   scope, method, path and query, and body. A key reused with another fingerprint is 422.
//! - Concurrent duplicates wait for the first request's outcome ([`Concurrent`]); the first
//!   request's inner call runs in a spawned task, so a client that disconnects does not cancel
//!   the side effect.
//! - 2xx, 3xx and 4xx (except 408, 425, 429) are stored; 5xx and errors release the key so a
//!   retry runs again.
//!
//! Every answer of the layer itself is an RFC 9457 problem (see [`problem`]).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
pub mod client;
mod future;
mod key;
mod layer;
pub mod policy;
pub mod problem;
mod record;
mod service;
pub mod store;
mod tee;

pub use body::{RequestBody, ResponseBody};
pub use future::ResponseFuture;
pub use key::{Fingerprint, IDEMPOTENCY_KEY, KeyError, MAX_KEY_LEN, Scope, StoreKey};
pub use layer::IdempotencyLayer;
pub use policy::{Concurrent, DoNotStore, FailureMode, KeyMode};
pub use record::{Record, StoredHeaders, StoredResponse};
/// The redis-rs crate this crate's [`RedisStore`] is built on, to make connections and clients
/// without a version mismatch.
#[cfg(feature = "redis")]
pub use redis;
pub use service::IdempotencyService;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{MemoryStore, Reclaim, Store, StoreError};

/// The boxed error type of response bodies (tower's).
pub use tower::BoxError;
