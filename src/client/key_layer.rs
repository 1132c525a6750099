//! [`IdempotencyKeyLayer`]: a stable `Idempotency-Key` on every outgoing covered request.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Method};
use tower_layer::Layer;
use tower_service::Service;

use super::ClientRequest;
use crate::IDEMPOTENCY_KEY;

/// Makes the value of a new `Idempotency-Key`.
///
/// Implemented by [`UuidV4`] (the default) and by every `Fn() -> HeaderValue` closure, so a
/// caller can plug in its own scheme (a ULID, a key derived from an order id, a fixed key in
/// tests).
///
/// ```
/// use http::HeaderValue;
/// use tower_idempotency::client::IdempotencyKeyLayer;
///
/// // A bare token instead of the default RFC 9651 string, for a server that wants one.
/// let layer = IdempotencyKeyLayer::new().generator(|| {
///     HeaderValue::try_from(uuid::Uuid::new_v4().to_string()).expect("a UUID is a valid header")
/// });
/// # let _ = layer;
/// ```
pub trait KeyGenerator: Send + Sync + 'static {
    /// A fresh key: every call must return a value never returned before.
    fn generate(&self) -> HeaderValue;
}

impl<F> KeyGenerator for F
where
    F: Fn() -> HeaderValue + Send + Sync + 'static,
{
    fn generate(&self) -> HeaderValue {
        self()
    }
}

/// The default [`KeyGenerator`]: a random UUID v4 as an RFC 9651 string, the form the IETF
/// Idempotency-Key draft specifies: `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UuidV4;

impl KeyGenerator for UuidV4 {
    fn generate(&self) -> HeaderValue {
        let mut buf = [0u8; 38];
        buf[0] = b'"';
        uuid::Uuid::new_v4()
            .hyphenated()
            .encode_lower(&mut buf[1..37]);
        buf[37] = b'"';
        HeaderValue::from_bytes(&buf).expect("a quoted hyphenated UUID is a valid header value")
    }
}

/// Adds an `Idempotency-Key` to every outgoing request of a covered method (default `POST` and
/// `PATCH`) that has none, so the server can tell a retry from a new request. A key the caller
/// set is never replaced; other methods pass untouched.
///
/// Put this layer **outside** [`tower::retry`](tower::retry), so the key is set once per
/// logical request and every attempt of that request carries it. Inside the retry layer, each
/// attempt would get a new key and the server would run each one. [`RetryPolicy`] refuses to
/// retry a `POST` or `PATCH` without a key, so that mistake costs retries, not duplicates.
///
/// [`RetryPolicy`]: super::RetryPolicy
///
/// It works for any request type implementing [`ClientRequest`]: `http::Request<B>` for
/// hyper-util's client and other `tower` HTTP clients, and `reqwest::Request` with the
/// `reqwest` feature.
///
/// ```
/// use http::{Method, Request};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
/// use tower_idempotency::client::IdempotencyKeyLayer;
///
/// # #[tokio::main] async fn main() -> Result<(), std::convert::Infallible> {
/// // Stands in for a real client: answers with the key the request carried.
/// let client = service_fn(|req: Request<String>| async move {
///     Ok::<_, std::convert::Infallible>(req.headers().get("idempotency-key").cloned())
/// });
/// let mut client = ServiceBuilder::new()
///     .layer(IdempotencyKeyLayer::new())
///     .service(client);
///
/// let post = Request::post("http://127.0.0.1/v1/charges").body(String::new()).unwrap();
/// assert!(client.ready().await?.call(post).await?.is_some());
///
/// let get = Request::get("http://127.0.0.1/v1/charges").body(String::new()).unwrap();
/// assert!(client.ready().await?.call(get).await?.is_none());
///
/// let mine = Request::post("http://127.0.0.1/v1/charges")
///     .header("idempotency-key", "order-42")
///     .body(String::new())
///     .unwrap();
/// assert_eq!(client.ready().await?.call(mine).await?.unwrap(), "order-42");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct IdempotencyKeyLayer {
    methods: Arc<[Method]>,
    generator: Arc<dyn KeyGenerator>,
}

impl IdempotencyKeyLayer {
    /// A layer that keys `POST` and `PATCH` requests with [`UuidV4`].
    pub fn new() -> Self {
        IdempotencyKeyLayer {
            methods: Arc::from([Method::POST, Method::PATCH]),
            generator: Arc::new(UuidV4),
        }
    }

    /// The methods that get a key. Default `POST`, `PATCH`.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// How keys are made. Default [`UuidV4`].
    pub fn generator(mut self, generator: impl KeyGenerator) -> Self {
        self.generator = Arc::new(generator);
        self
    }
}

impl Default for IdempotencyKeyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IdempotencyKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyKeyLayer")
            .field("methods", &self.methods)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyKeyLayer {
    type Service = IdempotencyKeyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyKeyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`IdempotencyKeyLayer`].
#[derive(Clone)]
pub struct IdempotencyKeyService<S> {
    inner: S,
    layer: IdempotencyKeyLayer,
}

impl<S> IdempotencyKeyService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyKeyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyKeyService")
            .field("inner", &self.inner)
            .field("methods", &self.layer.methods)
            .finish_non_exhaustive()
    }
}

impl<S, R> Service<R> for IdempotencyKeyService<S>
where
    S: Service<R>,
    R: ClientRequest,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: R) -> Self::Future {
        if self.layer.methods.contains(req.method())
            && !req.headers().contains_key(&IDEMPOTENCY_KEY)
        {
            let key = self.layer.generator.generate();
            req.headers_mut().insert(IDEMPOTENCY_KEY.clone(), key);
        }
        self.inner.call(req)
    }
}
