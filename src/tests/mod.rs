//! In-database tests (`cargo pgrx test`). Each `#[pg_test]` runs in a
//! transaction that is rolled back, so tests see only their own rows.
//! Tests that need a committed transaction or a second session live in
//! `tests/` and run against a cluster of their own.

mod bad_input;
mod errors;
mod indexes;
mod partitions;
mod privileges;
mod progress;
mod queue;
mod service_calls;
mod stage_work;
mod stages;
mod verify;
mod views;
mod watch;
mod webhooks;

use pgrx::prelude::*;
use pgrx::JsonB;

// error_of runs a statement in a subtransaction (the EXCEPTION block) and
// returns its error message, or NULL when it succeeded: a failed statement
// leaves nothing behind, which is what the bad-input tests check.
pgrx::extension_sql!(
    r#"
    CREATE SCHEMA IF NOT EXISTS tests;
    CREATE FUNCTION tests.error_of(statement text) RETURNS text
    LANGUAGE plpgsql AS $$
    BEGIN
        EXECUTE statement;
        RETURN NULL;
    EXCEPTION WHEN OTHERS THEN
        RETURN SQLERRM;
    END
    $$;
    "#,
    name = "test_helpers",
    requires = ["verify"]
);

/// Runs SQL that returns nothing of interest.
pub(crate) fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The first column of the first row (None for SQL NULL). The statement
/// runs to its end, as a client's does: with a row limit (Spi::get_one's),
/// an INSERT ... RETURNING would stop before its statement triggers fire.
pub(crate) fn value<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    value_with(sql, &[])
}

/// value() of a statement with parameters ($1, ...).
pub(crate) fn value_with<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Option<T> {
    Spi::connect_mut(|client| client.update(sql, None, args)?.first().get_one::<T>())
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub(crate) fn count(sql: &str) -> i64 {
    value::<i64>(sql).unwrap_or_else(|| panic!("{sql}: returned NULL"))
}

pub(crate) fn text(sql: &str) -> String {
    value::<String>(sql).unwrap_or_else(|| panic!("{sql}: returned NULL"))
}

pub(crate) fn json(sql: &str) -> serde_json::Value {
    value::<JsonB>(sql)
        .unwrap_or_else(|| panic!("{sql}: returned NULL"))
        .0
}

/// The error message of a statement, or None when it succeeds.
pub(crate) fn error_of(sql: &str) -> Option<String> {
    Spi::get_one_with_args::<String>("SELECT tests.error_of($1)", &[sql.into()])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Asserts that a statement fails with a message containing `expected`.
#[track_caller]
pub(crate) fn assert_error(sql: &str, expected: &str) {
    match error_of(sql) {
        Some(message) => assert!(
            message.contains(expected),
            "{sql}\n  failed with: {message}\n  expected it to contain: {expected}"
        ),
        None => panic!("{sql}\n  succeeded, expected an error containing: {expected}"),
    }
}

pub(crate) fn events() -> i64 {
    count("SELECT count(*) FROM marketing.pipeline_events")
}

/// Events of one type, oldest first, as JSON rows.
pub(crate) fn events_of(event_type: &str) -> Vec<serde_json::Value> {
    let all = json(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e.id), '[]')
         FROM marketing.pipeline_events e WHERE e.event_type = '{event_type}'"
    ));
    all.as_array().cloned().unwrap_or_default()
}

/// A company that went through intake, validation and promotion; returns its master id.
pub(crate) fn promoted_company(name: &str, domain: &str) -> i64 {
    let intake = count(&format!(
        "INSERT INTO intake.company_raw_intake (company, website)
         VALUES ('{name}', 'https://{domain}') RETURNING id"
    ));
    run(&format!(
        "UPDATE intake.company_raw_intake SET validated = true, validation_status = 'valid'
         WHERE id = {intake}"
    ));
    count(&format!(
        "INSERT INTO marketing.company_master (intake_id, company_name, website)
         VALUES ({intake}, '{name}', 'https://{domain}') RETURNING id"
    ))
}
