//! The HTTP targets' delivery settings, read from `identity_sync.target` and `_secret` by
//! column name into [`TargetConfig`]s for the delivery runtime. Option defaults that are
//! settings (`timeout`, `max_concurrency`) come from the GUCs in `guc.rs`.

use crate::guc;
use identity_sync_core::deliver::{Auth, Secret, TargetConfig, TargetKind};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use serde_json::Value;
use std::time::Duration;

/// One HTTP target's settings, as delivery uses them (for a reconcile scan).
pub fn load_target(id: i32) -> SpiResult<Option<TargetConfig>> {
    Ok(load_targets(None)?.and_then(|(_, targets)| targets.into_iter().find(|t| t.id == id)))
}

/// The HTTP targets' settings with their fingerprint, or `None` when the fingerprint is still
/// `known` (nothing changed since they were last loaded).
pub fn load_targets(known: Option<&str>) -> SpiResult<Option<(String, Vec<TargetConfig>)>> {
    let fingerprint = Spi::get_one::<String>(
        "SELECT coalesce(md5(string_agg(t.id || t.name || t.kind || coalesce(t.url, '') || t.options::text
                                        || coalesce(s.set_at::text, ''), ',' ORDER BY t.id)), '')
           FROM identity_sync.target t LEFT JOIN identity_sync._secret s ON s.target_id = t.id
          WHERE t.kind IN ('scim', 'webhook')",
    )?
    .unwrap_or_default();
    if known == Some(fingerprint.as_str()) {
        return Ok(None);
    }
    let targets = Spi::connect(|client| -> SpiResult<Vec<TargetConfig>> {
        client
            .select(
                "SELECT t.id, t.name, t.kind, t.url, t.options, s.secret,
                        (extract(epoch FROM (t.options->>'timeout')::interval) * 1000)::int8 AS timeout_ms
                   FROM identity_sync.target t
                   LEFT JOIN identity_sync._secret s ON s.target_id = t.id
                  WHERE t.kind IN ('scim', 'webhook') ORDER BY t.id",
                None,
                &[],
            )?
            .map(|row| -> SpiResult<TargetConfig> {
                Ok(target_config(
                    row.get_by_name::<i32, _>("id")?.unwrap_or_default(),
                    row.get_by_name::<String, _>("name")?.unwrap_or_default(),
                    row.get_by_name::<String, _>("kind")?.unwrap_or_default(),
                    row.get_by_name::<String, _>("url")?.unwrap_or_default(),
                    row.get_by_name::<pgrx::JsonB, _>("options")?
                        .map_or(Value::Null, |j| j.0),
                    row.get_by_name::<String, _>("secret")?,
                    row.get_by_name::<i64, _>("timeout_ms")?,
                ))
            })
            .collect()
    })?;
    Ok(Some((fingerprint, targets)))
}

fn target_config(
    id: i32,
    name: String,
    kind: String,
    url: String,
    options: Value,
    secret: Option<String>,
    timeout_ms: Option<i64>,
) -> TargetConfig {
    let opt = |k: &str| options.get(k).and_then(Value::as_str).map(str::to_string);
    // A secret_file wins over a secret given with set_secret: it is read at each use.
    let secret = match opt("secret_file") {
        Some(path) => Some(Secret::File(path.into())),
        None => secret.map(Secret::Value),
    };
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
    let default_timeout = guc::HTTP_TIMEOUT.get().max(1) as u64;
    TargetConfig {
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
        timeout: Duration::from_millis(timeout_ms.map_or(default_timeout, |ms| ms.max(1) as u64)),
        max_concurrency: options
            .get("max_concurrency")
            .and_then(Value::as_u64)
            .map_or(guc::MAX_CONCURRENCY.get().max(1) as usize, |n| n as usize),
        correlate_on: opt("correlate_on"),
        create_groups: options
            .get("create_groups")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ca_file: opt("ca_file").map(Into::into),
        allow_insecure_http: options
            .get("allow_insecure_http")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_response_bytes: options
            .get("max_response_bytes")
            .and_then(Value::as_u64)
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
    }
}
