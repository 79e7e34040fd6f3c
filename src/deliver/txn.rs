//! The worker's transactions: every step it takes is a short transaction of its own.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// Run `f` in a transaction of its own. An ERROR inside is logged and the transaction rolled
/// back, so one bad tick never takes the worker down.
pub fn in_transaction<R>(what: &str, f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(|| Some(f()))
        .catch_others(|e| {
            let message = match &e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                    r.message().to_string()
                }
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            };
            log!("identity_sync: {what} failed: {message}");
            None
        })
        .execute();
    unsafe {
        if result.is_some() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    result
}
