//! What can go wrong with the database file or the in-memory store, worded for the operator:
//! each message is the one line the server prints when it refuses to start or stops.

use std::io;
use std::path::PathBuf;

/// What went wrong with the database file or the in-memory store.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file is not an SQLite database (or its header is damaged).
    #[error("{}: not an SQLite database (or a damaged one); refusing to start, the file is left as it is", path.display())]
    NotADatabase { path: PathBuf },
    /// An SQLite database that phpmq did not write.
    #[error("{}: an SQLite database, but not a phpmq one; refusing to start, the file is left as it is", path.display())]
    NotPhpmq { path: PathBuf },
    /// Written by a newer phpmq whose format this build does not know.
    #[error("{}: written by a newer phpmq (schema version {found}, this build reads up to {supported}); refusing to start", path.display())]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// Another process (a second server, most likely) holds the file's lock.
    #[error("{}: in use by another phpmq-server{}, which holds the lock {}; refusing to start (two servers on one file lose each other's messages)", path.display(), holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(), lock.display())]
    InUse {
        path: PathBuf,
        lock: PathBuf,
        holder: Option<u32>,
    },
    /// A phpmq database with damaged contents.
    #[error("{}: the database is corrupt ({detail}); refusing to start, the file is left as it is", path.display())]
    Corrupt {
        path: PathBuf,
        detail: String,
        /// SQLite's own error, where SQLite found the damage.
        #[source]
        source: Option<rusqlite::Error>,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Sqlite {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A thread panicked while using the in-memory database.
    #[error("the in-memory store stopped after a thread panicked while using it")]
    Poisoned,
    /// A thread of the store could not be started.
    #[error("cannot start a thread: {0}")]
    Spawn(#[source] io::Error),
    /// At the end, the file is not where it should be.
    #[error("{}: no database file after the final mirror ({detail})", path.display())]
    Missing { path: PathBuf, detail: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn messages_keep_their_wording_and_errors_their_source() {
        let e = PersistError::Io {
            action: "look at",
            path: "/x/phpmq.sqlite".into(),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(e.to_string(), "cannot look at /x/phpmq.sqlite: denied");
        assert_eq!(
            e.source().map(ToString::to_string).as_deref(),
            Some("denied")
        );
        let e = PersistError::NotPhpmq {
            path: "a.db".into(),
        };
        assert_eq!(
            e.to_string(),
            "a.db: an SQLite database, but not a phpmq one; refusing to start, the file is left as it is"
        );
        assert!(e.source().is_none());
    }
}
