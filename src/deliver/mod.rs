//! Delivery: the background worker and what it drives.
//!
//! - `worker`: the loop (wake on commit latch or timer → housekeeping → plan → deliver →
//!   reconcile steps), a thin scheduler over SQL functions.
//! - `txn`: every step is a short transaction of its own (`in_transaction`).
//! - `http`: the bridge to the SCIM and webhook connectors of `identity_sync_core`, which run
//!   on a tokio runtime in a thread of their own.
//! - `ledger`: the SQL side of that bridge: claiming due events as jobs and recording their
//!   outcomes; the retry policy's SQL entry points.
//! - `targets`: HTTP targets' settings read into `TargetConfig`s.
//! - `notify`: the notification step: claims due notices, hands them to the senders of
//!   `identity_sync_core::notify` (mail, chat webhooks), records what came back.
//! - Table targets are applied by SQL (`identity_sync._deliver_tables`, `sql/40_deliver.sql`)
//!   in the worker's own transactions, so they work for local and postgres_fdw foreign tables.

pub mod http;
pub mod ledger;
pub mod notify;
pub mod targets;
pub mod txn;
pub mod worker;

use pgrx::prelude::*;
use std::sync::Arc;

/// Starts a thread of `identity_sync_core` with `start`, handing it a callback that raises
/// SIGUSR1 on our own process, whose PostgreSQL handler sets our latch (async-signal-safe, and
/// the only PostgreSQL code that runs, in our main thread, since those threads block all
/// signals). None, logged, when the `thread` cannot start: its work then waits (`waiting`).
fn start_thread<T>(
    start: impl FnOnce(Arc<dyn Fn() + Send + Sync>) -> std::io::Result<T>,
    thread: &str,
    waiting: &str,
) -> Option<T> {
    let notify: Arc<dyn Fn() + Send + Sync> = Arc::new(|| unsafe {
        libc::kill(libc::getpid(), libc::SIGUSR1);
    });
    match start(notify) {
        Ok(t) => Some(t),
        Err(e) => {
            log!("identity_sync: cannot start the {thread} thread: {e}; {waiting}");
            None
        }
    }
}
