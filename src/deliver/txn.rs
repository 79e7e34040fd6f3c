//! The worker's transactions: every step it takes is a short transaction of its own.
//!
//! **Stepping aside for DDL.** Every transaction of the worker first takes, without waiting, a
//! share lock on the extension itself (the `pg_extension` object, the lock `DROP EXTENSION`
//! takes before anything else). Whoever must change the extension's tables under the worker's
//! feet takes that lock exclusively first: `DROP EXTENSION` by itself, `ALTER EXTENSION`
//! through the event trigger `identity_sync_exclude_worker` and `drop_target()` through
//! [`exclude_worker`]. They wait for the worker's transaction in progress (holding no lock the
//! worker could want), and the worker's next transaction finds the lock taken or asked for
//! (a queued request conflicts too) and gives up at once instead of queueing behind them with
//! locks of its own: no deadlock, and the DDL goes through on its first try. A lock the worker
//! waits for longer than `lock_timeout` (set by the worker) and a deadlock it is chosen for are
//! stepping aside too: the step is tried again on a later tick, nothing is lost.
//!
//! **After an update.** The same look at the extension's `pg_extension` row tells whether an
//! `ALTER EXTENSION … UPDATE` committed since the worker's last transaction (the row's
//! version changed): the session's temp tables were then made for the old version's tables
//! (`_is_done` is `LIKE identity_sync.event`), so they are discarded before going on.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::Cell;

thread_local! {
    /// The extension whose lock the worker's transactions take (the worker sets it once it
    /// has found the extension); None in other backends.
    static GATE: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
    /// A transaction stepped aside since [`take_stepped_aside`] was last called.
    static STEPPED_ASIDE: Cell<bool> = const { Cell::new(false) };
    /// The extension and the version (raw xmin) of its `pg_extension` row that the session's
    /// state was made for.
    static SEEN: Cell<Option<(pg_sys::Oid, u32)>> = const { Cell::new(None) };
}

/// The worker serves extension `oid` (None: no extension installed).
pub fn set_gate(oid: Option<pg_sys::Oid>) {
    GATE.set(oid);
}

/// The version (raw xmin) of extension `oid`'s `pg_extension` row, None when it is gone.
///
/// # Safety
/// Inside a transaction.
unsafe fn extension_row_version(oid: pg_sys::Oid) -> Option<u32> {
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::ExtensionRelationId, lock);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_extension_oid as pg_sys::AttrNumber,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::F_OIDEQ.into(),
            pg_sys::Datum::from(oid),
        );
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::Oid::from(pg_sys::ExtensionOidIndexId),
            true,
            std::ptr::null_mut(),
            1,
            &mut key,
        );
        let tuple = pg_sys::systable_getnext(scan);
        let version = (!tuple.is_null())
            .then(|| pg_sys::HeapTupleHeaderGetRawXmin((*tuple).t_data).into_inner());
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, lock);
        version
    }
}

/// Whether a transaction stepped aside for DDL since the last call (and forget it).
pub fn take_stepped_aside() -> bool {
    STEPPED_ASIDE.replace(false)
}

/// Whether a transaction stepped aside since [`take_stepped_aside`] (without forgetting it).
pub fn stepped_aside() -> bool {
    STEPPED_ASIDE.get()
}

/// Take the worker's gate: a share lock on the extension object, without waiting. None when
/// DDL holds or waits for it, or when the extension is gone; else the version of its row.
///
/// # Safety
/// Inside a transaction.
unsafe fn enter_gate(oid: pg_sys::Oid) -> Option<u32> {
    unsafe {
        if !pg_sys::ConditionalLockDatabaseObject(
            pg_sys::ExtensionRelationId,
            oid,
            0,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        ) {
            return None;
        }
        extension_row_version(oid)
    }
}

/// Errors that mean "someone else needs these locks now": give way, try again later.
fn is_lock_conflict(code: PgSqlErrorCode) -> bool {
    matches!(
        code,
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE | PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
    )
}

/// Run `f` in a transaction of its own. An ERROR inside is logged and the transaction rolled
/// back, so one bad tick never takes the worker down. None also when the transaction stepped
/// aside for DDL (see the module comment; [`stepped_aside`] says so).
pub fn in_transaction<R>(what: &str, f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    let mut updated = None;
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        // The gate comes before the snapshot: what the DDL we waited for did is visible.
        if let Some(oid) = GATE.get() {
            let Some(version) = enter_gate(oid) else {
                pg_sys::AbortCurrentTransaction();
                STEPPED_ASIDE.set(true);
                return None;
            };
            if SEEN.get() != Some((oid, version)) {
                updated = Some((oid, version));
            }
        }
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // (a new installation's temp tables were discarded by the worker's tick already)
    let discard = matches!((updated, SEEN.get()), (Some((oid, _)), Some((seen, _))) if oid == seen);
    let result = PgTryBuilder::new(|| {
        if discard {
            // an update committed: temp tables made for the old version's tables go
            Spi::run("DISCARD TEMP").ok()?;
        }
        Some(f())
    })
    .catch_others(|e| {
        let (message, code) = match &e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                (r.message().to_string(), r.sql_error_code())
            }
            CaughtError::RustPanic { ereport, .. } => {
                (ereport.message().to_string(), ereport.sql_error_code())
            }
        };
        if is_lock_conflict(code) {
            STEPPED_ASIDE.set(true);
            log!("identity_sync: {what} stepped aside: {message}; tried again later");
        } else {
            log!("identity_sync: {what} failed: {message}");
        }
        None
    })
    .execute();
    unsafe {
        if result.is_some() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
            if updated.is_some() {
                SEEN.set(updated);
            }
        } else {
            pg_sys::AbortCurrentTransaction();
        }
        // What the transaction did goes to the cumulative statistics, as a client backend's
        // does when it goes idle (at most once a second; cheap otherwise). Without it the
        // worker's inserts, updates and deletes are invisible to autovacuum: the queue and the
        // registry would never be vacuumed or analyzed however many dead rows they hold.
        let _ = pg_sys::pgstat_report_stat(false);
    }
    result
}

/// `identity_sync._exclude_worker()`: take the worker's gate exclusively until the end of the
/// transaction, waiting for the worker's transaction in progress. Called first by whatever
/// changes the extension's tables in a way that could deadlock with the worker (`drop_target`,
/// the event trigger on `ALTER EXTENSION`); `DROP EXTENSION` takes the same lock by itself.
#[pg_extern(volatile, parallel_unsafe, name = "_exclude_worker")]
pub fn exclude_worker() {
    unsafe {
        let oid = pg_sys::get_extension_oid(c"identity_sync".as_ptr(), true);
        if oid != pg_sys::InvalidOid {
            pg_sys::LockDatabaseObject(
                pg_sys::ExtensionRelationId,
                oid,
                0,
                pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
            );
        }
    }
}
