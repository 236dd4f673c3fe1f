//! Persistence as a whole: the writer and mirror threads against a real file.

use super::batch::test_ops::insert;
use super::*;
use crate::store::Store;

/// Inserts of 1 MiB each, for `seqs`.
fn big(seqs: std::ops::Range<u64>) -> Vec<crate::store::StoreOp> {
    seqs.map(|seq| match insert(seq) {
        crate::store::StoreOp::Insert(mut m) => {
            m.content = Arc::from(vec![7u8; 1 << 20]);
            crate::store::StoreOp::Insert(m)
        }
        op => op,
    })
    .collect()
}

/// Starts the threads, with nothing to do for fetched content and a panic for a failure.
fn start_quietly(persistence: &mut Persistence) {
    persistence
        .start(
            Arc::new(|_| {}),
            Arc::new(|e| panic!("storage failed: {e}")),
        )
        .unwrap();
}

fn rows_in(path: &Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap()
}

/// A durable receipt does not wait for the mirror's tick (an hour here): wanting a ticket
/// syncs the file at once, for a new file (a full copy) and then for the changes alone.
#[test]
fn a_wanted_ticket_is_synced_at_once_not_on_the_tick() {
    let dir = std::env::temp_dir().join(format!("phpmq-durable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("phpmq.sqlite");
    let mut persistence = Persistence::open(&path, Duration::from_secs(3600)).unwrap();
    persistence.recover(&mut |_| {}).unwrap();
    let durability = Storage::durability(&persistence).expect("the file backend is durable");
    let (synced, heard) = unbounded();
    durability.set_on_synced(Arc::new(move |ticket| {
        let _ = synced.send(ticket);
    }));
    start_quietly(&mut persistence);
    let mut store = persistence.store();
    let wait_for = |ticket: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while durability.synced() < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                heard.recv_timeout(left).is_ok(),
                "ticket {ticket} not synced"
            );
        }
    };

    for seq in 1..=3 {
        store.apply(insert(seq));
    }
    assert_eq!(store.submitted(), 3);
    durability.want(3);
    wait_for(3);
    assert_eq!(rows_in(&path), 3, "a new file: written in full");

    for seq in 4..=10 {
        store.apply(insert(seq));
    }
    durability.want(store.submitted());
    wait_for(10);
    assert_eq!(rows_in(&path), 10, "then the changes alone");

    // A burst far larger than the file: copying the store beats replaying it, so the file in
    // place is closed (its log folded in) and written again in full.
    for op in big(11..31) {
        store.apply(op);
    }
    durability.want(store.submitted());
    wait_for(30);
    assert_eq!(rows_in(&path), 30);
    // Recorded once the run is over, just after the receipts were let go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while persistence.last_mirror().map(|m| m.full) != Some(true) {
        assert!(Instant::now() < deadline, "written in full");
        std::thread::sleep(Duration::from_millis(5));
    }

    persistence.finish().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file's log is given room (zeros) when the mirror is idle and written over from its
/// start after each fold. A crash at any point (the files copied as they are, mid-run) still
/// recovers exactly what was committed: SQLite stops at the first frame that is not valid,
/// zeros and stale frames alike.
#[test]
fn a_log_written_over_zeros_and_stale_frames_recovers_what_was_committed() {
    let (dir, path) = new_phpmq_file("phpmq-wal");
    let wal = dir.join("phpmq.sqlite-wal");
    let crash_copy = |name: &str| -> PathBuf {
        let copy = dir.join(name);
        std::fs::copy(&path, &copy).unwrap();
        std::fs::copy(&wal, dir.join(format!("{name}-wal"))).unwrap();
        copy
    };

    let file = file::FileDb::open(&path).unwrap();
    // An idle mirror (on its tick, nothing written since the last one) gives the empty log
    // room; not while runs for durable receipts write between ticks.
    file.apply(&[insert(1000)], file::Run::Early).unwrap();
    file.apply(&[batch::test_ops::delete(1000)], file::Run::Early)
        .unwrap();
    assert!(
        !file.apply(&[], file::Run::Tick).unwrap().wrote,
        "not idle: runs wrote"
    );
    assert!(file.apply(&[], file::Run::Tick).unwrap().wrote);
    let presized = std::fs::metadata(&wal).unwrap().len();
    assert!(
        presized >= 16 << 20,
        "an empty log gets room: {presized} bytes"
    );
    assert!(!file.apply(&[], file::Run::Tick).unwrap().wrote, "once");
    let ops: Vec<_> = (1..=300).map(insert).collect();
    file.apply(&ops, file::Run::Early).unwrap();
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        presized,
        "written over the zeros, not appended"
    );
    assert_eq!(rows_in(&crash_copy("first.sqlite")), 300);

    // Folded in, then written over from the start: frames of the first run lie beyond.
    file.checkpoint().unwrap();
    file.apply(&[batch::test_ops::delete(1)], file::Run::Early)
        .unwrap();
    assert_eq!(rows_in(&crash_copy("second.sqlite")), 299);

    // A load that outgrows the fold's threshold leaves a large file behind: folded, written
    // no more, it is cut back to the room on the next idle tick.
    file.apply(&big(1000..1020), file::Run::Durable).unwrap();
    let grown = std::fs::metadata(&wal).unwrap().len();
    assert!(
        grown > presized,
        "the load grew the log's file past its room: {grown} bytes"
    );
    file.apply(&[], file::Run::Tick).unwrap(); // not idle: a run wrote since the last tick
    file.apply(&[], file::Run::Tick).unwrap();
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), presized, "cut back");
    assert_eq!(rows_in(&crash_copy("third.sqlite")), 319);

    file.close().unwrap();
    assert!(!wal.exists(), "a graceful close leaves one plain file");
    assert_eq!(rows_in(&path), 319);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that starts on a file with no log gives it its room at once: a server under load
/// from its first second would see no idle tick for long. A log a crash left is not touched.
#[test]
fn a_log_gets_its_room_when_the_server_starts() {
    let (dir, path) = new_phpmq_file("phpmq-wal-start");
    let wal = dir.join("phpmq.sqlite-wal");
    let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let file = file::FileDb::open(&path).unwrap();
    assert!(file.make_room_at_start());
    let presized = wal_len();
    assert!(presized >= 16 << 20, "room: {presized} bytes");
    assert!(!file.make_room_at_start(), "once");
    let ops: Vec<_> = (1..=100).map(insert).collect();
    file.apply(&ops, file::Run::Early).unwrap();
    assert_eq!(wal_len(), presized, "written over the zeros, not appended");
    file.close().unwrap();

    // A log with frames in it, as a crash leaves one, is left as it is.
    let file = file::FileDb::open(&path).unwrap();
    file.apply(&[insert(101)], file::Run::Early).unwrap();
    let crashed = dir.join("crashed.sqlite");
    std::fs::copy(&path, &crashed).unwrap();
    std::fs::copy(&wal, dir.join("crashed.sqlite-wal")).unwrap();
    let left = std::fs::metadata(dir.join("crashed.sqlite-wal"))
        .unwrap()
        .len();
    assert!(left > 0 && left < 16 << 20, "a short log: {left} bytes");
    let reopened = file::FileDb::open(&crashed).unwrap();
    assert!(!reopened.make_room_at_start());
    assert_eq!(
        std::fs::metadata(dir.join("crashed.sqlite-wal"))
            .unwrap()
            .len(),
        left
    );
    assert_eq!(rows_in(&crashed), 101);
    drop(reopened);
    drop(file);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The descriptor the mirror syncs the log through is opened with the file, before any
/// commit, and names the log SQLite writes, through folds that empty it. (Opened lazily, after
/// SQLite's own sync had seen a failed writeback, it would report success: Linux reports such
/// an error once to each descriptor open when it happened.)
#[test]
fn the_log_synced_is_the_log_written_from_the_first_commit() {
    use std::os::unix::fs::MetadataExt;
    let (dir, path) = new_phpmq_file("phpmq-wal-fd");
    let wal = dir.join("phpmq.sqlite-wal");
    let on_disk = || {
        let meta = std::fs::metadata(&wal).unwrap();
        (meta.dev(), meta.ino())
    };
    let file = file::FileDb::open(&path).unwrap();
    assert_eq!(
        file.synced_log_identity(),
        on_disk(),
        "open before any commit"
    );
    file.apply(&[insert(1)], file::Run::Durable).unwrap();
    assert_eq!(file.synced_log_identity(), on_disk());
    file.checkpoint().unwrap();
    file.apply(&[insert(2)], file::Run::Durable).unwrap();
    assert_eq!(file.synced_log_identity(), on_disk(), "after a fold");
    file.close().unwrap();
    assert_eq!(rows_in(&path), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bulk mirror's log (on a tick, or early for a flood) is folded only past 64 MiB: folding
/// it at once would copy it all again while the server works. Under durable receipts, past
/// the log's 16 MiB room.
#[test]
fn a_bulk_mirror_folds_later_than_a_run_for_durable_receipts() {
    let (dir, path) = new_phpmq_file("phpmq-wal-fold");
    let file = file::FileDb::open(&path).unwrap();
    let file_len = || std::fs::metadata(&path).unwrap().len();
    let before = file_len();
    file.apply(&big(1..21), file::Run::Tick).unwrap();
    assert_eq!(file_len(), before, "20 MiB stay in the log after a tick");
    file.apply(&big(21..22), file::Run::Early).unwrap();
    assert_eq!(file_len(), before, "and after a run early for a flood");
    file.apply(&big(22..23), file::Run::Durable).unwrap();
    assert!(
        file_len() > before + (20 << 20),
        "a run for a durable receipt folds them in: {} bytes",
        file_len()
    );
    assert_eq!(rows_in(&path), 22);
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fold that fails after the changes were committed (a full disk: folding grows the file)
/// fails no run: the changes are in the log, synced, and must not be replayed.
#[test]
fn a_failed_fold_after_a_commit_fails_no_mirror() {
    let (dir, path) = new_phpmq_file("phpmq-wal-fold-fails");
    let file = file::FileDb::open(&path).unwrap();
    file.fail_folds.set(true);
    // Past the 16 MiB at which a run for a durable receipt folds the log.
    let applied = file.apply(&big(1..18), file::Run::Durable);
    assert!(
        applied.is_ok(),
        "committed, so not failed: {:?}",
        applied.err()
    );
    file.apply(&big(18..19), file::Run::Durable)
        .expect("the next run commits too");
    assert_eq!(rows_in(&path), 18);
    let before = std::fs::metadata(&path).unwrap().len();
    file.fail_folds.set(false);
    file.apply(&big(19..20), file::Run::Durable).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        before,
        "after a failure, runs for durable receipts do not try again..."
    );
    file.apply(&[], file::Run::Tick).unwrap();
    assert!(
        std::fs::metadata(&path).unwrap().len() > before + (16 << 20),
        "...the tick does, and folds the log in"
    );
    assert_eq!(rows_in(&path), 19);
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run early for a flood or leftovers commits without a sync, and says so; the next run that
/// needs one (a durable receipt, a tick, the stop) syncs it, even with nothing of its own to
/// write: a receipt must not be released on the strength of an unsynced commit.
#[test]
fn an_early_run_is_synced_by_the_next_run_that_needs_a_sync() {
    let (dir, path) = new_phpmq_file("phpmq-early-unsynced");
    let file = file::FileDb::open(&path).unwrap();
    let early = file.apply(&[insert(1)], file::Run::Early).unwrap();
    assert!(early.wrote && !early.synced, "committed, not synced");
    let nothing = file.apply(&[], file::Run::Early).unwrap();
    assert!(!nothing.synced, "still not synced");
    let durable = file.apply(&[], file::Run::Durable).unwrap();
    assert!(durable.synced, "a run for a receipt syncs what came before");
    let tick = file.apply(&[insert(2)], file::Run::Tick).unwrap();
    assert!(tick.synced);
    assert_eq!(rows_in(&path), 2);
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failed sync of the log is never followed by a run that reports the file synced: Linux
/// reports a failed writeback once, so a later sync can succeed with the data lost.
#[test]
fn a_failed_sync_is_never_taken_back() {
    let (dir, path) = new_phpmq_file("phpmq-sync-fails");
    let file = file::FileDb::open(&path).unwrap();
    file.apply(&[insert(1)], file::Run::Early).unwrap();
    file.fail_syncs.set(true);
    let failed = file.apply(&[], file::Run::Durable).unwrap();
    assert!(failed.sync_error.is_some() && !failed.synced);
    file.fail_syncs.set(false);
    let later = file.apply(&[insert(2)], file::Run::Durable).unwrap();
    assert!(!later.synced, "this file is not trusted again");
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The final mirror, idle or not, writes no room for a log that its close empties anyway.
#[test]
fn the_final_mirror_makes_no_room_for_the_log() {
    let (dir, path) = new_phpmq_file("phpmq-wal-final");
    let file = file::FileDb::open(&path).unwrap();
    file.apply(&[], file::Run::Final).unwrap();
    let wal = std::fs::metadata(dir.join("phpmq.sqlite-wal")).map_or(0, |m| m.len());
    assert!(wal < 1 << 20, "no room written before a close: {wal} bytes");
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory named after `name` and this process, holding an empty phpmq database
/// made as the store makes them (16 KiB pages, incremental vacuum): the directory and the file.
fn new_phpmq_file(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("phpmq.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA page_size = {}; PRAGMA auto_vacuum = INCREMENTAL;",
        copy::PAGE_SIZE
    ))
    .unwrap();
    schema::create(&conn).unwrap();
    (dir, path)
}

/// [`new_phpmq_file`], open for mirrors, with the synced commits of inserts `seqs` in its log.
fn file_with_commits_in_its_log(
    name: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> (PathBuf, PathBuf, file::FileDb) {
    let (dir, path) = new_phpmq_file(name);
    let file = file::FileDb::open(&path).unwrap();
    let ops: Vec<_> = seqs.map(insert).collect();
    file.apply(&ops, file::Run::Durable).unwrap();
    (dir, path, file)
}

/// The final mirror at a stop, whose changes commit but whose sync fails: the file's log is
/// not to be trusted, so the file is written in full from memory instead (here, memory holds
/// nothing, the changes handed to the file three rows).
#[test]
fn a_final_mirror_whose_sync_fails_writes_the_file_in_full() {
    let (dir, path) = new_phpmq_file("phpmq-final-sync");
    let mut persistence = Persistence::open(&path, Duration::from_secs(3600)).unwrap();
    persistence.recover(&mut |_| {}).unwrap();
    let file = file::FileDb::open(&path).unwrap();
    file.fail_syncs.set(true);
    let state = mirror::MirrorState {
        file: Some(file),
        rows: 0,
        in_hand: (1..=3).map(insert).collect(),
    };
    let report = persistence
        .final_mirror(state)
        .unwrap()
        .expect("a mirror was written");
    assert!(report.full, "written in full");
    assert_eq!(
        rows_in(&path),
        0,
        "what memory holds, not the unsynced changes"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full copy replaces the file and its log. A log that cannot be folded in (a failing disk)
/// does not hold the copy back: it is set aside until the copy is in place (tests of
/// `interrupted_copy` below), so the run goes straight to the copy.
#[test]
fn a_log_that_cannot_be_folded_in_does_not_hold_back_a_full_copy() {
    let (dir, path) = new_phpmq_file("phpmq-fold-before-copy");
    let mut persistence = Persistence::open(&path, Duration::from_secs(3600)).unwrap();
    persistence.recover(&mut |_| {}).unwrap();
    // A writer already gone: the full copy asked for does not start, and the run says so.
    let (writer, writer_gone) = unbounded();
    drop(writer_gone);
    let mirror = mirror::Mirror::new(
        persistence.shared.clone(),
        writer,
        path.clone(),
        persistence.health.clone(),
    );
    let file = file::FileDb::open(&path).unwrap();
    file.apply(&[insert(1)], file::Run::Durable).unwrap();
    file.fail_folds.set(true);
    // The journal asks for a full copy (it has no file to weigh replays against).
    persistence.shared.journal.record(vec![insert(2)], 2);
    let mut state = mirror::MirrorState {
        file: Some(file),
        rows: 1,
        in_hand: Default::default(),
    };
    let (_stop, stopped) = unbounded();
    assert!(matches!(
        mirror.once(&mut state, &stopped, false),
        Ok(mirror::Outcome::Stopped)
    ));
    assert!(state.file.is_none(), "closed for the copy at the first run");
    assert_eq!(rows_in(&path), 1, "the old file keeps its synced commit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fold that another reader holds back (an operator's `sqlite3` reading the file) reports
/// itself as failed: SQLite says so in the checkpoint's result, not with an error.
#[test]
fn a_fold_held_back_by_a_reader_fails() {
    let (dir, path) = new_phpmq_file("phpmq-fold-busy");
    let file = file::FileDb::open(&path).unwrap();
    file.apply(&[insert(1)], file::Run::Durable).unwrap();
    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.busy_timeout(Duration::from_millis(10)).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the reader's snapshot holds the log");
    file.apply(&[insert(2)], file::Run::Durable).unwrap();
    assert!(file.fold_all().is_err(), "held back");
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    file.fold_all().unwrap();
    file.close().unwrap();
    assert_eq!(rows_in(&path), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The files a full copy of `path` (open, with commits in its log) leaves under the name
/// `name` when it stops after setting the file's log aside and before its rename: the file,
/// its log aside, and the complete copy at its temporary name. Returns the file's path.
fn interrupted_copy(dir: &Path, path: &Path, name: &str) -> PathBuf {
    let target = dir.join(name);
    std::fs::copy(path, &target).unwrap();
    let log = std::fs::read(copy::beside(path, "-wal")).unwrap();
    assert!(!log.is_empty());
    std::fs::write(copy::beside(&target, "-wal.replaced"), &log).unwrap();
    std::fs::copy(path, copy::temp_path(&target)).unwrap();
    target
}

/// A crash after a full copy set the file's log aside and before the copy took the file's
/// place: the next start puts the log back, so the synced commits it held are not lost.
#[test]
fn a_log_set_aside_for_a_copy_that_never_took_its_place_goes_back() {
    let (dir, path, file) = file_with_commits_in_its_log("phpmq-aside-back", 1..=2);
    let crashed = interrupted_copy(&dir, &path, "crashed.sqlite");
    assert_eq!(
        rows_in(&crashed),
        0,
        "the file alone lacks the log's commits"
    );
    let _ = std::fs::remove_file(dir.join("crashed.sqlite-shm"));

    copy::finish_replacing(&crashed).unwrap();
    assert_eq!(rows_in(&crashed), 2, "the log's commits are back");
    assert!(!dir.join("crashed.sqlite-wal.replaced").exists());
    assert!(!copy::temp_path(&crashed).exists());
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A crash after the copy took the file's place: the log set aside belonged to the file the
/// copy replaced, and replaying it into the copy would corrupt it. The start drops it.
#[test]
fn a_log_set_aside_for_a_copy_in_place_is_dropped() {
    let (dir, path, file) = file_with_commits_in_its_log("phpmq-aside-drop", 1..=2);
    let stale_log = std::fs::read(dir.join("phpmq.sqlite-wal")).unwrap();
    file.apply(&[insert(3)], file::Run::Durable).unwrap();
    file.fold_all().unwrap();
    file.close().unwrap();
    // The copy in place (three rows) and the older file's log, with no temporary copy left.
    std::fs::write(dir.join("phpmq.sqlite-wal.replaced"), &stale_log).unwrap();

    copy::finish_replacing(&path).unwrap();
    assert!(!dir.join("phpmq.sqlite-wal.replaced").exists());
    assert!(!dir.join("phpmq.sqlite-wal").exists());
    assert_eq!(rows_in(&path), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full copy sets the file's log aside while it takes the file's place and removes it once
/// it has; a log left aside by an earlier copy is removed before the next copy is written.
#[test]
fn a_full_copy_leaves_no_log_aside() {
    let (dir, path, file) = file_with_commits_in_its_log("phpmq-aside-copy", 1..=1);
    let aside = dir.join("phpmq.sqlite-wal.replaced");
    std::fs::write(&aside, b"left by an earlier copy").unwrap();
    let temp = copy::prepare_copy(&path).unwrap();
    assert!(!aside.exists(), "stale: removed before the copy");
    std::fs::copy(&path, &temp).unwrap();
    drop(file);
    copy::put_in_place(&temp, &path).unwrap();
    assert!(!aside.exists());
    assert!(!dir.join("phpmq.sqlite-wal").exists());
    assert!(!temp.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy whose rename failed leaves its complete copy at the temporary name and, if the log
/// could not be put back either, the log aside: the next copy puts the log back first. A log
/// aside is never put back over a log that is not empty: both are kept, and it is an error.
#[test]
fn the_next_copy_puts_back_a_log_a_failed_one_left_aside() {
    let (dir, path, file) = file_with_commits_in_its_log("phpmq-aside-next", 1..=2);
    let left = interrupted_copy(&dir, &path, "left.sqlite");
    let aside = dir.join("left.sqlite-wal.replaced");

    // Another log beside the file: nothing is chosen for the operator.
    let wal = dir.join("left.sqlite-wal");
    std::fs::write(&wal, b"another log").unwrap();
    assert!(copy::prepare_copy(&left).is_err());
    assert!(aside.exists() && wal.exists());

    std::fs::remove_file(&wal).unwrap();
    let temp = copy::prepare_copy(&left).unwrap();
    assert_eq!(temp, copy::temp_path(&left));
    assert!(!aside.exists());
    assert_eq!(rows_in(&left), 2, "the log is back beside its file");
    file.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A start that finds no file but a copy of it at its temporary name (the file was deleted
/// while the server ran, and a crash stopped the copy that wrote it again) keeps the copy
/// under another name for the operator, and starts empty: the copy may be incomplete.
#[test]
fn a_copy_of_a_deleted_file_left_by_a_crash_is_kept() {
    let (dir, path, file) = file_with_commits_in_its_log("phpmq-unplaced", 1..=2);
    file.fold_all().unwrap();
    file.close().unwrap();
    let target = dir.join("deleted.sqlite");
    std::fs::rename(&path, copy::temp_path(&target)).unwrap();

    let mut persistence = Persistence::open(&target, Duration::from_secs(3600)).unwrap();
    assert_eq!(persistence.recover(&mut |_| {}).unwrap(), 0, "starts empty");
    assert!(!copy::temp_path(&target).exists());
    let kept: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("deleted.sqlite.unplaced-"))
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(rows_in(&kept[0]), 2, "the copy, as the crash left it");
    drop(persistence);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mirrors of runs whose changes all cancelled out (messages sent and acknowledged between two
/// mirrors) keep nothing: the chunks such a run was gathered in are not held on to.
#[test]
fn runs_that_cancelled_out_leave_the_mirror_nothing_to_hold() {
    let (dir, path, file) = file_with_commits_in_its_log("phpmq-cancelled-runs", 1..=1);
    let persistence = Persistence::open(&path, Duration::from_secs(3600)).unwrap();
    let (writer, _writer_gone) = unbounded();
    let mirror = mirror::Mirror::new(
        persistence.shared.clone(),
        writer,
        path.clone(),
        persistence.health.clone(),
    );
    let journal = &persistence.shared.journal;
    journal.note_file(Some(file.weight(1)));
    let mut state = mirror::MirrorState {
        file: Some(file),
        rows: 1,
        in_hand: Default::default(),
    };
    let (_stop, stopped) = unbounded();
    for seq in 10..60 {
        journal.record(
            vec![insert(seq), crate::persist::batch::test_ops::delete(seq)],
            seq,
        );
        mirror.once(&mut state, &stopped, false).unwrap();
        journal.replayed();
    }
    assert_eq!(state.in_hand.room(), 0);
    assert_eq!(rows_in(&path), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database path that is a symbolic link is followed once, at open: the file the link
/// points at is the one written (a new file made there, its log and lock beside it), and the
/// link stays a link through full copies.
#[test]
fn a_linked_path_is_followed_and_the_link_kept() {
    let dir = std::env::temp_dir().join(format!("phpmq-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("real")).unwrap();
    let link = dir.join("phpmq.sqlite");
    std::os::unix::fs::symlink("real/data.sqlite", &link).unwrap();
    let mut persistence = Persistence::open(&link, Duration::from_secs(3600)).unwrap();
    persistence.recover(&mut |_| {}).unwrap();
    start_quietly(&mut persistence);
    let mut store = persistence.store();
    for op in big(1..4) {
        store.apply(op);
    }
    persistence.flush();
    persistence.finish().unwrap();
    let real = dir.join("real/data.sqlite");
    assert_eq!(rows_in(&real), 3);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(dir.join("real/data.sqlite.lock").exists());
    assert!(!dir.join("phpmq.sqlite.lock").exists());
    assert!(!dir.join("phpmq.sqlite-wal").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
