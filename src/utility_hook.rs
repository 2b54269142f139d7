//! What DROP DATABASE, DROP EXTENSION and ALTER EXTENSION do to the
//! delivery workers (a utility hook in every backend).
//!
//! DROP EXTENSION and ALTER EXTENSION ... UPDATE: at commit the database's
//! worker is told to look at the extension again: it ends when it is gone,
//! and starts delivering once the installed version is its library's,
//! instead of finding out at its next poll.
//!
//! DROP DATABASE of a served database works without FORCE.
//!
//! PostgreSQL refuses to drop a database anyone is connected to, and a
//! database's delivery worker always is. So every backend's utility hook
//! looks at DROP DATABASE: when the database has a worker (worker_slots.rs),
//! the worker is asked to stop first (it hands back what it holds and exits
//! within moments; DROP DATABASE itself waits up to 5 s for sessions to go).
//! The worker exits so as to be started again 5 s later: a drop that fails
//! gets it back. Once the drop succeeded, the database's slot says so, and
//! the worker started again exits for good instead of failing to connect
//! every 5 s.

use std::ffi::CStr;

use pgrx::prelude::*;

use crate::worker_slots;

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Called from _PG_init while shared_preload_libraries are loaded.
pub fn init() {
    // SAFETY: _PG_init runs once per process before any statement; the
    // previous hook is kept and called.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid statement to the hook.
    if unsafe { changes_an_extension(pstmt) } {
        crate::wake::recheck_extension_at_commit();
    }
    // SAFETY: as above.
    let dropping = unsafe { dropped_database(pstmt) };
    if let Some(database) = dropping {
        stop_worker(database);
    }
    // SAFETY: the same arguments, to the hook before ours or to PostgreSQL.
    unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
    if let Some(database) = dropping {
        // NB: reached only when the drop succeeded (an error does not return).
        worker_slots::dropped(database);
    }
}

/// Whether the statement is DROP EXTENSION or ALTER EXTENSION ... UPDATE
/// (of any extension: a needless look costs the worker one catalog read).
///
/// # Safety
/// `pstmt` must be the statement PostgreSQL passes to the utility hook.
unsafe fn changes_an_extension(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    if pstmt.is_null() {
        return false;
    }
    // SAFETY: the caller's contract; a DropStmt node says what it drops.
    unsafe {
        let node = (*pstmt).utilityStmt;
        !node.is_null()
            && ((*node).type_ == pg_sys::NodeTag::T_AlterExtensionStmt
                || ((*node).type_ == pg_sys::NodeTag::T_DropStmt
                    && (*node.cast::<pg_sys::DropStmt>()).removeType
                        == pg_sys::ObjectType::OBJECT_EXTENSION))
    }
}

/// The database a DROP DATABASE names, when it has a slot and the role may
/// drop it. NB: the hook runs before PostgreSQL checks the right: without
/// this check any role could stop a worker with a DROP DATABASE that then
/// fails.
///
/// # Safety
/// `pstmt` must be the statement PostgreSQL passes to the utility hook.
unsafe fn dropped_database(pstmt: *mut pg_sys::PlannedStmt) -> Option<pg_sys::Oid> {
    if worker_slots::launcher().is_none() || pstmt.is_null() {
        return None;
    }
    // SAFETY: the caller's contract; a DropdbStmt node has a dbname string.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_DropdbStmt {
            return None;
        }
        let stmt = node.cast::<pg_sys::DropdbStmt>();
        if (*stmt).dbname.is_null() {
            return None;
        }
        // Catalog look-ups: DROP DATABASE runs in a transaction of its own.
        let database = pg_sys::get_database_oid((*stmt).dbname, true);
        (database != pg_sys::InvalidOid
            && worker_slots::of(database).is_some()
            && pg_sys::pg_database_ownercheck(database, pg_sys::GetUserId()))
        .then_some(database)
    }
}

/// Asks the database's worker to stop (SIGTERM), as pg_terminate_backend
/// would.
fn stop_worker(database: pg_sys::Oid) {
    let Some(slot) = worker_slots::of(database) else {
        return;
    };
    if let Some((pid, _)) = slot.worker_process() {
        let name = database_name(database);
        log!("pipeline_ext: stopping the delivery worker of database \"{name}\" (pid {pid}) for DROP DATABASE");
        // SAFETY: a signal to a process of this server; the worker handles
        // SIGTERM by stopping cleanly.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

fn database_name(database: pg_sys::Oid) -> String {
    // SAFETY: a catalog look-up inside DROP DATABASE's transaction; the
    // name is copied before anything else runs.
    unsafe {
        let name = pg_sys::get_database_name(database);
        if name.is_null() {
            return database.to_u32().to_string();
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}
