//! Who may use what (issue 13 item 6): the privileges of every function, view, table and
//! sequence in schema `identity_sync`, derived from the catalog of a fresh installation, against
//! the table under "Who may use what" in README.md. A new object without a grant decision
//! documented there, a grant the README does not mention, or a README row that the catalog
//! disagrees with fails the test, as do write privileges on any relation, a `_`-prefixed
//! (private) object usable by anyone but the owner unless the README lists it as an exception,
//! and a SECURITY DEFINER function without a fixed search_path.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};

/// What one role may do with one object, as the README writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Use {
    /// Nothing (an empty cell).
    No,
    /// Execute the function, or read the whole relation.
    Yes,
    /// Read some of the relation's columns.
    Columns,
}

impl Use {
    fn parse(cell: &str) -> Result<Use, String> {
        match cell.trim() {
            "" => Ok(Use::No),
            "yes" => Ok(Use::Yes),
            "columns" => Ok(Use::Columns),
            other => Err(format!(
                "unknown cell {other:?} (empty, \"yes\" or \"columns\")"
            )),
        }
    }
}

/// The README's table: the roles of its columns (role names as PostgreSQL knows them, `public`
/// for PUBLIC) and, per object name as written there, what each role may do.
struct Documented {
    roles: Vec<String>,
    rows: Vec<(String, Vec<Use>)>,
}

/// The table after the heading "### Who may use what": columns `object`, then one per role
/// (`PUBLIC`; `reader`, `operator`, `admin`, … for the extension's roles `identity_sync_…`;
/// PostgreSQL's `pg_…` roles by their names).
/// Each backquoted name in the object cell gets the row's cells.
fn documented(readme: &str) -> Documented {
    let mut lines = readme
        .lines()
        .skip_while(|l| l.trim() != "### Who may use what")
        .skip(1)
        .skip_while(|l| !l.starts_with('|'));
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = cells(lines.next().expect(
        "README.md has no table after a heading \"### Who may use what\" (section Security)",
    ));
    assert_eq!(header[0], "object", "the table's first column is `object`");
    let roles: Vec<String> = header[1..]
        .iter()
        .map(|h| match h.as_str() {
            "PUBLIC" => "public".to_string(),
            // PostgreSQL's own roles by their names, the extension's without its prefix
            other if other.starts_with("pg_") || other.starts_with("identity_sync_") => {
                other.to_string()
            }
            other => format!("identity_sync_{other}"),
        })
        .collect();
    lines.next(); // |---|---|
    let mut rows = Vec::new();
    for line in lines.take_while(|l| l.starts_with('|')) {
        let c = cells(line);
        assert_eq!(
            c.len(),
            header.len(),
            "README row with too few cells: {line}"
        );
        let uses: Vec<Use> = c[1..]
            .iter()
            .map(|x| Use::parse(x).unwrap_or_else(|e| panic!("{e} in README row: {line}")))
            .collect();
        let names: Vec<&str> = c[0].split('`').skip(1).step_by(2).collect();
        assert!(!names.is_empty(), "README row names no object: {line}");
        for name in names {
            rows.push((name.to_string(), uses.clone()));
        }
    }
    Documented { roles, rows }
}

#[test]
fn privileges_match_the_readme() {
    let readme = std::fs::read_to_string(repo_dir().join("README.md")).expect("read README.md");
    let doc = documented(&readme);
    let mut c = fresh_db("privileges");
    create_extension(&mut c);
    let mut problems: Vec<String> = Vec::new();

    // The README's names, resolved by PostgreSQL (so `timestamptz` and `timestamp with time
    // zone` are one type), each to the catalog's own name of the object.
    let mut readme_uses: BTreeMap<String, Vec<Use>> = BTreeMap::new();
    for (name, uses) in &doc.rows {
        let resolve = if name.contains('(') {
            "SELECT to_regprocedure('identity_sync.' || $1)::text"
        } else {
            "SELECT to_regclass('identity_sync.' || $1)::text"
        };
        let resolved: Option<String> = one_with(&mut c, resolve, &[name]);
        match resolved {
            Some(r) => {
                if readme_uses.insert(r.clone(), uses.clone()).is_some() {
                    problems.push(format!("README lists {r} twice"));
                }
            }
            None => problems.push(format!(
                "README lists `{name}`, which is not a function or relation of schema identity_sync"
            )),
        }
    }

    // Every object of the schema with what each documented role may do, from the catalog.
    let objects = c
        .query(
            "SELECT p.oid::regprocedure::text AS name, p.proname LIKE '\\_%' AS private,
                    array_agg(CASE WHEN has_function_privilege(r, p.oid, 'EXECUTE') THEN 'yes' ELSE '' END
                              ORDER BY i) AS uses
               FROM pg_proc p, unnest($1::text[]) WITH ORDINALITY AS u(r, i)
              WHERE p.pronamespace = 'identity_sync'::regnamespace
              GROUP BY p.oid
             UNION ALL
             SELECT c.oid::regclass::text, c.relname LIKE '\\_%' OR c.relkind = 'S',
                    array_agg(CASE WHEN c.relkind = 'S' THEN
                                       CASE WHEN has_sequence_privilege(r, c.oid, 'SELECT, USAGE, UPDATE') THEN 'yes' ELSE '' END
                                   WHEN has_table_privilege(r, c.oid, 'SELECT') THEN 'yes'
                                   WHEN has_any_column_privilege(r, c.oid, 'SELECT') THEN 'columns'
                                   ELSE '' END ORDER BY i)
               FROM pg_class c, unnest($1::text[]) WITH ORDINALITY AS u(r, i)
              WHERE c.relnamespace = 'identity_sync'::regnamespace
                AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
              GROUP BY c.oid
              ORDER BY 1",
            &[&doc.roles],
        )
        .expect("read the catalog");
    let mut seen = BTreeSet::new();
    for row in &objects {
        let name: String = row.get("name");
        let private: bool = row.get("private");
        let uses: Vec<Use> = row
            .get::<_, Vec<String>>("uses")
            .iter()
            .map(|u| Use::parse(u).expect("a cell the query makes"))
            .collect();
        seen.insert(name.clone());
        let expected = match readme_uses.get(&name) {
            Some(u) => u.clone(),
            // A private object (its name starts with _) and a sequence need no row: nobody but
            // the owner may use them.
            None if private => vec![Use::No; doc.roles.len()],
            None => {
                problems.push(format!(
                    "{name} has no row in README.md's \"Who may use what\" (who may use it: {})",
                    describe_uses(&doc.roles, &uses)
                ));
                continue;
            }
        };
        if uses != expected {
            problems.push(format!(
                "{name}: the catalog says {}, README.md says {}",
                describe_uses(&doc.roles, &uses),
                describe_uses(&doc.roles, &expected)
            ));
        }
    }
    // (README names that resolve are objects of the schema, so they are all seen.)
    debug_assert!(readme_uses.keys().all(|k| seen.contains(k)));

    // Every grant goes to a role of the README's columns, and grants only reading or executing.
    let grants = c
        .query(
            "WITH acl AS (
                 SELECT p.oid::regprocedure::text AS object, p.proowner AS owner,
                        (aclexplode(coalesce(p.proacl, acldefault('f', p.proowner)))).*
                   FROM pg_proc p WHERE p.pronamespace = 'identity_sync'::regnamespace
                 UNION ALL
                 SELECT c.oid::regclass::text, c.relowner,
                        (aclexplode(coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::\"char\", c.relowner)))).*
                   FROM pg_class c WHERE c.relnamespace = 'identity_sync'::regnamespace
                 UNION ALL
                 SELECT format('%s.%I', c.oid::regclass, a.attname), c.relowner, (aclexplode(a.attacl)).*
                   FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
                  WHERE c.relnamespace = 'identity_sync'::regnamespace AND a.attacl IS NOT NULL)
             SELECT object, CASE WHEN grantee = 0 THEN 'public' ELSE grantee::regrole::text END AS grantee,
                    privilege_type
               FROM acl WHERE grantee <> owner ORDER BY 1, 2, 3",
            &[],
        )
        .expect("read the ACLs");
    for g in &grants {
        let (object, grantee, privilege): (String, String, String) = (g.get(0), g.get(1), g.get(2));
        if !doc.roles.contains(&grantee) {
            problems.push(format!(
                "{object}: {privilege} is granted to {grantee}, which has no column in README.md's \"Who may use what\""
            ));
        }
        if !matches!(privilege.as_str(), "EXECUTE" | "SELECT") {
            problems.push(format!(
                "{object}: {privilege} is granted to {grantee}; only the extension's functions write its tables"
            ));
        }
    }

    // SECURITY DEFINER functions run as the owner: a search_path of the caller's could shadow
    // what they call.
    let unfixed: Vec<String> = column(
        &mut c,
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.pronamespace = 'identity_sync'::regnamespace AND p.prosecdef
            AND NOT EXISTS (SELECT FROM unnest(p.proconfig) AS s WHERE s LIKE 'search\\_path=%')
          ORDER BY 1",
    );
    for f in unfixed {
        problems.push(format!("{f} is SECURITY DEFINER without SET search_path"));
    }

    assert!(
        problems.is_empty(),
        "privileges disagree with README.md (section Security, \"Who may use what\"):\n  {}",
        problems.join("\n  ")
    );
    // The test saw the whole API: every public function and view of design.md is there.
    assert!(
        seen.len() > 100,
        "only {} objects in the catalog",
        seen.len()
    );
}

/// "reader, operator, admin" or "nobody but the owner"; `columns` marks a partial grant.
fn describe_uses(roles: &[String], uses: &[Use]) -> String {
    let who: Vec<String> = roles
        .iter()
        .zip(uses)
        .filter(|(_, u)| **u != Use::No)
        .map(|(r, u)| match u {
            Use::Columns => format!("{r} (some columns)"),
            _ => r.clone(),
        })
        .collect();
    if who.is_empty() {
        "nobody but the owner".to_string()
    } else {
        who.join(", ")
    }
}
