//! What the store writer, the mirror thread and the front share: the in-memory database and
//! the counters and journal around it. In a module of its own so that the writer and the
//! copying code both use it without importing each other.

use super::error::PersistError;
use super::journal::Journal;
use crate::store::Backlog;
use rusqlite::Connection;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

/// What the writer and the rest of persistence share.
pub struct Shared {
    /// Held by the writer while it runs; the final mirror takes it after.
    pub memory: Mutex<Connection>,
    /// Bumped after every committed batch: the mirror copies only when it moved.
    pub generation: AtomicU64,
    /// Rows in `messages`, for the mirror's log line.
    pub rows: AtomicI64,
    /// What the broker sent and the writer has not applied yet.
    pub backlog: Arc<Backlog>,
    /// What the writer committed and the mirror has not taken yet.
    pub journal: Journal,
}

impl Shared {
    /// Shares `memory`, with nothing pending yet.
    pub fn new(memory: Connection) -> Shared {
        Shared {
            memory: Mutex::new(memory),
            generation: AtomicU64::new(0),
            rows: AtomicI64::new(0),
            backlog: Arc::default(),
            journal: Journal::default(),
        }
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
