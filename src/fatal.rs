//! Why the server must stop on its own: [`Fatal`], the one message that any part of it sends on
//! the fatal channel, which the server's main loop waits on beside the shutdown signals; and
//! [`BrokerDown`], what every call into the hub returns once its lock was poisoned.

use std::fmt;

/// The broker lock was poisoned by a panic: the server is going down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerDown;

impl fmt::Display for BrokerDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the broker stopped after a thread panicked while holding its lock")
    }
}

impl std::error::Error for BrokerDown {}

/// Why the server must stop on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    BrokerDown,
    /// A thread the server cannot run without ended early.
    ThreadExited(String),
    /// The in-memory store failed: what is accepted from now on could not be persisted.
    Persistence(String),
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::BrokerDown => write!(f, "{BrokerDown}"),
            Fatal::ThreadExited(name) => write!(f, "thread {name} ended unexpectedly"),
            Fatal::Persistence(e) => write!(f, "persistence failed: {e}"),
        }
    }
}
