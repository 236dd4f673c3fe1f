//! Blocking clients for the `phpmq` command line: one for the PHPMQ message endpoint, one
//! for the maintenance console.
//!
//! Writes are buffered: frames go out on [`Client::flush`] or before any blocking read, so a
//! caller can pipeline without thinking about it. [`Client::recv_frame`] reads whatever the
//! server sends next and says what it is ([`ServerFrame`]); [`Client::recv`] expects a dispatch.

use crate::codec::{self, Decoded, Dialect, Frame, MessageType, PacketType};
use crate::config::ListenAddr;
use crate::hello::{Features, Version};
use crate::net::Stream;
#[cfg(doc)]
use crate::refusal::ErrorCode;
use crate::request::Request;
use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

/// A frame the server sent, as [`Client::recv_frame`] read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    /// 003: a message to handle (and acknowledge).
    Dispatch(Dispatch),
    /// 008 (v1.2): the answer to a HELLO.
    Welcome {
        version: Version,
        features: Features,
    },
    /// 009 (v1.2): a send was accepted, and the id it got.
    Receipt { queue: String, id: String },
    /// 010 (v1.2): a request was refused. `code` is kept as a number: a newer server may send
    /// one this client does not know ([`ErrorCode::from_code`] names the known ones).
    Error { code: u16, text: String },
    /// 013 (v1.2): a queue's counts.
    Counts {
        queue: String,
        ready: u64,
        delayed: u64,
        in_flight: u64,
        consumers: u64,
    },
    /// 015 (v1.2): how many messages a flush removed.
    Flushed { queue: String, count: u64 },
}

impl ServerFrame {
    /// What kind of frame this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Dispatch(_) => "dispatch",
            ServerFrame::Welcome { .. } => "welcome",
            ServerFrame::Receipt { .. } => "receipt",
            ServerFrame::Error { .. } => "error",
            ServerFrame::Counts { .. } => "counts",
            ServerFrame::Flushed { .. } => "flushed",
        }
    }

    /// The dispatch; [`ClientError::Refused`] for an ERROR (a consume request refused), or
    /// [`ClientError::Unexpected`] for any other frame.
    pub fn into_dispatch(self) -> Result<Dispatch, ClientError> {
        match self {
            ServerFrame::Dispatch(dispatch) => Ok(dispatch),
            ServerFrame::Error { code, text } => Err(ClientError::Refused { code, text }),
            other => Err(ClientError::Unexpected {
                expected: "dispatch",
                got: other.kind(),
            }),
        }
    }
}

/// A message the server dispatched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub queue: String,
    pub content: Vec<u8>,
    pub id: String,
    pub ttl: Option<u64>,
    /// The delivery count (v1.2 connections only).
    pub deliveries: Option<u32>,
}

#[derive(Debug)]
pub enum ClientError {
    Connect {
        addr: String,
        source: io::Error,
    },
    Io(io::Error),
    /// The server sent bytes that are not a PHPMQ frame, or a frame only clients send.
    Protocol(String),
    /// The server sent a valid frame, but not the kind the caller waited for.
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// The server closed the connection.
    Closed,
    /// The server refused a request (a v1.2 ERROR frame).
    Refused {
        code: u16,
        text: String,
    },
    /// The console answered with an error.
    Console(String),
    /// Something accepted the connection but sent no console greeting in time.
    NoGreeting {
        addr: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { addr, source } => {
                write!(f, "cannot connect to {addr}: {}", describe(source))
            }
            ClientError::Io(e) => write!(f, "{}", describe(e)),
            ClientError::Protocol(e) => write!(f, "unexpected data from the server: {e}"),
            ClientError::Unexpected { expected, got } => {
                write!(
                    f,
                    "the server sent a {got} frame where a {expected} was expected"
                )
            }
            ClientError::Closed => f.write_str("the server closed the connection"),
            ClientError::Refused { code, text } => {
                write!(f, "refused by the server ({code}): {text}")
            }
            ClientError::Console(e) => f.write_str(e),
            ClientError::NoGreeting { addr } => write!(
                f,
                "{addr} accepted the connection but sent no console greeting within {} s: is \
                 it a phpmq console (--admin)?",
                Console::GREETING_TIMEOUT.as_secs()
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// A read that ran into its timeout (nothing arrived in time).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

pub struct Client {
    stream: Stream,
    out: Vec<u8>,
    /// Bytes read and not yet decoded are `buf[start..end]`; the rest is room to read into.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Client {
    pub fn connect(addr: &ListenAddr) -> Result<Client, ClientError> {
        let stream = Stream::connect(addr).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Client {
            stream,
            out: Vec::with_capacity(64 << 10),
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        })
    }

    /// Bounds every blocking read.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        Ok(self.stream.set_read_timeout(timeout)?)
    }

    fn frame(
        &mut self,
        t: MessageType,
        packets: &[(PacketType, &[u8])],
    ) -> Result<(), ClientError> {
        codec::encode_frame(&mut self.out, t, packets);
        if self.out.len() >= 64 << 10 {
            self.flush()?;
        }
        Ok(())
    }

    /// Queues any request, v1.2's included (a HELLO first, for those: see
    /// `man/phpmq-protocol.7`), exactly as [`Request::encode`] writes it.
    pub fn request(&mut self, request: &Request) -> Result<(), ClientError> {
        request.encode(&mut self.out);
        if self.out.len() >= 64 << 10 {
            self.flush()?;
        }
        Ok(())
    }

    /// Queues a message; `ttl` (seconds) uses the v1.1 form.
    pub fn send(
        &mut self,
        queue: &str,
        content: &[u8],
        ttl: Option<u64>,
    ) -> Result<(), ClientError> {
        match ttl {
            None => self.frame(
                MessageType::Send,
                &[
                    (PacketType::Queue, queue.as_bytes()),
                    (PacketType::Content, content),
                ],
            ),
            Some(ttl) => {
                let ttl = ttl.to_string();
                self.frame(
                    MessageType::Send,
                    &[
                        (PacketType::Queue, queue.as_bytes()),
                        (PacketType::Content, content),
                        (PacketType::Ttl, ttl.as_bytes()),
                    ],
                )
            }
        }
    }

    /// Asks for PHPMQ v1.2 (the first frame of a connection), wanting `features` (words
    /// separated by single spaces, e.g. `durable`; none if empty), and waits for the answer:
    /// the version both speak and the features served. A server that does not know v1.2
    /// closes the connection ([`ClientError::Closed`] or an I/O error).
    pub fn hello(&mut self, features: &str) -> Result<(Version, Features), ClientError> {
        let mut packets: Vec<(PacketType, &[u8])> = vec![(PacketType::Version, b"1.2")];
        if !features.is_empty() {
            packets.push((PacketType::Features, features.as_bytes()));
        }
        self.frame(MessageType::Hello, &packets)?;
        match self.recv_frame()? {
            ServerFrame::Welcome { version, features } => Ok((version, features)),
            ServerFrame::Error { code, text } => Err(ClientError::Refused { code, text }),
            other => Err(ClientError::Protocol(format!(
                "expected a welcome, got a {}",
                other.kind()
            ))),
        }
    }

    /// Queues a v1.2 send: `ttl` in seconds, `delay` in milliseconds (only on a connection
    /// that agreed on v1.2).
    pub fn send_v12(
        &mut self,
        queue: &str,
        content: &[u8],
        ttl: Option<u64>,
        delay: Option<u64>,
    ) -> Result<(), ClientError> {
        let ttl = ttl.map(|t| t.to_string());
        let delay = delay.map(|d| d.to_string());
        let mut packets: Vec<(PacketType, &[u8])> = vec![
            (PacketType::Queue, queue.as_bytes()),
            (PacketType::Content, content),
        ];
        if let Some(ttl) = &ttl {
            packets.push((PacketType::Ttl, ttl.as_bytes()));
        }
        if let Some(delay) = &delay {
            packets.push((PacketType::Delay, delay.as_bytes()));
        }
        self.frame(MessageType::Send, &packets)
    }

    /// A v1.2 consume request with a lease in milliseconds (0: none).
    pub fn consume_leased(
        &mut self,
        queue: &str,
        count: u64,
        lease: u64,
    ) -> Result<(), ClientError> {
        let count = count.to_string();
        let lease = lease.to_string();
        self.frame(
            MessageType::Consume,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::Count, count.as_bytes()),
                (PacketType::Lease, lease.as_bytes()),
            ],
        )
    }

    /// Waits for the next reply to a send on a v1.2 connection: `Ok(id)` for a receipt,
    /// `Err(refusal)` for an ERROR (the connection stays usable for a 422 or 429). Dispatches
    /// that arrive meanwhile are a protocol error: a connection that also consumes reads its
    /// frames with [`Client::recv_frame`].
    pub fn recv_receipt(&mut self) -> Result<Result<String, ClientError>, ClientError> {
        match self.recv_frame()? {
            ServerFrame::Receipt { id, .. } => Ok(Ok(id)),
            ServerFrame::Error { code, text } => Ok(Err(ClientError::Refused { code, text })),
            other => Err(ClientError::Protocol(format!(
                "expected a receipt, got a {}",
                other.kind()
            ))),
        }
    }

    pub fn consume(&mut self, queue: &str, count: u64) -> Result<(), ClientError> {
        let count = count.to_string();
        self.frame(
            MessageType::Consume,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::Count, count.as_bytes()),
            ],
        )
    }

    pub fn ack(&mut self, queue: &str, id: &str) -> Result<(), ClientError> {
        self.frame(
            MessageType::Ack,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::MessageId, id.as_bytes()),
            ],
        )
    }

    /// Writes what is queued. After a failed write what was queued is dropped (the server
    /// will not read it), so that the replies it sent before closing can still be read.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            let written = (&self.stream).write_all(&self.out);
            self.out.clear();
            written?;
        }
        Ok(())
    }

    /// The next dispatch (flushing before it waits, as [`Client::recv_frame`]); any other frame
    /// is [`ClientError::Unexpected`].
    pub fn recv(&mut self) -> Result<Dispatch, ClientError> {
        self.recv_frame()?.into_dispatch()
    }

    /// The next frame from the server, whatever its kind. A frame that only clients send is
    /// [`ClientError::Protocol`]. What is queued for the server is flushed before waiting for
    /// the socket, not before a frame already read is returned: a client that answers each
    /// frame it reads (a receipt with the next send, a dispatch with its ack) then writes its
    /// answers to a burst of frames in one go, as a pipelining client should.
    pub fn recv_frame(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            // v1.2 reads every frame a server sends, to a connection of any dialect.
            let buffered = &self.buf[self.start..self.end];
            match codec::decode_frame_in(buffered, usize::MAX >> 1, Dialect::V12) {
                Ok(Decoded::Frame(frame, used)) => {
                    let got = server_frame(&frame)?;
                    self.start += used;
                    if self.start == self.end {
                        (self.start, self.end) = (0, 0);
                        if self.buf.len() > 4 * READ_CHUNK {
                            // Grown for a large frame: not kept.
                            self.buf = vec![0; READ_CHUNK];
                        }
                    }
                    return Ok(got);
                }
                Ok(Decoded::Incomplete { .. }) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            // Read straight into the buffer's free end: a partial frame moves to the front
            // when room runs short, and the buffer grows only for a frame larger than it.
            if self.buf.len() - self.end < READ_CHUNK / 4 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
                if self.buf.len() - self.end < READ_CHUNK / 4 {
                    self.buf.resize(self.buf.len() * 2, 0);
                }
            }
            self.flush()?;
            let n = (&self.stream).read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.end += n;
        }
    }
}

/// The message client's read buffer: what one read takes at most, usually.
const READ_CHUNK: usize = 64 << 10;

/// Types a decoded frame from the server.
fn server_frame(frame: &Frame<'_>) -> Result<ServerFrame, ClientError> {
    let text = |p| String::from_utf8_lossy(frame.required(p)).into_owned();
    let bad = |p: PacketType| {
        ClientError::Protocol(format!(
            "packet {p} of a {} frame is malformed: {:?}",
            frame.message_type.name(),
            String::from_utf8_lossy(frame.required(p))
        ))
    };
    let number = |p: PacketType| -> Result<u64, ClientError> {
        decimal(frame.required(p)).ok_or_else(|| bad(p))
    };
    Ok(match frame.message_type {
        MessageType::Dispatch => ServerFrame::Dispatch(Dispatch {
            queue: text(PacketType::Queue),
            content: frame.required(PacketType::Content).to_vec(),
            id: text(PacketType::MessageId),
            ttl: frame
                .packet(PacketType::Ttl)
                .and_then(|t| std::str::from_utf8(t).ok()?.parse().ok()),
            deliveries: frame
                .packet(PacketType::Deliveries)
                .map(|d| decimal(d).and_then(|d| u32::try_from(d).ok()))
                .map(|d| d.ok_or_else(|| bad(PacketType::Deliveries)))
                .transpose()?,
        }),
        MessageType::Welcome => ServerFrame::Welcome {
            version: Version::parse(frame.required(PacketType::Version))
                .map_err(|_| bad(PacketType::Version))?,
            features: Features::parse(frame.required(PacketType::Features))
                .map_err(|_| bad(PacketType::Features))?,
        },
        MessageType::Receipt => ServerFrame::Receipt {
            queue: text(PacketType::Queue),
            id: text(PacketType::MessageId),
        },
        MessageType::Error => {
            let code = frame.required(PacketType::ErrorCode);
            ServerFrame::Error {
                code: match decimal(code) {
                    Some(n) if code.len() == 3 => n as u16, // three digits fit
                    _ => return Err(bad(PacketType::ErrorCode)),
                },
                text: text(PacketType::Content),
            }
        }
        MessageType::Counts => {
            let counts = frame.required(PacketType::Counts);
            let values: Option<Vec<u64>> = counts.split(|&b| b == b' ').map(decimal).collect();
            match values.as_deref() {
                Some(&[ready, delayed, in_flight, consumers]) => ServerFrame::Counts {
                    queue: text(PacketType::Queue),
                    ready,
                    delayed,
                    in_flight,
                    consumers,
                },
                _ => return Err(bad(PacketType::Counts)),
            }
        }
        MessageType::Flushed => ServerFrame::Flushed {
            queue: text(PacketType::Queue),
            count: number(PacketType::Count)?,
        },
        MessageType::Send
        | MessageType::Consume
        | MessageType::Ack
        | MessageType::Requeue
        | MessageType::DeadLetter
        | MessageType::Hello
        | MessageType::Touch
        | MessageType::Stats
        | MessageType::Flush => {
            return Err(ClientError::Protocol(format!(
                "message type {}, which only clients send",
                frame.message_type
            )))
        }
    })
}

/// A plain decimal that fits u64: what a server writes in its number packets.
fn decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// A session with the maintenance console: sends a command line, returns the reply.
pub struct Console {
    stream: Stream,
    buf: Vec<u8>,
}

impl Console {
    /// A console greets at once: whatever accepted the connection and says nothing (the
    /// message port given by mistake) is not one, and must not hold a script for good.
    pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

    /// How long a command's reply may take (a status of many queues takes a while).
    pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn connect(addr: &ListenAddr) -> Result<Console, ClientError> {
        let stream = Stream::connect(addr).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(Self::GREETING_TIMEOUT))?;
        let mut console = Console {
            stream,
            buf: Vec::new(),
        };
        match console.read_reply() {
            Ok(_greeting) => {}
            Err(e) if e.is_timeout() => {
                return Err(ClientError::NoGreeting {
                    addr: addr.to_string(),
                })
            }
            Err(e) => return Err(e),
        }
        console.stream.set_read_timeout(Some(Self::REPLY_TIMEOUT))?;
        Ok(console)
    }

    /// Runs one command; the reply without its prompt. A reply starting with `error: ` is
    /// returned as [`ClientError::Console`].
    pub fn command(&mut self, line: &str) -> Result<String, ClientError> {
        (&self.stream).write_all(format!("{line}\n").as_bytes())?;
        let reply = self.read_reply()?;
        match reply.strip_prefix("error: ") {
            Some(message) => Err(ClientError::Console(message.trim_end().to_string())),
            None => Ok(reply),
        }
    }

    fn read_reply(&mut self) -> Result<String, ClientError> {
        let prompt = crate::admin::PROMPT.as_bytes();
        loop {
            if self.buf.ends_with(prompt) {
                let reply = String::from_utf8_lossy(&self.buf[..self.buf.len() - prompt.len()])
                    .into_owned();
                self.buf.clear();
                return Ok(reply);
            }
            let mut chunk = [0u8; 16 << 10];
            let n = (&self.stream).read(&mut chunk)?;
            if n == 0 {
                // A server that turns us away (too many sessions, say) says why before it closes.
                let said = String::from_utf8_lossy(&self.buf);
                return Err(match said.trim().strip_prefix("error: ") {
                    Some(reason) => ClientError::Console(reason.to_string()),
                    None => ClientError::Closed,
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests;
