//! Leases (v1.2 rule 7): a message dispatched under a consume request with a lease is taken
//! back if its holder neither acks, re-queues nor dead-letters it in time. The table's
//! `leases` index orders the held messages that have a deadline by (deadline, id): exact (an
//! entry leaves with its hold), so a timer tick looks only at what ran out, and a message
//! without a lease costs nothing.

use super::{Broker, ConnId, Delivery, MessageTable, EXPIRE_BATCH, NEVER};
use crate::id::MessageId;
use crate::request::QueueName;
use crate::store::Millis;
use std::collections::BTreeSet;

impl MessageTable {
    /// Indexes a held message's lease deadline, if it has one.
    pub(super) fn index_lease(&mut self, id: MessageId, lease_until: Millis) {
        if lease_until != NEVER {
            self.leases.insert((lease_until, id));
        }
    }
}

/// When a lease of `lease` ms started at `now` runs out; [`NEVER`] for no lease. As a delay
/// (`delay::due_time`), it counts from the millisecond after `now`, never short.
pub(super) fn lease_deadline(now: Millis, lease: u64) -> Millis {
    if lease == 0 {
        NEVER
    } else {
        now.saturating_add(lease).saturating_add(1)
    }
}

impl Broker {
    /// TOUCH (v1.2 rule 7): restarts the lease of a message `conn` holds in `queue`. Returns
    /// whether it holds it (a message without a lease stays without one).
    pub fn touch(
        &mut self,
        conn: ConnId,
        queue: &QueueName,
        id: Option<MessageId>,
        now: Millis,
    ) -> bool {
        let Some(id) = self.held_by(conn, queue, id, "touch") else {
            return false;
        };
        let Some(held) = self.table.held.get_mut(&id) else {
            return false;
        };
        if held.lease_until == NEVER {
            return true;
        }
        let old = held.lease_until;
        held.lease_until = lease_deadline(now, held.lease);
        let new = held.lease_until;
        self.table.leases.remove(&(old, id));
        self.table.leases.insert((new, id));
        true
    }

    /// Takes back the held messages whose lease ran out at `now`, at most [`EXPIRE_BATCH`]
    /// per call: each goes back to its place (the head of its queue: it was the oldest), its
    /// holder's room is freed, and its holder's later ack is ignored. Returns how many.
    pub(super) fn reclaim_leases(&mut self, now: Millis, out: &mut Vec<Delivery>) -> usize {
        let mut reclaimed = 0;
        let mut touched: BTreeSet<QueueName> = BTreeSet::new();
        while let Some(&(at, id)) = self.table.leases.first() {
            if at > now || reclaimed >= EXPIRE_BATCH {
                break;
            }
            self.table.leases.pop_first();
            let Some(name) = self.table.held.get(&id).map(|h| h.queue.clone()) else {
                continue; // cannot happen: the index is exact
            };
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            let Some(held) = self.table.unhold(queue, &mut self.connections, &name, id) else {
                continue;
            };
            if let Some(ready) = self.give_back(&name, id, held, true, now, out) {
                if let Some(queue) = self.queues.get_mut(&name) {
                    queue.ready.put_back(vec![ready], &mut self.table.resident);
                }
            }
            reclaimed += 1;
            touched.insert(name);
        }
        for name in &touched {
            self.pump(name, now, out);
            self.drop_queue_if_unused(name);
        }
        reclaimed
    }
}
