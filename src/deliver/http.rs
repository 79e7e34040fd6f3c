//! The bridge between the worker's main thread (SPI) and the HTTP side of
//! `identity_sync_core`, which runs on a tokio runtime in a thread of its own.
//!
//! Each `pump` records the outcomes that came back, reloads target settings when they changed,
//! and claims as many due events as there is room for, each step in its own short transaction
//! (`ledger.rs` holds the SQL of each). No transaction is open while requests are on the
//! network.

use super::txn::{self, in_transaction};
use super::{ledger, targets};
use identity_sync_core::deliver::{Dispatcher, Outcome};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Events handed to the delivery thread per request a target may have in flight: the target's
/// semaphore (core's client.rs) keeps `max_concurrency` on the network, the rest wait their
/// turn there. Each round of claiming and recording costs the same few milliseconds of SQL
/// whatever its size, so rounds of twice `max_concurrency` (64 events) capped delivery alone
/// at about 5,000 events/s in bench/run.
const QUEUED_PER_REQUEST: usize = 8;

/// Targets with their settings, as loaded from `identity_sync.target` and `_secret`.
struct Loaded {
    fingerprint: String,
    /// Room per target: events in flight at most.
    capacity: usize,
}

pub struct Http {
    dispatcher: Option<Dispatcher>,
    loaded: Option<Loaded>,
    /// The attempt number of each event in flight (for the backoff of a retry).
    attempts: HashMap<i64, u32>,
    /// Outcomes not recorded yet because the worker stepped aside for DDL (`txn.rs`): recorded
    /// at the next pump, so that no event is left `sending`.
    unrecorded: Vec<Outcome>,
    /// Events that were in flight when the extension was dropped or installed anew: their
    /// outcomes belong to rows that are gone (a new event may have the same id).
    stale: HashSet<i64>,
}

impl Http {
    /// Start the delivery thread (see `super::start_thread`).
    pub fn start() -> Self {
        Http {
            dispatcher: super::start_thread(Dispatcher::start, "delivery", "HTTP targets wait"),
            loaded: None,
            attempts: HashMap::new(),
            unrecorded: Vec::new(),
            stale: HashSet::new(),
        }
    }

    /// The delivery runtime, for reconcile scans (src/reconcile.rs).
    pub fn dispatcher(&self) -> Option<&Dispatcher> {
        self.dispatcher.as_ref()
    }

    pub fn in_flight(&self) -> usize {
        self.dispatcher.as_ref().map_or(0, |d| d.in_flight())
    }

    /// Record outcomes, then hand out due events. True when anything happened.
    pub fn pump(&mut self, batch: i32) -> bool {
        let Some(dispatcher) = self.dispatcher.as_ref() else {
            return false;
        };
        let mut outcomes = std::mem::take(&mut self.unrecorded);
        outcomes.extend(dispatcher.take_outcomes());
        if !self.stale.is_empty() {
            outcomes.retain(|o| !self.stale.remove(&o.event_id()));
        }
        let recorded = !outcomes.is_empty();
        if recorded {
            let ids: Vec<i64> = outcomes.iter().map(Outcome::event_id).collect();
            let left = record_all(outcomes, &self.attempts);
            for id in ids {
                if !left.iter().any(|o| o.event_id() == id) {
                    self.attempts.remove(&id);
                }
            }
            if !left.is_empty() {
                // the worker stepped aside for DDL: kept for the next pump
                self.unrecorded = left;
                return true;
            }
        }

        let known = self.loaded.as_ref().map(|l| l.fingerprint.clone());
        if let Some(Ok(Some((fingerprint, targets)))) = in_transaction("loading targets", || {
            targets::load_targets(known.as_deref())
        }) {
            let capacity = targets
                .iter()
                .map(|t| t.max_concurrency.max(1) * QUEUED_PER_REQUEST)
                .sum::<usize>();
            dispatcher.set_targets(targets);
            self.loaded = Some(Loaded {
                fingerprint,
                capacity,
            });
        }
        let capacity = self.loaded.as_ref().map_or(0, |l| l.capacity);
        let room = capacity
            .saturating_sub(dispatcher.in_flight())
            .min(batch.max(1) as usize);
        if room == 0 {
            return recorded;
        }
        // A claim that fails is rolled back whole (nothing left `sending`) and logged; the next
        // tick claims again.
        let Some(Ok(claimed)) = in_transaction("claiming events", || ledger::claim(room)) else {
            return recorded;
        };
        if !claimed.undecodable.is_empty() {
            let left = record_all(claimed.undecodable, &self.attempts);
            self.unrecorded.extend(left);
        }
        let submitted = !claimed.jobs.is_empty();
        for job in &claimed.jobs {
            self.attempts.insert(job.event_id, job.attempt);
        }
        dispatcher.submit(claimed.jobs);
        recorded || submitted
    }

    /// The extension was dropped or installed anew: what is in flight or unrecorded belongs
    /// to rows that are gone, and the targets are loaded again.
    pub fn forget_extension(&mut self) {
        self.stale.extend(self.attempts.drain().map(|(id, _)| id));
        self.stale
            .extend(self.unrecorded.drain(..).map(|o| o.event_id()));
        self.loaded = None;
    }

    /// Stop within a second even with requests in flight; their events stay `sending` and are
    /// due again when the worker starts (at-least-once, with the event id as idempotency key).
    pub fn shutdown(&mut self) {
        if let Some(d) = self.dispatcher.take() {
            let mut left = std::mem::take(&mut self.unrecorded);
            left.extend(d.shutdown(Duration::from_millis(600)));
            left.retain(|o| !self.stale.contains(&o.event_id()));
            if !left.is_empty() {
                record_all(left, &self.attempts);
            }
        }
    }
}

/// Record a round of outcomes in one transaction; should that fail (one bad row), record them
/// one by one, so that the others are not left `sending` until the next restart. Returns what
/// is left to record because the worker stepped aside for DDL midway (`txn.rs`): the caller
/// records it later. An outcome whose recording failed otherwise is logged and given up (its
/// event is due again after a restart).
fn record_all(outcomes: Vec<Outcome>, attempts: &HashMap<i64, u32>) -> Vec<Outcome> {
    let round = in_transaction("recording delivery outcomes", || {
        ledger::record(&outcomes, attempts)
    });
    if matches!(round, Some(Ok(()))) {
        return Vec::new();
    }
    if txn::stepped_aside() {
        return outcomes;
    }
    if let Some(Err(e)) = round {
        log!(
            "identity_sync: recording {} delivery outcomes failed: {e}; recording them one by one",
            outcomes.len()
        );
    }
    let mut rest = outcomes.into_iter();
    while let Some(o) = rest.next() {
        let one = in_transaction("recording a delivery outcome", || {
            ledger::record(std::slice::from_ref(&o), attempts)
        });
        if txn::stepped_aside() {
            return std::iter::once(o).chain(rest).collect();
        }
        if let Some(Err(e)) = one {
            log!(
                "identity_sync: recording the outcome of event {} failed: {e}",
                o.event_id()
            );
        }
    }
    Vec::new()
}
