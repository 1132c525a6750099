//! What the client layers need to know about a request or a response, for every client type.

use http::{HeaderMap, Method, StatusCode};

/// An outgoing request the client layers can inspect and tag: its method and headers.
///
/// Implemented for [`http::Request<B>`] (any body: hyper, hyper-util's client, any
/// `tower::Service<http::Request<B>>`) and, with the `reqwest` feature, for
/// `reqwest::Request`. Implement it for another client's request type to use
/// [`IdempotencyKeyLayer`](super::IdempotencyKeyLayer) and [`RetryPolicy`](super::RetryPolicy)
/// with that client.
///
/// ```
/// use tower_idempotency::client::ClientRequest;
///
/// let req = http::Request::post("http://127.0.0.1/v1/charges").body(()).unwrap();
/// assert_eq!(ClientRequest::method(&req), http::Method::POST);
/// ```
pub trait ClientRequest {
    /// The request method.
    fn method(&self) -> &Method;
    /// The request headers.
    fn headers(&self) -> &HeaderMap;
    /// The request headers, to add one.
    fn headers_mut(&mut self) -> &mut HeaderMap;
}

/// A request that can be copied for another attempt, when its body is buffered.
///
/// Implemented for [`http::Request<B>`] whose body is `Clone` (a buffered body such as
/// `http_body_util::Full<Bytes>`, `String` or `Bytes`) and, with the `reqwest` feature, for
/// `reqwest::Request` (through `try_clone`, which fails for streaming bodies). A request that
/// cannot be copied is sent once and never retried.
///
/// ```
/// use tower_idempotency::client::TryCloneRequest;
///
/// let req = http::Request::post("http://127.0.0.1/v1/charges")
///     .body(String::from("{}"))
///     .unwrap();
/// assert!(req.try_clone_request().is_some());
/// ```
pub trait TryCloneRequest: Sized {
    /// A copy of the request for another attempt, or `None` if its body cannot be copied.
    fn try_clone_request(&self) -> Option<Self>;
}

/// A response the retry policy can classify: its status and headers (for `Retry-After`).
///
/// Implemented for [`http::Response<B>`] and, with the `reqwest` feature, for
/// `reqwest::Response`.
pub trait ClientResponse {
    /// The response status.
    fn status(&self) -> StatusCode;
    /// The response headers.
    fn headers(&self) -> &HeaderMap;
}

impl<B> ClientRequest for http::Request<B> {
    fn method(&self) -> &Method {
        http::Request::method(self)
    }

    fn headers(&self) -> &HeaderMap {
        http::Request::headers(self)
    }

    fn headers_mut(&mut self) -> &mut HeaderMap {
        http::Request::headers_mut(self)
    }
}

impl<B: Clone> TryCloneRequest for http::Request<B> {
    fn try_clone_request(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<B> ClientResponse for http::Response<B> {
    fn status(&self) -> StatusCode {
        http::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        http::Response::headers(self)
    }
}

#[cfg(feature = "reqwest")]
impl ClientRequest for reqwest::Request {
    fn method(&self) -> &Method {
        reqwest::Request::method(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Request::headers(self)
    }

    fn headers_mut(&mut self) -> &mut HeaderMap {
        reqwest::Request::headers_mut(self)
    }
}

#[cfg(feature = "reqwest")]
impl TryCloneRequest for reqwest::Request {
    fn try_clone_request(&self) -> Option<Self> {
        self.try_clone()
    }
}

#[cfg(feature = "reqwest")]
impl ClientResponse for reqwest::Response {
    fn status(&self) -> StatusCode {
        reqwest::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Response::headers(self)
    }
}
