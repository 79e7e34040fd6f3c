//! End-to-end acceptance tests of the basics: the background worker runs in a preloaded
//! cluster and survives crashes, the extension installs and drops cleanly, and without
//! `shared_preload_libraries` it says so instead of half-working.
//!
//! Run by `scripts/test` against its harness cluster (`scripts/cluster start test --preload`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// The worker's database, as the cluster sees it.
fn worker_database(c: &mut Client) -> String {
    c.query_one("SELECT current_setting('identity_sync.database')", &[])
        .expect("identity_sync.database is defined in a preloaded cluster")
        .get(0)
}

/// The `comment` of identity_sync.control.
fn control_comment() -> String {
    let control = std::fs::read_to_string(repo_dir().join("identity_sync.control"))
        .expect("read identity_sync.control");
    control
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "comment").then(|| v.trim().trim_matches('\'').replace("''", "'"))
        })
        .expect("identity_sync.control has a comment")
}

/// Issue acceptance (i): a preloaded cluster runs one `identity_sync worker`, connected to the
/// database named by `identity_sync.database` (default `postgres`).
#[test]
fn worker_runs_in_preloaded_cluster() {
    let mut c = db();
    assert!(
        wait_until(Duration::from_secs(10), || worker_pid(&mut c).is_some()),
        "no backend with backend_type 'identity_sync worker' in pg_stat_activity"
    );
    let dbname = worker_database(&mut c);
    let rows = c
        .query(
            "SELECT pid, datname::text FROM pg_stat_activity \
             WHERE backend_type = 'identity_sync worker'",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "exactly one worker expected");
    let datname: Option<String> = rows[0].get(1);
    assert_eq!(
        datname.as_deref(),
        Some(dbname.as_str()),
        "the worker must be connected to identity_sync.database"
    );
}

/// Issue acceptance (ii): `kill -9` of the worker. PostgreSQL answers the crash of any process
/// attached to shared memory by resetting every backend; afterwards the cluster must serve
/// sessions again and a new worker must run within 10 s.
#[test]
fn worker_restarts_after_kill_9() {
    let _restore = EnsureWorker;
    let mut c = db();
    assert!(wait_until(Duration::from_secs(10), || worker_pid(&mut c).is_some()));
    let old = worker_pid(&mut c).unwrap();
    kill("KILL", old);
    drop(c);

    let mut new = None;
    let back = wait_until(Duration::from_secs(10), || {
        let Ok(mut c) = config("postgres").connect(NoTls) else {
            return false;
        };
        // the cluster serves sessions: an ordinary query works
        let Ok(row) = c.query_one("SELECT 40 + 2", &[]) else {
            return false;
        };
        assert_eq!(row.get::<_, i32>(0), 42);
        // The crash reset may still close this session: that is a retry, not a failure.
        let Ok(row) = c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'identity_sync worker'",
            &[],
        ) else {
            return false;
        };
        new = row.map(|r| r.get::<_, i32>(0)).filter(|p| *p != old);
        new.is_some()
    });
    assert!(
        back,
        "within 10 s of kill -9 of worker {old}, no new identity_sync worker (or no session)"
    );
}

/// SIGTERM of the worker (`pg_terminate_backend`) is not a crash: other sessions keep their
/// connection and a new worker starts within 10 s.
#[test]
fn worker_restarts_after_terminate_without_disturbing_sessions() {
    let _restore = EnsureWorker;
    let mut c = db();
    let mut bystander = db();
    let bystander_pid: i32 = bystander
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    assert!(wait_until(Duration::from_secs(10), || worker_pid(&mut c).is_some()));
    let old = worker_pid(&mut c).unwrap();
    let done: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&old])
        .unwrap()
        .get(0);
    assert!(done, "pg_terminate_backend({old}) failed");
    assert!(
        wait_until(Duration::from_secs(10), || worker_pid(&mut c)
            .is_some_and(|p| p != old)),
        "no new identity_sync worker within 10 s of terminating {old}"
    );
    let same: i32 = bystander
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("the other session kept its connection")
        .get(0);
    assert_eq!(same, bystander_pid);
}

/// Issue acceptance (iii): the extension installs, drops and re-installs cleanly in a fresh
/// database, and `pg_extension` / `\dx` show it with the comment of identity_sync.control.
#[test]
fn extension_installs_drops_and_reinstalls() {
    let dbname = "harness_install";
    let mut c = fresh_db(dbname);
    let comment = control_comment();
    for round in 1..=2 {
        c.batch_execute("CREATE EXTENSION identity_sync")
            .unwrap_or_else(|e| panic!("CREATE EXTENSION (round {round}): {e}"));
        let row = c
            .query_one(
                "SELECT e.extnamespace::regnamespace::text, \
                        obj_description(e.oid, 'pg_extension') \
                 FROM pg_extension e WHERE e.extname = 'identity_sync'",
                &[],
            )
            .expect("identity_sync in pg_extension");
        assert_eq!(row.get::<_, String>(0), "identity_sync");
        assert_eq!(
            row.get::<_, Option<String>>(1).as_deref(),
            Some(comment.as_str())
        );

        let out = Command::new("psql")
            .args(["-X", "-d", dbname, "-c", "\\dx identity_sync"])
            .output()
            .expect("run psql");
        let dx = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "psql \\dx failed: {dx}");
        assert!(
            dx.contains("identity_sync") && dx.contains(&comment),
            "\\dx does not show the description:\n{dx}"
        );

        c.batch_execute("DROP EXTENSION identity_sync")
            .unwrap_or_else(|e| panic!("DROP EXTENSION (round {round}): {e}"));
        // CREATE EXTENSION made the schema identity_sync.control names, and PostgreSQL keeps
        // such a schema after DROP EXTENSION: it must be empty (round 2 re-installs into it).
        let left: i64 = c
            .query_one(
                "SELECT coalesce(( \
                     SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid) \
                          + (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid) \
                          + (SELECT count(*) FROM pg_type WHERE typnamespace = n.oid) \
                     FROM pg_namespace n WHERE n.nspname = 'identity_sync'), 0)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            left, 0,
            "DROP EXTENSION left objects in schema identity_sync"
        );
    }
    drop(c);
    db().batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .unwrap();
}

/// In the worker's database of the preloaded cluster, `worker_status()` names the running
/// worker's pid.
#[test]
fn worker_status_reports_the_running_worker() {
    let mut c = db();
    let dbname = worker_database(&mut c);
    let mut c = db_named(&dbname);
    let existed: bool = c
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'identity_sync')",
            &[],
        )
        .unwrap()
        .get(0);
    if !existed {
        c.batch_execute("CREATE EXTENSION identity_sync").unwrap();
    }
    assert!(wait_until(Duration::from_secs(10), || worker_pid(&mut c).is_some()));
    let mut status = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let row = c
            .query_one(
                "SELECT state, detail FROM identity_sync.worker_status()",
                &[],
            )
            .expect("identity_sync.worker_status()");
        status = format!("{} ({})", row.get::<_, String>(0), row.get::<_, String>(1));
        worker_pid(&mut c).is_some_and(|pid| status == format!("running (pid {pid})"))
    });
    if !existed {
        // on the first try: the worker steps aside (src/deliver/txn.rs)
        c.batch_execute("DROP EXTENSION identity_sync")
            .expect("DROP EXTENSION");
    }
    assert!(ok, "worker_status() says {status:?}");
}

/// Issue acceptance (iv): without `shared_preload_libraries`, CREATE EXTENSION still works but
/// says (NOTICE + HINT naming shared_preload_libraries) that no worker runs, and
/// `worker_status()` reports it.
#[test]
fn without_preload_create_extension_explains_missing_worker() {
    let cluster = Cluster::start("nopreload", false, &[]);
    let (mut c, notices) = connect_with_notices(cluster.config("postgres"));
    let preload: String = c
        .query_one("SHOW shared_preload_libraries", &[])
        .unwrap()
        .get(0);
    assert!(!preload.contains("identity_sync"));

    c.batch_execute("CREATE EXTENSION identity_sync")
        .expect("CREATE EXTENSION must work without preloading");
    let got = notices.lock().unwrap().clone();
    let notice = got.iter().find(|n| {
        n.message.to_lowercase().contains("worker")
            && n.hint
                .as_deref()
                .is_some_and(|h| h.contains("shared_preload_libraries"))
    });
    assert!(
        notice.is_some_and(|n| n.severity == "NOTICE" || n.severity == "WARNING"),
        "expected a NOTICE that no worker runs, with a HINT naming shared_preload_libraries; got {got:#?}"
    );
    assert_eq!(worker_pid(&mut c), None);

    let row = c
        .query_one("SELECT state, hint FROM identity_sync.worker_status()", &[])
        .expect("identity_sync.worker_status()");
    let (state, hint): (String, Option<String>) = (row.get(0), row.get(1));
    assert_eq!(state, "no worker");
    assert!(
        hint.as_deref()
            .is_some_and(|h| h.contains("shared_preload_libraries")),
        "worker_status() without preload: hint {hint:?}"
    );
    drop(c);
    drop(cluster); // stops and removes it (also when an assertion above fails)
}
