//! Copying between the in-memory database and the file, with SQLite's online backup API: full
//! copies put in place atomically, and loading a file into memory at start.
//!
//! A mirror is written to a temporary file beside the target, synced, renamed over the target,
//! and the directory synced: the target is always one complete mirror, and a crash at any
//! point leaves the previous one, with its write-ahead log (set aside while the copy takes its
//! place, and put back at the next start if the copy never did: [`finish_replacing`]).
//! Loading opens the file read-only (unless SQLite must replay a write-ahead log left by a
//! crash), so a file that is refused is never changed.

use super::error::PersistError;
use super::health::MirrorReport;
use super::schema;
use super::shared::Shared;
use crate::store::now_millis;
use log::{info, warn};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The temporary file a mirror is written to before it replaces `target`.
pub fn temp_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    target.with_file_name(name)
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl Fn(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Copies all pages of `from` into `to` in one step.
fn copy_all(from: &Connection, to: &mut Connection) -> rusqlite::Result<()> {
    let backup = Backup::new(from, to)?;
    // Nothing else uses these connections, so one step finishes; a few retries cover a
    // spurious busy without ever spinning forever.
    for _ in 0..100 {
        if backup.step(-1)? == StepResult::Done {
            return Ok(());
        }
    }
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
        Some("backup did not complete".into()),
    ))
}

/// Creates a fresh `temp` (replacing a stale one) to copy a mirror into.
pub fn create_temp(temp: &Path) -> Result<Connection, PersistError> {
    match fs::remove_file(temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_error("remove", temp)(e))
        }
        _ => {}
    }
    let sqlite = |action| {
        move |source| PersistError::Sqlite {
            action,
            path: temp.to_owned(),
            source,
        }
    };
    let file = Connection::open(temp).map_err(sqlite("create"))?;
    // We sync the finished file ourselves; SQLite's journal and syncs would only slow the copy.
    file.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
        .map_err(sqlite("set up"))?;
    Ok(file)
}

/// Where the write-ahead log of a file being replaced by a full copy waits until the copy is in
/// place.
fn set_aside(target: &Path) -> PathBuf {
    beside(target, "-wal.replaced")
}

fn remove_if_there(path: &Path) -> Result<(), PersistError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Before a full copy of `target` is written: a log still set aside by an earlier copy is put
/// back or dropped as at start ([`finish_replacing`]), so that this copy finds (and a crash
/// during it leaves) no log aside but its own. Returns where to write the copy.
pub fn prepare_copy(target: &Path) -> Result<PathBuf, PersistError> {
    finish_replacing(target)?;
    Ok(temp_path(target))
}

/// Finishes a full copy that was interrupted (by a crash, at start; by a failed rename, before
/// the next copy). A log set aside while a complete copy (still at its temporary name) had not
/// taken the file's place yet belongs to the file, and may hold synced commits it lacks: it
/// goes back. Once the copy is in place, the log is stale (the copy holds all it held), and
/// replaying it into the copy would corrupt it: it is removed, and the removal synced.
pub fn finish_replacing(target: &Path) -> Result<(), PersistError> {
    let aside = set_aside(target);
    if !aside.try_exists().map_err(io_error("look at", &aside))? {
        return Ok(());
    }
    let temp = temp_path(target);
    let copy_never_moved = temp.try_exists().map_err(io_error("look at", &temp))?;
    if copy_never_moved && target.exists() {
        let wal = beside(target, "-wal");
        if fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
            // Not ours to choose between two logs: both are kept for the operator.
            return Err(PersistError::Io {
                action: "put back the write-ahead log set aside as",
                path: aside,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} is not empty", wal.display()),
                ),
            });
        }
        fs::rename(&aside, &wal).map_err(io_error("put back", &wal))?;
        sync_dir(target)?;
        remove_if_there(&temp)?;
        info!(
            "put back the write-ahead log of {} that an interrupted full copy had set aside",
            target.display()
        );
    } else {
        remove_if_there(&aside)?;
        sync_dir(target)?;
    }
    Ok(())
}

/// At a start that finds no file at `target` but a copy at its temporary name: a crash
/// stopped a full copy of a file deleted while the server ran. The copy may be complete (the
/// crash came between its sync and its rename) or not, and nothing tells which, so it is
/// neither loaded nor dropped: it moves to `PATH.unplaced-MILLIS` for the operator, and
/// that name is returned.
pub fn keep_unplaced_copy(target: &Path) -> Result<Option<PathBuf>, PersistError> {
    let temp = temp_path(target);
    if !temp.try_exists().map_err(io_error("look at", &temp))? {
        return Ok(None);
    }
    let kept = beside(target, &format!(".unplaced-{}", now_millis()));
    fs::rename(&temp, &kept).map_err(io_error("keep", &kept))?;
    sync_dir(target)?;
    Ok(Some(kept))
}

/// The file SQLite keeps beside the database at `path` with `suffix` (`-wal`, `-shm`,
/// `-journal`).
pub(super) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Makes a complete copy at `temp` the mirror: sync it, rename it over `target`, sync the
/// directory. Returns its size.
pub fn put_in_place(temp: &Path, target: &Path) -> Result<u64, PersistError> {
    let synced = File::open(temp).map_err(io_error("open", temp))?;
    synced.sync_all().map_err(io_error("sync", temp))?;
    let bytes = synced.metadata().map(|m| m.len()).unwrap_or_default();
    drop(synced);
    // A write-ahead log left beside the target belongs to the file being replaced: SQLite
    // would replay it into the new one, so it must leave its name before the copy takes the
    // target's, and that must be on disk first. It is set aside rather than removed: a crash
    // before the copy is in place leaves the old file, and the next start puts its log back
    // (`finish_replacing`). Nobody has the target open now (the mirror closed it).
    let wal = beside(target, "-wal");
    let aside = set_aside(target);
    let moved = match fs::rename(&wal, &aside) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_error("set aside", &wal)(e)),
    };
    let placed = remove_if_there(&beside(target, "-shm"))
        .and_then(|()| sync_dir(target))
        .and_then(|()| fs::rename(temp, target).map_err(io_error("rename into place", target)));
    if let Err(e) = placed {
        // The copy did not take the file's place: the file keeps its log. If it cannot be put
        // back now, the next copy or start does (`finish_replacing`: the copy is still at its
        // temporary name).
        if moved {
            if let Err(back) = fs::rename(&aside, &wal) {
                warn!("{}", io_error("put back", &wal)(back));
            }
        }
        return Err(e);
    }
    sync_dir(target)?;
    // The copy holds all the old log held. Left behind, it is removed before the next copy
    // (`prepare_copy`) or at the next start: the copy is no longer at its temporary name.
    if let Err(e) = remove_if_there(&aside) {
        warn!("{e}");
    }
    Ok(bytes)
}

/// Writes the in-memory database to `target` in one go (at creation and after the writer
/// stopped; while it runs, the writer copies a few pages at a time).
pub fn write(shared: &Shared, target: &Path) -> Result<MirrorReport, PersistError> {
    let started = Instant::now();
    let temp = prepare_copy(target)?;
    let mut file = create_temp(&temp)?;
    let (generation, messages, locked) = {
        let memory = shared.memory.lock().map_err(|_| PersistError::Poisoned)?;
        let locked_at = Instant::now();
        copy_all(&memory, &mut file).map_err(|source| PersistError::Sqlite {
            action: "write",
            path: temp.clone(),
            source,
        })?;
        (
            shared.generation.load(Ordering::Acquire),
            shared.rows.load(Ordering::Relaxed),
            locked_at.elapsed(),
        )
    };
    drop(file);
    let bytes = put_in_place(&temp, target)?;
    Ok(MirrorReport {
        generation,
        messages,
        bytes,
        written: Some(bytes),
        full: true,
        duration: started.elapsed(),
        locked,
        finished_at: now_millis(),
    })
}

/// Makes a rename durable: sync the directory that holds `path`.
pub(super) fn sync_dir(path: &Path) -> Result<(), PersistError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory of", path))
}

/// A fresh in-memory database with the schema.
pub fn new_memory() -> Result<Connection, PersistError> {
    let fail = |source| PersistError::Sqlite {
        action: "create",
        path: ":memory:".into(),
        source,
    };
    let memory = Connection::open_in_memory().map_err(fail)?;
    tune_memory(&memory).map_err(fail)?;
    schema::create(&memory).map_err(fail)?;
    Ok(memory)
}

/// No rollback journal: a batch that fails makes the server stop anyway.
fn tune_memory(memory: &Connection) -> rusqlite::Result<()> {
    // 16 KiB pages: a quarter of the B-tree pages to split, balance and cache per message as
    // at SQLite's default 4 KiB, for the same memory (BENCHMARKS.md). Only a new database
    // takes it: one loaded from a file keeps the file's page size (an in-memory database's
    // cannot change), which works the same, only slower.
    // Incremental vacuum: freed pages can be given back a step at a time (memory and file
    // follow the live messages); it must be chosen before the first table exists, and the
    // files copied from this database inherit it.
    memory.set_prepared_statement_cache_capacity(super::batch::STATEMENT_CACHE);
    memory.execute_batch(&format!(
        "PRAGMA page_size = {PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = OFF;"
    ))
}

/// Whether `conn` can give freed pages back a step at a time.
pub fn shrinks_incrementally(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("PRAGMA auto_vacuum", [], |r| r.get::<_, i64>(0))
        .map(|mode| mode == 2)
}

/// The page size of databases this build creates.
pub const PAGE_SIZE: i64 = 16 << 10;

/// Whether SQLite may have to recover `path` as it opens it: the file is in WAL mode (bytes 18
/// and 19 of its header, the read and write format versions, are 2), or a write-ahead log or a
/// rollback journal lies beside it (a crash in the middle of a mirror, or of switching modes).
fn needs_recovery(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    let wal_mode = File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| header.starts_with(b"SQLite format 3\0") && header[18] == 2);
    wal_mode || beside(path, "-wal").exists() || beside(path, "-journal").exists()
}

/// Opens `path` read-only, checks it is a phpmq database, and copies it into memory.
pub fn load(path: &Path) -> Result<Connection, PersistError> {
    // A file left in WAL mode or with a journal by a server that crashed must be opened with
    // write access, so that SQLite can replay the log (or roll the journal back): read-only,
    // it may read the file through a stale log index, or fail. Any other file is opened
    // read-only and so is never changed, even when it is refused.
    let access = if needs_recovery(path) {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let file = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| schema::classify(path, "open", e))?;
    schema::check(&file, path)?;
    let fail = |source| PersistError::Sqlite {
        action: "load",
        path: path.to_owned(),
        source,
    };
    let mut memory = Connection::open_in_memory().map_err(fail)?;
    copy_all(&file, &mut memory).map_err(|e| schema::classify(path, "load", e))?;
    schema::quick_check(&memory, path)?;
    // The file itself is left as it is: the first mirror writes it in full, in this form.
    schema::upgrade(&memory).map_err(fail)?;
    tune_memory(&memory).map_err(fail)?;
    if !shrinks_incrementally(&memory).map_err(fail)? {
        // A file from before incremental mirrors: rebuild once so that freed pages can be
        // given back (the first mirror then rewrites the file in the same form).
        memory.execute_batch("VACUUM").map_err(fail)?;
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_sits_beside_the_target() {
        assert_eq!(
            temp_path(Path::new("/var/lib/phpmq/phpmq.sqlite")),
            Path::new("/var/lib/phpmq/phpmq.sqlite.tmp")
        );
        assert_eq!(temp_path(Path::new("x.db")), Path::new("x.db.tmp"));
    }

    #[test]
    fn a_new_store_uses_the_larger_pages() {
        let memory = new_memory().unwrap();
        let size: i64 = memory
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(size, PAGE_SIZE);
    }

    /// The files a crash leaves: the database in WAL mode with committed changes still only in
    /// its log (copied while the writing connection is open, as a SIGKILL would leave them).
    #[test]
    fn a_crash_image_is_loaded_with_what_its_log_holds() {
        let dir = std::env::temp_dir().join(format!("phpmq-crash-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("image")).unwrap();
        let live = dir.join("phpmq.sqlite");
        let conn = Connection::open(&live).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL;"
        ))
        .unwrap();
        schema::create(&conn).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;")
            .unwrap();
        for seq in 1..=100i64 {
            conn.execute(
                "INSERT INTO messages (seq, id, queue, content, accepted_at) VALUES (?1, ?2, 'q', x'00', 0)",
                rusqlite::params![seq, &(seq as u128).to_be_bytes()[..]],
            )
            .unwrap();
        }
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("phpmq.sqlite{suffix}");
            fs::copy(dir.join(&name), dir.join("image").join(&name)).unwrap();
        }
        drop(conn);
        let image = dir.join("image").join("phpmq.sqlite");
        assert!(needs_recovery(&image));
        let memory = load(&image).unwrap();
        let rows: i64 = memory
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 100, "the rows only the log had");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A file from before v1.2 (schema version 1, without `due_at` and `deliveries`) loads:
    /// its messages have no delay and no dispatch counted, and the store has the new columns.
    #[test]
    fn a_version_1_file_loads_with_the_new_columns_empty() {
        let dir = std::env::temp_dir().join(format!("phpmq-v1-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("phpmq.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL;
             CREATE TABLE phpmq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO phpmq_meta (key, value) VALUES ('format', 'phpmq');
             CREATE TABLE messages (seq INTEGER PRIMARY KEY, id BLOB NOT NULL,
                 queue TEXT NOT NULL, content BLOB NOT NULL, accepted_at INTEGER NOT NULL,
                 expires_at INTEGER);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO messages VALUES (7, ?1, 'jobs', x'68690a', 1000, 99000)",
            [&7u128.to_be_bytes()[..]],
        )
        .unwrap();
        drop(conn);

        let memory = load(&path).unwrap();
        assert_eq!(schema::version(&memory).unwrap(), schema::SCHEMA_VERSION);
        let mut rows = Vec::new();
        schema::load(&memory, &path, &mut |row| {
            rows.push((
                row.seq,
                row.content.to_vec(),
                row.expires_at,
                row.due_at,
                row.deliveries,
            ))
        })
        .unwrap();
        assert_eq!(rows, vec![(7, b"hi\n".to_vec(), Some(99_000), None, 0)]);
        let file = Connection::open(&path).unwrap();
        assert_eq!(
            schema::version(&file).unwrap(),
            1,
            "loading leaves the file as it was"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
