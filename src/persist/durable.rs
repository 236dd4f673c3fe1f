//! Durable receipts' bookkeeping (PHPMQ v1.2 rule 8): how far the database file is synced,
//! counted in store tickets (the number of changes the broker had handed to the store), and
//! how far waiting receipts need it. A receipt that waits makes the writer skip its batching
//! window and the mirror run at once; every receipt waiting by then is answered by the same
//! sync (group commit).

use crate::storage::{Durability, OnSynced};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub struct Durable {
    /// The highest ticket a waiting receipt needs in the synced file.
    wanted: AtomicU64,
    /// Every change through this ticket is in the file, synced.
    synced: AtomicU64,
    on_synced: OnceLock<OnSynced>,
    /// Rung when a receipt starts waiting: the writer stops gathering and commits.
    wake_writer: Sender<()>,
    writer_woken: Receiver<()>,
}

impl Default for Durable {
    fn default() -> Durable {
        let (wake_writer, writer_woken) = bounded(1);
        Durable {
            wanted: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            on_synced: OnceLock::new(),
            wake_writer,
            writer_woken,
        }
    }
}

impl Durability for Durable {
    /// Sets who hears of each sync (once; later calls are ignored).
    fn set_on_synced(&self, on_synced: OnSynced) {
        let _ = self.on_synced.set(on_synced);
    }

    /// A receipt waits until the file holds every change through `ticket`.
    fn want(&self, ticket: u64) {
        self.wanted.fetch_max(ticket, Ordering::AcqRel);
        if ticket > self.synced.load(Ordering::Acquire) {
            // Full means a wake-up is already waiting.
            let _ = self.wake_writer.try_send(());
        }
    }

    /// How far the file is synced, in tickets.
    fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }
}

impl Durable {
    /// Whether some receipt waits for a sync.
    pub fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire) > self.synced.load(Ordering::Acquire)
    }

    /// What wakes the writer when a receipt starts waiting.
    pub fn writer_wake_ups(&self) -> &Receiver<()> {
        &self.writer_woken
    }

    /// The file is synced through `ticket`: receipts waiting for it may go.
    pub fn mark_synced(&self, ticket: u64) {
        let before = self.synced.fetch_max(ticket, Ordering::AcqRel);
        if ticket > before {
            if let Some(on_synced) = self.on_synced.get() {
                on_synced(ticket);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_wanted_ticket_wakes_the_writer_and_each_sync_is_heard_once() {
        let durable = Durable::default();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = heard.clone();
        durable.set_on_synced(Arc::new(move |t| sink.lock().unwrap().push(t)));
        assert!(!durable.is_wanted());
        durable.want(5);
        durable.want(3);
        assert!(durable.is_wanted());
        assert!(durable.writer_wake_ups().try_recv().is_ok());
        durable.mark_synced(4);
        assert!(durable.is_wanted(), "5 still waits");
        durable.mark_synced(7);
        durable.mark_synced(6);
        assert!(!durable.is_wanted());
        assert_eq!(*heard.lock().unwrap(), vec![4, 7], "no step back");
        durable.want(7);
        assert!(
            durable.writer_wake_ups().try_recv().is_err(),
            "already synced: nothing to wake"
        );
    }
}
