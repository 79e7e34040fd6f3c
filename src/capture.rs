//! Capture: the statement trigger on HR sources, and the commit-time wake-up of the worker.
//!
//! `identity_sync._capture(source_id, role, key_or_query)` is one generic statement trigger
//! (installed by `sql/capture.sql`, `_install_capture`): per triggering statement it runs one
//! set-based INSERT of the affected person keys, read from the transition tables, into the
//! outbox, with a plan prepared once per backend and source. No per-row code, no exception
//! block, no index lookup on the HR write path; deduplication is the planner's job.
//!
//! A transaction that captured something asks for the worker to be woken at commit
//! (`shmem::wake_at_commit`).

use crate::shmem::wake_at_commit;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

thread_local! {
    /// Prepared capture statements by their text (one per source and operation).
    static PLANS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// The errors of the capture trigger.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("identity_sync._capture must be an AFTER ... FOR EACH STATEMENT trigger with transition tables")]
    Misused,
    #[error("identity_sync._capture: {0}")]
    Trigger(#[from] PgTriggerError),
    #[error("identity_sync._capture: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

/// The outbox INSERT of a related source for one operation: the user's `affected` query reads
/// the changed rows as "changed" (for an UPDATE, old and new rows both).
fn related_capture_sql(source_id: i32, affected: &str, op: &str) -> String {
    let rows = match op {
        "insert" => "new_rows",
        "delete" => "old_rows",
        _ => "(SELECT * FROM new_rows UNION ALL SELECT * FROM old_rows) AS both_rows",
    };
    format!(
        "INSERT INTO identity_sync.change (source_id, op, keys) \
         SELECT {source_id}, '{op}', k \
           FROM (SELECT ARRAY(SELECT (a.k)::pg_catalog.text \
                                FROM (WITH changed AS (SELECT * FROM {rows}) {affected}\n) AS a(k)) AS k) AS s \
          WHERE pg_catalog.cardinality(k) OPERATOR(pg_catalog.>) 0 \
         RETURNING 1"
    )
}

/// Run `f` with `search_path` set for the duration only (as a function's SET clause would).
fn with_search_path<R>(path: Option<&str>, f: impl FnOnce() -> R) -> R {
    let Some(path) = path else { return f() };
    let (Ok(name), Ok(value)) = (CString::new("search_path"), CString::new(path)) else {
        return f();
    };
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let r = f();
        pg_sys::AtEOXact_GUC(true, level);
        r
    }
}

/// The capture trigger: `AFTER INSERT OR UPDATE OR DELETE ... REFERENCING ... FOR EACH
/// STATEMENT EXECUTE FUNCTION identity_sync._capture(source_id, role, key column or affected
/// query[, search_path])`. SECURITY DEFINER (finalize.sql), so HR writers need no privilege on
/// the outbox; every name in its SQL is schema-qualified or a transition table.
#[pg_trigger]
fn _capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, CaptureError> {
    if !matches!(trigger.level(), PgTriggerLevel::Statement) {
        return Err(CaptureError::Misused);
    }
    let args = trigger.extra_args()?;
    let (Some(source_id), Some(role), Some(key_or_query)) = (
        args.first().and_then(|a| a.parse::<i32>().ok()),
        args.get(1),
        args.get(2),
    ) else {
        return Err(CaptureError::Misused);
    };
    let op = match trigger.op()? {
        PgTriggerOperation::Insert => "insert",
        PgTriggerOperation::Update => "update",
        PgTriggerOperation::Delete => "delete",
        PgTriggerOperation::Truncate => return Err(CaptureError::Misused),
    };
    if role != "related" {
        // The fast path: read the key column straight from the transition tables and append
        // the outbox row without SPI or an executor.
        if unsafe { capture_keys_directly(trigger, source_id, key_or_query, op)? } {
            wake_at_commit();
        }
        return Ok(None);
    }
    let sql = related_capture_sql(source_id, key_or_query, op);
    let data = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    let inserted = with_search_path(args.get(3).map(String::as_str), || {
        Spi::connect_mut(|client| -> Result<u64, CaptureError> {
            // The transition tables become visible to SPI under their REFERENCING names.
            unsafe { pg_sys::SPI_register_trigger_data(data) };
            PLANS.with(|plans| {
                let mut plans = plans.borrow_mut();
                if !plans.contains_key(&sql) {
                    let prepared = client.prepare(sql.as_str(), &[])?.keep();
                    plans.insert(sql.clone(), prepared);
                }
                let Some(plan) = plans.get(&sql) else {
                    return Ok(0);
                };
                Ok(client.update(plan, None, &[])?.len() as u64)
            })
        })
    })?;
    if inserted > 0 {
        wake_at_commit();
    }
    Ok(None)
}

/// The key column of a transition table, read through a read pointer of our own (other
/// triggers of the statement read the same tuplestore). By-value keys (integers) come back as
/// they are and are turned into text only when needed; other keys are turned into text at once,
/// since the tuple they point into does not outlive the next read.
///
/// # Safety
/// `store` and `desc` come from a live trigger call; `attnum` is a column of `desc`.
unsafe fn key_datums(
    store: *mut pg_sys::Tuplestorestate,
    desc: pg_sys::TupleDesc,
    attnum: i32,
    output: pg_sys::Oid,
    byval: bool,
) -> Vec<pg_sys::Datum> {
    let mut keys = Vec::new();
    if store.is_null() {
        return keys;
    }
    unsafe {
        let ptr = pg_sys::tuplestore_alloc_read_pointer(store, 0);
        pg_sys::tuplestore_select_read_pointer(store, ptr);
        pg_sys::tuplestore_rescan(store);
        let slot = pg_sys::MakeSingleTupleTableSlot(desc, &raw const pg_sys::TTSOpsMinimalTuple);
        while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
            let mut isnull = false;
            let d = pg_sys::slot_getattr(slot, attnum, &mut isnull);
            if !isnull {
                keys.push(if byval { d } else { as_text(output, d) });
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
    }
    keys
}

/// A key as a text datum, by its type's output function.
///
/// # Safety
/// `d` is a valid datum of the type whose output function is `output`.
unsafe fn as_text(output: pg_sys::Oid, d: pg_sys::Datum) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text(pg_sys::OidOutputFunctionCall(
            output, d,
        )))
    }
}

/// Two text datums with the same bytes.
///
/// # Safety
/// Both are valid, detoasted-or-not text datums.
unsafe fn same_text(a: &pg_sys::Datum, b: &pg_sys::Datum) -> bool {
    unsafe {
        let (a, b) = (
            a.cast_mut_ptr::<pg_sys::varlena>(),
            b.cast_mut_ptr::<pg_sys::varlena>(),
        );
        let (la, lb) = (pgrx::varsize_any_exhdr(a), pgrx::varsize_any_exhdr(b));
        la == lb
            && std::slice::from_raw_parts(pgrx::vardata_any(a) as *const u8, la)
                == std::slice::from_raw_parts(pgrx::vardata_any(b) as *const u8, lb)
    }
}

/// Append one outbox row with the keys of this statement's transition tables. Returns whether a
/// row was written (no row for a statement that touched nothing).
///
/// # Safety
/// Called from the capture trigger with its live trigger data.
unsafe fn capture_keys_directly(
    trigger: &PgTrigger<'_>,
    source_id: i32,
    key_column: &str,
    op: &str,
) -> Result<bool, CaptureError> {
    let data = trigger.trigger_data();
    let rel = data.tg_relation;
    let desc = unsafe { (*rel).rd_att };
    let Ok(key) = CString::new(key_column) else {
        return Err(CaptureError::Misused);
    };
    let attnum = unsafe { pg_sys::attnameAttNum(rel, key.as_ptr(), false) };
    if attnum <= 0 {
        return Err(CaptureError::Misused);
    }
    let att = unsafe { &*(*desc).attrs.as_ptr().add((attnum - 1) as usize) };
    let (mut output, mut varlena) = (pg_sys::InvalidOid, false); // varlena: unused
    unsafe { pg_sys::getTypeOutputInfo(att.atttypid, &mut output, &mut varlena) };

    let byval = att.attbyval;
    let new_keys = unsafe { key_datums(data.tg_newtable, desc, attnum, output, byval) };
    let old_keys = unsafe { key_datums(data.tg_oldtable, desc, attnum, output, byval) };
    // An UPDATE that changed no key has the same keys, in the same order, in both tables:
    // store them once. Otherwise the old keys are persons too (a key change dirties both).
    let same = new_keys.len() == old_keys.len()
        && if byval {
            new_keys == old_keys
        } else {
            new_keys
                .iter()
                .zip(old_keys.iter())
                .all(|(a, b)| unsafe { same_text(a, b) })
        };
    let mut keys = new_keys;
    if !same {
        keys.extend(old_keys);
    }
    if byval {
        for k in keys.iter_mut() {
            *k = unsafe { as_text(output, *k) };
        }
    }
    if keys.is_empty() {
        return Ok(false);
    }

    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"identity_sync".as_ptr(), false);
        let relid = pg_sys::get_relname_relid(c"change".as_ptr(), nsp);
        let seqid = pg_sys::get_relname_relid(c"change_id_seq".as_ptr(), nsp);
        if relid == pg_sys::InvalidOid || seqid == pg_sys::InvalidOid {
            return Err(CaptureError::Misused);
        }
        let array = pg_sys::construct_array(
            keys.as_mut_ptr(),
            keys.len() as i32,
            pg_sys::TEXTOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        let id =
            pgrx::fcinfo::direct_function_call::<i64>(pg_sys::nextval_oid, &[seqid.into_datum()]);
        let outbox = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        // Columns of identity_sync.change: id, source_id, op, keys, at.
        let mut values = [
            id.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(source_id),
            pgrx::IntoDatum::into_datum(op).unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(array),
            pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp()),
        ];
        let mut nulls = [id.is_none(), false, false, false, false];
        let tuple =
            pg_sys::heap_form_tuple((*outbox).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(outbox, tuple);
        pg_sys::table_close(outbox, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Ok(true)
}
