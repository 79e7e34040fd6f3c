//! Status, Rust side: whether a worker serves this database. The status views and operator
//! functions are SQL (`sql/50_status.sql`).

use crate::error::Error;
use crate::shmem;
use pgrx::prelude::*;

/// Whether a worker serves this database: `state` is `running` (with the pid in `detail`) or
/// `no worker`, with what is wrong in `detail` and what to change in `hint`.
#[pg_extern(stable, parallel_safe)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(detail, String),
        name!(hint, Option<String>),
    ),
> {
    let row = match shmem::check_served() {
        Err(Error::NoWorker { detail, hint }) => ("no worker".to_string(), detail, Some(hint)),
        Err(e) => ("no worker".to_string(), e.to_string(), None),
        Ok(()) => match shmem::worker_pid() {
            Some(pid) => ("running".to_string(), format!("pid {pid}"), None),
            None => (
                "no worker".to_string(),
                "The worker is not running right now (starting, or restarting after a crash)."
                    .to_string(),
                Some("Look for lines starting with identity_sync: in the server log.".to_string()),
            ),
        },
    };
    TableIterator::once(row)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// pgrx's test database is not the one the worker serves (`identity_sync.database` is
    /// `postgres`), and the status says so, naming the setting to change.
    #[pg_test]
    fn status_names_the_setting_when_no_worker_serves_this_database() {
        let (state, hint) =
            Spi::get_two::<String, String>("SELECT state, hint FROM identity_sync.worker_status()")
                .unwrap();
        assert_eq!(state.as_deref(), Some("no worker"));
        let hint = hint.unwrap_or_default();
        assert!(hint.contains("identity_sync.database"), "{hint}");
    }
}
