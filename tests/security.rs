//! End-to-end tests of secrets and robustness against targets (issue 13): secrets held in
//! files and never seen in SQL text, logs, tables or payloads; HTTP hardening (plain http to
//! non-loopback hosts, response size cap); the circuit breaker that quarantines a target whose
//! every request fails and lets it recover on its own.
//!
//! Every test builds its state from scratch in the harness cluster's database `postgres` (the
//! worker's). Run by `scripts/test` (e2e layer, `--test-threads=1`).
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Fresh state in the worker's database: the small employees sample and its sources; the
/// extension is dropped again when the returned guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(&mut c, "small", "");
    (cleanup, c)
}

/// A folder the server's OS user can read, removed on drop.
struct SecretDir(PathBuf);

impl SecretDir {
    fn new(name: &str) -> SecretDir {
        let dir = PathBuf::from(format!(
            "/var/tmp/identity_sync-secrets-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        SecretDir(dir)
    }

    /// Write `contents` to the file `name` (readable by everyone: the server runs as another
    /// OS user than the tests) and return its path.
    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path.display().to_string()
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).unwrap();
    }
}

impl Drop for SecretDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `log_statement = 'all'` on the harness cluster while it lives.
struct LogAllStatements;

impl LogAllStatements {
    fn on(c: &mut Client) -> LogAllStatements {
        exec(c, "ALTER SYSTEM SET log_statement = 'all'");
        exec(c, "SELECT pg_reload_conf()");
        LogAllStatements
    }
}

impl Drop for LogAllStatements {
    fn drop(&mut self) {
        let mut c = db();
        let _ = c.batch_execute("ALTER SYSTEM RESET log_statement");
        let _ = c.batch_execute("SELECT pg_reload_conf()");
    }
}

fn harness_log() -> String {
    let dir = std::env::var("IDSYNC_CLUSTER_DIR")
        .unwrap_or_else(|_| "/var/tmp/identity_sync-test".into());
    std::fs::read_to_string(Path::new(&dir).join("log")).unwrap_or_default()
}

/// Everything a reader can select in schema identity_sync, as text.
fn all_a_reader_can_read(c: &mut Client) -> String {
    let relations: Vec<String> = column(
        c,
        "SELECT format('%I.%I', n.nspname, r.relname) FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
          WHERE n.nspname = 'identity_sync' AND r.relkind IN ('r', 'v', 'm')
            AND has_table_privilege('identity_sync_reader', r.oid, 'SELECT')
          ORDER BY 1",
    );
    assert!(relations.len() > 5, "reader sees {relations:?}");
    let mut all = String::new();
    for r in relations {
        let text: Option<String> = one(
            c,
            &format!("SELECT string_agg(to_jsonb(x)::text, E'\\n') FROM {r} x"),
        );
        all.push_str(&text.unwrap_or_default());
        all.push('\n');
    }
    all
}

/// Issue 13 item 1: a SCIM sync whose bearer token and a webhook whose signing secret come from
/// files, with every statement logged. Neither secret appears in the server log, in anything
/// a reader can read, in the audit log, in error texts or in webhook payloads. Rotating the
/// token file takes effect without a restart; a missing file fails requests with a clear
/// error in status.last_error, and the worker keeps running.
#[test]
fn secrets_in_files_never_appear_anywhere() {
    let (_cleanup, mut c) = fresh();
    let _log = LogAllStatements::on(&mut c);
    let scim = ScimServer::start();
    let hooks = WebhookReceiver::start();
    let dir = SecretDir::new("files");
    let token_file = dir.write("scim-token", &format!("{}\n", scim.token()));
    let signing = format!("whsec_{}", "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==");
    let signing_file = dir.write("hook-secret", &signing);
    let worker = worker_pid(&mut c).expect("a worker runs");

    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('scim', 'scim', '{}', '{{\"auth\": \"bearer\", \"secret_file\": \"{token_file}\"}}');
             SELECT identity_sync.map('scim', 'userName', $$'u' || person.emp_no$$);
             SELECT identity_sync.map('scim', 'externalId', 'person.emp_no::text');
             SELECT identity_sync.map('scim', 'name.familyName', 'person.last_name');
             SELECT identity_sync.add_rule('scim', 'd001', $$contract.dept_no = 'd001'$$);
             SELECT identity_sync.add_target('hook', 'webhook', '{}', '{{\"secret_file\": \"{signing_file}\"}}');
             SELECT identity_sync.map('hook', 'last_name', 'person.last_name');
             SELECT identity_sync.add_rule('hook', 'd001', $$contract.dept_no = 'd001'$$);
             SELECT identity_sync.resync('scim'); SELECT identity_sync.resync('hook');",
            scim.base_url(),
            hooks.url("/")
        ),
    );
    wait_idle(&mut c, 120);
    let created = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.accounts WHERE target = 'scim' AND state = 'active'",
    );
    assert!(created > 10, "only {created} SCIM accounts");
    assert_eq!(scim.users().len() as i64, created);
    assert!(hooks.count() as i64 >= created);
    // Signed with the file's secret.
    assert!(hooks.requests().iter().all(|r| r
        .header("webhook-signature")
        .is_some_and(|s| s.starts_with("v1,"))));

    // Rotation: a wrong token in the file is used at once (401), the right one again heals.
    let one_person: i32 = one(
        &mut c,
        "SELECT person_key::int FROM identity_sync.accounts WHERE target = 'scim' ORDER BY 1 LIMIT 1",
    );
    dir.write("scim-token", "not-the-token");
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Rotated' WHERE emp_no = {one_person}"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            one::<Option<String>>(
                &mut c,
                "SELECT last_error FROM identity_sync.status WHERE target = 'scim'",
            )
            .is_some_and(|e| e.contains("401"))
        }),
        "a rotated (wrong) token was not used"
    );
    dir.write("scim-token", scim.token());
    exec(&mut c, "SELECT identity_sync.retry('scim')");
    wait_idle(&mut c, 60);
    let (_, user) = scim.user(&remote_id(&mut c, "scim", one_person));
    assert_eq!(user["name"]["familyName"], "Rotated");

    // A missing file: a clear error for the target, nothing else.
    dir.remove("scim-token");
    exec(
        &mut c,
        &format!("UPDATE employee SET last_name = 'Missing' WHERE emp_no = {one_person}"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            one::<Option<String>>(
                &mut c,
                "SELECT last_error FROM identity_sync.status WHERE target = 'scim'",
            )
            .is_some_and(|e| e.contains("cannot read secret_file") && e.contains("scim-token"))
        }),
        "status.last_error does not name the missing secret_file"
    );
    assert_eq!(worker_pid(&mut c), Some(worker), "the worker restarted");

    // Now look everywhere for the secrets.
    let log = harness_log();
    assert!(
        log.contains("secret_file"),
        "log_statement = 'all' did not log our statements"
    );
    let readable = all_a_reader_can_read(&mut c);
    let audit: String = one(
        &mut c,
        "SELECT coalesce(string_agg(to_jsonb(a)::text, ' '), '') FROM identity_sync.audit_log a",
    );
    let errors: String = one(
        &mut c,
        "SELECT coalesce(string_agg(last_error, ' '), '') FROM identity_sync.event",
    );
    let payloads: String = hooks
        .requests()
        .iter()
        .map(|r| r.body_str())
        .collect::<Vec<_>>()
        .join("\n");
    let secret_part = signing.trim_start_matches("whsec_");
    for (place, text) in [
        ("the server log", &log),
        ("what a reader can read", &readable),
        ("audit_log", &audit),
        ("event errors", &errors),
        ("webhook payloads", &payloads),
    ] {
        assert!(!text.contains(scim.token()), "the token is in {place}");
        assert!(
            !text.contains(secret_part),
            "the signing secret is in {place}"
        );
    }
}

/// Issue 13 item 5: plain http goes to loopback hosts only unless a target allows it; file
/// options must be absolute paths; a response body over max_response_bytes fails the event with
/// a clear error.
#[test]
fn http_hardening() {
    let (_cleanup, mut c) = fresh();
    let (code, message, _, hint) = error_parts(
        &mut c,
        "SELECT identity_sync.add_target('far', 'webhook', 'http://far.invalid/hook')",
    );
    assert_eq!(code, "22023");
    assert_eq!(
        message,
        "plain http to a host that is not a loopback address is refused"
    );
    assert!(hint.contains("allow_insecure_http"), "{hint}");
    // Allowed when said so (nothing is sent: no rule puts anybody in scope).
    exec(
        &mut c,
        "SELECT identity_sync.add_target('far', 'webhook', 'http://far.invalid/hook', '{\"allow_insecure_http\": true}')",
    );
    let (code, message, detail, _) = error_parts(
        &mut c,
        "SELECT identity_sync.add_target('rel', 'webhook', 'https://far.invalid/hook', '{\"secret_file\": \"token.txt\"}')",
    );
    assert_eq!(code, "22023");
    assert!(message.contains("secret_file"), "{message}");
    assert!(detail.contains("absolute file path"), "{detail}");

    let hooks = WebhookReceiver::start_with(|_| Response::ok().body("x".repeat(5000)));
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('hook', 'webhook', '{}', '{{\"max_response_bytes\": 1000}}');
             SELECT identity_sync.map('hook', 'last_name', 'person.last_name');
             SELECT identity_sync.add_rule('hook', 'one', $$person.emp_no = 10001$$);
             SELECT identity_sync.resync('hook');",
            hooks.url("/")
        ),
    );
    assert!(
        wait_until(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'hook' AND state = 'failed'
                AND last_error LIKE '%exceeds max_response_bytes (1000 bytes)%'"
        ) == 1),
        "a 5000-byte answer did not fail the event"
    );
}

/// Issue 13 item 4: a target that refuses every request (a revoked token: 401) is quarantined
/// once everything has failed for quarantine_after, then gets single probes instead of the
/// whole backlog; its events wait for it (none is left failed); retry(target) probes at once, and the
/// first success ends the quarantine and delivers everything.
#[test]
fn a_target_that_refuses_everything_is_quarantined_and_recovers() {
    let (_cleanup, mut c) = fresh();
    let hooks = WebhookReceiver::start_with(|_| Response::status(401));
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_target('hook', 'webhook', '{}', '{{\"quarantine_after\": \"2 seconds\", \"max_concurrency\": 1}}');
             SELECT identity_sync.map('hook', 'last_name', 'person.last_name');
             SELECT identity_sync.add_rule('hook', 'd001', $$contract.dept_no = 'd001'$$);
             SELECT identity_sync.resync('hook');",
            hooks.url("/")
        ),
    );
    assert!(
        wait_until(Duration::from_secs(30), || one::<String>(
            &mut c,
            "SELECT state FROM identity_sync.status WHERE target = 'hook'"
        ) == "quarantined"),
        "not quarantined"
    );
    let (reason, since): (Option<String>, bool) = {
        let r = c
            .query_one(
                "SELECT quarantine_reason, quarantined_since IS NOT NULL AND next_probe > now()
                   FROM identity_sync.status WHERE target = 'hook'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(reason.is_some_and(|r| r.contains("401")));
    assert!(since, "no next probe scheduled");
    // Quarantined: no request until the probe is due (30 s), and nothing is left failed.
    let sent = hooks.count();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        hooks.count() <= sent + 2,
        "{} requests to a quarantined target within 3 s",
        hooks.count() - sent
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.events WHERE target = 'hook' AND state = 'failed'"
        ),
        0
    );
    assert!(count(&mut c, "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'quarantine' AND object = 'hook'") == 1);

    let persons = count(
        &mut c,
        "SELECT count(*) FROM identity_sync.events WHERE target = 'hook' AND kind = 'create'",
    );
    assert!(persons > 10, "{persons} persons in scope");

    // The token works again; an operator asks for a probe now.
    hooks.respond_with(|_| Response::ok());
    exec(&mut c, "SELECT identity_sync.retry('hook')");
    wait_idle(&mut c, 60);
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT state FROM identity_sync.status WHERE target = 'hook'"
        ),
        "active"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target = 'hook' AND state = 'active'"
        ),
        persons
    );
    assert!(count(&mut c, "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'quarantine_end' AND object = 'hook'") == 1);
}
