//! Configuration, Rust side: checking user SQL expressions with positions inside the
//! expression, SCIM attribute paths, and the text helpers identity engineers map with.
//! The configuration API itself is SQL (`sql/config.sql`).

use crate::error::Error;
use pgrx::prelude::*;
use std::ffi::{c_void, CString};

struct PositionContext {
    offset: i32,
    len: i32,
    expression: CString,
}

/// Error context callback: an error positioned inside the user's expression is reported with
/// the expression as the query and the position inside it (as PL/pgSQL does for its bodies).
#[pg_guard]
unsafe extern "C-unwind" fn transpose_position(arg: *mut c_void) {
    let ctx = unsafe { &*(arg as *const PositionContext) };
    let mut pos = unsafe { pg_sys::geterrposition() };
    if pos <= 0 {
        pos = unsafe { pg_sys::getinternalerrposition() };
    }
    if pos > ctx.offset && pos <= ctx.offset + ctx.len + 1 {
        unsafe {
            pg_sys::errposition(0);
            pg_sys::internalerrposition(pos - ctx.offset);
            pg_sys::internalerrquery(ctx.expression.as_ptr());
        }
    }
}

/// Restores the error context stack however we leave (return or error).
struct ContextGuard(*mut pg_sys::ErrorContextCallback);
impl Drop for ContextGuard {
    fn drop(&mut self) {
        unsafe { pg_sys::error_context_stack = self.0 };
    }
}

/// Parse, analyse and run `query` (which returns nothing: it ends in LIMIT 0) with
/// `$1 = '{}'::text[]`, `$2 = NULL::date`, `$3 = 0`, and return the type of its one column.
/// The user's expression starts after `offset` characters of `query`.
#[pg_extern(volatile, parallel_unsafe, name = "_check_expression")]
fn check_expression(query: &str, offset: i32, expression: &str) -> pg_sys::Oid {
    let Ok(expr) = CString::new(expression) else {
        Error::InvalidParameter("expression contains a zero byte".into()).report()
    };
    let ctx = PositionContext { offset, len: expression.chars().count() as i32, expression: expr };
    let mut callback = pg_sys::ErrorContextCallback {
        previous: unsafe { pg_sys::error_context_stack },
        callback: Some(transpose_position),
        arg: &ctx as *const PositionContext as *mut c_void,
    };
    let _guard = ContextGuard(callback.previous);
    unsafe { pg_sys::error_context_stack = &mut callback };
    let keys: Vec<String> = Vec::new();
    let day: Option<pgrx::datum::Date> = None;
    Spi::connect(|client| {
        let table = client
            .select(query, Some(0), &[keys.into(), day.into(), 0i32.into()])
            .unwrap_or_else(|e| Error::InvalidParameter(e.to_string()).report());
        table.column_type_oid(1).map(|o| o.value()).unwrap_or(pg_sys::InvalidOid)
    })
}

/// Validate a SCIM attribute path (`name.givenName`, `emails[type eq "work"].value`,
/// `urn:…:User:department`).
#[pg_extern(immutable, parallel_safe, strict, name = "_check_attribute_path")]
fn check_attribute_path(path: &str) {
    if let Err(e) = identity_sync_core::path::parse_path(path) {
        Error::InvalidPath { path: path.to_string(), reason: e.to_string() }.report()
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
#[pg_extern(immutable, parallel_safe)]
fn name_variants(
    given: Option<&str>,
    family: &str,
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
    let v = identity_sync_core::text::name_variants(given, family);
    TableIterator::once((v.prefix, v.core, v.family, v.display, v.sort_key, v.login))
}
