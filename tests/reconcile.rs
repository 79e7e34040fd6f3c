//! End-to-end acceptance tests of reconciliation (issue 12): `reconcile()` reads what a target
//! really holds in the harness cluster's worker — the third-party `scim2-server`, its variant
//! `scripts/scim-nofilter` whose filtered searches find nothing, table targets (local and
//! through postgres_fdw), a scripted SCIM stub — and reports drift and orphans, repairs them
//! through the planner, adopts accounts that exist before us, runs on a schedule, and refuses
//! bad input.
//!
//! Every test builds its own state in database `postgres` (the worker's): [`fresh`] drops the
//! extension, reloads the small employees sample and registers the sources.
//! Run by `scripts/test` (e2e layer, `--test-threads=1`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Fresh state in the worker's database, without leftovers of this file's tests; the extension
/// is dropped again when the returned guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(
        &mut c,
        "small",
        "DROP TABLE IF EXISTS public.app_users, public.rec_scope;
         DROP EXTENSION IF EXISTS postgres_fdw CASCADE;",
    );
    (cleanup, c)
}

/// The first `n` persons (by key) working today, in table `public.rec_scope`, which the SCIM
/// targets' rule selects.
fn scope(c: &mut Client, n: i64) -> Vec<i32> {
    exec(
        c,
        &format!(
            "CREATE TABLE public.rec_scope AS
             SELECT emp_no FROM dept_emp WHERE from_date <= identity_sync._today() AND to_date >= identity_sync._today()
              GROUP BY emp_no ORDER BY emp_no LIMIT {n}"
        ),
    );
    let people: Vec<i32> = column(c, "SELECT emp_no FROM public.rec_scope ORDER BY emp_no");
    assert_eq!(
        people.len() as i64,
        n,
        "the sample has {n} persons working today"
    );
    people
}

/// A SCIM target `name` on `scim` mapping userName, externalId, the name and the work e-mail
/// (a filtered path) of the persons in `rec_scope`, who are members of group `staff` when
/// `groups`; `options` are added to the target's (JSON members, e.g. `"correlate_on": "externalId"`).
fn add_scim_target(c: &mut Client, name: &str, scim: &ScimServer, options: &str, groups: bool) {
    let options = if options.is_empty() {
        String::new()
    } else {
        format!(", {options}")
    };
    let groups = if groups { "{staff}" } else { "{}" };
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('{name}', 'scim', '{}', '{{\"auth\": \"bearer\"{options}}}');
             SELECT identity_sync.set_secret('{name}', '{}');
             SELECT identity_sync.map('{name}', 'userName', $$identity_sync.slug(person.first_name || '.' || person.last_name) || person.emp_no$$);
             SELECT identity_sync.map('{name}', 'externalId', $$person.emp_no::text$$);
             SELECT identity_sync.map('{name}', 'name.givenName', $$person.first_name$$);
             SELECT identity_sync.map('{name}', 'name.familyName', $$person.last_name$$);
             SELECT identity_sync.map('{name}', 'emails[type eq \"work\"].value', $$identity_sync.slug(person.first_name) || person.emp_no || '@example.org'$$);
             SELECT identity_sync.add_rule('{name}', 'staff', $$person.emp_no IN (SELECT s.emp_no FROM public.rec_scope s)$$, '{groups}');",
            scim.base_url(),
            scim.token()
        ),
    );
}

/// One request to the SCIM server as a helpdesk would make it: (status, JSON body).
fn scim_call(scim: &ScimServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let auth = format!("Bearer {}", scim.token());
    let body = body.map(|b| b.to_string());
    let (status, text) = http_request(
        method,
        &format!("{}{path}", scim.base_url()),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/scim+json"),
        ],
        body.as_deref(),
    )
    .expect("request to the SCIM server");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn patch(scim: &ScimServer, path: &str, ops: Value) {
    let (status, body) = scim_call(
        scim,
        "PATCH",
        path,
        Some(
            json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops}),
        ),
    );
    assert!(
        status == 200 || status == 204,
        "PATCH {path}: {status} {body}"
    );
}

fn create_user(scim: &ScimServer, user: Value) -> String {
    let mut user = user;
    user["schemas"] = json!(["urn:ietf:params:scim:schemas:core:2.0:User"]);
    let (status, body) = scim_call(scim, "POST", "/Users", Some(user));
    assert_eq!(status, 201, "POST /Users: {body}");
    body["id"].as_str().expect("an id").to_string()
}

/// How many requests the server logged whose line contains one of `needles`, once its log has
/// settled (it writes a request's line after answering it).
fn logged(scim: &ScimServer, needles: &[&str]) -> usize {
    let n = || {
        scim.log()
            .lines()
            .filter(|l| needles.iter().any(|m| l.contains(m)))
            .count()
    };
    let mut last = n();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = n();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Requests the server logged other than GET (what would change it).
fn writes(scim: &ScimServer) -> usize {
    logged(scim, &["\"POST ", "\"PUT ", "\"PATCH ", "\"DELETE "])
}

/// `POST /Users` requests the server logged.
fn user_posts(scim: &ScimServer) -> usize {
    logged(scim, &["\"POST /v2/Users HTTP"])
}

/// Every user the server holds, by id.
fn users_by_id(scim: &ScimServer) -> BTreeMap<String, Value> {
    scim.users()
        .into_iter()
        .map(|u| (u["id"].as_str().unwrap_or_default().to_string(), u))
        .collect()
}

/// What `reconcile()` returned.
#[derive(Debug, PartialEq)]
struct Summary {
    state: String,
    scanned: i32,
    matched: i32,
    drifted: i32,
    missing: i32,
    orphans: i32,
    adopted: i32,
    planned_events: i32,
}

fn reconcile(c: &mut Client, target: &str, mode: &str) -> Summary {
    let row = c
        .query_one(
            "SELECT state, scanned, matched, drifted, missing, orphans, adopted, planned_events
               FROM identity_sync.reconcile($1, $2)",
            &[&target, &mode],
        )
        .unwrap_or_else(|e| panic!("reconcile({target}, {mode}): {}", describe(&e)));
    Summary {
        state: row.get(0),
        scanned: row.get(1),
        matched: row.get(2),
        drifted: row.get(3),
        missing: row.get(4),
        orphans: row.get(5),
        adopted: row.get(6),
        planned_events: row.get(7),
    }
}

/// The drift view of one target: (person, kind, attribute), sorted.
fn drift(c: &mut Client, target: &str) -> Vec<(String, String, Option<String>)> {
    c.query(
        "SELECT person_key, kind, attribute FROM identity_sync.drift WHERE target = $1 ORDER BY 1, 2, 3",
        &[&target],
    )
    .expect("read drift")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The orphans view of one target: (identifier, active), sorted.
fn orphans(c: &mut Client, target: &str) -> Vec<(String, Option<bool>)> {
    c.query(
        "SELECT identifier, active FROM identity_sync.orphans WHERE target = $1 ORDER BY 1",
        &[&target],
    )
    .expect("read orphans")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The registry of one target as text, to tell whether anything in it changed.
fn registry(c: &mut Client, target: &str) -> Vec<String> {
    column(
        c,
        &format!(
            "SELECT format('%s %s %s %s %s %s', person_key, remote_id, state, planned_state, attributes, groups)
               FROM identity_sync.accounts WHERE target = '{target}' ORDER BY person_key"
        ),
    )
}

fn events_not_done(c: &mut Client, target: &str) -> String {
    one::<Option<String>>(
        c,
        &format!(
            "SELECT coalesce(string_agg(format('%s %s %s %s %s', id, person_key, kind, state, last_error), E'\n'), '')
               FROM (SELECT * FROM identity_sync.events WHERE target = '{target}' AND state <> 'done' ORDER BY id LIMIT 20) e"
        ),
    )
    .unwrap_or_default()
}

fn p(key: i32) -> String {
    key.to_string()
}

// ------------------------------------------------------------------------------------------
// SCIM: report, repair, orphans
// ------------------------------------------------------------------------------------------

/// 200 accounts on scim2-server; a helpdesk renames one, deactivates one, deletes one, removes
/// one from its group and creates an unrelated user. A report finds exactly those five and
/// changes nothing; a repair restores the four and leaves the orphan; with `orphans: disable`
/// the orphan ends inactive.
#[test]
fn scim_report_repair_and_orphans() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    let people = scope(&mut c, 200);
    add_scim_target(&mut c, "dir", &scim, "\"create_groups\": true", true);
    exec(&mut c, "SELECT identity_sync.resync('dir')");
    wait_idle(&mut c, 180);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'dir' AND state = 'active' AND remote_id IS NOT NULL"
        ),
        200,
        "{}",
        events_not_done(&mut c, "dir")
    );
    assert_eq!(scim.users().len(), 200);
    assert_eq!(scim.group_members("staff").len(), 200);

    let (renamed, disabled, deleted, ungrouped) = (people[3], people[50], people[100], people[150]);
    let id = |c: &mut Client, person| remote_id(c, "dir", person);
    let (renamed_id, disabled_id, deleted_id, ungrouped_id) = (
        id(&mut c, renamed),
        id(&mut c, disabled),
        id(&mut c, deleted),
        id(&mut c, ungrouped),
    );
    let renamed_user = scim.user(&renamed_id).1;
    let staff = scim.get_json("/Groups?count=100")["Resources"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    patch(
        &scim,
        &format!("/Users/{renamed_id}"),
        json!([{"op": "replace", "path": "userName", "value": "helpdesk.rename"}]),
    );
    patch(
        &scim,
        &format!("/Users/{disabled_id}"),
        json!([{"op": "replace", "path": "active", "value": false}]),
    );
    assert_eq!(
        scim_call(&scim, "DELETE", &format!("/Users/{deleted_id}"), None).0,
        204
    );
    patch(
        &scim,
        &format!("/Groups/{staff}"),
        json!([{"op": "remove", "path": format!("members[value eq \"{ungrouped_id}\"]")}]),
    );
    let intruder = create_user(
        &scim,
        json!({"userName": "intruder", "externalId": "x-1", "active": true}),
    );

    // Report: exactly the five findings, and nothing changes anywhere.
    let server_before = users_by_id(&scim);
    let members_before = scim.group_members("staff");
    let writes_before = writes(&scim);
    let registry_before = registry(&mut c, "dir");
    let s = reconcile(&mut c, "dir", "report");
    assert_eq!(
        s,
        Summary {
            state: "done".into(),
            scanned: 200,
            matched: 199,
            drifted: 3,
            missing: 1,
            orphans: 1,
            adopted: 0,
            planned_events: 0
        }
    );
    assert_eq!(
        drift(&mut c, "dir"),
        vec![
            (p(renamed), "changed".into(), Some("userName".into())),
            (p(disabled), "disabled".into(), Some("active".into())),
            (p(deleted), "missing".into(), None),
            (p(ungrouped), "group_missing".into(), Some("staff".into())),
        ]
    );
    let (desired, actual): (String, String) = {
        let r = c
            .query_one(
                "SELECT desired::text, actual::text FROM identity_sync.drift WHERE target = 'dir' AND kind = 'changed'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(desired, renamed_user["userName"].to_string());
    assert_eq!(actual, "\"helpdesk.rename\"");
    assert_eq!(
        orphans(&mut c, "dir"),
        vec![("intruder".into(), Some(true))]
    );
    assert_eq!(
        users_by_id(&scim),
        server_before,
        "a report changes nothing on the server"
    );
    assert_eq!(scim.group_members("staff"), members_before);
    assert_eq!(writes(&scim), writes_before, "a report only reads");
    assert_eq!(
        registry(&mut c, "dir"),
        registry_before,
        "nor in the registry"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'dir' AND state <> 'done'"
        ),
        0
    );

    // Repair: the four are restored, the orphan stays.
    let s = reconcile(&mut c, "dir", "repair");
    assert_eq!(
        (s.state.as_str(), s.drifted, s.missing, s.orphans),
        ("done", 3, 1, 1)
    );
    assert!(
        s.planned_events >= 4,
        "update, enable, create, grant: {s:?}"
    );
    wait_idle(&mut c, 60);
    let restored = scim.user(&renamed_id).1;
    assert_eq!(restored["userName"], renamed_user["userName"]);
    assert_eq!(scim.user(&disabled_id).1["active"], true);
    let recreated = id(&mut c, deleted);
    assert_ne!(
        recreated, deleted_id,
        "the deleted account was created again"
    );
    assert_eq!(scim.user(&recreated).1["externalId"], p(deleted));
    let members: BTreeSet<String> = column(
        &mut c,
        "SELECT remote_id FROM identity_sync.accounts WHERE target = 'dir' AND NOT orphan",
    );
    // (scim2-server keeps a deleted user's id among a group's members)
    let users = users_by_id(&scim);
    let mut staff_members = scim.group_members("staff");
    staff_members.retain(|m| users.contains_key(m));
    assert_eq!(staff_members, members, "every account is in staff again");
    assert_eq!(
        scim.user(&intruder).1["active"],
        true,
        "the orphan is left alone"
    );
    assert_eq!(scim.users().len(), 201);
    // trace() tells the repaired person's story: the finding, then the event that undid it.
    let steps: Vec<String> = column(
        &mut c,
        &format!(
            "SELECT step FROM identity_sync.trace('{renamed}') WHERE target = 'dir' ORDER BY at"
        ),
    );
    let finding = steps.iter().position(|s| s == "reconcile changed");
    let update = steps.iter().rposition(|s| s == "event update");
    assert!(
        matches!((finding, update), (Some(f), Some(u)) if f < u),
        "trace: {steps:?}"
    );

    let s = reconcile(&mut c, "dir", "report");
    assert_eq!(
        (s.drifted, s.missing, s.orphans),
        (0, 0, 1),
        "{:?}",
        drift(&mut c, "dir")
    );
    assert!(drift(&mut c, "dir").is_empty());

    // orphans: disable retires the unrelated account, through the planner.
    exec(
        &mut c,
        "SELECT identity_sync.alter_target('dir', options => '{\"orphans\": \"disable\"}')",
    );
    let s = reconcile(&mut c, "dir", "repair");
    assert_eq!((s.orphans, s.planned_events), (1, 1), "{s:?}");
    wait_idle(&mut c, 60);
    assert_eq!(scim.user(&intruder).1["active"], false);
    assert_eq!(scim.users().len(), 201, "disabled, not deleted");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'dir' AND kind = 'disable' AND state = 'done'"
        ),
        1
    );
    let s = reconcile(&mut c, "dir", "report");
    assert_eq!((s.drifted, s.missing, s.orphans), (0, 0, 1));
    assert_eq!(
        orphans(&mut c, "dir"),
        vec![("intruder".into(), Some(false))]
    );

    // Each manual run and the option change are in the audit log.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'reconcile' AND object = 'dir'"),
        5
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'alter_target' AND new->'options'->>'orphans' = 'disable'"
        ),
        1
    );
}

// ------------------------------------------------------------------------------------------
// Adoption
// ------------------------------------------------------------------------------------------

/// Pre-creates users for `people` on `scim` as an old directory holds them: same externalId,
/// other userName and family name, every tenth inactive. Returns person → id.
fn legacy_users(scim: &ScimServer, people: &[i32]) -> BTreeMap<i32, String> {
    people
        .iter()
        .enumerate()
        .map(|(i, &person)| {
            let id = create_user(
                scim,
                json!({"userName": format!("legacy{person}"), "externalId": p(person),
                       "name": {"familyName": "Legacy"}, "active": i % 10 != 0}),
            );
            (person, id)
        })
        .collect()
}

/// After a first sync that adopted: every person in scope has one account on the server, those
/// that existed are the adopted ones, up to date and active.
fn assert_adopted(
    c: &mut Client,
    scim: &ScimServer,
    target: &str,
    people: &[i32],
    legacy: &BTreeMap<i32, String>,
) {
    let users = scim.users();
    let mut external: Vec<String> = users
        .iter()
        .map(|u| u["externalId"].as_str().unwrap_or_default().to_string())
        .collect();
    external.sort();
    let mut expected: Vec<String> = people.iter().map(|&x| p(x)).collect();
    expected.sort();
    assert_eq!(external, expected, "each person exactly once on the server");
    for (&person, id) in legacy {
        assert_eq!(&remote_id(c, target, person), id, "person {person} adopted");
        let u = scim.user(id).1;
        assert_eq!(u["active"], true, "{u}");
        assert_ne!(u["userName"], json!(format!("legacy{person}")), "{u}");
        assert_ne!(u["name"]["familyName"], "Legacy", "{u}");
    }
    assert_eq!(
        count(
            c,
            &format!("SELECT count(*) FROM identity_sync.events WHERE target = '{target}' AND state <> 'done'")
        ),
        0,
        "{}",
        events_not_done(c, target)
    );
    let (mode, state, adopted): (String, String, i32) = {
        let r = c
            .query_one(
                "SELECT mode, state, adopted FROM identity_sync.reconcile_run WHERE target = $1 ORDER BY id DESC LIMIT 1",
                &[&target],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(
        (mode.as_str(), state.as_str(), adopted as usize),
        ("adopt", "done", legacy.len())
    );
}

/// The first sync of target `dir` (correlating on externalId) over `scim` when the first
/// `existing` of `people` already have accounts there: it must adopt those (no POST for them)
/// and create only the others.
fn first_sync_adopts(c: &mut Client, scim: &ScimServer, people: &[i32], existing: usize) {
    let legacy = legacy_users(scim, &people[..existing]);
    add_scim_target(c, "dir", scim, "\"correlate_on\": \"externalId\"", false);
    exec(c, "SELECT identity_sync.resync('dir')");
    wait_idle(c, 180);
    assert_eq!(
        user_posts(scim) - existing,
        people.len() - existing,
        "a POST only for the persons without an account"
    );
    assert_adopted(c, scim, "dir", people, &legacy);
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'dir' AND kind = 'create'"
        ),
        (people.len() - existing) as i64
    );
}

/// 300 of 320 persons already have accounts on scim2-server: the first sync links them (no
/// POST for them), brings them up to date, and creates only the other 20.
#[test]
fn adoption_links_existing_accounts_instead_of_creating_them() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    let people = scope(&mut c, 320);
    first_sync_adopts(&mut c, &scim, &people, 300);
}

/// The same first sync against servers whose filtered searches find nothing (one says it
/// supports filters, the other that it does not): no duplicates, and creates do not fail.
#[test]
fn adoption_without_working_filters_makes_no_duplicates() {
    for flags in [&[][..], &["--filter-unsupported"][..]] {
        let (_cleanup, mut c) = fresh();
        let scim = ScimServer::start_nofilter(flags);
        let filtered = scim.get_json("/Users?filter=userName%20eq%20%22x%22");
        assert_eq!(filtered["totalResults"], 0, "{flags:?}");
        let people = scope(&mut c, 60);
        first_sync_adopts(&mut c, &scim, &people, 40);
        // A person who joins later is created (not failed for want of a filter).
        let joiner: i32 = one(
            &mut c,
            "SELECT min(emp_no) FROM dept_emp WHERE from_date <= identity_sync._today() AND to_date >= identity_sync._today()
               AND emp_no NOT IN (SELECT emp_no FROM public.rec_scope)",
        );
        exec(&mut c, &format!("INSERT INTO public.rec_scope VALUES ({joiner}); UPDATE employee SET last_name = last_name WHERE emp_no = {joiner}"));
        wait_idle(&mut c, 60);
        assert_eq!(
            account_state(&mut c, "dir", joiner),
            "active",
            "{}",
            events_not_done(&mut c, "dir")
        );
        assert_eq!(scim.users().len(), 61, "{flags:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Table targets
// ------------------------------------------------------------------------------------------

const APP_USERS: &str = "CREATE TABLE app_users (emp_no int PRIMARY KEY, login text, first_name text,
                                                 last_name text, active boolean NOT NULL DEFAULT true)";

fn add_table_target(c: &mut Client, name: &str, relation: &str, options: &str) {
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('{name}', 'table', NULL,
                    '{{\"relation\": \"{relation}\", \"key_column\": \"emp_no\", \"active_column\": \"active\"{options}}}');
             SELECT identity_sync.map('{name}', 'login', $$identity_sync.slug(person.first_name || '.' || person.last_name)$$);
             SELECT identity_sync.map('{name}', 'first_name', 'person.first_name');
             SELECT identity_sync.map('{name}', 'last_name', 'person.last_name');
             SELECT identity_sync.add_rule('{name}', 'scope', $$contract.dept_no IN ('d001', 'd006')$$);"
        ),
    );
}

const ROWS: &str =
    "SELECT format('%s|%s|%s|%s|%s', emp_no, login, first_name, last_name, active) FROM app_users ORDER BY emp_no";

/// A row edited, one disabled, one deleted and one added by hand, in a local table and in a
/// table behind postgres_fdw: found, repaired (the added one reported, then deleted with
/// `orphans: delete`).
#[test]
fn table_targets_edited_deleted_and_added_rows() {
    let (_cleanup, mut c) = fresh();
    let remote_db = "reconcile_remote";
    let mut r = fresh_db(remote_db);
    exec(&mut r, APP_USERS);
    exec(&mut c, APP_USERS);
    let port = harness_env("PGPORT");
    exec(
        &mut c,
        &format!(
            "CREATE EXTENSION postgres_fdw;
             CREATE SERVER rec_remote FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port '{port}', dbname '{remote_db}');
             CREATE USER MAPPING FOR postgres SERVER rec_remote OPTIONS (user 'postgres');
             CREATE FOREIGN TABLE remote_users (emp_no int, login text, first_name text, last_name text, active boolean)
                 SERVER rec_remote OPTIONS (table_name 'app_users');"
        ),
    );
    add_table_target(&mut c, "app", "public.app_users", "");
    add_table_target(&mut c, "remote", "public.remote_users", "");
    exec(
        &mut c,
        "SELECT identity_sync.resync('app'), identity_sync.resync('remote')",
    );
    wait_idle(&mut c, 60);
    let synced: Vec<String> = column(&mut c, ROWS);
    let n = synced.len() as i32;
    assert!(n > 30, "a few dozen rows: {n}");
    assert_eq!(column::<String, Vec<_>>(&mut r, ROWS), synced);
    let keys: Vec<i32> = column(
        &mut c,
        "SELECT emp_no FROM app_users WHERE active ORDER BY emp_no",
    );
    let (edited, disabled, deleted) = (keys[1], keys[2], keys[3]);

    for db in [&mut c, &mut r] {
        exec(
            db,
            &format!(
                "UPDATE app_users SET login = 'hacked' WHERE emp_no = {edited};
                 UPDATE app_users SET active = false WHERE emp_no = {disabled};
                 DELETE FROM app_users WHERE emp_no = {deleted};
                 INSERT INTO app_users (emp_no, login) VALUES (99999, 'intruder');"
            ),
        );
    }
    let tampered: Vec<String> = column(&mut c, ROWS);
    for target in ["app", "remote"] {
        let s = reconcile(&mut c, target, "report");
        assert_eq!(
            s,
            Summary {
                state: "done".into(),
                scanned: n,
                matched: n - 1,
                drifted: 2,
                missing: 1,
                orphans: 1,
                adopted: 0,
                planned_events: 0
            },
            "{target}"
        );
        assert_eq!(
            drift(&mut c, target),
            vec![
                (p(edited), "changed".into(), Some("login".into())),
                (p(disabled), "disabled".into(), Some("active".into())),
                (p(deleted), "missing".into(), None),
            ],
            "{target}"
        );
        assert_eq!(orphans(&mut c, target), vec![("99999".into(), Some(true))]);
    }
    assert_eq!(
        column::<String, Vec<_>>(&mut c, ROWS),
        tampered,
        "a report changes nothing"
    );
    assert_eq!(column::<String, Vec<_>>(&mut r, ROWS), tampered);

    for target in ["app", "remote"] {
        let s = reconcile(&mut c, target, "repair");
        assert_eq!(s.planned_events, 3, "update, enable, create: {target}");
    }
    wait_idle(&mut c, 60);
    let mut expected = synced.clone();
    expected.push("99999|intruder|||t".into());
    assert_eq!(
        column::<String, Vec<_>>(&mut c, ROWS),
        expected,
        "repaired, the orphan left"
    );
    assert_eq!(column::<String, Vec<_>>(&mut r, ROWS), expected);

    exec(
        &mut c,
        "SELECT identity_sync.alter_target('app', options => '{\"orphans\": \"delete\"}')",
    );
    let s = reconcile(&mut c, "app", "repair");
    assert_eq!(
        (s.drifted, s.missing, s.orphans, s.planned_events),
        (0, 0, 1, 1)
    );
    wait_idle(&mut c, 60);
    assert_eq!(
        column::<String, Vec<_>>(&mut c, ROWS),
        synced,
        "the orphan deleted"
    );
    let s = reconcile(&mut c, "app", "report");
    assert_eq!((s.scanned, s.drifted, s.missing, s.orphans), (n, 0, 0, 0));
}

/// Leavers re-enabled by hand: the repair would disable more than `max_disables`, so the target
/// is held like for any mass disable, until released.
#[test]
fn a_repair_beyond_max_disables_is_held() {
    let (_cleanup, mut c) = fresh();
    exec(&mut c, APP_USERS);
    add_table_target(&mut c, "app", "public.app_users", "");
    exec(&mut c, "SELECT identity_sync.resync('app')");
    wait_idle(&mut c, 60);
    let leavers: Vec<i32> = column(
        &mut c,
        "SELECT emp_no FROM app_users WHERE active ORDER BY emp_no LIMIT 4",
    );
    let list = leavers
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    exec(
        &mut c,
        &format!(
            "UPDATE dept_emp SET to_date = identity_sync._today() - 1
              WHERE emp_no IN ({list}) AND to_date >= identity_sync._today()"
        ),
    );
    wait_idle(&mut c, 60);
    let inactive =
        format!("SELECT count(*) FROM app_users WHERE emp_no IN ({list}) AND NOT active");
    assert_eq!(count(&mut c, &inactive), 4, "the leavers are disabled");

    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.alter_target('app', options => '{{\"max_disables\": 2}}');
             UPDATE app_users SET active = true WHERE emp_no IN ({list});"
        ),
    );
    let s = reconcile(&mut c, "app", "repair");
    assert_eq!((s.drifted, s.planned_events), (4, 4), "{s:?}");
    assert!(wait_until(Duration::from_secs(30), || one::<String>(
        &mut c,
        "SELECT state FROM identity_sync.status WHERE target = 'app'"
    ) == "held"));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.events WHERE target = 'app' AND kind = 'disable' AND state = 'held'"),
        4
    );
    assert_eq!(count(&mut c, &inactive), 0, "nothing disabled while held");
    exec(&mut c, "SELECT identity_sync.release('app')");
    wait_idle(&mut c, 60);
    assert_eq!(count(&mut c, &inactive), 4, "disabled once released");
}

// ------------------------------------------------------------------------------------------
// Scheduling, overlapping runs, cancellation
// ------------------------------------------------------------------------------------------

/// `reconcile_every`: the worker runs a report by itself once the clock has moved past it, and
/// again after another interval.
#[test]
fn reconcile_every_runs_when_the_clock_moves() {
    let (_cleanup, mut c) = fresh();
    exec(&mut c, APP_USERS);
    add_table_target(
        &mut c,
        "app",
        "public.app_users",
        ", \"reconcile_every\": \"1 day\"",
    );
    exec(&mut c, "SELECT identity_sync.resync('app')");
    wait_idle(&mut c, 60);
    let scheduled = "SELECT count(*) FROM identity_sync.reconcile_run WHERE target = 'app' AND scheduled AND state = 'done'";
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.reconcile_run"),
        0,
        "not due yet"
    );
    // (a person whose contract does not end, so moving the clock plans nothing for them)
    let edited: i32 = one(
        &mut c,
        "SELECT min(a.emp_no) FROM app_users a JOIN dept_emp d USING (emp_no)
          WHERE a.active AND d.to_date = '9999-01-01'",
    );
    exec(
        &mut c,
        &format!("UPDATE app_users SET login = 'hacked' WHERE emp_no = {edited}"),
    );

    exec(
        &mut c,
        "SELECT identity_sync.set_clock(now() + interval '25 hours')",
    );
    assert!(
        wait_until(Duration::from_secs(30), || count(&mut c, scheduled) == 1),
        "a scheduled run within 30 s of the clock passing reconcile_every"
    );
    wait_idle(&mut c, 60);
    assert!(drift(&mut c, "app").contains(&(p(edited), "changed".into(), Some("login".into()))));
    let (mode, by): (String, String) = {
        let r = c
            .query_one(
                "SELECT mode, requested_by FROM identity_sync.reconcile_run WHERE target = 'app'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (mode.as_str(), by.as_str()),
        ("report", "identity_sync worker")
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'reconcile'"
        ),
        0,
        "scheduled runs are not manual ones"
    );
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT login FROM app_users WHERE emp_no = {edited}")
        ),
        "hacked",
        "a report repairs nothing"
    );

    exec(
        &mut c,
        "SELECT identity_sync.set_clock(identity_sync._now() + interval '25 hours')",
    );
    assert!(wait_until(Duration::from_secs(30), || count(
        &mut c, scheduled
    ) == 2));
    exec(&mut c, "SELECT identity_sync.set_clock(NULL)");
}

/// A SCIM stub whose pages after the first hang while `slow` is set: one user per page, three
/// users.
fn slow_scim(slow: Arc<AtomicBool>) -> WebhookReceiver {
    WebhookReceiver::start_with(move |req| {
        let path = req.path.as_str();
        let list = |resources: Value, total: usize, start: usize| {
            Response::ok().body(
                json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                       "totalResults": total, "startIndex": start, "itemsPerPage": 1,
                       "Resources": resources})
                .to_string(),
            )
        };
        if path.starts_with("/scim/Users?") {
            let start: usize = path
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("startIndex="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let page = list(
                json!([{"id": format!("s{start}"), "userName": format!("stub{start}"), "active": true}]),
                3,
                start,
            );
            if start > 1 && slow.load(Ordering::SeqCst) {
                return page.delay(Duration::from_secs(20));
            }
            return page;
        }
        if path.starts_with("/scim/Groups") {
            return list(json!([]), 0, 1);
        }
        Response::status(404)
    })
}

/// While a run scans, a second one of the same target is refused (whoever asks); a caller that
/// cancels stops the run, and nothing it read is left behind; the next run works.
#[test]
fn overlapping_runs_are_refused_and_a_cancelled_run_leaves_nothing() {
    let (_cleanup, mut c) = fresh();
    let slow = Arc::new(AtomicBool::new(true));
    let stub = slow_scim(Arc::clone(&slow));
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('stub', 'scim', '{}', '{{\"orphans\": \"disable\"}}');
             SELECT identity_sync.map('stub', 'userName', 'person.first_name');
             SELECT identity_sync.add_rule('stub', 'all', 'true');",
            stub.url("/scim")
        ),
    );
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let caller = std::thread::spawn(move || {
        let mut a = db();
        let pid: i32 = one(&mut a, "SELECT pg_backend_pid()");
        pid_tx.send(pid).unwrap();
        a.query_one(
            "SELECT * FROM identity_sync.reconcile('stub', 'repair')",
            &[],
        )
        .map(|_| ())
        .map_err(|e| (e.code().cloned(), describe(&e)))
    });
    let pid = pid_rx.recv().unwrap();
    let running = "SELECT count(*) FROM identity_sync.reconcile_run WHERE target = 'stub' AND state = 'scanning' AND scanned = 1";
    assert!(
        wait_until(Duration::from_secs(30), || count(&mut c, running) == 1),
        "the run scans, its first page written"
    );

    let (code, message, _, hint) = error_parts(&mut c, "SELECT identity_sync.reconcile('stub')");
    assert_eq!(code, "55006", "{message}");
    assert!(
        message.starts_with("a reconcile of target \"stub\" is already running"),
        "{message}"
    );
    assert!(hint.contains("reconcile_run"), "{hint}");
    let queued: Option<i64> = one(
        &mut c,
        "SELECT identity_sync._reconcile_queue(t.id, 'report', 'test', true) FROM identity_sync.target t WHERE t.name = 'stub'",
    );
    assert_eq!(queued, None, "the worker's scheduler is refused too");
    let (code, ..) = error_parts(
        &mut c,
        "INSERT INTO identity_sync.reconcile_run (target_id, target, mode, requested_by, clock_at)
         SELECT id, name, 'report', 'test', now() FROM identity_sync.target WHERE name = 'stub'",
    );
    assert_eq!(
        code, "23505",
        "the unique index allows one active run per target"
    );

    exec(&mut c, &format!("SELECT pg_cancel_backend({pid})"));
    let (code, message) = caller
        .join()
        .unwrap()
        .expect_err("the caller was cancelled");
    assert_eq!(
        code,
        Some(postgres::error::SqlState::QUERY_CANCELED),
        "{message}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || one::<String>(
            &mut c,
            "SELECT state FROM identity_sync.reconcile_run WHERE target = 'stub'"
        ) == "cancelled"),
        "the run is cancelled"
    );
    assert_eq!(
        one::<Option<String>>(
            &mut c,
            "SELECT error FROM identity_sync.reconcile_run WHERE target = 'stub'"
        )
        .as_deref(),
        Some("cancelled by the caller")
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._remote"),
        0,
        "no scanned rows left"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._finding"),
        0
    );
    assert!(orphans(&mut c, "stub").is_empty() && drift(&mut c, "stub").is_empty());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.account WHERE orphan"
        ),
        0,
        "nothing repaired"
    );

    slow.store(false, Ordering::SeqCst);
    let s = reconcile(&mut c, "stub", "report");
    assert_eq!((s.state.as_str(), s.scanned, s.orphans), ("done", 3, 3));
    assert_eq!(
        orphans(&mut c, "stub"),
        vec![
            ("stub1".into(), Some(true)),
            ("stub2".into(), Some(true)),
            ("stub3".into(), Some(true))
        ]
    );
}

// ------------------------------------------------------------------------------------------
// Bad input
// ------------------------------------------------------------------------------------------

/// Unknown target, webhook target, unknown mode, a target without rules: each a clear error
/// with a HINT, and nothing recorded.
#[test]
fn bad_input_is_refused_and_nothing_is_recorded() {
    let (_cleanup, mut c) = fresh();
    exec(&mut c, APP_USERS);
    add_table_target(&mut c, "app", "public.app_users", "");
    exec(
        &mut c,
        "SELECT identity_sync.add_target('hook', 'webhook', 'http://127.0.0.1:9/hook');
         SELECT identity_sync.map('hook', 'name', 'person.first_name');
         SELECT identity_sync.add_rule('hook', 'all', 'true');
         SELECT identity_sync.add_target('bare', 'table', NULL,
                '{\"relation\": \"public.app_users\", \"key_column\": \"emp_no\"}');",
    );
    let audit_before = count(&mut c, "SELECT count(*) FROM identity_sync.audit_log");
    let cases = [
        (
            "SELECT identity_sync.reconcile('nope')",
            "42704",
            "target \"nope\" does not exist",
            "Targets: app, bare, hook.",
        ),
        (
            "SELECT identity_sync.reconcile('hook')",
            "0A000",
            "target \"hook\" cannot be reconciled: a webhook target cannot be read",
            "resync()",
        ),
        (
            "SELECT identity_sync.reconcile('app', 'fix')",
            "22023",
            "invalid reconcile mode \"fix\"",
            "report",
        ),
        (
            "SELECT identity_sync.reconcile('app', NULL)",
            "22023",
            "invalid reconcile mode \"<NULL>\"",
            "repair",
        ),
        (
            "SELECT identity_sync.reconcile('bare')",
            "55000",
            "target \"bare\" has no rules yet, so nobody is in scope and nothing can be compared",
            "identity_sync.add_rule()",
        ),
    ];
    for (sql, code, message, hint) in cases {
        let (got_code, got_message, _, got_hint) = error_parts(&mut c, sql);
        assert_eq!(
            (got_code.as_str(), got_message.as_str()),
            (code, message),
            "{sql}"
        );
        assert!(got_hint.contains(hint), "{sql}: hint {got_hint:?}");
    }
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.reconcile_run"),
        0
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.audit_log"),
        audit_before
    );
}
