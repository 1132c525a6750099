//! What the layer covers, what it stores, and how it behaves when things go wrong.

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderName, Method, StatusCode, header, request, response};

use crate::{key::Scope, problem::ProblemResponder, store::Reclaim};

/// What to do with a covered request that carries no `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyMode {
    /// Derive the key from the request fingerprint (scope, method, path and query, body), so
    /// identical requests within the derived-key TTL run once. The default: it absorbs double
    /// clicks and automatic retries from clients that send no key.
    #[default]
    Derive,
    /// Pass the request through unprotected.
    Optional,
    /// Answer 400 (problem+json).
    Required,
}

/// What a duplicate does when the original request is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Concurrent {
    /// Wait for the original's outcome (up to `max_wait`) and replay it. The default.
    #[default]
    Wait,
    /// Answer 409 with `Retry-After` at once (the IETF draft's strict behaviour).
    Reject,
}

/// What to do when the store fails (unreachable, timed out, full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailureMode {
    /// Answer 503 with `Retry-After`; the request does not run. The default.
    #[default]
    Closed,
    /// Run the request without protection, and log a warning.
    Open,
}

/// Marker a handler puts in its response extensions to keep that response out of the store:
/// the claim is released and a retry runs again.
///
/// ```
/// # use axum::response::IntoResponse;
/// use tower_idempotency::DoNotStore;
/// async fn handler() -> impl IntoResponse {
///     // e.g. the payment provider answered "try again later" with a 200
///     (axum::Extension(DoNotStore), "provider busy")
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DoNotStore;

pub(crate) type ScopeFn = Arc<dyn Fn(&request::Parts) -> Scope + Send + Sync>;
pub(crate) type StorePredicate = Arc<dyn Fn(&response::Parts) -> bool + Send + Sync>;

/// The default storage rule: 2xx, 3xx and 4xx are stored, except 408, 425 and 429.
pub fn default_store_if(parts: &response::Parts) -> bool {
    let s = parts.status;
    (s.is_success() || s.is_redirection() || s.is_client_error())
        && s != StatusCode::REQUEST_TIMEOUT
        && s.as_u16() != 425
        && s != StatusCode::TOO_MANY_REQUESTS
}

/// The default streaming rule: `content-type: text/event-stream`.
pub fn default_is_stream(parts: &response::Parts) -> bool {
    parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        // Checked on every executed response: compare in place, no lowercased copy.
        const SSE: &[u8] = b"text/event-stream";
        let v = v.as_bytes().trim_ascii_start();
        v.len() >= SSE.len() && v[..SSE.len()].eq_ignore_ascii_case(SSE)
    })
}

/// The longest duration the layer and the stores work with (about 30 years, as tokio's own
/// "far future"): longer settings count as this, so that no deadline computed from them can
/// overflow and no Redis expiry can go out of range.
pub(crate) const LONGEST: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + d`, or [`LONGEST`] from now when that does not fit.
pub(crate) fn deadline(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    now.checked_add(d).unwrap_or_else(|| now + LONGEST)
}

/// Response headers never stored, whatever the configuration: hop-by-hop headers. (`Trailer`
/// is not one: it announces the trailer fields, and HTTP/1 servers send none without it.)
pub(crate) const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// The layer's whole configuration, shared by every service it makes.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) key_mode: KeyMode,
    pub(crate) scope: ScopeFn,
    pub(crate) max_body: usize,
    pub(crate) max_stored_response: usize,
    pub(crate) store_if: StorePredicate,
    pub(crate) is_stream: StorePredicate,
    pub(crate) client_key_ttl: Duration,
    pub(crate) derived_key_ttl: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) concurrent: Concurrent,
    pub(crate) failure_mode: FailureMode,
    pub(crate) lease: Duration,
    pub(crate) reclaim: Reclaim,
    pub(crate) store_timeout: Duration,
    pub(crate) replay_header: HeaderName,
    pub(crate) strip_headers: Vec<HeaderName>,
    pub(crate) responder: Arc<dyn ProblemResponder>,
}

impl Config {
    #[inline]
    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    pub(crate) fn keeps_header(&self, name: &HeaderName) -> bool {
        !HOP_BY_HOP.contains(name) && !self.strip_headers.contains(name)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("methods", &self.methods)
            .field("key_mode", &self.key_mode)
            .field("max_body", &self.max_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("client_key_ttl", &self.client_key_ttl)
            .field("derived_key_ttl", &self.derived_key_ttl)
            .field("max_wait", &self.max_wait)
            .field("concurrent", &self.concurrent)
            .field("failure_mode", &self.failure_mode)
            .field("lease", &self.lease)
            .field("reclaim", &self.reclaim)
            .field("store_timeout", &self.store_timeout)
            .field("replay_header", &self.replay_header)
            .field("strip_headers", &self.strip_headers)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, Response, header};

    use super::default_is_stream;

    #[test]
    fn event_stream_is_recognised_in_any_case_with_parameters() {
        let parts = |ct: &'static str| {
            let mut res = Response::new(());
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            res.into_parts().0
        };
        assert!(default_is_stream(&parts("text/event-stream")));
        assert!(default_is_stream(&parts(
            " Text/Event-Stream; charset=utf-8"
        )));
        assert!(!default_is_stream(&parts("text/event")));
        assert!(!default_is_stream(&parts("application/json")));
        assert!(!default_is_stream(&Response::new(()).into_parts().0));
    }
}
