//! End-to-end side of the bad-input corpus (issue 13 item 7): `tests/pg_regress/sql/90_bad_input.sql`
//! run with psql in the database the background worker serves, while the worker runs. The
//! pg_regress layer checks every message; this test checks what pg_regress cannot see: the
//! worker is the same process afterwards and still provisions, and no call failed with an
//! internal error or a Rust panic.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Leftovers of the corpus when its own cleanup could not run (DROP EXTENSION can lose a
/// deadlock against the worker, and then the schema is still a source).
const LEFTOVERS: &str = "SET client_min_messages = warning;
    DROP SCHEMA IF EXISTS hr CASCADE;
    DROP ROLE IF EXISTS regress_ann;";

#[test]
fn corpus_leaves_the_worker_running_and_hr_data_unchanged() {
    let _cleanup = DropExtension;
    let mut c = db();
    drop_extension(&mut c);
    exec(&mut c, LEFTOVERS);
    let worker = worker_pid(&mut c).expect("the harness cluster runs a worker");

    let corpus = repo_dir().join("tests/pg_regress/sql/90_bad_input.sql");
    let port = harness_env("PGPORT");
    let out = Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &port])
        .args(["-v", "ON_ERROR_STOP=0", "-f"])
        .arg(&corpus)
        .env_remove("PGDATABASE")
        .output()
        .expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    // Every case echoes the SQLSTATE of its error: none succeeded, none was internal.
    let states: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("SQLSTATE "))
        .collect();
    assert!(
        states.len() >= 50,
        "the corpus ran {} cases:\n{stdout}\n{stderr}",
        states.len()
    );
    for bad in ["00000", "XX000"] {
        assert!(
            !states.contains(&bad),
            "a case ended with SQLSTATE {bad}:\n{stderr}"
        );
    }
    for text in ["panicked", "RUST_BACKTRACE", "internal error"] {
        assert!(
            !stderr.contains(text),
            "psql's output mentions {text:?}:\n{stderr}"
        );
    }
    // The corpus compares the HR tables with a digest taken before the first case.
    let unchanged = stdout
        .lines()
        .skip_while(|l| !l.contains("hr_data_unchanged"))
        .nth(2)
        .map(str::trim);
    assert_eq!(unchanged, Some("t"), "HR data changed:\n{stdout}");

    // The same worker, and it still provisions.
    assert_eq!(
        worker_pid(&mut c),
        Some(worker),
        "the worker was restarted during the corpus"
    );
    drop_extension(&mut c);
    exec(&mut c, LEFTOVERS);
    let receiver = WebhookReceiver::start();
    reset_with_sample(&mut c, "small", "");
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('after', 'webhook', '{}');
             SELECT identity_sync.add_rule('after', 'd001', $$contract.dept_no = 'd001'$$);
             SELECT identity_sync.resync('after');",
            receiver.url("/")
        ),
    );
    wait_idle(&mut c, 60);
    let sent = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.events WHERE target = 'after' AND state = 'done'",
    );
    assert!(sent > 0, "nothing was delivered after the corpus");
    assert!(
        receiver.wait_for(sent as usize, Duration::from_secs(10)),
        "the receiver got {} of {sent} events",
        receiver.count()
    );
    assert_eq!(worker_pid(&mut c), Some(worker));
}
