//! Turning a [`Status`] or a [`Listing`] into text for people (the JSON for programs is in
//! `json`).

use super::{names, Status};
use crate::broker::{Listing, MessageState};
use std::fmt::Write;
use std::time::Duration;
use unicode_width::UnicodeWidthStr;

/// `1.5 kB`, `25.6 MB`: decimal units, as `ls -lh --si` would.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `850 ms`, `12.3 s`, `5m07s`, `3h02m`, `2d04h`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms} ms"),
        0..=59 => format!("{:.1} s", ms as f64 / 1000.0),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn duration(d: Duration) -> String {
    age(d.as_millis() as u64)
}

/// The human-readable status: the server, then a table of queues.
pub fn status_text(status: &Status) -> String {
    status_text_at_most(status, usize::MAX)
}

/// [`status_text`] with the first `rows` queues only (by name), and a line for the rest.
pub fn status_text_at_most(status: &Status, rows: usize) -> String {
    let mut out = String::new();
    let t = &status.totals;
    let _ = writeln!(
        out,
        "phpmq-server {}, up {}, {} connection{}, memory {}",
        status.version,
        duration(status.uptime),
        status.connections,
        if status.connections == 1 { "" } else { "s" },
        status
            .rss_bytes
            .map(bytes)
            .unwrap_or_else(|| "unknown".into())
    );
    let _ = writeln!(
        out,
        "messages: {} accepted, {} delivered, {} acknowledged, {} requeued, {} expired, {} dead-lettered, {} flushed",
        t.accepted, t.delivered, t.acknowledged, t.requeued, t.expired, t.dead_lettered, t.flushed
    );
    let store = &status.store;
    let _ = write!(
        out,
        "stored: {} message{}, {}",
        store.messages,
        if store.messages == 1 { "" } else { "s" },
        bytes(store.bytes)
    );
    match (store.max_messages, store.max_bytes) {
        (None, None) => out.push('\n'),
        (messages, content) => {
            let messages =
                messages.map_or("no message limit".into(), |n| counted(n as u64, "message"));
            let content = content.map_or("no byte limit".into(), bytes);
            let _ = writeln!(out, " (limits: {messages}, {content})");
        }
    }
    // Only once it happened: a server without a maximum delivery count never shows it.
    if t.moved_to_dead > 0 || t.redriven > 0 {
        let _ = writeln!(
            out,
            "dead letters: {} moved to a .dead queue at their last allowed delivery, {} redriven",
            t.moved_to_dead, t.redriven
        );
    }
    // Only once it happened: a server without a queue limit refuses sends only as it stops.
    if t.refused > 0 {
        let _ = writeln!(
            out,
            "refused sends: {} (a full queue or store, or sent as the server stopped)",
            t.refused
        );
    }
    let storage = status.storage.as_ref();
    match (storage, storage.and_then(|s| s.last_sync.as_ref())) {
        (None, _) => out.push_str("persistence: none (memory only)\n"),
        (Some(storage), None) => {
            let _ = writeln!(out, "last mirror: none yet, to {}", storage.location);
        }
        (Some(storage), Some(m)) => {
            let _ = writeln!(
                out,
                "last mirror: {} ago ({}), took {}, {} messages, {} written, file {}, to {}",
                age(status.now.saturating_sub(m.finished_at)),
                if m.full { "full copy" } else { "changes" },
                duration(m.duration),
                m.messages,
                m.written.map_or_else(|| "?".into(), bytes),
                bytes(m.bytes),
                storage.location
            );
        }
    }
    if let Some(health) = &status.storage {
        if health.full_copy_due && health.failing_for > 0 {
            out.push_str(
                "mirror: the file is to be written in full and misses every change since the \
                 last mirror that completed\n",
            );
        } else if health.pending_changes > 0 {
            let _ = writeln!(
                out,
                "mirror: {} changes not in the file yet",
                health.pending_changes
            );
        }
        if let Some((at, error)) = &health.last_error {
            let _ = writeln!(
                out,
                "mirror failures: {} ({} in a row now), the last {} ago: {error}",
                health.failures,
                health.failing_for,
                age(status.now.saturating_sub(*at)),
            );
        }
    }
    // Measured in terminal columns, not characters: a CJK name takes two per character.
    let shown: Vec<_> = status
        .queues
        .iter()
        .take(rows)
        .map(|q| names::display(q.name.as_str()))
        .collect();
    let width = shown
        .iter()
        .map(|name| name.width())
        .max()
        .unwrap_or(0)
        .clamp(5, 40);
    let _ = writeln!(
        out,
        "{:<width$}  {:>9}  {:>9}  {:>9}  {:>10}  {:>8}  {:>9}",
        "queue", "ready", "in flight", "consumers", "bytes", "oldest", "delayed"
    );
    // `delayed` (v1.2) comes last: the columns before it stay where scripts found them.
    for (q, name) in status.queues.iter().zip(&shown) {
        let padding = width.saturating_sub(name.width());
        let _ = writeln!(
            out,
            "{name}{:padding$}  {:>9}  {:>9}  {:>9}  {:>10}  {:>8}  {:>9}",
            "",
            q.ready,
            q.in_flight,
            q.consumers,
            bytes(q.bytes),
            q.oldest_ready_ms.map(age).unwrap_or_else(|| "-".into()),
            q.delayed
        );
    }
    let rest = status.queues.len() - shown.len();
    if rest > 0 {
        let _ = writeln!(out, "... and {rest} more (status lists them all)");
    }
    let _ = writeln!(
        out,
        "({} queue{})",
        status.queues.len(),
        if status.queues.len() == 1 { "" } else { "s" }
    );
    out
}

/// The messages of one queue.
pub fn listing_text(queue: &str, listing: &Listing) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "queue {}: {} message{}",
        names::display(queue),
        listing.total,
        if listing.total == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "{:>8}  {:<32}  {:>10}  {:>8}  state",
        "position", "id", "size", "age"
    );
    for row in &listing.rows {
        let _ = writeln!(
            out,
            "{:>8}  {:<32}  {:>10}  {:>8}  {}",
            row.position.map_or_else(|| "-".into(), |p| p.to_string()),
            row.id,
            bytes(row.size as u64),
            age(row.age_ms),
            match row.state {
                MessageState::Ready => "ready",
                MessageState::Delayed => "delayed",
                MessageState::InFlight => "in flight",
            }
        );
    }
    let rest = listing.total.saturating_sub(listing.rows.len());
    if rest > 0 {
        let _ = writeln!(out, "... and {rest} more");
    }
    out
}

/// "1 message", "2 messages": a count with its noun, plural when it is not one.
pub fn counted(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(25_600), "25.6 kB");
        assert_eq!(bytes(315_887_616), "315.9 MB");
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_345), "12.3 s");
        assert_eq!(age(307_000), "5m07s");
        assert_eq!(age(3 * 3_600_000 + 120_000), "3h02m");
        assert_eq!(age(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
    }
}
