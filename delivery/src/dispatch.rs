//! Sending deliveries concurrently, endpoint by endpoint, never waiting for
//! the slowest.
//!
//! Each endpoint (event type) has a lane: its jobs in claim order, and a cap
//! on its requests in flight (its max_in_flight, or less while its circuit
//! is open or half-open, see health.rs). Threads take jobs from the lanes in
//! turn as soon as a lane has room, and are started as lanes need them (then
//! kept for later jobs), so a hanging endpoint holds its own slots only,
//! never another's.
//!
//! The caller collects finished attempts whenever it likes: a finish writes
//! a byte to a pipe whose read end it can wait on beside PostgreSQL's latch,
//! so outcomes are recorded and new events claimed while slow requests are
//! still out. A caller that will come for them in time anyway (it waits to
//! store outcomes together) says so, and is then woken only by what cannot
//! wait: a circuit that changed, events handed back, half the cap below
//! reached, a stop. It acknowledges them once they are stored; no new
//! request starts while the unacknowledged ones reach the cap it set. So the
//! deliveries a crash can repeat (answered, not yet stored) are bounded by
//! the requests in flight plus that cap, not by the batch claimed.
//!
//! Jobs handed back unsent (for the caller to release): a job that could not
//! start before its deadline (its lease would end before the request did);
//! the waiting jobs of an endpoint whose circuit opens (only probes go out
//! then), that asks to wait (Retry-After) or that answers 410 Gone (it is
//! being disabled: nothing more is sent to it); every waiting job when the
//! dispatcher stops. Requests in flight at a stop are abandoned: their events
//! stay processing until the lease ends or the next worker takes its claims
//! back, which keeps delivery at least once without making shutdown wait for
//! a slow receiver.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::health::{Change, Health};
use super::{Attempt, Job, Verdict};

/// What sends one job.
pub type Sender = Arc<dyn Fn(&Job) -> Attempt + Send + Sync>;

/// Longest a thread waits without looking at probes and deadlines while
/// jobs wait in a lane (with none waiting, it sleeps until told).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A sending thread that has had nothing to do for this long ends, while
/// more than KEEP_THREADS are left.
#[cfg(not(test))]
const IDLE_EXIT: Duration = Duration::from_secs(10);
#[cfg(test)]
const IDLE_EXIT: Duration = Duration::from_millis(200);
const KEEP_THREADS: usize = 2;

pub struct Dispatcher {
    shared: Arc<Shared>,
    wake_read: OwnedFd,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    sender: Mutex<Sender>,
    wake_write: OwnedFd,
    /// A byte is in the pipe and not drained yet: finishes need not write.
    wake_pending: AtomicBool,
}

#[derive(Default)]
struct State {
    lanes: Vec<Lane>,
    next: usize,
    finished: Vec<Attempt>,
    handed_back: Vec<Job>,
    changes: Vec<(String, Change)>,
    held_bytes: usize,
    /// Attempts finished and not yet acknowledged as stored, and the most
    /// there may be before no new request starts.
    unacknowledged: usize,
    unacknowledged_cap: usize,
    threads: usize,
    idle: usize,
    stopped: bool,
    /// The caller is not woken by a finish that can wait for its next look.
    quiet_finishes: bool,
}

struct Lane {
    event_type: String,
    jobs: VecDeque<Job>,
    in_flight: usize,
    health: Health,
    /// Answered 410 Gone: nothing more starts until the caller has stored
    /// that (the endpoint is disabled then) and says so.
    gone: bool,
}

/// What the caller should claim next.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Event types not to claim: their lane holds half a batch or more
    /// (refilled below that, so that claims stay large), or their endpoint
    /// is down, paused or gone (its events wait in the queue).
    pub skip: Vec<String>,
    /// Event types whose endpoint is due for a probe: claim one event each.
    pub probes: Vec<String>,
    /// Whether a lane is full: claim again once requests finish.
    pub lanes_full: bool,
    /// Bytes of request bodies held (waiting or in flight).
    pub held_bytes: usize,
}

/// Everything that happened since the last collect.
#[derive(Debug, Default)]
pub struct Collected {
    pub attempts: Vec<Attempt>,
    pub handed_back: Vec<Job>,
    pub changes: Vec<(String, Change)>,
}

impl Dispatcher {
    pub fn new(sender: Sender) -> io::Result<Dispatcher> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two descriptors on success; both are then
        // owned by OwnedFd, which closes them.
        let (wake_read, wake_write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        Ok(Dispatcher {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    unacknowledged_cap: usize::MAX,
                    ..State::default()
                }),
                work: Condvar::new(),
                sender: Mutex::new(sender),
                wake_write,
                wake_pending: AtomicBool::new(false),
            }),
            wake_read,
        })
    }

    /// No new request starts while `cap` attempts or more are finished and
    /// not acknowledged.
    pub fn set_unacknowledged_cap(&self, cap: usize) {
        let mut state = lock(&self.shared.state);
        state.unacknowledged_cap = cap.max(1);
        self.wake_startable(state);
    }

    /// Whether a finish that can wait (see the top of this file) wakes the
    /// caller: not when it will collect within the time it allows outcomes
    /// to wait anyway.
    pub fn set_quiet_finishes(&self, quiet: bool) {
        lock(&self.shared.state).quiet_finishes = quiet;
    }

    /// The cap of unacknowledged answers in force now (see State::effective_cap).
    pub fn unacknowledged_cap(&self) -> usize {
        lock(&self.shared.state).effective_cap()
    }

    /// `count` collected attempts are stored: that many more may finish.
    pub fn acknowledge(&self, count: usize) {
        let mut state = lock(&self.shared.state);
        state.unacknowledged = state.unacknowledged.saturating_sub(count);
        self.wake_startable(state);
    }

    /// The 410 Gone of these types is stored (their endpoints are disabled):
    /// their lanes take jobs again (claimed only once they are enabled).
    pub fn forget_gone(&self, event_types: &[String]) {
        let mut state = lock(&self.shared.state);
        for event_type in event_types {
            state.lane(event_type).gone = false;
        }
    }

    /// Hands back every waiting job: an endpoint changed (disabled,
    /// removed, moved, its credentials replaced) since they were claimed, so
    /// they are claimed again as the endpoint is now. Requests in flight
    /// finish.
    pub fn hand_back_waiting(&self) -> usize {
        let mut state = lock(&self.shared.state);
        (0..state.lanes.len())
            .map(|index| state.hand_back_lane(index))
            .sum()
    }

    /// Requests started from now on use `sender` (a rebuilt HTTP client).
    pub fn set_sender(&self, sender: Sender) {
        *lock(&self.shared.sender) = sender;
    }

    /// The descriptor that becomes readable when an attempt finishes.
    pub fn wake_fd(&self) -> RawFd {
        self.wake_read.as_raw_fd()
    }

    /// Empties the wake-up pipe (after a wait on wake_fd).
    pub fn drain_wake(&self) {
        let mut buffer = [0u8; 256];
        // SAFETY: reads into a local buffer from a descriptor we own; the
        // pipe is non-blocking, so the loop ends when it is empty.
        while unsafe {
            libc::read(
                self.wake_read.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        } > 0
        {}
        // NB: cleared after reading. Cleared before, a finish between the
        // two had its byte read here while the flag stayed set: no later
        // finish wrote again, and the caller slept out its whole wait with
        // answers to store (and, once they reached the cap of unstored
        // answers, every sender idle). A finish before this line is
        // collected by the caller's next turn; one after it writes.
        self.shared.wake_pending.store(false, Ordering::SeqCst);
    }

    /// Queues jobs behind those of their endpoint and starts what can start.
    pub fn submit(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut state = lock(&self.shared.state);
        for job in jobs {
            let lane = state.lane(&job.endpoint.event_type);
            if lane.gone {
                // NB: claimed before the 410 was stored; never sent.
                state.handed_back.push(job);
                continue;
            }
            state.held_bytes += job.body.len();
            let lane = state.lane(&job.endpoint.event_type);
            lane.jobs.push_back(job);
        }
        self.wake_startable(state);
    }

    /// Starts or wakes threads for the jobs that can start.
    fn wake_startable(&self, mut state: MutexGuard<'_, State>) {
        let waking = self.start_threads(&mut state);
        drop(state);
        // One idle thread per job that can start: waking them all would cost
        // every thread a context switch per job.
        for _ in 0..waking {
            self.shared.work.notify_one();
        }
    }

    /// Takes what finished, what was handed back and how endpoints changed.
    pub fn collect(&self) -> Collected {
        let mut state = lock(&self.shared.state);
        state.hand_back_expired(Instant::now());
        Collected {
            attempts: std::mem::take(&mut state.finished),
            handed_back: std::mem::take(&mut state.handed_back),
            changes: std::mem::take(&mut state.changes),
        }
    }

    /// What to claim next, for claims of up to `batch_size` events.
    pub fn plan(&self, batch_size: usize, now: Instant) -> Plan {
        let mut state = lock(&self.shared.state);
        for lane in &mut state.lanes {
            // NB: an ended pause is forgotten here, where the claim that
            // follows takes its events again: until then next_probe_in
            // keeps asking for that claim.
            lane.health.resume_if_due(now);
        }
        let mut plan = Plan {
            held_bytes: state.held_bytes,
            ..Plan::default()
        };
        for lane in &state.lanes {
            if lane.gone || lane.health.paused(now) {
                plan.skip.push(lane.event_type.clone());
            } else if lane.health.open() {
                plan.skip.push(lane.event_type.clone());
                if lane.in_flight == 0
                    && lane.jobs.is_empty()
                    && lane.health.probe_at().is_some_and(|at| at <= now)
                {
                    plan.probes.push(lane.event_type.clone());
                }
            } else if lane.jobs.len() >= (batch_size / 2).max(1) {
                plan.skip.push(lane.event_type.clone());
                plan.lanes_full = true;
            }
        }
        plan
    }

    /// A probe claim of `event_type` found nothing to send.
    pub fn probe_found_nothing(&self, event_type: &str, now: Instant) {
        let mut state = lock(&self.shared.state);
        state.lane(event_type).health.probe_found_nothing(now);
    }

    /// How long until a probe is due or a pause ends, so that claims look
    /// again (None: none is waited for).
    pub fn next_probe_in(&self, now: Instant) -> Option<Duration> {
        let state = lock(&self.shared.state);
        let probes = state
            .lanes
            .iter()
            .filter(|lane| lane.in_flight == 0 && lane.jobs.is_empty())
            .filter_map(|lane| lane.health.probe_at());
        let pauses = state
            .lanes
            .iter()
            .filter_map(|lane| lane.health.paused_until());
        probes
            .chain(pauses)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Requests in flight and jobs waiting.
    pub fn load(&self) -> (usize, usize) {
        let state = lock(&self.shared.state);
        state.lanes.iter().fold((0, 0), |(flying, waiting), lane| {
            (flying + lane.in_flight, waiting + lane.jobs.len())
        })
    }

    /// Attempts finished and handed-back jobs not collected yet.
    pub fn uncollected(&self) -> usize {
        let state = lock(&self.shared.state);
        state.finished.len() + state.handed_back.len()
    }

    /// Starts nothing more: returns what finished and every job not started.
    pub fn stop(&self) -> (Vec<Attempt>, Vec<Job>) {
        let mut state = lock(&self.shared.state);
        state.stopped = true;
        let mut unsent = std::mem::take(&mut state.handed_back);
        for lane in &mut state.lanes {
            unsent.extend(lane.jobs.drain(..));
        }
        let attempts = std::mem::take(&mut state.finished);
        drop(state);
        self.shared.work.notify_all();
        (attempts, unsent)
    }

    /// Starts threads for the jobs that can start and find no idle thread;
    /// returns how many idle threads to wake for the others.
    fn start_threads(&self, state: &mut State) -> usize {
        let now = Instant::now();
        let startable: usize = state.lanes.iter().map(|lane| lane.startable(now)).sum();
        let waking = startable.min(state.idle);
        for _ in state.idle..startable {
            state.threads += 1;
            state.idle += 1;
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name("pipeline_ext sender".into())
                .spawn(move || sender_thread(&shared))
                .expect("start a sender thread");
        }
        waking
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        lock(&self.shared.state).stopped = true;
        self.shared.work.notify_all();
    }
}

impl State {
    fn lane(&mut self, event_type: &str) -> &mut Lane {
        let index = self.lane_index(event_type);
        &mut self.lanes[index]
    }

    /// Hands back every job waiting in a lane; how many.
    fn hand_back_lane(&mut self, index: usize) -> usize {
        let waiting: Vec<Job> = self.lanes[index].jobs.drain(..).collect();
        for job in &waiting {
            self.held_bytes -= job.body.len();
        }
        let count = waiting.len();
        self.handed_back.extend(waiting);
        count
    }

    /// The index of an event type's lane, made if it has none.
    fn lane_index(&mut self, event_type: &str) -> usize {
        match self.lanes.iter().position(|l| l.event_type == event_type) {
            Some(index) => index,
            None => {
                self.lanes.push(Lane {
                    event_type: event_type.to_string(),
                    jobs: VecDeque::new(),
                    in_flight: 0,
                    health: Health::default(),
                    gone: false,
                });
                self.lanes.len() - 1
            }
        }
    }

    /// Hands back the waiting jobs whose deadline has passed.
    fn hand_back_expired(&mut self, now: Instant) {
        for lane in &mut self.lanes {
            while lane.jobs.front().is_some_and(|job| job.deadline <= now) {
                let job = lane.jobs.pop_front().expect("a front job");
                self.held_bytes -= job.body.len();
                self.handed_back.push(job);
            }
        }
    }

    /// Whether the attempt just finished must wake the caller.
    fn finish_wakes(&self) -> bool {
        !self.quiet_finishes
            || self.stopped
            || !self.changes.is_empty()
            || !self.handed_back.is_empty()
            || self.unacknowledged * 2 >= self.effective_cap()
    }

    /// The cap of unacknowledged answers in force: the caller's, or the
    /// requests the busy endpoints may have in flight together when that is
    /// more (ten endpoints of 16 each record less often than one would).
    fn effective_cap(&self) -> usize {
        let in_flight: usize = self
            .lanes
            .iter()
            .filter_map(|lane| {
                let front = lane.jobs.front().map(|job| job.endpoint.max_in_flight);
                front.or((lane.in_flight > 0).then_some(lane.in_flight))
            })
            .sum();
        self.unacknowledged_cap.max(in_flight)
    }

    /// The next job that may start, taking lanes in turn.
    fn take(&mut self, now: Instant) -> Option<Job> {
        self.hand_back_expired(now);
        if self.unacknowledged >= self.effective_cap() {
            return None;
        }
        let count = self.lanes.len();
        for step in 0..count {
            let index = (self.next + step) % count;
            let lane = &mut self.lanes[index];
            if lane.startable(now) == 0 {
                continue;
            }
            if lane.health.open() {
                lane.health.probe_started(now);
            }
            lane.in_flight += 1;
            self.next = (index + 1) % count;
            return lane.jobs.pop_front();
        }
        None
    }

    /// When a waiting thread should look again without being told: never
    /// while no job waits.
    fn next_check(&self, now: Instant) -> Option<Duration> {
        let waiting = || self.lanes.iter().filter(|lane| !lane.jobs.is_empty());
        waiting().next()?;
        let probe = waiting()
            .filter(|lane| lane.in_flight == 0)
            .filter_map(|lane| lane.health.probe_at());
        let pause = waiting().filter_map(|lane| lane.health.paused_until());
        probe
            .chain(pause)
            .filter(|at| *at > now)
            .min()
            .map(|at| at.saturating_duration_since(now))
            .unwrap_or(IDLE_CHECK)
            .min(IDLE_CHECK)
            .into()
    }

    /// Notes a finished attempt.
    fn finish(&mut self, job: &Job, attempt: Attempt, now: Instant) {
        self.held_bytes -= job.body.len();
        self.unacknowledged += 1;
        let event_type = &job.endpoint.event_type;
        let lane = self.lane(event_type);
        lane.in_flight -= 1;
        let mut change = lane
            .health
            .record(&attempt, job.endpoint.max_in_flight, now);
        if attempt.verdict == Verdict::Gone && !lane.gone {
            lane.gone = true;
            change = Change::Gone;
        }
        if matches!(change, Change::Opened(_) | Change::Paused(_) | Change::Gone) {
            // Only probes go out now, or nothing for a while: the rest
            // waits in the queue.
            let index = self.lane_index(event_type);
            self.hand_back_lane(index);
        }
        if change != Change::None {
            self.changes.push((event_type.clone(), change));
        }
        self.finished.push(attempt);
    }
}

impl Lane {
    /// How many of its jobs could start now.
    fn startable(&self, now: Instant) -> usize {
        let Some(front) = self.jobs.front() else {
            return 0;
        };
        if self.gone {
            return 0;
        }
        self.health
            .allowed(front.endpoint.max_in_flight, now)
            .saturating_sub(self.in_flight)
            .min(self.jobs.len())
    }
}

/// One sending thread: takes jobs until the dispatcher stops.
fn sender_thread(shared: &Shared) {
    block_signals();
    loop {
        let job = {
            let mut state = lock(&shared.state);
            // Whether this thread waited IDLE_EXIT for nothing.
            let mut unused = false;
            loop {
                if state.stopped {
                    state.idle -= 1;
                    state.threads -= 1;
                    return;
                }
                let now = Instant::now();
                if let Some(job) = state.take(now) {
                    state.idle -= 1;
                    break job;
                }
                // NB: only after looking for a job: a submit between the
                // timeout and this lock counted this thread as idle, and its
                // notification may have reached no other thread.
                if unused && state.threads > KEEP_THREADS {
                    state.idle -= 1;
                    state.threads -= 1;
                    return;
                }
                // NB: with no job waiting, nothing is due until the caller
                // submits, acknowledges or stops, which tells the threads:
                // idle threads sleep until told (woken each second, sixteen
                // of them cost an idle worker 2 ms of CPU a second), or end
                // after IDLE_EXIT. The threads a backlog needed (up to each
                // endpoint's max_in_flight, 160 for ten endpoints) lingered
                // otherwise, and steady traffic afterwards woke a different
                // one for each event, longest asleep first, its caches
                // cold: the worker's CPU per event was up to 1.7 times as
                // high after a backlog (docs/benchmark-notes.md, "Sixth
                // pass").
                unused = false;
                state = match state.next_check(now) {
                    Some(wait) => {
                        shared
                            .work
                            .wait_timeout(state, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None if state.threads <= KEEP_THREADS => {
                        shared.work.wait(state).unwrap_or_else(|e| e.into_inner())
                    }
                    None => {
                        let (woken, waited) = shared
                            .work
                            .wait_timeout(state, IDLE_EXIT)
                            .unwrap_or_else(|e| e.into_inner());
                        unused = waited.timed_out();
                        woken
                    }
                };
            }
        };
        let sender = lock(&shared.sender).clone();
        // A panic is one failed attempt (retried), not a lost thread.
        let attempt = std::panic::catch_unwind(AssertUnwindSafe(|| sender(&job)))
            .unwrap_or_else(|panic| panicked(&job, panic.as_ref()));
        let mut state = lock(&shared.state);
        state.finish(&job, attempt, Instant::now());
        state.idle += 1;
        let wake = state.finish_wakes();
        drop(state);
        // NB: no other thread is woken: the only job this finish can make
        // startable is its lane's next, which this thread takes itself.
        if wake && !shared.wake_pending.swap(true, Ordering::SeqCst) {
            // SAFETY: writes one byte from a local to a descriptor we own;
            // the pipe is non-blocking, and a full pipe wakes the reader too.
            unsafe {
                libc::write(shared.wake_write.as_raw_fd(), [1u8].as_ptr().cast(), 1);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never happens while the lock is held (sends run unlocked), but
    // a poisoned lock must not stop deliveries either.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The attempt of a job whose sending panicked: retried like a network error.
fn panicked(job: &Job, panic: &(dyn std::any::Any + Send)) -> Attempt {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    Attempt {
        error: Some(format!("internal error while sending: {what}")),
        ..Attempt::new(job)
    }
}

/// Signals are PostgreSQL's to handle, on the worker's main thread: its
/// handlers touch process state that is not thread-safe.
fn block_signals() {
    // SAFETY: sigfillset initialises the set it is given, and pthread_sigmask
    // changes only the calling thread's signal mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn endpoint(name: &str, cap: usize) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            event_type: name.into(),
            url: format!("http://127.0.0.1/{name}"),
            method: "POST".into(),
            headers: vec![],
            signing_key: None,
            timeout: Duration::from_secs(1),
            max_in_flight: cap,
            confirm_header: None,
            redactor: Default::default(),
        })
    }

    fn jobs(endpoint: &Arc<Endpoint>, ids: std::ops::Range<i64>) -> Vec<Job> {
        ids.map(|id| Job {
            event_id: id,
            attempt: 1,
            endpoint: endpoint.clone(),
            body: "{}".into(),
            deadline: Instant::now() + Duration::from_secs(60),
        })
        .collect()
    }

    fn delivered(job: &Job) -> Attempt {
        Attempt {
            verdict: Verdict::Delivered,
            ..Attempt::new(job)
        }
    }

    /// Collects until `done` holds of everything collected; panics after `limit`.
    fn collect_until(
        dispatcher: &Dispatcher,
        limit: Duration,
        done: impl Fn(&Collected) -> bool,
    ) -> Collected {
        let started = Instant::now();
        let mut all = Collected::default();
        loop {
            let more = dispatcher.collect();
            all.attempts.extend(more.attempts);
            all.handed_back.extend(more.handed_back);
            all.changes.extend(more.changes);
            if done(&all) {
                return all;
            }
            assert!(started.elapsed() < limit, "waited {limit:?}: {all:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn every_job_once_within_each_cap() {
        static IN_FLIGHT: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        static PEAK: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let slow = endpoint("slow", 2);
        let fast = endpoint("fast", 100);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            let i = usize::from(job.endpoint.event_type == "fast");
            let now = IN_FLIGHT[i].fetch_add(1, Ordering::SeqCst) + 1;
            PEAK[i].fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            IN_FLIGHT[i].fetch_sub(1, Ordering::SeqCst);
            delivered(job)
        }))
        .unwrap();
        dispatcher.submit(jobs(&slow, 0..20));
        dispatcher.submit(jobs(&fast, 100..180));
        let all = collect_until(&dispatcher, Duration::from_secs(10), |c| {
            c.attempts.len() == 100
        });
        let mut ids: Vec<i64> = all.attempts.iter().map(|a| a.event_id).collect();
        ids.sort();
        let expected: Vec<i64> = (0..20).chain(100..180).collect();
        assert_eq!(ids, expected, "each job sent exactly once");
        assert!(PEAK[0].load(Ordering::SeqCst) <= 2, "cap of 2 respected");
        assert!(
            PEAK[1].load(Ordering::SeqCst) > 2,
            "other endpoints are not held back"
        );
        assert_eq!(dispatcher.load(), (0, 0));
        assert_eq!(dispatcher.plan(100, Instant::now()).held_bytes, 0);
    }

    /// The threads a burst needed end once idle for IDLE_EXIT, all but
    /// KEEP_THREADS, and those left still send.
    #[test]
    fn threads_idle_for_long_end_but_a_few() {
        let wide = endpoint("wide", 12);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            std::thread::sleep(Duration::from_millis(20));
            delivered(job)
        }))
        .unwrap();
        dispatcher.submit(jobs(&wide, 0..12));
        collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 12
        });
        let threads = || lock(&dispatcher.shared.state).threads;
        assert_eq!(threads(), 12, "one thread per job in flight");
        let started = Instant::now();
        while threads() > KEEP_THREADS {
            assert!(
                started.elapsed() < IDLE_EXIT * 5,
                "{} threads left",
                threads()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(IDLE_EXIT * 2);
        assert_eq!(threads(), KEEP_THREADS, "a few are kept");
        dispatcher.submit(jobs(&wide, 12..16));
        collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 4
        });
    }

    #[test]
    fn one_endpoint_keeps_its_order_with_one_slot() {
        let only = endpoint("only", 1);
        let dispatcher = Dispatcher::new(Arc::new(delivered)).unwrap();
        dispatcher.submit(jobs(&only, 0..30));
        let all = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 30
        });
        let ids: Vec<i64> = all.attempts.iter().map(|a| a.event_id).collect();
        assert_eq!(ids, (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn a_hanging_endpoint_holds_up_no_other() {
        let hanging = endpoint("hanging", 16);
        let healthy = endpoint("healthy", 16);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            if job.endpoint.event_type == "hanging" {
                std::thread::sleep(Duration::from_secs(3));
            }
            delivered(job)
        }))
        .unwrap();
        dispatcher.submit(jobs(&hanging, 0..48));
        let started = Instant::now();
        // Healthy events arrive in small batches while the others hang.
        for batch in 0..10 {
            dispatcher.submit(jobs(&healthy, 1000 + batch * 5..1000 + batch * 5 + 5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let all = collect_until(&dispatcher, Duration::from_secs(2), |c| {
            c.attempts.iter().filter(|a| a.event_id >= 1000).count() == 50
        });
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "healthy deliveries took {:?}",
            started.elapsed()
        );
        assert!(all.attempts.iter().all(|a| a.event_id >= 1000));
        assert_eq!(
            dispatcher.load().0,
            16,
            "the hanging endpoint keeps its own 16"
        );
        let (_, unsent) = dispatcher.stop();
        assert_eq!(unsent.len(), 32);
    }

    #[test]
    fn a_failing_endpoint_is_probed_one_request_at_a_time() {
        static SENT: AtomicUsize = AtomicUsize::new(0);
        let down = endpoint("down", 4);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            SENT.fetch_add(1, Ordering::SeqCst);
            Attempt {
                verdict: Verdict::Retry,
                error: Some("connection refused".into()),
                ..Attempt::new(job)
            }
        }))
        .unwrap();
        dispatcher.submit(jobs(&down, 0..50));
        let all = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            !c.changes.is_empty() && c.attempts.len() + c.handed_back.len() == 50
        });
        assert!(matches!(all.changes[0], (ref t, Change::Opened(_)) if t == "down"));
        assert!(
            SENT.load(Ordering::SeqCst) <= 5 + 3,
            "a handful failed, the rest waits"
        );
        assert_eq!(all.handed_back.len(), 50 - all.attempts.len());
        let now = Instant::now();
        let plan = dispatcher.plan(100, now);
        assert_eq!(plan.skip, ["down"]);
        assert!(plan.probes.is_empty(), "the first probe waits a second");
        assert!(dispatcher.next_probe_in(now).unwrap() > Duration::from_millis(500));
        let plan = dispatcher.plan(100, now + Duration::from_secs(2));
        assert_eq!(plan.probes, ["down"]);
        // A probe that finds nothing to send (the endpoint was removed, say)
        // is not due again at once: the worker would spin.
        dispatcher.probe_found_nothing("down", now + Duration::from_secs(2));
        let later = now + Duration::from_secs(3);
        assert!(dispatcher.plan(100, later).probes.is_empty());
        assert!(dispatcher.next_probe_in(later).unwrap() > Duration::from_secs(5));
    }

    #[test]
    fn after_410_gone_nothing_more_is_sent_until_it_is_stored() {
        static SENT: AtomicUsize = AtomicUsize::new(0);
        let gone = endpoint("gone", 1);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            SENT.fetch_add(1, Ordering::SeqCst);
            Attempt {
                verdict: Verdict::Gone,
                status_code: Some(410),
                ..Attempt::new(job)
            }
        }))
        .unwrap();
        dispatcher.submit(jobs(&gone, 0..20));
        let all = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() + c.handed_back.len() == 20
        });
        assert_eq!(SENT.load(Ordering::SeqCst), 1, "one 410, then nothing");
        assert_eq!(all.changes, [("gone".to_string(), Change::Gone)]);
        assert_eq!(dispatcher.plan(100, Instant::now()).skip, ["gone"]);
        // Claimed before the 410 was stored: handed back unsent.
        dispatcher.submit(jobs(&gone, 20..22));
        assert_eq!(dispatcher.collect().handed_back.len(), 2);
        // Stored (the endpoint is disabled): a later claim means it was
        // enabled again.
        dispatcher.forget_gone(&["gone".to_string()]);
        assert!(dispatcher.plan(100, Instant::now()).skip.is_empty());
        dispatcher.submit(jobs(&gone, 22..23));
        collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 1
        });
        assert_eq!(SENT.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn after_an_endpoint_change_nothing_claimed_before_it_starts() {
        static SENT: AtomicUsize = AtomicUsize::new(0);
        let slow = endpoint("slow", 1);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            SENT.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            delivered(job)
        }))
        .unwrap();
        dispatcher.submit(jobs(&slow, 0..10));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            dispatcher.hand_back_waiting(),
            9,
            "all but the one in flight"
        );
        let all = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 1 && c.handed_back.len() == 9
        });
        assert_eq!(all.attempts[0].event_id, 0);
        assert_eq!(SENT.load(Ordering::SeqCst), 1);
        assert_eq!(dispatcher.plan(100, Instant::now()).held_bytes, 0);
    }

    #[test]
    fn retry_after_holds_the_endpoint_and_hands_back_its_waiting_jobs() {
        static SENT: AtomicUsize = AtomicUsize::new(0);
        let busy = endpoint("busy", 2);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            SENT.fetch_add(1, Ordering::SeqCst);
            Attempt {
                verdict: Verdict::Retry,
                status_code: Some(429),
                retry_after: Some(Duration::from_secs(2)),
                ..Attempt::new(job)
            }
        }))
        .unwrap();
        dispatcher.submit(jobs(&busy, 0..10));
        let all = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() + c.handed_back.len() == 10
        });
        assert!(SENT.load(Ordering::SeqCst) <= 2, "only those in flight");
        let now = Instant::now();
        assert_eq!(dispatcher.plan(100, now).skip, ["busy"]);
        let wait = dispatcher.next_probe_in(now).unwrap();
        assert!(wait > Duration::from_secs(1) && wait <= Duration::from_secs(2));
        assert!(all
            .changes
            .iter()
            .all(|(_, c)| matches!(c, Change::Paused(_))));
        // The pause over, the next claim is due at once, and takes the
        // endpoint's events again.
        let later = now + Duration::from_secs(3);
        assert_eq!(dispatcher.next_probe_in(later), Some(Duration::ZERO));
        assert!(dispatcher.plan(100, later).skip.is_empty());
        assert_eq!(dispatcher.next_probe_in(later), None);
    }

    #[test]
    fn no_request_starts_while_too_many_answers_wait_to_be_stored() {
        static SENT: AtomicUsize = AtomicUsize::new(0);
        let fast = endpoint("fast", 8);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            SENT.fetch_add(1, Ordering::SeqCst);
            delivered(job)
        }))
        .unwrap();
        dispatcher.set_unacknowledged_cap(10);
        dispatcher.submit(jobs(&fast, 0..100));
        // Requests start while fewer than 10 answers wait: at most 10 plus
        // those in flight (8) less one finish before nothing starts.
        let at_most = 10 + 8 - 1;
        let first = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() >= 10
        });
        std::thread::sleep(Duration::from_millis(100));
        let held = first.attempts.len() + dispatcher.collect().attempts.len();
        assert!((10..=at_most).contains(&held), "{held} finished");
        assert_eq!(SENT.load(Ordering::SeqCst), held, "nothing more started");
        dispatcher.acknowledge(held);
        let rest = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() >= 10
        });
        std::thread::sleep(Duration::from_millis(100));
        let again = rest.attempts.len() + dispatcher.collect().attempts.len();
        assert!((10..=at_most).contains(&again), "{again} finished");
        dispatcher.set_unacknowledged_cap(usize::MAX);
        collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 100 - held - again
        });
    }

    #[test]
    fn a_job_past_its_deadline_is_handed_back_unsent() {
        let only = endpoint("only", 1);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            std::thread::sleep(Duration::from_millis(300));
            delivered(job)
        }))
        .unwrap();
        let mut batch = jobs(&only, 0..3);
        for job in &mut batch[1..] {
            job.deadline = Instant::now() + Duration::from_millis(100);
        }
        dispatcher.submit(batch);
        let all = collect_until(&dispatcher, Duration::from_secs(3), |c| {
            c.attempts.len() == 1 && c.handed_back.len() == 2
        });
        assert_eq!(all.attempts[0].event_id, 0);
    }

    #[test]
    fn stop_returns_the_waiting_jobs_without_waiting_for_a_slow_request() {
        let only = endpoint("only", 1);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            std::thread::sleep(Duration::from_secs(5));
            delivered(job)
        }))
        .unwrap();
        dispatcher.submit(jobs(&only, 0..3));
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        let (attempts, unsent) = dispatcher.stop();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(attempts.is_empty(), "the abandoned request has no outcome");
        assert_eq!(
            unsent.iter().map(|j| j.event_id).collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[test]
    fn a_panicking_send_is_a_retry_and_the_rest_go_on() {
        let only = endpoint("only", 2);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| {
            assert!(job.event_id != 3, "bad job");
            delivered(job)
        }))
        .unwrap();
        dispatcher.submit(jobs(&only, 0..8));
        let all = collect_until(&dispatcher, Duration::from_secs(5), |c| {
            c.attempts.len() == 8
        });
        let bad = all.attempts.iter().find(|a| a.event_id == 3).unwrap();
        assert_eq!(bad.verdict, Verdict::Retry);
        assert!(bad.error.as_deref().unwrap().contains("bad job"), "{bad:?}");
        assert_eq!(
            all.attempts
                .iter()
                .filter(|a| a.verdict == Verdict::Delivered)
                .count(),
            7
        );
    }

    /// Idle sending threads wait without a timeout while no job waits (an
    /// idle deliverer uses no CPU), and look again at least every
    /// IDLE_CHECK while one does.
    #[test]
    fn idle_threads_sleep_until_told() {
        let only = endpoint("only", 1);
        let mut state = State::default();
        let now = Instant::now();
        assert_eq!(state.next_check(now), None);
        state.lane("only").jobs.extend(jobs(&only, 0..1));
        assert_eq!(state.next_check(now), Some(IDLE_CHECK));
    }

    /// Whether the wake-up pipe becomes readable within `ms`.
    fn woken_within(dispatcher: &Dispatcher, ms: i32) -> bool {
        let mut poll = libc::pollfd {
            fd: dispatcher.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one descriptor we own, with a local pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) } == 1;
        dispatcher.drain_wake();
        ready
    }

    /// With quiet finishes, a delivery does not wake the caller; a circuit
    /// change, half the cap of unstored answers, and a stop do.
    #[test]
    fn quiet_finishes_wake_only_for_what_cannot_wait() {
        let only = endpoint("only", 4);
        let dispatcher = Dispatcher::new(Arc::new(|job: &Job| Attempt {
            verdict: if job.event_id == 9 {
                Verdict::Gone
            } else {
                Verdict::Delivered
            },
            ..Attempt::new(job)
        }))
        .unwrap();
        dispatcher.set_unacknowledged_cap(6);
        dispatcher.set_quiet_finishes(true);
        dispatcher.submit(jobs(&only, 0..1));
        assert!(!woken_within(&dispatcher, 300), "a delivery can wait");
        assert_eq!(dispatcher.collect().attempts.len(), 1);
        dispatcher.submit(jobs(&only, 1..3));
        assert!(
            woken_within(&dispatcher, 2000),
            "three unstored of a cap of six"
        );
        dispatcher.acknowledge(3);
        dispatcher.collect();
        dispatcher.submit(jobs(&only, 9..10));
        assert!(
            woken_within(&dispatcher, 2000),
            "410 Gone changes the endpoint"
        );
        let collected = dispatcher.collect();
        assert_eq!(collected.changes, [("only".to_string(), Change::Gone)]);

        let slow = Dispatcher::new(Arc::new(|job: &Job| {
            std::thread::sleep(Duration::from_millis(300));
            delivered(job)
        }))
        .unwrap();
        slow.set_quiet_finishes(true);
        slow.submit(jobs(&only, 0..1));
        std::thread::sleep(Duration::from_millis(50));
        slow.stop();
        assert!(
            woken_within(&slow, 2000),
            "a stop waits for what is in flight"
        );
        let loud = Dispatcher::new(Arc::new(delivered)).unwrap();
        loud.submit(jobs(&only, 0..1));
        assert!(woken_within(&loud, 2000), "by default every finish wakes");
    }

    #[test]
    fn a_finish_makes_the_wake_fd_readable() {
        let only = endpoint("only", 1);
        let dispatcher = Dispatcher::new(Arc::new(delivered)).unwrap();
        let mut poll = libc::pollfd {
            fd: dispatcher.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one descriptor we own, with a local pollfd.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0, "nothing yet");
        dispatcher.submit(jobs(&only, 0..1));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 2000) }, 1);
        dispatcher.drain_wake();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0, "drained");
        assert_eq!(dispatcher.collect().attempts.len(), 1);
    }
}
