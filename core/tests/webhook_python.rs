//! Our Standard Webhooks signatures, checked by an independent implementation: the
//! `standardwebhooks` package from PyPI, run with the project venv's python3.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{failure, job, map, Action, FaultServer, Harness};
use identity_sync_core::deliver::{EventKind, Outcome};
use identity_sync_core::webhook_sign as webhook;
use serde_json::{json, Value};

/// Runs `standardwebhooks.Webhook(secret).verify(body, headers)` in Python; returns its output.
fn python_verify(secret: &str, body: &[u8], headers: &[(&str, &str)]) -> String {
    let python = common::venv_bin("python3");
    let dir = std::env::temp_dir().join(format!("idsync-wh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body_file = dir.join(format!("body-{}", rand_suffix()));
    std::fs::write(&body_file, body).unwrap();
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, body_file, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
body = open(body_file, "rb").read()
try:
    Webhook(secret).verify(body, headers)
    print("verified")
except Exception as e:
    print("rejected:", type(e).__name__, e)
"#;
    let out = Command::new(python)
        .args(["-c", script, secret])
        .arg(&body_file)
        .arg(Value::Object(headers).to_string())
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&body_file);
    assert!(
        out.status.success(),
        "python failed (is standardwebhooks installed? run the project setup): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn rand_suffix() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn python_reference_library_verifies_our_signatures() {
    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let body = "{\"name\":\"Zoë Ångström\",\"n\":[1,2,3]}".as_bytes();
    let ts = now();
    let sig = webhook::sign(secret, "evt_42", ts, body).unwrap();
    let ts_s = ts.to_string();
    let headers = [
        ("webhook-id", "evt_42"),
        ("webhook-timestamp", ts_s.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    assert_eq!(python_verify(secret, body, &headers), "verified");
    // The same secret without the prefix is the same key for the reference library too.
    assert_eq!(
        python_verify("C2FVsBQIhrscChlQIMV+b5sSYspob7oD", body, &headers),
        "verified"
    );
    // And it does reject a tampered body: the check above can fail.
    assert!(python_verify(secret, b"{}", &headers).starts_with("rejected"));
}

#[test]
fn delivered_webhooks_verify_with_the_reference_library() {
    let server = FaultServer::start(|_| Action::status(202, ""));
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut target = server.webhook_target(1, "/hooks/identity");
    target.signing_secret = Some(secret.into());
    let mut unsigned = server.webhook_target(2, "/hooks/unsigned");
    unsigned.signing_secret = None;
    let mut broken = server.webhook_target(3, "/hooks/broken");
    broken.signing_secret = Some("whsec_***".into());
    let h = Harness::start(vec![target, unsigned, broken]);

    let mut j = job(77, 1, "p-1", EventKind::Grant);
    j.account_id = Some("acc-1".into());
    j.attributes = map(json!({"userName": "zoe", "active": true}));
    j.group = Some("Staff".into());
    j.groups = vec!["Staff".into(), "VPN".into()];
    let mut j2 = j.clone();
    j2.event_id = 78;
    j2.target_id = 2;
    let mut j3 = j.clone();
    j3.event_id = 79;
    j3.target_id = 3;
    let mut out = h.run(vec![j, j2, j3]);
    out.sort_by_key(Outcome::event_id);
    assert_eq!(
        out[0],
        Outcome::Done {
            event_id: 77,
            account_id: Some("acc-1".into()),
            correlated: false,
            http_status: Some(202)
        }
    );
    assert!(matches!(out[1], Outcome::Done { .. }));
    let (_, error) = failure(&out[2]);
    assert!(error.contains("not valid base64"), "{error}");
    assert!(!error.contains("***"));

    let seen = server.seen();
    assert_eq!(seen.len(), 2, "the event with a broken secret is not sent");
    let signed = seen.iter().find(|r| r.path == "/hooks/identity").unwrap();
    assert_eq!(signed.method, "POST");
    assert_eq!(signed.header("content-type"), Some("application/json"));
    assert_eq!(signed.header("webhook-id"), Some("77"));
    let ts: i64 = signed.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!((now() - ts).abs() < 60);
    let body = signed.json();
    assert_eq!(body["id"], 77);
    assert_eq!(body["type"], "grant");
    assert_eq!(body["target"], "hook1");
    assert_eq!(body["person_key"], "p-1");
    assert_eq!(body["account_id"], "acc-1");
    assert_eq!(body["group"], "Staff");
    assert_eq!(body["groups"], json!(["Staff", "VPN"]));
    assert_eq!(
        body["attributes"],
        json!({"userName": "zoe", "active": true})
    );
    assert_eq!(body["occurred_at"], "2026-01-01T00:00:00Z");
    for key in ["changed", "previous"] {
        assert_eq!(body[key], json!({}));
    }
    let headers: Vec<(&str, &str)> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|k| (*k, signed.header(k).unwrap()))
        .collect();
    assert_eq!(python_verify(secret, &signed.body, &headers), "verified");

    let plain = seen.iter().find(|r| r.path == "/hooks/unsigned").unwrap();
    assert_eq!(plain.header("webhook-signature"), None);
    assert_eq!(plain.header("Idempotency-Key"), Some("78"));
}
