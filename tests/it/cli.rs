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

    let out = phpmq(&addr, &["send", "", "nameless"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("message 1: refused by the server (422)"),
        "{err}"
    );
    assert!(err.contains("1 of 1 messages were refused"), "{err}");

    let memory = TestServer::start(&["--db", "none"]);
    let out = phpmq(
        &memory.tcp_addr().to_string(),
        &["send", "--durable", "q", "x"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--db none"));
}
