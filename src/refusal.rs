//! How the server refuses a frame (v1.2 spec, rule 4), without I/O: the [`ErrorCode`]s of the
//! ERROR frame, and the mapping from every [`CodecError`] and [`RequestError`] to a code,
//! whether an ERROR is sent at all, and whether the connection stays open.
//!
//! Only a v1.2 connection is sent ERROR frames, with one exception: a HELLO (which shows that
//! its sender reads v1.2 frames) that cannot be used is answered with ERROR 400 on any
//! connection (rule 1). Everything else on a v1.0 or v1.1 connection closes it without a
//! reply, as v1 always did (rule 2).

use crate::codec::{CodecError, Dialect, MessageType};
use crate::outgoing::Outgoing;
use crate::request::RequestError;
use std::fmt;

/// The codes of an ERROR frame's 10 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: malformed frame or packet, or a rule broken. Closes.
    BadRequest,
    /// 401: authentication required or token wrong. Closes.
    Unauthorized,
    /// 413: a packet header declares more than the server's limit. Closes.
    TooLarge,
    /// 422: a value is not valid (queue name, number). Open for 001, 012 and 014.
    Invalid,
    /// 429: the queue is full. Open.
    QueueFull,
    /// 503: the server is shutting down and did not take the message. Open until it closes.
    ShuttingDown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::TooLarge,
        ErrorCode::Invalid,
        ErrorCode::QueueFull,
        ErrorCode::ShuttingDown,
    ];

    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::TooLarge => 413,
            ErrorCode::Invalid => 422,
            ErrorCode::QueueFull => 429,
            ErrorCode::ShuttingDown => 503,
        }
    }

    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A short standard text, for a reply without a more specific one.
    pub fn text(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "malformed frame or broken rule",
            ErrorCode::Unauthorized => "authentication required or token wrong",
            ErrorCode::TooLarge => "packet over the size limit",
            ErrorCode::Invalid => "invalid value",
            ErrorCode::QueueFull => "queue full",
            ErrorCode::ShuttingDown => "server shutting down",
        }
    }

    /// The 10 packet: exactly three decimal digits.
    pub fn to_wire(self) -> [u8; 3] {
        let code = self.code();
        [
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ]
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.text())
    }
}

impl CodecError {
    /// 413 for a packet declared over the limit (decided from its header), 400 for the rest.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            CodecError::PacketTooLarge { .. } => ErrorCode::TooLarge,
            CodecError::BadMagic(_)
            | CodecError::BadHeader(_)
            | CodecError::UnsupportedVersion(_)
            | CodecError::UnknownMessageType(_)
            | CodecError::PacketCount { .. }
            | CodecError::BadPacketHeader(_)
            | CodecError::UnknownPacketType(_)
            | CodecError::UnexpectedPacket { .. }
            | CodecError::DuplicatePacket(_)
            | CodecError::MissingPacket { .. } => ErrorCode::BadRequest,
        }
    }
}

impl RequestError {
    /// 422 for a value that is not valid (queue name, number), 400 for the rest: a frame only
    /// servers send, one the dialect does not have, or a HELLO's version or feature list that
    /// does not parse (rule 1: "a HELLO without a well-formed 06 packet gets ERROR 400").
    pub fn error_code(&self) -> ErrorCode {
        match self {
            RequestError::QueueName(_)
            | RequestError::NotANumber { .. }
            | RequestError::OutOfRange { .. } => ErrorCode::Invalid,
            RequestError::ServerOnly(_)
            | RequestError::NotInDialect { .. }
            | RequestError::PacketNotInDialect { .. }
            | RequestError::Version(_)
            | RequestError::Features(_) => ErrorCode::BadRequest,
        }
    }
}

/// How the server answers a frame it refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    /// One line for people: what was wrong (sanitized when encoded).
    pub text: String,
    /// Whether an ERROR frame is sent (v1.2 connections, and any HELLO).
    pub reply: bool,
    /// Whether the connection stays open afterwards; when false it is closed (after the
    /// ERROR, if one is sent) and what it held goes back to its queues.
    pub keep_open: bool,
}

impl Refusal {
    /// For bytes that do not decode on a connection of `dialect`. `declared` is the type the
    /// frame's header declares ([`crate::codec::peek_message_type`]), if it is readable: a bad
    /// HELLO is answered on any connection. A frame that cannot be cut out of the stream
    /// leaves nothing to resync on, so the connection always closes.
    pub fn codec(error: &CodecError, dialect: Dialect, declared: Option<MessageType>) -> Refusal {
        Refusal {
            code: error.error_code(),
            text: error.to_string(),
            reply: dialect.is_v12() || declared == Some(MessageType::Hello),
            keep_open: false,
        }
    }

    /// For a whole frame of `message_type` that is not a valid request on a connection of
    /// `dialect`. A 422 keeps the connection open for a send, a STATS or a FLUSH (each gets
    /// exactly one reply, so the client can tell which failed); everything else closes.
    pub fn request(error: &RequestError, dialect: Dialect, message_type: MessageType) -> Refusal {
        let code = error.error_code();
        let reply = dialect.is_v12() || message_type == MessageType::Hello;
        let keeps = matches!(
            message_type,
            MessageType::Send | MessageType::Stats | MessageType::Flush
        );
        Refusal {
            code,
            text: error.to_string(),
            reply,
            keep_open: dialect.is_v12() && code == ErrorCode::Invalid && keeps,
        }
    }

    /// For a HELLO that is not the connection's first frame, a second HELLO, or one for a
    /// version below 1.0 (rule 1): ERROR 400 on any connection, then close.
    pub fn hello(text: impl Into<String>) -> Refusal {
        Refusal {
            code: ErrorCode::BadRequest,
            text: text.into(),
            reply: true,
            keep_open: false,
        }
    }

    /// The ERROR frame to send, if any.
    pub fn frame(&self) -> Option<Outgoing> {
        self.reply.then(|| Outgoing::Error {
            code: self.code,
            text: self.text.clone(),
        })
    }
}

/// The most bytes of an ERROR's text: enough for any message of ours, and a bound on what a
/// client's bytes quoted in it can make it.
pub const MAX_ERROR_TEXT: usize = 512;

/// Makes `text` one line of UTF-8 for an ERROR's 02 packet: every control character (line
/// breaks included) becomes a space, and it is cut at [`MAX_ERROR_TEXT`] bytes on a character
/// boundary.
pub fn sanitize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_ERROR_TEXT));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_ERROR_TEXT {
            break;
        }
        out.push(c);
    }
    out
}
