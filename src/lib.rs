//! phpmq: a persistent message-queue server speaking the PHPMQ v1 wire protocol.
//!
//! Layout, from the bytes up:
//! - [`codec`]: PHPMQ v1 frames to and from bytes; pure functions.
//! - [`request`]: typed, validated client requests (and their client-side encoding).
//! - [`hello`]: v1.2's negotiation: versions, the answer to a HELLO, feature lists.
//! - [`refusal`]: v1.2's error codes and how each bad frame or request is answered.
//! - [`id`]: message ids.
//! - [`broker`]: the queue state machine (FIFO queues, consumer rings, holds); no I/O.
//! - [`store`]: the seam where the broker reports changes for persistence.
//! - [`clock`]: the server's time: the wall clock's, measured out by the monotonic clock.
//! - [`hub`]: the one lock around the broker, the registry of connections, and the fan-out.
//! - [`net`]: the one place that names TCP and Unix sockets.
//! - [`outbox`]: a connection's pending output and the thread that writes it.
//! - [`outgoing`]: the frames the server sends and their encoding in each dialect.
//! - [`connection`]: one client's read loop: bytes in, requests to the broker.
//! - [`admin`]: the maintenance console (status, monitor, show, search, flush).
//! - [`server`]: the composition root: binds the listeners, accepts, owns the shared broker
//!   and the shutdown order.
//! - [`fatal`]: why the server must stop on its own.
//! - [`storage`]: the seam between the server and a storage backend ([`storage::Storage`]).
//! - [`persist`]: the SQLite backend: the in-memory store, its mirror to a file, and recovery.
//! - [`logfile`]: a log file that SIGHUP can reopen.
//! - [`memory`]: giving freed memory back to the system.
//! - [`system`]: what `/proc` tells about this process (resident memory, bytes written), how
//!   its threads are scheduled, and its open-file limit.
//! - [`ratelog`]: rate limits for the log lines clients can cause.
//! - [`config`]: the server's settings and listen addresses.
//! - [`client`]: a blocking PHPMQ client for the `phpmq` command line.

// Two calls need `unsafe`, allowed there alone: malloc_trim in `memory`, sched_setscheduler in
// `system`.
#![deny(unsafe_code)]

pub mod admin;
pub mod broker;
pub mod client;
pub mod clock;
pub mod codec;
pub mod config;
pub mod connection;
pub mod fatal;
pub mod hello;
pub mod hub;
pub mod id;
pub mod logfile;
pub mod memory;
pub mod net;
pub mod outbox;
pub mod outgoing;
pub mod persist;
pub mod ratelog;
pub mod refusal;
pub mod request;
pub mod server;
pub mod storage;
pub mod store;
pub mod system;
