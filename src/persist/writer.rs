//! The store writer: the broker's [`Store`] is a channel, and this thread applies what comes
//! through it to the in-memory SQLite database, in batches of one transaction each.
//!
//! The broker never waits for SQLite: it only sends on an unbounded channel. A message that is
//! accepted and acknowledged within one batch never touches SQLite at all.

use super::PersistError;
use crate::store::{Store, StoreOp, StoredMessage};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
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

fn write_batch(shared: &Shared, ops: &[StoreOp]) -> Result<(), PersistError> {
    let mut conn = shared.memory.lock().map_err(|_| PersistError::Poisoned)?;
    let fail = |source| PersistError::Sqlite {
        action: "write to",
        path: ":memory:".into(),
        source,
    };
    let tx = conn.transaction().map_err(fail)?;
    let mut row_delta = 0i64;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO messages (seq, id, queue, content, accepted_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(fail)?;
        let mut delete = tx
            .prepare_cached("DELETE FROM messages WHERE seq = ?1")
            .map_err(fail)?;
        let mut requeue = tx
            .prepare_cached("UPDATE messages SET seq = ?1, expires_at = ?2 WHERE seq = ?3")
            .map_err(fail)?;
        for op in ops {
            match op {
                StoreOp::Insert(StoredMessage {
                    id,
                    queue,
                    content,
                    accepted_at,
                    expires_at,
                    seq,
                }) => {
                    insert
                        .execute(params![
                            *seq as i64,
                            &id.as_u128().to_be_bytes()[..],
                            queue.as_str(),
                            &content[..],
                            *accepted_at as i64,
                            expires_at.map(|at| at as i64),
                        ])
                        .map_err(fail)?;
                    row_delta += 1;
                }
                StoreOp::Delete { seq, .. } => {
                    row_delta -= delete.execute([*seq as i64]).map_err(fail)? as i64;
                }
                StoreOp::Requeue {
                    old_seq,
                    seq,
                    expires_at,
                    ..
                } => {
                    requeue
                        .execute(params![
                            *seq as i64,
                            expires_at.map(|at| at as i64),
                            *old_seq as i64
                        ])
                        .map_err(fail)?;
                }
            }
        }
    }
    tx.commit().map_err(fail)?;
    shared.rows.fetch_add(row_delta, Ordering::Relaxed);
    shared.generation.fetch_add(1, Ordering::Release);
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
    fn ops_reach_the_database() {
        let conn = Connection::open_in_memory().unwrap();
        super::super::schema::create(&conn).unwrap();
        let shared = Shared {
            memory: Mutex::new(conn),
            generation: AtomicU64::new(0),
            rows: AtomicI64::new(0),
        };
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
        let conn = shared.memory.lock().unwrap();
        let seqs: Vec<i64> = conn
            .prepare("SELECT seq FROM messages ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(seqs, [3, 4]);
        assert_eq!(shared.rows.load(Ordering::Relaxed), 2);
        assert_eq!(shared.generation.load(Ordering::Relaxed), 2);
    }
}
