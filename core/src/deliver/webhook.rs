//! Webhook delivery: the event as JSON, signed per Standard Webhooks.

use std::time::{SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{Client, SendError};
use super::job::{Job, Outcome};
use crate::webhook_sign::SigningKey;

/// POSTs the event. Any 2xx is success; a JSON reply with a string `account_id` sets the
/// account's id in the target, otherwise the job's own `account_id` is kept.
pub(crate) async fn deliver(t: &Client, job: &Job) -> Outcome {
    let payload = json!({
        "id": job.event_id,
        "type": job.kind.as_str(),
        "occurred_at": job.occurred_at,
        "target": t.config.name,
        "person_key": job.person_key,
        "account_id": job.account_id,
        "attributes": job.attributes,
        "changed": job.changed,
        "previous": job.previous,
        "groups": job.groups,
        "group": job.group,
    });
    let body = serde_json::to_vec(&payload).unwrap_or_default();
    let msg_id = job.event_id.to_string();
    // Signed afresh for each attempt: receivers reject old timestamps (replay protection).
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut headers = vec![
        ("webhook-id", msg_id.clone()),
        ("webhook-timestamp", timestamp.to_string()),
    ];
    if let Some(secret) = &t.config.signing_secret {
        let secret = match secret.read() {
            Ok(s) => s,
            Err(e) => return SendError::transient(e).outcome(job.event_id),
        };
        match SigningKey::from_secret(&secret) {
            Ok(key) => headers.push(("webhook-signature", key.sign(&msg_id, timestamp, &body))),
            Err(e) => {
                return Outcome::failed(job.event_id, format!("cannot sign the webhook: {e}"))
            }
        }
    }
    let reply = match t
        .send(
            Some(job.event_id),
            Method::POST,
            &t.config.url,
            Some(("application/json", body)),
            &headers,
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return e.outcome(job.event_id),
    };
    if !reply.ok() {
        return reply.failure("POST webhook").outcome(job.event_id);
    }
    let account_id = reply
        .json()
        .and_then(|v| {
            v.get("account_id")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| job.account_id.clone());
    Outcome::Done {
        event_id: job.event_id,
        account_id,
        correlated: false,
        http_status: Some(reply.status),
    }
}
