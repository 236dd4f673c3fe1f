//! How the mirror has been doing: what one mirror did ([`MirrorReport`]), the running tally
//! ([`MirrorHealth`]) that the mirror thread and the front update, and the handle that the
//! console reads it through ([`MirrorStatus`]).

use super::error::PersistError;
use super::shared::Shared;
use crate::storage::{StatusSource, StorageStatus, SyncReport};
use crate::store::{now_millis, Millis};
use log::{debug, info};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What one mirror did.
#[derive(Clone, Debug)]
pub struct MirrorReport {
    /// The writer generation the file reflects.
    pub generation: u64,
    /// Messages in the file.
    pub messages: i64,
    /// The file's size.
    pub bytes: u64,
    /// Bytes written to disk for this mirror, where the system tells.
    pub written: Option<u64>,
    /// A full copy (a new, missing, replaced or old-format file), not the changes alone.
    pub full: bool,
    /// The whole mirror: write, sync (and for a full copy, rename).
    pub duration: Duration,
    /// The longest the store writer spent copying in one go for a full copy (its batches and
    /// fetches wait meanwhile; the broker never does).
    pub locked: Duration,
    /// When it was complete on disk.
    pub finished_at: Millis,
}

impl From<&MirrorReport> for SyncReport {
    fn from(report: &MirrorReport) -> SyncReport {
        SyncReport {
            finished_at: report.finished_at,
            duration: report.duration,
            messages: report.messages,
            bytes: report.bytes,
            written: report.written,
            full: report.full,
        }
    }
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
    pub(super) held_back: usize,
    /// A full copy was begun and has not completed: the file misses everything since the
    /// last mirror that did.
    pub full_copy_due: bool,
}

/// Reports how the mirror is doing, from any thread.
#[derive(Clone)]
pub struct MirrorStatus {
    pub(super) health: Arc<Mutex<MirrorHealth>>,
    pub(super) shared: Arc<Shared>,
    pub(super) target: PathBuf,
}

impl MirrorStatus {
    /// The most recent completed mirror.
    pub fn latest(&self) -> Option<MirrorReport> {
        lock(&self.health).last.clone()
    }

    /// The tally, with the changes still waiting for the file counted now.
    pub fn health(&self) -> MirrorHealth {
        let mut health = lock(&self.health).clone();
        health.pending_changes = self.shared.journal.pending() + health.held_back;
        health
    }
}

impl StatusSource for MirrorStatus {
    fn status(&self) -> StorageStatus {
        let health = self.health();
        StorageStatus {
            location: self.target.display().to_string(),
            last_sync: health.last.as_ref().map(SyncReport::from),
            completed: health.completed,
            full_copies: health.full_copies,
            failures: health.failures,
            failing_for: health.failing_for,
            last_error: health.last_error,
            written: health.written,
            pending_changes: health.pending_changes,
            full_copy_due: health.full_copy_due,
        }
    }
}

/// The tally is plain counters: a panic elsewhere cannot leave it half-changed.
pub fn lock(health: &Mutex<MirrorHealth>) -> MutexGuard<'_, MirrorHealth> {
    health.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a completed mirror.
pub fn record(health: &Mutex<MirrorHealth>, report: MirrorReport) {
    debug!(
        "mirrored {} messages ({}): {} bytes written, file {} bytes, in {} ms (longest store pause {} ms)",
        report.messages,
        if report.full { "full copy" } else { "changes" },
        report.written.map_or_else(|| "?".into(), |w| w.to_string()),
        report.bytes,
        report.duration.as_millis(),
        report.locked.as_millis()
    );
    let mut health = lock(health);
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

/// Counts a failed mirror.
pub fn fail(health: &Mutex<MirrorHealth>, e: &PersistError) {
    let mut health = lock(health);
    health.failures += 1;
    health.failing_for += 1;
    health.last_error = Some((now_millis(), e.to_string()));
}
