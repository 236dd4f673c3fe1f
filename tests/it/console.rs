//! The maintenance console and the `phpmq status` / `phpmq flush` commands, against a real
//! server.

use crate::common;

use common::{TestServer, DEADLINE};
use phpmq::codec::{self, MessageType, PacketType};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const PROMPT: &str = "phpmq> ";

/// A raw console session, as a person with `nc` would have it.
struct Session {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Session {
    fn open(server: &TestServer) -> (Session, String) {
        let stream =
            TcpStream::connect(server.console.expect("console on")).expect("connect console");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut session = Session {
            stream,
            buf: Vec::new(),
        };
        let greeting = session.until(PROMPT);
        (session, greeting)
    }

    /// Reads until `marker`; returns what came before it.
    fn until(&mut self, marker: &str) -> String {
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if let Some(at) = text.find(marker) {
                self.buf.drain(..at + marker.len());
                return text[..at].to_string();
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .expect("console reply within the deadline");
            assert!(n > 0, "console closed; so far: {text:?}");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn run(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        self.until(PROMPT)
    }

    /// Waits until the test clients' sync() barriers are fully processed: their last frames
    /// (an ack and a consume of 0) travel on other connections and may still be in flight.
    fn settle(&mut self) {
        common::wait_until("the sync() barrier queues to go", || {
            !self.run("status json").contains("\"name\":\"barrier-")
        });
    }
}

fn busy_server() -> TestServer {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..30 {
        producer.send("orders", format!("order {i}").as_bytes());
    }
    producer.send("mail", b"hello").send("Mail-EU", b"hallo");
    producer.sync();
    server
}

#[test]
fn greeting_help_and_unknown_commands() {
    let server = busy_server();
    let (mut s, greeting) = Session::open(&server);
    assert!(greeting.starts_with("phpmq-server "), "{greeting}");
    let help = s.run("help");
    for command in [
        "help",
        "status",
        "monitor",
        "show QUEUE",
        "search PATTERN",
        "flush QUEUE",
        "flushall",
        "quit",
    ] {
        assert!(help.contains(command), "help lists {command}: {help}");
    }
    assert!(s.run("help show").starts_with("show QUEUE"));
    assert_eq!(
        s.run("launch rockets"),
        "error: unknown command \"launch\"; type help for the list\n"
    );
    assert!(
        s.run("status").contains("orders"),
        "the session goes on after an error"
    );
    assert_eq!(
        s.run("clear"),
        "\x1b[2J\x1b[H",
        "clear sends the clear-screen sequence"
    );
}

#[test]
fn status_shows_queues_and_server_totals() {
    let server = busy_server();
    let mut consumer = server.tcp_client();
    consumer.consume("orders", 5);
    assert_eq!(consumer.sync().len(), 5);
    let (mut s, _) = Session::open(&server);
    s.settle();
    // busy_server's producer has disconnected; its thread may still be finishing.
    common::wait_until("one client connection", || {
        s.run("status").contains(" 1 connection,")
    });
    let status = s.run("status");
    let lines: Vec<&str> = status.lines().collect();
    assert!(lines[0].starts_with("phpmq-server "), "{status}");
    // 32 sent plus one barrier message for each of the two sync() calls.
    assert!(status.contains("messages: 34 accepted"), "{status}");
    assert!(status.contains("last mirror: "), "{status}");
    let header = lines
        .iter()
        .find(|l| l.starts_with("queue"))
        .expect("table header");
    for column in ["ready", "in flight", "consumers", "bytes", "oldest"] {
        assert!(header.contains(column), "{header}");
    }
    let orders = lines
        .iter()
        .find(|l| l.starts_with("orders"))
        .expect("orders row");
    let cells: Vec<&str> = orders.split_whitespace().collect();
    assert_eq!(&cells[1..4], ["25", "5", "1"], "{orders}");
    assert!(status.contains("(3 queues)"), "{status}");

    let json = s.run("status json");
    assert_eq!(json.lines().count(), 1);
    assert!(json.starts_with(r#"{"server":{"version":""#), "{json}");
    assert!(
        json.contains(r#"{"name":"orders","ready":25,"in_flight":5,"consumers":1,"bytes":"#),
        "{json}"
    );
    assert!(json.contains(r#""totals":{"accepted":34,"#), "{json}");
}

/// Names in wide characters (CJK) take two terminal columns each: the table still lines up.
#[test]
fn the_status_table_lines_up_with_wide_names() {
    use unicode_width::UnicodeWidthStr;
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer.send("jobs", b"x").send("任务队列", b"y");
    producer.sync();
    let text = server.console_command("status");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["queue ", "jobs ", "任务队列 "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    // Every column after the name is right-aligned to a fixed width.
    let widths: Vec<usize> = rows.iter().map(|row| row.width()).collect();
    assert!(widths.iter().all(|w| *w == widths[0]), "{widths:?}\n{text}");
}

#[test]
fn monitor_redraws_until_q() {
    let server = busy_server();
    let (mut s, _) = Session::open(&server);
    s.stream.write_all(b"monitor\n").unwrap();
    let first = s.until("type q and Enter to stop");
    assert!(first.contains("orders"), "{first}");
    // A second screen comes by itself.
    let second = s.until("type q and Enter to stop");
    assert!(second.contains("\x1b[2J"), "the screen is redrawn");
    s.stream.write_all(b"q\n").unwrap();
    s.until(PROMPT);
    assert!(s.run("status").contains("orders"), "back at the prompt");
}

#[test]
fn show_lists_messages_capped_with_a_count_of_the_rest() {
    let server = busy_server();
    let mut producer = server.tcp_client();
    for i in 30..80 {
        producer.send("orders", format!("order {i}").as_bytes());
    }
    let mut consumer = server.tcp_client();
    consumer.consume("orders", 2);
    let held = [consumer.recv(), consumer.recv()];
    producer.sync();
    let (mut s, _) = Session::open(&server);
    let listing = s.run("show orders");
    assert!(
        listing.starts_with("queue orders: 80 messages\n"),
        "{listing}"
    );
    let rows: Vec<&str> = listing.lines().filter(|l| l.contains(" B ")).collect();
    assert_eq!(rows.len(), 50, "capped at 50 rows");
    assert!(rows[0].trim_start().starts_with("1 "), "{}", rows[0]);
    assert!(rows[0].ends_with("ready"));
    assert!(listing.ends_with("... and 30 more\n"), "{listing}");
    assert!(
        !listing.contains(&held[0].id),
        "in-flight rows come after the ready ones"
    );
    assert_eq!(
        s.run("show nothing-here"),
        "error: no queue named \"nothing-here\"\n"
    );
    let small = s.run("show mail");
    assert!(small.contains("ready"));
}

#[test]
fn search_is_case_insensitive_with_wildcards() {
    let server = busy_server();
    let (mut s, _) = Session::open(&server);
    assert_eq!(
        s.run("search mail*"),
        "Mail-EU\nmail\n(2 queues matching \"mail*\")\n"
    );
    assert_eq!(
        s.run("search *RDER*"),
        "orders\n(1 queue matching \"*RDER*\")\n"
    );
    assert_eq!(s.run("search x"), "(0 queues matching \"x\")\n");
}

#[test]
fn flush_drops_messages_for_good_and_ignores_later_acks() {
    let server = busy_server();
    let mut consumer = server.tcp_client();
    consumer.consume("orders", 1);
    let held = consumer.recv();
    let (mut s, _) = Session::open(&server);
    assert_eq!(s.run("flush orders"), "flushed 30 messages from orders\n");
    consumer.ack("orders", &held.id);
    assert!(
        consumer.sync().is_empty(),
        "the ack was ignored and nothing came"
    );
    let mut producer = server.tcp_client();
    producer.send("orders", b"after the flush");
    assert_eq!(
        consumer.recv().text(),
        "after the flush",
        "the consumer has room again"
    );
    s.settle();
    assert_eq!(s.run("flushall"), "flushed 3 messages from 3 queues\n");
    let json = s.run("status json");
    assert!(json.contains(r#""flushed":33"#), "{json}");
    assert!(json.ends_with("\"queues\":[{\"name\":\"orders\",\"ready\":0,\"in_flight\":0,\"consumers\":1,\"bytes\":0,\"oldest_ready_ms\":null,\"delayed\":0}]}\n"), "{json}");
}

#[test]
fn quit_and_exit_close_the_session() {
    let server = busy_server();
    for word in ["quit", "exit"] {
        let (mut s, _) = Session::open(&server);
        s.stream.write_all(format!("{word}\n").as_bytes()).unwrap();
        let mut rest = String::new();
        s.stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "bye\n");
    }
}

#[test]
fn console_over_a_unix_socket_and_turned_off() {
    let dir = common::TempDir::new("console-unix");
    let console = dir.path().join("console.sock");
    let msg = dir.path().join("msg.sock");
    let args = vec![
        "--listen".into(),
        format!("unix:{}", msg.display()),
        "--admin".into(),
        format!("unix:{}", console.display()),
    ];
    let server = TestServer::start_with(dir, args);
    let mut stream = std::os::unix::net::UnixStream::connect(&console).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(b"status\nquit\n").unwrap();
    let mut all = String::new();
    stream.read_to_string(&mut all).unwrap();
    assert!(all.contains("(0 queues)"), "{all}");
    drop(server);

    let off = TestServer::start(&["--admin", "none"]);
    let ready = off.log.wait_for("ready", |l| l.contains("ready;"));
    assert!(ready.contains("console off"), "{ready}");
    assert!(off.console.is_none());
}

fn phpmq(server: &TestServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_phpmq"))
        .args(["--admin", &server.console.unwrap().to_string()])
        .args(["--server", &server.tcp_addr().to_string()])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_status_and_flush() {
    let server = busy_server();
    let out = phpmq(&server, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("phpmq-server ") && text.contains("orders"),
        "{text}"
    );
    assert!(!text.contains(PROMPT));

    let out = phpmq(&server, &["status", "--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.starts_with("{\"server\":{") && json.trim_end().ends_with("]}"),
        "{json}"
    );
    assert_eq!(json.lines().count(), 1);

    let out = phpmq(&server, &["flush", "mail"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "flushed 1 message from mail\n"
    );
    let out = phpmq(&server, &["flush", "mail"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "phpmq: no queue named \"mail\"\n"
    );
    Session::open(&server).0.settle();
    let out = phpmq(&server, &["flush", "--all"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "flushed 31 messages from 2 queues\n"
    );
    let out = phpmq(&server, &["flush"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("phpmq: usage: "));
}

#[test]
fn cli_status_without_a_console_says_so() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let out = Command::new(env!("CARGO_BIN_EXE_phpmq"))
        .args(["--admin", &addr, "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("phpmq: cannot connect to {addr}: connection refused\n")
    );
}

#[test]
fn names_with_invisible_characters_are_shown_escaped_and_read_back() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    // "jobs" and "jobs " are two queues; U+202E would reverse the rest of the line on a terminal.
    producer
        .send("jobs", b"plain")
        .send("jobs ", b"trailing space")
        .send("jobs ", b"trailing space 2")
        .send("evil\u{202e}gpj.exe", b"bidi")
        .send("zero\u{200b}width", b"zw");
    producer.sync();
    let (mut s, _) = Session::open(&server);
    s.settle();

    let status = s.run("status");
    for raw in ["\u{202e}", "\u{200b}"] {
        assert!(!status.contains(raw), "{raw:?} shown raw: {status}");
    }
    for shown in [
        "\"jobs \"",
        "\"evil\\u{202e}gpj.exe\"",
        "\"zero\\u{200b}width\"",
    ] {
        assert!(status.contains(shown), "no {shown} in {status}");
    }
    assert_eq!(status.lines().filter(|l| l.starts_with("jobs ")).count(), 1);

    let found = s.run("search *");
    let mut lines: Vec<&str> = found.lines().collect();
    assert_eq!(lines.pop(), Some("(4 queues matching \"*\")"));
    lines.sort();
    assert_eq!(
        lines,
        [
            "\"evil\\u{202e}gpj.exe\"",
            "\"jobs \"",
            "\"zero\\u{200b}width\"",
            "jobs"
        ]
    );

    // Every name shown can be typed back; `show jobs ` is the plain queue (trimmed).
    let spaced = s.run("show \"jobs \"");
    assert!(
        spaced.starts_with("queue \"jobs \": 2 messages\n"),
        "{spaced}"
    );
    let plain = s.run("show jobs ");
    assert!(plain.starts_with("queue jobs: 1 message\n"), "{plain}");
    let bidi = s.run("show \"evil\\u{202e}gpj.exe\"");
    assert!(
        bidi.starts_with("queue \"evil\\u{202e}gpj.exe\": 1 message\n"),
        "{bidi}"
    );
    assert!(s.run("show \"jobs").starts_with("error: "));

    // JSON keeps the exact names.
    let json = s.run("status json");
    assert!(json.contains("\"name\":\"jobs \""), "{json}");
    assert!(json.contains("\"name\":\"evil\u{202e}gpj.exe\""), "{json}");

    assert_eq!(
        s.run("flush \"zero\\u{200b}width\""),
        "flushed 1 message from \"zero\\u{200b}width\"\n"
    );
    // The command line quotes what it passes on.
    let out = phpmq(&server, &["flush", "jobs "]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "flushed 2 messages from \"jobs \"\n"
    );
    assert!(s.run("show jobs").starts_with("queue jobs: 1 message\n"));
}

/// A server with `n` queues of one message each, made with one pipelined write.
fn server_with_queues(n: usize) -> TestServer {
    let server = TestServer::start(&["--db", "none"]);
    let mut producer = server.tcp_client();
    let mut frames = Vec::with_capacity(n * 80);
    for i in 0..n {
        let queue = format!("q{i:06}");
        codec::encode_frame(
            &mut frames,
            MessageType::Send,
            &[
                (PacketType::Queue, queue.as_bytes()),
                (PacketType::Content, b"m"),
            ],
        );
    }
    producer.raw(&frames).sync();
    server
}

/// The third-longest round trip (send, dispatch, ack) a client sees while another runs
/// `command` on the console over and over (at least 5 times), and how many times it ran. The
/// third: a stall the command causes comes back with every run, a hiccup of a busy machine
/// does not.
fn worst_round_trip_during(server: &TestServer, command: &'static str) -> (Duration, usize) {
    let (mut console, _) = Session::open(server);
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicUsize::new(0));
    let runner = {
        let (stop, runs) = (stop.clone(), runs.clone());
        thread::spawn(move || {
            // Read each reply up to its prompt with a check of the tail only: a status of
            // 100,000 queues is megabytes, too much for `Session::until`.
            let mut chunk = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                console
                    .stream
                    .write_all(format!("{command}\n").as_bytes())
                    .unwrap();
                let mut reply = Vec::new();
                while !reply.ends_with(PROMPT.as_bytes()) {
                    let n = console.stream.read(&mut chunk).expect("a reply in time");
                    assert!(n > 0, "console closed");
                    reply.extend_from_slice(&chunk[..n]);
                }
                runs.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut pinger = server.tcp_client();
    pinger.consume("ping", 1);
    let started = Instant::now();
    let mut trips = Vec::new();
    // At least 2 runs of the command and 2 s of round trips, within the deadline (a run of
    // `status` over 100,000 queues takes seconds in a debug build on a busy machine).
    while runs.load(Ordering::Relaxed) < 2 || started.elapsed() < Duration::from_secs(2) {
        assert!(started.elapsed() < DEADLINE, "{command} ran too slowly");
        let sent = Instant::now();
        pinger.send("ping", b"p");
        let d = pinger.recv();
        trips.push(sent.elapsed());
        pinger.ack("ping", &d.id);
    }
    stop.store(true, Ordering::Relaxed);
    runner.join().expect("console thread");
    trips.sort_unstable_by(|a, b| b.cmp(a));
    (trips[2], runs.load(Ordering::Relaxed))
}

#[test]
fn status_over_100k_queues_does_not_stall_other_clients() {
    let server = server_with_queues(100_000);
    let (floor, _) = worst_round_trip_during(&server, "help");
    for command in ["status", "search q0999*"] {
        let (worst, runs) = worst_round_trip_during(&server, command);
        eprintln!(
            "third-longest round trip during {runs} runs of {command}: {worst:?} (help: {floor:?})"
        );
        // Walking every queue under one lock stalled others by the length of the walk (~100 ms
        // in a release build, ~300 ms in a debug one); in chunks a round trip waits for one
        // chunk at most (~30 ms here, most of it the machine being busy). The margin is for a
        // noisy 2-core machine (100 ms failed once under a parallel build): the test runs a
        // debug build, whose unchunked walk stalls ~300 ms.
        assert!(
            worst < Duration::from_millis(200),
            "round trips took {worst:?} and more during {command}"
        );
    }
}

#[test]
fn an_idle_session_is_closed_with_a_line_saying_why() {
    let server = TestServer::start(&["--console-idle-timeout-ms", "700"]);
    let (mut idle, _) = Session::open(&server);
    let (mut busy, _) = Session::open(&server);
    let opened = std::time::Instant::now();
    // A session that keeps giving commands stays, however long it lives.
    let mut rest = String::new();
    let reader = std::thread::spawn(move || {
        idle.stream.read_to_string(&mut rest).unwrap();
        (rest, opened.elapsed())
    });
    let mut commands = 0;
    while !reader.is_finished() {
        assert!(busy.run("status").contains("queues"));
        commands += 1;
        assert!(
            opened.elapsed() < DEADLINE,
            "the idle session was never closed"
        );
        // Time passing, not synchronisation: a command every 150 ms is well within 700 ms.
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let (rest, after) = reader.join().unwrap();
    assert!(commands > 0);
    assert_eq!(
        rest, "\nerror: no command for 700 ms; closing this idle session\n",
        "after {after:?}"
    );
    assert!(after >= std::time::Duration::from_millis(700), "{after:?}");
    assert!(busy.run("status").contains("queues"), "the busy one stays");
}

#[test]
fn the_17th_session_is_refused_with_a_line_saying_why() {
    let server = TestServer::start(&[]);
    let sessions: Vec<Session> = (0..16).map(|_| Session::open(&server).0).collect();
    let mut refused =
        TcpStream::connect(server.console.expect("console on")).expect("connect console");
    refused.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut all = String::new();
    refused.read_to_string(&mut all).unwrap();
    assert_eq!(
        all,
        "error: too many console sessions (16); try again later\n"
    );
    let out = phpmq(&server, &["status"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("too many console sessions"), "{stderr}");
    server.log.wait_for("a refusal", |l| {
        l.contains("limit of 16 console sessions reached")
    });
    // A place frees up when a session ends.
    drop(sessions);
    common::wait_until("a session to be admitted again", || {
        let out = phpmq(&server, &["status"]);
        out.status.success()
    });
}

/// `status json` read as a program would: parsed, with every documented field there and of its
/// documented type (phpmq(1), STATUS JSON); `null` only where the man page allows it.
#[test]
fn status_json_parses_with_the_documented_fields_and_types() {
    use serde_json::Value;
    fn is_count(v: &Value) -> bool {
        v.is_u64()
    }
    fn count_or_null(v: &Value) -> bool {
        v.is_u64() || v.is_null()
    }
    /// A field's name and the test its value must pass.
    type Field = (&'static str, fn(&Value) -> bool);
    fn check(object: &Value, fields: &[Field]) {
        for (name, ok) in fields {
            let value = object
                .get(name)
                .unwrap_or_else(|| panic!("no field {name:?} in {object}"));
            assert!(ok(value), "field {name:?} is {value} in {object}");
        }
    }
    let parse = |text: &str| -> Value {
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(text.trim_end()).unwrap_or_else(|e| panic!("{e}: {text}"))
    };

    let server = busy_server();
    let (mut s, _) = Session::open(&server);
    s.settle();
    let doc = parse(&s.run("status json"));
    let srv = &doc["server"];
    check(
        srv,
        &[
            ("version", Value::is_string),
            ("uptime_s", is_count),
            ("connections", is_count),
            ("rss_bytes", count_or_null),
            ("db", Value::is_string),
            ("last_mirror", Value::is_object),
            ("mirror", Value::is_object),
            ("totals", Value::is_object),
        ],
    );
    assert_eq!(srv["version"], env!("CARGO_PKG_VERSION"));
    assert!(srv["db"]
        .as_str()
        .is_some_and(|db| db.ends_with("phpmq.sqlite")));
    check(
        &srv["last_mirror"],
        &[
            ("at_ms", is_count),
            ("age_ms", is_count),
            ("duration_ms", is_count),
            ("messages", Value::is_i64),
            ("bytes", is_count),
            ("written_bytes", count_or_null),
            ("full", Value::is_boolean),
        ],
    );
    check(
        &srv["mirror"],
        &[
            ("completed", is_count),
            ("full_copies", is_count),
            ("failures", is_count),
            ("failing_for", is_count),
            ("last_error", Value::is_null),
            ("last_error_at_ms", Value::is_null),
            ("written_bytes", is_count),
            ("pending_changes", is_count),
        ],
    );
    assert!(srv["mirror"]["completed"].as_u64() >= Some(1), "{doc}");
    assert_eq!(srv["mirror"]["failures"], 0, "{doc}");
    let totals: [Field; 9] = [
        ("accepted", is_count),
        ("delivered", is_count),
        ("acknowledged", is_count),
        ("requeued", is_count),
        ("expired", is_count),
        ("dead_lettered", is_count),
        ("flushed", is_count),
        ("moved_to_dead", is_count),
        ("redriven", is_count),
    ];
    check(&srv["totals"], &totals);
    assert!(srv["totals"]["accepted"].as_u64() >= Some(32), "{doc}");
    let queues = doc["queues"].as_array().expect("queues is an array");
    for queue in queues {
        check(
            queue,
            &[
                ("name", Value::is_string),
                ("ready", is_count),
                ("in_flight", is_count),
                ("consumers", is_count),
                ("bytes", is_count),
                ("oldest_ready_ms", count_or_null),
                ("delayed", is_count),
            ],
        );
    }
    let names: Vec<&str> = queues.iter().filter_map(|q| q["name"].as_str()).collect();
    assert_eq!(names, ["Mail-EU", "mail", "orders"], "sorted by name");
    let orders = &queues[2];
    assert_eq!(
        (&orders["ready"], &orders["in_flight"], &orders["bytes"]),
        (&Value::from(30), &Value::from(0), &Value::from(230)),
        "{orders}"
    );
    assert!(orders["oldest_ready_ms"].is_u64(), "{orders}");

    // Memory only: no storage, so null where its fields would be.
    let memory_only = TestServer::start(&["--db", "none"]);
    let (mut s, _) = Session::open(&memory_only);
    let doc = parse(&s.run("status json"));
    for field in ["db", "last_mirror", "mirror"] {
        assert!(doc["server"][field].is_null(), "{field}: {doc}");
    }
    check(&doc["server"]["totals"], &totals);
    assert_eq!(doc["queues"], Value::Array(Vec::new()));
}

/// A client that streams bytes without a newline is told its line is too long and cut off
/// once it passes the limit: the console does not buffer it without end.
#[test]
fn a_line_without_end_is_cut_off_at_the_limit() {
    let server = TestServer::start(&[]);
    let (mut s, _) = Session::open(&server);
    let writer = s.stream.try_clone().unwrap();
    // Far past the 4096-byte limit; the server closes before it has read it all, which may
    // fail the writes: that is the point.
    let sender = thread::spawn(move || {
        let mut writer = writer;
        let chunk = [b'x'; 64 << 10];
        for _ in 0..256 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut reply = Vec::new();
    let _ = s.stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.contains("error: command line too long"), "{reply:?}");
    sender.join().unwrap();
    // The console still serves others.
    let (mut other, _) = Session::open(&server);
    assert!(other.run("help").contains("status"));
}
