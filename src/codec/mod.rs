//! The PHPMQ v1 frame codec: pure functions between bytes and [`Frame`]s, no I/O.
//!
//! A frame is an 8-byte message header (`H`, version `01`, 3-digit message type, 2-digit packet
//! count) followed by that many packets, each a 32-byte packet header (`P`, 2-digit packet type,
//! 29-digit content length) and the raw content. Packets are identified by type, never by position,
//! because two dialects of v1 exist (see `man/phpmq-protocol.7`).
//!
//! The decoder checks everything it can as soon as the bytes for it have arrived: a garbage header,
//! an oversized length or a packet count that does not fit the message type fails before the rest of
//! the frame is read, so a bad client is dropped at once instead of after a stall.

use std::fmt;

/// Length of a message header: `H` + 2 + 3 + 2 digits.
pub const HEADER_LEN: usize = 8;
/// Length of a packet header: `P` + 2 + 29 digits.
pub const PACKET_HEADER_LEN: usize = 32;
/// The only protocol version there is.
pub const PROTOCOL_VERSION: u8 = 1;

/// Message (frame) types of PHPMQ v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// 001, client → server.
    Send,
    /// 002, client → server.
    Consume,
    /// 003, server → client.
    Dispatch,
    /// 004, client → server.
    Ack,
    /// 005, client → server (v1.1).
    Requeue,
    /// 006, client → server (v1.1).
    DeadLetter,
}

/// Packet types of PHPMQ v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketType {
    Queue,
    Content,
    MessageId,
    Count,
    Ttl,
}

/// Which packets a message type requires and which it may carry in addition.
struct Shape {
    required: &'static [PacketType],
    optional: &'static [PacketType],
}

impl MessageType {
    pub const ALL: [MessageType; 6] = [
        MessageType::Send,
        MessageType::Consume,
        MessageType::Dispatch,
        MessageType::Ack,
        MessageType::Requeue,
        MessageType::DeadLetter,
    ];

    pub fn code(self) -> u16 {
        match self {
            MessageType::Send => 1,
            MessageType::Consume => 2,
            MessageType::Dispatch => 3,
            MessageType::Ack => 4,
            MessageType::Requeue => 5,
            MessageType::DeadLetter => 6,
        }
    }

    pub fn from_code(code: u16) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The union of both dialects: v1.0 sends and dispatches lack the TTL packet, v1.1 has it.
    fn shape(self) -> Shape {
        use PacketType::*;
        let (required, optional): (&'static [PacketType], &'static [PacketType]) = match self {
            MessageType::Send => (&[Queue, Content], &[Ttl]),
            MessageType::Consume => (&[Queue, Count], &[]),
            MessageType::Dispatch => (&[Queue, Content, MessageId], &[Ttl]),
            MessageType::Ack => (&[Queue, MessageId], &[]),
            MessageType::Requeue => (&[Queue, MessageId, Ttl], &[]),
            MessageType::DeadLetter => (&[Queue, MessageId], &[]),
        };
        Shape { required, optional }
    }

    fn allows(self, packet: PacketType) -> bool {
        let shape = self.shape();
        shape.required.contains(&packet) || shape.optional.contains(&packet)
    }

    fn packet_counts(self) -> std::ops::RangeInclusive<usize> {
        let shape = self.shape();
        shape.required.len()..=shape.required.len() + shape.optional.len()
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            MessageType::Send => "send",
            MessageType::Consume => "consume",
            MessageType::Dispatch => "dispatch",
            MessageType::Ack => "ack",
            MessageType::Requeue => "requeue",
            MessageType::DeadLetter => "dead-letter",
        };
        write!(f, "{:03} ({name})", self.code())
    }
}

impl PacketType {
    pub const ALL: [PacketType; 5] = [
        PacketType::Queue,
        PacketType::Content,
        PacketType::MessageId,
        PacketType::Count,
        PacketType::Ttl,
    ];

    pub fn code(self) -> u8 {
        match self {
            PacketType::Queue => 1,
            PacketType::Content => 2,
            PacketType::MessageId => 3,
            PacketType::Count => 4,
            PacketType::Ttl => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<PacketType> {
        PacketType::ALL.into_iter().find(|t| t.code() == code)
    }

    fn index(self) -> usize {
        usize::from(self.code() - 1)
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            PacketType::Queue => "queue",
            PacketType::Content => "content",
            PacketType::MessageId => "message id",
            PacketType::Count => "count",
            PacketType::Ttl => "ttl",
        };
        write!(f, "{:02} ({name})", self.code())
    }
}

/// One decoded frame; packet contents borrow the input buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub message_type: MessageType,
    packets: [Option<&'a [u8]>; 5],
}

impl<'a> Frame<'a> {
    /// The content of the packet of type `packet`, if the frame has one.
    pub fn packet(&self, packet: PacketType) -> Option<&'a [u8]> {
        self.packets[packet.index()]
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

/// Why bytes are not a valid PHPMQ v1 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodecError {
    /// The first byte of a message header is not `H`.
    BadMagic(u8),
    /// A message header field is not decimal digits.
    BadHeader([u8; HEADER_LEN]),
    UnsupportedVersion(u8),
    UnknownMessageType(u16),
    /// The header's packet count does not fit the message type.
    PacketCount {
        message_type: MessageType,
        count: usize,
    },
    /// A packet header does not start with `P` or has non-digit fields.
    BadPacketHeader([u8; PACKET_HEADER_LEN]),
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
    /// A packet's declared length is over the configured maximum.
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
            } => write!(
                f,
                "message type {message_type} cannot have {count} packets (expected {:?})",
                message_type.packet_counts()
            ),
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

/// Decodes one frame from the start of `buf`, refusing any packet longer than `max_packet_len`.
pub fn decode_frame(buf: &[u8], max_packet_len: usize) -> Result<Decoded<'_>, CodecError> {
    if let Some(&first) = buf.first() {
        if first != b'H' {
            return Err(CodecError::BadMagic(first));
        }
    }
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN });
    }
    let (message_type, count) = decode_header(&buf[..HEADER_LEN])?;

    let mut packets: [Option<&[u8]>; 5] = [None; 5];
    let mut pos = HEADER_LEN;
    for _ in 0..count {
        let header_end = pos + PACKET_HEADER_LEN;
        if buf.len() < header_end {
            return Ok(Decoded::Incomplete { needed: header_end });
        }
        let (packet, length) = decode_packet_header(&buf[pos..header_end], max_packet_len)?;
        if !message_type.allows(packet) {
            return Err(CodecError::UnexpectedPacket {
                message_type,
                packet,
            });
        }
        if packets[packet.index()].is_some() {
            return Err(CodecError::DuplicatePacket(packet));
        }
        let content_end = header_end + length;
        if buf.len() < content_end {
            return Ok(Decoded::Incomplete {
                needed: content_end,
            });
        }
        packets[packet.index()] = Some(&buf[header_end..content_end]);
        pos = content_end;
    }
    let shape = message_type.shape();
    if let Some(&packet) = shape.required.iter().find(|p| packets[p.index()].is_none()) {
        return Err(CodecError::MissingPacket {
            message_type,
            packet,
        });
    }
    Ok(Decoded::Frame(
        Frame {
            message_type,
            packets,
        },
        pos,
    ))
}

fn decode_header(header: &[u8]) -> Result<(MessageType, usize), CodecError> {
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
    let message_type = MessageType::from_code(code).ok_or(CodecError::UnknownMessageType(code))?;
    if !message_type.packet_counts().contains(&count) {
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
) -> Result<(PacketType, usize), CodecError> {
    let mut raw = [0u8; PACKET_HEADER_LEN];
    raw.copy_from_slice(header);
    let bad = || CodecError::BadPacketHeader(raw);
    if header[0] != b'P' {
        return Err(bad());
    }
    let code = parse_decimal(&header[1..3]).ok_or_else(bad)? as u8;
    let length = parse_length(&header[3..]).ok_or_else(bad)?;
    let packet = PacketType::from_code(code).ok_or(CodecError::UnknownPacketType(code))?;
    match usize::try_from(length) {
        Ok(length) if length <= max_packet_len => Ok((packet, length)),
        _ => Err(CodecError::PacketTooLarge {
            packet,
            length,
            max: max_packet_len,
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
mod tests;
