//! Status, Rust side: whether a worker serves this database. The status views and operator
//! functions are SQL (`sql/status.sql`).

use crate::{capture, guc};
use pgrx::prelude::*;

/// 'running (pid N)', or 'no worker: <why> HINT: <what to change>'.
#[pg_extern(stable, parallel_safe)]
fn worker_status() -> String {
    if !capture::shmem_ready() {
        return "no worker: identity_sync is not in shared_preload_libraries, so nothing is provisioned. \
                HINT: Add identity_sync to shared_preload_libraries in postgresql.conf and restart PostgreSQL."
            .to_string();
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
        return format!(
            "no worker: the identity_sync worker serves database \"{served}\", not \"{here}\". \
             HINT: Set identity_sync.database = '{here}' and restart PostgreSQL, or use the extension in \"{served}\"."
        );
    }
    match capture::worker_pid() {
        Some(pid) => format!("running (pid {pid})"),
        None => "no worker: the worker is not running right now (starting, or restarting after a crash). \
                 HINT: Look for lines starting with identity_sync: in the server log."
            .to_string(),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// pgrx's test database is not the one the worker serves (`identity_sync.database` is
    /// `postgres`), and the status says so, naming the setting to change.
    #[pg_test]
    fn status_names_the_setting_when_no_worker_serves_this_database() {
        let s = Spi::get_one::<String>("SELECT identity_sync.worker_status()")
            .unwrap()
            .unwrap_or_default();
        assert!(s.starts_with("no worker: "), "{s}");
        assert!(s.contains("identity_sync.database"), "{s}");
    }
}
