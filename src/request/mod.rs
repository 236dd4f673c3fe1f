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

// The decoder's per-type limits must let every valid value through (and a too-long name reach
// the 422 of [`QueueName::new`]).
const _: () = assert!(MAX_QUEUE_NAME_LEN < codec::MAX_QUEUE_PACKET_LEN);
const _: () = assert!(crate::id::ID_LEN <= codec::MAX_ID_PACKET_LEN);

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
    /// On v1.0 and v1.1, a count or TTL of any length of digits (up to the decoder's
    /// [`codec::MAX_NUMBER_PACKET_LEN`]) is taken, saturated at `u64::MAX`: a count that large
    /// means "as many as possible", and a TTL that large is clamped by the broker to its latest
    /// expiry time anyway. Such a client has no error frame to learn from, so refusing would
    /// only close its connection. On v1.2, numbers are checked against their ranges
    /// ([`RequestError::OutOfRange`], ERROR 422): count and TTL up to `u64::MAX`, delay up to
    /// [`MAX_DELAY_MS`], lease up to [`MAX_LEASE_MS`].
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
mod tests;
