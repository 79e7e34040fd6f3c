//! `bench-sink`: a loopback HTTP/1.1 server for `bench/run` that answers at once and records
//! when each provisioning request arrived, with the person it was for.
//!
//!     bench-sink <port>
//!
//! Answers, on any path prefix (so `http://127.0.0.1:P/hook` and `http://127.0.0.1:P/v2` both work):
//! - webhook: `POST <anything else>` → `200` (empty body); the JSON body's `person_key` and
//!   `type` are recorded;
//! - SCIM: `GET …/ServiceProviderConfig` (PATCH and filter supported), `GET …/Users?filter=…`
//!   (an empty list), `POST …/Users` → `201` with `id` = `u-<externalId>` (so later requests
//!   name the person), `PATCH …/Users/<id>` → `204`, `PUT` → `200`, `DELETE` → `204`;
//! - control: `GET /_stats` (counts as JSON), `GET /_dump` (one line per recorded request:
//!   `<unix time in µs> <kind> <person key>`), `POST /_reset` (forget the records);
//! - anything else, e.g. wrk's `GET /`: `200 ok`.
//!
//! Arrival is taken with the system clock (CLOCK_REALTIME) when a request has been read whole,
//! so the bench can compare it with commit times taken by PostgreSQL on the same machine.

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
    let path = req.path.split('?').next().unwrap_or("");
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
        _ if path.ends_with("/ServiceProviderConfig") => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            let spc = br#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],"patch":{"supported":true},"bulk":{"supported":false,"maxOperations":0,"maxPayloadSize":0},"filter":{"supported":true,"maxResults":100},"changePassword":{"supported":false},"sort":{"supported":false},"etag":{"supported":false},"authenticationSchemes":[]}"#;
            reply(out, "200 OK", Some(SCIM), spc);
        }
        ("GET", p) if p.ends_with("/Users") || p.ends_with("/Groups") => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            let empty = br#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],"totalResults":0,"startIndex":1,"itemsPerPage":0,"Resources":[]}"#;
            reply(out, "200 OK", Some(SCIM), empty);
        }
        ("POST", p) if p.ends_with("/Users") || p.ends_with("/Groups") => {
            state.scim_create.fetch_add(1, Ordering::Relaxed);
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let key = v
                .get("externalId")
                .and_then(Value::as_str)
                .or_else(|| v.get("displayName").and_then(Value::as_str))
                .unwrap_or("")
                .to_string();
            let id = format!("u-{key}");
            record(state, at, "scim_create", key);
            let resp = serde_json::json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "id": id,
            });
            reply(out, "201 Created", Some(SCIM), resp.to_string().as_bytes());
        }
        ("PATCH", p) if p.contains("/Users/") || p.contains("/Groups/") => {
            state.scim_patch.fetch_add(1, Ordering::Relaxed);
            let id = p.rsplit('/').next().unwrap_or("");
            let key = id.strip_prefix("u-").unwrap_or(id).to_string();
            record(state, at, "scim_patch", key);
            reply(out, "204 No Content", None, b"");
        }
        ("PUT", p) if p.contains("/Users/") || p.contains("/Groups/") => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
            reply(out, "200 OK", Some(SCIM), body);
        }
        ("DELETE", _) => {
            state.scim_other.fetch_add(1, Ordering::Relaxed);
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
