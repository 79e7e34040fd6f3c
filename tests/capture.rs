//! Capture (issue 3): sources, the change outbox, snapshot capture, date boundaries and the
//! person document, on the employees sample.
//!
//! These tests run in a database of their own that no worker serves, so that what capture
//! writes stays in the outbox (`identity_sync.change`) and in `identity_sync.pending_changes`
//! for the test to look at, instead of being planned away at once.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::collections::BTreeSet;

const DB: &str = "capture_test";

/// A fresh database with the small employees sample and the extension, sources registered.
fn setup() -> Client {
    let mut c = sample_db(DB, "small");
    create_extension_with_sources(&mut c);
    c
}

/// The persons marked for planning.
fn pending(c: &mut Client) -> BTreeSet<String> {
    column(c, "SELECT person_key FROM identity_sync.pending_changes")
}

fn outbox_rows(c: &mut Client) -> i64 {
    count(c, "SELECT count(*) FROM identity_sync.change")
}

fn clear(c: &mut Client) {
    exec(
        c,
        "DELETE FROM identity_sync.change; DELETE FROM identity_sync._dirty;",
    );
}

#[test]
fn committed_update_marks_exactly_that_person_rolled_back_marks_nothing() {
    let mut c = setup();
    assert!(pending(&mut c).is_empty());

    c.batch_execute("UPDATE employee SET last_name = 'Changed' WHERE emp_no = 10001")
        .unwrap();
    assert_eq!(pending(&mut c), BTreeSet::from(["10001".to_string()]));
    assert_eq!(outbox_rows(&mut c), 1);
    clear(&mut c);

    c.batch_execute(
        "BEGIN; UPDATE employee SET last_name = 'Nope' WHERE emp_no = 10002; ROLLBACK;",
    )
    .unwrap();
    assert!(
        pending(&mut c).is_empty(),
        "a rolled-back change must leave nothing"
    );
    assert_eq!(outbox_rows(&mut c), 0);

    // A statement touching no row writes nothing either.
    c.batch_execute("UPDATE employee SET last_name = 'x' WHERE emp_no = -1")
        .unwrap();
    assert_eq!(outbox_rows(&mut c), 0);
}

#[test]
fn bulk_update_writes_one_outbox_row_and_each_person_once() {
    // The large sample has 11,051 dept_emp rows; take the first 10,000. (Loaded before the
    // sources are registered: the loader drops and creates the tables, which identity_sync
    // refuses for registered sources.)
    let mut c = sample_db(DB, "large");
    c.batch_execute(&format!(
        "SET client_min_messages = warning;
         CREATE EXTENSION identity_sync; {EVALUATOR_GRANTS}
         SELECT identity_sync.add_person_source('employee', 'emp_no');
         SELECT identity_sync.add_contract_source('dept_emp', 'emp_no', 'from_date', 'to_date');"
    ))
    .unwrap();
    c.batch_execute(
        "UPDATE dept_emp SET from_date = from_date
          WHERE (emp_no, dept_no) IN (SELECT emp_no, dept_no FROM dept_emp ORDER BY emp_no, dept_no LIMIT 10000)",
    )
    .unwrap();
    assert_eq!(outbox_rows(&mut c), 1, "one outbox row per statement");
    let expected: BTreeSet<String> = column(
        &mut c,
        "SELECT DISTINCT emp_no::text FROM (SELECT emp_no, dept_no FROM dept_emp ORDER BY emp_no, dept_no LIMIT 10000) q",
    );
    let rows: Vec<(String, i64)> = c
        .query(
            "SELECT person_key, count(*) OVER () FROM identity_sync.pending_changes",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let got: BTreeSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(
        rows.len(),
        got.len(),
        "pending_changes has one row per person"
    );
    assert_eq!(got, expected);

    // The planner's claim deduplicates: each person once in the dirty set.
    let claimed: i32 = c
        .query_one("SELECT identity_sync._claim_changes(100)", &[])
        .unwrap()
        .get(0);
    assert_eq!(claimed as usize, expected.len());
    let dirty: i64 = c
        .query_one("SELECT count(*) FROM identity_sync._dirty", &[])
        .unwrap()
        .get(0);
    assert_eq!(dirty as usize, expected.len());
    assert_eq!(outbox_rows(&mut c), 0);
}

#[test]
fn key_update_insert_delete_and_truncate() {
    let mut c = setup();
    c.batch_execute("ALTER TABLE dept_emp DROP CONSTRAINT dept_emp_emp_no_fkey; ALTER TABLE dept_manager DROP CONSTRAINT dept_manager_emp_no_fkey; ALTER TABLE title DROP CONSTRAINT title_emp_no_fkey; ALTER TABLE salary DROP CONSTRAINT salary_emp_no_fkey;")
        .unwrap();
    c.batch_execute("UPDATE employee SET emp_no = 99001 WHERE emp_no = 10001")
        .unwrap();
    assert_eq!(
        pending(&mut c),
        BTreeSet::from(["10001".to_string(), "99001".to_string()]),
        "a key change marks the old and the new person"
    );
    clear(&mut c);

    c.batch_execute(
        "INSERT INTO employee VALUES (99002, '1990-01-01', 'New', 'Person', 'F', '2020-01-01');
         DELETE FROM employee WHERE emp_no = 10002;",
    )
    .unwrap();
    assert_eq!(
        pending(&mut c),
        BTreeSet::from(["99002".to_string(), "10002".to_string()])
    );
    let ops: Vec<String> = c
        .query("SELECT op FROM identity_sync.change ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ops, ["insert", "delete"]);
    clear(&mut c);

    // TRUNCATE of a source: every person of the person source is dirty.
    c.batch_execute("TRUNCATE dept_emp").unwrap();
    let all: BTreeSet<String> = column(&mut c, "SELECT emp_no::text FROM employee");
    assert_eq!(pending(&mut c), all);
}

#[test]
fn renaming_a_department_marks_exactly_its_members() {
    let mut c = setup();
    c.batch_execute("UPDATE department SET dept_name = 'Sales & Marketing' WHERE dept_no = 'd007'")
        .unwrap();
    let members: BTreeSet<String> = column(
        &mut c,
        "SELECT DISTINCT emp_no::text FROM dept_emp WHERE dept_no = 'd007'",
    );
    assert!(!members.is_empty());
    assert_eq!(pending(&mut c), members);
}

#[test]
fn snapshot_capture_of_a_view_sees_edit_insert_and_delete() {
    let mut c = sample_db(DB, "small");
    create_extension(&mut c);
    c.batch_execute(
        "CREATE VIEW person_view AS SELECT emp_no, first_name, last_name FROM employee;
         SELECT identity_sync.add_person_source('person_view', 'emp_no');",
    )
    .unwrap();
    let capture: String = c
        .query_one("SELECT capture FROM identity_sync.source", &[])
        .unwrap()
        .get(0);
    assert_eq!(capture, "snapshot");

    // The first comparison sees everybody (nothing was known before).
    c.batch_execute("SELECT identity_sync._snapshot_source(id) FROM identity_sync.source")
        .unwrap();
    assert_eq!(pending(&mut c).len(), 1000);
    clear(&mut c);

    // Nothing changed: nothing dirty.
    c.batch_execute("SELECT identity_sync._snapshot_source(id) FROM identity_sync.source")
        .unwrap();
    assert!(pending(&mut c).is_empty());

    c.batch_execute(
        "UPDATE employee SET last_name = 'Edited' WHERE emp_no = 10003;
         INSERT INTO employee VALUES (99003, '1990-01-01', 'Snap', 'Shot', 'M', '2020-01-01');
         DELETE FROM salary WHERE emp_no = 10004; DELETE FROM title WHERE emp_no = 10004;
         DELETE FROM dept_emp WHERE emp_no = 10004; DELETE FROM dept_manager WHERE emp_no = 10004;
         DELETE FROM employee WHERE emp_no = 10004;
         SELECT identity_sync._snapshot_source(id) FROM identity_sync.source;",
    )
    .unwrap();
    assert_eq!(
        pending(&mut c),
        BTreeSet::from([
            "10003".to_string(),
            "99003".to_string(),
            "10004".to_string()
        ])
    );

    // The interval is configurable per source; the worker's housekeeping honours it.
    c.batch_execute("SELECT identity_sync.set_snapshot_interval('person_view', '1 hour')")
        .unwrap();
    let every: String = c
        .query_one(
            "SELECT snapshot_interval::text FROM identity_sync.source",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(every, "01:00:00");
}

#[test]
fn boundary_check_marks_a_leaver_without_dml() {
    let mut c = setup();
    // Person 10010 leaves: its last contract ends "yesterday" as the clock sees it.
    c.batch_execute(
        "UPDATE dept_emp SET to_date = '2020-06-14' WHERE emp_no = 10010;
         DELETE FROM identity_sync.change;
         SELECT identity_sync.set_clock('2020-06-10 12:00+00');
         SELECT identity_sync._check_boundaries();",
    )
    .unwrap();
    // The first check only records the day.
    assert!(pending(&mut c).is_empty());
    c.batch_execute(
        "SELECT identity_sync.set_clock('2020-06-15 09:00+00');
         SELECT identity_sync._check_boundaries();",
    )
    .unwrap();
    let dirty = pending(&mut c);
    assert!(dirty.contains("10010"), "the leaver is dirty: {dirty:?}");
    // Exactly the persons whose contracts start or end in the days crossed.
    let expected: BTreeSet<String> = column(
        &mut c,
        "SELECT DISTINCT emp_no::text FROM dept_emp
          WHERE from_date > '2020-06-10' AND from_date <= '2020-06-15'
             OR to_date + 1 > '2020-06-10' AND to_date + 1 <= '2020-06-15'",
    );
    assert_eq!(dirty, expected);

    // Remembered: checking again the same day marks nothing new.
    clear(&mut c);
    c.batch_execute("SELECT identity_sync._check_boundaries()")
        .unwrap();
    assert!(pending(&mut c).is_empty());

    // The check finds the contracts by the indexes add_contract_source made on their dates,
    // not by a full scan: the plan of the statement _check_boundaries runs, as auto_explain
    // reports it to this session.
    let (mut e, notices) = connect_with_notices(config(DB));
    e.batch_execute(
        "LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_nested_statements = on;
         SET auto_explain.log_level = notice;
         SELECT identity_sync.set_clock('2020-06-20 09:00+00');
         SELECT identity_sync._check_boundaries();",
    )
    .unwrap();
    let plans: Vec<String> = notices
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.message.clone())
        .filter(|m| m.contains("::interval[])") && m.contains("dept_emp"))
        .collect();
    assert_eq!(plans.len(), 1, "one boundary query: {plans:#?}");
    let plan = &plans[0];
    for index in [
        "dept_emp_from_date_identity_sync",
        "dept_emp_to_date_identity_sync",
    ] {
        assert!(plan.contains(index), "{index} unused:\n{plan}");
    }
    assert!(
        !plan.contains("Seq Scan on dept_emp"),
        "a full scan:\n{plan}"
    );
}

#[test]
fn person_document() {
    let mut c = setup();
    let doc: serde_json::Value = c
        .query_one("SELECT identity_sync.person('10010')::text", &[])
        .map(|r| serde_json::from_str(&r.get::<_, String>(0)).unwrap())
        .unwrap();
    assert_eq!(doc["person_key"], "10010");
    assert_eq!(doc["person"]["first_name"], "Duangkaew");
    let contracts = doc["contracts"].as_array().unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM dept_emp WHERE emp_no = 10010", &[])
        .unwrap()
        .get(0);
    assert_eq!(contracts.len() as i64, n);
    // Primary contract by default: active first, then latest end, then latest start.
    let primary: String = c
        .query_one(
            "SELECT dept_no FROM dept_emp WHERE emp_no = 10010
              ORDER BY (from_date <= current_date AND to_date >= current_date) DESC, to_date DESC, from_date DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(doc["contract"]["dept_no"], primary.as_str());

    // A configured order is used, and a broken one is refused.
    c.batch_execute("SELECT identity_sync.set_primary_contract('contract.from_date ASC')")
        .unwrap();
    let first: String = c
        .query_one(
            "SELECT dept_no FROM dept_emp WHERE emp_no = 10010 ORDER BY from_date LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let doc: String = c
        .query_one(
            "SELECT identity_sync.person('10010')->'contract'->>'dept_no'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(doc, first);
    let e = error_of(
        &mut c,
        "SELECT identity_sync.set_primary_contract('contract.no_such_column')",
    );
    assert!(e.message().contains("no_such_column"), "{}", e.message());
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    let mut c = sample_db(DB, "small");
    create_extension(&mut c);
    let sources = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM identity_sync.source", &[])
            .unwrap()
            .get(0)
    };
    let triggers = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'identity_sync%'",
            &[],
        )
        .unwrap()
        .get(0)
    };

    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_person_source('no_such_table', 'emp_no')",
    );
    assert!(e.message().contains("does not exist"), "{}", e.message());

    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_person_source('employee', 'no_such_column')",
    );
    assert_eq!(
        e.message(),
        "column \"no_such_column\" of relation public.employee does not exist"
    );
    assert!(e.hint().unwrap_or_default().contains("emp_no"));

    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_person_source('employee', 'last_name')",
    );
    assert!(
        e.message()
            .contains("not backed by a primary key or unique index"),
        "{}",
        e.message()
    );
    assert!(e.hint().unwrap_or_default().contains("CREATE UNIQUE INDEX"));

    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_contract_source('dept_emp', 'emp_no', 'dept_no', 'to_date')",
    );
    assert!(
        e.message().contains("must be of type date or timestamp"),
        "{}",
        e.message()
    );

    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_related_source('department', 'SELECT emp_no, dept_no FROM dept_emp JOIN changed USING (dept_no)')",
    );
    assert!(e.message().contains("returns 2 columns"), "{}", e.message());
    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_related_source('department', 'SELECT nope FROM changed')",
    );
    assert_eq!(e.message(), "column \"nope\" does not exist");
    assert!(
        e.detail()
            .unwrap_or_default()
            .contains("at character 8 of the expression"),
        "{:?}",
        e.detail()
    );

    assert_eq!(sources(&mut c), 0, "nothing half-registered");
    assert_eq!(triggers(&mut c), 0, "no trigger left behind");

    c.batch_execute("SELECT identity_sync.add_person_source('employee', 'emp_no')")
        .unwrap();
    let e = error_of(
        &mut c,
        "SELECT identity_sync.add_person_source('employee', 'emp_no')",
    );
    assert!(e.message().contains("already a source"), "{}", e.message());
    assert!(e.hint().unwrap_or_default().contains("drop_source"));
    assert_eq!(sources(&mut c), 1);

    c.batch_execute("SELECT identity_sync.drop_source('employee')")
        .unwrap();
    assert_eq!(sources(&mut c), 0);
    assert_eq!(triggers(&mut c), 0, "drop_source removes the triggers");
}

#[test]
fn quoted_mixed_case_and_spaced_identifiers() {
    let mut c = fresh_db(DB);
    create_extension(&mut c);
    c.batch_execute(
        "CREATE SCHEMA \"HR Data\";
         CREATE TABLE \"HR Data\".\"People List\" (\"Person Key\" text PRIMARY KEY, \"Given Name\" text);
         CREATE TABLE \"HR Data\".\"Job\" (\"Person Key\" text, \"Start\" date, \"End\" date);
         GRANT USAGE ON SCHEMA \"HR Data\" TO identity_sync_evaluator;
         GRANT SELECT ON ALL TABLES IN SCHEMA \"HR Data\" TO identity_sync_evaluator;
         SELECT identity_sync.add_person_source('\"HR Data\".\"People List\"', 'Person Key');
         SELECT identity_sync.add_contract_source('\"HR Data\".\"Job\"', 'Person Key', 'Start', 'End');
         INSERT INTO \"HR Data\".\"People List\" VALUES ('a''b \"c\"', 'Ann');
         INSERT INTO \"HR Data\".\"Job\" VALUES ('a''b \"c\"', '2020-01-01', NULL);",
    )
    .unwrap();
    assert_eq!(pending(&mut c), BTreeSet::from(["a'b \"c\"".to_string()]));
    let name: String = c
        .query_one(
            "SELECT identity_sync.person('a''b \"c\"')->'person'->>'Given Name'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(name, "Ann");
}

/// An HR schema change never leaves every HR write failing: a rename of the person key is
/// followed (the writes after it are captured and planned), changes that would break capture
/// or planning are refused with a message that says what to do, and the writes go on.
#[test]
fn hr_schema_changes_are_followed_or_refused() {
    let mut c = setup();
    c.batch_execute(
        "SELECT identity_sync.add_target('t', 'webhook', 'http://127.0.0.1:9/', '{\"dry_run\": true}');
         SELECT identity_sync.map('t', 'family', 'person.last_name');
         SELECT identity_sync.add_rule('t', 'all', 'true');",
    )
    .unwrap();

    // Followed: the registration, the capture triggers and the compiled target.
    c.batch_execute("ALTER TABLE employee RENAME COLUMN emp_no TO employee_no")
        .unwrap();
    let key: String = one(
        &mut c,
        "SELECT key_column::text FROM identity_sync.source WHERE role = 'person'",
    );
    assert_eq!(key, "employee_no");
    clear(&mut c);
    c.batch_execute(
        "UPDATE employee SET last_name = 'Renamed' WHERE employee_no = 10001;
         SELECT identity_sync._plan(100);",
    )
    .unwrap();
    let family: String = one(
        &mut c,
        "SELECT payload->'attributes'->>'family' FROM identity_sync.event WHERE person_key = '10001' ORDER BY id DESC LIMIT 1",
    );
    assert_eq!(family, "Renamed");

    // Refused: the related source's query reads dept_emp.emp_no; the person source's table.
    let (code, message, _, hint) = error_parts(
        &mut c,
        "ALTER TABLE dept_emp RENAME COLUMN emp_no TO employee_no",
    );
    assert_eq!(code, "2BP01");
    assert_eq!(
        message,
        "this change breaks the affected query of related source public.department"
    );
    assert!(hint.contains("drop_source('public.department')"), "{hint}");
    let (code, message, _, hint) = error_parts(&mut c, "DROP TABLE employee CASCADE");
    assert_eq!(code, "2BP01");
    assert_eq!(
        message,
        "cannot drop table public.employee: it is an identity_sync source"
    );
    assert!(hint.contains("drop_source('public.employee')"), "{hint}");

    // Every source is still captured.
    clear(&mut c);
    c.batch_execute(
        "UPDATE employee SET last_name = 'Again' WHERE employee_no = 10002;
         UPDATE dept_emp SET to_date = to_date WHERE emp_no = 10003;",
    )
    .unwrap();
    assert_eq!(
        pending(&mut c),
        BTreeSet::from(["10002".to_string(), "10003".to_string()])
    );
}

/// Restores the worker's naptime however the test ends.
struct NaptimeGuard;
impl Drop for NaptimeGuard {
    fn drop(&mut self) {
        let mut c = db();
        let _ = c.batch_execute("ALTER SYSTEM RESET identity_sync.naptime");
        let _ = c.batch_execute("SELECT pg_reload_conf()");
    }
}

/// The commit of a captured change wakes the worker through its latch: with the timer fallback
/// set to an hour, the change is still planned at once (the deadline below is only a bound for
/// a failing run; without the wake-up the worker would sleep for the hour).
#[test]
fn commit_wakes_the_worker() {
    let mut c = db();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || worker_pid(&mut c)
            .is_some()),
        "no worker"
    );
    // (The extension goes first: the loader drops and creates the sample's tables, which
    // identity_sync refuses while they are registered sources.)
    drop_extension(&mut c);
    load_employees(&mut c, "small");
    c.batch_execute(&format!(
        "SET client_min_messages = warning;
         CREATE EXTENSION identity_sync; {EVALUATOR_GRANTS}
         SELECT identity_sync.add_person_source('employee', 'emp_no');
         SELECT identity_sync.add_target('quiet', 'webhook', 'http://127.0.0.1:9/never', '{{\"dry_run\": true}}');
         SELECT identity_sync.add_rule('quiet', 'all', 'true');"
    ))
    .unwrap();
    let _guard = NaptimeGuard;
    c.batch_execute("ALTER SYSTEM SET identity_sync.naptime = '1h'")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    // Let the worker finish the round the reload woke it for, then sleep.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before: i64 = c
        .query_one("SELECT count(*) FROM identity_sync.plan_run", &[])
        .unwrap()
        .get(0);
    c.batch_execute("UPDATE employee SET last_name = 'Woken' WHERE emp_no = 10001")
        .unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || {
            c.query_one(
                "SELECT count(*) FROM identity_sync.plan_run WHERE '10001' = ANY (keys)",
                &[],
            )
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
        }),
        "the committed change was not planned: the worker was not woken"
    );
    let after: i64 = c
        .query_one("SELECT count(*) FROM identity_sync.plan_run", &[])
        .unwrap()
        .get(0);
    assert!(after > before);
    let account: String = c
        .query_one(
            "SELECT state FROM identity_sync.account WHERE person_key = '10001'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(account, "active");
    drop_extension(&mut c);
}

/// pg_dump and pg_restore keep the configuration, the registry and working capture triggers
/// (the generic trigger function is part of the extension; its arguments carry the source).
#[test]
fn dump_and_restore_keep_configuration_and_capture() {
    let mut c = setup();
    c.batch_execute(
        "SELECT identity_sync.add_target('t', 'webhook', 'http://127.0.0.1:9/', '{\"dry_run\": true}');
         SELECT identity_sync.map('t', 'family', 'person.last_name');
         SELECT identity_sync.add_rule('t', 'all', 'true');
         SELECT identity_sync.resync('t');
         SELECT identity_sync._plan(5000);",
    )
    .unwrap();
    let accounts_before: i64 = c
        .query_one("SELECT count(*) FROM identity_sync.account", &[])
        .unwrap()
        .get(0);
    assert!(accounts_before > 500, "{accounts_before} accounts planned");
    let dump =
        std::env::temp_dir().join(format!("identity_sync_capture_{}.dump", std::process::id()));
    let env = |cmd: &mut std::process::Command| {
        cmd.env("PGHOST", harness_env("PGHOST"))
            .env("PGPORT", harness_env("PGPORT"))
            .env("PGUSER", "postgres");
    };
    let mut pg_dump = std::process::Command::new("pg_dump");
    env(&mut pg_dump);
    let st = pg_dump
        .args(["-Fc", "-d", DB, "-f"])
        .arg(&dump)
        .status()
        .expect("run pg_dump");
    assert!(st.success());
    let restored = "capture_test_restored";
    drop(fresh_db(restored));
    let mut pg_restore = std::process::Command::new("pg_restore");
    env(&mut pg_restore);
    run_ok(pg_restore.args(["-d", restored]).arg(&dump), "pg_restore");
    let _ = std::fs::remove_file(&dump);
    let mut r = db_named(restored);
    let accounts: i64 = r
        .query_one("SELECT count(*) FROM identity_sync.account", &[])
        .unwrap()
        .get(0);
    assert_eq!(accounts, accounts_before);
    r.batch_execute(
        "UPDATE employee SET last_name = 'Restored' WHERE emp_no = 10001;
         SELECT identity_sync._plan(100);",
    )
    .unwrap();
    let changed: serde_json::Value = r
        .query_one(
            "SELECT (payload->'changed')::text FROM identity_sync.event WHERE person_key = '10001' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .map(|row| serde_json::from_str(&row.get::<_, String>(0)).unwrap())
        .unwrap();
    assert_eq!(changed["family"], "Restored");
    drop(r);
    db().batch_execute(&format!("DROP DATABASE {restored} WITH (FORCE)"))
        .unwrap();
}
