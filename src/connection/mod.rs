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

mod budget;
mod reader;

use crate::broker::{ConnId, EndedBy};
use crate::codec::CodecError;
use crate::hello::{self, Feature};
use crate::hub::{
    BrokerDown, Hub, Incoming, Peer, Replies, OUTBOX_HIGH_WATER, OUTBOX_LOW_WATER,
    STORE_WAIT_RECHECK,
};
use crate::net::Stream;
use crate::ratelog;
use crate::refusal::Refusal;
use crate::request::{Request, RequestError};
pub use budget::{least_frame_budget, FrameBudget, DEFAULT_FRAME_BUDGET};
use log::{debug, info, warn};
use reader::FrameReader;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// The read buffer's usual size; it grows for a large frame and shrinks back after it.
const READ_BUFFER: usize = 64 << 10;
/// Most requests applied under one lock: bounds the lock hold time of a pipelining producer.
const MAX_BATCH: usize = 512;
/// Stack size of connection threads: they recurse nowhere and there may be thousands.
pub const THREAD_STACK: usize = 256 << 10;
/// At shutdown, a connection ends once its client has sent nothing for this long.
const QUIET: Duration = Duration::from_millis(100);
/// When a connection ends, how long it waits for the sync its durable receipts need.
const DURABLE_SETTLE: Duration = Duration::from_secs(2);
/// How long the replies queued for a closing connection (and its ERROR) may take to leave.
const DRAIN_BEFORE_CLOSE: Duration = Duration::from_secs(1);

/// Limits a connection enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Memory for frames still arriving, shared by every connection.
    pub frame_budget: Arc<FrameBudget>,
    /// `--max-message-size`: the content packet's limit, and a cap on every other packet's
    /// own ([`crate::codec::PacketType::max_len`]).
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
    /// A write to the client failed (it went away), and the reader then took what the client
    /// had sent before it went.
    WriteFailed,
    /// The shutdown hung up on a client still sending, once every whole frame that had
    /// arrived was taken; `partial` bytes of an unfinished frame were dropped.
    HungUp {
        partial: usize,
    },
    /// Bytes that are not a frame, and how to answer them (v1.2 rule 4).
    Codec(CodecError, Refusal),
    /// A frame that is not a valid request, and how to answer it.
    Request(RequestError, Refusal),
    /// A HELLO that is not the first frame, or for no version we speak (rule 1).
    Hello(Refusal),
    /// A send the broker did not take (a full queue, a stop), on a v1.0 or v1.1 connection,
    /// which cannot be told otherwise.
    SendRefused(Refusal),
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
    /// Its frame waited for its share of the memory for frames under way until its timeout.
    NoFrameMemory {
        needed: usize,
        budget: usize,
        timeout: Duration,
    },
    Io(io::Error),
    WriterSpawn(io::Error),
    BrokerDown(BrokerDown),
}

impl End {
    /// How a connection that is closing ([`Peer::is_closing`]) ends.
    fn closing(peer: &Peer) -> End {
        if peer.client_went_away() {
            End::WriteFailed
        } else {
            End::ServerShutdown
        }
    }

    /// Who ended the connection: the server's own closes (a stop, a refused send a v1
    /// client cannot be told of, a writer it could not start) do not count as failed tries
    /// of what the connection held.
    fn ended_by(&self) -> EndedBy {
        match self {
            End::ServerShutdown
            | End::HungUp { .. }
            | End::SendRefused(_)
            | End::WriterSpawn(_)
            | End::NoFrameMemory { .. }
            | End::BrokerDown(_) => EndedBy::Server,
            _ => EndedBy::Client,
        }
    }

    /// The ERROR frame owed to the client before the connection closes, if any.
    fn refusal(&self) -> Option<&Refusal> {
        match self {
            End::Codec(_, refusal)
            | End::Request(_, refusal)
            | End::Hello(refusal)
            | End::SendRefused(refusal) => Some(refusal).filter(|r| r.reply),
            _ => None,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed by the client"),
            End::ServerShutdown => f.write_str("closed by the server"),
            End::WriteFailed => f.write_str("the client went away (a write to it failed)"),
            End::HungUp { partial: 0 } => {
                f.write_str("hung up at shutdown after taking every whole frame received")
            }
            End::HungUp { partial } => write!(
                f,
                "hung up at shutdown after taking every whole frame received; \
                 {partial} bytes of an unfinished frame dropped"
            ),
            End::Codec(e, _) => write!(f, "bad frame: {e}"),
            End::Request(e, _) => write!(f, "bad request: {e}"),
            End::Hello(refusal) => write!(f, "bad HELLO: {}", refusal.text),
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
            End::NoFrameMemory {
                needed,
                budget,
                timeout,
            } => write!(
                f,
                "frame of {needed} bytes not read within {} ms: the {budget} bytes the server \
                 gives frames under way (all connections together) stayed taken",
                timeout.as_millis()
            ),
            End::Io(e) => write!(f, "read failed: {e}"),
            End::WriterSpawn(e) => write!(f, "cannot start the writer thread: {e}"),
            End::SendRefused(refusal) => write!(
                f,
                "send not taken ({} {}); a v1.0/v1.1 client cannot be told otherwise",
                refusal.code.code(),
                refusal.text
            ),
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
    let mut registration = Registration {
        hub,
        conn,
        peer: peer.clone(),
        label: label.clone(),
        ended_by: EndedBy::Client,
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
            frames: 0,
            replies: Replies::None,
            label: label.clone(),
            scope,
        };
        let end = session.read_loop(limits);
        // Whatever ended it, what it sent was taken: the durable receipts owed for it are
        // worth the wait for one more sync (and come before an ERROR), or the client would
        // send those messages again. A client that half-closed still reads them.
        if session.replies == Replies::Durable {
            hub.settle_durable(&peer, DURABLE_SETTLE);
        }
        // A v1.2 client (or one that sent a HELLO) learns why, before the close.
        let refused = end.refusal().and_then(Refusal::frame);
        let told = refused.is_some_and(|frame| hub.send(vec![(conn, frame)]).is_ok());
        // Replies (and the ERROR) still queued are written out before the close, which would
        // drop them: bounded, for a client that does not read.
        if (told || session.replies != Replies::None) && session.start_writer_if_pending().is_ok() {
            peer.outbox.wait_until_written(DRAIN_BEFORE_CLOSE);
        }
        if told {
            // The reply must not be cut off by a reset for what the client sent after it.
            let _ = peer.stream.shutdown(std::net::Shutdown::Write);
        }
        // Unregister first: the held messages go to other consumers before this socket closes.
        // Hanging up also ends the writer.
        registration.ended_by = end.ended_by();
        drop(registration);
        // Logged once the connection's messages are released, so the line means "done".
        match &end {
            // The writer logged why.
            End::Closed | End::WriteFailed => debug!("{label}: disconnected"),
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
    /// Who ended it, for what it held: its client unless known otherwise (a panic, say).
    ended_by: EndedBy,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.hub.unregister(self.conn, self.ended_by) {
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
    /// Frames read so far: a HELLO must be the first.
    frames: u64,
    /// What it is told about its own requests (v1.2: receipts, maybe durable).
    replies: Replies,
    label: String,
    scope: &'scope thread::Scope<'scope, 'env>,
}

impl Session<'_, '_> {
    fn read_loop(&mut self, limits: Limits) -> End {
        let mut reader = FrameReader::new(limits.clone());
        let stream = self.peer.stream.clone();
        loop {
            let mut batch = Vec::new();
            let parsed = loop {
                if batch.len() == MAX_BATCH {
                    break Ok(());
                }
                match reader.next_request(self.peer.dialect()) {
                    Ok(Some(Incoming::Request(Request::Hello {
                        version, features, ..
                    }))) => {
                        // Answered at once: it is the first frame, so nothing is before it,
                        // and the frames after it are read in the dialect it agrees on.
                        self.frames += 1;
                        if let Err(end) = self.hello(version, features) {
                            break Err(end);
                        }
                    }
                    Ok(Some(item)) => {
                        self.frames += 1;
                        batch.push(item);
                    }
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
            // Its own output backed up (replies it does not read, or dispatches): read nothing
            // more from it until that drains, so what it makes the server hold stays bounded;
            // the kernel's flow control then holds the client back.
            // Only for a v1.2 connection (the others get no replies). A consumer's backlog is
            // mostly dispatches, which stop at the mark (and at most one burst past it), and it
            // must still be read to drain them (its acks): its mark is past what dispatches
            // alone can queue, so only replies it does not read (a STATS flood) reach it.
            let mark = if self.consumer {
                3 * OUTBOX_HIGH_WATER + limits.max_packet_len
            } else {
                OUTBOX_HIGH_WATER
            };
            while self.replies != Replies::None
                && self.peer.outbox.pending_len() > mark
                && !self.peer.is_closing()
            {
                self.peer
                    .outbox
                    .wait_until_at_most(OUTBOX_LOW_WATER, STORE_WAIT_RECHECK);
            }
            // Durable receipts that wait for syncs which do not come (a failing disk): read no
            // more sends until they go out.
            if self.replies == Replies::Durable {
                self.hub.wait_for_durable_room(&self.peer);
            }
            // Only a connection that never asked to consume can be idle: a consumer may hold
            // messages, or be waiting for the next one.
            let idle_timeout = limits.idle_timeout.filter(|_| !self.consumer);
            match reader.fill(&stream, &self.peer, self.hub.bell(), idle_timeout) {
                Ok(true) => {}
                Err(end @ End::HungUp { .. }) => return end,
                _ if self.peer.is_closing() => return End::closing(&self.peer),
                Ok(false) => return End::Closed,
                Err(end) => return end,
            }
        }
    }

    /// Answers a HELLO (rule 1): WELCOME and the agreed dialect if it is the first frame and
    /// names a version we speak; otherwise ERROR 400 and the connection closes.
    fn hello(&mut self, version: hello::Version, wanted: hello::Features) -> Result<(), End> {
        if self.frames > 1 {
            return Err(End::Hello(Refusal::hello(
                "HELLO is allowed only as the first frame of a connection",
            )));
        }
        let served = self.hub.served();
        let (dialect, welcome) = hello::respond(version, served)
            .map_err(|e| End::Hello(Refusal::hello(e.to_string())))?;
        // Before the WELCOME is encoded: it and everything after it speak the new dialect.
        self.peer.set_dialect(dialect);
        self.hub
            .send(vec![(self.conn, welcome)])
            .map_err(End::BrokerDown)?;
        if dialect.is_v12() {
            self.replies = if wanted.contains(Feature::Durable) && served.contains(Feature::Durable)
            {
                Replies::Durable
            } else {
                Replies::Receipts
            };
        }
        // Durable receipts are written from storage's thread whenever a sync completes: what
        // the socket does not take then needs the writer.
        if self.replies == Replies::Durable && !self.writer_started {
            return self.start_writer();
        }
        self.start_writer_if_pending()
    }

    fn apply(&mut self, batch: Vec<Incoming>) -> Result<(), End> {
        if batch.is_empty() {
            return self.start_writer_if_pending();
        }
        let requests = || {
            batch.iter().filter_map(|item| match item {
                Incoming::Request(request) => Some(request),
                Incoming::Refused(_) => None,
            })
        };
        // A consumer may be sent a dispatch at any time from now on, by any thread: its writer
        // must be there before the first one that the socket does not take.
        // A count of 0 asks for nothing: it does not make a connection a consumer (nor exempt
        // it from the idle timeout).
        let consumes = |r: &Request| matches!(r, Request::Consume { count, .. } if *count > 0);
        if !self.consumer && requests().any(consumes) {
            self.consumer = true;
            if !self.writer_started {
                self.start_writer()?;
            }
        }
        let (sends, bytes) = requests().fold((0, 0), |(n, b), r| match r {
            Request::Send { content, .. } => (n + 1, b + content.len()),
            _ => (n, b),
        });
        if sends > 0 {
            self.hub.wait_for_store(&self.peer, sends, bytes);
        }
        // The dialect is the wire's business: noted before the broker decides anything.
        for request in requests() {
            self.peer.note_dialect(request);
        }
        let refused = self
            .hub
            .apply(self.conn, batch, self.replies)
            .map_err(End::BrokerDown)?;
        if let Some(refusal) = refused {
            return Err(End::SendRefused(refusal));
        }
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
                    // Before the hang-up below: the reader then learns why it closes.
                    peer.0
                        .write_failed
                        .store(true, std::sync::atomic::Ordering::SeqCst);
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
