//! The record a store keeps for a completed key.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::key::Fingerprint;

/// What a store keeps for a completed key: the fingerprint of the request that ran, and either
/// the response to replay or the fact that the response could not be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Fingerprint of the request that created the record; a duplicate with another fingerprint
    /// is answered 422.
    pub fingerprint: Fingerprint,
    /// The stored response, or `None` when the request ran but its response was not replayable
    /// (streaming, or larger than the stored-response limit).
    pub response: Option<StoredResponse>,
}

impl Record {
    /// Approximate heap cost of the record in bytes, used by bounded stores.
    pub fn size(&self) -> usize {
        const FIXED: usize = 96;
        FIXED
            + self.response.as_ref().map_or(0, |r| {
                r.body.len()
                    + header_bytes(&r.headers)
                    + r.trailers.as_ref().map_or(0, header_bytes)
            })
    }
}

fn header_bytes(h: &HeaderMap) -> usize {
    h.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum()
}

/// A response as it is replayed: status, headers (already filtered), body and trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The original status.
    pub status: StatusCode,
    /// The original headers, without hop-by-hop headers and those configured not to be stored
    /// (`date` and `set-cookie` by default).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, when the body had any.
    pub trailers: Option<HeaderMap>,
}
