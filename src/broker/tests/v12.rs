//! Unit tests of the v1.2 semantics: delivery counts (rule 6), delays (rule 5), counts and
//! flush (rule 3), leases (rule 7) and dead letters (rule 8).

use super::*;

#[test]
fn every_dispatch_counts_and_the_store_learns_the_count_when_it_ends_without_an_ack() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    let id = send(&mut b, "jobs", "a", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    assert_eq!(out[0].deliveries, 1);
    out.clear();
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(
        store.ops.lock().unwrap().last(),
        Some(&StoreOp::Counted {
            id,
            seq: 1,
            deliveries: 1
        })
    );
    b.connect(2);
    b.consume(2, q("jobs"), 1, None, 0, &mut out);
    assert_eq!(out[0].deliveries, 2, "the count survives a disconnect");
    out.clear();
    assert!(b.requeue(2, &q("jobs"), Some(id), 0, None, 0, &mut out));
    assert_eq!(out[0].deliveries, 3, "a re-queue keeps the count");
    out.clear();
    let ops_before = store.ops.lock().unwrap().len();
    b.ack(2, &q("jobs"), Some(id), 0, &mut out);
    assert_eq!(
        store.ops.lock().unwrap().len(),
        ops_before + 1,
        "the ack alone"
    );
}

#[test]
fn a_restored_message_keeps_its_count() {
    let (mut b, _) = broker();
    let name = q("jobs");
    b.restore(StoredRow {
        id: MessageId::from_u128(5),
        queue: &name,
        content: b"a",
        accepted_at: 0,
        expires_at: None,
        seq: 1,
        due_at: None,
        deliveries: 4,
    });
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, name, 1, None, 0, &mut out);
    assert_eq!(out[0].deliveries, 5);
}

fn send_at(b: &mut Broker, queue: &str, body: &str, ttl: Option<u64>, delay: u64, now: Millis) {
    b.send(
        q(queue),
        Arc::from(body.as_bytes()),
        ttl,
        Some(delay),
        now,
        &mut Vec::new(),
    );
}

#[test]
fn a_delayed_message_waits_then_joins_the_tail_in_due_then_send_order() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 10, None, 0, &mut out);
    send_at(&mut b, "jobs", "late", None, 500, 0);
    send_at(&mut b, "jobs", "first", None, 300, 0);
    send_at(&mut b, "jobs", "second", None, 200, 100);
    assert!(out.is_empty(), "nothing is due");
    let stats = b.queue_stats("jobs").unwrap();
    assert_eq!((stats.ready, stats.delayed), (0, 3));
    assert_eq!(b.message_count(), 3);
    // Due a millisecond after now + delay: `now` is cut to the millisecond.
    assert_eq!(b.next_deadline(), Some(301));
    assert_eq!(b.fire_timers(300, &mut out), 0);
    send(&mut b, "jobs", "now", &mut out);
    assert_eq!(bodies(&out), ["now"]);
    out.clear();
    assert_eq!(b.fire_timers(301, &mut out), 2);
    assert_eq!(
        bodies(&out),
        ["first", "second"],
        "same due time: send order"
    );
    out.clear();
    assert_eq!(b.next_deadline(), Some(501));
    assert_eq!(b.fire_timers(10_000, &mut out), 1);
    assert_eq!(bodies(&out), ["late"]);
    assert_eq!(b.next_deadline(), None);
    let ops = store.ops.lock().unwrap();
    assert!(matches!(
        ops[0],
        StoreOp::Insert(StoredMessage {
            due_at: Some(501),
            ..
        })
    ));
    assert!(ops.contains(&StoreOp::Requeue {
        id: out[0].id,
        old_seq: 1,
        seq: 7,
        expires_at: None,
        due_at: None,
        deliveries: 0,
        queue: None,
    }));
}

#[test]
fn a_ttl_shorter_than_the_delay_expires_the_message_undelivered() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 10, None, 0, &mut out);
    send_at(&mut b, "jobs", "swept", Some(1), 5_000, 0);
    send_at(&mut b, "jobs", "at due", Some(2), 5_000, 0);
    assert_eq!(b.expire(1_000), 1, "the sweep finds a delayed message too");
    assert_eq!(b.fire_timers(5_001, &mut out), 0);
    assert!(out.is_empty());
    assert_eq!(b.totals().expired, 2);
    assert_eq!(b.message_count(), 0);
    assert!(b.queue_stats("jobs").is_some_and(|s| s.delayed == 0));
}

#[test]
fn a_requeue_with_a_delay_keeps_the_message_back_and_frees_the_holder() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    send(&mut b, "jobs", "a", &mut out);
    send(&mut b, "jobs", "b", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    let a = out[0].id;
    out.clear();
    assert!(b.requeue(1, &q("jobs"), Some(a), 0, Some(1_000), 0, &mut out));
    assert_eq!(bodies(&out), ["b"]);
    let b_id = out[0].id;
    out.clear();
    b.ack(1, &q("jobs"), Some(b_id), 10, &mut out);
    assert!(out.is_empty(), "a is delayed");
    b.fire_timers(1_001, &mut out);
    assert_eq!((out[0].id, out[0].deliveries), (a, 2));
}

#[test]
fn restored_delayed_messages_wait_again_and_due_ones_join_in_due_order() {
    let (mut b, _) = broker();
    let name = q("jobs");
    let row = |seq: u64, due_at: Option<Millis>, content: &'static [u8]| StoredRow {
        id: MessageId::from_u128(seq.into()),
        queue: &name,
        content,
        accepted_at: 0,
        expires_at: None,
        seq,
        due_at,
        deliveries: 0,
    };
    b.restore(row(1, Some(900), b"due later"));
    b.restore(row(2, Some(50), b"due second"));
    b.restore(row(3, None, b"ready"));
    b.restore(row(4, Some(20), b"due first"));
    b.restore(row(5, Some(5_000), b"future"));
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, name, 10, None, 1_000, &mut out);
    assert_eq!(bodies(&out), ["ready"]);
    out.clear();
    b.fire_timers(1_000, &mut out);
    assert_eq!(bodies(&out), ["due first", "due second", "due later"]);
    assert_eq!(b.queue_stats("jobs").map(|s| s.delayed), Some(1));
    assert_eq!(b.next_deadline(), Some(5_000));
}

#[test]
fn delayed_content_is_read_back_from_the_store_once_due() {
    let (mut b, store) = windowed_broker(100, 1 << 20);
    let mut out = Vec::new();
    send_at(&mut b, "jobs", "later", None, 100, 0);
    assert!(b.queues["jobs"]
        .delayed
        .iter()
        .all(|(_, d)| d.content.is_none()));
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    b.fire_timers(101, &mut out);
    assert!(out.is_empty(), "its content is still to come");
    store.serve(&mut b, 101, &mut out);
    assert_eq!(bodies(&out), ["later"]);
}

#[test]
fn flush_counts_delayed_messages_and_listings_show_them() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    send(&mut b, "jobs", "a", &mut out);
    send_at(&mut b, "jobs", "b", None, 100, 0);
    let listing = b.list_messages("jobs", 10, 0).unwrap();
    assert_eq!(listing.total, 2);
    assert_eq!(listing.rows[1].state, MessageState::Delayed);
    assert_eq!(b.queue_statuses(0)[0].delayed, 1);
    assert_eq!(b.flush("jobs", 0, &mut out), Some(2));
    assert_eq!(b.next_deadline(), None);
    assert_eq!(b.message_count(), 0);
}

#[test]
fn counts_and_flush_of_a_queue_nobody_used_create_nothing() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    assert_eq!(b.counts("nobody"), QueueCounts::default());
    assert_eq!(b.flush_queue("nobody", 0, &mut out), 0);
    assert!(b.queue_names().is_empty());
}

#[test]
fn counts_and_flush_see_ready_delayed_and_in_flight_and_a_later_ack_is_ignored() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for body in ["a", "b", "c"] {
        send(&mut b, "jobs", body, &mut out);
    }
    send_at(&mut b, "jobs", "d", None, 1_000, 0);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    let held = out[0].id;
    out.clear();
    let counts = b.counts("jobs");
    assert_eq!(
        counts,
        QueueCounts {
            ready: 2,
            delayed: 1,
            in_flight: 1,
            consumers: 1
        }
    );
    assert_eq!(b.flush_queue("jobs", 0, &mut out), 4);
    assert!(out.is_empty());
    assert!(!b.ack(1, &q("jobs"), Some(held), 0, &mut out));
    assert_eq!(b.message_count(), 0);
    assert_eq!(b.totals().flushed, 4);
    assert_eq!(b.counts("jobs").consumers, 1, "the consumer stays");
}

#[test]
fn an_expired_lease_takes_the_message_back_to_the_head_and_frees_the_holder() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 1, Some(1_000), 0, &mut out);
    let a = send(&mut b, "jobs", "a", &mut out);
    send(&mut b, "jobs", "b", &mut out);
    assert_eq!(bodies(&out), ["a"]);
    out.clear();
    assert_eq!(b.next_deadline(), Some(1_001));
    assert_eq!(b.fire_timers(1_000, &mut out), 0);
    // Another consumer, full, so the room of the old holder is what serves.
    assert_eq!(b.fire_timers(1_001, &mut out), 1);
    assert_eq!(
        (bodies(&out), out[0].deliveries),
        (vec!["a".to_string()], 2),
        "back at the head, to the holder whose room was freed"
    );
    assert!(store.ops.lock().unwrap().contains(&StoreOp::Counted {
        id: a,
        seq: 1,
        deliveries: 1
    }));
    out.clear();
    // Taken back again; this time another consumer waits.
    b.connect(2);
    b.consume(2, q("jobs"), 1, None, 1_000, &mut out);
    assert_eq!(bodies(&out), ["b"]);
    let b_id = out[0].id;
    out.clear();
    b.ack(2, &q("jobs"), Some(b_id), 1_000, &mut out);
    assert!(out.is_empty());
    b.fire_timers(2_002, &mut out);
    assert_eq!((out[0].id, out[0].deliveries), (a, 3));
    let holder = out[0].conn;
    out.clear();
    if holder == 2 {
        assert!(
            !b.ack(1, &q("jobs"), Some(a), 2_002, &mut out),
            "the old holder's ack is ignored"
        );
        assert!(b.ack(2, &q("jobs"), Some(a), 2_002, &mut out));
    }
    assert_eq!(
        b.next_deadline(),
        if holder == 2 { None } else { Some(3_003) }
    );
}

#[test]
fn a_late_ack_from_the_old_holder_is_ignored() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 1, Some(100), 0, &mut out);
    let a = send(&mut b, "jobs", "a", &mut out);
    b.consume(1, q("jobs"), 0, None, 0, &mut out);
    out.clear();
    b.fire_timers(101, &mut out);
    assert!(out.is_empty(), "no consumer with room");
    assert!(!b.ack(1, &q("jobs"), Some(a), 150, &mut out));
    assert_eq!(b.counts("jobs").ready, 1);
    assert_eq!(b.totals().acknowledged, 0);
}

#[test]
fn touch_restarts_the_lease_and_a_new_consume_sets_it_for_later_dispatches() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 2, Some(1_000), 0, &mut out);
    let a = send(&mut b, "jobs", "a", &mut out);
    b.consume(1, q("jobs"), 2, Some(5_000), 0, &mut out);
    let c = send(&mut b, "jobs", "c", &mut out);
    out.clear();
    assert!(b.touch(1, &q("jobs"), Some(a), 900));
    assert!(!b.touch(2, &q("jobs"), Some(a), 900), "not the holder");
    assert_eq!(
        b.fire_timers(1_900, &mut out),
        0,
        "touched at 900: due at 1901"
    );
    assert_eq!(b.fire_timers(1_901, &mut out), 1);
    assert_eq!(out[0].id, a, "redispatched under the new lease");
    out.clear();
    assert_eq!(b.fire_timers(5_001, &mut out), 1, "c kept its 5 s deadline");
    assert_eq!(out[0].id, c);
    assert_eq!(
        b.next_deadline(),
        Some(6_902),
        "a's second lease, 5 s from 1901"
    );
}

#[test]
fn messages_without_a_lease_are_held_until_acked() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 1, Some(0), 0, &mut out);
    let a = send(&mut b, "jobs", "a", &mut out);
    assert_eq!(b.next_deadline(), None);
    assert!(b.touch(1, &q("jobs"), Some(a), 10));
    assert_eq!(b.fire_timers(u64::MAX / 2, &mut out), 0);
    assert!(b.ack(1, &q("jobs"), Some(a), 10, &mut out));
}

#[test]
fn the_nth_dispatch_without_an_ack_moves_the_message_to_its_dead_letter_queue() {
    let (mut b, store) = broker();
    b.set_max_deliveries(Some(3));
    let mut out = Vec::new();
    let a = send(&mut b, "jobs", "a", &mut out);
    // 1: its holder leaves.
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    // 2: a re-queue.
    b.connect(2);
    b.consume(2, q("jobs"), 1, Some(100), 0, &mut out);
    assert!(b.requeue(2, &q("jobs"), Some(a), 60, None, 0, &mut out));
    // 3: its lease runs out.
    assert_eq!(out.last().map(|d| d.deliveries), Some(3));
    out.clear();
    b.fire_timers(101, &mut out);
    assert!(out.is_empty(), "not back in jobs");
    assert_eq!(b.counts("jobs").ready, 0);
    assert_eq!(b.counts("jobs.dead").ready, 1);
    let ops = store.ops.lock().unwrap();
    let Some(StoreOp::Requeue {
        id,
        expires_at,
        deliveries,
        queue,
        ..
    }) = ops.last()
    else {
        panic!("{:?}", ops.last());
    };
    assert_eq!(
        (*id, *expires_at, *deliveries, queue.clone()),
        (a, Some(60_000), 3, Some(q("jobs.dead"))),
        "moved with its id, TTL and count"
    );
    drop(ops);
    assert_eq!(b.totals().moved_to_dead, 1);
    // From the dead queue it shows N+1, and it is never moved again.
    b.connect(3);
    b.consume(3, q("jobs.dead"), 1, None, 200, &mut out);
    assert_eq!((out[0].id, out[0].deliveries), (a, 4));
    out.clear();
    b.disconnect(3, EndedBy::Client, 200, &mut out);
    assert_eq!(b.counts("jobs.dead").ready, 1);
    assert!(b
        .queue_names()
        .iter()
        .all(|n| n.as_str() != "jobs.dead.dead"));
}

#[test]
fn without_a_maximum_nothing_is_moved() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    let a = send(&mut b, "jobs", "a", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    for _ in 0..5 {
        b.requeue(1, &q("jobs"), Some(a), 0, None, 0, &mut out);
    }
    assert_eq!(out.last().map(|d| d.deliveries), Some(6));
    assert_eq!(b.queue_names(), [q("jobs")]);
}

#[test]
fn a_long_queue_name_is_cut_and_hashed_to_make_room_for_dead() {
    let long = "é".repeat(127) + "x"; // 255 bytes
    let dead = dead_queue_name(&long).unwrap();
    assert_eq!(dead.as_str().len(), 254, "{}", dead.as_str());
    let (kept, tail) = dead.as_str().split_at(232);
    assert_eq!(kept, "é".repeat(116), "cut at a character boundary");
    assert!(tail.starts_with('~') && tail.ends_with(".dead"), "{tail}");
    assert!(tail[1..17].bytes().all(|b| b.is_ascii_hexdigit()), "{tail}");
    // Names that differ only past the cut have dead queues of their own, every time.
    let other = "é".repeat(127) + "y";
    assert_ne!(dead_queue_name(&other).unwrap(), dead);
    assert_eq!(dead_queue_name(&long).unwrap(), dead);
    // 250 bytes still fit as they are.
    let fits = "a".repeat(250);
    assert_eq!(
        dead_queue_name(&fits).unwrap().as_str(),
        fits.clone() + ".dead"
    );
    assert_eq!(dead_queue_name("jobs").unwrap().as_str(), "jobs.dead");
    assert!(dead_queue_name("jobs.dead").is_none());
}

#[test]
fn redrive_moves_dead_messages_back_with_ids_kept_and_counts_reset() {
    let (mut b, _) = broker();
    b.set_max_deliveries(Some(1));
    let mut out = Vec::new();
    send(&mut b, "jobs", "a", &mut out);
    send(&mut b, "jobs", "b", &mut out);
    send(&mut b, "jobs", "c", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 3, None, 0, &mut out);
    let ids: Vec<MessageId> = out.iter().map(|d| d.id).collect();
    out.clear();
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(b.counts("jobs.dead").ready, 3);
    // One of them delayed in the dead queue, one held there.
    b.connect(2);
    b.consume(2, q("jobs.dead"), 2, None, 0, &mut out);
    assert!(b.requeue(
        2,
        &q("jobs.dead"),
        Some(ids[0]),
        0,
        Some(10_000),
        0,
        &mut out
    ));
    assert_eq!(b.counts("jobs.dead").delayed, 1);
    assert_eq!(b.counts("jobs.dead").in_flight, 2);
    b.ack(2, &q("jobs.dead"), Some(ids[1]), 0, &mut out);
    out.clear();
    assert_eq!(b.redrive(&q("nobody"), 0, &mut out), 0);
    assert!(!b.queue_names().contains(&q("nobody.dead")));
    // ids[2] is held in the dead queue: it stays. ids[0] is delayed: it comes back at once.
    assert_eq!(b.redrive(&q("jobs"), 0, &mut out), 1);
    assert_eq!(b.counts("jobs").ready, 1);
    assert_eq!(b.counts("jobs.dead").delayed, 0);
    b.connect(3);
    b.consume(3, q("jobs"), 5, None, 0, &mut out);
    assert_eq!((out[0].id, out[0].deliveries), (ids[0], 1), "count reset");
}

#[test]
fn redrive_works_in_chunks_in_order() {
    let (mut b, _) = broker();
    b.set_max_deliveries(Some(1));
    let mut out = Vec::new();
    send_numbered(&mut b, "jobs", 10, &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 10, None, 0, &mut out);
    out.clear();
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(b.redrive_some(&q("jobs"), 4, 0, &mut out), 4);
    assert_eq!(b.redrive_some(&q("jobs"), 4, 0, &mut out), 4);
    assert_eq!(b.redrive_some(&q("jobs"), 4, 0, &mut out), 2);
    assert!(!b.queue_names().contains(&q("jobs.dead")), "empty: gone");
    b.connect(2);
    b.consume(2, q("jobs"), 10, None, 0, &mut out);
    assert_eq!(bodies(&out), numbered(0..10));
}

#[test]
fn a_requeue_at_the_last_allowed_dispatch_keeps_the_ttl_it_had() {
    let (mut b, store) = broker();
    b.set_max_deliveries(Some(1));
    let mut out = Vec::new();
    let a = b.send(q("jobs"), Arc::from(&b"a"[..]), Some(60), None, 0, &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    assert!(b.requeue(1, &q("jobs"), Some(a), 5, Some(1_000), 0, &mut out));
    assert_eq!(b.counts("jobs.dead").ready, 1, "not delayed: moved");
    assert_eq!(b.totals().requeued, 0, "the re-queue did not happen");
    let ops = store.ops.lock().unwrap();
    assert!(matches!(
        ops.last(),
        Some(StoreOp::Requeue {
            expires_at: Some(60_000),
            due_at: None,
            deliveries: 1,
            queue: Some(_),
            ..
        })
    ));
}

#[test]
fn a_restored_delayed_message_is_read_back_from_the_store_once_due() {
    let (mut b, store) = windowed_broker(100, 1 << 20);
    let name = q("jobs");
    store
        .ops
        .lock()
        .unwrap()
        .push(StoreOp::Insert(StoredMessage {
            id: MessageId::from_u128(1),
            queue: name.clone(),
            content: Arc::from(&b"later"[..]),
            accepted_at: 0,
            expires_at: None,
            seq: 1,
            due_at: Some(500),
            deliveries: 2,
        }));
    b.restore(StoredRow {
        id: MessageId::from_u128(1),
        queue: &name,
        content: b"later",
        accepted_at: 0,
        expires_at: None,
        seq: 1,
        due_at: Some(500),
        deliveries: 2,
    });
    assert_eq!(b.counts("jobs").delayed, 1);
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, name, 1, None, 0, &mut out);
    b.fire_timers(500, &mut out);
    store.serve(&mut b, 500, &mut out);
    assert_eq!(bodies(&out), ["later"]);
    assert_eq!(out[0].deliveries, 3);
    b.check_invariants(&store, true);
}
