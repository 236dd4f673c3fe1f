//! `phpmq-server`: parses flags, sets up logging and signals, and runs the server.

use argh::FromArgs;
use crossbeam_channel::{bounded, Sender};
use log::{error, info, warn, LevelFilter};
use phpmq::config::{self, Config, ListenAddr};
use phpmq::connection;
use phpmq::logfile::LogFile;
use phpmq::server::Server;
use phpmq::system::{self, OpenFileLimit, Scheduling};
use signal_hook::consts::SIGHUP;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// A lightweight, persistent message-queue server speaking the PHPMQ v1 wire protocol.
#[derive(FromArgs)]
// argh prints these comments as `--help`, where `[IPv6]` and `<queue>` are plain text.
#[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
struct Args {
    /// address to listen on, repeatable: HOST:PORT (IPv4), [IPv6]:PORT or unix:/path/to.sock
    /// (default 127.0.0.1:9100)
    #[argh(option, from_str_fn(parse_listen))]
    listen: Vec<ListenAddr>,

    /// maintenance console address, repeatable, same forms as --listen, or "none" alone to
    /// turn the console off (default 127.0.0.1:9101)
    #[argh(option, from_str_fn(parse_admin))]
    admin: Vec<Option<ListenAddr>>,

    /// most clients connected at once, at least 1; more are refused (default 1024)
    #[argh(option, default = "config::DEFAULT_MAX_CONNECTIONS")]
    max_connections: usize,

    /// largest message content a client may send, in bytes, at most 536870912 = 512 MiB;
    /// above 133890048, raise --frame-memory too (default 16777216 = 16 MiB); other packets
    /// have smaller fixed limits
    #[argh(
        option,
        default = "config::DEFAULT_MAX_MESSAGE_SIZE",
        from_str_fn(config::parse_max_message_size)
    )]
    max_message_size: usize,

    /// how long one frame may take to arrive once it has started, in milliseconds, at least 1
    /// (default 30000)
    #[argh(option, default = "config::DEFAULT_FRAME_TIMEOUT.as_millis() as u64")]
    frame_timeout_ms: u64,

    /// close a connection that has never asked to consume after this many milliseconds
    /// without a frame; 0 turns it off (default 0: a v1.0 producer would lose its next
    /// message to a closed connection unnoticed)
    #[argh(option, default = "0")]
    idle_timeout_ms: u64,

    /// close a console session that sends no command for this many milliseconds; 0 turns it
    /// off (default 300000 = 5 minutes)
    #[argh(
        option,
        default = "config::DEFAULT_CONSOLE_IDLE_TIMEOUT.as_millis() as u64"
    )]
    console_idle_timeout_ms: u64,

    /// how long a TCP connection may be silent before the kernel probes it, in milliseconds
    /// (rounded up to whole seconds); a client whose host vanished without closing (powered
    /// off, unplugged) is found gone about twice this after it went silent, and what it held
    /// goes to the other consumers. 0 turns it off (default 60000)
    #[argh(
        option,
        default = "config::DEFAULT_TCP_KEEPALIVE.map_or(0, |d| d.as_millis() as u64)"
    )]
    tcp_keepalive_ms: u64,

    /// the SQLite file that messages are mirrored to, or "none" to keep them in memory only
    /// (default phpmq.sqlite in the working directory)
    #[argh(option, default = "String::from(config::DEFAULT_DB)")]
    db: String,

    /// how often a changed store is mirrored to the file, in milliseconds (default 1000); a
    /// hard crash loses at most the changes of this long plus the time one mirror takes
    #[argh(option, default = "config::DEFAULT_MIRROR_INTERVAL.as_millis() as u64")]
    mirror_interval: u64,

    /// move a message to the queue <queue>.dead once its N-th dispatch ends without an
    /// acknowledgement (PHPMQ v1.2 dead-letter); 0 turns it off (default 0)
    #[argh(option, default = "0")]
    max_deliveries: u32,

    /// the most messages a queue may hold (ready, delayed and in flight); a send to a full
    /// queue is refused: ERROR 429 on a PHPMQ v1.2 connection, a close on a v1.0 or v1.1 one,
    /// which cannot be told otherwise. 0 turns it off (default 0)
    #[argh(option, default = "0")]
    max_queue_length: usize,

    /// the most messages the server holds, all queues together (ready, delayed and in
    /// flight); a send past it is refused as a send to a full queue is. The store lives in
    /// memory: this and --max-stored-bytes bound it. 0 turns it off (default 0)
    #[argh(option, default = "0")]
    max_stored_messages: usize,

    /// the most message content the server holds, in bytes, all queues together; a send that
    /// would go past it is refused as a send to a full queue is. 0 turns it off (default 0)
    #[argh(option, default = "0")]
    max_stored_bytes: u64,

    /// the most memory that messages still arriving may take, all connections together, in
    /// bytes (default 268435456 = 256 MiB; at least twice --max-message-size plus 640 KiB); a
    /// message larger than 256 KiB that does not fit waits, unread, until it does, or until
    /// --frame-timeout-ms ends its connection
    #[argh(option, default = "connection::DEFAULT_FRAME_BUDGET")]
    frame_memory: usize,

    /// write the log to this file instead of stderr (the ready line, and the reason of a start
    /// that fails, go to stderr too); SIGHUP reopens it (for logrotate)
    #[argh(option)]
    log_file: Option<PathBuf>,

    /// log level: error, warn, info, debug or trace (default info)
    #[argh(option, default = "LevelFilter::Info", from_str_fn(parse_level))]
    log_level: LevelFilter,

    /// how the server's threads are scheduled (Linux): batch (default: a thread that a
    /// client wakes does not preempt a running program, and reads more per wake-up) or normal
    #[argh(option, default = "Scheduling::Batch")]
    scheduling: Scheduling,

    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// Values that parse but cannot work, refused before anything is opened: 0 where 0 does not
/// mean "off", an empty path, contradicting options.
fn check_values(args: &Args) -> Result<(), String> {
    if args.max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    if args.frame_timeout_ms == 0 {
        return Err("--frame-timeout-ms must be at least 1 ms".into());
    }
    if args.mirror_interval == 0 {
        return Err("--mirror-interval must be at least 1 ms".into());
    }
    if args.db.is_empty() {
        return Err("--db is empty: give a file's path, or none".into());
    }
    if args.admin.len() > 1 && args.admin.contains(&None) {
        return Err("--admin none turns the console off: it cannot go with an address".into());
    }
    let least_frame_memory = connection::least_frame_budget(args.max_message_size);
    if args.frame_memory < least_frame_memory {
        return Err(format!(
            "--frame-memory must be at least {least_frame_memory} bytes (twice \
             --max-message-size plus 640 KiB), so that the largest message always fits"
        ));
    }
    Ok(())
}

fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    text.parse()
}

fn parse_admin(text: &str) -> Result<Option<ListenAddr>, String> {
    if text == "none" {
        Ok(None)
    } else {
        text.parse().map(Some)
    }
}

fn parse_level(text: &str) -> Result<LevelFilter, String> {
    match text {
        "error" | "warn" | "info" | "debug" | "trace" => text
            .parse()
            .map_err(|_| format!("unknown log level {text:?}")),
        _ => Err(format!(
            "unknown log level {text:?}: use error, warn, info, debug or trace"
        )),
    }
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    if args.version {
        println!("phpmq-server {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let log_file = match init_logging(args.log_level, args.log_file.as_deref()) {
        Ok(log_file) => log_file,
        Err(e) => {
            eprintln!("phpmq-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    // From here a start that fails says why in the log file too: an init script that
    // discards stderr points the operator there.
    let fail = |reason: &dyn std::fmt::Display| {
        eprintln!("phpmq-server: {reason}");
        if args.log_file.is_some() {
            error!("cannot start: {reason}");
        }
        ExitCode::FAILURE
    };
    if let Err(reason) = check_values(&args) {
        return fail(&reason);
    }
    log_panics(log_file.is_some());
    let mut config = Config {
        max_connections: args.max_connections,
        max_message_size: args.max_message_size,
        frame_timeout: Duration::from_millis(args.frame_timeout_ms),
        idle_timeout: (args.idle_timeout_ms > 0)
            .then(|| Duration::from_millis(args.idle_timeout_ms)),
        tcp_keepalive: (args.tcp_keepalive_ms > 0)
            .then(|| Duration::from_millis(args.tcp_keepalive_ms)),
        console_idle_timeout: match args.console_idle_timeout_ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        },
        db: (args.db != "none").then(|| PathBuf::from(&args.db)),
        mirror_interval: Duration::from_millis(args.mirror_interval),
        max_deliveries: args.max_deliveries,
        max_queue_length: args.max_queue_length,
        max_stored_messages: args.max_stored_messages,
        max_stored_bytes: args.max_stored_bytes,
        frame_memory: args.frame_memory,
        ..Config::default()
    };
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    if !args.admin.is_empty() {
        // "none" (alone: see check_values) turns the console off.
        config.admin = args.admin.iter().flatten().cloned().collect();
    }
    // Before storage and the listeners open anything: clients need one descriptor each.
    let open_files = system::raise_open_file_limit();
    match &open_files {
        OpenFileLimit::Raised { from, to } => {
            info!("raised the open-file limit from {from} to {to} (the hard limit)");
        }
        OpenFileLimit::Failed { limit, hard, error } => {
            warn!("cannot raise the open-file limit from {limit} to {hard}: {error}");
        }
        OpenFileLimit::Kept(_) => {}
    }
    if let Some(warning) = system::open_file_warning(config.max_connections, open_files.limit()) {
        warn!("{warning}");
    }
    // Before any thread starts: they all inherit it.
    if let Err(e) = system::set_scheduling(args.scheduling) {
        warn!("cannot set the scheduling to {:?}: {e}", args.scheduling);
    }
    let server = match Server::bind(&config) {
        Ok(server) => server,
        Err(e) => return fail(&e),
    };
    let (shutdown_tx, shutdown_rx) = bounded(1);
    if let Err(e) = watch_signals(shutdown_tx, log_file) {
        return fail(&format_args!("cannot install signal handlers: {e}"));
    }
    let addrs: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
    let db = match server.storage_location() {
        Some(location) => format!("db {location} ({} messages recovered)", server.recovered()),
        None => "db none (memory only)".to_string(),
    };
    let console: Vec<String> = server
        .console_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    let console = if console.is_empty() {
        "console off".to_string()
    } else {
        format!("console {}", console.join(", "))
    };
    // Scripts and tests wait for this line on stderr: keep its form stable.
    let ready = format!("ready; listening on {}; {console}; {db}", addrs.join(", "));
    eprintln!("phpmq-server: {ready}");
    if args.log_file.is_some() {
        info!("{ready}");
    }
    match server.run(shutdown_rx) {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Stderr may be a pipe nobody reads any more (a launcher that read the ready line).
            let _ = writeln!(std::io::stderr(), "phpmq-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, or to `file` (returned, so that SIGHUP can reopen it).
fn init_logging(
    level: LevelFilter,
    file: Option<&std::path::Path>,
) -> Result<Option<LogFile>, String> {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .build();
    // init fails only if a logger is already set, which cannot happen here.
    match file {
        Some(path) => {
            let log = LogFile::open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            let _ = simplelog::WriteLogger::init(level, config, log.clone());
            Ok(Some(log))
        }
        None => {
            let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
            Ok(None)
        }
    }
}

/// Panics go to the log too, with the thread's name: with `--log-file`, stderr (where the
/// default hook writes) is often nobody's. The server survives most panics (a connection's
/// thread ends alone), so the log is where an operator finds them.
fn log_panics(to_file: bool) {
    if !to_file {
        return; // The default hook already writes to stderr, where the log goes.
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        // One line: "thread NAME panicked at FILE:LINE:COL: MESSAGE".
        let what = info.to_string().replace('\n', " ");
        error!("thread {} {what}", thread.name().unwrap_or("unnamed"));
        default(info);
    }));
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once. SIGHUP reopens
/// the log file.
fn watch_signals(shutdown: Sender<()>, log_file: Option<LogFile>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("phpmq-signals".into())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    match &log_file {
                        Some(log) => match log.reopen() {
                            Ok(()) => info!("reopened log file {}", log.path().display()),
                            Err(e) => {
                                // To stderr (the log file is what failed), which may be a
                                // pipe nobody reads any more: `eprintln!` would panic there.
                                let _ = writeln!(
                                    std::io::stderr(),
                                    "phpmq-server: cannot reopen log file {}: {e}",
                                    log.path().display()
                                );
                                error!("cannot reopen log file {}: {e}", log.path().display());
                            }
                        },
                        None => info!("SIGHUP: logging to stderr, nothing to reopen"),
                    }
                    continue;
                }
                received += 1;
                if received == 1 {
                    info!("signal {signal} received, shutting down");
                    let _ = shutdown.try_send(());
                } else {
                    warn!("signal {signal} received again, exiting at once");
                    std::process::exit(130);
                }
            }
        })?;
    Ok(())
}
