//! [`IdempotencyService`]: the request flow.
//!
//! 1. Uncovered method → straight to the inner service.
//! 2. Key: parse `Idempotency-Key` (or derive one, or pass through, or 400).
//! 3. Scope, then read the body under the limit while hashing it (one pass).
//! 4. Local coalescing: the first request of a key on this instance becomes the *local leader*;
//!    concurrent duplicates wait for its outcome, so the store sees the key once.
//! 5. The local leader claims the key in the store: replay, 422, wait for another instance, or
//!    run the inner service as an execution of its own: polled once in place, and moved to a
//!    spawned task if it did not finish (so a disconnecting client cannot cancel it).
//! 6. The execution stores or releases the outcome, answers its own client and every waiter;
//!    a streaming response is teed to them as it arrives (see `tee`).

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use dashmap::{DashMap, mapref::entry::Entry};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header, response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};
use tower_service::Service;

use crate::{
    BoxError,
    body::{Chunks, RequestBody, ResponseBody},
    future::ResponseFuture,
    key::{self, Fingerprint, FingerprintHasher, KeyHashBuilder, StoreKey},
    policy::{self, Concurrent, Config, DoNotStore, FailureMode, KeyMode},
    problem::{Problem, ProblemKind},
    record::{Record, StoredHeaders, StoredResponse},
    store::{Claim, ClaimRequest, Store, StoreError, Token},
    tee::{self, Attached, Relay, Tee},
};

/// The in-process table of keys being handled on this instance.
pub(crate) type Flights = DashMap<StoreKey, Arc<Flight>, KeyHashBuilder>;

/// State shared by every service made from one layer.
pub(crate) struct Shared<St> {
    pub(crate) config: Config,
    pub(crate) store: Arc<St>,
    pub(crate) flights: Arc<Flights>,
}

impl<St> Clone for Shared<St> {
    fn clone(&self) -> Self {
        Shared {
            config: self.config.clone(),
            store: self.store.clone(),
            flights: self.flights.clone(),
        }
    }
}

/// One key being handled on this instance: the local leader publishes its outcome once.
pub(crate) struct Flight {
    fingerprint: Fingerprint,
    outcome: OnceLock<Outcome>,
    /// The leader's response while it streams: duplicates attach to it.
    stream: OnceLock<Arc<Tee>>,
    notify: Notify,
}

/// What a waiting duplicate learns from the flight.
enum Joined {
    Done(Outcome),
    Stream(Arc<Tee>),
}

#[derive(Clone)]
enum Outcome {
    /// The store holds this record (replayable or not).
    Stored(Arc<Record>),
    /// The response was not stored (5xx, 429, veto…); waiters get a copy, a retry runs again.
    Unstored(Arc<StoredResponse>),
    /// Everyone answers with this problem.
    Problem(ProblemKind),
    /// The local leader went away before an outcome: waiters start over.
    Abandoned,
}

impl Flight {
    /// Waits for the outcome, or (unless `skip_stream`) for the response to start streaming.
    async fn wait(&self, skip_stream: bool) -> Joined {
        loop {
            // Created before the check: `notify_waiters` reaches it even before it is polled.
            let notified = self.notify.notified();
            if let Some(o) = self.outcome.get() {
                return Joined::Done(o.clone());
            }
            if !skip_stream && let Some(tee) = self.stream.get() {
                return Joined::Stream(tee.clone());
            }
            notified.await;
        }
    }

    fn streaming(&self, tee: Arc<Tee>) {
        let _ = self.stream.set(tee);
        self.notify.notify_waiters();
    }
}

/// Held by the local leader of a key; publishes the outcome to local waiters exactly once,
/// [`Outcome::Abandoned`] if dropped without one.
struct FlightGuard {
    flights: Arc<Flights>,
    key: StoreKey,
    flight: Arc<Flight>,
    left: bool,
}

impl FlightGuard {
    /// Takes the flight out of the table: later arrivals go to the store. Waiters that joined
    /// keep waiting for [`publish`](Self::publish).
    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            self.flights
                .remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.flight));
        }
    }

    fn publish(&mut self, outcome: Outcome) {
        // Leave the table first, so a waiter that starts over never finds this flight again.
        self.leave();
        let _ = self.flight.outcome.set(outcome);
        self.flight.notify.notify_waiters();
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.flight.outcome.get().is_none() {
            self.publish(Outcome::Abandoned);
        }
    }
}

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer).
pub struct IdempotencyService<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S, St> IdempotencyService<S, St> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St>>) -> Self {
        IdempotencyService { inner, shared }
    }
}

impl<S: Clone, St> Clone for IdempotencyService<S, St> {
    fn clone(&self) -> Self {
        IdempotencyService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for IdempotencyService<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

type LeaderResult<B, E> = Result<Response<ResponseBody<B>>, E>;

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        if !config.covers(req.method()) {
            return ResponseFuture::inner(self.inner.call(req.map(RequestBody::inner)));
        }
        let (parts, body) = req.into_parts();
        let client_key = match key::parse_header(&parts.headers) {
            Ok(k) => k,
            Err(e) => {
                return ResponseFuture::ready(self.shared.problem(ProblemKind::InvalidKey(e)));
            }
        };
        if client_key.is_none() {
            match config.key_mode {
                KeyMode::Optional => {
                    let req = Request::from_parts(parts, RequestBody::inner(body));
                    return ResponseFuture::inner(self.inner.call(req));
                }
                KeyMode::Required => {
                    return ResponseFuture::ready(self.shared.problem(ProblemKind::MissingKey));
                }
                KeyMode::Derive => {}
            }
        }
        let limit = config.max_body as u64;
        if declared_length(&parts.headers).is_some_and(|n| n > limit)
            || body.size_hint().lower() > limit
        {
            return ResponseFuture::ready(self.shared.problem(ProblemKind::BodyTooLarge));
        }
        let scope = (config.scope)(&parts);
        let client_key = client_key.map(|k| key::client_store_key(&scope, &k));
        let hasher = FingerprintHasher::new(&scope, &parts);
        // The readied service goes with this request; `self` keeps a fresh clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // Everything the request needs from here on, boxed once: the futures along the way
        // carry a pointer, not the request (a future keeps its captured arguments for good).
        let job = Box::new(Job {
            key: StoreKey([0; 32]),
            fingerprint: Fingerprint([0; 32]),
            ttl: Duration::ZERO,
            deadline: None,
            token: None,
            hasher,
            guard: None,
            inner,
            req: Some(Request::from_parts(parts, RequestBody::inner(body))),
        });
        ResponseFuture::covered(Box::pin(covered(self.shared.clone(), job, client_key)))
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl<St: Store> Shared<St> {
    fn problem<B>(&self, kind: ProblemKind) -> Response<ResponseBody<B>> {
        self.config
            .responder
            .respond(&Problem::new(kind))
            .map(|b| ResponseBody::full(b, None))
    }

    /// A response this request did not produce itself: the stored (or relayed) head, `body`,
    /// and the replay header.
    fn replayed<B>(
        &self,
        status: StatusCode,
        headers: &StoredHeaders,
        body: ResponseBody<B>,
    ) -> Response<ResponseBody<B>> {
        let mut res = Response::new(body);
        *res.status_mut() = status;
        *res.headers_mut() = headers.to_header_map_with_room(1);
        res.headers_mut().insert(
            self.config.replay_header.clone(),
            HeaderValue::from_static("true"),
        );
        res
    }

    fn replay<B>(&self, response: &StoredResponse) -> Response<ResponseBody<B>> {
        let trailers = response.trailers.as_ref().map(StoredHeaders::to_header_map);
        let body = ResponseBody::full(response.body.clone(), trailers);
        self.replayed(response.status, &response.headers, body)
    }

    /// The answer of a duplicate that attached to a streaming response.
    fn attached<B>(&self, tee: &Tee, attached: Attached) -> Response<ResponseBody<B>> {
        let body = ResponseBody::channel(attached.prefix, attached.live, attached.error);
        self.replayed(tee.status, &tee.headers, body)
    }

    /// The answer of a duplicate that shares `outcome`.
    fn answer<B>(&self, outcome: &Outcome) -> Response<ResponseBody<B>> {
        match outcome {
            Outcome::Stored(record) => match &record.response {
                Some(r) => self.replay(r),
                None => self.problem(ProblemKind::NotReplayable),
            },
            Outcome::Unstored(r) => self.replay(r),
            Outcome::Problem(kind) => self.problem(*kind),
            Outcome::Abandoned => self.problem(ProblemKind::LeaderFailed),
        }
    }

    /// Runs one store step under the store timeout.
    fn store_op<F: Future>(&self, limit: Duration, op: F) -> StoreOp<F> {
        StoreOp {
            op,
            limit,
            timer: None,
        }
    }

    /// Completes (with a record) or releases (without) the key of a finished execution.
    async fn settle(
        &self,
        key: StoreKey,
        token: Option<Token>,
        record: Option<Arc<Record>>,
        ttl: Duration,
    ) {
        let Some(token) = token else { return };
        let t = self.config.store_timeout;
        let (step, result) = match record {
            Some(r) => (
                "complete",
                self.store_op(t, self.store.complete(key, token, r, ttl))
                    .await,
            ),
            None => (
                "release",
                self.store_op(t, self.store.release(key, token)).await,
            ),
        };
        match result {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                %key, step,
                "idempotency claim was lost before the outcome was recorded (lease expired and taken over?)"
            ),
            Err(error) => {
                tracing::warn!(%key, step, %error, "idempotency store failed to record the outcome")
            }
        }
    }

    /// Headers that may be stored and replayed, compactly.
    fn storable_headers(&self, headers: &HeaderMap) -> StoredHeaders {
        // Fields a `Connection` header names are hop-by-hop too (RFC 9110, 7.6.1).
        let connection = headers.get_all(header::CONNECTION);
        let by_connection = |name: &HeaderName| {
            connection.iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
                })
            })
        };
        let kept = |(name, _): &(&HeaderName, &HeaderValue)| {
            self.config.keeps_header(name) && !by_connection(name)
        };
        let mut pairs = Vec::with_capacity(headers.iter().filter(kept).count());
        pairs.extend(
            headers
                .iter()
                .filter(kept)
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        pairs.into_iter().collect()
    }

    fn storable(&self, parts: &response::Parts) -> bool {
        (self.config.store_if)(parts) && parts.extensions.get::<DoNotStore>().is_none()
    }
}

pin_project_lite::pin_project! {
    /// A store step bounded by a timeout. The timer is armed only if the step does not finish
    /// at its first poll (an in-memory store always does), so the fast path pays nothing.
    struct StoreOp<F> {
        #[pin]
        op: F,
        limit: Duration,
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<T, F: Future<Output = Result<T, StoreError>>> Future for StoreOp<F> {
    type Output = Result<T, StoreError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.op.poll(cx) {
            return Poll::Ready(out);
        }
        let limit = *this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).map(|()| Err(StoreError::Timeout))
    }
}

/// Polls `fut` once: `Ready` if it finished at once.
async fn poll_once<F: Future>(mut fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

/// Reads the whole body under `limit`, hashing each chunk as it arrives.
async fn read_body<B: Body<Data = Bytes>>(
    body: B,
    limit: usize,
    hasher: &mut FingerprintHasher,
) -> Result<Chunks, ProblemKind> {
    let mut body = pin!(body);
    let mut chunks = Chunks::default();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ProblemKind::BodyReadError)?;
        match frame.into_data() {
            Ok(data) => {
                len += data.len();
                if len > limit {
                    return Err(ProblemKind::BodyTooLarge);
                }
                hasher.update(&data);
                if !data.is_empty() {
                    chunks.push(data);
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    chunks.set_trailers(t);
                }
            }
        }
    }
    Ok(chunks)
}

/// The handling of a covered request. A plain `fn` returning an `async move` block: the
/// arguments are captured once, not copied into locals as `async fn` parameters would be.
#[allow(clippy::manual_async_fn)] // deliberate: see above
fn covered<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    mut job: Box<Job<S, ReqBody>>,
    client_key: Option<StoreKey>,
) -> impl Future<Output = LeaderResult<ResBody, S::Error>> + Send
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let config = &shared.config;
        // `max_wait` counts from the first wait (set then: a clock read leaders never pay).
        let mut deadline: Option<Instant> = None;
        {
            let Job { req, hasher, .. } = &mut *job;
            let Some(req) = req.as_mut() else {
                // Unreachable: a job is built with its request.
                return Ok(shared.problem(ProblemKind::LeaderFailed));
            };
            let body = std::mem::replace(req.body_mut(), RequestBody::buffered(Chunks::default()));
            match read_body(body, config.max_body, hasher).await {
                Ok(chunks) => *req.body_mut() = RequestBody::buffered(chunks),
                Err(kind) => return Ok(shared.problem(kind)),
            }
        }
        let fingerprint = job.hasher.finish();
        let (key, ttl) = match client_key {
            Some(k) => (k, config.client_key_ttl),
            None => (StoreKey(fingerprint.0), config.derived_key_ttl),
        };
        job.key = key;
        job.fingerprint = fingerprint;
        job.ttl = ttl;
        let mut job = Some(job);
        loop {
            let (flight, leads) = match shared.flights.entry(key) {
                Entry::Occupied(o) => (o.get().clone(), false),
                Entry::Vacant(v) => {
                    let flight = Arc::new(Flight {
                        fingerprint,
                        outcome: OnceLock::new(),
                        stream: OnceLock::new(),
                        notify: Notify::new(),
                    });
                    v.insert(flight.clone());
                    (flight, true)
                }
            };
            if leads {
                let Some(mut job) = job.take() else {
                    // Unreachable: only the last iteration leads. Answer rather than panic.
                    return Ok(shared.problem(ProblemKind::LeaderFailed));
                };
                job.deadline = deadline;
                job.guard = Some(FlightGuard {
                    flights: shared.flights.clone(),
                    key,
                    flight,
                    left: false,
                });
                return job.lead(shared).await;
            }
            if flight.fingerprint != fingerprint {
                return Ok(shared.problem(ProblemKind::FingerprintMismatch));
            }
            if config.concurrent == Concurrent::Reject {
                return Ok(shared.problem(ProblemKind::InFlight));
            }
            let mut skip_stream = false;
            loop {
                let until = *deadline
                    .get_or_insert_with(|| policy::deadline(Instant::now(), config.max_wait));
                match tokio::time::timeout_at(until, flight.wait(skip_stream)).await {
                    Err(_) => return Ok(shared.problem(ProblemKind::InFlight)),
                    Ok(Joined::Stream(tee)) => match tee.attach() {
                        Some(attached) => return Ok(shared.attached(&tee, attached)),
                        // Too late to see the stream from its start: wait for the outcome.
                        None => skip_stream = true,
                    },
                    Ok(Joined::Done(Outcome::Abandoned)) => break,
                    Ok(Joined::Done(outcome)) => return Ok(shared.answer(&outcome)),
                }
            }
        }
    }
}

/// A covered request and everything its execution needs, boxed once so that the futures
/// along the way carry a pointer rather than the request.
struct Job<S, ReqBody> {
    /// The stored key and fingerprint, and the record's TTL, once the body is read.
    key: StoreKey,
    fingerprint: Fingerprint,
    ttl: Duration,
    /// End of `max_wait`, once this request started waiting.
    deadline: Option<Instant>,
    /// The store claim, once acquired (`None` also when running unprotected, fail-open).
    token: Option<Token>,
    hasher: FingerprintHasher,
    /// Set when this request becomes the local leader of its key.
    guard: Option<FlightGuard>,
    inner: S,
    req: Option<Request<RequestBody<ReqBody>>>,
}

impl<S, ReqBody> Job<S, ReqBody> {
    fn publish(&mut self, outcome: Outcome) {
        if let Some(guard) = self.guard.as_mut() {
            guard.publish(outcome);
        }
    }
}

/// How the inner call ended, when it did not fail.
#[allow(clippy::large_enum_variant)] // built once per execution, moved once
enum Done {
    /// The whole body was read: it can be stored.
    Buffered {
        parts: response::Parts,
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body was relayed as it streamed; `ok` is false when it ended in an error;
    /// `recorded` holds the whole body and trailers when they fit the stored-response limit.
    Streamed {
        storable: bool,
        ok: bool,
        tee: Arc<Tee>,
        recorded: Option<(Bytes, Option<HeaderMap>)>,
    },
}

impl<S, ReqBody, ResBody> Job<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// Claims the key in the store and acts on the answer.
    async fn lead<St: Store>(
        mut self: Box<Self>,
        shared: Arc<Shared<St>>,
    ) -> LeaderResult<ResBody, S::Error> {
        let config = &shared.config;
        let claim_req = ClaimRequest {
            fingerprint: self.fingerprint,
            lease: config.lease,
            ttl: self.ttl,
            reclaim: config.reclaim,
        };
        let kind = loop {
            let claim = shared
                .store_op(
                    config.store_timeout,
                    shared.store.claim(self.key, claim_req),
                )
                .await;
            let claim = match claim {
                Ok(c) => c,
                Err(error) => return Box::pin(self.store_failed(shared, error)).await,
            };
            match claim {
                Claim::Acquired { token } => {
                    self.token = Some(token);
                    return self.spawn(shared).await;
                }
                Claim::Completed(record) if record.fingerprint == self.fingerprint => {
                    let outcome = Outcome::Stored(record);
                    let res = shared.answer(&outcome);
                    self.publish(outcome);
                    return Ok(res);
                }
                Claim::Completed(_) => break ProblemKind::FingerprintMismatch,
                Claim::Abandoned { fingerprint } | Claim::InFlight { fingerprint }
                    if fingerprint != self.fingerprint =>
                {
                    break ProblemKind::FingerprintMismatch;
                }
                Claim::Abandoned { .. } => break ProblemKind::OutcomeUnknown,
                Claim::InFlight { .. } if config.concurrent == Concurrent::Reject => {
                    break ProblemKind::InFlight;
                }
                Claim::InFlight { .. } => {
                    // Held by another instance: wait for it, then claim again.
                    let now = Instant::now();
                    let until = *self
                        .deadline
                        .get_or_insert_with(|| policy::deadline(now, config.max_wait));
                    let left = until.saturating_duration_since(now);
                    if left.is_zero() {
                        break ProblemKind::InFlight;
                    }
                    let wait = shared.store.wait(self.key, left);
                    let waited =
                        Box::pin(shared.store_op(left.saturating_add(config.store_timeout), wait))
                            .await;
                    if let Err(error) = waited {
                        // The store did decide: another instance holds the key. Failing open
                        // here would run the request beside it, so claim again after a pause:
                        // that claim answers, or fails and the failure mode applies to it.
                        tracing::debug!(key = %self.key, %error, "idempotency wait failed; claiming again");
                        tokio::time::sleep(left.min(WAIT_RETRY)).await;
                    }
                }
            }
        };
        self.publish(Outcome::Problem(kind));
        Ok(shared.problem(kind))
    }

    async fn store_failed<St: Store>(
        mut self: Box<Self>,
        shared: Arc<Shared<St>>,
        error: StoreError,
    ) -> LeaderResult<ResBody, S::Error> {
        match shared.config.failure_mode {
            FailureMode::Closed => {
                tracing::warn!(key = %self.key, %error, "idempotency store failed; answering 503 (fail closed)");
                self.publish(Outcome::Problem(ProblemKind::StoreUnavailable));
                Ok(shared.problem(ProblemKind::StoreUnavailable))
            }
            FailureMode::Open => {
                tracing::warn!(key = %self.key, %error, "idempotency store failed; running the request without cross-instance protection (fail open)");
                // Still one execution among this instance's duplicates; the store is skipped.
                self.token = None;
                self.spawn(shared).await
            }
        }
    }

    /// Runs the inner service in its own task and awaits the response like any waiter, so a
    /// client that goes away cannot cancel the execution.
    ///
    /// The execution is polled once right here first: if it finishes in that poll (a handler
    /// that never waits, with a store that never waits) there is nothing left that a
    /// disconnect could cancel, and no task is needed. Otherwise the boxed execution, pinned on
    /// the heap, moves to its own task before this future can be dropped.
    async fn spawn<St: Store>(
        self: Box<Self>,
        shared: Arc<Shared<St>>,
    ) -> LeaderResult<ResBody, S::Error> {
        let (tx, rx) = oneshot::channel();
        let mut execution = Box::pin(self.run(shared.clone(), tx));
        if poll_once(execution.as_mut()).await.is_pending() {
            tokio::spawn(execution);
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Ok(shared.problem(ProblemKind::LeaderFailed)),
        }
    }

    async fn run<St: Store>(
        mut self: Box<Self>,
        shared: Arc<Shared<St>>,
        tx: oneshot::Sender<LeaderResult<ResBody, S::Error>>,
    ) {
        let mut tx = Some(tx);
        let mut relay: Option<Relay> = None;
        let (key, token) = (self.key, self.token);
        let flight = self.guard.as_ref().map(|g| &*g.flight);
        // Scoped so that nothing from the execution is kept across the store write.
        let (record, outcome) = {
            let (panicked, (record, outcome, reply)) = {
                let result = 'result: {
                    // The request goes to the inner service here, in a scope that ends before any
                    // `.await`: the work holds the inner future, and this future does not keep the
                    // request (or a second copy of the inner future) beside it.
                    let work = {
                        let Some(req) = self.req.take() else {
                            // Unreachable: a job runs once. The guard answers the waiters.
                            return;
                        };
                        let call = match std::panic::catch_unwind(AssertUnwindSafe(|| {
                            self.inner.call(req)
                        })) {
                            Ok(call) => call,
                            Err(panic) => break 'result Err(panic),
                        };
                        async {
                            // Scoped: the response is not kept beside the delivery that holds it.
                            let delivery = {
                                let res = call.await?;
                                deliver(&shared, flight, res, &mut tx, &mut relay)
                            };
                            delivery.await
                        }
                    };
                    AssertUnwindSafe(heartbeat(&shared, key, token, pin!(work)))
                        .catch_unwind()
                        .await
                };
                (result.is_err(), self.conclude(&shared, result))
            };
            if panicked {
                tracing::error!(%key, "inner service panicked while handling an idempotent request");
            }
            // The leader's own client first: it should not wait for the store write. The flight
            // leaves the table before, so a retry sent on receiving this response never joins
            // it: it goes to the store, which holds the claim until the outcome is written.
            if let Some(guard) = self.guard.as_mut() {
                guard.leave();
            }
            if let (Some(tx), Some(reply)) = (tx.take(), reply) {
                let _ = tx.send(reply);
            }
            // A panic mid-stream: the clients reading the stream see it end in an error. (Their
            // response went already, so the reply above was not sent.)
            if panicked && let Some(relay) = relay.take() {
                Box::pin(relay.finish(Some("inner service panicked".into()))).await;
            }
            (record, outcome)
        };
        shared.settle(key, token, record, self.ttl).await;
        self.publish(outcome);
    }

    /// What an execution's end means: the record to store, the outcome for the waiters, and
    /// the reply for the leader's own client (none when a streaming reply already went).
    #[allow(clippy::type_complexity)]
    fn conclude<St: Store>(
        &self,
        shared: &Shared<St>,
        result: std::thread::Result<Result<Done, S::Error>>,
    ) -> (
        Option<Arc<Record>>,
        Outcome,
        Option<LeaderResult<ResBody, S::Error>>,
    ) {
        match result {
            Ok(Ok(Done::Buffered {
                parts,
                data,
                trailers,
            })) => {
                let stored = StoredResponse {
                    status: parts.status,
                    headers: shared.storable_headers(&parts.headers),
                    body: data.clone(),
                    trailers: trailers.as_ref().map(StoredHeaders::from),
                };
                let storable = shared.storable(&parts);
                let reply = Response::from_parts(parts, ResponseBody::full(data, trailers));
                if storable {
                    let record = Arc::new(Record {
                        fingerprint: self.fingerprint,
                        response: Some(stored),
                    });
                    (
                        Some(record.clone()),
                        Outcome::Stored(record),
                        Some(Ok(reply)),
                    )
                } else {
                    (None, Outcome::Unstored(Arc::new(stored)), Some(Ok(reply)))
                }
            }
            Ok(Ok(Done::Streamed {
                storable,
                ok,
                tee,
                recorded,
            })) => {
                let stored = recorded.map(|(body, trailers)| StoredResponse {
                    status: tee.status,
                    headers: tee.headers.clone(),
                    body,
                    trailers: trailers.map(StoredHeaders::from),
                });
                match (ok, storable, stored) {
                    // Streamed and kept whole: replayable like any response.
                    (true, true, stored) => {
                        let record = Arc::new(Record {
                            fingerprint: self.fingerprint,
                            response: stored,
                        });
                        (Some(record.clone()), Outcome::Stored(record), None)
                    }
                    (true, false, Some(stored)) => {
                        (None, Outcome::Unstored(Arc::new(stored)), None)
                    }
                    _ => (None, Outcome::Problem(ProblemKind::LeaderFailed), None),
                }
            }
            Ok(Err(error)) => (
                None,
                Outcome::Problem(ProblemKind::LeaderFailed),
                Some(Err(error)),
            ),
            Err(_panic) => (
                None,
                Outcome::Problem(ProblemKind::LeaderFailed),
                Some(Ok(shared.problem(ProblemKind::LeaderFailed))),
            ),
        }
    }
}

/// The pause before claiming again after a failed wait.
const WAIT_RETRY: Duration = Duration::from_millis(50);

/// A lease renewal in progress.
type Renewal<'a> = std::pin::Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send + 'a>>;

/// Polls `work`, renewing the lease every third of it while `work` runs. Work that finishes at
/// its first poll (a fast handler) never arms a timer.
async fn heartbeat<St: Store, W: Future>(
    shared: &Shared<St>,
    key: StoreKey,
    token: Option<Token>,
    mut work: std::pin::Pin<&mut W>,
) -> W::Output {
    if let Poll::Ready(out) = poll_once(work.as_mut()).await {
        return out;
    }
    let Some(token) = token else {
        return work.await;
    };
    Box::pin(async move {
        let lease = shared.config.lease;
        let period = lease / 3;
        let mut tick = pin!(tokio::time::sleep(period));
        // A renewal runs beside the work, never instead of it: the handler (and a stream being
        // relayed) keeps going while the store answers, however slowly.
        let mut renewal: Option<Renewal<'_>> = None;
        loop {
            tokio::select! {
                biased;
                out = work.as_mut() => return out,
                result = async { Some(renewal.as_mut()?.await) }, if renewal.is_some() => {
                    renewal = None;
                    match result {
                        Some(Ok(true)) | None => {}
                        Some(Ok(false)) => tracing::warn!(%key, "idempotency lease lost while the handler runs"),
                        Some(Err(error)) => tracing::warn!(%key, %error, "idempotency lease renewal failed"),
                    }
                }
                () = tick.as_mut() => {
                    tick.as_mut().reset(Instant::now() + period);
                    if renewal.is_none() {
                        let extend = shared.store.extend(key, token, lease);
                        renewal = Some(Box::pin(shared.store_op(shared.config.store_timeout, extend)));
                    }
                }
            }
        }
    })
    .await
}

/// Reads the response body: whole when it fits the stored-response limit, else forwarded to
/// the leader's client as it streams (and read to the end even if that client left).
///
/// A plain `fn` that splits the response before its `async` block: the block captures the head
/// and the body, not a whole response beside them.
fn deliver<St: Store, ResBody, E>(
    shared: &Shared<St>,
    flight: Option<&Flight>,
    res: Response<ResBody>,
    tx: &mut Option<oneshot::Sender<LeaderResult<ResBody, E>>>,
    relay: &mut Option<Relay>,
) -> impl Future<Output = Result<Done, E>>
where
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = res.into_parts();
    async move {
        let config = &shared.config;
        let limit = config.max_stored_response;
        let mut body = pin!(body);
        let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
        let mut failed: Option<BoxError> = None;
        if !(config.is_stream)(&parts) && body.size_hint().lower() <= limit as u64 {
            let mut len = 0usize;
            let mut trailers = None;
            loop {
                match next_frame(body.as_mut()).await {
                    None => {
                        return Ok(Done::Buffered {
                            parts,
                            data: concat(frames),
                            trailers,
                        });
                    }
                    Some(Ok(frame)) => {
                        if let Some(d) = frame.data_ref() {
                            len += d.len();
                        } else if let Some(t) = frame.trailers_ref() {
                            trailers = Some(t.clone());
                        }
                        frames.push_back(frame);
                        if len > limit {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        let storable = shared.storable(&parts);
        let tee = Tee::new(parts.status, shared.storable_headers(&parts.headers), limit);
        let (leader_tx, leader_rx) = mpsc::channel(tee::CHANNEL);
        *relay = Some(Relay::new(tee.clone(), leader_tx));
        if let Some(flight) = flight {
            flight.streaming(tee.clone());
        }
        if let Some(tx) = tx.take() {
            let body = ResponseBody::channel(VecDeque::new(), Some(leader_rx), None);
            let _ = tx.send(Ok(Response::from_parts(parts, body)));
        }
        let (ok, recorded) = Box::pin(pump(body, frames, failed, relay)).await;
        Ok(Done::Streamed {
            storable,
            ok,
            tee,
            recorded,
        })
    }
}

/// Relays the frames read so far, then the rest of the body, through the tee; returns whether
/// the body ended without error, and the recording if it fit the limit.
async fn pump<B>(
    mut body: std::pin::Pin<&mut B>,
    frames: VecDeque<Frame<Bytes>>,
    failed: Option<BoxError>,
    relay: &mut Option<Relay>,
) -> (bool, Option<(Bytes, Option<HeaderMap>)>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let Some(r) = relay.as_mut() else {
        return (false, None);
    };
    for frame in frames {
        r.frame(frame).await;
    }
    let error = match failed {
        Some(e) => Some(e),
        None => loop {
            match next_frame(body.as_mut()).await {
                None => break None,
                Some(Ok(frame)) => r.frame(frame).await,
                Some(Err(e)) => break Some(e),
            }
        },
    };
    let ok = error.is_none();
    let recorded = match relay.take() {
        Some(r) => r.finish(error).await,
        None => None,
    };
    (ok, recorded)
}

/// The next frame, its error boxed at once (so no `B::Error` lives across an await).
async fn next_frame<B>(mut body: std::pin::Pin<&mut B>) -> Option<Result<Frame<Bytes>, BoxError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    body.frame().await.map(|r| r.map_err(Into::into))
}

fn concat(mut frames: VecDeque<Frame<Bytes>>) -> Bytes {
    frames.retain(|f| f.is_data());
    if frames.len() == 1
        && let Some(Ok(d)) = frames.pop_front().map(Frame::into_data)
    {
        return d;
    }
    let len = frames
        .iter()
        .filter_map(|f| f.data_ref())
        .map(Bytes::len)
        .sum();
    let mut out = BytesMut::with_capacity(len);
    for f in frames {
        if let Some(d) = f.data_ref() {
            out.extend_from_slice(d);
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, future::Ready};

    use http_body_util::Full;

    use super::*;
    use crate::{IdempotencyLayer, MemoryStore};

    #[derive(Clone)]
    struct Handler;

    impl Service<Request<RequestBody<Full<Bytes>>>> for Handler {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
            std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
        }
    }

    fn job(shared: &Shared<MemoryStore>) -> Box<Job<Handler, Full<Bytes>>> {
        let (parts, body) = Request::post("/")
            .body(Full::new(Bytes::new()))
            .unwrap()
            .into_parts();
        Box::new(Job {
            key: StoreKey([0; 32]),
            fingerprint: Fingerprint([0; 32]),
            ttl: Duration::ZERO,
            deadline: None,
            token: None,
            hasher: FingerprintHasher::new(&key::Scope::none(), &parts),
            guard: Some(FlightGuard {
                flights: shared.flights.clone(),
                key: StoreKey([0; 32]),
                flight: Arc::new(Flight {
                    fingerprint: Fingerprint([0; 32]),
                    outcome: OnceLock::new(),
                    stream: OnceLock::new(),
                    notify: Notify::new(),
                }),
                left: false,
            }),
            inner: Handler,
            req: Some(Request::from_parts(parts, RequestBody::inner(body))),
        })
    }

    /// The boxed futures of a covered request stay within the sizes glibc's allocator serves
    /// from its per-thread cache (1,032 bytes): a larger box takes the slow path and is copied
    /// in whole. Guards against a change that quietly grows them (a future keeps everything it
    /// captures, and everything live across an `.await`, for its whole life).
    #[test]
    fn per_request_futures_stay_small() {
        let layer = IdempotencyLayer::new(MemoryStore::new());
        let shared = layer.shared.clone();
        let covered = covered(shared.clone(), job(&shared), None);
        let (tx, _rx) = oneshot::channel();
        let run = job(&shared).run(shared.clone(), tx);
        let sizes = [
            ("covered", std::mem::size_of_val(&covered)),
            ("run", std::mem::size_of_val(&run)),
            ("job", std::mem::size_of::<Job<Handler, Full<Bytes>>>()),
        ];
        eprintln!("{sizes:?}");
        for (name, size) in sizes {
            assert!(size <= 1024, "{name} future is {size} bytes");
        }
    }
}
