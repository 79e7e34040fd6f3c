//! End-to-end acceptance tests of self-service access requests (issue 8): employees log in with
//! their own PostgreSQL roles, request products, and the owners that HR data names approve; the
//! worker provisions the groups to the third-party scim2-server and takes them away again on
//! expiry and revoke.
//!
//! The test runs in a preloaded cluster of its own (`scripts/cluster start selfservice`, worker
//! on database `hr`): login roles are cluster-wide and the test moves identity_sync's clock, so
//! it must not share the harness cluster with other tests. Every wait is for an outcome
//! (`wait_until`), never a measured time.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use postgres::error::SqlState;
use std::collections::BTreeSet;
use std::time::Duration;

/// Long enough for a slow CI machine; the waits end as soon as the outcome is there.
const PATIENCE: Duration = Duration::from_secs(60);

/// The sample's department d001: 10039 heads it now (dept_manager up to 9999-01-01), 10002
/// headed it until 1991 and works in d007 now, 10017 and 10058 work in it.
const REQUESTER: &str = "10017";
const MANAGER: &str = "10039";
const COLLEAGUE: &str = "10058";
const FORMER_MANAGER: &str = "10002";

const HEAD_OF_DEPARTMENT: &str = "EXISTS (SELECT FROM dept_manager m \
     WHERE m.emp_no = owner.emp_no AND m.dept_no = requester_contract.dept_no \
       AND today BETWEEN m.from_date AND m.to_date)";

/// A session of employee `emp_no`, logged in with its own role `emp_<emp_no>`.
fn login(cluster: &Cluster, emp_no: &str) -> Client {
    let mut config = cluster.config("hr");
    config.user(&format!("emp_{emp_no}"));
    connect(&config)
}

fn set(ids: &[i64]) -> BTreeSet<i64> {
    ids.iter().copied().collect()
}

/// Approving `request_id` as `who` fails with insufficient_privilege; returns the message.
fn approve_is_refused(who: &mut Client, request_id: i64) -> String {
    let err = who
        .query_one("SELECT identity_sync.approve($1, 'let me')", &[&request_id])
        .expect_err("approve() must refuse");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    assert_eq!(
        db.code(),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "approve({request_id}) must be a permission error, got {}",
        describe(&err)
    );
    db.message().to_string()
}

/// The sample data, the extension, a SCIM target for the current staff of d001, the login
/// expression, two products and the employees' login roles.
fn setup(cluster: &Cluster, scim: &ScimServer) -> Client {
    let mut admin = cluster.client("postgres");
    exec(&mut admin, "CREATE DATABASE hr");
    cluster.load_employees("hr", "small");
    for emp in [REQUESTER, MANAGER, COLLEAGUE, FORMER_MANAGER] {
        exec(&mut admin, &format!("CREATE ROLE emp_{emp} LOGIN"));
    }

    let mut hr = cluster.client("hr");
    exec(
        &mut hr,
        &format!(
            "SET client_min_messages = warning;
             CREATE EXTENSION identity_sync; {EVALUATOR_GRANTS}
             SELECT identity_sync.add_person_source('employee', 'emp_no');
             SELECT identity_sync.add_contract_source('dept_emp', 'emp_no', 'from_date', 'to_date');
             SELECT identity_sync.add_target('scim', 'scim', '{url}',
                    '{{\"auth\": \"bearer\", \"correlate_on\": \"externalId\", \"create_groups\": true}}');
             SELECT identity_sync.set_secret('scim', '{token}');
             SELECT identity_sync.map('scim', 'userName', $$identity_sync.slug(person.first_name || '.' || person.last_name)
                    || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$, true, true);
             SELECT identity_sync.map('scim', 'externalId', $$person.emp_no::text$$);
             SELECT identity_sync.add_rule('scim', 'd001', $$contract.dept_no = 'd001' AND contract.to_date >= today$$, '{{d001}}');
             SELECT identity_sync.set_login($$'emp_' || person.emp_no::text$$);
             SELECT identity_sync.add_product('vpn', 'scim', '{{vpn-users}}', $${owners}$$,
                    description => 'Remote access');
             SELECT identity_sync.add_product('share', 'scim', '{{project-x}}', $${owners}$$,
                    valid_for => '1 day', description => 'Project X share');
             SELECT identity_sync.resync('scim');",
            url = scim.base_url(),
            token = scim.token(),
            owners = HEAD_OF_DEPARTMENT
        ),
    );
    wait_idle(&mut hr, 120); // the initial sync
    hr
}

/// Issue 8, all acceptance criteria in one story (they build on each other's state):
/// approval by the head of department from dept_manager reaching scim2-server; permission
/// errors for a colleague, the requester and a former head; expiry with the clock moved
/// forward; revoke; my_requests / my_approvals per login; the audit trail.
#[test]
fn self_service_requests_are_approved_by_owners_from_hr_data() {
    let cluster = Cluster::start(
        "selfservice",
        true,
        &[
            "identity_sync.database = 'hr'",
            "identity_sync.naptime = '100ms'",
        ],
    );
    let scim = ScimServer::start();
    let mut hr = setup(&cluster, &scim);
    let uid: String = one_with(
        &mut hr,
        "SELECT remote_id FROM identity_sync.accounts WHERE target = 'scim' AND person_key = $1 AND state = 'active'",
        &[&REQUESTER],
    );
    assert!(scim.users().iter().any(|u| u["id"] == uid.as_str()));

    let mut requester = login(&cluster, REQUESTER);
    let mut manager = login(&cluster, MANAGER);
    let mut colleague = login(&cluster, COLLEAGUE);
    let mut former = login(&cluster, FORMER_MANAGER);
    assert_eq!(
        one::<String>(&mut requester, "SELECT identity_sync.current_person()"),
        REQUESTER
    );

    // --- The employee requests the VPN; others cannot approve it ------------------------------
    let vpn: i64 = one(
        &mut requester,
        "SELECT identity_sync.request_access('vpn', 'working from home')",
    );
    let msg = approve_is_refused(&mut colleague, vpn);
    assert!(
        msg.contains("permission denied to approve"),
        "colleague: {msg}"
    );
    let msg = approve_is_refused(&mut requester, vpn);
    assert!(msg.contains("your own request"), "requester: {msg}");
    let msg = approve_is_refused(&mut former, vpn);
    assert!(
        msg.contains("permission denied to approve"),
        "former manager: {msg}"
    );
    assert_eq!(
        one_with::<String>(
            &mut hr,
            "SELECT state FROM identity_sync.request WHERE id = $1",
            &[&vpn]
        ),
        "pending",
        "refused approvals must leave the request pending"
    );

    // --- The head of the requester's department approves: the group reaches the target --------
    assert_eq!(
        column::<i64, BTreeSet<_>>(
            &mut manager,
            "SELECT request_id FROM identity_sync.my_approvals WHERE can_decide"
        ),
        set(&[vpn])
    );
    assert_eq!(
        one_with::<String>(
            &mut manager,
            "SELECT identity_sync.approve($1, 'ok')",
            &[&vpn]
        ),
        "approved"
    );
    assert!(
        wait_until(PATIENCE, || scim.group_members("vpn-users").contains(&uid)),
        "the requester's user never became a member of vpn-users in scim2-server; groups: {}",
        scim.get_json("/Groups")
    );
    assert!(
        wait_until(PATIENCE, || {
            one_with::<Option<String>>(
                &mut requester,
                "SELECT grant_status FROM identity_sync.my_requests WHERE request_id = $1",
                &[&vpn],
            )
            .as_deref()
                == Some("granted")
        }),
        "my_requests never showed the grant as granted"
    );

    // --- Owners are computed when deciding: a head who left yesterday cannot approve today -----
    let colleague_vpn: i64 = one(
        &mut colleague,
        "SELECT identity_sync.request_access('vpn', 'me too')",
    );
    exec(
        &mut hr,
        &format!(
            "UPDATE dept_manager SET to_date = current_date - 1 WHERE emp_no = {MANAGER} AND dept_no = 'd001'"
        ),
    );
    let msg = approve_is_refused(&mut manager, colleague_vpn);
    assert!(msg.contains("permission denied to approve"), "{msg}");
    exec(
        &mut hr,
        &format!(
            "UPDATE dept_manager SET to_date = '9999-01-01' WHERE emp_no = {MANAGER} AND dept_no = 'd001'"
        ),
    );

    // --- valid_for = '1 day': with the clock two days on, the worker revokes the grant ---------
    let share: i64 = one(
        &mut requester,
        "SELECT identity_sync.request_access('share', 'project x')",
    );
    assert_eq!(
        one_with::<String>(&mut manager, "SELECT identity_sync.approve($1)", &[&share]),
        "approved"
    );
    assert!(
        wait_until(PATIENCE, || scim.group_members("project-x").contains(&uid)),
        "project-x was never granted"
    );
    exec(
        &mut hr,
        "SELECT identity_sync.set_clock(now() + interval '2 days')",
    );
    assert!(
        wait_until(PATIENCE, || !scim.group_members("project-x").contains(&uid)),
        "the expired grant was not revoked in scim2-server"
    );
    // The worker records the removal after scim2-server answered: wait for the record too.
    let mut shown = String::new();
    assert!(
        wait_until(PATIENCE, || {
            shown = one_with(
                &mut requester,
                "SELECT state || '/' || grant_status FROM identity_sync.my_requests WHERE request_id = $1",
                &[&share],
            );
            shown == "expired/removed"
        }),
        "my_requests never showed the expired grant as expired/removed (shows {shown})"
    );
    assert!(
        scim.group_members("vpn-users").contains(&uid),
        "the VPN grant has no validity limit and must survive the expiry of the other grant"
    );

    // --- Each login sees only its own rows -----------------------------------------------------
    let mine = "SELECT request_id FROM identity_sync.my_requests";
    let to_decide = "SELECT request_id FROM identity_sync.my_approvals";
    let raw = "SELECT id FROM identity_sync.request";
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut requester, mine),
        set(&[vpn, share])
    );
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut requester, to_decide),
        set(&[])
    );
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut requester, raw),
        set(&[vpn, share])
    );
    assert_eq!(column::<i64, BTreeSet<_>>(&mut manager, mine), set(&[]));
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut manager, to_decide),
        set(&[vpn, share, colleague_vpn])
    );
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut manager, raw),
        set(&[vpn, share, colleague_vpn])
    );
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut colleague, mine),
        set(&[colleague_vpn])
    );
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut colleague, to_decide),
        set(&[])
    );
    assert_eq!(
        column::<i64, BTreeSet<_>>(&mut colleague, raw),
        set(&[colleague_vpn])
    );
    assert_eq!(column::<i64, BTreeSet<_>>(&mut former, mine), set(&[]));
    assert_eq!(column::<i64, BTreeSet<_>>(&mut former, to_decide), set(&[]));
    assert_eq!(
        one::<i64>(&mut hr, "SELECT count(*) FROM identity_sync.request"),
        3
    );
    let denied = colleague
        .batch_execute("UPDATE identity_sync.request SET state = 'approved'")
        .expect_err("a login must not write requests");
    assert_eq!(
        denied.as_db_error().map(|d| d.code()),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE)
    );

    // --- Revoke: the requester gives the VPN back; the membership goes ---------------------------
    assert_eq!(
        one_with::<String>(&mut requester, "SELECT identity_sync.revoke($1)", &[&vpn]),
        "revoked"
    );
    assert!(
        wait_until(PATIENCE, || !scim.group_members("vpn-users").contains(&uid)),
        "the revoked grant was not removed in scim2-server"
    );

    // --- The audit trail: every request, decision and expiry, with who -------------------------
    let trail: Vec<(String, String, String)> = hr
        .query(
            "SELECT actor, action, object FROM identity_sync.audit_log \
             WHERE object LIKE 'request %' AND at IS NOT NULL ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expect = |actor: &str, action: &str, id: i64| {
        (
            actor.to_string(),
            action.to_string(),
            format!("request {id}"),
        )
    };
    for entry in [
        expect("emp_10017", "request_access", vpn),
        expect("emp_10039", "approve", vpn),
        expect("emp_10058", "request_access", colleague_vpn),
        expect("emp_10017", "request_access", share),
        expect("emp_10039", "approve", share),
        expect("identity_sync", "expire", share),
        expect("emp_10017", "revoke", vpn),
    ] {
        assert!(
            trail.contains(&entry),
            "audit_log lacks {entry:?}; it has {trail:#?}"
        );
    }

    drop((requester, manager, colleague, former, hr));
    drop(cluster);
}
