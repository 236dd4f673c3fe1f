//! Test helpers: start the real `phpmq-server` binary on an ephemeral port and a Unix socket in
//! a temp dir, talk PHPMQ to it over real sockets, and wait for conditions with deadlines.
#![allow(dead_code)]

use phpmq::codec::{self, Decoded, MessageType, PacketType};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The longest any single wait in a test may take.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "phpmq-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines the server wrote to stderr, shared with the thread that reads them.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    fn push(&self, line: String) {
        self.0 .0.lock().unwrap().push(line);
        self.0 .1.notify_all();
    }

    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().join("\n")
    }

    /// Waits for a line that satisfies `matches`; returns it.
    pub fn wait_for(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut lines = self.0 .0.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| matches(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line {what} within {DEADLINE:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self.0 .1.wait_timeout(lines, left).unwrap().0;
        }
    }
}

pub fn server_binary() -> &'static str {
    env!("CARGO_BIN_EXE_phpmq-server")
}

/// A running server, killed when dropped.
pub struct TestServer {
    child: Option<Child>,
    pub log: Log,
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    /// The maintenance console (TCP), unless turned off.
    pub console: Option<SocketAddr>,
    pub dir: TempDir,
    args: Vec<String>,
    /// The open-file limit (soft, hard) the server runs under, if the test set one.
    open_files: Option<(u64, u64)>,
}

impl TestServer {
    /// TCP on 127.0.0.1:0 and a Unix socket in a fresh temp dir, plus `extra` flags.
    pub fn start(extra: &[&str]) -> TestServer {
        let (dir, args) = TestServer::default_args(extra);
        TestServer::start_with(dir, args)
    }

    /// Like [`TestServer::start`], under an open-file limit of `soft` and `hard` descriptors
    /// (as `ulimit -n` or systemd's `LimitNOFILE=` set it), for the server alone.
    pub fn start_with_open_files(extra: &[&str], soft: u64, hard: u64) -> TestServer {
        let (dir, args) = TestServer::default_args(extra);
        TestServer::launch(dir, args, Some((soft, hard)))
    }

    fn default_args(extra: &[&str]) -> (TempDir, Vec<String>) {
        let dir = TempDir::new("srv");
        let sock = dir.path().join("phpmq.sock");
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--listen".to_string(),
            format!("unix:{}", sock.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        (dir, args)
    }

    /// These arguments, plus a console on an ephemeral port unless they name one: the default
    /// port would clash between tests running at once.
    pub fn start_with(dir: TempDir, args: Vec<String>) -> TestServer {
        TestServer::launch(dir, args, None)
    }

    fn launch(dir: TempDir, mut args: Vec<String>, open_files: Option<(u64, u64)>) -> TestServer {
        if !args.iter().any(|a| a == "--admin") {
            args.extend(["--admin".to_string(), "127.0.0.1:0".to_string()]);
        }
        let (child, log) = spawn_limited(&args, dir.path(), open_files);
        let mut server = TestServer {
            child: Some(child),
            log,
            tcp: None,
            unix: None,
            console: None,
            dir,
            args,
            open_files,
        };
        let ready = server
            .log
            .wait_for("'ready'", |l| l.contains("ready; listening on "));
        let listed = ready
            .split("listening on ")
            .nth(1)
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default();
        let console = ready
            .split("; console ")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .and_then(|addr| addr.split(", ").next())
            .and_then(|addr| addr.parse().ok());
        server.console = console;
        for addr in listed.split(", ") {
            if let Some(path) = addr.strip_prefix("unix:") {
                server.unix = Some(PathBuf::from(path));
            } else if let Ok(tcp) = addr.parse() {
                server.tcp = Some(tcp);
            }
        }
        server
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp.expect("server listens on TCP")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn tcp_client(&self) -> Client {
        Client::tcp(self.tcp_addr())
    }

    pub fn unix_client(&self) -> Client {
        Client::unix(self.unix.as_ref().expect("server listens on a Unix socket"))
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; log:\n{}",
                self.log.text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes a TCP client and waits until the server has handled the disconnect (its held
    /// messages are back). Needs `--log-level debug`.
    pub fn disconnect_and_wait(&self, client: Client) {
        let peer = client.local.clone().expect("a TCP client");
        drop(client);
        self.log.wait_for("for the disconnect", |l| {
            l.contains(&peer) && l.contains("disconnected")
        });
    }

    /// Stops the process (if still running) and starts it again on the same directory and
    /// arguments: same socket path, same database file.
    pub fn restart(mut self) -> TestServer {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let dir = std::mem::replace(&mut self.dir, TempDir::new("moved"));
        let args = std::mem::take(&mut self.args);
        let open_files = self.open_files;
        drop(self);
        TestServer::launch(dir, args, open_files)
    }

    /// The ready line's count of recovered messages.
    pub fn recovered(&self) -> usize {
        let ready = self.log.wait_for("ready", |l| l.contains("ready;"));
        let count = ready
            .split('(')
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok());
        count.unwrap_or_else(|| panic!("no recovered count in {ready:?}"))
    }

    /// One console command over a fresh session; its reply without the prompt.
    pub fn console_command(&self, line: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.console.expect("console on")).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut text = String::new();
        let read_prompt = |stream: &mut std::net::TcpStream, text: &mut String| loop {
            if let Some(at) = text.find("phpmq> ") {
                let reply = text[..at].to_string();
                text.drain(..at + "phpmq> ".len());
                return reply;
            }
            let mut chunk = [0u8; 65536];
            let n = stream.read(&mut chunk).expect("console reply");
            assert!(n > 0, "console closed: {text:?}");
            text.push_str(&String::from_utf8_lossy(&chunk[..n]));
        };
        read_prompt(&mut stream, &mut text);
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        read_prompt(&mut stream, &mut text)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("phpmq.sqlite")
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !thread::panicking() {
            let log = self.log.text();
            assert!(!log.contains("panicked"), "the server panicked:\n{log}");
        }
    }
}

/// Starts the binary with `args` in `cwd`, collecting stderr lines.
pub fn spawn(args: &[String], cwd: &Path) -> (Child, Log) {
    spawn_limited(args, cwd, None)
}

/// [`spawn`], with the open-file limit (soft, hard) set in the child before it runs the
/// server, if given.
pub fn spawn_limited(args: &[String], cwd: &Path, open_files: Option<(u64, u64)>) -> (Child, Log) {
    let mut command = Command::new(server_binary());
    command
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((soft, hard)) = open_files {
        use rustix::process::{setrlimit, Resource, Rlimit};
        use std::os::unix::process::CommandExt;
        let limit = Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        };
        // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
        // calls are allowed: setrlimit is one system call, and it allocates nothing.
        unsafe {
            command.pre_exec(move || setrlimit(Resource::Nofile, limit).map_err(io::Error::from));
        }
    }
    let mut child = command.spawn().expect("start phpmq-server");
    let log = Log::default();
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            match line {
                Ok(line) => sink.push(line),
                Err(_) => break,
            }
        }
    });
    (child, log)
}

/// Runs the binary to completion (for start-up errors); returns status and stderr.
pub fn run_to_exit(args: &[&str], cwd: &Path) -> (ExitStatus, String) {
    let mut child = Command::new(server_binary())
        .args(args)
        .args(["--admin", "none"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start phpmq-server");
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("phpmq-server {args:?} did not exit");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

trait Socket: Read + Write + Send {
    fn shutdown_write(&self) -> io::Result<()>;
    fn shutdown_read(&self) -> io::Result<()>;
    fn set_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn shutdown_read(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Read)
    }
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl Socket for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn shutdown_read(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Read)
    }
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// A message the server dispatched to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub queue: String,
    pub content: Vec<u8>,
    pub id: String,
    pub ttl: Option<u64>,
    pub packet_count: usize,
}

impl Dispatch {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.content).into_owned()
    }
}

/// A PHPMQ client over TCP or a Unix socket. Every read is bounded by [`DEADLINE`].
pub struct Client {
    socket: Box<dyn Socket>,
    buf: Vec<u8>,
    /// `host:port` of our end, as the server names us in its log (TCP only).
    pub local: Option<String>,
    barriers: u64,
}

static CLIENTS: AtomicU64 = AtomicU64::new(0);

impl Client {
    pub fn tcp(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect over TCP");
        stream.set_nodelay(true).unwrap();
        let local = stream.local_addr().ok().map(|a| a.to_string());
        Client::over(Box::new(stream), local)
    }

    pub fn unix(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect over the Unix socket");
        Client::over(Box::new(stream), None)
    }

    fn over(socket: Box<dyn Socket>, local: Option<String>) -> Client {
        socket.set_timeout(DEADLINE).unwrap();
        Client {
            socket,
            buf: Vec::new(),
            local,
            barriers: 0,
        }
    }

    /// How long a read waits before it fails with a timeout (the default is the deadline).
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.socket
            .set_timeout(timeout)
            .expect("set the read timeout");
    }

    /// This client's port, as the server sees it (TCP only).
    pub fn port(&self) -> u16 {
        self.local
            .as_deref()
            .and_then(|a| a.rsplit(':').next()?.parse().ok())
            .expect("a TCP client")
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Client {
        self.socket.write_all(bytes).expect("write to server");
        self
    }

    /// Writes bytes; the error is the caller's to judge (a refused connection, say).
    pub fn try_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.socket.write_all(bytes)
    }

    fn frame(&mut self, t: MessageType, packets: &[(PacketType, &[u8])]) -> &mut Client {
        let mut out = Vec::new();
        codec::encode_frame(&mut out, t, packets);
        self.raw(&out)
    }

    pub fn send(&mut self, queue: &str, content: &[u8]) -> &mut Client {
        self.frame(
            MessageType::Send,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::Content, content),
            ],
        )
    }

    pub fn send_ttl(&mut self, queue: &str, content: &[u8], ttl: u64) -> &mut Client {
        let ttl = ttl.to_string();
        self.frame(
            MessageType::Send,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::Content, content),
                (PacketType::Ttl, ttl.as_bytes()),
            ],
        )
    }

    pub fn consume(&mut self, queue: &str, count: u64) -> &mut Client {
        let count = count.to_string();
        self.frame(
            MessageType::Consume,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::Count, count.as_bytes()),
            ],
        )
    }

    pub fn ack(&mut self, queue: &str, id: &str) -> &mut Client {
        self.frame(
            MessageType::Ack,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::MessageId, id.as_bytes()),
            ],
        )
    }

    pub fn requeue(&mut self, queue: &str, id: &str, ttl: u64) -> &mut Client {
        let ttl = ttl.to_string();
        self.frame(
            MessageType::Requeue,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::MessageId, id.as_bytes()),
                (PacketType::Ttl, ttl.as_bytes()),
            ],
        )
    }

    pub fn dead_letter(&mut self, queue: &str, id: &str) -> &mut Client {
        self.frame(
            MessageType::DeadLetter,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::MessageId, id.as_bytes()),
            ],
        )
    }

    /// The next dispatch; panics if none arrives within the deadline.
    pub fn recv(&mut self) -> Dispatch {
        match self.try_recv() {
            Ok(Some(d)) => d,
            Ok(None) => panic!("connection closed while waiting for a dispatch"),
            Err(e) => panic!("no dispatch: {e}"),
        }
    }

    /// The next dispatch, `Ok(None)` on EOF.
    pub fn try_recv(&mut self) -> io::Result<Option<Dispatch>> {
        loop {
            match codec::decode_frame(&self.buf, usize::MAX >> 1) {
                Ok(Decoded::Frame(frame, used)) => {
                    assert_eq!(
                        frame.message_type,
                        MessageType::Dispatch,
                        "server sent a non-dispatch"
                    );
                    let text = |p| String::from_utf8(frame.required(p).to_vec()).unwrap();
                    let ttl = frame
                        .packet(PacketType::Ttl)
                        .map(|t| std::str::from_utf8(t).unwrap().parse().unwrap());
                    let dispatch = Dispatch {
                        queue: text(PacketType::Queue),
                        content: frame.required(PacketType::Content).to_vec(),
                        id: text(PacketType::MessageId),
                        ttl,
                        packet_count: std::str::from_utf8(&self.buf[6..8])
                            .unwrap()
                            .parse()
                            .unwrap(),
                    };
                    self.buf.drain(..used);
                    return Ok(Some(dispatch));
                }
                Ok(Decoded::Incomplete { .. }) => {}
                Err(e) => panic!("server sent a bad frame: {e}"),
            }
            let mut chunk = [0u8; 64 << 10];
            let n = match self.socket.read(&mut chunk) {
                Ok(n) => n,
                // A signal that lands mid-read is not the server's doing: read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Proves the server has handled everything this connection sent so far, and returns the
    /// dispatches that arrived before the proof: it sends a message to a private queue, consumes
    /// it and acks it. The server handles a connection's frames in order and writes its
    /// dispatches in order, so anything meant for us before that is already here.
    pub fn sync(&mut self) -> Vec<Dispatch> {
        self.barriers += 1;
        let queue = format!(
            "barrier-{}-{}",
            CLIENTS.fetch_add(1, Ordering::Relaxed),
            self.barriers
        );
        self.send(&queue, b"barrier").consume(&queue, 1);
        let mut before = Vec::new();
        loop {
            let d = self.recv();
            if d.queue == queue {
                self.ack(&queue, &d.id).consume(&queue, 0);
                return before;
            }
            before.push(d);
        }
    }

    /// Writes one frame of `message_type` (its 3-digit code) with `packets` (2-digit type,
    /// content), framed byte by byte as the spec says, independent of the server's codec.
    pub fn frame_of(&mut self, message_type: u16, packets: &[(u8, &[u8])]) -> &mut Client {
        let bytes = frame_bytes(message_type, packets);
        self.raw(&bytes)
    }

    /// A v1.2 HELLO for `version`, asking for `features` (none if empty).
    pub fn hello(&mut self, version: &str, features: &str) -> &mut Client {
        let mut packets: Vec<(u8, &[u8])> = vec![(6, version.as_bytes())];
        if !features.is_empty() {
            packets.push((8, features.as_bytes()));
        }
        self.frame_of(7, &packets)
    }

    /// The next frame of any type, parsed byte by byte; `None` on EOF or reset.
    pub fn recv_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = RawFrame::parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 64 << 10];
            let n = match self.socket.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no frame within {DEADLINE:?}")
                }
                Err(_) => return None,
            };
            if n == 0 {
                assert!(self.buf.is_empty(), "EOF inside a frame: {:?}", self.buf);
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame, which must be of `message_type`.
    pub fn expect_frame(&mut self, message_type: u16) -> RawFrame {
        let frame = self
            .recv_frame()
            .unwrap_or_else(|| panic!("connection closed while waiting for a {message_type:03}"));
        assert_eq!(
            frame.message_type, message_type,
            "unexpected frame {frame:?}"
        );
        frame
    }

    /// Waits for the server to close this connection (EOF or reset).
    pub fn expect_closed(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        let mut chunk = [0u8; 4096];
        loop {
            match self.socket.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("server did not close the connection within {DEADLINE:?}")
                }
                Err(_) => return,
            }
            assert!(Instant::now() < deadline, "server kept the connection open");
        }
    }

    pub fn shutdown_write(&mut self) {
        self.socket.shutdown_write().expect("shutdown write");
    }

    /// Stops reading: on a Unix socket, the server's next write to us then fails while we
    /// can still send.
    pub fn shutdown_read(&mut self) {
        self.socket.shutdown_read().expect("shutdown read");
    }
}

/// A frame's bytes: header `H01` + type + count, then each packet `P` + type + 29-digit length
/// + content.
pub fn frame_bytes(message_type: u16, packets: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = format!("H01{message_type:03}{:02}", packets.len()).into_bytes();
    for (packet_type, content) in packets {
        out.extend_from_slice(format!("P{packet_type:02}{:029}", content.len()).as_bytes());
        out.extend_from_slice(content);
    }
    out
}

/// A frame as the server sent it, packets in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub message_type: u16,
    pub packets: Vec<(u8, Vec<u8>)>,
}

impl RawFrame {
    /// A whole frame at the start of `buf`, and its length.
    fn parse(buf: &[u8]) -> Option<(RawFrame, usize)> {
        let number = |bytes: &[u8]| -> usize {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not a number in a server frame: {bytes:?}"))
        };
        let header = buf.get(..8)?;
        assert_eq!(
            &header[..3],
            b"H01",
            "bad header from the server: {header:?}"
        );
        let message_type = number(&header[3..6]) as u16;
        let count = number(&header[6..8]);
        let mut at = 8;
        let mut packets = Vec::new();
        for _ in 0..count {
            let head = buf.get(at..at + 32)?;
            assert_eq!(head[0], b'P', "bad packet header from the server: {head:?}");
            let len = number(&head[3..32]);
            let content = buf.get(at + 32..at + 32 + len)?;
            packets.push((number(&head[1..3]) as u8, content.to_vec()));
            at += 32 + len;
        }
        Some((
            RawFrame {
                message_type,
                packets,
            },
            at,
        ))
    }

    /// The content of packet `packet_type`; panics if it is not there.
    pub fn get(&self, packet_type: u8) -> &[u8] {
        self.packets
            .iter()
            .find(|(t, _)| *t == packet_type)
            .map(|(_, c)| c.as_slice())
            .unwrap_or_else(|| panic!("no packet {packet_type:02} in {self:?}"))
    }

    pub fn text(&self, packet_type: u8) -> String {
        String::from_utf8(self.get(packet_type).to_vec()).expect("UTF-8 packet")
    }

    pub fn has(&self, packet_type: u8) -> bool {
        self.packets.iter().any(|(t, _)| *t == packet_type)
    }

    /// The packet types in order.
    pub fn types(&self) -> Vec<u8> {
        self.packets.iter().map(|(t, _)| *t).collect()
    }
}

/// Polls `condition` until it holds; panics after [`DEADLINE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The resident memory (VmRSS) of process `pid`, in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// Bytes the server has not read yet on each of its established IPv4 TCP connections on
/// `server_port`, by client port, from /proc/net/tcp (Linux): 0 means it has read everything
/// that arrived.
pub fn tcp_unread(server_port: u16) -> std::collections::HashMap<u16, u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |addr: &str| {
        addr.split(':')
            .nth(1)
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, queues) = (
                fields.get(1)?,
                fields.get(2)?,
                fields.get(3)?,
                fields.get(4)?,
            );
            // 01: ESTABLISHED.
            if *state != "01" || port(local)? != server_port {
                return None;
            }
            let unread = u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()?;
            Some((port(remote)?, unread))
        })
        .collect()
}

/// Bytes a local TCP socket on `port` has sent and not had acknowledged, or not sent yet
/// (`tx_queue` in `/proc/net/tcp`); `None` if no such socket is established.
pub fn tcp_unsent(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1)?.split(':').nth(1)?;
        if *fields.get(3)? != "01" || u16::from_str_radix(local_port, 16).ok()? != port {
            return None;
        }
        u64::from_str_radix(fields.get(4)?.split(':').next()?, 16).ok()
    })
}
