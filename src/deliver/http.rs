//! Bridge between the worker's main thread (SPI) and the HTTP connectors of
//! `identity_sync_core`, which run on a tokio runtime in a thread of their own.
//!
//! Each `pump` records the outcomes that came back, reloads target settings when they changed,
//! and claims as many due events as there is room for, each step in its own short transaction.
//! No transaction is open while requests are on the network.

use super::worker::in_transaction;
use identity_sync_core::backoff;
use identity_sync_core::deliver::{
    Auth, Dispatcher, EventKind, Job, Outcome, TargetConfig, TargetKind,
};
use pgrx::prelude::*;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// Targets with their settings, as loaded from `identity_sync.target` and `_secret`.
struct Loaded {
    fingerprint: String,
    /// Room per target: events in flight at most.
    capacity: usize,
}

pub struct Http {
    dispatcher: Option<Dispatcher>,
    loaded: Option<Loaded>,
}

impl Http {
    /// Start the delivery thread. Its notify callback raises SIGUSR1 on our own process, whose
    /// PostgreSQL handler sets our latch (async-signal-safe, and the only PostgreSQL code that
    /// runs, in our main thread, since the delivery threads block all signals).
    pub fn start() -> Self {
        let notify: Arc<dyn Fn() + Send + Sync> = Arc::new(|| unsafe {
            libc::kill(libc::getpid(), libc::SIGUSR1);
        });
        let dispatcher = match Dispatcher::start(notify) {
            Ok(d) => Some(d),
            Err(e) => {
                log!("identity_sync: cannot start the delivery thread: {e}; HTTP targets wait");
                None
            }
        };
        Http {
            dispatcher,
            loaded: None,
        }
    }

    /// The delivery runtime, for reconcile scans (src/reconcile.rs).
    pub fn dispatcher(&self) -> Option<&Dispatcher> {
        self.dispatcher.as_ref()
    }

    pub fn in_flight(&self) -> usize {
        self.dispatcher.as_ref().map_or(0, |d| d.in_flight())
    }

    /// Record outcomes, then hand out due events. True when anything happened.
    pub fn pump(&mut self, batch: i32) -> bool {
        let Some(dispatcher) = self.dispatcher.as_ref() else {
            return false;
        };
        let outcomes = dispatcher.take_outcomes();
        let recorded = !outcomes.is_empty();
        if recorded {
            record_all(&outcomes);
        }

        if let Some(Some((fingerprint, targets))) = in_transaction("loading targets", || {
            load_targets(self.loaded.as_ref().map(|l| l.fingerprint.as_str()))
        }) {
            let capacity = targets
                .iter()
                .map(|t| t.max_concurrency.max(1) * 2)
                .sum::<usize>();
            dispatcher.set_targets(targets);
            self.loaded = Some(Loaded {
                fingerprint,
                capacity,
            });
        }
        let capacity = self.loaded.as_ref().map_or(0, |l| l.capacity);
        let room = capacity
            .saturating_sub(dispatcher.in_flight())
            .min(batch.max(1) as usize);
        if room == 0 {
            return recorded;
        }
        let jobs = in_transaction("claiming events", || claim(room)).unwrap_or_default();
        let submitted = !jobs.is_empty();
        dispatcher.submit(jobs);
        recorded || submitted
    }

    /// Stop within a second even with requests in flight; their events stay `sending` and are
    /// due again when the worker starts (at-least-once, with the event id as idempotency key).
    pub fn shutdown(&mut self) {
        if let Some(d) = self.dispatcher.take() {
            let left = d.shutdown(Duration::from_millis(600));
            if !left.is_empty() {
                record_all(&left);
            }
        }
    }
}

/// A round of outcomes as `identity_sync._record_many()` takes them: one array per column.
#[derive(Default)]
struct Outcomes {
    ids: Vec<i64>,
    outcomes: Vec<String>,
    remote_ids: Vec<Option<String>>,
    errors: Vec<Option<String>>,
    statuses: Vec<Option<i32>>,
    retry_ms: Vec<Option<i64>>,
}

impl Outcomes {
    fn push(
        &mut self,
        id: i64,
        outcome: &str,
        remote_id: Option<String>,
        error: Option<String>,
        status: Option<u16>,
        retry_ms: Option<i64>,
    ) {
        self.ids.push(id);
        self.outcomes.push(outcome.to_string());
        self.remote_ids.push(remote_id);
        self.errors.push(error);
        self.statuses.push(status.map(i32::from));
        self.retry_ms.push(retry_ms);
    }
}

/// Record a round of outcomes in one transaction; should that fail (one bad row), record them
/// one by one, so that the others are not left `sending` until the next restart.
fn record_all(outcomes: &[Outcome]) {
    if in_transaction("recording delivery outcomes", || record(outcomes)).is_none() {
        for o in outcomes {
            in_transaction("recording a delivery outcome", || {
                record(std::slice::from_ref(o))
            });
        }
    }
}

/// Record what came back, in one statement: the delivered events set-based, the others (retry
/// with the backoff chosen here, failed, conflict) one by one.
fn record(outcomes: &[Outcome]) {
    let mut rng = rand_seed();
    let mut round = Outcomes::default();
    for o in outcomes {
        match o {
            Outcome::Done {
                event_id,
                account_id,
                http_status,
                ..
            } => round.push(
                *event_id,
                "done",
                account_id.clone(),
                None,
                *http_status,
                None,
            ),
            Outcome::Retry {
                event_id,
                error,
                http_status,
                retry_after,
            } => {
                let delay = backoff::retry_delay(
                    attempts_of(*event_id),
                    Duration::from_millis(500),
                    Duration::from_secs(300),
                    *retry_after,
                    &mut rng,
                );
                let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                round.push(
                    *event_id,
                    "retry",
                    None,
                    Some(error.clone()),
                    *http_status,
                    Some(ms),
                )
            }
            Outcome::Failed {
                event_id,
                error,
                http_status,
            } => round.push(
                *event_id,
                "failed",
                None,
                Some(error.clone()),
                *http_status,
                None,
            ),
            Outcome::Conflict { event_id, error } => round.push(
                *event_id,
                "conflict",
                None,
                Some(error.clone()),
                Some(409),
                None,
            ),
        }
    }
    let n = round.ids.len();
    if let Err(e) = Spi::run_with_args(
        "SELECT identity_sync._record_many($1, $2, $3, $4, $5, $6)",
        &[
            round.ids.into(),
            round.outcomes.into(),
            round.remote_ids.into(),
            round.errors.into(),
            round.statuses.into(),
            round.retry_ms.into(),
        ],
    ) {
        log!("identity_sync: recording {n} delivery outcomes failed: {e}");
    }
}

fn attempts_of(event_id: i64) -> u32 {
    Spi::get_one_with_args::<i32>(
        "SELECT attempts FROM identity_sync.event WHERE id = $1",
        &[event_id.into()],
    )
    .ok()
    .flatten()
    .map_or(1, |a| a.max(1) as u32)
}

fn rand_seed() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    rand::rngs::StdRng::from_os_rng()
}

/// Targets' delivery settings, when they changed since `known` (a fingerprint).
/// One HTTP target's settings, as delivery uses them (for a reconcile scan).
pub fn load_target(id: i32) -> Option<TargetConfig> {
    load_targets(None)?.1.into_iter().find(|t| t.id == id)
}

fn load_targets(known: Option<&str>) -> Option<(String, Vec<TargetConfig>)> {
    let fingerprint = Spi::get_one::<String>(
        "SELECT coalesce(md5(string_agg(t.id || t.name || t.kind || coalesce(t.url, '') || t.options::text
                                        || coalesce(s.set_at::text, ''), ',' ORDER BY t.id)), '')
           FROM identity_sync.target t LEFT JOIN identity_sync._secret s ON s.target_id = t.id
          WHERE t.kind IN ('scim', 'webhook')",
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    if known == Some(fingerprint.as_str()) {
        return None;
    }
    let default_timeout = crate::guc::HTTP_TIMEOUT.get().max(1) as u64;
    let default_concurrency = crate::guc::MAX_CONCURRENCY.get().max(1) as usize;
    let mut targets = Vec::new();
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT t.id, t.name, t.kind, t.url, t.options, s.secret,
                    (extract(epoch FROM (t.options->>'timeout')::interval) * 1000)::int8
               FROM identity_sync.target t LEFT JOIN identity_sync._secret s ON s.target_id = t.id
              WHERE t.kind IN ('scim', 'webhook') ORDER BY t.id",
            None,
            &[],
        );
        let Ok(rows) = rows else { return };
        for row in rows {
            let id: i32 = row.get(1).ok().flatten().unwrap_or_default();
            let name: String = row.get(2).ok().flatten().unwrap_or_default();
            let kind: String = row.get(3).ok().flatten().unwrap_or_default();
            let url: String = row.get(4).ok().flatten().unwrap_or_default();
            let options: Value = row
                .get::<pgrx::JsonB>(5)
                .ok()
                .flatten()
                .map_or(Value::Null, |j| j.0);
            let secret: Option<String> = row.get(6).ok().flatten();
            let timeout_ms: Option<i64> = row.get(7).ok().flatten();
            let opt = |k: &str| options.get(k).and_then(Value::as_str).map(str::to_string);
            let secret_or_empty = secret.clone().unwrap_or_default();
            let auth = match opt("auth").as_deref() {
                Some("bearer") => Auth::Bearer {
                    token: secret_or_empty,
                },
                Some("basic") => Auth::Basic {
                    username: opt("username").unwrap_or_default(),
                    password: secret_or_empty,
                },
                Some("oauth2") => Auth::OAuth2 {
                    token_url: opt("token_url").unwrap_or_default(),
                    client_id: opt("client_id").unwrap_or_default(),
                    client_secret: secret_or_empty,
                    scope: opt("scope"),
                },
                _ => Auth::None,
            };
            let is_webhook = kind == "webhook";
            targets.push(TargetConfig {
                id,
                name,
                kind: if is_webhook {
                    TargetKind::Webhook
                } else {
                    TargetKind::Scim
                },
                url,
                // A webhook's secret signs its requests unless it authenticates with it.
                signing_secret: if is_webhook && matches!(auth, Auth::None) {
                    secret
                } else {
                    None
                },
                auth,
                timeout: Duration::from_millis(
                    timeout_ms.map_or(default_timeout, |ms| ms.max(1) as u64),
                ),
                max_concurrency: options
                    .get("max_concurrency")
                    .and_then(Value::as_u64)
                    .map_or(default_concurrency, |n| n as usize),
                correlate_on: opt("correlate_on"),
                create_groups: options
                    .get("create_groups")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            });
        }
    });
    Some((fingerprint, targets))
}

fn object(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

fn claim(room: usize) -> Vec<Job> {
    let mut jobs = Vec::new();
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT event_id, target_id, person_key, kind, payload, remote_id, attempts,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    (SELECT planned_groups FROM identity_sync.account a
                      WHERE a.target_id = c.target_id AND a.person_key = c.person_key)
               FROM identity_sync._claim(ARRAY['scim', 'webhook'], $1) AS c",
            None,
            &[(room as i32).into()],
        );
        let Ok(rows) = rows else { return };
        for row in rows {
            let kind: String = row.get(4).ok().flatten().unwrap_or_default();
            let Ok(kind) = kind.parse::<EventKind>() else {
                continue;
            };
            let payload: Value = row
                .get::<pgrx::JsonB>(5)
                .ok()
                .flatten()
                .map_or(Value::Null, |j| j.0);
            let mut attributes = object(payload.get("attributes"));
            if let Some(active) = payload.get("active") {
                attributes.insert("active".into(), active.clone());
            }
            jobs.push(Job {
                event_id: row.get(1).ok().flatten().unwrap_or_default(),
                target_id: row.get(2).ok().flatten().unwrap_or_default(),
                person_key: row.get(3).ok().flatten().unwrap_or_default(),
                kind,
                account_id: row.get(6).ok().flatten(),
                attributes,
                changed: object(payload.get("changed")),
                previous: object(payload.get("previous")),
                group: payload
                    .get("group")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                groups: row.get::<Vec<String>>(9).ok().flatten().unwrap_or_default(),
                occurred_at: row.get(8).ok().flatten().unwrap_or_default(),
                attempt: row
                    .get::<i32>(7)
                    .ok()
                    .flatten()
                    .map_or(1, |a| a.max(1) as u32),
            });
        }
    });
    jobs
}
