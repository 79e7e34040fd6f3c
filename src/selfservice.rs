//! Self-service, Rust side: what the SQL side (`sql/selfservice.sql`) remembers about the caller
//! while a transaction runs.
//!
//! Row-level security on `identity_sync.request` and the views `my_requests` / `my_approvals`
//! ask per row "is this the caller's request?" and "can the caller decide it now?". Both answers
//! come from HR data through user SQL (the login expression, the products' owners conditions),
//! and computing them per row would scan the person source once per row. So the SQL side
//! computes them once and keeps them here: the caller's person until the transaction ends (keyed
//! by role and login expression), the set of requests the caller can decide until the statement
//! ends. It is backend memory, not a setting: a login cannot plant an answer, and only the
//! extension's own functions may call these (finalize.sql revokes them from PUBLIC). Everything
//! is forgotten at the end of every transaction, and the decidable set also whenever a decision
//! is written.

use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;

/// The caller's decidable requests, valid for one statement of one role.
struct Decidable {
    statement: pg_sys::TimestampTz,
    role: String,
    ids: Vec<i64>,
}

#[derive(Default)]
struct Memory {
    /// (role, login expression) → the person, or None when the role is nobody's login.
    persons: HashMap<(String, String), Option<String>>,
    decidable: Option<Decidable>,
}

thread_local! {
    static MEMORY: RefCell<Memory> = RefCell::new(Memory::default());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Forget everything when the transaction ends, however it ends.
#[pg_guard]
unsafe extern "C-unwind" fn forget_at_end(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            MEMORY.with(|m| {
                if let Ok(mut m) = m.try_borrow_mut() {
                    *m = Memory::default();
                }
            });
        }
        _ => {}
    }
}

fn ensure_callback() {
    if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        unsafe { pg_sys::RegisterXactCallback(Some(forget_at_end), std::ptr::null_mut()) };
    }
}

fn statement_start() -> pg_sys::TimestampTz {
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}

/// The person remembered for `role` under login expression `login` in this transaction: NULL
/// when nothing is remembered, `{}` when the role is nobody's login, `{person_key}` otherwise.
#[pg_extern(volatile, parallel_unsafe, name = "_remembered_person")]
fn remembered_person(role: &str, login: &str) -> Option<Vec<String>> {
    MEMORY.with(|m| {
        m.borrow()
            .persons
            .get(&(role.to_string(), login.to_string()))
            .map(|p| p.iter().cloned().collect())
    })
}

/// Remember the person of `role` (NULL: nobody) until the transaction ends.
#[pg_extern(volatile, parallel_unsafe, name = "_remember_person")]
fn remember_person(role: &str, login: &str, person: Option<&str>) {
    ensure_callback();
    MEMORY.with(|m| {
        m.borrow_mut().persons.insert(
            (role.to_string(), login.to_string()),
            person.map(str::to_string),
        )
    });
}

/// The requests `role` can decide, when remembered in this statement; NULL otherwise.
#[pg_extern(volatile, parallel_unsafe, name = "_remembered_decidable")]
fn remembered_decidable(role: &str) -> Option<Vec<i64>> {
    let now = statement_start();
    MEMORY.with(|m| match &m.borrow().decidable {
        Some(d) if d.statement == now && d.role == role => Some(d.ids.clone()),
        _ => None,
    })
}

/// Remember the requests `role` can decide until the statement ends.
#[pg_extern(volatile, parallel_unsafe, name = "_remember_decidable")]
fn remember_decidable(role: &str, ids: Vec<Option<i64>>) {
    ensure_callback();
    let d = Decidable {
        statement: statement_start(),
        role: role.to_string(),
        ids: ids.into_iter().flatten().collect(),
    };
    MEMORY.with(|m| m.borrow_mut().decidable = Some(d));
}

/// Forget the decidable requests (a decision was just written).
#[pg_extern(volatile, parallel_unsafe, name = "_forget_decidable")]
fn forget_decidable() {
    MEMORY.with(|m| m.borrow_mut().decidable = None);
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn a_person_is_remembered_per_role_and_login_expression() {
        assert_eq!(remembered_person("emp_1", "'emp_' || person.id"), None);
        remember_person("emp_1", "'emp_' || person.id", Some("1"));
        remember_person("nobody", "'emp_' || person.id", None);
        assert_eq!(
            remembered_person("emp_1", "'emp_' || person.id"),
            Some(vec!["1".to_string()])
        );
        assert_eq!(
            remembered_person("nobody", "'emp_' || person.id"),
            Some(vec![])
        );
        // another login expression, another role: not remembered
        assert_eq!(remembered_person("emp_1", "person.login"), None);
        assert_eq!(remembered_person("emp_2", "'emp_' || person.id"), None);
    }

    #[pg_test]
    fn decidable_requests_are_remembered_per_role_until_forgotten() {
        assert_eq!(remembered_decidable("emp_2"), None);
        remember_decidable("emp_2", vec![Some(3), None, Some(5)]);
        assert_eq!(remembered_decidable("emp_2"), Some(vec![3, 5]));
        assert_eq!(remembered_decidable("emp_3"), None);
        forget_decidable();
        assert_eq!(remembered_decidable("emp_2"), None);
    }

    #[pg_test]
    fn the_sql_side_uses_the_memory() {
        // The login expression is evaluated once per transaction: a second lookup is answered
        // from memory even after the person source changed (within this transaction).
        Spi::run(
            "CREATE TABLE ss_person (id int PRIMARY KEY);
             INSERT INTO ss_person VALUES (1);
             GRANT SELECT ON ss_person TO identity_sync_evaluator;
             SELECT identity_sync.add_person_source('ss_person', 'id');
             SELECT identity_sync.set_login($$'ss_role_' || person.id::text$$);",
        )
        .expect("setup");
        let first = Spi::get_one::<String>("SELECT identity_sync._person_of_role('ss_role_1')")
            .expect("lookup");
        assert_eq!(first.as_deref(), Some("1"));
        Spi::run("DELETE FROM ss_person").expect("delete");
        let second = Spi::get_one::<String>("SELECT identity_sync._person_of_role('ss_role_1')")
            .expect("lookup");
        assert_eq!(second.as_deref(), Some("1"));
        let other = Spi::get_one::<String>("SELECT identity_sync._person_of_role('ss_role_2')")
            .expect("lookup");
        assert_eq!(other, None);
    }
}
