//! Delayed messages (v1.2 rule 5): accepted, but not ready before their due time. Each queue's
//! `DelayedList` owns its delayed messages and their counts; the table's `due` index orders
//! every delayed message by (due time, seq), so a timer tick looks only at what is due, never
//! at every stored message. A message that becomes due gets a new seq at the tail of its
//! queue; messages due at the same time keep their seq (send) order.

use super::retire::{is_expired, Place, Retirement};
use super::window::Amount;
use super::{Broker, Delivery, MessageTable, Queue, EXPIRE_BATCH, MAX_EXPIRES_AT, NEVER};
use crate::id::MessageId;
use crate::request::QueueName;
use crate::store::{Millis, StoreOp};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A message waiting for its due time. Its seq is its key in the `DelayedList`.
#[derive(Debug)]
pub(super) struct Delayed {
    pub(super) id: MessageId,
    /// `None` when the store can read it back: a delay may be long, memory is not spent on it.
    pub(super) content: Option<Arc<[u8]>>,
    pub(super) size: usize,
    pub(super) accepted_at: Millis,
    pub(super) expires_at: Millis,
    pub(super) due_at: Millis,
    pub(super) deliveries: u32,
}

/// A queue's delayed messages, by seq, and their counts.
#[derive(Debug, Default)]
pub(super) struct DelayedList {
    entries: BTreeMap<u64, Delayed>,
    amount: Amount,
}

impl DelayedList {
    pub(super) fn len(&self) -> usize {
        self.amount.messages
    }

    pub(super) fn is_empty(&self) -> bool {
        self.amount.messages == 0
    }

    pub(super) fn bytes(&self) -> u64 {
        self.amount.bytes
    }

    pub(super) fn get(&self, seq: u64) -> Option<&Delayed> {
        self.entries.get(&seq)
    }

    pub(super) fn insert(&mut self, seq: u64, delayed: Delayed) {
        self.amount.add(delayed.size);
        if let Some(old) = self.entries.insert(seq, delayed) {
            self.amount.remove(old.size); // cannot happen: seqs are never reused
        }
    }

    pub(super) fn remove(&mut self, seq: u64) -> Option<Delayed> {
        let delayed = self.entries.remove(&seq)?;
        self.amount.remove(delayed.size);
        Some(delayed)
    }

    /// (seq, message), by seq.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Delayed)> {
        self.entries.iter().map(|(seq, d)| (*seq, d))
    }
}

impl MessageTable {
    /// Keeps a message (at `seq` of `queue`) until its due time: in the queue's list, the
    /// due index and the expiry index.
    pub(super) fn delay(&mut self, queue: &mut Queue, name: &QueueName, seq: u64, d: Delayed) {
        self.index_expiry(name, seq, d.expires_at);
        self.due.insert((d.due_at, seq), name.clone());
        queue.delayed.insert(seq, d);
    }

    /// What a delayed message keeps in memory: nothing when the store can read it back.
    pub(super) fn delayed_content(&self, content: Arc<[u8]>) -> Option<Arc<[u8]>> {
        self.window.is_none().then_some(content)
    }
}

/// When a message delayed by `delay` ms at `now` is due; `None` for no delay. Clamped like an
/// expiry time, so the stored time reads back the same. `now` is cut to the millisecond, up
/// to one before the true time: the delay counts from the next one, so that it is never cut
/// short (it may end up to a millisecond late instead).
pub(super) fn due_time(now: Millis, delay: Option<u64>) -> Option<Millis> {
    delay
        .filter(|&d| d > 0)
        .map(|d| now.saturating_add(d).saturating_add(1).min(MAX_EXPIRES_AT))
}

impl Broker {
    /// Moves the delayed messages that are due at `now` to the tail of their queues, in (due
    /// time, seq) order, at most [`EXPIRE_BATCH`] per call (the rest go on the next); one
    /// whose TTL ran out meanwhile expires instead. Dispatches what it can; returns how many
    /// became ready.
    pub(super) fn release_due(&mut self, now: Millis, out: &mut Vec<Delivery>) -> usize {
        let mut released = 0;
        let mut seen = 0;
        let mut touched: BTreeSet<QueueName> = BTreeSet::new();
        while let Some((&(at, seq), _)) = self.table.due.first_key_value() {
            if at > now || seen >= EXPIRE_BATCH {
                break;
            }
            seen += 1;
            let Some((_, name)) = self.table.due.pop_first() else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            if queue.delayed.get(seq).is_none_or(|d| d.due_at != at) {
                continue; // gone meanwhile
            }
            if queue
                .delayed
                .get(seq)
                .is_some_and(|d| is_expired(d.expires_at, now))
            {
                let place = Place::Delayed(seq);
                let reason = Retirement::Expired;
                self.table
                    .retire(queue, &mut self.connections, &name, place, reason);
            } else if let Some(d) = queue.delayed.remove(seq) {
                if d.expires_at != NEVER {
                    self.table.expiry.remove(&(d.expires_at, seq));
                }
                let new_seq = self.take_seq();
                self.table.store.apply(StoreOp::Requeue {
                    id: d.id,
                    old_seq: seq,
                    seq: new_seq,
                    expires_at: super::stored_expiry(d.expires_at),
                    due_at: None,
                    deliveries: d.deliveries,
                    queue: None,
                });
                let ready = super::ready::Ready::new(
                    new_seq,
                    d.id,
                    d.size,
                    d.content,
                    d.accepted_at,
                    d.expires_at,
                    d.deliveries,
                );
                self.append_ready(&name, ready);
                released += 1;
            }
            touched.insert(name);
        }
        for name in &touched {
            self.pump(name, now, out);
            self.drop_queue_if_unused(name);
        }
        released
    }
}
