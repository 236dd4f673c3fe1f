//! What the admin console sees and does: per-queue status, message listings, flushes.

use super::{Broker, Delivery};
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
                    .find(|e| !e.dead)
                    .map(|e| now.saturating_sub(e.accepted_at)),
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
        let ready = q
            .ready
            .iter()
            .filter(|e| !e.dead)
            .enumerate()
            .map(|(i, e)| MessageRow {
                position: Some(i + 1),
                id: e.id,
                size: e.size,
                age_ms: now.saturating_sub(e.accepted_at),
                state: MessageState::Ready,
            });
        let mut in_flight: Vec<(u64, MessageRow)> = self
            .table
            .held
            .iter()
            .filter(|(_, h)| h.queue.as_str() == queue)
            .map(|(id, h)| {
                let row = MessageRow {
                    position: None,
                    id: *id,
                    size: h.content.len(),
                    age_ms: now.saturating_sub(h.accepted_at),
                    state: MessageState::InFlight,
                };
                (h.seq, row)
            })
            .collect();
        in_flight.sort_unstable_by_key(|(seq, _)| *seq);
        Some(Listing {
            rows: ready
                .chain(in_flight.into_iter().map(|(_, row)| row))
                .take(limit)
                .collect(),
            total: q.ready_count + q.in_flight,
        })
    }

    /// Drops every message of `queue`, ready and in flight (acknowledgements that come later
    /// for those are ignored). Returns how many, or `None` if there is no such queue.
    pub fn flush(&mut self, queue: &str, now: Millis, out: &mut Vec<Delivery>) -> Option<usize> {
        let name = self.queues.get_key_value(queue)?.0.clone();
        let mut doomed: Vec<(MessageId, u64, Millis)> = Vec::new();
        if let Some(q) = self.queues.get_mut(queue) {
            doomed.extend(
                q.ready
                    .drain(..)
                    .filter(|e| !e.dead)
                    .map(|e| (e.id, e.seq, e.expires_at)),
            );
            q.ready_count = 0;
            self.table.resident.messages -= q.resident.messages;
            self.table.resident.bytes -= q.resident.bytes;
            q.resident = Default::default();
            q.unloaded = 0;
            // An answer to a fetch under way finds nothing to fill.
            q.fetching = None;
            q.in_flight = 0;
            q.bytes = 0;
        }
        let held_here = self.table.held_ids(|h| h.queue == name);
        for id in held_here {
            let Some(held) = self.table.held.remove(&id) else {
                continue;
            };
            if let (Some(connection), Some(q)) = (
                self.connections.get_mut(&held.holder),
                self.queues.get_mut(queue),
            ) {
                if let Some(subscription) = q.subscribers.get_mut(&held.holder) {
                    subscription.held = subscription.held.saturating_sub(1);
                }
                q.forget_idle_subscriber(held.holder, connection, &name);
            }
            doomed.push((id, held.seq, held.expires_at));
        }
        for &(id, seq, expires_at) in &doomed {
            self.table.delete(id, seq, expires_at);
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
}
