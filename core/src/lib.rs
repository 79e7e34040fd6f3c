//! pgrx-free logic of identity_sync.
//!
//! Everything here runs without PostgreSQL so that plain `cargo test -p identity_sync_core`
//! covers it quickly: text helpers for identity data ([`text`]), SCIM attribute paths and
//! resource building ([`path`]), the retry policy ([`retry`]), Standard Webhooks signatures
//! ([`webhook_sign`]) and the HTTP side of the background worker ([`deliver`]: delivery of
//! events and reconcile scans) and of notifications ([`notify`]: mail over SMTP, chat webhooks). Thresholds are SQL's alone (`sql/30_plan/40_thresholds.sql`).

#![warn(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod deliver;
pub mod notify;
pub mod path;
pub mod retry;
pub mod text;
pub mod webhook_sign;
