//! What the admin console sees and does: per-queue status, message listings, flushes.

use super::{Broker, ConnId, Delivery, Message};
use crate::id::MessageId;
use crate::request::QueueName;
use crate::store::Millis;

/// One queue, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStatus {
    pub name: QueueName,
    pub ready: usize,
    pub in_flight: usize,
    pub consumers: usize,
    /// Content bytes of its messages, ready and in flight.
    pub bytes: u64,
    /// How long the oldest ready message has waited since it was accepted.
    pub oldest_ready_ms: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageState {
    Ready,
    InFlight,
}

/// One message, as `show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    /// Place in the queue (1 = next to go) for ready messages.
    pub position: Option<usize>,
    pub id: MessageId,
    pub size: usize,
    pub age_ms: Millis,
    pub state: MessageState,
}

/// The first messages of a queue and how many there are in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub rows: Vec<MessageRow>,
    pub total: usize,
}

impl Broker {
    /// Every queue, sorted by name.
    pub fn queue_statuses(&self, now: Millis) -> Vec<QueueStatus> {
        let mut statuses: Vec<QueueStatus> = self
            .queues
            .iter()
            .map(|(name, queue)| QueueStatus {
                name: name.clone(),
                ready: queue.ready_count,
                in_flight: queue.in_flight,
                consumers: queue.consumers.len(),
                bytes: queue.bytes,
                oldest_ready_ms: queue
                    .ready
                    .iter()
                    .find_map(|(seq, id)| self.live_ready(*seq, *id))
                    .map(|m| now.saturating_sub(m.accepted_at)),
            })
            .collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }

    /// The queue names, sorted.
    pub fn queue_names(&self) -> Vec<QueueName> {
        let mut names: Vec<QueueName> = self.queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// Up to `limit` messages of `queue`: the ready ones in the order they will go, then the
    /// ones in flight. `None` if there is no such queue.
    pub fn list_messages(&self, queue: &str, limit: usize, now: Millis) -> Option<Listing> {
        let q = self.queues.get(queue)?;
        let row = |id: MessageId, m: &Message, position, state| MessageRow {
            position,
            id,
            size: m.content.len(),
            age_ms: now.saturating_sub(m.accepted_at),
            state,
        };
        let ready = q
            .ready
            .iter()
            .filter_map(|&(seq, id)| self.live_ready(seq, id).map(|m| (id, m)))
            .enumerate()
            .map(|(i, (id, m))| row(id, m, Some(i + 1), MessageState::Ready));
        let mut in_flight: Vec<(u64, MessageId)> = self
            .connections
            .values()
            .flat_map(|c| c.held.iter())
            .filter_map(|id| {
                let m = self.table.messages.get(id)?;
                (m.queue.as_str() == queue).then_some((m.seq, *id))
            })
            .collect();
        in_flight.sort_unstable();
        let in_flight = in_flight.into_iter().filter_map(|(_, id)| {
            let m = self.table.messages.get(&id)?;
            Some(row(id, m, None, MessageState::InFlight))
        });
        Some(Listing {
            rows: ready.chain(in_flight).take(limit).collect(),
            total: q.ready_count + q.in_flight,
        })
    }

    /// Drops every message of `queue`, ready and in flight (acknowledgements that come later
    /// for those are ignored). Returns how many, or `None` if there is no such queue.
    pub fn flush(&mut self, queue: &str, now: Millis, out: &mut Vec<Delivery>) -> Option<usize> {
        let name = self.queues.get_key_value(queue)?.0.clone();
        let mut doomed: Vec<MessageId> = Vec::new();
        if let Some(q) = self.queues.get_mut(queue) {
            let messages = &self.table.messages;
            doomed.extend(q.ready.drain(..).filter_map(|(seq, id)| {
                messages
                    .get(&id)
                    .is_some_and(|m| m.seq == seq && m.holder.is_none())
                    .then_some(id)
            }));
            q.ready_count = 0;
            q.in_flight = 0;
        }
        let holders: Vec<ConnId> = self
            .queues
            .get(queue)
            .map(|q| q.subscribers.keys().copied().collect())
            .unwrap_or_default();
        for conn in holders {
            let (Some(connection), Some(q)) =
                (self.connections.get_mut(&conn), self.queues.get_mut(queue))
            else {
                continue;
            };
            let messages = &self.table.messages;
            let held_here: Vec<MessageId> = connection
                .held
                .iter()
                .copied()
                .filter(|id| messages.get(id).is_some_and(|m| m.queue == name))
                .collect();
            for id in &held_here {
                connection.held.remove(id);
            }
            if let Some(subscription) = q.subscribers.get_mut(&conn) {
                subscription.held = 0;
            }
            q.forget_idle_subscriber(conn, connection, &name);
            doomed.extend(held_here);
        }
        for &id in &doomed {
            self.forget_in(&name, id);
        }
        self.table.totals.flushed += doomed.len() as u64;
        // Consumers that held some have room again; new messages may already be waiting.
        self.pump(&name, now, out);
        self.drop_queue_if_unused(&name);
        Some(doomed.len())
    }

    /// Flushes every queue; returns how many messages were dropped.
    pub fn flush_all(&mut self, now: Millis, out: &mut Vec<Delivery>) -> usize {
        self.queue_names()
            .iter()
            .filter_map(|name| self.flush(name.as_str(), now, out))
            .sum()
    }

    fn live_ready(&self, seq: u64, id: MessageId) -> Option<&Message> {
        self.table
            .messages
            .get(&id)
            .filter(|m| m.seq == seq && m.holder.is_none())
    }
}
