//! A queue's waiting messages: `ReadyList` owns the FIFO list and every count derived from
//! it (live messages and bytes, what is resident, what is asked back from the store), and
//! keeps them true by construction: nothing outside this module changes an entry or a count.
//!
//! Invariants (checked by the broker's randomized test):
//! - entries are sorted by ascending `seq`; dead entries have no content and are not counted;
//! - the live entries are the resident ones (content in memory) followed by the unloaded ones
//!   (content only in the store); `live` and `resident` are their sums, and every change to
//!   `resident` is mirrored in the all-queues total the caller passes in.

use super::window::{Amount, Window};
use crate::id::MessageId;
use crate::store::Millis;
use std::collections::VecDeque;
use std::sync::Arc;

/// Dead entries are compacted away once there are more than this many entries and dead ones
/// outnumber live ones; below it skipping them when reached is cheaper.
const COMPACT_ABOVE: usize = 64;

/// A message waiting in its queue. The queue is implicit, which keeps the entry small: 80
/// bytes on 64-bit targets (the id, a `u128`, aligns the entry to 16 bytes), so a million
/// waiting messages cost 80 MB here (plus the content of the resident ones), and no hash
/// table. `a_waiting_message_takes_80_bytes` keeps the figure, and the docs that quote it,
/// true.
#[derive(Debug)]
pub(super) struct Ready {
    pub(super) seq: u64,
    pub(super) id: MessageId,
    /// `None` while only the store has it, and once dead.
    pub(super) content: Option<Arc<[u8]>>,
    /// The content's length.
    pub(super) size: usize,
    pub(super) accepted_at: Millis,
    /// `NEVER` or when it expires.
    pub(super) expires_at: Millis,
    /// Dispatches so far (v1.2 rule 6); fits in the padding the id's alignment leaves.
    pub(super) deliveries: u32,
    /// Left the queue from its middle: skipped when reached (see `ReadyList::remove`).
    dead: bool,
}

impl Ready {
    /// The one constructor: `content` is `None` when only the store has it (then `size` is
    /// still its length).
    pub(super) fn new(
        seq: u64,
        id: MessageId,
        size: usize,
        content: Option<Arc<[u8]>>,
        accepted_at: Millis,
        expires_at: Millis,
        deliveries: u32,
    ) -> Ready {
        Ready {
            seq,
            id,
            content,
            size,
            accepted_at,
            expires_at,
            deliveries,
            dead: false,
        }
    }

    /// Whether this entry left the list (it is skipped, not counted).
    #[cfg(test)]
    pub(super) fn is_dead(&self) -> bool {
        self.dead
    }
}

/// A queue's waiting messages in FIFO order, and their counts.
#[derive(Debug, Default)]
pub(super) struct ReadyList {
    entries: VecDeque<Ready>,
    /// Live entries and their content bytes (in memory or not).
    live: Amount,
    /// Live entries with their content in memory.
    resident: Amount,
    /// The newest seq that is resident or asked for: unloaded entries after it are not.
    loaded_through: u64,
}

impl ReadyList {
    /// How many messages wait.
    pub(super) fn len(&self) -> usize {
        self.live.messages
    }

    pub(super) fn is_empty(&self) -> bool {
        self.live.messages == 0
    }

    /// Content bytes of the waiting messages, whether in memory or not.
    pub(super) fn bytes(&self) -> u64 {
        self.live.bytes
    }

    /// The waiting messages whose content is in memory.
    pub(super) fn resident(&self) -> Amount {
        self.resident
    }

    /// The waiting messages whose content only the store has.
    pub(super) fn unloaded(&self) -> usize {
        self.live.messages - self.resident.messages
    }

    #[cfg(test)]
    pub(super) fn loaded_through(&self) -> u64 {
        self.loaded_through
    }

    /// Whether a message of `size` bytes added at the tail keeps its content in memory:
    /// never behind an unloaded one (FIFO), and only within the window.
    pub(super) fn keeps_next(&self, size: usize, window: Option<Window>, total: Amount) -> bool {
        self.unloaded() == 0 && window.is_none_or(|w| w.admits(self.resident, total, size))
    }

    /// Adds a message at the tail (its `seq` is the newest). Past the window its content is
    /// let go: the store has it and reads it back when its turn nears.
    pub(super) fn push_back(
        &mut self,
        mut entry: Ready,
        window: Option<Window>,
        total: &mut Amount,
    ) {
        if entry.content.is_some() && self.keeps_next(entry.size, window, *total) {
            self.loaded_through = entry.seq;
        } else {
            entry.content = None;
        }
        self.count_in(&entry, total);
        self.entries.push_back(entry);
    }

    /// Puts messages back at their original places (with their content: they were held).
    pub(super) fn put_back(&mut self, mut entries: Vec<Ready>, total: &mut Amount) {
        entries.sort_unstable_by_key(|e| e.seq);
        for entry in entries {
            self.count_in(&entry, total);
            let at = self.entries.partition_point(|e| e.seq < entry.seq);
            self.entries.insert(at, entry);
        }
    }

    /// The oldest live message; dead entries in front of it are dropped on the way.
    pub(super) fn front(&mut self) -> Option<&Ready> {
        while self.entries.front().is_some_and(|e| e.dead) {
            self.entries.pop_front();
        }
        self.entries.front()
    }

    /// Takes the oldest live message out (with its content, if in memory).
    pub(super) fn pop_front(&mut self, total: &mut Amount) -> Option<Ready> {
        self.front()?;
        let entry = self.entries.pop_front()?;
        self.count_out(&entry, total);
        Some(entry)
    }

    /// The live message with this `seq`, if it is still waiting.
    pub(super) fn get(&self, seq: u64) -> Option<&Ready> {
        let at = self.position(seq)?;
        Some(&self.entries[at])
    }

    /// Takes the live message with this `seq` out of the middle of the list: its entry stays
    /// behind, dead, until reached or compacted away (removing from a deque's middle would
    /// cost a shift per message).
    pub(super) fn remove(&mut self, seq: u64, total: &mut Amount) -> Option<Ready> {
        let at = self.position(seq)?;
        let entry = &mut self.entries[at];
        let gone = Ready::new(
            entry.seq,
            entry.id,
            entry.size,
            entry.content.take(),
            entry.accepted_at,
            entry.expires_at,
            entry.deliveries,
        );
        entry.dead = true;
        self.count_out(&gone, total);
        if self.entries.len() > COMPACT_ABOVE && self.entries.len() > 2 * self.live.messages {
            self.entries.retain(|e| !e.dead);
        }
        Some(gone)
    }

    /// Fills in the content the store read back for a waiting message. False if it is gone
    /// or already has its content.
    pub(super) fn load(&mut self, seq: u64, content: Arc<[u8]>, total: &mut Amount) -> bool {
        let Some(at) = self.position(seq) else {
            return false;
        };
        let entry = &mut self.entries[at];
        if entry.content.is_some() {
            return false;
        }
        entry.content = Some(content);
        self.resident.add(entry.size);
        total.add(entry.size);
        true
    }

    /// The waiting messages whose content is neither in memory nor asked for yet, in order.
    pub(super) fn unrequested(&self) -> impl Iterator<Item = &Ready> {
        let start = self
            .entries
            .partition_point(|e| e.seq <= self.loaded_through);
        self.entries.range(start..).filter(|e| !e.dead)
    }

    /// Records that the content of the unloaded messages up to `seq` was asked for.
    pub(super) fn requested_through(&mut self, seq: u64) {
        self.loaded_through = seq;
    }

    /// The waiting messages in the order they will go.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Ready> {
        self.entries.iter().filter(|e| !e.dead)
    }

    /// Every entry, dead ones included: for the invariant checks.
    #[cfg(test)]
    pub(super) fn entries(&self) -> &VecDeque<Ready> {
        &self.entries
    }

    fn position(&self, seq: u64) -> Option<usize> {
        let at = self.entries.binary_search_by_key(&seq, |e| e.seq).ok()?;
        (!self.entries[at].dead).then_some(at)
    }

    fn count_in(&mut self, entry: &Ready, total: &mut Amount) {
        self.live.add(entry.size);
        if entry.content.is_some() {
            self.resident.add(entry.size);
            total.add(entry.size);
        }
    }

    fn count_out(&mut self, entry: &Ready, total: &mut Amount) {
        self.live.remove(entry.size);
        if entry.content.is_some() {
            self.resident.remove(entry.size);
            total.remove(entry.size);
        }
    }
}
