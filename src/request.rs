//! Typed client requests on top of the codec: validates what the packets carry (queue names,
//! decimal numbers, versions, feature lists) in the connection's dialect, knows which frames a
//! client may send, and writes them back as a client would ([`Request::encode`]). No I/O. What
//! the server sends is in [`crate::outgoing`]; how a refusal is answered, in
//! [`crate::refusal`].

use crate::codec::{self, Dialect, Frame, MessageType, PacketType};
use crate::hello::{Features, FeaturesError, Version, VersionError};
use crate::id::MessageId;
use std::borrow::{Borrow, Cow};
use std::fmt;
use std::sync::Arc;

/// The longest queue name, in bytes.
pub const MAX_QUEUE_NAME_LEN: usize = 255;

/// A valid queue name: 1..=255 bytes of UTF-8 without control characters. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

impl QueueName {
    pub fn new(bytes: &[u8]) -> Result<QueueName, RequestError> {
        if bytes.is_empty() || bytes.len() > MAX_QUEUE_NAME_LEN {
            return Err(RequestError::QueueName(QueueNameProblem::Length(
                bytes.len(),
            )));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| RequestError::QueueName(QueueNameProblem::NotUtf8))?;
        if text.chars().any(char::is_control) {
            return Err(RequestError::QueueName(QueueNameProblem::ControlCharacter));
        }
        Ok(QueueName(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for QueueName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is wrong with a queue name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueNameProblem {
    Length(usize),
    NotUtf8,
    ControlCharacter,
}

/// The longest delay a v1.2 send or re-queue may ask for: ten years of 365.25 days, in ms.
/// Longer is a mistake (a unit confusion, most likely) better refused than kept for ever.
pub const MAX_DELAY_MS: u64 = 315_576_000_000;
/// The longest lease a v1.2 consume request may set: `u32::MAX` ms, about 49.7 days.
pub const MAX_LEASE_MS: u64 = u32::MAX as u64;

/// Why a well-framed message is still not a valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    QueueName(QueueNameProblem),
    /// A number packet that is not a plain decimal number (digits only, at least one).
    NotANumber {
        packet: PacketType,
        preview: String,
    },
    /// v1.2 only: a decimal number above what the packet allows (`max`). On v1.0 and v1.1 a
    /// huge count or TTL is not an error: see [`Request::from_frame`].
    OutOfRange {
        packet: PacketType,
        preview: String,
        max: u64,
    },
    /// A frame only the server sends (003 dispatch, or v1.2's 008, 009, 010, 013, 015).
    ServerOnly(MessageType),
    /// A message type the connection's dialect does not have (v1.2's on a v1.0 or v1.1
    /// connection). The v1.2 decoder lets it through; only validation at the wrong dialect
    /// meets it.
    NotInDialect {
        message_type: MessageType,
        dialect: Dialect,
    },
    /// A packet type the connection's dialect does not have in this frame.
    PacketNotInDialect {
        packet: PacketType,
        dialect: Dialect,
    },
    /// A HELLO whose 06 packet is not `MAJOR.MINOR`.
    Version(VersionError),
    /// A HELLO whose 08 packet is not a feature list.
    Features(FeaturesError),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::QueueName(QueueNameProblem::Length(len)) => {
                write!(
                    f,
                    "invalid queue name: {len} bytes (must be 1 to {MAX_QUEUE_NAME_LEN})"
                )
            }
            RequestError::QueueName(QueueNameProblem::NotUtf8) => {
                write!(f, "invalid queue name: not UTF-8")
            }
            RequestError::QueueName(QueueNameProblem::ControlCharacter) => {
                write!(f, "invalid queue name: contains a control character")
            }
            RequestError::NotANumber { packet, preview } => {
                write!(f, "packet {packet} is not a decimal number: {preview:?}")
            }
            RequestError::OutOfRange {
                packet,
                preview,
                max,
            } => write!(
                f,
                "packet {packet} is over its maximum of {max}: {preview:?}"
            ),
            RequestError::ServerOnly(t) => {
                write!(f, "message type {t} is sent by servers, not clients")
            }
            RequestError::NotInDialect {
                message_type,
                dialect,
            } => write!(f, "message type {message_type} does not exist in {dialect}"),
            RequestError::PacketNotInDialect { packet, dialect } => {
                write!(f, "packet {packet} does not exist in {dialect}")
            }
            RequestError::Version(e) => write!(f, "{e}"),
            RequestError::Features(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// A client's request, owned and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Send (001). `ttl` is the TTL packet if one was sent (v1.1); `Some(0)` means "never
    /// expires". `delay` (v1.2, ms) is the delay packet if one was sent; `Some(0)`: no delay.
    Send {
        queue: QueueName,
        content: Arc<[u8]>,
        ttl: Option<u64>,
        delay: Option<u64>,
    },
    /// 002: hold up to `count` unacknowledged messages of `queue`. `lease` (v1.2, ms) is the
    /// lease packet if one was sent; `Some(0)` means no lease.
    Consume {
        queue: QueueName,
        count: u64,
        lease: Option<u64>,
    },
    /// 004. `id` is `None` when the id is not of our form: such an id cannot be known.
    Ack {
        queue: QueueName,
        id: Option<MessageId>,
    },
    /// 005: back to the tail with a new TTL (0 = never expires), after `delay` ms if given
    /// (v1.2; `Some(0)` means no delay).
    Requeue {
        queue: QueueName,
        id: Option<MessageId>,
        ttl: u64,
        delay: Option<u64>,
    },
    /// 006: remove regardless of TTL.
    DeadLetter {
        queue: QueueName,
        id: Option<MessageId>,
    },
    /// 007 (any dialect): asks for `version`. `features` are those the client wants that this
    /// server knows (unknown words are dropped); an absent 08 packet is an empty set. Only a
    /// connection's first frame may be a HELLO (rule 1): the caller checks that.
    Hello {
        version: Version,
        token: Option<Arc<[u8]>>,
        features: Features,
    },
    /// 011 (v1.2): restart the lease of a held message.
    Touch {
        queue: QueueName,
        id: Option<MessageId>,
    },
    /// 012 (v1.2): answered by COUNTS.
    Stats { queue: QueueName },
    /// 014 (v1.2): remove every message of the queue; answered by FLUSHED.
    Flush { queue: QueueName },
}

impl Request {
    /// Validates a decoded frame sent by a client on a connection that speaks `dialect`.
    ///
    /// On v1.0 and v1.1, a count or TTL of any length of digits is taken, saturated at
    /// `u64::MAX`: a count that large means "as many as possible", and a TTL that large is
    /// clamped by the broker to its latest expiry time anyway. Such a client has no error
    /// frame to learn from, so refusing would only close its connection. On v1.2, numbers are
    /// checked against their ranges ([`RequestError::OutOfRange`], ERROR 422): count and TTL
    /// up to `u64::MAX`, delay up to [`MAX_DELAY_MS`], lease up to [`MAX_LEASE_MS`].
    ///
    /// Types and packets the dialect does not have are refused even if the frame was decoded
    /// for another dialect; a HELLO is valid in every dialect.
    pub fn from_frame(frame: &Frame<'_>, dialect: Dialect) -> Result<Request, RequestError> {
        let message_type = frame.message_type;
        if !message_type.known_in(dialect) {
            return Err(RequestError::NotInDialect {
                message_type,
                dialect,
            });
        }
        if let Some((packet, _)) = frame
            .packets()
            .find(|&(p, _)| !p.known_in(message_type, dialect))
        {
            return Err(RequestError::PacketNotInDialect { packet, dialect });
        }
        let queue = || QueueName::new(frame.required(PacketType::Queue));
        let id = || MessageId::parse(frame.required(PacketType::MessageId));
        let number = |packet, max| number(packet, frame.required(packet), dialect, max);
        let optional = |packet, max| {
            frame
                .packet(packet)
                .map(|bytes| self::number(packet, bytes, dialect, max))
                .transpose()
        };
        Ok(match message_type {
            MessageType::Send => Request::Send {
                queue: queue()?,
                content: Arc::from(frame.required(PacketType::Content)),
                ttl: optional(PacketType::Ttl, u64::MAX)?,
                delay: optional(PacketType::Delay, MAX_DELAY_MS)?,
            },
            MessageType::Consume => Request::Consume {
                queue: queue()?,
                count: number(PacketType::Count, u64::MAX)?,
                lease: optional(PacketType::Lease, MAX_LEASE_MS)?,
            },
            MessageType::Ack => Request::Ack {
                queue: queue()?,
                id: id(),
            },
            MessageType::Requeue => Request::Requeue {
                queue: queue()?,
                id: id(),
                ttl: number(PacketType::Ttl, u64::MAX)?,
                delay: optional(PacketType::Delay, MAX_DELAY_MS)?,
            },
            MessageType::DeadLetter => Request::DeadLetter {
                queue: queue()?,
                id: id(),
            },
            MessageType::Hello => Request::Hello {
                version: Version::parse(frame.required(PacketType::Version))
                    .map_err(RequestError::Version)?,
                token: frame.packet(PacketType::Token).map(Arc::from),
                features: frame
                    .packet(PacketType::Features)
                    .map(Features::parse)
                    .transpose()
                    .map_err(RequestError::Features)?
                    .unwrap_or_default(),
            },
            MessageType::Touch => Request::Touch {
                queue: queue()?,
                id: id(),
            },
            MessageType::Stats => Request::Stats { queue: queue()? },
            MessageType::Flush => Request::Flush { queue: queue()? },
            MessageType::Dispatch
            | MessageType::Welcome
            | MessageType::Receipt
            | MessageType::Error
            | MessageType::Counts
            | MessageType::Flushed => return Err(RequestError::ServerOnly(message_type)),
        })
    }

    /// The frame type this request travels in.
    pub fn message_type(&self) -> MessageType {
        match self {
            Request::Send { .. } => MessageType::Send,
            Request::Consume { .. } => MessageType::Consume,
            Request::Ack { .. } => MessageType::Ack,
            Request::Requeue { .. } => MessageType::Requeue,
            Request::DeadLetter { .. } => MessageType::DeadLetter,
            Request::Hello { .. } => MessageType::Hello,
            Request::Touch { .. } => MessageType::Touch,
            Request::Stats { .. } => MessageType::Stats,
            Request::Flush { .. } => MessageType::Flush,
        }
    }

    /// Whether this request exists only in the v1.1 dialect, so the sender can read a TTL packet.
    pub fn shows_v11(&self) -> bool {
        match self {
            Request::Send { ttl, .. } => ttl.is_some(),
            Request::Requeue { .. } | Request::DeadLetter { .. } => true,
            Request::Consume { .. }
            | Request::Ack { .. }
            | Request::Hello { .. }
            | Request::Touch { .. }
            | Request::Stats { .. }
            | Request::Flush { .. } => false,
        }
    }

    /// Appends the exact bytes a client sends for this request: the PHP library's packet order
    /// (queue, content or id, count or TTL), then v1.2's packets; optional packets only when
    /// set. An unknown id (`None`) is written as an empty id packet, which reads back as
    /// unknown. Numbers are written in plain decimal.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut packets: Vec<(PacketType, Cow<'_, [u8]>)> = Vec::with_capacity(4);
        let text = |value: u64| Cow::Owned(value.to_string().into_bytes());
        let id_bytes = |id: &Option<MessageId>| match id {
            Some(id) => Cow::Owned(id.to_hex().to_vec()),
            None => Cow::Borrowed(&b""[..]),
        };
        let queue_bytes = |queue: &QueueName| Cow::Owned(queue.as_str().as_bytes().to_vec());
        match self {
            Request::Send {
                queue,
                content,
                ttl,
                delay,
            } => {
                packets.push((PacketType::Queue, queue_bytes(queue)));
                packets.push((PacketType::Content, Cow::Borrowed(&content[..])));
                packets.extend(ttl.map(|t| (PacketType::Ttl, text(t))));
                packets.extend(delay.map(|d| (PacketType::Delay, text(d))));
            }
            Request::Consume {
                queue,
                count,
                lease,
            } => {
                packets.push((PacketType::Queue, queue_bytes(queue)));
                packets.push((PacketType::Count, text(*count)));
                packets.extend(lease.map(|l| (PacketType::Lease, text(l))));
            }
            Request::Ack { queue, id }
            | Request::DeadLetter { queue, id }
            | Request::Touch { queue, id } => {
                packets.push((PacketType::Queue, queue_bytes(queue)));
                packets.push((PacketType::MessageId, id_bytes(id)));
            }
            Request::Requeue {
                queue,
                id,
                ttl,
                delay,
            } => {
                packets.push((PacketType::Queue, queue_bytes(queue)));
                packets.push((PacketType::MessageId, id_bytes(id)));
                packets.push((PacketType::Ttl, text(*ttl)));
                packets.extend(delay.map(|d| (PacketType::Delay, text(d))));
            }
            Request::Hello {
                version,
                token,
                features,
            } => {
                packets.push((PacketType::Version, Cow::Owned(version.to_wire().into())));
                if let Some(token) = token {
                    packets.push((PacketType::Token, Cow::Borrowed(&token[..])));
                }
                if !features.is_empty() {
                    packets.push((PacketType::Features, Cow::Owned(features.to_wire().into())));
                }
            }
            Request::Stats { queue } | Request::Flush { queue } => {
                packets.push((PacketType::Queue, queue_bytes(queue)));
            }
        }
        let packets: Vec<(PacketType, &[u8])> = packets.iter().map(|(p, c)| (*p, &c[..])).collect();
        codec::encode_frame(out, self.message_type(), &packets);
    }
}

/// A number packet's value. On v1.2 it must be plain decimal and at most `max`; before, any
/// run of digits is taken, saturated (see [`Request::from_frame`]).
fn number(
    packet: PacketType,
    bytes: &[u8],
    dialect: Dialect,
    max: u64,
) -> Result<u64, RequestError> {
    let preview = || String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned();
    let value = saturating_decimal(bytes).ok_or_else(|| RequestError::NotANumber {
        packet,
        preview: preview(),
    })?;
    // Saturation cannot hide an overflow here: u64::MAX itself is refused unless `max` is
    // u64::MAX, and then a larger number must be told apart from it by its digits.
    let too_big = value > max || (value == u64::MAX && exceeds_u64(bytes));
    if dialect.is_v12() && too_big {
        return Err(RequestError::OutOfRange {
            packet,
            preview: preview(),
            max,
        });
    }
    Ok(value)
}

/// Whether a run of ASCII digits is above `u64::MAX`.
fn exceeds_u64(digits: &[u8]) -> bool {
    let first = digits
        .iter()
        .position(|&c| c != b'0')
        .unwrap_or(digits.len());
    let significant = &digits[first..];
    const MAX: &[u8] = b"18446744073709551615";
    significant.len() > MAX.len() || (significant.len() == MAX.len() && significant > MAX)
}

/// The value of a non-empty run of ASCII digits, `u64::MAX` if it is larger; `None` for
/// anything else (a sign, a space, an empty packet).
fn saturating_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(bytes.iter().fold(0u64, |n, &c| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(c - b'0')))
            .unwrap_or(u64::MAX)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, decode_frame, Decoded};

    fn request(bytes: &[u8]) -> Result<Request, RequestError> {
        match decode_frame(bytes, 1 << 20) {
            Ok(Decoded::Frame(frame, _)) => Request::from_frame(&frame, Dialect::V10),
            other => panic!("not a frame: {other:?}"),
        }
    }

    fn frame(t: MessageType, packets: &[(PacketType, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        codec::encode_frame(&mut out, t, packets);
        out
    }

    #[test]
    fn queue_names() {
        assert!(QueueName::new(b"orders").is_ok());
        assert!(QueueName::new("zürich-ünïcode".as_bytes()).is_ok());
        assert!(QueueName::new(&[b'a'; 255]).is_ok());
        assert_eq!(
            QueueName::new(&[b'a'; 256]),
            Err(RequestError::QueueName(QueueNameProblem::Length(256)))
        );
        assert_eq!(
            QueueName::new(b""),
            Err(RequestError::QueueName(QueueNameProblem::Length(0)))
        );
        assert_eq!(
            QueueName::new(b"a\nb"),
            Err(RequestError::QueueName(QueueNameProblem::ControlCharacter))
        );
        assert_eq!(
            QueueName::new(b"\xff"),
            Err(RequestError::QueueName(QueueNameProblem::NotUtf8))
        );
    }

    #[test]
    fn send_in_both_dialects() {
        let v10 = request(&frame(
            MessageType::Send,
            &[(PacketType::Queue, b"q"), (PacketType::Content, b"body")],
        ))
        .unwrap();
        assert!(!v10.shows_v11());
        let v11 = request(&frame(
            MessageType::Send,
            &[
                (PacketType::Queue, b"q"),
                (PacketType::Content, b"body"),
                (PacketType::Ttl, b"60"),
            ],
        ))
        .unwrap();
        assert!(v11.shows_v11());
        assert!(matches!(v11, Request::Send { ttl: Some(60), .. }));
    }

    #[test]
    fn numbers_must_be_decimal() {
        let bad = request(&frame(
            MessageType::Consume,
            &[(PacketType::Queue, b"q"), (PacketType::Count, b"ten")],
        ));
        assert!(matches!(
            bad,
            Err(RequestError::NotANumber {
                packet: PacketType::Count,
                ..
            })
        ));
        let bad = request(&frame(
            MessageType::Requeue,
            &[
                (PacketType::Queue, b"q"),
                (PacketType::MessageId, b"x"),
                (PacketType::Ttl, b"-1"),
            ],
        ));
        assert!(matches!(
            bad,
            Err(RequestError::NotANumber {
                packet: PacketType::Ttl,
                ..
            })
        ));
    }

    #[test]
    fn huge_numbers_saturate() {
        let huge = request(&frame(
            MessageType::Consume,
            &[
                (PacketType::Queue, b"q"),
                (PacketType::Count, b"99999999999999999999999"),
            ],
        ));
        assert!(matches!(
            huge,
            Ok(Request::Consume {
                count: u64::MAX,
                ..
            })
        ));
        assert_eq!(saturating_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(saturating_decimal(b"18446744073709551616"), Some(u64::MAX));
        assert_eq!(saturating_decimal(&[b'9'; 4000]), Some(u64::MAX));
        assert_eq!(saturating_decimal(b"00000000000000000000000042"), Some(42));
        assert_eq!(saturating_decimal(b"1e30"), None);
        assert_eq!(saturating_decimal(b""), None);
    }

    #[test]
    fn clients_cannot_dispatch() {
        let bytes = frame(
            MessageType::Dispatch,
            &[
                (PacketType::Queue, b"q"),
                (PacketType::Content, b"c"),
                (PacketType::MessageId, b"i"),
            ],
        );
        assert_eq!(
            request(&bytes),
            Err(RequestError::ServerOnly(MessageType::Dispatch))
        );
    }

    #[test]
    fn foreign_ids_are_kept_as_unknown() {
        let ack = request(&frame(
            MessageType::Ack,
            &[
                (PacketType::Queue, b"q"),
                (PacketType::MessageId, b"not-ours"),
            ],
        ))
        .unwrap();
        assert!(matches!(ack, Request::Ack { id: None, .. }));
    }

    // ---- v1.2 ----

    fn request_in(bytes: &[u8], dialect: Dialect) -> Result<Request, RequestError> {
        match codec::decode_frame_in(bytes, 1 << 20, dialect) {
            Ok(Decoded::Frame(frame, _)) => Request::from_frame(&frame, dialect),
            other => panic!("not a frame: {other:?}"),
        }
    }

    fn v12(t: MessageType, packets: &[(PacketType, &[u8])]) -> Result<Request, RequestError> {
        request_in(&frame(t, packets), Dialect::V12)
    }

    fn q(name: &str) -> QueueName {
        QueueName::new(name.as_bytes()).unwrap()
    }

    #[test]
    fn v12_requests_parse() {
        use PacketType::*;
        assert_eq!(
            v12(
                MessageType::Send,
                &[
                    (Queue, b"jobs"),
                    (Content, b"x"),
                    (Ttl, b"60"),
                    (Delay, b"5000")
                ]
            ),
            Ok(Request::Send {
                queue: q("jobs"),
                content: Arc::from(&b"x"[..]),
                ttl: Some(60),
                delay: Some(5000),
            })
        );
        assert_eq!(
            v12(
                MessageType::Consume,
                &[(Queue, b"jobs"), (Count, b"3"), (Lease, b"30000")]
            ),
            Ok(Request::Consume {
                queue: q("jobs"),
                count: 3,
                lease: Some(30000),
            })
        );
        let id = crate::id::MessageId::from_u128(0xabc);
        assert_eq!(
            v12(
                MessageType::Requeue,
                &[
                    (Queue, b"jobs"),
                    (MessageId, &id.to_hex()),
                    (Ttl, b"0"),
                    (Delay, b"0")
                ]
            ),
            Ok(Request::Requeue {
                queue: q("jobs"),
                id: Some(id),
                ttl: 0,
                delay: Some(0),
            })
        );
        assert_eq!(
            v12(
                MessageType::Touch,
                &[(Queue, b"jobs"), (MessageId, &id.to_hex())]
            ),
            Ok(Request::Touch {
                queue: q("jobs"),
                id: Some(id)
            })
        );
        assert_eq!(
            v12(MessageType::Stats, &[(Queue, b"jobs")]),
            Ok(Request::Stats { queue: q("jobs") })
        );
        assert_eq!(
            v12(MessageType::Flush, &[(Queue, b"jobs")]),
            Ok(Request::Flush { queue: q("jobs") })
        );
        assert_eq!(
            v12(
                MessageType::Hello,
                &[
                    (Version, b"1.2"),
                    (Token, b"s3cret"),
                    (Features, b"durable x-new")
                ]
            ),
            Ok(Request::Hello {
                version: crate::hello::Version::V1_2,
                token: Some(Arc::from(&b"s3cret"[..])),
                features: [crate::hello::Feature::Durable].into_iter().collect(),
            })
        );
    }

    #[test]
    fn a_hello_decodes_in_every_dialect_and_needs_a_version() {
        let hello = b"H0100701P06000000000000000000000000000031.2";
        for dialect in Dialect::ALL {
            assert!(matches!(
                request_in(hello, dialect),
                Ok(Request::Hello { features, token: None, .. }) if features.is_empty()
            ));
        }
        for bad in [&b"1"[..], b"", b"1.2.3", b"one"] {
            let bytes = frame(MessageType::Hello, &[(PacketType::Version, bad)]);
            assert!(
                matches!(
                    request_in(&bytes, Dialect::V10),
                    Err(RequestError::Version(_))
                ),
                "{bad:?}"
            );
        }
        let bytes = frame(
            MessageType::Hello,
            &[
                (PacketType::Version, b"1.2"),
                (PacketType::Features, b"a  b"),
            ],
        );
        assert!(matches!(
            request_in(&bytes, Dialect::V10),
            Err(RequestError::Features(_))
        ));
    }

    #[test]
    fn v12_numbers_are_plain_decimals_in_range() {
        use PacketType::*;
        let send = |delay: &[u8]| {
            v12(
                MessageType::Send,
                &[(Queue, b"q"), (Content, b""), (Delay, delay)],
            )
        };
        let max_delay = MAX_DELAY_MS.to_string();
        assert!(matches!(
            send(max_delay.as_bytes()),
            Ok(Request::Send {
                delay: Some(MAX_DELAY_MS),
                ..
            })
        ));
        let over = (MAX_DELAY_MS + 1).to_string();
        assert!(matches!(
            send(over.as_bytes()),
            Err(RequestError::OutOfRange {
                packet: Delay,
                max: MAX_DELAY_MS,
                ..
            })
        ));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"1.5",
            b"1e3",
            b"0x10",
        ] {
            assert!(
                matches!(
                    send(bad),
                    Err(RequestError::NotANumber { packet: Delay, .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            send(b"0005"),
            Ok(Request::Send { delay: Some(5), .. })
        ));

        let consume = |count: &[u8], lease: &[u8]| {
            v12(
                MessageType::Consume,
                &[(Queue, b"q"), (Count, count), (Lease, lease)],
            )
        };
        assert!(matches!(
            consume(b"18446744073709551615", b"4294967295"),
            Ok(Request::Consume {
                count: u64::MAX,
                lease: Some(MAX_LEASE_MS),
                ..
            })
        ));
        assert!(matches!(
            consume(b"18446744073709551616", b"1"),
            Err(RequestError::OutOfRange {
                packet: Count,
                max: u64::MAX,
                ..
            })
        ));
        assert!(matches!(
            consume(b"000000000000000000000018446744073709551615", b"1"),
            Ok(Request::Consume {
                count: u64::MAX,
                ..
            })
        ));
        assert!(matches!(
            consume(b"1", b"4294967296"),
            Err(RequestError::OutOfRange {
                packet: Lease,
                max: MAX_LEASE_MS,
                ..
            })
        ));
        let ttl = v12(
            MessageType::Send,
            &[(Queue, b"q"), (Content, b""), (Ttl, &[b'9'; 30])],
        );
        assert!(matches!(
            ttl,
            Err(RequestError::OutOfRange { packet: Ttl, .. })
        ));
        // The same numbers on v1.0 saturate, as they always did.
        let bytes = frame(
            MessageType::Send,
            &[(Queue, b"q"), (Content, b""), (Ttl, &[b'9'; 30])],
        );
        assert!(matches!(
            request_in(&bytes, Dialect::V10),
            Ok(Request::Send {
                ttl: Some(u64::MAX),
                ..
            })
        ));
        assert_eq!(MAX_DELAY_MS, 36_525 * 86_400_000 / 10, "3652.5 days");
    }

    #[test]
    fn v12_frames_at_older_dialects_are_refused_even_if_decoded() {
        use PacketType::*;
        let bytes = frame(MessageType::Stats, &[(Queue, b"q")]);
        let decoded = match codec::decode_frame_in(&bytes, 1 << 20, Dialect::V12) {
            Ok(Decoded::Frame(frame, _)) => frame,
            other => panic!("{other:?}"),
        };
        for dialect in [Dialect::V10, Dialect::V11] {
            assert_eq!(
                Request::from_frame(&decoded, dialect),
                Err(RequestError::NotInDialect {
                    message_type: MessageType::Stats,
                    dialect
                })
            );
        }
        let bytes = frame(
            MessageType::Send,
            &[(Queue, b"q"), (Content, b""), (Delay, b"1")],
        );
        let decoded = match codec::decode_frame_in(&bytes, 1 << 20, Dialect::V12) {
            Ok(Decoded::Frame(frame, _)) => frame,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            Request::from_frame(&decoded, Dialect::V11),
            Err(RequestError::PacketNotInDialect {
                packet: Delay,
                dialect: Dialect::V11
            })
        );
    }

    #[test]
    fn server_frames_from_a_client_are_refused() {
        use PacketType::*;
        let id = crate::id::MessageId::from_u128(1).to_hex();
        for (t, packets) in [
            (
                MessageType::Welcome,
                vec![(Version, &b"1.2"[..]), (Features, b"")],
            ),
            (
                MessageType::Receipt,
                vec![(Queue, &b"q"[..]), (MessageId, &id[..])],
            ),
            (
                MessageType::Error,
                vec![(ErrorCode, &b"400"[..]), (Content, b"x")],
            ),
            (
                MessageType::Counts,
                vec![(Queue, &b"q"[..]), (Counts, b"0 0 0 0")],
            ),
            (
                MessageType::Flushed,
                vec![(Queue, &b"q"[..]), (Count, b"0")],
            ),
        ] {
            assert_eq!(v12(t, &packets), Err(RequestError::ServerOnly(t)));
        }
    }

    /// The exact bytes a client sends.
    #[test]
    fn requests_encode_as_a_client_sends_them() {
        let mut out = Vec::new();
        Request::Hello {
            version: crate::hello::Version::V1_2,
            token: None,
            features: Default::default(),
        }
        .encode(&mut out);
        assert_eq!(out, b"H0100701P06000000000000000000000000000031.2");

        out.clear();
        Request::Send {
            queue: q("jobs"),
            content: Arc::from(&b"hello"[..]),
            ttl: None,
            delay: Some(5000),
        }
        .encode(&mut out);
        assert_eq!(
            out,
            &b"H0100103P0100000000000000000000000000004jobsP0200000000000000000000000000005helloP11000000000000000000000000000045000"[..]
        );

        out.clear();
        Request::Send {
            queue: q("Queue"),
            content: Arc::from(&b"Hello World"[..]),
            ttl: None,
            delay: None,
        }
        .encode(&mut out);
        assert_eq!(
            out,
            &b"H0100102P0100000000000000000000000000005QueueP0200000000000000000000000000011Hello World"[..]
        );

        let id = MessageId::from_u128(255);
        let cases: Vec<(Request, String)> = vec![
            (
                Request::Consume {
                    queue: q("q"),
                    count: 5,
                    lease: Some(30000),
                },
                format!(
                    "H0100203{}{}{}",
                    p("01", "q"),
                    p("04", "5"),
                    p("12", "30000")
                ),
            ),
            (
                Request::Ack {
                    queue: q("q"),
                    id: Some(id),
                },
                format!("H0100402{}{}", p("01", "q"), p("03", &id.to_string())),
            ),
            (
                Request::Requeue {
                    queue: q("q"),
                    id: None,
                    ttl: 60,
                    delay: Some(1),
                },
                format!(
                    "H0100504{}{}{}{}",
                    p("01", "q"),
                    p("03", ""),
                    p("05", "60"),
                    p("11", "1")
                ),
            ),
            (
                Request::DeadLetter {
                    queue: q("q"),
                    id: Some(id),
                },
                format!("H0100602{}{}", p("01", "q"), p("03", &id.to_string())),
            ),
            (
                Request::Touch {
                    queue: q("q"),
                    id: Some(id),
                },
                format!("H0101102{}{}", p("01", "q"), p("03", &id.to_string())),
            ),
            (
                Request::Stats { queue: q("q") },
                format!("H0101201{}", p("01", "q")),
            ),
            (
                Request::Flush { queue: q("q") },
                format!("H0101401{}", p("01", "q")),
            ),
            (
                Request::Hello {
                    version: crate::hello::Version {
                        major: 1,
                        minor: 10,
                    },
                    token: Some(Arc::from(&b"t"[..])),
                    features: crate::hello::Features::served(true, true),
                },
                format!(
                    "H0100703{}{}{}",
                    p("06", "1.10"),
                    p("07", "t"),
                    p(
                        "08",
                        "confirm stats delay attempts lease dead-letter durable"
                    )
                ),
            ),
        ];
        for (request, expected) in cases {
            out.clear();
            request.encode(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), expected);
            assert_eq!(request_in(&out, Dialect::V12), Ok(request));
        }
    }

    fn p(code: &str, content: &str) -> String {
        format!("P{code}{:029}{content}", content.len())
    }
}
