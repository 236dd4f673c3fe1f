//! The server: binds every listener, runs one accept thread per listener and one thread per
//! client, sweeps expired messages, and owns the one shutdown path.
//!
//! Shutdown order: stop accepting (and wake the accept threads); let every connection read
//! what its client already sent and end (hanging up on those still busy after a deadline:
//! they still take every whole frame that had arrived, see [`crate::hub::Peer::stop_reading`]);
//! wait for the connection threads; stop the sweeper; apply what is pending to the store and
//! mirror it one last time; then drop the listeners, which removes our Unix socket files.

use crate::admin::{self, Backend, Status};
use crate::broker::{Broker, Listing};
use crate::config::{Config, ListenAddr};
use crate::connection::{self, Limits, THREAD_STACK};
use crate::fatal::Fatal;
use crate::hub::{BrokerDown, Hub};
use crate::net::{Bell, BindError, Listener, Stream};
use crate::persist::{MirrorStatus, PersistError, Persistence};
use crate::ratelog;
use crate::request::QueueName;
use crate::store::{NullStore, Store};
use crossbeam_channel::{select, tick, unbounded, Receiver, Sender};
use log::{error, info, warn};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often ready messages are checked for expiry (and suppressed log lines reported).
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How long shutdown lets connections read what their clients sent before hanging up.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long shutdown then waits for connection threads to finish.
const HANG_UP_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Console sessions at once: it is a tool for people, not a second data path.
const MAX_CONSOLE_SESSIONS: usize = 16;

#[derive(Debug)]
pub enum ServerError {
    NoListeners,
    Bind(BindError),
    Persistence(PersistError),
    Spawn(io::Error),
    /// The shutdown bell (an eventfd) could not be made.
    Bell(io::Error),
    Fatal(Fatal),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::NoListeners => f.write_str("no address to listen on"),
            ServerError::Bind(e) => write!(f, "{e}"),
            ServerError::Persistence(e) => write!(f, "{e}"),
            ServerError::Spawn(e) => write!(f, "cannot start a thread: {e}"),
            ServerError::Bell(e) => write!(f, "cannot create an eventfd: {e}"),
            ServerError::Fatal(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// Counts live connections against the limit, and lets shutdown wait for them to end.
#[derive(Default)]
struct ConnectionCount {
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

    fn live(&self) -> usize {
        *self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no connection is left; false on timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
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
        *live -= 1;
        self.0.changed.notify_all();
    }
}

/// What the accept threads share.
struct Shared {
    hub: Hub,
    connections: Arc<ConnectionCount>,
    console_sessions: Arc<ConnectionCount>,
    max_connections: usize,
    limits: Limits,
    console_idle_timeout: Duration,
    next_conn: AtomicU64,
    stopping: AtomicBool,
    fatal: Sender<Fatal>,
    started: Instant,
    db: Option<PathBuf>,
    mirror: Option<MirrorStatus>,
}

impl Backend for Shared {
    /// A near-snapshot: the queues are looked at a chunk per lock acquisition, in name order,
    /// so a status of 100,000 queues does not stall message traffic.
    fn status(&self) -> Result<Status, BrokerDown> {
        let (totals, now) = self.hub.read(|broker, now| (broker.totals(), now))?;
        let mut queues: Vec<crate::broker::QueueStatus> = Vec::new();
        loop {
            let after = queues.last().map(|q| &q.name);
            let chunk = self.hub.read(|broker, now| {
                broker.queue_statuses_after(after, crate::broker::STATUS_CHUNK, now)
            })?;
            let done = chunk.len() < crate::broker::STATUS_CHUNK;
            queues.extend(chunk);
            if done {
                break;
            }
        }
        Ok(Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            connections: self.connections.live(),
            rss_bytes: resident_memory(),
            totals,
            queues,
            db: self.db.clone(),
            last_mirror: self.mirror.as_ref().and_then(MirrorStatus::latest),
            mirror: self.mirror.as_ref().map(MirrorStatus::health),
            now,
        })
    }

    fn list_messages(&self, queue: &str, limit: usize) -> Result<Option<Listing>, BrokerDown> {
        self.hub
            .read(|broker, now| broker.list_messages(queue, limit, now))
    }

    /// In chunks, like [`Shared::status`].
    fn queue_names(&self) -> Result<Vec<QueueName>, BrokerDown> {
        let mut names: Vec<QueueName> = Vec::new();
        loop {
            let after = names.last();
            let chunk = self
                .hub
                .read(|broker, _| broker.queue_names_after(after, crate::broker::STATUS_CHUNK))?;
            let done = chunk.len() < crate::broker::STATUS_CHUNK;
            names.extend(chunk);
            if done {
                return Ok(names);
            }
        }
    }

    fn flush(&self, queue: &str) -> Result<Option<usize>, BrokerDown> {
        self.hub
            .modify(|broker, now, out| broker.flush(queue, now, out))
    }

    /// A chunk of queues per lock acquisition, in name order: a message sent meanwhile to a
    /// queue already flushed stays.
    fn flush_all(&self) -> Result<(usize, usize), BrokerDown> {
        let (mut messages, mut queues, mut after) = (0, 0, None);
        loop {
            let (m, q, last) = self.hub.modify(|broker, now, out| {
                broker.flush_after(after.as_ref(), crate::broker::FLUSH_CHUNK, now, out)
            })?;
            messages += m;
            queues += q;
            if q < crate::broker::FLUSH_CHUNK {
                return Ok((messages, queues));
            }
            after = last;
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// The process's resident memory, from /proc (Linux).
fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Held by a thread the server cannot run without: if the thread ends (a panic included)
/// before shutdown began, the server is told to stop instead of running half-alive.
struct Lifeline {
    shared: Arc<Shared>,
    name: String,
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        if !self.shared.stopping.load(Ordering::SeqCst) {
            let _ = self
                .shared
                .fatal
                .try_send(Fatal::ThreadExited(self.name.clone()));
        }
    }
}

/// A bound server, ready to run.
pub struct Server {
    listeners: Vec<Arc<Listener>>,
    console_listeners: Vec<Arc<Listener>>,
    shared: Arc<Shared>,
    fatal: Receiver<Fatal>,
    persistence: Option<Persistence>,
    recovered: usize,
}

impl Server {
    /// Recovers stored messages, then binds every listen address; fails on the first problem.
    pub fn bind(config: &Config) -> Result<Server, ServerError> {
        if config.listen.is_empty() {
            return Err(ServerError::NoListeners);
        }
        // The store first: a database that cannot be used must stop us before anyone connects.
        let started = Instant::now();
        let mut persistence = match &config.db {
            Some(path) => Some(
                Persistence::open(path, config.mirror_interval)
                    .map_err(ServerError::Persistence)?,
            ),
            None => None,
        };
        let store: Box<dyn Store> = match &persistence {
            Some(p) => Box::new(p.store()),
            None => Box::new(NullStore),
        };
        let mut broker = Broker::new(store);
        let mut recovered_count = 0;
        if let Some(persistence) = &mut persistence {
            recovered_count = persistence
                .recover(&mut |message| broker.restore(message))
                .map_err(ServerError::Persistence)?;
            info!(
                "recovered {recovered_count} messages from {} in {} ms",
                persistence.path().display(),
                started.elapsed().as_millis()
            );
        }
        let bind_all = |addrs: &[ListenAddr]| {
            addrs
                .iter()
                .map(|addr| Listener::bind(addr).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ServerError::Bind)
        };
        let listeners = bind_all(&config.listen)?;
        let console_listeners = bind_all(&config.admin)?;
        let (fatal_tx, fatal) = unbounded();
        let shared = Arc::new(Shared {
            hub: {
                let hub = Hub::new(
                    broker,
                    fatal_tx.clone(),
                    Bell::new().map_err(ServerError::Bell)?,
                );
                match &persistence {
                    Some(p) => hub.with_store_backlogs(p.backlogs()),
                    None => hub,
                }
            },
            connections: Arc::default(),
            max_connections: config.max_connections,
            console_idle_timeout: config.console_idle_timeout,
            limits: Limits {
                max_packet_len: config.max_message_size,
                frame_timeout: config.frame_timeout,
                idle_timeout: config.idle_timeout,
            },
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            fatal: fatal_tx,
            console_sessions: Arc::default(),
            started: Instant::now(),
            db: persistence.as_ref().map(|p| p.path().to_owned()),
            mirror: persistence.as_ref().map(Persistence::mirror_status),
        });
        Ok(Server {
            listeners,
            console_listeners,
            shared,
            fatal,
            persistence,
            recovered: recovered_count,
        })
    }

    /// The bound console addresses.
    pub fn console_addrs(&self) -> Vec<ListenAddr> {
        self.console_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The mirror file, if messages are persisted.
    pub fn db_path(&self) -> Option<&Path> {
        self.persistence.as_ref().map(Persistence::path)
    }

    /// How many stored messages were recovered at start.
    pub fn recovered(&self) -> usize {
        self.recovered
    }

    /// The bound addresses, with real port numbers where port 0 was asked for.
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` receives (or is dropped), then shuts down in order.
    pub fn run(mut self, shutdown: Receiver<()>) -> Result<(), ServerError> {
        if let Some(persistence) = &mut self.persistence {
            let fatal = self.shared.fatal.clone();
            let on_fatal = Arc::new(move |e: PersistError| {
                error!("{e}");
                let _ = fatal.try_send(Fatal::Persistence(e.to_string()));
            });
            let shared = self.shared.clone();
            let on_fetched = Arc::new(move |fetched| {
                // A poisoned broker is already reported as fatal.
                let _ = shared
                    .hub
                    .modify(|broker, now, out| broker.attach(fetched, now, out));
            });
            persistence
                .start(on_fetched, on_fatal)
                .map_err(ServerError::Spawn)?;
        }
        let mut accept_threads = Vec::new();
        let endpoints = self
            .listeners
            .iter()
            .map(|l| (l, Endpoint::Messages))
            .chain(
                self.console_listeners
                    .iter()
                    .map(|l| (l, Endpoint::Console)),
            );
        for (listener, endpoint) in endpoints {
            match spawn_acceptor(listener.clone(), self.shared.clone(), endpoint) {
                Ok(handle) => accept_threads.push(handle),
                Err(e) => {
                    let _ = self.stop(accept_threads, None);
                    return Err(ServerError::Spawn(e));
                }
            }
        }
        let (stop_sweeper, sweeper_stopped) = unbounded::<()>();
        let sweeper = spawn_sweeper(self.shared.clone(), sweeper_stopped);
        let sweeper = match sweeper {
            Ok(handle) => handle,
            Err(e) => {
                let _ = self.stop(accept_threads, None);
                return Err(ServerError::Spawn(e));
            }
        };
        let outcome = select! {
            recv(shutdown) -> _ => Ok(()),
            recv(self.fatal) -> fatal => Err(ServerError::Fatal(fatal.unwrap_or(Fatal::BrokerDown))),
        };
        match &outcome {
            Ok(()) => info!("shutting down"),
            Err(e) => error!("shutting down: {e}"),
        }
        drop(stop_sweeper);
        let stopped = self.stop(accept_threads, Some(sweeper));
        outcome.and(stopped)
    }

    /// The one shutdown path; see the module docs for the order.
    fn stop(
        self,
        accept_threads: Vec<JoinHandle<()>>,
        sweeper: Option<JoinHandle<()>>,
    ) -> Result<(), ServerError> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for listener in self.listeners.iter().chain(&self.console_listeners) {
            listener.wake();
        }
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
        if let Some(handle) = sweeper {
            let _ = handle.join();
        }
        // Console sessions notice the stop on their own within half a second.
        self.shared.console_sessions.wait_idle(HANG_UP_TIMEOUT);
        ratelog::report_all_suppressed();
        let result = match self.persistence {
            Some(persistence) => {
                let path = persistence.path().to_owned();
                match persistence.finish() {
                    Ok(report) => {
                        match report {
                            Some(report) => info!(
                                "final mirror: {} messages in {} ({}; {} bytes written, file {} bytes, {} ms)",
                                report.messages,
                                path.display(),
                                if report.full { "full copy" } else { "changes" },
                                report
                                    .written
                                    .map_or_else(|| "?".to_string(), |w| w.to_string()),
                                report.bytes,
                                report.duration.as_millis()
                            ),
                            None => info!("final mirror: {} was up to date", path.display()),
                        }
                        Ok(())
                    }
                    Err(e) => {
                        error!("final mirror failed: {e}");
                        Err(ServerError::Persistence(e))
                    }
                }
            }
            None => Ok(()),
        };
        // Dropping the listeners removes the socket files.
        drop(self.listeners);
        drop(self.console_listeners);
        result
    }
}

/// What a listener serves.
#[derive(Clone, Copy)]
enum Endpoint {
    Messages,
    Console,
}

fn spawn_acceptor(
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

impl Endpoint {
    /// Who counts this endpoint's connections, and how many it admits.
    fn pool<'a>(&self, shared: &'a Shared) -> (&'a Arc<ConnectionCount>, usize) {
        match self {
            Endpoint::Messages => (&shared.connections, shared.max_connections),
            Endpoint::Console => (&shared.console_sessions, MAX_CONSOLE_SESSIONS),
        }
    }
}

/// Accepts until shutdown; each admitted client gets a thread of its own.
/// The most connections still queued at a listener that are taken in after the stop.
const QUEUED_AT_STOP: usize = 4096;

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
        let _ = shared.hub.unregister(conn);
    }
}

fn spawn_sweeper(shared: Arc<Shared>, stop: Receiver<()>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("phpmq-sweeper".into())
        .spawn(move || {
            let _lifeline = Lifeline {
                shared: shared.clone(),
                name: "phpmq-sweeper".into(),
            };
            let ticker = tick(SWEEP_INTERVAL);
            loop {
                select! {
                    recv(ticker) -> _ => {
                        if shared.hub.expire().is_err() {
                            return;
                        }
                        ratelog::report_suppressed();
                    }
                    recv(stop) -> _ => return,
                }
            }
        })
}
