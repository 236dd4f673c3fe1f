//! The content window: with a store that can read content back, how much of each queue's
//! backlog keeps its content in memory, and how the rest comes back ahead of need (a fetch
//! request to the store, its answer attached in place).

use super::retire::{Place, Retirement};
use super::{Broker, Delivery, MessageTable, Queue};
use crate::request::QueueName;
use crate::store::{FetchRequest, Fetched, Millis};
use log::error;

/// With a store that can read content back, a queue keeps the content of only its first ready
/// messages in memory; the store reads the rest back ahead of need. So a backlog costs memory
/// per message (its queue entry), not per byte of content. A queue may keep up to this much...
/// (sized so that consumers keeping up with producers are served from memory: reading back
/// means the store must write each message first instead of dropping an insert its ack
/// cancels, which costs a 64 KiB stream a third of its rate: 20k msg/s at 64 MiB, 12k at 8 MiB)
pub(super) const RESIDENT_PER_QUEUE: Amount = Amount {
    messages: 65_536,
    bytes: 64 << 20,
};
/// ...as long as all queues together keep at most this much beyond their floors...
pub(super) const RESIDENT_TOTAL: Amount = Amount {
    messages: 131_072,
    bytes: 128 << 20,
};
/// ...and every queue may keep this much whatever the others do, so its consumers are served
/// from memory too.
pub(super) const RESIDENT_FLOOR: Amount = Amount {
    messages: 1_024,
    bytes: 1 << 20,
};

/// A number of messages and their content bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Amount {
    pub(super) messages: usize,
    pub(super) bytes: u64,
}

impl Amount {
    pub(super) fn add(&mut self, size: usize) {
        self.messages += 1;
        self.bytes += size as u64;
    }

    pub(super) fn remove(&mut self, size: usize) {
        self.messages -= 1;
        self.bytes -= size as u64;
    }

    fn plus(self, size: usize) -> Amount {
        Amount {
            messages: self.messages + 1,
            bytes: self.bytes + size as u64,
        }
    }

    fn within(self, limit: Amount) -> bool {
        self.messages <= limit.messages && self.bytes <= limit.bytes
    }
}

/// How much content stays in memory when the store can read it back.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    pub(super) per_queue: Amount,
    pub(super) total: Amount,
    pub(super) floor: Amount,
}

impl Window {
    /// Whether a queue with `queue` resident, while all queues have `total`, may keep one
    /// more message of `size` bytes. A queue with nothing resident always may (one message
    /// larger than every limit must still go out).
    pub(super) fn admits(&self, queue: Amount, total: Amount, size: usize) -> bool {
        let after = queue.plus(size);
        queue.messages == 0
            || (after.within(self.per_queue)
                && (after.within(self.floor) || total.plus(size).within(self.total)))
    }
}

impl Queue {
    /// Asks the store for the content of the next unloaded messages once the queue may take
    /// a third more than it holds (at three quarters of its window when memory is plentiful),
    /// so consumers rarely wait for it and requests are never tiny. Fetches of several queues
    /// under way at once may overshoot the total by what they bring.
    pub(super) fn fetch_ahead(&mut self, name: &QueueName, table: &mut MessageTable) {
        let Some(window) = table.window else {
            return;
        };
        let (resident, unloaded) = (self.ready.resident(), self.ready.unloaded());
        if unloaded == 0 || self.fetching.is_some() {
            return;
        }
        // A cheap bound on the count first: this runs after every dispatch.
        let total_room = window
            .total
            .messages
            .saturating_sub(table.resident.messages);
        let room = window
            .per_queue
            .messages
            .saturating_sub(resident.messages)
            .min(
                window
                    .floor
                    .messages
                    .saturating_sub(resident.messages)
                    .max(total_room),
            )
            .min(unloaded);
        if room == 0 || room * 3 < resident.messages {
            return;
        }
        let (mut queue, mut total) = (resident, table.resident);
        let mut seqs = Vec::new();
        for entry in self.ready.unrequested() {
            if seqs.len() == room || !window.admits(queue, total, entry.size) {
                break;
            }
            seqs.push(entry.seq);
            queue.add(entry.size);
            total.add(entry.size);
        }
        if seqs.len() * 3 < resident.messages {
            return;
        }
        let Some(&last) = seqs.last() else {
            return;
        };
        self.ready.requested_through(last);
        table.last_fetch_token += 1;
        self.fetching = Some(table.last_fetch_token);
        table.store.fetch(FetchRequest {
            token: table.last_fetch_token,
            queue: name.clone(),
            seqs,
        });
    }
}

impl Broker {
    /// Takes the content the store read back for a [`FetchRequest`] this broker made, and
    /// hands out what consumers were waiting for.
    pub fn attach(&mut self, fetched: Fetched, now: Millis, out: &mut Vec<Delivery>) {
        let Fetched { request, contents } = fetched;
        let name = request.queue;
        let Some(queue) = self.queues.get_mut(&name) else {
            return;
        };
        // A flush since the request dropped what it asked for.
        if queue.fetching != Some(request.token) {
            return;
        }
        queue.fetching = None;
        let mut contents = contents.into_iter().peekable();
        for seq in request.seqs {
            let Some(id) = queue
                .ready
                .get(seq)
                .filter(|e| e.content.is_none())
                .map(|e| e.id)
            else {
                continue; // gone meanwhile, or back from a holder with its content
            };
            while contents.next_if(|(s, _)| *s < seq).is_some() {}
            if let Some((_, content)) = contents.next_if(|(s, _)| *s == seq) {
                queue.ready.load(seq, content, &mut self.table.resident);
            } else {
                // Cannot happen (the store applies every change before it answers); waiting
                // for it would stall the queue for good.
                error!("message {id} of {name} is missing from the store; dropped");
                let place = Place::Ready(seq);
                let reason = Retirement::MissingFromStore;
                self.table
                    .retire(queue, &mut self.connections, &name, place, reason);
            }
        }
        self.pump(&name, now, out);
        self.drop_queue_if_unused(&name);
    }
}
