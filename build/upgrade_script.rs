//! Upgrade scripts, assembled at build time from a hand-written template and the `sql/` files.
//!
//! `sql/upgrade/identity_sync--A--B.sql` holds what only a person can write: drops, `ALTER
//! TABLE`, roles, data migration, the functions written in Rust. Two kinds of directive lines
//! in it take their text from the `sql/` files a fresh install runs, so that no definition is
//! written twice:
//!
//! - `-- @include <start of a statement>`: the one statement of `sql/` that starts with these
//!   words (white space folded), e.g. `-- @include CREATE TABLE identity_sync.notice`;
//! - `-- @code`: every function, view and aggregate of `sql/` as `CREATE OR REPLACE`, and every
//!   `GRANT`, `REVOKE`, `COMMENT ON`, `pg_extension_config_dump()` and
//!   `_revoke_public_execute()` call, in load order: the code, privileges and comments a fresh
//!   install has (all of them are idempotent, so an unchanged function replaces itself).
//!
//! The result is written beside the other scripts as `sql/identity_sync--A--B.sql`, where
//! `cargo pgrx install` and `package` pick it up; it is a build product (git ignores it).
//! PostGIS builds its upgrade scripts from its install scripts the same way.

use std::fmt::Write as _;

/// One SQL statement of a `sql/` file: the file, and its text from its first keyword to its
/// semicolon (leading comments removed).
pub struct Statement<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

/// Split SQL text into statements at top-level semicolons, skipping strings (also `E''`),
/// quoted identifiers, dollar quotes and comments.
pub fn statements(text: &str) -> Result<Vec<&str>, String> {
    let b = text.as_bytes();
    let (mut out, mut i, mut start) = (Vec::new(), 0, 0);
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    while i < b.len() {
        match b[i] {
            b'-' if b[i..].starts_with(b"--") => {
                i = text[i..].find('\n').map_or(b.len(), |j| i + j + 1);
            }
            b'/' if b[i..].starts_with(b"/*") => {
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j..].starts_with(b"/*") {
                        depth += 1;
                        j += 2;
                    } else if b[j..].starts_with(b"*/") {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                i = j;
            }
            b'\'' => {
                let escapes =
                    i > 0 && (b[i - 1] == b'e' || b[i - 1] == b'E') && (i < 2 || !ident(b[i - 2]));
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                    } else if b[i] == b'\'' {
                        if b[i..].starts_with(b"''") {
                            i += 2;
                        } else {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1; // a doubled "" closes and reopens: the same as skipping it
            }
            b'$' if i == 0 || !ident(b[i - 1]) => {
                let tag_len = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
                    .map(|n| n + 2);
                match tag_len {
                    Some(n) if b.get(i + n - 1) == Some(&b'$') && !b[i + 1].is_ascii_digit() => {
                        let tag = &text[i..i + n];
                        let close = text[i + n..]
                            .find(tag)
                            .ok_or_else(|| format!("unterminated dollar quote {tag}"))?;
                        i += n + close + n;
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                out.push(strip_leading_comments(&text[start..=i]));
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    let rest = strip_leading_comments(&text[start.min(b.len())..]);
    if !rest.trim().is_empty() {
        out.push(rest);
    }
    Ok(out)
}

fn strip_leading_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if s.starts_with("--") {
            s = s.find('\n').map_or("", |j| &s[j + 1..]);
        } else if s.starts_with("/*") {
            // block comments nest in PostgreSQL
            let (mut depth, mut j) = (0, 0);
            while j < s.len() {
                if s[j..].starts_with("/*") {
                    depth += 1;
                    j += 2;
                } else if s[j..].starts_with("*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += s[j..].chars().next().map_or(1, char::len_utf8);
                }
            }
            s = &s[j.min(s.len())..];
        } else {
            return s;
        }
    }
}

/// The statement's words with white space folded to single spaces.
fn folded(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What `-- @code` brings in for one statement: its text, as `CREATE OR REPLACE` where it is a
/// `CREATE`; `None` for what holds data or is made once (tables, types, indexes, policies,
/// triggers, inserts, DO blocks), which the template brings in by `-- @include` when new.
fn as_code(text: &str) -> Option<String> {
    let f = folded(text).to_ascii_uppercase();
    for kind in ["FUNCTION ", "VIEW ", "AGGREGATE "] {
        if let Some(rest) = f.strip_prefix("CREATE ") {
            if rest.starts_with(kind) || rest.starts_with(&format!("OR REPLACE {kind}")) {
                // "CREATE" + white space + ["OR REPLACE" + white space] → "CREATE OR REPLACE "
                let after = text[6..].trim_start();
                let after = if after.to_ascii_uppercase().starts_with("OR ") {
                    after[2..].trim_start()[7..].trim_start()
                } else {
                    after
                };
                return Some(format!("CREATE OR REPLACE {after}"));
            }
        }
    }
    let idempotent = [
        "GRANT ",
        "REVOKE ",
        "COMMENT ON ",
        "SELECT IDENTITY_SYNC._REVOKE_PUBLIC_EXECUTE()",
        "SELECT PG_CATALOG.PG_EXTENSION_CONFIG_DUMP(",
    ];
    idempotent
        .iter()
        .any(|p| f.starts_with(p))
        .then(|| text.to_string())
}

/// The upgrade script from its template and the statements of `sql/` in load order.
pub fn assemble(template: &str, sql: &[Statement<'_>]) -> Result<String, String> {
    let mut out = String::new();
    let mut code_seen = false;
    for line in template.split_inclusive('\n') {
        let directive = line.trim_end();
        if directive == "-- @code" {
            if code_seen {
                return Err("-- @code appears twice".into());
            }
            code_seen = true;
            let mut file = "";
            for s in sql {
                if let Some(code) = as_code(s.text) {
                    if s.file != file {
                        file = s.file;
                        let _ = writeln!(out, "\n-- {file}\n");
                    }
                    let _ = writeln!(out, "{code}\n");
                }
            }
        } else if let Some(start) = directive.strip_prefix("-- @include ") {
            let start = folded(start);
            let found: Vec<&Statement> = sql
                .iter()
                .filter(|s| {
                    let f = folded(s.text);
                    f.starts_with(&start)
                        && f[start.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
                })
                .collect();
            match found.as_slice() {
                [s] => {
                    let _ = writeln!(out, "-- from {}\n{}", s.file, s.text);
                }
                [] => {
                    return Err(format!(
                        "-- @include {start}: no statement of sql/ starts so"
                    ))
                }
                _ => {
                    return Err(format!(
                        "-- @include {start}: {} statements of sql/ start so; give more words",
                        found.len()
                    ))
                }
            }
        } else if directive.starts_with("-- @") {
            return Err(format!("unknown directive: {directive}"));
        } else {
            out.push_str(line);
        }
    }
    if !code_seen {
        return Err("the template has no -- @code line".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQL: &str = "-- a comment; with a semicolon\n\
        CREATE TABLE identity_sync.t (a text DEFAULT ';', b text DEFAULT E'\\';');\n\
        CREATE INDEX ON identity_sync.t (a);\n\
        /* a /* nested */ comment; */ CREATE FUNCTION identity_sync.f() RETURNS int\n\
        LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END $body$;\n\
        CREATE OR REPLACE VIEW identity_sync.v AS SELECT \";\" FROM (SELECT 1 AS \";\") s;\n\
        GRANT SELECT ON identity_sync.v TO identity_sync_reader;\n\
        SELECT $1::int; INSERT INTO identity_sync.t VALUES ($$x;y$$);";

    fn sql() -> Vec<Statement<'static>> {
        statements(SQL)
            .expect("split")
            .into_iter()
            .map(|text| Statement {
                file: "sql/x.sql",
                text,
            })
            .collect()
    }

    #[test]
    fn splits_at_top_level_semicolons_only() {
        let s = statements(SQL).expect("split");
        assert_eq!(s.len(), 7, "{s:#?}");
        assert!(s[0].starts_with("CREATE TABLE") && s[0].ends_with("';');"));
        assert!(s[2].starts_with("CREATE FUNCTION") && s[2].ends_with("$body$;"));
        assert_eq!(s[5], "SELECT $1::int;");
        assert!(statements("SELECT $a$ open").is_err());
    }

    #[test]
    fn code_replaces_functions_and_views_and_keeps_privileges() {
        let out = assemble("BEGIN;\n-- @code\nCOMMIT;\n", &sql()).expect("assemble");
        assert!(out.contains("CREATE OR REPLACE FUNCTION identity_sync.f()"));
        assert!(out.contains("CREATE OR REPLACE VIEW identity_sync.v AS"));
        assert!(out.contains("GRANT SELECT ON identity_sync.v"));
        assert!(!out.contains("CREATE TABLE") && !out.contains("CREATE INDEX"));
        assert!(!out.contains("INSERT") && !out.contains("$1"));
        assert!(out.starts_with("BEGIN;\n") && out.ends_with("COMMIT;\n"));
    }

    #[test]
    fn include_takes_exactly_one_statement() {
        let out = assemble(
            "-- @include CREATE TABLE   identity_sync.t\n-- @code\n",
            &sql(),
        );
        assert!(out
            .expect("one match")
            .contains("CREATE TABLE identity_sync.t (a text"));
        let none = assemble(
            "-- @include CREATE TABLE identity_sync.tt\n-- @code\n",
            &sql(),
        );
        assert!(none.is_err_and(|e| e.contains("no statement")));
        let prefix = assemble("-- @include CREATE\n-- @code\n", &sql());
        assert!(prefix.is_err_and(|e| e.contains("statements of sql/ start so")));
        assert!(assemble("-- @inclde x\n-- @code\n", &sql()).is_err());
        assert!(assemble("no code line\n", &sql()).is_err());
    }
}
