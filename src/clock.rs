//! The server's "now" in Unix milliseconds: the wall clock's time, advanced by the monotonic
//! clock.
//!
//! Delays, leases and TTLs are intervals, and the wall clock is a poor ruler for them: on a VM
//! it is slewed by NTP (chrony slews up to 8%, so a 100 ms delay could end after 92 ms) and can
//! be stepped. Their due times are nevertheless stored as Unix milliseconds, to survive a
//! restart. So "now" is an offset added to the monotonic clock, set from the wall clock at the
//! first call and set again only when the two drift more than [`STEP_MS`] apart: a step (a
//! clock set at boot after the server started, say) is followed, while a slew bends no
//! interval shorter than about [`STEP_MS`] divided by the slew rate.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// How far the wall clock may drift from the server's time before the server follows it.
pub const STEP_MS: u64 = 1000;

/// The monotonic clock's origin for this process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The wall clock minus the monotonic milliseconds since [`origin`]; `i64::MIN` until set.
static OFFSET: AtomicI64 = AtomicI64::new(i64::MIN);

/// The wall clock, in milliseconds since the Unix epoch (0 before it).
fn wall_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// The server's time now.
pub fn now_millis() -> Millis {
    let monotonic = origin().elapsed().as_millis() as i64;
    let kept = OFFSET.load(Ordering::Relaxed);
    let (now, offset) = follow(wall_millis(), monotonic, kept);
    // Written only when it changes: every connection thread reads it. Racing threads store
    // offsets that agree within a millisecond or two.
    if offset != kept {
        OFFSET.store(offset, Ordering::Relaxed);
    }
    now
}

/// The time at `monotonic` given `offset` (`i64::MIN`: none yet), unless the wall clock is
/// more than [`STEP_MS`] away from it: then the wall clock's. Returns the time and the offset
/// to keep.
fn follow(wall: Millis, monotonic: i64, offset: i64) -> (Millis, i64) {
    let wall_offset = wall as i64 - monotonic;
    if offset == i64::MIN || offset.abs_diff(wall_offset) > STEP_MS {
        return (wall, wall_offset);
    }
    ((monotonic + offset).max(0) as Millis, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slewed_wall_clock_bends_no_interval_but_a_step_is_followed() {
        let (start, offset) = follow(1_000_000, 0, i64::MIN);
        assert_eq!(start, 1_000_000, "the first call takes the wall clock");
        // 100 ms pass; the wall clock, slewed 8% slow, says 92.
        let (now, offset) = follow(1_000_092, 100, offset);
        assert_eq!(now, 1_000_100);
        // The slew goes on: followed once the two are more than STEP_MS apart.
        let (now, kept) = follow(1_000_000 + 11_500, 12_500, offset);
        assert_eq!((now, kept), (1_012_500, offset), "1,000 ms apart: kept");
        let (now, offset) = follow(1_000_000 + 11_499, 12_500, offset);
        assert_eq!(now, 1_011_499, "1,001 ms apart: the wall clock's");
        // A step forward (the clock set at boot), and one back.
        let (now, offset) = follow(4_600_000, 12_600, offset);
        assert_eq!(now, 4_600_000);
        let (now, _) = follow(1_000, 12_700, offset);
        assert_eq!(now, 1_000);
    }

    #[test]
    fn now_follows_the_wall_clock_within_a_step() {
        let ours = now_millis();
        let wall = wall_millis();
        assert!(ours.abs_diff(wall) <= STEP_MS, "{ours} vs {wall}");
    }
}
