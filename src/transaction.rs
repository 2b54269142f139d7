//! How the worker runs SQL: in short transactions of its own, as the role
//! named by pipeline.worker_role, never as a superuser.
//!
//! A background worker can only connect as a role that may log in, and the
//! role the worker needs (pipeline_worker, made by CREATE EXTENSION) does
//! not exist before the extension does. So the worker connects as the
//! bootstrap superuser, and every transaction switches to the worker role
//! in a security-restricted context (as autovacuum does for index
//! functions): the SQL it runs has that role's rights only, and cannot SET
//! ROLE back. A role that is a superuser is refused. The session becomes
//! that role too, as SET SESSION AUTHORIZATION makes it: inside the
//! worker's statements session_user names it and is_superuser is off, as
//! they would be had it logged in. (PostgreSQL 15 lets a background worker
//! connect only as a role that may log in, and pipeline_worker must not:
//! connecting as the bootstrap superuser and switching is the way left.)
//!
//! The session's settings that a database owner could otherwise choose for
//! it (ALTER DATABASE ... SET) and that decide which code runs or whether
//! it can write are pinned: search_path is pg_catalog and pg_temp only. So
//! is jit, off.

use std::ffi::CString;
use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// Settings the worker's session holds whatever the database or role say.
const PINNED: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"row_security", c"on"),
    (c"default_transaction_read_only", c"off"),
    (c"session_replication_role", c"origin"),
    // Short statements only: compiling one with LLVM would cost more than
    // running it, and LLVM keeps memory in the process for good.
    (c"jit", c"off"),
];

/// Pins the settings above for the rest of the session.
pub fn pin_session_settings() {
    for (name, value) in PINNED {
        // SAFETY: plain C strings; PGC_S_OVERRIDE outranks every setting a
        // database, a role or the configuration file can give.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
}

/// Why a transaction did not run or did not commit.
pub struct Failed(pub String);

/// Runs `body` in a transaction of its own, as `role` when given (the
/// worker role; None only for catalog look-ups that run no SQL). An error
/// (SQL or Rust, in the body or at commit) rolls the transaction back and
/// comes back as Failed with its SQLSTATE, detail and hint: the worker
/// carries on instead of dying.
pub fn run<R>(role: Option<&str>, body: impl FnOnce() -> SpiResult<R>) -> Result<R, Failed> {
    // SAFETY: the worker's main thread, between transactions: this is how a
    // background worker starts one (as autovacuum and pg_cron do).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result: Result<R, String> = PgTryBuilder::new(AssertUnwindSafe(|| {
        if let Some(role) = role {
            become_role(role)?;
        }
        let value = body().map_err(|e| e.to_string())?;
        // SAFETY: the snapshot pushed above, and the transaction started
        // above; an error at commit is caught like any other.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(value)
    }))
    .catch_others(|e| Err(caught(e)))
    .catch_rust_panic(|e| Err(caught(e)))
    .execute();
    match result {
        Ok(value) => {
            // The statistics system learns of the worker's writes at once, so
            // autovacuum sees the queue churn while the worker runs.
            // SAFETY: outside any transaction, on the main thread.
            unsafe { pg_sys::pgstat_report_stat(false) };
            Ok(value)
        }
        Err(message) => {
            // SAFETY: rolls back whatever is open (also a failed commit) and
            // restores the user id saved when the transaction started.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(Failed(message))
        }
    }
}

/// The current transaction commits without waiting for its WAL to reach
/// the disk (SET LOCAL synchronous_commit = off): for transactions that
/// only claim (pipeline_delivery::queue::Exchange::durable says why that is
/// safe).
pub fn commit_without_flush() {
    // SAFETY: inside a transaction (the setting goes back at its end, as
    // SET LOCAL's does); NUL-terminated names; a user-settable setting.
    unsafe {
        pg_sys::set_config_option(
            c"synchronous_commit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
}

/// Flushes pending statistics before the worker sleeps.
pub fn flush_statistics() {
    // SAFETY: outside any transaction, on the main thread.
    unsafe { pg_sys::pgstat_report_stat(true) };
}

/// Switches the current transaction to `role`, security-restricted.
fn become_role(role: &str) -> Result<(), String> {
    let name =
        CString::new(role).map_err(|_| format!("pipeline.worker_role {role:?} holds a NUL"))?;
    // SAFETY: catalog look-ups inside a transaction; NUL-terminated name.
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return Err(format!(
            "pipeline.worker_role: role \"{role}\" does not exist (CREATE EXTENSION pipeline_ext creates pipeline_worker)"
        ));
    }
    // SAFETY: as above.
    if unsafe { pg_sys::superuser_arg(oid) } {
        return Err(format!(
            "pipeline.worker_role: role \"{role}\" is a superuser; the worker delivers nothing until it names a role without superuser rights"
        ));
    }
    // SAFETY: inside a transaction, which saved the previous user id and
    // context and restores them if it aborts; the worker authenticated as
    // the bootstrap superuser, who may take any session authorization.
    unsafe {
        pg_sys::SetSessionAuthorization(oid, false);
        pg_sys::SetUserIdAndSecContext(
            oid,
            (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
        );
    }
    Ok(())
}

/// The message of a caught error with its SQLSTATE, detail and hint.
fn caught(error: pg_sys::panic::CaughtError) -> String {
    match error {
        pg_sys::panic::CaughtError::PostgresError(report)
        | pg_sys::panic::CaughtError::ErrorReport(report)
        | pg_sys::panic::CaughtError::RustPanic {
            ereport: report, ..
        } => {
            let mut text = format!("{} (SQLSTATE {})", report.message(), sqlstate(&report));
            if let Some(detail) = report.detail() {
                text.push_str(&format!(" DETAIL: {detail}"));
            }
            if let Some(hint) = report.hint() {
                text.push_str(&format!(" HINT: {hint}"));
            }
            text
        }
    }
}

fn sqlstate(report: &pg_sys::panic::ErrorReportWithLevel) -> String {
    // The five characters PostgreSQL packs into an int, six bits each.
    let code = report.sql_error_code() as i32;
    (0..5)
        .map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}
