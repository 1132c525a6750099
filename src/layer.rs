//! [`IdempotencyLayer`] and its builder.

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderName, Method, header, request, response};
use tower_layer::Layer;

use crate::{
    key::Scope,
    policy::{
        Concurrent, Config, FailureMode, KeyMode, LONGEST, default_is_stream, default_store_if,
    },
    problem::{DefaultResponder, ProblemResponder},
    service::{Flights, IdempotencyService, Shared},
    store::{Reclaim, Store},
};

/// Makes covered requests (default `POST` and `PATCH`) run once per logical request; every
/// duplicate, concurrent or later, gets the same response.
///
/// Every builder method states its default. Nonsensical values (a zero lease, a zero TTL)
/// panic at build time, never at request time.
///
/// All services made by one layer (and its clones) share one in-process coalescing table, so
/// concurrent duplicates on this instance reach the store once.
///
/// The layer spawns the leader's inner call on the Tokio runtime, so it must run inside one.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, KeyMode, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new())
///     .key_mode(KeyMode::Required)
///     .client_key_ttl(Duration::from_secs(6 * 3600))
///     .max_body(256 * 1024);
/// # let _ = layer;
/// ```
pub struct IdempotencyLayer<St> {
    /// Built once; `layer()` only clones the `Arc` (axum may call it per request for routers
    /// that were not finalized with `with_state`).
    pub(crate) shared: Arc<Shared<St>>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<St> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// Default request-body limit: 1 MiB.
    pub const DEFAULT_MAX_BODY: usize = 1 << 20;
    /// Default stored-response limit: 1 MiB.
    pub const DEFAULT_MAX_STORED_RESPONSE: usize = 1 << 20;
    /// Default TTL of a record under a client-supplied key: 24 hours.
    pub const DEFAULT_CLIENT_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
    /// Default TTL of a record under a derived key: 60 seconds.
    pub const DEFAULT_DERIVED_KEY_TTL: Duration = Duration::from_secs(60);
    /// Default longest wait of a duplicate for the original's outcome: 30 seconds.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);
    /// Default lease of a claim (renewed while the handler runs): 10 seconds.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
    /// Default timeout of one store operation: 2 seconds.
    pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);

    /// A layer over `store` with every default of the crate documentation.
    pub fn new(store: St) -> Self {
        let config = Config {
            methods: vec![Method::POST, Method::PATCH],
            key_mode: KeyMode::Derive,
            scope: Arc::new(Scope::from_credentials),
            max_body: Self::DEFAULT_MAX_BODY,
            max_stored_response: Self::DEFAULT_MAX_STORED_RESPONSE,
            store_if: Arc::new(default_store_if),
            is_stream: Arc::new(default_is_stream),
            client_key_ttl: Self::DEFAULT_CLIENT_KEY_TTL,
            derived_key_ttl: Self::DEFAULT_DERIVED_KEY_TTL,
            max_wait: Self::DEFAULT_MAX_WAIT,
            concurrent: Concurrent::Wait,
            failure_mode: FailureMode::Closed,
            lease: Self::DEFAULT_LEASE,
            reclaim: Reclaim::AfterLease,
            store_timeout: Self::DEFAULT_STORE_TIMEOUT,
            replay_header: HeaderName::from_static("idempotent-replayed"),
            strip_headers: vec![header::DATE, header::SET_COOKIE],
            responder: Arc::new(DefaultResponder),
        };
        IdempotencyLayer {
            shared: Arc::new(Shared {
                config,
                store: Arc::new(store),
                flights: Arc::new(Flights::with_hasher(Default::default())),
            }),
        }
    }

    /// The configuration, to change while building (copied if the layer was cloned).
    fn config(&mut self) -> &mut Config {
        &mut Arc::make_mut(&mut self.shared).config
    }

    /// The methods the layer covers. Default `POST`, `PATCH`. Other methods pass straight
    /// through: no buffering, no hashing, no store access.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config().methods = methods.into_iter().collect();
        self
    }

    /// What to do with a covered request without `Idempotency-Key`. Default [`KeyMode::Derive`].
    pub fn key_mode(mut self, mode: KeyMode) -> Self {
        self.config().key_mode = mode;
        self
    }

    /// The principal of a request: every stored key is namespaced by it, so one principal never
    /// receives another's cached response.
    ///
    /// Default: [`Scope::from_credentials`], a SHA-256 of the `Authorization` and `Cookie`
    /// headers (anonymous when neither is present). Where your application knows the user,
    /// scope by the user id — for example from an extension your auth middleware sets (run it
    /// before this layer):
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
    /// #[derive(Clone)]
    /// struct UserId(u64);
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).scope(|parts| {
    ///     match parts.extensions.get::<UserId>() {
    ///         Some(user) => Scope::new(user.0.to_be_bytes()),
    ///         None => Scope::from_credentials(parts),
    ///     }
    /// });
    /// # let _ = layer;
    /// ```
    pub fn scope<F>(mut self, f: F) -> Self
    where
        F: Fn(&request::Parts) -> Scope + Send + Sync + 'static,
    {
        self.config().scope = Arc::new(f);
        self
    }

    /// Largest request body the layer buffers. Default 1 MiB. A `Content-Length` over it is
    /// answered 413 without reading; a body that grows past it, 413 too.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config().max_body = bytes;
        self
    }

    /// Largest response body the layer keeps for replay. Default 1 MiB. A larger response is
    /// relayed to its clients as it streams, and the key is marked completed but not replayable;
    /// a stream that ends within the limit is stored and replayed like any response.
    pub fn max_stored_response(mut self, bytes: usize) -> Self {
        self.config().max_stored_response = bytes;
        self
    }

    /// Which responses are stored for replay. Default: 2xx, 3xx and 4xx except 408, 425, 429
    /// ([`default_store_if`](crate::policy::default_store_if)). A response not stored releases
    /// its key, so a retry runs again. A handler can also veto storage of one response with
    /// [`DoNotStore`](crate::DoNotStore).
    pub fn store_if<F>(mut self, f: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().store_if = Arc::new(f);
        self
    }

    /// Which responses are streams: relayed frame by frame to the leader's client and to every
    /// duplicate that attaches, instead of being read whole first. Default:
    /// `content-type: text/event-stream` ([`default_is_stream`](crate::policy::default_is_stream)).
    /// A body that outgrows the stored-response limit is relayed the same way. A stream that
    /// ends within the limit is stored and replayed; a longer one leaves the key completed but
    /// not replayable.
    pub fn is_stream<F>(mut self, f: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().is_stream = Arc::new(f);
        self
    }

    /// How long a record under a client-supplied key is kept. Default 24 hours; values over
    /// about 30 years count as 30 years.
    ///
    /// # Panics
    /// If `ttl` is zero.
    pub fn client_key_ttl(mut self, ttl: Duration) -> Self {
        assert!(!ttl.is_zero(), "client_key_ttl must be positive");
        self.config().client_key_ttl = ttl.min(LONGEST);
        self
    }

    /// How long a record under a derived key is kept. Default 60 seconds: long enough to absorb
    /// double clicks and automatic retries, short enough that a deliberate repeat later runs.
    /// Values over about 30 years count as 30 years.
    ///
    /// # Panics
    /// If `ttl` is zero.
    pub fn derived_key_ttl(mut self, ttl: Duration) -> Self {
        assert!(!ttl.is_zero(), "derived_key_ttl must be positive");
        self.config().derived_key_ttl = ttl.min(LONGEST);
        self
    }

    /// How long a duplicate waits for the original's outcome before a 409 with `Retry-After`.
    /// Default 30 seconds; values over about 30 years count as 30 years.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.config().max_wait = wait.min(LONGEST);
        self
    }

    /// What a duplicate does while the original runs. Default [`Concurrent::Wait`].
    pub fn concurrent(mut self, mode: Concurrent) -> Self {
        self.config().concurrent = mode;
        self
    }

    /// What to do when the store fails. Default [`FailureMode::Closed`] (503).
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.config().failure_mode = mode;
        self
    }

    /// The lease of a claim. Default 10 seconds. The leader renews it every third of a lease
    /// while the handler runs, so a slow handler keeps its claim; a crashed instance's claim
    /// expires after one lease. Values over about 30 years count as 30 years.
    ///
    /// # Panics
    /// If `lease` is under 3 milliseconds.
    pub fn lease(mut self, lease: Duration) -> Self {
        assert!(
            lease >= Duration::from_millis(3),
            "lease must be at least 3 ms"
        );
        self.config().lease = lease.min(LONGEST);
        self
    }

    /// What to do with a claim whose lease expired. Default [`Reclaim::AfterLease`]: the next
    /// duplicate runs the request (at-least-once for a crashed holder).
    pub fn reclaim(mut self, reclaim: Reclaim) -> Self {
        self.config().reclaim = reclaim;
        self
    }

    /// Timeout of one store operation; past it, the store counts as failed. Default 2 seconds;
    /// values over about 30 years count as 30 years.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config().store_timeout = timeout.min(LONGEST);
        self
    }

    /// The header that marks a response not produced by this request's own execution.
    /// Default `idempotent-replayed` (value `true`).
    pub fn replay_header(mut self, name: HeaderName) -> Self {
        self.config().replay_header = name;
        self
    }

    /// Response headers not stored, so not replayed. Default `date` and `set-cookie`.
    /// Hop-by-hop headers are never stored, whatever this list says.
    pub fn strip_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().strip_headers = names.into_iter().collect();
        self
    }

    /// Replaces the layer's own responses (400, 409, 413, 422, 500, 503). Default: RFC 9457
    /// problem+json ([`Problem::to_response`](crate::problem::Problem::to_response)).
    pub fn problem_responder(mut self, responder: impl ProblemResponder) -> Self {
        self.config().responder = Arc::new(responder);
        self
    }
}

impl<S, St: Store> Layer<S> for IdempotencyLayer<St> {
    type Service = IdempotencyService<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, self.shared.clone())
    }
}
