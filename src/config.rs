//! The server's settings and the forms of a listen address.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The default message endpoint: loopback only, so exposing the server is an explicit choice.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9100";
/// The default maintenance console, loopback only as well.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9101";
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;
/// The most `--max-message-size` may be: 512 MiB. A message must fit in one SQLite row (at
/// most 1,000,000,000 bytes in the bundled build, SQLITE_MAX_LENGTH) and, while it arrives, in
/// one connection's buffer; a value near `usize::MAX` was a typo, not a wish.
pub const MAX_MAX_MESSAGE_SIZE: usize = 512 << 20;
const _: () = assert!(DEFAULT_MAX_MESSAGE_SIZE <= MAX_MAX_MESSAGE_SIZE);
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Off: a v1.0 producer learns that its idle connection was closed only when its next
/// message is lost (the write succeeds locally), so closing idle producers is an explicit
/// choice.
pub const DEFAULT_IDLE_TIMEOUT: Option<Duration> = None;
/// A console session waiting this long for a command is closed: sessions are few (16), and
/// forgotten ones must not lock `phpmq status` out.
pub const DEFAULT_CONSOLE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// TCP keepalive's idle time: a client whose host vanished is found gone about twice this
/// after it went silent, and what it held goes to the others.
pub const DEFAULT_TCP_KEEPALIVE: Option<Duration> = Some(Duration::from_secs(60));
/// The mirror file, relative to the working directory.
pub const DEFAULT_DB: &str = "phpmq.sqlite";
pub const DEFAULT_MIRROR_INTERVAL: Duration = Duration::from_millis(1000);

/// Parses `--max-message-size`: bytes, at most [`MAX_MAX_MESSAGE_SIZE`]. A larger value is
/// refused rather than clamped, so the limit in force is always the one given.
pub fn parse_max_message_size(text: &str) -> Result<usize, String> {
    let bytes: usize = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if bytes == 0 {
        // It would refuse every message but an empty one: a mistake, not a setting.
        return Err("0 would refuse every message; give at least 1 byte".to_string());
    }
    if bytes > MAX_MAX_MESSAGE_SIZE {
        return Err(format!(
            "{bytes} is above the maximum of {MAX_MAX_MESSAGE_SIZE} bytes (512 MiB)"
        ));
    }
    Ok(bytes)
}

/// Where a listener binds: `HOST:PORT` (IPv4 or `[IPv6]:PORT`) or `unix:/path/to.sock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{text:?}: the unix: form needs a path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| {
                format!(
                    "{text:?} is not an address: use HOST:PORT (IPv4), [IPv6]:PORT or unix:/path"
                )
            })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    /// Maintenance console endpoints; empty turns the console off.
    pub admin: Vec<ListenAddr>,
    pub max_connections: usize,
    /// The largest message content (packet 02) a client may send, in bytes; every other packet
    /// has a smaller bound of its own ([`crate::codec::PacketType::max_len`]).
    pub max_message_size: usize,
    /// How long one frame may take to arrive once its first byte is in.
    pub frame_timeout: Duration,
    /// How long a message connection that has never asked to consume may send nothing
    /// before it is closed; `None`: no limit.
    pub idle_timeout: Option<Duration>,
    /// How long a console session may wait for a command before it is closed
    /// (`Duration::MAX`: no limit).
    pub console_idle_timeout: Duration,
    /// TCP keepalive's idle time for accepted connections ([`crate::net::set_keepalive`]);
    /// `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// The SQLite mirror file; `None` keeps messages in memory only.
    pub db: Option<PathBuf>,
    /// How often a changed store is mirrored to `db`.
    pub mirror_interval: Duration,
    /// A message whose this-many-th dispatch ends without an ack moves to `<queue>.dead`
    /// (v1.2 `dead-letter`); 0: never.
    pub max_deliveries: u32,
    /// The most messages a queue may hold (ready, delayed and in flight) before sends to it
    /// are refused; 0: no limit.
    pub max_queue_length: usize,
    /// The most messages all queues together may hold before sends are refused; 0: no limit.
    pub max_stored_messages: usize,
    /// The most content bytes all queues together may hold before sends are refused; 0: no
    /// limit.
    pub max_stored_bytes: u64,
    /// The most memory frames still arriving may take, all connections together
    /// ([`crate::connection::FrameBudget`]); at least
    /// [`crate::connection::least_frame_budget`] of `max_message_size`.
    pub frame_memory: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![DEFAULT_LISTEN.parse().expect("the default address parses")],
            admin: vec![DEFAULT_ADMIN.parse().expect("the default address parses")],
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            console_idle_timeout: DEFAULT_CONSOLE_IDLE_TIMEOUT,
            tcp_keepalive: DEFAULT_TCP_KEEPALIVE,
            db: Some(PathBuf::from(DEFAULT_DB)),
            mirror_interval: DEFAULT_MIRROR_INTERVAL,
            max_deliveries: 0,
            max_queue_length: 0,
            max_stored_messages: 0,
            max_stored_bytes: 0,
            frame_memory: crate::connection::DEFAULT_FRAME_BUDGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_forms() {
        assert_eq!(
            "127.0.0.1:9100".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert!(matches!("[::1]:0".parse::<ListenAddr>(), Ok(ListenAddr::Tcp(a)) if a.is_ipv6()));
        assert_eq!(
            "unix:/run/phpmq.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/phpmq.sock".into()))
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost".parse::<ListenAddr>().is_err());
        assert!("9100".parse::<ListenAddr>().is_err());
        let shown = ListenAddr::Unix("/tmp/x.sock".into()).to_string();
        assert_eq!(shown, "unix:/tmp/x.sock");
        assert_eq!(Config::default().listen[0].to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn max_message_size_is_capped() {
        assert_eq!(parse_max_message_size("1024"), Ok(1024));
        assert!(parse_max_message_size("0").is_err());
        assert_eq!(parse_max_message_size("1"), Ok(1));
        let cap = MAX_MAX_MESSAGE_SIZE.to_string();
        assert_eq!(parse_max_message_size(&cap), Ok(MAX_MAX_MESSAGE_SIZE));
        let over = (MAX_MAX_MESSAGE_SIZE + 1).to_string();
        assert!(parse_max_message_size(&over)
            .is_err_and(|e| e.contains("above the maximum of 536870912 bytes")));
        assert!(parse_max_message_size("18446744073709551615").is_err());
        assert!(parse_max_message_size("99999999999999999999999").is_err());
        assert!(parse_max_message_size("-1").is_err());
        assert!(parse_max_message_size("16M").is_err());
    }
}
