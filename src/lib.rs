//! pipeline_ext: the outreach pipeline's data model, stage triggers, event
//! queue and the background worker that delivers events to webhooks.
//!
//! Every SQL object lives in `sql/NNN_*.sql`, loaded here in numeric order.
//! The same files, concatenated by `bin/build-trigger-only`, make the
//! trigger-only script for hosts that cannot load this library (Neon), so
//! nothing in them may depend on Rust code. SQL that only the extension has
//! lives in `sql/extension/` and next to the Rust it needs (src/wake.rs).
//!
//! Modules: settings (GUCs), launcher (starts a delivery worker per
//! database with the extension), worker_slots (each database's worker in
//! shared memory), wake (commit wake-up of a database's worker and its pid
//! for pipeline.status()), worker (the delivery worker's loop), transaction
//! (how it runs SQL: short transactions as its own role), queue (its SQL),
//! delivery (HTTP, no PostgreSQL), utility_hook (DROP DATABASE of a served
//! database without FORCE; DROP and ALTER EXTENSION reach its worker), payload_size
//! (an event's size without expanding it).

mod launcher;
mod payload_size;
mod queue;
mod settings;
mod transaction;
mod utility_hook;
mod wake;
mod worker;
mod worker_slots;

::pgrx::pg_module_magic!(name, version);

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // NB: shared memory and background workers can only be set up while the
    // postmaster loads shared_preload_libraries; loaded later (a plain
    // CREATE EXTENSION), the library serves SQL only and nothing delivers.
    // SAFETY: a flag PostgreSQL sets while it loads shared_preload_libraries.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    settings::register(preloading);
    wake::register_commit_callback();
    if preloading {
        worker_slots::init_shared_memory();
        utility_hook::init();
        // SAFETY: a flag the postmaster sets before loading libraries.
        if !unsafe { pgrx::pg_sys::IsBinaryUpgrade } {
            // pg_upgrade's server must see no activity but its own.
            launcher::register();
        }
    }
}
// NB: each file requires the one before it, so the generated script keeps
// the numeric order that bin/build-trigger-only uses too.
::pgrx::extension_sql_file!("../sql/001_schemas.sql", name = "schemas", bootstrap);
::pgrx::extension_sql_file!(
    "../sql/002_stage_tables.sql",
    name = "stage_tables",
    requires = ["schemas"]
);
::pgrx::extension_sql_file!(
    "../sql/003_events.sql",
    name = "events",
    requires = ["stage_tables"]
);
::pgrx::extension_sql_file!(
    "../sql/004_capture.sql",
    name = "capture",
    requires = ["events"]
);
::pgrx::extension_sql_file!(
    "../sql/005_stages.sql",
    name = "stages",
    requires = ["capture"]
);
::pgrx::extension_sql_file!(
    "../sql/006_queue.sql",
    name = "queue",
    requires = ["stages"]
);
::pgrx::extension_sql_file!(
    "../sql/007_errors.sql",
    name = "errors",
    requires = ["queue"]
);
::pgrx::extension_sql_file!(
    "../sql/008_views.sql",
    name = "views",
    requires = ["errors"]
);
::pgrx::extension_sql_file!(
    "../sql/009_stage_work.sql",
    name = "stage_work",
    requires = ["views"]
);
::pgrx::extension_sql_file!(
    "../sql/010_service_calls.sql",
    name = "service_calls",
    requires = ["stage_work"]
);
::pgrx::extension_sql_file!(
    "../sql/011_webhooks.sql",
    name = "webhooks",
    requires = ["service_calls"]
);
::pgrx::extension_sql_file!(
    "../sql/012_progress.sql",
    name = "progress",
    requires = ["webhooks"]
);
::pgrx::extension_sql_file!(
    "../sql/013_delivery.sql",
    name = "delivery",
    requires = ["progress"]
);
::pgrx::extension_sql_file!(
    "../sql/014_verify.sql",
    name = "verify",
    requires = ["delivery"]
);
::pgrx::extension_sql_file!(
    "../sql/015_partitions.sql",
    name = "partitions",
    requires = ["verify"]
);
::pgrx::extension_sql_file!(
    "../sql/extension/worker_role.sql",
    name = "worker_role",
    requires = ["partitions"]
);
::pgrx::extension_sql_file!(
    "../sql/extension/config_dump.sql",
    name = "config_dump",
    finalize
);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`: it must be visible at the crate root.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
