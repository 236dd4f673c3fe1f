//! The broker core: FIFO queues, round-robin consumer rings, holds and acknowledgements.
//!
//! A plain state machine with no sockets, no threads and no clock: every call gets the time as an
//! argument and appends the [`Delivery`]s it decides on to a caller-owned vector, which the
//! network layer writes out after it has released the lock around the broker. Every change to
//! the set of accepted messages goes to the [`Store`]. A connection's pause flag is an atomic
//! it shares with the network layer, whose writer reads it without the lock; the broker alone
//! writes it. The dialect a connection speaks is not the broker's business: a [`Delivery`]
//! always carries the remaining TTL, and the wire decides whether to show it.
//!
//! Invariants:
//! - a message is either ready (a live entry in its queue's `ReadyList`, which owns the
//!   list's counts), delayed (an entry in its queue's `DelayedList`, keyed by seq, and in the
//!   table's `due` index under (due time, seq), and nowhere else) or held by exactly one
//!   connection (an entry in `held`, keyed by id, and in its queue's `in_flight` and its
//!   subscription's `held`); only held messages are indexed by id, since only they can be
//!   named by a client (ack, re-queue, dead letter);
//! - a delayed message keeps its content in memory only when the store cannot read it back;
//! - a held message has a lease deadline iff it was dispatched under a lease, and then it is in
//!   the table's `leases` index under (deadline, id), which has no other entries;
//! - a message leaves for good only through `MessageTable::retire` (module `retire`), which
//!   keeps the store, the expiry index, the totals and the counts in step;
//! - a connection is in a queue's ring iff its subscription to that queue has a limit above 0;
//! - a queue's `subscribers` has an entry for a connection iff its limit or its holds in that
//!   queue are above 0, and the connection's `queues` names exactly those queues;
//! - a queue exists while it has ready, delayed or held messages or consumers; `names` holds
//!   exactly the names of the queues that exist, in order, so the console can walk them a
//!   chunk at a time (a hash map has no place to resume from);
//! - the table's `resident` is the sum of the queues' resident amounts;
//! - with a maximum delivery count N, no message outside a `….dead` queue has ended N
//!   dispatches without an ack: at its N-th it moved to `<queue>.dead` (module `dead`), from
//!   where nothing is moved again; a move is not a way out (the message stays stored);
//! - a message's delivery count is what the store has for it: the store learns it at each
//!   dispatch (`StoreOp::Counted`), so a dispatch under way when the server is killed counts
//!   (rule 6); a message acknowledged soon after costs no write for it (the change cancels
//!   out with the delete in the store writer's batch).

mod dead;
mod delay;
mod hold;
mod inspect;
mod lease;
mod ready;
mod retire;
mod ring;
mod window;

pub use dead::{dead_queue_name, REDRIVE_CHUNK};
pub use hold::EndedBy;
pub use inspect::{Listing, MessageRow, MessageState, QueueStatus, FLUSH_CHUNK, STATUS_CHUNK};

use crate::id::{IdGenerator, IdMap, IdSet, MessageId};
use crate::request::{QueueName, Request};
use crate::store::{Millis, Store, StoreOp, StoredMessage, StoredRow};
use delay::{due_time, Delayed, DelayedList};
use hold::Held;
use ready::{Ready, ReadyList};
use retire::{is_expired, Place, Retirement};
use ring::Ring;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use window::{Amount, Window, RESIDENT_FLOOR, RESIDENT_PER_QUEUE, RESIDENT_TOTAL};

/// Identifies one client connection for the lifetime of the process.
pub type ConnId = u64;

/// A message the broker has given to a connection: the caller must write it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub conn: ConnId,
    pub queue: QueueName,
    pub id: MessageId,
    pub content: Arc<[u8]>,
    /// Remaining TTL in whole seconds (rounded up); `None` if the message never expires.
    /// Whether the client sees it is the wire's choice: the v1.0 dialect has no TTL packet.
    pub ttl_remaining: Option<u64>,
    /// How many times the message has been dispatched, this time included (v1.2 rule 6);
    /// only v1.2 connections see it.
    pub deliveries: u32,
}

/// Counters since the broker started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub accepted: u64,
    pub delivered: u64,
    pub acknowledged: u64,
    pub requeued: u64,
    pub dead_lettered: u64,
    pub expired: u64,
    /// Dropped by a flush.
    pub flushed: u64,
    /// Moved to their dead-letter queue after their last allowed dispatch (v1.2 rule 8);
    /// still stored, so not a way out.
    pub moved_to_dead: u64,
    /// Moved back from a dead-letter queue by a redrive.
    pub redriven: u64,
    /// Sends not taken: a full queue (`--max-queue-length`), a stopping server.
    pub refused: u64,
    /// Dropped because the store could not read their content back (never expected; not
    /// shown by status, kept so every way out is counted).
    pub lost: u64,
}

/// What a STATS request answers (v1.2 rule 3): ready, delayed, in flight, consumers.
pub type QueueCounts = QueueStats;

/// A queue's counts, for status, STATS and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: usize,
    /// Not due yet (v1.2 rule 5).
    pub delayed: usize,
    pub in_flight: usize,
    pub consumers: usize,
}

/// "Never expires", as an expiry time.
const NEVER: Millis = 0;
/// The latest expiry time, 9999-12-31T23:59:59.999Z: a larger TTL is clamped to it. It fits
/// the store's signed 64-bit integer (and any date library), so a message's remaining TTL is
/// the same before and after a restart, and such a TTL still reads as "about 8,000 years".
pub const MAX_EXPIRES_AT: Millis = 253_402_300_799_999;
/// The most messages one [`Broker::expire`] call drops.
pub const EXPIRE_BATCH: usize = 10_000;
/// What the broker hands a consumer between two resumes before it pauses it: the network
/// layer's mark for a backed-up output (`hub::OUTBOX_HIGH_WATER`), so that its output stays
/// within about twice that.
pub const DISPATCH_BURST_BYTES: usize = 16 << 20;
/// The most messages one connection holds unacknowledged from one queue, whatever count it
/// asked for (it gets more as it acknowledges, as with any count): what a disconnect hands
/// back in one go stays bounded per queue, where a count of a billion on a million ready
/// messages once held the broker for seconds. RabbitMQ's prefetch stops at 65,535.
pub const MAX_HELD_PER_CONSUMER: u64 = 65_536;
/// A dispatch frame's bytes besides the content, about (header, queue, id, TTL, count).
const DISPATCH_FRAME_BYTES: usize = 128;

#[derive(Debug, Default)]
struct Queue {
    /// Waiting messages in FIFO order, with their counts.
    ready: ReadyList,
    /// Messages not due yet (v1.2 delays), with their counts.
    delayed: DelayedList,
    /// The token of the fetch under way.
    fetching: Option<u64>,
    /// Messages connections hold, and their content bytes.
    in_flight: Amount,
    consumers: Ring<ConnId>,
    /// What each connection may hold of this queue and holds.
    subscribers: IdMap<ConnId, Subscription>,
}

#[derive(Debug)]
struct Subscription {
    limit: u64,
    held: u64,
    /// The lease (ms, 0 = none) of the latest consume request: for later dispatches.
    lease: u64,
}

#[derive(Debug, Default)]
struct Connection {
    /// Its output is backed up (the client is not reading): it gets nothing new until resumed.
    /// The one flag: the network layer's peer shares it (its writer reads it after every
    /// write without this lock); it is written only by [`Broker::set_paused`], under the lock.
    paused: Arc<AtomicBool>,
    /// The queues where this connection has a subscription (usually one or two, but a
    /// client may subscribe to thousands: a set, so that a disconnect stays linear).
    queues: BTreeSet<QueueName>,
    /// Bytes handed to it since it was last resumed (or connected), over all its queues and
    /// calls: at [`DISPATCH_BURST_BYTES`] it is paused, and the network layer resumes it once
    /// its output is written (at once if it already is).
    handed: usize,
    /// Where the next resume starts among its queues: each in turn goes first, so that one
    /// queue's backlog cannot take every burst.
    resume_from: usize,
}

impl Connection {
    fn is_paused(&self) -> bool {
        // Read under the broker lock, which orders it after any store by `set_paused`.
        self.paused.load(Ordering::Relaxed)
    }
}

/// Held messages, the expiry index, the store and the counters: everything that `pump` needs
/// besides the queue and the connections, so the borrows can be split.
struct MessageTable {
    held: IdMap<MessageId, Held>,
    /// The ids in `held` by holder: a disconnect or a flush finds a connection's holds
    /// without a scan of every held message. A connection's set, empty or not, goes with it.
    held_by: IdMap<ConnId, IdSet<MessageId>>,
    /// (expires at, seq) of messages with a TTL, and their queue. Entries of messages that are
    /// held, re-queued or gone are skipped when they come up.
    expiry: BTreeMap<(Millis, u64), QueueName>,
    /// (due at, seq) of every delayed message, and its queue: exact (an entry leaves with its
    /// message), so the earliest is the next due time.
    due: BTreeMap<(Millis, u64), QueueName>,
    /// (lease deadline, id) of every held message with a lease: exact, like `due`.
    leases: BTreeSet<(Millis, MessageId)>,
    store: Box<dyn Store>,
    /// Set when the store can read content back: queues keep only this much in memory.
    window: Option<Window>,
    /// What all queues keep resident together.
    resident: Amount,
    /// Every message the broker holds (ready, delayed and in flight), for the store's limits.
    stored: Amount,
    last_fetch_token: u64,
    totals: Totals,
}

impl MessageTable {
    /// Ids of the messages `holder` holds, in `queue` only if given, oldest first.
    fn held_ids(&self, holder: ConnId, queue: Option<&QueueName>) -> Vec<MessageId> {
        let Some(ids) = self.held_by.get(&holder) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, MessageId)> = ids
            .iter()
            .filter_map(|id| self.held.get(id).map(|h| (h, *id)))
            .filter(|(h, _)| queue.is_none_or(|q| &h.queue == q))
            .map(|(h, id)| (h.seq, id))
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, id)| id).collect()
    }

    fn index_expiry(&mut self, queue: &QueueName, seq: u64, expires_at: Millis) {
        if expires_at != NEVER {
            self.expiry.insert((expires_at, seq), queue.clone());
        }
    }
}

impl Queue {
    /// Content bytes of its messages, ready, delayed and in flight.
    fn bytes(&self) -> u64 {
        self.ready.bytes() + self.delayed.bytes() + self.in_flight.bytes
    }

    fn is_unused(&self) -> bool {
        self.ready.is_empty()
            && self.delayed.is_empty()
            && self.in_flight.messages == 0
            && self.subscribers.is_empty()
    }
}

pub struct Broker {
    queues: HashMap<QueueName, Queue>,
    /// The keys of `queues`, sorted.
    names: BTreeSet<QueueName>,
    connections: IdMap<ConnId, Connection>,
    table: MessageTable,
    ids: IdGenerator,
    next_seq: u64,
    /// The most dispatches a message may end without an ack before it moves to its
    /// dead-letter queue (v1.2 rule 8); `None`: never moved.
    max_deliveries: Option<u32>,
    /// The most messages a queue holds (ready, delayed and in flight) before sends to it are
    /// refused; `None`: no limit.
    max_queue_length: Option<usize>,
    /// The server-wide limits on all queues together (`None`: none); see
    /// [`Broker::set_store_limits`].
    max_stored_messages: Option<usize>,
    max_stored_bytes: Option<u64>,
    /// Storage has taken its last changes (a stop): sends are refused, not lost.
    store_closed: bool,
    /// The server is stopping: nothing more is dispatched (see [`Broker::stop_dispatching`]).
    dispatch_stopped: bool,
}

/// Messages and content bytes held, all queues together (ready, delayed and in flight), and
/// the limits on them (`--max-stored-messages`, `--max-stored-bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreUse {
    pub messages: usize,
    pub bytes: u64,
    pub max_messages: Option<usize>,
    pub max_bytes: Option<u64>,
}

/// Why the broker does not take a send (v1.2 answers ERROR; see [`Broker::refuse_send`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendRefused {
    /// The queue holds the configured maximum.
    QueueFull { limit: usize },
    /// The server holds the most messages it may (`--max-stored-messages`).
    TooManyMessages { limit: usize },
    /// The message would take the server past the most content it may hold
    /// (`--max-stored-bytes`).
    TooManyBytes { limit: u64 },
    /// The server is stopping and its store has taken its last changes.
    ShuttingDown,
}

/// When a message with `ttl` seconds accepted at `now` expires, at most [`MAX_EXPIRES_AT`];
/// [`NEVER`] for no TTL or 0.
fn expiry(now: Millis, ttl: Option<u64>) -> Millis {
    match ttl {
        Some(seconds) if seconds > 0 => now
            .saturating_add(seconds.saturating_mul(1000))
            .clamp(1, MAX_EXPIRES_AT),
        _ => NEVER,
    }
}

/// A stored expiry time as the broker keeps it: later than [`MAX_EXPIRES_AT`] (written by an
/// older phpmq, which did not clamp) is clamped like a new TTL, and 0 (not written by phpmq,
/// which stores "never" as no value) is long past rather than "never".
fn recovered_expiry(stored: Option<Millis>) -> Millis {
    match stored {
        None => NEVER,
        Some(at) => at.clamp(1, MAX_EXPIRES_AT),
    }
}

/// The stored form of an expiry time.
fn stored_expiry(expires_at: Millis) -> Option<Millis> {
    (expires_at != NEVER).then_some(expires_at)
}

/// Whole seconds left until `expires_at`, rounded up, at least 1.
fn remaining_seconds(expires_at: Millis, now: Millis) -> u64 {
    expires_at.saturating_sub(now).div_ceil(1000).max(1)
}

impl Broker {
    pub fn new(store: Box<dyn Store>) -> Broker {
        Broker::with_ids(store, IdGenerator::new())
    }

    pub fn with_ids(store: Box<dyn Store>, ids: IdGenerator) -> Broker {
        Broker {
            queues: HashMap::new(),
            names: BTreeSet::new(),
            connections: IdMap::default(),
            table: MessageTable {
                held: IdMap::default(),
                held_by: IdMap::default(),
                expiry: BTreeMap::new(),
                due: BTreeMap::new(),
                leases: BTreeSet::new(),
                window: store.can_fetch().then_some(Window {
                    per_queue: RESIDENT_PER_QUEUE,
                    total: RESIDENT_TOTAL,
                    floor: RESIDENT_FLOOR,
                }),
                resident: Amount::default(),
                stored: Amount::default(),
                store,
                last_fetch_token: 0,
                totals: Totals::default(),
            },
            ids,
            next_seq: 1,
            max_deliveries: None,
            max_queue_length: None,
            max_stored_messages: None,
            max_stored_bytes: None,
            store_closed: false,
            dispatch_stopped: false,
        }
    }

    /// Puts back a message recovered from storage, ready again. Call in FIFO (`seq`) order,
    /// before any client connects; the store already has it, so nothing is reported. Its
    /// content is copied only if the queue keeps it in memory. A message with a due time is
    /// delayed again, whether that time has passed or not: the first [`Broker::fire_timers`]
    /// moves the due ones to the tail in (due time, seq) order.
    pub fn restore(&mut self, message: StoredRow<'_>) {
        self.next_seq = self.next_seq.max(message.seq + 1);
        let size = message.content.len();
        self.table.stored.add(size);
        if let Some(due_at) = message.due_at {
            // Copied only if kept (see `MessageTable::delayed_content`).
            let content = self
                .table
                .window
                .is_none()
                .then(|| Arc::from(message.content));
            let delayed = Delayed {
                id: message.id,
                content,
                size,
                accepted_at: message.accepted_at,
                expires_at: recovered_expiry(message.expires_at),
                due_at,
                deliveries: message.deliveries,
            };
            let q = queue_or_new(&mut self.queues, &mut self.names, message.queue);
            self.table.delay(q, message.queue, message.seq, delayed);
            return;
        }
        let (window, resident) = (self.table.window, self.table.resident);
        let keep = self
            .queues
            .get(message.queue.as_str())
            .is_none_or(|q| q.ready.keeps_next(size, window, resident));
        let ready = Ready::new(
            message.seq,
            message.id,
            size,
            keep.then(|| Arc::from(message.content)),
            message.accepted_at,
            recovered_expiry(message.expires_at),
            message.deliveries,
        );
        self.append_ready(message.queue, ready);
    }

    pub fn connect(&mut self, conn: ConnId) {
        self.connections.entry(conn).or_default();
    }

    /// Connects `conn` with a pause flag the caller shares (see [`Broker::set_paused`]).
    pub fn connect_with_pause_flag(&mut self, conn: ConnId, paused: Arc<AtomicBool>) {
        self.connections.entry(conn).or_default().paused = paused;
    }

    /// Applies one client request.
    pub fn handle(&mut self, conn: ConnId, request: Request, now: Millis, out: &mut Vec<Delivery>) {
        match request {
            Request::Send {
                queue,
                content,
                ttl,
                delay,
            } => {
                self.send(queue, content, ttl, delay, now, out);
            }
            Request::Consume {
                queue,
                count,
                lease,
            } => self.consume(conn, queue, count, lease, now, out),
            Request::Ack { queue, id } => {
                self.ack(conn, &queue, id, now, out);
            }
            Request::Requeue {
                queue,
                id,
                ttl,
                delay,
            } => {
                self.requeue(conn, &queue, id, ttl, delay, now, out);
            }
            Request::DeadLetter { queue, id } => {
                self.dead_letter(conn, &queue, id, now, out);
            }
            Request::Touch { queue, id } => {
                self.touch(conn, &queue, id, now);
            }
            // Answered by the hub, which replies to them (STATS, FLUSH) or by the connection
            // (HELLO); nothing for the broker to change here.
            Request::Hello { .. } | Request::Stats { .. } | Request::Flush { .. } => {}
        }
    }

    /// Accepts a message at the tail of `queue` and returns its id. With a `delay` (ms, 0 =
    /// none) it joins the tail once due (v1.2 rule 5); its TTL runs from now all the same.
    pub fn send(
        &mut self,
        queue: QueueName,
        content: Arc<[u8]>,
        ttl: Option<u64>,
        delay: Option<u64>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> MessageId {
        let id = self.ids.next_id();
        let seq = self.take_seq();
        let expires_at = expiry(now, ttl);
        let due_at = due_time(now, delay);
        self.table.store.apply(StoreOp::Insert(StoredMessage {
            id,
            queue: queue.clone(),
            content: content.clone(),
            accepted_at: now,
            expires_at: stored_expiry(expires_at),
            seq,
            due_at,
            deliveries: 0,
        }));
        self.table.totals.accepted += 1;
        self.table.stored.add(content.len());
        if let Some(due_at) = due_at {
            let delayed = Delayed {
                id,
                size: content.len(),
                content: self.table.delayed_content(content),
                accepted_at: now,
                expires_at,
                due_at,
                deliveries: 0,
            };
            let q = queue_or_new(&mut self.queues, &mut self.names, &queue);
            self.table.delay(q, &queue, seq, delayed);
            return id;
        }
        let ready = Ready::new(seq, id, content.len(), Some(content), now, expires_at, 0);
        self.append_ready(&queue, ready);
        self.pump(&queue, now, out);
        id
    }

    /// Sets how many unacknowledged messages of `queue` the connection may hold, and the
    /// lease (ms; `None` or 0: none) of the messages dispatched to it from now on (v1.2 rule
    /// 7): what it holds already keeps its deadline.
    pub fn consume(
        &mut self,
        conn: ConnId,
        queue: QueueName,
        count: u64,
        lease: Option<u64>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) {
        let Some(connection) = self.connections.get_mut(&conn) else {
            return;
        };
        let q = queue_or_new(&mut self.queues, &mut self.names, &queue);
        let subscription = q.subscribers.entry(conn).or_insert_with(|| {
            connection.queues.insert(queue.clone());
            Subscription {
                limit: 0,
                held: 0,
                lease: 0,
            }
        });
        subscription.limit = count.min(MAX_HELD_PER_CONSUMER);
        if count > MAX_HELD_PER_CONSUMER {
            // A client that waits for all it asked for before it acks would wait for good.
            if let Some(suppressed) = crate::ratelog::COUNT_CAPPED.admit() {
                log::info!(
                    "connection {conn} asked for {count} messages of {queue}: it holds at most \
                     {MAX_HELD_PER_CONSUMER} at once, and gets more as it acknowledges{suppressed}"
                );
            }
        }
        subscription.lease = lease.unwrap_or(0);
        if count > 0 {
            q.consumers.insert(conn);
        } else {
            q.consumers.remove(conn);
            q.forget_idle_subscriber(conn, connection, &queue);
        }
        self.pump(&queue, now, out);
        self.drop_queue_if_unused(&queue);
    }

    /// Stops or resumes deliveries to a connection whose client is not keeping up; what it
    /// already holds stays held. Resuming offers it its queues' ready messages at once. The
    /// flag is stored (with release ordering) before this returns, so a writer that reads it
    /// afterwards sees it.
    pub fn set_paused(&mut self, conn: ConnId, paused: bool, now: Millis, out: &mut Vec<Delivery>) {
        let Some(connection) = self.connections.get_mut(&conn) else {
            return;
        };
        connection.paused.store(paused, Ordering::Release);
        if !paused {
            connection.handed = 0;
            let queues: Vec<QueueName> = connection.queues.iter().cloned().collect();
            let first = connection.resume_from % queues.len().max(1);
            connection.resume_from = connection.resume_from.wrapping_add(1);
            for name in queues[first..].iter().chain(&queues[..first]) {
                self.pump(name, now, out);
            }
        }
    }

    pub fn totals(&self) -> Totals {
        self.table.totals
    }

    pub fn queue_stats(&self, name: &str) -> Option<QueueStats> {
        self.queues.get(name).map(|queue| QueueStats {
            ready: queue.ready.len(),
            delayed: queue.delayed.len(),
            in_flight: queue.in_flight.messages,
            consumers: queue.consumers.len(),
        })
    }

    /// How many changes the broker has handed to its store: the ticket a durable receipt for
    /// the last of them waits for ([`Store::submitted`]).
    pub fn store_submitted(&self) -> u64 {
        self.table.store.submitted()
    }

    /// Sets the most messages a queue may hold before sends to it are refused (`None` or 0:
    /// no limit). Only new sends count against it: re-queues, returns, dead letters and
    /// redrives move messages that are already there.
    pub fn set_max_queue_length(&mut self, max: Option<usize>) {
        self.max_queue_length = max.filter(|&n| n > 0);
    }

    /// Sets the most messages, and the most content bytes, that all queues together may hold
    /// before sends are refused (0: no limit): the store lives in memory, so this is how an
    /// operator bounds the server's memory. As with the queue length, only new sends count
    /// against them, and a restart recovers every stored message even past them.
    pub fn set_store_limits(&mut self, messages: usize, bytes: u64) {
        self.max_stored_messages = (messages > 0).then_some(messages);
        self.max_stored_bytes = (bytes > 0).then_some(bytes);
    }

    /// What all queues hold together, and the limits on it, for status.
    pub fn store_use(&self) -> StoreUse {
        StoreUse {
            messages: self.table.stored.messages,
            bytes: self.table.stored.bytes,
            max_messages: self.max_stored_messages,
            max_bytes: self.max_stored_bytes,
        }
    }

    /// The server is stopping and every connection is about to be closed: a message that
    /// comes back (from a holder that left, a lease that ran out, a delay that came due)
    /// waits for the next start instead of going to a connection that will be closed with it,
    /// where it would only count one more delivery for nothing.
    pub fn stop_dispatching(&mut self) {
        self.dispatch_stopped = true;
    }

    /// The store has taken its last changes (the server is stopping): from now on a send is
    /// refused rather than taken and lost.
    pub fn close_store(&mut self) {
        self.store_closed = true;
    }

    /// Whether a send of `size` content bytes to `queue` is refused, and why (counted in the
    /// totals); `None`: take it.
    pub fn refuse_send(&mut self, queue: &str, size: usize) -> Option<SendRefused> {
        let refused = if self.store_closed {
            Some(SendRefused::ShuttingDown)
        } else {
            self.over_a_limit(queue, size)
        };
        if refused.is_some() {
            self.table.totals.refused += 1;
        }
        refused
    }

    /// The first limit a send of `size` bytes to `queue` would break: the server's, then the
    /// queue's.
    fn over_a_limit(&self, queue: &str, size: usize) -> Option<SendRefused> {
        let stored = self.table.stored;
        if let Some(limit) = self.max_stored_messages.filter(|&n| stored.messages >= n) {
            return Some(SendRefused::TooManyMessages { limit });
        }
        if let Some(limit) = self
            .max_stored_bytes
            .filter(|&n| stored.bytes.saturating_add(size as u64) > n)
        {
            return Some(SendRefused::TooManyBytes { limit });
        }
        let limit = self.max_queue_length?;
        let held = self
            .queue_stats(queue)
            .map_or(0, |s| s.ready + s.delayed + s.in_flight);
        (held >= limit).then_some(SendRefused::QueueFull { limit })
    }

    /// A queue's counts for a STATS request (v1.2 rule 3): all 0 for a queue that does not
    /// exist, which is not created.
    pub fn counts(&self, queue: &str) -> QueueCounts {
        self.queue_stats(queue).unwrap_or_default()
    }

    /// How many messages are stored (ready, delayed and held).
    pub fn message_count(&self) -> usize {
        self.table.held.len()
            + self
                .queues
                .values()
                .map(|q| q.ready.len() + q.delayed.len())
                .sum::<usize>()
    }

    /// Runs what is due at `now`: held messages whose lease ran out are taken back (v1.2 rule
    /// 7), delayed messages that are due join their queues (rule 5). Dispatches what it can;
    /// returns how many messages it moved. Each call does a bounded amount of work (at most
    /// [`EXPIRE_BATCH`] of each); the sweeper calls it again at [`Broker::next_deadline`].
    pub fn fire_timers(&mut self, now: Millis, out: &mut Vec<Delivery>) -> usize {
        self.reclaim_leases(now, out) + self.release_due(now, out)
    }

    /// The earliest time [`Broker::fire_timers`] has something to do, if any: a timer thread
    /// sleeps until then (or its usual period, whichever comes first).
    pub fn next_deadline(&self) -> Option<Millis> {
        let due = self.table.due.first_key_value().map(|(&(at, _), _)| at);
        let lease = self.table.leases.first().map(|&(at, _)| at);
        due.into_iter().chain(lease).min()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Adds a message at the tail of its queue: its `seq` is the newest.
    fn append_ready(&mut self, queue: &QueueName, ready: Ready) {
        self.table.index_expiry(queue, ready.seq, ready.expires_at);
        let q = queue_or_new(&mut self.queues, &mut self.names, queue);
        q.ready
            .push_back(ready, self.table.window, &mut self.table.resident);
    }

    /// Hands ready messages of one queue to its consumers with free capacity, round-robin;
    /// expired ones met on the way are retired. A consumer handed [`DISPATCH_BURST_BYTES`]
    /// since it was last resumed is paused, as the network layer pauses it when its output
    /// backs up (and resumes it once that output is written): a count of millions, or many
    /// queues, must not put a whole backlog in one connection's output at once.
    fn pump(&mut self, name: &QueueName, now: Millis, out: &mut Vec<Delivery>) {
        if self.dispatch_stopped {
            return;
        }
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        let connections = &mut self.connections;
        let table = &mut self.table;
        while !queue.ready.is_empty() {
            let subscribers = &queue.subscribers;
            let has_room = |conn: ConnId| {
                subscribers.get(&conn).is_some_and(|s| s.held < s.limit)
                    && connections.get(&conn).is_some_and(|c| !c.is_paused())
            };
            let Some(conn) = queue.consumers.peek_next(has_room) else {
                break;
            };
            let (expired, loaded) = match queue.ready.front() {
                Some(front) => (is_expired(front.expires_at, now), front.content.is_some()),
                None => break,
            };
            if expired {
                table.retire(
                    queue,
                    connections,
                    name,
                    Place::ReadyFront,
                    Retirement::Expired,
                );
                continue;
            }
            if !loaded {
                break; // its content is still to come from the store
            }
            let Some(entry) = queue.ready.pop_front(&mut table.resident) else {
                break;
            };
            let Some(content) = entry.content else {
                break; // checked above
            };
            queue.consumers.advance_past(conn);
            table.totals.delivered += 1;
            let lease = queue.subscribers.get(&conn).map_or(0, |s| s.lease);
            let deliveries = entry.deliveries.saturating_add(1);
            if let Some(connection) = connections.get_mut(&conn) {
                connection.handed += content.len() + DISPATCH_FRAME_BYTES;
                if connection.handed >= DISPATCH_BURST_BYTES {
                    connection.paused.store(true, Ordering::Release);
                }
            }
            table.store.apply(StoreOp::Counted {
                id: entry.id,
                seq: entry.seq,
                deliveries,
            });
            out.push(Delivery {
                conn,
                queue: name.clone(),
                id: entry.id,
                content: content.clone(),
                ttl_remaining: (entry.expires_at != NEVER)
                    .then(|| remaining_seconds(entry.expires_at, now)),
                deliveries,
            });
            let held = Held {
                queue: name.clone(),
                seq: entry.seq,
                content,
                accepted_at: entry.accepted_at,
                expires_at: entry.expires_at,
                holder: conn,
                deliveries,
                lease,
                lease_until: lease::lease_deadline(now, lease),
            };
            table.hold(queue, entry.id, held);
        }
        queue.fetch_ahead(name, table);
    }

    fn drop_queue_if_unused(&mut self, name: &QueueName) {
        if self.queues.get(name).is_some_and(Queue::is_unused) {
            self.queues.remove(name);
            self.names.remove(name);
            // A map keeps its capacity, and a queue is held inline: after a million queues
            // were flushed it kept hundreds of megabytes. Halved once it is a quarter full, so
            // the rehash is paid for by the removals before it.
            if self.queues.capacity() > 4 * self.queues.len().max(MIN_QUEUE_CAPACITY) {
                self.queues
                    .shrink_to((2 * self.queues.len()).max(MIN_QUEUE_CAPACITY));
            }
        }
    }
}

/// The queue map is not shrunk below room for this many queues.
const MIN_QUEUE_CAPACITY: usize = 1024;

/// The queue named `name`, created (and its name recorded in `names`) if it does not exist.
fn queue_or_new<'a>(
    queues: &'a mut HashMap<QueueName, Queue>,
    names: &mut BTreeSet<QueueName>,
    name: &QueueName,
) -> &'a mut Queue {
    match queues.entry(name.clone()) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => {
            names.insert(name.clone());
            entry.insert(Queue::default())
        }
    }
}

#[cfg(test)]
mod tests;
