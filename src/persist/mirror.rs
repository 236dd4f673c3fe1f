//! The mirror thread: on every tick (and early when the journal grows), brings the file up to
//! date: the changes since the last mirror in one synced transaction, or a full copy where
//! the file needs one (missing, replaced, from an old phpmq, or the journal gave up on the changes). A
//! failing mirror keeps its changes for the next try, within bounds, and is counted in
//! [`MirrorHealth`].

use super::batch::Changes;
use super::copy;
use super::error::PersistError;
use super::file::{FileDb, Run};
use super::health::{self, MirrorHealth, MirrorReport};
use super::shared::{PanicAlarm, Shared};
use super::writer::Command;
use crate::store::now_millis;
use crossbeam_channel::{bounded, select, tick, Receiver, Sender};
use log::{error, warn};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Changes a failing mirror keeps for its next try; past this it forgets them and writes the
/// file in full once it can.
const MAX_IN_HAND: usize = 4 << 20;
/// ...or this many content bytes.
const MAX_IN_HAND_BYTES: usize = 256 << 20;
/// Content bytes of a mirror after which freed memory is handed back to the system.
const RELEASE_AFTER_BYTES: usize = 8 << 20;

/// What the mirror thread keeps between runs, and hands back when it stops for the final
/// mirror.
#[derive(Default)]
pub struct MirrorState {
    /// The open file; `None` when it must be written in full on the next run.
    pub file: Option<FileDb>,
    /// Messages in the file.
    pub rows: i64,
    /// Changes taken from the journal that are not in the file yet (their mirror failed).
    pub in_hand: Changes,
}

/// The mirror thread: on every tick, brings the file up to date.
pub struct Mirror {
    pub shared: Arc<Shared>,
    /// The store writer, which makes full copies and commits what it gathers for a tick.
    pub writer: Sender<Command>,
    pub target: PathBuf,
    pub health: Arc<Mutex<MirrorHealth>>,
}

/// The running mirror thread: closing `stop` ends it, and joining gives its state back.
pub type Running = (Sender<()>, JoinHandle<MirrorState>);

/// Changes a failed run left in hand are kept for the next try, within bounds; past them, the
/// next mirror that can writes the file in full from memory.
fn keep_within_bounds(state: &mut MirrorState) {
    if state.in_hand.len() > MAX_IN_HAND || state.in_hand.content_len() > MAX_IN_HAND_BYTES {
        state.in_hand = Changes::default();
        state.file = None;
    }
    // Each failed run adds the chunks it took, however few ops they still hold.
    state.in_hand.repack_if_sparse();
}

/// What a mirror run came to.
pub(super) enum Outcome {
    Done(Option<MirrorReport>),
    /// The writer has stopped: the final mirror is not ours to write.
    Stopped,
}

impl Mirror {
    pub fn new(
        shared: Arc<Shared>,
        writer: Sender<Command>,
        target: PathBuf,
        health: Arc<Mutex<MirrorHealth>>,
    ) -> Mirror {
        Mirror {
            shared,
            writer,
            target,
            health,
        }
    }

    /// Starts the thread, mirroring every `interval`; `alarm` goes off if it panics.
    pub fn spawn(
        self,
        state: MirrorState,
        interval: Duration,
        alarm: PanicAlarm,
    ) -> io::Result<Running> {
        let (stop, stopped) = bounded(1);
        let handle = thread::Builder::new()
            .name("phpmq-mirror".into())
            .spawn(move || {
                let _alarm = alarm;
                self.run(state, interval, &stopped)
            })?;
        Ok((stop, handle))
    }

    /// Mirrors on every tick until the stop channel closes; returns its state for the final
    /// mirror.
    fn run(&self, mut state: MirrorState, interval: Duration, stop: &Receiver<()>) -> MirrorState {
        let ticker = tick(interval);
        let early = self.shared.journal.wake_ups().clone();
        self.note_file(&state);
        loop {
            // Upkeep (folding the log, giving space back) is for runs on the timer.
            let upkeep = select! {
                recv(ticker) -> _ => {
                    if !self.commit_gathered(stop) {
                        return state;
                    }
                    true
                }
                recv(early) -> _ => {
                    // A failing mirror retries on its tick, not on every batch.
                    if health::lock(&self.health).failing_for > 0 {
                        continue;
                    }
                    false
                }
                recv(stop) -> _ => return state,
            };
            let outcome = self.once(&mut state, stop, upkeep);
            self.shared.journal.replayed();
            self.note_file(&state);
            health::lock(&self.health).held_back = state.in_hand.len();
            match outcome {
                Ok(Outcome::Done(Some(report))) => health::record(&self.health, report),
                Ok(Outcome::Done(None)) => {}
                Ok(Outcome::Stopped) => return state,
                Err(e) => {
                    // Logged once per run of failures, then every 60th, not every tick.
                    let failing_for = health::lock(&self.health).failing_for;
                    if failing_for.is_multiple_of(60) {
                        error!(
                            "mirror of {} failed, will retry: {e}",
                            self.target.display()
                        );
                    }
                    health::fail(&self.health, &e);
                }
            }
        }
    }

    /// Has the writer commit the changes it is gathering, and waits until it has: a tick then
    /// mirrors every change made before it. `false` if the mirror is to stop meanwhile.
    pub(super) fn commit_gathered(&self, stop: &Receiver<()>) -> bool {
        if self.shared.backlog.changes() == 0 {
            // Nothing sent that the writer has not committed: nothing to wait for.
            return true;
        }
        let (reply, committed) = bounded(1);
        if self.writer.send(Command::Flush(reply)).is_err() {
            // The writer has stopped: there is nothing more to gather.
            return true;
        }
        self.shared.ring_writer();
        select! {
            recv(committed) -> _ => true,
            recv(stop) -> _ => false,
        }
    }

    /// Tells the journal what the file holds, so it can tell when replaying stops paying.
    fn note_file(&self, state: &MirrorState) {
        let weight = state.file.as_ref().map(|file| file.weight(state.rows));
        self.shared.journal.note_file(weight);
    }

    /// Makes sure this server still holds the file's lock before writing to it: a lock file
    /// deleted while it runs is taken again; one another server took meanwhile fails the run,
    /// so as not to write over that server's file.
    fn keep_lock(&self) -> Result<(), PersistError> {
        let mut lock = self.shared.db_lock()?;
        if lock.keep()? {
            warn!(
                "{} was deleted while the server ran; locked it again",
                lock.path().display()
            );
        }
        Ok(())
    }

    /// One mirror: the changes since the last one, or a full copy where the file needs it.
    pub(super) fn once(
        &self,
        state: &mut MirrorState,
        stop: &Receiver<()>,
        upkeep: bool,
    ) -> Result<Outcome, PersistError> {
        // On the timer: a second a lock file may be missing costs nothing, a look on every
        // run for a durable receipt would.
        if upkeep {
            self.keep_lock()?;
        }
        let in_place = state.file.as_ref().is_some_and(FileDb::is_in_place);
        if let Some(file) = state.file.as_ref().filter(|_| in_place) {
            let taken = self.shared.journal.take();
            // A store much smaller than what went through it since the last mirror is
            // cheaper to copy than to replay.
            let outweighs = || {
                file.weight(state.rows)
                    .replay_of_outweighs_copy(state.in_hand.iter().chain(taken.ops.iter()))
            };
            if !taken.copy_wanted && !outweighs() {
                return self.apply_changes(state, taken.ops, taken.generation, upkeep);
            }
            // A full copy replaces the file and its log. The log need not be folded in first:
            // it is set aside, not removed, until the copy is in place, and put back at the
            // next start after a crash (`copy::put_in_place`), so a failing fold holds
            // nothing back.
        } else if state.file.is_some() {
            // Only dropped: folding its log in would write to a file no longer at the path,
            // and putting the copy in place sets any log left by that name aside.
            warn!(
                "{} was deleted, replaced or written by another program while the server ran; \
                 writing it again in full",
                self.target.display()
            );
        }
        // A close that cannot fold the log in leaves it beside the file, to be set aside.
        if let Some(old) = state.file.take().filter(|_| in_place) {
            if let Err(e) = old.close() {
                warn!(
                    "closing {} before writing it in full: {e}",
                    self.target.display()
                );
            }
        }
        state.in_hand = Changes::default();
        // Dropped: producers need not wait for the copy.
        self.shared.journal.replayed();
        // Until it completes, the changes it replaces are nowhere but in memory: status says so.
        health::lock(&self.health).full_copy_due = true;
        let Some(report) = self.full_copy(stop)? else {
            return Ok(Outcome::Stopped);
        };
        health::lock(&self.health).full_copy_due = false;
        // Put in place and its directory synced.
        self.shared.durable.mark_synced(report.generation);
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
        ops: Changes,
        generation: u64,
        upkeep: bool,
    ) -> Result<Outcome, PersistError> {
        let Some(file) = &state.file else {
            return Ok(Outcome::Done(None));
        };
        let started = Instant::now();
        // After what a failed run left, if any (its chunks moved, not copied). Nothing
        // changed: the file may still have space to give back.
        state.in_hand.append(ops);
        let run = if upkeep {
            Run::Tick
        } else if self.shared.durable.is_wanted() {
            Run::Durable
        } else {
            Run::Early
        };
        let applied = file.apply(&state.in_hand, run);
        if applied.as_ref().is_ok_and(|a| a.synced) {
            // Synced (or nothing to write): the file holds every change through `generation`.
            self.shared.durable.mark_synced(generation);
        }
        match applied {
            Ok(applied) if !applied.wrote && applied.sync_error.is_none() => {
                // Nothing to write: what it holds is chunks whose ops all cancelled out.
                state.in_hand = Changes::default();
                Ok(Outcome::Done(None))
            }
            Ok(applied) => {
                state.rows += applied.row_delta;
                let content = state.in_hand.content_len();
                // Committed, synced or not: never to be replayed.
                state.in_hand = Changes::default();
                if let Some(source) = applied.sync_error {
                    let path = file.log_path().to_owned();
                    // Never trusted again (see `FileDb`): the next mirror writes it in full.
                    state.file = None;
                    return Err(PersistError::Io {
                        action: "sync",
                        path,
                        source,
                    });
                }
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
                keep_within_bounds(state);
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
        let temp = copy::prepare_copy(&self.target)?;
        let (reply, copied) = bounded(1);
        let request = Command::Mirror {
            temp: temp.clone(),
            reply,
        };
        if self.writer.send(request).is_err() {
            return Ok(None);
        }
        self.shared.ring_writer();
        // The writer answers, or drops the request as it stops (and then `stop` closes).
        let copy = select! {
            recv(copied) -> copy => match copy {
                Ok(copy) => copy?,
                Err(_) => return Ok(None),
            },
            recv(stop) -> _ => return Ok(None),
        };
        let bytes = copy::put_in_place(&temp, &self.target)?;
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
