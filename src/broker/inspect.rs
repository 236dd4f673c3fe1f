//! What the admin console sees and does: per-queue status, message listings, flushes, in
//! pieces small enough that a caller can release the broker lock between them.

use super::retire::{Place, Retirement};
use super::{Broker, Delivery, Queue};
use crate::id::MessageId;
use crate::request::QueueName;
use crate::store::Millis;
use std::ops::Bound;

/// One queue, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStatus {
    pub name: QueueName,
    pub ready: usize,
    /// Not due yet (v1.2 rule 5).
    pub delayed: usize,
    pub in_flight: usize,
    pub consumers: usize,
    /// Content bytes of its messages, ready, delayed and in flight.
    pub bytes: u64,
    /// How long the oldest ready message has waited since it was accepted.
    pub oldest_ready_ms: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageState {
    Ready,
    /// Not due yet (v1.2 rule 5).
    Delayed,
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

/// How many queues the console's `status` and `search` look at per acquisition of the broker
/// lock: a few ms in a debug build, so other clients never wait long behind a status of
/// 100,000 queues.
pub const STATUS_CHUNK: usize = 2048;
/// How many queues `flushall` flushes per acquisition of the broker lock (a flush also tells
/// the store and wakes consumers, so the chunk is smaller).
pub const FLUSH_CHUNK: usize = 256;

impl Broker {
    /// Every queue, sorted by name, in one go: for tests and small brokers. The console walks
    /// them in chunks with [`Broker::queue_statuses_after`] instead.
    pub fn queue_statuses(&self, now: Millis) -> Vec<QueueStatus> {
        self.queue_statuses_after(None, usize::MAX, now)
    }

    /// Up to `limit` queues whose names sort after `after` (from the first if `None`), in
    /// name order. A caller that releases the lock between calls and resumes after the last
    /// name it got sees every queue that existed throughout, once.
    pub fn queue_statuses_after(
        &self,
        after: Option<&QueueName>,
        limit: usize,
        now: Millis,
    ) -> Vec<QueueStatus> {
        self.names_after(after)
            .take(limit)
            .filter_map(|name| self.queues.get(name).map(|q| status_of(name, q, now)))
            .collect()
    }

    /// The queue names, sorted.
    pub fn queue_names(&self) -> Vec<QueueName> {
        self.names.iter().cloned().collect()
    }

    /// Up to `limit` queue names that sort after `after`, in order (see
    /// [`Broker::queue_statuses_after`]).
    pub fn queue_names_after(&self, after: Option<&QueueName>, limit: usize) -> Vec<QueueName> {
        self.names_after(after).take(limit).cloned().collect()
    }

    fn names_after(&self, after: Option<&QueueName>) -> impl Iterator<Item = &QueueName> {
        let from = match after {
            Some(name) => Bound::Excluded(name),
            None => Bound::Unbounded,
        };
        self.names
            .range::<QueueName, _>((from, Bound::<&QueueName>::Unbounded))
    }

    /// Up to `limit` messages of `queue`: the ready ones in the order they will go, the
    /// delayed ones in the order they will join, then the ones in flight. `None` if there is
    /// no such queue.
    pub fn list_messages(&self, queue: &str, limit: usize, now: Millis) -> Option<Listing> {
        let q = self.queues.get(queue)?;
        let ready = q.ready.iter().enumerate().map(|(i, e)| MessageRow {
            position: Some(i + 1),
            id: e.id,
            size: e.size,
            age_ms: now.saturating_sub(e.accepted_at),
            state: MessageState::Ready,
        });
        let mut delayed: Vec<(Millis, u64, MessageRow)> = q
            .delayed
            .iter()
            .map(|(seq, d)| {
                let row = MessageRow {
                    position: None,
                    id: d.id,
                    size: d.size,
                    age_ms: now.saturating_sub(d.accepted_at),
                    state: MessageState::Delayed,
                };
                (d.due_at, seq, row)
            })
            .collect();
        delayed.sort_unstable_by_key(|(at, seq, _)| (*at, *seq));
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
                .chain(delayed.into_iter().map(|(_, _, row)| row))
                .chain(in_flight.into_iter().map(|(_, row)| row))
                .take(limit)
                .collect(),
            total: q.ready.len() + q.delayed.len() + q.in_flight.messages,
        })
    }

    /// Drops every message of `queue`, ready, delayed and in flight (acknowledgements that
    /// come later for those are ignored). Returns how many, or `None` if there is no such
    /// queue.
    pub fn flush(&mut self, queue: &str, now: Millis, out: &mut Vec<Delivery>) -> Option<usize> {
        let name = self.queues.get_key_value(queue)?.0.clone();
        let q = self.queues.get_mut(queue)?;
        // An answer to a fetch under way finds nothing to fill.
        q.fetching = None;
        let mut flushed = 0;
        while self.table.retire(
            q,
            &mut self.connections,
            &name,
            Place::ReadyFront,
            Retirement::Flushed,
        ) {
            flushed += 1;
        }
        let delayed: Vec<u64> = q.delayed.iter().map(|(seq, _)| seq).collect();
        for seq in delayed {
            let place = Place::Delayed(seq);
            if self
                .table
                .retire(q, &mut self.connections, &name, place, Retirement::Flushed)
            {
                flushed += 1;
            }
        }
        // Its holders are among its subscribers (a subscription lasts while it holds).
        let held_here: Vec<MessageId> = if q.in_flight.messages > 0 {
            let holders: Vec<super::ConnId> = (q.subscribers.iter())
                .filter(|(_, subscription)| subscription.held > 0)
                .map(|(holder, _)| *holder)
                .collect();
            holders
                .into_iter()
                .flat_map(|holder| self.table.held_ids(holder, Some(&name)))
                .collect()
        } else {
            Vec::new()
        };
        for id in held_here {
            let place = Place::Held(id);
            if self
                .table
                .retire(q, &mut self.connections, &name, place, Retirement::Flushed)
            {
                flushed += 1;
            }
        }
        // Consumers that held some have room again; new messages may already be waiting.
        self.pump(&name, now, out);
        self.drop_queue_if_unused(&name);
        Some(flushed)
    }

    /// A FLUSH request (v1.2 rule 3): [`Broker::flush`], 0 for a queue that does not exist
    /// (which is not created). The count is exact: a queue is flushed in one call, whatever
    /// its size; only `flushall` walks the queues in chunks.
    pub fn flush_queue(&mut self, queue: &str, now: Millis, out: &mut Vec<Delivery>) -> usize {
        self.flush(queue, now, out).unwrap_or(0)
    }

    /// Flushes every queue; returns how many messages were dropped.
    pub fn flush_all(&mut self, now: Millis, out: &mut Vec<Delivery>) -> usize {
        self.flush_after(None, usize::MAX, now, out).0
    }

    /// Flushes up to `limit` queues whose names sort after `after` (see
    /// [`Broker::queue_statuses_after`]): (messages dropped, queues flushed, the last name, to
    /// resume after; `None` when there were no more).
    pub fn flush_after(
        &mut self,
        after: Option<&QueueName>,
        limit: usize,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> (usize, usize, Option<QueueName>) {
        let names = self.queue_names_after(after, limit);
        let messages = names
            .iter()
            .filter_map(|name| self.flush(name.as_str(), now, out))
            .sum();
        (messages, names.len(), names.last().cloned())
    }
}

fn status_of(name: &QueueName, queue: &Queue, now: Millis) -> QueueStatus {
    QueueStatus {
        name: name.clone(),
        ready: queue.ready.len(),
        delayed: queue.delayed.len(),
        in_flight: queue.in_flight.messages,
        consumers: queue.consumers.len(),
        bytes: queue.bytes(),
        oldest_ready_ms: queue
            .ready
            .iter()
            .next()
            .map(|e| now.saturating_sub(e.accepted_at)),
    }
}
