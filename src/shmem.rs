//! The worker's shared memory: where its latch is (so that a committing HR transaction or an
//! operator function can wake it at once), its pid (for `worker_status()` and callers that
//! wait on it), and the commit callback that sets the latch (pg_net's `wake_at_commit`,
//! without NOTIFY). Reconcile requests have their own slots (`reconcile.rs`).

use crate::error::Error;
use crate::guc;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

static mut SHMEM_READY: bool = false;

/// Address of the worker's `PGPROC.procLatch` (shared memory, so valid in every backend),
/// or 0 while no worker runs.
static WORKER_LATCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"identity_sync_worker_latch") };
/// Pid of the running worker, 0 when none (for `identity_sync.worker_status()`).
static WORKER_PID: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"identity_sync_worker_pid") };

pub fn init() {
    pg_shmem_init!(WORKER_LATCH);
    pg_shmem_init!(WORKER_PID);
    unsafe { SHMEM_READY = true };
}

/// True when this backend has our shared memory, i.e. the library was preloaded.
pub fn shmem_ready() -> bool {
    unsafe { SHMEM_READY }
}

/// Called by the worker once it runs: publish its latch and pid.
pub fn publish_worker() {
    unsafe {
        let latch = &raw mut (*pg_sys::MyProc).procLatch;
        WORKER_LATCH.get().store(latch as u64, Ordering::SeqCst);
        WORKER_PID
            .get()
            .store(pg_sys::MyProcPid as u64, Ordering::SeqCst);
    }
}

/// Called by the worker on a clean exit.
pub fn unpublish_worker() {
    WORKER_LATCH.get().store(0, Ordering::SeqCst);
    WORKER_PID.get().store(0, Ordering::SeqCst);
}

/// Pid of the running worker, if any.
pub fn worker_pid() -> Option<i32> {
    if !shmem_ready() {
        return None;
    }
    match WORKER_PID.get().load(Ordering::SeqCst) {
        0 => None,
        pid => i32::try_from(pid).ok(),
    }
}

/// Set the worker's latch now (used by the commit callback and by operator functions that
/// want an immediate reaction).
pub fn wake_worker() {
    if !shmem_ready() {
        return;
    }
    let latch = WORKER_LATCH.get().load(Ordering::SeqCst);
    if latch != 0 {
        // The latch lives in the PGPROC array in shared memory, mapped at the same address in
        // every backend; setting the latch of a worker that has since exited is harmless.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT if WAKE_AT_COMMIT.with(|w| w.replace(false)) => {
            wake_worker();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.with(|w| w.set(false));
        }
        _ => {}
    }
}

/// Ask for the worker to be woken when the current transaction commits (capture does this;
/// configuration and operator functions too). A thread-local store after the first call.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_at_commit")]
pub fn wake_at_commit() {
    if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.with(|w| w.set(true));
}

/// Whether a worker can serve this backend's database: the library is preloaded and
/// `identity_sync.database` names this database. (Whether it runs right now is
/// [`worker_pid`].)
pub fn check_served() -> Result<(), Error> {
    if !shmem_ready() {
        return Err(Error::NoWorker {
            detail: "identity_sync is not in shared_preload_libraries, so nothing is provisioned."
                .into(),
            hint: "Add identity_sync to shared_preload_libraries in postgresql.conf and restart PostgreSQL."
                .into(),
        });
    }
    let here = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    };
    let served = guc::database();
    if here != served {
        return Err(Error::NoWorker {
            detail: format!(
                "The identity_sync worker serves database \"{served}\", not \"{here}\"."
            ),
            hint: format!(
                "Set identity_sync.database = '{here}' and restart PostgreSQL, or use the extension in \"{served}\"."
            ),
        });
    }
    Ok(())
}
