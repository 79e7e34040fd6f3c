//! End-to-end acceptance tests of delivery (issue 6): the background worker of the harness
//! cluster plans and delivers to real targets on loopback — the third-party `scim2-server`,
//! webhook receivers with fault injection (signatures checked with the PyPI `standardwebhooks`
//! package), and table targets (a local table and a postgres_fdw foreign table in a second
//! database of the same cluster).
//!
//! Every test builds its own state from scratch in database `postgres` (the worker's):
//! [`fresh`] drops the extension, reloads the small employees sample and registers the sources.
//! Run by `scripts/test` (e2e layer, `--test-threads=1`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fresh state in the worker's database (`postgres`): no identity_sync, the small employees
/// sample, sources registered, no leftovers of other tests of this file (tables, foreign
/// servers); the extension is dropped again when the returned guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(
        &mut c,
        "small",
        "DROP TABLE IF EXISTS public.app_users; DROP EXTENSION IF EXISTS postgres_fdw CASCADE;",
    );
    (cleanup, c)
}

/// Move the clock forward by `interval`, then wait up to 30 s until the account of `person` in
/// `target` has `state`; else fail with `failure` and the target's events that are not done.
fn move_clock_until(
    c: &mut Client,
    interval: &str,
    (target, person, state): (&str, i32, &str),
    failure: &str,
) {
    exec(
        c,
        &format!("SELECT identity_sync.set_clock(identity_sync._now() + interval '{interval}')"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || account_state(c, target, person)
            == state),
        "{failure}:\n{}",
        undone(c, target)
    );
}

/// The primary contract of every person on the planner's day (the default order: active
/// today first, then the latest end, then the latest start).
const PRIMARY: &str = "(SELECT DISTINCT ON (d.emp_no) d.* FROM dept_emp d
    ORDER BY d.emp_no, (d.from_date <= identity_sync._today() AND d.to_date >= identity_sync._today()) DESC,
             d.to_date DESC, d.from_date DESC)";

// ------------------------------------------------------------------------------------------
// Webhook requests
// ------------------------------------------------------------------------------------------

/// One webhook delivery as received: arrival number, event id, person, type and the body.
#[derive(Debug, Clone)]
struct Hook {
    arrival: usize,
    id: i64,
    person: String,
    kind: String,
    body: Value,
}

fn hooks(r: &WebhookReceiver) -> Vec<Hook> {
    let mut out: Vec<Hook> = r
        .requests()
        .iter()
        .map(|q| {
            let body = q.json();
            Hook {
                arrival: q.seq,
                id: body["id"].as_i64().expect("webhook body has a numeric id"),
                person: body["person_key"].as_str().unwrap_or_default().to_string(),
                kind: body["type"].as_str().unwrap_or_default().to_string(),
                body,
            }
        })
        .collect();
    out.sort_by_key(|h| h.arrival);
    out
}

/// Per-person order: in arrival order, each person's events must have non-decreasing `seq`
/// (a repeat is a redelivery of the same event). Returns the number of duplicate deliveries.
fn check_order(c: &mut Client, target: &str, got: &[Hook]) -> usize {
    let seqs: HashMap<i64, (String, i64, String)> = c
        .query(
            "SELECT id, person_key, seq, kind FROM identity_sync.events WHERE target = $1",
            &[&target],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let mut last: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut dup = 0;
    for h in got {
        let (person, seq, kind) = seqs
            .get(&h.id)
            .unwrap_or_else(|| panic!("received event {} that {target} does not have", h.id));
        assert_eq!(
            person, &h.person,
            "event {} sent with another person_key",
            h.id
        );
        assert_eq!(kind, &h.kind, "event {} sent with another type", h.id);
        if let Some((prev_id, prev_seq)) = last.get(h.person.as_str()) {
            assert!(
                seq >= prev_seq,
                "person {}: event {} (seq {seq}) arrived after event {prev_id} (seq {prev_seq})",
                h.person,
                h.id
            );
            if seq == prev_seq {
                assert_eq!(*prev_id, h.id);
                dup += 1;
            }
        }
        last.insert(h.person.as_str(), (h.id, *seq));
    }
    dup
}

/// Every event of the target is done and was received at least once.
fn assert_all_delivered(c: &mut Client, target: &str, got: &[Hook]) -> usize {
    let ids: Vec<i64> = c
        .query(
            "SELECT id FROM identity_sync.events WHERE target = $1 AND state = 'done' ORDER BY id",
            &[&target],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let total = count(
        c,
        &format!("SELECT count(*) FROM identity_sync.events WHERE target = '{target}'"),
    );
    assert_eq!(
        ids.len() as i64,
        total,
        "not all events of {target} are done:\n{}",
        undone(c, target)
    );
    let received: BTreeSet<i64> = got.iter().map(|h| h.id).collect();
    let missing: Vec<&i64> = ids.iter().filter(|id| !received.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} events of {target} done but never received, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    ids.len()
}

/// A Standard Webhooks secret: `whsec_` + base64 of 24 random bytes (made by PostgreSQL).
fn new_webhook_secret(c: &mut Client) -> String {
    one::<Option<String>>(
        c,
        "SELECT 'whsec_' || encode(decode(md5(random()::text) || substr(md5(random()::text), 1, 16), 'hex'), 'base64')",
    )
    .unwrap()
}

/// Verify the signatures of `requests` with the PyPI `standardwebhooks` package; returns
/// (valid, invalid).
fn verify_with_standardwebhooks(
    secret: &str,
    requests: &[(Vec<(String, String)>, String)],
) -> (usize, usize) {
    let dir = std::env::temp_dir().join(format!("identity_sync-whverify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("requests.jsonl");
    let mut lines = String::new();
    for (headers, body) in requests {
        let h: serde_json::Map<String, Value> = headers
            .iter()
            .filter(|(k, _)| k.starts_with("webhook-"))
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        lines.push_str(&json!({"headers": h, "body": body}).to_string());
        lines.push('\n');
    }
    std::fs::write(&data, lines).unwrap();
    let script = r#"
import json, sys
from standardwebhooks import Webhook
wh = Webhook(sys.argv[1])
ok = bad = 0
for line in open(sys.argv[2]):
    r = json.loads(line)
    try:
        wh.verify(r["body"], r["headers"])
        ok += 1
    except Exception as e:
        bad += 1
        print("invalid:", r["headers"].get("webhook-id"), repr(e), file=sys.stderr)
print(ok, bad)
"#;
    let out = run_ok(
        Command::new(venv_dir().join("bin/python"))
            .arg("-c")
            .arg(script)
            .arg(secret)
            .arg(&data),
        "the standardwebhooks verification script",
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut it = stdout
        .split_whitespace()
        .map(|n| n.parse::<usize>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// A webhook target over `url` mapping a few attributes of persons in department `dept`.
fn add_webhook_target(
    c: &mut Client,
    name: &str,
    url: &str,
    options: &str,
    rule: &str,
    groups: &str,
) {
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('{name}', 'webhook', '{url}', '{options}');
             SELECT identity_sync.map('{name}', 'first_name', 'person.first_name');
             SELECT identity_sync.map('{name}', 'last_name', 'person.last_name');
             SELECT identity_sync.map('{name}', 'dept', 'contract.dept_no');
             SELECT identity_sync.add_rule('{name}', 'scope', $r${rule}$r$, '{groups}');"
        ),
    );
}

/// [`add_webhook_target`] `hook` over `receiver`'s `/`, for the persons of department d001,
/// without groups.
fn add_d001_hook(c: &mut Client, receiver: &WebhookReceiver, options: &str) {
    add_webhook_target(
        c,
        "hook",
        &receiver.url("/"),
        options,
        "contract.dept_no = 'd001'",
        "{}",
    );
}

// ------------------------------------------------------------------------------------------
// SCIM
// ------------------------------------------------------------------------------------------

const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// Persons currently in d001 without any d006 contract, by emp_no.
fn d001_people(c: &mut Client, n: i64) -> Vec<i32> {
    c.query(
        "SELECT emp_no FROM dept_emp d WHERE dept_no = 'd001' AND to_date = '9999-01-01'
            AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = d.emp_no AND x.dept_no <> 'd001')
          ORDER BY emp_no LIMIT $1",
        &[&n],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Issue 6 acceptance: the full story against scim2-server — initial sync with correlation of
/// a pre-existing account, a name change (PATCH of exactly that attribute), a department move
/// (group membership moves), a termination on its day, a rehire (same id re-enabled), and the
/// delete after `delete_after`.
#[test]
fn scim_full_story() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    let people = d001_people(&mut c, 5);
    let (pre, renamed, mover, leaver, deleted) =
        (people[0], people[1], people[2], people[3], people[4]);

    // A pre-existing account with the same externalId as `pre`.
    let auth = format!("Bearer {}", scim.token());
    let (status, body) = http_request(
        "POST",
        &format!("{}/Users", scim.base_url()),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/scim+json"),
        ],
        Some(
            &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "userName": "legacy.account", "externalId": pre.to_string()})
            .to_string(),
        ),
    )
    .unwrap();
    assert_eq!(status, 201, "pre-create: {body}");
    let pre_id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('scim', 'scim', '{}', '{{\"auth\": \"bearer\", \"correlate_on\": \"externalId\", \"create_groups\": true}}');
             SELECT identity_sync.set_secret('scim', '{}');
             SELECT identity_sync.map('scim', 'userName', $$identity_sync.slug(person.first_name || '.' || person.last_name) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$, true, true);
             SELECT identity_sync.map('scim', 'externalId', $$person.emp_no::text$$);
             SELECT identity_sync.map('scim', 'name.givenName', $$person.first_name$$);
             SELECT identity_sync.map('scim', 'name.familyName', $$person.last_name$$);
             SELECT identity_sync.map('scim', '{ENTERPRISE}:department', $$contract.dept_no$$);
             SELECT identity_sync.add_rule('scim', 'marketing', $$contract.dept_no = 'd001'$$, '{{marketing}}');
             SELECT identity_sync.add_rule('scim', 'quality', $$contract.dept_no = 'd006'$$, '{{quality}}');
             SELECT identity_sync.resync('scim');",
            scim.base_url(),
            scim.token()
        ),
    );
    wait_idle(&mut c, 120);

    // Initial sync: exactly the persons in scope, each once on the server.
    let expected = column::<String, Vec<_>>(
        &mut c,
        // in scope and working today: a first sync creates no accounts for persons who left
        &format!("SELECT emp_no::text FROM {PRIMARY} pc WHERE dept_no IN ('d001', 'd006')
                    AND pc.from_date <= identity_sync._today() AND pc.to_date >= identity_sync._today()
                  ORDER BY emp_no::text"),
    );
    assert!(
        expected.len() > 30,
        "scope is a few dozen persons: {}",
        expected.len()
    );
    let accounts = column::<String, Vec<_>>(
        &mut c,
        "SELECT person_key FROM identity_sync.accounts WHERE target = 'scim' AND remote_id IS NOT NULL
            AND state IN ('active', 'disabled') ORDER BY person_key",
    );
    assert_eq!(
        accounts,
        expected,
        "accounts with an id = persons in scope:\n{}",
        undone(&mut c, "scim")
    );
    let users = scim.users();
    let mut external: Vec<String> = users
        .iter()
        .map(|u| u["externalId"].as_str().unwrap_or_default().to_string())
        .collect();
    external.sort();
    assert_eq!(
        external, expected,
        "the server has each person exactly once"
    );
    // correlated, not duplicated
    assert_eq!(
        remote_id(&mut c, "scim", pre),
        pre_id,
        "the pre-existing account was linked"
    );
    let active_on_server = users.iter().filter(|u| u["active"] == true).count() as i64;
    assert_eq!(
        active_on_server,
        count(&mut c, "SELECT count(*) FROM identity_sync.accounts WHERE target = 'scim' AND state = 'active'"),
        "active on the server = active in the registry"
    );
    let marketing_ids: BTreeSet<String> = column(
        &mut c,
        &format!(
            "SELECT a.remote_id FROM identity_sync.accounts a JOIN {PRIMARY} pc ON pc.emp_no::text = a.person_key
              WHERE a.target = 'scim' AND pc.dept_no = 'd001'"
        ),
    );
    assert_eq!(scim.group_members("marketing"), marketing_ids);
    println!(
        "initial sync: {} users, {} marketing members",
        users.len(),
        marketing_ids.len()
    );

    // Name change: one PATCH of exactly that attribute.
    let rid = remote_id(&mut c, "scim", renamed);
    let (_, before) = scim.user(&rid);
    let patches = scim.log_count("PATCH", &rid);
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Renamed-Person' WHERE emp_no = {renamed}"),
    );
    wait_idle(&mut c, 30);
    let changed = one::<Option<String>>(
        &mut c,
        &format!(
            "SELECT string_agg(kind || ' ' || (payload->'changed')::text, '; ' ORDER BY seq) FROM identity_sync.events
              WHERE target = 'scim' AND person_key = '{renamed}' AND kind NOT IN ('create', 'grant')"
        ),
    );
    assert_eq!(
        changed.as_deref(),
        Some(r#"update {"name.familyName": "Renamed-Person"}"#)
    );
    assert_eq!(
        scim.log_count("PATCH", &rid),
        patches + 1,
        "exactly one PATCH"
    );
    assert_eq!(scim.log_count("PUT", &rid), 0, "no PUT");
    let (_, after) = scim.user(&rid);
    assert_eq!(after["name"]["familyName"], "Renamed-Person");
    assert_eq!(after["name"]["givenName"], before["name"]["givenName"]);
    assert_eq!(
        after["userName"], before["userName"],
        "userName is on-create-only"
    );

    // Department move: d001 → d006; membership moves from marketing to quality.
    let mid = remote_id(&mut c, "scim", mover);
    assert!(scim.group_members("marketing").contains(&mid));
    exec(
        &mut c,
        &format!(
            "BEGIN;
             UPDATE dept_emp SET to_date = identity_sync._today() - 1 WHERE emp_no = {mover} AND dept_no = 'd001';
             INSERT INTO dept_emp VALUES ({mover}, 'd006', identity_sync._today(), '9999-01-01');
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 30);
    let kinds = one::<Option<String>>(
        &mut c,
        &format!(
            "SELECT string_agg(kind || coalesce(' ' || (payload->>'group'), ''), ', ' ORDER BY kind) FROM identity_sync.events
              WHERE target = 'scim' AND person_key = '{mover}' AND seq > 2"
        ),
    );
    assert_eq!(
        kinds.as_deref(),
        Some("grant quality, revoke marketing, update")
    );
    assert!(
        !scim.group_members("marketing").contains(&mid),
        "still in marketing"
    );
    assert!(
        scim.group_members("quality").contains(&mid),
        "not in quality"
    );
    let (_, u) = scim.user(&mid);
    assert_eq!(u[ENTERPRISE]["department"], "d006");
    assert_eq!(u["active"], true);

    // Termination: the last day is today; the account is disabled when the day has passed.
    let lid = remote_id(&mut c, "scim", leaver);
    exec(
        &mut c,
        &format!("UPDATE dept_emp SET to_date = identity_sync._today() WHERE emp_no = {leaver} AND to_date = '9999-01-01'"),
    );
    wait_idle(&mut c, 30);
    assert_eq!(
        account_state(&mut c, "scim", leaver),
        "active",
        "active on the last day"
    );
    assert_eq!(scim.user(&lid).1["active"], true);
    move_clock_until(
        &mut c,
        "1 day",
        ("scim", leaver, "disabled"),
        "not disabled the day after the last day",
    );
    wait_idle(&mut c, 30);
    let (_, u) = scim.user(&lid);
    assert_eq!(
        u["active"], false,
        "the server still has the leaver active: {u}"
    );

    // Rehire: a new contract re-enables the same account.
    exec(
        &mut c,
        &format!(
            "INSERT INTO dept_emp VALUES ({leaver}, 'd006', identity_sync._today(), '9999-01-01')"
        ),
    );
    wait_idle(&mut c, 30);
    assert_eq!(
        remote_id(&mut c, "scim", leaver),
        lid,
        "same account id after the rehire"
    );
    assert_eq!(account_state(&mut c, "scim", leaver), "active");
    let (status, u) = scim.user(&lid);
    assert_eq!((status, &u["active"]), (200, &json!(true)), "rehired: {u}");
    assert_eq!(
        scim.users()
            .iter()
            .filter(|u| u["externalId"].as_str() == Some(leaver.to_string().as_str()))
            .count(),
        1,
        "a rehire creates no second account"
    );

    // Delete after delete_after: terminated yesterday → disabled now, deleted 30 days later.
    let did = remote_id(&mut c, "scim", deleted);
    exec(
        &mut c,
        "SELECT identity_sync.alter_target('scim', options => '{\"delete_after\": \"30 days\"}')",
    );
    exec(
        &mut c,
        &format!("UPDATE dept_emp SET to_date = identity_sync._today() - 1 WHERE emp_no = {deleted} AND to_date = '9999-01-01'"),
    );
    wait_idle(&mut c, 30);
    assert_eq!(account_state(&mut c, "scim", deleted), "disabled");
    assert_eq!(scim.user(&did).0, 200, "deleted too early");
    move_clock_until(
        &mut c,
        "31 days",
        ("scim", deleted, "deleted"),
        "not deleted after delete_after",
    );
    assert_eq!(scim.user(&did).0, 404, "the user is still on the server");
    wait_idle(&mut c, 30);
    // nothing else was touched: every other account is still there, once
    assert_eq!(scim.users().len(), expected.len() - 1);
    assert_all_done(&mut c, "scim");
}

/// Issue 6 acceptance: webhook signatures verify with the independent `standardwebhooks`
/// package, and per-person order holds across more than 1,000 events.
#[test]
fn webhook_signatures_and_order() {
    let (_cleanup, mut c) = fresh();
    let hook = WebhookReceiver::start();
    let secret = new_webhook_secret(&mut c);
    add_webhook_target(
        &mut c,
        "hook",
        &hook.url("/events"),
        r#"{"max_concurrency": 8}"#,
        "contract.dept_no = 'd001'",
        "{marketing}",
    );
    exec(&mut c, &format!("SELECT identity_sync.set_secret('hook', '{secret}'); SELECT identity_sync.resync('hook');"));
    wait_idle(&mut c, 60);
    let persons: Vec<i32> = c
        .query(
            "SELECT emp_no FROM dept_emp WHERE dept_no = 'd001' AND to_date = '9999-01-01' ORDER BY emp_no LIMIT 25",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Many changes to a few persons, each in its own transaction, while the worker delivers.
    // Changes not yet picked up collapse into one event, so go on until 1,000 updates exist.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0;
    loop {
        let n = count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE kind = 'update'",
        );
        if n >= 1000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} update events after {round} rounds"
        );
        for p in &persons {
            exec(
                &mut c,
                &format!("UPDATE employee SET last_name = 'L{round}-{p}' WHERE emp_no = {p}"),
            );
        }
        round += 1;
    }
    wait_idle(&mut c, 60);
    let got = hooks(&hook);
    let delivered = assert_all_delivered(&mut c, "hook", &got);
    let dup = check_order(&mut c, "hook", &got);
    println!("webhook: {delivered} events delivered in {round} rounds of changes, {} requests, {dup} duplicates", got.len());
    assert!(delivered >= 1000);
    assert_eq!(dup, 0, "a healthy receiver gets every event once");
    // the last delivered state is the last change
    for p in &persons {
        let last = got
            .iter()
            .rev()
            .find(|h| h.person == p.to_string())
            .unwrap();
        assert_eq!(
            last.body["attributes"]["last_name"],
            format!("L{}-{p}", round - 1)
        );
    }

    // Signatures, checked by the reference implementation; a tampered body must fail.
    let reqs = hook.requests();
    let mut signed: Vec<(Vec<(String, String)>, String)> = reqs
        .iter()
        .map(|r| (r.headers.clone(), r.body_str()))
        .collect();
    assert!(reqs.iter().all(|r| r
        .header("webhook-signature")
        .is_some_and(|s| s.starts_with("v1,"))));
    assert!(reqs
        .iter()
        .all(|r| r.header("idempotency-key") == r.header("webhook-id")));
    let mut tampered = signed[0].clone();
    tampered.1 = tampered.1.replacen("\"id\"", "\"id\" ", 1);
    signed.push(tampered);
    let (valid, invalid) = verify_with_standardwebhooks(&secret, &signed);
    println!("standardwebhooks: {valid} valid, {invalid} invalid (1 tampered on purpose)");
    assert_eq!((valid, invalid), (reqs.len(), 1));
}

/// Issue 6 acceptance: a table target — a local table and a postgres_fdw foreign table in a
/// second database — ends with exactly the rows the HR data says, through create, update,
/// disable (active column) and delete.
#[test]
fn table_targets_local_and_postgres_fdw() {
    let (_cleanup, mut c) = fresh();
    const DDL: &str =
        "CREATE TABLE app_users (emp_no int PRIMARY KEY, first_name text, last_name text,
                                               dept text, active boolean NOT NULL DEFAULT true)";
    let remote_db = "delivery_remote";
    let mut r = fresh_db(remote_db);
    exec(&mut r, DDL);
    exec(&mut c, DDL);
    let port = harness_env("PGPORT");
    exec(
        &mut c,
        &format!(
            "CREATE EXTENSION postgres_fdw;
             CREATE SERVER delivery_remote FOREIGN DATA WRAPPER postgres_fdw
                 OPTIONS (host '127.0.0.1', port '{port}', dbname '{remote_db}');
             CREATE USER MAPPING FOR postgres SERVER delivery_remote OPTIONS (user 'postgres');
             CREATE FOREIGN TABLE remote_users (emp_no int, first_name text, last_name text, dept text, active boolean)
                 SERVER delivery_remote OPTIONS (table_name 'app_users');"
        ),
    );
    for (name, rel) in [
        ("local", "public.app_users"),
        ("remote", "public.remote_users"),
    ] {
        exec(
            &mut c,
            &format!(
                "SELECT identity_sync.add_target('{name}', 'table', NULL,
                        '{{\"relation\": \"{rel}\", \"key_column\": \"emp_no\", \"active_column\": \"active\", \"delete_after\": \"30 days\"}}');
                 SELECT identity_sync.map('{name}', 'first_name', 'person.first_name');
                 SELECT identity_sync.map('{name}', 'last_name', 'person.last_name');
                 SELECT identity_sync.map('{name}', 'dept', 'contract.dept_no');
                 SELECT identity_sync.add_rule('{name}', 'scope', $$contract.dept_no IN ('d001', 'd006')$$);
                 SELECT identity_sync.resync('{name}');"
            ),
        );
    }
    wait_idle(&mut c, 60);
    let expected_sql = format!(
        "SELECT format('%s|%s|%s|%s|%s', e.emp_no, e.first_name, e.last_name, pc.dept_no,
                       EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = e.emp_no
                                  AND x.from_date <= identity_sync._today() AND identity_sync._today() <= x.to_date))
           FROM employee e JOIN {PRIMARY} pc USING (emp_no)
          WHERE pc.dept_no IN ('d001', 'd006')
            AND EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = e.emp_no
                           AND x.from_date <= identity_sync._today() AND identity_sync._today() <= x.to_date + 30)
          ORDER BY e.emp_no"
    );
    const ACTUAL: &str =
        "SELECT format('%s|%s|%s|%s|%s', emp_no, first_name, last_name, dept, active) FROM app_users ORDER BY emp_no";
    let check = |c: &mut Client, r: &mut Client, when: &str| {
        let expected = column::<String, Vec<_>>(c, &expected_sql);
        assert!(expected.len() > 30, "{when}: scope is a few dozen persons");
        assert_eq!(
            column::<String, Vec<_>>(c, ACTUAL),
            expected,
            "{when}: local table\n{}",
            undone(c, "local")
        );
        assert_eq!(
            column::<String, Vec<_>>(r, ACTUAL),
            expected,
            "{when}: table behind postgres_fdw\n{}",
            undone(c, "remote")
        );
        expected.len()
    };
    let n = check(&mut c, &mut r, "initial sync");
    println!("table targets: {n} rows after the initial sync");

    let people = d001_people(&mut c, 4);
    let (renamed, leaver, gone, mover) = (people[0], people[1], people[2], people[3]);
    exec(
        &mut c,
        &format!(
            "UPDATE employee SET last_name = 'Renamed' WHERE emp_no = {renamed};
             UPDATE dept_emp SET to_date = identity_sync._today() - 1 WHERE emp_no = {leaver} AND to_date = '9999-01-01';
             DELETE FROM employee WHERE emp_no = {gone};
             BEGIN;
             UPDATE dept_emp SET to_date = identity_sync._today() - 1 WHERE emp_no = {mover} AND dept_no = 'd001';
             INSERT INTO dept_emp VALUES ({mover}, 'd006', identity_sync._today(), '9999-01-01');
             COMMIT;"
        ),
    );
    wait_idle(&mut c, 60);
    let n = check(
        &mut c,
        &mut r,
        "after rename, termination, deletion and move",
    );
    for (db, rel) in [(&mut c, "app_users"), (&mut r, "app_users")] {
        let active: bool = db
            .query_one(
                &format!("SELECT active FROM {rel} WHERE emp_no = $1"),
                &[&leaver],
            )
            .expect("the leaver's row stays, disabled")
            .get(0);
        assert!(!active, "the leaver is disabled");
        assert_eq!(
            db.query(&format!("SELECT FROM {rel} WHERE emp_no = $1"), &[&gone])
                .unwrap()
                .len(),
            0,
            "the deleted person's row is gone"
        );
    }
    let kinds = column::<String, Vec<_>>(
        &mut c,
        "SELECT DISTINCT kind FROM identity_sync.events WHERE state = 'done' ORDER BY kind",
    );
    assert_eq!(kinds, ["create", "delete", "disable", "update"]);

    // The remote database is unreachable for a while: its events are retried, not failed, and
    // the local target is not held up meanwhile.
    exec(
        &mut c,
        "ALTER SERVER delivery_remote OPTIONS (SET dbname 'delivery_nowhere')",
    );
    exec(
        &mut c,
        &format!("UPDATE employee SET first_name = 'Retried' WHERE emp_no = {renamed}"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'remote' AND state = 'retry'
                AND last_error LIKE 'could not connect%'"
        ) == 1),
        "the unreachable remote table's event is not retrying:\n{}",
        undone(&mut c, "remote")
    );
    assert!(
        wait_until(Duration::from_secs(30), || one::<Option<String>>(
            &mut c,
            &format!("SELECT first_name FROM app_users WHERE emp_no = {renamed}")
        )
        .as_deref()
            == Some("Retried")),
        "the local table target is held up by the remote one"
    );
    exec(
        &mut c,
        "ALTER SERVER delivery_remote OPTIONS (SET dbname 'delivery_remote')",
    );
    wait_idle(&mut c, 30);
    check(&mut c, &mut r, "after the remote database was back");

    // The leaver's rows go 30 days after the last day.
    exec(
        &mut c,
        "SELECT identity_sync.set_clock(identity_sync._now() + interval '31 days')",
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            r.query("SELECT FROM app_users WHERE emp_no = $1", &[&leaver])
                .unwrap()
                .is_empty()
        }),
        "the leaver's remote row is not deleted after delete_after; the leaver's story:\n{}",
        one::<Option<String>>(
            &mut c,
            &format!(
                "SELECT concat_ws(E'\\n',
                        (SELECT string_agg(format('%s %s %s %s', at, step, target, detail), E'\\n' ORDER BY at)
                           FROM identity_sync.trace('{leaver}')),
                        (SELECT format('clock %s, boundaries checked on %s', clock, boundary_checked_on)
                           FROM identity_sync._settings))"
            )
        )
        .unwrap_or_default()
    );
    wait_idle(&mut c, 30);
    let m = check(&mut c, &mut r, "after delete_after");
    assert_eq!(m, n - 1);
    drop(r);
    exec(&mut c, "DROP EXTENSION postgres_fdw CASCADE");
    db().batch_execute(&format!("DROP DATABASE {remote_db} WITH (FORCE)"))
        .unwrap();
}

/// Issue 6 acceptance: `kill -9` of the worker in the middle of delivering 5,000 events. Every
/// event is delivered at least once, per-person order holds, and the duplicates are no more
/// than the events that were in flight.
#[test]
fn kill_9_during_delivery() {
    let _restore = EnsureWorker;
    let (_cleanup, mut c) = fresh();
    let hook = WebhookReceiver::start_with(|_| Response::ok().delay(Duration::from_millis(15)));
    // every person: a create and 4 grants = 5,000 events for the 1,000 persons (disable_after
    // of a century: the sample's leavers get accounts too)
    add_webhook_target(
        &mut c,
        "hook",
        &hook.url("/"),
        "{\"disable_after\": \"100 years\"}",
        "true",
        "{g1,g2,g3,g4}",
    );
    exec(&mut c, "SELECT identity_sync.resync('hook')");
    assert!(
        hook.wait_for(1500, Duration::from_secs(60)),
        "only {} requests arrived",
        hook.count()
    );
    let pid = worker_pid(&mut c).expect("worker runs");
    kill("KILL", pid);
    let killed_at = hook.count();
    drop(c);

    // The postmaster restarts every backend; the worker comes back and finishes.
    let mut c = reconnect_to_new_worker(pid);
    wait_idle(&mut c, 120);
    let total = count(&mut c, "SELECT count(*) FROM identity_sync.events");
    assert_eq!(total, 5000);
    let got = hooks(&hook);
    assert_all_delivered(&mut c, "hook", &got);
    let dup = check_order(&mut c, "hook", &got);
    // Events claimed twice: the ones in flight when the worker died (the receiver never fails).
    let in_flight = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.events WHERE attempts > 1",
    );
    let distinct: BTreeSet<i64> = got.iter().map(|h| h.id).collect();
    let mut per_event: HashMap<i64, usize> = HashMap::new();
    for h in &got {
        *per_event.entry(h.id).or_default() += 1;
    }
    let redelivered: Vec<i64> = per_event
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let again: BTreeSet<i64> = column::<String, Vec<_>>(
        &mut c,
        "SELECT id::text FROM identity_sync.events WHERE attempts > 1",
    )
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let logged = last_log_line("were in flight when the worker stopped");
    println!(
        "kill -9 after {killed_at} requests: {} requests for {} events, {dup} duplicates, {in_flight} events in flight at the kill\n  server log: {logged}",
        got.len(),
        distinct.len()
    );
    assert_eq!(got.len(), distinct.len() + dup);
    assert!(
        dup as i64 <= in_flight,
        "{dup} duplicates but only {in_flight} events were in flight"
    );
    assert!(
        redelivered.iter().all(|id| again.contains(id)),
        "an event that was not in flight was delivered twice"
    );
    assert!(
        redelivered.iter().all(|id| per_event[id] == 2),
        "an event was delivered more than twice"
    );
}

/// Issue 6 acceptance: a target answering with 500s, 429 + Retry-After, timeouts and dropped
/// connections gets every event eventually, in order per person, with exactly one request per
/// injected failure more than events; a healthy target is not held up meanwhile.
#[test]
fn flaky_target_retries_with_backoff() {
    let (_cleanup, mut c) = fresh();
    // Fault plan per event id: how the first attempts fail.
    fn plan(id: i64) -> &'static [&'static str] {
        match id % 8 {
            1 => &["500"],
            2 => &["429"],
            3 => &["timeout"],
            4 => &["drop"],
            5 => &["500", "429"],
            6 => &["drop", "timeout", "500"],
            _ => &[],
        }
    }
    let attempts: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let seen = attempts.clone();
    let faulty = WebhookReceiver::start_with(move |req| {
        let id: i64 = req
            .header("webhook-id")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let n = {
            let mut a = seen.lock().unwrap();
            let n = a.entry(id).or_default();
            *n += 1;
            *n
        };
        match plan(id).get(n - 1) {
            Some(&"500") => Response::status(500).body(r#"{"detail": "boom"}"#),
            Some(&"429") => Response::status(429).header("Retry-After", "1"),
            Some(&"timeout") => Response::ok().delay(Duration::from_millis(1200)),
            Some(&"drop") => Response::drop_connection(),
            _ => Response::ok(),
        }
    });
    let healthy = WebhookReceiver::start();
    add_webhook_target(
        &mut c,
        "faulty",
        &faulty.url("/"),
        r#"{"timeout": "500 ms", "max_concurrency": 4}"#,
        "contract.dept_no = 'd001'",
        "{marketing,everyone}",
    );
    add_webhook_target(
        &mut c,
        "healthy",
        &healthy.url("/"),
        "{}",
        "contract.dept_no = 'd001'",
        "{marketing,everyone}",
    );
    exec(
        &mut c,
        "SELECT identity_sync.resync('faulty'); SELECT identity_sync.resync('healthy');",
    );
    wait_idle(&mut c, 120);

    let got = hooks(&faulty);
    let n = assert_all_delivered(&mut c, "faulty", &got);
    check_order(&mut c, "faulty", &got);
    let healthy_got = hooks(&healthy);
    let hn = assert_all_delivered(&mut c, "healthy", &healthy_got);
    assert_eq!(check_order(&mut c, "healthy", &healthy_got), 0);
    assert_eq!(
        healthy_got.len(),
        hn,
        "the healthy target got each event once"
    );

    // Requests: one per event plus one per injected failure, never more.
    let mut per_event: BTreeMap<i64, Vec<&Hook>> = BTreeMap::new();
    for h in &got {
        per_event.entry(h.id).or_default().push(h);
    }
    let injected: usize = per_event.keys().map(|id| plan(*id).len()).sum();
    for (id, reqs) in &per_event {
        assert_eq!(
            reqs.len(),
            plan(*id).len() + 1,
            "event {id}: requests {:?}",
            plan(*id)
        );
    }
    assert_eq!(got.len(), n + injected);
    // Retry-After: 1 is honoured: the next attempt comes at least a second later.
    let reqs = faulty.requests();
    let mut honoured = 0;
    for (id, hs) in &per_event {
        for (i, kind) in plan(*id).iter().enumerate() {
            if *kind == "429" {
                let at = |h: &Hook| reqs.iter().find(|r| r.seq == h.arrival).unwrap().at;
                let gap = at(hs[i + 1]) - at(hs[i]);
                assert!(
                    gap >= Duration::from_secs(1),
                    "event {id}: retried {gap:?} after a 429 with Retry-After: 1"
                );
                honoured += 1;
            }
        }
    }
    let by_kind = |k: &str| {
        per_event
            .keys()
            .flat_map(|id| plan(*id))
            .filter(|x| **x == k)
            .count()
    };
    println!(
        "flaky target: {n} events, {} requests ({} × 500, {} × 429, {} timeouts, {} dropped connections); Retry-After honoured {honoured} times; healthy target: {hn} events in {} requests",
        got.len(),
        by_kind("500"),
        by_kind("429"),
        by_kind("timeout"),
        by_kind("drop"),
        healthy_got.len()
    );
    assert!(
        by_kind("500") > 0 && by_kind("429") > 0 && by_kind("timeout") > 0 && by_kind("drop") > 0
    );
    // The healthy target was not held up by the faulty one.
    let healthy_first: bool = c
        .query_one(
            "SELECT (SELECT max(done_at) FROM identity_sync.events WHERE target = 'healthy')
                  < (SELECT max(done_at) FROM identity_sync.events WHERE target = 'faulty')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        healthy_first,
        "the healthy target finished after the faulty one"
    );
}

/// Issue 6 acceptance: a person whose payload the target rejects (400) does not block other
/// persons; that person's later events wait; `retry` re-sends and `skip` lets the rest go.
#[test]
fn rejected_event_blocks_only_its_person() {
    let (_cleanup, mut c) = fresh();
    let reject: Arc<Mutex<String>> = Arc::new(Mutex::new("Rejected".into()));
    let bad = reject.clone();
    let hook = WebhookReceiver::start_with(move |req| {
        let body = req.json();
        if body["changed"]["last_name"] == *bad.lock().unwrap() {
            Response::status(400).body(r#"{"detail": "last_name is not acceptable"}"#)
        } else {
            Response::ok()
        }
    });
    add_d001_hook(&mut c, &hook, "{}");
    exec(&mut c, "SELECT identity_sync.resync('hook')");
    wait_idle(&mut c, 60);
    let people = d001_people(&mut c, 2);
    let (p, q) = (people[0], people[1]);
    let event_opt = |c: &mut Client, person: i32, name: &str| -> Option<(i64, String)> {
        c.query_opt(
            "SELECT id, state FROM identity_sync.events
              WHERE target = 'hook' AND person_key = $1::int::text AND payload->'changed'->>'last_name' = $2",
            &[&person, &name],
        )
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
    };
    let event = |c: &mut Client, person: i32, name: &str| -> (i64, String) {
        event_opt(c, person, name)
            .unwrap_or_else(|| panic!("no event setting {person}'s last_name to {name}"))
    };
    let state_of = |c: &mut Client, person: i32, name: &str| -> String {
        event_opt(c, person, name).map(|e| e.1).unwrap_or_default()
    };
    let requests_for = |id: i64| hooks(&hook).iter().filter(|h| h.id == id).count();

    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Rejected' WHERE emp_no = {p}"),
    );
    assert!(wait_until(Duration::from_secs(30), || {
        c.query_opt(
            "SELECT FROM identity_sync.events WHERE person_key = $1::int::text AND state = 'failed'",
            &[&p],
        )
        .unwrap()
        .is_some()
    }));
    let (u1, _) = event(&mut c, p, "Rejected");
    let (status, err): (Option<i32>, Option<String>) = {
        let r = c
            .query_one(
                "SELECT http_status, last_error FROM identity_sync.events WHERE id = $1",
                &[&u1],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status, Some(400));
    assert!(
        err.as_deref()
            .unwrap_or("")
            .contains("last_name is not acceptable"),
        "{err:?}"
    );

    // The person's next event waits; another person's goes through.
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Later' WHERE emp_no = {p}"),
    );
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Other' WHERE emp_no = {q}"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || state_of(&mut c, q, "Other")
            == "done"),
        "another person is blocked:\n{}",
        undone(&mut c, "hook")
    );
    let (u2, state) = event(&mut c, p, "Later");
    assert_eq!(
        state, "pending",
        "the later event of the rejected person must wait"
    );
    assert_eq!(requests_for(u2), 0);
    let status: String = one::<Option<String>>(
        &mut c,
        "SELECT state FROM identity_sync.status WHERE target = 'hook'",
    )
    .unwrap();
    assert_eq!(status, "failing");

    // retry(event): sent again, rejected again.
    let n: i32 = c
        .query_one("SELECT identity_sync.retry($1)", &[&u1.to_string()])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert!(wait_until(Duration::from_secs(30), || requests_for(u1)
        == 2
        && state_of(&mut c, p, "Rejected") == "failed"));
    assert_eq!(event(&mut c, p, "Later").1, "pending");

    // skip(event): the later event goes out.
    exec(&mut c, &format!("SELECT identity_sync.skip({u1})"));
    wait_idle(&mut c, 30);
    assert_eq!(event(&mut c, p, "Later").1, "done");
    assert_eq!(requests_for(u2), 1);

    // retry(target) after the target was fixed: delivered.
    *reject.lock().unwrap() = "Again".into();
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Again' WHERE emp_no = {p}"),
    );
    assert!(wait_until(Duration::from_secs(30), || state_of(
        &mut c, p, "Again"
    ) == "failed"));
    let (u3, _) = event(&mut c, p, "Again");
    *reject.lock().unwrap() = "nothing".into();
    let n: i32 = c
        .query_one("SELECT identity_sync.retry('hook')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    wait_idle(&mut c, 30);
    assert_eq!(event(&mut c, p, "Again").1, "done");
    assert_eq!(requests_for(u3), 2);
    let got = hooks(&hook);
    check_order(&mut c, "hook", &got);
    let states =
        column::<String, Vec<_>>(&mut c, "SELECT DISTINCT state FROM identity_sync.events");
    assert_eq!(states, ["done"]);
}

/// SIGTERM stops the worker within a second even with requests in flight; what was in flight
/// is delivered after the restart.
#[test]
fn sigterm_stops_worker_promptly_with_requests_in_flight() {
    let _restore = EnsureWorker;
    let (_cleanup, mut c) = fresh();
    let slow = Arc::new(AtomicBool::new(true));
    let s = slow.clone();
    let hook = WebhookReceiver::start_with(move |_| {
        if s.load(Ordering::SeqCst) {
            Response::ok().delay(Duration::from_secs(5))
        } else {
            Response::ok()
        }
    });
    add_d001_hook(&mut c, &hook, r#"{"max_concurrency": 4}"#);
    exec(&mut c, "SELECT identity_sync.resync('hook')");
    assert!(
        hook.wait_for(4, Duration::from_secs(30)),
        "no requests in flight"
    );
    let pid = worker_pid(&mut c).expect("worker runs");
    let t0 = Instant::now();
    let ok: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(ok);
    let gone = wait_until(Duration::from_secs(10), || {
        c.query_opt("SELECT FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap()
            .is_none()
    });
    let took = t0.elapsed();
    println!(
        "SIGTERM with {} requests in flight: worker {pid} gone after {took:?}",
        hook.count()
    );
    assert!(gone, "the worker did not stop");
    assert!(
        took < Duration::from_secs(1),
        "the worker took {took:?} to stop"
    );
    slow.store(false, Ordering::SeqCst);
    let mut c = reconnect_to_new_worker(pid);
    wait_idle(&mut c, 60);
    let got = hooks(&hook);
    assert_all_delivered(&mut c, "hook", &got);
    check_order(&mut c, "hook", &got);
}
