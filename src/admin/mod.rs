//! The maintenance console: a line-based text protocol on its own listeners, for people (with
//! `nc` or `telnet`) and for the `phpmq` command line.
//!
//! Every reply ends with the prompt `phpmq> `, so a program reads up to it. Replies that report
//! a failure start with `error: `. Commands run against a [`Backend`], so they are tested
//! without sockets. Queue names are shown and read back as [`names`] says. A session that gives
//! no command for the console idle timeout is closed, and a client beyond the session limit is
//! told so before it is closed.

mod json;
pub mod names;
mod render;

pub use json::status_json;
pub use render::{status_text, status_text_at_most};

use crate::broker::{Listing, QueueStatus, StoreUse, Totals};
use crate::hub::BrokerDown;
use crate::net::Stream;
use crate::request::QueueName;
use crate::storage::StorageStatus;
use crate::store::Millis;
use log::{debug, info};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What every reply ends with.
pub const PROMPT: &str = "phpmq> ";
/// Rows `show` lists at most.
pub const SHOW_LIMIT: usize = 50;
/// The longest command line accepted.
const MAX_LINE: usize = 4096;
/// How often a waiting session looks up to see whether the server is stopping.
const POLL: Duration = Duration::from_millis(500);
/// How long a reply may wait for a client that does not read: past it the session ends, so
/// that it gives its place back (sessions are few) and the shutdown does not wait for it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `monitor` redraws.
const MONITOR_INTERVAL: Duration = Duration::from_millis(500);
/// The most queues a `monitor` screen lists (by name); `status` lists them all.
const MONITOR_ROWS: usize = 1000;

/// A snapshot of the whole server.
#[derive(Clone, Debug)]
pub struct Status {
    pub version: &'static str,
    pub uptime: Duration,
    pub connections: usize,
    pub rss_bytes: Option<u64>,
    pub totals: Totals,
    /// What all queues hold together, and the server-wide limits on it.
    pub store: StoreUse,
    pub queues: Vec<QueueStatus>,
    /// How storage has been doing (`None` when messages are kept in memory only).
    pub storage: Option<StorageStatus>,
    /// When the snapshot was taken.
    pub now: Millis,
}

/// What the console needs from the server.
pub trait Backend: Send + Sync {
    fn status(&self) -> Result<Status, BrokerDown>;
    fn list_messages(&self, queue: &str, limit: usize) -> Result<Option<Listing>, BrokerDown>;
    fn queue_names(&self) -> Result<Vec<QueueName>, BrokerDown>;
    /// Flushes one queue (`None` if it does not exist).
    fn flush(&self, queue: &str) -> Result<Option<usize>, BrokerDown>;
    /// Flushes every queue: (messages, queues).
    fn flush_all(&self) -> Result<(usize, usize), BrokerDown>;
    /// Moves the waiting messages of `<queue>.dead` back to `queue`: how many.
    fn redrive(&self, queue: &QueueName) -> Result<usize, BrokerDown>;
    fn stopping(&self) -> bool;
    /// A status for `monitor`, which redraws on a timer: a server may share one snapshot
    /// between sessions ([`SharedSnapshot`]).
    fn monitor_status(&self) -> Result<Arc<Status>, BrokerDown> {
        self.status().map(Arc::new)
    }
}

/// One status snapshot shared by every `monitor`: however many sessions watch, the broker is
/// looked at once per redraw (`MONITOR_INTERVAL`) at most, and less often when a look is costly (a
/// million queues): a tenth of the time at most goes to looking. Message traffic never waits
/// for more monitors.
#[derive(Default)]
pub struct SharedSnapshot(Mutex<Option<Snapshot>>);

struct Snapshot {
    taken: Instant,
    cost: Duration,
    status: Arc<Status>,
}

impl SharedSnapshot {
    /// The last snapshot if it is recent enough, else a new one from `take`. Sessions asking
    /// meanwhile wait for it rather than take their own.
    pub fn get(
        &self,
        take: impl FnOnce() -> Result<Status, BrokerDown>,
    ) -> Result<Arc<Status>, BrokerDown> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = slot.as_ref() {
            if last.taken.elapsed() < MONITOR_INTERVAL.max(last.cost * 10) {
                return Ok(last.status.clone());
            }
        }
        let started = Instant::now();
        let status = Arc::new(take()?);
        *slot = Some(Snapshot {
            taken: Instant::now(),
            cost: started.elapsed(),
            status: status.clone(),
        });
        Ok(status)
    }
}

/// What a command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Text(String),
    Monitor,
    Quit,
}

struct CommandHelp {
    name: &'static str,
    usage: &'static str,
    summary: &'static str,
}

const COMMANDS: &[CommandHelp] = &[
    CommandHelp {
        name: "help",
        usage: "help [COMMAND]",
        summary: "list the commands, or explain one",
    },
    CommandHelp {
        name: "status",
        usage: "status [json]",
        summary: "the server and a table of its queues; 'status json' prints one JSON document",
    },
    CommandHelp {
        name: "monitor",
        usage: "monitor",
        summary: "the status, redrawn twice a second until you type q and Enter",
    },
    CommandHelp {
        name: "show",
        usage: "show QUEUE",
        summary: "the first messages of a queue: position, id, size, age, ready, delayed or in flight; \
                  QUEUE as status shows it (\"jobs \" quoted)",
    },
    CommandHelp {
        name: "search",
        usage: "search PATTERN",
        summary: "queue names matching PATTERN, * matching anything, case-insensitive",
    },
    CommandHelp {
        name: "flush",
        usage: "flush QUEUE",
        summary:
            "drop every message of a queue, ready, delayed and in flight (later acks for those are ignored)",
    },
    CommandHelp {
        name: "flushall",
        usage: "flushall",
        summary: "flush every queue",
    },
    CommandHelp {
        name: "redrive",
        usage: "redrive QUEUE",
        summary: "move the waiting messages of QUEUE.dead back to the tail of QUEUE, ids kept \
                  and delivery counts reset (messages in flight there stay)",
    },
    CommandHelp {
        name: "clear",
        usage: "clear",
        summary: "clear the screen",
    },
    CommandHelp {
        name: "quit",
        usage: "quit | exit",
        summary: "close this console",
    },
];

fn help(topic: Option<&str>) -> String {
    match topic {
        None => {
            let mut out = String::from("commands:\n");
            for c in COMMANDS {
                out.push_str(&format!("  {:<16} {}\n", c.usage, c.summary));
            }
            out
        }
        Some(topic) => match COMMANDS
            .iter()
            .find(|c| c.name == topic || (topic == "exit" && c.name == "quit"))
        {
            Some(c) => format!("{}\n  {}\n", c.usage, c.summary),
            None => format!("error: no command {topic:?}; type help for the list\n"),
        },
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters; case-insensitive.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.to_lowercase().chars().collect();
    let name: Vec<char> = name.to_lowercase().chars().collect();
    // Greedy matching with backtracking to the last star: linear in practice.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Runs one command line.
pub fn execute(line: &str, backend: &dyn Backend) -> Reply {
    let line = line.trim();
    let (command, rest) = match line.split_once(char::is_whitespace) {
        Some((command, rest)) => (command, rest.trim()),
        None => (line, ""),
    };
    let down = |e: BrokerDown| Reply::Text(format!("error: {e}\n"));
    let syntax = |e: names::NameSyntax| Reply::Text(format!("error: {e}\n"));
    let no_queue = |queue: &str| Reply::Text(format!("error: no queue named {queue:?}\n"));
    match (command.to_lowercase().as_str(), rest) {
        ("", _) => Reply::Text(String::new()),
        ("help", topic) => Reply::Text(help((!topic.is_empty()).then_some(topic))),
        ("status", "") => match backend.status() {
            Ok(status) => Reply::Text(status_text(&status)),
            Err(e) => down(e),
        },
        ("status", "json") => match backend.status() {
            Ok(status) => match status_json(&status) {
                Ok(json) => Reply::Text(json + "\n"),
                Err(e) => Reply::Text(format!("error: {e}\n")),
            },
            Err(e) => down(e),
        },
        ("monitor", "") => Reply::Monitor,
        ("show", "") => Reply::Text("error: usage: show QUEUE\n".into()),
        ("show", arg) => match names::parse(arg) {
            Err(e) => syntax(e),
            Ok(queue) => match backend.list_messages(&queue, SHOW_LIMIT) {
                Ok(Some(listing)) => Reply::Text(render::listing_text(&queue, &listing)),
                Ok(None) => no_queue(&queue),
                Err(e) => down(e),
            },
        },
        ("search", "") => Reply::Text("error: usage: search PATTERN\n".into()),
        ("search", arg) => match names::parse(arg) {
            Err(e) => syntax(e),
            Ok(pattern) => match backend.queue_names() {
                Ok(all) => {
                    let found: Vec<&QueueName> = all
                        .iter()
                        .filter(|n| wildcard_match(&pattern, n.as_str()))
                        .collect();
                    let mut out: String = found
                        .iter()
                        .map(|n| format!("{}\n", names::display(n.as_str())))
                        .collect();
                    out.push_str(&format!(
                        "({} queue{} matching {pattern:?})\n",
                        found.len(),
                        if found.len() == 1 { "" } else { "s" }
                    ));
                    Reply::Text(out)
                }
                Err(e) => down(e),
            },
        },
        ("flush", "") => Reply::Text("error: usage: flush QUEUE\n".into()),
        ("flush", arg) => match names::parse(arg) {
            Err(e) => syntax(e),
            Ok(queue) => match backend.flush(&queue) {
                Ok(Some(n)) => {
                    let shown = names::display(&queue);
                    let n = render::counted(n as u64, "message");
                    info!("console: flushed {n} from {shown}");
                    Reply::Text(format!("flushed {n} from {shown}\n"))
                }
                Ok(None) => no_queue(&queue),
                Err(e) => down(e),
            },
        },
        ("flushall", "") => match backend.flush_all() {
            Ok((messages, queues)) => {
                let messages = render::counted(messages as u64, "message");
                let queues = render::counted(queues as u64, "queue");
                info!("console: flushed {messages} from {queues}");
                Reply::Text(format!("flushed {messages} from {queues}\n"))
            }
            Err(e) => down(e),
        },
        ("redrive", "") => Reply::Text("error: usage: redrive QUEUE\n".into()),
        ("redrive", arg) => match names::parse(arg).map(|q| QueueName::new(q.as_bytes())) {
            Err(e) => syntax(e),
            Ok(Err(e)) => Reply::Text(format!("error: {e}\n")),
            Ok(Ok(queue)) => match crate::broker::dead_queue_name(queue.as_str()) {
                // A dead-letter queue has none of its own: the user meant the queue it serves.
                None => Reply::Text(format!(
                    "error: {} is a dead-letter queue; to move its messages back, redrive the \
                     queue they came from\n",
                    names::display(queue.as_str())
                )),
                Some(dead) => match backend.redrive(&queue) {
                    Ok(n) => {
                        let shown = names::display(queue.as_str());
                        let dead = names::display(dead.as_str());
                        let n = render::counted(n as u64, "message");
                        info!("console: redrove {n} from {dead} to {shown}");
                        Reply::Text(format!("redrove {n} from {dead} to {shown}\n"))
                    }
                    Err(e) => down(e),
                },
            },
        },
        ("clear", "") => Reply::Text("\x1b[2J\x1b[H".into()),
        ("quit" | "exit", "") => Reply::Quit,
        ("status" | "monitor" | "flushall" | "clear" | "quit" | "exit", extra) => Reply::Text(
            format!("error: {command} takes no argument {extra:?}; type help {command}\n"),
        ),
        _ => Reply::Text(format!(
            "error: unknown command {command:?}; type help for the list\n"
        )),
    }
}

/// One console session, until the user quits, the connection drops, the server stops, or no
/// command comes for `idle_timeout`.
pub fn serve(stream: Stream, peer: &str, backend: &dyn Backend, idle_timeout: Duration) {
    match session(&stream, backend, idle_timeout) {
        Ok(()) => debug!("console {peer}: closed"),
        Err(e) => debug!("console {peer}: {e}"),
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// What reading a line found.
enum Line {
    Text(String),
    Quiet,
    Eof,
}

struct LineReader<'a> {
    reader: BufReader<&'a Stream>,
    partial: Vec<u8>,
}

impl<'a> LineReader<'a> {
    /// The next line; one longer than [`MAX_LINE`] comes back cut after its first
    /// `MAX_LINE + 1` bytes, for the session to refuse.
    fn next(&mut self) -> io::Result<Line> {
        // Never more than one byte past the longest line: a client that streams bytes without
        // a newline is cut off there, not buffered without end.
        let room = (MAX_LINE + 1).saturating_sub(self.partial.len()) as u64;
        let read = if room == 0 {
            Ok(1)
        } else {
            (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.partial)
        };
        match read {
            Ok(0) => Ok(Line::Eof),
            // A whole line, one too long, or a last line without a newline at EOF.
            Ok(_) => Ok(self.take_line()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(Line::Quiet)
            }
            Err(e) => Err(e),
        }
    }

    fn take_line(&mut self) -> Line {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        Line::Text(line)
    }
}

/// Turns away a client beyond the session limit with a line saying why, then closes.
pub fn refuse(stream: Stream, limit: usize) {
    use crate::outbox::SendNow;
    let line = format!("error: too many console sessions ({limit}); try again later\n");
    // A fresh socket's buffer takes one line: never waits, so the accept thread cannot hang.
    let _ = stream.send_now(line.as_bytes());
    // A FIN after the line (a bare close could reset it away if the client sent something).
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// A duration as people say it: whole seconds when it is whole seconds, else milliseconds.
fn spoken(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

fn session(stream: &Stream, backend: &dyn Backend, idle_timeout: Duration) -> io::Result<()> {
    let mut out = stream;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    out.write_all(
        format!(
            "phpmq-server {} maintenance console; type help for the commands\n{PROMPT}",
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    )?;
    let mut lines = LineReader {
        reader: BufReader::with_capacity(MAX_LINE, stream),
        partial: Vec::new(),
    };
    let mut last_command = Instant::now();
    loop {
        let line = match lines.next()? {
            Line::Eof => return Ok(()),
            Line::Quiet if backend.stopping() => {
                out.write_all(b"\nserver shutting down\n")?;
                return Ok(());
            }
            // Sessions are few: a forgotten one must not hold its place for good.
            Line::Quiet if last_command.elapsed() >= idle_timeout => {
                out.write_all(
                    format!(
                        "\nerror: no command for {}; closing this idle session\n",
                        spoken(idle_timeout)
                    )
                    .as_bytes(),
                )?;
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "closed after the idle timeout",
                ));
            }
            Line::Quiet => continue,
            Line::Text(line) => {
                last_command = Instant::now();
                line
            }
        };
        if line.len() > MAX_LINE {
            out.write_all(b"error: command line too long\n")?;
            return Ok(());
        }
        match execute(&line, backend) {
            Reply::Text(text) => {
                out.write_all(text.as_bytes())?;
                out.write_all(PROMPT.as_bytes())?;
            }
            Reply::Quit => {
                out.write_all(b"bye\n")?;
                return Ok(());
            }
            Reply::Monitor => {
                monitor(stream, &mut lines, backend)?;
                // Watching is not idling: the idle time starts when the monitor ends.
                last_command = Instant::now();
                out.write_all(PROMPT.as_bytes())?;
            }
        }
    }
}

/// Redraws the status until the user types `q` (or the server stops).
fn monitor(stream: &Stream, lines: &mut LineReader<'_>, backend: &dyn Backend) -> io::Result<()> {
    let mut out = stream;
    stream.set_read_timeout(Some(MONITOR_INTERVAL))?;
    let result = loop {
        let screen = match backend.monitor_status() {
            Ok(status) => status_text_at_most(&status, MONITOR_ROWS),
            Err(e) => format!("error: {e}\n"),
        };
        out.write_all(format!("\x1b[2J\x1b[H{screen}\ntype q and Enter to stop\n").as_bytes())?;
        match lines.next()? {
            Line::Eof => break Ok(()),
            Line::Text(line) if line.trim().eq_ignore_ascii_case("q") => break Ok(()),
            _ if backend.stopping() => break Ok(()),
            _ => {}
        }
    };
    stream.set_read_timeout(Some(POLL))?;
    result
}

#[cfg(test)]
mod tests;
