//! SCIM 2.0 delivery (RFC 7644): users, their `active` flag, and group memberships.

use std::collections::{BTreeMap, HashMap};

use reqwest::Method;
use serde_json::{json, Map, Value};

use tokio::sync::{Mutex, OnceCell};

use super::client::{checked_id, json_type, pct, Client, Reply, SendError};
use super::config::TargetConfig;
use super::job::{EventKind, Job, Outcome};
use crate::path::{apply_changes, build_resource, parse_path, schemas_for, AttrPath, PathError};

const SCIM_JSON: &str = "application/scim+json";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

type Step<T> = Result<T, Outcome>;

/// What a SCIM service says it supports (RFC 7643 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServiceProviderConfig {
    pub patch: bool,
    pub filter: bool,
    pub bulk: bool,
    pub etag: bool,
}

impl ServiceProviderConfig {
    /// Assumed when a service does not publish its configuration: PATCH and filters are what
    /// every major SCIM service implements.
    pub const ASSUMED: Self = ServiceProviderConfig {
        patch: true,
        filter: true,
        bulk: false,
        etag: false,
    };

    fn from_json(v: &Value) -> Self {
        let supported = |k: &str, default: bool| {
            v.get(k)
                .and_then(|o| o.get("supported"))
                .and_then(Value::as_bool)
                .unwrap_or(default)
        };
        ServiceProviderConfig {
            patch: supported("patch", true),
            filter: supported("filter", true),
            bulk: supported("bulk", false),
            etag: supported("etag", false),
        }
    }
}

/// A SCIM service: its transport, what it says it supports, and the group ids found so far.
pub(crate) struct ScimTarget {
    pub client: Client,
    spc: OnceCell<ServiceProviderConfig>,
    /// Group displayName → id; the lock is held while a group is looked up or created, so two
    /// grants cannot create the same group twice.
    groups: Mutex<HashMap<String, String>>,
}

impl ScimTarget {
    pub fn new(client: Client) -> Self {
        ScimTarget {
            client,
            spc: OnceCell::new(),
            groups: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &TargetConfig {
        &self.client.config
    }

    /// The base URL without a trailing slash.
    pub fn base(&self) -> &str {
        self.client.config.url.trim_end_matches('/')
    }

    /// One request for an event: its id is the idempotency key, a failure its outcome.
    async fn send(
        &self,
        event_id: i64,
        method: Method,
        url: &str,
        body: Option<(&'static str, Vec<u8>)>,
        headers: &[(&'static str, String)],
    ) -> Step<Reply> {
        let what = format!("{method} {}", self.resource_path(url));
        self.client
            .send(Some(event_id), method, url, body, headers)
            .await
            .map_err(|e| e.context(&what).outcome(event_id))
    }

    /// `/Users` for `<base>/Users/2819c223?attributes=…`: which endpoint a request went to, for
    /// messages (as `Reply::failure` names them).
    fn resource_path<'a>(&self, url: &'a str) -> &'a str {
        let path = url.strip_prefix(self.base()).unwrap_or(url);
        let path = path.split('?').next().unwrap_or(path);
        match path.get(1..).and_then(|p| p.find('/')) {
            Some(i) => &path[..i + 1],
            None => path,
        }
    }

    /// A request with a SCIM JSON body for an event (see `send`).
    async fn send_json(
        &self,
        event_id: i64,
        method: Method,
        url: &str,
        body: &Value,
    ) -> Step<Reply> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        self.send(event_id, method, url, Some((SCIM_JSON, body)), &[])
            .await
    }

    /// The service's ServiceProviderConfig, read once and cached. A service without one (404)
    /// gets [`ServiceProviderConfig::ASSUMED`]; errors are not cached.
    pub async fn service_provider_config(&self) -> Result<ServiceProviderConfig, SendError> {
        self.spc
            .get_or_try_init(|| async {
                let url = format!("{}/ServiceProviderConfig", self.base());
                let reply = self
                    .client
                    .send(None, Method::GET, &url, None, &[])
                    .await
                    .map_err(|e| e.context("GET /ServiceProviderConfig"))?;
                match reply.status {
                    200..=299 => Ok(reply.json().map_or(ServiceProviderConfig::ASSUMED, |v| {
                        ServiceProviderConfig::from_json(&v)
                    })),
                    404 | 501 => Ok(ServiceProviderConfig::ASSUMED),
                    _ => Err(reply.failure("GET /ServiceProviderConfig")),
                }
            })
            .await
            .copied()
    }
}

/// Delivers one SCIM job.
pub(crate) async fn deliver(t: &ScimTarget, job: &Job) -> Outcome {
    match run(t, job).await {
        Ok(o) | Err(o) => o,
    }
}

async fn run(t: &ScimTarget, job: &Job) -> Step<Outcome> {
    let spc = t
        .service_provider_config()
        .await
        .map_err(|e| e.outcome(job.event_id))?;
    match job.kind {
        EventKind::Create => create(t, spc, job).await,
        EventKind::Update => update(t, spc, job).await,
        EventKind::Enable | EventKind::Disable => {
            let id = account_id(job)?;
            let active = job.kind == EventKind::Enable;
            let mut desired = Map::new();
            desired.insert("active".to_string(), Value::Bool(active));
            let status = if spc.patch {
                let ops = vec![json!({"op": "replace", "path": "active", "value": active})];
                patch_user(t, job, id, ops).await?
            } else {
                put_user(t, job, id, &desired).await?
            };
            Ok(done(job, Some(id.to_string()), false, Some(status)))
        }
        EventKind::Delete => {
            let Some(id) = job.account_id.as_deref() else {
                // Never created in the target: there is nothing to delete.
                return Ok(done(job, None, false, None));
            };
            let url = format!("{}/Users/{}", t.base(), pct(id));
            let reply = t
                .send(job.event_id, Method::DELETE, &url, None, &[])
                .await?;
            if reply.ok() || reply.status == 404 {
                Ok(done(job, Some(id.to_string()), false, Some(reply.status)))
            } else {
                Err(reply.failure("DELETE /Users").outcome(job.event_id))
            }
        }
        EventKind::Grant | EventKind::Revoke => membership(t, spc, job).await,
    }
}

fn done(job: &Job, account_id: Option<String>, correlated: bool, status: Option<u16>) -> Outcome {
    Outcome::Done {
        event_id: job.event_id,
        account_id,
        correlated,
        http_status: status,
    }
}

fn account_id(job: &Job) -> Step<&str> {
    job.account_id.as_deref().ok_or_else(|| {
        Outcome::failed(
            job.event_id,
            format!(
                "no account id is known for person \"{}\" in this target, so the {} cannot be sent",
                job.person_key,
                job.kind.as_str()
            ),
        )
    })
}

fn mapping_error(job: &Job, e: PathError) -> Outcome {
    Outcome::failed(job.event_id, format!("invalid attribute mapping: {e}"))
}

/// The user resource for POST/PUT: nested attributes plus `schemas`.
fn user_resource(job: &Job, attrs: &Map<String, Value>) -> Step<Map<String, Value>> {
    let mut res = match build_resource(attrs).map_err(|e| mapping_error(job, e))? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let schemas = schemas_for(attrs).map_err(|e| mapping_error(job, e))?;
    res.insert("schemas".to_string(), json!(schemas));
    Ok(res)
}

async fn create(t: &ScimTarget, spc: ServiceProviderConfig, job: &Job) -> Step<Outcome> {
    // On a retried create, the first attempt may have succeeded with its reply lost: look the
    // account up by externalId so it is linked instead of created twice.
    let correlate_on = t.config().correlate_on.clone().or_else(|| {
        (job.attempt >= 2
            && job
                .attributes
                .get("externalId")
                .is_some_and(|v| !v.is_null()))
        .then(|| "externalId".to_string())
    });
    // A service without filters cannot be asked; its existing accounts are linked by the
    // adoption scan instead (reconcile, run by the first resync of a target with correlate_on),
    // which plans an update for each of them, so a create is only planned for a person whose
    // account the scan did not find.
    if let Some(attr) = correlate_on.filter(|_| spc.filter) {
        if let Some(value) = job.attributes.get(&attr).filter(|v| !v.is_null()) {
            let path = parse_path(&attr).map_err(|e| mapping_error(job, e))?;
            let found = find(t, job, "Users", &path.filter_expr(value), None).await?;
            match found.as_slice() {
                [] => {}
                [existing] => return link(t, spc, job, existing).await,
                many => {
                    return Err(Outcome::failed(
                        job.event_id,
                        format!(
                        "correlation is ambiguous: {} accounts in the target have {attr} = {value}",
                        many.len()
                    ),
                    ))
                }
            }
        }
    }

    let mut res = user_resource(job, &job.attributes)?;
    if !res.keys().any(|k| k.eq_ignore_ascii_case("active")) {
        res.insert("active".to_string(), Value::Bool(true));
    }
    let url = format!("{}/Users", t.base());
    let reply = t
        .send_json(job.event_id, Method::POST, &url, &Value::Object(res))
        .await?;
    if reply.status == 409 && reply.scim_type().as_deref() == Some("uniqueness") {
        return Err(Outcome::Conflict {
            event_id: job.event_id,
            error: format!("POST /Users: HTTP 409: {}", reply.error_text()),
        });
    }
    if !reply.ok() {
        return Err(reply.failure("POST /Users").outcome(job.event_id));
    }
    match resource_id(&reply) {
        Ok(id) => Ok(done(job, Some(id), false, Some(reply.status))),
        Err(why) => Err(Outcome::Failed {
            event_id: job.event_id,
            error: format!("POST /Users: HTTP {}: {why}", reply.status),
            http_status: Some(reply.status),
        }),
    }
}

/// The `id` of the resource a create answered with, or why there is none.
fn resource_id(reply: &Reply) -> Result<String, String> {
    match reply.json_or_why()?.get("id") {
        Some(Value::String(s)) => checked_id(s),
        Some(Value::Number(n)) => Ok(n.to_string()),
        None | Some(Value::Null) => {
            Err("the target accepted it but answered without its id".to_string())
        }
        Some(other) => Err(format!(
            "the id in the response is {}, not a string",
            json_type(other)
        )),
    }
}

/// Links an account found by correlation and brings it up to date with the desired values.
async fn link(
    t: &ScimTarget,
    spc: ServiceProviderConfig,
    job: &Job,
    existing: &Value,
) -> Step<Outcome> {
    let id = match existing.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(Outcome::failed(
                job.event_id,
                "correlation found an account without an id",
            ))
        }
    };
    let mut changes = Map::new();
    for (raw, want) in &job.attributes {
        let path = parse_path(raw).map_err(|e| mapping_error(job, e))?;
        let have = path.get(existing);
        let differs = match (have, want) {
            (None, Value::Null) => false,
            (Some(h), w) => !same_value(h, w),
            (None, _) => true,
        };
        if differs {
            changes.insert(raw.clone(), want.clone());
        }
    }
    let mut status = None;
    if !changes.is_empty() {
        status = Some(if spc.patch {
            let ops = patch_ops(&changes, existing, true).map_err(|e| mapping_error(job, e))?;
            patch_user(t, job, &id, ops).await?
        } else {
            put_user(t, job, &id, &changes).await?
        });
    }
    Ok(done(job, Some(id), true, status))
}

/// Strings compare case-sensitively except that a service may re-case nothing else; numbers
/// compare by value so `1` and `1.0` are not a change.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

async fn update(t: &ScimTarget, spc: ServiceProviderConfig, job: &Job) -> Step<Outcome> {
    let id = account_id(job)?;
    if job.changed.is_empty() {
        return Ok(done(job, Some(id.to_string()), false, None));
    }
    if !spc.patch {
        let status = put_user(t, job, id, &job.changed).await?;
        return Ok(done(job, Some(id.to_string()), false, Some(status)));
    }
    let previous = build_resource(&job.previous).unwrap_or_else(|_| json!({}));
    let ops = patch_ops(&job.changed, &previous, false).map_err(|e| mapping_error(job, e))?;
    if ops.is_empty() {
        return Ok(done(job, Some(id.to_string()), false, None));
    }
    let status = match patch_user_raw(t, job, id, ops).await? {
        reply if reply.ok() => reply.status,
        // What we last applied is not what the target holds (an element we thought was there
        // is not, or the other way round): read the account and compute the operations again.
        reply if reply.status == 400 && reply.scim_type().as_deref() == Some("noTarget") => {
            let current = get_user(t, job, id).await?;
            let ops = patch_ops(&job.changed, &current, true).map_err(|e| mapping_error(job, e))?;
            patch_user(t, job, id, ops).await?
        }
        reply => return Err(reply.failure("PATCH /Users").outcome(job.event_id)),
    };
    Ok(done(job, Some(id.to_string()), false, Some(status)))
}

/// PATCH operations that move `current` to the values in `changes` (null = remove).
///
/// Plain paths become `replace` (or `remove`). A filtered path such as
/// `emails[type eq "work"].value` needs its element: when `current` has it, the value is
/// replaced in place; when not, the element is added whole with `add` on `emails` (a `replace`
/// would fail with `noTarget`, RFC 7644 §3.5.2.3); when every value of an element becomes null,
/// the element is removed. With `authoritative` (current is the target's own copy), removing a
/// value it does not have is skipped.
fn patch_ops(
    changes: &Map<String, Value>,
    current: &Value,
    authoritative: bool,
) -> Result<Vec<Value>, PathError> {
    let mut ops = Vec::new();
    let mut elements: BTreeMap<String, (AttrPath, Vec<(String, Value)>)> = BTreeMap::new();
    for (raw, value) in changes {
        let p = parse_path(raw)?;
        if p.filter.is_some() {
            let sub = p.sub_attr.clone().unwrap_or_default();
            elements
                .entry(p.element_path())
                .or_insert_with(|| (p.clone(), Vec::new()))
                .1
                .push((sub, value.clone()));
            continue;
        }
        if value.is_null() {
            if !authoritative || p.get(current).is_some() {
                ops.push(json!({"op": "remove", "path": p.to_string()}));
            }
        } else {
            ops.push(json!({"op": "replace", "path": p.to_string(), "value": value}));
        }
    }
    for (element_path, (p, subs)) in elements {
        let filter = p.filter.clone();
        if p.element_exists(current) {
            // Values the element keeps: those in current not being changed, plus new ones.
            let remaining = element_values(&p, current)
                .into_iter()
                .filter(|(k, _)| !subs.iter().any(|(s, _)| s.eq_ignore_ascii_case(k)))
                .count()
                + subs.iter().filter(|(_, v)| !v.is_null()).count();
            if remaining == 0 {
                ops.push(json!({"op": "remove", "path": element_path}));
                continue;
            }
            for (sub, value) in subs {
                let path = format!("{element_path}.{sub}");
                if value.is_null() {
                    ops.push(json!({"op": "remove", "path": path}));
                } else {
                    ops.push(json!({"op": "replace", "path": path, "value": value}));
                }
            }
        } else {
            let mut el = Map::new();
            if let Some(f) = &filter {
                el.insert(f.attr.clone(), f.value.clone());
            }
            let mut any = false;
            for (sub, value) in subs {
                if !value.is_null() {
                    el.insert(sub, value);
                    any = true;
                }
            }
            if any {
                let target = match &p.urn {
                    Some(u) => format!("{u}:{}", p.attr),
                    None => p.attr.clone(),
                };
                ops.push(json!({"op": "add", "path": target, "value": [Value::Object(el)]}));
            }
        }
    }
    Ok(ops)
}

/// The non-null values of the element a filtered path selects, except the filter attribute.
fn element_values(p: &AttrPath, current: &Value) -> Vec<(String, Value)> {
    let Some(f) = &p.filter else {
        return Vec::new();
    };
    let container = match &p.urn {
        Some(u) => current.get(u),
        None => Some(current),
    };
    container
        .and_then(|c| c.as_object())
        .and_then(|o| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&p.attr))
                .map(|(_, v)| v)
        })
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|e| f.matches(e)))
        .and_then(Value::as_object)
        .map(|el| {
            el.iter()
                .filter(|(k, v)| !v.is_null() && !k.eq_ignore_ascii_case(&f.attr))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn patch_request(ops: Vec<Value>) -> Value {
    json!({"schemas": [PATCH_OP], "Operations": ops})
}

async fn patch_user_raw(t: &ScimTarget, job: &Job, id: &str, ops: Vec<Value>) -> Step<Reply> {
    let url = format!("{}/Users/{}", t.base(), pct(id));
    t.send_json(job.event_id, Method::PATCH, &url, &patch_request(ops))
        .await
}

/// PATCHes a user; 200 with a body and 204 without are both success.
async fn patch_user(t: &ScimTarget, job: &Job, id: &str, ops: Vec<Value>) -> Step<u16> {
    if ops.is_empty() {
        return Ok(204);
    }
    let reply = patch_user_raw(t, job, id, ops).await?;
    if reply.ok() {
        Ok(reply.status)
    } else {
        Err(reply.failure("PATCH /Users").outcome(job.event_id))
    }
}

/// For services without PATCH: reads the user, applies the flat changes, and PUTs it back, so
/// attributes this target's mapping does not manage are kept.
async fn put_user(t: &ScimTarget, job: &Job, id: &str, changes: &Map<String, Value>) -> Step<u16> {
    let mut res = get_user(t, job, id).await?;
    apply_changes(&mut res, changes).map_err(|e| mapping_error(job, e))?;
    if let Some(obj) = res.as_object_mut() {
        obj.remove("meta"); // read-only; some services refuse it in a PUT
    }
    let url = format!("{}/Users/{}", t.base(), pct(id));
    let reply = t.send_json(job.event_id, Method::PUT, &url, &res).await?;
    if reply.ok() {
        Ok(reply.status)
    } else {
        Err(reply.failure("PUT /Users").outcome(job.event_id))
    }
}

async fn get_user(t: &ScimTarget, job: &Job, id: &str) -> Step<Value> {
    let url = format!("{}/Users/{}", t.base(), pct(id));
    let reply = t.send(job.event_id, Method::GET, &url, None, &[]).await?;
    if !reply.ok() {
        return Err(reply.failure("GET /Users").outcome(job.event_id));
    }
    reply.json_or_why().map_err(|why| {
        Outcome::failed(
            job.event_id,
            format!("GET /Users: HTTP {}: {why}", reply.status),
        )
    })
}

/// `GET /{endpoint}?filter=…`: the resources found.
async fn find(
    t: &ScimTarget,
    job: &Job,
    endpoint: &str,
    filter: &str,
    excluded: Option<&str>,
) -> Step<Vec<Value>> {
    let mut url = format!("{}/{endpoint}?filter={}", t.base(), pct(filter));
    if let Some(x) = excluded {
        url.push_str(&format!("&excludedAttributes={}", pct(x)));
    }
    let reply = t.send(job.event_id, Method::GET, &url, None, &[]).await?;
    let what = format!("GET /{endpoint}?filter");
    if !reply.ok() {
        return Err(reply.failure(&what).outcome(job.event_id));
    }
    let json = reply.json_or_why().map_err(|why| {
        Outcome::failed(
            job.event_id,
            format!("{what}: HTTP {}: {why}", reply.status),
        )
    })?;
    Ok(json
        .get("Resources")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

async fn membership(t: &ScimTarget, spc: ServiceProviderConfig, job: &Job) -> Step<Outcome> {
    let Some(group) = job.group.as_deref() else {
        return Err(Outcome::failed(
            job.event_id,
            format!("{} event has no group", job.kind.as_str()),
        ));
    };
    let user = account_id(job)?;
    let grant = job.kind == EventKind::Grant;
    for round in 0..2 {
        let Some(gid) =
            resolve_group(t, spc, job, group, grant && t.config().create_groups).await?
        else {
            if grant {
                return Err(Outcome::failed(
                    job.event_id,
                    format!(
                        "group \"{group}\" does not exist in target \"{}\" (set create_groups to create it)",
                        t.config().name
                    ),
                ));
            }
            // No such group: the account is not a member of it.
            return Ok(done(job, Some(user.to_string()), false, None));
        };
        let url = format!("{}/Groups/{}", t.base(), pct(&gid));
        let reply = if spc.patch {
            let op = if grant {
                json!({"op": "add", "path": "members", "value": [{"value": user}]})
            } else {
                let filter = format!("members[value eq {}]", Value::String(user.to_string()));
                json!({"op": "remove", "path": filter})
            };
            t.send_json(job.event_id, Method::PATCH, &url, &patch_request(vec![op]))
                .await?
        } else {
            put_membership(t, job, &url, user, grant).await?
        };
        if reply.ok() {
            return Ok(done(job, Some(user.to_string()), false, Some(reply.status)));
        }
        if reply.status == 404 && round == 0 {
            // The group was deleted (or recreated) since we cached its id: look it up again.
            t.groups.lock().await.remove(group);
            continue;
        }
        return Err(reply.failure("PATCH /Groups").outcome(job.event_id));
    }
    Err(Outcome::failed(job.event_id, "group lookup did not settle"))
}

/// Membership change for services without PATCH: read the group, edit, PUT it back.
async fn put_membership(
    t: &ScimTarget,
    job: &Job,
    url: &str,
    user: &str,
    grant: bool,
) -> Step<Reply> {
    let reply = t.send(job.event_id, Method::GET, url, None, &[]).await?;
    if !reply.ok() {
        return Ok(reply);
    }
    let mut group = reply
        .json_or_why()
        .and_then(|v| {
            v.as_object()
                .cloned()
                .ok_or_else(|| format!("the response is {}, not a group", json_type(&v)))
        })
        .map_err(|why| {
            Outcome::failed(
                job.event_id,
                format!("GET /Groups: HTTP {}: {why}", reply.status),
            )
        })?;
    let mut members: Vec<Value> = group
        .get("members")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_user = |m: &Value| m.get("value").and_then(Value::as_str) == Some(user);
    if grant {
        if !members.iter().any(is_user) {
            members.push(json!({"value": user}));
        }
    } else {
        members.retain(|m| !is_user(m));
    }
    group.insert("members".to_string(), Value::Array(members));
    group.remove("meta");
    t.send_json(job.event_id, Method::PUT, url, &Value::Object(group))
        .await
}

/// Every group of a service that cannot filter, page by page, without their members.
async fn list_groups(t: &ScimTarget, job: &Job) -> Step<Vec<Value>> {
    const PAGE: usize = 500;
    const MAX_PAGES: usize = 1000;
    let mut out = Vec::new();
    let mut start = 1usize;
    for _ in 0..MAX_PAGES {
        let url = format!(
            "{}/Groups?startIndex={start}&count={PAGE}&excludedAttributes=members",
            t.base()
        );
        let reply = t.send(job.event_id, Method::GET, &url, None, &[]).await?;
        if !reply.ok() {
            return Err(reply.failure("GET /Groups").outcome(job.event_id));
        }
        let json = reply.json().ok_or_else(|| {
            Outcome::failed(job.event_id, "GET /Groups: the response is not JSON")
        })?;
        let page = json
            .get("Resources")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let total = json.get("totalResults").and_then(Value::as_u64);
        let n = page.len();
        out.extend(page);
        start += n;
        let more = match total {
            Some(total) => (start as u64) <= total,
            None => n >= PAGE,
        };
        if n == 0 || !more {
            break;
        }
    }
    Ok(out)
}

/// The id of the group with this displayName: cached, looked up (by a filter, or in the list
/// of all groups when the service cannot filter), or created.
async fn resolve_group(
    t: &ScimTarget,
    spc: ServiceProviderConfig,
    job: &Job,
    name: &str,
    create: bool,
) -> Step<Option<String>> {
    let mut cache = t.groups.lock().await;
    if let Some(id) = cache.get(name) {
        return Ok(Some(id.clone()));
    }
    let filter = format!("displayName eq {}", Value::String(name.to_string()));
    for round in 0..2 {
        let found = if spc.filter {
            find(t, job, "Groups", &filter, Some("members")).await?
        } else {
            list_groups(t, job)
                .await?
                .into_iter()
                .filter(|g| {
                    g.get("displayName")
                        .and_then(Value::as_str)
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                })
                .collect()
        };
        // displayName is not unique in SCIM; prefer an exact (case-sensitive) match.
        let pick = found
            .iter()
            .find(|g| g.get("displayName").and_then(Value::as_str) == Some(name))
            .or_else(|| found.first());
        if let Some(id) = pick.and_then(|g| g.get("id")).and_then(Value::as_str) {
            cache.insert(name.to_string(), id.to_string());
            return Ok(Some(id.to_string()));
        }
        if !create || round > 0 {
            return Ok(None);
        }
        let url = format!("{}/Groups", t.base());
        let group = json!({"schemas": [GROUP_SCHEMA], "displayName": name});
        let reply = t
            .send_json(job.event_id, Method::POST, &url, &group)
            .await?;
        if reply.ok() {
            // Without an id in the answer, the second lookup finds the group.
            if let Ok(id) = resource_id(&reply) {
                cache.insert(name.to_string(), id.clone());
                return Ok(Some(id));
            }
        } else if reply.status != 409 {
            // 409: someone else created it meanwhile; the second lookup finds it.
            return Err(reply.failure("POST /Groups").outcome(job.event_id));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn ops_for_plain_and_filtered_paths() {
        let current = json!({"emails": [{"type": "work", "value": "old@x"}], "title": "a"});
        let ops = patch_ops(
            &m(json!({
                "name.givenName": "Zoë",
                "title": null,
                "emails[type eq \"work\"].value": "new@x",
                "emails[type eq \"home\"].value": "h@x",
                "emails[type eq \"home\"].primary": false,
            })),
            &current,
            false,
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![
                json!({"op": "replace", "path": "name.givenName", "value": "Zoë"}),
                json!({"op": "remove", "path": "title"}),
                json!({"op": "add", "path": "emails", "value": [{"type": "home", "value": "h@x", "primary": false}]}),
                json!({"op": "replace", "path": "emails[type eq \"work\"].value", "value": "new@x"}),
            ]
        );
    }

    #[test]
    fn an_emptied_element_is_removed_whole() {
        let current = json!({"emails": [{"type": "work", "value": "old@x"}]});
        let ops = patch_ops(
            &m(json!({"emails[type eq \"work\"].value": null})),
            &current,
            true,
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![json!({"op": "remove", "path": "emails[type eq \"work\"]"})]
        );
        // Nothing to remove where there is no element, or no value on the target's own copy.
        let ops = patch_ops(
            &m(json!({"emails[type eq \"home\"].value": null, "title": null})),
            &current,
            true,
        )
        .unwrap();
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn extension_elements_are_added_under_their_urn() {
        let urn = "urn:example:ext:1.0:User";
        let ops = patch_ops(
            &m(json!({format!("{urn}:badges[kind eq \"a\"].value"): "1"})),
            &json!({}),
            false,
        )
        .unwrap();
        assert_eq!(ops[0]["path"], json!(format!("{urn}:badges")));
    }
}
