//! A connection's pending output: frames that other threads append, and the loop that writes
//! them to the socket.
//!
//! Whoever has frames for a connection appends them here and goes on: only the connection's own
//! writer thread ever blocks on its socket, so a consumer that reads slowly stalls nobody else.
//! Everything pending is written in one `write_all`, so frames are whole and coalesced. Its size
//! is bounded by the consumer's prefetch: only dispatches are written here.

use std::io::{self, Write};
use std::mem;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Past this size the writer's spare buffer is not kept for reuse.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// A poisoned outbox counts as closed: its buffer may hold half a frame.
    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state.lock().ok()
    }

    /// Appends frames written by `encode`; returns false if the outbox is closed.
    pub fn push(&self, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let Some(mut state) = self.lock() else {
            return false;
        };
        if state.closed {
            return false;
        }
        let was_empty = state.pending.is_empty();
        encode(&mut state.pending);
        drop(state);
        if was_empty {
            self.wake.notify_one();
        }
        true
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

    /// Writes everything pushed until the outbox is closed or the socket fails.
    pub fn write_loop(&self, mut sink: impl Write) -> io::Result<()> {
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
            }
            sink.write_all(&batch)?;
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

    /// A sink that records each write call separately.
    #[derive(Clone, Default)]
    struct Writes(Arc<StdMutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_pushed_before_the_writer_runs_go_out_in_one_write() {
        let outbox = Arc::new(Outbox::new());
        assert!(outbox.push(|b| b.extend_from_slice(b"one")));
        assert!(outbox.push(|b| b.extend_from_slice(b"two")));
        let writes = Writes::default();
        let writer = {
            let (outbox, writes) = (outbox.clone(), writes.clone());
            thread::spawn(move || outbox.write_loop(writes))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while writes.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "writer wrote nothing");
            thread::yield_now();
        }
        outbox.close();
        writer.join().unwrap().unwrap();
        assert_eq!(*writes.0.lock().unwrap(), vec![b"onetwo".to_vec()]);
        assert!(!outbox.push(|b| b.push(0)), "closed outboxes refuse frames");
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
        outbox.push(|b| b.push(1));
        assert!(outbox.write_loop(Broken).is_err());
    }
}
