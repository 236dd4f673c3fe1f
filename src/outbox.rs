//! A connection's pending output: encoded frames of any kind that other threads hand over,
//! written in order. It knows bytes, not frames ([`crate::outgoing`] encodes them).
//!
//! The thread that decides a frame (a delivery, say) tries to write it at once with a
//! non-blocking send: no thread wake-up on the way to the client. Whatever the socket does not
//! take at once (a slow consumer, a full buffer) waits here for the connection's writer thread,
//! the only thread that ever blocks on this socket, so a slow client stalls nobody else. Frames
//! are only ever written whole and in order; several pending frames go out in one write. The
//! pending size is bounded by whoever sends: dispatches by the consumer's prefetch and the hub's
//! pause past its high-water mark; a sender of other frames must bound what it sends to a
//! client that does not read.

use std::io::{self, Write};
use std::mem;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Past this size the writer's spare buffer is not kept for reuse.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

/// A socket that can take bytes without blocking.
pub trait SendNow {
    /// Sends what fits right now; `WouldBlock` when nothing does.
    fn send_now(&self, buf: &[u8]) -> io::Result<usize>;
}

#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
    /// The writer thread has taken a batch and is writing it: new frames must queue behind it.
    writing: bool,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// A poisoned outbox counts as closed: its buffer may hold half a frame.
    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state.lock().ok()
    }

    /// Appends the frames `encode` writes and sends them at once if nothing is queued ahead of
    /// them; the rest is left to the writer thread. False if the outbox is closed.
    pub fn push(&self, socket: &impl SendNow, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let Some(mut state) = self.lock() else {
            return false;
        };
        if state.closed {
            return false;
        }
        let was_idle = state.pending.is_empty() && !state.writing;
        encode(&mut state.pending);
        if was_idle {
            self.send_pending(state, socket);
        }
        true
    }

    /// Sends what is pending, with the outbox locked and no write under way; what the socket
    /// does not take is left to the writer thread, woken for it.
    fn send_pending(&self, mut state: MutexGuard<'_, State>, socket: &impl SendNow) {
        match socket.send_now(&state.pending) {
            Ok(n) if n == state.pending.len() => {
                state.pending.clear();
                return;
            }
            Ok(n) => {
                state.pending.drain(..n);
            }
            // WouldBlock: the writer will wait for room. Any other error: its blocking write
            // meets the same error and ends the connection.
            Err(_) => {}
        }
        drop(state);
        // All: the writer thread waits on this, and so may a reader held back by the backlog
        // and a connection draining before its close; one wake-up could miss the writer.
        self.wake.notify_all();
    }

    /// Appends the frames `encode` writes without sending them: the caller sends them with
    /// [`Outbox::send_queued`] as soon as it can (once it has released a lock, say).
    /// Meanwhile, frames others push queue behind them and go out with them. False if the
    /// outbox is closed.
    pub fn queue(&self, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let Some(mut state) = self.lock() else {
            return false;
        };
        if state.closed {
            return false;
        }
        encode(&mut state.pending);
        true
    }

    /// Sends what is queued at once, as [`Outbox::push`] does, unless the writer thread is
    /// writing already (it takes the rest when it is done); what the socket does not take
    /// now is left to the writer.
    pub fn send_queued(&self, socket: &impl SendNow) {
        let Some(state) = self.lock() else {
            return;
        };
        if !state.closed && !state.writing && !state.pending.is_empty() {
            self.send_pending(state, socket);
        }
    }

    /// Bytes waiting for the writer thread (0 for a closed outbox).
    pub fn pending_len(&self) -> usize {
        self.lock().map_or(0, |state| state.pending.len())
    }

    /// Nothing pending and no write under way: nobody will write to this socket (and call
    /// back after it) until more is pushed. A closed outbox is not idle: it never writes again.
    pub fn is_idle(&self) -> bool {
        self.lock()
            .is_some_and(|state| !state.closed && !state.writing && state.pending.is_empty())
    }

    /// Whether [`Outbox::close`] was called: the connection is being torn down.
    pub fn is_closed(&self) -> bool {
        self.lock().is_none_or(|state| state.closed)
    }

    /// Stops the writer; pending bytes are dropped (their messages go back to their queues).
    pub fn close(&self) {
        if let Some(mut state) = self.lock() {
            state.closed = true;
            state.pending = Vec::new();
        }
        self.wake.notify_all();
    }

    /// Waits, at most `timeout`, until everything queued has been written to the socket: none
    /// pending, and the writer thread's last write complete (or the outbox is closed). For a
    /// connection about to close: a write cut short by the close would lose replies. Returns
    /// whether that is so.
    pub fn wait_until_written(&self, timeout: Duration) -> bool {
        let Some(state) = self.lock() else {
            return true;
        };
        let busy = |s: &mut State| (!s.pending.is_empty() || s.writing) && !s.closed;
        match self.wake.wait_timeout_while(state, timeout, busy) {
            Ok((mut state, _)) => !busy(&mut state),
            Err(_) => true,
        }
    }

    /// Waits, at most `timeout`, until at most `limit` bytes wait to be written (or the outbox
    /// is closed). Returns whether that is so. Bytes the writer thread has taken and is
    /// writing do not count: the room is for the reader to go on.
    pub fn wait_until_at_most(&self, limit: usize, timeout: Duration) -> bool {
        let Some(state) = self.lock() else {
            return true;
        };
        match self
            .wake
            .wait_timeout_while(state, timeout, |s| s.pending.len() > limit && !s.closed)
        {
            Ok((state, _)) => state.pending.len() <= limit || state.closed,
            Err(_) => true,
        }
    }

    /// Writes what the direct sends left over, until the outbox is closed or the socket fails.
    /// `after_batch` runs after each completed write, with no lock held.
    pub fn write_loop(
        &self,
        mut sink: impl Write,
        mut after_batch: impl FnMut(),
    ) -> io::Result<()> {
        let mut batch = Vec::new();
        loop {
            {
                let Some(mut state) = self.lock() else {
                    return Ok(());
                };
                while state.pending.is_empty() && !state.closed {
                    state = match self.wake.wait(state) {
                        Ok(state) => state,
                        Err(_) => return Ok(()),
                    };
                }
                if state.closed {
                    return Ok(());
                }
                mem::swap(&mut state.pending, &mut batch);
                state.writing = true;
            }
            // Room again: a reader held back by this connection's backlog may go on.
            self.wake.notify_all();
            let written = sink.write_all(&batch);
            if let Some(mut state) = self.lock() {
                state.writing = false;
            }
            // For a close that waits until everything is written.
            self.wake.notify_all();
            written?;
            after_batch();
            batch.clear();
            if batch.capacity() > KEEP_BUFFER_BYTES {
                batch = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};
    use std::thread;
    use std::time::{Duration, Instant};

    /// Records writes; `send_now` takes at most `room` bytes (0: would block).
    #[derive(Clone, Default)]
    struct Socket {
        written: Arc<StdMutex<Vec<Vec<u8>>>>,
        room: Arc<StdMutex<usize>>,
    }

    impl SendNow for Socket {
        fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
            let room = *self.room.lock().unwrap();
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = room.min(buf.len());
            self.written.lock().unwrap().push(buf[..n].to_vec());
            Ok(n)
        }
    }

    impl Write for Socket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn all_written(socket: &Socket) -> Vec<u8> {
        socket.written.lock().unwrap().concat()
    }

    fn wait_for(socket: &Socket, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while all_written(socket).len() < len {
            assert!(
                Instant::now() < deadline,
                "writer wrote {:?}",
                all_written(socket)
            );
            thread::yield_now();
        }
    }

    #[test]
    fn an_idle_outbox_sends_at_once() {
        let socket = Socket::default();
        *socket.room.lock().unwrap() = 1000;
        let outbox = Outbox::new();
        assert!(outbox.push(&socket, |b| b.extend_from_slice(b"frame")));
        assert_eq!(
            *socket.written.lock().unwrap(),
            vec![b"frame".to_vec()],
            "no writer thread needed"
        );
    }

    /// Idle: nothing for a writer to write, so no writer will call back.
    #[test]
    fn idle_means_nothing_pending_and_open() {
        let socket = Socket::default();
        let outbox = Outbox::new();
        assert!(outbox.is_idle());
        assert!(outbox.push(&socket, |b| b.extend_from_slice(b"stuck")));
        assert!(!outbox.is_idle(), "left for a writer");
        *socket.room.lock().unwrap() = 1000;
        outbox.send_queued(&socket);
        assert!(outbox.is_idle(), "sent at once");
        outbox.close();
        assert!(!outbox.is_idle(), "a closed outbox never writes again");
    }

    #[test]
    fn what_does_not_fit_goes_to_the_writer_in_order() {
        let socket = Socket::default();
        *socket.room.lock().unwrap() = 3;
        let outbox = Arc::new(Outbox::new());
        assert!(outbox.push(&socket, |b| b.extend_from_slice(b"first")));
        *socket.room.lock().unwrap() = 1000;
        // Queued behind the remainder, not sent directly past it.
        assert!(outbox.push(&socket, |b| b.extend_from_slice(b"second")));
        assert_eq!(all_written(&socket), b"fir");
        let writer = {
            let (outbox, socket) = (outbox.clone(), socket.clone());
            thread::spawn(move || outbox.write_loop(socket, || {}))
        };
        wait_for(&socket, 11);
        assert_eq!(all_written(&socket), b"firstsecond");
        outbox.close();
        writer.join().unwrap().unwrap();
        assert!(
            !outbox.push(&socket, |b| b.push(0)),
            "closed outboxes refuse frames"
        );
    }

    #[test]
    fn frames_pushed_behind_queued_ones_go_out_with_them_in_order() {
        let socket = Socket::default();
        *socket.room.lock().unwrap() = 1000;
        let outbox = Outbox::new();
        assert!(outbox.queue(|b| b.extend_from_slice(b"receipt")));
        // Another thread's dispatch, between queueing and sending: it waits its turn.
        assert!(outbox.push(&socket, |b| b.extend_from_slice(b"dispatch")));
        assert!(all_written(&socket).is_empty());
        outbox.send_queued(&socket);
        assert_eq!(
            *socket.written.lock().unwrap(),
            vec![b"receiptdispatch".to_vec()],
            "one send, in order"
        );
        outbox.send_queued(&socket);
        assert_eq!(socket.written.lock().unwrap().len(), 1, "nothing left");
        outbox.close();
        assert!(
            !outbox.queue(|b| b.push(0)),
            "closed outboxes refuse frames"
        );
    }

    #[test]
    fn a_full_socket_leaves_everything_to_the_writer() {
        let socket = Socket::default();
        let outbox = Arc::new(Outbox::new());
        outbox.push(&socket, |b| b.extend_from_slice(b"one"));
        outbox.push(&socket, |b| b.extend_from_slice(b"two"));
        assert!(all_written(&socket).is_empty());
        let writer = {
            let (outbox, socket) = (outbox.clone(), socket.clone());
            thread::spawn(move || outbox.write_loop(socket, || {}))
        };
        wait_for(&socket, 6);
        assert_eq!(
            *socket.written.lock().unwrap(),
            vec![b"onetwo".to_vec()],
            "one write for both"
        );
        outbox.close();
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn write_errors_end_the_loop() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let outbox = Outbox::new();
        outbox.push(&Socket::default(), |b| b.push(1));
        assert!(outbox.write_loop(Broken, || {}).is_err());
    }

    /// A sink whose writes block until the test lets them through.
    struct Gate {
        open: crossbeam_channel::Receiver<()>,
        written: Arc<StdMutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.open.recv_timeout(Duration::from_secs(10));
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A connection about to close waits for the writer's last write to complete, not only
    /// for the writer to take it: the close would cut it short.
    #[test]
    fn a_close_waits_for_the_write_under_way_not_only_for_it_to_be_taken() {
        let socket = Socket::default();
        let outbox = Arc::new(Outbox::new());
        outbox.push(&socket, |b| b.extend_from_slice(b"receipts"));
        let (open, gate) = crossbeam_channel::bounded(1);
        let written = Arc::new(StdMutex::new(Vec::new()));
        let writer = {
            let outbox = outbox.clone();
            let sink = Gate {
                open: gate,
                written: written.clone(),
            };
            thread::spawn(move || outbox.write_loop(sink, || {}))
        };
        // The writer takes the batch, then blocks in its write.
        let deadline = Instant::now() + Duration::from_secs(10);
        while outbox.pending_len() > 0 {
            assert!(Instant::now() < deadline, "the writer took nothing");
            thread::yield_now();
        }
        assert!(
            !outbox.wait_until_written(Duration::from_millis(50)),
            "taken is not written"
        );
        open.send(()).unwrap();
        assert!(outbox.wait_until_written(Duration::from_secs(10)));
        assert_eq!(*written.lock().unwrap(), b"receipts");
        outbox.close();
        writer.join().unwrap().unwrap();
    }
}
