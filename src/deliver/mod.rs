//! Delivery: the background worker and the connectors it drives.
//!
//! - `worker`: the loop (wake on commit latch or timer → plan → deliver → record).
//! - `http`: the bridge to the SCIM and webhook connectors of `identity_sync_core`, which run
//!   on a tokio runtime in a thread of their own; only this module's main-thread side touches
//!   PostgreSQL.
//! - Table targets are applied by SQL (`identity_sync._apply_table_events`, `sql/deliver.sql`)
//!   in the worker's own transactions, so they work for local and postgres_fdw foreign tables.

pub mod http;
pub mod worker;
