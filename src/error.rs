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
use std::borrow::Cow;

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
    /// expression being checked or evaluated, src/evaluate.rs), raised again with its own
    /// SQLSTATE and hint, and a DETAIL that points into the user's text; when evaluated, the
    /// message starts with the expression's name.
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

    /// User SQL ran past its bound (src/evaluate.rs): cancelled, as `statement_timeout` cancels.
    #[error("{what} timed out after {}", duration(*after_ms))]
    TimedOut {
        what: String,
        after_ms: i32,
        /// What sets the bound (`identity_sync.capture_timeout`, a target's option).
        setting: String,
    },

    /// User SQL that would write, refused when configured, before it runs.
    #[error("{what} must not modify data")]
    WritesData { what: String, detail: String },

    /// A user query of several statements, refused when configured.
    #[error("{what} must be a single statement")]
    NotOneStatement { what: String, statements: i32 },

    /// The role of `identity_sync.run_as` cannot evaluate user SQL: it does not exist, or it is
    /// a superuser.
    #[error("role \"{role}\" of identity_sync.run_as {problem}")]
    RunAs { role: String, problem: &'static str },

    /// SPI failed where no user input is involved.
    #[error("identity_sync: {0}")]
    Spi(#[from] pgrx::spi::Error),

    /// Something no input can cause (identity_sync called its own function wrongly): a bug.
    #[error("identity_sync: {0}")]
    Internal(String),
}

/// `1500` → `1.5s`, `30000` → `30s`, `120000` → `2min`: a duration as PostgreSQL shows one.
pub fn duration(ms: i32) -> String {
    match ms {
        m if m % 60_000 == 0 && m > 0 => format!("{}min", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m if m > 1000 => format!("{}s", f64::from(m) / 1000.0),
        m => format!("{m}ms"),
    }
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
            Error::TimedOut { .. } => ERRCODE_QUERY_CANCELED,
            Error::WritesData { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            Error::NotOneStatement { .. } => ERRCODE_SYNTAX_ERROR,
            Error::RunAs { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Spi(_) | Error::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    /// The DETAIL and HINT the variant carries as fields (whoever raised it wrote them).
    fn carried(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Error::NoWorker { detail, hint }
            | Error::AffectedQuery { detail, hint, .. }
            | Error::CaptureMisinstalled { detail, hint, .. }
            | Error::SourceNotRegistered { detail, hint, .. }
            | Error::SourceMismatch { detail, hint, .. }
            | Error::KeyColumnMissing { detail, hint, .. }
            | Error::OutboxMissing { detail, hint }
            | Error::OutboxChanged { detail, hint } => (Some(detail), Some(hint)),
            Error::InUserSql { detail, hint, .. } => (Some(detail), hint.as_deref()),
            Error::WritesData { detail, .. } => (Some(detail), None),
            Error::InvalidPath { .. }
            | Error::Busy(_)
            | Error::TimedOut { .. }
            | Error::NotOneStatement { .. }
            | Error::RunAs { .. }
            | Error::Spi(_)
            | Error::Internal(_) => (None, None),
        }
    }

    /// The DETAIL of this error, if it has one.
    pub fn detail(&self) -> Option<Cow<'_, str>> {
        match self {
            Error::TimedOut { setting, .. } => Some(Cow::Owned(format!(
                "Each evaluation is bounded by {setting}."
            ))),
            Error::NotOneStatement { statements, .. } => {
                Some(Cow::Owned(format!("It holds {statements} statements.")))
            }
            _ => self
                .carried()
                .0
                .filter(|d| !d.is_empty())
                .map(Cow::Borrowed),
        }
    }

    /// The HINT of this error, if it has one.
    pub fn hint(&self) -> Option<Cow<'_, str>> {
        if let Error::TimedOut { setting, .. } = self {
            return Some(Cow::Owned(format!(
                "Make the expression faster (does its subquery have an index?), or raise {setting}."
            )));
        }
        match self {
            Error::Busy(_) => Some("Wait for the running reconciles, then try again."),
            Error::WritesData { .. } => Some(
                "identity_sync evaluates user SQL read-only: write a query or expression that only reads.",
            ),
            Error::NotOneStatement { .. } => Some("Write one query; a semicolon ends it."),
            Error::RunAs { .. } => Some(
                "identity_sync evaluates user SQL as the role named by identity_sync.run_as (postgresql.conf), which must exist and must not be a superuser; CREATE EXTENSION creates identity_sync_evaluator for it.",
            ),
            Error::InvalidPath { .. } => Some(
                "A SCIM attribute path is a name, a name with one sub-attribute, or a multi-valued element selected with eq: userName, name.givenName, emails[type eq \"work\"].value, urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department.",
            ),
            _ => self.carried().1,
        }
        .filter(|h| !h.is_empty())
        .map(Cow::Borrowed)
    }

    /// Raise this error as a PostgreSQL ERROR with its SQLSTATE, DETAIL and HINT.
    pub fn report(self) -> ! {
        let mut report = ErrorReport::new(self.code(), self.to_string(), "identity_sync");
        if let Some(detail) = self.detail() {
            report = report.set_detail(detail.into_owned());
        }
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint.into_owned());
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
            Error::TimedOut {
                what: s("mapping \"title\""),
                after_ms: 1500,
                setting: s("identity_sync.statement_timeout"),
            },
            Error::WritesData {
                what: s("affected query"),
                detail: s("It contains a DELETE."),
            },
            Error::NotOneStatement {
                what: s("affected query"),
                statements: 2,
            },
            Error::RunAs {
                role: s("postgres"),
                problem: "is a superuser",
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
