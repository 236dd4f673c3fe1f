//! What the server sends to a client: [`Outgoing`] frames and their encoding in the receiving
//! connection's [`Dialect`]. No I/O.
//!
//! The hub routes an [`Outgoing`] to any registered connection, whether it ever asked to consume
//! or not ([`crate::hub::Hub::send`]), and encodes it into that connection's outbox. A dispatch
//! carries what the broker decided ([`crate::broker::Delivery`]) and shows each connection only
//! the packets its dialect has. The v1.2 frames follow rule 2 of the spec ("nothing new for
//! others"): RECEIPT, COUNTS and FLUSHED are written only to v1.2 connections (for any other,
//! [`Outgoing::encode`] writes nothing); WELCOME and ERROR are written to any connection, because
//! they are sent only on v1.2 connections or in answer to a HELLO, whose sender reads them.

use crate::broker::Delivery;
use crate::codec::{self, Dialect, MessageType, PacketType};
use crate::hello::{Features, Version};
use crate::id::MessageId;
use crate::refusal::{sanitize_text, ErrorCode};
use crate::request::QueueName;
use std::sync::Arc;

/// One frame for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// 003: a message for a consumer to handle.
    Dispatch(Dispatch),
    /// 008: the answer to a first-frame HELLO ([`crate::hello::respond`]).
    Welcome {
        version: Version,
        features: Features,
    },
    /// 009 (v1.2 only): a send was accepted; `id` is the message's id.
    Receipt { queue: QueueName, id: MessageId },
    /// 010: a refusal ([`crate::refusal::Refusal::frame`]). `text` is made one line of UTF-8
    /// when encoded ([`sanitize_text`]).
    Error { code: ErrorCode, text: String },
    /// 013 (v1.2 only): the answer to a STATS.
    Counts {
        queue: QueueName,
        ready: u64,
        delayed: u64,
        in_flight: u64,
        consumers: u64,
    },
    /// 015 (v1.2 only): the answer to a FLUSH: how many messages it removed.
    Flushed { queue: QueueName, count: u64 },
    /// Bytes sent as they are: lets tests route a frame the server does not make.
    #[cfg(test)]
    Raw(Vec<u8>),
}

/// A message dispatched to a consumer (003).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub queue: QueueName,
    pub id: MessageId,
    pub content: Arc<[u8]>,
    /// The remaining TTL in whole seconds, if the message has one: shown only to connections
    /// that speak v1.1 or v1.2 (see [`Outgoing::encode`]).
    pub ttl_remaining: Option<u64>,
    /// How many times the message has been dispatched, this time included (≥ 1): shown only
    /// to v1.2 connections (packet 09).
    pub deliveries: u32,
}

impl From<Delivery> for Outgoing {
    fn from(d: Delivery) -> Outgoing {
        Outgoing::Dispatch(Dispatch {
            queue: d.queue,
            id: d.id,
            content: d.content,
            ttl_remaining: d.ttl_remaining,
            deliveries: d.deliveries,
        })
    }
}

impl Outgoing {
    /// Appends the frame's bytes as a connection of `dialect` may see them: a v1.0 client reads
    /// exactly three packets in a dispatch and breaks on a fourth, so it gets no TTL; only v1.2
    /// sees the delivery count and the replies of rule 3.
    pub fn encode(&self, out: &mut Vec<u8>, dialect: Dialect) {
        match self {
            Outgoing::Dispatch(d) => {
                let ttl = d.ttl_remaining.filter(|_| dialect.shows_ttl());
                let deliveries = Some(d.deliveries).filter(|_| dialect.is_v12());
                encode_dispatch_with(out, &d.queue, &d.content, d.id, ttl, deliveries)
            }
            Outgoing::Welcome { version, features } => codec::encode_frame(
                out,
                MessageType::Welcome,
                &[
                    (PacketType::Version, version.to_wire().as_bytes()),
                    (PacketType::Features, features.to_wire().as_bytes()),
                ],
            ),
            Outgoing::Error { code, text } => codec::encode_frame(
                out,
                MessageType::Error,
                &[
                    (PacketType::ErrorCode, &code.to_wire()),
                    (PacketType::Content, sanitize_text(text).as_bytes()),
                ],
            ),
            #[cfg(test)]
            Outgoing::Raw(bytes) => out.extend_from_slice(bytes),
            // Rule 2: never a reply of rule 3 to a connection that did not ask for v1.2.
            _ if !dialect.is_v12() => {}
            Outgoing::Receipt { queue, id } => codec::encode_frame(
                out,
                MessageType::Receipt,
                &[
                    (PacketType::Queue, queue.as_str().as_bytes()),
                    (PacketType::MessageId, &id.to_hex()),
                ],
            ),
            Outgoing::Counts {
                queue,
                ready,
                delayed,
                in_flight,
                consumers,
            } => codec::encode_frame(
                out,
                MessageType::Counts,
                &[
                    (PacketType::Queue, queue.as_str().as_bytes()),
                    (
                        PacketType::Counts,
                        format!("{ready} {delayed} {in_flight} {consumers}").as_bytes(),
                    ),
                ],
            ),
            Outgoing::Flushed { queue, count } => codec::encode_frame(
                out,
                MessageType::Flushed,
                &[
                    (PacketType::Queue, queue.as_str().as_bytes()),
                    (PacketType::Count, count.to_string().as_bytes()),
                ],
            ),
        }
    }
}

/// Appends a 003 dispatch frame: three packets, and a fourth with the remaining TTL when
/// `ttl_remaining` is given (only to v1.1 connections: a v1.0 client breaks on a fourth).
pub fn encode_dispatch(
    out: &mut Vec<u8>,
    queue: &QueueName,
    content: &[u8],
    id: MessageId,
    ttl_remaining: Option<u64>,
) {
    encode_dispatch_with(out, queue, content, id, ttl_remaining, None)
}

/// Appends a 003 dispatch frame: queue, content, id, then the remaining TTL and the delivery
/// count when given (the caller has filtered them by dialect).
pub fn encode_dispatch_with(
    out: &mut Vec<u8>,
    queue: &QueueName,
    content: &[u8],
    id: MessageId,
    ttl_remaining: Option<u64>,
    deliveries: Option<u32>,
) {
    let id = id.to_hex();
    let ttl_text = ttl_remaining.map(|t| t.to_string());
    let deliveries_text = deliveries.map(|d| d.to_string());
    let mut packets: [(PacketType, &[u8]); 5] = [
        (PacketType::Queue, queue.as_str().as_bytes()),
        (PacketType::Content, content),
        (PacketType::MessageId, &id),
        (PacketType::Ttl, b""),
        (PacketType::Deliveries, b""),
    ];
    let mut used = 3;
    for (packet, text) in [
        (PacketType::Ttl, &ttl_text),
        (PacketType::Deliveries, &deliveries_text),
    ] {
        if let Some(text) = text {
            packets[used] = (packet, text.as_bytes());
            used += 1;
        }
    }
    codec::encode_frame(out, MessageType::Dispatch, &packets[..used]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_has_three_packets_without_ttl_and_four_with() {
        let queue = QueueName::new(b"q").unwrap();
        let id = MessageId::from_u128(255);
        let mut out = Vec::new();
        encode_dispatch(&mut out, &queue, b"hi", id, None);
        assert_eq!(&out[..8], b"H0100303");
        let mut expected =
            b"H0100303P0100000000000000000000000000001qP0200000000000000000000000000002hi".to_vec();
        expected
            .extend_from_slice(b"P0300000000000000000000000000032000000000000000000000000000000ff");
        assert_eq!(out, expected);

        out.clear();
        encode_dispatch(&mut out, &queue, b"hi", id, Some(42));
        assert_eq!(&out[..8], b"H0100304");
        assert!(out.ends_with(b"P050000000000000000000000000000242"));
    }

    #[test]
    fn a_delivery_encodes_as_its_dispatch() {
        let delivery = Delivery {
            conn: 7,
            queue: QueueName::new(b"q").unwrap(),
            id: MessageId::from_u128(1),
            content: Arc::from(&b"body"[..]),
            ttl_remaining: Some(5),
            deliveries: 1,
        };
        let mut direct = Vec::new();
        encode_dispatch(&mut direct, &delivery.queue, b"body", delivery.id, Some(5));
        let mut v10 = Vec::new();
        encode_dispatch(&mut v10, &delivery.queue, b"body", delivery.id, None);
        let frame = Outgoing::from(delivery);
        let mut out = Vec::new();
        frame.encode(&mut out, Dialect::V11);
        assert_eq!(out, direct, "a v1.1 connection sees the TTL");
        out.clear();
        frame.encode(&mut out, Dialect::V10);
        assert_eq!(out, v10, "a v1.0 connection gets three packets");
    }

    fn p(code: &str, content: &str) -> String {
        format!("P{code}{:029}{content}", content.len())
    }

    fn encoded(frame: &Outgoing, dialect: Dialect) -> String {
        let mut out = Vec::new();
        frame.encode(&mut out, dialect);
        String::from_utf8(out).unwrap()
    }

    fn q() -> QueueName {
        QueueName::new(b"jobs").unwrap()
    }

    /// The server's lines of the example in PROTOCOL-v1.2.md, without the spaces and line
    /// breaks it shows for reading.
    #[test]
    fn spec_example_welcome_and_receipt() {
        let welcome = Outgoing::Welcome {
            version: Version::V1_2,
            features: Features::served(true, false),
        };
        assert_eq!(
            encoded(&welcome, Dialect::V12),
            "H0100802P06000000000000000000000000000031.2P0800000000000000000000000000046confirm stats delay attempts lease dead-letter"
        );
        let id = MessageId::from_u128(0x8d5e << 112);
        let receipt = Outgoing::Receipt { queue: q(), id };
        assert_eq!(
            encoded(&receipt, Dialect::V12),
            "H0100902P0100000000000000000000000000004jobsP03000000000000000000000000000328d5e0000000000000000000000000000"
        );
    }

    #[test]
    fn v12_frames_byte_for_byte() {
        let error = Outgoing::Error {
            code: ErrorCode::Invalid,
            text: "invalid queue name:\nnot UTF-8".into(),
        };
        assert_eq!(
            encoded(&error, Dialect::V12),
            format!(
                "H0101002{}{}",
                p("10", "422"),
                p("02", "invalid queue name: not UTF-8")
            )
        );
        let counts = Outgoing::Counts {
            queue: q(),
            ready: 3,
            delayed: 2,
            in_flight: 1,
            consumers: 0,
        };
        assert_eq!(
            encoded(&counts, Dialect::V12),
            format!("H0101302{}{}", p("01", "jobs"), p("13", "3 2 1 0"))
        );
        let flushed = Outgoing::Flushed {
            queue: q(),
            count: 12,
        };
        assert_eq!(
            encoded(&flushed, Dialect::V12),
            format!("H0101502{}{}", p("01", "jobs"), p("04", "12"))
        );
        let welcome = Outgoing::Welcome {
            version: Version::V1_1,
            features: Features::served(false, true),
        };
        assert_eq!(
            encoded(&welcome, Dialect::V11),
            format!(
                "H0100802{}{}",
                p("06", "1.1"),
                p("08", "confirm stats delay attempts lease durable")
            )
        );
    }

    #[test]
    fn replies_reach_only_v12_but_welcome_and_error_reach_any_hello() {
        let id = MessageId::from_u128(1);
        let replies = [
            Outgoing::Receipt { queue: q(), id },
            Outgoing::Counts {
                queue: q(),
                ready: 0,
                delayed: 0,
                in_flight: 0,
                consumers: 0,
            },
            Outgoing::Flushed {
                queue: q(),
                count: 0,
            },
        ];
        for frame in &replies {
            for dialect in [Dialect::V10, Dialect::V11] {
                assert_eq!(encoded(frame, dialect), "", "{frame:?} to {dialect}");
            }
            assert!(!encoded(frame, Dialect::V12).is_empty());
        }
        let answers = [
            Outgoing::Welcome {
                version: Version::V1_0,
                features: Features::NONE,
            },
            Outgoing::Error {
                code: ErrorCode::BadRequest,
                text: String::new(),
            },
        ];
        for frame in &answers {
            for dialect in Dialect::ALL {
                assert!(!encoded(frame, dialect).is_empty());
            }
        }
    }

    #[test]
    fn a_dispatch_shows_each_dialect_its_packets() {
        let id = MessageId::from_u128(255);
        let dispatch = |ttl| {
            Outgoing::Dispatch(Dispatch {
                queue: q(),
                id,
                content: Arc::from(&b"hi"[..]),
                ttl_remaining: ttl,
                deliveries: 3,
            })
        };
        let base = format!(
            "{}{}{}",
            p("01", "jobs"),
            p("02", "hi"),
            p("03", &id.to_string())
        );
        let with_ttl = dispatch(Some(42));
        assert_eq!(encoded(&with_ttl, Dialect::V10), format!("H0100303{base}"));
        assert_eq!(
            encoded(&with_ttl, Dialect::V11),
            format!("H0100304{base}{}", p("05", "42"))
        );
        assert_eq!(
            encoded(&with_ttl, Dialect::V12),
            format!("H0100305{base}{}{}", p("05", "42"), p("09", "3"))
        );
        let without = dispatch(None);
        assert_eq!(encoded(&without, Dialect::V10), format!("H0100303{base}"));
        assert_eq!(encoded(&without, Dialect::V11), format!("H0100303{base}"));
        assert_eq!(
            encoded(&without, Dialect::V12),
            format!("H0100304{base}{}", p("09", "3"))
        );
    }
}
