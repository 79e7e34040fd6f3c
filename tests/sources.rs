//! End-to-end tests of issue 15, "several sources for one person": employees (the employees
//! sample, the default source) and contractors (`tests/data/contractors/contractors.sql`, the
//! source `contractors`) merged into one SCIM target (the third-party `scim2-server`): a
//! contractor hired as an employee keeps the one account, a person falls back to the lower
//! source when the higher one's row goes, a match rule set later merges persons without
//! duplicate accounts and lists the case where both had accounts, and a contractor register
//! in a second PostgreSQL cluster, reached with postgres_fdw and captured by the worker's
//! scheduled snapshots, reaches the target.
//!
//! Every test builds its own state in the worker's database (`postgres`): [`fresh`] drops the
//! extension, reloads the small employees sample and the contractors, and registers the
//! sample's sources; the extension is dropped again when the test ends. Run by `scripts/test`
//! (e2e layer, `--test-threads=1`: the tests share the worker).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::time::Duration;

/// The contractor register (also the README's sample).
const CONTRACTORS: &str = include_str!("data/contractors/contractors.sql");

/// What these tests leave outside the extension.
const LEFTOVERS: &str = "
    DROP FOREIGN TABLE IF EXISTS public.vendor_contractor;
    DROP TABLE IF EXISTS public.contractor;
    DROP EXTENSION IF EXISTS postgres_fdw CASCADE;";

/// Fresh state in the worker's database: the small employees sample with a national id column
/// (empty), the contractors, the extension with the sample's sources; the extension is dropped
/// again when the returned guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(&mut c, "small", LEFTOVERS);
    exec(
        &mut c,
        &format!(
            "SET client_min_messages = warning; {CONTRACTORS}
             ALTER TABLE employee ADD COLUMN national_id text UNIQUE;
             GRANT SELECT ON contractor TO identity_sync_evaluator;"
        ),
    );
    (cleanup, c)
}

/// A SCIM target `dir` on `scim`: userName at creation, family name, a title saying which
/// source the person comes from, the e-mail of the contractor register when there is one
/// (attribute-level precedence over `persons`), and one rule, `condition`.
fn add_directory(c: &mut Client, scim: &ScimServer, condition: &str) {
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('dir', 'scim', '{}', '{{\"auth\": \"bearer\"}}');
             SELECT identity_sync.set_secret('dir', '{}');
             SELECT identity_sync.map('dir', 'userName',
                    $$identity_sync.slug(person.first_name || '.' || person.last_name)$$, on_create_only => true);
             SELECT identity_sync.map('dir', 'name.familyName', 'person.last_name');
             SELECT identity_sync.map('dir', 'title',
                    $$CASE person.source WHEN 'contractors' THEN 'Contractor' ELSE 'Employee' END$$);
             SELECT identity_sync.map('dir', 'emails[type eq \"work\"].value',
                    $$coalesce((SELECT p->>'email' FROM jsonb_array_elements(persons) AS p WHERE p->>'source' = 'contractors'),
                               identity_sync.slug(person.first_name || '.' || person.last_name) || '@example.com')$$);
             SELECT identity_sync.add_rule('dir', 'in_scope', $${condition}$$);",
            scim.base_url(),
            scim.token()
        ),
    );
}

/// The kinds of the events of one person in `dir`, in order.
fn kinds(c: &mut Client, person: &str) -> Vec<String> {
    column(
        c,
        &format!(
            "SELECT kind FROM identity_sync.events WHERE target = 'dir' AND person_key = '{person}' ORDER BY seq"
        ),
    )
}

/// The account of `person` in `dir`: (remote id, state), panics when there is none.
fn account(c: &mut Client, person: &str) -> (String, String) {
    let row = c
        .query_opt(
            "SELECT remote_id, state FROM identity_sync.accounts WHERE target = 'dir' AND person_key = $1",
            &[&person],
        )
        .expect("query accounts")
        .unwrap_or_else(|| panic!("{person} has no account in dir"));
    (row.get(0), row.get(1))
}

/// The one jsonb value `query` returns, parsed.
fn json(c: &mut Client, query: &str) -> serde_json::Value {
    let text: String = one(c, &format!("SELECT ({query})::text"));
    serde_json::from_str(&text).expect("jsonb as text is JSON")
}

/// The SCIM users whose userName is `name`.
fn scim_users_named(scim: &ScimServer, name: &str) -> Vec<serde_json::Value> {
    scim.users()
        .into_iter()
        .filter(|u| u["userName"] == name)
        .collect()
}

/// Acceptance 1: employees and contractors as two sources into one SCIM target; contractors get
/// accounts; a contractor hired as an employee (the match rule on the national id) keeps the
/// same account and id and gets one update, no create, no disable, also when the contractor
/// register's row goes afterwards (leaving one source while present in another is a mover).
#[test]
fn a_contractor_hired_as_employee_keeps_one_account() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    exec(
        &mut c,
        "SELECT identity_sync.add_person_source('contractor', 'contractor_id', source => 'contractors', priority => 50);
         SELECT identity_sync.set_person_match('a.national_id = b.national_id');",
    );
    add_directory(
        &mut c,
        &scim,
        "person.source = 'contractors' OR person.emp_no < 10010 OR person.national_id IS NOT NULL",
    );
    exec(&mut c, "SELECT identity_sync.resync('dir')");
    wait_idle(&mut c, 120);
    assert_all_done(&mut c, "dir");
    // Every contractor has an account of its own, under the key <source>:<key>.
    let contractors: Vec<String> = column(
        &mut c,
        "SELECT person_key FROM identity_sync.accounts WHERE target = 'dir' AND state = 'active'
            AND person_key LIKE 'contractors:%' ORDER BY 1",
    );
    assert_eq!(contractors.len(), 10, "{contractors:?}");
    // Employees 10001..10009 working today (an independent count over dept_emp).
    let working = count(
        &mut c,
        "SELECT count(DISTINCT emp_no) FROM dept_emp WHERE emp_no < 10010 AND from_date <= current_date AND to_date >= current_date",
    );
    let employees = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.accounts WHERE target = 'dir' AND person_key NOT LIKE 'contractors:%'",
    );
    assert_eq!(employees, working);
    assert_eq!(scim.users().len() as i64, 10 + working);
    let (id_before, _) = account(&mut c, "contractors:C-1003");
    let sofie = scim_users_named(&scim, "sofie.dejong");
    assert_eq!(sofie.len(), 1);
    assert_eq!(sofie[0]["title"], "Contractor");
    assert_eq!(
        sofie[0]["emails"][0]["value"],
        "sofie.dejong@brightsource.example"
    );

    // HR hires her: a new employee with the national id the contractor register holds.
    exec(
        &mut c,
        "INSERT INTO employee (emp_no, birth_date, first_name, last_name, gender, hire_date, national_id)
         VALUES (700001, '1991-06-25', 'Sofie', 'de Jong', 'F', current_date, 'NL-173300452');
         INSERT INTO dept_emp VALUES (700001, 'd007', current_date, '9999-01-01');",
    );
    wait_idle(&mut c, 60);
    assert_eq!(kinds(&mut c, "contractors:C-1003"), ["create", "update"]);
    assert!(
        kinds(&mut c, "700001").is_empty(),
        "the employee record is no person of its own"
    );
    let doc = json(&mut c, "SELECT identity_sync.person('contractors:C-1003')");
    assert_eq!(doc["person"]["source"], "default", "{doc}");
    assert_eq!(doc["persons"].as_array().map(Vec::len), Some(2), "{doc}");
    assert_eq!(doc["contract"]["dept_no"], "d007", "{doc}");
    let update = json(
        &mut c,
        "SELECT payload FROM identity_sync.events WHERE target = 'dir' AND person_key = 'contractors:C-1003' AND kind = 'update'",
    );
    assert_eq!(update["changed"]["title"], "Employee", "{update}");

    // The agency's assignment ends: her row leaves the contractor register. She is still an
    // employee: a mover, not a leaver (the e-mail falls back to the employee's).
    exec(
        &mut c,
        "DELETE FROM contractor WHERE contractor_id = 'C-1003'",
    );
    wait_idle(&mut c, 60);
    assert_all_done(&mut c, "dir");
    assert_eq!(
        kinds(&mut c, "contractors:C-1003"),
        ["create", "update", "update"]
    );
    let (id_after, state) = account(&mut c, "contractors:C-1003");
    assert_eq!(
        (id_after.as_str(), state.as_str()),
        (id_before.as_str(), "active")
    );
    let sofie = scim_users_named(&scim, "sofie.dejong");
    assert_eq!(sofie.len(), 1, "one account, never a second");
    assert_eq!(sofie[0]["id"], id_before.as_str());
    assert_eq!(sofie[0]["title"], "Employee");
    assert_eq!(sofie[0]["emails"][0]["value"], "sofie.dejong@example.com");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'dir' AND kind IN ('disable', 'delete')"
        ),
        0
    );
    assert_eq!(scim.users().len() as i64, 10 + working);
}

/// Acceptance 2: with both sources present person comes from the higher priority; when the
/// higher source's row goes, person falls back to the lower one with one update.
#[test]
fn person_falls_back_to_the_lower_priority_source_with_one_update() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    // Employee 10005 is contractor C-1004 too (the same national id).
    exec(
        &mut c,
        "UPDATE employee SET national_id = 'BE-850612337' WHERE emp_no = 10005;
         SELECT identity_sync.add_person_source('contractor', 'contractor_id', source => 'contractors', priority => 50);
         SELECT identity_sync.set_person_match('a.national_id = b.national_id');",
    );
    add_directory(
        &mut c,
        &scim,
        "person.emp_no = 10005 OR person.contractor_id = 'C-1004'",
    );
    exec(&mut c, "SELECT identity_sync.resync('dir')");
    wait_idle(&mut c, 60);
    assert_all_done(&mut c, "dir");
    // One person, known by the employee's key (the default source is linked first).
    assert_eq!(
        column::<String, Vec<_>>(
            &mut c,
            "SELECT person_key FROM identity_sync.accounts WHERE target = 'dir'"
        ),
        ["10005"]
    );
    let doc = json(&mut c, "SELECT identity_sync.person('10005')");
    assert_eq!(doc["person"]["source"], "default", "{doc}");
    assert_eq!(doc["person"]["last_name"], "Maliniak", "{doc}");
    assert_eq!(doc["persons"][1]["source"], "contractors", "{doc}");
    let (id, _) = account(&mut c, "10005");
    let (_, user) = scim.user(&id);
    assert_eq!(user["name"]["familyName"], "Maliniak");
    assert_eq!(user["title"], "Employee");
    // The e-mail comes from the contractor register although person is the employee.
    assert_eq!(user["emails"][0]["value"], "lucas@peeters-design.example");

    // The employee record goes: person is the contractor's record now.
    exec(&mut c, "DELETE FROM employee WHERE emp_no = 10005");
    wait_idle(&mut c, 60);
    assert_all_done(&mut c, "dir");
    assert_eq!(kinds(&mut c, "10005"), ["create", "update"]);
    let update = json(
        &mut c,
        "SELECT payload->'changed' FROM identity_sync.events WHERE target = 'dir' AND person_key = '10005' AND kind = 'update'",
    );
    assert_eq!(update["name.familyName"], "Peeters", "{update}");
    assert_eq!(update["title"], "Contractor", "{update}");
    let (id_after, state) = account(&mut c, "10005");
    assert_eq!((id_after.as_str(), state.as_str()), (id.as_str(), "active"));
    let (_, user) = scim.user(&id);
    assert_eq!(user["name"]["familyName"], "Peeters");
    assert_eq!(scim.users().len(), 1);
}

/// Acceptance 3: two records of one person in two sources are two persons until a match rule
/// joins them; set later, it merges them without a duplicate account, and merge_conflicts
/// lists the case where both had accounts until an operator resolves it.
#[test]
fn a_later_match_merges_persons_without_duplicate_accounts() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    exec(
        &mut c,
        "UPDATE employee SET national_id = 'NL-209913874' WHERE emp_no = 10002;   -- C-1002
         UPDATE employee SET national_id = 'NL-173300452' WHERE emp_no = 10003;   -- C-1003
         SELECT identity_sync.add_person_source('contractor', 'contractor_id', source => 'contractors', priority => 50);",
    );
    // 10002 and C-1002 both get an account; C-1003 is out of scope (10003 is in).
    add_directory(
        &mut c,
        &scim,
        "person.emp_no IN (10002, 10003) OR person.contractor_id = 'C-1002'",
    );
    exec(&mut c, "SELECT identity_sync.resync('dir')");
    wait_idle(&mut c, 60);
    assert_all_done(&mut c, "dir");
    let before: Vec<String> = column(
        &mut c,
        "SELECT person_key FROM identity_sync.accounts WHERE target = 'dir' ORDER BY 1",
    );
    assert_eq!(before, ["10002", "10003", "contractors:C-1002"]);
    assert_eq!(scim.users().len(), 3);

    exec(
        &mut c,
        "SELECT identity_sync.set_person_match('a.national_id = b.national_id')",
    );
    wait_idle(&mut c, 60);
    assert_all_done(&mut c, "dir");
    // No account more, none created.
    assert_eq!(
        column::<String, Vec<_>>(
            &mut c,
            "SELECT person_key FROM identity_sync.accounts WHERE target = 'dir' ORDER BY 1"
        ),
        before
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'dir' AND kind = 'create'"
        ),
        3
    );
    assert_eq!(scim.users().len(), 3);
    // C-1003 had no account: it is 10003 now, quietly.
    let doc = json(&mut c, "SELECT identity_sync.person('10003')");
    assert_eq!(doc["persons"].as_array().map(Vec::len), Some(2), "{doc}");
    // 10002 and C-1002 both had one: the first created keeps its account, the other is listed.
    let conflicts: Vec<(String, String, Vec<String>)> = c
        .query(
            "SELECT person_key, merged_key, targets FROM identity_sync.merge_conflicts WHERE resolved_at IS NULL",
            &[],
        )
        .expect("merge_conflicts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let (kept, merged, targets) = conflicts[0].clone();
    let mut pair = [kept.clone(), merged.clone()];
    pair.sort();
    assert_eq!(
        pair,
        ["10002".to_string(), "contractors:C-1002".to_string()]
    );
    assert_eq!(targets, ["dir"]);
    let doc = json(&mut c, &format!("SELECT identity_sync.person('{kept}')"));
    assert_eq!(doc["persons"].as_array().map(Vec::len), Some(2), "{doc}");
    // The merged person's account waits, untouched, also through a resync.
    exec(&mut c, "SELECT identity_sync.resync('dir')");
    wait_idle(&mut c, 60);
    assert_eq!(account(&mut c, &merged).1, "active");
    assert_eq!(kinds(&mut c, &merged), ["create"]);

    // The operator resolves it: the duplicate is retired.
    exec(
        &mut c,
        &format!("SELECT identity_sync.resolve_merge_conflict('{merged}')"),
    );
    wait_idle(&mut c, 60);
    assert_all_done(&mut c, "dir");
    assert_eq!(account(&mut c, &merged).1, "disabled");
    assert_eq!(account(&mut c, &kept).1, "active");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.merge_conflicts WHERE resolved_at IS NULL"
        ),
        0
    );

    // HR corrects a national id so that two records match now: captured like any change, the
    // claim merges them (C-1005 had no account: no conflict).
    exec(
        &mut c,
        "UPDATE employee SET national_id = 'DE-330918741' WHERE emp_no = 10004",
    );
    wait_idle(&mut c, 60);
    let doc = json(&mut c, "SELECT identity_sync.person('10004')");
    assert_eq!(doc["persons"][1]["contractor_id"], "C-1005", "{doc}");
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT person_key FROM identity_sync._person_link WHERE source = 'contractors' AND source_key = 'C-1005'"
        ),
        "10004"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.merge_conflicts"),
        1
    );
}

/// Issue 15, item 5: the contractor register lives in another PostgreSQL cluster, reached
/// with postgres_fdw; registered as a person source, the foreign table is captured by
/// snapshots, and a change made there reaches the SCIM target through the worker's scheduled
/// snapshot, with nobody calling _snapshot_source().
#[test]
fn a_foreign_table_source_reaches_the_target_through_the_workers_snapshot() {
    let (_cleanup, mut c) = fresh();
    let vendor = Cluster::start("sources-vendor", false, &[]);
    let mut v = vendor.client("postgres");
    exec(
        &mut v,
        &format!("SET client_min_messages = warning; {CONTRACTORS}"),
    );
    let scim = ScimServer::start();
    exec(
        &mut c,
        &format!(
            "DROP TABLE contractor;
             CREATE EXTENSION postgres_fdw;
             CREATE SERVER vendor FOREIGN DATA WRAPPER postgres_fdw
                 OPTIONS (host '127.0.0.1', port '{}', dbname 'postgres');
             -- identity_sync reads sources as identity_sync_evaluator, which is no superuser
             CREATE USER MAPPING FOR PUBLIC SERVER vendor OPTIONS (user 'postgres', password_required 'false');
             CREATE FOREIGN TABLE vendor_contractor (
                 contractor_id text, national_id text, first_name text, last_name text, birth_date date,
                 email text, company text, dept_no char(4), start_date date, end_date date)
                 SERVER vendor OPTIONS (table_name 'contractor');
             GRANT SELECT ON vendor_contractor TO identity_sync_evaluator;
             SELECT identity_sync.add_person_source('vendor_contractor', 'contractor_id', source => 'contractors', priority => 50);
             SELECT identity_sync.set_snapshot_interval('vendor_contractor', '1 second');",
            vendor.port()
        ),
    );
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT capture FROM identity_sync.source WHERE name = 'contractors'"
        ),
        "snapshot"
    );
    add_directory(&mut c, &scim, "person.source = 'contractors'");
    exec(&mut c, "SELECT identity_sync.resync('dir')");
    wait_idle(&mut c, 60);
    assert_eq!(scim.users().len(), 10, "every contractor has an account");
    // The worker's first snapshot of the foreign table.
    assert!(
        wait_until(Duration::from_secs(30), || {
            count(
            &mut c,
            "SELECT count(*) FROM identity_sync._snapshot s JOIN identity_sync.source x ON x.id = s.source_id
              WHERE x.name = 'contractors'"
        ) == 10
        }),
        "the worker never took a snapshot of the foreign table"
    );
    wait_idle(&mut c, 60);
    let (id, _) = account(&mut c, "contractors:C-1004");

    // The vendor's system changes a name; nothing in this database is written.
    exec(
        &mut v,
        "UPDATE contractor SET last_name = 'Peeters-Claes' WHERE contractor_id = 'C-1004'",
    );
    assert!(
        wait_until(Duration::from_secs(60), || scim.user(&id).1["name"]
            ["familyName"]
            == "Peeters-Claes"),
        "the change in the other cluster did not reach the SCIM target:\n{}",
        undone(&mut c, "dir")
    );
    wait_idle(&mut c, 60);
    assert_eq!(kinds(&mut c, "contractors:C-1004"), ["create", "update"]);
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.trace('contractors:C-1004') WHERE detail::text LIKE '%snapshot%'"
        ) > 0,
        "trace names the snapshot behind the update"
    );
    // A contractor leaves the register: a leaver (no other source has them).
    exec(
        &mut v,
        "DELETE FROM contractor WHERE contractor_id = 'C-1010'",
    );
    assert!(
        wait_until(Duration::from_secs(60), || {
            let (_, state) = account(&mut c, "contractors:C-1010");
            state == "disabled"
        }),
        "the contractor gone from the register was not disabled:\n{}",
        undone(&mut c, "dir")
    );
}
