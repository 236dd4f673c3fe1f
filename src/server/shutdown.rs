//! The one shutdown path. Its order: stop accepting (ring the accept threads' bell: each takes
//! in what is already queued at its listener, then ends); let every connection read what its
//! client already sent and end (hanging up on those still busy after a deadline: they still
//! take every whole frame that had arrived, see [`crate::hub::Peer::stop_reading`]); wait for
//! the connection threads; stop the sweeper; bring storage up to date one last time; then drop
//! the listeners, which removes our Unix socket files.

use super::{Server, ServerError};
use crate::ratelog;
use crate::storage::Storage;
use crossbeam_channel::Sender;
use log::{error, info, warn};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long shutdown lets connections read what their clients sent before hanging up.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long shutdown then waits for connection threads to finish.
const HANG_UP_TIMEOUT: Duration = Duration::from_secs(1);

impl Server {
    /// Stops everything in order; see the module docs.
    pub(super) fn stop(
        self,
        accept_threads: Vec<JoinHandle<()>>,
        sweeper: Option<(Sender<()>, JoinHandle<()>)>,
    ) -> Result<(), ServerError> {
        // Stopping first: an accept thread that wakes for a client sees it and takes only
        // what is already queued.
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.accept_bell.ring();
        for handle in accept_threads {
            let _ = handle.join();
        }
        self.shared.hub.begin_close();
        if !self.shared.connections.wait_idle(DRAIN_TIMEOUT) {
            warn!("clients still sending after {DRAIN_TIMEOUT:?}; hanging up on them");
            self.shared.hub.close_all();
            if !self.shared.connections.wait_idle(HANG_UP_TIMEOUT) {
                warn!("some connections did not finish within {HANG_UP_TIMEOUT:?}");
            }
        }
        if let Some((stop_sweeper, handle)) = sweeper {
            drop(stop_sweeper);
            let _ = handle.join();
        }
        // Console sessions notice the stop on their own within half a second.
        self.shared.console_sessions.wait_idle(HANG_UP_TIMEOUT);
        ratelog::report_all_suppressed();
        // A connection thread still running past the deadlines gets no send taken after the
        // last changes go to storage: it is refused instead.
        self.shared.hub.close_store();
        let result = match self.storage {
            Some(storage) => finish(storage),
            None => Ok(()),
        };
        // Dropping the listeners removes the socket files.
        drop(self.listeners);
        drop(self.console_listeners);
        result
    }
}

/// Brings storage up to date one last time and says how that went.
fn finish(storage: Box<dyn Storage>) -> Result<(), ServerError> {
    let location = storage.location();
    match storage.finish() {
        Ok(Some(report)) => {
            info!(
                "final mirror: {} messages in {location} ({}; {} bytes written, file {} bytes, {} ms)",
                report.messages,
                if report.full { "full copy" } else { "changes" },
                report
                    .written
                    .map_or_else(|| "?".to_string(), |w| w.to_string()),
                report.bytes,
                report.duration.as_millis()
            );
            Ok(())
        }
        Ok(None) => {
            info!("final mirror: {location} was up to date");
            Ok(())
        }
        Err(e) => {
            error!("final mirror failed: {e}");
            Err(ServerError::Storage(e))
        }
    }
}
