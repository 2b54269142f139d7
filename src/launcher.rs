//! The launcher: one background worker, connected to no database, that
//! starts a delivery worker for each database with the extension.
//!
//! At server start it starts one for every database that takes connections
//! and is not a template (only pipeline.database, when that is set); a
//! worker that finds no extension in its database exits for good. After
//! that it starts one when a backend asks: the commit of CREATE EXTENSION
//! does (pipeline._start_worker(), run by the install script), so a new
//! database is served at once, without a server restart. A database made
//! by CREATE DATABASE from a template that has the extension runs no
//! install script: the launcher looks for new databases every 10 s and
//! starts a worker in each. DROP EXTENSION
//! ends the database's worker (worker.rs), DROP DATABASE too
//! (utility_hook.rs).
//!
//! Templates are left alone: a worker connected to template1 would make
//! every CREATE DATABASE fail. When max_worker_processes has no room left,
//! the launcher says so once and tries again every few seconds.
//!
//! Who gets a worker: every database with the extension, but at most
//! pipeline.workers_per_owner databases of one owner that is not a
//! superuser (the others are named in the log, and served once one of the
//! owner's workers ends or the setting is raised). A role that may only
//! create databases, from a template with the extension, so cannot take
//! every background worker slot of the server.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::{settings, worker_slots};

/// How long the launcher waits before trying again to start workers that
/// found no room.
const RETRY: Duration = Duration::from_secs(5);

/// How often the launcher looks for databases made since it last looked.
const NEW_DATABASES: Duration = Duration::from_secs(10);

pub fn register() {
    BackgroundWorkerBuilder::new("pipeline_ext launcher")
        .set_type("pipeline_ext launcher")
        .set_library("pipeline_ext")
        .set_function("pipeline_ext_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pipeline_ext_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads pg_database, a shared catalog.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let Some(me) = worker_slots::launcher() else {
        return;
    };
    me.store(worker_slots::my_procno(), Ordering::SeqCst);
    // SAFETY: a static callback with no argument, run when the process exits.
    unsafe { pg_sys::before_shmem_exit(Some(forget_launcher), pg_sys::Datum::from(0)) };
    log!("pipeline_ext launcher started");

    let first = scan_databases();
    let mut only_said = None;
    say_whether_only_is_served(&first, &mut only_said);
    let mut known: Vec<pg_sys::Oid> = servable(&first);
    let mut waiting = known.clone();
    let mut looked = std::time::Instant::now();
    let mut no_room_logged = false;
    // Databases refused for their owner's cap, looked at again with the
    // new databases; and those already named in the log.
    let mut refused: Vec<pg_sys::Oid> = Vec::new();
    let mut refusal_said: Vec<pg_sys::Oid> = Vec::new();
    loop {
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the main loop, outside a transaction, as a SIGHUP asks.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        for (database, slot) in worker_slots::in_use() {
            if slot.requested.swap(false, Ordering::SeqCst) && !waiting.contains(&database) {
                waiting.push(database);
            }
        }
        // NB: pg_database read once a turn, for the new databases and for
        // every start of the turn.
        let look_for_new = looked.elapsed() >= NEW_DATABASES;
        let all = if waiting.is_empty() && !look_for_new {
            Vec::new()
        } else {
            scan_databases()
        };
        if look_for_new {
            say_whether_only_is_served(&all, &mut only_said);
            let now = servable(&all);
            for database in &now {
                if !known.contains(database) && !waiting.contains(database) {
                    waiting.push(*database);
                }
            }
            known = now;
            looked = std::time::Instant::now();
            for database in refused.drain(..) {
                if !waiting.contains(&database) {
                    waiting.push(database);
                }
            }
        }
        let mut started = Vec::new();
        waiting.retain(|&database| {
            let mut turn = Turn {
                no_room_logged: &mut no_room_logged,
                refused: &mut refused,
                refusal_said: &mut refusal_said,
                started: &mut started,
            };
            !start(&all, database, &mut turn)
        });
        if waiting.is_empty() {
            no_room_logged = false;
        }
        let wait = if waiting.is_empty() {
            NEW_DATABASES.saturating_sub(looked.elapsed())
        } else {
            RETRY
        };
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break; // the postmaster died
        }
    }
    // NB: a non-zero exit lets the postmaster start the launcher again after
    // pg_terminate_backend(); during a server shutdown nothing restarts.
    // SAFETY: ends the process the way PostgreSQL expects a worker to.
    unsafe { pg_sys::proc_exit(1) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_launcher(_code: i32, _arg: pg_sys::Datum) {
    if let Some(me) = worker_slots::launcher() {
        me.store(worker_slots::NO_WORKER, Ordering::SeqCst);
    }
}

/// What a turn of the launcher keeps while it starts workers.
struct Turn<'a> {
    no_room_logged: &'a mut bool,
    /// Refused for their owner's cap (looked at again later).
    refused: &'a mut Vec<pg_sys::Oid>,
    refusal_said: &'a mut Vec<pg_sys::Oid>,
    /// Workers started in this turn (not in a slot yet).
    started: &'a mut Vec<pg_sys::Oid>,
}

/// Starts the worker of a database unless one runs there; false when there
/// was no room (to be tried again). `all` is pg_database as just read.
fn start(all: &[Database], database: pg_sys::Oid, turn: &mut Turn<'_>) -> bool {
    if let Some((_, serving)) = worker_slots::of(database).and_then(|slot| slot.worker_process()) {
        if serving == database {
            return true;
        }
    }
    // NB: looked up for every start: a request may name a template (an
    // extension created in template1), or a database dropped meanwhile.
    let Some(found) = all.iter().find(|d| d.oid == database) else {
        return true;
    };
    let only = settings::database();
    if !found.allows_connections || found.is_template || (!only.is_empty() && found.name != only) {
        return true;
    }
    worker_slots::exists(database);
    if !found.owner_is_superuser {
        let cap = settings::workers_per_owner();
        let of_owner = |d: &pg_sys::Oid| all.iter().any(|x| x.oid == *d && x.owner == found.owner);
        // NB: workers in a slot have found the extension; those started in
        // this turn may still find none, so they only defer the rest.
        let serving = worker_slots::in_use()
            .filter(|(d, slot)| *d != database && of_owner(d) && slot.worker_process().is_some())
            .count();
        let starting = turn.started.iter().filter(|d| of_owner(d)).count();
        if serving >= cap {
            if !turn.refusal_said.contains(&database) {
                warning!(
                    "pipeline_ext launcher: database \"{}\" gets no delivery worker: its owner already has {serving} \
                     databases with one (pipeline.workers_per_owner = {cap}); looked at again every {} s",
                    found.name,
                    NEW_DATABASES.as_secs()
                );
                turn.refusal_said.push(database);
            }
            turn.refused.push(database);
            return true;
        }
        if serving + starting >= cap {
            return false;
        }
    }
    turn.refusal_said.retain(|&d| d != database);
    let started = BackgroundWorkerBuilder::new("pipeline_ext delivery worker")
        .set_type("pipeline_ext worker")
        .set_library("pipeline_ext")
        .set_function("pipeline_ext_worker_main")
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load_dynamic()
        .is_ok();
    if started {
        turn.started.push(database);
    } else if !*turn.no_room_logged {
        warning!(
            "pipeline_ext launcher: no room for another background worker (max_worker_processes); trying again every {} s",
            RETRY.as_secs()
        );
        *turn.no_room_logged = true;
    }
    started
}

/// Says (once, and again when it changes) why the database that
/// pipeline.database names gets no worker: else a misspelt name would leave
/// every database without delivery and the log silent.
fn say_whether_only_is_served(all: &[Database], said: &mut Option<String>) {
    let only = settings::database();
    if only.is_empty() || all.is_empty() {
        return;
    }
    let problem = match all.iter().find(|d| d.name == only) {
        None => Some("does not exist"),
        Some(d) if d.is_template => Some("is a template (templates get no worker)"),
        Some(d) if !d.allows_connections => Some("does not allow connections"),
        Some(_) => None,
    };
    let text = problem.map(|problem| {
        format!(
            "pipeline.database names \"{only}\", which {problem}: no database is delivered for until it \
             can be served (looked for every {} s) or the setting changes (a server restart)",
            NEW_DATABASES.as_secs()
        )
    });
    if text != *said {
        match &text {
            Some(text) => warning!("pipeline_ext launcher: {text}"),
            None => log!("pipeline_ext launcher: pipeline.database \"{only}\" can be served now"),
        }
        *said = text;
    }
}

/// Every database a worker may serve: it takes connections and is not a
/// template.
fn servable(all: &[Database]) -> Vec<pg_sys::Oid> {
    all.iter()
        .filter(|d| d.allows_connections && !d.is_template)
        .map(|d| d.oid)
        .collect()
}

struct Database {
    oid: pg_sys::Oid,
    name: String,
    allows_connections: bool,
    is_template: bool,
    owner: pg_sys::Oid,
    /// Its owner is a superuser: no cap.
    owner_is_superuser: bool,
}

/// pg_database, read as autovacuum's launcher reads it: a catalog scan in a
/// transaction of its own (no SQL, since no database is connected).
fn scan_databases() -> Vec<Database> {
    let mut found = Vec::new();
    // SAFETY: a transaction of this process's own around a catalog scan of a
    // shared catalog; every tuple is read while the scan holds it, and the
    // scan and relation are closed before the transaction ends.
    unsafe {
        pg_sys::StartTransactionCommand();
        let _ = pg_sys::GetTransactionSnapshot();
        let relation = pg_sys::table_open(
            pg_sys::DatabaseRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let row = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            found.push(Database {
                oid: (*row).oid,
                name: std::ffi::CStr::from_ptr((*row).datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                allows_connections: (*row).datallowconn,
                is_template: (*row).datistemplate,
                owner: (*row).datdba,
                owner_is_superuser: pg_sys::superuser_arg((*row).datdba),
            });
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::CommitTransactionCommand();
    }
    found
}

/// Asks the launcher, at commit, for a delivery worker in this database:
/// the install script calls it, so the database is served as soon as
/// CREATE EXTENSION commits. A worker already running makes it a no-op.
#[pg_extern(
    sql = "
    CREATE FUNCTION pipeline._start_worker() RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'start_worker_wrapper';
    COMMENT ON FUNCTION pipeline._start_worker() IS
        'Asks for this database''s delivery worker when the transaction commits (extension only).';
    REVOKE ALL ON FUNCTION pipeline._start_worker() FROM PUBLIC;
    SELECT pipeline._start_worker();
",
    requires = ["wake_trigger"]
)]
fn start_worker() {
    crate::wake::start_worker_at_commit();
}
