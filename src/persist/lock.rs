//! One server per database file: a lock held on `PATH.lock` for as long as the server runs.
//!
//! Two servers mirroring to one file overwrite each other's changes, and the messages one of
//! them accepted are lost at the next start; a second start by mistake (an init script and a
//! shell, say) must be refused instead. The lock is an `flock(2)` on a file of its own rather
//! than on the database, because a full copy renames a new file over the database's path and
//! a lock on the old one would no longer guard the path. The kernel drops it when the process
//! ends, however it ends, so a crash never leaves a stale lock. The file stays after the stop:
//! removing it would let a server that opened it just before the removal and one that creates
//! it anew both hold "the" lock.
//!
//! The file also tells the next server how the last one ended: it holds the holder's pid, and
//! a second line, `mirroring`, from the mirror's start until a final mirror completes. Found
//! at the next start, that line means the last run ended without one (killed, crashed, power
//! lost, or its final mirror failed), so the file may lack its last changes: said in the log.

use super::copy::beside;
use super::error::PersistError;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The held lock on a database file; released when dropped or when the process ends.
#[derive(Debug)]
pub struct DbLock {
    file: File,
    path: PathBuf,
    target: PathBuf,
    last_run: LastRun,
}

/// How the server that held the lock before this one ended, as its lock file tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastRun {
    /// No server mirrored to this file before, or it stopped with a completed final mirror.
    Finished,
    /// It started mirroring and never completed a final mirror; its pid if it wrote one.
    Unfinished { pid: Option<u32> },
}

/// The lock file's second line while a server mirrors to the database.
const MIRRORING: &str = "mirroring";

/// The lock file that guards the database at `target`.
pub fn lock_path(target: &Path) -> PathBuf {
    beside(target, ".lock")
}

impl DbLock {
    /// Takes the lock of the database at `target`, or says which server holds it. Never waits:
    /// a server that cannot have its file must not start.
    pub fn acquire(target: &Path) -> Result<DbLock, PersistError> {
        let path = lock_path(target);
        let io_error = |action: &'static str| {
            let path = path.clone();
            move |source| PersistError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("open the lock file"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(PersistError::InUse {
                    path: target.to_owned(),
                    lock: path.clone(),
                    holder: read_holder(&mut file),
                })
            }
            Err(TryLockError::Error(source)) => return Err(io_error("lock")(source)),
        }
        let last_run = read_last_run(&mut file);
        let mut lock = DbLock {
            file,
            path: path.clone(),
            target: target.to_owned(),
            last_run,
        };
        // The holder's pid, for the message a second server prints; the lock is what counts.
        // The last run's mark stays until this server mirrors: a start refused before that
        // (a damaged file, say) changes nothing and must not hide it.
        let mark = match last_run {
            LastRun::Finished => "",
            LastRun::Unfinished { .. } => MIRRORING,
        };
        lock.write(mark).map_err(io_error("write"))?;
        Ok(lock)
    }

    /// How the previous holder ended.
    pub fn last_run(&self) -> LastRun {
        self.last_run
    }

    /// Marks the file as mirrored to until [`DbLock::mark_finished`]; synced, so that a power
    /// loss is told at the next start too.
    pub fn mark_mirroring(&mut self) -> Result<(), PersistError> {
        self.write_synced(MIRRORING)
    }

    /// The final mirror completed: the next start finds nothing amiss.
    pub fn mark_finished(&mut self) -> Result<(), PersistError> {
        self.write_synced("")
    }

    fn write_synced(&mut self, mark: &str) -> Result<(), PersistError> {
        self.write(mark)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| PersistError::Io {
                action: "write",
                path: self.path.clone(),
                source,
            })
    }

    /// The file's whole content: this process's pid, and `mark` on a line of its own. Written
    /// before the file is cut to its length, so that no moment leaves it empty.
    fn write(&mut self, mark: &str) -> std::io::Result<()> {
        let pid = std::process::id();
        let text = if mark.is_empty() {
            format!("{pid}\n")
        } else {
            format!("{pid}\n{mark}\n")
        };
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(text.as_bytes())?;
        self.file.set_len(text.len() as u64)
    }

    /// Makes sure the lock file at the path is still the one locked: a lock file deleted (or
    /// its directory) while the server runs would let a second server start on the same
    /// database. Takes it again if it is gone (true: it was), and fails with
    /// [`PersistError::InUse`] if another server took it meanwhile; the mirror must then not
    /// write that server's file.
    pub fn keep(&mut self) -> Result<bool, PersistError> {
        let ours = self.file.metadata().map_err(|source| PersistError::Io {
            action: "look at",
            path: self.path.clone(),
            source,
        })?;
        if fs::metadata(&self.path).is_ok_and(|found| same_file(&found, &ours)) {
            return Ok(false);
        }
        // Taken again by this run, which is still mirroring.
        *self = DbLock::acquire(&self.target)?;
        self.mark_mirroring()?;
        Ok(true)
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// The pid the holder wrote, if it is there yet and reads as one.
fn read_holder(file: &mut File) -> Option<u32> {
    let text = read_head(file)?;
    text.lines().next()?.trim().parse().ok()
}

/// What the last holder's file says of how it ended (a file that cannot be read says nothing).
fn read_last_run(file: &mut File) -> LastRun {
    let Some(text) = read_head(file) else {
        return LastRun::Finished;
    };
    let mut lines = text.lines();
    let pid = lines.next().and_then(|line| line.trim().parse().ok());
    if lines.any(|line| line.trim() == MIRRORING) {
        LastRun::Unfinished { pid }
    } else {
        LastRun::Finished
    }
}

/// The start of the lock file: a pid and a mark, never more than a few bytes.
fn read_head(file: &mut File) -> Option<String> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    Read::by_ref(file).take(64).read_to_string(&mut text).ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("phpmq-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = temp_dir("second");
        let target = dir.join("q.sqlite");
        let first = DbLock::acquire(&target).unwrap();
        match DbLock::acquire(&target) {
            Err(PersistError::InUse { path, lock, holder }) => {
                assert_eq!(path, target);
                assert_eq!(lock, dir.join("q.sqlite.lock"));
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        let again = DbLock::acquire(&target);
        assert!(again.is_ok(), "{again:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A lock file deleted while the server runs is taken again before a second server can
    /// have it; one another server took meanwhile is reported, not shared.
    #[test]
    fn a_deleted_lock_file_is_taken_again() {
        let dir = temp_dir("deleted");
        let target = dir.join("q.sqlite");
        let mut lock = DbLock::acquire(&target).unwrap();
        assert!(!lock.keep().unwrap(), "in place: nothing to do");
        std::fs::remove_file(lock_path(&target)).unwrap();
        assert!(lock.keep().unwrap(), "taken again");
        assert!(matches!(
            DbLock::acquire(&target),
            Err(PersistError::InUse { .. })
        ));
        std::fs::remove_file(lock_path(&target)).unwrap();
        let other = DbLock::acquire(&target).unwrap();
        assert!(matches!(lock.keep(), Err(PersistError::InUse { .. })));
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The mark a mirroring run leaves is found by the next holder, kept through a start that
    /// never mirrors, and cleared by a finished run.
    #[test]
    fn a_run_that_did_not_finish_is_told_to_the_next_holder() {
        let dir = temp_dir("last-run");
        let target = dir.join("q.sqlite");
        let mut lock = DbLock::acquire(&target).unwrap();
        assert_eq!(lock.last_run(), LastRun::Finished, "a new file");
        lock.mark_mirroring().unwrap();
        drop(lock);
        let unfinished = LastRun::Unfinished {
            pid: Some(std::process::id()),
        };
        let refused_start = DbLock::acquire(&target).unwrap();
        assert_eq!(refused_start.last_run(), unfinished);
        drop(refused_start);
        let mut lock = DbLock::acquire(&target).unwrap();
        assert_eq!(
            lock.last_run(),
            unfinished,
            "kept by a start that never mirrored"
        );
        lock.mark_mirroring().unwrap();
        lock.mark_finished().unwrap();
        drop(lock);
        assert_eq!(
            DbLock::acquire(&target).unwrap().last_run(),
            LastRun::Finished
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_file_left_by_an_ended_server_is_taken_over() {
        let dir = temp_dir("stale");
        let target = dir.join("q.sqlite");
        std::fs::write(lock_path(&target), "999999999\nleftover text").unwrap();
        let lock = DbLock::acquire(&target);
        assert!(lock.is_ok(), "{lock:?}");
        let written = std::fs::read_to_string(lock_path(&target)).unwrap();
        assert_eq!(written, format!("{}\n", std::process::id()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
