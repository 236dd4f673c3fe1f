//! Durable receipts on the hub's side (PHPMQ v1.2 rule 8): a connection that asked for them
//! has its replies queued on its [`Peer`], each with the store ticket it waits for, and written
//! out in order as storage reports its syncs. Also what keeps those queues bounded, and the
//! wait for them when a connection ends.

use super::{Hub, Peer, STORE_WAIT_RECHECK};
use crate::broker::ConnId;
use crate::id::IdMap;
use crate::outgoing::Outgoing;
use std::collections::VecDeque;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

/// Durable replies queued for one connection beyond which it is not read from...
pub const DURABLE_HIGH_WATER: usize = 65_536;
/// ...until they are down to this.
pub const DURABLE_LOW_WATER: usize = 16_384;

impl Peer {
    pub(super) fn durable_replies(&self) -> MutexGuard<'_, VecDeque<(u64, Outgoing)>> {
        // A plain queue: a panic elsewhere cannot leave it half-changed.
        self.durable_replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Hub {
    /// Queues a durable connection's replies (with their tickets), asks storage for the sync
    /// the last receipt needs, and writes out what is synced already.
    pub(super) fn queue_durable(&self, peer: &Arc<Peer>, replies: Vec<(u64, Outgoing)>) {
        let Some(durability) = &self.durability else {
            return;
        };
        if replies.is_empty() {
            return;
        }
        let wanted = replies.iter().map(|(ticket, _)| *ticket).max();
        peer.durable_replies().extend(replies);
        self.durable_waiting().insert(peer.conn, peer.clone());
        if let Some(ticket) = wanted.filter(|&t| t > 0) {
            durability.want(ticket);
        }
        self.release_replies(peer, durability.synced());
    }

    pub(super) fn durable_waiting(&self) -> MutexGuard<'_, IdMap<ConnId, Arc<Peer>>> {
        // A plain map: a panic elsewhere cannot leave it half-changed.
        self.durable_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Writes out a durable connection's replies whose tickets are synced, in order. Returns
    /// whether some still wait. The queue stays locked while the frames go into the outbox,
    /// so two threads releasing at once cannot swap them.
    fn release_replies(&self, peer: &Peer, synced: u64) -> bool {
        let mut queue = peer.durable_replies();
        let mut ready = Vec::new();
        while queue.front().is_some_and(|(ticket, _)| *ticket <= synced) {
            if let Some((_, frame)) = queue.pop_front() {
                ready.push(frame);
            }
        }
        if !ready.is_empty() {
            let dialect = peer.dialect();
            peer.outbox.push(&*peer.stream, |buffer| {
                for frame in &ready {
                    frame.encode(buffer, dialect);
                }
            });
            peer.durable_released.notify_all();
        }
        !queue.is_empty()
    }

    /// Waits while the connection has more durable replies queued than `DURABLE_HIGH_WATER`
    /// (storage is not syncing: a failing disk), until they are down to the low mark or the
    /// connection is closing. What a client makes the server hold stays bounded.
    pub fn wait_for_durable_room(&self, peer: &Peer) {
        let mut queue = peer.durable_replies();
        if queue.len() <= DURABLE_HIGH_WATER {
            return;
        }
        while queue.len() > DURABLE_LOW_WATER && !peer.is_closing() {
            queue = match peer
                .durable_released
                .wait_timeout(queue, STORE_WAIT_RECHECK)
            {
                Ok((queue, _)) => queue,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits, at most `timeout`, until the connection's durable replies are all written out
    /// (storage syncs for them at once). For a connection that is closing at a graceful stop.
    pub fn settle_durable(&self, peer: &Peer, timeout: Duration) {
        let Some(durability) = &self.durability else {
            return;
        };
        let queue = peer.durable_replies();
        let Some(&(wanted, _)) = queue.iter().max_by_key(|(ticket, _)| *ticket) else {
            return;
        };
        durability.want(wanted);
        let _ = peer
            .durable_released
            .wait_timeout_while(queue, timeout, |queue| !queue.is_empty());
    }

    /// Storage synced more changes: durable replies waiting for them go out. Called from
    /// storage's thread.
    pub fn release_durable(&self) {
        let Some(durability) = &self.durability else {
            return;
        };
        let synced = durability.synced();
        self.durable_waiting()
            .retain(|_, peer| self.release_replies(peer, synced));
    }
}
