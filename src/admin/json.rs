//! The console's `status json` document (also `phpmq status --json`), built by serde. Its
//! shape is documented in phpmq(1) and stable: fields may be added, never renamed or removed.
//! The structs below are that shape, field for field in document order; `None` is `null`.

use super::Status;
use serde::Serialize;
use serde_json::ser::{CharEscape, CompactFormatter, Formatter, Serializer};
use std::io;

#[derive(Serialize)]
struct Document<'a> {
    server: Server<'a>,
    queues: Vec<Queue<'a>>,
}

#[derive(Serialize)]
struct Server<'a> {
    version: &'a str,
    uptime_s: u64,
    connections: usize,
    rss_bytes: Option<u64>,
    db: Option<&'a str>,
    last_mirror: Option<LastMirror>,
    mirror: Option<Mirror<'a>>,
    totals: Totals,
    /// Last, since --max-stored-messages and --max-stored-bytes.
    store: Store,
}

#[derive(Serialize)]
struct Store {
    messages: usize,
    bytes: u64,
    max_messages: Option<usize>,
    max_bytes: Option<u64>,
}

#[derive(Serialize)]
struct LastMirror {
    at_ms: u64,
    age_ms: u64,
    duration_ms: u128,
    messages: i64,
    bytes: u64,
    written_bytes: Option<u64>,
    full: bool,
}

#[derive(Serialize)]
struct Mirror<'a> {
    completed: u64,
    full_copies: u64,
    failures: u64,
    failing_for: u64,
    last_error: Option<&'a str>,
    last_error_at_ms: Option<u64>,
    written_bytes: u64,
    pending_changes: usize,
    /// Last, since it was added: a full copy failed and is due again.
    full_copy_due: bool,
}

#[derive(Serialize)]
struct Totals {
    accepted: u64,
    delivered: u64,
    acknowledged: u64,
    requeued: u64,
    expired: u64,
    dead_lettered: u64,
    flushed: u64,
    /// Since v1.2, last: moved to `<queue>.dead` by the delivery count, and back by redrive.
    moved_to_dead: u64,
    redriven: u64,
    /// Since --max-queue-length, last: sends not taken (a full queue, a stopping server).
    refused: u64,
}

#[derive(Serialize)]
struct Queue<'a> {
    name: &'a str,
    ready: usize,
    in_flight: usize,
    consumers: usize,
    bytes: u64,
    oldest_ready_ms: Option<u64>,
    /// Last, since v1.2: what scripts matched before stays byte for byte the same.
    delayed: usize,
}

impl<'a> Document<'a> {
    fn of(status: &'a Status) -> Document<'a> {
        let t = &status.totals;
        let storage = status.storage.as_ref();
        Document {
            server: Server {
                version: status.version,
                uptime_s: status.uptime.as_secs(),
                connections: status.connections,
                rss_bytes: status.rss_bytes,
                db: storage.map(|s| s.location.as_str()),
                last_mirror: storage
                    .and_then(|s| s.last_sync.as_ref())
                    .map(|m| LastMirror {
                        at_ms: m.finished_at,
                        age_ms: status.now.saturating_sub(m.finished_at),
                        duration_ms: m.duration.as_millis(),
                        messages: m.messages,
                        bytes: m.bytes,
                        written_bytes: m.written,
                        full: m.full,
                    }),
                mirror: storage.map(|s| Mirror {
                    completed: s.completed,
                    full_copies: s.full_copies,
                    failures: s.failures,
                    failing_for: s.failing_for,
                    last_error: s.last_error.as_ref().map(|(_, e)| e.as_str()),
                    last_error_at_ms: s.last_error.as_ref().map(|(at, _)| *at),
                    written_bytes: s.written,
                    pending_changes: s.pending_changes,
                    full_copy_due: s.full_copy_due,
                }),
                totals: Totals {
                    accepted: t.accepted,
                    delivered: t.delivered,
                    acknowledged: t.acknowledged,
                    requeued: t.requeued,
                    expired: t.expired,
                    dead_lettered: t.dead_lettered,
                    flushed: t.flushed,
                    moved_to_dead: t.moved_to_dead,
                    redriven: t.redriven,
                    refused: t.refused,
                },
                store: Store {
                    messages: status.store.messages,
                    bytes: status.store.bytes,
                    max_messages: status.store.max_messages,
                    max_bytes: status.store.max_bytes,
                },
            },
            queues: status
                .queues
                .iter()
                .map(|q| Queue {
                    name: q.name.as_str(),
                    ready: q.ready,
                    in_flight: q.in_flight,
                    consumers: q.consumers,
                    bytes: q.bytes,
                    oldest_ready_ms: q.oldest_ready_ms,
                    delayed: q.delayed,
                })
                .collect(),
        }
    }
}

/// serde_json's compact form, except that every control character is written as `\u00XX`,
/// as this document always wrote them (serde_json would write `\n` and the like): the bytes
/// stay what scripts have seen, not only the values.
struct Compact;

impl Formatter for Compact {
    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        let control = match escape {
            CharEscape::Backspace => 0x08,
            CharEscape::Tab => 0x09,
            CharEscape::LineFeed => 0x0a,
            CharEscape::FormFeed => 0x0c,
            CharEscape::CarriageReturn => 0x0d,
            other => return CompactFormatter.write_char_escape(writer, other),
        };
        write!(writer, "\\u{control:04x}")
    }
}

/// The machine-readable status: one JSON document on one line.
pub fn status_json(status: &Status) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    Document::of(status).serialize(&mut Serializer::with_formatter(&mut out, Compact))?;
    // serde_json writes UTF-8 only.
    String::from_utf8(out).map_err(serde::ser::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{QueueStatus, StoreUse, Totals as BrokerTotals};
    use crate::request::QueueName;
    use crate::storage::{StorageStatus, SyncReport};
    use std::time::Duration;

    fn status(storage: Option<StorageStatus>) -> Status {
        Status {
            version: "1.2.3",
            uptime: Duration::from_millis(42_900),
            connections: 3,
            rss_bytes: None,
            totals: BrokerTotals {
                accepted: 16,
                delivered: 4,
                acknowledged: 4,
                dead_lettered: 1,
                ..BrokerTotals::default()
            },
            store: StoreUse {
                messages: 12,
                bytes: 20,
                max_messages: None,
                max_bytes: Some(1 << 30),
            },
            queues: vec![QueueStatus {
                name: QueueName::new("zürich \"q\"".as_bytes()).unwrap(),
                ready: 10,
                delayed: 2,
                in_flight: 0,
                consumers: 0,
                bytes: 20,
                oldest_ready_ms: None,
            }],
            storage,
            now: 1000,
        }
    }

    #[test]
    fn memory_only_has_nulls_where_storage_would_be() {
        assert_eq!(
            status_json(&status(None)).unwrap(),
            concat!(
                r#"{"server":{"version":"1.2.3","uptime_s":42,"connections":3,"rss_bytes":null,"#,
                r#""db":null,"last_mirror":null,"mirror":null,"totals":{"accepted":16,"#,
                r#""delivered":4,"acknowledged":4,"requeued":0,"expired":0,"dead_lettered":1,"#,
                r#""flushed":0,"moved_to_dead":0,"redriven":0,"refused":0},"store":{"messages":12,"#,
                r#""bytes":20,"max_messages":null,"max_bytes":1073741824}},"#,
                r#""queues":[{"name":"zürich \"q\"","ready":10,"in_flight":0,"#,
                r#""consumers":0,"bytes":20,"oldest_ready_ms":null,"delayed":2}]}"#
            )
        );
    }

    #[test]
    fn storage_fills_db_last_mirror_and_mirror() {
        let storage = StorageStatus {
            location: "/var/lib/phpmq/a\\b.sqlite".into(),
            last_sync: Some(SyncReport {
                finished_at: 400,
                duration: Duration::from_millis(7),
                messages: 6,
                bytes: 16384,
                written: None,
                full: true,
            }),
            completed: 40,
            full_copies: 1,
            failures: 2,
            failing_for: 0,
            last_error: Some((300, "disk\nfull\t\u{1}".into())),
            written: 688_128,
            pending_changes: 5,
            full_copy_due: true,
        };
        let json = status_json(&status(Some(storage))).unwrap();
        assert!(
            json.contains(concat!(
                r#""db":"/var/lib/phpmq/a\\b.sqlite","last_mirror":{"at_ms":400,"age_ms":600,"#,
                r#""duration_ms":7,"messages":6,"bytes":16384,"written_bytes":null,"full":true},"#,
                r#""mirror":{"completed":40,"full_copies":1,"failures":2,"failing_for":0,"#,
                r#""last_error":"disk\u000afull\u0009\u0001","last_error_at_ms":300,"#,
                r#""written_bytes":688128,"pending_changes":5,"full_copy_due":true},"#,
                r#""totals":"#
            )),
            "{json}"
        );
    }
}
