//! Persistence: every accepted message lives in an in-memory SQLite database, which is mirrored
//! to a file in the background (on a timer, the mirror thread has the writer copy it, then syncs
//! and renames the copy), so messages survive a restart without the broker ever waiting for a
//! disk.
//!
//! - `schema`: the tables, recognising our files, reading messages back.
//! - `writer`: the thread that owns the in-memory database: applies the broker's changes, reads
//!   content back for the broker, copies the database for the mirror.
//! - `mirror`: putting copies in place atomically, and loading a file into memory.
//!
//! The loss window: a hard crash loses what changed since the last completed mirror.

mod mirror;
mod schema;
mod writer;

pub use mirror::MirrorReport;
pub use schema::SCHEMA_VERSION;
pub use writer::ChannelStore;

use crate::store::{Backlog, FetchRequest, Fetched, StoredRow};
use crossbeam_channel::{bounded, select, tick, unbounded, Receiver, Sender};
use log::{debug, error, info};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use writer::{Callbacks, Command, Shared};

/// What went wrong with the database file or the in-memory store.
#[derive(Debug)]
pub enum PersistError {
    /// The file is not an SQLite database (or its header is damaged).
    NotADatabase { path: PathBuf },
    /// An SQLite database that phpmq did not write.
    NotPhpmq { path: PathBuf },
    /// Written by a newer phpmq whose format this build does not know.
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// A phpmq database with damaged contents.
    Corrupt { path: PathBuf, detail: String },
    Sqlite {
        action: &'static str,
        path: PathBuf,
        source: rusqlite::Error,
    },
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A thread panicked while using the in-memory database.
    Poisoned,
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersistError::NotADatabase { path } => write!(
                f,
                "{}: not an SQLite database (or a damaged one); refusing to start, the file is left as it is",
                path.display()
            ),
            PersistError::NotPhpmq { path } => write!(
                f,
                "{}: an SQLite database, but not a phpmq one; refusing to start, the file is left as it is",
                path.display()
            ),
            PersistError::NewerSchema {
                path,
                found,
                supported,
            } => write!(
                f,
                "{}: written by a newer phpmq (schema version {found}, this build reads up to {supported}); refusing to start",
                path.display()
            ),
            PersistError::Corrupt { path, detail } => write!(
                f,
                "{}: the database is corrupt ({detail}); refusing to start, the file is left as it is",
                path.display()
            ),
            PersistError::Sqlite {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            PersistError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            PersistError::Poisoned => {
                f.write_str("the in-memory store stopped after a thread panicked while using it")
            }
        }
    }
}

impl std::error::Error for PersistError {}

/// The running persistence: the in-memory database, its writer thread and its mirror thread.
pub struct Persistence {
    shared: Arc<Shared>,
    target: PathBuf,
    interval: Duration,
    commands: Sender<Command>,
    fetches: Sender<FetchRequest>,
    pending: Option<(Receiver<Command>, Receiver<FetchRequest>)>,
    writer: Option<JoinHandle<()>>,
    mirror: Option<(Sender<()>, JoinHandle<()>)>,
    last_mirror: Arc<Mutex<Option<MirrorReport>>>,
    /// The writer generation the file on disk reflects, plus one (0: none yet).
    on_disk: Arc<AtomicU64>,
}

/// Reports the latest completed mirror.
#[derive(Clone)]
pub struct MirrorStatus(Arc<Mutex<Option<MirrorReport>>>);

impl MirrorStatus {
    pub fn latest(&self) -> Option<MirrorReport> {
        lock_report(&self.0).clone()
    }
}

impl Persistence {
    /// Loads `target` if it exists (refusing anything that is not a phpmq database), or starts
    /// empty and writes a first mirror so that an unwritable location fails now, not later.
    /// Then [`Persistence::recover`] hands out what it holds.
    pub fn open(target: &Path, interval: Duration) -> Result<Persistence, PersistError> {
        let exists = target.try_exists().map_err(|source| PersistError::Io {
            action: "look at",
            path: target.to_owned(),
            source,
        })?;
        let memory = if exists {
            mirror::load(target)?
        } else {
            mirror::new_memory()?
        };
        let (commands, pending_commands) = unbounded();
        let (fetches, pending_fetches) = unbounded();
        let persistence = Persistence {
            shared: Arc::new(Shared {
                memory: Mutex::new(memory),
                generation: AtomicU64::new(0),
                rows: AtomicI64::new(0),
                backlog: Arc::default(),
            }),
            target: target.to_owned(),
            interval,
            commands,
            fetches,
            pending: Some((pending_commands, pending_fetches)),
            writer: None,
            mirror: None,
            last_mirror: Arc::default(),
            on_disk: Arc::default(),
        };
        if exists {
            probe_writable(target)?;
            // The file is what was just loaded: generation 0.
            persistence.on_disk.store(1, Ordering::Release);
        } else {
            let report = mirror::write(&persistence.shared, target)?;
            info!("created {}", target.display());
            persistence.record(report);
        }
        Ok(persistence)
    }

    /// Hands every stored message to `restore`, in FIFO order, and returns how many. Reading
    /// every row walks every page, so a damaged file shows up here as an error rather than as
    /// lost messages later.
    pub fn recover(&self, restore: &mut dyn FnMut(StoredRow<'_>)) -> Result<usize, PersistError> {
        let memory = self
            .shared
            .memory
            .lock()
            .map_err(|_| PersistError::Poisoned)?;
        let count = schema::load(&memory, &self.target, restore)?;
        self.shared.rows.store(count as i64, Ordering::Relaxed);
        Ok(count)
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    fn record(&self, report: MirrorReport) {
        record(&self.on_disk, &self.last_mirror, report);
    }

    /// The store to give the broker.
    pub fn store(&self) -> ChannelStore {
        ChannelStore {
            commands: self.commands.clone(),
            fetches: self.fetches.clone(),
            backlog: self.shared.backlog.clone(),
        }
    }

    /// How far the writer is behind the broker (producers wait while it is high).
    pub fn backlog(&self) -> Arc<Backlog> {
        self.shared.backlog.clone()
    }

    /// The most recent completed mirror.
    pub fn last_mirror(&self) -> Option<MirrorReport> {
        lock_report(&self.last_mirror).clone()
    }

    /// A handle that reports the latest mirror, for status displays.
    pub fn mirror_status(&self) -> MirrorStatus {
        MirrorStatus(self.last_mirror.clone())
    }

    /// Starts the writer and mirror threads. `on_fetched` gets the content the broker asked
    /// for (give it to [`crate::broker::Broker::attach`]). `on_fatal` hears of a write to or
    /// read from the in-memory database that failed: the store is then incomplete and the
    /// server must stop.
    pub fn start(
        &mut self,
        on_fetched: Arc<dyn Fn(Fetched) + Send + Sync>,
        on_fatal: Arc<dyn Fn(PersistError) + Send + Sync>,
    ) -> io::Result<()> {
        let Some((commands, fetches)) = self.pending.take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let callbacks = Callbacks {
            fetched: on_fetched,
            error: on_fatal,
        };
        self.writer = Some(
            thread::Builder::new()
                .name("phpmq-store".into())
                .spawn(move || writer::run(&shared, &commands, &fetches, &callbacks))?,
        );
        let (stop, stopped) = bounded(1);
        let shared = self.shared.clone();
        let target = self.target.clone();
        let interval = self.interval;
        let last = self.last_mirror.clone();
        let on_disk = self.on_disk.clone();
        let writer = self.commands.clone();
        let handle = thread::Builder::new()
            .name("phpmq-mirror".into())
            .spawn(move || {
                mirror_loop(
                    &shared, &writer, &target, interval, &stopped, &on_disk, &last,
                )
            })?;
        self.mirror = Some((stop, handle));
        Ok(())
    }

    /// Waits until every change sent so far is in the in-memory database.
    pub fn flush(&self) {
        let (reply, done) = bounded(1);
        if self.commands.send(Command::Flush(reply)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Applies what is pending, mirrors one last time, and stops both threads. Returns the final
    /// mirror's result.
    pub fn finish(mut self) -> Result<Option<MirrorReport>, PersistError> {
        self.flush();
        let _ = self.commands.send(Command::Stop);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if let Some((stop, handle)) = self.mirror.take() {
            drop(stop);
            let _ = handle.join();
        }
        if is_on_disk(&self.shared, &self.on_disk) {
            return Ok(self.last_mirror());
        }
        let report = mirror::write(&self.shared, &self.target)?;
        self.record(report.clone());
        Ok(Some(report))
    }
}

fn lock_report(
    report: &Mutex<Option<MirrorReport>>,
) -> std::sync::MutexGuard<'_, Option<MirrorReport>> {
    report.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fails now if the mirror could not be written next to `target`.
fn probe_writable(target: &Path) -> Result<(), PersistError> {
    let temp = mirror::temp_path(target);
    std::fs::File::create(&temp)
        .and_then(|_| std::fs::remove_file(&temp))
        .map_err(|source| PersistError::Io {
            action: "write a mirror next to",
            path: target.to_owned(),
            source,
        })
}

/// Whether the file already reflects every committed change.
fn is_on_disk(shared: &Shared, on_disk: &AtomicU64) -> bool {
    on_disk.load(Ordering::Acquire) == shared.generation.load(Ordering::Acquire) + 1
}

fn record(on_disk: &AtomicU64, last: &Mutex<Option<MirrorReport>>, report: MirrorReport) {
    debug!(
        "mirrored {} messages: {} bytes in {} ms (longest store pause {} ms)",
        report.messages,
        report.bytes,
        report.duration.as_millis(),
        report.locked.as_millis()
    );
    on_disk.store(report.generation + 1, Ordering::Release);
    *lock_report(last) = Some(report);
}

/// Mirrors on every tick when something changed, until the stop channel closes.
fn mirror_loop(
    shared: &Shared,
    writer: &Sender<Command>,
    target: &Path,
    interval: Duration,
    stop: &Receiver<()>,
    on_disk: &AtomicU64,
    last: &Mutex<Option<MirrorReport>>,
) {
    let ticker = tick(interval);
    loop {
        select! {
            recv(ticker) -> _ => {
                if is_on_disk(shared, on_disk) {
                    continue;
                }
                match mirror_once(writer, target, stop) {
                    Ok(Some(report)) => record(on_disk, last, report),
                    // The writer has stopped: the final mirror is not ours to write.
                    Ok(None) => return,
                    // The previous mirror stays in place; try again on the next tick.
                    Err(e) => error!("mirror of {} failed, will retry: {e}", target.display()),
                }
            }
            recv(stop) -> _ => return,
        }
    }
}

/// Has the writer copy the database beside `target`, then syncs the copy and puts it in place.
fn mirror_once(
    writer: &Sender<Command>,
    target: &Path,
    stop: &Receiver<()>,
) -> Result<Option<MirrorReport>, PersistError> {
    let started = Instant::now();
    let temp = mirror::temp_path(target);
    let (reply, copied) = bounded(1);
    let request = Command::Mirror {
        temp: temp.clone(),
        reply,
    };
    if writer.send(request).is_err() {
        return Ok(None);
    }
    // The writer answers, or drops the request as it stops (and then `stop` closes).
    let copy = select! {
        recv(copied) -> copy => match copy {
            Ok(copy) => copy?,
            Err(_) => return Ok(None),
        },
        recv(stop) -> _ => return Ok(None),
    };
    let bytes = mirror::put_in_place(&temp, target)?;
    Ok(Some(MirrorReport {
        generation: copy.generation,
        messages: copy.messages,
        bytes,
        duration: started.elapsed(),
        locked: copy.longest_step,
        finished_at: crate::store::now_millis(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_sits_beside_the_target() {
        assert_eq!(
            mirror::temp_path(Path::new("/var/lib/phpmq/phpmq.sqlite")),
            Path::new("/var/lib/phpmq/phpmq.sqlite.tmp")
        );
        assert_eq!(mirror::temp_path(Path::new("x.db")), Path::new("x.db.tmp"));
    }
}
