//! identity_sync: HR tables as the source of truth for identities, provisioned from inside
//! PostgreSQL.
//!
//! The pipeline is capture → plan → deliver; each stage has its own module here and its own
//! hand-written SQL file under `sql/` (loaded in the order below).

use pgrx::prelude::*;

mod capture;
mod config;
mod deliver;
mod error;
mod guc;
mod selfservice;
mod status;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!(
    "../sql/config.sql",
    name = "config",
    requires = ["bootstrap"]
);
pgrx::extension_sql_file!(
    "../sql/capture.sql",
    name = "capture",
    requires = ["config"]
);
pgrx::extension_sql_file!("../sql/plan.sql", name = "plan", requires = ["capture"]);
pgrx::extension_sql_file!("../sql/deliver.sql", name = "deliver", requires = ["plan"]);
pgrx::extension_sql_file!("../sql/status.sql", name = "status", requires = ["deliver"]);
pgrx::extension_sql_file!(
    "../sql/selfservice.sql",
    name = "selfservice",
    requires = ["status"]
);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Called when the library is loaded: in the postmaster when it is in
/// `shared_preload_libraries` (then the worker and its shared memory are registered), or
/// lazily in a backend at the first call of one of our functions.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        capture::init_shmem();
        deliver::worker::register();
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'identity_sync'"]
    }
}
