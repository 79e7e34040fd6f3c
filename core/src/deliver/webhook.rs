//! Webhook delivery: the event as JSON, signed per Standard Webhooks.

use std::time::{SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{checked_id, json_type, Client, Reply, SendError};
use super::job::{Job, Outcome};
use crate::webhook_sign::SigningKey;

/// POSTs the event. Any 2xx is success (an HTML page is not a 2xx of the receiver's: the
/// client fails it); a JSON reply with an `account_id` sets the account's id in the target,
/// otherwise the job's own `account_id` is kept. A reply that says it is JSON and is not (cut
/// short, broken), or whose `account_id` is not an id, fails the event: the id it meant to give
/// would be lost.
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
        Err(e) => return e.context("POST webhook").outcome(job.event_id),
    };
    if !reply.ok() {
        return reply.failure("POST webhook").outcome(job.event_id);
    }
    let account_id = match reply_account_id(&reply) {
        Ok(id) => id.or_else(|| job.account_id.clone()),
        Err(why) => {
            return Outcome::Failed {
                event_id: job.event_id,
                error: format!("POST webhook: HTTP {}: {why}", reply.status),
                http_status: Some(reply.status),
            }
        }
    };
    Outcome::Done {
        event_id: job.event_id,
        account_id,
        correlated: false,
        http_status: Some(reply.status),
    }
}

/// The `account_id` a receiver answered with, if any. Any body that is not JSON and does not
/// say it is ("ok", "accepted") is a plain acknowledgement.
fn reply_account_id(reply: &Reply) -> Result<Option<String>, String> {
    let looks_json = reply.says_json()
        || reply
            .body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{' || *b == b'[');
    if !looks_json || reply.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v = reply.json_or_why()?;
    match v.get("account_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => checked_id(s).map(Some),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "account_id in the response is {}, not a string",
            json_type(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(content_type: Option<&str>, body: &str) -> Reply {
        Reply {
            status: 200,
            body: body.as_bytes().to_vec(),
            retry_after: None,
            content_type: content_type.map(str::to_string),
        }
    }

    #[test]
    fn account_ids_in_replies() {
        let json = Some("application/json");
        assert_eq!(reply(None, "").account(), Ok(None));
        assert_eq!(reply(Some("text/plain"), "OK").account(), Ok(None));
        assert_eq!(reply(json, r#"{"received": true}"#).account(), Ok(None));
        assert_eq!(
            reply(None, r#"{"account_id": "u-1"}"#).account(),
            Ok(Some("u-1".to_string()))
        );
        assert_eq!(
            reply(json, r#"{"account_id": 42}"#).account(),
            Ok(Some("42".to_string()))
        );
        let e = reply(json, r#"{"account_id": "u-"#).account().unwrap_err();
        assert!(e.starts_with("the response is not valid JSON (EOF"), "{e}");
        assert!(reply(json, "OK").account().is_err());
        assert_eq!(
            reply(json, r#"{"account_id": {"id": 1}}"#).account(),
            Err("account_id in the response is an object, not a string".to_string())
        );
        assert!(reply(json, r#"{"account_id": "a\nb"}"#).account().is_err());
    }

    impl Reply {
        fn account(&self) -> Result<Option<String>, String> {
            reply_account_id(self)
        }
    }
}
