//! The store writer: the broker's [`Store`] is a pair of channels, and this thread owns the
//! in-memory SQLite database: it applies the broker's changes in batches of one transaction
//! each, reads content back for the broker's fetches, and copies the database for the mirror
//! a few pages at a time between batches, so neither the broker nor a fetch waits for a copy.
//!
//! The broker never waits for SQLite: it only sends on unbounded channels (when this thread falls
//! far behind, producers' connections wait before they take the broker lock: see
//! [`crate::store::Backlog`]). A message that is accepted and acknowledged within one batch never
//! touches SQLite at all.

use super::batch;
use super::copy;
use super::error::PersistError;
use super::file::FileWeight;
use super::shared::{memory_failure, Shared};
use crate::store::{Backlog, FetchRequest, Fetched, Store, StoreOp};
use crossbeam_channel::{select, Receiver, Sender};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{params, Connection};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The most changes applied in one transaction (unless a fetch needs more applied first).
const MAX_BATCH: usize = 8192;
/// How long the writer gathers changes after the first one before writing them. A message
/// acknowledged within the window never reaches SQLite: under a flat-out stream the backlog
/// keeps messages waiting for tens of milliseconds, which a 5 ms window did not cover (each
/// then cost an insert and a delete). Nothing waits for the window: the mirror's tick, a
/// fetch, a durable receipt, a flush, a stop and a batch's worth of changes each end it early.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// What a mirror copies between two batches: a short pause for the batches and fetches that wait.
const MIRROR_STEP_BYTES: i64 = 16 << 20;
/// A database up to this size is copied in one step: every batch applied between steps also
/// writes its changed pages into the copy, which costs more than the short pause saves.
const MIRROR_ONE_STEP_BYTES: i64 = 32 << 20;

pub enum Command {
    Op(StoreOp),
    /// Replies once everything sent before it is in the database.
    Flush(Sender<()>),
    /// Copies the database into a new file at `temp` and replies once the copy is complete
    /// (written, not yet synced).
    Mirror {
        temp: PathBuf,
        reply: Sender<Result<Copied, PersistError>>,
    },
    Stop,
}

/// What a completed copy holds.
pub struct Copied {
    /// The writer generation it reflects.
    pub generation: u64,
    pub messages: i64,
    /// The longest the writer spent in one copy step (its batches and fetches wait meanwhile).
    pub longest_step: Duration,
}

/// The broker's side of the channels.
pub struct ChannelStore {
    pub(super) commands: Sender<Command>,
    pub(super) fetches: Sender<FetchRequest>,
    pub(super) backlog: Arc<Backlog>,
    /// Ends the writer's gathering window once a batch's worth of changes waits, or the
    /// backlog rises: in a flood, one batch at a time keeps the backlog far below the mark
    /// where producers wait (large messages fill its bytes long before the window ends).
    pub(super) ring: Sender<()>,
    /// Changes sent so far; the writer counts them as it takes them, in the same order.
    pub(super) submitted: u64,
}

impl Store for ChannelStore {
    fn apply(&mut self, op: StoreOp) {
        let pending = self.backlog.add(op.content_len());
        if pending >= MAX_BATCH || self.backlog.is_rising() {
            // Full means a ring is already waiting.
            let _ = self.ring.try_send(());
        }
        self.submitted += 1;
        // Fails only once the writer has stopped, at the very end of shutdown.
        let _ = self.commands.send(Command::Op(op));
    }

    fn submitted(&self) -> u64 {
        self.submitted
    }

    fn can_fetch(&self) -> bool {
        true
    }

    fn fetch(&mut self, request: FetchRequest) {
        let _ = self.fetches.send(request);
    }
}

/// Applies a coalesced batch, which brings the store up to ticket `through`, to the in-memory
/// database, then hands it to the journal for the next mirror.
fn commit(
    shared: &Shared,
    conn: &Connection,
    ops: Vec<StoreOp>,
    through: u64,
) -> Result<(), PersistError> {
    let delta = batch::apply(conn, &ops).map_err(memory_failure("write to"))?;
    shared.rows.fetch_add(delta, Ordering::Relaxed);
    shared.generation.store(through, Ordering::Release);
    shared.journal.record(ops, through);
    Ok(())
}

/// Free space in memory worth giving back...
const SHRINK_FREE_BYTES: i64 = 4 << 20;
/// ...at most this much per step, so that a step never holds up batches or fetches for long.
const SHRINK_STEP_BYTES: i64 = 8 << 20;
/// How long the store must have been idle before a step of giving memory back (and between
/// two steps).
const SHRINK_AFTER_IDLE: Duration = Duration::from_millis(20);

/// Once acknowledgements have freed much of the database, gives a bounded step of it back
/// (incremental vacuum: pages from the end move into the holes), so memory follows the live
/// messages. Runs only when no change waits. Returns whether it gave any back.
fn shrink_step(conn: &Connection) -> rusqlite::Result<bool> {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let (_, page_size) = pages_and_size(conn)?;
    if free * page_size < SHRINK_FREE_BYTES {
        return Ok(false);
    }
    let pages = free.min(SHRINK_STEP_BYTES / page_size);
    let mut statement = conn.prepare_cached(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = statement.query([])?;
    while rows.next()?.is_some() {}
    Ok(true)
}

/// Where the writer sends what it read back and what went wrong.
pub struct Callbacks {
    pub fetched: Arc<dyn Fn(Fetched) + Send + Sync>,
    /// A failed write or read: the store is no longer complete, and the writer has stopped.
    pub error: Arc<dyn Fn(PersistError) + Send + Sync>,
}

/// Serves both channels until `Stop` (or every sender is gone).
pub fn run(
    shared: &Shared,
    commands: &Receiver<Command>,
    fetches: &Receiver<FetchRequest>,
    callbacks: &Callbacks,
) {
    run_with_window(shared, commands, fetches, callbacks, BATCH_WINDOW);
}

/// [`run`] with a gathering window of its own (tests use one that never ends by itself).
fn run_with_window(
    shared: &Shared,
    commands: &Receiver<Command>,
    fetches: &Receiver<FetchRequest>,
    callbacks: &Callbacks,
    window: Duration,
) {
    let Ok(conn) = shared.memory.lock() else {
        (callbacks.error)(PersistError::Poisoned);
        return;
    };
    let mut writer = Writer {
        conn: &conn,
        shared,
        commands,
        fetches,
        callbacks,
        window,
        at_cap: false,
        batch: Vec::new(),
        batch_bytes: 0,
        received: 0,
        flushes: Vec::new(),
        pending_fetches: Vec::new(),
        mirror: None,
        copying: false,
        shrunk: false,
        may_shrink: true,
        stop: false,
    };
    if let Err(e) = writer.serve() {
        (callbacks.error)(e);
    }
}

struct Writer<'a> {
    conn: &'a Connection,
    shared: &'a Shared,
    commands: &'a Receiver<Command>,
    fetches: &'a Receiver<FetchRequest>,
    callbacks: &'a Callbacks,
    /// How long changes are gathered before they are written ([`BATCH_WINDOW`]).
    window: Duration,
    /// The last round stopped at [`MAX_BATCH`] with commands left (a flush among them,
    /// maybe): the next takes no window.
    at_cap: bool,
    batch: Vec<StoreOp>,
    /// Content bytes in `batch`.
    batch_bytes: usize,
    /// Changes taken from the channel so far: the store ticket (see [`ChannelStore`]).
    received: u64,
    flushes: Vec<Sender<()>>,
    pending_fetches: Vec<FetchRequest>,
    mirror: Option<(PathBuf, Sender<Result<Copied, PersistError>>)>,
    /// A copy is under way (it must not see the database rebuilt).
    copying: bool,
    /// Pages were given back since memory was last released to the system.
    shrunk: bool,
    /// Changes were applied since the last check for space to give back.
    may_shrink: bool,
    stop: bool,
}

impl Writer<'_> {
    fn serve(&mut self) -> Result<(), PersistError> {
        while !self.stop {
            // Space is given back only once the store has been idle for a moment: during a
            // drain, moving pages would compete with the drain itself for the same CPU.
            let idle = if self.may_shrink {
                SHRINK_AFTER_IDLE
            } else {
                Duration::from_secs(3600)
            };
            select! {
                recv(self.commands) -> command => match command {
                    Ok(command) => self.take(command),
                    Err(_) => return Ok(()),
                },
                recv(self.fetches) -> request => {
                    if let Ok(request) = request {
                        self.pending_fetches.push(request);
                    }
                }
                // A durable receipt waits, maybe for changes already committed before it asked.
                recv(self.shared.durable.writer_wake_ups()) -> _ => {}
                default(idle) => {
                    self.shrink()?;
                    continue;
                }
            }
            // Gather what comes within the window: an accept acknowledged inside it never
            // reaches SQLite, and a busy stream costs one transaction per window, not one per
            // message. A change sent meanwhile does not wake this thread, unless a batch's worth
            // waits or the backlog rises; a fetch does, since a consumer may be waiting for it,
            // and so do the mirror's tick, a flush and a stop.
            // A durable receipt waiting is not worth a window either: it waits for this
            // batch, then for the file's sync. Nor is a backlog past half its mark: producers
            // would soon wait for it.
            let only_changes = self.flushes.is_empty()
                && !self.at_cap
                && self.pending_fetches.is_empty()
                && self.mirror.is_none()
                && !self.stop
                && !self.shared.durable.is_wanted()
                && !self.shared.backlog.is_rising();
            if only_changes && self.commands.len() < MAX_BATCH {
                select! {
                    recv(self.fetches) -> request => {
                        if let Ok(request) = request {
                            self.pending_fetches.push(request);
                        }
                    }
                    recv(self.shared.durable.writer_wake_ups()) -> _ => {}
                    recv(self.shared.writer_rung()) -> _ => {}
                    default(self.window) => {}
                }
            }
            self.work()?;
            if self.shared.durable.is_wanted() {
                // Committed by now (this round or before the receipt asked): the mirror syncs
                // it at once. One wake a round: a wake per commit left the mirror an empty run
                // after each real one.
                self.shared.journal.wake_mirror();
            }
            if let Some((temp, reply)) = self.mirror.take() {
                self.copying = true;
                let copied = self.copy_to(&temp);
                self.copying = false;
                match copied {
                    Ok(copy) => {
                        let _ = reply.send(Ok(copy));
                    }
                    // A failed copy says nothing about the store: the mirror thread reports it
                    // and asks again on its next tick.
                    Err(CopyFailed::Copy(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    // Applying changes between steps failed: the store is incomplete.
                    Err(CopyFailed::Store(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// One step of giving space back, after the store was idle; once there is nothing left
    /// to give, the process's memory is handed back to the system.
    fn shrink(&mut self) -> Result<(), PersistError> {
        if self.copying {
            return Ok(());
        }
        if shrink_step(self.conn).map_err(memory_failure("shrink"))? {
            self.shrunk = true;
        } else {
            self.may_shrink = false;
            if std::mem::take(&mut self.shrunk) {
                crate::memory::release_free_pages();
            }
        }
        Ok(())
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Op(op) => {
                self.received += 1;
                self.batch_bytes += op.content_len();
                self.batch.push(op);
            }
            Command::Flush(reply) => self.flushes.push(reply),
            Command::Mirror { temp, reply } => self.mirror = Some((temp, reply)),
            Command::Stop => self.stop = true,
        }
    }

    /// Applies what is waiting, then answers flushes and fetches. Never blocks.
    fn work(&mut self) -> Result<(), PersistError> {
        // A ring is for changes or commands sent before it, all taken below (or, past the cap,
        // on the next round, which then takes no window): one left over would only cut the
        // next window short.
        while self.shared.writer_rung().try_recv().is_ok() {}
        self.pending_fetches.extend(self.fetches.try_iter());
        // Every change the broker made before asking for a fetch is in the channel by now,
        // and must be applied before the fetch is answered.
        let mut owed = if self.pending_fetches.is_empty() {
            0
        } else {
            self.commands.len()
        };
        while !self.stop {
            let Ok(command) = self.commands.try_recv() else {
                break;
            };
            self.take(command);
            owed = owed.saturating_sub(1);
            if owed == 0 && self.batch.len() >= MAX_BATCH {
                break;
            }
        }
        self.at_cap = !self.commands.is_empty();
        if !self.batch.is_empty() {
            let changes = self.batch.len();
            let ops = batch::coalesce(std::mem::take(&mut self.batch));
            commit(self.shared, self.conn, ops, self.received)?;
            self.may_shrink = true;
            self.shared
                .backlog
                .remove(changes, std::mem::take(&mut self.batch_bytes));
        }
        for reply in self.flushes.drain(..) {
            let _ = reply.send(());
        }
        for request in std::mem::take(&mut self.pending_fetches) {
            let contents =
                read_contents(self.conn, &request.seqs).map_err(|source| PersistError::Sqlite {
                    action: "read from",
                    path: ":memory:".into(),
                    source,
                })?;
            (self.callbacks.fetched)(Fetched { request, contents });
        }
        Ok(())
    }

    /// Copies the database into `temp` a few pages at a time, applying changes and answering
    /// fetches between steps, so a large copy does not hold them up in one go, as long as no
    /// change comes. A commit to an in-memory database sends a backup in progress back to
    /// its first page (SQLite cannot tell which pages changed): under a steady stream,
    /// stepping would start over after every step and never finish. So once a change was
    /// committed between two steps, the rest is copied in one step, which then holds
    /// everything committed so far.
    fn copy_to(&mut self, temp: &std::path::Path) -> Result<Copied, CopyFailed> {
        let sqlite = |action| {
            move |source| {
                CopyFailed::Copy(PersistError::Sqlite {
                    action,
                    path: temp.to_owned(),
                    source,
                })
            }
        };
        let mut file = copy::create_temp(temp).map_err(CopyFailed::Copy)?;
        let (pages, page_size) = pages_and_size(self.conn).map_err(sqlite("measure"))?;
        let mut step_pages = if pages * page_size <= MIRROR_ONE_STEP_BYTES {
            -1
        } else {
            (MIRROR_STEP_BYTES / page_size).clamp(1, i32::MAX.into()) as i32
        };
        let mut longest_step = Duration::ZERO;
        {
            let backup = Backup::new(self.conn, &mut file).map_err(sqlite("write"))?;
            loop {
                let started = Instant::now();
                let step = backup.step(step_pages).map_err(sqlite("write"))?;
                longest_step = longest_step.max(started.elapsed());
                match step {
                    StepResult::Done => break,
                    StepResult::More => {}
                    // Nothing else uses either database; back off rather than spin.
                    _ => thread::sleep(Duration::from_millis(1)),
                }
                // Between copy steps, no batching window: apply what waits and go on.
                let before = self.shared.generation.load(Ordering::Acquire);
                self.work().map_err(CopyFailed::Store)?;
                if self.shared.generation.load(Ordering::Acquire) != before {
                    // The copy starts over: all of it at once this time.
                    step_pages = -1;
                }
            }
        }
        drop(file);
        // The copy holds every batch committed so far: the journal starts again from here.
        let (pages, page_size) = pages_and_size(self.conn).map_err(sqlite("measure"))?;
        self.shared.journal.reset(FileWeight {
            bytes: (pages * page_size).max(0) as u64,
            rows: self.shared.rows.load(Ordering::Relaxed),
        });
        Ok(Copied {
            generation: self.shared.generation.load(Ordering::Acquire),
            messages: self.shared.rows.load(Ordering::Relaxed),
            longest_step,
        })
    }
}

/// Why a copy for the mirror did not complete.
#[derive(Debug)]
enum CopyFailed {
    /// Writing the copy failed; the store is fine.
    Copy(PersistError),
    /// Applying changes between copy steps failed: the store itself is broken.
    Store(PersistError),
}

/// The content of the stored messages among `seqs` (ascending), ascending by seq. A dense run
/// (the usual case: one queue's backlog) is read with one range scan, a sparse set row by row.
fn read_contents(conn: &Connection, seqs: &[u64]) -> rusqlite::Result<Vec<(u64, Arc<[u8]>)>> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Ok(Vec::new());
    };
    let mut contents = Vec::with_capacity(seqs.len());
    if last - first < 2 * seqs.len() as u64 + 64 {
        let mut statement =
            conn.prepare_cached("SELECT seq, content FROM messages WHERE seq BETWEEN ?1 AND ?2")?;
        let mut rows = statement.query(params![first as i64, last as i64])?;
        let mut wanted = seqs.iter().peekable();
        while let Some(row) = rows.next()? {
            let seq = row.get::<_, i64>(0)? as u64;
            while wanted.next_if(|&&w| w < seq).is_some() {}
            if wanted.next_if(|&&w| w == seq).is_some() {
                contents.push((seq, Arc::from(row.get_ref(1)?.as_blob()?)));
            }
        }
    } else {
        let mut statement = conn.prepare_cached("SELECT content FROM messages WHERE seq = ?1")?;
        for &seq in seqs {
            let mut rows = statement.query(params![seq as i64])?;
            if let Some(row) = rows.next()? {
                contents.push((seq, Arc::from(row.get_ref(0)?.as_blob()?)));
            }
        }
    }
    Ok(contents)
}

/// The database's page count and page size.
fn pages_and_size(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let pages = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    let size = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    Ok((pages, size))
}

#[cfg(test)]
mod tests;
