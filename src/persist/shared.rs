//! What the store writer, the mirror thread and the front share: the in-memory database and
//! the counters and journal around it, and the alarm its threads hold. In a module of its own
//! so that the writer and the copying code both use it without importing each other.

use super::durable::Durable;
use super::error::PersistError;
use super::journal::Journal;
use super::lock::DbLock;
use crate::store::Backlog;
use crossbeam_channel::{bounded, Receiver, Sender};
use rusqlite::Connection;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread;

/// What the writer and the rest of persistence share.
pub struct Shared {
    /// Held by the writer while it runs; the final mirror takes it after.
    pub memory: Mutex<Connection>,
    /// The store ticket committed so far: how many changes the broker had handed over when
    /// the writer committed its last batch ([`crate::store::Store::submitted`]).
    pub generation: AtomicU64,
    /// Rows in `messages`, for the mirror's log line.
    pub rows: AtomicI64,
    /// What the broker sent and the writer has not applied yet.
    pub backlog: Arc<Backlog>,
    /// What the writer committed and the mirror has not taken yet.
    pub journal: Journal,
    /// The database file's lock, held while the server runs; the mirror checks it is still
    /// in place before each run.
    pub lock: Mutex<DbLock>,
    /// How far the file is synced, for durable receipts.
    pub durable: Arc<Durable>,
    /// Ends the writer's gathering window: rung by the mirror's tick, so that the tick takes
    /// every change made before it (the loss window stays the mirror interval), by the
    /// broker's side once a batch's worth waits or the backlog rises, and with a flush, a stop
    /// or a request for a full copy.
    commit_now: (Sender<()>, Receiver<()>),
}

impl Shared {
    /// Shares `memory`, with nothing pending yet.
    pub fn new(memory: Connection, lock: DbLock) -> Shared {
        Shared {
            memory: Mutex::new(memory),
            lock: Mutex::new(lock),
            generation: AtomicU64::new(0),
            rows: AtomicI64::new(0),
            backlog: Arc::default(),
            journal: Journal::default(),
            durable: Arc::default(),
            commit_now: bounded(1),
        }
    }

    /// The database file's lock, for a look or a mark.
    pub fn db_lock(&self) -> Result<std::sync::MutexGuard<'_, DbLock>, PersistError> {
        self.lock.lock().map_err(|_| PersistError::Poisoned)
    }

    /// Ends the writer's gathering window now.
    pub fn ring_writer(&self) {
        // Full means a ring is already waiting.
        let _ = self.commit_now.0.try_send(());
    }

    /// What rings the writer, for the broker's side of the store.
    pub fn writer_bell(&self) -> Sender<()> {
        self.commit_now.0.clone()
    }

    /// What ends the writer's gathering window early.
    pub fn writer_rung(&self) -> &Receiver<()> {
        &self.commit_now.1
    }
}

/// Turns an SQLite error on the in-memory database into a [`PersistError`].
pub fn memory_failure(action: &'static str) -> impl Fn(rusqlite::Error) -> PersistError {
    move |source| PersistError::Sqlite {
        action,
        path: ":memory:".into(),
        source,
    }
}

/// Held by the store's threads: one that panics tells the server, which stops rather than run
/// on with changes that are no longer kept (a panicking mirror thread's state is lost, and
/// the final mirror writes the file in full).
pub struct PanicAlarm(pub Arc<dyn Fn(PersistError) + Send + Sync>);

impl Drop for PanicAlarm {
    fn drop(&mut self) {
        if thread::panicking() {
            (self.0)(PersistError::Poisoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_thread_that_panics_holding_the_alarm_sets_it_off() {
        let heard = Arc::new(AtomicBool::new(false));
        let alarm = {
            let heard = heard.clone();
            PanicAlarm(Arc::new(move |e: PersistError| {
                heard.store(matches!(e, PersistError::Poisoned), Ordering::SeqCst);
            }))
        };
        // Dropped without a panic: silent.
        drop(PanicAlarm(Arc::new(|_| unreachable!("no panic, no alarm"))));
        let joined = thread::spawn(move || {
            let _alarm = alarm;
            panic!("a store thread panics");
        })
        .join();
        assert!(joined.is_err());
        assert!(heard.load(Ordering::SeqCst));
    }
}
