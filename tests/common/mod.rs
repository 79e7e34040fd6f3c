//! Helpers shared by the end-to-end tests (`tests/*.rs`, each starting with `mod common;`).
//!
//! The tests run against the *harness cluster* that `scripts/test` starts (a throwaway
//! PostgreSQL 15 with `shared_preload_libraries = 'identity_sync'`, so the background worker
//! runs), found through `PGHOST`/`PGPORT`/`PGUSER`, and against real HTTP targets started here:
//! the third-party `scim2-server` from the repository's `.venv`, and an in-process webhook
//! receiver with fault injection.
//!
//! Every e2e test file starts with `#![cfg(not(feature = "pg_test"))]`: `cargo pgrx test`
//! builds all test targets with the `pg_test` feature and runs them without the harness cluster,
//! so the e2e files must compile to nothing there (their layer is `scripts/test`'s last one).
#![allow(dead_code)] // each test file uses a different subset of these helpers

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::error::DbError;
use postgres::types::{FromSqlOwned, ToSql};
pub use postgres::{Client, NoTls};

/// How long `db()` and friends keep retrying to connect: a test may follow one that made the
/// postmaster restart every backend (e.g. `kill -9` of the worker).
const CONNECT_RETRY: Duration = Duration::from_secs(20);

/// The value of an environment variable the harness exports, or a panic that says how to get it.
pub fn harness_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the end-to-end tests need the harness cluster. \
             run scripts/test (it starts the cluster and exports PGHOST/PGPORT/IDSYNC_SCRIPTS), \
             or export them yourself: eval \"$(scripts/cluster env test)\""
        )
    })
}

/// The repository root (where `Cargo.toml`, `scripts/` and `.venv/` are).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python virtualenv with the third-party test tools (`scim2-server`, `standardwebhooks`):
/// `$IDSYNC_VENV` when set, else the repository's `.venv` (made by `scripts/setup`).
pub fn venv_dir() -> PathBuf {
    std::env::var_os("IDSYNC_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join(".venv"))
}

/// The `scripts/` directory: `$IDSYNC_SCRIPTS` when set, else the repository's.
pub fn scripts_dir() -> PathBuf {
    std::env::var_os("IDSYNC_SCRIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("scripts"))
}

/// Connection settings for database `dbname` of the harness cluster (from `PGHOST`/`PGPORT`).
pub fn config(dbname: &str) -> postgres::Config {
    let port: u16 = harness_env("PGPORT")
        .parse()
        .expect("PGPORT is not a port number");
    config_for(port, dbname)
}

/// Connection settings for database `dbname` of a cluster on `127.0.0.1:port`.
pub fn config_for(port: u16, dbname: &str) -> postgres::Config {
    let mut c = postgres::Config::new();
    c.host(&std::env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into()))
        .port(port)
        .user(&std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()))
        .dbname(dbname)
        .application_name("identity_sync e2e")
        .connect_timeout(Duration::from_secs(5));
    c
}

/// Connect with `config`, retrying for a while: the cluster may be restarting after a crash.
pub fn connect(config: &postgres::Config) -> Client {
    let deadline = Instant::now() + CONNECT_RETRY;
    loop {
        match config.connect(NoTls) {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot connect to {config:?}: {e}"),
        }
    }
}

/// A client connected to database `postgres` of the harness cluster, the worker's default
/// database (`identity_sync.database`).
pub fn db() -> Client {
    connect(&config("postgres"))
}

/// A client connected to database `dbname` of the harness cluster.
pub fn db_named(dbname: &str) -> Client {
    connect(&config(dbname))
}

/// Quote an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Create database `name` in the harness cluster (dropping an old one, with its sessions, first)
/// and return a client connected to it.
pub fn fresh_db(name: &str) -> Client {
    let mut admin = db();
    let q = quote_ident(name);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {q} WITH (FORCE)"))
        .expect("drop database");
    admin
        .batch_execute(&format!("CREATE DATABASE {q}"))
        .expect("create database");
    db_named(name)
}

// ------------------------------------------------------------------------------------------
// Statements and queries that panic with the server's message
// ------------------------------------------------------------------------------------------

/// A server error as `SQLSTATE: message (detail: …, hint: …)`, for failure messages.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{}: {} (detail: {:?}, hint: {:?})",
            d.code().code(),
            d.message(),
            d.detail(),
            d.hint()
        ),
        None => e.to_string(),
    }
}

/// Run statements, panicking with the server's message (and detail) on error.
pub fn exec(c: &mut Client, sql: &str) {
    if let Err(e) = c.batch_execute(sql) {
        panic!("{}\nin:\n{sql}", describe(&e));
    }
}

/// The one value of a query without parameters.
pub fn one<T: FromSqlOwned>(c: &mut Client, sql: &str) -> T {
    one_with(c, sql, &[])
}

/// The one value of a query with parameters.
pub fn one_with<T: FromSqlOwned>(c: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> T {
    c.query_one(sql, params)
        .unwrap_or_else(|e| panic!("{}\nin:\n{sql}", describe(&e)))
        .get(0)
}

/// A count (or any bigint) a query returns.
pub fn count(c: &mut Client, sql: &str) -> i64 {
    one::<i64>(c, sql)
}

/// The first column of every row of a query, collected (into a Vec, a BTreeSet, …).
pub fn column<T: FromSqlOwned, C: FromIterator<T>>(c: &mut Client, sql: &str) -> C {
    c.query(sql, &[])
        .unwrap_or_else(|e| panic!("{}\nin:\n{sql}", describe(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The error a statement must raise (panics when it succeeds or fails without a server error).
pub fn error_of(c: &mut Client, sql: &str) -> DbError {
    match c.batch_execute(sql) {
        Ok(()) => panic!("expected an error from:\n{sql}"),
        Err(e) => e
            .as_db_error()
            .unwrap_or_else(|| panic!("not a server error: {e}"))
            .clone(),
    }
}

/// [`error_of`] as (sqlstate, message, detail, hint), detail and hint `""` when absent.
pub fn error_parts(c: &mut Client, sql: &str) -> (String, String, String, String) {
    let d = error_of(c, sql);
    (
        d.code().code().to_string(),
        d.message().to_string(),
        d.detail().unwrap_or("").to_string(),
        d.hint().unwrap_or("").to_string(),
    )
}

/// A server message (NOTICE, WARNING, …) received by a client made with
/// [`connect_with_notices`].
#[derive(Clone, Debug)]
pub struct Notice {
    /// `NOTICE`, `WARNING`, `INFO`, …
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// The notices a client has received so far, in order.
pub type Notices = Arc<Mutex<Vec<Notice>>>;

/// Connect with `config` and record every notice the server sends to this session.
pub fn connect_with_notices(mut config: postgres::Config) -> (Client, Notices) {
    let notices: Notices = Arc::default();
    let sink = notices.clone();
    config.notice_callback(move |e| {
        sink.lock().unwrap().push(Notice {
            severity: e.severity().to_string(),
            code: e.code().code().to_string(),
            message: e.message().to_string(),
            detail: e.detail().map(str::to_string),
            hint: e.hint().map(str::to_string),
        })
    });
    (connect(&config), notices)
}

/// Something naming a database of the harness cluster: a name, or a client connected to it.
pub trait DbRef {
    /// The database's name.
    fn db_name(self) -> String;
}
impl DbRef for &str {
    fn db_name(self) -> String {
        self.to_string()
    }
}
impl DbRef for &String {
    fn db_name(self) -> String {
        self.clone()
    }
}
impl DbRef for &mut Client {
    fn db_name(self) -> String {
        self.query_one("SELECT current_database()::text", &[])
            .expect("current_database()")
            .get(0)
    }
}

/// Load the employees sample (`"small"`: 1,000 persons, `"large"`: 10,000) into a database of
/// the harness cluster with `scripts/load-employees` (tables `employee`, `department`,
/// `dept_emp`, `dept_manager`, `title`, `salary` in `public`, replacing earlier copies).
pub fn load_employees(db: impl DbRef, size: &str) {
    run_load_employees(&db.db_name(), size, None);
}

/// `scripts/load-employees <db> <size>`, against the harness cluster (the environment's
/// `PGHOST`/`PGPORT`) or, with `port`, against the cluster on `127.0.0.1:port`.
fn run_load_employees(name: &str, size: &str, port: Option<u16>) {
    let mut cmd = Command::new("bash");
    cmd.arg(scripts_dir().join("load-employees"))
        .arg(name)
        .arg(size);
    if let Some(port) = port {
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "postgres");
    }
    run_ok(&mut cmd, &format!("scripts/load-employees {name} {size}"));
}

/// Runs a command to its end and returns its output; panics with that output when it fails
/// (`what` names the command in the message).
pub fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The sample's sources: `employee` (persons), `dept_emp` (contracts) and `department`
/// (related: renaming a department marks its members).
pub const SAMPLE_SOURCES: &str = "
    SELECT identity_sync.add_person_source('employee', 'emp_no');
    SELECT identity_sync.add_contract_source('dept_emp', 'emp_no', 'from_date', 'to_date');
    SELECT identity_sync.add_related_source('department',
           'SELECT de.emp_no FROM dept_emp de JOIN changed c USING (dept_no)');";

/// What an administrator grants the role user SQL is evaluated as (`identity_sync.run_as`,
/// README "Security"): SELECT on the HR tables, here those of schema public, now and later.
pub const EVALUATOR_GRANTS: &str =
    "GRANT SELECT ON ALL TABLES IN SCHEMA public TO identity_sync_evaluator;
     ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO identity_sync_evaluator;";

/// `CREATE EXTENSION identity_sync`, the session's notices quieted (`client_min_messages`), and
/// [`EVALUATOR_GRANTS`].
pub fn create_extension(c: &mut Client) {
    exec(
        c,
        &format!(
            "SET client_min_messages = warning; CREATE EXTENSION identity_sync; {EVALUATOR_GRANTS}"
        ),
    );
}

/// [`create_extension`] and the sample's three sources ([`SAMPLE_SOURCES`]).
pub fn create_extension_with_sources(c: &mut Client) {
    create_extension(c);
    exec(c, SAMPLE_SOURCES);
}

/// A new database `name` of the harness cluster ([`fresh_db`]) holding the employees sample
/// of `size`, without the extension.
pub fn sample_db(name: &str, size: &str) -> Client {
    let mut c = fresh_db(name);
    load_employees(&mut c, size);
    c
}

/// Fresh state in the client's database (the worker's, for tests the worker serves): the
/// extension dropped ([`drop_extension`]), `leftovers` run (statements removing what earlier
/// tests left outside the extension, e.g. a table target's table), the employees sample of
/// `size` loaded again, the extension created and the sample's sources registered.
pub fn reset_with_sample(c: &mut Client, size: &str, leftovers: &str) {
    drop_extension(c);
    exec(c, leftovers);
    load_employees(&mut *c, size);
    create_extension_with_sources(c);
}

/// The worker's database ([`db`]) reset to the small sample with its sources
/// ([`reset_with_sample`]), and a guard that drops the extension again when the test ends.
pub fn fresh_small_sample() -> (DropExtension, Client) {
    let cleanup = DropExtension;
    let mut c = db();
    reset_with_sample(&mut c, "small", "");
    (cleanup, c)
}

/// The events of `target` (by name) that are not done, the first 20, one per line: what a
/// failure message shows. Empty when everything is done.
pub fn undone(c: &mut Client, target: &str) -> String {
    one::<Option<String>>(
        c,
        &format!(
            "SELECT coalesce(string_agg(format('%s %s %s %s %s', id, person_key, kind, state, last_error), E'\\n'), '')
               FROM (SELECT * FROM identity_sync.events WHERE target = '{target}' AND state <> 'done' ORDER BY id LIMIT 20) e"
        ),
    )
    .unwrap_or_default()
}

/// Every event of every target is done; else fail with those of `target` that are not.
pub fn assert_all_done(c: &mut Client, target: &str) {
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM identity_sync.events WHERE state <> 'done'"
        ),
        0,
        "events not done; of {target}:\n{}",
        undone(c, target)
    );
}

/// `identity_sync.wait_idle()`: wait up to `timeout_s` seconds until nothing is dirty or
/// pending (held and paused targets excepted); panics with `identity_sync.status` if not.
pub fn wait_idle(c: &mut Client, timeout_s: u32) {
    let idle: bool = one(
        c,
        &format!("SELECT identity_sync.wait_idle('{timeout_s} s')"),
    );
    if !idle {
        let status: Option<String> = one(
            c,
            "SELECT string_agg(format('%s: %s', target, to_jsonb(s) - 'target'), E'\n') FROM identity_sync.status s",
        );
        panic!(
            "not idle within {timeout_s} s; status:\n{}",
            status.unwrap_or_default()
        );
    }
}

/// The `remote_id` of `person`'s account in `target` (panics when it has none).
pub fn remote_id(c: &mut Client, target: &str, person: i32) -> String {
    one::<Option<String>>(
        c,
        &format!("SELECT remote_id FROM identity_sync.accounts WHERE target = '{target}' AND person_key = '{person}'"),
    )
    .unwrap_or_else(|| panic!("person {person} has no account id in {target}"))
}

/// The state of `person`'s account in `target` (`""` when there is no account).
pub fn account_state(c: &mut Client, target: &str, person: i32) -> String {
    one::<Option<String>>(
        c,
        &format!("SELECT state FROM identity_sync.accounts WHERE target = '{target}' AND person_key = '{person}'"),
    )
    .unwrap_or_default()
}

/// The pid of the identity_sync background worker (`backend_type = 'identity_sync worker'` in
/// `pg_stat_activity`), if one runs.
pub fn worker_pid(client: &mut Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'identity_sync worker' \
             ORDER BY backend_start DESC LIMIT 1",
            &[],
        )
        .expect("query pg_stat_activity")
        .map(|r| r.get(0))
}

/// Send `signal` (e.g. `"KILL"`, `"TERM"`) to process `pid` of the cluster's owner: directly
/// when the tests run as root, else with `sudo -n kill`.
pub fn kill(signal: &str, pid: i32) {
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n");
    let mut cmd = if as_root.unwrap_or(false) {
        Command::new("kill")
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "kill"]);
        c
    };
    let st = cmd
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{signal} {pid} failed");
}

/// After the worker `old` was killed or terminated: a session to database `postgres` that
/// works, once a new worker runs (sessions opened meanwhile may be ended by the postmaster's
/// crash recovery). Panics when no new worker runs within 30 s.
pub fn reconnect_to_new_worker(old: i32) -> Client {
    let mut client = None;
    let back = wait_until(Duration::from_secs(30), || {
        let Ok(mut c) = config("postgres").connect(NoTls) else {
            return false;
        };
        let new = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'identity_sync worker'",
                &[],
            )
            .ok()
            .flatten()
            .map(|r| r.get::<_, i32>(0));
        if new.is_some_and(|p| p != old) {
            client = Some(c);
            return true;
        }
        false
    });
    assert!(
        back,
        "no new worker within 30 s after worker {old} went away"
    );
    client.expect("set when a new worker was found")
}

/// The harness cluster's server log so far (empty when the harness does not say where it is).
pub fn server_log() -> String {
    std::env::var("IDSYNC_CLUSTER_DIR")
        .map(|dir| std::fs::read_to_string(format!("{dir}/log")).unwrap_or_default())
        .unwrap_or_default()
}

/// The last line of the harness cluster's server log that contains `text`, or a sentence
/// saying there is none (for a test's printed summary).
pub fn last_log_line(text: &str) -> String {
    server_log()
        .lines()
        .rev()
        .find(|l| l.contains(text))
        .map_or_else(
            || format!("(no line with \"{text}\" in the server log)"),
            str::to_string,
        )
}

/// Restart the harness cluster (`scripts/cluster restart $IDSYNC_CLUSTER`); the port stays.
pub fn restart_harness_cluster() {
    let name = harness_env("IDSYNC_CLUSTER");
    let st = Command::new("bash")
        .arg(scripts_dir().join("cluster"))
        .args(["restart", &name])
        .status()
        .expect("run scripts/cluster restart");
    assert!(st.success(), "scripts/cluster restart {name} failed");
}

/// A guard for tests that kill or stop the worker: when dropped (at the end of the test, also
/// after a failed assertion) and no worker is back within 3 s, it restarts the harness cluster,
/// so that one test's dead worker does not fail the tests after it.
pub struct EnsureWorker;

impl Drop for EnsureWorker {
    fn drop(&mut self) {
        let Ok(mut c) = config("postgres").connect(NoTls) else {
            eprintln!("EnsureWorker: cannot connect; restarting the harness cluster");
            return restart_harness_cluster();
        };
        if !wait_until(Duration::from_secs(3), || worker_pid(&mut c).is_some()) {
            eprintln!("EnsureWorker: no identity_sync worker; restarting the harness cluster");
            drop(c);
            restart_harness_cluster();
        }
    }
}

/// Poll `cond` every 50 ms until it returns true (→ true) or `timeout` passes (→ false).
/// Use it as `assert!(wait_until(..), "what did not happen")`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on 127.0.0.1 (free now; another process could take it before it is used).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A random hex string of 32 characters (for tokens and secrets in tests).
pub fn random_token() -> String {
    (0..2)
        .map(|i| {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(i);
            h.write_u128(Instant::now().elapsed().as_nanos());
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// A minimal HTTP/1.1 client for assertions on the test targets: send one request (with
/// `Connection: close`) and return (status, body).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .expect("only http:// URLs are supported");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(authority)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut reader = BufReader::new(s);
    let (status, resp_headers) = read_head(&mut reader)?
        .ok_or_else(|| std::io::Error::other("connection closed before a response"))?;
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status:?}")))?;
    let body = match read_body(&mut reader, &resp_headers)? {
        Some(b) => b,
        None => {
            let mut b = Vec::new();
            reader.read_to_end(&mut b)?;
            b
        }
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// A request or status line and the headers (names lower-cased).
type Head = (String, Vec<(String, String)>);

/// Read a request or status line and the headers; None at a clean EOF.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(Some((first.trim_end().to_string(), headers)))
}

/// Read a body framed by Content-Length or chunked encoding; None when neither is given.
fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
) -> std::io::Result<Option<Vec<u8>>> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size + 2]; // data + CRLF
            r.read_exact(&mut chunk)?;
            if size == 0 {
                // (no trailers expected) the final chunk is "0\r\n\r\n"
                return Ok(Some(body));
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    match get("content-length") {
        Some(n) => {
            let n: usize = n.parse().map_err(std::io::Error::other)?;
            let mut body = vec![0; n];
            r.read_exact(&mut body)?;
            Ok(Some(body))
        }
        None => Ok(None),
    }
}

/// A throwaway cluster of its own (besides the harness one), made with `scripts/cluster start`;
/// stopped and removed on drop.
pub struct Cluster {
    name: String,
    port: u16,
}

impl Cluster {
    /// `scripts/cluster start <name> [--preload] [--set line]...`.
    pub fn start(name: &str, preload: bool, settings: &[&str]) -> Cluster {
        Cluster::start_with(name, None, preload, settings)
    }

    /// [`Cluster::start`] with the programs of another installation of PostgreSQL
    /// (`--bindir`, e.g. one made by `scripts/private-pg`) when `bindir` is given.
    pub fn start_with(
        name: &str,
        bindir: Option<&std::path::Path>,
        preload: bool,
        settings: &[&str],
    ) -> Cluster {
        let mut cmd = Command::new("bash");
        cmd.arg(scripts_dir().join("cluster"))
            .arg("start")
            .arg(name);
        if let Some(dir) = bindir {
            cmd.arg("--bindir").arg(dir);
        }
        if preload {
            cmd.arg("--preload");
        }
        for s in settings {
            cmd.arg("--set").arg(s);
        }
        run_ok(&mut cmd, &format!("scripts/cluster start {name}"));
        let port = std::fs::read_to_string(format!("/var/tmp/identity_sync-{name}/port"))
            .expect("read the cluster's port file")
            .trim()
            .parse()
            .expect("port file holds a port");
        Cluster {
            name: name.to_string(),
            port,
        }
    }

    /// Its TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection settings for one of its databases.
    pub fn config(&self, dbname: &str) -> postgres::Config {
        config_for(self.port, dbname)
    }

    /// A client connected to one of its databases.
    pub fn client(&self, dbname: &str) -> Client {
        connect(&self.config(dbname))
    }

    /// [`load_employees`] into its database `dbname`.
    pub fn load_employees(&self, dbname: &str, size: &str) {
        run_load_employees(dbname, size, Some(self.port));
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(format!("/var/tmp/identity_sync-{}/log", self.name))
            .unwrap_or_default()
    }

    /// `scripts/cluster restart <name>` (fast shutdown, then start; the port stays).
    pub fn restart(&self) {
        run_ok(
            Command::new("bash")
                .arg(scripts_dir().join("cluster"))
                .args(["restart", &self.name]),
            &format!("scripts/cluster restart {}", self.name),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts_dir().join("cluster"))
            .arg("stop")
            .arg(&self.name)
            .stdout(Stdio::null())
            .status();
    }
}

/// The third-party SCIM 2.0 server (`scim2-server` from PyPI, in `.venv`) on a free loopback
/// port, with a random bearer token; killed on drop.
pub struct ScimServer {
    child: Child,
    port: u16,
    token: String,
    log: PathBuf,
}

impl ScimServer {
    /// Start it and wait (up to 20 s) until it answers `GET /v2/ServiceProviderConfig`.
    pub fn start() -> ScimServer {
        Self::start_exe(&venv_dir().join("bin/scim2-server"), &[])
    }

    /// `scripts/scim-nofilter`: the same server, except that its filtered searches silently
    /// find nothing, as some real services' do; `flags` such as `--filter-unsupported` (also
    /// declare filters unsupported in its ServiceProviderConfig).
    pub fn start_nofilter(flags: &[&str]) -> ScimServer {
        Self::start_exe(&scripts_dir().join("scim-nofilter"), flags)
    }

    fn start_exe(exe: &std::path::Path, flags: &[&str]) -> ScimServer {
        assert!(
            exe.exists(),
            "{} is missing: run scripts/setup",
            exe.display()
        );
        let token = random_token();
        for _attempt in 0..3 {
            let port = free_port();
            let log = std::env::temp_dir().join(format!("identity_sync-scim-{port}.log"));
            let logf = std::fs::File::create(&log).expect("create scim2-server log");
            let child = Command::new(exe)
                .env("IDSYNC_VENV", venv_dir())
                .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
                .args(["--bearer-token", &token])
                .args(flags)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .expect("spawn scim2-server");
            let mut server = ScimServer {
                child,
                port,
                token: token.clone(),
                log,
            };
            let up = wait_until(Duration::from_secs(20), || {
                if let Ok(Some(_)) = server.child.try_wait() {
                    return true; // exited (port taken?): stop waiting
                }
                matches!(server.get("/ServiceProviderConfig"), Ok((200, _)))
            });
            if up && server.child.try_wait().ok().flatten().is_none() {
                return server;
            }
            eprintln!(
                "scim2-server did not start on port {port}:\n{}",
                server.log()
            );
        }
        panic!("scim2-server did not start (3 attempts)");
    }

    /// The SCIM base URL, e.g. `http://127.0.0.1:40123/v2` (resources under `/Users`, `/Groups`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v2", self.port)
    }

    /// The bearer token it accepts (every other request gets 401).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `GET <base_url><path>` with the token: (status, body), e.g. `get("/Users")`.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let auth = format!("Bearer {}", self.token);
        http_request(
            "GET",
            &format!("{}{path}", self.base_url()),
            &[
                ("Authorization", &auth),
                ("Accept", "application/scim+json"),
            ],
            None,
        )
    }

    /// `GET <path>` parsed as JSON; panics unless the status is 200.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).expect("GET from scim2-server");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("scim2-server answered JSON")
    }

    /// All users (`GET /Users?count=100000` → `Resources`).
    pub fn users(&self) -> Vec<serde_json::Value> {
        let v = self.get_json("/Users?count=100000");
        v["Resources"].as_array().cloned().unwrap_or_default()
    }

    /// `GET /Users/<id>`: (status, body as JSON, `null` when it is not JSON).
    pub fn user(&self, id: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.get(&format!("/Users/{id}")).expect("GET user");
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Member ids of the group with that displayName (empty when there is no such group;
    /// panics when there are several).
    pub fn group_members(&self, name: &str) -> BTreeSet<String> {
        let v = self.get_json("/Groups?count=10000");
        let groups = v["Resources"].as_array().cloned().unwrap_or_default();
        let matching: Vec<&serde_json::Value> =
            groups.iter().filter(|g| g["displayName"] == name).collect();
        assert!(
            matching.len() <= 1,
            "group {name} exists {} times",
            matching.len()
        );
        matching
            .first()
            .and_then(|g| g["members"].as_array())
            .map(|m| {
                m.iter()
                    .filter_map(|x| x["value"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Its output so far (one line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `METHOD /v2/Users/<id>` requests its log shows.
    pub fn log_count(&self, method: &str, id: &str) -> usize {
        let needle = format!("\"{method} /v2/Users/{id} ");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }
}

impl Drop for ScimServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One request received by a [`WebhookReceiver`].
#[derive(Clone, Debug)]
pub struct Request {
    /// 0 for the first request the receiver got, then 1, 2, …
    pub seq: usize,
    pub method: String,
    /// Path and query, e.g. `/hook?x=1`.
    pub path: String,
    /// Header names are lower-cased; order and repeats are kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request was complete (before the response was chosen or sent).
    pub at: Instant,
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text (lossy).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("request body is not JSON ({e}): {}", self.body_str()))
    }
}

/// What a [`WebhookReceiver`] does with one request.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (or before dropping): simulates a slow target / timeout.
    pub delay: Duration,
    /// Close the connection without answering: simulates a crash or a network failure.
    pub drop: bool,
}

impl Response {
    /// `200 OK` with an empty body.
    pub fn ok() -> Response {
        Response::status(200)
    }

    /// An empty answer with that status.
    pub fn status(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
            drop: false,
        }
    }

    /// Close the connection without an answer (after the delay, if any).
    pub fn drop_connection() -> Response {
        Response {
            drop: true,
            ..Response::ok()
        }
    }

    /// Add a header, e.g. `.header("Retry-After", "2")`.
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Set the body (sent with `Content-Type: application/json` unless a header says otherwise).
    pub fn body(mut self, body: impl Into<String>) -> Response {
        self.body = body.into();
        self
    }

    /// Answer only after `d`.
    pub fn delay(mut self, d: Duration) -> Response {
        self.delay = d;
        self
    }
}

/// Chooses the response to each request; requests are numbered from 0 in `Request::seq`.
pub type Responder = Box<dyn Fn(&Request) -> Response + Send + Sync>;

struct Shared {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    responder: Mutex<Arc<Responder>>,
    stop: AtomicBool,
}

/// An HTTP/1.1 server in the test process on a free loopback port, standing in for a webhook
/// target: it records every request and answers `200` by default, or what a responder closure
/// chooses (status, headers, body, delay, dropped connection) for fault injection. Keep-alive
/// connections are supported; every connection gets its own thread. Stops on drop.
pub struct WebhookReceiver {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl WebhookReceiver {
    /// Start a receiver that answers every request with `200 OK`.
    pub fn start() -> WebhookReceiver {
        WebhookReceiver::start_with(|_| Response::ok())
    }

    /// Start a receiver that answers with `responder(request)`, e.g. fail the first two:
    /// `start_with(|r| if r.seq < 2 { Response::status(503) } else { Response::ok() })`.
    pub fn start_with(
        responder: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook receiver");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            responder: Mutex::new(Arc::new(Box::new(responder))),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || serve_connection(conn, s));
                }
            }
        });
        WebhookReceiver {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Replace the responder, for the requests that arrive from now on.
    pub fn respond_with(&self, responder: impl Fn(&Request) -> Response + Send + Sync + 'static) {
        *self.shared.responder.lock().unwrap() = Arc::new(Box::new(responder));
    }

    /// `http://127.0.0.1:<port>` followed by `path` (e.g. `url("/hook")`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A copy of every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Wait until at least `n` requests arrived (→ true) or `timeout` passed (→ false).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut reqs = self.shared.requests.lock().unwrap();
        while reqs.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            reqs = self
                .shared
                .arrived
                .wait_timeout(reqs, deadline - now)
                .unwrap()
                .0;
        }
        true
    }

    /// Forget the requests received so far (numbering in `seq` goes on).
    pub fn clear(&self) {
        self.shared.requests.lock().unwrap().clear();
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the acceptor
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

static NEXT_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn serve_connection(conn: TcpStream, shared: Arc<Shared>) {
    // The short read timeout lets idle keep-alive threads notice that the receiver stopped.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut writer = conn;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // Wait for the next request (idle keep-alive), checking now and then for a stop.
        match reader.fill_buf() {
            Ok([]) => return, // the client closed the connection
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        let _ = writer.set_read_timeout(Some(Duration::from_secs(30)));
        let head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            _ => return,
        };
        let (line, headers) = head;
        let body = match read_body(&mut reader, &headers) {
            Ok(b) => b.unwrap_or_default(),
            Err(_) => return,
        };
        let _ = writer.set_read_timeout(Some(Duration::from_millis(500)));
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let close = headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        let req = Request {
            seq: NEXT_SEQ.fetch_add(1, Ordering::SeqCst),
            method,
            path,
            headers,
            body,
            at: Instant::now(),
        };
        let responder = shared.responder.lock().unwrap().clone();
        let resp = responder(&req);
        {
            let mut reqs = shared.requests.lock().unwrap();
            reqs.push(req);
            shared.arrived.notify_all();
        }
        if !resp.delay.is_zero() {
            std::thread::sleep(resp.delay);
        }
        if resp.drop {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        let has_ct = resp
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if !has_ct && !resp.body.is_empty() {
            out.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&resp.body);
        if writer.write_all(out.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// `DROP EXTENSION IF EXISTS identity_sync CASCADE` in the worker's database, on the first try:
/// the worker steps aside for it (`src/deliver/txn.rs`), busy or not.
pub fn drop_extension(c: &mut Client) {
    if let Err(e) = c.batch_execute(
        "SET client_min_messages = warning; DROP EXTENSION IF EXISTS identity_sync CASCADE",
    ) {
        panic!("DROP EXTENSION identity_sync: {}", describe(&e));
    }
}

/// Drops the extension in the worker's database when a test ends (also after a failed
/// assertion), so that no target of the test (pointing at a receiver that is gone) keeps the
/// worker busy in later tests. Errors are printed, not raised: it runs while a failed test
/// unwinds, where a panic would abort.
pub struct DropExtension;

impl Drop for DropExtension {
    fn drop(&mut self) {
        if let Ok(mut c) = config("postgres").connect(NoTls) {
            if let Err(e) = c.batch_execute("DROP EXTENSION IF EXISTS identity_sync CASCADE") {
                eprintln!("DropExtension: {}", describe(&e));
            }
        }
    }
}
