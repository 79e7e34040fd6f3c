//! Delivery against hostile or broken targets (issue 13 item 8), end to end with the harness
//! cluster's worker: 2xx answers that are not acknowledgements (an HTML page, JSON cut short,
//! a body cut off by the connection), a SCIM service that creates without saying the id, a
//! body that never ends (fast, or a byte at a time), a server that accepts the connection and
//! never answers, a server that answers with something that is not HTTP. Each gives its events
//! a clear error in `events.last_error`; none stops the worker (the same process throughout) or
//! holds up a healthy target beside it.
#![cfg(not(feature = "pg_test"))] // see tests/common/mod.rs

mod common;

use common::*;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Fresh state in the worker's database: the small employees sample and its sources; the
/// extension is dropped again when the guard goes.
fn fresh() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(&mut c, "small", "");
    (cleanup, c)
}

/// A webhook (or SCIM) target for the persons of department d001, who are few. Targets that
/// fail do so for seconds only, so no quarantine (1 minute) gets in the way.
fn add_target(c: &mut Client, name: &str, kind: &str, url: &str, options: &str) {
    let login = if kind == "scim" { "userName" } else { "login" };
    exec(
        c,
        &format!(
            "SELECT identity_sync.add_target('{name}', '{kind}', '{url}', '{options}');
             SELECT identity_sync.map('{name}', '{login}', $$person.first_name || '.' || person.last_name$$);
             SELECT identity_sync.map('{name}', 'externalId', 'person.emp_no::text');
             SELECT identity_sync.add_rule('{name}', 'd001', $$contract.dept_no = 'd001'$$);
             SELECT identity_sync.resync('{name}');"
        ),
    );
}

/// The healthy target beside the hostile ones.
fn add_healthy(c: &mut Client, receiver: &WebhookReceiver) {
    add_target(c, "healthy", "webhook", &receiver.url("/"), "{}");
}

/// `(state, last_error, http_status)` of every event of `target`, in id order.
fn events(c: &mut Client, target: &str) -> Vec<(String, Option<String>, Option<i32>)> {
    c.query(
        "SELECT state, last_error, http_status FROM identity_sync.events WHERE target = $1 ORDER BY id",
        &[&target],
    )
    .expect("read events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Wait up to 60 s until every event of `target` has been tried and its error says `error`;
/// `failed` for an answer that needs an operator, else events are retried (and between
/// attempts `retry`, `pending` or `sending`); else fail showing them.
fn wait_for_errors(c: &mut Client, target: &str, failed: bool, error: &str) {
    let settled = wait_until(Duration::from_secs(60), || {
        let evs = events(c, target);
        !evs.is_empty()
            && evs.iter().all(|(s, e, _)| {
                (if failed {
                    s == "failed"
                } else {
                    s != "failed" && s != "done"
                }) && e.as_deref().is_some_and(|e| e.contains(error))
            })
    });
    assert!(
        settled,
        "events of {target} are not all {} with \"{error}\":\n{:#?}",
        if failed { "failed" } else { "retried" },
        events(c, target)
    );
    let first = events(c, target).remove(0);
    println!(
        "{target}: {} {:?} (HTTP {:?})",
        first.0,
        first.1.unwrap_or_default(),
        first.2
    );
}

/// Wait until the healthy target has delivered every event it planned.
fn healthy_delivers(c: &mut Client, receiver: &WebhookReceiver) {
    let done = wait_until(Duration::from_secs(60), || {
        let evs = events(c, "healthy");
        !evs.is_empty() && evs.iter().all(|(s, _, _)| s == "done")
    });
    assert!(
        done,
        "the healthy target did not deliver: {:#?}",
        events(c, "healthy")
    );
    assert!(receiver.count() >= events(c, "healthy").len());
}

const SIGN_IN_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Sign in - Example SSO</title></head>\n<body><form>…</form></body></html>";

#[test]
fn webhook_answers_that_are_not_acknowledgements() {
    let (_cleanup, mut c) = fresh();
    let worker = worker_pid(&mut c).expect("a worker");
    let healthy = WebhookReceiver::start();
    // A web application at the url: its sign-in page, with 200.
    let html = WebhookReceiver::start_with(|_| {
        Response::ok()
            .header("Content-Type", "text/html; charset=utf-8")
            .body(SIGN_IN_PAGE)
    });
    // A receiver whose JSON answer is cut short (a complete HTTP message).
    let cut = WebhookReceiver::start_with(|_| {
        Response::ok()
            .header("Content-Type", "application/json")
            .body(r#"{"account_id": "u-"#)
    });
    // A receiver that acknowledges in plain text: fine.
    let plain = WebhookReceiver::start_with(|_| {
        Response::ok()
            .header("Content-Type", "text/plain")
            .body("OK")
    });
    // A connection closed in the middle of the body it announced.
    let truncated = RawServer::start(|mut s, _| {
        read_request(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"account_id\": \"u-",
        );
        let _ = s.shutdown(Shutdown::Both);
    });
    add_healthy(&mut c, &healthy);
    add_target(&mut c, "html", "webhook", &html.url("/"), "{}");
    add_target(&mut c, "cut", "webhook", &cut.url("/"), "{}");
    add_target(&mut c, "plain", "webhook", &plain.url("/"), "{}");
    add_target(&mut c, "truncated", "webhook", &truncated.url(), "{}");

    wait_for_errors(
        &mut c,
        "html",
        true,
        "POST webhook: HTTP 200 with an HTML page (\"Sign in - Example SSO\") instead of an answer of the target's API; is the url right?",
    );
    wait_for_errors(
        &mut c,
        "cut",
        true,
        "POST webhook: HTTP 200: the response is not valid JSON (EOF while parsing a string at line 1 column 18): {\"account_id\": \"u-",
    );
    // The body was promised and not delivered: the answer may come next time.
    wait_for_errors(
        &mut c,
        "truncated",
        false,
        "POST webhook: reading the response failed",
    );
    assert!(events(&mut c, "html")
        .iter()
        .all(|(_, _, status)| *status == Some(200)));
    let plain_done = wait_until(Duration::from_secs(60), || {
        let evs = events(&mut c, "plain");
        !evs.is_empty() && evs.iter().all(|(s, e, _)| s == "done" && e.is_none())
    });
    assert!(plain_done, "plain: {:#?}", events(&mut c, "plain"));
    healthy_delivers(&mut c, &healthy);
    assert_eq!(worker_pid(&mut c), Some(worker), "the worker was restarted");
}

#[test]
fn scim_creates_answered_without_an_id() {
    let (_cleanup, mut c) = fresh();
    let worker = worker_pid(&mut c).expect("a worker");
    let healthy = WebhookReceiver::start();
    // A SCIM service without /ServiceProviderConfig (so the defaults apply) that accepts every
    // user and answers with the resource but no id.
    let scim = |created: &'static str| {
        WebhookReceiver::start_with(move |req| match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/v2/Users") => Response::status(201)
                .header("Content-Type", "application/scim+json")
                .body(created),
            ("GET", p) if p.starts_with("/v2/Users?") => Response::ok()
                .header("Content-Type", "application/scim+json")
                .body(r#"{"totalResults": 0, "Resources": []}"#),
            _ => Response::status(404),
        })
    };
    let noid =
        scim(r#"{"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "x"}"#);
    let badid = scim(r#"{"id": {"value": 7}, "userName": "x"}"#);
    let empty = scim("");
    add_healthy(&mut c, &healthy);
    add_target(&mut c, "noid", "scim", &noid.url("/v2"), "{}");
    add_target(&mut c, "badid", "scim", &badid.url("/v2"), "{}");
    add_target(&mut c, "empty", "scim", &empty.url("/v2"), "{}");

    wait_for_errors(
        &mut c,
        "noid",
        true,
        "POST /Users: HTTP 201: the target accepted it but answered without its id",
    );
    wait_for_errors(
        &mut c,
        "badid",
        true,
        "POST /Users: HTTP 201: the id in the response is an object, not a string",
    );
    wait_for_errors(
        &mut c,
        "empty",
        true,
        "POST /Users: HTTP 201: the response body is empty",
    );
    // Nothing was linked: no account has a remote id it was not given.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM identity_sync.accounts WHERE target IN ('noid', 'badid', 'empty') AND remote_id IS NOT NULL"
        ),
        0
    );
    healthy_delivers(&mut c, &healthy);
    assert_eq!(worker_pid(&mut c), Some(worker), "the worker was restarted");
}

#[test]
fn endless_silent_and_garbled_targets_cost_only_their_own_events() {
    let (_cleanup, mut c) = fresh();
    let worker = worker_pid(&mut c).expect("a worker");
    let healthy = WebhookReceiver::start();
    // 200, then a chunked body that never ends.
    let endless = RawServer::start(|mut s, _| {
        read_request(&mut s);
        if s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            .is_err()
        {
            return;
        }
        let chunk = format!("1000\r\n{}\r\n", " ".repeat(0x1000));
        while s.write_all(chunk.as_bytes()).is_ok() {}
    });
    // 200, then a body that drips a byte at a time and never ends.
    let drip = RawServer::start(|mut s, stop| {
        read_request(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
        );
        while !stop.load(Ordering::SeqCst) && s.write_all(b" ").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // Accepts the connection, reads the request, never answers.
    let silent = RawServer::start(|mut s, stop| {
        read_request(&mut s);
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 1024];
        // Hold the connection until the client gives up (or the server stops).
        while !stop.load(Ordering::SeqCst) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    });
    // Answers with something that is not HTTP.
    let garbled = RawServer::start(|mut s, _| {
        read_request(&mut s);
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        let _ = s.shutdown(Shutdown::Both);
    });
    add_healthy(&mut c, &healthy);
    add_target(
        &mut c,
        "endless",
        "webhook",
        &endless.url(),
        r#"{"max_response_bytes": 65536}"#,
    );
    add_target(
        &mut c,
        "silent",
        "webhook",
        &silent.url(),
        r#"{"timeout": "1 s"}"#,
    );
    add_target(&mut c, "garbled", "webhook", &garbled.url(), "{}");
    add_target(
        &mut c,
        "drip",
        "webhook",
        &drip.url(),
        r#"{"timeout": "1 s"}"#,
    );

    wait_for_errors(
        &mut c,
        "endless",
        true,
        "POST webhook: the response body exceeds max_response_bytes (65536 bytes)",
    );
    wait_for_errors(
        &mut c,
        "silent",
        false,
        "POST webhook: request timed out after 1 s",
    );
    wait_for_errors(
        &mut c,
        "garbled",
        false,
        "POST webhook: request failed: invalid HTTP version parsed",
    );
    wait_for_errors(
        &mut c,
        "drip",
        false,
        "POST webhook: request timed out after 1 s",
    );
    // The healthy target delivered everything while those were failing, and a change made now
    // reaches it while they still fail.
    healthy_delivers(&mut c, &healthy);
    let before = healthy.count();
    exec(
        &mut c,
        "UPDATE employee SET last_name = last_name || '-x'
          WHERE emp_no = (SELECT min(emp_no) FROM dept_emp WHERE dept_no = 'd001' AND to_date = '9999-01-01')",
    );
    assert!(
        healthy.wait_for(before + 1, Duration::from_secs(30)),
        "the healthy target got no update while the others fail"
    );
    assert!(
        events(&mut c, "silent").iter().all(|(s, _, _)| s != "done"),
        "the silent target delivered something"
    );
    assert_eq!(worker_pid(&mut c), Some(worker), "the worker was restarted");
}

// ------------------------------------------------------------------------------------------
// A raw TCP server, for answers no HTTP server library would send
// ------------------------------------------------------------------------------------------

/// Accepts connections on a free loopback port and hands each to `serve` in a thread of its
/// own, with a flag set when the server stops (on drop), for connections it holds open.
struct RawServer {
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl RawServer {
    fn start(serve: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let serve = Arc::new(serve);
        let s = stop.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let (serve, stop) = (serve.clone(), s.clone());
                    std::thread::spawn(move || serve(conn, &stop));
                }
            }
        });
        RawServer {
            port,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the acceptor
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Read one request (head and a `Content-Length` body) from `s`.
fn read_request(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(clone) = s.try_clone() else { return };
    let mut r = BufReader::new(clone);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    let _ = r.read_exact(&mut body);
}
