//! PHPMQ v1.2 over real sockets (`../shared/PROTOCOL-v1.2.md`): HELLO/WELCOME, receipts,
//! errors, STATS/FLUSH, durable receipts, and v1.0/v1.1 connections unchanged beside them.
//! Frames are written and read byte by byte here, not with the server's codec.

use crate::common::*;
use std::time::{Duration, Instant};

const SEND: u16 = 1;
const CONSUME: u16 = 2;
const DISPATCH: u16 = 3;
const ACK: u16 = 4;
const WELCOME: u16 = 8;
const RECEIPT: u16 = 9;
const ERROR: u16 = 10;
const STATS: u16 = 12;
const COUNTS: u16 = 13;
const FLUSH: u16 = 14;
const FLUSHED: u16 = 15;

/// A connection that said HELLO 1.2 (asking for `features`) and got its WELCOME.
fn v12(server: &TestServer, features: &str) -> (Client, RawFrame) {
    let mut client = server.tcp_client();
    client.hello("1.2", features);
    let welcome = client.expect_frame(WELCOME);
    (client, welcome)
}

fn send(client: &mut Client, queue: &str, content: &[u8]) {
    client.frame_of(SEND, &[(1, queue.as_bytes()), (2, content)]);
}

fn receipt(client: &mut Client, queue: &str) -> String {
    let frame = client.expect_frame(RECEIPT);
    assert_eq!(frame.types(), [1, 3], "a receipt is queue and id");
    assert_eq!(frame.text(1), queue);
    frame.text(3)
}

fn counts(client: &mut Client, queue: &str) -> String {
    client.frame_of(STATS, &[(1, queue.as_bytes())]);
    let frame = client.expect_frame(COUNTS);
    assert_eq!(frame.text(1), queue);
    frame.text(13)
}

#[test]
fn hello_gets_the_lower_version_and_the_features_served() {
    let server = TestServer::start(&[]);
    let (_, welcome) = v12(&server, "");
    assert_eq!(welcome.types(), [6, 8]);
    assert_eq!(welcome.text(6), "1.2");
    assert_eq!(
        welcome.text(8),
        "confirm stats delay attempts lease durable",
        "a server with a file serves durable receipts; dead-letter needs --max-deliveries"
    );
    // Number by number: 1.10 is above 1.2.
    let mut newer = server.tcp_client();
    newer.hello("1.10", "");
    assert_eq!(newer.expect_frame(WELCOME).text(6), "1.2");

    // A client that asks for 1.1 speaks v1.1: no receipt, dispatches show the TTL.
    let mut older = server.tcp_client();
    older.hello("1.1", "");
    assert_eq!(older.expect_frame(WELCOME).text(6), "1.1");
    older.send_ttl("v11", b"x", 60).consume("v11", 1);
    let d = older.recv();
    assert_eq!(
        (d.text(), d.ttl.is_some(), d.packet_count),
        ("x".into(), true, 4)
    );

    // Without a file there is nothing to be durable on.
    let memory = TestServer::start(&["--db", "none"]);
    let (_, welcome) = v12(&memory, "durable");
    assert_eq!(welcome.text(8), "confirm stats delay attempts lease");
}

#[test]
fn hello_must_be_the_first_frame_and_well_formed() {
    let server = TestServer::start(&[]);
    // After another frame: ERROR 400, then the connection is closed.
    let mut late = server.tcp_client();
    send(&mut late, "q", b"before");
    late.hello("1.2", "");
    let error = late.expect_frame(ERROR);
    assert_eq!(error.text(10), "400");
    assert!(!error.text(2).contains('\n'));
    late.expect_closed();

    // A second HELLO.
    let (mut twice, _) = v12(&server, "");
    twice.hello("1.2", "");
    assert_eq!(twice.expect_frame(ERROR).text(10), "400");
    twice.expect_closed();

    // A version that is not MAJOR.MINOR.
    let mut garbled = server.tcp_client();
    garbled.hello("one.two", "");
    assert_eq!(garbled.expect_frame(ERROR).text(10), "400");
    garbled.expect_closed();

    // The message sent before the late HELLO was taken all the same.
    let mut consumer = server.tcp_client();
    consumer.consume("q", 1);
    assert_eq!(consumer.recv().text(), "before");
}

#[test]
fn each_send_gets_its_receipt_in_order_with_the_id_consumers_see() {
    let server = TestServer::start(&[]);
    let (mut producer, _) = v12(&server, "");
    for i in 0..50 {
        send(&mut producer, "jobs", format!("job {i}").as_bytes());
    }
    let ids: Vec<String> = (0..50).map(|_| receipt(&mut producer, "jobs")).collect();
    assert!(ids.iter().all(|id| id.len() == 32));

    // A v1.0 consumer beside it sees exactly the frames it always did.
    let mut consumer = server.tcp_client();
    consumer.consume("jobs", 50);
    for (i, id) in ids.iter().enumerate() {
        let d = consumer.recv();
        assert_eq!(
            (d.text(), &d.id, d.packet_count),
            (format!("job {i}"), id, 3)
        );
        consumer.ack("jobs", &d.id);
    }
}

#[test]
fn a_receipt_comes_before_the_dispatch_of_its_message_to_the_same_connection() {
    let server = TestServer::start(&[]);
    let (mut client, _) = v12(&server, "");
    client.frame_of(CONSUME, &[(1, b"self"), (4, b"10")]);
    send(&mut client, "self", b"to myself");
    let id = receipt(&mut client, "self");
    let dispatch = client.expect_frame(DISPATCH);
    assert_eq!(dispatch.text(3), id);
    assert_eq!(dispatch.text(2), "to myself");
    assert_eq!(
        dispatch.text(9),
        "1",
        "a v1.2 dispatch carries its delivery count"
    );
    assert!(!dispatch.has(5), "no TTL packet for a message without one");
}

#[test]
fn a_bad_queue_name_is_refused_with_422_and_the_connection_goes_on() {
    let server = TestServer::start(&[]);
    let (mut client, _) = v12(&server, "");
    send(&mut client, "", b"nameless");
    send(&mut client, "bad\nname", b"control character");
    send(&mut client, "good", b"kept");
    for _ in 0..2 {
        let error = client.expect_frame(ERROR);
        assert_eq!(error.types(), [10, 2]);
        assert_eq!(error.text(10), "422");
    }
    receipt(&mut client, "good");
    assert_eq!(counts(&mut client, "good"), "1 0 0 0");

    // A bad value in a request that gets no reply closes the connection, after an ERROR.
    client.frame_of(CONSUME, &[(1, b"good"), (4, b"ten")]);
    assert_eq!(client.expect_frame(ERROR).text(10), "422");
    client.expect_closed();
}

#[test]
fn an_oversized_packet_gets_413_from_its_header_and_the_connection_closes() {
    let server = TestServer::start(&["--max-message-size", "1024"]);
    let (mut client, _) = v12(&server, "");
    // Only the header: the server decides from the declared length.
    client.raw(
        format!(
            "H0100102P0100000000000000000000000000001qP02{:029}",
            1 << 20
        )
        .as_bytes(),
    );
    assert_eq!(client.expect_frame(ERROR).text(10), "413");
    client.expect_closed();
}

#[test]
fn stats_and_flush_over_the_message_port() {
    let server = TestServer::start(&[]);
    let (mut client, _) = v12(&server, "");
    assert_eq!(counts(&mut client, "unused"), "0 0 0 0");
    for i in 0..3 {
        send(&mut client, "work", format!("{i}").as_bytes());
        receipt(&mut client, "work");
    }
    let mut worker = server.tcp_client();
    worker.consume("work", 1);
    let held = worker.recv();
    wait_until("the worker's hold to show", || {
        counts(&mut client, "work") == "2 0 1 1"
    });
    client.frame_of(FLUSH, &[(1, b"work")]);
    let flushed = client.expect_frame(FLUSHED);
    assert_eq!(
        (flushed.text(1), flushed.text(4)),
        ("work".into(), "3".into())
    );
    assert_eq!(counts(&mut client, "work"), "0 0 0 1");
    // A late ack of a flushed message is ignored; the worker is still served.
    worker.ack("work", &held.id);
    send(&mut client, "work", b"after");
    receipt(&mut client, "work");
    assert_eq!(worker.recv().text(), "after");
    // Nobody used it: not created by asking.
    let console = server.console_command("status");
    assert!(!console.contains("unused"), "{console}");
}

#[test]
fn v1_2_frames_from_a_connection_that_did_not_ask_close_it_without_a_reply() {
    let server = TestServer::start(&[]);
    let mut client = server.tcp_client();
    client.frame_of(STATS, &[(1, b"q")]);
    assert_eq!(client.recv_frame(), None, "closed, and nothing sent");
    let log = server
        .log
        .wait_for("the close logged", |l| l.contains("closing connection"));
    assert!(log.contains("bad"), "{log}");
}

/// A durable receipt means the message is in the synced file: with an hour between mirrors,
/// the receipt still comes at once, and the file already holds the message.
#[test]
fn a_durable_receipt_waits_for_the_file_and_not_for_the_mirror_tick() {
    let server = TestServer::start(&["--mirror-interval", "3600000"]);
    let (mut client, welcome) = v12(&server, "durable");
    assert!(welcome.text(8).ends_with("durable"));
    let started = Instant::now();
    for i in 0..20 {
        send(&mut client, "safe", format!("{i}").as_bytes());
    }
    let ids: Vec<String> = (0..20).map(|_| receipt(&mut client, "safe")).collect();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "receipts waited for something other than a sync"
    );
    let conn = rusqlite::Connection::open_with_flags(
        server.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the file");
    let stored: i64 = conn
        .query_row(
            "SELECT count(*) FROM messages WHERE queue = 'safe'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(stored, 20, "every message with a receipt is in the file");
    // In order, with replies that wait for nothing after them.
    assert_eq!(counts(&mut client, "safe"), "20 0 0 0");
    let mut consumer = server.tcp_client();
    consumer.consume("safe", 20);
    for id in &ids {
        let d = consumer.recv();
        assert_eq!(&d.id, id);
        consumer.ack("safe", &d.id);
    }
    let _ = ACK;
}

/// Every message that got a durable receipt is in the file after a SIGKILL, whatever moment
/// the kill lands on: rounds of a producer sending flat out (16 receipts outstanding), each
/// ended by a SIGKILL after a pseudo-random time, then a restart on the same file. (With
/// plain receipts instead, the first round loses nearly everything it sent.)
#[test]
fn no_durably_receipted_message_is_lost_to_sigkill() {
    use std::sync::{Arc, Mutex};
    let mut server = TestServer::start(&[]);
    let confirmed: Arc<Mutex<Vec<String>>> = Arc::default();
    // A fixed seed: the same kill moments on every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..8 {
        let (mut producer, _) = v12(&server, "durable");
        let sink = confirmed.clone();
        let sending = std::thread::spawn(move || {
            let mut outstanding = 0;
            for i in 0.. {
                let content = format!("round {round} message {i}");
                let frame = frame_bytes(SEND, &[(1, b"kept"), (2, content.as_bytes())]);
                if producer.try_raw(&frame).is_err() {
                    return;
                }
                outstanding += 1;
                while outstanding >= 16 {
                    match producer.recv_frame() {
                        Some(frame) if frame.message_type == RECEIPT => {
                            sink.lock().unwrap().push(frame.text(3));
                            outstanding -= 1;
                        }
                        Some(other) => panic!("not a receipt: {other:?}"),
                        None => return,
                    }
                }
            }
        });
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let before = confirmed.lock().unwrap().len();
        // Let some receipts arrive first, then kill at a moment of its choosing.
        wait_until("receipts in this round", || {
            confirmed.lock().unwrap().len() > before
        });
        std::thread::sleep(Duration::from_millis(seed % 300));
        server.signal("KILL");
        server.wait_exit();
        sending.join().expect("producer thread");
        server = server.restart();

        let conn = rusqlite::Connection::open_with_flags(
            server.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the file");
        let mut statement = conn
            .prepare("SELECT lower(hex(id)) FROM messages WHERE queue = 'kept'")
            .unwrap();
        let stored: std::collections::HashSet<String> = statement
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let confirmed = confirmed.lock().unwrap();
        let lost: Vec<&String> = confirmed
            .iter()
            .filter(|id| !stored.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} durably receipted messages lost, e.g. {:?}",
            lost.len(),
            confirmed.len(),
            lost.first()
        );
    }
    assert!(
        confirmed.lock().unwrap().len() > 100,
        "the rounds sent little"
    );
}
