//! [`RetryPolicy`]: a `tower::retry` policy for requests that carry an `Idempotency-Key`.

use std::{
    hash::{BuildHasher, RandomState},
    time::{Duration, SystemTime},
};

use http::{HeaderMap, Method, StatusCode, header};
use tower::retry::Policy;

use super::{ClientRequest, ClientResponse, TryCloneRequest};
use crate::IDEMPOTENCY_KEY;

/// A [`tower::retry::Policy`] for calls made safe to retry by an `Idempotency-Key`.
///
/// What is retried, at most [`max_attempts`](Self::max_attempts) attempts in all:
///
/// | outcome | retried |
/// |---|---|
/// | an error of the inner service (connection refused or reset, timeout) | yes, after a backoff |
/// | `408`, `429`, `5xx` (except `501`, `505`) | yes, after `Retry-After` if present, else a backoff |
/// | `409` with `Retry-After` (the request is still running on the server) | yes, after `Retry-After` |
/// | `409` without `Retry-After`, `400`, `422`, every other `4xx`, `1xx`–`3xx` | never |
///
/// The backoff is exponential with jitter: before retry *n*, a random delay between half and
/// all of `min(max_backoff, base_backoff × 2ⁿ⁻¹)`. A `Retry-After` (delta-seconds or HTTP date)
/// is a minimum; one longer than [`max_retry_after`](Self::max_retry_after) ends the retries and
/// hands the response to the caller.
///
/// Only requests that can be copied are retried ([`TryCloneRequest`]: a buffered body).
/// A `POST` or `PATCH` without an `Idempotency-Key` is never retried (see
/// [`retry_without_key`](Self::retry_without_key)): put
/// [`IdempotencyKeyLayer`](super::IdempotencyKeyLayer) outside the retry layer.
///
/// Each call through `tower::retry::Retry` starts with a fresh copy of the policy, so the
/// attempt count is per logical request.
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, retry::RetryLayer};
/// use tower_idempotency::client::{IdempotencyKeyLayer, RetryPolicy};
///
/// # fn client() -> tower::util::BoxCloneService<http::Request<String>, http::Response<String>, std::convert::Infallible> { unimplemented!() }
/// # fn build() {
/// let client = ServiceBuilder::new()
///     .layer(IdempotencyKeyLayer::new()) // outside: one key per logical request
///     .layer(RetryLayer::new(
///         RetryPolicy::new()
///             .max_attempts(4)
///             .base_backoff(Duration::from_millis(50)),
///     ))
///     .service(client());
/// # let _ = client;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_backoff: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    retry_without_key: bool,
    /// Attempts made so far for the current logical request.
    attempts: u32,
}

impl RetryPolicy {
    /// Default number of attempts, the first included: 5.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// Default base of the exponential backoff: 100 ms.
    pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_millis(100);
    /// Default longest backoff: 5 seconds.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
    /// Default longest `Retry-After` the policy waits for: 30 seconds.
    pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

    /// A policy with every default of this page.
    pub fn new() -> Self {
        RetryPolicy {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            base_backoff: Self::DEFAULT_BASE_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            max_retry_after: Self::DEFAULT_MAX_RETRY_AFTER,
            retry_without_key: false,
            attempts: 0,
        }
    }

    /// Most attempts per logical request, the first included. Default 5.
    ///
    /// # Panics
    /// If `attempts` is zero.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        assert!(attempts > 0, "max_attempts must be at least 1");
        self.max_attempts = attempts;
        self
    }

    /// Base of the exponential backoff. Default 100 ms.
    pub fn base_backoff(mut self, base: Duration) -> Self {
        self.base_backoff = base;
        self
    }

    /// Longest backoff between two attempts (before jitter). Default 5 seconds.
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Longest `Retry-After` the policy waits for; a longer one ends the retries and the caller
    /// gets the response. Default 30 seconds.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Whether a `POST` or `PATCH` without an `Idempotency-Key` may be retried. Default `false`:
    /// without a key the server cannot recognise the retry and may run the request twice.
    /// Other methods (`GET`, `PUT`, `DELETE`, …) are idempotent by definition and retried either
    /// way.
    pub fn retry_without_key(mut self, allow: bool) -> Self {
        self.retry_without_key = allow;
        self
    }

    /// The delay before the next attempt, or `None` to hand the outcome to the caller.
    fn next_delay(&self, status: Option<(StatusCode, &HeaderMap)>) -> Option<Duration> {
        let Some((status, headers)) = status else {
            return Some(self.backoff());
        };
        // Decided on the status first: a success pays for nothing more.
        let retry_after = match status.as_u16() {
            408 | 429 | 500 | 502..=504 | 506..=599 => retry_after(headers),
            409 => Some(retry_after(headers)?),
            _ => return None,
        };
        let backoff = self.backoff();
        match retry_after {
            Some(after) if after > self.max_retry_after => None,
            Some(after) => Some(after.max(backoff)),
            None => Some(backoff),
        }
    }

    /// Exponential backoff with "equal jitter" for the retry after `self.attempts` attempts.
    fn backoff(&self) -> Duration {
        let shift = self.attempts.saturating_sub(1).min(31);
        let cap = self
            .base_backoff
            .saturating_mul(1 << shift)
            .min(self.max_backoff);
        let half = cap / 2;
        let nanos = u64::try_from((cap - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = match nanos {
            0 => 0,
            n => RandomState::new().hash_one(self.attempts) % (n + 1),
        };
        half + Duration::from_nanos(jitter)
    }

    fn may_retry<Req: ClientRequest>(&self, req: &Req) -> bool {
        let unsafe_method = !matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        !unsafe_method || self.retry_without_key || req.headers().contains_key(&IDEMPOTENCY_KEY)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl<Req, Res, E> Policy<Req, Res, E> for RetryPolicy
where
    Req: ClientRequest + TryCloneRequest,
    Res: ClientResponse,
{
    type Future = tokio::time::Sleep;

    fn retry(&mut self, req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        self.attempts = self.attempts.saturating_add(1);
        if self.attempts >= self.max_attempts || !self.may_retry(req) {
            return None;
        }
        let status = match result {
            Ok(res) => Some((res.status(), res.headers())),
            Err(_) => None,
        };
        self.next_delay(status).map(tokio::time::sleep)
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        req.try_clone_request()
    }
}

/// `Retry-After` as a delay: delta-seconds, or an HTTP date (any of the three forms RFC 9110
/// requires recipients to accept) from now; a date in the past is no delay.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn after(value: &str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, value.parse().unwrap());
        retry_after(&h)
    }

    #[test]
    fn retry_after_forms() {
        let secs = |s: &str| {
            httpdate::parse_http_date(s)
                .ok()
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs())
        };
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(secs("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 CET"), None);
        assert_eq!(secs("soon"), None);
        // The obsolete forms recipients must accept.
        assert_eq!(secs("Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(secs("Sun Nov  6 08:49:37 1994"), Some(784_111_777));
        assert_eq!(after("120"), Some(Duration::from_secs(120)));
        assert_eq!(after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        for bad in [
            "+5",
            "-5",
            "1.5",
            "soon",
            "Sun, 06 Nov 999999999999 08:49:37 GMT",
        ] {
            assert_eq!(after(bad), None, "{bad}");
        }
        assert_eq!(
            after("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(90));
        let d = after(&soon).unwrap();
        assert!(
            d > Duration::from_secs(80) && d <= Duration::from_secs(90),
            "{d:?}"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut p = RetryPolicy::new()
            .base_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(350));
        for (attempts, cap) in [(1, 100), (2, 200), (3, 350), (10, 350), (40, 350)] {
            p.attempts = attempts;
            let d = p.backoff();
            assert!(d >= Duration::from_millis(cap) / 2, "{d:?}");
            assert!(d <= Duration::from_millis(cap), "{d:?}");
        }
    }

    #[test]
    fn statuses() {
        let p = RetryPolicy::new().base_backoff(Duration::ZERO);
        let mut h = HeaderMap::new();
        let s = |c| Some((StatusCode::from_u16(c).unwrap(), &h));
        for c in [400, 401, 404, 409, 413, 422, 200, 201, 302, 501, 505] {
            assert_eq!(p.next_delay(s(c)), None, "{c}");
        }
        for c in [408, 429, 500, 502, 503, 504] {
            assert_eq!(p.next_delay(s(c)), Some(Duration::ZERO), "{c}");
        }
        assert_eq!(p.next_delay(None), Some(Duration::ZERO));
        h.insert(header::RETRY_AFTER, "2".parse().unwrap());
        let s = |c| Some((StatusCode::from_u16(c).unwrap(), &h));
        assert_eq!(p.next_delay(s(409)), Some(Duration::from_secs(2)));
        assert_eq!(p.next_delay(s(503)), Some(Duration::from_secs(2)));
        assert_eq!(p.next_delay(s(422)), None);
        h.insert(header::RETRY_AFTER, "3600".parse().unwrap());
        let s = |c| Some((StatusCode::from_u16(c).unwrap(), &h));
        assert_eq!(p.next_delay(s(503)), None);
    }
}
