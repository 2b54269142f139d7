//! One slot of shared memory per database with a delivery worker.
//!
//! A slot says which database it serves and which process (PGPROC number)
//! delivers there; writers of that database wake that process at commit
//! (wake.rs), pipeline.status() reads its pid, DROP DATABASE stops it
//! (utility_hook.rs), and the launcher starts a worker for a database when
//! a backend asks (launcher.rs). Everything in a slot is atomic: the commit
//! path reads it without a lock.
//!
//! A slot is taken by the first worker of a database that has the
//! extension (a worker that finds none ends without one, so databases
//! without the extension use no slot), or by the commit of CREATE
//! EXTENSION, and kept: the database's wake-up count and flags outlive its
//! workers. It is given back when the database is dropped; the database is
//! then remembered as dropped for a while, so that its worker, started
//! again after DROP DATABASE stopped it, ends for good instead of failing
//! to connect every 5 s.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

/// Databases that can have a worker at once (each also needs one of
/// max_worker_processes).
pub const MAX_DATABASES: usize = 64;

/// No process in a slot.
pub const NO_WORKER: u32 = u32::MAX;

pub struct Slot {
    /// The database's OID; 0 while the slot is free.
    pub database: AtomicU32,
    /// PGPROC number of the database's worker, or NO_WORKER.
    pub proc: AtomicU32,
    /// Whether the worker would act on new events (it is enabled and some
    /// endpoint is): when not, writers skip the wake-up.
    pub wake_wanted: AtomicBool,
    /// Commits that woke the worker, ever: it claims when this changed.
    pub wakes: AtomicU64,
    /// Of them, those that changed an endpoint: it takes back what it
    /// holds unsent when this changed.
    pub endpoint_changes: AtomicU64,
    /// A backend asked for a worker here (CREATE EXTENSION committed).
    pub requested: AtomicBool,
    /// DROP or ALTER EXTENSION committed here: the worker looks at the
    /// extension again.
    pub recheck: AtomicBool,
}

/// Databases dropped lately, remembered (the oldest forgotten first) until
/// their worker has seen it.
const DROPPED_REMEMBERED: usize = 64;

pub struct Slots {
    pub slots: [Slot; MAX_DATABASES],
    /// PGPROC number of the launcher, or NO_WORKER.
    pub launcher: AtomicU32,
    /// OIDs of databases dropped lately (0: none), a ring.
    dropped: [AtomicU32; DROPPED_REMEMBERED],
    next_dropped: AtomicU32,
}

// SAFETY: only atomics, no pointers: valid in every process at the same
// address, and initialised before any process reads it.
unsafe impl PGRXSharedMemory for Slots {}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            slots: std::array::from_fn(|_| Slot {
                database: AtomicU32::new(0),
                proc: AtomicU32::new(NO_WORKER),
                wake_wanted: AtomicBool::new(true),
                wakes: AtomicU64::new(0),
                endpoint_changes: AtomicU64::new(0),
                requested: AtomicBool::new(false),
                recheck: AtomicBool::new(false),
            }),
            launcher: AtomicU32::new(NO_WORKER),
            dropped: std::array::from_fn(|_| AtomicU32::new(0)),
            next_dropped: AtomicU32::new(0),
        }
    }
}

// SAFETY: the name is unique to this library; pg_shmem_init! in _PG_init
// allocates the memory before any process uses it.
static SLOTS: PgAtomic<Slots> = unsafe { PgAtomic::new(c"pipeline_ext_worker_slots") };

/// Set in _PG_init under shared_preload_libraries: only then does the
/// shared memory above exist.
static SHARED_MEMORY: AtomicBool = AtomicBool::new(false);

/// Called from _PG_init while shared_preload_libraries are loaded.
pub fn init_shared_memory() {
    pg_shmem_init!(SLOTS);
    SHARED_MEMORY.store(true, Ordering::Relaxed);
}

fn all() -> Option<&'static Slots> {
    SHARED_MEMORY.load(Ordering::Relaxed).then(|| SLOTS.get())
}

/// The slot of a database, if it has one.
pub fn of(database: pg_sys::Oid) -> Option<&'static Slot> {
    let wanted = database.to_u32();
    all()?
        .slots
        .iter()
        .find(|slot| slot.database.load(Ordering::SeqCst) == wanted)
}

/// The slot of this backend's database.
pub fn here() -> Option<&'static Slot> {
    // SAFETY: reads the id of the database this backend is connected to.
    of(unsafe { pg_sys::MyDatabaseId })
}

/// The slot of a database, taken if it has none (None when all are taken).
pub fn take(database: pg_sys::Oid) -> Option<&'static Slot> {
    if let Some(slot) = of(database) {
        return Some(slot);
    }
    let wanted = database.to_u32();
    for slot in &all()?.slots {
        match slot
            .database
            .compare_exchange(0, wanted, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return Some(slot),
            // Another process took a free slot for the same database.
            Err(other) if other == wanted => return Some(slot),
            Err(_) => {}
        }
    }
    None
}

impl Slot {
    /// The worker's pid and database, read from its PGPROC.
    pub fn worker_process(&self) -> Option<(i32, pg_sys::Oid)> {
        proc_pid(self.proc.load(Ordering::SeqCst))
    }

    /// Gives the slot back (its database was dropped).
    pub fn free(&self) {
        self.proc.store(NO_WORKER, Ordering::SeqCst);
        self.requested.store(false, Ordering::SeqCst);
        self.wake_wanted.store(true, Ordering::SeqCst);
        self.database.store(0, Ordering::SeqCst);
    }
}

/// DROP DATABASE succeeded: the database's slot is free again, and its
/// worker, if it is started again, ends.
pub fn dropped(database: pg_sys::Oid) {
    let Some(all) = all() else {
        return;
    };
    let at = all.next_dropped.fetch_add(1, Ordering::SeqCst) as usize % DROPPED_REMEMBERED;
    all.dropped[at].store(database.to_u32(), Ordering::SeqCst);
    if let Some(slot) = of(database) {
        slot.free();
    }
}

/// Whether a database was dropped lately (its worker must not connect).
pub fn was_dropped(database: pg_sys::Oid) -> bool {
    let wanted = database.to_u32();
    all().is_some_and(|all| {
        all.dropped
            .iter()
            .any(|d| d.load(Ordering::SeqCst) == wanted)
    })
}

/// The database exists (the launcher read it in pg_database): an OID
/// used again is not taken for the dropped database's.
pub fn exists(database: pg_sys::Oid) {
    let wanted = database.to_u32();
    if let Some(all) = all() {
        for dropped in &all.dropped {
            let _ = dropped.compare_exchange(wanted, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

/// Every slot in use, as (database, slot).
pub fn in_use() -> impl Iterator<Item = (pg_sys::Oid, &'static Slot)> {
    all().into_iter().flat_map(|slots| {
        slots.slots.iter().filter_map(|slot| {
            let database = slot.database.load(Ordering::SeqCst);
            (database != 0).then(|| (pg_sys::Oid::from(database), slot))
        })
    })
}

/// The launcher's PGPROC number, where backends find its latch.
pub fn launcher() -> Option<&'static AtomicU32> {
    all().map(|slots| &slots.launcher)
}

/// Sets the latch of the process with this PGPROC number (NO_WORKER: none).
/// A stale number (the process just exited) only wakes some other process
/// once, which is harmless.
pub fn set_latch(procno: u32) {
    if procno == NO_WORKER {
        return;
    }
    // SAFETY: procno indexes ProcGlobal->allProcs (it came from a PGPROC),
    // and SetLatch may be called on any process's latch.
    unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc).procLatch);
    }
}

/// This process's PGPROC number.
pub fn my_procno() -> u32 {
    // SAFETY: MyProc is this process's PGPROC once it is connected.
    unsafe { (*pg_sys::MyProc).pgprocno as u32 }
}

fn proc_pid(procno: u32) -> Option<(i32, pg_sys::Oid)> {
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
