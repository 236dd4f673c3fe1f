//! The server's composition root: opens storage and recovers from it, builds the broker and
//! the hub, binds every listener, and starts the threads: one accept thread per listener and
//! one per client (`accept`), the sweeper that expires messages and runs the broker's timers
//! (leases, delays), and storage's own. It owns the one shutdown path (`shutdown`); the
//! console sees the server through `console`.
//!
//! Storage is reached only through [`crate::storage::Storage`].

mod accept;
mod console;
mod shutdown;

use crate::admin::SharedSnapshot;
use crate::broker::Broker;
use crate::config::{Config, ListenAddr};
use crate::connection::{FrameBudget, Limits};
use crate::fatal::Fatal;
use crate::hub::Hub;
use crate::net::{Bell, BindError, Listener};
use crate::ratelog;
use crate::storage::{self, StatusSource, Storage, StorageError};
use crate::store::{NullStore, Store};
use accept::{ConnectionCount, Endpoint};
use crossbeam_channel::{after, select, unbounded, Receiver, Sender};
use log::{error, info};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often ready messages are checked for expiry (and suppressed log lines reported).
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// The shortest sleep between two sweeps.
const SWEEP_MIN_WAIT: Duration = Duration::from_millis(1);

/// Why the server could not start, or stopped on its own. Each shows as the one line
/// `phpmq-server` prints.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no address to listen on")]
    NoListeners,
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot start a thread: {0}")]
    Spawn(#[source] io::Error),
    /// The shutdown bell (an eventfd) could not be made.
    #[error("cannot create an eventfd: {0}")]
    Bell(#[source] io::Error),
    #[error("{0}")]
    Fatal(Fatal),
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
    /// Rung at the stop to wake the accept threads. Made at start, before any client: waking
    /// them by connecting to ourselves needed a descriptor, and hung the stop at the limit.
    accept_bell: Bell,
    fatal: Sender<Fatal>,
    started: Instant,
    /// How storage is doing (`None` when messages are kept in memory only).
    storage: Option<Arc<dyn StatusSource>>,
    /// The status every `monitor` session shares.
    monitor_snapshot: SharedSnapshot,
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
    storage: Option<Box<dyn Storage>>,
    recovered: usize,
}

impl Server {
    /// Recovers stored messages, then binds every listen address; fails on the first problem.
    pub fn bind(config: &Config) -> Result<Server, ServerError> {
        if config.listen.is_empty() {
            return Err(ServerError::NoListeners);
        }
        // Storage first: one that cannot be used must stop us before anyone connects.
        let started = Instant::now();
        let mut storage = storage::open(config)?;
        let store: Box<dyn Store> = match &storage {
            Some(storage) => storage.store(),
            None => Box::new(NullStore),
        };
        let mut broker = Broker::new(store);
        broker.set_max_deliveries(Some(config.max_deliveries));
        broker.set_max_queue_length(Some(config.max_queue_length));
        broker.set_store_limits(config.max_stored_messages, config.max_stored_bytes);
        let mut recovered = 0;
        if let Some(storage) = &mut storage {
            recovered = storage.recover(&mut |message| broker.restore(message))?;
            info!(
                "recovered {recovered} messages from {} in {} ms",
                storage.location(),
                started.elapsed().as_millis()
            );
        }
        let bind_all = |addrs: &[ListenAddr]| {
            addrs
                .iter()
                .map(|addr| {
                    Listener::bind(addr)
                        .map(|listener| Arc::new(listener.with_keepalive(config.tcp_keepalive)))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let listeners = bind_all(&config.listen)?;
        let console_listeners = bind_all(&config.admin)?;
        let (fatal_tx, fatal) = unbounded();
        let hub = Hub::new(
            broker,
            fatal_tx.clone(),
            Bell::new().map_err(ServerError::Bell)?,
        );
        let hub = match &storage {
            Some(storage) => hub
                .with_store_backlogs(storage.backlogs())
                .with_v12(config.max_deliveries > 0, storage.durability()),
            None => hub.with_v12(config.max_deliveries > 0, None),
        };
        let shared = Arc::new(Shared {
            hub,
            connections: Arc::default(),
            max_connections: config.max_connections,
            console_idle_timeout: config.console_idle_timeout,
            limits: Limits {
                frame_budget: Arc::new(FrameBudget::with_limit(config.frame_memory)),
                max_packet_len: config.max_message_size,
                frame_timeout: config.frame_timeout,
                idle_timeout: config.idle_timeout,
            },
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            accept_bell: Bell::new().map_err(ServerError::Bell)?,
            fatal: fatal_tx,
            console_sessions: Arc::default(),
            started: Instant::now(),
            storage: storage.as_ref().map(|s| s.status()),
            monitor_snapshot: SharedSnapshot::default(),
        });
        Ok(Server {
            listeners,
            console_listeners,
            shared,
            fatal,
            storage,
            recovered,
        })
    }

    /// The bound console addresses.
    pub fn console_addrs(&self) -> Vec<ListenAddr> {
        self.console_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Where messages are kept (the mirror file), if they are.
    pub fn storage_location(&self) -> Option<String> {
        self.storage.as_ref().map(|s| s.location())
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
        if let Some(storage) = &mut self.storage {
            let fatal = self.shared.fatal.clone();
            let shared_for_fatal = Arc::downgrade(&self.shared);
            let on_fatal = Arc::new(move |e: StorageError| {
                error!("{e}");
                // Storage takes nothing more: sends during the stop's drain are refused (503,
                // or the v1 connection closed), not taken and lost with a receipt. Called from
                // a storage thread, which never holds the broker's lock.
                if let Some(shared) = shared_for_fatal.upgrade() {
                    shared.hub.close_store();
                }
                let _ = fatal.try_send(Fatal::Persistence(e.to_string()));
            });
            let shared = self.shared.clone();
            let on_fetched = Arc::new(move |fetched| {
                // A poisoned broker is already reported as fatal.
                let _ = shared
                    .hub
                    .modify(|broker, now, out| broker.attach(fetched, now, out));
            });
            if let Some(durability) = storage.durability() {
                // Weak: the hub holds the durability, which holds this callback.
                let shared = Arc::downgrade(&self.shared);
                durability.set_on_synced(Arc::new(move |_| {
                    if let Some(shared) = shared.upgrade() {
                        shared.hub.release_durable();
                    }
                }));
            }
            storage.start(on_fetched, on_fatal)?;
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
            match accept::spawn_acceptor(listener.clone(), self.shared.clone(), endpoint) {
                Ok(handle) => accept_threads.push(handle),
                Err(e) => {
                    let _ = self.stop(accept_threads, None);
                    return Err(ServerError::Spawn(e));
                }
            }
        }
        let (stop_sweeper, sweeper_stopped) = unbounded::<()>();
        let sweeper = match spawn_sweeper(self.shared.clone(), sweeper_stopped) {
            Ok(handle) => handle,
            Err(e) => {
                let _ = self.stop(accept_threads, None);
                return Err(ServerError::Spawn(e));
            }
        };
        let outcome = select! {
            // The signal watcher gone (a panic) is no request to stop: exit 0 would hide it.
            recv(shutdown) -> asked => asked.map_err(|_| {
                ServerError::Fatal(Fatal::ThreadExited("phpmq-signals".into()))
            }),
            recv(self.fatal) -> fatal => Err(ServerError::Fatal(fatal.unwrap_or(Fatal::BrokerDown))),
        };
        match &outcome {
            Ok(()) => info!("shutting down"),
            Err(e) => error!("shutting down: {e}"),
        }
        // The sweeper goes on through the stop's drain: a lease still runs out in time (v1.2
        // rule 7), so a late ack from a holder still connected is ignored.
        let stopped = self.stop(accept_threads, Some((stop_sweeper, sweeper)));
        outcome.and(stopped)
    }
}

/// Expires messages, takes back expired leases and releases due delays: at the broker's next
/// deadline, and at least every [`SWEEP_INTERVAL`] (so a lease is taken back at most that late,
/// v1.2 rule 7, even when it began after the sweeper went to sleep). Suppressed log lines are
/// reported every [`SWEEP_INTERVAL`].
fn spawn_sweeper(shared: Arc<Shared>, stop: Receiver<()>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("phpmq-sweeper".into())
        .spawn(move || {
            let _lifeline = Lifeline {
                shared: shared.clone(),
                name: "phpmq-sweeper".into(),
            };
            let mut wait = SWEEP_INTERVAL;
            let mut reported = Instant::now();
            let timer_set = shared.hub.timer_wake_ups().clone();
            loop {
                select! {
                    recv(timer_set) -> _ => {
                        // The broker got a deadline before the planned sweep: sweep now
                        // (cheap) to plan for it.
                        wait = Duration::ZERO;
                    }
                    recv(after(wait)) -> _ => {
                        // A million messages falling due at once must not hold back every
                        // sender on the store's account.
                        shared.hub.pace_bulk_work();
                        let Ok(next) = shared.hub.sweep(SWEEP_INTERVAL, SWEEP_MIN_WAIT) else {
                            return;
                        };
                        wait = next;
                        if reported.elapsed() >= SWEEP_INTERVAL {
                            reported = Instant::now();
                            ratelog::report_suppressed();
                        }
                    }
                    recv(stop) -> _ => return,
                }
            }
        })
}
