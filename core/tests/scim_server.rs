//! Delivery against a real third-party SCIM service: `scim2-server` from the project's venv.

mod common;

use common::{failure, job, map, Harness, ScimServer};
use identity_sync_core::deliver::{Auth, EventKind, Job, Outcome};
use serde_json::{json, Value};

const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

fn done_id(o: &Outcome) -> String {
    match o {
        Outcome::Done {
            account_id: Some(id),
            ..
        } => id.clone(),
        other => panic!("expected done with an account id, got {other:?}"),
    }
}

/// A create of `person` in target `target_id` with these attributes.
fn create_job(event_id: i64, target_id: i32, person: &str, attributes: Value) -> Job {
    let mut j = job(event_id, target_id, person, EventKind::Create);
    j.attributes = map(attributes);
    j
}

/// The account id of a create that found an existing account (correlate_on) instead of making one.
fn correlated_id(o: &Outcome) -> String {
    assert!(
        matches!(
            o,
            Outcome::Done {
                correlated: true,
                ..
            }
        ),
        "expected a correlated create, got {o:?}"
    );
    done_id(o)
}

fn user_count(s: &ScimServer) -> u64 {
    s.get("/v2/Users").1["totalResults"].as_u64().unwrap()
}

#[test]
fn user_lifecycle_create_update_disable_enable_delete() {
    let s = ScimServer::start("tok-lifecycle");
    let h = Harness::start(vec![s.target(1)]);

    let create = create_job(
        1,
        1,
        "p1",
        json!({
            "userName": "zoe.berg",
            "externalId": "p1",
            "name.givenName": "Zoë",
            "name.familyName": "Berg",
            "emails[type eq \"work\"].value": "zoe@example.org",
            format!("{ENT}:department"): "IT",
            format!("{ENT}:manager.value"): "m-1",
            "title": null,
            "active": false,
        }),
    );
    let created = h.one(create.clone());
    let id = done_id(&created);
    assert!(matches!(
        created,
        Outcome::Done {
            correlated: false,
            http_status: Some(201),
            ..
        }
    ));
    let (st, u) = s.get(&format!("/v2/Users/{id}"));
    assert_eq!(st, 200);
    assert_eq!(u["userName"], "zoe.berg");
    assert_eq!(u["name"]["givenName"], "Zoë");
    assert_eq!(
        u["emails"],
        json!([{"type": "work", "value": "zoe@example.org"}])
    );
    assert_eq!(u[ENT]["department"], "IT");
    assert_eq!(u[ENT]["manager"]["value"], "m-1");
    assert_eq!(u["active"], false);
    assert!(u["schemas"].as_array().unwrap().contains(&json!(ENT)));
    assert!(u.get("title").is_none());

    // Update: a plain replace, a new multi-valued element, a changed one, and a removal.
    let mut update = job(2, 1, "p1", EventKind::Update);
    update.account_id = Some(id.clone());
    update.previous = create.attributes.clone();
    update.changed = map(json!({
        "name.givenName": "Zoe",
        "emails[type eq \"work\"].value": "zoe.berg@example.org",
        "emails[type eq \"home\"].value": "zoe@home.example",
        format!("{ENT}:department"): null,
    }));
    let o = h.one(update);
    assert!(
        matches!(
            o,
            Outcome::Done {
                http_status: Some(204),
                ..
            }
        ),
        "{o:?}"
    );
    let (_, u) = s.get(&format!("/v2/Users/{id}"));
    assert_eq!(u["name"]["givenName"], "Zoe");
    let emails = u["emails"].as_array().unwrap();
    assert_eq!(emails.len(), 2, "{emails:?}");
    assert!(emails.contains(&json!({"type": "work", "value": "zoe.berg@example.org"})));
    assert!(emails.contains(&json!({"type": "home", "value": "zoe@home.example"})));
    assert!(u[ENT].get("department").is_none(), "{u}");
    assert_eq!(u[ENT]["manager"]["value"], "m-1");

    for (event, kind, active) in [(3, EventKind::Enable, true), (4, EventKind::Disable, false)] {
        let mut j = job(event, 1, "p1", kind);
        j.account_id = Some(id.clone());
        assert_eq!(done_id(&h.one(j)), id);
        assert_eq!(s.get(&format!("/v2/Users/{id}")).1["active"], active);
    }

    let mut delete = job(5, 1, "p1", EventKind::Delete);
    delete.account_id = Some(id.clone());
    assert!(matches!(
        h.one(delete.clone()),
        Outcome::Done {
            http_status: Some(204),
            ..
        }
    ));
    assert_eq!(s.get(&format!("/v2/Users/{id}")).0, 404);
    // Deleting again (a retry after a lost reply) finds it gone: that is success too.
    delete.event_id = 6;
    assert!(matches!(
        h.one(delete),
        Outcome::Done {
            http_status: Some(404),
            ..
        }
    ));
}

#[test]
fn correlation_links_an_existing_account_and_brings_it_up_to_date() {
    let s = ScimServer::start("tok-correlate");
    let (st, existing) = s
        .request(
            "POST",
            "/v2/Users",
            Some(&json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "old.name", "externalId": "E\"7\\x", "title": "Clerk",
                "name": {"givenName": "Old"}
            })),
        )
        .unwrap();
    assert_eq!(st, 201);
    let mut target = s.target(1);
    target.correlate_on = Some("externalId".to_string());
    let h = Harness::start(vec![target]);

    let create = create_job(
        1,
        1,
        "p7",
        json!({
            "userName": "new.name",
            // A quote and a backslash: the filter value must be escaped (RFC 7644 §3.4.2.2).
            "externalId": "E\"7\\x",
            "name.givenName": "New",
            "title": null,
            "emails[type eq \"work\"].value": "n@example.org",
            "active": true,
        }),
    );
    let id = correlated_id(&h.one(create));
    assert_eq!(id, existing["id"].as_str().unwrap());
    assert_eq!(user_count(&s), 1, "no second account");
    let (_, u) = s.get(&format!("/v2/Users/{id}"));
    assert_eq!(u["userName"], "new.name");
    assert_eq!(u["name"]["givenName"], "New");
    assert!(u.get("title").is_none(), "{u}");
    assert_eq!(
        u["emails"],
        json!([{"type": "work", "value": "n@example.org"}])
    );

    // No match: a normal create.
    let other = create_job(2, 1, "p8", json!({"userName": "p8", "externalId": "p8"}));
    assert!(matches!(
        h.one(other),
        Outcome::Done {
            correlated: false,
            http_status: Some(201),
            ..
        }
    ));
    assert_eq!(user_count(&s), 2);
}

#[test]
fn a_retried_create_whose_reply_was_lost_is_linked_by_external_id() {
    let s = ScimServer::start("tok-retry");
    let h = Harness::start(vec![s.target(1)]);
    let mut create = create_job(1, 1, "p1", json!({"userName": "r1", "externalId": "p1"}));
    let first = done_id(&h.one(create.clone()));
    create.attempt = 2;
    assert_eq!(correlated_id(&h.one(create)), first);
    assert_eq!(user_count(&s), 1);
}

#[test]
fn uniqueness_conflict_on_create() {
    let s = ScimServer::start("tok-conflict");
    let h = Harness::start(vec![s.target(1)]);
    let a = create_job(1, 1, "a", json!({"userName": "jdoe"}));
    done_id(&h.one(a));
    let b = create_job(2, 1, "b", json!({"userName": "JDoe"}));
    match h.one(b) {
        Outcome::Conflict { event_id: 2, error } => {
            assert!(
                error.contains("409") && error.contains("uniqueness"),
                "{error}"
            )
        }
        other => panic!("expected conflict, got {other:?}"),
    }
}

#[test]
fn group_membership_grant_and_revoke() {
    let s = ScimServer::start("tok-groups");
    let strict = s.target(1);
    let mut creating = s.target(2);
    creating.create_groups = true;
    let h = Harness::start(vec![strict, creating]);

    let create = create_job(1, 2, "p1", json!({"userName": "g1"}));
    let id = done_id(&h.one(create));

    let mut grant = job(2, 1, "p1", EventKind::Grant);
    grant.account_id = Some(id.clone());
    grant.group = Some("Staff \"A\"".to_string());
    let (_, error) = failure(&h.one(grant.clone()));
    assert!(
        error.contains("does not exist in target \"scim1\""),
        "{error}"
    );

    grant.target_id = 2;
    grant.event_id = 3;
    assert_eq!(done_id(&h.one(grant.clone())), id);
    let (_, groups) = s.get("/v2/Groups");
    assert_eq!(groups["totalResults"], 1);
    let gid = groups["Resources"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(groups["Resources"][0]["displayName"], "Staff \"A\"");
    let members =
        |s: &ScimServer| -> Value { s.get(&format!("/v2/Groups/{gid}")).1["members"].clone() };
    assert_eq!(members(&s), json!([{"value": id}]));

    // Granting again is harmless, and the cached group id is used (no second group).
    grant.event_id = 4;
    done_id(&h.one(grant.clone()));
    assert_eq!(members(&s), json!([{"value": id}]));
    assert_eq!(s.get("/v2/Groups").1["totalResults"], 1);

    // The strict target finds the group now that it exists.
    grant.target_id = 1;
    grant.event_id = 5;
    done_id(&h.one(grant.clone()));

    let mut revoke = grant.clone();
    revoke.kind = EventKind::Revoke;
    revoke.event_id = 6;
    done_id(&h.one(revoke.clone()));
    let m = members(&s);
    assert!(m.is_null() || m == json!([]), "{m}");

    // Revoking a group that does not exist: not a member, so done.
    revoke.event_id = 7;
    revoke.group = Some("Nobody".to_string());
    assert!(matches!(
        h.one(revoke),
        Outcome::Done {
            http_status: None,
            ..
        }
    ));
}

#[test]
fn a_stale_previous_state_is_repaired_after_no_target() {
    let s = ScimServer::start("tok-notarget");
    let h = Harness::start(vec![s.target(1)]);
    let create = create_job(1, 1, "p1", json!({"userName": "nt"}));
    let id = done_id(&h.one(create));
    // We believe a work e-mail exists; the target has none, so the in-place replace fails
    // with noTarget and the sender must re-read the account and add the element instead.
    let mut update = job(2, 1, "p1", EventKind::Update);
    update.account_id = Some(id.clone());
    update.previous = map(json!({"userName": "nt", "emails[type eq \"work\"].value": "old@x"}));
    update.changed = map(json!({"emails[type eq \"work\"].value": "new@x"}));
    let o = h.one(update);
    assert!(matches!(o, Outcome::Done { .. }), "{o:?}");
    assert_eq!(
        s.get(&format!("/v2/Users/{id}")).1["emails"],
        json!([{"type": "work", "value": "new@x"}])
    );
}

#[test]
fn wrong_bearer_token_fails_with_401_and_no_secret_in_the_error() {
    let s = ScimServer::start("right-token");
    let mut target = s.target(1);
    target.auth = Auth::Bearer {
        token: "wrong-token-s3cr3t".into(),
    };
    let h = Harness::start(vec![target]);
    let create = create_job(1, 1, "p1", json!({"userName": "x"}));
    let (status, error) = failure(&h.one(create));
    assert_eq!(status, Some(401));
    assert!(error.contains("Authorization failure"), "{error}");
    assert!(!error.contains("s3cr3t"));
    assert_eq!(user_count(&s), 0);
}

#[test]
fn jobs_without_an_account_id_fail_clearly() {
    let s = ScimServer::start("tok-noid");
    let h = Harness::start(vec![s.target(1)]);
    let (_, error) = failure(&h.one(job(1, 1, "p1", EventKind::Disable)));
    assert!(error.contains("no account id"), "{error}");
    // A delete of an account never created is trivially done.
    assert!(matches!(
        h.one(job(2, 1, "p2", EventKind::Delete)),
        Outcome::Done {
            account_id: None,
            ..
        }
    ));
}

#[test]
fn without_patch_support_users_and_groups_are_replaced_with_put() {
    // scim2-server enforces what its ServiceProviderConfig announces: PATCH answers 501.
    let spc = std::env::temp_dir().join(format!("idsync-spc-{}.json", std::process::id()));
    std::fs::write(
        &spc,
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
            "patch": {"supported": false},
            "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": true, "maxResults": 100},
            "changePassword": {"supported": false},
            "sort": {"supported": false},
            "etag": {"supported": false},
            "authenticationSchemes": []
        })
        .to_string(),
    )
    .unwrap();
    let s = ScimServer::start_with(
        "tok-nopatch",
        &["--service-provider-config", spc.to_str().unwrap()],
    );
    let mut target = s.target(1);
    target.create_groups = true;
    let h = Harness::start(vec![target]);

    let create = create_job(
        1,
        1,
        "p1",
        json!({
            "userName": "np", "title": "Clerk", "emails[type eq \"work\"].value": "w@x"
        }),
    );
    let id = done_id(&h.one(create.clone()));
    // Something else manages nickName: a PUT must not wipe it.
    let (_, mut u) = s.get(&format!("/v2/Users/{id}"));
    u["nickName"] = json!("Zo");
    assert_eq!(
        s.request("PUT", &format!("/v2/Users/{id}"), Some(&u))
            .unwrap()
            .0,
        200
    );

    let mut update = job(2, 1, "p1", EventKind::Update);
    update.account_id = Some(id.clone());
    update.previous = create.attributes.clone();
    update.changed = map(json!({"title": null, "emails[type eq \"home\"].value": "h@x"}));
    assert!(matches!(
        h.one(update),
        Outcome::Done {
            http_status: Some(200),
            ..
        }
    ));
    let mut disable = job(3, 1, "p1", EventKind::Disable);
    disable.account_id = Some(id.clone());
    done_id(&h.one(disable));
    let (_, u) = s.get(&format!("/v2/Users/{id}"));
    assert_eq!(u["active"], false);
    assert_eq!(u["nickName"], "Zo");
    assert!(u.get("title").is_none(), "{u}");
    assert_eq!(u["emails"].as_array().unwrap().len(), 2, "{u}");

    let mut grant = job(4, 1, "p1", EventKind::Grant);
    grant.account_id = Some(id.clone());
    grant.group = Some("NoPatch".into());
    done_id(&h.one(grant.clone()));
    let (_, groups) = s.get("/v2/Groups");
    let gid = groups["Resources"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.get(&format!("/v2/Groups/{gid}")).1["members"],
        json!([{"value": id}])
    );
    grant.kind = EventKind::Revoke;
    grant.event_id = 5;
    done_id(&h.one(grant));
    let m = s.get(&format!("/v2/Groups/{gid}")).1["members"].clone();
    assert!(m.is_null() || m == json!([]), "{m}");
    let _ = std::fs::remove_file(spc);
}
