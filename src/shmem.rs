//! The worker's shared memory: where its latch is (so that a committing HR transaction or an
//! operator function can wake it at once), its pid (for `worker_status()` and callers that
//! wait on it), and the commit callback that sets the latch (pg_net's `wake_at_commit`,
//! without NOTIFY), which also notes when each capturing transaction committed (the commit
//! times table below). Reconcile requests have their own slots (`reconcile.rs`).

use crate::error::Error;
use crate::guc;
use pgrx::prelude::*;
use pgrx::shmem::PgSharedMemoryInitialization;
use pgrx::{pg_shmem_init, PgAtomic};
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
    /// The transaction (full id) that asked for a wake-up, noted before its commit.
    static COMMITTING_XID: Cell<u64> = const { Cell::new(0) };
}

/// Commit times of the transactions that captured HR changes, by transaction id: a table in
/// shared memory indexed by the id modulo its size, each slot the id and its commit time,
/// written by the committing backend's commit callback (no lock: a slot is marked invalid,
/// filled, then given its id) and read by the planner when it claims the outbox
/// (`_commit_time`). What it costs the HR transaction: three atomic stores at commit. A slot is
/// reused after `COMMIT_SLOTS` transaction ids, so a change claimed much later (a long
/// backlog, or a restart of the server in between) is resolved by `track_commit_timestamp`, if
/// on, or stays unknown.
const COMMIT_SLOTS: usize = 1 << 16;

#[repr(C)]
struct CommitSlot {
    xid: AtomicU64,
    at: AtomicI64,
}

pub struct CommitTimes {
    slots: UnsafeCell<*mut CommitSlot>,
}

// The pointer is written once, by the shared memory startup hook, before any reader runs.
unsafe impl Sync for CommitTimes {}

impl PgSharedMemoryInitialization for CommitTimes {
    type Value = ();

    unsafe fn on_shmem_request(&'static self) {
        unsafe { pg_sys::RequestAddinShmemSpace(COMMIT_SLOTS * size_of::<CommitSlot>()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: ()) {
        unsafe {
            let size = COMMIT_SLOTS * size_of::<CommitSlot>();
            // AddinShmemInitLock (a macro in C: the main LWLock array's entry 21), as pgrx's
            // own shared memory types take it.
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let p =
                pg_sys::ShmemInitStruct(c"identity_sync_commit_times".as_ptr(), size, &mut found)
                    .cast::<CommitSlot>();
            if !found {
                std::ptr::write_bytes(p.cast::<u8>(), 0, size);
            }
            *self.slots.get() = p;
            pg_sys::LWLockRelease(init_lock);
        }
    }
}

impl CommitTimes {
    fn slot(&self, xid: u64) -> Option<&CommitSlot> {
        let base = unsafe { *self.slots.get() };
        if base.is_null() {
            return None;
        }
        Some(unsafe { &*base.add((xid % COMMIT_SLOTS as u64) as usize) })
    }

    fn note(&self, xid: u64, at: pg_sys::TimestampTz) {
        if let Some(slot) = self.slot(xid) {
            slot.xid.store(0, Ordering::Release);
            slot.at.store(at, Ordering::Release);
            slot.xid.store(xid, Ordering::Release);
        }
    }

    fn get(&self, xid: u64) -> Option<pg_sys::TimestampTz> {
        let slot = self.slot(xid)?;
        if xid == 0 || slot.xid.load(Ordering::Acquire) != xid {
            return None;
        }
        let at = slot.at.load(Ordering::Acquire);
        (slot.xid.load(Ordering::Acquire) == xid).then_some(at)
    }
}

static COMMIT_TIMES: CommitTimes = CommitTimes {
    slots: UnsafeCell::new(std::ptr::null_mut()),
};

static mut SHMEM_READY: bool = false;

/// Address of the worker's `PGPROC.procLatch` (shared memory, so valid in every backend),
/// or 0 while no worker runs.
static WORKER_LATCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"identity_sync_worker_latch") };
/// Pid of the running worker, 0 when none (for `identity_sync.worker_status()`).
static WORKER_PID: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"identity_sync_worker_pid") };

pub fn init() {
    pg_shmem_init!(WORKER_LATCH);
    pg_shmem_init!(WORKER_PID);
    pg_shmem_init!(COMMIT_TIMES = ());
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
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT if WAKE_AT_COMMIT.get() => {
            COMMITTING_XID.set(unsafe { pg_sys::GetTopFullTransactionIdIfAny() }.value);
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT if WAKE_AT_COMMIT.with(|w| w.replace(false)) => {
            // The commit record's own time, as track_commit_timestamp would keep it.
            let xid = COMMITTING_XID.replace(0);
            if xid != 0 && shmem_ready() {
                COMMIT_TIMES.note(xid, unsafe { pg_sys::GetCurrentTransactionStopTimestamp() });
            }
            wake_worker();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.with(|w| w.set(false));
            COMMITTING_XID.set(0);
        }
        _ => {}
    }
}

/// When transaction `xid` (a full transaction id, `xid8` as bigint) committed, if a backend
/// noted it at commit (see [`CommitTimes`]); NULL when it is not known here (the planner then
/// asks `track_commit_timestamp`, if on).
#[pg_extern(volatile, parallel_safe, strict, name = "_commit_time")]
fn commit_time(xid: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    if !shmem_ready() {
        return None;
    }
    let at = COMMIT_TIMES.get(u64::try_from(xid).ok()?)?;
    pgrx::datum::TimestampWithTimeZone::try_from(at).ok()
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
