use super::*;
use crate::outgoing::encode_dispatch;
use crate::store::NullStore;
use std::os::unix::net::UnixStream;
use std::thread;

fn hub_behind(backlog: &Arc<Backlog>) -> Hub {
    let (fatal, _) = crossbeam_channel::unbounded();
    let broker = Broker::new(Box::new(NullStore));
    Hub::new(broker, fatal, Bell::new().unwrap()).with_store_backlogs(vec![backlog.clone()])
}

fn peer() -> (Peer, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    (Peer::new(1, "test".into(), Stream::Unix(ours)), theirs)
}

#[test]
fn producers_wait_while_the_store_is_far_behind() {
    let backlog = Arc::new(Backlog::default());
    let hub = hub_behind(&backlog);
    let (peer, _client) = peer();
    let heavy = LIGHT_BATCH + 1;
    hub.wait_for_store(&peer, heavy, 0); // nothing pending: returns at once
    backlog.add(64 << 20);
    let (done, finished) = crossbeam_channel::bounded(1);
    thread::scope(|scope| {
        scope.spawn(|| {
            hub.wait_for_store(&peer, heavy, 0);
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(50)).is_err(),
            "went on while the store was 64 MiB behind"
        );
        backlog.remove(1, 64 << 20);
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("still waiting once the store caught up");
    });
}

/// The server's own bulk work (a release of due messages, a redrive) waits for a store past
/// its mark to catch up, so its changes never reach the ceiling that holds back everyone; a
/// store that does not catch up delays it by at most [`BULK_PACE_MAX`], never stops it.
#[test]
fn bulk_work_waits_for_a_store_past_its_mark_for_a_bounded_time() {
    let backlog = Arc::new(Backlog::default());
    let hub = hub_behind(&backlog);
    let started = std::time::Instant::now();
    hub.pace_bulk_work(); // nothing pending: returns at once
    assert!(started.elapsed() < BULK_PACE_MAX);
    backlog.add(48 << 20); // past the mark, under the ceiling
    let (done, finished) = crossbeam_channel::bounded(1);
    thread::scope(|scope| {
        scope.spawn(|| {
            hub.pace_bulk_work();
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(30)).is_err(),
            "bulk work went on while the store was past its mark"
        );
        backlog.remove(1, 48 << 20);
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("still waiting once the store caught up");
    });
    backlog.add(48 << 20);
    let started = std::time::Instant::now();
    hub.pace_bulk_work();
    let waited = started.elapsed();
    assert!(
        waited >= BULK_PACE_MAX && waited < BULK_PACE_MAX + 10 * STORE_WAIT_RECHECK,
        "{waited:?}"
    );
}

/// A light producer is not held back for another's flood, below twice the mark; past it, it
/// waits too.
#[test]
fn a_light_producer_waits_only_past_twice_the_mark() {
    let backlog = Arc::new(Backlog::default());
    let hub = hub_behind(&backlog);
    let (peer, _client) = peer();
    backlog.add(64 << 20);
    assert!(backlog.is_high());
    hub.wait_for_store(&peer, LIGHT_BATCH, LIGHT_BYTES); // returns at once
    backlog.add(1);
    let (done, finished) = crossbeam_channel::bounded(1);
    thread::scope(|scope| {
        scope.spawn(|| {
            hub.wait_for_store(&peer, 1, 10);
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(50)).is_err(),
            "a light producer went on past twice the mark"
        );
        backlog.remove(2, (64 << 20) + 1);
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("still waiting once the store caught up");
    });
}

/// What a peer's client receives for one delivery of a message with a TTL.
fn dispatch_seen_by(peer: Peer, client: &mut UnixStream) -> Vec<u8> {
    let delivery = Delivery {
        conn: 1,
        queue: crate::request::QueueName::new(b"jobs").unwrap(),
        id: crate::id::MessageId::from_u128(7),
        content: Arc::from(&b"x"[..]),
        ttl_remaining: Some(60),
        deliveries: 1,
    };
    fan_out(vec![(Arc::new(peer), vec![delivery.into()])]);
    let mut got = Vec::new();
    client.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    // The direct send wrote it all before fan_out returned: read until nothing is left.
    while let Ok(n) = std::io::Read::read(client, &mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[test]
fn only_a_peer_that_showed_v11_sees_the_ttl_packet() {
    let queue = crate::request::QueueName::new(b"jobs").unwrap();
    let id = crate::id::MessageId::from_u128(7);
    let (peer, mut client) = peer();
    let mut three_packets = Vec::new();
    encode_dispatch(&mut three_packets, &queue, b"x", id, None);
    assert_eq!(
        dispatch_seen_by(peer, &mut client),
        three_packets,
        "a v1.0 connection reads exactly three packets after a 003"
    );
    let (peer, mut client) = self::peer();
    peer.note_dialect(&Request::DeadLetter {
        queue: queue.clone(),
        id: None,
    });
    let mut four_packets = Vec::new();
    encode_dispatch(&mut four_packets, &queue, b"x", id, Some(60));
    assert_eq!(dispatch_seen_by(peer, &mut client), four_packets);
}

#[test]
fn a_closing_connection_does_not_wait() {
    let backlog = Arc::new(Backlog::default());
    backlog.add(64 << 20);
    let hub = hub_behind(&backlog);
    let (peer, _client) = peer();
    peer.closing.store(true, Ordering::Relaxed);
    hub.wait_for_store(&peer, LIGHT_BATCH + 1, 0);
    assert!(backlog.is_high(), "returned without the store catching up");
}

fn hub() -> Hub {
    let (fatal, _) = crossbeam_channel::unbounded();
    Hub::new(
        Broker::new(Box::new(NullStore)),
        fatal,
        Bell::new().unwrap(),
    )
}

/// Registers a connection that never consumes; returns it and its client end.
fn registered(hub: &Hub, conn: ConnId) -> (Arc<Peer>, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let peer = Arc::new(Peer::new(conn, "test".into(), Stream::Unix(ours)));
    assert_eq!(hub.register(conn, peer.clone()), Ok(true));
    theirs
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (peer, theirs)
}

fn read_exactly(client: &mut UnixStream, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut got = vec![0; len];
    client
        .read_exact(&mut got)
        .expect("the frame did not arrive");
    got
}

#[test]
fn a_frame_other_than_a_dispatch_reaches_a_connection_that_never_consumed() {
    let hub = hub();
    let (_, mut client) = registered(&hub, 1);
    let (_, mut other) = registered(&hub, 2);
    hub.send(vec![
        (1, Outgoing::Raw(b"first".to_vec())),
        (2, Outgoing::Raw(b"theirs".to_vec())),
        (1, Outgoing::Raw(b"second".to_vec())),
    ])
    .unwrap();
    // Sent directly: nothing waits for a writer.
    assert_eq!(read_exactly(&mut client, 11), b"firstsecond");
    assert_eq!(read_exactly(&mut other, 6), b"theirs");
}

#[test]
fn frames_for_a_connection_that_is_gone_are_dropped() {
    let hub = hub();
    let (_, mut client) = registered(&hub, 1);
    let _gone = registered(&hub, 2);
    hub.unregister(2, EndedBy::Client).unwrap();
    hub.send(vec![
        (2, Outgoing::Raw(b"lost".to_vec())),
        (1, Outgoing::Raw(b"kept".to_vec())),
        (3, Outgoing::Raw(b"never".to_vec())),
    ])
    .unwrap();
    assert_eq!(read_exactly(&mut client, 4), b"kept");
}

#[test]
fn a_frame_the_socket_does_not_take_waits_in_order_for_the_writer() {
    let hub = hub();
    let (peer, mut client) = registered(&hub, 1);
    // More than any socket buffer takes at once: the rest waits in the outbox.
    let big = vec![b'x'; 8 << 20];
    hub.send(vec![
        (1, Outgoing::Raw(big.clone())),
        (1, Outgoing::Raw(b"after".to_vec())),
    ])
    .unwrap();
    assert!(
        peer.outbox.pending_len() > 0,
        "the socket took 8 MiB at once"
    );
    thread::scope(|scope| {
        let writer = scope.spawn(|| peer.outbox.write_loop(&*peer.stream, || {}));
        let got = read_exactly(&mut client, big.len() + 5);
        assert!(got.starts_with(&big) && got.ends_with(b"after"));
        peer.outbox.close();
        writer.join().unwrap().unwrap();
    });
}

#[test]
fn a_peer_moves_up_from_v10_on_a_v11_request_and_never_down() {
    let (peer, _client) = peer();
    assert_eq!(peer.dialect(), Dialect::V10);
    let dead_letter = Request::DeadLetter {
        queue: crate::request::QueueName::new(b"q").unwrap(),
        id: None,
    };
    peer.note_dialect(&dead_letter);
    assert_eq!(peer.dialect(), Dialect::V11);
    peer.set_dialect(Dialect::V12);
    peer.note_dialect(&dead_letter);
    assert_eq!(peer.dialect(), Dialect::V12, "v1.2 stays v1.2");
    let (peer, mut client) = self::peer();
    peer.set_dialect(Dialect::V12);
    let queue = crate::request::QueueName::new(b"jobs").unwrap();
    let mut expected = Vec::new();
    crate::outgoing::encode_dispatch_with(
        &mut expected,
        &queue,
        b"x",
        crate::id::MessageId::from_u128(7),
        Some(60),
        Some(1),
    );
    assert_eq!(dispatch_seen_by(peer, &mut client), expected);
}

#[test]
fn a_sweep_takes_back_an_expired_lease_and_says_when_the_next_one_is_due() {
    let hub = hub();
    let (_, mut client) = registered(&hub, 1);
    let queue = crate::request::QueueName::new(b"jobs").unwrap();
    let longest = Duration::from_millis(250);
    let shortest = Duration::from_millis(1);
    assert_eq!(
        hub.sweep(longest, shortest),
        Ok(longest),
        "nothing to wait for"
    );
    let id = hub
        .modify(|broker, now, out| {
            broker.consume(1, queue.clone(), 1, Some(40), now, out);
            broker.send(queue.clone(), Arc::from(&b"x"[..]), None, None, now, out)
        })
        .unwrap();
    let mut dispatch = Vec::new();
    encode_dispatch(&mut dispatch, &queue, b"x", id, None);
    assert_eq!(read_exactly(&mut client, dispatch.len()), dispatch);
    let next = hub.sweep(longest, shortest).unwrap();
    // 40 ms from the millisecond after the dispatch's.
    assert!(next <= Duration::from_millis(41), "{next:?}");
    thread::sleep(next + Duration::from_millis(5));
    // Taken back and, the holder's room freed, dispatched to it again.
    assert!(
        hub.sweep(longest, shortest).unwrap() < longest,
        "leased again"
    );
    assert_eq!(read_exactly(&mut client, dispatch.len()), dispatch);
}

/// A lease set by a plain send's dispatch (not by a request that carries one) wakes a
/// sweeper that planned to sleep past it; a lease that ends after the planned sweep does not.
#[test]
fn a_dispatch_that_sets_an_early_lease_wakes_the_sweeper() {
    let hub = hub();
    let (_, _client) = registered(&hub, 1);
    let queue = crate::request::QueueName::new(b"jobs").unwrap();
    let long = crate::request::QueueName::new(b"long").unwrap();
    hub.modify(|broker, now, out| {
        broker.consume(1, queue.clone(), 1, Some(5), now, out);
        broker.consume(1, long.clone(), 1, Some(60_000), now, out);
    })
    .unwrap();
    let longest = Duration::from_millis(250);
    assert_eq!(hub.sweep(longest, Duration::from_millis(1)), Ok(longest));
    while hub.timer_wake_ups().try_recv().is_ok() {}
    hub.modify(|broker, now, out| {
        broker.send(long.clone(), Arc::from(&b"x"[..]), None, None, now, out)
    })
    .unwrap();
    assert!(
        hub.timer_wake_ups().try_recv().is_err(),
        "ends after the planned sweep"
    );
    hub.modify(|broker, now, out| {
        broker.send(queue.clone(), Arc::from(&b"x"[..]), None, None, now, out)
    })
    .unwrap();
    assert!(hub.timer_wake_ups().try_recv().is_ok(), "ends before it");
}

/// Expiries past one batch bring the next sweep forward: what expired does not linger as
/// ready until the next tick.
#[test]
fn a_full_batch_of_expiries_brings_the_next_sweep_forward() {
    let hub = hub();
    let queue = crate::request::QueueName::new(b"short").unwrap();
    hub.modify(|broker, now, out| {
        for _ in 0..EXPIRE_BATCH + 1 {
            // Sent a minute ago with a TTL of one second.
            broker.send(
                queue.clone(),
                Arc::from(&b"x"[..]),
                Some(1),
                None,
                now - 60_000,
                out,
            );
        }
    })
    .unwrap();
    let (longest, shortest) = (Duration::from_millis(250), Duration::from_millis(1));
    // A held message with a lease: the sweep plans for its deadline and does not wake itself.
    let (_, _client) = registered(&hub, 1);
    let leased = crate::request::QueueName::new(b"leased").unwrap();
    hub.modify(|broker, now, out| {
        broker.consume(1, leased.clone(), 1, Some(30_000), now, out);
        broker.send(leased.clone(), Arc::from(&b"y"[..]), None, None, now, out);
    })
    .unwrap();
    while hub.timer_wake_ups().try_recv().is_ok() {}
    let next = hub.sweep(longest, shortest).unwrap();
    assert!(next <= EXPIRY_PAUSE, "more to expire, yet {next:?}");
    assert!(
        hub.timer_wake_ups().try_recv().is_err(),
        "the sweep woke itself"
    );
    // Debug builds on a loaded machine may take longer than a pause: several sweeps.
    let mut sweeps = 1;
    while hub.sweep(longest, shortest).unwrap() < longest / 2 {
        sweeps += 1;
        assert!(sweeps < 10, "still sweeping");
    }
    assert_eq!(
        hub.read(|broker, _| broker.message_count()),
        Ok(1),
        "the held one"
    );
}
