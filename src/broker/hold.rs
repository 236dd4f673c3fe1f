//! Holds: a message a connection took and has not acknowledged yet. Starting and ending a
//! hold keeps the queue's `in_flight` and the subscription's `held` in step with `held`; the
//! client requests on held messages (ack, re-queue, dead letter) and a disconnect's return of
//! everything held live here.

use super::delay::{due_time, Delayed};
use super::ready::Ready;
use super::retire::{Place, Retirement};
use super::{
    expiry, queue_or_new, stored_expiry, Broker, ConnId, Connection, Delivery, MessageTable, Queue,
    NEVER,
};
use crate::id::{IdMap, IdSet, MessageId};
use crate::request::QueueName;
use crate::store::{Millis, StoreOp};
use log::debug;
use std::collections::HashMap;
use std::sync::Arc;

/// Who ended a connection (see [`Broker::disconnect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    /// Its client closed it, went away, or broke the protocol.
    Client,
    /// The server closed it: a stop, or a send refused to a v1.0/v1.1 client that cannot be
    /// told otherwise. A routine restart is not a worker failing on its message.
    Server,
}

/// A message a connection holds until it acknowledges, re-queues or dead-letters it.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) queue: QueueName,
    pub(super) seq: u64,
    pub(super) content: Arc<[u8]>,
    pub(super) accepted_at: Millis,
    pub(super) expires_at: Millis,
    pub(super) holder: ConnId,
    /// Dispatches so far, this one included.
    pub(super) deliveries: u32,
    /// The lease it was dispatched under (ms, 0 = none): a TOUCH restarts it.
    pub(super) lease: u64,
    /// When it is taken back (`NEVER`: held until acked or its holder leaves).
    pub(super) lease_until: Millis,
}

impl Held {
    /// Back to waiting at its original place (a disconnect).
    fn into_ready(self, id: MessageId) -> Ready {
        let size = self.content.len();
        Ready::new(
            self.seq,
            id,
            size,
            Some(self.content),
            self.accepted_at,
            self.expires_at,
            self.deliveries,
        )
    }
}

impl MessageTable {
    /// Ends the hold on `id` (of the queue `name`): out of `held`, out of its queue's and its
    /// holder's counts. The caller decides where the message goes next.
    pub(super) fn unhold(
        &mut self,
        queue: &mut Queue,
        connections: &mut IdMap<ConnId, Connection>,
        name: &QueueName,
        id: MessageId,
    ) -> Option<Held> {
        let held = self.held.remove(&id)?;
        // An emptied set stays (a consumer's holds come and go by the dozen): the holder's
        // disconnect removes it.
        if let Some(ids) = self.held_by.get_mut(&held.holder) {
            ids.remove(&id);
            // Unless it grew large (up to 65,536 a queue): that room is given back.
            if ids.is_empty() && ids.capacity() > 1024 {
                *ids = IdSet::default();
            }
        }
        if held.lease_until != NEVER {
            self.leases.remove(&(held.lease_until, id));
        }
        queue.end_hold(held.holder, held.content.len(), connections, name);
        Some(held)
    }

    /// Starts a hold: the message is in `held`, in its queue's and its holder's counts.
    pub(super) fn hold(&mut self, queue: &mut Queue, id: MessageId, held: Held) {
        queue.start_hold(held.holder, held.content.len());
        self.index_lease(id, held.lease_until);
        self.held_by.entry(held.holder).or_default().insert(id);
        self.held.insert(id, held);
    }
}

impl Queue {
    pub(super) fn start_hold(&mut self, conn: ConnId, size: usize) {
        self.in_flight.add(size);
        if let Some(subscription) = self.subscribers.get_mut(&conn) {
            subscription.held += 1;
        }
    }

    /// Uncounts a hold of `conn`, and ends its subscription if it neither may nor does hold
    /// anything here any more. (A disconnected holder has no subscription left to count.)
    pub(super) fn end_hold(
        &mut self,
        conn: ConnId,
        size: usize,
        connections: &mut IdMap<ConnId, Connection>,
        name: &QueueName,
    ) {
        self.in_flight.remove(size);
        if let Some(subscription) = self.subscribers.get_mut(&conn) {
            subscription.held = subscription.held.saturating_sub(1);
        }
        if let Some(connection) = connections.get_mut(&conn) {
            self.forget_idle_subscriber(conn, connection, name);
        }
    }

    /// Ends a connection's subscription once it neither may nor does hold anything here.
    pub(super) fn forget_idle_subscriber(
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
            connection.queues.remove(name);
        }
    }
}

impl Broker {
    /// Acknowledges a held message: it is gone for good. Returns whether it was held by `conn`.
    pub fn ack(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        self.retire_held(conn, queue, id, Retirement::Acknowledged, now, out)
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
        self.retire_held(conn, queue, id, Retirement::DeadLettered, now, out)
    }

    /// Retires a message `conn` holds in `queue` at its request.
    fn retire_held(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        reason: Retirement,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let action = match reason {
            Retirement::DeadLettered => "dead letter",
            _ => "ack",
        };
        let Some(id) = self.held_by(conn, queue, id, action) else {
            return false;
        };
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        let place = Place::Held(id);
        if !self
            .table
            .retire(q, &mut self.connections, queue, place, reason)
        {
            return false;
        }
        // The holder has room again.
        self.pump(queue, now, out);
        self.drop_queue_if_unused(queue);
        true
    }

    /// Moves a held message to the tail of its queue with a new TTL (0: never expires); with a
    /// `delay` (ms, 0 = none) it joins the tail once that has passed (v1.2 rule 5).
    #[allow(clippy::too_many_arguments)] // the request's fields, and the broker's usual two
    pub fn requeue(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        ttl: u64,
        delay: Option<u64>,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let Some(id) = self.held_by(conn, queue, id, "requeue") else {
            return false;
        };
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        let Some(held) = self.table.unhold(q, &mut self.connections, queue, id) else {
            return false;
        };
        if let Some(dead) = self.dead_letter_target(queue.as_str(), held.deliveries) {
            // Its TTL stays the one it had: the re-queue (and its new TTL) did not happen.
            self.move_to_dead(id, held, &dead, now, out);
            // The holder has room again.
            self.pump(queue, now, out);
            self.drop_queue_if_unused(queue);
            return true;
        }
        if held.expires_at != NEVER {
            self.table.expiry.remove(&(held.expires_at, held.seq));
        }
        let seq = self.take_seq();
        let expires_at = expiry(now, Some(ttl));
        let due_at = due_time(now, delay);
        self.table.store.apply(StoreOp::Requeue {
            id,
            old_seq: held.seq,
            seq,
            expires_at: stored_expiry(expires_at),
            due_at,
            deliveries: held.deliveries,
            queue: None,
        });
        self.table.totals.requeued += 1;
        let size = held.content.len();
        if let Some(due_at) = due_at {
            let delayed = Delayed {
                id,
                content: self.table.delayed_content(held.content),
                size,
                accepted_at: held.accepted_at,
                expires_at,
                due_at,
                deliveries: held.deliveries,
            };
            let q = queue_or_new(&mut self.queues, &mut self.names, queue);
            self.table.delay(q, queue, seq, delayed);
            // The holder has room again.
            self.pump(queue, now, out);
            return true;
        }
        let ready = Ready::new(
            seq,
            id,
            size,
            Some(held.content),
            held.accepted_at,
            expires_at,
            held.deliveries,
        );
        self.append_ready(queue, ready);
        self.pump(queue, now, out);
        true
    }

    /// A connection is gone: everything it held goes back to its queue at its original place,
    /// and is offered to the remaining consumers at once. Ended by its client, each of those
    /// dispatches is a failed try (at the maximum, the message is dead-lettered instead);
    /// ended by the server (a stop, a send it could not tell a v1 client it refused), none is.
    pub fn disconnect(
        &mut self,
        conn: ConnId,
        ended_by: EndedBy,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) {
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
        // In FIFO order: those moved to a dead-letter queue arrive there in that order.
        let ids = self.table.held_ids(conn, None);
        let mut returned: HashMap<QueueName, Vec<Ready>> = HashMap::new();
        for id in ids {
            let Some(name) = self.table.held.get(&id).map(|h| h.queue.clone()) else {
                continue;
            };
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            if let Some(held) = self.table.unhold(queue, &mut self.connections, &name, id) {
                let may_dead_letter = ended_by == EndedBy::Client;
                if let Some(ready) = self.give_back(&name, id, held, may_dead_letter, now, out) {
                    returned.entry(name).or_default().push(ready);
                }
            }
        }
        self.table.held_by.remove(&conn);
        for (name, entries) in returned {
            if let Some(queue) = self.queues.get_mut(&name) {
                queue.ready.put_back(entries, &mut self.table.resident);
            }
            affected.insert(name);
        }
        for name in &affected {
            self.pump(name, now, out);
            self.drop_queue_if_unused(name);
        }
    }

    /// A held message whose dispatch ended without an ack (its holder left, its lease ran
    /// out), out of `held` already: the caller puts the returned entry back at its place.
    /// At its last allowed dispatch it moves to its dead-letter queue instead (and `None` is
    /// returned), if `may_dead_letter`.
    pub(super) fn give_back(
        &mut self,
        name: &QueueName,
        id: MessageId,
        held: Held,
        may_dead_letter: bool,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> Option<Ready> {
        let dead = may_dead_letter
            .then(|| self.dead_letter_target(name.as_str(), held.deliveries))
            .flatten();
        if let Some(dead) = dead {
            self.move_to_dead(id, held, &dead, now, out);
            return None;
        }
        // Its count was stored at the dispatch.
        self.table.index_expiry(name, held.seq, held.expires_at);
        Some(held.into_ready(id))
    }

    /// The id `conn` names, if it holds that message in `queue`; logs why not otherwise.
    pub(super) fn held_by(
        &self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        action: &str,
    ) -> Option<MessageId> {
        // Checked first: the limiter takes a lock and the time, and this runs under the broker's.
        let admitted = || {
            log::log_enabled!(log::Level::Debug)
                .then(|| crate::ratelog::IGNORED_REQUEST.admit())
                .flatten()
        };
        let Some(id) = id else {
            if let Some(suppressed) = admitted() {
                debug!(
                    "connection {conn}: ignoring {action} for a malformed message id{suppressed}"
                );
            }
            return None;
        };
        let held_here = self
            .table
            .held
            .get(&id)
            .is_some_and(|h| h.holder == conn && h.queue == *queue);
        if !held_here {
            if let Some(suppressed) = admitted() {
                debug!(
                    "connection {conn}: ignoring {action} for message {id} in {queue}: not held \
                     by this connection{suppressed}"
                );
            }
            return None;
        }
        Some(id)
    }
}
