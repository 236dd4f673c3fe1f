//! The PHPMQ frame codec: pure functions between bytes and [`Frame`]s, no I/O.
//!
//! A frame is an 8-byte message header (`H`, version `01`, 3-digit message type, 2-digit packet
//! count) followed by that many packets, each a 32-byte packet header (`P`, 2-digit packet type,
//! 29-digit content length) and the raw content. Packets are identified by type, never by position,
//! because several dialects exist (v1.0, v1.1 and the opt-in v1.2; see `man/phpmq-protocol.7`).
//! Which types and packets a connection may use depends on its [`Dialect`] (module `types`).
//!
//! The decoder checks everything it can as soon as the bytes for it have arrived: a garbage header,
//! an oversized length or a packet count that does not fit the message type fails before the rest of
//! the frame is read, so a bad client is dropped at once instead of after a stall. "Oversized" is
//! per packet type ([`PacketType::max_len`]): only a message's content may be as long as the
//! configured maximum, so that no header makes the server buffer megabytes of a queue name.

mod types;

pub use types::{
    Dialect, MessageType, PacketType, MAX_COUNTS_PACKET_LEN, MAX_FEATURES_PACKET_LEN,
    MAX_ID_PACKET_LEN, MAX_NUMBER_PACKET_LEN, MAX_PACKETS, MAX_QUEUE_PACKET_LEN,
    MAX_TOKEN_PACKET_LEN, MAX_VERSION_PACKET_LEN,
};

use std::fmt;

/// Length of a message header: `H` + 2 + 3 + 2 digits.
pub const HEADER_LEN: usize = 8;
/// Length of a packet header: `P` + 2 + 29 digits.
pub const PACKET_HEADER_LEN: usize = 32;
/// The header's version: 01 in every dialect (v1.2 is negotiated by HELLO, not by the header).
pub const PROTOCOL_VERSION: u8 = 1;

/// One decoded frame; packet contents borrow the input buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub message_type: MessageType,
    /// The first `count` are the packets in wire order (so re-encoding gives the same bytes);
    /// no type occurs twice. A scan of at most five finds one.
    packets: [(PacketType, &'a [u8]); MAX_PACKETS],
    count: usize,
}

impl<'a> Frame<'a> {
    /// The content of the packet of type `packet`, if the frame has one.
    pub fn packet(&self, packet: PacketType) -> Option<&'a [u8]> {
        self.packets().find(|&(p, _)| p == packet).map(|(_, c)| c)
    }

    /// Every packet, in the order it came on the wire.
    pub fn packets(&self) -> impl Iterator<Item = (PacketType, &'a [u8])> + '_ {
        self.packets[..self.count].iter().copied()
    }

    /// The content of a packet the frame's shape requires; decoding guaranteed it is there.
    pub fn required(&self, packet: PacketType) -> &'a [u8] {
        self.packet(packet).unwrap_or_default()
    }
}

/// What [`decode_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many bytes it took.
    Frame(Frame<'a>, usize),
    /// The frame is not complete yet; it needs at least this many bytes in all.
    Incomplete { needed: usize },
}

/// Why bytes are not a valid PHPMQ frame (for the dialect they were read in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodecError {
    /// The first byte of a message header is not `H`.
    BadMagic(u8),
    /// A message header field is not decimal digits.
    BadHeader([u8; HEADER_LEN]),
    UnsupportedVersion(u8),
    /// A message type that does not exist, or not in the connection's dialect.
    UnknownMessageType(u16),
    /// The header's packet count does not fit the message type.
    PacketCount {
        message_type: MessageType,
        count: usize,
    },
    /// A packet header does not start with `P` or has non-digit fields.
    BadPacketHeader([u8; PACKET_HEADER_LEN]),
    /// A packet type that does not exist, or not in the connection's dialect.
    UnknownPacketType(u8),
    /// A packet type that this message type does not carry.
    UnexpectedPacket {
        message_type: MessageType,
        packet: PacketType,
    },
    DuplicatePacket(PacketType),
    MissingPacket {
        message_type: MessageType,
        packet: PacketType,
    },
    /// A packet's declared length is over its type's limit ([`PacketType::max_len`]), or its
    /// end is beyond what a `usize` can address.
    PacketTooLarge {
        packet: PacketType,
        length: u128,
        max: usize,
    },
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::BadMagic(byte) => {
                write!(f, "frame does not start with 'H' (got byte 0x{byte:02x})")
            }
            CodecError::BadHeader(h) => {
                write!(
                    f,
                    "malformed message header {:?}",
                    String::from_utf8_lossy(h)
                )
            }
            CodecError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v:02}"),
            CodecError::UnknownMessageType(t) => write!(f, "unknown message type {t:03}"),
            CodecError::PacketCount {
                message_type,
                count,
            } => write!(f, "message type {message_type} cannot have {count} packets"),
            CodecError::BadPacketHeader(h) => {
                write!(
                    f,
                    "malformed packet header {:?}",
                    String::from_utf8_lossy(h)
                )
            }
            CodecError::UnknownPacketType(t) => write!(f, "unknown packet type {t:02}"),
            CodecError::UnexpectedPacket {
                message_type,
                packet,
            } => write!(
                f,
                "message type {message_type} does not carry packet {packet}"
            ),
            CodecError::DuplicatePacket(p) => write!(f, "duplicated packet {p}"),
            CodecError::MissingPacket {
                message_type,
                packet,
            } => write!(f, "message type {message_type} is missing packet {packet}"),
            CodecError::PacketTooLarge {
                packet,
                length,
                max,
            } => write!(
                f,
                "packet {packet} declares {length} bytes, over the limit of {max} bytes"
            ),
        }
    }
}

impl std::error::Error for CodecError {}

/// Parses ASCII decimal digits; `None` if any byte is not a digit or the value overflows.
pub fn parse_decimal(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u128, |n, &c| {
        if c.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u128::from(c - b'0'))
        } else {
            None
        }
    })
}

/// Parses the 29-digit length field. Real lengths have at least ten leading zeros, so the rest
/// fits in u64 arithmetic; only an absurd length takes the slow u128 path (29 digits always fit
/// in u128, which holds 38).
fn parse_length(digits: &[u8]) -> Option<u128> {
    let (high, low) = digits.split_at(digits.len().saturating_sub(19));
    if high.iter().all(|&c| c == b'0') {
        low.iter()
            .try_fold(0u64, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
            })
            .map(u128::from)
    } else {
        parse_decimal(digits)
    }
}

/// Decodes one frame from the start of `buf` as a v1.0 or v1.1 connection reads it (the two
/// read the same frames): [`decode_frame_in`] with [`Dialect::V11`].
pub fn decode_frame(buf: &[u8], max_packet_len: usize) -> Result<Decoded<'_>, CodecError> {
    decode_frame_in(buf, max_packet_len, Dialect::V11)
}

/// Decodes one frame from the start of `buf` as a connection of `dialect` reads it, refusing any
/// packet longer than its type allows: `max_packet_len` for a message's content, the type's own
/// bound for every other packet ([`PacketType::max_len`]). A type or
/// packet the dialect does not know is unknown (v1.2's on a v1.0 or v1.1 connection, except a
/// HELLO and its packets).
pub fn decode_frame_in(
    buf: &[u8],
    max_packet_len: usize,
    dialect: Dialect,
) -> Result<Decoded<'_>, CodecError> {
    if let Some(&first) = buf.first() {
        if first != b'H' {
            return Err(CodecError::BadMagic(first));
        }
    }
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN });
    }
    let (message_type, count) = decode_header(&buf[..HEADER_LEN], dialect)?;

    let mut packets: [(PacketType, &[u8]); MAX_PACKETS] = [(PacketType::Queue, b""); MAX_PACKETS];
    let mut pos = HEADER_LEN;
    // The header check bounds `count` by the type's shape, which is at most MAX_PACKETS (a
    // test checks every shape); the `min` only keeps a broken table from indexing out.
    let count = count.min(MAX_PACKETS);
    for i in 0..count {
        let header_end = pos + PACKET_HEADER_LEN;
        if buf.len() < header_end {
            return Ok(Decoded::Incomplete { needed: header_end });
        }
        let known = |p: PacketType| p.known_in(message_type, dialect);
        let (packet, length) = decode_packet_header(&buf[pos..header_end], max_packet_len, known)?;
        if !message_type.allows(packet, dialect) {
            return Err(CodecError::UnexpectedPacket {
                message_type,
                packet,
            });
        }
        if packets[..i].iter().any(|&(p, _)| p == packet) {
            return Err(CodecError::DuplicatePacket(packet));
        }
        // `max_packet_len` may be near usize::MAX: a length that cannot be addressed from here
        // is as oversized as one over the limit (a wrapped end would slice backwards).
        let Some(content_end) = header_end.checked_add(length) else {
            return Err(CodecError::PacketTooLarge {
                packet,
                length: length as u128,
                max: usize::MAX - header_end,
            });
        };
        if buf.len() < content_end {
            return Ok(Decoded::Incomplete {
                needed: content_end,
            });
        }
        packets[i] = (packet, &buf[header_end..content_end]);
        pos = content_end;
    }
    let shape = message_type.shape();
    let present = &packets[..count];
    if let Some(&packet) = shape
        .required
        .iter()
        .find(|&&r| !present.iter().any(|&(p, _)| p == r))
    {
        return Err(CodecError::MissingPacket {
            message_type,
            packet,
        });
    }
    Ok(Decoded::Frame(
        Frame {
            message_type,
            packets,
            count,
        },
        pos,
    ))
}

/// The message type a buffer's first 8 bytes declare, if they are a well-formed header of a type
/// that exists: lets a caller tell, after a decode error, whether the bad frame was a HELLO.
pub fn peek_message_type(buf: &[u8]) -> Option<MessageType> {
    let header = buf.get(..HEADER_LEN)?;
    if header[0] != b'H' || parse_decimal(&header[1..3])? != u128::from(PROTOCOL_VERSION) {
        return None;
    }
    // Three digits always fit in u16.
    MessageType::from_code(parse_decimal(&header[3..6])? as u16)
}

fn decode_header(header: &[u8], dialect: Dialect) -> Result<(MessageType, usize), CodecError> {
    let mut raw = [0u8; HEADER_LEN];
    raw.copy_from_slice(header);
    let bad = || CodecError::BadHeader(raw);
    let version = parse_decimal(&header[1..3]).ok_or_else(bad)?;
    let code = parse_decimal(&header[3..6]).ok_or_else(bad)?;
    let count = parse_decimal(&header[6..8]).ok_or_else(bad)?;
    // Two and three digits always fit in u8 and u16.
    let (version, code, count) = (version as u8, code as u16, count as usize);
    if version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let message_type = MessageType::from_code(code)
        .filter(|t| t.known_in(dialect))
        .ok_or(CodecError::UnknownMessageType(code))?;
    if !message_type.packet_counts(dialect).contains(&count) {
        return Err(CodecError::PacketCount {
            message_type,
            count,
        });
    }
    Ok((message_type, count))
}

fn decode_packet_header(
    header: &[u8],
    max_packet_len: usize,
    known: impl Fn(PacketType) -> bool,
) -> Result<(PacketType, usize), CodecError> {
    let mut raw = [0u8; PACKET_HEADER_LEN];
    raw.copy_from_slice(header);
    let bad = || CodecError::BadPacketHeader(raw);
    if header[0] != b'P' {
        return Err(bad());
    }
    let code = parse_decimal(&header[1..3]).ok_or_else(bad)? as u8;
    let length = parse_length(&header[3..]).ok_or_else(bad)?;
    let packet = PacketType::from_code(code)
        .filter(|&p| known(p))
        .ok_or(CodecError::UnknownPacketType(code))?;
    // Decided from the header alone: the content is not read (nor waited for) when too long.
    let max = packet.max_len(max_packet_len);
    match usize::try_from(length) {
        Ok(length) if length <= max => Ok((packet, length)),
        _ => Err(CodecError::PacketTooLarge {
            packet,
            length,
            max,
        }),
    }
}

/// Appends `value` as exactly `width` zero-padded decimal digits.
fn push_digits(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    // u64, not u128: a 128-bit division is a library call, and this runs for every packet.
    for slot in out[start..].iter_mut().rev() {
        if value == 0 {
            break;
        }
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
    debug_assert_eq!(value, 0, "value does not fit in {width} digits");
}

/// Appends one whole frame. Packets are written in the order given.
pub fn encode_frame(out: &mut Vec<u8>, message_type: MessageType, packets: &[(PacketType, &[u8])]) {
    let size: usize = packets
        .iter()
        .map(|(_, c)| PACKET_HEADER_LEN + c.len())
        .sum();
    out.reserve(HEADER_LEN + size);
    out.push(b'H');
    push_digits(out, u64::from(PROTOCOL_VERSION), 2);
    push_digits(out, u64::from(message_type.code()), 3);
    push_digits(out, packets.len() as u64, 2);
    for (packet, content) in packets {
        out.push(b'P');
        push_digits(out, u64::from(packet.code()), 2);
        push_digits(out, content.len() as u64, 29);
        out.extend_from_slice(content);
    }
}

/// The size in bytes of the frame [`encode_frame`] would write.
pub fn encoded_len(packets: &[(PacketType, &[u8])]) -> usize {
    HEADER_LEN
        + packets
            .iter()
            .map(|(_, c)| PACKET_HEADER_LEN + c.len())
            .sum::<usize>()
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
