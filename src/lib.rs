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
mod reconcile;
mod selfservice;
mod shmem;
mod status;

::pgrx::pg_module_magic!(name, version);

// The SQL of each stage, in load order (sql/ numbers its files the same way). A Rust function
// that a file grants, comments or alters is in its `requires`, so it is created before it.
pgrx::extension_sql_file!("../sql/00_schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!(
    "../sql/10_config.sql",
    name = "config",
    requires = ["schema", normalize_diacritics, slug, name_variants]
);
pgrx::extension_sql_file!(
    "../sql/20_capture.sql",
    name = "capture",
    requires = ["config", _capture]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/00_person.sql",
    name = "plan_person",
    requires = ["capture"]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/10_compile.sql",
    name = "plan_compile",
    requires = ["plan_person"]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/20_desired.sql",
    name = "plan_desired",
    requires = ["plan_compile"]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/30_diff.sql",
    name = "plan_diff",
    requires = ["plan_desired"]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/40_thresholds.sql",
    name = "plan_thresholds",
    requires = ["plan_diff"]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/50_apply.sql",
    name = "plan_apply",
    requires = ["plan_thresholds"]
);
pgrx::extension_sql_file!(
    "../sql/30_plan/60_plan.sql",
    name = "plan",
    requires = ["plan_apply"]
);
pgrx::extension_sql_file!(
    "../sql/40_deliver.sql",
    name = "deliver",
    requires = ["plan"]
);
pgrx::extension_sql_file!(
    "../sql/45_housekeeping.sql",
    name = "housekeeping",
    requires = ["deliver"]
);
pgrx::extension_sql_file!(
    "../sql/48_reconcile.sql",
    name = "reconcile",
    requires = ["housekeeping"]
);
pgrx::extension_sql_file!(
    "../sql/50_status.sql",
    name = "status",
    requires = ["reconcile", worker_status]
);
pgrx::extension_sql_file!(
    "../sql/60_selfservice/10_login.sql",
    name = "selfservice_login",
    requires = ["status"]
);
pgrx::extension_sql_file!(
    "../sql/60_selfservice/20_products.sql",
    name = "selfservice_products",
    requires = ["selfservice_login"]
);
pgrx::extension_sql_file!(
    "../sql/60_selfservice/30_requests.sql",
    name = "selfservice_requests",
    requires = ["selfservice_products"]
);
pgrx::extension_sql_file!(
    "../sql/60_selfservice/40_views.sql",
    name = "selfservice_views",
    requires = ["selfservice_requests"]
);
pgrx::extension_sql_file!(
    "../sql/99_private_by_default.sql",
    name = "private_by_default",
    finalize
);

/// Called when the library is loaded: in the postmaster when it is in
/// `shared_preload_libraries` (then the worker and its shared memory are registered), or
/// lazily in a backend at the first call of one of our functions.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        reconcile::init_shmem();
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
