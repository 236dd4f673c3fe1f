//! The store writer against a real in-memory database.

use super::*;
use crate::id::MessageId;
use crate::persist::batch::test_ops::{delete, insert};
use crate::persist::lock::DbLock;
use crate::persist::schema;
use crate::request::QueueName;
use crate::store::StoredMessage;
use std::sync::Arc;
use std::sync::Mutex;

#[test]
fn chunked_inserts_and_ranged_deletes_touch_exactly_their_rows() {
    let shared = memory();
    let inserts: Vec<StoreOp> = (1..=150).map(insert).collect();
    apply(&shared, &inserts).unwrap();
    let doomed: Vec<u64> = [3, 4, 5, 10, 149, 7777]
        .into_iter()
        .chain(100..=120)
        .collect();
    // Out of order, as acks from several consumers arrive.
    let deletes: Vec<StoreOp> = doomed.iter().rev().map(|&s| delete(s)).collect();
    apply(&shared, &deletes).unwrap();
    let expected: Vec<i64> = (1..=150)
        .filter(|s| !doomed.contains(s))
        .map(|s| s as i64)
        .collect();
    assert_eq!(seqs(&shared), expected);
    assert_eq!(shared.rows.load(Ordering::Relaxed), expected.len() as i64);
}

#[test]
fn a_drained_store_gives_its_pages_back_before_it_is_empty() {
    let shared = memory();
    let big = |seq: u64| insert_of(seq, 1024);
    let pages = |shared: &Shared| -> i64 {
        let conn = shared.memory.lock().unwrap();
        conn.query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap()
    };
    apply(&shared, &(1..=40_000).map(big).collect::<Vec<_>>()).unwrap();
    let full = pages(&shared);
    assert!(full > 2000, "{full} pages");
    // Nine in ten acknowledged: the live tenth is what memory should come down to.
    apply(&shared, &(1..=36_000).map(delete).collect::<Vec<_>>()).unwrap();
    assert_eq!(pages(&shared), full, "acks alone give nothing back");
    for _ in 0..100 {
        shrink_step(&shared.memory.lock().unwrap()).unwrap();
    }
    let left = pages(&shared);
    assert!(
        left < full / 5,
        "{left} of {full} pages left after shrinking"
    );
    assert_eq!(seqs(&shared), (36_001..=40_000).collect::<Vec<i64>>());
}

/// The mirror's tick ends the gathering window: it mirrors every change made before it,
/// however long the window.
#[test]
fn a_ring_ends_the_window_and_a_flush_then_has_every_change_committed() {
    let shared = Arc::new(memory());
    let (commands, _fetches, writer) = writer_gathering_forever(&shared);
    commands.send(Command::Op(insert(1))).unwrap();
    let (reply, committed) = crossbeam_channel::bounded(1);
    commands.send(Command::Flush(reply)).unwrap();
    shared.ring_writer();
    committed
        .recv_timeout(Duration::from_secs(30))
        .expect("the ring ended the window");
    assert_eq!(shared.generation.load(Ordering::Acquire), 1);
    commands.send(Command::Stop).unwrap();
    shared.ring_writer();
    writer.join().unwrap();
    // The writer holds the database while it runs.
    assert_eq!(seqs(&shared), vec![1]);
}

/// The mirror's tick has the writer commit what it gathers, and waits for it: a tick mirrors
/// every change made before it, however long the window.
#[test]
fn a_tick_takes_every_change_sent_before_it() {
    let shared = Arc::new(memory());
    let (commands, fetches, writer) = writer_gathering_forever(&shared);
    let mut store = ChannelStore {
        commands: commands.clone(),
        fetches,
        backlog: shared.backlog.clone(),
        ring: shared.writer_bell(),
        submitted: 0,
    };
    let mirror = crate::persist::mirror::Mirror::new(
        shared.clone(),
        commands.clone(),
        std::env::temp_dir().join("phpmq-unused.sqlite"),
        Arc::default(),
    );
    let (_stop, stopped) = crossbeam_channel::bounded::<()>(1);
    assert!(mirror.commit_gathered(&stopped), "nothing pending: at once");
    store.apply(insert(1));
    store.apply(insert(2));
    // On a thread of its own: a tick that waited out the window would hang, not fail.
    let (done, gathered) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done.send(mirror.commit_gathered(&stopped));
    });
    assert_eq!(
        gathered.recv_timeout(Duration::from_secs(30)),
        Ok(true),
        "the tick ended the window"
    );
    assert_eq!(shared.generation.load(Ordering::Acquire), 2);
    commands.send(Command::Stop).unwrap();
    shared.ring_writer();
    writer.join().unwrap();
}

/// A flood ends the window once a batch's worth waits: one batch at a time keeps the backlog
/// far below the mark where producers wait.
#[test]
fn a_batch_worth_of_changes_rings_the_writer() {
    let shared = memory();
    let (commands, _taken) = crossbeam_channel::unbounded();
    let (fetches, _fetch_requests) = crossbeam_channel::unbounded();
    let mut store = ChannelStore {
        commands,
        fetches,
        backlog: shared.backlog.clone(),
        ring: shared.writer_bell(),
        submitted: 0,
    };
    for seq in 1..MAX_BATCH as u64 {
        store.apply(insert(seq));
    }
    assert!(shared.writer_rung().try_recv().is_err(), "not yet a batch");
    store.apply(insert(MAX_BATCH as u64));
    assert!(shared.writer_rung().try_recv().is_ok());
}

/// A writer thread whose window never ends by itself (only a ring ends it), with the
/// senders of its command and fetch channels (keep the fetch sender: a closed channel would
/// end the window too).
fn writer_gathering_forever(
    shared: &Arc<Shared>,
) -> (
    crossbeam_channel::Sender<Command>,
    crossbeam_channel::Sender<FetchRequest>,
    std::thread::JoinHandle<()>,
) {
    let (commands, taken) = crossbeam_channel::unbounded();
    let (fetches, fetch_requests) = crossbeam_channel::unbounded();
    let shared = shared.clone();
    let writer = std::thread::spawn(move || {
        let callbacks = Callbacks {
            fetched: Arc::new(|_| {}),
            error: Arc::new(|e| panic!("writer failed: {e}")),
        };
        let forever = Duration::from_secs(3600);
        run_with_window(&shared, &taken, &fetch_requests, &callbacks, forever);
    });
    (commands, fetches, writer)
}

fn apply(shared: &Shared, ops: &[StoreOp]) -> Result<(), PersistError> {
    let conn = shared.memory.lock().unwrap();
    let through = shared.generation.load(Ordering::Acquire) + ops.len() as u64;
    commit(shared, &conn, ops.to_vec(), through)
}

fn memory() -> Shared {
    // The lock of a file these tests never write: each store needs one, as a server's does.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("phpmq-writer-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let lock = DbLock::acquire(&dir.join(format!("{n}.sqlite"))).unwrap();
    Shared::new(copy::new_memory().unwrap(), lock)
}

fn seqs(shared: &Shared) -> Vec<i64> {
    let conn = shared.memory.lock().unwrap();
    let mut statement = conn
        .prepare("SELECT seq FROM messages ORDER BY seq")
        .unwrap();
    let rows = statement.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

#[test]
fn contents_are_read_back_for_dense_and_sparse_requests() {
    let shared = memory();
    apply(&shared, &(1..=500).map(insert).collect::<Vec<_>>()).unwrap();
    apply(&shared, &[delete(3)]).unwrap();
    let conn = shared.memory.lock().unwrap();
    let seqs = |contents: Vec<(u64, Arc<[u8]>)>| -> Vec<u64> {
        assert!(contents.iter().all(|(_, c)| &c[..] == b"x"));
        contents.into_iter().map(|(seq, _)| seq).collect()
    };
    // A run (one range scan); the deleted one is simply not there.
    assert_eq!(
        seqs(read_contents(&conn, &[2, 3, 4, 5]).unwrap()),
        [2, 4, 5]
    );
    // Scattered (row by row), including one never stored.
    assert_eq!(
        seqs(read_contents(&conn, &[1, 300, 499, 9999]).unwrap()),
        [1, 300, 499]
    );
    assert!(read_contents(&conn, &[]).unwrap().is_empty());
}

fn insert_of(seq: u64, size: usize) -> StoreOp {
    let mut op = insert(seq);
    if let StoreOp::Insert(m) = &mut op {
        m.content = Arc::from(vec![b'y'; size]);
    }
    op
}

#[test]
fn a_stepped_mirror_copy_includes_changes_made_between_its_steps() {
    // 40 MB: more than one step, so the writer applies what waits between steps.
    let shared = memory();
    apply(
        &shared,
        &(1..=10_000).map(|s| insert_of(s, 4000)).collect::<Vec<_>>(),
    )
    .unwrap();
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let (fetches, fetch_rx) = crossbeam_channel::unbounded();
    let mut store = ChannelStore {
        commands,
        fetches,
        backlog: shared.backlog.clone(),
        ring: shared.writer_bell(),
        submitted: 0,
    };
    for seq in 1..=2000 {
        store.apply(delete(seq));
    }
    store.fetch(FetchRequest {
        token: 1,
        queue: QueueName::new(b"q").unwrap(),
        seqs: vec![2001, 2002],
    });
    let answers = Arc::new(Mutex::new(Vec::new()));
    let callbacks = Callbacks {
        fetched: {
            let answers = answers.clone();
            Arc::new(move |f: Fetched| answers.lock().unwrap().push(f.contents.len()))
        },
        error: Arc::new(|e| panic!("{e}")),
    };
    let dir = std::env::temp_dir().join(format!("phpmq-writer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let temp = dir.join("copy.sqlite");
    let conn = shared.memory.lock().unwrap();
    let mut writer = copying_writer(&conn, &shared, &command_rx, &fetch_rx, &callbacks);
    let copy = writer.copy_to(&temp).unwrap();
    assert_eq!(
        *answers.lock().unwrap(),
        [2],
        "fetches are answered during a copy"
    );
    let file = Connection::open(&temp).unwrap();
    let rows: i64 = file
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, copy.messages);
    assert_eq!(rows, 8000, "the deletes applied during the copy are in it");
    assert!(shared.backlog.is_low() && !shared.backlog.is_high());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ops_reach_the_database() {
    let shared = memory();
    apply(&shared, &[insert(1), insert(2), insert(3)]).unwrap();
    apply(
        &shared,
        &[
            delete(2),
            StoreOp::Requeue {
                id: MessageId::from_u128(1),
                old_seq: 1,
                seq: 4,
                expires_at: None,
                due_at: None,
                deliveries: 0,
                queue: None,
            },
        ],
    )
    .unwrap();
    assert_eq!(seqs(&shared), [3, 4]);
    assert_eq!(shared.rows.load(Ordering::Relaxed), 2);
    assert_eq!(
        shared.generation.load(Ordering::Relaxed),
        5,
        "the ticket: five changes taken"
    );
}

/// What v1.2 adds to a message (due time, delivery count, a move to another queue) is
/// stored by every kind of change and read back by recovery.
#[test]
fn due_times_counts_and_moves_are_stored_and_read_back() {
    let shared = memory();
    let delayed = StoreOp::Insert(StoredMessage {
        due_at: Some(5_000),
        ..message(1)
    });
    apply(&shared, &[delayed, insert(2), insert(3)]).unwrap();
    apply(
        &shared,
        &[
            // 1 became due and joined the tail; 2 went back after a dispatch; 3 was
            // dead-lettered after its third.
            StoreOp::Requeue {
                id: MessageId::from_u128(1),
                old_seq: 1,
                seq: 10,
                expires_at: Some(9_000),
                due_at: None,
                deliveries: 0,
                queue: None,
            },
            StoreOp::Counted {
                id: MessageId::from_u128(2),
                seq: 2,
                deliveries: 2,
            },
            StoreOp::Requeue {
                id: MessageId::from_u128(3),
                old_seq: 3,
                seq: 11,
                expires_at: None,
                due_at: None,
                deliveries: 3,
                queue: Some(QueueName::new(b"q.dead").unwrap()),
            },
        ],
    )
    .unwrap();
    let conn = shared.memory.lock().unwrap();
    let mut rows = Vec::new();
    schema::load(&conn, std::path::Path::new("memory"), &mut |row| {
        rows.push((
            row.seq,
            row.queue.as_str().to_owned(),
            row.expires_at,
            row.due_at,
            row.deliveries,
        ))
    })
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (2, "q".into(), None, None, 2),
            (10, "q".into(), Some(9_000), None, 0),
            (11, "q.dead".into(), None, None, 3),
        ]
    );
}

/// A re-queue or a return of a message inserted in the same batch rewrites the insert.
#[test]
fn a_batch_folds_returns_and_moves_into_its_inserts() {
    let shared = memory();
    let ops = vec![
        insert(1),
        insert(2),
        StoreOp::Counted {
            id: MessageId::from_u128(1),
            seq: 1,
            deliveries: 4,
        },
        StoreOp::Requeue {
            id: MessageId::from_u128(2),
            old_seq: 2,
            seq: 3,
            expires_at: None,
            due_at: Some(77),
            deliveries: 1,
            queue: Some(QueueName::new(b"other").unwrap()),
        },
    ];
    let folded = batch::coalesce(ops.clone());
    assert_eq!(folded.len(), 2, "{folded:?}");
    apply(&shared, &ops).unwrap();
    let conn = shared.memory.lock().unwrap();
    let read = |seq: i64| -> (String, Option<i64>, i64) {
        conn.query_row(
            "SELECT queue, due_at, deliveries FROM messages WHERE seq = ?1",
            [seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    assert_eq!(read(1), ("q".into(), None, 4));
    assert_eq!(read(3), ("other".into(), Some(77), 1));
}

fn message(seq: u64) -> StoredMessage {
    match insert(seq) {
        StoreOp::Insert(message) => message,
        _ => unreachable!("insert() makes inserts"),
    }
}

/// A commit to an in-memory database sends a backup in progress back to its first page: under
/// a steady stream of changes, a copy that stepped on forever would never finish (a store
/// over 32 MB whose file needs a full copy while producers keep sending).
#[test]
fn a_stepped_mirror_copy_finishes_under_a_steady_stream_of_changes() {
    // 48 MB: three steps, if nothing came between them.
    let shared = Arc::new(memory());
    apply(
        &shared,
        &(1..=12_000).map(|s| insert_of(s, 4000)).collect::<Vec<_>>(),
    )
    .unwrap();
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let (_fetches, fetch_rx) = crossbeam_channel::unbounded::<FetchRequest>();
    let dir = std::env::temp_dir().join(format!("phpmq-writer-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let temp = dir.join("copy.sqlite");
    // A change always waits between two steps: the feeder keeps the channel from emptying.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        let commands = commands.clone();
        std::thread::spawn(move || {
            let mut seq = 100_000;
            while !stop.load(Ordering::Relaxed) {
                if commands.len() < 4 {
                    seq += 1;
                    let _ = commands.send(Command::Op(insert_of(seq, 100)));
                } else {
                    std::thread::yield_now();
                }
            }
        })
    };
    // On a thread of its own: a copy that never finishes would hang, not fail.
    let (done, copied) = crossbeam_channel::bounded(1);
    {
        let shared = shared.clone();
        let temp = temp.clone();
        std::thread::spawn(move || {
            let callbacks = Callbacks {
                fetched: Arc::new(|_| {}),
                error: Arc::new(|e| panic!("{e}")),
            };
            let conn = shared.memory.lock().unwrap();
            let mut writer = copying_writer(&conn, &shared, &command_rx, &fetch_rx, &callbacks);
            let copy = writer.copy_to(&temp).map_err(|e| format!("{e:?}"));
            let _ = done.send(copy.map(|c| c.messages));
        });
    }
    let copied = copied.recv_timeout(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let messages = copied
        .expect("the copy finished under a steady stream")
        .unwrap();
    let file = Connection::open(&temp).unwrap();
    let rows: i64 = file
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, messages, "the copy holds what it says");
    assert!(rows > 12_000, "changes committed during the copy are in it");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A writer in the middle of a copy, over `conn` (the database's guard the caller holds).
fn copying_writer<'a>(
    conn: &'a Connection,
    shared: &'a Shared,
    commands: &'a crossbeam_channel::Receiver<Command>,
    fetches: &'a crossbeam_channel::Receiver<FetchRequest>,
    callbacks: &'a Callbacks,
) -> Writer<'a> {
    Writer {
        conn,
        shared,
        commands,
        fetches,
        callbacks,
        window: BATCH_WINDOW,
        at_cap: false,
        batch: Vec::new(),
        received: 0,
        batch_bytes: 0,
        flushes: Vec::new(),
        pending_fetches: Vec::new(),
        mirror: None,
        copying: true,
        shrunk: false,
        may_shrink: false,
        stop: false,
    }
}
