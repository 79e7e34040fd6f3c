//! Reconcile scans (core/src/deliver/scan.rs): against the real `scim2-server`, and against a
//! scripted server that caps pages, refuses `attributes=`, throttles, fails, and loses an
//! account from its pages.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Action, FaultServer, Harness, ScimServer};
use identity_sync_core::deliver::{
    ScanEvent, ScanRequest, ScanSummary, ScannedAccount, TargetConfig, TargetKind,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn request(run_id: i64, target: TargetConfig, paths: &[&str], groups: &[&str]) -> ScanRequest {
    ScanRequest {
        run_id,
        target,
        paths: paths.iter().map(|s| s.to_string()).collect(),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        expected: Vec::new(),
        page_size: 50,
        max_attempts: 3,
    }
}

/// The accounts of a finished scan by id (each exactly once), its group members and summary;
/// panics when it failed.
struct Scanned {
    accounts: BTreeMap<String, ScannedAccount>,
    groups: BTreeMap<String, BTreeSet<String>>,
    summary: ScanSummary,
}

fn finished(events: Vec<ScanEvent>) -> Scanned {
    let mut accounts = BTreeMap::new();
    let mut groups = BTreeMap::new();
    let mut summary = None;
    let mut groups_events = 0;
    for e in events {
        assert!(summary.is_none(), "an event after Done: {e:?}");
        match e {
            ScanEvent::Accounts { accounts: page, .. } => {
                for a in page {
                    let id = a.remote_id.clone();
                    assert!(accounts.insert(id.clone(), a).is_none(), "{id} twice");
                }
            }
            ScanEvent::Groups { members, .. } => {
                groups_events += 1;
                for g in members {
                    groups.insert(g.group, g.members.into_iter().collect());
                }
            }
            ScanEvent::Done { summary: s, .. } => summary = Some(s),
            ScanEvent::Failed { error, .. } => panic!("scan failed: {error}"),
        }
    }
    assert_eq!(groups_events, 1, "the groups come once, before Done");
    Scanned {
        accounts,
        groups,
        summary: summary.expect("the scan ended with Done"),
    }
}

fn failure(events: Vec<ScanEvent>) -> String {
    match events.last() {
        Some(ScanEvent::Failed { error, .. }) => error.clone(),
        other => panic!("expected the scan to fail, got {other:?}"),
    }
}

#[test]
fn pages_through_scim2_server_reading_only_mapped_attributes() {
    let s = ScimServer::start("tok-scan");
    let mut ids: Vec<String> = Vec::new();
    for i in 0..230 {
        let (status, u) = s
            .request(
                "POST",
                "/v2/Users",
                Some(&json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "userName": format!("user{i:03}"),
                    "externalId": format!("e{i}"),
                    "name": {"givenName": format!("G{i}"), "familyName": "F"},
                    "title": "not mapped",
                    "emails": [{"type": "home", "value": format!("{i}@home")},
                               {"type": "work", "value": format!("{i}@work")}],
                    "active": i % 7 != 0,
                })),
            )
            .unwrap();
        assert_eq!(status, 201, "{u}");
        ids.push(u["id"].as_str().unwrap().to_string());
    }
    let group = |name: &str, members: &[String]| {
        let (status, g) = s
            .request(
                "POST",
                "/v2/Groups",
                Some(&json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                    "displayName": name,
                    "members": members.iter().map(|m| json!({"value": m})).collect::<Vec<_>>(),
                })),
            )
            .unwrap();
        assert_eq!(status, 201, "{g}");
    };
    group("staff", &ids[..40]);
    group("unmanaged", &ids[40..60]);

    let mut target = s.target(1);
    target.max_concurrency = 3;
    let h = Harness::start(vec![target.clone()]);
    let paths = [
        "userName",
        "externalId",
        "name.givenName",
        "emails[type eq \"work\"].value",
    ];
    let got = finished(h.scan(request(7, target, &paths, &["staff", "absent"]), WAIT));

    assert_eq!(
        got.accounts.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "every user once"
    );
    for (i, id) in ids.iter().enumerate() {
        let a = &got.accounts[id];
        assert_eq!(
            a.identifier.as_deref(),
            Some(format!("user{i:03}").as_str())
        );
        assert_eq!(a.active, Some(i % 7 != 0));
        assert_eq!(
            Value::Object(a.attributes.clone()),
            json!({
                "userName": format!("user{i:03}"),
                "externalId": format!("e{i}"),
                "name.givenName": format!("G{i}"),
                "emails[type eq \"work\"].value": format!("{i}@work"),
            }),
            "only the mapped paths"
        );
    }
    assert_eq!(
        got.groups,
        BTreeMap::from([("staff".to_string(), ids[..40].iter().cloned().collect())]),
        "the managed groups found, with their members"
    );
    assert!(got.summary.projected, "scim2-server answers attributes=");
    assert_eq!(got.summary.paged, 230);
    assert_eq!(got.summary.found_by_id, 0);
    // 5 pages of users (50 each) and one of groups.
    assert_eq!(got.summary.requests, 6);
}

/// A scripted SCIM list endpoint over `users`: pages of at most `cap`, 400 to `attributes=`,
/// a 429 with `Retry-After: 1` the first time page 4 is asked for, and `hidden` users missing
/// from every page but there when asked for by id.
struct Scripted {
    users: Vec<Value>,
    groups: Vec<Value>,
    cap: usize,
    hidden: Vec<String>,
    throttled: Mutex<Option<Instant>>,
}

fn query(path: &str) -> BTreeMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Scripted {
    fn answer(&self, path: &str) -> Action {
        let q = query(path);
        let route = path.split('?').next().unwrap_or("");
        if q.contains_key("attributes") {
            return Action::status(
                400,
                r#"{"status":"400","scimType":"invalidValue","detail":"attributes is not supported"}"#,
            );
        }
        if let Some(id) = route.strip_prefix("/scim/Users/") {
            return match self.users.iter().find(|u| u["id"] == id) {
                Some(u) => Action::status(200, &u.to_string()),
                None => Action::status(404, r#"{"status":"404","detail":"no such user"}"#),
            };
        }
        if let Some(id) = route.strip_prefix("/scim/Groups/") {
            return match self.groups.iter().find(|g| g["id"] == id) {
                Some(g) => Action::status(200, &g.to_string()),
                None => Action::status(404, ""),
            };
        }
        let start: usize = q
            .get("startIndex")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let count: usize = q.get("count").and_then(|s| s.parse().ok()).unwrap_or(100);
        let all: Vec<Value> = match route {
            "/scim/Users" => {
                if start == 4 {
                    let mut t = self.throttled.lock().unwrap();
                    if t.is_none() {
                        *t = Some(Instant::now());
                        return Action::Respond {
                            status: 429,
                            headers: vec![("Retry-After".into(), "1".into())],
                            body: String::new(),
                            delay: Duration::ZERO,
                        };
                    }
                }
                self.users
                    .iter()
                    .filter(|u| !self.hidden.iter().any(|h| u["id"] == h.as_str()))
                    .cloned()
                    .collect()
            }
            // Groups are listed without their members.
            "/scim/Groups" => self
                .groups
                .iter()
                .map(|g| json!({"id": g["id"], "displayName": g["displayName"]}))
                .collect(),
            _ => return Action::status(404, ""),
        };
        let page: Vec<Value> = all
            .iter()
            .skip(start - 1)
            .take(count.min(self.cap))
            .cloned()
            .collect();
        Action::status(
            200,
            &json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                "totalResults": all.len(),
                "startIndex": start,
                "itemsPerPage": page.len(),
                "Resources": page,
            })
            .to_string(),
        )
    }
}

fn scripted_target(server: &FaultServer) -> TargetConfig {
    let mut t = server.webhook_target(1, "/scim");
    t.kind = TargetKind::Scim;
    t.max_concurrency = 2;
    t
}

#[test]
fn refused_attributes_capped_pages_throttling_and_lost_accounts() {
    let users: Vec<Value> = (1..=11)
        .map(|i| {
            json!({"id": format!("u{i}"), "userName": format!("n{i}"), "active": true,
                        "title": format!("t{i}"), "nickName": "not mapped"})
        })
        .collect();
    let script = Arc::new(Scripted {
        users,
        groups: vec![
            json!({"id": "g1", "displayName": "staff", "members": [{"value": "u1"}, {"value": "u5"}]}),
            json!({"id": "g2", "displayName": "other", "members": [{"value": "u2"}]}),
        ],
        cap: 3,
        hidden: vec!["u5".into()],
        throttled: Mutex::new(None),
    });
    let s2 = Arc::clone(&script);
    let server = FaultServer::start(move |req| s2.answer(&req.path));
    let target = scripted_target(&server);
    let h = Harness::start(vec![target.clone()]);
    let mut req = request(1, target, &["userName", "title"], &["staff"]);
    req.page_size = 5;
    req.expected = vec!["u1".into(), "u5".into(), "gone".into()];
    let got = finished(h.scan(req, WAIT));

    let all: BTreeSet<String> = (1..=11).map(|i| format!("u{i}")).collect();
    assert_eq!(
        got.accounts.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "every account: the one paging lost was found by id, the gone one is not made up"
    );
    assert_eq!(
        Value::Object(got.accounts["u5"].attributes.clone()),
        json!({"userName": "n5", "title": "t5"})
    );
    assert_eq!(got.summary.found_by_id, 1);
    assert_eq!(got.summary.paged, 10);
    assert!(!got.summary.projected, "attributes= was refused");
    assert_eq!(
        got.groups,
        BTreeMap::from([(
            "staff".to_string(),
            BTreeSet::from(["u1".to_string(), "u5".to_string()])
        )]),
        "a group listed without members is read by id"
    );

    let seen = server.seen();
    // The first page asked for the mapped attributes only, and again without them.
    assert!(
        seen[0]
            .path
            .contains("attributes=userName%2Cactive%2Ctitle"),
        "{}",
        seen[0].path
    );
    assert!(!seen[1].path.contains("attributes"), "{}", seen[1].path);
    // The 429 was honoured: page 4 was asked again no sooner than its Retry-After.
    let throttled_at = script
        .throttled
        .lock()
        .unwrap()
        .expect("page 4 was throttled");
    let again = seen
        .iter()
        .filter(|r| r.path.contains("startIndex=4&"))
        .map(|r| r.at)
        .max()
        .unwrap();
    assert!(again >= throttled_at + Duration::from_secs(1));
    // Never more than max_concurrency requests at once.
    assert!(server.max_active.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    assert_eq!(got.summary.requests as usize, seen.len());
}

#[test]
fn failures_end_the_scan_with_the_services_text() {
    let server = FaultServer::start(|req| {
        if req.path.starts_with("/denied") {
            Action::status(403, r#"{"status":"403","detail":"scan not allowed"}"#)
        } else {
            Action::status(503, r#"{"status":"503","detail":"maintenance"}"#)
        }
    });
    let mut denied = server.webhook_target(1, "/denied");
    denied.kind = TargetKind::Scim;
    let mut down = server.webhook_target(2, "/down");
    down.kind = TargetKind::Scim;
    let h = Harness::start(vec![denied.clone(), down.clone()]);

    let e = failure(h.scan(request(1, denied, &["userName"], &[]), WAIT));
    assert_eq!(e, "GET /Users: HTTP 403: scan not allowed");

    let mut req = request(2, down, &["userName"], &[]);
    req.max_attempts = 2;
    let e = failure(h.scan(req, WAIT));
    assert_eq!(
        e,
        "gave up after 2 attempts: GET /Users: HTTP 503: maintenance"
    );
    let webhook = server.webhook_target(3, "/hook");
    let e = failure(h.scan(request(3, webhook, &["userName"], &[]), WAIT));
    assert!(e.contains("is not a scim target"), "{e}");
}

#[test]
fn pages_larger_than_max_response_bytes_are_asked_for_in_halves() {
    // 12 users of about 300 bytes each; the target takes 1,000 bytes a response at most, so a
    // page of 5 is too large: the scan halves its pages (to 2) until they fit.
    let users: Vec<Value> = (1..=12)
        .map(|i| json!({"id": format!("u{i}"), "userName": format!("n{i}"), "title": "x".repeat(250)}))
        .collect();
    let script = Arc::new(Scripted {
        users,
        groups: Vec::new(),
        cap: 100,
        hidden: Vec::new(),
        throttled: Mutex::new(Some(Instant::now())), // no 429 in this test
    });
    let s2 = Arc::clone(&script);
    let server = FaultServer::start(move |req| s2.answer(&req.path));
    let mut target = scripted_target(&server);
    target.max_response_bytes = 1000;
    let h = Harness::start(vec![target.clone()]);
    let mut req = request(1, target.clone(), &["userName"], &[]);
    req.page_size = 5;
    let got = finished(h.scan(req, WAIT));
    assert_eq!(
        got.accounts.keys().cloned().collect::<BTreeSet<_>>(),
        (1..=12).map(|i| format!("u{i}")).collect::<BTreeSet<_>>()
    );
    let counts: BTreeSet<String> = server
        .seen()
        .iter()
        .filter_map(|r| query(&r.path).get("count").cloned())
        .collect();
    assert!(counts.contains("5") && counts.contains("2"), "{counts:?}");

    // One user larger than the limit: the scan fails and says what to do.
    target.max_response_bytes = 200;
    let e = failure(h.scan(request(2, target, &["userName"], &[]), WAIT));
    assert!(
        e.contains("max_response_bytes") && e.contains("raise the target option"),
        "{e}"
    );
}
