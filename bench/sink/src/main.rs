//! `bench-sink`: a loopback HTTP/1.1 server for `bench/run` that answers at once and records
//! when each provisioning request arrived, with the person it was for.
//!
//!     bench-sink <port>
//!
//! Answers, on any path prefix (so `http://127.0.0.1:P/hook` and `http://127.0.0.1:P/v2` both work):
//! - webhook: `POST <anything else>` → `200` (empty body); the JSON body's `person_key` and
//!   `type` are recorded;
//! - SCIM (the users and groups are kept in memory, see `scim.rs`):
//!   - `GET …/ServiceProviderConfig` (PATCH and filter supported);
//!   - `POST …/Users` → `201` with the stored user, `id` = `u-<externalId>` (so later requests
//!     name the person; `u-n<k>` without externalId, and a second POST with one externalId
//!     replaces the first); `POST …/Groups` → `201`, `id` = `g-<displayName>`;
//!   - `GET …/Users` and `…/Groups`: a ListResponse (RFC 7644 §3.4.2) of the resources held, in
//!     the order they were created, paged by `startIndex` (1-based, default 1) and `count`
//!     (default 100, at most 1000 per page: advance by `itemsPerPage`), with `attributes=` /
//!     `excludedAttributes=`, and `filter=` with `eq` comparisons joined by `and` (anything
//!     else is `400 invalidFilter`);
//!   - `GET …/Users/<id>` → the user or `404`; `PATCH …/Users/<id>` (and Groups) applies the
//!     operations → `204` (`400` with the scimType when one cannot apply); `PUT` replaces →
//!     `200`; `DELETE` → `204` (a deleted user leaves every group). PATCH, PUT and DELETE of an
//!     id the sink does not hold still answer `204`/`200`, as before, so `wrk` can PATCH a
//!     made-up user;
//! - control: `GET /_stats` (counts as JSON, with `users` and `groups` held), `GET /_dump` (one
//!   line per recorded request: `<unix time in µs> <kind> <person key>`), `POST /_reset`
//!   (forget the records and counts, keep the users and groups), `POST /_clear` (forget the
//!   users and groups);
//! - anything else, e.g. wrk's `GET /`: `200 ok`.
//!
//! Arrival is taken with the system clock (CLOCK_REALTIME) when a request has been read whole,
//! so the bench can compare it with commit times taken by PostgreSQL on the same machine.

mod scim;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    records: Mutex<Vec<(u64, &'static str, String)>>,
    requests: AtomicU64,
    webhook: AtomicU64,
    scim_create: AtomicU64,
    scim_patch: AtomicU64,
    scim_other: AtomicU64,
    connections: AtomicU64,
    next_id: AtomicU64,
    users: Mutex<scim::Store>,
    groups: Mutex<scim::Store>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn main() {
    let port: u16 = match std::env::args().nth(1).and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: bench-sink <port>");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-sink: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bench-sink: cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("bench-sink: listening on 127.0.0.1:{port}");
        let state = Arc::new(State::default());
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            state.connections.fetch_add(1, Ordering::Relaxed);
            let state = state.clone();
            tokio::spawn(async move {
                let _ = serve(conn, state).await;
            });
        }
    });
}

struct Parsed {
    method: String,
    path: String,
    body_start: usize,
    content_length: usize,
    close: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Parsed>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(n) => {
            let mut content_length = 0;
            let mut close = req.version == Some(0);
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    content_length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.eq_ignore_ascii_case(b"close");
                }
            }
            Ok(Some(Parsed {
                method: req.method.unwrap_or("").to_string(),
                path: req.path.unwrap_or("").to_string(),
                body_start: n,
                content_length,
                close,
            }))
        }
    }
}

async fn serve(mut conn: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Answer every complete request in the buffer (pipelining), then write once.
        let mut close = false;
        loop {
            let parsed = match parse_head(&buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => {
                    conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await?;
                    return Ok(());
                }
            };
            let end = parsed.body_start + parsed.content_length;
            if buf.len() < end {
                break;
            }
            let at = now_us();
            let body = &buf[parsed.body_start..end];
            respond(&state, &parsed, body, at, &mut out);
            close = parsed.close;
            buf.drain(..end);
            if close {
                break;
            }
        }
        if !out.is_empty() {
            conn.write_all(&out).await?;
            out.clear();
        }
        if close {
            return Ok(());
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn reply(out: &mut Vec<u8>, status: &str, content_type: Option<&str>, body: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(ct) = content_type {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(ct.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

const SCIM: &str = "application/scim+json";

fn record(state: &State, at: u64, kind: &'static str, key: String) {
    if let Ok(mut r) = state.records.lock() {
        r.push((at, kind, key));
    }
}

fn respond(state: &State, req: &Parsed, body: &[u8], at: u64, out: &mut Vec<u8>) {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let (path, query) = req.path.split_once('?').unwrap_or((req.path.as_str(), ""));
    let method = req.method.as_str();
    match (method, path) {
        ("GET", "/_stats") => {
            let s = serde_json::json!({
                "requests": state.requests.load(Ordering::Relaxed),
                "webhook": state.webhook.load(Ordering::Relaxed),
                "scim_create": state.scim_create.load(Ordering::Relaxed),
                "scim_patch": state.scim_patch.load(Ordering::Relaxed),
                "scim_other": state.scim_other.load(Ordering::Relaxed),
                "connections": state.connections.load(Ordering::Relaxed),
                "recorded": state.records.lock().map_or(0, |r| r.len()),
                "users": state.users.lock().map_or(0, |s| s.len()),
                "groups": state.groups.lock().map_or(0, |s| s.len()),
            });
            reply(out, "200 OK", Some("application/json"), s.to_string().as_bytes());
        }
        ("GET", "/_dump") => {
            let mut text = String::new();
            if let Ok(r) = state.records.lock() {
                for (t, kind, key) in r.iter() {
                    text.push_str(&format!("{t}\t{kind}\t{key}\n"));
                }
            }
            reply(out, "200 OK", Some("text/plain"), text.as_bytes());
        }
        ("POST", "/_reset") => {
            if let Ok(mut r) = state.records.lock() {
                r.clear();
            }
            for c in [
                &state.requests,
                &state.webhook,
                &state.scim_create,
                &state.scim_patch,
                &state.scim_other,
            ] {
                c.store(0, Ordering::Relaxed);
            }
            reply(out, "204 No Content", None, b"");
        }
        ("POST", "/_clear") => {
            for store in [&state.users, &state.groups] {
                if let Ok(mut s) = store.lock() {
                    s.clear();
                }
            }
            state.next_id.store(0, Ordering::Relaxed);
            reply(out, "204 No Content", None, b"");
        }
        _ if path.ends_with("/ServiceProviderConfig") => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            let spc = br#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],"patch":{"supported":true},"bulk":{"supported":false,"maxOperations":0,"maxPayloadSize":0},"filter":{"supported":true,"maxResults":100},"changePassword":{"supported":false},"sort":{"supported":false},"etag":{"supported":false},"authenticationSchemes":[]}"#;
            reply(out, "200 OK", Some(SCIM), spc);
        }
        ("GET", p) if p.ends_with("/Users") || p.ends_with("/Groups") => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            let store = if p.ends_with("/Users") { &state.users } else { &state.groups };
            list(store, query, out);
        }
        ("POST", p) if p.ends_with("/Users") || p.ends_with("/Groups") => {
            state.scim_create.fetch_add(1, Ordering::Relaxed);
            let users = p.ends_with("/Users");
            let Ok(Value::Object(mut res)) = serde_json::from_slice::<Value>(body) else {
                return scim_error(out, "400 Bad Request", Some("invalidSyntax"));
            };
            let named = if users { "externalId" } else { "displayName" };
            let key = res
                .get(named)
                .and_then(Value::as_str)
                .or_else(|| res.get("displayName").and_then(Value::as_str))
                .unwrap_or("")
                .to_string();
            let prefix = if users { "u-" } else { "g-" };
            let id = match res.get(named).and_then(Value::as_str) {
                Some(k) if !k.is_empty() => format!("{prefix}{k}"),
                _ => format!(
                    "{prefix}n{}",
                    state.next_id.fetch_add(1, Ordering::Relaxed) + 1
                ),
            };
            record(state, at, "scim_create", key);
            res.insert("id".to_string(), Value::String(id.clone()));
            let res = Value::Object(res);
            let text = res.to_string();
            if let Ok(mut store) = if users { &state.users } else { &state.groups }.lock() {
                store.put(id, res);
            }
            reply(out, "201 Created", Some(SCIM), text.as_bytes());
        }
        ("GET", p) if item(p).is_some() => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            let Some((users, id)) = item(p) else { return };
            let store = if users { &state.users } else { &state.groups };
            let found = store.lock().ok().and_then(|s| {
                s.get(&id).map(|r| {
                    let attrs = scim::query_param(query, "attributes");
                    let excluded = scim::query_param(query, "excludedAttributes");
                    scim::project(r, attrs.as_deref(), excluded.as_deref()).to_string()
                })
            });
            match found {
                Some(text) => reply(out, "200 OK", Some(SCIM), text.as_bytes()),
                None => scim_error(out, "404 Not Found", None),
            }
        }
        ("PATCH", p) if item(p).is_some() => {
            state.scim_patch.fetch_add(1, Ordering::Relaxed);
            let Some((users, id)) = item(p) else { return };
            let key = id.strip_prefix("u-").unwrap_or(&id).to_string();
            record(state, at, "scim_patch", key);
            let store = if users { &state.users } else { &state.groups };
            let Ok(mut store) = store.lock() else {
                return reply(out, "204 No Content", None, b"");
            };
            if let Some(res) = store.get_mut(&id) {
                let Ok(ops) = serde_json::from_slice::<Value>(body) else {
                    return scim_error(out, "400 Bad Request", Some("invalidSyntax"));
                };
                // All operations or none (RFC 7644 §3.5.2).
                let mut changed = res.clone();
                if let Err(scim_type) = scim::apply_patch(&mut changed, &ops) {
                    return scim_error(out, "400 Bad Request", Some(scim_type));
                }
                *res = changed;
            }
            reply(out, "204 No Content", None, b"");
        }
        ("PUT", p) if item(p).is_some() => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            let Some((users, id)) = item(p) else { return };
            let store = if users { &state.users } else { &state.groups };
            let mut answer = body.to_vec();
            if let (Ok(mut store), Ok(Value::Object(mut res))) =
                (store.lock(), serde_json::from_slice::<Value>(body))
            {
                if let Some(slot) = store.get_mut(&id) {
                    res.insert("id".to_string(), Value::String(id.clone()));
                    res.remove("meta");
                    *slot = Value::Object(res);
                    answer = slot.to_string().into_bytes();
                }
            }
            reply(out, "200 OK", Some(SCIM), &answer);
        }
        ("DELETE", p) => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            if let Some((users, id)) = item(p) {
                if users {
                    let removed = state.users.lock().is_ok_and(|mut s| s.remove(&id));
                    if removed {
                        if let Ok(mut groups) = state.groups.lock() {
                            leave_groups(&mut groups, &id);
                        }
                    }
                } else if let Ok(mut groups) = state.groups.lock() {
                    groups.remove(&id);
                }
            }
            reply(out, "204 No Content", None, b"");
        }
        ("POST", _) => {
            state.webhook.fetch_add(1, Ordering::Relaxed);
            // Recorded only when it looks like an identity_sync event (wrk's posts are not).
            if body.starts_with(b"{") {
                if let Ok(v) = serde_json::from_slice::<Value>(body) {
                    if let Some(key) = v.get("person_key").and_then(Value::as_str) {
                        let kind = match v.get("type").and_then(Value::as_str) {
                            Some("create") => "webhook_create",
                            Some("update") => "webhook_update",
                            _ => "webhook_other",
                        };
                        record(state, at, kind, key.to_string());
                    }
                }
            }
            reply(out, "200 OK", None, b"");
        }
        _ => reply(out, "200 OK", Some("text/plain"), b"ok"),
    }
}

/// `…/Users/<id>` → (true, id), `…/Groups/<id>` → (false, id), the id percent-decoded.
fn item(path: &str) -> Option<(bool, String)> {
    let (users, at) = match (path.rfind("/Users/"), path.rfind("/Groups/")) {
        (Some(u), Some(g)) if g > u => (false, g + "/Groups/".len()),
        (Some(u), _) => (true, u + "/Users/".len()),
        (None, Some(g)) => (false, g + "/Groups/".len()),
        (None, None) => return None,
    };
    let id = &path[at..];
    (!id.is_empty() && !id.contains('/')).then(|| (users, scim::pct_decode_path(id)))
}

fn scim_error(out: &mut Vec<u8>, status: &str, scim_type: Option<&str>) {
    let code = status.split(' ').next().unwrap_or("400");
    let mut e = serde_json::json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
        "status": code,
    });
    if let Some(t) = scim_type {
        e["scimType"] = Value::String(t.to_string());
        e["detail"] = Value::String(format!("bench-sink: {t}"));
    }
    reply(out, status, Some(SCIM), e.to_string().as_bytes());
}

const DEFAULT_COUNT: usize = 100;
const MAX_COUNT: usize = 1000;

/// `GET /Users` or `/Groups`: one page of a ListResponse.
fn list(store: &Mutex<scim::Store>, query: &str, out: &mut Vec<u8>) {
    let start_index = scim::query_param(query, "startIndex")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map_or(1, |v| v.max(1) as usize);
    let count = scim::query_param(query, "count")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map_or(DEFAULT_COUNT, |v| v.clamp(0, MAX_COUNT as i64) as usize);
    let attrs = scim::query_param(query, "attributes");
    let excluded = scim::query_param(query, "excludedAttributes");
    let filter = match scim::query_param(query, "filter") {
        Some(f) => match scim::parse_filter(&f) {
            Some(terms) => Some(terms),
            None => return scim_error(out, "400 Bad Request", Some("invalidFilter")),
        },
        None => None,
    };
    let Ok(store) = store.lock() else {
        return scim_error(out, "500 Internal Server Error", None);
    };
    let write = |body: &mut Vec<u8>, r: &Value| {
        if attrs.is_none() && excluded.is_none() {
            let _ = serde_json::to_writer(&mut *body, r);
        } else {
            let p = scim::project(r, attrs.as_deref(), excluded.as_deref());
            let _ = serde_json::to_writer(&mut *body, &p);
        }
    };
    let mut resources = Vec::with_capacity(count.min(store.len()) * 256 + 2);
    let (total, shown) = match &filter {
        None => {
            let mut shown = 0;
            for r in store.page(start_index, count) {
                resources.push(if shown == 0 { b'[' } else { b',' });
                write(&mut resources, r);
                shown += 1;
            }
            (store.len(), shown)
        }
        Some(terms) => {
            let (mut total, mut shown) = (0, 0);
            for r in store.iter().filter(|r| scim::matches(r, terms)) {
                total += 1;
                if total >= start_index && shown < count {
                    resources.push(if shown == 0 { b'[' } else { b',' });
                    write(&mut resources, r);
                    shown += 1;
                }
            }
            (total, shown)
        }
    };
    drop(store);
    if shown == 0 {
        resources.push(b'[');
    }
    resources.push(b']');
    let mut body = format!(
        r#"{{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],"totalResults":{total},"startIndex":{start_index},"itemsPerPage":{shown},"Resources":"#
    )
    .into_bytes();
    body.extend_from_slice(&resources);
    body.push(b'}');
    reply(out, "200 OK", Some(SCIM), &body);
}

/// Removes a deleted user from every group's members.
fn leave_groups(groups: &mut scim::Store, user: &str) {
    for g in groups.iter_mut() {
        if let Some(Value::Array(members)) = g.get_mut("members") {
            members.retain(|m| m.get("value").and_then(Value::as_str) != Some(user));
        }
    }
}
