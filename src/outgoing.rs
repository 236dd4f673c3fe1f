//! What the server sends to a client: [`Outgoing`] frames and their encoding. No I/O.
//!
//! The hub routes an [`Outgoing`] to any registered connection, whether it ever asked to consume
//! or not ([`crate::hub::Hub::send`]), and encodes it into that connection's outbox. A dispatch
//! carries what the broker decided ([`crate::broker::Delivery`]); the frames PHPMQ v1.2 adds
//! (RECEIPT, ERROR) become variants here, each with its arm in [`Outgoing::encode`].

use crate::broker::Delivery;
use crate::codec::{self, MessageType, PacketType};
use crate::id::MessageId;
use crate::request::QueueName;
use std::sync::Arc;

/// One frame for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// 003: a message for a consumer to handle.
    Dispatch(Dispatch),
    /// Bytes sent as they are: lets tests route a frame that is not a dispatch before v1.2's
    /// frames exist.
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
    /// that speak v1.1 (see [`Outgoing::encode`]).
    pub ttl_remaining: Option<u64>,
}

impl From<Delivery> for Outgoing {
    fn from(d: Delivery) -> Outgoing {
        Outgoing::Dispatch(Dispatch {
            queue: d.queue,
            id: d.id,
            content: d.content,
            ttl_remaining: d.ttl_remaining,
        })
    }
}

impl Outgoing {
    /// Appends the frame's bytes, in the dialect of a connection that has shown v1.1 or not:
    /// a v1.0 client reads exactly three packets in a dispatch and breaks on a fourth.
    pub fn encode(&self, out: &mut Vec<u8>, shows_ttl: bool) {
        match self {
            Outgoing::Dispatch(d) => {
                let ttl = d.ttl_remaining.filter(|_| shows_ttl);
                encode_dispatch(out, &d.queue, &d.content, d.id, ttl)
            }
            #[cfg(test)]
            Outgoing::Raw(bytes) => out.extend_from_slice(bytes),
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
    let id = id.to_hex();
    let ttl_text;
    let mut packets: [(PacketType, &[u8]); 4] = [
        (PacketType::Queue, queue.as_str().as_bytes()),
        (PacketType::Content, content),
        (PacketType::MessageId, &id),
        (PacketType::Ttl, b""),
    ];
    let used = match ttl_remaining {
        Some(ttl) => {
            ttl_text = ttl.to_string();
            packets[3].1 = ttl_text.as_bytes();
            4
        }
        None => 3,
    };
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
        frame.encode(&mut out, true);
        assert_eq!(out, direct, "a v1.1 connection sees the TTL");
        out.clear();
        frame.encode(&mut out, false);
        assert_eq!(out, v10, "a v1.0 connection gets three packets");
    }
}
