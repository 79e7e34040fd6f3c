//! Upgrades (issue 14 item 1): the previous release, named by its commit in `tests/upgrade/from`,
//! is built from this repository's history and installed; it provisions real state (sources,
//! two targets with mappings and rules, accounts, pending and failed events, a target held by a
//! threshold, a self-service request); then this build is installed, PostgreSQL restarted and
//! `ALTER EXTENSION identity_sync UPDATE` run on the running cluster, as README "Upgrading"
//! says. Every row must still be there, the worker must go on where the previous release left
//! off and deliver every pending event (none lost, each person's in order), and the catalog of
//! the updated extension must be the one a fresh `CREATE EXTENSION` makes
//! (`tests/upgrade/catalog.sql`).
//!
//! Both releases are installed into a PostgreSQL installation of the test's own
//! (`scripts/private-pg`, under /var/tmp), never into PostgreSQL's directories: the other tests
//! keep this build whatever happens here, and the test needs neither the harness cluster nor
//! the `install` layer. It runs in a cluster of its own (`scripts/cluster start upgrade
//! --bindir …`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Long enough for a slow CI machine; the waits end as soon as the outcome is there.
const PATIENCE: Duration = Duration::from_secs(90);

/// Where the test builds and installs (removed at its end).
const WORK: &str = "/var/tmp/identity_sync-upgrade-build";

/// The `pg_config` of the PostgreSQL the extension is built for (as in scripts/test).
const PG_CONFIG: &str = "/usr/bin/pg_config";

/// The sample's department d001 (self-service): 10039 heads it, 10017 works in it.
const REQUESTER: &str = "10017";
const MANAGER: &str = "10039";

const HEAD_OF_DEPARTMENT: &str = "EXISTS (SELECT FROM dept_manager m \
     WHERE m.emp_no = owner.emp_no AND m.dept_no = requester_contract.dept_no \
       AND today BETWEEN m.from_date AND m.to_date)";

/// The previous release: its commit and version, from `tests/upgrade/from`.
fn previous_release() -> (String, String) {
    let path = repo_dir().join("tests/upgrade/from");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_else(|| panic!("{} names no commit", path.display()));
    let mut words = line.split_whitespace();
    let commit = words.next().unwrap_or_default().to_string();
    let version = words.next().unwrap_or_default().to_string();
    assert!(
        commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{}: {commit:?} is not a full commit hash",
        path.display()
    );
    assert!(
        !version.is_empty(),
        "{}: no version after the commit",
        path.display()
    );
    (commit, version)
}

/// The work directory, removed (with the private installation) when the test ends, also when
/// it fails.
struct Work(PathBuf);

impl Work {
    fn new() -> Work {
        let dir = PathBuf::from(WORK);
        remove_private_pg(&dir.join("pg"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the work directory");
        Work(dir)
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        remove_private_pg(&self.0.join("pg"));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn private_pg(args: &[&str]) -> String {
    let out = run_ok(
        Command::new("bash")
            .arg(scripts_dir().join("private-pg"))
            .args(args),
        &format!("scripts/private-pg {}", args.join(" ")),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn remove_private_pg(dir: &Path) {
    let _ = Command::new("bash")
        .arg(scripts_dir().join("private-pg"))
        .arg("remove")
        .arg(dir)
        .status();
}

/// Build the previous release from the repository's history (`git archive` of its commit) into
/// a package under `work`. Cargo's target directory is `target/upgrade-from`, seeded from
/// `target/debug` the first time so that the dependencies are not built again (the crate's own
/// library must not share a directory with this build's: both are `libidentity_sync.so`).
fn build_previous(work: &Path, commit: &str) -> PathBuf {
    let src = work.join("src");
    let tar = work.join("src.tar");
    std::fs::create_dir_all(&src).expect("create the source directory");
    run_ok(
        Command::new("git")
            .arg("-C")
            .arg(repo_dir())
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(commit),
        &format!("git archive {commit} (the previous release, tests/upgrade/from)"),
    );
    run_ok(
        Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src),
        "tar -x",
    );
    let target = repo_dir().join("target/upgrade-from");
    if !target.join("debug/deps").exists() {
        std::fs::create_dir_all(target.join("debug")).expect("create target/upgrade-from");
        let from = repo_dir().join("target/debug");
        for dir in ["deps", "build", ".fingerprint"] {
            if from.join(dir).exists() {
                run_ok(
                    Command::new("cp")
                        .arg("-a")
                        .arg(from.join(dir))
                        .arg(target.join("debug")),
                    &format!("cp -a target/debug/{dir} target/upgrade-from/debug"),
                );
            }
        }
    }
    let package = work.join("pkg-previous");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(&src)
        .args([
            "pgrx",
            "package",
            "--debug",
            "--pg-config",
            PG_CONFIG,
            "--out-dir",
        ])
        .arg(&package)
        .env("CARGO_TARGET_DIR", &target);
    for (k, _) in std::env::vars() {
        // the variables `cargo test` set for this crate are not the old crate's
        if k.starts_with("CARGO_PKG_") || k == "CARGO_MANIFEST_DIR" || k == "CARGO_CRATE_NAME" {
            cargo.env_remove(k);
        }
    }
    run_ok(&mut cargo, "cargo pgrx package of the previous release");
    package
}

/// This build as a package under `work` (`cargo pgrx package`, the debug build the other
/// layers use: nothing is compiled again).
fn package_this_build(work: &Path) -> PathBuf {
    let package = work.join("pkg-new");
    run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(repo_dir())
            .args([
                "pgrx",
                "package",
                "--debug",
                "--pg-config",
                PG_CONFIG,
                "--out-dir",
            ])
            .arg(&package),
        "cargo pgrx package of this build",
    );
    package
}

/// Every row of every table of the extension, as the md5 of its text over the columns the
/// previous release had (`columns`: table → column list), per table.
fn rows(c: &mut Client, columns: &BTreeMap<String, String>) -> BTreeMap<String, Vec<String>> {
    columns
        .iter()
        .map(|(table, cols)| {
            let mut md5s: Vec<String> =
                column(c, &format!("SELECT md5(ROW({cols})::text) FROM {table}"));
            md5s.sort();
            (table.clone(), md5s)
        })
        .collect()
}

/// The tables of the extension and their columns (quoted, in order).
fn table_columns(c: &mut Client) -> BTreeMap<String, String> {
    c.query(
        "SELECT c.oid::regclass::text,
                string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
           FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
          WHERE c.relnamespace = 'identity_sync'::regnamespace AND c.relkind IN ('r', 'p')
            AND a.attnum > 0 AND NOT a.attisdropped
          GROUP BY c.oid",
        &[],
    )
    .expect("list the extension's tables")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The catalog of the extension in the client's database (tests/upgrade/catalog.sql).
fn catalog(c: &mut Client) -> Vec<String> {
    let sql = std::fs::read_to_string(repo_dir().join("tests/upgrade/catalog.sql"))
        .expect("read tests/upgrade/catalog.sql");
    column(c, &sql)
}

/// The events of a target that are not done: (id, person, seq).
fn unfinished(c: &mut Client, target: &str) -> Vec<(i64, String, i64)> {
    c.query(
        "SELECT e.id, e.person_key, e.seq FROM identity_sync.event e
           JOIN identity_sync.target t ON t.id = e.target_id
          WHERE t.name = $1 AND e.state <> 'done' ORDER BY e.id",
        &[&target],
    )
    .expect("unfinished events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// A session of employee `emp_no`, logged in with its own role `emp_<emp_no>`.
fn login(cluster: &Cluster, emp_no: &str) -> Client {
    let mut config = cluster.config("hr");
    config.user(&format!("emp_{emp_no}"));
    connect(&config)
}

/// The story of the module comment.
#[test]
fn previous_release_updates_in_place_and_goes_on() {
    let t0 = Instant::now();
    let (commit, previous) = previous_release();
    let work = Work::new();
    let package = build_previous(&work.0, &commit);
    let build_time = t0.elapsed();
    let new_package = package_this_build(&work.0);
    println!(
        "upgrade: built {previous} ({commit}) in {:.1} s, packaged this build in {:.1} s",
        build_time.as_secs_f64(),
        (t0.elapsed() - build_time).as_secs_f64()
    );

    // The private installation, with the previous release in it, and a cluster on it whose
    // worker serves database hr.
    let pg = work.0.join("pg");
    let bindir = PathBuf::from(private_pg(&["make", &pg.to_string_lossy()]));
    private_pg(&["install", &pg.to_string_lossy(), &package.to_string_lossy()]);
    let cluster = Cluster::start_with(
        "upgrade",
        Some(&bindir),
        true,
        &[
            "identity_sync.database = 'hr'",
            "identity_sync.naptime = '100ms'",
        ],
    );
    let scim = ScimServer::start();
    // The webhook answers 200, except 400 for updates of `failing` (a permanent failure) and
    // 503 for everything while `unavailable` is set (retried).
    let failing = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let unavailable = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook = {
        let (failing, unavailable) = (failing.clone(), unavailable.clone());
        WebhookReceiver::start_with(move |r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            if unavailable.load(std::sync::atomic::Ordering::SeqCst) {
                Response::status(503)
            } else if body["type"] == "update"
                && body["person_key"].as_str() == Some(failing.lock().unwrap().as_str())
            {
                Response::status(400).body(r#"{"error": "rejected"}"#)
            } else {
                Response::ok()
            }
        })
    };

    let mut admin = cluster.client("postgres");
    exec(&mut admin, "CREATE DATABASE hr");
    cluster.load_employees("hr", "small");
    for emp in [REQUESTER, MANAGER] {
        exec(&mut admin, &format!("CREATE ROLE emp_{emp} LOGIN"));
    }
    let mut hr = cluster.client("hr");

    // --- The previous release provisions ---------------------------------------------------
    exec(
        &mut hr,
        &format!(
            "SET client_min_messages = warning;
             CREATE EXTENSION identity_sync VERSION '{previous}';
             {SAMPLE_SOURCES}
             SELECT identity_sync.add_target('dir', 'scim', '{scim_url}',
                    '{{\"auth\": \"bearer\", \"correlate_on\": \"externalId\", \"create_groups\": true}}');
             SELECT identity_sync.set_secret('dir', '{token}');
             SELECT identity_sync.map('dir', 'userName', $$identity_sync.slug(person.first_name || '.' || person.last_name)
                    || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$, true, true);
             SELECT identity_sync.map('dir', 'externalId', $$person.emp_no::text$$);
             SELECT identity_sync.add_rule('dir', 'd001', $$contract.dept_no = 'd001' AND contract.to_date >= today$$, '{{d001}}');
             SELECT identity_sync.add_target('hook', 'webhook', '{hook_url}', '{{}}');
             SELECT identity_sync.map('hook', 'first_name', 'person.first_name');
             SELECT identity_sync.map('hook', 'last_name', 'person.last_name');
             SELECT identity_sync.map('hook', 'dept', 'contract.dept_no');
             SELECT identity_sync.add_rule('hook', 'd002', $$contract.dept_no = 'd002' AND contract.to_date >= today$$, '{{}}');
             SELECT identity_sync.set_login($$'emp_' || person.emp_no::text$$);
             SELECT identity_sync.add_product('vpn', 'dir', '{{vpn-users}}', $${HEAD_OF_DEPARTMENT}$$,
                    description => 'Remote access');
             SELECT identity_sync.resync('dir');
             SELECT identity_sync.resync('hook');",
            scim_url = scim.base_url(),
            token = scim.token(),
            hook_url = hook.url("/"),
        ),
    );
    wait_idle(&mut hr, 120); // the initial sync
    let active_before = count(
        &mut hr,
        "SELECT count(*) FROM identity_sync.account WHERE state = 'active'",
    );
    assert!(active_before > 20, "only {active_before} active accounts");

    // A self-service request, awaiting approval.
    let request: i64 = one(
        &mut login(&cluster, REQUESTER),
        "SELECT identity_sync.request_access('vpn', 'working from home')",
    );

    // Ten persons of d002 (one of them the webhook rejects) and three of d001 who leave.
    let d002: Vec<i32> = column(
        &mut hr,
        "SELECT emp_no FROM dept_emp d WHERE dept_no = 'd002' AND to_date = '9999-01-01'
            AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = d.emp_no AND x.dept_no <> 'd002')
          ORDER BY emp_no LIMIT 10",
    );
    let leavers: Vec<i32> = column(
        &mut hr,
        &format!(
            "SELECT emp_no FROM dept_emp d WHERE dept_no = 'd001' AND to_date = '9999-01-01'
                AND emp_no NOT IN ({REQUESTER}, {MANAGER})
                AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = d.emp_no AND x.dept_no <> 'd001')
              ORDER BY emp_no LIMIT 3"
        ),
    );
    assert_eq!((d002.len(), leavers.len()), (10, 3), "the sample changed");
    let list = |v: &[i32]| {
        v.iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };

    // A failed event: the webhook rejects the update of the first, which holds back its
    // later events.
    let rejected = d002[0].to_string();
    *failing.lock().unwrap() = rejected.clone();
    exec(
        &mut hr,
        &format!("UPDATE employee SET last_name = last_name || '-a' WHERE emp_no = {rejected}"),
    );
    assert!(
        wait_until(PATIENCE, || {
            count(
            &mut hr,
            &format!("SELECT count(*) FROM identity_sync.event WHERE person_key = '{rejected}' AND state = 'failed'")
        ) == 1
        }),
        "the rejected update did not fail"
    );

    // Pending events, several per person: the webhook is unavailable, and each round of
    // renames waits until the round before has been tried (so it is not folded into it).
    unavailable.store(true, std::sync::atomic::Ordering::SeqCst);
    for round in ["b", "c", "d"] {
        exec(
            &mut hr,
            &format!(
                "UPDATE employee SET last_name = last_name || '-{round}' WHERE emp_no IN ({})",
                list(&d002)
            ),
        );
        assert!(
            wait_until(PATIENCE, || count(
                &mut hr,
                &format!(
                    "SELECT count(DISTINCT person_key) FROM identity_sync.event e
                      WHERE e.state = 'retry' AND e.person_key IN ({})",
                    d002[1..]
                        .iter()
                        .map(|k| format!("'{k}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            ) == 9),
            "round {round}: the webhook's events were not tried"
        );
    }

    // A held target: three leavers are more disables than max_disables allows.
    exec(
        &mut hr,
        &format!(
            "SELECT identity_sync.alter_target('dir', options => '{{\"max_disables\": 1}}');
             UPDATE dept_emp SET to_date = current_date - 1 WHERE dept_no = 'd001' AND emp_no IN ({})",
            list(&leavers)
        ),
    );
    assert!(
        wait_until(PATIENCE, || one::<Option<String>>(
            &mut hr,
            "SELECT held_by FROM identity_sync.status WHERE target = 'dir'"
        )
        .is_some()),
        "the scim target was not held"
    );
    // Nothing more is sent while the state is taken: the webhook target is paused.
    exec(&mut hr, "SELECT identity_sync.pause('hook')");
    assert!(
        wait_until(PATIENCE, || count(
            &mut hr,
            "SELECT count(*) FROM identity_sync.event WHERE state = 'sending'"
        ) == 0),
        "events still in flight"
    );
    let pending_hook = unfinished(&mut hr, "hook");
    let pending_dir = unfinished(&mut hr, "dir");
    let persons_waiting: BTreeSet<&str> = pending_hook.iter().map(|e| e.1.as_str()).collect();
    assert!(
        pending_hook.len() >= 19 && persons_waiting.len() == 10,
        "expected events of 10 persons waiting for the webhook, got {pending_hook:?}"
    );
    assert!(
        pending_dir.len() >= 3,
        "expected held events in dir: {pending_dir:?}"
    );
    assert_eq!(
        one::<String>(
            &mut hr,
            "SELECT extversion FROM pg_extension WHERE extname = 'identity_sync'"
        ),
        previous
    );
    // Every row as it is, except each target's compiled query: that is code derived from the
    // configuration, which the update compiles again (with 0.2.0's markers); it is checked
    // on its own below.
    let mut columns = table_columns(&mut hr);
    let target_columns = columns
        .get_mut("identity_sync.target")
        .expect("the previous release has identity_sync.target");
    *target_columns = target_columns
        .split(", ")
        .filter(|c| *c != "compiled")
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(
        count(
            &mut hr,
            "SELECT count(*) FROM identity_sync.target
              WHERE compiled IS NULL OR strpos(compiled, 'identity_sync._at(') > 0"
        ),
        0,
        "the previous release's compiled queries already look like 0.2.0's"
    );
    let before = rows(&mut hr, &columns);
    drop(hr);
    drop(admin);

    // --- The update, as README "Upgrading" says -------------------------------------------
    let t1 = Instant::now();
    // 1. The role user SQL runs as since 0.2.0, allowed to read the HR tables.
    exec(
        &mut cluster.client("hr"),
        &format!("CREATE ROLE identity_sync_evaluator NOLOGIN; {EVALUATOR_GRANTS}"),
    );
    // 2. This build's files, 3. a restart (the library is preloaded).
    private_pg(&[
        "install",
        &pg.to_string_lossy(),
        &new_package.to_string_lossy(),
    ]);
    cluster.restart();
    let mut hr = cluster.client("hr");
    assert!(
        wait_until(PATIENCE, || cluster.log().contains(
            "the worker waits for ALTER EXTENSION identity_sync UPDATE"
        )),
        "the new worker does not say that it waits for the update"
    );
    // HR writes go on meanwhile and are captured into the previous release's outbox.
    let window = d002[1].to_string();
    exec(
        &mut hr,
        &format!("UPDATE employee SET first_name = first_name || '-w' WHERE emp_no = {window}"),
    );
    // 4. The update; the rows are read in the same transaction, before the worker can see it.
    exec(
        &mut hr,
        "BEGIN; SET client_min_messages = warning; ALTER EXTENSION identity_sync UPDATE",
    );
    let after = rows(&mut hr, &columns);
    exec(&mut hr, "COMMIT");
    assert_eq!(
        count(
            &mut hr,
            "SELECT count(*) FROM identity_sync.target
              WHERE compiled IS NULL OR strpos(compiled, 'identity_sync._at(') = 0"
        ),
        0,
        "the update did not compile every target again"
    );
    let update_time = t1.elapsed();
    let version: String = one(
        &mut hr,
        "SELECT extversion FROM pg_extension WHERE extname = 'identity_sync'",
    );
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // Every row is still there; the outbox has the change written during the window besides.
    for (table, old) in &before {
        let new = &after[table];
        if table == "identity_sync.change" {
            assert!(
                old.iter().all(|r| new.contains(r)) && new.len() == old.len() + 1,
                "{table}: {} rows before, {} after (expected one more, from the window)",
                old.len(),
                new.len()
            );
        } else {
            assert_eq!(old, new, "{table}: rows changed by the update");
        }
    }

    // --- The worker goes on where the previous release left off -----------------------------
    unavailable.store(false, std::sync::atomic::Ordering::SeqCst);
    failing.lock().unwrap().clear();
    hook.clear();
    // The operator's levers of 0.2.0 on the previous release's state: the failed event and
    // those backing off after the 503s are due now (retry), the target sends again (resume),
    // the held disables go out (release).
    exec(
        &mut hr,
        "SELECT identity_sync.retry('hook');
         SELECT identity_sync.resume('hook');
         SELECT identity_sync.release('dir');",
    );
    wait_idle(&mut hr, 120);
    let left = count(
        &mut hr,
        "SELECT count(*) FROM identity_sync.event WHERE state <> 'done'",
    );
    assert_eq!(left, 0, "events not delivered after the update");

    // 0 lost: every event pending before the update arrived, each person's in order.
    let got: Vec<(usize, i64, String)> = hook
        .requests()
        .iter()
        .map(|r| {
            let b = r.json();
            (
                r.seq,
                b["id"].as_i64().expect("webhook body has an id"),
                b["person_key"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let arrived: BTreeSet<i64> = got.iter().map(|g| g.1).collect();
    let lost: Vec<i64> = pending_hook
        .iter()
        .map(|e| e.0)
        .filter(|id| !arrived.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "events pending before the update never arrived: {lost:?}"
    );
    let seq_of: BTreeMap<i64, i64> = c_query_seqs(&mut hr, "hook");
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut sorted = got.clone();
    sorted.sort();
    for (_, id, person) in &sorted {
        let seq = seq_of[id];
        let prev = last.entry(person.clone()).or_insert(seq);
        assert!(
            seq >= *prev,
            "person {person}: event {id} (seq {seq}) arrived after seq {prev}"
        );
        *prev = seq;
    }
    // The change written between restart and update was planned and delivered too: the last
    // request for that person carries the first name it was given then. (Its update may have
    // been folded into the person's update that was still pending, so it need not be an event
    // of its own.)
    let window_name: String = one(
        &mut hr,
        &format!("SELECT first_name FROM employee WHERE emp_no = {window}"),
    );
    assert!(window_name.ends_with("-w"), "{window}: {window_name}");
    let last_for_window = hook
        .requests()
        .into_iter()
        .filter(|r| r.json()["person_key"].as_str() == Some(window.as_str()))
        .max_by_key(|r| r.seq)
        .map(|r| r.json());
    let sent = Value::String(window_name);
    assert!(
        last_for_window
            .as_ref()
            .is_some_and(|b| b["changed"]["first_name"] == sent
                || b["attributes"]["first_name"] == sent),
        "the change made during the update window did not reach the webhook ({sent} expected): {last_for_window:?}"
    );
    // The held disables reached the SCIM server.
    for leaver in &leavers {
        let id = remote_id(&mut hr, "dir", *leaver);
        let (status, user) = scim.user(&id);
        assert_eq!(status, 200);
        assert_eq!(
            user["active"], false,
            "leaver {leaver} is still active in the SCIM server"
        );
    }

    // Self-service goes on: the head of department approves the request made before.
    exec(
        &mut login(&cluster, MANAGER),
        &format!("SELECT identity_sync.approve({request}, 'ok')"),
    );
    let uid = remote_id(&mut hr, "dir", REQUESTER.parse().unwrap());
    assert!(
        wait_until(PATIENCE, || scim.group_members("vpn-users").contains(&uid)),
        "the request approved after the update was not provisioned"
    );

    // --- The same catalog as a fresh installation -------------------------------------------
    exec(&mut cluster.client("postgres"), "CREATE DATABASE fresh");
    let mut fresh = cluster.client("fresh");
    exec(
        &mut fresh,
        "SET client_min_messages = warning; CREATE EXTENSION identity_sync",
    );
    let updated = catalog(&mut hr);
    let created = catalog(&mut fresh);
    let only_updated: Vec<&String> = updated.iter().filter(|l| !created.contains(l)).collect();
    let only_created: Vec<&String> = created.iter().filter(|l| !updated.contains(l)).collect();
    assert!(
        only_updated.is_empty() && only_created.is_empty(),
        "the updated extension differs from a fresh one ({} catalog facts):\nonly after the update:\n{}\nonly when created afresh:\n{}",
        created.len(),
        only_updated.iter().take(20).map(|l| l.as_str()).collect::<Vec<_>>().join("\n"),
        only_created.iter().take(20).map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
    );
    println!(
        "upgrade: {previous} → {version}: {} tables kept every row, {} events pending before the update delivered ({} requests), catalog identical to a fresh install ({} facts); build of {previous} {:.1} s, update (restart + ALTER EXTENSION) {:.1} s, test {:.1} s",
        before.len(),
        pending_hook.len() + pending_dir.len(),
        got.len(),
        created.len(),
        build_time.as_secs_f64(),
        update_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(fresh);
    drop(hr);
    drop(cluster);
    drop(work);
}

/// The seq of every event of a target, by id.
fn c_query_seqs(c: &mut Client, target: &str) -> BTreeMap<i64, i64> {
    c.query(
        "SELECT e.id, e.seq FROM identity_sync.event e
           JOIN identity_sync.target t ON t.id = e.target_id WHERE t.name = $1",
        &[&target],
    )
    .expect("event seqs")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}
