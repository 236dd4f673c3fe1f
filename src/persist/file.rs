//! The database file as the mirror keeps it up to date: one connection, in WAL mode, that
//! takes everything changed since the last mirror in one transaction, so that a mirror costs
//! what changed, not what is stored.
//!
//! A run on the mirror's tick, for a durable receipt, or at the stop syncs the log once its
//! commit is written: once [`FileDb::apply`] returns, every change committed so far survives a
//! crash. A run early for a flood or for leftover changes (acknowledgements, mostly) commits
//! without a sync: nobody waits for it, and the next synced run covers it ([`Applied::synced`]
//! says which). SQLite runs with `synchronous = NORMAL`, which in WAL mode syncs the log
//! before folding it and the file after, so a crash can lose unsynced commits, never corrupt
//! the file; the sync is ours (`fdatasync` of the log's file). The write-ahead log is folded into the file whenever it grows past
//! [`CHECKPOINT_BYTES`] ([`DURABLE_CHECKPOINT_BYTES`] under durable receipts), on a mirror
//! with nothing else to do, and at a graceful stop, after which the file is one plain SQLite
//! database again. Until the stop, the log's file is kept (16 MiB from the server's start, up
//! to [`WAL_KEEP_BYTES`] under load) and written over
//! from its start after each fold: syncing blocks written over costs about half as much as
//! syncing blocks appended (no block allocation, no size change), and a durable receipt waits
//! for one such sync. Space freed by acknowledged messages is given back a step at a time
//! (incremental vacuum), so the file follows the live messages.
//!
//! The mirror also checks on every run that the path still names the file it writes, as it
//! left it: a file deleted, replaced or written over in place by another program (a backup
//! copied over it) is noticed ([`FileDb::is_in_place`]) and written again in full.

use super::batch;
use super::schema;
use crate::store::StoreOp;
use log::{debug, info, warn};
use rusqlite::Connection;
use std::cell::Cell;
use std::ffi::c_int;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// The write-ahead log is folded into the file (and emptied) past this size: pages changed
/// again and again (a queue's head and tail) are folded once per checkpoint, not once per
/// mirror, and a trickle of changes folds rarely. A bulk mirror of tens of megabytes appends
/// to the log with one sync, and folding it at once would copy it all a second time while
/// the server works (a drain right after a flood: 342k vs 290k msg/s folding at 16 MiB).
const CHECKPOINT_BYTES: i64 = 64 << 20;
/// ...and past this size after a run for a durable receipt: its many small syncs then write
/// over the log's room (below) up to each fold, and append only the commit that crosses it.
const DURABLE_CHECKPOINT_BYTES: i64 = WAL_PRESIZE_BYTES;
/// The log's file is kept at most this large after a fold under load, to be written over:
/// room for a log folded at [`CHECKPOINT_BYTES`] and its last commit.
const WAL_KEEP_BYTES: i64 = CHECKPOINT_BYTES + (16 << 20);
/// An empty log's file is given this much room (zeros) when the server starts and when the
/// mirror is idle, so that syncs write over blocks (about half the cost of appending here)
/// instead of only once the log was first folded in.
const WAL_PRESIZE_BYTES: i64 = 16 << 20;
/// What a frame of the log adds to its page (the frame header), and the log's own header.
const WAL_FRAME_HEADER: i64 = 24;
const WAL_HEADER: i64 = 32;
/// Free space in the file worth giving back...
const SHRINK_FREE_BYTES: i64 = 4 << 20;
/// ...at most this much per mirror, so that one mirror stays short.
const SHRINK_STEP_BYTES: i64 = 64 << 20;

/// What a stored row costs beyond its content (id, queue, times, cell and page overhead).
const ROW_OVERHEAD: u64 = 64;
/// What replaying a delete or re-queue costs at most: it rewrites the part of a page that
/// holds the row, however large the row (freed overflow pages are listed, not rewritten).
/// Without this bound, a file holding next to no rows (a queue drained as fast as it fills)
/// would cost each delete the whole file, and a handful of them a full copy.
const MAX_ROW_REPLAY_BYTES: u64 = 4 << 10;
/// Below this size a store is never worth copying instead of replaying what changed: a small
/// change to a small store stays small.
const MIN_COPY_BYTES: u64 = 1 << 20;

/// What the file holds, to decide whether replaying changes or copying the whole store is the
/// cheaper way to bring it up to date.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileWeight {
    /// The file's size, without its log.
    pub bytes: u64,
    /// Messages in it.
    pub rows: i64,
}

impl FileWeight {
    /// Whether replaying changes (`inserts` rows with `insert_bytes` of content, and `others`
    /// deletes or re-queues) would write more than copying the whole store: then a full copy
    /// is the cheaper tool — a store much smaller than the churn that went through it since
    /// the last mirror (a burst sent and drained within a second or two, a large drain). A
    /// replayed change is written twice (to the log, then into the file); a deleted or
    /// re-queued row is costed at the file's average row.
    pub fn replay_outweighs_copy(&self, insert_bytes: u64, inserts: u64, others: u64) -> bool {
        let average_row = (self.bytes / self.rows.max(1) as u64).min(MAX_ROW_REPLAY_BYTES);
        let replayed = insert_bytes + inserts * ROW_OVERHEAD + others * average_row;
        2 * replayed > self.bytes.max(MIN_COPY_BYTES)
    }

    /// [`FileWeight::replay_outweighs_copy`] for a list of changes.
    pub fn replay_of_outweighs_copy<'a>(&self, ops: impl IntoIterator<Item = &'a StoreOp>) -> bool {
        let (mut insert_bytes, mut inserts, mut others) = (0, 0, 0);
        for op in ops {
            match op {
                StoreOp::Insert(m) => {
                    insert_bytes += m.content.len() as u64;
                    inserts += 1;
                }
                StoreOp::Delete { .. } | StoreOp::Requeue { .. } | StoreOp::Counted { .. } => {
                    others += 1
                }
            }
        }
        self.replay_outweighs_copy(insert_bytes, inserts, others)
    }
}

/// Which file a path names: a file replaced under the same name has another identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

fn identity(path: &Path) -> io::Result<Identity> {
    fs::metadata(path).map(|meta| Identity::of(&meta))
}

/// The file's size and modification time as this server last left it: anything else means
/// another program wrote it (a backup copied over it in place, same inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Written {
    len: u64,
    modified: Option<SystemTime>,
}

impl Written {
    fn of(meta: &fs::Metadata) -> Written {
        Written {
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

fn written(path: &Path) -> Option<Written> {
    fs::metadata(path).ok().map(|meta| Written::of(&meta))
}

/// The mirror's open database file.
pub struct FileDb {
    conn: Connection,
    path: PathBuf,
    /// The write-ahead log's file beside it.
    wal_path: PathBuf,
    identity: Identity,
    /// The file as this server last wrote it (at open and after each fold: in WAL mode the
    /// file itself is written only then).
    last_written: Cell<Option<Written>>,
    page_size: i64,
    incremental_vacuum: bool,
    /// Written in the schema this build writes (not an older phpmq's).
    current_schema: bool,
    /// Frames in the log since it was last folded in, as SQLite reports after each commit:
    /// the log's file size says nothing once it is written over.
    wal_frames: Arc<AtomicI64>,
    /// A run for a durable receipt wrote since the last mirror on the timer: the next one is
    /// not idle even if those runs left it nothing to write.
    wrote_since_tick: Cell<bool>,
    /// The last fold failed: the next is tried on the mirror's tick, not on every run (a
    /// fold that fails may first copy megabytes, and durable receipts would wait for it).
    fold_failing: Cell<bool>,
    /// Folds failed in a row, for the log.
    fold_failures: Cell<u64>,
    /// The log's room was refused for lack of disk space: said once, not on every idle tick.
    room_refused: Cell<bool>,
    /// Changes committed without a sync (a run early for a flood or leftover changes).
    unsynced: Cell<bool>,
    /// A sync of the log failed: this file never reports itself synced again. Linux reports a
    /// failed writeback once and marks the pages clean, so a later sync can succeed without
    /// the data being on disk; only a new file (a full copy) is trusted again.
    sync_failed: Cell<bool>,
    /// Tests: syncs of the log fail, as on a failing disk.
    #[cfg(test)]
    pub fail_syncs: Cell<bool>,
    /// The log's file, opened with the database, for syncing it.
    wal_file: fs::File,
    /// Tests: folds fail, as on a full disk.
    #[cfg(test)]
    pub fail_folds: Cell<bool>,
}

/// Which mirror run a [`FileDb::apply`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// Run before its tick for a durable receipt that waits.
    Durable,
    /// Run before its tick for a growing journal (a flood).
    Early,
    /// On the mirror's timer.
    Tick,
    /// The last one, before the file is closed at a graceful stop.
    Final,
}

/// What one [`FileDb::apply`] did.
pub struct Applied {
    /// Whether anything was written: changes, or a step of giving space back.
    pub wrote: bool,
    /// Rows added (negative: removed).
    pub row_delta: i64,
    /// Every change committed to the file so far is synced.
    pub synced: bool,
    /// The sync this run needed failed (its changes are committed, unsynced): the next run
    /// that needs a sync tries again.
    pub sync_error: Option<io::Error>,
    /// Bytes this thread wrote to files meanwhile (log, checkpoint), if the system says.
    pub written: Option<u64>,
}

impl FileDb {
    /// Opens the phpmq database at `path` (already checked) for incremental mirrors.
    pub fn open(path: &Path) -> rusqlite::Result<FileDb> {
        let mut conn = Connection::open(path)?;
        conn.set_prepared_statement_cache_capacity(batch::STATEMENT_CACHE);
        // NORMAL: in WAL mode, a commit is not synced, but the log is synced before a fold and
        // the file after, so a crash never corrupts the file; `apply` syncs the log itself on
        // the runs whose commits must be on disk.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA journal_size_limit = {WAL_KEEP_BYTES};"
        ))?;
        let wal_frames = Arc::new(AtomicI64::new(0));
        let frames = wal_frames.clone();
        // Set after `wal_autocheckpoint`, which replaces any hook.
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: c_int| {
            frames.store(pages.into(), Ordering::Relaxed);
            Ok(())
        }))?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        let identity = identity(path).map_err(|e| io_failure(path, e))?;
        let current_schema = schema::version(&conn)? == schema::SCHEMA_VERSION;
        let wal_path = super::copy::beside(path, "-wal");
        // Opened now, before any commit (SQLite's reads above created the log's file): Linux
        // reports a failed writeback once to each descriptor open when it happened. One
        // opened later, after SQLite's own sync before a fold had seen the error, would sync
        // "successfully" over pages already marked clean and release durable receipts.
        let wal_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|e| io_failure(&wal_path, e))?;
        // The log's name, new or not, is on disk before anything synced through it counts:
        // SQLite syncs the directory only on its own first sync, which under NORMAL waits for
        // the first fold.
        super::copy::sync_dir(&wal_path).map_err(|e| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some(e.to_string()),
            )
        })?;
        Ok(FileDb {
            conn,
            path: path.to_owned(),
            wal_path,
            identity,
            last_written: Cell::new(written(path)),
            page_size,
            incremental_vacuum: auto_vacuum == 2,
            current_schema,
            // Unknown until the first commit reports it (a log that a crash left holds frames).
            wal_frames,
            wrote_since_tick: Cell::new(false),
            fold_failing: Cell::new(false),
            fold_failures: Cell::new(0),
            room_refused: Cell::new(false),
            unsynced: Cell::new(false),
            sync_failed: Cell::new(false),
            #[cfg(test)]
            fail_syncs: Cell::new(false),
            wal_file,
            #[cfg(test)]
            fail_folds: Cell::new(false),
        })
    }

    /// The log's file.
    pub fn log_path(&self) -> &Path {
        &self.wal_path
    }

    /// Syncs the log's file (data only: what SQLite wrote into it since the last sync).
    fn sync_log(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_syncs.get() {
            return Err(io::Error::other("sync failed (test)"));
        }
        self.wal_file.sync_data()
    }

    /// Tests: the file the log's descriptor refers to (device, inode).
    #[cfg(test)]
    pub fn synced_log_identity(&self) -> (u64, u64) {
        let meta = self.wal_file.metadata().unwrap();
        (meta.dev(), meta.ino())
    }

    /// Whether the path still names this file as this server left it (not deleted, not
    /// replaced, not written over by another program).
    pub fn is_in_place(&self) -> bool {
        let Ok(meta) = fs::metadata(&self.path) else {
            return false;
        };
        Identity::of(&meta) == self.identity && Some(Written::of(&meta)) == self.last_written.get()
    }

    /// Whether changes can be replayed into this file: it gives freed space back by itself
    /// and has this build's columns. Files of older phpmq builds (before incremental mirrors,
    /// or before v1.2's columns) are written once in full instead.
    pub fn takes_changes(&self) -> bool {
        self.incremental_vacuum && self.current_schema
    }

    /// Applies `ops` in one synced transaction, then folds the log into the file if it grew
    /// large. On a mirror's tick or the final mirror (not a run early for a durable receipt),
    /// when idle, it also gives back a step of free space and folds the log in; on a tick, it
    /// gives an empty log its room (not before a close, which empties the log anyway).
    pub fn apply<'a, I>(&self, ops: I, run: Run) -> rusqlite::Result<Applied>
    where
        I: IntoIterator<Item = &'a StoreOp>,
        I::IntoIter: Clone,
    {
        let ops = ops.into_iter();
        let no_ops = ops.clone().next().is_none();
        let upkeep = matches!(run, Run::Tick | Run::Final);
        // Reading /proc costs a few system calls: a run for a durable receipt counts what it
        // added to the log instead.
        let wal_before = self.wal_bytes();
        let before = if upkeep {
            crate::system::written_by_this_thread()
        } else {
            None
        };
        // Idle: nothing to write on this tick, nor since the last one. Under durable receipts
        // the early runs take every change and leave the tick nothing, but folding the log
        // or giving space back then would hold up the receipts that come meanwhile.
        let idle = if upkeep {
            !self.wrote_since_tick.replace(false) && no_ops
        } else {
            if !no_ops {
                self.wrote_since_tick.set(true);
            }
            false
        };
        // Space is given back on a mirror with nothing else to do: during a drain, moving
        // pages would only add to what the drain writes.
        let (row_delta, shrunk) = if no_ops {
            (0, idle && self.shrink_step()?)
        } else {
            (batch::apply(&self.conn, ops)?, false)
        };
        // The log is folded in once it is large, and whenever the mirror has nothing else to
        // do: only then does space given back leave the file (in WAL mode the file shrinks at
        // a checkpoint). Not on a run for a durable receipt: a stream of those would fold
        // (and sync the file twice more) after every one.
        let wal = self.wal_bytes();
        // Folded under load, the log's file stays large for the load to go on writing over
        // it; folded when idle, a file grown past the room a new log gets is emptied (and
        // given that room again below).
        // A tick retrying a failed fold retries it at the durable runs' size.
        let fold_at = if run == Run::Durable || self.fold_failing.get() {
            DURABLE_CHECKPOINT_BYTES
        } else {
            CHECKPOINT_BYTES
        };
        let fold = if self.fold_failing.get() && !upkeep {
            None
        } else if wal > fold_at {
            Some(self.fold(WAL_KEEP_BYTES))
        } else if idle && (wal > 0 || self.wal_file_len() > WAL_PRESIZE_BYTES) {
            // Also a log folded under load and written no more since: its file is cut back.
            Some(self.checkpoint())
        } else {
            None
        };
        if let Some(result) = &fold {
            self.fold_failing.set(result.is_err());
        }
        let folded = match fold {
            Some(Ok(())) => {
                let failed = self.fold_failures.replace(0);
                if failed > 0 {
                    info!(
                        "folding the log of {} into it works again, after {failed} failure(s)",
                        self.path.display()
                    );
                }
                true
            }
            None => false,
            // The changes above are committed and synced, whatever the fold does: failing the
            // run would have the mirror keep them and replay rows the file already has, on
            // every run after. The log grows instead, and the next run folds it if it can.
            // Said at the first failure and every 60th, as failed mirrors are: a full disk
            // can last for days.
            Some(Err(e)) => {
                let failures = self.fold_failures.get() + 1;
                self.fold_failures.set(failures);
                if failures == 1 || failures.is_multiple_of(60) {
                    warn!(
                        "folding the log of {} into it failed ({failures} in a row): {e}; its \
                         changes are kept in the log",
                        self.path.display()
                    );
                }
                false
            }
        };
        // Room for the log is made when there is nothing else to do, never on the way of a
        // durable receipt (writing it takes tens of milliseconds).
        let made_room = idle && run == Run::Tick && self.make_wal_room();
        let written = match before {
            Some(before) => {
                crate::system::written_by_this_thread().map(|after| after.saturating_sub(before))
            }
            // Not folded (only upkeep folds small logs): what the log grew by.
            None if !folded => Some(wal.saturating_sub(wal_before).max(0) as u64),
            None => None,
        };
        if !no_ops {
            self.unsynced.set(true);
        }
        // Only what a receipt or the loss window needs is synced: a run early for leftover
        // changes (acknowledgements, mostly) or a flood is synced by the next one that is.
        let mut sync_error = None;
        if run != Run::Early && self.unsynced.get() && !self.sync_failed.get() {
            match self.sync_log() {
                Ok(()) => self.unsynced.set(false),
                Err(e) => {
                    self.sync_failed.set(true);
                    sync_error = Some(e);
                }
            }
        }
        Ok(Applied {
            wrote: !no_ops || shrunk || folded || made_room,
            row_delta,
            synced: !self.unsynced.get(),
            sync_error,
            written,
        })
    }

    /// Free pages beyond the threshold: give a bounded step of them back. Returns whether it
    /// did.
    fn shrink_step(&self) -> rusqlite::Result<bool> {
        if !self.incremental_vacuum {
            return Ok(false);
        }
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        if free * self.page_size < SHRINK_FREE_BYTES {
            return Ok(false);
        }
        let pages = free.min(SHRINK_STEP_BYTES / self.page_size);
        // A pragma that returns a row per page freed: step through them all.
        let mut statement = self
            .conn
            .prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
        let mut rows = statement.query([])?;
        while rows.next()?.is_some() {}
        Ok(true)
    }

    /// What the write-ahead log holds since it was last folded in (its file may be larger).
    fn wal_bytes(&self) -> i64 {
        match self.wal_frames.load(Ordering::Relaxed) {
            0 => 0,
            frames => WAL_HEADER + frames * (self.page_size + WAL_FRAME_HEADER),
        }
    }

    /// Folds the whole log into the file; the next commit writes the log over from its start.
    /// A log's file larger than the room a new log gets is emptied.
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.fold(WAL_PRESIZE_BYTES)
    }

    /// Folds the whole log into the file; the next commit writes the log over from its start.
    /// A log's file grown past `keep` bytes (one large transaction can do that) is emptied, to
    /// be given its room again when the mirror is idle: disk space follows the load.
    fn fold(&self, keep: i64) -> rusqlite::Result<()> {
        #[cfg(test)]
        if self.fail_folds.get() {
            return Err(io_failure(
                &self.path,
                io::Error::other("fold failed (test)"),
            ));
        }
        self.run_checkpoint("RESTART")?;
        if self.wal_file_len() > keep {
            // Nothing left to fold: this only empties the file.
            self.run_checkpoint("TRUNCATE")?;
        }
        Ok(())
    }

    /// Gives an empty log's file [`WAL_PRESIZE_BYTES`] of room, zeros synced, if it has less.
    /// Returns whether it wrote. SQLite reads a log only up to its last valid frame (each
    /// frame carries the log header's salts and a running checksum), so zeros past it are as
    /// inert as the stale frames SQLite itself leaves when it writes a log over after a fold.
    /// A log that holds anything is not touched. The room only makes syncs cheaper: failing
    /// to make it (a full disk) fails no mirror, and it is tried again on the next idle tick.
    fn make_wal_room(&self) -> bool {
        if self.wal_bytes() > 0 || self.wal_file_len() >= WAL_PRESIZE_BYTES {
            return false;
        }
        match extend_with_zeros(&self.wal_path, WAL_PRESIZE_BYTES as u64) {
            Ok(()) => true,
            Err(e)
                if e.kind() == io::ErrorKind::StorageFull && !self.room_refused.replace(true) =>
            {
                warn!(
                    "no room made for {} ({e}): syncs cost more until the disk has space",
                    self.wal_path.display()
                );
                false
            }
            Err(e) => {
                debug!("no room made for {}: {e}", self.wal_path.display());
                false
            }
        }
    }

    /// As the server starts: a log's file that is not there yet (a graceful stop removes it,
    /// a new file has none) gets its room at once, instead of on the first idle tick, which a
    /// server put under load as it starts would not see for a long time. A log that a crash
    /// left is not touched here: what it holds is unknown until a commit reports it.
    pub fn make_room_at_start(&self) -> bool {
        self.wal_file_len() == 0 && self.make_wal_room()
    }

    /// The size of the log's file, whatever it holds.
    fn wal_file_len(&self) -> i64 {
        fs::metadata(&self.wal_path).map_or(0, |m| m.len() as i64)
    }

    /// Runs SQLite's checkpoint in `mode`: the log's content is in the file after it.
    /// A checkpoint another reader holds back (an operator's `sqlite3` on the file, a backup
    /// being taken) reports it in its result row, not as an error: it is one here, since the
    /// log was then not folded in.
    fn run_checkpoint(&self, mode: &str) -> rusqlite::Result<()> {
        let result = self.checkpoint_in(mode);
        // Whatever its outcome, the fold may have written the file.
        self.last_written.set(written(&self.path));
        result
    }

    fn checkpoint_in(&self, mode: &str) -> rusqlite::Result<()> {
        let mut statement = self
            .conn
            .prepare(&format!("PRAGMA wal_checkpoint({mode})"))?;
        let mut rows = statement.query([])?;
        let mut blocked = false;
        while let Some(row) = rows.next()? {
            blocked |= row.get::<_, i64>(0)? != 0;
        }
        if blocked {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some(format!(
                    "folding the log of {} was held back by another reader",
                    self.path.display()
                )),
            ));
        }
        self.wal_frames.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// The file's size in bytes, with its write-ahead log.
    pub fn size(&self) -> u64 {
        fs::metadata(&self.path).map_or(0, |m| m.len()) + self.wal_bytes() as u64
    }

    /// What the file holds (`rows` messages), to weigh replaying changes against a full copy.
    pub fn weight(&self, rows: i64) -> FileWeight {
        FileWeight {
            bytes: fs::metadata(&self.path).map_or(0, |m| m.len()),
            rows,
        }
    }

    /// Folds the whole log into the file and empties it: what the log held is in the file
    /// itself after this, and the log may be removed.
    pub fn fold_all(&self) -> rusqlite::Result<()> {
        #[cfg(test)]
        if self.fail_folds.get() {
            return Err(io_failure(
                &self.path,
                io::Error::other("fold failed (test)"),
            ));
        }
        self.run_checkpoint("TRUNCATE")
    }

    /// Closes the file for good: the log is folded in first, so what is left is one plain
    /// SQLite file.
    pub fn close(self) -> rusqlite::Result<()> {
        self.fold_all()?;
        // Back to a rollback journal: the file then opens like any SQLite database, with no
        // -wal or -shm beside it.
        self.conn.execute_batch("PRAGMA journal_mode = DELETE;")?;
        self.conn.close().map_err(|(_, e)| e)
    }
}

/// Extends the file at `path` (created if missing) with zeros to `len` bytes, synced.
fn extend_with_zeros(path: &Path, len: u64) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    let had = file.metadata()?.len();
    let missing = len.saturating_sub(had);
    if missing == 0 {
        return Ok(());
    }
    // The room only makes syncs cheaper: it must never take the last free space of a disk
    // that other programs (and this server's own log and copies) share.
    let free = free_bytes(path)?;
    if free < missing.saturating_add(ROOM_SPARE_BYTES) {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{free} bytes free, and the log's room is given only with {ROOM_SPARE_BYTES} to spare"),
        ));
    }
    let zeroed = write_zeros(&mut file, missing).and_then(|()| file.sync_all());
    if zeroed.is_err() {
        // Half a room is worth nothing; the space is.
        let _ = file.set_len(had);
    }
    zeroed
}

/// Free space left for a log's room beside what it takes.
const ROOM_SPARE_BYTES: u64 = 256 << 20;

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    let stats = rustix::fs::statvfs(path)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

fn write_zeros(file: &mut fs::File, mut missing: u64) -> io::Result<()> {
    use std::io::Write;
    // A page's worth at a time, as SQLite writes its log: one large write leaves the file in
    // large page-cache folios (up to 4 MiB here), and each small commit over one of them then
    // dirties, and is charged for, the whole folio.
    let zeros = [0u8; ZERO_CHUNK];
    while missing > 0 {
        let step = missing.min(ZERO_CHUNK as u64) as usize;
        file.write_all(&zeros[..step])?;
        missing -= step as u64;
    }
    Ok(())
}

/// What [`extend_with_zeros`] writes at a time: the page size of the files phpmq makes.
const ZERO_CHUNK: usize = 16 << 10;

fn io_failure(path: &Path, e: io::Error) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
        Some(format!("{}: {e}", path.display())),
    )
}
