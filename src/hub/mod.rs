//! The shared broker: the one lock around the broker core, the registry of connected peers,
//! and the fan-out of outgoing frames (the broker's deliveries, or any [`Outgoing`] sent to a
//! registered connection) to their outboxes after the lock is released.
//!
//! On a v1.2 connection every send, STATS and FLUSH gets exactly one reply, in order (rule 3):
//! [`Hub::apply`] places each reply before the dispatches its request caused, so a RECEIPT is
//! written before any dispatch of that message to the same connection. A connection that asked
//! for durable receipts (rule 8) has its replies queued on its [`Peer`] instead, each with the
//! store ticket it waits for; they go out in order as storage reports its syncs
//! ([`Hub::release_durable`]).
//!
//! Nothing here writes to a socket or waits on one while the lock is held. A poisoned lock (a
//! thread panicked inside the broker, whose state may then be half-changed) is fatal: it is
//! reported once on the fatal channel and the server shuts down rather than run half-alive.

use crate::broker::{Broker, ConnId, Delivery, EndedBy, EXPIRE_BATCH};
use crate::codec::Dialect;
use crate::hello::Features;
use crate::refusal::Refusal;
use crate::storage::Durability;
use std::collections::VecDeque;
use timer::SweepPlan;
// Re-exported: every caller of the hub meets it.
pub use crate::fatal::BrokerDown;
use crate::fatal::Fatal;
use crate::id::IdMap;
use crate::net::{Bell, Stream};
use crate::outbox::Outbox;
use crate::outgoing::Outgoing;
use crate::request::Request;
use crate::store::{now_millis, Backlog, Millis};
use crossbeam_channel::Sender;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Output backed up beyond this pauses deliveries to the connection (its client is not
/// reading): what it would get stays ready for others, and memory stays bounded.
pub const OUTBOX_HIGH_WATER: usize = 16 << 20;
// The broker pauses a consumer it hands this much in one call, as the writer would.
const _: () = assert!(OUTBOX_HIGH_WATER == crate::broker::DISPATCH_BURST_BYTES);
/// Deliveries resume once the backlog is down to this.
pub const OUTBOX_LOW_WATER: usize = 4 << 20;

/// How often a producer held back by the store re-checks, unasked, whether its connection is
/// closing for a reason that does not wake it (a failed write; a shutdown does wake it).
pub const STORE_WAIT_RECHECK: Duration = Duration::from_millis(50);

/// About the longest [`Hub::pace_bulk_work`] waits for the store before one chunk of the
/// server's own bulk work (its end is seen within [`STORE_WAIT_RECHECK`]): a store that does
/// not catch up (a slow disk) slows such work down, never stops it.
pub const BULK_PACE_MAX: Duration = Duration::from_millis(100);

/// A connected client as the rest of the server sees it.
#[derive(Debug)]
pub struct Peer {
    pub conn: ConnId,
    pub name: String,
    pub stream: Arc<Stream>,
    pub outbox: Outbox,
    /// Set at shutdown: read what the client already sent, then end.
    pub closing: AtomicBool,
    /// Deliveries to it are paused: its output backed up. The one flag: the broker's record of
    /// the connection shares it ([`Broker::connect_with_pause_flag`]) and alone writes it,
    /// under the lock ([`Broker::set_paused`]); the writer reads it here after every write.
    pub paused: Arc<AtomicBool>,
    /// The [`Dialect`] the connection speaks ([`Dialect::to_u8`]), which decides what its
    /// frames show: v1.0 until it sends a request that exists only in v1.1
    /// ([`Request::shows_v11`]), after which its dispatches show the remaining TTL (the
    /// released v1.0 client reads exactly three packets after a `003` and breaks on a fourth,
    /// so until then they never do); v1.2 only once a HELLO agreed on it.
    dialect: AtomicU8,
    /// Set at the shutdown's hang-up ([`Peer::stop_reading`]): take the whole frames that
    /// already arrived, then end.
    pub hung_up: AtomicBool,
    /// A write to the client failed (it went away): the connection is closing, by its
    /// client's doing, not the server's.
    pub write_failed: AtomicBool,
    /// Replies of a connection with durable receipts, in order, each with the store ticket
    /// it waits for (0: none, it only waits for those before it).
    durable_replies: Mutex<VecDeque<(u64, Outgoing)>>,
    /// Signalled whenever durable replies are written out.
    durable_released: std::sync::Condvar,
}

impl Peer {
    pub fn new(conn: ConnId, name: String, stream: Stream) -> Peer {
        Peer {
            conn,
            paused: Arc::new(AtomicBool::new(false)),
            dialect: AtomicU8::new(Dialect::V10.to_u8()),
            name,
            stream: Arc::new(stream),
            outbox: Outbox::new(),
            closing: AtomicBool::new(false),
            hung_up: AtomicBool::new(false),
            write_failed: AtomicBool::new(false),
            durable_replies: Mutex::default(),
            durable_released: std::sync::Condvar::new(),
        }
    }

    /// Notes the dialect a request shows, before it reaches the broker: dispatches it causes
    /// already show the TTL.
    pub fn note_dialect(&self, request: &Request) {
        if request.shows_v11() {
            // Only v1.0 moves up: v1.1 already shows the TTL, and v1.2 more.
            let _ = self.dialect.compare_exchange(
                Dialect::V10.to_u8(),
                Dialect::V11.to_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The dialect the connection speaks now.
    pub fn dialect(&self) -> Dialect {
        // Only `Dialect::to_u8` values are ever stored.
        Dialect::from_u8(self.dialect.load(Ordering::Acquire)).unwrap_or(Dialect::V10)
    }

    /// Sets the dialect a HELLO agreed on, before the WELCOME and anything after it is encoded.
    pub fn set_dialect(&self, dialect: Dialect) {
        self.dialect.store(dialect.to_u8(), Ordering::Release);
    }

    /// Whether the server is ending this connection (shutdown or a failed write).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed) || self.outbox.is_closed()
    }

    /// Whether a closing connection's client ended it: its writer found it gone, and the
    /// server is not shutting down. What it held then counts as a failed try (rule 8), as
    /// for any disconnect; a writer that ended otherwise (a panic) is the server's doing.
    pub fn client_went_away(&self) -> bool {
        self.write_failed.load(Ordering::SeqCst) && !self.closing.load(Ordering::Relaxed)
    }

    /// Ends the connection from outside: its blocked read returns and its thread cleans up.
    pub fn hang_up(&self) {
        self.outbox.close();
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The shutdown's hang-up on a client still sending: shuts the read side only, which
    /// discards nothing already received and (on a Unix socket) makes the client's further
    /// writes fail, so its reader can still take every whole frame that arrived before this.
    /// (`shutdown(Both)` would also do for Unix sockets, but a TCP client then keeps sending,
    /// its data is answered by a reset, and the reset loses what the server had not read.)
    /// The outbox stays open until the reader is done: a writer that ended now would hang up
    /// in full.
    pub fn stop_reading(&self) {
        let _ = self.stream.shutdown(Shutdown::Read);
        // After the shutdown: what the reader then finds queued is all it will take.
        self.hung_up.store(true, Ordering::SeqCst);
    }
}

struct State {
    broker: Broker,
    peers: IdMap<ConnId, Arc<Peer>>,
    /// False once shutdown began: late connections are turned away.
    open: bool,
}

/// The most sends in one batch of a producer that the store's backpressure does not hold back
/// below its ceiling ([`Hub::wait_for_store`]). A stream of messages arrives many to a read.
pub const LIGHT_BATCH: usize = 4;
/// ...and the most content bytes in it: a flood of large messages arrives few to a read.
pub const LIGHT_BYTES: usize = 64 << 10;

/// The longest pause between two sweeps while expired messages are left to drop: short of
/// the 250 ms a lease may be taken back late (v1.2 rule 7).
const EXPIRY_PAUSE: Duration = Duration::from_millis(50);

pub struct Hub {
    state: Mutex<State>,
    fatal: Sender<Fatal>,
    /// Rung once shutdown begins, to wake every idle reader at once.
    bell: Bell,
    /// The store's unapplied changes, if messages are persisted.
    store_backlogs: Vec<Arc<Backlog>>,
    /// The v1.2 features this server serves (rule 8), listed in every WELCOME.
    served: Features,
    /// Tells when changes are on disk, if storage can: durable receipts wait for it.
    durability: Option<Arc<dyn Durability>>,
    /// Connections with durable replies waiting.
    durable_waiting: Mutex<IdMap<ConnId, Arc<Peer>>>,
    /// When the sweeper sweeps next; a deadline before that (a short delay or lease) wakes
    /// it as the lock is let go.
    sweep_plan: SweepPlan,
}

/// The hub's state, locked. As the lock is let go, a deadline the broker got before the
/// sweeper's planned sweep wakes the sweeper, whichever path set it.
/// The sweeper's own lock has no plan to compare with: it plans as it sweeps.
struct Locked<'a> {
    /// Held until dropped; taken out there so that the sweeper is woken after the lock is let
    /// go, not under it.
    state: Option<MutexGuard<'a, State>>,
    sweep_plan: Option<&'a SweepPlan>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.state.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.state.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let wake = self
            .sweep_plan
            .is_some_and(|plan| plan.note(state.broker.next_deadline()));
        drop(state);
        if let (true, Some(plan)) = (wake, self.sweep_plan) {
            plan.wake();
        }
    }
}

/// What a connection is told about its own requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replies {
    /// v1.0 and v1.1: nothing.
    None,
    /// v1.2: a reply to each send, STATS and FLUSH, and an ERROR for each refused one.
    Receipts,
    /// v1.2 with `durable`: as `Receipts`, each RECEIPT sent once its message is on disk.
    Durable,
}

/// A connection's frame as the hub applies it: a request, or one that was refused but
/// leaves the connection open (it gets its ERROR in its turn).
#[derive(Debug)]
pub enum Incoming {
    Request(Request),
    Refused(Refusal),
}

impl Hub {
    pub fn new(broker: Broker, fatal: Sender<Fatal>, bell: Bell) -> Hub {
        Hub {
            state: Mutex::new(State {
                broker,
                peers: IdMap::default(),
                open: true,
            }),
            fatal,
            bell,
            store_backlogs: Vec::new(),
            served: Features::served(false, false),
            durability: None,
            durable_waiting: Mutex::default(),
            sweep_plan: SweepPlan::default(),
        }
    }

    /// Receives a message when the broker got a deadline before the sweeper's planned sweep:
    /// the sweeper then sweeps at once and plans anew.
    pub fn timer_wake_ups(&self) -> &crossbeam_channel::Receiver<()> {
        self.sweep_plan.wake_ups()
    }

    /// Serves v1.2 with these features; `durability` (if storage has one) backs durable
    /// receipts, which are then served too.
    pub fn with_v12(mut self, dead_letter: bool, durability: Option<Arc<dyn Durability>>) -> Hub {
        self.served = Features::served(dead_letter, durability.is_some());
        self.durability = durability;
        self
    }

    /// The v1.2 features served, for WELCOME.
    pub fn served(&self) -> Features {
        self.served
    }

    /// Holds producers back while this store backlog is high ([`Hub::wait_for_store`]).
    pub fn with_store_backlogs(mut self, backlogs: Vec<Arc<Backlog>>) -> Hub {
        self.store_backlogs = backlogs;
        self
    }

    /// Waits, before a producer's messages are taken, while the store is far behind (its
    /// writer, or its mirror during a flood): what it has not taken is held in memory, so a
    /// store that cannot keep up slows the producers down rather than letting memory grow
    /// without bound. Returns at once when every backlog is below its high-water mark (nearly
    /// always); once one is above, sleeps until all are down to half (their owners signal
    /// that), or the connection is closing ([`Hub::begin_close`] wakes it to see that; other
    /// reasons, such as a failed write, are seen within [`STORE_WAIT_RECHECK`]).
    ///
    /// A light producer (a batch of at most [`LIGHT_BATCH`] sends and [`LIGHT_BYTES`] of
    /// content: a web request handing over a job, say) is not held back for another's flood,
    /// unless a backlog is past twice its mark: the flood waits, the job goes through, and
    /// memory stays bounded all the same.
    pub fn wait_for_store(&self, peer: &Peer, sends: usize, bytes: usize) {
        if !self.store_backlogs.iter().any(|b| b.is_high()) {
            return;
        }
        let light = sends <= LIGHT_BATCH && bytes <= LIGHT_BYTES;
        if light && !self.store_backlogs.iter().any(|b| b.is_over_ceiling()) {
            return;
        }
        self.wait_until_stores_low(|| peer.is_closing());
    }

    /// Before a chunk of the server's own bulk work (due messages released, expiries, a
    /// redrive or a flushall, each of which can make a million store changes in a second):
    /// while a store backlog is past its mark, waits until all are low, for at most
    /// [`BULK_PACE_MAX`]. Such work then keeps the backlogs under the ceiling where senders of
    /// a single job must wait too ([`Hub::wait_for_store`]).
    pub fn pace_bulk_work(&self) {
        if !self.store_backlogs.iter().any(|b| b.is_high()) {
            return;
        }
        let until = std::time::Instant::now() + BULK_PACE_MAX;
        self.wait_until_stores_low(|| std::time::Instant::now() >= until);
    }

    /// Sleeps until every store backlog is low at once, or `give_up` (asked at least every
    /// [`STORE_WAIT_RECHECK`]).
    fn wait_until_stores_low(&self, give_up: impl Fn() -> bool) {
        // Each round sleeps on one backlog that is not low yet; done when all are low at once.
        while let Some(behind) = self.store_backlogs.iter().find(|b| !b.is_low()) {
            if !behind.wait_until_low(STORE_WAIT_RECHECK, &give_up) {
                return;
            }
        }
    }

    /// What wakes idle readers at shutdown.
    pub fn bell(&self) -> &Bell {
        &self.bell
    }

    fn lock(&self) -> Result<Locked<'_>, BrokerDown> {
        self.lock_with(Some(&self.sweep_plan))
    }

    fn lock_with<'a>(
        &'a self,
        sweep_plan: Option<&'a SweepPlan>,
    ) -> Result<Locked<'a>, BrokerDown> {
        match self.state.lock() {
            Ok(state) => Ok(Locked {
                state: Some(state),
                sweep_plan,
            }),
            Err(_) => {
                let _ = self.fatal.try_send(Fatal::BrokerDown);
                Err(BrokerDown)
            }
        }
    }

    /// Adds a connection; false if the server is shutting down.
    pub fn register(&self, conn: ConnId, peer: Arc<Peer>) -> Result<bool, BrokerDown> {
        let mut state = self.lock()?;
        if !state.open {
            return Ok(false);
        }
        state
            .broker
            .connect_with_pause_flag(conn, peer.paused.clone());
        state.peers.insert(conn, peer);
        Ok(true)
    }

    /// Applies a connection's requests in order, under one lock, then writes out the
    /// deliveries and, per `replies`, the connection's replies (see the module doc).
    /// A v1.2 connection's refused send is answered with ERROR like any reply; a v1.0 or
    /// v1.1 connection cannot be told, so its requests stop at a refused send, and the
    /// refusal is returned: the connection is to be closed.
    pub fn apply(
        &self,
        conn: ConnId,
        batch: Vec<Incoming>,
        replies: Replies,
    ) -> Result<Option<Refusal>, BrokerDown> {
        if replies == Replies::None {
            return self.modify(|broker, now, out| {
                for item in batch {
                    let Incoming::Request(request) = item else {
                        continue;
                    };
                    if let Request::Send { queue, content, .. } = &request {
                        if let Some(refused) = broker.refuse_send(queue.as_str(), content.len()) {
                            return Some(Refusal::send(refused, queue.as_str(), false));
                        }
                    }
                    broker.handle(conn, request, now, out);
                }
                None
            });
        }
        let durable = replies == Replies::Durable && self.durability.is_some();
        let now = now_millis();
        let mut deliveries = Vec::new();
        // Each reply with the number of deliveries made before it, and its store ticket.
        let mut answers: Vec<(usize, Outgoing, u64)> = Vec::new();
        let (routed, peer, own) = {
            let mut state = self.lock()?;
            let broker = &mut state.broker;
            for item in batch {
                let at = deliveries.len();
                match item {
                    Incoming::Refused(refusal) => {
                        if let Some(frame) = refusal.frame() {
                            answers.push((at, frame, 0));
                        }
                    }
                    Incoming::Request(Request::Send {
                        queue,
                        content,
                        ttl,
                        delay,
                    }) => {
                        if let Some(refused) = broker.refuse_send(queue.as_str(), content.len()) {
                            let refusal = Refusal::send(refused, queue.as_str(), true);
                            if let Some(frame) = refusal.frame() {
                                answers.push((at, frame, 0));
                            }
                            continue;
                        }
                        let id =
                            broker.send(queue.clone(), content, ttl, delay, now, &mut deliveries);
                        let ticket = if durable { broker.store_submitted() } else { 0 };
                        answers.push((at, Outgoing::Receipt { queue, id }, ticket));
                    }
                    Incoming::Request(Request::Stats { queue }) => {
                        let counts = broker.counts(queue.as_str());
                        answers.push((
                            at,
                            Outgoing::Counts {
                                queue,
                                ready: counts.ready as u64,
                                delayed: counts.delayed as u64,
                                in_flight: counts.in_flight as u64,
                                consumers: counts.consumers as u64,
                            },
                            0,
                        ));
                    }
                    Incoming::Request(Request::Flush { queue }) => {
                        let count = broker.flush_queue(queue.as_str(), now, &mut deliveries);
                        answers.push((
                            at,
                            Outgoing::Flushed {
                                queue,
                                count: count as u64,
                            },
                            0,
                        ));
                    }
                    Incoming::Request(request) => {
                        broker.handle(conn, request, now, &mut deliveries)
                    }
                }
            }
            let peer = state.peers.get(&conn).cloned();
            if durable {
                (route(&state.peers, deliveries), peer, None)
            } else {
                // Each reply goes before the deliveries its request caused.
                let mut frames = Vec::with_capacity(deliveries.len() + answers.len());
                let mut answers = answers.drain(..).peekable();
                for (i, delivery) in deliveries.into_iter().enumerate() {
                    while let Some((_, frame, _)) = answers.next_if(|(at, _, _)| *at <= i) {
                        frames.push((conn, frame));
                    }
                    frames.push((delivery.conn, Outgoing::from(delivery)));
                }
                frames.extend(answers.map(|(_, frame, _)| (conn, frame)));
                let mut routed = route(&state.peers, frames);
                // This connection's own frames go into its outbox before the lock is released:
                // a dispatch of one of its messages that another thread decides later (a
                // resumed consumer, a delay coming due) is then written after its RECEIPT.
                // They are sent after the lock, and after the other connections' dispatches:
                // a system call under the lock would hold up every other connection, and a
                // consumer's dispatch need not wait for the producer's receipt.
                // None if there are none, or the outbox is closed (the connection is going).
                let own = routed
                    .iter()
                    .position(|(peer, _)| peer.conn == conn)
                    .map(|at| routed.swap_remove(at))
                    .and_then(|(peer, frames)| {
                        let dialect = peer.dialect();
                        let queued = peer.outbox.queue(|buffer| {
                            for frame in &frames {
                                frame.encode(buffer, dialect);
                            }
                        });
                        queued.then_some(peer)
                    });
                (routed, None, own)
            }
        };
        self.deliver(routed);
        if let Some(own) = own {
            own.outbox.send_queued(&*own.stream);
            // As for the others' output: a pause after a burst whose output went out at once
            // (an ack that made room for one more dispatch to itself, say) must end here.
            let (mut backed_up, mut drained) = (Vec::new(), Vec::new());
            classify(own, &mut backed_up, &mut drained);
            self.settle(backed_up, drained);
        }
        if let Some(peer) = peer {
            let replies = answers
                .into_iter()
                .map(|(_, frame, ticket)| (ticket, frame));
            self.queue_durable(&peer, replies.collect());
        }
        // A v1.2 connection was told of its refused sends.
        Ok(None)
    }

    /// Removes a connection; what it held is redelivered to the others.
    pub fn unregister(&self, conn: ConnId, ended_by: EndedBy) -> Result<(), BrokerDown> {
        let now = now_millis();
        let mut deliveries = Vec::new();
        self.durable_waiting().remove(&conn);
        let routed = {
            let mut state = self.lock()?;
            state.peers.remove(&conn);
            state
                .broker
                .disconnect(conn, ended_by, now, &mut deliveries);
            route(&state.peers, deliveries)
        };
        self.deliver(routed);
        Ok(())
    }

    /// Sends frames to connections, whether they ever asked to consume or not: each goes out at
    /// once if its socket takes it, else after what is queued for that connection already.
    /// Frames for a connection that is not registered are dropped.
    pub fn send(&self, frames: Vec<(ConnId, Outgoing)>) -> Result<(), BrokerDown> {
        let routed = route(&self.lock()?.peers, frames);
        self.deliver(routed);
        Ok(())
    }

    /// Drops ready messages whose TTL ran out.
    pub fn expire(&self) -> Result<usize, BrokerDown> {
        self.read_mut(|broker, now| broker.expire(now))
    }

    /// The sweeper's tick: drops what expired, takes back messages whose lease ran out and
    /// releases delayed ones that are due (writing out what that dispatches). Returns how
    /// long to wait for the next: until the broker's next deadline, at most `longest`, at
    /// least `shortest` (a tick does a bounded amount of work: a deadline already passed
    /// still lets other threads have the lock meanwhile). A deadline set before then wakes
    /// the sweeper ([`Hub::timer_wake_ups`]).
    pub fn sweep(&self, longest: Duration, shortest: Duration) -> Result<Duration, BrokerDown> {
        let now = now_millis();
        let started = std::time::Instant::now();
        let mut deliveries = Vec::new();
        let (wait, routed) = {
            // Not noted as it is let go: this sweep plans the next itself, below.
            let mut state = self.lock_with(None)?;
            let expired = state.broker.expire(now);
            state.broker.fire_timers(now, &mut deliveries);
            let next = state.broker.next_deadline();
            let mut wait = next.map_or(longest, |at| {
                Duration::from_millis(at.saturating_sub(now)).min(longest)
            });
            if expired >= EXPIRE_BATCH {
                // More have expired: the next sweep comes once the lock has been left to the
                // others as long as this one held it (at most EXPIRY_PAUSE), rather than let
                // a million expired messages count as ready for half a minute.
                wait = wait.min(started.elapsed().min(EXPIRY_PAUSE));
            }
            let wait = wait.max(shortest);
            // A deadline already passed is planned as it is: the sweep after the shortest
            // wait takes it, with no wake-up for it meanwhile.
            let planned = now.saturating_add(wait.as_millis() as Millis);
            self.sweep_plan
                .plan(next.map_or(planned, |at| at.min(planned)));
            (wait, route(&state.peers, deliveries))
        };
        self.deliver(routed);
        Ok(wait)
    }

    /// Looks at the broker under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&Broker, Millis) -> R) -> Result<R, BrokerDown> {
        let now = now_millis();
        Ok(f(&self.lock()?.broker, now))
    }

    fn read_mut<R>(&self, f: impl FnOnce(&mut Broker, Millis) -> R) -> Result<R, BrokerDown> {
        let now = now_millis();
        Ok(f(&mut self.lock()?.broker, now))
    }

    /// Changes the broker under the lock, then writes out the deliveries that caused.
    pub fn modify<R>(
        &self,
        f: impl FnOnce(&mut Broker, Millis, &mut Vec<Delivery>) -> R,
    ) -> Result<R, BrokerDown> {
        let now = now_millis();
        let mut deliveries = Vec::new();
        let (result, routed) = {
            let mut state = self.lock()?;
            let result = f(&mut state.broker, now, &mut deliveries);
            (result, route(&state.peers, deliveries))
        };
        self.deliver(routed);
        Ok(result)
    }

    /// Writes deliveries out, then pauses connections whose output backed up past the
    /// high-water mark (re-checked under the lock, so a pause is never missed by the writer).
    ///
    /// A connection the broker paused after a burst (see [`Broker::set_paused`]) whose output
    /// then went out at once (the socket took it all, so no writer will call
    /// [`Hub::resume_if_drained`]) is resumed here, and given its next burst.
    fn deliver(&self, routed: Routed) {
        let (backed_up, drained) = fan_out(routed);
        self.settle(backed_up, drained);
    }

    /// Pauses the connections whose output backed up, and resumes (with their next burst,
    /// written out in turn) those paused whose output is already written.
    fn settle(&self, mut backed_up: Vec<Arc<Peer>>, mut drained: Vec<Arc<Peer>>) {
        loop {
            drained.extend(self.pause(backed_up));
            if drained.is_empty() {
                return;
            }
            let now = now_millis();
            let mut deliveries = Vec::new();
            let routed = {
                let Ok(mut state) = self.lock() else {
                    return;
                };
                for peer in drained {
                    if peer.paused.load(Ordering::Acquire)
                        && peer.outbox.pending_len() <= OUTBOX_LOW_WATER
                    {
                        state
                            .broker
                            .set_paused(peer.conn, false, now, &mut deliveries);
                    }
                }
                route(&state.peers, deliveries)
            };
            (backed_up, drained) = fan_out(routed);
        }
    }

    /// Pauses deliveries to connections whose output backed up past the high-water mark.
    /// Returns those whose writer finished meanwhile, before it could see the pause (it looks
    /// at the flag without the lock): nobody else would resume them.
    fn pause(&self, backed_up: Vec<Arc<Peer>>) -> Vec<Arc<Peer>> {
        if backed_up.is_empty() {
            return Vec::new();
        }
        let now = now_millis();
        let Ok(mut state) = self.lock() else {
            return Vec::new();
        };
        let mut none = Vec::new();
        let mut drained = Vec::new();
        for peer in backed_up {
            if peer.outbox.pending_len() > OUTBOX_HIGH_WATER {
                state.broker.set_paused(peer.conn, true, now, &mut none);
                // The flag is stored before the outbox's lock is taken here: a writer that
                // finishes after this look sees the pause and resumes the connection itself.
                if peer.outbox.is_idle() && !peer.is_closing() {
                    drained.push(peer);
                }
            }
        }
        drained
    }

    /// Called by a connection's writer after each write: resumes deliveries to a paused
    /// connection once its output is down to the low-water mark.
    pub fn resume_if_drained(&self, peer: &Peer) -> Result<(), BrokerDown> {
        if !peer.paused.load(Ordering::Acquire) || peer.outbox.pending_len() > OUTBOX_LOW_WATER {
            return Ok(());
        }
        let now = now_millis();
        let mut deliveries = Vec::new();
        let routed = {
            let mut state = self.lock()?;
            if peer.outbox.pending_len() > OUTBOX_LOW_WATER {
                return Ok(());
            }
            state
                .broker
                .set_paused(peer.conn, false, now, &mut deliveries);
            route(&state.peers, deliveries)
        };
        self.deliver(routed);
        Ok(())
    }

    /// Turns new connections away and asks every connected one to finish: each reads what
    /// its client already sent, then ends.
    pub fn begin_close(&self) {
        if let Ok(mut state) = self.lock() {
            state.broker.stop_dispatching();
        }
        for peer in self.close_registry() {
            peer.closing.store(true, Ordering::Relaxed);
        }
        self.bell.ring();
        // Producers held back by the store see at once that they are closing.
        for backlog in &self.store_backlogs {
            backlog.wake_all();
        }
    }

    /// Hangs up on every connection still there: each takes the whole frames that already
    /// arrived, then ends ([`Peer::stop_reading`]).
    pub fn close_all(&self) {
        for peer in self.close_registry() {
            peer.stop_reading();
        }
    }

    /// Storage is about to take its last changes: from now on a send is refused (503), not
    /// taken and then lost.
    pub fn close_store(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.broker.close_store();
    }

    fn close_registry(&self) -> Vec<Arc<Peer>> {
        // Even with the broker gone, the sockets must still be closed.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.open = false;
        state.peers.values().cloned().collect()
    }
}

/// A frame addressed to one connection: a broker's [`Delivery`], or any [`Outgoing`] with the
/// connection it is for.
trait Addressed {
    fn conn(&self) -> ConnId;
    fn into_frame(self) -> Outgoing;
}

impl Addressed for Delivery {
    fn conn(&self) -> ConnId {
        self.conn
    }
    fn into_frame(self) -> Outgoing {
        Outgoing::from(self)
    }
}

impl Addressed for (ConnId, Outgoing) {
    fn conn(&self) -> ConnId {
        self.0
    }
    fn into_frame(self) -> Outgoing {
        self.1
    }
}

/// Each connection's frames, in the order they were made.
type Routed = Vec<(Arc<Peer>, Vec<Outgoing>)>;

/// Pairs each frame with its peer, grouped by peer in the order given. Frames for a connection
/// that is not registered (any more) are dropped.
fn route<A: Addressed>(peers: &IdMap<ConnId, Arc<Peer>>, mut frames: Vec<A>) -> Routed {
    let mut routed: Routed = Vec::new();
    if frames.is_empty() {
        return routed;
    }
    // Stable: each connection's frames keep their order.
    frames.sort_by_key(|f| f.conn());
    let mut current: Option<ConnId> = None;
    let mut skipping = false;
    for frame in frames {
        if current != Some(frame.conn()) {
            current = Some(frame.conn());
            match peers.get(&frame.conn()) {
                Some(peer) => {
                    skipping = false;
                    routed.push((peer.clone(), Vec::new()));
                }
                // Only registered connections consume, so a dispatch is never skipped (if it
                // were, its message stays held and comes back when the connection goes). Other
                // frames may be for a connection that has just gone.
                None => skipping = true,
            }
        }
        if skipping {
            continue;
        }
        if let Some((_, group)) = routed.last_mut() {
            group.push(frame.into_frame());
        }
    }
    routed
}

/// Encodes each peer's frames into its outbox, one append per peer: sent at once if the socket
/// takes them, else left to the connection's writer. Returns the peers whose output backed up
/// past the high-water mark and are not paused yet, and those paused whose output is down to
/// the low-water mark (the broker paused them after a burst): to resume.
fn fan_out(routed: Routed) -> (Vec<Arc<Peer>>, Vec<Arc<Peer>>) {
    let mut backed_up = Vec::new();
    let mut drained = Vec::new();
    for (peer, frames) in routed {
        // The dialect is the wire's business: a v1.0 client reads exactly three packets in a
        // dispatch and breaks on a fourth.
        let dialect = peer.dialect();
        peer.outbox.push(&*peer.stream, |buffer| {
            for frame in &frames {
                frame.encode(buffer, dialect);
            }
        });
        classify(peer, &mut backed_up, &mut drained);
    }
    (backed_up, drained)
}

/// After output was added to `peer`'s outbox: whether it backed up past the high-water mark
/// (to pause), or it is paused with its output down to the low-water mark (to resume: no
/// writer may be left to do it, if the socket took everything at once).
fn classify(peer: Arc<Peer>, backed_up: &mut Vec<Arc<Peer>>, drained: &mut Vec<Arc<Peer>>) {
    if is_backed_up(&peer) {
        backed_up.push(peer);
    } else if peer.paused.load(Ordering::Acquire)
        && peer.outbox.pending_len() <= OUTBOX_LOW_WATER
        // One that is going away gets nothing more: its writer's failure emptied it.
        && !peer.is_closing()
    {
        drained.push(peer);
    }
}

/// Whether deliveries to `peer` go on while its output is backed up past the high-water mark.
fn is_backed_up(peer: &Peer) -> bool {
    !peer.paused.load(Ordering::Acquire) && peer.outbox.pending_len() > OUTBOX_HIGH_WATER
}

mod durable;
mod timer;

#[cfg(test)]
mod tests;
