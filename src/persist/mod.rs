//! Persistence: every accepted message lives in an in-memory SQLite database, which is mirrored
//! to a file in the background, so messages survive a restart without the broker ever waiting
//! for a disk.
//!
//! - `schema`: the tables, recognising our files, reading messages back.
//! - `batch`: changes folded and applied as SQL, to either database.
//! - `writer`: the thread that owns the in-memory database: applies the broker's changes, reads
//!   content back for the broker, copies the whole database when a full mirror is needed.
//! - `journal`: what the writer committed since the last mirror.
//! - `file`: the database file, kept up to date one transaction per mirror (WAL mode).
//! - `mirror`: full copies put in place atomically, and loading a file into memory.
//!
//! On every tick the mirror thread applies the journal to the file in one synced transaction:
//! a mirror costs what changed. A full copy is written only where it is the right tool: a new
//! file, a file deleted or replaced while the server runs, a file from before incremental
//! mirrors, and a journal that outgrew its bound because the disk could not keep up.
//!
//! The loss window: a hard crash loses what changed since the last completed mirror.

mod batch;
mod file;
mod journal;
mod mirror;
mod schema;
mod writer;

pub use mirror::MirrorReport;
pub use schema::SCHEMA_VERSION;
pub use writer::ChannelStore;

use crate::store::{now_millis, Backlog, FetchRequest, Fetched, Millis, StoreOp, StoredRow};
use crossbeam_channel::{bounded, select, tick, unbounded, Receiver, Sender};
use file::FileDb;
use journal::Journal;
use log::{debug, error, info, warn};
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
    /// At the end, the file is not where it should be.
    Missing { path: PathBuf, detail: String },
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
            PersistError::Missing { path, detail } => write!(
                f,
                "{}: no database file after the final mirror ({detail})",
                path.display()
            ),
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
    /// The mirror's state while no mirror thread runs (before start, after finish).
    mirror_state: Option<MirrorState>,
    mirror: Option<(Sender<()>, JoinHandle<MirrorState>)>,
    health: Arc<Mutex<MirrorHealth>>,
}

/// How the mirror has been doing, for status displays and the log.
#[derive(Clone, Debug, Default)]
pub struct MirrorHealth {
    /// The latest mirror that completed.
    pub last: Option<MirrorReport>,
    /// Mirrors that failed since the start.
    pub failures: u64,
    /// Failed in a row since the last one that completed.
    pub failing_for: u64,
    /// The latest failure: when, and why.
    pub last_error: Option<(Millis, String)>,
    /// Mirrors that completed since the start, and how many of them were full copies.
    pub completed: u64,
    pub full_copies: u64,
    /// Bytes written to disk by mirrors since the start, where the system tells.
    pub written: u64,
    /// Changes the file does not have yet.
    pub pending_changes: usize,
    /// Of those, the ones a failed mirror holds for its next try.
    held_back: usize,
}

/// Reports how the mirror is doing.
#[derive(Clone)]
pub struct MirrorStatus {
    health: Arc<Mutex<MirrorHealth>>,
    shared: Arc<Shared>,
}

impl MirrorStatus {
    pub fn latest(&self) -> Option<MirrorReport> {
        lock_health(&self.health).last.clone()
    }

    pub fn health(&self) -> MirrorHealth {
        let mut health = lock_health(&self.health).clone();
        health.pending_changes = self.shared.journal.pending() + health.held_back;
        health
    }
}

/// What the mirror thread keeps between runs.
struct MirrorState {
    /// The open file; `None` when it must be written in full on the next run.
    file: Option<FileDb>,
    /// Messages in the file.
    rows: i64,
    /// Changes taken from the journal that are not in the file yet (their mirror failed).
    in_hand: Vec<StoreOp>,
}

/// Changes a failing mirror keeps for its next try; past this it forgets them and writes the
/// file in full once it can.
const MAX_IN_HAND: usize = 4 << 20;
/// ...or this many content bytes.
const MAX_IN_HAND_BYTES: usize = 256 << 20;
/// Content bytes of a mirror after which freed memory is handed back to the system.
const RELEASE_AFTER_BYTES: usize = 8 << 20;

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
        let shared = Arc::new(Shared {
            memory: Mutex::new(memory),
            generation: AtomicU64::new(0),
            rows: AtomicI64::new(0),
            backlog: Arc::default(),
            journal: Journal::default(),
        });
        let health: Arc<Mutex<MirrorHealth>> = Arc::default();
        if exists {
            probe_writable(target)?;
        } else {
            let report = mirror::write(&shared, target)?;
            info!("created {}", target.display());
            record(&health, report);
        }
        Ok(Persistence {
            shared,
            target: target.to_owned(),
            interval,
            commands,
            fetches,
            pending: Some((pending_commands, pending_fetches)),
            writer: None,
            mirror_state: Some(MirrorState {
                file: None,
                rows: 0,
                in_hand: Vec::new(),
            }),
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
    pub fn store(&self) -> ChannelStore {
        ChannelStore {
            commands: self.commands.clone(),
            fetches: self.fetches.clone(),
            backlog: self.shared.backlog.clone(),
        }
    }

    /// How far the writer is behind the broker, and the mirror behind the writer (producers
    /// wait while either is high).
    pub fn backlogs(&self) -> Vec<Arc<Backlog>> {
        vec![self.shared.backlog.clone(), self.shared.journal.backlog()]
    }

    /// The most recent completed mirror.
    pub fn last_mirror(&self) -> Option<MirrorReport> {
        lock_health(&self.health).last.clone()
    }

    /// A handle that reports how the mirror is doing, for status displays.
    pub fn mirror_status(&self) -> MirrorStatus {
        MirrorStatus {
            health: self.health.clone(),
            shared: self.shared.clone(),
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
            Ok(file) if file.shrinks_incrementally() => Some(file),
            Ok(_) => None,
            Err(e) => {
                warn!("cannot open {} for writing: {e}", self.target.display());
                None
            }
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
        let mirror = Mirror {
            shared: self.shared.clone(),
            writer: self.commands.clone(),
            target: self.target.clone(),
            health: self.health.clone(),
        };
        let interval = self.interval;
        let handle = thread::Builder::new()
            .name("phpmq-mirror".into())
            .spawn(move || mirror.run(state, interval, &stopped))?;
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
    /// mirror's report (`None` if the file already had everything). Fails if the file could
    /// not be brought up to date, or is not there at the end.
    pub fn finish(mut self) -> Result<Option<MirrorReport>, PersistError> {
        self.flush();
        let _ = self.commands.send(Command::Stop);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if let Some((stop, handle)) = self.mirror.take() {
            drop(stop);
            // A mirror thread that panicked lost its state: the file is written in full.
            self.mirror_state = handle.join().ok();
        }
        let state = self.mirror_state.take().unwrap_or(MirrorState {
            file: None,
            rows: 0,
            in_hand: Vec::new(),
        });
        let report = self.final_mirror(state);
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                fail(&self.health, &e);
                return Err(e);
            }
        };
        // Whatever happened, a stop must leave the file: say so if it is not there.
        match std::fs::metadata(&self.target) {
            Ok(meta) if meta.is_file() => Ok(report),
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
        if let Some(file) = file.filter(|f| f.is_in_place() && !taken.overflowed) {
            in_hand.extend(taken.ops);
            match file.apply(&in_hand) {
                Ok(applied) => {
                    let bytes = file.size();
                    file.close().map_err(|source| PersistError::Sqlite {
                        action: "close",
                        path: self.target.clone(),
                        source,
                    })?;
                    if in_hand.is_empty() {
                        return Ok(None);
                    }
                    let report = MirrorReport {
                        generation: taken.generation,
                        messages: rows + applied.row_delta,
                        bytes,
                        written: applied.written,
                        full: false,
                        duration: started.elapsed(),
                        locked: Duration::ZERO,
                        finished_at: now_millis(),
                    };
                    record(&self.health, report.clone());
                    return Ok(Some(report));
                }
                // A full copy may still fit where the changes did not (or fail the same way).
                Err(e) => warn!(
                    "final mirror of the changes to {} failed ({e}); writing it in full",
                    self.target.display()
                ),
            }
        }
        // Missing, replaced, never written, or behind by more than the journal holds.
        let report = mirror::write(&self.shared, &self.target)?;
        record(&self.health, report.clone());
        Ok(Some(report))
    }
}

fn lock_health(health: &Mutex<MirrorHealth>) -> std::sync::MutexGuard<'_, MirrorHealth> {
    health.lock().unwrap_or_else(|p| p.into_inner())
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

fn record(health: &Mutex<MirrorHealth>, report: MirrorReport) {
    debug!(
        "mirrored {} messages ({}): {} bytes written, file {} bytes, in {} ms (longest store pause {} ms)",
        report.messages,
        if report.full { "full copy" } else { "changes" },
        report.written.map_or_else(|| "?".into(), |w| w.to_string()),
        report.bytes,
        report.duration.as_millis(),
        report.locked.as_millis()
    );
    let mut health = lock_health(health);
    if health.failing_for > 0 {
        info!(
            "mirror completed again after {} failed attempt(s)",
            health.failing_for
        );
    }
    health.failing_for = 0;
    health.completed += 1;
    health.full_copies += u64::from(report.full);
    health.written += report.written.unwrap_or_default();
    health.last = Some(report);
}

fn fail(health: &Mutex<MirrorHealth>, e: &PersistError) {
    let mut health = lock_health(health);
    health.failures += 1;
    health.failing_for += 1;
    health.last_error = Some((now_millis(), e.to_string()));
}

/// The mirror thread: on every tick, brings the file up to date.
struct Mirror {
    shared: Arc<Shared>,
    writer: Sender<Command>,
    target: PathBuf,
    health: Arc<Mutex<MirrorHealth>>,
}

/// What a mirror run came to.
enum Outcome {
    Done(Option<MirrorReport>),
    /// The writer has stopped: the final mirror is not ours to write.
    Stopped,
}

impl Mirror {
    /// Mirrors on every tick until the stop channel closes; returns its state for the final
    /// mirror.
    fn run(&self, mut state: MirrorState, interval: Duration, stop: &Receiver<()>) -> MirrorState {
        let ticker = tick(interval);
        let early = self.shared.journal.wake_ups().clone();
        loop {
            select! {
                recv(ticker) -> _ => {}
                recv(early) -> _ => {
                    // A failing mirror retries on its tick, not on every batch.
                    if lock_health(&self.health).failing_for > 0 {
                        continue;
                    }
                }
                recv(stop) -> _ => return state,
            }
            let outcome = self.once(&mut state, stop);
            lock_health(&self.health).held_back = state.in_hand.len();
            match outcome {
                Ok(Outcome::Done(Some(report))) => record(&self.health, report),
                Ok(Outcome::Done(None)) => {}
                Ok(Outcome::Stopped) => return state,
                Err(e) => {
                    // Logged once per run of failures, then every 60th, not every tick.
                    let failing_for = lock_health(&self.health).failing_for;
                    if failing_for.is_multiple_of(60) {
                        error!(
                            "mirror of {} failed, will retry: {e}",
                            self.target.display()
                        );
                    }
                    fail(&self.health, &e);
                }
            }
        }
    }

    /// One mirror: the changes since the last one, or a full copy where the file needs it.
    fn once(&self, state: &mut MirrorState, stop: &Receiver<()>) -> Result<Outcome, PersistError> {
        let in_place = state.file.as_ref().is_some_and(FileDb::is_in_place);
        if in_place {
            let taken = self.shared.journal.take();
            if !taken.overflowed {
                return self.apply_changes(state, taken.ops, taken.generation);
            }
        } else if state.file.is_some() {
            warn!(
                "{} was deleted or replaced while the server ran; writing it again in full",
                self.target.display()
            );
        }
        // Closing first: a full copy replaces the file and its log.
        state.file = None;
        state.in_hand.clear();
        let Some(report) = self.full_copy(stop)? else {
            return Ok(Outcome::Stopped);
        };
        state.rows = report.messages;
        state.file = Some(
            FileDb::open(&self.target).map_err(|source| PersistError::Sqlite {
                action: "open for writing",
                path: self.target.clone(),
                source,
            })?,
        );
        Ok(Outcome::Done(Some(report)))
    }

    fn apply_changes(
        &self,
        state: &mut MirrorState,
        ops: Vec<StoreOp>,
        generation: u64,
    ) -> Result<Outcome, PersistError> {
        let Some(file) = &state.file else {
            return Ok(Outcome::Done(None));
        };
        let started = Instant::now();
        // Nothing changed: the file may still have space to give back.
        state.in_hand.extend(ops);
        match file.apply(&state.in_hand) {
            Ok(applied) if !applied.wrote => Ok(Outcome::Done(None)),
            Ok(applied) => {
                state.rows += applied.row_delta;
                let content: usize = state.in_hand.iter().map(StoreOp::content_len).sum();
                state.in_hand = Vec::new();
                if content > RELEASE_AFTER_BYTES {
                    // A flood's content was held here until now: give its pages back.
                    crate::memory::release_free_pages();
                }
                Ok(Outcome::Done(Some(MirrorReport {
                    generation,
                    messages: state.rows,
                    bytes: file.size(),
                    written: applied.written,
                    full: false,
                    duration: started.elapsed(),
                    locked: Duration::ZERO,
                    finished_at: now_millis(),
                })))
            }
            Err(source) => {
                // Kept for the next try, within bounds; past them, the next mirror that can
                // writes the file in full from memory.
                let content: usize = state.in_hand.iter().map(StoreOp::content_len).sum();
                if state.in_hand.len() > MAX_IN_HAND || content > MAX_IN_HAND_BYTES {
                    state.in_hand.clear();
                    state.file = None;
                }
                Err(PersistError::Sqlite {
                    action: "mirror changes to",
                    path: self.target.clone(),
                    source,
                })
            }
        }
    }

    /// Has the writer copy the database beside the target, then syncs the copy and puts it in
    /// place. `None` if the writer has stopped.
    fn full_copy(&self, stop: &Receiver<()>) -> Result<Option<MirrorReport>, PersistError> {
        let started = Instant::now();
        let temp = mirror::temp_path(&self.target);
        let (reply, copied) = bounded(1);
        let request = Command::Mirror {
            temp: temp.clone(),
            reply,
        };
        if self.writer.send(request).is_err() {
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
        let bytes = mirror::put_in_place(&temp, &self.target)?;
        Ok(Some(MirrorReport {
            generation: copy.generation,
            messages: copy.messages,
            bytes,
            written: Some(bytes),
            full: true,
            duration: started.elapsed(),
            locked: copy.longest_step,
            finished_at: now_millis(),
        }))
    }
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
