//! Listeners and connections: addresses, Unix socket files, the connection limit, stopping.

use crate::common;

use common::{run_to_exit, Client, TempDir, TestServer};
use phpmq::codec::{encode_frame, MessageType, PacketType};
use std::os::unix::net::UnixListener;

#[test]
fn ready_line_names_every_bound_address() {
    let server = TestServer::start(&[]);
    let ready = server.log.wait_for("ready", |l| l.contains("ready;"));
    assert!(
        server.tcp_addr().port() != 0,
        "the real port is shown: {ready}"
    );
    let sock = server.unix.clone().expect("unix address listed");
    assert!(ready.contains(&format!("unix:{}", sock.display())));
    assert!(sock.exists());
}

#[test]
fn defaults_to_loopback_port_9100() {
    // Only checks the parsed default; binding 9100 here could clash with a real server.
    let config = phpmq::config::Config::default();
    assert_eq!(config.listen[0].to_string(), "127.0.0.1:9100");
    assert_eq!(config.max_connections, 1024);
    assert_eq!(config.max_message_size, 16 << 20);
}

#[test]
fn a_max_message_size_beyond_the_cap_is_refused_at_start() {
    // 18446744073709551615 once made a frame's end wrap around; now it does not start at all.
    let dir = TempDir::new("max-size");
    for size in ["18446744073709551615", "536870913"] {
        let (status, stderr) =
            run_to_exit(&["--max-message-size", size, "--db", "none"], dir.path());
        assert!(!status.success(), "{size}");
        assert!(
            stderr.contains("above the maximum of 536870912 bytes"),
            "{size}: {stderr}"
        );
    }
    let (status, stderr) = run_to_exit(&["--max-message-size", "0", "--db", "none"], dir.path());
    assert!(!status.success());
    assert!(stderr.contains("0 would refuse every message"), "{stderr}");
}

#[test]
fn a_live_unix_socket_is_not_taken_over() {
    let server = TestServer::start(&[]);
    let sock = server.unix.clone().expect("unix");
    let dir = TempDir::new("second");
    let (status, stderr) = run_to_exit(
        &["--listen", &format!("unix:{}", sock.display())],
        dir.path(),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("another server is already listening there"),
        "{stderr}"
    );
    // The first server is untouched.
    let mut client = server.unix_client();
    client.send("still", b"mine");
    client.consume("still", 1);
    assert_eq!(client.recv().text(), "mine");
}

#[test]
fn a_stale_unix_socket_is_replaced() {
    let dir = TempDir::new("stale");
    let sock = dir.path().join("stale.sock");
    // A listener dropped without unlinking leaves a file nobody answers on.
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let args = vec!["--listen".to_string(), format!("unix:{}", sock.display())];
    let server = TestServer::start_with(dir, args);
    let mut client = Client::unix(&sock);
    client.send("fresh", b"ok");
    client.consume("fresh", 1);
    assert_eq!(client.recv().text(), "ok");
    drop(server);
}

#[test]
fn a_path_that_is_not_a_socket_is_never_deleted() {
    let dir = TempDir::new("notsock");
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let (status, stderr) = run_to_exit(
        &["--listen", &format!("unix:{}", file.display())],
        dir.path(),
    );
    assert!(!status.success());
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn bad_flags_are_refused_with_a_clear_error() {
    let dir = TempDir::new("flags");
    let (status, stderr) = run_to_exit(&["--listen", "nowhere"], dir.path());
    assert!(!status.success());
    assert!(stderr.contains("is not an address"), "{stderr}");
    let (status, stderr) = run_to_exit(&["--log-level", "loud"], dir.path());
    assert!(!status.success());
    assert!(stderr.contains("unknown log level"), "{stderr}");
    let (status, stderr) = run_to_exit(&["--scheduling", "fifo"], dir.path());
    assert!(!status.success());
    assert!(stderr.contains("use batch or normal"), "{stderr}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, stderr) = run_to_exit(&["--listen", &addr], dir.path());
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

/// Every thread of the server runs under the scheduling it was given (batch by default):
/// those started at start-up and those started per connection alike.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn server_threads_run_under_the_scheduling_asked_for() {
    // The policy is field 41 of /proc/PID/task/TID/stat, counted after the command's
    // closing parenthesis (a thread's name may hold spaces).
    let policies = |server: &TestServer| -> Vec<(String, u32)> {
        let tasks = format!("/proc/{}/task", server.pid());
        std::fs::read_dir(tasks)
            .unwrap()
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                let (head, rest) = stat.rsplit_once(')')?;
                let name = head.split_once('(')?.1.to_string();
                let policy = rest.split_whitespace().nth(41 - 3)?.parse().ok()?;
                Some((name, policy))
            })
            .collect()
    };
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    for (args, want) in [
        (&[][..], SCHED_BATCH),
        (&["--scheduling", "normal"][..], SCHED_OTHER),
    ] {
        let server = TestServer::start(args);
        // A connection's thread, started after the server was ready.
        let mut client = server.tcp_client();
        client.send("q", b"x");
        client.sync();
        let threads = policies(&server);
        assert!(
            threads
                .iter()
                .any(|(name, _)| name.starts_with("phpmq-conn")),
            "{threads:?}"
        );
        let others: Vec<_> = threads
            .iter()
            .filter(|(name, policy)| *policy != want && name.starts_with("phpmq-"))
            .collect();
        assert!(others.is_empty(), "{args:?}: {others:?} of {threads:?}");
    }
}

#[test]
fn version_and_help() {
    let dir = TempDir::new("version");
    let out = std::process::Command::new(common::server_binary())
        .arg("--version")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("phpmq-server "));
    let out = std::process::Command::new(common::server_binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--max-connections",
        "--max-message-size",
        "--log-level",
        "--frame-timeout-ms",
        "--version",
    ] {
        assert!(help.contains(flag), "--help lists {flag}");
    }
}

/// Values that parse but cannot work are refused at start with one line naming the option,
/// before anything is opened; a start that fails later says why in `--log-file` too.
#[test]
fn unusable_values_and_failed_starts_are_explained() {
    let dir = TempDir::new("refused-values");
    let start = |args: &[&str]| {
        let out = std::process::Command::new(common::server_binary())
            .args(["--listen", "127.0.0.1:0", "--admin", "none"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for (args, says) in [
        (
            &["--db", "none", "--max-connections", "0"][..],
            "--max-connections must be at least 1",
        ),
        (
            &["--db", "none", "--frame-timeout-ms", "0"][..],
            "--frame-timeout-ms must be at least 1 ms",
        ),
        (&["--db", ""][..], "--db is empty"),
        (
            &["--db", "none", "--admin", "127.0.0.1:0"][..],
            "--admin none turns the console off",
        ),
    ] {
        let stderr = start(args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing opened"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let log = dir.path().join("server.log");
    let out = std::process::Command::new(common::server_binary())
        .args([
            "--listen",
            &taken,
            "--admin",
            "none",
            "--db",
            "none",
            "--log-file",
        ])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("[ERROR] cannot start: cannot listen on") && log.contains(&taken),
        "{log}"
    );
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let server = TestServer::start(&["--max-connections", "2"]);
    let mut first = server.tcp_client();
    let mut second = server.unix_client();
    first.sync();
    second.sync();
    let mut third = server.tcp_client();
    let refused = third.local.clone().expect("tcp");
    third.expect_closed();
    server.log.wait_for("a refusal", |l| {
        l.contains(&refused) && l.contains("limit of 2 connections reached")
    });
    // The two admitted clients are unaffected.
    first.send("limit", b"a");
    second.consume("limit", 1);
    assert_eq!(second.recv().text(), "a");
    // A place frees up when a client leaves.
    drop(first);
    common::wait_until("a new connection to be admitted", || {
        let mut next = server.tcp_client();
        is_served(&mut next)
    });
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket_file() {
    let mut server = TestServer::start(&[]);
    let sock = server.unix.clone().expect("unix");
    let mut client = server.tcp_client();
    client.consume("q", 1);
    client.sync();
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.log.text()
    );
    assert!(!sock.exists(), "socket file removed on exit");
    client.expect_closed();
}

/// The audit's finding: a server out of descriptors never stopped. Its accept threads were
/// woken by connecting to the server itself, which takes a descriptor; the stop waited for
/// them for good, and systemd's SIGKILL lost the last mirror interval. Here every listener
/// (TCP, Unix, the console) is at the limit when SIGTERM comes.
#[test]
#[cfg(target_os = "linux")]
fn sigterm_stops_promptly_at_the_open_file_limit() {
    const LIMIT: u64 = 40;
    let mut server = TestServer::start_with_open_files(&["--db", "none"], LIMIT, LIMIT);
    // The default --max-connections (1024) does not fit: said once at start.
    let warning = server.log.wait_for("the open-file warning", |l| {
        l.contains("needs an open-file limit")
    });
    assert!(
        warning.contains("WARN")
            && warning.contains("--max-connections 1024 needs an open-file limit of 1088")
            && warning.contains("the limit is 40"),
        "{warning}"
    );
    let sock = server.unix.clone().expect("unix");
    // Idle clients, more than fit, on both kinds of listener: the server takes them in until
    // it is out of descriptors; the rest wait in the listen queues.
    let clients: Vec<Client> = (0..LIMIT)
        .map(|i| {
            if i % 2 == 0 {
                server.tcp_client()
            } else {
                server.unix_client()
            }
        })
        .collect();
    server.log.wait_for("an accept out of descriptors", |l| {
        l.contains("accept on") && l.contains("Too many open files")
    });
    let signalled = std::time::Instant::now();
    server.signal("TERM");
    let status = server.wait_exit();
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.log.text()
    );
    // The stop's own deadlines (2.5 s for clients still sending, then 1 s) bound it; idle
    // clients end at once.
    assert!(
        took < std::time::Duration::from_secs(5),
        "the stop took {took:?}; log:\n{}",
        server.log.text()
    );
    assert!(!sock.exists(), "socket file removed on exit");
    // The first client was taken in before the limit: it is hung up on, not left waiting.
    let mut first = clients.into_iter().next().expect("a client");
    first.expect_closed();
}

/// The soft open-file limit is raised to the hard one at start; a connection limit that fits
/// under it draws no warning.
#[test]
#[cfg(target_os = "linux")]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let server =
        TestServer::start_with_open_files(&["--db", "none", "--max-connections", "100"], 64, 256);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("a Max open files line")
        .split_whitespace()
        .collect();
    assert_eq!(open_files[..2], ["256", "256"], "{limits}");
    server.log.wait_for("the raise", |l| {
        l.contains("raised the open-file limit from 64 to 256")
    });
    // The warning would come before the ready line, which start() waited for.
    let log = server.log.text();
    assert!(!log.contains("needs an open-file limit"), "{log}");
}

#[test]
fn ipv6_loopback_when_available() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let dir = TempDir::new("v6");
    let server = TestServer::start_with(dir, vec!["--listen".into(), "[::1]:0".into()]);
    let addr = server.tcp_addr();
    assert!(addr.is_ipv6());
    let mut client = Client::tcp(addr);
    client.send("v6", b"ok").consume("v6", 1);
    assert_eq!(client.recv().text(), "ok");
}

#[test]
fn a_flood_of_refused_connections_logs_a_bounded_number_of_lines() {
    const REFUSED: usize = 200;
    let server = TestServer::start(&["--max-connections", "1"]);
    let mut admitted = server.tcp_client();
    admitted.sync();
    let started = std::time::Instant::now();
    for _ in 0..REFUSED {
        server.tcp_client().expect_closed();
    }
    let took = started.elapsed();
    let report = server
        .log
        .wait_for("a count of the suppressed refusals", |l| {
            l.contains("connection refused: ") && l.contains("similar lines suppressed")
        });
    let refusals = server
        .log
        .text()
        .lines()
        .filter(|l| l.contains("limit of 1 connections reached"))
        .count();
    let bound = 20 + 2 * (took.as_secs() as usize + 2);
    assert!(
        refusals <= bound,
        "{refusals} lines for {REFUSED} refusals in {took:?}"
    );
    assert!(report.contains("WARN"), "{report}");
    // The one admitted client never noticed.
    admitted.send("flood", b"fine").consume("flood", 1);
    assert_eq!(admitted.recv().text(), "fine");
}

/// A consume request for 0 messages asks for nothing: it does not make a connection a
/// consumer, which would exempt it from the idle timeout for good.
#[test]
fn a_consume_for_nothing_does_not_keep_a_connection_from_the_idle_timeout() {
    let server = TestServer::start(&["--idle-timeout-ms", "300"]);
    let mut asks_for_nothing = server.tcp_client();
    let peer = asks_for_nothing.local.clone().expect("tcp");
    asks_for_nothing.consume("later", 0);
    asks_for_nothing.expect_closed();
    server.log.wait_for("the idle line", |l| {
        l.contains(&peer) && l.contains("idle timeout")
    });
}

#[test]
fn idle_connections_are_closed_but_consumers_never_are() {
    let server = TestServer::start(&["--max-connections", "4", "--idle-timeout-ms", "500"]);
    // A consumer that waits for messages longer than the timeout, and one that holds one.
    let mut waiting = server.tcp_client();
    waiting.consume("later", 1);
    let mut holding = server.unix_client();
    holding.send("held", b"h").consume("held", 1);
    assert_eq!(holding.recv().text(), "h");
    // A producer that sent and then went quiet, and a connection that never said anything:
    // together they fill the server.
    let mut quiet_producer = server.tcp_client();
    quiet_producer.send("elsewhere", b"before going quiet");
    let mut silent = server.tcp_client();
    let silent_peer = silent.local.clone().expect("tcp");
    let started = std::time::Instant::now();
    quiet_producer.expect_closed();
    silent.expect_closed();

    assert!(
        started.elapsed() >= std::time::Duration::from_millis(400),
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );
    server.log.wait_for("the idle line", |l| {
        l.contains(&silent_peer) && l.contains("idle timeout")
    });
    // Their places are free again, what the quiet producer sent was kept, and the consumers,
    // idle for longer than the timeout, are still served.
    let mut admitted = None;
    common::wait_until("a place to free up", || {
        let mut probe = server.tcp_client();
        let ok = is_served(&mut probe);
        if ok {
            admitted = Some(probe);
        }
        ok
    });
    let mut producer = admitted.expect("admitted");
    producer.send("later", b"after").sync();
    assert_eq!(waiting.recv().text(), "after");
    assert!(holding.sync().is_empty());
    producer.consume("elsewhere", 1);
    assert_eq!(producer.recv().text(), "before going quiet");
}

/// Whether the server takes a message from `client` and hands it back to it: a refused
/// connection is closed before it gets either.
fn is_served(client: &mut Client) -> bool {
    let mut frames = Vec::new();
    encode_frame(
        &mut frames,
        MessageType::Send,
        &[(PacketType::Queue, b"probe"), (PacketType::Content, b"x")],
    );
    encode_frame(
        &mut frames,
        MessageType::Consume,
        &[(PacketType::Queue, b"probe"), (PacketType::Count, b"1")],
    );
    client.try_raw(&frames).is_ok() && matches!(client.try_recv(), Ok(Some(_)))
}

/// At the connection limit, a client that closes and connects again at once (a PHP worker
/// per job) is not refused for the moment its old connection's slot takes to come free: no
/// v1.0 send, which could not be told of a refusal, is lost.
#[test]
fn a_client_reconnecting_at_the_limit_waits_for_its_old_slot() {
    const ROUNDS: usize = 30;
    let server = TestServer::start(&["--max-connections", "1"]);
    for i in 0..ROUNDS {
        let mut client = server.tcp_client();
        client.send("churn", format!("{i}").as_bytes());
    }
    let mut consumer = server.tcp_client();
    consumer.consume("churn", ROUNDS as u64);
    let got: Vec<String> = (0..ROUNDS).map(|_| consumer.recv().text()).collect();
    let expected: Vec<String> = (0..ROUNDS).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "{}", server.log.text());
}
