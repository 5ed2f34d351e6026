//! 32-byte BLAKE3 digests and the image root hash.
//!
//! The root hash names an image: incremental children record their parent's
//! root hash, and `verify` recomputes it from the file.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Key-derivation context of the root hash (BLAKE3 derive-key mode), so a root
/// hash can never collide with a plain BLAKE3 of some other byte string.
pub(crate) const ROOT_CONTEXT: &str = "ferry image root v1";

/// A 32-byte BLAKE3 digest, printed and serialised as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// BLAKE3 of `data`; the digest used for chunks, sections, header and footer.
    pub fn of(data: &[u8]) -> Self {
        Hash32(*blake3::hash(data).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<blake3::Hash> for Hash32 {
    fn from(h: blake3::Hash) -> Self {
        Hash32(*h.as_bytes())
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({self})")
    }
}

impl FromStr for Hash32 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = from_hex(s)?;
        let arr: [u8; 32] =
            v.try_into().map_err(|v: Vec<u8>| format!("expected 32 bytes (64 hex digits), got {}", v.len()))?;
        Ok(Hash32(arr))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Lowercase hex of `bytes`; used for digests and the public key parameters in the header.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case); the error says which character is wrong.
pub(crate) fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err(format!("odd number of hex digits ({})", s.len()));
    }
    let nibble = |i: usize, c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("invalid hex digit {:?} at position {i}", c as char)),
        }
    };
    let b = s.as_bytes();
    (0..b.len() / 2).map(|i| Ok(nibble(2 * i, b[2 * i])? << 4 | nibble(2 * i + 1, b[2 * i + 1])?)).collect()
}

/// Incremental computation of the root hash, fed in file order.
///
/// root = BLAKE3-derive-key("ferry image root v1",
///          header_hash || chunk_hash[0] || ... || chunk_hash[n-1]
///          || state_hash || cpus_hash || u64le(n))
pub(crate) struct RootHasher {
    h: blake3::Hasher,
    chunks: u64,
}

impl RootHasher {
    /// Starts a root over the given header hash.
    pub(crate) fn new(header_hash: &Hash32) -> Self {
        let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
        h.update(&header_hash.0);
        RootHasher { h, chunks: 0 }
    }

    /// Adds the next chunk's hash (chunks must come in index order).
    pub(crate) fn chunk(&mut self, hash: &Hash32) {
        self.h.update(&hash.0);
        self.chunks += 1;
    }

    /// Adds the two section hashes and the chunk count, and returns the root.
    pub(crate) fn finish(mut self, state: &Hash32, cpus: &Hash32) -> Hash32 {
        self.h.update(&state.0);
        self.h.update(&cpus.0);
        self.h.update(&self.chunks.to_le_bytes());
        self.h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = Hash32::of(b"abc");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Hash32>().unwrap(), h);
        assert_eq!(serde_json::from_str::<Hash32>(&serde_json::to_string(&h).unwrap()).unwrap(), h);
    }

    #[test]
    fn bad_hex_is_an_error() {
        assert!("zz".parse::<Hash32>().is_err());
        assert!("abc".parse::<Hash32>().is_err());
        assert!("abcd".parse::<Hash32>().is_err());
    }

    #[test]
    fn root_depends_on_order_and_count() {
        let hh = Hash32::of(b"h");
        let (a, b) = (Hash32::of(b"a"), Hash32::of(b"b"));
        let z = Hash32::default();
        let mut r1 = RootHasher::new(&hh);
        r1.chunk(&a);
        r1.chunk(&b);
        let mut r2 = RootHasher::new(&hh);
        r2.chunk(&b);
        r2.chunk(&a);
        assert_ne!(r1.finish(&z, &z), r2.finish(&z, &z));
    }
}
