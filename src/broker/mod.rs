//! The broker core: FIFO queues, round-robin consumer rings, holds and acknowledgements.
//!
//! A plain state machine with no sockets, no threads and no clock: every call gets the time as an
//! argument and appends the [`Delivery`]s it decides on to a caller-owned vector, which the
//! network layer writes out after it has released the lock around the broker. Every change to
//! the set of accepted messages goes to the [`Store`].
//!
//! Invariants:
//! - a message is either ready (an entry in its queue's `ready`, sorted by `seq`) or held by
//!   exactly one connection (an entry in `held`, keyed by id); only held messages are indexed
//!   by id, since only they can be named by a client (ack, re-queue, dead letter);
//! - a connection is in a queue's ring iff its subscription to that queue has a limit above 0;
//! - a queue's `subscribers` has an entry for a connection iff its limit or its holds in that
//!   queue are above 0, and the connection's `queues` names exactly those queues;
//! - a queue exists while it has ready or held messages or consumers; `names` holds exactly
//!   the names of the queues that exist, in order, so the console can walk them a chunk at a
//!   time (a hash map has no place to resume from);
//! - with a store that can read content back, a queue's live ready entries are its resident
//!   ones (content in memory) followed by its unloaded ones (content only in the store); the
//!   unloaded ones up to `loaded_through` are asked for, the rest are not yet; the table's
//!   `resident` is the sum of the queues'.

mod inspect;
mod ring;
mod window;

pub use inspect::{Listing, MessageRow, MessageState, QueueStatus, FLUSH_CHUNK, STATUS_CHUNK};

use crate::id::{IdGenerator, IdMap, MessageId};
use crate::request::{QueueName, Request};
use crate::store::{Millis, Store, StoreOp, StoredMessage, StoredRow};
use log::debug;
use ring::Ring;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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
    /// Remaining TTL in whole seconds (rounded up); only for v1.1 connections.
    pub ttl_remaining: Option<u64>,
}

/// Why a held message leaves for good.
#[derive(Clone, Copy)]
enum Removal {
    Acknowledged,
    DeadLettered,
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
}

/// A queue's counts, for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: usize,
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

/// A message waiting in its queue. The queue is implicit, which keeps the entry small: a
/// million waiting messages cost 72 MB here (plus the content of the resident ones), and no
/// hash table.
#[derive(Debug)]
struct Ready {
    seq: u64,
    id: MessageId,
    /// `None` while only the store has it, and once dead.
    content: Option<Arc<[u8]>>,
    /// The content's length.
    size: usize,
    accepted_at: Millis,
    /// [`NEVER`] or when it expires.
    expires_at: Millis,
    /// Expired in the middle of the queue: skipped when reached (see [`Queue::ready`]).
    dead: bool,
}

/// A message a connection holds until it acknowledges, re-queues or dead-letters it.
#[derive(Debug)]
struct Held {
    queue: QueueName,
    seq: u64,
    content: Arc<[u8]>,
    accepted_at: Millis,
    expires_at: Millis,
    holder: ConnId,
}

impl Held {
    fn into_ready(self, id: MessageId) -> Ready {
        Ready {
            seq: self.seq,
            id,
            size: self.content.len(),
            content: Some(self.content),
            accepted_at: self.accepted_at,
            expires_at: self.expires_at,
            dead: false,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// Waiting messages in FIFO order (ascending `seq`). Entries marked dead expired while
    /// waiting and are dropped when reached or compacted away; `ready_count` counts the rest.
    ready: VecDeque<Ready>,
    ready_count: usize,
    /// Live ready entries with their content in memory.
    resident: Amount,
    /// Live ready entries whose content only the store has.
    unloaded: usize,
    /// The newest seq that is resident or asked for: unloaded entries after it are not.
    loaded_through: u64,
    /// The token of the fetch under way.
    fetching: Option<u64>,
    in_flight: usize,
    /// Content bytes of the queue's messages, ready and in flight.
    bytes: u64,
    consumers: Ring<ConnId>,
    /// What each connection may hold of this queue and holds.
    subscribers: IdMap<ConnId, Subscription>,
}

#[derive(Debug)]
struct Subscription {
    limit: u64,
    held: u64,
}

#[derive(Debug, Default)]
struct Connection {
    speaks_v11: bool,
    /// Its output is backed up (the client is not reading): it gets nothing new until resumed.
    paused: bool,
    /// The queues where this connection has a subscription (usually one or two).
    queues: Vec<QueueName>,
}

/// Held messages, the expiry index, the store and the counters: everything that `pump` needs
/// besides the queue and the connections, so the borrows can be split.
struct MessageTable {
    held: IdMap<MessageId, Held>,
    /// (expires at, seq) of messages with a TTL, and their queue. Entries of messages that are
    /// held, re-queued or gone are skipped when they come up.
    expiry: BTreeMap<(Millis, u64), QueueName>,
    store: Box<dyn Store>,
    /// Set when the store can read content back: queues keep only this much in memory.
    window: Option<Window>,
    /// What all queues keep resident together.
    resident: Amount,
    last_fetch_token: u64,
    totals: Totals,
}

impl MessageTable {
    /// Reports a message gone for good and drops its expiry entry.
    fn delete(&mut self, id: MessageId, seq: u64, expires_at: Millis) {
        if expires_at != NEVER {
            self.expiry.remove(&(expires_at, seq));
        }
        self.store.apply(StoreOp::Delete { id, seq });
    }

    /// Ids of the held messages `matches` picks. Held messages are few (bounded by the
    /// consumers' counts), so a scan is cheap.
    fn held_ids(&self, matches: impl Fn(&Held) -> bool) -> Vec<MessageId> {
        self.held
            .iter()
            .filter(|(_, h)| matches(h))
            .map(|(id, _)| *id)
            .collect()
    }

    fn index_expiry(&mut self, queue: &QueueName, seq: u64, expires_at: Millis) {
        if expires_at != NEVER {
            self.expiry.insert((expires_at, seq), queue.clone());
        }
    }
}

fn is_expired(expires_at: Millis, now: Millis) -> bool {
    expires_at != NEVER && expires_at <= now
}

impl Queue {
    /// Pops the oldest live, unexpired message, dropping expired ones on the way. `None` also
    /// when the oldest one's content is still to come from the store.
    fn pop_ready(&mut self, table: &mut MessageTable, now: Millis) -> Option<Ready> {
        while let Some(entry) = self.ready.front() {
            if entry.dead {
                self.ready.pop_front();
                continue;
            }
            if is_expired(entry.expires_at, now) {
                let entry = self.ready.pop_front()?;
                self.forget_ready(&entry, &mut table.resident);
                self.bytes -= entry.size as u64;
                table.delete(entry.id, entry.seq, entry.expires_at);
                table.totals.expired += 1;
                continue;
            }
            // Its content is still to come from the store.
            entry.content.as_ref()?;
            let entry = self.ready.pop_front()?;
            self.forget_ready(&entry, &mut table.resident);
            return Some(entry);
        }
        None
    }

    /// Uncounts a live ready entry that leaves (to a holder, or for good: then the caller
    /// also takes its bytes off).
    fn forget_ready(&mut self, entry: &Ready, resident: &mut Amount) {
        self.ready_count -= 1;
        if entry.content.is_some() {
            self.resident.remove(entry.size);
            resident.remove(entry.size);
        } else {
            self.unloaded -= 1;
        }
    }

    /// Counts a live ready entry that arrives (from a holder, or new: then the caller also
    /// adds its bytes).
    fn count_ready(&mut self, entry: &Ready, resident: &mut Amount) {
        self.ready_count += 1;
        if entry.content.is_some() {
            self.resident.add(entry.size);
            resident.add(entry.size);
        } else {
            self.unloaded += 1;
        }
    }

    /// Puts messages back at their original places (with their content: they were held).
    fn return_ready(&mut self, mut entries: Vec<Ready>, resident: &mut Amount) {
        entries.sort_unstable_by_key(|e| e.seq);
        for entry in entries {
            self.count_ready(&entry, resident);
            let at = self.ready.partition_point(|e| e.seq < entry.seq);
            self.ready.insert(at, entry);
        }
    }

    fn is_unused(&self) -> bool {
        self.ready_count == 0 && self.in_flight == 0 && self.subscribers.is_empty()
    }

    /// Ends a connection's subscription once it neither may nor does hold anything here.
    fn forget_idle_subscriber(
        &mut self,
        conn: ConnId,
        connection: &mut Connection,
        name: &QueueName,
    ) {
        if self
            .subscribers
            .get(&conn)
            .is_some_and(|s| s.limit == 0 && s.held == 0)
        {
            self.subscribers.remove(&conn);
            connection.queues.retain(|q| q != name);
        }
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
                expiry: BTreeMap::new(),
                window: store.can_fetch().then_some(Window {
                    per_queue: RESIDENT_PER_QUEUE,
                    total: RESIDENT_TOTAL,
                    floor: RESIDENT_FLOOR,
                }),
                resident: Amount::default(),
                store,
                last_fetch_token: 0,
                totals: Totals::default(),
            },
            ids,
            next_seq: 1,
        }
    }

    /// Puts back a message recovered from storage, ready again. Call in FIFO (`seq`) order,
    /// before any client connects; the store already has it, so nothing is reported. Its
    /// content is copied only if the queue keeps it in memory.
    pub fn restore(&mut self, message: StoredRow<'_>) {
        self.next_seq = self.next_seq.max(message.seq + 1);
        let size = message.content.len();
        let (window, resident) = (self.table.window, self.table.resident);
        let keep = self
            .queues
            .get(message.queue.as_str())
            .is_none_or(|q| q.keeps_next(size, window, resident));
        let ready = Ready {
            seq: message.seq,
            id: message.id,
            content: keep.then(|| Arc::from(message.content)),
            size,
            accepted_at: message.accepted_at,
            expires_at: recovered_expiry(message.expires_at),
            dead: false,
        };
        self.append_ready(message.queue, ready);
    }

    pub fn connect(&mut self, conn: ConnId) {
        self.connections.entry(conn).or_default();
    }

    /// Applies one client request.
    pub fn handle(&mut self, conn: ConnId, request: Request, now: Millis, out: &mut Vec<Delivery>) {
        if request.shows_v11() {
            if let Some(connection) = self.connections.get_mut(&conn) {
                connection.speaks_v11 = true;
            }
        }
        match request {
            Request::Send {
                queue,
                content,
                ttl,
            } => {
                self.send(queue, content, ttl, now, out);
            }
            Request::Consume { queue, count } => self.consume(conn, queue, count, now, out),
            Request::Ack { queue, id } => {
                self.ack(conn, &queue, id, now, out);
            }
            Request::Requeue { queue, id, ttl } => {
                self.requeue(conn, &queue, id, ttl, now, out);
            }
            Request::DeadLetter { queue, id } => {
                self.dead_letter(conn, &queue, id, now, out);
            }
        }
    }

    /// Accepts a message at the tail of `queue` and returns its id.
    pub fn send(
        &mut self,
        queue: QueueName,
        content: Arc<[u8]>,
        ttl: Option<u64>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> MessageId {
        let id = self.ids.next_id();
        let seq = self.take_seq();
        let expires_at = expiry(now, ttl);
        self.table.store.apply(StoreOp::Insert(StoredMessage {
            id,
            queue: queue.clone(),
            content: content.clone(),
            accepted_at: now,
            expires_at: stored_expiry(expires_at),
            seq,
        }));
        self.table.totals.accepted += 1;
        let ready = Ready {
            seq,
            id,
            size: content.len(),
            content: Some(content),
            accepted_at: now,
            expires_at,
            dead: false,
        };
        self.append_ready(&queue, ready);
        self.pump(&queue, now, out);
        id
    }

    /// Sets how many unacknowledged messages of `queue` the connection may hold.
    pub fn consume(
        &mut self,
        conn: ConnId,
        queue: QueueName,
        count: u64,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) {
        let Some(connection) = self.connections.get_mut(&conn) else {
            return;
        };
        let q = queue_or_new(&mut self.queues, &mut self.names, &queue);
        let subscription = q.subscribers.entry(conn).or_insert_with(|| {
            connection.queues.push(queue.clone());
            Subscription { limit: 0, held: 0 }
        });
        subscription.limit = count;
        if count > 0 {
            q.consumers.insert(conn);
        } else {
            q.consumers.remove(conn);
            q.forget_idle_subscriber(conn, connection, &queue);
        }
        self.pump(&queue, now, out);
        self.drop_queue_if_unused(&queue);
    }

    /// Acknowledges a held message: it is gone for good. Returns whether it was held by `conn`.
    pub fn ack(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        self.remove_held(conn, queue, id, Removal::Acknowledged, now, out)
    }

    /// Removes a held message regardless of its TTL. Returns whether it was held by `conn`.
    pub fn dead_letter(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        self.remove_held(conn, queue, id, Removal::DeadLettered, now, out)
    }

    fn remove_held(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        removal: Removal,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let action = match removal {
            Removal::Acknowledged => "ack",
            Removal::DeadLettered => "dead letter",
        };
        let Some((id, held)) = self.release_hold(conn, queue, id, action) else {
            return false;
        };
        self.table.delete(id, held.seq, held.expires_at);
        if let Some(q) = self.queues.get_mut(queue) {
            q.bytes -= held.content.len() as u64;
        }
        match removal {
            Removal::Acknowledged => self.table.totals.acknowledged += 1,
            Removal::DeadLettered => self.table.totals.dead_lettered += 1,
        }
        // The holder has room again.
        self.pump(queue, now, out);
        self.drop_queue_if_unused(queue);
        true
    }

    /// Moves a held message to the tail of its queue with a new TTL (0: never expires).
    pub fn requeue(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        ttl: u64,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let Some((id, held)) = self.release_hold(conn, queue, id, "requeue") else {
            return false;
        };
        if held.expires_at != NEVER {
            self.table.expiry.remove(&(held.expires_at, held.seq));
        }
        let seq = self.take_seq();
        let expires_at = expiry(now, Some(ttl));
        self.table.store.apply(StoreOp::Requeue {
            id,
            old_seq: held.seq,
            seq,
            expires_at: stored_expiry(expires_at),
        });
        self.table.totals.requeued += 1;
        // append_ready counts its bytes again.
        if let Some(q) = self.queues.get_mut(queue) {
            q.bytes -= held.content.len() as u64;
        }
        let ready = Ready {
            seq,
            id,
            size: held.content.len(),
            content: Some(held.content),
            accepted_at: held.accepted_at,
            expires_at,
            dead: false,
        };
        self.append_ready(queue, ready);
        self.pump(queue, now, out);
        true
    }

    /// A connection is gone: everything it held goes back to its queue at its original place,
    /// and is offered to the remaining consumers at once.
    pub fn disconnect(&mut self, conn: ConnId, now: Millis, out: &mut Vec<Delivery>) {
        let Some(connection) = self.connections.remove(&conn) else {
            return;
        };
        let mut affected = connection.queues;
        for name in &affected {
            if let Some(queue) = self.queues.get_mut(name) {
                queue.consumers.remove(conn);
                queue.subscribers.remove(&conn);
            }
        }
        let ids = self.table.held_ids(|h| h.holder == conn);
        let mut returned: HashMap<QueueName, Vec<Ready>> = HashMap::new();
        for id in ids {
            if let Some(held) = self.table.held.remove(&id) {
                self.table
                    .index_expiry(&held.queue, held.seq, held.expires_at);
                let queue = held.queue.clone();
                returned.entry(queue).or_default().push(held.into_ready(id));
            }
        }
        for (name, entries) in returned {
            if let Some(queue) = self.queues.get_mut(&name) {
                queue.in_flight -= entries.len();
                queue.return_ready(entries, &mut self.table.resident);
            }
            if !affected.contains(&name) {
                affected.push(name);
            }
        }
        for name in &affected {
            self.pump(name, now, out);
            self.drop_queue_if_unused(name);
        }
    }

    /// Stops or resumes deliveries to a connection whose client is not keeping up; what it
    /// already holds stays held. Resuming offers it its queues' ready messages at once.
    pub fn set_paused(&mut self, conn: ConnId, paused: bool, now: Millis, out: &mut Vec<Delivery>) {
        let Some(connection) = self.connections.get_mut(&conn) else {
            return;
        };
        connection.paused = paused;
        if !paused {
            for name in connection.queues.clone() {
                self.pump(&name, now, out);
            }
        }
    }

    /// Drops ready messages whose TTL has run out, at most [`EXPIRE_BATCH`] per call so the
    /// broker lock is never held long (the rest go on the next call, and an expired message is
    /// never dispatched meanwhile); returns how many. Held messages are left to their holder
    /// and dropped only if they come back.
    pub fn expire(&mut self, now: Millis) -> usize {
        let mut expired = 0;
        while let Some((&(at, seq), _)) = self.table.expiry.first_key_value() {
            if at > now || expired >= EXPIRE_BATCH {
                break;
            }
            let Some((_, name)) = self.table.expiry.pop_first() else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            let Ok(at_pos) = queue.ready.binary_search_by_key(&seq, |e| e.seq) else {
                continue; // held, or gone
            };
            let entry = &mut queue.ready[at_pos];
            if entry.dead || entry.expires_at != at {
                continue;
            }
            let gone = Ready {
                content: entry.content.take(),
                ..*entry
            };
            entry.dead = true;
            let id = entry.id;
            queue.forget_ready(&gone, &mut self.table.resident);
            queue.bytes -= gone.size as u64;
            self.table.store.apply(StoreOp::Delete { id, seq });
            self.table.totals.expired += 1;
            expired += 1;
            // Dead entries are skipped when reached; compact when they dominate.
            if queue.ready.len() > 64 && queue.ready.len() > 2 * queue.ready_count {
                queue.ready.retain(|e| !e.dead);
            }
            self.drop_queue_if_unused(&name);
        }
        expired
    }

    pub fn totals(&self) -> Totals {
        self.table.totals
    }

    pub fn queue_stats(&self, name: &str) -> Option<QueueStats> {
        self.queues.get(name).map(|queue| QueueStats {
            ready: queue.ready_count,
            in_flight: queue.in_flight,
            consumers: queue.consumers.len(),
        })
    }

    /// How many messages are stored (ready and held).
    pub fn message_count(&self) -> usize {
        self.table.held.len() + self.queues.values().map(|q| q.ready_count).sum::<usize>()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Adds a message at the tail of its queue: its `seq` is the newest. Past the queue's
    /// window its content is let go (the store has it, and reads it back when its turn nears).
    fn append_ready(&mut self, queue: &QueueName, mut ready: Ready) {
        self.table.index_expiry(queue, ready.seq, ready.expires_at);
        let q = queue_or_new(&mut self.queues, &mut self.names, queue);
        if q.keeps_next(ready.size, self.table.window, self.table.resident) {
            q.loaded_through = ready.seq;
        } else {
            ready.content = None;
        }
        q.count_ready(&ready, &mut self.table.resident);
        q.bytes += ready.size as u64;
        q.ready.push_back(ready);
    }

    /// Checks that `conn` holds `id` in `queue` and ends the hold, returning the message.
    fn release_hold(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        action: &str,
    ) -> Option<(MessageId, Held)> {
        let Some(id) = id else {
            debug!("connection {conn}: ignoring {action} for a malformed message id");
            return None;
        };
        let held_here = self
            .table
            .held
            .get(&id)
            .is_some_and(|h| h.holder == conn && h.queue == *queue);
        if !held_here {
            debug!("connection {conn}: ignoring {action} for message {id} in {queue}: not held by this connection");
            return None;
        }
        let held = self.table.held.remove(&id)?;
        if let (Some(connection), Some(q)) =
            (self.connections.get_mut(&conn), self.queues.get_mut(queue))
        {
            q.in_flight -= 1;
            if let Some(subscription) = q.subscribers.get_mut(&conn) {
                subscription.held -= 1;
            }
            q.forget_idle_subscriber(conn, connection, queue);
        }
        Some((id, held))
    }

    /// Hands ready messages of one queue to its consumers with free capacity, round-robin.
    fn pump(&mut self, name: &QueueName, now: Millis, out: &mut Vec<Delivery>) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        let connections = &self.connections;
        let table = &mut self.table;
        while queue.ready_count > 0 {
            let subscribers = &queue.subscribers;
            let has_room = |conn: ConnId| {
                subscribers.get(&conn).is_some_and(|s| s.held < s.limit)
                    && connections.get(&conn).is_some_and(|c| !c.paused)
            };
            let Some(conn) = queue.consumers.peek_next(has_room) else {
                break;
            };
            let speaks_v11 = connections.get(&conn).is_some_and(|c| c.speaks_v11);
            let Some(entry) = queue.pop_ready(table, now) else {
                break;
            };
            let Some(content) = entry.content else {
                break; // pop_ready only returns entries with content
            };
            if let Some(subscription) = queue.subscribers.get_mut(&conn) {
                subscription.held += 1;
            }
            queue.in_flight += 1;
            queue.consumers.advance_past(conn);
            table.totals.delivered += 1;
            out.push(Delivery {
                conn,
                queue: name.clone(),
                id: entry.id,
                content: content.clone(),
                ttl_remaining: (speaks_v11 && entry.expires_at != NEVER)
                    .then(|| remaining_seconds(entry.expires_at, now)),
            });
            table.held.insert(
                entry.id,
                Held {
                    queue: name.clone(),
                    seq: entry.seq,
                    content,
                    accepted_at: entry.accepted_at,
                    expires_at: entry.expires_at,
                    holder: conn,
                },
            );
        }
        queue.fetch_ahead(name, table);
    }

    fn drop_queue_if_unused(&mut self, name: &QueueName) {
        if self.queues.get(name).is_some_and(Queue::is_unused) {
            self.queues.remove(name);
            self.names.remove(name);
        }
    }
}

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
