//! `phpmq`: the command-line client. Sends, consumes, benchmarks and probes a phpmq server.

mod bench;

use argh::FromArgs;
use phpmq::admin::names;
use phpmq::client::{Client, ClientError, Console};
use phpmq::config::{ListenAddr, DEFAULT_ADMIN, DEFAULT_LISTEN};
use phpmq::hello::{Feature, Features, Version};
use phpmq::request::QueueName;
use std::io::{self, BufRead, Write};
use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The command-line client of the phpmq message-queue server.
#[derive(FromArgs)]
struct Args {
    /// the server's message endpoint: HOST:PORT (a name or an IPv4 address), [IPv6]:PORT or
    /// unix:/path (default 127.0.0.1:9100)
    #[argh(
        option,
        default = "Endpoint::Addr(DEFAULT_LISTEN.parse().expect(\"default parses\"))",
        from_str_fn(parse_endpoint)
    )]
    server: Endpoint,

    /// the server's maintenance console, for status, flush and redrive, in the same forms
    /// (default 127.0.0.1:9101)
    #[argh(
        option,
        default = "Endpoint::Addr(DEFAULT_ADMIN.parse().expect(\"default parses\"))",
        from_str_fn(parse_endpoint)
    )]
    admin: Endpoint,

    /// print the version and exit
    #[argh(switch)]
    version: bool,

    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Send(SendArgs),
    Consume(ConsumeArgs),
    Status(StatusArgs),
    Flush(FlushArgs),
    Redrive(RedriveArgs),
    Ping(PingArgs),
    Bench(bench::BenchArgs),
}

/// Show the server and its queues (through the maintenance console).
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct StatusArgs {
    /// print one JSON document instead of a table
    #[argh(switch)]
    json: bool,
}

/// Drop every message of a queue, ready, delayed and in flight (through the maintenance console).
#[derive(FromArgs)]
#[argh(subcommand, name = "flush")]
struct FlushArgs {
    /// the queue
    #[argh(positional)]
    queue: Option<String>,

    /// flush every queue
    #[argh(switch)]
    all: bool,
}

/// Move the waiting messages of QUEUE.dead back to the tail of QUEUE, ids kept and delivery
/// counts reset (through the maintenance console).
#[derive(FromArgs)]
#[argh(subcommand, name = "redrive")]
struct RedriveArgs {
    /// the queue whose dead letters go back
    #[argh(positional)]
    queue: String,
}

/// Send messages: one per TEXT, or one per line of standard input when there is none. Waits
/// for the server's receipt for each (PHPMQ v1.2) and exits 0 only if every message got one.
#[derive(FromArgs)]
#[argh(subcommand, name = "send")]
struct SendArgs {
    /// the queue
    #[argh(positional)]
    queue: String,

    /// message texts
    #[argh(positional)]
    texts: Vec<String>,

    /// seconds until the messages expire (0: never)
    #[argh(option)]
    ttl: Option<u64>,

    /// milliseconds before the messages may be dispatched (0: at once)
    #[argh(option)]
    delay: Option<u64>,

    /// wait until each message is in the server's database file, synced to disk
    #[argh(switch)]
    durable: bool,

    /// print each message's id, in order, as its receipt arrives
    #[argh(switch)]
    ids: bool,

    /// give up after this many seconds without a reply from the server (default: wait
    /// forever; a durable receipt waits for the disk, which may be failing)
    #[argh(option)]
    timeout: Option<u64>,
}

/// Consume messages: print each one on a line of its own, acknowledge it, and exit after
/// --count messages.
#[derive(FromArgs)]
#[argh(subcommand, name = "consume")]
struct ConsumeArgs {
    /// the queue
    #[argh(positional)]
    queue: String,

    /// how many messages to consume before exiting (default 1)
    #[argh(option, default = "1")]
    count: u64,

    /// how many unacknowledged messages to hold at once (default 16, or 1 with a lease)
    #[argh(option)]
    prefetch: Option<u64>,

    /// give up after this many seconds without a message (default: wait forever)
    #[argh(option)]
    timeout: Option<u64>,

    /// milliseconds a message may be held unacknowledged before the server takes it back
    /// (PHPMQ v1.2 lease; default: held until acknowledged). A message whose lease runs out
    /// before it is printed comes back, and may be printed again
    #[argh(option)]
    lease: Option<u64>,

    /// print each message's id and delivery count before its text
    #[argh(switch)]
    verbose: bool,
}

/// Measure round trips (send, dispatch, ack) on a private queue; prints one summary line.
#[derive(FromArgs)]
#[argh(subcommand, name = "ping")]
struct PingArgs {
    /// how many round trips (default 1000)
    #[argh(option, default = "1000")]
    count: usize,

    /// pause between round trips, in milliseconds (default 1)
    #[argh(option, default = "1")]
    interval_ms: u64,
}

/// Where a command connects: an address as the server takes it, or a host name and port
/// (`localhost:9100`) looked up when connecting, so that a name that does not resolve (the
/// resolver may be down for a moment) is a failure at run time, not a usage error.
#[derive(Debug)]
enum Endpoint {
    Addr(ListenAddr),
    Host(String),
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    text.parse()
        .map(Endpoint::Addr)
        .or_else(|not_an_address| match text.rsplit_once(':') {
            Some((host, port))
                if !text.starts_with("unix:")
                    && !host.is_empty()
                    && port.parse::<u16>().is_ok() =>
            {
                Ok(Endpoint::Host(text.to_string()))
            }
            _ => Err(not_an_address),
        })
}

impl Endpoint {
    /// The address to connect to: a host name's first one.
    fn resolve(&self) -> Result<ListenAddr, CliError> {
        match self {
            Endpoint::Addr(addr) => Ok(addr.clone()),
            Endpoint::Host(text) => text
                .to_socket_addrs()
                .map_err(|e| CliError::Resolve(format!("cannot resolve {text:?}: {e}")))?
                .next()
                .map(ListenAddr::Tcp)
                .ok_or_else(|| CliError::Resolve(format!("{text:?} resolves to no address"))),
        }
    }
}

/// The exit status of a command line that does not parse, or asks for what cannot be: as
/// for `phpmq` without a command, apart from the 1 of a failure at run time.
const USAGE_EXIT: u8 = 2;

/// The command line, or the exit `argh` would make, with [`USAGE_EXIT`] for a usage error.
fn parse_args() -> Result<Args, ExitCode> {
    let strings: Vec<String> = std::env::args().collect();
    let name = strings
        .first()
        .and_then(|path| std::path::Path::new(path).file_name())
        .and_then(|name| name.to_str())
        .unwrap_or("phpmq");
    let rest: Vec<&str> = strings.iter().skip(1).map(String::as_str).collect();
    Args::from_args(&[name], &rest).map_err(|exit| match exit.status {
        Ok(()) => {
            print!("{}", exit.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            eprintln!("{}\nRun {name} --help for more information.", exit.output);
            ExitCode::from(USAGE_EXIT)
        }
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    if args.version {
        println!("phpmq {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(command) = args.command else {
        eprintln!("phpmq: no command given; see phpmq --help");
        return ExitCode::from(USAGE_EXIT);
    };
    let console = matches!(
        command,
        Command::Status(_) | Command::Flush(_) | Command::Redrive(_)
    );
    let endpoint = if console { &args.admin } else { &args.server };
    let result = endpoint.resolve().and_then(|addr| match command {
        Command::Send(cmd) => send(&addr, cmd),
        Command::Consume(cmd) => consume(&addr, cmd),
        Command::Status(cmd) => status(&addr, cmd),
        Command::Flush(cmd) => flush(&addr, cmd),
        Command::Redrive(cmd) => redrive(&addr, cmd),
        Command::Ping(cmd) => ping(&addr, cmd),
        Command::Bench(cmd) => bench::run(&addr, cmd),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phpmq: {e}");
            // A bad queue name is found before anything is sent, as a bad option is.
            if matches!(e, CliError::Usage(_) | CliError::BadQueue(_)) {
                ExitCode::from(USAGE_EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Debug)]
enum CliError {
    Client(ClientError),
    Stdin(io::Error),
    Stdout(io::Error),
    Timeout(u64),
    Usage(&'static str),
    /// A queue name the server would refuse.
    BadQueue(String),
    /// A host name that does not resolve.
    Resolve(String),
    /// The server is older than PHPMQ v1.2 and an option needs it.
    NoV12(&'static str),
    /// Some messages got an ERROR instead of a receipt (each one was reported).
    Refused {
        refused: usize,
        sent: usize,
    },
    /// `send --durable` (or `bench --durable`, as named) to a server without a file.
    NotDurable(&'static str),
    /// `bench` timed out before every message arrived.
    BenchIncomplete,
    /// Something accepted the connection but did not answer a HELLO.
    NoAnswer(String),
    /// `send --timeout`: no reply within this many seconds.
    NoReply(u64),
    /// `send` stopped before the end of its input: how far it got.
    Stopped {
        error: Box<CliError>,
        /// Messages with a receipt.
        received: usize,
        refused: usize,
        /// Messages written (or about to be) to the server.
        sent: usize,
    },
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Client(e) => write!(f, "{e}"),
            CliError::Stdin(e) => write!(f, "cannot read standard input: {e}"),
            // `phpmq consume | head -1`: the reader is gone, which is no system error.
            CliError::Stdout(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                f.write_str("standard output was closed")
            }
            CliError::Stdout(e) => write!(f, "cannot write standard output: {e}"),
            CliError::Timeout(s) => write!(f, "no message within {s} s"),
            CliError::Usage(u) => write!(f, "usage: {u}"),
            CliError::BadQueue(problem) | CliError::Resolve(problem) => f.write_str(problem),
            CliError::NoV12(what) => {
                write!(f, "{what} needs a server that speaks PHPMQ v1.2")
            }
            CliError::Refused { refused, sent } => {
                write!(f, "{refused} of {sent} messages were refused")
            }
            CliError::NoReply(s) => write!(f, "no reply from the server within {s} s"),
            CliError::NoAnswer(addr) => write!(
                f,
                "{addr} accepted the connection but sent no answer within {} s: is it a phpmq server?",
                HELLO_TIMEOUT.as_secs()
            ),
            CliError::NotDurable(what) => write!(
                f,
                "{what}: this server keeps no file (--db none): nothing is durable"
            ),
            CliError::BenchIncomplete => {
                f.write_str("phpmq bench: timed out before every message arrived")
            }
            CliError::Stopped {
                error,
                received,
                refused,
                sent,
            } => {
                write!(f, "{error}; stopped after {}", messages(*received))?;
                f.write_str(" with a receipt")?;
                if *refused > 0 {
                    write!(f, " and {refused} refused")?;
                }
                let unanswered = sent - received - refused;
                if unanswered > 0 {
                    write!(f, ", {unanswered} more sent without an answer (taken or not)")?;
                }
                f.write_str("; the rest of the input was not sent")
            }
        }
    }
}

/// "1 message", "2 messages".
fn messages(n: usize) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

/// A queue name nobody else uses.
fn private_queue(purpose: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("phpmq-{purpose}-{}-{nanos}", std::process::id())
}

/// Returns once the server has handled everything sent so far on this connection: it handles a
/// connection's frames in order, so a message to a private queue coming back proves it.
fn confirm(client: &mut Client) -> Result<(), ClientError> {
    let queue = private_queue("confirm");
    client.send(&queue, b"", None)?;
    client.consume(&queue, 1)?;
    loop {
        let d = client.recv()?;
        if d.queue == queue {
            client.ack(&queue, &d.id)?;
            client.consume(&queue, 0)?;
            return client.flush();
        }
    }
}

/// How long a client waits for the answer to its HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `send` waits for the replies still unread once a write failed.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// Receipts a sender may wait for at once: enough to keep the connection busy, few enough
/// that neither side buffers much.
const SEND_WINDOW: usize = 1024;

/// Opens a v1.2 connection wanting `features`; `None` if the server is older (it closes the
/// connection on a HELLO, or answers with an older version).
fn connect_v12(
    server: &ListenAddr,
    features: &str,
) -> Result<Option<(Client, Features)>, CliError> {
    let mut client = Client::connect(server)?;
    // A server answers a HELLO at once; whatever accepted the connection and says nothing
    // is not one, and must not hold a script for good.
    client.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let answer = client.hello(features);
    client.set_read_timeout(None)?;
    match answer {
        Err(e) if e.is_timeout() => Err(CliError::NoAnswer(server.to_string())),
        Ok((version, served)) if version >= Version::V1_2 => Ok(Some((client, served))),
        Ok(_) | Err(ClientError::Closed | ClientError::Io(_) | ClientError::Refused { .. }) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// What `phpmq send` sends: its TEXT arguments, or the lines of standard input, as bytes
/// (a line is any bytes up to a newline; a CR before it is dropped).
enum Texts {
    Args(std::vec::IntoIter<String>),
    Stdin(io::BufReader<io::Stdin>),
}

impl Texts {
    fn of(texts: Vec<String>) -> Texts {
        if texts.is_empty() {
            Texts::Stdin(io::BufReader::with_capacity(64 << 10, io::stdin()))
        } else {
            Texts::Args(texts.into_iter())
        }
    }

    fn next(&mut self) -> Option<Result<Vec<u8>, CliError>> {
        match self {
            Texts::Args(texts) => texts.next().map(|t| Ok(t.into_bytes())),
            Texts::Stdin(input) => {
                let mut line = Vec::new();
                match input.read_until(b'\n', &mut line) {
                    Ok(0) => None,
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                            if line.last() == Some(&b'\r') {
                                line.pop();
                            }
                        }
                        Some(Ok(line))
                    }
                    Err(e) => Some(Err(CliError::Stdin(e))),
                }
            }
        }
    }

    /// Whether the next line must wait for standard input: what was read so far should then
    /// reach the server first (`tail -f log | phpmq send q` sends each line as it comes).
    fn would_wait(&self) -> bool {
        match self {
            Texts::Args(_) => false,
            Texts::Stdin(input) => input.buffer().is_empty(),
        }
    }
}

fn send(server: &ListenAddr, cmd: SendArgs) -> Result<(), CliError> {
    valid_queue(&cmd.queue)?;
    if cmd.timeout == Some(0) {
        return Err(CliError::Usage(
            "phpmq send --timeout SECONDS: at least 1 (or no --timeout, to wait forever)",
        ));
    }
    let mut texts = Texts::of(cmd.texts);
    let features = if cmd.durable { "durable" } else { "" };
    let Some((mut client, served)) = connect_v12(server, features)? else {
        if cmd.durable || cmd.ids || cmd.delay.is_some() {
            return Err(CliError::NoV12("--durable, --ids or --delay"));
        }
        // A v1 server: no receipts, so a barrier proves it took everything.
        let mut client = Client::connect(server)?;
        while let Some(text) = texts.next() {
            client.send(&cmd.queue, &text?, cmd.ttl)?;
            if texts.would_wait() {
                client.flush()?;
            }
        }
        return Ok(confirm(&mut client)?);
    };
    if cmd.durable && !served.contains(Feature::Durable) {
        return Err(CliError::NotDurable("send --durable"));
    }
    client.set_read_timeout(cmd.timeout.map(Duration::from_secs))?;
    let mut replies = Replies {
        out: io::stdout().lock(),
        print_ids: cmd.ids,
        answered: 0,
        refused: 0,
    };
    let mut sent = 0;
    let sent_all = (|| {
        while let Some(text) = texts.next() {
            let text = text?;
            // Counted before the write, which may fail on this very message (a 413 closes).
            sent += 1;
            client.send_v12(&cmd.queue, &text, cmd.ttl, cmd.delay)?;
            if sent - replies.answered >= SEND_WINDOW {
                replies.take(&mut client)?;
            }
            if texts.would_wait() {
                // Everything read so far is answered before the wait for more input.
                while replies.answered < sent {
                    replies.take(&mut client)?;
                }
            }
        }
        while replies.answered < sent {
            replies.take(&mut client)?;
        }
        Ok(())
    })();
    if let Err(mut error) = sent_all {
        if matches!(&error, CliError::Client(e) if e.is_timeout()) {
            error = CliError::NoReply(cmd.timeout.unwrap_or_default());
        }
        // A failed write: the server may have said why it closed (a 413, a 503), after
        // replies still unread.
        if matches!(error, CliError::Client(ClientError::Io(_)))
            && client.set_read_timeout(Some(REPLY_GRACE)).is_ok()
        {
            while replies.answered < sent && replies.take(&mut client).is_ok() {}
        }
        return Err(CliError::Stopped {
            error: Box::new(error),
            received: replies.answered - replies.refused,
            refused: replies.refused,
            sent,
        });
    }
    match replies.refused {
        0 => Ok(()),
        refused => Err(CliError::Refused { refused, sent }),
    }
}

/// The replies to `phpmq send`'s messages, in order.
struct Replies<W: Write> {
    out: W,
    print_ids: bool,
    answered: usize,
    refused: usize,
}

impl<W: Write> Replies<W> {
    /// Waits for the next reply: prints the id of a receipt (with --ids), reports a refusal.
    fn take(&mut self, client: &mut Client) -> Result<(), CliError> {
        let reply = client.recv_receipt()?;
        self.answered += 1;
        match reply {
            Ok(id) if self.print_ids => writeln!(self.out, "{id}").map_err(CliError::Stdout),
            Ok(_) => Ok(()),
            Err(refusal) => {
                eprintln!("phpmq send: message {}: {refusal}", self.answered);
                self.refused += 1;
                Ok(())
            }
        }
    }
}

/// A queue name the server would take, checked before connecting: a v1.0 connection is closed
/// without a word for a bad one.
fn valid_queue(name: &str) -> Result<(), CliError> {
    QueueName::new(name.as_bytes())
        .map(drop)
        .map_err(|e| CliError::BadQueue(format!("{e}: {name:?}")))
}

/// The default --prefetch: with a lease, one message at a time, since a prefetched message's
/// lease runs while the ones before it are printed (to a pipe that may be slow).
const PREFETCH: u64 = 16;
const LEASED_PREFETCH: u64 = 1;

fn consume(server: &ListenAddr, cmd: ConsumeArgs) -> Result<(), CliError> {
    valid_queue(&cmd.queue)?;
    if cmd.timeout == Some(0) {
        return Err(CliError::Usage(
            "phpmq consume --timeout SECONDS: at least 1 (or no --timeout, to wait forever)",
        ));
    }
    // v1.2 for a lease or the delivery count; plain v1 otherwise, as every server speaks it.
    let mut client = if cmd.lease.is_some() || cmd.verbose {
        match connect_v12(server, "")? {
            Some((client, _)) => client,
            None if cmd.lease.is_some() => return Err(CliError::NoV12("--lease")),
            None => Client::connect(server)?,
        }
    } else {
        Client::connect(server)?
    };
    client.set_read_timeout(cmd.timeout.map(Duration::from_secs))?;
    let default_prefetch = match cmd.lease {
        Some(lease) if lease > 0 => LEASED_PREFETCH,
        _ => PREFETCH,
    };
    let prefetch = cmd.prefetch.unwrap_or(default_prefetch).max(1);
    let mut asked = prefetch.min(cmd.count);
    let ask = |client: &mut Client, count: u64| match cmd.lease {
        Some(lease) => client.consume_leased(&cmd.queue, count, lease),
        None => client.consume(&cmd.queue, count),
    };
    ask(&mut client, asked)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    for done in 0..cmd.count {
        let d = match client.recv() {
            Ok(d) => d,
            Err(e) if e.is_timeout() => {
                return Err(CliError::Timeout(cmd.timeout.unwrap_or_default()));
            }
            Err(e) => return Err(e.into()),
        };
        if cmd.verbose {
            let deliveries = d.deliveries.map_or_else(|| "?".into(), |n| n.to_string());
            write!(out, "{} {deliveries} ", d.id).map_err(CliError::Stdout)?;
        }
        out.write_all(&d.content).map_err(CliError::Stdout)?;
        out.write_all(b"\n").map_err(CliError::Stdout)?;
        out.flush().map_err(CliError::Stdout)?;
        // Never hold more than is left to take: what we held would only go back, counted as
        // a failed delivery. The lower count goes first, so that the ack's room is not
        // filled by a message this run will not take.
        let left = cmd.count - done - 1;
        if left < asked {
            asked = left;
            ask(&mut client, asked)?;
        }
        client.ack(&cmd.queue, &d.id)?;
    }
    client.flush()?;
    Ok(())
}

fn status(admin: &ListenAddr, cmd: StatusArgs) -> Result<(), CliError> {
    let mut console = Console::connect(admin)?;
    let reply = console.command(if cmd.json { "status json" } else { "status" })?;
    print!("{reply}");
    let _ = console.command("quit");
    Ok(())
}

fn flush(admin: &ListenAddr, cmd: FlushArgs) -> Result<(), CliError> {
    let line = match (&cmd.queue, cmd.all) {
        // Quoted when needed, so that a name with a trailing space or a control character
        // reaches the console as it is.
        (Some(queue), false) => format!("flush {}", names::display(queue)),
        (None, true) => "flushall".to_string(),
        _ => return Err(CliError::Usage("phpmq flush QUEUE | phpmq flush --all")),
    };
    let mut console = Console::connect(admin)?;
    print!("{}", console.command(&line)?);
    Ok(())
}

fn redrive(admin: &ListenAddr, cmd: RedriveArgs) -> Result<(), CliError> {
    let mut console = Console::connect(admin)?;
    // Quoted when needed, as for flush.
    let line = format!("redrive {}", names::display(&cmd.queue));
    print!("{}", console.command(&line)?);
    Ok(())
}

fn ping(server: &ListenAddr, cmd: PingArgs) -> Result<(), CliError> {
    let mut client = Client::connect(server)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let queue = private_queue("ping");
    client.consume(&queue, 1)?;
    let mut rtts = Vec::with_capacity(cmd.count);
    for _ in 0..cmd.count {
        let started = Instant::now();
        client.send(&queue, b"ping", None)?;
        let d = client.recv()?;
        rtts.push(started.elapsed());
        client.ack(&queue, &d.id)?;
        client.flush()?;
        if cmd.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(cmd.interval_ms));
        }
    }
    client.consume(&queue, 0)?;
    client.flush()?;
    rtts.sort();
    let at = |q: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * q).round() as usize)
            .map(|d| d.as_micros())
            .unwrap_or_default()
    };
    println!(
        "pings={} min_us={} p50_us={} p99_us={} p999_us={} max_us={}",
        rtts.len(),
        at(0.0),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
    Ok(())
}
