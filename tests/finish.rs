//! End-to-end tests of issue 18, "finish what is half done": unique values across the round
//! trip (a SCIM 409 `uniqueness`, a table's `unique_violation`), manager references that follow
//! the manager, group memberships in table targets (local and through postgres_fdw), thresholds
//! for every action with `release(target, kind)`, an accidental `TRUNCATE` held by
//! `max_disables`, the target option `out_of_scope`, `sync_person()`, a rule over all contracts,
//! and snapshot capture done by the worker.
//!
//! Every test builds its own state in the worker's database (`postgres`): [`fresh`] drops the
//! extension, reloads the small employees sample and registers its sources; the extension is
//! dropped again when the test ends. Targets are the third-party `scim2-server`, table targets
//! and dry runs. Run by `scripts/test` (e2e layer, `--test-threads=1`: the tests share the
//! worker).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const USERNAME_EXPR: &str = "identity_sync.slug(person.first_name || '.' || person.last_name) \
     || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END";

/// What these tests leave outside the extension (tables, views, foreign servers).
const LEFTOVERS: &str = "
    DROP VIEW IF EXISTS public.staff;
    DROP TABLE IF EXISTS public.fin_users, public.fin_groups, public.oos_disable, public.oos_keep,
                         public.oos_delete, public.backup_employee, public.backup_dept_emp,
                         public.backup_dept_manager, public.backup_title, public.backup_salary;
    DROP EXTENSION IF EXISTS postgres_fdw CASCADE;";

/// Fresh state in the worker's database: the small employees sample, the extension with the
/// sample's sources; the extension is dropped again when the returned guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(&mut c, "small", LEFTOVERS);
    (cleanup, c)
}

/// A SCIM target on `scim` with bearer auth and the given extra options (a JSON object's body).
fn add_scim_target(c: &mut Client, scim: &ScimServer, name: &str, options: &str) {
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('{name}', 'scim', '{}', '{{\"auth\": \"bearer\"{options}}}');
             SELECT identity_sync.set_secret('{name}', '{}');",
            scim.base_url(),
            scim.token()
        ),
    );
}

/// `POST /Users` to scim2-server with its token (an account identity_sync does not manage);
/// returns its id.
fn scim_create_user(scim: &ScimServer, user: Value) -> String {
    let auth = format!("Bearer {}", scim.token());
    let (status, body) = http_request(
        "POST",
        &format!("{}/Users", scim.base_url()),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/scim+json"),
        ],
        Some(&user.to_string()),
    )
    .expect("POST /Users");
    assert_eq!(status, 201, "POST /Users: {body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

/// A person currently in d001 only (one contract), whose slug(first.last) no other employee's
/// slug starts with, so that its unique name is decided by the target alone.
fn d001_person_with_a_name_of_its_own(c: &mut Client) -> (i32, String) {
    let r = c
        .query_one(
            "SELECT e.emp_no, identity_sync.slug(e.first_name || '.' || e.last_name)
               FROM employee e
              WHERE (SELECT array_agg(d.dept_no || d.to_date) FROM dept_emp d WHERE d.emp_no = e.emp_no)
                    = ARRAY['d0019999-01-01']
                AND NOT EXISTS (SELECT FROM employee x WHERE x.emp_no <> e.emp_no
                                   AND identity_sync.slug(x.first_name || '.' || x.last_name)
                                       LIKE identity_sync.slug(e.first_name || '.' || e.last_name) || '%')
              ORDER BY e.emp_no LIMIT 1",
            &[],
        )
        .expect("a d001 person with a name of its own");
    (r.get(0), r.get(1))
}

// ---------------------------------------------------------------------------------------------
// 1. Unique values across the round trip
// ---------------------------------------------------------------------------------------------

/// Issue 18, item 1: scim2-server already has the userName a person would get, and the next
/// one too, for accounts identity_sync does not manage. Each `409 uniqueness` marks the value
/// taken and plans the person again with the next iteration, until the create succeeds.
#[test]
fn scim_uniqueness_conflict_takes_the_next_iteration() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    let (p, slug) = d001_person_with_a_name_of_its_own(&mut c);
    let legacy: Vec<(String, String)> = [slug.clone(), format!("{slug}2")]
        .into_iter()
        .map(|name| {
            let id = scim_create_user(
                &scim,
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                       "userName": name, "externalId": format!("legacy-{name}")}),
            );
            (id, name)
        })
        .collect();

    add_scim_target(&mut c, &scim, "scim", "");
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.map('scim', 'userName', $${USERNAME_EXPR}$$, true, true);
             SELECT identity_sync.map('scim', 'externalId', $$person.emp_no::text$$);
             SELECT identity_sync.add_rule('scim', 'marketing', $$contract.dept_no = 'd001'$$);
             SELECT identity_sync.resync('scim');"
        ),
    );
    wait_idle(&mut c, 120);

    let rid = remote_id(&mut c, "scim", p);
    assert!(
        legacy.iter().all(|(id, _)| *id != rid),
        "the person was linked to a legacy account"
    );
    let (status, user) = scim.user(&rid);
    assert_eq!(status, 200);
    assert_eq!(user["userName"], json!(format!("{slug}3")), "{user}");
    assert_eq!(user["externalId"], json!(p.to_string()));
    for (id, name) in &legacy {
        let (status, u) = scim.user(id);
        assert_eq!(
            (status, &u["userName"]),
            (200, &json!(name)),
            "legacy account changed"
        );
    }

    // The story: two creates answered 409 (closed with the reason), the third created.
    let story: Vec<(String, String, Option<i32>, Option<String>)> = c
        .query(
            "SELECT kind, state, http_status, last_error FROM identity_sync.events
              WHERE target = 'scim' AND person_key = $1 ORDER BY seq",
            &[&p.to_string()],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(story.len(), 3, "{story:?}");
    for (kind, state, status, error) in &story[..2] {
        assert_eq!((kind.as_str(), state.as_str()), ("create", "done"));
        assert_eq!(*status, Some(409), "{story:?}");
        let error = error.as_deref().unwrap_or_default();
        assert!(
            error.contains("409") && error.contains("planned again"),
            "{error}"
        );
    }
    assert_eq!(
        (
            story[2].0.as_str(),
            story[2].1.as_str(),
            story[2].3.as_deref()
        ),
        ("create", "done", None)
    );
    // Taken values are remembered as nobody's; the person holds the third.
    let unique: BTreeMap<String, Option<String>> = c
        .query(
            "SELECT value, person_key FROM identity_sync._unique WHERE attribute = 'userName' AND value LIKE $1",
            &[&format!("{slug}%")],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        unique,
        BTreeMap::from([
            (slug.clone(), None),
            (format!("{slug}2"), None),
            (format!("{slug}3"), Some(p.to_string()))
        ])
    );
    // Everybody in scope is on the server once, beside the two legacy accounts.
    let accounts = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.accounts WHERE target = 'scim' AND remote_id IS NOT NULL",
    );
    assert!(accounts > 10, "scope is a few dozen persons");
    assert_eq!(scim.users().len() as i64, accounts + 2);
    assert_all_done(&mut c, "scim");
}

// ---------------------------------------------------------------------------------------------
// 3. (and 1) Table targets: unique values and group memberships, locally and through postgres_fdw
// ---------------------------------------------------------------------------------------------

/// Issue 18, items 1 and 3: table targets — a local table and a postgres_fdw foreign table in
/// a second database — with a unique user_name that an unmanaged row already holds (the
/// unique_violation plans the person again with the next iteration) and a membership table
/// written by grant and revoke (`groups_relation`; for the remote target set later with
/// `alter_target`, which writes the memberships granted before).
#[test]
fn table_targets_unique_values_and_group_memberships() {
    let (_cleanup, mut c) = fresh();
    let (p, slug) = d001_person_with_a_name_of_its_own(&mut c);
    let ddl = format!(
        "CREATE TABLE fin_users (emp_no int PRIMARY KEY, user_name text NOT NULL UNIQUE, dept text,
                                 active boolean NOT NULL DEFAULT true);
         CREATE TABLE fin_groups (emp_no int NOT NULL, group_name text NOT NULL, PRIMARY KEY (emp_no, group_name));
         INSERT INTO fin_users VALUES (999999, '{slug}', 'legacy', true);"
    );
    let remote_db = "finish_remote";
    let mut r = fresh_db(remote_db);
    exec(&mut r, &ddl);
    exec(&mut c, &ddl);
    let port = harness_env("PGPORT");
    exec(
        &mut c,
        &format!(
            "CREATE EXTENSION postgres_fdw;
             CREATE SERVER finish_remote FOREIGN DATA WRAPPER postgres_fdw
                 OPTIONS (host '127.0.0.1', port '{port}', dbname '{remote_db}');
             CREATE USER MAPPING FOR postgres SERVER finish_remote OPTIONS (user 'postgres');
             CREATE FOREIGN TABLE remote_users (emp_no int, user_name text, dept text, active boolean)
                 SERVER finish_remote OPTIONS (table_name 'fin_users');
             CREATE FOREIGN TABLE remote_groups (emp_no int, group_name text)
                 SERVER finish_remote OPTIONS (table_name 'fin_groups');"
        ),
    );
    for (name, options) in [
        (
            "local",
            r#"{"relation": "public.fin_users", "groups_relation": "public.fin_groups", "delete_after": "0"}"#,
        ),
        (
            "remote",
            r#"{"relation": "public.remote_users", "delete_after": "0"}"#,
        ),
    ] {
        exec(
            &mut c,
            &format!(
                "SELECT identity_sync.add_target('{name}', 'table', NULL,
                        '{{\"key_column\": \"emp_no\", \"active_column\": \"active\"}}'::jsonb || '{options}'::jsonb);
                 SELECT identity_sync.map('{name}', 'user_name', $${USERNAME_EXPR}$$, true, true);
                 SELECT identity_sync.map('{name}', 'dept', 'contract.dept_no');
                 SELECT identity_sync.add_rule('{name}', 'staff', $$contract.dept_no IN ('d001', 'd006')$$, '{{staff}}');
                 SELECT identity_sync.add_rule('{name}', 'marketing', $$contract.dept_no = 'd001'$$, '{{marketing}}');
                 SELECT identity_sync.add_rule('{name}', 'quality', $$contract.dept_no = 'd006'$$, '{{quality}}');
                 SELECT identity_sync.resync('{name}');"
            ),
        );
    }
    wait_idle(&mut c, 120);
    // The remote target gets its membership table now: the memberships granted so far are
    // written to it.
    exec(
        &mut c,
        "SELECT identity_sync.alter_target('remote', options => '{\"groups_relation\": \"public.remote_groups\"}')",
    );
    wait_idle(&mut c, 120);

    // Memberships: staff, and the department's group, for everybody with an account (in scope
    // and working today), by an independent query over the HR tables.
    let expected_sql = "
        SELECT format('%s|%s', pc.emp_no, g)
          FROM (SELECT DISTINCT ON (d.emp_no) d.* FROM dept_emp d
                 ORDER BY d.emp_no, (d.from_date <= current_date AND d.to_date >= current_date) DESC,
                          d.to_date DESC, d.from_date DESC) pc,
               unnest(ARRAY['staff', CASE pc.dept_no WHEN 'd001' THEN 'marketing' ELSE 'quality' END]) AS g
         WHERE pc.dept_no IN ('d001', 'd006') AND pc.from_date <= current_date AND current_date <= pc.to_date
         ORDER BY 1";
    const ACTUAL: &str = "SELECT format('%s|%s', emp_no, group_name) FROM fin_groups ORDER BY 1";
    let check = |c: &mut Client, r: &mut Client, when: &str| {
        let expected = column::<String, Vec<_>>(c, expected_sql);
        assert!(
            expected.len() > 60,
            "{when}: a few dozen persons, two groups each"
        );
        assert_eq!(
            column::<String, Vec<_>>(c, ACTUAL),
            expected,
            "{when}: local membership table\n{}",
            undone(c, "local")
        );
        assert_eq!(
            column::<String, Vec<_>>(r, ACTUAL),
            expected,
            "{when}: membership table behind postgres_fdw\n{}",
            undone(c, "remote")
        );
    };
    check(&mut c, &mut r, "initial sync");

    // The unmanaged row held the person's user_name: the next iteration was taken, in both.
    for (db, which) in [(&mut c, "local"), (&mut r, "remote")] {
        let names: Vec<(i32, String)> = db
            .query(
                "SELECT emp_no, user_name FROM fin_users WHERE emp_no IN ($1, 999999) ORDER BY emp_no",
                &[&p],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(
            names,
            vec![(p, format!("{slug}2")), (999999, slug.clone())],
            "{which}"
        );
    }
    for target in ["local", "remote"] {
        let first: (String, Option<String>) = {
            let row = c
                .query_one(
                    "SELECT state, last_error FROM identity_sync.events
                      WHERE target = $1 AND person_key = $2 ORDER BY seq LIMIT 1",
                    &[&target, &p.to_string()],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(first.0, "done");
        let error = first.1.unwrap_or_default();
        assert!(
            error.contains("duplicate key") && error.contains("planned again"),
            "{target}: {error}"
        );
    }

    // A move revokes and grants; a person gone from HR loses the row and its memberships.
    let people: Vec<i32> = column(
        &mut c,
        &format!(
            "SELECT emp_no FROM dept_emp d WHERE dept_no = 'd001' AND to_date = '9999-01-01' AND emp_no <> {p}
                AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = d.emp_no AND x.dept_no <> 'd001')
              ORDER BY emp_no LIMIT 2"
        ),
    );
    let (mover, gone) = (people[0], people[1]);
    exec(
        &mut c,
        &format!(
            "BEGIN;
             UPDATE dept_emp SET to_date = current_date - 1 WHERE emp_no = {mover} AND dept_no = 'd001';
             INSERT INTO dept_emp VALUES ({mover}, 'd006', current_date, '9999-01-01');
             COMMIT;
             DELETE FROM employee WHERE emp_no = {gone};"
        ),
    );
    wait_idle(&mut c, 60);
    check(&mut c, &mut r, "after a move and a deletion");
    for db in [&mut c, &mut r] {
        let groups: Vec<String> = column(
            db,
            &format!("SELECT group_name FROM fin_groups WHERE emp_no = {mover} ORDER BY 1"),
        );
        assert_eq!(groups, ["quality", "staff"]);
        assert_eq!(
            count(
                db,
                &format!("SELECT count(*) FROM fin_groups WHERE emp_no = {gone}")
            ),
            0
        );
        assert_eq!(
            count(
                db,
                &format!("SELECT count(*) FROM fin_users WHERE emp_no = {gone}")
            ),
            0
        );
    }
    // The registry agrees with the tables.
    let registry = column::<String, Vec<_>>(
        &mut c,
        "SELECT format('%s|%s', person_key, g) FROM identity_sync.accounts, unnest(groups) g
          WHERE target = 'local' ORDER BY 1",
    );
    assert_eq!(registry, column::<String, Vec<_>>(&mut c, ACTUAL));
    // group_column without groups_relation, and a membership table without the key column.
    let (_, msg, _, hint) = error_parts(
        &mut c,
        "SELECT identity_sync.alter_target('local', options => '{\"groups_relation\": null, \"group_column\": \"g\"}')",
    );
    assert_eq!(msg, "option group_column needs groups_relation");
    assert!(hint.contains("groups_relation"), "{hint}");
    let (code, msg, _, _) = error_parts(
        &mut c,
        "SELECT identity_sync.alter_target('local', options => '{\"group_column\": \"nope\"}')",
    );
    assert_eq!(code, "42703", "{msg}");
    drop(r);
    exec(&mut c, "DROP EXTENSION postgres_fdw CASCADE");
    db().batch_execute(&format!("DROP DATABASE {remote_db} WITH (FORCE)"))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2. Manager references that follow the manager
// ---------------------------------------------------------------------------------------------

/// The manager value scim2-server holds for each person's account.
fn managers_on_server(
    c: &mut Client,
    scim: &ScimServer,
    persons: &[String],
) -> BTreeMap<String, Value> {
    persons
        .iter()
        .map(|p| {
            let id = remote_id(c, "scim", p.parse().unwrap());
            let (status, u) = scim.user(&id);
            assert_eq!(status, 200, "{p}: {u}");
            (p.clone(), u[ENTERPRISE]["manager"]["value"].clone())
        })
        .collect()
}

/// Issue 18, item 2: `urn:…:enterprise:2.0:User:manager.value` carries the manager's account
/// id in scim2-server. The head of d001 has no account at first (works outside the target's
/// scope); when the head moves into d001 and gets one, every member's manager is re-sent; when
/// `dept_manager` names a new head (a related source), the members are planned again and their
/// manager changes.
#[test]
fn manager_reference_follows_the_manager() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    add_scim_target(&mut c, &scim, "scim", "");
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_related_source('dept_manager',
                    'SELECT de.emp_no FROM dept_emp de JOIN changed c USING (dept_no)');
             SELECT identity_sync.map('scim', 'userName', $$person.emp_no::text$$);
             SELECT identity_sync.map('scim', 'externalId', $$person.emp_no::text$$);
             SELECT identity_sync.map('scim', '{ENTERPRISE}:department', $$contract.dept_no$$);
             SELECT identity_sync.map('scim', '{ENTERPRISE}:manager.value',
                    $$identity_sync.person_ref((SELECT m.emp_no FROM dept_manager m
                                                 WHERE m.dept_no = contract.dept_no
                                                   AND m.from_date <= today AND today <= m.to_date
                                                 ORDER BY m.from_date DESC LIMIT 1))$$);
             SELECT identity_sync.add_rule('scim', 'scope', $$contract.dept_no IN ('d001', 'd006')$$);
             SELECT identity_sync.resync('scim');"
        ),
    );
    wait_idle(&mut c, 120);
    let head: i32 = one(
        &mut c,
        "SELECT emp_no FROM dept_manager WHERE dept_no = 'd001' AND to_date = '9999-01-01'",
    );
    assert_eq!(
        count(
            &mut c,
            &format!(
                "SELECT count(*) FROM dept_emp WHERE emp_no = {head} AND dept_no IN ('d001', 'd006')"
            )
        ),
        0,
        "the sample's head of d001 works elsewhere"
    );
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM identity_sync.account WHERE person_key = '{head}'")
        ),
        0,
        "the head is out of scope: no account"
    );
    let members_sql = format!(
        "SELECT person_key FROM identity_sync.accounts
          WHERE target = 'scim' AND state = 'active'
            AND planned_attributes->>'{ENTERPRISE}:department' = 'd001' ORDER BY 1"
    );
    let members: Vec<String> = column(&mut c, &members_sql);
    assert!(members.len() > 10, "d001 has a few dozen members");
    let managers = managers_on_server(&mut c, &scim, &members);
    assert!(
        managers.values().all(Value::is_null),
        "a manager without an account is no manager in the target: {managers:?}"
    );

    // The head moves into d001 and gets an account: the members' manager is re-sent.
    exec(
        &mut c,
        &format!(
            "BEGIN;
             UPDATE dept_emp SET to_date = current_date - 1 WHERE emp_no = {head} AND to_date = '9999-01-01';
             INSERT INTO dept_emp VALUES ({head}, 'd001', current_date, '9999-01-01');
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 60);
    let head_id = remote_id(&mut c, "scim", head);
    let managers = managers_on_server(&mut c, &scim, &members);
    assert!(
        managers.values().all(|m| *m == json!(head_id)),
        "every member's manager is the head's account {head_id}: {managers:?}"
    );
    let resent = count(
        &mut c,
        &format!(
            "SELECT count(*) FROM identity_sync.events
              WHERE target = 'scim' AND kind = 'update' AND state = 'done'
                AND payload->'changed' ? '{ENTERPRISE}:manager.value'"
        ),
    );
    assert_eq!(resent, members.len() as i64, "one re-send per member");

    // dept_manager names a new head of d001, someone of d006 who has an account: the members
    // (the old head among them now) get the new manager.
    let new_head: String = one(
        &mut c,
        &format!(
            "SELECT person_key FROM identity_sync.accounts
              WHERE target = 'scim' AND state = 'active'
                AND planned_attributes->>'{ENTERPRISE}:department' = 'd006' ORDER BY 1 LIMIT 1"
        ),
    );
    exec(
        &mut c,
        &format!(
            "BEGIN;
             UPDATE dept_manager SET to_date = current_date - 1 WHERE dept_no = 'd001' AND to_date = '9999-01-01';
             INSERT INTO dept_manager VALUES ({new_head}, 'd001', current_date, '9999-01-01');
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 60);
    let new_head_id = remote_id(&mut c, "scim", new_head.parse().unwrap());
    let members: Vec<String> = column(&mut c, &members_sql);
    assert!(members.contains(&head.to_string()));
    let managers = managers_on_server(&mut c, &scim, &members);
    assert!(
        managers.values().all(|m| *m == json!(new_head_id)),
        "every member's manager is the new head's account {new_head_id}: {managers:?}"
    );
    assert_all_done(&mut c, "scim");
}

// ---------------------------------------------------------------------------------------------
// 4. Thresholds for every action
// ---------------------------------------------------------------------------------------------

/// `status` of one target: (state, held_by, held_detail, events_held).
fn held(c: &mut Client, target: &str) -> (String, Option<String>, Option<String>, i64) {
    let r = c
        .query_one(
            "SELECT state, held_by, held_detail, events_held FROM identity_sync.status WHERE target = $1",
            &[&target],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

fn table_rows(c: &mut Client) -> BTreeSet<i32> {
    column(c, "SELECT emp_no FROM fin_users")
}

/// Issue 18, item 4: `max_creates` holds an initial sync until it is released; then a hire
/// wave and a wave of leavers (deleted at once, delete_after = 0) planned together exceed both
/// `max_creates` and `max_deletes`. `release(target, 'create')` lets the hires go while the
/// deletes stay held (the target now held by max_deletes), `release(target, 'delete')` the rest.
#[test]
fn thresholds_hold_creates_and_deletes_and_release_one_action() {
    let (_cleanup, mut c) = fresh();
    exec(
        &mut c,
        "CREATE TABLE fin_users (emp_no int PRIMARY KEY, first_name text, last_name text, dept text, active boolean);
         SELECT identity_sync.add_target('app', 'table', NULL,
                '{\"relation\": \"public.fin_users\", \"key_column\": \"emp_no\", \"active_column\": \"active\",
                  \"max_creates\": 10, \"max_deletes\": 5, \"delete_after\": \"0\"}');
         SELECT identity_sync.map('app', 'first_name', 'person.first_name');
         SELECT identity_sync.map('app', 'last_name', 'person.last_name');
         SELECT identity_sync.map('app', 'dept', 'contract.dept_no');
         SELECT identity_sync.add_rule('app', 'everyone', 'true');
         SELECT identity_sync.resync('app');",
    );
    wait_idle(&mut c, 120);
    let working: BTreeSet<i32> = column(
        &mut c,
        "SELECT DISTINCT emp_no FROM dept_emp WHERE from_date <= current_date AND current_date <= to_date",
    );
    let n = working.len() as i64;
    let (state, by, detail, events_held) = held(&mut c, "app");
    assert_eq!(
        (state.as_str(), by.as_deref(), events_held),
        ("held", Some("max_creates"), n)
    );
    assert_eq!(
        detail.as_deref(),
        Some(
            format!("{n} create events planned within the hour; max_creates = 10 allows 10")
                .as_str()
        )
    );
    assert!(
        table_rows(&mut c).is_empty(),
        "a held create reached the table"
    );
    let released: i32 = one(&mut c, "SELECT identity_sync.release('app')");
    assert_eq!(released as i64, n);
    wait_idle(&mut c, 120);
    assert_eq!(held(&mut c, "app").0, "active");
    assert_eq!(table_rows(&mut c), working);

    // 20 hires and 20 leavers in one HR transaction.
    let leavers: BTreeSet<i32> = column(
        &mut c,
        "SELECT emp_no FROM dept_emp GROUP BY emp_no
          HAVING count(*) = 1 AND bool_and(to_date = '9999-01-01') ORDER BY emp_no LIMIT 20",
    );
    let hires: BTreeSet<i32> = (900_001..=900_020).collect();
    exec(
        &mut c,
        "BEGIN;
         INSERT INTO employee SELECT 900000 + g, '1990-01-01', 'New', 'Hire' || g, 'F', current_date
           FROM generate_series(1, 20) g;
         INSERT INTO dept_emp SELECT 900000 + g, 'd005', current_date, '9999-01-01' FROM generate_series(1, 20) g;
         UPDATE dept_emp SET to_date = current_date - 1
          WHERE emp_no IN (SELECT emp_no FROM dept_emp GROUP BY emp_no
                            HAVING count(*) = 1 AND bool_and(to_date = '9999-01-01') ORDER BY emp_no LIMIT 20);
         COMMIT;",
    );
    wait_idle(&mut c, 60);
    let (state, by, _, events_held) = held(&mut c, "app");
    assert_eq!(
        (state.as_str(), by.as_deref(), events_held),
        ("held", Some("max_creates"), 40)
    );
    assert_eq!(
        table_rows(&mut c),
        working,
        "nothing reached the table while held"
    );

    // The hires go; the leavers stay.
    let (_, msg, _, hint) = error_parts(&mut c, "SELECT identity_sync.release('app', 'hire')");
    assert_eq!(msg, "invalid event kind \"hire\"");
    assert!(hint.contains("create"), "{hint}");
    let released: i32 = one(&mut c, "SELECT identity_sync.release('app', 'create')");
    assert_eq!(released, 20);
    wait_idle(&mut c, 60);
    let rows = table_rows(&mut c);
    assert!(hires.is_subset(&rows), "the hires were not created");
    assert!(leavers.is_subset(&rows), "a held delete reached the table");
    let (state, by, detail, events_held) = held(&mut c, "app");
    assert_eq!(
        (state.as_str(), by.as_deref(), events_held),
        ("held", Some("max_deletes"), 20)
    );
    assert_eq!(
        detail.as_deref(),
        Some("20 delete events planned within the hour; max_deletes = 5 allows 5")
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'app' AND state = 'held' AND kind <> 'delete'"
        ),
        0
    );

    let released: i32 = one(&mut c, "SELECT identity_sync.release('app', 'delete')");
    assert_eq!(released, 20);
    wait_idle(&mut c, 60);
    assert_eq!(held(&mut c, "app"), ("active".to_string(), None, None, 0));
    let want: BTreeSet<i32> = working
        .difference(&leavers)
        .chain(&hires)
        .copied()
        .collect();
    assert_eq!(table_rows(&mut c), want);
    let audit: Vec<String> = column(
        &mut c,
        "SELECT coalesce(new->>'kind', 'all') FROM identity_sync.audit_log WHERE action = 'release' ORDER BY id",
    );
    assert_eq!(audit, ["all", "create", "delete"]);
}

/// Issue 18, item 4: an accidental `TRUNCATE` of the person source (and, by CASCADE, of the
/// contracts) would disable every account of the SCIM target. `max_disables` holds it and
/// nothing reaches scim2-server; the operator restores the HR data and discards the held
/// events: the target never saw any of it, and goes on with the next change.
#[test]
fn truncate_of_the_person_source_is_held_until_an_operator_decides() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    add_scim_target(&mut c, &scim, "scim", ", \"max_disables\": \"10%\"");
    exec(
        &mut c,
        "SELECT identity_sync.map('scim', 'userName', $$person.emp_no::text$$);
         SELECT identity_sync.map('scim', 'externalId', $$person.emp_no::text$$);
         SELECT identity_sync.map('scim', 'name.familyName', $$person.last_name$$);
         SELECT identity_sync.add_rule('scim', 'scope', $$contract.dept_no IN ('d001', 'd006')$$);
         SELECT identity_sync.resync('scim');",
    );
    wait_idle(&mut c, 120);
    let n = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.accounts WHERE target = 'scim' AND state = 'active'",
    );
    assert!(n > 30, "a few dozen accounts");
    let active_on_server = |scim: &ScimServer| {
        scim.users()
            .iter()
            .filter(|u| u["active"] == json!(true))
            .count() as i64
    };
    assert_eq!(active_on_server(&scim), n);
    let writes = |scim: &ScimServer| {
        scim.log()
            .lines()
            .filter(|l| {
                l.contains("\"PATCH /v2/")
                    || l.contains("\"PUT /v2/")
                    || l.contains("\"DELETE /v2/")
            })
            .count()
    };
    let writes_before = writes(&scim);
    let last_event = count(&mut c, "SELECT max(id) FROM identity_sync.event");

    exec(
        &mut c,
        "CREATE TABLE backup_employee AS SELECT * FROM employee;
         CREATE TABLE backup_dept_emp AS SELECT * FROM dept_emp;
         CREATE TABLE backup_dept_manager AS SELECT * FROM dept_manager;
         CREATE TABLE backup_title AS SELECT * FROM title;
         CREATE TABLE backup_salary AS SELECT * FROM salary;
         TRUNCATE employee CASCADE;",
    );
    wait_idle(&mut c, 60);
    let (state, by, detail, events_held) = held(&mut c, "scim");
    assert_eq!(
        (state.as_str(), by.as_deref(), events_held),
        ("held", Some("max_disables"), n),
        "{detail:?}"
    );
    assert!(
        detail
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("{n} disable events planned")),
        "{detail:?}"
    );
    assert_eq!(writes(&scim), writes_before, "a request reached the server");
    assert_eq!(active_on_server(&scim), n);

    // The operator restores HR and discards: still nothing sent, the registry as before.
    exec(
        &mut c,
        "BEGIN;
         INSERT INTO employee SELECT * FROM backup_employee;
         INSERT INTO dept_emp SELECT * FROM backup_dept_emp;
         INSERT INTO dept_manager SELECT * FROM backup_dept_manager;
         INSERT INTO title SELECT * FROM backup_title;
         INSERT INTO salary SELECT * FROM backup_salary;
         COMMIT;",
    );
    wait_idle(&mut c, 60);
    assert_eq!(held(&mut c, "scim").0, "held");
    let discarded: i32 = one(&mut c, "SELECT identity_sync.discard('scim')");
    assert!(discarded as i64 >= n, "{discarded} events discarded");
    wait_idle(&mut c, 60);
    assert_eq!(held(&mut c, "scim"), ("active".to_string(), None, None, 0));
    assert_eq!(writes(&scim), writes_before, "a request reached the server");
    assert_eq!(active_on_server(&scim), n);
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM identity_sync.event WHERE id > {last_event} AND sent_at IS NOT NULL")
        ),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'scim' AND (state, planned_state) <> ('active', 'active')"
        ),
        0
    );

    // The target goes on: the next change is one PATCH.
    let p: String = one(
        &mut c,
        "SELECT person_key FROM identity_sync.accounts WHERE target = 'scim' ORDER BY 1 LIMIT 1",
    );
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'After-Truncate' WHERE emp_no = {p}"),
    );
    wait_idle(&mut c, 60);
    let (_, u) = scim.user(&remote_id(&mut c, "scim", p.parse().unwrap()));
    assert_eq!(u["name"]["familyName"], "After-Truncate");
    assert_eq!(writes(&scim), writes_before + 1);
}

// ---------------------------------------------------------------------------------------------
// 5. Out of scope is a choice
// ---------------------------------------------------------------------------------------------

/// One row of an out_of_scope test table: (last_name, dept, active), if there is one.
fn oos_row(c: &mut Client, table: &str, p: i32) -> Option<(String, String, bool)> {
    c.query_opt(
        &format!("SELECT last_name, dept, active FROM {table} WHERE emp_no = $1"),
        &[&p],
    )
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Issue 18, item 5: a person moves out of the only rule's department (still working) and is
/// renamed. With `out_of_scope` = disable (the default) the row is disabled; with keep it is
/// left exactly as it was, no event at all; with delete it is deleted. Back in scope, the kept
/// account gets the rename, the disabled one is enabled, the deleted one created again.
#[test]
fn out_of_scope_disable_keep_or_delete() {
    let (_cleanup, mut c) = fresh();
    let (code, msg, detail, _) = error_parts(
        &mut c,
        "SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{\"out_of_scope\": \"archive\"}')",
    );
    assert_eq!(
        (code.as_str(), msg.as_str(), detail.as_str()),
        (
            "22023",
            "invalid value for option \"out_of_scope\": \"archive\"",
            "Expected one of disable, keep, delete."
        )
    );
    for (table, option) in [
        ("oos_disable", ""),
        ("oos_keep", ", \"out_of_scope\": \"keep\""),
        ("oos_delete", ", \"out_of_scope\": \"delete\""),
    ] {
        exec(
            &mut c,
            &format!(
                "CREATE TABLE {table} (emp_no int PRIMARY KEY, last_name text, dept text, active boolean);
                 SELECT identity_sync.add_target('{table}', 'table', NULL,
                        '{{\"relation\": \"public.{table}\", \"key_column\": \"emp_no\", \"active_column\": \"active\"{option}}}');
                 SELECT identity_sync.map('{table}', 'last_name', 'person.last_name');
                 SELECT identity_sync.map('{table}', 'dept', 'contract.dept_no');
                 SELECT identity_sync.add_rule('{table}', 'marketing', $$contract.dept_no = 'd001'$$, '{{marketing}}');
                 SELECT identity_sync.resync('{table}');"
            ),
        );
    }
    wait_idle(&mut c, 120);
    let p: i32 = one(
        &mut c,
        "SELECT emp_no FROM dept_emp d WHERE dept_no = 'd001' AND to_date = '9999-01-01'
            AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = d.emp_no AND x.dept_no <> 'd001')
          ORDER BY emp_no LIMIT 1",
    );
    let name: String = one(
        &mut c,
        &format!("SELECT last_name FROM employee WHERE emp_no = {p}"),
    );
    let before = Some((name.clone(), "d001".to_string(), true));
    for t in ["oos_disable", "oos_keep", "oos_delete"] {
        assert_eq!(oos_row(&mut c, t, p), before, "{t}");
    }
    let last_event = count(&mut c, "SELECT max(id) FROM identity_sync.event");

    exec(
        &mut c,
        &format!(
            "BEGIN;
             UPDATE dept_emp SET to_date = current_date - 1 WHERE emp_no = {p} AND dept_no = 'd001';
             INSERT INTO dept_emp VALUES ({p}, 'd005', current_date, '9999-01-01');
             UPDATE employee SET last_name = 'Moved' WHERE emp_no = {p};
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 60);
    assert_eq!(
        oos_row(&mut c, "oos_disable", p),
        Some(("Moved".to_string(), "d005".to_string(), false)),
        "disable (the default)"
    );
    assert_eq!(oos_row(&mut c, "oos_keep", p), before, "keep");
    assert_eq!(oos_row(&mut c, "oos_delete", p), None, "delete");
    let kinds = |c: &mut Client, target: &str| -> Vec<String> {
        column(
            c,
            &format!(
                "SELECT kind FROM identity_sync.events
                  WHERE target = '{target}' AND person_key = '{p}' AND id > {last_event} ORDER BY seq"
            ),
        )
    };
    assert_eq!(kinds(&mut c, "oos_keep"), Vec::<String>::new());
    assert_eq!(kinds(&mut c, "oos_delete"), ["delete"]);
    assert_eq!(
        kinds(&mut c, "oos_disable"),
        ["update", "revoke", "disable"]
    );
    assert_eq!(account_state(&mut c, "oos_keep", p), "active");
    assert_eq!(account_state(&mut c, "oos_delete", p), "deleted");

    // Back in scope.
    exec(
        &mut c,
        &format!(
            "BEGIN;
             DELETE FROM dept_emp WHERE emp_no = {p} AND dept_no = 'd005';
             UPDATE dept_emp SET to_date = '9999-01-01' WHERE emp_no = {p} AND dept_no = 'd001';
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 60);
    let back = Some(("Moved".to_string(), "d001".to_string(), true));
    for t in ["oos_disable", "oos_keep", "oos_delete"] {
        assert_eq!(oos_row(&mut c, t, p), back, "{t}");
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE state <> 'done'"
        ),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Provision one person now
// ---------------------------------------------------------------------------------------------

/// Issue 18, item 6: a helpdesk fixes a person's HR data and runs `sync_person` in the same
/// transaction (as an operator): the events come back at once, planned before the worker could
/// see the change, and the worker sends them at commit without planning anything twice.
#[test]
fn sync_person_plans_one_person_at_once() {
    let (_cleanup, mut c) = fresh();
    exec(
        &mut c,
        "CREATE TABLE fin_users (emp_no int PRIMARY KEY, first_name text, last_name text, dept text, active boolean);
         SELECT identity_sync.add_target('app', 'table', NULL,
                '{\"relation\": \"public.fin_users\", \"key_column\": \"emp_no\", \"active_column\": \"active\"}');
         SELECT identity_sync.add_target('dry', 'scim', 'http://127.0.0.1:9/v2', '{\"dry_run\": true}');",
    );
    for t in ["app", "dry"] {
        exec(
            &mut c,
            &format!(
                "SELECT identity_sync.map('{t}', 'first_name', 'person.first_name');
                 SELECT identity_sync.map('{t}', 'last_name', 'person.last_name');
                 SELECT identity_sync.add_rule('{t}', 'marketing', $$contract.dept_no = 'd001'$$);
                 SELECT identity_sync.resync('{t}');"
            ),
        );
    }
    wait_idle(&mut c, 120);
    exec(
        &mut c,
        "DROP ROLE IF EXISTS fin_helpdesk; CREATE ROLE fin_helpdesk;
         GRANT identity_sync_operator TO fin_helpdesk; GRANT UPDATE, INSERT, SELECT ON employee, dept_emp TO fin_helpdesk;",
    );
    let p: i32 = one(
        &mut c,
        "SELECT emp_no FROM dept_emp WHERE dept_no = 'd001' AND to_date = '9999-01-01' ORDER BY emp_no LIMIT 1",
    );
    let last_event = count(&mut c, "SELECT max(id) FROM identity_sync.event");

    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL ROLE fin_helpdesk; UPDATE employee SET last_name = 'Fixed' WHERE emp_no = {p}"
    ))
    .unwrap();
    let got: Vec<(String, String, String, Value)> = tx
        .query(
            "SELECT target, kind, state, payload::text FROM identity_sync.sync_person($1, 'app')",
            &[&p.to_string()],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                serde_json::from_str(&r.get::<_, String>(3)).unwrap(),
            )
        })
        .collect();
    tx.commit().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    let (target, kind, state, payload) = &got[0];
    assert_eq!(
        (target.as_str(), kind.as_str(), state.as_str()),
        ("app", "update", "pending")
    );
    assert_eq!(payload["changed"], json!({"last_name": "Fixed"}));
    wait_idle(&mut c, 60);
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT last_name FROM fin_users WHERE emp_no = {p}")
        ),
        "Fixed"
    );
    // The worker planned the committed change too: nothing more for app, the update for dry.
    let after: Vec<String> = column(
        &mut c,
        &format!(
            "SELECT target || ' ' || kind || ' ' || state FROM identity_sync.events
              WHERE person_key = '{p}' AND id > {last_event} ORDER BY target, seq"
        ),
    );
    assert_eq!(after, ["app update done", "dry update done"]);
    // Nothing to do: nothing returned.
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM identity_sync.sync_person('{p}')")
        ),
        0
    );

    // A hire entered and provisioned in every target at once.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL ROLE fin_helpdesk;
         INSERT INTO employee VALUES (900100, '1990-01-01', 'Hana', 'Helpdesk', 'F', current_date);
         INSERT INTO dept_emp VALUES (900100, 'd001', current_date, '9999-01-01');",
    )
    .unwrap();
    let got: Vec<String> = tx
        .query(
            "SELECT target || ' ' || kind || ' ' || state FROM identity_sync.sync_person('900100')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit().unwrap();
    assert_eq!(got, ["app create pending", "dry create done"]);
    wait_idle(&mut c, 60);
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT last_name FROM fin_users WHERE emp_no = 900100"
        ),
        "Helpdesk"
    );

    let (code, msg, _, hint) =
        error_parts(&mut c, "SELECT * FROM identity_sync.sync_person('nobody')");
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("P0002", "person \"nobody\" is unknown")
    );
    assert!(hint.contains("key"), "{hint}");
    let (code, _, _, _) = error_parts(
        &mut c,
        "SELECT * FROM identity_sync.sync_person('10001', 'nowhere')",
    );
    assert_eq!(code, "42704");
    exec(
        &mut c,
        "DROP ROLE IF EXISTS fin_reader; CREATE ROLE fin_reader; GRANT identity_sync_reader TO fin_reader;",
    );
    let (code, _, _, _) = error_parts(
        &mut c,
        &format!("SET ROLE fin_reader; SELECT * FROM identity_sync.sync_person('{p}')"),
    );
    exec(&mut c, "RESET ROLE");
    assert_eq!(code, "42501", "a reader cannot provision");
    let audit: i64 = count(
        &mut c,
        &format!(
            "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'sync_person' AND object IN ('{p}', '900100')
                AND actor = 'postgres'"
        ),
    );
    assert_eq!(audit, 3);
    exec(
        &mut c,
        "REVOKE ALL ON employee, dept_emp FROM fin_helpdesk; DROP ROLE fin_helpdesk; DROP ROLE fin_reader;",
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A rule over all contracts
// ---------------------------------------------------------------------------------------------

/// Issue 18, item 7: a rule over every contract of a person (`EXISTS (SELECT … FROM
/// unnest(contracts) …)`) grants its group to exactly the persons an independent query over
/// `dept_emp` names, among them persons whose primary contract is elsewhere.
#[test]
fn rule_over_all_contracts_grants_exactly_the_right_persons() {
    let (_cleanup, mut c) = fresh();
    exec(
        &mut c,
        "SELECT identity_sync.add_target('dry', 'scim', 'http://127.0.0.1:9/v2', '{\"dry_run\": true}');
         SELECT identity_sync.map('dry', 'userName', $$person.emp_no::text$$);
         SELECT identity_sync.add_rule('dry', 'everyone', 'true', '{staff}');
         SELECT identity_sync.add_rule('dry', 'ever_in_research',
                $$EXISTS (SELECT 1 FROM unnest(contracts) c WHERE c.dept_no = 'd008')$$, '{alumni-research}');
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 120);
    // Accounts: persons working today; the group: those of them with any d008 contract.
    let working: BTreeSet<String> = column(
        &mut c,
        "SELECT DISTINCT emp_no::text FROM dept_emp WHERE from_date <= current_date AND current_date <= to_date",
    );
    let research: BTreeSet<String> = column(
        &mut c,
        "SELECT emp_no::text FROM dept_emp GROUP BY emp_no
          HAVING bool_or(from_date <= current_date AND current_date <= to_date) AND bool_or(dept_no = 'd008')",
    );
    let accounts: BTreeSet<String> = column(
        &mut c,
        "SELECT person_key FROM identity_sync.accounts WHERE target = 'dry' AND state = 'active'",
    );
    assert_eq!(accounts, working);
    let granted: BTreeSet<String> = column(
        &mut c,
        "SELECT person_key FROM identity_sync.accounts WHERE target = 'dry' AND 'alumni-research' = ANY (groups)",
    );
    assert_eq!(granted, research);
    let elsewhere: BTreeSet<String> = column(
        &mut c,
        "SELECT emp_no::text FROM dept_emp d WHERE to_date = '9999-01-01' AND dept_no <> 'd008'
            AND EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = d.emp_no AND x.dept_no = 'd008')",
    );
    assert!(
        !elsewhere.is_empty() && elsewhere.is_subset(&granted),
        "persons who left research for another department keep the group: {elsewhere:?}"
    );
    assert!(research.len() > 20, "{} persons", research.len());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE kind = 'grant' AND payload->>'group' = 'alumni-research'"
        ),
        research.len() as i64
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Snapshot capture through the worker
// ---------------------------------------------------------------------------------------------

/// Issue 18, item 8: the person source is a view; a change to the table under it has no
/// trigger to capture it, and reaches the target through the worker's scheduled snapshot.
#[test]
fn snapshot_capture_through_the_worker_reaches_a_target() {
    let (_cleanup, mut c) = fresh();
    exec(
        &mut c,
        "SELECT identity_sync.drop_source('employee');
         CREATE VIEW public.staff AS SELECT emp_no, first_name, last_name FROM employee;
         SELECT identity_sync.add_person_source('staff', 'emp_no');
         SELECT identity_sync.set_snapshot_interval('staff', '1 second');
         CREATE TABLE fin_users (emp_no int PRIMARY KEY, first_name text, last_name text, dept text, active boolean);
         SELECT identity_sync.add_target('app', 'table', NULL,
                '{\"relation\": \"public.fin_users\", \"key_column\": \"emp_no\", \"active_column\": \"active\"}');
         SELECT identity_sync.map('app', 'last_name', 'person.last_name');
         SELECT identity_sync.add_rule('app', 'marketing', $$contract.dept_no = 'd001'$$);
         SELECT identity_sync.resync('app');",
    );
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT capture FROM identity_sync.source WHERE relation = 'staff'::regclass"
        ),
        "snapshot"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'employee'::regclass AND tgname LIKE 'identity_sync%'"
        ),
        0,
        "the table under the view has no capture trigger"
    );
    wait_idle(&mut c, 120);
    let p: i32 = one(&mut c, "SELECT min(emp_no) FROM fin_users WHERE active");
    let hash = |c: &mut Client| -> Vec<u8> {
        one_with(
            c,
            "SELECT hash FROM identity_sync._snapshot WHERE person_key = $1",
            &[&p.to_string()],
        )
    };
    assert!(
        wait_until(Duration::from_secs(30), || count(
            &mut c,
            &format!("SELECT count(*) FROM identity_sync._snapshot WHERE person_key = '{p}'")
        ) == 1),
        "the worker never took a snapshot of the view"
    );
    // The first snapshot marked everybody (nothing was known before); they are planned.
    wait_idle(&mut c, 60);
    let before = hash(&mut c);
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Snapshotted' WHERE emp_no = {p}"),
    );
    assert!(
        wait_until(Duration::from_secs(60), || one::<Option<String>>(
            &mut c,
            &format!("SELECT last_name FROM fin_users WHERE emp_no = {p}")
        )
        .as_deref()
            == Some("Snapshotted")),
        "the change under the view did not reach the target:\n{}",
        undone(&mut c, "app")
    );
    let after = hash(&mut c);
    assert_ne!(
        after,
        before,
        "the worker's snapshot saw the change; trace:\n{}",
        one::<Option<String>>(
            &mut c,
            &format!(
                "SELECT string_agg(format('%s %s %s %s', at, step, target, detail), E'\\n' ORDER BY at)
                   FROM identity_sync.trace('{p}')"
            )
        )
        .unwrap_or_default()
    );
    wait_idle(&mut c, 60);
    let kinds: Vec<String> = column(
        &mut c,
        &format!("SELECT kind FROM identity_sync.events WHERE person_key = '{p}' ORDER BY seq"),
    );
    assert_eq!(kinds, ["create", "update"]);
}
