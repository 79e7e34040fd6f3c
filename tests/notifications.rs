//! End-to-end acceptance tests of notifications (issue 16): rules in SQL, notices written in
//! the transaction that caused them, sent by the worker to a real SMTP server (the PyPI package
//! `aiosmtpd`, run by `scripts/smtp-sink` from the venv on a loopback port), with retries.
//!
//! The harness cluster's worker database with the small employees sample; the recipients'
//! addresses come from a function of the test, `mail_of(emp_no)` (first.last@example.com).
//! Every wait is for an outcome (`wait_until`), never a measured time.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(60);

/// What the test creates besides the extension, made again by every test.
const SETUP: &str = "
    CREATE FUNCTION mail_of(emp int) RETURNS text LANGUAGE sql STABLE AS
        $$SELECT identity_sync.slug(e.first_name || '.' || e.last_name) || '@example.com' FROM employee e WHERE e.emp_no = emp$$;
    CREATE TABLE ntf_users (emp_no int PRIMARY KEY, user_name text, department text, active boolean);
    SELECT identity_sync.add_target('app', 'table', NULL,
           '{\"relation\": \"ntf_users\", \"key_column\": \"emp_no\", \"active_column\": \"active\"}');
    SELECT identity_sync.map('app', 'user_name', $$identity_sync.slug(person.first_name || '.' || person.last_name)
           || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$, true, true);
    SELECT identity_sync.map('app', 'department', 'contract.dept_no');
    SELECT identity_sync.add_rule('app', 'staff', 'true');";

const LEFTOVERS: &str = "DROP TABLE IF EXISTS ntf_users; DROP FUNCTION IF EXISTS mail_of(int);";

/// The address of the current head of the new hire's department (the README's example).
const MANAGER_MAIL: &str = "(SELECT mail_of(dm.emp_no) FROM dept_manager dm
    WHERE dm.dept_no = contract.dept_no AND today BETWEEN dm.from_date AND dm.to_date
    ORDER BY dm.from_date DESC LIMIT 1)";

/// Drops what the test made when it ends, also after a failed assertion.
struct Cleanup(&'static [&'static str]);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(mut c) = config("postgres").connect(NoTls) {
            let mut sql = format!(
                "SET client_min_messages = warning; DROP EXTENSION IF EXISTS identity_sync CASCADE; {LEFTOVERS}"
            );
            for role in self.0 {
                sql.push_str(&format!(" DROP ROLE IF EXISTS {role};"));
            }
            if let Err(e) = c.batch_execute(&sql) {
                eprintln!("cleanup: {}", describe(&e));
            }
        }
    }
}

/// A fresh small sample in the worker's database with the table target `app` synced.
fn fresh(roles: &'static [&'static str]) -> (Cleanup, Client) {
    let cleanup = Cleanup(roles);
    let mut c = db();
    reset_with_sample(&mut c, "small", LEFTOVERS);
    exec(&mut c, SETUP);
    exec(&mut c, "SELECT identity_sync.resync('app')");
    wait_idle(&mut c, 120);
    (cleanup, c)
}

/// One mail as the SMTP server received it.
#[derive(Debug, Clone)]
struct Mail {
    rcpt: String,
    text: String,
}

/// `scripts/smtp-sink` (aiosmtpd) on a loopback port, saving mails into a directory.
struct SmtpSink {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl SmtpSink {
    fn start() -> SmtpSink {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("identity_sync-smtp-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut sink = SmtpSink {
            port,
            dir,
            child: None,
        };
        sink.resume();
        sink
    }

    /// (Re)start the server on its port; returns once it accepts connections.
    fn resume(&mut self) {
        let python = venv_dir().join("bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/setup",
            python.display()
        );
        let child = Command::new(python)
            .arg(scripts_dir().join("smtp-sink"))
            .arg(self.port.to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn scripts/smtp-sink");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "the SMTP server did not start on port {port}"
        );
    }

    /// Stop the server (connections to its port are refused until `resume`).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn mails(&self) -> Vec<Mail> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let rcpt = text
                    .lines()
                    .find_map(|l| l.strip_prefix("X-Rcpt-To: "))
                    .unwrap_or_default()
                    .to_string();
                Mail { rcpt, text }
            })
            .collect()
    }

    /// Wait until `n` mails arrived; they are returned.
    fn wait_for(&self, n: usize) -> Vec<Mail> {
        assert!(
            wait_until(PATIENCE, || self.mails().len() >= n),
            "expected {n} mails, got {:?}",
            self.mails()
        );
        self.mails()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Notices of the database, one line each, for failure messages.
fn notices(c: &mut Client) -> String {
    one::<Option<String>>(
        c,
        "SELECT string_agg(format('%s %s %s %s %s %s', id, notification, recipient, state, attempts, last_error), E'\\n' ORDER BY id)
           FROM identity_sync.notices",
    )
    .unwrap_or_default()
}

/// Every notice is sent (or skipped, or failed): nothing is waiting any more.
fn wait_notices_settled(c: &mut Client) {
    assert!(
        wait_until(PATIENCE, || {
            count(
            c,
            "SELECT count(*) FROM identity_sync.notice WHERE state IN ('pending', 'sending', 'retry')"
        ) == 0
        }),
        "notices not settled:\n{}",
        notices(c)
    );
}

fn hire(c: &mut Client, emp_no: i32, first: &str, last: &str, dept: &str) {
    exec(
        c,
        &format!(
            "BEGIN;
             INSERT INTO employee (emp_no, birth_date, first_name, last_name, gender, hire_date)
             VALUES ({emp_no}, '1990-01-01', '{first}', '{last}', 'F', current_date);
             INSERT INTO dept_emp (emp_no, dept_no, from_date, to_date) VALUES ({emp_no}, '{dept}', current_date, '9999-01-01');
             COMMIT;"
        ),
    );
}

/// Issue 16: a hire makes exactly one mail to the manager of the hire's department with the
/// planned username; a department move makes none (no rule asks for it); a vacant head of
/// department (recipients NULL) skips the message and trace says so; with the SMTP server
/// down the notice retries while provisioning goes on, and arrives when the server is back.
#[test]
fn a_hire_tells_the_manager_a_move_does_not_and_a_relay_down_only_delays_the_mail() {
    let (_cleanup, mut c) = fresh(&[]);
    let mut sink = SmtpSink::start();
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_notification('new hire', 'create',
                    recipients => $${MANAGER_MAIL}$$,
                    subject => $$format('New in %s: %s %s', (SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no),
                                        person.first_name, person.last_name)$$,
                    body => $$format('%s %s starts on %s with the username %s.', person.first_name, person.last_name,
                                     to_char(contract.from_date, 'YYYY-MM-DD'), event->'attributes'->>'user_name')$$,
                    options => '{{\"target\": \"app\", \"smtp_url\": \"{url}\", \"from\": \"identity@example.com\"}}')",
            url = sink.url()
        ),
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'add_notification' AND object = 'new hire'"),
        1,
        "the rule change is in audit_log"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.notice"),
        0,
        "the initial sync was before the rule"
    );

    hire(&mut c, 500001, "Grace", "Hopper", "d005");
    wait_idle(&mut c, 60);
    let manager: String = one(
        &mut c,
        "SELECT mail_of(emp_no) FROM dept_manager WHERE dept_no = 'd005' AND current_date BETWEEN from_date AND to_date",
    );
    let username: String = one(
        &mut c,
        "SELECT user_name FROM ntf_users WHERE emp_no = 500001",
    );
    assert_eq!(username, "grace.hopper");
    let mails = sink.wait_for(1);
    wait_notices_settled(&mut c);
    let mails_now = sink.mails();
    assert_eq!(
        mails_now.len(),
        1,
        "exactly one mail: {mails:?}\n{}",
        notices(&mut c)
    );
    assert_eq!(mails[0].rcpt, manager);
    let dept: String = one(
        &mut c,
        "SELECT dept_name FROM department WHERE dept_no = 'd005'",
    );
    assert!(
        mails[0]
            .text
            .contains(&format!("Subject: New in {dept}: Grace Hopper")),
        "{}",
        mails[0].text
    );
    assert!(
        mails[0].text.contains("starts on")
            && mails[0].text.contains("with the username grace.hopper."),
        "{}",
        mails[0].text
    );
    assert!(
        mails[0].text.contains("From: identity@example.com"),
        "{}",
        mails[0].text
    );
    let traced: i64 = one_with(
        &mut c,
        "SELECT count(*) FROM identity_sync.trace('500001') WHERE step = 'notice sent' AND detail->>'recipient' = $1",
        &[&manager],
    );
    assert_eq!(traced, 1, "trace shows the notice sent");

    // A department move: an update event, no notice.
    let mover: i32 = one(
        &mut c,
        "SELECT min(emp_no) FROM dept_emp de WHERE dept_no = 'd001' AND to_date = '9999-01-01'
            AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = de.emp_no AND x.dept_no = 'd002')",
    );
    exec(
        &mut c,
        &format!("UPDATE dept_emp SET dept_no = 'd002' WHERE emp_no = {mover} AND to_date = '9999-01-01'"),
    );
    wait_idle(&mut c, 60);
    assert_eq!(
        count(&mut c, &format!("SELECT count(*) FROM identity_sync.events WHERE person_key = '{mover}' AND kind = 'update'")),
        1,
        "the move was planned"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.notice"),
        1,
        "{}",
        notices(&mut c)
    );
    // ... unless a rule asks for it: the head of the new department is told.
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.add_notification('mover', 'update',
                    recipients => $${MANAGER_MAIL}$$,
                    subject => $$format('%s %s moves to your department', person.first_name, person.last_name)$$,
                    body => $$format('from %s to %s', event->'payload'->'previous'->>'department', contract.dept_no)$$,
                    options => '{{\"smtp_url\": \"{url}\"}}')",
            url = sink.url()
        ),
    );
    let mover2: i32 = one(
        &mut c,
        "SELECT min(emp_no) FROM dept_emp de WHERE dept_no = 'd001' AND to_date = '9999-01-01'
            AND NOT EXISTS (SELECT FROM dept_emp x WHERE x.emp_no = de.emp_no AND x.dept_no = 'd002')",
    );
    exec(
        &mut c,
        &format!("UPDATE dept_emp SET dept_no = 'd002' WHERE emp_no = {mover2} AND to_date = '9999-01-01'"),
    );
    wait_idle(&mut c, 60);
    let mails = sink.wait_for(2);
    wait_notices_settled(&mut c);
    assert_eq!(sink.mails().len(), 2, "{mails:?}");
    let d002_head: String = one(
        &mut c,
        "SELECT mail_of(emp_no) FROM dept_manager WHERE dept_no = 'd002' AND current_date BETWEEN from_date AND to_date",
    );
    assert_eq!(mails[1].rcpt, d002_head);
    assert!(
        mails[1].text.contains("from d001 to d002"),
        "{}",
        mails[1].text
    );
    exec(&mut c, "SELECT identity_sync.drop_notification('mover')");

    // A vacant head of department: the recipients are NULL, the message is skipped, trace says so.
    exec(
        &mut c,
        "DELETE FROM dept_manager WHERE dept_no = 'd009' AND to_date = '9999-01-01'",
    );
    hire(&mut c, 500002, "Ada", "Lovelace", "d009");
    wait_idle(&mut c, 60);
    let why: String = one(
        &mut c,
        "SELECT detail->>'error' FROM identity_sync.trace('500002') WHERE step = 'notice skipped'",
    );
    assert_eq!(why, "the recipients expression gave NULL");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM ntf_users WHERE emp_no = 500002"
        ),
        1
    );

    // The SMTP server is down: provisioning goes on, the notice retries and arrives later.
    sink.stop();
    hire(&mut c, 500003, "Alan", "Turing", "d005");
    wait_idle(&mut c, 60);
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM ntf_users WHERE emp_no = 500003 AND active"
        ),
        1,
        "the account is provisioned while the mail relay is down"
    );
    assert!(
        wait_until(PATIENCE, || {
            count(
            &mut c,
            "SELECT count(*) FROM identity_sync.notice x WHERE x.persons @> '{500003}' AND x.state = 'retry' AND x.attempts >= 1
                AND x.last_error IS NOT NULL"
        ) == 1
        }),
        "the notice waits for a retry:\n{}",
        notices(&mut c)
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT notices_pending FROM identity_sync.status WHERE target = 'app'"
        ),
        1,
        "status shows the notice waiting"
    );
    sink.resume();
    let mails = sink.wait_for(3);
    wait_notices_settled(&mut c);
    assert_eq!(sink.mails().len(), 3, "{mails:?}");
    assert_eq!(mails[2].rcpt, manager);
    assert!(
        mails[2].text.contains("with the username alan.turing."),
        "{}",
        mails[2].text
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.notice WHERE persons @> '{500003}' AND state = 'sent' AND attempts >= 2"),
        1,
        "{}",
        notices(&mut c)
    );
}

/// Issue 16: a self-service request makes one mail per current owner; after approve the
/// requester gets one.
#[test]
fn a_request_tells_each_owner_and_the_decision_tells_the_requester() {
    let (_cleanup, mut c) = fresh(&["ntf_emp_10017", "ntf_emp_10039", "ntf_emp_10228"]);
    let sink = SmtpSink::start();
    for emp in ["10017", "10039", "10228"] {
        exec(
            &mut c,
            &format!("DROP ROLE IF EXISTS ntf_emp_{emp}; CREATE ROLE ntf_emp_{emp} LOGIN"),
        );
    }
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.set_login($$'ntf_emp_' || person.emp_no::text$$);
             SELECT identity_sync.add_product('prod-db', 'app', '{{prod-readers}}',
                    owners => $$owner.emp_no IN (10039, 10228)$$, valid_for => '1 day');
             SELECT identity_sync.add_notification('expiring', 'grant_expiring',
                    recipients => 'mail_of(person.emp_no)',
                    subject => $$format('Your access to %s ends soon', request->>'product')$$,
                    body => $$format('It expires at %s.', request->>'expires_at')$$,
                    options => '{{\"smtp_url\": \"{url}\", \"lead_time\": \"2 days\"}}');
             SELECT identity_sync.add_notification('ask the owners', 'request_pending',
                    recipients => $$ARRAY(SELECT mail_of(o::int) FROM jsonb_array_elements_text(request->'owners') AS o)$$,
                    subject => $$format('%s %s asks for %s', person.first_name, person.last_name, request->>'product')$$,
                    body => $$format(E'Reason: %s\\nApprove in psql: SELECT identity_sync.approve(%s, ''ok'');', request->>'reason', request->>'id')$$,
                    options => '{{\"smtp_url\": \"{url}\"}}');
             SELECT identity_sync.add_notification('tell the requester', 'request_decided',
                    recipients => 'mail_of(person.emp_no)',
                    subject => $$format('Your request for %s was %s', request->>'product', request->>'state')$$,
                    body => $$format('Decided by %s: %s', mail_of((request->>'decided_by')::int), request->>'comment')$$,
                    options => '{{\"smtp_url\": \"{url}\"}}');",
            url = sink.url()
        ),
    );
    let mut requester = connect(config("postgres").user("ntf_emp_10017"));
    let id: i64 = one(
        &mut requester,
        "SELECT identity_sync.request_access('prod-db', 'quarterly report')",
    );
    assert!(
        wait_until(PATIENCE, || count(
            &mut c,
            "SELECT count(*) FROM identity_sync.notice WHERE state = 'sent'"
        ) == 2),
        "the owners' notices are sent:\n{}",
        notices(&mut c)
    );
    let mails = sink.wait_for(2);
    wait_notices_settled(&mut c);
    assert_eq!(
        sink.mails().len(),
        2,
        "one mail per current owner: {mails:?}"
    );
    let owners: std::collections::BTreeSet<String> = mails.iter().map(|m| m.rcpt.clone()).collect();
    let expected: std::collections::BTreeSet<String> = column(
        &mut c,
        "SELECT mail_of(e) FROM unnest(ARRAY[10039, 10228]) AS e",
    );
    assert_eq!(owners, expected);
    for m in &mails {
        assert!(m.text.contains("Reason: quarterly report"), "{}", m.text);
        assert!(
            m.text
                .contains(&format!("SELECT identity_sync.approve({id}, 'ok');")),
            "{}",
            m.text
        );
    }

    let mut owner = connect(config("postgres").user("ntf_emp_10039"));
    let state: String = one_with(
        &mut owner,
        "SELECT identity_sync.approve($1, 'enjoy')",
        &[&id],
    );
    assert_eq!(state, "approved");
    // The decision, and, since the grant lasts a day, within the expiring rule's lead time of
    // two days, the expiry (the worker looks every second): both to the requester, in whichever
    // order the relay receives them (they are sent side by side).
    let mails = sink.wait_for(4);
    let requester_mail: String = one(&mut c, "SELECT mail_of(10017)");
    let after: Vec<_> = mails[2..].iter().collect();
    assert!(
        after.iter().all(|m| m.rcpt == requester_mail),
        "both to the requester: {after:?}"
    );
    let decided: Vec<_> = after
        .iter()
        .filter(|m| m.text.contains("was approved"))
        .collect();
    assert_eq!(decided.len(), 1, "one decision mail: {after:?}");
    assert!(decided[0].text.contains("enjoy"), "{}", decided[0].text);
    assert_eq!(
        after
            .iter()
            .filter(|m| m.text.contains("Your access to prod-db ends soon"))
            .count(),
        1,
        "one expiry mail: {after:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    wait_notices_settled(&mut c);
    assert_eq!(sink.mails().len(), 4, "told once: {:?}", sink.mails());
    drop(requester);
    drop(owner);
}

/// Issue 16: a mass termination held by max_disables makes one target_held mail to the
/// operator list (and one signed, Slack-compatible post to their chat webhook); release makes
/// none extra.
#[test]
fn a_held_mass_termination_tells_the_operators_once() {
    let (_cleanup, mut c) = fresh(&[]);
    let sink = SmtpSink::start();
    let chat = WebhookReceiver::start();
    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let key_file =
        std::env::temp_dir().join(format!("identity_sync-ntf-key-{}", std::process::id()));
    std::fs::write(&key_file, KEY).expect("write the signing key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    exec(
        &mut c,
        &format!(
            "SELECT identity_sync.alter_target('app', options => '{{\"max_disables\": \"10%\"}}');
             SELECT identity_sync.add_notification('operators', 'target_held',
                    recipients => $$'ops@example.com, oncall@example.com'$$,
                    subject => $$format('identity_sync: target %s is held', target->>'name')$$,
                    body => $$format(E'%s %s events planned within the hour; %s allows %s.\\nDecide: SELECT identity_sync.release(%L); or discard(%L);',
                                     event->>'planned', event->>'kind', event->>'threshold', event->>'allowed',
                                     target->>'name', target->>'name')$$,
                    options => '{{\"smtp_url\": \"{url}\"}}');
             SELECT identity_sync.add_notification('operators in chat', 'target_held', $$'#identity-ops'$$,
                    $$'target ' || (target->>'name') || ' is held'$$,
                    $$format('%s %s events wait', event->>'planned', event->>'kind')$$,
                    channel => 'webhook', options => '{{\"url\": \"{hook}\", \"secret_file\": \"{key}\"}}');",
            url = sink.url(),
            hook = chat.url("/slack"),
            key = key_file.display()
        ),
    );
    let leavers = count(
        &mut c,
        "SELECT count(DISTINCT emp_no) FROM dept_emp WHERE to_date = '9999-01-01' AND dept_no IN ('d004', 'd005')",
    );
    assert!(leavers > 50, "{leavers}");
    exec(
        &mut c,
        "UPDATE dept_emp SET to_date = current_date - 1 WHERE to_date = '9999-01-01' AND dept_no IN ('d004', 'd005')",
    );
    assert!(
        wait_until(PATIENCE, || one::<String>(
            &mut c,
            "SELECT state FROM identity_sync.status WHERE target = 'app'"
        ) == "held"),
        "the target is held"
    );
    wait_idle(&mut c, 60);
    assert!(
        wait_until(PATIENCE, || count(
            &mut c,
            "SELECT count(*) FROM identity_sync.notice WHERE state = 'sent'"
        ) == 2),
        "the target_held notices are sent:\n{}",
        notices(&mut c)
    );
    let mails = sink.wait_for(1);
    wait_notices_settled(&mut c);
    assert_eq!(sink.mails().len(), 1, "one target_held mail: {mails:?}");
    assert_eq!(mails[0].rcpt, "ops@example.com, oncall@example.com");
    assert!(
        mails[0]
            .text
            .contains("Subject: identity_sync: target app is held"),
        "{}",
        mails[0].text
    );
    assert!(
        mails[0]
            .text
            .contains("disable events planned within the hour; max_disables allows"),
        "{}",
        mails[0].text
    );
    assert!(chat.wait_for(1, PATIENCE));
    let post = &chat.requests()[0];
    let json = post.json();
    assert_eq!(json["recipient"], "#identity-ops");
    let text = json["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("*target app is held*\n"), "{text}");
    assert!(text.ends_with("disable events wait"), "{text}");
    let key = identity_sync_core::webhook_sign::SigningKey::from_secret(KEY).unwrap();
    let ts: i64 = post
        .header("webhook-timestamp")
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    assert!(
        key.verify(
            post.header("webhook-id").unwrap_or_default(),
            ts,
            &post.body,
            post.header("webhook-signature").unwrap_or_default()
        ),
        "the post is signed with the key of secret_file: {:?}",
        post.headers
    );

    let released: i32 = one(&mut c, "SELECT identity_sync.release('app')");
    assert!(i64::from(released) >= leavers, "{released} < {leavers}");
    wait_idle(&mut c, 120);
    let disabled = count(&mut c, "SELECT count(*) FROM ntf_users WHERE NOT active");
    assert!(
        disabled >= leavers * 9 / 10,
        "{disabled} of {leavers} leavers disabled"
    );
    wait_notices_settled(&mut c);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.notice"),
        2,
        "{}",
        notices(&mut c)
    );
    assert_eq!(sink.mails().len(), 1, "release makes no mail");
    assert_eq!(chat.count(), 1, "release makes no post");
    let _ = std::fs::remove_file(&key_file);
}

/// Issue 16, bad input: an unknown event name, recipients that are not text or text[], a subject
/// with a typo are errors when the rule is added, with the position of the typo.
#[test]
fn bad_rules_are_refused_when_configured() {
    let (_cleanup, mut c) = fresh(&[]);
    let (code, message, _, hint) = error_parts(
        &mut c,
        "SELECT identity_sync.add_notification('x', 'hire', $$'a@example.com'$$, $$'s'$$, $$'b'$$)",
    );
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("22023", "unknown notification event \"hire\"")
    );
    assert!(hint.contains("create, update, enable"), "{hint}");
    let (code, message, _, _) = error_parts(
        &mut c,
        "SELECT identity_sync.add_notification('x', 'create', 'person.emp_no', $$'s'$$, $$'b'$$)",
    );
    assert_eq!(
        (code.as_str(), message.as_str()),
        (
            "42804",
            "recipients expression must be text or text[], not integer"
        )
    );
    let (code, message, detail, hint) = error_parts(
        &mut c,
        "SELECT identity_sync.add_notification('x', 'create', 'mail_of(person.emp_no)',
                $$format('Welcome %s', person.frist_name)$$, $$'b'$$)",
    );
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("42703", "column person.frist_name does not exist")
    );
    assert!(
        detail.starts_with("at character 22 of the expression:"),
        "{detail}"
    );
    assert!(hint.contains("person.first_name"), "{hint}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM identity_sync.notification"),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.audit_log WHERE action = 'add_notification'"
        ),
        0
    );
}
