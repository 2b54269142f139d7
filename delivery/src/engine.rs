//! A deliverer's turn, the same for the extension's worker and for
//! pipeline-relay. Each turn does what is due of, in one transaction:
//!
//!   1. record: log the attempts that finished since the last turn, settle
//!      their events (processed, failed with the next attempt time, dead),
//!      disable endpoints that answered 410 Gone, hand back unsent events,
//!      and make the failed events of an endpoint that answers again due at
//!      once. Outcomes are stored together, once half of what may wait
//!      unstored came in or RECORD_WITHIN after the first of them (a claim
//!      that comes then carries them); no new request starts while
//!      `unstored_cap` answers wait to be stored, so a crash repeats at most
//!      that many deliveries besides the requests in flight.
//!   2. claim: claim due events whose endpoint has room, up to the batch
//!      size and the bytes allowed in flight, and find when the next event
//!      not claimed is due. They become processing with a lease and the
//!      transaction commits: none stays open while requests are out. Claims
//!      start at most every CLAIM_GAP, so the commits that come meanwhile
//!      go in one claim. A transaction that only claims does not wait for
//!      its commit to reach the disk (see [`Exchange::durable`]).
//!   3. deliver: the dispatcher sends them, each endpoint in a lane of its
//!      own, so a slow or hanging endpoint delays no other; an endpoint that
//!      keeps failing is probed one request at a time.
//!
//! At steady traffic a turn is therefore one commit per event at 100
//! events a second and one per CLAIM_GAP above that, none of which waits
//! for the disk, and one flushed commit per RECORD_WITHIN or per half of
//! `unstored_cap` answers for what came back.
//!
//! The turn returns how long its caller may wait: until a request finishes
//! (the dispatcher's wake_fd), new events are announced (the worker's latch,
//! the relay's LISTEN), the next event is due, or the poll interval passes.
//! How the caller waits, and how it talks to PostgreSQL, is its own: see the
//! [`Queue`] and [`Host`] traits.

use std::time::{Duration, Instant};

use crate::health::PROBE_LONGEST;
use crate::queue::{jobs_of, Circuit, Claim, Exchange, Exchanged, Limits, Queue};
use crate::{Attempt, Change, Dispatcher, Job, Sender, Verdict};

/// Longest time between two purges of old history.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Rows purged per transaction.
const PURGE_BATCH: i32 = 1_000;
/// Pause after a failed transaction, so a persistent error does not spin.
pub const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Outcomes kept for another try when recording them failed; beyond this
/// the oldest are dropped (their events come back when the lease ends).
const UNRECORDED_LIMIT: usize = 100_000;
/// Outcomes are recorded together: once half of unstored_cap has come in,
/// or this long after the first of them came in. (At 100 events a second,
/// one recording stores about twenty; at 1000, one stores 32 every 32 ms.
/// Storing each with the claim after it cost a recording per event.)
const RECORD_WITHIN: Duration = Duration::from_millis(200);
/// Claims start at most this often: the commits that come meanwhile are
/// claimed together by the next one. At steady rates above a few hundred
/// events a second, that is what keeps the cost per event low.
const CLAIM_GAP: Duration = Duration::from_millis(2);
/// A claim made only because new events were committed does not look for
/// the next due event (nothing it knows of changed: retries, hand-backs,
/// circuits and endpoints each ask for a look), unless the last look is
/// this old: other deliverers' leases are learnt at least this often while
/// events come. (The look was a third of such a claim's SQL.)
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Answers that may wait to be stored before no new request starts: four
/// times the requests in flight an endpoint has by default, at least 64
/// (more while several endpoints are busy: the requests they may have in
/// flight together).
pub fn unstored_cap(limits: &Limits) -> usize {
    (limits.concurrency * 4).max(64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
}

/// What the engine needs of the program it runs in.
pub trait Host {
    /// Whether to stop claiming and return (a shutdown or a reload waits).
    fn interrupted(&self) -> bool;
    /// A line for the program's log.
    fn log(&self, level: Level, message: &str);
    /// What the deliverer is doing now (the worker shows it in
    /// pg_stat_activity).
    fn activity(&self, _what: &str) {}
    /// Attempts just recorded (for metrics).
    fn recorded(&self, _attempts: &[Attempt]) {}
}

pub struct Engine {
    limits: Limits,
    dispatcher: Dispatcher,
    /// Look for due events at the next turn (new events were announced, an
    /// endpoint answers again, a retry was recorded).
    claim_wanted: bool,
    /// The next claim also looks for the next due event: something other
    /// than new events asked for it (see LOOK_EVERY).
    look_wanted: bool,
    /// When the last look was, and which types it left out.
    last_look: Option<(Instant, Vec<String>)>,
    /// An endpoint changed (disabled, removed, moved, new credentials): the
    /// jobs held waiting go back to the queue before anything more is sent.
    endpoints_changed: bool,
    /// A claim was held back by a full lane or the byte budget: claim again
    /// once there is room.
    refill_wanted: bool,
    /// When the next event not claimed yet is due.
    next_due_at: Option<Instant>,
    /// Outcomes not recorded yet, and since when.
    unrecorded: Vec<Attempt>,
    unrecorded_since: Option<Instant>,
    /// Of them, how many came from the dispatcher (it is told once they
    /// are stored).
    unacknowledged: usize,
    unreleased: Vec<Job>,
    changes: Vec<(String, Change)>,
    /// The last failure logged, so that a lasting one is logged once.
    last_failure: Option<String>,
    last_purge: Option<Instant>,
    /// When the last claim started (see CLAIM_GAP).
    last_claim_at: Option<Instant>,
}

impl Engine {
    pub fn new(limits: Limits, sender: Sender) -> std::io::Result<Engine> {
        let dispatcher = Dispatcher::new(sender)?;
        dispatcher.set_unacknowledged_cap(unstored_cap(&limits));
        Ok(Engine {
            limits,
            dispatcher,
            claim_wanted: true,
            look_wanted: true,
            last_look: None,
            endpoints_changed: false,
            refill_wanted: false,
            next_due_at: None,
            unrecorded: Vec::new(),
            unrecorded_since: None,
            unacknowledged: 0,
            unreleased: Vec::new(),
            changes: Vec::new(),
            last_failure: None,
            last_purge: None,
            last_claim_at: None,
        })
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.dispatcher
            .set_unacknowledged_cap(unstored_cap(&limits));
        self.limits = limits;
        self.poll();
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Whether the last transaction failed (and no later one succeeded).
    pub fn failing(&self) -> bool {
        self.last_failure.is_some()
    }

    /// The failure that made the last transaction fail, while it lasts.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Whether the next turn claims (asked to, or to refill lanes).
    pub fn wants_claim(&self) -> bool {
        self.claim_wanted || self.refill_wanted
    }

    /// Whether events are due to be claimed by `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.wants_claim() || self.next_due_at.is_some_and(|at| at <= now)
    }

    /// How long until the next event known to the engine is due.
    pub fn next_due_in(&self, now: Instant) -> Option<Duration> {
        self.next_due_at.map(|at| at.saturating_duration_since(now))
    }

    /// New events were committed: claim them at the next turn.
    pub fn wake(&mut self) {
        self.claim_wanted = true;
    }

    /// Events may have become due otherwise (a poll, a reconnection, new
    /// settings): claim, and look for the next due event, at the next turn.
    pub fn poll(&mut self) {
        self.claim_wanted = true;
        self.look_wanted = true;
    }

    /// An endpoint was changed (the worker's wake-up, the relay's
    /// pipeline_wake): the jobs held waiting go back to the queue unsent,
    /// and are claimed again as the endpoints now are (none for one that
    /// was disabled or removed; a new URL or new credentials else).
    pub fn endpoints_changed(&mut self) {
        self.endpoints_changed = true;
        self.poll();
    }

    /// Outcomes and hand-backs not recorded yet.
    pub fn unrecorded(&self) -> usize {
        self.unrecorded.len() + self.unreleased.len()
    }

    /// Whether anything is claimed and not recorded yet: requests out or
    /// waiting, outcomes or hand-backs not stored.
    pub fn busy(&self) -> bool {
        let (in_flight, waiting) = self.dispatcher.load();
        in_flight + waiting + self.dispatcher.uncollected() + self.unrecorded() > 0
    }

    /// Records what finished and, when `deliver`, claims what there is room
    /// for; returns how long to wait at most.
    pub fn turn(&mut self, queue: &mut impl Queue, host: &impl Host, deliver: bool) -> Duration {
        let poll = self.limits.poll_interval;
        if std::mem::take(&mut self.endpoints_changed) {
            self.dispatcher.hand_back_waiting();
        }
        self.collect(host);
        if !deliver {
            if self.record_due() && !self.record(queue, host) {
                return ERROR_PAUSE;
            }
            // NB: what came back while delivery stopped is still recorded.
            self.quiet_finishes();
            return match self.unrecorded_since {
                Some(since) => poll.min(RECORD_WITHIN.saturating_sub(since.elapsed())),
                None => poll,
            };
        }
        // NB: before the claim, which it may ask for (see purge_if_due).
        self.purge_if_due(queue, host);
        let now = Instant::now();
        let probe_in = self.dispatcher.next_probe_in(now);
        let room = || {
            let plan = self.dispatcher.plan(self.limits.batch_size as usize, now);
            !plan.lanes_full && plan.held_bytes < self.limits.max_bytes_in_flight
        };
        let due = self.claim_wanted
            || self.next_due_at.is_some_and(|at| at <= now)
            || probe_in.is_some_and(|wait| wait.is_zero())
            || (self.refill_wanted && room());
        // NB: commits that come within CLAIM_GAP of a claim are claimed
        // together, by the next one.
        let deferred = due && !self.claim_gap_left().is_zero();
        if due && !deferred {
            // What came back is recorded by the same transaction, when due.
            if !self.claim_due(queue, host) {
                return ERROR_PAUSE;
            }
        } else if self.record_due() && !self.record(queue, host) {
            return ERROR_PAUSE;
        }

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
        if deferred || self.claim_wanted {
            wait = wait.min(self.claim_gap_left());
        }
        // NB: answers that came in during this turn are stored in time.
        if self.dispatcher.uncollected() > 0 {
            wait = wait.min(RECORD_WITHIN);
        }
        self.quiet_finishes();
        wait
    }

    /// While outcomes wait to be stored (and no claim waits for room), the
    /// deliverer comes back for the next ones within RECORD_WITHIN anyway:
    /// finishes need not wake it (one wake-up per event fewer at steady
    /// rates). The dispatcher still wakes it for circuits, hand-backs and
    /// half the cap of unstored answers.
    fn quiet_finishes(&self) {
        self.dispatcher
            .set_quiet_finishes(self.unrecorded_since.is_some() && !self.refill_wanted);
    }

    /// How long until the next claim may start (see CLAIM_GAP).
    fn claim_gap_left(&self) -> Duration {
        self.last_claim_at
            .map_or(Duration::ZERO, |at| CLAIM_GAP.saturating_sub(at.elapsed()))
    }

    /// Claims due events while there is room, recording what came back in
    /// the same transactions, then knows when the next one is due. False
    /// when a transaction failed.
    fn claim_due(&mut self, queue: &mut impl Queue, host: &impl Host) -> bool {
        let batch = self.limits.batch_size;
        let now = Instant::now();
        let mut look = std::mem::take(&mut self.look_wanted)
            || self.refill_wanted
            || self.next_due_at.is_some_and(|at| at <= now)
            || self
                .last_look
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= LOOK_EVERY);
        self.claim_wanted = false;
        self.refill_wanted = false;
        self.last_claim_at = Some(now);
        let mut asked_skip: Vec<String>;
        let mut next_due;
        loop {
            if host.interrupted() {
                self.claim_wanted = true;
                self.look_wanted |= look;
                return true;
            }
            let plan = self.dispatcher.plan(batch as usize, Instant::now());
            // NB: probes, a full lane or the byte budget, and a lane that
            // filled or emptied since the last look change what is due.
            look |= !plan.probes.is_empty()
                || plan.lanes_full
                || self
                    .last_look
                    .as_ref()
                    .is_none_or(|(_, skip)| *skip != plan.skip);
            let budget = self.limits.max_bytes_in_flight as i64 - plan.held_bytes as i64;
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
            self.collect(host);
            host.activity("claiming events");
            let claimed_at = Instant::now();
            let Some(exchanged) = self.exchange_with_outcomes(
                queue,
                host,
                "claiming events",
                self.record_due(),
                &claims,
                look.then_some(plan.skip.as_slice()),
            ) else {
                self.poll();
                return false;
            };
            let mut full = false;
            for (rows, want) in exchanged.claimed.into_iter().zip(&claims) {
                full |= want.only.is_none() && rows.len() >= want.limit as usize;
                if let (Some(only), true) = (&want.only, rows.is_empty()) {
                    // NB: else the probe stays due and the deliverer spins.
                    for event_type in only {
                        self.dispatcher
                            .probe_found_nothing(event_type, Instant::now());
                    }
                }
                // NB: the byte budget may have left due events behind,
                // which only a look would show: look at the next turn.
                let bytes: i64 = rows.iter().map(|row| row.body_bytes).sum();
                if !look
                    && !rows.is_empty()
                    && bytes + self.limits.max_event_bytes as i64 >= want.max_bytes
                {
                    self.poll();
                }
                let (jobs, refused) = jobs_of(rows, &self.limits, claimed_at);
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
            asked_skip = plan.skip;
            next_due = exchanged.next_due;
            if !full {
                break;
            }
        }
        // Not looked: what was known before still holds.
        let Some(next_due) = next_due else {
            return true;
        };
        self.last_look = Some((Instant::now(), asked_skip.clone()));
        let mut next_due = next_due;
        // NB: the next due event was looked for as the lanes were before
        // this claim. A lane it filled is left alone now, and its waiting
        // events may be due: then look again without them, or the
        // deliverer would claim again at once for nothing.
        let skip = self.dispatcher.plan(batch as usize, Instant::now()).skip;
        if next_due.is_some_and(|wait| wait.is_zero())
            && skip.iter().any(|t| !asked_skip.contains(t))
        {
            let result = queue.exchange(&Exchange {
                next_due_skip: Some(&skip),
                ..Exchange::default()
            });
            let Some(exchanged) = self.succeeded(host, "finding the next due event", result) else {
                self.poll();
                return false;
            };
            next_due = exchanged.next_due.flatten();
            self.last_look = Some((Instant::now(), skip));
        }
        self.next_due_at = next_due.map(|wait| Instant::now() + wait);
        true
    }

    /// Takes what finished from the dispatcher; logs endpoints that went down.
    fn collect(&mut self, host: &impl Host) {
        let collected = self.dispatcher.collect();
        if !collected.attempts.is_empty() {
            self.unrecorded_since.get_or_insert_with(Instant::now);
        }
        self.unacknowledged += collected.attempts.len();
        self.unrecorded.extend(collected.attempts);
        self.unreleased.extend(collected.handed_back);
        for (event_type, change) in &collected.changes {
            if let Change::Opened(why) = change {
                host.log(
                    Level::Info,
                    &format!(
                        "the endpoint of {event_type} is down: {why}; probing it with one request at a \
                         time (every {}s at most) until it answers; its other events wait",
                        PROBE_LONGEST.as_secs()
                    ),
                );
            }
        }
        self.changes.extend(collected.changes);
    }

    /// Whether what came back must be recorded now rather than with the
    /// next claim: hand-backs and circuit changes at once, outcomes once
    /// half of what may wait unstored came in, or RECORD_WITHIN after the
    /// first of them.
    fn record_due(&self) -> bool {
        !self.unreleased.is_empty()
            || !self.changes.is_empty()
            || (!self.unrecorded.is_empty()
                && (self.unrecorded.len() >= (self.dispatcher.unacknowledged_cap() / 2).max(1)
                    || self
                        .unrecorded_since
                        .is_some_and(|at| at.elapsed() >= RECORD_WITHIN)))
    }

    fn take_unrecorded(&mut self) -> (Vec<Attempt>, Vec<Job>, Vec<(String, Change)>) {
        self.unrecorded_since = None;
        (
            std::mem::take(&mut self.unrecorded),
            std::mem::take(&mut self.unreleased),
            std::mem::take(&mut self.changes),
        )
    }

    /// Keeps what a failed transaction did not record for the next one.
    fn restore_unrecorded(
        &mut self,
        attempts: Vec<Attempt>,
        unsent: Vec<Job>,
        changes: Vec<(String, Change)>,
    ) {
        if attempts.is_empty() && unsent.is_empty() && changes.is_empty() {
            return;
        }
        self.unrecorded.splice(0..0, attempts);
        self.unreleased.splice(0..0, unsent);
        // Stored next time (openings are logged already, and said again
        // with the circuit).
        self.changes.splice(0..0, changes);
        self.unrecorded_since = Some(Instant::now());
        if self.unrecorded.len() > UNRECORDED_LIMIT {
            let excess = self.unrecorded.len() - UNRECORDED_LIMIT;
            self.unrecorded.drain(..excess);
            self.dispatcher.acknowledge(excess);
            self.unacknowledged = self.unacknowledged.saturating_sub(excess);
        }
    }

    /// After a transaction stored `attempts`, `unsent` and `circuits`.
    fn recorded(
        &mut self,
        host: &impl Host,
        attempts: &[Attempt],
        unsent: &[Job],
        changes: &[(String, Change)],
        circuits: &[Circuit],
        made_due: &[i32],
    ) {
        if attempts.is_empty() && unsent.is_empty() && changes.is_empty() {
            return;
        }
        host.recorded(attempts);
        self.dispatcher
            .acknowledge(std::mem::take(&mut self.unacknowledged));
        let gone: Vec<String> = changes
            .iter()
            .filter(|(_, change)| *change == Change::Gone)
            .map(|(event_type, _)| event_type.clone())
            .collect();
        self.dispatcher.forget_gone(&gone);
        // A retry or a handed-back event may be due before anything the
        // deliverer waits for: look again.
        if !unsent.is_empty() || attempts.iter().any(|a| a.verdict != Verdict::Delivered) {
            self.poll();
        }
        for (circuit, due) in circuits.iter().zip(made_due) {
            if circuit.state == "half_open" {
                let event_type = &circuit.event_type;
                host.log(
                    Level::Info,
                    &format!("the endpoint of {event_type} answers again; {due} waiting events are due now"),
                );
            }
            self.poll();
        }
    }

    /// Records what came back, in a transaction of its own; false when that
    /// failed (it is kept for the next turn).
    fn record(&mut self, queue: &mut impl Queue, host: &impl Host) -> bool {
        if self.unrecorded.is_empty() && self.unreleased.is_empty() && self.changes.is_empty() {
            return true;
        }
        host.activity("recording deliveries");
        self.exchange_with_outcomes(queue, host, "recording deliveries", true, &[], None)
            .is_some()
    }

    /// One transaction that stores what came back since the last one (when
    /// `store`), with `claims` and the look for the next due event (skipping
    /// `next_due_skip`) when given. Once it committed, what it stored is
    /// acknowledged; when it failed, that is kept for the next one (and
    /// None comes back).
    fn exchange_with_outcomes(
        &mut self,
        queue: &mut impl Queue,
        host: &impl Host,
        what: &str,
        store: bool,
        claims: &[Claim],
        next_due_skip: Option<&[String]>,
    ) -> Option<Exchanged> {
        let (attempts, unsent, changes) = if store {
            self.take_unrecorded()
        } else {
            Default::default()
        };
        let circuits = Circuit::of(&changes);
        let result = queue.exchange(&Exchange {
            attempts: &attempts,
            unsent: &unsent,
            circuits: &circuits,
            claims,
            next_due_skip,
        });
        let Some(exchanged) = self.succeeded(host, what, result) else {
            self.restore_unrecorded(attempts, unsent, changes);
            return None;
        };
        self.recorded(
            host,
            &attempts,
            &unsent,
            &changes,
            &circuits,
            &exchanged.made_due,
        );
        Some(exchanged)
    }

    /// Nothing new starts; the requests in flight get up to `grace` to
    /// finish; what finished is recorded and the rest of what was claimed
    /// is handed back. Requests still out after that are abandoned (their
    /// events come back when the lease ends). False when recording failed.
    pub fn stop(&mut self, queue: &mut impl Queue, host: &impl Host, grace: Duration) -> bool {
        let (attempts, unsent) = self.dispatcher.stop();
        self.unrecorded.extend(attempts);
        self.unreleased.extend(unsent);
        let until = Instant::now() + grace;
        while self.dispatcher.load().0 > 0 && Instant::now() < until {
            wait_readable(
                self.dispatcher.wake_fd(),
                until.saturating_duration_since(Instant::now()),
            );
            self.dispatcher.drain_wake();
        }
        self.collect(host);
        self.record(queue, host)
    }

    fn purge_if_due(&mut self, queue: &mut impl Queue, host: &impl Host) {
        // A tenth of the retention, between a second and a minute, apart.
        // NB: with retention 0 (keep everything) too: the purge also
        // settles the events of types recorded without delivery.
        let every = if self.limits.retention.is_zero() {
            PURGE_EVERY
        } else {
            (self.limits.retention / 10).clamp(Duration::from_secs(1), PURGE_EVERY)
        };
        if self.last_purge.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last_purge = Some(Instant::now());
        host.activity("purging old history");
        // Small transactions keep locks short and let autovacuum keep up.
        while !host.interrupted() {
            let purged = queue.purge(PURGE_BATCH);
            match self.succeeded(host, "purging old history", purged) {
                Some(deleted) if deleted >= PURGE_BATCH as i64 => continue,
                _ => break,
            }
        }
        // NB: the purge may have lowered the floor of the claims
        // (pipeline.settled_below) to an event set back by hand, which
        // wakes no deliverer: the turn claims and looks (once a minute at
        // most when idle, about a millisecond).
        self.poll();
    }

    /// A failure is logged (once while it lasts) and gives None: the
    /// deliverer carries on with the next round instead of dying.
    fn succeeded<R>(
        &mut self,
        host: &impl Host,
        what: &str,
        result: Result<R, String>,
    ) -> Option<R> {
        match result {
            Ok(value) => {
                self.last_failure = None;
                Some(value)
            }
            Err(message) => {
                let failure = format!("{what} failed: {message}");
                if self.last_failure.as_ref() != Some(&failure) {
                    host.log(Level::Warning, &failure);
                    self.last_failure = Some(failure);
                }
                None
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes; true when it is readable.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // NB: rounded up: rounded down, a wait of less than a millisecond spins.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one pollfd on the stack, for a descriptor the dispatcher owns.
    unsafe { libc::poll(&mut poll, 1, ms) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{ClaimedRow, Exchanged};
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// A queue in memory: `pending` events of one type, claimed in order;
    /// it counts what the exchanges did.
    #[derive(Default)]
    struct MemoryQueue {
        pending: VecDeque<i64>,
        delivered: usize,
        /// Exchanges that looked for the next due event.
        looks: usize,
        /// Exchanges that stored outcomes, and of them those that waited
        /// for the disk.
        stores: usize,
        durable: usize,
    }

    impl Queue for MemoryQueue {
        fn exchange(&mut self, x: &Exchange) -> Result<Exchanged, String> {
            self.delivered += x.attempts.len();
            self.looks += usize::from(x.next_due_skip.is_some());
            self.stores += usize::from(!x.attempts.is_empty());
            self.durable += usize::from(x.durable());
            self.pending.extend(x.unsent.iter().map(|j| j.event_id));
            let claimed = x
                .claims
                .iter()
                .map(|claim| {
                    let n = (claim.limit as usize).min(self.pending.len());
                    self.pending
                        .drain(..n)
                        .map(|id| ClaimedRow {
                            event_id: id,
                            attempt: 1,
                            event_type: "t".into(),
                            url: "http://127.0.0.1:9/t".into(),
                            method: "POST".into(),
                            headers: "{}".into(),
                            body: Some("{}".into()),
                            body_bytes: 2,
                            ..ClaimedRow::default()
                        })
                        .collect()
                })
                .collect();
            Ok(Exchanged {
                made_due: vec![0; x.circuits.len()],
                claimed,
                next_due: x
                    .next_due_skip
                    .map(|_| (!self.pending.is_empty()).then_some(Duration::ZERO)),
            })
        }

        fn purge(&mut self, _max_rows: i32) -> Result<i64, String> {
            Ok(0)
        }
    }

    struct Quiet;
    impl Host for Quiet {
        fn interrupted(&self) -> bool {
            false
        }
        fn log(&self, _level: Level, _message: &str) {}
    }

    fn limits() -> Limits {
        Limits {
            batch_size: 500,
            concurrency: 16,
            http_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            max_event_bytes: 1 << 20,
            max_bytes_in_flight: 64 << 20,
            poll_interval: Duration::from_secs(10),
            retention: Duration::ZERO,
        }
    }

    fn delivering() -> Sender {
        Arc::new(|job: &Job| Attempt {
            verdict: Verdict::Delivered,
            status_code: Some(204),
            ..Attempt::new(job)
        })
    }

    /// Turns as a deliverer does: waits for what it asked, then turns.
    fn turn_after_wait(engine: &mut Engine, queue: &mut MemoryQueue, wait: Duration) -> Duration {
        wait_readable(engine.dispatcher().wake_fd(), wait);
        engine.dispatcher().drain_wake();
        engine.turn(queue, &Quiet, true)
    }

    /// Events committed one at a time (the worker's latch, the relay's
    /// LISTEN) are claimed without looking for the next due event and
    /// without storing each answer: the answers go together, in a
    /// transaction of their own that waits for the disk, and the claims'
    /// do not. A poll, a retry to schedule, or a second since the last
    /// look make the next claim look.
    #[test]
    fn single_events_are_claimed_without_a_look_and_answers_stored_together() {
        let mut engine = Engine::new(limits(), delivering()).unwrap();
        let mut queue = MemoryQueue::default();
        let mut wait = engine.turn(&mut queue, &Quiet, true);
        assert_eq!(queue.looks, 1, "the first claim looks");
        for id in 0..5 {
            std::thread::sleep(CLAIM_GAP + Duration::from_millis(3));
            queue.pending.push_back(id);
            engine.wake();
            wait = turn_after_wait(&mut engine, &mut queue, Duration::ZERO);
        }
        assert_eq!(queue.looks, 1, "new events alone ask for no look");
        assert_eq!(queue.stores, 0, "answers wait to be stored together");
        assert_eq!(queue.durable, 0, "claims alone need no flush");
        let started = Instant::now();
        while queue.delivered < 5 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{} stored",
                queue.delivered
            );
            wait = turn_after_wait(&mut engine, &mut queue, wait);
        }
        assert_eq!(queue.stores, 1, "five answers, one recording");
        assert_eq!(queue.durable, 1);
        assert!(started.elapsed() <= RECORD_WITHIN + Duration::from_millis(100));

        engine.poll();
        std::thread::sleep(CLAIM_GAP);
        turn_after_wait(&mut engine, &mut queue, Duration::ZERO);
        assert_eq!(queue.looks, 2, "a poll looks");

        std::thread::sleep(LOOK_EVERY);
        queue.pending.push_back(5);
        engine.wake();
        turn_after_wait(&mut engine, &mut queue, Duration::ZERO);
        assert_eq!(
            queue.looks, 3,
            "a look at least every {LOOK_EVERY:?} while events come"
        );
    }

    /// Events that became claimable without a wake-up (the purge lowered
    /// the floor of the claims below an event set back by hand) are
    /// claimed by the turn that purges.
    #[test]
    fn a_purge_is_followed_by_a_claim_and_a_look() {
        let limits = Limits {
            // (a purge every second)
            retention: Duration::from_secs(10),
            ..limits()
        };
        let mut engine = Engine::new(limits, delivering()).unwrap();
        let mut queue = MemoryQueue::default();
        engine.turn(&mut queue, &Quiet, true);
        std::thread::sleep(CLAIM_GAP);
        engine.turn(&mut queue, &Quiet, true);
        queue.pending.push_back(7);
        std::thread::sleep(CLAIM_GAP);
        engine.turn(&mut queue, &Quiet, true);
        assert_eq!(queue.pending, [7], "no wake-up, no purge: not claimed");
        std::thread::sleep(Duration::from_secs(1));
        let looks = queue.looks;
        engine.turn(&mut queue, &Quiet, true);
        assert!(queue.pending.is_empty(), "claimed after the purge");
        assert_eq!(queue.looks, looks + 1, "with a look");
    }

    /// A claim that may have been cut short by the byte budget looks again
    /// at the next turn: only a look would show the events it left due.
    #[test]
    fn a_claim_near_the_byte_budget_looks_again() {
        let limits = Limits {
            max_event_bytes: 10,
            max_bytes_in_flight: 12,
            ..limits()
        };
        let mut engine = Engine::new(limits, delivering()).unwrap();
        let mut queue = MemoryQueue::default();
        engine.turn(&mut queue, &Quiet, true);
        assert_eq!(queue.looks, 1);
        queue.pending.push_back(1);
        std::thread::sleep(CLAIM_GAP);
        engine.wake();
        turn_after_wait(&mut engine, &mut queue, Duration::ZERO);
        assert_eq!(queue.looks, 1, "claimed without a look");
        assert!(engine.wants_claim(), "and wants another claim");
        std::thread::sleep(CLAIM_GAP);
        turn_after_wait(&mut engine, &mut queue, Duration::ZERO);
        assert_eq!(queue.looks, 2, "which looks");
    }

    /// A backlog far larger than the answers that may wait to be stored
    /// goes out whole, turn after turn, without waiting for a poll.
    #[test]
    fn a_large_backlog_flows_with_answers_stored_as_they_come() {
        let mut engine = Engine::new(limits(), delivering()).unwrap();
        let mut queue = MemoryQueue {
            pending: (0..20_000).collect(),
            ..MemoryQueue::default()
        };
        let started = Instant::now();
        loop {
            let wait = engine.turn(&mut queue, &Quiet, true);
            if queue.delivered == 20_000 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{} of 20000 delivered",
                queue.delivered
            );
            // An answer that came in after the turn looked must have woken
            // the deliverer (NB: it may come in between the turn and this
            // check: then the wake-up, not the wait, is what counts).
            if wait >= Duration::from_secs(1) && engine.dispatcher().uncollected() > 0 {
                assert!(
                    wait_readable(engine.dispatcher().wake_fd(), Duration::from_millis(200)),
                    "answers wait for the poll"
                );
            }
            wait_readable(engine.dispatcher().wake_fd(), wait);
            engine.dispatcher().drain_wake();
        }
    }
}
