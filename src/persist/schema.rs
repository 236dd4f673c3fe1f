//! The on-disk (and in-memory) schema: creating it, recognising a phpmq database, and reading
//! every stored message back.
//!
//! `messages.seq` is the table's rowid: the FIFO position is also the key, so deletes and
//! re-queues find a row without a secondary index.

use super::error::PersistError;
use crate::id::MessageId;
use crate::request::QueueName;
use crate::store::StoredRow;
use rusqlite::{Connection, ErrorCode};
use std::path::Path;

/// The schema version this build writes and the newest it reads (`PRAGMA user_version`).
/// Version 2 added `due_at` and `deliveries` (PHPMQ v1.2); a version-1 file is upgraded in
/// memory when it is loaded (`schema::upgrade`) and written in full by the first mirror.
pub const SCHEMA_VERSION: i64 = 2;
/// The `phpmq_meta` row that marks a database as ours.
const FORMAT: &str = "phpmq";

pub fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS phpmq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         INSERT OR REPLACE INTO phpmq_meta (key, value) VALUES ('format', '{FORMAT}');
         CREATE TABLE IF NOT EXISTS messages (
             seq INTEGER PRIMARY KEY,
             id BLOB NOT NULL,
             queue TEXT NOT NULL,
             content BLOB NOT NULL,
             accepted_at INTEGER NOT NULL,
             expires_at INTEGER,
             due_at INTEGER,
             deliveries INTEGER NOT NULL DEFAULT 0
         );
         PRAGMA user_version = {SCHEMA_VERSION};"
    ))
}

/// The schema version of `conn`'s database.
pub fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Brings a database this build reads up to the version it writes: a version-1 store (phpmq
/// before v1.2) gets the two new columns, empty (no delay, no dispatch counted). Adding a
/// column rewrites no row. Returns whether anything changed.
pub fn upgrade(conn: &Connection) -> rusqlite::Result<bool> {
    if version(conn)? >= SCHEMA_VERSION {
        return Ok(false);
    }
    conn.execute_batch(&format!(
        "ALTER TABLE messages ADD COLUMN due_at INTEGER;
         ALTER TABLE messages ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0;
         PRAGMA user_version = {SCHEMA_VERSION};"
    ))?;
    Ok(true)
}

/// Turns an SQLite error met while reading `path` into what it means for the operator.
pub fn classify(path: &Path, action: &'static str, error: rusqlite::Error) -> PersistError {
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => PersistError::NotADatabase {
            path: path.to_owned(),
        },
        Some(ErrorCode::DatabaseCorrupt) => PersistError::Corrupt {
            path: path.to_owned(),
            detail: error.to_string(),
            source: Some(error),
        },
        _ => PersistError::Sqlite {
            action,
            path: path.to_owned(),
            source: error,
        },
    }
}

/// Checks that `conn` is a phpmq database this build can read.
pub fn check(conn: &Connection, path: &Path) -> Result<(), PersistError> {
    let has_meta: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'phpmq_meta'",
            [],
            |row| row.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(|e| classify(path, "read", e))?;
    let format: Option<String> = if has_meta {
        conn.query_row(
            "SELECT value FROM phpmq_meta WHERE key = 'format'",
            [],
            |row| row.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(classify(path, "read", e)),
        })?
    } else {
        None
    };
    if format.as_deref() != Some(FORMAT) {
        return Err(PersistError::NotPhpmq {
            path: path.to_owned(),
        });
    }
    let version = version(conn).map_err(|e| classify(path, "read", e))?;
    if version > SCHEMA_VERSION {
        return Err(PersistError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Checks the structure of every page (`PRAGMA quick_check`): reading the rows back finds a
/// damaged table, but not damage to the free list or the pointer map, which would break the
/// store later, in the middle of its work. It reads the database in memory, so it is quick.
pub fn quick_check(conn: &Connection, path: &Path) -> Result<(), PersistError> {
    let verdict: String = conn
        .query_row("PRAGMA quick_check(1)", [], |row| row.get(0))
        .map_err(|e| classify(path, "check", e))?;
    if verdict == "ok" {
        return Ok(());
    }
    let first = verdict
        .lines()
        .find(|l| !l.starts_with("***"))
        .unwrap_or("");
    Err(PersistError::Corrupt {
        path: path.to_owned(),
        detail: first.chars().take(200).collect(),
        source: None,
    })
}

/// Hands every stored message to `restore` in FIFO order and returns how many. Reading every
/// row also walks every page of the table, so a damaged file shows up here as an error rather
/// than as lost messages later.
pub fn load(
    conn: &Connection,
    path: &Path,
    restore: &mut dyn FnMut(StoredRow<'_>),
) -> Result<usize, PersistError> {
    let read = |e| classify(path, "read", e);
    let corrupt = |detail: String| PersistError::Corrupt {
        path: path.to_owned(),
        detail,
        source: None,
    };
    let mut statement = conn
        .prepare(
            "SELECT seq, id, queue, content, accepted_at, expires_at, due_at, deliveries
             FROM messages ORDER BY seq",
        )
        .map_err(read)?;
    let mut rows = statement.query([]).map_err(read)?;
    let mut count = 0;
    // Every id, to refuse a file where two messages share one: acknowledgements find held
    // messages by id. One server run makes ascending ids, so a file is mostly ascending runs:
    // a file that is ascending throughout cannot hold a duplicate, and a merge sort of a few
    // runs is cheap, far cheaper than sorting ids in random order.
    let mut ids: Vec<u128> = Vec::new();
    let mut ascending = true;
    // Rows of one queue mostly follow each other: one name serves them all.
    let mut queue: Option<QueueName> = None;
    while let Some(row) = rows.next().map_err(read)? {
        let seq: i64 = row.get(0).map_err(read)?;
        let id_bytes = row
            .get_ref(1)
            .map_err(read)?
            .as_blob()
            .map_err(|e| corrupt(e.to_string()))?;
        let id = <[u8; 16]>::try_from(id_bytes)
            .map(|b| MessageId::from_u128(u128::from_be_bytes(b)))
            .map_err(|_| {
                corrupt(format!(
                    "message {seq} has an id of {} bytes",
                    id_bytes.len()
                ))
            })?;
        let name = row
            .get_ref(2)
            .map_err(read)?
            .as_bytes()
            .map_err(|e| corrupt(e.to_string()))?;
        if queue.as_ref().is_none_or(|q| q.as_str().as_bytes() != name) {
            queue = Some(QueueName::new(name).map_err(|e| corrupt(format!("message {seq}: {e}")))?);
        }
        let Some(queue) = &queue else {
            continue;
        };
        let content = row
            .get_ref(3)
            .map_err(read)?
            .as_blob()
            .map_err(|e| corrupt(e.to_string()))?;
        let accepted_at: i64 = row.get(4).map_err(read)?;
        let expires_at: Option<i64> = row.get(5).map_err(read)?;
        let due_at: Option<i64> = row.get(6).map_err(read)?;
        let deliveries: i64 = row.get(7).map_err(read)?;
        ascending &= ids.last().is_none_or(|&last| last < id.as_u128());
        ids.push(id.as_u128());
        restore(StoredRow {
            id,
            queue,
            content,
            accepted_at: accepted_at.max(0) as u64,
            // Bit for bit: older builds wrote expiry times beyond i64::MAX as negative
            // numbers; the broker clamps them like any other too-late expiry.
            expires_at: expires_at.map(|at| at as u64),
            due_at: due_at.map(|at| at.max(0) as u64),
            deliveries: u32::try_from(deliveries.max(0)).unwrap_or(u32::MAX),
            seq: seq.max(0) as u64,
        });
        count += 1;
    }
    drop(rows);
    if !ascending {
        // Stable: it merges the ascending runs that are there rather than starting over.
        ids.sort();
    }
    if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
        let id = MessageId::from_u128(pair[0]);
        return Err(corrupt(duplicate(conn, id).map_err(read)?));
    }
    Ok(count)
}

/// Says where the two (or more) messages with `id` are, by position (`seq`).
fn duplicate(conn: &Connection, id: MessageId) -> rusqlite::Result<String> {
    let mut statement =
        conn.prepare("SELECT seq FROM messages WHERE id = ?1 ORDER BY seq LIMIT 2")?;
    let seqs = statement
        .query_map([id.as_u128().to_be_bytes()], |row| row.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    Ok(match seqs.as_slice() {
        [first, second] => {
            format!("message id {id} appears twice, at positions {first} and {second}")
        }
        _ => format!("message id {id} appears twice"),
    })
}
