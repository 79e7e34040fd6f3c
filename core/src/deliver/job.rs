//! One provisioning event handed to the HTTP side ([`Job`]), and what became of it
//! ([`Outcome`]).

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use super::client::SendError;

/// The kind of a provisioning event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Create the account (or link it by correlation).
    Create,
    /// Change attributes.
    Update,
    /// Set `active` to true.
    Enable,
    /// Set `active` to false.
    Disable,
    /// Delete the account.
    Delete,
    /// Add the account to a group.
    Grant,
    /// Remove the account from a group.
    Revoke,
}

impl EventKind {
    /// The lower-case word used in `identity_sync.event.kind` and the webhook `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Update => "update",
            EventKind::Enable => "enable",
            EventKind::Disable => "disable",
            EventKind::Delete => "delete",
            EventKind::Grant => "grant",
            EventKind::Revoke => "revoke",
        }
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "create" => EventKind::Create,
            "update" => EventKind::Update,
            "enable" => EventKind::Enable,
            "disable" => EventKind::Disable,
            "delete" => EventKind::Delete,
            "grant" => EventKind::Grant,
            "revoke" => EventKind::Revoke,
            other => return Err(format!("unknown event kind \"{other}\"")),
        })
    }
}

/// One event to deliver. `Debug` hides the values of `password` attributes.
#[derive(Clone, PartialEq)]
pub struct Job {
    /// `identity_sync.event` id; also the idempotency key and the webhook id.
    pub event_id: i64,
    /// The target to send to.
    pub target_id: i32,
    /// The person; jobs of one (target, person) are delivered one at a time, in order.
    pub person_key: String,
    /// What to do.
    pub kind: EventKind,
    /// The target's id for this account, when known (required for SCIM update, enable,
    /// disable, grant and revoke).
    pub account_id: Option<String>,
    /// The full desired flat `{path → value}` map; for a create it includes the on-create-only
    /// attributes; may contain `active`.
    pub attributes: Map<String, Value>,
    /// Update: only the changed paths; null means remove.
    pub changed: Map<String, Value>,
    /// The values last applied (used to tell whether a multi-valued element exists).
    pub previous: Map<String, Value>,
    /// Grant/revoke: the group's `displayName`.
    pub group: Option<String>,
    /// Every desired group, for webhooks.
    pub groups: Vec<String>,
    /// When the event happened, RFC 3339.
    pub occurred_at: String,
    /// Which attempt this is: 1 for the first try (0 is taken as 1). A SCIM create with
    /// attempt ≥ 2 first looks for an account with its `externalId`, so a create whose reply
    /// was lost is linked rather than created twice.
    pub attempt: u32,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("event_id", &self.event_id)
            .field("target_id", &self.target_id)
            .field("person_key", &self.person_key)
            .field("kind", &self.kind)
            .field("account_id", &self.account_id)
            .field("attributes", &redacted(&self.attributes))
            .field("changed", &redacted(&self.changed))
            .field("previous", &redacted(&self.previous))
            .field("group", &self.group)
            .field("groups", &self.groups)
            .field("occurred_at", &self.occurred_at)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// A copy of a flat attribute map with the value of any `password` path (SCIM's write-only
/// initial password, RFC 7643 §4.1.1) replaced, for `Debug` output.
fn redacted(attrs: &Map<String, Value>) -> Map<String, Value> {
    attrs
        .iter()
        .map(|(k, v)| {
            let is_password = k
                .rsplit([':', '.'])
                .next()
                .is_some_and(|last| last.eq_ignore_ascii_case("password"));
            if is_password && !v.is_null() {
                (k.clone(), Value::String("<redacted>".to_string()))
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

/// The result of one job.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Delivered.
    Done {
        /// The event.
        event_id: i64,
        /// The target's id for the account (from the create, the correlation, or the job).
        account_id: Option<String>,
        /// The create linked an existing account instead of creating one.
        correlated: bool,
        /// The status of the last HTTP response, if a request was sent.
        http_status: Option<u16>,
    },
    /// Transient failure: connection error, timeout, 408, 429 or 5xx.
    Retry {
        /// The event.
        event_id: i64,
        /// What went wrong.
        error: String,
        /// The HTTP status, if a response came.
        http_status: Option<u16>,
        /// The target's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Permanent failure (other 4xx, or an invalid job): needs an operator.
    Failed {
        /// The event.
        event_id: i64,
        /// What went wrong, with the target's error text.
        error: String,
        /// The HTTP status, if a response came.
        http_status: Option<u16>,
    },
    /// SCIM 409 `uniqueness` on create: the planner can pick the next unique value.
    Conflict {
        /// The event.
        event_id: i64,
        /// The target's error text.
        error: String,
    },
}

impl Outcome {
    /// The event this outcome is for.
    pub fn event_id(&self) -> i64 {
        match self {
            Outcome::Done { event_id, .. }
            | Outcome::Retry { event_id, .. }
            | Outcome::Failed { event_id, .. }
            | Outcome::Conflict { event_id, .. } => *event_id,
        }
    }

    pub(crate) fn failed(event_id: i64, error: impl Into<String>) -> Self {
        Outcome::Failed {
            event_id,
            error: error.into(),
            http_status: None,
        }
    }

    pub(crate) fn retry(event_id: i64, error: impl Into<String>) -> Self {
        Outcome::Retry {
            event_id,
            error: error.into(),
            http_status: None,
            retry_after: None,
        }
    }
}

impl SendError {
    /// This error as the outcome of event `event_id`.
    pub(crate) fn outcome(self, event_id: i64) -> Outcome {
        match self {
            SendError::Transient {
                error,
                http_status,
                retry_after,
            } => Outcome::Retry {
                event_id,
                error,
                http_status,
                retry_after,
            },
            SendError::Permanent { error, http_status } => Outcome::Failed {
                event_id,
                error,
                http_status,
            },
        }
    }
}
