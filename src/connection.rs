//! One client connection: reads frames, hands the requests to the hub in batches, and cleans up
//! when the client goes, whatever the reason.
//!
//! Reading is idle-tolerant between frames (unless an idle timeout is set, and then only for
//! connections that never asked to consume) but bounded inside one: once a frame's first byte
//! is in, the rest must arrive within the frame timeout. An idle reader sleeps in `poll` until
//! data arrives or the hub rings the shutdown bell, so idle clients cost nothing; at shutdown it
//! reads what its client already sent and ends once the client has been quiet for `QUIET`, or,
//! if the server hangs up on it first, once it has read what had arrived by then. The writer
//! thread, which takes what direct sends could not, is started only when the connection first
//! asks to consume (from then on any thread may dispatch to it), or when its reader finds output
//! that a direct send left over (a frame other than a dispatch sent to a connection that never
//! consumed): a producer that is never sent anything the socket does not take has no writer.

use crate::broker::ConnId;
use crate::codec::{self, CodecError, Decoded};
use crate::hub::{BrokerDown, Hub, Peer};
use crate::net::{Bell, Readiness, Stream};
use crate::ratelog;
use crate::request::{Request, RequestError};
use log::{debug, info, warn};
use std::fmt;
use std::io;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The read buffer's usual size; it grows for a large frame and shrinks back after it.
const READ_BUFFER: usize = 64 << 10;
/// Most requests applied under one lock: bounds the lock hold time of a pipelining producer.
const MAX_BATCH: usize = 512;
/// Stack size of connection threads: they recurse nowhere and there may be thousands.
pub const THREAD_STACK: usize = 256 << 10;
/// At shutdown, a connection ends once its client has sent nothing for this long.
const QUIET: Duration = Duration::from_millis(100);

/// Limits a connection enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_packet_len: usize,
    pub frame_timeout: Duration,
    /// How long a connection that has never asked to consume may send nothing; `None`: no
    /// limit. A consumer may hold messages or be sent one at any time: it is never idle.
    pub idle_timeout: Option<Duration>,
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed the connection between frames.
    Closed,
    /// The server hung up (shutdown).
    ServerShutdown,
    /// The shutdown hung up on a client still sending, once every whole frame that had
    /// arrived was taken; `partial` bytes of an unfinished frame were dropped.
    HungUp {
        partial: usize,
    },
    Codec(CodecError),
    Request(RequestError),
    /// EOF in the middle of a frame.
    CutOff {
        buffered: usize,
    },
    /// A connection that never asked to consume sent nothing for the idle timeout.
    Idle {
        timeout: Duration,
    },
    /// A frame started but did not finish within the frame timeout.
    Stalled {
        buffered: usize,
        timeout: Duration,
    },
    Io(io::Error),
    WriterSpawn(io::Error),
    BrokerDown(BrokerDown),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed by the client"),
            End::ServerShutdown => f.write_str("closed by the server"),
            End::HungUp { partial: 0 } => {
                f.write_str("hung up at shutdown after taking every whole frame received")
            }
            End::HungUp { partial } => write!(
                f,
                "hung up at shutdown after taking every whole frame received; \
                 {partial} bytes of an unfinished frame dropped"
            ),
            End::Codec(e) => write!(f, "bad frame: {e}"),
            End::Request(e) => write!(f, "bad request: {e}"),
            End::CutOff { buffered } => {
                write!(
                    f,
                    "connection closed in the middle of a frame ({buffered} bytes of it received)"
                )
            }
            End::Idle { timeout } => write!(
                f,
                "closed after {} ms without a frame (idle timeout)",
                timeout.as_millis()
            ),
            End::Stalled { buffered, timeout } => write!(
                f,
                "frame not completed within {} ms ({buffered} bytes of it received)",
                timeout.as_millis()
            ),
            End::Io(e) => write!(f, "read failed: {e}"),
            End::WriterSpawn(e) => write!(f, "cannot start the writer thread: {e}"),
            End::BrokerDown(e) => write!(f, "{e}"),
        }
    }
}

fn label(peer: &Peer) -> String {
    format!("{} (connection {})", peer.name, peer.conn)
}

/// Registers a new client with the hub, before its thread starts: a connection accepted before
/// a shutdown is then always among those the shutdown waits for. `None` (after hanging up) if
/// the server is already closing or the broker is down.
pub fn admit(hub: &Hub, conn: ConnId, stream: Stream, name: String) -> Option<Arc<Peer>> {
    let peer = Arc::new(Peer::new(conn, name, stream));
    match hub.register(conn, peer.clone()) {
        Ok(true) => {
            debug!("{}: connected", label(&peer));
            Some(peer)
        }
        Ok(false) => {
            debug!("{}: server is shutting down, closing", label(&peer));
            peer.hang_up();
            None
        }
        Err(e) => {
            warn!("{}: {e}", label(&peer));
            peer.hang_up();
            None
        }
    }
}

/// Serves one admitted client until it goes; always unregisters it so its held messages are
/// released.
pub fn serve(hub: &Hub, peer: Arc<Peer>, limits: Limits) {
    let conn = peer.conn;
    let label = label(&peer);
    let registration = Registration {
        hub,
        conn,
        peer: peer.clone(),
        label: label.clone(),
    };
    // The writer (started on the first consume request or the first output left over) is a
    // scoped thread: it can call the hub, and it is always joined before this function returns.
    thread::scope(|scope| {
        let mut session = Session {
            hub,
            conn,
            peer: peer.clone(),
            writer_started: false,
            consumer: false,
            label: label.clone(),
            scope,
        };
        let end = session.read_loop(limits);
        // Unregister first: the held messages go to other consumers before this socket closes.
        // Hanging up also ends the writer.
        drop(registration);
        // Logged once the connection's messages are released, so the line means "done".
        match &end {
            End::Closed => debug!("{label}: disconnected"),
            End::ServerShutdown | End::HungUp { partial: 0 } => {
                debug!("{label}: closed for shutdown")
            }
            End::HungUp { .. } => info!("{label}: {end}"),
            // Clients can cause these at will: rate-limited, with a count of what was not logged.
            End::Io(e) if is_disconnect(e) => {
                if let Some(suppressed) = ratelog::DISCONNECTED.admit() {
                    info!("{label}: disconnected: {e}{suppressed}");
                }
            }
            End::Idle { .. } => {
                if let Some(suppressed) = ratelog::IDLE.admit() {
                    info!("{label}: {end}{suppressed}");
                }
            }
            End::BrokerDown(_) => {}
            _ => {
                if let Some(suppressed) = ratelog::CONNECTION_CLOSED.admit() {
                    warn!("{label}: closing connection: {end}{suppressed}");
                }
            }
        }
    });
}

/// Unregisters the connection and hangs up when dropped, also when its thread panics, so what
/// it held is never stranded.
struct Registration<'a> {
    hub: &'a Hub,
    conn: ConnId,
    peer: Arc<Peer>,
    label: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.hub.unregister(self.conn) {
            warn!("{}: {e}", self.label);
        }
        self.peer.hang_up();
    }
}

/// Hangs up when dropped: a writer thread that ends for any reason, a panic included, takes
/// its connection with it instead of leaving a consumer that silently receives nothing.
struct HangUpOnExit(Arc<Peer>);

impl Drop for HangUpOnExit {
    fn drop(&mut self) {
        self.0.hang_up();
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

struct Session<'scope, 'env> {
    hub: &'env Hub,
    conn: ConnId,
    peer: Arc<Peer>,
    writer_started: bool,
    /// It asked to consume: never idle from then on.
    consumer: bool,
    label: String,
    scope: &'scope thread::Scope<'scope, 'env>,
}

impl Session<'_, '_> {
    fn read_loop(&mut self, limits: Limits) -> End {
        let mut reader = FrameReader::new(limits);
        let stream = self.peer.stream.clone();
        loop {
            let mut batch = Vec::new();
            let parsed = loop {
                if batch.len() == MAX_BATCH {
                    break Ok(());
                }
                match reader.next_request() {
                    Ok(Some(request)) => batch.push(request),
                    Ok(None) => break Ok(()),
                    Err(end) => break Err(end),
                }
            };
            // Requests before a bad frame are still honoured: nothing accepted is lost.
            if let Err(end) = self.apply(batch) {
                return end;
            }
            if let Err(end) = parsed {
                return end;
            }
            if reader.has_whole_frames_pending() {
                continue;
            }
            // Only a connection that never asked to consume can be idle: a consumer may hold
            // messages, or be waiting for the next one.
            let idle_timeout = limits.idle_timeout.filter(|_| !self.consumer);
            match reader.fill(&stream, &self.peer, self.hub.bell(), idle_timeout) {
                Ok(true) => {}
                Err(end @ End::HungUp { .. }) => return end,
                _ if self.peer.is_closing() => return End::ServerShutdown,
                Ok(false) => return End::Closed,
                Err(end) => return end,
            }
        }
    }

    fn apply(&mut self, batch: Vec<Request>) -> Result<(), End> {
        if batch.is_empty() {
            return self.start_writer_if_pending();
        }
        // A consumer may be sent a dispatch at any time from now on, by any thread: its writer
        // must be there before the first one that the socket does not take.
        if !self.consumer && batch.iter().any(|r| matches!(r, Request::Consume { .. })) {
            self.consumer = true;
            if !self.writer_started {
                self.start_writer()?;
            }
        }
        if batch.iter().any(|r| matches!(r, Request::Send { .. })) {
            self.hub.wait_for_store(&self.peer);
        }
        // The dialect is the wire's business: noted before the broker decides anything.
        for request in &batch {
            self.peer.note_dialect(request);
        }
        self.hub.apply(self.conn, batch).map_err(End::BrokerDown)?;
        self.start_writer_if_pending()
    }

    /// Starts the writer once the connection has output that a direct send did not take (a
    /// frame other than a dispatch, such as a reply to one of its own requests).
    fn start_writer_if_pending(&mut self) -> Result<(), End> {
        if self.writer_started || self.peer.outbox.pending_len() == 0 {
            return Ok(());
        }
        self.start_writer()
    }

    fn start_writer(&mut self) -> Result<(), End> {
        let peer = self.peer.clone();
        let label = self.label.clone();
        let hub = self.hub;
        thread::Builder::new()
            .name(format!("phpmq-write-{}", self.conn))
            .stack_size(THREAD_STACK)
            .spawn_scoped(self.scope, move || {
                let peer = HangUpOnExit(peer);
                let written = peer.0.outbox.write_loop(&*peer.0.stream, || {
                    if let Err(e) = hub.resume_if_drained(&peer.0) {
                        warn!("{label}: {e}");
                    }
                });
                if let Err(e) = written {
                    if let Some(suppressed) = ratelog::DISCONNECTED.admit() {
                        info!("{label}: write failed: {e}{suppressed}");
                    }
                }
            })
            .map_err(End::WriterSpawn)?;
        self.writer_started = true;
        Ok(())
    }
}

/// Accumulates bytes from the socket and cuts them into requests.
struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes from `start` that the frame in progress needs in all, as far as known.
    needed: usize,
    limits: Limits,
    /// When the frame in progress must be complete.
    deadline: Option<Instant>,
    /// The last read filled the buffer: more is probably waiting, so read before sleeping.
    likely_more: bool,
    /// Set when a whole frame is buffered but the batch was full.
    more_pending: bool,
    /// After the shutdown's hang-up: the bytes that had arrived by then and are still to read.
    left_at_hang_up: Option<usize>,
    /// When bytes last arrived (or the connection started): the idle timeout runs from here.
    last_arrival: Instant,
}

impl FrameReader {
    fn new(limits: Limits) -> FrameReader {
        FrameReader {
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            needed: codec::HEADER_LEN,
            limits,
            deadline: None,
            likely_more: false,
            more_pending: false,
            left_at_hang_up: None,
            last_arrival: Instant::now(),
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn has_whole_frames_pending(&self) -> bool {
        self.more_pending
    }

    /// The next whole request in the buffer, if there is one.
    fn next_request(&mut self) -> Result<Option<Request>, End> {
        self.more_pending = false;
        let decoded =
            codec::decode_frame(&self.buf[self.start..self.end], self.limits.max_packet_len)
                .map_err(End::Codec)?;
        match decoded {
            Decoded::Frame(frame, used) => {
                let request = Request::from_frame(&frame).map_err(End::Request)?;
                self.start += used;
                self.needed = codec::HEADER_LEN;
                self.deadline = None;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                    if self.buf.len() > 4 * READ_BUFFER {
                        self.buf = vec![0; READ_BUFFER];
                    }
                } else {
                    // Assume the caller's batch may end here; it asks again if not.
                    self.more_pending = true;
                }
                Ok(Some(request))
            }
            Decoded::Incomplete { needed } => {
                self.needed = needed;
                Ok(None)
            }
        }
    }

    /// Reads once more from the socket. `Ok(false)`: the peer closed between frames. While
    /// the server is closing, a connection ends once its client has been quiet for [`QUIET`].
    /// Between frames, `idle_timeout` (if any) bounds the wait for the next one.
    fn fill(
        &mut self,
        stream: &Stream,
        peer: &Peer,
        bell: &Bell,
        idle_timeout: Option<Duration>,
    ) -> Result<bool, End> {
        self.more_pending = false;
        loop {
            if peer.hung_up.load(std::sync::atomic::Ordering::SeqCst) {
                return self.fill_after_hang_up(stream);
            }
            let buffered = self.buffered();
            let closing = peer.is_closing();
            let now = Instant::now();
            let deadline = (buffered > 0).then(|| {
                *self
                    .deadline
                    .get_or_insert_with(|| now + self.limits.frame_timeout)
            });
            if deadline.is_some_and(|d| now >= d) {
                return Err(End::Stalled {
                    buffered,
                    timeout: self.limits.frame_timeout,
                });
            }
            let idle_deadline = idle_timeout
                .filter(|_| buffered == 0 && !closing)
                .map(|t| (t, self.last_arrival + t));
            if let Some((timeout, _)) = idle_deadline.filter(|&(_, d)| now >= d) {
                return Err(End::Idle { timeout });
            }
            self.make_room();
            // A busy client has more waiting: read at once. Otherwise sleep first; waking costs
            // nothing until there is data or the shutdown bell rings.
            if !self.likely_more {
                let timeout = match (closing, deadline.or(idle_deadline.map(|(_, d)| d))) {
                    (true, _) => Some(QUIET),
                    (false, Some(d)) => Some(d.saturating_duration_since(now)),
                    (false, None) => None,
                };
                let ring = (!closing).then_some(bell);
                match stream.wait_readable(ring, timeout).map_err(End::Io)? {
                    Readiness::Readable => {}
                    Readiness::Bell => {
                        peer.closing
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Readiness::TimedOut if closing && buffered == 0 => {
                        return Err(End::ServerShutdown)
                    }
                    // The frame or idle deadline (checked above) or, while closing, a partial
                    // frame.
                    Readiness::TimedOut => continue,
                }
            }
            let space = self.buf.len() - self.end;
            match stream.recv_now(&mut self.buf[self.end..]) {
                Ok(0) if buffered == 0 => return Ok(false),
                Ok(0) => return Err(End::CutOff { buffered }),
                Ok(n) => {
                    self.end += n;
                    self.likely_more = n == space;
                    self.last_arrival = Instant::now();
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.likely_more = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// Reads, without waiting, only what had arrived when the server hung up (its read side
    /// is shut, so on a Unix socket nothing more can come; a TCP client may still be sending,
    /// and that is not waited for). Ends with [`End::HungUp`] once it is all read.
    fn fill_after_hang_up(&mut self, stream: &Stream) -> Result<bool, End> {
        let buffered = self.buffered();
        let hung_up = End::HungUp { partial: buffered };
        let left = match self.left_at_hang_up {
            Some(left) => left,
            // Unknown (it never fails on a socket): nothing more is read.
            None => *self
                .left_at_hang_up
                .insert(stream.queued_len().unwrap_or(0)),
        };
        if left == 0 {
            return Err(hung_up);
        }
        self.make_room();
        let room = (self.buf.len() - self.end).min(left);
        loop {
            match stream.recv_now(&mut self.buf[self.end..self.end + room]) {
                Ok(0) => return Err(hung_up),
                Ok(n) => {
                    self.end += n;
                    self.left_at_hang_up = Some(left - n);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(hung_up),
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// Ensures the buffer has space after `end`. It grows with what has arrived, at most
    /// doubling at a time and never beyond what the frame in progress needs: a header that
    /// declares 16 MiB commits no memory until the bytes come.
    fn make_room(&mut self) {
        let buffered = self.buffered();
        let wanted = grown_size(self.buf.len(), buffered, self.needed);
        if self.buf.len() - self.start < wanted || self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = buffered;
        }
        if self.buf.len() < wanted {
            self.buf.resize(wanted, 0);
        }
    }
}

/// How long the buffer must be for the next read, with `buffered` bytes of a frame that needs
/// `needed` in all: the usual size while that leaves room, and once the buffer is full, twice
/// what is there, capped at what the frame needs (always at least one byte of room).
fn grown_size(len: usize, buffered: usize, needed: usize) -> usize {
    let wanted = if buffered < len {
        buffered + 1
    } else {
        buffered.saturating_mul(2).min(needed).max(buffered + 1)
    };
    wanted.max(READ_BUFFER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_grows_with_what_arrived_not_with_what_was_declared() {
        let declared = 16 << 20;
        assert_eq!(grown_size(READ_BUFFER, 40, declared), READ_BUFFER);
        assert_eq!(
            grown_size(READ_BUFFER, READ_BUFFER, declared),
            2 * READ_BUFFER
        );
        assert_eq!(grown_size(8 << 20, 8 << 20, declared), declared);
        assert_eq!(grown_size(declared, declared - 1, declared), declared);
        // A frame that needs little more than what is there gets just that.
        assert_eq!(
            grown_size(READ_BUFFER, READ_BUFFER, READ_BUFFER + 10),
            READ_BUFFER + 10
        );
    }
}
