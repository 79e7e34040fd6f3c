//! Capture: the statement trigger on HR sources, and the commit-time wake-up of the worker.
//!
//! `identity_sync._capture(source_id, role, key_or_query)` is one generic statement trigger
//! (installed by `sql/20_capture.sql`, `_install_capture`): per triggering statement it appends
//! one row holding the affected person keys, read from the transition tables, to the outbox
//! (person and contract sources: straight from the tuplestores, without SPI; related sources:
//! the user's affected query, with a plan prepared once per backend and source, evaluated as
//! `identity_sync.run_as`, read-only and within `identity_sync.capture_timeout` by
//! `evaluate::isolated`). No per-row code, no index lookup on the HR write path; deduplication
//! is the planner's job.
//!
//! When capture cannot work (a trigger installed by hand, a key column renamed or dropped
//! behind identity_sync's back, the outbox gone, a related source's query broken) the HR write
//! fails with an [`Error`] that says what happened and how to fix it; the source registry and
//! the catalogs are read only then, on the error path. The event triggers of
//! `sql/20_capture.sql` keep DDL on sources from getting there.
//!
//! A transaction that captured something asks for the worker to be woken at commit
//! (`shmem::wake_at_commit`).

use crate::error::Error;
use crate::shmem::wake_at_commit;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::CString;

thread_local! {
    /// Prepared capture statements by their text (one per source and operation).
    static PLANS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// The person keys a related source's statement affects, for one operation: the user's
/// `affected` query reads the changed rows as "changed" (for an UPDATE, old and new rows both).
/// It runs as identity_sync.run_as, read-only and bounded (`evaluate::isolated`), so it only
/// reads; the outbox row is written afterwards, as the owner.
fn related_keys_sql(affected: &str, op: &str) -> String {
    let rows = match op {
        "insert" => "new_rows",
        "delete" => "old_rows",
        _ => "(SELECT * FROM new_rows UNION ALL SELECT * FROM old_rows) AS both_rows",
    };
    format!(
        "SELECT ARRAY(SELECT (a.k)::pg_catalog.text \
                        FROM (WITH changed AS (SELECT * FROM {rows}) {affected}\n) AS a(k) \
                       WHERE a.k IS NOT NULL)"
    )
}

/// Run `f` with `search_path` set for the duration only (as a function's SET clause would).
fn with_search_path<R>(path: Option<&str>, f: impl FnOnce() -> R) -> R {
    let Some(value) = path.and_then(|p| CString::new(p).ok()) else {
        return f();
    };
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        crate::evaluate::set_local(c"search_path", &value);
        let r = f();
        pg_sys::AtEOXact_GUC(true, level);
        r
    }
}

/// The capture trigger: `AFTER INSERT OR UPDATE OR DELETE ... REFERENCING ... FOR EACH
/// STATEMENT EXECUTE FUNCTION identity_sync._capture(source_id, role, key column or affected
/// query[, search_path])`. SECURITY DEFINER (20_capture.sql), so HR writers need no privilege on
/// the outbox; every name in its SQL is schema-qualified or a transition table.
///
/// Errors never come back to pgrx (its trigger wrapper would turn them into a Rust panic): each
/// is raised here with its own SQLSTATE, DETAIL and HINT.
#[pg_trigger]
fn _capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    match capture(trigger) {
        Ok(()) => Ok(None),
        Err(e) => e.report(),
    }
}

/// What a capture trigger's arguments say.
struct Args {
    source_id: i32,
    role: String,
    /// The key column (person and contract sources) or the affected query (related sources).
    key_or_query: String,
    /// The search_path a related source's affected query is written for.
    search_path: Option<String>,
}

fn capture(trigger: &PgTrigger<'_>) -> Result<(), Error> {
    let (args, op) = checked_call(trigger).map_err(|problem| misinstalled(trigger, &problem))?;
    if args.role != "related" {
        // The fast path: read the key column straight from the transition tables and append
        // the outbox row without SPI or an executor.
        if unsafe { capture_keys_directly(trigger, &args, op)? } {
            wake_at_commit();
        }
        return Ok(());
    }
    let sql = related_keys_sql(&args.key_or_query, op);
    let data = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    let table = names(trigger).1;
    let labels = [format!("affected query of related source {table}")];
    let bound = crate::evaluate::Bound {
        timeout_ms: crate::guc::CAPTURE_TIMEOUT.get(),
        setting: "identity_sync.capture_timeout",
        names: &labels,
        // (affected_query_failed names the source in the message itself)
        prefix: false,
    };
    // In a subtransaction, so that a timeout can be survived: the HR write must not wait on a
    // runaway query, nor fail because of one.
    let evaluated = in_subtransaction(|| {
        with_search_path(args.search_path.as_deref(), || {
            crate::evaluate::isolated(&bound, || {
                Spi::connect_mut(|client| -> Result<Vec<String>, Error> {
                    // The transition tables become visible to SPI under their REFERENCING names.
                    unsafe { pg_sys::SPI_register_trigger_data(data) };
                    PLANS.with(|plans| {
                        let mut plans = plans.borrow_mut();
                        if !plans.contains_key(&sql) {
                            let prepared = client.prepare(sql.as_str(), &[])?.keep();
                            plans.insert(sql.clone(), prepared);
                        }
                        let Some(plan) = plans.get(&sql) else {
                            return Ok(Vec::new());
                        };
                        let keys = client
                            .update(plan, None, &[])?
                            .first()
                            .get_one::<Vec<String>>()?;
                        Ok(keys.unwrap_or_default())
                    })
                })
            })
        })
    });
    let (op, keys) = match evaluated {
        Ok(keys) => (op, keys?),
        Err(_) if crate::evaluate::last_timed_out() => {
            // Which persons the statement affected is unknown: the planner plans everybody
            // (_claim_changes), and the HR write goes on.
            warning!(
                "identity_sync: the affected query of related source {table} ran past identity_sync.capture_timeout ({}); every person will be planned again",
                crate::error::duration(crate::guc::CAPTURE_TIMEOUT.get())
            );
            ("affected_timeout", Vec::new())
        }
        // (isolated raises PostgreSQL's errors again from Rust: ErrorReport)
        Err(caught) => match *caught {
            CaughtError::PostgresError(report) | CaughtError::ErrorReport(report)
                if query_is_broken(report.sql_error_code()) =>
            {
                return Err(affected_query_failed(trigger, &report));
            }
            // It (or a function it calls) tried to write: evaluated read-only (src/evaluate.rs).
            CaughtError::PostgresError(report) | CaughtError::ErrorReport(report)
                if report.sql_error_code() == PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION =>
            {
                return Err(Error::InUserSql {
                    code: report.sql_error_code(),
                    message: format!("{}: {}", labels[0], report.message()),
                    detail: report.detail().unwrap_or_default().to_string(),
                    hint: Some(
                        "identity_sync evaluates it read-only: the query, and every function it calls, must only read."
                            .to_string(),
                    ),
                });
            }
            other => other.rethrow(),
        },
    };
    if keys.is_empty() && op != "affected_timeout" {
        return Ok(());
    }
    let mut datums: Vec<pg_sys::Datum> = keys
        .iter()
        .filter_map(|k| k.as_str().into_datum())
        .collect();
    unsafe { append_outbox(trigger, args.source_id, op, &mut datums)? };
    wake_at_commit();
    Ok(())
}

/// Run `f` in a subtransaction of its own: an error inside is rolled back and returned, and the
/// transaction goes on (what a PL/pgSQL exception block does).
fn in_subtransaction<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe,
) -> Result<R, Box<CaughtError>> {
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    PgTryBuilder::new(|| {
        let r = f();
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
        Ok(r)
    })
    .catch_others(|e| {
        unsafe {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::CurrentResourceOwner = owner;
        }
        Err(Box::new(e))
    })
    .execute()
}

/// The trigger's arguments and operation, or what is wrong with how it was installed (a DETAIL
/// sentence). Only what the trigger data already holds is looked at: no catalog access.
fn checked_call(trigger: &PgTrigger<'_>) -> Result<(Args, &'static str), String> {
    match trigger.when() {
        Ok(PgTriggerWhen::After) => {}
        Ok(PgTriggerWhen::Before) => return Err("It fires BEFORE the statement.".into()),
        Ok(PgTriggerWhen::InsteadOf) => return Err("It is an INSTEAD OF trigger.".into()),
        Err(e) => return Err(format!("Its timing cannot be read ({e}).")),
    }
    if !matches!(trigger.level(), PgTriggerLevel::Statement) {
        return Err("It fires FOR EACH ROW.".into());
    }
    let (op, old_table, new_table) = match trigger.op() {
        Ok(PgTriggerOperation::Insert) => ("insert", None, Some("new_rows")),
        Ok(PgTriggerOperation::Update) => ("update", Some("old_rows"), Some("new_rows")),
        Ok(PgTriggerOperation::Delete) => ("delete", Some("old_rows"), None),
        Ok(PgTriggerOperation::Truncate) => {
            return Err(
                "It fires on TRUNCATE, which identity_sync._capture_truncate captures.".into(),
            )
        }
        Err(e) => return Err(format!("Its operation cannot be read ({e}).")),
    };
    let args = trigger
        .extra_args()
        .map_err(|e| format!("Its arguments cannot be read ({e})."))?;
    let shown = || {
        if args.is_empty() {
            "It has no arguments.".to_string()
        } else {
            let list: Vec<String> = args.iter().map(|a| quote_literal(a)).collect();
            format!("Its arguments are ({}).", list.join(", "))
        }
    };
    let (Some(source_id), Some(role), Some(key_or_query)) = (
        args.first().and_then(|a| a.parse::<i32>().ok()),
        args.get(1)
            .filter(|r| matches!(r.as_str(), "person" | "contract" | "related")),
        args.get(2),
    ) else {
        return Err(shown());
    };
    let related = role == "related";
    if args.len() > if related { 4 } else { 3 } {
        return Err(shown());
    }
    // Person and contract sources read the key column from whatever the tables are called; the
    // affected query of a related source reads them as new_rows and old_rows.
    let names = (
        trigger.old_transition_table_name().ok().flatten(),
        trigger.new_transition_table_name().ok().flatten(),
    );
    for (wanted, got, which) in [(old_table, names.0, "OLD"), (new_table, names.1, "NEW")] {
        match (wanted, got) {
            (Some(_), None) => {
                return Err(format!(
                    "It has no transition table of the {} rows (REFERENCING {which} TABLE AS {}).",
                    which.to_lowercase(),
                    wanted.unwrap_or_default()
                ))
            }
            (Some(w), Some(g)) if related && w != g => {
                return Err(format!(
                    "Its {which} TABLE is called {g}; the affected query of a related source reads it as {w}."
                ))
            }
            _ => {}
        }
    }
    Ok((
        Args {
            source_id,
            role: role.clone(),
            key_or_query: key_or_query.clone(),
            search_path: args.get(3).cloned(),
        },
        op,
    ))
}

/// PostgreSQL errors that mean a related source's affected query no longer works (a table,
/// column or function it names is gone, it cannot be run on this data), as opposed to errors
/// of the statement as a whole (cancel, deadlock, out of memory), which pass unchanged.
fn query_is_broken(code: PgSqlErrorCode) -> bool {
    // A SQLSTATE packs its five characters in six bits each, the class in the low twelve.
    let class = code as i32 & 0xFFF;
    [
        PgSqlErrorCode::ERRCODE_SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION,
        PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        PgSqlErrorCode::ERRCODE_CARDINALITY_VIOLATION,
    ]
    .iter()
    .any(|c| *c as i32 & 0xFFF == class)
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
    args: &Args,
    op: &str,
) -> Result<bool, Error> {
    let data = trigger.trigger_data();
    let rel = data.tg_relation;
    let desc = unsafe { (*rel).rd_att };
    // (A name with a NUL byte cannot be a column: attnum 0 below.)
    let key = CString::new(args.key_or_query.as_str()).unwrap_or_default();
    let attnum = unsafe { pg_sys::attnameAttNum(rel, key.as_ptr(), false) };
    if attnum <= 0 {
        return Err(key_column_missing(trigger, args));
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
    unsafe { append_outbox(trigger, args.source_id, op, &mut keys)? };
    Ok(true)
}

/// Append one outbox row (`identity_sync.change`) holding `keys` (text datums), with
/// `simple_heap_insert`: no SPI, no executor (the outbox has no index).
///
/// # Safety
/// Called from the capture trigger with its live trigger data; `keys` are text datums.
unsafe fn append_outbox(
    trigger: &PgTrigger<'_>,
    source_id: i32,
    op: &str,
    keys: &mut [pg_sys::Datum],
) -> Result<(), Error> {
    unsafe {
        // Syscache look-ups, as before; what is wrong is worked out only when one fails.
        let nsp = pg_sys::get_namespace_oid(c"identity_sync".as_ptr(), true);
        let (relid, seqid) = if nsp == pg_sys::InvalidOid {
            (pg_sys::InvalidOid, pg_sys::InvalidOid)
        } else {
            (
                pg_sys::get_relname_relid(c"change".as_ptr(), nsp),
                pg_sys::get_relname_relid(c"change_id_seq".as_ptr(), nsp),
            )
        };
        if relid == pg_sys::InvalidOid || seqid == pg_sys::InvalidOid {
            return Err(outbox_missing(trigger, nsp != pg_sys::InvalidOid));
        }
        let outbox = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        // The tuple below is formed column by column: refuse a table that is not that shape.
        let outbox_desc = (*outbox).rd_att;
        if !has_outbox_columns(outbox_desc) {
            let found = describe_columns(outbox_desc);
            pg_sys::table_close(outbox, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return Err(outbox_changed(trigger, &found));
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
        // Columns of identity_sync.change: id, source_id, op, keys, at, xid (the HR
        // transaction, which has its id already: it wrote the rows; its commit time is noted
        // at commit by shmem::wake_at_commit's callback and resolved by the planner). The
        // previous release's outbox takes the first five (heap_form_tuple reads natts values).
        let mut values = [
            id.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(source_id),
            pgrx::IntoDatum::into_datum(op).unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(array),
            pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp()),
            pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value),
        ];
        let mut nulls = [id.is_none(), false, false, false, false, false];
        let tuple = pg_sys::heap_form_tuple(outbox_desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(outbox, tuple);
        pg_sys::table_close(outbox, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The error path: what went wrong, and how to fix it. Only here are catalogs and the source
// registry read, so a capture that works pays nothing for them.
// ---------------------------------------------------------------------------------------------

/// The column types of `identity_sync.change` that capture writes, in order.
const OUTBOX_COLUMNS: [pg_sys::Oid; 6] = [
    pg_sys::INT8OID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::XID8OID,
];

/// The columns of the outbox of 0.1.0, which had no `xid`: between installing this library
/// (with a restart) and `ALTER EXTENSION identity_sync UPDATE`, which adds the column, HR writes
/// are captured into that outbox all the same (README "Upgrading").
const PREVIOUS_OUTBOX_COLUMNS: usize = 5;

/// Whether a tuple descriptor is the outbox's: id bigint, source_id int, op text, keys text[],
/// at timestamptz, xid xid8 (or the previous release's, without xid), nothing dropped or added.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
unsafe fn has_outbox_columns(desc: pg_sys::TupleDesc) -> bool {
    unsafe {
        let n = (*desc).natts as usize;
        (n == OUTBOX_COLUMNS.len() || n == PREVIOUS_OUTBOX_COLUMNS)
            && OUTBOX_COLUMNS[..n].iter().enumerate().all(|(i, t)| {
                let att = &*(*desc).attrs.as_ptr().add(i);
                !att.attisdropped && att.atttypid == *t
            })
    }
}

/// "name type, ..." of a tuple descriptor's live columns.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
unsafe fn describe_columns(desc: pg_sys::TupleDesc) -> String {
    let mut columns = Vec::new();
    unsafe {
        for i in 0..(*desc).natts as usize {
            let att = &*(*desc).attrs.as_ptr().add(i);
            if att.attisdropped {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy();
            let ty =
                std::ffi::CStr::from_ptr(pg_sys::format_type_be(att.atttypid)).to_string_lossy();
            columns.push(format!("{name} {ty}"));
        }
    }
    columns.join(", ")
}

/// A SQL string literal.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An identifier, quoted where SQL needs it.
fn quote_ident(s: &str) -> String {
    let Ok(c) = CString::new(s) else {
        return s.to_string();
    };
    unsafe {
        std::ffi::CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr()))
            .to_string_lossy()
            .into_owned()
    }
}

/// The trigger's name and its table (schema-qualified, as `identity_sync.source` shows it).
fn names(trigger: &PgTrigger<'_>) -> (String, String) {
    let name = trigger.name().unwrap_or("?").to_string();
    let table = match trigger.relation() {
        Ok(r) => format!("{}.{}", quote_ident(r.namespace()), quote_ident(r.name())),
        Err(_) => "?".to_string(),
    };
    (name, table)
}

/// A registered source, as `identity_sync.source` holds it.
#[derive(Clone)]
struct Registration {
    id: i32,
    relid: pg_sys::Oid,
    relation: String,
    role: String,
    key_column: Option<String>,
    starts: Option<String>,
    ends: Option<String>,
}

impl Registration {
    /// What kind of source this is, for a sentence.
    fn kind(&self) -> String {
        match self.role.as_str() {
            "related" => "a related source".to_string(),
            role => format!("the {role} source"),
        }
    }

    /// SQL that registers this source afresh (its capture triggers installed again), with `key`
    /// as its person key column.
    fn register_again(&self, key: &str) -> String {
        let rel = quote_literal(&self.relation);
        let add = match self.role.as_str() {
            "person" => format!(
                "identity_sync.add_person_source({rel}, {})",
                quote_literal(key)
            ),
            "contract" => format!(
                "identity_sync.add_contract_source({rel}, {}, {}, {})",
                quote_literal(key),
                quote_literal(self.starts.as_deref().unwrap_or_default()),
                quote_literal(self.ends.as_deref().unwrap_or_default())
            ),
            _ => format!("identity_sync.add_related_source({rel}, <affected query>)"),
        };
        format!("SELECT identity_sync.drop_source({rel}); SELECT {add};")
    }

    fn register_again_as_is(&self) -> String {
        self.register_again(self.key_column.as_deref().unwrap_or_default())
    }
}

/// The registration with id `source_id`, and the registration of the table `relid`.
fn registrations(
    source_id: Option<i32>,
    relid: pg_sys::Oid,
) -> (Option<Registration>, Option<Registration>) {
    let rows = Spi::connect(|client| -> Result<Vec<Registration>, pgrx::spi::Error> {
        let exists = client
            .select(
                "SELECT pg_catalog.to_regclass('identity_sync.source') IS NOT NULL",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<bool>()?;
        if exists != Some(true) {
            return Ok(Vec::new());
        }
        let table = client.select(
            "SELECT id, relation::pg_catalog.oid AS relid, relation::pg_catalog.text AS relation, role,
                    key_column::pg_catalog.text AS key_column, starts_column::pg_catalog.text AS starts,
                    ends_column::pg_catalog.text AS ends
               FROM identity_sync.source
              WHERE id = $1 OR relation = $2::pg_catalog.oid",
            None,
            &[source_id.into(), relid.into()],
        )?;
        let mut out = Vec::new();
        for row in table {
            out.push(Registration {
                id: row.get_by_name::<i32, _>("id")?.unwrap_or_default(),
                relid: row
                    .get_by_name::<pg_sys::Oid, _>("relid")?
                    .unwrap_or(pg_sys::InvalidOid),
                relation: row.get_by_name::<String, _>("relation")?.unwrap_or_default(),
                role: row.get_by_name::<String, _>("role")?.unwrap_or_default(),
                key_column: row.get_by_name::<String, _>("key_column")?,
                starts: row.get_by_name::<String, _>("starts")?,
                ends: row.get_by_name::<String, _>("ends")?,
            });
        }
        Ok(out)
    })
    .unwrap_or_default();
    let by_id = rows.iter().find(|r| Some(r.id) == source_id).cloned();
    let of_table = rows.into_iter().find(|r| r.relid == relid);
    (by_id, of_table)
}

/// The HINT for a capture trigger that should not be there, or not like this.
fn reinstall_hint(trigger: &str, table: &str, of_table: Option<&Registration>) -> String {
    match of_table {
        Some(r) => format!(
            "Remove it (DROP TRIGGER {} ON {table};) and let identity_sync install the capture triggers of {table} again: {}",
            quote_ident(trigger),
            r.register_again_as_is()
        ),
        None => format!(
            "Remove it (DROP TRIGGER {} ON {table};). To capture {table}, register it with identity_sync.add_person_source, add_contract_source or add_related_source, which install its capture triggers.",
            quote_ident(trigger)
        ),
    }
}

/// A capture trigger that fires in a way identity_sync never installs it.
fn misinstalled(trigger: &PgTrigger<'_>, problem: &str) -> Error {
    let (name, table) = names(trigger);
    let source_id = trigger
        .extra_args()
        .ok()
        .and_then(|a| a.first().and_then(|id| id.parse().ok()));
    let relid = trigger.relid().unwrap_or(pg_sys::InvalidOid);
    let (_, of_table) = registrations(source_id, relid);
    Error::CaptureMisinstalled {
        hint: reinstall_hint(&name, &table, of_table.as_ref()),
        detail: format!(
            "{problem} identity_sync installs identity_sync._capture as AFTER INSERT, UPDATE and DELETE triggers FOR EACH STATEMENT, with transition tables (REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows) and the arguments (source id, role, person key column or affected query)."
        ),
        trigger: name,
        table,
    }
}

/// The key column the trigger reads is not a column of its table: the trigger does not belong
/// to its source (by hand, out of date), or the column was renamed or dropped.
fn key_column_missing(trigger: &PgTrigger<'_>, args: &Args) -> Error {
    let (name, table) = names(trigger);
    let relid = trigger.relid().unwrap_or(pg_sys::InvalidOid);
    let (by_id, of_table) = registrations(Some(args.source_id), relid);
    let Some(reg) = by_id else {
        return Error::SourceNotRegistered {
            detail: match &of_table {
                Some(r) => format!("{table} is registered as source {}.", r.id),
                None => format!("{table} is not an identity_sync source."),
            },
            hint: reinstall_hint(&name, &table, of_table.as_ref()),
            trigger: name,
            table,
            source_id: args.source_id,
        };
    };
    if reg.relid != relid {
        return Error::SourceMismatch {
            detail: format!("Source {} is {}, not {table}.", reg.id, reg.relation),
            hint: reinstall_hint(&name, &table, of_table.as_ref()),
            trigger: name,
            table,
            source_id: args.source_id,
        };
    }
    if reg.role != args.role || reg.key_column.as_deref() != Some(args.key_or_query.as_str()) {
        return Error::SourceMismatch {
            detail: format!(
                "Source {} is {} with person key column \"{}\"; the trigger reads column \"{}\" as the key of {} source, and {table} has no such column.",
                reg.id,
                reg.kind(),
                reg.key_column.as_deref().unwrap_or_default(),
                args.key_or_query,
                if args.role == "person" { "the person" } else { "the contract" },
            ),
            hint: reinstall_hint(&name, &table, Some(&reg)),
            trigger: name,
            table,
            source_id: args.source_id,
        };
    }
    Error::KeyColumnMissing {
        detail: format!(
            "The capture trigger \"{name}\" reads the person key of every row written to {table} from it, so every INSERT, UPDATE and DELETE on {table} fails. It was renamed or dropped while identity_sync's event trigger (which follows renames and refuses drops) was not active."
        ),
        hint: format!(
            "Rename the column back, or register {} again with its new key column: {}",
            table,
            reg.register_again("<new column>")
        ),
        column: args.key_or_query.clone(),
        table,
    }
}

/// The outbox (or its sequence, or its schema) is not where capture appends.
fn outbox_missing(trigger: &PgTrigger<'_>, schema_exists: bool) -> Error {
    let (name, table) = names(trigger);
    Error::OutboxMissing {
        detail: format!(
            "The capture trigger \"{name}\" on {table} appends every change of {table} to it, so every INSERT, UPDATE and DELETE on {table} fails."
        ),
        hint: if schema_exists {
            format!(
                "Rename or move it back to identity_sync.change (with its sequence identity_sync.change_id_seq), or reinstall identity_sync. To stop capturing {table} instead: SELECT identity_sync.drop_source({});",
                quote_literal(&table)
            )
        } else {
            format!(
                "The schema identity_sync is gone: rename it back, or remove the capture triggers of {table} (DROP TRIGGER {} ON {table};).",
                quote_ident(&name)
            )
        },
    }
}

/// The outbox's columns are not the ones capture writes.
fn outbox_changed(trigger: &PgTrigger<'_>, found: &str) -> Error {
    let (name, table) = names(trigger);
    Error::OutboxChanged {
        detail: format!(
            "It has the columns ({found}); the capture trigger \"{name}\" on {table} writes (id bigint, source_id integer, op text, keys text[], at timestamp with time zone, xid xid8), so every INSERT, UPDATE and DELETE on {table} fails."
        ),
        hint: "Undo the change to identity_sync.change, or reinstall identity_sync.".to_string(),
    }
}

/// The affected query of a related source failed with `report`.
fn affected_query_failed(
    trigger: &PgTrigger<'_>,
    report: &pgrx::pg_sys::panic::ErrorReportWithLevel,
) -> Error {
    let (name, table) = names(trigger);
    let mut detail = report
        .detail()
        .map(|d| format!("{d}\n"))
        .unwrap_or_default();
    detail.push_str(&format!(
        "The capture trigger \"{name}\" runs it for every INSERT, UPDATE and DELETE on {table}, so each fails until the query works again."
    ));
    let mut hint = report.hint().map(|h| format!("{h}\n")).unwrap_or_default();
    hint.push_str(&format!(
        "Restore what the query reads, or register {table} again with a query that works: SELECT identity_sync.drop_source({rel}); SELECT identity_sync.add_related_source({rel}, <affected query>);",
        rel = quote_literal(&table)
    ));
    Error::AffectedQuery {
        table,
        code: report.sql_error_code(),
        message: report.message().to_string(),
        detail,
        hint,
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() {
        Spi::run(
            "CREATE TABLE cap_person (id int PRIMARY KEY, name text);
             INSERT INTO cap_person VALUES (1, 'a'), (2, 'b');
             GRANT SELECT ON cap_person TO identity_sync_evaluator;
             SELECT identity_sync.add_person_source('cap_person', 'id');
             DELETE FROM identity_sync.change;",
        )
        .expect("setup");
    }

    fn outbox_keys() -> Vec<String> {
        Spi::get_one::<Vec<String>>(
            "SELECT array_agg(k ORDER BY k) FROM identity_sync.change, unnest(keys) AS k",
        )
        .expect("outbox")
        .unwrap_or_default()
    }

    #[pg_test]
    fn a_statement_appends_one_row_with_its_keys() {
        setup();
        Spi::run("UPDATE cap_person SET name = 'x'").expect("update");
        assert_eq!(outbox_keys(), ["1", "2"]);
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM identity_sync.change").expect("count"),
            Some(1)
        );
    }

    #[pg_test]
    fn a_renamed_key_column_is_followed() {
        setup();
        Spi::run("ALTER TABLE cap_person RENAME COLUMN id TO person_no").expect("rename");
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT key_column::text FROM identity_sync.source WHERE relation = 'cap_person'::regclass"
            )
            .expect("source"),
            Some("person_no".to_string())
        );
        Spi::run("UPDATE cap_person SET name = 'y' WHERE person_no = 2").expect("update");
        assert_eq!(outbox_keys(), ["2"]);
    }

    #[pg_test(
        error = "cannot drop column \"id\" of public.cap_person: it is the person key of an identity_sync source"
    )]
    fn dropping_the_key_column_is_refused() {
        setup();
        Spi::run("ALTER TABLE cap_person DROP COLUMN id").expect("refused");
    }

    #[pg_test(error = "cannot drop table public.cap_person: it is an identity_sync source")]
    fn dropping_a_source_is_refused() {
        setup();
        Spi::run("DROP TABLE cap_person").expect("refused");
    }

    #[pg_test]
    fn drop_source_then_drop_table_works() {
        setup();
        Spi::run("SELECT identity_sync.drop_source('cap_person'); DROP TABLE cap_person")
            .expect("drop_source first");
    }

    #[pg_test(error = "person key column \"id\" of source public.cap_person does not exist")]
    fn a_key_column_renamed_unseen_fails_writes_with_a_message_that_says_so() {
        setup();
        Spi::run(
            "ALTER EVENT TRIGGER identity_sync_follow_source_ddl DISABLE;
             ALTER TABLE cap_person RENAME COLUMN id TO pno;",
        )
        .expect("rename unseen");
        Spi::run("UPDATE cap_person SET name = 'z'").expect("fails");
    }

    #[pg_test(
        error = "trigger \"by_hand\" on public.cap_extra is not a valid identity_sync capture trigger"
    )]
    fn a_row_trigger_installed_by_hand_is_named() {
        Spi::run(
            "CREATE TABLE cap_extra (id int);
             CREATE TRIGGER by_hand AFTER INSERT ON cap_extra FOR EACH ROW
                 EXECUTE FUNCTION identity_sync._capture('1', 'person', 'id');",
        )
        .expect("setup");
        Spi::run("INSERT INTO cap_extra VALUES (1)").expect("fails");
    }

    #[pg_test(error = "the change outbox identity_sync.change does not exist")]
    fn a_missing_outbox_is_named() {
        setup();
        Spi::run("ALTER TABLE identity_sync.change RENAME TO change_elsewhere").expect("rename");
        Spi::run("UPDATE cap_person SET name = 'w'").expect("fails");
    }
}
