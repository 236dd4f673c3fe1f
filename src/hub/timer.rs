//! When the sweeper next looks at the broker's timers, and waking it sooner when the broker
//! gets a deadline before that. Any dispatch can set a lease (a send, an ack that makes room,
//! a disconnect that hands messages on), not only the requests that carry one: a lease set
//! between two sweeps must still be taken back at most 250 ms late (v1.2 rule 7), however
//! short it is.
//!
//! Both the plan and the look at the broker's next deadline happen under the broker's lock,
//! so no deadline can slip between the sweeper's last look and its plan.

use crate::store::Millis;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct SweepPlan {
    /// When the sweeper plans its next sweep; until its first, at once (any deadline wakes it).
    planned: AtomicU64,
    wake: Sender<()>,
    woken: Receiver<()>,
}

impl Default for SweepPlan {
    fn default() -> SweepPlan {
        let (wake, woken) = bounded(1);
        SweepPlan {
            planned: AtomicU64::new(Millis::MAX),
            wake,
            woken,
        }
    }
}

impl SweepPlan {
    /// With the broker's next deadline, under its lock: whether it comes before the planned
    /// sweep, and the sweeper is to be woken ([`SweepPlan::wake`], once the lock is let go).
    /// Costs a comparison when it does not.
    pub fn note(&self, next_deadline: Option<Millis>) -> bool {
        let Some(at) = next_deadline else {
            return false;
        };
        if at >= self.planned.load(Ordering::Relaxed) {
            return false;
        }
        // The sweeper sweeps at once and plans anew; meanwhile no second wake-up.
        self.planned.store(at, Ordering::Relaxed);
        true
    }

    /// Wakes the sweeper to sweep now.
    pub fn wake(&self) {
        // Full means a wake-up is already waiting.
        let _ = self.wake.try_send(());
    }

    /// The sweeper's next sweep is at `at` (under the broker's lock).
    pub fn plan(&self, at: Millis) {
        self.planned.store(at, Ordering::Relaxed);
    }

    /// Receives a message when a deadline comes before the planned sweep.
    pub fn wake_ups(&self) -> &Receiver<()> {
        &self.woken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_deadline_before_the_planned_sweep_wakes_the_sweeper_and_only_once() {
        let plan = SweepPlan::default();
        assert!(plan.note(Some(5_000)), "before the first sweep: at once");
        plan.plan(1_250);
        assert!(!plan.note(None));
        assert!(!plan.note(Some(1_250)));
        assert!(!plan.note(Some(30_000)), "none before the plan");
        assert!(plan.note(Some(1_001)));
        assert!(!plan.note(Some(1_100)), "the second is no earlier");
        assert!(plan.note(Some(1_000)), "an earlier one still does");
        plan.wake();
        plan.wake();
        assert!(plan.wake_ups().try_recv().is_ok());
        assert!(
            plan.wake_ups().try_recv().is_err(),
            "one wake-up waits at most"
        );
    }
}
