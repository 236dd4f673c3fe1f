//! The content window: with a store that can read content back, how much of each queue's
//! backlog keeps its content in memory, and how the rest comes back ahead of need (a fetch
//! request to the store, its answer attached in place).

use super::{Broker, Delivery, MessageTable, Queue, NEVER};
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
    fn admits(&self, queue: Amount, total: Amount, size: usize) -> bool {
        let after = queue.plus(size);
        queue.messages == 0
            || (after.within(self.per_queue)
                && (after.within(self.floor) || total.plus(size).within(self.total)))
    }
}

impl Queue {
    /// Whether a message of `size` bytes added at the tail keeps its content in memory.
    pub(super) fn keeps_next(&self, size: usize, window: Option<Window>, resident: Amount) -> bool {
        self.unloaded == 0 && window.is_none_or(|w| w.admits(self.resident, resident, size))
    }

    /// Asks the store for the content of the next unloaded messages once the queue may take
    /// a third more than it holds (at three quarters of its window when memory is plentiful),
    /// so consumers rarely wait for it and requests are never tiny. Fetches of several queues
    /// under way at once may overshoot the total by what they bring.
    pub(super) fn fetch_ahead(&mut self, name: &QueueName, table: &mut MessageTable) {
        let Some(window) = table.window else {
            return;
        };
        if self.unloaded == 0 || self.fetching.is_some() {
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
            .saturating_sub(self.resident.messages)
            .min(
                window
                    .floor
                    .messages
                    .saturating_sub(self.resident.messages)
                    .max(total_room),
            )
            .min(self.unloaded);
        if room == 0 || room * 3 < self.resident.messages {
            return;
        }
        let start = self.ready.partition_point(|e| e.seq <= self.loaded_through);
        let (mut queue, mut total) = (self.resident, table.resident);
        let mut seqs = Vec::new();
        for entry in self.ready.range(start..).filter(|e| !e.dead) {
            if seqs.len() == room || !window.admits(queue, total, entry.size) {
                break;
            }
            seqs.push(entry.seq);
            queue.add(entry.size);
            total.add(entry.size);
        }
        if seqs.len() * 3 < self.resident.messages {
            return;
        }
        let Some(&last) = seqs.last() else {
            return;
        };
        self.loaded_through = last;
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
            let Ok(at) = queue.ready.binary_search_by_key(&seq, |e| e.seq) else {
                continue; // gone meanwhile
            };
            if queue.ready[at].dead || queue.ready[at].content.is_some() {
                continue;
            }
            while contents.next_if(|(s, _)| *s < seq).is_some() {}
            let entry = &mut queue.ready[at];
            if let Some((_, content)) = contents.next_if(|(s, _)| *s == seq) {
                entry.content = Some(content);
                queue.unloaded -= 1;
                queue.resident.add(entry.size);
                self.table.resident.add(entry.size);
            } else {
                // Cannot happen (the store applies every change before it answers); waiting
                // for it would stall the queue for good.
                error!(
                    "message {} of {name} is missing from the store; dropped",
                    entry.id
                );
                entry.dead = true;
                let (size, expires_at) = (entry.size, entry.expires_at);
                queue.unloaded -= 1;
                queue.ready_count -= 1;
                queue.bytes -= size as u64;
                if expires_at != NEVER {
                    self.table.expiry.remove(&(expires_at, seq));
                }
            }
        }
        self.pump(&name, now, out);
        self.drop_queue_if_unused(&name);
    }
}
