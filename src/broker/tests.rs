//! Unit tests of the broker core, without sockets.

use super::*;
use crate::store::{FetchRequest, Fetched};
use std::sync::Mutex;

/// A store that records every operation, shared with the test; a windowed one also takes
/// fetch requests, which the test answers with [`Recorder::serve`] when it likes.
#[derive(Clone, Default)]
struct Recorder {
    ops: Arc<Mutex<Vec<StoreOp>>>,
    fetches: Arc<Mutex<Vec<FetchRequest>>>,
    can_fetch: bool,
}

impl Store for Recorder {
    fn apply(&mut self, op: StoreOp) {
        self.ops.lock().unwrap().push(op);
    }

    fn can_fetch(&self) -> bool {
        self.can_fetch
    }

    fn fetch(&mut self, request: FetchRequest) {
        assert!(self.can_fetch);
        self.fetches.lock().unwrap().push(request);
    }
}

impl Recorder {
    /// What the store holds now, by seq, replayed from the ops.
    fn contents(&self) -> BTreeMap<u64, Arc<[u8]>> {
        let mut stored = BTreeMap::new();
        for op in self.ops.lock().unwrap().iter() {
            match op {
                StoreOp::Insert(m) => {
                    stored.insert(m.seq, m.content.clone());
                }
                StoreOp::Delete { seq, .. } => {
                    stored.remove(seq);
                }
                StoreOp::Requeue { old_seq, seq, .. } => {
                    if let Some(content) = stored.remove(old_seq) {
                        stored.insert(*seq, content);
                    }
                }
                StoreOp::Counted { .. } => {}
            }
        }
        stored
    }

    /// Answers every fetch asked for so far, as the store writer does; returns how many.
    fn serve(&self, b: &mut Broker, now: Millis, out: &mut Vec<Delivery>) -> usize {
        let requests = std::mem::take(&mut *self.fetches.lock().unwrap());
        let stored = self.contents();
        for request in &requests {
            let contents = request
                .seqs
                .iter()
                .filter_map(|seq| stored.get(seq).map(|c| (*seq, c.clone())))
                .collect();
            b.attach(
                Fetched {
                    request: request.clone(),
                    contents,
                },
                now,
                out,
            );
        }
        requests.len()
    }

    /// Makes the store lose the first message the oldest pending fetch asks for, if the broker
    /// still waits for its content (else a later delete would name a row already gone).
    /// Returns whether it lost one.
    fn lose_one(&self, b: &Broker) -> bool {
        let fetches = self.fetches.lock().unwrap();
        let Some(request) = fetches.first() else {
            return false;
        };
        let waiting = |seq: u64| {
            b.queues.get(&request.queue).is_some_and(|q| {
                q.fetching == Some(request.token)
                    && q.ready.get(seq).is_some_and(|e| e.content.is_none())
            })
        };
        let Some(&seq) = request.seqs.iter().find(|&&seq| waiting(seq)) else {
            return false;
        };
        let id = b.queues[&request.queue].ready.get(seq).map(|e| e.id);
        drop(fetches);
        let Some(id) = id else {
            return false;
        };
        self.ops.lock().unwrap().push(StoreOp::Delete { id, seq });
        true
    }

    fn pending_fetches(&self) -> usize {
        self.fetches.lock().unwrap().len()
    }
}

/// Messages and bytes held, all queues together.
fn stored(b: &Broker) -> (usize, u64) {
    let used = b.store_use();
    (used.messages, used.bytes)
}

fn q(name: &str) -> QueueName {
    QueueName::new(name.as_bytes()).unwrap()
}

fn broker() -> (Broker, Recorder) {
    let recorder = Recorder::default();
    let broker = Broker::with_ids(Box::new(recorder.clone()), IdGenerator::with_nonce(7));
    (broker, recorder)
}

/// A broker whose store reads content back, keeping `messages` / `bytes` per queue in memory
/// (and no limit over all queues).
fn windowed_broker(messages: usize, bytes: u64) -> (Broker, Recorder) {
    let unlimited = Amount {
        messages: usize::MAX / 2,
        bytes: u64::MAX / 2,
    };
    budgeted_broker(Amount { messages, bytes }, unlimited, Amount::default())
}

fn budgeted_broker(per_queue: Amount, total: Amount, floor: Amount) -> (Broker, Recorder) {
    let recorder = Recorder {
        can_fetch: true,
        ..Recorder::default()
    };
    let mut broker = Broker::with_ids(Box::new(recorder.clone()), IdGenerator::with_nonce(7));
    assert!(broker.table.window.is_some());
    broker.table.window = Some(Window {
        per_queue,
        total,
        floor,
    });
    (broker, recorder)
}

fn messages(messages: usize) -> Amount {
    Amount {
        messages,
        bytes: u64::MAX / 2,
    }
}

fn send(b: &mut Broker, queue: &str, body: &str, out: &mut Vec<Delivery>) -> MessageId {
    b.send(q(queue), Arc::from(body.as_bytes()), None, None, 0, out)
}

fn bodies(out: &[Delivery]) -> Vec<String> {
    out.iter()
        .map(|d| String::from_utf8(d.content.to_vec()).unwrap())
        .collect()
}

#[test]
fn fifo_to_a_single_consumer() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..100 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    assert!(out.is_empty(), "no consumer yet");
    b.connect(1);
    b.consume(1, q("jobs"), 1000, None, 0, &mut out);
    let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(bodies(&out), expected);
    assert!(out.iter().all(|d| d.conn == 1 && d.ttl_remaining.is_none()));
}

#[test]
fn prefetch_limits_holds_and_each_ack_frees_one() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..10 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    b.connect(1);
    b.consume(1, q("jobs"), 3, None, 0, &mut out);
    assert_eq!(bodies(&out), ["0", "1", "2"]);
    let first = out[0].id;
    out.clear();
    assert!(b.ack(1, &q("jobs"), Some(first), 0, &mut out));
    assert_eq!(bodies(&out), ["3"]);
    assert_eq!(
        b.queue_stats("jobs"),
        Some(QueueStats {
            ready: 6,
            delayed: 0,
            in_flight: 3,
            consumers: 1
        })
    );
}

#[test]
fn round_robin_over_consumers() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for conn in 1..=3 {
        b.connect(conn);
        b.consume(conn, q("jobs"), 100, None, 0, &mut out);
    }
    for i in 0..9 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    let order: Vec<ConnId> = out.iter().map(|d| d.conn).collect();
    assert_eq!(order, [1, 2, 3, 1, 2, 3, 1, 2, 3]);
}

#[test]
fn full_consumers_are_skipped() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.connect(2);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    b.consume(2, q("jobs"), 5, None, 0, &mut out);
    for i in 0..4 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    let order: Vec<ConnId> = out.iter().map(|d| d.conn).collect();
    assert_eq!(order, [1, 2, 2, 2]);
}

#[test]
fn new_consume_request_changes_the_count_and_keeps_holds() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..5 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    b.connect(1);
    b.consume(1, q("jobs"), 2, None, 0, &mut out);
    b.consume(1, q("jobs"), 3, None, 0, &mut out);
    assert_eq!(bodies(&out), ["0", "1", "2"]);
    out.clear();
    b.consume(1, q("jobs"), 0, None, 0, &mut out);
    let held = b.queue_stats("jobs").unwrap();
    assert_eq!(
        held,
        QueueStats {
            ready: 2,
            delayed: 0,
            in_flight: 3,
            consumers: 0
        }
    );
    // Count 0 stops new deliveries, acks still count.
    send(&mut b, "jobs", "5", &mut out);
    assert!(out.is_empty());
}

#[test]
fn several_queues_on_one_connection() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("a"), 1, None, 0, &mut out);
    b.consume(1, q("b"), 2, None, 0, &mut out);
    for name in ["a", "b", "a", "b", "b"] {
        send(&mut b, name, name, &mut out);
    }
    assert_eq!(bodies(&out), ["a", "b", "b"]);
}

#[test]
fn ack_rules() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.connect(2);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    let id = send(&mut b, "jobs", "x", &mut out);
    assert!(
        !b.ack(2, &q("jobs"), Some(id), 0, &mut out),
        "not the holder"
    );
    assert!(!b.ack(1, &q("other"), Some(id), 0, &mut out), "wrong queue");
    assert!(!b.ack(1, &q("jobs"), None, 0, &mut out), "malformed id");
    assert!(
        !b.ack(1, &q("jobs"), Some(MessageId::from_u128(1)), 0, &mut out),
        "unknown id"
    );
    assert!(b.ack(1, &q("jobs"), Some(id), 0, &mut out));
    assert!(
        !b.ack(1, &q("jobs"), Some(id), 0, &mut out),
        "already acked"
    );
    assert_eq!(b.message_count(), 0);
    assert_eq!(b.totals().acknowledged, 1);
}

/// Once the server stops, what comes back (a holder leaving, a lease running out, a delay
/// coming due) waits for the next start: the other connections are about to be closed too,
/// and a dispatch to them would only count one more delivery for nothing.
#[test]
fn nothing_is_dispatched_once_the_stop_began() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    send(&mut b, "jobs", "held", &mut out);
    b.send(
        q("jobs"),
        Arc::from(&b"later"[..]),
        None,
        Some(100),
        0,
        &mut out,
    );
    b.connect(1);
    b.connect(2);
    b.consume(1, q("jobs"), 1, Some(50), 0, &mut out);
    b.consume(2, q("jobs"), 1, None, 0, &mut out);
    assert_eq!(bodies(&out), ["held"]);
    out.clear();
    b.stop_dispatching();
    b.fire_timers(200, &mut out);
    assert!(
        out.is_empty(),
        "lease and delay ran out: {:?}",
        bodies(&out)
    );
    b.disconnect(1, EndedBy::Server, 200, &mut out);
    send(&mut b, "jobs", "new", &mut out);
    assert!(out.is_empty(), "{:?}", bodies(&out));
    assert_eq!(b.counts("jobs").ready, 3, "all waiting for the next start");
    assert_eq!(b.counts("jobs").in_flight, 0);
}

#[test]
fn disconnect_returns_holds_in_original_order_ahead_of_newer() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..6 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    b.connect(1);
    b.consume(1, q("jobs"), 3, None, 0, &mut out);
    assert_eq!(bodies(&out), ["0", "1", "2"]);
    let one = out[1].id;
    out.clear();
    b.ack(1, &q("jobs"), Some(one), 0, &mut out); // now holds 0, 2, 3
    assert_eq!(bodies(&out), ["3"]);
    out.clear();
    send(&mut b, "jobs", "6", &mut out);
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert!(out.is_empty());
    b.connect(2);
    b.consume(2, q("jobs"), 100, None, 0, &mut out);
    assert_eq!(bodies(&out), ["0", "2", "3", "4", "5", "6"]);
}

#[test]
fn disconnect_redelivers_to_remaining_consumers_at_once() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.connect(2);
    b.consume(1, q("jobs"), 2, None, 0, &mut out);
    b.consume(2, q("jobs"), 2, None, 0, &mut out);
    for i in 0..4 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    out.clear();
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert!(out.is_empty(), "consumer 2 is full");
    let stats = b.queue_stats("jobs").unwrap();
    assert_eq!(
        stats,
        QueueStats {
            ready: 2,
            delayed: 0,
            in_flight: 2,
            consumers: 1
        }
    );
}

#[test]
fn requeue_goes_to_the_tail_with_a_new_ttl() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    send(&mut b, "jobs", "a", &mut out);
    send(&mut b, "jobs", "b", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    let a = out[0].id;
    out.clear();
    assert!(b.requeue(1, &q("jobs"), Some(a), 60, None, 1_000, &mut out));
    assert_eq!(bodies(&out), ["b"]);
    let b_id = out[0].id;
    out.clear();
    b.ack(1, &q("jobs"), Some(b_id), 1_000, &mut out);
    assert_eq!(out[0].id, a, "same id after a requeue");
    assert_eq!(
        out[0].ttl_remaining,
        Some(60),
        "a delivery carries the new TTL; whether a v1.0 client sees it is the wire's choice"
    );
    let ops = store.ops.lock().unwrap();
    assert!(ops.contains(&StoreOp::Requeue {
        id: a,
        old_seq: 1,
        seq: 3,
        expires_at: Some(61_000),
        due_at: None,
        deliveries: 1,
        queue: None,
    }));
}

#[test]
fn dead_letter_removes_regardless_of_ttl() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.handle(
        1,
        Request::Consume {
            queue: q("jobs"),
            count: 1,
            lease: None,
        },
        0,
        &mut out,
    );
    let id = b.send(
        q("jobs"),
        Arc::from(&b"x"[..]),
        Some(3600),
        None,
        0,
        &mut out,
    );
    assert_eq!(
        out[0].ttl_remaining,
        Some(3600),
        "the remaining TTL whatever the dialect (the hub shows it to v1.1 only)"
    );
    out.clear();
    b.handle(
        1,
        Request::DeadLetter {
            queue: q("jobs"),
            id: Some(id),
        },
        0,
        &mut out,
    );
    assert_eq!(b.message_count(), 0);
    assert_eq!(b.totals().dead_lettered, 1);
    assert_eq!(
        store.ops.lock().unwrap().last(),
        Some(&StoreOp::Delete { id, seq: 1 })
    );
}

#[test]
fn ttl_packet_only_for_v11_connections_rounded_up() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.handle(
        1,
        Request::Send {
            queue: q("v11"),
            content: Arc::from(&b"x"[..]),
            ttl: Some(10),
            delay: None,
        },
        0,
        &mut out,
    );
    b.consume(1, q("v11"), 5, None, 0, &mut out);
    b.send(q("v11"), Arc::from(&b"y"[..]), None, None, 0, &mut out);
    assert_eq!(out[0].ttl_remaining, Some(10));
    assert_eq!(out[1].ttl_remaining, None, "no TTL, no packet");
    out.clear();
    b.send(
        q("v11"),
        Arc::from(&b"z"[..]),
        Some(10),
        None,
        0,
        &mut Vec::new(),
    );
    let mut late = Vec::new();
    b.send(
        q("v11"),
        Arc::from(&b"w"[..]),
        Some(2),
        None,
        100,
        &mut late,
    );
    assert_eq!(late[0].ttl_remaining, Some(2));
    let (mut b, _) = broker();
    b.connect(1);
    b.handle(
        1,
        Request::Send {
            queue: q("t"),
            content: Arc::from(&b""[..]),
            ttl: Some(2),
            delay: None,
        },
        0,
        &mut out,
    );
    out.clear();
    b.consume(1, q("t"), 1, None, 1_001, &mut out);
    assert_eq!(
        out[0].ttl_remaining,
        Some(1),
        "999 ms left rounds up to 1 s"
    );
}

#[test]
fn expired_messages_are_never_dispatched() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.send(
        q("jobs"),
        Arc::from(&b"short"[..]),
        Some(1),
        None,
        0,
        &mut out,
    );
    b.send(
        q("jobs"),
        Arc::from(&b"forever"[..]),
        Some(0),
        None,
        0,
        &mut out,
    );
    b.send(
        q("jobs"),
        Arc::from(&b"long"[..]),
        Some(100),
        None,
        0,
        &mut out,
    );
    b.connect(1);
    b.consume(1, q("jobs"), 10, None, 1_000, &mut out);
    assert_eq!(bodies(&out), ["forever", "long"]);
    assert_eq!(b.totals().expired, 1);
}

#[test]
fn sweep_expires_waiting_messages_and_drops_empty_queues() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    let short = b.send(
        q("jobs"),
        Arc::from(&b"short"[..]),
        Some(1),
        None,
        0,
        &mut out,
    );
    assert_eq!(b.expire(999), 0);
    assert_eq!(b.expire(1_000), 1);
    assert_eq!(b.message_count(), 0);
    assert_eq!(b.queue_stats("jobs"), None);
    assert_eq!(
        store.ops.lock().unwrap().last(),
        Some(&StoreOp::Delete { id: short, seq: 1 })
    );
}

#[test]
fn sweep_leaves_held_messages_to_their_holder() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    b.send(q("jobs"), Arc::from(&b"x"[..]), Some(1), None, 0, &mut out);
    assert_eq!(b.expire(5_000), 0);
    assert_eq!(b.message_count(), 1);
    // Back from the holder after its expiry: dropped, not dispatched.
    b.disconnect(1, EndedBy::Client, 5_000, &mut out);
    b.connect(2);
    out.clear();
    b.consume(2, q("jobs"), 1, None, 5_000, &mut out);
    assert!(out.is_empty());
    assert_eq!(b.message_count(), 0);
}

#[test]
fn many_expired_entries_are_compacted() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..200 {
        let ttl = if i % 10 == 0 { None } else { Some(1) };
        b.send(
            q("jobs"),
            Arc::from(i.to_string().as_bytes()),
            ttl,
            None,
            0,
            &mut out,
        );
    }
    assert_eq!(b.expire(1_000), 180);
    assert!(b.queues["jobs"].ready.entries().len() < 64);
    b.connect(1);
    b.consume(1, q("jobs"), 100, None, 1_000, &mut out);
    let expected: Vec<String> = (0..200).step_by(10).map(|i: i32| i.to_string()).collect();
    assert_eq!(bodies(&out), expected);
}

#[test]
fn store_sees_every_change() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    let id = send(&mut b, "jobs", "x", &mut out);
    b.ack(1, &q("jobs"), Some(id), 0, &mut out);
    let ops = store.ops.lock().unwrap();
    assert_eq!(ops.len(), 3);
    assert!(
        matches!(&ops[0], StoreOp::Insert(m) if m.id == id && m.seq == 1 && &*m.content == b"x")
    );
    assert_eq!(
        ops[1],
        StoreOp::Counted {
            id,
            seq: 1,
            deliveries: 1
        },
        "the dispatch"
    );
    assert_eq!(ops[2], StoreOp::Delete { id, seq: 1 });
}

#[test]
fn queues_exist_while_in_use() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    assert!(
        b.queue_stats("jobs").is_some(),
        "created by a consume request"
    );
    let id = send(&mut b, "jobs", "x", &mut out);
    b.consume(1, q("jobs"), 0, None, 0, &mut out);
    assert!(b.queue_stats("jobs").is_some(), "still a message in flight");
    b.ack(1, &q("jobs"), Some(id), 0, &mut out);
    assert_eq!(b.queue_stats("jobs"), None);
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(b.message_count(), 0);
}

#[test]
fn restored_messages_are_ready_in_order_and_new_ones_follow() {
    let (mut b, store) = broker();
    for (seq, body) in [(10, "a"), (11, "b")] {
        b.restore(StoredRow {
            id: MessageId::from_u128(seq.into()),
            queue: &q("jobs"),
            content: body.as_bytes(),
            accepted_at: 0,
            expires_at: None,
            seq,
            due_at: None,
            deliveries: 0,
        });
    }
    assert!(
        store.ops.lock().unwrap().is_empty(),
        "restoring reports nothing"
    );
    assert_eq!(
        stored(&b),
        (2, 2),
        "restored messages count against the limits"
    );
    let mut out = Vec::new();
    send(&mut b, "jobs", "c", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 10, None, 0, &mut out);
    assert_eq!(bodies(&out), ["a", "b", "c"]);
    assert_eq!(out[0].id, MessageId::from_u128(10));
    assert!(matches!(&store.ops.lock().unwrap()[0], StoreOp::Insert(m) if m.seq == 12));
}

#[test]
fn status_counts_bytes_and_the_age_of_the_oldest_ready_message() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.send(
        q("a"),
        Arc::from(&b"12345"[..]),
        None,
        None,
        1_000,
        &mut out,
    );
    b.send(q("a"), Arc::from(&b"123"[..]), None, None, 2_000, &mut out);
    b.send(q("b"), Arc::from(&b"1"[..]), None, None, 3_000, &mut out);
    b.connect(1);
    b.consume(1, q("a"), 1, None, 4_000, &mut out);
    let statuses = b.queue_statuses(5_000);
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0].name.as_str(), "a");
    assert_eq!(
        (
            statuses[0].ready,
            statuses[0].in_flight,
            statuses[0].consumers
        ),
        (1, 1, 1)
    );
    assert_eq!(statuses[0].bytes, 8);
    assert_eq!(
        statuses[0].oldest_ready_ms,
        Some(3_000),
        "the oldest *ready* one"
    );
    assert_eq!(statuses[1].bytes, 1);
    let id = out[0].id;
    b.ack(1, &q("a"), Some(id), 5_000, &mut out);
    assert_eq!(b.queue_statuses(5_000)[0].bytes, 3);
}

#[test]
fn listing_shows_ready_in_order_then_in_flight() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..5 {
        send(&mut b, "jobs", &"x".repeat(i + 1), &mut out);
    }
    b.connect(1);
    b.consume(1, q("jobs"), 2, None, 0, &mut out);
    let listing = b.list_messages("jobs", 10, 0).unwrap();
    assert_eq!(listing.total, 5);
    let sizes: Vec<(Option<usize>, usize, MessageState)> = listing
        .rows
        .iter()
        .map(|r| (r.position, r.size, r.state))
        .collect();
    assert_eq!(
        sizes,
        [
            (Some(1), 3, MessageState::Ready),
            (Some(2), 4, MessageState::Ready),
            (Some(3), 5, MessageState::Ready),
            (None, 1, MessageState::InFlight),
            (None, 2, MessageState::InFlight),
        ]
    );
    assert_eq!(b.list_messages("jobs", 2, 0).unwrap().rows.len(), 2);
    assert_eq!(b.list_messages("nope", 2, 0), None);
}

#[test]
fn flush_drops_ready_and_in_flight_and_later_acks_are_ignored() {
    let (mut b, store) = broker();
    let mut out = Vec::new();
    for i in 0..4 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    send(&mut b, "other", "keep", &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 2, None, 0, &mut out);
    let held = out[0].id;
    out.clear();
    assert_eq!(b.flush("jobs", 0, &mut out), Some(4));
    assert_eq!(b.totals().flushed, 4);
    assert!(
        !b.ack(1, &q("jobs"), Some(held), 0, &mut out),
        "ack after a flush is ignored"
    );
    // The consumer has room again and gets what comes next.
    send(&mut b, "jobs", "new", &mut out);
    assert_eq!(bodies(&out), ["new"]);
    out.clear();
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    b.connect(2);
    b.consume(2, q("jobs"), 10, None, 0, &mut out);
    assert_eq!(bodies(&out), ["new"], "flushed messages never come back");
    let deletes = store
        .ops
        .lock()
        .unwrap()
        .iter()
        .filter(|op| matches!(op, StoreOp::Delete { .. }))
        .count();
    assert_eq!(deletes, 4);
    assert_eq!(b.flush("nope", 0, &mut out), None);
    assert_eq!(b.flush_all(0, &mut out), 2);
    assert_eq!(b.message_count(), 0);
}

impl Broker {
    /// Every message's delivery count, wherever it is.
    fn delivery_counts(&self) -> Vec<(MessageId, u32)> {
        let ready = self
            .queues
            .values()
            .flat_map(|q| q.ready.iter().map(|e| (e.id, e.deliveries)));
        let delayed = self
            .queues
            .values()
            .flat_map(|q| q.delayed.iter().map(|(_, d)| (d.id, d.deliveries)));
        let held = self.table.held.iter().map(|(id, h)| (*id, h.deliveries));
        ready.chain(delayed).chain(held).collect()
    }

    /// Checks every invariant of the module docs, and that the broker holds exactly the
    /// messages the store was told about.
    fn check_invariants(&self, store: &Recorder, replay_store: bool) {
        // The holder index has exactly the held messages, each under its holder.
        let indexed: usize = self.table.held_by.values().map(|ids| ids.len()).sum();
        assert_eq!(indexed, self.table.held.len(), "held_by: every hold once");
        for (holder, ids) in &self.table.held_by {
            assert!(
                self.connections.contains_key(holder),
                "held_by: a set goes with its connection"
            );
            assert!(ids.iter().all(|id| self
                .table
                .held
                .get(id)
                .is_some_and(|h| h.holder == *holder)));
        }
        let mut live_ids = std::collections::HashSet::new();
        let mut all_resident = Amount::default();
        let mut keys: Vec<&QueueName> = self.queues.keys().collect();
        keys.sort();
        assert!(
            keys.iter().copied().eq(self.names.iter()),
            "names: the queues'"
        );
        for (name, q) in &self.queues {
            // Every count is recomputed from the entries and compared.
            let entries = q.ready.entries();
            let live: Vec<&Ready> = entries.iter().filter(|e| !e.is_dead()).collect();
            assert_eq!(q.ready.len(), live.len(), "{name}: ready count");
            assert_eq!(
                q.ready.bytes(),
                live.iter().map(|e| e.size as u64).sum::<u64>(),
                "{name}: ready bytes"
            );
            let resident = live.iter().take_while(|e| e.content.is_some()).count();
            assert!(
                live[resident..].iter().all(|e| e.content.is_none()),
                "{name}: resident entries come first"
            );
            assert_eq!(q.ready.resident().messages, resident, "{name}: resident");
            assert_eq!(
                q.ready.unloaded(),
                live.len() - resident,
                "{name}: unloaded"
            );
            assert_eq!(
                q.ready.resident().bytes,
                live[..resident].iter().map(|e| e.size as u64).sum::<u64>(),
                "{name}: resident bytes"
            );
            all_resident.messages += q.ready.resident().messages;
            all_resident.bytes += q.ready.resident().bytes;
            let loaded_through = q.ready.loaded_through();
            assert!(live[..resident].iter().all(|e| e
                .content
                .as_ref()
                .is_some_and(|c| c.len() == e.size)
                && e.seq <= loaded_through));
            if q.fetching.is_none() {
                assert!(
                    live[resident..].iter().all(|e| e.seq > loaded_through),
                    "{name}: nothing asked for without a fetch under way"
                );
            }
            assert!(self.table.window.is_some() || q.ready.unloaded() == 0);
            assert!(entries.iter().all(|e| !e.is_dead() || e.content.is_none()));
            assert!(
                entries
                    .iter()
                    .zip(entries.iter().skip(1))
                    .all(|(a, b)| a.seq < b.seq),
                "{name}: FIFO order"
            );
            let held: Vec<&Held> = self
                .table
                .held
                .values()
                .filter(|h| h.queue == *name)
                .collect();
            assert_eq!(q.in_flight.messages, held.len(), "{name}: in_flight");
            let held_bytes: u64 = held.iter().map(|h| h.content.len() as u64).sum();
            assert_eq!(q.in_flight.bytes, held_bytes, "{name}: in-flight bytes");
            let delayed: Vec<(u64, &Delayed)> = q.delayed.iter().collect();
            assert_eq!(q.delayed.len(), delayed.len(), "{name}: delayed count");
            let delayed_bytes: u64 = delayed.iter().map(|(_, d)| d.size as u64).sum();
            assert_eq!(q.delayed.bytes(), delayed_bytes, "{name}: delayed bytes");
            for (seq, d) in &delayed {
                assert_eq!(
                    self.table.due.get(&(d.due_at, *seq)),
                    Some(name),
                    "{name}: {seq} in the due index"
                );
                assert!(
                    d.content.as_ref().is_none_or(|c| c.len() == d.size),
                    "{name}: delayed size"
                );
                assert_eq!(d.content.is_none(), self.table.window.is_some());
                live_ids.insert(d.id);
            }
            let bytes =
                live.iter().map(|e| e.size as u64).sum::<u64>() + held_bytes + delayed_bytes;
            assert_eq!(q.bytes(), bytes, "{name}: bytes");
            for (conn, sub) in &q.subscribers {
                let holds = held.iter().filter(|h| h.holder == *conn).count() as u64;
                assert_eq!(sub.held, holds, "{name}: holds of {conn}");
                assert!(
                    sub.limit > 0 || sub.held > 0,
                    "{name}: idle subscription of {conn}"
                );
                assert!(self.connections[conn].queues.contains(name));
                assert_eq!(q.consumers.contains(*conn), sub.limit > 0);
            }
            assert!(!q.is_unused(), "{name}: unused queue kept");
            assert!(
                !name.as_str().ends_with(".dead.dead"),
                "a dead letter moved again"
            );
            if let (Some(max), false) = (self.max_deliveries, name.as_str().ends_with(".dead")) {
                let waiting = q.ready.iter().map(|e| e.deliveries);
                let delayed = q.delayed.iter().map(|(_, d)| d.deliveries);
                assert!(
                    waiting.chain(delayed).all(|n| n < max),
                    "{name}: a message at its last dispatch is back"
                );
            }
            live_ids.extend(live.iter().map(|e| e.id));
        }
        assert_eq!(self.table.resident, all_resident, "total resident");
        let all_stored = self
            .queues
            .values()
            .fold(Amount::default(), |sum, q| Amount {
                messages: sum.messages + q.ready.len() + q.delayed.len() + q.in_flight.messages,
                bytes: sum.bytes + q.bytes(),
            });
        assert_eq!(
            self.table.stored, all_stored,
            "total stored, for the limits"
        );
        let delayed: usize = self.queues.values().map(|q| q.delayed.len()).sum();
        assert_eq!(self.table.due.len(), delayed, "the due index is exact");
        let leased: std::collections::BTreeSet<(Millis, MessageId)> = self
            .table
            .held
            .iter()
            .filter(|(_, h)| h.lease_until != NEVER)
            .map(|(id, h)| (h.lease_until, *id))
            .collect();
        assert_eq!(self.table.leases, leased, "the lease index is exact");
        assert!(self
            .table
            .held
            .values()
            .all(|h| (h.lease == 0) == (h.lease_until == NEVER)));
        for (id, h) in &self.table.held {
            assert!(self.queues.contains_key(&h.queue));
            assert!(live_ids.insert(*id), "{id} both ready and held");
        }
        if !replay_store {
            return;
        }
        let mut stored = std::collections::HashMap::new();
        let mut counts = std::collections::HashMap::new();
        for op in store.ops.lock().unwrap().iter() {
            match op {
                StoreOp::Insert(m) => {
                    stored.insert(m.id, m.seq);
                    counts.insert(m.id, m.deliveries);
                }
                StoreOp::Delete { id, seq } => {
                    assert_eq!(
                        stored.remove(id),
                        Some(*seq),
                        "delete of {id} at its current seq"
                    );
                }
                StoreOp::Requeue {
                    id,
                    old_seq,
                    seq,
                    deliveries,
                    ..
                } => {
                    assert_eq!(stored.insert(*id, *seq), Some(*old_seq), "requeue of {id}");
                    counts.insert(*id, *deliveries);
                }
                StoreOp::Counted {
                    id,
                    seq,
                    deliveries,
                } => {
                    assert_eq!(stored.get(id), Some(seq), "count of {id} at its seq");
                    counts.insert(*id, *deliveries);
                }
            }
        }
        // The store knows every count, that of a dispatch under way included (rule 6).
        for (id, count) in self.delivery_counts() {
            assert_eq!(counts.get(&id), Some(&count), "count of {id}");
        }
        let stored: std::collections::HashSet<MessageId> = stored.into_keys().collect();
        assert_eq!(
            stored, live_ids,
            "the store holds exactly the broker's messages"
        );
    }
}

#[test]
fn random_operations_keep_every_invariant() {
    let (b, store) = broker();
    random_operations(b, &store);
}

#[test]
fn random_operations_keep_every_invariant_with_a_small_window() {
    let (b, store) = windowed_broker(3, 30);
    random_operations(b, &store);
}

#[test]
fn random_operations_keep_every_invariant_with_a_shared_budget() {
    let (b, store) = budgeted_broker(
        Amount {
            messages: 3,
            bytes: 40,
        },
        Amount {
            messages: 4,
            bytes: 50,
        },
        Amount {
            messages: 1,
            bytes: 10,
        },
    );
    random_operations(b, &store);
}

fn random_operations(mut b: Broker, store: &Recorder) {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let queues = ["a", "b"];
    let mut out = Vec::new();
    let mut delivered: Vec<Delivery> = Vec::new();
    let mut now = 0;
    let mut fetches = 0;
    let mut lost = 0;
    let mut delays_seen = false;
    let mut leases_seen = false;
    let mut redriven = 0;
    b.set_max_deliveries(Some(3));
    for conn in 1..=3 {
        b.connect(conn);
    }
    for step in 0..6000 {
        now += next(40);
        let queue = q(queues[next(2) as usize]);
        let conn = 1 + next(3);
        match next(100) {
            0..=34 => {
                let ttl = [None, Some(0), Some(1), Some(3)][next(4) as usize];
                let delay = [None, None, Some(0), Some(50), Some(2_000)][next(5) as usize];
                let body = "x".repeat(next(20) as usize);
                b.send(queue, Arc::from(body.as_bytes()), ttl, delay, now, &mut out);
            }
            35..=42 => {
                let lease = [None, Some(0), Some(60), Some(500)][next(4) as usize];
                // Now and then from a dead-letter queue, whose messages are never moved.
                let queue = if next(6) == 0 { q("a.dead") } else { queue };
                b.consume(conn, queue, next(4), lease, now, &mut out);
            }
            43..=44 if !delivered.is_empty() => {
                let d = &delivered[next(delivered.len() as u64) as usize];
                let holds = b.table.held.get(&d.id).is_some_and(|h| h.holder == d.conn);
                assert_eq!(b.touch(d.conn, &d.queue, Some(d.id), now), holds);
            }
            45..=84 if !delivered.is_empty() => {
                let d = delivered.swap_remove(next(delivered.len() as u64) as usize);
                let q = d.queue.clone();
                match next(10) {
                    0 => {
                        let delay = [None, Some(30), Some(1_500)][next(3) as usize];
                        b.requeue(d.conn, &q, Some(d.id), next(3), delay, now, &mut out)
                    }
                    1 => b.dead_letter(d.conn, &q, Some(d.id), now, &mut out),
                    // Sometimes from the wrong connection: must be ignored.
                    2 => b.ack(1 + next(3), &q, Some(d.id), now, &mut out),
                    _ => b.ack(d.conn, &q, Some(d.id), now, &mut out),
                };
            }
            85..=89 => {
                b.disconnect(conn, EndedBy::Client, now, &mut out);
                b.connect(conn);
                delivered.retain(|d| d.conn != conn);
            }
            90..=92 => {
                b.expire(now);
            }
            93..=94 => {
                b.fire_timers(now, &mut out);
            }
            95 => {
                b.flush(queue.as_str(), now, &mut out);
                delivered.retain(|d| d.queue != queue);
            }
            96 => b.set_paused(conn, next(2) == 0, now, &mut out),
            97 => {
                let limit = [1, 3, usize::MAX][next(3) as usize];
                redriven += b.redrive_some(&queue, limit, now, &mut out);
            }
            _ => {
                // Now and then the store lost a message it is asked for.
                if next(8) == 0 {
                    lost += usize::from(store.lose_one(&b));
                }
                // Fetches are answered late, after any number of other changes.
                fetches += store.serve(&mut b, now, &mut out);
            }
        }
        delivered.append(&mut out);
        delays_seen |= !b.table.due.is_empty();
        leases_seen |= !b.table.leases.is_empty();
        b.check_invariants(store, step % 100 == 0);
        let t = b.totals();
        assert_eq!(
            t.accepted as usize,
            b.message_count()
                + (t.acknowledged + t.dead_lettered + t.expired + t.flushed + t.lost) as usize,
            "step {step}: every message that left is counted under one reason"
        );
    }
    // Nothing waits for good: a consumer with room gets every ready message, fetched or not.
    b.connect(9);
    for name in queues {
        b.consume(9, q(name), u64::MAX, None, now, &mut out);
    }
    now += 10_000;
    while b.fire_timers(now, &mut out) > 0 {}
    assert!(b.table.due.is_empty(), "every delay has passed");
    while store.serve(&mut b, now, &mut out) > 0 {}
    for name in queues {
        let ready = b.queue_stats(name).map_or(0, |s| s.ready);
        assert_eq!(ready, 0, "{name}: ready messages left behind");
    }
    b.check_invariants(store, true);
    out.clear();
    b.flush_all(now, &mut out);
    b.disconnect(9, EndedBy::Client, now, &mut out);
    assert!(out.is_empty());
    for conn in 1..=3 {
        b.disconnect(conn, EndedBy::Client, now, &mut out);
    }
    assert_eq!(b.message_count(), 0);
    b.check_invariants(store, true);
    let t = b.totals();
    assert!(t.delivered > 500 && t.requeued > 0, "{t:?}");
    assert!(delays_seen, "no delayed message was ever seen");
    assert!(leases_seen, "no lease was ever seen");
    assert!(
        t.moved_to_dead > 0 && redriven > 0,
        "{t:?}, {redriven} redriven"
    );
    assert_eq!(t.redriven as usize, redriven);
    assert!(
        t.acknowledged > 0 && t.dead_lettered > 0 && t.expired > 0 && t.flushed > 0,
        "every retire reason is exercised: {t:?}"
    );
    assert_eq!(t.lost as usize, lost, "each lost message is dropped once");
    assert!(!store.can_fetch || fetches > 100, "{fetches} fetches");
    assert!(!store.can_fetch || lost > 0, "no message lost by the store");
}

/// Sends `n` numbered messages to `queue`.
fn send_numbered(b: &mut Broker, queue: &str, n: usize, out: &mut Vec<Delivery>) {
    for i in 0..n {
        send(b, queue, &i.to_string(), out);
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[test]
fn a_backlog_beyond_the_window_is_read_back_in_order() {
    let (mut b, store) = windowed_broker(4, 1 << 20);
    let mut out = Vec::new();
    send_numbered(&mut b, "jobs", 10, &mut out);
    b.check_invariants(&store, true);
    let jobs = &b.queues["jobs"];
    assert_eq!(
        (jobs.ready.resident().messages, jobs.ready.unloaded()),
        (4, 6),
        "only the window stays"
    );
    assert_eq!(b.queue_stats("jobs").unwrap().ready, 10);
    assert_eq!(
        b.queue_statuses(0)[0].bytes,
        10,
        "sizes are known without content"
    );
    assert_eq!(
        store.pending_fetches(),
        0,
        "nothing asked for while the window is full"
    );

    b.connect(1);
    b.consume(1, q("jobs"), 100, None, 0, &mut out);
    assert_eq!(bodies(&out), numbered(0..4), "the resident ones go at once");
    assert_eq!(store.pending_fetches(), 1, "the next ones are asked for");
    assert_eq!(store.fetches.lock().unwrap()[0].seqs, [5, 6, 7, 8]);
    out.clear();
    send(&mut b, "jobs", "10", &mut out);
    assert!(
        out.is_empty(),
        "a newer message never overtakes the unloaded ones"
    );
    while store.serve(&mut b, 0, &mut out) > 0 {
        b.check_invariants(&store, true);
    }
    assert_eq!(bodies(&out), numbered(4..11), "the rest, in FIFO order");
    b.check_invariants(&store, true);
}

#[test]
fn queues_share_a_total_beyond_their_floors() {
    let (mut b, store) = budgeted_broker(messages(4), messages(6), messages(2));
    let mut out = Vec::new();
    for queue in ["a", "b", "c"] {
        send_numbered(&mut b, queue, 10, &mut out);
    }
    let resident = |b: &Broker, q: &str| b.queues[q].ready.resident().messages;
    // a takes its window (4 of the total 6), b only what is left (2), c its floor (2).
    assert_eq!(
        (resident(&b, "a"), resident(&b, "b"), resident(&b, "c")),
        (4, 2, 2)
    );
    assert_eq!(b.table.resident.messages, 8, "the total plus c's floor");
    b.check_invariants(&store, true);
    // b's consumer gets all of b, in order, a little at a time.
    b.connect(1);
    b.consume(1, q("b"), 100, None, 0, &mut out);
    while store.serve(&mut b, 0, &mut out) > 0 {
        b.check_invariants(&store, true);
        assert!(
            resident(&b, "b") <= 2,
            "no room beyond the floor while a holds 4"
        );
    }
    assert_eq!(bodies(&out), numbered(0..10));
    // Once a is consumed, its room goes to c.
    out.clear();
    b.connect(2);
    b.consume(2, q("a"), 100, None, 0, &mut out);
    while store.serve(&mut b, 0, &mut out) > 0 {}
    assert_eq!(bodies(&out), numbered(0..10));
    b.connect(3);
    b.consume(3, q("c"), 1, None, 0, &mut out);
    store.serve(&mut b, 0, &mut out);
    assert_eq!(resident(&b, "c"), 4, "the whole per-queue window now");
    b.check_invariants(&store, true);
}

#[test]
fn the_window_counts_bytes_too() {
    let (mut b, _) = windowed_broker(100, 9);
    let mut out = Vec::new();
    for body in ["1234", "5678", "9", "0"] {
        send(&mut b, "jobs", body, &mut out);
    }
    let jobs = &b.queues["jobs"];
    assert_eq!(
        (jobs.ready.resident().messages, jobs.ready.unloaded()),
        (3, 1),
        "9 of 9 bytes resident"
    );
    let (mut b, _) = windowed_broker(100, 10);
    send(&mut b, "big", &"x".repeat(50), &mut out);
    send(&mut b, "big", "y", &mut out);
    let big = &b.queues["big"];
    assert_eq!(
        (big.ready.resident().messages, big.ready.unloaded()),
        (1, 1),
        "one oversized message still fits"
    );
}

#[test]
fn restored_content_beyond_the_window_stays_in_the_store() {
    let (mut b, store) = windowed_broker(2, 1 << 20);
    let jobs = q("jobs");
    for seq in 1..=5u64 {
        let body = seq.to_string();
        // The store holds what recovery reads.
        store
            .ops
            .lock()
            .unwrap()
            .push(StoreOp::Insert(StoredMessage {
                id: MessageId::from_u128(seq.into()),
                queue: jobs.clone(),
                content: Arc::from(body.as_bytes()),
                accepted_at: 0,
                expires_at: None,
                seq,
                due_at: None,
                deliveries: 0,
            }));
        b.restore(StoredRow {
            id: MessageId::from_u128(seq.into()),
            queue: &jobs,
            content: body.as_bytes(),
            accepted_at: 0,
            expires_at: None,
            seq,
            due_at: None,
            deliveries: 0,
        });
    }
    let queue = &b.queues["jobs"];
    assert_eq!(
        (queue.ready.resident().messages, queue.ready.unloaded()),
        (2, 3)
    );
    let mut out = Vec::new();
    b.connect(1);
    b.consume(1, jobs, 10, None, 0, &mut out);
    while store.serve(&mut b, 0, &mut out) > 0 {}
    assert_eq!(bodies(&out), ["1", "2", "3", "4", "5"]);
    b.check_invariants(&store, true);
}

#[test]
fn an_answer_to_a_fetch_overtaken_by_a_flush_is_ignored() {
    let (mut b, store) = windowed_broker(2, 1 << 20);
    let mut out = Vec::new();
    send_numbered(&mut b, "jobs", 6, &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    assert_eq!(store.pending_fetches(), 1);
    b.flush("jobs", 0, &mut out);
    out.clear();
    assert_eq!(store.serve(&mut b, 0, &mut out), 1);
    assert!(out.is_empty(), "nothing comes back to life");
    b.check_invariants(&store, true);
    send(&mut b, "jobs", "after", &mut out);
    assert_eq!(bodies(&out), ["after"]);
}

#[test]
fn a_message_missing_from_the_store_is_dropped_not_waited_for() {
    let (mut b, store) = windowed_broker(1, 1 << 20);
    let mut out = Vec::new();
    send_numbered(&mut b, "jobs", 4, &mut out);
    b.connect(1);
    b.consume(1, q("jobs"), 10, None, 0, &mut out);
    // The store lost message 2 (seq 2): answer without it.
    let request = store.fetches.lock().unwrap().remove(0);
    assert_eq!(request.seqs, [2]);
    b.attach(
        Fetched {
            request,
            contents: Vec::new(),
        },
        0,
        &mut out,
    );
    while store.serve(&mut b, 0, &mut out) > 0 {}
    assert_eq!(bodies(&out), ["0", "2", "3"]);
    assert_eq!(b.queue_stats("jobs").unwrap().ready, 0);
}

#[test]
fn a_sweep_is_bounded_and_the_rest_never_dispatched() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..EXPIRE_BATCH + 5 {
        b.send(
            q("mass"),
            Arc::from(i.to_string().as_bytes()),
            Some(1),
            None,
            0,
            &mut out,
        );
    }
    b.send(
        q("mass"),
        Arc::from(&b"survivor"[..]),
        None,
        None,
        0,
        &mut out,
    );
    assert_eq!(
        b.expire(1_000),
        EXPIRE_BATCH,
        "one sweep drops at most a batch"
    );
    b.connect(1);
    b.consume(1, q("mass"), 10, None, 1_000, &mut out);
    assert_eq!(
        bodies(&out),
        ["survivor"],
        "the rest are dropped when reached, not dispatched"
    );
    assert_eq!(b.totals().expired as usize, EXPIRE_BATCH + 5);
    assert_eq!(b.expire(1_000), 0);
}

#[test]
fn a_paused_connection_gets_nothing_new_until_resumed() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.connect(2);
    b.consume(1, q("jobs"), 10, None, 0, &mut out);
    b.consume(2, q("jobs"), 10, None, 0, &mut out);
    b.set_paused(1, true, 0, &mut out);
    for i in 0..4 {
        send(&mut b, "jobs", &i.to_string(), &mut out);
    }
    assert!(out.iter().all(|d| d.conn == 2), "the paused one is skipped");
    b.consume(2, q("jobs"), 0, None, 0, &mut out);
    out.clear();
    send(&mut b, "jobs", "waiting", &mut out);
    assert!(out.is_empty(), "nobody with room that is not paused");
    b.set_paused(1, false, 0, &mut out);
    assert_eq!(bodies(&out), ["waiting"]);
    assert_eq!(out[0].conn, 1);
}

#[test]
fn huge_ttls_are_clamped_to_the_latest_expiry_and_read_back_the_same() {
    let now = 1_700_000_000_000;
    let expected = (MAX_EXPIRES_AT - now).div_ceil(1000);
    let (mut b, store) = broker();
    let mut out = Vec::new();
    b.connect(1);
    b.handle(
        1,
        Request::Send {
            queue: q("t"),
            content: Arc::from(&b"x"[..]),
            ttl: Some(u64::MAX),
            delay: None,
        },
        now,
        &mut out,
    );
    b.consume(1, q("t"), 5, None, now, &mut out);
    assert_eq!(out[0].ttl_remaining, Some(expected));
    assert!(matches!(
        &store.ops.lock().unwrap()[0],
        StoreOp::Insert(m) if m.expires_at == Some(MAX_EXPIRES_AT)
    ));

    // Recovery reads a too-late expiry (an older build stored u64 values beyond i64::MAX,
    // which come back as they were written) the same way; 0 is long past, not "never".
    let (mut b, _) = broker();
    for (seq, expires_at) in [(1, u64::MAX), (2, MAX_EXPIRES_AT + 1), (3, 0)] {
        b.restore(StoredRow {
            id: MessageId::from_u128(seq.into()),
            queue: &q("t"),
            content: b"r",
            accepted_at: 0,
            expires_at: Some(expires_at),
            seq,
            due_at: None,
            deliveries: 0,
        });
    }
    b.connect(1);
    b.handle(
        1,
        Request::DeadLetter {
            queue: q("t"),
            id: None,
        },
        now,
        &mut out,
    );
    out.clear();
    b.consume(1, q("t"), 5, None, now, &mut out);
    let ttls: Vec<_> = out.iter().map(|d| d.ttl_remaining).collect();
    assert_eq!(ttls, [Some(expected), Some(expected)], "the third expired");
}

#[test]
fn status_and_flush_walk_the_queues_in_chunks_in_name_order() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for name in ["c", "a", "e", "b", "d"] {
        send(&mut b, name, "m", &mut out);
    }
    let first = b.queue_statuses_after(None, 2, 0);
    let names: Vec<&str> = first.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    // A queue that goes and one that comes between chunks: the walk resumes after "b".
    b.flush("c", 0, &mut out);
    send(&mut b, "aa", "m", &mut out);
    let rest = b.queue_statuses_after(Some(&q("b")), 10, 0);
    let names: Vec<&str> = rest.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["d", "e"]);
    assert_eq!(b.queue_names_after(Some(&q("a")), 2), [q("aa"), q("b")]);

    assert_eq!(b.flush_after(None, 2, 0, &mut out), (2, 2, Some(q("aa"))));
    assert_eq!(
        b.flush_after(Some(&q("aa")), 2, 0, &mut out),
        (2, 2, Some(q("d")))
    );
    assert_eq!(
        b.flush_after(Some(&q("d")), 2, 0, &mut out),
        (1, 1, Some(q("e")))
    );
    assert_eq!(b.flush_after(Some(&q("e")), 2, 0, &mut out), (0, 0, None));
    assert!(b.queue_names().is_empty());
}

/// The per-message cost of a waiting message, as `Ready`'s docs, README's "Memory" paragraph
/// and man/phpmq-server.1 state it: change them together.
#[test]
#[cfg(target_pointer_width = "64")]
fn a_waiting_message_takes_80_bytes() {
    assert_eq!(std::mem::size_of::<Ready>(), 80);
}

/// The v1.2 states and operations: delays, counts and flush, leases, dead letters.
mod v12;

/// A dispatch that the server ends by closing its holder's connection (a stop, a send it
/// could not tell a v1 client it refused) is not a failed try: at the maximum the message goes
/// back to its queue with its count. One whose client left, or re-queued it, is.
#[test]
fn a_connection_the_server_closes_dead_letters_nothing() {
    let (mut b, store) = broker();
    b.set_max_deliveries(Some(1));
    let mut out = Vec::new();
    let consume = |b: &mut Broker, conn, out: &mut Vec<Delivery>| {
        b.connect(conn);
        let request = Request::Consume {
            queue: q("jobs"),
            count: 1,
            lease: None,
        };
        b.handle(conn, request, 0, out);
    };
    consume(&mut b, 1, &mut out);
    let id = b.send(q("jobs"), Arc::from(&b"x"[..]), None, None, 0, &mut out);
    assert_eq!(out.len(), 1, "dispatched once");
    b.disconnect(1, EndedBy::Server, 0, &mut out);
    assert_eq!(b.counts("jobs").ready, 1, "back in its queue");
    assert_eq!(b.counts("jobs.dead").ready, 0, "not dead-lettered");
    let returned = store
        .ops
        .lock()
        .unwrap()
        .iter()
        .any(|op| matches!(op, StoreOp::Counted { id: r, deliveries: 1, .. } if r == &id));
    assert!(returned, "the store keeps its count");
    // A worker's own re-queue at the maximum is a failed try.
    out.clear();
    consume(&mut b, 2, &mut out);
    assert_eq!(out.len(), 1, "dispatched again");
    b.requeue(2, &q("jobs"), Some(id), 0, None, 0, &mut out);
    assert_eq!(b.counts("jobs.dead").ready, 1, "dead-lettered");
    // So is a dispatch whose client left.
    let other = b.send(q("jobs"), Arc::from(&b"y"[..]), None, None, 0, &mut out);
    assert!(b.table.held.get(&other).is_some_and(|h| h.holder == 2));
    b.disconnect(2, EndedBy::Client, 0, &mut out);
    assert_eq!(b.counts("jobs.dead").ready, 2, "dead-lettered too");
}

/// Sends are refused at the queue limit (ready, delayed and in flight all count, other
/// queues do not), and by every queue once the store is closed for a stop.
#[test]
fn sends_are_refused_at_the_limit_and_after_the_store_closed() {
    let (mut b, _store) = broker();
    let mut out = Vec::new();
    assert_eq!(b.refuse_send("jobs", 1), None, "no limit by default");
    b.set_max_queue_length(Some(2));
    b.send(q("jobs"), Arc::from(&b"1"[..]), None, None, 0, &mut out);
    b.send(
        q("jobs"),
        Arc::from(&b"2"[..]),
        None,
        Some(60_000),
        0,
        &mut out,
    );
    assert_eq!(
        b.refuse_send("jobs", 1),
        Some(SendRefused::QueueFull { limit: 2 }),
        "one ready and one delayed"
    );
    assert_eq!(b.refuse_send("other", 1), None);
    b.set_max_queue_length(Some(0));
    assert_eq!(b.refuse_send("jobs", 1), None, "0 turns it off");
    b.close_store();
    assert_eq!(b.refuse_send("other", 1), Some(SendRefused::ShuttingDown));
    assert_eq!(b.totals().refused, 2, "each refusal counted once");
}

/// The server-wide limits count every message held, whatever its state, until it leaves for
/// good: moves (a re-queue, a dead letter's move) keep it counted, an ack or a flush frees it.
#[test]
fn sends_are_refused_at_the_store_limits_until_messages_leave() {
    let (mut b, _store) = broker();
    let mut out = Vec::new();
    b.set_max_deliveries(Some(1));
    b.set_store_limits(3, 10);
    b.connect(1);
    b.send(q("jobs"), Arc::from(&b"1234"[..]), None, None, 0, &mut out);
    b.send(
        q("jobs"),
        Arc::from(&b"56"[..]),
        None,
        Some(60_000),
        0,
        &mut out,
    );
    assert_eq!(stored(&b), (2, 6), "ready and delayed");
    assert_eq!(b.refuse_send("other", 4), None, "exactly at the byte limit");
    assert_eq!(
        b.refuse_send("other", 5),
        Some(SendRefused::TooManyBytes { limit: 10 })
    );
    b.send(q("other"), Arc::from(&b"7"[..]), None, None, 0, &mut out);
    assert_eq!(
        b.refuse_send("other", 0),
        Some(SendRefused::TooManyMessages { limit: 3 })
    );
    b.consume(1, q("jobs"), 1, None, 0, &mut out);
    let held = out.pop().expect("a dispatch").id;
    assert_eq!(stored(&b), (3, 7), "in flight still counts");
    // The holder leaves: its last allowed dispatch ended, so the message moves to jobs.dead.
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(b.counts("jobs.dead").ready, 1);
    assert_eq!(stored(&b), (3, 7), "a move keeps it counted");
    b.connect(2);
    b.consume(2, q("jobs.dead"), 1, None, 0, &mut out);
    assert_eq!(out.pop().map(|d| d.id), Some(held));
    b.ack(2, &q("jobs.dead"), Some(held), 0, &mut out);
    assert_eq!(stored(&b), (2, 3), "an ack frees it");
    assert_eq!(b.refuse_send("other", 7), None);
    b.flush("jobs", 0, &mut out);
    assert_eq!(stored(&b), (1, 1), "a flush frees the delayed one");
    b.set_store_limits(0, 0);
    assert_eq!(b.refuse_send("other", usize::MAX), None, "0 turns them off");
    assert_eq!(b.totals().refused, 2, "each refusal counted once");
}

/// A consumer holding a message in each of thousands of queues leaves: every message goes
/// back to its own queue, to the consumer still there (a disconnect walks the connection's
/// queues as a set: a list made it quadratic, and a client froze the broker with it).
#[test]
fn a_consumer_of_many_queues_gives_every_message_back() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    let names: Vec<String> = (0..3_000).map(|i| format!("q{i}")).collect();
    b.connect(1);
    for name in &names {
        send(&mut b, name, name, &mut out);
        b.consume(1, q(name), 1, None, 0, &mut out);
    }
    assert_eq!(out.len(), names.len(), "one held in each");
    b.connect(2);
    for name in &names {
        b.consume(2, q(name), 1, None, 0, &mut out);
    }
    out.clear();
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(out.len(), names.len());
    assert!(out
        .iter()
        .all(|d| d.conn == 2 && d.content.as_ref() == d.queue.as_str().as_bytes()));
}

/// Sends `count` messages of 1 MiB to `queue`.
fn send_mebibytes(b: &mut Broker, queue: &str, count: usize, out: &mut Vec<Delivery>) {
    let body = "x".repeat(1 << 20);
    for _ in 0..count {
        send(b, queue, &body, out);
    }
}

/// Connects consumer 1 with a pause flag the test can read, as the network layer's.
fn connect_watching_pause(b: &mut Broker) -> Arc<std::sync::atomic::AtomicBool> {
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    b.connect_with_pause_flag(1, paused.clone());
    paused
}

/// A consumer asking for millions gets one burst of dispatches per call, then is paused as a
/// backed-up connection is; resuming it hands it the next burst.
#[test]
fn a_huge_count_gets_a_burst_at_a_time() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    send_mebibytes(&mut b, "big", 40, &mut out);
    let paused = connect_watching_pause(&mut b);
    b.consume(1, q("big"), u64::MAX, None, 0, &mut out);
    let burst = super::DISPATCH_BURST_BYTES.div_ceil(1 << 20);
    assert_eq!(out.len(), burst, "one burst");
    assert!(paused.load(std::sync::atomic::Ordering::Acquire));
    out.clear();
    b.set_paused(1, false, 0, &mut out);
    assert_eq!(out.len(), burst, "the next burst");
    out.clear();
    b.set_paused(1, false, 0, &mut out);
    assert_eq!(out.len(), 40 - 2 * burst, "the rest");
}

/// The burst counts over all of a consumer's queues and calls, not per queue: ten queues of
/// 15 MiB each hand it one burst, then it is paused.
#[test]
fn a_burst_spans_every_queue_of_a_consumer() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for n in 0..10 {
        send_mebibytes(&mut b, &format!("q{n}"), 15, &mut out);
    }
    let paused = connect_watching_pause(&mut b);
    for n in 0..10 {
        b.consume(1, q(&format!("q{n}")), u64::MAX, None, 0, &mut out);
    }
    let bytes: usize = out.iter().map(|d| d.content.len()).sum();
    assert!(
        bytes <= super::DISPATCH_BURST_BYTES,
        "{} MiB in one go",
        bytes >> 20
    );
    assert!(paused.load(std::sync::atomic::Ordering::Acquire));
}

/// Each resume starts at the next of a consumer's queues: a queue whose backlog fills every
/// burst does not starve the others.
#[test]
fn resumes_take_a_consumers_queues_in_turn() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    send_mebibytes(&mut b, "b", 4, &mut out);
    send_mebibytes(&mut b, "a", 40, &mut out);
    connect_watching_pause(&mut b);
    b.consume(1, q("a"), u64::MAX, None, 0, &mut out);
    b.consume(1, q("b"), u64::MAX, None, 0, &mut out);
    assert!(out.iter().all(|d| d.queue.as_str() == "a"), "a went first");
    out.clear();
    b.set_paused(1, false, 0, &mut out);
    out.clear();
    b.set_paused(1, false, 0, &mut out);
    assert!(
        out.iter().any(|d| d.queue.as_str() == "b"),
        "b gets its turn while a still has a backlog"
    );
}

/// The queue map gives its room back once most queues are gone (a million queues flushed
/// kept hundreds of megabytes).
#[test]
fn the_queue_map_shrinks_as_queues_go() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    for i in 0..20_000 {
        send(&mut b, &format!("q{i}"), "x", &mut out);
    }
    let full = b.queues.capacity();
    assert!(full >= 20_000);
    let (_, flushed, _) = b.flush_after(None, usize::MAX, 0, &mut out);
    assert_eq!(flushed, 20_000);
    assert!(b.queues.is_empty());
    assert!(
        b.queues.capacity() <= 4 * MIN_QUEUE_CAPACITY,
        "{} of {full} kept",
        b.queues.capacity()
    );
}

/// A count past [`super::MAX_HELD_PER_CONSUMER`] holds that many at most; each ack makes room
/// for one more, and a disconnect hands back at most that many.
#[test]
fn a_consumer_holds_at_most_the_cap_whatever_its_count() {
    let (mut b, _) = broker();
    let mut out = Vec::new();
    let cap = super::MAX_HELD_PER_CONSUMER as usize;
    for _ in 0..cap + 10 {
        send(&mut b, "jobs", "x", &mut out);
    }
    b.connect(1);
    b.consume(1, q("jobs"), u64::MAX, None, 0, &mut out);
    assert_eq!(out.len(), cap);
    assert_eq!(b.queue_stats("jobs").map(|s| s.in_flight), Some(cap));
    let first = out[0].id;
    out.clear();
    assert!(b.ack(1, &q("jobs"), Some(first), 0, &mut out));
    assert_eq!(out.len(), 1, "one more for the ack");
    b.disconnect(1, EndedBy::Client, 0, &mut out);
    assert_eq!(b.queue_stats("jobs").map(|s| s.ready), Some(cap + 9));
}
