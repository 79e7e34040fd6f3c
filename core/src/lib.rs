//! pgrx-free logic of identity_sync.
