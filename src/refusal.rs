//! How the server refuses a frame (v1.2 spec, rule 4), without I/O: the [`ErrorCode`]s of the
//! ERROR frame, and the mapping from every [`CodecError`] and [`RequestError`] to a code,
//! whether an ERROR is sent at all, and whether the connection stays open.
//!
//! Only a v1.2 connection is sent ERROR frames, with one exception: a HELLO (which shows that
//! its sender reads v1.2 frames) that cannot be used is answered with ERROR 400 on any
//! connection (rule 1). Everything else on a v1.0 or v1.1 connection closes it without a
//! reply, as v1 always did (rule 2).

use crate::broker::SendRefused;
use crate::codec::{CodecError, Dialect, MessageType};
use crate::hello::NoCommonVersion;
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

    /// For a send the broker did not take (rule 4): ERROR 429 or 503 on a v1.2 connection,
    /// which stays open (429 also for the server-wide store limits: "a configured limit", as
    /// the spec's table has it). A v1.0 or v1.1 connection cannot be told: it is closed instead, so
    /// that its client learns the send was not taken (the frames it sent after are not taken
    /// either).
    pub fn send(refused: SendRefused, queue: &str, v12: bool) -> Refusal {
        let (code, text) = match refused {
            SendRefused::QueueFull { limit } => (
                ErrorCode::QueueFull,
                format!("queue {queue} is full (limit {limit})"),
            ),
            SendRefused::TooManyMessages { limit } => (
                ErrorCode::QueueFull,
                format!(
                    "the server holds its most messages (--max-stored-messages {limit}): \
                     not taken for {queue}"
                ),
            ),
            SendRefused::TooManyBytes { limit } => (
                ErrorCode::QueueFull,
                format!(
                    "the server holds its most message bytes (--max-stored-bytes {limit}): \
                     not taken for {queue}"
                ),
            ),
            SendRefused::ShuttingDown => (
                ErrorCode::ShuttingDown,
                "server shutting down: message not taken".to_string(),
            ),
        };
        Refusal {
            code,
            text,
            reply: v12,
            keep_open: v12,
        }
    }

    /// For a HELLO that is not the connection's first frame, or a second HELLO (rule 1).
    pub fn late_hello() -> Refusal {
        Refusal::hello("HELLO is valid only as a connection's first frame")
    }

    /// The ERROR frame to send, if any.
    pub fn frame(&self) -> Option<Outgoing> {
        self.reply.then(|| Outgoing::Error {
            code: self.code,
            text: self.text.clone(),
        })
    }
}

impl From<NoCommonVersion> for Refusal {
    /// A HELLO for a version below 1.0 (rule 1): ERROR 400, then close.
    fn from(error: NoCommonVersion) -> Refusal {
        Refusal::hello(error.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PacketType;
    use crate::hello::VersionError;
    use crate::request::QueueNameProblem;

    fn every_codec_error() -> Vec<CodecError> {
        let t = MessageType::Send;
        let p = PacketType::Queue;
        vec![
            CodecError::BadMagic(b'X'),
            CodecError::BadHeader(*b"H01x0102"),
            CodecError::UnsupportedVersion(2),
            CodecError::UnknownMessageType(99),
            CodecError::PacketCount {
                message_type: t,
                count: 9,
            },
            CodecError::BadPacketHeader([b'X'; 32]),
            CodecError::UnknownPacketType(99),
            CodecError::UnexpectedPacket {
                message_type: t,
                packet: PacketType::Lease,
            },
            CodecError::DuplicatePacket(p),
            CodecError::MissingPacket {
                message_type: t,
                packet: p,
            },
            CodecError::PacketTooLarge {
                packet: p,
                length: 11,
                max: 10,
            },
        ]
    }

    #[test]
    fn codes_and_their_wire_form() {
        let codes: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes, [400, 401, 413, 422, 429, 503]);
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
            assert_eq!(code.to_wire(), *code.code().to_string().as_bytes());
            assert!(!code.text().is_empty());
        }
        assert_eq!(ErrorCode::from_code(500), None);
        assert_eq!(ErrorCode::Invalid.to_string(), "422 invalid value");
    }

    #[test]
    fn a_bad_frame_is_400_or_413_and_always_closes() {
        for error in every_codec_error() {
            let expected = match error {
                CodecError::PacketTooLarge { .. } => ErrorCode::TooLarge,
                _ => ErrorCode::BadRequest,
            };
            assert_eq!(error.error_code(), expected, "{error}");
            for dialect in Dialect::ALL {
                for declared in [None, Some(MessageType::Send), Some(MessageType::Hello)] {
                    let refusal = Refusal::codec(&error, dialect, declared);
                    assert_eq!(refusal.code, expected);
                    assert!(!refusal.keep_open, "{error} closes");
                    // Rule 2: no reply on an older connection, unless the frame is a HELLO.
                    let reply = dialect == Dialect::V12 || declared == Some(MessageType::Hello);
                    assert_eq!(refusal.reply, reply, "{error} {dialect} {declared:?}");
                    assert_eq!(refusal.frame().is_some(), reply);
                    assert_eq!(refusal.text, error.to_string());
                }
            }
        }
    }

    #[test]
    fn invalid_values_are_422_and_keep_send_stats_and_flush_open() {
        let invalid = [
            RequestError::QueueName(QueueNameProblem::Length(0)),
            RequestError::QueueName(QueueNameProblem::NotUtf8),
            RequestError::QueueName(QueueNameProblem::ControlCharacter),
            RequestError::NotANumber {
                packet: PacketType::Count,
                preview: "x".into(),
            },
            RequestError::OutOfRange {
                packet: PacketType::Delay,
                preview: "9".into(),
                max: 1,
            },
        ];
        for error in &invalid {
            assert_eq!(error.error_code(), ErrorCode::Invalid);
            for t in MessageType::ALL.into_iter().filter(|t| t.is_from_client()) {
                let open = matches!(
                    t,
                    MessageType::Send | MessageType::Stats | MessageType::Flush
                );
                let refusal = Refusal::request(error, Dialect::V12, t);
                assert_eq!(
                    (refusal.code, refusal.reply, refusal.keep_open),
                    (ErrorCode::Invalid, true, open),
                    "{error} in {t}"
                );
                // Before v1.2: closed without a reply, as always.
                for dialect in [Dialect::V10, Dialect::V11] {
                    let refusal = Refusal::request(error, dialect, t);
                    assert!(!refusal.keep_open);
                    assert_eq!(refusal.reply, t == MessageType::Hello);
                }
            }
        }
    }

    #[test]
    fn broken_rules_are_400_and_close() {
        let broken = [
            RequestError::ServerOnly(MessageType::Receipt),
            RequestError::NotInDialect {
                message_type: MessageType::Touch,
                dialect: Dialect::V10,
            },
            RequestError::PacketNotInDialect {
                packet: PacketType::Delay,
                dialect: Dialect::V11,
            },
            RequestError::Version(VersionError {
                preview: "1".into(),
            }),
            RequestError::Features(crate::hello::FeaturesError {
                preview: " ".into(),
            }),
        ];
        for error in &broken {
            assert_eq!(error.error_code(), ErrorCode::BadRequest);
            for t in [MessageType::Send, MessageType::Hello, MessageType::Ack] {
                let refusal = Refusal::request(error, Dialect::V12, t);
                assert!(refusal.reply && !refusal.keep_open, "{error}");
            }
        }
        // A HELLO that cannot be used is answered on any connection (rule 1).
        let bad_hello = Refusal::request(&broken[3], Dialect::V10, MessageType::Hello);
        assert_eq!(
            (bad_hello.code, bad_hello.reply, bad_hello.keep_open),
            (ErrorCode::BadRequest, true, false)
        );
        let late = Refusal::late_hello();
        assert_eq!(
            late.frame(),
            Some(Outgoing::Error {
                code: ErrorCode::BadRequest,
                text: "HELLO is valid only as a connection's first frame".into()
            })
        );
        assert!(!late.keep_open);
        let old = Refusal::from(crate::hello::NoCommonVersion {
            client: crate::hello::Version { major: 0, minor: 9 },
        });
        assert_eq!(
            (old.code, old.reply, old.keep_open),
            (ErrorCode::BadRequest, true, false)
        );
        assert_eq!(
            old.text,
            "no common protocol version: the client speaks up to 0.9, the server 1.0 to 1.2"
        );
    }

    #[test]
    fn error_text_is_one_bounded_line() {
        assert_eq!(sanitize_text("a\nb\r\tc\u{7f}d\u{85}e"), "a b  c d e");
        assert_eq!(sanitize_text("zürich ✓"), "zürich ✓");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let cut = sanitize_text(&long);
        assert!(cut.len() <= MAX_ERROR_TEXT && cut.len() >= MAX_ERROR_TEXT - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
