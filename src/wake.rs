//! Waking the delivery worker when events are committed.
//!
//! The worker cannot LISTEN (background workers are refused), so a write of
//! marketing.pipeline_events fires a statement trigger that only raises a
//! flag in the writing backend. At commit, a transaction callback sees the
//! flag and sets the worker's latch, found through its PGPROC number in
//! shared memory. One wake per transaction, whatever the number of events;
//! an aborted transaction wakes nobody. The worker's poll interval covers
//! anything that slips past (a prepared transaction committed elsewhere).
//!
//! The latch alone is not the message: PostgreSQL's own waits inside the
//! worker's transactions (a lock wait, say) reset it, so a commit that set it
//! then would be lost. Each wake-up also counts in shared memory, and the
//! worker compares the count before every sleep (commits_since_last_look).
//!
//! The same shared memory tells pipeline.status() whether the worker runs,
//! to any role (pg_stat_activity hides other users' workers).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

const NO_WORKER: u32 = u32::MAX;

/// PGPROC number of the running worker, or NO_WORKER.
// SAFETY: the name is unique to this library; pg_shmem_init! in _PG_init
// allocates the memory before any process uses it.
static WORKER_PROC: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pipeline_ext_worker_proc") };

/// Whether the worker would act on new events (it is enabled and some
/// endpoint is): when not, writers skip the wake-up, which would otherwise
/// cost a signal and a round of the worker per commit.
// SAFETY: as for WORKER_PROC.
static WAKE_WANTED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pipeline_ext_wake_wanted") };

/// Commits that woke the worker, ever: the worker claims when it changed.
// SAFETY: as for WORKER_PROC.
static WAKES: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pipeline_ext_wakes") };

/// The worker's copy of WAKES when it last looked.
static WAKES_SEEN: AtomicU64 = AtomicU64::new(0);

/// Set in _PG_init under shared_preload_libraries: only then does the
/// shared memory above exist.
static SHARED_MEMORY: AtomicBool = AtomicBool::new(false);

/// This backend wrote events in the current transaction.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// ... or changed an endpoint: wake the worker whatever it wants.
static WAKE_ALWAYS: AtomicBool = AtomicBool::new(false);

/// Called from _PG_init while shared_preload_libraries are loaded.
pub fn init_shared_memory() {
    pg_shmem_init!(WORKER_PROC = AtomicU32::new(NO_WORKER));
    pg_shmem_init!(WAKE_WANTED = AtomicBool::new(true));
    pg_shmem_init!(WAKES = AtomicU64::new(0));
    SHARED_MEMORY.store(true, Ordering::Relaxed);
}

/// Called from _PG_init in every process that loads the library.
pub fn register_commit_callback() {
    // SAFETY: registers a static #[pg_guard] callback with no argument.
    unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut()) };
}

/// The worker announces itself; the entry is cleared when it exits.
pub fn publish_worker() {
    if !SHARED_MEMORY.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: MyProc is this process's PGPROC once it is connected; the
    // callback is static and takes no argument.
    unsafe {
        WORKER_PROC
            .get()
            .store((*pg_sys::MyProc).pgprocno as u32, Ordering::SeqCst);
        pg_sys::before_shmem_exit(Some(unpublish_worker), pg_sys::Datum::from(0));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn unpublish_worker(_code: i32, _arg: pg_sys::Datum) {
    WORKER_PROC.get().store(NO_WORKER, Ordering::SeqCst);
}

/// The worker: whether commits woke it since it last asked (and forget
/// them). Asked after the latch is reset, so a commit that comes later sets
/// the latch again.
pub fn commits_since_last_look() -> bool {
    if !SHARED_MEMORY.load(Ordering::Relaxed) {
        return false;
    }
    let wakes = WAKES.get().load(Ordering::SeqCst);
    WAKES_SEEN.swap(wakes, Ordering::Relaxed) != wakes
}

/// The worker, before it sleeps: whether commits woke it since it last
/// looked, whatever became of its latch meanwhile.
pub fn commits_waiting() -> bool {
    SHARED_MEMORY.load(Ordering::Relaxed)
        && WAKES.get().load(Ordering::SeqCst) != WAKES_SEEN.load(Ordering::Relaxed)
}

/// The worker says whether commits of new events should wake it.
pub fn want_wakes(wanted: bool) {
    if SHARED_MEMORY.load(Ordering::Relaxed) {
        WAKE_WANTED.get().store(wanted, Ordering::SeqCst);
    }
}

fn wake_wanted_now() -> bool {
    !SHARED_MEMORY.load(Ordering::Relaxed) || WAKE_WANTED.get().load(Ordering::SeqCst)
}

fn is_worker() -> bool {
    // SAFETY: reads a pointer PostgreSQL sets at process start.
    unsafe { !pg_sys::MyBgworkerEntry.is_null() }
}

/// Statement trigger on marketing.pipeline_events and pipeline.webhooks
/// (INSERT, UPDATE): the transaction may have made events deliverable (new,
/// replayed, or waiting for an endpoint that is now there).
#[pg_trigger(sql = "
    CREATE FUNCTION pipeline._wake_worker() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', '_wake_worker_wrapper';
    COMMENT ON FUNCTION pipeline._wake_worker() IS
        'Wakes the delivery worker when the transaction commits (extension only).';
")]
fn _wake_worker<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    // The worker's own claims and outcomes need no wake-up; new events only
    // when the worker wants them; endpoint changes (the trigger with an
    // argument) always, since they decide what the worker wants.
    let table = (trigger.table_schema()?, trigger.table_name()?);
    if !matches!(
        (table.0.as_str(), table.1.as_str()),
        ("marketing", "pipeline_events") | ("pipeline", "webhooks")
    ) {
        error!(
            "pipeline._wake_worker() serves only marketing.pipeline_events and pipeline.webhooks, not {}.{}",
            table.0, table.1
        );
    }
    // NB: whether the worker wants the wake-up is asked at commit, once the
    // events are visible: asked here, a worker that turns wake-ups on and
    // then looks for due events before this commit would miss them.
    if !is_worker() {
        WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
        if trigger.trigger().tgnargs > 0 {
            WAKE_ALWAYS.store(true, Ordering::Relaxed);
        }
    }
    Ok(None)
}

pgrx::extension_sql!(
    r#"
    -- Only the owner may attach it to a table (and it refuses other tables).
    REVOKE ALL ON FUNCTION pipeline._wake_worker() FROM PUBLIC;
    CREATE TRIGGER pipeline_wake_worker
        AFTER INSERT OR UPDATE ON marketing.pipeline_events
        FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker();
    -- A registered or re-enabled endpoint releases the events that waited for it.
    CREATE TRIGGER pipeline_wake_worker
        AFTER INSERT OR UPDATE ON pipeline.webhooks
        FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker('always');
    "#,
    name = "wake_trigger",
    requires = ["events", "webhooks", _wake_worker]
);

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let wrote = WAKE_AT_COMMIT.swap(false, Ordering::Relaxed);
            let always = WAKE_ALWAYS.swap(false, Ordering::Relaxed);
            // The commit is visible to new snapshots by now (the callback
            // runs after the proc array knows it ended).
            if wrote && (always || wake_wanted_now()) {
                wake_worker();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            WAKE_ALWAYS.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

fn wake_worker() {
    if !SHARED_MEMORY.load(Ordering::Relaxed) {
        return;
    }
    let procno = WORKER_PROC.get().load(Ordering::SeqCst);
    if procno == NO_WORKER {
        return;
    }
    // NB: counted before the latch is set: a worker that wakes sees it.
    WAKES.get().fetch_add(1, Ordering::SeqCst);
    // A stale number (the worker just exited) only wakes some other process
    // once, which is harmless.
    // SAFETY: procno indexes ProcGlobal->allProcs (it came from a PGPROC),
    // and SetLatch may be called on any process's latch.
    unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc).procLatch);
    }
}

/// The worker's pid when it runs in this database, for pipeline.status():
/// replaces the SQL stand-in of sql/011_delivery.sql (which trigger-only
/// installs keep, and which always says NULL).
#[pg_extern(
    sql = "
    CREATE OR REPLACE FUNCTION pipeline._worker_pid() RETURNS integer
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'worker_pid_wrapper';
",
    requires = ["delivery"]
)]
fn worker_pid() -> Option<i32> {
    let (pid, database) = worker_process()?;
    // SAFETY: reads the id of the database this backend is connected to.
    let here = unsafe { pg_sys::MyDatabaseId };
    (database == here).then_some(pid)
}

/// The running worker's pid and database, whatever this backend's database.
pub fn worker_process() -> Option<(i32, pg_sys::Oid)> {
    if !SHARED_MEMORY.load(Ordering::Relaxed) {
        return None;
    }
    let procno = WORKER_PROC.get().load(Ordering::SeqCst);
    if procno == NO_WORKER {
        return None;
    }
    // SAFETY: procno indexes ProcGlobal->allProcs (it came from a PGPROC);
    // its pid and database are plain fields, read once.
    let (pid, database) = unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        (
            std::ptr::read_volatile(&raw const (*proc).pid),
            std::ptr::read_volatile(&raw const (*proc).databaseId),
        )
    };
    (pid != 0).then_some((pid, database))
}
