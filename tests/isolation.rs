//! End-to-end tests of the isolation of user SQL (issue 13, items 2 and 3): a runaway mapping
//! is cancelled at its target's `statement_timeout` and fails that target alone, which is
//! retried with backoff while the other targets are planned and delivered; errors name the
//! expression they came from; expressions run as `identity_sync.run_as`, never a superuser, so
//! a non-superuser administrator cannot read server files or become superuser through them;
//! a related source's runaway affected query does not hold up HR writes.
//!
//! Every test builds its state from scratch in the harness cluster's database `postgres` (the
//! worker's). Run by `scripts/test` (e2e layer, `--test-threads=1`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::time::Duration;

/// A setting of the harness cluster changed with ALTER SYSTEM (and reloaded) while it lives.
struct Setting(&'static str);

impl Setting {
    /// Set `name` to `value`; `shown` is how SHOW then displays it.
    fn set(c: &mut Client, name: &'static str, value: &str, shown: &str) -> Setting {
        exec(c, &format!("ALTER SYSTEM SET {name} = '{value}'"));
        exec(c, "SELECT pg_reload_conf()");
        // a new session reads the reloaded file once the postmaster has
        assert!(
            wait_until(Duration::from_secs(10), || one::<String>(
                &mut db(),
                &format!("SHOW {name}")
            ) == shown),
            "{name} was not reloaded"
        );
        Setting(name)
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        let mut c = db();
        let _ = c.batch_execute(&format!("ALTER SYSTEM RESET {}", self.0));
        let _ = c.batch_execute("SELECT pg_reload_conf()");
    }
}

/// A role of the cluster, dropped (with what it owns in database `postgres`) when it goes.
struct Role(&'static str);

impl Drop for Role {
    fn drop(&mut self) {
        let mut c = db();
        let _ = c.batch_execute(&format!(
            "DROP OWNED BY {0} CASCADE; DROP ROLE IF EXISTS {0}",
            self.0
        ));
    }
}

fn plan_failures(c: &mut Client, target: &str) -> i32 {
    one(
        c,
        &format!("SELECT plan_failures FROM identity_sync.target WHERE name = '{target}'"),
    )
}

/// A mapping that runs past its target's statement_timeout fails that target: status says
/// failing and names the mapping, its persons wait, it is tried again with backoff; meanwhile
/// the other target is planned and delivered, changes included. Fixing the mapping plans the
/// waiting persons.
#[test]
fn a_runaway_mapping_fails_its_target_while_another_target_delivers() {
    let (_cleanup, mut c) = fresh_small_sample();
    let hook = WebhookReceiver::start();
    let pid = worker_pid(&mut c).expect("a worker");
    exec(
        &mut c,
        &format!(
            "SET client_min_messages = warning;
             SELECT identity_sync.add_target('feed', 'webhook', '{url}');
             SELECT identity_sync.map('feed', 'name', $$person.first_name || ' ' || person.last_name$$);
             SELECT identity_sync.add_rule('feed', 'first', $$person.emp_no <= 10020$$);
             SELECT identity_sync.add_target('slow', 'webhook', 'http://127.0.0.1:9/never',
                    '{{\"dry_run\": true, \"statement_timeout\": \"1s\"}}');
             SELECT identity_sync.map('slow', 'name', $$person.first_name$$);
             SELECT identity_sync.map('slow', 'sleepy', $$(SELECT pg_sleep(60))::text$$);
             SELECT identity_sync.add_rule('slow', 'first', $$person.emp_no <= 10020$$);
             SELECT identity_sync.resync('feed');
             SELECT identity_sync.resync('slow');",
            url = hook.url("/feed")
        ),
    );
    // The healthy target is planned and its creates arrive (one per person still working
    // among the first 20), and the failing one is marked.
    wait_idle(&mut c, 120);
    let accounts = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.accounts WHERE target = 'feed' AND state = 'active'",
    );
    assert!(accounts > 0);
    assert_eq!(hook.count() as i64, accounts);
    assert!(
        wait_until(Duration::from_secs(60), || one::<String>(
            &mut c,
            "SELECT state FROM identity_sync.status WHERE target = 'slow'"
        ) == "failing"),
        "slow is not failing"
    );
    let (state, last_error, since, next): (String, String, bool, bool) = {
        let r = c
            .query_one(
                "SELECT state, last_error, plan_failing_since IS NOT NULL, next_plan_attempt IS NOT NULL
                   FROM identity_sync.status WHERE target = 'slow'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    assert_eq!(state, "failing");
    assert_eq!(
        last_error,
        "planning: mapping \"sleepy\" timed out after 1s"
    );
    assert!(since && next);
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT state FROM identity_sync.status WHERE target = 'feed'"
        ),
        "active"
    );
    // The persons of the failing target wait for it (trace says why); it has no account yet.
    assert!(count(&mut c, "SELECT count(*) FROM identity_sync._deferred") >= 1);
    let waiting: String = one(
        &mut c,
        "SELECT detail->>'reason' FROM identity_sync.trace('10001') WHERE step = 'waiting' AND target = 'slow'",
    );
    assert_eq!(waiting, "mapping \"sleepy\" timed out after 1s");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'slow'"
        ),
        0
    );

    // An HR change goes to the healthy target while the other keeps failing, tried again
    // with backoff (each attempt counted).
    hook.clear();
    exec(
        &mut c,
        "UPDATE employee SET last_name = 'Isolated' WHERE emp_no = 10001",
    );
    assert!(
        hook.wait_for(1, Duration::from_secs(60)),
        "the update of 10001 did not arrive"
    );
    let update = &hook.requests()[0];
    assert_eq!(update.json()["type"], "update");
    assert_eq!(update.json()["attributes"]["name"], "Georgi Isolated");
    assert!(
        wait_until(Duration::from_secs(120), || plan_failures(&mut c, "slow")
            >= 2),
        "slow was not tried again"
    );
    assert_eq!(
        worker_pid(&mut c),
        Some(pid),
        "the worker is the same process"
    );

    // Fixed: the waiting persons are planned at once (the configuration change retries).
    exec(&mut c, "SELECT identity_sync.unmap('slow', 'sleepy')");
    assert!(
        wait_until(Duration::from_secs(60), || count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'slow'"
        ) == accounts),
        "the waiting persons were not planned"
    );
    wait_idle(&mut c, 60);
    let r = c
        .query_one(
            "SELECT state, last_error FROM identity_sync.status WHERE target = 'slow'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "active");
    assert_eq!(r.get::<_, Option<String>>(1), None);
    assert_eq!(plan_failures(&mut c, "slow"), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._deferred"),
        0
    );
}

/// Errors name the mapping they came from: one person's data (a subquery returning two rows
/// for movers) fails that person, with the mapping in the message; a privilege taken away after
/// configuration fails the whole target before any expression runs, and is named too.
#[test]
fn a_plan_error_names_the_expression() {
    let (_cleanup, mut c) = fresh_small_sample();
    exec(
        &mut c,
        "SET client_min_messages = warning;
         SELECT identity_sync.add_target('dry', 'webhook', 'http://127.0.0.1:9/never', '{\"dry_run\": true}');
         SELECT identity_sync.map('dry', 'name', $$person.first_name$$);
         SELECT identity_sync.map('dry', 'department', $$(SELECT dept_no FROM dept_emp d WHERE d.emp_no = person.emp_no)$$);
         SELECT identity_sync.add_rule('dry', 'first', $$person.emp_no <= 10100$$);
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 120);
    let mover: String = one(
        &mut c,
        "SELECT emp_no::text FROM dept_emp WHERE emp_no <= 10100 GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 1",
    );
    let message: String = one(
        &mut c,
        &format!("SELECT message FROM identity_sync._plan_error WHERE person_key = '{mover}'"),
    );
    assert_eq!(
        message,
        "mapping \"department\": more than one row returned by a subquery used as an expression"
    );
    let status: (String, String) = {
        let r = c
            .query_one(
                "SELECT state, last_error FROM identity_sync.status WHERE target = 'dry'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status.0, "failing");
    assert!(
        status.1.starts_with("person ")
            && status.1.ends_with(": mapping \"department\": more than one row returned by a subquery used as an expression"),
        "{}",
        status.1
    );

    // The evaluator loses a privilege the department mapping needs: the whole target fails
    // as the executor starts, and the check of each expression finds which one it was.
    exec(
        &mut c,
        "SELECT identity_sync.map('dry', 'department', $$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)$$);
         REVOKE SELECT ON department FROM identity_sync_evaluator;
         UPDATE employee SET last_name = 'Revoked' WHERE emp_no = 10001;",
    );
    assert!(
        wait_until(Duration::from_secs(60), || one::<Option<String>>(
            &mut c,
            "SELECT last_error FROM identity_sync.status WHERE target = 'dry'"
        )
        .is_some_and(|e| e.starts_with("planning: "))),
        "the target did not fail"
    );
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT last_error FROM identity_sync.status WHERE target = 'dry'"
        ),
        "planning: mapping \"department\": permission denied for table department"
    );
    // Granted again and retried by the operator: planned (a resync clears the movers'
    // errors of the first mapping too).
    exec(
        &mut c,
        "GRANT SELECT ON department TO identity_sync_evaluator;
         SELECT identity_sync.retry('dry');",
    );
    assert!(
        wait_until(Duration::from_secs(60), || {
            one::<Option<String>>(
            &mut c,
            "SELECT planned_attributes->>'department' FROM identity_sync.account WHERE person_key = '10001'"
        )
        .as_deref()
            == Some("Development")
        }),
        "10001 was not planned again"
    );
    exec(&mut c, "SELECT identity_sync.resync('dry')");
    wait_idle(&mut c, 120);
    let r = c
        .query_one(
            "SELECT state, last_error FROM identity_sync.status WHERE target = 'dry'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "active");
    assert_eq!(r.get::<_, Option<String>>(1), None);
}

/// A non-superuser administrator cannot read server files, list directories or become
/// superuser through a mapping: refused with `permission denied` when configured, or failing
/// for each person when the worker evaluates it (through SECURITY INVOKER functions it wrote);
/// the file's content appears nowhere and the role stays what it was.
#[test]
fn a_non_superuser_admin_cannot_escalate_through_expressions() {
    let (_cleanup, mut c) = fresh_small_sample();
    let _role = Role("iso_admin");
    exec(
        &mut c,
        "DROP ROLE IF EXISTS iso_admin;
         CREATE ROLE iso_admin LOGIN IN ROLE identity_sync_admin;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO iso_admin;
         GRANT CREATE ON SCHEMA public TO iso_admin;",
    );
    let mut cfg = config("postgres");
    cfg.user("iso_admin");
    let mut admin = connect(&cfg);
    assert!(!one::<bool>(
        &mut admin,
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ));
    exec(
        &mut admin,
        "SET client_min_messages = warning;
         SELECT identity_sync.add_target('dry', 'webhook', 'http://127.0.0.1:9/never', '{\"dry_run\": true}');
         SELECT identity_sync.map('dry', 'name', $$person.first_name$$);
         SELECT identity_sync.add_rule('dry', 'first', $$person.emp_no <= 10010$$);",
    );
    // Straight in an expression: refused when configured.
    for (attribute, expression, function) in [
        ("passwd", "pg_read_file('/etc/passwd')", "pg_read_file"),
        (
            "dir",
            "(SELECT string_agg(f, ',') FROM pg_ls_dir('.') AS f)",
            "pg_ls_dir",
        ),
    ] {
        let (code, message, _, _) = error_parts(
            &mut admin,
            &format!("SELECT identity_sync.map('dry', '{attribute}', $${expression}$$)"),
        );
        assert_eq!(code, "42501", "{message}");
        assert_eq!(
            message,
            format!("permission denied for function {function}")
        );
    }
    // Through SECURITY INVOKER functions the probe does not run: they fail for each person
    // when the worker evaluates them.
    exec(
        &mut admin,
        "CREATE FUNCTION peek() RETURNS text LANGUAGE plpgsql SECURITY INVOKER AS
             $$ BEGIN RETURN pg_read_file('/etc/passwd'); END $$;
         CREATE FUNCTION look() RETURNS text LANGUAGE plpgsql SECURITY INVOKER AS
             $$ BEGIN RETURN (SELECT string_agg(f, ',') FROM pg_ls_dir('.') AS f); END $$;
         CREATE FUNCTION promote() RETURNS text LANGUAGE plpgsql SECURITY INVOKER AS
             $$ BEGIN ALTER ROLE iso_admin SUPERUSER; RETURN 'promoted'; END $$;
         GRANT EXECUTE ON FUNCTION peek(), look(), promote() TO PUBLIC;",
    );
    for (attribute, function, expected) in [
        (
            "passwd",
            "peek()",
            "permission denied for function pg_read_file",
        ),
        ("dir", "look()", "permission denied for function pg_ls_dir"),
        (
            "promoted",
            "promote()",
            "cannot execute ALTER ROLE in a read-only transaction",
        ),
    ] {
        exec(
            &mut admin,
            &format!(
                "SELECT identity_sync.map('dry', '{attribute}', '{function}');
                 SELECT identity_sync.resync('dry');"
            ),
        );
        wait_idle(&mut c, 300);
        // (mappings are evaluated for every person, in scope or not: each fails)
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT message), min(message) FROM identity_sync._plan_error",
                &[],
            )
            .unwrap();
        let persons = count(&mut c, "SELECT count(*) FROM employee");
        assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (persons, 1));
        assert_eq!(
            r.get::<_, String>(2),
            format!("mapping \"{attribute}\": {expected}")
        );
        let trace: String = one(
            &mut c,
            "SELECT detail->>'message' FROM identity_sync.trace('10001') WHERE step = 'plan error'",
        );
        assert_eq!(trace, format!("mapping \"{attribute}\": {expected}"));
        exec(
            &mut admin,
            &format!("SELECT identity_sync.unmap('dry', '{attribute}')"),
        );
    }
    assert!(!one::<bool>(
        &mut c,
        "SELECT rolsuper FROM pg_roles WHERE rolname = 'iso_admin'"
    ));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'dry'"
        ),
        0,
        "nobody was planned while a mapping failed"
    );
    // The file is nowhere: not in events, accounts, plan errors or the audit log.
    for sql in [
        "SELECT count(*) FROM identity_sync.event WHERE payload::text LIKE '%root:%'",
        "SELECT count(*) FROM identity_sync.account WHERE planned_attributes::text LIKE '%root:%' OR attributes::text LIKE '%root:%'",
        "SELECT count(*) FROM identity_sync._plan_error WHERE message LIKE '%root:%'",
        "SELECT count(*) FROM identity_sync._audit WHERE coalesce(new::text, '') LIKE '%root:%'",
    ] {
        assert_eq!(count(&mut c, sql), 0, "{sql}");
    }
    // Unmapped, the persons are planned.
    exec(&mut admin, "SELECT identity_sync.resync('dry')");
    wait_idle(&mut c, 120);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._plan_error"),
        0
    );
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'dry'"
        ) > 0
    );
    drop(admin);
}

/// identity_sync.run_as must name a role that exists and is not a superuser: otherwise nothing
/// is evaluated, with an error that says why.
#[test]
fn run_as_must_not_be_a_superuser() {
    let (_cleanup, mut c) = fresh_small_sample();
    exec(
        &mut c,
        "SET client_min_messages = warning;
         SELECT identity_sync.add_target('dry', 'webhook', 'http://127.0.0.1:9/never', '{\"dry_run\": true}');",
    );
    {
        let _setting = Setting::set(&mut c, "identity_sync.run_as", "postgres", "postgres");
        let mut s = db();
        let (code, message, _, hint) = error_parts(
            &mut s,
            "SELECT identity_sync.map('dry', 'name', 'person.first_name')",
        );
        assert_eq!(code, "22023");
        assert_eq!(
            message,
            "role \"postgres\" of identity_sync.run_as is a superuser"
        );
        assert!(hint.contains("must not be a superuser"), "{hint}");
    }
    {
        let _setting = Setting::set(
            &mut c,
            "identity_sync.run_as",
            "no_such_role",
            "no_such_role",
        );
        let mut s = db();
        let (_, message, _, _) = error_parts(
            &mut s,
            "SELECT identity_sync.map('dry', 'name', 'person.first_name')",
        );
        assert_eq!(
            message,
            "role \"no_such_role\" of identity_sync.run_as does not exist"
        );
    }
    let mut s = db();
    exec(
        &mut s,
        "SELECT identity_sync.map('dry', 'name', 'person.first_name')",
    );
}

/// A related source's affected query that runs past identity_sync.capture_timeout does not
/// hold up the HR write: the statement completes with a WARNING, and every person is planned
/// instead, so the change still reaches the target.
#[test]
fn a_runaway_affected_query_does_not_hold_up_hr_writes() {
    let (_cleanup, mut c) = fresh_small_sample();
    let _setting = Setting::set(&mut c, "identity_sync.capture_timeout", "500ms", "500ms");
    exec(
        &mut c,
        "SET client_min_messages = warning;
         SELECT identity_sync.drop_source('department');
         SELECT identity_sync.add_related_source('department',
                $$SELECT de.emp_no FROM dept_emp de JOIN changed c USING (dept_no) WHERE pg_sleep(3600) IS NOT NULL$$);
         SELECT identity_sync.add_target('dry', 'webhook', 'http://127.0.0.1:9/never', '{\"dry_run\": true}');
         SELECT identity_sync.map('dry', 'department', $$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)$$);
         SELECT identity_sync.add_rule('dry', 'd001', $$contract.dept_no = 'd001'$$);
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 120);
    let members = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.accounts WHERE target = 'dry'",
    );
    assert!(members > 0);
    // An HR session with a statement_timeout of its own: were the affected query not bounded,
    // the UPDATE would be cancelled by it (the query sleeps an hour) and fail.
    let (mut hr, notices) = connect_with_notices(config("postgres"));
    exec(&mut hr, "SET statement_timeout = '60s'");
    exec(
        &mut hr,
        "UPDATE department SET dept_name = 'Marketing and Sales' WHERE dept_no = 'd001'",
    );
    let warnings: Vec<String> = notices
        .lock()
        .unwrap()
        .iter()
        .filter(|n| n.severity == "WARNING")
        .map(|n| n.message.clone())
        .collect();
    assert_eq!(
        warnings,
        ["identity_sync: the affected query of related source public.department ran past identity_sync.capture_timeout (500ms); every person will be planned again"]
    );
    assert!(
        wait_until(Duration::from_secs(120), || count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts
              WHERE target = 'dry' AND planned_attributes->>'department' = 'Marketing and Sales'"
        ) == members),
        "the rename did not reach every member"
    );
}
