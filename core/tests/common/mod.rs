//! Helpers shared by the integration tests: the real scim2-server, a fault-injecting HTTP
//! server, a tiny HTTP client for assertions, and dispatcher plumbing.
//!
//! Everything listens on 127.0.0.1 only.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use identity_sync_core::deliver::{
    Auth, Dispatcher, EventKind, Job, Outcome, ScanEvent, ScanRequest, TargetConfig, TargetKind,
};
use serde_json::{Map, Value};

/// The project's Python virtual environment, made by the setup script.
pub fn venv_bin(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv/bin")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the project setup (python3 -m venv .venv && \
         .venv/bin/pip install scim2-server standardwebhooks) from the repository root",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// A real `scim2-server` process (in memory, HTTP/1.0), killed on drop.
pub struct ScimServer {
    child: Child,
    pub port: u16,
    pub token: String,
}

impl ScimServer {
    /// Starts a server that accepts the bearer token `token` and waits until it answers.
    pub fn start(token: &str) -> Self {
        Self::start_with(token, &[])
    }

    /// Like [`ScimServer::start`], with extra command-line arguments.
    pub fn start_with(token: &str, extra: &[&str]) -> Self {
        let bin = venv_bin("scim2-server");
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new(&bin)
                .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
                .args(["--bearer-token", token])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start scim2-server");
            let mut server = ScimServer {
                child,
                port,
                token: token.to_string(),
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // exited: most likely the port was taken meanwhile
                }
                if let Ok((status, _)) = server.request("GET", "/v2/ServiceProviderConfig", None) {
                    if status == 200 {
                        return server;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("scim2-server did not start");
    }

    /// The SCIM base URL.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/v2", self.port)
    }

    /// One authenticated request; returns the status and the JSON body (Null when empty).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, Value)> {
        http_request(
            self.port,
            method,
            path,
            &[("Authorization", format!("Bearer {}", self.token))],
            body,
        )
    }

    /// GET that must succeed with JSON.
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None)
            .expect("request to scim2-server failed")
    }

    /// A SCIM target for this server.
    pub fn target(&self, id: i32) -> TargetConfig {
        TargetConfig {
            id,
            name: format!("scim{id}"),
            kind: TargetKind::Scim,
            url: self.base(),
            auth: Auth::Bearer {
                token: self.token.clone().into(),
            },
            signing_secret: None,
            timeout: Duration::from_secs(5),
            max_concurrency: 4,
            correlate_on: None,
            create_groups: false,
            ..TargetConfig::default()
        }
    }
}

impl Drop for ScimServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 client (the test side needs no TLS, keep-alive or chunking).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/scim+json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// A job with empty maps; tests fill in what they need.
pub fn job(event_id: i64, target_id: i32, person: &str, kind: EventKind) -> Job {
    Job {
        event_id,
        target_id,
        person_key: person.to_string(),
        kind,
        account_id: None,
        attributes: Map::new(),
        changed: Map::new(),
        previous: Map::new(),
        group: None,
        groups: Vec::new(),
        occurred_at: "2026-01-01T00:00:00Z".to_string(),
        attempt: 1,
    }
}

/// The HTTP status, `Retry-After` and error of a retry outcome; panics on any other outcome.
pub fn retry(o: &Outcome) -> (Option<u16>, Option<Duration>, String) {
    match o {
        Outcome::Retry {
            http_status,
            retry_after,
            error,
            ..
        } => (*http_status, *retry_after, error.clone()),
        other => panic!("expected retry, got {other:?}"),
    }
}

/// The HTTP status and error of a failed outcome; panics on any other outcome.
pub fn failure(o: &Outcome) -> (Option<u16>, String) {
    match o {
        Outcome::Failed {
            http_status, error, ..
        } => (*http_status, error.clone()),
        other => panic!("expected failure, got {other:?}"),
    }
}

/// A JSON object literal as a map.
pub fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// A dispatcher whose notify callback wakes [`Harness::wait`], as the worker's latch would.
pub struct Harness {
    pub dispatcher: Option<Dispatcher>,
    signal: Arc<(Mutex<u64>, Condvar)>,
    pub notified: Arc<AtomicUsize>,
}

impl Harness {
    pub fn start(targets: Vec<TargetConfig>) -> Self {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let notified = Arc::new(AtomicUsize::new(0));
        let (s, n) = (Arc::clone(&signal), Arc::clone(&notified));
        let dispatcher = Dispatcher::start(Arc::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
            let (m, c) = &*s;
            *m.lock().unwrap() += 1;
            c.notify_all();
        }))
        .expect("dispatcher starts");
        dispatcher.set_targets(targets);
        Harness {
            dispatcher: Some(dispatcher),
            signal,
            notified,
        }
    }

    pub fn d(&self) -> &Dispatcher {
        self.dispatcher.as_ref().expect("dispatcher running")
    }

    /// Submits jobs and waits for exactly that many outcomes (in completion order).
    pub fn run(&self, jobs: Vec<Job>) -> Vec<Outcome> {
        let n = jobs.len();
        self.d().submit(jobs);
        self.wait(n, Duration::from_secs(30))
    }

    /// Submits one job and returns its outcome.
    pub fn one(&self, job: Job) -> Outcome {
        self.run(vec![job]).remove(0)
    }

    /// Collects `n` outcomes, waiting on the notify signal; panics after `timeout`.
    pub fn wait(&self, n: usize, timeout: Duration) -> Vec<Outcome> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let (m, c) = &*self.signal;
        loop {
            got.extend(self.d().take_outcomes());
            if got.len() >= n {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out with {} of {n} outcomes: {got:?}",
                got.len()
            );
            let guard = m.lock().unwrap();
            let _ = c
                .wait_timeout(guard, left.min(Duration::from_millis(50)))
                .unwrap();
        }
    }
}

impl Harness {
    /// Runs a reconcile scan and returns its events once it has ended (`Done` or `Failed`
    /// last); panics after `timeout`.
    pub fn scan(&self, request: ScanRequest, timeout: Duration) -> Vec<ScanEvent> {
        let run = request.run_id;
        self.d().scan(request);
        let deadline = Instant::now() + timeout;
        let mut got: Vec<ScanEvent> = Vec::new();
        let (m, c) = &*self.signal;
        loop {
            got.extend(self.d().take_scan_events());
            if got.iter().any(|e| {
                e.run_id() == run && matches!(e, ScanEvent::Done { .. } | ScanEvent::Failed { .. })
            }) {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "scan {run} did not end: {got:?}");
            let guard = m.lock().unwrap();
            let _ = c
                .wait_timeout(guard, left.min(Duration::from_millis(50)))
                .unwrap();
        }
    }
}

/// One request as the fault server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the fault server does with a request.
pub enum Action {
    /// Answer with status, extra headers and body, after a delay.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
        delay: Duration,
    },
    /// Close the connection without answering.
    Drop,
}

impl Action {
    pub fn status(status: u16, body: &str) -> Self {
        Action::Respond {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub fn slow(status: u16, delay: Duration) -> Self {
        Action::Respond {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay,
        }
    }
}

type Handler = dyn Fn(&Seen) -> Action + Send + Sync;

/// A scripted HTTP/1.1 server on 127.0.0.1: one thread per connection, one request per
/// connection (`Connection: close`), every request recorded.
pub struct FaultServer {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub active: Arc<AtomicUsize>,
    pub max_active: Arc<AtomicUsize>,
}

impl FaultServer {
    pub fn start(handler: impl Fn(&Seen) -> Action + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let max_active = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, a, ma) = (
            Arc::clone(&seen),
            Arc::clone(&active),
            Arc::clone(&max_active),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (h, s, a, ma) = (
                    Arc::clone(&handler),
                    Arc::clone(&s),
                    Arc::clone(&a),
                    Arc::clone(&ma),
                );
                std::thread::spawn(move || {
                    let _ = serve(stream, &*h, &s, &a, &ma);
                });
            }
        });
        FaultServer {
            port,
            seen,
            active,
            max_active,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// A webhook target pointing at `path` on this server.
    pub fn webhook_target(&self, id: i32, path: &str) -> TargetConfig {
        TargetConfig {
            id,
            name: format!("hook{id}"),
            kind: TargetKind::Webhook,
            url: self.url(path),
            auth: Auth::None,
            signing_secret: None,
            timeout: Duration::from_secs(5),
            max_concurrency: 8,
            correlate_on: None,
            create_groups: false,
            ..TargetConfig::default()
        }
    }
}

/// Serves one request. `active` counts requests between being read and being answered; it
/// drops before the answer is written, so a client that sends its next request as soon as it
/// has an answer cannot make two requests look simultaneous.
fn serve(
    mut stream: TcpStream,
    handler: &Handler,
    seen: &Mutex<Vec<Seen>>,
    active: &AtomicUsize,
    max_active: &AtomicUsize,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let req = Seen {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    };
    seen.lock().unwrap().push(req.clone());
    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
    max_active.fetch_max(now, Ordering::SeqCst);
    let action = handler(&req);
    if let Action::Respond { delay, .. } = &action {
        std::thread::sleep(*delay);
    }
    active.fetch_sub(1, Ordering::SeqCst);
    match action {
        Action::Drop => Ok(()),
        Action::Respond {
            status,
            headers,
            body,
            ..
        } => {
            let mut resp = format!(
                "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n",
                body.len()
            );
            if !body.is_empty() {
                resp.push_str("Content-Type: application/json\r\n");
            }
            for (k, v) in headers {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            resp.push_str(&body);
            stream.write_all(resp.as_bytes())
        }
    }
}
