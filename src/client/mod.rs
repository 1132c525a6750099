//! Client side: stable `Idempotency-Key`s on outgoing requests, across retries.
//!
//! A client that times out and retries must send the same `Idempotency-Key` on every attempt,
//! or the server cannot tell the retry from a new request. The picture, end to end:
//!
//! ```text
//!  caller ──▶ IdempotencyKeyLayer ──▶ tower::retry (RetryPolicy) ──▶ timeout ──▶ HTTP client
//!             sets the key once        attempt 1, 2, 3… all carry       per attempt
//!             per logical request      the same key
//!                                                     ─── network ───▶ IdempotencyLayer ──▶ handler
//!                                                                       runs it once, replays
//!                                                                       it to every attempt
//! ```
//!
//! - [`IdempotencyKeyLayer`] adds `Idempotency-Key` (a UUID v4, or your [`KeyGenerator`]) to
//!   covered requests (default `POST`, `PATCH`) that have none. It never replaces a caller's
//!   key. It sits **outside** the retry layer: one key per logical request.
//! - [`RetryPolicy`] is a [`tower::retry::Policy`]: it retries transport errors and timeouts,
//!   `408`, `429` and `5xx` (honouring `Retry-After`), `409` only after its `Retry-After`, with
//!   exponential backoff and jitter, a bounded number of times; never `400`, `422` or another
//!   `4xx`. Defaults: 5 attempts, backoff from 100 ms doubling up to 5 s, `Retry-After` up to
//!   30 s.
//! - Both work with any request type that implements [`ClientRequest`] (and, for retries,
//!   [`TryCloneRequest`]): `http::Request<B>` — hyper-util's client and any other
//!   `tower::Service<http::Request<B>>` — and, with the `reqwest` feature, `reqwest::Request`
//!   (reqwest's `Client` implements `tower::Service<reqwest::Request>`).
//!
//! # hyper-util
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};
//! use tower_idempotency::client::{IdempotencyKeyLayer, RetryPolicy};
//!
//! # #[tokio::main] async fn main() -> Result<(), tower_idempotency::BoxError> {
//! let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let client = ServiceBuilder::new()
//!     .layer(IdempotencyKeyLayer::new())           // one key per logical request
//!     .layer(RetryLayer::new(RetryPolicy::new()))  // every attempt carries it
//!     .timeout(Duration::from_secs(30))            // per attempt
//!     .service(http);
//!
//! // A buffered body (`Full<Bytes>`, `String`…) so the request can be sent again.
//! let req = http::Request::post("http://127.0.0.1:8080/payments")
//!     .body(Full::new(Bytes::from_static(b"{\"amount\":100}")))?;
//! let res = client.oneshot(req).await?;
//! println!("{}", res.status());
//! # Ok(()) }
//! ```
//!
//! # reqwest
//!
//! With the `reqwest` feature, `reqwest::Request` and `reqwest::Response` implement the
//! traits of this module, so the same layers wrap a `reqwest::Client`. Build requests with
//! `client.post(url)….build()?` and send them through the stack; a body given as bytes or a
//! string can be copied for a retry, a streaming body cannot (it is sent once).
//!
//! ```no_run
//! # #[cfg(feature = "reqwest")]
//! # #[tokio::main] async fn main() -> Result<(), tower_idempotency::BoxError> {
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};
//! use tower_idempotency::client::{IdempotencyKeyLayer, RetryPolicy};
//!
//! let http = reqwest::Client::new();
//! let client = ServiceBuilder::new()
//!     .layer(IdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(RetryPolicy::new()))
//!     .service(http.clone());
//!
//! let req = http
//!     .post("http://127.0.0.1:8080/v1/chat/completions")
//!     .timeout(Duration::from_secs(60)) // per attempt: copied to every retry
//!     .body(r#"{"model":"m","messages":[]}"#)
//!     .build()?;
//! let res = client.oneshot(req).await?;
//! println!("{}", res.status());
//! # Ok(()) }
//! # #[cfg(not(feature = "reqwest"))] fn main() {}
//! ```
//!
//! # Client-side coalescing
//!
//! [`IdempotencyLayer`](crate::IdempotencyLayer) also wraps a *client* service: identical
//! concurrent outgoing calls (same scope, method, path and query, body) then reach the upstream
//! once, and every caller gets the same response — the "request deduplicator" pattern. With
//! the default [`KeyMode::Derive`](crate::KeyMode) the key is the request's fingerprint, and a
//! completed response is replayed to identical calls for the derived-key TTL (60 s by default;
//! shorten it to collapse only concurrent calls).
//!
//! The fingerprint does not contain the host: when one client talks to several upstreams,
//! scope by the authority (and the credentials) so that calls to different hosts never
//! collapse into one:
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::ServiceBuilder;
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody, Scope};
//!
//! # #[tokio::main] async fn main() {
//! // The layer hands the client a `RequestBody<B>`: the caller's body, buffered.
//! let http = Client::builder(TokioExecutor::new()).build_http::<RequestBody<Full<Bytes>>>();
//! let deduplicated = ServiceBuilder::new()
//!     .layer(
//!         IdempotencyLayer::new(MemoryStore::new())
//!             .derived_key_ttl(Duration::from_secs(1))
//!             .scope(|parts| {
//!                 let host = parts.uri.authority().map_or("", |a| a.as_str());
//!                 let mut id = host.as_bytes().to_vec();
//!                 if let Some(auth) = parts.headers.get(http::header::AUTHORIZATION) {
//!                     id.push(0);
//!                     id.extend_from_slice(auth.as_bytes());
//!                 }
//!                 Scope::new(id)
//!             }),
//!     )
//!     .service(http);
//! # let _ = deduplicated;
//! # }
//! ```

mod key_layer;
mod request;
mod retry;

pub use key_layer::{IdempotencyKeyLayer, IdempotencyKeyService, KeyGenerator, UuidV4};
pub use request::{ClientRequest, ClientResponse, TryCloneRequest};
pub use retry::RetryPolicy;
