//! Fault injection: a scripted local HTTP server returns errors, throttles, stalls and drops
//! connections; the dispatcher must classify each correctly and keep its ordering guarantees.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{failure, job, map, retry, Action, FaultServer, Harness};
use identity_sync_core::deliver::{Auth, EventKind, Outcome, TargetKind};
use serde_json::json;

fn by_event(mut outcomes: Vec<Outcome>) -> Vec<Outcome> {
    outcomes.sort_by_key(Outcome::event_id);
    outcomes
}

#[test]
fn responses_and_transport_errors_are_classified() {
    let server = FaultServer::start(|req| match req.path.as_str() {
        "/500" => Action::status(500, "boom"),
        "/503" => Action::Respond {
            status: 503,
            headers: vec![("Retry-After".into(), "Wed, 21 Oct 2015 07:28:00 GMT".into())],
            body: String::new(),
            delay: Duration::ZERO,
        },
        "/429" => Action::Respond {
            status: 429,
            headers: vec![("Retry-After".into(), "7".into())],
            body: String::new(),
            delay: Duration::ZERO,
        },
        "/408" => Action::status(408, ""),
        "/404" => Action::status(404, "{\"message\":\"no such hook\"}"),
        "/422" => Action::status(422, &"x".repeat(10_000)),
        "/drop" => Action::Drop,
        "/slow" => Action::slow(200, Duration::from_millis(1500)),
        "/302" => Action::Respond {
            status: 302,
            headers: vec![("Location".into(), "http://127.0.0.1:1/".into())],
            body: String::new(),
            delay: Duration::ZERO,
        },
        _ => Action::status(204, ""),
    });
    let paths = [
        "/500", "/503", "/429", "/408", "/404", "/422", "/drop", "/slow", "/302", "/ok",
    ];
    let mut targets = Vec::new();
    let mut jobs = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let mut t = server.webhook_target(i as i32 + 1, p);
        t.timeout = Duration::from_millis(500);
        targets.push(t);
        jobs.push(job(100 + i as i64, i as i32 + 1, "p", EventKind::Update));
    }
    // A port nobody listens on: connection refused.
    let mut refused = server.webhook_target(99, "/");
    refused.url = format!("http://127.0.0.1:{}/", common::free_port());
    targets.push(refused);
    jobs.push(job(199, 99, "p", EventKind::Update));
    jobs.push(job(200, 12345, "p", EventKind::Update)); // no such target

    let h = Harness::start(targets);
    let started = Instant::now();
    let out = by_event(h.run(jobs));
    assert!(started.elapsed() < Duration::from_secs(5));

    let (s, ra, e) = retry(&out[0]);
    assert_eq!((s, ra), (Some(500), None));
    assert!(e.contains("HTTP 500: boom"), "{e}");
    assert_eq!(
        retry(&out[1]).1,
        Some(Duration::ZERO),
        "a past HTTP-date means now"
    );
    assert_eq!(retry(&out[2]).0, Some(429));
    assert_eq!(retry(&out[2]).1, Some(Duration::from_secs(7)));
    assert_eq!(retry(&out[3]).0, Some(408));
    let (s, e) = failure(&out[4]);
    assert_eq!(s, Some(404));
    assert!(e.contains("no such hook"), "{e}");
    let (s, e) = failure(&out[5]);
    assert_eq!(s, Some(422));
    assert!(
        e.len() < 400,
        "the body excerpt is bounded: {} bytes",
        e.len()
    );
    let (s, _, e) = retry(&out[6]);
    assert_eq!(s, None);
    assert!(!e.is_empty());
    let (s, _, e) = retry(&out[7]);
    assert_eq!(s, None);
    assert!(e.contains("timed out after 500 ms"), "{e}");
    assert_eq!(failure(&out[8]).0, Some(302), "redirects are not followed");
    assert!(matches!(
        out[9],
        Outcome::Done {
            http_status: Some(204),
            ..
        }
    ));
    let (_, _, e) = retry(&out[10]);
    assert!(e.contains("connection failed"), "{e}");
    let (_, _, e) = retry(&out[11]);
    assert!(e.contains("not configured"), "{e}");

    // Every request carried its event id as the idempotency key.
    let seen = server.seen();
    assert_eq!(seen.len(), paths.len());
    for req in &seen {
        let i = paths.iter().position(|p| *p == req.path).unwrap();
        assert_eq!(
            req.header("Idempotency-Key"),
            Some((100 + i).to_string().as_str())
        );
        assert_eq!(
            req.header("webhook-id"),
            Some((100 + i).to_string().as_str())
        );
    }
    assert!(h.notified.load(Ordering::SeqCst) >= 1);
    assert_eq!(h.d().in_flight(), 0);
}

#[test]
fn one_person_in_order_others_not_held_up() {
    // Person "slow" gets a slow first response; "fast" must finish meanwhile.
    let server = FaultServer::start(|req| {
        if req.json()["id"] == 1 {
            Action::slow(200, Duration::from_millis(400))
        } else {
            Action::slow(200, Duration::from_millis(20))
        }
    });
    let h = Harness::start(vec![server.webhook_target(1, "/hook")]);
    let jobs = vec![
        job(1, 1, "slow", EventKind::Create),
        job(2, 1, "slow", EventKind::Update),
        job(3, 1, "slow", EventKind::Disable),
        job(4, 1, "fast", EventKind::Create),
    ];
    h.d().submit(jobs);
    assert_eq!(h.d().in_flight(), 4);
    let out = h.wait(4, Duration::from_secs(10));
    let order: Vec<i64> = out.iter().map(Outcome::event_id).collect();
    assert_eq!(order, vec![4, 1, 2, 3], "{out:?}");

    let seen = server.seen();
    let slow: Vec<_> = seen
        .iter()
        .filter(|r| r.json()["person_key"] == "slow")
        .collect();
    let ids: Vec<_> = slow
        .iter()
        .map(|r| r.json()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    // Job 2 was not sent before job 1's (400 ms) response: never two in flight.
    assert!(slow[1].at.duration_since(slow[0].at) >= Duration::from_millis(380));
    assert_eq!(slow[2].json()["type"], "disable");
}

#[test]
fn a_failed_event_holds_back_the_persons_later_events() {
    let server = FaultServer::start(|req| {
        if req.json()["id"] == 1 {
            Action::status(400, "bad")
        } else {
            Action::status(200, "{\"account_id\": \"acc-9\"}")
        }
    });
    let h = Harness::start(vec![server.webhook_target(1, "/")]);
    let out = by_event(h.run(vec![
        job(1, 1, "a", EventKind::Create),
        job(2, 1, "a", EventKind::Update),
        job(3, 1, "b", EventKind::Create),
    ]));
    assert_eq!(failure(&out[0]).0, Some(400));
    let (_, _, error) = retry(&out[1]);
    assert!(error.contains("earlier event 1"), "{error}");
    assert_eq!(
        out[2],
        Outcome::Done {
            event_id: 3,
            account_id: Some("acc-9".into()),
            correlated: false,
            http_status: Some(200)
        }
    );
    assert_eq!(server.seen().len(), 2, "event 2 was never sent");
}

#[test]
fn concurrency_per_target_is_bounded() {
    let server = FaultServer::start(|_| Action::slow(204, Duration::from_millis(150)));
    let mut t = server.webhook_target(1, "/");
    t.max_concurrency = 3;
    let h = Harness::start(vec![t]);
    let jobs = (0..9)
        .map(|i| job(i, 1, &format!("p{i}"), EventKind::Update))
        .collect();
    let started = Instant::now();
    let out = h.run(jobs);
    assert!(out.iter().all(|o| matches!(o, Outcome::Done { .. })));
    assert_eq!(server.max_active.load(Ordering::SeqCst), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(440),
        "three waves of 150 ms"
    );
}

#[test]
fn shutdown_returns_within_grace_with_requests_in_flight() {
    let server = FaultServer::start(|_| Action::slow(204, Duration::from_secs(5)));
    let mut h = Harness::start(vec![server.webhook_target(1, "/")]);
    h.d().submit(
        (0..4)
            .map(|i| job(i, 1, &format!("p{i}"), EventKind::Update))
            .collect(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.seen().len() < 4 {
        assert!(Instant::now() < deadline, "requests never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.d().in_flight(), 4);
    let started = Instant::now();
    let left = h
        .dispatcher
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1));
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(1050),
        "shutdown took {took:?}"
    );
    assert!(left.is_empty(), "nothing completed: {left:?}");
}

#[test]
fn shutdown_hands_back_outcomes_that_finish_in_the_grace_period() {
    let server = FaultServer::start(|_| Action::slow(204, Duration::from_millis(100)));
    let mut h = Harness::start(vec![server.webhook_target(1, "/")]);
    h.d().submit(vec![job(1, 1, "p", EventKind::Update)]);
    while server.seen().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = h
        .dispatcher
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1));
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn oauth2_token_is_cached_and_refreshed_once_on_401() {
    let token_requests = Arc::new(AtomicUsize::new(0));
    let tr = Arc::clone(&token_requests);
    let server = FaultServer::start(move |req| {
        if req.path == "/token" {
            let body = String::from_utf8_lossy(&req.body).to_string();
            if !body.contains("client_secret=cs-s3cr3t")
                || !body.contains("grant_type=client_credentials")
            {
                return Action::status(401, "{\"error\":\"invalid_client\"}");
            }
            let n = tr.fetch_add(1, Ordering::SeqCst) + 1;
            return Action::status(
                200,
                &format!("{{\"access_token\":\"t{n}\",\"expires_in\":3600}}"),
            );
        }
        // The first token is "revoked": the resource accepts only later ones.
        match req.header("Authorization") {
            Some("Bearer t1") | None => Action::status(401, ""),
            Some(_) => Action::status(204, ""),
        }
    });
    let mut t = server.webhook_target(1, "/hook");
    t.auth = Auth::OAuth2 {
        token_url: server.url("/token"),
        client_id: "cid".into(),
        client_secret: "cs-s3cr3t".into(),
        scope: Some("scim".into()),
    };
    let mut bad = t.clone();
    bad.id = 2;
    bad.auth = Auth::OAuth2 {
        token_url: server.url("/token"),
        client_id: "cid".into(),
        client_secret: "wrong-s3cr3t".into(),
        scope: None,
    };
    assert!(
        !format!("{t:?} {bad:?}").contains("s3cr3t"),
        "Debug redacts secrets"
    );
    let h = Harness::start(vec![t, bad]);

    for (event, why) in [
        (1, "one fetch, one refresh after 401"),
        (2, "the token is cached"),
    ] {
        let o = h.one(job(event, 1, "p", EventKind::Update));
        assert!(matches!(o, Outcome::Done { .. }), "{o:?}");
        assert_eq!(token_requests.load(Ordering::SeqCst), 2, "{why}");
    }

    let (status, error) = failure(&h.one(job(3, 2, "p", EventKind::Update)));
    assert_eq!(status, Some(401));
    assert!(
        error.contains("oauth2 token request") && error.contains("invalid_client"),
        "{error}"
    );
    assert!(!error.contains("s3cr3t"));
}

#[test]
fn scim_5xx_and_missing_service_provider_config() {
    // A SCIM service without /ServiceProviderConfig (404) is assumed to support PATCH; its
    // 503 on the user request is a retry.
    let server = FaultServer::start(|req| match req.path.as_str() {
        "/scim/ServiceProviderConfig" => Action::status(404, ""),
        _ => Action::status(503, "{\"detail\":\"maintenance\",\"status\":\"503\"}"),
    });
    let mut t = server.webhook_target(1, "/scim");
    t.kind = TargetKind::Scim;
    let h = Harness::start(vec![t]);
    let mut j = job(1, 1, "p", EventKind::Update);
    j.account_id = Some("u/1".into());
    j.changed = map(json!({"title": "x"}));
    let (status, _, error) = retry(&h.one(j));
    assert_eq!(status, Some(503));
    assert!(error.contains("maintenance"), "{error}");
    let seen = server.seen();
    assert_eq!(seen[1].method, "PATCH");
    assert_eq!(
        seen[1].path, "/scim/Users/u%2F1",
        "ids are escaped in the path"
    );
    assert_eq!(
        seen[1].json()["Operations"],
        json!([{"op": "replace", "path": "title", "value": "x"}])
    );
}

#[test]
fn scim_without_filter_support() {
    // A service that declares filters unsupported cannot be asked for an account by
    // correlate_on; its existing accounts are adopted by a reconcile scan instead, so a create
    // is sent as a POST rather than failed. Its groups are found in the list of all groups.
    let server = FaultServer::start(|req| match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/scim/ServiceProviderConfig") => Action::status(
            200,
            r#"{"patch": {"supported": true}, "filter": {"supported": false, "maxResults": 0}}"#,
        ),
        ("POST", "/scim/Users") => Action::status(201, r#"{"id": "new-1"}"#),
        ("GET", "/scim/Groups?startIndex=1&count=500&excludedAttributes=members") => {
            Action::status(
                200,
                r#"{"totalResults": 3, "Resources": [{"id": "g1", "displayName": "Sales"},
                                                     {"id": "g2", "displayName": "Staff"}]}"#,
            )
        }
        ("GET", "/scim/Groups?startIndex=3&count=500&excludedAttributes=members") => {
            Action::status(
                200,
                r#"{"totalResults": 3, "Resources": [{"id": "g3", "displayName": "Admins"}]}"#,
            )
        }
        ("PATCH", "/scim/Groups/g2") => Action::status(204, ""),
        _ => Action::status(500, r#"{"detail": "unexpected request"}"#),
    });
    let mut t = server.webhook_target(1, "/scim");
    t.kind = TargetKind::Scim;
    t.correlate_on = Some("externalId".into());
    let h = Harness::start(vec![t]);
    let mut create = job(1, 1, "p1", EventKind::Create);
    create.attributes = map(json!({"userName": "zoe", "externalId": "p1"}));
    create.attempt = 2;
    match h.one(create) {
        Outcome::Done {
            account_id: Some(id),
            correlated: false,
            http_status: Some(201),
            ..
        } => assert_eq!(id, "new-1"),
        other => panic!("{other:?}"),
    }
    let seen: Vec<String> = server
        .seen()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        seen,
        ["GET /scim/ServiceProviderConfig", "POST /scim/Users"],
        "no filtered search"
    );

    let mut grant = job(2, 1, "p1", EventKind::Grant);
    grant.account_id = Some("new-1".into());
    grant.group = Some("Staff".into());
    assert!(
        matches!(
            h.one(grant.clone()),
            Outcome::Done {
                http_status: Some(204),
                ..
            }
        ),
        "{:?}",
        server.seen().last()
    );
    grant.event_id = 3;
    grant.kind = EventKind::Revoke;
    assert!(matches!(h.one(grant), Outcome::Done { .. }));
    let seen: Vec<String> = server
        .seen()
        .iter()
        .skip(2)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        seen,
        [
            "GET /scim/Groups?startIndex=1&count=500&excludedAttributes=members",
            "GET /scim/Groups?startIndex=3&count=500&excludedAttributes=members",
            "PATCH /scim/Groups/g2",
            "PATCH /scim/Groups/g2",
        ],
        "the groups listed once, page by page; the id cached"
    );
}
