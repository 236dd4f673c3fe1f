//! A seeded, deterministic fuzz of the v1.2 wire layer: valid frames of every type, mutated
//! (bit flips, inserted and deleted bytes, changed length digits, swapped type codes,
//! truncation, concatenation), fed to the decoder and the request validation in every dialect.
//! No panic; whatever is accepted re-encodes to exactly the bytes it was read from; every
//! accepted request, written back as a client would and read again, is the same request.

use super::*;
use crate::hello::{Feature, Features, Version};
use crate::id::MessageId;
use crate::outgoing::{self, Outgoing};
use crate::refusal::{ErrorCode, Refusal};
use crate::request::{QueueName, Request};
use std::sync::Arc;

/// xorshift64: enough randomness for mutations, and the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid frames of every type a v1.2 connection exchanges, client's and server's.
fn seeds() -> Vec<Vec<u8>> {
    let q = |name: &str| QueueName::new(name.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let id = MessageId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let requests = [
        Request::Hello {
            version: Version::V1_2,
            token: None,
            features: Features::NONE,
        },
        Request::Hello {
            version: Version {
                major: 1,
                minor: 10,
            },
            token: Some(Arc::from(&b"t\x00k"[..])),
            features: [Feature::Durable, Feature::Confirm].into_iter().collect(),
        },
        Request::Send {
            queue: q("jobs"),
            content: Arc::from(&b"hello"[..]),
            ttl: None,
            delay: Some(5000),
        },
        Request::Send {
            queue: q("q"),
            content: Arc::from(&b""[..]),
            ttl: Some(60),
            delay: Some(0),
        },
        Request::Send {
            queue: q("zürich"),
            content: Arc::from(&b"\xff\x00H01"[..]),
            ttl: None,
            delay: None,
        },
        Request::Consume {
            queue: q("jobs"),
            count: 10,
            lease: Some(30_000),
        },
        Request::Consume {
            queue: q("jobs"),
            count: 1,
            lease: None,
        },
        Request::Ack {
            queue: q("jobs"),
            id: Some(id),
        },
        Request::Requeue {
            queue: q("jobs"),
            id: Some(id),
            ttl: 0,
            delay: Some(250),
        },
        Request::DeadLetter {
            queue: q("jobs"),
            id: None,
        },
        Request::Touch {
            queue: q("jobs"),
            id: Some(id),
        },
        Request::Stats { queue: q("jobs") },
        Request::Flush { queue: q("jobs") },
    ];
    let replies = [
        Outgoing::Welcome {
            version: Version::V1_2,
            features: Features::served(true, true),
        },
        Outgoing::Receipt {
            queue: q("jobs"),
            id,
        },
        Outgoing::Error {
            code: ErrorCode::Invalid,
            text: "invalid queue name".into(),
        },
        Outgoing::Counts {
            queue: q("jobs"),
            ready: 1,
            delayed: 2,
            in_flight: 3,
            consumers: 4,
        },
        Outgoing::Flushed {
            queue: q("jobs"),
            count: 9,
        },
        Outgoing::Dispatch(outgoing::Dispatch {
            queue: q("jobs"),
            id,
            content: Arc::from(&b"body"[..]),
            ttl_remaining: Some(42),
            deliveries: 3,
        }),
    ];
    let mut seeds = Vec::new();
    for request in &requests {
        let mut out = Vec::new();
        request.encode(&mut out);
        seeds.push(out);
    }
    for reply in &replies {
        let mut out = Vec::new();
        reply.encode(&mut out, Dialect::V12);
        seeds.push(out);
    }
    seeds
}

/// Where the digits of each packet's length field are, walking the frame's packet headers as
/// far as they make sense.
fn length_digits(frame: &[u8]) -> Vec<usize> {
    let mut at = Vec::new();
    let mut pos = HEADER_LEN;
    while pos.saturating_add(PACKET_HEADER_LEN) <= frame.len() {
        at.extend(pos + 3..pos + PACKET_HEADER_LEN);
        let len = parse_length(&frame[pos + 3..pos + PACKET_HEADER_LEN]).unwrap_or(0);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        pos = pos.saturating_add(PACKET_HEADER_LEN).saturating_add(len);
    }
    at
}

/// A seed with one packet's content replaced by digits (1 to 25 of them, often all nines),
/// its length fixed: well-framed numbers around and beyond every range.
fn with_digits(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let Ok(Decoded::Frame(frame, _)) = decode_frame_in(seed, usize::MAX >> 1, Dialect::V12) else {
        return seed.to_vec();
    };
    let mut packets: Vec<(PacketType, Vec<u8>)> =
        frame.packets().map(|(p, c)| (p, c.to_vec())).collect();
    let target = rng.below(packets.len());
    let nines = rng.below(2) == 0;
    packets[target].1 = (0..=rng.below(25))
        .map(|_| {
            if nines {
                b'9'
            } else {
                b'0' + rng.below(10) as u8
            }
        })
        .collect();
    let packets: Vec<(PacketType, &[u8])> = packets.iter().map(|(p, c)| (*p, &c[..])).collect();
    let mut out = Vec::new();
    encode_frame(&mut out, frame.message_type, &packets);
    out
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = &seeds[rng.below(seeds.len())];
    let mut input = if rng.below(4) == 0 {
        with_digits(rng, seed)
    } else {
        seed.clone()
    };
    // Sometimes no byte-level change at all, so the value mutations reach validation.
    for _ in 0..rng.below(4) {
        match rng.below(9) {
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = rng.below(input.len() + 1);
                let byte = match rng.below(3) {
                    0 => b'0' + rng.below(10) as u8,
                    1 => b"HP "[rng.below(3)],
                    _ => rng.next() as u8,
                };
                input.insert(at, byte);
            }
            2 if !input.is_empty() => {
                input.remove(rng.below(input.len()));
            }
            3 => {
                let digits = length_digits(&input);
                if !digits.is_empty() {
                    let at = digits[rng.below(digits.len())];
                    if at < input.len() {
                        input[at] = if rng.below(4) == 0 {
                            b'9'
                        } else {
                            b'0' + rng.below(10) as u8
                        };
                    }
                }
            }
            4 if input.len() >= HEADER_LEN => {
                // Another message type, known or not.
                let code = format!("{:03}", rng.below(17));
                input[3..6].copy_from_slice(code.as_bytes());
            }
            5 => {
                // Another packet type in one packet header.
                let starts: Vec<usize> = length_digits(&input)
                    .chunks(29)
                    .map(|c| c[0] - 3)
                    .filter(|&p| p + 3 <= input.len())
                    .collect();
                if !starts.is_empty() {
                    let at = starts[rng.below(starts.len())];
                    let code = format!("{:02}", rng.below(15));
                    input[at + 1..at + 3].copy_from_slice(code.as_bytes());
                }
            }
            6 => {
                // Another packet count.
                if input.len() >= HEADER_LEN {
                    let count = format!("{:02}", rng.below(7));
                    input[6..8].copy_from_slice(count.as_bytes());
                }
            }
            7 => input.truncate(rng.below(input.len() + 1)),
            _ => input.extend_from_slice(&seeds[rng.below(seeds.len())]),
        }
    }
    input
}

/// Decodes `input` in `dialect` and checks every property; returns whether a frame was taken.
fn check(input: &[u8], dialect: Dialect, max: usize) -> bool {
    let frame = match decode_frame_in(input, max, dialect) {
        Ok(Decoded::Frame(frame, used)) => {
            assert!(used <= input.len());
            let packets: Vec<(PacketType, &[u8])> = frame.packets().collect();
            let mut again = Vec::new();
            encode_frame(&mut again, frame.message_type, &packets);
            assert_eq!(again, &input[..used], "{dialect}: {input:?}");
            frame
        }
        Ok(Decoded::Incomplete { needed }) => {
            assert!(needed > input.len(), "{dialect}: {input:?}");
            return false;
        }
        Err(error) => {
            let refusal = Refusal::codec(&error, dialect, peek_message_type(input));
            assert!(!refusal.keep_open);
            return false;
        }
    };
    match Request::from_frame(&frame, dialect) {
        Ok(request) => {
            assert_eq!(request.message_type(), frame.message_type);
            let mut bytes = Vec::new();
            request.encode(&mut bytes);
            let again = match decode_frame_in(&bytes, usize::MAX >> 1, dialect) {
                Ok(Decoded::Frame(frame, used)) if used == bytes.len() => frame,
                other => panic!("{dialect}: {request:?} re-encoded as {bytes:?}: {other:?}"),
            };
            assert_eq!(
                Request::from_frame(&again, dialect).as_ref(),
                Ok(&request),
                "{dialect}: {input:?}"
            );
        }
        Err(error) => {
            let _ = Refusal::request(&error, dialect, frame.message_type).frame();
        }
    }
    true
}

#[test]
fn mutated_v12_frames_never_panic_and_round_trip() {
    let seeds = seeds();
    // The seeds themselves: whole frames in v1.2.
    for seed in &seeds {
        assert!(check(seed, Dialect::V12, 1 << 20));
    }
    let mut rng = Rng(0x0005_eed0_f701_2001);
    let mut taken = [0usize; 3];
    for round in 0..40_000 {
        let input = mutate(&mut rng, &seeds);
        // Now and then a tiny limit, so the 413 path is fuzzed too.
        let max = if round % 16 == 0 { 4 } else { 1 << 20 };
        for (i, dialect) in Dialect::ALL.into_iter().enumerate() {
            taken[i] += usize::from(check(&input, dialect, max));
        }
    }
    // The mutations are mild enough that many inputs still decode in every dialect.
    assert!(taken.iter().all(|&n| n > 1_000), "{taken:?}");
}
