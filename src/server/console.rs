//! The console's view of the running server: [`crate::admin::Backend`] over the hub, the
//! connection count and storage's status. Long listings and flushes take the broker lock a
//! chunk at a time, so the console never stalls message traffic for long.

use super::Shared;
use crate::admin::{Backend, Status};
use crate::broker::{Listing, QueueStatus, FLUSH_CHUNK, REDRIVE_CHUNK, STATUS_CHUNK};
use crate::hub::BrokerDown;
use crate::request::QueueName;
use crate::system;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Backend for Shared {
    /// A near-snapshot: the queues are looked at a chunk per lock acquisition, in name order,
    /// so a status of 100,000 queues does not stall message traffic.
    fn status(&self) -> Result<Status, BrokerDown> {
        let (totals, store, now) = self
            .hub
            .read(|broker, now| (broker.totals(), broker.store_use(), now))?;
        let mut queues: Vec<QueueStatus> = Vec::new();
        loop {
            let after = queues.last().map(|q| &q.name);
            let chunk = self
                .hub
                .read(|broker, now| broker.queue_statuses_after(after, STATUS_CHUNK, now))?;
            let done = chunk.len() < STATUS_CHUNK;
            queues.extend(chunk);
            if done {
                break;
            }
        }
        Ok(Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            connections: self.connections.live(),
            rss_bytes: system::resident_memory(),
            totals,
            store,
            queues,
            storage: self.storage.as_ref().map(|s| s.status()),
            now,
        })
    }

    /// One snapshot for every monitor at once.
    fn monitor_status(&self) -> Result<Arc<Status>, BrokerDown> {
        self.monitor_snapshot.get(|| self.status())
    }

    fn list_messages(&self, queue: &str, limit: usize) -> Result<Option<Listing>, BrokerDown> {
        self.hub
            .read(|broker, now| broker.list_messages(queue, limit, now))
    }

    /// In chunks, like [`Shared::status`].
    fn queue_names(&self) -> Result<Vec<QueueName>, BrokerDown> {
        let mut names: Vec<QueueName> = Vec::new();
        loop {
            let after = names.last();
            let chunk = self
                .hub
                .read(|broker, _| broker.queue_names_after(after, STATUS_CHUNK))?;
            let done = chunk.len() < STATUS_CHUNK;
            names.extend(chunk);
            if done {
                return Ok(names);
            }
        }
    }

    fn flush(&self, queue: &str) -> Result<Option<usize>, BrokerDown> {
        self.hub
            .modify(|broker, now, out| broker.flush(queue, now, out))
    }

    /// A chunk of queues per lock acquisition, in name order, paced by the store: a message
    /// sent meanwhile to a queue already flushed stays.
    fn flush_all(&self) -> Result<(usize, usize), BrokerDown> {
        let (mut messages, mut queues, mut after) = (0, 0, None);
        loop {
            self.hub.pace_bulk_work();
            let (m, q, last) = self.hub.modify(|broker, now, out| {
                broker.flush_after(after.as_ref(), FLUSH_CHUNK, now, out)
            })?;
            messages += m;
            queues += q;
            if q < FLUSH_CHUNK {
                // What the queues and messages took is free now: hand it back to the system.
                crate::memory::release_free_pages();
                return Ok((messages, queues));
            }
            after = last;
        }
    }

    /// In chunks of [`REDRIVE_CHUNK`] messages per lock acquisition, paced like `flush_all`.
    fn redrive(&self, queue: &QueueName) -> Result<usize, BrokerDown> {
        let mut moved = 0;
        loop {
            self.hub.pace_bulk_work();
            let n = self
                .hub
                .modify(|broker, now, out| broker.redrive_some(queue, REDRIVE_CHUNK, now, out))?;
            moved += n;
            if n < REDRIVE_CHUNK {
                return Ok(moved);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
