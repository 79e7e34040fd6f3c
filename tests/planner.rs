//! End-to-end acceptance tests of mapping & rules (issue 4) and of the planner and lifecycle
//! (issue 5), on the employees sample, against the harness cluster's worker.
//!
//! Every test builds its own state in the worker's database (`postgres`): it drops the
//! extension, reloads the HR tables and creates the extension again ([`setup`]). Targets are
//! dry runs, paused, or table targets, so no HTTP is involved. The clock is always set with
//! `identity_sync.set_clock()`, and after each move the tests wait until the worker's
//! date-boundary check has covered the new day, so nothing depends on timing.
//!
//! Run with `--test-threads=1` (scripts/test does): the tests share the worker.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const MANAGER_PATH: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value";
const USERNAME_EXPR: &str = "identity_sync.slug(person.first_name || '.' || person.last_name) \
     || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Fresh state in the worker's database: no extension, the employees sample (`small` or
/// `large`) loaded again, the extension created, the three sources registered and the clock
/// set to `clock` (a date), with the boundary check caught up.
fn setup(size: &str, clock: &str) -> Client {
    let mut c = db();
    reset_with_sample(&mut c, size, "DROP TABLE IF EXISTS planner_users;");
    set_clock(&mut c, clock);
    c
}

/// `setup`, then in one transaction the dry-run SCIM target `dry` (with `more_options`, members
/// to add to its options object, e.g. `, "create_before": "30 days"`) and `config` (its
/// mappings, rules, a resync).
fn setup_dry(size: &str, clock: &str, more_options: &str, config: &str) -> Client {
    let mut c = setup(size, clock);
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('dry', 'scim', 'http://127.0.0.1:9/v2', '{{\"dry_run\": true{more_options}}}');
             {config}"
        ),
    );
    c
}

fn json_of(c: &mut Client, sql: &str) -> Value {
    let s: Option<String> = one(c, sql);
    s.map(|s| serde_json::from_str(&s).expect("valid json"))
        .unwrap_or(Value::Null)
}

/// Set the clock to noon of `day` and wait until the worker's boundary check covered it.
fn set_clock(c: &mut Client, day: &str) {
    exec(
        c,
        &format!("SELECT identity_sync.set_clock('{day} 12:00:00+00'::timestamptz)"),
    );
    let mut last = None;
    let ok = wait_until(Duration::from_secs(60), || {
        last = c
            .query_one(
                "SELECT boundary_checked_on::text FROM identity_sync._settings",
                &[],
            )
            .unwrap()
            .get::<_, Option<String>>(0);
        last.as_deref() == Some(day)
    });
    assert!(
        ok,
        "the worker's boundary check did not reach {day} (at {last:?})"
    );
}

fn max_event_id(c: &mut Client) -> i64 {
    count(c, "SELECT coalesce(max(id), 0) FROM identity_sync.event")
}

/// The first person (by emp_no) with exactly one contract, running and outside d005
/// (development).
fn current_non_developer(c: &mut Client) -> i32 {
    one(
        c,
        "SELECT emp_no FROM dept_emp GROUP BY emp_no
          HAVING count(*) = 1 AND bool_and(to_date = '9999-01-01' AND dept_no <> 'd005')
          ORDER BY emp_no LIMIT 1",
    )
}

/// Events of one person after event id `after`: [(kind, payload)] in seq order.
fn events_of(c: &mut Client, person: &str, after: i64) -> Vec<(String, Value)> {
    c.query(
        "SELECT kind, payload::text FROM identity_sync.event
          WHERE person_key = $1 AND id > $2 ORDER BY target_id, seq",
        &[&person, &after],
    )
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            serde_json::from_str(&r.get::<_, String>(1)).unwrap(),
        )
    })
    .collect()
}

fn kinds(evs: &[(String, Value)]) -> Vec<&str> {
    evs.iter().map(|(k, _)| k.as_str()).collect()
}

/// The table target's table and a target `app` writing it, with the usual mappings.
fn add_table_target(c: &mut Client, options: &str) {
    exec(
        c,
        &format!(
            "CREATE TABLE planner_users (emp_no int PRIMARY KEY, user_name text, first_name text,
                                         last_name text, department text, active boolean);
             SELECT identity_sync.add_target('app', 'table', NULL,
                    '{{\"relation\": \"planner_users\", \"key_column\": \"emp_no\",
                       \"active_column\": \"active\"}}'::jsonb || '{options}'::jsonb);
             SELECT identity_sync.map('app', 'user_name', $${USERNAME_EXPR}$$, true, true);
             SELECT identity_sync.map('app', 'first_name', $$person.first_name$$);
             SELECT identity_sync.map('app', 'last_name', $$person.last_name$$);
             SELECT identity_sync.map('app', 'department', $$contract.dept_no$$);
             SELECT identity_sync.add_rule('app', 'everyone', 'true');"
        ),
    );
}

/// md5 of the contents of every table of the identity_sync schema, and the sequences' state.
fn schema_fingerprint(c: &mut Client) -> BTreeMap<String, String> {
    let rels: Vec<(String, String)> = c
        .query(
            "SELECT relname::text, relkind::text FROM pg_class
              WHERE relnamespace = 'identity_sync'::regnamespace AND relkind IN ('r', 'S')
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut out = BTreeMap::new();
    for (rel, kind) in rels {
        let q = quote_ident(&rel);
        let sql = if kind == "S" {
            format!("SELECT last_value::text || '/' || is_called::text FROM identity_sync.{q}")
        } else {
            format!(
                "SELECT coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '-') \
                 FROM identity_sync.{q} t"
            )
        };
        out.insert(rel, one::<String>(c, &sql));
    }
    out
}

/// The configuration a failed call must leave alone.
fn config_fingerprint(c: &mut Client) -> String {
    one(
        c,
        "SELECT concat_ws('|',
            (SELECT md5(coalesce(string_agg(m::text, ',' ORDER BY m::text), '')) FROM identity_sync.mapping m),
            (SELECT md5(coalesce(string_agg(r::text, ',' ORDER BY r::text), '')) FROM identity_sync.rule r),
            (SELECT md5(coalesce(string_agg(concat_ws(';', id, name, kind, url, options, compiled), ',' ORDER BY id), ''))
               FROM identity_sync.target))",
    )
}

// ---------------------------------------------------------------------------------------------
// Issue 5: planner and lifecycle
// ---------------------------------------------------------------------------------------------

/// The independent oracle: from dept_emp alone, for `day` and the previous checked day
/// `prev`: active, disabled, joiners (creates), leavers (disables), rehires (enables) and
/// movers (primary department changed, for persons who had an account on `prev`).
///
/// Lifecycle per design.md with all intervals 0 and delete_after NULL, seen the way the replay's
/// checks see it: on the first of each month from 1985-01. A person gets an account at the
/// first check day a contract covers ("seen"), so a person whose whole employment fell between
/// two check days never gets one (a first sync creates no account for a leaver); from then on
/// the account (never deleted) is active on the check days a contract covers (ends inclusive),
/// disabled otherwise. The primary contract is the design's default: active first, then latest
/// end, then latest start.
const ORACLE: &str = "
    WITH c AS (
        SELECT emp_no, dept_no, from_date, to_date,
               -- the first check day on or after the contract's start
               greatest(date '1985-01-01',
                        (date_trunc('month', from_date - 1) + interval '1 month')::date) AS first_check
          FROM dept_emp),
    p AS (
        SELECT emp_no,
               min(first_check) FILTER (WHERE first_check <= to_date) AS seen,
               bool_or(from_date <= $1::text::date AND to_date >= $1::text::date) AS active_now,
               bool_or(from_date <= $2::text::date AND to_date >= $2::text::date) AS active_prev
          FROM c GROUP BY emp_no),
    dept_now AS (
        SELECT DISTINCT ON (emp_no) emp_no, dept_no FROM dept_emp
         ORDER BY emp_no, (from_date <= $1::text::date AND to_date >= $1::text::date) DESC,
                  to_date DESC, from_date DESC),
    dept_prev AS (
        SELECT DISTINCT ON (emp_no) emp_no, dept_no FROM dept_emp
         ORDER BY emp_no, (from_date <= $2::text::date AND to_date >= $2::text::date) DESC,
                  to_date DESC, from_date DESC)
    SELECT count(*) FILTER (WHERE p.active_now),
           count(*) FILTER (WHERE p.seen <= $1::text::date AND NOT p.active_now),
           count(*) FILTER (WHERE p.seen > $2::text::date AND p.seen <= $1::text::date),
           count(*) FILTER (WHERE p.seen <= $2::text::date AND p.active_prev AND NOT p.active_now),
           count(*) FILTER (WHERE p.seen <= $2::text::date AND NOT p.active_prev AND p.active_now),
           count(*) FILTER (WHERE p.seen <= $2::text::date AND n.dept_no <> o.dept_no)
      FROM p JOIN dept_now n USING (emp_no) JOIN dept_prev o USING (emp_no)";

/// What the planner did: accounts by state in the dry-run target, and events after `after`.
fn observed(c: &mut Client, after: i64) -> [i64; 6] {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM identity_sync.account WHERE state = 'active'),
                    (SELECT count(*) FROM identity_sync.account WHERE state = 'disabled'),
                    count(*) FILTER (WHERE kind = 'create'),
                    count(*) FILTER (WHERE kind = 'disable'),
                    count(*) FILTER (WHERE kind = 'enable'),
                    count(*) FILTER (WHERE kind = 'update'),
                    count(*) FILTER (WHERE kind NOT IN ('create', 'disable', 'enable', 'update'))
               FROM identity_sync.event WHERE id > $1",
            &[&after],
        )
        .unwrap();
    let other: i64 = r.get(6);
    assert_eq!(other, 0, "unexpected event kinds (delete/grant/revoke)");
    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)]
}

fn oracle(c: &mut Client, day: &str, prev: &str) -> [i64; 6] {
    let r = c.query_one(ORACLE, &[&day, &prev]).unwrap();
    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)]
}

/// Issue 5 acceptance: replay of the HR history month by month, 1985-01 to 2003-01, on the
/// large sample (10,000 persons). The first month is planned by resync(); every later month
/// only by the worker's date-boundary check after set_clock(). Accounts by state and the
/// month's joiner / leaver / mover events equal the oracle's; at the end a resync changes
/// nothing.
#[test]
fn replay_of_hr_history_matches_oracle() {
    let started = Instant::now();
    let mut c = setup_dry(
        "large",
        "1985-01-01",
        "",
        "SELECT identity_sync.map('dry', 'externalId', $$person.emp_no::text$$);
         SELECT identity_sync.map('dry', 'department', $$contract.dept_no$$);
         SELECT identity_sync.add_rule('dry', 'everyone', 'true');
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 180);

    let mut months = Vec::new();
    for y in 1985..=2003 {
        for m in 1..=12 {
            if y == 2003 && m > 1 {
                break;
            }
            months.push(format!("{y}-{m:02}-01"));
        }
    }
    let mut mismatches = Vec::new();
    let mut totals = [0i64; 6];
    let mut prev = "1900-01-01".to_string();
    let mut after = 0;
    for (i, day) in months.iter().enumerate() {
        if i > 0 {
            after = max_event_id(&mut c);
            set_clock(&mut c, day); // the boundary check makes the persons dirty
            wait_idle(&mut c, 180);
        }
        let got = observed(&mut c, after);
        let want = oracle(&mut c, day, &prev);
        for k in 2..6 {
            totals[k] += got[k];
        }
        if got != want {
            mismatches.push(format!("{day}: planner {got:?}, oracle {want:?}"));
        }
        prev = day.clone();
    }
    let plan_errors = count(&mut c, "SELECT count(*) FROM identity_sync._plan_error");
    // Converged: a full re-plan at the end has nothing to do.
    let before = max_event_id(&mut c);
    exec(&mut c, "SELECT identity_sync.resync('dry')");
    wait_idle(&mut c, 180);
    let after_resync = max_event_id(&mut c) - before;
    eprintln!(
        "replay: {} months, creates {}, disables {}, enables {}, updates {} in {:.1} s",
        months.len(),
        totals[2],
        totals[3],
        totals[4],
        totals[5],
        started.elapsed().as_secs_f64()
    );
    assert!(
        mismatches.is_empty(),
        "[active, disabled, creates, disables, enables, updates] differ in {} months:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_eq!(plan_errors, 0);
    // Every employee a check day saw working joined once (those whose whole employment fell
    // between two first-of-the-month checks never got an account).
    let seen = count(
        &mut c,
        "SELECT count(DISTINCT emp_no) FROM dept_emp
          WHERE greatest(date '1985-01-01', (date_trunc('month', from_date - 1) + interval '1 month')::date)
                <= least(to_date, date '2003-01-01')",
    );
    assert!(seen > 9_900, "the sample's employees: {seen}");
    assert_eq!(
        totals[2], seen,
        "every employee seen working joined once: {totals:?}"
    );
    assert!(
        totals[3] > 0 && totals[5] > 0,
        "leavers and movers: {totals:?}"
    );
    assert_eq!(after_resync, 0, "a resync after the replay wrote events");
}

/// Issue 5 acceptance: a salary UPDATE produces no event; a department move produces one
/// `update` (and a `grant` because a rule says so); ten updates of one person before delivery
/// produce one event with the latest state.
#[test]
fn salary_update_no_event_move_one_update_ten_updates_one_event() {
    let mut c = setup("small", "2003-01-01");
    add_table_target(&mut c, "{}");
    exec(
        &mut c,
        "SELECT identity_sync.add_rule('app', 'development', $$contract.dept_no = 'd005'$$, '{developers}');
         SELECT identity_sync.add_related_source('salary', 'SELECT emp_no FROM changed');
         SELECT identity_sync.resync('app');",
    );
    wait_idle(&mut c, 180);
    let p = current_non_developer(&mut c);
    let pk = p.to_string();
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM planner_users WHERE emp_no = {p} AND active")
        ),
        1
    );

    // A salary change is captured and planned, and produces nothing.
    let plans_before = count(
        &mut c,
        &format!("SELECT count(*) FROM identity_sync.plan_run WHERE '{pk}' = ANY (keys)"),
    );
    let ev = max_event_id(&mut c);
    exec(
        &mut c,
        &format!("UPDATE salary SET amount = amount + 1000 WHERE emp_no = {p}"),
    );
    wait_idle(&mut c, 180);
    let plans_after = count(
        &mut c,
        &format!("SELECT count(*) FROM identity_sync.plan_run WHERE '{pk}' = ANY (keys)"),
    );
    assert!(
        plans_after > plans_before,
        "the salary change was not planned"
    );
    assert_eq!(
        events_of(&mut c, &pk, ev),
        vec![],
        "salary change made events"
    );

    // A department move: one update with the new department, and the rule's group.
    let ev = max_event_id(&mut c);
    exec(
        &mut c,
        &format!(
            "BEGIN;
             UPDATE dept_emp SET to_date = '2002-12-31' WHERE emp_no = {p};
             INSERT INTO dept_emp VALUES ({p}, 'd005', '2003-01-01', '9999-01-01');
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 180);
    let evs = events_of(&mut c, &pk, ev);
    assert_eq!(kinds(&evs), vec!["update", "grant"], "{evs:?}");
    assert_eq!(evs[0].1["changed"], json!({"department": "d005"}));
    assert_eq!(evs[1].1, json!({"group": "developers"}));
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT department FROM planner_users WHERE emp_no = {p}")
        ),
        "d005"
    );

    // Ten updates while the target is paused: one event with the latest state.
    let old_last: String = one(
        &mut c,
        &format!("SELECT last_name FROM employee WHERE emp_no = {p}"),
    );
    exec(&mut c, "SELECT identity_sync.pause('app')");
    let ev = max_event_id(&mut c);
    for i in 1..=10 {
        exec(
            &mut c,
            &format!("UPDATE employee SET last_name = 'Renamed{i}' WHERE emp_no = {p}"),
        );
        wait_idle(&mut c, 180); // each change is planned before the next one
    }
    let evs = events_of(&mut c, &pk, ev);
    assert_eq!(kinds(&evs), vec!["update"], "{evs:?}");
    assert_eq!(evs[0].1["changed"], json!({"last_name": "Renamed10"}));
    assert_eq!(evs[0].1["previous"], json!({"last_name": old_last}));
    exec(&mut c, "SELECT identity_sync.resume('app')");
    wait_idle(&mut c, 180);
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT last_name FROM planner_users WHERE emp_no = {p}")
        ),
        "Renamed10"
    );
    assert_eq!(
        count(
            &mut c,
            &format!(
                "SELECT count(*) FROM identity_sync.event WHERE person_key = '{pk}' AND id > {ev} AND state = 'done'"
            )
        ),
        1
    );
}

/// Set up a table target with max_disables 10 %, and terminate half of the active staff.
/// Returns the terminated person keys and the inactive rows of the table before.
fn mass_termination(c: &mut Client) -> (Vec<String>, Vec<String>) {
    add_table_target(c, r#"{"max_disables": "10%"}"#);
    exec(c, "SELECT identity_sync.resync('app')");
    wait_idle(c, 180);
    assert_eq!(
        count(c, "SELECT count(*) FROM planner_users WHERE active"),
        count(
            c,
            "SELECT count(DISTINCT emp_no) FROM dept_emp WHERE to_date >= '2003-01-01'"
        )
    );
    let inactive_before = inactive_rows(c);
    let keys: Vec<String> = c
        .query(
            "UPDATE dept_emp SET to_date = '2002-12-31'
              WHERE to_date = '9999-01-01' AND emp_no % 2 = 0 RETURNING emp_no::text",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let active = count(c, "SELECT count(*) FROM planner_users WHERE active");
    assert!(keys.len() as i64 * 10 > active * 4, "about half terminated");
    wait_idle(c, 180);
    (keys, inactive_before)
}

/// Persons whose row in the target table is inactive (those who left before the clock's day
/// got disabled accounts at the initial sync).
fn inactive_rows(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT emp_no::text FROM planner_users WHERE NOT active ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn held_status(c: &mut Client) -> (String, Option<String>, Option<String>, i64, i64) {
    let r = c
        .query_one(
            "SELECT state, held_by, held_detail, events_held, events_pending
               FROM identity_sync.status WHERE target = 'app'",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// Issue 5 acceptance: terminating 50 % of staff with max_disables = 10 % holds the target;
/// nothing reaches the target table; release() lets the disables go.
#[test]
fn mass_termination_is_held_then_released() {
    let mut c = setup("small", "2003-01-01");
    let (keys, inactive_before) = mass_termination(&mut c);
    let n = keys.len() as i64;
    let (state, by, detail, held, pending) = held_status(&mut c);
    assert_eq!(state, "held");
    assert_eq!(by.as_deref(), Some("max_disables"));
    let detail = detail.unwrap_or_default();
    assert!(
        detail.starts_with(&format!("{n} disable events planned")),
        "held_detail: {detail}"
    );
    assert_eq!((held, pending), (n, 0));
    let sent =
        "SELECT count(*) FROM identity_sync.event WHERE kind = 'disable' AND sent_at IS NOT NULL";
    assert_eq!(count(&mut c, sent), 0);
    assert_eq!(
        inactive_rows(&mut c),
        inactive_before,
        "a held disable reached the target table"
    );

    let released: i32 = one(&mut c, "SELECT identity_sync.release('app')");
    assert_eq!(released as i64, n);
    wait_idle(&mut c, 180);
    let (state, by, _, held, _) = held_status(&mut c);
    assert_eq!((state.as_str(), by, held), ("active", None, 0));
    let mut want: Vec<String> = keys.iter().chain(inactive_before.iter()).cloned().collect();
    want.sort();
    assert_eq!(
        inactive_rows(&mut c),
        want,
        "exactly the terminated persons are disabled (besides those who had left before)"
    );
}

/// Issue 5: discard() drops the held events; the registry forgets the plan, so a resync plans
/// (and holds) the same disables again.
#[test]
fn mass_termination_is_held_then_discarded() {
    let mut c = setup("small", "2003-01-01");
    let (keys, inactive_before) = mass_termination(&mut c);
    let n = keys.len() as i64;
    assert_eq!(held_status(&mut c).0, "held");
    assert_eq!(inactive_rows(&mut c), inactive_before);
    let dropped: i32 = one(&mut c, "SELECT identity_sync.discard('app')");
    assert_eq!(dropped as i64, n);
    let (state, by, _, held, pending) = held_status(&mut c);
    assert_eq!((state.as_str(), by, held, pending), ("active", None, 0, 0));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.account WHERE planned_state <> state"
        ),
        0
    );
    wait_idle(&mut c, 180);
    assert_eq!(inactive_rows(&mut c), inactive_before);
    // Planned again on resync, and held again.
    exec(&mut c, "SELECT identity_sync.resync('app')");
    wait_idle(&mut c, 180);
    let (state, by, _, held, _) = held_status(&mut c);
    assert_eq!(
        (state.as_str(), by.as_deref(), held),
        ("held", Some("max_disables"), n)
    );
    assert_eq!(inactive_rows(&mut c), inactive_before);
}

/// Issue 5 acceptance: with create_before = 30 days, a hire 14 days ahead gets a disabled
/// account now; the boundary check enables it on the day. A hire 40 days ahead gets nothing yet.
#[test]
fn preboarding_creates_disabled_and_enables_on_the_day() {
    let mut c = setup_dry(
        "small",
        "2003-03-01",
        r#", "create_before": "30 days""#,
        "SELECT identity_sync.map('dry', 'userName', $$person.emp_no::text$$);
         SELECT identity_sync.add_rule('dry', 'everyone', 'true');
         INSERT INTO employee VALUES (900001, '1980-01-01', 'Petra', 'Preboard', 'F', '2003-03-15'),
                                     (900002, '1980-01-01', 'Lars', 'Later', 'M', '2003-04-10');
         INSERT INTO dept_emp VALUES (900001, 'd005', '2003-03-15', '9999-01-01'),
                                     (900002, 'd005', '2003-04-10', '9999-01-01');",
    );
    wait_idle(&mut c, 180);
    let state = |c: &mut Client, k: &str| -> Option<String> {
        c.query_opt(
            "SELECT state FROM identity_sync.account WHERE person_key = $1",
            &[&k],
        )
        .unwrap()
        .map(|r| r.get(0))
    };
    assert_eq!(state(&mut c, "900001").as_deref(), Some("disabled"));
    assert_eq!(state(&mut c, "900002"), None, "40 days ahead is too early");
    let evs = events_of(&mut c, "900001", 0);
    assert_eq!(kinds(&evs), vec!["create"]);
    assert_eq!(evs[0].1["active"], json!(false));

    set_clock(&mut c, "2003-03-14");
    wait_idle(&mut c, 180);
    assert_eq!(state(&mut c, "900001").as_deref(), Some("disabled"));
    assert_eq!(
        state(&mut c, "900002").as_deref(),
        Some("disabled"),
        "created 30 days ahead by the boundary check"
    );

    set_clock(&mut c, "2003-03-15");
    wait_idle(&mut c, 180);
    assert_eq!(state(&mut c, "900001").as_deref(), Some("active"));
    assert_eq!(
        kinds(&events_of(&mut c, "900001", 0)),
        vec!["create", "enable"]
    );
    assert_eq!(state(&mut c, "900002").as_deref(), Some("disabled"));
}

// ---------------------------------------------------------------------------------------------
// Issue 4: mapping and rules
// ---------------------------------------------------------------------------------------------

/// Issue 4 acceptance: userName = slug(first.last) with is_unique over all 10,000 employees
/// (plus accented names and an exact triple): all distinct, collisions numbered 2, 3, …,
/// accents removed; a second resync changes no unique value (also for a unique attribute that
/// is not on_create_only).
#[test]
fn unique_usernames_over_all_employees() {
    let mut c = setup("large", "2003-01-01");
    exec(
        &mut c,
        "INSERT INTO employee VALUES
            (900001, '1980-01-01', 'Zoë', 'Ångström-Çelik', 'F', '2001-01-01'),
            (900002, '1980-01-01', 'Anna', 'Example', 'F', '2001-01-01'),
            (900003, '1980-01-01', 'Anna', 'Example', 'F', '2001-01-01'),
            (900004, '1980-01-01', 'Anna', 'Example', 'F', '2001-01-01'),
            (900005, '1980-01-01', 'Łukasz', 'Øster Straße', 'M', '2001-01-01');
         INSERT INTO dept_emp SELECT emp_no, 'd001', '2001-01-01', '9999-01-01'
           FROM employee WHERE emp_no > 900000;",
    );
    wait_idle(&mut c, 180); // no target yet: nothing to plan
                            // disable_after of a century: the sample's leavers get (disabled) accounts too, since this
                            // test is about unique values over all 10,005 persons (a first sync creates none for persons
                            // who had already left).
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('dry', 'scim', 'http://127.0.0.1:9/v2', '{{\"dry_run\": true, \"disable_after\": \"100 years\"}}');
             SELECT identity_sync.map('dry', 'userName', $${USERNAME_EXPR}$$, true, true);
             SELECT identity_sync.map('dry', 'emails[type eq \"work\"].value',
                    $$identity_sync.slug(person.first_name || '.' || person.last_name)
                      || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END || '@example.com'$$,
                    false, true);
             SELECT identity_sync.add_rule('dry', 'everyone', 'true');
             SELECT identity_sync.resync('dry');"
        ),
    );
    wait_idle(&mut c, 180);
    let total = count(&mut c, "SELECT count(*) FROM employee");
    assert_eq!(total, 10_005);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._plan_error"),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT attributes->>'userName') FROM identity_sync.account"
        ),
        total,
        "userNames are not distinct"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.account WHERE attributes->>'userName' !~ '^[a-z0-9._-]+$'"),
        0,
        "a userName with characters other than a-z 0-9 . - _"
    );
    // Per base name: the values are base, base2, base3, … with no gap.
    let bad = count(
        &mut c,
        "WITH u AS (
            SELECT identity_sync.slug(e.first_name || '.' || e.last_name) AS base,
                   a.attributes->>'userName' AS v
              FROM employee e JOIN identity_sync.account a ON a.person_key = e.emp_no::text)
         SELECT count(*) FROM (
            SELECT base, got, ARRAY(SELECT base || CASE WHEN i = 1 THEN '' ELSE i::text END
                                      FROM generate_series(1, n) AS i ORDER BY 1) AS want
              FROM (SELECT base, array_agg(v ORDER BY v) AS got, count(*)::int AS n
                      FROM u GROUP BY base) AS b) AS g
         WHERE got <> want",
    );
    assert_eq!(bad, 0, "a name collision was not numbered 2, 3, …");
    let names: Vec<(String, String)> = c
        .query(
            "SELECT person_key, attributes->>'userName' FROM identity_sync.account
              WHERE person_key::int > 900000 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(names[0], ("900001".into(), "zoe.angstrom-celik".into()));
    let triple: BTreeSet<&str> = names[1..4].iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        triple,
        BTreeSet::from(["anna.example", "anna.example2", "anna.example3"])
    );
    assert_eq!(names[4].1, "lukasz.osterstrasse");
    let collisions = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.account WHERE attributes->>'userName' ~ '[0-9]$'",
    );
    assert!(collisions >= 2, "the sample has name collisions");

    // Stable: a second full re-plan changes no value.
    let ev = max_event_id(&mut c);
    exec(&mut c, "SELECT identity_sync.resync('dry')");
    wait_idle(&mut c, 180);
    let changed: Vec<String> = c
        .query(
            "SELECT person_key || ': ' || (payload->>'changed') FROM identity_sync.event WHERE id > $1 LIMIT 10",
            &[&ev],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        changed.is_empty(),
        "a resync changed unique values: {changed:?}"
    );
}

/// Issue 4 acceptance: a department rule grants its group exactly to that department's current
/// members; a date rule (hired before 1990) scopes exactly those persons.
#[test]
fn department_and_date_rules_scope_exactly() {
    let mut c = setup_dry(
        "small",
        "1996-06-01",
        "",
        "SELECT identity_sync.map('dry', 'userName', $$person.emp_no::text$$);
         SELECT identity_sync.add_rule('dry', 'sales',
                $$contract.dept_no = 'd007' AND contract.from_date <= today AND contract.to_date >= today$$, '{sales}');
         SELECT identity_sync.add_rule('dry', 'veterans', $$person.hire_date < date '1990-01-01'$$, '{veterans}');
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 180);
    let set = |c: &mut Client, sql: &str| -> BTreeSet<String> {
        c.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let got_sales = set(
        &mut c,
        "SELECT person_key FROM identity_sync.account WHERE 'sales' = ANY (groups)",
    );
    let want_sales = set(
        &mut c,
        "SELECT DISTINCT emp_no::text FROM dept_emp
          WHERE dept_no = 'd007' AND from_date <= '1996-06-01' AND to_date >= '1996-06-01'",
    );
    assert!(!want_sales.is_empty());
    assert_eq!(got_sales, want_sales);

    // In scope: matched by either rule and working on the clock's day (a first sync creates no
    // accounts for persons who had already left).
    let got_veterans = set(
        &mut c,
        "SELECT person_key FROM identity_sync.account WHERE 'veterans' = ANY (groups)",
    );
    let want_veterans = set(
        &mut c,
        "SELECT emp_no::text FROM employee e WHERE hire_date < '1990-01-01'
            AND EXISTS (SELECT FROM dept_emp d WHERE d.emp_no = e.emp_no AND d.from_date <= '1996-06-01'
                                                   AND d.to_date >= '1996-06-01')",
    );
    assert!(!want_veterans.is_empty());
    assert_eq!(got_veterans, want_veterans);
    let got_scope = set(&mut c, "SELECT person_key FROM identity_sync.account");
    let want_scope: BTreeSet<String> = want_sales.union(&want_veterans).cloned().collect();
    assert_eq!(got_scope, want_scope);
    // Matched rules per person, as preview reports them.
    let p = want_sales.intersection(&want_veterans).next().cloned();
    if let Some(p) = p {
        let rules: String = one(
            &mut c,
            &format!("SELECT matched_rules::text FROM identity_sync.preview('{p}', 'dry')"),
        );
        assert_eq!(rules, "{sales,veterans}");
    }
}

/// Issue 4 acceptance: preview() for a person equals what the planner then writes (events,
/// attributes, groups), for a new account and for a move, and changes nothing.
#[test]
fn preview_equals_plan_and_changes_nothing() {
    let mut c = setup_dry(
        "small",
        "2003-01-01",
        "",
        &format!(
            "SELECT identity_sync.map('dry', 'userName', $${USERNAME_EXPR}$$, true, true);
             SELECT identity_sync.map('dry', 'name.givenName', $$person.first_name$$);
             SELECT identity_sync.map('dry', 'name.familyName', $$person.last_name$$);
             SELECT identity_sync.map('dry', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department', $$contract.dept_no$$);
             SELECT identity_sync.map('dry', 'hired', $$person.hire_date$$);
             SELECT identity_sync.add_rule('dry', 'everyone', 'true', '{{staff}}');
             SELECT identity_sync.add_rule('dry', 'development', $$contract.dept_no = 'd005'$$, '{{developers}}');"
        ),
    );
    wait_idle(&mut c, 180);
    let p = current_non_developer(&mut c);
    let pk = p.to_string();
    let preview = |c: &mut Client| -> (Value, Value, Value, Value) {
        let r = c
            .query_one(
                "SELECT events::text, attributes::text, to_jsonb(groups)::text, account::text
                   FROM identity_sync.preview($1, 'dry')",
                &[&pk],
            )
            .unwrap();
        let j = |i: usize| {
            r.get::<_, Option<String>>(i)
                .map(|s| serde_json::from_str(&s).unwrap())
                .unwrap_or(Value::Null)
        };
        (j(0), j(1), j(2), j(3))
    };
    let planned = |c: &mut Client, after: i64| -> (Value, Value, Value) {
        let evs: Value = events_of(c, &pk, after)
            .into_iter()
            .map(|(k, p)| json!({"kind": k, "payload": p}))
            .collect();
        let a = json_of(
            c,
            &format!(
                "SELECT jsonb_build_object('a', planned_attributes, 'g', to_jsonb(planned_groups))::text
                   FROM identity_sync.account WHERE person_key = '{pk}'"
            ),
        );
        (evs, a["a"].clone(), a["g"].clone())
    };

    // 1. No account yet.
    let before = schema_fingerprint(&mut c);
    let (events, attrs, groups, account) = preview(&mut c);
    let (events2, _, _, _) = preview(&mut c);
    assert_eq!(schema_fingerprint(&mut c), before, "preview changed tables");
    assert_eq!(events, events2);
    assert_eq!(account, Value::Null);
    assert_eq!(events[0]["kind"], "create", "{events}");
    assert_eq!(groups, json!(["staff"]));
    let ev = max_event_id(&mut c);
    exec(
        &mut c,
        &format!("UPDATE employee SET first_name = first_name WHERE emp_no = {p}"),
    );
    wait_idle(&mut c, 180);
    assert_eq!(planned(&mut c, ev), (events, attrs, groups));

    // 2. A move into development, previewed inside the HR transaction before it commits.
    let ev = max_event_id(&mut c);
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "UPDATE dept_emp SET to_date = '2002-12-31' WHERE emp_no = {p};
         INSERT INTO dept_emp VALUES ({p}, 'd005', '2003-01-01', '9999-01-01');"
    ))
    .unwrap();
    let r = tx
        .query_one(
            "SELECT events::text, attributes::text, to_jsonb(groups)::text FROM identity_sync.preview($1, 'dry')",
            &[&pk],
        )
        .unwrap();
    let j = |i: usize| serde_json::from_str::<Value>(&r.get::<_, String>(i)).unwrap();
    let (events, attrs, groups) = (j(0), j(1), j(2));
    tx.commit().unwrap();
    wait_idle(&mut c, 180);
    let k: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(k, vec!["update", "grant"]);
    assert_eq!(planned(&mut c, ev), (events, attrs, groups));
}

/// Issue 4 acceptance: invalid expressions are rejected at configuration time with the position
/// inside the expression, and the configuration is unchanged afterwards.
#[test]
fn invalid_expressions_rejected_with_position_config_unchanged() {
    let mut c = setup_dry(
        "small",
        "2003-01-01",
        "",
        "SELECT identity_sync.map('dry', 'department', $$contract.dept_no$$);
         SELECT identity_sync.add_rule('dry', 'everyone', 'true');",
    );
    let before = config_fingerprint(&mut c);
    let audit_before = count(&mut c, "SELECT count(*) FROM identity_sync._audit");
    // (call, expected sqlstate, expected position)
    let cases: &[(&str, &str, usize)] = &[
        // unknown column
        ("SELECT identity_sync.map('dry', 'department', $$upper(contract.dept_nox)$$)", "42703", 7),
        // unknown column, replacing an existing mapping
        ("SELECT identity_sync.map('dry', 'title', $$person.first_name || person.nick$$)", "42703", 22),
        // type mismatch
        ("SELECT identity_sync.map('dry', 'displayName', $$person.first_name + 1$$)", "42883", 19),
        // syntax error
        ("SELECT identity_sync.map('dry', 'displayName', $$person.first_name person.last_name$$)", "42601", 19),
        // unknown function
        ("SELECT identity_sync.map('dry', 'displayName', $$sluggify(person.first_name)$$)", "42883", 1),
        // rules
        ("SELECT identity_sync.add_rule('dry', 'broken', $$person.hire_date > 5$$)", "42883", 18),
        ("SELECT identity_sync.add_rule('dry', 'broken', $$contract.dept = 'd001'$$)", "42703", 1),
    ];
    for (sql, code, pos) in cases {
        let (got_code, message, detail, _) = error_parts(&mut c, sql);
        assert_eq!(&got_code, code, "{sql}: {message}");
        assert!(
            detail.contains(&format!("at character {pos} of the expression")),
            "{sql}: detail {detail:?} (message {message:?})"
        );
        assert_eq!(
            config_fingerprint(&mut c),
            before,
            "{sql} changed the configuration"
        );
    }
    // A non-boolean rule is refused too.
    let (code, message, _, _) = error_parts(
        &mut c,
        "SELECT identity_sync.add_rule('dry', 'broken', $$person.first_name$$)",
    );
    assert_eq!(code, "42804");
    assert!(message.contains("must be boolean"), "{message}");
    assert_eq!(config_fingerprint(&mut c), before);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._audit"),
        audit_before,
        "a refused call was audited as done"
    );
}

/// Issue 4: a run-time error for one person (a subquery returning two rows for movers) fails
/// that person, visibly, and not the batch.
#[test]
fn runtime_error_fails_one_person_not_the_batch() {
    let mut c = setup_dry(
        "small",
        "2003-01-01",
        // (disable_after of a century: leavers get accounts too, so every person is planned)
        r#", "disable_after": "100 years""#,
        "SELECT identity_sync.map('dry', 'department',
                $$(SELECT dept_no FROM dept_emp d WHERE d.emp_no = person.emp_no)$$);
         SELECT identity_sync.add_rule('dry', 'everyone', 'true');
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 180);
    let movers = count(
        &mut c,
        "SELECT count(*) FROM (SELECT emp_no FROM dept_emp GROUP BY 1 HAVING count(*) > 1) s",
    );
    let total = count(&mut c, "SELECT count(*) FROM employee");
    assert!(movers > 0);
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT plan_errors FROM identity_sync.status WHERE target = 'dry'"
        ),
        movers
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.account"),
        total - movers
    );
    let mover: String = one(
        &mut c,
        "SELECT emp_no::text FROM dept_emp GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 1",
    );
    let msg: String = one(
        &mut c,
        &format!(
            "SELECT detail->>'message' FROM identity_sync.trace('{mover}') WHERE step = 'plan error'"
        ),
    );
    assert!(msg.contains("more than one row"), "{msg}");
    // Fixing the mapping and re-planning clears the errors.
    exec(
        &mut c,
        "SELECT identity_sync.map('dry', 'department', $$contract.dept_no$$);
         SELECT identity_sync.resync('dry');",
    );
    wait_idle(&mut c, 180);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._plan_error"),
        0
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.account"),
        total
    );
}

/// Issue 4: a manager reference is stored as {"$person": key} and resolved at delivery (_claim)
/// to the manager's account id in the same target.
#[test]
fn manager_reference_stored_as_person_and_resolved_at_claim() {
    let mut c = setup("small", "2003-01-01");
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('scim', 'scim', 'http://127.0.0.1:9/v2');
             SELECT identity_sync.pause('scim');
             SELECT identity_sync.map('scim', 'userName', $$person.emp_no::text$$);
             SELECT identity_sync.map('scim', '{MANAGER_PATH}',
                    $$identity_sync.person_ref((SELECT m.emp_no FROM dept_manager m
                       WHERE m.dept_no = contract.dept_no AND m.to_date = '9999-01-01'))$$);
             SELECT identity_sync.add_rule('scim', 'everyone', 'true');
             SELECT identity_sync.resync('scim');"
        ),
    );
    wait_idle(&mut c, 180);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync._plan_error"),
        0
    );
    let r = c
        .query_one(
            "SELECT de.emp_no::text, m.emp_no::text FROM dept_emp de
               JOIN dept_manager m ON m.dept_no = de.dept_no AND m.to_date = '9999-01-01'
              WHERE de.to_date = '9999-01-01' AND de.emp_no <> m.emp_no
              ORDER BY de.emp_no LIMIT 1",
            &[],
        )
        .unwrap();
    let (p, m): (String, String) = (r.get(0), r.get(1));
    let stored = json_of(
        &mut c,
        &format!(
            "SELECT jsonb_build_object('a', planned_attributes, 'refs', to_jsonb(refs))::text
               FROM identity_sync.account WHERE person_key = '{p}'"
        ),
    );
    assert_eq!(stored["a"][MANAGER_PATH], json!({"$person": m}));
    assert_eq!(stored["refs"], json!([m]));
    let create = &events_of(&mut c, &p, 0)[0];
    assert_eq!(create.1["attributes"][MANAGER_PATH], json!({"$person": m}));

    // In a transaction that is rolled back: the manager's account exists in the target, the
    // target is running, and delivery claims the person's create.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "UPDATE identity_sync.target SET paused = false WHERE name = 'scim';
         UPDATE identity_sync.account SET remote_id = 'remote-of-{m}', state = 'active' WHERE person_key = '{m}';"
    ))
    .unwrap();
    let rows = tx
        .query(
            "SELECT person_key, payload::text FROM identity_sync._claim(ARRAY['scim'], 100000)",
            &[],
        )
        .unwrap();
    let claimed: BTreeMap<String, Value> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                serde_json::from_str(&r.get::<_, String>(1)).unwrap(),
            )
        })
        .collect();
    tx.rollback().unwrap();
    let payload = claimed.get(&p).expect("the person's create was claimed");
    assert_eq!(
        payload["attributes"][MANAGER_PATH],
        json!(format!("remote-of-{m}"))
    );
    // Stored state is untouched by the rolled-back claim.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.event WHERE state <> 'pending'"
        ),
        0
    );
}

/// Issue 4: every configuration call is in audit_log (actor, old, new); the secret never is;
/// no role but the owner can change or delete audit rows.
#[test]
fn audit_log_records_configuration_and_is_append_only() {
    let mut c = setup("small", "2003-01-01");
    exec(
        &mut c,
        "DROP ROLE IF EXISTS planner_admin; DROP ROLE IF EXISTS planner_plain;
         CREATE ROLE planner_admin; GRANT identity_sync_admin TO planner_admin;
         CREATE ROLE planner_plain;
         GRANT SELECT ON employee, dept_emp TO planner_admin;
         SET SESSION AUTHORIZATION planner_admin;
         SELECT identity_sync.add_target('hook', 'webhook', 'http://127.0.0.1:9/hook', '{\"auth\": \"bearer\"}');
         SELECT identity_sync.set_secret('hook', 'sup3r-s3cret-t0ken');
         SELECT identity_sync.map('hook', 'name', $$person.first_name$$);
         SELECT identity_sync.map('hook', 'name', $$person.last_name$$);
         SELECT identity_sync.unmap('hook', 'name');
         SELECT identity_sync.add_rule('hook', 'sales', $$contract.dept_no = 'd007'$$, '{sales}');
         SELECT identity_sync.drop_rule('hook', 'sales');
         SELECT identity_sync.alter_target('hook', options => '{\"timeout\": \"5 s\"}');
         SELECT identity_sync.drop_target('hook');
         RESET SESSION AUTHORIZATION;",
    );
    #[allow(clippy::type_complexity)]
    let rows: Vec<(String, String, String, Option<String>, Option<String>)> = c
        .query(
            "SELECT action, actor, coalesce(object, ''), old::text, new::text
               FROM identity_sync.audit_log WHERE actor = 'planner_admin' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let actions: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        actions,
        vec![
            "add_target",
            "set_secret",
            "map",
            "map",
            "unmap",
            "add_rule",
            "drop_rule",
            "alter_target",
            "drop_target"
        ]
    );
    let j = |s: &Option<String>| -> Value {
        s.as_ref()
            .map(|s| serde_json::from_str(s).unwrap())
            .unwrap_or(Value::Null)
    };
    // map: old → new
    assert_eq!(rows[2].2, "hook.name");
    assert_eq!(j(&rows[2].3), Value::Null);
    assert_eq!(j(&rows[2].4)["expression"], "person.first_name");
    assert_eq!(j(&rows[3].3)["expression"], "person.first_name");
    assert_eq!(j(&rows[3].4)["expression"], "person.last_name");
    assert_eq!(j(&rows[4].3)["expression"], "person.last_name");
    assert_eq!(j(&rows[7].3)["options"], json!({"auth": "bearer"}));
    assert_eq!(
        j(&rows[7].4)["options"],
        json!({"auth": "bearer", "timeout": "5 s"})
    );
    // The earlier setup calls (as postgres) are there too.
    let setup_actions: Vec<String> = c
        .query(
            "SELECT action FROM identity_sync.audit_log WHERE actor = 'postgres' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for a in [
        "add_person_source",
        "add_contract_source",
        "add_related_source",
        "set_clock",
    ] {
        assert!(setup_actions.iter().any(|x| x == a), "{a} not audited");
    }
    // Never the secret, anywhere in the audit.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync._audit a WHERE a::text LIKE '%s3cret%'"
        ),
        0
    );
    // Append-only for every role but the owner.
    for role in ["planner_admin", "planner_plain"] {
        for sql in [
            "UPDATE identity_sync._audit SET actor = 'nobody'",
            "DELETE FROM identity_sync._audit",
            "UPDATE identity_sync.audit_log SET actor = 'nobody'",
            "DELETE FROM identity_sync.audit_log",
            "TRUNCATE identity_sync._audit",
        ] {
            let (code, message, _, _) = error_parts(&mut c, &format!("SET ROLE {role}; {sql}"));
            exec(&mut c, "RESET ROLE");
            assert_eq!(code, "42501", "{role}: {sql}: {message}");
        }
    }
    exec(
        &mut c,
        "DROP OWNED BY planner_admin; DROP ROLE planner_admin; DROP ROLE planner_plain;",
    );
}

/// Issue 4: target options are validated (unknown keys with the list of valid ones, wrong
/// types), and a refused add_target leaves nothing behind.
#[test]
fn target_options_are_validated() {
    let mut c = setup("small", "2003-01-01");
    let (code, message, _, hint) = error_parts(
        &mut c,
        "SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/v2', '{\"dry_rnu\": true}')",
    );
    assert_eq!(code, "22023");
    assert!(message.contains("unknown option \"dry_rnu\""), "{message}");
    for valid in [
        "auth",
        "correlate_on",
        "create_before",
        "dry_run",
        "max_disables",
        "unique_max_iterations",
    ] {
        assert!(hint.contains(valid), "hint lacks {valid}: {hint}");
    }
    assert!(
        !hint.contains("relation"),
        "table-only option offered for scim: {hint}"
    );
    let (_, message, _, hint) = error_parts(
        &mut c,
        "SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/v2', '{\"relation\": \"employee\"}')",
    );
    assert!(
        message.contains("unknown option \"relation\" for a scim target"),
        "{message}"
    );
    assert!(hint.contains("max_creates"), "{hint}");
    for (options, expect) in [
        (r#"{"dry_run": "yes"}"#, "true or false"),
        (r#"{"max_disables": "ten"}"#, "a count such as 50"),
        (r#"{"max_creates": -1}"#, "a count such as 50"),
        (
            r#"{"create_before": "soon"}"#,
            "invalid input syntax for type interval",
        ),
        (r#"{"create_before": true}"#, "an interval"),
        (r#"{"max_concurrency": 0}"#, "a positive whole number"),
        (r#"{"max_concurrency": 2.5}"#, "a positive whole number"),
        (
            r#"{"auth": "kerberos"}"#,
            "one of none, bearer, basic, oauth2",
        ),
        (r#"{"correlate_on": 7}"#, "a string"),
    ] {
        let (code, message, detail, _) = error_parts(
            &mut c,
            &format!("SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/v2', '{options}')"),
        );
        assert_eq!(code, "22023", "{options}: {message}");
        assert!(
            message.starts_with("invalid value for option"),
            "{options}: {message}"
        );
        assert!(detail.contains(expect), "{options}: detail {detail:?}");
    }
    // alter_target validates the merged options the same way.
    exec(
        &mut c,
        "SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/v2', '{\"dry_run\": true}')",
    );
    let (code, _, _, _) = error_parts(
        &mut c,
        "SELECT identity_sync.alter_target('x', options => '{\"max_deletes\": \"lots\"}')",
    );
    assert_eq!(code, "22023");
    assert_eq!(
        one::<String>(&mut c, "SELECT options::text FROM identity_sync.target"),
        r#"{"dry_run": true}"#
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.target"),
        1
    );
}

/// Issue 4: on_create_only attributes are sent at creation and never again.
#[test]
fn on_create_only_sent_at_creation_only() {
    let mut c = setup("small", "2003-01-01");
    add_table_target(&mut c, "{}");
    let p: i32 = one(
        &mut c,
        "SELECT emp_no FROM dept_emp WHERE to_date = '9999-01-01' ORDER BY emp_no LIMIT 1",
    );
    let pk = p.to_string();
    exec(
        &mut c,
        &format!("UPDATE employee SET first_name = first_name WHERE emp_no = {p}"),
    );
    wait_idle(&mut c, 180);
    let evs = events_of(&mut c, &pk, 0);
    assert_eq!(kinds(&evs), vec!["create"]);
    let user_name = evs[0].1["attributes"]["user_name"]
        .as_str()
        .expect("user_name sent at creation")
        .to_string();
    exec(
        &mut c,
        &format!(
            "UPDATE employee SET first_name = 'Renamed', last_name = 'Person' WHERE emp_no = {p}"
        ),
    );
    wait_idle(&mut c, 180);
    let evs = events_of(&mut c, &pk, 0);
    assert_eq!(kinds(&evs), vec!["create", "update"]);
    assert_eq!(
        evs[1].1["changed"],
        json!({"first_name": "Renamed", "last_name": "Person"}),
        "an on_create_only attribute was sent again"
    );
    let r = c
        .query_one(
            "SELECT user_name, first_name FROM planner_users WHERE emp_no = $1",
            &[&p],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, String>(1)),
        (user_name.clone(), "Renamed".to_string())
    );
    assert_eq!(
        json_of(
            &mut c,
            &format!("SELECT planned_attributes::text FROM identity_sync.account WHERE person_key = '{pk}'")
        )["user_name"],
        json!(user_name)
    );
}

/// Issue 4: SCIM attribute paths: core, sub-attribute, filtered multi-valued, URN extension
/// accepted; malformed paths refused with nothing stored.
#[test]
fn attribute_paths_validated() {
    let mut c = setup("small", "2003-01-01");
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('scim', 'scim', 'http://127.0.0.1:9/v2', '{{\"dry_run\": true}}');
             SELECT identity_sync.map('scim', 'userName', $$person.emp_no::text$$);
             SELECT identity_sync.map('scim', 'name.givenName', $$person.first_name$$);
             SELECT identity_sync.map('scim', 'emails[type eq \"work\"].value', $$person.emp_no || '@example.com'$$);
             SELECT identity_sync.map('scim', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department', $$contract.dept_no$$);
             SELECT identity_sync.map('scim', '{MANAGER_PATH}', $$NULL::jsonb$$);"
        ),
    );
    let before = config_fingerprint(&mut c);
    for path in [
        "name..givenName",
        "name.givenName.first",
        "emails[type eq work].value",
        "emails[type co \"work\"].value",
        "emails[type eq \"work\"",
        "1userName",
        "user name",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:",
        "id",
        "meta.created",
    ] {
        let (code, message, _, _) = error_parts(
            &mut c,
            &format!("SELECT identity_sync.map('scim', '{path}', $$person.first_name$$)"),
        );
        assert_eq!(code, "22023", "{path}: {message}");
        assert_eq!(config_fingerprint(&mut c), before, "{path} was stored");
    }
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.mapping"),
        5
    );
}

/// Issue 4: the helpers, as SQL: immutable, parallel safe, Unicode-correct.
#[test]
fn text_helpers_in_sql() {
    let mut c = setup("small", "2003-01-01");
    let normalize_diacritics: &[(&str, &str)] = &[
        ("Zoë Ångström-Çelik", "Zoe Angstrom-Celik"),
        ("Straße", "Strasse"),
        ("Øystein Łukasz", "Oystein Lukasz"),
        ("Işık", "Isik"),
    ];
    let slug: &[(&str, &str)] = &[
        ("Zoë.Ångström-Çelik", "zoe.angstrom-celik"),
        ("Anne Marie O'Brien", "annemarieobrien"),
        ("..Jan..de  Vries--", "jan.devries"),
    ];
    for (function, cases) in [
        ("normalize_diacritics", normalize_diacritics),
        ("slug", slug),
    ] {
        for (input, want) in cases {
            let got: String = one_with(
                &mut c,
                &format!("SELECT identity_sync.{function}($1)"),
                &[input],
            );
            assert_eq!(got, *want, "{function}({input})");
        }
    }
    let r = c
        .query_one(
            "SELECT prefix, core, display, sort_key, login FROM identity_sync.name_variants('Jan', 'van der Berg')",
            &[],
        )
        .unwrap();
    let got: Vec<String> = (0..5).map(|i| r.get(i)).collect();
    assert_eq!(
        got,
        vec![
            "van der",
            "Berg",
            "Jan van der Berg",
            "Berg, Jan van der",
            "jan.vanderberg"
        ]
    );
    let bad = count(
        &mut c,
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'identity_sync'::regnamespace
            AND proname IN ('normalize_diacritics', 'slug', 'name_variants')
            AND (provolatile <> 'i' OR proparallel <> 's')",
    );
    assert_eq!(bad, 0, "helpers must be immutable and parallel safe");
    // Usable in an index expression (only immutable functions are).
    exec(
        &mut c,
        "CREATE INDEX planner_slug_idx ON employee (identity_sync.slug(first_name || '.' || last_name));
         DROP INDEX planner_slug_idx;",
    );
}
