//! pipeline_ext: the outreach pipeline's data model, stage triggers and event
//! queue, installed by `CREATE EXTENSION pipeline_ext`.
//!
//! Every SQL object lives in `sql/NNN_*.sql`, loaded here in numeric order.
//! The same files, concatenated by `bin/build-trigger-only`, make the
//! trigger-only script for hosts that cannot load this library (Neon), so
//! nothing in them may depend on Rust code. SQL that only the extension has
//! lives in `sql/extension/`.

::pgrx::pg_module_magic!(name, version);

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
    "../sql/009_verify.sql",
    name = "verify",
    requires = ["views"]
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
