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
    durable_sigkill_rounds(&[], None);
}

/// The same, with the mirror ticking every 20 ms and the producer pausing between bursts: the
/// write-ahead log has its room (zeros) from the start, and idle ticks fold it, cut it back
/// and give it room again, so the kills land on a log written over from its start, past zeros
/// and stale frames.
#[test]
fn no_durably_receipted_message_is_lost_to_sigkill_with_the_log_written_over() {
    durable_sigkill_rounds(
        &["--mirror-interval", "20"],
        Some((200, Duration::from_millis(60))),
    );
}

/// Rounds of durable sends ended by SIGKILL, then a restart on the same file: every message
/// that got a durable receipt must be in it. `pause`: (every N sends, sleep this long).
fn durable_sigkill_rounds(args: &[&str], pause: Option<(usize, Duration)>) {
    use std::sync::{Arc, Mutex};
    let mut server = TestServer::start(args);
    let confirmed: Arc<Mutex<Vec<String>>> = Arc::default();
    // A fixed seed: the same kill moments on every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..8 {
        let (mut producer, _) = v12(&server, "durable");
        let sink = confirmed.clone();
        let sending = std::thread::spawn(move || {
            let mut outstanding = 0;
            for i in 0.. {
                if let Some((every, pause)) = pause {
                    if i > 0 && i % every == 0 {
                        std::thread::sleep(pause);
                    }
                }
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

const REQUEUE: u16 = 5;
const TOUCH: u16 = 11;

fn consume_leased(client: &mut Client, queue: &str, count: u64, lease: u64) {
    let (count, lease) = (count.to_string(), lease.to_string());
    client.frame_of(
        CONSUME,
        &[
            (1, queue.as_bytes()),
            (4, count.as_bytes()),
            (12, lease.as_bytes()),
        ],
    );
}

fn send_delayed(client: &mut Client, queue: &str, content: &str, delay_ms: u64) {
    let delay = delay_ms.to_string();
    client.frame_of(
        SEND,
        &[
            (1, queue.as_bytes()),
            (2, content.as_bytes()),
            (11, delay.as_bytes()),
        ],
    );
}

/// A v1.2 dispatch: (content, id, delivery count).
fn dispatch(client: &mut Client) -> (String, String, u32) {
    let frame = client.expect_frame(DISPATCH);
    (
        frame.text(2),
        frame.text(3),
        frame.text(9).parse().expect("a decimal count"),
    )
}

#[test]
fn delayed_messages_become_ready_in_due_order_then_fifo() {
    let server = TestServer::start(&[]);
    let (mut producer, _) = v12(&server, "");
    let sent = Instant::now();
    send_delayed(&mut producer, "later", "in 600 ms", 600);
    send_delayed(&mut producer, "later", "in 300 ms (a)", 300);
    send_delayed(&mut producer, "later", "in 300 ms (b)", 300);
    send(&mut producer, "later", b"now 1");
    send(&mut producer, "later", b"now 2");
    for _ in 0..5 {
        receipt(&mut producer, "later");
    }
    let counts_now = counts(&mut producer, "later");
    assert!(
        counts_now == "2 3 0 0"
            || sent.elapsed() + Duration::from_millis(1) >= Duration::from_millis(300),
        "{counts_now}"
    );
    let (mut consumer, _) = v12(&server, "");
    consumer.frame_of(CONSUME, &[(1, b"later"), (4, b"10")]);
    let mut order = Vec::new();
    for _ in 0..5 {
        let (content, _, count) = dispatch(&mut consumer);
        assert_eq!(count, 1);
        let due = match content.as_str() {
            "in 600 ms" => 600,
            "in 300 ms (a)" | "in 300 ms (b)" => 300,
            _ => 0,
        };
        // Due times are whole milliseconds (the server's clock, truncated): a message
        // accepted at 10.9 ms with a 300 ms delay is due, and ready, at 310 ms.
        assert!(
            sent.elapsed() + Duration::from_millis(1) >= Duration::from_millis(due),
            "{content} arrived after {:?}",
            sent.elapsed()
        );
        order.push(content);
    }
    assert_eq!(
        order,
        [
            "now 1",
            "now 2",
            "in 300 ms (a)",
            "in 300 ms (b)",
            "in 600 ms"
        ]
    );
}

/// The due time is stored: a delayed message is still delayed after a SIGTERM restart and
/// after a SIGKILL one, and is dispatched no earlier than it was due.
#[test]
fn a_delayed_message_keeps_its_due_time_over_restarts() {
    let mut server = TestServer::start(&[]);
    let sent = Instant::now();
    let (mut producer, _) = v12(&server, "durable");
    send_delayed(&mut producer, "patient", "first", 2500);
    receipt(&mut producer, "patient");
    drop(producer);
    server.signal("TERM");
    assert!(server.wait_exit().success());
    server = server.restart();
    let (mut producer, _) = v12(&server, "durable");
    assert_eq!(counts(&mut producer, "patient"), "0 1 0 0");
    send_delayed(&mut producer, "patient", "second", 2500);
    receipt(&mut producer, "patient");
    drop(producer);
    server.signal("KILL");
    server.wait_exit();
    server = server.restart();

    let (mut consumer, _) = v12(&server, "");
    assert_eq!(counts(&mut consumer, "patient"), "0 2 0 0");
    consumer.frame_of(CONSUME, &[(1, b"patient"), (4, b"2")]);
    let (first, _, _) = dispatch(&mut consumer);
    assert_eq!(first, "first");
    // Whole milliseconds, as above.
    assert!(sent.elapsed() + Duration::from_millis(1) >= Duration::from_millis(2500));
    let (second, _, _) = dispatch(&mut consumer);
    assert_eq!(second, "second");
}

/// Every dispatch counts, to any dialect: after a lease expiry, a re-queue and a disconnect,
/// and it is stored (a restart keeps it).
#[test]
fn the_delivery_count_grows_over_lease_expiry_requeue_and_disconnect() {
    let mut server = TestServer::start(&[]);
    let (mut holder, _) = v12(&server, "");
    consume_leased(&mut holder, "counted", 1, 300);
    let (mut producer, _) = v12(&server, "");
    send(&mut producer, "counted", b"job");
    receipt(&mut producer, "counted");
    let (_, id, count) = dispatch(&mut holder);
    assert_eq!(count, 1);
    // Not acknowledged within the lease: taken back, and the holder's room is free again.
    let (_, again, count) = dispatch(&mut holder);
    assert_eq!((again.as_str(), count), (id.as_str(), 2));
    let (ttl, requeue_id) = (b"0".as_slice(), id.clone());
    holder.frame_of(
        REQUEUE,
        &[(1, b"counted"), (3, requeue_id.as_bytes()), (5, ttl)],
    );
    let (_, _, count) = dispatch(&mut holder);
    assert_eq!(count, 3, "a re-queue keeps the count");
    drop(holder);
    // A v1.0 consumer's dispatch counts too, though it is not shown to it.
    let mut old = server.tcp_client();
    old.consume("counted", 1);
    let d = old.recv();
    assert_eq!((d.id.as_str(), d.packet_count), (id.as_str(), 3));
    drop(old);
    wait_until("the v1.0 consumer's hold to come back", || {
        counts(&mut producer, "counted") == "1 0 0 0"
    });

    server.signal("TERM");
    assert!(server.wait_exit().success());
    server = server.restart();
    let (mut next, _) = v12(&server, "");
    next.frame_of(CONSUME, &[(1, b"counted"), (4, b"1")]);
    let (_, _, count) = dispatch(&mut next);
    assert_eq!(count, 5, "four earlier dispatches, stored over the restart");
}

/// A dispatch under way when the server is killed counts (rule 6: the count is stored with the
/// message): the message comes back after the restart with that dispatch counted.
#[test]
fn a_dispatch_under_way_at_a_sigkill_counts() {
    let mut server = TestServer::start(&[]);
    let (mut producer, _) = v12(&server, "durable");
    send(&mut producer, "crashy", b"job");
    receipt(&mut producer, "crashy");
    let (mut holder, _) = v12(&server, "");
    holder.frame_of(CONSUME, &[(1, b"crashy"), (4, b"1")]);
    let (_, id, count) = dispatch(&mut holder);
    assert_eq!(count, 1);
    // A durable receipt for a later change: the file holds everything before it, the count
    // of the dispatch above included.
    send(&mut producer, "other", b"marker");
    receipt(&mut producer, "other");
    server.signal("KILL");
    server.wait_exit();
    server = server.restart();
    let (mut next, _) = v12(&server, "");
    next.frame_of(CONSUME, &[(1, b"crashy"), (4, b"1")]);
    let (_, again, count) = dispatch(&mut next);
    assert_eq!((again.as_str(), count), (id.as_str(), 2));
    drop(holder);
}

/// An expired lease puts the message back at the head of its queue while its holder stays
/// connected; the holder's late ack is ignored. TOUCH keeps a lease alive.
#[test]
fn an_expired_lease_returns_the_message_to_the_head_and_touch_keeps_it() {
    let server = TestServer::start(&[]);
    let (mut producer, _) = v12(&server, "");
    for text in ["m1", "m2"] {
        send(&mut producer, "leased", text.as_bytes());
        receipt(&mut producer, "leased");
    }
    let (mut slow, _) = v12(&server, "");
    consume_leased(&mut slow, "leased", 1, 300);
    let (m1, m1_id, _) = dispatch(&mut slow);
    assert_eq!(m1, "m1");
    // It wants nothing more, but keeps its connection and its hold until the lease ends.
    slow.frame_of(CONSUME, &[(1, b"leased"), (4, b"0")]);
    wait_until("the lease to expire", || {
        counts(&mut producer, "leased") == "2 0 0 0"
    });
    let mut other = server.tcp_client();
    other.consume("leased", 1);
    let d = other.recv();
    assert_eq!(
        (d.text(), d.id.clone()),
        ("m1".into(), m1_id.clone()),
        "back at the head"
    );
    slow.ack("leased", &m1_id);
    assert_eq!(
        counts(&mut producer, "leased"),
        "1 0 1 1",
        "the old holder's ack is ignored: the new holder still has it"
    );
    other.ack("leased", &d.id);
    drop(other);
    wait_until("the other consumer to be gone", || {
        counts(&mut producer, "leased") == "1 0 0 0"
    });

    // Touched every 100 ms, a 1 s lease holds for 2.5 s (the margin is for a busy machine
    // that delays a touch).
    let (mut toucher, _) = v12(&server, "");
    consume_leased(&mut toucher, "leased", 1, 1000);
    let (m2, m2_id, _) = dispatch(&mut toucher);
    assert_eq!(m2, "m2");
    toucher.frame_of(CONSUME, &[(1, b"leased"), (4, b"0")]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        toucher.frame_of(TOUCH, &[(1, b"leased"), (3, m2_id.as_bytes())]);
        // Held, by a connection that asks for nothing more (so no consumer is counted).
        assert_eq!(counts(&mut toucher, "leased"), "0 0 1 0", "still held");
        std::thread::sleep(Duration::from_millis(100));
    }
    toucher.ack("leased", &m2_id);
    assert_eq!(counts(&mut toucher, "leased"), "0 0 0 0");
}

#[test]
fn dead_letters_after_the_maximum_and_redrive() {
    let server = TestServer::start(&["--max-deliveries", "2"]);
    let (mut worker, welcome) = v12(&server, "");
    assert_eq!(
        welcome.text(8),
        "confirm stats delay attempts lease dead-letter durable"
    );
    send(&mut worker, "jobs", b"poison");
    receipt(&mut worker, "jobs");
    worker.frame_of(CONSUME, &[(1, b"jobs"), (4, b"1")]);
    for expected in 1..=2 {
        let (_, id, count) = dispatch(&mut worker);
        assert_eq!(count, expected);
        worker.frame_of(REQUEUE, &[(1, b"jobs"), (3, id.as_bytes()), (5, b"0")]);
    }
    // Its second dispatch ended without an ack: it is in jobs.dead, with its count.
    wait_until("the move to jobs.dead", || {
        counts(&mut worker, "jobs.dead") == "1 0 0 0"
    });
    assert_eq!(counts(&mut worker, "jobs"), "0 0 0 1");
    let (mut inspector, _) = v12(&server, "");
    inspector.frame_of(CONSUME, &[(1, b"jobs.dead"), (4, b"1")]);
    let (content, id, count) = dispatch(&mut inspector);
    assert_eq!((content.as_str(), count), ("poison", 3));
    // Never moved again from a dead queue.
    inspector.frame_of(REQUEUE, &[(1, b"jobs.dead"), (3, id.as_bytes()), (5, b"0")]);
    let (_, again, count) = dispatch(&mut inspector);
    assert_eq!((again.as_str(), count), (id.as_str(), 4));
    drop(inspector);
    wait_until("the dead letter to be waiting", || {
        counts(&mut worker, "jobs.dead") == "1 0 0 0"
    });

    let reply = server.console_command("redrive jobs");
    assert_eq!(reply, "redrove 1 message from jobs.dead to jobs\n");
    let (content, redriven, count) = dispatch(&mut worker);
    assert_eq!(
        (content.as_str(), redriven.as_str(), count),
        ("poison", id.as_str(), 1)
    );
}

/// A consumer that goes away ends its dispatches without an ack even when the server's writer
/// finds it gone before its reader does: what it held is dead-lettered at the maximum, not
/// returned as after a shutdown. (On a Unix socket, a client that stops reading makes the
/// server's next write to it fail while its own side still looks open.)
#[test]
fn a_consumer_found_gone_by_a_write_ends_its_dispatches() {
    let server = TestServer::start(&["--max-deliveries", "1"]);
    let (mut producer, _) = v12(&server, "");
    let mut consumer = server.unix_client();
    consumer.consume("gone", 2);
    wait_until("the consumer to be in the ring", || {
        counts(&mut producer, "gone") == "0 0 0 1"
    });
    send(&mut producer, "gone", b"first");
    receipt(&mut producer, "gone");
    assert_eq!(consumer.recv().text(), "first");
    consumer.shutdown_read();
    send(&mut producer, "gone", b"second");
    receipt(&mut producer, "gone");
    wait_until("both dispatches to end in gone.dead", || {
        counts(&mut producer, "gone.dead") == "2 0 0 0"
    });
    assert_eq!(counts(&mut producer, "gone"), "0 0 0 0");
}

/// A v1.2 consumer with a lease and a v1.0 consumer share a queue round-robin, and the v1.0
/// one sees exactly the three-packet dispatch it always did, whatever the sender said.
#[test]
fn a_leased_v12_consumer_and_a_v10_consumer_share_a_queue() {
    let server = TestServer::start(&[]);
    let (mut modern, _) = v12(&server, "");
    consume_leased(&mut modern, "shared", 5, 60_000);
    let mut classic = server.tcp_client();
    classic.consume("shared", 5);
    let mut v11 = server.tcp_client();
    v11.send_ttl("unrelated", b"shows v1.1", 60);
    let (mut producer, _) = v12(&server, "");
    wait_until("both consumers to be in the ring", || {
        counts(&mut producer, "shared") == "0 0 0 2"
    });
    for i in 0..10 {
        producer.frame_of(
            SEND,
            &[(1, b"shared"), (2, format!("{i}").as_bytes()), (5, b"3600")],
        );
        receipt(&mut producer, "shared");
    }
    let mut to_modern = Vec::new();
    for _ in 0..5 {
        let frame = modern.expect_frame(DISPATCH);
        assert_eq!(frame.types(), [1, 2, 3, 5, 9]);
        to_modern.push(frame.text(2));
    }
    let mut to_classic = Vec::new();
    for _ in 0..5 {
        let frame = classic.expect_frame(DISPATCH);
        assert_eq!(
            frame_bytes(
                DISPATCH,
                &[(1, b"shared"), (2, frame.get(2)), (3, frame.get(3))]
            ),
            frame_bytes(
                DISPATCH,
                &frame
                    .packets
                    .iter()
                    .map(|(t, c)| (*t, c.as_slice()))
                    .collect::<Vec<_>>()
            ),
            "a v1.0 dispatch is queue, content, id: no TTL, no count"
        );
        to_classic.push(frame.text(2));
    }
    let evens: Vec<String> = (0..10).step_by(2).map(|i| i.to_string()).collect();
    let odds: Vec<String> = (1..10).step_by(2).map(|i| i.to_string()).collect();
    assert!(
        (to_modern == evens && to_classic == odds) || (to_modern == odds && to_classic == evens),
        "round-robin: {to_modern:?} / {to_classic:?}"
    );
    // The v1.1 connection beside them still gets the TTL, and nothing of v1.2.
    v11.consume("unrelated", 1);
    let d = v11.recv();
    assert_eq!((d.packet_count, d.ttl.is_some()), (4, true));
}

/// At a graceful stop the server takes every whole frame that arrived, and a connection with
/// durable receipts gets them before it is closed: nothing is left for the client to resend.
/// (Here the syncs keep pace anyway; the wait at the stop matters when the last sync outlasts
/// the connection's quiet period, a slow disk, which no test here can force.)
#[test]
fn a_graceful_stop_answers_every_durable_send_before_closing() {
    let mut server = TestServer::start(&[]);
    let (mut producer, _) = v12(&server, "durable");
    let frames: Vec<u8> = (0..300)
        .flat_map(|i| frame_bytes(SEND, &[(1, b"last"), (2, format!("{i}").as_bytes())]))
        .collect();
    producer.raw(&frames);
    server.signal("TERM");
    let mut receipts = 0;
    while let Some(frame) = producer.recv_frame() {
        assert_eq!(frame.message_type, RECEIPT, "{frame:?}");
        receipts += 1;
    }
    assert!(server.wait_exit().success());
    assert_eq!(receipts, 300, "a receipt for every send before the close");
    let server = server.restart();
    assert_eq!(server.recovered(), 300);
}

/// A v1.2 producer that never reads its receipts cannot make the server hold them without
/// bound: past 16 MiB of unread output the server stops reading from it, the kernel's flow
/// control blocks its writes, and every other client goes on.
#[test]
fn a_producer_that_never_reads_its_receipts_is_held_back() {
    let server = TestServer::start(&["--db", "none"]);
    // Each receipt is ~140 bytes: 16 MiB of them and the kernels' buffers are far below two
    // million sends.
    let send = frame_bytes(SEND, &[(1, b"unread"), (2, b"x")]);
    let sent = requests_until_held_back(&server, &[], &send, 2_000_000);
    assert!(
        sent.is_some(),
        "2,000,000 sends taken without a receipt read"
    );
    // Everyone else is served.
    let (mut other, _) = v12(&server, "");
    send_one_and_check(&mut other);
}

/// A consumer that never reads its replies is held back too, only later than a producer: its
/// mark is past what dispatches alone can queue (a consume request made it exempt before).
#[test]
fn a_consumer_that_never_reads_its_replies_is_held_back() {
    let server = TestServer::start(&["--db", "none"]);
    // Each COUNTS is ~90 bytes: 64 MiB of them and the kernels' buffers are far below three
    // million requests.
    let consume = frame_bytes(CONSUME, &[(1, b"work"), (4, b"1")]);
    let stats = frame_bytes(STATS, &[(1, b"work")]);
    let sent = requests_until_held_back(&server, &consume, &stats, 3_000_000);
    assert!(
        sent.is_some(),
        "3,000,000 requests taken without a reply read"
    );
    let rss = rss_bytes(server.pid());
    assert!(rss < 256 << 20, "server at {} MiB", rss >> 20);
    let (mut other, _) = v12(&server, "");
    send_one_and_check(&mut other);
}

/// On a new v1.2 connection that never reads, `first`, then `request` a thousand at a time
/// until a write blocks for 2 s (the server stopped reading): how many were written by then,
/// or `None` if `most` were taken without a block.
fn requests_until_held_back(
    server: &TestServer,
    first: &[u8],
    request: &[u8],
    most: usize,
) -> Option<usize> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(server.tcp_addr()).unwrap();
    stream.write_all(&frame_bytes(7, &[(6, b"1.2")])).unwrap();
    stream.write_all(first).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let batch = request.repeat(1000);
    let mut sent = 0;
    while sent < most {
        if stream.write_all(&batch).is_err() {
            return Some(sent);
        }
        sent += 1000;
    }
    None
}

fn send_one_and_check(client: &mut Client) {
    send(client, "elsewhere", b"fine");
    receipt(client, "elsewhere");
}

/// A durable client that ends its connection, with a bad frame or by half-closing, still gets
/// the receipts for everything that was taken, in order, before the ERROR and the close.
#[test]
fn durable_receipts_come_before_the_error_and_after_a_half_close() {
    let server = TestServer::start(&[]);
    let sends: Vec<u8> = (0..100)
        .flat_map(|i| frame_bytes(SEND, &[(1, b"owed"), (2, format!("{i}").as_bytes())]))
        .collect();

    let (mut broken, _) = v12(&server, "durable");
    broken.raw(&sends).raw(b"garbage!");
    for _ in 0..100 {
        receipt(&mut broken, "owed");
    }
    assert_eq!(broken.expect_frame(ERROR).text(10), "400");
    broken.expect_closed();

    let (mut done, _) = v12(&server, "durable");
    done.raw(&sends);
    done.shutdown_write();
    for _ in 0..100 {
        receipt(&mut done, "owed");
    }
    assert_eq!(done.recv_frame(), None, "then the server closes");
    let (mut check, _) = v12(&server, "");
    assert_eq!(counts(&mut check, "owed"), "200 0 0 0");
}

/// Replies far larger than the socket buffers, owed to a client that half-closed before
/// reading them: every one reaches it before the close. (The race this guards, a close that
/// cut the writer's last write short, is timed by `outbox`'s unit test: here the reader's
/// back-pressure makes the last write small, and it passed before the fix too.)
#[test]
fn every_receipt_reaches_a_client_that_half_closed_with_megabytes_owed() {
    use std::io::{Read, Write};
    const SENDS: usize = 100_000;
    let server = TestServer::start(&[]);
    let mut stream = std::net::TcpStream::connect(server.tcp_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = frame_bytes(7, &[(6, b"1.2")]);
    for i in 0..SENDS {
        request.extend(frame_bytes(
            SEND,
            &[(1, b"owed"), (2, format!("{i:08}").as_bytes())],
        ));
    }
    // Written on a thread of its own: the server stops reading while its replies back up.
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            stream.write_all(&request).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .expect("read until the server closes");
    writer.join().unwrap();
    let receipt_header = format!("H01{RECEIPT:03}02");
    let receipts = received
        .windows(receipt_header.len())
        .filter(|w| *w == receipt_header.as_bytes())
        .count();
    assert_eq!(receipts, SENDS, "of {} bytes received", received.len());
    let (mut check, _) = v12(&server, "");
    assert_eq!(counts(&mut check, "owed"), format!("{SENDS} 0 0 0"));
}

/// A restart is not a worker failing on its message: a dispatch that the server's own stop
/// ends goes back to its queue with its count, even at the maximum, and is not dead-lettered.
#[test]
fn a_graceful_stop_dead_letters_nothing() {
    let mut server = TestServer::start(&["--max-deliveries", "1"]);
    let (mut worker, _) = v12(&server, "");
    send(&mut worker, "jobs", b"in progress");
    receipt(&mut worker, "jobs");
    worker.frame_of(CONSUME, &[(1, b"jobs"), (4, b"1")]);
    let (_, id, count) = dispatch(&mut worker);
    assert_eq!(count, 1, "its last allowed dispatch");
    server.signal("TERM");
    assert!(server.wait_exit().success());
    drop(worker);
    server = server.restart();
    let (mut worker, _) = v12(&server, "");
    assert_eq!(counts(&mut worker, "jobs.dead"), "0 0 0 0");
    worker.frame_of(CONSUME, &[(1, b"jobs"), (4, b"1")]);
    let (content, again, count) = dispatch(&mut worker);
    assert_eq!(
        (content.as_str(), again.as_str()),
        ("in progress", id.as_str())
    );
    assert_eq!(count, 2, "the dispatch the stop ended still counts");
}

/// With --max-queue-length, a send to a full queue is refused with ERROR 429 and the v1.2
/// connection goes on; a v1.0 connection cannot be told, so it is closed, with a log line,
/// and its send is not taken. Room made by an ack is taken again.
#[test]
fn a_full_queue_refuses_sends_with_429() {
    let server = TestServer::start(&["--max-queue-length", "2"]);
    let (mut producer, _) = v12(&server, "");
    for i in 0..3 {
        send(&mut producer, "capped", format!("{i}").as_bytes());
    }
    receipt(&mut producer, "capped");
    receipt(&mut producer, "capped");
    let error = producer.expect_frame(ERROR);
    assert_eq!(error.text(10), "429");
    assert_eq!(error.text(2), "queue capped is full (limit 2)");
    assert_eq!(counts(&mut producer, "capped"), "2 0 0 0", "still open");

    let mut classic = server.tcp_client();
    classic.send("capped", b"v1.0");
    classic.expect_closed();
    server.log.wait_for("the close's log line", |l| {
        l.contains("send not taken (429 queue capped is full (limit 2))")
    });
    assert_eq!(counts(&mut producer, "capped"), "2 0 0 0", "not taken");

    // In flight counts too; an ack makes room.
    producer.frame_of(CONSUME, &[(1, b"capped"), (4, b"1")]);
    let (_, id, _) = dispatch(&mut producer);
    send(&mut producer, "capped", b"still full");
    assert_eq!(producer.expect_frame(ERROR).text(10), "429");
    producer.frame_of(ACK, &[(1, b"capped"), (3, id.as_bytes())]);
    let (next, _, _) = dispatch(&mut producer);
    assert_eq!(next, "1", "its room goes to the next message");
    send(&mut producer, "capped", b"room again");
    receipt(&mut producer, "capped");
    assert_eq!(counts(&mut producer, "capped"), "1 0 1 1");
    let status = server.console_command("status");
    assert!(
        status.contains("refused sends: 3 (a full queue or store, or sent as the server stopped)"),
        "{status}"
    );
}

/// With --max-stored-messages and --max-stored-bytes, sends to any queue are refused once the
/// server holds that much in all queues together (429, as for a full queue; a v1.0 connection
/// is closed), in flight and delayed messages included; an ack makes room again. The console
/// shows what is held against the limits.
#[test]
fn the_store_limits_refuse_sends_over_all_queues_with_429() {
    let server = TestServer::start(&["--max-stored-messages", "3", "--max-stored-bytes", "10"]);
    let (mut producer, _) = v12(&server, "");
    send(&mut producer, "a", b"1234");
    send(&mut producer, "b", b"5678");
    send(&mut producer, "c", b"too long");
    receipt(&mut producer, "a");
    receipt(&mut producer, "b");
    let error = producer.expect_frame(ERROR);
    assert_eq!(error.text(10), "429");
    assert_eq!(
        error.text(2),
        "the server holds its most message bytes (--max-stored-bytes 10): not taken for c"
    );
    send_delayed(&mut producer, "c", "9", 60_000);
    receipt(&mut producer, "c");
    send(&mut producer, "d", b"");
    let error = producer.expect_frame(ERROR);
    assert_eq!(
        error.text(2),
        "the server holds its most messages (--max-stored-messages 3): not taken for d"
    );
    assert_eq!(
        counts(&mut producer, "d"),
        "0 0 0 0",
        "still open, nothing taken"
    );

    let mut classic = server.tcp_client();
    classic.send("e", b"");
    classic.expect_closed();
    server.log.wait_for("the close's log line", |l| {
        l.contains("send not taken (429 the server holds its most messages")
    });

    // In flight still counts; its ack makes room for one more, whatever the queue.
    producer.frame_of(CONSUME, &[(1, b"a"), (4, b"1")]);
    let (content, id, _) = dispatch(&mut producer);
    assert_eq!(content, "1234");
    send(&mut producer, "d", b"");
    assert_eq!(producer.expect_frame(ERROR).text(10), "429");
    producer.frame_of(ACK, &[(1, b"a"), (3, id.as_bytes())]);
    send(&mut producer, "d", b"12345");
    receipt(&mut producer, "d");
    let status = server.console_command("status");
    assert!(
        status.contains("\nstored: 3 messages, 10 B (limits: 3 messages, 10 B)\n"),
        "{status}"
    );
    let json = server.console_command("status json");
    assert!(
        json.contains(r#""store":{"messages":3,"bytes":10,"max_messages":3,"max_bytes":10}"#),
        "{json}"
    );
}

/// A v1.1 worker closed because its send hit a full queue did not fail on the job it held:
/// with --max-deliveries 1 the job goes back to its queue, not to its dead-letter queue. On a
/// durable connection the 429 comes in its turn, after the receipt before it.
#[test]
fn a_refused_send_is_answered_in_order_and_a_closed_worker_dead_letters_nothing() {
    let server = TestServer::start(&["--max-deliveries", "1", "--max-queue-length", "1"]);
    let (mut producer, _) = v12(&server, "durable");
    send(&mut producer, "work", b"job");
    send(&mut producer, "work", b"over the limit");
    receipt(&mut producer, "work");
    assert_eq!(producer.expect_frame(ERROR).text(10), "429", "in its turn");

    let mut worker = server.tcp_client();
    worker.consume("work", 1);
    let job = worker.recv();
    assert_eq!(job.content, b"job");
    worker.send_ttl("work", b"a follow-up", 60);
    worker.expect_closed();
    server.log.wait_for("the close's log line", |l| {
        l.contains("send not taken (429 queue work is full (limit 1))")
    });
    wait_until("the job back in its queue", || {
        counts(&mut producer, "work") == "1 0 0 0"
    });
    assert_eq!(counts(&mut producer, "work.dead"), "0 0 0 0");
}

/// A v1.2 consumer that acknowledges each dispatch as it comes is given its next message by
/// its own ack, written straight to its socket. The ack that takes it past a burst (16 MiB
/// since it was last resumed) pauses it; nothing is then left for its writer to write, so
/// the pause must end where the ack is handled, or it is never served again.
#[test]
fn a_consumer_that_acks_as_it_goes_is_served_past_a_burst() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    let content = vec![b'x'; 64 << 10];
    let total = 300; // 19 MiB: past one burst
    for _ in 0..total {
        producer.send("big", &content);
    }
    producer.sync();
    let (mut consumer, _) = v12(&server, "");
    consumer.frame_of(CONSUME, &[(1, b"big"), (4, b"1")]);
    for n in 0..total {
        let frame = consumer
            .recv_frame()
            .unwrap_or_else(|| panic!("dispatch {n} of {total} never came"));
        assert_eq!(frame.get(2).len(), content.len());
        consumer.frame_of(ACK, &[(1, b"big"), (3, frame.get(3))]);
    }
    assert_eq!(counts(&mut consumer, "big"), "0 0 0 1");
}

/// Leases still run out while a graceful stop drains its clients: a holder that acks after
/// its lease (its connection still read, as it goes on sending) is ignored, and the message
/// is there after the restart, its next dispatch the second.
#[test]
fn a_lease_runs_out_during_a_graceful_stop() {
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer.send("work", b"m0");
    producer.sync();
    let (mut holder, _) = v12(&server, "");
    consume_leased(&mut holder, "work", 1, 300);
    let (content, id, count) = dispatch(&mut holder);
    assert_eq!((content.as_str(), count), ("m0", 1));
    let signalled = Instant::now();
    server.signal("TERM");
    // The holder goes on talking, so it is still read; the lease (300 ms, swept at most
    // 250 ms late) must run out well within the stop's 2.5 s drain.
    loop {
        let now = counts(&mut holder, "work");
        if now.starts_with("1 0 0 ") {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(2000),
            "the lease did not run out during the stop: {now}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    holder.frame_of(ACK, &[(1, b"work"), (3, id.as_bytes())]);
    drop(holder);
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
    let server = server.restart();
    let (mut consumer, _) = v12(&server, "");
    consumer.frame_of(CONSUME, &[(1, b"work"), (4, b"1")]);
    let (content, _, count) = dispatch(&mut consumer);
    assert_eq!(
        (content.as_str(), count),
        ("m0", 2),
        "the late ack was ignored"
    );
}
