//! pgrx-free logic of identity_sync.
//!
//! Everything here runs without PostgreSQL so that plain `cargo test -p identity_sync_core`
//! covers it quickly: text helpers for identity data ([`text`]), SCIM attribute paths and
//! resource building ([`path`]), retry timing ([`backoff`]), change thresholds ([`threshold`]),
//! Standard Webhooks signatures ([`webhook`]) and the HTTP delivery thread of the background
//! worker ([`deliver`]).

#![warn(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod backoff;
pub mod deliver;
pub mod path;
pub mod text;
pub mod threshold;
pub mod webhook;
