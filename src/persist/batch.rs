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

/// Slots per chunk of a [`Coalesced`] (about 450 KB).
const CHUNK: usize = 4096;

/// A run of changes with the ones that cancel out removed: an insert that a later delete
/// removes never happened, a re-queue or count of a message inserted in the same run rewrites
/// the insert, and a count (one per dispatch) is dropped once a later one, a delete or a
/// re-queue of the message carries it. Pushing costs amortised O(1) (a compaction, see below, copies what is
/// left once cancellations have emptied more slots than that); the order of what is kept is the
/// order it came in.
///
/// The slots grow a chunk at a time: a flood's worth of changes is never copied into an array
/// twice as large (at a million changes, tens of megabytes held twice for the copy), nor into a
/// second array when it is handed on ([`Changes`]).
#[derive(Default)]
pub struct Coalesced {
    slots: Changes,
    /// seq → slot of an insert still in `slots` (server-made keys: the fast hasher).
    inserted: rustc_hash::FxHashMap<u64, usize>,
    /// seq → slot of a count of a message inserted before this run, still in `slots`.
    counted: rustc_hash::FxHashMap<u64, usize>,
    /// Content bytes held by the inserts still in `slots`.
    bytes: usize,
}

impl Coalesced {
    pub fn push(&mut self, op: StoreOp) {
        // A later change of a counted message carries the count (a delete or move makes it
        // moot, a new count replaces it).
        let superseded = match &op {
            StoreOp::Delete { seq, .. } | StoreOp::Counted { seq, .. } => Some(*seq),
            StoreOp::Requeue { old_seq, .. } => Some(*old_seq),
            StoreOp::Insert(_) => None,
        };
        if let Some(slot) = superseded.and_then(|seq| self.counted.remove(&seq)) {
            self.slots.take(slot);
            self.compact_if_sparse();
        }
        match op {
            StoreOp::Delete { seq, .. } if self.inserted.contains_key(&seq) => {
                if let Some(slot) = self.inserted.remove(&seq) {
                    if let Some(StoreOp::Insert(message)) = self.slots.take(slot) {
                        self.bytes -= message.content.len();
                    }
                }
                self.compact_if_sparse();
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
                    if let Some(StoreOp::Insert(message)) = self.slots.get_mut(slot) {
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
            StoreOp::Counted {
                seq, deliveries, ..
            } if self.inserted.contains_key(&seq) => {
                if let Some(&slot) = self.inserted.get(&seq) {
                    if let Some(StoreOp::Insert(message)) = self.slots.get_mut(slot) {
                        message.deliveries = deliveries;
                    }
                }
            }
            op => {
                match &op {
                    StoreOp::Insert(message) => {
                        self.inserted.insert(message.seq, self.slots.slots());
                        self.bytes += message.content.len();
                    }
                    StoreOp::Counted { seq, .. } => {
                        self.counted.insert(*seq, self.slots.slots());
                    }
                    _ => {}
                }
                self.slots.push(op);
            }
        }
    }

    /// Mostly cancelled (a flood sent and acknowledged between two mirrors): the room of the
    /// emptied slots is given back. The cancellations since the last time paid for the copy.
    fn compact_if_sparse(&mut self) {
        if !self.slots.repack_if_sparse() {
            return;
        }
        self.inserted.clear();
        self.counted.clear();
        for (slot, op) in self.slots.iter().enumerate() {
            match op {
                StoreOp::Insert(message) => {
                    self.inserted.insert(message.seq, slot);
                }
                StoreOp::Counted { seq, .. } => {
                    self.counted.insert(*seq, slot);
                }
                _ => {}
            }
        }
        self.inserted.shrink_to_fit();
        self.counted.shrink_to_fit();
    }

    /// Ops kept.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Inserts kept.
    pub fn inserts(&self) -> usize {
        self.inserted.len()
    }

    /// Content bytes of the inserts kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The ops kept, in the order they came in.
    pub fn into_changes(self) -> Changes {
        self.slots
    }
}

/// Ops in the order they came in, as the chunks a [`Coalesced`] gathered them in (with the
/// slots of cancelled ops left empty). Handed on as they are: from the journal to the mirror,
/// and kept by a mirror that failed.
#[derive(Debug, Default)]
pub struct Changes {
    chunks: Vec<Vec<Option<StoreOp>>>,
    /// Ops in the slots.
    len: usize,
}

impl Changes {
    pub fn push(&mut self, op: StoreOp) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(Some(op)),
            // The first chunk grows as it fills (most runs, a durable receipt's, hold a few
            // ops); the next ones are taken whole.
            Some(_) => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(Some(op));
                self.chunks.push(chunk);
            }
            None => self.chunks.push(vec![Some(op)]),
        }
        self.len += 1;
    }

    /// Slots so far, used or emptied: the index the next push takes. Only for changes that
    /// were pushed one by one (a [`Coalesced`]'s), where every chunk but the last is full.
    fn slots(&self) -> usize {
        self.chunks.len().saturating_sub(1) * CHUNK + self.chunks.last().map_or(0, Vec::len)
    }

    /// Slots held, used or emptied, whatever the chunks.
    pub(super) fn room(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Copies the ops into dense chunks once emptied slots outnumber them (freeing the old
    /// chunks as it goes); returns whether it did. Slot numbers change.
    pub fn repack_if_sparse(&mut self) -> bool {
        if self.room() <= 2 * self.len + 4 * CHUNK {
            return false;
        }
        *self = std::mem::take(self).into_iter().collect();
        true
    }

    fn get_mut(&mut self, slot: usize) -> Option<&mut StoreOp> {
        self.chunks
            .get_mut(slot / CHUNK)?
            .get_mut(slot % CHUNK)?
            .as_mut()
    }

    fn take(&mut self, slot: usize) -> Option<StoreOp> {
        let op = self
            .chunks
            .get_mut(slot / CHUNK)?
            .get_mut(slot % CHUNK)?
            .take();
        if op.is_some() {
            self.len -= 1;
        }
        op
    }

    /// The ops of `other` after these. Chunks that hold no op are not kept.
    pub fn append(&mut self, other: Changes) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = other;
            return;
        }
        self.len += other.len;
        self.chunks.extend(other.chunks);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &StoreOp> + Clone {
        self.chunks.iter().flatten().flatten()
    }

    /// Content bytes of the inserts.
    pub fn content_len(&self) -> usize {
        self.iter().map(StoreOp::content_len).sum()
    }
}

impl<'a> IntoIterator for &'a Changes {
    type Item = &'a StoreOp;
    type IntoIter =
        std::iter::Flatten<std::iter::Flatten<std::slice::Iter<'a, Vec<Option<StoreOp>>>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.chunks.iter().flatten().flatten()
    }
}

impl IntoIterator for Changes {
    type Item = StoreOp;
    type IntoIter =
        std::iter::Flatten<std::iter::Flatten<std::vec::IntoIter<Vec<Option<StoreOp>>>>>;

    /// Frees each chunk once its ops are taken.
    fn into_iter(self) -> Self::IntoIter {
        self.chunks.into_iter().flatten().flatten()
    }
}

/// Compares the ops in order, whatever the chunks.
#[cfg(test)]
impl PartialEq<Vec<StoreOp>> for Changes {
    fn eq(&self, ops: &Vec<StoreOp>) -> bool {
        self.iter().eq(ops.iter())
    }
}

impl FromIterator<StoreOp> for Changes {
    fn from_iter<I: IntoIterator<Item = StoreOp>>(ops: I) -> Changes {
        let mut changes = Changes::default();
        for op in ops {
            changes.push(op);
        }
        changes
    }
}

/// Folds `ops` (see [`Coalesced`]).
pub fn coalesce(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut coalesced = Coalesced::default();
    for op in ops {
        coalesced.push(op);
    }
    coalesced.into_changes().into_iter().collect()
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
pub fn apply<'a>(
    conn: &Connection,
    ops: impl IntoIterator<Item = &'a StoreOp>,
) -> rusqlite::Result<i64> {
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
            StoreOp::Counted {
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

    fn counted(seq: u64, deliveries: u32) -> StoreOp {
        StoreOp::Counted {
            id: MessageId::from_u128(seq.into()),
            seq,
            deliveries,
        }
    }

    /// One count per dispatch: a message dispatched and acknowledged within a run costs its
    /// delete alone, and of many dispatches only the last count is written.
    #[test]
    fn counts_give_way_to_what_comes_after_them() {
        let mut coalesced = Coalesced::default();
        // Stored before this run: dispatched, then acknowledged.
        coalesced.push(counted(1, 1));
        coalesced.push(delete(1));
        // Dispatched three times.
        for n in 1..=3 {
            coalesced.push(counted(2, n));
        }
        // Dispatched, then re-queued to a new place (the re-queue carries the count).
        coalesced.push(counted(3, 4));
        coalesced.push(StoreOp::Requeue {
            id: MessageId::from_u128(3),
            old_seq: 3,
            seq: 10,
            expires_at: None,
            due_at: None,
            deliveries: 4,
            queue: None,
        });
        // Inserted in this run, dispatched, acknowledged: nothing at all.
        coalesced.push(insert(4));
        coalesced.push(counted(4, 1));
        coalesced.push(delete(4));
        let ops: Vec<StoreOp> = coalesced.into_changes().into_iter().collect();
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(ops[0], delete(1));
        assert_eq!(ops[1], counted(2, 3));
        assert!(matches!(ops[2], StoreOp::Requeue { seq: 10, .. }));
    }

    #[test]
    fn a_flood_is_handed_on_as_it_was_gathered() {
        // A slot costs no more than the op it holds.
        assert_eq!(
            std::mem::size_of::<Option<StoreOp>>(),
            std::mem::size_of::<StoreOp>()
        );
        let mut coalesced = Coalesced::default();
        for seq in 1..=10_000 {
            coalesced.push(insert(seq));
        }
        coalesced.push(delete(500));
        let first_chunk = coalesced.slots.chunks[0].as_ptr() as usize;
        assert_eq!(coalesced.slots.chunks.len(), 10_000usize.div_ceil(CHUNK));
        let changes = coalesced.into_changes();
        assert_eq!(changes.len(), 9_999);
        assert_eq!(
            changes.chunks[0].as_ptr() as usize,
            first_chunk,
            "handed on, not copied"
        );
        let seqs: Vec<u64> = changes
            .iter()
            .map(|op| match op {
                StoreOp::Insert(m) => m.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, (1..=10_000).filter(|&s| s != 500).collect::<Vec<_>>());
    }

    #[test]
    fn a_mostly_cancelled_run_gives_its_room_back() {
        let mut coalesced = Coalesced::default();
        for seq in 1..=100_000 {
            coalesced.push(insert(seq));
        }
        coalesced.push(delete(1_000_000));
        for seq in 1..=90_000 {
            coalesced.push(delete(seq));
        }
        assert_eq!(coalesced.len(), 10_001);
        assert!(
            coalesced.slots.slots() <= 2 * coalesced.len() + 4 * CHUNK,
            "{} slots for {} ops",
            coalesced.slots.slots(),
            coalesced.len()
        );
        // The index still finds what is left, in its new slots.
        coalesced.push(delete(95_000));
        coalesced.push(StoreOp::Counted {
            id: MessageId::from_u128(99_999),
            seq: 99_999,
            deliveries: 3,
        });
        assert_eq!(coalesced.len(), 10_000);
        let ops: Vec<StoreOp> = coalesced.into_changes().into_iter().collect();
        assert_eq!(ops[0], insert(90_001), "the order is kept");
        assert_eq!(ops.last(), Some(&delete(1_000_000)));
        assert!(!ops.contains(&insert(95_000)));
        assert!(ops
            .iter()
            .any(|op| matches!(op, StoreOp::Insert(m) if m.seq == 99_999 && m.deliveries == 3)));
        assert_eq!(ops.len(), 10_000);
    }

    #[test]
    fn changes_handed_on_keep_no_empty_chunks() {
        // A run whose ops all cancelled out still owns the chunk they were gathered in.
        let mut cancelled = Coalesced::default();
        cancelled.push(insert(1));
        cancelled.push(delete(1));
        let cancelled = cancelled.into_changes();
        assert!(cancelled.is_empty() && cancelled.room() == 1);

        let mut in_hand = Changes::default();
        in_hand.append(cancelled);
        assert_eq!(in_hand.room(), 0, "nothing kept for a run with no ops");
        let one: Changes = [insert(2)].into_iter().collect();
        in_hand.append(one);
        assert_eq!((in_hand.len(), in_hand.room()), (1, 1));

        // Runs that each left a few ops in large chunks (a failing mirror keeps them all)
        // are packed once the empty slots outnumber the ops.
        for seq in 0..20u64 {
            let mut run = Coalesced::default();
            for n in 0..(CHUNK as u64 + 1) {
                run.push(insert(1_000 * seq + n + 10));
            }
            for n in 1..(CHUNK as u64 + 1) {
                run.push(delete(1_000 * seq + n + 10));
            }
            in_hand.append(run.into_changes());
        }
        assert_eq!(in_hand.len(), 21);
        assert!(in_hand.repack_if_sparse());
        assert_eq!((in_hand.len(), in_hand.room()), (21, 21));
        assert_eq!(in_hand.iter().next(), Some(&insert(2)), "the order is kept");
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
        let ops: Vec<StoreOp> = coalesced.into_changes().into_iter().collect();
        assert_eq!(ops, vec![delete(9)]);
    }

    #[test]
    fn huge_times_are_stored_as_the_largest_integer() {
        assert_eq!(stored_time(u64::MAX), i64::MAX);
        assert_eq!(stored_time(5), 5);
    }
}
