//! Bad input closes only the offending connection, with one warning naming the peer and the
//! reason; a bystander goes on, and nothing accepted is lost.

use crate::common;

use common::{Client, TestServer};
use phpmq::codec::{encode_frame, MessageType, PacketType};

fn frame(t: MessageType, packets: &[(PacketType, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, t, packets);
    out
}

/// A packet header by hand, for frames the encoder would not write.
fn packet(code: &str, content: &[u8]) -> Vec<u8> {
    let mut out = format!("P{code}{:029}", content.len()).into_bytes();
    out.extend_from_slice(content);
    out
}

/// Sends `bad` after a valid send and while holding a message, then checks: the connection is
/// closed, one warning names the peer and `reason`, the valid send was kept, the held message
/// went to the bystander, and the bystander kept working throughout.
fn check_rejected(server: &TestServer, bad: &[u8], reason: &str) {
    let queue = format!("bystand-{}", reason.len() ^ bad.len());
    let mut bystander = server.tcp_client();
    bystander.send(&queue, b"held-by-offender");
    bystander.sync();

    let mut offender = server.tcp_client();
    // As the server names it: "127.0.0.1:PORT (connection N)".
    let peer = format!("{} (", offender.local.clone().expect("tcp"));
    offender.consume(&queue, 1);
    let held = offender.recv();
    assert_eq!(held.text(), "held-by-offender");
    offender.send(&queue, b"sent-before-the-bad-frame");
    offender.raw(bad);
    offender.expect_closed();

    let line = server
        .log
        .wait_for(&format!("naming {peer} and {reason:?}"), |l| {
            l.contains(&peer) && l.contains(reason)
        });
    assert!(line.contains("WARN"), "a warning: {line}");
    let warnings = server
        .log
        .text()
        .lines()
        .filter(|l| l.contains(&peer) && l.contains("WARN"))
        .count();
    assert_eq!(
        warnings,
        1,
        "exactly one warning for the peer:\n{}",
        server.log.text()
    );

    bystander.consume(&queue, 10);
    let mut got = vec![bystander.recv().text(), bystander.recv().text()];
    got.sort();
    assert_eq!(got, ["held-by-offender", "sent-before-the-bad-frame"]);
    assert!(bystander.sync().is_empty());
}

#[test]
fn wrong_magic_byte() {
    let server = TestServer::start(&[]);
    check_rejected(&server, b"X0100102", "does not start with 'H'");
}

#[test]
fn non_digit_header_fields() {
    let server = TestServer::start(&[]);
    check_rejected(&server, b"H01x0102", "malformed message header");
}

#[test]
fn unknown_version() {
    let server = TestServer::start(&[]);
    check_rejected(&server, b"H0200102", "unsupported protocol version 02");
}

#[test]
fn unknown_message_type() {
    let server = TestServer::start(&[]);
    check_rejected(&server, b"H0100902", "unknown message type 009");
}

#[test]
fn server_to_client_type() {
    let server = TestServer::start(&[]);
    let bad = frame(
        MessageType::Dispatch,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::Content, b"c"),
            (PacketType::MessageId, b"i"),
        ],
    );
    check_rejected(&server, &bad, "sent by servers, not clients");
}

#[test]
fn packet_count_that_does_not_fit_the_type() {
    let server = TestServer::start(&[]);
    check_rejected(&server, b"H0100205", "cannot have 5 packets");
}

#[test]
fn missing_required_packet() {
    let server = TestServer::start(&[]);
    let mut bad = b"H0100102".to_vec();
    bad.extend(packet("01", b"q"));
    bad.extend(packet("05", b"60"));
    check_rejected(&server, &bad, "is missing packet 02 (content)");
}

#[test]
fn duplicated_packet() {
    let server = TestServer::start(&[]);
    let mut bad = b"H0100102".to_vec();
    bad.extend(packet("01", b"q"));
    bad.extend(packet("01", b"q"));
    check_rejected(&server, &bad, "duplicated packet 01 (queue)");
}

#[test]
fn unknown_packet_type() {
    let server = TestServer::start(&[]);
    let mut bad = b"H0100102".to_vec();
    bad.extend(packet("07", b"q"));
    check_rejected(&server, &bad, "unknown packet type 07");
}

#[test]
fn packet_over_the_size_limit() {
    let server = TestServer::start(&["--max-message-size", "1024"]);
    let mut bad = b"H0100102".to_vec();
    bad.extend(packet("01", b"q"));
    bad.extend(format!("P02{:029}", 2048).into_bytes());
    check_rejected(
        &server,
        &bad,
        "declares 2048 bytes, over the limit of 1024 bytes",
    );
}

/// `--max-message-size` bounds message content only: set below an id's 32 bytes, it used to
/// close every consumer at its first ack, and the message came back for ever.
#[test]
fn a_tiny_max_message_size_still_lets_consumers_ack() {
    let server = TestServer::start(&["--max-message-size", "10", "--log-level", "debug"]);
    let mut consumer = server.tcp_client();
    let got = consumer.send("tiny", b"hi").consume("tiny", 1).recv();
    assert_eq!(got.text(), "hi");
    consumer.ack("tiny", &got.id);
    // Acknowledged: a second consumer after the first has gone finds nothing.
    server.disconnect_and_wait(consumer);
    let mut second = server.tcp_client();
    second.consume("tiny", 1);
    assert!(second.sync().is_empty(), "the message came back");
}

/// The audit's case: a queue name may be declared far over the longest valid one. The server
/// refuses it from the packet header (413 on v1.2) instead of buffering the name for the whole
/// frame timeout; only the header is ever sent here, so waiting for the content would have
/// meant no reply until the frame timeout (30 s by default, beyond the client's deadline).
#[test]
fn an_overlong_queue_name_gets_413_from_its_header_alone() {
    let server = TestServer::start(&[]);
    let mut client = server.tcp_client();
    let peer = format!("{} (", client.local.clone().expect("tcp"));
    client.hello("1.2", "");
    client.expect_frame(8);
    let started = std::time::Instant::now();
    client.raw(format!("H0100102P01{:029}", 1 << 20).as_bytes());
    let error = client.expect_frame(10);
    assert_eq!(error.text(10), "413");
    let reason = "packet 01 (queue) declares 1048576 bytes, over the limit of 1024 bytes";
    assert_eq!(error.text(2), reason);
    client.expect_closed();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "answered from the header, not after a stall: {:?}",
        started.elapsed()
    );
    server.log.wait_for("the 413's warning", |l| {
        l.contains(&peer) && l.contains(reason)
    });

    // Before v1.2 the same header closes the connection without a reply, as any bad frame.
    let bad = format!("H0100202P01{:029}", 1 << 20).into_bytes();
    check_rejected(&server, &bad, reason);
}

#[test]
fn invalid_queue_names() {
    let server = TestServer::start(&[]);
    let bad = frame(
        MessageType::Send,
        &[(PacketType::Queue, b"a\nb"), (PacketType::Content, b"c")],
    );
    check_rejected(
        &server,
        &bad,
        "invalid queue name: contains a control character",
    );
    let bad = frame(
        MessageType::Send,
        &[(PacketType::Queue, b""), (PacketType::Content, b"c")],
    );
    check_rejected(&server, &bad, "invalid queue name: 0 bytes");
    let long = vec![b'q'; 256];
    let bad = frame(
        MessageType::Consume,
        &[(PacketType::Queue, &long), (PacketType::Count, b"1")],
    );
    check_rejected(&server, &bad, "invalid queue name: 256 bytes");
}

#[test]
fn non_numeric_count() {
    let server = TestServer::start(&[]);
    let bad = frame(
        MessageType::Consume,
        &[(PacketType::Queue, b"q"), (PacketType::Count, b"ten")],
    );
    check_rejected(&server, &bad, "packet 04 (count) is not a decimal number");
}

#[test]
fn non_numeric_ttl() {
    let server = TestServer::start(&[]);
    let bad = frame(
        MessageType::Send,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::Content, b"c"),
            (PacketType::Ttl, b"-5"),
        ],
    );
    check_rejected(&server, &bad, "packet 05 (ttl) is not a decimal number");
}

#[test]
fn frame_cut_off_by_eof() {
    let server = TestServer::start(&[]);
    let mut bystander = server.tcp_client();
    let mut offender = server.tcp_client();
    let peer = offender.local.clone().expect("tcp");
    offender.send("cut", b"whole");
    let whole = frame(
        MessageType::Send,
        &[
            (PacketType::Queue, b"cut"),
            (PacketType::Content, b"never finished"),
        ],
    );
    offender.raw(&whole[..whole.len() - 3]);
    offender.shutdown_write();
    offender.expect_closed();
    server.log.wait_for("for the cut-off frame", |l| {
        l.contains(&peer) && l.contains("closed in the middle of a frame")
    });
    bystander.consume("cut", 5);
    assert_eq!(bystander.recv().text(), "whole");
    assert!(
        bystander.sync().is_empty(),
        "the cut-off message was not accepted"
    );
}

#[test]
fn a_stalled_frame_does_not_hold_its_thread() {
    let server = TestServer::start(&["--frame-timeout-ms", "300"]);
    let mut bystander = server.tcp_client();
    let mut staller = server.tcp_client();
    let peer = staller.local.clone().expect("tcp");
    staller.raw(b"H0100102P01000");
    // Idle between frames is fine: this one has said nothing at all.
    let mut idle = server.tcp_client();
    staller.expect_closed();
    server.log.wait_for("for the stall", |l| {
        l.contains(&peer) && l.contains("not completed within 300 ms")
    });
    idle.send("idle", b"still here");
    idle.consume("idle", 1);
    assert_eq!(idle.recv().text(), "still here");
    assert!(bystander.sync().is_empty());
}

#[test]
fn garbage_over_a_unix_socket() {
    let server = TestServer::start(&[]);
    let mut bystander = server.unix_client();
    let mut offender = server.unix_client();
    offender.raw(&[0xff; 64]);
    offender.expect_closed();
    server.log.wait_for("for the unix offender", |l| {
        l.contains("unix:") && l.contains("does not start with 'H' (got byte 0xff)")
    });
    bystander.send("u", b"fine");
    bystander.consume("u", 1);
    assert_eq!(bystander.recv().text(), "fine");
}

#[test]
fn every_byte_value_as_a_first_byte_is_handled() {
    let server = TestServer::start(&[]);
    let mut bystander = server.tcp_client();
    for byte in [0u8, b'\n', b'P', b'h', 0x7f, 0x80, 0xfe] {
        let mut offender = server.tcp_client();
        offender.raw(&[byte, b'0', b'1']);
        offender.expect_closed();
    }
    let mut client: Client = server.tcp_client();
    client.send("after", b"ok");
    client.consume("after", 1);
    assert_eq!(client.recv().text(), "ok");
    assert!(bystander.sync().is_empty());
}

#[test]
fn a_declared_length_commits_no_memory_until_the_bytes_come() {
    const CONNECTIONS: usize = 300;
    const LIMIT: u64 = 100 << 20;
    let server = TestServer::start(&["--frame-timeout-ms", "60000"]);
    let pid = server.pid();
    let port = server.tcp_addr().port();
    server.tcp_client().sync();
    let before = common::rss_bytes(pid);
    // A send frame's header and queue packet, then a content packet declaring 16 MiB, and
    // nothing of it.
    let mut header = b"H0100102".to_vec();
    header.extend(packet("01", b"hold"));
    header.extend(format!("P02{:029}", 16 << 20).into_bytes());
    let mut clients = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut client = server.tcp_client();
        client.raw(&header);
        ports.push(
            client
                .local
                .as_deref()
                .and_then(|a| a.rsplit(':').next()?.parse().ok()),
        );
        clients.push(client);
        // Checked as it goes: on a server that commits the declared length, this stops the
        // test long before it takes gigabytes.
        let rise = common::rss_bytes(pid).saturating_sub(before);
        assert!(
            rise < LIMIT,
            "RSS rose by {} MB after {} connections",
            rise >> 20,
            clients.len()
        );
    }
    let ports: Vec<u16> = ports
        .into_iter()
        .map(|p| p.expect("a client port"))
        .collect();
    // Only once the server has read every header is the measurement meaningful.
    common::wait_until("the server to read every header", || {
        let unread = common::tcp_unread(port);
        ports.iter().all(|p| unread.get(p) == Some(&0))
    });
    let rise = common::rss_bytes(pid).saturating_sub(before);
    assert!(
        rise < LIMIT,
        "{CONNECTIONS} connections declaring 16 MiB each raised RSS by {} MB",
        rise >> 20
    );
    eprintln!(
        "RSS rise with {CONNECTIONS} declared 16 MiB frames: {} KB",
        rise >> 10
    );
    // Still a working server, and a frame that really is large still arrives whole.
    let big = vec![7u8; 3 << 20];
    let mut bystander = server.tcp_client();
    bystander.send("big", &big).consume("big", 1);
    assert_eq!(bystander.recv().content, big);
    drop(clients);
}

/// Messages still arriving share a bounded memory (`--frame-memory`): clients that send all
/// of a large message but its last byte and stall hold only their shares, a third large
/// message waits unread until one is free, and small messages flow meanwhile. Nothing is lost:
/// every message arrives once its sender finishes it.
#[test]
fn large_frames_under_way_share_a_bounded_memory() {
    const SIZE: usize = 1_000_000;
    // The least --frame-memory allows for SIZE (two frames of it, plus 640 KiB), not three.
    let server = TestServer::start(&[
        "--max-message-size",
        "1000000",
        "--frame-memory",
        "2700000",
        "--frame-timeout-ms",
        "60000",
    ]);
    let port = server.tcp_addr().port();
    let mut consumer = server.tcp_client();
    consumer.consume("big", 10).consume("small", 10);
    consumer.sync();
    let whole = frame(
        MessageType::Send,
        &[
            (PacketType::Queue, b"big"),
            (PacketType::Content, &[b'x'; SIZE]),
        ],
    );
    let (held, last) = whole.split_at(whole.len() - 1);
    let mut holders: Vec<Client> = (0..2).map(|_| server.tcp_client()).collect();
    for holder in &mut holders {
        holder.raw(held);
    }
    common::wait_until("the server to read the two held frames", || {
        let unread = common::tcp_unread(port);
        holders
            .iter()
            .all(|h| unread.get(&h.port()) == Some(&0) && common::tcp_unsent(h.port()) == Some(0))
    });
    let mut waiter = server.tcp_client();
    let waiter_port = waiter.port();
    let whole_for_waiter = whole.clone();
    let writing = std::thread::spawn(move || {
        waiter.raw(&whole_for_waiter);
        waiter
    });
    common::wait_until("the third frame's bytes to wait at the server", || {
        common::tcp_unread(port)
            .get(&waiter_port)
            .is_some_and(|&n| n > 0)
    });
    let mut small = server.tcp_client();
    small.send("small", b"goes through");
    // Its queue only: a large message's content would fill the report.
    assert_eq!(consumer.recv().queue, "small");
    consumer.set_read_timeout(std::time::Duration::from_millis(300));
    match consumer.try_recv() {
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!(
            "the third large message was read meanwhile: {:?}",
            other.map(|d| d.map(|d| d.queue))
        ),
    }
    consumer.set_read_timeout(common::DEADLINE);
    // A share comes free: the waiting frame is read, and both arrive.
    holders[0].raw(last);
    let arrived = [consumer.recv(), consumer.recv()];
    assert!(arrived
        .iter()
        .all(|d| d.queue == "big" && d.content.len() == SIZE));
    holders[1].raw(last);
    assert_eq!(consumer.recv().content.len(), SIZE);
    let _waiter = writing.join().expect("the waiter's write");
    assert!(!server.log.text().contains("WARN"), "{}", server.log.text());
}

#[test]
fn a_flood_of_bad_frames_logs_a_bounded_number_of_lines_and_counts_the_rest() {
    const OFFENDERS: usize = 300;
    let server = TestServer::start(&[]);
    let started = std::time::Instant::now();
    let mut offenders: Vec<Client> = (0..OFFENDERS)
        .map(|_| {
            let mut offender = server.tcp_client();
            offender.raw(b"X0100102");
            offender
        })
        .collect();
    for offender in &mut offenders {
        offender.expect_closed();
    }
    let took = started.elapsed();
    // Every one is accounted for: logged, or counted in a "suppressed" line (the count of a
    // kind that went quiet is logged within about a second).
    let accounted = || {
        let log = server.log.text();
        let logged = log
            .lines()
            .filter(|l| l.contains("closing connection: bad frame"))
            .count();
        let suppressed: usize = log
            .lines()
            .filter(|l| l.contains("connection closed: ") && l.contains("suppressed"))
            .chain(
                log.lines()
                    .filter(|l| l.contains("closing connection: bad frame")),
            )
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| w.starts_with("similar"))?;
                words[at - 1].trim_start_matches('(').parse::<usize>().ok()
            })
            .sum();
        (logged, suppressed)
    };
    common::wait_until("every bad frame to be logged or counted", || {
        let (logged, suppressed) = accounted();
        logged + suppressed == OFFENDERS
    });
    let (logged, suppressed) = accounted();
    // A burst of 20, then 2 a second, while the flood lasted and until the last report.
    let bound = 20 + 2 * (took.as_secs() as usize + 2);
    assert!(
        logged <= bound,
        "{logged} lines for {OFFENDERS} bad frames in {took:?} (at most {bound} expected):\n{}",
        server.log.text()
    );
    assert!(suppressed > 0, "{suppressed} suppressed");
    eprintln!(
        "{OFFENDERS} bad frames in {took:?}: {logged} lines, {suppressed} counted as suppressed"
    );
    // The warnings that did get through still name the peer and the reason.
    let line = server.log.wait_for("a warning for a bad frame", |l| {
        l.contains("closing connection: bad frame")
    });
    assert!(
        line.contains("WARN") && line.contains("127.0.0.1:"),
        "{line}"
    );
    assert!(line.contains("does not start with 'H'"), "{line}");
}

/// v1.2 (rule 2): a connection that did not start with an answered HELLO never gets a v1.2
/// frame. Its v1.2 types and packets are bad frames, closed without a reply. (A late HELLO is
/// answered with ERROR 400: `v12::hello_must_be_the_first_frame_and_well_formed`.)
#[test]
fn v12_frames_on_a_v1_connection_close_it_without_a_reply() {
    use std::io::{Read, Write};
    let server = TestServer::start(&[]);
    let mut touch = b"H0101102".to_vec();
    touch.extend(packet("01", b"q"));
    touch.extend(packet("03", b"x"));
    let mut send_with_delay = b"H0100103".to_vec();
    send_with_delay.extend(packet("01", b"q"));
    send_with_delay.extend(packet("02", b"c"));
    send_with_delay.extend(packet("11", b"5000"));
    for (bad, reason) in [
        (&touch[..], "unknown message type 011"),
        (&send_with_delay[..], "unknown packet type 11"),
    ] {
        let mut socket = std::net::TcpStream::connect(server.tcp_addr()).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        socket.write_all(bad).unwrap();
        let mut reply = Vec::new();
        socket
            .read_to_end(&mut reply)
            .expect("closed by the server");
        assert!(reply.is_empty(), "{reason}: got {reply:?}");
        server.log.wait_for(reason, |l| l.contains(reason));
    }
}
