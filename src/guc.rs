//! Settings (GUCs). All are `identity_sync.<name>`, one dot, as in design.md.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::ffi::CString;

/// Database the background worker connects to. Changing it needs a restart.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Longest sleep of the worker between ticks when nothing wakes it, in milliseconds.
pub static NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Persons planned per planner transaction.
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(4000);
/// Default requests in flight per HTTP target (a target's `max_concurrency` overrides it).
pub static MAX_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(16);
/// Default per-request timeout in milliseconds (a target's `timeout` overrides it).
pub static HTTP_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Attempts after which a transiently failing event is marked `failed`.
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
/// How long delivered (`done`) events are kept, in minutes; 0 keeps them forever.
pub static EVENT_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 60);
/// The role user SQL (mappings, rules, affected queries, owners, the login expression, view
/// sources) is evaluated as: never a superuser (src/evaluate.rs). Only the server's
/// configuration sets it (SIGHUP), so no session can point it at a more powerful role.
pub static RUN_AS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"identity_sync_evaluator"));
/// Bound of one evaluation of user SQL, in milliseconds (a target's `statement_timeout`
/// option overrides it for that target's mappings and rules).
pub static STATEMENT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// Bound of a related source's affected query inside the HR write, in milliseconds.
pub static CAPTURE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5_000);

/// The SMTP relay of mail notifications (a rule's `smtp_url` option overrides it): `smtps://host:465`
/// (implicit TLS), `smtp://host:587?tls=required` (STARTTLS), `smtp://127.0.0.1:25` (plain, loopback only).
pub static SMTP_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The From address of mail notifications (a rule's `from` option overrides it).
pub static SMTP_FROM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"identity_sync@localhost"));

pub fn init() {
    // A postmaster-level setting can only be defined while preloading; a backend that loads
    // the library later (no shared_preload_libraries) still reads the configured value.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    GucRegistry::define_string_guc(
        c"identity_sync.database",
        c"Database in which the identity_sync worker runs.",
        c"The extension must be created in this database for provisioning to happen.",
        &DATABASE,
        if preloading {
            GucContext::Postmaster
        } else {
            GucContext::Sighup
        },
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"identity_sync.naptime",
        c"Longest time the worker sleeps when nothing wakes it.",
        c"Commits of captured changes wake the worker at once; this is the fallback for retries and date boundaries.",
        &NAPTIME,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"identity_sync.batch_size",
        c"Dirty (person, target) pairs planned, and events claimed at the most, per worker transaction.",
        c"Larger batches plan faster; smaller ones keep transactions shorter.",
        &BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"identity_sync.max_concurrency",
        c"Default number of requests in flight per HTTP target.",
        c"A target's max_concurrency option overrides it.",
        &MAX_CONCURRENCY,
        1,
        1024,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"identity_sync.http_timeout",
        c"Default timeout of one HTTP request.",
        c"A target's timeout option overrides it.",
        &HTTP_TIMEOUT,
        1,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"identity_sync.max_attempts",
        c"Attempts after which a transiently failing event is marked failed.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"identity_sync.event_retention",
        c"How long delivered events are kept before the worker removes them.",
        c"0 keeps them forever.",
        &EVENT_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_string_guc(
        c"identity_sync.run_as",
        c"Role that evaluates user SQL: mappings, rules, affected queries, owners, the login expression.",
        c"Never a superuser; grant it SELECT on the HR tables the expressions read.",
        &RUN_AS,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"identity_sync.statement_timeout",
        c"Longest one evaluation of user SQL may take.",
        c"A target's statement_timeout option overrides it for the target's mappings and rules.",
        &STATEMENT_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"identity_sync.smtp_url",
        c"SMTP relay of mail notifications.",
        c"smtps://host:465 (implicit TLS), smtp://host:587?tls=required (STARTTLS) or smtp://127.0.0.1:25 (plain, loopback only); a rule's smtp_url option overrides it.",
        &SMTP_URL,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"identity_sync.smtp_from",
        c"From address of mail notifications.",
        c"A rule's from option overrides it.",
        &SMTP_FROM,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"identity_sync.capture_timeout",
        c"Longest a related source's affected query may take inside an HR write.",
        c"Past it the HR write goes on and every person is planned again instead.",
        &CAPTURE_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// The database the worker serves.
pub fn database() -> String {
    DATABASE
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string())
}

/// A string setting's value; empty when unset.
pub fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_default()
}

/// The role named by `identity_sync.run_as`.
pub fn run_as() -> String {
    RUN_AS
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_default()
}

/// `identity_sync.statement_timeout` for SQL: the default bound of a target's evaluations.
#[pg_extern(stable, parallel_safe, name = "_statement_timeout")]
fn statement_timeout() -> Interval {
    Interval::from_micros(i64::from(STATEMENT_TIMEOUT.get()) * 1000)
}

/// `identity_sync.max_attempts` for SQL (calling it loads the library, so the setting is
/// defined with its default even in a backend that never loaded it).
#[pg_extern(stable, parallel_safe, name = "_max_attempts")]
fn max_attempts() -> i32 {
    MAX_ATTEMPTS.get()
}

/// `identity_sync.event_retention` for SQL; NULL when 0 (keep delivered events forever).
#[pg_extern(stable, parallel_safe, name = "_event_retention")]
fn event_retention() -> Option<Interval> {
    match EVENT_RETENTION.get() {
        m if m <= 0 => None,
        m => Some(Interval::from_micros(i64::from(m) * 60_000_000)),
    }
}
