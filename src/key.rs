//! `Idempotency-Key` parsing, principal scope and request fingerprint.
//!
//! The stored key of a request is always 32 bytes:
//! - with a client key: `SHA-256(scope, key)` (length-prefixed fields);
//! - without one (derived key): the request fingerprint itself.
//!
//! The fingerprint is `SHA-256(scope, method, path-and-query, body)`, with every field but the
//! last one length-prefixed, and the body length appended after the body.

use std::{
    borrow::Cow,
    fmt,
    hash::{BuildHasher, Hasher, RandomState},
};

use http::{HeaderMap, HeaderName, header, request};
use sha2::{Digest, Sha256};

/// The name of the request header that carries the client's key.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Maximum length of a client key, in characters (RFC 9651 strings are ASCII).
pub const MAX_KEY_LEN: usize = 255;

/// A 32-byte SHA-256 digest used as a stored key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(pub [u8; 32]);

/// A 32-byte SHA-256 digest of a request (scope, method, path and query, body).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

macro_rules! hex_debug {
    ($ty:ident) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($ty))?;
                for b in &self.0[..8] {
                    write!(f, "{b:02x}")?;
                }
                f.write_str("…)")
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    };
}
hex_debug!(StoreKey);
hex_debug!(Fingerprint);

/// Hashes stored keys for in-process maps. Keys are SHA-256 digests, so two of their words
/// carry all the entropy a table needs; a per-process secret and a folded multiply keep an
/// attacker who grinds keys from steering them into one bucket. Cheaper than SipHash over 32
/// bytes, which would run several times per request.
#[derive(Clone, Copy)]
pub(crate) struct KeyHashBuilder {
    k0: u64,
    k1: u64,
}

impl Default for KeyHashBuilder {
    fn default() -> Self {
        let seed = RandomState::new();
        KeyHashBuilder {
            k0: seed.hash_one(0x5eed_u64),
            k1: seed.hash_one(0xfeed_u64) | 1,
        }
    }
}

impl BuildHasher for KeyHashBuilder {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            k0: self.k0,
            k1: self.k1,
            h: 0,
        }
    }
}

/// See [`KeyHashBuilder`].
pub(crate) struct KeyHasher {
    k0: u64,
    k1: u64,
    h: u64,
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks(8).map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        });
        let a = words.next().unwrap_or(0) ^ self.k0;
        let b = words.next().unwrap_or(0) ^ self.k1;
        let m = u128::from(a ^ self.h) * u128::from(b);
        self.h = (m as u64) ^ ((m >> 64) as u64);
    }

    fn write_usize(&mut self, _len: usize) {
        // The length prefix of a 32-byte array carries nothing.
    }

    fn finish(&self) -> u64 {
        self.h
    }
}

/// The principal a request acts for. Every stored key is namespaced by it, so one principal can
/// never receive another principal's cached response.
///
/// Build it with [`Scope::new`] from anything that identifies the principal (a user id, a tenant
/// id, an API key id); [`Scope::none`] is the shared, anonymous scope.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope(Option<[u8; 32]>);

impl Scope {
    /// The anonymous scope, shared by every request that has no principal.
    pub const fn none() -> Self {
        Scope(None)
    }

    /// A scope identified by `id` (hashed; the value itself is never stored).
    pub fn new(id: impl AsRef<[u8]>) -> Self {
        Scope(Some(Sha256::digest(id.as_ref()).into()))
    }

    /// The default scope: a SHA-256 of the `Authorization` and `Cookie` header values (every line
    /// of each, in order), or [`Scope::none`] when the request carries neither.
    ///
    /// Browser sessions are principals too, which is why `Cookie` counts. When your application
    /// knows the authenticated user, scope by the user id instead (see
    /// [`IdempotencyLayer::scope`](crate::IdempotencyLayer::scope)): a token refresh or an
    /// unrelated cookie then does not change the scope.
    pub fn from_credentials(parts: &request::Parts) -> Self {
        from_headers(&parts.headers)
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Some(b) => b,
            None => &[],
        }
    }
}

fn from_headers(headers: &HeaderMap) -> Scope {
    let mut hasher: Option<Sha256> = None;
    for (tag, name) in [(b'A', &header::AUTHORIZATION), (b'C', &header::COOKIE)] {
        for value in headers.get_all(name) {
            let h = hasher.get_or_insert_with(Sha256::new);
            h.update([tag]);
            h.update((value.len() as u64).to_be_bytes());
            h.update(value.as_bytes());
        }
    }
    Scope(hasher.map(|h| h.finalize().into()))
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Scope(none)"),
            Some(b) => write!(
                f,
                "Scope({:02x}{:02x}{:02x}{:02x}…)",
                b[0], b[1], b[2], b[3]
            ),
        }
    }
}

/// Why an `Idempotency-Key` header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is present but the key is empty.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] characters.
    TooLong,
    /// The key contains a character outside printable ASCII, or a malformed string escape.
    Invalid,
    /// The header appears more than once.
    Repeated,
    /// The value is a comma-separated list, or has text after a quoted string.
    List,
}

impl KeyError {
    /// A human explanation, used as the problem `detail`.
    pub fn detail(&self) -> &'static str {
        match self {
            KeyError::Empty => "The Idempotency-Key header is empty.",
            KeyError::TooLong => "The Idempotency-Key is longer than 255 characters.",
            KeyError::Invalid => {
                "The Idempotency-Key must be printable ASCII: a structured-field string (\"abc\") or a bare token (abc)."
            }
            KeyError::Repeated => "The Idempotency-Key header appears more than once.",
            KeyError::List => "The Idempotency-Key header holds a list; send exactly one key.",
        }
    }
}

/// A client key as it was read, borrowed from the header when no unescaping was needed.
pub(crate) type ClientKey<'a> = Cow<'a, [u8]>;

/// Reads the `Idempotency-Key` header: `Ok(None)` when absent.
pub(crate) fn parse_header(headers: &HeaderMap) -> Result<Option<ClientKey<'_>>, KeyError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_value(value.as_bytes()).map(Some)
}

/// Parses one header value: an RFC 9651 sf-string, or leniently a bare token.
pub(crate) fn parse_value(raw: &[u8]) -> Result<ClientKey<'_>, KeyError> {
    let raw = raw.trim_ascii();
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = if raw[0] == b'"' {
        parse_sf_string(raw)?
    } else {
        for &b in raw {
            match b {
                b',' => return Err(KeyError::List),
                b'"' | b'\\' => return Err(KeyError::Invalid),
                0x21..=0x7e => {}
                _ => return Err(KeyError::Invalid),
            }
        }
        Cow::Borrowed(raw)
    };
    match key.len() {
        0 => Err(KeyError::Empty),
        n if n > MAX_KEY_LEN => Err(KeyError::TooLong),
        _ => Ok(key),
    }
}

fn parse_sf_string(raw: &[u8]) -> Result<ClientKey<'_>, KeyError> {
    // raw[0] == b'"'
    let mut owned: Option<Vec<u8>> = None;
    let mut i = 1;
    while i < raw.len() {
        match raw[i] {
            b'\\' => {
                let next = *raw.get(i + 1).ok_or(KeyError::Invalid)?;
                if next != b'"' && next != b'\\' {
                    return Err(KeyError::Invalid);
                }
                owned.get_or_insert_with(|| raw[1..i].to_vec()).push(next);
                i += 2;
            }
            b'"' => {
                let rest = &raw[i + 1..];
                if !rest.is_empty() {
                    // `"a", "b"` is a list; `"a";p=1` carries parameters we do not accept.
                    return Err(if rest.trim_ascii_start().starts_with(b",") {
                        KeyError::List
                    } else {
                        KeyError::Invalid
                    });
                }
                return Ok(match owned {
                    Some(v) => Cow::Owned(v),
                    None => Cow::Borrowed(&raw[1..i]),
                });
            }
            b @ 0x20..=0x7e => {
                if let Some(v) = owned.as_mut() {
                    v.push(b);
                }
                i += 1;
            }
            _ => return Err(KeyError::Invalid),
        }
    }
    // No closing quote.
    Err(KeyError::Invalid)
}

fn update_field(h: &mut Sha256, field: &[u8]) {
    h.update((field.len() as u64).to_be_bytes());
    h.update(field);
}

/// Computes a request fingerprint incrementally: the head first, then body chunks as they are
/// read (one pass, no copy).
#[derive(Clone)]
pub(crate) struct FingerprintHasher {
    hasher: Sha256,
    body_len: u64,
}

impl FingerprintHasher {
    pub(crate) fn new(scope: &Scope, parts: &request::Parts) -> Self {
        let mut hasher = Sha256::new();
        update_field(&mut hasher, scope.bytes());
        update_field(&mut hasher, parts.method.as_str().as_bytes());
        let pq = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        update_field(&mut hasher, pq.as_bytes());
        FingerprintHasher {
            hasher,
            body_len: 0,
        }
    }

    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.body_len += chunk.len() as u64;
        self.hasher.update(chunk);
    }

    /// The fingerprint; the hasher is reset.
    pub(crate) fn finish(&mut self) -> Fingerprint {
        self.hasher.update(self.body_len.to_be_bytes());
        self.body_len = 0;
        Fingerprint(self.hasher.finalize_reset().into())
    }
}

/// The stored key for a client-supplied key: `SHA-256(scope, key)`.
pub(crate) fn client_store_key(scope: &Scope, key: &[u8]) -> StoreKey {
    let mut h = Sha256::new();
    h.update(b"k");
    update_field(&mut h, scope.bytes());
    update_field(&mut h, key);
    StoreKey(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> Vec<u8> {
        parse_value(raw.as_bytes()).unwrap().to_vec()
    }

    #[test]
    fn sf_string_and_token_name_the_same_key() {
        assert_eq!(ok("\"abc\""), b"abc");
        assert_eq!(ok("abc"), b"abc");
        assert_eq!(ok("  abc  "), b"abc");
        assert_eq!(ok(r#""a\"b\\c""#), br#"a"b\c"#);
        assert_eq!(ok("\"a b,c\""), b"a b,c");
    }

    #[test]
    fn rejects_bad_forms() {
        let cases: &[(&[u8], KeyError)] = &[
            (b"", KeyError::Empty),
            (b"\"\"", KeyError::Empty),
            (b"a,b", KeyError::List),
            (b"\"a\", \"b\"", KeyError::List),
            (b"\"a\";x=1", KeyError::Invalid),
            (b"\"abc", KeyError::Invalid),
            (b"a b", KeyError::Invalid),
            (b"\"a\\nb\"", KeyError::Invalid),
            (b"caf\xc3\xa9", KeyError::Invalid),
            (b"\"caf\xc3\xa9\"", KeyError::Invalid),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse_value(raw),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(
            parse_value("a".repeat(255).as_bytes()).map(|k| k.len()),
            Ok(255)
        );
        assert_eq!(
            parse_value("a".repeat(256).as_bytes()),
            Err(KeyError::TooLong)
        );
    }

    #[test]
    fn fingerprint_separates_fields() {
        let parts = |uri: &str| http::Request::post(uri).body(()).unwrap().into_parts().0;
        let fp = |uri: &str, body: &[&[u8]]| {
            let mut h = FingerprintHasher::new(&Scope::none(), &parts(uri));
            for c in body {
                h.update(c);
            }
            h.finish()
        };
        assert_ne!(fp("/p?amount=1", &[b""]), fp("/p?amount=100", &[b""]));
        assert_eq!(fp("/p", &[b"ab", b"c"]), fp("/p", &[b"abc"]));
        assert_ne!(fp("/p", &[b"abc"]), fp("/pa", &[b"bc"]));
        let scoped = FingerprintHasher::new(&Scope::new("u1"), &parts("/p")).finish();
        assert_ne!(scoped, fp("/p", &[]));
    }
}
