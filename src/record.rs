//! The record a store keeps for a completed key.

use std::slice;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

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

fn header_bytes(h: &StoredHeaders) -> usize {
    h.iter()
        .map(|(k, v)| size_of::<(HeaderName, HeaderValue)>() + k.as_str().len() + v.len())
        .sum()
}

/// Headers as a record keeps them: name/value pairs in their original order, repeated names
/// included. A `HeaderMap` keeps spare capacity and an index (over 600 bytes for one header);
/// a stored record lives for hours, so it keeps only the pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredHeaders(Box<[(HeaderName, HeaderValue)]>);

impl StoredHeaders {
    /// The pairs, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&HeaderName, &HeaderValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first value of `name`, if any.
    pub fn get(&self, name: impl AsRef<str>) -> Option<&HeaderValue> {
        let name = name.as_ref();
        self.0
            .iter()
            .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.as_str().eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The headers as a `HeaderMap`, in the same order.
    pub fn to_header_map(&self) -> HeaderMap {
        self.to_header_map_with_room(0)
    }

    /// [`to_header_map`](Self::to_header_map) with room for `extra` more headers, so that
    /// adding them does not grow (reallocate and rehash) the map.
    pub(crate) fn to_header_map_with_room(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.0.len() + extra);
        for (k, v) in self.0.iter() {
            map.append(k.clone(), v.clone());
        }
        map
    }
}

impl<'a> IntoIterator for &'a StoredHeaders {
    type Item = &'a (HeaderName, HeaderValue);
    type IntoIter = slice::Iter<'a, (HeaderName, HeaderValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<(HeaderName, HeaderValue)> for StoredHeaders {
    fn from_iter<I: IntoIterator<Item = (HeaderName, HeaderValue)>>(iter: I) -> Self {
        StoredHeaders(iter.into_iter().collect())
    }
}

impl From<&HeaderMap> for StoredHeaders {
    fn from(map: &HeaderMap) -> Self {
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl From<HeaderMap> for StoredHeaders {
    fn from(map: HeaderMap) -> Self {
        StoredHeaders::from(&map)
    }
}

/// A response as it is replayed: status, headers (already filtered), body and trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The original status.
    pub status: StatusCode,
    /// The original headers, without hop-by-hop headers and those configured not to be stored
    /// (`date` and `set-cookie` by default).
    pub headers: StoredHeaders,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, when the body had any.
    pub trailers: Option<StoredHeaders>,
}
