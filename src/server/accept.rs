//! Accepting connections: one thread per listener, admission against the connection and
//! console-session limits, and a thread for each admitted client. An accept thread sleeps in
//! poll(2) on its listener and the server's accept bell, so the stop wakes it without a new
//! descriptor, at the open-file limit too. After the stop, the connections already queued at a
//! listener are still taken in (their clients may have sent messages), within a bound. A
//! failing accept (out of descriptors) is retried after a pause and logged once per run of
//! failures, not once per retry.

use super::{Lifeline, Shared};
use crate::admin;
use crate::broker::EndedBy;
use crate::connection::{self, THREAD_STACK};
use crate::net::{Listener, Readiness, Stream};
use crate::ratelog;
use log::{warn, Level};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Pause after a failed accept (e.g. out of file descriptors) before trying again: the client
/// stays queued meanwhile, and the listener stays readable, so without it the thread would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// While accepts keep failing, how often the log says so again.
const FAILING_REMINDER: Duration = Duration::from_secs(10);
/// Console sessions at once: it is a tool for people, not a second data path.
const MAX_CONSOLE_SESSIONS: usize = 16;
/// The most connections still queued at a listener that are taken in after the stop.
const QUEUED_AT_STOP: usize = 4096;

/// Counts live connections against the limit, and lets shutdown wait for them to end.
#[derive(Default)]
pub struct ConnectionCount {
    live: Mutex<usize>,
    changed: Condvar,
    /// When a client was last refused: past the limit under a flood of clients, the accept
    /// thread must not wait for a slot per client.
    last_refused: Mutex<Option<Instant>>,
}

impl ConnectionCount {
    /// A slot if fewer than `max` are taken, waiting up to `grace` for one to come free, but
    /// not if a client was refused within the last second: a lone client reconnecting at the
    /// limit is waited for, a flood past it is refused at once.
    fn acquire_within(self: &Arc<Self>, max: usize, grace: Duration) -> Option<ConnectionSlot> {
        let now = Instant::now();
        let mut last_refused = self.last_refused.lock().unwrap_or_else(|p| p.into_inner());
        let grace = match *last_refused {
            Some(at) if now.duration_since(at) < REFUSALS_APART => Duration::ZERO,
            _ => grace,
        };
        let Some(mut live) = self.wait_while(grace, |live| live >= max) else {
            *last_refused = Some(Instant::now());
            return None;
        };
        *live += 1;
        Some(ConnectionSlot(self.clone()))
    }

    /// The count, once `busy` no longer holds of it; `None` if it still does after `timeout`.
    fn wait_while(
        &self,
        timeout: Duration,
        busy: impl Fn(usize) -> bool,
    ) -> Option<std::sync::MutexGuard<'_, usize>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let (live, _) = self
            .changed
            .wait_timeout_while(live, timeout, |live| busy(*live))
            .unwrap_or_else(|p| p.into_inner());
        (!busy(*live)).then_some(live)
    }

    pub fn live(&self) -> usize {
        *self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no connection is left; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_while(timeout, |live| live > 0).is_some()
    }
}

/// How long a client past the limit waits for a slot before it is refused: a client that
/// closes and connects again at once (a PHP worker per job, say) would otherwise find its
/// old connection's slot still taken, for the few milliseconds its thread takes to end.
const SLOT_GRACE: Duration = Duration::from_millis(250);
/// No grace for a client past the limit within this long of the last refusal.
const REFUSALS_APART: Duration = Duration::from_secs(1);

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
    let thread_name = match endpoint {
        Endpoint::Messages => format!("phpmq-accept {name}"),
        Endpoint::Console => format!("phpmq-console {name}"),
    };
    thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let _lifeline = Lifeline {
                shared: shared.clone(),
                name: thread_name,
            };
            accept_loop(&listener, &name, &shared, endpoint);
            take_queued(&listener, &name, &shared, endpoint);
        })
}

/// Accepts until the stop; each admitted client gets a thread of its own.
fn accept_loop(listener: &Listener, name: &str, shared: &Arc<Shared>, endpoint: Endpoint) {
    let mut failing = Failing::default();
    // Checked on every turn, not only when the bell wakes us: a listener that stays readable
    // (clients that keep connecting) must not hold the stop up.
    while !shared.stopping.load(Ordering::SeqCst) {
        let accepted = match listener.wait(&shared.accept_bell) {
            Ok(Readiness::Bell) => return,
            Ok(Readiness::Readable | Readiness::TimedOut) => listener.accept(),
            // poll(2) itself failed (out of kernel memory): treated like a failed accept.
            Err(e) => Err(e),
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(line) = failing.over(Instant::now()) {
                    log_accept(Level::Info, name, &line);
                }
                start_connection(shared, endpoint, stream, peer);
            }
            // The client gave up before we took it, or a signal came: nothing is wrong.
            Err(e) if no_client(&e) => {}
            Err(e) => {
                // Out of descriptors and the like: the client stays queued; wait and try
                // again, never give up listening. The bell cuts the pause short.
                if let Some(line) = failing.failed(&e, Instant::now()) {
                    log_accept(Level::Warn, name, &line);
                }
                match shared.accept_bell.wait(ACCEPT_BACKOFF) {
                    Ok(true) => return,
                    Ok(false) => {}
                    // poll(2) failed as well: pause all the same.
                    Err(_) => thread::sleep(ACCEPT_BACKOFF),
                }
            }
        }
    }
}

/// After the stop: takes in the connections already queued at `listener`. Their clients
/// connected before the stop and may have sent messages already: they are read until they go
/// quiet, like every open connection.
fn take_queued(listener: &Listener, name: &str, shared: &Arc<Shared>, endpoint: Endpoint) {
    // Bounded: clients that keep connecting must not hold the stop up.
    for _ in 0..QUEUED_AT_STOP {
        match listener.accept() {
            Ok((stream, peer)) => start_connection(shared, endpoint, stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if no_client(&e) => {}
            Err(e) => {
                // At the open-file limit, say: the open connections end only later in the
                // stop, too late for these clients, whose connections are reset.
                if listener.client_waiting().unwrap_or(true) {
                    warn!("clients still queued at {name} are not taken in: accept failed: {e}");
                }
                return;
            }
        }
    }
}

fn log_accept(level: Level, name: &str, line: &str) {
    if let Some(suppressed) = ratelog::ACCEPT_FAILED.admit() {
        log::log!(level, "accept on {name} {line}{suppressed}");
    }
}

/// Whether a failed accept only means there was no client to take (none queued, one that
/// reset its connection before it was taken, a signal): no pause, no log line.
fn no_client(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A run of failed accepts on one listener. At the open-file limit every retry fails, ten a
/// second: the log says so when the run starts, every [`FAILING_REMINDER`] while it lasts, and
/// when it ends, not at every retry. The lines go through [`ratelog::ACCEPT_FAILED`] as well, so
/// runs that keep starting and ending (a limit reached again and again) stay bounded too.
#[derive(Default)]
struct Failing(Option<Run>);

struct Run {
    started: Instant,
    reported: Instant,
    tries: u64,
}

impl Failing {
    /// Counts a failed accept; returns the line to log (after "accept on ADDR "), if one is
    /// due.
    fn failed(&mut self, e: &io::Error, now: Instant) -> Option<String> {
        let hint = match e.raw_os_error() {
            Some(libc::EMFILE) => {
                "; at the open-file limit: raise it (LimitNOFILE=, ulimit -Hn) or lower \
                 --max-connections"
            }
            Some(libc::ENFILE) => "; the system's open-file table is full (fs.file-max)",
            _ => "",
        };
        match &mut self.0 {
            None => {
                self.0 = Some(Run {
                    started: now,
                    reported: now,
                    tries: 1,
                });
                Some(format!(
                    "failed: {e}{hint}; retrying every {} ms",
                    ACCEPT_BACKOFF.as_millis()
                ))
            }
            Some(run) => {
                run.tries += 1;
                if now.saturating_duration_since(run.reported) < FAILING_REMINDER {
                    return None;
                }
                run.reported = now;
                Some(format!(
                    "still failing: {e}{hint} ({} tries in {} s)",
                    run.tries,
                    now.saturating_duration_since(run.started).as_secs()
                ))
            }
        }
    }

    /// An accept worked: ends the run, if there was one, and returns the line saying so.
    fn over(&mut self, now: Instant) -> Option<String> {
        let run = self.0.take()?;
        Some(format!(
            "works again after {} failed tries in {} ms",
            run.tries,
            now.saturating_duration_since(run.started).as_millis()
        ))
    }
}

/// Gives an accepted connection its thread (a message connection is registered with the hub
/// first, here, so a shutdown that follows always waits for it).
fn start_connection(shared: &Arc<Shared>, endpoint: Endpoint, stream: Stream, peer: String) {
    let (pool, limit) = endpoint.pool(shared);
    // Once the stop began no slot comes free before the queued clients are taken: no wait.
    let grace = if shared.stopping.load(Ordering::SeqCst) {
        Duration::ZERO
    } else {
        SLOT_GRACE
    };
    let Some(slot) = pool.acquire_within(limit, grace) else {
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
                    connection::serve(&for_thread.hub, admitted, for_thread.limits.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failed_accepts_is_logged_when_it_starts_now_and_then_and_when_it_ends() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let start = Instant::now();
        let mut failing = Failing::default();
        let first = failing
            .failed(&emfile, start)
            .expect("the run's first line");
        assert!(
            first.starts_with("failed: ") && first.contains("LimitNOFILE="),
            "{first}"
        );
        // Ten tries a second for just under the reminder's interval: no line.
        let mut at = start;
        let mut tries = 1;
        while at + ACCEPT_BACKOFF < start + FAILING_REMINDER {
            at += ACCEPT_BACKOFF;
            tries += 1;
            assert_eq!(failing.failed(&emfile, at), None, "{at:?}");
        }
        let reminder = failing
            .failed(&emfile, start + FAILING_REMINDER)
            .expect("a reminder");
        tries += 1;
        assert!(
            reminder.starts_with("still failing: ")
                && reminder.contains(&format!("({tries} tries in 10 s)")),
            "{reminder}"
        );
        assert_eq!(
            failing.over(start + FAILING_REMINDER + ACCEPT_BACKOFF),
            Some(format!(
                "works again after {tries} failed tries in 10100 ms"
            ))
        );
        // Working again: nothing more to say, and the next failure starts a new run.
        assert_eq!(failing.over(start + FAILING_REMINDER * 2), None);
        let other = io::Error::from_raw_os_error(libc::ENOBUFS);
        let next = failing
            .failed(&other, start + FAILING_REMINDER * 3)
            .expect("a new run");
        assert!(
            next.starts_with("failed: ") && !next.contains("LimitNOFILE="),
            "{next}"
        );
    }
}
