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
mod evaluate;
mod guc;
mod reconcile;
mod selfservice;
mod shmem;
mod status;

::pgrx::pg_module_magic!(name, version);

/// The SQL files between the first and the last, in load order: each `requires` the one before
/// it, and the Rust functions (or `extension_sql!` names) it grants, comments or alters (so those
/// are created before it).
macro_rules! sql_in_load_order {
    ($previous:tt; $file:tt as $name:tt $(requires [$($function:tt),*])?; $($rest:tt)*) => {
        pgrx::extension_sql_file!($file, name = $name, requires = [$previous $($(, $function)*)?]);
        sql_in_load_order!($name; $($rest)*);
    };
    ($previous:tt;) => {};
}

// The SQL of each stage, in load order (sql/ numbers its files the same way).
pgrx::extension_sql_file!("../sql/00_schema.sql", name = "schema", bootstrap);
sql_in_load_order! {
    "schema";
    "../sql/10_config.sql" as "config" requires [normalize_diacritics, slug, name_variants, "expression_marker"];
    "../sql/15_sources.sql" as "sources";
    "../sql/20_capture.sql" as "capture" requires [_capture];
    "../sql/30_plan/00_person.sql" as "plan_person";
    "../sql/30_plan/10_compile.sql" as "plan_compile";
    "../sql/30_plan/20_desired.sql" as "plan_desired";
    "../sql/30_plan/30_diff.sql" as "plan_diff";
    "../sql/30_plan/40_thresholds.sql" as "plan_thresholds";
    "../sql/30_plan/50_apply.sql" as "plan_apply";
    "../sql/30_plan/60_plan.sql" as "plan" requires [commit_time];
    "../sql/40_deliver.sql" as "deliver" requires [exclude_worker];
    "../sql/45_housekeeping.sql" as "housekeeping";
    "../sql/48_reconcile.sql" as "reconcile";
    "../sql/50_status.sql" as "status" requires [worker_status];
    "../sql/52_metrics.sql" as "metrics";
    "../sql/55_notify.sql" as "notify";
    "../sql/60_selfservice/10_login.sql" as "selfservice_login";
    "../sql/60_selfservice/20_products.sql" as "selfservice_products";
    "../sql/60_selfservice/30_requests.sql" as "selfservice_requests";
    "../sql/60_selfservice/40_views.sql" as "selfservice_views";
}
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
