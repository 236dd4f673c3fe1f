//! The one module that names TCP and Unix sockets: a listener and a stream type over both, the
//! rules for a Unix socket path (refuse a live one, replace a stale one, remove ours on exit),
//! and sleeping on a socket until it is ready or a [`Bell`] rings (poll(2) on an eventfd).

use crate::config::ListenAddr;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a client waits for a TCP host to answer its connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a listener could not be set up.
#[derive(Debug)]
pub enum BindError {
    Io {
        addr: ListenAddr,
        source: io::Error,
    },
    /// Another server answers on this Unix socket path.
    SocketInUse(PathBuf),
    /// The path exists and is not a socket: we never delete a file we did not make.
    NotASocket(PathBuf),
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindError::Io { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            BindError::SocketInUse(path) => write!(
                f,
                "cannot listen on unix:{}: another server is already listening there",
                path.display()
            ),
            BindError::NotASocket(path) => write!(
                f,
                "cannot listen on unix:{}: the path exists and is not a socket",
                path.display()
            ),
        }
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BindError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A bound socket file, removed when the listener goes, unless someone replaced it meanwhile.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A bound listener of either kind.
#[derive(Debug)]
pub struct Listener {
    kind: ListenerKind,
    /// TCP keepalive for the connections it accepts; `None`: the system's (off).
    keepalive: Option<Duration>,
}

/// Keepalive probes sent before a silent peer is given up on.
const KEEPALIVE_PROBES: u32 = 6;

/// Has the kernel find a TCP peer gone whose host vanished without a FIN or a reset (powered
/// off, unplugged, a NAT that forgot it): after `idle` without a segment it probes,
/// six times (`KEEPALIVE_PROBES`) `idle / 6` apart (at least a second), and gives up on a peer
/// that answers none, about twice `idle` after it went silent. The connection's reader then
/// sees the error and the connection ends as any other: what it held goes back to its queue.
///
/// Not `TCP_USER_TIMEOUT`, which would also find data in flight unacknowledged sooner: since
/// Linux 5.11 it also ends a connection whose peer is alive but has stopped reading (a worker
/// busy with a long job, its receive buffer full of prefetched messages). Data in flight to a
/// vanished host is given up on by the kernel's retransmission timeout (about 15 minutes).
pub fn set_keepalive(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    let idle = idle.max(Duration::from_secs(1));
    let interval = (idle / KEEPALIVE_PROBES).max(Duration::from_secs(1));
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, idle)?;
    sockopt::set_tcp_keepintvl(stream, interval)?;
    sockopt::set_tcp_keepcnt(stream, KEEPALIVE_PROBES)?;
    Ok(())
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> Result<Listener, BindError> {
        let io_error = |source| BindError::Io {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Tcp(socket_addr) => {
                let listener = TcpListener::bind(socket_addr).map_err(io_error)?;
                listener.set_nonblocking(true).map_err(io_error)?;
                Ok(Listener {
                    kind: ListenerKind::Tcp(listener),
                    keepalive: None,
                })
            }
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path).map_err(|e| match e {
                    UnixBindError::Io(source) => io_error(source),
                    UnixBindError::Other(e) => e,
                })?;
                let inode = fs::symlink_metadata(path).map_err(io_error)?.ino();
                let file = SocketFile {
                    path: path.clone(),
                    inode,
                };
                // After `file` exists: if this fails, dropping it removes the socket file.
                listener.set_nonblocking(true).map_err(io_error)?;
                Ok(Listener {
                    kind: ListenerKind::Unix(listener, file),
                    keepalive: None,
                })
            }
        }
    }

    /// TCP connections it accepts get keepalive with this idle time ([`set_keepalive`]);
    /// `None` leaves the system's setting (off).
    pub fn with_keepalive(mut self, idle: Option<Duration>) -> Listener {
        self.keepalive = idle;
        self
    }

    /// The address actually bound (with the real port for port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        Ok(match &self.kind {
            ListenerKind::Tcp(listener) => ListenAddr::Tcp(listener.local_addr()?),
            ListenerKind::Unix(_, file) => ListenAddr::Unix(file.path.clone()),
        })
    }

    /// Takes a client that is waiting, with a name for it to use in log lines; `WouldBlock`
    /// if none is. Never waits: the listener is non-blocking, and [`Listener::wait`] sleeps
    /// until a client comes or the bell rings.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.kind {
            ListenerKind::Tcp(listener) => {
                let (stream, peer) = listener.accept()?;
                // Linux does not pass the listener's O_NONBLOCK on, other systems do: the
                // connection's reads and writes expect a blocking socket.
                stream.set_nonblocking(false)?;
                // Dispatches are latency-sensitive small writes: never wait for Nagle.
                stream.set_nodelay(true)?;
                // Without it the connection still works: it is only found gone later.
                if let Some(idle) = self.keepalive {
                    if let Err(e) = set_keepalive(&stream, idle) {
                        log::debug!("{peer}: no TCP keepalive: {e}");
                    }
                }
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            ListenerKind::Unix(listener, file) => {
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(false)?;
                Ok((
                    Stream::Unix(stream),
                    format!("unix:{}", file.path.display()),
                ))
            }
        }
    }

    /// Sleeps until a client waits to be accepted or `bell` rings. Waking needs no new
    /// descriptor (unlike connecting to ourselves), so it works at the open-file limit too.
    /// The bell comes first: once it has rung, the caller stops waiting for more clients.
    pub fn wait(&self, bell: &Bell) -> io::Result<Readiness> {
        let woken = wait_fd(self.fd(), Some(bell), None)?;
        Ok(if woken.bell {
            Readiness::Bell
        } else if woken.fd {
            Readiness::Readable
        } else {
            Readiness::TimedOut
        })
    }

    /// Whether a client waits to be accepted now. (A failed accept does not tell: at the
    /// open-file limit it fails whether one waits or not.)
    pub fn client_waiting(&self) -> io::Result<bool> {
        Ok(wait_fd(self.fd(), None, Some(Duration::ZERO))?.fd)
    }

    fn fd(&self) -> rustix::fd::BorrowedFd<'_> {
        use rustix::fd::AsFd;
        match &self.kind {
            ListenerKind::Tcp(listener) => listener.as_fd(),
            ListenerKind::Unix(listener, _) => listener.as_fd(),
        }
    }
}

enum UnixBindError {
    Io(io::Error),
    Other(BindError),
}

fn bind_unix(path: &Path) -> Result<UnixListener, UnixBindError> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        other => return other.map_err(UnixBindError::Io),
    }
    let metadata = fs::symlink_metadata(path).map_err(UnixBindError::Io)?;
    if !metadata.file_type().is_socket() {
        return Err(UnixBindError::Other(BindError::NotASocket(path.to_owned())));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(UnixBindError::Other(BindError::SocketInUse(
            path.to_owned(),
        )));
    }
    // Nobody answers: a stale file left by a server that did not exit cleanly.
    log::info!("replacing stale socket file {}", path.display());
    fs::remove_file(path).map_err(UnixBindError::Io)?;
    UnixListener::bind(path).map_err(UnixBindError::Io)
}

/// A connected client over either kind of socket. `&Stream` reads and writes, so one socket can
/// be shared by a connection's reader, its writer and the server's shutdown.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects as a client, giving up on a TCP host after [`CONNECT_TIMEOUT`].
    pub fn connect(addr: &ListenAddr) -> io::Result<Stream> {
        match addr {
            ListenAddr::Tcp(addr) => {
                // A host that drops the SYN would otherwise hold a script for minutes.
                let stream = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            ListenAddr::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

/// Wakes every thread waiting on it in [`Stream::wait_readable`], [`Listener::wait`] or
/// [`Bell::wait`] at once, for good: an eventfd that once written stays readable. Made before
/// any client connects, so ringing it needs no descriptor. The server rings one for its accept
/// threads and one for its connections, at two steps of its stop.
#[derive(Debug)]
pub struct Bell(rustix::fd::OwnedFd);

impl Bell {
    pub fn new() -> io::Result<Bell> {
        use rustix::event::{eventfd, EventfdFlags};
        Ok(Bell(eventfd(0, EventfdFlags::CLOEXEC)?))
    }

    pub fn ring(&self) {
        // Only fails if the counter would overflow, when it is readable anyway.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Sleeps until the bell rings or `timeout` passes; true if it has rung.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags};
        let timeout = timespec(timeout);
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        loop {
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn timespec(t: Duration) -> rustix::event::Timespec {
    rustix::event::Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    }
}

/// Which of [`wait_fd`]'s descriptors woke it.
struct Woken {
    fd: bool,
    bell: bool,
}

/// Sleeps until `fd` is readable (for a listener: a client waits to be accepted), `bell`
/// rings, or `timeout` passes (`None`: no limit).
fn wait_fd(
    fd: rustix::fd::BorrowedFd<'_>,
    bell: Option<&Bell>,
    timeout: Option<Duration>,
) -> io::Result<Woken> {
    use rustix::event::{poll, PollFd, PollFlags};
    let timespec = timeout.map(timespec);
    let socket = PollFd::from_borrowed_fd(fd, PollFlags::IN);
    let mut fds = match bell {
        Some(bell) => [socket, PollFd::new(&bell.0, PollFlags::IN)],
        None => [socket.clone(), socket],
    };
    let watched = if bell.is_some() { 2 } else { 1 };
    loop {
        match poll(&mut fds[..watched], timespec.as_ref()) {
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Woken {
        fd: !fds[0].revents().is_empty(),
        bell: bell.is_some() && !fds[1].revents().is_empty(),
    })
}

/// What [`Stream::wait_readable`] or [`Listener::wait`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Data, end of file or an error is there to read (for a listener: a client waits to be
    /// accepted).
    Readable,
    /// The bell was rung.
    Bell,
    TimedOut,
}

impl Stream {
    fn fd(&self) -> rustix::fd::BorrowedFd<'_> {
        use rustix::fd::AsFd;
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    /// Bytes that arrived and wait in the socket's receive queue, unread.
    pub fn queued_len(&self) -> io::Result<usize> {
        let queued = rustix::io::ioctl_fionread(self.fd())?;
        Ok(usize::try_from(queued).unwrap_or(usize::MAX))
    }

    /// Reads what is there now without blocking; `WouldBlock` if nothing is.
    pub fn recv_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::net::{recv, RecvFlags};
        Ok(recv(self.fd(), buf, RecvFlags::DONTWAIT)?.0)
    }

    /// Sleeps until the socket is readable, the bell rings, or `timeout` passes (`None`:
    /// no limit). Sleeping costs nothing, unlike a read timeout that wakes to look around.
    pub fn wait_readable(
        &self,
        bell: Option<&Bell>,
        timeout: Option<Duration>,
    ) -> io::Result<Readiness> {
        let woken = wait_fd(self.fd(), bell, timeout)?;
        // Data first: what a client sent before the bell rang is still read.
        Ok(if woken.fd {
            Readiness::Readable
        } else if woken.bell {
            Readiness::Bell
        } else {
            Readiness::TimedOut
        })
    }
}

impl crate::outbox::SendNow for Stream {
    /// Sends what the socket takes right now without blocking (and without SIGPIPE); the
    /// rest is the caller's to write later.
    fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
        use rustix::net::{send, SendFlags};
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        let sent = match self {
            Stream::Tcp(s) => send(s, buf, flags),
            Stream::Unix(s) => send(s, buf, flags),
        };
        sent.map_err(io::Error::from)
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => {
                let mut s: &TcpStream = s;
                s.read(buf)
            }
            Stream::Unix(s) => {
                let mut s: &UnixStream = s;
                s.read(buf)
            }
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => {
                let mut s: &TcpStream = s;
                s.write(buf)
            }
            Stream::Unix(s) => {
                let mut s: &UnixStream = s;
                s.write(buf)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt;

    /// A connection whose host vanishes is found gone: keepalive with the idle time asked
    /// for, and unacknowledged data given up on as long after; off unless asked.
    #[test]
    fn accepted_tcp_connections_get_keepalive_when_asked() {
        let addr: ListenAddr = "127.0.0.1:0".parse().unwrap();
        for (keepalive, expected) in [(Some(Duration::from_secs(6)), true), (None, false)] {
            let listener = Listener::bind(&addr).unwrap().with_keepalive(keepalive);
            let ListenAddr::Tcp(bound) = listener.local_addr().unwrap() else {
                panic!("a TCP address");
            };
            let _client = TcpStream::connect(bound).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let accepted = loop {
                assert!(std::time::Instant::now() < deadline, "never accepted");
                match listener.accept() {
                    Ok((Stream::Tcp(stream), _)) => break stream,
                    Ok(_) => panic!("a TCP stream"),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(sockopt::socket_keepalive(&accepted).unwrap(), expected);
            if expected {
                assert_eq!(
                    sockopt::tcp_keepidle(&accepted).unwrap(),
                    Duration::from_secs(6)
                );
                // A peer that stops reading is alive: only silence ends a connection.
                assert_eq!(sockopt::tcp_user_timeout(&accepted).unwrap(), 0);
            }
        }
    }
}
