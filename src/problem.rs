//! RFC 9457 `application/problem+json` responses, and the hook to replace them.
//!
//! Every outcome of the layer that is not the inner service's own response is a [`Problem`]:
//! a bad key, a body over the limit, a key reused for another request, a wait that timed out,
//! an unavailable store. Each [`ProblemKind`] has a stable `type` URI
//! (`urn:tower-idempotency:problem:<slug>`), a status and a human `detail`.
//!
//! Replace the responses with [`IdempotencyLayer::problem_responder`](crate::IdempotencyLayer::problem_responder):
//!
//! ```
//! use bytes::Bytes;
//! use http::{Response, StatusCode};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, problem::{Problem, ProblemKind}};
//!
//! let layer = IdempotencyLayer::new(MemoryStore::new()).problem_responder(|p: &Problem| {
//!     let mut res = p.to_response();
//!     if p.kind() == ProblemKind::FingerprintMismatch {
//!         *res.status_mut() = StatusCode::CONFLICT; // a client that expects Stripe's status
//!     }
//!     res
//! });
//! # let _ = layer;
//! ```

use std::{fmt, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The cases the layer answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: the `Idempotency-Key` header is malformed.
    InvalidKey(KeyError),
    /// 400: the key is required (`KeyMode::Required`) and missing.
    MissingKey,
    /// 413: the request body is larger than the limit.
    BodyTooLarge,
    /// 400: the request body could not be read.
    BodyReadError,
    /// 422: the key was already used for a different request.
    FingerprintMismatch,
    /// 409 + `Retry-After`: a request with this key is still running (after `max_wait`, or at
    /// once under `Concurrent::Reject`).
    InFlight,
    /// 409: the request ran, but its response was not kept (streaming or too large), so it
    /// cannot be replayed — and it will not run again.
    NotReplayable,
    /// 500 + `Retry-After`: the first attempt failed (inner error or panic) and was not stored;
    /// a retry runs again.
    LeaderFailed,
    /// 409 (no `Retry-After`): the holder of this key stopped without an outcome and
    /// re-running is not allowed (`Reclaim::Never`). Not a 5xx, so that clients which retry
    /// server errors do not retry what will never run again.
    OutcomeUnknown,
    /// 503 + `Retry-After`: the store is unavailable (`FailureMode::Closed`).
    StoreUnavailable,
}

impl ProblemKind {
    /// The HTTP status of this case.
    pub fn status(&self) -> StatusCode {
        match self {
            ProblemKind::InvalidKey(_) | ProblemKind::MissingKey | ProblemKind::BodyReadError => {
                StatusCode::BAD_REQUEST
            }
            ProblemKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::InFlight | ProblemKind::NotReplayable | ProblemKind::OutcomeUnknown => {
                StatusCode::CONFLICT
            }
            ProblemKind::LeaderFailed => StatusCode::INTERNAL_SERVER_ERROR,
            ProblemKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable `type` URI of this case.
    pub fn type_uri(&self) -> &'static str {
        match self {
            ProblemKind::InvalidKey(_) => "urn:tower-idempotency:problem:invalid-key",
            ProblemKind::MissingKey => "urn:tower-idempotency:problem:missing-key",
            ProblemKind::BodyTooLarge => "urn:tower-idempotency:problem:body-too-large",
            ProblemKind::BodyReadError => "urn:tower-idempotency:problem:body-read-error",
            ProblemKind::FingerprintMismatch => "urn:tower-idempotency:problem:key-reused",
            ProblemKind::InFlight => "urn:tower-idempotency:problem:in-flight",
            ProblemKind::NotReplayable => "urn:tower-idempotency:problem:not-replayable",
            ProblemKind::LeaderFailed => "urn:tower-idempotency:problem:first-attempt-failed",
            ProblemKind::OutcomeUnknown => "urn:tower-idempotency:problem:outcome-unknown",
            ProblemKind::StoreUnavailable => "urn:tower-idempotency:problem:store-unavailable",
        }
    }

    /// A short, fixed summary of this case.
    pub fn title(&self) -> &'static str {
        match self {
            ProblemKind::InvalidKey(_) => "Invalid Idempotency-Key",
            ProblemKind::MissingKey => "Idempotency-Key required",
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::BodyReadError => "Request body could not be read",
            ProblemKind::FingerprintMismatch => "Idempotency-Key reused for a different request",
            ProblemKind::InFlight => "Request with this Idempotency-Key is in progress",
            ProblemKind::NotReplayable => "Response cannot be replayed",
            ProblemKind::LeaderFailed => "First attempt failed",
            ProblemKind::OutcomeUnknown => "Outcome of the first attempt is unknown",
            ProblemKind::StoreUnavailable => "Idempotency store unavailable",
        }
    }

    /// A human explanation of this case.
    pub fn detail(&self) -> &'static str {
        match self {
            ProblemKind::InvalidKey(e) => e.detail(),
            ProblemKind::MissingKey => "This endpoint requires an Idempotency-Key header.",
            ProblemKind::BodyTooLarge => {
                "The request body is larger than the idempotency layer buffers."
            }
            ProblemKind::BodyReadError => "Reading the request body failed.",
            ProblemKind::FingerprintMismatch => {
                "This Idempotency-Key was already used with a different method, path, query or body. Use a new key for a new request."
            }
            ProblemKind::InFlight => {
                "A request with this Idempotency-Key is still being processed. Retry after the indicated delay."
            }
            ProblemKind::NotReplayable => {
                "A request with this Idempotency-Key already ran, but its response was streamed or too large to keep, so it cannot be replayed. It will not run again."
            }
            ProblemKind::LeaderFailed => {
                "The first request with this Idempotency-Key failed without a response and was not stored. Retry it."
            }
            ProblemKind::OutcomeUnknown => {
                "The first request with this Idempotency-Key stopped without an outcome, and this server does not run it again."
            }
            ProblemKind::StoreUnavailable => {
                "The idempotency store is unavailable, so the request was not run. Retry after the indicated delay."
            }
        }
    }

    /// The `Retry-After` this case carries, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProblemKind::InFlight | ProblemKind::LeaderFailed | ProblemKind::StoreUnavailable => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }
}

/// One problem the layer is about to answer with.
#[derive(Debug, Clone)]
pub struct Problem {
    kind: ProblemKind,
}

impl Problem {
    pub(crate) fn new(kind: ProblemKind) -> Self {
        Problem { kind }
    }

    /// Which case this is.
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The default response: status, `content-type: application/problem+json`, `Retry-After`
    /// where the case has one, and a JSON body with `type`, `title`, `status` and `detail`.
    pub fn to_response(&self) -> Response<Bytes> {
        let k = &self.kind;
        let status = k.status();
        let body = format!(
            "{{\"type\":\"{}\",\"title\":\"{}\",\"status\":{},\"detail\":\"{}\"}}",
            k.type_uri(),
            k.title(),
            status.as_u16(),
            k.detail().replace('"', "\\\"")
        );
        let mut res = Response::new(Bytes::from(body));
        *res.status_mut() = status;
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(after) = k.retry_after() {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        res
    }
}

/// Turns a [`Problem`] into the response sent to the client. Implemented for closures
/// `Fn(&Problem) -> Response<Bytes>`.
pub trait ProblemResponder: Send + Sync + 'static {
    /// Builds the response for `problem`.
    fn respond(&self, problem: &Problem) -> Response<Bytes>;
}

impl<F> ProblemResponder for F
where
    F: Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static,
{
    fn respond(&self, problem: &Problem) -> Response<Bytes> {
        self(problem)
    }
}

/// The default responder: [`Problem::to_response`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultResponder;

impl ProblemResponder for DefaultResponder {
    fn respond(&self, problem: &Problem) -> Response<Bytes> {
        problem.to_response()
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind.title(), self.kind.status())
    }
}
