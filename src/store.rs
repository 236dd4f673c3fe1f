//! The seam between the broker core and persistence: every change to the set of accepted
//! messages is reported to a [`Store`] as a [`StoreOp`], in the order the broker made it.
//!
//! The broker calls the store while it holds its lock, so an implementation must only record or
//! hand off the change (e.g. push it on a channel), never wait for a disk.

use crate::id::MessageId;
use crate::request::QueueName;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the wall-clock time unit of the broker and the store.
pub type Millis = u64;

/// The wall clock now, in [`Millis`].
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or_default()
}

/// A message as it is persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    pub queue: QueueName,
    pub content: Arc<[u8]>,
    pub accepted_at: Millis,
    /// `None`: never expires.
    pub expires_at: Option<Millis>,
    /// Position in the FIFO order: larger is newer.
    pub seq: u64,
}

/// One change to the set of stored messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Insert(StoredMessage),
    /// Acknowledged, dead-lettered, expired or flushed. `seq` is its current position, the
    /// key a store can find it by.
    Delete {
        id: MessageId,
        seq: u64,
    },
    /// Re-queued to the tail: it moves from `old_seq` to `seq` with a new expiry.
    Requeue {
        id: MessageId,
        old_seq: u64,
        seq: u64,
        expires_at: Option<Millis>,
    },
}

/// Where the broker reports changes.
pub trait Store: Send {
    fn apply(&mut self, op: StoreOp);
}

/// Keeps nothing: a memory-only broker.
#[derive(Debug, Default)]
pub struct NullStore;

impl Store for NullStore {
    fn apply(&mut self, _op: StoreOp) {}
}
