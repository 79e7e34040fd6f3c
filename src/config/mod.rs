//! Configuration, Rust side: checking user SQL expressions with positions inside the
//! expression, SCIM attribute paths, and the text helpers identity engineers map with.
//! The configuration API itself is SQL (`sql/10_config.sql`).

use crate::error::Error;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::c_void;

struct PositionContext {
    offset: i32,
}

thread_local! {
    /// Position (1-based, in characters) inside the user's expression of the last error raised
    /// while checking it; set by the error context callback, read when re-raising.
    static POSITION: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Error context callback: remember where inside the user's expression an error points (SPI
/// has already turned the position into an internal one on the whole probe query).
#[pg_guard]
unsafe extern "C-unwind" fn remember_position(arg: *mut c_void) {
    let ctx = unsafe { &*(arg as *const PositionContext) };
    let mut pos = unsafe { pg_sys::geterrposition() };
    if pos <= 0 {
        pos = unsafe { pg_sys::getinternalerrposition() };
    }
    if pos > ctx.offset {
        POSITION.with(|p| p.set(Some(pos - ctx.offset)));
    }
}

/// Restores the error context stack however we leave (return or error).
struct ContextGuard(*mut pg_sys::ErrorContextCallback);
impl Drop for ContextGuard {
    fn drop(&mut self) {
        unsafe { pg_sys::error_context_stack = self.0 };
    }
}

/// The expression with a caret under character `pos` of the line it falls on, psql-style.
fn caret(expression: &str, pos: i32) -> String {
    let mut line_start = 0usize;
    let mut line_no = 1;
    let target = (pos.max(1) - 1) as usize;
    for (i, ch) in expression.chars().enumerate() {
        if i == target {
            break;
        }
        if ch == '\n' {
            line_start = i + 1;
            line_no += 1;
        }
    }
    let line: String = expression
        .chars()
        .skip(line_start)
        .take_while(|c| *c != '\n')
        .collect();
    let column = target.saturating_sub(line_start);
    format!(
        "LINE {line_no}: {line}\n{}^",
        " ".repeat(column + format!("LINE {line_no}: ").len())
    )
}

/// Run `query` (which returns nothing: it ends in LIMIT 0) with `$1 = '{}'::text[]`,
/// `$2 = NULL::date`, `$3 = 0`, and return the type of its first column and its number of
/// columns. The user's expression starts after `offset` characters of `query`. An error is
/// raised again with PostgreSQL's message and, when it points into the expression, the position
/// inside the expression (not inside our generated query).
fn probe(query: &str, offset: i32, expression: &str, what: &str) -> (pg_sys::Oid, i32) {
    let len = expression.chars().count() as i32;
    let ctx = PositionContext { offset };
    POSITION.with(|p| p.set(None));
    let result = PgTryBuilder::new(|| {
        let mut callback = pg_sys::ErrorContextCallback {
            previous: unsafe { pg_sys::error_context_stack },
            callback: Some(remember_position),
            arg: &ctx as *const PositionContext as *mut c_void,
        };
        let _guard = ContextGuard(callback.previous);
        unsafe { pg_sys::error_context_stack = &mut callback };
        crate::evaluate::refuse_writes(query, expression, what);
        let names = [what.to_string()];
        let bound = crate::evaluate::Bound {
            timeout_ms: crate::guc::STATEMENT_TIMEOUT.get(),
            setting: "identity_sync.statement_timeout",
            names: &names,
            prefix: false,
        };
        crate::evaluate::isolated(&bound, || {
            let keys: Vec<String> = Vec::new();
            let day: Option<pgrx::datum::Date> = None;
            let extra: Option<Vec<String>> = None;
            Spi::connect(|client| {
                let table = client.select(
                    query,
                    Some(0),
                    &[keys.into(), day.into(), 0i32.into(), extra.into()],
                )?;
                let columns = table.columns()? as i32;
                let first = table.column_type_oid(1).map(|o| o.value())?;
                Ok::<_, pgrx::spi::Error>((first, columns))
            })
        })
    })
    .catch_others(|e| {
        let report = match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
            CaughtError::RustPanic { ereport, .. } => ereport,
        };
        let mut message = report.message().to_string();
        let mut detail = report.detail().map(str::to_string).unwrap_or_default();
        if !detail.is_empty() {
            detail.push('\n');
        }
        match POSITION.with(|p| p.take()) {
            // Past the end: the parser met our own text after an unfinished expression.
            Some(pos) if pos > len => {
                if message.starts_with("syntax error at or near") {
                    message = "syntax error at end of expression".to_string();
                }
                detail.push_str(&format!(
                    "at the end of the expression:\n{}",
                    caret(expression, len + 1)
                ));
            }
            Some(pos) => detail.push_str(&format!(
                "at character {pos} of the expression:\n{}",
                caret(expression, pos)
            )),
            None => detail.push_str(&format!("in the expression: {expression}")),
        }
        Error::InUserSql {
            code: report.sql_error_code(),
            message,
            detail,
            hint: report.hint().map(str::to_string),
        }
        .report()
    })
    .execute();
    result.unwrap_or_else(|e| Error::from(e).report())
}

/// Check a user expression (`what`: "mapping expression", "owners condition", …) inside a
/// generated probe query, as `identity_sync.run_as` and read-only (src/evaluate.rs); returns
/// the expression's type.
#[pg_extern(volatile, parallel_unsafe, name = "_check_expression")]
fn check_expression(
    query: &str,
    offset: i32,
    expression: &str,
    what: default!(&str, "'expression'"),
) -> pg_sys::Oid {
    probe(query, offset, expression, what).0
}

/// Check a user query inside a generated probe query, like [`check_expression`]; returns its
/// number of columns.
#[pg_extern(volatile, parallel_unsafe, name = "_check_query")]
fn check_query(query: &str, offset: i32, user_query: &str, what: default!(&str, "'query'")) -> i32 {
    probe(query, offset, user_query, what).1
}

/// Validate a SCIM attribute path (`name.givenName`, `emails[type eq "work"].value`,
/// `urn:…:User:department`).
#[pg_extern(immutable, parallel_safe, strict, name = "_check_attribute_path")]
fn check_attribute_path(path: &str) {
    if let Err(e) = identity_sync_core::path::parse_path(path) {
        Error::InvalidPath {
            path: path.to_string(),
            reason: e.to_string(),
        }
        .report()
    }
}

/// 'Zoë Ångström-Çelik' → 'Zoe Angstrom-Celik' (also ß, ø, ł, Turkish dotless i).
#[pg_extern(immutable, parallel_safe, strict)]
fn normalize_diacritics(input: &str) -> String {
    identity_sync_core::text::normalize_diacritics(input)
}

/// Login-safe form: diacritics removed, lower case, only letters, digits and `. - _`.
#[pg_extern(immutable, parallel_safe, strict)]
fn slug(input: &str) -> String {
    identity_sync_core::text::slug(input)
}

/// Family-name prefixes ('van der Berg'): prefix, core name, display, sort key and login forms.
/// No row for a NULL family name (as a STRICT function would answer; `given` may be NULL).
#[pg_extern(immutable, parallel_safe)]
fn name_variants(
    given: Option<&str>,
    family: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(prefix, String),
        name!(core, String),
        name!(family, String),
        name!(display, String),
        name!(sort_key, String),
        name!(login, String),
    ),
> {
    let row = family.map(|family| {
        let v = identity_sync_core::text::name_variants(given, family);
        (v.prefix, v.core, v.family, v.display, v.sort_key, v.login)
    });
    TableIterator::new(row)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() {
        Spi::run(
            "CREATE TABLE person (id int PRIMARY KEY, given text NOT NULL, family text NOT NULL);
             CREATE TABLE job (person_id int, dept text, starts date, ends date);
             INSERT INTO person VALUES (1, 'Zoë', 'Ångström');
             INSERT INTO job VALUES (1, 'S', '2020-01-01', NULL);
             GRANT SELECT ON person, job TO identity_sync_evaluator;
             SELECT identity_sync.add_person_source('person', 'id');
             SELECT identity_sync.add_contract_source('job', 'person_id', 'starts', 'ends');
             SELECT identity_sync.add_target('t', 'webhook', 'http://127.0.0.1:9/', '{\"dry_run\": true}');",
        )
        .expect("setup");
    }

    #[pg_test]
    fn helpers_are_sql_functions() {
        assert_eq!(
            Spi::get_one::<String>("SELECT identity_sync.slug('Zoë Ångström-Çelik')").unwrap(),
            Some("zoeangstrom-celik".to_string())
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT identity_sync.normalize_diacritics('Łódź ß Işık')")
                .unwrap(),
            Some("Lodz ss Isik".to_string())
        );
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT sort_key FROM identity_sync.name_variants('Jan', 'van der Berg')"
            )
            .unwrap(),
            Some("Berg, Jan van der".to_string())
        );
    }

    #[pg_test]
    fn a_valid_mapping_compiles_into_the_target_query() {
        setup();
        Spi::run("SELECT identity_sync.map('t', 'login', 'identity_sync.slug(person.given)')")
            .unwrap();
        Spi::run("SELECT identity_sync.add_rule('t', 'sales', $$contract.dept = 'S'$$, '{sales}')")
            .unwrap();
        let compiled =
            Spi::get_one::<String>("SELECT compiled FROM identity_sync.target WHERE name = 't'")
                .unwrap()
                .unwrap_or_default();
        assert!(
            compiled.contains("identity_sync.slug(person.given)"),
            "{compiled}"
        );
        let preview = Spi::get_one::<pgrx::JsonB>(
            "SELECT to_jsonb(p) FROM identity_sync.preview('1', 't') AS p",
        )
        .unwrap()
        .expect("a preview row");
        assert_eq!(preview.0["attributes"]["login"], "zoe");
        assert_eq!(preview.0["matched_rules"][0], "sales");
        assert_eq!(preview.0["events"][0]["kind"], "create");
    }

    #[pg_test(error = "column person.givn does not exist")]
    fn a_misspelt_column_is_refused_at_map_time() {
        setup();
        Spi::run("SELECT identity_sync.map('t', 'login', 'lower(person.givn)')").unwrap();
    }

    #[pg_test(error = "rule condition must be boolean, not text")]
    fn a_rule_must_be_boolean() {
        setup();
        Spi::run("SELECT identity_sync.add_rule('t', 'r', 'person.given')").unwrap();
    }

    #[pg_test(
        error = "invalid value filter in path \"emails[type ne \"work\"].value\": operator \"ne\" is not supported, only \"eq\" selects one element"
    )]
    fn a_scim_path_is_checked() {
        setup();
        Spi::run("SELECT identity_sync.add_target('s', 'scim', 'http://127.0.0.1:9/v2')").unwrap();
        Spi::run("SELECT identity_sync.map('s', 'emails[type ne \"work\"].value', 'person.given')")
            .unwrap();
    }

    #[pg_test]
    fn caret_points_at_the_character() {
        // character 8 is the second '+', on line 2
        let expected = format!("LINE 2: b ++ c\n{}^", " ".repeat("LINE 2: b +".len()));
        assert_eq!(super::caret("a +\nb ++ c", 8), expected);
    }
}

/// Whether a URL's host is a loopback address (`localhost`, 127.0.0.0/8, `[::1]`), the same
/// rule the worker's HTTP client applies to plain `http://`.
#[pg_extern(immutable, parallel_safe, strict, name = "_is_loopback_url")]
fn is_loopback_url(url: &str) -> bool {
    identity_sync_core::deliver::is_loopback_url(url)
}
