//! The delivery worker: drains marketing.pipeline_events to the webhooks of
//! pipeline.webhooks.
//!
//! One background worker per database with the extension, started by the
//! launcher (src/launcher.rs) when the library is in
//! shared_preload_libraries. It ends for good when its database has no
//! extension (CREATE EXTENSION starts it again), waits while the installed
//! version is not its library's (ALTER EXTENSION ... UPDATE), and otherwise
//! turns: record what finished, claim what is due
//! (up to pipeline.batch_size and pipeline.max_bytes_in_flight), deliver,
//! as the engine of the delivery crate (delivery/src/engine.rs) does for
//! pipeline-relay too. Its requests go out on plain threads that never call
//! into PostgreSQL.
//!
//! Then it waits for whichever comes first: a request finishing (a pipe the
//! dispatcher writes), a commit of new events (src/wake.rs counts it and
//! sets the latch), the next event due (a retry, an expiring lease, a
//! probe), or the poll interval. So outcomes are recorded as they come, and
//! new events leave within milliseconds while slow requests are still out.
//!
//! Rights: the worker connects as the bootstrap superuser (a background
//! worker can do nothing else before CREATE EXTENSION made its role), but
//! every transaction runs as pipeline.worker_role (src/transaction.rs).
//!
//! Crashes: if the worker dies, the events it held stay processing until
//! the worker is back (it then takes them back at once) or their lease ends,
//! and are then claimed again. Delivery is therefore at least once;
//! receivers use the webhook-id header (the event id, the same on every
//! attempt) to drop duplicates. On SIGTERM the worker starts no new request,
//! hands back the events it had not started, records what finished and
//! exits; the postmaster restarts it unless the server is shutting down.
//! Requests still in flight are abandoned rather than waited for.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pipeline_delivery::queue::Limits;
use pipeline_delivery::{Attempt, Engine, Host, HttpClient, Job, Level, Sender};

use crate::queue::{self, SpiQueue};
use crate::settings::{self, WorkerSettings};
use crate::{transaction, wake, worker_slots};

struct Worker {
    /// The database's slot (worker_slots.rs).
    slot: &'static worker_slots::Slot,
    /// The database's name, for the log.
    database: String,
    /// The extension is not in the database (any more): the worker ends.
    ended: bool,
    /// It found the extension at least once.
    served: bool,
    settings: WorkerSettings,
    client: Result<Arc<HttpClient>, String>,
    engine: Engine,
    extension_found: bool,
    claims_released: bool,
    /// What the worker last said it waits for (said once per change).
    waiting_logged: Option<String>,
    /// A failure to take back claims, logged once while it lasts.
    release_failure: Option<String>,
}

/// The worker as the engine's host: PostgreSQL's log, pg_stat_activity and
/// signal flags.
struct Backend;

impl Host for Backend {
    fn interrupted(&self) -> bool {
        shutdown_requested() || reload_requested()
    }

    fn log(&self, level: Level, message: &str) {
        match level {
            Level::Info => log!("pipeline_ext worker: {message}"),
            Level::Warning => warning!("pipeline_ext worker: {message}"),
        }
    }

    fn activity(&self, what: &str) {
        report_activity(pg_sys::BackendState::STATE_RUNNING, what);
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pipeline_ext_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // The launcher passes the database's OID.
    let database_oid = pg_sys::Oid::from(arg.value() as u32);
    if worker_slots::was_dropped(database_oid) {
        log!("pipeline_ext worker: its database was dropped; this worker ends");
        // SAFETY: exit code 0 unregisters the worker: it is not started
        // again; connecting to the dropped database would fail.
        unsafe { pg_sys::proc_exit(0) };
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database_oid), None);
    transaction::pin_session_settings();
    // NB: a database without the extension gets no slot: the launcher starts
    // a worker in every database at server start (and in every new one),
    // and only those with the extension keep one. A CREATE EXTENSION that
    // commits after this look takes a slot and asks the launcher itself.
    let slot = match worker_slots::of(database_oid) {
        Some(slot) => slot,
        None => {
            if transaction::run(None, || Ok(queue::installed_version()))
                .ok()
                .flatten()
                .is_none()
            {
                debug1!("pipeline_ext worker: no extension in this database; this worker ends");
                // SAFETY: as above.
                unsafe { pg_sys::proc_exit(0) };
            }
            let Some(slot) = worker_slots::take(database_oid) else {
                log!(
                    "pipeline_ext worker: no slot for database {}: at most {} databases have a worker",
                    database_oid.to_u32(),
                    worker_slots::MAX_DATABASES
                );
                // SAFETY: as above.
                unsafe { pg_sys::proc_exit(0) };
            };
            slot
        }
    };
    if !wake::publish_worker(slot) {
        // Another worker serves this database.
        // SAFETY: as above.
        unsafe { pg_sys::proc_exit(0) };
    }
    let database = transaction::run(None, || Ok(queue::database_name())).unwrap_or_default();

    let settings = settings::worker_settings();
    let client = build_client(&settings);
    let engine = match Engine::new(limits_of(&settings), sender_of(&client)) {
        Ok(engine) => engine,
        Err(error) => error!("pipeline_ext worker cannot start its senders: {error}"),
    };
    let sleeper = Sleeper::new(engine.dispatcher().wake_fd());
    let mut worker = Worker {
        slot,
        database: database.clone(),
        ended: false,
        served: false,
        client,
        settings,
        engine,
        extension_found: false,
        claims_released: false,
        waiting_logged: None,
        release_failure: None,
    };

    while !shutdown_requested() {
        if worker.ended {
            // NB: nothing of its own is left to record: the tables went
            // with the extension (or were never there).
            if worker.served {
                log!("pipeline_ext worker: the extension was dropped from database \"{database}\"; this worker ends");
            } else {
                debug1!("pipeline_ext worker: no extension in database \"{database}\"; this worker ends");
            }
            // SAFETY: exit code 0 unregisters the worker; CREATE EXTENSION
            // asks the launcher for a new one.
            unsafe { pg_sys::proc_exit(0) };
        }
        if BackgroundWorker::sighup_received() || reload_requested() {
            worker.reload();
        }
        if wake::commits_since_last_look() {
            worker.engine.wake();
        }
        if wake::endpoints_changed_since_last_look() {
            worker.engine.endpoints_changed();
        }
        let mut sleep = worker.turn();
        // NB: a job just handed to the senders may not be in flight yet.
        let (in_flight, queued) = worker.engine.dispatcher().load();
        let what = if in_flight + queued > 0 {
            "delivering events"
        } else {
            "waiting"
        };
        report_activity(pg_sys::BackendState::STATE_IDLE, what);
        transaction::flush_statistics();
        // NB: a commit during the turn may have set the latch and had it
        // reset by a wait of PostgreSQL's own (a lock wait): the count says.
        if wake::commits_waiting() {
            sleep = Duration::ZERO;
        }
        // NB: the pipe is waited on even with nothing in flight: a request
        // that finished before this point has left its byte in it.
        sleeper.wait(sleep);
        worker.engine.dispatcher().drain_wake();
    }
    log!("pipeline_ext worker stopping");
    worker.stop();
    // NB: a non-zero exit lets the postmaster start the worker again after
    // pg_terminate_backend(); during a server shutdown nothing restarts.
    // SAFETY: ends the process the way PostgreSQL expects a worker to.
    unsafe { pg_sys::proc_exit(1) };
}

impl Worker {
    fn reload(&mut self) {
        // SAFETY: the main thread, outside a transaction, as a SIGHUP asks.
        unsafe {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
        let settings = settings::worker_settings();
        // NB: with a CA file or a proxy credentials file the client is
        // rebuilt on every reload, so a renewed file is picked up without
        // renaming it.
        if settings.ca_file.is_some()
            || settings.http_proxy_auth_file.is_some()
            || settings.ca_file != self.settings.ca_file
            || settings.concurrency != self.settings.concurrency
            || settings.http_proxy != self.settings.http_proxy
            || settings.blocked_networks != self.settings.blocked_networks
        {
            self.client = build_client(&settings);
            self.engine.dispatcher().set_sender(sender_of(&self.client));
        }
        if settings != self.settings {
            log!("pipeline_ext worker settings reloaded: {settings:?}");
            self.settings = settings;
        }
        self.engine.set_limits(limits_of(&self.settings));
        // Events may be deliverable now (enabled again, a client that works).
        self.engine.poll();
    }

    /// Records what finished and claims what there is room for; returns
    /// how long to wait at most.
    fn turn(&mut self) -> Duration {
        if wake::extension_changed() {
            self.extension_found = false;
        }
        if !self.extension_ready() {
            return if self.ended {
                Duration::ZERO
            } else {
                self.settings.poll_interval
            };
        }
        let deliver = self.settings.enabled && self.client.is_ok();
        if !deliver {
            // Nothing is sent until the settings change (a reload wakes it).
            wake::want_wakes(false);
        }
        let mut queue = SpiQueue::of(&self.settings);
        let wait = self.engine.turn(&mut queue, &Backend, deliver);
        if self.engine.failing() {
            // DROP EXTENSION, for one: look for the extension again.
            self.extension_found = false;
        }
        wait
    }

    /// SIGTERM: nothing new starts; what finished is recorded, the rest of
    /// what was claimed is handed back (requests in flight are abandoned).
    fn stop(&mut self) {
        let mut queue = SpiQueue::of(&self.settings);
        if self.extension_found {
            self.engine.stop(&mut queue, &Backend, Duration::ZERO);
        }
    }

    /// Whether CREATE EXTENSION has run here; asked until it has, then
    /// again only after a failed transaction. The first time it has, the
    /// events an earlier worker held when it died are taken back.
    fn extension_ready(&mut self) -> bool {
        if !self.extension_found {
            // NB: no role switch: the worker role may not exist yet, and a
            // catalog look-up runs no code of anyone's.
            // NB: and only the version this library was built for: the SQL
            // of another one (before ALTER EXTENSION ... UPDATE after a new
            // package) has other functions.
            let mut installed =
                transaction::run(None, || Ok(queue::installed_version())).unwrap_or(None);
            if installed.is_none() {
                // NB: the slot is given up before a last look: a CREATE
                // EXTENSION that committed meanwhile asked the launcher,
                // which saw this worker in the slot and started no other.
                wake::unpublish_worker();
                installed =
                    transaction::run(None, || Ok(queue::installed_version())).unwrap_or(None);
                if installed.is_none() || !wake::publish_worker(self.slot) {
                    self.ended = true;
                    return false;
                }
            }
            self.extension_found = installed.as_deref() == Some(env!("CARGO_PKG_VERSION"));
            if let (false, Some(version)) = (self.extension_found, installed) {
                let waiting = format!(
                    "ALTER EXTENSION pipeline_ext UPDATE (version {version} is installed, the library is {})",
                    env!("CARGO_PKG_VERSION")
                );
                if self.waiting_logged.as_ref() != Some(&waiting) {
                    log!("pipeline_ext worker waiting for {waiting} in this database");
                    self.waiting_logged = Some(waiting);
                }
            }
        }
        if self.extension_found && !self.served {
            // NB: said once the extension is found: the launcher starts a
            // worker in every database at server start, and those without
            // the extension end at once.
            log!(
                "pipeline_ext worker {} started in database \"{}\": {:?}",
                env!("CARGO_PKG_VERSION"),
                self.database,
                self.settings
            );
            self.served = true;
        }
        if self.extension_found && !self.claims_released {
            match transaction::run(Some(&self.settings.worker_role), queue::release_claims) {
                Ok(released) => {
                    if released > 0 {
                        log!("pipeline_ext worker took back {released} events an earlier worker held");
                    }
                    self.claims_released = true;
                    self.release_failure = None;
                }
                Err(transaction::Failed(message)) => {
                    if self.release_failure.as_ref() != Some(&message) {
                        warning!("pipeline_ext worker: taking back the claims of an earlier worker failed: {message}");
                        self.release_failure = Some(message);
                    }
                    return false;
                }
            }
        }
        self.extension_found
    }
}

/// The engine's limits from the worker's settings.
fn limits_of(settings: &WorkerSettings) -> Limits {
    Limits {
        batch_size: settings.batch_size,
        concurrency: settings.concurrency,
        http_timeout: settings.http_timeout,
        lease: settings.lease,
        max_event_bytes: settings.max_event_bytes,
        max_bytes_in_flight: settings.max_bytes_in_flight,
        poll_interval: settings.poll_interval,
        retention: settings.retention,
    }
}

/// What the dispatcher's threads send with: the client, or (while the
/// settings do not let one be built) a refusal that nothing reaches, since
/// the worker claims nothing then.
fn sender_of(client: &Result<Arc<HttpClient>, String>) -> Sender {
    match client {
        Ok(client) => {
            let client = client.clone();
            Arc::new(move |job: &Job| client.send(job))
        }
        Err(error) => {
            let error = error.clone();
            Arc::new(move |job: &Job| Attempt {
                error: Some(error.clone()),
                ..Attempt::new(job)
            })
        }
    }
}

/// What the worker sleeps on: its latch (a commit, a signal), the
/// dispatcher's pipe (a request finished) and the postmaster's death. Made
/// once: a WaitLatchOrSocket per sleep made and closed an epoll set each
/// time (with the sub-millisecond busy loop that rounding down caused, a
/// fifth of the worker's CPU time at 10 events a second).
struct Sleeper(*mut pg_sys::WaitEventSet);

impl Sleeper {
    fn new(fd: RawFd) -> Sleeper {
        // SAFETY: the main thread, after the worker connected; the set lives
        // in TopMemoryContext for the life of the process (the worker never
        // frees it), MyLatch is this process's latch, and `fd` is the
        // dispatcher's pipe, open as long as the engine (the worker's life).
        unsafe {
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            Sleeper(set)
        }
    }

    /// Sleeps until the latch is set, the pipe turns readable, or `timeout`
    /// passes (rounded up to the millisecond: rounded down, a wait of less
    /// than one became a busy loop); then resets the latch.
    fn wait(&self, timeout: Duration) {
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_long;
        let mut occurred = pg_sys::WaitEvent::default();
        // SAFETY: the main thread; the set made in new(), and room for the
        // one event asked for.
        unsafe {
            pg_sys::WaitEventSetWait(
                self.0,
                timeout_ms,
                &mut occurred,
                1,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
}

fn build_client(settings: &WorkerSettings) -> Result<Arc<HttpClient>, String> {
    proxy_url(settings)
        .and_then(|proxy| {
            let blocked = pipeline_delivery::parse_networks(&settings.blocked_networks)
                .map_err(|e| format!("pipeline.blocked_networks: {e}"))?;
            HttpClient::new(settings.ca_file.as_deref(), proxy.as_deref(), blocked)
                .map_err(|e| e.named("pipeline.ca_file", "pipeline.http_proxy"))
        })
        .map(Arc::new)
        .inspect_err(|error| {
            warning!("pipeline_ext worker cannot deliver until this is fixed: {error}");
        })
}

/// The proxy URL with the credentials of pipeline.http_proxy_auth_file put
/// in; errors name the setting and the file, never what it holds.
fn proxy_url(settings: &WorkerSettings) -> Result<Option<String>, String> {
    let (Some(proxy), Some(path)) = (&settings.http_proxy, &settings.http_proxy_auth_file) else {
        if settings.http_proxy_auth_file.is_some() {
            warning!("pipeline_ext worker: pipeline.http_proxy_auth_file is set but pipeline.http_proxy is not: no proxy is used");
        }
        return Ok(settings.http_proxy.clone());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("pipeline.http_proxy_auth_file: {path}: {e}"))?;
    let credentials = text.lines().next().unwrap_or("").trim();
    if !credentials.contains(':') || credentials.contains(['@', '/']) {
        return Err(format!(
            "pipeline.http_proxy_auth_file: the first line of {path} must be user:password, \
             neither holding @ or /"
        ));
    }
    Ok(Some(pipeline_delivery::proxy_with_credentials(
        proxy,
        credentials,
    )))
}

/// SIGTERM arrived (safe to ask from any thread: it reads one flag).
fn shutdown_requested() -> bool {
    // SAFETY: a volatile read of a sig_atomic_t flag set by a signal handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// SIGHUP arrived and the settings have not been reread yet.
fn reload_requested() -> bool {
    // SAFETY: a volatile read of a sig_atomic_t flag set by a signal handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ConfigReloadPending) != 0 }
}

fn report_activity(state: pg_sys::BackendState::Type, what: &str) {
    let text = std::ffi::CString::new(what).unwrap_or_default();
    // SAFETY: the main thread; PostgreSQL copies the NUL-terminated text.
    unsafe { pg_sys::pgstat_report_activity(state, text.as_ptr()) };
}
