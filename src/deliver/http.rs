//! The bridge between the worker's main thread (SPI) and the HTTP side of
//! `identity_sync_core`, which runs on a tokio runtime in a thread of its own.
//!
//! Each `pump` records the outcomes that came back, reloads target settings when they changed,
//! and claims as many due events as there is room for, each step in its own short transaction
//! (`ledger.rs` holds the SQL of each). No transaction is open while requests are on the
//! network.

use super::txn::in_transaction;
use super::{ledger, targets};
use identity_sync_core::deliver::{Dispatcher, Outcome};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
}

impl Http {
    /// Start the delivery thread. Its notify callback raises SIGUSR1 on our own process, whose
    /// PostgreSQL handler sets our latch (async-signal-safe, and the only PostgreSQL code that
    /// runs, in our main thread, since the delivery threads block all signals).
    pub fn start() -> Self {
        let notify: Arc<dyn Fn() + Send + Sync> = Arc::new(|| unsafe {
            libc::kill(libc::getpid(), libc::SIGUSR1);
        });
        let dispatcher = match Dispatcher::start(notify) {
            Ok(d) => Some(d),
            Err(e) => {
                log!("identity_sync: cannot start the delivery thread: {e}; HTTP targets wait");
                None
            }
        };
        Http {
            dispatcher,
            loaded: None,
            attempts: HashMap::new(),
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
        let outcomes = dispatcher.take_outcomes();
        let recorded = !outcomes.is_empty();
        if recorded {
            record_all(&outcomes, &self.attempts);
            for o in &outcomes {
                self.attempts.remove(&o.event_id());
            }
        }

        let known = self.loaded.as_ref().map(|l| l.fingerprint.clone());
        if let Some(Ok(Some((fingerprint, targets)))) = in_transaction("loading targets", || {
            targets::load_targets(known.as_deref())
        }) {
            let capacity = targets
                .iter()
                .map(|t| t.max_concurrency.max(1) * 2)
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
            record_all(&claimed.undecodable, &self.attempts);
        }
        let submitted = !claimed.jobs.is_empty();
        for job in &claimed.jobs {
            self.attempts.insert(job.event_id, job.attempt);
        }
        dispatcher.submit(claimed.jobs);
        recorded || submitted
    }

    /// Stop within a second even with requests in flight; their events stay `sending` and are
    /// due again when the worker starts (at-least-once, with the event id as idempotency key).
    pub fn shutdown(&mut self) {
        if let Some(d) = self.dispatcher.take() {
            let left = d.shutdown(Duration::from_millis(600));
            if !left.is_empty() {
                record_all(&left, &self.attempts);
            }
        }
    }
}

/// Record a round of outcomes in one transaction; should that fail (one bad row), record them
/// one by one, so that the others are not left `sending` until the next restart.
fn record_all(outcomes: &[Outcome], attempts: &HashMap<i64, u32>) {
    let round = in_transaction("recording delivery outcomes", || {
        ledger::record(outcomes, attempts)
    });
    if matches!(round, Some(Ok(()))) {
        return;
    }
    if let Some(Err(e)) = round {
        log!(
            "identity_sync: recording {} delivery outcomes failed: {e}; recording them one by one",
            outcomes.len()
        );
    }
    for o in outcomes {
        let one = in_transaction("recording a delivery outcome", || {
            ledger::record(std::slice::from_ref(o), attempts)
        });
        if let Some(Err(e)) = one {
            log!(
                "identity_sync: recording the outcome of event {} failed: {e}",
                o.event_id()
            );
        }
    }
}
