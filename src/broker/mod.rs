//! The broker core: FIFO queues, round-robin consumer rings, holds and acknowledgements.
//!
//! A plain state machine with no sockets, no threads and no clock: every call gets the time as an
//! argument and appends the [`Delivery`]s it decides on to a caller-owned vector, which the
//! network layer writes out after it has released the lock around the broker. Every change to
//! the set of accepted messages goes to the [`Store`].
//!
//! Invariants:
//! - a message is either ready (an entry `(seq, id)` in its queue's `ready`, sorted by `seq`) or
//!   held by exactly one connection (`holder`); `ready` may also hold stale entries of messages
//!   that expired while waiting, skipped when popped (`ready_count` counts only live ones);
//! - a connection is in a queue's ring iff its subscription to that queue has a limit above 0;
//! - a queue's `subscribers` has an entry for a connection iff its limit or its holds in that
//!   queue are above 0, and the connection's `queues` names exactly those queues;
//! - a queue exists while it has ready or held messages or consumers.

mod inspect;
mod ring;

pub use inspect::{Listing, MessageRow, MessageState, QueueStatus};

use crate::id::{IdGenerator, IdMap, IdSet, MessageId};
use crate::request::{QueueName, Request};
use crate::store::{Millis, Store, StoreOp, StoredMessage};
use log::debug;
use ring::Ring;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

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

#[derive(Debug)]
struct Message {
    queue: QueueName,
    content: Arc<[u8]>,
    seq: u64,
    accepted_at: Millis,
    expires_at: Option<Millis>,
    holder: Option<ConnId>,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<(u64, MessageId)>,
    ready_count: usize,
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
    /// The queues where this connection has a subscription (usually one or two).
    queues: Vec<QueueName>,
    held: IdSet<MessageId>,
}

/// The messages themselves, their expiry index, the store and the counters: everything that
/// `pump` needs besides the queue and the connections, so the borrows can be split.
struct MessageTable {
    messages: IdMap<MessageId, Message>,
    expiry: BTreeSet<(Millis, MessageId)>,
    store: Box<dyn Store>,
    totals: Totals,
}

impl MessageTable {
    /// Removes a message for good; returns its content size.
    fn forget(&mut self, id: MessageId) -> u64 {
        let Some(message) = self.messages.remove(&id) else {
            return 0;
        };
        if let Some(at) = message.expires_at {
            self.expiry.remove(&(at, id));
        }
        self.store.apply(StoreOp::Delete {
            id,
            seq: message.seq,
        });
        message.content.len() as u64
    }
}

impl Queue {
    /// Pops the oldest live, unexpired message, dropping expired ones on the way.
    fn pop_ready(&mut self, table: &mut MessageTable, now: Millis) -> Option<MessageId> {
        while let Some((seq, id)) = self.ready.pop_front() {
            let Some(message) = table.messages.get(&id) else {
                continue;
            };
            if message.seq != seq || message.holder.is_some() {
                continue;
            }
            self.ready_count -= 1;
            if message.expires_at.is_some_and(|at| at <= now) {
                self.bytes -= table.forget(id);
                table.totals.expired += 1;
                continue;
            }
            return Some(id);
        }
        None
    }

    /// Puts messages back at their original places (`entries` sorted by seq).
    fn return_ready(&mut self, entries: &[(u64, MessageId)]) {
        for &entry in entries {
            let at = self.ready.partition_point(|&(seq, _)| seq < entry.0);
            self.ready.insert(at, entry);
        }
        self.ready_count += entries.len();
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
    connections: IdMap<ConnId, Connection>,
    table: MessageTable,
    ids: IdGenerator,
    next_seq: u64,
}

/// When a message with `ttl` seconds accepted at `now` expires; 0 means never.
fn expiry(now: Millis, ttl: Option<u64>) -> Option<Millis> {
    ttl.filter(|&seconds| seconds > 0)
        .map(|seconds| now.saturating_add(seconds.saturating_mul(1000)))
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
            connections: IdMap::default(),
            table: MessageTable {
                messages: IdMap::default(),
                expiry: BTreeSet::new(),
                store,
                totals: Totals::default(),
            },
            ids,
            next_seq: 1,
        }
    }

    /// Puts back a message recovered from storage, ready again. Call in FIFO (`seq`) order,
    /// before any client connects; the store already has it, so nothing is reported.
    pub fn restore(&mut self, message: StoredMessage) {
        self.next_seq = self.next_seq.max(message.seq + 1);
        self.insert_ready(
            message.id,
            Message {
                queue: message.queue,
                content: message.content,
                seq: message.seq,
                accepted_at: message.accepted_at,
                expires_at: message.expires_at,
                holder: None,
            },
        );
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
            expires_at,
            seq,
        }));
        self.table.totals.accepted += 1;
        self.insert_ready(
            id,
            Message {
                queue: queue.clone(),
                content,
                seq,
                accepted_at: now,
                expires_at,
                holder: None,
            },
        );
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
        let q = self.queues.entry(queue.clone()).or_default();
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
        let Some(id) = self.release_hold(conn, queue, id, action) else {
            return false;
        };
        self.forget_in(queue, id);
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
        let Some(id) = self.release_hold(conn, queue, id, "requeue") else {
            return false;
        };
        let seq = self.take_seq();
        let expires_at = expiry(now, Some(ttl));
        let Some(mut message) = self.table.messages.remove(&id) else {
            return false;
        };
        if let Some(at) = message.expires_at {
            self.table.expiry.remove(&(at, id));
        }
        if let Some(q) = self.queues.get_mut(queue) {
            q.bytes -= message.content.len() as u64;
        }
        self.table.store.apply(StoreOp::Requeue {
            id,
            old_seq: message.seq,
            seq,
            expires_at,
        });
        self.table.totals.requeued += 1;
        message.seq = seq;
        message.expires_at = expires_at;
        self.insert_ready(id, message);
        self.pump(queue, now, out);
        true
    }

    /// A connection is gone: everything it held goes back to its queue at its original place,
    /// and is offered to the remaining consumers at once.
    pub fn disconnect(&mut self, conn: ConnId, now: Millis, out: &mut Vec<Delivery>) {
        let Some(connection) = self.connections.remove(&conn) else {
            return;
        };
        let mut returned: HashMap<QueueName, Vec<(u64, MessageId)>> = HashMap::new();
        for id in connection.held {
            if let Some(message) = self.table.messages.get_mut(&id) {
                message.holder = None;
                returned
                    .entry(message.queue.clone())
                    .or_default()
                    .push((message.seq, id));
            }
        }
        let mut affected = connection.queues;
        for name in &affected {
            if let Some(queue) = self.queues.get_mut(name) {
                queue.consumers.remove(conn);
                queue.subscribers.remove(&conn);
            }
        }
        for (name, mut entries) in returned {
            entries.sort_unstable();
            if let Some(queue) = self.queues.get_mut(&name) {
                queue.in_flight -= entries.len();
                queue.return_ready(&entries);
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

    /// Drops ready messages whose TTL has run out; returns how many. Held messages are left to
    /// their holder and dropped only if they come back.
    pub fn expire(&mut self, now: Millis) -> usize {
        let mut expired = 0;
        while let Some(&(at, id)) = self.table.expiry.first() {
            if at > now {
                break;
            }
            self.table.expiry.pop_first();
            let Some(message) = self.table.messages.get(&id) else {
                continue;
            };
            if message.holder.is_some() {
                continue;
            }
            let name = message.queue.clone();
            let size = self.table.forget(id);
            self.table.totals.expired += 1;
            expired += 1;
            if let Some(queue) = self.queues.get_mut(&name) {
                queue.ready_count -= 1;
                queue.bytes -= size;
                // Stale entries are skipped when popped; compact when they dominate.
                if queue.ready.len() > 64 && queue.ready.len() > 2 * queue.ready_count {
                    let messages = &self.table.messages;
                    queue.ready.retain(|(seq, id)| {
                        messages
                            .get(id)
                            .is_some_and(|m| m.seq == *seq && m.holder.is_none())
                    });
                }
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
        self.table.messages.len()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Adds a message at the tail of its queue.
    fn insert_ready(&mut self, id: MessageId, message: Message) {
        if let Some(at) = message.expires_at {
            self.table.expiry.insert((at, id));
        }
        let queue = self.queues.entry(message.queue.clone()).or_default();
        queue.ready.push_back((message.seq, id));
        queue.ready_count += 1;
        queue.bytes += message.content.len() as u64;
        self.table.messages.insert(id, message);
    }

    /// Removes a message of `queue` for good, keeping the queue's byte count.
    fn forget_in(&mut self, queue: &QueueName, id: MessageId) {
        let size = self.table.forget(id);
        if let Some(q) = self.queues.get_mut(queue) {
            q.bytes -= size;
        }
    }

    /// Checks that `conn` holds `id` in `queue` and ends the hold; the message stays stored.
    fn release_hold(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        action: &str,
    ) -> Option<MessageId> {
        let Some(id) = id else {
            debug!("connection {conn}: ignoring {action} for a malformed message id");
            return None;
        };
        let held_here = self
            .table
            .messages
            .get(&id)
            .is_some_and(|m| m.holder == Some(conn) && m.queue == *queue);
        if !held_here {
            debug!("connection {conn}: ignoring {action} for message {id} in {queue}: not held by this connection");
            return None;
        }
        if let Some(message) = self.table.messages.get_mut(&id) {
            message.holder = None;
        }
        if let (Some(connection), Some(q)) =
            (self.connections.get_mut(&conn), self.queues.get_mut(queue))
        {
            connection.held.remove(&id);
            q.in_flight -= 1;
            if let Some(subscription) = q.subscribers.get_mut(&conn) {
                subscription.held -= 1;
            }
            q.forget_idle_subscriber(conn, connection, queue);
        }
        Some(id)
    }

    /// Hands ready messages of one queue to its consumers with free capacity, round-robin.
    fn pump(&mut self, name: &QueueName, now: Millis, out: &mut Vec<Delivery>) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        let connections = &mut self.connections;
        let table = &mut self.table;
        while queue.ready_count > 0 {
            let subscribers = &queue.subscribers;
            let has_room = |conn: ConnId| subscribers.get(&conn).is_some_and(|s| s.held < s.limit);
            let Some(conn) = queue.consumers.peek_next(has_room) else {
                break;
            };
            let Some(id) = queue.pop_ready(table, now) else {
                break;
            };
            let (Some(connection), Some(message)) =
                (connections.get_mut(&conn), table.messages.get_mut(&id))
            else {
                break;
            };
            message.holder = Some(conn);
            connection.held.insert(id);
            if let Some(subscription) = queue.subscribers.get_mut(&conn) {
                subscription.held += 1;
            }
            queue.in_flight += 1;
            queue.consumers.advance_past(conn);
            table.totals.delivered += 1;
            out.push(Delivery {
                conn,
                queue: name.clone(),
                id,
                content: message.content.clone(),
                ttl_remaining: if connection.speaks_v11 {
                    message.expires_at.map(|at| remaining_seconds(at, now))
                } else {
                    None
                },
            });
        }
    }

    fn drop_queue_if_unused(&mut self, name: &QueueName) {
        if self.queues.get(name).is_some_and(Queue::is_unused) {
            self.queues.remove(name);
        }
    }
}

#[cfg(test)]
mod tests;
