//! `phpmq`: the command-line client. Sends, consumes, benchmarks and probes a phpmq server.

mod bench;

use argh::FromArgs;
use phpmq::admin::names;
use phpmq::client::{Client, ClientError, Console};
use phpmq::config::{ListenAddr, DEFAULT_ADMIN, DEFAULT_LISTEN};
use phpmq::hello::{Feature, Features, Version};
use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The command-line client of the phpmq message-queue server.
#[derive(FromArgs)]
struct Args {
    /// the server's message endpoint: HOST:PORT, [IPv6]:PORT or unix:/path (default
    /// 127.0.0.1:9100)
    #[argh(
        option,
        default = "DEFAULT_LISTEN.parse().expect(\"default parses\")",
        from_str_fn(parse_addr)
    )]
    server: ListenAddr,

    /// the server's maintenance console, for status, flush and redrive (default 127.0.0.1:9101)
    #[argh(
        option,
        default = "DEFAULT_ADMIN.parse().expect(\"default parses\")",
        from_str_fn(parse_addr)
    )]
    admin: ListenAddr,

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

    /// how many unacknowledged messages to hold at once (default 16)
    #[argh(option, default = "16")]
    prefetch: u64,

    /// give up after this many seconds without a message (default: wait forever)
    #[argh(option)]
    timeout: Option<u64>,

    /// milliseconds a message may be held unacknowledged before the server takes it back
    /// (PHPMQ v1.2 lease; default: held until acknowledged)
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

fn parse_addr(text: &str) -> Result<ListenAddr, String> {
    text.parse()
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    if args.version {
        println!("phpmq {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(command) = args.command else {
        eprintln!("phpmq: no command given; see phpmq --help");
        return ExitCode::from(2);
    };
    let result = match command {
        Command::Send(cmd) => send(&args.server, cmd),
        Command::Consume(cmd) => consume(&args.server, cmd),
        Command::Status(cmd) => status(&args.admin, cmd),
        Command::Flush(cmd) => flush(&args.admin, cmd),
        Command::Redrive(cmd) => redrive(&args.admin, cmd),
        Command::Ping(cmd) => ping(&args.server, cmd),
        Command::Bench(cmd) => bench::run(&args.server, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phpmq: {e}");
            ExitCode::FAILURE
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
    /// The server is older than PHPMQ v1.2 and an option needs it.
    NoV12(&'static str),
    /// Some messages got an ERROR instead of a receipt (each one was reported).
    Refused {
        refused: usize,
        sent: usize,
    },
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Client(e) => write!(f, "{e}"),
            CliError::Stdin(e) => write!(f, "cannot read standard input: {e}"),
            CliError::Stdout(e) => write!(f, "cannot write standard output: {e}"),
            CliError::Timeout(s) => write!(f, "no message within {s} s"),
            CliError::Usage(u) => write!(f, "usage: {u}"),
            CliError::NoV12(what) => {
                write!(f, "{what} needs a server that speaks PHPMQ v1.2")
            }
            CliError::Refused { refused, sent } => {
                write!(f, "{refused} of {sent} messages were refused")
            }
        }
    }
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
    match client.hello(features) {
        Ok((version, served)) if version >= Version::V1_2 => Ok(Some((client, served))),
        Ok(_) | Err(ClientError::Closed | ClientError::Io(_) | ClientError::Refused { .. }) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn send(server: &ListenAddr, cmd: SendArgs) -> Result<(), CliError> {
    let texts: Box<dyn Iterator<Item = Result<Vec<u8>, CliError>>> = if cmd.texts.is_empty() {
        Box::new(
            io::stdin()
                .lock()
                .lines()
                .map(|line| line.map(String::into_bytes).map_err(CliError::Stdin)),
        )
    } else {
        Box::new(cmd.texts.iter().map(|t| Ok(t.clone().into_bytes())))
    };
    let features = if cmd.durable { "durable" } else { "" };
    let Some((mut client, served)) = connect_v12(server, features)? else {
        if cmd.durable || cmd.ids || cmd.delay.is_some() {
            return Err(CliError::NoV12("--durable, --ids or --delay"));
        }
        // A v1 server: no receipts, so a barrier proves it took everything.
        let mut client = Client::connect(server)?;
        for text in texts {
            client.send(&cmd.queue, &text?, cmd.ttl)?;
        }
        return Ok(confirm(&mut client)?);
    };
    if cmd.durable && !served.contains(Feature::Durable) {
        return Err(CliError::Usage(
            "phpmq send --durable: this server keeps no file (--db none): nothing is durable",
        ));
    }
    let mut replies = Replies {
        out: io::stdout().lock(),
        print_ids: cmd.ids,
        answered: 0,
        refused: 0,
    };
    let mut sent = 0;
    for text in texts {
        client.send_v12(&cmd.queue, &text?, cmd.ttl, cmd.delay)?;
        sent += 1;
        if sent - replies.answered >= SEND_WINDOW {
            replies.take(&mut client)?;
        }
    }
    while replies.answered < sent {
        replies.take(&mut client)?;
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
        self.answered += 1;
        match client.recv_receipt()? {
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

fn consume(server: &ListenAddr, cmd: ConsumeArgs) -> Result<(), CliError> {
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
    let prefetch = cmd.prefetch.max(1);
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
        client.ack(&cmd.queue, &d.id)?;
        // Never hold more than is left to take: what we held would only go back.
        let left = cmd.count - done - 1;
        if left < asked {
            asked = left;
            ask(&mut client, asked)?;
        }
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
