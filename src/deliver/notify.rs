//! The worker's notification step: the bridge between the notice outbox
//! (`identity_sync.notice`, `sql/55_notify.sql`) and the senders of `identity_sync_core::notify`,
//! which run on a tokio runtime in a thread of their own.
//!
//! Each `tick` records the outcomes that came back (`_record_notices`) and claims due notices
//! (`_claim_notices`, a bounded batch, leased) for the room left, each in its own short
//! transaction; it never waits for a relay, so a mail server that is down costs provisioning
//! nothing: its notices retry with backoff and are sent when it answers again.

use super::txn::{self, in_transaction};
use crate::guc;
use identity_sync_core::notify::{secret_file, Channel, Notice, NoticeOutcome, Notifier};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use std::collections::HashSet;
use std::time::Duration;

/// Notices in flight at most (the batch claimed per tick is what is left of it).
const MAX_IN_FLIGHT: usize = 64;

pub struct Notify {
    notifier: Option<Notifier>,
    /// Outcomes not recorded yet because the worker stepped aside (recorded at the next tick).
    unrecorded: Vec<NoticeOutcome>,
    /// Notices in flight when the extension was installed anew: their rows are gone.
    stale: HashSet<i64>,
    in_flight: HashSet<i64>,
}

impl Notify {
    /// Start the sending thread (see `super::start_thread`).
    pub fn start() -> Self {
        Notify {
            notifier: super::start_thread(Notifier::start, "notification", "notices wait"),
            unrecorded: Vec::new(),
            stale: HashSet::new(),
            in_flight: HashSet::new(),
        }
    }

    /// Notices sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.notifier.as_ref().map_or(0, Notifier::in_flight)
    }

    /// The extension was dropped or installed anew: outcomes of notices in flight belong to
    /// rows that are gone.
    pub fn forget_extension(&mut self) {
        self.stale.extend(self.in_flight.drain());
        self.unrecorded.clear();
    }

    /// Record outcomes, then hand out due notices. True when anything happened.
    pub fn tick(&mut self) -> bool {
        let Some(notifier) = self.notifier.as_ref() else {
            return false;
        };
        let mut outcomes = std::mem::take(&mut self.unrecorded);
        outcomes.extend(notifier.take_outcomes());
        outcomes.retain(|o| !self.stale.remove(&o.id()));
        let recorded = !outcomes.is_empty();
        if recorded {
            let done = in_transaction("recording notices", || record(&outcomes));
            if !matches!(done, Some(Ok(()))) {
                // (stepped aside, or failed: the leases bring them back if this never works)
                self.unrecorded = outcomes;
                return true;
            }
            for o in &outcomes {
                self.in_flight.remove(&o.id());
            }
        }
        if txn::stepped_aside() {
            return recorded;
        }
        let room = MAX_IN_FLIGHT.saturating_sub(notifier.in_flight());
        if room == 0 {
            return recorded;
        }
        let claimed = in_transaction("claiming notices", || claim(room))
            .and_then(Result::ok)
            .unwrap_or_default();
        let any = !claimed.is_empty();
        self.in_flight.extend(claimed.iter().map(|n| n.id));
        notifier.submit(claimed);
        recorded || any
    }
}

fn record(outcomes: &[NoticeOutcome]) -> SpiResult<()> {
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut errors: Vec<Option<String>> = Vec::with_capacity(outcomes.len());
    let mut transient = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        ids.push(o.id());
        match o {
            NoticeOutcome::Sent { .. } => {
                errors.push(None);
                transient.push(false);
            }
            NoticeOutcome::Failed {
                error,
                transient: t,
                ..
            } => {
                errors.push(Some(error.clone()));
                transient.push(*t);
            }
        }
    }
    Spi::connect_mut(|client| {
        client.update(
            "SELECT identity_sync._record_notices($1, $2, $3)",
            None,
            &[ids.into(), errors.into(), transient.into()],
        )?;
        Ok(())
    })
}

/// Claim up to `room` due notices as messages to send.
fn claim(room: usize) -> SpiResult<Vec<Notice>> {
    let default_timeout = Duration::from_millis(guc::HTTP_TIMEOUT.get().max(1) as u64);
    let smtp_url = guc::string(&guc::SMTP_URL);
    let smtp_from = guc::string(&guc::SMTP_FROM);
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT c.id, c.notification, c.channel, c.recipient, c.subject, c.body,
                    c.options->>'smtp_url' AS smtp_url, c.options->>'from' AS sender,
                    c.options->>'url' AS url, c.options->>'secret_file' AS secret_file,
                    (extract(epoch FROM (c.options->>'timeout')::interval) * 1000)::bigint AS timeout_ms,
                    (c.options->>'max_concurrency')::int AS max_concurrency
               FROM identity_sync._claim_notices($1) AS c",
            None,
            &[i32::try_from(room).unwrap_or(i32::MAX).into()],
        )?;
        let mut out = Vec::new();
        for row in rows {
            let text =
                |name: &str| -> SpiResult<Option<String>> { row.get_by_name::<String, _>(name) };
            let secret = text("secret_file")?.map(|p| secret_file(&p));
            let channel = if text("channel")?.as_deref() == Some("webhook") {
                Channel::Webhook {
                    url: text("url")?.unwrap_or_default(),
                    signing_secret: secret,
                }
            } else {
                Channel::Mail {
                    smtp_url: text("smtp_url")?.unwrap_or_else(|| smtp_url.clone()),
                    from: text("sender")?.unwrap_or_else(|| smtp_from.clone()),
                    password: secret,
                }
            };
            out.push(Notice {
                id: row.get_by_name::<i64, _>("id")?.unwrap_or_default(),
                notification: text("notification")?.unwrap_or_default(),
                channel,
                recipient: text("recipient")?.unwrap_or_default(),
                subject: text("subject")?.unwrap_or_default(),
                body: text("body")?.unwrap_or_default(),
                timeout: row
                    .get_by_name::<i64, _>("timeout_ms")?
                    .and_then(|ms| u64::try_from(ms).ok())
                    .filter(|ms| *ms > 0)
                    .map_or(default_timeout, Duration::from_millis),
                max_concurrency: row
                    .get_by_name::<i32, _>("max_concurrency")?
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(4),
            });
        }
        Ok(out)
    })
}
