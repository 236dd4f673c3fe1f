//! The seam between the broker core and persistence: every change to the set of accepted
//! messages is reported to a [`Store`] as a [`StoreOp`], in the order the broker made it.
//!
//! The broker calls the store while it holds its lock, so an implementation must only record or
//! hand off the change (e.g. push it on a channel), never wait for a disk.
//!
//! A store that keeps content may also read it back ([`Store::fetch`]): the broker then keeps in
//! memory the content of only the first messages of each queue's backlog and asks for the rest
//! ahead of need. The answer comes back later, through [`crate::broker::Broker::attach`].

use crate::id::MessageId;
use crate::request::QueueName;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Milliseconds since the Unix epoch, the time unit of the broker and the store, and the
/// server's time now (see [`crate::clock`]).
pub use crate::clock::{now_millis, Millis};

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
    /// Not dispatched before this time (a v1.2 delay); `None`: ready at once.
    pub due_at: Option<Millis>,
    /// Dispatches counted so far (v1.2 rule 6), the one under way included: the broker
    /// stores the count at each dispatch ([`StoreOp::Counted`]).
    pub deliveries: u32,
}

/// A stored message as recovery reads it, borrowed from the database row: the broker copies
/// the content only if it keeps it in memory.
#[derive(Clone, Copy, Debug)]
pub struct StoredRow<'a> {
    pub id: MessageId,
    pub queue: &'a QueueName,
    pub content: &'a [u8],
    pub accepted_at: Millis,
    pub expires_at: Option<Millis>,
    pub seq: u64,
    pub due_at: Option<Millis>,
    pub deliveries: u32,
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
    /// Moved to a new position `seq` (from `old_seq`): re-queued to the tail (with a delay:
    /// `due_at`), a delayed message that became due and joined the tail, or moved to another
    /// queue (`queue`: dead-lettered to `<queue>.dead`, or redriven back). Carries the
    /// message's expiry and delivery count as they are now.
    Requeue {
        id: MessageId,
        old_seq: u64,
        seq: u64,
        expires_at: Option<Millis>,
        due_at: Option<Millis>,
        deliveries: u32,
        /// `Some`: it moves to this queue; `None`: it stays in its own.
        queue: Option<QueueName>,
    },
    /// Dispatched once more (v1.2 rule 6: the count is stored, and survives a crash): only
    /// the count changes.
    Counted {
        id: MessageId,
        seq: u64,
        deliveries: u32,
    },
}

impl StoreOp {
    /// The content bytes the op carries.
    pub fn content_len(&self) -> usize {
        match self {
            StoreOp::Insert(message) => message.content.len(),
            _ => 0,
        }
    }
}

/// A request for the content of ready messages of one queue, by `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// Identifies the request to the broker that made it.
    pub token: u64,
    pub queue: QueueName,
    /// Ascending.
    pub seqs: Vec<u64>,
}

/// The answer to a [`FetchRequest`]: the content of those of its messages that are stored.
#[derive(Debug)]
pub struct Fetched {
    pub request: FetchRequest,
    /// (seq, content), ascending by seq.
    pub contents: Vec<(u64, Arc<[u8]>)>,
}

/// Where the broker reports changes.
pub trait Store: Send {
    fn apply(&mut self, op: StoreOp);

    /// How many changes were handed to [`Store::apply`] so far: the ticket a durable receipt
    /// waits for (PHPMQ v1.2 rule 8). 0 for a store that keeps nothing durable.
    fn submitted(&self) -> u64 {
        0
    }

    /// Whether [`Store::fetch`] works, i.e. whether the broker may let go of content the store
    /// has. The answer must not change.
    fn can_fetch(&self) -> bool {
        false
    }

    /// Asks for content; answered after every change applied before it. Only called when
    /// [`Store::can_fetch`] says so.
    fn fetch(&mut self, _request: FetchRequest) {}
}

/// Keeps nothing: a memory-only broker.
#[derive(Debug, Default)]
pub struct NullStore;

impl Store for NullStore {
    fn apply(&mut self, _op: StoreOp) {}
}

/// Changes handed to a store that it has not applied yet, and the content bytes they carry.
/// Producers are held back while it is high ([`Backlog::is_high`]), so a store that cannot keep
/// up slows them down instead of letting memory grow without bound.
///
/// A held-back producer sleeps on a condition variable ([`Backlog::wait_until_low`]) that its
/// owner's [`Backlog::remove`] or [`Backlog::set`] signals once the backlog is down to its low
/// mark. The counts stay atomics: [`Backlog::add`] runs under the broker's lock for every
/// change and never takes the mutex; the others take it only while someone waits.
#[derive(Debug)]
pub struct Backlog {
    changes: AtomicUsize,
    bytes: AtomicUsize,
    /// Changes at which producers wait...
    high_changes: usize,
    /// ...or bytes of content.
    high_bytes: usize,
    /// Producers inside [`Backlog::wait_until_low`]: signalling costs a mutex only then.
    waiting: AtomicUsize,
    /// Guards nothing but the check-then-sleep of a waiter against a signal in between.
    gate: Mutex<()>,
    low: Condvar,
}

impl Default for Backlog {
    /// The marks of the store writer's queue: 65,536 changes or 32 MiB.
    fn default() -> Backlog {
        Backlog::new(65_536, 32 << 20)
    }
}

impl Backlog {
    pub fn new(high_changes: usize, high_bytes: usize) -> Backlog {
        Backlog {
            changes: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            high_changes,
            high_bytes,
            waiting: AtomicUsize::new(0),
            gate: Mutex::new(()),
            low: Condvar::new(),
        }
    }

    /// Counts one more change carrying `bytes`; returns the changes pending now.
    pub fn add(&self, bytes: usize) -> usize {
        // Only ever raises the backlog: nobody to wake.
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.changes.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn remove(&self, changes: usize, bytes: usize) {
        self.changes.fetch_sub(changes, Ordering::SeqCst);
        self.bytes.fetch_sub(bytes, Ordering::SeqCst);
        self.signal_if_low();
    }

    /// The changes pending now.
    pub fn changes(&self) -> usize {
        self.changes.load(Ordering::SeqCst)
    }

    /// Says what is pending now (for an owner that counts it itself).
    pub fn set(&self, changes: usize, bytes: usize) {
        self.changes.store(changes, Ordering::SeqCst);
        self.bytes.store(bytes, Ordering::SeqCst);
        self.signal_if_low();
    }

    /// Past the high-water mark: producers should wait.
    pub fn is_high(&self) -> bool {
        self.changes.load(Ordering::Relaxed) > self.high_changes
            || self.bytes.load(Ordering::Relaxed) > self.high_bytes
    }

    /// Past twice the high-water mark: even a light producer waits ([`Backlog::is_high`] holds
    /// back the heavy ones).
    pub fn is_over_ceiling(&self) -> bool {
        self.changes.load(Ordering::Relaxed) > self.high_changes.saturating_mul(2)
            || self.bytes.load(Ordering::Relaxed) > self.high_bytes.saturating_mul(2)
    }

    /// Down to half the high-water mark: waiting producers may go on.
    pub fn is_low(&self) -> bool {
        self.changes.load(Ordering::SeqCst) <= self.high_changes / 2
            && self.bytes.load(Ordering::SeqCst) <= self.high_bytes / 2
    }

    /// Past half the high-water mark: time for its owner to catch up, before producers have to
    /// wait.
    pub fn is_rising(&self) -> bool {
        self.changes.load(Ordering::Relaxed) > self.high_changes / 2
            || self.bytes.load(Ordering::Relaxed) > self.high_bytes / 2
    }

    /// Sleeps until the backlog is low (true) or `give_up` says to stop waiting (false).
    /// `give_up` is asked before each sleep, after each wake-up ([`Backlog::wake_all`] wakes
    /// every waiter to ask it) and at least every `recheck`, for reasons nobody signals.
    pub fn wait_until_low(&self, recheck: Duration, give_up: impl Fn() -> bool) -> bool {
        // SeqCst with the counts: either the owner's signal sees this waiter, or this waiter
        // sees the owner's new counts (the check below, under the gate, before sleeping).
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate();
        let low = loop {
            if self.is_low() {
                break true;
            }
            if give_up() {
                break false;
            }
            gate = match self.low.wait_timeout(gate, recheck) {
                Ok((gate, _)) => gate,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        drop(gate);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        low
    }

    /// Wakes every waiter to ask its `give_up` again (e.g. the server began shutting down).
    pub fn wake_all(&self) {
        // Taking the gate orders this after a waiter's check: it is asleep or will see why.
        drop(self.gate());
        self.low.notify_all();
    }

    fn signal_if_low(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 && self.is_low() {
            self.wake_all();
        }
    }

    fn gate(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data: a panic while holding it leaves nothing half-changed.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_high_past_either_mark_and_low_again_at_half() {
        let backlog = Backlog::default();
        assert!(!backlog.is_high() && backlog.is_low());
        for _ in 0..=65_536 {
            backlog.add(0);
        }
        assert!(backlog.is_high() && !backlog.is_low());
        backlog.remove(65_536 / 2, 0);
        assert!(!backlog.is_high() && !backlog.is_low(), "between the marks");
        backlog.remove(1, 0);
        assert!(backlog.is_low());
        backlog.add(32 << 20);
        assert!(!backlog.is_high() && !backlog.is_low());
        backlog.add(1);
        assert!(backlog.is_high(), "bytes alone count");
    }

    /// Long enough that only a signal can wake the waiter within the test's bound.
    const NEVER: Duration = Duration::from_secs(3600);

    fn high() -> Backlog {
        let backlog = Backlog::new(10, 1 << 20);
        backlog.set(11, 0);
        assert!(backlog.is_high());
        backlog
    }

    /// Returns once a thread is inside `wait_until_low`.
    fn until_waiting(backlog: &Backlog) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while backlog.waiting.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never started"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_waiter_is_woken_when_the_backlog_falls_to_its_low_mark() {
        let backlog = high();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _ = done.send(backlog.wait_until_low(NEVER, || false));
            });
            // Once it waits, only a signal can wake it in time (it re-checks hourly).
            until_waiting(&backlog);
            backlog.remove(1, 0);
            assert!(
                finished.recv_timeout(Duration::from_millis(50)).is_err(),
                "went on between the marks"
            );
            backlog.remove(5, 0); // 5 changes: half the high mark
            let low = finished
                .recv_timeout(Duration::from_secs(10))
                .expect("not woken by the low mark");
            assert!(low);
        });
    }

    #[test]
    fn a_set_to_low_and_a_wake_all_wake_waiters() {
        let backlog = high();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _ = done.send(backlog.wait_until_low(NEVER, || stop.load(Ordering::SeqCst)));
            });
            stop.store(true, Ordering::SeqCst);
            backlog.wake_all();
            let low = finished
                .recv_timeout(Duration::from_secs(10))
                .expect("not woken to give up");
            assert!(!low, "gave up, the backlog is still high");
        });
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _ = done.send(backlog.wait_until_low(NEVER, || false));
            });
            until_waiting(&backlog);
            backlog.set(0, 0);
            let low = finished
                .recv_timeout(Duration::from_secs(10))
                .expect("not woken by set");
            assert!(low);
        });
    }
}
