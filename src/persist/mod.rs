//! Persistence: every accepted message lives in an in-memory SQLite database, which is mirrored
//! to a file in the background, so messages survive a restart without the broker ever waiting
//! for a disk. [`Persistence`] is the front, and the SQLite [`crate::storage::Storage`].
//!
//! - `error`: [`PersistError`], what goes wrong, worded for the operator.
//! - `schema`: the tables, recognising our files, reading messages back.
//! - `batch`: changes folded and applied as SQL, to either database.
//! - `shared`: the in-memory database and the counters the threads share.
//! - `writer`: the thread that owns the in-memory database: applies the broker's changes, reads
//!   content back for the broker, copies the whole database when a full mirror is needed.
//! - `journal`: what the writer committed since the last mirror.
//! - `mirror`: the thread that brings the file up to date on every tick.
//! - `file`: the database file, kept up to date one transaction per mirror (WAL mode).
//! - `copy`: full copies put in place atomically, and loading a file into memory.
//! - `health`: how the mirror has been doing, for the console and the log.
//! - `durable`: how far the file is synced, for receipts that wait for it.
//! - `lock`: one server per database file (`PATH.lock`).
//!
//! On every tick the mirror thread applies the journal to the file in one synced transaction:
//! a mirror costs what changed. A full copy is written only where it is the right tool: a new
//! file, a file deleted or replaced while the server runs, a file from before incremental
//! mirrors, and a journal that outgrew its bound because the disk could not keep up.
//!
//! The loss window: a hard crash loses what changed since the last completed mirror.

mod batch;
mod copy;
mod durable;
mod error;
mod file;
mod health;
mod journal;
mod lock;
mod mirror;
mod schema;
mod shared;
mod writer;

pub use error::PersistError;
pub use health::{MirrorHealth, MirrorReport, MirrorStatus};
pub use schema::SCHEMA_VERSION;
pub use writer::ChannelStore;

use crate::storage::{
    Durability, OnFatal, OnFetched, StatusSource, Storage, StorageError, SyncReport,
};
use crate::store::{now_millis, Backlog, FetchRequest, Fetched, Store, StoredRow};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use file::{Applied, FileDb};
use lock::{DbLock, LastRun};
use log::{info, warn};
use mirror::{Mirror, MirrorState};
use shared::{PanicAlarm, Shared};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use writer::{Callbacks, Command};

/// Where `path` leads once symbolic links are followed (to a file that may not exist yet).
/// The mirror's files (the log, copies, the lock) must sit beside the real file: a full copy
/// renamed over a link would replace the link with a file of its own, and leave the file the
/// operator pointed at stale.
fn follow_links(path: &Path) -> Result<PathBuf, PersistError> {
    let mut current = path.to_owned();
    // As the kernel does, give up on a loop after 40 links.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = std::fs::read_link(&current).map_err(|source| PersistError::Io {
                    action: "read the link",
                    path: current.clone(),
                    source,
                })?;
                current = match current.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            _ => return Ok(current),
        }
    }
    Err(PersistError::Io {
        action: "follow the links of",
        path: path.to_owned(),
        source: io::Error::other("too many levels of symbolic links"),
    })
}

/// The running persistence: the in-memory database, its writer thread and its mirror thread.
pub struct Persistence {
    shared: Arc<Shared>,
    target: PathBuf,
    interval: Duration,
    commands: Sender<Command>,
    fetches: Sender<FetchRequest>,
    pending: Option<(Receiver<Command>, Receiver<FetchRequest>)>,
    writer: Option<JoinHandle<()>>,
    /// The mirror's state while no mirror thread runs (before start, after finish).
    mirror_state: Option<MirrorState>,
    mirror: Option<mirror::Running>,
    health: Arc<Mutex<MirrorHealth>>,
}

impl Persistence {
    /// Loads `target` if it exists (refusing anything that is not a phpmq database), or starts
    /// empty and writes a first mirror so that an unwritable location fails now, not later.
    /// Then [`Persistence::recover`] hands out what it holds. Takes the file's lock first:
    /// one server per file.
    pub fn open(target: &Path, interval: Duration) -> Result<Persistence, PersistError> {
        let resolved = follow_links(target)?;
        if resolved != target {
            info!(
                "{} is a symbolic link: mirroring to {}",
                target.display(),
                resolved.display()
            );
        }
        let target = resolved.as_path();
        if target.is_dir() {
            return Err(PersistError::Io {
                action: "use",
                path: target.to_owned(),
                source: io::Error::other("a directory, not a database file"),
            });
        }
        let lock = DbLock::acquire(target)?;
        if let LastRun::Unfinished { pid } = lock.last_run() {
            warn!(
                "{}: the server that used it last{} did not finish its stop (it was killed, \
                 crashed, lost power, or could not write its final mirror): the file may lack \
                 that server's last changes (those of at most one mirror interval and one \
                 mirror before it ended; none that had a durable receipt), so messages it \
                 accepted then may be missing, and messages acknowledged then may come back",
                target.display(),
                pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
            );
        }
        copy::finish_replacing(target)?;
        let exists = target.try_exists().map_err(|source| PersistError::Io {
            action: "look at",
            path: target.to_owned(),
            source,
        })?;
        let memory = if exists {
            copy::load(target)?
        } else {
            if let Some(kept) = copy::keep_unplaced_copy(target)? {
                warn!(
                    "{} does not exist, but a full copy of it that a crash interrupted does: \
                     kept as {} (it may hold messages, or be incomplete: to use it, stop the \
                     server and rename it to {}); starting with an empty store",
                    target.display(),
                    kept.display(),
                    target.display()
                );
            }
            copy::new_memory()?
        };
        let (commands, pending_commands) = unbounded();
        let (fetches, pending_fetches) = unbounded();
        let shared = Arc::new(Shared::new(memory, lock));
        let health: Arc<Mutex<MirrorHealth>> = Arc::default();
        if exists {
            probe_writable(target)?;
        } else {
            let report = copy::write(&shared, target)?;
            info!("created {}", target.display());
            health::record(&health, report);
        }
        Ok(Persistence {
            shared,
            target: target.to_owned(),
            interval,
            commands,
            fetches,
            pending: Some((pending_commands, pending_fetches)),
            writer: None,
            mirror_state: Some(MirrorState::default()),
            mirror: None,
            health,
        })
    }

    /// Hands every stored message to `restore`, in FIFO order, and returns how many. Reading
    /// every row walks every page, so a damaged file shows up here as an error rather than as
    /// lost messages later.
    pub fn recover(
        &mut self,
        restore: &mut dyn FnMut(StoredRow<'_>),
    ) -> Result<usize, PersistError> {
        let memory = self
            .shared
            .memory
            .lock()
            .map_err(|_| PersistError::Poisoned)?;
        let count = schema::load(&memory, &self.target, restore)?;
        self.shared.rows.store(count as i64, Ordering::Relaxed);
        if let Some(state) = &mut self.mirror_state {
            state.rows = count as i64;
        }
        Ok(count)
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    /// The store to give the broker.
    /// There is one: the writer counts the changes it takes as the tickets this store hands
    /// out ([`Store::submitted`]).
    pub fn store(&self) -> ChannelStore {
        ChannelStore {
            commands: self.commands.clone(),
            fetches: self.fetches.clone(),
            backlog: self.shared.backlog.clone(),
            ring: self.shared.writer_bell(),
            submitted: 0,
        }
    }

    /// How far the writer is behind the broker, and the mirror behind the writer (producers
    /// wait while either is high).
    pub fn backlogs(&self) -> Vec<Arc<Backlog>> {
        vec![self.shared.backlog.clone(), self.shared.journal.backlog()]
    }

    /// The most recent completed mirror.
    pub fn last_mirror(&self) -> Option<MirrorReport> {
        health::lock(&self.health).last.clone()
    }

    /// A handle that reports how the mirror is doing, for status displays.
    pub fn mirror_status(&self) -> MirrorStatus {
        MirrorStatus {
            health: self.health.clone(),
            shared: self.shared.clone(),
            target: self.target.clone(),
        }
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
        let Some(mut state) = self.mirror_state.take() else {
            return Ok(());
        };
        // Opened for writing only now, once recovery accepted it: a file that is refused is
        // left exactly as it was. If it cannot be opened, or is from before incremental
        // mirrors (it cannot give space back), the first mirror writes it in full.
        state.file = match FileDb::open(&self.target) {
            Ok(file) if file.takes_changes() => Some(file),
            Ok(_) => None,
            Err(e) => {
                warn!("cannot open {} for writing: {e}", self.target.display());
                None
            }
        };
        // Before the server serves a client (a connection made meanwhile waits to be taken):
        // the first syncs then write over blocks too, and no request competes with the
        // room's write for the disk.
        if let Some(file) = &state.file {
            file.make_room_at_start();
        }
        // From here on the file changes: a run that ends without a final mirror is told to
        // the next start.
        if let Err(e) = self
            .shared
            .db_lock()
            .and_then(|mut lock| lock.mark_mirroring())
        {
            warn!("{e}: the next start cannot tell whether this run stopped cleanly");
        }
        // Before the writer records anything: without a file the journal holds nothing.
        let weight = state.file.as_ref().map(|file| file.weight(state.rows));
        self.shared.journal.note_file(weight);
        let shared = self.shared.clone();
        let alarm = PanicAlarm(on_fatal.clone());
        let callbacks = Callbacks {
            fetched: on_fetched,
            error: on_fatal.clone(),
        };
        self.writer = Some(
            thread::Builder::new()
                .name("phpmq-store".into())
                .spawn(move || {
                    let _alarm = alarm;
                    writer::run(&shared, &commands, &fetches, &callbacks)
                })?,
        );
        let mirror = Mirror::new(
            self.shared.clone(),
            self.commands.clone(),
            self.target.clone(),
            self.health.clone(),
        );
        self.mirror = Some(mirror.spawn(state, self.interval, PanicAlarm(on_fatal))?);
        Ok(())
    }

    /// Waits until every change sent so far is in the in-memory database.
    pub fn flush(&self) {
        let (reply, done) = bounded(1);
        if self.commands.send(Command::Flush(reply)).is_ok() {
            // Now, not at the end of the writer's gathering window.
            self.shared.ring_writer();
            let _ = done.recv();
        }
    }

    /// Applies what is pending, mirrors one last time, and stops both threads. Returns the final
    /// mirror's report (`None` if the file already had everything). Fails if the file could
    /// not be brought up to date, or is not there at the end.
    pub fn finish(mut self) -> Result<Option<MirrorReport>, PersistError> {
        self.flush();
        let _ = self.commands.send(Command::Stop);
        self.shared.ring_writer();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if let Some((stop, handle)) = self.mirror.take() {
            drop(stop);
            // A mirror thread that panicked lost its state: the file is written in full.
            self.mirror_state = handle.join().ok();
        }
        let state = self.mirror_state.take().unwrap_or_default();
        let report = match self.final_mirror(state) {
            Ok(report) => report,
            Err(e) => {
                health::fail(&self.health, &e);
                return Err(e);
            }
        };
        // Whatever happened, a stop must leave the file: say so if it is not there.
        match std::fs::metadata(&self.target) {
            Ok(meta) if meta.is_file() => {
                if let Err(e) = self
                    .shared
                    .db_lock()
                    .and_then(|mut lock| lock.mark_finished())
                {
                    warn!("{e}: the next start will warn that this run did not stop cleanly");
                }
                Ok(report)
            }
            Ok(_) => Err(PersistError::Missing {
                path: self.target.clone(),
                detail: "not a regular file".into(),
            }),
            Err(e) => Err(PersistError::Missing {
                path: self.target.clone(),
                detail: e.to_string(),
            }),
        }
    }

    fn final_mirror(&self, state: MirrorState) -> Result<Option<MirrorReport>, PersistError> {
        let started = Instant::now();
        let taken = self.shared.journal.take();
        let MirrorState {
            file,
            rows,
            mut in_hand,
        } = state;
        let replay = |f: &FileDb| {
            f.is_in_place()
                && !taken.copy_wanted
                && !f
                    .weight(rows)
                    .replay_of_outweighs_copy(in_hand.iter().chain(taken.ops.iter()))
        };
        if let Some(file) = file.filter(replay) {
            in_hand.append(taken.ops);
            match file.apply(&in_hand, file::Run::Final) {
                Ok(Applied {
                    synced: true,
                    sync_error: None,
                    row_delta,
                    written,
                    ..
                }) => {
                    let bytes = file.size();
                    // Committed and synced: whatever closing does, the file and its log hold
                    // every change, and SQLite folds a log left beside it in at the next start.
                    if let Err(e) = file.close() {
                        warn!(
                            "closing {} after the final mirror failed ({e}); its write-ahead \
                             log stays beside it and is folded in when the server starts",
                            self.target.display()
                        );
                    }
                    self.shared.durable.mark_synced(taken.generation);
                    if in_hand.is_empty() {
                        return Ok(None);
                    }
                    let report = MirrorReport {
                        generation: taken.generation,
                        messages: rows + row_delta,
                        bytes,
                        written,
                        full: false,
                        duration: started.elapsed(),
                        locked: Duration::ZERO,
                        finished_at: now_millis(),
                    };
                    health::record(&self.health, report.clone());
                    return Ok(Some(report));
                }
                // Its log is not to be trusted (see `FileDb`): written in full instead.
                Ok(Applied { sync_error, .. }) => warn!(
                    "final mirror of the changes to {} could not be synced{}; writing it in full",
                    self.target.display(),
                    sync_error.map(|e| format!(" ({e})")).unwrap_or_default()
                ),
                // A full copy may still fit where the changes did not (or fail the same way).
                Err(e) => warn!(
                    "final mirror of the changes to {} failed ({e}); writing it in full",
                    self.target.display()
                ),
            }
        }
        // Missing, replaced, never written, or behind by more than the journal holds.
        let report = copy::write(&self.shared, &self.target)?;
        self.shared.durable.mark_synced(report.generation);
        health::record(&self.health, report.clone());
        Ok(Some(report))
    }
}

/// The SQLite mirror as the server's storage.
impl Storage for Persistence {
    fn location(&self) -> String {
        self.target.display().to_string()
    }

    fn recover(&mut self, restore: &mut dyn FnMut(StoredRow<'_>)) -> Result<usize, StorageError> {
        Persistence::recover(self, restore).map_err(StorageError::new)
    }

    fn store(&self) -> Box<dyn Store> {
        Box::new(Persistence::store(self))
    }

    fn backlogs(&self) -> Vec<Arc<Backlog>> {
        Persistence::backlogs(self)
    }

    fn status(&self) -> Arc<dyn StatusSource> {
        Arc::new(self.mirror_status())
    }

    fn durability(&self) -> Option<Arc<dyn Durability>> {
        Some(self.shared.durable.clone())
    }

    fn start(&mut self, on_fetched: OnFetched, on_fatal: OnFatal) -> Result<(), StorageError> {
        let on_fatal = Arc::new(move |e: PersistError| on_fatal(StorageError::new(e)));
        Persistence::start(self, on_fetched, on_fatal)
            .map_err(|e| StorageError::new(PersistError::Spawn(e)))
    }

    fn finish(self: Box<Self>) -> Result<Option<SyncReport>, StorageError> {
        Persistence::finish(*self)
            .map(|report| report.as_ref().map(SyncReport::from))
            .map_err(StorageError::new)
    }
}

/// Fails now if the mirror could not be written next to `target`.
fn probe_writable(target: &Path) -> Result<(), PersistError> {
    let temp = copy::temp_path(target);
    std::fs::File::create(&temp)
        .and_then(|_| std::fs::remove_file(&temp))
        .map_err(|source| PersistError::Io {
            action: "write a mirror next to",
            path: target.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;
