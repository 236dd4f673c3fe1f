//! Memory for frames still arriving, all connections together. A connection's buffer grows
//! only as bytes arrive, but a client can send all of a large message but its last byte and
//! stall until the frame timeout: over many connections that held gigabytes, past every
//! store limit. A frame larger than [`FREE_FRAME`] takes its declared size from this budget
//! once that much of it is in, all at once, before more of it is read: the frames that got
//! their share can always complete (no two large frames each wait for the other's memory),
//! and one only declared costs nothing. One that does not fit waits, unread, until it does
//! or its frame timeout ends it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Frames up to this size need no share of the budget: a connection keeps up to this much
/// buffer anyway (four read buffers).
pub const FREE_FRAME: usize = 4 * super::READ_BUFFER;

/// What a share takes beyond the packet under way, for the small packets that may follow it
/// in the frame (every packet but the content is at most 4 KiB, each type at most once).
pub const FRAME_TAIL: usize = 64 << 10;

/// The budget's size by default (`--frame-memory`): 256 MiB.
pub const DEFAULT_FRAME_BUDGET: usize = 256 << 20;

/// The smallest budget for messages of up to `max_message_size` bytes: room for two frames
/// of the largest, so that one that fits alone never waits for ever.
pub fn least_frame_budget(max_message_size: usize) -> usize {
    max_message_size
        .saturating_add(FREE_FRAME + FRAME_TAIL)
        .saturating_mul(2)
}

#[derive(Debug)]
pub struct FrameBudget {
    limit: usize,
    used: AtomicUsize,
}

impl FrameBudget {
    pub fn with_limit(limit: usize) -> FrameBudget {
        FrameBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` if they fit, all or nothing.
    pub fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    pub fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_taken_whole_or_not_at_all_and_given_back() {
        let budget = FrameBudget::with_limit(100);
        assert!(budget.try_take(60));
        assert!(!budget.try_take(41), "not 40 of 41");
        assert!(budget.try_take(40));
        budget.give_back(60);
        assert!(budget.try_take(60));
        assert!(!budget.try_take(usize::MAX));
    }

    #[test]
    fn the_default_budget_takes_the_default_largest_message_twice() {
        assert!(
            least_frame_budget(crate::config::DEFAULT_MAX_MESSAGE_SIZE) <= DEFAULT_FRAME_BUDGET
        );
        assert_eq!(
            least_frame_budget(1000),
            2 * (1000 + FREE_FRAME + FRAME_TAIL)
        );
    }
}
