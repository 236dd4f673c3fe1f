//! The one way a message leaves the broker for good, whatever the reason (`Retirement`):
//! `MessageTable::retire` takes it out of where it is (`Place`), with its counts, drops its
//! expiry entry, tells the store and counts it in the totals under its reason. Also the expiry
//! sweep, which retires what ran out while waiting.

use super::{Broker, ConnId, Connection, MessageTable, Queue, Totals, EXPIRE_BATCH, NEVER};
use crate::id::{IdMap, MessageId};
use crate::request::QueueName;
use crate::store::{Millis, StoreOp};

/// Why a message leaves for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retirement {
    /// Its holder acknowledged it (`004`).
    Acknowledged,
    /// Its holder removed it regardless of its TTL (`006`).
    DeadLettered,
    /// Its TTL ran out while it waited.
    Expired,
    /// A flush dropped it, waiting or held.
    Flushed,
    /// The store could not read its content back: it has no row to delete.
    MissingFromStore,
}

/// Where a message to retire is in its queue.
#[derive(Clone, Copy, Debug)]
pub(super) enum Place {
    /// The oldest waiting message.
    ReadyFront,
    /// A waiting message anywhere in the queue, by seq.
    Ready(u64),
    /// A message a connection holds.
    Held(MessageId),
    /// A delayed message, by seq.
    Delayed(u64),
}

impl Totals {
    fn count_retired(&mut self, reason: Retirement) {
        let counter = match reason {
            Retirement::Acknowledged => &mut self.acknowledged,
            Retirement::DeadLettered => &mut self.dead_lettered,
            Retirement::Expired => &mut self.expired,
            Retirement::Flushed => &mut self.flushed,
            Retirement::MissingFromStore => &mut self.lost,
        };
        *counter += 1;
    }
}

impl MessageTable {
    /// Retires the message at `place` of the queue `name`: out of its list (its counts and
    /// its holder's with it), out of the expiry index and the store, counted under `reason`.
    /// False if there is no such message.
    pub(super) fn retire(
        &mut self,
        queue: &mut Queue,
        connections: &mut IdMap<ConnId, Connection>,
        name: &QueueName,
        place: Place,
        reason: Retirement,
    ) -> bool {
        let (id, seq, expires_at, size) = match place {
            Place::ReadyFront => match queue.ready.pop_front(&mut self.resident) {
                Some(entry) => (entry.id, entry.seq, entry.expires_at, entry.size),
                None => return false,
            },
            Place::Ready(seq) => match queue.ready.remove(seq, &mut self.resident) {
                Some(entry) => (entry.id, entry.seq, entry.expires_at, entry.size),
                None => return false,
            },
            Place::Held(id) => match self.unhold(queue, connections, name, id) {
                Some(held) => (id, held.seq, held.expires_at, held.content.len()),
                None => return false,
            },
            Place::Delayed(seq) => match queue.delayed.remove(seq) {
                Some(delayed) => {
                    self.due.remove(&(delayed.due_at, seq));
                    (delayed.id, seq, delayed.expires_at, delayed.size)
                }
                None => return false,
            },
        };
        self.stored.remove(size);
        if expires_at != NEVER {
            self.expiry.remove(&(expires_at, seq));
        }
        if reason != Retirement::MissingFromStore {
            self.store.apply(StoreOp::Delete { id, seq });
        }
        self.totals.count_retired(reason);
        true
    }
}

impl Broker {
    /// Drops ready and delayed messages whose TTL has run out, at most [`EXPIRE_BATCH`] per
    /// call so the broker lock is never held long (the rest go on the next call, and an expired
    /// message is never dispatched meanwhile); returns how many. Held messages are left to their holder
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
            // Held, re-queued (a new seq) or gone: not this entry's to expire.
            let place = if queue.ready.get(seq).is_some_and(|e| e.expires_at == at) {
                Place::Ready(seq)
            } else if queue.delayed.get(seq).is_some_and(|d| d.expires_at == at) {
                // Its TTL ran out before its due time (v1.2 rule 5): it expires undelivered.
                Place::Delayed(seq)
            } else {
                continue;
            };
            if self.table.retire(
                queue,
                &mut self.connections,
                &name,
                place,
                Retirement::Expired,
            ) {
                expired += 1;
            }
            self.drop_queue_if_unused(&name);
        }
        expired
    }
}

/// Whether a message expiring at `expires_at` has run out at `now`.
pub(super) fn is_expired(expires_at: Millis, now: Millis) -> bool {
    expires_at != NEVER && expires_at <= now
}
