//! What changed since the last mirror: the store writer records each batch it committed to
//! the in-memory database, and the mirror takes them all at once and applies them to the file.
//!
//! Recording coalesces across batches (a message accepted and acknowledged between two mirrors
//! never reaches the file), so what is held follows the net change, not the traffic. If the
//! mirror cannot keep up (a disk that hangs), the journal stops holding changes past a bound
//! and asks for a full copy instead: memory stays bounded, nothing is lost, the next mirror
//! costs what is stored. It does the same, and stops recording, as soon as what it holds would
//! cost more to replay than copying the store (a burst into a small store): recording a flood
//! that the next mirror will not replay only takes the writer's time and holds the flood's
//! content in memory.
//!
//! Producers wait on what the journal holds plus the replay under way: both are content held
//! outside SQLite (about twice its size in memory, for small messages), and a flood into a
//! large store would otherwise hold one set while the mirror replays the other.

use super::batch::{Changes, Coalesced};
use super::file::FileWeight;
use crate::store::{Backlog, StoreOp};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

/// Content bytes, held and being replayed, at which producers wait for the mirror (it is
/// woken before its tick at half of that)...
const HIGH_BYTES: usize = 128 << 20;
/// ...or changes: each costs about 230 bytes beside its content (its slot, its index entry),
/// most of what a small message costs. At 256 bytes both marks agree.
const HIGH_CHANGES: usize = 1 << 19;
/// Content bytes the journal holds at most before it gives up for a full copy (producers that
/// do not wait: connections that are closing)...
const MAX_BYTES: usize = 256 << 20;
/// ...or changes.
const MAX_CHANGES: usize = 4 << 20;

#[derive(Default)]
struct State {
    pending: Coalesced,
    /// The writer generation of the last batch recorded.
    generation: u64,
    /// The changes since the last full copy are not all here: only a full copy brings the
    /// file up to date.
    copy_wanted: bool,
    /// What the file holds; `None` until there is a file to replay into.
    file: Option<FileWeight>,
    /// Changes and content bytes the mirror took and is replaying.
    replaying: (usize, usize),
}

impl State {
    /// What producers wait on: what is held and what is being replayed.
    fn publish(&self, backlog: &Backlog) {
        backlog.set(
            self.pending.len() + self.replaying.0,
            self.pending.bytes() + self.replaying.1,
        );
    }
}

/// Changes committed to memory and not yet taken by the mirror.
pub struct Journal {
    state: Mutex<State>,
    /// What is pending or being replayed, for the producers' flow control.
    backlog: Arc<Backlog>,
    /// Rung when the journal grew past the early mark.
    wake: Sender<()>,
    woken: Receiver<()>,
}

impl Default for Journal {
    fn default() -> Journal {
        let (wake, woken) = bounded(1);
        Journal {
            state: Mutex::default(),
            backlog: Arc::new(Backlog::new(HIGH_CHANGES, HIGH_BYTES)),
            wake,
            woken,
        }
    }
}

/// What the mirror took.
pub struct Taken {
    pub ops: Changes,
    /// The writer generation the ops bring the file up to.
    pub generation: u64,
    /// The ops are incomplete: the file needs a full copy.
    pub copy_wanted: bool,
}

impl Journal {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a plain list: a panic elsewhere cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a batch the writer committed as `generation`.
    pub fn record(&self, ops: impl IntoIterator<Item = StoreOp>, generation: u64) {
        let mut state = self.state();
        state.generation = generation;
        if state.copy_wanted {
            return;
        }
        for op in ops {
            state.pending.push(op);
        }
        let pending = &state.pending;
        let outweighs_copy = |file: FileWeight| {
            let others = pending.len() - pending.inserts();
            file.replay_outweighs_copy(
                pending.bytes() as u64,
                pending.inserts() as u64,
                others as u64,
            )
        };
        if pending.bytes() > MAX_BYTES
            || pending.len() > MAX_CHANGES
            || state.file.is_none_or(outweighs_copy)
        {
            state.pending = Coalesced::default();
            state.copy_wanted = true;
        }
        state.publish(&self.backlog);
        // On what is held alone: a replay under way would otherwise wake the mirror again for
        // every batch recorded meanwhile, and each replay that follows would be a small one.
        if state.pending.len() > HIGH_CHANGES / 2 || state.pending.bytes() > HIGH_BYTES / 2 {
            // Full means a wake-up is already waiting.
            let _ = self.wake.try_send(());
        }
    }

    /// What is pending or being replayed, for the producers' flow control: a mirror that
    /// cannot keep up with a flood slows the producers down instead of letting the journal
    /// hold the flood.
    pub fn backlog(&self) -> Arc<Backlog> {
        self.backlog.clone()
    }

    /// Receives a message when the mirror should run before its tick.
    pub fn wake_ups(&self) -> &Receiver<()> {
        &self.woken
    }

    /// Takes everything recorded so far. Producers go on waiting for it until the mirror says
    /// it is done with it ([`Journal::replayed`]).
    pub fn take(&self) -> Taken {
        let (pending, generation, copy_wanted) = {
            let mut state = self.state();
            state.replaying = (
                state.replaying.0 + state.pending.len(),
                state.replaying.1 + state.pending.bytes(),
            );
            (
                std::mem::take(&mut state.pending),
                state.generation,
                state.copy_wanted,
            )
        };
        // Its index freed outside the lock: the writer records its next batch meanwhile.
        Taken {
            ops: pending.into_changes(),
            generation,
            copy_wanted,
        }
    }

    /// The mirror is done with what it took: committed to the file, kept for its next try
    /// (bounded on its side), or given up for a full copy.
    pub fn replayed(&self) {
        let mut state = self.state();
        state.replaying = (0, 0);
        state.publish(&self.backlog);
    }

    /// A full copy of `file` that reflects every batch recorded so far is complete: start
    /// afresh. Called by the writer, between batches.
    pub fn reset(&self, file: FileWeight) {
        let mut state = self.state();
        state.pending = Coalesced::default();
        state.copy_wanted = false;
        state.file = Some(file);
        state.publish(&self.backlog);
    }

    /// What the file holds now that the mirror wrote it; `None`: there is no file to replay
    /// into, the next mirror writes it in full (and nothing is recorded until then).
    pub fn note_file(&self, file: Option<FileWeight>) {
        let mut state = self.state();
        state.file = file;
        if file.is_none() {
            state.pending = Coalesced::default();
            state.copy_wanted = true;
            state.publish(&self.backlog);
        }
    }

    /// Has the mirror run now rather than on its tick (a durable receipt waits).
    pub fn wake_mirror(&self) {
        // Full means a wake-up is already waiting.
        let _ = self.wake.try_send(());
    }

    /// Changes waiting for the next mirror.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::MessageId;
    use crate::request::QueueName;
    use crate::store::StoredMessage;
    use std::sync::Arc;

    fn insert(seq: u64, size: usize) -> StoreOp {
        StoreOp::Insert(StoredMessage {
            id: MessageId::from_u128(seq.into()),
            queue: QueueName::new(b"q").unwrap(),
            content: Arc::from(vec![0u8; size]),
            accepted_at: 0,
            expires_at: None,
            seq,
            due_at: None,
            deliveries: 0,
        })
    }

    /// A journal replaying into a file far larger than any test's changes.
    fn journal() -> Journal {
        let journal = Journal::default();
        journal.note_file(Some(FileWeight {
            bytes: 1 << 40,
            rows: 1 << 20,
        }));
        journal
    }

    #[test]
    fn changes_cancel_across_batches() {
        let journal = journal();
        journal.record(vec![insert(1, 3), insert(2, 3)], 1);
        journal.record(
            vec![StoreOp::Delete {
                id: MessageId::from_u128(1),
                seq: 1,
            }],
            2,
        );
        assert_eq!(journal.pending(), 1);
        let taken = journal.take();
        assert_eq!(taken.ops, vec![insert(2, 3)]);
        assert_eq!(taken.generation, 2);
        assert!(!taken.copy_wanted);
        assert_eq!(journal.pending(), 0);
    }

    #[test]
    fn a_growing_journal_wakes_the_mirror_early() {
        let journal = journal();
        journal.record(vec![insert(1, 1024)], 1);
        assert!(journal.wake_ups().try_recv().is_err());
        journal.record(vec![insert(2, HIGH_BYTES / 2)], 2);
        assert!(!journal.backlog().is_high());
        journal.record(vec![insert(3, HIGH_BYTES)], 3);
        assert!(journal.backlog().is_high(), "producers wait");
        journal.take();
        assert!(
            journal.backlog().is_high(),
            "producers wait for the replay under way too"
        );
        journal.replayed();
        assert!(journal.backlog().is_low());
        assert!(journal.wake_ups().try_recv().is_ok());
    }

    #[test]
    fn what_is_replayed_and_what_is_held_count_together() {
        let journal = journal();
        journal.record(vec![insert(1, HIGH_BYTES / 4 * 3)], 1);
        assert!(journal.wake_ups().try_recv().is_ok());
        let taken = journal.take();
        assert_eq!(taken.ops.len(), 1);

        // What is recorded during the replay does not wake the mirror again before it is
        // worth a replay of its own...
        journal.record(vec![insert(2, 1024)], 2);
        assert!(journal.wake_ups().try_recv().is_err());
        assert!(!journal.backlog().is_high());
        // ...but producers wait once both together pass the mark.
        journal.record(vec![insert(3, HIGH_BYTES / 2 - 2048)], 3);
        assert!(journal.backlog().is_high());
        assert!(journal.wake_ups().try_recv().is_err());

        journal.replayed();
        assert!(journal.backlog().is_low());
        assert_eq!(journal.pending(), 2);
        assert_eq!(
            journal.take().ops,
            vec![insert(2, 1024), insert(3, HIGH_BYTES / 2 - 2048)]
        );
    }

    #[test]
    fn a_journal_past_its_bound_asks_for_a_full_copy_until_reset() {
        let journal = journal();
        journal.record(vec![insert(1, MAX_BYTES + 1)], 1);
        journal.record(vec![insert(2, 1)], 2);
        let taken = journal.take();
        assert!(taken.copy_wanted && taken.ops.is_empty());
        assert!(
            journal.take().copy_wanted,
            "stays copy_wanted until a full copy"
        );
        journal.reset(FileWeight {
            bytes: 1 << 40,
            rows: 1,
        });
        journal.record(vec![insert(3, 1)], 3);
        let taken = journal.take();
        assert!(!taken.copy_wanted);
        assert_eq!(taken.ops, vec![insert(3, 1)]);
    }

    #[test]
    fn changes_that_outweigh_a_copy_are_not_recorded() {
        let journal = Journal::default();
        journal.record(vec![insert(1, 10)], 1);
        assert!(
            journal.take().copy_wanted,
            "no file yet: it is written in full"
        );

        // A 10 MB file of 1,000 rows: replaying a 1 KiB change pays, replaying 6 MB does not.
        let file = FileWeight {
            bytes: 10 << 20,
            rows: 1000,
        };
        journal.reset(file);
        journal.record(vec![insert(2, 1024)], 2);
        assert_eq!(journal.pending(), 1);
        journal.record(vec![insert(3, 6 << 20)], 3);
        assert_eq!(journal.pending(), 0, "the flood is not held");
        let taken = journal.take();
        assert!(taken.copy_wanted && taken.ops.is_empty());

        // Deletes are costed at the file's average row (1 KiB here)...
        let small_rows = FileWeight {
            bytes: 10 << 20,
            rows: 10_000,
        };
        journal.reset(small_rows);
        journal.record(deletes(6000), 4);
        assert!(
            journal.take().copy_wanted,
            "6,000 × 1 KiB × 2 outweighs 10 MiB"
        );

        // ...but never above a few KiB, whatever the rows: a file that holds next to no rows
        // (a queue drained as fast as it fills) takes a handful of deletes as changes.
        let next_to_empty = FileWeight {
            bytes: 200 << 10,
            rows: 0,
        };
        journal.reset(next_to_empty);
        journal.record(deletes(32), 5);
        let taken = journal.take();
        assert!(!taken.copy_wanted);
        assert_eq!(taken.ops.len(), 32);
    }

    fn deletes(count: u64) -> Vec<StoreOp> {
        (0..count)
            .map(|seq| StoreOp::Delete {
                id: MessageId::from_u128(seq.into()),
                seq,
            })
            .collect()
    }
}
