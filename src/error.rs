//! The errors of our Rust-side SQL functions, with their SQLSTATEs.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

/// Everything a Rust-side `#[pg_extern]` can report to the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SCIM attribute path that does not parse; `reason` names the path already.
    #[error("{reason}")]
    InvalidPath { path: String, reason: String },
    #[error("{0}")]
    InvalidParameter(String),
}

impl Error {
    fn code(&self) -> PgSqlErrorCode {
        match self {
            Error::InvalidPath { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Error::InvalidParameter(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    /// Raise this error as a PostgreSQL ERROR with its SQLSTATE.
    pub fn report(self) -> ! {
        ErrorReport::new(self.code(), self.to_string(), "identity_sync")
            .report(pgrx::PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
