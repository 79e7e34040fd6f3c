//! Capture: the commit-time wake-up of the worker.
//!
//! The statement triggers themselves are generated PL/pgSQL (`sql/capture.sql`): one set-based
//! INSERT of the affected person keys per triggering statement. What they cannot do in SQL is
//! wake the worker when, and only when, the HR transaction commits. That is this module: the
//! worker publishes the address of its latch in shared memory, and a transaction that captured
//! something sets that latch from a commit callback (pg_net's `wake_at_commit`, without NOTIFY).

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Address of the worker's `PGPROC.procLatch` (shared memory, so valid in every backend),
/// or 0 while no worker runs.
static WORKER_LATCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"identity_sync_worker_latch") };
/// Pid of the running worker, 0 when none (for `identity_sync.worker_status()`).
static WORKER_PID: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"identity_sync_worker_pid") };

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

static mut SHMEM_READY: bool = false;

pub fn init_shmem() {
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

/// Ask for the worker to be woken when the current transaction commits. Called by the capture
/// triggers once per statement; costs a thread-local store after the first call.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_at_commit")]
fn wake_at_commit() {
    if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.with(|w| w.set(true));
}

/// Wake the worker now (for operator functions such as `resync`, `release`, `retry`).
#[pg_extern(volatile, parallel_unsafe, name = "_wake")]
fn wake_now() {
    wake_worker();
}
