//! Sending a batch concurrently, within each endpoint's cap.
//!
//! `concurrency` threads take jobs in order, skipping an endpoint that has
//! max_in_flight requests out already (n8n, for one, only queues what it
//! cannot serve). Jobs of one endpoint leave in the order they came.
//!
//! When `stop` turns true (SIGTERM) nothing new starts and the call returns
//! at once with the attempts finished so far and the jobs never started. The
//! requests still in flight are abandoned: their events stay processing and
//! are delivered again when their lease ends, which keeps delivery at least
//! once without making shutdown wait for a slow receiver.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Attempt, Job};

/// How often the calling thread looks at `stop` while requests run.
const STOP_CHECK: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Board {
    waiting: Vec<(String, VecDeque<Job>)>,
    in_flight: HashMap<String, usize>,
    next: usize,
    attempts: Vec<Attempt>,
    stopped: bool,
}

impl Board {
    /// The next job whose endpoint has room, taking endpoints in turn.
    fn take(&mut self) -> Option<Job> {
        let count = self.waiting.len();
        for step in 0..count {
            let index = (self.next + step) % count;
            let (key, jobs) = &mut self.waiting[index];
            let Some(front) = jobs.front() else { continue };
            let busy = self.in_flight.entry(key.clone()).or_default();
            if *busy < front.endpoint.max_in_flight {
                *busy += 1;
                self.next = (index + 1) % count;
                return jobs.pop_front();
            }
        }
        None
    }

    fn nothing_waiting(&self) -> bool {
        self.waiting.iter().all(|(_, jobs)| jobs.is_empty())
    }

    fn done(&self) -> bool {
        self.nothing_waiting() && self.in_flight.values().all(|&n| n == 0)
    }
}

type Shared = Arc<(Mutex<Board>, Condvar)>;

/// Sends every job with `send`; returns the attempts made and the jobs left
/// unsent because `stop` said so.
pub fn dispatch<S>(
    jobs: Vec<Job>,
    concurrency: usize,
    send: Arc<S>,
    stop: fn() -> bool,
) -> (Vec<Attempt>, Vec<Job>)
where
    S: Fn(&Job) -> Attempt + Send + Sync + 'static,
{
    let total = jobs.len();
    let mut board = Board {
        attempts: Vec::with_capacity(total),
        ..Board::default()
    };
    for job in jobs {
        let key = &job.endpoint.event_type;
        match board.waiting.iter_mut().find(|(k, _)| k == key) {
            Some((_, queue)) => queue.push_back(job),
            None => board.waiting.push((key.clone(), VecDeque::from([job]))),
        }
    }
    let shared: Shared = Arc::new((Mutex::new(board), Condvar::new()));

    for _ in 0..concurrency.clamp(1, total.max(1)) {
        let (shared, send) = (shared.clone(), send.clone());
        std::thread::spawn(move || sender(&shared, &*send, stop));
    }

    let (lock, changed) = &*shared;
    let mut board = lock.lock().unwrap();
    loop {
        if board.done() {
            break;
        }
        if stop() {
            board.stopped = true;
            changed.notify_all();
            break;
        }
        board = changed.wait_timeout(board, STOP_CHECK).unwrap().0;
    }
    let attempts = std::mem::take(&mut board.attempts);
    let unsent = board
        .waiting
        .iter_mut()
        .flat_map(|(_, jobs)| jobs.drain(..))
        .collect();
    (attempts, unsent)
}

/// One sending thread: takes jobs until none is left or the batch stops.
fn sender<S: Fn(&Job) -> Attempt>(shared: &Shared, send: &S, stop: fn() -> bool) {
    block_signals();
    let (lock, changed) = &**shared;
    loop {
        let job = {
            let mut board = lock.lock().unwrap();
            loop {
                if board.stopped || stop() || board.nothing_waiting() {
                    break None;
                }
                if let Some(job) = board.take() {
                    break Some(job);
                }
                // Jobs wait, but their endpoints are full: wait for a finish.
                board = changed.wait(board).unwrap();
            }
        };
        let Some(job) = job else {
            changed.notify_all();
            return;
        };
        // A panic is one failed attempt (retried), not a lost thread.
        let attempt = std::panic::catch_unwind(AssertUnwindSafe(|| send(&job)))
            .unwrap_or_else(|panic| panicked(&job, panic.as_ref()));
        let mut board = lock.lock().unwrap();
        *board.in_flight.get_mut(&job.endpoint.event_type).unwrap() -= 1;
        board.attempts.push(attempt);
        drop(board);
        changed.notify_all();
    }
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
    use crate::delivery::{Endpoint, Verdict};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn endpoint(name: &str, cap: usize) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            event_type: name.into(),
            url: format!("http://127.0.0.1/{name}"),
            method: "POST".into(),
            headers: vec![],
            signing_key: None,
            timeout: Duration::from_secs(1),
            max_in_flight: cap,
        })
    }

    fn jobs(endpoint: &Arc<Endpoint>, ids: std::ops::Range<i64>) -> Vec<Job> {
        ids.map(|id| Job {
            event_id: id,
            attempt: 1,
            endpoint: endpoint.clone(),
            body: "{}".into(),
        })
        .collect()
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn every_job_once_within_each_cap() {
        static IN_FLIGHT: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        static PEAK: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let slow = endpoint("slow", 2);
        let fast = endpoint("fast", 100);
        let mut all = jobs(&slow, 0..20);
        all.extend(jobs(&fast, 100..180));

        let send = Arc::new(|job: &Job| {
            let i = usize::from(job.endpoint.event_type == "fast");
            let now = IN_FLIGHT[i].fetch_add(1, Ordering::SeqCst) + 1;
            PEAK[i].fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            IN_FLIGHT[i].fetch_sub(1, Ordering::SeqCst);
            Attempt {
                verdict: Verdict::Delivered,
                ..Attempt::new(job)
            }
        });
        let (attempts, unsent) = dispatch(all, 8, send, never);
        assert!(unsent.is_empty());
        let mut ids: Vec<i64> = attempts.iter().map(|a| a.event_id).collect();
        ids.sort();
        let expected: Vec<i64> = (0..20).chain(100..180).collect();
        assert_eq!(ids, expected, "each job sent exactly once");
        assert!(PEAK[0].load(Ordering::SeqCst) <= 2, "cap of 2 respected");
        assert!(
            PEAK[1].load(Ordering::SeqCst) > 2,
            "other endpoints are not held back"
        );
    }

    #[test]
    fn one_endpoint_keeps_its_order_with_one_slot() {
        let only = endpoint("only", 1);
        let (attempts, _) = dispatch(jobs(&only, 0..30), 4, Arc::new(Attempt::new), never);
        let ids: Vec<i64> = attempts.iter().map(|a| a.event_id).collect();
        assert_eq!(ids, (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn stop_returns_the_jobs_not_started() {
        static STOPPING: AtomicBool = AtomicBool::new(false);
        let only = endpoint("only", 1);
        let send = Arc::new(|job: &Job| {
            if job.event_id == 2 {
                STOPPING.store(true, Ordering::SeqCst);
            }
            Attempt::new(job)
        });
        let (attempts, unsent) = dispatch(jobs(&only, 0..10), 2, send, || {
            STOPPING.load(Ordering::SeqCst)
        });
        let sent: Vec<i64> = attempts.iter().map(|a| a.event_id).collect();
        assert_eq!(sent, [0, 1, 2]);
        assert_eq!(
            unsent.iter().map(|j| j.event_id).collect::<Vec<_>>(),
            (3..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn stop_does_not_wait_for_a_slow_request() {
        static STOPPING: AtomicBool = AtomicBool::new(false);
        let only = endpoint("only", 1);
        let send = Arc::new(|job: &Job| {
            STOPPING.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(5));
            Attempt::new(job)
        });
        let started = std::time::Instant::now();
        let (attempts, unsent) = dispatch(jobs(&only, 0..3), 1, send, || {
            STOPPING.load(Ordering::SeqCst)
        });
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "returned after {:?}",
            started.elapsed()
        );
        assert!(attempts.is_empty(), "the abandoned request has no outcome");
        assert_eq!(unsent.len(), 2);
    }

    #[test]
    fn a_panicking_send_is_a_retry_and_the_rest_go_on() {
        let only = endpoint("only", 2);
        let send = Arc::new(|job: &Job| {
            assert!(job.event_id != 3, "bad job");
            Attempt {
                verdict: Verdict::Delivered,
                ..Attempt::new(job)
            }
        });
        let (attempts, unsent) = dispatch(jobs(&only, 0..8), 2, send, never);
        assert!(unsent.is_empty());
        assert_eq!(attempts.len(), 8);
        let bad = attempts.iter().find(|a| a.event_id == 3).unwrap();
        assert_eq!(bad.verdict, Verdict::Retry);
        assert!(bad.error.as_deref().unwrap().contains("bad job"), "{bad:?}");
        assert_eq!(
            attempts
                .iter()
                .filter(|a| a.verdict == Verdict::Delivered)
                .count(),
            7
        );
    }

    #[test]
    fn empty_batch() {
        let (attempts, unsent) = dispatch(vec![], 4, Arc::new(Attempt::new), never);
        assert!(attempts.is_empty() && unsent.is_empty());
    }
}
