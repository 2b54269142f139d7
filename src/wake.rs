//! Waking a database's delivery worker when events are committed.
//!
//! The worker cannot LISTEN (background workers are refused), so a write of
//! marketing.pipeline_events fires a statement trigger that only raises a
//! flag in the writing backend. At commit, a transaction callback sees the
//! flag and sets the latch of the worker of the backend's database, found
//! through its slot in shared memory (worker_slots.rs). One wake per
//! transaction, whatever the number of events; an aborted transaction wakes
//! nobody. The worker's poll interval covers anything that slips past (a
//! prepared transaction committed elsewhere).
//!
//! The latch alone is not the message: PostgreSQL's own waits inside the
//! worker's transactions (a lock wait, say) reset it, so a commit that set it
//! then would be lost. Each wake-up also counts in the slot, and the worker
//! compares the count before every sleep (commits_since_last_look).
//!
//! The same commit callback asks the launcher for a worker when CREATE
//! EXTENSION commits (pipeline._start_worker()), and the slot tells
//! pipeline.status() whether the database's worker runs, to any role
//! (pg_stat_activity hides other users' workers).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use pgrx::prelude::*;

use crate::worker_slots::{self, Slot, NO_WORKER};

/// The worker's own slot, once it has one.
static MY_SLOT: OnceLock<&'static Slot> = OnceLock::new();

/// The worker's copy of its slot's wake count when it last looked.
static WAKES_SEEN: AtomicU64 = AtomicU64::new(0);
/// ... and the endpoint changes it has seen.
static ENDPOINT_CHANGES_SEEN: AtomicU64 = AtomicU64::new(0);

/// This backend wrote events in the current transaction.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// ... or changed an endpoint: wake the worker whatever it wants.
static WAKE_ALWAYS: AtomicBool = AtomicBool::new(false);
/// ... or ran CREATE EXTENSION: ask the launcher for a worker.
static START_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// ... or DROP or ALTER EXTENSION: the worker looks at the extension again.
static RECHECK_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Called from _PG_init in every process that loads the library.
pub fn register_commit_callback() {
    // SAFETY: registers a static #[pg_guard] callback with no argument.
    unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut()) };
}

/// The worker takes its database's slot: false when another worker holds
/// it (that one serves the database) or no slot is free. The slot is given
/// up when the process exits.
pub fn publish_worker(slot: &'static Slot) -> bool {
    let me = worker_slots::my_procno();
    if slot
        .proc
        .compare_exchange(NO_WORKER, me, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return false;
    }
    if MY_SLOT.set(slot).is_ok() {
        WAKES_SEEN.store(slot.wakes.load(Ordering::SeqCst), Ordering::Relaxed);
        ENDPOINT_CHANGES_SEEN.store(
            slot.endpoint_changes.load(Ordering::SeqCst),
            Ordering::Relaxed,
        );
        // SAFETY: a static callback with no argument, run when the process exits.
        unsafe { pg_sys::before_shmem_exit(Some(unpublish_at_exit), pg_sys::Datum::from(0)) };
    }
    true
}

/// The worker gives up its slot (it is about to look for the extension a
/// last time before it ends).
pub fn unpublish_worker() {
    if let Some(slot) = MY_SLOT.get() {
        let _ = slot.proc.compare_exchange(
            worker_slots::my_procno(),
            NO_WORKER,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn unpublish_at_exit(_code: i32, _arg: pg_sys::Datum) {
    unpublish_worker();
}

/// The worker: whether commits woke it since it last asked (and forget
/// them). Asked after the latch is reset, so a commit that comes later sets
/// the latch again.
pub fn commits_since_last_look() -> bool {
    let Some(slot) = MY_SLOT.get() else {
        return false;
    };
    let wakes = slot.wakes.load(Ordering::SeqCst);
    WAKES_SEEN.swap(wakes, Ordering::Relaxed) != wakes
}

/// The worker: whether an endpoint changed since it last asked (and
/// forget it).
pub fn endpoints_changed_since_last_look() -> bool {
    let Some(slot) = MY_SLOT.get() else {
        return false;
    };
    let changes = slot.endpoint_changes.load(Ordering::SeqCst);
    ENDPOINT_CHANGES_SEEN.swap(changes, Ordering::Relaxed) != changes
}

/// The worker, before it sleeps: whether commits woke it since it last
/// looked, whatever became of its latch meanwhile.
pub fn commits_waiting() -> bool {
    MY_SLOT
        .get()
        .is_some_and(|slot| slot.wakes.load(Ordering::SeqCst) != WAKES_SEEN.load(Ordering::Relaxed))
}

/// The worker says whether commits of new events should wake it.
pub fn want_wakes(wanted: bool) {
    if let Some(slot) = MY_SLOT.get() {
        slot.wake_wanted.store(wanted, Ordering::SeqCst);
    }
}

fn is_worker() -> bool {
    // SAFETY: reads a pointer PostgreSQL sets at process start.
    unsafe { !pg_sys::MyBgworkerEntry.is_null() }
}

/// DROP or ALTER EXTENSION: once it commits, the database's worker looks
/// at the extension again.
pub fn recheck_extension_at_commit() {
    RECHECK_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// The worker: whether a DROP or ALTER EXTENSION committed since it last
/// asked.
pub fn extension_changed() -> bool {
    MY_SLOT
        .get()
        .is_some_and(|slot| slot.recheck.swap(false, Ordering::SeqCst))
}

/// pipeline._start_worker(): ask the launcher for this database's worker
/// once the transaction commits.
pub fn start_worker_at_commit() {
    START_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// Statement trigger on marketing.pipeline_events (INSERT, UPDATE), and on
/// pipeline.webhooks and pipeline.webhook_credentials (INSERT, UPDATE,
/// DELETE): the transaction may have made events deliverable (new,
/// replayed, or waiting for an endpoint that is now there), or changed an
/// endpoint the worker holds events for (it claims them again as the
/// endpoint now is).
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
        ("marketing", "pipeline_events")
            | ("pipeline", "webhooks")
            | ("pipeline", "webhook_credentials")
    ) {
        error!(
            "pipeline._wake_worker() serves only marketing.pipeline_events and the endpoint tables, not {}.{}",
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
    -- A registered or re-enabled endpoint releases the events that waited
    -- for it; a changed or removed one takes back what the worker holds.
    CREATE TRIGGER pipeline_wake_worker
        AFTER INSERT OR UPDATE OR DELETE ON pipeline.webhooks
        FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker('always');
    CREATE TRIGGER pipeline_wake_worker
        AFTER INSERT OR UPDATE OR DELETE ON pipeline.webhook_credentials
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
            if wrote {
                wake_worker(always);
            }
            if START_AT_COMMIT.swap(false, Ordering::Relaxed) {
                ask_launcher();
            }
            if RECHECK_AT_COMMIT.swap(false, Ordering::Relaxed) {
                if let Some(slot) = worker_slots::here() {
                    slot.recheck.store(true, Ordering::SeqCst);
                    worker_slots::set_latch(slot.proc.load(Ordering::SeqCst));
                }
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            WAKE_ALWAYS.store(false, Ordering::Relaxed);
            START_AT_COMMIT.store(false, Ordering::Relaxed);
            RECHECK_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

fn wake_worker(always: bool) {
    let Some(slot) = worker_slots::here() else {
        return;
    };
    if !always && !slot.wake_wanted.load(Ordering::SeqCst) {
        return;
    }
    let procno = slot.proc.load(Ordering::SeqCst);
    if procno == NO_WORKER {
        return;
    }
    // NB: counted before the latch is set: a worker that wakes sees it.
    if always {
        slot.endpoint_changes.fetch_add(1, Ordering::SeqCst);
    }
    slot.wakes.fetch_add(1, Ordering::SeqCst);
    worker_slots::set_latch(procno);
}

fn ask_launcher() {
    // Without shared_preload_libraries there are no workers to ask for.
    let Some(launcher) = worker_slots::launcher() else {
        return;
    };
    // SAFETY: reads the id of the database this backend is connected to.
    let database = unsafe { pg_sys::MyDatabaseId };
    let Some(slot) = worker_slots::take(database) else {
        // NB: a warning, not an error: the transaction has committed.
        warning!(
            "pipeline_ext: no delivery worker for this database: {} databases have one already",
            worker_slots::MAX_DATABASES
        );
        return;
    };
    slot.requested.store(true, Ordering::SeqCst);
    worker_slots::set_latch(launcher.load(Ordering::SeqCst));
}

/// The worker's pid when it runs in this database, for pipeline.status():
/// replaces the SQL stand-in of sql/013_delivery.sql (which trigger-only
/// installs keep, and which always says NULL).
#[pg_extern(
    sql = "
    CREATE OR REPLACE FUNCTION pipeline._worker_pid() RETURNS integer
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'worker_pid_wrapper';
",
    requires = ["delivery"]
)]
fn worker_pid() -> Option<i32> {
    let (pid, database) = worker_slots::here()?.worker_process()?;
    // SAFETY: reads the id of the database this backend is connected to.
    let here = unsafe { pg_sys::MyDatabaseId };
    (database == here).then_some(pid)
}
