//! Typed client requests on top of the codec: validates what the packets carry (queue names,
//! decimal numbers) and knows which frames a client may send. No I/O. What the server sends is
//! in [`crate::outgoing`].

use crate::codec::{Frame, MessageType, PacketType};
use crate::id::MessageId;
use std::borrow::Borrow;
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

/// Why a well-framed message is still not a valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    QueueName(QueueNameProblem),
    /// A count or TTL packet that is not a decimal number (a huge one is not an error: see
    /// [`Request::from_frame`]).
    NotANumber {
        packet: PacketType,
        preview: String,
    },
    /// A frame only the server sends (003 dispatch).
    ServerOnly(MessageType),
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
            RequestError::ServerOnly(t) => {
                write!(f, "message type {t} is sent by servers, not clients")
            }
        }
    }
}

impl std::error::Error for RequestError {}

/// A client's request, owned and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// 001. `ttl` is the TTL packet if one was sent (v1.1); `Some(0)` means "never expires".
    Send {
        queue: QueueName,
        content: Arc<[u8]>,
        ttl: Option<u64>,
    },
    /// 002: hold up to `count` unacknowledged messages of `queue`.
    Consume { queue: QueueName, count: u64 },
    /// 004. `id` is `None` when the id is not of our form: such an id cannot be known.
    Ack {
        queue: QueueName,
        id: Option<MessageId>,
    },
    /// 005: back to the tail with a new TTL (0 = never expires).
    Requeue {
        queue: QueueName,
        id: Option<MessageId>,
        ttl: u64,
    },
    /// 006: remove regardless of TTL.
    DeadLetter {
        queue: QueueName,
        id: Option<MessageId>,
    },
}

impl Request {
    /// Validates a decoded frame sent by a client. A count or TTL of any length of digits is
    /// taken, saturated at `u64::MAX`: a count that large means "as many as possible", and a
    /// TTL that large is clamped by the broker to its latest expiry time anyway. A v1 client
    /// has no error frame to learn from, so refusing would only close its connection.
    pub fn from_frame(frame: &Frame<'_>) -> Result<Request, RequestError> {
        let queue = QueueName::new(frame.required(PacketType::Queue))?;
        let id = || MessageId::parse(frame.required(PacketType::MessageId));
        Ok(match frame.message_type {
            MessageType::Send => Request::Send {
                queue,
                content: Arc::from(frame.required(PacketType::Content)),
                ttl: frame
                    .packet(PacketType::Ttl)
                    .map(|t| number(PacketType::Ttl, t))
                    .transpose()?,
            },
            MessageType::Consume => Request::Consume {
                queue,
                count: number(PacketType::Count, frame.required(PacketType::Count))?,
            },
            MessageType::Ack => Request::Ack { queue, id: id() },
            MessageType::Requeue => Request::Requeue {
                queue,
                id: id(),
                ttl: number(PacketType::Ttl, frame.required(PacketType::Ttl))?,
            },
            MessageType::DeadLetter => Request::DeadLetter { queue, id: id() },
            MessageType::Dispatch => return Err(RequestError::ServerOnly(MessageType::Dispatch)),
        })
    }

    /// Whether this request exists only in the v1.1 dialect, so the sender can read a TTL packet.
    pub fn shows_v11(&self) -> bool {
        match self {
            Request::Send { ttl, .. } => ttl.is_some(),
            Request::Requeue { .. } | Request::DeadLetter { .. } => true,
            Request::Consume { .. } | Request::Ack { .. } => false,
        }
    }
}

fn number(packet: PacketType, bytes: &[u8]) -> Result<u64, RequestError> {
    saturating_decimal(bytes).ok_or_else(|| RequestError::NotANumber {
        packet,
        preview: String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned(),
    })
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
            Ok(Decoded::Frame(frame, _)) => Request::from_frame(&frame),
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
}
