//! Evaluation of user SQL.
//!
//! Mappings, rules, related sources' affected queries, self-service owners and login
//! expressions, the primary contract order and the views registered as sources are SQL that
//! administrators write. The worker, the capture triggers and our SECURITY DEFINER functions
//! all run as the extension owner, a superuser; the SQL they evaluate for users runs here
//! instead, in [`isolated`]:
//!
//! - **as the role named by `identity_sync.run_as`** (never a superuser), switched to with
//!   `SetUserIdAndSecContext` and the flags PostgreSQL itself uses for SECURITY DEFINER
//!   functions and for index expressions run by maintenance commands
//!   (`SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION`): the SQL cannot
//!   `SET ROLE` / `RESET ROLE` its way back to the owner, nor create temporary objects that
//!   would outlive the evaluation;
//! - **read-only**: `transaction_read_only = on` in a GUC nest level of its own, so
//!   `INSERT`/`UPDATE`/`DELETE`/`MERGE`, `nextval()`, `SELECT … FOR UPDATE` and DDL fail even
//!   inside a function the SQL calls, whatever the role may do; every setting the SQL changes
//!   is undone on the way out;
//! - **bounded in time**: a timeout of our own (PostgreSQL's `statement_timeout` is armed per
//!   client statement, never in a background worker, and must not be disturbed in the
//!   sessions of HR writers and logins), which cancels the evaluation the way
//!   `statement_timeout` would;
//! - **named**: the compiled mapping + rules query calls `_at(n)` before expression `n` and
//!   `_at(0)` after the last one of a row, so an error or a timeout is raised again as
//!   "mapping \"mail\": …" (the caller passes the names).
//!
//! Configuration-time checks (`config::probe`) refuse statements that write before anything
//! runs ([`refuse_writes`]), and run their probes here too.

use crate::error::Error;
use crate::guc;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::{AnyElement, FromDatum, PgSqlErrorCode};
use std::cell::Cell;
use std::ffi::{c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

// Not in pgrx's bindings (utils/timeout.h, and nodes/nodeFuncs.h's raw tree walker, which
// PostgreSQL 16 renamed behind a macro). Called through `pg_guard_ffi_boundary`, so an ERROR
// they raise becomes a Rust panic that unwinds properly.
mod ffi {
    use super::{c_int, c_void, pg_sys};
    unsafe extern "C-unwind" {
        pub fn RegisterTimeout(id: c_int, handler: Option<unsafe extern "C" fn()>) -> c_int;
        pub fn enable_timeout_after(id: c_int, delay_ms: c_int);
        pub fn disable_timeout(id: c_int, keep_indicator: bool);
        #[cfg_attr(
            any(feature = "pg16", feature = "pg17", feature = "pg18"),
            link_name = "raw_expression_tree_walker_impl"
        )]
        pub fn raw_expression_tree_walker(
            node: *mut pg_sys::Node,
            walker: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut c_void) -> bool,
            context: *mut c_void,
        ) -> bool;
    }
}

unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(f) }
}

/// Any id at or past PostgreSQL's `USER_TIMEOUT` asks `RegisterTimeout` for a free user slot
/// (the enum's value differs between versions; this one is past it in all of them).
const ANY_USER_TIMEOUT: c_int = 64;

/// Set by our timeout handler, which runs in a signal handler: nothing else happens there.
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

/// The expression being evaluated: `n` of the last `_at(n)`; -1 before the first. (A backend
/// runs SQL on one thread; an atomic because `_at` must cost next to nothing.)
static CURRENT: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// Our timeout reason, registered once per process.
    static TIMEOUT_ID: Cell<Option<c_int>> = const { Cell::new(None) };
    /// Evaluations under way (one inside another keeps the outer bound).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// `CURRENT` when the last evaluation failed (for `_failed_at()`).
    static FAILED_AT: Cell<i32> = const { Cell::new(-1) };
    /// Whether the last evaluation that failed ran past its bound.
    static LAST_TIMED_OUT: Cell<bool> = const { Cell::new(false) };
}

/// Whether the last evaluation that failed did so because it ran past its bound (and not
/// because of an error, or a cancel from elsewhere).
pub fn last_timed_out() -> bool {
    LAST_TIMED_OUT.with(Cell::get)
}

/// The timeout handler: cancel the running query, like `statement_timeout` does.
unsafe extern "C" fn on_timeout() {
    TIMED_OUT.store(true, Ordering::SeqCst);
    unsafe {
        pg_sys::QueryCancelPending = 1;
        pg_sys::InterruptPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

fn timeout_id() -> c_int {
    TIMEOUT_ID.with(|id| match id.get() {
        Some(i) => i,
        None => {
            let i = unsafe { guarded(|| ffi::RegisterTimeout(ANY_USER_TIMEOUT, Some(on_timeout))) };
            id.set(Some(i));
            i
        }
    })
}

/// What an evaluation is and how long it may take.
pub struct Bound<'a> {
    /// Milliseconds; 0 or less: no bound of our own.
    pub timeout_ms: i32,
    /// What sets the bound, for the timeout's DETAIL and HINT (e.g. `identity_sync.capture_timeout`).
    pub setting: &'a str,
    /// `names[0]` names the SQL as a whole; `names[n]` the expression of marker `_at(n)`.
    pub names: &'a [String],
    /// Whether an error's message is to start with the name (not for configuration checks,
    /// whose errors point into the one expression checked).
    pub prefix: bool,
}

impl Bound<'_> {
    fn name(&self, at: i32) -> &str {
        usize::try_from(at)
            .ok()
            .and_then(|n| self.names.get(n))
            .or(self.names.first())
            .map(String::as_str)
            .unwrap_or("user SQL")
    }
}

/// The run_as role's OID, refusing a role that does not exist or is a superuser.
fn run_as_role() -> pg_sys::Oid {
    let name = guc::run_as();
    let Ok(c) = CString::new(name.as_str()) else {
        Error::RunAs {
            role: name,
            problem: "is not a valid role name",
        }
        .report()
    };
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        Error::RunAs {
            role: name,
            problem: "does not exist",
        }
        .report()
    }
    if unsafe { pg_sys::superuser_arg(oid) } {
        Error::RunAs {
            role: name,
            problem: "is a superuser",
        }
        .report()
    }
    oid
}

/// `identity_sync._run_as()`: the role of `identity_sync.run_as`, once checked (it exists and
/// is not a superuser); configuration checks name it in their hints.
#[pg_extern(stable, parallel_safe, name = "_run_as")]
fn run_as_sql() -> String {
    run_as_role();
    guc::run_as()
}

/// Set a setting until `AtEOXact_GUC(false, level)` undoes it (like a function's SET clause).
pub fn set_local(name: &core::ffi::CStr, value: &core::ffi::CStr) {
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// What [`isolated`] changed, undone by [`Scope::end`] whichever way the evaluation ends.
struct Scope {
    user: pg_sys::Oid,
    sec_context: c_int,
    gucs: c_int,
    armed: bool,
    outer_at: i32,
}

impl Scope {
    fn begin(timeout_ms: i32) -> Scope {
        let role = run_as_role();
        let (mut user, mut sec_context) = (pg_sys::InvalidOid, 0);
        unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context) };
        let gucs = unsafe { pg_sys::NewGUCNestLevel() };
        let outer_at = CURRENT.swap(-1, Ordering::Relaxed);
        let armed = DEPTH.with(|d| d.get()) == 0 && timeout_ms > 0;
        DEPTH.with(|d| d.set(d.get() + 1));
        unsafe {
            pg_sys::SetUserIdAndSecContext(
                role,
                sec_context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as c_int
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as c_int,
            )
        };
        // Turning read-only on is allowed at any time; the nest level turns it off again.
        set_local(c"transaction_read_only", c"on");
        if armed {
            TIMED_OUT.store(false, Ordering::SeqCst);
            let id = timeout_id();
            unsafe { guarded(|| ffi::enable_timeout_after(id, timeout_ms)) };
        }
        Scope {
            user,
            sec_context,
            gucs,
            armed,
            outer_at,
        }
    }

    /// Undo everything; returns whether our timeout fired.
    fn end(&self) -> bool {
        let fired = if self.armed {
            let id = timeout_id();
            unsafe { guarded(|| ffi::disable_timeout(id, false)) };
            TIMED_OUT.swap(false, Ordering::SeqCst)
        } else {
            false
        };
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.gucs);
            pg_sys::SetUserIdAndSecContext(self.user, self.sec_context);
        }
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        CURRENT.store(self.outer_at, Ordering::Relaxed);
        fired
    }
}

/// Run `f` (which executes user SQL through SPI) as the run_as role, read-only, within
/// `bound.timeout_ms`; an error is raised again naming the expression it came from.
pub fn isolated<R>(bound: &Bound<'_>, f: impl FnOnce() -> R + std::panic::UnwindSafe) -> R {
    let scope = Scope::begin(bound.timeout_ms);
    let result = PgTryBuilder::new(f)
        .catch_others(|caught| {
            let at = CURRENT.load(Ordering::Relaxed);
            let fired = scope.end();
            FAILED_AT.with(|f| f.set(at));
            LAST_TIMED_OUT.with(|t| t.set(false));
            let report = match caught {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
                other => other.rethrow(),
            };
            let name = bound.name(at).to_string();
            if fired && report.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED {
                LAST_TIMED_OUT.with(|t| t.set(true));
                Error::TimedOut {
                    what: name,
                    after_ms: bound.timeout_ms,
                    setting: bound.setting.to_string(),
                }
                .report()
            }
            // A query with markers that failed before reaching any (while the executor
            // started) does not know which expression it was: the caller finds out.
            let prefix = bound.prefix && (at >= 0 || bound.names.len() <= 1);
            let hint = report.hint().map(str::to_string).or_else(|| {
                (report.sql_error_code() == PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE)
                    .then(|| {
                        let role = guc::run_as();
                        format!(
                            "identity_sync evaluates user SQL as role \"{role}\" (setting identity_sync.run_as), which has only the privileges granted to it, such as GRANT SELECT ON hr.employee TO {role};"
                        )
                    })
            });
            Error::InUserSql {
                code: report.sql_error_code(),
                message: if prefix {
                    format!("{name}: {}", report.message())
                } else {
                    report.message().to_string()
                },
                detail: report.detail().unwrap_or_default().to_string(),
                hint,
            }
            .report()
        })
        .execute();
    if scope.end() {
        // Our timeout fired just after the SQL finished: its cancel is not for what comes next.
        unsafe { pg_sys::QueryCancelPending = 0 };
    }
    result
}

/// `identity_sync._at(n)`: evaluation of expression `n` of a compiled query starts (0: the
/// expressions of a row are done). Always true. It runs once per expression and person (25
/// times per person for bench/plan-targets.sql), so it is a bare version-1 C function (declared
/// below) without pgrx's per-call guard: 30-60 ns a call, and the compiled query of 1,000
/// persons takes as long with markers as without (70-80 ms at best, jit off as in the worker).
///
/// # Safety
/// Called by PostgreSQL's fmgr with one non-null int argument (the function is STRICT).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn identity_sync_at(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let n = unsafe { (*fcinfo).args.as_slice(1)[0].value.value() } as i32;
    CURRENT.store(n, Ordering::Relaxed);
    pg_sys::Datum::from(true)
}

/// fmgr's calling-convention record of [`identity_sync_at`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_identity_sync_at() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

pgrx::extension_sql!(
    r#"CREATE FUNCTION identity_sync._at(n int) RETURNS boolean
LANGUAGE c VOLATILE STRICT PARALLEL RESTRICTED AS 'MODULE_PATHNAME', 'identity_sync_at';"#,
    name = "expression_marker",
    requires = ["schema"]
);

/// `identity_sync._timed_out()`: whether the last evaluation that failed ran past its bound
/// (PL/pgSQL tells a timeout from another cancel with it: both are `query_canceled`).
#[pg_extern(volatile, parallel_unsafe, name = "_timed_out")]
fn timed_out() -> bool {
    last_timed_out()
}

/// `identity_sync._failed_at()`: the marker the last failed evaluation had reached: -1 when
/// it failed before any expression ran (while the executor started: a permission check, a
/// function folded by the planner), 0 between expressions (the person document), `n` in
/// expression `n`.
#[pg_extern(volatile, parallel_unsafe, name = "_failed_at")]
fn failed_at() -> i32 {
    FAILED_AT.with(|f| f.get())
}

/// `identity_sync._evaluate(query, result, names, $1 text[], $2 date, $3 int, $4 text[],
/// timeout_ms, setting)`: run `query`, which returns one value of `result`'s type (its value
/// is not used: `NULL::jsonb` asks for jsonb), isolated (see the module); NULL when it returns
/// no row. `names` as in [`Bound`]; the bound is `timeout_ms` set by `setting`, by default
/// `identity_sync.statement_timeout`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, name = "_evaluate")]
fn evaluate(
    query: &str,
    result: Option<AnyElement>,
    names: default!(Option<Vec<Option<String>>>, "NULL"),
    a1: default!(Option<Vec<Option<String>>>, "NULL"),
    a2: default!(Option<pgrx::datum::Date>, "NULL"),
    a3: default!(Option<i32>, "NULL"),
    a4: default!(Option<Vec<Option<String>>>, "NULL"),
    timeout_ms: default!(Option<i32>, "NULL"),
    setting: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<AnyElement> {
    let _ = result;
    let wanted = unsafe { pg_sys::get_fn_expr_argtype((*fcinfo).flinfo, 1) };
    let mut names: Vec<String> = names
        .unwrap_or_default()
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    if names.is_empty() {
        names.push("user SQL".to_string());
    }
    let bound = Bound {
        timeout_ms: timeout_ms.unwrap_or_else(|| guc::STATEMENT_TIMEOUT.get()),
        setting: setting.unwrap_or("identity_sync.statement_timeout"),
        names: &names,
        prefix: true,
    };
    let datum = isolated(&bound, || {
        Spi::connect_mut(|client| -> Result<Option<pg_sys::Datum>, Error> {
            let args = [a1.into(), a2.into(), a3.into(), a4.into()];
            let table = client.update(query, None, &args)?;
            let got = table.column_type_oid(1)?.value();
            if table.columns()? != 1 || got != wanted {
                return Err(Error::Internal(format!(
                    "_evaluate: the query returns {} column(s) of type {got:?}, not one of type {wanted:?}",
                    table.columns()?
                )));
            }
            if table.is_empty() {
                return Ok(None);
            }
            let Some(d) = table.first().get_datum_by_ordinal(1)? else {
                return Ok(None);
            };
            // Out of SPI's memory, into the caller's, before SPI lets go of it.
            let (mut len, mut byval) = (0i16, false);
            unsafe { pg_sys::get_typlenbyval(got, &mut len, &mut byval) };
            Ok(Some(unsafe {
                pg_sys::SPI_datumTransfer(d, byval, c_int::from(len))
            }))
        })
    })
    .unwrap_or_else(|e| e.report())?;
    unsafe { AnyElement::from_polymorphic_datum(datum, false, wanted) }
}

/// Refuse SQL that writes, before any of it runs: INSERT, UPDATE, DELETE or MERGE (as
/// data-modifying WITH queries), SELECT INTO and row locks (FOR UPDATE/SHARE), and a user
/// query of more than one statement. `query` is the whole statement about to be probed and
/// `user` the user's text inside it (which alone parses when it is a query, not when it is an
/// expression); a syntax error is left to the probe, which reports it with its position.
pub fn refuse_writes(query: &str, user: &str, what: &str) {
    if let Some(n) = statements(user).filter(|n| *n > 1) {
        Error::NotOneStatement {
            what: what.to_string(),
            statements: n,
        }
        .report()
    }
    let Ok(text) = CString::new(query) else {
        return;
    };
    let found = PgTryBuilder::new(|| unsafe {
        let list = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() {
            return None;
        }
        let mut found: Option<&'static str> = None;
        for i in 0..usize::try_from((*list).length).unwrap_or(0) {
            let raw = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::RawStmt;
            let context = &mut found as *mut _ as *mut c_void;
            if !raw.is_null() && guarded(|| writes((*raw).stmt, context)) {
                break;
            }
        }
        found
    })
    .catch_others(|_| None)
    .execute();
    if let Some(found) = found {
        Error::WritesData {
            what: what.to_string(),
            detail: format!("It contains {found}."),
        }
        .report()
    }
}

/// How many statements `sql` holds, if it parses.
fn statements(sql: &str) -> Option<i32> {
    let text = CString::new(sql).ok()?;
    PgTryBuilder::new(|| unsafe {
        let list = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        Some(if list.is_null() { 0 } else { (*list).length })
    })
    .catch_others(|_| None)
    .execute()
}

/// The raw parse tree walker of [`refuse_writes`]: true (stop) at the first node that writes,
/// whose description goes to `*context` (an `Option<&'static str>`).
unsafe extern "C-unwind" fn writes(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    let found = unsafe { &mut *(context as *mut Option<&'static str>) };
    let tag = unsafe { (*node).type_ };
    *found = match tag {
        pg_sys::NodeTag::T_InsertStmt => Some("an INSERT"),
        pg_sys::NodeTag::T_UpdateStmt => Some("an UPDATE"),
        pg_sys::NodeTag::T_DeleteStmt => Some("a DELETE"),
        pg_sys::NodeTag::T_MergeStmt => Some("a MERGE"),
        pg_sys::NodeTag::T_SelectStmt => {
            let s = node as *mut pg_sys::SelectStmt;
            if unsafe { !(*s).intoClause.is_null() } {
                Some("SELECT INTO, which creates a table")
            } else if unsafe { !(*s).lockingClause.is_null() } {
                Some("FOR UPDATE or FOR SHARE, which lock rows")
            } else {
                None
            }
        }
        _ => None,
    };
    // Unguarded: an ERROR in the walker (stack depth) jumps straight to the guard around the
    // outermost call (refuse_writes); the frames it skips own nothing to drop.
    found.is_some() || unsafe { ffi::raw_expression_tree_walker(node, writes, context) }
}

/// `identity_sync._raise(sqlstate, message, detail, hint)`: raise an error caught in PL/pgSQL
/// again with another message, keeping its SQLSTATE, DETAIL and HINT (PL/pgSQL's `RAISE` would
/// show an empty DETAIL or HINT it was handed).
#[pg_extern(volatile, parallel_safe, name = "_raise")]
fn raise(sqlstate: &str, message: &str, detail: Option<&str>, hint: Option<&str>) {
    // MAKE_SQLSTATE: six bits per character, the first in the lowest bits.
    let code = sqlstate
        .bytes()
        .take(5)
        .enumerate()
        .fold(0i32, |acc, (i, c)| {
            acc + (((i32::from(c) - i32::from(b'0')) & 0x3F) << (6 * i))
        });
    Error::InUserSql {
        code: PgSqlErrorCode::from(code),
        message: message.to_string(),
        detail: detail.unwrap_or_default().to_string(),
        hint: hint.filter(|h| !h.is_empty()).map(str::to_string),
    }
    .report()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn text(sql: &str) -> Option<String> {
        Spi::get_one::<String>(sql).expect("query")
    }

    #[pg_test]
    fn user_sql_runs_as_run_as_read_only_and_everything_is_restored() {
        let before = text("SELECT current_user::text");
        assert_eq!(
            text("SELECT identity_sync._evaluate('SELECT current_user::text', NULL::text)")
                .as_deref(),
            Some("identity_sync_evaluator")
        );
        assert_eq!(
            text("SELECT identity_sync._evaluate('SELECT current_setting(''transaction_read_only'')', NULL::text)")
                .as_deref(),
            Some("on")
        );
        // what the SQL sets does not outlive it
        text("SELECT identity_sync._evaluate('SELECT set_config(''work_mem'', ''77MB'', false)', NULL::text)");
        assert_eq!(text("SELECT current_user::text"), before);
        assert_eq!(
            text("SELECT current_setting('transaction_read_only')").as_deref(),
            Some("off")
        );
        assert_ne!(text("SHOW work_mem").as_deref(), Some("77MB"));
        // and this transaction still writes
        Spi::run(
            "CREATE TEMP TABLE after_evaluation (x int); INSERT INTO after_evaluation VALUES (1)",
        )
        .expect("writes after an evaluation");
    }

    #[pg_test(error = "user SQL: cannot execute CREATE TABLE in a read-only transaction")]
    fn a_write_is_an_error() {
        Spi::run(
            "CREATE FUNCTION pg_temp.writes() RETURNS text LANGUAGE plpgsql AS
                 $$ BEGIN CREATE TABLE public.written (x int); RETURN 'x'; END $$;
             SELECT identity_sync._evaluate('SELECT pg_temp.writes()', NULL::text);",
        )
        .unwrap();
    }

    #[pg_test(error = "user SQL: cannot set parameter \"role\" within security-definer function")]
    fn the_role_cannot_be_left() {
        Spi::run("SELECT identity_sync._evaluate('SELECT set_config(''role'', ''none'', true)', NULL::text)")
            .unwrap();
    }

    #[pg_test(error = "user SQL timed out after 100ms")]
    fn a_runaway_query_is_cancelled_at_its_bound() {
        Spi::run(
            "SELECT identity_sync._evaluate('SELECT pg_sleep(30)::text', NULL::text, timeout_ms => 100)",
        )
        .unwrap();
    }

    #[pg_test]
    fn an_error_names_the_expression_it_came_from() {
        let caught = PgTryBuilder::new(|| {
            text(
                "SELECT identity_sync._evaluate(
                    'SELECT CASE WHEN identity_sync._at(1) THEN 1 END::text || CASE WHEN identity_sync._at(2) THEN (1 / (SELECT 0)) END::text',
                    NULL::text, ARRAY['the query', 'mapping \"a\"', 'mapping \"b\"'])",
            )
        })
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => Some(r.message().to_string()),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                Some(ereport.message().to_string())
            }
        })
        .execute();
        assert_eq!(caught.as_deref(), Some("mapping \"b\": division by zero"));
    }

    #[pg_test(error = "affected query must not modify data")]
    fn writing_sql_is_refused_before_it_runs() {
        Spi::run(
            "CREATE TABLE refused (x int);
             SELECT identity_sync._check_query(
                'WITH changed AS (SELECT 1) , d AS (DELETE FROM refused RETURNING x) SELECT x FROM d LIMIT 0',
                0, 'x', 'affected query')",
        )
        .unwrap();
    }
}
