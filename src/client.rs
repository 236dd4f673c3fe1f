//! Blocking clients for the `phpmq` command line: one for the PHPMQ message endpoint, one
//! for the maintenance console.
//!
//! Writes are buffered: frames go out on [`Client::flush`] or before any blocking read, so a
//! caller can pipeline without thinking about it.

use crate::codec::{self, Decoded, MessageType, PacketType};
use crate::config::ListenAddr;
use crate::net::Stream;
use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

/// A message the server dispatched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub queue: String,
    pub content: Vec<u8>,
    pub id: String,
    pub ttl: Option<u64>,
}

#[derive(Debug)]
pub enum ClientError {
    Connect {
        addr: String,
        source: io::Error,
    },
    Io(io::Error),
    /// The server sent something that is not a dispatch frame.
    Protocol(String),
    /// The server closed the connection.
    Closed,
    /// The console answered with an error.
    Console(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { addr, source } => {
                write!(f, "cannot connect to {addr}: {}", describe(source))
            }
            ClientError::Io(e) => write!(f, "{}", describe(e)),
            ClientError::Protocol(e) => write!(f, "unexpected data from the server: {e}"),
            ClientError::Closed => f.write_str("the server closed the connection"),
            ClientError::Console(e) => f.write_str(e),
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
    buf: Vec<u8>,
    start: usize,
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
            buf: Vec::with_capacity(64 << 10),
            start: 0,
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

    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            (&self.stream).write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Flushes, then waits for the next dispatch.
    pub fn recv(&mut self) -> Result<Dispatch, ClientError> {
        self.flush()?;
        loop {
            match codec::decode_frame(&self.buf[self.start..], usize::MAX >> 1) {
                Ok(Decoded::Frame(frame, used)) => {
                    if frame.message_type != MessageType::Dispatch {
                        return Err(ClientError::Protocol(format!(
                            "message type {}",
                            frame.message_type
                        )));
                    }
                    let text = |p| String::from_utf8_lossy(frame.required(p)).into_owned();
                    let dispatch = Dispatch {
                        queue: text(PacketType::Queue),
                        content: frame.required(PacketType::Content).to_vec(),
                        id: text(PacketType::MessageId),
                        ttl: frame
                            .packet(PacketType::Ttl)
                            .and_then(|t| std::str::from_utf8(t).ok()?.parse().ok()),
                    };
                    self.start += used;
                    return Ok(dispatch);
                }
                Ok(Decoded::Incomplete { .. }) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 64 << 10];
            let n = (&self.stream).read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A session with the maintenance console: sends a command line, returns the reply.
pub struct Console {
    stream: Stream,
    buf: Vec<u8>,
}

impl Console {
    pub fn connect(addr: &ListenAddr) -> Result<Console, ClientError> {
        let stream = Stream::connect(addr).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut console = Console {
            stream,
            buf: Vec::new(),
        };
        console.read_reply()?; // the greeting
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
