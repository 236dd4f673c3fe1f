//! Integration tests: the real `phpmq-server` and `phpmq` binaries, started on ephemeral ports
//! and Unix sockets in temp dirs, talked to over real sockets. One test binary of modules (not a
//! binary per file), so the shared helpers in `common` are compiled once.

mod common;

mod bad_input;
mod cli;
mod console;
mod docs;
mod listeners;
mod persistence;
mod semantics;
mod v12;
