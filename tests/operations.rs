//! End-to-end tests of operations (issue 14, items 2 to 5), against the harness cluster's
//! worker: DDL on the extension while the worker is busy, traces that name the HR change behind
//! each event and every delivery attempt, metrics read back through the real
//! `prometheus-postgres-exporter`, and `pg_ctl stop -m immediate` during delivery.
//!
//! Every test builds its own state in database `postgres` (the worker's) with [`fresh`].
//! Run by `scripts/test` (e2e layer, `--test-threads=1`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fresh state in the worker's database: the small employees sample, its sources registered;
/// the extension is dropped again when the guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(&mut c, "small", "DROP TABLE IF EXISTS public.ops_accounts;");
    (cleanup, c)
}

/// A webhook target `name` over `url` for every person (`disable_after` of a century: the
/// sample's leavers get accounts too), with `groups` granted to everybody.
fn add_hook(c: &mut Client, name: &str, url: &str, options: &str, groups: &str) {
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('{name}', 'webhook', '{url}', '{options}');
             SELECT identity_sync.alter_target('{name}', options => '{{\"disable_after\": \"100 years\"}}');
             SELECT identity_sync.map('{name}', 'first_name', 'person.first_name');
             SELECT identity_sync.map('{name}', 'last_name', 'person.last_name');
             SELECT identity_sync.add_rule('{name}', 'everybody', 'true', '{groups}');"
        ),
    );
}

// ------------------------------------------------------------------------------------------
// Item 2: DDL on the extension while the worker is busy
// ------------------------------------------------------------------------------------------

/// Commit `hr_change`, wait until the worker delivers what it planned for it to `hook`, and
/// run `ddl` then, on its first try.
fn after_hr_change_while_busy(
    c: &mut Client,
    hr_change: &str,
    ddl: &str,
    round: usize,
) -> Duration {
    let since = last_event(c);
    exec(c, hr_change);
    wait_busy(c, "hook", since);
    first_try(c, ddl, round)
}

/// Update scripts between the installed version and a test version `<v>-ddltest`, written into
/// PostgreSQL's extension directory for the test and removed when dropped. The update ALTERs
/// the tables the worker writes in the order that used to deadlock with it (events, then
/// accounts, then targets) and replaces a function the worker calls.
struct TestUpdatePath {
    files: Vec<std::path::PathBuf>,
    version: String,
    test_version: String,
}

impl TestUpdatePath {
    fn install(c: &mut Client) -> TestUpdatePath {
        let version: String = one(
            c,
            "SELECT extversion FROM pg_extension WHERE extname = 'identity_sync'",
        );
        let sharedir = Command::new("pg_config")
            .arg("--sharedir")
            .output()
            .expect("pg_config --sharedir");
        let dir = std::path::PathBuf::from(String::from_utf8_lossy(&sharedir.stdout).trim())
            .join("extension");
        let test_version = format!("{version}-ddltest");
        let up = dir.join(format!("identity_sync--{version}--{test_version}.sql"));
        let down = dir.join(format!("identity_sync--{test_version}--{version}.sql"));
        let replace = "CREATE OR REPLACE FUNCTION identity_sync._next_due_ms() RETURNS bigint
             LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $f$
             BEGIN RETURN 0; END $f$;";
        std::fs::write(
            &up,
            format!(
                "ALTER TABLE identity_sync.event ADD COLUMN ddltest int;
                 ALTER TABLE identity_sync.account ADD COLUMN ddltest int;
                 ALTER TABLE identity_sync.target ADD COLUMN ddltest int;
                 {replace}\n"
            ),
        )
        .expect("write the test update script (the tests run as root)");
        std::fs::write(
            &down,
            "ALTER TABLE identity_sync.event DROP COLUMN ddltest;
             ALTER TABLE identity_sync.account DROP COLUMN ddltest;
             ALTER TABLE identity_sync.target DROP COLUMN ddltest;\n",
        )
        .expect("write the test update script");
        TestUpdatePath {
            files: vec![up, down],
            version,
            test_version,
        }
    }
}

impl Drop for TestUpdatePath {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Wait until the worker is in the middle of delivering `target`: some of its events done,
/// others still to go (and, with `since`, done after that event id).
fn wait_busy(c: &mut Client, target: &str, since: i64) {
    let mut state = (0, 0);
    let busy = wait_until(Duration::from_secs(60), || {
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'done' AND id > $2),
                        count(*) FILTER (WHERE state <> 'done')
                   FROM identity_sync.events WHERE target = $1",
                &[&target, &since],
            )
            .unwrap();
        state = (row.get::<_, i64>(0), row.get::<_, i64>(1));
        state.0 >= 10 && state.1 > 0
    });
    assert!(
        busy,
        "the worker is not in the middle of delivering {target}: (done, undone) = {state:?}"
    );
}

/// The highest event id so far.
fn last_event(c: &mut Client) -> i64 {
    one(c, "SELECT coalesce(max(id), 0) FROM identity_sync.event")
}

/// Run `sql` once; it must succeed on its first try (no deadlock, no retry).
fn first_try(c: &mut Client, sql: &str, round: usize) -> Duration {
    let started = Instant::now();
    if let Err(e) = c.batch_execute(sql) {
        panic!(
            "round {round}: {sql} failed while the worker was busy: {}",
            describe(&e)
        );
    }
    started.elapsed()
}

/// Issue 14 item 2: `drop_target`, `ALTER EXTENSION … UPDATE` (there and back) and `DROP
/// EXTENSION` succeed on the first try while the worker plans and delivers, five rounds each.
/// A table target beside the webhook keeps the worker's table-delivery transactions busy too.
#[test]
fn extension_ddl_succeeds_first_try_while_worker_is_busy() {
    let _restore = EnsureWorker;
    let receiver = WebhookReceiver::start_with(|_| Response::ok().delay(Duration::from_millis(5)));
    let mut took = Vec::new();
    for round in 1..=5 {
        let (_cleanup, mut c) = fresh();
        exec(
            &mut c,
            "CREATE TABLE public.ops_accounts (emp_no text PRIMARY KEY, first_name text, last_name text, active boolean);",
        );
        add_hook(&mut c, "hook", &receiver.url("/"), "{}", "{g1,g2,g3}");
        add_hook(&mut c, "spare", &receiver.url("/spare"), "{}", "{s1,s2}");
        exec(
            &mut c,
            "SELECT identity_sync.add_target('tbl', 'table', NULL,
                 '{\"relation\": \"public.ops_accounts\", \"key_column\": \"emp_no\", \"active_column\": \"active\"}');
             SELECT identity_sync.map('tbl', 'first_name', 'person.first_name');
             SELECT identity_sync.map('tbl', 'last_name', 'person.last_name');
             SELECT identity_sync.add_rule('tbl', 'everybody', 'true');
             SELECT identity_sync.resync('hook'); SELECT identity_sync.resync('spare');
             SELECT identity_sync.resync('tbl');",
        );

        wait_busy(&mut c, "spare", 0);
        took.push(first_try(
            &mut c,
            "SELECT identity_sync.drop_target('spare')",
            round,
        ));
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM identity_sync.target WHERE name = 'spare'"
            ),
            0
        );

        wait_busy(&mut c, "hook", 0);
        let path = TestUpdatePath::install(&mut c);
        took.push(first_try(
            &mut c,
            &format!(
                "ALTER EXTENSION identity_sync UPDATE TO '{}'",
                path.test_version
            ),
            round,
        ));
        // still busy: more HR changes while the worker works under the new version
        took.push(after_hr_change_while_busy(
            &mut c,
            "UPDATE employee SET last_name = last_name || '-' WHERE emp_no % 3 = 0",
            &format!("ALTER EXTENSION identity_sync UPDATE TO '{}'", path.version),
            round,
        ));
        drop(path);
        took.push(after_hr_change_while_busy(
            &mut c,
            "UPDATE employee SET last_name = last_name || '+' WHERE emp_no % 3 = 1",
            "DROP EXTENSION identity_sync CASCADE",
            round,
        ));
        // the worker is still there, and serves the extension created anew
        assert!(
            worker_pid(&mut c).is_some(),
            "round {round}: the worker is gone"
        );
    }
    // and after all that the worker delivers as before
    let (_cleanup, mut c) = fresh();
    add_hook(&mut c, "hook", &receiver.url("/after"), "{}", "{}");
    exec(&mut c, "SELECT identity_sync.resync('hook')");
    wait_idle(&mut c, 120);
    assert_eq!(undone(&mut c, "hook"), "");
    let deadlocks = server_log().matches("deadlock detected").count();
    println!(
        "20 DDL statements while busy, each on its first try, longest wait {:?}; {deadlocks} deadlocks in the server log",
        took.iter().max()
    );
    assert_eq!(deadlocks, 0, "the server log reports a deadlock");
}

// ------------------------------------------------------------------------------------------
// Item 3: traces keep their cause
// ------------------------------------------------------------------------------------------

/// The rows of `trace(person)` as (step, target, detail).
fn trace(c: &mut Client, person: &str) -> Vec<(String, Option<String>, Value)> {
    c.query(
        "SELECT step, target, detail::text FROM identity_sync.trace($1)",
        &[&person],
    )
    .unwrap()
    .iter()
    .map(|r| {
        let detail: String = r.get(2);
        (
            r.get(0),
            r.get(1),
            serde_json::from_str(&detail).expect("trace detail is JSON"),
        )
    })
    .collect()
}

fn show(rows: &[(String, Option<String>, Value)]) -> String {
    rows.iter()
        .map(|(s, t, d)| format!("{s} {} {d}", t.as_deref().unwrap_or("-")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Issue 14 item 3: `trace(person)` reads HR change (source, operation, transaction, commit
/// time) → plan → events → every attempt with its outcome, end to end against `scim2-server`
/// and a webhook receiver that answers 503 to the first request for the person's update (a
/// retried event). The outbox row is gone once planned; its cause is not.
#[test]
fn trace_reads_hr_change_plan_events_and_every_attempt() {
    let (_cleanup, mut c) = fresh();
    let scim = ScimServer::start();
    let person = "10005";
    let failed_once = Arc::new(AtomicBool::new(false));
    let f = failed_once.clone();
    let hook = WebhookReceiver::start_with(move |r| {
        let body = r.json();
        if body["person_key"] == person
            && body["type"] == "update"
            && !f.swap(true, Ordering::SeqCst)
        {
            Response::status(503).body("{\"error\": \"try later\"}")
        } else {
            Response::ok()
        }
    });
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('dir', 'scim', '{}', '{{\"auth\": \"bearer\"}}');
             SELECT identity_sync.set_secret('dir', '{}');
             SELECT identity_sync.map('dir', 'userName', $$'u' || person.emp_no$$, on_create_only => true);
             SELECT identity_sync.map('dir', 'externalId', 'person.emp_no::text');
             SELECT identity_sync.map('dir', 'name.familyName', 'person.last_name');
             SELECT identity_sync.add_rule('dir', 'one', 'person.emp_no = {person}');",
            scim.base_url(),
            scim.token()
        ),
    );
    add_hook(&mut c, "hook", &hook.url("/"), "{}", "{}");
    exec(
        &mut c,
        "SELECT identity_sync.resync('dir'); SELECT identity_sync.resync('hook');",
    );
    wait_idle(&mut c, 120);

    // The HR change, in a transaction whose id and commit time we know.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "UPDATE employee SET last_name = 'Traced' WHERE emp_no = {person}"
    ))
    .unwrap();
    let xid: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .unwrap()
        .get(0);
    let before: f64 = tx
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let after: f64 = one(
        &mut c,
        "SELECT extract(epoch FROM clock_timestamp())::float8",
    );
    wait_idle(&mut c, 120);
    assert!(
        failed_once.load(Ordering::SeqCst),
        "the webhook never refused"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.change"),
        0,
        "the outbox is drained once planned"
    );

    let rows = trace(&mut c, person);
    let story = show(&rows);
    println!("trace('{person}'):\n{story}");

    // HR change: what, when, which transaction.
    let hr: Vec<&Value> = rows
        .iter()
        .filter(|(s, _, d)| s == "cause" && d["kind"] == "hr change" && d["xid"] == xid.as_str())
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(hr.len(), 1, "one cause names transaction {xid}:\n{story}");
    let cause = hr[0];
    assert_eq!(cause["source"], "public.employee", "{story}");
    assert_eq!(cause["op"], "update", "{story}");
    let committed: f64 = one_with(
        &mut c,
        "SELECT extract(epoch FROM $1::text::timestamptz)::float8",
        &[&cause["committed_at"]
            .as_str()
            .expect("the commit time is known")
            .to_string()],
    );
    assert!(
        committed >= before && committed <= after,
        "committed at {committed}, between {before} and {after}"
    );
    let plan_id = cause["plan_id"].as_i64().expect("the cause names its plan");
    assert!(
        rows.iter()
            .any(|(s, _, d)| s == "plan" && d["plan_id"] == plan_id),
        "the plan {plan_id} is in the story:\n{story}"
    );

    // Its events, one per target, each from that plan.
    for target in ["dir", "hook"] {
        let events: Vec<&Value> = rows
            .iter()
            .filter(|(s, t, d)| {
                s == "event update" && t.as_deref() == Some(target) && d["plan_id"] == plan_id
            })
            .map(|(_, _, d)| d)
            .collect();
        assert_eq!(
            events.len(),
            1,
            "one update of {target} from plan {plan_id}:\n{story}"
        );
        let id = events[0]["id"].as_i64().unwrap();
        let attempts: Vec<&Value> = rows
            .iter()
            .filter(|(s, _, d)| s == "attempt update" && d["id"] == id)
            .map(|(_, _, d)| d)
            .collect();
        let outcomes: Vec<(String, Option<i64>)> = attempts
            .iter()
            .map(|d| {
                (
                    d["outcome"].as_str().unwrap_or("").to_string(),
                    d["http_status"].as_i64(),
                )
            })
            .collect();
        if target == "hook" {
            assert_eq!(
                outcomes,
                vec![
                    ("retry".to_string(), Some(503)),
                    ("done".to_string(), Some(200))
                ],
                "the retried event's attempts:\n{story}"
            );
            assert_eq!(
                attempts[0]["error"].as_str().map(|e| e.contains("503")),
                Some(true),
                "{story}"
            );
        } else {
            assert_eq!(outcomes.len(), 1, "{story}");
            assert_eq!(outcomes[0].0, "done", "{story}");
            assert!(matches!(outcomes[0].1, Some(200) | Some(204)), "{story}");
        }
        for a in attempts {
            assert!(
                a["latency"].is_string(),
                "every attempt has its latency:\n{story}"
            );
        }
    }
    // The initial accounts came from the resyncs.
    assert!(
        rows.iter()
            .any(|(s, t, d)| s == "cause" && d["kind"] == "resync" && t.as_deref() == Some("dir")),
        "the create's cause is the resync of dir:\n{story}"
    );
    // A date boundary: a contract that starts tomorrow plans the person again when the day
    // comes, without any DML then (the worker's boundary check; set_clock moves the day).
    exec(
        &mut c,
        &format!("INSERT INTO dept_emp VALUES ({person}, 'd001', identity_sync._today() + 1, '9999-01-01')"),
    );
    wait_idle(&mut c, 60);
    exec(
        &mut c,
        "SELECT identity_sync.set_clock(identity_sync._now() + interval '1 day')",
    );
    let boundary = wait_until(Duration::from_secs(30), || {
        trace(&mut c, person).iter().any(|(s, _, d)| {
            s == "cause"
                && d["kind"] == "date boundary"
                && d["op"] == "boundary"
                && d["plan_id"].is_i64()
        })
    });
    exec(&mut c, "SELECT identity_sync.set_clock(NULL)");
    assert!(
        boundary,
        "no date boundary among the causes:\n{}",
        show(&trace(&mut c, person))
    );
    // The attempts history as readers see it.
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM identity_sync.attempts WHERE person_key = '{person}' AND target = 'hook' AND outcome = 'retry' AND http_status = 503")
        ),
        1
    );
}

// ------------------------------------------------------------------------------------------
// Item 4: metrics through prometheus-postgres-exporter
// ------------------------------------------------------------------------------------------

/// Samples of a scrape: (metric name, labels) → value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// The Debian package's exporter, running against the harness cluster on a loopback port;
/// killed on drop.
struct Exporter {
    child: Child,
    port: u16,
}

impl Exporter {
    fn start(user: &str) -> Exporter {
        let port = free_port();
        let dsn = format!(
            "postgresql://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            harness_env("PGPORT")
        );
        let child = Command::new("prometheus-postgres-exporter")
            .env("DATA_SOURCE_NAME", dsn)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--extend.query-path={}",
                repo_dir()
                    .join("monitoring/postgres_exporter.yaml")
                    .display()
            ))
            .arg("--disable-default-metrics")
            .arg("--disable-settings-metrics")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run prometheus-postgres-exporter (scripts/setup installs it)");
        Exporter { child, port }
    }

    /// The samples of one scrape whose name starts with `identity_sync_`: (name, labels) → value.
    fn scrape(&self) -> Option<Samples> {
        let (status, body) = http_request(
            "GET",
            &format!("http://127.0.0.1:{}/metrics", self.port),
            &[],
            None,
        )
        .ok()?;
        if status != 200 {
            return None;
        }
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.starts_with("identity_sync_")) {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels: BTreeMap<String, String> = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| kv.split_once('='))
                // (the exporter adds the label server to every sample of a query file)
                .filter(|(k, _)| *k != "server")
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            out.insert((name.to_string(), labels), value.parse().ok()?);
        }
        Some(out)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Issue 14 item 4: `identity_sync.metrics` through the real prometheus-postgres-exporter with
/// `monitoring/postgres_exporter.yaml`, connected as a role that has nothing but `pg_monitor`:
/// worker up, events by target and state (a failed event), a held target, delivery counters,
/// last success and latency quantiles, read back over HTTP on 127.0.0.1.
#[test]
fn metrics_reach_prometheus_through_postgres_exporter() {
    let (_cleanup, mut c) = fresh();
    let refuse = "10010";
    let hook = WebhookReceiver::start_with(move |r| {
        if r.json()["person_key"] == refuse {
            Response::status(400).body("{\"error\": \"no such cost centre\"}")
        } else {
            Response::ok()
        }
    });
    add_hook(&mut c, "hook", &hook.url("/"), "{}", "{}");
    add_hook(
        &mut c,
        "guarded",
        &hook.url("/guarded"),
        "{\"max_creates\": 10}",
        "{}",
    );
    exec(
        &mut c,
        "SELECT identity_sync.resync('hook'); SELECT identity_sync.resync('guarded');
         DROP ROLE IF EXISTS ops_monitor; CREATE ROLE ops_monitor LOGIN IN ROLE pg_monitor;",
    );
    wait_idle(&mut c, 120);
    let done = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.events WHERE target = 'hook' AND state = 'done'",
    );
    // pg_monitor reads the view
    exec(&mut c, "SET ROLE pg_monitor");
    let seen = count(&mut c, "SELECT count(*) FROM identity_sync.metrics");
    exec(&mut c, "RESET ROLE");
    assert!(seen > 0);

    let exporter = Exporter::start("ops_monitor");
    let mut samples = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            samples = exporter.scrape().filter(|s| !s.is_empty());
            samples.is_some()
        }),
        "no identity_sync samples from the exporter on port {}",
        exporter.port
    );
    let s = samples.unwrap();
    let get = |name: &str, l: &[(&str, &str)]| {
        *s.get(&(name.to_string(), labels(l)))
            .unwrap_or_else(|| panic!("no sample {name} {l:?} in {s:#?}"))
    };
    println!(
        "{} identity_sync samples, e.g. delivered {}",
        s.len(),
        get(
            "identity_sync_target_delivered_total",
            &[("target", "hook")]
        )
    );
    assert_eq!(get("identity_sync_worker_up", &[]), 1.0);
    assert_eq!(
        get(
            "identity_sync_queue_events",
            &[("target", "hook"), ("state", "failed")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "identity_sync_queue_events",
            &[("target", "hook"), ("state", "pending")]
        ),
        0.0
    );
    assert_eq!(
        get("identity_sync_target_held", &[("target", "guarded")]),
        1.0
    );
    assert_eq!(get("identity_sync_target_held", &[("target", "hook")]), 0.0);
    assert!(
        get(
            "identity_sync_queue_events",
            &[("target", "guarded"), ("state", "held")]
        ) > 10.0
    );
    assert_eq!(
        get(
            "identity_sync_target_delivered_total",
            &[("target", "hook")]
        ),
        done as f64
    );
    assert_eq!(
        get(
            "identity_sync_target_failed_attempts_total",
            &[("target", "hook")]
        ),
        1.0
    );
    assert_eq!(
        get("identity_sync_target_quarantined", &[("target", "hook")]),
        0.0
    );
    assert!(
        get(
            "identity_sync_target_oldest_pending_seconds",
            &[("target", "hook")]
        ) > 0.0
    );
    let now: f64 = one(&mut c, "SELECT extract(epoch FROM now())::float8");
    let last = get(
        "identity_sync_target_last_success_timestamp_seconds",
        &[("target", "hook")],
    );
    assert!(
        last > now - 300.0 && last <= now,
        "last success {last}, now {now}"
    );
    let p50 = get(
        "identity_sync_delivery_latency_seconds",
        &[("target", "hook"), ("quantile", "0.5")],
    );
    let p99 = get(
        "identity_sync_delivery_latency_seconds",
        &[("target", "hook"), ("quantile", "0.99")],
    );
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50}, p99 {p99}");
    assert_eq!(get("identity_sync_planner_dirty_persons", &[]), 0.0);

    // released, the target is no longer held
    exec(&mut c, "SELECT identity_sync.release('guarded')");
    wait_idle(&mut c, 120);
    let after = exporter.scrape().expect("a second scrape");
    assert_eq!(
        after[&(
            "identity_sync_target_held".to_string(),
            labels(&[("target", "guarded")])
        )],
        0.0
    );
    drop(exporter);
    exec(&mut c, "DROP ROLE ops_monitor");
}

// ------------------------------------------------------------------------------------------
// Item 5: immediate shutdown during delivery
// ------------------------------------------------------------------------------------------

/// Issue 14 item 5: `pg_ctl stop -m immediate` (`scripts/cluster restart --immediate`) while
/// 20,000 events are being delivered, then start: every event is delivered, each person's in
/// order, and an event arrives twice only if it was in flight at the crash (its attempt is in
/// the history as interrupted), and then twice at most.
#[test]
fn immediate_shutdown_during_delivery_loses_nothing() {
    let _restore = EnsureWorker;
    let (_cleanup, mut c) = fresh();
    let hook = WebhookReceiver::start_with(|_| Response::ok().delay(Duration::from_millis(2)));
    // a create and 19 grants for each of the 1,000 persons
    let groups = (1..=19)
        .map(|g| format!("g{g}"))
        .collect::<Vec<_>>()
        .join(",");
    add_hook(
        &mut c,
        "hook",
        &hook.url("/"),
        "{}",
        &format!("{{{groups}}}"),
    );
    exec(&mut c, "SELECT identity_sync.resync('hook')");
    assert!(
        wait_until(Duration::from_secs(120), || hook.count() >= 4000),
        "only {} requests arrived",
        hook.count()
    );
    let pid = worker_pid(&mut c).expect("worker runs");
    drop(c);
    let crashed_at = hook.count();
    let st = Command::new("bash")
        .arg(scripts_dir().join("cluster"))
        .args(["restart", &harness_env("IDSYNC_CLUSTER"), "--immediate"])
        .status()
        .expect("run scripts/cluster restart --immediate");
    assert!(st.success(), "scripts/cluster restart --immediate failed");

    let mut c = reconnect_to_new_worker(pid);
    wait_idle(&mut c, 300);
    let total = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.events WHERE target = 'hook'",
    );
    assert_eq!(total, 20_000);
    assert_eq!(undone(&mut c, "hook"), "");

    // every event arrived; per person in seq order; repeats only of events in flight
    let seqs: HashMap<i64, (String, i64)> = c
        .query(
            "SELECT id, person_key, seq FROM identity_sync.events WHERE target = 'hook'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let interrupted: BTreeSet<i64> = c
        .query(
            "SELECT DISTINCT event_id FROM identity_sync.attempts WHERE target = 'hook' AND outcome = 'interrupted'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut got: Vec<(usize, i64)> = hook
        .requests()
        .iter()
        .map(|r| (r.seq, r.json()["id"].as_i64().expect("numeric event id")))
        .collect();
    got.sort();
    let mut per_event: HashMap<i64, usize> = HashMap::new();
    let mut last: HashMap<&str, (i64, i64)> = HashMap::new();
    for (_, id) in &got {
        *per_event.entry(*id).or_default() += 1;
        let (person, seq) = seqs
            .get(id)
            .unwrap_or_else(|| panic!("received event {id} that does not exist"));
        if let Some((prev_id, prev_seq)) = last.get(person.as_str()) {
            assert!(
                seq > prev_seq || (seq == prev_seq && prev_id == id),
                "person {person}: event {id} (seq {seq}) arrived after event {prev_id} (seq {prev_seq})"
            );
        }
        last.insert(person, (*id, *seq));
    }
    let missing = seqs.keys().filter(|id| !per_event.contains_key(id)).count();
    let repeated: Vec<i64> = per_event
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let logged = last_log_line("were in flight when the worker stopped");
    println!(
        "immediate shutdown after {crashed_at} requests: {} requests for {} events, {} repeated, {} in flight at the crash\n  server log: {logged}",
        got.len(),
        per_event.len(),
        repeated.len(),
        interrupted.len()
    );
    assert_eq!(missing, 0, "{missing} events never arrived");
    assert!(
        repeated.iter().all(|id| interrupted.contains(id)),
        "an event that was not in flight at the crash arrived twice"
    );
    assert!(
        repeated.iter().all(|id| per_event[id] == 2),
        "an event arrived more than twice"
    );
}

// ------------------------------------------------------------------------------------------
// The worker's writes in the cumulative statistics
// ------------------------------------------------------------------------------------------

/// The worker reports what its transactions wrote, as a client backend does, so autovacuum and
/// autoanalyze see the queue and the registry change: after a sync, `pg_stat_user_tables`
/// counts the events the worker inserted and the updates that delivered them. (Without the
/// report both stayed at 0 however much the worker wrote, and the queue's dead rows were never
/// vacuumed.)
#[test]
fn worker_writes_reach_the_statistics() {
    let (_cleanup, mut c) = fresh();
    let receiver = WebhookReceiver::start();
    add_hook(&mut c, "hook", &receiver.url("/stats"), "{}", "{}");
    exec(&mut c, "SELECT identity_sync.resync('hook')");
    wait_idle(&mut c, 120);
    assert_eq!(undone(&mut c, "hook"), "");
    let events = count(&mut c, "SELECT count(*) FROM identity_sync.event");
    assert!(
        events > 100,
        "the sample gives hundreds of accounts, got {events}"
    );
    let stats =
        "SELECT n_tup_ins || ' inserted, ' || n_tup_upd || ' updated, ' || n_live_tup || ' live'
                   FROM pg_stat_user_tables WHERE relid = 'identity_sync.event'::regclass";
    // every event was inserted by the worker's planner, then updated twice (sending, done)
    assert!(
        wait_until(Duration::from_secs(15), || {
            count(
            &mut c,
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'identity_sync.event'::regclass"
        ) >= events
            && count(
                &mut c,
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'identity_sync.event'::regclass"
            ) >= 2 * events
        }),
        "{events} events, but the statistics say: {}",
        one::<Option<String>>(&mut c, stats).unwrap_or_default()
    );
    assert!(
        count(
            &mut c,
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'identity_sync.account'::regclass"
        ) >= events,
        "the registry's rows are not counted"
    );
}
