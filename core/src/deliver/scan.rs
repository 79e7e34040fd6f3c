//! Reconcile scans of SCIM targets: what a service really holds, for `reconcile()`
//! (`src/reconcile.rs`, `sql/48_reconcile.sql`).
//!
//! A scan runs on the delivery runtime in three steps, each handing its results back to the
//! worker's main thread as [`ScanEvent`]s as they arrive (the main thread writes each page in a
//! short transaction of its own):
//!
//! 1. **Page** through `GET /Users?startIndex=&count=`, asking only for the mapped attributes
//!    with `attributes=` (a service that refuses that is asked again for whole resources; one
//!    that ignores it sends whole resources anyway, of which only the mapped paths are kept).
//!    Once the first page tells the total, the other pages are requested concurrently.
//! 2. **Look up** by id (`GET /Users/<id>`) every account the registry expects that paging did
//!    not return. Services page by index, so an account deleted while a scan runs shifts every
//!    later account one place back and one of them is never listed; without this step it would
//!    be reported `missing`, and a repair would create it a second time.
//! 3. **Groups**: page through `GET /Groups` and keep the members of the managed groups (a
//!    group listed without its `members` is read by id).
//!
//! Every request goes through the target's [`Client`]: its concurrency limit (shared with
//! delivery, so a scan never puts more than `max_concurrency` requests in flight beside it),
//! timeout, authentication and `max_response_bytes` (a page larger than that is asked for again
//! in halves). A transient failure (connection, timeout, 408, 429, 5xx) is tried again after the
//! delay of the one retry policy ([`crate::retry`]), honouring `Retry-After`, up to the scan's
//! `max_attempts`; anything else ends the scan with the target's error text.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use reqwest::Method;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::task::JoinSet;

use super::client::{pct, Client, Reply, SendError};
use super::config::TargetConfig;
use super::Target;
use crate::path::parse_path;
use crate::retry::{retry_delay, RETRY_BASE, RETRY_CAP};

/// What the worker asks a scan to read.
#[derive(Clone)]
pub struct ScanRequest {
    /// The reconcile run the pages belong to.
    pub run_id: i64,
    /// The target (a SCIM one).
    pub target: TargetConfig,
    /// The mapped attribute paths, as configured; the scanned values are keyed by them.
    pub paths: Vec<String>,
    /// The managed groups (`displayName`s) whose members are read.
    pub groups: Vec<String>,
    /// Ids of the accounts the registry holds: those paging does not return are looked up.
    pub expected: Vec<String>,
    /// Accounts asked for per page (a service may send fewer).
    pub page_size: usize,
    /// Attempts per request before a transient failure ends the scan (0 is taken as 1).
    pub max_attempts: u32,
}

impl fmt::Debug for ScanRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScanRequest")
            .field("run_id", &self.run_id)
            .field("target", &self.target)
            .field("paths", &self.paths)
            .field("groups", &self.groups)
            .field("expected", &self.expected.len())
            .field("page_size", &self.page_size)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// One account as scanned; serialised as `identity_sync._reconcile_page` reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScannedAccount {
    /// The service's id.
    pub remote_id: String,
    /// Its `userName`.
    pub identifier: Option<String>,
    /// Its `active` flag, when the service shows one.
    pub active: Option<bool>,
    /// The values of the mapped paths it has, keyed by the path as configured.
    pub attributes: Map<String, Value>,
}

/// The members of one managed group; serialised as `identity_sync._reconcile_groups` reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupMembers {
    /// The group's `displayName`, as managed.
    pub group: String,
    /// The ids of its members.
    pub members: Vec<String>,
}

/// What a scan hands back to the worker, in this order: pages of accounts, the members of the
/// managed groups once, and then `Done` (or `Failed`, after which nothing else comes).
#[derive(Debug, Clone, PartialEq)]
pub enum ScanEvent {
    /// One page of accounts (from paging, or from the look-up by id).
    Accounts {
        /// The run.
        run_id: i64,
        /// The accounts.
        accounts: Vec<ScannedAccount>,
    },
    /// The members of every managed group (a group the service does not have has none).
    Groups {
        /// The run.
        run_id: i64,
        /// One entry per managed group found.
        members: Vec<GroupMembers>,
    },
    /// Everything was read.
    Done {
        /// The run.
        run_id: i64,
        /// How it went.
        summary: ScanSummary,
    },
    /// The scan stopped: a permanent failure, or a transient one that outlasted its attempts.
    Failed {
        /// The run.
        run_id: i64,
        /// What went wrong, with the service's error text; never a secret.
        error: String,
    },
}

impl ScanEvent {
    /// The run this event belongs to.
    pub fn run_id(&self) -> i64 {
        match self {
            ScanEvent::Accounts { run_id, .. }
            | ScanEvent::Groups { run_id, .. }
            | ScanEvent::Done { run_id, .. }
            | ScanEvent::Failed { run_id, .. } => *run_id,
        }
    }
}

/// How a finished scan went, for the worker's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanSummary {
    /// Requests sent (retries included).
    pub requests: u32,
    /// Accounts paging returned.
    pub paged: u32,
    /// Accounts the registry expected that paging missed and a look-up by id found.
    pub found_by_id: u32,
    /// Whether the service answered `attributes=`; false: it refused it and whole users
    /// were read.
    pub projected: bool,
}

/// Runs one scan; `emit` receives its events in order (ending with `Done` or `Failed`).
pub(crate) async fn run(
    target: Arc<Target>,
    req: ScanRequest,
    emit: impl Fn(ScanEvent) + Send + Sync,
) {
    let run_id = req.run_id;
    let mut scan = Scan {
        target,
        req,
        requests: Arc::new(AtomicU32::new(0)),
    };
    match scan.all(&emit).await {
        Ok(summary) => emit(ScanEvent::Done { run_id, summary }),
        Err(e) => emit(ScanEvent::Failed {
            run_id,
            error: e.to_string(),
        }),
    }
}

struct Scan {
    target: Arc<Target>,
    req: ScanRequest,
    /// Requests sent so far, retries included (page requests run in tasks of their own).
    requests: Arc<AtomicU32>,
}

/// One page as a service answered it.
struct Page {
    start: usize,
    count: usize,
    total: Option<usize>,
    resources: Vec<Value>,
}

impl Scan {
    fn base(&self) -> Result<String, SendError> {
        match &*self.target {
            Target::Scim(t) => Ok(t.base().to_string()),
            Target::Webhook(_) => Err(SendError::permanent(format!(
                "target \"{}\" is not a scim target and cannot be scanned",
                self.req.target.name
            ))),
        }
    }

    async fn all(
        &mut self,
        emit: &(impl Fn(ScanEvent) + Send + Sync),
    ) -> Result<ScanSummary, SendError> {
        let base = self.base()?;
        let run_id = self.req.run_id;
        let paths = Paths::new(&self.req.paths);

        // 1. Page through the users.
        let mut seen: HashSet<String> = HashSet::new();
        let mut attributes = Some(paths.user_attributes());
        let mut paged = 0u32;
        self.page_all(&base, "Users", &mut attributes, &mut |resources| {
            let accounts: Vec<ScannedAccount> = resources
                .iter()
                .filter_map(|r| paths.account(r))
                .filter(|a| seen.insert(a.remote_id.clone()))
                .collect();
            paged += accounts.len() as u32;
            if !accounts.is_empty() {
                emit(ScanEvent::Accounts { run_id, accounts });
            }
        })
        .await?;
        let projected = attributes.is_some();

        // 2. Look up what the registry expects and paging did not show.
        let missed: Vec<String> = self
            .req
            .expected
            .iter()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let found_by_id = self
            .look_up(&base, missed, attributes.as_deref(), &paths, emit)
            .await?;

        // 3. The managed groups' members.
        let members = if self.req.groups.is_empty() {
            Vec::new()
        } else {
            self.group_members(&base).await?
        };
        emit(ScanEvent::Groups { run_id, members });

        Ok(ScanSummary {
            requests: self.requests.load(Ordering::Relaxed),
            paged,
            found_by_id,
            projected,
        })
    }

    /// Pages through `GET /{endpoint}`, handing each page's resources to `on_page`. With
    /// `attributes`, the first page asks for them; when the service refuses, `attributes`
    /// becomes `None` and every page asks for whole resources. A page larger than the target's
    /// `max_response_bytes` is asked for again in halves.
    async fn page_all(
        &mut self,
        base: &str,
        endpoint: &'static str,
        attributes: &mut Option<String>,
        on_page: &mut (dyn FnMut(Vec<Value>) + Send),
    ) -> Result<(), SendError> {
        let mut step = self.req.page_size.max(1);
        let first = loop {
            match self
                .page(base, endpoint, 1, step, attributes.as_deref())
                .await
            {
                Ok(p) => break p,
                Err(e) if e.is_too_large() => step = smaller(step, e)?,
                Err(SendError::Permanent {
                    http_status: Some(_),
                    ..
                }) if attributes.is_some() => {
                    // Refused (400 invalidValue, 403, 501 …): the whole resources, then.
                    *attributes = None;
                }
                Err(e) => return Err(e),
            }
        };
        let got = first.resources.len();
        let mut total = first.total;
        on_page(first.resources);
        if got == 0 {
            return Ok(());
        }
        // A service may cap the page size below what we ask: plan with what it sends.
        step = step.min(got);
        let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
        let mut planned_end = got; // the last index asked for
        match total {
            Some(t) => planned_end = plan(&mut queue, got + 1, t, step),
            // Without a total, page on until a page comes back short.
            None if got >= step => {
                queue.push_back((got + 1, step));
                planned_end = got + step;
            }
            None => {}
        }
        let window = self.req.target.max_concurrency.max(1);
        let mut running: JoinSet<(usize, usize, Result<Page, SendError>)> = JoinSet::new();
        loop {
            while running.len() < window {
                let Some((start, count)) = queue.pop_front() else {
                    break;
                };
                let fetch = self.page_task(base, endpoint, start, count, attributes.as_deref());
                running.spawn(async move { (start, count, fetch.await) });
            }
            let Some(joined) = running.join_next().await else {
                // Accounts added while we paged: read on up to the latest total, once more.
                match total {
                    Some(t) if t > planned_end => {
                        planned_end = plan(&mut queue, planned_end + 1, t, step);
                        continue;
                    }
                    _ => return Ok(()),
                }
            };
            let (start, count, result) = joined.map_err(|e| {
                SendError::permanent(format!("internal error: a page request failed: {e}"))
            })?;
            let page = match result {
                Ok(page) => page,
                Err(e) if e.is_too_large() => {
                    // Smaller pages from here on, this one's range included.
                    step = smaller(step.min(count), e)?;
                    let pending: Vec<(usize, usize)> = queue.drain(..).collect();
                    for (s, c) in std::iter::once((start, count)).chain(pending) {
                        plan(&mut queue, s, s + c - 1, step);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let n = page.resources.len();
            if let Some(t) = page.total {
                total = Some(t);
            }
            if n > 0 && n < page.count && page.start + n <= total.unwrap_or(0) {
                // A short page in the middle: ask for the rest of its range.
                queue.push_back((page.start + n, page.count - n));
            } else if total.is_none() && n >= page.count {
                queue.push_back((page.start + n, step));
                planned_end = planned_end.max(page.start + n + step - 1);
            }
            on_page(page.resources);
        }
    }

    /// One page request, as a future that can run beside the others.
    fn page_task(
        &self,
        base: &str,
        endpoint: &'static str,
        start: usize,
        count: usize,
        attributes: Option<&str>,
    ) -> impl std::future::Future<Output = Result<Page, SendError>> + Send + 'static {
        let target = Arc::clone(&self.target);
        let requests = Arc::clone(&self.requests);
        let url = page_url(base, endpoint, start, count, attributes);
        let max_attempts = self.req.max_attempts;
        async move {
            let what = format!("GET /{endpoint}");
            let reply = fetch(target.client(), &requests, &url, &what, max_attempts).await?;
            Page::parse(&reply, start, count, &what)
        }
    }

    async fn page(
        &mut self,
        base: &str,
        endpoint: &'static str,
        start: usize,
        count: usize,
        attributes: Option<&str>,
    ) -> Result<Page, SendError> {
        self.page_task(base, endpoint, start, count, attributes)
            .await
    }

    /// `GET /Users/<id>` for each id, concurrently; hands what exists on as pages. Returns how
    /// many were found.
    async fn look_up(
        &mut self,
        base: &str,
        ids: Vec<String>,
        attributes: Option<&str>,
        paths: &Paths,
        emit: &(impl Fn(ScanEvent) + Send + Sync),
    ) -> Result<u32, SendError> {
        let mut found = 0u32;
        let mut page: Vec<ScannedAccount> = Vec::new();
        let window = self.req.target.max_concurrency.max(1);
        let mut queue = ids.into_iter();
        let mut running: JoinSet<Result<Option<Value>, SendError>> = JoinSet::new();
        loop {
            while running.len() < window {
                let Some(id) = queue.next() else { break };
                let target = Arc::clone(&self.target);
                let mut url = format!("{base}/Users/{}", pct(&id));
                if let Some(a) = attributes {
                    url.push_str(&format!("?attributes={}", pct(a)));
                }
                let max_attempts = self.req.max_attempts;
                let requests = Arc::clone(&self.requests);
                running.spawn(async move {
                    let what = "GET /Users/<id>";
                    let reply = fetch(target.client(), &requests, &url, what, max_attempts).await?;
                    if reply.status == 404 {
                        return Ok(None);
                    }
                    if !reply.ok() {
                        return Err(reply.failure(what));
                    }
                    Ok(Some(json_of(&reply, what)?))
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let resource = joined.map_err(|e| {
                SendError::permanent(format!("internal error: a look-up failed: {e}"))
            })??;
            if let Some(account) = resource.as_ref().and_then(|r| paths.account(r)) {
                found += 1;
                page.push(account);
                if page.len() >= self.req.page_size.max(1) {
                    emit(ScanEvent::Accounts {
                        run_id: self.req.run_id,
                        accounts: std::mem::take(&mut page),
                    });
                }
            }
        }
        if !page.is_empty() {
            emit(ScanEvent::Accounts {
                run_id: self.req.run_id,
                accounts: page,
            });
        }
        Ok(found)
    }

    /// The members of the managed groups, from paging through `GET /Groups`.
    async fn group_members(&mut self, base: &str) -> Result<Vec<GroupMembers>, SendError> {
        let wanted: HashSet<String> = self.req.groups.iter().cloned().collect();
        let mut listed: Vec<(String, String, Option<Vec<String>>)> = Vec::new();
        let mut attributes = Some("displayName,members".to_string());
        self.page_all(base, "Groups", &mut attributes, &mut |resources| {
            for g in resources {
                let Some(name) = g.get("displayName").and_then(Value::as_str) else {
                    continue;
                };
                if !wanted.contains(name) {
                    continue;
                }
                let Some(id) = id_of(&g) else { continue };
                listed.push((name.to_string(), id, member_ids(&g)));
            }
        })
        .await?;
        let mut out: Vec<GroupMembers> = Vec::new();
        for (name, id, members) in listed {
            let members = match members {
                Some(m) => m,
                None => {
                    // Listed without its members (some services leave them out of lists).
                    let url = format!("{base}/Groups/{}", pct(&id));
                    let reply = fetch(
                        self.target.client(),
                        &self.requests,
                        &url,
                        "GET /Groups/<id>",
                        self.req.max_attempts,
                    )
                    .await?;
                    if !reply.ok() {
                        return Err(reply.failure("GET /Groups/<id>"));
                    }
                    member_ids(&json_of(&reply, "GET /Groups/<id>")?).unwrap_or_default()
                }
            };
            // displayName is not unique in SCIM: two groups of one name are one managed group.
            match out.iter_mut().find(|g| g.group == name) {
                Some(g) => g.members.extend(members),
                None => out.push(GroupMembers {
                    group: name,
                    members,
                }),
            }
        }
        Ok(out)
    }
}

impl Page {
    fn parse(reply: &Reply, start: usize, count: usize, what: &str) -> Result<Page, SendError> {
        if !reply.ok() {
            return Err(reply.failure(what));
        }
        let json = json_of(reply, what)?;
        let total = json
            .get("totalResults")
            .and_then(Value::as_u64)
            .map(|t| t as usize);
        let resources = match json.get("Resources") {
            Some(Value::Array(a)) => a.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                return Err(SendError::permanent(format!(
                    "{what}: the response's Resources is not a list"
                )))
            }
        };
        Ok(Page {
            start,
            count,
            total,
            resources,
        })
    }
}

/// Sends a GET, trying a transient failure again after the retry policy's delay (at least the
/// service's `Retry-After`), up to `max_attempts` times; 501 is not transient here (the service
/// does not implement what was asked). Counts each request sent in `requests`. Returns the
/// last reply when it is a success or a 404.
async fn fetch(
    client: &Client,
    requests: &AtomicU32,
    url: &str,
    what: &str,
    max_attempts: u32,
) -> Result<Reply, SendError> {
    let max_attempts = max_attempts.max(1);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = {
            let _permit = client.permit().await?;
            requests.fetch_add(1, Ordering::Relaxed);
            client.send(None, Method::GET, url, None, &[]).await
        };
        let error = match result {
            Ok(reply) if reply.status == 501 => {
                return Err(SendError::Permanent {
                    error: format!("{what}: HTTP 501: {}", reply.error_text()),
                    http_status: Some(501),
                })
            }
            Ok(reply) if reply.ok() || reply.status == 404 => return Ok(reply),
            Ok(reply) => reply.failure(what),
            Err(e) => e.context(what),
        };
        let SendError::Transient { retry_after, .. } = &error else {
            return Err(error);
        };
        if attempt >= max_attempts {
            return Err(error.context(&format!("gave up after {attempt} attempts")));
        }
        let delay = retry_delay(
            attempt,
            RETRY_BASE,
            RETRY_CAP,
            *retry_after,
            &mut rand::rng(),
        );
        tokio::time::sleep(delay).await;
    }
}

fn page_url(
    base: &str,
    endpoint: &str,
    start: usize,
    count: usize,
    attributes: Option<&str>,
) -> String {
    let mut url = format!("{base}/{endpoint}?startIndex={start}&count={count}");
    if let Some(a) = attributes {
        url.push_str(&format!("&attributes={}", pct(a)));
    }
    url
}

/// Queues the ranges `from..=to` in pieces of `step`; returns the last index queued.
fn plan(queue: &mut VecDeque<(usize, usize)>, from: usize, to: usize, step: usize) -> usize {
    let mut s = from;
    while s <= to {
        let count = step.min(to - s + 1);
        queue.push_back((s, count));
        s += count;
    }
    to.max(from.saturating_sub(1))
}

/// Half the page size after a page larger than the target's `max_response_bytes`; when a single
/// resource is too large already, the error, saying what to do.
fn smaller(step: usize, e: SendError) -> Result<usize, SendError> {
    if step > 1 {
        return Ok(step / 2);
    }
    Err(e.context(
        "even one resource a page is too large (raise the target option max_response_bytes)",
    ))
}

fn json_of(reply: &Reply, what: &str) -> Result<Value, SendError> {
    reply
        .json()
        .ok_or_else(|| SendError::permanent(format!("{what}: the response is not JSON")))
}

fn id_of(resource: &Value) -> Option<String> {
    match resource.get("id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A group's member ids; `None` when the resource has no `members` at all (not read), as
/// opposed to an empty list.
fn member_ids(group: &Value) -> Option<Vec<String>> {
    let members = group
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("members"))
        .map(|(_, v)| v)?;
    Some(
        members
            .as_array()
            .map(|a| a.iter().filter_map(id_of_member).collect())
            .unwrap_or_default(),
    )
}

fn id_of_member(m: &Value) -> Option<String> {
    match m.get("value")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The mapped paths, parsed once.
struct Paths {
    parsed: Vec<(String, crate::path::AttrPath)>,
}

impl Paths {
    fn new(paths: &[String]) -> Self {
        Paths {
            // Paths were checked by map(); one that no longer parses is not read.
            parsed: paths
                .iter()
                .filter_map(|p| parse_path(p).ok().map(|a| (p.clone(), a)))
                .collect(),
        }
    }

    /// The `attributes=` list: each mapped path as an attribute name (a filtered path asks
    /// for its whole multi-valued attribute, which holds the value it selects on), plus
    /// `userName` and `active`.
    fn user_attributes(&self) -> String {
        let mut names: Vec<String> = vec!["userName".into(), "active".into()];
        for (_, p) in &self.parsed {
            let mut name = String::new();
            if let Some(u) = &p.urn {
                name.push_str(u);
                name.push(':');
            }
            name.push_str(&p.attr);
            if let (None, Some(sub)) = (&p.filter, &p.sub_attr) {
                name.push('.');
                name.push_str(sub);
            }
            if !names.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
                names.push(name);
            }
        }
        names.join(",")
    }

    /// A user resource as a scanned account: its id, `userName`, `active`, and the values of
    /// the mapped paths (nothing else is kept).
    fn account(&self, resource: &Value) -> Option<ScannedAccount> {
        let remote_id = id_of(resource)?;
        let obj = resource.as_object()?;
        let field = |name: &str| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        };
        let identifier = field("userName")
            .and_then(Value::as_str)
            .map(str::to_string);
        // Some services send the flag as a string.
        let active = field("active").and_then(|v| match v {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        });
        let attributes = self
            .parsed
            .iter()
            .filter_map(|(raw, p)| p.get(resource).map(|v| (raw.clone(), v.clone())))
            .collect();
        Some(ScannedAccount {
            remote_id,
            identifier,
            active,
            attributes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(p: &[&str]) -> Paths {
        Paths::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn attributes_asked_for() {
        let p = paths(&[
            "userName",
            "name.givenName",
            "emails[type eq \"work\"].value",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value",
            "externalId",
        ]);
        assert_eq!(
            p.user_attributes(),
            "userName,active,name.givenName,emails,\
             urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department,\
             urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value,externalId"
        );
    }

    #[test]
    fn only_mapped_values_are_kept() {
        let ent = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
        let p = paths(&[
            "userName",
            "name.familyName",
            "emails[type eq \"work\"].value",
            &format!("{ent}:department"),
            "title",
        ]);
        let user = json!({
            "id": 42, "userName": "zoe", "active": "False", "nickName": "not mapped",
            "name": {"givenName": "Zoë", "familyName": "Berg"},
            "emails": [{"type": "home", "value": "h@x"}, {"type": "Work", "value": "w@x"}],
            ent: {"department": "IT", "costCenter": "not mapped"},
        });
        let a = p.account(&user).unwrap();
        assert_eq!(a.remote_id, "42");
        assert_eq!(a.identifier.as_deref(), Some("zoe"));
        assert_eq!(a.active, Some(false));
        assert_eq!(
            Value::Object(a.attributes),
            json!({
                "userName": "zoe",
                "name.familyName": "Berg",
                "emails[type eq \"work\"].value": "w@x",
                format!("{ent}:department"): "IT",
            })
        );
        assert!(p.account(&json!({"userName": "no id"})).is_none());
        assert_eq!(p.account(&json!({"id": "x"})).unwrap().active, None);
    }

    #[test]
    fn group_members_are_read_when_listed() {
        assert_eq!(
            member_ids(&json!({"members": [{"value": "a"}, {"value": 7}, {"display": "x"}]})),
            Some(vec!["a".to_string(), "7".to_string()])
        );
        assert_eq!(member_ids(&json!({"Members": []})), Some(vec![]));
        assert_eq!(member_ids(&json!({"displayName": "g"})), None);
    }

    #[test]
    fn page_urls() {
        assert_eq!(
            page_url(
                "http://h/v2",
                "Users",
                501,
                500,
                Some("userName,name.givenName")
            ),
            "http://h/v2/Users?startIndex=501&count=500&attributes=userName%2Cname.givenName"
        );
        assert_eq!(
            page_url("http://h/v2", "Groups", 1, 10, None),
            "http://h/v2/Groups?startIndex=1&count=10"
        );
    }
}
