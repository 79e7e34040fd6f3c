//! The background worker.
//!
//! One worker per cluster serves the database named by `identity_sync.database`. Every step is
//! a short transaction of its own; no snapshot is held while requests are on the network.

use super::txn::{self, in_transaction};
use crate::{guc, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// How long one tick plans at most before table targets are delivered and the next tick may
/// begin (a batch started is finished; HTTP delivery is pumped between batches).
const PLANNING_BUDGET: Duration = Duration::from_millis(250);

/// Housekeeping (snapshots, date boundaries, expired grants, retention) runs at most this
/// often: it is a write transaction of its own, and under a stream of HR commits the worker
/// ticks thousands of times a second.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Ticks start at least this far apart. Every HR commit sets the latch, so without a pause a
/// stream of small commits makes the worker run a full tick (several transactions) per commit
/// or two, taking a CPU from the HR workload (bench/run, capture_oltp); a few milliseconds let
/// one tick take the commits of that time together, at that cost in latency.
const MIN_TICK_INTERVAL: Duration = Duration::from_millis(5);

thread_local! {
    static LAST_HOUSEKEEPING: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// How long the worker waits before trying again after stepping aside for DDL on the
/// extension (`txn.rs`): the DDL holds the extension's lock until it commits.
const STEP_ASIDE_PAUSE: Duration = Duration::from_millis(50);

/// The worker's `lock_timeout`: a lock it waits for longer than this is given up (the step is
/// tried again later). Below `deadlock_timeout` (1 s by default), so that in a lock cycle with
/// a session the worker gives way before the deadlock detector cancels the session.
const LOCK_TIMEOUT: &str = "200ms";

/// The worker's nice value (0 is normal priority, 19 the lowest).
const WORKER_NICE: libc::c_int = 10;

/// Name shown in `pg_stat_activity.backend_type` and in the server log.
pub const WORKER_NAME: &str = "identity_sync worker";

/// Register the worker with the postmaster (from `_PG_init` while preloading).
pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type(WORKER_NAME)
        .set_library("identity_sync")
        .set_function("identity_sync_worker_main")
        .enable_spi_access()
        // pg_cron-style: come back soon after a crash instead of never (the default).
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// The OID and version of the installed extension, if it is installed.
fn installed_extension() -> Option<(pg_sys::Oid, String)> {
    Spi::get_two::<pg_sys::Oid, String>(
        "SELECT oid, extversion FROM pg_catalog.pg_extension WHERE extname = 'identity_sync'",
    )
    .ok()
    .and_then(|(oid, version)| Some((oid?, version?)))
}

/// The version of this library, whose release its SQL functions must be of.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The release a version belongs to: the version without a `-…` or `+…` suffix. An extension
/// version such as `0.2.0-ddltest` (an update path a test installs) is SQL of release 0.2.0;
/// `0.1.0` is another release's.
fn release_of(version: &str) -> &str {
    version.split(['-', '+']).next().unwrap_or(version)
}

thread_local! {
    /// The installed version the worker last said it waits for an update of (said once).
    static WAITING_FOR_UPDATE: std::cell::RefCell<Option<String>> =
        const { std::cell::RefCell::new(None) };
}

/// Entry point of the worker process.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn identity_sync_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Provisioning is background work: when HR sessions and the worker compete for CPU, the
    // kernel favours HR writes, and the worker catches up in the cycles left (its backlog shows
    // in identity_sync.status). Idle or lightly loaded, this changes nothing.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, WORKER_NICE) };
    let database = guc::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    shmem::publish_worker();
    log!("identity_sync: worker started in database \"{database}\"");
    // The planner's statements read pg_temp tables, which have no statistics, so their cost
    // estimates are large enough to trigger JIT compilation: 200-330 ms per statement for work
    // that takes a few ms on a batch of 1,000 persons (bench/run, plan_rate). JIT never pays
    // off for these short batched statements.
    in_transaction("setting up the session", || Spi::run("SET jit = off"));
    // The worker's commits are the delivery ledger (claimed, done): one lost in a crash with
    // asynchronous commit means requests sent again that were not in flight. Whatever the
    // cluster's default, its own commits wait for the WAL.
    in_transaction("setting up the session", || {
        Spi::run("SET synchronous_commit = on")
    });
    in_transaction("setting up the session", || {
        Spi::run(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
    });

    let mut http = super::http::Http::start();
    let mut notify = super::notify::Notify::start();
    let mut reconciler = crate::reconcile::Reconciler::default();
    let mut recovered = false;
    let mut extension = None;
    let mut sleep = Duration::ZERO;
    let mut last_tick = std::time::Instant::now();
    while BackgroundWorker::wait_latch(Some(sleep.max(Duration::from_millis(1)))) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let since = last_tick.elapsed();
        if since < MIN_TICK_INTERVAL && !BackgroundWorker::sigterm_received() {
            unsafe { pg_sys::pg_usleep((MIN_TICK_INTERVAL - since).as_micros() as _) };
        }
        last_tick = std::time::Instant::now();
        sleep = tick(
            &mut http,
            &mut notify,
            &mut reconciler,
            &mut recovered,
            &mut extension,
        );
        if sleep >= Duration::from_secs(1) {
            // Going idle: statistics still pending go out now (txn::in_transaction reports
            // them at most once a second, so the last second's would wait for the next tick).
            let _ = unsafe { pg_sys::pgstat_report_stat(true) };
        }
    }

    http.shutdown();
    shmem::unpublish_worker();
    log!("identity_sync: worker stopping");
    // Exit code 1: a background worker that exits with 0 is unregistered and never started
    // again; with 1 the postmaster restarts it after the restart time, so a worker stopped
    // alone (pg_terminate_backend) comes back. At cluster shutdown nothing is restarted anyway.
    unsafe { pg_sys::proc_exit(1) };
}

/// One step of the tick that handles at most `batch` items: `query` (`$1` is the batch size) in
/// a transaction of its own. Returns how many it handled; 0 when it failed (logged) or the
/// worker stepped aside.
fn batch_step(what: &str, query: &str, batch: i32) -> i32 {
    in_transaction(what, || {
        Spi::get_one_with_args::<i32>(query, &[batch.into()])
    })
    .and_then(|r| r.ok().flatten())
    .unwrap_or(0)
}

/// One round of work; returns how long to sleep unless woken.
fn tick(
    http: &mut super::http::Http,
    notify: &mut super::notify::Notify,
    reconciler: &mut crate::reconcile::Reconciler,
    recovered: &mut bool,
    extension: &mut Option<pg_sys::Oid>,
) -> Duration {
    let naptime = Duration::from_millis(guc::NAPTIME.get().max(10) as u64);
    // (Looked up outside the gate: the gate is the extension's own lock.)
    txn::set_gate(None);
    txn::take_stepped_aside();
    let Some((oid, version)) =
        in_transaction("checking for the extension", installed_extension).flatten()
    else {
        if extension.take().is_some() {
            http.forget_extension();
            notify.forget_extension();
        }
        return naptime;
    };
    // A new library with the previous release's SQL (installed and restarted, not updated
    // yet): nothing is planned or sent until ALTER EXTENSION identity_sync UPDATE, after which
    // the worker goes on where the previous release left off (README "Upgrading").
    if release_of(&version) != release_of(LIBRARY_VERSION) {
        WAITING_FOR_UPDATE.with_borrow_mut(|said| {
            if said.as_deref() != Some(version.as_str()) {
                log!(
                    "identity_sync: the extension's SQL is version {version} and the library {LIBRARY_VERSION}; the worker waits for ALTER EXTENSION identity_sync UPDATE"
                );
                *said = Some(version);
            }
        });
        return naptime;
    }
    WAITING_FOR_UPDATE.with_borrow_mut(|said| *said = None);
    if *extension != Some(oid) {
        // Installed anew (DROP + CREATE, or an update): the planner's session temp tables were
        // made by the functions of the old version and may not fit the new ones.
        let discarded = in_transaction("discarding temp tables", || Spi::run("DISCARD TEMP"));
        if !matches!(discarded, Some(Ok(()))) {
            return naptime;
        }
        if extension.is_some() {
            http.forget_extension();
            notify.forget_extension();
        }
        *extension = Some(oid);
    }
    // From here on every transaction steps aside when DDL on the extension runs or waits
    // (txn.rs); the tick then ends and is tried again shortly.
    txn::set_gate(Some(oid));
    let batch = guc::BATCH_SIZE.get().max(1);

    // Once per worker start: what a crash left in flight is due again (pg_cron's
    // MarkPendingRunsAsFailed, but we deliver at least once instead).
    if !*recovered {
        if let Some(Ok(Some(n))) = in_transaction("recovering events in flight", || {
            Spi::get_one::<i32>("SELECT identity_sync._worker_start()")
        }) {
            if n > 0 {
                log!("identity_sync: {n} events were in flight when the worker stopped; they are due again");
            }
            crate::reconcile::recover();
            *recovered = true;
        }
    }
    if txn::stepped_aside() {
        return STEP_ASIDE_PAUSE;
    }

    // Housekeeping: snapshot sources due, date boundaries, expired grants, retention.
    let housekeeping_due = LAST_HOUSEKEEPING
        .get()
        .is_none_or(|at| at.elapsed() >= HOUSEKEEPING_INTERVAL);
    if housekeeping_due {
        LAST_HOUSEKEEPING.set(Some(std::time::Instant::now()));
        in_transaction("housekeeping", || {
            Spi::run("SELECT identity_sync._housekeeping()")
        });
        if txn::stepped_aside() {
            // not done: due again at the next tick
            LAST_HOUSEKEEPING.set(None);
            return STEP_ASIDE_PAUSE;
        }
    }

    // Plan until nothing is dirty, for a quarter of a second at most: under a steady stream of
    // HR changes there is always something dirty, and delivery must not starve meanwhile.
    let mut planned_any = false;
    let planning_until = std::time::Instant::now() + PLANNING_BUDGET;
    while std::time::Instant::now() < planning_until {
        let n = batch_step("planning", "SELECT identity_sync._plan($1)", batch);
        if txn::stepped_aside() {
            return STEP_ASIDE_PAUSE;
        }
        if n == 0 {
            break;
        }
        planned_any = true;
        if BackgroundWorker::sigterm_received() {
            return Duration::ZERO;
        }
        // What this batch planned goes out before the next batch is planned: under a stream of
        // single HR commits a batch is a commit or two and planning never runs dry, so waiting
        // for the budget kept every event of the stream waiting up to 250 ms (bench/run, SCIM
        // latency p50 138 ms).
        http.pump(batch);
        if txn::stepped_aside() {
            return STEP_ASIDE_PAUSE;
        }
    }

    // Table targets are delivered by SQL in our own transactions.
    let local = batch_step(
        "delivering to table targets",
        "SELECT identity_sync._deliver_tables($1)",
        batch,
    );

    if txn::stepped_aside() {
        return STEP_ASIDE_PAUSE;
    }

    // HTTP targets: record what came back, hand out what is due.
    let busy = http.pump(batch);
    if txn::stepped_aside() {
        return STEP_ASIDE_PAUSE;
    }

    // Reconcile runs: requests, scans, comparisons, repairs (src/reconcile.rs).
    let reconciling = reconciler.tick(http.dispatcher(), batch);
    if txn::stepped_aside() {
        return STEP_ASIDE_PAUSE;
    }

    // Notifications (src/deliver/notify.rs): record what came back, hand out what is due; never
    // waits for a mail relay or a webhook.
    let notifying = notify.tick();
    if txn::stepped_aside() {
        return STEP_ASIDE_PAUSE;
    }

    if planned_any || local > 0 || busy || reconciling || notifying {
        return Duration::ZERO;
    }
    let next_due = in_transaction("computing the next wake-up", || {
        Spi::get_one::<i64>("SELECT identity_sync._next_due_ms()")
    })
    .and_then(|r| r.ok().flatten())
    .unwrap_or(i64::MAX);
    let wait = if http.in_flight() > 0 || notify.in_flight() > 0 {
        Duration::from_millis(50)
    } else {
        naptime
    };
    wait.min(Duration::from_millis(next_due.max(0) as u64))
}
