//! DROP DATABASE of the worker's database, without FORCE.
//!
//! PostgreSQL refuses to drop a database anyone is connected to, and the
//! worker always is. So every backend's utility hook looks at DROP DATABASE:
//! when it names pipeline.database, the worker is asked to stop first (it
//! hands back what it holds and exits within moments; DROP DATABASE itself
//! waits up to 5 s for sessions to go). Once the drop succeeded, shared
//! memory says so, and the worker the postmaster starts again exits for good
//! instead of failing to connect every 5 s: it comes back with the next
//! server start (with CREATE EXTENSION in a database of that name). A drop
//! that fails leaves the worker to restart as usual.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::{settings, wake};

// SAFETY: the name is unique to this library; pg_shmem_init! in _PG_init
// allocates the memory before any process uses it.
static DROPPED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pipeline_ext_database_dropped") };
static SHARED_MEMORY: AtomicBool = AtomicBool::new(false);
static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Called from _PG_init while shared_preload_libraries are loaded.
pub fn init() {
    pg_shmem_init!(DROPPED = AtomicBool::new(false));
    SHARED_MEMORY.store(true, Ordering::Relaxed);
    // SAFETY: _PG_init runs once per process before any statement; the
    // previous hook is kept and called.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// Whether the worker's database was dropped since the server started.
pub fn worker_database_dropped() -> bool {
    SHARED_MEMORY.load(Ordering::Relaxed) && DROPPED.get().load(Ordering::SeqCst)
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
    let dropping = unsafe { drops_worker_database(pstmt) };
    if dropping {
        stop_worker();
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
    if dropping {
        DROPPED.get().store(true, Ordering::SeqCst);
    }
}

/// Whether the statement is DROP DATABASE of pipeline.database, by a role
/// that may drop it. NB: the hook runs before PostgreSQL checks the right:
/// without this check any role could stop the worker with a DROP DATABASE
/// that then fails.
///
/// # Safety
/// `pstmt` must be the statement PostgreSQL passes to the utility hook.
unsafe fn drops_worker_database(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    if !SHARED_MEMORY.load(Ordering::Relaxed) || pstmt.is_null() {
        return false;
    }
    // SAFETY: the caller's contract; a DropdbStmt node has a dbname string.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_DropdbStmt {
            return false;
        }
        let stmt = node.cast::<pg_sys::DropdbStmt>();
        if (*stmt).dbname.is_null()
            || CStr::from_ptr((*stmt).dbname).to_string_lossy() != settings::database()
        {
            return false;
        }
        // Catalog look-ups: DROP DATABASE runs in a transaction of its own.
        let database = pg_sys::get_database_oid((*stmt).dbname, true);
        database != pg_sys::InvalidOid
            && pg_sys::pg_database_ownercheck(database, pg_sys::GetUserId())
    }
}

/// Asks the worker to stop (SIGTERM), as pg_terminate_backend would.
fn stop_worker() {
    if let Some((pid, _)) = wake::worker_process() {
        log!("pipeline_ext: stopping the delivery worker (pid {pid}) for DROP DATABASE");
        // SAFETY: a signal to a process of this server; the worker handles
        // SIGTERM by stopping cleanly.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}
