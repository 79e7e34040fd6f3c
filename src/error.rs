//! The one error type of identity_sync's Rust side: every `#[pg_extern]` and the capture trigger
//! raise their errors through [`Error::report`], with a SQLSTATE of their own, a DETAIL that says
//! what happened and a HINT that says what to do. Messages are lower case without a trailing
//! period (PostgreSQL's style); DETAILs and HINTs are sentences. No user-caused error is a Rust
//! panic or `XX000`: only [`Error::Spi`] (SPI failing where no user input is involved, a bug or a
//! broken installation) is an internal error.
//!
//! The SQL side raises its own errors with `RAISE ... USING ERRCODE, DETAIL, HINT`; the README's
//! "Errors" table lists both.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Everything the Rust side reports to the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SCIM attribute path that does not parse; `reason` names the path already.
    #[error("{reason}")]
    InvalidPath { path: String, reason: String },

    /// Something only the worker does was asked for where no worker serves.
    #[error("no identity_sync worker serves this database")]
    NoWorker { detail: String, hint: String },

    /// Too many requests wait for the worker at once.
    #[error("{0}")]
    Busy(String),

    /// An error PostgreSQL raised inside SQL a user wrote (a mapping, rule, owners or login
    /// expression being checked), raised again with its own SQLSTATE and hint, and a DETAIL that
    /// points into the user's text.
    #[error("{message}")]
    InUserSql {
        code: PgSqlErrorCode,
        message: String,
        detail: String,
        hint: Option<String>,
    },

    /// The affected query of a related source failed inside its capture trigger (a table or
    /// column it reads was renamed or dropped): every write to the source fails until it is
    /// fixed. Keeps PostgreSQL's SQLSTATE (`42P01`, `42703`, …).
    #[error("affected query of related source {table} failed: {message}")]
    AffectedQuery {
        table: String,
        code: PgSqlErrorCode,
        message: String,
        detail: String,
        hint: String,
    },

    /// `identity_sync._capture` fired in a way identity_sync never installs it: by hand, before
    /// the statement, per row, on TRUNCATE, without its transition tables or with arguments it
    /// cannot read.
    #[error("trigger \"{trigger}\" on {table} is not a valid identity_sync capture trigger")]
    CaptureMisinstalled {
        trigger: String,
        table: String,
        detail: String,
        hint: String,
    },

    /// A capture trigger names a source id that is not registered.
    #[error("capture trigger \"{trigger}\" on {table} names source {source_id}, which is not registered")]
    SourceNotRegistered {
        trigger: String,
        table: String,
        source_id: i32,
        detail: String,
        hint: String,
    },

    /// A capture trigger's arguments disagree with the registration of its source (another
    /// table, role or key column).
    #[error("capture trigger \"{trigger}\" on {table} does not match the registration of source {source_id}")]
    SourceMismatch {
        trigger: String,
        table: String,
        source_id: i32,
        detail: String,
        hint: String,
    },

    /// The registered person key column of a source is gone (renamed or dropped while the event
    /// trigger that follows renames and refuses drops did not run).
    #[error("person key column \"{column}\" of source {table} does not exist")]
    KeyColumnMissing {
        column: String,
        table: String,
        detail: String,
        hint: String,
    },

    /// The change outbox `identity_sync.change` (or its sequence) is not where capture writes.
    #[error("the change outbox identity_sync.change does not exist")]
    OutboxMissing { detail: String, hint: String },

    /// The change outbox exists but its columns are not the ones capture writes.
    #[error(
        "the change outbox identity_sync.change does not have the columns identity_sync writes"
    )]
    OutboxChanged { detail: String, hint: String },

    /// SPI failed where no user input is involved.
    #[error("identity_sync: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl Error {
    /// The SQLSTATE of this error.
    pub fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::InvalidPath { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::NoWorker { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::Busy(_) => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            Error::InUserSql { code, .. } | Error::AffectedQuery { code, .. } => *code,
            Error::CaptureMisinstalled { .. } => ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            Error::SourceNotRegistered { .. } => ERRCODE_UNDEFINED_OBJECT,
            Error::SourceMismatch { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::KeyColumnMissing { .. } => ERRCODE_UNDEFINED_COLUMN,
            Error::OutboxMissing { .. } => ERRCODE_UNDEFINED_TABLE,
            Error::OutboxChanged { .. } => ERRCODE_INVALID_OBJECT_DEFINITION,
            Error::Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    /// The DETAIL of this error, if it has one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Error::NoWorker { detail, .. }
            | Error::InUserSql { detail, .. }
            | Error::AffectedQuery { detail, .. }
            | Error::CaptureMisinstalled { detail, .. }
            | Error::SourceNotRegistered { detail, .. }
            | Error::SourceMismatch { detail, .. }
            | Error::KeyColumnMissing { detail, .. }
            | Error::OutboxMissing { detail, .. }
            | Error::OutboxChanged { detail, .. } => Some(detail),
            Error::InvalidPath { .. } | Error::Busy(_) | Error::Spi(_) => None,
        }
        .filter(|d| !d.is_empty())
        .map(String::as_str)
    }

    /// The HINT of this error, if it has one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Error::NoWorker { hint, .. }
            | Error::AffectedQuery { hint, .. }
            | Error::CaptureMisinstalled { hint, .. }
            | Error::SourceNotRegistered { hint, .. }
            | Error::SourceMismatch { hint, .. }
            | Error::KeyColumnMissing { hint, .. }
            | Error::OutboxMissing { hint, .. }
            | Error::OutboxChanged { hint, .. } => Some(hint.as_str()),
            Error::InUserSql { hint, .. } => hint.as_deref(),
            Error::Busy(_) => Some("Wait for the running reconciles, then try again."),
            Error::InvalidPath { .. } => Some(
                "A SCIM attribute path is a name, a name with one sub-attribute, or a multi-valued element selected with eq: userName, name.givenName, emails[type eq \"work\"].value, urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department.",
            ),
            Error::Spi(_) => None,
        }
        .filter(|h| !h.is_empty())
    }

    /// Raise this error as a PostgreSQL ERROR with its SQLSTATE, DETAIL and HINT.
    pub fn report(self) -> ! {
        let mut report = ErrorReport::new(self.code(), self.to_string(), "identity_sync");
        if let Some(detail) = self.detail() {
            report = report.set_detail(detail.to_string());
        }
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint.to_string());
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::Error;
    use pgrx::prelude::*;
    use pgrx::PgSqlErrorCode;

    /// One of each variant, as the code raises them.
    fn every_variant() -> Vec<Error> {
        let s = |x: &str| x.to_string();
        vec![
            Error::InvalidPath {
                path: s("a..b"),
                reason: s("invalid path \"a..b\": empty name"),
            },
            Error::NoWorker {
                detail: s("D."),
                hint: s("H."),
            },
            Error::Busy(s("16 reconcile requests are waiting already")),
            Error::InUserSql {
                code: PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                message: s("column person.x does not exist"),
                detail: s("at character 8 of the expression"),
                hint: None,
            },
            Error::AffectedQuery {
                table: s("hr.dept"),
                code: PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                message: s("column \"code\" does not exist"),
                detail: s("D."),
                hint: s("H."),
            },
            Error::CaptureMisinstalled {
                trigger: s("t"),
                table: s("hr.person"),
                detail: s("D."),
                hint: s("H."),
            },
            Error::SourceNotRegistered {
                trigger: s("t"),
                table: s("hr.person"),
                source_id: 7,
                detail: s("D."),
                hint: s("H."),
            },
            Error::SourceMismatch {
                trigger: s("t"),
                table: s("hr.person"),
                source_id: 7,
                detail: s("D."),
                hint: s("H."),
            },
            Error::KeyColumnMissing {
                column: s("id"),
                table: s("hr.person"),
                detail: s("D."),
                hint: s("H."),
            },
            Error::OutboxMissing {
                detail: s("D."),
                hint: s("H."),
            },
            Error::OutboxChanged {
                detail: s("D."),
                hint: s("H."),
            },
        ]
    }

    #[pg_test]
    fn messages_are_lower_case_without_a_period_and_never_internal() {
        for e in every_variant() {
            let m = e.to_string();
            assert!(m.chars().next().is_some_and(|c| !c.is_uppercase()), "{m}");
            assert!(!m.ends_with('.'), "{m}");
            assert_ne!(
                e.code(),
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "a user-caused error must not be XX000: {m}"
            );
        }
    }

    #[pg_test]
    fn report_raises_sqlstate_detail_and_hint() {
        let caught = PgTryBuilder::new(|| {
            Error::KeyColumnMissing {
                column: "id".into(),
                table: "hr.person".into(),
                detail: "The column was renamed.".into(),
                hint: "Rename it back.".into(),
            }
            .report()
        })
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::PostgresError(r) => (
                r.sql_error_code(),
                r.message().to_string(),
                r.detail().map(str::to_string),
                r.hint().map(str::to_string),
            ),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                (ereport.sql_error_code(), "panic".into(), None, None)
            }
        })
        .execute();
        assert_eq!(caught.0, PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN);
        assert_eq!(
            caught.1,
            "person key column \"id\" of source hr.person does not exist"
        );
        assert_eq!(caught.2.as_deref(), Some("The column was renamed."));
        assert_eq!(caught.3.as_deref(), Some("Rename it back."));
    }
}
