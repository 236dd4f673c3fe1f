//! Broker semantics, end to end against the real server over real sockets.

use crate::common;

use common::{Client, Dispatch, TestServer};
use std::collections::HashSet;
use std::thread;

fn texts(dispatches: &[Dispatch]) -> Vec<String> {
    dispatches.iter().map(Dispatch::text).collect()
}

#[test]
fn tcp_and_unix_clients_share_one_broker() {
    let server = TestServer::start(&[]);
    let mut over_tcp = server.tcp_client();
    let mut over_unix = server.unix_client();
    over_tcp.send("shared", b"from tcp");
    over_unix.send("shared", b"from unix");
    over_tcp.sync();
    over_unix.sync();
    over_unix.consume("shared", 10);
    let first = over_unix.recv();
    let second = over_unix.recv();
    let got: HashSet<String> = [first.text(), second.text()].into();
    assert_eq!(
        got,
        HashSet::from(["from tcp".to_string(), "from unix".to_string()])
    );
    over_tcp.consume("back", 1);
    over_unix.send("back", b"to tcp");
    assert_eq!(over_tcp.recv().text(), "to tcp");
}

#[test]
fn fifo_over_10000_messages() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..10_000 {
        producer.send("fifo", format!("m{i}").as_bytes());
    }
    producer.sync();
    let mut consumer = server.unix_client();
    consumer.consume("fifo", 100);
    for i in 0..10_000 {
        let d = consumer.recv();
        assert_eq!(d.text(), format!("m{i}"), "message {i} out of order");
        consumer.ack("fifo", &d.id);
    }
    assert!(consumer.sync().is_empty(), "nothing beyond the 10,000");
}

#[test]
fn payloads_are_binary_safe() {
    let server = TestServer::start(&[]);
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let payloads: Vec<Vec<u8>> = vec![
        b"a\0b\0".to_vec(),
        all_bytes,
        Vec::new(),
        big,
        b"H0100102P01".to_vec(),
    ];
    let mut producer = server.tcp_client();
    for p in &payloads {
        producer.send("bin", p);
    }
    let mut consumer = server.tcp_client();
    consumer.consume("bin", 10);
    for p in &payloads {
        let d = consumer.recv();
        assert_eq!(d.content.len(), p.len());
        assert!(d.content == *p, "payload of {} bytes changed", p.len());
        assert_eq!(d.id.len(), 32);
        assert!(d
            .id
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}

#[test]
fn prefetch_holds_exactly_k_and_one_more_per_ack() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..20 {
        producer.send("pre", format!("{i}").as_bytes());
    }
    producer.sync();
    let mut consumer = server.tcp_client();
    consumer.consume("pre", 4);
    let held = consumer.sync();
    assert_eq!(texts(&held), ["0", "1", "2", "3"]);
    consumer.ack("pre", &held[1].id);
    assert_eq!(texts(&consumer.sync()), ["4"]);
    consumer.ack("pre", &held[0].id).ack("pre", &held[2].id);
    assert_eq!(texts(&consumer.sync()), ["5", "6"]);
}

#[test]
fn round_robin_over_subscribed_consumers() {
    let server = TestServer::start(&[]);
    let mut consumers: Vec<Client> = (0..3).map(|_| server.tcp_client()).collect();
    for c in &mut consumers {
        c.consume("rr", 1000);
        c.sync();
    }
    let mut producer = server.tcp_client();
    for i in 0..300 {
        producer.send("rr", format!("{i}").as_bytes());
    }
    producer.sync();
    for (k, c) in consumers.iter_mut().enumerate() {
        let got: Vec<usize> = c.sync().iter().map(|d| d.text().parse().unwrap()).collect();
        let expected: Vec<usize> = (0..300).filter(|i| i % 3 == k).collect();
        assert_eq!(got, expected, "consumer {k} should get every third message");
    }
}

#[test]
fn fair_shares_over_three_acking_consumers() {
    // Bursts of the consumers' total capacity, each consumed and acknowledged before the next.
    // (With a standing backlog shares follow each consumer's ack rate, as with any
    // prefetch-based queue; on 2 shared cores that would measure the scheduler.) Each
    // consumer's acks are confirmed processed before the next burst, so every burst finds
    // every consumer with all of its room.
    let server = TestServer::start(&[]);
    let mut consumers: Vec<Client> = (0..3).map(|_| server.tcp_client()).collect();
    for c in &mut consumers {
        c.consume("fair", 8);
        c.sync();
    }
    let mut producer = server.tcp_client();
    let mut shares = [0usize; 3];
    let mut seen = HashSet::new();
    for burst in 0..50 {
        for i in 0..24 {
            producer.send("fair", format!("{}", burst * 24 + i).as_bytes());
        }
        producer.sync();
        for (k, c) in consumers.iter_mut().enumerate() {
            let got = c.sync();
            for d in &got {
                assert!(seen.insert(d.text()), "{} delivered twice", d.text());
                c.ack("fair", &d.id);
            }
            shares[k] += got.len();
            assert!(
                c.sync().is_empty(),
                "acks free room, they deliver nothing here"
            );
        }
    }
    assert_eq!(shares.iter().sum::<usize>(), 1200);
    for share in shares {
        let deviation = (share as f64 - 400.0).abs() / 400.0;
        assert!(
            deviation <= 0.15,
            "shares {shares:?} are not within 15% of equal"
        );
    }
}

#[test]
fn several_queues_on_one_connection() {
    let server = TestServer::start(&[]);
    let mut consumer = server.tcp_client();
    consumer.consume("alpha", 2).consume("beta", 1);
    let mut producer = server.tcp_client();
    for q in ["alpha", "beta", "alpha", "beta", "alpha"] {
        producer.send(q, q.as_bytes());
    }
    producer.sync();
    let got = consumer.sync();
    let mut by_queue: Vec<(String, String)> =
        got.iter().map(|d| (d.queue.clone(), d.text())).collect();
    by_queue.sort();
    assert_eq!(
        by_queue,
        [
            ("alpha".into(), "alpha".into()),
            ("alpha".into(), "alpha".into()),
            ("beta".into(), "beta".into())
        ]
    );
    // A new request for the same queue changes the count and keeps what is held.
    consumer.consume("beta", 2);
    assert_eq!(texts(&consumer.sync()), ["beta"]);
    consumer.consume("alpha", 0);
    let alpha_held: Vec<&Dispatch> = got.iter().filter(|d| d.queue == "alpha").collect();
    consumer.ack("alpha", &alpha_held[0].id);
    assert!(
        consumer.sync().is_empty(),
        "count 0 stops new deliveries from that queue"
    );
}

#[test]
fn disconnect_redelivers_held_messages_in_original_order() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..5 {
        producer.send("redo", format!("{i}").as_bytes());
    }
    producer.sync();
    let mut first = server.tcp_client();
    first.consume("redo", 3);
    let held = first.sync();
    assert_eq!(texts(&held), ["0", "1", "2"]);
    first.ack("redo", &held[1].id);
    assert_eq!(texts(&first.sync()), ["3"]);
    producer.send("redo", b"5");
    producer.sync();

    let mut second = server.unix_client();
    second.consume("redo", 10);
    assert_eq!(
        texts(&second.sync()),
        ["4", "5"],
        "the rest goes to the other consumer"
    );
    drop(first);
    let redelivered = [second.recv(), second.recv(), second.recv()];
    assert_eq!(
        texts(&redelivered),
        ["0", "2", "3"],
        "held messages come back in their original order"
    );
    assert_eq!(redelivered[0].id, held[0].id, "same ids");
}

#[test]
fn redelivered_messages_go_ahead_of_newer_ones() {
    let server = TestServer::start(&["--log-level", "debug"]);
    let mut producer = server.tcp_client();
    producer.send("order", b"old-1").send("order", b"old-2");
    producer.sync();
    let mut first = server.tcp_client();
    first.consume("order", 2);
    assert_eq!(first.sync().len(), 2);
    producer.send("order", b"new");
    producer.sync();
    server.disconnect_and_wait(first);
    let mut second = server.tcp_client();
    second.consume("order", 3);
    assert_eq!(texts(&second.sync()), ["old-1", "old-2", "new"]);
}

#[test]
fn ack_rules() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer.send("acks", b"one").send("acks", b"two");
    let mut holder = server.tcp_client();
    holder.consume("acks", 1);
    let d = holder.recv();
    let mut other = server.tcp_client();
    // Acks from a connection that does not hold the message, for unknown ids, malformed ids
    // and the wrong queue are ignored: the connection stays open and nothing changes.
    other
        .ack("acks", &d.id)
        .ack("acks", "0123456789abcdef0123456789abcdef")
        .ack("acks", "not-an-id")
        .ack("other-queue", &d.id);
    assert!(other.sync().is_empty());
    holder.ack("other-queue", &d.id);
    assert!(holder.sync().is_empty(), "a wrong-queue ack frees nothing");
    holder.ack("acks", &d.id);
    assert_eq!(texts(&holder.sync()), ["two"], "the ack freed one place");
    drop(holder);
    let mut after = server.tcp_client();
    after.consume("acks", 10);
    assert_eq!(
        texts(&[after.recv()]),
        ["two"],
        "the acked message is gone for good"
    );
    assert!(after.sync().is_empty());
}

#[test]
fn requeue_moves_to_the_tail_with_the_same_id_and_a_new_ttl() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer.send("rq", b"first").send("rq", b"second");
    producer.sync();
    let mut consumer = server.tcp_client();
    consumer.consume("rq", 1);
    let first = consumer.recv();
    assert_eq!(first.text(), "first");
    consumer.requeue("rq", &first.id, 120);
    let second = consumer.recv();
    assert_eq!(second.text(), "second");
    consumer.ack("rq", &second.id);
    let again = consumer.recv();
    assert_eq!(again.text(), "first");
    assert_eq!(again.id, first.id);
    assert_eq!(
        again.packet_count, 4,
        "a requeue shows v1.1, so the TTL packet comes"
    );
    let ttl = again.ttl.expect("ttl packet");
    assert!((119..=120).contains(&ttl), "remaining ttl {ttl}");
}

#[test]
fn dead_letter_removes_the_message() {
    let server = TestServer::start(&["--log-level", "debug"]);
    let mut producer = server.tcp_client();
    producer.send_ttl("dl", b"doomed", 3600);
    producer.sync();
    let mut consumer = server.tcp_client();
    consumer.consume("dl", 1);
    let d = consumer.recv();
    consumer.dead_letter("dl", &d.id);
    consumer.sync();
    server.disconnect_and_wait(consumer);
    producer.send("dl", b"marker");
    let mut next = server.tcp_client();
    next.consume("dl", 1);
    assert_eq!(
        next.recv().text(),
        "marker",
        "the dead letter is not redelivered"
    );
}

#[test]
fn expired_messages_are_never_dispatched() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    let sent = std::time::Instant::now();
    producer.send_ttl("ttl", b"short-lived", 1);
    producer.send_ttl("ttl", b"forever", 0);
    producer.sync();
    // The TTL is wall-clock time: wait it out, then ask.
    common::wait_until("the 1 s ttl to run out", || {
        sent.elapsed().as_millis() > 1100
    });
    let mut consumer = server.tcp_client();
    consumer.consume("ttl", 10);
    assert_eq!(texts(&consumer.sync()), ["forever"]);
}

#[test]
fn v10_consumers_never_get_a_ttl_packet() {
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer.send_ttl("dialect", b"with ttl", 3600);
    producer.send_ttl("dialect", b"with ttl too", 3600);
    producer.sync();
    let mut v10 = server.tcp_client();
    v10.consume("dialect", 1);
    let d = v10.recv();
    assert_eq!(
        d.packet_count, 3,
        "a v1.0 consumer reads exactly 3 packets after a 003"
    );
    assert_eq!(d.ttl, None);

    let mut v11 = server.tcp_client();
    // Any v1.1-only frame shows the dialect; a dead letter for an unknown id changes nothing else.
    v11.dead_letter("dialect", "00000000000000000000000000000000");
    v11.consume("dialect", 1);
    let d = v11.recv();
    assert_eq!(d.packet_count, 4);
    let ttl = d.ttl.expect("v1.1 gets the remaining ttl");
    assert!((3599..=3600).contains(&ttl));
}

#[test]
fn a_producer_may_pipeline_100000_sends_without_reading() {
    let server = TestServer::start(&[]);
    let addr = server.tcp_addr();
    let writer = thread::spawn(move || {
        let mut producer = Client::tcp(addr);
        let mut frames = Vec::new();
        for i in 0..100_000u32 {
            phpmq::codec::encode_frame(
                &mut frames,
                phpmq::codec::MessageType::Send,
                &[
                    (phpmq::codec::PacketType::Queue, b"pipe"),
                    (phpmq::codec::PacketType::Content, &i.to_be_bytes()),
                ],
            );
        }
        producer.raw(&frames);
        producer.sync();
    });
    writer.join().expect("producer finished");
    let mut consumer = server.unix_client();
    consumer.consume("pipe", 256);
    for i in 0..100_000u32 {
        let d = consumer.recv();
        assert_eq!(d.content, i.to_be_bytes());
        consumer.ack("pipe", &d.id);
    }
}

#[test]
fn a_slow_consumer_stalls_nobody_else() {
    let server = TestServer::start(&[]);
    // This consumer asks for a lot and never reads: its socket buffer fills up.
    let mut sleeper = server.tcp_client();
    sleeper.consume("slow", 100_000);
    sleeper.sync();
    let mut producer = server.tcp_client();
    let chunk = vec![b'x'; 64 << 10];
    for _ in 0..500 {
        producer.send("slow", &chunk);
    }
    producer.sync();
    // 32 MB went to a consumer that reads nothing; everyone else goes on.
    let mut other = server.unix_client();
    other.consume("busy", 1);
    producer.send("busy", b"still moving");
    let d = other.recv();
    assert_eq!(d.text(), "still moving");
    other.ack("busy", &d.id);
    assert!(other.sync().is_empty());
    drop(sleeper);
    // What it held goes to the others.
    other.consume("slow", 1);
    assert_eq!(other.recv().content.len(), chunk.len());
}

#[test]
fn a_consumer_that_stops_reading_does_not_hoard_the_queue() {
    let server = TestServer::start(&[]);
    // Asks for a thousand, reads nothing.
    let mut stuck = server.tcp_client();
    stuck.consume("hoard", 1000);
    stuck.sync();
    let mut producer = server.tcp_client();
    let body = vec![b'h'; 256 << 10];
    for _ in 0..300 {
        producer.send("hoard", &body);
    }
    producer.sync();
    // Its output backs up past the high-water mark (16 MiB), so deliveries to it pause and the
    // rest stays ready for a consumer that reads: half of them arrive while it is still there
    // (`recv` fails after its deadline otherwise).
    let mut reader = server.unix_client();
    reader.consume("hoard", 1000);
    for _ in 0..150 {
        let d = reader.recv();
        reader.ack("hoard", &d.id);
    }
    drop(stuck);
    // What the stuck one held comes back once it is gone.
    for _ in 150..300 {
        let d = reader.recv();
        assert_eq!(d.content.len(), body.len());
        reader.ack("hoard", &d.id);
    }
    assert!(reader.sync().is_empty());
}

/// A consumer that asks for more than one burst's worth (16 MiB) gets it all, burst after
/// burst, as it reads: each pause ends once its output is written.
#[test]
fn a_consumer_gets_a_backlog_larger_than_a_burst() {
    let server = TestServer::start(&["--db", "none"]);
    let mut producer = server.tcp_client();
    let body = vec![b'x'; 1 << 20];
    for _ in 0..40 {
        producer.send("big", &body);
    }
    producer.sync();
    let mut consumer = server.unix_client();
    consumer.consume("big", 1000);
    for i in 0..40 {
        let got = consumer.recv();
        assert_eq!(got.content.len(), 1 << 20, "message {i}");
    }
}
