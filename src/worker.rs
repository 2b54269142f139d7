//! The delivery worker: drains marketing.pipeline_events to the webhooks of
//! pipeline.webhooks.
//!
//! One background worker, started by the postmaster when the library is in
//! shared_preload_libraries, works in the database named by
//! pipeline.database. It waits quietly until CREATE EXTENSION pipeline_ext
//! has run there. Each round:
//!
//!   1. claim: one short transaction claims a batch of due events whose type
//!      has an enabled endpoint (FOR UPDATE SKIP LOCKED). They become
//!      processing with a lease (pipeline.lease_time) and the transaction
//!      commits: no transaction stays open while requests are in flight.
//!   2. deliver: plain threads (src/delivery/) send the batch concurrently
//!      over keep-alive connections, within each endpoint's max_in_flight.
//!      They never call into PostgreSQL.
//!   3. record: a second transaction logs every attempt and settles every
//!      event (processed, failed with its next attempt time, or dead), and
//!      disables endpoints that answered 410 Gone.
//!
//! Rounds repeat while batches come back full; then the worker sleeps until
//! the next event is due (a retry, an expiring lease), the poll interval, or
//! a wake-up: a commit that wrote events sets its latch (src/wake.rs), so new
//! events leave within milliseconds.
//!
//! Rights: the worker connects as the bootstrap superuser (a background
//! worker can do nothing else before CREATE EXTENSION made its role), but
//! every transaction runs as pipeline.worker_role (src/transaction.rs).
//!
//! Crashes: if the worker dies mid-batch, its claimed events stay processing
//! until the worker is back (it then takes them back at once) or their lease
//! ends, and are then claimed again. Delivery is therefore
//! at least once; receivers use the webhook-id header (the event id, the same
//! on every attempt) to drop duplicates. On SIGTERM the worker starts no new
//! request, hands back the events it had not started, records what finished
//! and exits; the postmaster restarts it unless the server is shutting down.
//! Requests still in flight are abandoned rather than waited for: their
//! events stay processing until the lease ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use crate::delivery::{dispatch, HttpClient};
use crate::settings::{self, WorkerSettings};
use crate::{queue, transaction, wake};

/// Longest time between two purges of old history.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Rows purged per transaction.
const PURGE_BATCH: i32 = 1_000;
/// Pause after a failed transaction, so a persistent error does not spin.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Registers the worker; only effective from _PG_init under shared_preload_libraries.
pub fn register() {
    // SAFETY: a flag the postmaster sets before loading libraries.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        // pg_upgrade's server must see no activity but its own.
        return;
    }
    BackgroundWorkerBuilder::new("pipeline_ext delivery worker")
        .set_type("pipeline_ext worker")
        .set_library("pipeline_ext")
        .set_function("pipeline_ext_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

struct Worker {
    settings: WorkerSettings,
    client: Result<Arc<HttpClient>, String>,
    extension_found: bool,
    claims_released: bool,
    /// The last failure logged, so that a lasting one is logged once.
    last_failure: Option<String>,
    waiting_logged: bool,
    last_purge: Option<Instant>,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pipeline_ext_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    transaction::pin_session_settings();
    wake::publish_worker();

    let settings = settings::worker_settings();
    log!(
        "pipeline_ext worker {} started in database \"{database}\": {settings:?}",
        env!("CARGO_PKG_VERSION")
    );
    let mut worker = Worker {
        client: build_client(&settings),
        settings,
        extension_found: false,
        claims_released: false,
        last_failure: None,
        waiting_logged: false,
        last_purge: None,
    };

    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() || reload_requested() {
            worker.reload();
        }
        let sleep = worker.round();
        report_activity(pg_sys::BackendState::STATE_IDLE, "waiting");
        transaction::flush_statistics();
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
    }
    log!("pipeline_ext worker stopping");
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
        // NB: with a CA file the client is rebuilt on every reload, so a
        // renewed file is picked up without renaming it.
        if settings.ca_file.is_some()
            || settings.ca_file != self.settings.ca_file
            || settings.concurrency != self.settings.concurrency
            || settings.http_proxy != self.settings.http_proxy
        {
            self.client = build_client(&settings);
        }
        if settings != self.settings {
            log!("pipeline_ext worker settings reloaded: {settings:?}");
            self.settings = settings;
        }
    }

    /// Delivers everything that is due; returns how long to sleep.
    fn round(&mut self) -> Duration {
        let poll = self.settings.poll_interval;
        let settings = self.settings.clone();
        if !self.settings.enabled {
            wake::want_wakes(false);
            return poll;
        }
        if !self.extension_ready() {
            return poll;
        }
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(_) => {
                // Nothing can be sent until a reload fixes the settings.
                wake::want_wakes(false);
                return poll;
            }
        };
        let send = Arc::new(move |job: &crate::delivery::Job| client.send(job));

        loop {
            if shutdown_requested() || reload_requested() {
                return Duration::ZERO;
            }
            report_activity(pg_sys::BackendState::STATE_RUNNING, "claiming events");
            let Some((jobs, refused)) =
                self.in_transaction("claiming events", || queue::claim(&settings))
            else {
                // DROP EXTENSION, for one: look for the extension again.
                self.extension_found = false;
                return ERROR_PAUSE;
            };
            let claimed = jobs.len() + refused.len();
            if claimed == 0 {
                break;
            }
            report_activity(pg_sys::BackendState::STATE_RUNNING, "delivering events");
            let (mut attempts, unsent) = dispatch(
                jobs,
                self.settings.concurrency,
                send.clone(),
                shutdown_requested,
            );
            attempts.extend(refused);
            report_activity(pg_sys::BackendState::STATE_RUNNING, "recording deliveries");
            let recorded = self.in_transaction("recording deliveries", || {
                queue::record(&attempts)?;
                queue::release(&unsent)
            });
            if recorded.is_none() {
                // The events stay processing and are claimed again when the lease ends.
                return ERROR_PAUSE;
            }
            if claimed < self.settings.batch_size as usize {
                break;
            }
        }

        self.purge_if_due();
        // NB: wake-ups are asked for before looking for due events: an event
        // committed in between is either seen here or wakes the worker.
        let next_due = self.in_transaction("finding the next due event", || {
            wake::want_wakes(queue::any_endpoint_enabled()?);
            queue::next_due_in()
        });
        match next_due {
            Some(Some(due)) => due.min(poll),
            Some(None) => poll,
            None => ERROR_PAUSE,
        }
    }

    /// Whether CREATE EXTENSION has run here; asked until it has, then
    /// again only after a failed claim. The first time it has, the events
    /// an earlier worker held when it died are taken back.
    fn extension_ready(&mut self) -> bool {
        if !self.extension_found {
            // NB: no role switch: the worker role may not exist yet, and a
            // catalog look-up runs no code of anyone's.
            self.extension_found =
                transaction::run(None, || Ok(queue::extension_ready())).unwrap_or(false);
            if !self.extension_found && !self.waiting_logged {
                log!("pipeline_ext worker waiting for CREATE EXTENSION pipeline_ext in this database");
                self.waiting_logged = true;
            }
        }
        if self.extension_found && !self.claims_released {
            match self.in_transaction(
                "taking back the claims of an earlier worker",
                queue::release_claims,
            ) {
                Some(released) => {
                    if released > 0 {
                        log!("pipeline_ext worker took back {released} events an earlier worker held");
                    }
                    self.claims_released = true;
                }
                None => return false,
            }
        }
        self.extension_found
    }

    /// Runs `body` in a transaction of its own as the worker role. A failure
    /// is logged (once while it lasts) and gives None: the worker carries on
    /// with the next round instead of dying.
    fn in_transaction<R>(&mut self, what: &str, body: impl FnOnce() -> SpiResult<R>) -> Option<R> {
        match transaction::run(Some(&self.settings.worker_role), body) {
            Ok(value) => {
                self.last_failure = None;
                Some(value)
            }
            Err(transaction::Failed(message)) => {
                let failure = format!("{what} failed: {message}");
                if self.last_failure.as_ref() != Some(&failure) {
                    warning!("pipeline_ext worker: {failure}");
                    self.last_failure = Some(failure);
                }
                None
            }
        }
    }

    fn purge_if_due(&mut self) {
        // A tenth of the retention, between a second and a minute, apart.
        let every = (self.settings.retention / 10).clamp(Duration::from_secs(1), PURGE_EVERY);
        if self.settings.retention.is_zero()
            || self.last_purge.is_some_and(|at| at.elapsed() < every)
        {
            return;
        }
        self.last_purge = Some(Instant::now());
        report_activity(pg_sys::BackendState::STATE_RUNNING, "purging old history");
        // Small transactions keep locks short and let autovacuum keep up.
        while !shutdown_requested() {
            match self.in_transaction("purging old history", || queue::purge(PURGE_BATCH)) {
                Some(deleted) if deleted >= PURGE_BATCH as i64 => continue,
                _ => break,
            }
        }
    }
}

fn build_client(settings: &WorkerSettings) -> Result<Arc<HttpClient>, String> {
    HttpClient::new(
        settings.concurrency,
        settings.ca_file.as_deref(),
        settings.http_proxy.as_deref(),
    )
    .map(Arc::new)
    .inspect_err(|error| {
        warning!("pipeline_ext worker cannot deliver until this is fixed: {error}");
    })
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
