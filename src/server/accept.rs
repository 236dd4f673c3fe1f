//! Accepting connections: one thread per listener, admission against the connection and
//! console-session limits, and a thread for each admitted client. After the stop, the
//! connections already queued at a listener are still taken in (their clients may have sent
//! messages), within a bound.

use super::{Lifeline, Shared};
use crate::admin;
use crate::broker::EndedBy;
use crate::connection::{self, THREAD_STACK};
use crate::net::{Listener, Stream};
use crate::ratelog;
use log::warn;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Console sessions at once: it is a tool for people, not a second data path.
const MAX_CONSOLE_SESSIONS: usize = 16;
/// The most connections still queued at a listener that are taken in after the stop.
const QUEUED_AT_STOP: usize = 4096;

/// Counts live connections against the limit, and lets shutdown wait for them to end.
#[derive(Default)]
pub struct ConnectionCount {
    live: Mutex<usize>,
    changed: Condvar,
}

impl ConnectionCount {
    fn try_acquire(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if *live >= max {
            return None;
        }
        *live += 1;
        Some(ConnectionSlot(self.clone()))
    }

    pub fn live(&self) -> usize {
        *self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no connection is left; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            live = match self.changed.wait_timeout(live, left) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

/// One counted connection; released when dropped, even if its thread panics.
struct ConnectionSlot(Arc<ConnectionCount>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut live = self.0.live.lock().unwrap_or_else(|p| p.into_inner());
        *live = live.saturating_sub(1);
        self.0.changed.notify_all();
    }
}

/// What a listener serves.
#[derive(Clone, Copy)]
pub enum Endpoint {
    Messages,
    Console,
}

impl Endpoint {
    /// Who counts this endpoint's connections, and how many it admits.
    fn pool<'a>(&self, shared: &'a Shared) -> (&'a Arc<ConnectionCount>, usize) {
        match self {
            Endpoint::Messages => (&shared.connections, shared.max_connections),
            Endpoint::Console => (&shared.console_sessions, MAX_CONSOLE_SESSIONS),
        }
    }
}

/// Starts the accept thread of `listener`.
pub fn spawn_acceptor(
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    endpoint: Endpoint,
) -> io::Result<JoinHandle<()>> {
    let name = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let name = match endpoint {
        Endpoint::Messages => format!("phpmq-accept {name}"),
        Endpoint::Console => format!("phpmq-console {name}"),
    };
    thread::Builder::new().name(name.clone()).spawn(move || {
        let _lifeline = Lifeline {
            shared: shared.clone(),
            name,
        };
        accept_loop(&listener, &shared, endpoint)
    })
}

/// Accepts until shutdown; each admitted client gets a thread of its own.
fn accept_loop(listener: &Listener, shared: &Arc<Shared>, endpoint: Endpoint) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            // Clients that connected before the stop may have sent messages already: take
            // them too (they are read until they go quiet, like every open connection), then
            // stop. Our own wake-up connection is among them and simply ends.
            if let Ok((stream, peer)) = accepted {
                start_connection(shared, endpoint, stream, peer);
            }
            if listener.set_nonblocking().is_ok() {
                // Bounded: clients that keep connecting must not hold the stop up.
                for _ in 0..QUEUED_AT_STOP {
                    let Ok((stream, peer)) = listener.accept() else {
                        break;
                    };
                    start_connection(shared, endpoint, stream, peer);
                }
            }
            return;
        }
        match accepted {
            Ok((stream, peer)) => start_connection(shared, endpoint, stream, peer),
            Err(e) => {
                // Out of descriptors and the like: wait and go on, never give up listening.
                if let Some(suppressed) = ratelog::ACCEPT_FAILED.admit() {
                    warn!("accept failed: {e}; retrying{suppressed}");
                }
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// Gives an accepted connection its thread (a message connection is registered with the hub
/// first, here, so a shutdown that follows always waits for it).
fn start_connection(shared: &Arc<Shared>, endpoint: Endpoint, stream: Stream, peer: String) {
    let (pool, limit) = endpoint.pool(shared);
    let Some(slot) = pool.try_acquire(limit) else {
        let what = match endpoint {
            Endpoint::Messages => "connections",
            Endpoint::Console => {
                admin::refuse(stream, limit);
                "console sessions"
            }
        };
        if let Some(suppressed) = ratelog::REFUSED.admit() {
            warn!("refusing connection from {peer}: limit of {limit} {what} reached{suppressed}");
        }
        return;
    };
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let for_thread = shared.clone();
    let spawned = match endpoint {
        Endpoint::Messages => {
            let Some(admitted) = connection::admit(&shared.hub, conn, stream, peer) else {
                return;
            };
            thread::Builder::new()
                .name(format!("phpmq-conn-{conn}"))
                .stack_size(THREAD_STACK)
                .spawn(move || {
                    let _slot = slot;
                    connection::serve(&for_thread.hub, admitted, for_thread.limits)
                })
        }
        Endpoint::Console => thread::Builder::new()
            .name(format!("phpmq-conn-{conn}"))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _slot = slot;
                admin::serve(stream, &peer, &*for_thread, for_thread.console_idle_timeout)
            }),
    };
    if let Err(e) = spawned {
        warn!("refusing a connection: cannot start its thread: {e}");
        // A registered connection without a thread would be waited for forever.
        let _ = shared.hub.unregister(conn, EndedBy::Server);
    }
}
