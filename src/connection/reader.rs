//! A connection's reading side: accumulates bytes from the socket, cuts them into requests,
//! and enforces the frame timeout, the idle timeout and the shutdown's hang-up.

use super::budget::{FRAME_TAIL, FREE_FRAME};
use super::{End, Limits, QUIET, READ_BUFFER};
use crate::codec::{self, Decoded, Dialect};
use crate::hub::{Incoming, Peer};
use crate::net::{Bell, Readiness, Stream};
use crate::refusal::Refusal;
use crate::request::Request;
use std::io;
use std::time::{Duration, Instant};

/// Accumulates bytes from the socket and cuts them into requests.
pub(super) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes from `start` that the frame in progress needs in all, as far as known.
    needed: usize,
    limits: Limits,
    /// When the frame in progress must be complete.
    deadline: Option<Instant>,
    /// The last read filled the buffer: more is probably waiting, so read before sleeping.
    likely_more: bool,
    /// Set when a whole frame is buffered but the batch was full.
    more_pending: bool,
    /// After the shutdown's hang-up: the bytes that had arrived by then and are still to read.
    left_at_hang_up: Option<usize>,
    /// When bytes last arrived (or the connection started): the idle timeout runs from here.
    last_arrival: Instant,
    /// What the frame in progress holds of the memory for frames under way.
    budget_share: usize,
}

/// How long a frame waiting for its share of the memory for frames under way sleeps before
/// it looks again (it is rare: a flood of large frames, or clients holding them back).
const BUDGET_RETRY: Duration = Duration::from_millis(10);

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.limits.frame_budget.give_back(self.budget_share);
    }
}

impl FrameReader {
    pub(super) fn new(limits: Limits) -> FrameReader {
        FrameReader {
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            needed: codec::HEADER_LEN,
            limits,
            deadline: None,
            likely_more: false,
            more_pending: false,
            left_at_hang_up: None,
            last_arrival: Instant::now(),
            budget_share: 0,
        }
    }

    /// Whether the frame in progress may read on: small frames always may, a large one until
    /// [`FREE_FRAME`] of it is in, and on from there once it holds a share of the budget as
    /// large as the whole frame (taken whole, or not at all). A frame only declared costs
    /// nothing; one that got its share always has the memory to complete.
    ///
    /// `needed` runs to the end of the packet under way, not of the frame: small packets may
    /// follow the content (a TTL, a delay). The share takes [`FRAME_TAIL`] more for them, and
    /// a frame that holds one never waits again, or two frames that fill the budget could each
    /// wait for the other's last bytes.
    fn has_budget(&mut self) -> bool {
        if self.needed <= FREE_FRAME || self.budget_share > 0 || self.buffered() < FREE_FRAME {
            return true;
        }
        let share = self.needed.saturating_add(FRAME_TAIL);
        if !self.limits.frame_budget.try_take(share) {
            return false;
        }
        self.budget_share = share;
        true
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn has_whole_frames_pending(&self) -> bool {
        self.more_pending
    }

    /// The next whole request in the buffer, if there is one, read in `dialect`: a request,
    /// or a refusal that leaves the connection open (v1.2 rule 4). A refusal that closes it
    /// ends the connection, with what to answer.
    pub(super) fn next_request(&mut self, dialect: Dialect) -> Result<Option<Incoming>, End> {
        self.more_pending = false;
        let buffered = &self.buf[self.start..self.end];
        let decoded = codec::decode_frame_in(buffered, self.limits.max_packet_len, dialect)
            .map_err(|error| {
                let declared = codec::peek_message_type(buffered);
                let refusal = Refusal::codec(&error, dialect, declared);
                End::Codec(error, refusal)
            })?;
        match decoded {
            Decoded::Frame(frame, used) => {
                let item = match Request::from_frame(&frame, dialect) {
                    Ok(request) => Incoming::Request(request),
                    Err(error) => {
                        let refusal = Refusal::request(&error, dialect, frame.message_type);
                        if !refusal.keep_open {
                            return Err(End::Request(error, refusal));
                        }
                        Incoming::Refused(refusal)
                    }
                };
                self.start += used;
                self.needed = codec::HEADER_LEN;
                self.deadline = None;
                self.limits
                    .frame_budget
                    .give_back(std::mem::take(&mut self.budget_share));
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                    if self.buf.len() > 4 * READ_BUFFER {
                        self.buf = vec![0; READ_BUFFER];
                    }
                } else {
                    // Assume the caller's batch may end here; it asks again if not.
                    self.more_pending = true;
                }
                Ok(Some(item))
            }
            Decoded::Incomplete { needed } => {
                self.needed = needed;
                Ok(None)
            }
        }
    }

    /// Reads once more from the socket. `Ok(false)`: the peer closed between frames. While
    /// the server is closing, a connection ends once its client has been quiet for [`QUIET`].
    /// Between frames, `idle_timeout` (if any) bounds the wait for the next one.
    pub(super) fn fill(
        &mut self,
        stream: &Stream,
        peer: &Peer,
        bell: &Bell,
        idle_timeout: Option<Duration>,
    ) -> Result<bool, End> {
        self.more_pending = false;
        loop {
            if peer.hung_up.load(std::sync::atomic::Ordering::SeqCst) {
                return self.fill_after_hang_up(stream);
            }
            let buffered = self.buffered();
            let closing = peer.is_closing();
            let now = Instant::now();
            let deadline = (buffered > 0).then(|| {
                *self
                    .deadline
                    .get_or_insert_with(|| now + self.limits.frame_timeout)
            });
            let has_budget = self.has_budget();
            if deadline.is_some_and(|d| now >= d) {
                if !has_budget {
                    return Err(End::NoFrameMemory {
                        needed: self.needed,
                        budget: self.limits.frame_budget.limit(),
                        timeout: self.limits.frame_timeout,
                    });
                }
                return Err(End::Stalled {
                    buffered,
                    timeout: self.limits.frame_timeout,
                });
            }
            let idle_deadline = idle_timeout
                .filter(|_| buffered == 0 && !closing)
                .map(|t| (t, self.last_arrival + t));
            if let Some((timeout, _)) = idle_deadline.filter(|&(_, d)| now >= d) {
                return Err(End::Idle { timeout });
            }
            if !has_budget {
                // Not a byte more of this frame until its share is free: the client's sends
                // block meanwhile, and the deadline above ends the wait. A stop cuts it short.
                let pause = deadline.map_or(BUDGET_RETRY, |d| {
                    d.saturating_duration_since(now).min(BUDGET_RETRY)
                });
                let rung = if closing { Ok(false) } else { bell.wait(pause) };
                match rung {
                    Ok(true) => peer
                        .closing
                        .store(true, std::sync::atomic::Ordering::Relaxed),
                    Ok(false) if !closing => {}
                    // Closing (the bell stays rung), or poll(2) failed: a plain pause.
                    _ => std::thread::sleep(pause),
                }
                continue;
            }
            self.make_room();
            // A busy client has more waiting: read at once. Otherwise sleep first; waking costs
            // nothing until there is data or the shutdown bell rings.
            if !self.likely_more {
                let timeout = match (closing, deadline.or(idle_deadline.map(|(_, d)| d))) {
                    (true, _) => Some(QUIET),
                    (false, Some(d)) => Some(d.saturating_duration_since(now)),
                    (false, None) => None,
                };
                let ring = (!closing).then_some(bell);
                match stream.wait_readable(ring, timeout).map_err(End::Io)? {
                    Readiness::Readable => {}
                    Readiness::Bell => {
                        peer.closing
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Readiness::TimedOut if closing && buffered == 0 => {
                        return Err(End::closing(peer))
                    }
                    // The frame or idle deadline (checked above) or, while closing, a partial
                    // frame.
                    Readiness::TimedOut => continue,
                }
            }
            let space = self.buf.len() - self.end;
            match stream.recv_now(&mut self.buf[self.end..]) {
                Ok(0) if buffered == 0 => return Ok(false),
                Ok(0) => return Err(End::CutOff { buffered }),
                Ok(n) => {
                    self.end += n;
                    self.likely_more = n == space;
                    self.last_arrival = Instant::now();
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.likely_more = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// Reads, without waiting, only what had arrived when the server hung up (its read side
    /// is shut, so on a Unix socket nothing more can come; a TCP client may still be sending,
    /// and that is not waited for). Ends with [`End::HungUp`] once it is all read.
    fn fill_after_hang_up(&mut self, stream: &Stream) -> Result<bool, End> {
        let buffered = self.buffered();
        let hung_up = End::HungUp { partial: buffered };
        let left = match self.left_at_hang_up {
            Some(left) => left,
            // Unknown (it never fails on a socket): nothing more is read.
            None => *self
                .left_at_hang_up
                .insert(stream.queued_len().unwrap_or(0)),
        };
        if left == 0 {
            return Err(hung_up);
        }
        self.make_room();
        let room = (self.buf.len() - self.end).min(left);
        loop {
            match stream.recv_now(&mut self.buf[self.end..self.end + room]) {
                Ok(0) => return Err(hung_up),
                Ok(n) => {
                    self.end += n;
                    self.left_at_hang_up = Some(left - n);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(hung_up),
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// Ensures the buffer has space after `end`. It grows with what has arrived, at most
    /// doubling at a time and never beyond what the frame in progress needs: a header that
    /// declares 16 MiB commits no memory until the bytes come.
    fn make_room(&mut self) {
        let buffered = self.buffered();
        let wanted = grown_size(self.buf.len(), buffered, self.needed);
        if self.buf.len() - self.start < wanted || self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = buffered;
        }
        if self.buf.len() < wanted {
            self.buf.resize(wanted, 0);
        }
    }
}

/// How long the buffer must be for the next read, with `buffered` bytes of a frame that needs
/// `needed` in all: the usual size while that leaves room, and once the buffer is full, twice
/// what is there, capped at what the frame needs (always at least one byte of room).
fn grown_size(len: usize, buffered: usize, needed: usize) -> usize {
    let wanted = if buffered < len {
        buffered + 1
    } else {
        buffered.saturating_mul(2).min(needed).max(buffered + 1)
    };
    wanted.max(READ_BUFFER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_grows_with_what_arrived_not_with_what_was_declared() {
        let declared = 16 << 20;
        assert_eq!(grown_size(READ_BUFFER, 40, declared), READ_BUFFER);
        assert_eq!(
            grown_size(READ_BUFFER, READ_BUFFER, declared),
            2 * READ_BUFFER
        );
        assert_eq!(grown_size(8 << 20, 8 << 20, declared), declared);
        assert_eq!(grown_size(declared, declared - 1, declared), declared);
        // A frame that needs little more than what is there gets just that.
        assert_eq!(
            grown_size(READ_BUFFER, READ_BUFFER, READ_BUFFER + 10),
            READ_BUFFER + 10
        );
    }
}
