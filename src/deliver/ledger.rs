//! The delivery ledger: claiming due events of HTTP targets as [`Job`]s, and recording what
//! became of them, each in a short transaction of the worker's own. Rows are read by column
//! name; a round's outcomes go back as one array of `identity_sync._outcome`. The retry policy
//! is core's (`identity_sync_core::retry`), and SQL reaches it through [`_retry_delay`] and
//! [`_is_transient_sqlstate`] (table targets, `sql/40_deliver.sql`).

use identity_sync_core::deliver::{EventKind, Job, Outcome};
use identity_sync_core::retry;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;

/// One row of `identity_sync._outcome`, as `identity_sync._record_many()` takes it.
#[derive(Serialize)]
struct OutcomeRow<'a> {
    event_id: i64,
    outcome: &'static str,
    remote_id: Option<&'a str>,
    error: Option<&'a str>,
    http_status: Option<u16>,
    retry_in_ms: Option<i64>,
}

/// Record a round of outcomes in one statement. `attempts` holds the attempt number of each
/// event that was claimed (for the backoff of those to retry).
pub fn record(outcomes: &[Outcome], attempts: &HashMap<i64, u32>) -> SpiResult<()> {
    let mut rng = {
        use rand::SeedableRng;
        rand::rngs::StdRng::from_os_rng()
    };
    let rows: Vec<OutcomeRow<'_>> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Done {
                event_id,
                account_id,
                http_status,
                ..
            } => OutcomeRow {
                event_id: *event_id,
                outcome: "done",
                remote_id: account_id.as_deref(),
                error: None,
                http_status: *http_status,
                retry_in_ms: None,
            },
            Outcome::Retry {
                event_id,
                error,
                http_status,
                retry_after,
            } => {
                let attempt = attempts.get(event_id).copied().unwrap_or(1);
                let delay = retry::retry_delay(
                    attempt,
                    retry::RETRY_BASE,
                    retry::RETRY_CAP,
                    *retry_after,
                    &mut rng,
                );
                OutcomeRow {
                    event_id: *event_id,
                    outcome: "retry",
                    remote_id: None,
                    error: Some(error),
                    http_status: *http_status,
                    retry_in_ms: Some(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                }
            }
            Outcome::Failed {
                event_id,
                error,
                http_status,
            } => OutcomeRow {
                event_id: *event_id,
                outcome: "failed",
                remote_id: None,
                error: Some(error),
                http_status: *http_status,
                retry_in_ms: None,
            },
            Outcome::Conflict { event_id, error } => OutcomeRow {
                event_id: *event_id,
                outcome: "conflict",
                remote_id: None,
                error: Some(error),
                http_status: Some(409),
                retry_in_ms: None,
            },
        })
        .collect();
    let json = serde_json::to_value(&rows).unwrap_or(Value::Null);
    Spi::run_with_args(
        "SELECT identity_sync._record_many(array_agg(o ORDER BY o.event_id))
           FROM jsonb_populate_recordset(NULL::identity_sync._outcome, $1) AS o",
        &[pgrx::JsonB(json).into()],
    )
}

/// What a claim handed out: the jobs to send, and the events whose rows could not be decoded
/// (to be recorded as failed at once, so that none stays `sending`).
#[derive(Default)]
pub struct Claimed {
    pub jobs: Vec<Job>,
    pub undecodable: Vec<Outcome>,
}

/// Claim up to `room` due events of HTTP targets.
pub fn claim(room: usize) -> SpiResult<Claimed> {
    let mut claimed = Claimed::default();
    Spi::connect_mut(|client| -> SpiResult<()> {
        let rows = client.update(
            "SELECT c.event_id, c.target_id, c.person_key, c.kind, c.payload, c.remote_id, c.attempts,
                    to_char(c.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS occurred_at,
                    (SELECT a.planned_groups FROM identity_sync.account a
                      WHERE a.target_id = c.target_id AND a.person_key = c.person_key) AS groups
               FROM identity_sync._claim(ARRAY['scim', 'webhook'], $1) AS c",
            None,
            &[i32::try_from(room).unwrap_or(i32::MAX).into()],
        )?;
        for row in rows {
            let event_id = row.get_by_name::<i64, _>("event_id")?.unwrap_or_default();
            match decode(&row) {
                Ok(job) => claimed.jobs.push(job),
                Err(why) => claimed.undecodable.push(Outcome::Failed {
                    event_id,
                    error: format!("identity_sync cannot send this event: {why}"),
                    http_status: None,
                }),
            }
        }
        Ok(())
    })?;
    Ok(claimed)
}

/// One claimed row as a job.
fn decode(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<Job, String> {
    let text = |name: &str| -> Result<Option<String>, String> {
        row.get_by_name::<String, _>(name)
            .map_err(|e| format!("column {name}: {e}"))
    };
    let kind_text = text("kind")?.unwrap_or_default();
    let kind = kind_text
        .parse::<EventKind>()
        .map_err(|_| format!("unknown event kind \"{kind_text}\""))?;
    let payload = row
        .get_by_name::<pgrx::JsonB, _>("payload")
        .map_err(|e| format!("column payload: {e}"))?
        .map_or(Value::Null, |j| j.0);
    if !payload.is_object() {
        return Err("the payload is not a JSON object".into());
    }
    let mut attributes = object(payload.get("attributes"));
    if let Some(active) = payload.get("active") {
        attributes.insert("active".into(), active.clone());
    }
    Ok(Job {
        event_id: row
            .get_by_name::<i64, _>("event_id")
            .map_err(|e| e.to_string())?
            .unwrap_or_default(),
        target_id: row
            .get_by_name::<i32, _>("target_id")
            .map_err(|e| e.to_string())?
            .unwrap_or_default(),
        person_key: text("person_key")?.unwrap_or_default(),
        kind,
        account_id: text("remote_id")?,
        attributes,
        changed: object(payload.get("changed")),
        previous: object(payload.get("previous")),
        group: payload
            .get("group")
            .and_then(Value::as_str)
            .map(str::to_string),
        groups: row
            .get_by_name::<Vec<String>, _>("groups")
            .map_err(|e| format!("column groups: {e}"))?
            .unwrap_or_default(),
        occurred_at: text("occurred_at")?.unwrap_or_default(),
        attempt: row
            .get_by_name::<i32, _>("attempts")
            .map_err(|e| e.to_string())?
            .map_or(1, |a| a.max(1) as u32),
    })
}

fn object(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

/// How long to wait before attempt `attempts + 1` of an event that failed transiently: core's
/// backoff (the one HTTP targets use), at least `retry_after` when the target asked for it.
#[pg_extern(volatile, parallel_safe, name = "_retry_delay")]
fn retry_delay(attempts: i32, retry_after: default!(Option<Interval>, "NULL")) -> Interval {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let retry_after =
        retry_after.and_then(|i| u64::try_from(i.as_micros()).ok().map(Duration::from_micros));
    let delay = retry::retry_delay(
        u32::try_from(attempts.max(1)).unwrap_or(1),
        retry::RETRY_BASE,
        retry::RETRY_CAP,
        retry_after,
        &mut rng,
    );
    let micros = i64::try_from(delay.as_micros()).unwrap_or(i64::MAX);
    Interval::from_micros(micros)
}

/// Whether a PostgreSQL error (by SQLSTATE) is worth another try (core's classification).
#[pg_extern(immutable, parallel_safe, strict, name = "_is_transient_sqlstate")]
fn is_transient_sqlstate(sqlstate: &str) -> bool {
    retry::is_transient_sqlstate(sqlstate)
}
