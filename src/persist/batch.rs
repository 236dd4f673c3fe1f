//! Changes as SQL: folding a run of [`StoreOp`]s into the smallest equivalent set
//! ([`Coalesced`]), and applying such a set to a database in one transaction ([`apply`]).
//!
//! Both databases take the same changes: the store writer applies each batch to the in-memory
//! database, and the mirror applies everything since its last run to the file. Neither step
//! knows which database it writes to.

use crate::request::QueueName;
use crate::store::{StoreOp, StoredMessage};
use rusqlite::{params, Connection};
use std::borrow::Cow;
use std::sync::OnceLock;

/// A run of changes with the ones that cancel out removed: an insert that a later delete
/// removes never happened, and a re-queue or return of a message inserted in the same run
/// rewrites the insert. Pushing costs O(1); the order of what is kept is the order it came in.
#[derive(Default)]
pub struct Coalesced {
    slots: Vec<Option<StoreOp>>,
    /// seq → slot of an insert still in `slots` (server-made keys: the fast hasher).
    inserted: rustc_hash::FxHashMap<u64, usize>,
    /// Content bytes held by the inserts still in `slots`.
    bytes: usize,
    /// Ops still in `slots`.
    len: usize,
}

impl Coalesced {
    pub fn push(&mut self, op: StoreOp) {
        match op {
            StoreOp::Delete { seq, .. } if self.inserted.contains_key(&seq) => {
                if let Some(slot) = self.inserted.remove(&seq) {
                    if let Some(StoreOp::Insert(message)) = self.slots[slot].take() {
                        self.bytes -= message.content.len();
                        self.len -= 1;
                    }
                }
            }
            StoreOp::Requeue {
                old_seq,
                seq,
                expires_at,
                due_at,
                deliveries,
                queue,
                ..
            } if self.inserted.contains_key(&old_seq) => {
                if let Some(slot) = self.inserted.remove(&old_seq) {
                    if let Some(StoreOp::Insert(message)) = &mut self.slots[slot] {
                        message.seq = seq;
                        message.expires_at = expires_at;
                        message.due_at = due_at;
                        message.deliveries = deliveries;
                        if let Some(queue) = queue {
                            message.queue = queue;
                        }
                    }
                    self.inserted.insert(seq, slot);
                }
            }
            StoreOp::Returned {
                seq, deliveries, ..
            } if self.inserted.contains_key(&seq) => {
                if let Some(&slot) = self.inserted.get(&seq) {
                    if let Some(StoreOp::Insert(message)) = &mut self.slots[slot] {
                        message.deliveries = deliveries;
                    }
                }
            }
            op => {
                if let StoreOp::Insert(message) = &op {
                    self.inserted.insert(message.seq, self.slots.len());
                    self.bytes += message.content.len();
                }
                self.slots.push(Some(op));
                self.len += 1;
            }
        }
    }

    /// Ops kept.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Inserts kept.
    pub fn inserts(&self) -> usize {
        self.inserted.len()
    }

    /// Content bytes of the inserts kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn into_ops(self) -> Vec<StoreOp> {
        // `filter_map` over the array's own iterator collects into the same allocation (an
        // `Option<StoreOp>` is as large as a `StoreOp`), not into a second array as long.
        #[allow(clippy::filter_map_identity)]
        let mut ops: Vec<StoreOp> = self.slots.into_iter().filter_map(|slot| slot).collect();
        // Mostly cancelled (a flood sent and acknowledged between two mirrors): the room of
        // the cancelled slots is not kept for as long as the ops are.
        if ops.len() < ops.capacity() / 2 {
            ops.shrink_to_fit();
        }
        ops
    }
}

/// Folds `ops` (see [`Coalesced`]).
pub fn coalesce(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut coalesced = Coalesced::default();
    for op in ops {
        coalesced.push(op);
    }
    coalesced.into_ops()
}

/// Inserts per multi-row INSERT statement: one statement costs about as much as a row.
const INSERT_CHUNK: usize = 64;
/// Prepared statements a connection that takes batches keeps: a batch's last chunk has any
/// length up to [`INSERT_CHUNK`], in two column sets, and small batches (a durable receipt's)
/// are all last chunks; with SQLite's default of 16 most of them were parsed again each time.
pub const STATEMENT_CACHE: usize = 2 * INSERT_CHUNK + 16;
/// The columns an insert sets: v1's, and v1.2's due time and delivery count, which most rows
/// leave at their defaults (no delay, no dispatch yet) and which are then not bound at all.
const V1_COLUMNS: &str = "seq, id, queue, content, accepted_at, expires_at";
const V12_COLUMNS: &str = "seq, id, queue, content, accepted_at, expires_at, due_at, deliveries";

fn insert_sql(rows: usize, columns: &str) -> String {
    let count = columns.split(',').count();
    let row = format!("({})", vec!["?"; count].join(","));
    format!(
        "INSERT INTO messages ({columns}) VALUES {}",
        vec![row; rows].join(",")
    )
}

/// The stored form of a time: SQLite integers are signed.
fn stored_time(at: u64) -> i64 {
    i64::try_from(at).unwrap_or(i64::MAX)
}

/// Applies coalesced `ops` to `conn` in one transaction and returns how many rows were added
/// (negative: removed). Inserts and re-queues touch different rows, and a deleted message is
/// never touched again, so the batch is applied by kind: inserts in multi-row statements, then
/// re-queues, then deletes as ranges of consecutive positions (consumers acknowledge in FIFO
/// order, so deletes mostly come in long runs).
pub fn apply(conn: &Connection, ops: &[StoreOp]) -> rusqlite::Result<i64> {
    let mut inserts: Vec<&StoredMessage> = Vec::new();
    let mut requeues = Vec::new();
    let mut returns = Vec::new();
    let mut deletes: Vec<i64> = Vec::new();
    for op in ops {
        match op {
            StoreOp::Insert(message) => inserts.push(message),
            StoreOp::Requeue {
                old_seq,
                seq,
                expires_at,
                due_at,
                deliveries,
                queue,
                ..
            } => requeues.push((
                stored_time(*old_seq),
                stored_time(*seq),
                expires_at.map(stored_time),
                due_at.map(stored_time),
                *deliveries,
                queue.as_ref().map(QueueName::as_str),
            )),
            StoreOp::Returned {
                seq, deliveries, ..
            } => returns.push((stored_time(*seq), *deliveries)),
            StoreOp::Delete { seq, .. } => deletes.push(stored_time(*seq)),
        }
    }
    deletes.sort_unstable();

    // Unchecked: a mirror's backup may borrow the connection too (shared), between batches.
    let tx = conn.unchecked_transaction()?;
    let mut row_delta = 0i64;
    static FULL_CHUNK_SQL: OnceLock<(String, String)> = OnceLock::new();
    let full_chunk_sql = FULL_CHUNK_SQL.get_or_init(|| {
        (
            insert_sql(INSERT_CHUNK, V1_COLUMNS),
            insert_sql(INSERT_CHUNK, V12_COLUMNS),
        )
    });
    for chunk in inserts.chunks(INSERT_CHUNK) {
        let defaults = chunk
            .iter()
            .all(|m| m.due_at.is_none() && m.deliveries == 0);
        let sql = match (chunk.len() == INSERT_CHUNK, defaults) {
            (true, true) => Cow::Borrowed(full_chunk_sql.0.as_str()),
            (true, false) => Cow::Borrowed(full_chunk_sql.1.as_str()),
            (false, true) => Cow::Owned(insert_sql(chunk.len(), V1_COLUMNS)),
            (false, false) => Cow::Owned(insert_sql(chunk.len(), V12_COLUMNS)),
        };
        let mut insert = tx.prepare_cached(&sql)?;
        // Parameters are numbered from 1, a row's worth at a time, in the statement's column order.
        let mut at = 0;
        let mut bind = |value: &dyn rusqlite::ToSql| {
            at += 1;
            insert.raw_bind_parameter(at, value)
        };
        for m in chunk {
            bind(&stored_time(m.seq))?;
            bind(&&m.id.as_u128().to_be_bytes()[..])?;
            bind(&m.queue.as_str())?;
            bind(&&m.content[..])?;
            bind(&stored_time(m.accepted_at))?;
            bind(&m.expires_at.map(stored_time))?;
            if !defaults {
                bind(&m.due_at.map(stored_time))?;
                bind(&m.deliveries)?;
            }
        }
        row_delta += insert.raw_execute()? as i64;
    }
    if !requeues.is_empty() {
        let mut requeue = tx.prepare_cached(
            "UPDATE messages SET seq = ?1, expires_at = ?2, due_at = ?3, deliveries = ?4,
             queue = coalesce(?5, queue) WHERE seq = ?6",
        )?;
        for (old_seq, seq, expires_at, due_at, deliveries, queue) in requeues {
            requeue.execute(params![seq, expires_at, due_at, deliveries, queue, old_seq])?;
        }
    }
    // After the re-queues, in order: a return names the position the message has by then (a
    // return whose message a later re-queue moved finds no row, and the re-queue carries
    // the newer count).
    if !returns.is_empty() {
        let mut returned =
            tx.prepare_cached("UPDATE messages SET deliveries = ?1 WHERE seq = ?2")?;
        for (seq, deliveries) in returns {
            returned.execute(params![deliveries, seq])?;
        }
    }
    if !deletes.is_empty() {
        let mut delete = tx.prepare_cached("DELETE FROM messages WHERE seq BETWEEN ?1 AND ?2")?;
        let mut run_start = 0;
        for i in 1..=deletes.len() {
            if i == deletes.len() || deletes[i] != deletes[i - 1] + 1 {
                row_delta -= delete.execute(params![deletes[run_start], deletes[i - 1]])? as i64;
                run_start = i;
            }
        }
    }
    tx.commit()?;
    Ok(row_delta)
}

/// Changes for tests of the stores: a one-byte insert and its delete, by seq.
#[cfg(test)]
pub(super) mod test_ops {
    use crate::id::MessageId;
    use crate::request::QueueName;
    use crate::store::{StoreOp, StoredMessage};
    use std::sync::Arc;

    pub fn insert(seq: u64) -> StoreOp {
        StoreOp::Insert(StoredMessage {
            id: MessageId::from_u128(seq.into()),
            queue: QueueName::new(b"q").unwrap(),
            content: Arc::from(&b"x"[..]),
            accepted_at: 0,
            expires_at: None,
            seq,
            due_at: None,
            deliveries: 0,
        })
    }

    pub fn delete(seq: u64) -> StoreOp {
        StoreOp::Delete {
            id: MessageId::from_u128(seq.into()),
            seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_ops::{delete, insert};
    use super::*;
    use crate::id::MessageId;

    #[test]
    fn unpacking_a_flood_reuses_its_array() {
        assert_eq!(
            std::mem::size_of::<Option<StoreOp>>(),
            std::mem::size_of::<StoreOp>()
        );
        let mut coalesced = Coalesced::default();
        for seq in 1..=1000 {
            coalesced.push(insert(seq));
        }
        coalesced.push(delete(500));
        let array = coalesced.slots.as_ptr() as usize;
        let ops = coalesced.into_ops();
        assert_eq!(ops.len(), 999);
        assert_eq!(
            ops.as_ptr() as usize,
            array,
            "collected in place, not copied"
        );

        // Mostly cancelled: the room of the cancelled slots is given back.
        let mut coalesced = Coalesced::default();
        for seq in 1..=1000 {
            coalesced.push(insert(seq));
        }
        for seq in 1..=900 {
            coalesced.push(delete(seq));
        }
        let ops = coalesced.into_ops();
        assert_eq!(ops.len(), 100);
        assert!(ops.capacity() < 500, "capacity {}", ops.capacity());
    }

    #[test]
    fn accepted_then_acked_in_one_batch_costs_nothing() {
        let ops = coalesce(vec![insert(1), insert(2), delete(1), delete(7)]);
        assert_eq!(ops, vec![insert(2), delete(7)]);
    }

    #[test]
    fn requeue_of_a_fresh_insert_rewrites_the_insert() {
        let requeue = || StoreOp::Requeue {
            id: MessageId::from_u128(1),
            old_seq: 1,
            seq: 5,
            expires_at: Some(9),
            due_at: None,
            deliveries: 0,
            queue: None,
        };
        let ops = coalesce(vec![insert(1), requeue(), delete(5)]);
        assert!(ops.is_empty(), "{ops:?}");
        let ops = coalesce(vec![insert(1), requeue()]);
        assert!(matches!(&ops[..], [StoreOp::Insert(m)] if m.seq == 5 && m.expires_at == Some(9)));
    }

    #[test]
    fn counts_follow_what_is_kept() {
        let mut coalesced = Coalesced::default();
        for op in [insert(1), insert(2), delete(1), delete(9)] {
            coalesced.push(op);
        }
        assert_eq!((coalesced.len(), coalesced.bytes()), (2, 1));
        coalesced.push(delete(2));
        assert_eq!((coalesced.len(), coalesced.bytes()), (1, 0));
        assert_eq!(coalesced.into_ops(), vec![delete(9)]);
    }

    #[test]
    fn huge_times_are_stored_as_the_largest_integer() {
        assert_eq!(stored_time(u64::MAX), i64::MAX);
        assert_eq!(stored_time(5), 5);
    }
}
