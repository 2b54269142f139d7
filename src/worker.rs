//! The delivery worker: drains marketing.pipeline_events to the webhooks of
//! pipeline.webhooks.
//!
//! One background worker, started by the postmaster when the library is in
//! shared_preload_libraries, works in the database named by
//! pipeline.database. It waits quietly until CREATE EXTENSION pipeline_ext
//! has run there. Then it turns, each turn doing what is due of:
//!
//!   1. record: one transaction logs the attempts that finished since the
//!      last turn, settles their events (processed, failed with the next
//!      attempt time, dead), disables endpoints that answered 410 Gone,
//!      hands back unsent events, and makes the failed events of an endpoint
//!      that answers again due at once.
//!   2. claim: one short transaction claims due events whose endpoint has
//!      room, up to pipeline.batch_size and pipeline.max_bytes_in_flight
//!      (FOR UPDATE SKIP LOCKED). They become processing with a lease and
//!      the transaction commits: none stays open while requests are out.
//!   3. deliver: the dispatcher (src/delivery/) sends them on plain threads
//!      that never call into PostgreSQL, each endpoint in a lane of its own
//!      within its max_in_flight, so a slow or hanging endpoint delays no
//!      other. An endpoint that keeps failing is probed one request at a time.
//!
//! Then it waits for whichever comes first: a request finishing (a pipe the
//! dispatcher writes), a commit of new events (src/wake.rs sets the latch),
//! the next event due (a retry, an expiring lease, a probe), or the poll
//! interval. So outcomes are recorded as they come, and new events leave
//! within milliseconds while slow requests are still out.
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
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use crate::delivery::{Attempt, Change, Dispatcher, HttpClient, Job, Sender, Verdict};
use crate::queue::{self, Claim};
use crate::settings::{self, WorkerSettings};
use crate::{transaction, wake};

/// Longest time between two purges of old history.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Rows purged per transaction.
const PURGE_BATCH: i32 = 1_000;
/// Pause after a failed transaction, so a persistent error does not spin.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Outcomes kept for another try when recording them failed; beyond this
/// the oldest are dropped (their events come back when the lease ends).
const UNRECORDED_LIMIT: usize = 100_000;
/// Outcomes are recorded together: once half a batch has come in, when
/// nothing is in flight any more, or at the latest this long after the
/// first of them came in.
const RECORD_WITHIN: Duration = Duration::from_millis(10);

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
    dispatcher: Dispatcher,
    /// Look for due events at the next turn (a commit woke the worker, an
    /// endpoint answers again, a retry was recorded).
    claim_wanted: bool,
    /// A claim was held back by a full lane or the byte budget: claim again
    /// once there is room.
    refill_wanted: bool,
    /// When the next event not claimed yet is due.
    next_due_at: Option<Instant>,
    /// Outcomes not recorded yet, and since when.
    unrecorded: Vec<Attempt>,
    unrecorded_since: Option<Instant>,
    unreleased: Vec<Job>,
    changes: Vec<(String, Change)>,
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
    if crate::database_drop::worker_database_dropped() {
        log!(
            "pipeline_ext worker: database \"{database}\" was dropped; no delivery worker until the server restarts"
        );
        // SAFETY: exit code 0 unregisters the worker: the postmaster does not
        // start it again (until the server restarts).
        unsafe { pg_sys::proc_exit(0) };
    }
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    transaction::pin_session_settings();
    wake::publish_worker();

    let settings = settings::worker_settings();
    log!(
        "pipeline_ext worker {} started in database \"{database}\": {settings:?}",
        env!("CARGO_PKG_VERSION")
    );
    let client = build_client(&settings);
    let dispatcher = match Dispatcher::new(sender_of(&client)) {
        Ok(dispatcher) => dispatcher,
        Err(error) => error!("pipeline_ext worker cannot start its senders: {error}"),
    };
    let mut worker = Worker {
        client,
        settings,
        dispatcher,
        claim_wanted: true,
        refill_wanted: false,
        next_due_at: None,
        unrecorded: Vec::new(),
        unrecorded_since: None,
        unreleased: Vec::new(),
        changes: Vec::new(),
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
        let sleep = worker.turn();
        // NB: a job just handed to the senders may not be in flight yet.
        let (in_flight, queued) = worker.dispatcher.load();
        let what = if in_flight + queued > 0 {
            "delivering events"
        } else {
            "waiting"
        };
        report_activity(pg_sys::BackendState::STATE_IDLE, what);
        transaction::flush_statistics();
        // NB: the pipe is waited on even with nothing in flight: a request
        // that finished before this point has left its byte in it.
        if wait(sleep, Some(worker.dispatcher.wake_fd())) {
            worker.claim_wanted = true;
        }
        worker.dispatcher.drain_wake();
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
        // NB: with a CA file the client is rebuilt on every reload, so a
        // renewed file is picked up without renaming it.
        if settings.ca_file.is_some()
            || settings.ca_file != self.settings.ca_file
            || settings.concurrency != self.settings.concurrency
            || settings.http_proxy != self.settings.http_proxy
            || settings.blocked_networks != self.settings.blocked_networks
        {
            self.client = build_client(&settings);
            self.dispatcher.set_sender(sender_of(&self.client));
        }
        if settings != self.settings {
            log!("pipeline_ext worker settings reloaded: {settings:?}");
            self.settings = settings;
        }
        self.claim_wanted = true;
    }

    /// Records what finished and claims what there is room for; returns
    /// how long to wait at most.
    fn turn(&mut self) -> Duration {
        let poll = self.settings.poll_interval;
        if !self.extension_ready() {
            return poll;
        }
        if !self.record_finished(false) {
            return ERROR_PAUSE;
        }
        if !self.settings.enabled || self.client.is_err() {
            // Nothing is sent until the settings change (a reload wakes it).
            wake::want_wakes(false);
            return poll;
        }
        let now = Instant::now();
        let probe_in = self.dispatcher.next_probe_in(now);
        let room = || {
            let plan = self.dispatcher.plan(self.settings.batch_size as usize, now);
            !plan.lanes_full && plan.held_bytes < self.settings.max_bytes_in_flight
        };
        let due = self.claim_wanted
            || self.next_due_at.is_some_and(|at| at <= now)
            || probe_in.is_some_and(|wait| wait.is_zero())
            || (self.refill_wanted && room());
        if due && !self.claim_due() {
            // DROP EXTENSION, for one: look for the extension again.
            self.extension_found = false;
            return ERROR_PAUSE;
        }
        self.purge_if_due();

        let now = Instant::now();
        let mut wait = poll;
        if let Some(at) = self.next_due_at {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Some(probe) = self.dispatcher.next_probe_in(now) {
            wait = wait.min(probe);
        }
        if let Some(since) = self.unrecorded_since {
            wait = wait.min(RECORD_WITHIN.saturating_sub(since.elapsed()));
        }
        if self.claim_wanted && self.dispatcher.load().0 == 0 {
            wait = Duration::ZERO;
        }
        wait
    }

    /// Claims due events while there is room, then finds when the next one
    /// is due. False when a transaction failed.
    fn claim_due(&mut self) -> bool {
        let batch = self.settings.batch_size;
        self.claim_wanted = false;
        self.refill_wanted = false;
        loop {
            if shutdown_requested() || reload_requested() {
                self.claim_wanted = true;
                return true;
            }
            let plan = self.dispatcher.plan(batch as usize, Instant::now());
            let budget = self.settings.max_bytes_in_flight as i64 - plan.held_bytes as i64;
            let mut claims: Vec<Claim> = plan
                .probes
                .iter()
                .map(|event_type| Claim {
                    limit: 1,
                    skip: Vec::new(),
                    only: Some(vec![event_type.clone()]),
                    max_bytes: budget.max(1),
                })
                .collect();
            if budget > 0 {
                claims.push(Claim {
                    limit: batch,
                    skip: plan.skip.clone(),
                    only: None,
                    max_bytes: budget,
                });
            }
            report_activity(pg_sys::BackendState::STATE_RUNNING, "claiming events");
            let settings = self.settings.clone();
            let Some(claimed) = self.in_transaction("claiming events", || {
                claims
                    .iter()
                    .map(|want| queue::claim(&settings, want))
                    .collect::<SpiResult<Vec<_>>>()
            }) else {
                self.claim_wanted = true;
                return false;
            };
            let mut full = false;
            for ((jobs, refused), want) in claimed.into_iter().zip(&claims) {
                full |= want.only.is_none() && jobs.len() + refused.len() >= want.limit as usize;
                if let (Some(only), true) = (&want.only, jobs.is_empty() && refused.is_empty()) {
                    // NB: else the probe stays due and the worker spins.
                    for event_type in only {
                        self.dispatcher
                            .probe_found_nothing(event_type, Instant::now());
                    }
                }
                self.dispatcher.submit(jobs);
                if !refused.is_empty() {
                    self.unrecorded_since.get_or_insert_with(Instant::now);
                    self.unrecorded.extend(refused);
                }
            }
            // Held back by the byte budget or by full lanes: claim again
            // once there is room.
            if budget <= 0 || plan.lanes_full {
                self.refill_wanted = true;
            }
            if !full {
                break;
            }
            if !self.record_finished(false) {
                return false;
            }
        }
        let skip = self.dispatcher.plan(batch as usize, Instant::now()).skip;
        // NB: wake-ups are asked for before looking for due events: an event
        // committed in between is either seen here or wakes the worker.
        let Some(next_due) = self.in_transaction("finding the next due event", || {
            wake::want_wakes(queue::any_endpoint_enabled()?);
            queue::next_due_in(&skip)
        }) else {
            self.claim_wanted = true;
            return false;
        };
        self.next_due_at = next_due.map(|wait| Instant::now() + wait);
        true
    }

    /// Records the outcomes that came in, when it is time to (or `now`);
    /// false when that failed (they are kept for the next turn).
    fn record_finished(&mut self, now: bool) -> bool {
        let collected = self.dispatcher.collect();
        if !collected.attempts.is_empty() {
            self.unrecorded_since.get_or_insert_with(Instant::now);
        }
        self.unrecorded.extend(collected.attempts);
        self.unreleased.extend(collected.handed_back);
        self.changes.extend(collected.changes);
        if self.unrecorded.is_empty() && self.unreleased.is_empty() && self.changes.is_empty() {
            return true;
        }
        let time = now
            || !self.unreleased.is_empty()
            || !self.changes.is_empty()
            || self.unrecorded.len() >= (self.settings.batch_size as usize / 2).max(1)
            || self.dispatcher.load().0 == 0
            || self
                .unrecorded_since
                .is_some_and(|at| at.elapsed() >= RECORD_WITHIN);
        if !time {
            return true;
        }
        report_activity(pg_sys::BackendState::STATE_RUNNING, "recording deliveries");
        let (attempts, unsent, changes) = (
            std::mem::take(&mut self.unrecorded),
            std::mem::take(&mut self.unreleased),
            std::mem::take(&mut self.changes),
        );
        self.unrecorded_since = None;
        let recorded = self.in_transaction("recording deliveries", || {
            queue::record(&attempts)?;
            queue::release(&unsent)?;
            changes
                .iter()
                .filter(|(_, change)| *change == Change::Recovered)
                .map(|(event_type, _)| {
                    Ok((event_type.clone(), queue::endpoint_recovered(event_type)?))
                })
                .collect::<SpiResult<Vec<_>>>()
        });
        for (event_type, change) in &changes {
            if let Change::Failing(failures) = change {
                log!(
                    "pipeline_ext worker: the endpoint of {event_type} failed {failures} times in a row; \
                     probing it with one request at a time (every {}s at most) until it answers",
                    crate::delivery::PROBE_LONGEST.as_secs()
                );
            }
        }
        match recorded {
            Some(recovered) => {
                // A retry or a handed-back event may be due before anything
                // the worker waits for: look again.
                if !unsent.is_empty() || attempts.iter().any(|a| a.verdict != Verdict::Delivered) {
                    self.claim_wanted = true;
                }
                for (event_type, due) in recovered {
                    log!("pipeline_ext worker: the endpoint of {event_type} answers again; {due} waiting events are due now");
                    self.claim_wanted = true;
                }
                true
            }
            None => {
                self.unrecorded = attempts;
                self.unreleased = unsent;
                // Recoveries are made due again next time (failures are logged).
                self.changes = changes
                    .into_iter()
                    .filter(|(_, change)| *change == Change::Recovered)
                    .collect();
                self.unrecorded_since = Some(Instant::now());
                if self.unrecorded.len() > UNRECORDED_LIMIT {
                    let excess = self.unrecorded.len() - UNRECORDED_LIMIT;
                    self.unrecorded.drain(..excess);
                }
                false
            }
        }
    }

    /// SIGTERM: nothing new starts; what finished is recorded, the rest of
    /// what was claimed is handed back.
    fn stop(&mut self) {
        let (attempts, unsent) = self.dispatcher.stop();
        self.unrecorded.extend(attempts);
        self.unreleased.extend(unsent);
        if self.extension_found {
            self.record_finished(true);
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

/// Sleeps until the latch is set (a commit, a signal), `fd` turns readable
/// (a request finished), or `timeout` passes. True when the latch woke it.
fn wait(timeout: Duration, fd: Option<RawFd>) -> bool {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if fd.is_some() {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_long;
    // SAFETY: the main thread; MyLatch is this process's latch, and the
    // descriptor (when given) is the dispatcher's open pipe.
    let latch_set = unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            fd.unwrap_or(-1),
            timeout_ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        // NB: the wait reports one event; a latch set at the same time as
        // the pipe turned readable is only seen here.
        let set = std::ptr::read_volatile(&raw const (*pg_sys::MyLatch).is_set) != 0;
        pg_sys::ResetLatch(pg_sys::MyLatch);
        set
    };
    pg_sys::check_for_interrupts!();
    latch_set
}

fn build_client(settings: &WorkerSettings) -> Result<Arc<HttpClient>, String> {
    crate::delivery::parse_networks(&settings.blocked_networks)
        .map_err(|e| format!("pipeline.blocked_networks: {e}"))
        .and_then(|blocked| {
            HttpClient::new(
                settings.concurrency,
                settings.ca_file.as_deref(),
                settings.http_proxy.as_deref(),
                blocked,
            )
        })
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
