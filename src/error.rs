//! The errors of our Rust-side SQL functions, with their SQLSTATEs, DETAILs and HINTs.

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
    /// Something only the worker does was asked for where no worker serves.
    #[error("no identity_sync worker serves this database")]
    NoWorker { detail: String, hint: String },
    /// Too many requests wait for the worker at once.
    #[error("{0}")]
    Busy(String),
}

impl Error {
    fn code(&self) -> PgSqlErrorCode {
        match self {
            Error::InvalidPath { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Error::InvalidParameter(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Error::NoWorker { .. } => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::Busy(_) => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        }
    }

    /// Raise this error as a PostgreSQL ERROR with its SQLSTATE, DETAIL and HINT.
    pub fn report(self) -> ! {
        let mut report = ErrorReport::new(self.code(), self.to_string(), "identity_sync");
        match &self {
            Error::NoWorker { detail, hint } => {
                report = report.set_detail(detail.clone()).set_hint(hint.clone());
            }
            Error::Busy(_) => {
                report = report.set_hint("Wait for the running reconciles, then try again.");
            }
            _ => {}
        }
        report.report(pgrx::PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
