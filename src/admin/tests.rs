//! Console commands against a fake backend.

use super::*;
use crate::broker::{MessageRow, MessageState};
use crate::id::MessageId;
use std::sync::Mutex;

#[derive(Default)]
struct Fake {
    queues: Vec<&'static str>,
    flushed: Mutex<Vec<String>>,
}

impl Backend for Fake {
    fn status(&self) -> Result<Status, BrokerDown> {
        Ok(Status {
            version: "9.9.9",
            uptime: Duration::from_secs(3725),
            connections: 2,
            rss_bytes: Some(12_300_000),
            totals: Totals {
                accepted: 10,
                ..Totals::default()
            },
            store: StoreUse {
                messages: 4,
                bytes: 8192,
                max_messages: Some(1000),
                max_bytes: None,
            },
            queues: self
                .queues
                .iter()
                .map(|name| QueueStatus {
                    name: QueueName::new(name.as_bytes()).unwrap(),
                    ready: 3,
                    delayed: 0,
                    in_flight: 1,
                    consumers: 1,
                    bytes: 2048,
                    oldest_ready_ms: Some(1500),
                })
                .collect(),
            storage: Some(crate::storage::StorageStatus {
                location: "phpmq.sqlite".into(),
                ..Default::default()
            }),
            now: 0,
        })
    }

    fn list_messages(&self, queue: &str, limit: usize) -> Result<Option<Listing>, BrokerDown> {
        if !self.queues.contains(&queue) {
            return Ok(None);
        }
        let rows = (0..limit.min(2))
            .map(|i| MessageRow {
                position: Some(i + 1),
                id: MessageId::from_u128(i as u128),
                size: 100,
                age_ms: 2000,
                state: MessageState::Ready,
            })
            .collect();
        Ok(Some(Listing { rows, total: 60 }))
    }

    fn queue_names(&self) -> Result<Vec<QueueName>, BrokerDown> {
        Ok(self
            .queues
            .iter()
            .map(|n| QueueName::new(n.as_bytes()).unwrap())
            .collect())
    }

    fn flush(&self, queue: &str) -> Result<Option<usize>, BrokerDown> {
        if !self.queues.contains(&queue) {
            return Ok(None);
        }
        self.flushed.lock().unwrap().push(queue.to_string());
        Ok(Some(4))
    }

    fn flush_all(&self) -> Result<(usize, usize), BrokerDown> {
        Ok((8, self.queues.len()))
    }

    fn redrive(&self, queue: &QueueName) -> Result<usize, BrokerDown> {
        Ok(if self.queues.contains(&queue.as_str()) {
            3
        } else {
            0
        })
    }

    fn stopping(&self) -> bool {
        false
    }
}

fn text(line: &str, backend: &Fake) -> String {
    match execute(line, backend) {
        Reply::Text(t) => t,
        other => panic!("{line}: {other:?}"),
    }
}

fn fake() -> Fake {
    Fake {
        queues: vec!["Orders", "orders-eu", "mail"],
        ..Fake::default()
    }
}

#[test]
fn help_lists_every_command_and_explains_one() {
    let b = fake();
    let all = text("help", &b);
    for c in COMMANDS {
        assert!(all.contains(c.usage), "help lists {}", c.usage);
    }
    assert!(text("help flush", &b).starts_with("flush QUEUE\n"));
    assert!(text("help nope", &b).starts_with("error: "));
}

#[test]
fn status_as_text_and_json() {
    let b = fake();
    let t = text("status", &b);
    assert!(
        t.starts_with("phpmq-server 9.9.9, up 1h02m, 2 connections, memory 12.3 MB\n"),
        "{t}"
    );
    assert!(
        t.contains("\nstored: 4 messages, 8.2 kB (limits: 1000 messages, no byte limit)\n"),
        "{t}"
    );
    assert!(t.contains("orders-eu"));
    assert!(t.contains("(3 queues)"));
    assert!(t.contains("delayed"), "a column for v1.2 delays");
    let j = text("STATUS json", &b);
    assert!(
        j.starts_with(r#"{"server":{"version":"9.9.9","uptime_s":3725,"connections":2"#),
        "{j}"
    );
    assert!(j.contains(r#"{"name":"mail","ready":3,"in_flight":1,"consumers":1,"bytes":2048,"oldest_ready_ms":1500,"delayed":0}"#));
    assert_eq!(j.lines().count(), 1);
}

#[test]
fn show_lists_messages_and_counts_the_rest() {
    let b = fake();
    let t = text("show mail", &b);
    assert!(t.starts_with("queue mail: 60 messages\n"), "{t}");
    assert!(t.contains("00000000000000000000000000000001"));
    assert!(t.ends_with("... and 58 more\n"));
    assert!(text("show nope", &b).starts_with("error: no queue named"));
    assert!(text("show", &b).starts_with("error: usage"));
}

#[test]
fn search_matches_wildcards_case_insensitively() {
    let b = fake();
    assert_eq!(
        text("search orders*", &b),
        "Orders\norders-eu\n(2 queues matching \"orders*\")\n"
    );
    assert_eq!(
        text("search *AI*", &b),
        "mail\n(1 queue matching \"*AI*\")\n"
    );
    assert!(wildcard_match("*", ""));
    assert!(wildcard_match("a*b*c", "aXXbYYc"));
    assert!(!wildcard_match("a*b", "ac"));
    assert!(wildcard_match("exact", "EXACT"));
    assert!(!wildcard_match("exact", "exactly"));
}

#[test]
fn flush_and_flushall() {
    let b = fake();
    assert_eq!(text("flush mail", &b), "flushed 4 messages from mail\n");
    assert_eq!(*b.flushed.lock().unwrap(), ["mail"]);
    assert!(text("flush nope", &b).starts_with("error: no queue named"));
    assert_eq!(text("flushall", &b), "flushed 8 messages from 3 queues\n");
}

#[test]
fn quit_monitor_and_unknown_commands() {
    let b = fake();
    assert_eq!(execute("quit", &b), Reply::Quit);
    assert_eq!(execute("exit\r\n", &b), Reply::Quit);
    assert_eq!(execute("monitor", &b), Reply::Monitor);
    assert_eq!(text("", &b), "");
    assert!(text("frobnicate", &b).starts_with("error: unknown command \"frobnicate\""));
    assert!(text("flushall now", &b).starts_with("error: flushall takes no argument"));
}

#[test]
fn redrive_answers_with_the_count_and_is_in_the_help() {
    let b = fake();
    assert_eq!(
        text("redrive mail", &b),
        "redrove 3 messages from mail.dead to mail\n"
    );
    assert_eq!(
        text("redrive nope", &b),
        "redrove 0 messages from nope.dead to nope\n"
    );
    assert!(text("redrive", &b).starts_with("error: usage"));
    assert_eq!(
        text("redrive mail.dead", &b),
        "error: mail.dead is a dead-letter queue; to move its messages back, redrive the \
         queue they came from\n"
    );
    assert!(text("help redrive", &b).starts_with("redrive QUEUE\n"));
}

/// Monitors share one snapshot per interval, however many ask, and list at most so many
/// queues.
#[test]
fn monitors_share_a_snapshot_and_list_a_screenful() {
    let backend = fake();
    let shared = SharedSnapshot::default();
    let looks = std::cell::Cell::new(0);
    let take = || {
        looks.set(looks.get() + 1);
        backend.status()
    };
    let first = shared.get(take).unwrap();
    let second = shared.get(|| {
        looks.set(looks.get() + 1);
        backend.status()
    });
    assert_eq!(
        looks.get(),
        1,
        "the second session reuses the first one's look"
    );
    assert!(Arc::ptr_eq(&first, &second.unwrap()));
    let screen = status_text_at_most(&first, 2);
    assert!(
        screen.contains("Orders") && screen.contains("orders-eu"),
        "{screen}"
    );
    assert!(!screen.contains("mail"), "{screen}");
    assert!(
        screen.contains("... and 1 more (status lists them all)\n(3 queues)"),
        "{screen}"
    );
    assert!(!status_text(&first).contains("more"));
}
