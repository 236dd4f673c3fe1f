//! Dead-lettering by delivery count (v1.2 rule 8, `dead-letter`): with a maximum N, a message
//! whose N-th dispatch ends without an ack (lease expiry, disconnect, re-queue) moves to the
//! tail of `<queue>.dead` instead of going back, its content, id, TTL and count kept; a
//! message in a queue whose name ends in `.dead` is never moved again. A redrive moves a dead
//! queue's waiting messages back to the tail of their queue, counts reset.
//!
//! A name too long for `.dead` (over 250 bytes) keeps its first bytes (up to 233, at a
//! character boundary), then `~` and a hash of the whole name in 16 hex digits, then `.dead`:
//! the message is kept rather than dropped or sent back forever, a redrive of the long name
//! finds it by the same rule, and two long names that only differ past the cut do not share a
//! dead queue (a redrive of one would move the other's messages).

use super::hold::Held;
use super::ready::Ready;
use super::{stored_expiry, Broker, Delivery, NEVER};
use crate::id::MessageId;
use crate::request::{QueueName, MAX_QUEUE_NAME_LEN};
use crate::store::{Millis, StoreOp};

const DEAD_SUFFIX: &str = ".dead";
/// How many messages the console's redrive moves per acquisition of the broker lock.
pub const REDRIVE_CHUNK: usize = 4096;

/// The dead-letter queue of `queue`; `None` for a queue that is one already.
pub fn dead_queue_name(queue: &str) -> Option<QueueName> {
    if queue.ends_with(DEAD_SUFFIX) {
        return None;
    }
    if queue.len() + DEAD_SUFFIX.len() <= MAX_QUEUE_NAME_LEN {
        return QueueName::new(format!("{queue}{DEAD_SUFFIX}").as_bytes()).ok();
    }
    // `~`, 16 hex digits and `.dead`.
    let mut cut = MAX_QUEUE_NAME_LEN - 1 - 16 - DEAD_SUFFIX.len();
    while !queue.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = fnv1a_64(queue.as_bytes());
    QueueName::new(format!("{}~{hash:016x}{DEAD_SUFFIX}", &queue[..cut]).as_bytes()).ok()
}

/// FNV-1a, 64 bits: a hash fixed for good (the names it makes are stored), unlike std's.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Broker {
    /// Sets the maximum delivery count (`None` or 0: messages are never moved).
    pub fn set_max_deliveries(&mut self, max: Option<u32>) {
        self.max_deliveries = max.filter(|&n| n > 0);
    }

    /// Where a message of `queue` goes whose dispatch number `deliveries` ended without an
    /// ack: its dead-letter queue once the maximum is reached, else `None` (back it goes).
    pub(super) fn dead_letter_target(&self, queue: &str, deliveries: u32) -> Option<QueueName> {
        let max = self.max_deliveries?;
        if deliveries < max {
            return None;
        }
        dead_queue_name(queue)
    }

    /// Moves a held message (out of `held` already) to the tail of `dead`, everything kept.
    pub(super) fn move_to_dead(
        &mut self,
        id: MessageId,
        held: Held,
        dead: &QueueName,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) {
        if held.expires_at != NEVER {
            self.table.expiry.remove(&(held.expires_at, held.seq));
        }
        let seq = self.take_seq();
        self.table.store.apply(StoreOp::Requeue {
            id,
            old_seq: held.seq,
            seq,
            expires_at: stored_expiry(held.expires_at),
            due_at: None,
            deliveries: held.deliveries,
            queue: Some(dead.clone()),
        });
        self.table.totals.moved_to_dead += 1;
        let size = held.content.len();
        let ready = Ready::new(
            seq,
            id,
            size,
            Some(held.content),
            held.accepted_at,
            held.expires_at,
            held.deliveries,
        );
        self.append_ready(dead, ready);
        self.pump(dead, now, out);
    }

    /// Moves every waiting message of `<queue>.dead` (ready in order, then delayed in due
    /// order, ready at once) to the tail of `queue`, ids kept and counts reset; held ones stay
    /// with their holders. Returns how many. Creates no dead queue.
    pub fn redrive(&mut self, queue: &QueueName, now: Millis, out: &mut Vec<Delivery>) -> usize {
        self.redrive_some(queue, usize::MAX, now, out)
    }

    /// [`Broker::redrive`] of at most `limit` messages, so a caller can release the lock
    /// between chunks; fewer than `limit` means the dead queue has no more waiting.
    pub fn redrive_some(
        &mut self,
        queue: &QueueName,
        limit: usize,
        now: Millis,
        out: &mut Vec<Delivery>,
    ) -> usize {
        let Some(dead) = dead_queue_name(queue.as_str()) else {
            return 0;
        };
        let mut moved = 0;
        while moved < limit {
            let Some(d) = self.queues.get_mut(&dead) else {
                break;
            };
            let Some(entry) = d.ready.pop_front(&mut self.table.resident) else {
                break;
            };
            self.move_ready(entry, queue);
            moved += 1;
        }
        // Delayed messages in a dead queue are rare (a re-queue with a delay there): their
        // due order is found from the queue's own list, not the whole due index.
        let mut delayed: Vec<(Millis, u64)> = match self.queues.get(&dead) {
            Some(d) if moved < limit => d.delayed.iter().map(|(seq, x)| (x.due_at, seq)).collect(),
            _ => Vec::new(),
        };
        delayed.sort_unstable();
        delayed.truncate(limit - moved);
        for (at, seq) in delayed {
            let Some(d) = self.queues.get_mut(&dead) else {
                break;
            };
            let Some(x) = d.delayed.remove(seq) else {
                continue;
            };
            self.table.due.remove(&(at, seq));
            let entry = Ready::new(
                seq,
                x.id,
                x.size,
                x.content,
                x.accepted_at,
                x.expires_at,
                x.deliveries,
            );
            self.move_ready(entry, queue);
            moved += 1;
        }
        self.pump(queue, now, out);
        self.drop_queue_if_unused(&dead);
        self.drop_queue_if_unused(queue);
        moved
    }

    /// A waiting message taken out of its queue goes to the tail of `to`, its count reset.
    fn move_ready(&mut self, entry: Ready, to: &QueueName) {
        if entry.expires_at != NEVER {
            self.table.expiry.remove(&(entry.expires_at, entry.seq));
        }
        let seq = self.take_seq();
        self.table.store.apply(StoreOp::Requeue {
            id: entry.id,
            old_seq: entry.seq,
            seq,
            expires_at: stored_expiry(entry.expires_at),
            due_at: None,
            deliveries: 0,
            queue: Some(to.clone()),
        });
        self.table.totals.redriven += 1;
        let ready = Ready::new(
            seq,
            entry.id,
            entry.size,
            entry.content,
            entry.accepted_at,
            entry.expires_at,
            0,
        );
        self.append_ready(to, ready);
    }
}
