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
