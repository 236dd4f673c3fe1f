//! Rate limits for the log lines that clients can cause (bad frames, refused connections,
//! idle timeouts), or a failing disk on every mirror: one limiter per kind of line, so a
//! hostile or broken client cannot fill the disk with them, and no line is dropped without a
//! count saying so.
//!
//! Each kind allows a burst of [`BURST`] lines, then [`PER_SECOND`] a second. The next line of
//! that kind that gets through says how many were suppressed before it, and
//! [`report_suppressed`] (called periodically) logs the count of a kind that has gone quiet.

use log::Level;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind logged at once before the limit applies.
pub const BURST: u32 = 20;
/// Lines of one kind logged a second once the burst is spent.
pub const PER_SECOND: u32 = 2;
/// A kind's suppressed lines are reported on their own once it has logged nothing this long.
const REPORT_AFTER: Duration = Duration::from_secs(1);

/// A connection closed for bad input, a stall, a failed read and the like.
pub static CONNECTION_CLOSED: RateLimit = RateLimit::new("connection closed", Level::Warn);
/// A client that reset or dropped its connection.
pub static DISCONNECTED: RateLimit = RateLimit::new("client disconnected", Level::Info);
/// A connection refused at the connection limit.
pub static REFUSED: RateLimit = RateLimit::new("connection refused", Level::Warn);
/// An idle connection closed by the idle timeout.
pub static IDLE: RateLimit = RateLimit::new("idle connection closed", Level::Info);
/// A failed accept (out of file descriptors, say).
pub static ACCEPT_FAILED: RateLimit = RateLimit::new("accept failed", Level::Warn);

/// An ack, re-queue or touch for a message the connection does not hold (debug level, written
/// under the broker lock: a client can send them as fast as it likes).
pub static IGNORED_REQUEST: RateLimit =
    RateLimit::new("request for a message not held", Level::Debug);

/// A consume count above what a consumer may hold at once, capped.
pub static COUNT_CAPPED: RateLimit = RateLimit::new("consume count capped", Level::Info);
const ALL: [&RateLimit; 7] = [
    &CONNECTION_CLOSED,
    &DISCONNECTED,
    &REFUSED,
    &IDLE,
    &ACCEPT_FAILED,
    &IGNORED_REQUEST,
    &COUNT_CAPPED,
];

/// A token bucket for one kind of log line.
pub struct RateLimit {
    kind: &'static str,
    level: Level,
    state: Mutex<State>,
}

struct State {
    /// Lines that may be logged now, in thousandths (refilled as time passes).
    tokens_milli: u64,
    /// When the bucket was last refilled; `None` before the first line.
    refilled: Option<Instant>,
    /// When a line (or a report) of this kind was last logged.
    last_logged: Option<Instant>,
    /// Lines suppressed since the last one logged.
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(kind: &'static str, level: Level) -> RateLimit {
        RateLimit {
            kind,
            level,
            state: Mutex::new(State {
                tokens_milli: BURST as u64 * 1000,
                refilled: None,
                last_logged: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line of this kind may be logged now. If it may, returns the suffix to append
    /// to it: empty, or how many similar lines were suppressed before it.
    pub fn admit(&self) -> Option<String> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = state.refilled.map_or(Duration::ZERO, |t| now - t);
        let refill = elapsed.as_millis().saturating_mul(PER_SECOND.into());
        let full = u64::from(BURST) * 1000;
        state.tokens_milli = u64::try_from(refill)
            .unwrap_or(u64::MAX)
            .saturating_add(state.tokens_milli)
            .min(full);
        state.refilled = Some(now);
        if state.tokens_milli < 1000 {
            state.suppressed += 1;
            return None;
        }
        state.tokens_milli -= 1000;
        state.last_logged = Some(now);
        Some(suppressed_suffix(std::mem::take(&mut state.suppressed)))
    }

    /// Logs how many lines of this kind were suppressed, if any and if none of its lines
    /// has said so for [`REPORT_AFTER`] (or at once if `now` is `None`).
    fn report_at(&self, now: Option<Instant>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let quiet = match (now, state.last_logged) {
            (Some(now), Some(t)) => now.saturating_duration_since(t) >= REPORT_AFTER,
            _ => true,
        };
        if state.suppressed == 0 || !quiet {
            return;
        }
        let suppressed = std::mem::take(&mut state.suppressed);
        state.last_logged = Some(now.unwrap_or_else(Instant::now));
        drop(state);
        log::log!(
            self.level,
            "{}: {suppressed} similar line{} suppressed",
            self.kind,
            if suppressed == 1 { "" } else { "s" }
        );
    }
}

/// What a line that got through after suppressed ones ends with.
fn suppressed_suffix(suppressed: u64) -> String {
    match suppressed {
        0 => String::new(),
        1 => " (1 similar line suppressed)".to_string(),
        n => format!(" ({n} similar lines suppressed)"),
    }
}

/// Reports the suppressed lines of every kind that has gone quiet; called periodically.
pub fn report_suppressed() {
    let now = Instant::now();
    for limit in ALL {
        limit.report_at(Some(now));
    }
}

/// Reports every count of suppressed lines now, quiet or not: at exit, so none goes unsaid.
pub fn report_all_suppressed() {
    for limit in ALL {
        limit.report_at(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_few_a_second_and_the_count_of_the_rest() {
        let limit = RateLimit::new("test", Level::Warn);
        let start = Instant::now();
        let admitted = (0..1000)
            .filter(|_| limit.admit_at(start).is_some())
            .count();
        assert_eq!(admitted, BURST as usize);
        // Half a second later one more line may go, and it carries the count.
        let later = start + Duration::from_millis(500);
        assert_eq!(
            limit.admit_at(later).as_deref(),
            Some(" (980 similar lines suppressed)")
        );
        assert_eq!(limit.admit_at(later), None);
        // Quiet for a while: the report takes the count, and the bucket refills to the burst.
        limit.report_at(Some(later + REPORT_AFTER));
        assert_eq!(limit.state.lock().unwrap().suppressed, 0);
        let much_later = later + Duration::from_secs(60);
        let admitted = (0..1000)
            .filter(|_| limit.admit_at(much_later).is_some())
            .count();
        assert_eq!(admitted, BURST as usize);
    }

    #[test]
    fn a_report_waits_until_the_kind_is_quiet() {
        let limit = RateLimit::new("test", Level::Warn);
        let start = Instant::now();
        for _ in 0..=BURST {
            limit.admit_at(start);
        }
        limit.report_at(Some(start));
        assert_eq!(limit.state.lock().unwrap().suppressed, 1, "too early");
        limit.report_at(Some(start + REPORT_AFTER));
        assert_eq!(limit.state.lock().unwrap().suppressed, 0);
    }
}
