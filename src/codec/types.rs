//! The numbers of the wire: message types, packet types, which packets each message type
//! carries, and which of them a connection of each [`Dialect`] may use.
//!
//! One table serves all dialects: the v1.2 additions are part of it, and [`Dialect`] decides
//! whether a connection may use them. A HELLO (007) and its packets are known in every dialect,
//! so that a client can ask for v1.2 on any connection (and a late HELLO can be answered).

use std::fmt;

/// What a connection speaks. Ordered: each dialect can read everything an older one can.
///
/// v1.0 and v1.1 read the same frames (a v1.0 connection that sends a v1.1 frame becomes v1.1);
/// they differ only in whether a dispatch may show the TTL packet. v1.2 is reached only through
/// HELLO/WELCOME.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dialect {
    V10,
    V11,
    V12,
}

impl Dialect {
    pub const ALL: [Dialect; 3] = [Dialect::V10, Dialect::V11, Dialect::V12];

    /// A compact form for an atomic.
    pub fn to_u8(self) -> u8 {
        match self {
            Dialect::V10 => 10,
            Dialect::V11 => 11,
            Dialect::V12 => 12,
        }
    }

    /// The inverse of [`Dialect::to_u8`]; `None` for any other value.
    pub fn from_u8(value: u8) -> Option<Dialect> {
        Dialect::ALL.into_iter().find(|d| d.to_u8() == value)
    }

    /// Whether a dispatch to this connection may carry the remaining-TTL packet (05).
    pub fn shows_ttl(self) -> bool {
        self >= Dialect::V11
    }

    pub fn is_v12(self) -> bool {
        self == Dialect::V12
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::V10 => "v1.0",
            Dialect::V11 => "v1.1",
            Dialect::V12 => "v1.2",
        })
    }
}

/// Message (frame) types of PHPMQ v1 and v1.2.
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
    /// 007, client → server (v1.2): asks for a protocol version. Known in every dialect.
    Hello,
    /// 008, server → client (v1.2): the version both speak and the features served.
    Welcome,
    /// 009, server → client (v1.2): a send was accepted.
    Receipt,
    /// 010, server → client (v1.2): a request was refused.
    Error,
    /// 011, client → server (v1.2): restarts the lease of a held message.
    Touch,
    /// 012, client → server (v1.2): asks for a queue's counts.
    Stats,
    /// 013, server → client (v1.2): a queue's counts.
    Counts,
    /// 014, client → server (v1.2): removes every message of a queue.
    Flush,
    /// 015, server → client (v1.2): how many messages a flush removed.
    Flushed,
}

/// Packet types of PHPMQ v1 and v1.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// 01
    Queue,
    /// 02
    Content,
    /// 03
    MessageId,
    /// 04
    Count,
    /// 05: seconds.
    Ttl,
    /// 06 (v1.2): `MAJOR.MINOR`.
    Version,
    /// 07 (v1.2): authentication token, raw bytes.
    Token,
    /// 08 (v1.2): ASCII words separated by single spaces.
    Features,
    /// 09 (v1.2): how many times a message has been dispatched, this time included.
    Deliveries,
    /// 10 (v1.2): three decimal digits.
    ErrorCode,
    /// 11 (v1.2): milliseconds.
    Delay,
    /// 12 (v1.2): milliseconds.
    Lease,
    /// 13 (v1.2): four decimals separated by single spaces.
    Counts,
}

// The most content bytes each packet type may declare, checked from its packet header before
// any content is read (413 on v1.2), so that a header cannot make a connection buffer megabytes
// of what must be a short value. Only the content packet (02) is bounded by
// `--max-message-size`, and only by it: a small setting must not make the ids of acks, or the
// queue names, too long to send.

/// Queue (01): names are at most 255 bytes, but 255 characters of 4-byte UTF-8 are 1020 bytes,
/// and a name up to here is read so that it gets the spec's 422 (rule 4), not a 413.
pub const MAX_QUEUE_PACKET_LEN: usize = 1024;
/// Message id (03): ours are 32 hex characters; up to here an id of another form (a UUID, a
/// 64-hex digest) is read and ignored as unknown, as v1 does.
pub const MAX_ID_PACKET_LEN: usize = 256;
/// Decimal numbers (04, 05, 09, 10, 11, 12): `u64::MAX` has 20 digits; the rest is room for the
/// leading zeros v1.0 and v1.1 clients may send.
pub const MAX_NUMBER_PACKET_LEN: usize = 64;
/// Version (06): `MAJOR.MINOR` of two u32s is at most 21 bytes; the rest is room for leading
/// zeros.
pub const MAX_VERSION_PACKET_LEN: usize = 64;
/// Token (07): ignored today, but room for a signed token (a JWT is usually under 2 KiB).
pub const MAX_TOKEN_PACKET_LEN: usize = 4 << 10;
/// Features (08): all the words we know take 54 bytes; room for the words of newer clients.
pub const MAX_FEATURES_PACKET_LEN: usize = 1 << 10;
/// Counts (13): four numbers and the three spaces between them.
pub const MAX_COUNTS_PACKET_LEN: usize = 4 * MAX_NUMBER_PACKET_LEN + 3;

/// Which packets a message type requires and which it may carry in addition.
pub(super) struct Shape {
    pub(super) required: &'static [PacketType],
    pub(super) optional: &'static [PacketType],
}

/// The most packets any frame carries (a v1.2 dispatch: queue, content, id, TTL, deliveries).
pub const MAX_PACKETS: usize = 5;

impl MessageType {
    pub const ALL: [MessageType; 15] = [
        MessageType::Send,
        MessageType::Consume,
        MessageType::Dispatch,
        MessageType::Ack,
        MessageType::Requeue,
        MessageType::DeadLetter,
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::Receipt,
        MessageType::Error,
        MessageType::Touch,
        MessageType::Stats,
        MessageType::Counts,
        MessageType::Flush,
        MessageType::Flushed,
    ];

    pub fn code(self) -> u16 {
        match self {
            MessageType::Send => 1,
            MessageType::Consume => 2,
            MessageType::Dispatch => 3,
            MessageType::Ack => 4,
            MessageType::Requeue => 5,
            MessageType::DeadLetter => 6,
            MessageType::Hello => 7,
            MessageType::Welcome => 8,
            MessageType::Receipt => 9,
            MessageType::Error => 10,
            MessageType::Touch => 11,
            MessageType::Stats => 12,
            MessageType::Counts => 13,
            MessageType::Flush => 14,
            MessageType::Flushed => 15,
        }
    }

    pub fn from_code(code: u16) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// Whether clients send this type (servers send the others).
    pub fn is_from_client(self) -> bool {
        matches!(
            self,
            MessageType::Send
                | MessageType::Consume
                | MessageType::Ack
                | MessageType::Requeue
                | MessageType::DeadLetter
                | MessageType::Hello
                | MessageType::Touch
                | MessageType::Stats
                | MessageType::Flush
        )
    }

    /// Whether a connection of `dialect` may use this type. v1.0 and v1.1 connections know
    /// 001–006 (the v1.1 ones upgrade a v1.0 connection) and HELLO, which asks for v1.2.
    pub fn known_in(self, dialect: Dialect) -> bool {
        self.code() <= 7 || dialect.is_v12()
    }

    /// Every packet this type may carry in any dialect. The PHP library's packet order first.
    pub(super) fn shape(self) -> Shape {
        use PacketType::*;
        let (required, optional): (&'static [PacketType], &'static [PacketType]) = match self {
            MessageType::Send => (&[Queue, Content], &[Ttl, Delay]),
            MessageType::Consume => (&[Queue, Count], &[Lease]),
            // 09 is optional for a reader: a server sends it to v1.2 connections only.
            MessageType::Dispatch => (&[Queue, Content, MessageId], &[Ttl, Deliveries]),
            MessageType::Ack => (&[Queue, MessageId], &[]),
            MessageType::Requeue => (&[Queue, MessageId, Ttl], &[Delay]),
            MessageType::DeadLetter => (&[Queue, MessageId], &[]),
            MessageType::Hello => (&[Version], &[Token, Features]),
            MessageType::Welcome => (&[Version, Features], &[]),
            MessageType::Receipt => (&[Queue, MessageId], &[]),
            MessageType::Error => (&[ErrorCode, Content], &[]),
            MessageType::Touch => (&[Queue, MessageId], &[]),
            MessageType::Stats => (&[Queue], &[]),
            MessageType::Counts => (&[Queue, Counts], &[]),
            MessageType::Flush => (&[Queue], &[]),
            MessageType::Flushed => (&[Queue, Count], &[]),
        };
        Shape { required, optional }
    }

    /// Whether a frame of this type may carry `packet` on a connection of `dialect`.
    pub fn allows(self, packet: PacketType, dialect: Dialect) -> bool {
        let shape = self.shape();
        packet.known_in(self, dialect)
            && (shape.required.contains(&packet) || shape.optional.contains(&packet))
    }

    /// The packets this type requires (in the order a PHP library writes them).
    pub fn required(self) -> &'static [PacketType] {
        self.shape().required
    }

    /// The packets this type may carry besides the required ones, in any dialect.
    pub fn optional(self) -> &'static [PacketType] {
        self.shape().optional
    }

    /// How many packets a frame of this type may have on a connection of `dialect`.
    pub fn packet_counts(self, dialect: Dialect) -> std::ops::RangeInclusive<usize> {
        let shape = self.shape();
        let optional = shape
            .optional
            .iter()
            .filter(|p| p.known_in(self, dialect))
            .count();
        shape.required.len()..=shape.required.len() + optional
    }

    /// A short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Send => "send",
            MessageType::Consume => "consume",
            MessageType::Dispatch => "dispatch",
            MessageType::Ack => "ack",
            MessageType::Requeue => "requeue",
            MessageType::DeadLetter => "dead-letter",
            MessageType::Hello => "hello",
            MessageType::Welcome => "welcome",
            MessageType::Receipt => "receipt",
            MessageType::Error => "error",
            MessageType::Touch => "touch",
            MessageType::Stats => "stats",
            MessageType::Counts => "counts",
            MessageType::Flush => "flush",
            MessageType::Flushed => "flushed",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03} ({})", self.code(), self.name())
    }
}

impl PacketType {
    pub const ALL: [PacketType; 13] = [
        PacketType::Queue,
        PacketType::Content,
        PacketType::MessageId,
        PacketType::Count,
        PacketType::Ttl,
        PacketType::Version,
        PacketType::Token,
        PacketType::Features,
        PacketType::Deliveries,
        PacketType::ErrorCode,
        PacketType::Delay,
        PacketType::Lease,
        PacketType::Counts,
    ];

    pub fn code(self) -> u8 {
        match self {
            PacketType::Queue => 1,
            PacketType::Content => 2,
            PacketType::MessageId => 3,
            PacketType::Count => 4,
            PacketType::Ttl => 5,
            PacketType::Version => 6,
            PacketType::Token => 7,
            PacketType::Features => 8,
            PacketType::Deliveries => 9,
            PacketType::ErrorCode => 10,
            PacketType::Delay => 11,
            PacketType::Lease => 12,
            PacketType::Counts => 13,
        }
    }

    pub fn from_code(code: u8) -> Option<PacketType> {
        PacketType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The most content bytes a packet of this type may declare when message contents may
    /// have `max_content` (`--max-message-size`): that for the content packet, the type's own
    /// bound for the others.
    pub fn max_len(self, max_content: usize) -> usize {
        match self {
            PacketType::Content => max_content,
            PacketType::Queue => MAX_QUEUE_PACKET_LEN,
            PacketType::MessageId => MAX_ID_PACKET_LEN,
            PacketType::Count
            | PacketType::Ttl
            | PacketType::Deliveries
            | PacketType::ErrorCode
            | PacketType::Delay
            | PacketType::Lease => MAX_NUMBER_PACKET_LEN,
            PacketType::Version => MAX_VERSION_PACKET_LEN,
            PacketType::Token => MAX_TOKEN_PACKET_LEN,
            PacketType::Features => MAX_FEATURES_PACKET_LEN,
            PacketType::Counts => MAX_COUNTS_PACKET_LEN,
        }
    }

    /// Whether a connection of `dialect` may use this packet in a frame of `message_type`:
    /// v1.0 and v1.1 know 01–05, and the HELLO's own packets inside a HELLO.
    pub fn known_in(self, message_type: MessageType, dialect: Dialect) -> bool {
        self.code() <= 5
            || dialect.is_v12()
            || (message_type == MessageType::Hello
                && matches!(
                    self,
                    PacketType::Version | PacketType::Token | PacketType::Features
                ))
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
            PacketType::Version => "version",
            PacketType::Token => "token",
            PacketType::Features => "features",
            PacketType::Deliveries => "delivery count",
            PacketType::ErrorCode => "error code",
            PacketType::Delay => "delay",
            PacketType::Lease => "lease",
            PacketType::Counts => "counts",
        };
        write!(f, "{:02} ({name})", self.code())
    }
}
