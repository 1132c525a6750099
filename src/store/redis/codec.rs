//! The binary encoding of a completed [`Record`] as `RedisStore` keeps it.
//!
//! ```text
//! magic   0xA7 0x1D
//! version u8                      (1)
//! fingerprint [u8; 32]
//! flags   u8                      bit 0: response present, bit 1: trailers present
//! -- when a response is present:
//! status  u16, big endian
//! headers varint count, then per header: varint name length, name, varint value length, value
//! body    varint length, bytes
//! -- when trailers are present:
//! trailers, encoded as the headers
//! ```
//!
//! Varints are unsigned LEB128. Header order (repeated names included) is kept. Decoding
//! validates every length against the input, every name, value and status, and rejects trailing
//! bytes: anything else is [`StoreError::Corrupt`], never a panic.

use bytes::{BufMut, Bytes};
use http::{HeaderName, HeaderValue, StatusCode};

use crate::{
    key::Fingerprint,
    record::{Record, StoredHeaders, StoredResponse},
    store::StoreError,
};

const MAGIC: [u8; 2] = [0xA7, 0x1D];
/// The version written by this crate; the only one it reads.
pub(super) const VERSION: u8 = 1;
const HAS_RESPONSE: u8 = 1;
const HAS_TRAILERS: u8 = 2;

/// Encodes `record` in the current version.
pub(super) fn encode(record: &Record) -> Vec<u8> {
    let cap = 2 + 1 + 32 + 1 + record.size();
    // A `Vec` (it is a `BufMut` too): handed to the script call as is, no second copy.
    let mut out = Vec::with_capacity(cap);
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_slice(&record.fingerprint.0);
    let Some(res) = &record.response else {
        out.put_u8(0);
        return out;
    };
    let flags = HAS_RESPONSE
        | if res.trailers.is_some() {
            HAS_TRAILERS
        } else {
            0
        };
    out.put_u8(flags);
    out.put_u16(res.status.as_u16());
    put_headers(&mut out, &res.headers);
    put_varint(&mut out, res.body.len() as u64);
    out.put_slice(&res.body);
    if let Some(t) = &res.trailers {
        put_headers(&mut out, t);
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    out.put_u8(n as u8);
}

fn put_headers(out: &mut Vec<u8>, headers: &StoredHeaders) {
    put_varint(out, headers.len() as u64);
    for (name, value) in headers {
        put_varint(out, name.as_str().len() as u64);
        out.put_slice(name.as_str().as_bytes());
        put_varint(out, value.len() as u64);
        out.put_slice(value.as_bytes());
    }
}

/// Decodes a record; the body shares `raw`'s allocation.
pub(super) fn decode(raw: Bytes) -> Result<Record, StoreError> {
    let mut r = Reader { buf: raw, pos: 0 };
    if *r.take(2)? != MAGIC[..] {
        return Err(corrupt("not a tower-idempotency record (bad magic)"));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(StoreError::Corrupt(format!(
            "unsupported record version {version} (this build reads version {VERSION})"
        )));
    }
    let fingerprint = Fingerprint(r.array32()?);
    let flags = r.u8()?;
    if flags & !(HAS_RESPONSE | HAS_TRAILERS) != 0
        || (flags & HAS_TRAILERS != 0 && flags & HAS_RESPONSE == 0)
    {
        return Err(corrupt("unknown record flags"));
    }
    let response = if flags & HAS_RESPONSE != 0 {
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| corrupt("invalid status"))?;
        let headers = r.headers()?;
        let len = r.len()?;
        let body = r.bytes(len)?;
        let trailers = if flags & HAS_TRAILERS != 0 {
            Some(r.headers()?)
        } else {
            None
        };
        Some(StoredResponse {
            status,
            headers,
            body,
            trailers,
        })
    } else {
        None
    };
    if r.pos != r.buf.len() {
        return Err(corrupt("trailing bytes after the record"));
    }
    Ok(Record {
        fingerprint,
        response,
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], StoreError> {
        if n > self.remaining() {
            return Err(corrupt("truncated record"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, StoreError> {
        if n > self.remaining() {
            return Err(corrupt("truncated record"));
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn array32(&mut self) -> Result<[u8; 32], StoreError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("varint too long"))
    }

    /// A length that must fit in what is left of the input.
    fn len(&mut self) -> Result<usize, StoreError> {
        let n = self.varint()?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(corrupt("length beyond the end of the record")),
        }
    }

    fn headers(&mut self) -> Result<StoredHeaders, StoreError> {
        let count = self.len()?; // every header takes at least two bytes
        let mut map = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let n = self.len()?;
            let name = HeaderName::from_bytes(self.take(n)?)
                .map_err(|_| corrupt("invalid header name"))?;
            let n = self.len()?;
            let value = HeaderValue::from_maybe_shared(self.bytes(n)?)
                .map_err(|_| corrupt("invalid header value"))?;
            map.push((name, value));
        }
        Ok(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    fn sample(trailers: bool) -> Record {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let trailers = trailers.then(|| {
            let mut t = HeaderMap::new();
            t.append("x-checksum", HeaderValue::from_static("abc"));
            t
        });
        Record {
            fingerprint: Fingerprint([7; 32]),
            response: Some(StoredResponse {
                status: StatusCode::CREATED,
                headers: headers.into(),
                body: Bytes::from([0u8, 1, 2, 255].repeat(100)),
                trailers: trailers.map(Into::into),
            }),
        }
    }

    #[test]
    fn round_trips() {
        for record in [
            sample(false),
            sample(true),
            Record {
                fingerprint: Fingerprint([1; 32]),
                response: None,
            },
        ] {
            let back = decode(Bytes::from(encode(&record))).unwrap();
            assert_eq!(back, record);
            let order: Vec<_> = back
                .response
                .iter()
                .flat_map(|r| r.headers.iter())
                .filter(|(k, _)| *k == "x-a")
                .map(|(_, v)| v)
                .collect();
            if record.response.is_some() {
                assert_eq!(order, ["1", "2"]);
            }
        }
    }

    #[test]
    fn every_truncation_and_mutation_is_an_error_not_a_panic() {
        let raw = encode(&sample(true));
        for n in 0..raw.len() {
            assert!(
                decode(Bytes::copy_from_slice(&raw[..n])).is_err(),
                "prefix {n}"
            );
        }
        let mut extra = raw.clone();
        extra.push(0);
        assert!(decode(Bytes::from(extra)).is_err());
        // Flip every byte: never a panic (some flips, e.g. in the body, still decode).
        for i in 0..raw.len() {
            let mut m = raw.clone();
            m[i] ^= 0xff;
            let _ = decode(Bytes::from(m));
        }
        let mut future = raw.clone();
        future[2] = VERSION + 1;
        assert!(matches!(
            decode(Bytes::from(future)),
            Err(StoreError::Corrupt(m)) if m.contains("version")
        ));
        assert!(decode(Bytes::from_static(b"hello world")).is_err());
        // A huge declared length does not allocate.
        let mut huge = raw[..36].to_vec();
        huge.extend_from_slice(&[0x00, 0xc8]); // status 200
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode(Bytes::from(huge)).is_err());
    }
}
