//! The `phpmq` command line against a real server.

use crate::common;

use common::TestServer;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn phpmq(server: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phpmq"))
        .arg("--server")
        .arg(server)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start phpmq");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().expect("phpmq ran")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn send_texts_then_consume_them() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    let out = phpmq(&addr, &["send", "jobs", "first", "second"], None);
    assert!(out.status.success(), "{out:?}");
    let out = phpmq(&addr, &["consume", "jobs", "--count", "2"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "first\nsecond\n");
    // They were acknowledged: nothing is left.
    let out = phpmq(&addr, &["consume", "jobs", "--timeout", "1"], None);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "phpmq: no message within 1 s\n"
    );
}

#[test]
fn send_reads_lines_from_stdin_over_a_unix_socket() {
    let server = TestServer::start(&[]);
    let addr = format!("unix:{}", server.unix.as_ref().unwrap().display());
    let lines: String = (0..500).map(|i| format!("line {i}\n")).collect();
    let out = phpmq(&addr, &["send", "lines"], Some(lines.as_bytes()));
    assert!(out.status.success(), "{out:?}");
    let out = phpmq(
        &addr,
        &["consume", "lines", "--count", "500", "--prefetch", "7"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), lines);
}

#[test]
fn send_with_a_ttl_reaches_a_v11_consumer() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    let out = phpmq(&addr, &["send", "ttl", "soon", "--ttl", "300"], None);
    assert!(out.status.success(), "{out:?}");
    let mut consumer = server.tcp_client();
    consumer.dead_letter("ttl", "00000000000000000000000000000000");
    consumer.consume("ttl", 1);
    let d = consumer.recv();
    assert_eq!(d.text(), "soon");
    assert!(matches!(d.ttl, Some(299..=300)));
}

#[test]
fn consume_takes_no_more_than_it_prints() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    phpmq(&addr, &["send", "q", "a", "b", "c", "d"], None);
    let out = phpmq(
        &addr,
        &["consume", "q", "--count", "1", "--prefetch", "16"],
        None,
    );
    assert_eq!(stdout(&out), "a\n");
    let out = phpmq(&addr, &["consume", "q", "--count", "3"], None);
    assert_eq!(stdout(&out), "b\nc\nd\n", "nothing was lost or reordered");
}

#[test]
fn ping_prints_one_summary_line() {
    let server = TestServer::start(&[]);
    let out = phpmq(
        &server.tcp_addr().to_string(),
        &["ping", "--count", "20", "--interval-ms", "0"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let line = stdout(&out);
    assert!(line.starts_with("pings=20 min_us="), "{line}");
    for key in ["p50_us=", "p99_us=", "max_us="] {
        assert!(line.contains(key), "{line}");
    }
}

#[test]
fn errors_are_one_line_and_a_nonzero_exit() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let out = phpmq(&addr, &["send", "q", "x"], None);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("phpmq: cannot connect to {addr}: connection refused\n")
    );
    let out = phpmq("nowhere", &["send", "q", "x"], None);
    assert!(!out.status.success());
}

/// Usage errors exit 2 (whoever finds them: the parser, or a check of a value), before any
/// connection is tried; errors at run time exit 1.
#[test]
fn usage_errors_exit_2_without_connecting() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    for args in [
        &["send", "q", "--no-such-flag"][..],
        &["send"],
        &["send", "q", "x", "--timeout", "0"],
        &["consume", "q", "--timeout", "0"],
        &["flush"],
        &["bogus"],
        &["send", "", "x"],
        &["consume", &"q".repeat(256)],
        &["bench", "--timeout", "0"],
        &["bench", "--confirm", "-W", "0"],
    ] {
        let out = phpmq(&addr, args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!stderr(&out).contains("connect"), "{args:?}: {out:?}");
    }
    let out = phpmq(&addr, &["send", "q", "x"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Something that accepts a console connection and never greets (the message port given as
/// --admin by mistake) is an error after the greeting's timeout, not a hang.
#[test]
fn a_silent_console_address_is_an_error_not_a_hang() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_phpmq"))
        .args(["--admin", &addr, "status"])
        .stdin(Stdio::null())
        .output()
        .expect("phpmq ran");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("sent no console greeting within 10 s"),
        "{out:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    drop(silent);
}

/// `phpmq consume | head -1`: once the reader is gone, what could not be printed is not
/// acknowledged (it stays in its queue), and the error says so without a system error code.
#[test]
fn consume_acknowledges_nothing_it_could_not_print() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    let out = phpmq(&addr, &["send", "jobs", "kept"], None);
    assert!(out.status.success(), "{out:?}");
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_phpmq"))
        .args(["--server", &addr, "consume", "jobs"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("phpmq ran");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stderr(&out), "phpmq: standard output was closed\n");
    let out = phpmq(&addr, &["consume", "jobs", "--timeout", "5"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "kept\n");
}

#[test]
fn bench_reports_one_result_line_with_nothing_lost() {
    let server = TestServer::start(&[]);
    for addr in [
        server.tcp_addr().to_string(),
        format!("unix:{}", server.unix.as_ref().unwrap().display()),
    ] {
        let out = phpmq(
            &addr,
            &[
                "bench", "-P", "2", "-C", "3", "-N", "3000", "-S", "64", "-K", "8",
            ],
            None,
        );
        assert!(out.status.success(), "{out:?}");
        let line = stdout(&out);
        assert_eq!(line.lines().count(), 1, "{line}");
        for field in [
            "P=2",
            "C=3",
            "N=3000",
            "S=64",
            "K=8",
            "delivered=3000",
            "lost=0",
            "dups=0",
            "foreign=0",
            "msgs_per_s=",
            "p50_us=",
            "p99_us=",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        let transport = if addr.starts_with("unix:") {
            "transport=unix"
        } else {
            "transport=tcp"
        };
        assert!(line.starts_with(&format!("bench {transport} ")), "{line}");
    }
    let out = phpmq(&server.tcp_addr().to_string(), &["bench", "-S", "8"], None);
    assert!(!out.status.success(), "payloads under 16 bytes are refused");
}

/// `phpmq send` waits for v1.2 receipts: `--ids` prints the ids consumers then see, a
/// refused message makes it exit 1 with the message's number, and `--durable` needs a file.
#[test]
fn send_prints_receipt_ids_and_fails_for_a_refused_message() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    let out = phpmq(
        &addr,
        &["send", "--ids", "--durable", "jobs", "a", "b"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let ids: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");

    let out = phpmq(
        &addr,
        &["consume", "--verbose", "jobs", "--count", "2"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("{} 1 a\n{} 1 b\n", ids[0], ids[1]),
        "id, delivery count, text"
    );

    let capped = TestServer::start(&["--max-queue-length", "1"]);
    let out = phpmq(
        &capped.tcp_addr().to_string(),
        &["send", "q", "fits", "does not"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("message 2: refused by the server (429)"),
        "{err}"
    );
    assert!(err.contains("1 of 2 messages were refused"), "{err}");
    let out = phpmq(&addr, &["send", "", "nameless"], None);
    assert_eq!(
        stderr(&out),
        "phpmq: invalid queue name: 0 bytes (must be 1 to 255): \"\"\n",
        "refused before connecting"
    );

    let memory = TestServer::start(&["--db", "none"]);
    let out = phpmq(
        &memory.tcp_addr().to_string(),
        &["send", "--durable", "q", "x"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--db none"));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Each run takes exactly what it prints: the ack that frees a place goes after the lower
/// count, so no message is dispatched to a run that will not take it, and every delivery
/// count stays 1 (a dispatch handed back at exit would count as a failed try).
#[test]
fn consume_runs_one_at_a_time_keep_delivery_counts_exact() {
    let server = TestServer::start(&["--max-deliveries", "1"]);
    let addr = server.tcp_addr().to_string();
    phpmq(&addr, &["send", "q", "m1", "m2", "m3", "m4"], None);
    let mut printed = String::new();
    for _ in 0..4 {
        let out = phpmq(&addr, &["consume", "q", "--verbose"], None);
        assert!(out.status.success(), "{out:?}");
        printed.push_str(&stdout(&out));
    }
    let fields: Vec<(String, String)> = printed
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            (f.nth(1).unwrap().to_string(), f.next().unwrap().to_string())
        })
        .collect();
    let expected: Vec<(String, String)> = (1..=4).map(|i| ("1".into(), format!("m{i}"))).collect();
    assert_eq!(fields, expected, "{printed}");
    let status = server.console_command("status");
    assert!(!status.contains("q.dead"), "{status}");
}

/// `tail -f log | phpmq send q`: a line reaches the server when it is written, not when
/// standard input ends.
#[test]
fn send_from_stdin_sends_each_line_as_it_comes() {
    let server = TestServer::start(&[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_phpmq"))
        .args([
            "--server",
            &server.tcp_addr().to_string(),
            "send",
            "live",
            "--ids",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start phpmq");
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"first\n").unwrap();
    input.flush().unwrap();
    let mut consumer = server.tcp_client();
    consumer.consume("live", 10);
    assert_eq!(
        consumer.recv().text(),
        "first",
        "while standard input is open"
    );
    input.write_all(b"second\n").unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).lines().count(), 2, "{out:?}");
    assert_eq!(consumer.recv().text(), "second");
}

/// Lines are bytes: content that is not UTF-8 goes through as it is; a CR before the
/// newline is dropped.
#[test]
fn send_takes_lines_of_any_bytes() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    let out = phpmq(&addr, &["send", "bin"], Some(b"caf\xe9\nx\r\n\xff\x00y"));
    assert!(out.status.success(), "{out:?}");
    let out = phpmq(&addr, &["consume", "bin", "--count", "3"], None);
    assert_eq!(out.stdout, b"caf\xe9\nx\n\xff\x00y\n");
}

/// A message over the server's limit: the 413 is reported even when the write failed first
/// (the server closes without reading it), with how far the run got.
#[test]
fn send_reports_the_reason_and_how_far_it_got_when_the_server_closes() {
    let server = TestServer::start(&["--max-message-size", "1000"]);
    let addr = server.tcp_addr().to_string();
    let mut input = b"short\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 5_000_000));
    input.extend(b"\nnever\n");
    let out = phpmq(&addr, &["send", "big"], Some(&input));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(
            "message 2: refused by the server (413): packet 02 (content) declares 5000000 bytes"
        ),
        "{err}"
    );
    assert!(
        err.contains("stopped after 1 message with a receipt and 1 refused")
            && err.ends_with("the rest of the input was not sent\n"),
        "{err}"
    );
    let out = phpmq(&addr, &["consume", "big", "--count", "1"], None);
    assert_eq!(stdout(&out), "short\n");
}

/// What the server said when it refused a consume reaches the user; a bad queue name is
/// refused before connecting (a v1.0 connection would be closed without a word).
#[test]
fn consume_reports_refusals_and_bad_names() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr().to_string();
    let out = phpmq(&addr, &["consume", "q", "--lease", "99999999999"], None);
    assert_eq!(
        stderr(&out),
        "phpmq: refused by the server (422): packet 12 (lease) is over its maximum of \
         4294967295: \"99999999999\"\n"
    );
    let out = phpmq(&addr, &["consume", "bad\nname"], None);
    assert_eq!(
        stderr(&out),
        "phpmq: invalid queue name: contains a control character: \"bad\\nname\"\n"
    );
    let out = phpmq(&addr, &["consume", "q", "--timeout", "0"], None);
    assert!(
        stderr(&out).starts_with("phpmq: usage: phpmq consume --timeout"),
        "{out:?}"
    );
}

/// A host name works where an address does.
#[test]
fn the_server_may_be_named_by_host_name() {
    let server = TestServer::start(&[]);
    let named = format!("localhost:{}", server.tcp_addr().port());
    let out = phpmq(&named, &["send", "q", "by name"], None);
    assert!(out.status.success(), "{out:?}");
    let out = phpmq(&named, &["consume", "q"], None);
    assert_eq!(stdout(&out), "by name\n");
}

/// Something that accepts connections and never answers is not waited for without end.
#[test]
fn a_silent_listener_is_given_up_on() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = phpmq(&addr, &["send", "q", "x"], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "phpmq: {addr} accepted the connection but sent no answer within 10 s: is it a \
             phpmq server?\n"
        )
    );
}

/// `send --timeout`: a server that takes the messages and never answers (a durable receipt
/// waiting on a failing disk, say) is given up on, with how far the run got.
#[test]
fn send_gives_up_after_its_timeout_without_a_reply() {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut hello = [0u8; 256];
        let _ = socket.read(&mut hello).unwrap();
        let welcome = common::frame_bytes(8, &[(6, b"1.2"), (8, b"confirm stats durable")]);
        socket.write_all(&welcome).unwrap();
        // Takes whatever comes and never answers, until the client goes.
        let mut sink = Vec::new();
        let _ = socket.read_to_end(&mut sink);
    });
    let out = phpmq(
        &addr,
        &["send", "--durable", "--timeout", "1", "q", "x"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr(&out),
        "phpmq: no reply from the server within 1 s; stopped after 0 messages with a \
         receipt, 1 more sent without an answer (taken or not); the rest of the input was \
         not sent\n"
    );
    server.join().unwrap();
}
