//! The seam between the server and where messages are kept: a storage backend recovers what
//! it holds at start, takes the broker's changes through a [`Store`], reports how it is
//! keeping up ([`StorageStatus`], shown by the console), and brings itself up to date at a
//! stop. The server reaches storage only through [`Storage`]; [`open`] picks the backend the
//! configuration names (today the SQLite mirror, [`crate::persist`], or none with `--db none`).

use crate::config::Config;
use crate::persist::Persistence;
use crate::store::{Backlog, Fetched, Millis, Store, StoredRow};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A storage backend that failed. Transparent: it shows as the backend's own error (the one
/// line the server prints) and passes on that error's source; [`StorageError::inner`] gives the
/// backend's error itself.
#[derive(Debug)]
pub struct StorageError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl StorageError {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> StorageError {
        StorageError(Box::new(error))
    }

    /// The backend's own error, to look at more closely (e.g. to downcast).
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

/// Gets the content a [`Store::fetch`] asked for (give it to
/// [`crate::broker::Broker::attach`]).
pub type OnFetched = Arc<dyn Fn(Fetched) + Send + Sync>;
/// Hears that storage failed for good while running: what is accepted from then on cannot be
/// kept, and the server must stop.
pub type OnFatal = Arc<dyn Fn(StorageError) + Send + Sync>;

/// Where messages are kept, as the server sees it. Called in this order: [`Storage::recover`]
/// once, then [`Storage::start`], then [`Storage::finish`] at the stop; the other methods at
/// any time.
pub trait Storage: Send {
    /// Where messages are kept, for people: a path, an address.
    fn location(&self) -> String;

    /// Hands every stored message to `restore`, in FIFO order, and returns how many.
    fn recover(&mut self, restore: &mut dyn FnMut(StoredRow<'_>)) -> Result<usize, StorageError>;

    /// The store the broker reports its changes to (and may fetch content back from).
    fn store(&self) -> Box<dyn Store>;

    /// How far behind storage is; producers wait while any of these is high.
    fn backlogs(&self) -> Vec<Arc<Backlog>>;

    /// A handle that tells how storage is doing, for the console, from any thread.
    fn status(&self) -> Arc<dyn StatusSource>;

    /// Starts storage's own threads.
    fn start(&mut self, on_fetched: OnFetched, on_fatal: OnFatal) -> Result<(), StorageError>;

    /// Brings storage up to date with every change reported so far, then stops it. Returns
    /// the last sync (`None` if there was nothing left to write).
    fn finish(self: Box<Self>) -> Result<Option<SyncReport>, StorageError>;

    /// Tells when changes are on disk, for durable receipts (PHPMQ v1.2 rule 8); `None` if
    /// this backend cannot (the server then does not offer them).
    fn durability(&self) -> Option<Arc<dyn Durability>> {
        None
    }
}

/// When changes handed to the [`Store`] are synced to disk, counted in tickets
/// ([`Store::submitted`]).
pub trait Durability: Send + Sync {
    /// Someone waits until every change through `ticket` is synced: sync soon.
    fn want(&self, ticket: u64);
    /// Every change through this ticket is synced.
    fn synced(&self) -> u64;
    /// Sets who hears, from storage's thread, of each new synced ticket (once).
    fn set_on_synced(&self, on_synced: OnSynced);
}

/// Hears that changes are synced through a ticket ([`Durability`]).
pub type OnSynced = Arc<dyn Fn(u64) + Send + Sync>;

/// Tells how a running backend is doing.
pub trait StatusSource: Send + Sync {
    fn status(&self) -> StorageStatus;
}

/// One completed sync of what changed to durable storage (for the SQLite backend, a mirror).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// When it was complete.
    pub finished_at: Millis,
    pub duration: Duration,
    /// Messages held afterwards.
    pub messages: i64,
    /// The size of what is stored.
    pub bytes: u64,
    /// Bytes written for this sync, where the system tells.
    pub written: Option<u64>,
    /// Everything was written again, not the changes alone.
    pub full: bool,
}

/// How storage has been doing since the start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageStatus {
    /// As [`Storage::location`].
    pub location: String,
    /// The latest sync that completed.
    pub last_sync: Option<SyncReport>,
    /// Syncs that completed, and how many of them wrote everything.
    pub completed: u64,
    pub full_copies: u64,
    /// Syncs that failed, and how many in a row since the last that completed.
    pub failures: u64,
    pub failing_for: u64,
    /// The latest failure: when, and why.
    pub last_error: Option<(Millis, String)>,
    /// Bytes written by syncs since the start, where the system tells.
    pub written: u64,
    /// Changes not kept durably yet.
    pub pending_changes: usize,
    /// The file is to be written in full and the last try failed: it misses everything since
    /// the last sync that completed, whatever `pending_changes` says.
    pub full_copy_due: bool,
}

/// Opens the storage `config` names, or `None` when messages are kept in memory only.
pub fn open(config: &Config) -> Result<Option<Box<dyn Storage>>, StorageError> {
    match &config.db {
        Some(path) => Ok(Some(Box::new(
            Persistence::open(path, config.mirror_interval).map_err(StorageError::new)?,
        ))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::PersistError;
    use crate::server::ServerError;
    use std::error::Error;

    #[test]
    fn a_storage_error_reads_as_the_backends_and_keeps_its_source() {
        let config = Config {
            db: Some("/nonexistent-phpmq-dir/phpmq.sqlite".into()),
            ..Config::default()
        };
        let Err(e) = open(&config) else {
            panic!("a file in a missing directory cannot be created");
        };
        // The lock file is the first thing the server creates beside the database.
        assert!(
            e.to_string().starts_with(
                "cannot open the lock file /nonexistent-phpmq-dir/phpmq.sqlite.lock: "
            ),
            "{e}"
        );
        assert!(e.inner().downcast_ref::<PersistError>().is_some());
        let io = e.source().expect("the system's error");
        assert!(io.downcast_ref::<std::io::Error>().is_some(), "{io}");
        let server = ServerError::from(e);
        assert!(server.to_string().starts_with("cannot open "), "{server}");
        assert!(server.source().is_some());
    }
}
