//! Message ids: 128 bits shown on the wire as 32 lowercase hex characters.
//!
//! An id is a per-process random nonce (high 64 bits) followed by a counter (low 64 bits), so ids
//! are unique within a run by construction and across restarts with overwhelming probability,
//! without a random-number crate or a syscall per message.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

/// The length of an id on the wire.
pub const ID_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(u128);

impl MessageId {
    pub fn from_u128(value: u128) -> MessageId {
        MessageId(value)
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Parses the wire form: exactly 32 lowercase hex characters.
    pub fn parse(text: &[u8]) -> Option<MessageId> {
        if text.len() != ID_LEN {
            return None;
        }
        text.iter()
            .try_fold(0u128, |acc, &c| {
                let digit = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return None,
                };
                Some(acc << 4 | u128::from(digit))
            })
            .map(MessageId)
    }

    /// The wire form.
    pub fn to_hex(self) -> [u8; ID_LEN] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; ID_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 4 * (ID_LEN - 1 - i);
            *slot = DIGITS[((self.0 >> shift) & 0xf) as usize];
        }
        out
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Hands out fresh ids.
#[derive(Debug)]
pub struct IdGenerator {
    nonce: u64,
    counter: u64,
}

impl IdGenerator {
    /// A generator with a nonce drawn from the OS-seeded hasher keys, the clock and the pid.
    pub fn new() -> IdGenerator {
        let mut hasher = RandomState::new().build_hasher();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        IdGenerator::with_nonce(hasher.finish())
    }

    pub fn with_nonce(nonce: u64) -> IdGenerator {
        IdGenerator { nonce, counter: 0 }
    }

    pub fn next_id(&mut self) -> MessageId {
        self.counter = self.counter.wrapping_add(1);
        MessageId(u128::from(self.nonce) << 64 | u128::from(self.counter))
    }
}

impl Default for IdGenerator {
    fn default() -> Self {
        IdGenerator::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = MessageId::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(&id.to_hex(), b"0123456789abcdeffedcba9876543210");
        assert_eq!(id.to_string().as_bytes(), id.to_hex());
        assert_eq!(MessageId::parse(&id.to_hex()), Some(id));
    }

    #[test]
    fn parse_rejects_other_forms() {
        assert_eq!(MessageId::parse(b"0123456789ABCDEFfedcba9876543210"), None);
        assert_eq!(MessageId::parse(b"0123"), None);
        assert_eq!(MessageId::parse(b"0123456789abcdeffedcba987654321g"), None);
    }

    #[test]
    fn generators_differ_and_count() {
        let mut a = IdGenerator::new();
        let mut b = IdGenerator::new();
        let (a1, a2, b1) = (a.next_id(), a.next_id(), b.next_id());
        assert_ne!(a1, a2);
        assert_ne!(a1, b1, "two generators should draw different nonces");
    }
}

/// A fast hasher (FxHash, from `rustc-hash`) for keys the server makes itself (message ids,
/// connection ids): clients cannot choose them, so SipHash's protection against chosen keys buys
/// nothing there, and hashing was a tenth of the broker's time. Keys clients choose (queue names)
/// keep SipHash.
pub type IdHasher = rustc_hash::FxHasher;

/// A map keyed by server-made ids.
pub type IdMap<K, V> = rustc_hash::FxHashMap<K, V>;
/// A set of server-made ids.
pub type IdSet<K> = rustc_hash::FxHashSet<K>;

#[cfg(test)]
mod hasher_tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault};

    #[test]
    fn consecutive_ids_spread_over_the_high_bits() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let mut generator = IdGenerator::with_nonce(42);
        let tops: std::collections::HashSet<u64> = (0..1024)
            .map(|_| build.hash_one(generator.next_id()) >> 57)
            .collect();
        assert!(
            tops.len() > 100,
            "only {} distinct top-7-bit values",
            tops.len()
        );
    }
}
