//! The store writer: the broker's [`Store`] is a channel, and this thread applies what comes
//! through it to the in-memory SQLite database, in batches of one transaction each.
//!
//! The broker never waits for SQLite: it only sends on an unbounded channel. A message that is
//! accepted and acknowledged within one batch never touches SQLite at all.

use super::PersistError;
use crate::store::{Store, StoreOp, StoredMessage};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{params, Connection};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

/// The most changes applied in one transaction.
const MAX_BATCH: usize = 8192;
/// How long the writer gathers changes after the first one before writing them.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

pub enum Command {
    Op(StoreOp),
    /// Replies once everything sent before it is in the database.
    Flush(Sender<()>),
    Stop,
}

/// The broker's side of the channel.
pub struct ChannelStore(pub(super) Sender<Command>);

impl Store for ChannelStore {
    fn apply(&mut self, op: StoreOp) {
        // Fails only once the writer has stopped, at the very end of shutdown.
        let _ = self.0.send(Command::Op(op));
    }
}

/// What the writer and the mirror share.
pub struct Shared {
    pub memory: Mutex<Connection>,
    /// Bumped after every committed batch: the mirror copies only when it moved.
    pub generation: AtomicU64,
    /// Rows in `messages`, for the mirror's log line.
    pub rows: AtomicI64,
}

/// Applies commands until `Stop` (or every sender is gone). `on_error` hears of a failed write.
pub fn run(shared: &Shared, commands: &Receiver<Command>, on_error: &dyn Fn(PersistError)) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    loop {
        let Ok(first) = commands.recv() else {
            return;
        };
        // Gather what comes within the window: an accept acknowledged inside it never reaches
        // SQLite, and a busy stream costs one transaction per window, not one per message.
        // Sleeping (rather than waiting on the channel) matters: senders then never have to
        // wake this thread, which keeps that cost off the delivery path.
        let urgent = matches!(first, Command::Flush(_) | Command::Stop);
        if !urgent && commands.len() < MAX_BATCH {
            thread::sleep(BATCH_WINDOW);
        }
        let mut stop = false;
        for command in std::iter::once(first).chain(commands.try_iter()) {
            match command {
                Command::Op(op) => batch.push(op),
                Command::Flush(reply) => flushes.push(reply),
                Command::Stop => stop = true,
            }
            if stop || batch.len() >= MAX_BATCH {
                break;
            }
        }
        if !batch.is_empty() {
            let ops = coalesce(std::mem::take(&mut batch));
            if let Err(e) = write_batch(shared, &ops) {
                on_error(e);
                return;
            }
        }
        for reply in flushes.drain(..) {
            let _ = reply.send(());
        }
        if stop {
            return;
        }
    }
}

/// Drops inserts that a later op in the same batch deletes, and folds re-queues of messages
/// inserted in the batch into their insert: the common accept-then-ack costs SQLite nothing.
fn coalesce(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut slots: Vec<Option<StoreOp>> = Vec::with_capacity(ops.len());
    let mut inserted: HashMap<u64, usize> = HashMap::new();
    for op in ops {
        match op {
            StoreOp::Delete { seq, .. } if inserted.contains_key(&seq) => {
                if let Some(slot) = inserted.remove(&seq) {
                    slots[slot] = None;
                }
            }
            StoreOp::Requeue {
                old_seq,
                seq,
                expires_at,
                ..
            } if inserted.contains_key(&old_seq) => {
                if let Some(slot) = inserted.remove(&old_seq) {
                    if let Some(StoreOp::Insert(message)) = &mut slots[slot] {
                        message.seq = seq;
                        message.expires_at = expires_at;
                    }
                    inserted.insert(seq, slot);
                }
            }
            op => {
                if let StoreOp::Insert(message) = &op {
                    inserted.insert(message.seq, slots.len());
                }
                slots.push(Some(op));
            }
        }
    }
    slots.into_iter().flatten().collect()
}

/// Inserts per multi-row INSERT statement: one statement costs about as much as a row.
const INSERT_CHUNK: usize = 64;

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO messages (seq, id, queue, content, accepted_at, expires_at) VALUES ",
    );
    for row in 0..rows {
        let base = row * 6;
        if row > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "(?{},?{},?{},?{},?{},?{})",
            base + 1,
            base + 2,
            base + 3,
            base + 4,
            base + 5,
            base + 6
        ));
    }
    sql
}

/// Applies a coalesced batch in one transaction. Inserts and re-queues touch different rows,
/// and a deleted message is never touched again, so the batch is applied by kind: inserts in
/// multi-row statements, then re-queues, then deletes as ranges of consecutive positions
/// (consumers acknowledge in FIFO order, so a batch's deletes are mostly long runs).
fn write_batch(shared: &Shared, ops: &[StoreOp]) -> Result<(), PersistError> {
    let mut inserts: Vec<&StoredMessage> = Vec::new();
    let mut requeues = Vec::new();
    let mut deletes: Vec<i64> = Vec::new();
    for op in ops {
        match op {
            StoreOp::Insert(message) => inserts.push(message),
            StoreOp::Requeue {
                old_seq,
                seq,
                expires_at,
                ..
            } => requeues.push((*old_seq as i64, *seq as i64, expires_at.map(|at| at as i64))),
            StoreOp::Delete { seq, .. } => deletes.push(*seq as i64),
        }
    }
    deletes.sort_unstable();

    let mut conn = shared.memory.lock().map_err(|_| PersistError::Poisoned)?;
    let fail = |source| PersistError::Sqlite {
        action: "write to",
        path: ":memory:".into(),
        source,
    };
    let tx = conn.transaction().map_err(fail)?;
    let mut row_delta = 0i64;
    static FULL_CHUNK_SQL: OnceLock<String> = OnceLock::new();
    let full_chunk_sql = FULL_CHUNK_SQL.get_or_init(|| insert_sql(INSERT_CHUNK));
    for chunk in inserts.chunks(INSERT_CHUNK) {
        let sql = if chunk.len() == INSERT_CHUNK {
            Cow::Borrowed(full_chunk_sql.as_str())
        } else {
            Cow::Owned(insert_sql(chunk.len()))
        };
        let mut insert = tx.prepare_cached(&sql).map_err(fail)?;
        for (row, m) in chunk.iter().enumerate() {
            let at = row * 6;
            insert
                .raw_bind_parameter(at + 1, m.seq as i64)
                .map_err(fail)?;
            insert
                .raw_bind_parameter(at + 2, &m.id.as_u128().to_be_bytes()[..])
                .map_err(fail)?;
            insert
                .raw_bind_parameter(at + 3, m.queue.as_str())
                .map_err(fail)?;
            insert
                .raw_bind_parameter(at + 4, &m.content[..])
                .map_err(fail)?;
            insert
                .raw_bind_parameter(at + 5, m.accepted_at as i64)
                .map_err(fail)?;
            insert
                .raw_bind_parameter(at + 6, m.expires_at.map(|at| at as i64))
                .map_err(fail)?;
        }
        row_delta += insert.raw_execute().map_err(fail)? as i64;
    }
    if !requeues.is_empty() {
        let mut requeue = tx
            .prepare_cached("UPDATE messages SET seq = ?1, expires_at = ?2 WHERE seq = ?3")
            .map_err(fail)?;
        for (old_seq, seq, expires_at) in requeues {
            requeue
                .execute(params![seq, expires_at, old_seq])
                .map_err(fail)?;
        }
    }
    if !deletes.is_empty() {
        let mut delete = tx
            .prepare_cached("DELETE FROM messages WHERE seq BETWEEN ?1 AND ?2")
            .map_err(fail)?;
        let mut run_start = 0;
        for i in 1..=deletes.len() {
            if i == deletes.len() || deletes[i] != deletes[i - 1] + 1 {
                row_delta -= delete
                    .execute(params![deletes[run_start], deletes[i - 1]])
                    .map_err(fail)? as i64;
                run_start = i;
            }
        }
    }
    tx.commit().map_err(fail)?;
    let rows = shared.rows.fetch_add(row_delta, Ordering::Relaxed) + row_delta;
    if rows == 0 {
        shrink_if_mostly_free(&conn).map_err(fail)?;
    }
    shared.generation.fetch_add(1, Ordering::Release);
    Ok(())
}

/// Free pages worth giving back: 16 MiB at SQLite's default 4 KiB pages.
const SHRINK_FREE_PAGES: i64 = 4096;

/// Once a burst has drained, the database would keep every page it ever had (and the mirror
/// file its size); rebuilding an empty database is instant and returns them.
fn shrink_if_mostly_free(conn: &Connection) -> rusqlite::Result<()> {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    if free >= SHRINK_FREE_PAGES {
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::MessageId;
    use crate::request::QueueName;
    use std::sync::Arc;

    fn insert(seq: u64) -> StoreOp {
        StoreOp::Insert(StoredMessage {
            id: MessageId::from_u128(seq.into()),
            queue: QueueName::new(b"q").unwrap(),
            content: Arc::from(&b"x"[..]),
            accepted_at: 0,
            expires_at: None,
            seq,
        })
    }

    fn delete(seq: u64) -> StoreOp {
        StoreOp::Delete {
            id: MessageId::from_u128(seq.into()),
            seq,
        }
    }

    #[test]
    fn accepted_then_acked_in_one_batch_costs_nothing() {
        let ops = coalesce(vec![insert(1), insert(2), delete(1), delete(7)]);
        assert_eq!(ops, vec![insert(2), delete(7)]);
    }

    #[test]
    fn requeue_of_a_fresh_insert_rewrites_the_insert() {
        let requeue = StoreOp::Requeue {
            id: MessageId::from_u128(1),
            old_seq: 1,
            seq: 5,
            expires_at: Some(9),
        };
        let ops = coalesce(vec![insert(1), requeue, delete(5)]);
        assert!(ops.is_empty(), "{ops:?}");
        let requeue = StoreOp::Requeue {
            id: MessageId::from_u128(1),
            old_seq: 1,
            seq: 5,
            expires_at: Some(9),
        };
        let ops = coalesce(vec![insert(1), requeue]);
        assert!(matches!(&ops[..], [StoreOp::Insert(m)] if m.seq == 5 && m.expires_at == Some(9)));
    }

    #[test]
    fn chunked_inserts_and_ranged_deletes_touch_exactly_their_rows() {
        let shared = memory();
        let inserts: Vec<StoreOp> = (1..=150).map(insert).collect();
        write_batch(&shared, &inserts).unwrap();
        let doomed: Vec<u64> = [3, 4, 5, 10, 149, 7777]
            .into_iter()
            .chain(100..=120)
            .collect();
        // Out of order, as acks from several consumers arrive.
        let deletes: Vec<StoreOp> = doomed.iter().rev().map(|&s| delete(s)).collect();
        write_batch(&shared, &deletes).unwrap();
        let expected: Vec<i64> = (1..=150)
            .filter(|s| !doomed.contains(s))
            .map(|s| s as i64)
            .collect();
        assert_eq!(seqs(&shared), expected);
        assert_eq!(shared.rows.load(Ordering::Relaxed), expected.len() as i64);
    }

    #[test]
    fn an_emptied_store_gives_its_pages_back() {
        let shared = memory();
        let big = |seq: u64| {
            StoreOp::Insert(StoredMessage {
                content: Arc::from(vec![7u8; 1024]),
                ..match insert(seq) {
                    StoreOp::Insert(m) => m,
                    _ => unreachable!(),
                }
            })
        };
        let pages = |shared: &Shared| -> i64 {
            let conn = shared.memory.lock().unwrap();
            conn.query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap()
        };
        write_batch(&shared, &(1..=20_000).map(big).collect::<Vec<_>>()).unwrap();
        assert!(pages(&shared) > 5000);
        write_batch(&shared, &(1..=19_999).map(delete).collect::<Vec<_>>()).unwrap();
        assert!(pages(&shared) > 5000, "not empty yet: nothing is rebuilt");
        write_batch(&shared, &[delete(20_000)]).unwrap();
        assert!(pages(&shared) < 50, "{} pages left", pages(&shared));
        assert_eq!(seqs(&shared), Vec::<i64>::new());
    }

    fn memory() -> Shared {
        let conn = Connection::open_in_memory().unwrap();
        super::super::schema::create(&conn).unwrap();
        Shared {
            memory: Mutex::new(conn),
            generation: AtomicU64::new(0),
            rows: AtomicI64::new(0),
        }
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
    fn ops_reach_the_database() {
        let shared = memory();
        write_batch(&shared, &[insert(1), insert(2), insert(3)]).unwrap();
        write_batch(
            &shared,
            &[
                delete(2),
                StoreOp::Requeue {
                    id: MessageId::from_u128(1),
                    old_seq: 1,
                    seq: 4,
                    expires_at: None,
                },
            ],
        )
        .unwrap();
        assert_eq!(seqs(&shared), [3, 4]);
        assert_eq!(shared.rows.load(Ordering::Relaxed), 2);
        assert_eq!(shared.generation.load(Ordering::Relaxed), 2);
    }
}
